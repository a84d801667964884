"""Vectorized NumPy backend: the reference implementation.

Every kernel works on the canonical ``(A, C, B)`` view (see
:mod:`fastbn.backends`) with whole-array ufuncs, ``out=`` arguments and as few
temporaries as NumPy allows. Per-channel statistics are reduced over axes
``(0, 2)`` with float64 accumulators.

float32 centring is done with a split mean ``mean = mean_hi + mean_lo``
(both float32): ``(x - mean_hi) - mean_lo`` is exact to about one float32
rounding of the *result*, not of ``x``, so a channel whose mean is far larger
than its spread keeps its precision without a float64 copy of ``x``.
"""
import numpy as np

ON_DEVICE = False
_REDUCE_AXES = (0, 2)


def availability():
    """The NumPy backend is always available."""
    return True, ""


def info():
    """Thread and device facts (NumPy's elementwise kernels are serial)."""
    return {"threads": 1, "openmp": False, "device": "cpu"}


def _channel(values, dtype):
    """A per-channel float64 array as a broadcastable ``(1, C, 1)`` of ``dtype``."""
    return np.asarray(values, dtype=dtype).reshape(1, -1, 1)


def _sum64(x):
    """Per-channel float64 sum over ``A`` and ``B``."""
    return np.add.reduce(x, axis=_REDUCE_AXES, dtype=np.float64)


def _center(x, mean, out):
    """``out = x - mean`` with float64 accuracy; ``out`` has ``x.dtype``."""
    if x.dtype == np.float64:
        np.subtract(x, _channel(mean, np.float64), out=out)
        return out
    mean_hi = np.asarray(mean, dtype=x.dtype)
    mean_lo = np.asarray(mean - mean_hi.astype(np.float64), dtype=x.dtype)
    np.subtract(x, mean_hi.reshape(1, -1, 1), out=out)
    np.subtract(out, mean_lo.reshape(1, -1, 1), out=out)
    return out


def stats(x):
    """Per-channel mean and biased variance, two passes in float64.

    Parameters
    ----------
    x : ndarray, shape (A, C, B)

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
    """
    count = x.shape[0] * x.shape[2]
    mean = _sum64(x) / count
    centered = np.empty(x.shape, dtype=np.float64)
    np.subtract(x, _channel(mean, np.float64), out=centered)
    np.square(centered, out=centered)
    var = _sum64(centered) / count
    return mean, var


def normalize(x, mean, invstd, gamma, beta, out):
    """``out = (x - mean) * invstd * gamma + beta``."""
    _center(x, mean, out)
    np.multiply(out, _channel(invstd * gamma, x.dtype), out=out)
    np.add(out, _channel(beta, x.dtype), out=out)


def forward_train(x, gamma, beta, eps, out):
    """Batch statistics, then normalization into ``out``.

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased batch variance.
    """
    mean, var = stats(x)
    normalize(x, mean, 1.0 / np.sqrt(var + eps), gamma, beta, out)
    return mean, var


def backward_reduce(dy, x, mean, invstd):
    """``sum_dy = sum(dy)`` and ``sum_dy_xhat = sum(dy * xhat)`` per channel.

    ``sum(dy * xhat) = invstd * sum(dy * (x - mean))``.
    """
    sum_dy = _sum64(dy)
    centered = _center(x, mean, np.empty_like(x))
    np.multiply(centered, dy, out=centered)
    sum_dy_xhat = _sum64(centered) * invstd
    return sum_dy, sum_dy_xhat


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``.

    Rearranged per channel as ``out = dy * k - (x - mean) * q - k * sum_dy / M``
    with ``k = gamma * invstd`` and ``q = k * invstd * sum_dy_xhat / M``.
    """
    count = x.shape[0] * x.shape[2]
    scale = gamma * invstd
    xmu_coef = scale * invstd * sum_dy_xhat / count
    _center(x, mean, out)
    np.multiply(out, _channel(-xmu_coef, x.dtype), out=out)
    out += dy * _channel(scale, x.dtype)
    out -= _channel(scale * sum_dy / count, x.dtype)


def backward_train(dy, x, mean, invstd, gamma, out):
    """Simplified backward: :func:`backward_reduce` then :func:`backward_elemt`.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, invstd)
    backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out)
    return sum_dy, sum_dy_xhat


def backward_staged(dy, x, mean, invstd, gamma, eps, out):
    """The cs231n computational graph, walked back stage by stage.

    Each stage writes a full-size intermediate of ``x.dtype``; reductions
    accumulate in float64. See :mod:`fastbn.backends` for the stages.

    Returns
    -------
    dgamma, dbeta : ndarray of float64, shape (C,)
    """
    dtype = x.dtype
    count = x.shape[0] * x.shape[2]
    # Rebuild the forward graph's full-size nodes.
    xmu = _center(x, mean, np.empty_like(x))
    xhat = xmu * _channel(invstd, dtype)
    # step 9: out = gammax + beta
    dbeta = _sum64(dy)
    # step 8: gammax = gamma * xhat
    dgamma = _sum64(dy * xhat)
    dxhat = dy * _channel(gamma, dtype)
    # step 7: xhat = xmu * ivar
    divar = _sum64(dxhat * xmu)
    dxmu1 = dxhat * _channel(invstd, dtype)
    # step 6: ivar = 1 / sqrtvar, so d(ivar)/d(sqrtvar) = -1 / sqrtvar**2
    dsqrtvar = -invstd**2 * divar
    # step 5: sqrtvar = sqrt(var + eps)
    dvar = 0.5 * invstd * dsqrtvar
    # step 4: var = mean(sq)
    dsq = np.broadcast_to(_channel(dvar / count, dtype), x.shape).copy()
    # step 3: sq = xmu**2
    dxmu2 = 2 * xmu * dsq
    # step 2: xmu = x - mu
    dx1 = dxmu1 + dxmu2
    dmu = -_sum64(dx1)
    # steps 1 and 0: mu = mean(x); dx = dx1 + dx2
    np.add(dx1, _channel(dmu / count, dtype), out=out)
    return dgamma, dbeta
