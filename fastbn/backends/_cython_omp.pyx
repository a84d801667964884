# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython + OpenMP kernels of fastbn on the canonical ``(A, C, B)`` view.

The kernel contract is in :mod:`fastbn.backends`; this module implements it
for C-contiguous float32 and float64 arrays (a fused type), releasing the GIL
and running its loops with ``prange``.

Two loop shapes
---------------
* ``B > 1`` ("channel path"): a channel is ``A`` contiguous segments of
  ``B`` values. Work is done channel by channel: one thread reduces a
  channel, then immediately applies the elementwise pass to the same
  channel, so the second read of ``x`` (and ``dy``) hits the cache. The
  segments of a channel are ``C * B`` apart, so rows ahead are prefetched
  in software. When there are too few channels to keep every thread busy
  (``C < 4 * threads``), or the array is small enough (< 16 MiB) to stay in
  L3 between passes, each channel is split into chunks that different
  threads reduce, and the elementwise pass runs as a separate parallel pass.
  Short segments (``B <= COL_BLOCK``) are reduced four rows at a time into
  per-column float64 sums, like the row path.
* ``B == 1`` ("row path", ``(N, D)`` and channels-last): rows of ``C``
  contiguous channels; inner loops run across channels (vectorized, with
  local float64 accumulators), over blocks of rows and blocks of at most
  ``COL_BLOCK`` channels. When all rows of a block of >= 64 channels fit in
  1 MiB (L2), forward_train / backward_train are fused per block: reduce
  the block, then its elementwise pass reads it again from L2.

float32 elementwise passes (normalize, simplified backward) run in float32
arithmetic, 16 lanes per AVX-512 op, with the means split as
``mean = hi + lo`` (two float32): ``(x - hi) - lo`` is the centred value to
float32 rounding even when ``|mean| >> std``. Statistics and reductions are
always centred and accumulated in float64.

Reductions that do not depend on the thread count
-------------------------------------------------
Every reduction is split into a fixed number of chunks that depends on the
shape only. Each chunk is summed in a fixed order into float64 partials in a
buffer; the partials of a channel are then added in chunk order. Threads only
decide *who* computes a chunk, never how it is summed, so float64 results are
bit-identical for any thread count.

Statistics use shifted sums: with ``K`` the channel's first value,
``mean = K + sum(x - K) / M`` and ``var = sum((x - K)**2) / M - (sum(x - K) / M)**2``
(all in float64). A constant channel gives ``var == 0`` exactly.
"""

import numpy as np

from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

from ._host import readable_running, running_arrays

from ._openmp_helpers cimport FASTBN_OPENMP_ENABLED, fastbn_max_threads

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define fastbn_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
    #define fastbn_prefetch_write(p) __builtin_prefetch((const void *)(p), 1, 3)
    #else
    #define fastbn_prefetch(p) ((void)0)
    #define fastbn_prefetch_write(p) ((void)0)
    #endif
    """
    # Prefetch hints (no-ops for compilers without __builtin_prefetch).
    void fastbn_prefetch(const void* p) noexcept nogil
    void fastbn_prefetch_write(const void* p) noexcept nogil


ctypedef fused floating:
    float
    double

# float64 partial sums per channel-path reduction (lane j takes the values
# at offsets j, j + LANES, ... of each contiguous segment).
cdef enum:
    LANES = 256
    CACHE_LINE = 64
    # Row path: columns are reduced in blocks of at most this many channels.
    COL_BLOCK = 256
    # Row path: prefetch this many rows ahead.
    ROWS_AHEAD = 8
    # Channel path: prefetch the rows about this many bytes ahead.
    PREFETCH_BYTES = 4096
# Elementwise work items hold about this many elements.
cdef Py_ssize_t ELEM_BLOCK = 16384
# Channel path: a channel is reduced in min(64, M // CHUNK_MIN) chunks.
cdef Py_ssize_t CHUNK_MIN = 16384
cdef Py_ssize_t CHUNK_MAX = 64
# Arrays smaller than this run on one thread (thread start-up costs more).
cdef Py_ssize_t SERIAL_BELOW = 32768
# Channel path: fuse reduce + elementwise per channel when C >= this * threads
# and the array is at least FUSE_MIN_BYTES; smaller arrays stay in the L3
# cache between two plain sequential passes, which are then faster.
cdef Py_ssize_t FUSE_CHANNELS_PER_THREAD = 4
# Row path: fuse reduce + elementwise per block of channels when a block of
# at least ROW_FUSE_MIN_WIDTH channels (all rows) fits in ROW_FUSE_BYTES and
# there are at least ROW_FUSE_MIN_BLOCKS blocks.
cdef Py_ssize_t ROW_FUSE_BYTES = 1024 * 1024
cdef Py_ssize_t ROW_FUSE_MIN_WIDTH = 64
cdef Py_ssize_t ROW_FUSE_MIN_BLOCKS = 4
cdef Py_ssize_t FUSE_MIN_BYTES = 16 * 1024 * 1024

# What the elementwise pass computes (p0..p3 are per-channel float64).
cdef enum:
    OP_NORMALIZE = 0   # out = (a - p0) * p1 + p2
    OP_BACKWARD = 1    # out = p1 * ((a - p2) - (b - p0) * p3), a = dy, b = x
    OP_SUB = 2         # out = a - p0
    OP_MUL = 3         # out = a * p0
    OP_FILL = 4        # out = p0
    OP_TWO_MUL = 5     # out = 2 * a * b
    OP_ADD = 6         # out = a + b
    OP_ADD_P = 7       # out = a + p0

OPENMP_ENABLED = bool(FASTBN_OPENMP_ENABLED)


def max_threads():
    """Threads a kernel started now would use (``omp_get_max_threads()``).

    Returns
    -------
    int
        1 when the extension was built without OpenMP.
    """
    return fastbn_max_threads()


cdef int _threads_for(Py_ssize_t size) noexcept nogil:
    # Read at every call (never cached) so OMP_NUM_THREADS and
    # threadpoolctl limits are honoured.
    if size < SERIAL_BELOW:
        return 1
    return fastbn_max_threads()


cdef inline Py_ssize_t _chunks_per_channel(Py_ssize_t M) noexcept nogil:
    # Depends on the shape only, never on the thread count.
    cdef Py_ssize_t n = M // CHUNK_MIN
    if n < 1:
        n = 1
    if n > CHUNK_MAX:
        n = CHUNK_MAX
    return n


cdef inline Py_ssize_t _chunk_bound(Py_ssize_t k, Py_ssize_t n_chunk, Py_ssize_t A,
                                     Py_ssize_t B) noexcept nogil:
    # Channel path: chunk k of a channel's M = A * B values starts here. For
    # short segments (B <= COL_BLOCK) chunks are whole rows (n_chunk <= A / 64
    # then), so _channel_range_sums can take four segments at a time.
    if B <= COL_BLOCK:
        return (k * A // n_chunk) * B
    return k * (A * B) // n_chunk


cdef inline Py_ssize_t _col_blocks(Py_ssize_t C) noexcept nogil:
    return (C + COL_BLOCK - 1) // COL_BLOCK


cdef inline Py_ssize_t _row_chunks(Py_ssize_t A, Py_ssize_t C) noexcept nogil:
    # About 64 work items in all, at most one chunk per row. Shape only.
    cdef Py_ssize_t n = 64 // _col_blocks(C)
    if n < 1:
        n = 1
    if n > A:
        n = A
    return n


cdef inline Py_ssize_t _row_fuse_blocks(Py_ssize_t A, Py_ssize_t C, Py_ssize_t itemsize,
                                         Py_ssize_t n_arrays) noexcept nogil:
    # Row path: the number of channel blocks for the fused kernels, each
    # block (all A rows of the n_arrays arrays it touches) within
    # ROW_FUSE_BYTES so that its second read comes from L2; 0 when blocks
    # would be narrower than
    # ROW_FUSE_MIN_WIDTH channels or fewer than ROW_FUSE_MIN_BLOCKS (then the
    # two-pass kernels run). Depends on the shape only.
    cdef Py_ssize_t width = ROW_FUSE_BYTES // (n_arrays * A * itemsize)
    cdef Py_ssize_t n
    if width > COL_BLOCK:
        width = COL_BLOCK
    if width < ROW_FUSE_MIN_WIDTH:
        return 0
    n = (C + width - 1) // width
    if n < ROW_FUSE_MIN_BLOCKS:
        return 0
    return n


# ---------------------------------------------------------------------------
# Inner loops
# ---------------------------------------------------------------------------

cdef inline void _sums2(const floating* a, const floating* b, Py_ssize_t n,
                        double ka, double kb, double* acc_u, double* acc_uv,
                        const floating* ahead_a, const floating* ahead_b) noexcept nogil:
    # acc_u[j] += u, acc_uv[j] += u * v for u = a - ka, v = b - kb, in float64,
    # with value i going to lane j = i % LANES. The lanes are independent,
    # so this is an elementwise loop that vectorizes without -ffast-math,
    # and its summation order depends on n only. ahead_a/ahead_b (or NULL):
    # the segment read next, prefetched block by block as this one is read.
    cdef Py_ssize_t blk, start, j, m, line
    cdef Py_ssize_t per_line = CACHE_LINE // <Py_ssize_t>sizeof(floating)
    cdef double u
    for blk in range((n + LANES - 1) // LANES):
        start = blk * LANES
        m = n - start
        if m > LANES:
            m = LANES
        if ahead_a != NULL:
            for line in range((m + per_line - 1) // per_line):
                fastbn_prefetch(ahead_a + start + line * per_line)
                fastbn_prefetch(ahead_b + start + line * per_line)
        for j in range(m):
            u = <double>a[start + j] - ka
            acc_u[j] += u
            acc_uv[j] += u * (<double>b[start + j] - kb)


cdef inline void _channel_range_sums(const floating* a, const floating* b,
                                     Py_ssize_t C, Py_ssize_t B, Py_ssize_t c,
                                     Py_ssize_t m0, Py_ssize_t m1,
                                     double ka, double kb, double* dst) noexcept nogil:
    # dst[0] = sum(a - ka), dst[1] = sum((a - ka) * (b - kb)) over the values
    # m0 <= m < m1 of channel c (m = row * B + col), walking its contiguous
    # segments into LANES float64 lanes, then adding the lanes in order.
    # The segments are C * B apart, too far for the hardware prefetcher to
    # follow, so the same columns `rows_ahead` rows further are prefetched.
    cdef double acc_u[LANES]
    cdef double acc_uv[LANES]
    cdef double shift_a[COL_BLOCK]
    cdef double shift_b[COL_BLOCK]
    cdef double* shift_b_ptr
    cdef Py_ssize_t m = m0
    cdef Py_ssize_t end_row = (m1 - 1) // B + 1   # rows of this range: 0..end_row-1
    cdef Py_ssize_t rows_ahead = PREFETCH_BYTES // (B * <Py_ssize_t>sizeof(floating))
    cdef Py_ssize_t row, col, n, offset, j
    cdef const floating* ahead_a
    cdef const floating* ahead_b
    if rows_ahead < 1:
        rows_ahead = 1
    if B <= COL_BLOCK and m0 % B == 0 and m1 % B == 0:
        # Short segments: the channel's rows m0 / B .. m1 / B - 1 as a matrix
        # of B columns with rows C * B apart; _rows_sums adds four rows per
        # pass into per-column float64 sums, which are then added in order.
        for j in range(B):
            shift_a[j] = ka
            shift_b[j] = kb
        shift_b_ptr = shift_b
        if kb == ka:
            shift_b_ptr = shift_a     # lets _rows_sums see a == b (statistics)
        _rows_sums(a + c * B, b + c * B, C * B, m0 // B, m1 // B, 0, B, shift_a,
                   shift_b_ptr, rows_ahead, acc_u, acc_uv)
        dst[0] = 0.0
        dst[1] = 0.0
        for j in range(B):
            dst[0] += acc_u[j]
            dst[1] += acc_uv[j]
        return
    for j in range(LANES):
        acc_u[j] = 0.0
        acc_uv[j] = 0.0
    while m < m1:
        row = m // B
        col = m - row * B
        n = B - col
        if n > m1 - m:
            n = m1 - m
        offset = (row * C + c) * B + col
        ahead_a = NULL
        ahead_b = NULL
        if row + rows_ahead < end_row:
            ahead_a = a + offset + rows_ahead * C * B
            ahead_b = b + offset + rows_ahead * C * B
        _sums2(a + offset, b + offset, n, ka, kb, acc_u, acc_uv, ahead_a, ahead_b)
        m += n
    dst[0] = 0.0
    dst[1] = 0.0
    for j in range(LANES):
        dst[0] += acc_u[j]
        dst[1] += acc_uv[j]


cdef inline void _prefetch_row_for_write(floating* out, Py_ssize_t row, Py_ssize_t A,
                                         Py_ssize_t C, Py_ssize_t B, Py_ssize_t c) noexcept nogil:
    # Channel path, elementwise pass: the output segments of a channel are
    # C * B apart; prefetch (for writing) the segment PREFETCH_BYTES ahead.
    cdef Py_ssize_t per_line = CACHE_LINE // <Py_ssize_t>sizeof(floating)
    cdef Py_ssize_t rows_ahead = PREFETCH_BYTES // (B * <Py_ssize_t>sizeof(floating))
    cdef Py_ssize_t line
    cdef floating* target
    if rows_ahead < 1:
        rows_ahead = 1
    if row + rows_ahead >= A:
        return
    target = out + ((row + rows_ahead) * C + c) * B
    for line in range((B + per_line - 1) // per_line):
        fastbn_prefetch_write(target + line * per_line)


cdef inline void _apply_f32(int op, const float* a, const float* b, float* out,
                            Py_ssize_t n, double p0, double p1, double p2,
                            double p3) noexcept nogil:
    # OP_NORMALIZE / OP_BACKWARD for float32 with one channel's coefficients,
    # in float32 arithmetic (16 lanes per AVX-512 op, no conversions). The
    # centrings x - mean and dy - mean_dy use the split mean = hi + lo
    # (hi = float(mean), lo = float(mean - hi)): (x - hi) - lo is accurate to
    # float32 rounding of the centred value, however large mean / std is.
    cdef Py_ssize_t i
    cdef float mean_hi = <float>p0
    cdef float mean_lo = <float>(p0 - <double>mean_hi)
    cdef float k1 = <float>p1
    cdef float k2_hi = <float>p2
    cdef float k2_lo = <float>(p2 - <double>k2_hi)
    cdef float k3 = <float>p3
    if op == OP_NORMALIZE:
        # out = (x - mean) * scale + offset   (p2 = offset is not split)
        for i in range(n):
            out[i] = ((a[i] - mean_hi) - mean_lo) * k1 + k2_hi
    else:
        # out = k_scale * ((dy - mean_dy) - (x - mean) * k_xmu)
        for i in range(n):
            out[i] = k1 * (((a[i] - k2_hi) - k2_lo) - ((b[i] - mean_hi) - mean_lo) * k3)


cdef inline void _apply(int op, const floating* a, const floating* b, floating* out,
                        Py_ssize_t n, const double* p0, const double* p1,
                        const double* p2, const double* p3,
                        bint per_element) noexcept nogil:
    # One elementwise op over n contiguous values, in float64 (float32
    # normalize / backward with shared coefficients: _apply_f32). With
    # per_element, value i belongs to channel i (row path, p* point at the
    # block's first channel); otherwise all n values share channel p*[0].
    cdef Py_ssize_t i
    cdef double q0, q1, q2, q3
    if floating is float:
        if not per_element and (op == OP_NORMALIZE or op == OP_BACKWARD):
            _apply_f32(op, a, b, out, n, p0[0], p1[0], p2[0], p3[0])
            return
    if op == OP_NORMALIZE:
        if per_element:
            for i in range(n):
                out[i] = <floating>((<double>a[i] - p0[i]) * p1[i] + p2[i])
        else:
            q0 = p0[0]
            q1 = p1[0]
            q2 = p2[0]
            for i in range(n):
                out[i] = <floating>((<double>a[i] - q0) * q1 + q2)
    elif op == OP_BACKWARD:
        if per_element:
            for i in range(n):
                out[i] = <floating>(p1[i] * ((<double>a[i] - p2[i])
                                             - (<double>b[i] - p0[i]) * p3[i]))
        else:
            q0 = p0[0]
            q1 = p1[0]
            q2 = p2[0]
            q3 = p3[0]
            for i in range(n):
                out[i] = <floating>(q1 * ((<double>a[i] - q2) - (<double>b[i] - q0) * q3))
    elif op == OP_SUB:
        if per_element:
            for i in range(n):
                out[i] = <floating>(<double>a[i] - p0[i])
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <floating>(<double>a[i] - q0)
    elif op == OP_MUL:
        if per_element:
            for i in range(n):
                out[i] = <floating>(<double>a[i] * p0[i])
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <floating>(<double>a[i] * q0)
    elif op == OP_FILL:
        if per_element:
            for i in range(n):
                out[i] = <floating>p0[i]
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <floating>q0
    elif op == OP_TWO_MUL:
        for i in range(n):
            out[i] = 2 * a[i] * b[i]
    elif op == OP_ADD:
        for i in range(n):
            out[i] = a[i] + b[i]
    elif op == OP_ADD_P:
        if per_element:
            for i in range(n):
                out[i] = <floating>(<double>a[i] + p0[i])
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <floating>(<double>a[i] + q0)


# ---------------------------------------------------------------------------
# Per-channel coefficients (shared by every path, so all paths agree bitwise)
# ---------------------------------------------------------------------------

cdef inline double _merge(const double* partials, Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    # Partials added in chunk order.
    cdef double total = 0.0
    cdef Py_ssize_t k
    for k in range(n):
        total += partials[k * stride]
    return total


cdef inline void _forward_coefs(Py_ssize_t c, double sum_u, double sum_uu, double shift,
                                double M, double eps, const double* gamma,
                                const double* beta, double* mean, double* var,
                                double* scale, double* offset) noexcept nogil:
    # mean = K + sum(x - K) / M; var = sum((x - K)^2) / M - (sum(x - K) / M)^2
    cdef double d = sum_u / M
    cdef double v = sum_uu / M - d * d
    if v < 0.0:          # rounding only; NaN fails the test and stays NaN
        v = 0.0
    mean[c] = shift + d
    var[c] = v
    scale[c] = gamma[c] / sqrt(v + eps)      # invstd * gamma
    offset[c] = beta[c]


cdef inline void _backward_coefs(Py_ssize_t c, double sum_dy, double sum_dy_xmu, double M,
                                 const double* invstd, const double* gamma,
                                 double* out_sum_dy, double* out_sum_dy_xhat,
                                 double* k_scale, double* k_mean_dy,
                                 double* k_xmu) noexcept nogil:
    # sum_dy_xhat = invstd * sum(dy * (x - mean));
    # dx = gamma * invstd * ((dy - sum_dy / M) - (x - mean) * invstd * sum_dy_xhat / M)
    cdef double sum_dy_xhat = sum_dy_xmu * invstd[c]
    out_sum_dy[c] = sum_dy
    out_sum_dy_xhat[c] = sum_dy_xhat
    _elemt_coefs(c, sum_dy, sum_dy_xhat, M, invstd, gamma, k_scale, k_mean_dy, k_xmu)


cdef inline void _elemt_coefs(Py_ssize_t c, double sum_dy, double sum_dy_xhat, double M,
                              const double* invstd, const double* gamma,
                              double* k_scale, double* k_mean_dy, double* k_xmu) noexcept nogil:
    k_scale[c] = gamma[c] * invstd[c]
    k_mean_dy[c] = sum_dy / M
    k_xmu[c] = invstd[c] * sum_dy_xhat / M


# ---------------------------------------------------------------------------
# Parallel drivers
# ---------------------------------------------------------------------------

cdef void _reduce(const floating* a, const floating* b, Py_ssize_t A, Py_ssize_t C,
                  Py_ssize_t B, const double* ka, const double* kb,
                  double* sum_u, double* sum_uv, double* partials,
                  int nthreads) noexcept nogil:
    # Per channel c: sum_u[c] = sum(a - ka[c]), sum_uv[c] = sum((a - ka[c]) * (b - kb[c])).
    # partials: C * _chunks_per_channel(A * B) * 2 doubles (B > 1) or
    # 2 * _row_chunks(A, C) * C doubles (B == 1).
    cdef Py_ssize_t M = A * B
    cdef Py_ssize_t n_chunk, item, c, k, r, j, n_cblk, n_rchunk, c0, c1, r0, r1
    if B > 1:
        n_chunk = _chunks_per_channel(M)
        for item in prange(C * n_chunk, nogil=True, num_threads=nthreads, schedule='dynamic'):
            c = item // n_chunk
            k = item - c * n_chunk
            _channel_range_sums(a, b, C, B, c, _chunk_bound(k, n_chunk, A, B),
                                _chunk_bound(k + 1, n_chunk, A, B),
                                ka[c], kb[c], partials + 2 * item)
        for c in range(C):
            sum_u[c] = _merge(partials + 2 * c * n_chunk, n_chunk, 2)
            sum_uv[c] = _merge(partials + 2 * c * n_chunk + 1, n_chunk, 2)
    else:
        # Row path: partials[0, r, c] and partials[1, r, c] for row chunk r.
        n_cblk = _col_blocks(C)
        n_rchunk = _row_chunks(A, C)
        for item in prange(n_rchunk * n_cblk, nogil=True, num_threads=nthreads,
                           schedule='dynamic'):
            r = item // n_cblk
            j = item - r * n_cblk
            c0 = j * C // n_cblk
            c1 = (j + 1) * C // n_cblk
            r0 = r * A // n_rchunk
            r1 = (r + 1) * A // n_rchunk
            _rows_sums(a, b, C, r0, r1, c0, c1, ka, kb, ROWS_AHEAD, partials + r * C,
                       partials + (n_rchunk + r) * C)
        for c in range(C):
            sum_u[c] = _merge(partials + c, n_rchunk, C)
            sum_uv[c] = _merge(partials + n_rchunk * C + c, n_rchunk, C)


cdef inline void _prefetch_rows(const void* base, Py_ssize_t row_bytes, Py_ssize_t r0,
                                Py_ssize_t r1, Py_ssize_t nbytes, bint for_write) noexcept nogil:
    # Row path: prefetch nbytes from the start of rows r0..r1-1 (rows are
    # row_bytes apart); the column blocks of consecutive rows are far apart,
    # which the hardware prefetcher follows badly.
    cdef const char* p
    cdef Py_ssize_t r, off
    for r in range(r0, r1):
        p = <const char*>base + r * row_bytes
        off = 0
        while off < nbytes:
            if for_write:
                fastbn_prefetch_write(p + off)
            else:
                fastbn_prefetch(p + off)
            off += CACHE_LINE


cdef inline void _sums_4rows(const floating* a0, const floating* b0, Py_ssize_t stride,
                             Py_ssize_t n, const double* shift_a, const double* shift_b,
                             double* acc_u, double* acc_uv, bint same) noexcept nogil:
    # Rows a0, a0 + stride, a0 + 2 * stride, a0 + 3 * stride (n values each):
    # acc_u[j] += u, acc_uv[j] += u * v, u = a - shift_a[j], v = b - shift_b[j],
    # four rows per load/store of the accumulators, added in row order.
    # With `same` (a == b and shift_a == shift_b: statistics) v == u.
    cdef Py_ssize_t j
    cdef double u0, u1, u2, u3
    if same:
        for j in range(n):
            u0 = <double>a0[j] - shift_a[j]
            u1 = <double>a0[stride + j] - shift_a[j]
            u2 = <double>a0[2 * stride + j] - shift_a[j]
            u3 = <double>a0[3 * stride + j] - shift_a[j]
            acc_u[j] = (((acc_u[j] + u0) + u1) + u2) + u3
            acc_uv[j] = (((acc_uv[j] + u0 * u0) + u1 * u1) + u2 * u2) + u3 * u3
    else:
        for j in range(n):
            u0 = <double>a0[j] - shift_a[j]
            u1 = <double>a0[stride + j] - shift_a[j]
            u2 = <double>a0[2 * stride + j] - shift_a[j]
            u3 = <double>a0[3 * stride + j] - shift_a[j]
            acc_u[j] = (((acc_u[j] + u0) + u1) + u2) + u3
            acc_uv[j] = ((((acc_uv[j] + u0 * (<double>b0[j] - shift_b[j]))
                           + u1 * (<double>b0[stride + j] - shift_b[j]))
                          + u2 * (<double>b0[2 * stride + j] - shift_b[j]))
                         + u3 * (<double>b0[3 * stride + j] - shift_b[j]))


cdef inline void _sums_1row(const floating* a0, const floating* b0, Py_ssize_t n,
                            const double* shift_a, const double* shift_b,
                            double* acc_u, double* acc_uv) noexcept nogil:
    # One row: acc_u[j] += u, acc_uv[j] += u * v (as _sums_4rows).
    cdef Py_ssize_t j
    cdef double u
    for j in range(n):
        u = <double>a0[j] - shift_a[j]
        acc_u[j] += u
        acc_uv[j] += u * (<double>b0[j] - shift_b[j])


cdef inline void _rows_sums(const floating* a, const floating* b, Py_ssize_t C,
                            Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                            const double* ka, const double* kb, Py_ssize_t rows_ahead,
                            double* pu, double* puv) noexcept nogil:
    # Rows r0..r1-1 (C values apart) and columns c0..c1-1 (c1 - c0 <= COL_BLOCK):
    # pu[c] = sum_r u, puv[c] = sum_r u * v with u = a[r, c] - ka[c], v = b[r, c] - kb[c],
    # rows added in order, four at a time from r0. Accumulators and shifts
    # are local arrays (they do not alias a or b), so the loops over columns
    # vectorize.
    cdef double acc_u[COL_BLOCK]
    cdef double acc_uv[COL_BLOCK]
    cdef double shift_a[COL_BLOCK]
    cdef double shift_b[COL_BLOCK]
    cdef Py_ssize_t n = c1 - c0
    cdef Py_ssize_t r, j
    cdef const floating* a0
    cdef const floating* b0
    cdef bint same = a == b and ka == kb
    for j in range(n):
        acc_u[j] = 0.0
        acc_uv[j] = 0.0
        shift_a[j] = ka[c0 + j]
        shift_b[j] = kb[c0 + j]
    r = r0
    while r + 4 <= r1:
        a0 = a + r * C + c0
        b0 = b + r * C + c0
        if rows_ahead > 0 and r + rows_ahead + 4 <= r1:
            # the rows read rows_ahead rows from now
            _prefetch_rows(a0 + rows_ahead * C, C * sizeof(floating), 0, 4,
                           n * sizeof(floating), False)
            if not same:
                _prefetch_rows(b0 + rows_ahead * C, C * sizeof(floating), 0, 4,
                               n * sizeof(floating), False)
        _sums_4rows(a0, b0, C, n, shift_a, shift_b, acc_u, acc_uv, same)
        r += 4
    while r < r1:
        _sums_1row(a + r * C + c0, b + r * C + c0, n, shift_a, shift_b, acc_u, acc_uv)
        r += 1
    for j in range(n):
        pu[c0 + j] = acc_u[j]
        puv[c0 + j] = acc_uv[j]


cdef inline void _rows_apply(int op, const floating* a, const floating* b, floating* out,
                             Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                             Py_ssize_t c1, const double* p0, const double* p1,
                             const double* p2, const double* p3,
                             bint prefetch) noexcept nogil:
    # Row path: `op` on rows r0..r1-1, channels c0..c1-1 (c1 - c0 <= COL_BLOCK).
    # prefetch: software-prefetch the rows ROWS_AHEAD ahead (off in the fused
    # kernels, whose second pass reads the block from L2).
    # OP_NORMALIZE / OP_BACKWARD: the block's coefficients are copied to local
    # arrays first (they stay in L1 and cannot alias `out`), then each row is
    # one vectorized loop: in float64 for float64 data (q0..q3), in float32
    # arithmetic with split means for float32 data, as in _apply_f32.
    cdef double q0[COL_BLOCK]
    cdef double q1[COL_BLOCK]
    cdef double q2[COL_BLOCK]
    cdef double q3[COL_BLOCK]
    cdef float mean_hi[COL_BLOCK]
    cdef float mean_lo[COL_BLOCK]
    cdef float k1[COL_BLOCK]
    cdef float k2_hi[COL_BLOCK]
    cdef float k2_lo[COL_BLOCK]
    cdef float k3[COL_BLOCK]
    cdef Py_ssize_t n = c1 - c0
    cdef Py_ssize_t r, j
    cdef const floating* ar
    cdef const floating* br
    cdef floating* outr
    if op != OP_NORMALIZE and op != OP_BACKWARD:
        for r in range(r0, r1):
            _apply(op, a + r * C + c0, b + r * C + c0, out + r * C + c0, n,
                   p0 + c0, p1 + c0, p2 + c0, p3 + c0, True)
        return
    for j in range(n):
        if floating is float:
            mean_hi[j] = <float>p0[c0 + j]
            mean_lo[j] = <float>(p0[c0 + j] - <double>mean_hi[j])
            k1[j] = <float>p1[c0 + j]
            k2_hi[j] = <float>p2[c0 + j]
            k2_lo[j] = <float>(p2[c0 + j] - <double>k2_hi[j])
            k3[j] = <float>p3[c0 + j]
        else:
            q0[j] = p0[c0 + j]
            q1[j] = p1[c0 + j]
            q2[j] = p2[c0 + j]
            q3[j] = p3[c0 + j]
    if op == OP_NORMALIZE:
        # out = (x - mean) * scale + offset   (p2 = offset is not split)
        for r in range(r0, r1):
            ar = a + r * C + c0
            outr = out + r * C + c0
            if prefetch and r + ROWS_AHEAD < r1:
                _prefetch_rows(ar + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(floating), False)
                _prefetch_rows(outr + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(floating), True)
            if floating is float:
                for j in range(n):
                    outr[j] = ((ar[j] - mean_hi[j]) - mean_lo[j]) * k1[j] + k2_hi[j]
            else:
                for j in range(n):
                    outr[j] = (ar[j] - q0[j]) * q1[j] + q2[j]
    else:
        # out = k_scale * ((dy - mean_dy) - (x - mean) * k_xmu)
        for r in range(r0, r1):
            ar = a + r * C + c0
            br = b + r * C + c0
            outr = out + r * C + c0
            if prefetch and r + ROWS_AHEAD < r1:
                _prefetch_rows(ar + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(floating), False)
                _prefetch_rows(br + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(floating), False)
                _prefetch_rows(outr + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(floating), True)
            if floating is float:
                for j in range(n):
                    outr[j] = k1[j] * (((ar[j] - k2_hi[j]) - k2_lo[j])
                                       - ((br[j] - mean_hi[j]) - mean_lo[j]) * k3[j])
            else:
                for j in range(n):
                    outr[j] = q1[j] * ((ar[j] - q2[j]) - (br[j] - q0[j]) * q3[j])


cdef void _elementwise(int op, const floating* a, const floating* b, floating* out,
                       Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
                       const double* p0, const double* p1, const double* p2,
                       const double* p3, int nthreads) noexcept nogil:
    # Applies `op` to the whole array. Channel path (B > 1): rows are (a, c)
    # segments of B values; work items group short rows or split long ones so
    # each holds about ELEM_BLOCK values. Row path (B == 1): work items are
    # blocks of rows times blocks of at most COL_BLOCK channels.
    cdef Py_ssize_t n_rows, row_len, rows_per_item, n_blk, n_items, n_cblk
    cdef Py_ssize_t item, g, blk, row, r0, r1, s0, s1, c
    if B == 1:
        n_cblk = _col_blocks(C)
        rows_per_item = ELEM_BLOCK * n_cblk // C
        if rows_per_item < 1:
            rows_per_item = 1
        n_items = ((A + rows_per_item - 1) // rows_per_item) * n_cblk
        for item in prange(n_items, nogil=True, num_threads=nthreads, schedule='dynamic'):
            g = item // n_cblk
            blk = item - g * n_cblk
            r0 = g * rows_per_item
            r1 = r0 + rows_per_item
            if r1 > A:
                r1 = A
            _rows_apply(op, a, b, out, C, r0, r1, blk * C // n_cblk, (blk + 1) * C // n_cblk,
                        p0, p1, p2, p3, True)
        return
    n_rows = A * C
    row_len = B
    rows_per_item = ELEM_BLOCK // row_len
    if rows_per_item < 1:
        rows_per_item = 1
    n_blk = row_len // ELEM_BLOCK
    if n_blk < 1:
        n_blk = 1
    n_items = ((n_rows + rows_per_item - 1) // rows_per_item) * n_blk
    for item in prange(n_items, nogil=True, num_threads=nthreads, schedule='dynamic'):
        g = item // n_blk
        blk = item - g * n_blk
        r0 = g * rows_per_item
        r1 = r0 + rows_per_item
        if r1 > n_rows:
            r1 = n_rows
        s0 = blk * row_len // n_blk
        s1 = (blk + 1) * row_len // n_blk
        for row in range(r0, r1):
            c = row % C
            _apply(op, a + row * row_len + s0, b + row * row_len + s0,
                   out + row * row_len + s0, s1 - s0,
                   p0 + c, p1 + c, p2 + c, p3 + c, False)


cdef inline void _rows_block_sums(const floating* a, const floating* b, Py_ssize_t A,
                                  Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                                  const double* ka, const double* kb, double* partials,
                                  double* sum_u, double* sum_uv) noexcept nogil:
    # Row path, all rows of channels c0..c1-1: the same row chunks, partials
    # and merge order as _reduce, so fused and unfused results are identical.
    cdef Py_ssize_t n_rchunk = _row_chunks(A, C)
    cdef Py_ssize_t r, c
    for r in range(n_rchunk):
        _rows_sums(a, b, C, r * A // n_rchunk, (r + 1) * A // n_rchunk, c0, c1, ka, kb,
                   0, partials + r * C, partials + (n_rchunk + r) * C)
    for c in range(c0, c1):
        sum_u[c] = _merge(partials + c, n_rchunk, C)
        sum_uv[c] = _merge(partials + n_rchunk * C + c, n_rchunk, C)


cdef void _fused_forward_rows(const floating* x, floating* out, Py_ssize_t A, Py_ssize_t C,
                              const double* shift, double eps, const double* gamma,
                              const double* beta, double* mean, double* var,
                              double* scale, double* offset, double* partials,
                              double* sums, int nthreads) noexcept nogil:
    # Row path, one block of channels per work item: statistics over all rows
    # of the block, then normalize the block while it is still in L2
    # (_row_fuse_blocks keeps a block within ROW_FUSE_BYTES).
    cdef Py_ssize_t n_cblk = _row_fuse_blocks(A, C, sizeof(floating), 2)   # x, out
    cdef Py_ssize_t j, c, c0, c1
    for j in prange(n_cblk, nogil=True, num_threads=nthreads, schedule='dynamic'):
        c0 = j * C // n_cblk
        c1 = (j + 1) * C // n_cblk
        _rows_block_sums(x, x, A, C, c0, c1, shift, shift, partials, sums, sums + C)
        for c in range(c0, c1):
            _forward_coefs(c, sums[c], sums[C + c], shift[c], <double>A, eps, gamma, beta,
                           mean, var, scale, offset)
        _rows_apply(OP_NORMALIZE, x, x, out, C, 0, A, c0, c1, mean, scale, offset, offset,
                    False)


cdef void _fused_backward_rows(const floating* dy, const floating* x, floating* out,
                               Py_ssize_t A, Py_ssize_t C, const double* mean,
                               const double* invstd, const double* gamma,
                               const double* zeros, double* sum_dy, double* sum_dy_xhat,
                               double* k_scale, double* k_mean_dy, double* k_xmu,
                               double* partials, double* sums, int nthreads) noexcept nogil:
    # Row path, one block of channels per work item: reduce over all rows of
    # the block, then the elementwise pass while dy and x are still in L2.
    cdef Py_ssize_t n_cblk = _row_fuse_blocks(A, C, sizeof(floating), 3)   # dy, x, out
    cdef Py_ssize_t j, c, c0, c1
    for j in prange(n_cblk, nogil=True, num_threads=nthreads, schedule='dynamic'):
        c0 = j * C // n_cblk
        c1 = (j + 1) * C // n_cblk
        _rows_block_sums(dy, x, A, C, c0, c1, zeros, mean, partials, sums, sums + C)
        for c in range(c0, c1):
            _backward_coefs(c, sums[c], sums[C + c], <double>A, invstd, gamma, sum_dy,
                            sum_dy_xhat, k_scale, k_mean_dy, k_xmu)
        _rows_apply(OP_BACKWARD, dy, x, out, C, 0, A, c0, c1, mean, k_scale, k_mean_dy,
                    k_xmu, False)


cdef void _fused_forward_channels(const floating* x, floating* out, Py_ssize_t A,
                                  Py_ssize_t C, Py_ssize_t B, const double* shift,
                                  double eps, const double* gamma, const double* beta,
                                  double* mean, double* var, double* scale,
                                  double* offset, double* partials,
                                  int nthreads) noexcept nogil:
    # Channel path, one channel per thread: statistics, then normalize the
    # same channel while it is still in cache.
    cdef Py_ssize_t M = A * B
    cdef Py_ssize_t n_chunk = _chunks_per_channel(M)
    cdef Py_ssize_t c, k, row
    cdef double* part
    for c in prange(C, nogil=True, num_threads=nthreads, schedule='dynamic'):
        part = partials + 2 * c * n_chunk
        for k in range(n_chunk):
            _channel_range_sums(x, x, C, B, c, _chunk_bound(k, n_chunk, A, B),
                                _chunk_bound(k + 1, n_chunk, A, B),
                                shift[c], shift[c], part + 2 * k)
        _forward_coefs(c, _merge(part, n_chunk, 2), _merge(part + 1, n_chunk, 2), shift[c],
                       <double>M, eps, gamma, beta, mean, var, scale, offset)
        for row in range(A):
            _prefetch_row_for_write(out, row, A, C, B, c)
            _apply(OP_NORMALIZE, x + (row * C + c) * B, x, out + (row * C + c) * B, B,
                   mean + c, scale + c, offset + c, offset + c, False)


cdef void _fused_backward_channels(const floating* dy, const floating* x, floating* out,
                                   Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
                                   const double* mean, const double* invstd,
                                   const double* gamma, const double* zeros,
                                   double* sum_dy, double* sum_dy_xhat,
                                   double* k_scale, double* k_mean_dy, double* k_xmu,
                                   double* partials, int nthreads) noexcept nogil:
    # Channel path, one channel per thread: reduce, then the elementwise
    # pass on the same channel while dy and x are still in cache.
    cdef Py_ssize_t M = A * B
    cdef Py_ssize_t n_chunk = _chunks_per_channel(M)
    cdef Py_ssize_t c, k, row
    cdef double* part
    for c in prange(C, nogil=True, num_threads=nthreads, schedule='dynamic'):
        part = partials + 2 * c * n_chunk
        for k in range(n_chunk):
            _channel_range_sums(dy, x, C, B, c, _chunk_bound(k, n_chunk, A, B),
                                _chunk_bound(k + 1, n_chunk, A, B),
                                zeros[c], mean[c], part + 2 * k)
        _backward_coefs(c, _merge(part, n_chunk, 2), _merge(part + 1, n_chunk, 2),
                        <double>M, invstd, gamma, sum_dy, sum_dy_xhat,
                        k_scale, k_mean_dy, k_xmu)
        for row in range(A):
            _prefetch_row_for_write(out, row, A, C, B, c)
            _apply(OP_BACKWARD, dy + (row * C + c) * B, x + (row * C + c) * B,
                   out + (row * C + c) * B, B, mean + c, k_scale + c, k_mean_dy + c,
                   k_xmu + c, False)


# ---------------------------------------------------------------------------
# Helpers for the Python-level kernels
# ---------------------------------------------------------------------------

cdef inline bint _use_fused(Py_ssize_t nbytes, Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
                            Py_ssize_t itemsize, Py_ssize_t n_arrays, int nthreads) noexcept nogil:
    # Whether forward_train (n_arrays = 2: x, out) or backward_train
    # (n_arrays = 3: dy, x, out) runs its fused kernel. Fused and unfused
    # kernels sum in the same chunks and order, so their results agree bitwise.
    if B == 1:
        return _row_fuse_blocks(A, C, itemsize, n_arrays) > 0
    return (nbytes >= FUSE_MIN_BYTES
            and (nthreads == 1 or C >= FUSE_CHANNELS_PER_THREAD * nthreads))


def _partials_buffer(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B):
    if B > 1:
        return np.empty(2 * C * _chunks_per_channel(A * B), dtype=np.float64)
    return np.empty(2 * C * _row_chunks(A, C), dtype=np.float64)


def _first_values(x):
    # The shift K of the shifted sums: each channel's first value, in float64.
    return np.ascontiguousarray(x[0, :, 0], dtype=np.float64)


# Entry points from Python objects: one fused function per driver, whose
# float32 and float64 specializations the callers pick explicitly
# (``f[float](...)`` / ``f[double](...)``) from the dtype; the arrays are
# coerced to typed memoryviews (checking dtype, shape and contiguity) with the
# GIL held, then the driver runs without it.

cdef void _reduce_view(const floating[:, :, ::1] a, const floating[:, :, ::1] b,
                       const double[::1] ka, const double[::1] kb, double[::1] sum_u,
                       double[::1] sum_uv, double[::1] partials, int nthreads) noexcept:
    with nogil:
        _reduce(&a[0, 0, 0], &b[0, 0, 0], a.shape[0], a.shape[1], a.shape[2],
                &ka[0], &kb[0], &sum_u[0], &sum_uv[0], &partials[0], nthreads)


cdef void _elementwise_view(int op, const floating[:, :, ::1] a, const floating[:, :, ::1] b,
                            floating[:, :, ::1] out, const double[::1] p0,
                            const double[::1] p1, const double[::1] p2,
                            const double[::1] p3, int nthreads) noexcept:
    with nogil:
        _elementwise(op, &a[0, 0, 0], &b[0, 0, 0], &out[0, 0, 0],
                     a.shape[0], a.shape[1], a.shape[2],
                     &p0[0], &p1[0], &p2[0], &p3[0], nthreads)


def _reduce_py(a, b, ka, kb):
    """Per-channel ``sum(a - ka)`` and ``sum((a - ka) * (b - kb))`` in float64."""
    cdef Py_ssize_t A = a.shape[0], C = a.shape[1], B = a.shape[2]
    cdef int nthreads = _threads_for(A * C * B)
    sum_u = np.empty(C, dtype=np.float64)
    sum_uv = np.empty(C, dtype=np.float64)
    partials = _partials_buffer(A, C, B)
    if a.dtype == np.float32:
        _reduce_view[float](a, b, ka, kb, sum_u, sum_uv, partials, nthreads)
    else:
        _reduce_view[double](a, b, ka, kb, sum_u, sum_uv, partials, nthreads)
    return sum_u, sum_uv


def _elementwise_py(int op, a, b, out, p0, p1, p2, p3):
    """Apply elementwise ``op`` (an ``OP_*`` code) over the whole array."""
    cdef int nthreads = _threads_for(a.size)
    if a.dtype == np.float32:
        _elementwise_view[float](op, a, b, out, p0, p1, p2, p3, nthreads)
    else:
        _elementwise_view[double](op, a, b, out, p0, p1, p2, p3, nthreads)


def _channel_vector(v):
    return np.ascontiguousarray(v, dtype=np.float64)


# ---------------------------------------------------------------------------
# The kernels of the contract
# ---------------------------------------------------------------------------

def stats(x):
    """Per-channel mean and biased variance.

    Parameters
    ----------
    x : ndarray, float32 or float64, C-contiguous, shape (A, C, B)

    Returns
    -------
    mean, var : ndarray, float64, shape (C,)
        Shifted sums in float64 (shift = the channel's first value), so a
        constant channel has ``var == 0`` exactly.
    """
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t c
    shift = _first_values(x)
    sum_u, sum_uu = _reduce_py(x, x, shift, shift)
    mean = np.empty(C, dtype=np.float64)
    var = np.empty(C, dtype=np.float64)
    cdef double[::1] mean_v = mean, var_v = var, shift_v = shift
    cdef double[::1] sum_u_v = sum_u, sum_uu_v = sum_uu
    cdef double[::1] scratch = np.empty(C, dtype=np.float64)
    cdef double[::1] ones = np.ones(C, dtype=np.float64)
    for c in range(C):
        _forward_coefs(c, sum_u_v[c], sum_uu_v[c], shift_v[c], <double>(A * B), 0.0,
                       &ones[0], &ones[0], &mean_v[0], &var_v[0], &scratch[0], &scratch[0])
    return mean, var


def normalize(x, mean, invstd, gamma, beta, out):
    """``out = (x - mean) * invstd * gamma + beta``, computed in float64.

    Parameters
    ----------
    x, out : ndarray, shape (A, C, B), one dtype (float32 or float64)
    mean, invstd, gamma, beta : ndarray, float64, shape (C,)

    Returns
    -------
    None
        The result is written into ``out``.
    """
    mean = _channel_vector(mean)
    scale = _channel_vector(invstd) * _channel_vector(gamma)
    beta = _channel_vector(beta)
    _elementwise_py(OP_NORMALIZE, x, x, out, mean, scale, beta, beta)


# ---------------------------------------------------------------------------
# Training and evaluation entry points: the arrays become typed memoryviews
# once, everything else (shifts, coefficients, partial sums, the running
# statistics) happens in one nogil driver on a malloc'd scratch block.
# ---------------------------------------------------------------------------

cdef enum:
    RUNNING_NONE = 0
    RUNNING_F32 = 1
    RUNNING_F64 = 2


cdef inline Py_ssize_t _partials_size(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B) noexcept nogil:
    if B > 1:
        return 2 * C * _chunks_per_channel(A * B)
    return 2 * C * _row_chunks(A, C)


cdef inline void _update_running(Py_ssize_t C, double M, const double* mean,
                                 const double* var, void* rm, void* rv, int kind,
                                 double momentum) noexcept nogil:
    # PyTorch's rule: running = (1 - momentum) * running + momentum * batch,
    # with the unbiased batch variance var * M / (M - 1); in float64.
    cdef double keep = 1.0 - momentum
    cdef double unbias = M / (M - 1.0)
    cdef Py_ssize_t c
    cdef float* rm32 = <float*>rm
    cdef float* rv32 = <float*>rv
    cdef double* rm64 = <double*>rm
    cdef double* rv64 = <double*>rv
    if kind == RUNNING_F32:
        for c in range(C):
            rm32[c] = <float>(keep * <double>rm32[c] + momentum * mean[c])
            rv32[c] = <float>(keep * <double>rv32[c] + momentum * (var[c] * unbias))
    elif kind == RUNNING_F64:
        for c in range(C):
            rm64[c] = keep * rm64[c] + momentum * mean[c]
            rv64[c] = keep * rv64[c] + momentum * (var[c] * unbias)


cdef int _forward_train_driver(const floating* x, floating* out, Py_ssize_t A, Py_ssize_t C,
                               Py_ssize_t B, double eps, const double* gamma,
                               const double* beta, double* mean, double* invstd, void* rm,
                               void* rv, int kind, double momentum) noexcept nogil:
    # Statistics (fused with the normalize pass where the shape allows),
    # invstd, the running statistics, normalize. Returns -1 when out of memory.
    cdef int nthreads = _threads_for(A * C * B)
    cdef Py_ssize_t n_part = _partials_size(A, C, B)
    cdef Py_ssize_t c
    cdef double M = <double>(A * B)
    cdef double* buf = <double*>malloc((6 * C + n_part) * sizeof(double))
    cdef double* shift
    cdef double* var
    cdef double* scale
    cdef double* offset
    cdef double* sums
    cdef double* partials
    if buf == NULL:
        return -1
    shift = buf
    var = buf + C
    scale = buf + 2 * C
    offset = buf + 3 * C
    sums = buf + 4 * C
    partials = buf + 6 * C
    for c in range(C):
        shift[c] = <double>x[c * B]          # x[0, c, 0], the shift of the sums
    if _use_fused(A * C * B * <Py_ssize_t>sizeof(floating), A, C, B, sizeof(floating), 2,
                  nthreads):
        if B == 1:
            _fused_forward_rows(x, out, A, C, shift, eps, gamma, beta, mean, var, scale,
                                offset, partials, sums, nthreads)
        else:
            _fused_forward_channels(x, out, A, C, B, shift, eps, gamma, beta, mean, var,
                                    scale, offset, partials, nthreads)
    else:
        _reduce(x, x, A, C, B, shift, shift, sums, sums + C, partials, nthreads)
        for c in range(C):
            _forward_coefs(c, sums[c], sums[C + c], shift[c], M, eps, gamma, beta, mean, var,
                           scale, offset)
        _elementwise(OP_NORMALIZE, x, x, out, A, C, B, mean, scale, offset, offset, nthreads)
    for c in range(C):
        invstd[c] = 1.0 / sqrt(var[c] + eps)
    _update_running(C, M, mean, var, rm, rv, kind, momentum)
    free(buf)
    return 0


cdef int _backward_driver(const floating* dy, const floating* x, floating* out, Py_ssize_t A,
                          Py_ssize_t C, Py_ssize_t B, const double* mean,
                          const double* invstd, const double* gamma, double* sum_dy,
                          double* sum_dy_xhat, bint training) noexcept nogil:
    # training: the simplified backward (fused where the shape allows);
    # otherwise the evaluation backward dx = dy * gamma * invstd. Both return
    # sum(dy) and invstd * sum(dy * (x - mean)). -1 when out of memory.
    cdef int nthreads = _threads_for(A * C * B)
    cdef Py_ssize_t n_part = _partials_size(A, C, B)
    cdef Py_ssize_t c
    cdef double M = <double>(A * B)
    cdef double* buf = <double*>malloc((6 * C + n_part) * sizeof(double))
    cdef double* zeros
    cdef double* k_scale
    cdef double* k_mean_dy
    cdef double* k_xmu
    cdef double* sums
    cdef double* partials
    if buf == NULL:
        return -1
    zeros = buf
    k_scale = buf + C
    k_mean_dy = buf + 2 * C
    k_xmu = buf + 3 * C
    sums = buf + 4 * C
    partials = buf + 6 * C
    for c in range(C):
        zeros[c] = 0.0
    if training and _use_fused(A * C * B * <Py_ssize_t>sizeof(floating), A, C, B,
                               sizeof(floating), 3, nthreads):
        if B == 1:
            _fused_backward_rows(dy, x, out, A, C, mean, invstd, gamma, zeros, sum_dy,
                                 sum_dy_xhat, k_scale, k_mean_dy, k_xmu, partials, sums,
                                 nthreads)
        else:
            _fused_backward_channels(dy, x, out, A, C, B, mean, invstd, gamma, zeros, sum_dy,
                                     sum_dy_xhat, k_scale, k_mean_dy, k_xmu, partials,
                                     nthreads)
    else:
        _reduce(dy, x, A, C, B, zeros, mean, sums, sums + C, partials, nthreads)
        for c in range(C):
            _backward_coefs(c, sums[c], sums[C + c], M, invstd, gamma, sum_dy, sum_dy_xhat,
                            k_scale, k_mean_dy, k_xmu)
        if training:
            _elementwise(OP_BACKWARD, dy, x, out, A, C, B, mean, k_scale, k_mean_dy, k_xmu,
                         nthreads)
        else:
            # dx = (dy - 0) * (gamma * invstd) + 0
            _elementwise(OP_NORMALIZE, dy, dy, out, A, C, B, zeros, k_scale, zeros, zeros,
                         nthreads)
    free(buf)
    return 0


cdef int _forward_eval_driver(const floating* x, floating* out, Py_ssize_t A, Py_ssize_t C,
                              Py_ssize_t B, double eps, const double* gamma,
                              const double* beta, double* mean, double* invstd,
                              const void* rm, const void* rv, int kind) noexcept nogil:
    # mean = running_mean, invstd = 1 / sqrt(running_var + eps), normalize.
    cdef int nthreads = _threads_for(A * C * B)
    cdef Py_ssize_t c
    cdef double* scale = <double*>malloc(C * sizeof(double))
    if scale == NULL:
        return -1
    for c in range(C):
        if kind == RUNNING_F32:
            mean[c] = <double>(<const float*>rm)[c]
            invstd[c] = 1.0 / sqrt(<double>(<const float*>rv)[c] + eps)
        else:
            mean[c] = (<const double*>rm)[c]
            invstd[c] = 1.0 / sqrt((<const double*>rv)[c] + eps)
        scale[c] = invstd[c] * gamma[c]
    _elementwise(OP_NORMALIZE, x, x, out, A, C, B, mean, scale, beta, beta, nthreads)
    free(scale)
    return 0


cdef inline void* _running_pointer(array, int kind) except NULL:
    # A typed memoryview of a float32/float64 C-contiguous running statistic.
    cdef float[::1] view32
    cdef double[::1] view64
    if kind == RUNNING_F32:
        view32 = array
        return &view32[0]
    view64 = array
    return &view64[0]


def forward_train(x, gamma, beta, double eps, out, running_mean=None, running_var=None,
                  double momentum=0.1):
    """Training forward: statistics, normalize into ``out``, running statistics.

    Fused per channel (block) where the shape allows: a channel is reduced
    and normalized back to back, so ``x`` is read from memory once. The
    running statistics (float32 or float64 arrays directly, other dtypes
    through a float64 copy) are updated in the same nogil driver, PyTorch's
    way (unbiased batch variance).

    Parameters
    ----------
    x, out : ndarray, shape (A, C, B), one dtype (float32 or float64)
    gamma, beta : ndarray, float64, shape (C,)
    eps : float
    running_mean, running_var : ndarray, shape (C,), or None
    momentum : float

    Returns
    -------
    mean, invstd : ndarray, float64, shape (C,)
    """
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef const double[::1] gamma_v = gamma
    cdef const double[::1] beta_v = beta
    mean = np.empty(C)
    invstd = np.empty(C)
    cdef double[::1] mean_v = mean
    cdef double[::1] invstd_v = invstd
    cdef const float[:, :, ::1] x32
    cdef float[:, :, ::1] out32
    cdef const double[:, :, ::1] x64
    cdef double[:, :, ::1] out64
    cdef int kind = RUNNING_NONE
    cdef void* rm_p = NULL
    cdef void* rv_p = NULL
    cdef int status
    if running_mean is not None:
        rm, rv, _ = running_arrays(running_mean, running_var, mean, invstd)
        kind = RUNNING_F32 if rm.itemsize == 4 else RUNNING_F64
        rm_p = _running_pointer(rm, kind)
        rv_p = _running_pointer(rv, kind)
    if x.itemsize == 4:
        x32 = x
        out32 = out
        with nogil:
            status = _forward_train_driver(&x32[0, 0, 0], &out32[0, 0, 0], A, C, B, eps,
                                           &gamma_v[0], &beta_v[0], &mean_v[0], &invstd_v[0],
                                           rm_p, rv_p, kind, momentum)
    else:
        x64 = x
        out64 = out
        with nogil:
            status = _forward_train_driver(&x64[0, 0, 0], &out64[0, 0, 0], A, C, B, eps,
                                           &gamma_v[0], &beta_v[0], &mean_v[0], &invstd_v[0],
                                           rm_p, rv_p, kind, momentum)
    if status != 0:
        raise MemoryError()
    if kind != RUNNING_NONE and rm is not running_mean:
        running_mean[...] = rm
        running_var[...] = rv
    return mean, invstd


def forward_eval(x, gamma, beta, running_mean, running_var, double eps, out):
    """Evaluation forward: normalize with the running statistics.

    Returns
    -------
    mean, invstd : ndarray, float64, shape (C,)
        ``running_mean`` and ``1 / sqrt(running_var + eps)``.
    """
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef const double[::1] gamma_v = gamma
    cdef const double[::1] beta_v = beta
    mean = np.empty(C)
    invstd = np.empty(C)
    cdef double[::1] mean_v = mean
    cdef double[::1] invstd_v = invstd
    cdef const float[:, :, ::1] x32
    cdef float[:, :, ::1] out32
    cdef const double[:, :, ::1] x64
    cdef double[:, :, ::1] out64
    cdef const float[::1] rm32, rv32
    cdef const double[::1] rm64, rv64
    cdef const void* rm_p
    cdef const void* rv_p
    cdef int kind, status
    rm, rv = readable_running(running_mean, running_var)
    if rm.dtype != rv.dtype or rm.itemsize != 8:
        rm = np.ascontiguousarray(rm, dtype=np.float64)
        rv = np.ascontiguousarray(rv, dtype=np.float64)
    rm64 = rm
    rv64 = rv
    rm_p = &rm64[0]
    rv_p = &rv64[0]
    kind = RUNNING_F64
    if x.itemsize == 4:
        x32 = x
        out32 = out
        with nogil:
            status = _forward_eval_driver(&x32[0, 0, 0], &out32[0, 0, 0], A, C, B, eps,
                                          &gamma_v[0], &beta_v[0], &mean_v[0], &invstd_v[0],
                                          rm_p, rv_p, kind)
    else:
        x64 = x
        out64 = out
        with nogil:
            status = _forward_eval_driver(&x64[0, 0, 0], &out64[0, 0, 0], A, C, B, eps,
                                          &gamma_v[0], &beta_v[0], &mean_v[0], &invstd_v[0],
                                          rm_p, rv_p, kind)
    if status != 0:
        raise MemoryError()
    return mean, invstd


def _backward(dy, x, mean, invstd, gamma, out, bint training):
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef const double[::1] mean_v = mean
    cdef const double[::1] invstd_v = invstd
    cdef const double[::1] gamma_v = gamma
    sum_dy = np.empty(C)
    sum_dy_xhat = np.empty(C)
    cdef double[::1] sum_dy_v = sum_dy
    cdef double[::1] sum_dy_xhat_v = sum_dy_xhat
    cdef const float[:, :, ::1] dy32, x32
    cdef float[:, :, ::1] out32
    cdef const double[:, :, ::1] dy64, x64
    cdef double[:, :, ::1] out64
    cdef int status
    if x.itemsize == 4:
        dy32 = dy
        x32 = x
        out32 = out
        with nogil:
            status = _backward_driver(&dy32[0, 0, 0], &x32[0, 0, 0], &out32[0, 0, 0], A, C, B,
                                      &mean_v[0], &invstd_v[0], &gamma_v[0], &sum_dy_v[0],
                                      &sum_dy_xhat_v[0], training)
    else:
        dy64 = dy
        x64 = x
        out64 = out
        with nogil:
            status = _backward_driver(&dy64[0, 0, 0], &x64[0, 0, 0], &out64[0, 0, 0], A, C, B,
                                      &mean_v[0], &invstd_v[0], &gamma_v[0], &sum_dy_v[0],
                                      &sum_dy_xhat_v[0], training)
    if status != 0:
        raise MemoryError()
    return sum_dy, sum_dy_xhat


def backward_eval(dy, x, mean, invstd, gamma, out):
    """Evaluation backward ``dx = dy * gamma * invstd``, and the two sums.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)
    """
    return _backward(dy, x, mean, invstd, gamma, out, False)


def backward_reduce(dy, x, mean, invstd):
    """Per-channel ``sum_dy`` and ``sum_dy_xhat``.

    Parameters
    ----------
    dy, x : ndarray, shape (A, C, B), one dtype (float32 or float64)
    mean, invstd : ndarray, float64, shape (C,)

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)
        ``sum(dy)`` and ``invstd * sum(dy * (x - mean))``.
    """
    mean = _channel_vector(mean)
    invstd = _channel_vector(invstd)
    zeros = np.zeros(x.shape[1], dtype=np.float64)
    sum_dy, sum_dy_xmu = _reduce_py(dy, x, zeros, mean)
    return sum_dy, sum_dy_xmu * invstd


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``.

    Parameters
    ----------
    dy, x, out : ndarray, shape (A, C, B), one dtype (float32 or float64)
    mean, invstd, gamma, sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)

    Returns
    -------
    None
        The result is written into ``out``; ``M = A * B``.
    """
    cdef Py_ssize_t C = x.shape[1], c
    cdef double M = <double>(x.shape[0] * x.shape[2])
    cdef double[::1] invstd_v = _channel_vector(invstd), gamma_v = _channel_vector(gamma)
    cdef double[::1] sum_dy_v = _channel_vector(sum_dy)
    cdef double[::1] sum_dy_xhat_v = _channel_vector(sum_dy_xhat)
    k_scale = np.empty(C, dtype=np.float64)
    k_mean_dy = np.empty(C, dtype=np.float64)
    k_xmu = np.empty(C, dtype=np.float64)
    cdef double[::1] k_scale_v = k_scale, k_mean_dy_v = k_mean_dy, k_xmu_v = k_xmu
    for c in range(C):
        _elemt_coefs(c, sum_dy_v[c], sum_dy_xhat_v[c], M, &invstd_v[0], &gamma_v[0],
                     &k_scale_v[0], &k_mean_dy_v[0], &k_xmu_v[0])
    _elementwise_py(OP_BACKWARD, dy, x, out, _channel_vector(mean), k_scale, k_mean_dy, k_xmu)


def backward_train(dy, x, mean, invstd, gamma, out):
    """Simplified backward: reduce, then the elementwise pass, into ``out``.

    Fused per channel (block) where the shape allows: a channel's reduce
    and elementwise passes run back to back, so the second read of ``dy``
    and ``x`` hits the cache.

    Parameters
    ----------
    dy, x, out : ndarray, shape (A, C, B), one dtype (float32 or float64)
    mean, invstd, gamma : ndarray, float64, shape (C,)

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    return _backward(dy, x, mean, invstd, gamma, out, True)


def backward_staged(dy, x, mean, invstd, gamma, eps, out):
    """The staged (cs231n) backward graph, one parallel pass per stage.

    Every full-size stage writes an intermediate of ``x.dtype``; reductions
    accumulate in float64. It stays staged on purpose: it is the baseline
    that the simplified backward is measured against.

    Parameters
    ----------
    dy, x, out : ndarray, shape (A, C, B), one dtype (float32 or float64)
    mean, invstd, gamma : ndarray, float64, shape (C,)
    eps : float
        Unused: ``invstd`` already holds ``1 / sqrt(var + eps)``.

    Returns
    -------
    dgamma, dbeta : ndarray, float64, shape (C,)
    """
    M = x.shape[0] * x.shape[2]
    mean = _channel_vector(mean)
    invstd = _channel_vector(invstd)
    gamma = _channel_vector(gamma)
    zeros = np.zeros(x.shape[1], dtype=np.float64)

    def elementwise(op, a, b, p, dst):
        _elementwise_py(op, a, b, dst, p, p, p, p)

    def channel_sum(a, b=None):
        # sum(a) or sum(a * b) per channel, float64
        sum_a, sum_ab = _reduce_py(a, a if b is None else b, zeros, zeros)
        return sum_a if b is None else sum_ab

    xmu = np.empty_like(x)
    elementwise(OP_SUB, x, x, mean, xmu)                  # xmu = x - mean
    xhat = np.empty_like(x)
    elementwise(OP_MUL, xmu, xmu, invstd, xhat)           # xhat = xmu * invstd
    dbeta = channel_sum(dy)                               # step 9
    dgamma = channel_sum(dy, xhat)                        # step 8
    dxhat = xhat                                          # (xhat is no longer needed)
    elementwise(OP_MUL, dy, dy, gamma, dxhat)             # dxhat = dy * gamma
    divar = channel_sum(dxhat, xmu)                       # step 7
    dxmu1 = np.empty_like(x)
    elementwise(OP_MUL, dxhat, dxhat, invstd, dxmu1)      # dxmu1 = dxhat * invstd
    dsqrtvar = -invstd ** 2 * divar                       # step 6
    dvar = 0.5 * invstd * dsqrtvar                        # step 5
    dsq = dxhat                                           # (dxhat is no longer needed)
    elementwise(OP_FILL, dsq, dsq, dvar / M, dsq)         # step 4: dsq = dvar / M
    dxmu2 = np.empty_like(x)
    elementwise(OP_TWO_MUL, xmu, dsq, zeros, dxmu2)       # step 3: dxmu2 = 2 * xmu * dsq
    dx1 = dsq                                             # (dsq is no longer needed)
    _elementwise_py(OP_ADD, dxmu1, dxmu2, dx1, zeros, zeros, zeros, zeros)  # step 2
    dmu = -channel_sum(dx1)                               # step 2: dmu = -sum(dx1)
    elementwise(OP_ADD_P, dx1, dx1, dmu / M, out)         # steps 1, 0: dx = dx1 + dmu / M
    return dgamma, dbeta
