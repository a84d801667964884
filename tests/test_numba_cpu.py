"""Tests specific to the Numba CPU backend (``fastbn.backends.numba_cpu``).

The kernels are called directly on 3-D ``(A, C, B)`` arrays and compared
with float64 NumPy formulas; shapes are small so that each signature
compiles once (compile results are cached on disk).
"""
import concurrent.futures

import numpy as np
import pytest
from conftest import kernel_reference, make_kernel_case

numba = pytest.importorskip("numba")
nb = pytest.importorskip("fastbn.backends.numba_cpu")

if not nb.availability()[0]:
    pytest.skip(f"numba backend unavailable: {nb.availability()[1]}", allow_module_level=True)

EPS = 1e-5

# (A, C, B) shapes, one per loop shape / work split
SHAPES = {
    "cols_B1": (261, 1100, 1),        # (N, D): columns shape, two column blocks
    "cols_fused": (100, 600, 1),      # (N, D), one row block: fused per column block
    "cols_smallB": (9, 13, 5),        # 1 < B < ROWS_MIN_B: columns shape, folded over B
    "mixed_B49": (9, 30, 49),         # 7x7 maps: rows elementwise, columns reductions
                                      # (a channel straddles two column blocks)
    "rows_largeC": (3, 70, 300),      # rows shape, one channel per reduction item
    "rows_smallC": (3, 2, 50000),     # rows shape, channels split in chunks
    "rows_partial": (7, 3, 7001),     # rows shape, chunks end inside rows
}


def reference(x, gamma, beta, dy):
    return kernel_reference(x, gamma, beta, dy, EPS)


def rel_max(actual, expected):
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    return float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - expected))) / scale


make = make_kernel_case


def tolerance(dtype):
    return 1e-6 if dtype == np.float32 else 1e-12


@pytest.fixture(params=["unfused", "fused", "serial"])
def fused(request, monkeypatch):
    """Run the parallel kernels unfused, fused even on small arrays, and the
    serial small-array kernels on every shape."""
    monkeypatch.setattr(nb, "SERIAL_BELOW", 2**62 if request.param == "serial" else 0)
    monkeypatch.setattr(nb, "FUSED_COLS", request.param == "fused")
    if request.param == "fused":
        monkeypatch.setattr(nb, "FUSED_MIN_BYTES", 0)
        monkeypatch.setattr(nb, "FUSED_MIN_B", 1)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(SHAPES))
def test_kernels_match_float64_reference(name, dtype, fused):
    shape = SHAPES[name]
    x, dy, gamma, beta = make(shape, dtype)
    tol = tolerance(dtype)
    ref = reference(x, gamma, beta, dy)
    out_ref, mean_ref, var_ref, invstd = ref["y"], ref["mean"], ref["var"], ref["invstd"]
    dx_ref, sum_dy_ref, sum_dy_xhat_ref = ref["dx"], ref["sum_dy"], ref["sum_dy_xhat"]

    out = np.empty_like(x)
    mean, invstd_t = nb.forward_train(x, gamma, beta, EPS, out)
    assert mean.dtype == np.float64 and invstd_t.dtype == np.float64 and out.dtype == x.dtype
    assert rel_max(mean, mean_ref) < 1e-13
    assert rel_max(invstd_t, invstd) < 1e-12
    assert rel_max(out, out_ref) < tol

    mean2, var2 = nb.stats(x)
    np.testing.assert_array_equal(mean2, mean)   # same per-channel summation order
    assert rel_max(var2, var_ref) < 1e-12
    np.testing.assert_array_equal(1.0 / np.sqrt(var2 + EPS), invstd_t)
    out2 = np.empty_like(x)
    nb.normalize(x, mean, invstd, gamma, beta, out2)
    assert rel_max(out2, out_ref) < tol

    dx = np.empty_like(x)
    sum_dy, sum_dy_xhat = nb.backward_train(dy, x, mean_ref, invstd, gamma, dx)
    assert rel_max(sum_dy, sum_dy_ref) < 1e-12
    assert rel_max(sum_dy_xhat, sum_dy_xhat_ref) < 1e-12
    assert rel_max(dx, dx_ref) < tol

    r_dy, r_dy_xhat = nb.backward_reduce(dy, x, mean_ref, invstd)
    assert rel_max(r_dy, sum_dy_ref) < 1e-12 and rel_max(r_dy_xhat, sum_dy_xhat_ref) < 1e-12
    dx2 = np.empty_like(x)
    nb.backward_elemt(dy, x, mean_ref, invstd, gamma, r_dy, r_dy_xhat, dx2)
    assert rel_max(dx2, dx_ref) < tol

    dx3 = np.empty_like(x)
    dgamma, dbeta = nb.backward_staged(dy, x, mean_ref, invstd, gamma, EPS, dx3)
    assert rel_max(dgamma, sum_dy_xhat_ref) < (1e-5 if dtype == np.float32 else 1e-11)
    assert rel_max(dbeta, sum_dy_ref) < 1e-12
    assert rel_max(dx3, dx_ref) < (1e-5 if dtype == np.float32 else 1e-10)


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


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
@pytest.mark.parametrize("name", list(SHAPES))
def test_thread_count_invariance_float64(name, fused):
    x, dy, gamma, beta = make(SHAPES[name], np.float64, seed=1)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _run_all(x, dy, gamma, beta)
        numba.set_num_threads(2)
        two = _run_all(x, dy, gamma, beta)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(64, 3, 300), (300, 4, 1)], ids=["rows", "cols"])
def test_float32_large_mean_is_centred_in_float64(shape, fused):
    rng = np.random.default_rng(2)
    std = 1.0
    x = (1e4 * std + std * rng.standard_normal(shape)).astype(np.float32)
    C = shape[1]
    gamma, beta = np.ones(C), np.zeros(C)
    out = np.empty_like(x)
    nb.forward_train(x, gamma, beta, EPS, out)
    out_ref = reference(x, gamma, beta, np.zeros_like(x))["y"]
    assert np.max(np.abs(out - out_ref)) < 1e-4


@pytest.mark.parametrize("shape", [(16, 3, 300), (50, 3, 1)], ids=["rows", "cols"])
def test_float32_constant_channel_has_zero_variance(shape, fused):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    x[:, 1, :] = np.float32(1e7)
    C = shape[1]
    gamma = np.array([1.0, 2.5, -1.0])
    beta = np.array([0.0, 0.75, 0.5])
    out = np.empty_like(x)
    mean, invstd = nb.forward_train(x, gamma, beta, EPS, out)
    assert invstd[1] == 1.0 / np.sqrt(EPS) and mean[1] == 1e7
    assert np.all(out[:, 1, :] == np.float32(0.75))
    mean2, var2 = nb.stats(x)
    assert var2[1] == 0.0


@pytest.mark.parametrize("running_dtype", ["float32", "float64", "float16", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["cols_B1", "cols_smallB", "mixed_B49", "rows_largeC"])
def test_running_statistics_and_eval_kernels(name, dtype, running_dtype, fused):
    """forward_train updates the running statistics in place (PyTorch's rule);
    forward_eval and backward_eval use them as constants."""
    x, dy, gamma, beta = make(SHAPES[name], dtype, seed=8)
    A, C, B = x.shape
    M = A * B
    ref = reference(x, gamma, beta, dy)
    rng = np.random.default_rng(9)
    start_mean, start_var = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    if running_dtype == "strided":
        buffers = np.zeros((2, C, 2))
        running_mean, running_var = buffers[0, :, 1], buffers[1, :, 1]
    else:
        running_mean = np.empty(C, dtype=running_dtype)
        running_var = np.empty(C, dtype=running_dtype)
    running_mean[...] = start_mean
    running_var[...] = start_var
    start_mean = running_mean.astype(np.float64)
    start_var = running_var.astype(np.float64)
    out = np.empty_like(x)
    momentum = 0.3
    nb.forward_train(x, gamma, beta, EPS, out, running_mean, running_var, momentum)
    want_mean = 0.7 * start_mean + momentum * ref["mean"]
    want_var = 0.7 * start_var + momentum * ref["var"] * M / (M - 1)
    rtol = 1e-3 if running_dtype == "float16" else 1e-6 if running_dtype == "float32" else 1e-12
    np.testing.assert_allclose(running_mean, want_mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(running_var, want_var, rtol=rtol, atol=rtol)

    mean, invstd = nb.forward_eval(x, gamma, beta, running_mean, running_var, EPS, out)
    np.testing.assert_array_equal(mean, running_mean.astype(np.float64))
    np.testing.assert_allclose(invstd, 1 / np.sqrt(running_var.astype(np.float64) + EPS),
                               rtol=1e-14)
    x64 = x.astype(np.float64)
    want = ((x64 - mean[:, None]) * (invstd * gamma)[:, None] + beta[:, None])
    assert rel_max(out, want) < tolerance(dtype)

    dx = np.empty_like(x)
    sum_dy, sum_dy_xhat = nb.backward_eval(dy, x, mean, invstd, gamma, dx)
    dy64 = dy.astype(np.float64)
    assert rel_max(dx, dy64 * (gamma * invstd)[:, None]) < tolerance(dtype)
    assert rel_max(sum_dy, dy64.sum(axis=(0, 2))) < 1e-12
    want_sum = (dy64 * (x64 - mean[:, None]) * invstd[:, None]).sum(axis=(0, 2))
    assert rel_max(sum_dy_xhat, want_sum) < 1e-12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 3, 300), (20, 3, 1), (2, 70, 300), (4, 30, 49)],
                         ids=["rows", "cols", "rows_many", "mixed_B49"])
def test_nan_propagates_to_its_channel_only(shape, dtype, fused):
    x, dy, gamma, beta = make(shape, dtype, seed=4)
    x[1, 1, shape[2] // 2] = np.nan
    out = np.empty_like(x)
    mean, invstd = nb.forward_train(x, gamma, beta, EPS, out)
    assert np.isnan(mean[1]) and np.isnan(invstd[1])
    assert np.all(np.isnan(out[:, 1, :]))
    assert np.all(np.isfinite(np.delete(out, 1, axis=1)))
    dx = np.empty_like(x)
    nb.backward_train(dy, x, mean, invstd, gamma, dx)
    assert np.all(np.isnan(dx[:, 1, :]))
    assert np.all(np.isfinite(np.delete(dx, 1, axis=1)))


def test_inputs_are_not_modified(fused):
    x, dy, gamma, beta = make((4, 70, 300), np.float32, seed=5)
    for arr in (x, dy, gamma, beta):
        arr.flags.writeable = False
    copies = [a.copy() for a in (x, dy, gamma, beta)]
    results = _run_all(x, dy, gamma, beta)
    for a, c in zip((x, dy, gamma, beta), copies):
        np.testing.assert_array_equal(a, c)
    assert all(np.all(np.isfinite(r)) for r in results)


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


def test_availability_and_info():
    ok, reason = nb.availability()
    assert ok and reason == ""
    info = nb.info()
    assert info["device"] == "cpu"
    assert info["threads"] == numba.get_num_threads()
    assert info["threading_layer"] in ("omp", "tbb", "workqueue")
    assert info["openmp"] == (info["threading_layer"] == "omp")
    assert nb.ON_DEVICE is False


def test_through_api():
    import fastbn
    rng = np.random.default_rng(6)
    for shape, axis in (((6, 5, 4, 7), 1), ((30, 11), 1), ((4, 3, 5, 6), -1)):
        x = rng.standard_normal(shape)
        C = shape[axis]
        gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
        out, cache = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, backend="numba")
        ref, _ = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, backend="numpy")
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
        dout = rng.standard_normal(shape)
        for method in ("simplified", "staged"):
            got = fastbn.batchnorm_backward(dout, cache, method=method)
            _, cache_np = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, backend="numpy")
            want = fastbn.batchnorm_backward(dout, cache_np, method=method)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


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
        np.testing.assert_allclose(a, b, rtol=1e-14 if a.dtype == np.float64 else 1e-6,
                                   atol=0)


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
