"""16-bit storage: float16 and bfloat16 (``ml_dtypes``) on every backend.

The reference is computed here in float64 with plain NumPy from the same
16-bit inputs (converted exactly), with gamma/beta as float32 values, and
rounded once to the 16-bit type by :func:`round_once`. ``out`` and ``dx``
(both backward methods, training and evaluation) must lie within one unit
in the last place (ulp) of that rounded result, measured on the bit
patterns; every case has a channel whose mean is 1e3 times its std and a
constant channel. dgamma/dbeta are float32 to float32 accuracy, the cache's
mean/invstd float64, the running statistics float32.

PyTorch's CPU batch norm on the same data (16-bit input, float32 weight,
bias and running statistics: the mixed-precision combination; PyTorch CPU
also accepts all-16-bit parameters) is measured against the same reference;
the largest ulp errors of both are printed in the terminal summary.
"""
import numpy as np
import pytest

import fastbn
from conftest import CUDASIM, Snapshot, host, record_ulps, to_float64, ulp_distance

try:
    import torch
except ImportError:  # the PyTorch comparisons skip without it
    torch = None
try:
    import ml_dtypes
except ImportError:  # an optional extra: the bfloat16 cases skip without it
    ml_dtypes = None

DTYPES = [
    pytest.param("float16", id="float16"),
    pytest.param("bfloat16", id="bfloat16", marks=pytest.mark.skipif(
        ml_dtypes is None, reason="bfloat16 needs ml_dtypes (pip install 'fastbn[bfloat16]')")),
]

# fraction bits and smallest normal exponent of each 16-bit format
FORMATS = {"float16": (10, -14), "bfloat16": (7, -126)}

EPS = 1e-5
MOMENTUM = 0.1

# Small cases for every backend (the CUDA simulator included); on the CPU
# also larger ones whose extents divide no block or vector width.
SMALL = [((24, 4), 1), ((3, 4, 5, 2), 1), ((3, 2, 5, 4), -1)]
LARGE = [((1031, 5), 1), ((9, 1030), 1), ((6, 5, 23, 19), 1), ((4, 9, 17, 6), -1)]
SHAPES = SMALL if CUDASIM else SMALL + LARGE
IDS = [f"{shape}-axis{axis}" for shape, axis in SHAPES]

# the channel whose mean is 1e3 x its std, and the constant channel
BIG_MEAN, CONSTANT = 0, 1


# ---------------------------------------------------------------------------
# 16-bit values, exactly, by bit patterns
# ---------------------------------------------------------------------------
def storage_dtype(name):
    return np.dtype(np.float16) if name == "float16" else np.dtype(ml_dtypes.bfloat16)


def round_once(values, name):
    """float64 ``values`` rounded once (to nearest, ties to even) to the 16-bit type.

    ``q`` is the spacing of the 16-bit values around each value (fixed below
    the smallest normal exponent: subnormals); ``values / q`` and the product
    back are exact in float64, and ``np.rint`` rounds half to even.
    """
    frac_bits, emin = FORMATS[name]
    v = np.asarray(values, dtype=np.float64)
    assert np.all(np.isfinite(v))
    exponent = np.frexp(v)[1] - 1                     # floor(log2 |v|) for v != 0
    q = np.ldexp(1.0, np.maximum(exponent, emin) - frac_bits)
    rounded = np.rint(v / q) * q
    dtype = storage_dtype(name)
    result = rounded.astype(np.float32).astype(dtype)   # exact: rounded is representable
    assert np.array_equal(to_float64(result), rounded, equal_nan=False), "overflow"
    return result


# Results far smaller than the terms they are computed from (y = xhat*gamma
# + beta near 0, dx where its three terms cancel) are only as accurate as the
# float32 compute dtype allows: a few float32 roundings of those terms, which
# can be more than one 16-bit ulp of a tiny result. Such an element may
# differ from the rounded reference by up to FLOAT32_ALLOWANCE * (sum of the
# magnitudes of its terms). The allowance is far below one 16-bit ulp of the
# terms (2^-21 against 2^-11 for float16, 2^-8 for bfloat16), so it cannot
# hide a lost mean: centring the mean-1e3 channel in plain float32 costs
# about 1e3 * 2^-24 of its spread.
FLOAT32_ALLOWANCE = 2.0 ** -21


def ulp_errors(got, reference64, scale, name):
    """(ulp distances from the rounded reference, the same with 0 where the
    error is within the float32 allowance of ``scale``)."""
    ulps = ulp_distance(got, round_once(reference64, name))
    error = np.abs(to_float64(got) - reference64)
    return ulps, np.where(error > FLOAT32_ALLOWANCE * scale, ulps, 0)


def assert_within_one_ulp(got, reference64, scale, name, what, dtype):
    """``got`` (16-bit) within 1 ulp of ``reference64`` rounded once, or within
    the float32 allowance of ``scale`` (the magnitude of the terms); return
    the ulp distances beyond that allowance."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    ulps, beyond = ulp_errors(got, reference64, scale, name)
    if beyond.max() > 1:
        at = np.unravel_index(int(np.argmax(beyond)), ulps.shape)
        raise AssertionError(
            f"{what}: {int(ulps[at])} ulps from the correctly rounded result at {at}: got "
            f"{to_float64(got)[at]!r}, float64 reference {reference64[at]!r} (terms of "
            f"magnitude {scale[at]:.3g}); {int(np.sum(beyond > 1))} of {ulps.size} elements "
            f"beyond 1 ulp")
    return beyond


# ---------------------------------------------------------------------------
# data and the float64 reference
# ---------------------------------------------------------------------------
def make_case(rng, shape, axis, name, training=True):
    """16-bit x and dout, float32 gamma, beta and running statistics.

    Channel ``BIG_MEAN`` has a mean 1e3 times its std *as stored*: 1000 plus
    whole multiples of the 16-bit spacing there (0.5 in float16, 4 in
    bfloat16), drawn from a rounded normal of std 1 and with at least one
    step up and one down (bfloat16 has 8 significant bits, so most of its
    values are 1000 itself). Channel ``CONSTANT`` holds one value; the
    others have random means and spreads.

    Its beta puts the output of the value 1000 + spacing at about 2e-4
    (with the batch statistics when ``training``, else the running ones), where
    a 16-bit ulp is small: a mean rounded to float32 before centring (an
    error up to 3e-5 at 1000) is then tens of ulps off.
    """
    dtype = storage_dtype(name)
    ax = axis % len(shape)
    C = shape[ax]
    bshape = [1] * len(shape)
    bshape[ax] = C
    means = rng.uniform(-3, 3, C)
    stds = rng.uniform(0.5, 2.0, C)
    means[BIG_MEAN], stds[BIG_MEAN] = 1000.0, 1.0
    means[CONSTANT], stds[CONSTANT] = 2.5, 0.0
    x64 = rng.standard_normal(shape) * stds.reshape(bshape) + means.reshape(bshape)
    # the big-mean channel on the 16-bit grid around 1000
    spacing = 2.0 ** (9 - FORMATS[name][0])
    big = np.moveaxis(x64, ax, -1)[..., BIG_MEAN].reshape(-1)   # a copy
    steps = np.rint(rng.standard_normal(big.size) / spacing)
    up, down = rng.choice(big.size, size=2, replace=False)
    steps[up], steps[down] = max(steps[up], 1), min(steps[down], -1)
    np.moveaxis(x64, ax, -1)[..., BIG_MEAN] = (1000.0 + spacing * steps).reshape(
        np.moveaxis(x64, ax, -1).shape[:-1])
    x = x64.astype(np.float32).astype(dtype)
    stored = np.moveaxis(to_float64(x), ax, -1)[..., BIG_MEAN]
    assert np.all(stored == 1000.0 + spacing * steps.reshape(stored.shape))
    assert 250 < stored.mean() / stored.std() < 4000, stored.mean() / stored.std()
    dout = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    gamma = (rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    running_mean = (means + 0.2 * stds * rng.standard_normal(C)).astype(np.float32)
    running_var = (np.maximum(stds, 0.3) ** 2 * rng.uniform(0.7, 1.4, C)).astype(np.float32)
    if training:
        mean, var = stored.mean(), stored.var()
    else:
        mean, var = float(running_mean[BIG_MEAN]), float(running_var[BIG_MEAN])
    xhat = (1000.0 + spacing - mean) / np.sqrt(var + EPS)
    beta[BIG_MEAN] = np.float32(2e-4 - float(gamma[BIG_MEAN]) * xhat)
    return x, dout, gamma, beta, running_mean, running_var


def reference(x, dout, gamma, beta, running_mean, running_var, training, axis):
    """float64 results from the formulas, in ``x``'s layout (plain NumPy, not fastbn)."""
    ax = axis % x.ndim
    C = x.shape[ax]
    xc = np.moveaxis(to_float64(x), ax, -1).reshape(-1, C)    # (M, C)
    dy = np.moveaxis(to_float64(dout), ax, -1).reshape(-1, C)
    M = xc.shape[0]
    g = gamma.astype(np.float64)
    b = beta.astype(np.float64)
    result = {}
    if training:
        mean = xc.mean(axis=0)
        var = ((xc - mean) ** 2).mean(axis=0)
        result["running_mean"] = (1 - MOMENTUM) * running_mean.astype(np.float64) + MOMENTUM * mean
        result["running_var"] = ((1 - MOMENTUM) * running_var.astype(np.float64)
                                 + MOMENTUM * var * M / (M - 1))
    else:
        mean = running_mean.astype(np.float64)
        var = running_var.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (xc - mean) * invstd
    out = xhat * g + b
    dbeta = dy.sum(axis=0)
    dgamma = (dy * xhat).sum(axis=0)
    if training:
        dx = g * invstd * (dy - dbeta / M - xhat * dgamma / M)
    else:
        dx = dy * g * invstd
    # magnitudes of the terms each result is computed from
    out_scale = np.abs(xhat * g) + np.abs(b)
    if training:
        dx_scale = np.abs(g * invstd) * (np.abs(dy) + np.abs(dbeta / M)
                                         + np.abs(xhat * dgamma / M))
    else:
        dx_scale = np.abs(dx)
    back = lambda a: np.moveaxis(a.reshape(np.moveaxis(x, ax, -1).shape), -1, ax)
    result.update(out=back(out), dx=back(dx), out_scale=back(out_scale),
                  dx_scale=back(dx_scale), dgamma=dgamma, dbeta=dbeta, mean=mean,
                  var=var, invstd=invstd, abs_dy=np.abs(dy).sum(axis=0),
                  abs_dy_xhat=np.abs(dy * xhat).sum(axis=0))
    return result


def assert_float32_sum(got, want, abs_terms, what):
    """A float32 result of a float64 sum: within 2 float32 ulps of the sum plus a
    float32 accumulation allowance of 1e-6 of the sum of absolute terms."""
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}, expected float32"
    tol = 2 * np.spacing(np.abs(want).astype(np.float32)).astype(np.float64) + 1e-6 * abs_terms
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= tol), f"{what}: errors {err} > allowed {tol}"


# ---------------------------------------------------------------------------
# the accuracy bar, every backend
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_within_one_ulp_of_float64(backend, rng, name, shape, axis, training):
    dtype = storage_dtype(name)
    x, dout, gamma, beta, rm, rv = make_case(rng, shape, axis, name, training)
    ref = reference(x, dout, gamma, beta, rm, rv, training, axis)
    snap = Snapshot(x=x, dout=dout, gamma=gamma, beta=beta)
    rm_, rv_ = rm.copy(), rv.copy()
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm_,
                                          running_var=rv_, momentum=MOMENTUM, eps=EPS,
                                          axis=axis, backend=backend)
    mode = "train" if training else "eval"
    ulps = assert_within_one_ulp(out, ref["out"], ref["out_scale"], name, "out", dtype)
    record_ulps((name, mode, "out", backend), ulps.max())

    # the cache: float64 statistics
    mean, invstd = host(cache.mean), host(cache.invstd)
    assert mean.dtype == np.float64 and invstd.dtype == np.float64, (mean.dtype, invstd.dtype)
    tol = 1e-6 * np.sqrt(ref["var"]) + 1e-12 * np.abs(ref["mean"])
    assert np.all(np.abs(mean - ref["mean"]) <= tol), ("cache.mean", mean - ref["mean"])
    np.testing.assert_allclose(invstd, ref["invstd"], rtol=1e-6, err_msg="cache.invstd")

    # running statistics: float32 arrays, PyTorch's convention (unbiased variance)
    assert rm_.dtype == np.float32 and rv_.dtype == np.float32
    if training:
        np.testing.assert_allclose(rm_, ref["running_mean"], rtol=2e-7, atol=1e-30)
        np.testing.assert_allclose(rv_, ref["running_var"], rtol=2e-6, atol=1e-30)
    else:
        np.testing.assert_array_equal(rm_, rm)
        np.testing.assert_array_equal(rv_, rv)

    for method in ("simplified", "staged"):
        dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
        ulps = assert_within_one_ulp(dx, ref["dx"], ref["dx_scale"], name, f"{method} dx",
                                      dtype)
        record_ulps((name, mode, f"dx {method}", backend), ulps.max())
        assert_float32_sum(dbeta, ref["dbeta"], ref["abs_dy"], f"{method} dbeta")
        assert_float32_sum(dgamma, ref["dgamma"], ref["abs_dy_xhat"], f"{method} dgamma")
    snap.assert_unchanged()


@pytest.mark.parametrize("name", DTYPES)
def test_constant_and_big_mean_channels(backend, rng, name):
    """The constant channel maps to beta exactly; the big-mean channel is not
    flattened: its outputs take many distinct values, with mean ~beta."""
    shape = (40, 3)
    x, dout, gamma, beta, rm, rv = make_case(rng, shape, 1, name)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    out64 = to_float64(out)
    np.testing.assert_array_equal(out64[:, CONSTANT], to_float64(round_once(beta[CONSTANT],
                                                                            name)))
    assert len(np.unique(to_float64(x)[:, BIG_MEAN])) >= 3
    assert len(np.unique(out64[:, BIG_MEAN])) == len(np.unique(to_float64(x)[:, BIG_MEAN]))
    assert abs(out64[:, BIG_MEAN].mean() - beta[BIG_MEAN]) < 0.05 * abs(gamma[BIG_MEAN])


@pytest.mark.parametrize("name", DTYPES)
def test_parameters_cast_to_float32(backend, rng, name):
    """float64 gamma/beta with 16-bit x act as their float32 roundings."""
    x, _, gamma, beta, _, _ = make_case(rng, (12, 3), 1, name)
    gamma64 = gamma.astype(np.float64) * (1 + 1e-9)
    beta64 = beta.astype(np.float64) + 1e-9
    a, _ = fastbn.batchnorm_forward(x, gamma64, beta64, backend=backend)
    b, _ = fastbn.batchnorm_forward(x, gamma64.astype(np.float32), beta64.astype(np.float32),
                                    backend=backend)
    assert a.dtype == storage_dtype(name)
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


# ---------------------------------------------------------------------------
# out= and dtypes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("method", ["simplified", "staged"])
def test_out_buffers(backend, rng, name, method):
    dtype = storage_dtype(name)
    x, dout, gamma, beta, _, _ = make_case(rng, (4, 3, 2, 3), 1, name)
    out_buf = np.zeros(x.shape, dtype)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend, out=out_buf)
    assert out is out_buf
    plain, _ = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    np.testing.assert_array_equal(out_buf.view(np.uint16), plain.view(np.uint16))
    dx_buf = np.zeros(x.shape, dtype)
    dx, _, _ = fastbn.batchnorm_backward(dout, cache, method=method, out=dx_buf)
    assert dx is dx_buf
    dx_plain, _, _ = fastbn.batchnorm_backward(dout, cache, method=method)
    np.testing.assert_array_equal(dx_buf.view(np.uint16), dx_plain.view(np.uint16))


def _other_dtypes(name):
    """Same-shape out/dout dtypes that a 16-bit call must refuse."""
    others = [np.dtype(np.float32), np.dtype(np.float64)]
    if ml_dtypes is not None:
        others.append(np.dtype(np.float16) if name == "bfloat16" else np.dtype(ml_dtypes.bfloat16))
    return others


@pytest.mark.parametrize("name", DTYPES)
def test_out_and_dout_must_have_the_16bit_dtype(backend, rng, name):
    x, dout, gamma, beta, rm, rv = make_case(rng, (6, 3, 2), 1, name)
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    for other in _other_dtypes(name):
        bad = np.zeros(x.shape, other)
        rm_, rv_ = rm.copy(), rv.copy()
        snap = Snapshot(x=x, gamma=gamma, beta=beta, rm=rm_, rv=rv_, bad=bad)
        with pytest.raises(ValueError, match="dtype"):
            fastbn.batchnorm_forward(x, gamma, beta, running_mean=rm_, running_var=rv_,
                                     backend=backend, out=bad)
        snap.assert_unchanged()
        snap = Snapshot(x=x, dout=dout, bad=bad)
        with pytest.raises(ValueError, match="dtype"):
            fastbn.batchnorm_backward(dout, cache, out=bad)
        with pytest.raises(ValueError, match="dtype"):
            fastbn.batchnorm_backward(dout.astype(np.float32).astype(other), cache)
        snap.assert_unchanged()


# ---------------------------------------------------------------------------
# PyTorch's CPU float16/bfloat16 batch norm on the same data
# ---------------------------------------------------------------------------


def _to_torch(a, name):
    if name == "float16":
        return torch.from_numpy(np.ascontiguousarray(a))
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


def _from_torch(t, name):
    if name == "float16":
        return t.detach().numpy()
    return t.detach().contiguous().view(torch.int16).numpy().view(storage_dtype(name))


def torch_batch_norm(x, dout, gamma, beta, rm, rv, training, name):
    """F.batch_norm on NCHW 16-bit x with float32 weight, bias and running stats."""
    xt = _to_torch(x, name).requires_grad_(True)
    y = torch.nn.functional.batch_norm(xt, torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy()),
                                       torch.from_numpy(gamma.copy()), torch.from_numpy(beta.copy()),
                                       training=training, momentum=MOMENTUM, eps=EPS)
    y.backward(_to_torch(dout, name))
    assert y.dtype == xt.dtype and xt.grad.dtype == xt.dtype
    return _from_torch(y, name), _from_torch(xt.grad, name)


# Large enough on the CPU for PyTorch's float32 accumulation to show.
TORCH_SHAPE = (4, 3, 4, 5) if CUDASIM else (64, 4, 32, 32)


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vs_torch(backend, rng, name, training):
    """fastbn and PyTorch against the same correctly rounded results, per
    channel group (the mean-1e3 channel, the others): fastbn meets the bar
    and its largest ulp error is at most max(1, PyTorch's). (Below 1 ulp the
    two differ by where each float32 result falls between two 16-bit values.)
    """
    pytest.importorskip("torch")
    dtype = storage_dtype(name)
    x, dout, gamma, beta, rm, rv = make_case(rng, TORCH_SHAPE, 1, name, training)
    ref = reference(x, dout, gamma, beta, rm, rv, training, 1)
    t_out, t_dx = torch_batch_norm(x, dout, gamma, beta, rm, rv, training, name)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training,
                                          running_mean=rm.copy(), running_var=rv.copy(),
                                          momentum=MOMENTUM, eps=EPS, backend=backend)
    dx, _, _ = fastbn.batchnorm_backward(dout, cache)
    mode = "train" if training else "eval"
    groups = {"mean-1e3 channel": [BIG_MEAN],
              "other channels": [c for c in range(x.shape[1]) if c != BIG_MEAN]}
    failures = []
    for what, mine, theirs in (("out", out, t_out), ("dx", dx, t_dx)):
        assert_within_one_ulp(mine, ref[what], ref[f"{what}_scale"], name, what, dtype)
        scale = ref[f"{what}_scale"]
        mine_strict, mine_beyond = ulp_errors(mine, ref[what], scale, name)
        theirs_strict, theirs_beyond = ulp_errors(theirs, ref[what], scale, name)
        for group, channels in groups.items():
            m = int(mine_beyond[:, channels].max())
            t = int(theirs_beyond[:, channels].max())
            for who, strict, beyond in (("torch", theirs_strict, t),
                                        (f"fastbn {backend}", mine_strict, m)):
                record_ulps((name, mode, what, group, who), beyond)
                record_ulps((name, mode, what, group, who, "incl. f32 resolution"),
                            strict[:, channels].max())
            if m > max(t, 1):
                failures.append(f"{what} {group}: fastbn {m} ulps, torch {t} ulps")
    assert not failures, failures
