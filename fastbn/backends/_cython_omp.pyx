# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython + OpenMP kernels of fastbn on the canonical ``(A, C, B)`` view.

The kernel contract is in :mod:`fastbn.backends`; this module implements it
for C-contiguous float32, float64, float16 and bfloat16 arrays (one fused
``storage`` type), releasing the GIL and running its loops with ``prange``.

16-bit storage: float16 and bfloat16 arrays are read as their uint16 bit
patterns, converted exactly to float32 in blocks that stay in L1, computed
on as float32 data is (elementwise in float32, reductions in float64), and
results are rounded to nearest even once into the 16-bit output. The
staged backward converts x and dy to float32 and keeps its intermediates
in float32.

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

Sizes
-----
Any array NumPy can hold, of any shape: every extent, index, offset, count
and product of extents (``A * C * B``, ``(row * C + c) * B``, ``k * M``)
is a ``Py_ssize_t`` (64-bit), and so is every OpenMP loop variable; the C
conversion helpers take ``ptrdiff_t`` counts. The staged backward allocates
its full-size intermediates (four, five with the ReLU, plus the float32
copies of 16-bit ``x``, ``dy`` and ``out``) only after checking that they
fit in the memory available; otherwise it raises ``MemoryError``
(:mod:`fastbn.backends._memory`). The other kernels allocate nothing of
the array's size.

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
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from libc.stdlib cimport free, malloc

from . import _memory
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


# 16-bit storage: float16 (IEEE binary16) and bfloat16 arrays arrive as
# their uint16 bit patterns, typed as two distinct one-field structs so that
# they are distinct members of the `storage` fused type. Every kernel reads
# them in blocks converted to float32 (exactly), computes in float32 /
# float64 as for float32 data, and rounds results to nearest-even once.
# The conversions are branch-free (selects written as bit masks), so gcc
# vectorizes them on any x86-64 or aarch64; on x86-64 the float16 blocks use
# the F16C instructions (vcvtph2ps / vcvtps2ph, round-to-nearest-even)
# when the compiler targets them or, chosen at run time, when the CPU has
# them.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <stddef.h>
    typedef struct { uint16_t bits; } fastbn_f16;
    typedef struct { uint16_t bits; } fastbn_bf16;

    static inline float fastbn_as_float(int32_t u) { float f; memcpy(&f, &u, 4); return f; }
    static inline int32_t fastbn_as_bits(float f) { int32_t u; memcpy(&u, &f, 4); return u; }

    /* binary16 -> float32, exact. Normal: shift the exponent and mantissa
       into place and rebias (127 - 15) << 23; inf/NaN: exponent all ones
       (payload kept); subnormal/zero: m * 2^-24, computed exactly as
       (0.5 + m * 2^-24) - 0.5 in float32. */
    static inline float fastbn_f16_to_f32(uint16_t h) {
        int32_t v = h;
        int32_t shifted = (v & 0x7FFF) << 13;
        int32_t expo = v & 0x7C00;
        int32_t normal = shifted + 0x38000000;
        int32_t special = shifted + 0x70000000;
        int32_t tiny = fastbn_as_bits(fastbn_as_float(0x3F000000 | (v & 0x3FF)) - 0.5f);
        int32_t is_special = -(int32_t)(expo == 0x7C00);
        int32_t is_tiny = -(int32_t)(expo == 0);
        int32_t r = (special & is_special) | (normal & ~is_special);
        r = (tiny & is_tiny) | (r & ~is_tiny);
        return fastbn_as_float(r | ((v & 0x8000) << 16));
    }

    /* float32 -> binary16, round to nearest even. Normal range: rebias,
       then add 0xFFF + (lsb of the kept bits) before dropping 13 bits (ties
       to even); past the largest finite value this carries into the
       exponent and is clamped to inf. Results below 2^-14 (subnormal):
       |f| + 0.5 rounds to a multiple of 2^-24 in float32 (the FPU's
       round-to-nearest-even), whose low bits are the subnormal mantissa.
       NaN: quiet NaN with the payload's top bits. */
    static inline uint16_t fastbn_f32_to_f16(float f) {
        int32_t w = fastbn_as_bits(f);
        int32_t a = w & 0x7FFFFFFF;
        int32_t normal = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13;
        int32_t tiny = fastbn_as_bits(fastbn_as_float(a) + 0.5f) - 0x3F000000;
        int32_t nan = 0x7E00 | ((a >> 13) & 0x3FF);
        int32_t is_tiny = -(int32_t)(a < 0x38800000);
        int32_t is_nan = -(int32_t)(a > 0x7F800000);
        int32_t r;
        normal = normal > 0x7C00 ? 0x7C00 : normal;
        r = (tiny & is_tiny) | (normal & ~is_tiny);
        r = (nan & is_nan) | (r & ~is_nan);
        return (uint16_t)(r | ((w >> 16) & 0x8000));
    }

    /* bfloat16 is the upper half of a float32. */
    static inline float fastbn_bf16_to_f32(uint16_t h) {
        return fastbn_as_float((int32_t)((uint32_t)h << 16));
    }

    /* float32 -> bfloat16, round to nearest even (adding 0x7FFF + lsb
       carries into the exponent as needed, up to inf); NaN stays NaN
       (quiet bit set). */
    static inline uint16_t fastbn_f32_to_bf16(float f) {
        uint32_t w = (uint32_t)fastbn_as_bits(f);
        int32_t a = (int32_t)(w & 0x7FFFFFFFu);
        int32_t rounded = (int32_t)((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16);
        int32_t nan = (int32_t)((w >> 16) | 0x40u);
        int32_t is_nan = -(int32_t)(a > 0x7F800000);
        return (uint16_t)((nan & is_nan) | (rounded & ~is_nan));
    }

    static void fastbn_load_f16_soft(const uint16_t* src, float* dst, ptrdiff_t n) {
        ptrdiff_t i;
        for (i = 0; i < n; i++) dst[i] = fastbn_f16_to_f32(src[i]);
    }
    static void fastbn_store_f16_soft(const float* src, uint16_t* dst, ptrdiff_t n) {
        ptrdiff_t i;
        for (i = 0; i < n; i++) dst[i] = fastbn_f32_to_f16(src[i]);
    }

    #if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    #define FASTBN_HAVE_F16C_PATH 1
    __attribute__((target("avx,f16c")))
    static void fastbn_load_f16_f16c(const uint16_t* src, float* dst, ptrdiff_t n) {
        ptrdiff_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
        for (; i < n; i++) dst[i] = fastbn_f16_to_f32(src[i]);
    }
    __attribute__((target("avx,f16c")))
    static void fastbn_store_f16_f16c(const float* src, uint16_t* dst, ptrdiff_t n) {
        ptrdiff_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(dst + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        for (; i < n; i++) dst[i] = fastbn_f32_to_f16(src[i]);
    }
    #if defined(__F16C__) && defined(__AVX__)
    static inline int fastbn_use_f16c(void) { return 1; }
    #else
    static int fastbn_f16c_flag = -1;
    static inline int fastbn_use_f16c(void) {
        if (fastbn_f16c_flag < 0) {
            __builtin_cpu_init();
            fastbn_f16c_flag = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
        }
        return fastbn_f16c_flag;
    }
    #endif
    #else
    #define FASTBN_HAVE_F16C_PATH 0
    static inline int fastbn_use_f16c(void) { return 0; }
    static void fastbn_load_f16_f16c(const uint16_t* src, float* dst, ptrdiff_t n) { fastbn_load_f16_soft(src, dst, n); }
    static void fastbn_store_f16_f16c(const float* src, uint16_t* dst, ptrdiff_t n) { fastbn_store_f16_soft(src, dst, n); }
    #endif

    /* Block conversions used by the kernels. fastbn_f16c_enabled: set to 0
       to force the portable integer path (the tests compare both). */
    static int fastbn_f16c_enabled = 1;
    static inline void fastbn_load_f16(const fastbn_f16* src, float* dst, ptrdiff_t n) {
        if (fastbn_f16c_enabled && fastbn_use_f16c()) fastbn_load_f16_f16c((const uint16_t*)src, dst, n);
        else fastbn_load_f16_soft((const uint16_t*)src, dst, n);
    }
    static inline void fastbn_store_f16(const float* src, fastbn_f16* dst, ptrdiff_t n) {
        if (fastbn_f16c_enabled && fastbn_use_f16c()) fastbn_store_f16_f16c(src, (uint16_t*)dst, n);
        else fastbn_store_f16_soft(src, (uint16_t*)dst, n);
    }
    static inline void fastbn_load_bf16(const fastbn_bf16* src, float* dst, ptrdiff_t n) {
        const uint16_t* s = (const uint16_t*)src;
        ptrdiff_t i;
        for (i = 0; i < n; i++) dst[i] = fastbn_bf16_to_f32(s[i]);
    }
    static inline void fastbn_store_bf16(const float* src, fastbn_bf16* dst, ptrdiff_t n) {
        uint16_t* d = (uint16_t*)dst;
        ptrdiff_t i;
        for (i = 0; i < n; i++) d[i] = fastbn_f32_to_bf16(src[i]);
    }
    """
    ctypedef struct f16_t "fastbn_f16":
        unsigned short bits
    ctypedef struct bf16_t "fastbn_bf16":
        unsigned short bits
    float fastbn_f16_to_f32(unsigned short h) noexcept nogil
    unsigned short fastbn_f32_to_f16(float f) noexcept nogil
    float fastbn_bf16_to_f32(unsigned short h) noexcept nogil
    unsigned short fastbn_f32_to_bf16(float f) noexcept nogil
    void fastbn_load_f16(const f16_t* src, float* dst, Py_ssize_t n) noexcept nogil
    void fastbn_store_f16(const float* src, f16_t* dst, Py_ssize_t n) noexcept nogil
    void fastbn_load_bf16(const bf16_t* src, float* dst, Py_ssize_t n) noexcept nogil
    void fastbn_store_bf16(const float* src, bf16_t* dst, Py_ssize_t n) noexcept nogil
    void fastbn_load_f16_soft(const unsigned short* src, float* dst, Py_ssize_t n) noexcept nogil
    void fastbn_store_f16_soft(const float* src, unsigned short* dst, Py_ssize_t n) noexcept nogil
    int fastbn_use_f16c() noexcept nogil
    int fastbn_f16c_enabled
    int FASTBN_HAVE_F16C_PATH


# The compute types (float32 and float64 data; 16-bit data computes in float32).
ctypedef fused floating:
    float
    double

# What the kernels read and write.
ctypedef fused storage:
    float
    double
    f16_t
    bf16_t

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
    OP_MASK = 8        # out = a where b > 0, else 0 (staged ReLU backward)

OPENMP_ENABLED = bool(FASTBN_OPENMP_ENABLED)

# The widest float vectors the compiler was allowed to use (-march=native or not).
cdef extern from *:
    """
    #if defined(__AVX512F__)
    #define FASTBN_VECTOR_BYTES 64
    #elif defined(__AVX__)
    #define FASTBN_VECTOR_BYTES 32
    #else
    #define FASTBN_VECTOR_BYTES 16
    #endif
    """
    int FASTBN_VECTOR_BYTES
VECTOR_BYTES = FASTBN_VECTOR_BYTES


def set_cache_tuning(Py_ssize_t row_fuse_bytes, Py_ssize_t fuse_min_bytes):
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
    """
    global ROW_FUSE_BYTES, FUSE_MIN_BYTES
    if row_fuse_bytes < 1 or fuse_min_bytes < 0:
        raise ValueError("row_fuse_bytes must be positive and fuse_min_bytes non-negative")
    ROW_FUSE_BYTES = row_fuse_bytes
    FUSE_MIN_BYTES = fuse_min_bytes


def cache_tuning():
    """The block sizes in use: ``{"row_fuse_bytes": ..., "fuse_min_bytes": ...}``."""
    return {"row_fuse_bytes": ROW_FUSE_BYTES, "fuse_min_bytes": FUSE_MIN_BYTES}


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

# 16-bit data: values converted per block of at most this many (elementwise).
cdef enum:
    CHUNK = 512


cdef inline void _load(const storage* src, float* dst, Py_ssize_t n) noexcept nogil:
    # n values of float32 or 16-bit storage as float32 (exact); not for float64.
    cdef Py_ssize_t i
    if storage is f16_t:
        fastbn_load_f16(src, dst, n)
    elif storage is bf16_t:
        fastbn_load_bf16(src, dst, n)
    elif storage is float:
        for i in range(n):
            dst[i] = src[i]


cdef inline void _store(const float* src, storage* dst, Py_ssize_t n) noexcept nogil:
    # n float32 values into 16-bit storage, rounded to nearest even.
    if storage is f16_t:
        fastbn_store_f16(src, dst, n)
    elif storage is bf16_t:
        fastbn_store_bf16(src, dst, n)


cdef inline double _value(const storage* p, Py_ssize_t i) noexcept nogil:
    # One value as float64 (exact).
    if storage is f16_t:
        return fastbn_f16_to_f32(p[i].bits)
    elif storage is bf16_t:
        return fastbn_bf16_to_f32(p[i].bits)
    else:
        return <double>p[i]


cdef inline void _split(double v, float* hi, float* lo) noexcept nogil:
    # v = hi + lo to about float32^2 precision.
    hi[0] = <float>v
    lo[0] = <float>(v - <double>hi[0])


cdef inline void _mask_f32(float* dst, const float* dy, const float* x, Py_ssize_t n,
                           float mean_hi, float mean_lo, float k1, float k2) noexcept nogil:
    # Fused ReLU backward, one channel: dst = dy, or 0 where the forward's
    # float32 y = ((x - mean_hi) - mean_lo) * k1 + k2 is not > 0 (dst may be dy).
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = dy[i] if ((x[i] - mean_hi) - mean_lo) * k1 + k2 > 0 else 0.0


cdef inline void _mask_f64(double* dst, const double* dy, const double* x, Py_ssize_t n,
                           double mean, double scale, double offset) noexcept nogil:
    # As _mask_f32 for float64 data: y = (x - mean) * scale + offset.
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = dy[i] if (x[i] - mean) * scale + offset > 0 else 0.0


cdef inline void _lane_sums(const floating* a, const floating* b, Py_ssize_t m, double ka,
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


cdef inline void _lane_sums4(const floating* a, const floating* b, double ka, double kb,
                             double* acc_u, double* acc_uv) noexcept nogil:
    # Four consecutive blocks of LANES values (a[0 : 4 * LANES]) into the
    # lanes, added in block order: bit for bit four _lane_sums calls, with a
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


cdef inline void _lanes(const floating* a, const floating* b, Py_ssize_t m, double ka,
                        double kb, double* acc_u, double* acc_uv) noexcept nogil:
    # m == 4 * LANES: _lane_sums4; otherwise m <= LANES values, _lane_sums.
    if m == 4 * LANES:
        _lane_sums4(a, b, ka, kb, acc_u, acc_uv)
    else:
        _lane_sums(a, b, m, ka, kb, acc_u, acc_uv)


cdef inline void _lanes_f32(const float* a, const float* b, Py_ssize_t m, double ka,
                            double kb, double* acc_u, double* acc_uv, bint same) noexcept nogil:
    # As _lanes for the float32 values of 16-bit data, in float32 blocks
    # merged in float64: u = (a - ka_hi) - ka_lo and v likewise (split
    # shifts, so the centring is accurate to float32 rounding), and for
    # m == 4 * LANES the four blocks' u and u * v are added in float32 in a
    # fixed tree before one float64 addition per lane. With `same` (a == b
    # and ka == kb: statistics) v == u.
    cdef Py_ssize_t j
    cdef float ka_hi, ka_lo, kb_hi, kb_lo
    cdef float u0, u1, u2, u3, v0, v1, v2, v3
    _split(ka, &ka_hi, &ka_lo)
    _split(kb, &kb_hi, &kb_lo)
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


cdef inline void _sums2(const storage* a, const storage* b, Py_ssize_t n,
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
    # (_lanes_f32): float32 accuracy, half the float64 work.
    cdef Py_ssize_t start, j, m, line
    cdef Py_ssize_t per_line = CACHE_LINE // <Py_ssize_t>sizeof(storage)
    cdef float buf_a[4 * LANES]
    cdef float buf_b[4 * LANES]
    cdef double buf_d[4 * LANES]
    cdef float mean_hi = 0, mean_lo = 0, k1 = 0, k2 = 0
    if relu != NULL:
        _split(kb, &mean_hi, &mean_lo)
        k1 = <float>relu[0]
        k2 = <float>relu[1]
    start = 0
    while start < n:
        m = n - start
        if m >= 4 * LANES:
            m = 4 * LANES
        elif m > LANES:
            m = LANES
        if ahead_a != NULL:
            for line in range((m + per_line - 1) // per_line):
                fastbn_prefetch(ahead_a + start + line * per_line)
                fastbn_prefetch(ahead_b + start + line * per_line)
        if storage is double:
            if relu == NULL:
                _lanes(a + start, b + start, m, ka, kb, acc_u, acc_uv)
            else:
                _mask_f64(buf_d, a + start, b + start, m, kb, relu[0], relu[1])
                _lanes(<const double*>buf_d, b + start, m, ka, kb, acc_u, acc_uv)
        elif storage is float:
            if relu == NULL:
                _lanes(a + start, b + start, m, ka, kb, acc_u, acc_uv)
            else:
                _mask_f32(buf_a, a + start, b + start, m, mean_hi, mean_lo, k1, k2)
                _lanes(<const float*>buf_a, b + start, m, ka, kb, acc_u, acc_uv)
        else:
            _load(a + start, buf_a, m)
            if a == b and relu == NULL:
                _lanes_f32(buf_a, buf_a, m, ka, kb, acc_u, acc_uv, ka == kb)
            else:
                _load(b + start, buf_b, m)
                if relu != NULL:
                    _mask_f32(buf_a, buf_a, buf_b, m, mean_hi, mean_lo, k1, k2)
                _lanes_f32(buf_a, buf_b, m, ka, kb, acc_u, acc_uv, False)
        start += m


cdef inline void _channel_range_sums(const storage* a, const storage* b,
                                     Py_ssize_t C, Py_ssize_t B, Py_ssize_t c,
                                     Py_ssize_t m0, Py_ssize_t m1,
                                     double ka, double kb, double* dst,
                                     const double* ys, const double* yb) noexcept nogil:
    # dst[0] = sum(a - ka), dst[1] = sum((a - ka) * (b - kb)) over the values
    # m0 <= m < m1 of channel c (m = row * B + col), walking its contiguous
    # segments into LANES float64 lanes, then adding the lanes in order.
    # The segments are C * B apart, too far for the hardware prefetcher to
    # follow, so the same columns `rows_ahead` rows further are prefetched.
    # ys, yb (or NULL): per-channel scale and offset of the forward's
    # normalize; a (= dy) is then masked by y(b) > 0 (fused ReLU).
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
        # of B columns with rows C * B apart; _rows_sums adds four rows per
        # pass into per-column float64 sums, which are then added in order.
        for j in range(B):
            shift_a[j] = ka
            shift_b[j] = kb
            if ys != NULL:
                col_ys[j] = ys[c]
                col_yb[j] = yb[c]
        shift_b_ptr = shift_b
        if kb == ka:
            shift_b_ptr = shift_a     # lets _rows_sums see a == b (statistics)
        _rows_sums(a + c * B, b + c * B, C * B, m0 // B, m1 // B, 0, B, shift_a,
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
        _sums2(a + offset, b + offset, n, ka, kb, acc_u, acc_uv, ahead_a, ahead_b, relu_ptr)
        m += n
    dst[0] = 0.0
    dst[1] = 0.0
    for j in range(LANES):
        dst[0] += acc_u[j]
        dst[1] += acc_uv[j]


cdef inline void _prefetch_row_for_write(storage* out, Py_ssize_t row, Py_ssize_t A,
                                         Py_ssize_t C, Py_ssize_t B, Py_ssize_t c) noexcept nogil:
    # Channel path, elementwise pass: the output segments of a channel are
    # C * B apart; prefetch (for writing) the segment PREFETCH_BYTES ahead.
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


cdef inline void _apply_f32(int op, const float* a, const float* b, float* out,
                            Py_ssize_t n, double p0, double p1, double p2,
                            double p3, bint relu, double ys, double yb) noexcept nogil:
    # OP_NORMALIZE / OP_BACKWARD for float32 with one channel's coefficients,
    # in float32 arithmetic (16 lanes per AVX-512 op, no conversions). The
    # centrings x - mean and dy - mean_dy use the split mean = hi + lo
    # (hi = float(mean), lo = float(mean - hi)): (x - hi) - lo is accurate to
    # float32 rounding of the centred value, however large mean / std is.
    # relu: OP_NORMALIZE then gives max(y, 0) (NaN stays NaN); OP_BACKWARD
    # uses dy = 0 where y = ((x - hi) - lo) * float(ys) + float(yb), the
    # forward's normalize, is not > 0.
    cdef Py_ssize_t i
    cdef float mean_hi = <float>p0
    cdef float mean_lo = <float>(p0 - <double>mean_hi)
    cdef float k1 = <float>p1
    cdef float k2_hi = <float>p2
    cdef float k2_lo = <float>(p2 - <double>k2_hi)
    cdef float k3 = <float>p3
    cdef float y_k1 = <float>ys
    cdef float y_k2 = <float>yb
    cdef float v, d
    if op == OP_NORMALIZE:
        # out = (x - mean) * scale + offset   (p2 = offset is not split)
        if relu:
            for i in range(n):
                v = ((a[i] - mean_hi) - mean_lo) * k1 + k2_hi
                out[i] = 0.0 if v < 0 else v
        else:
            for i in range(n):
                out[i] = ((a[i] - mean_hi) - mean_lo) * k1 + k2_hi
    elif relu:
        for i in range(n):
            d = a[i] if ((b[i] - mean_hi) - mean_lo) * y_k1 + y_k2 > 0 else 0.0
            out[i] = k1 * (((d - k2_hi) - k2_lo) - ((b[i] - mean_hi) - mean_lo) * k3)
    else:
        # out = k_scale * ((dy - mean_dy) - (x - mean) * k_xmu)
        for i in range(n):
            out[i] = k1 * (((a[i] - k2_hi) - k2_lo) - ((b[i] - mean_hi) - mean_lo) * k3)


cdef inline bint _op_reads_b(int op) noexcept nogil:
    return op == OP_BACKWARD or op == OP_TWO_MUL or op == OP_ADD or op == OP_MASK


cdef inline void _apply(int op, const storage* a, const storage* b, storage* out,
                        Py_ssize_t n, const double* p0, const double* p1,
                        const double* p2, const double* p3,
                        bint per_element, bint relu, const double* ys,
                        const double* yb) noexcept nogil:
    # One elementwise op over n contiguous values, in float64 (float32
    # normalize / backward with shared coefficients: _apply_f32). With
    # per_element, value i belongs to channel i (row path, p* point at the
    # block's first channel); otherwise all n values share channel p*[0].
    # relu (OP_NORMALIZE / OP_BACKWARD, not per_element): the fused ReLU,
    # ys[0] / yb[0] being the forward's scale and offset. 16-bit data:
    # blocks of CHUNK values converted to float32, the float32 code, the
    # result rounded once into out.
    cdef Py_ssize_t i, s, m, off
    cdef double q0, q1, q2, q3, v, d
    cdef float buf_a[CHUNK]
    cdef float buf_b[CHUNK]
    cdef float buf_out[CHUNK]
    if storage is f16_t or storage is bf16_t:
        s = 0
        while s < n:
            m = n - s
            if m > CHUNK:
                m = CHUNK
            off = s if per_element else 0
            _load(a + s, buf_a, m)
            if _op_reads_b(op):
                _load(b + s, buf_b, m)
            _apply(op, <const float*>buf_a, <const float*>buf_b, <float*>buf_out, m,
                   p0 + off, p1 + off, p2 + off, p3 + off, per_element, relu,
                   ys + off if ys != NULL else NULL, yb + off if yb != NULL else NULL)
            _store(buf_out, out + s, m)
            s += m
        return
    if storage is float:
        if not per_element and (op == OP_NORMALIZE or op == OP_BACKWARD):
            _apply_f32(op, a, b, out, n, p0[0], p1[0], p2[0], p3[0], relu,
                       ys[0] if relu and op == OP_BACKWARD else 0.0,
                       yb[0] if relu and op == OP_BACKWARD else 0.0)
            return
    if op == OP_NORMALIZE:
        if per_element:
            for i in range(n):
                out[i] = <storage>((<double>a[i] - p0[i]) * p1[i] + p2[i])
        else:
            q0 = p0[0]
            q1 = p1[0]
            q2 = p2[0]
            if relu:
                for i in range(n):
                    v = (<double>a[i] - q0) * q1 + q2
                    out[i] = <storage>(0.0 if v < 0 else v)
            else:
                for i in range(n):
                    out[i] = <storage>((<double>a[i] - q0) * q1 + q2)
    elif op == OP_BACKWARD:
        if per_element:
            for i in range(n):
                out[i] = <storage>(p1[i] * ((<double>a[i] - p2[i])
                                            - (<double>b[i] - p0[i]) * p3[i]))
        else:
            q0 = p0[0]
            q1 = p1[0]
            q2 = p2[0]
            q3 = p3[0]
            if relu:
                for i in range(n):
                    d = <double>a[i] if (<double>b[i] - q0) * ys[0] + yb[0] > 0 else 0.0
                    out[i] = <storage>(q1 * ((d - q2) - (<double>b[i] - q0) * q3))
            else:
                for i in range(n):
                    out[i] = <storage>(q1 * ((<double>a[i] - q2) - (<double>b[i] - q0) * q3))
    elif op == OP_SUB:
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
        for i in range(n):
            out[i] = a[i] if b[i] > 0 else 0
    elif op == OP_ADD_P:
        if per_element:
            for i in range(n):
                out[i] = <storage>(<double>a[i] + p0[i])
        else:
            q0 = p0[0]
            for i in range(n):
                out[i] = <storage>(<double>a[i] + q0)


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
    # invstd * gamma, rounded as normalize() and the ReLU backward compute it
    scale[c] = (1.0 / sqrt(v + eps)) * gamma[c]
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

cdef void _reduce(const storage* a, const storage* b, Py_ssize_t A, Py_ssize_t C,
                  Py_ssize_t B, const double* ka, const double* kb,
                  double* sum_u, double* sum_uv, double* partials,
                  int nthreads, const double* ys, const double* yb) noexcept nogil:
    # Per channel c: sum_u[c] = sum(a - ka[c]), sum_uv[c] = sum((a - ka[c]) * (b - kb[c])).
    # partials: C * _chunks_per_channel(A * B) * 2 doubles (B > 1) or
    # 2 * _row_chunks(A, C) * C doubles (B == 1). ys, yb (or NULL): the
    # fused ReLU's mask of a (= dy) by y(b) > 0 (b = x, kb = mean).
    cdef Py_ssize_t M = A * B
    cdef Py_ssize_t n_chunk, item, c, k, r, j, n_cblk, n_rchunk, c0, c1, r0, r1
    if B > 1:
        n_chunk = _chunks_per_channel(M)
        for item in prange(C * n_chunk, nogil=True, num_threads=nthreads, schedule='dynamic'):
            c = item // n_chunk
            k = item - c * n_chunk
            _channel_range_sums(a, b, C, B, c, _chunk_bound(k, n_chunk, A, B),
                                _chunk_bound(k + 1, n_chunk, A, B),
                                ka[c], kb[c], partials + 2 * item, ys, yb)
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
                       partials + (n_rchunk + r) * C, ys, yb)
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


cdef inline void _rows_sums(const storage* a, const storage* b, Py_ssize_t C,
                            Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                            const double* ka, const double* kb, Py_ssize_t rows_ahead,
                            double* pu, double* puv, const double* ys,
                            const double* yb) noexcept nogil:
    # Rows r0..r1-1 (C values apart) and columns c0..c1-1 (c1 - c0 <= COL_BLOCK):
    # pu[c] = sum_r u, puv[c] = sum_r u * v with u = a[r, c] - ka[c], v = b[r, c] - kb[c],
    # rows added in order, four at a time from r0. Accumulators and shifts
    # are local arrays (they do not alias a or b), so the loops over columns
    # vectorize. 16-bit data and the fused ReLU (ys, yb not NULL: a = dy is
    # masked by y(b) > 0, b = x, kb = mean) go through row buffers in L1,
    # summed in the same order.
    cdef double acc_u[COL_BLOCK]
    cdef double acc_uv[COL_BLOCK]
    cdef double shift_a[COL_BLOCK]
    cdef double shift_b[COL_BLOCK]
    cdef Py_ssize_t n = c1 - c0
    cdef Py_ssize_t r, j, i, nr
    cdef const storage* a0
    cdef const storage* b0
    cdef bint same = a == b and ka == kb
    cdef bint relu = ys != NULL
    # buffers: 4 rows of a (masked) and b, as float32 or float64
    cdef float fa[4 * COL_BLOCK]
    cdef float fb[4 * COL_BLOCK]
    cdef double da[4 * COL_BLOCK]
    cdef double db[4 * COL_BLOCK]
    cdef float mean_hi[COL_BLOCK]
    cdef float mean_lo[COL_BLOCK]
    cdef float k1[COL_BLOCK]
    cdef float k2[COL_BLOCK]
    cdef float* fa_i
    cdef float* fb_i
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
                _prefetch_rows(a0 + rows_ahead * C, C * sizeof(storage), 0, 4,
                               n * sizeof(storage), False)
                if not same:
                    _prefetch_rows(b0 + rows_ahead * C, C * sizeof(storage), 0, 4,
                                   n * sizeof(storage), False)
            _sums_4rows(a0, b0, C, n, shift_a, shift_b, acc_u, acc_uv, same)
            r += 4
        while r < r1:
            _sums_1row(a + r * C + c0, b + r * C + c0, n, shift_a, shift_b, acc_u, acc_uv)
            r += 1
    else:
        if relu and not (storage is double):
            for j in range(n):
                _split(kb[c0 + j], &mean_hi[j], &mean_lo[j])
                k1[j] = <float>ys[c0 + j]
                k2[j] = <float>yb[c0 + j]
        r = r0
        while r < r1:
            nr = r1 - r
            if nr > 4:
                nr = 4
            if rows_ahead > 0 and r + rows_ahead + 4 <= r1:
                _prefetch_rows(a + (r + rows_ahead) * C + c0, C * sizeof(storage), 0, 4,
                               n * sizeof(storage), False)
                if not same:
                    _prefetch_rows(b + (r + rows_ahead) * C + c0, C * sizeof(storage), 0, 4,
                                   n * sizeof(storage), False)
            for i in range(nr):
                a0 = a + (r + i) * C + c0
                b0 = b + (r + i) * C + c0
                if storage is double:
                    for j in range(n):
                        db[i * COL_BLOCK + j] = b0[j]
                        da[i * COL_BLOCK + j] = (
                            a0[j] if (b0[j] - kb[c0 + j]) * ys[c0 + j] + yb[c0 + j] > 0
                            else 0.0)
                else:
                    fa_i = fa + i * COL_BLOCK
                    fb_i = fb + i * COL_BLOCK
                    _load(a0, fa_i, n)
                    if not same:
                        _load(b0, fb_i, n)
                    if relu:
                        for j in range(n):
                            fa_i[j] = (fa_i[j] if ((fb_i[j] - mean_hi[j]) - mean_lo[j]) * k1[j]
                                       + k2[j] > 0 else 0.0)
            if storage is double:
                if nr == 4:
                    _sums_4rows(<const double*>da, <const double*>db, COL_BLOCK, n, shift_a,
                                shift_b, acc_u, acc_uv, False)
                else:
                    for i in range(nr):
                        _sums_1row(<const double*>(da + i * COL_BLOCK),
                                   <const double*>(db + i * COL_BLOCK), n, shift_a, shift_b,
                                   acc_u, acc_uv)
            else:
                if same:
                    fb_i = fa
                else:
                    fb_i = fb
                if nr == 4:
                    _sums_4rows(<const float*>fa, <const float*>fb_i, COL_BLOCK, n, shift_a,
                                shift_b, acc_u, acc_uv, same)
                else:
                    for i in range(nr):
                        _sums_1row(<const float*>(fa + i * COL_BLOCK),
                                   <const float*>(fb_i + i * COL_BLOCK), n, shift_a, shift_b,
                                   acc_u, acc_uv)
            r += nr
    for j in range(n):
        pu[c0 + j] = acc_u[j]
        puv[c0 + j] = acc_uv[j]


cdef inline void _rows_apply(int op, const storage* a, const storage* b, storage* out,
                             Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                             Py_ssize_t c1, const double* p0, const double* p1,
                             const double* p2, const double* p3,
                             bint prefetch, bint relu, const double* ys,
                             const double* yb) noexcept nogil:
    # Row path: `op` on rows r0..r1-1, channels c0..c1-1 (c1 - c0 <= COL_BLOCK).
    # prefetch: software-prefetch the rows ROWS_AHEAD ahead (off in the fused
    # kernels, whose second pass reads the block from L2).
    # OP_NORMALIZE / OP_BACKWARD: the block's coefficients are copied to local
    # arrays first (they stay in L1 and cannot alias `out`), then each row is
    # one vectorized loop: in float64 for float64 data (q0..q3), in float32
    # arithmetic with split means for float32 and 16-bit data, as in
    # _apply_f32 (16-bit rows converted to float32 buffers and back).
    # relu: max(y, 0) (OP_NORMALIZE); dy masked by y(x) > 0 with the
    # forward's scale ys and offset yb (OP_BACKWARD).
    cdef double q0[COL_BLOCK]
    cdef double q1[COL_BLOCK]
    cdef double q2[COL_BLOCK]
    cdef double q3[COL_BLOCK]
    cdef double y1[COL_BLOCK]
    cdef double y2[COL_BLOCK]
    cdef float mean_hi[COL_BLOCK]
    cdef float mean_lo[COL_BLOCK]
    cdef float k1[COL_BLOCK]
    cdef float k2_hi[COL_BLOCK]
    cdef float k2_lo[COL_BLOCK]
    cdef float k3[COL_BLOCK]
    cdef float y_k1[COL_BLOCK]
    cdef float y_k2[COL_BLOCK]
    cdef float buf_a[COL_BLOCK]
    cdef float buf_b[COL_BLOCK]
    cdef float buf_out[COL_BLOCK]
    cdef Py_ssize_t n = c1 - c0
    cdef Py_ssize_t r, j
    cdef const storage* ar
    cdef const storage* br
    cdef storage* outr
    cdef const float* fa
    cdef const float* fb
    cdef float* fo
    cdef double v, d
    cdef float fv, fd
    if op != OP_NORMALIZE and op != OP_BACKWARD:
        for r in range(r0, r1):
            _apply(op, a + r * C + c0, b + r * C + c0, out + r * C + c0, n,
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
            mean_hi[j] = <float>p0[c0 + j]
            mean_lo[j] = <float>(p0[c0 + j] - <double>mean_hi[j])
            k1[j] = <float>p1[c0 + j]
            k2_hi[j] = <float>p2[c0 + j]
            k2_lo[j] = <float>(p2[c0 + j] - <double>k2_hi[j])
            k3[j] = <float>p3[c0 + j]
            if relu and op == OP_BACKWARD:
                y_k1[j] = <float>ys[c0 + j]
                y_k2[j] = <float>yb[c0 + j]
    for r in range(r0, r1):
        ar = a + r * C + c0
        br = b + r * C + c0
        outr = out + r * C + c0
        if prefetch and r + ROWS_AHEAD < r1:
            _prefetch_rows(ar + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(storage), False)
            if op == OP_BACKWARD:
                _prefetch_rows(br + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(storage), False)
            _prefetch_rows(outr + ROWS_AHEAD * C, 0, 0, 1, n * sizeof(storage), True)
        if storage is double:
            if op == OP_NORMALIZE:
                # out = (x - mean) * scale + offset
                if relu:
                    for j in range(n):
                        v = (ar[j] - q0[j]) * q1[j] + q2[j]
                        outr[j] = 0.0 if v < 0 else v
                else:
                    for j in range(n):
                        outr[j] = (ar[j] - q0[j]) * q1[j] + q2[j]
            elif relu:
                for j in range(n):
                    d = ar[j] if (br[j] - q0[j]) * y1[j] + y2[j] > 0 else 0.0
                    outr[j] = q1[j] * ((d - q2[j]) - (br[j] - q0[j]) * q3[j])
            else:
                # out = k_scale * ((dy - mean_dy) - (x - mean) * k_xmu)
                for j in range(n):
                    outr[j] = q1[j] * ((ar[j] - q2[j]) - (br[j] - q0[j]) * q3[j])
        else:
            if storage is float:
                fa = ar
                fb = br
                fo = outr
            else:
                _load(ar, buf_a, n)
                if op == OP_BACKWARD:
                    _load(br, buf_b, n)
                fa = buf_a
                fb = buf_b
                fo = buf_out
            if op == OP_NORMALIZE:
                # out = (x - mean) * scale + offset   (p2 = offset is not split)
                if relu:
                    for j in range(n):
                        fv = ((fa[j] - mean_hi[j]) - mean_lo[j]) * k1[j] + k2_hi[j]
                        fo[j] = 0.0 if fv < 0 else fv
                else:
                    for j in range(n):
                        fo[j] = ((fa[j] - mean_hi[j]) - mean_lo[j]) * k1[j] + k2_hi[j]
            elif relu:
                for j in range(n):
                    fd = (fa[j] if ((fb[j] - mean_hi[j]) - mean_lo[j]) * y_k1[j] + y_k2[j] > 0
                          else 0.0)
                    fo[j] = k1[j] * (((fd - k2_hi[j]) - k2_lo[j])
                                     - ((fb[j] - mean_hi[j]) - mean_lo[j]) * k3[j])
            else:
                # out = k_scale * ((dy - mean_dy) - (x - mean) * k_xmu)
                for j in range(n):
                    fo[j] = k1[j] * (((fa[j] - k2_hi[j]) - k2_lo[j])
                                     - ((fb[j] - mean_hi[j]) - mean_lo[j]) * k3[j])
            if not (storage is float):
                _store(buf_out, outr, n)


cdef void _elementwise(int op, const storage* a, const storage* b, storage* out,
                       Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
                       const double* p0, const double* p1, const double* p2,
                       const double* p3, int nthreads, bint relu, const double* ys,
                       const double* yb) noexcept nogil:
    # Applies `op` to the whole array. Channel path (B > 1): rows are (a, c)
    # segments of B values; work items group short rows or split long ones so
    # each holds about ELEM_BLOCK values. Row path (B == 1): work items are
    # blocks of rows times blocks of at most COL_BLOCK channels.
    # relu, ys, yb: the fused ReLU (see _apply).
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
                        p0, p1, p2, p3, True, relu, ys, yb)
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
                   p0 + c, p1 + c, p2 + c, p3 + c, False, relu,
                   ys + c if ys != NULL else NULL, yb + c if yb != NULL else NULL)


cdef inline void _rows_block_sums(const storage* a, const storage* b, Py_ssize_t A,
                                  Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                                  const double* ka, const double* kb, double* partials,
                                  double* sum_u, double* sum_uv, const double* ys,
                                  const double* yb) noexcept nogil:
    # Row path, all rows of channels c0..c1-1: the same row chunks, partials
    # and merge order as _reduce, so fused and unfused results are identical.
    cdef Py_ssize_t n_rchunk = _row_chunks(A, C)
    cdef Py_ssize_t r, c
    for r in range(n_rchunk):
        _rows_sums(a, b, C, r * A // n_rchunk, (r + 1) * A // n_rchunk, c0, c1, ka, kb,
                   0, partials + r * C, partials + (n_rchunk + r) * C, ys, yb)
    for c in range(c0, c1):
        sum_u[c] = _merge(partials + c, n_rchunk, C)
        sum_uv[c] = _merge(partials + n_rchunk * C + c, n_rchunk, C)


cdef void _fused_forward_rows(const storage* x, storage* out, Py_ssize_t A, Py_ssize_t C,
                              const double* shift, double eps, const double* gamma,
                              const double* beta, double* mean, double* var,
                              double* scale, double* offset, double* partials,
                              double* sums, int nthreads, bint relu) noexcept nogil:
    # Row path, one block of channels per work item: statistics over all rows
    # of the block, then normalize the block while it is still in L2
    # (_row_fuse_blocks keeps a block within ROW_FUSE_BYTES).
    cdef Py_ssize_t n_cblk = _row_fuse_blocks(A, C, sizeof(storage), 2)   # x, out
    cdef Py_ssize_t j, c, c0, c1
    for j in prange(n_cblk, nogil=True, num_threads=nthreads, schedule='dynamic'):
        c0 = j * C // n_cblk
        c1 = (j + 1) * C // n_cblk
        _rows_block_sums(x, x, A, C, c0, c1, shift, shift, partials, sums, sums + C,
                         NULL, NULL)
        for c in range(c0, c1):
            _forward_coefs(c, sums[c], sums[C + c], shift[c], <double>A, eps, gamma, beta,
                           mean, var, scale, offset)
        _rows_apply(OP_NORMALIZE, x, x, out, C, 0, A, c0, c1, mean, scale, offset, offset,
                    False, relu, NULL, NULL)


cdef void _fused_backward_rows(const storage* dy, const storage* x, storage* out,
                               Py_ssize_t A, Py_ssize_t C, const double* mean,
                               const double* invstd, const double* gamma,
                               const double* zeros, double* sum_dy, double* sum_dy_xhat,
                               double* k_scale, double* k_mean_dy, double* k_xmu,
                               double* partials, double* sums, int nthreads,
                               const double* ys, const double* yb) noexcept nogil:
    # Row path, one block of channels per work item: reduce over all rows of
    # the block, then the elementwise pass while dy and x are still in L2.
    cdef Py_ssize_t n_cblk = _row_fuse_blocks(A, C, sizeof(storage), 3)   # dy, x, out
    cdef Py_ssize_t j, c, c0, c1
    for j in prange(n_cblk, nogil=True, num_threads=nthreads, schedule='dynamic'):
        c0 = j * C // n_cblk
        c1 = (j + 1) * C // n_cblk
        _rows_block_sums(dy, x, A, C, c0, c1, zeros, mean, partials, sums, sums + C, ys, yb)
        for c in range(c0, c1):
            _backward_coefs(c, sums[c], sums[C + c], <double>A, invstd, gamma, sum_dy,
                            sum_dy_xhat, k_scale, k_mean_dy, k_xmu)
        _rows_apply(OP_BACKWARD, dy, x, out, C, 0, A, c0, c1, mean, k_scale, k_mean_dy,
                    k_xmu, False, ys != NULL, ys, yb)


cdef void _fused_forward_channels(const storage* x, storage* out, Py_ssize_t A,
                                  Py_ssize_t C, Py_ssize_t B, const double* shift,
                                  double eps, const double* gamma, const double* beta,
                                  double* mean, double* var, double* scale,
                                  double* offset, double* partials,
                                  int nthreads, bint relu) noexcept nogil:
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
                                shift[c], shift[c], part + 2 * k, NULL, NULL)
        _forward_coefs(c, _merge(part, n_chunk, 2), _merge(part + 1, n_chunk, 2), shift[c],
                       <double>M, eps, gamma, beta, mean, var, scale, offset)
        # No write prefetch of the next output row here: measured at
        # (64, 256, 56, 56), 2 threads, the float32 forward is ~10% faster
        # without it (float16 ~4%).
        for row in range(A):
            _apply(OP_NORMALIZE, x + (row * C + c) * B, x, out + (row * C + c) * B, B,
                   mean + c, scale + c, offset + c, offset + c, False, relu, NULL, NULL)


cdef void _fused_backward_channels(const storage* dy, const storage* x, storage* out,
                                   Py_ssize_t A, Py_ssize_t C, Py_ssize_t B,
                                   const double* mean, const double* invstd,
                                   const double* gamma, const double* zeros,
                                   double* sum_dy, double* sum_dy_xhat,
                                   double* k_scale, double* k_mean_dy, double* k_xmu,
                                   double* partials, int nthreads, const double* ys,
                                   const double* yb) noexcept nogil:
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
                                zeros[c], mean[c], part + 2 * k, ys, yb)
        _backward_coefs(c, _merge(part, n_chunk, 2), _merge(part + 1, n_chunk, 2),
                        <double>M, invstd, gamma, sum_dy, sum_dy_xhat,
                        k_scale, k_mean_dy, k_xmu)
        for row in range(A):
            _prefetch_row_for_write(out, row, A, C, B, c)
            _apply(OP_BACKWARD, dy + (row * C + c) * B, x + (row * C + c) * B,
                   out + (row * C + c) * B, B, mean + c, k_scale + c, k_mean_dy + c,
                   k_xmu + c, False, ys != NULL, ys + c if ys != NULL else NULL,
                   yb + c if yb != NULL else NULL)

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


# ---------------------------------------------------------------------------
# From Python objects to typed pointers: every entry point finds the storage
# kind of its arrays once, takes their data pointers, and calls the fused
# driver's specialization for that kind without the GIL.
# ---------------------------------------------------------------------------

cdef enum:
    KIND_F32 = 0
    KIND_F64 = 1
    KIND_F16 = 2
    KIND_BF16 = 3


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


cdef void* _vector(v) except NULL:
    # Data pointer of a float64 (C,) array made by _channel_vector.
    return _data(v, False)


cdef void _reduce_any(int kind, const void* a, const void* b, Py_ssize_t A, Py_ssize_t C,
                      Py_ssize_t B, const double* ka, const double* kb, double* sum_u,
                      double* sum_uv, double* partials, int nthreads, const double* ys,
                      const double* yb) noexcept nogil:
    if kind == KIND_F32:
        _reduce(<const float*>a, <const float*>b, A, C, B, ka, kb, sum_u, sum_uv, partials,
                nthreads, ys, yb)
    elif kind == KIND_F64:
        _reduce(<const double*>a, <const double*>b, A, C, B, ka, kb, sum_u, sum_uv, partials,
                nthreads, ys, yb)
    elif kind == KIND_F16:
        _reduce(<const f16_t*>a, <const f16_t*>b, A, C, B, ka, kb, sum_u, sum_uv, partials,
                nthreads, ys, yb)
    else:
        _reduce(<const bf16_t*>a, <const bf16_t*>b, A, C, B, ka, kb, sum_u, sum_uv, partials,
                nthreads, ys, yb)


cdef void _elementwise_any(int kind, int op, const void* a, const void* b, void* out,
                           Py_ssize_t A, Py_ssize_t C, Py_ssize_t B, const double* p0,
                           const double* p1, const double* p2, const double* p3,
                           int nthreads, bint relu, const double* ys,
                           const double* yb) noexcept nogil:
    if kind == KIND_F32:
        _elementwise(op, <const float*>a, <const float*>b, <float*>out, A, C, B,
                     p0, p1, p2, p3, nthreads, relu, ys, yb)
    elif kind == KIND_F64:
        _elementwise(op, <const double*>a, <const double*>b, <double*>out, A, C, B,
                     p0, p1, p2, p3, nthreads, relu, ys, yb)
    elif kind == KIND_F16:
        _elementwise(op, <const f16_t*>a, <const f16_t*>b, <f16_t*>out, A, C, B,
                     p0, p1, p2, p3, nthreads, relu, ys, yb)
    else:
        _elementwise(op, <const bf16_t*>a, <const bf16_t*>b, <bf16_t*>out, A, C, B,
                     p0, p1, p2, p3, nthreads, relu, ys, yb)


def _reduce_py(a, b, ka, kb, ys=None, yb=None):
    """Per-channel ``sum(a - ka)`` and ``sum((a - ka) * (b - kb))`` in float64.

    With ``ys``/``yb`` (float64 ``(C,)``), ``a`` (= dy) is first masked by
    ``y(b) > 0``, ``y`` the forward's normalize of ``b`` (= x) with mean
    ``kb``, scale ``ys`` and offset ``yb`` (the fused ReLU).
    """
    cdef Py_ssize_t A = a.shape[0], C = a.shape[1], B = a.shape[2]
    cdef int kind = _kind(a)
    cdef int nthreads = _threads_for(A * C * B)
    _check_pair(kind, b, a.shape)
    sum_u = np.empty(C, dtype=np.float64)
    sum_uv = np.empty(C, dtype=np.float64)
    partials = _partials_buffer(A, C, B)
    ka = _channel_vector(ka)
    kb = _channel_vector(kb)
    cdef const void* pa = _data(a, False)
    cdef const void* pb = _data(b, False)
    cdef const double* pka = <const double*>_vector(ka)
    cdef const double* pkb = <const double*>_vector(kb)
    cdef double* psu = <double*>_data(sum_u, True)
    cdef double* psuv = <double*>_data(sum_uv, True)
    cdef double* ppart = <double*>_data(partials, True)
    cdef const double* pys = NULL
    cdef const double* pyb = NULL
    if ys is not None:
        ys = _channel_vector(ys)
        yb = _channel_vector(yb)
        pys = <const double*>_vector(ys)
        pyb = <const double*>_vector(yb)
    with nogil:
        _reduce_any(kind, pa, pb, A, C, B, pka, pkb, psu, psuv, ppart, nthreads, pys, pyb)
    return sum_u, sum_uv


def _elementwise_py(int op, a, b, out, p0, p1, p2, p3, bint relu=False, ys=None, yb=None):
    """Apply elementwise ``op`` (an ``OP_*`` code) over the whole array."""
    cdef Py_ssize_t A = a.shape[0], C = a.shape[1], B = a.shape[2]
    cdef int kind = _kind(a)
    cdef int nthreads = _threads_for(A * C * B)
    _check_pair(kind, b, a.shape)
    _check_pair(kind, out, a.shape)
    p0 = _channel_vector(p0)
    p1 = _channel_vector(p1)
    p2 = _channel_vector(p2)
    p3 = _channel_vector(p3)
    cdef const void* pa = _data(a, False)
    cdef const void* pb = _data(b, False)
    cdef void* pout = _data(out, True)
    cdef const double* q0 = <const double*>_vector(p0)
    cdef const double* q1 = <const double*>_vector(p1)
    cdef const double* q2 = <const double*>_vector(p2)
    cdef const double* q3 = <const double*>_vector(p3)
    cdef const double* pys = NULL
    cdef const double* pyb = NULL
    if ys is not None:
        ys = _channel_vector(ys)
        yb = _channel_vector(yb)
        pys = <const double*>_vector(ys)
        pyb = <const double*>_vector(yb)
    with nogil:
        _elementwise_any(kind, op, pa, pb, pout, A, C, B, q0, q1, q2, q3, nthreads, relu,
                         pys, pyb)


def _channel_vector(v):
    return np.ascontiguousarray(v, dtype=np.float64)


# ---------------------------------------------------------------------------
# Conversions between 16-bit storage and float32 (the staged backward's
# intermediates, and the tests of the conversion helpers)
# ---------------------------------------------------------------------------

cdef void _convert_any(int kind, const void* src, void* dst, Py_ssize_t n, bint to_float,
                       int nthreads) noexcept nogil:
    # 16-bit <-> float32 over n values, in parallel blocks of ELEM_BLOCK.
    cdef Py_ssize_t n_items = (n + ELEM_BLOCK - 1) // ELEM_BLOCK
    cdef Py_ssize_t item, s, m
    for item in prange(n_items, nogil=True, num_threads=nthreads, schedule='static'):
        s = item * ELEM_BLOCK
        m = n - s
        if m > ELEM_BLOCK:
            m = ELEM_BLOCK
        if kind == KIND_F16:
            if to_float:
                _load(<const f16_t*>src + s, <float*>dst + s, m)
            else:
                _store(<const float*>src + s, <f16_t*>dst + s, m)
        else:
            if to_float:
                _load(<const bf16_t*>src + s, <float*>dst + s, m)
            else:
                _store(<const float*>src + s, <bf16_t*>dst + s, m)


def to_float32(x16):
    """A 16-bit array (float16 or bfloat16) as a new float32 array (exact).

    Parameters
    ----------
    x16 : ndarray, float16 or bfloat16, C-contiguous

    Returns
    -------
    ndarray, float32, same shape
    """
    cdef int kind = _kind(x16)
    if kind != KIND_F16 and kind != KIND_BF16:
        raise TypeError(f"a float16 or bfloat16 array expected, got {x16.dtype}")
    out = np.empty(x16.shape, dtype=np.float32)
    cdef Py_ssize_t n = x16.size
    cdef int nthreads = _threads_for(n)
    cdef const void* src = _data(x16, False)
    cdef void* dst = _data(out, True)
    with nogil:
        _convert_any(kind, src, dst, n, True, nthreads)
    return out


def from_float32(x32, out):
    """Round a float32 array to nearest even into a 16-bit array ``out``.

    Parameters
    ----------
    x32 : ndarray, float32, C-contiguous
    out : ndarray, float16 or bfloat16, C-contiguous, same shape
    """
    cdef int kind = _kind(out)
    if kind != KIND_F16 and kind != KIND_BF16:
        raise TypeError(f"a float16 or bfloat16 output expected, got {out.dtype}")
    if x32.dtype != np.float32 or x32.shape != out.shape:
        raise ValueError("a float32 array of the output's shape expected")
    cdef Py_ssize_t n = x32.size
    cdef int nthreads = _threads_for(n)
    cdef const void* src = _data(x32, False)
    cdef void* dst = _data(out, True)
    with nogil:
        _convert_any(kind, src, dst, n, False, nthreads)


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
            "enabled": bool(fastbn_f16c_enabled)}


def _use_f16c(bint enabled):
    """Switch the F16C float16 conversions on or off (tests use the portable path)."""
    global fastbn_f16c_enabled
    fastbn_f16c_enabled = 1 if enabled else 0


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


def normalize(x, mean, invstd, gamma, beta, out, relu=False):
    """``out = (x - mean) * invstd * gamma + beta``, then ``max(out, 0)`` with ``relu``.

    float32 and 16-bit data are computed in float32 arithmetic with a split
    mean (16-bit results rounded once), float64 data in float64.

    Parameters
    ----------
    x, out : ndarray, shape (A, C, B), one dtype (float32, float64, float16, bfloat16)
    mean, invstd, gamma, beta : ndarray, float64, shape (C,)
    relu : bool

    Returns
    -------
    None
        The result is written into ``out``.
    """
    mean = _channel_vector(mean)
    scale = _channel_vector(invstd) * _channel_vector(gamma)
    beta = _channel_vector(beta)
    _elementwise_py(OP_NORMALIZE, x, x, out, mean, scale, beta, beta, bool(relu))


# ---------------------------------------------------------------------------
# Training and evaluation entry points: the arrays become data pointers
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


cdef int _forward_train_driver(const storage* x, storage* out, Py_ssize_t A, Py_ssize_t C,
                               Py_ssize_t B, double eps, const double* gamma,
                               const double* beta, double* mean, double* invstd, void* rm,
                               void* rv, int kind, double momentum,
                               bint relu) noexcept nogil:
    # Statistics (fused with the normalize pass where the shape allows),
    # invstd, the running statistics, normalize (+ ReLU). Returns -1 when out
    # of memory.
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
        shift[c] = _value(x, c * B)          # x[0, c, 0], the shift of the sums
    if _use_fused(A * C * B * <Py_ssize_t>sizeof(storage), A, C, B, sizeof(storage), 2,
                  nthreads):
        if B == 1:
            _fused_forward_rows(x, out, A, C, shift, eps, gamma, beta, mean, var, scale,
                                offset, partials, sums, nthreads, relu)
        else:
            _fused_forward_channels(x, out, A, C, B, shift, eps, gamma, beta, mean, var,
                                    scale, offset, partials, nthreads, relu)
    else:
        _reduce(x, x, A, C, B, shift, shift, sums, sums + C, partials, nthreads, NULL, NULL)
        for c in range(C):
            _forward_coefs(c, sums[c], sums[C + c], shift[c], M, eps, gamma, beta, mean, var,
                           scale, offset)
        _elementwise(OP_NORMALIZE, x, x, out, A, C, B, mean, scale, offset, offset, nthreads,
                     relu, NULL, NULL)
    for c in range(C):
        invstd[c] = 1.0 / sqrt(var[c] + eps)
    _update_running(C, M, mean, var, rm, rv, kind, momentum)
    free(buf)
    return 0


cdef int _backward_driver(const storage* dy, const storage* x, storage* out, Py_ssize_t A,
                          Py_ssize_t C, Py_ssize_t B, const double* mean,
                          const double* invstd, const double* gamma, const double* beta,
                          double* sum_dy, double* sum_dy_xhat, bint training,
                          bint relu) noexcept nogil:
    # training: the simplified backward (fused where the shape allows);
    # otherwise the evaluation backward dx = dy * gamma * invstd. Both return
    # sum(dy) and invstd * sum(dy * (x - mean)). relu: dy is masked by
    # y > 0 first, y = (x - mean) * (invstd * gamma) + beta rebuilt in the
    # kernels with the forward's arithmetic. -1 when out of memory.
    cdef int nthreads = _threads_for(A * C * B)
    cdef Py_ssize_t n_part = _partials_size(A, C, B)
    cdef Py_ssize_t c
    cdef double M = <double>(A * B)
    cdef double* buf = <double*>malloc((8 * C + n_part) * sizeof(double))
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
    if relu:
        ys = buf + 6 * C
        yb = buf + 7 * C
        for c in range(C):
            ys[c] = invstd[c] * gamma[c]     # the forward's scale
            yb[c] = beta[c]
    if training and _use_fused(A * C * B * <Py_ssize_t>sizeof(storage), A, C, B,
                               sizeof(storage), 3, nthreads):
        if B == 1:
            _fused_backward_rows(dy, x, out, A, C, mean, invstd, gamma, zeros, sum_dy,
                                 sum_dy_xhat, k_scale, k_mean_dy, k_xmu, partials, sums,
                                 nthreads, ys, yb)
        else:
            _fused_backward_channels(dy, x, out, A, C, B, mean, invstd, gamma, zeros, sum_dy,
                                     sum_dy_xhat, k_scale, k_mean_dy, k_xmu, partials,
                                     nthreads, ys, yb)
    else:
        _reduce(dy, x, A, C, B, zeros, mean, sums, sums + C, partials, nthreads, ys, yb)
        for c in range(C):
            _backward_coefs(c, sums[c], sums[C + c], M, invstd, gamma, sum_dy, sum_dy_xhat,
                            k_scale, k_mean_dy, k_xmu)
        if training:
            _elementwise(OP_BACKWARD, dy, x, out, A, C, B, mean, k_scale, k_mean_dy, k_xmu,
                         nthreads, relu, ys, yb)
        elif relu:
            # dx = masked dy * (gamma * invstd): the backward op with zero
            # mean_dy and k_xmu, which masks dy with the forward's y.
            _elementwise(OP_BACKWARD, dy, x, out, A, C, B, mean, k_scale, zeros, zeros,
                         nthreads, relu, ys, yb)
        else:
            # dx = (dy - 0) * (gamma * invstd) + 0
            _elementwise(OP_NORMALIZE, dy, dy, out, A, C, B, zeros, k_scale, zeros, zeros,
                         nthreads, False, NULL, NULL)
    free(buf)
    return 0


cdef int _forward_eval_driver(const storage* x, storage* out, Py_ssize_t A, Py_ssize_t C,
                              Py_ssize_t B, double eps, const double* gamma,
                              const double* beta, double* mean, double* invstd,
                              const double* rm, const double* rv, bint relu) noexcept nogil:
    # mean = running_mean, invstd = 1 / sqrt(running_var + eps), normalize (+ ReLU).
    cdef int nthreads = _threads_for(A * C * B)
    cdef Py_ssize_t c
    cdef double* scale = <double*>malloc(C * sizeof(double))
    if scale == NULL:
        return -1
    for c in range(C):
        mean[c] = rm[c]
        invstd[c] = 1.0 / sqrt(rv[c] + eps)
        scale[c] = invstd[c] * gamma[c]
    _elementwise(OP_NORMALIZE, x, x, out, A, C, B, mean, scale, beta, beta, nthreads, relu,
                 NULL, NULL)
    free(scale)
    return 0


cdef int _forward_train_any(int xkind, const void* x, void* out, Py_ssize_t A, Py_ssize_t C,
                            Py_ssize_t B, double eps, const double* gamma,
                            const double* beta, double* mean, double* invstd, void* rm,
                            void* rv, int kind, double momentum, bint relu) noexcept nogil:
    if xkind == KIND_F32:
        return _forward_train_driver(<const float*>x, <float*>out, A, C, B, eps, gamma, beta,
                                     mean, invstd, rm, rv, kind, momentum, relu)
    if xkind == KIND_F64:
        return _forward_train_driver(<const double*>x, <double*>out, A, C, B, eps, gamma,
                                     beta, mean, invstd, rm, rv, kind, momentum, relu)
    if xkind == KIND_F16:
        return _forward_train_driver(<const f16_t*>x, <f16_t*>out, A, C, B, eps, gamma,
                                     beta, mean, invstd, rm, rv, kind, momentum, relu)
    return _forward_train_driver(<const bf16_t*>x, <bf16_t*>out, A, C, B, eps, gamma, beta,
                                 mean, invstd, rm, rv, kind, momentum, relu)


cdef int _forward_eval_any(int xkind, const void* x, void* out, Py_ssize_t A, Py_ssize_t C,
                           Py_ssize_t B, double eps, const double* gamma, const double* beta,
                           double* mean, double* invstd, const double* rm, const double* rv,
                           bint relu) noexcept nogil:
    if xkind == KIND_F32:
        return _forward_eval_driver(<const float*>x, <float*>out, A, C, B, eps, gamma, beta,
                                    mean, invstd, rm, rv, relu)
    if xkind == KIND_F64:
        return _forward_eval_driver(<const double*>x, <double*>out, A, C, B, eps, gamma,
                                    beta, mean, invstd, rm, rv, relu)
    if xkind == KIND_F16:
        return _forward_eval_driver(<const f16_t*>x, <f16_t*>out, A, C, B, eps, gamma, beta,
                                    mean, invstd, rm, rv, relu)
    return _forward_eval_driver(<const bf16_t*>x, <bf16_t*>out, A, C, B, eps, gamma, beta,
                                mean, invstd, rm, rv, relu)


cdef int _backward_any(int xkind, const void* dy, const void* x, void* out, Py_ssize_t A,
                       Py_ssize_t C, Py_ssize_t B, const double* mean, const double* invstd,
                       const double* gamma, const double* beta, double* sum_dy,
                       double* sum_dy_xhat, bint training, bint relu) noexcept nogil:
    if xkind == KIND_F32:
        return _backward_driver(<const float*>dy, <const float*>x, <float*>out, A, C, B, mean,
                                invstd, gamma, beta, sum_dy, sum_dy_xhat, training, relu)
    if xkind == KIND_F64:
        return _backward_driver(<const double*>dy, <const double*>x, <double*>out, A, C, B,
                                mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, training, relu)
    if xkind == KIND_F16:
        return _backward_driver(<const f16_t*>dy, <const f16_t*>x, <f16_t*>out, A, C, B,
                                mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, training, relu)
    return _backward_driver(<const bf16_t*>dy, <const bf16_t*>x, <bf16_t*>out, A, C, B,
                            mean, invstd, gamma, beta, sum_dy, sum_dy_xhat, training, relu)


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
                  double momentum=0.1, relu=False):
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

    Returns
    -------
    mean, invstd : ndarray, float64, shape (C,)
    """
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef int xkind = _kind(x)
    _check_pair(xkind, out, x.shape)
    gamma = _channel_vector(gamma)
    beta = _channel_vector(beta)
    mean = np.empty(C)
    invstd = np.empty(C)
    cdef const void* px = _data(x, False)
    cdef void* pout = _data(out, True)
    cdef const double* pg = <const double*>_vector(gamma)
    cdef const double* pb = <const double*>_vector(beta)
    cdef double* pmean = <double*>_data(mean, True)
    cdef double* pinvstd = <double*>_data(invstd, True)
    cdef int kind = RUNNING_NONE
    cdef void* rm_p = NULL
    cdef void* rv_p = NULL
    cdef int status
    cdef bint relu_c = bool(relu)
    if running_mean is not None:
        rm, rv, _ = running_arrays(running_mean, running_var, mean, invstd)
        kind = RUNNING_F32 if rm.itemsize == 4 else RUNNING_F64
        rm_p = _running_pointer(rm, kind)
        rv_p = _running_pointer(rv, kind)
    with nogil:
        status = _forward_train_any(xkind, px, pout, A, C, B, eps, pg, pb, pmean, pinvstd,
                                    rm_p, rv_p, kind, momentum, relu_c)
    if status != 0:
        raise MemoryError()
    if kind != RUNNING_NONE and rm is not running_mean:
        running_mean[...] = rm
        running_var[...] = rv
    return mean, invstd


def forward_eval(x, gamma, beta, running_mean, running_var, double eps, out, relu=False):
    """Evaluation forward: normalize with the running statistics (+ fused ReLU).

    Returns
    -------
    mean, invstd : ndarray, float64, shape (C,)
        ``running_mean`` and ``1 / sqrt(running_var + eps)``.
    """
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef int xkind = _kind(x)
    _check_pair(xkind, out, x.shape)
    gamma = _channel_vector(gamma)
    beta = _channel_vector(beta)
    mean = np.empty(C)
    invstd = np.empty(C)
    rm, rv = readable_running(running_mean, running_var)
    rm = _channel_vector(rm)
    rv = _channel_vector(rv)
    cdef const void* px = _data(x, False)
    cdef void* pout = _data(out, True)
    cdef const double* pg = <const double*>_vector(gamma)
    cdef const double* pb = <const double*>_vector(beta)
    cdef double* pmean = <double*>_data(mean, True)
    cdef double* pinvstd = <double*>_data(invstd, True)
    cdef const double* prm = <const double*>_vector(rm)
    cdef const double* prv = <const double*>_vector(rv)
    cdef int status
    cdef bint relu_c = bool(relu)
    with nogil:
        status = _forward_eval_any(xkind, px, pout, A, C, B, eps, pg, pb, pmean, pinvstd,
                                   prm, prv, relu_c)
    if status != 0:
        raise MemoryError()
    return mean, invstd


def _backward(dy, x, mean, invstd, gamma, out, bint training, beta, relu):
    cdef Py_ssize_t A = x.shape[0], C = x.shape[1], B = x.shape[2]
    cdef int xkind = _kind(x)
    cdef bint relu_c = bool(relu)
    _check_pair(xkind, dy, x.shape)
    _check_pair(xkind, out, x.shape)
    mean = _channel_vector(mean)
    invstd = _channel_vector(invstd)
    gamma = _channel_vector(gamma)
    if relu_c:
        if beta is None:
            raise ValueError("relu=True needs the forward's beta")
        beta = _channel_vector(beta)
    else:
        beta = mean          # not read
    sum_dy = np.empty(C)
    sum_dy_xhat = np.empty(C)
    cdef const void* pdy = _data(dy, False)
    cdef const void* px = _data(x, False)
    cdef void* pout = _data(out, True)
    cdef const double* pmean = <const double*>_vector(mean)
    cdef const double* pinvstd = <const double*>_vector(invstd)
    cdef const double* pg = <const double*>_vector(gamma)
    cdef const double* pb = <const double*>_vector(beta)
    cdef double* psd = <double*>_data(sum_dy, True)
    cdef double* psdx = <double*>_data(sum_dy_xhat, True)
    cdef int status
    with nogil:
        status = _backward_any(xkind, pdy, px, pout, A, C, B, pmean, pinvstd, pg, pb, psd,
                               psdx, training, relu_c)
    if status != 0:
        raise MemoryError()
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
        _elemt_coefs(c, sum_dy_v[c], sum_dy_xhat_v[c], M, &invstd_v[0], &gamma_v[0],
                     &k_scale_v[0], &k_mean_dy_v[0], &k_xmu_v[0])
    if relu:
        if beta is None:
            raise ValueError("relu=True needs the forward's beta")
        _elementwise_py(OP_BACKWARD, dy, x, out, _channel_vector(mean), k_scale, k_mean_dy,
                        k_xmu, True, np.asarray(invstd_v) * np.asarray(gamma_v), beta)
    else:
        _elementwise_py(OP_BACKWARD, dy, x, out, _channel_vector(mean), k_scale, k_mean_dy,
                        k_xmu)


def backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
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

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    return _backward(dy, x, mean, invstd, gamma, out, True, beta, relu)


def backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False):
    """The staged (cs231n) backward graph, one parallel pass per stage.

    Every full-size stage writes an intermediate of the compute dtype
    (``x.dtype``; float32 for 16-bit data, whose ``x`` and ``dy`` are first
    converted to float32 and whose ``dx`` is rounded once into ``out``);
    reductions accumulate in float64. With ``relu`` the graph has one more
    stage on top: ``y`` rebuilt full-size by the forward's normalize, then
    ``dy = where(y > 0, dy, 0)`` full-size. It stays staged on purpose: it
    is the baseline that the simplified backward is measured against.

    Parameters
    ----------
    dy, x, out : ndarray, shape (A, C, B), one dtype (float32, float64, float16, bfloat16)
    mean, invstd, gamma : ndarray, float64, shape (C,)
    eps : float
        Unused: ``invstd`` already holds ``1 / sqrt(var + eps)``.
    beta : ndarray, float64, shape (C,), or None (read only with ``relu``)
    relu : bool

    Returns
    -------
    dgamma, dbeta : ndarray, float64, shape (C,)
    """
    cdef int kind = _kind(x)
    _check_pair(kind, dy, x.shape)
    _check_pair(kind, out, x.shape)
    cdef bint is16 = kind == KIND_F16 or kind == KIND_BF16
    # Full-size arrays of the compute dtype allocated below: xmu, xhat (later
    # dxhat, dsq, dx1), dxmu1, dxmu2, y with relu, and for 16-bit storage the
    # float32 x, dy and out. Refused before any is allocated if they cannot fit.
    _memory.require((4 + int(bool(relu)) + 3 * is16) * x.size * (4 if is16 else x.itemsize),
                    "the staged backward")
    if is16:
        x = to_float32(x)
        dy = to_float32(dy)
        out16 = out
        out = np.empty(x.shape, dtype=np.float32)
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

    if relu:
        if beta is None:
            raise ValueError("relu=True needs the forward's beta")
        y = np.empty_like(x)
        normalize(x, mean, invstd, gamma, beta, y)       # y, as the forward built it
        dy_masked = y                                     # (y is no longer needed)
        elementwise(OP_MASK, dy, y, zeros, dy_masked)     # dy = where(y > 0, dy, 0)
        dy = dy_masked
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
    if kind == KIND_F16 or kind == KIND_BF16:
        from_float32(out, out16)                          # dx rounded once to 16 bits
    return dgamma, dbeta
