"""Access statistics, partitioning and ShardedTable (fake 2- and 4-node topologies)."""

import pathlib

import numpy as np
import pytest

import lukern
from lukern.testing import make_lookup_problem, reference_embedding_bag, zipf_ids
from lukern.topology import CpuModel, read_topology

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
