"""Replicas as Ray actors (``pip install 'lukern[ray]'``; ray is imported only here, inside
functions).

- :class:`RayCluster`: a context manager that starts a private Ray on this machine's
  loopback interface and, on exit, shuts it down and makes sure every process it
  started is gone.
- :class:`RayExchange`: the :class:`~lukern.distributed.exchange.FactorExchange` over a
  small *board* actor. A replica ``ray.put``\\ s its snapshot and hands the board only the
  reference; peers fetch the snapshot from the object store (zero-copy for the numpy
  arrays on one node). A snapshot whose owner died can become unfetchable: the
  collector then skips it and lists the peer in ``failed``.
- ``ReplicaActor``: one long-lived actor per replica holding its
  :class:`~lukern.distributed.replica.Replica` (model, adapters, trainer). The initial
  model is ``ray.put`` once and every actor reads it from the object store; the MLP
  weights stay shared read-only views there, the tables are copied (they receive folded
  rows).
- :class:`RayReplicaSet`: the driver's handle on N such actors: serve, the two exchange
  phases, optional pinning per node, and failure handling: a replica whose actor died
  is reported in ``lost`` and dropped; the others keep serving, training and exchanging.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

__all__ = ["RayCluster", "RayExchange", "RayReplicaSet", "ray_available"]

#: Ray's own switch for single-machine use. Ray resolves ``_node_ip_address="127.0.0.1"``
#: to the host's routable address and its servers listen on every interface; with this
#: variable at 0 it advertises and binds 127.0.0.1 only (checked with the listening
#: sockets of every process, tests/test_distributed_ray.py).
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_available() -> bool:
    """Whether ``import ray`` works."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray backend needs ray: pip install 'lukern[ray]'") from None
    return ray


# --------------------------------------------------------------------------- processes


def _proc_table():
    """``{pid: (ppid, start_time)}`` of every process (Linux /proc); {} elsewhere."""
    out = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()  # fields after "(comm)"
        try:
            out[int(name)] = (int(rest[1]), int(rest[19]))
        except (IndexError, ValueError):
            continue
    return out


def _descendants(root: int) -> set:
    """``{(pid, start_time)}`` of every descendant of ``root``."""
    table = _proc_table()
    kids = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add((c, table[c][1]))
            todo.append(c)
    return out


def _is_ray(pid: int) -> bool:
    """Whether the process's command line is one of Ray's (its binaries and workers live
    under the ray package; workers rename themselves ``ray::...``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"ray" in cmd


def _alive(procs) -> list:
    table = _proc_table()
    return sorted(p for p, st in procs if p in table and table[p][1] == st)


class RayCluster:
    """A private Ray on 127.0.0.1 for the duration of a ``with`` block.

    Starts a new local instance (``address="local"``: never attaches to another Ray on
    the machine), no dashboard, workers' logs not forwarded, its session files in a
    temporary folder. On exit: ``ray.shutdown()``, then any process it started that is
    still alive after ``grace_s`` is killed by pid (``killed`` lists them), and the
    folder is removed. If Ray is already initialised in this process, that instance is
    used and left running.

    Parameters
    ----------
    num_cpus : int
        Logical CPUs Ray schedules on (one per replica actor by default).
    resources : dict, optional
        Custom resources of the node (e.g. ``{"lukern_node_0": 1}`` to pin actors).
    object_store_memory : int, optional
        Bytes of the object store (Ray's default: 30% of RAM).

    Examples
    --------
    >>> with RayCluster(num_cpus=2) as cluster:                 # doctest: +SKIP
    ...     cluster.ray.get(cluster.ray.put(1)), len(cluster.node_ids())
    (1, 1)
    """

    def __init__(self, num_cpus: int = 2, *, resources: dict | None = None, object_store_memory: int | None = None,
                 grace_s: float = 10.0):
        if int(num_cpus) < 1:
            raise ValueError(f"`num_cpus` must be >= 1; got {num_cpus}.")
        self.num_cpus = int(num_cpus)
        self.resources = dict(resources or {})
        self.object_store_memory = object_store_memory
        self.grace_s = float(grace_s)
        self.started = False
        self.ray = None
        self.processes: set = set()
        self.killed: list = []
        self._before: set = set()
        self._tmp = None
        self._env_old = None
        self._const_old = None
        self._tracking = False

    def __enter__(self):
        self._env_old = os.environ.get(_LOOPBACK_ENV)
        os.environ[_LOOPBACK_ENV] = "0"  # before ray is imported: read at import time
        ray = _ray()
        self.ray = ray
        if ray.is_initialized():
            self._restore_env()
            return self
        try:
            from ray._private import ray_constants
        except ImportError:  # pragma: no cover - layout of other Ray versions
            ray_constants = None
        if ray_constants is not None and hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
            # ray may have been imported before the variable was set
            self._const_old = (ray_constants, ray_constants.ENABLE_RAY_CLUSTER)
            ray_constants.ENABLE_RAY_CLUSTER = False
        self._before = _descendants(os.getpid())
        self._tmp = tempfile.mkdtemp(prefix="lukern-ray-")
        kw = dict(address="local", num_cpus=self.num_cpus, include_dashboard=False,
                  _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False,
                  _temp_dir=self._tmp)
        if self.resources:
            kw["resources"] = self.resources
        if self.object_store_memory:
            kw["object_store_memory"] = int(self.object_store_memory)
        self._tracking = True
        try:
            ray.init(**kw)
        except BaseException:
            self.track()
            self._cleanup()
            raise
        self.started = True
        self.track()
        return self

    def track(self):
        """Remember the Ray processes started since ``__enter__`` (descendants of this
        process that were not there before; called on entry, before actors go and on
        exit: workers come and go)."""
        if self._tracking:
            self.processes |= {(p, st) for p, st in _descendants(os.getpid()) - self._before if _is_ray(p)}

    def node_ids(self) -> list:
        """Ids of the alive Ray nodes (for pinning)."""
        return [n["NodeID"] for n in self.ray.nodes() if n.get("Alive")]

    def listening_addresses(self) -> list:
        """``(pid, ip)`` of every listening TCP socket of the processes this cluster
        started (Linux; needs psutil, else [])."""
        try:
            import psutil
        except ImportError:
            return []
        self.track()
        pids = {p for p, _ in self.processes}
        return [(c.pid, c.laddr.ip) for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.pid in pids]

    def __exit__(self, *exc):
        if self.started:
            self.track()
            try:
                self.ray.shutdown()
            finally:
                self._cleanup()
        return False

    def _cleanup(self):
        deadline = time.monotonic() + self.grace_s
        while _alive(self.processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _alive(self.processes):
            try:
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._restore_env()
        self.started = self._tracking = False

    def _restore_env(self):
        if self._const_old is not None:
            mod, value = self._const_old
            mod.ENABLE_RAY_CLUSTER = value
            self._const_old = None
        if self._env_old is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = self._env_old

    def alive_processes(self) -> list:
        """Pids of the processes this cluster started that are still running."""
        return _alive(self.processes)


# --------------------------------------------------------------------------- actors

class _Board:
    """Latest ``(version, [object ref])`` per replica (a Ray actor). The reference is
    wrapped in a list so that Ray passes it through instead of resolving it."""

    def __init__(self):
        self.latest = {}

    def publish(self, rid, version, ref_box):
        old = self.latest.get(rid)
        if old is None or version > old[0]:
            self.latest[rid] = (int(version), ref_box)

    def collect(self, rid, seen):
        return {k: v for k, v in sorted(self.latest.items()) if k != rid and v[0] > seen.get(k, -1)}

    def forget(self, rid):
        self.latest.pop(rid, None)

    def versions(self):
        return {k: v[0] for k, v in sorted(self.latest.items())}


class _ReplicaActor:
    """One replica in its own process (a Ray actor); BLAS and lukern limited to one
    thread: the actor holds one logical CPU."""

    def __init__(self, replica_id, payload_box, strategy_kw, init_box, timeout_s, replica_kw):
        import contextlib

        import ray

        from lukern.plan import thread_limit

        self._limits = contextlib.ExitStack()
        self._limits.enter_context(thread_limit(1))
        try:
            from threadpoolctl import threadpool_limits

            self._limits.enter_context(threadpool_limits(1))
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            pass
        # the payload's arrays are read-only views of the object store's single copy
        self._args = (replica_id, ray.get(payload_box[0]), strategy_kw, ray.get(init_box[0]) if init_box else None,
                      replica_kw)
        self.timeout_s = timeout_s
        self.reset()

    def reset(self):
        """Back to the initial model (the process, its imports and compiled kernels stay)."""
        from lukern.distributed.replica import Replica

        rid, payload, kw, init, rkw = self._args
        self.replica = Replica(rid, payload, kw, init_batches=init, **rkw)
        self.exchange = None
        return True

    def _ex(self, board):
        if self.exchange is None:  # one board per replica set
            self.exchange = RayExchange(board, timeout_s=self.timeout_s)
        return self.exchange

    def serve(self, batches):
        return self.replica.serve_batches(batches)

    def publish(self, board):
        return self.replica.publish(self._ex(board))

    def merge(self, board):
        return self.replica.merge_from(self._ex(board))

    def changed_rows(self):
        return self.replica.changed_rows()

    def stats(self):
        import ray

        return {**self.replica.stats(), "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def export(self):
        return self.replica.export()


_CLASSES = {}


def _classes():
    """The board and replica actor classes, made remote on first use (ray stays optional)."""
    if not _CLASSES:
        ray = _ray()
        _CLASSES["Board"] = ray.remote(num_cpus=0)(_Board)
        _CLASSES["ReplicaActor"] = ray.remote(_ReplicaActor)
    return _CLASSES["Board"], _CLASSES["ReplicaActor"]


class RayExchange:
    """A :class:`~lukern.distributed.exchange.FactorExchange` over a board actor; the
    snapshots themselves travel through the object store.

    ``failed`` lists ``(peer, error)`` for the snapshots the last :meth:`collect` could
    not fetch (owner died, lost object, timeout)."""

    def __init__(self, board=None, *, timeout_s: float = 60.0):
        self.ray = _ray()
        self.board = _classes()[0].remote() if board is None else board
        self.timeout_s = float(timeout_s)
        self.failed: list = []
        self._mine = {}  # keeps this replica's published snapshot alive

    def publish(self, replica_id, snapshot):
        ref = self.ray.put(snapshot)
        self._mine = {"ref": ref}
        self.ray.get(self.board.publish.remote(int(replica_id), int(snapshot.version), [ref]),
                     timeout=self.timeout_s)

    def collect(self, replica_id, seen=None):
        ray = self.ray
        entries = ray.get(self.board.collect.remote(int(replica_id), dict(seen or {})), timeout=self.timeout_s)
        self.failed = []
        out = {}
        for rid, (version, box) in entries.items():
            try:
                out[rid] = ray.get(box[0], timeout=self.timeout_s)
            except (ray.exceptions.RayError, TimeoutError) as e:
                self.failed.append((rid, type(e).__name__))
        return out

    def forget(self, replica_id):
        self.ray.get(self.board.forget.remote(int(replica_id)), timeout=self.timeout_s)


class RayReplicaSet:
    """N replica actors and their exchange board (driver side).

    Parameters
    ----------
    n : int
        Replicas.
    model : DLRM or dict
        The initial model (or its :func:`~lukern.distributed.replica.model_payload`),
        put in the object store once.
    strategy_kw : dict or list of dict
        Settings of every replica's trainer (one dict, or one per replica).
    init_batches : list of Batch, optional
        Shared by every replica to start B at the top gradient directions.
    replica_kw : dict, optional
        Further arguments of :class:`~lukern.distributed.replica.Replica` (``merge``, ``rows``).
    pin : None, "spread" or list of node ids
        None: Ray places the actors; "spread": one per node as far as possible; a list:
        replica ``i`` runs on node ``pin[i % len(pin)]`` (hard affinity).
    num_cpus : float
        Logical CPUs each actor holds.
    timeout_s : float
        Longest wait for one call; a replica that does not answer in time counts as lost.

    Any replica whose call fails with an actor error is moved to ``lost`` (with the
    phase and the error), removed from the board, and left out from then on.
    """

    def __init__(self, n: int, model, strategy_kw, *, init_batches=None, replica_kw=None, pin=None,
                 num_cpus: float = 1, timeout_s: float = 600.0):
        from .replica import model_payload

        ray = _ray()
        if not ray.is_initialized():
            raise RuntimeError("Ray is not running: start it first, e.g. `with RayCluster(num_cpus=2): ...`.")
        if int(n) < 1:
            raise ValueError(f"`n` must be >= 1; got {n}.")
        self.ray = ray
        self.timeout_s = float(timeout_s)
        payload = model if isinstance(model, dict) else model_payload(model)
        payload_ref = ray.put(payload)  # once, read by every actor
        init_ref = ray.put(list(init_batches)) if init_batches else None
        kws = strategy_kw if isinstance(strategy_kw, list) else [strategy_kw] * n
        self.n = int(n)
        self._start = lambda i: self._actor_options(i, pin, num_cpus).remote(
            i, [payload_ref], kws[i], [init_ref] if init_ref else [], self.timeout_s, dict(replica_kw or {}))
        self._refs = (payload_ref, init_ref)  # the shared inputs live as long as the set
        self.actors = {i: self._start(i) for i in range(self.n)}
        self.board = _classes()[0].remote()
        self.lost: list = []
        self._phase = "start"
        self._call({i: a.stats.remote() for i, a in self.actors.items()})  # wait until every actor is up

    @staticmethod
    def _actor_options(i, pin, num_cpus):
        opts = {"num_cpus": num_cpus, "max_restarts": 0}
        if pin == "spread":
            opts["scheduling_strategy"] = "SPREAD"
        elif pin is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=list(pin)[i % len(pin)], soft=False)
        return _classes()[1].options(**opts)

    def reset(self) -> None:
        """Start over: every replica back at the initial model (live actors reset in
        place, keeping their warm processes; lost ones restarted), a fresh board, an
        empty ``lost``."""
        self.ray.kill(self.board, no_restart=True)
        self.board = _classes()[0].remote()
        self.lost = []
        for i in range(self.n):
            if i not in self.actors:
                self.actors[i] = self._start(i)
        self._phase = "start"
        self._call({i: a.reset.remote() for i, a in self.actors.items()})

    def alive(self) -> list:
        return sorted(self.actors)

    def _call(self, calls: dict) -> dict:
        """Wait for ``{replica: ref}``; a failed replica is recorded in ``lost`` and dropped."""
        ray = self.ray
        out = {}
        for i, ref in calls.items():
            try:
                out[i] = ray.get(ref, timeout=self.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                self._lose(i, e)
        return out

    def _lose(self, i, err):
        actor = self.actors.pop(i, None)
        if actor is None:
            return
        self.lost.append({"replica": int(i), "phase": self._phase, "error": type(err).__name__})
        try:
            self.ray.kill(actor)  # a replica that timed out must not come back half-way
        except Exception:  # noqa: BLE001 - it is gone either way
            pass
        try:
            self.ray.get(self.board.forget.remote(int(i)), timeout=self.timeout_s)
        except self.ray.exceptions.RayError:
            pass

    def serve(self, parts: dict) -> dict:
        """``{replica: [batches]}`` -> ``{replica: predictions}``; the replicas run in parallel."""
        self._phase = "serve"
        return self._call({i: self.actors[i].serve.remote(bs) for i, bs in parts.items() if i in self.actors})

    def publish(self) -> dict:
        self._phase = "publish"
        return self._call({i: a.publish.remote(self.board) for i, a in self.actors.items()})

    def merge(self) -> dict:
        self._phase = "merge"
        return self._call({i: a.merge.remote(self.board) for i, a in self.actors.items()})

    def changed_rows(self) -> int:
        self._phase = "serve"
        return int(sum(self._call({i: a.changed_rows.remote() for i, a in self.actors.items()}).values()))

    def stats(self) -> dict:
        self._phase = "stats"
        return self._call({i: a.stats.remote() for i, a in self.actors.items()})

    def export(self, i: int) -> list:
        return self.ray.get(self.actors[i].export.remote(), timeout=self.timeout_s)

    def kill(self, i: int) -> None:
        """Kill replica ``i``'s actor without telling anyone (failure drills): the set
        notices at its next call."""
        self.ray.kill(self.actors[i], no_restart=True)

    def close(self) -> None:
        for a in list(self.actors.values()) + [self.board]:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.actors = {}
