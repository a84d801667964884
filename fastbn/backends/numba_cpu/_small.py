"""Serial drivers of the Numba CPU backend: a contract kernel in one compiled call.

Arrays of fewer than ``SERIAL_BELOW`` elements run these: starting a
parallel region costs more than the work, and one compiled call per kernel,
with the per-channel steps (statistics, running statistics, coefficients)
inside it, costs a few microseconds. They compose the serial kernels of
:mod:`._loops` (every channel, ``a``-major, no parallel region).
"""

import numpy as np
from numba import njit

from ._config import JIT
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
