"""Comparison scripts: lukern against its peers, measured in the same run.

``python -m lukern.bench <name> [options]``; names: see ``python -m lukern.bench --help``.
"""
