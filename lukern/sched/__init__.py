"""The co-located trainer and what keeps it invisible to inference (DESIGN section 5).

- :mod:`.load`: load signals (``ServingLoad``; PSI and run-queue fallbacks)
- :mod:`.qos`: the QoS ladder (resctrl, cgroup, SCHED_IDLE / nice, cooperative)
- :mod:`.guard`: the fast guard between chunks and the slow controller
- :mod:`.placement`: NUMA pinning and first touch
- :mod:`.live`: ``LiveUpdater``
"""

from .guard import FastGuard, Knobs, SlowController
from .live import LiveUpdater
from .load import ServingLoad
from .qos import Ladder, Level, probe_ladder

__all__ = sorted(["FastGuard", "Knobs", "Ladder", "Level", "LiveUpdater", "ServingLoad", "SlowController",
                  "probe_ladder"])
