"""Serial drivers of the Numba CPU backend: a contract kernel in one compiled call.

Arrays of fewer than ``SERIAL_BELOW`` elements run these: starting a
parallel region costs more than the work, and one compiled call per kernel,
with the per-channel steps (statistics, running statistics, coefficients)
inside it, costs a few microseconds. They compose the serial kernels of
:mod:`._loops` (every channel, ``a``-major, no parallel region).
"""

import numpy as np
from numba import njit
from numba.extending import register_jitable

from ._config import JIT, JITABLE
from ._loadstore import _view_at
from ._loops import AFFINE, COMBINE, GATED, PRODUCTS, SHIFTED
from ._ops import channel_shift, dx_coefficients, eval_coefficients, finish_stats, moments

# compiled code reaches the kernels by module-level names (not tuple fields)
_affine = AFFINE.serial
_combine = COMBINE.serial
_gated = GATED.serial
_shifted_sums = SHIFTED.serial
_product_sums = PRODUCTS.serial


@njit(**JIT)
def stats(x, mean, var):
    """Shifted sums: ``mean = K + S1/M``, ``var = (S2 - S1**2/M)/M``, ``K = x[0, c, 0]``."""
    A, C, B = x.shape
    shift = channel_shift(x)
    s1 = np.empty(C)
    s2 = np.empty(C)
    _shifted_sums(x, x, shift, shift, shift, None, s1, s2)
    moments(shift, s1, s2, A * B, mean, var)


@njit(**JIT)
def forward_train(x, gamma, beta, eps, lo, out, mean, invstd, rm, rv, momentum, update):
    """Statistics, the per-channel steps (running statistics included), normalize."""
    A, C, B = x.shape
    var = np.empty(C)
    scale = np.empty(C)
    stats(x, mean, var)
    finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)
    _affine(x, x, mean, scale, beta, beta, beta, beta, lo, out)


@njit(**JIT)
def forward_eval(x, gamma, beta, rm, rv, eps, lo, out, mean, invstd):
    """Normalize with the running statistics."""
    scale = np.empty(mean.shape[0])
    eval_coefficients(rm, rv, eps, gamma, mean, invstd, scale)
    _affine(x, x, mean, scale, beta, beta, beta, beta, lo, out)


@njit(**JIT)
def backward_reduce(dy, x, mean, invstd, gq, gr, floor, sum_dy, sum_dy_xhat):
    """``sum(dy)``, ``invstd * sum(dy * (x - mean))`` (``dy`` masked when ``floor`` is not None)."""
    _product_sums(dy, x, mean, gq, gr, floor, sum_dy, sum_dy_xhat)
    for c in range(mean.shape[0]):
        sum_dy_xhat[c] *= invstd[c]


@njit(**JIT)
def backward_train(dy, x, mean, invstd, gamma, gq, gr, floor, out, sum_dy, sum_dy_xhat):
    """The sums, then ``dx = k*du + kx*(x - mean) + k0``."""
    A, C, B = x.shape
    backward_reduce(dy, x, mean, invstd, gq, gr, floor, sum_dy, sum_dy_xhat)
    k, kx, k0 = dx_coefficients(A * B, invstd, gamma, sum_dy, sum_dy_xhat)
    _combine(dy, x, k, mean, kx, k0, gq, gr, floor, out)


@njit(**JIT)
def backward_eval(dy, x, mean, invstd, gamma, gq, gr, floor, out, sum_dy, sum_dy_xhat):
    """The sums, then ``dx = du * gamma * invstd`` (``mean`` and ``invstd`` are constants)."""
    backward_reduce(dy, x, mean, invstd, gq, gr, floor, sum_dy, sum_dy_xhat)
    scale = gamma * invstd
    _gated(dy, x, scale, mean, gq, gr, gr, gr, floor, out)


# ---------------------------------------------------------------------------
# The same calls on memory addresses
# ---------------------------------------------------------------------------
# fastbn.torch calls these on small CPU tensors with the tensors' addresses
# (``Tensor.data_ptr()``): on a few hundred values, making a NumPy view of
# each tensor and a dispatch over array arguments cost more than the kernel.
# ``like`` is a scalar of the storage type (float32, float64; uint16 for
# float16, int16 for bfloat16) and ``param_like`` one of the per-channel
# tensors' type (float32 or float64); ``lo`` and ``floor`` are the fused
# ReLU's, None without it. Their types choose the compiled variant, so that
# each holds only the code of its own ReLU case. Address 0 is a tensor not
# given: the weight reads as ones, the bias as zeros; without running
# statistics none are updated. ``stats_at`` is a float64 ``(2, C)`` array of
# ``mean`` and ``invstd``, which the forwards write (unless it is 0) and the
# backwards read.

@register_jitable(**JITABLE)
def _channel_values(address, like, channels, fill):
    """A per-channel tensor's values in float64 (``fill`` where there is none)."""
    if address == 0:
        return np.full(channels, fill)
    return _view_at(address, like, (channels,)).astype(np.float64)


@register_jitable(**JITABLE)
def _store_channels(address, like, values):
    """Round ``values`` (float64) into the per-channel tensor at ``address``
    (nothing where the address is 0)."""
    if address != 0:
        out = _view_at(address, like, values.shape)
        for c in range(values.shape[0]):
            out[c] = values[c]


@register_jitable(**JITABLE)
def _statistics_at(address, channels):
    """The ``(2, C)`` float64 array of ``mean`` and ``invstd`` at ``address``;
    a scratch one where the address is 0 (a forward that no backward follows)."""
    if address == 0:
        return np.empty((2, channels))
    return _view_at(address, 0.0, (2, channels))


@njit(**JIT)
def forward_train_at(x_at, out_at, shape, like, gamma_at, beta_at, rm_at, rv_at, param_like,
                     stats_at, eps, momentum, lo):
    """:func:`forward_train` on addresses."""
    C = shape[1]
    stats = _statistics_at(stats_at, C)
    update = rm_at != 0
    if update:
        rm = _view_at(rm_at, param_like, (C,))
        rv = _view_at(rv_at, param_like, (C,))
    else:   # stand-ins of the same type, never written
        rm = np.full(C, param_like)
        rv = rm
    forward_train(_view_at(x_at, like, shape), _channel_values(gamma_at, param_like, C, 1.0),
                  _channel_values(beta_at, param_like, C, 0.0), eps, lo,
                  _view_at(out_at, like, shape), stats[0], stats[1], rm, rv, momentum, update)


@njit(**JIT)
def forward_eval_at(x_at, out_at, shape, like, gamma_at, beta_at, rm_at, rv_at, param_like,
                    stats_at, eps, lo):
    """:func:`forward_eval` on addresses (the running statistics are required)."""
    C = shape[1]
    stats = _statistics_at(stats_at, C)
    forward_eval(_view_at(x_at, like, shape), _channel_values(gamma_at, param_like, C, 1.0),
                 _channel_values(beta_at, param_like, C, 0.0),
                 _view_at(rm_at, param_like, (C,)), _view_at(rv_at, param_like, (C,)), eps, lo,
                 _view_at(out_at, like, shape), stats[0], stats[1])


@register_jitable(**JITABLE)
def _backward_arguments(dy_at, x_at, dx_at, shape, like, stats_at, gamma_at, beta_at,
                        param_like, floor):
    """The arguments of a backward driver (:func:`backward_train`,
    :func:`backward_eval`) from addresses; with a ``floor``, ``dy`` is masked
    by the recomputed ``y > floor``."""
    C = shape[1]
    stats = _view_at(stats_at, 0.0, (2, C))
    invstd = stats[1]
    gamma = _channel_values(gamma_at, param_like, C, 1.0)
    if floor is None:
        gq = gr = np.zeros(C)
    else:
        gq = invstd * gamma
        gr = _channel_values(beta_at, param_like, C, 0.0)
    return (_view_at(dy_at, like, shape), _view_at(x_at, like, shape), stats[0], invstd, gamma,
            gq, gr, floor, _view_at(dx_at, like, shape), np.empty(C), np.empty(C))


@njit(**JIT)
def backward_at(dy_at, x_at, dx_at, shape, like, stats_at, gamma_at, beta_at, param_like,
                grad_weight_at, grad_bias_at, training, floor):
    """:func:`backward_train` (``training``) or :func:`backward_eval` on
    addresses; the two sums are rounded into the gradient tensors of the
    weight and the bias (address 0: not wanted)."""
    arguments = _backward_arguments(dy_at, x_at, dx_at, shape, like, stats_at, gamma_at,
                                    beta_at, param_like, floor)
    if training:
        backward_train(*arguments)
    else:
        backward_eval(*arguments)
    _store_channels(grad_weight_at, param_like, arguments[-1])
    _store_channels(grad_bias_at, param_like, arguments[-2])
