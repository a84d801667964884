"""Accuracy in float32 (float64 accumulation, accurate centring), constant
channels, and NaN confined to its channel."""
import numpy as np
import pytest

import fastbn
from conftest import CUDASIM, make_input, ref_backward, ref_forward


@pytest.mark.parametrize("shape,axis", [((64, 3), 1), ((8, 3, 6, 5), 1), ((8, 6, 5, 3), -1)],
                         ids=["ND", "NCHW", "NHWC"])
@pytest.mark.parametrize("std", [1e-2, 1.0, 1e2])
def test_float32_large_mean(backend, rng, shape, axis, std):
    """A channel whose mean is 1e4 times its std: float32 output within 1e-4
    (absolute) of the float64 computation on the same float32 data."""
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    signs = np.array([1.0, -1.0, 1.0])[:C]
    x = (rng.standard_normal(shape) * std + (1e4 * std * signs).reshape(bshape)).astype(np.float32)
    gamma = np.array([1.0, 1.5, 0.5], np.float32)
    beta = np.array([0.0, -1.0, 2.0], np.float32)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, backend=backend)
    ref = ref_forward(x, gamma, beta, axis=axis)
    assert out.dtype == np.float32
    err = np.max(np.abs(out.astype(np.float64) - ref["out"]))
    assert err < 1e-4, f"max abs error {err:.2e}"
    # the statistics themselves are float64-accurate
    mean = np.asarray(cache.mean if isinstance(cache.mean, np.ndarray)
                      else cache.mean.copy_to_host(), np.float64)
    np.testing.assert_allclose(mean, ref["mean"], rtol=1e-12)
    # and the backward stays accurate too (dx relative to its scale)
    dout = rng.standard_normal(shape).astype(np.float32)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache)
    rdx, rdgamma, rdbeta = ref_backward(dout, x, gamma, axis=axis)
    assert np.max(np.abs(dx - rdx)) <= 1e-4 * np.max(np.abs(rdx))
    assert np.max(np.abs(dgamma - rdgamma)) <= 1e-4 * np.sum(np.abs(dout)) / C
    assert np.max(np.abs(dbeta - rdbeta)) <= 1e-5 * np.sum(np.abs(dout)) / C


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [1e7, 0.1] if CUDASIM else [1e7, -1e7, 3.3e7, 12345.678, 0.1])
@pytest.mark.parametrize("shape,axis", [((50, 3), 1), ((4, 3, 5, 7), 1), ((4, 5, 7, 3), -1)],
                         ids=["ND", "NCHW", "NHWC"])
def test_constant_channel_maps_to_beta(backend, rng, dtype, value, shape, axis):
    C = shape[axis]
    x = make_input(rng, shape, axis=axis, dtype=np.float64)
    idx = [slice(None)] * len(shape)
    idx[axis] = 1
    x[tuple(idx)] = value
    x = x.astype(dtype)
    gamma = np.array([1.0, 3.0, 2.0], dtype)
    beta = np.array([0.5, -7.25, 1.0], dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, running_mean=rm,
                                          running_var=rv, backend=backend)
    const = out[tuple(idx)]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(const, beta[1], rtol=0, atol=1e-5)
    # running variance of a constant channel: (1 - m) * 1 + m * 0
    np.testing.assert_allclose(rv[1], 0.9, rtol=1e-6)
    np.testing.assert_allclose(rm[1], 0.1 * np.asarray(value, dtype), rtol=1e-6)
    # the other channels are unaffected
    ref = ref_forward(x, gamma, beta, axis=axis)
    other = [c for c in range(C) if c != 1]
    sel = [slice(None)] * len(shape)
    sel[axis] = other
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out[tuple(sel)], ref["out"][tuple(sel)], rtol=tol, atol=tol)
    # backward is finite: xhat = 0, so dx = gamma * invstd * (dy - mean(dy))
    dout = rng.standard_normal(shape).astype(dtype)
    for method in ("simplified", "staged"):
        dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
        assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dgamma))
        rdx, rdg, rdb = ref_backward(dout, x, gamma, axis=axis)
        np.testing.assert_allclose(dgamma[1], 0.0, atol=1e-3)
        scale = np.max(np.abs(rdx[tuple(idx)]))
        assert np.max(np.abs(dx[tuple(idx)] - rdx[tuple(idx)])) <= 1e-4 * scale, method


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((20, 4), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1)],
                         ids=["ND", "NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_confined_to_channel(backend, rng, dtype, shape, axis, training):
    C = shape[axis]
    x = make_input(rng, shape, axis=axis, dtype=dtype)
    bad = 2
    idx = [0] * len(shape)
    idx[axis] = bad
    x[tuple(idx)] = np.nan
    gamma = np.linspace(0.5, 2.0, C).astype(dtype)
    beta = np.linspace(-1.0, 1.0, C).astype(dtype)
    rm = np.zeros(C, dtype)
    rv = np.ones(C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm,
                                          running_var=rv, axis=axis, backend=backend)
    chan = [slice(None)] * len(shape)
    chan[axis] = bad
    others = [slice(None)] * len(shape)
    others[axis] = [c for c in range(C) if c != bad]
    chan, others = tuple(chan), tuple(others)
    ref = ref_forward(x, gamma, beta, training=training, running_mean=rm0, running_var=rv0,
                      axis=axis)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    if training:
        assert np.all(np.isnan(out[chan])), "the NaN channel's outputs must all be NaN"
    else:
        # evaluation normalizes elementwise: only the NaN element is NaN
        assert np.isnan(out[tuple(idx)])
        assert np.sum(np.isnan(out)) == 1
    assert np.all(np.isfinite(out[others]))
    np.testing.assert_allclose(out[others], ref["out"][others], rtol=tol, atol=tol)
    if training:
        keep = [c for c in range(C) if c != bad]
        np.testing.assert_allclose(rm[keep], ref["running_mean"][keep], rtol=tol, atol=tol)
        np.testing.assert_allclose(rv[keep], ref["running_var"][keep], rtol=tol, atol=tol)
    dout = rng.standard_normal(shape).astype(dtype)
    rdx, rdg, rdb = ref_backward(dout, x, gamma, training=training, running_mean=rm0,
                                 running_var=rv0, axis=axis)
    for method in ("simplified", "staged"):
        dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
        if training:
            assert np.all(np.isnan(dx[chan]))
        else:
            # evaluation: dx = dout * gamma * invstd does not involve x
            assert np.all(np.isfinite(dx)), method
            np.testing.assert_allclose(dx[chan], rdx[chan], rtol=1e-5)
        assert np.all(np.isfinite(dx[others])), method
        np.testing.assert_allclose(dx[others], rdx[others], rtol=1e-4 if dtype == np.float32
                                   else 1e-10, atol=tol)
        keep = [c for c in range(C) if c != bad]
        np.testing.assert_allclose(dgamma[keep], rdg[keep], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dbeta[keep], rdb[keep], rtol=1e-5, atol=1e-5)
        assert np.isnan(dgamma[bad])
        # dbeta = sum(dout) does not involve x
        np.testing.assert_allclose(dbeta[bad], rdb[bad], rtol=1e-5)
