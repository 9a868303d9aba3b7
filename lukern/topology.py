"""The host as the tuner and the scheduler see it: NUMA nodes, caches, CPU model, numba.

Everything is read from sysfs (``/sys/devices/system/node`` and
``/sys/devices/system/cpu``); ``sysfs_root`` points the reader at a fake tree instead,
which is how the tests cover two- and four-node hosts on a one-node machine.

Sources and why:

- NUMA nodes: ``nodeN/cpulist`` (lists like ``0-3,8-11``; empty for memory-only nodes),
  ``nodeN/meminfo`` (``MemTotal``) and ``nodeN/distance`` (one row of the SLIT table;
  some kernels and hypervisors do not provide it, then the kernel's defaults of 10 for
  local and 20 for remote are assumed). CPUs listed by a node but not in
  ``cpu/online`` are reported as offline and never counted.
- Caches: ``cpuN/cache/indexK`` of every online CPU, deduplicated by the CPUs that
  share them. py-cpuinfo's cache sizes are unreliable (it reports the first level it
  finds, per core or per package depending on the source), so it is not used for them.
- CPU model: py-cpuinfo's brand and flags only. It takes about a second (it runs CPUID
  in a child process), so its answer is cached in memory and on disk, keyed by the
  cheap identifying lines of ``/proc/cpuinfo``.
- numba's version and threading layer: the layer numba *will* pick is predicted without
  starting its thread pool, so a process that has not run a parallel kernel yet gets
  the same fingerprint as the tuner that has.

Examples
--------
>>> from lukern.topology import read_topology
>>> topo = read_topology()
>>> topo.n_cpus >= 1 and topo.node_of_cpu(topo.online_cpus[0]) is not None
True
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numba

from ._threading import threading_layer as _active_threading_layer

__all__ = ["Cache", "CpuModel", "Node", "Topology", "cpu_model", "parse_cpulist", "read_topology"]

#: distances the kernel assumes when firmware gives no SLIT (include/linux/topology.h)
LOCAL_DISTANCE = 10
REMOTE_DISTANCE = 20

_NODE_DIR = re.compile(r"node(\d+)$")
_CPU_DIR = re.compile(r"cpu(\d+)$")
_INDEX_DIR = re.compile(r"index(\d+)$")


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a kernel CPU list such as ``"0-3,8-11"`` or ``"0,2,4-5"`` (empty: no CPUs).

    Also accepts the stride form ``"0-15:2"`` (``0,2,...,14``) that newer kernels print.

    Examples
    --------
    >>> parse_cpulist("0-3,8-11")
    (0, 1, 2, 3, 8, 9, 10, 11)
    >>> parse_cpulist("\\n")
    ()
    """
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        stride = 1
        if ":" in part:
            part, _, s = part.partition(":")
            stride = int(s.split("/")[0])
        if "-" in part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi) + 1, max(stride, 1)))
        else:
            cpus.add(int(part))
    return tuple(sorted(cpus))


def format_cpulist(cpus) -> str:
    """The inverse of :func:`parse_cpulist`: ``(0, 1, 2, 3, 8)`` -> ``"0-3,8"``."""
    cpus = sorted(set(int(c) for c in cpus))
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def _parse_size(text: str) -> int:
    """Cache sizes as sysfs prints them: ``48K``, ``1024K``, ``32M``."""
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    if text and text[-1] in mult:
        return int(text[:-1]) * mult[text[-1]]
    return int(text) if text else 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class Node:
    """One NUMA node.

    ``cpus`` are the node's online CPUs (empty for a memory-only node, e.g. CXL memory);
    ``distances`` is the node's row of the distance table, aligned with
    :attr:`Topology.node_ids`, or ``()`` when the kernel did not provide it.
    """

    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int
    distances: tuple[int, ...] = ()
    offline_cpus: tuple[int, ...] = ()

    @property
    def memory_only(self) -> bool:
        return not self.cpus


@dataclass(frozen=True)
class Cache:
    """One cache instance: ``level``, ``type`` (Data, Instruction, Unified), size, line
    size and the CPUs that share it."""

    level: int
    type: str
    size_bytes: int
    line_bytes: int
    shared_cpus: tuple[int, ...]

    @property
    def name(self) -> str:
        suffix = {"Data": "d", "Instruction": "i"}.get(self.type, "")
        return f"L{self.level}{suffix}"


@dataclass(frozen=True)
class CpuModel:
    """CPU brand string, feature flags (sorted) and machine architecture."""

    brand: str
    flags: tuple[str, ...]
    arch: str
    source: str = "py-cpuinfo"


@dataclass(frozen=True)
class Topology:
    """What :func:`read_topology` found. See the module docstring for the sources."""

    nodes: tuple[Node, ...]
    caches: tuple[Cache, ...]
    online_cpus: tuple[int, ...]
    offline_cpus: tuple[int, ...]
    cpu: CpuModel
    numba_version: str
    threading_layer: str
    source: str = "sysfs"
    _index: dict = field(default=None, repr=False, compare=False, hash=False)

    def __post_init__(self):
        index = {"node": {n.id: n for n in self.nodes},
                 "cpu": {c: n.id for n in self.nodes for c in n.cpus},
                 "pos": {n.id: i for i, n in enumerate(self.nodes)}}
        object.__setattr__(self, "_index", index)

    # -- queries ---------------------------------------------------------------------
    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes)

    @property
    def n_cpus(self) -> int:
        """Online CPUs on the host (not the process affinity)."""
        return len(self.online_cpus)

    @property
    def cpu_nodes(self) -> tuple[Node, ...]:
        """Nodes that have online CPUs, in id order."""
        return tuple(n for n in self.nodes if n.cpus)

    def node(self, node_id: int) -> Node:
        try:
            return self._index["node"][node_id]
        except KeyError:
            raise ValueError(f"`node_id` must be one of {list(self.node_ids)}; got {node_id}.") from None

    def cpus_of(self, node_id: int) -> tuple[int, ...]:
        """Online CPUs of node ``node_id`` (empty for a memory-only node)."""
        return self.node(node_id).cpus

    def node_of_cpu(self, cpu: int) -> int | None:
        """The node holding online CPU ``cpu``, or None (offline or unknown CPU)."""
        return self._index["cpu"].get(int(cpu))

    def distance(self, a: int, b: int) -> int:
        """NUMA distance from node ``a`` to node ``b`` (10 = local). Without a distance
        table the kernel's defaults apply: 10 to itself, 20 to any other node."""
        na, nb = self.node(a), self.node(b)
        pa, pb = self._index["pos"][a], self._index["pos"][b]
        if len(na.distances) > pb:
            return na.distances[pb]
        if len(nb.distances) > pa:  # the table is symmetric on every known platform
            return nb.distances[pa]
        return LOCAL_DISTANCE if a == b else REMOTE_DISTANCE

    def cache_bytes(self, level: int) -> int:
        """Size of one data/unified cache instance at ``level`` (0 if unknown)."""
        sizes = [c.size_bytes for c in self.caches if c.level == level and c.type != "Instruction"]
        return max(sizes) if sizes else 0

    def cache_summary(self) -> list[dict]:
        """Caches grouped by kind: name, size of one instance, count, CPUs per instance."""
        groups: dict[tuple, list[Cache]] = {}
        for c in self.caches:
            groups.setdefault((c.level, c.type, c.size_bytes), []).append(c)
        out = []
        for (level, ctype, size), cs in sorted(groups.items()):
            out.append({"name": cs[0].name, "level": level, "type": ctype, "size_bytes": size,
                        "count": len(cs), "cpus_per_instance": max(len(c.shared_cpus) for c in cs)})
        return out

    # -- identity --------------------------------------------------------------------
    def fingerprint_inputs(self) -> dict:
        """What the fingerprint hashes: everything that changes which plan is fastest.

        Node memory sizes are left out: they do not change which plan is fastest, and
        on VMs with hot-plugged memory (virtio-mem, balloons; this reference machine's
        node 0 moved from 5.1 to 7.2 GiB within an hour) they change while the host does
        not. Whether a node has CPUs is kept. The process's CPU affinity is not a host
        property either and is left out (plans are clamped to it at call time).
        """
        return {
            "arch": self.cpu.arch,
            "cpu_brand": self.cpu.brand,
            "cpu_flags": list(self.cpu.flags),
            "numa": [[n.id, format_cpulist(n.cpus), list(n.distances)] for n in self.nodes],
            "caches": [[c["name"], c["size_bytes"], c["count"], c["cpus_per_instance"]] for c in self.cache_summary()],
            "numba": self.numba_version,
            "threading_layer": self.threading_layer,
        }

    def fingerprint(self) -> str:
        """Stable 16-hex-digit host fingerprint (sha256 of :meth:`fingerprint_inputs`)."""
        blob = json.dumps(self.fingerprint_inputs(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """JSON-ready description (``lukern-tune --info``)."""
        return {
            "fingerprint": self.fingerprint(),
            "source": self.source,
            "cpu": {"brand": self.cpu.brand, "arch": self.cpu.arch, "n_flags": len(self.cpu.flags),
                    "source": self.cpu.source},
            "online_cpus": format_cpulist(self.online_cpus),
            "offline_cpus": format_cpulist(self.offline_cpus),
            "nodes": [{"id": n.id, "cpus": format_cpulist(n.cpus), "mem_total_bytes": n.mem_total_bytes,
                       "distances": list(n.distances), "memory_only": n.memory_only} for n in self.nodes],
            "caches": self.cache_summary(),
            "numba": self.numba_version,
            "threading_layer": self.threading_layer,
        }

    def describe(self) -> str:
        """A few human lines (what ``lukern-tune`` prints first)."""
        lines = [f"CPU      {self.cpu.brand} ({self.cpu.arch}, {len(self.cpu.flags)} flags), "
                 f"{self.n_cpus} online CPUs" + (f", offline {format_cpulist(self.offline_cpus)}" if self.offline_cpus else "")]
        for n in self.nodes:
            cpus = format_cpulist(n.cpus) if n.cpus else "none (memory only)"
            dist = " ".join(str(self.distance(n.id, m)) for m in self.node_ids)
            missing = "" if n.distances else " (no distance file)"
            lines.append(f"node {n.id:<3} cpus {cpus:<18} mem {n.mem_total_bytes / 2 ** 30:7.1f} GiB  "
                         f"distances [{dist}]{missing}")
        caches = ", ".join(f"{c['name']} {_fmt_bytes(c['size_bytes'])} x{c['count']}" for c in self.cache_summary())
        lines.append(f"caches   {caches or 'unknown'}")
        lines.append(f"numba    {self.numba_version}, threading layer {self.threading_layer}")
        lines.append(f"host fingerprint {self.fingerprint()}")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


# -- numba threading layer --------------------------------------------------------------

def _layer_loads(name: str) -> bool:
    """Can numba load this threading layer? Imports the backend module only: numba's
    thread pool is not started."""
    try:
        if name == "tbb":
            from numba.np.ufunc.parallel import _check_tbb_version_compatible

            _check_tbb_version_compatible()
            from numba.np.ufunc import tbbpool  # noqa: F401
        elif name == "omp":
            from numba.np.ufunc import omppool  # noqa: F401
        elif name == "workqueue":
            from numba.np.ufunc import workqueue  # noqa: F401
        else:
            return False
    except Exception:  # ImportError, or numba's ValueError for an incompatible TBB
        return False
    return True


def predicted_threading_layer() -> str:
    """The layer numba uses (or will use at its first parallel launch), following
    numba's own selection rules for ``NUMBA_THREADING_LAYER`` and its priority list."""
    active = _active_threading_layer()
    known = ("tbb", "omp", "workqueue")
    if active in known:
        return active
    requested = str(numba.config.THREADING_LAYER).lower()
    if requested in known:
        return requested
    priority = [str(x) for x in numba.config.THREADING_LAYER_PRIORITY]
    linux = platform.system() == "Linux"
    if requested == "safe":
        candidates = ["tbb"]
    elif requested == "threadsafe":
        candidates = [x for x in priority if x in ("tbb", "omp")]
    elif requested == "forksafe":
        candidates = [x for x in priority if x == "tbb" or x == "workqueue" or (x == "omp" and not linux)]
    else:
        candidates = priority
    for name in candidates:
        if _layer_loads(name):
            return name
    return "none"


# -- CPU model (py-cpuinfo, cached) ---------------------------------------------------------

#: on-disk cache of py-cpuinfo's answer; None disables it (tests point it at tmp_path)
CPUINFO_CACHE: Path | None = None
_cpu_lock = threading.Lock()
_cpu_memo: dict[str, CpuModel] = {}


def _cpuinfo_cache_path() -> Path | None:
    if CPUINFO_CACHE is not None:
        return CPUINFO_CACHE
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("lukern")) / "cpuinfo.json"
    except Exception:
        return None


def _cpu_key() -> str:
    """Cheap identity of the CPU: the model and flag lines of /proc/cpuinfo (first
    processor) plus the architecture. Changes when the CPU or its exposed flags do."""
    keep = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "Features",
            "CPU implementer", "CPU part", "cpu", "isa")
    lines = []
    text = _read(Path("/proc/cpuinfo")) or ""
    for line in text.splitlines():
        if not line.strip():
            if lines:
                break
            continue
        name = line.split(":", 1)[0].strip()
        if name in keep:
            lines.append(line.strip())
    lines.append(platform.machine())
    lines.append(platform.processor())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _query_cpuinfo() -> CpuModel:
    arch = platform.machine()
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
        return CpuModel(str(info.get("brand_raw") or platform.processor() or "unknown"),
                        tuple(sorted(str(f) for f in info.get("flags", []))), arch, "py-cpuinfo")
    except Exception:  # py-cpuinfo missing or failing: /proc/cpuinfo is still a fair answer
        brand, flags = platform.processor() or "unknown", ()
        for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and brand in ("", "unknown", platform.processor()):
                brand = value.strip()
            elif name.strip() in ("flags", "Features") and not flags:
                flags = tuple(sorted(value.split()))
        return CpuModel(brand, flags, arch, "/proc/cpuinfo")


def cpu_model(refresh: bool = False) -> CpuModel:
    """Brand and flags from py-cpuinfo, cached in memory and in the user cache dir.

    The disk cache is keyed by :func:`_cpu_key`, so a different CPU (or a VM moved to
    a host exposing other flags) misses it and asks py-cpuinfo again.
    """
    key = _cpu_key()
    with _cpu_lock:
        if not refresh and key in _cpu_memo:
            return _cpu_memo[key]
        path = _cpuinfo_cache_path()
        model = None
        if path is not None and not refresh:
            try:
                entry = json.loads(path.read_text()).get(key)
                if entry:
                    model = CpuModel(entry["brand"], tuple(entry["flags"]), entry["arch"], entry.get("source", "py-cpuinfo"))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                model = None
        if model is None:
            model = _query_cpuinfo()
            if path is not None:
                _write_cpu_cache(path, key, model)
        _cpu_memo[key] = model
        return model


def _write_cpu_cache(path: Path, key: str, model: CpuModel) -> None:
    """Best effort, atomic (a cache is never required)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({key: asdict(model)}))
        os.replace(tmp, path)
    except OSError:
        pass


# -- sysfs ---------------------------------------------------------------------------

def _meminfo_total(text: str | None) -> int:
    if not text:
        return 0
    for line in text.splitlines():
        if "MemTotal:" in line:
            parts = line.split("MemTotal:", 1)[1].split()
            value = int(parts[0])
            unit = parts[1].lower() if len(parts) > 1 else "kb"
            return value * {"kb": 1024, "mb": 2 ** 20, "gb": 2 ** 30}.get(unit, 1)
    return 0


def _read_online_cpus(cpu_dir: Path) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    online_text = _read(cpu_dir / "online")
    online = parse_cpulist(online_text) if online_text is not None else None
    present_text = _read(cpu_dir / "present") or _read(cpu_dir / "possible")
    offline: tuple[int, ...] = ()
    offline_text = _read(cpu_dir / "offline")
    if offline_text is not None:
        offline = parse_cpulist(offline_text)
    elif online is not None and present_text is not None:
        offline = tuple(sorted(set(parse_cpulist(present_text)) - set(online)))
    return online, offline


def _read_caches(cpu_dir: Path, cpus: tuple[int, ...]) -> tuple[Cache, ...]:
    seen: dict[tuple, Cache] = {}
    for cpu in cpus:
        cache_dir = cpu_dir / f"cpu{cpu}" / "cache"
        try:
            entries = sorted(p for p in cache_dir.iterdir() if _INDEX_DIR.match(p.name))
        except OSError:
            continue
        for idx in entries:
            level, ctype, size = _read(idx / "level"), _read(idx / "type"), _read(idx / "size")
            if level is None or ctype is None or size is None:
                continue
            shared_text = _read(idx / "shared_cpu_list")
            shared = parse_cpulist(shared_text) if shared_text is not None else (cpu,)
            line = _read(idx / "coherency_line_size")
            c = Cache(int(level), ctype.strip(), _parse_size(size), int(line) if line and line.strip() else 0, shared)
            seen.setdefault((c.level, c.type, c.shared_cpus), c)
    return tuple(sorted(seen.values(), key=lambda c: (c.level, c.type, c.shared_cpus)))


def _read_sysfs(root: Path, cpu: CpuModel, layer: str) -> Topology:
    node_dir = root / "devices" / "system" / "node"
    cpu_dir = root / "devices" / "system" / "cpu"
    online, offline = _read_online_cpus(cpu_dir)
    try:
        node_ids = sorted(int(m.group(1)) for p in node_dir.iterdir() if (m := _NODE_DIR.match(p.name)) and p.is_dir())
    except OSError:
        node_ids = []
    if online is None:
        try:
            online = tuple(sorted(int(m.group(1)) for p in cpu_dir.iterdir() if (m := _CPU_DIR.match(p.name))))
        except OSError:
            online = ()
        if not online:
            online = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else tuple(range(os.cpu_count() or 1))
    online_set = set(online)
    nodes = []
    if node_ids:
        source = "sysfs"
        for nid in node_ids:
            d = node_dir / f"node{nid}"
            listed = parse_cpulist(_read(d / "cpulist") or "")
            dist_text = _read(d / "distance")
            distances = tuple(int(x) for x in dist_text.split()) if dist_text and dist_text.strip() else ()
            nodes.append(Node(nid, tuple(c for c in listed if c in online_set), _meminfo_total(_read(d / "meminfo")),
                              distances, tuple(c for c in listed if c not in online_set)))
        in_nodes = {c for n in nodes for c in n.cpus}
        stray = tuple(c for c in online if c not in in_nodes)
        if stray:  # a kernel with CPUs not attached to any node: give them to node 0's group
            first = nodes[0]
            nodes[0] = Node(first.id, tuple(sorted(first.cpus + stray)), first.mem_total_bytes, first.distances,
                            first.offline_cpus)
    else:
        # no NUMA support compiled in (or not Linux): one node with every online CPU
        source = "fallback: no devices/system/node"
        mem = 0
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
        nodes.append(Node(0, tuple(online), mem, (), ()))
    offline = tuple(sorted(set(offline) | {c for n in nodes for c in n.offline_cpus}))
    caches = _read_caches(cpu_dir, tuple(online))
    return Topology(tuple(nodes), caches, tuple(online), offline, cpu, numba.__version__, layer, source)


@functools.lru_cache(maxsize=1)
def _host_topology() -> Topology:
    return _read_sysfs(Path("/sys"), cpu_model(), predicted_threading_layer())


def read_topology(sysfs_root=None, *, cpu: CpuModel | None = None, threading_layer: str | None = None) -> Topology:
    """Read the host's topology (cached after the first call), or a fake sysfs tree.

    Parameters
    ----------
    sysfs_root : path, optional
        Directory standing for ``/sys`` (it holds ``devices/system/node`` and
        ``devices/system/cpu``). Default: the real ``/sys``, read once per process.
    cpu : CpuModel, optional
        Use this CPU model instead of asking py-cpuinfo (tests, other hosts' trees).
    threading_layer : str, optional
        Use this numba threading layer name instead of the predicted one.

    Returns
    -------
    Topology

    Examples
    --------
    >>> topo = read_topology()
    >>> len(topo.fingerprint())
    16
    """
    if sysfs_root is None and cpu is None and threading_layer is None:
        return _host_topology()
    root = Path("/sys") if sysfs_root is None else Path(sysfs_root)
    if sysfs_root is not None and not (root / "devices" / "system").is_dir():
        raise ValueError(f"`sysfs_root` must contain devices/system (a copy of /sys); got {str(root)!r}.")
    return _read_sysfs(root, cpu if cpu is not None else cpu_model(),
                       threading_layer if threading_layer is not None else predicted_threading_layer())
