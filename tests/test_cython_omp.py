"""Tests specific to the Cython + OpenMP backend (``backend="cython"``).

The general parity suite (every backend against the references) lives in
other files; here: the OpenMP build check, thread-count invariance, both
loop shapes against a float64 NumPy reference, the accuracy cases, and the
numba and cython backends used from several Python threads at once.

``test_built_with_openmp`` fails when the extension is missing or was built
without OpenMP (that is how CI learns the build is broken), unless the
environment variable ``FASTBN_SKIP_OPENMP_TEST`` is set. Every other test is
skipped when the extension is not built.
"""
import os
import threading

import numpy as np
import pytest

from conftest import kernel_reference, make_kernel_case
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
        "fastbn.backends._cython_omp was built without OpenMP; install a compiler "
        "with OpenMP support (or set FASTBN_SKIP_OPENMP_TEST=1 to accept a serial build)")
    assert info["threads"] >= 1
    assert info["device"] == "cpu"


def test_availability_and_info_shape():
    available, reason = cython_omp.availability()
    assert isinstance(available, bool) and isinstance(reason, str)
    assert (reason == "") == available
    if not available:
        assert reason.startswith("extension not built: ")
    info = cython_omp.info()
    assert set(info) >= {"threads", "openmp", "device"}
    assert cython_omp.ON_DEVICE is False


def reference(x, gamma, beta, dy):
    return kernel_reference(x, gamma, beta, dy, EPS)


make_case = make_kernel_case


def run_all_kernels(x, dy, gamma, beta):
    """Every kernel of the contract once; returns a dict of results."""
    res = {}
    res["stats"] = cython_omp.stats(x)
    y = np.empty_like(x)
    res["fwd_stats"] = cython_omp.forward_train(x, gamma, beta, EPS, y)
    res["y"] = y
    mean, invstd = res["fwd_stats"]
    y_eval = np.empty_like(x)
    cython_omp.normalize(x, mean, invstd, gamma, beta, y_eval)
    res["y_normalize"] = y_eval
    res["reduce"] = cython_omp.backward_reduce(dy, x, mean, invstd)
    dx_elemt = np.empty_like(x)
    cython_omp.backward_elemt(dy, x, mean, invstd, gamma, *res["reduce"], dx_elemt)
    res["dx_elemt"] = dx_elemt
    dx = np.empty_like(x)
    res["train"] = cython_omp.backward_train(dy, x, mean, invstd, gamma, dx)
    res["dx"] = dx
    dx_staged = np.empty_like(x)
    res["staged"] = cython_omp.backward_staged(dy, x, mean, invstd, gamma, EPS, dx_staged)
    res["dx_staged"] = dx_staged
    return res


def assert_close(actual, expected, rtol, atol):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected,
                               rtol=rtol, atol=atol)


# Shapes covering both loop shapes, fused and split channel paths, chunked
# channels, column blocks and the single-thread fallback for tiny arrays.
SHAPES = {
    "rows_B1_large_C": (256, 1100, 1),     # B == 1: vectorized across C, column blocks
    "rows_B1_fused": (64, 1500, 1),        # B == 1: fused per block of channels (in L2)
    "rows_B1_small_C": (40000, 3, 1),      # B == 1, few channels, many row chunks
    "channels_fused": (8, 64, 4100),       # B large, many channels (fused: float64 is >= 16 MiB)
    "channels_split": (3, 2, 70001),       # B large, C < threads: split channels, odd sizes
    "channels_small_B": (64, 40, 49),      # short segments
    "tiny": (3, 5, 7),                     # runs on one thread
}


@needs_extension
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(SHAPES))
def test_kernels_match_float64_reference(name, dtype):
    x, dy, gamma, beta = make_case(SHAPES[name], dtype)
    ref = reference(x, gamma, beta, dy)
    res = run_all_kernels(x, dy, gamma, beta)
    tight = 1e-5 if dtype == np.float32 else 1e-10
    # statistics and reductions are float64 in every case
    mean, var = res["stats"]
    mean_f, invstd_f = res["fwd_stats"]
    for values in (mean, var, mean_f, invstd_f):
        assert values.dtype == np.float64
    assert_close(mean, ref["mean"], 1e-12, 1e-12)
    assert_close(var, ref["var"], 1e-10, 1e-12)
    assert_close(mean_f, ref["mean"], 1e-12, 1e-12)
    assert_close(invstd_f, ref["invstd"], 1e-10, 1e-12)
    for sum_dy, sum_dy_xhat in (res["reduce"], res["train"]):
        assert_close(sum_dy, ref["sum_dy"], 1e-9, 1e-9)
        assert_close(sum_dy_xhat, ref["sum_dy_xhat"], 1e-9, 1e-9)
    dgamma, dbeta = res["staged"]
    stage_tol = 1e-3 if dtype == np.float32 else 1e-9   # float32 intermediates
    assert_close(dbeta, ref["sum_dy"], 1e-9, 1e-9)
    assert_close(dgamma, ref["sum_dy_xhat"], stage_tol, stage_tol)
    for key in ("y", "y_normalize"):
        assert res[key].dtype == x.dtype
        assert_close(res[key], ref["y"], tight, tight)
    for key in ("dx", "dx_elemt"):
        assert res[key].dtype == x.dtype
        assert_close(res[key], ref["dx"], tight, tight)
    scale = np.abs(ref["dx"]).max()
    assert_close(res["dx_staged"], ref["dx"], stage_tol, stage_tol * scale)


# ---------------------------------------------------------------------------
# Thread-count invariance
# ---------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("name", ["rows_B1_large_C", "rows_B1_fused", "rows_B1_small_C",
                                  "channels_fused", "channels_split", "channels_small_B"])
def test_results_do_not_depend_on_thread_count(name):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, dy, gamma, beta = make_case(SHAPES[name], np.float64, seed=1)
    results = {}
    for n in (1, 2):
        with threadpoolctl.threadpool_limits(n, user_api="openmp"):
            if cython_omp.info()["openmp"]:
                assert cython_omp.info()["threads"] == n
            results[n] = run_all_kernels(x, dy, gamma, beta)
    one, two = results[1], results[2]
    for key in one:
        for a, b in zip(np.atleast_1d(one[key]) if isinstance(one[key], np.ndarray) else one[key],
                        np.atleast_1d(two[key]) if isinstance(two[key], np.ndarray) else two[key]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, err_msg=key)


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
# Accuracy cases
# ---------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("shape", [(64, 3, 500), (4000, 7, 1), (64, 1500, 1)])
def test_float32_large_mean_small_std(shape):
    # mean = 1e4 * std: the centring must be done in float64 (or with the
    # split mean = hi + lo of the float32 elementwise loops)
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    C = shape[1]
    gamma, beta = np.ones(C), np.zeros(C)
    y = np.empty_like(x)
    mean, invstd = cython_omp.forward_train(x, gamma, beta, EPS, y)
    dy = (1e4 + rng.standard_normal(shape)).astype(np.float32)   # mean_dy = 1e4 * std
    ref = reference(x, gamma, beta, dy)
    assert np.max(np.abs(y - ref["y"])) < 1e-4
    dx = np.empty_like(x)
    cython_omp.backward_train(dy, x, mean, invstd, gamma, dx)
    assert np.max(np.abs(dx - ref["dx"])) < 1e-4 * np.max(np.abs(ref["dx"]))


@needs_extension
@pytest.mark.parametrize("shape", [(16, 4, 300), (300, 4, 1), (8, 64, 40000)])
def test_constant_float32_channel_gives_zero_var_and_beta(shape):
    x = np.full(shape, 1e7, dtype=np.float32)
    C = shape[1]
    gamma = np.linspace(0.5, 2.0, C).astype(np.float32).astype(np.float64)
    beta = np.linspace(-1.0, 1.0, C).astype(np.float32).astype(np.float64)
    mean, var = cython_omp.stats(x)
    assert np.all(var == 0.0) and np.all(mean == 1e7)
    y = np.empty_like(x)
    mean, invstd = cython_omp.forward_train(x, gamma, beta, EPS, y)
    assert np.all(invstd == 1.0 / np.sqrt(EPS))   # var == 0 exactly
    assert np.array_equal(y, np.broadcast_to(beta.astype(np.float32)[None, :, None], shape))


@needs_extension
@pytest.mark.parametrize("shape", [(16, 4, 300), (300, 4, 1), (8, 64, 40000)])
@pytest.mark.parametrize("position", ["first", "last"])
def test_nan_propagates_to_its_channel_only(shape, position):
    x, dy, gamma, beta = make_case(shape, np.float32, seed=3)
    index = (0, 1, 0) if position == "first" else (shape[0] - 1, 1, shape[2] - 1)
    x[index] = np.nan
    res = run_all_kernels(x, dy, gamma, beta)
    for key in ("y", "dx", "dx_staged"):
        assert np.all(np.isnan(res[key][:, 1, :])), key
        others = np.delete(res[key], 1, axis=1)
        assert np.all(np.isfinite(others)), key
    mean, invstd = res["fwd_stats"]
    assert np.isnan(mean[1]) and np.isnan(invstd[1])
    assert np.all(np.isfinite(np.delete(mean, 1)))


@needs_extension
def test_inputs_not_modified_and_read_only_inputs_work():
    x, dy, gamma, beta = make_case((8, 6, 50), np.float32)
    x_copy, dy_copy = x.copy(), dy.copy()
    x.flags.writeable = False
    dy.flags.writeable = False
    run_all_kernels(x, dy, gamma, beta)
    assert np.array_equal(x, x_copy) and np.array_equal(dy, dy_copy)


# ---------------------------------------------------------------------------
# Through the public API, when it is there
# ---------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("shape,axis", [((6, 5, 7, 3), 1), ((40, 9), 1), ((4, 3, 5, 6), -1)])
def test_public_api_with_cython_backend(shape, axis):
    import fastbn
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    dout = rng.standard_normal(shape)
    C = shape[axis]
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    out_c, cache_c = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, backend="cython")
    out_n, cache_n = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, backend="numpy")
    np.testing.assert_allclose(out_c, out_n, rtol=1e-10, atol=1e-10)
    for method in ("simplified", "staged"):
        grads_c = fastbn.batchnorm_backward(dout, cache_c, method=method)
        grads_n = fastbn.batchnorm_backward(dout, cache_n, method=method)
        for a, b in zip(grads_c, grads_n):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


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


@needs_extension
@pytest.mark.parametrize("running_dtype", ["float32", "float64", "float16", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["rows_B1_large_C", "rows_B1_fused", "channels_small_B", "tiny"])
def test_running_statistics_and_eval_kernels(name, dtype, running_dtype):
    """forward_train updates the running statistics in place in its driver
    (PyTorch's rule); forward_eval and backward_eval use them as constants."""
    x, dy, gamma, beta = make_case(SHAPES[name], dtype, seed=8)
    A, C, B = x.shape
    M = A * B
    ref = reference(x, gamma, beta, dy)
    rng = np.random.default_rng(9)
    if running_dtype == "strided":
        buffers = np.zeros((2, C, 2))
        running_mean, running_var = buffers[0, :, 1], buffers[1, :, 1]
    else:
        running_mean = np.empty(C, dtype=running_dtype)
        running_var = np.empty(C, dtype=running_dtype)
    running_mean[...] = rng.standard_normal(C)
    running_var[...] = rng.uniform(0.5, 2.0, C)
    start_mean = running_mean.astype(np.float64)
    start_var = running_var.astype(np.float64)
    out = np.empty_like(x)
    momentum = 0.3
    mean_t, invstd_t = cython_omp.forward_train(x, gamma, beta, EPS, out, running_mean,
                                                running_var, momentum)
    assert_close(mean_t, ref["mean"], 1e-13, 0)
    assert_close(invstd_t, ref["invstd"], 1e-12, 0)
    want_mean = 0.7 * start_mean + momentum * ref["mean"]
    want_var = 0.7 * start_var + momentum * ref["var"] * M / (M - 1)
    rtol = 1e-3 if running_dtype == "float16" else 1e-6 if running_dtype == "float32" else 1e-12
    assert_close(running_mean, want_mean, rtol, rtol)
    assert_close(running_var, want_var, rtol, rtol)

    mean, invstd = cython_omp.forward_eval(x, gamma, beta, running_mean, running_var, EPS, out)
    np.testing.assert_array_equal(mean, running_mean.astype(np.float64))
    assert_close(invstd, 1 / np.sqrt(running_var.astype(np.float64) + EPS), 1e-14, 0)
    x64 = x.astype(np.float64)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert_close(out, (x64 - mean[:, None]) * (invstd * gamma)[:, None] + beta[:, None],
                 tol, tol)

    dx = np.empty_like(x)
    sum_dy, sum_dy_xhat = cython_omp.backward_eval(dy, x, mean, invstd, gamma, dx)
    dy64 = dy.astype(np.float64)
    assert_close(dx, dy64 * (gamma * invstd)[:, None], tol, tol)
    assert_close(sum_dy, dy64.sum(axis=(0, 2)), 1e-12, 1e-12)
    want_sum = (dy64 * (x64 - mean[:, None]) * invstd[:, None]).sum(axis=(0, 2))
    assert_close(sum_dy_xhat, want_sum, 1e-12, 1e-12)


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
