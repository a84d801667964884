# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# Block sizes, and how a shape is split into work items.
#
# Every split here depends on the shape only, never on the thread count:
# threads decide who computes a work item, never how it is summed, so the
# results are the same for any number of threads.

cdef enum:
    # Channel path: float64 partial sums per reduction (lane j takes the values
    # at offsets j, j + LANES, ... of each contiguous segment).
    LANES = 256
    CACHE_LINE = 64
    # Row path: columns are reduced in blocks of at most this many channels.
    COL_BLOCK = 256
    # Row path: a fused work item (rows_sums, rows_apply) spans at most this
    # many channels (a plan's block_bytes; the heuristics keep to COL_BLOCK).
    ROW_BLOCK = 1024
    # Row path: prefetch this many rows ahead.
    ROWS_AHEAD = 8
    # Channel path: prefetch the rows about this many bytes ahead.
    PREFETCH_BYTES = 4096
    # 16-bit data: values converted per block of at most this many (elementwise).
    CHUNK = 512
    # Elementwise work items hold about this many elements.
    ELEM_BLOCK = 16384
    # Channel path: a channel is reduced in min(CHUNK_MAX, M // CHUNK_MIN) chunks.
    CHUNK_MIN = 16384
    CHUNK_MAX = 64


cdef inline Py_ssize_t chunks_per_channel(Py_ssize_t M) noexcept nogil:
    cdef Py_ssize_t n = M // CHUNK_MIN
    if n < 1:
        n = 1
    if n > CHUNK_MAX:
        n = CHUNK_MAX
    return n


cdef inline Py_ssize_t chunk_bound(Py_ssize_t k, Py_ssize_t n_chunk, Py_ssize_t A,
                                    Py_ssize_t B) noexcept nogil:
    # Channel path: chunk k of a channel's M = A * B values starts here. For
    # short segments (B <= COL_BLOCK) chunks are whole rows (n_chunk <= A / 64
    # then), so channel_range_sums can take four segments at a time.
    if B <= COL_BLOCK:
        return (k * A // n_chunk) * B
    return k * (A * B) // n_chunk


cdef inline Py_ssize_t col_blocks(Py_ssize_t C) noexcept nogil:
    return (C + COL_BLOCK - 1) // COL_BLOCK


cdef inline Py_ssize_t row_chunks(Py_ssize_t A, Py_ssize_t C) noexcept nogil:
    # Row path: about 64 work items in all, at most one chunk per row.
    cdef Py_ssize_t n = 64 // col_blocks(C)
    if n < 1:
        n = 1
    if n > A:
        n = A
    return n


cdef inline Py_ssize_t partials_size(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B) noexcept nogil:
    # float64 partial sums of one reduction: two per chunk of every channel
    # (B > 1), or two per row chunk of every channel (B == 1).
    if B > 1:
        return 2 * C * chunks_per_channel(A * B)
    return 2 * C * row_chunks(A, C)
