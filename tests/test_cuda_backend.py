"""Tests of the Numba CUDA backend's kernels (``fastbn.backends.numba_cuda``).

Run under Numba's CUDA simulator (no GPU needed)::

    NUMBA_ENABLE_CUDASIM=1 FASTBN_CUDA_THREADS_PER_BLOCK=8 \\
        pytest tests/test_cuda_backend.py

Every test but the first is skipped unless the ``cuda`` backend is available
(a GPU, or the simulator). Threads per block is lowered to 8 here so that the
small test shapes span several blocks per channel; shapes stay tiny because
the simulator runs each CUDA thread as a Python thread.
"""
import sys

import numpy as np
import pytest

from fastbn.backends import numba_cuda as backend

pytestmark = pytest.mark.cuda

AVAILABLE, REASON = backend.availability()
needs_cuda = pytest.mark.skipif(not AVAILABLE,
                                reason=f"cuda backend not available: {REASON}")

EPS = 1e-5
# Normwise relative tolerance by input dtype: float32 results are rounded to
# float32 once (the computation is float64), float64 results carry a few ulps.
TOLERANCE = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}

# (A, C, B) views: name -> shape as the API would build it.
SHAPES = {
    # (N, D) = (40, 3): rows layout, 4 x 2 thread blocks.
    "N_D": (40, 3, 1),
    # channels-last (N, H, W, C) = (4, 3, 3, 2) -> (36, 2, 1).
    "channels_last": (36, 2, 1),
    # (N, C, H, W) = (5, 3, 2, 2) -> (5, 3, 4): rows layout with B > 1.
    "NCHW_small_spatial": (5, 3, 4),
    # (N, C, H, W) = (3, 2, 6, 6) -> (3, 2, 36): per-channel layout.
    "NCHW": (3, 2, 36),
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """8 threads per block; a short GIL switch interval for the simulator.

    The simulator's block manager polls its threads for ``syncthreads``; a
    short switch interval makes the barriers several times faster.
    """
    monkeypatch.setattr(backend, "THREADS_PER_BLOCK", 8)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


# ---------------------------------------------------------------------------
# Helpers: data, float64 references, comparisons
# ---------------------------------------------------------------------------

def make_problem(shape, dtype, seed=0):
    """x, dy (dtype) and gamma, beta (float64 holding dtype values)."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    centres = rng.uniform(-3.0, 3.0, size=channels).reshape(1, channels, 1)
    spreads = rng.uniform(0.5, 2.0, size=channels).reshape(1, channels, 1)
    x = (rng.standard_normal(shape) * spreads + centres).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, size=channels).astype(dtype).astype(np.float64)
    beta = rng.standard_normal(channels).astype(dtype).astype(np.float64)
    return x, dy, gamma, beta


def per_channel(values):
    """(C,) -> (1, C, 1) for broadcasting against (A, C, B)."""
    return np.asarray(values, dtype=np.float64).reshape(1, -1, 1)


def reference(x, dy, gamma, beta):
    """Float64 forward and backward of batch norm on (A, C, B)."""
    x64 = x.astype(np.float64)
    dy64 = dy.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    var = ((x64 - per_channel(mean)) ** 2).mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x64 - per_channel(mean)) * per_channel(invstd)
    out = xhat * per_channel(gamma) + per_channel(beta)
    count = x.shape[0] * x.shape[2]
    sum_dy = dy64.sum(axis=(0, 2))
    sum_dy_xhat = (dy64 * xhat).sum(axis=(0, 2))
    dx = per_channel(gamma * invstd) * (
        dy64 - per_channel(sum_dy) / count
        - xhat * per_channel(sum_dy_xhat) / count)
    return dict(mean=mean, var=var, invstd=invstd, out=out, sum_dy=sum_dy,
                sum_dy_xhat=sum_dy_xhat, dx=dx)


def assert_close(actual, expected, tolerance, what):
    """Normwise relative error max|a - e| / max|e| within ``tolerance``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    error = float(np.max(np.abs(actual - expected))) / scale
    assert error <= tolerance, f"{what}: error {error:.2e} > {tolerance:.0e}"


def host(arr):
    assert backend.is_device_array(arr), type(arr)
    return backend.to_host(arr)


def channel_result(arr, channels):
    """Host values of a per-channel kernel result, checked to be float64 (C,)."""
    values = host(arr)
    assert values.dtype == np.float64 and values.shape == (channels,)
    return values


def device_inputs(x, dy, gamma, beta):
    return (backend.to_device(x), backend.to_device(dy),
            backend.to_device(gamma), backend.to_device(beta))


# ---------------------------------------------------------------------------
# Availability (runs everywhere)
# ---------------------------------------------------------------------------

def test_availability_and_info():
    available, reason = backend.availability()
    info = backend.info()
    assert backend.ON_DEVICE is True
    assert set(info) >= {"threads", "openmp", "device"}
    assert info["openmp"] is False
    if available:
        assert reason == ""
        assert info["device"] != "none"
    else:
        assert reason.startswith(("numba.cuda not importable: ",
                                  "no CUDA GPU found (numba.cuda.is_available() "
                                  "is False)"))
        with pytest.raises(RuntimeError, match="cannot run here"):
            backend.stats(np.zeros((2, 1, 1)))
    assert not backend.is_device_array(np.zeros(3))


def test_threads_from_environment(monkeypatch):
    monkeypatch.setenv("FASTBN_CUDA_THREADS_PER_BLOCK", "16")
    assert backend._threads_from_environment() == 16
    monkeypatch.setenv("FASTBN_CUDA_THREADS_PER_BLOCK", "12")
    with pytest.warns(RuntimeWarning, match="power of two"):
        value = backend._threads_from_environment()
    assert value == backend.DEFAULT_THREADS_PER_BLOCK
    monkeypatch.delenv("FASTBN_CUDA_THREADS_PER_BLOCK")
    assert backend._threads_from_environment() == backend.DEFAULT_THREADS_PER_BLOCK


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_reductions_span_several_blocks(name):
    """With 8 threads per block every test shape has several chunks."""
    shape = SHAPES[name]
    layout, grid, block, partial_shape = backend._reduction_layout(shape, 8)
    assert layout == ("by_channel" if shape[2] >= backend.SMALL_INNER
                      else "by_rows")
    assert partial_shape[0] >= 2, (name, partial_shape)
    if layout == "by_rows":
        width, height = block
        assert width * height == 8


# ---------------------------------------------------------------------------
# Kernels against the float64 reference
# ---------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_kernels_match_reference(name, dtype):
    shape = SHAPES[name]
    channels = shape[1]
    x, dy, gamma, beta = make_problem(shape, dtype)
    expected = reference(x, dy, gamma, beta)
    tolerance = TOLERANCE[np.dtype(dtype)]
    d_x, d_dy, d_gamma, d_beta = device_inputs(x, dy, gamma, beta)

    mean, var = backend.stats(d_x)
    assert_close(channel_result(mean, channels), expected["mean"], 1e-13, "mean")
    assert_close(channel_result(var, channels), expected["var"], 1e-13, "var")

    out = backend.empty(shape, dtype)
    mean, var = backend.forward_train(d_x, d_gamma, d_beta, EPS, out)
    assert_close(channel_result(var, channels), expected["var"], 1e-13,
                 "forward_train var")
    result = host(out)
    assert result.dtype == dtype
    assert_close(result, expected["out"], tolerance, "forward_train out")

    d_mean = backend.to_device(expected["mean"])
    d_invstd = backend.to_device(expected["invstd"])
    sum_dy, sum_dy_xhat = backend.backward_reduce(d_dy, d_x, d_mean, d_invstd)
    assert_close(channel_result(sum_dy, channels), expected["sum_dy"], 1e-12,
                 "sum_dy")
    assert_close(channel_result(sum_dy_xhat, channels),
                 expected["sum_dy_xhat"], 1e-12, "sum_dy_xhat")

    dx = backend.empty(shape, dtype)
    backend.backward_elemt(d_dy, d_x, d_mean, d_invstd, d_gamma, sum_dy,
                           sum_dy_xhat, dx)
    assert_close(host(dx), expected["dx"], tolerance, "backward_elemt")

    dx_train = backend.empty(shape, dtype)
    sum_dy, sum_dy_xhat = backend.backward_train(d_dy, d_x, d_mean, d_invstd,
                                                 d_gamma, dx_train)
    assert_close(host(dx_train), expected["dx"], tolerance, "backward_train")
    assert_close(channel_result(sum_dy_xhat, channels),
                 expected["sum_dy_xhat"], 1e-12, "backward_train dgamma")

    dx_staged = backend.empty(shape, dtype)
    dgamma, dbeta = backend.backward_staged(d_dy, d_x, d_mean, d_invstd,
                                            d_gamma, EPS, dx_staged)
    # The staged graph rounds each full-size stage to dtype.
    staged_tolerance = 1e-5 if dtype == np.float32 else 1e-11
    assert_close(host(dx_staged), expected["dx"], staged_tolerance,
                 "backward_staged dx")
    assert_close(channel_result(dgamma, channels), expected["sum_dy_xhat"],
                 staged_tolerance, "backward_staged dgamma")
    assert_close(channel_result(dbeta, channels), expected["sum_dy"], 1e-12,
                 "backward_staged dbeta")


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_evaluation_normalize_and_backward(dtype):
    """Evaluation: normalize with running stats; its backward via normalize."""
    shape = SHAPES["NCHW_small_spatial"]
    x, dy, gamma, beta = make_problem(shape, dtype, seed=3)
    running_mean = np.array([0.5, -1.0, 2.0])
    running_var = np.array([1.5, 0.25, 4.0])
    invstd = 1.0 / np.sqrt(running_var + EPS)
    d_x, d_dy, d_gamma, d_beta = device_inputs(x, dy, gamma, beta)
    d_invstd = backend.to_device(invstd)

    out = backend.empty(shape, dtype)
    backend.normalize(d_x, backend.to_device(running_mean), d_invstd, d_gamma,
                      d_beta, out)
    expected = ((x.astype(np.float64) - per_channel(running_mean))
                * per_channel(invstd * gamma) + per_channel(beta))
    assert_close(host(out), expected, TOLERANCE[np.dtype(dtype)], "eval out")

    zeros = backend.to_device(np.zeros(3))
    dx = backend.empty(shape, dtype)
    backend.normalize(d_dy, zeros, d_invstd, d_gamma, zeros, dx)
    expected_dx = dy.astype(np.float64) * per_channel(gamma * invstd)
    assert_close(host(dx), expected_dx, TOLERANCE[np.dtype(dtype)], "eval dx")


@needs_cuda
@pytest.mark.parametrize("threads", [1, 4, 32])
def test_threads_per_block_does_not_change_results(monkeypatch, threads):
    """Statistics agree with the reference for any block size."""
    shape = (6, 2, 33)
    x, _, _, _ = make_problem(shape, np.float64, seed=5)
    expected = reference(x, x, np.ones(2), np.zeros(2))
    monkeypatch.setattr(backend, "THREADS_PER_BLOCK", threads)
    mean, var = backend.stats(backend.to_device(x))
    assert_close(host(mean), expected["mean"], 1e-13, f"mean, {threads} threads")
    assert_close(host(var), expected["var"], 1e-13, f"var, {threads} threads")


@needs_cuda
def test_invalid_threads_per_block(monkeypatch):
    monkeypatch.setattr(backend, "THREADS_PER_BLOCK", 12)
    with pytest.raises(ValueError, match="power of two"):
        backend.stats(backend.to_device(np.zeros((2, 1, 1))))


@needs_cuda
def test_deterministic():
    """No atomics: two runs give bitwise-identical statistics and gradients."""
    shape = SHAPES["NCHW"]
    x, dy, gamma, beta = make_problem(shape, np.float32, seed=7)
    d_x, d_dy, d_gamma, d_beta = device_inputs(x, dy, gamma, beta)
    runs = []
    for _ in range(2):
        mean, var = backend.stats(d_x)
        invstd = backend.to_device(1.0 / np.sqrt(host(var) + EPS))
        sum_dy, sum_dy_xhat = backend.backward_reduce(d_dy, d_x, mean, invstd)
        runs.append([host(a) for a in (mean, var, sum_dy, sum_dy_xhat)])
    for first, second in zip(*runs):
        assert np.array_equal(first, second)


# ---------------------------------------------------------------------------
# Accuracy corner cases
# ---------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("shape", [(40, 3, 1), (2, 3, 40)], ids=["rows", "channel"])
def test_constant_channel_and_nan(shape):
    """A constant channel has var exactly 0; NaN stays in its own channel."""
    x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    x[:, 0, :] = 3.25
    x[1, 2, 0] = np.nan
    d_x = backend.to_device(x)
    mean, var = backend.stats(d_x)
    mean, var = host(mean), host(var)
    assert var[0] == 0.0 and mean[0] == 3.25
    assert np.isfinite(mean[1]) and np.isfinite(var[1])
    assert np.isnan(mean[2]) and np.isnan(var[2])

    gamma = backend.to_device(np.array([2.0, 1.0, 1.0]))
    beta = backend.to_device(np.array([0.5, 0.0, 0.0]))
    out = backend.empty(shape, np.float32)
    backend.forward_train(d_x, gamma, beta, EPS, out)
    result = host(out)
    assert np.all(result[:, 0, :] == np.float32(0.5))
    assert np.all(np.isfinite(result[:, 1, :]))
    assert np.all(np.isnan(result[:, 2, :]))


@needs_cuda
def test_float32_large_mean_is_centred_accurately():
    """A channel whose mean is 1e4 standard deviations is normalized to 1e-4."""
    shape = (4, 2, 40)
    rng = np.random.default_rng(13)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    expected = reference(x, x, np.ones(2), np.zeros(2))
    out = backend.empty(shape, np.float32)
    ones = backend.to_device(np.ones(2))
    zeros = backend.to_device(np.zeros(2))
    mean, var = backend.forward_train(backend.to_device(x), ones, zeros, 0.0, out)
    assert_close(host(mean), expected["mean"], 1e-15, "mean")
    assert_close(host(var), expected["var"], 1e-9, "var")
    assert np.max(np.abs(host(out) - expected["out"])) < 1e-4


# ---------------------------------------------------------------------------
# Transfers
# ---------------------------------------------------------------------------

@needs_cuda
def test_transfers():
    from numba import cuda

    x = np.arange(12.0).reshape(3, 2, 2)
    device_x = cuda.to_device(x)
    assert backend.is_device_array(device_x)
    assert backend.to_device(device_x) is device_x  # used in place, no copy
    copied = backend.to_device(x[:, :, ::-1])  # non-contiguous host input
    assert backend.is_device_array(copied)
    assert np.array_equal(backend.to_host(copied), x[:, :, ::-1])
    empty = backend.empty((2, 3), np.float32)
    assert empty.shape == (2, 3) and np.dtype(empty.dtype) == np.float32
    assert np.array_equal(backend.to_host(x), x)  # host arrays pass through


@needs_cuda
def test_kernels_write_into_device_arrays_in_place():
    """Outputs given as device arrays are written on the device."""
    from numba import cuda

    shape = SHAPES["N_D"]
    x, dy, gamma, beta = make_problem(shape, np.float64, seed=17)
    expected = reference(x, dy, gamma, beta)
    out = cuda.device_array(shape, dtype=np.float64)
    mean, var = backend.forward_train(cuda.to_device(x), cuda.to_device(gamma),
                                      cuda.to_device(beta), EPS, out)
    assert backend.is_device_array(mean) and backend.is_device_array(var)
    assert_close(out.copy_to_host(), expected["out"], 1e-12, "out")


# ---------------------------------------------------------------------------
# Through the public API
# ---------------------------------------------------------------------------

def _fastbn():
    fastbn = pytest.importorskip("fastbn")
    if not hasattr(fastbn, "batchnorm_forward"):
        pytest.skip("fastbn.batchnorm_forward not there yet")
    return fastbn


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["N_D", "NCHW", "channels_last"])
def test_api_host_arrays(layout, dtype):
    fastbn = _fastbn()
    rng = np.random.default_rng(19)
    shape, axis = {"N_D": ((30, 3), 1), "NCHW": ((3, 2, 6, 6), 1),
                   "channels_last": ((4, 3, 3, 2), -1)}[layout]
    x = (rng.standard_normal(shape) * 2.0 + 1.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 2.0, channels).astype(dtype)
    beta = rng.standard_normal(channels).astype(dtype)
    running_mean = np.zeros(channels)
    running_var = np.ones(channels)

    out, cache = fastbn.batchnorm_forward(
        x, gamma, beta, running_mean=running_mean, running_var=running_var,
        axis=axis, backend="cuda")
    assert isinstance(out, np.ndarray) and out.dtype == dtype

    # The same problem on the (A, C, B) view, against the reference.
    x3 = np.moveaxis(x, axis, 1).reshape(shape[0], channels, -1)
    dy3 = np.moveaxis(dy, axis, 1).reshape(x3.shape)
    expected = reference(x3, dy3, gamma.astype(np.float64),
                         beta.astype(np.float64))
    tolerance = TOLERANCE[np.dtype(dtype)]
    assert_close(np.moveaxis(out, axis, 1).reshape(x3.shape), expected["out"],
                 tolerance, "out")
    count = x.size // channels
    assert_close(running_mean, 0.1 * expected["mean"], 1e-12, "running_mean")
    assert_close(running_var, 0.9 + 0.1 * expected["var"] * count / (count - 1),
                 1e-12, "running_var")

    for method in ("simplified", "staged"):
        dx, dgamma, dbeta = fastbn.batchnorm_backward(dy, cache, method=method)
        assert isinstance(dx, np.ndarray) and dx.dtype == dtype
        assert_close(np.moveaxis(dx, axis, 1).reshape(x3.shape), expected["dx"],
                     1e-5 if dtype == np.float32 else 1e-11, method)
        assert_close(dgamma, expected["sum_dy_xhat"], 1e-5, f"{method} dgamma")
        assert_close(dbeta, expected["sum_dy"], 1e-5, f"{method} dbeta")


@needs_cuda
def test_api_device_arrays_stay_on_device():
    """A Numba device array as x: outputs are device arrays, no host result."""
    from numba import cuda

    fastbn = _fastbn()
    shape = (3, 2, 6, 6)
    rng = np.random.default_rng(23)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    x3 = x.reshape(3, 2, 36)
    expected = reference(x3, dy.reshape(x3.shape), np.ones(2), np.zeros(2))

    out, cache = fastbn.batchnorm_forward(cuda.to_device(x), backend="cuda")
    assert backend.is_device_array(out), type(out)
    assert_close(backend.to_host(out).reshape(x3.shape), expected["out"], 1e-6,
                 "out")
    for method in ("simplified", "staged"):
        dx, dgamma, dbeta = fastbn.batchnorm_backward(cuda.to_device(dy), cache,
                                                      method=method)
        assert backend.is_device_array(dx), type(dx)
        assert_close(backend.to_host(dx).reshape(x3.shape), expected["dx"],
                     1e-5, method)
