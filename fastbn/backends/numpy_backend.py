"""Vectorized NumPy backend: the reference implementation.

Every kernel works on the canonical ``(A, C, B)`` view (see
:mod:`fastbn.backends`) with whole-array ufuncs, ``out=`` arguments and as few
temporaries as NumPy allows. Per-channel statistics are reduced over axes
``(0, 2)`` with float64 accumulators.

float32 centring is done with a split mean ``mean = mean_hi + mean_lo``
(both float32): ``(x - mean_hi) - mean_lo`` is exact to about one float32
rounding of the *result*, not of ``x``, so a channel whose mean is far larger
than its spread keeps its precision without a float64 copy of ``x``.

16-bit storage (float16, bfloat16) is computed in float32: each kernel works
on a float32 copy of its 16-bit inputs and rounds its result once into the
16-bit ``out``. A fused ReLU is one more ufunc pass here (``np.maximum``);
its backward masks ``dy`` by ``y > 0`` with ``y`` rebuilt by the forward's
own arithmetic (:func:`_normalize_into`), so the mask is the forward's.
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


def _compute(array):
    """16-bit storage as a float32 copy; float32 and float64 arrays as they are."""
    return array.astype(np.float32) if array.dtype.itemsize == 2 else array


def _work_buffer(out):
    """Where a kernel writes: ``out`` itself, or a float32 buffer for 16-bit ``out``."""
    return np.empty(out.shape, dtype=np.float32) if out.dtype.itemsize == 2 else out


def _store(work, out):
    """Round ``work`` once into ``out`` (nothing to do when they are the same array)."""
    if work is not out:
        out[...] = work


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
    x = _compute(x)
    return _mean_var(x, np.empty_like(x))


def normalize(x, mean, invstd, gamma, beta, out, relu=False):
    """``out = (x - mean) * invstd * gamma + beta``, then ``max(out, 0)`` when ``relu``."""
    work = _work_buffer(out)
    _normalize_into(_compute(x), mean, invstd, gamma, beta, work)
    if relu:
        np.maximum(work, 0, out=work)
    _store(work, out)


def _normalize_into(x, mean, invstd, gamma, beta, out):
    """:func:`normalize` on the compute dtype; also rebuilds ``y`` for the ReLU mask."""
    _center(x, mean, out)
    np.multiply(out, _channel(invstd * gamma, x.dtype), out=out)
    np.add(out, _channel(beta, x.dtype), out=out)


def _forward_fused(x, gamma, beta, eps, out):
    """Batch statistics, then normalization into ``out``.

    The scale is ``invstd * gamma`` with ``invstd = 1 / sqrt(var + eps)``,
    exactly as :func:`_normalize_into` computes it, so that the backward
    rebuilds the very same ``y`` for a ReLU mask.

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased batch variance.
    """
    mean, var = _mean_var(x, out)  # out holds x - mean
    invstd = 1.0 / np.sqrt(var + eps)
    np.multiply(out, _channel(invstd * gamma, x.dtype), out=out)
    np.add(out, _channel(beta, x.dtype), out=out)
    return mean, var


def forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None, momentum=0.1,
                  relu=False):
    """Training forward; running statistics updated in place (see :mod:`fastbn.backends`)."""
    work = _work_buffer(out)
    mean, invstd = _host.forward_train(_forward_fused, _compute(x), gamma, beta, eps, work,
                                       running_mean, running_var, momentum)
    if relu:
        np.maximum(work, 0, out=work)
    _store(work, out)
    return mean, invstd


def forward_eval(x, gamma, beta, running_mean, running_var, eps, out, relu=False):
    """Evaluation forward with the running statistics."""
    work = _work_buffer(out)
    mean, invstd = _host.forward_eval(_normalize_into, _compute(x), gamma, beta,
                                      running_mean, running_var, eps, work)
    if relu:
        np.maximum(work, 0, out=work)
    _store(work, out)
    return mean, invstd


def _masked_dy(dy, x, mean, invstd, gamma, beta, relu):
    """``dy`` in the compute dtype; with ``relu``, zero where the forward's ``y <= 0``.

    ``x`` is already in the compute dtype; ``y`` is rebuilt by
    :func:`_normalize_into`, the forward's arithmetic, so the mask is the
    forward's ``out > 0``.
    """
    dy = _compute(dy)
    if not relu:
        return dy
    y = np.empty(x.shape, dtype=x.dtype)
    _normalize_into(x, mean, invstd, gamma, beta, y)
    return np.where(y > 0, dy, dy.dtype.type(0))


def backward_eval(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """Evaluation backward ``dx = dy * gamma * invstd``, and the two sums.

    ``mean`` and ``invstd`` are constants here; ``dx`` is :func:`normalize`
    applied to ``dy`` with zero mean and zero shift.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    x = _compute(x)
    dy = _masked_dy(dy, x, mean, invstd, gamma, beta, relu)
    sum_dy, sum_dy_xhat = _reduce(dy, x, mean, invstd, np.empty_like(x))
    zeros = np.zeros_like(mean)
    work = _work_buffer(out)
    _normalize_into(dy, zeros, invstd, gamma, zeros, work)
    _store(work, out)
    return sum_dy, sum_dy_xhat


def backward_reduce(dy, x, mean, invstd, gamma=None, beta=None, relu=False):
    """``sum_dy = sum(dy)`` and ``sum_dy_xhat = sum(dy * xhat)`` per channel.

    ``sum(dy * xhat) = invstd * sum(dy * (x - mean))``. With ``relu``, ``dy``
    is masked first (``gamma`` and ``beta`` rebuild the forward's ``y``).
    """
    x = _compute(x)
    dy = _masked_dy(dy, x, mean, invstd, gamma, beta, relu)
    return _reduce(dy, x, mean, invstd, np.empty_like(x))


def _reduce(dy, x, mean, invstd, centered):
    """:func:`backward_reduce`; ``centered`` receives ``x - mean``."""
    _center(x, mean, centered)
    return _sum64(dy), _dot64(dy, centered) * invstd


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta=None, relu=False):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``."""
    x = _compute(x)
    dy = _masked_dy(dy, x, mean, invstd, gamma, beta, relu)
    work = _work_buffer(out)
    _center(x, mean, work)
    _elemt_from_centered(dy, invstd, gamma, sum_dy, sum_dy_xhat, work)
    _store(work, out)


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


def backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """Simplified backward: the reduction, then the elementwise pass.

    The output buffer holds ``x - mean`` between the two, so no temporary is
    made (beyond the float32 copies of 16-bit inputs and the ReLU mask).

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    x = _compute(x)
    dy = _masked_dy(dy, x, mean, invstd, gamma, beta, relu)
    work = _work_buffer(out)
    sum_dy, sum_dy_xhat = _reduce(dy, x, mean, invstd, work)
    _elemt_from_centered(dy, invstd, gamma, sum_dy, sum_dy_xhat, work)
    _store(work, out)
    return sum_dy, sum_dy_xhat


def backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False):
    """The cs231n computational graph, walked back stage by stage.

    Each stage writes a full-size intermediate of the compute dtype
    (``x.dtype``, float32 for 16-bit storage); reductions accumulate in
    float64. See :mod:`fastbn.backends` for the stages. With ``relu`` the
    graph has one more node on top, ``relu = max(y, 0)``, walked back first.

    Returns
    -------
    dgamma, dbeta : ndarray of float64, shape (C,)
    """
    x, dy = _compute(x), _compute(dy)
    dtype = x.dtype
    count = x.shape[0] * x.shape[2]
    if relu:
        # step 10: relu = max(y, 0), with y = gamma * xhat + beta rebuilt full size
        y = np.empty_like(x)
        _normalize_into(x, mean, invstd, gamma, beta, y)
        dy = np.where(y > 0, dy, dtype.type(0))
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
    work = _work_buffer(out)
    np.add(dx1, _channel(dmu / count, dtype), out=work)
    _store(work, out)
    return dgamma, dbeta
