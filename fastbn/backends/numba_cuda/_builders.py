"""Device functions and kernel builders of the CUDA backend.

Everything compiled for the device is built here, by plain Python
functions that close over device functions and return ``@cuda.jit``
kernels:

* :func:`_build_block_sums`, :func:`_build_bit_casts`, :func:`_build_storage`:
  the device functions of a block reduction and of the loads and stores of
  each storage kind (float16/float32/float64 arrays, or bfloat16 as uint16
  bit patterns);
* :func:`_build_reduction` and :func:`_build_elementwise`: the passes over the
  full arrays, in both layouts ("rows" and "columns", see the package notes),
  given what they compute per element;
* :func:`_build_kernels`: what each pass computes (terms and operations), the
  per-channel kernels (one thread per channel), and the :class:`_Kernels` of
  one threads-per-block value, which builds each full-size pass on first use
  for the storage kinds of its arrays.

Nothing here launches a kernel or reads a module setting: the launches are
in :mod:`._launch` and the package's ``__init__``.
"""

import math
import threading

import numpy as np

from .._host import relu_floor
from ._device import _SIMULATOR

try:
    from numba import cuda
    from numba import float32, float64, int32, int64
except Exception:  # ImportError, CudaSupportError, ...: see _device.availability()
    cuda = None
    float32 = float64 = int32 = int64 = None

WARP_SIZE = 32

# Coefficient rows of the elementwise passes (coef[k, c] = pk):
#   normalize, eval backward:  [mean, scale, shift, -, -], scale = gamma * invstd
#   simplified backward:       [mean, scale, centred_scale, offset, shift]
#   staged backward:           [mean, invstd, gamma, dsq, dmu]
# ``shift`` (beta) is what a fused ReLU needs to rebuild y = (x - mean) * scale + shift.
COEF_ROWS = 5

_BUILD_LOCK = threading.Lock()


def _use_shuffles(threads):
    """Warp shuffles for block reductions: on a GPU, with whole warps.

    The one place that picks the reduction path: the simulator implements
    no shuffles, so it runs (and its tests check) the shared-memory tree.
    """
    return not _SIMULATOR and threads >= WARP_SIZE


def _build_block_sums(threads):
    """Device functions summing two float64 values over a thread block.

    Returns
    -------
    block_sum : device function ``(value1, value2, slot) -> (total1, total2)``
        Over every thread of the block (``slot`` its linear index); the
        totals are valid in slot 0.
    column_sum : device function ``(value1, value2, tx, ty, width, height)``
        Over ``threadIdx.y`` only, column by column; valid where ``ty == 0``.
    """
    warps = max(1, threads // WARP_SIZE)

    @cuda.jit(device=True)
    def column_sum(value1, value2, tx, ty, width, height):
        shared1 = cuda.shared.array(threads, float64)
        shared2 = cuda.shared.array(threads, float64)
        slot = ty * width + tx
        shared1[slot] = value1
        shared2[slot] = value2
        cuda.syncthreads()
        # Tree down each column: after the level l, row ty < l holds the sum
        # of rows ty, ty + l, ty + 2l, ... (every thread reaches each barrier).
        level = height // 2
        while level > 0:
            if ty < level:
                shared1[slot] += shared1[slot + level * width]
                shared2[slot] += shared2[slot + level * width]
            cuda.syncthreads()
            level //= 2
        return shared1[slot], shared2[slot]

    @cuda.jit(device=True)
    def block_sum_shared(value1, value2, slot):
        # the block as one column of ``threads`` rows
        return column_sum(value1, value2, 0, slot, 1, threads)

    @cuda.jit(device=True)
    def warp_sum(value1, value2):
        offset = WARP_SIZE // 2
        while offset > 0:
            value1 += cuda.shfl_down_sync(0xFFFFFFFF, value1, offset)
            value2 += cuda.shfl_down_sync(0xFFFFFFFF, value2, offset)
            offset //= 2
        return value1, value2

    @cuda.jit(device=True)
    def block_sum_shuffle(value1, value2, slot):
        # Each warp sums its 32 values with shuffles; warp 0 then sums the
        # per-warp totals the same way.
        shared1 = cuda.shared.array(warps, float64)
        shared2 = cuda.shared.array(warps, float64)
        lane = slot % WARP_SIZE
        warp = slot // WARP_SIZE
        value1, value2 = warp_sum(value1, value2)
        if lane == 0:
            shared1[warp] = value1
            shared2[warp] = value2
        cuda.syncthreads()
        value1 = 0.0
        value2 = 0.0
        if warp == 0:
            if lane < warps:
                value1 = shared1[lane]
                value2 = shared2[lane]
            value1, value2 = warp_sum(value1, value2)
        return value1, value2

    block_sum = block_sum_shuffle if _use_shuffles(threads) else block_sum_shared
    return block_sum, column_sum


def _build_bit_casts():
    """Device functions between a float32 and its bit pattern.

    Returns
    -------
    float_bits : device function ``float32 -> int64`` in ``[0, 2**32)``
    bits_float : device function ``int64`` bit pattern ``-> float32``

    On a GPU these are libdevice's ``__nv_float_as_int`` and
    ``__nv_int_as_float`` (one register move each); the simulator, which has
    no libdevice, reinterprets through NumPy. This and :func:`_use_shuffles`
    are the only places where the two paths differ.
    """
    if _SIMULATOR:
        @cuda.jit(device=True)
        def float_bits(value):
            return int(np.float32(value).view(np.uint32))

        @cuda.jit(device=True)
        def bits_float(bits):
            return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

        return float_bits, bits_float

    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def float_bits(value):
        return int64(libdevice.float_as_int(float32(value))) & 0xFFFFFFFF

    @cuda.jit(device=True)
    def bits_float(bits):
        return libdevice.int_as_float(int32(bits))

    return float_bits, bits_float


def _build_storage():
    """Loads and stores of each storage kind (see :func:`_kind`).

    Returns
    -------
    load : dict kind -> device function ``(array, i) -> float64``
    store : dict kind -> device function ``(array, i, float64 value)``

    ``"f"``: float16, float32 and float64 arrays, converted by the hardware
    (a store rounds to nearest even once, float64 -> float16 included).
    ``"b"``: bfloat16 held as uint16 bit patterns: a load is a 16-bit shift
    into a float32; a store rounds the float64 value once to bfloat16,
    nearest even, by rounding to float32 *to odd* (exact when it can be,
    else the float32 toward zero with its last bit set) and then to
    bfloat16 to nearest even with integer operations; NaN stays a quiet
    NaN, overflow gives infinity.
    """
    float_bits, bits_float = _build_bit_casts()

    @cuda.jit(device=True)
    def load_float(array, i):
        return float64(array[i])

    @cuda.jit(device=True)
    def store_float(array, i, value):
        array[i] = value

    @cuda.jit(device=True)
    def load_bfloat16(array, i):
        return float64(bits_float(int64(array[i]) << 16))

    @cuda.jit(device=True)
    def bfloat16_bits(value):
        single = float32(value)
        bits = float_bits(single)
        if (bits & 0x7FFFFFFF) > 0x7F800000:          # NaN
            return (bits >> 16) | 0x40
        wide = float64(single)
        if wide != value:                              # inexact: round to odd
            if abs(wide) > abs(value):
                bits -= 1
            bits |= 1
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16

    @cuda.jit(device=True)
    def store_bfloat16(array, i, value):
        array[i] = bfloat16_bits(value)

    return ({"f": load_float, "b": load_bfloat16},
            {"f": store_float, "b": store_bfloat16})


def _build_four_loads(load):
    """A device function ``(array, i, step) -> (v0, v1, v2, v3)``: the float64
    values of elements ``i``, ``i + step``, ``i + 2 step`` and ``i + 3 step``,
    four loads in flight (memory-level parallelism)."""

    @cuda.jit(device=True)
    def four_loads(array, i, step):
        return (load(array, i), load(array, i + step), load(array, i + 2 * step),
                load(array, i + 3 * step))

    return four_loads


def _build_reduction(term, shift_of, load_u, load_v, block_sum, column_sum):
    """The first level of a per-channel two-sum reduction, in both layouts.

    Parameters
    ----------
    term : device function ``(u, v, s0, s1, s2) -> (t1, t2)``
        The two float64 terms of element ``(u, v)`` (float64 values) of a
        channel.
    shift_of : device function ``(u, mean, invstd, gamma, beta, flags, c,
            extent_b) -> (s0, s1, s2)``
        The per-channel values ``term`` receives.
    load_u, load_v : device functions ``(array, i) -> float64``

    Returns
    -------
    rows, columns : kernels
        ``rows[(C, nchunks), (bx, by)](u, v, mean, invstd, gamma, beta,
        flags, extent_c, extent_b, rows_per_chunk, partial)`` writes
        ``partial[:, chunk, c]``; ``columns[(ceil(J / bx), nchunks), (bx,
        by)](u, v, mean, invstd, gamma, beta, flags, columns_total,
        extent_b, rows_per_chunk, partial)`` writes ``partial[:, chunk, j]``
        for each column ``j = c * B + b`` of the ``(A, J)`` matrix.
    """

    four_u = _build_four_loads(load_u)
    four_v = _build_four_loads(load_v)

    @cuda.jit(device=True)
    def one_term(u, v, i, s0, s1, s2):
        return term(load_u(u, i), load_v(v, i), s0, s1, s2)

    @cuda.jit(device=True)
    def four_terms(u, v, i, step, s0, s1, s2):
        # elements i, i + step, i + 2 step, i + 3 step
        a0, a1, a2, a3 = four_u(u, i, step)
        b0, b1, b2, b3 = four_v(v, i, step)
        s1_, s2_ = term(a0, b0, s0, s1, s2)
        t1, t2 = term(a1, b1, s0, s1, s2)
        r1, r2 = term(a2, b2, s0, s1, s2)
        q1, q2 = term(a3, b3, s0, s1, s2)
        return (s1_ + t1) + (r1 + q1), (s2_ + t2) + (r2 + q2)

    @cuda.jit
    def rows(u, v, mean, invstd, gamma, beta, flags, extent_c, extent_b, rows_per_chunk,
             partial):
        c = cuda.blockIdx.x
        chunk = cuda.blockIdx.y
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        extent_a = u.shape[0] // (extent_c * extent_b)
        s0, s1, s2 = shift_of(u, mean, invstd, gamma, beta, flags, c, extent_b)
        a = chunk * rows_per_chunk + ty
        a_end = min(chunk * rows_per_chunk + rows_per_chunk, extent_a)
        sum1 = 0.0
        sum2 = 0.0
        while a < a_end:
            row = (a * extent_c + c) * extent_b
            b = tx
            # four loads in flight per thread, then the remainder
            while b + 3 * width < extent_b:
                t1, t2 = four_terms(u, v, row + b, width, s0, s1, s2)
                sum1 += t1
                sum2 += t2
                b += 4 * width
            while b < extent_b:
                t1, t2 = one_term(u, v, row + b, s0, s1, s2)
                sum1 += t1
                sum2 += t2
                b += width
            a += height
        total1, total2 = block_sum(sum1, sum2, ty * width + tx)
        if tx == 0 and ty == 0:
            partial[0, chunk, c] = total1
            partial[1, chunk, c] = total2

    @cuda.jit
    def columns(u, v, mean, invstd, gamma, beta, flags, columns_total, extent_b,
                rows_per_chunk, partial):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        j = cuda.blockIdx.x * width + tx
        chunk = cuda.blockIdx.y
        extent_a = u.shape[0] // columns_total
        sum1 = 0.0
        sum2 = 0.0
        if j < columns_total:
            c = j // extent_b          # once per thread
            s0, s1, s2 = shift_of(u, mean, invstd, gamma, beta, flags, c, extent_b)
            a = chunk * rows_per_chunk + ty
            a_end = min(chunk * rows_per_chunk + rows_per_chunk, extent_a)
            step = height * columns_total
            i = a * columns_total + j
            end = a_end * columns_total + j
            while i + 3 * step < end:
                t1, t2 = four_terms(u, v, i, step, s0, s1, s2)
                sum1 += t1
                sum2 += t2
                i += 4 * step
            while i < end:
                t1, t2 = one_term(u, v, i, s0, s1, s2)
                sum1 += t1
                sum2 += t2
                i += step
        total1, total2 = column_sum(sum1, sum2, tx, ty, width, height)
        if ty == 0 and j < columns_total:
            partial[0, chunk, j] = total1
            partial[1, chunk, j] = total2

    return rows, columns


def _build_elementwise(op, load_u, load_v, store):
    """An elementwise pass ``out = op(u, v, p0, p1, p2, p3, p4)`` in both layouts.

    ``p0..p4`` are ``coef[0..4, c]``, read once per thread; ``load_u``,
    ``load_v`` and ``store`` convert from and to each array's storage.

    Returns
    -------
    rows, columns : kernels
        ``rows[(C, grid_y), (bx, by)](u, v, coef, extent_c, extent_b, out)``;
        ``columns[(ceil(J / bx), grid_y), (bx, by)](u, v, coef,
        columns_total, extent_b, out)``.
    """

    four_u = _build_four_loads(load_u)
    four_v = _build_four_loads(load_v)

    @cuda.jit(device=True)
    def one(u, v, out, i, p0, p1, p2, p3, p4):
        store(out, i, op(load_u(u, i), load_v(v, i), p0, p1, p2, p3, p4))

    @cuda.jit(device=True)
    def four(u, v, out, i, step, p0, p1, p2, p3, p4):
        # elements i, i + step, i + 2 step, i + 3 step
        u0, u1, u2, u3 = four_u(u, i, step)
        v0, v1, v2, v3 = four_v(v, i, step)
        store(out, i, op(u0, v0, p0, p1, p2, p3, p4))
        store(out, i + step, op(u1, v1, p0, p1, p2, p3, p4))
        store(out, i + 2 * step, op(u2, v2, p0, p1, p2, p3, p4))
        store(out, i + 3 * step, op(u3, v3, p0, p1, p2, p3, p4))

    @cuda.jit
    def rows(u, v, coef, extent_c, extent_b, out):
        c = cuda.blockIdx.x
        tx = cuda.threadIdx.x
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        extent_a = u.shape[0] // (extent_c * extent_b)
        p0 = coef[0, c]
        p1 = coef[1, c]
        p2 = coef[2, c]
        p3 = coef[3, c]
        p4 = coef[4, c]
        a = cuda.blockIdx.y * height + cuda.threadIdx.y
        while a < extent_a:
            row = (a * extent_c + c) * extent_b
            b = tx
            while b + 3 * width < extent_b:
                four(u, v, out, row + b, width, p0, p1, p2, p3, p4)
                b += 4 * width
            while b < extent_b:
                one(u, v, out, row + b, p0, p1, p2, p3, p4)
                b += width
            a += cuda.gridDim.y * height

    @cuda.jit
    def columns(u, v, coef, columns_total, extent_b, out):
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        j = cuda.blockIdx.x * width + cuda.threadIdx.x
        if j >= columns_total:
            return
        c = j // extent_b          # once per thread
        p0 = coef[0, c]
        p1 = coef[1, c]
        p2 = coef[2, c]
        p3 = coef[3, c]
        p4 = coef[4, c]
        step = cuda.gridDim.y * height * columns_total
        i = (cuda.blockIdx.y * height + cuda.threadIdx.y) * columns_total + j
        end = u.shape[0]
        while i + 3 * step < end:
            four(u, v, out, i, step, p0, p1, p2, p3, p4)
            i += 4 * step
        while i < end:
            one(u, v, out, i, p0, p1, p2, p3, p4)
            i += step

    return rows, columns


def _build_kernels(threads):
    """Every kernel of the backend for ``threads`` threads per block.

    The per-channel (finishing) kernels are built here; the passes over the
    full arrays are built per storage kind of their arrays, on first use
    (see :meth:`_Kernels.reduction` and :meth:`_Kernels.elementwise`).
    """
    block_sum, column_sum = _build_block_sums(threads)
    load, store = _build_storage()

    # -- per-channel parameters, shared by every kernel that needs them ------

    @cuda.jit(device=True)
    def as_param_dtype(value, single):
        # gamma and beta take the values of the parameter dtype: float32
        # for float32 and 16-bit storage (flag bit 0), float64 otherwise
        if single:
            return float64(float32(value))
        return float64(value)

    @cuda.jit(device=True)
    def channel_scale(c, invstd, gamma, flags):
        # gamma * invstd (invstd when gamma is None)
        if (flags & 2):
            return as_param_dtype(gamma[c], (flags & 1)) * invstd
        return invstd

    @cuda.jit(device=True)
    def channel_shift(c, beta, flags):
        # beta (0 when beta is None)
        if (flags & 4):
            return as_param_dtype(beta[c], (flags & 1))
        return 0.0

    @cuda.jit(device=True)
    def affine(x, mean, scale, shift):
        # y = (x - mean) * (gamma * invstd) + beta: the forward's arithmetic,
        # also what a fused ReLU's backward rebuilds for its mask
        return (x - mean) * scale + shift

    # -- what the reductions sum (terms get float64 values) ------------------

    def first_value_of(load_u):
        @cuda.jit(device=True)
        def first_value(u, mean, invstd, gamma, beta, flags, c, extent_b):
            # K_c = x[0, c, 0], the shift of the statistics' sums
            return load_u(u, c * extent_b), 0.0, 0.0
        return first_value

    @cuda.jit(device=True)
    def channel_mean(u, mean, invstd, gamma, beta, flags, c, extent_b):
        return mean[c], 0.0, 0.0

    @cuda.jit(device=True)
    def channel_affine(u, mean, invstd, gamma, beta, flags, c, extent_b):
        # what y = affine(x, ...) needs, computed as the forward computes it
        return (mean[c], channel_scale(c, invstd[c], gamma, flags),
                channel_shift(c, beta, flags))

    @cuda.jit(device=True)
    def term_shifted_squares(x, unused, shift, unused_s1, unused_s2):
        centred = x - shift
        return centred, centred * centred

    @cuda.jit(device=True)
    def term_dy_and_dy_centred(dy, x, mean, unused_s1, unused_s2):
        # (dy, dy * (x - mean)); invstd is applied once per channel
        return dy, dy * (x - mean)

    # -- the fused ReLU's backward masks: dy where the forward stored out > 0,
    # that is where y > floor, the largest y the store rounds to 0 (a
    # compile-time constant per storage dtype of x: _host.relu_floor) -------

    def masked_of(floor):
        @cuda.jit(device=True)
        def masked(dy, x, mean, scale, shift):
            # dy where y = affine(x, ...) > floor, else 0
            if affine(x, mean, scale, shift) > floor:
                return dy
            return 0.0
        return masked

    def term_relu_of(floor):
        masked = masked_of(floor)

        @cuda.jit(device=True)
        def term_relu(dy, x, mean, scale, shift):
            # the backward's two terms with dy masked
            grad = masked(dy, x, mean, scale, shift)
            return grad, grad * (x - mean)
        return term_relu

    @cuda.jit(device=True)
    def term_value(u, unused, unused_s0, unused_s1, unused_s2):
        return u, 0.0

    @cuda.jit(device=True)
    def term_product(u, v, unused_s0, unused_s1, unused_s2):
        return u * v, 0.0

    # -- what the elementwise passes compute (p0..p4 = coef[0..4, c]) --------

    @cuda.jit(device=True)
    def op_normalize(x, unused, mean, scale, shift, unused_p3, unused_p4):
        # out = (x - mean) * (gamma * invstd) + beta
        return affine(x, mean, scale, shift)

    @cuda.jit(device=True)
    def op_normalize_relu(x, unused, mean, scale, shift, unused_p3, unused_p4):
        # out = max(y, 0); NaN stays NaN
        y = affine(x, mean, scale, shift)
        if y <= 0.0:
            return 0.0
        return y

    @cuda.jit(device=True)
    def op_backward(dy, x, mean, k, centred_scale, offset, unused_shift):
        # dx = k * dy - (x - mean) * (k * invstd * sum_dy_xhat / M) - k * sum_dy / M,
        # with k = gamma * invstd: the closed form
        # gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)
        return k * dy - (x - mean) * centred_scale + offset

    def op_backward_relu_of(floor):
        masked = masked_of(floor)

        @cuda.jit(device=True)
        def op_backward_relu(dy, x, mean, k, centred_scale, offset, shift):
            # op_backward with dy masked, y = affine(x, mean, k, shift)
            grad = masked(dy, x, mean, k, shift)
            return k * grad - (x - mean) * centred_scale + offset
        return op_backward_relu

    @cuda.jit(device=True)
    def op_eval(dy, unused, mean, scale, shift, unused_p3, unused_p4):
        # dx = dy * gamma * invstd
        return dy * scale

    def op_eval_relu_of(floor):
        masked = masked_of(floor)

        @cuda.jit(device=True)
        def op_eval_relu(dy, x, mean, scale, shift, unused_p3, unused_p4):
            # dx = dy * gamma * invstd where the mask keeps dy, else 0
            return masked(dy, x, mean, scale, shift) * scale
        return op_eval_relu

    @cuda.jit(device=True)
    def op_mask_positive(u, v, p0, p1, p2, p3, p4):
        # u where v > 0, else 0 (the staged graph's ReLU node)
        if v > 0.0:
            return u
        return 0.0

    @cuda.jit(device=True)
    def op_subtract_p0(u, unused, p0, p1, p2, p3, p4):
        return u - p0

    @cuda.jit(device=True)
    def op_multiply_p1(u, unused, p0, p1, p2, p3, p4):
        return u * p1

    @cuda.jit(device=True)
    def op_multiply_p2(u, unused, p0, p1, p2, p3, p4):
        return u * p2

    @cuda.jit(device=True)
    def op_broadcast_p3(unused_u, unused_v, p0, p1, p2, p3, p4):
        return p3

    @cuda.jit(device=True)
    def op_twice_product(u, v, p0, p1, p2, p3, p4):
        return 2.0 * u * v

    @cuda.jit(device=True)
    def op_add(u, v, p0, p1, p2, p3, p4):
        return u + v

    @cuda.jit(device=True)
    def op_add_p4(u, unused, p0, p1, p2, p3, p4):
        return u + p4

    # -- finishing kernels: one thread per channel --------------------------

    @cuda.jit(device=True)
    def sum_partials(partial, which, c, width):
        # fixed order: chunk, then the B columns of channel c
        total = 0.0
        base = c * width
        for chunk in range(partial.shape[1]):
            for b in range(width):
                total += partial[which, chunk, base + b]
        return total

    def mean_var_of(load_x):
        @cuda.jit(device=True)
        def mean_var(partial, width, x, extent_b, count, c):
            # mean = K + S1 / M, var = (S2 - S1**2 / M) / M (>= 0; NaN stays)
            sum1 = sum_partials(partial, 0, c, width)
            sum2 = sum_partials(partial, 1, c, width)
            mean = load_x(x, c * extent_b) + sum1 / count
            var = (sum2 - sum1 * (sum1 / count)) / count
            if var < 0.0:
                var = 0.0
            return mean, var
        return mean_var

    @cuda.jit(device=True)
    def set_normalize_coef(c, mean, invstd, gamma, beta, flags, coef):
        # coef = [mean, gamma * invstd, beta]; flag bits as in _param_flags
        coef[0, c] = mean
        coef[1, c] = channel_scale(c, invstd, gamma, flags)
        coef[2, c] = channel_shift(c, beta, flags)

    @cuda.jit(device=True)
    def set_backward_coef(c, count, mean, invstd, gamma, beta, flags, sum_dy, sum_dy_xhat,
                          coef):
        # dx = k * dy - (x - mean) * (k * invstd * sum_dy_xhat / M) - k * sum_dy / M;
        # coef[4] = beta, for a fused ReLU's mask
        k = channel_scale(c, invstd, gamma, flags)
        coef[0, c] = mean
        coef[1, c] = k
        coef[2, c] = k * invstd * (sum_dy_xhat / count)
        coef[3, c] = -k * (sum_dy / count)
        coef[4, c] = channel_shift(c, beta, flags)

    def finish_stats_of(load_x):
        mean_var = mean_var_of(load_x)

        @cuda.jit
        def finish_stats(partial, width, x, extent_b, count, mean_var_out):
            c = cuda.grid(1)
            if c < mean_var_out.shape[1]:
                mean, var = mean_var(partial, width, x, extent_b, count, c)
                mean_var_out[0, c] = mean
                mean_var_out[1, c] = var
        return finish_stats

    def finish_forward_of(load_x):
        mean_var = mean_var_of(load_x)

        @cuda.jit
        def finish_forward(partial, width, x, extent_b, count, eps, gamma, beta,
                           flags, momentum, running_mean, running_var, stats, coef):
            # flags: bit 0 float32 parameters, bit 1 gamma given, bit 2 beta
            # given, bit 3 running statistics given
            c = cuda.grid(1)
            if c >= stats.shape[1]:
                return
            mean, var = mean_var(partial, width, x, extent_b, count, c)
            invstd = 1.0 / math.sqrt(var + eps)
            stats[0, c] = mean
            stats[1, c] = invstd
            set_normalize_coef(c, mean, invstd, gamma, beta, flags, coef)
            if (flags & 8):
                # PyTorch: momentum weighs the batch; the running variance takes
                # the unbiased batch variance var * M / (M - 1)
                keep = 1.0 - momentum
                running_mean[c] = keep * float64(running_mean[c]) + momentum * mean
                running_var[c] = (keep * float64(running_var[c])
                                  + momentum * (var * (count / (count - 1.0))))
        return finish_forward

    @cuda.jit
    def finish_eval_forward(running_mean, running_var, eps, gamma, beta, flags,
                            stats, coef):
        c = cuda.grid(1)
        if c < stats.shape[1]:
            mean = float64(running_mean[c])
            invstd = 1.0 / math.sqrt(float64(running_var[c]) + eps)
            stats[0, c] = mean
            stats[1, c] = invstd
            set_normalize_coef(c, mean, invstd, gamma, beta, flags, coef)

    @cuda.jit
    def normalize_coefficients(mean, invstd, gamma, beta, flags, coef):
        c = cuda.grid(1)
        if c < coef.shape[1]:
            set_normalize_coef(c, mean[c], invstd[c], gamma, beta, flags, coef)

    @cuda.jit
    def finish_reduce(partial, width, invstd, sums):
        # sums = [sum(dy), sum(dy * (x - mean)) * invstd]
        c = cuda.grid(1)
        if c < sums.shape[1]:
            sums[0, c] = sum_partials(partial, 0, c, width)
            sums[1, c] = sum_partials(partial, 1, c, width) * invstd[c]

    @cuda.jit
    def elemt_coefficients(count, mean, invstd, gamma, beta, flags, sum_dy, sum_dy_xhat,
                           coef):
        c = cuda.grid(1)
        if c < coef.shape[1]:
            set_backward_coef(c, count, mean[c], invstd[c], gamma, beta, flags, sum_dy[c],
                              sum_dy_xhat[c], coef)

    @cuda.jit
    def finish_backward(partial, width, count, mean, invstd, gamma, beta, flags, grads,
                        coef):
        # grads[0] = dgamma = sum(dy * xhat), grads[1] = dbeta = sum(dy), in
        # the parameter dtype; flag bit 3: training (else dx = dy * gamma * invstd)
        c = cuda.grid(1)
        if c >= grads.shape[1]:
            return
        sum_dy = sum_partials(partial, 0, c, width)
        sum_dy_xhat = sum_partials(partial, 1, c, width) * invstd[c]
        grads[0, c] = sum_dy_xhat
        grads[1, c] = sum_dy
        if (flags & 8):
            set_backward_coef(c, count, mean[c], invstd[c], gamma, beta, flags, sum_dy,
                              sum_dy_xhat, coef)
        else:
            set_normalize_coef(c, mean[c], invstd[c], gamma, beta, flags, coef)

    @cuda.jit
    def staged_channels(mean, invstd, gamma, flags, coef):
        # coef = [mean, invstd, gamma, dsq, dmu] for the stages of the graph,
        # dsq and dmu 0 until staged_dsq and staged_dmu write them
        c = cuda.grid(1)
        if c < coef.shape[1]:
            coef[0, c] = mean[c]
            coef[1, c] = invstd[c]
            coef[2, c] = 1.0
            if (flags & 2):
                coef[2, c] = as_param_dtype(gamma[c], (flags & 1))
            coef[3, c] = 0.0
            coef[4, c] = 0.0

    @cuda.jit
    def staged_sum(partial, width, row, sums, totals):
        # sums[row, c] = the first sum of channel c's partials (float64), and
        # totals[row, c] the same in the parameter dtype (what is returned)
        c = cuda.grid(1)
        if c < sums.shape[1]:
            total = sum_partials(partial, 0, c, width)
            sums[row, c] = total
            totals[row, c] = total

    @cuda.jit
    def staged_dsq(count, sums, divar_row, coef, invstd_row, dsq_row):
        # step 6: dsqrtvar = -invstd**2 * divar
        # step 5: dvar = 0.5 * invstd * dsqrtvar
        # step 4: dsq = dvar / M, into coef[dsq_row] for the broadcast stage
        c = cuda.grid(1)
        if c < coef.shape[1]:
            invstd = coef[invstd_row, c]
            dsqrtvar = -(invstd * invstd) * sums[divar_row, c]
            dvar = 0.5 * invstd * dsqrtvar
            coef[dsq_row, c] = dvar / count

    @cuda.jit
    def staged_dmu(count, sums, sum_row, coef, dmu_row):
        # step 2: dmu = -sum(dx1); steps 1 and 0 add dmu / M (coef[dmu_row])
        c = cuda.grid(1)
        if c < coef.shape[1]:
            coef[dmu_row, c] = -sums[sum_row, c] / count

    reductions = {
        "stats": lambda kind: (term_shifted_squares, first_value_of(load[kind])),
        "backward": lambda kind: (term_dy_and_dy_centred, channel_mean),
        "backward_relu": lambda kind: (term_relu_of, channel_affine),
        "sum": lambda kind: (term_value, channel_mean),
        "sum_of_product": lambda kind: (term_product, channel_mean),
    }
    operations = {
        "normalize": op_normalize, "normalize_relu": op_normalize_relu,
        "backward": op_backward, "backward_relu": op_backward_relu_of,
        "eval": op_eval, "eval_relu": op_eval_relu_of, "mask_positive": op_mask_positive,
        "subtract_p0": op_subtract_p0, "multiply_p1": op_multiply_p1,
        "multiply_p2": op_multiply_p2, "broadcast_p3": op_broadcast_p3,
        "twice_product": op_twice_product, "add": op_add, "add_p4": op_add_p4,
    }

    def build_reduction(name, kind_u, kind_v, floor):
        term, shift_of = reductions[name](kind_u)
        if floor is not None:
            term = term(floor)
        return _build_reduction(term, shift_of, load[kind_u], load[kind_v], block_sum,
                                column_sum)

    def build_elementwise(name, kind_u, kind_v, kind_out, floor):
        op = operations[name] if floor is None else operations[name](floor)
        return _build_elementwise(op, load[kind_u], load[kind_v], store[kind_out])

    return _Kernels(
        threads, build_reduction, build_elementwise,
        finish_stats={kind: finish_stats_of(load[kind]) for kind in load},
        finish_forward={kind: finish_forward_of(load[kind]) for kind in load},
        finish_eval_forward=finish_eval_forward,
        normalize_coefficients=normalize_coefficients,
        finish_reduce=finish_reduce,
        elemt_coefficients=elemt_coefficients,
        finish_backward=finish_backward,
        staged_channels=staged_channels,
        staged_sum=staged_sum,
        staged_dsq=staged_dsq,
        staged_dmu=staged_dmu,
    )


class _Kernels:
    """The kernels of one threads-per-block value.

    Per-channel kernels are attributes. Passes over the full arrays depend on
    the storage of their arrays and are built on first use:
    ``reduction(name, u, v)`` and ``elementwise(name, u, v, out)`` take the
    flat arrays the kernel will get and return its ``(rows, columns)`` pair.
    A pass with a ReLU mask (:data:`MASKED`) is built per storage dtype of
    ``v`` (the forward's ``x``), whose ReLU floor it holds as a constant.
    """

    def __init__(self, threads, build_reduction, build_elementwise, **per_channel):
        self.threads = threads
        self._build_reduction = build_reduction
        self._build_elementwise = build_elementwise
        self._passes = {}
        self.__dict__.update(per_channel)

    def _get(self, key, build):
        kernels = self._passes.get(key)
        if kernels is None:
            with _BUILD_LOCK:
                kernels = self._passes.get(key)
                if kernels is None:
                    kernels = self._passes[key] = build(*key[1:])
        return kernels

    def reduction(self, name, u, v):
        return self._get(("reduction", name, _kind(u), _kind(v), _mask_floor(name, v)),
                         self._build_reduction)

    def elementwise(self, name, u, v, out):
        return self._get(("elementwise", name, _kind(u), _kind(v), _kind(out),
                          _mask_floor(name, v)), self._build_elementwise)


# The passes that mask dy by the forward's ReLU, y(v) > floor.
MASKED = frozenset({"backward_relu", "eval_relu"})


def _mask_floor(name, v):
    """The ReLU floor of pass ``name`` over ``v`` (the forward's ``x``; a
    flat device array, bfloat16 as uint16), or None for a pass without a mask."""
    if name not in MASKED:
        return None
    return relu_floor("bfloat16" if v.dtype == np.uint16 else v.dtype)


def _kind(flat):
    """The storage kind of a flat device array a kernel gets: ``"b"`` for
    bfloat16 bit patterns (see :func:`._launch._flat`), ``"f"`` for float arrays."""
    return "b" if flat.dtype == np.uint16 else "f"

