"""``lukern replay``: the end-to-end freshness experiment (DESIGN section 7).

Stream readers for public click logs (:mod:`.streams`), a seeded drifting synthetic
stream (:mod:`.synthetic`) and a small numpy DLRM on lukern's table-batched lookup
(:mod:`.dlrm`).
"""

from __future__ import annotations

from .dlrm import DLRM, bce_with_logits
from .streams import FORMATS, Batch, Stream, StreamFormatError, infer_format, read_stream
from .synthetic import synthetic_stream

__all__ = sorted([
    "DLRM",
    "FORMATS",
    "Batch",
    "Stream",
    "StreamFormatError",
    "bce_with_logits",
    "infer_format",
    "read_stream",
    "synthetic_stream",
])
