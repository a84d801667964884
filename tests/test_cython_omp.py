"""Tests specific to the Cython + OpenMP backend (``backend="cython"``).

What every backend must do is tested for this one elsewhere: the kernel
contract (float64 reference, thread-count invariance, accuracy corner cases,
read-only inputs, running statistics, the evaluation kernels, availability
and info) in ``test_contract.py`` over this backend's shape classes, the
public API against the numpy backend in ``test_reference_parity.py``. Here,
what is this backend's own: the OpenMP build and the message of an
uncompiled source tree, the thread count (read at every call; several
Python threads at once, with numba's), the compile-time choice of fused or
unfused kernels (bit for bit the same results), the float16 conversions
(F16C and portable, the same bits from either), the 16-bit and fused-ReLU
results' independence of the thread count and of fusion, and the choice of
instruction-set variant at import. The 16-bit kernels' error bounds and the
fused ReLU's equality with separate passes are contract properties.

``test_built_with_openmp`` fails when the extension is missing or was built
without OpenMP (that is how CI learns the build is broken), unless the
environment variable ``FASTBN_SKIP_OPENMP_TEST`` is set. Every other test is
skipped when the extension is not built.
"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn
from conftest import make_kernel_case
from contract_support import CythonOmp
from fastbn import machine
from fastbn.backends import cython_omp

AVAILABLE, REASON = cython_omp.availability()
needs_extension = pytest.mark.skipif(not AVAILABLE, reason=REASON)

EPS = 1e-5


def test_built_with_openmp():
    if os.environ.get("FASTBN_SKIP_OPENMP_TEST"):
        pytest.skip("FASTBN_SKIP_OPENMP_TEST is set")
    assert AVAILABLE, f"the cython extension is not usable: {REASON}"
    info = cython_omp.info()
    assert info["openmp"] is True, (
        "the cython extension was built without OpenMP; install a compiler "
        "with OpenMP support (or set FASTBN_SKIP_OPENMP_TEST=1 to accept a serial build)")
    assert info["threads"] >= 1
    assert info["device"] == "cpu"


make_case = make_kernel_case


# The cache-dependent block sizes the shapes were sized for (see contract_support).
PINNED_TUNING = CythonOmp.PINNED_TUNING


@pytest.fixture(autouse=True)
def pinned_cache_tuning():
    if not AVAILABLE:
        yield
        return
    ext = cython_omp._ext
    chosen = ext.cache_tuning()
    ext.set_cache_tuning(**PINNED_TUNING)
    try:
        yield
    finally:
        ext.set_cache_tuning(**chosen)


# Shapes covering both loop shapes, fused and split channel paths, chunked
# channels, column blocks and the single-thread fallback (the contract suite's).
SHAPES = {name: CythonOmp.shapes[name] for name in CythonOmp.properties["reference"]}


# ---------------------------------------------------------------------------
# Fused and unfused kernels; the thread count
# ---------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["rows_B1_large_C", "rows_B1_fused", "channels_fused",
                                  "channels_split", "channels_small_B"])
def test_fused_and_unfused_kernels_agree_bitwise(name, dtype):
    # forward_train / backward_train (fused where the shape allows) sum in
    # the same chunks and order as stats / backward_reduce (never fused).
    x, dy, gamma, beta = make_case(SHAPES[name], dtype, seed=5)
    mean, var = cython_omp.stats(x)
    y = np.empty_like(x)
    mean_f, invstd_f = cython_omp.forward_train(x, gamma, beta, EPS, y)
    invstd = 1.0 / np.sqrt(var + EPS)
    assert np.array_equal(mean, mean_f) and np.array_equal(invstd, invstd_f)
    sums = cython_omp.backward_reduce(dy, x, mean, invstd)
    dx = np.empty_like(x)
    sums_f = cython_omp.backward_train(dy, x, mean, invstd, gamma, dx)
    assert np.array_equal(sums[0], sums_f[0]) and np.array_equal(sums[1], sums_f[1])
    dx_elemt = np.empty_like(x)
    cython_omp.backward_elemt(dy, x, mean, invstd, gamma, *sums, dx_elemt)
    assert np.array_equal(dx, dx_elemt)


@needs_extension
def test_thread_count_read_at_every_call():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not cython_omp.info()["openmp"]:
        pytest.skip("built without OpenMP")
    before = cython_omp.info()["threads"]
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert cython_omp.info()["threads"] == 1
    assert cython_omp.info()["threads"] == before


# ---------------------------------------------------------------------------
# numba and cython from several Python threads at once
# ---------------------------------------------------------------------------

def _numba_backend():
    try:
        from fastbn.backends import numba_cpu
    except Exception:
        return None
    try:
        available, _ = numba_cpu.availability()
    except Exception:
        return None
    return numba_cpu if available else None


@needs_extension
def test_numba_and_cython_from_several_python_threads():
    backends = [cython_omp]
    numba_cpu = _numba_backend()
    if numba_cpu is not None:
        backends.append(numba_cpu)
    cases = [make_case(shape, dtype, seed=i) for i, (shape, dtype) in enumerate(
        [((8, 64, 3200), np.float64), ((256, 300, 1), np.float32), ((3, 2, 20001), np.float64)])]
    # serial results first
    expected = {}
    for b_index, backend in enumerate(backends):
        for c_index, (x, dy, gamma, beta) in enumerate(cases):
            y = np.empty_like(x)
            mean, invstd = backend.forward_train(x, gamma, beta, EPS, y)
            dx = np.empty_like(x)
            sums = backend.backward_train(dy, x, mean, invstd, gamma, dx)
            expected[b_index, c_index] = (y, dx, np.asarray(sums[0]), np.asarray(sums[1]))
    errors = []

    def worker(b_index, c_index):
        backend = backends[b_index]
        x, dy, gamma, beta = cases[c_index]
        try:
            for _ in range(4):
                y = np.empty_like(x)
                mean, invstd = backend.forward_train(x, gamma, beta, EPS, y)
                dx = np.empty_like(x)
                sums = backend.backward_train(dy, x, mean, invstd, gamma, dx)
                y_ref, dx_ref, s0, s1 = expected[b_index, c_index]
                np.testing.assert_array_equal(y, y_ref)
                np.testing.assert_array_equal(dx, dx_ref)
                np.testing.assert_array_equal(np.asarray(sums[0]), s0)
                np.testing.assert_array_equal(np.asarray(sums[1]), s1)
        except Exception as exc:  # reported in the main thread
            errors.append(f"{backend.__name__} case {c_index}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(b, c))
               for b in range(len(backends)) for c in range(len(cases)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_source_tree_says_why_the_extension_is_missing(tmp_path):
    """Imported from an uncompiled source tree, the backend says so, and
    available_backends() warns once."""
    import pathlib
    import shutil
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    shutil.copytree(root / "fastbn", tmp_path / "fastbn",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    code = (
        "import sys, warnings\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import fastbn\n"
        "from fastbn.backends import cython_omp\n"
        "assert cython_omp.__file__.startswith(sys.path[0]), cython_omp.__file__\n"
        "print(cython_omp.availability()[1])\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    names = fastbn.available_backends()\n"
        "    fastbn.available_backends()\n"
        "print('cython' in names, len(caught), caught[0].message if caught else '')\n"
        "print(fastbn.backend_info()['cython']['reason'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reason, warned, info_reason = proc.stdout.strip().splitlines()
    assert reason.startswith("extension not built: this fastbn is imported from a source tree")
    assert str(tmp_path) in reason and "pip install ." in reason
    assert warned.startswith("False 1 ") and "source tree" in warned
    assert info_reason == reason


# ---------------------------------------------------------------------------
# 16-bit storage (float16, bfloat16) and the fused ReLU
# ---------------------------------------------------------------------------

def _bfloat16():
    return pytest.importorskip("ml_dtypes").bfloat16


def _ext():
    from fastbn.backends import cython_omp
    return cython_omp._ext      # the instruction-set variant loaded


@pytest.fixture(params=["f16c", "portable"])
def f16_path(request):
    """Run a test with the F16C float16 conversions, then with the portable ones."""
    ext = _ext()
    if request.param == "f16c" and not (ext.f16c_info()["compiled"] and ext.f16c_info()["cpu"]):
        pytest.skip("no F16C path on this build or CPU")
    ext._use_f16c(request.param == "f16c")
    yield request.param
    ext._use_f16c(True)


def _same_or_both_nan(actual, expected):
    """Bit-equal 32-bit values, or NaN where the expected value is NaN."""
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(actual), nan)
    assert np.array_equal(actual[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def _float32_rounding_cases():
    """float32 values that exercise every float16 / bfloat16 rounding case: each
    16-bit value, the midpoints between neighbours (ties), one float32 ulp either
    side of them, overflow, subnormals, zeros, infinities and random bits."""
    rng = np.random.default_rng(0)
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = (halves[:-1] + halves[1:]) / 2               # exact in float32
    mids = np.concatenate([mids, [65504 + 8.0, 65520.0 * 2]]).astype(np.float32)
    around = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)),
                             np.nextafter(mids, np.float32(0))])
    special = np.array([0.0, 2.0 ** -25, 2.0 ** -24, 3 * 2.0 ** -26, 2.0 ** -14, 65504.0,
                        65519.99, 65520.0, 1e6, 3.4e38, np.inf, 1e-40, 2.0 ** -126],
                       dtype=np.float32)
    random_bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    bf16_ties = (rng.integers(0, 2 ** 16, 20_000, dtype=np.uint32) << 16) | 0x8000
    values = np.concatenate([around, special, random_bits.view(np.float32),
                             bf16_ties.view(np.float32)])
    return np.concatenate([values, -values])


@needs_extension
def test_float16_loads_every_bit_pattern_exactly(f16_path):
    bits = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    as_float = cython_omp._ext.to_float32(bits.view(np.float16))
    _same_or_both_nan(as_float, bits.view(np.float16).astype(np.float32))
    # and back: every non-NaN pattern round-trips, NaN stays NaN
    back = np.empty(bits.shape, dtype=np.float16)
    cython_omp._ext.from_float32(as_float, back)
    nan = np.isnan(as_float)
    assert np.array_equal(back.view(np.uint16)[~nan], bits[~nan])
    assert np.isnan(back[nan]).all()


@needs_extension
def test_float16_store_rounds_to_nearest_even(f16_path):
    values = _float32_rounding_cases()
    out = np.empty(values.shape, dtype=np.float16)
    cython_omp._ext.from_float32(values, out)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)            # NumPy rounds to nearest even
    nan = np.isnan(values)
    assert np.isnan(out[nan]).all()
    assert np.array_equal(out.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])


@needs_extension
def test_portable_float16_helpers_match_numpy():
    # The portable conversions directly (without the F16C dispatch).
    bits = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    as_float, back = _ext()._f16_soft_roundtrip(bits)
    _same_or_both_nan(as_float, bits.view(np.float16).astype(np.float32))
    nan = np.isnan(as_float)
    assert np.array_equal(back[~nan], bits[~nan])
    values = _float32_rounding_cases()
    rounded = _ext()._f16_soft_round(values)
    finite = ~np.isnan(values)
    with np.errstate(over="ignore"):
        expected = values[finite].astype(np.float16)
    assert np.array_equal(rounded[finite], expected.view(np.uint16))
    assert np.isnan(rounded[~finite].view(np.float16)).all()


@needs_extension
def test_bfloat16_loads_and_stores_match_ml_dtypes():
    bfloat16 = _bfloat16()
    bits = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    as_float = cython_omp._ext.to_float32(bits.view(bfloat16))
    _same_or_both_nan(as_float, bits.view(bfloat16).astype(np.float32))
    values = _float32_rounding_cases()
    out = np.empty(values.shape, dtype=bfloat16)
    cython_omp._ext.from_float32(values, out)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(bfloat16)              # ml_dtypes: nearest even
    nan = np.isnan(values)
    assert np.isnan(out[nan].astype(np.float32)).all()
    assert np.array_equal(out.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])


def _half_dtypes():
    return [np.float16, "bfloat16"]


def _as_dtype(name):
    return _bfloat16() if name == "bfloat16" else np.dtype(name).type


def _half_case(shape, dtype, seed=0):
    """16-bit x and dy, float32-valued gamma/beta (float64 arrays); channel 0 has
    mean 1e3 x its std."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    std = rng.uniform(0.5, 2.0, channels)
    mean = rng.normal(0.0, 1.0, channels)
    mean[0] = 1e3 * std[0]
    x = (rng.standard_normal(shape) * std[None, :, None] + mean[None, :, None]).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32).astype(np.float64)
    beta = rng.normal(0.0, 0.5, channels).astype(np.float32).astype(np.float64)
    return x, dy, gamma, beta


@needs_extension
@pytest.mark.parametrize("dtype", _half_dtypes())
@pytest.mark.parametrize("name", ["rows_B1_fused", "channels_fused", "channels_small_B"])
def test_half_and_relu_results_do_not_depend_on_threads_or_fusion(name, dtype):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    dtype = _as_dtype(dtype)
    x, dy, gamma, beta = _half_case(SHAPES[name], dtype, seed=3)
    results = {}
    for n in (1, 2):
        with threadpoolctl.threadpool_limits(n, user_api="openmp"):
            out = np.empty_like(x)
            mean, invstd = cython_omp.forward_train(x, gamma, beta, EPS, out, relu=True)
            dx = np.empty_like(x)
            sums = cython_omp.backward_train(dy, x, mean, invstd, gamma, dx, beta=beta,
                                             relu=True)
            results[n] = (out.view(np.uint16), mean, invstd, dx.view(np.uint16), *sums)
    for a, b in zip(results[1], results[2]):
        assert np.array_equal(a, b)
    # fused (forward_train / backward_train) == unfused (stats + normalize,
    # backward_reduce + backward_elemt), bit for bit
    mean_s, var_s = cython_omp.stats(x)
    assert np.array_equal(mean_s, results[1][1])
    assert np.array_equal(1.0 / np.sqrt(var_s + EPS), results[1][2])
    sums_r = cython_omp.backward_reduce(dy, x, mean_s, results[1][2], gamma, beta, relu=True)
    assert np.array_equal(sums_r[0], results[1][4]) and np.array_equal(sums_r[1], results[1][5])


def _train_outputs(x, dy, gamma, beta, relu, strategy, forward_bytes, backward_bytes,
                   stores):
    """The extension's training forward and backward under one plan (strategy,
    block bytes of each, stores): ``[y, mean, invstd, dx, sum_dy, sum_dy_xhat]``."""
    ext = cython_omp._ext
    y = np.empty_like(x)
    stats = ext.forward_train(x, gamma, beta, EPS, y, None, None, 0.1, relu,
                              ext.STRATEGIES[strategy], forward_bytes, ext.STORES[stores])
    dx = np.empty_like(x)
    sums = ext.backward_train(dy, x, *stats, gamma, dx, beta, relu, ext.STRATEGIES[strategy],
                              backward_bytes, ext.STORES[stores])
    return [y, *stats, dx, *sums]


@needs_extension
@pytest.mark.parametrize("dtype", [np.float32, np.float64] + _half_dtypes())
@pytest.mark.parametrize("shape", [SHAPES["rows_B1_fused"], SHAPES["channels_fused"],
                                   SHAPES["channels_split"], (3, 5, 1037)],
                         ids=["rows_B1_fused", "channels_fused", "channels_split",
                              "unaligned_rows"])
def test_streaming_and_plain_stores_write_the_same_bits(shape, dtype):
    # A plan's stores change how the output is written, never what: every
    # elementwise pass (training and evaluation forward, simplified
    # backward, with and without the fused ReLU) writes the same bits with
    # streaming stores (through an L1 buffer, rows of 1037 values starting
    # anywhere in a cache line) as with plain ones, and the same sums.
    ext = cython_omp._ext
    dtype = _as_dtype(dtype)
    x, dy, gamma, beta = _half_case(shape, dtype, seed=7)
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    results = {}
    for stores in ("cached", "streaming"):
        got = []
        for relu in (False, True):
            for strategy in ("passes", "fused"):
                got += _train_outputs(x, dy, gamma, beta, relu, strategy, 0, 0, stores)
            y_eval = np.empty_like(x)
            ext.forward_eval(x, gamma, beta, rm, rv, EPS, y_eval, relu, ext.STORES[stores])
            got.append(y_eval)
        results[stores] = got
    for plain, streamed in zip(results["cached"], results["streaming"]):
        assert plain.dtype == streamed.dtype
        assert np.array_equal(plain.view(np.uint8), streamed.view(np.uint8))


@needs_extension
@pytest.mark.parametrize("dtype", [np.float32, np.float64] + _half_dtypes())
def test_fused_row_blocks_of_any_width_give_the_bits_of_the_two_passes(dtype):
    # A plan's block_bytes sets the channels of a fused (N, D) block, from
    # ROW_FUSE_MIN_WIDTH up to ROW_BLOCK (1024), wider than the heuristics'
    # COL_BLOCK (256): each width sums the same row chunks in the same order
    # as the two-pass kernels, so every output and sum is the same bits
    # (with and without the fused ReLU, plain and streaming stores).
    dtype = _as_dtype(dtype)
    A, C = 6, 4 * 1024 + 3
    x, dy, gamma, beta = _half_case((A, C, 1), dtype, seed=11)
    itemsize = x.dtype.itemsize
    for relu in (False, True):
        passes = _train_outputs(x, dy, gamma, beta, relu, "passes", 0, 0, "cached")
        for width in (64, 300, 1024):
            for stores in ("cached", "streaming"):
                fused = _train_outputs(x, dy, gamma, beta, relu, "fused",
                                       width * 2 * A * itemsize, width * 3 * A * itemsize,
                                       stores)
                for want, got in zip(passes, fused):
                    assert got.dtype == want.dtype
                    assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (
                        f"width {width}, {stores}, relu={relu}")


@needs_extension
@pytest.mark.parametrize("name", ["rows_B1_fused", "channels_fused", "channels_small_B"])
def test_float16_portable_path_gives_the_same_bits(name, f16_path):
    # Both conversion paths are exact / round to nearest even: same results.
    x, dy, gamma, beta = _half_case(SHAPES[name], np.float16, seed=4)
    out = np.empty_like(x)
    mean, invstd = cython_omp.forward_train(x, gamma, beta, EPS, out, relu=True)
    dx = np.empty_like(x)
    cython_omp.backward_train(dy, x, mean, invstd, gamma, dx, beta=beta, relu=True)
    _ext()._use_f16c(True)
    out_ref = np.empty_like(x)
    cython_omp.forward_train(x, gamma, beta, EPS, out_ref, relu=True)
    dx_ref = np.empty_like(x)
    cython_omp.backward_train(dy, x, mean, invstd, gamma, dx_ref, beta=beta, relu=True)
    assert np.array_equal(out.view(np.uint16), out_ref.view(np.uint16))
    assert np.array_equal(dx.view(np.uint16), dx_ref.view(np.uint16))


@needs_extension
def test_relu_backward_needs_beta():
    x, dy, gamma, beta = make_case((4, 3, 5), np.float32)
    mean, invstd = cython_omp.forward_train(x, gamma, beta, EPS, np.empty_like(x))
    with pytest.raises(ValueError):
        cython_omp.backward_train(dy, x, mean, invstd, gamma, np.empty_like(x), relu=True)


# ---------------------------------------------------------------------------
# Instruction-set variants (-Dcpu=dispatch) and FASTBN_CPU_LEVEL
# ---------------------------------------------------------------------------

def test_choose_variant_loads_the_best_level_the_cpu_runs():
    choose = cython_omp.choose_variant
    built = {"baseline", "v3", "v4"}
    assert choose(built, ["baseline", "v3"])[0] == "v3"
    assert choose(built, ["baseline", "v3", "v4"])[0] == "v4"
    assert choose({"baseline"}, ["baseline", "v3", "v4"])[0] == "baseline"
    assert choose(built, ["baseline", "v3"], forced="baseline") == (
        "baseline", "FASTBN_CPU_LEVEL=baseline")
    assert choose({"native"}, ["baseline"])[0] == "native"


@pytest.mark.parametrize("built, levels, forced, message", [
    ({"baseline", "v3", "v4"}, ["baseline", "v3"], "v4", "this CPU cannot run it"),
    ({"baseline", "v3"}, ["baseline", "v3"], "v9", "not a variant of this build"),
    ({"native"}, ["baseline", "v3"], "v3", "-Dcpu=native"),
    ({"v4"}, ["baseline", "v3"], None, "no variant of this build runs on this CPU"),
])
def test_choose_variant_refuses_clearly(built, levels, forced, message):
    with pytest.raises(RuntimeError, match=message):
        cython_omp.choose_variant(built, levels, forced)


def test_info_names_the_variant_and_why():
    info = fastbn.backend_info()["cython"]
    if not info["available"]:
        pytest.skip(info["reason"])
    assert info["variant"] in ("baseline", "v3", "v4", "native")
    assert info["variant_reason"]
    if info["variant"] != "native":
        assert info["variant"] in machine.cpu_levels()


def test_forcing_a_level_this_cpu_lacks_is_an_error_not_a_crash():
    """The extension of a level the CPU lacks is never imported (it could die of
    an illegal instruction): the backend is unavailable, with the reason, and a
    call names it."""
    if not fastbn.backend_info()["cython"]["available"]:
        pytest.skip("the cython backend is not available here")
    lacking = [level for level in ("v3", "v4") if level not in machine.cpu_levels()]
    level = lacking[0] if lacking else "v9"
    code = ("import numpy as np, fastbn\n"
            "info = fastbn.backend_info()['cython']\n"
            "print(info['available'], '|', info['reason'])\n"
            "try:\n"
            "    fastbn.batchnorm_forward(np.ones((4, 3), np.float32), backend='cython')\n"
            "except RuntimeError as exc:\n"
            "    print('RuntimeError', exc)\n")
    env = dict(os.environ, FASTBN_CPU_LEVEL=level)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert first.startswith("False | ") and f"FASTBN_CPU_LEVEL={level}" in first
    assert second.startswith("RuntimeError") and f"FASTBN_CPU_LEVEL={level}" in second
