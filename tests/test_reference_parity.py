"""Every backend against the numpy backend and the float64 formula reference,
plus the notebooks' own checks (means ~ beta, stds ~ gamma, warmed-up
running averages at test time)."""
import numpy as np
import pytest

import fastbn
from conftest import (LAYOUTS, assert_close, layout_ids, make_input, make_params, make_running, ref_backward,
                      ref_forward, sim_skip_slow, tol_for)

SHAPES = LAYOUTS + [((3, 4, 5), 0)]
IDS = layout_ids(SHAPES)


def _run(backend, x, gamma, beta, rm, rv, training, dout, axis, method):
    rm_, rv_ = rm.copy(), rv.copy()
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm_,
                                          running_var=rv_, axis=axis, backend=backend)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
    return dict(out=out, dx=dx, dgamma=dgamma, dbeta=dbeta, running_mean=rm_, running_var=rv_)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", ["simplified", "staged"])
def test_backend_vs_numpy_backend(backend, rng, shape, axis, dtype, training, method):
    """The backend on ``dtype`` data vs the numpy backend on the same data in float64."""
    C = shape[axis]
    x = make_input(rng, shape, axis=axis, dtype=dtype, shift=2.0)
    gamma, beta = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, np.float64)
    dout = rng.standard_normal(shape).astype(dtype)
    got = _run(backend, x, gamma, beta, rm, rv, training, dout, axis, method)
    want = _run("numpy", x.astype(np.float64), gamma.astype(np.float64),
                beta.astype(np.float64), rm, rv, training, dout.astype(np.float64), axis,
                "simplified")
    tol = tol_for(dtype)
    for key in ("out", "dx", "dgamma", "dbeta", "running_mean", "running_var"):
        assert got[key].shape == want[key].shape, key
        if key not in ("running_mean", "running_var"):
            assert got[key].dtype == np.dtype(dtype), (key, got[key].dtype)
        assert_close(got[key], want[key], tol, key)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backend_vs_formula(backend, rng, shape, axis, dtype, training):
    """Forward, both backward methods and running stats vs the float64 formulas."""
    C = shape[axis]
    x = make_input(rng, shape, axis=axis, dtype=dtype, scale=3.0, shift=-5.0)
    gamma, beta = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    momentum, eps = 0.3, 1e-3
    rm_, rv_ = rm.copy(), rv.copy()
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm_,
                                          running_var=rv_, momentum=momentum, eps=eps,
                                          axis=axis, backend=backend)
    ref = ref_forward(x, gamma, beta, training=training, running_mean=rm, running_var=rv,
                      momentum=momentum, eps=eps, axis=axis)
    tol = tol_for(dtype)
    assert out.dtype == np.dtype(dtype) and out.shape == x.shape
    assert_close(out, ref["out"], tol, "out")
    if training:
        assert_close(rm_, ref["running_mean"], tol, "running_mean")
        assert_close(rv_, ref["running_var"], tol, "running_var")
        assert rm_.dtype == np.dtype(dtype) and rv_.dtype == np.dtype(dtype)
    else:
        np.testing.assert_array_equal(rm_, rm)
        np.testing.assert_array_equal(rv_, rv)
    want = ref_backward(dout, x, gamma, training=training, running_mean=rm, running_var=rv,
                        eps=eps, axis=axis)
    for method in ("simplified", "staged"):
        got = fastbn.batchnorm_backward(dout, cache, method=method)
        for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
            assert g.dtype == np.dtype(dtype), (name, g.dtype)
            assert_close(g, w, tol, f"{method} {name}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_methods_agree(backend, rng, dtype):
    """Simplified and staged backward agree closely (the notebook's alt check)."""
    x = make_input(rng, (20, 12), dtype=dtype, scale=5.0, shift=12.0)
    gamma, beta = make_params(rng, 12, dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    a = fastbn.batchnorm_backward(dout, cache, method="simplified")
    b = fastbn.batchnorm_backward(dout, cache, method="staged")
    for name, u, v in zip(("dx", "dgamma", "dbeta"), a, b):
        assert_close(u, v, tol_for(dtype), name)


def test_gamma_beta_none_mean_ones_zeros(backend, rng):
    x = make_input(rng, (6, 4, 3))
    out1, c1 = fastbn.batchnorm_forward(x, backend=backend)
    out2, c2 = fastbn.batchnorm_forward(x, np.ones(4), np.zeros(4), backend=backend)
    np.testing.assert_allclose(out1, out2, rtol=0, atol=1e-14)
    dout = rng.standard_normal(x.shape)
    for m in ("simplified", "staged"):
        g1 = fastbn.batchnorm_backward(dout, c1, method=m)
        g2 = fastbn.batchnorm_backward(dout, c2, method=m)
        for u, v in zip(g1, g2):
            assert u.shape == v.shape
            np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-13)


def test_gamma_cast_to_x_dtype(backend, rng):
    """float64 gamma/beta with float32 x act as their float32 roundings."""
    x = make_input(rng, (8, 3), dtype=np.float32)
    gamma = np.array([1 + 1e-9, 2 + 3e-9, -0.1])
    beta = np.array([1e-9, 0.3, 1 / 3])
    out1, _ = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    out2, _ = fastbn.batchnorm_forward(x, gamma.astype(np.float32), beta.astype(np.float32),
                                       backend=backend)
    assert out1.dtype == np.float32
    np.testing.assert_array_equal(out1, out2)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.1, 0.75])
def test_running_stats_momentum(backend, rng, momentum):
    x = make_input(rng, (10, 4))
    rm, rv = make_running(rng, 4)
    rm0, rv0 = rm.copy(), rv.copy()
    fastbn.batchnorm_forward(x, running_mean=rm, running_var=rv, momentum=momentum,
                             backend=backend)
    bm = x.mean(axis=0)
    bv = x.var(axis=0, ddof=1)
    np.testing.assert_allclose(rm, (1 - momentum) * rm0 + momentum * bm, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(rv, (1 - momentum) * rv0 + momentum * bv, rtol=1e-13, atol=1e-14)
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)


def test_eps_default_and_zero(backend, rng):
    x = make_input(rng, (12, 3))
    out, _ = fastbn.batchnorm_forward(x, backend=backend)
    assert_close(out, ref_forward(x, eps=1e-5)["out"], 1e-12, "default eps")
    # eps must be positive in training: the smallest float64 leaves var + eps == var
    out0, _ = fastbn.batchnorm_forward(x, eps=5e-324, backend=backend)
    np.testing.assert_allclose(out0.std(axis=0), 1.0, rtol=1e-12)
    out1, _ = fastbn.batchnorm_forward(x, eps=1.0, backend=backend)
    assert_close(out1, ref_forward(x, eps=1.0)["out"], 1e-12, "eps=1")


# ---------------------------------------------------------------------------
# the notebooks' checks
# ---------------------------------------------------------------------------
def _two_layer_activations(rng, N=200, D1=50, D2=60, D3=3, W=None):
    if W is None:
        W = (rng.standard_normal((D1, D2)), rng.standard_normal((D2, D3)))
    X = rng.standard_normal((N, D1))
    return np.maximum(0, X.dot(W[0])).dot(W[1]), W


def test_seed_train_means_and_stds(backend, rng):
    a, _ = _two_layer_activations(rng)
    out, _ = fastbn.batchnorm_forward(a, np.ones(3), np.zeros(3), backend=backend)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), 1.0, rtol=1e-6)
    gamma = np.asarray([1.0, 2.0, 3.0])
    beta = np.asarray([11.0, 12.0, 13.0])
    out, _ = fastbn.batchnorm_forward(a, gamma, beta, backend=backend)
    np.testing.assert_allclose(out.mean(axis=0), beta, rtol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), gamma, rtol=1e-6)


def test_seed_spatial_means_and_stds(backend, rng):
    x = 4 * rng.standard_normal((2, 3, 4, 5)) + 10
    out, _ = fastbn.batchnorm_forward(x, backend=backend)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1.0, rtol=1e-5)
    gamma, beta = np.array([3.0, 4.0, 5.0]), np.array([6.0, 7.0, 8.0])
    out, _ = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), beta, rtol=1e-10)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), gamma, rtol=1e-5)


def test_seed_test_time_after_warmup(backend, rng):
    """Warm the running averages over 50 training calls, then normalize fresh
    data at test time: means near beta and stds near gamma (loosely)."""
    sim_skip_slow()
    gamma = np.array([1.0, 2.0, 0.5])
    beta = np.array([0.0, -1.0, 3.0])
    rm, rv = np.zeros(3), np.ones(3)
    W = None
    for _ in range(50):
        a, W = _two_layer_activations(rng, W=W)
        fastbn.batchnorm_forward(a, gamma, beta, running_mean=rm, running_var=rv,
                                 momentum=0.1, backend=backend)
    a, _ = _two_layer_activations(rng, W=W)
    rm0, rv0 = rm.copy(), rv.copy()
    out, _ = fastbn.batchnorm_forward(a, gamma, beta, training=False, running_mean=rm,
                                      running_var=rv, backend=backend)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    means, stds = out.mean(axis=0), out.std(axis=0)
    assert np.all(np.abs(means - beta) < 0.3 * gamma), (means, beta)
    assert np.all(np.abs(stds - gamma) < 0.25 * gamma), (stds, gamma)
