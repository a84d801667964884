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

16-bit storage and the fused ReLU are held to bounds derived element by
element from the contract's arithmetic (``contract_support``: exact 16-bit
loads, float32 partial sums of at most ``Spec.sum_block()`` terms merged in
float64, a few float32 roundings of each result's terms, one rounding to
nearest even into the output), so they hold for any summation order or
vectorization a compiler picks. Known contract failures are strict expected
failures (``contract_support.KNOWN_FAILURES``).
"""
import numpy as np
import pytest
from contract_support import (EPS, HALF, KNOWN_FAILURES, NOT_CONTRACT, PRODUCT_TERM_ROUNDINGS,
                              SPECS, STORAGE, U32, U64, backward_expectation, centred, compute_unit,
                              eval_expectation, forward_expectation, half_case, integer_dy,
                              invstd_bound, per_channel, rounded_once, rounding_targets,
                              rounding_unit, spacing, staged_expectation, statistics_bounds,
                              storage_dtype, sum_block, sum_bound)

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
        spec = SPECS.get(name)
        classes = spec.properties.get(prop, []) if spec is not None else []
        if not classes:
            reason = NOT_CONTRACT.get(name, f"{prop}: not applicable to the {name} backend")
            params.append(pytest.param((name, None, None), id=name, marks=marks + [
                pytest.mark.skip(reason=f"{name}: {reason}")]))
            continue
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
    storage = getattr(request.node, "callspec", None) and request.node.callspec.params.get(
        "storage")
    known = KNOWN_FAILURES.get((name, request.function.__name__, storage))
    if known:
        request.node.add_marker(pytest.mark.xfail(reason=f"{name}: {known}", strict=True))
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
# 16-bit storage: error bounds of every kernel, and the once-rounded store
# ---------------------------------------------------------------------------

def within(actual, expected, bound, what):
    """|actual - expected| <= bound, elementwise."""
    actual = np.asarray(actual, np.float64)
    error = np.abs(actual - expected)
    bad = ~(error <= bound)
    if bad.any():
        i = np.argmax(np.where(bad, error / np.maximum(bound, 1e-300), 0))
        pytest.fail(f"{what}: {np.count_nonzero(bad)} of {bad.size} beyond the bound, e.g. "
                    f"{actual.flat[i]!r} vs {expected.flat[i]!r}: error {error.flat[i]:.3e} > "
                    f"bound {np.asarray(bound).flat[i]:.3e}")


def check_stored(got, want, slack, dtype, what):
    """Each stored element within half a spacing of the storage dtype (at the
    stored value: one rounding to nearest) plus ``slack`` (the roundings of
    the compute dtype before the store) of the float64 ``want``: so within
    one ulp of ``want`` rounded once, up to ``slack``."""
    got = np.asarray(got)
    assert got.dtype == dtype, (what, got.dtype)
    got64 = got.astype(np.float64)
    assert np.all(np.isfinite(got64)), f"{what}: non-finite results"
    half_ulp = 0.5 * spacing(got64, dtype)
    within(got64, want, half_ulp + slack, what)


@property_of("half")
@pytest.mark.parametrize("storage", HALF)
def test_16bit_kernels_within_their_error_bounds(case, storage):
    """Every kernel on float16 / bfloat16 storage, held to what the contract's
    arithmetic guarantees on any machine (``contract_support``):

    * statistics: 16-bit values exact in float32, float32 partial sums of at
      most ``Spec.sum_block()`` terms merged in float64
      (``statistics_bounds``: gamma(block + 3) in float32 units of the
      channel's range, plus float64 merges);
    * sums of ``dy`` and ``dy * xhat``: ``sum_bound`` (gamma(block +
      roundings of a term) float32 units of the sum of |terms|, plus the
      float64 merge), and one float32 rounding more where a backend returns
      float32 gradients;
    * every stored element: within half a 16-bit spacing (the one rounding
      into the output) of the kernel's float32 result, itself within a few
      float32 roundings of its terms' magnitude (``*_expectation``) of the
      float64 formula applied to the kernel's own statistics or sums.

    Channel 0 has a mean 2000 times its spread."""
    dtype = storage_dtype(storage)
    spec, kernels = case.spec, case.module
    block = sum_block(spec, dtype)
    grads_unit = rounding_unit(spec.grads_dtype(dtype))
    x, dy, gamma_, beta = half_case(case.shape, dtype, seed=30)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    ref = kernel_reference(x, gamma_, beta, dy, EPS)
    d_x, d_dy, d_gamma, d_beta = map(spec.put, (x, dy, gamma_, beta))

    mean_bound, var_bound = statistics_bounds(x64, block)
    mean_s, var_s = map(spec.get, kernels.stats(d_x))
    within(mean_s, ref["mean"], mean_bound, "stats mean")
    within(var_s, ref["var"], var_bound, "stats var")
    out = spec.empty(x.shape, dtype)
    d_mean, d_invstd = kernels.forward_train(d_x, d_gamma, d_beta, EPS, out)
    mean, invstd = spec.get(d_mean), spec.get(d_invstd)
    within(mean, ref["mean"], mean_bound, "forward_train mean")
    within(invstd, ref["invstd"], invstd_bound(ref["var"], var_bound, EPS),
           "forward_train invstd")

    want, slack = forward_expectation(x64, mean, invstd, gamma_, beta, U32)
    check_stored(spec.get(out), want, slack, dtype, "forward_train out")
    out = spec.empty(x.shape, dtype)
    kernels.normalize(d_x, d_mean, d_invstd, d_gamma, d_beta, out)
    check_stored(spec.get(out), want, slack, dtype, "normalize out")
    running_mean, running_var = mean + 0.5 / invstd, 1.5 / invstd**2
    out = spec.empty(x.shape, dtype)
    mean_e, invstd_e = map(spec.get, kernels.forward_eval(
        d_x, d_gamma, d_beta, spec.put(running_mean), spec.put(running_var), EPS, out))
    np.testing.assert_array_equal(mean_e, running_mean)
    # 1 / sqrt(var + eps): three float64 roundings
    np.testing.assert_allclose(invstd_e, 1 / np.sqrt(running_var + EPS), rtol=4 * U64, atol=0)
    want, slack = forward_expectation(x64, mean_e, invstd_e, gamma_, beta, U32)
    check_stored(spec.get(out), want, slack, dtype, "forward_eval out")

    # the backward kernels, over the forward's statistics
    _, xhat, xhat_magnitude = centred(x64, mean, invstd)
    sum_dy, sum_dy_xhat = dy64.sum(axis=(0, 2)), (dy64 * xhat).sum(axis=(0, 2))
    sum_dy_bound = sum_bound(np.abs(dy64), 0, dtype, block)
    sum_dy_xhat_bound = sum_bound(np.abs(dy64) * xhat_magnitude, PRODUCT_TERM_ROUNDINGS,
                                  dtype, block)

    def check_sums(sums, unit, what):
        for got, exact, bound, name in ((sums[0], sum_dy, sum_dy_bound, "sum_dy"),
                                        (sums[1], sum_dy_xhat, sum_dy_xhat_bound,
                                         "sum_dy_xhat")):
            within(got, exact, bound + unit * (np.abs(exact) + bound), f"{what} {name}")

    d_sums = kernels.backward_reduce(d_dy, d_x, d_mean, d_invstd)
    sums = tuple(map(spec.get, d_sums))
    check_sums(sums, 0.0, "backward_reduce")
    dx = spec.empty(x.shape, dtype)
    kernels.backward_elemt(d_dy, d_x, d_mean, d_invstd, d_gamma, *d_sums, dx)
    want, slack = backward_expectation(dy64, x64, mean, invstd, gamma_, *sums, U32)
    check_stored(spec.get(dx), want, slack, dtype, "backward_elemt dx")

    dx = spec.empty(x.shape, dtype)
    sums = tuple(map(spec.get, kernels.backward_train(d_dy, d_x, d_mean, d_invstd, d_gamma, dx)))
    check_sums(sums, grads_unit, "backward_train")
    want, slack = backward_expectation(dy64, x64, mean, invstd, gamma_, *sums, U32,
                                       sums_unit=grads_unit)
    check_stored(spec.get(dx), want, slack, dtype, "backward_train dx")

    dx = spec.empty(x.shape, dtype)
    sums = tuple(map(spec.get, kernels.backward_eval(d_dy, d_x, d_mean, d_invstd, d_gamma, dx)))
    check_sums(sums, grads_unit, "backward_eval")
    want, slack = eval_expectation(dy64, invstd, gamma_, U32)
    check_stored(spec.get(dx), want, slack, dtype, "backward_eval dx")

    dx = spec.empty(x.shape, dtype)
    dgamma, dbeta = map(spec.get, kernels.backward_staged(d_dy, d_x, d_mean, d_invstd, d_gamma,
                                                          EPS, dx))
    check_sums((dbeta, dgamma), grads_unit, "backward_staged")
    want, slack = staged_expectation(dy64, x64, mean, invstd, gamma_, U32, block)
    check_stored(spec.get(dx), want, slack, dtype, "backward_staged dx")


@property_of("exact")
@pytest.mark.parametrize("arrangement", ["along_B", "along_A"])
@pytest.mark.parametrize("storage", HALF)
def test_16bit_results_are_rounded_once_to_nearest_even(case, storage, arrangement):
    """normalize, forward_eval, backward_eval and backward_elemt on inputs
    whose results are exact in float32 (``rounding_targets``: mean 0, invstd
    1, zero sums, power-of-two or short gamma and beta): each stored value is
    that result rounded once, to nearest even, bit for bit. Values kept
    exactly, ties both ways, a float32 ulp either side of a tie, subnormals,
    the tie to zero and the tie past the largest value (to infinity); a NaN
    stays NaN. Every channel holds all values, along B or along A
    (rows or columns layouts); the module settings are those of the case."""
    dtype = storage_dtype(storage)
    spec, kernels = case.spec, case.module
    values, gamma_, beta = rounding_targets(dtype)
    grid = np.broadcast_to(values, (gamma_.size, values.size))
    x = np.ascontiguousarray(grid[None, :, :] if arrangement == "along_B" else grid.T[:, :, None])
    products = x.astype(np.float32).astype(np.float64) * per_channel(gamma_)
    y = products + per_channel(beta)
    for exact in (products, y):           # exact in float32: the store is its only rounding
        np.testing.assert_array_equal(exact.astype(np.float32).astype(np.float64), exact)
    C = gamma_.size
    zeros, ones = spec.put(np.zeros(C)), spec.put(np.ones(C))
    d_x, d_zero_x, d_gamma, d_beta = map(spec.put, (x, np.zeros_like(x), gamma_, beta))
    results = {}
    with np.errstate(over="ignore"):      # the ties past the largest value round to inf
        out = spec.empty(x.shape, dtype)
        kernels.normalize(d_x, zeros, ones, d_gamma, d_beta, out)
        results["normalize"] = (spec.get(out), y)
        out = spec.empty(x.shape, dtype)
        kernels.forward_eval(d_x, d_gamma, d_beta, zeros, ones, 0.0, out)    # invstd = 1
        results["forward_eval"] = (spec.get(out), y)
        out = spec.empty(x.shape, dtype)
        kernels.backward_eval(d_x, d_zero_x, zeros, ones, d_gamma, out)      # dx = dy * gamma
        results["backward_eval"] = (spec.get(out), products)
        out = spec.empty(x.shape, dtype)
        kernels.backward_elemt(d_x, d_zero_x, zeros, ones, d_gamma, zeros, zeros, out)
        results["backward_elemt"] = (spec.get(out), products)
    nan = np.isnan(y)
    for kernel, (got, exact) in results.items():
        assert got.dtype == dtype, kernel
        assert np.all(np.isnan(got[nan].astype(np.float32))), f"{kernel}: NaN not kept"
        want = rounded_once(exact, dtype)
        wrong = got.view(np.uint16) != want.view(np.uint16)
        wrong &= ~nan
        assert not wrong.any(), (
            f"{kernel}: {np.count_nonzero(wrong)} values not rounded once to nearest even, "
            f"e.g. exact {exact[wrong][:4]} -> {got[wrong][:4].astype(np.float64)}, "
            f"want {want[wrong][:4].astype(np.float64)}")


# ---------------------------------------------------------------------------
# The fused ReLU equals BN then ReLU
# ---------------------------------------------------------------------------

@property_of("relu")
@pytest.mark.parametrize("storage", STORAGE)
def test_fused_relu_equals_separate_passes(case, storage):
    """Forward with relu == max(plain forward, 0), bit for bit (the same
    normalize arithmetic, then max); every backward kernel with relu == the
    same kernel on dy * (forward out > 0).

    A plain and a fused kernel may be compiled apart, and a compiler may
    vectorize, reassociate and contract each differently (how depends on the
    CPU). So the comparison is exact where the arithmetic is exact in any
    order, and bounded by the arithmetic elsewhere:

    * dy holds small integers, so ``sum(dy)`` over any mask is exact: the
      fused kernel's must equal, bit for bit, the plain kernel's on the
      masked dy and the float64 sum over the forward's ``out > 0``. A wrong
      mask element moves it by at least 1.
    * ``sum(dy * xhat)``: both within ``sum_bound`` of the float64 sum, so
      within twice it of each other (plus a float32 rounding each where the
      backend returns float32 gradients).
    * dx: both within half a storage spacing plus the compute roundings
      (``backward_expectation``, ``staged_expectation``) of the float64
      formula, so within one spacing plus twice those of each other, plus
      what their own sums' difference moves them by. Where the mask drops
      an element, the dx it would have had differs by ``|gamma * invstd *
      dy| >= |gamma * invstd|``, which the test checks is larger than that
      tolerance.
    """
    dtype = storage_dtype(storage)
    spec, kernels = case.spec, case.module
    block, unit = sum_block(spec, dtype), compute_unit(dtype)
    grads_unit = rounding_unit(spec.grads_dtype(dtype))
    x, _, gamma_, beta = make_kernel_case(case.shape, np.float32, seed=31)
    x, beta = x.astype(dtype), beta / 4     # the mask keeps 20% to 80% of the elements
    dy = integer_dy(x.shape, dtype, seed=32)
    x64 = x.astype(np.float64)
    M = x.shape[0] * x.shape[2]
    d_x, d_dy, d_gamma, d_beta = map(spec.put, (x, dy, gamma_, beta))
    fused = {"beta": d_beta, "relu": True}

    out, out_relu = spec.empty(x.shape, dtype), spec.empty(x.shape, dtype)
    d_mean, d_invstd = kernels.forward_train(d_x, d_gamma, d_beta, EPS, out)
    mean_r, invstd_r = kernels.forward_train(d_x, d_gamma, d_beta, EPS, out_relu, relu=True)
    mean, invstd = spec.get(d_mean), spec.get(d_invstd)
    np.testing.assert_array_equal(spec.get(mean_r), mean)
    np.testing.assert_array_equal(spec.get(invstd_r), invstd)
    out = spec.get(out).astype(np.float64)
    np.testing.assert_array_equal(spec.get(out_relu).astype(np.float64), np.maximum(out, 0))
    kept = out > 0
    assert 0.2 < np.mean(kept) < 0.8
    d_rm, d_rv = spec.put(mean), spec.put(1 / invstd**2 - EPS)
    out_eval, out_eval_relu = spec.empty(x.shape, dtype), spec.empty(x.shape, dtype)
    kernels.forward_eval(d_x, d_gamma, d_beta, d_rm, d_rv, EPS, out_eval)
    kernels.forward_eval(d_x, d_gamma, d_beta, d_rm, d_rv, EPS, out_eval_relu, relu=True)
    np.testing.assert_array_equal(spec.get(out_eval_relu).astype(np.float64),
                                  np.maximum(spec.get(out_eval).astype(np.float64), 0))

    dym = np.where(kept, dy, np.zeros((), dtype))
    d_dym = spec.put(dym)
    dym64 = dym.astype(np.float64)
    exact_sum_dy = dym64.sum(axis=(0, 2))
    _, xhat, xhat_magnitude = centred(x64, mean, invstd)
    k = np.abs(per_channel(gamma_ * invstd))
    sum_dy_xhat_bound = 2 * sum_bound(np.abs(dym64) * xhat_magnitude, PRODUCT_TERM_ROUNDINGS,
                                      dtype, block)

    def check_sums(got, want, rounded, what):
        sum_dy, sum_dy_xhat = map(spec.get, got)
        want_dy, want_dy_xhat = map(spec.get, want)
        np.testing.assert_array_equal(sum_dy, want_dy, err_msg=what)
        np.testing.assert_array_equal(sum_dy, exact_sum_dy, err_msg=what)
        rounding = 2 * grads_unit * np.abs(want_dy_xhat) if rounded else 0.0
        within(sum_dy_xhat, want_dy_xhat, sum_dy_xhat_bound + rounding, f"{what} sum_dy_xhat")
        return want_dy_xhat

    def check_dx(got, want, slack, what):
        got64, want64 = spec.get(got).astype(np.float64), spec.get(want).astype(np.float64)
        tol = spacing(np.maximum(np.abs(got64), np.abs(want64)), dtype) + 2 * slack
        # a wrong mask element would move dx by |k * dy| >= |k|: far outside tol
        assert np.all((k * np.abs(dy.astype(np.float64)) > tol)[~kept]), what
        within(got64, want64, tol, f"{what} dx")

    for kernel in ("backward_train", "backward_eval"):
        dx, dx_ref = spec.empty(x.shape, dtype), spec.empty(x.shape, dtype)
        got = getattr(kernels, kernel)(d_dy, d_x, d_mean, d_invstd, d_gamma, dx, **fused)
        want = getattr(kernels, kernel)(d_dym, d_x, d_mean, d_invstd, d_gamma, dx_ref)
        sum_dy_xhat = check_sums(got, want, True, kernel)
        if kernel == "backward_train":
            _, slack = backward_expectation(dym64, x64, mean, invstd, gamma_, exact_sum_dy,
                                            sum_dy_xhat, unit, sums_unit=grads_unit)
            # the two kernels' own sums differ by up to sum_dy_xhat_bound
            slack = slack + k * xhat_magnitude * per_channel(sum_dy_xhat_bound) / M
        else:
            _, slack = eval_expectation(dym64, invstd, gamma_, unit)
        check_dx(dx, dx_ref, slack, kernel)

    got = kernels.backward_reduce(d_dy, d_x, d_mean, d_invstd, d_gamma, d_beta, relu=True)
    want = kernels.backward_reduce(d_dym, d_x, d_mean, d_invstd)
    sum_dy_xhat = check_sums(got, want, False, "backward_reduce")
    dx, dx_ref = spec.empty(x.shape, dtype), spec.empty(x.shape, dtype)
    kernels.backward_elemt(d_dy, d_x, d_mean, d_invstd, d_gamma, *want, dx, **fused)
    kernels.backward_elemt(d_dym, d_x, d_mean, d_invstd, d_gamma, *want, dx_ref)
    _, slack = backward_expectation(dym64, x64, mean, invstd, gamma_, exact_sum_dy, sum_dy_xhat,
                                    unit)
    check_dx(dx, dx_ref, slack, "backward_elemt")

    dx, dx_ref = spec.empty(x.shape, dtype), spec.empty(x.shape, dtype)
    dgamma, dbeta = kernels.backward_staged(d_dy, d_x, d_mean, d_invstd, d_gamma, EPS, dx,
                                            **fused)
    want_dgamma, want_dbeta = kernels.backward_staged(d_dym, d_x, d_mean, d_invstd, d_gamma, EPS,
                                                      dx_ref)
    check_sums((dbeta, dgamma), (want_dbeta, want_dgamma), True, "backward_staged")
    _, slack = staged_expectation(dym64, x64, mean, invstd, gamma_, unit, block)
    check_dx(dx, dx_ref, slack, "backward_staged")


@property_of("exact")
@pytest.mark.parametrize("shape", [(2, 1, 4), (4, 2, 1)], ids=["segments", "rows"])
@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_relu_mask_is_forward_out_positive_for_tiny_outputs(case, storage, shape):
    """The backward's mask is the forward's stored ``out > 0``, also where
    the rounding into the storage dtype decides it: ``y = (x - 4.5) * invstd
    * gamma`` with ``gamma`` the smallest subnormal of the storage dtype and
    ``invstd`` 1/4, 1/2, 1, so that some small positive y are stored as 0
    (below half the smallest subnormal, or that half: a tie to even) and
    others as the smallest subnormal. With ``dy = 1``, every backward
    kernel's ``sum(dy)`` counts the elements its mask keeps. Two layouts: one
    channel of contiguous segments, and two channels of single values (rows)."""
    dtype = storage_dtype(storage)
    spec, kernels = case.spec, case.module
    x = np.array([1.0, 2.0, 3.0, 4.5, 5.5, 6.0, 7.0, 8.0]).astype(dtype).reshape(shape)
    dy = np.ones_like(x)
    d_x, d_dy = spec.put(x), spec.put(dy)
    smallest = float(spacing(0.0, dtype))
    channels = shape[1]
    d_mean, d_gamma, d_beta = map(spec.put, (np.full(channels, 4.5),
                                             np.full(channels, smallest), np.zeros(channels)))
    for invstd in (0.25, 0.5, 1.0):
        d_invstd = spec.put(np.full(channels, invstd))
        out = spec.empty(x.shape, dtype)
        kernels.normalize(d_x, d_mean, d_invstd, d_gamma, d_beta, out, relu=True)
        kept = np.count_nonzero(spec.get(out).astype(np.float64) > 0)
        counts = {}
        for kernel in ("backward_eval", "backward_train"):
            dx = spec.empty(x.shape, dtype)
            sums = getattr(kernels, kernel)(d_dy, d_x, d_mean, d_invstd, d_gamma, dx,
                                            beta=d_beta, relu=True)
            counts[kernel] = spec.get(sums[0]).sum()
        sums = kernels.backward_reduce(d_dy, d_x, d_mean, d_invstd, d_gamma, d_beta, relu=True)
        counts["backward_reduce"] = spec.get(sums[0]).sum()
        dx = spec.empty(x.shape, dtype)
        _, dbeta = kernels.backward_staged(d_dy, d_x, d_mean, d_invstd, d_gamma, EPS, dx,
                                           beta=d_beta, relu=True)
        counts["backward_staged"] = spec.get(dbeta).sum()
        assert all(count == kept for count in counts.values()), (
            f"invstd {invstd}: out > 0 in {kept} elements, the masks keep {counts}")


# ---------------------------------------------------------------------------
# Module attributes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", backend_params())
def test_availability_and_info(name):
    kernels = SPECS[name].module
    available, reason = kernels.availability()
    assert available is True and reason == ""
    info = kernels.info()
    assert set(info) >= {"threads", "openmp", "device"}
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert kernels.ON_DEVICE is SPECS[name].on_device
