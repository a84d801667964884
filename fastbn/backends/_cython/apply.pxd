# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# Elementwise passes on one thread: one op over a contiguous segment of one
# channel (channel path) or over rows of a block of channels (row path).
#
# OP_NORMALIZE and OP_BACKWARD run in float32 arithmetic for float32 and
# 16-bit data (split means, 16 lanes per AVX-512 op, no conversions) and in
# float64 for float64 data, through the formulas of formulas.pxd; the other
# ops (the staged backward's, on float32 and float64 data) run in float64.
# 16-bit data go through float32 buffers in L1 and each result is rounded
# once into the 16-bit output.

from .blocks cimport CACHE_LINE, CHUNK, COL_BLOCK, PREFETCH_BYTES, ROW_BLOCK, ROWS_AHEAD
from .cpu cimport fastbn_prefetch_write, fastbn_stream
from .formulas cimport dx_f32, dx_f64, mask_dy, relu_value, split, y_f32, y_f64
from .half cimport load, storage, store, stored_as_zero
from .sums cimport prefetch_rows


# What an elementwise pass computes (p0..p3 are per-channel float64).
cdef enum:
    OP_NORMALIZE = 0   # out = (a - p0) * p1 + p2                        (y)
    OP_BACKWARD = 1    # out = p1 * ((a - p2) - (b - p0) * p3), a = dy, b = x  (dx)
    OP_SUB = 2         # out = a - p0
    OP_MUL = 3         # out = a * p0
    OP_FILL = 4        # out = p0
    OP_TWO_MUL = 5     # out = 2 * a * b
    OP_ADD = 6         # out = a + b
    OP_ADD_P = 7       # out = a + p0
    OP_MASK = 8        # out = a where b > p0 (the ReLU's floor), else 0


cdef inline void segment_f32(int op, const float* a, const float* b, float* out,
                             Py_ssize_t n, double p0, double p1, double p2, double p3,
                             bint relu, double ys, double yb, float floor) noexcept nogil:
    # OP_NORMALIZE / OP_BACKWARD with one channel's coefficients, in float32.
    # relu: OP_NORMALIZE gives max(y, 0); OP_BACKWARD masks dy where the
    # forward's y(x) (scale ys, offset yb) > floor, the storage's stored_as_zero.
    cdef Py_ssize_t i
    cdef float mean_hi, mean_lo, k2_hi, k2_lo
    cdef float k1 = <float>p1
    cdef float k3 = <float>p3
    cdef float y_scale = <float>ys
    cdef float y_offset = <float>yb
    split(p0, &mean_hi, &mean_lo)
    split(p2, &k2_hi, &k2_lo)
    if op == OP_NORMALIZE:
        # the offset p2 is not split
        if relu:
            for i in range(n):
                out[i] = relu_value(y_f32(a[i], mean_hi, mean_lo, k1, k2_hi))
        else:
            for i in range(n):
                out[i] = y_f32(a[i], mean_hi, mean_lo, k1, k2_hi)
    elif relu:
        for i in range(n):
            out[i] = dx_f32(mask_dy(a[i], y_f32(b[i], mean_hi, mean_lo, y_scale, y_offset),
                                    floor), b[i], mean_hi, mean_lo, k1, k2_hi, k2_lo, k3)
    else:
        for i in range(n):
            out[i] = dx_f32(a[i], b[i], mean_hi, mean_lo, k1, k2_hi, k2_lo, k3)


cdef inline void segment_f64(int op, const double* a, const double* b, double* out,
                             Py_ssize_t n, double p0, double p1, double p2, double p3,
                             bint relu, double ys, double yb) noexcept nogil:
    # As segment_f32, in float64.
    cdef Py_ssize_t i
    if op == OP_NORMALIZE:
        if relu:
            for i in range(n):
                out[i] = relu_value(y_f64(a[i], p0, p1, p2))
        else:
            for i in range(n):
                out[i] = y_f64(a[i], p0, p1, p2)
    elif relu:
        for i in range(n):
            out[i] = dx_f64(mask_dy(a[i], y_f64(b[i], p0, ys, yb), 0.0), b[i], p0, p1, p2, p3)
    else:
        for i in range(n):
            out[i] = dx_f64(a[i], b[i], p0, p1, p2, p3)


cdef inline void apply_segment(int op, const storage* a, const storage* b, storage* out,
                               Py_ssize_t n, const double* p0, const double* p1,
                               const double* p2, const double* p3,
                               bint per_element, bint relu, const double* ys,
                               const double* yb) noexcept nogil:
    # One elementwise op over n contiguous values of channel p*[0].
    # OP_NORMALIZE / OP_BACKWARD, any storage: relu is the fused ReLU, ys[0] /
    # yb[0] the forward's scale and offset; 16-bit data in blocks of CHUNK
    # values converted to float32, each result rounded once into out. The
    # staged backward's ops (float32 and float64 data only): with
    # per_element (the row path) value i belongs to channel i instead.
    cdef Py_ssize_t i, s, m
    cdef double q0
    cdef double y_scale = ys[0] if relu and op == OP_BACKWARD else 0.0
    cdef double y_offset = yb[0] if relu and op == OP_BACKWARD else 0.0
    cdef float buf_a[CHUNK]
    cdef float buf_b[CHUNK]
    cdef float buf_out[CHUNK]
    if op == OP_NORMALIZE or op == OP_BACKWARD:
        if storage is double:
            segment_f64(op, a, b, out, n, p0[0], p1[0], p2[0], p3[0], relu, y_scale, y_offset)
        elif storage is float:
            segment_f32(op, a, b, out, n, p0[0], p1[0], p2[0], p3[0], relu, y_scale, y_offset,
                        0)
        else:
            s = 0
            while s < n:
                m = n - s
                if m > CHUNK:
                    m = CHUNK
                load(a + s, buf_a, m)
                if op == OP_BACKWARD:
                    load(b + s, buf_b, m)
                segment_f32(op, buf_a, buf_b, buf_out, m, p0[0], p1[0], p2[0], p3[0], relu,
                            y_scale, y_offset, stored_as_zero(out))
                store(buf_out, out + s, m)
                s += m
        return
    if not (storage is float or storage is double):
        return
    # the staged backward's ops, in float64
    if op == OP_SUB:
        if per_element:
            for i in range(n):
                out[i] = <storage>(<double>a[i] - p0[i])
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <storage>(<double>a[i] - q0)
    elif op == OP_MUL:
        if per_element:
            for i in range(n):
                out[i] = <storage>(<double>a[i] * p0[i])
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <storage>(<double>a[i] * q0)
    elif op == OP_FILL:
        if per_element:
            for i in range(n):
                out[i] = <storage>p0[i]
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <storage>q0
    elif op == OP_TWO_MUL:
        for i in range(n):
            out[i] = 2 * a[i] * b[i]
    elif op == OP_ADD:
        for i in range(n):
            out[i] = a[i] + b[i]
    elif op == OP_MASK:
        if per_element:
            for i in range(n):
                out[i] = mask_dy(a[i], b[i], <storage>p0[i])
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = mask_dy(a[i], b[i], <storage>q0)
    elif op == OP_ADD_P:
        if per_element:
            for i in range(n):
                out[i] = <storage>(<double>a[i] + p0[i])
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <storage>(<double>a[i] + q0)


cdef inline void stream_segment(int op, const storage* a, const storage* b, storage* out,
                                Py_ssize_t n, const double* p0, const double* p1,
                                const double* p2, const double* p3, bint relu,
                                const double* ys, const double* yb) noexcept nogil:
    # apply_segment's OP_NORMALIZE / OP_BACKWARD (the same values), written
    # with streaming stores: each block of results goes through an L1 buffer.
    cdef Py_ssize_t s, m
    cdef double y_scale = ys[0] if relu and op == OP_BACKWARD else 0.0
    cdef double y_offset = yb[0] if relu and op == OP_BACKWARD else 0.0
    cdef float buf_a[CHUNK]
    cdef float buf_b[CHUNK]
    cdef float buf_out[CHUNK]
    cdef double buf_f64[CHUNK]
    cdef storage buf_stored[CHUNK]
    s = 0
    while s < n:
        m = n - s
        if m > CHUNK:
            m = CHUNK
        if storage is double:
            segment_f64(op, a + s, b + s, buf_f64, m, p0[0], p1[0], p2[0], p3[0], relu,
                        y_scale, y_offset)
            fastbn_stream(out + s, buf_f64, m * sizeof(double))
        elif storage is float:
            segment_f32(op, a + s, b + s, buf_out, m, p0[0], p1[0], p2[0], p3[0], relu,
                        y_scale, y_offset, 0)
            fastbn_stream(out + s, buf_out, m * sizeof(float))
        else:
            load(a + s, buf_a, m)
            if op == OP_BACKWARD:
                load(b + s, buf_b, m)
            segment_f32(op, buf_a, buf_b, buf_out, m, p0[0], p1[0], p2[0], p3[0], relu,
                        y_scale, y_offset, stored_as_zero(out))
            store(buf_out, buf_stored, m)
            fastbn_stream(out + s, buf_stored, m * sizeof(storage))
        s += m


cdef inline void write_segment(int op, const storage* a, const storage* b, storage* out,
                               Py_ssize_t n, const double* p0, const double* p1,
                               const double* p2, const double* p3, bint relu,
                               const double* ys, const double* yb,
                               bint stream) noexcept nogil:
    # One segment of channel p*[0] (scalar parameters): stream_segment where
    # stream is set and op is OP_NORMALIZE or OP_BACKWARD, else apply_segment.
    if stream and (op == OP_NORMALIZE or op == OP_BACKWARD):
        stream_segment(op, a, b, out, n, p0, p1, p2, p3, relu, ys, yb)
    else:
        apply_segment(op, a, b, out, n, p0, p1, p2, p3, False, relu, ys, yb)


cdef inline void prefetch_row_for_write(storage* out, Py_ssize_t row, Py_ssize_t A,
                                        Py_ssize_t C, Py_ssize_t B, Py_ssize_t c) noexcept nogil:
    # Channel path: the output segments of a channel are C * B apart;
    # prefetch (for writing) the segment PREFETCH_BYTES ahead.
    cdef Py_ssize_t per_line = CACHE_LINE // <Py_ssize_t>sizeof(storage)
    cdef Py_ssize_t rows_ahead = PREFETCH_BYTES // (B * <Py_ssize_t>sizeof(storage))
    cdef Py_ssize_t line
    cdef storage* target
    if rows_ahead < 1:
        rows_ahead = 1
    if row + rows_ahead >= A:
        return
    target = out + ((row + rows_ahead) * C + c) * B
    for line in range((B + per_line - 1) // per_line):
        fastbn_prefetch_write(target + line * per_line)


cdef inline void rows_apply(int op, const storage* a, const storage* b, storage* out,
                            Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                            Py_ssize_t c1, const double* p0, const double* p1,
                            const double* p2, const double* p3,
                            bint prefetch, bint relu, const double* ys,
                            const double* yb, bint stream) noexcept nogil:
    # Row path: `op` on rows r0..r1-1, channels c0..c1-1 (c1 - c0 <= ROW_BLOCK).
    # prefetch: software-prefetch the rows ROWS_AHEAD ahead (off in the fused
    # kernels, whose second pass reads the block from L2).
    # OP_NORMALIZE / OP_BACKWARD: the block's coefficients are copied to local
    # arrays first (they stay in L1 and cannot alias `out`), then each row is
    # one vectorized loop: in float64 for float64 data, in float32 with split
    # means for float32 and 16-bit data (16-bit rows converted to float32
    # buffers and back). relu: as in segment_f32. stream: each row's results
    # go through an L1 buffer and are written with streaming stores.
    cdef double q0[ROW_BLOCK]
    cdef double q1[ROW_BLOCK]
    cdef double q2[ROW_BLOCK]
    cdef double q3[ROW_BLOCK]
    cdef double y1[ROW_BLOCK]
    cdef double y2[ROW_BLOCK]
    cdef float mean_hi[ROW_BLOCK]
    cdef float mean_lo[ROW_BLOCK]
    cdef float k1[ROW_BLOCK]
    cdef float k2_hi[ROW_BLOCK]
    cdef float k2_lo[ROW_BLOCK]
    cdef float k3[ROW_BLOCK]
    cdef float y_k1[ROW_BLOCK]
    cdef float y_k2[ROW_BLOCK]
    cdef float buf_a[ROW_BLOCK]
    cdef float buf_b[ROW_BLOCK]
    cdef float buf_out[ROW_BLOCK]
    cdef double buf_f64[ROW_BLOCK]
    cdef storage buf_stored[ROW_BLOCK]
    cdef double* out64
    cdef Py_ssize_t n = c1 - c0
    cdef Py_ssize_t r, j
    cdef const storage* ar
    cdef const storage* br
    cdef storage* outr
    cdef const float* fa
    cdef const float* fb
    cdef float* fo
    cdef float floor = stored_as_zero(out)
    if op != OP_NORMALIZE and op != OP_BACKWARD:
        for r in range(r0, r1):
            apply_segment(op, a + r * C + c0, b + r * C + c0, out + r * C + c0, n,
                          p0 + c0, p1 + c0, p2 + c0, p3 + c0, True, False, NULL, NULL)
        return
    for j in range(n):
        if storage is double:
            q0[j] = p0[c0 + j]
            q1[j] = p1[c0 + j]
            q2[j] = p2[c0 + j]
            q3[j] = p3[c0 + j]
            if relu and op == OP_BACKWARD:
                y1[j] = ys[c0 + j]
                y2[j] = yb[c0 + j]
        else:
            split(p0[c0 + j], &mean_hi[j], &mean_lo[j])
            k1[j] = <float>p1[c0 + j]
            split(p2[c0 + j], &k2_hi[j], &k2_lo[j])
            k3[j] = <float>p3[c0 + j]
            if relu and op == OP_BACKWARD:
                y_k1[j] = <float>ys[c0 + j]
                y_k2[j] = <float>yb[c0 + j]
    for r in range(r0, r1):
        ar = a + r * C + c0
        br = b + r * C + c0
        outr = out + r * C + c0
        if prefetch and r + ROWS_AHEAD < r1:
            prefetch_rows(ar + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(storage), False)
            if op == OP_BACKWARD:
                prefetch_rows(br + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(storage), False)
            prefetch_rows(outr + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(storage), True)
        if storage is double:
            out64 = outr
            if stream:
                out64 = buf_f64
            if op == OP_NORMALIZE:
                if relu:
                    for j in range(n):
                        out64[j] = relu_value(y_f64(ar[j], q0[j], q1[j], q2[j]))
                else:
                    for j in range(n):
                        out64[j] = y_f64(ar[j], q0[j], q1[j], q2[j])
            elif relu:
                for j in range(n):
                    out64[j] = dx_f64(mask_dy(ar[j], y_f64(br[j], q0[j], y1[j], y2[j]), 0.0),
                                   br[j], q0[j], q1[j], q2[j], q3[j])
            else:
                for j in range(n):
                    out64[j] = dx_f64(ar[j], br[j], q0[j], q1[j], q2[j], q3[j])
            if stream:
                fastbn_stream(outr, buf_f64, n * sizeof(double))
        else:
            if storage is float:
                fa = ar
                fb = br
                fo = outr
                if stream:
                    fo = buf_out
            else:
                load(ar, buf_a, n)
                if op == OP_BACKWARD:
                    load(br, buf_b, n)
                fa = buf_a
                fb = buf_b
                fo = buf_out
            if op == OP_NORMALIZE:
                # the offset p2 is not split
                if relu:
                    for j in range(n):
                        fo[j] = relu_value(y_f32(fa[j], mean_hi[j], mean_lo[j], k1[j],
                                                 k2_hi[j]))
                else:
                    for j in range(n):
                        fo[j] = y_f32(fa[j], mean_hi[j], mean_lo[j], k1[j], k2_hi[j])
            elif relu:
                for j in range(n):
                    fo[j] = dx_f32(mask_dy(fa[j], y_f32(fb[j], mean_hi[j], mean_lo[j], y_k1[j],
                                                        y_k2[j]), floor),
                                   fb[j], mean_hi[j], mean_lo[j], k1[j], k2_hi[j], k2_lo[j],
                                   k3[j])
            else:
                for j in range(n):
                    fo[j] = dx_f32(fa[j], fb[j], mean_hi[j], mean_lo[j], k1[j], k2_hi[j],
                                   k2_lo[j], k3[j])
            if storage is float:
                if stream:
                    fastbn_stream(outr, buf_out, n * sizeof(float))
            elif stream:
                store(buf_out, buf_stored, n)
                fastbn_stream(outr, buf_stored, n * sizeof(storage))
            else:
                store(buf_out, outr, n)
