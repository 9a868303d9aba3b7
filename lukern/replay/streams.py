"""Time-ordered click streams read from public log formats.

Every reader returns a :class:`Stream`: the whole log in memory as numpy arrays sorted by
time (stable, so rows with equal times keep their file order), with

- ``t``: float64 seconds (Unix time, or the row number when the format has no clock),
- ``dense``: float32 ``(n, n_dense)`` features, computed *causally* where they are counts
  (a count at row i only sees rows before i in time order),
- ``cat``: int64 ``(n, n_cat)`` ids, column f in ``[0, cat_sizes[f])``,
- ``labels``: float32 in {0, 1}.

Categorical vocabularies are *closed* (ids compacted to 0..k-1 over the file, e.g.
MovieLens users and movies) or *open* (values hashed into ``hash_rows`` rows, e.g. Criteo's
hex hashes or TalkingData's ``ip``, where new values keep appearing in production).
``Stream.batches(n)`` yields :class:`Batch` objects in time order.

Malformed input raises :class:`StreamFormatError` naming the file and line; with
``skip_bad=True`` bad lines are skipped and counted in ``Stream.n_skipped`` instead.
Only numpy and the csv module are used.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "FORMATS",
    "Batch",
    "Stream",
    "StreamFormatError",
    "infer_format",
    "read_avazu",
    "read_criteo",
    "read_ml100k",
    "read_movielens",
    "read_stream",
    "read_talkingdata",
]

#: formats accepted by :func:`read_stream` and ``lukern replay --format``.
FORMATS = ("movielens", "ml-100k", "talkingdata", "criteo", "avazu")

#: cap on rows of an automatically sized hashed table (see ``hash_rows``).
_AUTO_HASH_CAP = 1 << 20
#: how many skipped lines a Stream remembers (line number and reason) for the report.
_KEEP_SKIPPED = 20


class StreamFormatError(ValueError):
    """A log file cannot be read: names the file and, when it applies, the line."""

    def __init__(self, path, message, line=None):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass
class Batch:
    """A slice of a stream: ``t`` (n,), ``dense`` (n, n_dense), ``cat`` (n, n_cat), ``labels`` (n,)."""

    t: np.ndarray
    dense: np.ndarray
    cat: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Stream:
    """A time-ordered labelled log held as numpy arrays (see the module notes)."""

    name: str
    format: str
    t: np.ndarray
    dense: np.ndarray
    cat: np.ndarray
    labels: np.ndarray
    cat_names: list
    cat_sizes: list
    dense_names: list
    hashed: list = field(default_factory=list)
    n_skipped: int = 0
    skipped: list = field(default_factory=list)
    was_sorted: bool = True
    source: str = ""

    def __post_init__(self):
        n = self.labels.shape[0]
        if not (self.t.shape == (n,) and self.dense.shape[0] == n and self.cat.shape[0] == n):
            raise ValueError(f"stream arrays disagree in length: t {self.t.shape}, dense {self.dense.shape}, "
                             f"cat {self.cat.shape}, labels {self.labels.shape}")
        if self.cat.shape[1] != len(self.cat_sizes) or len(self.cat_names) != len(self.cat_sizes):
            raise ValueError(f"{self.cat.shape[1]} categorical columns but {len(self.cat_sizes)} sizes")
        if not self.hashed:
            self.hashed = [False] * len(self.cat_sizes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_dense(self) -> int:
        return int(self.dense.shape[1])

    @property
    def n_cat(self) -> int:
        return int(self.cat.shape[1])

    def batch(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` as a :class:`Batch` (views, no copy)."""
        return Batch(self.t[start:stop], self.dense[start:stop], self.cat[start:stop], self.labels[start:stop])

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        """Yield consecutive time-ordered batches of at most ``batch_size`` rows.

        Examples
        --------
        >>> from lukern.replay.synthetic import synthetic_stream
        >>> s = synthetic_stream(n_events=1000, seed=0)
        >>> [len(b) for b in s.batches(400)]
        [400, 400, 200]
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}.")
        stop = len(self) if stop is None else min(stop, len(self))
        for a in range(start, stop, batch_size):
            yield self.batch(a, min(stop, a + batch_size))

    def describe(self) -> str:
        """One line: rows, time span, positive rate, tables."""
        pos = float(self.labels.mean()) if len(self) else 0.0
        tabs = ", ".join(f"{n}:{s}{'#' if h else ''}" for n, s, h in zip(self.cat_names, self.cat_sizes, self.hashed))
        skipped = f", {self.n_skipped} bad line{'s' if self.n_skipped != 1 else ''} skipped" if self.n_skipped else ""
        return (f"{self.name} [{self.format}]: {len(self)} rows, t {self.t[0]:.0f}..{self.t[-1]:.0f}, "
                f"positives {100 * pos:.1f}%, dense {self.n_dense}, tables {tabs}{skipped}")


# --------------------------------------------------------------------------- file access


def _is_gzip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_text(path, encoding="utf-8"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file. Check --data (plain or .gz files are accepted).")
    if os.path.isdir(path):
        raise StreamFormatError(path, "is a folder; pass the ratings / log file inside it.")
    if _is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    if str(path).endswith(".gz"):
        raise StreamFormatError(path, "is named .gz but is not gzip data (no gzip magic bytes); it may be an HTML "
                                      "error page saved by a download. Fetch the file again.")
    return open(path, encoding=encoding, newline="")


class _Bad:
    """Collects bad lines; raises on the first one in file order unless skipping."""

    def __init__(self, path, skip: bool):
        self.path, self.skip = str(path), skip
        self.items = {}  # line -> message (first reason per line)

    def add(self, line: int, message: str):
        self.items.setdefault(line, message)

    def add_rows(self, rows, lines, messages):
        """Bad rows found by a column check (rows: indices into the parsed rows)."""
        for r, m in zip(rows, messages):
            self.items.setdefault(int(lines[r]), m)

    def finish_check(self):
        if self.items and not self.skip:
            line = min(self.items)
            raise StreamFormatError(self.path, self.items[line], line)


def _read_rows(path, *, delimiter, n_fields, header, skip_bad, max_rows, fmt, encoding="utf-8"):
    """Parse a delimited file into string columns.

    ``header``: a callable(first_row) -> True when the first row is a header (it is then
    dropped after the callable has validated it), or False for headerless files.
    Returns (columns, line_numbers, header_row or None, bad collector).
    """
    bad = _Bad(path, skip_bad)
    cols = [[] for _ in range(n_fields)]
    lines = []
    head = None
    line = 0
    f = _open_text(path, encoding)
    try:
        reader = csv.reader(f, delimiter=delimiter)
        first = True
        try:
            for row in reader:
                line = reader.line_num
                if not row:
                    continue  # blank line (e.g. a trailing newline twice)
                if first:
                    first = False
                    if header and header(row):
                        head = row
                        continue
                if len(row) != n_fields:
                    bad.add(line, f"has {len(row)} fields; a {fmt} line has exactly {n_fields} "
                                  f"(separated by {delimiter!r}). Fix or remove the line, or skip bad lines (skip_bad=True; "
                                  "--skip-bad on the command line).")
                    continue
                for c, v in zip(cols, row):
                    c.append(v)
                lines.append(line)
                if max_rows is not None and len(lines) >= max_rows:
                    break
        except EOFError:
            raise StreamFormatError(path, f"the gzip stream is truncated (it ends inside compressed data after "
                                          f"line {line}); the file is incomplete. Fetch it again.") from None
        except gzip.BadGzipFile as e:
            raise StreamFormatError(path, f"is not a valid gzip file ({e}).") from None
        except zlib.error as e:
            raise StreamFormatError(path, f"the gzip data is corrupt after line {line} ({e}). Fetch it again.") from None
        except UnicodeDecodeError as e:
            raise StreamFormatError(path, f"is not {encoding} text ({e.reason} at byte {e.start} of a block), "
                                          f"near line {line + 1}.") from None
        except csv.Error as e:
            raise StreamFormatError(path, f"is not valid CSV ({e}).", line) from None
    finally:
        f.close()
    return cols, np.asarray(lines, dtype=np.int64), head, bad


def _no_rows(path, bad):
    bad.finish_check()
    if bad.items:
        return StreamFormatError(path, f"no valid rows: all {len(bad.items)} data lines were bad "
                                       f"(first: line {min(bad.items)}: {bad.items[min(bad.items)]}).")
    return StreamFormatError(path, "holds no data rows (empty file or header only).")


# --------------------------------------------------------------------------- column parsing


def _floats(col, lines, bad, what, *, empty=None, finite=True):
    """Column of strings -> float64, marking bad rows (non-numbers, non-finite)."""
    if empty is not None:
        col = [v if v != "" else empty for v in col]
    try:
        out = np.array(col, dtype=np.float64)
        ok = np.isfinite(out) if finite else np.ones(out.shape, bool)
        if ok.all():
            return out, None
        rows = np.flatnonzero(~ok)
        bad.add_rows(rows, lines, [f"{what} {col[r]!r} is not a finite number." for r in rows])
        return out, ~ok
    except ValueError:
        pass
    out = np.zeros(len(col), dtype=np.float64)
    mask = np.zeros(len(col), dtype=bool)
    rows, msgs = [], []
    for i, v in enumerate(col):
        try:
            x = float(v)
            if finite and not np.isfinite(x):
                raise ValueError
            out[i] = x
        except ValueError:
            mask[i] = True
            rows.append(i)
            msgs.append(f"{what} {v!r} is not a{' finite' if finite else ''} number.")
    bad.add_rows(rows, lines, msgs)
    return out, mask


def _labels01(values, lines, bad, what):
    """float64 column -> mask of rows whose label is not 0 or 1."""
    wrong = (values != 0) & (values != 1)
    if wrong.any():
        rows = np.flatnonzero(wrong)
        bad.add_rows(rows, lines, [f"label {what} = {values[r]:g} is outside {{0, 1}}." for r in rows])
    return wrong


def _or(*masks):
    out = None
    for m in masks:
        if m is None:
            continue
        out = m.copy() if out is None else (out | m)
    return out


def _keep(mask, n):
    return np.ones(n, dtype=bool) if mask is None else ~mask


# --------------------------------------------------------------------------- encoding


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Deterministic 64-bit mixer (the SplitMix64 finaliser) on uint64 arrays."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_uniques(uniq: np.ndarray, salt: int) -> np.ndarray:
    if uniq.dtype.kind in "iu":
        keys = uniq.astype(np.int64).view(np.uint64)
    else:
        # blake2b of each distinct string: stable across runs and machines (Python's hash() is salted).
        keys = np.array([int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little")
                         for u in uniq], dtype=np.uint64)
    return _splitmix64(keys ^ np.uint64(salt * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF))


def _encode(values, *, open_vocab: bool, hash_rows, salt: int):
    """Map raw values to table rows. Closed: compact ids 0..k-1 (sorted by value).
    Open: hash into ``hash_rows`` rows (auto: next power of two >= 2x distinct values)."""
    uniq, inv = np.unique(np.asarray(values), return_inverse=True)
    inv = inv.reshape(-1)
    if not open_vocab:
        return inv.astype(np.int64), int(uniq.shape[0])
    if hash_rows is None:
        rows = 1 << max(4, int(np.ceil(np.log2(max(2 * uniq.shape[0], 1)))))
        rows = min(rows, _AUTO_HASH_CAP)
    else:
        rows = int(hash_rows)
        if rows < 1:
            raise ValueError(f"`hash_rows` must be >= 1; got {hash_rows}.")
    h = (_hash_uniques(uniq, salt) % np.uint64(rows)).astype(np.int64)
    return h[inv], rows


def _prior_counts(ids: np.ndarray) -> np.ndarray:
    """For rows in time order: how many earlier rows carry the same id (a causal count)."""
    n = ids.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    new = np.ones(n, dtype=bool)
    new[1:] = s[1:] != s[:-1]
    starts = np.flatnonzero(new)
    group_start = starts[np.cumsum(new) - 1]
    out = np.empty(n, np.int64)
    out[order] = np.arange(n) - group_start
    return out


def _trailing_counts(ids: np.ndarray, t: np.ndarray, window: float) -> np.ndarray:
    """For rows in time order: how many earlier rows carry the same id within the last
    ``window`` seconds (a windowed counter, as feature stores keep: its distribution does
    not grow with the age of the log the way a running total does)."""
    n = ids.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    _, inv = np.unique(ids, return_inverse=True)
    inv = inv.reshape(-1).astype(np.float64)
    t0 = t - t.min()
    span = float(t0.max()) + float(window) + 1.0
    key = inv * span + t0
    order = np.lexsort((np.arange(n), key))  # by id, then time, then row
    sk = key[order]
    left = np.searchsorted(sk, sk - window, side="left")
    out = np.empty(n, np.int64)
    out[order] = np.arange(n) - left
    return out


def _log_count(c):
    return (np.log1p(c) / 5.0).astype(np.float32)


def _hour_features(t_seconds):
    ang = 2 * np.pi * ((t_seconds % 86400.0) / 86400.0)
    return np.sin(ang).astype(np.float32), np.cos(ang).astype(np.float32)


def _time_sort(path, t):
    order = np.argsort(t, kind="stable")
    was_sorted = bool(t.shape[0] < 2 or np.all(np.diff(t) >= 0))
    return order, was_sorted


def _finish(name, fmt, path, t, dense_cols, dense_names, cat_cols, cat_names, labels, bad, *,
            open_flags, hash_rows, was_sorted, causal_counts=()):
    """Encode categorical columns, add causal counts, assemble the Stream.

    ``t``, ``labels`` and the columns are already filtered and in time order;
    ``causal_counts``: (name, values) pairs whose prior-occurrence counts become dense features.
    """
    cats, sizes = [], []
    for f, (vals, is_open) in enumerate(zip(cat_cols, open_flags)):
        ids, size = _encode(vals, open_vocab=is_open, hash_rows=hash_rows, salt=f + 1)
        cats.append(ids)
        sizes.append(size)
    for cname, vals in causal_counts:
        dense_cols.append(_log_count(_prior_counts(np.unique(np.asarray(vals), return_inverse=True)[1].reshape(-1))))
        dense_names.append(f"log_prior_{cname}")
    n = labels.shape[0]
    dense = (np.stack(dense_cols, axis=1).astype(np.float32) if dense_cols else np.zeros((n, 0), np.float32))
    skipped = sorted(bad.items.items())[:_KEEP_SKIPPED]
    return Stream(name=name, format=fmt, t=np.ascontiguousarray(t, dtype=np.float64), dense=np.ascontiguousarray(dense),
                  cat=np.ascontiguousarray(np.stack(cats, axis=1).astype(np.int64)),
                  labels=np.ascontiguousarray(labels, dtype=np.float32), cat_names=list(cat_names),
                  cat_sizes=[int(s) for s in sizes], dense_names=list(dense_names), hashed=list(open_flags),
                  n_skipped=len(bad.items), skipped=skipped, was_sorted=was_sorted, source=str(path))


def _stem(path) -> str:
    base = os.path.basename(str(path))
    return base[:-3] if base.endswith(".gz") else base


def _sibling(path, old: str, new: str):
    """The file beside ``path`` whose name has ``old`` replaced by ``new``, plain or .gz."""
    folder, base = os.path.split(str(path))
    stem = _stem(path)
    if old not in stem:
        return None
    target = stem.replace(old, new)
    for cand in (target, target + ".gz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    return None


# --------------------------------------------------------------------------- MovieLens

_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_movies_csv(path):
    """movies.csv -> {movieId: (genres string, release year or nan)}."""
    cols, lines, _, bad = _read_rows(path, delimiter=",", n_fields=3, skip_bad=False, max_rows=None,
                                     fmt="MovieLens movies.csv",
                                     header=lambda row: not _is_number(row[0]))
    ids, _ = _floats(cols[0], lines, bad, "movieId")
    bad.finish_check()
    years = np.full(len(ids), np.nan)
    for i, title in enumerate(cols[1]):
        m = _YEAR.search(title.strip())
        if m:
            years[i] = float(m.group(1))
    return ids.astype(np.int64), np.array(cols[2], dtype=object), years


def _load_ratings_fast(path, max_rows):
    """numpy's C parser for the common clean case; None when anything is unusual
    (the line-by-line path then finds and names the problem)."""
    try:
        with _open_text(path) as f:
            first = f.readline()
            if first.strip().lower().replace(" ", "") != "userid,movieid,rating,timestamp":
                return None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "input contained no data": the slow path says it better
                arr = np.loadtxt(f, delimiter=",", dtype=np.float64, max_rows=max_rows, ndmin=2)
    except (ValueError, EOFError, OSError, zlib.error, UnicodeDecodeError, StreamFormatError):
        return None
    if arr.shape[0] == 0 or arr.shape[1] != 4 or not np.isfinite(arr).all():
        return None
    if (arr[:, 0] != np.round(arr[:, 0])).any() or (arr[:, 1] != np.round(arr[:, 1])).any():
        return None
    return arr


def _movielens_common(name, fmt, path, users, items, ratings, t, bad, *, genre_of, year_of, extra_dense=(),
                      extra_cat=()):
    order, was_sorted = _time_sort(path, t)
    users, items, ratings, t = users[order], items[order], ratings[order], t[order]
    labels = (ratings >= 4.0).astype(np.float32)
    dense_cols, dense_names = [], []
    cat_cols, cat_names = [users, items], ["user", "item"]
    if genre_of is not None:
        g, yr = genre_of(items), year_of(items)
        cat_cols.append(g)
        cat_names.append("genres")
        dense_cols.append(np.where(np.isnan(yr), 0.0, (yr - 1990.0) / 20.0).astype(np.float32))
        dense_names.append("release_year")
        dense_cols.append(np.array([0.0 if s in ("", "(no genres listed)") else (s.count("|") + 1) / 5.0
                                    for s in g], dtype=np.float32))
        dense_names.append("n_genres")
    for dname, vals in extra_dense:
        dense_cols.append(np.asarray(vals)[order].astype(np.float32))
        dense_names.append(dname)
    for cname, vals in extra_cat:
        cat_cols.append(np.asarray(vals)[order])
        cat_names.append(cname)
    return _finish(name, fmt, path, t, dense_cols, dense_names, cat_cols, cat_names, labels, bad,
                   open_flags=[False] * len(cat_cols), hash_rows=None, was_sorted=was_sorted,
                   causal_counts=[("user", users), ("item", items)])


def _genre_lookup(movie_ids, genres, years):
    table = dict(zip(movie_ids.tolist(), range(len(movie_ids))))

    def genre_of(items):
        # per distinct item, then broadcast back: cheap for long logs.
        uniq, inv = np.unique(items, return_inverse=True)
        idx = np.array([table.get(int(i), -1) for i in uniq])
        g = np.array([genres[j] if j >= 0 else "" for j in idx], dtype=object)
        return g[inv.reshape(-1)].astype(str)

    def year_of(items):
        uniq, inv = np.unique(items, return_inverse=True)
        idx = np.array([table.get(int(i), -1) for i in uniq])
        y = np.where(idx >= 0, years[np.maximum(idx, 0)], np.nan)
        return y[inv.reshape(-1)]

    return genre_of, year_of


def read_movielens(path, *, movies="auto", skip_bad=False, max_rows=None):
    """Read a MovieLens ``ratings.csv`` (ml-latest, ml-latest-small, ml-20m/25m/32m).

    Label: ``rating >= 4``. Tables: user, item and, when ``movies.csv`` is found, the
    movie's genre set; dense: release year and genre count (with movies), plus causal
    log-counts of the user's and the item's earlier ratings. Sorted by ``timestamp``.

    Parameters
    ----------
    path : str or path-like
        ``ratings.csv`` or ``ratings.csv.gz``; ``PREFIX_ratings.csv[.gz]`` also works.
    movies : "auto", path or None
        ``"auto"`` looks beside ``path`` for ``movies.csv[.gz]`` (or ``PREFIX_movies.csv[.gz]``).
    skip_bad : bool
        Skip malformed lines and count them (``Stream.n_skipped``) instead of raising.
    max_rows : int, optional
        Read only the first rows of the file (before sorting).

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "ratings.csv")
    >>> _ = open(p, "w").write("userId,movieId,rating,timestamp\\n1,10,4.5,20\\n2,10,2.0,10\\n")
    >>> s = read_movielens(p)
    >>> s.t.tolist(), s.labels.tolist(), s.cat_names
    ([10.0, 20.0], [0.0, 1.0], ['user', 'item'])
    """
    bad = _Bad(path, skip_bad)
    arr = _load_ratings_fast(path, max_rows)
    if arr is not None:
        users, items, ratings, t = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2], arr[:, 3]
        out_of_range = (ratings < 0) | (ratings > 5)
        if out_of_range.any():
            arr = None  # let the slow path name the line
    if arr is None:
        def header(row):
            if _is_number(row[0]):
                return False
            names = [c.strip().lower() for c in row]
            if len(names) != 4 or names[:3] != ["userid", "movieid", "rating"]:
                raise StreamFormatError(path, f"header {','.join(row)!r} is not a MovieLens ratings header "
                                              "'userId,movieId,rating,timestamp'. Is this the right --format?", 1)
            return True

        users, items, ratings, t, bad = _read_ratings(path, ",", header, skip_bad, max_rows, "MovieLens ratings.csv",
                                                      ("userId", "movieId"))
    genre_of = year_of = None
    mpath = _sibling(path, "ratings", "movies") if movies == "auto" else movies
    if mpath:
        genre_of, year_of = _genre_lookup(*_read_movies_csv(mpath))
    return _movielens_common(_stem(path), "movielens", path, users, items, ratings, t, bad,
                             genre_of=genre_of, year_of=year_of)


def _read_ratings(path, delimiter, header, skip_bad, max_rows, fmt, id_names):
    """(users, items, ratings, timestamps, bad-line log) of a user,item,rating,timestamp file;
    ratings outside [0, 5] are bad lines."""
    cols, lines, _, bad = _read_rows(path, delimiter=delimiter, n_fields=4, header=header, skip_bad=skip_bad,
                                     max_rows=max_rows, fmt=fmt)
    if not lines.size:
        raise _no_rows(path, bad)
    u, mu = _floats(cols[0], lines, bad, id_names[0])
    it, mi = _floats(cols[1], lines, bad, id_names[1])
    r, mr = _floats(cols[2], lines, bad, "rating")
    t, mt = _floats(cols[3], lines, bad, "timestamp (Unix seconds)")
    out_of_range = (r < 0) | (r > 5)
    if out_of_range.any():
        rows = np.flatnonzero(out_of_range)
        bad.add_rows(rows, lines, [f"rating {r[i]:g} is outside [0, 5]." for i in rows])
    bad.finish_check()
    keep = _keep(_or(mu, mi, mr, mt, out_of_range), len(lines))
    if not keep.any():
        raise _no_rows(path, bad)
    return u[keep].astype(np.int64), it[keep].astype(np.int64), r[keep], t[keep], bad


def _read_ml100k_items(path):
    """u.item (pipe-separated, latin-1): id | title | release date | video date | url | 19 genre flags."""
    cols, lines, _, bad = _read_rows(path, delimiter="|", n_fields=24, header=False, skip_bad=False,
                                     max_rows=None, fmt="ml-100k u.item", encoding="latin-1")
    ids, _ = _floats(cols[0], lines, bad, "movie id")
    bad.finish_check()
    flags = np.array([[c[i] == "1" for c in cols[5:24]] for i in range(len(lines))], dtype=bool)
    genres = np.array(["|".join(str(g) for g in np.flatnonzero(row)) for row in flags], dtype=object)
    years = np.full(len(ids), np.nan)
    for i, d in enumerate(cols[2]):
        if len(d) >= 4 and d[-4:].isdigit():
            years[i] = float(d[-4:])
    return ids.astype(np.int64), genres, years


def _read_ml100k_users(path):
    """u.user (pipe-separated): user id | age | gender | occupation | zip code."""
    cols, lines, _, bad = _read_rows(path, delimiter="|", n_fields=5, header=False, skip_bad=False,
                                     max_rows=None, fmt="ml-100k u.user", encoding="latin-1")
    ids, _ = _floats(cols[0], lines, bad, "user id")
    age, _ = _floats(cols[1], lines, bad, "age")
    bad.finish_check()
    return ids.astype(np.int64), age, np.array(cols[2]), np.array(cols[3])


def read_ml100k(path, *, items="auto", users="auto", skip_bad=False, max_rows=None):
    """Read MovieLens 100k ``u.data`` (tab-separated user, item, rating, timestamp; no header).

    Label ``rating >= 4``; tables user, item, and genre set (from ``u.item`` beside it),
    gender and occupation (from ``u.user``); dense: release year, genre count, age/50 and
    causal log-counts. Sorted by timestamp.

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "u.data")
    >>> _ = open(p, "w").write("1\\t5\\t4\\t30\\n2\\t5\\t1\\t10\\n")
    >>> read_ml100k(p).labels.tolist()
    [0.0, 1.0]
    """
    uu, ii, r, t, bad = _read_ratings(path, "\t", False, skip_bad, max_rows, "ml-100k u.data", ("user id", "item id"))
    genre_of = year_of = None
    ipath = _sibling(path, "u.data", "u.item") if items == "auto" else items
    if ipath:
        genre_of, year_of = _genre_lookup(*_read_ml100k_items(ipath))
    extra_dense, extra_cat = [], []
    upath = _sibling(path, "u.data", "u.user") if users == "auto" else users
    if upath:
        uid, age, gender, occ = _read_ml100k_users(upath)
        pos = dict(zip(uid.tolist(), range(len(uid))))
        j = np.array([pos.get(int(x), -1) for x in uu])
        extra_dense.append(("age", np.where(j >= 0, age[np.maximum(j, 0)] / 50.0, 0.0)))
        extra_cat.append(("gender", np.where(j >= 0, gender[np.maximum(j, 0)], "?")))
        extra_cat.append(("occupation", np.where(j >= 0, occ[np.maximum(j, 0)], "?")))
    return _movielens_common(_stem(path), "ml-100k", path, uu, ii, r, t, bad,
                             genre_of=genre_of, year_of=year_of, extra_dense=extra_dense, extra_cat=extra_cat)


# --------------------------------------------------------------------------- TalkingData

_TD_COLS = ["ip", "app", "device", "os", "channel", "click_time", "attributed_time", "is_attributed"]


def _parse_times(col, lines, bad, what, example):
    """'YYYY-MM-DD HH:MM:SS' strings -> float seconds (UTC)."""
    try:
        return np.array(col, dtype="datetime64[s]").astype(np.int64).astype(np.float64), None
    except ValueError:
        pass
    out = np.zeros(len(col))
    mask = np.zeros(len(col), dtype=bool)
    rows, msgs = [], []
    for i, v in enumerate(col):
        try:
            if v.strip() in ("", "NaT", "nat"):
                raise ValueError
            out[i] = float(np.datetime64(v, "s").astype(np.int64))
        except ValueError:
            mask[i] = True
            rows.append(i)
            msgs.append(f"{what} {v!r} is not a time like {example!r}.")
    bad.add_rows(rows, lines, msgs)
    return out, mask


def read_talkingdata(path, *, skip_bad=False, max_rows=None, hash_rows=None):
    """Read a TalkingData AdTracking CSV (``train.csv`` or ``train_sample.csv``).

    Label ``is_attributed``; tables ip (open vocabulary, hashed into ``hash_rows`` rows;
    auto: next power of two >= 2x distinct ips), app, device, os, channel; dense: hour of
    day (sin, cos) and causal log-counts of the ip's and the app's earlier clicks.
    ``click_time`` is parsed to Unix seconds; ``attributed_time`` is not used (it leaks
    the label). The header cell ``..ip`` of a known copy is accepted as ``ip``.

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "train_sample.csv")
    >>> rows = ["1,3,1,13,497,2017-11-07 09:30:38,,0", "2,3,1,13,497,2017-11-06 16:00:00,,1"]
    >>> _ = open(p, "w").write("..ip,app,device,os,channel,click_time,attributed_time,is_attributed\\n" + "\\n".join(rows))
    >>> s = read_talkingdata(p)
    >>> s.labels.tolist(), s.was_sorted
    ([1.0, 0.0], False)
    """
    def header(row):
        names = [c.strip().lower() for c in row]
        if names and names[0].lstrip(".") == "ip":
            names[0] = "ip"  # the shared sample's first header cell reads "..ip"
        if names != _TD_COLS:
            raise StreamFormatError(path, f"header {','.join(row)!r} is not the TalkingData header "
                                          f"{','.join(_TD_COLS)!r}. Is this the right --format?", 1)
        return True

    cols, lines, head, bad = _read_rows(path, delimiter=",", n_fields=8, header=header, skip_bad=skip_bad,
                                        max_rows=max_rows, fmt="TalkingData")
    if head is None and lines.size:
        raise StreamFormatError(path, "has no header row; a TalkingData CSV starts with "
                                      f"{','.join(_TD_COLS)!r}.", 1)
    if not lines.size:
        raise _no_rows(path, bad)
    ids, masks = [], []
    for c, name in enumerate(_TD_COLS[:5]):
        v, m = _floats(cols[c], lines, bad, name)
        ids.append(v.astype(np.int64))
        masks.append(m)
    t, mt = _parse_times(cols[5], lines, bad, "click_time", "2017-11-07 09:30:38")
    y, my = _floats(cols[7], lines, bad, "is_attributed")
    wrong = _labels01(y, lines, bad, "is_attributed")
    bad.finish_check()
    keep = _keep(_or(*masks, mt, my, wrong), len(lines))
    if not keep.any():
        raise _no_rows(path, bad)
    t, y = t[keep], y[keep]
    ids = [v[keep] for v in ids]
    order, was_sorted = _time_sort(path, t)
    t, y = t[order], y[order]
    ids = [v[order] for v in ids]
    s, c = _hour_features(t)
    return _finish(_stem(path), "talkingdata", path, t, [s, c], ["hour_sin", "hour_cos"], ids, _TD_COLS[:5],
                   y, bad, open_flags=[True, False, False, False, False], hash_rows=hash_rows,
                   was_sorted=was_sorted, causal_counts=[("ip", ids[0]), ("app", ids[1])])


# --------------------------------------------------------------------------- Criteo


def read_criteo(path, *, skip_bad=False, max_rows=None, hash_rows=None):
    """Read a Criteo display-advertising ("dac") TSV: no header, 40 tab-separated fields,
    ``label, I1..I13`` (integers, empty = missing) and ``C1..C26`` (8-hex-digit hashes).

    No clock: row order is time and ``t`` is the row number. Dense: ``sign(x) log1p(|x|)``
    of I1..I13 (missing = 0); tables C1..C26, open vocabularies hashed into ``hash_rows``
    rows each (auto-sized per column when None).

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "day_0.tsv")
    >>> _ = open(p, "w").write("1\\t" + "3\\t" * 13 + "\\t".join(["8cf07265"] * 26) + "\\n")
    >>> s = read_criteo(p)
    >>> s.cat.shape, s.dense.shape, s.labels.tolist()
    ((1, 26), (1, 13), [1.0])
    """
    cols, lines, _, bad = _read_rows(path, delimiter="\t", n_fields=40, header=False, skip_bad=skip_bad,
                                     max_rows=max_rows, fmt="Criteo (label, I1..I13, C1..C26)")
    if not lines.size:
        raise _no_rows(path, bad)
    y, my = _floats(cols[0], lines, bad, "label")
    wrong = _labels01(y, lines, bad, "(column 1)")
    dense, masks = [], []
    for k in range(13):
        v, m = _floats(cols[1 + k], lines, bad, f"I{k + 1}", empty="0")
        dense.append(v)
        masks.append(m)
    bad.finish_check()
    keep = _keep(_or(my, wrong, *masks), len(lines))
    if not keep.any():
        raise _no_rows(path, bad)
    t = np.arange(len(lines), dtype=np.float64)[keep]
    dense = [(np.sign(v) * np.log1p(np.abs(v)))[keep].astype(np.float32) for v in dense]
    cats = [np.asarray(cols[14 + k])[keep] for k in range(26)]
    return _finish(_stem(path), "criteo", path, t, dense, [f"I{k + 1}" for k in range(13)], cats,
                   [f"C{k + 1}" for k in range(26)], y[keep], bad, open_flags=[True] * 26,
                   hash_rows=hash_rows, was_sorted=True)


# --------------------------------------------------------------------------- Avazu

_AVAZU_COLS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
               "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
               "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]


def _parse_yymmddhh(col, lines, bad):
    uniq, inv = np.unique(np.asarray(col), return_inverse=True)
    secs = np.zeros(len(uniq))
    ubad = np.zeros(len(uniq), dtype=bool)
    for j, v in enumerate(uniq):
        v = str(v).strip()
        try:
            if len(v) != 8 or not v.isdigit():
                raise ValueError
            secs[j] = float(np.datetime64(f"20{v[:2]}-{v[2:4]}-{v[4:6]}T{v[6:8]}", "s").astype(np.int64))
        except ValueError:
            ubad[j] = True
    mask = ubad[inv.reshape(-1)]
    if mask.any():
        rows = np.flatnonzero(mask)
        bad.add_rows(rows, lines, [f"hour {col[r]!r} is not a YYMMDDHH time like '14102100'." for r in rows])
    return secs[inv.reshape(-1)], (mask if mask.any() else None)


def read_avazu(path, *, skip_bad=False, max_rows=None, hash_rows=None):
    """Read an Avazu CTR CSV (24 columns ``id,click,hour,C1,...,C21``; the train file has a
    header, dev/test splits may not).

    Label ``click``; ``hour`` (YYMMDDHH) is parsed to Unix seconds and rows are sorted by
    it (stable: file order within an hour). Tables: the 21 columns after ``hour``, open
    vocabularies hashed into ``hash_rows`` rows each (auto-sized when None); dense: hour
    of day (sin, cos) and the causal log-count of the device_ip's earlier clicks.

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "avazu.csv")
    >>> _ = open(p, "w").write("7,1,14102100," + ",".join(["a"] * 21) + "\\n")
    >>> read_avazu(p).cat.shape
    (1, 21)
    """
    def header(row):
        if row[0].strip().lower() != "id":
            return False
        if [c.strip() for c in row] != _AVAZU_COLS:
            raise StreamFormatError(path, f"header {','.join(row)[:80]!r}... is not the Avazu header "
                                          f"{','.join(_AVAZU_COLS[:5])},...", 1)
        return True

    cols, lines, _, bad = _read_rows(path, delimiter=",", n_fields=24, header=header, skip_bad=skip_bad,
                                     max_rows=max_rows, fmt="Avazu")
    if not lines.size:
        raise _no_rows(path, bad)
    y, my = _floats(cols[1], lines, bad, "click")
    wrong = _labels01(y, lines, bad, "click")
    t, mt = _parse_yymmddhh(cols[2], lines, bad)
    bad.finish_check()
    keep = _keep(_or(my, wrong, mt), len(lines))
    if not keep.any():
        raise _no_rows(path, bad)
    t, y = t[keep], y[keep]
    cats = [np.asarray(cols[k])[keep] for k in range(3, 24)]
    order, was_sorted = _time_sort(path, t)
    t, y = t[order], y[order]
    cats = [c[order] for c in cats]
    s, c = _hour_features(t)
    return _finish(_stem(path), "avazu", path, t, [s, c], ["hour_sin", "hour_cos"], cats, _AVAZU_COLS[3:], y,
                   bad, open_flags=[True] * 21, hash_rows=hash_rows, was_sorted=was_sorted,
                   causal_counts=[("device_ip", cats[9])])


# --------------------------------------------------------------------------- dispatch

_READERS = {
    "movielens": read_movielens,
    "ml-100k": read_ml100k,
    "talkingdata": read_talkingdata,
    "criteo": read_criteo,
    "avazu": read_avazu,
}


def _first_line(path) -> str:
    try:
        with _open_text(path) as f:
            return f.readline()
    except (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError):
        return ""


def infer_format(path) -> str:
    """Guess a log's format from its file name, then from its first line.

    Examples
    --------
    >>> infer_format("data/ml-latest-small_ratings.csv.gz")
    'movielens'
    >>> infer_format("ml-100k/u.data")
    'ml-100k'
    """
    path = _resolve_folder(os.fspath(path))
    stem = _stem(path).lower()
    if stem == "u.data" or stem.startswith("u.data") or "ml-100k" in stem:
        return "ml-100k"
    if "ratings" in stem:
        return "movielens"
    if "talkingdata" in stem or "adtracking" in stem:
        return "talkingdata"
    if "criteo" in stem or "dac" in stem.split("_") or stem.startswith("day_"):
        return "criteo"
    if "avazu" in stem:
        return "avazu"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file. Check --data.")
    first = _first_line(path).rstrip("\r\n")
    if not first and os.path.getsize(path) == 0:
        raise StreamFormatError(path, "is empty (0 bytes): no log to read. Check --data.")
    low = first.lower()
    if low.replace(" ", "").startswith("userid,movieid,rating"):
        return "movielens"
    if "click_time" in low and "is_attributed" in low:
        return "talkingdata"
    if low.startswith("id,click,hour"):
        return "avazu"
    tabs, commas = first.split("\t"), first.split(",")
    if len(tabs) == 40:
        return "criteo"
    if len(tabs) == 4 and all(_is_number(x) for x in tabs):
        return "ml-100k"
    if len(commas) == 24 and len(commas[2]) == 8 and commas[2].isdigit():
        return "avazu"
    if len(commas) == 4 and all(_is_number(x) for x in commas):
        return "movielens"
    raise StreamFormatError(path, f"cannot tell the format from the name or the first line {first[:80]!r}; "
                                  f"pass --format (one of {', '.join(FORMATS)}).")


_FOLDER_NAMES = ("ratings.csv", "u.data", "train_sample.csv", "train.csv", "train.txt")


def _resolve_folder(path: str) -> str:
    """A folder given as data: pick its one log file (e.g. ``ml-latest-small/ratings.csv``)."""
    if not os.path.isdir(path):
        return path
    names = sorted(os.listdir(path))
    hits = [n for n in names if any(_stem(n) == k or _stem(n).endswith("_" + k) for k in _FOLDER_NAMES)]
    if len(hits) == 1:
        return os.path.join(path, hits[0])
    found = ", ".join(hits) if hits else "none of " + ", ".join(_FOLDER_NAMES)
    raise StreamFormatError(path, f"is a folder; found {found}. Pass the log file itself.")


def read_stream(path, format=None, **kwargs) -> Stream:
    """Read any supported log into a time-ordered :class:`Stream`.

    Parameters
    ----------
    path : str or path-like
        The log file, or a folder holding exactly one known log (``ratings.csv``,
        ``u.data``, ``train_sample.csv``, ... plain or .gz).
    format : {"movielens", "ml-100k", "talkingdata", "criteo", "avazu"}, optional
        Inferred with :func:`infer_format` when None.
    **kwargs
        Passed to the reader (``skip_bad``, ``max_rows``, ``hash_rows`` where it applies).

    Examples
    --------
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "ratings.csv")
    >>> _ = open(p, "w").write("userId,movieId,rating,timestamp\\n1,10,4.5,20\\n")
    >>> read_stream(p).format
    'movielens'
    """
    path = _resolve_folder(os.fspath(path))
    fmt = infer_format(path) if format is None else format
    if fmt not in _READERS:
        raise ValueError(f"`format` must be one of {', '.join(FORMATS)}; got {format!r}.")
    try:
        return _READERS[fmt](path, **kwargs)
    except StreamFormatError as e:
        if format is None:
            raise
        # a format given by hand that the file does not have: say which one it looks like
        try:
            guess = infer_format(path)
        except (StreamFormatError, OSError):
            raise e from None
        if guess == fmt:
            raise
        raise StreamFormatError(e.path, f"does not read as {fmt} data and looks like {guess} data: pass "
                                        f"format={guess!r} (--format {guess}), or leave it out to detect it. "
                                        f"The {fmt} reader said: {e.message}", e.line) from None
