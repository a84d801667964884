"""The kernel contract (``fastbn.backends``), tested once for every backend module.

Each property runs over the backends that ``conftest.backend_params()``
selects (``FASTBN_TEST_BACKENDS``), in each backend's own shape classes and
module settings (:mod:`contract_support`): the kernels are called directly on
3-D ``(A, C, B)`` arrays and compared with the float64 formulas of
``conftest.kernel_reference``. A new backend gets a :class:`Spec` there and
passes this suite.

Tolerances come from the arithmetic: float64 statistics and sums carry a
few float64 roundings of their terms (1e-13 .. 1e-12 normwise); an
elementwise result of float32 storage is rounded once to float32 from a
computation in float32 or float64 (a few roundings of terms no larger than
the result's scale: 1e-6); the staged graph rounds each of its ten stages to
the compute dtype (1e-5 for float32 stages, 1e-11 for float64).
"""
import numpy as np
import pytest
from contract_support import EPS, NOT_CONTRACT, SPECS

from conftest import Snapshot, backend_params, kernel_reference, make_kernel_case
from conftest import normwise_error

FLOATS = [np.float32, np.float64]
ELEMENTWISE = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
STAGED = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-11}


def property_of(name):
    """Mark a test as running over the shape classes of property ``name``."""
    def mark(test):
        test.contract_property = name
        return test
    return mark


def pytest_generate_tests(metafunc):
    prop = getattr(metafunc.function, "contract_property", None)
    if prop is None:
        return
    params = []
    for backend in backend_params():
        name, marks = backend.values[0], list(backend.marks)
        if name in NOT_CONTRACT:
            params.append(pytest.param((name, None, None), id=name, marks=marks + [
                pytest.mark.skip(reason=f"{name}: {NOT_CONTRACT[name]}")]))
            continue
        spec = SPECS[name]
        classes = spec.properties.get(prop, [])
        if not classes:
            params.append(pytest.param((name, None, None), id=name, marks=marks + [
                pytest.mark.skip(reason=f"{prop}: not applicable to the {name} backend")]))
        for mode in spec.modes:
            for shape_class in classes:
                label = name if mode == "default" else f"{name}-{mode}"
                params.append(pytest.param((name, mode, shape_class),
                                           id=f"{label}-{shape_class}", marks=marks))
    metafunc.parametrize("case", params, indirect=True)


class Case:
    def __init__(self, spec, shape, monkeypatch, cleanup):
        self.spec, self.module, self.shape = spec, spec.module, shape
        self._monkeypatch, self._cleanup = monkeypatch, cleanup

    def threads(self, value):
        self.spec.threads(self._monkeypatch, self._cleanup, value)


@pytest.fixture
def case(request, monkeypatch):
    name, mode, shape_class = request.param
    spec = SPECS[name]
    cleanup = []
    try:
        yield Case(spec, spec.configure(monkeypatch, cleanup, mode, shape_class),
                   monkeypatch, cleanup)
    finally:
        for undo in reversed(cleanup):
            undo()


def check(actual, expected, tol, what):
    """Within ``tol`` normwise (relative to max |expected|) and elementwise
    (``tol`` absolute plus ``tol`` relative)."""
    actual = np.asarray(actual, np.float64)
    error = normwise_error(actual, expected)
    assert error <= tol, f"{what}: normwise relative error {error:.2e} > {tol:.0e}"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


def grads_tolerance(case, dtype):
    """float64 sums: a few float64 roundings; float32 sums: rounded once."""
    return 1e-12 if case.spec.grads_dtype(dtype) == np.float64 else 1e-6


def run_all(case, x, dy, gamma, beta, relu=False):
    """Every kernel of the contract once, on the backend's own arrays; the
    results as host arrays (pairs of per-channel results as tuples)."""
    spec, kernels = case.spec, case.module
    d_x, d_dy, d_gamma, d_beta = map(spec.put, (x, dy, gamma, beta))
    fused = {"beta": d_beta, "relu": True} if relu else {}

    def new():
        return spec.empty(x.shape, x.dtype)

    res = {"stats": kernels.stats(d_x), "out": new(), "normalized": new(), "dx": new(),
           "dx_elemt": new(), "dx_staged": new()}
    mean, invstd = res["forward"] = kernels.forward_train(d_x, d_gamma, d_beta, EPS,
                                                          res["out"], relu=relu)
    kernels.normalize(d_x, mean, invstd, d_gamma, d_beta, res["normalized"], relu=relu)
    res["reduce"] = kernels.backward_reduce(d_dy, d_x, mean, invstd,
                                            *((d_gamma, d_beta, True) if relu else ()))
    kernels.backward_elemt(d_dy, d_x, mean, invstd, d_gamma, *res["reduce"], res["dx_elemt"],
                           **fused)
    res["train"] = kernels.backward_train(d_dy, d_x, mean, invstd, d_gamma, res["dx"], **fused)
    res["staged"] = kernels.backward_staged(d_dy, d_x, mean, invstd, d_gamma, EPS,
                                            res["dx_staged"], **fused)
    return {key: tuple(map(spec.get, value)) if isinstance(value, tuple) else spec.get(value)
            for key, value in res.items()}


def flat_results(res):
    for key, value in res.items():
        for index, array in enumerate(value if isinstance(value, tuple) else (value,)):
            yield f"{key}[{index}]", array


# ---------------------------------------------------------------------------
# Every kernel against the float64 reference, in every shape class
# ---------------------------------------------------------------------------

@property_of("reference")
@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
def test_kernels_match_float64_reference(case, dtype):
    x, dy, gamma, beta = make_kernel_case(case.shape, dtype)
    ref = kernel_reference(x, gamma, beta, dy, EPS)
    res = run_all(case, x, dy, gamma, beta)
    tol, staged = ELEMENTWISE[np.dtype(dtype)], STAGED[np.dtype(dtype)]
    grads_tol = grads_tolerance(case, dtype)
    mean, var = res["stats"]
    mean_f, invstd_f = res["forward"]
    for values in (mean, var, mean_f, invstd_f, *res["reduce"]):
        assert values.dtype == np.float64 and values.shape == (case.shape[1],)
    check(mean, ref["mean"], 1e-13, "stats mean")
    check(var, ref["var"], 1e-12, "stats var")
    check(mean_f, ref["mean"], 1e-13, "forward_train mean")
    check(invstd_f, ref["invstd"], 1e-12, "forward_train invstd")
    # the statistics of the two paths are the same sums in the same order
    np.testing.assert_array_equal(mean, mean_f)
    np.testing.assert_array_equal(1.0 / np.sqrt(var + EPS), invstd_f)
    for key in ("out", "normalized"):
        assert res[key].dtype == x.dtype
        check(res[key], ref["y"], tol, key)
    check(res["reduce"][0], ref["sum_dy"], 1e-12, "backward_reduce sum_dy")
    check(res["reduce"][1], ref["sum_dy_xhat"], 1e-12, "backward_reduce sum_dy_xhat")
    sum_dy, sum_dy_xhat = res["train"]
    assert sum_dy.dtype == sum_dy_xhat.dtype == case.spec.grads_dtype(dtype)
    check(sum_dy, ref["sum_dy"], grads_tol, "backward_train sum_dy")
    check(sum_dy_xhat, ref["sum_dy_xhat"], grads_tol, "backward_train sum_dy_xhat")
    for key in ("dx", "dx_elemt"):
        assert res[key].dtype == x.dtype
        check(res[key], ref["dx"], tol, key)
    dgamma, dbeta = res["staged"]
    assert dgamma.dtype == dbeta.dtype == case.spec.grads_dtype(dtype)
    check(dbeta, ref["sum_dy"], grads_tol, "staged dbeta")
    check(dgamma, ref["sum_dy_xhat"], staged, "staged dgamma")
    check(res["dx_staged"], ref["dx"], staged, "staged dx")


# ---------------------------------------------------------------------------
# Thread count (CPU) or block size (CUDA) changes no result
# ---------------------------------------------------------------------------

@property_of("threads")
@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_results_do_not_depend_on_thread_count(case, dtype):
    """float64: every kernel; 16-bit: every kernel with the fused ReLU, bit
    for bit. The CPU backends split each reduction by shape alone (threads
    decide who sums a chunk, never how); a CUDA block size changes the
    float64 summation order, so results there may move by a few float64
    roundings (``Spec.thread_atol``)."""
    spec = case.spec
    if not spec.thread_settings:
        pytest.skip(f"the {spec.name} backend has no thread count to vary")
    half = dtype != "float64"
    if half and spec.thread_atol:
        pytest.skip("16-bit results are bitwise only where the summation order is fixed")
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x, dy, gamma, beta = make_kernel_case(case.shape, np.float32 if half else np.float64,
                                          seed=1)
    x, dy = x.astype(dtype), dy.astype(dtype)
    runs = []
    for threads in spec.thread_settings:
        case.threads(threads)
        runs.append(dict(flat_results(run_all(case, x, dy, gamma, beta, relu=half))))
    for other in runs[1:]:
        for key, first in runs[0].items():
            if half:
                np.testing.assert_array_equal(other[key].view(np.uint8), first.view(np.uint8),
                                              err_msg=key)
            else:
                np.testing.assert_allclose(other[key], first, rtol=1e-12, err_msg=key,
                                           atol=spec.thread_atol * np.max(np.abs(first)))


# ---------------------------------------------------------------------------
# Accuracy corner cases
# ---------------------------------------------------------------------------

@property_of("constant_nan")
@pytest.mark.parametrize("position", ["first", "last"])
def test_constant_channels_and_nan_stay_in_their_channel(case, position):
    """float32: channel 1 holds a NaN (first or last element), channel 2 (if
    any) is random, every other channel is the constant 1e7: variance exactly
    0, ``out`` exactly ``beta`` there; NaN in channel 1's results only."""
    A, C, B = case.shape
    x, dy, gamma, beta = make_kernel_case(case.shape, np.float32, seed=3)
    constant = [c for c in range(C) if c not in (1, 2)]
    x[:, constant, :] = np.float32(1e7)
    x[(0, 1, 0) if position == "first" else (A - 1, 1, B - 1)] = np.nan
    res = run_all(case, x, dy, gamma, beta)
    mean, var = res["stats"]
    mean_f, invstd_f = res["forward"]
    assert np.all(var[constant] == 0.0) and np.all(mean[constant] == 1e7)
    assert np.all(mean_f[constant] == 1e7) and np.all(invstd_f[constant] == 1 / np.sqrt(EPS))
    want = np.broadcast_to(beta[constant].astype(np.float32)[None, :, None],
                           (A, len(constant), B))
    np.testing.assert_array_equal(res["out"][:, constant, :], want)
    assert np.isnan(mean_f[1]) and np.isnan(invstd_f[1])
    assert np.all(np.isfinite(np.delete(mean_f, 1))) and np.all(np.isfinite(np.delete(invstd_f, 1)))
    for key in ("out", "normalized", "dx", "dx_elemt", "dx_staged"):
        assert np.all(np.isnan(res[key][:, 1, :])), key
        assert np.all(np.isfinite(np.delete(res[key], 1, axis=1))), key


@property_of("large_mean")
def test_float32_large_mean_is_centred_accurately(case):
    """mean = 1e4 * std (of x and of dy): the centring is done in float64 (or
    with a split mean = hi + lo), so out is within 1e-4 of the float64
    formula, and dx within 1e-4 of its scale."""
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal(case.shape)).astype(np.float32)
    dy = (1e4 + rng.standard_normal(case.shape)).astype(np.float32)
    C = case.shape[1]
    gamma, beta = np.ones(C), np.zeros(C)
    ref = kernel_reference(x, gamma, beta, dy, EPS)
    spec, kernels = case.spec, case.module
    d_x, d_dy, d_gamma, d_beta = map(spec.put, (x, dy, gamma, beta))
    out, dx = spec.empty(x.shape, x.dtype), spec.empty(x.shape, x.dtype)
    mean, invstd = kernels.forward_train(d_x, d_gamma, d_beta, EPS, out)
    kernels.backward_train(d_dy, d_x, mean, invstd, d_gamma, dx)
    assert np.max(np.abs(spec.get(out) - ref["y"])) < 1e-4
    assert np.max(np.abs(spec.get(dx) - ref["dx"])) < 1e-4 * np.max(np.abs(ref["dx"]))


@property_of("read_only")
def test_read_only_inputs_work_and_are_not_modified(case):
    """Read-only ``x`` and ``dy`` (and ``gamma``, ``beta`` where the backend
    takes read-only per-channel arrays: the API passes fresh ones)."""
    x, dy, gamma, beta = make_kernel_case(case.shape, np.float32, seed=5)
    for array in (x, dy, gamma, beta) if case.spec.read_only_params else (x, dy):
        array.flags.writeable = False
    inputs = Snapshot(x=x, dy=dy, gamma=gamma, beta=beta)
    results = run_all(case, x, dy, gamma, beta)
    inputs.assert_unchanged()
    for key, array in flat_results(results):
        assert np.all(np.isfinite(array)), key


# ---------------------------------------------------------------------------
# Running statistics and the evaluation kernels
# ---------------------------------------------------------------------------

@property_of("running")
@pytest.mark.parametrize("running_dtype", ["float32", "float64", "float16", "strided"])
@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
def test_running_statistics_and_eval_kernels(case, dtype, running_dtype):
    """forward_train updates the running statistics in place (PyTorch's rule:
    momentum weighs the batch, unbiased variance); forward_eval and
    backward_eval use them as constants."""
    spec, kernels = case.spec, case.module
    if running_dtype == "strided" and not spec.strided_running:
        pytest.skip(f"the {spec.name} backend takes contiguous running statistics")
    x, dy, gamma, beta = make_kernel_case(case.shape, dtype, seed=8)
    A, C, B = x.shape
    M = A * B
    ref = kernel_reference(x, gamma, beta, dy, EPS)
    rng = np.random.default_rng(9)
    if running_dtype == "strided":
        buffers = np.zeros((2, C, 2))
        running_mean, running_var = buffers[0, :, 1], buffers[1, :, 1]
    else:
        running_mean = np.empty(C, dtype=running_dtype)
        running_var = np.empty(C, dtype=running_dtype)
    running_mean[...] = rng.standard_normal(C)
    running_var[...] = rng.uniform(0.5, 2.0, C)
    start_mean, start_var = running_mean.astype(np.float64), running_var.astype(np.float64)
    d_x, d_dy, d_gamma, d_beta, d_mean, d_var = map(
        spec.put, (x, dy, gamma, beta, running_mean, running_var))
    out = spec.empty(x.shape, x.dtype)
    momentum = 0.3
    mean_t, invstd_t = kernels.forward_train(d_x, d_gamma, d_beta, EPS, out, d_mean, d_var,
                                             momentum)
    check(spec.get(mean_t), ref["mean"], 1e-13, "forward_train mean")
    check(spec.get(invstd_t), ref["invstd"], 1e-12, "forward_train invstd")
    new_mean, new_var = spec.get(d_mean), spec.get(d_var)
    assert new_mean.dtype == new_var.dtype == running_mean.dtype
    # one rounding to the running dtype
    rtol = {"float16": 1e-3, "float32": 1e-6}.get(running_dtype, 1e-12)
    want_mean = (1 - momentum) * start_mean + momentum * ref["mean"]
    want_var = (1 - momentum) * start_var + momentum * ref["var"] * M / (M - 1)
    np.testing.assert_allclose(new_mean, want_mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(new_var, want_var, rtol=rtol, atol=rtol)

    mean, invstd = map(spec.get, kernels.forward_eval(d_x, d_gamma, d_beta, d_mean, d_var,
                                                      EPS, out))
    np.testing.assert_array_equal(mean, new_mean.astype(np.float64))
    # 1 / sqrt(var + eps): three float64 roundings
    np.testing.assert_allclose(invstd, 1 / np.sqrt(new_var.astype(np.float64) + EPS),
                               rtol=1e-15, atol=0)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    tol = ELEMENTWISE[np.dtype(dtype)]
    check(spec.get(out), (x64 - mean[:, None]) * (invstd * gamma)[:, None] + beta[:, None],
          tol, "forward_eval out")

    dx = spec.empty(x.shape, x.dtype)
    sum_dy, sum_dy_xhat = map(spec.get, kernels.backward_eval(d_dy, d_x, spec.put(mean),
                                                              spec.put(invstd), d_gamma, dx))
    check(spec.get(dx), dy64 * (gamma * invstd)[:, None], tol, "backward_eval dx")
    grads_tol = grads_tolerance(case, dtype)
    check(sum_dy, dy64.sum(axis=(0, 2)), grads_tol, "backward_eval sum_dy")
    want_sum = (dy64 * (x64 - mean[:, None]) * invstd[:, None]).sum(axis=(0, 2))
    check(sum_dy_xhat, want_sum, grads_tol, "backward_eval sum_dy_xhat")


# ---------------------------------------------------------------------------
# Module attributes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", backend_params())
def test_availability_and_info(name):
    if name in NOT_CONTRACT:
        pytest.skip(NOT_CONTRACT[name])
    kernels = SPECS[name].module
    available, reason = kernels.availability()
    assert available is True and reason == ""
    info = kernels.info()
    assert set(info) >= {"threads", "openmp", "device"}
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert kernels.ON_DEVICE is SPECS[name].on_device
