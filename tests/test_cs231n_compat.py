"""fastbn.compat.cs231n: the assignment's functions and conventions, and the
notebooks' own checks run through them (on every backend, via use_backend)."""
import numpy as np
import pytest

import fastbn
from conftest import CUDASIM, gradcheck_problem, ref_backward, ref_forward, sim_skip_slow
from fastbn.compat import cs231n
from fastbn.gradcheck import eval_numerical_gradient_array, rel_error


@pytest.fixture
def on_backend(backend):
    with fastbn.use_backend(backend):
        yield backend


def _biased_stats(x, axis_red):
    return x.mean(axis=axis_red), x.var(axis=axis_red)


@pytest.mark.parametrize("spatial", [False, True], ids=["ND", "NCHW"])
def test_running_stats_convention(on_backend, rng, spatial):
    """momentum 0.9 weighs the old value, biased variance, zeros initially,
    written back into bn_param."""
    if spatial:
        fwd, shape, red = cs231n.spatial_batchnorm_forward, (4, 3, 5, 6), (0, 2, 3)
    else:
        fwd, shape, red = cs231n.batchnorm_forward, (30, 3), (0,)
    gamma, beta = np.ones(3), np.zeros(3)
    bn_param = {"mode": "train"}
    x1 = 3 * rng.standard_normal(shape) + 2
    out, cache = fwd(x1, gamma, beta, bn_param)
    assert cache.backend == on_backend
    m1, v1 = _biased_stats(x1, red)
    np.testing.assert_allclose(bn_param["running_mean"], 0.1 * m1, rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], 0.1 * v1, rtol=1e-10)
    x2 = 0.5 * rng.standard_normal(shape) - 1
    fwd(x2, gamma, beta, bn_param)
    m2, v2 = _biased_stats(x2, red)
    np.testing.assert_allclose(bn_param["running_mean"], 0.9 * 0.1 * m1 + 0.1 * m2, rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], 0.9 * 0.1 * v1 + 0.1 * v2, rtol=1e-10)
    # custom momentum and eps
    bn_param = {"mode": "train", "momentum": 0.5, "eps": 1e-3,
                "running_mean": np.ones(3), "running_var": np.full(3, 2.0)}
    out, _ = fwd(x1, gamma, beta, bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], 0.5 + 0.5 * m1, rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], 1.0 + 0.5 * v1, rtol=1e-10)
    np.testing.assert_allclose(out, ref_forward(x1, eps=1e-3)["out"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spatial", [False, True], ids=["ND", "NCHW"])
def test_test_mode_uses_running_stats(on_backend, rng, spatial):
    if spatial:
        fwd, shape = cs231n.spatial_batchnorm_forward, (4, 3, 5, 6)
    else:
        fwd, shape = cs231n.batchnorm_forward, (30, 3)
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    bn_param = {"mode": "test", "running_mean": rm.copy(), "running_var": rv.copy(), "eps": 1e-4}
    out, cache = fwd(x, gamma, beta, bn_param)
    ref = ref_forward(x, gamma, beta, training=False, running_mean=rm, running_var=rv, eps=1e-4)
    np.testing.assert_allclose(out, ref["out"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(bn_param["running_mean"], rm)
    np.testing.assert_array_equal(bn_param["running_var"], rv)
    dout = rng.standard_normal(shape)
    bwds = ([cs231n.spatial_batchnorm_backward] if spatial
            else [cs231n.batchnorm_backward, cs231n.batchnorm_backward_alt])
    want = ref_backward(dout, x, gamma, training=False, running_mean=rm, running_var=rv, eps=1e-4)
    for bwd in bwds:
        for g, w in zip(bwd(dout, cache), want):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


def test_mode_required_and_checked(on_backend, rng):
    x = rng.standard_normal((5, 3))
    gamma, beta = np.ones(3), np.zeros(3)
    for fwd in (cs231n.batchnorm_forward, cs231n.spatial_batchnorm_forward):
        xx = x if fwd is cs231n.batchnorm_forward else x.reshape(5, 3, 1, 1)
        bn_param = {}
        with pytest.raises((KeyError, ValueError)):
            fwd(xx, gamma, beta, bn_param)
        assert "running_mean" not in bn_param
        bn_param = {"mode": "bogus"}
        with pytest.raises(ValueError):
            fwd(xx, gamma, beta, bn_param)
        assert "running_mean" not in bn_param


def test_forward_backward_match_reference(on_backend, rng):
    N, D = (20, 10) if CUDASIM else (100, 50)
    x = 5 * rng.standard_normal((N, D)) + 12
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    dout = rng.standard_normal((N, D))
    out, cache = cs231n.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    np.testing.assert_allclose(out, ref_forward(x, gamma, beta)["out"], rtol=1e-10, atol=1e-12)
    dx1, dgamma1, dbeta1 = cs231n.batchnorm_backward(dout, cache)
    dx2, dgamma2, dbeta2 = cs231n.batchnorm_backward_alt(dout, cache)
    # the notebook's comparison of the two backward passes
    assert rel_error(dx1, dx2) < 1e-10
    assert rel_error(dgamma1, dgamma2) < 1e-12
    assert rel_error(dbeta1, dbeta2) < 1e-12
    rdx, rdg, rdb = ref_backward(dout, x, gamma)
    np.testing.assert_allclose(dx1, rdx, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(dgamma1, rdg, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta1, rdb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["batchnorm_backward", "batchnorm_backward_alt",
                                   "spatial_batchnorm_backward"])
def test_gradient_check(on_backend, rng, which):
    spatial = which.startswith("spatial")
    if CUDASIM:
        shape = (2, 2, 2, 3) if spatial else (8, 3)
    else:
        shape = (2, 3, 4, 5) if spatial else (8, 5)
    fwd = cs231n.spatial_batchnorm_forward if spatial else cs231n.batchnorm_forward
    bwd = getattr(cs231n, which)
    x, gamma, beta, dout, _, _ = gradcheck_problem(rng, shape)
    bn_param = {"mode": "train"}
    fx = lambda z: fwd(z, gamma, beta, bn_param)[0]
    fg = lambda a: fwd(x, a, beta, bn_param)[0]
    fb = lambda b: fwd(x, gamma, b, bn_param)[0]
    dx_num = eval_numerical_gradient_array(fx, x, dout)
    da_num = eval_numerical_gradient_array(fg, gamma, dout)
    db_num = eval_numerical_gradient_array(fb, beta, dout)
    _, cache = fwd(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = bwd(dout, cache)
    assert rel_error(dx_num, dx) < 1e-8
    assert rel_error(da_num, dgamma) < 1e-10
    assert rel_error(db_num, dbeta) < 1e-10


def test_notebook_train_time_checks(on_backend, rng):
    """The notebook: means ~0, stds ~1; then means ~beta, stds ~gamma."""
    N, D1, D2, D3 = 200, 50, 60, 3
    X = rng.standard_normal((N, D1))
    W1, W2 = rng.standard_normal((D1, D2)), rng.standard_normal((D2, D3))
    a = np.maximum(0, X.dot(W1)).dot(W2)
    a_norm, _ = cs231n.batchnorm_forward(a, np.ones(D3), np.zeros(D3), {"mode": "train"})
    np.testing.assert_allclose(a_norm.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(a_norm.std(axis=0), 1.0, rtol=1e-5)
    gamma = np.asarray([1.0, 2.0, 3.0])
    beta = np.asarray([11.0, 12.0, 13.0])
    a_norm, _ = cs231n.batchnorm_forward(a, gamma, beta, {"mode": "train"})
    np.testing.assert_allclose(a_norm.mean(axis=0), beta, rtol=1e-10)
    np.testing.assert_allclose(a_norm.std(axis=0), gamma, rtol=1e-5)


def test_notebook_test_time_checks(on_backend, rng):
    """The notebook: 50 training calls warm up the running averages; at test
    time means ~0 and stds ~1, noisier than at training time."""
    sim_skip_slow()
    N, D1, D2, D3 = 200, 50, 60, 3
    W1, W2 = rng.standard_normal((D1, D2)), rng.standard_normal((D2, D3))
    bn_param = {"mode": "train"}
    gamma, beta = np.ones(D3), np.zeros(D3)
    for _ in range(50):
        X = rng.standard_normal((N, D1))
        a = np.maximum(0, X.dot(W1)).dot(W2)
        cs231n.batchnorm_forward(a, gamma, beta, bn_param)
    bn_param["mode"] = "test"
    X = rng.standard_normal((N, D1))
    a = np.maximum(0, X.dot(W1)).dot(W2)
    a_norm, _ = cs231n.batchnorm_forward(a, gamma, beta, bn_param)
    assert np.all(np.abs(a_norm.mean(axis=0)) < 0.3), a_norm.mean(axis=0)
    assert np.all(np.abs(a_norm.std(axis=0) - 1.0) < 0.25), a_norm.std(axis=0)


def test_spatial_notebook_checks(on_backend, rng):
    sim_skip_slow()
    N, C, H, W = 2, 3, 4, 5
    x = 4 * rng.standard_normal((N, C, H, W)) + 10
    out, _ = cs231n.spatial_batchnorm_forward(x, np.ones(C), np.zeros(C), {"mode": "train"})
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1.0, rtol=1e-5)
    gamma, beta = np.asarray([3.0, 4.0, 5.0]), np.asarray([6.0, 7.0, 8.0])
    out, _ = cs231n.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), beta, rtol=1e-10)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), gamma, rtol=1e-5)
    # test time after warm-up
    bn_param = {"mode": "train"}
    for _ in range(50):
        fx = 2.3 * rng.standard_normal((10, C, 4, 5)) + 13
        cs231n.spatial_batchnorm_forward(fx, gamma, beta, bn_param)
    bn_param["mode"] = "test"
    fx = 2.3 * rng.standard_normal((10, C, 4, 5)) + 13
    out, _ = cs231n.spatial_batchnorm_forward(fx, gamma, beta, bn_param)
    means, stds = out.mean(axis=(0, 2, 3)), out.std(axis=(0, 2, 3))
    assert np.all(np.abs(means - beta) < 0.3 * gamma), means
    assert np.all(np.abs(stds - gamma) < 0.2 * gamma), stds


def test_inputs_not_modified_and_float32(on_backend, rng):
    x = (rng.standard_normal((6, 3, 2, 2)) + 1).astype(np.float32)
    gamma = np.ones(3, np.float32)
    beta = np.zeros(3, np.float32)
    x0, g0, b0 = x.copy(), gamma.copy(), beta.copy()
    bn_param = {"mode": "train"}
    out, cache = cs231n.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    assert out.dtype == np.float32
    assert bn_param["running_mean"].shape == (3,)
    dout = np.ones_like(x)
    d0 = dout.copy()
    dx, dgamma, dbeta = cs231n.spatial_batchnorm_backward(dout, cache)
    assert dx.dtype == np.float32
    np.testing.assert_allclose(dx, 0.0, atol=1e-5)
    for a, b in ((x, x0), (gamma, g0), (beta, b0), (dout, d0)):
        np.testing.assert_array_equal(a, b)
