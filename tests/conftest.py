"""Shared fixtures and float64 NumPy references for the fastbn test suite.

Backend-dependent tests take the ``backend`` fixture, which is parametrized
over ``fastbn.available_backends()``; the environment variable
``FASTBN_TEST_BACKENDS`` (comma-separated names) restricts that list, e.g.
``NUMBA_ENABLE_CUDASIM=1 FASTBN_TEST_BACKENDS=cuda pytest``. A name given
there that cannot run here is reported as a skip, with the reason from
``fastbn.backend_info()``.

The references below are written from the formulas, independently of
fastbn: per-channel statistics over every axis but the channel axis, biased
variance for normalization, PyTorch's running-statistics convention
(``momentum`` is the new batch's weight, unbiased variance).

The kernels run their default plans: ``FASTBN_WISDOM=off`` unless the
environment sets it (tests/test_plans.py sets it per test), so that no
result depends on what ``fastbn tune`` measured on this machine.
"""
import json
import os
import zlib

os.environ.setdefault("FASTBN_WISDOM", "off")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fastbn  # noqa: E402

# ---------------------------------------------------------------------------
# CUDA simulator: small blocks so that reductions span several blocks.
# ---------------------------------------------------------------------------
CUDASIM = bool(os.environ.get("NUMBA_ENABLE_CUDASIM")) and os.environ.get(
    "NUMBA_ENABLE_CUDASIM") != "0"


def _serialize_simulator_shared_arrays():
    """Make the simulator's ``cuda.shared.array`` thread-safe.

    The simulator (numba-cuda 0.30) runs a block's threads as Python
    threads, and ``cuda.shared.array`` looks up the array of its call site
    and stores a new one without a lock. Two threads of a launch's first
    block can then each get an array of their own, and that block's sum
    comes out wrong: at random, in about 4 of 10 runs of
    ``tests/test_cuda_backend.py``, a different test each time. This is the
    same lookup under a lock. It fixes the simulator, not fastbn's kernels
    (on a GPU, shared memory is one array per block).
    """
    import sys
    import threading
    import traceback

    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "_fastbn_locked", False):
        return
    original = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:   # errors / dynamic shared memory: unkeyed
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        # keyed as the simulator keys it: the caller's file and line
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[-1])[0:2]
        with lock:
            allocation = self._allocations.get(caller)
            if allocation is None:
                allocation = self._allocations[caller] = np.empty(shape, dtype)
        return allocation

    shared.array = array
    shared._fastbn_locked = True


if CUDASIM:
    try:
        import fastbn.backends.numba_cuda as _numba_cuda
    except Exception:  # module absent or not importable here: nothing to tune
        _numba_cuda = None
    if _numba_cuda is not None and hasattr(_numba_cuda, "THREADS_PER_BLOCK"):
        _numba_cuda.THREADS_PER_BLOCK = 8
    if _numba_cuda is not None:
        _serialize_simulator_shared_arrays()


# ---------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------
def selected_backends():
    """[(name, skip_reason_or_None)] for the backends this run tests."""
    available = list(fastbn.available_backends())
    wanted = os.environ.get("FASTBN_TEST_BACKENDS", "").strip()
    if not wanted:
        return [(name, None) for name in available]
    info = fastbn.backend_info()
    result = []
    for name in (s.strip() for s in wanted.split(",")):
        if not name:
            continue
        if name in available:
            result.append((name, None))
        else:
            reason = info.get(name, {}).get("reason", "unknown backend")
            result.append((name, f"backend {name!r} not available here: {reason}"))
    return result


def backend_params():
    params = []
    for name, skip in selected_backends():
        marks = []
        if name == "cuda":
            marks.append(pytest.mark.cuda)
        if skip:
            marks.append(pytest.mark.skip(reason=skip))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


BACKENDS = [name for name, skip in selected_backends() if skip is None]


def sim_skip_slow():
    """Skip a test whose cost is many calls on large inputs under the CUDA simulator
    (about 2 ms per element per call there); what it checks is covered by the
    exact parity tests. Real GPUs run it."""
    if CUDASIM:
        pytest.skip("too slow under NUMBA_ENABLE_CUDASIM; covered by the parity tests")


@pytest.fixture(params=backend_params())
def backend(request):
    """Name of a backend under test (parametrized over available backends)."""
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id: reproducible, distinct per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def make_input(rng, shape, axis=1, dtype=np.float64, scale=1.0, shift=0.0):
    """Random x whose channels have distinct means and spreads."""
    shape = tuple(shape)
    ax = axis % len(shape)
    C = shape[ax]
    bshape = [1] * len(shape)
    bshape[ax] = C
    means = shift + scale * rng.uniform(-3, 3, size=C)
    stds = scale * rng.uniform(0.5, 2.0, size=C)
    x = rng.standard_normal(shape) * stds.reshape(bshape) + means.reshape(bshape)
    return x.astype(dtype)


def make_params(rng, C, dtype=np.float64):
    gamma = rng.uniform(0.5, 2.0, size=C) * rng.choice([-1.0, 1.0], size=C)
    beta = rng.standard_normal(C)
    return gamma.astype(dtype), beta.astype(dtype)


def make_running(rng, C, dtype=np.float64):
    return (rng.standard_normal(C).astype(dtype),
            rng.uniform(0.5, 2.0, size=C).astype(dtype))


# ---------------------------------------------------------------------------
# References (float64 NumPy, written from the formulas)
# ---------------------------------------------------------------------------
def _geometry(x, axis):
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    bshape = [1] * x.ndim
    bshape[ax] = x.shape[ax]
    C = x.shape[ax]
    M = x.size // C
    return ax, red, tuple(bshape), C, M


def ref_forward(x, gamma=None, beta=None, *, training=True, running_mean=None,
                running_var=None, momentum=0.1, eps=1e-5, axis=1):
    """dict(out, mean, var, invstd, running_mean, running_var), all float64.

    gamma/beta are first cast to x.dtype (as the API does), then to float64.
    """
    ax, red, bshape, C, M = _geometry(x, axis)
    x64 = np.asarray(x, dtype=np.float64)
    g = np.ones(C) if gamma is None else np.asarray(gamma).astype(x.dtype).astype(np.float64)
    b = np.zeros(C) if beta is None else np.asarray(beta).astype(x.dtype).astype(np.float64)
    new_rm = None if running_mean is None else np.asarray(running_mean, np.float64).copy()
    new_rv = None if running_var is None else np.asarray(running_var, np.float64).copy()
    if training:
        mean = x64.mean(axis=red)
        var = ((x64 - mean.reshape(bshape)) ** 2).mean(axis=red)
        if new_rm is not None:
            new_rm = (1 - momentum) * new_rm + momentum * mean
        if new_rv is not None:
            new_rv = (1 - momentum) * new_rv + momentum * var * (M / (M - 1))
    else:
        mean = np.asarray(running_mean, np.float64)
        var = np.asarray(running_var, np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    out = (x64 - mean.reshape(bshape)) * (invstd * g).reshape(bshape) + b.reshape(bshape)
    return dict(out=out, mean=mean, var=var, invstd=invstd,
                running_mean=new_rm, running_var=new_rv)


def ref_backward(dout, x, gamma=None, *, training=True, running_mean=None,
                 running_var=None, eps=1e-5, axis=1):
    """(dx, dgamma, dbeta) in float64 from the closed-form gradient."""
    ax, red, bshape, C, M = _geometry(x, axis)
    x64 = np.asarray(x, np.float64)
    dy = np.asarray(dout, np.float64)
    g = np.ones(C) if gamma is None else np.asarray(gamma).astype(x.dtype).astype(np.float64)
    if training:
        mean = x64.mean(axis=red)
        var = ((x64 - mean.reshape(bshape)) ** 2).mean(axis=red)
    else:
        mean = np.asarray(running_mean, np.float64)
        var = np.asarray(running_var, np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x64 - mean.reshape(bshape)) * invstd.reshape(bshape)
    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    if training:
        dx = (g * invstd).reshape(bshape) * (
            dy - dbeta.reshape(bshape) / M - xhat * dgamma.reshape(bshape) / M)
    else:
        dx = dy * (g * invstd).reshape(bshape)
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------
def normwise_error(actual, expected):
    """max |actual - expected| / max(max |expected|, tiny): a scale-aware relative error."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(e))), 1e-300)
    return float(np.max(np.abs(a - e))) / scale


def assert_close(actual, expected, tol, what=""):
    err = normwise_error(actual, expected)
    assert err <= tol, f"{what}: normwise relative error {err:.3e} > {tol:.1e}"
    return err


# Normwise tolerances by dtype of the computation under test.
def to_float64(a):
    """The exact float64 values of an array (bfloat16 through its bits: the
    upper half of a float32)."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        bits = np.array(a, order="C").view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def ulp_distance(a, b):
    """Elementwise number of 16-bit values between ``a`` and ``b`` (0: equal, +0 == -0)."""
    def ordered(array):
        bits = np.array(array, order="C").view(np.uint16).astype(np.int64)
        magnitude = bits & 0x7FFF
        return np.where(bits & 0x8000, -magnitude, magnitude)
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert not np.any(np.isnan(to_float64(a))), "NaN in the result"
    return np.abs(ordered(a) - ordered(b))


def host(array):
    """A NumPy copy of a per-channel result (cuda keeps device arrays in the
    cache); None stays None."""
    return None if array is None else np.asarray(
        array if isinstance(array, np.ndarray) else array.copy_to_host())


TOL = {np.dtype(np.float64): 1e-11, np.dtype(np.float32): 2e-5}


def tol_for(dtype):
    return TOL[np.dtype(dtype)]


class Snapshot:
    """Copies of arrays, to check afterwards that none of them changed."""

    def __init__(self, **arrays):
        self._items = {k: (v, None if v is None else np.array(v, copy=True))
                       for k, v in arrays.items()}

    def assert_unchanged(self):
        for name, (orig, copy) in self._items.items():
            if orig is None:
                continue
            assert orig.shape == copy.shape, f"{name} changed shape"
            assert orig.dtype == copy.dtype, f"{name} changed dtype"
            same = (np.array_equal(orig, copy) if orig.dtype.kind in "OSUVb"
                    else np.array_equal(orig, copy, equal_nan=True))
            assert same, f"{name} was modified"


# ---------------------------------------------------------------------------
# Error log for the PyTorch parity report
# ---------------------------------------------------------------------------
MAX_ERRORS = {}


def record_error(key, value):
    """Keep the largest value seen for ``key`` (e.g. ('float64', 'dx'))."""
    key = tuple(key)
    if value > MAX_ERRORS.get(key, -1.0):
        MAX_ERRORS[key] = float(value)


# 16-bit results: largest distance, in units in the last place of the 16-bit
# type, from the float64 reference rounded once (fastbn's and PyTorch's).
MAX_ULPS = {}


def record_ulps(key, value):
    """Keep the largest ulp distance seen for ``key`` (e.g. ('float16', 'out', 'torch'))."""
    key = tuple(key)
    if value > MAX_ULPS.get(key, -1):
        MAX_ULPS[key] = int(value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    if MAX_ULPS:
        tr.section("fastbn: largest 16-bit errors in ulps of the correctly rounded result")
        for key in sorted(MAX_ULPS):
            tr.write_line(f"{' / '.join(map(str, key)):<60s} {MAX_ULPS[key]:d}")
    if not MAX_ERRORS:
        return
    tr.section("fastbn: largest normwise relative errors vs PyTorch")
    for key in sorted(MAX_ERRORS):
        tr.write_line(f"{' / '.join(map(str, key)):<45s} {MAX_ERRORS[key]:.3e}")
    path = os.environ.get("FASTBN_ERROR_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump({" / ".join(map(str, k)): v for k, v in sorted(MAX_ERRORS.items())},
                      fh, indent=1)


# ---------------------------------------------------------------------------
# Well-conditioned gradient-check problems
# ---------------------------------------------------------------------------
def gradcheck_problem(rng, shape, axis=1):
    """(x, gamma, beta, dout, running_mean, running_var), float64, for cs231n-style checks.

    cs231n's ``rel_error`` is elementwise, with a floor of 1e-8 in the
    denominator, and a central difference with h=1e-5 carries a roundoff of
    about 1e-10 (absolute) per element. With a random ``dout`` some element
    of ``dx`` lies near zero and the check fails for a correct backward about
    one time in ten. So ``dout`` is built as ``t + alpha + beta_c * xhat``
    per channel, with ``t`` orthogonal to the constants and to ``xhat`` and
    every ``|t_i|`` at least a fifth of ``max |t|``: then
    ``dx = gamma * invstd * t`` has no element near zero, while ``dbeta =
    M * alpha`` and ``dgamma ~ M * beta_c`` are far from zero and the
    backward must still remove the ``alpha`` and ``xhat`` parts correctly.
    The running statistics are close to the batch's, offset so that
    ``dgamma`` in evaluation mode cannot cancel either.
    """
    shape = tuple(shape)
    ax = axis % len(shape)
    C = shape[ax]
    bshape = [1] * len(shape)
    bshape[ax] = C
    x = (rng.standard_normal(shape) * rng.uniform(0.7, 1.5, C).reshape(bshape)
         + rng.uniform(-3, 3, C).reshape(bshape))
    gamma = rng.choice([-1.0, 1.0], size=C) * rng.uniform(0.5, 2.0, size=C)
    beta = rng.standard_normal(C)

    xc = np.moveaxis(x, ax, -1).reshape(-1, C)            # (M, C)
    M = xc.shape[0]
    mean, std = xc.mean(axis=0), xc.std(axis=0)
    xhat = (xc - mean) / std
    t = np.empty((M, C))
    for c in range(C):
        basis = np.linalg.qr(np.stack([np.ones(M), xhat[:, c]], axis=1),
                             mode="complete")[0][:, 2:]
        best, best_ratio = None, -1.0
        for _ in range(20):
            v = basis @ (basis.T @ rng.standard_normal(M))
            for _ in range(30):
                ratio = np.min(np.abs(v)) / np.max(np.abs(v))
                if ratio > best_ratio:
                    best, best_ratio = v / np.max(np.abs(v)), ratio
                v = np.sign(v) * np.maximum(np.abs(v), np.mean(np.abs(v)))
                v = basis @ (basis.T @ v)
        assert best_ratio > 0.2, f"no well-conditioned dout for M={M}"
        t[:, c] = best
    a = rng.choice([-1.0, 1.0], size=C) * rng.uniform(0.5, 2.0, size=C)
    b = rng.choice([-1.0, 1.0], size=C) * rng.uniform(0.5, 2.0, size=C)
    d = t + a + b * xhat
    dout = np.moveaxis(d.reshape(np.moveaxis(x, ax, -1).shape), -1, ax).copy()
    rm = mean - std * rng.uniform(0.1, 0.2, size=C) * np.sign(a * b)
    rv = std ** 2 * rng.uniform(0.7, 1.4, size=C)
    return x, gamma, beta, dout, rm, rv


# ---------------------------------------------------------------------------
# Kernel-level helpers for the backend-specific tests (3-D (A, C, B) arrays)
# ---------------------------------------------------------------------------

def make_kernel_case(shape, dtype, seed=0):
    """``x``, ``dy`` of ``dtype`` and float64 ``gamma``, ``beta`` holding ``dtype`` values."""
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal(shape) + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[1]
    gamma = rng.standard_normal(channels).astype(dtype).astype(np.float64)
    beta = rng.standard_normal(channels).astype(dtype).astype(np.float64)
    return x, dy, gamma, beta


def kernel_reference(x, gamma, beta, dy, eps=1e-5):
    """Every kernel's result in float64 NumPy, from the formulas, on ``(A, C, B)``."""
    x64 = x.astype(np.float64)
    dy64 = dy.astype(np.float64)
    count = x.shape[0] * x.shape[2]
    mean = x64.mean(axis=(0, 2))
    var = ((x64 - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x64 - mean[None, :, None]) * invstd[None, :, None]
    y = xhat * gamma[None, :, None] + beta[None, :, None]
    sum_dy = dy64.sum(axis=(0, 2))
    sum_dy_xhat = (dy64 * xhat).sum(axis=(0, 2))
    dx = (gamma * invstd)[None, :, None] * (
        dy64 - sum_dy[None, :, None] / count - xhat * sum_dy_xhat[None, :, None] / count)
    return dict(mean=mean, var=var, invstd=invstd, y=y, sum_dy=sum_dy,
                sum_dy_xhat=sum_dy_xhat, dx=dx)


# (shape, channel axis) pairs every parity test runs over
LAYOUTS = [
    ((16, 5), 1),
    ((4, 3, 10), 1),
    ((4, 3, 5, 6), 1),
    ((2, 3, 2, 3, 4), 1),
    ((4, 5, 6, 3), -1),
]


def layout_ids(layouts):
    return [f"{shape}-axis{axis}" for shape, axis in layouts]


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch's intra-op threads spin against the backends' own on tiny
    tensors (8 ms per call instead of 0.1 ms on 2 cores): the torch tests use
    one (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_training_step(stock, model, x, *, run=None, tol=1e-10):
    """Run a PyTorch model and its converted copy on ``x``, backpropagate the
    sum of squares of each output, and assert equal outputs and parameter
    gradients (matched by parameter name).

    ``run`` is the module to call in place of ``model`` where it differs (a
    traced copy sharing ``model``'s parameters).
    """
    import torch

    outputs = [net(x) for net in (stock, model if run is None else run)]
    for out in outputs:
        out.square().sum().backward()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=tol, atol=tol)
    stock_parameters = dict(stock.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, stock_parameters[name].grad,
                                   rtol=tol, atol=tol, msg=name)
