"""Tests of what is the Numba CUDA backend's own (``fastbn.backends.numba_cuda``).

The kernel contract (every kernel against the float64 reference, block-size
invariance, constant channels and NaN, running statistics) is tested for
every backend in ``test_contract.py``. Here: availability and settings, the
launch geometry of the test shapes, launch and copy counts, device arrays
through the API, per-thread scratch, and 16-bit storage and the fused
ReLU.

Run under Numba's CUDA simulator (no GPU needed)::

    NUMBA_ENABLE_CUDASIM=1 FASTBN_TEST_BACKENDS=cuda pytest tests/test_cuda_backend.py

Most tests are skipped unless the ``cuda`` backend is available (a GPU, or
the simulator). Threads per block is lowered to 16 here so that the small
test shapes span several blocks; shapes stay tiny because the simulator runs
each CUDA thread as a Python thread. Under the simulator the block
reductions take the shared-memory path (see ``_builders._use_shuffles``);
the warp shuffles are exercised by the same suites run on a GPU.
"""
import sys

import numpy as np
import pytest

from contract_support import NumbaCuda

from conftest import assert_close, kernel_reference
from fastbn.backends import numba_cuda as backend

pytestmark = pytest.mark.cuda

AVAILABLE, REASON = backend.availability()
needs_cuda = pytest.mark.skipif(not AVAILABLE,
                                reason=f"cuda backend not available: {REASON}")

EPS = 1e-5
# Normwise relative tolerance by input dtype: float32 results are rounded to
# float32 once (the computation is float64), float64 results carry a few ulps.
TOLERANCE = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}

# (A, C, B) views: name -> (shape as the API would build it, ROWS_MIN_B,
# TARGET_BLOCKS).
# Extents are chosen not to divide the block sizes, so that every layout
# has partial blocks, partial rows and remainders of the unrolled loops.
SHAPES = {name: (shape, *NumbaCuda.LAYOUT.get(name, (32, 4096)))
          for name, shape in NumbaCuda.shapes.items()}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """16 threads per block; a short GIL switch interval for the simulator.

    The simulator's block manager polls its threads for ``syncthreads``; a
    short switch interval makes the barriers several times faster.
    """
    monkeypatch.setattr(backend, "THREADS_PER_BLOCK", 16)
    monkeypatch.setattr(backend, "MIN_ITEMS_PER_THREAD", 1)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


# ---------------------------------------------------------------------------
# Helpers: data, float64 references (conftest's), device arrays
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
    """Float64 forward and backward of batch norm on (A, C, B), ``out`` the
    forward's ``y`` (``conftest.kernel_reference``)."""
    expected = kernel_reference(x, gamma, beta, dy, EPS)
    expected["out"] = expected["y"]
    return expected


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
                                  "is False)", "the installed numba-cuda cannot compile"))
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


def test_numpy_without_row_stack_is_reported(monkeypatch):
    """numba-cuda 0.30 cannot compile under NumPy 2.5 (no numpy.row_stack):
    availability() says so, naming the fix, instead of failing at a call."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("numba.cuda.np.arrayobj")
    except ImportError:   # numba.cuda present, numba-cuda's modules not
        spec = None
    if spec is None:
        pytest.skip("numba-cuda is not installed")
    with open(spec.origin, encoding="utf-8") as source:
        uses_row_stack = "np.row_stack" in source.read()
    monkeypatch.delattr(np, "row_stack", raising=False)
    available, reason = backend.availability()
    if uses_row_stack:
        assert available is False
        assert "NumPy" in reason and "row_stack" in reason and "fastbn[cuda]" in reason
    else:
        assert "row_stack" not in reason


# ---------------------------------------------------------------------------
# Every kernel against the float64 reference, in every layout
# ---------------------------------------------------------------------------

def _layout(monkeypatch, name):
    shape, rows_min_b, target_blocks = SHAPES[name]
    monkeypatch.setattr(backend, "ROWS_MIN_B", rows_min_b)
    monkeypatch.setattr(backend, "TARGET_BLOCKS", target_blocks)
    return shape


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_layouts_span_several_blocks(monkeypatch, name):
    """The test shapes exercise what they are meant to: several blocks per
    lane, several rows per block where named, and partial blocks."""
    shape = _layout(monkeypatch, name)
    layout = backend._Layout(shape, backend.THREADS_PER_BLOCK)
    assert layout.rows == (shape[2] >= backend.ROWS_MIN_B)
    blocks = layout.reduce_grid[0] * layout.reduce_grid[1]
    assert blocks >= 2, (name, layout.reduce_grid)
    if name == "NCHW_rows_per_block":
        assert layout.block[1] > 1
    bx, by = layout.block
    if name == "NCHW_unrolled":      # a row holds four strides of the block
        assert shape[2] > 4 * bx
    if name == "N_D_unrolled":       # a thread walks four strides of rows
        assert shape[0] > 4 * layout.elementwise_grid[1] * by


@needs_cuda
@pytest.mark.parametrize("name", ["N_D", "NCHW"])
def test_gamma_and_beta_none_are_ones_and_zeros(monkeypatch, name):
    """The cuda kernels take None for gamma/beta (the contract's other
    properties: ``test_contract.py``)."""
    shape = _layout(monkeypatch, name)
    x, dy, _, _ = make_problem(shape, np.float64)
    channels = shape[1]
    plain = reference(x, dy, np.ones(channels), np.zeros(channels))
    out = backend.empty(shape, np.float64)
    backend.forward_train(backend.to_device(x), None, None, EPS, out)
    assert_close(host(out), plain["out"], TOLERANCE[np.dtype(np.float64)],
                 "forward, no gamma/beta")


@needs_cuda
def test_invalid_threads_per_block(monkeypatch):
    monkeypatch.setattr(backend, "THREADS_PER_BLOCK", 12)
    with pytest.raises(ValueError, match="power of two"):
        backend.stats(backend.to_device(np.zeros((2, 1, 1))))


@needs_cuda
def test_deterministic():
    """No atomics and fixed merge orders: two runs are bitwise identical."""
    shape = SHAPES["NCHW"][0]
    x, dy, gamma, beta = make_problem(shape, np.float32, seed=7)
    d_x, d_dy, d_gamma, d_beta = device_inputs(x, dy, gamma, beta)
    runs = []
    for _ in range(2):
        out = backend.empty(shape, np.float32)
        dx = backend.empty(shape, np.float32)
        mean, invstd = backend.forward_train(d_x, d_gamma, d_beta, EPS, out)
        sums = backend.backward_train(d_dy, d_x, mean, invstd, d_gamma, dx)
        runs.append([host(a) for a in (mean, invstd, out, dx, *sums)])
    for first, second in zip(*runs):
        assert np.array_equal(first, second)


# ---------------------------------------------------------------------------
# Through the public API: where the data lives, the work stays
# ---------------------------------------------------------------------------

def _fastbn():
    import fastbn
    return fastbn


class _Counter:
    """Counts host<->device copies and kernel launches in the simulator."""

    def __init__(self, monkeypatch):
        from numba import cuda
        from numba.cuda.simulator import kernel as simulated_kernel
        from numba.cuda.simulator.cudadrv import devicearray as simulated_arrays

        self.copies_to_device = 0
        self.copies_to_host = 0
        self.launches = 0
        counter = self

        original_to_device = cuda.to_device

        def to_device(*args, **kwargs):
            counter.copies_to_device += 1
            return original_to_device(*args, **kwargs)

        array_class = simulated_arrays.FakeCUDAArray
        original_copy_to_host = array_class.copy_to_host
        original_copy_to_device = array_class.copy_to_device

        def copy_to_host(self, *args, **kwargs):
            counter.copies_to_host += 1
            return original_copy_to_host(self, *args, **kwargs)

        def copy_to_device(self, *args, **kwargs):
            counter.copies_to_device += 1
            return original_copy_to_device(self, *args, **kwargs)

        original_call = simulated_kernel.FakeCUDAKernel.__call__

        def call(self, *args):
            if not self._device and simulated_kernel._kernel_context is None:
                counter.launches += 1
            return original_call(self, *args)

        monkeypatch.setattr(cuda, "to_device", to_device)
        monkeypatch.setattr(array_class, "copy_to_host", copy_to_host)
        monkeypatch.setattr(array_class, "copy_to_device", copy_to_device)
        monkeypatch.setattr(simulated_kernel.FakeCUDAKernel, "__call__", call)

    def take(self):
        counts = (self.copies_to_device, self.copies_to_host, self.launches)
        self.copies_to_device = self.copies_to_host = self.launches = 0
        return counts


needs_simulator = pytest.mark.skipif(not backend._SIMULATOR,
                                     reason="counts the simulator's copies and launches")


@needs_cuda
@needs_simulator
@pytest.mark.parametrize("name", ["N_D", "NCHW"])
def test_device_call_makes_no_copy_and_three_launches(monkeypatch, name):
    """Device arrays in, running statistics included: zero host<->device
    copies, at most three launches per forward and per simplified backward."""
    from numba import cuda

    fastbn = _fastbn()
    shape = _layout(monkeypatch, name)
    channels = shape[1]
    x, dy, gamma, beta = make_problem(shape, np.float32, seed=2)
    d_x, d_dy = cuda.to_device(x), cuda.to_device(dy)
    d_gamma = cuda.to_device(gamma.astype(np.float32))
    d_beta = cuda.to_device(beta.astype(np.float32))
    d_mean = cuda.to_device(np.zeros(channels, np.float32))
    d_var = cuda.to_device(np.ones(channels, np.float32))
    counter = _Counter(monkeypatch)
    out, cache = fastbn.batchnorm_forward(d_x, d_gamma, d_beta, running_mean=d_mean,
                                          running_var=d_var)
    to_device, to_host, launches = counter.take()
    assert (to_device, to_host) == (0, 0)
    assert launches <= 3
    dx, dgamma, dbeta = fastbn.batchnorm_backward(d_dy, cache)
    to_device, to_host, launches = counter.take()
    assert (to_device, to_host) == (0, 0)
    assert launches <= 3
    for result in (out, dx, dgamma, dbeta):
        assert backend.is_device_array(result) and np.dtype(result.dtype) == np.float32
    # and the values are right
    expected = reference(x, dy, gamma, beta)
    assert_close(host(out), expected["out"], 1e-6, "out")
    assert_close(host(dx), expected["dx"], 1e-6, "dx")
    count = shape[0] * shape[2]
    assert_close(host(d_var), 0.9 + 0.1 * expected["var"] * count / (count - 1), 1e-6,
                 "running_var")


@needs_cuda
@needs_simulator
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_staged_backward_launches(monkeypatch, relu):
    """The staged backward on device arrays: no host<->device copy; one
    launch per full-size stage (8), two per sum (4 sums), one per
    per-channel step (coefficients, dsq, dmu): 19. The ReLU adds its ``y``
    (coefficients and pass) and the masked ``dy``: 22."""
    fastbn = _fastbn()
    shape = _layout(monkeypatch, "NCHW")
    x, dy, gamma, beta = make_problem(shape, np.float32, seed=3)
    d_x, d_dy, d_gamma, d_beta = device_inputs(x, dy, gamma.astype(np.float32),
                                               beta.astype(np.float32))
    fused = {"activation": "relu"} if relu else {}
    _, cache = fastbn.batchnorm_forward(d_x, d_gamma, d_beta, **fused)
    counter = _Counter(monkeypatch)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(d_dy, cache, method="staged")
    assert counter.take() == (0, 0, 22 if relu else 19)
    for result in (dx, dgamma, dbeta):
        assert backend.is_device_array(result)


@needs_cuda
@needs_simulator
def test_host_call_copies_each_input_and_output_once(monkeypatch):
    fastbn = _fastbn()
    shape = (6, 3, 5, 7)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.standard_normal(3)
    running_mean, running_var = np.zeros(3), np.ones(3)
    expected_out, expected_cache = fastbn.batchnorm_forward(
        x, gamma, beta, running_mean=running_mean.copy(), running_var=running_var.copy(),
        backend="numpy")
    expected_dx = fastbn.batchnorm_backward(dy, expected_cache)
    counter = _Counter(monkeypatch)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, running_mean=running_mean,
                                          running_var=running_var, backend="cuda")
    # in: x, gamma, beta, running_mean, running_var; back: out and the two
    # running statistics
    assert counter.take()[:2] == (5, 3)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dy, cache)
    # in: dy and x; back: dx, dgamma, dbeta
    assert counter.take()[:2] == (2, 3)
    assert isinstance(out, np.ndarray) and isinstance(dgamma, np.ndarray)
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    for actual, wanted in zip((dx, dgamma, dbeta), expected_dx):
        np.testing.assert_allclose(actual, wanted, rtol=1e-11, atol=1e-11)


@needs_cuda
def test_two_host_threads_match_serial_calls():
    """Per-thread scratch: concurrent calls give the serial results bitwise."""
    import threading

    from numba import cuda

    fastbn = _fastbn()
    cases = []
    for seed, shape in enumerate([(6, 3, 40), (37, 5), (4, 3, 3, 3)]):
        rng = np.random.default_rng(seed)
        cases.append((rng.standard_normal(shape), rng.standard_normal(shape)))

    def run(case):
        x, dy = case
        out, cache = fastbn.batchnorm_forward(cuda.to_device(x), axis=1)
        dx, dgamma, dbeta = fastbn.batchnorm_backward(cuda.to_device(dy), cache)
        return [backend.to_host(a) for a in (out, dx, dgamma, dbeta)]

    serial = [run(case) for case in cases]
    results, errors = {}, []

    def worker(index):
        try:
            for repeat in range(2):
                results[index, repeat] = run(cases[index])
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    for (index, _), arrays in results.items():
        for actual, expected in zip(arrays, serial[index]):
            assert np.array_equal(actual, expected)
    assert len(results) == 2 * len(cases)


# ---------------------------------------------------------------------------
# 16-bit storage (float16, bfloat16) and the fused ReLU
# ---------------------------------------------------------------------------

def _bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


STORAGE = ["float16", "bfloat16", "float32", "float64"]


def storage_dtype(name):
    return _bfloat16() if name == "bfloat16" else np.dtype(name)


def param_dtype(dtype):
    """float32 gamma/beta/dgamma/dbeta for 16-bit storage, else x's dtype."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def ulp_of(values, dtype):
    """The spacing of ``dtype`` above ``|values|`` rounded to ``dtype``, as float64."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64)).astype(dtype)
    bits = magnitude.view(np.uint16).astype(np.uint32) + 1
    above = np.minimum(bits, 0x7FFF).astype(np.uint16).view(dtype)
    return above.astype(np.float64) - magnitude.astype(np.float64)


def assert_rounded_once(actual, expected, dtype, what):
    """16-bit ``actual`` within 1 ulp of the float64 ``expected``; wider
    dtypes within a few units of their own rounding."""
    actual = np.asarray(actual)
    assert actual.dtype == dtype, (what, actual.dtype)
    values = actual.astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if dtype.itemsize == 2:
        error = np.abs(values - expected) / ulp_of(expected, dtype)
        worst = float(np.max(error))
        assert worst <= 1.0, f"{what}: {worst:.2f} ulp"
    else:
        assert_close(values, expected, TOLERANCE[dtype], what)


def make_storage_problem(shape, dtype, seed=0, wide_channel=True):
    """x, dy in ``dtype``; gamma, beta in the parameter dtype; float64 copies.

    With ``wide_channel``, channel 0 has a mean 1e3 times its spread.
    """
    rng = np.random.default_rng(seed)
    channels = shape[1]
    centres = rng.uniform(-3.0, 3.0, size=channels)
    spreads = rng.uniform(0.5, 2.0, size=channels)
    if wide_channel:
        centres[0], spreads[0] = 1e3, 1.0
    x = rng.standard_normal(shape) * spreads.reshape(1, -1, 1) + centres.reshape(1, -1, 1)
    x = x.astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    pdtype = param_dtype(dtype)
    gamma = rng.uniform(0.5, 2.0, size=channels).astype(pdtype)
    beta = rng.standard_normal(channels).astype(pdtype)
    return x, dy, gamma, beta


def masked_reference(x, dy, gamma, beta, mask):
    """:func:`reference` of ``dy * mask`` (the ReLU's backward)."""
    dy_masked = np.where(mask, np.asarray(dy, dtype=np.float64), 0.0)
    return reference(x.astype(np.float64), dy_masked, gamma.astype(np.float64),
                     beta.astype(np.float64))


@needs_cuda
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("name", ["N_D", "NCHW_unrolled"])
def test_storage_dtypes_and_relu_match_reference(monkeypatch, name, storage, relu):
    """Every kernel on every storage dtype, with and without the fused ReLU,
    against the float64 reference of the same inputs rounded once."""
    shape = _layout(monkeypatch, name)
    dtype = storage_dtype(storage)
    pdtype = param_dtype(dtype)
    x, dy, gamma, beta = make_storage_problem(shape, dtype, seed=1)
    x64, g64, b64 = x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64)
    plain = reference(x64, dy.astype(np.float64), g64, b64)
    y = plain["out"]
    mask = y > 0 if relu else np.ones(shape, dtype=bool)
    expected = masked_reference(x, dy, gamma, beta, mask)
    expected_out = np.maximum(y, 0.0) if relu else y
    d_x, d_dy, d_gamma, d_beta = device_inputs(x, dy, gamma, beta)
    assert np.dtype(d_x.dtype) == dtype

    out = backend.empty(shape, dtype)
    mean, invstd = backend.forward_train(d_x, d_gamma, d_beta, EPS, out, relu=relu)
    assert_close(channel_result(mean, shape[1]), plain["mean"], 1e-13, "mean")
    out = host(out)
    assert_rounded_once(out, expected_out, dtype, "forward out")
    if relu and dtype.itemsize > 2:
        # the mask the backward rebuilds is the forward's own out > 0
        assert np.array_equal(out > 0, mask)

    normalized = backend.empty(shape, dtype)
    backend.normalize(d_x, mean, invstd, d_gamma, d_beta, normalized, relu=relu)
    assert np.array_equal(host(normalized).view(np.uint8), out.view(np.uint8))

    fused = {"beta": d_beta, "relu": True} if relu else {}
    sum_dy, sum_dy_xhat = backend.backward_reduce(d_dy, d_x, mean, invstd,
                                                  d_gamma if relu else None, **fused)
    assert_close(channel_result(sum_dy, shape[1]), expected["sum_dy"], 1e-12, "sum_dy")
    assert_close(channel_result(sum_dy_xhat, shape[1]), expected["sum_dy_xhat"], 1e-12,
                 "sum_dy_xhat")
    dx = backend.empty(shape, dtype)
    backend.backward_elemt(d_dy, d_x, mean, invstd, d_gamma, sum_dy, sum_dy_xhat, dx, **fused)
    assert_rounded_once(host(dx), expected["dx"], dtype, "backward_elemt")

    dx = backend.empty(shape, dtype)
    dbeta, dgamma = backend.backward_train(d_dy, d_x, mean, invstd, d_gamma, dx, **fused)
    assert_rounded_once(host(dx), expected["dx"], dtype, "backward_train dx")
    for result, wanted, what in ((dgamma, "sum_dy_xhat", "dgamma"), (dbeta, "sum_dy", "dbeta")):
        values = host(result)
        assert values.dtype == pdtype, (what, values.dtype)
        assert_close(values, expected[wanted], TOLERANCE[pdtype], what)

    dx = backend.empty(shape, dtype)
    dgamma, dbeta = backend.backward_staged(d_dy, d_x, mean, invstd, d_gamma, EPS, dx, **fused)
    assert host(dgamma).dtype == pdtype and host(dbeta).dtype == pdtype
    # the stages are float32 (16-bit and float32 storage) or float64; dx
    # is then rounded once to the storage dtype
    staged_tolerance = 1e-11 if dtype == np.float64 else 1e-4
    rounding = {np.dtype(np.float16): 2.0**-11}.get(dtype, 2.0**-8 if dtype.itemsize == 2 else 0)
    assert_close(host(dx), expected["dx"], staged_tolerance + rounding, "backward_staged dx")
    assert_close(host(dgamma), expected["sum_dy_xhat"], staged_tolerance, "staged dgamma")
    assert_close(host(dbeta), expected["sum_dy"], staged_tolerance, "staged dbeta")


@needs_cuda
def test_relu_keeps_nan_and_masks_its_gradient(monkeypatch):
    """max(NaN, 0) is NaN (as NumPy's maximum); the backward masks a NaN y."""
    shape = _layout(monkeypatch, "N_D")
    x, dy, gamma, beta = make_storage_problem(shape, np.dtype(np.float32), seed=6,
                                              wide_channel=False)
    channels = shape[1]
    running_mean = np.zeros(channels, np.float32)
    running_var = np.ones(channels, np.float32)
    x[0, 1, 0] = np.nan
    d_x, d_dy, d_gamma, d_beta = device_inputs(x, dy, gamma, beta)
    out = backend.empty(shape, np.float32)
    mean, invstd = backend.forward_eval(d_x, d_gamma, d_beta, backend.to_device(running_mean),
                                        backend.to_device(running_var), EPS, out, relu=True)
    out = host(out)
    assert np.isnan(out[0, 1, 0])
    assert np.all(np.delete(out.reshape(-1), 1) >= 0)
    dx = backend.empty(shape, np.float32)
    backend.backward_eval(d_dy, d_x, mean, invstd, d_gamma, dx, beta=d_beta, relu=True)
    assert host(dx)[0, 1, 0] == 0.0


@needs_cuda
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_16bit_stores_round_once_to_nearest_even(storage):
    """The kernels' float64 -> 16-bit store, through the elementwise pass
    (float64 in, 16-bit out): ties to even, values just past a tie (where
    rounding through float32 first would round the wrong way), subnormals,
    underflow to a signed zero, overflow, infinities and NaN."""
    dtype = storage_dtype(storage)
    if storage == "bfloat16":
        cases = [1.0 + 2.0**-8, 1.0 + 2.0**-8 + 2.0**-30, 1.0 + 3 * 2.0**-8,
                 -(1.0 + 2.0**-8 + 2.0**-40), 1.0 + 2.0**-8 - 2.0**-40, 2.0**-133,
                 1.5 * 2.0**-133, 2.0**-134, 2.0**-140, -(2.0**-140), 3.3895e38, 3.396e38,
                 3.41e38, 1e39, -1e39]
        largest = 3.3895313892515355e38
        expected = [1.0, 1.0 + 2.0**-7, 1.0 + 2.0**-6, -(1.0 + 2.0**-7), 1.0, 2.0**-133,
                    2.0**-132, 0.0, 0.0, -0.0, largest, largest, np.inf, np.inf, -np.inf]
    else:
        cases = [1.0 + 2.0**-11, 1.0 + 2.0**-11 + 2.0**-40, 1.0 + 3 * 2.0**-11,
                 -(1.0 + 2.0**-11 + 2.0**-50), 2.0**-24, 1.5 * 2.0**-24, 2.0**-25,
                 2.0**-26, -(2.0**-26), 65504.0, 65519.0, 65520.0, 1e6]
        expected = [1.0, 1.0 + 2.0**-10, 1.0 + 2.0**-9, -(1.0 + 2.0**-10), 2.0**-24,
                    2.0**-23, 0.0, 0.0, -0.0, 65504.0, 65504.0, np.inf, np.inf]
    cases += [0.0, np.inf, -np.inf, np.nan, 1.0, -2.5]
    expected += [0.0, np.inf, -np.inf, np.nan, 1.0, -2.5]
    values = np.array(cases, dtype=np.float64).reshape(-1, 1, 1)
    channels = 1
    out = backend.empty(values.shape, dtype)
    ones = backend.to_device(np.ones(channels))
    zeros = backend.to_device(np.zeros(channels))
    backend.normalize(backend.to_device(values), zeros, ones, None, None, out)
    result = host(out).astype(np.float64).reshape(-1)
    wanted = np.array(expected, dtype=np.float64)
    assert np.array_equal(result, wanted, equal_nan=True), (result, wanted)
    assert np.array_equal(np.signbit(result), np.signbit(wanted))


@needs_cuda
def test_kernels_refuse_integer_arrays():
    """A uint16 device array is never taken for bfloat16 bit patterns."""
    bits = backend.to_device(np.zeros((4, 2, 1), dtype=np.uint16))
    with pytest.raises(TypeError, match="uint16"):
        backend.stats(bits)


@needs_cuda
@needs_simulator
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["N_D", "NCHW"])
def test_16bit_relu_device_call_makes_no_copy_and_three_launches(monkeypatch, name, storage):
    """16-bit device arrays and the fused ReLU keep the launch counts: at
    most three per forward and per simplified backward, training and
    evaluation, and no host<->device copy."""
    fastbn = _fastbn()
    shape = _layout(monkeypatch, name)
    dtype = storage_dtype(storage)
    channels = shape[1]
    x, dy, gamma, beta = make_storage_problem(shape, dtype, seed=8, wide_channel=False)
    d_x, d_dy, d_gamma, d_beta = device_inputs(x, dy, gamma, beta)
    d_mean = backend.to_device(np.zeros(channels, np.float32))
    d_var = backend.to_device(np.ones(channels, np.float32))
    counter = _Counter(monkeypatch)
    for training in (True, False):
        out, cache = fastbn.batchnorm_forward(d_x, d_gamma, d_beta, running_mean=d_mean,
                                              running_var=d_var, training=training,
                                              activation="relu")
        to_device, to_host, launches = counter.take()
        assert (to_device, to_host) == (0, 0)
        assert launches <= (3 if training else 2)
        dx, dgamma, dbeta = fastbn.batchnorm_backward(d_dy, cache)
        to_device, to_host, launches = counter.take()
        assert (to_device, to_host) == (0, 0)
        assert launches <= 3
        assert np.dtype(out.dtype) == dtype and np.dtype(dx.dtype) == dtype
        assert np.dtype(dgamma.dtype) == np.float32 and np.dtype(dbeta.dtype) == np.float32
        fastbn.batchnorm_backward(d_dy, cache, method="staged")   # runs, on the device
        assert counter.take()[:2] == (0, 0)
    # the values of the last (evaluation) call
    invstd = 1.0 / np.sqrt(backend.to_host(d_var).astype(np.float64) + 1e-5)
    running_mean = backend.to_host(d_mean).astype(np.float64)
    y = ((x.astype(np.float64) - per_channel(running_mean)) * per_channel(invstd * gamma)
         + per_channel(beta))
    assert_rounded_once(host(out), np.maximum(y, 0.0), dtype, "eval out")


@needs_cuda
@needs_simulator
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_16bit_host_call_copies_once_and_returns_host_arrays(monkeypatch, storage):
    """Host 16-bit arrays with backend='cuda': copied over once, results
    copied back once, as 16-bit (out, dx) and float32 (dgamma, dbeta)."""
    fastbn = _fastbn()
    dtype = storage_dtype(storage)
    shape = (6, 3, 5, 7)
    x, dy, gamma, beta = make_storage_problem((6, 3, 35), dtype, seed=9, wide_channel=False)
    x, dy = x.reshape(shape), dy.reshape(shape)
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    counter = _Counter(monkeypatch)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, running_mean=running_mean,
                                          running_var=running_var, backend="cuda",
                                          activation="relu")
    assert counter.take()[:2] == (5, 3)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dy, cache)
    assert counter.take()[:2] == (2, 3)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and dx.dtype == dtype
    assert dgamma.dtype == np.float32 and dbeta.dtype == np.float32
    expected_out, expected_cache = fastbn.batchnorm_forward(
        x, gamma, beta, backend="numpy", activation="relu")
    expected_dx, expected_dgamma, expected_dbeta = fastbn.batchnorm_backward(dy, expected_cache)
    # both round once from float32 (numpy) or float64 (cuda) arithmetic
    assert np.max(np.abs(out.astype(np.float64) - expected_out.astype(np.float64))
                  / ulp_of(expected_out, dtype)) <= 1.0
    assert np.max(np.abs(dx.astype(np.float64) - expected_dx.astype(np.float64))
                  / ulp_of(expected_dx, dtype)) <= 1.0
    np.testing.assert_allclose(dgamma, expected_dgamma, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbeta, expected_dbeta, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_bfloat16_device_policy():
    """Device bfloat16 is a Numba device array of dtype bfloat16 (what
    to_device makes of a host bfloat16 array); its results stay on the device
    as bfloat16. A uint16 device array is an integer array: TypeError."""
    fastbn = _fastbn()
    bfloat16 = _bfloat16()
    x, dy, gamma, beta = make_storage_problem((8, 3, 4), bfloat16, seed=10, wide_channel=False)
    d_x = backend.to_device(x)
    assert np.dtype(d_x.dtype) == bfloat16
    assert np.array_equal(backend.to_host(d_x).view(np.uint16), x.view(np.uint16))
    out, cache = fastbn.batchnorm_forward(d_x, gamma, beta)
    assert backend.is_device_array(out) and np.dtype(out.dtype) == bfloat16
    dx, dgamma, dbeta = fastbn.batchnorm_backward(backend.to_device(dy), cache)
    assert np.dtype(dx.dtype) == bfloat16 and np.dtype(dgamma.dtype) == np.float32
    host_out, _ = fastbn.batchnorm_forward(x, gamma, beta, backend="cuda")
    assert np.array_equal(host(out).view(np.uint16), host_out.view(np.uint16))
    bits = backend.to_device(x.view(np.uint16))
    with pytest.raises(TypeError, match="uint16"):
        fastbn.batchnorm_forward(bits, gamma, beta)
