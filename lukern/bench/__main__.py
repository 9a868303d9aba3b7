"""``python -m lukern.bench NAME [options]``: run one comparison script."""

import importlib
import pkgutil
import sys

import lukern.bench as _pkg


def _names():
    return sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__) if not m.name.startswith("_"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m lukern.bench NAME [options]\nNAME is one of: {', '.join(_names())}")
        return 0
    name = argv[0]
    if name not in _names():
        print(f"unknown benchmark {name!r}; choose one of: {', '.join(_names())}", file=sys.stderr)
        return 2
    return importlib.import_module(f"lukern.bench.{name}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
