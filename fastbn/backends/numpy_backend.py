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

from . import _host

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


def _dot64(a, b):
    """Per-channel float64 ``sum(a * b)`` over ``A`` and ``B``, without a temporary."""
    return np.einsum("acb,acb->c", a, b, dtype=np.float64)


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


def _mean_var(x, centered):
    """Two-pass mean and biased variance; ``centered`` receives ``x - mean``."""
    count = x.shape[0] * x.shape[2]
    mean = _sum64(x) / count
    _center(x, mean, centered)
    var = _dot64(centered, centered) / count
    return mean, var


def stats(x):
    """Per-channel mean and biased variance, two passes in float64.

    Parameters
    ----------
    x : ndarray, shape (A, C, B)

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
    """
    return _mean_var(x, np.empty_like(x))


def normalize(x, mean, invstd, gamma, beta, out):
    """``out = (x - mean) * invstd * gamma + beta``."""
    _center(x, mean, out)
    np.multiply(out, _channel(invstd * gamma, x.dtype), out=out)
    np.add(out, _channel(beta, x.dtype), out=out)


def _forward_fused(x, gamma, beta, eps, out):
    """Batch statistics, then normalization into ``out``.

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased batch variance.
    """
    mean, var = _mean_var(x, out)  # out holds x - mean
    np.multiply(out, _channel(gamma / np.sqrt(var + eps), x.dtype), out=out)
    np.add(out, _channel(beta, x.dtype), out=out)
    return mean, var


def forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None, momentum=0.1):
    """Training forward; running statistics updated in place (see :mod:`fastbn.backends`)."""
    return _host.forward_train(_forward_fused, x, gamma, beta, eps, out,
                               running_mean, running_var, momentum)


def forward_eval(x, gamma, beta, running_mean, running_var, eps, out):
    """Evaluation forward with the running statistics."""
    return _host.forward_eval(normalize, x, gamma, beta, running_mean, running_var, eps, out)


def backward_eval(dy, x, mean, invstd, gamma, out):
    """Evaluation backward ``dx = dy * gamma * invstd``, and the two sums."""
    return _host.backward_eval(backward_reduce, normalize, dy, x, mean, invstd, gamma, out)


def backward_reduce(dy, x, mean, invstd):
    """``sum_dy = sum(dy)`` and ``sum_dy_xhat = sum(dy * xhat)`` per channel.

    ``sum(dy * xhat) = invstd * sum(dy * (x - mean))``.
    """
    return _reduce(dy, x, mean, invstd, np.empty_like(x))


def _reduce(dy, x, mean, invstd, centered):
    """:func:`backward_reduce`; ``centered`` receives ``x - mean``."""
    _center(x, mean, centered)
    return _sum64(dy), _dot64(dy, centered) * invstd


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``."""
    _center(x, mean, out)
    _elemt_from_centered(dy, invstd, gamma, sum_dy, sum_dy_xhat, out)


def _elemt_from_centered(dy, invstd, gamma, sum_dy, sum_dy_xhat, out):
    """:func:`backward_elemt` with ``out`` already holding ``x - mean``.

    ``dx = k * ((x - mean) * (-invstd * sum_dy_xhat / M) + dy - sum_dy / M)``
    with ``k = gamma * invstd``, in place in ``out``.
    """
    count = out.shape[0] * out.shape[2]
    dtype = out.dtype
    np.multiply(out, _channel(-invstd * sum_dy_xhat / count, dtype), out=out)
    np.add(out, dy, out=out)
    np.subtract(out, _channel(sum_dy / count, dtype), out=out)
    np.multiply(out, _channel(gamma * invstd, dtype), out=out)


def backward_train(dy, x, mean, invstd, gamma, out):
    """Simplified backward: the reduction, then the elementwise pass.

    ``out`` holds ``x - mean`` between the two, so no temporary is made.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    sum_dy, sum_dy_xhat = _reduce(dy, x, mean, invstd, out)
    _elemt_from_centered(dy, invstd, gamma, sum_dy, sum_dy_xhat, out)
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
