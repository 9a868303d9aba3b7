"""``lukern replay``: the end-to-end freshness experiment (DESIGN section 7).

Stream readers for public click logs (:mod:`.streams`), a seeded drifting synthetic
stream (:mod:`.synthetic`), a small numpy DLRM on lukern's table-batched lookup
(:mod:`.dlrm`), the refresh strategies (:mod:`.strategies`), the prequential replay
loop (:mod:`.runner`), its live variant on :class:`lukern.LiveUpdater` (:mod:`.live`)
and the report (:mod:`.report`). The command line is ``lukern replay``.
"""

from __future__ import annotations

from .dlrm import DLRM, bce_with_logits
from .runner import ReplayConfig, run_replay
from .streams import FORMATS, Batch, Stream, StreamFormatError, infer_format, read_stream
from .synthetic import synthetic_stream

__all__ = [
    "DLRM",
    "FORMATS",
    "Batch",
    "ReplayConfig",
    "Stream",
    "StreamFormatError",
    "bce_with_logits",
    "infer_format",
    "read_stream",
    "run_replay",
    "synthetic_stream",
]
