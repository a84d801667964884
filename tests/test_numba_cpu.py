"""Tests of what is the Numba CPU backend's own (``fastbn.backends.numba_cpu``).

The properties every backend has (float64 reference, thread-count
invariance, constant channels and NaN isolation, a large mean, read-only
inputs, running statistics and the evaluation kernels) are in
``test_contract.py``, over this backend's shape classes and work splits.
Here: which loop shape and work split a shape takes, the threading layer
and concurrent calls, fused columns, the 16-bit conversions (F16C and
integer paths, and the kernels compiled without F16C), and numba's on-disk
cache. The 16-bit kernels' error bounds and the fused ReLU are contract
properties (``test_contract.py``).
"""
import concurrent.futures

import numpy as np
import pytest
from conftest import make_kernel_case
from contract_support import NumbaCpu

numba = pytest.importorskip("numba")
nb = pytest.importorskip("fastbn.backends.numba_cpu")

if not nb.availability()[0]:
    pytest.skip(f"numba backend unavailable: {nb.availability()[1]}", allow_module_level=True)

EPS = 1e-5

# (A, C, B) shapes, one per loop shape / work split (the contract suite's)
SHAPES = {name: NumbaCpu.shapes[name] for name in NumbaCpu.properties["reference"]}


make = make_kernel_case


def test_shapes_cover_every_work_split():
    for name in ("cols_B1", "cols_fused", "cols_smallB"):
        assert not nb._uses_rows(SHAPES[name]) and not nb._reduces_by_rows(SHAPES[name])
    assert nb._fuses_cols(SHAPES["cols_fused"]) and not nb._fuses_cols(SHAPES["cols_B1"])
    assert nb._row_blocks(261, 1100) > 1 and 1100 > nb.COLUMN_BLOCK
    A, C, B = SHAPES["mixed_B49"]
    assert nb._uses_rows(SHAPES["mixed_B49"]) and not nb._reduces_by_rows(SHAPES["mixed_B49"])
    assert C * B > nb.COLUMN_BLOCK and nb.COLUMN_BLOCK % B != 0
    for name in ("rows_largeC", "rows_smallC", "rows_partial"):
        assert nb._uses_rows(SHAPES[name]) and nb._reduces_by_rows(SHAPES[name])
    assert nb._chunks_per_channel(SHAPES["rows_largeC"]) == 1
    assert nb._chunks_per_channel(SHAPES["rows_smallC"]) > 1
    A, C, B = SHAPES["rows_partial"]
    k = nb._chunks_per_channel(SHAPES["rows_partial"])
    assert k > 1 and (A * B) % k != 0


def _run_all(x, dy, gamma, beta):
    out = np.empty_like(x)
    mean, invstd = nb.forward_train(x, gamma, beta, EPS, out)
    dx = np.empty_like(x)
    sums = nb.backward_train(dy, x, mean, invstd, gamma, dx)
    dxs = np.empty_like(x)
    staged = nb.backward_staged(dy, x, mean, invstd, gamma, EPS, dxs)
    return [mean, invstd, out, dx, *sums, dxs, *staged]


def test_concurrent_calls_match_serial_calls():
    shapes = [SHAPES["rows_largeC"], SHAPES["cols_B1"], SHAPES["rows_smallC"], SHAPES["cols_smallB"]] * 2
    inputs = [make(s, np.float64, seed=10 + i) for i, s in enumerate(shapes)]
    serial = [_run_all(*args) for args in inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            concurrent_results = list(pool.map(lambda args: _run_all(*args), inputs))
            for ser, con in zip(serial, concurrent_results):
                for a, b in zip(ser, con):
                    np.testing.assert_array_equal(a, b)


def test_info_reports_the_threading_layer():
    info = nb.info()
    assert info["threads"] == numba.get_num_threads()
    assert info["threading_layer"] in ("omp", "tbb", "workqueue")
    assert info["openmp"] == (info["threading_layer"] == "omp")


_WORKQUEUE_SCRIPT = r"""
import concurrent.futures, numpy as np, numba
from fastbn.backends import numba_cpu as nb
assert nb.info()["threading_layer"] == "workqueue", nb.info()
rng = np.random.default_rng(0)
inputs = [rng.standard_normal(s) for s in [(5, 70, 33), (261, 600, 1)] * 3]
def run(x):
    out = np.empty_like(x)
    nb.forward_train(x, np.ones(x.shape[1]), np.zeros(x.shape[1]), 1e-5, out)
    return out
serial = [run(x) for x in inputs]
with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    for _ in range(3):
        for a, b in zip(serial, pool.map(run, inputs)):
            assert np.array_equal(a, b)
assert numba.threading_layer() == "workqueue"
print("ok")
"""


def test_workqueue_layer_serializes_concurrent_calls():
    """With the workqueue layer forced, concurrent calls go through the lock."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run([sys.executable, "-c", _WORKQUEUE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_columns_kernels_match_two_pass_bitwise(dtype, monkeypatch):
    """(N, D) fused per column block gives the two-pass results (the same sums
    in the same order; LLVM may contract a multiply-add differently inside
    the two kernels, hence a rounding-level tolerance)."""
    x, dy, gamma, beta = make(SHAPES["cols_fused"], dtype, seed=12)
    results = {}
    for fused_cols in (False, True):
        monkeypatch.setattr(nb, "FUSED_COLS", fused_cols)
        assert nb._fuses_cols(x.shape) == fused_cols
        rm, rv = np.zeros(x.shape[1]), np.ones(x.shape[1])
        out = np.empty_like(x)
        mean, invstd = nb.forward_train(x, gamma, beta, EPS, out, rm, rv, 0.1)
        dx = np.empty_like(x)
        sums = nb.backward_train(dy, x, mean, invstd, gamma, dx)
        results[fused_cols] = [mean, invstd, out, rm, rv, dx, *sums]
    for a, b in zip(results[False], results[True]):
        # dx near 0 is a cancellation of terms of order max|dx|: absolute slack there
        rtol = 1e-14 if a.dtype == np.float64 else 1e-6
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))))


def test_fused_columns_width_changes_no_result(monkeypatch):
    """Each channel is summed alone over all rows: the block width of the fused
    (N, D) kernels changes speed, never results."""
    x, dy, gamma, beta = make((100, 2000, 1), np.float32, seed=13)
    results = []
    for nbytes in (0, 1 << 30):
        monkeypatch.setattr(nb, "FUSED_COLS_BYTES", nbytes)
        out = np.empty_like(x)
        mean, invstd = nb.forward_train(x, gamma, beta, EPS, out)
        dx = np.empty_like(x)
        sums = nb.backward_train(dy, x, mean, invstd, gamma, dx)
        results.append([mean, invstd, out, dx, *sums])
    assert nb._fuses_cols(x.shape)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def _misaligned(shape, dtype, offset=None):
    """An empty C-contiguous array that starts ``offset`` bytes (default: one
    element) past an allocation, so that its rows start at every offset
    within a cache line; an offset that is not a multiple of the item size
    gives an unaligned array (NumPy's flags.aligned False)."""
    dtype = np.dtype(dtype)
    offset = dtype.itemsize if offset is None else offset
    count = int(np.prod(shape))
    raw = np.empty(count * dtype.itemsize + offset, np.uint8)
    return np.frombuffer(raw.data, dtype, count, offset).reshape(shape)


def _run_plan(pass_name, plan, x, dy, gamma, beta, offset=None):
    """A pass of the numba backend under ``plan``: its output (``offset``
    bytes into an allocation, see :func:`_misaligned`) and returns."""
    from fastbn import plans

    key = plans.call_class(x.shape, x.dtype.name, pass_name, x.itemsize)
    out = _misaligned(x.shape, x.dtype, offset)
    C = x.shape[1]
    with plans.forced("numba", key, plan):
        if pass_name == "forward":
            returned = nb.forward_train(x, gamma, beta, EPS, out)
        elif pass_name == "eval":
            returned = nb.forward_eval(x, gamma, beta, np.zeros(C), np.ones(C), EPS, out)
        else:
            returned = nb.backward_train(dy, x, np.full(C, 5.0), np.full(C, 0.3), gamma, out)
    return [out, *returned]


@pytest.mark.parametrize("offset", [None, 1], ids=["element", "byte"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_streaming_stores_write_what_plain_stores_write(dtype, offset):
    """Every plan that writes whole rows computes the same values with
    streaming stores (whole cache lines through a one-line buffer, plain
    stores at the rows' ends), on rows shorter than a line, of a few lines
    and of many, starting anywhere in a line, and on arrays whose elements
    are not aligned to their size (one byte into an allocation: nothing is
    streamed there, and nothing faults). Both compute the same op on the
    same values; LLVM may contract a multiply-add differently in the two
    loops (one rounding of the compute type), then one rounding to storage."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    storage = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    compute_eps = 2.0**-52 if storage.itemsize >= 4 else 2.0**-23
    storage_eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23,
                   "float64": 2.0**-52}[dtype]
    for B in (5, 16, 17, 33, 100, 1100):
        x0, dy0, gamma, beta = make((3, 5, B), np.float32, seed=B)
        x, dy = _misaligned(x0.shape, storage, offset), _misaligned(x0.shape, storage, offset)
        x[...], dy[...] = x0.astype(storage), dy0.astype(storage)
        for pass_name in ("forward", "eval", "backward"):
            for plan in nb.plan_candidates(x.shape, x.itemsize, pass_name):
                if plan.get("stores") != "streaming":
                    continue
                got = _run_plan(pass_name, plan, x, dy, gamma, beta, offset)
                want = _run_plan(pass_name, {**plan, "stores": "cached"}, x, dy, gamma, beta,
                                 offset)
                for a, b in zip(got, want):
                    a, b = a.astype(np.float64), b.astype(np.float64)
                    slack = 8 * compute_eps * float(np.max(np.abs(b)))
                    np.testing.assert_allclose(a, b, rtol=storage_eps, atol=slack,
                                               err_msg=f"{dtype} B={B} {pass_name} {plan}")


def test_streaming_stores_are_the_default_beyond_the_last_level_cache(monkeypatch):
    """float32 and float64 outputs of at least STREAM_MIN_BYTES, written whole
    rows of at least STREAM_MIN_ROW_BYTES at a time, stream by default;
    smaller ones, shorter rows, 16-bit ones and the columns loop shape do
    not."""
    monkeypatch.setattr(nb, "STREAM_MIN_BYTES", 8 * 64 * 2000 * 4)   # rows, float32
    monkeypatch.setattr(nb, "FUSED_MIN_BYTES", 2**62)
    rows, columns = (8, 64, 2000), (2000, 64, 8)
    for pass_name in ("forward", "eval", "backward"):
        assert nb.default_plan(rows, 4, pass_name)["stores"] == "streaming"
        assert nb.default_plan(rows, 8, pass_name)["stores"] == "streaming"
        assert nb.default_plan(rows, 2, pass_name)["stores"] == "cached"
        assert nb.default_plan((4, 64, 2000), 4, pass_name)["stores"] == "cached"
        assert nb.default_plan((32, 64, 500), 4, pass_name)["stores"] == "cached"   # 2000 B rows
        assert "stores" not in nb.default_plan(columns, 4, pass_name)
        assert any(plan.get("stores") == "streaming"
                   for plan in nb.plan_candidates(columns, 4, pass_name))   # its rows plans
    monkeypatch.setattr(nb, "FUSED_MIN_BYTES", 0)
    assert nb.default_plan(rows, 4, "forward") == {
        "strategy": "fused", "slab_bytes": nb.FUSED_SLAB_BYTES, "stores": "streaming"}


# ---------------------------------------------------------------------------
# 16-bit storage: conversion helpers, kernels, fused ReLU
# ---------------------------------------------------------------------------

ml_dtypes = pytest.importorskip("ml_dtypes")

ALL_BITS = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def _float32_probes():
    """float32 values that exercise a 16-bit store: every float16/bfloat16 value,
    the midpoints between neighbours (ties), a hair either side of them,
    overflow, subnormals, and random bit patterns (NaN included)."""
    rng = np.random.default_rng(20)
    f16 = ALL_BITS.view(np.float16).astype(np.float32)
    bf16 = (ALL_BITS.astype(np.uint32) << 16).view(np.float32)
    parts = [f16, bf16, rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32).view(np.float32)]
    for grid in (f16, bf16):
        finite = np.sort(np.unique(grid[np.isfinite(grid)]))
        mid = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
        parts += [mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))]
    parts.append(np.array([65504, 65519.99, 65520, 65536, 1e30, -65520, 2.0**-25, 2.0**-26,
                           3 * 2.0**-26, 1e-45, -1e-45, np.inf, -np.inf], dtype=np.float32))
    return np.concatenate(parts)


def _elementwise(convert):
    """A compiled loop applying one of the module's scalar conversions."""
    @numba.njit
    def run(values, out):
        for i in range(values.shape[0]):
            out[i] = convert(values[i])
    return run


def _load_all(convert, bits, out):
    _elementwise(convert)(bits, out)


_store_all = _load_all


def _assert_same_floats(got, want):
    """Bit-identical except that a NaN need only be a NaN."""
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _assert_same_bits(got, want, dtype):
    nan = np.isnan(want.view(dtype).astype(np.float32))
    assert np.all(np.isnan(got[nan].view(dtype).astype(np.float32)))
    assert np.array_equal(got[~nan], want[~nan])


@pytest.mark.parametrize("path", ["f16c", "soft"])
def test_float16_load_is_exact_for_every_bit_pattern(path):
    if path == "f16c" and not nb._F16C:
        pytest.skip("numba compiles for a CPU without F16C here")
    convert = nb._half_to_f32_f16c if path == "f16c" else nb._half_to_f32_soft
    out = np.empty(65536, np.float32)
    _load_all(convert, ALL_BITS, out)
    _assert_same_floats(out, ALL_BITS.view(np.float16).astype(np.float32))


@pytest.mark.parametrize("path", ["f16c", "soft"])
def test_float16_store_rounds_to_nearest_even_like_numpy(path):
    if path == "f16c" and not nb._F16C:
        pytest.skip("numba compiles for a CPU without F16C here")
    convert = nb._f32_to_half_f16c if path == "f16c" else nb._f32_to_half_soft
    values = _float32_probes()
    out = np.empty(values.shape[0], np.uint16)
    _store_all(convert, values, out)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.uint16)
    _assert_same_bits(out, want, np.float16)


def test_bfloat16_load_and_store_match_ml_dtypes():
    out = np.empty(65536, np.float32)
    _load_all(nb._bf16_to_f32, ALL_BITS.view(np.int16), out)
    _assert_same_floats(out, ALL_BITS.view(ml_dtypes.bfloat16).astype(np.float32))
    values = _float32_probes()
    stored = np.empty(values.shape[0], np.int16)
    _store_all(nb._f32_to_bf16, values, stored)
    with np.errstate(invalid="ignore", over="ignore"):
        want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    _assert_same_bits(stored.view(np.uint16), want, ml_dtypes.bfloat16)


def test_storage_views_are_zero_copy():
    x16 = np.zeros((2, 3, 4), np.float16)
    xb = np.zeros((2, 3, 4), ml_dtypes.bfloat16)
    assert nb._storage(x16).dtype == np.uint16 and np.shares_memory(nb._storage(x16), x16)
    assert nb._storage(xb).dtype == np.int16 and np.shares_memory(nb._storage(xb), xb)
    x32 = np.zeros((2, 3, 4), np.float32)
    assert nb._storage(x32) is x32


def _ordinal(values16):
    """16-bit values as integers in their order (+0 and -0 both 0)."""
    bits = np.ascontiguousarray(values16).view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits & 0x7FFF)


_GENERIC_CPU_SCRIPT = r"""
import numpy as np
from fastbn.backends import numba_cpu as nb
assert not nb._F16C
rng = np.random.default_rng(0)
x = (3 * rng.standard_normal((6, 5, 40)) + 1).astype(np.float16)
dy = rng.standard_normal((6, 5, 40)).astype(np.float16)
g, b = np.ones(5), np.full(5, 0.25)
out = np.empty_like(x)
mean, invstd = nb.forward_train(x, g, b, 1e-5, out, relu=True)
dx = np.empty_like(x)
sums = nb.backward_train(dy, x, mean, invstd, g, dx, beta=b, relu=True)
np.save(OUT, np.concatenate([out.view(np.uint16).ravel().astype(np.float64),
                             dx.view(np.uint16).ravel().astype(np.float64), mean, invstd, *sums]))
"""


def test_float16_without_f16c_compiles_the_integer_conversions(tmp_path):
    """numba compiling for a generic x86-64 (no F16C: LLVM would call a runtime
    library for half conversions) takes the integer path, in its own cache, and
    gives the results of the F16C path (within one rounding: no FMA there)."""
    import os
    import platform
    import subprocess
    import sys
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    path = tmp_path / "generic.npy"
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("NUMBA_CPU_FEATURES", None)    # a generic CPU's features, not the caller's target's
    script = f"OUT = {str(path)!r}\n" + _GENERIC_CPU_SCRIPT
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    generic = np.load(path)
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((6, 5, 40)) + 1).astype(np.float16)
    dy = rng.standard_normal((6, 5, 40)).astype(np.float16)
    g, b = np.ones(5), np.full(5, 0.25)
    out = np.empty_like(x)
    mean, invstd = nb.forward_train(x, g, b, 1e-5, out, relu=True)
    dx = np.empty_like(x)
    sums = nb.backward_train(dy, x, mean, invstd, g, dx, beta=b, relu=True)
    n = x.size
    got_out = generic[:n].astype(np.uint16).view(np.float16).astype(np.float64)
    got_dx = generic[n:2 * n].astype(np.uint16).view(np.float16).astype(np.float64)
    assert nb._serial(x)
    np.testing.assert_allclose(generic[2 * n:], np.concatenate([mean, invstd, *sums]),
                               rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(_ordinal(got_out.astype(np.float16)) - _ordinal(out.ravel()))) <= 1
    assert np.max(np.abs(_ordinal(got_dx.astype(np.float16)) - _ordinal(dx.ravel()))) <= 1


def test_threading_layer_starts_before_the_first_parallel_kernel(tmp_path):
    """numba 0.68 can write a cached kernel without its hook that starts the
    threading layer (a kernel whose parallel loops are in functions compiled
    earlier in the writing process); loaded first in a new process, it crashed.
    The backend starts the layer itself before its first parallel kernel."""
    import os
    import subprocess
    import sys
    script = (
        "import numpy as np\n"
        "from fastbn.backends import numba_cpu as nb\n"
        "assert not nb._layer_initialized()\n"
        "with nb._guard():\n"     # what every parallel kernel call enters first
        "    assert nb._layer_initialized()\n"
        "x = np.ones((4, 8, nb.SERIAL_BELOW))\n"
        "assert np.array_equal(nb.stats(x)[0], np.ones(8))\n"
        "print('started', nb.numba.threading_layer())\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("started ")


_CACHE_SCRIPT = r"""
import json
import numpy as np
from numba.core.dispatcher import Dispatcher
from fastbn.backends import numba_cpu as nb
from fastbn.backends.numba_cpu import _loadstore, _loops, _ops, _small

rng = np.random.default_rng(0)
# serial, rows, rows split in chunks, mixed (7x7), columns, fused columns, fused rows
cases = [((4, 8, 5), False), ((3, 70, 300), False), ((3, 2, 50000), False),
         ((9, 30, 49), False), ((261, 1100, 1), False), ((100, 600, 1), False),
         ((3, 70, 300), True)]
for shape, fuse_rows in cases:
    nb.FUSED_MIN_BYTES = 0 if fuse_rows else 2**62
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    g, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    out = np.empty_like(x)
    nb.stats(x)
    for relu in (False, True):
        fused = {"beta": b, "relu": True} if relu else {}
        mean, invstd = nb.forward_train(x, g, b, 1e-5, out, relu=relu)
        nb.forward_eval(x, g, b, mean, np.ones(shape[1]), 1e-5, out, relu=relu)
        nb.normalize(x, mean, invstd, g, b, out, relu=relu)
        sums = nb.backward_reduce(dy, x, mean, invstd, *((g, b, True) if relu else ()))
        nb.backward_elemt(dy, x, mean, invstd, g, *sums, out, **fused)
        nb.backward_train(dy, x, mean, invstd, g, out, **fused)
        nb.backward_eval(dy, x, mean, invstd, g, out, **fused)
        nb.backward_staged(dy, x, mean, invstd, g, 1e-5, out, **fused)
# the address entry points (compiled or loaded by serial_entry)
for pass_name in ("forward", "eval", "backward", "backward_eval"):
    for relu in (False, True):
        assert nb.serial_entry((4, 8, 5), np.dtype(np.float64), pass_name, relu) is not None

found = {}
for module in (_loadstore, _ops, _loops, _small):
    for value in vars(module).values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Dispatcher):
                found[id(item)] = item
hits = sum(sum(d.stats.cache_hits.values()) for d in found.values())
missed = [d.py_func.__qualname__ for d in found.values() if d.stats.cache_misses]
misses = sum(sum(d.stats.cache_misses.values()) for d in found.values())
print(json.dumps({"hits": hits, "misses": misses, "missed": missed}))
"""


@pytest.mark.slow
def test_kernels_load_from_the_disk_cache_in_a_new_process(tmp_path):
    """Every kernel is cached on disk, those the loop-shape factories build
    included (numba keys a closure's cache on the pickled contents of its
    cells): a second process running the same calls loads its kernels from
    the cache the first one wrote and compiles none. (It loads fewer than the
    first compiled: a kernel compiled only into its callers is not loaded on
    its own.)"""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.splitlines()[-1]))
    first, second = runs
    assert first["hits"] == 0 and first["misses"] > 0
    assert second["misses"] == 0, second["missed"]
    assert second["hits"] > 0


# Runs the `rows` kernels of the ops named in argv[2], in that order, on one
# case, and saves each kernel's output to argv[1] (.npz).
_OPS_SCRIPT = r"""
import sys
import numpy as np
from fastbn.backends.numba_cpu import _loops

rng = np.random.default_rng(0)
u, v = rng.standard_normal((2, 3, 4, 50)).astype(np.float32)
params = list(rng.standard_normal((6, 4)))
outputs = {}
for name in sys.argv[2].split(","):
    out = np.empty_like(u)
    getattr(_loops, name).rows(u, v, *params, None, out)
    outputs[name] = out
np.savez(sys.argv[1], **outputs)
"""


def test_kernels_compiled_by_different_processes_load_side_by_side(tmp_path):
    """Two processes share one disk cache, and each compiles a different
    op's kernel first (so that numba numbers their pieces alike). A third
    loads both from the cache: each must still run its own op. The pieces
    the factories make carry the op's name in their symbols; without it, the
    third process ran the first op's body in both kernels."""
    import os
    import subprocess
    import sys
    # one hash seed: the three processes then number what they compile alike
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONHASHSEED="0")

    def run(path, names):
        proc = subprocess.run([sys.executable, "-c", _OPS_SCRIPT, str(path), names], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return np.load(path)

    alone = {name: run(tmp_path / f"{name}.npz", name)[name] for name in ("AFFINE", "COMBINE")}
    together = run(tmp_path / "both.npz", "AFFINE,COMBINE")
    assert not np.array_equal(alone["AFFINE"], alone["COMBINE"])
    for name, out in alone.items():
        np.testing.assert_array_equal(together[name], out, err_msg=name)
