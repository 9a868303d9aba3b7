"""``python -m lukern_tuning``: the same as ``lukern-tune``."""

from .cli import main

raise SystemExit(main())
