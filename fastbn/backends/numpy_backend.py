"""Vectorized NumPy backend: the reference implementation.

Every kernel works on the canonical ``(A, C, B)`` view (see
:mod:`fastbn.backends`) with whole-array ufuncs, ``out=`` arguments and as few
temporaries as NumPy allows. Per-channel statistics are reduced over axes
``(0, 2)`` with float64 accumulators.

float32 centring is done with a split mean ``mean = mean_hi + mean_lo``
(both float32): ``(x - mean_hi) - mean_lo`` is exact to about one float32
rounding of the *result*, not of ``x``, so a channel whose mean is far larger
than its spread keeps its precision without a float64 copy of ``x``.

16-bit storage (float16, bfloat16) is computed in float32, block by block:
each kernel walks the array in blocks of about ``BLOCK_ELEMENTS`` elements
(whole rows ``x[a0:a1]``, or parts ``x[a, :, b0:b1]`` of a row longer than
a block), makes a float32 copy of each 16-bit input block, computes on it
and rounds the result once into the 16-bit ``out``. Reductions add each
block's float64 per-channel sums; the statistics take two passes over the
blocks (the mean, then the centred squares). A fused ReLU is one more ufunc
pass here (``np.maximum``); its backward masks ``dy`` by ``y > 0`` with
``y`` rebuilt by the forward's own arithmetic (:func:`_normalize_into`), so
the mask is the forward's.

Sizes and memory
----------------
Any array NumPy can hold: NumPy indexes with 64-bit ``intp`` and every
count here (``M = A * B``, block bounds) is a Python int. Beyond the
caller's arrays, the kernels allocate:

* float32 and float64 storage: at most one temporary the size of ``x``
  (``x - mean`` in :func:`stats`; the ReLU mask in the backward);
* 16-bit storage: a few float32 blocks, about ``4 * BLOCK_ELEMENTS * 4``
  bytes (64 MiB) in all, whatever the size of ``x``, so a 16-bit call fits
  wherever its inputs and outputs fit;
* the staged backward: its full-size intermediates
  (:func:`fastbn.backends._staged.temporaries`, plus one product temporary,
  plus the float32 copies of ``x`` and ``dy`` for 16-bit storage) in the
  compute dtype. It raises ``MemoryError`` before allocating them when they do
  not fit in the memory available (:mod:`fastbn.backends._memory`).
"""
import numpy as np

from . import _host, _staged

# Elements per block of the 16-bit path (64 MiB of float32 per working copy).
BLOCK_ELEMENTS = 1 << 24

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


def _is16(array):
    """Whether ``array`` has 16-bit storage (float16 or bfloat16)."""
    return array.dtype.itemsize == 2


def _compute(array):
    """16-bit storage as a float32 copy; float32 and float64 arrays as they are."""
    return array.astype(np.float32) if _is16(array) else array


def _blocks(shape):
    """The blocks of the 16-bit path: index tuples into an ``(A, C, B)`` array.

    Rows ``[a0:a1]`` of about ``BLOCK_ELEMENTS`` elements; when one row
    ``(C, B)`` holds more, parts ``[a, :, b0:b1]`` of it (at least one
    column ``b`` each). Every element is in exactly one block.

    Parameters
    ----------
    shape : (int, int, int)
        ``(A, C, B)``.

    Returns
    -------
    list of tuple of slice
    """
    A, C, B = shape
    row = C * B
    if row <= BLOCK_ELEMENTS:
        rows = BLOCK_ELEMENTS // max(1, row)
        return [(slice(a, min(A, a + rows)),) for a in range(0, A, rows)]
    width = max(1, BLOCK_ELEMENTS // C)
    return [(slice(a, a + 1), slice(None), slice(b, min(B, b + width)))
            for a in range(A) for b in range(0, B, width)]


def _center(x, mean, out):
    """``out = x - mean`` with float64 accuracy; ``out`` has ``x.dtype`` (None: in place)."""
    if out is None:
        out = x
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


def _stats_blocks(x):
    """:func:`stats` of 16-bit ``x``, block by block: the mean, then the centred squares."""
    count = x.shape[0] * x.shape[2]
    sums = np.zeros(x.shape[1])
    for index in _blocks(x.shape):
        sums += _sum64(x[index].astype(np.float32))
    mean = sums / count
    squares = np.zeros(x.shape[1])
    for index in _blocks(x.shape):
        centered = _center(x[index].astype(np.float32), mean, None)
        squares += _dot64(centered, centered)
    return mean, squares / count


def stats(x):
    """Per-channel mean and biased variance, two passes in float64.

    Parameters
    ----------
    x : ndarray, shape (A, C, B)

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
    """
    if _is16(x):
        return _stats_blocks(x)
    return _mean_var(x, np.empty_like(x))


def _normalize_blocks(x, mean, invstd, gamma, beta, out, relu=False):
    """:func:`normalize` of 16-bit ``x`` into 16-bit ``out``, block by block."""
    for index in _blocks(x.shape):
        work = x[index].astype(np.float32)
        _normalize_into(work, mean, invstd, gamma, beta, work)
        if relu:
            np.maximum(work, 0, out=work)
        out[index] = work


def normalize(x, mean, invstd, gamma, beta, out, relu=False):
    """``out = (x - mean) * invstd * gamma + beta``, then ``max(out, 0)`` when ``relu``."""
    if _is16(x):
        _normalize_blocks(x, mean, invstd, gamma, beta, out, relu)
        return
    _normalize_into(x, mean, invstd, gamma, beta, out)
    if relu:
        np.maximum(out, 0, out=out)


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


def _forward_fused_blocks(x, gamma, beta, eps, out, relu=False):
    """:func:`_forward_fused` of 16-bit ``x`` (with the ReLU), block by block."""
    mean, var = _stats_blocks(x)
    invstd = 1.0 / np.sqrt(var + eps)
    _normalize_blocks(x, mean, invstd, gamma, beta, out, relu)
    return mean, var


def forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None, momentum=0.1,
                  relu=False):
    """Training forward; running statistics updated in place (see :mod:`fastbn.backends`)."""
    if _is16(x):
        def fused(x, gamma, beta, eps, out):
            return _forward_fused_blocks(x, gamma, beta, eps, out, relu)
        return _host.forward_train(fused, x, gamma, beta, eps, out,
                                   running_mean, running_var, momentum)
    mean, invstd = _host.forward_train(_forward_fused, x, gamma, beta, eps, out,
                                       running_mean, running_var, momentum)
    if relu:
        np.maximum(out, 0, out=out)
    return mean, invstd


def forward_eval(x, gamma, beta, running_mean, running_var, eps, out, relu=False):
    """Evaluation forward with the running statistics."""
    def normalize_relu(x, mean, invstd, gamma, beta, out):
        normalize(x, mean, invstd, gamma, beta, out, relu)
    return _host.forward_eval(normalize_relu, x, gamma, beta, running_mean, running_var,
                              eps, out)


def _masked_dy(dy, x, mean, invstd, gamma, beta, relu):
    """``dy`` in the compute dtype; with ``relu``, zero where the forward's ``y <= 0``.

    ``x`` is already in the compute dtype, ``dy`` in storage; ``y`` is rebuilt
    by :func:`_normalize_into`, the forward's arithmetic, and compared with
    the storage dtype's :func:`~fastbn.backends._host.relu_floor`, so the
    mask is the forward's ``out > 0`` (a tiny ``y`` stored as 0 included).
    """
    floor = _host.relu_floor(dy.dtype)
    dy = _compute(dy)
    if not relu:
        return dy
    y = np.empty(x.shape, dtype=x.dtype)
    _normalize_into(x, mean, invstd, gamma, beta, y)
    return np.where(y > floor, dy, dy.dtype.type(0))


def _reduce_blocks(dy, x, mean, invstd, gamma, beta, relu):
    """:func:`backward_reduce` of 16-bit ``dy`` and ``x``, block by block."""
    sum_dy = np.zeros(x.shape[1])
    sum_dy_xmu = np.zeros(x.shape[1])
    for index in _blocks(x.shape):
        x_block = x[index].astype(np.float32)
        dy_block = _masked_dy(dy[index], x_block, mean, invstd, gamma, beta, relu)
        centered = _center(x_block, mean, None)
        sum_dy += _sum64(dy_block)
        sum_dy_xmu += _dot64(dy_block, centered)
    return sum_dy, sum_dy_xmu * invstd


def _elemt_blocks(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta, relu):
    """:func:`backward_elemt` of 16-bit ``dy`` and ``x`` into 16-bit ``out``, block by block."""
    count = x.shape[0] * x.shape[2]
    for index in _blocks(x.shape):
        x_block = x[index].astype(np.float32)
        dy_block = _masked_dy(dy[index], x_block, mean, invstd, gamma, beta, relu)
        work = _center(x_block, mean, None)
        _elemt_from_centered(dy_block, invstd, gamma, sum_dy, sum_dy_xhat, count, work)
        out[index] = work


def backward_eval(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """Evaluation backward ``dx = dy * gamma * invstd``, and the two sums.

    ``mean`` and ``invstd`` are constants here; ``dx`` is :func:`normalize`
    applied to ``dy`` with zero mean and zero shift.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    zeros = np.zeros_like(mean)
    if _is16(x):
        sums = _reduce_blocks(dy, x, mean, invstd, gamma, beta, relu)
        for index in _blocks(x.shape):
            x_block = x[index].astype(np.float32)
            work = _masked_dy(dy[index], x_block, mean, invstd, gamma, beta, relu)
            _normalize_into(work, zeros, invstd, gamma, zeros, work)
            out[index] = work
        return sums
    dy = _masked_dy(dy, x, mean, invstd, gamma, beta, relu)
    sum_dy, sum_dy_xhat = _reduce(dy, x, mean, invstd, np.empty_like(x))
    _normalize_into(dy, zeros, invstd, gamma, zeros, out)
    return sum_dy, sum_dy_xhat


def backward_reduce(dy, x, mean, invstd, gamma=None, beta=None, relu=False):
    """``sum_dy = sum(dy)`` and ``sum_dy_xhat = sum(dy * xhat)`` per channel.

    ``sum(dy * xhat) = invstd * sum(dy * (x - mean))``. With ``relu``, ``dy``
    is masked first (``gamma`` and ``beta`` rebuild the forward's ``y``).
    """
    if _is16(x):
        return _reduce_blocks(dy, x, mean, invstd, gamma, beta, relu)
    dy = _masked_dy(dy, x, mean, invstd, gamma, beta, relu)
    return _reduce(dy, x, mean, invstd, np.empty_like(x))


def _reduce(dy, x, mean, invstd, centered):
    """:func:`backward_reduce`; ``centered`` receives ``x - mean``."""
    _center(x, mean, centered)
    return _sum64(dy), _dot64(dy, centered) * invstd


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta=None, relu=False):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``."""
    if _is16(x):
        _elemt_blocks(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta, relu)
        return
    dy = _masked_dy(dy, x, mean, invstd, gamma, beta, relu)
    _center(x, mean, out)
    _elemt_from_centered(dy, invstd, gamma, sum_dy, sum_dy_xhat, x.shape[0] * x.shape[2], out)


def _elemt_from_centered(dy, invstd, gamma, sum_dy, sum_dy_xhat, count, out):
    """:func:`backward_elemt` with ``out`` already holding ``x - mean``.

    ``dx = k * ((x - mean) * (-invstd * sum_dy_xhat / M) + dy - sum_dy / M)``
    with ``k = gamma * invstd`` and ``M = count``, in place in ``out``.
    """
    dtype = out.dtype
    np.multiply(out, _channel(-invstd * sum_dy_xhat / count, dtype), out=out)
    np.add(out, dy, out=out)
    np.subtract(out, _channel(sum_dy / count, dtype), out=out)
    np.multiply(out, _channel(gamma * invstd, dtype), out=out)


def backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """Simplified backward: the reduction, then the elementwise pass.

    The output buffer holds ``x - mean`` between the two, so no temporary is
    made (beyond the ReLU mask); 16-bit storage runs the two passes block
    by block.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    if _is16(x):
        sum_dy, sum_dy_xhat = _reduce_blocks(dy, x, mean, invstd, gamma, beta, relu)
        _elemt_blocks(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta, relu)
        return sum_dy, sum_dy_xhat
    dy = _masked_dy(dy, x, mean, invstd, gamma, beta, relu)
    sum_dy, sum_dy_xhat = _reduce(dy, x, mean, invstd, out)
    _elemt_from_centered(dy, invstd, gamma, sum_dy, sum_dy_xhat, x.shape[0] * x.shape[2], out)
    return sum_dy, sum_dy_xhat


class _StagedOps(_staged.HostChannels):
    """The staged walk's primitives: whole-array ufuncs of the compute dtype."""

    def __init__(self, dtype, shape, storage):
        self.dtype = dtype
        self.shape = shape
        self.floor = _host.relu_floor(storage)   # y > floor: the stored out > 0

    def normalize(self, x, mean, invstd, gamma, beta):
        y = np.empty_like(x)
        _normalize_into(x, mean, invstd, gamma, beta, y)
        return y

    def mask_positive(self, u, v):
        return np.where(v > self.floor, u, self.dtype.type(0))

    def subtract(self, u, p):
        return _center(u, p, np.empty_like(u))

    def multiply(self, u, p):
        return u * _channel(p, self.dtype)

    def broadcast(self, p):
        return np.broadcast_to(_channel(p, self.dtype), self.shape).copy()

    def twice_product(self, u, v):
        return 2 * u * v

    def add(self, u, v):
        return u + v

    def add_into(self, u, p, out):
        if _is16(out):
            out[...] = u + _channel(p, self.dtype)
        else:
            np.add(u, _channel(p, self.dtype), out=out)

    @staticmethod
    def sum(u):
        return _sum64(u)

    @staticmethod
    def sum_of_product(u, v):
        return _sum64(u * v)


def backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False):
    """The cs231n computational graph, walked back stage by stage.

    The walk is :func:`fastbn.backends._staged.backward`; each stage here is
    one whole-array ufunc that writes a full-size intermediate of the
    compute dtype (``x.dtype``, float32 for 16-bit storage); reductions
    accumulate in float64.

    Raises
    ------
    MemoryError
        Before allocating anything, when the intermediates do not fit in the
        available memory.

    Returns
    -------
    dgamma, dbeta : ndarray of float64, shape (C,)
    """
    # 16-bit storage adds float32 copies of x and dy, and one product temporary
    _staged.require_memory(x.size, 4 if _is16(x) else x.itemsize, relu,
                           copies=3 if _is16(x) else 1)
    storage = x.dtype
    x, dy = _compute(x), _compute(dy)
    return _staged.backward(_StagedOps(x.dtype, x.shape, storage), dy, x, mean, invstd, gamma,
                            beta, relu, out,
                            x.shape[0] * x.shape[2])
