"""embedding_bag and TableBatch against the numpy references in lukern.testing."""

import re
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lukern
from lukern._kernels import embedding as K
from lukern.embedding import pack_batched
from lukern.testing import (
    make_lookup_problem,
    make_offsets,
    reference_embedding_bag,
    reference_table_batch,
)

DRIVERS = ["serial", "threads", "prange"]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [16, 5])  # specialised and generic kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
def test_matches_reference(dim, dtype, index_dtype, mode, weighted):
    p = make_lookup_problem(n_rows=300, dim=dim, n_bags=37, pooling=(0, 9), dtype=dtype,
                            index_dtype=index_dtype, weighted=weighted, seed=dim)
    ref = reference_embedding_bag(p.table, p.indices, p.offsets, p.weights, mode)
    for driver in DRIVERS:
        got = lukern.embedding_bag(p.table, p.indices, p.offsets, weights=p.weights, mode=mode,
                                   driver=driver, n_threads=2, chunk_size=5)
        np.testing.assert_allclose(got, ref, **tol(dtype), err_msg=driver)


@pytest.mark.parametrize("driver", DRIVERS)
def test_parallel_drivers_bitwise_equal_serial(driver):
    p = make_lookup_problem(n_rows=5000, dim=64, n_bags=301, pooling=(0, 40), distribution="zipf", seed=3)
    serial = lukern.embedding_bag(p.table, p.indices, p.offsets, driver="serial")
    for chunk in (1, 7, 64, 1000):
        got = lukern.embedding_bag(p.table, p.indices, p.offsets, driver=driver, n_threads=2, chunk_size=chunk)
        assert np.array_equal(got, serial)


def test_matches_torch_semantics():
    torch = pytest.importorskip("torch")
    p = make_lookup_problem(n_rows=100, dim=16, n_bags=20, pooling=(0, 6), weighted=True, seed=1)
    for mode in ("sum", "mean", "max"):
        w = p.weights if mode == "sum" else None
        ref = torch.nn.functional.embedding_bag(
            torch.from_numpy(p.indices), torch.from_numpy(p.table), torch.from_numpy(p.offsets), mode=mode,
            per_sample_weights=None if w is None else torch.from_numpy(w), include_last_offset=True).numpy()
        got = lukern.embedding_bag(p.table, p.indices, p.offsets, weights=w, mode=mode)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=mode)


def test_edge_shapes():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    # no bags at all
    out = lukern.embedding_bag(table, np.array([], np.int64), np.array([0], np.int64))
    assert out.shape == (0, 3)
    # every bag empty, every mode gives zeros
    for mode in ("sum", "mean", "max"):
        out = lukern.embedding_bag(table, np.array([], np.int64), np.array([0, 0, 0], np.int64), mode=mode)
        assert np.array_equal(out, np.zeros((2, 3), np.float32))
    # one bag, duplicate ids
    out = lukern.embedding_bag(table, np.array([1, 1, 1]), np.array([0, 3]))
    assert np.array_equal(out, 3 * table[[1]])
    # a one-row table
    one = np.ones((1, 16), np.float32)
    out = lukern.embedding_bag(one, np.zeros(5, np.int64), np.array([0, 2, 5]), mode="mean")
    assert np.array_equal(out, np.ones((2, 16), np.float32))


def test_fewer_bags_than_threads_and_odd_chunks():
    p = make_lookup_problem(n_rows=50, dim=16, n_bags=1, pooling=(3, 3))
    ref = reference_embedding_bag(p.table, p.indices, p.offsets)
    for driver in DRIVERS:
        got = lukern.embedding_bag(p.table, p.indices, p.offsets, driver=driver, n_threads=8, chunk_size=3)
        np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_out_is_written_in_place():
    p = make_lookup_problem(n_rows=50, dim=16, n_bags=4)
    out = np.full((4, 16), np.nan, np.float32)
    got = lukern.embedding_bag(p.table, p.indices, p.offsets, out=out)
    assert got is out and np.isfinite(out).all()


@settings(max_examples=40, deadline=None)
@given(
    n_rows=st.integers(1, 40),
    lengths=st.lists(st.integers(0, 6), min_size=0, max_size=12),
    dim=st.sampled_from([5, 16]),
    mode=st.sampled_from(["sum", "mean", "max"]),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(n_rows, lengths, dim, mode, seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n_rows, dim)).astype(np.float64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    indices = rng.integers(0, n_rows, size=int(offsets[-1]))
    ref = reference_embedding_bag(table, indices, offsets, None, mode)
    got = lukern.embedding_bag(table, indices, offsets, mode=mode)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


# --- bad input: a clear error, and `out` untouched ---------------------------------------

def _bad_cases():
    t = np.ones((10, 4), np.float32)
    i = np.array([0, 1, 2], np.int64)
    o = np.array([0, 1, 3], np.int64)
    return [
        (TypeError, "float32 or float64", dict(table=t.astype(np.int32))),
        (ValueError, "C-contiguous", dict(table=np.ones((4, 10), np.float32).T)),
        (TypeError, "numpy.ndarray", dict(table=[[1.0]])),
        (TypeError, "int32 or int64", dict(indices=i.astype(np.float64))),
        (IndexError, r"\[0, 10\); got max 10", dict(indices=np.array([0, 1, 10]))),
        (IndexError, "got min -1", dict(indices=np.array([0, -1, 2]))),
        (ValueError, "non-decreasing", dict(offsets=np.array([0, 2, 1, 3]))),
        (ValueError, r"offsets\[-1\]` must equal len\(indices\) = 3", dict(offsets=np.array([0, 1, 2]))),
        (ValueError, r"offsets\[0\]` must be 0", dict(offsets=np.array([1, 3]))),
        (ValueError, "one entry per index", dict(weights=np.ones(2, np.float32))),
        (TypeError, "table's dtype", dict(weights=np.ones(3, np.float64))),
        (ValueError, "only for mode='sum'", dict(weights=np.ones(3, np.float32), mode="mean")),
        (ValueError, "`mode` must be one of", dict(mode="median")),
        (ValueError, r"`n_threads` must be >= 1|`driver` must be one of", dict(driver="gpu")),
    ]


@pytest.mark.parametrize("exc,match,kwargs", _bad_cases())
def test_bad_input_raises_and_leaves_out_untouched(exc, match, kwargs):
    args = dict(table=np.ones((10, 4), np.float32), indices=np.array([0, 1, 2], np.int64),
                offsets=np.array([0, 1, 3], np.int64))
    args.update({k: v for k, v in kwargs.items() if k in args})
    extra = {k: v for k, v in kwargs.items() if k not in args}
    n_bags = len(args["offsets"]) - 1
    out = np.full((max(n_bags, 1), 4), 7.0, np.float32)
    if isinstance(args["table"], np.ndarray) and args["table"].dtype == np.float32 and args["table"].shape[1] == 4:
        extra["out"] = out[:n_bags]
    with pytest.raises(exc, match=match):
        lukern.embedding_bag(args["table"], args["indices"], args["offsets"], **extra)
    assert (out == 7.0).all()


def test_bad_out_shape_and_dtype():
    t = np.ones((10, 4), np.float32)
    i, o = np.array([0, 1]), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        lukern.embedding_bag(t, i, o, out=np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError, match="dtype float32"):
        lukern.embedding_bag(t, i, o, out=np.zeros((2, 4), np.float64))


def test_unchecked_skips_range_check_only():
    t = np.ones((10, 4), np.float32)
    # a valid call gives the same answer with and without the check
    i, o = np.array([0, 9]), np.array([0, 2])
    assert np.array_equal(lukern.embedding_bag(t, i, o, unchecked=True), lukern.embedding_bag(t, i, o))
    with pytest.raises(ValueError, match="non-decreasing"):  # layout is still validated
        lukern.embedding_bag(t, i, np.array([0, 2, 1, 2]), unchecked=True)


# --- concurrency -------------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["prange", "threads"])
def test_two_serving_threads_at_once(driver):
    p = make_lookup_problem(n_rows=20000, dim=16, n_bags=512, pooling=(5, 30), seed=5)
    ref = lukern.embedding_bag(p.table, p.indices, p.offsets, driver="serial")
    errors = []

    def serve():
        try:
            for _ in range(60):
                got = lukern.embedding_bag(p.table, p.indices, p.offsets, driver=driver, n_threads=2, chunk_size=16)
                if not np.array_equal(got, ref):
                    errors.append("mismatch")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- table-batched -----------------------------------------------------------------------

def _batch_problem(dims=(16, 16, 8, 16), n_bags=23, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    tables = [rng.standard_normal((50 + 10 * t, d)).astype(dtype) for t, d in enumerate(dims)]
    il, ol = [], []
    for tab in tables:
        off = make_offsets(rng, n_bags, (0, 5))
        il.append(rng.integers(0, tab.shape[0], size=int(off[-1])))
        ol.append(off)
    idx, off = pack_batched(il, ol)
    return tables, idx, off


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_table_batch_matches_reference(driver, mode):
    tables, idx, off = _batch_problem()
    batch = lukern.TableBatch(tables)
    got = batch.lookup(idx, off, mode=mode, driver=driver, n_threads=2, chunk_size=4)
    np.testing.assert_allclose(got, reference_table_batch(tables, idx, off, mode=mode), rtol=1e-5, atol=1e-5)
    assert got.shape == (23, 56)


def _spy_streamed(monkeypatch, batch, dtype):
    """Record, for every batched kernel call, whether the wrapper chose the streamed kernel."""
    seen = []
    for d, _, _, _ in batch.groups:
        ks = K.bag_kernels(d, dtype, False)

        class Spy:  # the kernel set with its batched kernels wrapped
            def __init__(self, real):
                self._real = real

            def __getattr__(self, name):
                kernel = getattr(self._real, name)
                if not name.startswith("tbe_") or kernel is None:
                    return kernel

                def call(*args):
                    seen.append(name.endswith("_streamed"))
                    return kernel(*args)

                return call

        monkeypatch.setitem(K._KERNEL_SETS, (d, np.dtype(dtype), False), Spy(ks))
    return seen


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_table_batch_streamed_output_matches_reference(monkeypatch, driver, dtype, mode, weighted):
    # widths of whole 64-byte lines: every row of the output goes out with non-temporal
    # stores once the output is large enough (forced here), and must equal the reference
    import lukern.embedding as E

    tables, idx, off = _batch_problem(dims=(16, 32, 16), n_bags=37, dtype=dtype)
    batch = lukern.TableBatch(tables)
    w = np.linspace(0.5, 1.5, len(idx)).astype(dtype) if weighted else None
    want = reference_table_batch(tables, idx, off, w, mode=mode)
    monkeypatch.setattr(E, "_STREAM_MIN_BYTES", 0)
    seen = _spy_streamed(monkeypatch, batch, dtype)
    out = lukern.empty_table(37, batch.total_dim, dtype)
    got = batch.lookup(idx, off, weights=w, mode=mode, out=out, driver=driver, n_threads=2, chunk_size=8)
    assert got is out and seen and all(seen), "the streamed path was not taken"
    np.testing.assert_allclose(got, want, **tol(dtype))
    # the same bits as the cached stores
    monkeypatch.setattr(E, "_STREAM_MIN_BYTES", 1 << 62)
    again = batch.lookup(idx, off, weights=w, mode=mode, driver=driver, n_threads=2, chunk_size=8)
    assert not seen[-1]
    assert np.array_equal(got, again)


def test_table_batch_streams_only_line_aligned_outputs(monkeypatch):
    import lukern.embedding as E

    monkeypatch.setattr(E, "_STREAM_MIN_BYTES", 0)
    # a width-8 float32 table (32 bytes) puts the next table's columns mid-line: no streaming
    tables, idx, off = _batch_problem(dims=(16, 8, 16), n_bags=11)
    batch = lukern.TableBatch(tables)
    seen = _spy_streamed(monkeypatch, batch, np.float32)
    np.testing.assert_allclose(batch.lookup(idx, off), reference_table_batch(tables, idx, off), **tol(np.float32))
    assert seen and not any(seen)
    # an output not aligned to a 64-byte line: no streaming either
    tables, idx, off = _batch_problem(dims=(16, 16), n_bags=11)
    batch = lukern.TableBatch(tables)
    seen = _spy_streamed(monkeypatch, batch, np.float32)
    raw = np.empty(11 * 32 + 32, np.float32)  # room for any start below
    start = (-raw.ctypes.data % 64) // 4 + 4  # 16 bytes past a line
    out = raw[start:start + 11 * 32].reshape(11, 32)
    np.testing.assert_allclose(batch.lookup(idx, off, out=out), reference_table_batch(tables, idx, off),
                               **tol(np.float32))
    assert seen and not any(seen)


def test_table_batch_weights_and_views_write_through():
    tables, idx, off = _batch_problem(dims=(16, 16))
    batch = lukern.TableBatch(tables)
    w = np.linspace(0.5, 1.5, len(idx)).astype(np.float32)
    np.testing.assert_allclose(batch.lookup(idx, off, weights=w), reference_table_batch(tables, idx, off, w),
                               rtol=1e-5, atol=1e-5)
    batch.tables[1][:] = 0  # views into the shared buffer
    assert np.array_equal(batch.lookup(idx, off)[:, 16:], np.zeros((23, 16), np.float32))


def test_table_batch_from_buffer_no_copy():
    buf = np.arange(40, dtype=np.float64).reshape(10, 4)
    batch = lukern.TableBatch.from_buffer(buf, [3, 7])
    assert batch.groups[0][1] is buf
    idx, off = batch.pack([np.array([2]), np.array([0])], [np.array([0, 1]), np.array([0, 1])])
    assert np.array_equal(batch.lookup(idx, off), np.concatenate([buf[2], buf[3]])[None])


def test_table_batch_bad_input():
    tables, idx, off = _batch_problem(dims=(16, 16))
    batch = lukern.TableBatch(tables)
    bad = idx.copy()
    bad[int(off[23]) + 0] = 60  # first id of table 1 (60 rows)
    with pytest.raises(IndexError, match=r"belongs to table 1 and must be in \[0, 60\)"):
        batch.lookup(bad, off)
    with pytest.raises(ValueError, match="n_tables \\* n_bags \\+ 1"):
        batch.lookup(idx[: int(off[-2])], off[:-1])
    with pytest.raises(TypeError, match="share one dtype"):
        lukern.TableBatch([np.ones((2, 4), np.float32), np.ones((2, 4), np.float64)])
    with pytest.raises(ValueError, match="at least one table"):
        lukern.TableBatch([])
    with pytest.raises(ValueError, match="same number of bags"):
        pack_batched([np.array([0]), np.array([], np.int64)], [np.array([0, 1]), np.array([0, 0, 0])])
    # one id list for a two-table batch: the layout alone would read it as 1 bag per table
    two = lukern.TableBatch([np.ones((5, 4), np.float32), np.ones((5, 2), np.float32)])
    with pytest.raises(ValueError, match="one id array per table of this batch \\(2\\); got 1"):
        two.pack([np.array([0, 1])], [np.array([0, 1, 2])])
    # a table's offsets that do not end at its own id count would shift ids into the next table
    with pytest.raises(ValueError, match="`offsets_list\\[0\\]` must run from 0 to len\\(indices_list\\[0\\]\\) = 2"):
        two.pack([np.array([0, 1]), np.array([3])], [np.array([0, 1]), np.array([0, 1])])
    with pytest.raises(TypeError, match="indices_list\\[1\\]"):
        two.pack([np.array([0]), np.array([1.0])], [np.array([0, 1]), np.array([0, 1])])
    # a decrease inside one table's offsets is one of the packed offsets: lookup() names it
    idx, off = two.pack([np.array([0, 1, 2]), np.array([3])], [np.array([0, 2, 1, 3]), np.array([0, 1, 1, 1])])
    with pytest.raises(ValueError, match="non-decreasing"):
        two.lookup(idx, off)


# --- compilation and code generation -----------------------------------------------------

def test_warmup_reports_what_it_compiled():
    report = lukern.warmup(dims=(16,), dtypes=("float32",), index_dtypes=("int64",), modes=("sum",),
                           drivers=("serial", "prange"))
    assert report["seconds"] >= 0
    assert "embedding_bag d=16 float32 int64 sum prange" in report["compiled"]
    assert "table_batch d=16 float32 int64 sum serial" in report["compiled"]
    assert "table_batch streamed d=16 float32 int64 sum prange" in report["compiled"]


def test_specialised_kernel_prefetches_and_vectorises_without_gathers():
    import numba

    from lukern._kernels._codegen import with_slp

    ks = K.bag_kernels(64, np.float32, False)
    # a fresh compile of the same generated source: a kernel loaded from numba's disk
    # cache carries no assembly to inspect
    fresh = with_slp(numba.njit(nogil=True)(ks.bag_range.py_func))
    p = make_lookup_problem(n_rows=100, dim=64, n_bags=3)
    out = np.empty((3, 64), np.float32)
    fresh(p.table, p.indices, p.offsets, np.empty(0, np.float32), False, 0, out, 0, 3)
    asm = fresh.inspect_asm(fresh.signatures[0])
    # rows are prefetched into L2 (prefetcht1), not L1: far more of them are then in flight
    assert "prefetcht1" in asm and "prefetcht0" not in asm
    assert re.search(r"vaddps\s+[^\n]*(zmm|ymm)", asm), "row accumulation is not vectorised"
    assert "gather" not in asm, "AVX-512 gathers are 2.5x slower than prefetch + loads here"
    assert ks.specialised


def test_slp_switch_does_not_leak_into_numba_config():
    import numba

    before = numba.config.SLP_VECTORIZE
    K._bag_kernels.cache_clear()
    K._KERNEL_SETS.clear()
    p = make_lookup_problem(n_rows=10, dim=8, n_bags=2)
    lukern.embedding_bag(p.table, p.indices, p.offsets, driver="serial")
    assert numba.config.SLP_VECTORIZE == before


def test_empty_table_alignment_and_errors():
    small = lukern.empty_table(10, 16)
    big = lukern.empty_table(1 << 16, 16)  # 4 MiB: huge-page aligned
    assert small.shape == (10, 16) and small.dtype == np.float32 and small.flags.c_contiguous
    assert small.ctypes.data % 64 == 0 and big.ctypes.data % (2 << 20) == 0
    assert lukern.empty_table(3, 4, np.float64, align=4096).ctypes.data % 4096 == 0
    with pytest.raises(ValueError, match="power of two"):
        lukern.empty_table(3, 4, align=48)
    with pytest.raises(ValueError, match="`dim` >= 1"):
        lukern.empty_table(3, 0)


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_concurrent_prange_lookups_do_not_abort_on_any_layer(layer, tmp_path):
    """numba's workqueue layer aborts the process when two threads launch parallel
    kernels at once; lukern's guard must prevent that (and stay out of the way on omp)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "two_threads.py"
    script.write_text(
        "import threading, numpy as np, numba, lukern\n"
        "from lukern.testing import make_lookup_problem\n"
        "p = make_lookup_problem(n_rows=5000, dim=16, n_bags=256, pooling=(5, 20))\n"
        "ref = lukern.embedding_bag(p.table, p.indices, p.offsets, driver='serial')\n"
        "bad = []\n"
        "def run():\n"
        "    for _ in range(200):\n"
        "        o = lukern.embedding_bag(p.table, p.indices, p.offsets, driver='prange', n_threads=2, chunk_size=8)\n"
        "        bad.append(not np.array_equal(o, ref))\n"
        "ts = [threading.Thread(target=run) for _ in range(2)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(numba.threading_layer(), sum(bad))\n"
    )
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([str(__import__("pathlib").Path(lukern.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    if layer == "omp" and res.returncode != 0 and "omp" in res.stderr.lower() and "not" in res.stderr.lower():
        pytest.skip("the omp threading layer is not available here")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [layer, "0"]
