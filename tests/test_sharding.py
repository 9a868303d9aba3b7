"""Access statistics, partitioning and ShardedTable (fake 2- and 4-node topologies)."""

import dataclasses
import os
import pathlib

import numpy as np
import pytest

import lukern
from lukern.testing import make_lookup_problem, reference_embedding_bag, zipf_ids
from lukern.topology import CpuModel, Node, read_topology

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sysfs"
CPU = CpuModel("test cpu", "x86_64", ("avx2",))


def _zipf_freq(n, n_ids, permuted, seed=0):
    rng = np.random.default_rng(seed)
    if permuted:
        ids = zipf_ids(rng, n_ids, n)
    else:
        c = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -1.05)
        ids = np.minimum(np.searchsorted(c / c[-1], rng.random(n_ids)), n - 1)
    return np.bincount(ids, minlength=n).astype(np.float64), ids


@pytest.mark.parametrize("tree,nodes", [("two_node_64cpu", 2), ("four_node_memonly", None)])
def test_partition_balances_zipf_on_fake_topologies(tree, nodes):
    topo = read_topology(FIXTURES / tree, cpu=CPU, threading_layer="omp")
    n_nodes = len([n for n in topo.nodes if n.cpus])
    freq, _ = _zipf_freq(200_000, 400_000, permuted=False)
    fa = lukern.partition_rows(freq, topo, replicate_bytes=64 * 256, row_bytes=256)
    rng_ = lukern.partition_rows(freq, topo, strategy="range")
    hs = lukern.partition_rows(freq, topo, strategy="hash")
    assert fa.n_nodes == n_nodes and fa.replicated.size == 64
    assert fa.imbalance(freq) < 1.10
    assert rng_.imbalance(freq) > 1.5  # the hot head sits in node 0's range
    assert hs.imbalance(freq) < rng_.imbalance(freq)
    load = fa.load(freq)
    assert np.isclose(load.sum(), freq.sum())
    # contiguous ranges covering every row exactly once
    assert fa.cuts[0] == 0 and fa.cuts[-1] == 200_000 and (np.diff(fa.cuts) >= 0).all()
    assert fa.map_nbytes() < 200_000 * 256 * 0.01


def test_partition_bad_input():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        lukern.partition_rows(np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="finite and >= 0"):
        lukern.partition_rows(np.array([1.0, -1.0]), 2)
    with pytest.raises(ValueError, match="`strategy` must be one of"):
        lukern.partition_rows(np.ones(4), 2, strategy="round")


def test_access_counter_finds_heavy_hitters_in_bounded_memory():
    n = 100_000
    freq, ids = _zipf_freq(n, 300_000, permuted=True, seed=3)
    c = lukern.AccessCounter.from_stream(n, [ids[i:i + 10_000] for i in range(0, ids.size, 10_000)],
                                         width=1 << 14, candidates=512)
    top = np.argsort(-freq)[:50]
    assert len(set(c.hottest(50)) & set(top)) >= 45
    est = c.estimate(top)
    assert (est >= freq[top]).all()  # count-min never undercounts
    assert c.nbytes < 1 << 20 and c.total == ids.size
    with pytest.raises(IndexError):
        c.observe(np.array([n]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_nodes,replicate", [(1, 0), (2, 0), (4, 40)])
def test_sharded_lookup_equals_plain(dtype, n_nodes, replicate):
    p = make_lookup_problem(n_rows=3000, dim=16, n_bags=200, pooling=(0, 20), distribution="zipf", dtype=dtype,
                            weighted=True, seed=n_nodes)
    freq = np.bincount(p.indices, minlength=3000).astype(float)
    part = lukern.partition_rows(freq, n_nodes, replicate_bytes=replicate * 64, row_bytes=64)
    st = lukern.ShardedTable(p.table, part)
    plain = lukern.embedding_bag(p.table, p.indices, p.offsets, weights=p.weights)
    for home in range(n_nodes):
        got = st.lookup(p.indices, p.offsets, weights=p.weights, home_node=home)
        assert np.array_equal(got, plain)  # same rows, same order of additions: bit for bit
    assert np.array_equal(st.gather(), p.table)
    # routing: a replicated row is read from the home node's replica
    if part.replicated.size:
        r = part.replicated[:1]
        rows = [int(st.translate(r, home_node=h)[0]) for h in range(n_nodes)]
        assert len(set(rows)) == n_nodes
        assert all(np.array_equal(st._layout.buffer[x], p.table[r[0]]) for x in rows)


def test_sharded_lookup_with_adapter_and_repartition():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((1000, 16))
    a = lukern.LoRAAdapter(1000, 16, rank=4, capacity=200, dtype=np.float64, lr_a=0.1)
    p = make_lookup_problem(n_rows=1000, dim=16, n_bags=50, pooling=(1, 6), dtype=np.float64, table=W, seed=1)
    for _ in range(3):
        a.train_step(W, p.indices, p.offsets, rng.standard_normal((50, 16)))
    freq = np.bincount(p.indices, minlength=1000).astype(float)
    st = lukern.ShardedTable(W, lukern.partition_rows(freq, 2))
    fused = lukern.embedding_bag(W, p.indices, p.offsets, adapter=a)
    np.testing.assert_allclose(st.lookup(p.indices, p.offsets, adapter=a), fused, rtol=1e-12, atol=1e-12)
    one = lukern.ShardedTable(W, lukern.partition_rows(freq, 1))  # one node: embedding_bag's own fused pass
    assert np.array_equal(one.lookup(p.indices, p.offsets, adapter=a), fused)
    old = st._layout
    st.repartition(lukern.partition_rows(freq[::-1].copy(), 4, replicate_bytes=10 * 128, row_bytes=128))
    assert st._layout is not old and st.partition.n_nodes == 4
    np.testing.assert_allclose(st.lookup(p.indices, p.offsets, adapter=a, home_node=3), fused, rtol=1e-12,
                               atol=1e-12)
    with pytest.raises(ValueError, match="`home_node` must be in"):
        st.lookup(p.indices, p.offsets, home_node=4)
    with pytest.raises(ValueError, match="contiguous ranges"):
        lukern.ShardedTable(W, lukern.partition_rows(freq, 2, strategy="hash"))


def test_first_touch_on_this_machine_pins_to_the_node():
    topo = read_topology()
    W = np.random.default_rng(0).standard_normal((500, 8))
    st = lukern.ShardedTable(W, lukern.partition_rows(np.ones(500), 1), topology=topo)
    assert np.array_equal(st.shard(0), W)
    assert st.nbytes >= W.nbytes


# --- pinned per-node execution, fused routing, allocation ------------------------------------

def _fake_topology(n_nodes, cpus_per_node=2, first_cpu=100):
    """``n_nodes`` nodes with CPUs this machine does not have (ids 0..n-1)."""
    base = read_topology(FIXTURES / "two_node_64cpu", cpu=CPU, threading_layer="omp")
    nodes = tuple(Node(k, tuple(range(first_cpu + k * cpus_per_node, first_cpu + (k + 1) * cpus_per_node)), 1 << 30)
                  for k in range(n_nodes))
    return dataclasses.replace(base, nodes=nodes)


def _expected_mapping(n_nodes):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= n_nodes:
        return [frozenset(allowed[k::n_nodes]) for k in range(n_nodes)]
    return [frozenset({allowed[k % len(allowed)]}) for k in range(n_nodes)]


@pytest.mark.parametrize("topo_kind,n_nodes", [("fixture", 2), ("fake", 2), ("fake", 4)])
def test_pinned_lookup_runs_each_part_on_its_nodes_threads(topo_kind, n_nodes):
    topo = (read_topology(FIXTURES / "two_node_64cpu", cpu=CPU, threading_layer="omp") if topo_kind == "fixture"
            else _fake_topology(n_nodes))
    p = make_lookup_problem(n_rows=4000, dim=16, n_bags=300, pooling=(0, 25), distribution="zipf", dtype=np.float64,
                            weighted=True, seed=7)
    freq = np.bincount(p.indices, minlength=4000).astype(float)
    part = lukern.partition_rows(freq, topo, replicate_bytes=30 * 128, row_bytes=128)
    st = lukern.ShardedTable(p.table, part, topology=topo)
    assert st.execution == "pinned"
    # the topology's CPUs are not this machine's: they are dealt over the nodes, and
    # the pools' threads report exactly that affinity (read back on each thread)
    want = _expected_mapping(n_nodes)
    assert list(st.node_cpus) == want
    assert st.requested_cpus == tuple(frozenset(n.cpus) for n in topo.nodes if n.cpus)
    plain = lukern.embedding_bag(p.table, p.indices, p.offsets, weights=p.weights)
    got = st.lookup(p.indices, p.offsets, weights=p.weights)
    # partial sums per node, added in node order: equal up to rounding
    np.testing.assert_allclose(got, plain, rtol=1e-12, atol=1e-12)
    for pool, cpus in zip(st.pools, want):
        assert pool.pinned and all(aff == cpus for _, aff in pool.pinned)
    # max is order-free: bit for bit; mean divides the combined sum
    assert np.array_equal(st.lookup(p.indices, p.offsets, mode="max"),
                          lukern.embedding_bag(p.table, p.indices, p.offsets, mode="max"))
    np.testing.assert_allclose(st.lookup(p.indices, p.offsets, mode="mean"),
                               lukern.embedding_bag(p.table, p.indices, p.offsets, mode="mean"), rtol=1e-12, atol=1e-12)
    # the ordered pass over the same shards gives the plain bits
    assert np.array_equal(st.lookup(p.indices, p.offsets, weights=p.weights, execution="ordered"), plain)


def test_pinned_parts_route_every_id_once_to_its_nodes_rows():
    topo = _fake_topology(4)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((1000, 8))
    freq = rng.zipf(1.3, 1000).astype(float)
    part = lukern.partition_rows(freq, topo, replicate_bytes=20 * 64, row_bytes=64)
    st = lukern.ShardedTable(W, part, topology=topo)
    ids = rng.integers(0, 1000, 5000)
    rows = np.stack([st.translate(ids, part=k) for k in range(4)])
    assert ((rows >= 0).sum(axis=0) == 1).all()  # each id in exactly one part
    L = st._layout
    rep = np.isin(ids, part.replicated)
    for k in range(4):
        mine = rows[k] >= 0
        # own rows from its range, replicated ids (every 4th position) from its replicas
        assert (mine[~rep] == (part.owner_of(ids[~rep]) == k)).all()
        assert (mine[rep] == (np.arange(ids.size)[rep] % 4 == k)).all()
        assert ((rows[k][mine] >= L.starts[k]) & (rows[k][mine] < L.rep_starts[k] + L.n_rep)).all()
        assert np.array_equal(L.buffer[rows[k][mine]], W[ids[mine]])


@pytest.mark.parametrize("dim,dtype", [(16, np.float32), (64, np.float32), (5, np.float64), (8, np.float64)])
def test_fused_routing_kernels_match_plain_bits(dim, dtype):
    # the specialised (16, 64, 8) and generic (5) kernels, ordered: the plain bits
    p = make_lookup_problem(n_rows=3000, dim=dim, n_bags=400, pooling=(0, 30), distribution="zipf", dtype=dtype,
                            weighted=True, seed=dim)
    freq = np.bincount(p.indices, minlength=3000).astype(float)
    st = lukern.ShardedTable(p.table, lukern.partition_rows(freq, 3, replicate_bytes=50 * dim * 8, row_bytes=dim * 8))
    assert st.execution == "ordered" and st.allocation == "none"
    for kw in ({"weights": p.weights}, {"mode": "mean"}, {"mode": "max"}):
        want = lukern.embedding_bag(p.table, p.indices, p.offsets, **kw)
        assert np.array_equal(st.lookup(p.indices, p.offsets, n_threads=2, **kw), want), kw


def test_pinned_lookup_with_integer_values_is_exact_and_handles_empty_bags():
    topo = _fake_topology(2)
    W = np.random.default_rng(2).integers(-50, 50, (500, 16)).astype(np.float32)  # exact sums in any order
    idx = np.array([3, 499, 3, 250, 7], np.int64)
    off = np.array([0, 0, 2, 2, 5, 5], np.int64)
    st = lukern.ShardedTable(W, lukern.partition_rows(np.ones(500), topo, replicate_bytes=64, row_bytes=64),
                             topology=topo)
    for mode in ("sum", "mean", "max"):
        got = st.lookup(idx, off, mode=mode)
        assert np.array_equal(got, lukern.embedding_bag(W, idx, off, mode=mode)), mode
        assert not got[[0, 2, 4]].any()


def test_pinned_and_placement_bad_input():
    W = np.zeros((100, 4))
    two = lukern.partition_rows(np.ones(100), 2)
    with pytest.raises(ValueError, match="execution='pinned' needs a `topology`"):
        lukern.ShardedTable(W, two, execution="pinned")
    with pytest.raises(ValueError, match="`topology` has 4 nodes with CPUs"):
        lukern.ShardedTable(W, two, topology=_fake_topology(4))
    with pytest.raises(ValueError, match="`numa` must be one of"):
        lukern.ShardedTable(W, two, topology=_fake_topology(2), numa="interleave")
    st = lukern.ShardedTable(W, two)
    with pytest.raises(ValueError, match="execution='pinned' needs a table built with a `topology`"):
        st.lookup(np.array([1]), np.array([0, 1]), execution="pinned")
    st = lukern.ShardedTable(W, two, topology=_fake_topology(2))
    before = st._layout
    with pytest.raises(ValueError, match="this table's topology has 2"):
        st.repartition(lukern.partition_rows(np.ones(100), 4))
    assert st._layout is before


def test_first_touch_path_without_libnuma(monkeypatch):
    monkeypatch.setattr(lukern.sharding, "_libnuma_cache", [None])  # as on a host without libnuma
    topo = _fake_topology(2)
    W = np.random.default_rng(0).standard_normal((300, 8))
    st = lukern.ShardedTable(W, lukern.partition_rows(np.ones(300), topo), topology=topo)
    assert st.allocation == "first-touch" and st.node_allocation == ("first-touch",) * 2
    assert np.array_equal(st.gather(), W)
    with pytest.raises(RuntimeError, match="libnuma is not available"):
        lukern.ShardedTable(W, lukern.partition_rows(np.ones(300), topo), topology=topo, numa="libnuma")


needs_libnuma = pytest.mark.skipif(lukern.sharding.libnuma() is None, reason="libnuma is not installed")


@needs_libnuma
def test_libnuma_binds_each_nodes_pages_on_this_machine():
    topo = read_topology()
    node0 = [n for n in topo.nodes if n.cpus][0].id
    W = np.random.default_rng(0).standard_normal((5000, 16))
    st = lukern.ShardedTable(W, lukern.partition_rows(np.ones(5000), topo), topology=topo, numa="libnuma")
    assert st.allocation == "libnuma"
    L = st._layout
    mode, nodes, where = lukern.sharding.memory_policy(L.buffer[L.starts[0]:].ctypes.data)
    assert mode == 2 and nodes == (node0,) and where == node0  # MPOL_BIND to the node, page there
    ft = lukern.ShardedTable(W, lukern.partition_rows(np.ones(5000), topo), topology=topo, numa="first-touch")
    assert ft.allocation == "first-touch"
    assert lukern.sharding.memory_policy(ft._layout.buffer.ctypes.data)[0] == 0  # MPOL_DEFAULT
    assert np.array_equal(st.gather(), W) and np.array_equal(ft.gather(), W)


@needs_libnuma
def test_libnuma_falls_back_per_node_for_nodes_this_machine_lacks():
    topo = _fake_topology(2)  # memory nodes 0 and 1
    exists = [os.path.isdir(f"/sys/devices/system/node/node{k}") for k in range(2)]
    W = np.random.default_rng(0).standard_normal((400, 8))
    part = lukern.partition_rows(np.ones(400), topo)
    st = lukern.ShardedTable(W, part, topology=topo)
    assert st.node_allocation == tuple("libnuma" if e else "first-touch" for e in exists)
    if not all(exists):
        assert st.allocation == "mixed"
        with pytest.raises(OSError, match="mbind of node 1's rows to memory node 1 failed"):
            lukern.ShardedTable(W, part, topology=topo, numa="libnuma")


# --- a real two-node kernel: QEMU guest (optional, slow) ---------------------------------------

def _qemu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lukern_qemu_guest", pathlib.Path(__file__).parent / "qemu" / "guest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_two_node_qemu_guest(tmp_path):
    """Boot a guest with ``-numa node`` x2 (tests/qemu/README.md): its sysfs reports two
    nodes and lukern.topology reads them; with LUKERN_QEMU_PYTHON=1 the sharded lookup
    also runs inside the guest (the host's root over 9p), on its two real nodes."""
    guest = _qemu()
    folder = guest.image()
    if folder is None:
        pytest.skip("needs qemu-system-x86_64 and LUKERN_QEMU_IMAGE (python tests/qemu/build_image.py DEST)")
    run_python = os.environ.get("LUKERN_QEMU_PYTHON") == "1"
    console = guest.boot(folder, run_python=run_python, timeout=3000 if run_python else 600)
    assert "LUKERN-GUEST-DONE" in console, console[-3000:]
    files = guest.sysfs_tree(console, tmp_path)
    assert "devices/system/node/node1/cpulist" in files
    assert (tmp_path / "devices/system/node/online").read_text().strip() == "0-1"
    topo = read_topology(tmp_path, cpu=CPU, threading_layer="omp")
    assert [(n.id, n.cpus) for n in topo.nodes] == [(0, (0,)), (1, (1,))]
    assert all(n.mem_total_bytes > 512 << 20 for n in topo.nodes)
    assert topo.nodes[0].distances[1] > topo.nodes[0].distances[0]
    part = lukern.partition_rows(np.arange(1000, 0, -1, dtype=float), topo, replicate_bytes=10 * 64, row_bytes=64)
    assert part.n_nodes == 2 and part.imbalance(np.arange(1000, 0, -1, dtype=float)) < 1.10
    if run_python:
        res = guest.result(console)
        assert res is not None, console[-3000:]
        assert res["nodes"] == [[0, [0]], [1, [1]]]
        assert res["allocation"] == "libnuma"
        # each node's rows bound to its node (MPOL_BIND) and their pages there
        assert [(pl[0], pl[1], pl[2]) for pl in res["placed"]] == [(2, [0], 0), (2, [1], 1)]
        assert res["pinned"] == [[0], [1]]
        assert res["ordered_bit_exact"] and res["pinned_max_abs_err"] < 1e-9
