# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# Reductions on one thread: per-channel float64 sums of u = a - ka and
# u * v, v = b - kb, over one piece of a channel (channel path) or over rows
# of a block of channels (row path).
#
# The fused ReLU (ys, yb not NULL: the forward's scale and offset per
# channel) masks a (= dy) by y(b) > 0 first, b = x and kb = the mean, with
# the forward's own arithmetic (formulas.pxd). Summation orders depend on
# the sizes only.

from .blocks cimport CACHE_LINE, COL_BLOCK, LANES, PREFETCH_BYTES, ROW_BLOCK
from .cpu cimport fastbn_prefetch, fastbn_prefetch_write
from .formulas cimport mask_dy, split, y_f32, y_f64
from .half cimport bf16_t, f16_t, floating, load, storage, stored_as_zero


cdef extern from "_cython/lanes.h":
    # float64 lanes of float32 data, in registers (see lanes.h): over n
    # values, lane i % F32_LANES adds u = a - ka and u * v, v = b - kb, in
    # float64; then acc_u[j] += lane j, acc_uv[j] likewise.
    enum: F32_LANES "FASTBN_F32_LANES"
    void sums_f32 "fastbn_sums_f32"(const float* a, const float* b, Py_ssize_t n,
                                    double ka, double kb, double* acc_u,
                                    double* acc_uv) noexcept nogil


cdef inline void mask_block_f32(float* dst, const float* dy, const float* x, Py_ssize_t n,
                                float mean_hi, float mean_lo, float scale, float offset,
                                float floor) noexcept nogil:
    # The fused ReLU's dy, one channel, float32 (dst may be dy); floor: the
    # storage's stored_as_zero.
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = mask_dy(dy[i], y_f32(x[i], mean_hi, mean_lo, scale, offset), floor)


cdef inline void mask_block_f64(double* dst, const double* dy, const double* x, Py_ssize_t n,
                                double mean, double scale, double offset) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = mask_dy(dy[i], y_f64(x[i], mean, scale, offset), 0.0)


# ---------------------------------------------------------------------------
# Channel path: contiguous segments into LANES float64 lanes
# ---------------------------------------------------------------------------

cdef inline void lane_sums(const floating* a, const floating* b, Py_ssize_t m, double ka,
                           double kb, double* acc_u, double* acc_uv) noexcept nogil:
    # acc_u[j] += u, acc_uv[j] += u * v for u = a[j] - ka, v = b[j] - kb (float64).
    cdef Py_ssize_t j
    cdef double u
    if a == b and ka == kb:
        for j in range(m):
            u = <double>a[j] - ka
            acc_u[j] += u
            acc_uv[j] += u * u
        return
    for j in range(m):
        u = <double>a[j] - ka
        acc_u[j] += u
        acc_uv[j] += u * (<double>b[j] - kb)


cdef inline void lane_sums4(const floating* a, const floating* b, double ka, double kb,
                            double* acc_u, double* acc_uv) noexcept nogil:
    # Four consecutive blocks of LANES values (a[0 : 4 * LANES]) into the
    # lanes, added in block order: bit for bit four lane_sums calls, with a
    # quarter of the accumulator loads and stores.
    cdef Py_ssize_t j
    cdef double u0, u1, u2, u3
    if a == b and ka == kb:
        # statistics: v == u (the same values as the general loop, less work)
        for j in range(LANES):
            u0 = <double>a[j] - ka
            u1 = <double>a[LANES + j] - ka
            u2 = <double>a[2 * LANES + j] - ka
            u3 = <double>a[3 * LANES + j] - ka
            acc_u[j] = (((acc_u[j] + u0) + u1) + u2) + u3
            acc_uv[j] = (((acc_uv[j] + u0 * u0) + u1 * u1) + u2 * u2) + u3 * u3
        return
    for j in range(LANES):
        u0 = <double>a[j] - ka
        u1 = <double>a[LANES + j] - ka
        u2 = <double>a[2 * LANES + j] - ka
        u3 = <double>a[3 * LANES + j] - ka
        acc_u[j] = (((acc_u[j] + u0) + u1) + u2) + u3
        acc_uv[j] = ((((acc_uv[j] + u0 * (<double>b[j] - kb))
                       + u1 * (<double>b[LANES + j] - kb))
                      + u2 * (<double>b[2 * LANES + j] - kb))
                     + u3 * (<double>b[3 * LANES + j] - kb))


cdef inline void lanes(const floating* a, const floating* b, Py_ssize_t m, double ka,
                       double kb, double* acc_u, double* acc_uv) noexcept nogil:
    # m == 4 * LANES: lane_sums4; otherwise m <= LANES values, lane_sums.
    if m == 4 * LANES:
        lane_sums4(a, b, ka, kb, acc_u, acc_uv)
    else:
        lane_sums(a, b, m, ka, kb, acc_u, acc_uv)


cdef inline void lanes_f32(const float* a, const float* b, Py_ssize_t m, double ka,
                           double kb, double* acc_u, double* acc_uv, bint same) noexcept nogil:
    # As lanes for the float32 values of 16-bit data, in float32 blocks
    # merged in float64: u = (a - ka_hi) - ka_lo and v likewise (split
    # shifts, so the centring is accurate to float32 rounding), and for
    # m == 4 * LANES the four blocks' u and u * v are added in float32 in a
    # fixed tree before one float64 addition per lane. With `same` (a == b
    # and ka == kb: statistics) v == u.
    cdef Py_ssize_t j
    cdef float ka_hi, ka_lo, kb_hi, kb_lo
    cdef float u0, u1, u2, u3, v0, v1, v2, v3
    split(ka, &ka_hi, &ka_lo)
    split(kb, &kb_hi, &kb_lo)
    if m == 4 * LANES:
        if same:
            for j in range(LANES):
                u0 = (a[j] - ka_hi) - ka_lo
                u1 = (a[LANES + j] - ka_hi) - ka_lo
                u2 = (a[2 * LANES + j] - ka_hi) - ka_lo
                u3 = (a[3 * LANES + j] - ka_hi) - ka_lo
                acc_u[j] += <double>((u0 + u1) + (u2 + u3))
                acc_uv[j] += <double>((u0 * u0 + u1 * u1) + (u2 * u2 + u3 * u3))
        else:
            for j in range(LANES):
                u0 = (a[j] - ka_hi) - ka_lo
                u1 = (a[LANES + j] - ka_hi) - ka_lo
                u2 = (a[2 * LANES + j] - ka_hi) - ka_lo
                u3 = (a[3 * LANES + j] - ka_hi) - ka_lo
                v0 = (b[j] - kb_hi) - kb_lo
                v1 = (b[LANES + j] - kb_hi) - kb_lo
                v2 = (b[2 * LANES + j] - kb_hi) - kb_lo
                v3 = (b[3 * LANES + j] - kb_hi) - kb_lo
                acc_u[j] += <double>((u0 + u1) + (u2 + u3))
                acc_uv[j] += <double>((u0 * v0 + u1 * v1) + (u2 * v2 + u3 * v3))
    else:
        for j in range(m):
            u0 = (a[j] - ka_hi) - ka_lo
            v0 = (b[j] - kb_hi) - kb_lo
            acc_u[j] += <double>u0
            acc_uv[j] += <double>(u0 * v0)


cdef inline void segment_sums(const storage* a, const storage* b, Py_ssize_t n,
                              double ka, double kb, double* acc_u, double* acc_uv,
                              const storage* ahead_a, const storage* ahead_b,
                              const double* relu) noexcept nogil:
    # acc_u[j] += u, acc_uv[j] += u * v for u = a - ka, v = b - kb, in float64,
    # with value i going to lane j = i % LANES, blocks of LANES values added
    # in order (four at a time while four remain). The lanes are independent,
    # so this is an elementwise loop that vectorizes without -ffast-math,
    # and its summation order depends on n only. ahead_a/ahead_b (or NULL):
    # the segment read next, prefetched block by block as this one is read.
    # relu (or NULL): {scale, offset} of the channel's forward normalize;
    # a (= dy) is then masked by y(b) > 0 (b = x, kb = the mean). 16-bit
    # data (and masked data) go through float32 (float64) buffers in L1;
    # 16-bit data are summed in float32 blocks merged in float64
    # (lanes_f32): float32 accuracy, half the float64 work. float32 data
    # (unmasked) are summed in float64 by sums_f32 into the first F32_LANES
    # lanes, which it keeps in registers while it reads a and b in order.
    cdef Py_ssize_t start, m, line
    cdef Py_ssize_t per_line = CACHE_LINE // <Py_ssize_t>sizeof(storage)
    cdef float buf_a[4 * LANES]
    cdef float buf_b[4 * LANES]
    cdef double buf_d[4 * LANES]
    cdef float mean_hi = 0, mean_lo = 0, scale = 0, offset = 0
    if relu != NULL:
        split(kb, &mean_hi, &mean_lo)
        scale = <float>relu[0]
        offset = <float>relu[1]
    start = 0
    while start < n:
        m = n - start
        if m >= 4 * LANES:
            m = 4 * LANES
        elif m > LANES:
            m = LANES
        if ahead_a != NULL and not (storage is float):
            # (float32 data read in order by sums_f32 are prefetched well by
            # the hardware; measured 10-20% faster without these)
            for line in range((m + per_line - 1) // per_line):
                fastbn_prefetch(ahead_a + start + line * per_line)
                fastbn_prefetch(ahead_b + start + line * per_line)
        if storage is double:
            if relu == NULL:
                lanes(a + start, b + start, m, ka, kb, acc_u, acc_uv)
            else:
                mask_block_f64(buf_d, a + start, b + start, m, kb, relu[0], relu[1])
                lanes(<const double*>buf_d, b + start, m, ka, kb, acc_u, acc_uv)
        elif storage is float:
            if relu == NULL:
                sums_f32(a + start, b + start, m, ka, kb, acc_u, acc_uv)
            else:
                mask_block_f32(buf_a, a + start, b + start, m, mean_hi, mean_lo, scale, offset,
                               0)
                lanes(<const float*>buf_a, b + start, m, ka, kb, acc_u, acc_uv)
        else:
            load(a + start, buf_a, m)
            if a == b and relu == NULL:
                lanes_f32(buf_a, buf_a, m, ka, kb, acc_u, acc_uv, ka == kb)
            else:
                load(b + start, buf_b, m)
                if relu != NULL:
                    mask_block_f32(buf_a, buf_a, buf_b, m, mean_hi, mean_lo, scale, offset,
                                   stored_as_zero(a))
                lanes_f32(buf_a, buf_b, m, ka, kb, acc_u, acc_uv, False)
        start += m


cdef inline void channel_range_sums(const storage* a, const storage* b,
                                    Py_ssize_t C, Py_ssize_t B, Py_ssize_t c,
                                    Py_ssize_t m0, Py_ssize_t m1,
                                    double ka, double kb, double* dst,
                                    const double* ys, const double* yb) noexcept nogil:
    # dst[0] = sum(a - ka), dst[1] = sum((a - ka) * (b - kb)) over the values
    # m0 <= m < m1 of channel c (m = row * B + col), walking its contiguous
    # segments into LANES float64 lanes, then adding the lanes in order.
    # The segments are C * B apart, too far for the hardware prefetcher to
    # follow, so the same columns `rows_ahead` rows further are prefetched.
    # ys, yb (or NULL): the fused ReLU.
    cdef double acc_u[LANES]
    cdef double acc_uv[LANES]
    cdef double shift_a[COL_BLOCK]
    cdef double shift_b[COL_BLOCK]
    cdef double col_ys[COL_BLOCK]
    cdef double col_yb[COL_BLOCK]
    cdef double relu[2]
    cdef double* shift_b_ptr
    cdef Py_ssize_t m = m0
    cdef Py_ssize_t end_row = (m1 - 1) // B + 1   # rows of this range: 0..end_row-1
    cdef Py_ssize_t rows_ahead = PREFETCH_BYTES // (B * <Py_ssize_t>sizeof(storage))
    cdef Py_ssize_t row, col, n, offset, j
    cdef const storage* ahead_a
    cdef const storage* ahead_b
    cdef const double* relu_ptr = NULL
    if rows_ahead < 1:
        rows_ahead = 1
    if B <= COL_BLOCK and m0 % B == 0 and m1 % B == 0:
        # Short segments: the channel's rows m0 / B .. m1 / B - 1 as a matrix
        # of B columns with rows C * B apart; rows_sums adds four rows per
        # pass into per-column float64 sums, which are then added in order.
        for j in range(B):
            shift_a[j] = ka
            shift_b[j] = kb
            if ys != NULL:
                col_ys[j] = ys[c]
                col_yb[j] = yb[c]
        shift_b_ptr = shift_b
        if kb == ka:
            shift_b_ptr = shift_a     # lets rows_sums see a == b (statistics)
        rows_sums(a + c * B, b + c * B, C * B, m0 // B, m1 // B, 0, B, shift_a,
                  shift_b_ptr, rows_ahead, acc_u, acc_uv,
                  col_ys if ys != NULL else NULL, col_yb if ys != NULL else NULL)
        dst[0] = 0.0
        dst[1] = 0.0
        for j in range(B):
            dst[0] += acc_u[j]
            dst[1] += acc_uv[j]
        return
    if ys != NULL:
        relu[0] = ys[c]
        relu[1] = yb[c]
        relu_ptr = relu
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
        segment_sums(a + offset, b + offset, n, ka, kb, acc_u, acc_uv, ahead_a, ahead_b,
                     relu_ptr)
        m += n
    dst[0] = 0.0
    dst[1] = 0.0
    for j in range(LANES):
        dst[0] += acc_u[j]
        dst[1] += acc_uv[j]


# ---------------------------------------------------------------------------
# Row path: rows of a block of channels, four rows at a time
# ---------------------------------------------------------------------------

cdef inline void prefetch_rows(const void* base, Py_ssize_t row_bytes, Py_ssize_t r0,
                               Py_ssize_t r1, Py_ssize_t nbytes, bint for_write) noexcept nogil:
    # Prefetch nbytes from the start of rows r0..r1-1 (rows are row_bytes
    # apart); the column blocks of consecutive rows are far apart, which the
    # hardware prefetcher follows badly.
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


cdef inline void sums_4rows(const floating* a0, const floating* b0, Py_ssize_t stride,
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


cdef inline void sums_1row(const floating* a0, const floating* b0, Py_ssize_t n,
                           const double* shift_a, const double* shift_b,
                           double* acc_u, double* acc_uv) noexcept nogil:
    # One row: acc_u[j] += u, acc_uv[j] += u * v (as sums_4rows).
    cdef Py_ssize_t j
    cdef double u
    for j in range(n):
        u = <double>a0[j] - shift_a[j]
        acc_u[j] += u
        acc_uv[j] += u * (<double>b0[j] - shift_b[j])


cdef inline void rows_sums(const storage* a, const storage* b, Py_ssize_t C,
                           Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                           const double* ka, const double* kb, Py_ssize_t rows_ahead,
                           double* pu, double* puv, const double* ys,
                           const double* yb) noexcept nogil:
    # Rows r0..r1-1 (C values apart) and columns c0..c1-1 (c1 - c0 <= ROW_BLOCK):
    # pu[c] = sum_r u, puv[c] = sum_r u * v with u = a[r, c] - ka[c], v = b[r, c] - kb[c],
    # rows added in order, four at a time from r0. Accumulators and shifts
    # are local arrays (they do not alias a or b), so the loops over columns
    # vectorize. 16-bit data and the fused ReLU go through row buffers in L1,
    # summed in the same order.
    cdef double acc_u[ROW_BLOCK]
    cdef double acc_uv[ROW_BLOCK]
    cdef double shift_a[ROW_BLOCK]
    cdef double shift_b[ROW_BLOCK]
    cdef Py_ssize_t n = c1 - c0
    cdef Py_ssize_t r, j, i, nr
    cdef const storage* a0
    cdef const storage* b0
    cdef bint same = a == b and ka == kb
    cdef bint relu = ys != NULL
    # buffers: 4 rows of a (masked) and b, as float32 or float64
    cdef float fa[4 * ROW_BLOCK]
    cdef float fb[4 * ROW_BLOCK]
    cdef double da[4 * ROW_BLOCK]
    cdef double db[4 * ROW_BLOCK]
    cdef float mean_hi[ROW_BLOCK]
    cdef float mean_lo[ROW_BLOCK]
    cdef float scale[ROW_BLOCK]
    cdef float offset[ROW_BLOCK]
    cdef float* fa_i
    cdef float* fb_i
    cdef float floor = stored_as_zero(a)
    for j in range(n):
        acc_u[j] = 0.0
        acc_uv[j] = 0.0
        shift_a[j] = ka[c0 + j]
        shift_b[j] = kb[c0 + j]
    if (storage is float or storage is double) and not relu:
        r = r0
        while r + 4 <= r1:
            a0 = a + r * C + c0
            b0 = b + r * C + c0
            if rows_ahead > 0 and r + rows_ahead + 4 <= r1:
                # the rows read rows_ahead rows from now
                prefetch_rows(a0 + rows_ahead * C, C * sizeof(storage), 0, 4,
                              n * sizeof(storage), False)
                if not same:
                    prefetch_rows(b0 + rows_ahead * C, C * sizeof(storage), 0, 4,
                                  n * sizeof(storage), False)
            sums_4rows(a0, b0, C, n, shift_a, shift_b, acc_u, acc_uv, same)
            r += 4
        while r < r1:
            sums_1row(a + r * C + c0, b + r * C + c0, n, shift_a, shift_b, acc_u, acc_uv)
            r += 1
    else:
        if relu and not (storage is double):
            for j in range(n):
                split(kb[c0 + j], &mean_hi[j], &mean_lo[j])
                scale[j] = <float>ys[c0 + j]
                offset[j] = <float>yb[c0 + j]
        r = r0
        while r < r1:
            nr = r1 - r
            if nr > 4:
                nr = 4
            if rows_ahead > 0 and r + rows_ahead + 4 <= r1:
                prefetch_rows(a + (r + rows_ahead) * C + c0, C * sizeof(storage), 0, 4,
                              n * sizeof(storage), False)
                if not same:
                    prefetch_rows(b + (r + rows_ahead) * C + c0, C * sizeof(storage), 0, 4,
                                  n * sizeof(storage), False)
            for i in range(nr):
                a0 = a + (r + i) * C + c0
                b0 = b + (r + i) * C + c0
                if storage is double:
                    for j in range(n):
                        db[i * ROW_BLOCK + j] = b0[j]
                        da[i * ROW_BLOCK + j] = mask_dy(
                            a0[j], y_f64(b0[j], kb[c0 + j], ys[c0 + j], yb[c0 + j]), 0.0)
                else:
                    fa_i = fa + i * ROW_BLOCK
                    fb_i = fb + i * ROW_BLOCK
                    load(a0, fa_i, n)
                    if not same:
                        load(b0, fb_i, n)
                    if relu:
                        for j in range(n):
                            fa_i[j] = mask_dy(fa_i[j], y_f32(fb_i[j], mean_hi[j], mean_lo[j],
                                                             scale[j], offset[j]), floor)
            if storage is double:
                if nr == 4:
                    sums_4rows(<const double*>da, <const double*>db, ROW_BLOCK, n, shift_a,
                               shift_b, acc_u, acc_uv, False)
                else:
                    for i in range(nr):
                        sums_1row(<const double*>(da + i * ROW_BLOCK),
                                  <const double*>(db + i * ROW_BLOCK), n, shift_a, shift_b,
                                  acc_u, acc_uv)
            else:
                if same:
                    fb_i = fa
                else:
                    fb_i = fb
                if nr == 4:
                    sums_4rows(<const float*>fa, <const float*>fb_i, ROW_BLOCK, n, shift_a,
                               shift_b, acc_u, acc_uv, same)
                else:
                    for i in range(nr):
                        sums_1row(<const float*>(fa + i * ROW_BLOCK),
                                  <const float*>(fb_i + i * ROW_BLOCK), n, shift_a, shift_b,
                                  acc_u, acc_uv)
            r += nr
    for j in range(n):
        pu[c0 + j] = acc_u[j]
        puv[c0 + j] = acc_uv[j]
