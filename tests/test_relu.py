"""Fused batch norm + ReLU (``activation="relu"``) on every backend.

- the forward equals ``max(plain forward, 0)`` exactly (same backend, dtype);
- the backward on the ReLU cache equals the plain backward of
  ``dout * (out > 0)`` (both methods, training and evaluation, every dtype);
- float64 against a NumPy reference written here and against PyTorch's
  ``F.relu(F.batch_norm(...))`` autograd, and numerical gradients
  (``fastbn.gradcheck``) on data with no ``y`` near the kink at 0;
- bad ``activation`` values, the cache's record of the activation, and the
  staged backward walking the ReLU back as a stage of its own.
"""
import tracemalloc

import numpy as np
import pytest

import fastbn
from conftest import (CUDASIM, Snapshot, assert_close, host, make_params, normwise_error,
                      to_float64, ulp_distance)
from fastbn.gradcheck import eval_numerical_gradient_array, rel_error

try:
    import torch
except ImportError:  # the PyTorch comparisons skip without it
    torch = None
try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

BF16 = "bfloat16"
DTYPES = [
    pytest.param(np.float64, id="float64"),
    pytest.param(np.float32, id="float32"),
    pytest.param(np.float16, id="float16"),
    pytest.param(BF16, id="bfloat16", marks=pytest.mark.skipif(
        ml_dtypes is None, reason="bfloat16 needs ml_dtypes (pip install 'fastbn[bfloat16]')")),
]

SMALL = [((20, 4), 1), ((3, 4, 2, 3), 1), ((3, 2, 3, 4), -1)]
LARGE = [((517, 6), 1), ((7, 5, 19, 13), 1), ((5, 11, 9, 7), -1)]
SHAPES = SMALL if CUDASIM else SMALL + LARGE
IDS = [f"{shape}-axis{axis}" for shape, axis in SHAPES]

EPS = 1e-5


def as_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if dtype == BF16 else np.dtype(dtype)


def param_dtype(dtype):
    """float32 gamma/beta for 16-bit storage, x's dtype otherwise."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def make_case(rng, shape, axis, dtype):
    """x, dout of ``dtype``; gamma, beta, running stats of the parameter dtype.

    The means sit near zero and beta is small, so that about half of the
    outputs are clipped in every channel.
    """
    ax = axis % len(shape)
    C = shape[ax]
    bshape = [1] * len(shape)
    bshape[ax] = C
    means = rng.uniform(-1, 1, C)
    stds = rng.uniform(0.5, 2.0, C)
    x = rng.standard_normal(shape) * stds.reshape(bshape) + means.reshape(bshape)
    gamma, beta = make_params(rng, C, np.float64)
    beta = 0.3 * beta
    rm = means + 0.2 * stds * rng.standard_normal(C)
    rv = stds ** 2 * rng.uniform(0.7, 1.4, C)
    dout = rng.standard_normal(shape)
    pdt = param_dtype(dtype)
    if dtype.itemsize == 2:   # from float32 (ml_dtypes rounds float32 once)
        x, dout = x.astype(np.float32), dout.astype(np.float32)
    return (x.astype(dtype), dout.astype(dtype),
            gamma.astype(pdt),
            beta.astype(pdt), rm.astype(pdt), rv.astype(pdt))


# ---------------------------------------------------------------------------
# fused vs separate, same backend and dtype
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_is_max_of_plain_forward(backend, rng, dtype, shape, axis, training):
    dtype = as_dtype(dtype)
    x, dout, gamma, beta, rm, rv = make_case(rng, shape, axis, dtype)
    kw = dict(training=training, axis=axis, backend=backend)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    snap = Snapshot(x=x, gamma=gamma, beta=beta)
    plain, _ = fastbn.batchnorm_forward(x, gamma, beta, running_mean=rm1, running_var=rv1, **kw)
    fused, cache = fastbn.batchnorm_forward(x, gamma, beta, running_mean=rm2, running_var=rv2,
                                            activation="relu", **kw)
    snap.assert_unchanged()
    assert fused.dtype == dtype and fused.shape == x.shape
    plain64, fused64 = to_float64(plain), to_float64(fused)
    clipped = plain64 <= 0
    assert 0.2 < clipped.mean() < 0.8, "the data should clip about half of the outputs"
    # exactly max(plain, 0); -0.0 and 0.0 compare equal
    np.testing.assert_array_equal(fused64, np.maximum(plain64, 0.0))
    assert not np.any(fused64 < 0)
    # the running statistics do not depend on the activation
    np.testing.assert_array_equal(rm1, rm2)
    np.testing.assert_array_equal(rv1, rv2)
    assert cache.activation == "relu"


# tolerances for backward(relu cache) vs backward(plain cache, masked dout):
# the same arithmetic on the same masked values, up to summation order
NORMWISE = {np.dtype(np.float64): 1e-13, np.dtype(np.float32): 1e-6}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", ["simplified", "staged"])
def test_backward_is_plain_backward_of_masked_dout(backend, rng, dtype, shape, axis, training,
                                                   method):
    dtype = as_dtype(dtype)
    x, dout, gamma, beta, rm, rv = make_case(rng, shape, axis, dtype)
    kw = dict(training=training, running_mean=rm.copy(), running_var=rv.copy(), axis=axis,
              backend=backend)
    plain, plain_cache = fastbn.batchnorm_forward(x, gamma, beta, **kw)
    kw.update(running_mean=rm.copy(), running_var=rv.copy())
    _, relu_cache = fastbn.batchnorm_forward(x, gamma, beta, activation="relu", **kw)

    masked = np.where(to_float64(plain) > 0, dout, np.zeros((), dout.dtype)).astype(dtype)
    snap = Snapshot(x=x, dout=dout)
    got = fastbn.batchnorm_backward(dout, relu_cache, method=method)
    want = fastbn.batchnorm_backward(masked, plain_cache, method=method)
    snap.assert_unchanged()

    pdt = param_dtype(dtype)
    assert got[0].dtype == dtype and got[1].dtype == pdt and got[2].dtype == pdt
    if dtype.itemsize == 2:
        ulps = ulp_distance(got[0], want[0])
        assert ulps.max() <= 1, f"dx: {ulps.max()} ulps apart ({np.sum(ulps > 0)} elements)"
        tol = 1e-6
    else:
        tol = NORMWISE[dtype]
        assert_close(got[0], want[0], tol, "dx")
    assert_close(got[1], want[1], tol, "dgamma")
    assert_close(got[2], want[2], tol, "dbeta")


# ---------------------------------------------------------------------------
# float64 against independent references
# ---------------------------------------------------------------------------
def reference(x, dout, gamma, beta, rm, rv, training, axis):
    """float64 fused forward and backward from the formulas (plain NumPy)."""
    ax = axis % x.ndim
    C = x.shape[ax]
    xc = np.moveaxis(x, ax, -1).reshape(-1, C)
    dy = np.moveaxis(dout, ax, -1).reshape(-1, C)
    M = xc.shape[0]
    if training:
        mean = xc.mean(axis=0)
        var = ((xc - mean) ** 2).mean(axis=0)
    else:
        mean, var = rm, rv
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (xc - mean) * invstd
    y = xhat * gamma + beta
    dmasked = np.where(y > 0, dy, 0.0)                      # d relu(y) / dy = [y > 0]
    dbeta = dmasked.sum(axis=0)
    dgamma = (dmasked * xhat).sum(axis=0)
    if training:
        dx = gamma * invstd * (dmasked - dbeta / M - xhat * dgamma / M)
    else:
        dx = dmasked * gamma * invstd
    back = lambda a: np.moveaxis(a.reshape(np.moveaxis(x, ax, -1).shape), -1, ax)
    return back(np.maximum(y, 0.0)), back(dx), dgamma, dbeta, back(y)


def torch_reference(x, dout, gamma, beta, rm, rv, training, axis):
    ax = axis % x.ndim
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, ax, 1))).requires_grad_(True)
    g = torch.from_numpy(gamma.copy()).requires_grad_(True)
    b = torch.from_numpy(beta.copy()).requires_grad_(True)
    y = torch.nn.functional.relu(torch.nn.functional.batch_norm(
        xt, torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy()), g, b,
        training=training, eps=EPS))
    y.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(dout, ax, 1))))
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, ax)
    return back(y), back(xt.grad), g.grad.numpy(), b.grad.numpy()


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_vs_reference_and_torch(backend, rng, shape, axis, training):
    pytest.importorskip("torch")
    x, dout, gamma, beta, rm, rv = make_case(rng, shape, axis, np.dtype(np.float64))
    mine = reference(x, dout, gamma, beta, rm, rv, training, axis)
    assert np.min(np.abs(mine[4])) > 1e-9, "an output at the kink: masks could differ"
    theirs = torch_reference(x, dout, gamma, beta, rm, rv, training, axis)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training,
                                          running_mean=rm.copy(), running_var=rv.copy(),
                                          eps=EPS, axis=axis, backend=backend,
                                          activation="relu")
    failures = []
    for method in ("simplified", "staged"):
        dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
        for source, want in (("numpy reference", mine), ("torch", theirs)):
            for what, got, w in zip(("out", "dx", "dgamma", "dbeta"),
                                    (out, dx, dgamma, dbeta), want):
                err = normwise_error(got, w)
                if err > 1e-11:
                    failures.append(f"{method} {what} vs {source}: {err:.2e}")
    assert not failures, failures


# Gradient checks: small, and cheap enough for the CUDA simulator.
GRADCHECK = [((8, 3), 1), ((2, 3, 2, 2), 1)] if CUDASIM else [((8, 5), 1), ((2, 3, 4, 5), 1),
                                                               ((2, 3, 4, 3), -1)]


def gradcheck_case(rng, shape, axis):
    """float64 data whose outputs are all at least 1e-3 away from the kink."""
    for _ in range(100):
        x, dout, gamma, beta, rm, rv = make_case(rng, shape, axis, np.dtype(np.float64))
        ys = [reference(x, dout, gamma, beta, rm, rv, training, axis)[4]
              for training in (True, False)]
        if min(np.min(np.abs(y)) for y in ys) > 1e-3:
            return x, dout, gamma, beta, rm, rv
    raise AssertionError("no data away from the kink")


@pytest.mark.parametrize("shape,axis", GRADCHECK, ids=[f"{s}-axis{a}" for s, a in GRADCHECK])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", ["simplified", "staged"])
def test_numerical_gradients(backend, rng, shape, axis, training, method):
    x, dout, gamma, beta, rm, rv = gradcheck_case(rng, shape, axis)
    kw = dict(training=training, axis=axis, backend=backend, activation="relu")
    if not training:
        kw.update(running_mean=rm, running_var=rv)
    fx = lambda z: fastbn.batchnorm_forward(z, gamma, beta, **kw)[0]
    fg = lambda g: fastbn.batchnorm_forward(x, g, beta, **kw)[0]
    fb = lambda b: fastbn.batchnorm_forward(x, gamma, b, **kw)[0]
    dx_num = eval_numerical_gradient_array(fx, x, dout)
    dgamma_num = eval_numerical_gradient_array(fg, gamma, dout)
    dbeta_num = eval_numerical_gradient_array(fb, beta, dout)
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, **kw)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
    # dx is compared normwise: masked columns can leave an element of dx near
    # zero, where cs231n's elementwise relative error only measures roundoff
    assert normwise_error(dx, dx_num) < 1e-8, normwise_error(dx, dx_num)
    assert rel_error(dgamma_num, dgamma) < 1e-8, rel_error(dgamma_num, dgamma)
    assert rel_error(dbeta_num, dbeta) < 1e-8, rel_error(dbeta_num, dbeta)
    # the clipped outputs really are flat: the mask is active
    assert np.any(fx(x) == 0) and np.any(fx(x) > 0)


# ---------------------------------------------------------------------------
# API: bad values, the cache
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["ReLU", "relu ", "gelu", "", "none", 0, True, "max"])
def test_bad_activation(backend, rng, activation):
    x, _, gamma, beta, rm, rv = make_case(rng, (6, 3), 1, np.dtype(np.float64))
    snap = Snapshot(x=x, gamma=gamma, beta=beta, rm=rm, rv=rv)
    with pytest.raises(ValueError) as info:
        fastbn.batchnorm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                 backend=backend, activation=activation)
    message = str(info.value)
    assert "'relu'" in message and "None" in message, message
    snap.assert_unchanged()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cache_records_activation(backend, rng, training):
    x, dout, gamma, beta, rm, rv = make_case(rng, (6, 3), 1, np.dtype(np.float64))
    kw = dict(training=training, running_mean=rm, running_var=rv, backend=backend)
    _, plain = fastbn.batchnorm_forward(x, gamma, beta, **kw)
    _, fused = fastbn.batchnorm_forward(x, gamma, beta, activation="relu", **kw)
    _, explicit = fastbn.batchnorm_forward(x, gamma, beta, activation=None, **kw)
    assert plain.activation is None and explicit.activation is None
    assert fused.activation == "relu"
    assert "relu" in repr(fused)
    # the backward needs beta to rebuild y: the cache keeps it
    np.testing.assert_array_equal(host(fused.beta), beta)
    # a fused cache's backward differs from the plain one's (the mask acts)
    a = fastbn.batchnorm_backward(dout, plain)[0]
    b = fastbn.batchnorm_backward(dout, fused)[0]
    assert not np.allclose(a, b)


def test_relu_beta_none_means_zero(backend, rng):
    """beta=None with the ReLU: the mask is y > 0 with y = gamma * xhat."""
    x, dout, gamma, _, _, _ = make_case(rng, (10, 3), 1, np.dtype(np.float64))
    out1, c1 = fastbn.batchnorm_forward(x, gamma, None, backend=backend, activation="relu")
    out2, c2 = fastbn.batchnorm_forward(x, gamma, np.zeros(3), backend=backend,
                                        activation="relu")
    np.testing.assert_array_equal(out1, out2)
    for method in ("simplified", "staged"):
        for u, v in zip(fastbn.batchnorm_backward(dout, c1, method=method),
                        fastbn.batchnorm_backward(dout, c2, method=method)):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("method", ["simplified", "staged"])
def test_nan_y_masks_its_gradient(backend, method):
    """Evaluation mode, one NaN in x: its output is NaN (max(NaN, 0) stays
    NaN), the ReLU mask drops its dout (NaN is not > 0) on every backend, and
    the rest of the channel is untouched: dbeta is finite and every other dx is
    the masked dout times gamma * invstd."""
    x = np.linspace(-2.0, 2.0, 24).reshape(6, 4) * np.array([1.0, -1.0, 0.5, 2.0])
    x[2, 1] = np.nan
    gamma, beta = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.1, -0.2, 0.0, 0.3])
    running_mean, running_var = np.array([0.1, -0.1, 0.2, 0.0]), np.array([1.0, 2.0, 0.5, 1.5])
    dout = np.arange(1.0, 25.0).reshape(6, 4)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=False,
                                          running_mean=running_mean, running_var=running_var,
                                          backend=backend, activation="relu")
    assert np.isnan(out[2, 1]) and np.isnan(out).sum() == 1
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
    kept = out > 0  # False at the NaN
    np.testing.assert_allclose(dbeta, np.where(kept, dout, 0.0).sum(axis=0), rtol=1e-13)
    scale = gamma / np.sqrt(running_var + EPS)
    others = np.ones(x.shape, dtype=bool)
    others[2, 1] = False
    np.testing.assert_allclose(dx[others], (np.where(kept, dout, 0.0) * scale)[others],
                               rtol=1e-13, atol=1e-13)
    # The NaN element's own dx is 0 (masked) or NaN (its centred x is NaN).
    assert dx[2, 1] == 0 or np.isnan(dx[2, 1])


# ---------------------------------------------------------------------------
# the staged backward stays staged, with the ReLU as one more stage
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_staged_relu_is_a_stage_on_top_of_the_staged_graph(backend, rng, dtype):
    """On the ReLU cache, the staged backward is the masking stage followed by
    the same staged graph: bitwise the staged backward of the masked dout on
    the plain cache. It is not the closed form (in float32 the two differ in
    the last bits), and on a host backend it allocates full-size
    intermediates (traced by tracemalloc), where the simplified does not
    need them."""
    dtype = np.dtype(dtype)
    shape = (6, 4, 3) if CUDASIM else (16, 8, 64)
    x, dout, gamma, beta, _, _ = make_case(rng, shape, 1, dtype)
    plain, plain_cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    _, relu_cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend, activation="relu")
    masked = np.where(plain > 0, dout, dtype.type(0))
    staged = fastbn.batchnorm_backward(dout, relu_cache, method="staged")
    want = fastbn.batchnorm_backward(masked, plain_cache, method="staged")
    for name, u, v in zip(("dx", "dgamma", "dbeta"), staged, want):
        np.testing.assert_array_equal(u, v, err_msg=name)
    if dtype == np.float32:
        closed = fastbn.batchnorm_backward(dout, relu_cache, method="simplified")[0]
        assert not np.array_equal(staged[0], closed), "staged gave the closed form's bits"
    if backend == "cuda":
        return  # device memory: not traced
    peaks = {}
    for method in ("simplified", "staged"):
        out = np.empty_like(x)
        fastbn.batchnorm_backward(dout, relu_cache, method=method, out=out)   # warm up
        tracemalloc.start()
        try:
            fastbn.batchnorm_backward(dout, relu_cache, method=method, out=out)
            peaks[method] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    full = x.nbytes
    assert peaks["staged"] >= 3 * full, (peaks, full)
    assert peaks["staged"] > peaks["simplified"] + full, (peaks, full)
