"""What the Numba CPU kernels compute: elementwise ops, reduction terms, per-channel steps.

The loop shapes of :mod:`._loops` are written once each and take an op or
a term below at compile time. Ops and terms are ``register_jitable``: plain
Python functions that numba compiles into the kernel that calls them, with
this backend's fastmath flags (and, being plain module-level functions, they
keep a factory's closures cacheable). The per-channel steps at the end are
cached kernels of their own.

Elementwise ops
---------------
``op(u, v, p0, p1, p2, p3, p4, p5, bound)`` returns one result element:
``u`` and ``v`` are elements of the two input arrays, already loaded in
their compute type (an op may ignore either; the kernels are then called
with any array of the right shape for it), ``p0..p5`` the op's float64
per-channel parameters (an op reads the ones it names; the others are
padding) and ``bound`` a float or None. With None (no ReLU) numba compiles
the op without the bound or the mask. The result is rounded once into the
output's storage type by the kernel.

=============  =============================================  ==================
op             result                                         parameters
=============  =============================================  ==================
``affine``     ``max((u - p) * q + r, lo)``                   p, q, r; lo
``combine``    ``du * q + (v - s) * t + r``                   q, s, t, r, gq, gr; floor
``gated``      ``du * q``                                     q, s, gq, gr; floor
``product``    ``w * u * v``                                  w
``fill``       ``r``                                          r
=============  =============================================  ==================

``du`` is ``u`` masked by the fused ReLU: ``u`` where ``y = (v - s) * gq +
gr`` (the forward's arithmetic on ``x = v``) is ``> floor``, else 0.

Reduction terms
---------------
``term(u, v, p0, p1, p2, bound)`` returns the two terms ``(t1, t2)`` an
element adds to its channel's two sums:

=============  =============================================  ==================
term           (t1, t2)                                       parameters
=============  =============================================  ==================
``shifted``    ``(d, d * d)``, ``d = u - shift``              shift
``products``   ``(du, du * (v - s))``                         s, gq, gr; floor
=============  =============================================  ==================
"""

import numpy as np
from numba import njit
from numba.extending import register_jitable

from ._config import JIT, JITABLE
from ._loadstore import _center, _ct, _gate, _ld, _relu


# ---------------------------------------------------------------------------
# Elementwise ops
# ---------------------------------------------------------------------------

@register_jitable(**JITABLE)
def affine(u, v, p, q, r, p3, p4, p5, lo):
    """``max((u - p) * q + r, lo)``: normalize (and the forward's ReLU)."""
    y = _center(u, p) * _ct(q, u) + _ct(r, u)
    return _relu(y, _ct(lo, u))


@register_jitable(**JITABLE)
def combine(u, v, q, s, t, r, gq, gr, floor):
    """``du * q + (v - s) * t + r``: the backward's ``dx = k*dy + kx*(x - mean) + k0``."""
    dv = _center(v, s)
    du = _gate(u, dv, _ct(gq, v), _ct(gr, v), _ct(floor, v))
    return du * _ct(q, u) + dv * _ct(t, v) + _ct(r, u)


@register_jitable(**JITABLE)
def gated(u, v, q, s, gq, gr, p4, p5, floor):
    """``du * q``: the evaluation backward's ``dx = dy * gamma * invstd`` under the ReLU."""
    dv = _center(v, s)
    return _gate(u, dv, _ct(gq, v), _ct(gr, v), _ct(floor, v)) * _ct(q, u)


@register_jitable(**JITABLE)
def product(u, v, w, p1, p2, p3, p4, p5, bound):
    """``w * u * v``."""
    return _ct(w, u) * u * v


@register_jitable(**JITABLE)
def fill(u, v, r, p1, p2, p3, p4, p5, bound):
    """``r``, the parameter itself."""
    return r


# ---------------------------------------------------------------------------
# Reduction terms
# ---------------------------------------------------------------------------

@register_jitable(**JITABLE)
def shifted(u, v, shift, p1, p2, bound):
    """``(d, d * d)`` with ``d = u - shift``: the statistics' shifted sums."""
    d = u - _ct(shift, u)
    return d, d * d


@register_jitable(**JITABLE)
def products(u, v, s, gq, gr, floor):
    """``(du, du * (v - s))``: the backward's ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    dv = _center(v, s)
    du = _gate(u, dv, _ct(gq, v), _ct(gr, v), _ct(floor, v))
    return du, du * dv


# ---------------------------------------------------------------------------
# Per-channel steps (cached kernels: called from Python and from the fused
# and serial kernels)
# ---------------------------------------------------------------------------

@njit(**JIT)
def channel_shift(x):
    """float64 ``x[0, c, 0]`` of each channel of ``x`` (A, C, B): the shift of
    the statistics' sums."""
    shift = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        shift[c] = _ld(x[0, c, 0])
    return shift


@njit(**JIT)
def mean_var(shift, s1, s2, n):
    """``mean = shift + S1/n``, ``var = (S2 - S1**2/n) / n`` clipped at 0 (NaN kept)."""
    mean = shift + s1 / n
    var = (s2 - s1 * (s1 / n)) / n
    if var < 0.0:
        var = 0.0
    return mean, var


@njit(**JIT)
def moments(shift, s1, s2, n, mean, var):
    """:func:`mean_var` of every channel, into ``mean`` and ``var``."""
    for c in range(shift.shape[0]):
        mean[c], var[c] = mean_var(shift[c], s1[c], s2[c], n)


@njit(**JIT)
def dx_coefficients(n, invstd, gamma, sum_dy, sum_dy_xhat):
    """``dx = k*dy + kx*(x - mean) + k0`` with ``k = gamma*invstd``,
    ``kx = -k*invstd*sum_dy_xhat/M``, ``k0 = -k*sum_dy/M`` (scalars or arrays)."""
    k = gamma * invstd
    kx = -k * invstd * (sum_dy_xhat / n)
    k0 = -k * (sum_dy / n)
    return k, kx, k0


@register_jitable(**JITABLE)
def finish_channel(c, var_c, n, eps, gamma, mean, invstd, scale, rm, rv, momentum, update):
    """Channel ``c`` of :func:`finish_stats` (``var_c`` its variance); the
    fused forward kernels call it per channel."""
    invstd[c] = 1.0 / np.sqrt(var_c + eps)
    scale[c] = gamma[c] * invstd[c]
    if update:
        unbias = n / (n - 1.0) if n > 1 else np.inf
        rm[c] = (1.0 - momentum) * np.float64(rm[c]) + momentum * mean[c]
        rv[c] = (1.0 - momentum) * np.float64(rv[c]) + momentum * (var_c * unbias)


@njit(**JIT)
def finish_stats(mean, var, n, eps, gamma, invstd, scale, rm, rv, momentum, update):
    """``invstd = 1/sqrt(var + eps)``, ``scale = gamma*invstd``; with ``update``,
    the running statistics in place, PyTorch's way: ``running = (1 - momentum) *
    running + momentum * batch`` with the unbiased variance ``var * n / (n - 1)``."""
    for c in range(mean.shape[0]):
        finish_channel(c, var[c], n, eps, gamma, mean, invstd, scale, rm, rv, momentum, update)


@njit(**JIT)
def eval_coefficients(rm, rv, eps, gamma, mean, invstd, scale):
    """``mean = running_mean``, ``invstd = 1/sqrt(running_var + eps)``, ``scale = gamma*invstd``."""
    for c in range(mean.shape[0]):
        mean[c] = rm[c]
        invstd[c] = 1.0 / np.sqrt(np.float64(rv[c]) + eps)
        scale[c] = gamma[c] * invstd[c]
