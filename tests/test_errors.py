"""Every row of DESIGN.md's bad-input table: the error type, the message
content where the table names it, and that nothing was modified."""
import math

import numpy as np
import pytest

import fastbn
from conftest import Snapshot, make_input, make_params, make_running

SHAPE = (6, 3, 2, 2)
C = 3


@pytest.fixture
def setup(rng):
    """A valid float64 problem plus snapshots of everything a call could touch."""
    x = make_input(rng, SHAPE)
    gamma, beta = make_params(rng, C)
    rm, rv = make_running(rng, C)
    return x, gamma, beta, rm, rv


def _forward_raises(exc, backend, x, gamma=None, beta=None, match=None, **kw):
    """Call batchnorm_forward expecting ``exc``; check nothing changed. Returns the message."""
    snap = Snapshot(x=x if isinstance(x, np.ndarray) else None,
                    gamma=gamma if isinstance(gamma, np.ndarray) else None,
                    beta=beta if isinstance(beta, np.ndarray) else None,
                    running_mean=kw.get("running_mean") if isinstance(kw.get("running_mean"), np.ndarray) else None,
                    running_var=kw.get("running_var") if isinstance(kw.get("running_var"), np.ndarray) else None,
                    out=kw.get("out") if isinstance(kw.get("out"), np.ndarray) else None)
    with pytest.raises(exc, match=match) as info:
        fastbn.batchnorm_forward(x, gamma, beta, backend=backend, **kw)
    snap.assert_unchanged()
    return str(info.value)


# ---------------------------------------------------------------------------
# integer, bool, complex or object dtype -> TypeError naming the dtype
# ---------------------------------------------------------------------------
# (float16 and bfloat16 are accepted: 16-bit storage, tests/test_half_precision.py)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_,
                                   np.complex64, np.complex128, object,
                                   pytest.param(np.longdouble, marks=pytest.mark.skipif(
                                       np.dtype(np.longdouble).itemsize == 8,
                                       reason="long double is float64 on this platform"))])
def test_bad_dtype_x(backend, setup, dtype):
    x, gamma, beta, rm, rv = setup
    xb = (x * 3).astype(dtype)
    msg = _forward_raises(TypeError, backend, xb, gamma, beta,
                          running_mean=rm, running_var=rv)
    assert str(np.dtype(dtype)) in msg, msg


# ---------------------------------------------------------------------------
# x.ndim < 2, no channels, axis out of range -> ValueError naming the shape
# (an empty batch with C > 0 channels is not an error: tests/test_nn.py)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5,), (), (4, 0), (0, 0), (2, 0, 3)])
def test_bad_shape_x(backend, setup, shape):
    _, gamma, beta, rm, rv = setup
    x = np.ones(shape)
    msg = _forward_raises(ValueError, backend, x, gamma, beta,
                          running_mean=rm, running_var=rv)
    assert str(tuple(shape)) in msg, msg


@pytest.mark.parametrize("axis", [4, 5, -5, -7])
def test_axis_out_of_range(backend, setup, axis):
    x, gamma, beta, rm, rv = setup
    msg = _forward_raises(ValueError, backend, x, gamma, beta, axis=axis,
                          running_mean=rm, running_var=rv)
    assert str(SHAPE) in msg, msg


def test_axis_out_of_range_2d(backend, rng):
    x = make_input(rng, (5, 4))
    for axis in (2, -3):
        msg = _forward_raises(ValueError, backend, x, axis=axis)
        assert "(5, 4)" in msg, msg


# ---------------------------------------------------------------------------
# gamma / beta / running stats not of shape (C,) -> ValueError, expected and actual
# ---------------------------------------------------------------------------
BAD_PARAM_SHAPES = [(4,), (2,), (1, 3), (3, 1), (1,)]


@pytest.mark.parametrize("which", ["gamma", "beta", "running_mean", "running_var"])
@pytest.mark.parametrize("bad_shape", BAD_PARAM_SHAPES, ids=str)
def test_bad_param_shape(backend, setup, which, bad_shape):
    x, gamma, beta, rm, rv = setup
    args = dict(gamma=gamma, beta=beta, running_mean=rm, running_var=rv)
    args[which] = np.full(bad_shape, 0.5)
    # the good running stats must stay untouched too
    msg = _forward_raises(ValueError, backend, x, **args)
    assert f"({C},)" in msg, f"expected shape missing: {msg}"
    assert str(bad_shape) in msg, f"actual shape missing: {msg}"


def test_scalar_gamma_rejected(backend, setup):
    x, gamma, beta, rm, rv = setup
    msg = _forward_raises(ValueError, backend, x, np.float64(2.0), beta,
                          running_mean=rm, running_var=rv)
    assert f"({C},)" in msg and "()" in msg, msg


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_bad_running_shape_eval(backend, setup, which):
    x, gamma, beta, rm, rv = setup
    args = dict(running_mean=rm, running_var=rv)
    args[which] = np.ones(C + 2)
    msg = _forward_raises(ValueError, backend, x, gamma, beta, training=False, **args)
    assert f"({C},)" in msg and f"({C + 2},)" in msg, msg


# ---------------------------------------------------------------------------
# training with one value per channel
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis", [((1, 3), 1), ((1, 3, 1, 1), 1), ((1, 1, 1, 3), -1),
                                        ((1, 4, 1), 1)])
def test_one_value_per_channel(backend, rng, shape, axis):
    x = make_input(rng, shape, axis=axis)
    C_ = shape[axis]
    rm, rv = make_running(rng, C_)
    _forward_raises(ValueError, backend, x, axis=axis, running_mean=rm, running_var=rv,
                    match="Expected more than 1 value per channel when training")


def test_one_value_per_channel_ok_in_eval(backend, rng):
    """The restriction is for training only: evaluation of a single sample works."""
    x = make_input(rng, (1, 3))
    rm, rv = make_running(rng, 3)
    out, _ = fastbn.batchnorm_forward(x, training=False, running_mean=rm,
                                      running_var=rv, backend=backend)
    np.testing.assert_allclose(out, (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-12)


# ---------------------------------------------------------------------------
# training=False without running stats
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["both", "running_mean", "running_var"])
def test_eval_without_running_stats(backend, setup, missing):
    x, gamma, beta, rm, rv = setup
    kw = {}
    if missing == "running_mean":
        kw["running_var"] = rv
    elif missing == "running_var":
        kw["running_mean"] = rm
    _forward_raises(ValueError, backend, x, gamma, beta, training=False, **kw)


# ---------------------------------------------------------------------------
# eps <= 0 in training, eps < 0 in evaluation, momentum outside [0, 1], NaN
# for either
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [-1e-5, -1.0, math.nan, np.float64("nan")])
@pytest.mark.parametrize("training", [True, False])
def test_bad_eps(backend, setup, eps, training):
    x, gamma, beta, rm, rv = setup
    _forward_raises(ValueError, backend, x, gamma, beta, eps=eps, training=training,
                    running_mean=rm, running_var=rv)


def test_zero_eps_refused_in_training_only(backend, setup):
    """PyTorch 2.13's rule: eps must be positive in training, may be 0 in evaluation."""
    x, gamma, beta, rm, rv = setup
    msg = _forward_raises(ValueError, backend, x, gamma, beta, eps=0.0, training=True,
                          running_mean=rm, running_var=rv)
    assert "eps must be positive" in msg, msg
    out, _ = fastbn.batchnorm_forward(x, gamma, beta, eps=0.0, training=False,
                                      running_mean=rm, running_var=rv, backend=backend)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("momentum", [-0.1, 1.5, -1e-12, 1.0 + 1e-9, math.nan])
def test_bad_momentum(backend, setup, momentum):
    x, gamma, beta, rm, rv = setup
    _forward_raises(ValueError, backend, x, gamma, beta, momentum=momentum,
                    running_mean=rm, running_var=rv)


# ---------------------------------------------------------------------------
# unknown backend name -> ValueError listing available_backends()
# ---------------------------------------------------------------------------
def _check_lists_available(msg):
    for name in fastbn.available_backends():
        assert name in msg, f"{name!r} not listed in: {msg}"


def test_unknown_backend_forward(setup):
    x, gamma, beta, rm, rv = setup
    msg = _forward_raises(ValueError, "no_such_backend", x, gamma, beta,
                          running_mean=rm, running_var=rv)
    _check_lists_available(msg)


def test_unknown_backend_set_and_use(setup):
    x = setup[0]
    _, before = fastbn.batchnorm_forward(x)
    with pytest.raises(ValueError) as info:
        fastbn.set_backend("no_such_backend")
    _check_lists_available(str(info.value))
    with pytest.raises(ValueError) as info:
        with fastbn.use_backend("no_such_backend"):
            pass
    _check_lists_available(str(info.value))
    # the default is unchanged
    _, after = fastbn.batchnorm_forward(x)
    assert after.backend == before.backend


# ---------------------------------------------------------------------------
# a known backend that cannot run here -> RuntimeError saying why
# ---------------------------------------------------------------------------
def _unavailable_backend():
    info = fastbn.backend_info()
    for name, entry in info.items():
        if not entry["available"]:
            return name, entry.get("reason", "")
    pytest.skip("every known backend is available here")


def test_unavailable_backend_forward(setup):
    name, reason = _unavailable_backend()
    x, gamma, beta, rm, rv = setup
    msg = _forward_raises(RuntimeError, name, x, gamma, beta,
                          running_mean=rm, running_var=rv)
    assert name in msg, msg
    assert reason and reason in msg, f"reason {reason!r} not in {msg!r}"


def test_unavailable_backend_set_and_use(setup):
    name, reason = _unavailable_backend()
    x = setup[0]
    _, before = fastbn.batchnorm_forward(x)
    with pytest.raises(RuntimeError, match=name):
        fastbn.set_backend(name)
    with pytest.raises(RuntimeError, match=name):
        with fastbn.use_backend(name):
            pass
    _, after = fastbn.batchnorm_forward(x)
    assert after.backend == before.backend


# ---------------------------------------------------------------------------
# dout shape or dtype not matching the cache -> ValueError
# ---------------------------------------------------------------------------
def _bad_douts(x):
    return {
        "shape_transposed": np.ones(x.shape[::-1]),
        "shape_smaller": np.ones(x.shape[:-1] + (x.shape[-1] - 1,)),
        "shape_extra_axis": np.ones((1,) + x.shape),
        "dtype_float32": np.ones(x.shape, np.float32),
    }


@pytest.mark.parametrize("kind", ["shape_transposed", "shape_smaller", "shape_extra_axis",
                                  "dtype_float32"])
@pytest.mark.parametrize("method", ["simplified", "staged"])
@pytest.mark.parametrize("training", [True, False])
def test_bad_dout(backend, setup, kind, method, training):
    x, gamma, beta, rm, rv = setup
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm,
                                        running_var=rv, backend=backend)
    dout = _bad_douts(x)[kind]
    snap = Snapshot(x=x, gamma=gamma, beta=beta, rm=rm, rv=rv, dout=dout)
    with pytest.raises(ValueError):
        fastbn.batchnorm_backward(dout, cache, method=method)
    snap.assert_unchanged()


@pytest.mark.parametrize("dtype", [np.int64, np.complex128])
def test_bad_dout_dtype_kind(backend, setup, dtype):
    x = setup[0]
    _, cache = fastbn.batchnorm_forward(x, backend=backend)
    dout = np.ones(x.shape, dtype)
    snap = Snapshot(x=x, dout=dout)
    with pytest.raises((ValueError, TypeError)):
        fastbn.batchnorm_backward(dout, cache)
    snap.assert_unchanged()


def test_float64_dout_for_float32_cache(backend, setup):
    x = setup[0].astype(np.float32)
    _, cache = fastbn.batchnorm_forward(x, backend=backend)
    dout = np.ones(x.shape, np.float64)
    snap = Snapshot(x=x, dout=dout)
    with pytest.raises(ValueError):
        fastbn.batchnorm_backward(dout, cache)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------
# method not "simplified"/"staged" -> ValueError
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["alt", "Simplified", "", None, "staged "])
def test_bad_method(backend, setup, method):
    x, gamma, beta, _, _ = setup
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    dout = np.ones_like(x)
    out = np.full_like(x, 7.0)
    snap = Snapshot(x=x, dout=dout, out=out)
    with pytest.raises(ValueError):
        fastbn.batchnorm_backward(dout, cache, method=method, out=out)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------
# out= of wrong shape, dtype, or not contiguous -> ValueError
# ---------------------------------------------------------------------------
def _bad_outs(x):
    big = np.full(x.shape[:-1] + (2 * x.shape[-1],), 7.0, dtype=x.dtype)
    return {
        "shape": np.full(x.shape[::-1], 7.0, dtype=x.dtype),
        "flat": np.full(x.size, 7.0, dtype=x.dtype),
        "dtype": np.full(x.shape, 7.0, dtype=np.float32 if x.dtype == np.float64 else np.float64),
        "strided": big[..., ::2],
        "fortran": np.asfortranarray(np.full(x.shape, 7.0, dtype=x.dtype)),
    }


OUT_KINDS = ["shape", "flat", "dtype", "strided", "fortran"]


@pytest.mark.parametrize("kind", OUT_KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_bad_out_forward(backend, setup, kind, training):
    x, gamma, beta, rm, rv = setup
    out = _bad_outs(x)[kind]
    _forward_raises(ValueError, backend, x, gamma, beta, training=training,
                    running_mean=rm, running_var=rv, out=out)


@pytest.mark.parametrize("kind", OUT_KINDS)
@pytest.mark.parametrize("method", ["simplified", "staged"])
def test_bad_out_backward(backend, setup, kind, method):
    x, gamma, beta, rm, rv = setup
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                        backend=backend)
    dout = np.ones_like(x)
    out = _bad_outs(x)[kind]
    snap = Snapshot(x=x, gamma=gamma, beta=beta, rm=rm, rv=rv, dout=dout, out=out)
    with pytest.raises(ValueError):
        fastbn.batchnorm_backward(dout, cache, method=method, out=out)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------
# running statistics are modified only on success: a failure late in the
# argument list must leave them untouched (covered above); also a failing
# backward after a successful forward leaves them as the forward left them.
# ---------------------------------------------------------------------------
def test_running_stats_untouched_by_failed_training_call(backend, setup):
    x, gamma, beta, rm, rv = setup
    # every argument valid except the last checked ones
    for bad in (dict(out=np.empty((1,))), dict(eps=-1.0), dict(momentum=2.0),
                dict(beta=np.ones(C + 1))):
        kw = dict(gamma=gamma, beta=beta, running_mean=rm, running_var=rv)
        kw.update(bad)
        g, b = kw.pop("gamma"), kw.pop("beta")
        _forward_raises(ValueError, backend, x, g, b, **kw)
