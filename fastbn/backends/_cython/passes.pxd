# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# Parallel passes over a whole (A, C, B) array: OpenMP work items (prange)
# of the one-thread loops in sums.pxd and apply.pxd.
#
# Two loop shapes:
# * B > 1 ("channel path"): a channel is A contiguous segments of B values.
# * B == 1 ("row path", (N, D) and channels-last): rows of C contiguous
#   channels, in blocks of rows times blocks of at most COL_BLOCK channels.
# The fused passes reduce a channel (or a block of channels) and run the
# elementwise pass on it back to back, while it is still in cache; they sum
# in the same chunks and order as reduce_pass, so fused and unfused results
# agree bit for bit.

from cython.parallel cimport prange

from .apply cimport OP_BACKWARD, OP_NORMALIZE, prefetch_row_for_write, rows_apply, write_segment
from .cpu cimport fastbn_stream_fence
from .blocks cimport (ELEM_BLOCK, ROWS_AHEAD, chunk_bound, chunks_per_channel, col_blocks,
                      row_chunks)
from .formulas cimport backward_coefs, forward_coefs, merge
from .half cimport load, storage, store
from .sums cimport channel_range_sums, rows_sums


cdef inline void reduce_pass(const storage* a, const storage* b, Py_ssize_t A, Py_ssize_t C,
                             Py_ssize_t B, const double* ka, const double* kb,
                             double* sum_u, double* sum_uv, double* partials,
                             int nthreads, const double* ys, const double* yb) noexcept nogil:
    # Per channel c: sum_u[c] = sum(a - ka[c]), sum_uv[c] = sum((a - ka[c]) * (b - kb[c])).
    # partials: partials_size(A, C, B) doubles. ys, yb (or NULL): the fused
    # ReLU's mask of a (= dy) by y(b) > 0 (b = x, kb = mean).
    cdef Py_ssize_t M = A * B
    cdef Py_ssize_t n_chunk, item, c, k, r, j, n_cblk, n_rchunk, c0, c1, r0, r1
    if B > 1:
        n_chunk = chunks_per_channel(M)
        for item in prange(C * n_chunk, nogil=True, num_threads=nthreads, schedule='dynamic'):
            c = item // n_chunk
            k = item - c * n_chunk
            channel_range_sums(a, b, C, B, c, chunk_bound(k, n_chunk, A, B),
                               chunk_bound(k + 1, n_chunk, A, B),
                               ka[c], kb[c], partials + 2 * item, ys, yb)
        for c in range(C):
            sum_u[c] = merge(partials + 2 * c * n_chunk, n_chunk, 2)
            sum_uv[c] = merge(partials + 2 * c * n_chunk + 1, n_chunk, 2)
    else:
        # Row path: partials[0, r, c] and partials[1, r, c] for row chunk r.
        n_cblk = col_blocks(C)
        n_rchunk = row_chunks(A, C)
        for item in prange(n_rchunk * n_cblk, nogil=True, num_threads=nthreads,
                           schedule='dynamic'):
            r = item // n_cblk
            j = item - r * n_cblk
            c0 = j * C // n_cblk
            c1 = (j + 1) * C // n_cblk
            r0 = r * A // n_rchunk
            r1 = (r + 1) * A // n_rchunk
            rows_sums(a, b, C, r0, r1, c0, c1, ka, kb, ROWS_AHEAD, partials + r * C,
                      partials + (n_rchunk + r) * C, ys, yb)
        for c in range(C):
            sum_u[c] = merge(partials + c, n_rchunk, C)
            sum_uv[c] = merge(partials + n_rchunk * C + c, n_rchunk, C)


cdef inline void elementwise_pass(int op, const storage* a, const storage* b, storage* out,
                                  Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
                                  const double* p0, const double* p1, const double* p2,
                                  const double* p3, int nthreads, bint relu,
                                  const double* ys, const double* yb,
                                  bint stream) noexcept nogil:
    # `op` on the whole array. Channel path: rows are (a, c) segments of B
    # values; work items group short rows or split long ones so each holds
    # about ELEM_BLOCK values. Row path: work items are blocks of rows times
    # blocks of at most COL_BLOCK channels. relu, ys, yb: the fused ReLU
    # (see apply_segment). stream: OP_NORMALIZE and OP_BACKWARD write with
    # streaming stores (write_segment, rows_apply).
    cdef Py_ssize_t n_rows, rows_per_item, n_blk, n_items, n_cblk
    cdef Py_ssize_t item, g, blk, row, r0, r1, s0, s1, c
    if B == 1:
        n_cblk = col_blocks(C)
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
            rows_apply(op, a, b, out, C, r0, r1, blk * C // n_cblk, (blk + 1) * C // n_cblk,
                       p0, p1, p2, p3, True, relu, ys, yb, stream)
            if stream:
                fastbn_stream_fence()
        return
    n_rows = A * C
    rows_per_item = ELEM_BLOCK // B
    if rows_per_item < 1:
        rows_per_item = 1
    n_blk = B // ELEM_BLOCK
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
        s0 = blk * B // n_blk
        s1 = (blk + 1) * B // n_blk
        for row in range(r0, r1):
            c = row % C
            write_segment(op, a + row * B + s0, b + row * B + s0, out + row * B + s0, s1 - s0,
                          p0 + c, p1 + c, p2 + c, p3 + c, relu,
                          ys + c if ys != NULL else NULL, yb + c if yb != NULL else NULL, stream)
        if stream:
            fastbn_stream_fence()


cdef inline void rows_block_sums(const storage* a, const storage* b, Py_ssize_t A,
                                 Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                                 const double* ka, const double* kb, double* partials,
                                 double* sum_u, double* sum_uv, const double* ys,
                                 const double* yb) noexcept nogil:
    # Row path, all rows of channels c0..c1-1: the same row chunks, partials
    # and merge order as reduce_pass.
    cdef Py_ssize_t n_rchunk = row_chunks(A, C)
    cdef Py_ssize_t r, c
    for r in range(n_rchunk):
        rows_sums(a, b, C, r * A // n_rchunk, (r + 1) * A // n_rchunk, c0, c1, ka, kb,
                  0, partials + r * C, partials + (n_rchunk + r) * C, ys, yb)
    for c in range(c0, c1):
        sum_u[c] = merge(partials + c, n_rchunk, C)
        sum_uv[c] = merge(partials + n_rchunk * C + c, n_rchunk, C)


cdef inline void fused_forward_rows(const storage* x, storage* out, Py_ssize_t A,
                                    Py_ssize_t C, Py_ssize_t n_cblk, const double* shift,
                                    double eps, const double* gamma, const double* beta,
                                    double* mean, double* var, double* scale,
                                    double* offset, double* partials, double* sums,
                                    int nthreads, bint relu, bint stream) noexcept nogil:
    # Row path, one of n_cblk blocks of channels per work item: statistics
    # over all rows of the block, then normalize the block while it is still
    # in L2 (n_cblk is chosen so that a block fits there).
    cdef Py_ssize_t j, c, c0, c1
    for j in prange(n_cblk, nogil=True, num_threads=nthreads, schedule='dynamic'):
        c0 = j * C // n_cblk
        c1 = (j + 1) * C // n_cblk
        rows_block_sums(x, x, A, C, c0, c1, shift, shift, partials, sums, sums + C,
                        NULL, NULL)
        for c in range(c0, c1):
            forward_coefs(c, sums[c], sums[C + c], shift[c], <double>A, eps, gamma, beta,
                          mean, var, scale, offset)
        rows_apply(OP_NORMALIZE, x, x, out, C, 0, A, c0, c1, mean, scale, offset, offset,
                   False, relu, NULL, NULL, stream)
        if stream:
            fastbn_stream_fence()


cdef inline void fused_backward_rows(const storage* dy, const storage* x, storage* out,
                                     Py_ssize_t A, Py_ssize_t C, Py_ssize_t n_cblk,
                                     const double* mean, const double* invstd,
                                     const double* gamma, const double* zeros,
                                     double* sum_dy, double* sum_dy_xhat, double* k_scale,
                                     double* k_mean_dy, double* k_xmu, double* partials,
                                     double* sums, int nthreads, const double* ys,
                                     const double* yb, bint stream) noexcept nogil:
    # Row path, one block of channels per work item: reduce over all rows of
    # the block, then the elementwise pass while dy and x are still in L2.
    cdef Py_ssize_t j, c, c0, c1
    for j in prange(n_cblk, nogil=True, num_threads=nthreads, schedule='dynamic'):
        c0 = j * C // n_cblk
        c1 = (j + 1) * C // n_cblk
        rows_block_sums(dy, x, A, C, c0, c1, zeros, mean, partials, sums, sums + C, ys, yb)
        for c in range(c0, c1):
            backward_coefs(c, sums[c], sums[C + c], <double>A, invstd, gamma, sum_dy,
                           sum_dy_xhat, k_scale, k_mean_dy, k_xmu)
        rows_apply(OP_BACKWARD, dy, x, out, C, 0, A, c0, c1, mean, k_scale, k_mean_dy,
                   k_xmu, False, ys != NULL, ys, yb, stream)
        if stream:
            fastbn_stream_fence()


cdef inline void fused_forward_channels(const storage* x, storage* out, Py_ssize_t A,
                                        Py_ssize_t C, Py_ssize_t B, const double* shift,
                                        double eps, const double* gamma, const double* beta,
                                        double* mean, double* var, double* scale,
                                        double* offset, double* partials,
                                        int nthreads, bint relu, bint stream) noexcept nogil:
    # Channel path, one channel per thread: statistics, then normalize the
    # same channel while it is still in cache. stream: streaming stores.
    cdef Py_ssize_t M = A * B
    cdef Py_ssize_t n_chunk = chunks_per_channel(M)
    cdef Py_ssize_t c, k, row
    cdef double* part
    for c in prange(C, nogil=True, num_threads=nthreads, schedule='dynamic'):
        part = partials + 2 * c * n_chunk
        for k in range(n_chunk):
            channel_range_sums(x, x, C, B, c, chunk_bound(k, n_chunk, A, B),
                               chunk_bound(k + 1, n_chunk, A, B),
                               shift[c], shift[c], part + 2 * k, NULL, NULL)
        forward_coefs(c, merge(part, n_chunk, 2), merge(part + 1, n_chunk, 2), shift[c],
                      <double>M, eps, gamma, beta, mean, var, scale, offset)
        # No write prefetch of the next output row here: measured at
        # (64, 256, 56, 56), 2 threads, the float32 forward is ~10% faster
        # without it (float16 ~4%).
        for row in range(A):
            write_segment(OP_NORMALIZE, x + (row * C + c) * B, x, out + (row * C + c) * B, B,
                          mean + c, scale + c, offset + c, offset + c, relu, NULL, NULL, stream)
        if stream:
            fastbn_stream_fence()


cdef inline void fused_backward_channels(const storage* dy, const storage* x, storage* out,
                                         Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
                                         const double* mean, const double* invstd,
                                         const double* gamma, const double* zeros,
                                         double* sum_dy, double* sum_dy_xhat,
                                         double* k_scale, double* k_mean_dy, double* k_xmu,
                                         double* partials, int nthreads, const double* ys,
                                         const double* yb, bint stream) noexcept nogil:
    # Channel path, one channel per thread: reduce, then the elementwise
    # pass on the same channel while dy and x are still in cache. stream:
    # streaming stores (and no write prefetch of the output).
    cdef Py_ssize_t M = A * B
    cdef Py_ssize_t n_chunk = chunks_per_channel(M)
    cdef Py_ssize_t c, k, row
    cdef double* part
    for c in prange(C, nogil=True, num_threads=nthreads, schedule='dynamic'):
        part = partials + 2 * c * n_chunk
        for k in range(n_chunk):
            channel_range_sums(dy, x, C, B, c, chunk_bound(k, n_chunk, A, B),
                               chunk_bound(k + 1, n_chunk, A, B),
                               zeros[c], mean[c], part + 2 * k, ys, yb)
        backward_coefs(c, merge(part, n_chunk, 2), merge(part + 1, n_chunk, 2),
                       <double>M, invstd, gamma, sum_dy, sum_dy_xhat,
                       k_scale, k_mean_dy, k_xmu)
        for row in range(A):
            if not stream:
                prefetch_row_for_write(out, row, A, C, B, c)
            write_segment(OP_BACKWARD, dy + (row * C + c) * B, x + (row * C + c) * B,
                          out + (row * C + c) * B, B, mean + c, k_scale + c, k_mean_dy + c,
                          k_xmu + c, ys != NULL, ys + c if ys != NULL else NULL,
                          yb + c if yb != NULL else NULL, stream)
        if stream:
            fastbn_stream_fence()


cdef inline void convert_pass(const storage* src, storage* dst, float* values, Py_ssize_t n,
                              int nthreads) noexcept nogil:
    # 16-bit storage <-> float32 over n values, in parallel blocks of
    # ELEM_BLOCK: src -> values (exact) where src is not NULL, else
    # values -> dst (rounded to nearest even).
    cdef Py_ssize_t n_items = (n + ELEM_BLOCK - 1) // ELEM_BLOCK
    cdef Py_ssize_t item, s, m
    for item in prange(n_items, nogil=True, num_threads=nthreads, schedule='static'):
        s = item * ELEM_BLOCK
        m = n - s
        if m > ELEM_BLOCK:
            m = ELEM_BLOCK
        if src != NULL:
            load(src + s, values + s, m)
        else:
            store(values + s, dst + s, m)
