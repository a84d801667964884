# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython + OpenMP kernels of fastbn on the canonical ``(A, C, B)`` view.

The kernel contract is in :mod:`fastbn.backends`; this module implements it
for C-contiguous float32, float64, float16 and bfloat16 arrays, releasing
the GIL and running its loops with ``prange``. The staged backward is
:mod:`fastbn.backends.cython_omp`'s walk over this module's
:func:`_elementwise_py` and :func:`_reduce_py`.

Sources, by layer (``_cython/`` is compiled into this module, not installed)
--------------------------------------------------------------------------
``_cython/half.h``, ``_cython/cpu.h``
    C: the float16 / bfloat16 conversions (F16C or portable); the OpenMP
    shim, prefetch hints and vector width.
``_cython/half.pxd``, ``_cython/cpu.pxd``
    Their declarations, and the fused type ``storage`` (float, double and
    the two 16-bit types) that every kernel is written over once.
``_cython/formulas.pxd``
    ``y`` (the forward's normalize), the ReLU and its mask, ``dx``, and the
    per-channel coefficients: every loop computes them through these.
``_cython/blocks.pxd``, ``sums.pxd``, ``apply.pxd``
    Block sizes and work splits; reductions and elementwise passes on one
    thread.
``_cython/passes.pxd``
    The parallel passes (``prange``) over a whole array.
this module
    Thread count and cache tuning, the training drivers, the one switch
    from an array's storage kind to the typed code (:func:`_dispatch`), and
    the Python-level kernels.

16-bit storage: float16 and bfloat16 arrays are read as their uint16 bit
patterns, converted exactly to float32 in blocks that stay in L1, computed
on as float32 data is (elementwise in float32, reductions in float64), and
results are rounded to nearest even once into the 16-bit output.

Fused ReLU: ``relu=True`` makes the normalize pass store ``max(y, 0)``; the
backward kernels then mask ``dy`` by ``y > 0``, rebuilding ``y`` from ``x``
and the statistics with the forward's own arithmetic inside their loops
(no mask array), so for float32 / float64 the mask is exactly the forward's
``out > 0``.

Two loop shapes
---------------
* ``B > 1`` ("channel path"): a channel is ``A`` contiguous segments of
  ``B`` values. Work is done channel by channel: one thread reduces a
  channel, then immediately applies the elementwise pass to the same
  channel, so the second read of ``x`` (and ``dy``) hits the cache. The
  segments of a channel are ``C * B`` apart, so rows ahead are prefetched
  in software. When there are too few channels to keep every thread busy
  (``C < 4 * threads``), the rows are short (``B < FUSE_MIN_B``), or the
  array is small enough (< FUSE_MIN_BYTES) to stay in the last-level cache
  between passes, each channel is split into
  chunks that different threads reduce, and the elementwise pass runs as a
  separate parallel pass. Short segments (``B <= COL_BLOCK``) are reduced
  four rows at a time into per-column float64 sums, like the row path.
* ``B == 1`` ("row path", ``(N, D)`` and channels-last): rows of ``C``
  contiguous channels; inner loops run across channels (vectorized, with
  local float64 accumulators), over blocks of rows and blocks of at most
  ``COL_BLOCK`` channels. When all rows of a block of >= 64 channels fit in
  ROW_FUSE_BYTES (L2), forward_train / backward_train are fused per block:
  reduce the block, then its elementwise pass reads it again from L2. A
  plan's ``block_bytes`` sets the block, up to ``ROW_BLOCK`` channels: on an
  AMD EPYC (Zen 4), a (256, 4096) float32 forward took 0.30 ms in blocks of
  1024 channels against 0.42 ms in blocks of 256 (rows 16 KiB apart, where
  a 1 KiB piece of each row made a poor stream for the prefetchers).

On the channel path, float32 and float64 outputs of at least
STREAM_MIN_BYTES (beyond the last-level cache) with rows of at least
STREAM_MIN_ROW_BYTES are written with streaming (non-temporal) stores: a
plain store first reads the line it writes, and an output that cannot stay
in cache evicts the inputs the fused kernels read again. (Short rows would
write partial cache lines, which streaming stores make slow; 16-bit passes
are bound by their conversions, and measured no faster.) The stored values
are the same either way.

float32 elementwise passes (normalize, simplified backward) run in float32
arithmetic, 16 lanes per AVX-512 op, with the means split as
``mean = hi + lo`` (two float32): ``(x - hi) - lo`` is the centred value to
float32 rounding even when ``|mean| >> std``. Statistics and reductions are
always centred and accumulated in float64.

Sizes
-----
Any array NumPy can hold, of any shape: every extent, index, offset, count
and product of extents (``A * C * B``, ``(row * C + c) * B``, ``k * M``)
is a ``Py_ssize_t`` (64-bit), and so is every OpenMP loop variable; the C
conversion helpers take ``ptrdiff_t`` counts. The kernels allocate nothing
of the array's size.

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

from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from ._host import readable_running, running_arrays, write_back

from ._cython cimport half
from ._cython.apply cimport (OP_ADD, OP_ADD_P, OP_BACKWARD, OP_FILL, OP_MASK, OP_MUL,
                             OP_NORMALIZE, OP_SUB, OP_TWO_MUL)
from ._cython.blocks cimport COL_BLOCK, ROW_BLOCK, partials_size
from ._cython.cpu cimport FASTBN_OPENMP_ENABLED, FASTBN_VECTOR_BYTES, fastbn_max_threads
from ._cython.formulas cimport backward_coefs, elemt_coefs, forward_coefs
from ._cython.half cimport (FASTBN_HAVE_F16C_PATH, bf16_t, f16_t, fastbn_load_f16_soft,
                            fastbn_store_f16_soft, fastbn_use_f16c, storage, value_at)
from ._cython.passes cimport (convert_pass, elementwise_pass, fused_backward_channels,
                              fused_backward_rows, fused_forward_channels,
                              fused_forward_rows, reduce_pass)

OPENMP_ENABLED = bool(FASTBN_OPENMP_ENABLED)
# The widest float vectors the compiler was allowed to use (-march=native or not).
VECTOR_BYTES = FASTBN_VECTOR_BYTES

# A plan's strategy and stores by name (fastbn.backends.cython_omp's plans).
STRATEGIES = {"default": STRATEGY_DEFAULT, "passes": STRATEGY_PASSES, "fused": STRATEGY_FUSED}
STORES = {"default": STORES_DEFAULT, "cached": STORES_CACHED, "streaming": STORES_STREAMING}
# The elementwise ops of _elementwise_py by name (the staged backward's).
OPS = {"mask": OP_MASK, "subtract": OP_SUB, "multiply": OP_MUL,
       "fill": OP_FILL, "twice_product": OP_TWO_MUL, "add": OP_ADD, "add_p": OP_ADD_P}


# ---------------------------------------------------------------------------
# Thread count and the cache-dependent choice of fused kernels
# ---------------------------------------------------------------------------

# Arrays smaller than this run on one thread (thread start-up costs more).
cdef Py_ssize_t SERIAL_BELOW = 32768
# Channel path: fuse reduce + elementwise per channel when C >= this * threads,
# rows hold at least FUSE_MIN_B values and the array is at least
# FUSE_MIN_BYTES; smaller arrays stay in the L3 cache between two plain
# sequential passes, which are then faster. Shorter rows make the fused
# kernel's elementwise half a walk of short segments C * B apart (partial
# cache lines the prefetchers do not follow), where the separate pass runs
# through memory in order: at B = 49 and 196 (float32 and float64) the two
# passes were 1.4-1.7x faster forward and 1.0-1.5x backward, float16 1.4-2.6x
# forward and 0.9-1.2x backward (AMD EPYC Zen 4, 2 threads). numba's kernels
# use the same bound (FUSED_MIN_B).
cdef Py_ssize_t FUSE_CHANNELS_PER_THREAD = 4
cdef Py_ssize_t FUSE_MIN_B = 256
cdef Py_ssize_t FUSE_MIN_BYTES = 16 * 1024 * 1024
# Row path: fuse reduce + elementwise per block of channels when a block of
# at least ROW_FUSE_MIN_WIDTH channels (all rows) fits in ROW_FUSE_BYTES and
# there are at least ROW_FUSE_MIN_BLOCKS blocks.
cdef Py_ssize_t ROW_FUSE_BYTES = 1024 * 1024
cdef Py_ssize_t ROW_FUSE_MIN_WIDTH = 64
cdef Py_ssize_t ROW_FUSE_MIN_BLOCKS = 4
# Channel path: float32 and float64 outputs of at least this many bytes, in
# rows of at least STREAM_MIN_ROW_BYTES, are written with streaming stores.
cdef Py_ssize_t STREAM_MIN_BYTES = 32 * 1024 * 1024
cdef Py_ssize_t STREAM_MIN_ROW_BYTES = 2048


def set_cache_tuning(Py_ssize_t row_fuse_bytes, Py_ssize_t fuse_min_bytes,
                     Py_ssize_t stream_min_bytes=STREAM_MIN_BYTES):
    """Set the block sizes that follow the caches (once, at import).

    :mod:`fastbn.backends.cython_omp` calls it with sizes derived from
    :func:`fastbn.machine.cache_sizes`. They choose between kernels of the
    same arithmetic per channel, so they change speed, never results.

    Parameters
    ----------
    row_fuse_bytes : int
        Row path: a fused block of channels (all rows) fits in this many bytes.
    fuse_min_bytes : int
        Channel path: arrays of at least this many bytes run fused.
    stream_min_bytes : int, optional
        Channel path: float32 and float64 outputs of at least this many
        bytes (in rows of at least 2 KiB) are written with streaming stores
        (the default plan; unchanged when not given).
    """
    global ROW_FUSE_BYTES, FUSE_MIN_BYTES, STREAM_MIN_BYTES
    if row_fuse_bytes < 1 or fuse_min_bytes < 0 or stream_min_bytes < 0:
        raise ValueError("row_fuse_bytes must be positive, fuse_min_bytes and "
                         "stream_min_bytes non-negative")
    ROW_FUSE_BYTES = row_fuse_bytes
    FUSE_MIN_BYTES = fuse_min_bytes
    STREAM_MIN_BYTES = stream_min_bytes


def cache_tuning():
    """The block sizes in use: ``{"row_fuse_bytes": ..., "fuse_min_bytes": ...,
    "stream_min_bytes": ...}``."""
    return {"row_fuse_bytes": ROW_FUSE_BYTES, "fuse_min_bytes": FUSE_MIN_BYTES,
            "stream_min_bytes": STREAM_MIN_BYTES}


# Set in a process forked from one that imported fastbn: libgomp's thread
# pool of the parent is not there, and a region of more than one thread
# would wait for it forever. One thread runs the same kernels.
cdef bint _forked_child = 0


def use_one_thread_after_fork():
    """Run every kernel of this process on one thread (called in a forked child)."""
    global _forked_child
    _forked_child = 1


def max_threads():
    """Threads a kernel started now would use (``omp_get_max_threads()``).

    Returns
    -------
    int
        1 when the extension was built without OpenMP, and in a forked child.
    """
    if _forked_child:
        return 1
    return fastbn_max_threads()


cdef int _threads_for(Py_ssize_t size) noexcept nogil:
    # Read at every call (never cached) so OMP_NUM_THREADS and
    # threadpoolctl limits are honoured.
    if size < SERIAL_BELOW or _forked_child:
        return 1
    return fastbn_max_threads()


# The plan's strategy of forward_train / backward_train.
cdef enum:
    STRATEGY_DEFAULT = 0     # the heuristics (_use_fused)
    STRATEGY_PASSES = 1      # a reduction pass, then an elementwise pass
    STRATEGY_FUSED = 2       # both per channel (block); row blocks of block_bytes


# The plan's stores: how the elementwise passes write their output.
cdef enum:
    STORES_DEFAULT = 0       # streaming from STREAM_MIN_BYTES (_streams)
    STORES_CACHED = 1        # plain stores
    STORES_STREAMING = 2     # non-temporal stores through an L1 buffer


cdef Py_ssize_t _row_fuse_blocks(Py_ssize_t A, Py_ssize_t C, Py_ssize_t itemsize,
                                 Py_ssize_t n_arrays, Py_ssize_t block_bytes) noexcept nogil:
    # Row path: the number of channel blocks for the fused kernels, each
    # block (all A rows of the n_arrays arrays it touches) within
    # block_bytes (0: ROW_FUSE_BYTES) so that its second read comes from L2;
    # 0 when blocks would be narrower than ROW_FUSE_MIN_WIDTH channels or
    # fewer than ROW_FUSE_MIN_BLOCKS (then the two-pass kernels run). A
    # plan's block_bytes may widen a block up to ROW_BLOCK channels; the
    # heuristics keep to COL_BLOCK.
    cdef Py_ssize_t width = (block_bytes or ROW_FUSE_BYTES) // (n_arrays * A * itemsize)
    cdef Py_ssize_t widest = ROW_BLOCK if block_bytes else COL_BLOCK
    cdef Py_ssize_t n
    if width > widest:
        width = widest
    if width < ROW_FUSE_MIN_WIDTH:
        return 0
    n = (C + width - 1) // width
    if n < ROW_FUSE_MIN_BLOCKS:
        return 0
    return n


cdef bint _use_fused(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B, Py_ssize_t itemsize,
                     Py_ssize_t n_arrays, int nthreads, int strategy,
                     Py_ssize_t block_bytes) noexcept nogil:
    # Whether forward_train (n_arrays = 2: x, out) or backward_train
    # (n_arrays = 3: dy, x, out) runs its fused kernel: as the plan's
    # strategy says (the row path only where its blocks allow), or by the
    # heuristics (STRATEGY_DEFAULT). Fused and unfused kernels sum in the
    # same chunks and order, so their results agree bitwise.
    if strategy == STRATEGY_PASSES:
        return False
    if B == 1:
        return _row_fuse_blocks(A, C, itemsize, n_arrays, block_bytes) > 0
    if strategy == STRATEGY_FUSED:
        return True
    return (B >= FUSE_MIN_B and A * C * B * itemsize >= FUSE_MIN_BYTES
            and (nthreads == 1 or C >= FUSE_CHANNELS_PER_THREAD * nthreads))


cdef bint _streams(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B, Py_ssize_t itemsize,
                   int stores) noexcept nogil:
    # Whether an elementwise pass writing an (A, C, B) output uses streaming
    # stores: as the plan's stores say, or by size (STORES_DEFAULT).
    if stores == STORES_DEFAULT:
        return (B > 1 and itemsize >= 4 and B * itemsize >= STREAM_MIN_ROW_BYTES
                and A * C * B * itemsize >= STREAM_MIN_BYTES)
    return stores == STORES_STREAMING


def default_streaming(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B, Py_ssize_t itemsize):
    """Whether the heuristics write an ``(A, C, B)`` output of ``itemsize``
    bytes per value with streaming stores (the default plan)."""
    return bool(_streams(A, C, B, itemsize, STORES_DEFAULT))


def default_fused(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B, Py_ssize_t itemsize,
                  Py_ssize_t n_arrays):
    """Whether the heuristics fuse a training forward (``n_arrays`` 2) or
    backward (3) on an ``(A, C, B)`` array of ``itemsize`` bytes per value
    with the threads a call would use now (the default plan)."""
    return bool(_use_fused(A, C, B, itemsize, n_arrays, _threads_for(A * C * B),
                           STRATEGY_DEFAULT, 0))


# ---------------------------------------------------------------------------
# One call of the typed code: what the Python-level kernels hand to _dispatch
# ---------------------------------------------------------------------------

cdef enum:
    # storage kinds
    KIND_F32 = 0
    KIND_F64 = 1
    KIND_F16 = 2
    KIND_BF16 = 3
    # tasks
    TASK_REDUCE = 0          # reduce_pass: sum_u, sum_uv
    TASK_ELEMENTWISE = 1     # elementwise_pass: out = op(a, b)
    TASK_FORWARD_TRAIN = 2   # statistics, normalize, running statistics
    TASK_BACKWARD = 3        # the simplified (training) or evaluation backward
    TASK_TO_FLOAT32 = 4      # 16-bit a -> float32 values
    TASK_FROM_FLOAT32 = 5    # float32 values -> 16-bit out
    # running statistics
    RUNNING_NONE = 0
    RUNNING_F32 = 1
    RUNNING_F64 = 2


cdef struct Call:
    # The task and its arguments. The full-size arrays a, b and out are
    # C-contiguous (A, C, B) arrays of one storage kind (16-bit: their uint16
    # data); per-channel arrays are float64 (C,). A field the task does not
    # use stays zero (NULL).
    int task
    int kind
    Py_ssize_t A, C, B
    const void* a            # x (forward, TASK_TO_FLOAT32), dy (backward)
    const void* b            # x (backward), or a
    void* out
    # TASK_REDUCE: sum_u = sum(a - p0), sum_uv = sum((a - p0) * (b - p1)) per
    # channel. TASK_ELEMENTWISE: out = op(a, b) with coefficients p0..p3 (OP_*).
    int op
    const double* p0
    const double* p1
    const double* p2
    const double* p3
    double* sum_u            # also TASK_BACKWARD: sum_dy ...
    double* sum_uv           # ... and sum_dy_xhat
    # The fused ReLU. TASK_REDUCE / TASK_ELEMENTWISE take the forward's scale
    # ys (invstd * gamma) and offset yb (beta), which rebuild y from b = x;
    # TASK_BACKWARD makes them from invstd, gamma and beta.
    bint relu
    const double* ys
    const double* yb
    # TASK_FORWARD_TRAIN (writes mean and invstd) and TASK_BACKWARD (reads them)
    double eps
    const double* gamma
    const double* beta
    double* mean
    double* invstd
    int running              # RUNNING_*: the dtype of running_mean, running_var
    void* running_mean
    void* running_var
    double momentum
    bint training            # TASK_BACKWARD: simplified backward, else evaluation
    # TASK_FORWARD_TRAIN and TASK_BACKWARD (training): the plan, STRATEGY_*
    # and the row path's fused block bytes (0: ROW_FUSE_BYTES)
    int strategy
    Py_ssize_t block_bytes
    # Every task with an elementwise pass: the plan's STORES_*.
    int stores
    # TASK_TO_FLOAT32 / TASK_FROM_FLOAT32: the float32 side (A * C * B values)
    float* values


cdef inline void _update_running(const Call* call, double M, const double* var) noexcept nogil:
    # PyTorch's rule: running = (1 - momentum) * running + momentum * batch,
    # with the unbiased batch variance var * M / (M - 1); in float64.
    cdef double keep = 1.0 - call.momentum
    cdef double momentum = call.momentum
    cdef double unbias = M / (M - 1.0)
    cdef Py_ssize_t c
    cdef float* rm32 = <float*>call.running_mean
    cdef float* rv32 = <float*>call.running_var
    cdef double* rm64 = <double*>call.running_mean
    cdef double* rv64 = <double*>call.running_var
    if call.running == RUNNING_F32:
        for c in range(call.C):
            rm32[c] = <float>(keep * <double>rm32[c] + momentum * call.mean[c])
            rv32[c] = <float>(keep * <double>rv32[c] + momentum * (var[c] * unbias))
    elif call.running == RUNNING_F64:
        for c in range(call.C):
            rm64[c] = keep * rm64[c] + momentum * call.mean[c]
            rv64[c] = keep * rv64[c] + momentum * (var[c] * unbias)


cdef int _forward_train_task(const storage* x, storage* out, const Call* call,
                             int nthreads) noexcept nogil:
    # Statistics (fused with the normalize pass where the shape allows),
    # invstd, the running statistics, normalize (+ ReLU). -1 when out of memory.
    cdef Py_ssize_t A = call.A, C = call.C, B = call.B
    cdef Py_ssize_t c
    cdef Py_ssize_t n_cblk = _row_fuse_blocks(A, C, sizeof(storage), 2,   # x, out
                                              call.block_bytes)
    cdef double M = <double>(A * B)
    cdef bint stream = _streams(A, C, B, sizeof(storage), call.stores)
    cdef double* buf = <double*>malloc((6 * C + partials_size(A, C, B)) * sizeof(double))
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
        shift[c] = value_at(x, c * B)          # x[0, c, 0], the shift of the sums
    if _use_fused(A, C, B, sizeof(storage), 2, nthreads, call.strategy, call.block_bytes):
        if B == 1:
            fused_forward_rows(x, out, A, C, n_cblk, shift, call.eps, call.gamma, call.beta,
                               call.mean, var, scale, offset, partials, sums, nthreads,
                               call.relu, stream)
        else:
            fused_forward_channels(x, out, A, C, B, shift, call.eps, call.gamma, call.beta,
                                   call.mean, var, scale, offset, partials, nthreads,
                                   call.relu, stream)
    else:
        reduce_pass(x, x, A, C, B, shift, shift, sums, sums + C, partials, nthreads, NULL,
                    NULL)
        for c in range(C):
            forward_coefs(c, sums[c], sums[C + c], shift[c], M, call.eps, call.gamma,
                          call.beta, call.mean, var, scale, offset)
        elementwise_pass(OP_NORMALIZE, x, x, out, A, C, B, call.mean, scale, offset, offset,
                         nthreads, call.relu, NULL, NULL, stream)
    for c in range(C):
        call.invstd[c] = 1.0 / sqrt(var[c] + call.eps)
    _update_running(call, M, var)
    free(buf)
    return 0


cdef int _backward_task(const storage* dy, const storage* x, storage* out, const Call* call,
                        int nthreads) noexcept nogil:
    # training: the simplified backward (fused where the shape allows);
    # otherwise the evaluation backward dx = dy * gamma * invstd. Both return
    # sum(dy) and invstd * sum(dy * (x - mean)). relu: dy is masked by
    # y > 0 first, y = (x - mean) * (invstd * gamma) + beta rebuilt in the
    # kernels with the forward's arithmetic. -1 when out of memory.
    cdef Py_ssize_t A = call.A, C = call.C, B = call.B
    cdef Py_ssize_t c
    cdef Py_ssize_t n_cblk = _row_fuse_blocks(A, C, sizeof(storage), 3,   # dy, x, out
                                              call.block_bytes)
    cdef double M = <double>(A * B)
    cdef bint stream = _streams(A, C, B, sizeof(storage), call.stores)
    cdef double* buf = <double*>malloc((8 * C + partials_size(A, C, B)) * sizeof(double))
    cdef const double* mean = call.mean
    cdef const double* invstd = call.invstd
    cdef const double* gamma = call.gamma
    cdef double* zeros
    cdef double* k_scale
    cdef double* k_mean_dy
    cdef double* k_xmu
    cdef double* sums
    cdef double* partials
    cdef double* ys = NULL
    cdef double* yb = NULL
    if buf == NULL:
        return -1
    zeros = buf
    k_scale = buf + C
    k_mean_dy = buf + 2 * C
    k_xmu = buf + 3 * C
    sums = buf + 4 * C
    partials = buf + 8 * C
    for c in range(C):
        zeros[c] = 0.0
    if call.relu:
        ys = buf + 6 * C
        yb = buf + 7 * C
        for c in range(C):
            ys[c] = invstd[c] * gamma[c]     # the forward's scale
            yb[c] = call.beta[c]
    if call.training and _use_fused(A, C, B, sizeof(storage), 3, nthreads, call.strategy,
                                    call.block_bytes):
        if B == 1:
            fused_backward_rows(dy, x, out, A, C, n_cblk, mean, invstd, gamma, zeros,
                                call.sum_u, call.sum_uv, k_scale, k_mean_dy, k_xmu, partials,
                                sums, nthreads, ys, yb, stream)
        else:
            fused_backward_channels(dy, x, out, A, C, B, mean, invstd, gamma, zeros,
                                    call.sum_u, call.sum_uv, k_scale, k_mean_dy, k_xmu,
                                    partials, nthreads, ys, yb, stream)
    else:
        reduce_pass(dy, x, A, C, B, zeros, mean, sums, sums + C, partials, nthreads, ys, yb)
        for c in range(C):
            backward_coefs(c, sums[c], sums[C + c], M, invstd, gamma, call.sum_u, call.sum_uv,
                           k_scale, k_mean_dy, k_xmu)
        if call.training:
            elementwise_pass(OP_BACKWARD, dy, x, out, A, C, B, mean, k_scale, k_mean_dy,
                             k_xmu, nthreads, call.relu, ys, yb, stream)
        elif call.relu:
            # dx = masked dy * (gamma * invstd): the backward op with zero
            # mean_dy and k_xmu, which masks dy with the forward's y.
            elementwise_pass(OP_BACKWARD, dy, x, out, A, C, B, mean, k_scale, zeros, zeros,
                             nthreads, call.relu, ys, yb, stream)
        else:
            # dx = (dy - 0) * (gamma * invstd) + 0
            elementwise_pass(OP_NORMALIZE, dy, dy, out, A, C, B, zeros, k_scale, zeros,
                             zeros, nthreads, False, NULL, NULL, stream)
    free(buf)
    return 0


cdef int _run(const storage* a, const storage* b, storage* out,
              const Call* call) noexcept nogil:
    # The task of `call` on arrays of one storage type (written once, over
    # the fused type). -1 when out of memory.
    cdef int nthreads = _threads_for(call.A * call.C * call.B)
    cdef double* partials
    if call.task == TASK_REDUCE:
        partials = <double*>malloc(partials_size(call.A, call.C, call.B) * sizeof(double))
        if partials == NULL:
            return -1
        reduce_pass(a, b, call.A, call.C, call.B, call.p0, call.p1, call.sum_u, call.sum_uv,
                    partials, nthreads, call.ys, call.yb)
        free(partials)
    elif call.task == TASK_ELEMENTWISE:
        elementwise_pass(call.op, a, b, out, call.A, call.C, call.B, call.p0, call.p1,
                         call.p2, call.p3, nthreads, call.relu, call.ys, call.yb,
                         _streams(call.A, call.C, call.B, sizeof(storage), call.stores))
    elif call.task == TASK_FORWARD_TRAIN:
        return _forward_train_task(a, out, call, nthreads)
    elif call.task == TASK_BACKWARD:
        return _backward_task(a, b, out, call, nthreads)
    elif call.task == TASK_TO_FLOAT32 or call.task == TASK_FROM_FLOAT32:
        if storage is f16_t or storage is bf16_t:
            convert_pass(a if call.task == TASK_TO_FLOAT32 else NULL, out, call.values,
                         call.A * call.C * call.B, nthreads)
    return 0


cdef int _dispatch(const Call* call) noexcept nogil:
    # The one switch over storage kinds: _run for the kind of call's arrays.
    if call.kind == KIND_F32:
        return _run(<const float*>call.a, <const float*>call.b, <float*>call.out, call)
    if call.kind == KIND_F64:
        return _run(<const double*>call.a, <const double*>call.b, <double*>call.out, call)
    if call.kind == KIND_F16:
        return _run(<const f16_t*>call.a, <const f16_t*>call.b, <f16_t*>call.out, call)
    return _run(<const bf16_t*>call.a, <const bf16_t*>call.b, <bf16_t*>call.out, call)


# ---------------------------------------------------------------------------
# From Python objects to a Call
# ---------------------------------------------------------------------------

cdef int _kind(arr) except -1:
    # The storage kind of an array's dtype (bfloat16 is recognised by name).
    dtype = arr.dtype
    if dtype == np.float32:
        return KIND_F32
    if dtype == np.float64:
        return KIND_F64
    if dtype == np.float16:
        return KIND_F16
    if dtype.name == "bfloat16":
        return KIND_BF16
    raise TypeError(f"the cython backend does not take dtype {dtype}")


cdef void* _data(arr, bint writable) except NULL:
    # The data pointer of a C-contiguous array (16-bit ones through their
    # uint16 view); the caller keeps `arr` alive while the pointer is used.
    cdef Py_buffer view
    cdef void* pointer
    if arr.dtype.itemsize == 2:
        arr = arr.view(np.uint16)
    PyObject_GetBuffer(arr, &view,
                       PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0))
    pointer = view.buf
    PyBuffer_Release(&view)
    if pointer == NULL:
        raise ValueError("empty array")
    return pointer


cdef int _check_pair(int kind, other, shape) except -1:
    # `other` must have the storage kind and shape of the first array.
    if _kind(other) != kind or other.shape != shape:
        raise ValueError(f"arrays of one dtype and shape expected, got {other.dtype} "
                         f"{other.shape} with {shape}")
    return 0


cdef double* _doubles(v, bint writable=False) except NULL:
    # Data pointer of a float64 (C,) array made by _channel_vector or np.empty.
    return <double*>_data(v, writable)


def _channel_vector(v):
    return np.ascontiguousarray(v, dtype=np.float64)


cdef int _start(Call* call, int task, a, b, out) except -1:
    # call: `task` on the (A, C, B) arrays a, b (None: a) and out (None: no
    # output), which must have one storage kind and shape; every other field zero.
    memset(call, 0, sizeof(Call))
    call.task = task
    call.kind = _kind(a)
    call.A, call.C, call.B = a.shape[0], a.shape[1], a.shape[2]
    call.a = _data(a, False)
    call.b = call.a
    if b is not None:
        _check_pair(call.kind, b, a.shape)
        call.b = _data(b, False)
    if out is not None:
        _check_pair(call.kind, out, a.shape)
        call.out = _data(out, True)
    return 0


cdef int _finish(const Call* call) except -1:
    # Run the call without the GIL.
    cdef int status
    with nogil:
        status = _dispatch(call)
    if status != 0:
        raise MemoryError()
    return 0


def _reduce_py(a, b, ka, kb, ys=None, yb=None):
    """Per-channel ``sum(a - ka)`` and ``sum((a - ka) * (b - kb))`` in float64.

    With ``ys``/``yb`` (float64 ``(C,)``), ``a`` (= dy) is first masked by
    ``y(b) > 0``, ``y`` the forward's normalize of ``b`` (= x) with mean
    ``kb``, scale ``ys`` and offset ``yb`` (the fused ReLU).
    """
    cdef Call call
    _start(&call, TASK_REDUCE, a, b, None)
    ka, kb = _channel_vector(ka), _channel_vector(kb)
    sum_u, sum_uv = np.empty(call.C), np.empty(call.C)
    call.p0, call.p1 = _doubles(ka), _doubles(kb)
    call.sum_u, call.sum_uv = _doubles(sum_u, True), _doubles(sum_uv, True)
    if ys is not None:
        ys, yb = _channel_vector(ys), _channel_vector(yb)
        call.ys, call.yb = _doubles(ys), _doubles(yb)
    _finish(&call)
    return sum_u, sum_uv


def _elementwise_py(int op, a, b, out, p0, p1, p2, p3, bint relu=False, ys=None, yb=None,
                    int stores=STORES_DEFAULT):
    """Apply elementwise ``op`` (an ``OP_*`` code, see ``OPS``) over the whole array."""
    cdef Call call
    _start(&call, TASK_ELEMENTWISE, a, b, out)
    call.stores = stores
    if (call.kind == KIND_F16 or call.kind == KIND_BF16) and op != OP_NORMALIZE \
            and op != OP_BACKWARD:
        raise TypeError("the staged backward's ops take float32 or float64 arrays")
    p0, p1, p2, p3 = map(_channel_vector, (p0, p1, p2, p3))
    call.op = op
    call.p0, call.p1, call.p2, call.p3 = _doubles(p0), _doubles(p1), _doubles(p2), _doubles(p3)
    call.relu = relu
    if ys is not None:
        ys, yb = _channel_vector(ys), _channel_vector(yb)
        call.ys, call.yb = _doubles(ys), _doubles(yb)
    _finish(&call)


# ---------------------------------------------------------------------------
# Conversions between 16-bit storage and float32 (the staged backward's
# copies, and the tests of the conversion helpers)
# ---------------------------------------------------------------------------

cdef int _convert(int task, x16, x32) except -1:
    cdef Call call
    if _kind(x16) not in (KIND_F16, KIND_BF16):
        raise TypeError(f"a float16 or bfloat16 array expected, got {x16.dtype}")
    if x32.dtype != np.float32 or x32.shape != x16.shape:
        raise ValueError("a float32 array of the 16-bit array's shape expected")
    flat = x16.reshape(1, 1, x16.size)
    _start(&call, task, flat, None, flat if task == TASK_FROM_FLOAT32 else None)
    call.values = <float*>_data(x32, task == TASK_TO_FLOAT32)
    _finish(&call)
    return 0


def to_float32(x16):
    """A 16-bit array (float16 or bfloat16) as a new float32 array (exact).

    Parameters
    ----------
    x16 : ndarray, float16 or bfloat16, C-contiguous

    Returns
    -------
    ndarray, float32, same shape
    """
    out = np.empty(x16.shape, dtype=np.float32)
    _convert(TASK_TO_FLOAT32, x16, out)
    return out


def from_float32(x32, out):
    """Round a float32 array to nearest even into a 16-bit array ``out``.

    Parameters
    ----------
    x32 : ndarray, float32, C-contiguous
    out : ndarray, float16 or bfloat16, C-contiguous, same shape
    """
    _convert(TASK_FROM_FLOAT32, out, x32)


def f16c_info():
    """Which float16 conversion code runs.

    Returns
    -------
    dict
        ``compiled``: the extension has the x86-64 F16C path; ``cpu``: this
        CPU has F16C (and AVX); ``enabled``: it is not switched off by
        :func:`_use_f16c`.
    """
    return {"compiled": bool(FASTBN_HAVE_F16C_PATH), "cpu": bool(fastbn_use_f16c()),
            "enabled": bool(half.fastbn_f16c_enabled)}


def _use_f16c(bint enabled):
    """Switch the F16C float16 conversions on or off (tests use the portable path)."""
    half.fastbn_f16c_enabled = 1 if enabled else 0


def _f16_soft_roundtrip(bits):
    """The portable float16 conversions on uint16 ``bits``: (to float32, back to bits)."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    values = np.empty(bits.shape, dtype=np.float32)
    back = np.empty(bits.shape, dtype=np.uint16)
    cdef const unsigned short[::1] b = bits.reshape(-1)
    cdef float[::1] v = values.reshape(-1)
    cdef unsigned short[::1] r = back.reshape(-1)
    cdef Py_ssize_t n = b.shape[0]
    if n:
        fastbn_load_f16_soft(&b[0], &v[0], n)
        fastbn_store_f16_soft(&v[0], &r[0], n)
    return values, back


def _f16_soft_round(values):
    """The portable float32 -> float16 rounding of float32 ``values``, as uint16 bits."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = np.empty(values.shape, dtype=np.uint16)
    cdef const float[::1] v = values.reshape(-1)
    cdef unsigned short[::1] b = bits.reshape(-1)
    if v.shape[0]:
        fastbn_store_f16_soft(&v[0], &b[0], v.shape[0])
    return bits


# ---------------------------------------------------------------------------
# The kernels of the contract
# ---------------------------------------------------------------------------

def stats(x):
    """Per-channel mean and biased variance.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, C-contiguous, shape (A, C, B)

    Returns
    -------
    mean, var : ndarray, float64, shape (C,)
        Shifted sums in float64 (shift = the channel's first value), so a
        constant channel has ``var == 0`` exactly.
    """
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef Py_ssize_t c
    # the shift K of the shifted sums: each channel's first value, in float64
    shift = np.ascontiguousarray(x[0, :, 0], dtype=np.float64)
    sum_u, sum_uu = _reduce_py(x, x, shift, shift)
    mean = np.empty(C, dtype=np.float64)
    var = np.empty(C, dtype=np.float64)
    cdef double[::1] mean_v = mean, var_v = var, shift_v = shift
    cdef double[::1] sum_u_v = sum_u, sum_uu_v = sum_uu
    cdef double[::1] scratch = np.empty(C, dtype=np.float64)
    cdef double[::1] ones = np.ones(C, dtype=np.float64)
    for c in range(C):
        forward_coefs(c, sum_u_v[c], sum_uu_v[c], shift_v[c], <double>(A * B), 0.0,
                      &ones[0], &ones[0], &mean_v[0], &var_v[0], &scratch[0], &scratch[0])
    return mean, var


def normalize(x, mean, invstd, gamma, beta, out, relu=False, int stores=STORES_DEFAULT):
    """``out = (x - mean) * invstd * gamma + beta``, then ``max(out, 0)`` with ``relu``.

    float32 and 16-bit data are computed in float32 arithmetic with a split
    mean (16-bit results rounded once), float64 data in float64.

    Parameters
    ----------
    x, out : ndarray, shape (A, C, B), one dtype (float32, float64, float16, bfloat16)
    mean, invstd, gamma, beta : ndarray, float64, shape (C,)
    relu : bool
    stores : int
        ``STORES``: plain or streaming stores; 0: streaming from
        ``stream_min_bytes`` (:func:`cache_tuning`). The same values either way.

    Returns
    -------
    None
        The result is written into ``out``.
    """
    mean = _channel_vector(mean)
    scale = _channel_vector(invstd) * _channel_vector(gamma)
    beta = _channel_vector(beta)
    _elementwise_py(OP_NORMALIZE, x, x, out, mean, scale, beta, beta, bool(relu), None, None,
                    stores)


def forward_train(x, gamma, beta, double eps, out, running_mean=None, running_var=None,
                  double momentum=0.1, relu=False, int strategy=STRATEGY_DEFAULT,
                  Py_ssize_t block_bytes=0, int stores=STORES_DEFAULT):
    """Training forward: statistics, normalize into ``out``, running statistics.

    Fused per channel (block) where the shape allows: a channel is reduced
    and normalized back to back, so ``x`` is read from memory once. The
    running statistics (float32 or float64 arrays directly, other dtypes
    through a float64 copy) are updated in the same nogil driver, PyTorch's
    way (unbiased batch variance).

    Parameters
    ----------
    x, out : ndarray, shape (A, C, B), one dtype (float32, float64, float16, bfloat16)
    gamma, beta : ndarray, float64, shape (C,)
    eps : float
    running_mean, running_var : ndarray, shape (C,), or None
    momentum : float
    relu : bool
        Fused ReLU: ``out = max(y, 0)`` in the normalize pass.
    strategy, block_bytes, stores : int
        The plan (``STRATEGIES``, ``STORES``;
        ``fastbn.backends.cython_omp.default_plan``); 0: the heuristics' choice.

    Returns
    -------
    mean, invstd : ndarray, float64, shape (C,)
    """
    cdef Call call
    _start(&call, TASK_FORWARD_TRAIN, x, None, out)
    call.strategy, call.block_bytes, call.stores = strategy, block_bytes, stores
    gamma, beta = _channel_vector(gamma), _channel_vector(beta)
    mean, invstd = np.empty(call.C), np.empty(call.C)
    call.gamma, call.beta = _doubles(gamma), _doubles(beta)
    call.mean, call.invstd = _doubles(mean, True), _doubles(invstd, True)
    call.eps, call.momentum, call.relu = eps, momentum, bool(relu)
    rm, rv, update = running_arrays(running_mean, running_var, mean, invstd)
    if update:
        call.running = RUNNING_F32 if rm.itemsize == 4 else RUNNING_F64
        call.running_mean, call.running_var = _data(rm, True), _data(rv, True)
    _finish(&call)
    if update:
        write_back(running_mean, running_var, rm, rv)
    return mean, invstd


def forward_eval(x, gamma, beta, running_mean, running_var, double eps, out, relu=False,
                 int stores=STORES_DEFAULT):
    """Evaluation forward: normalize with the running statistics (+ fused ReLU);
    ``stores``: the plan's (``STORES``; 0: the heuristics' choice).

    Returns
    -------
    mean, invstd : ndarray, float64, shape (C,)
        A copy of ``running_mean`` and ``1 / sqrt(running_var + eps)``.
    """
    rm, rv = readable_running(running_mean, running_var)
    mean = np.array(rm, dtype=np.float64)
    invstd = 1.0 / np.sqrt(_channel_vector(rv) + eps)
    normalize(x, mean, invstd, gamma, beta, out, relu, stores)
    return mean, invstd


def _backward(dy, x, mean, invstd, gamma, out, bint training, beta, relu,
              int strategy=STRATEGY_DEFAULT, Py_ssize_t block_bytes=0,
              int stores=STORES_DEFAULT):
    cdef Call call
    _start(&call, TASK_BACKWARD, dy, x, out)
    call.strategy, call.block_bytes, call.stores = strategy, block_bytes, stores
    mean, invstd, gamma = map(_channel_vector, (mean, invstd, gamma))
    sum_dy, sum_dy_xhat = np.empty(call.C), np.empty(call.C)
    call.mean, call.invstd, call.gamma = _doubles(mean), _doubles(invstd), _doubles(gamma)
    call.sum_u, call.sum_uv = _doubles(sum_dy, True), _doubles(sum_dy_xhat, True)
    call.training, call.relu = training, bool(relu)
    if call.relu:
        if beta is None:
            raise ValueError("relu=True needs the forward's beta")
        beta = _channel_vector(beta)
        call.beta = _doubles(beta)
    _finish(&call)
    return sum_dy, sum_dy_xhat


def backward_eval(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """Evaluation backward ``dx = dy * gamma * invstd``, and the two sums.

    With ``relu``, ``dy`` is first masked by ``y > 0`` (``y`` rebuilt from
    ``x``, ``mean``, ``invstd``, ``gamma`` and ``beta`` as the forward did).

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)
    """
    return _backward(dy, x, mean, invstd, gamma, out, False, beta, relu)


def backward_reduce(dy, x, mean, invstd, gamma=None, beta=None, relu=False):
    """Per-channel ``sum_dy`` and ``sum_dy_xhat``.

    Parameters
    ----------
    dy, x : ndarray, shape (A, C, B), one dtype (float32, float64, float16, bfloat16)
    mean, invstd : ndarray, float64, shape (C,)
    gamma, beta : ndarray, float64, shape (C,), or None
        Read only with ``relu`` (the forward's ``y`` is rebuilt from them).
    relu : bool
        Mask ``dy`` by ``y > 0`` first (fused ReLU).

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)
        ``sum(dy)`` and ``invstd * sum(dy * (x - mean))``.
    """
    mean = _channel_vector(mean)
    invstd = _channel_vector(invstd)
    zeros = np.zeros(x.shape[1], dtype=np.float64)
    if relu:
        if gamma is None or beta is None:
            raise ValueError("relu=True needs the forward's gamma and beta")
        sum_dy, sum_dy_xmu = _reduce_py(dy, x, zeros, mean, invstd * _channel_vector(gamma),
                                        beta)
    else:
        sum_dy, sum_dy_xmu = _reduce_py(dy, x, zeros, mean)
    return sum_dy, sum_dy_xmu * invstd


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta=None,
                   relu=False):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``.

    Parameters
    ----------
    dy, x, out : ndarray, shape (A, C, B), one dtype (float32, float64, float16, bfloat16)
    mean, invstd, gamma, sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)
    beta : ndarray, float64, shape (C,), or None
        Read only with ``relu``.
    relu : bool
        Use ``dy`` masked by ``y > 0`` (fused ReLU; the sums are of the masked ``dy``).

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
        elemt_coefs(c, sum_dy_v[c], sum_dy_xhat_v[c], M, &invstd_v[0], &gamma_v[0],
                    &k_scale_v[0], &k_mean_dy_v[0], &k_xmu_v[0])
    if relu:
        if beta is None:
            raise ValueError("relu=True needs the forward's beta")
        _elementwise_py(OP_BACKWARD, dy, x, out, _channel_vector(mean), k_scale, k_mean_dy,
                        k_xmu, True, np.asarray(invstd_v) * np.asarray(gamma_v), beta)
    else:
        _elementwise_py(OP_BACKWARD, dy, x, out, _channel_vector(mean), k_scale, k_mean_dy,
                        k_xmu)


def backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False,
                   int strategy=STRATEGY_DEFAULT, Py_ssize_t block_bytes=0,
                   int stores=STORES_DEFAULT):
    """Simplified backward: reduce, then the elementwise pass, into ``out``.

    Fused per channel (block) where the shape allows: a channel's reduce
    and elementwise passes run back to back, so the second read of ``dy``
    and ``x`` hits the cache. With ``relu``, ``dy`` is masked by ``y > 0``
    inside both passes (``y`` rebuilt from ``x`` with the forward's
    arithmetic; no mask array).

    Parameters
    ----------
    dy, x, out : ndarray, shape (A, C, B), one dtype (float32, float64, float16, bfloat16)
    mean, invstd, gamma : ndarray, float64, shape (C,)
    beta : ndarray, float64, shape (C,), or None (read only with ``relu``)
    relu : bool
    strategy, block_bytes, stores : int
        The plan, as in :func:`forward_train`.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    return _backward(dy, x, mean, invstd, gamma, out, True, beta, relu, strategy, block_bytes,
                     stores)
