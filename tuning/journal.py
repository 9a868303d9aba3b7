"""Append-only JSONL journal of a tuning session, resumable with ``lukern-tune --resume``.

One JSON object per line, written with a single ``write`` and flushed at once, so a
killed session leaves at worst a truncated *last* line. Kinds of lines:

- ``header``: format, version, host fingerprint, lukern version, start time;
- ``trial``: one measured candidate of one case (also failures, with the error);
- ``case``: a finished case (its chosen plan, heuristic comparison and notes).

Resuming checks the header's fingerprint against this host (timings from another host
are meaningless here), drops a truncated last line (cutting the file back to the last
complete line so new lines start clean), and hands the tuner the trials and finished
cases it can reuse.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .search import Trial

__all__ = ["JOURNAL_FORMAT", "Journal", "JournalError"]

JOURNAL_FORMAT = "lukern-tune-journal"
JOURNAL_VERSION = 1


class JournalError(RuntimeError):
    """The journal cannot be resumed here (other host, not a journal, wrong version)."""


class Journal:
    """An open journal. Use :meth:`start` for a new session, :meth:`resume` to continue."""

    def __init__(self, path: Path, header: dict, records: list[dict], dropped_tail: bool = False, skipped: int = 0):
        self.path = Path(path)
        self.header = header
        self.records = records
        self.dropped_tail = dropped_tail
        self.skipped_lines = skipped
        self._fh = open(self.path, "a", encoding="utf-8")

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def start(cls, path, fingerprint: str, **meta) -> "Journal":
        """Begin a new journal at ``path`` (replacing an old one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"kind": "header", "format": JOURNAL_FORMAT, "version": JOURNAL_VERSION,
                  "fingerprint": fingerprint, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(header) + "\n")
        return cls(path, header, [])

    @classmethod
    def resume(cls, path, fingerprint: str) -> "Journal":
        """Reopen ``path`` for appending after checking it belongs to this host."""
        path = Path(path)
        if not path.is_file():
            raise JournalError(f"no journal to resume at {path}; run without --resume to start one.")
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        # everything after the last newline is an unfinished line (empty if none)
        tail = lines.pop()
        dropped_tail = bool(tail.strip())
        records, skipped, good_end = [], 0, 0
        pos = 0
        for i, line in enumerate(lines):
            pos += len(line) + 1
            if not line.strip():
                good_end = pos
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:
                if i == len(lines) - 1 and not dropped_tail:
                    # a complete-looking but corrupt last line: a torn write; drop it too
                    dropped_tail = True
                    break
                skipped += 1
                good_end = pos
                continue
            records.append(rec)
            good_end = pos
        if not records or records[0].get("kind") != "header" or records[0].get("format") != JOURNAL_FORMAT:
            raise JournalError(f"{path} is not a lukern-tune journal; run without --resume to start a new one.")
        header = records[0]
        if header.get("version") != JOURNAL_VERSION:
            raise JournalError(f"{path} is journal version {header.get('version')!r}; this tuner writes "
                               f"{JOURNAL_VERSION}. Run without --resume to start a new one.")
        if header.get("fingerprint") != fingerprint:
            raise JournalError(
                f"{path} was recorded on host {header.get('fingerprint')} but this host is {fingerprint}: its "
                "timings do not apply here. Run without --resume to start a new journal.")
        if good_end < len(raw):
            with open(path, "r+b") as fh:  # cut the torn tail so appended lines start clean
                fh.truncate(good_end)
        return cls(path, header, records[1:], dropped_tail, skipped)

    # -- writing ---------------------------------------------------------------------------
    def append(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def add_trial(self, op: str, case: str, bucket, trial: Trial) -> None:
        self.append({"kind": "trial", "op": op, "case": case, "bucket": list(bucket), **trial.to_record()})

    def add_case(self, op: str, case: str, result: dict) -> None:
        self.append({"kind": "case", "op": op, "case": case, "result": result})
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading ---------------------------------------------------------------------------
    def trials(self, op: str, case: str) -> dict[str, Trial]:
        """Trials recorded for one case, keyed by the plan they measured."""
        from .space import candidate_key

        out = {}
        for rec in self.records:
            if rec.get("kind") == "trial" and rec.get("op") == op and rec.get("case") == case:
                try:
                    t = Trial.from_record(rec)
                except (KeyError, TypeError, ValueError):
                    continue
                out[candidate_key(t.plan)] = t
        return out

    def finished(self, op: str, case: str) -> dict | None:
        for rec in reversed(self.records):
            if rec.get("kind") == "case" and rec.get("op") == op and rec.get("case") == case:
                return rec.get("result")
        return None
