"""The QoS ladder: what this host lets the trainer do to stay out of inference's way.

Probed strongest first; every level that cannot be used says why in one line:

1. ``resctrl``: a resctrl group for the trainer with an L3 cache-allocation mask (CAT)
   and a memory-bandwidth cap (MBA) in its ``schemata`` (same files on Intel RDT and AMD
   PQoS). It limits cache and memory interference, not CPU time, so it is applied *in
   addition* to one of the CPU levels below.
2. ``cgroup``: cgroup v2 ``cpu.idle`` (a whole group at idle priority) or ``cpu.max`` /
   cpuset; cgroup v1 ``cpu.shares``. Needs a writable hierarchy.
3. ``sched_idle``: per-thread ``SCHED_IDLE`` (the kernel runs the thread only when no
   normal thread wants the CPU, and a waking normal thread preempts it at once).
4. ``nice``: per-thread nice 19 when SCHED_IDLE is refused.
5. ``cooperative``: nothing from the kernel; the guard's pausing alone.

Affinity (pinning trainer threads to the CPUs of their NUMA node) is orthogonal and
done by :mod:`lukern.sched.placement`.

Examples
--------
>>> from lukern.sched.qos import probe_ladder
>>> ladder = probe_ladder(resctrl_root="/nonexistent", cgroup_root="/nonexistent")
>>> ladder.level("resctrl").usable, ladder.level("cooperative").usable
(False, True)
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Ladder", "Level", "apply", "cpu_level", "probe_ladder", "resctrl_schemata", "restore"]

LEVELS = ("resctrl", "cgroup", "sched_idle", "nice", "cooperative")
GROUP_NAME = "lukern-trainer"


@dataclass
class Level:
    """One rung: its name, whether it can be used here and why (one line)."""

    name: str
    usable: bool
    reason: str
    detail: dict = field(default_factory=dict)

    def __str__(self):
        return f"{self.name:<11} {'yes' if self.usable else 'no ':<3} {self.reason}"


@dataclass
class Ladder:
    """The probed levels, strongest first (see the module docstring)."""

    levels: list

    def level(self, name: str) -> Level:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise KeyError(f"no QoS level {name!r}; levels are {', '.join(LEVELS)}.")

    @property
    def best(self) -> str:
        """The strongest usable CPU level (resctrl is additive, so it is not counted)."""
        return cpu_level(self)

    def describe(self) -> str:
        return "\n".join(str(lv) for lv in self.levels)

    def to_dict(self) -> dict:
        return {"best": self.best, "levels": [asdict(lv) for lv in self.levels]}

    def __str__(self):
        return self.describe()


def cpu_level(ladder: Ladder) -> str:
    """The CPU level the trainer uses by default: per-thread SCHED_IDLE when allowed (as
    strong as cgroup v2 ``cpu.idle`` and it leaves no cgroup directories behind), then
    a cgroup, then nice 19, then cooperative pausing."""
    for name in ("sched_idle", "cgroup", "nice"):
        if ladder.level(name).usable:
            return name
    return "cooperative"


# --- resctrl -------------------------------------------------------------------------------

def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def resctrl_schemata(resctrl_root, *, l3_share: float = 0.25, mb_percent: int | None = None) -> list[str]:
    """The ``schemata`` lines for the trainer group: the low ``l3_share`` of the cache
    ways of every L3 domain (at least ``info/L3/min_cbm_bits`` ways) and the minimum
    memory bandwidth the hardware allows (``info/MB/min_bandwidth``, or ``mb_percent``).

    Domains are read from the root group's ``schemata`` (``L3:0=fff;1=fff``).
    """
    root = Path(resctrl_root)
    lines = []
    dom_lines = {}
    for line in (_read(root / "schemata") or "").splitlines():
        res, _, doms = line.strip().partition(":")
        dom_lines[res.strip()] = [d.split("=")[0].strip() for d in doms.split(";") if "=" in d]
    mask_txt = _read(root / "info" / "L3" / "cbm_mask")
    if mask_txt:
        full = int(mask_txt, 16)
        n_ways = bin(full).count("1")
        min_bits = int(_read(root / "info" / "L3" / "min_cbm_bits") or 1)
        ways = max(min_bits, int(n_ways * l3_share))
        mask = (1 << ways) - 1
        width = len(mask_txt)
        doms = dom_lines.get("L3") or ["0"]
        lines.append("L3:" + ";".join(f"{d}={mask:0{width}x}" for d in doms))
    mb_min = _read(root / "info" / "MB" / "min_bandwidth")
    if mb_min:
        gran = int(_read(root / "info" / "MB" / "bandwidth_gran") or 1)
        pct = max(int(mb_min), int(mb_percent) if mb_percent is not None else int(mb_min))
        pct = -(-pct // gran) * gran  # round up to the granularity the hardware accepts
        doms = dom_lines.get("MB") or ["0"]
        lines.append("MB:" + ";".join(f"{d}={pct}" for d in doms))
    return lines


def _probe_resctrl(root: Path) -> Level:
    if not (root / "info").is_dir() or not (root / "schemata").exists():
        if Path("/proc/cpuinfo").exists() and root == Path("/sys/fs/resctrl"):
            flags = _cpu_flags()
            if not ({"cat_l3", "rdt_a", "mba"} & flags):
                return Level("resctrl", False, "the CPU reports no RDT/PQoS allocation flags (cat_l3, rdt_a, mba)")
        return Level("resctrl", False, f"resctrl is not mounted at {root} (mount -t resctrl resctrl {root})")
    if not os.access(root, os.W_OK):
        return Level("resctrl", False, f"{root} is not writable by this process (needs root or a delegated group)")
    lines = resctrl_schemata(root)
    if not lines:
        return Level("resctrl", False, "resctrl is mounted but offers neither L3 CAT nor MBA")
    return Level("resctrl", True, "L3 CAT / MBA group for the trainer: " + " ".join(lines),
                 {"schemata": lines, "root": str(root)})


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def apply_resctrl(resctrl_root, tids, *, group: str = GROUP_NAME, schemata=None) -> Path:
    """Create (or reuse) the trainer group, write its schemata and move ``tids`` into it.
    Returns the group directory. Writing ``tasks`` takes one thread id per write."""
    root = Path(resctrl_root)
    gdir = root / group
    gdir.mkdir(exist_ok=True)
    lines = schemata if schemata is not None else resctrl_schemata(root)
    for line in lines:
        (gdir / "schemata").write_text(line + "\n")  # one resource per write, as the kernel parses it
    for tid in tids:
        with open(gdir / "tasks", "a") as f:
            f.write(f"{int(tid)}\n")
    return gdir


# --- cgroup --------------------------------------------------------------------------------

def _own_cgroup_v2(proc_root="/proc") -> str:
    try:
        for line in Path(proc_root, "self", "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].strip()
    except OSError:
        pass
    return "/"


def _own_cgroup_v1(controller: str, proc_root="/proc") -> str:
    try:
        for line in Path(proc_root, "self", "cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            if controller in ctrls.split(","):
                return path.strip()
    except (OSError, ValueError):
        pass
    return "/"


def _probe_cgroup(root: Path) -> Level:
    if (root / "cgroup.controllers").exists():  # unified (v2) hierarchy
        here = root / _own_cgroup_v2().lstrip("/")
        ctrls = (_read(root / "cgroup.controllers") or "").split()
        if "cpu" not in ctrls:
            return Level("cgroup", False, f"cgroup v2 at {root} has no cpu controller enabled")
        if not os.access(here, os.W_OK):
            return Level("cgroup", False, f"cgroup v2 group {here} is not writable (needs delegation or root)")
        return Level("cgroup", True, f"cgroup v2: a threaded child of {here} with cpu.idle=1",
                     {"version": 2, "parent": str(here)})
    cpu = root / "cpu"
    if (cpu / "cpu.shares").exists():
        own = cpu / _own_cgroup_v1("cpu").lstrip("/")
        cpu = own if (own / "cpu.shares").exists() else cpu
        if not os.access(cpu, os.W_OK):
            return Level("cgroup", False, f"cgroup v1 cpu controller at {cpu} is not writable (needs root)")
        return Level("cgroup", True, f"cgroup v1: child of {cpu} with cpu.shares=2", {"version": 1, "parent": str(cpu)})
    return Level("cgroup", False, f"no cgroup v2 or v1 cpu hierarchy under {root}")


def apply_cgroup(detail: dict, tids, *, group: str = GROUP_NAME, cpu_max: str | None = None,
                 cpus=None) -> Path:
    """Create the trainer group below ``detail["parent"]`` and move ``tids`` into it.

    v2: a threaded group with ``cpu.idle = 1`` (threads go to ``cgroup.threads``),
    optionally ``cpu.max`` (e.g. ``"20000 100000"``: 20 % of one CPU) and ``cpuset.cpus``.
    v1: ``cpu.shares = 2``, optionally ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` from
    ``cpu_max`` (threads go to ``tasks``); cpusets live in another v1 hierarchy and are
    left to affinity. Returns the group directory (remove it once the threads exited).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> g = apply_cgroup({"version": 2, "parent": str(root)}, [], cpu_max="20000 100000", cpus=[0, 1])
    >>> (g / "cpu.max").read_text().strip(), (g / "cpuset.cpus").read_text().strip()
    ('20000 100000', '0-1')
    """
    from ..topology import format_cpulist

    if cpu_max is not None:
        parts = str(cpu_max).split()
        if len(parts) != 2 or not (parts[0] == "max" or parts[0].isdigit()) or not parts[1].isdigit():
            raise ValueError(f"`cpu_max` must be '<quota_us|max> <period_us>', e.g. '20000 100000'; got {cpu_max!r}.")
    gdir = Path(detail["parent"]) / group
    gdir.mkdir(exist_ok=True)
    if detail.get("version") == 2:
        (gdir / "cgroup.type").write_text("threaded\n")
        (gdir / "cpu.idle").write_text("1\n")
        if cpu_max is not None:
            (gdir / "cpu.max").write_text(f"{cpu_max}\n")
        if cpus is not None:
            (gdir / "cpuset.cpus").write_text(format_cpulist(cpus) + "\n")
        target = gdir / "cgroup.threads"
    else:
        (gdir / "cpu.shares").write_text("2\n")
        if cpu_max is not None:
            quota, period = parts
            (gdir / "cpu.cfs_period_us").write_text(f"{period}\n")
            (gdir / "cpu.cfs_quota_us").write_text(("-1" if quota == "max" else quota) + "\n")
        target = gdir / "tasks"
    for tid in tids:
        with open(target, "a") as f:
            f.write(f"{int(tid)}\n")
    return gdir


# --- per-thread policies ---------------------------------------------------------------------

def _probe_thread_policy(policy_name: str) -> Level:
    """Try the policy on a short-lived thread of our own (a thread's policy cannot always
    be raised back without privileges, so the probe never touches the caller)."""
    result = {}

    def probe():
        tid = threading.get_native_id()
        try:
            if policy_name == "sched_idle":
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                result["ok"] = os.sched_getscheduler(tid) == os.SCHED_IDLE
            else:
                os.setpriority(os.PRIO_PROCESS, tid, 19)
                result["ok"] = os.getpriority(os.PRIO_PROCESS, tid) == 19
        except (OSError, AttributeError) as exc:
            result["err"] = f"{type(exc).__name__}: {exc}"

    if policy_name == "sched_idle" and not hasattr(os, "SCHED_IDLE"):
        return Level(policy_name, False, "os.SCHED_IDLE is not available on this platform")
    t = threading.Thread(target=probe, name="lukern-qos-probe", daemon=True)
    t.start()
    t.join()
    if result.get("ok"):
        why = ("per-thread SCHED_IDLE: runs only on otherwise idle CPUs" if policy_name == "sched_idle"
               else "per-thread nice 19")
        return Level(policy_name, True, why)
    return Level(policy_name, False, f"the kernel refused it ({result.get('err', 'policy did not stick')})")


def probe_ladder(resctrl_root="/sys/fs/resctrl", cgroup_root="/sys/fs/cgroup", *, probe_threads: bool = True) -> Ladder:
    """Probe every QoS level (see the module docstring); nothing is changed on the host
    except on a throw-away probe thread.

    Parameters
    ----------
    resctrl_root, cgroup_root : path
        Mount points (tests point them at fake trees).
    probe_threads : bool
        Also try SCHED_IDLE / nice on a probe thread.

    Examples
    --------
    >>> print(probe_ladder("/nonexistent", "/nonexistent").level("cooperative"))
    cooperative yes the guard's pausing between chunks (always available)
    """
    levels = [_probe_resctrl(Path(resctrl_root)), _probe_cgroup(Path(cgroup_root))]
    if probe_threads:
        levels.append(_probe_thread_policy("sched_idle"))
        levels.append(_probe_thread_policy("nice"))
    else:
        levels.append(Level("sched_idle", False, "not probed (probe_threads=False)"))
        levels.append(Level("nice", False, "not probed (probe_threads=False)"))
    levels.append(Level("cooperative", True, "the guard's pausing between chunks (always available)"))
    return Ladder(levels)


def apply(level, tid: int | None = None, *, ladder: Ladder | None = None) -> dict:
    """Apply one QoS level to thread ``tid`` (default: the calling thread).

    Returns a dict describing what was done (``{"level": ..., ...}``); :func:`restore`
    undoes the per-thread policies. Raises ``ValueError`` for an unknown or unusable level.

    Examples
    --------
    >>> import threading
    >>> apply("cooperative")["level"]
    'cooperative'
    """
    name = level.name if isinstance(level, Level) else str(level)
    if name not in LEVELS:
        raise ValueError(f"`level` must be one of {', '.join(LEVELS)}; got {name!r}.")
    tid = threading.get_native_id() if tid is None else int(tid)
    done = {"level": name, "tid": tid}
    if name == "sched_idle":
        done["previous"] = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority)
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    elif name == "nice":
        done["previous"] = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    elif name in ("resctrl", "cgroup"):
        lv = level if isinstance(level, Level) else (ladder or probe_ladder()).level(name)
        if not lv.usable:
            raise ValueError(f"QoS level {name!r} is not usable here: {lv.reason}")
        if name == "resctrl":
            done["group"] = str(apply_resctrl(lv.detail.get("root", "/sys/fs/resctrl"), [tid],
                                              schemata=lv.detail.get("schemata")))
        else:
            done["group"] = str(apply_cgroup(lv.detail, [tid]))
    return done


def restore(done: dict) -> None:
    """Undo :func:`apply` for a thread that lives on (per-thread policies only; groups
    are left for the threads' exit)."""
    tid, prev = done.get("tid"), done.get("previous")
    if prev is None:
        return
    if done["level"] == "sched_idle":
        os.sched_setscheduler(tid, prev[0], os.sched_param(prev[1]))
    elif done["level"] == "nice":
        os.setpriority(os.PRIO_PROCESS, tid, prev)
