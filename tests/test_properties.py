"""Property tests (hypothesis) over shapes, axes (negative ones too), dtypes
and value scales, against the float64 formula reference and invariants."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbn
from conftest import CUDASIM, normwise_error, ref_backward, ref_forward

# Training needs eps > 0 (PyTorch's rule). The smallest positive float64 is
# eps "in effect 0": var + EPS_TINY rounds back to var for every var >= 2**-1021.
EPS_TINY = 5e-324

SETTINGS = settings(max_examples=10 if CUDASIM else 40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@st.composite
def problems(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    C = shape[axis]
    M = int(np.prod(shape)) // C
    if M < 2:  # training needs two values per channel: grow the first other axis
        other = (axis % ndim + 1) % ndim
        shape = shape[:other] + (2,) + shape[other + 1:]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = 10.0 ** draw(st.integers(-3, 3))
    shift = draw(st.sampled_from([0.0, 1.0, -50.0])) * scale
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    ax = axis % ndim
    bshape = [1] * ndim
    bshape[ax] = C
    stds = scale * rng.uniform(0.5, 2.0, C)
    x = (rng.standard_normal(shape) * stds.reshape(bshape) + shift
         + scale * rng.uniform(-1, 1, C).reshape(bshape)).astype(dtype)
    gamma = rng.uniform(-2, 2, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, dout, axis


def _tol(dtype):
    # float32: input rounding is shared with the reference; the computation's
    # own roundoff is a few ulps of float32 per stage
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-4


@SETTINGS
@given(p=problems(), training=st.booleans())
def test_forward_backward_match_reference(backend, p, training):
    x, gamma, beta, dout, axis = p
    C = x.shape[axis]
    # eps relative to the scale, so that it does not dominate tiny variances
    var = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, C).var(axis=0)
    eps = 1e-5 * float(np.max(var)) if np.max(var) > 0 else 1e-5
    rm = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, C).mean(axis=0)
    rv = var + 0.5 * float(np.max(var)) + 1e-3
    x0, g0, b0, d0 = x.copy(), gamma.copy(), beta.copy(), dout.copy()
    rm_, rv_ = rm.copy(), rv.copy()
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm_,
                                          running_var=rv_, eps=eps, axis=axis, backend=backend)
    ref = ref_forward(x, gamma, beta, training=training, running_mean=rm, running_var=rv,
                      eps=eps, axis=axis)
    tol = _tol(x.dtype)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert normwise_error(out, ref["out"]) < tol
    if training:
        assert normwise_error(rm_, ref["running_mean"]) < tol
        assert normwise_error(rv_, ref["running_var"]) < tol
    else:
        np.testing.assert_array_equal(rm_, rm)
        np.testing.assert_array_equal(rv_, rv)
    want = ref_backward(dout, x, gamma, training=training, running_mean=rm, running_var=rv,
                        eps=eps, axis=axis)
    ax = axis % x.ndim
    bshape = [1] * x.ndim
    bshape[ax] = C
    xhat = ((x.astype(np.float64) - ref["mean"].reshape(bshape))
            * ref["invstd"].reshape(bshape))
    red = tuple(i for i in range(x.ndim) if i != ax)
    dgamma_terms = np.abs(dout.astype(np.float64) * xhat).sum(axis=red)
    for method in ("simplified", "staged"):
        got = fastbn.batchnorm_backward(dout, cache, method=method)
        for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
            assert g.shape == w.shape and g.dtype == x.dtype, name
            # dx and dgamma are sums of terms of size |dout| * |gamma * invstd| etc.:
            # scale the error by the terms, not by a possibly cancelled result
            scale = {"dx": np.max(np.abs(dout)) * np.max(np.abs(gamma)) * np.max(ref["invstd"]),
                     "dgamma": np.max(dgamma_terms),
                     "dbeta": np.sum(np.abs(dout))}[name]
            err = np.max(np.abs(np.asarray(g, np.float64) - w)) / max(scale, 1e-300)
            assert err < tol, f"{method} {name}: {err:.2e}"
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(gamma, g0)
    np.testing.assert_array_equal(beta, b0)
    np.testing.assert_array_equal(dout, d0)


@SETTINGS
@given(p=problems())
def test_training_invariants(backend, p):
    """Per channel: outputs have mean beta and (for non-tiny variance) std |gamma|;
    dx sums to zero and is orthogonal to xhat."""
    x, gamma, beta, dout, axis = p
    x = x.astype(np.float64)
    gamma, beta, dout = (a.astype(np.float64) for a in (gamma, beta, dout))
    C = x.shape[axis]
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, eps=EPS_TINY, axis=axis,
                                          backend=backend)
    o = np.moveaxis(out, axis, -1).reshape(-1, C)
    xc = np.moveaxis(x, axis, -1).reshape(-1, C)
    ok = xc.std(axis=0) > 1e-6 * np.abs(xc).max(axis=0)  # channels that are not constant
    np.testing.assert_allclose(o.mean(axis=0), beta, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(o.std(axis=0)[ok], np.abs(gamma)[ok], rtol=1e-8, atol=1e-9)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache)
    d = np.moveaxis(dx, axis, -1).reshape(-1, C)
    xhat = (xc - xc.mean(axis=0)) / np.where(ok, xc.std(axis=0), 1.0)
    scale = (np.abs(np.moveaxis(dout, axis, -1).reshape(-1, C)).sum(axis=0)
             * np.abs(gamma) / np.where(ok, xc.std(axis=0), 1.0))
    assert np.all(np.abs(d.sum(axis=0))[ok] <= 1e-9 * scale[ok] + 1e-300)
    assert np.all(np.abs((d * xhat).sum(axis=0))[ok] <= 1e-8 * scale[ok] + 1e-300)


@SETTINGS
@given(p=problems(), c=st.floats(-100, 100), k=st.floats(0.1, 10))
def test_shift_and_scale_invariance(backend, p, c, k):
    """With eps in effect 0, normalizing a*x + c (a > 0) gives the same output, float64."""
    x, gamma, beta, _, axis = p
    x = x.astype(np.float64)
    C = x.shape[axis]
    xc = np.moveaxis(x, axis, -1).reshape(-1, C)
    if np.any(xc.std(axis=0) < 1e-3 * (np.abs(xc).max(axis=0) + 1e-300)):
        return  # ill-conditioned channel: invariance holds only loosely
    s = float(np.max(np.abs(x))) or 1.0
    out1, _ = fastbn.batchnorm_forward(x, gamma, beta, eps=EPS_TINY, axis=axis, backend=backend)
    out2, _ = fastbn.batchnorm_forward(k * x + c * s, gamma, beta, eps=EPS_TINY, axis=axis,
                                       backend=backend)
    assert normwise_error(out2, out1) < 1e-7


@SETTINGS
@given(p=problems())
def test_layout_equivalence(backend, p):
    """Moving the channel axis (a transposed, non-contiguous view) changes nothing but layout."""
    x, gamma, beta, dout, axis = p
    ax = axis % x.ndim
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, backend=backend)
    xt = np.moveaxis(x, ax, 1)          # a view, usually non-contiguous
    dt = np.moveaxis(dout, ax, 1)
    out_t, cache_t = fastbn.batchnorm_forward(xt, gamma, beta, axis=1, backend=backend)
    tol = _tol(x.dtype)
    assert normwise_error(np.moveaxis(out_t, 1, ax), out) < tol
    g = fastbn.batchnorm_backward(dout, cache)
    g_t = fastbn.batchnorm_backward(dt, cache_t)
    assert normwise_error(np.moveaxis(g_t[0], 1, ax), g[0]) < tol
    assert normwise_error(g_t[1], g[1]) < tol
    assert normwise_error(g_t[2], g[2]) < tol
