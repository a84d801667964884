# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# The storage types of the kernels and their conversions to float32.
#
# float32 and float64 arrays are read as they are; float16 and bfloat16
# arrays arrive as their uint16 bit patterns, typed as two distinct one-field
# structs (half.h), so that all four are members of the fused type `storage`.
# Every kernel is written once over `storage`; 16-bit data are converted to
# float32 in blocks that stay in L1 (exactly), computed on as float32 data
# are, and results are rounded to nearest even once into 16-bit outputs.

from libc.math cimport ldexpf

cdef extern from "_cython/half.h":
    ctypedef struct f16_t "fastbn_f16":
        unsigned short bits
    ctypedef struct bf16_t "fastbn_bf16":
        unsigned short bits
    float fastbn_f16_to_f32(unsigned short h) noexcept nogil
    float fastbn_bf16_to_f32(unsigned short h) noexcept nogil
    void fastbn_load_f16(const f16_t* src, float* dst, Py_ssize_t n) noexcept nogil
    void fastbn_store_f16(const float* src, f16_t* dst, Py_ssize_t n) noexcept nogil
    void fastbn_load_bf16(const bf16_t* src, float* dst, Py_ssize_t n) noexcept nogil
    void fastbn_store_bf16(const float* src, bf16_t* dst, Py_ssize_t n) noexcept nogil
    # the portable float16 conversions (without the F16C dispatch), for the tests
    void fastbn_load_f16_soft(const unsigned short* src, float* dst, Py_ssize_t n) noexcept nogil
    void fastbn_store_f16_soft(const float* src, unsigned short* dst, Py_ssize_t n) noexcept nogil
    # F16C: compiled in, used on this CPU, and not switched off (0 forces the
    # portable path)
    int FASTBN_HAVE_F16C_PATH
    int fastbn_use_f16c() noexcept nogil
    int fastbn_f16c_enabled


# The compute types (float32 and float64 data; 16-bit data compute in float32).
ctypedef fused floating:
    float
    double

# What the kernels read and write.
ctypedef fused storage:
    float
    double
    f16_t
    bf16_t


cdef inline void load(const storage* src, float* dst, Py_ssize_t n) noexcept nogil:
    # n values of float32 or 16-bit storage as float32 (exact); not for float64.
    cdef Py_ssize_t i
    if storage is f16_t:
        fastbn_load_f16(src, dst, n)
    elif storage is bf16_t:
        fastbn_load_bf16(src, dst, n)
    elif storage is float:
        for i in range(n):
            dst[i] = src[i]


cdef inline void store(const float* src, storage* dst, Py_ssize_t n) noexcept nogil:
    # n float32 values into 16-bit storage, rounded to nearest even.
    if storage is f16_t:
        fastbn_store_f16(src, dst, n)
    elif storage is bf16_t:
        fastbn_store_bf16(src, dst, n)


cdef inline double value_at(const storage* p, Py_ssize_t i) noexcept nogil:
    # One value as float64 (exact).
    if storage is f16_t:
        return fastbn_f16_to_f32(p[i].bits)
    elif storage is bf16_t:
        return fastbn_bf16_to_f32(p[i].bits)
    else:
        return <double>p[i]


cdef inline float stored_as_zero(const storage* p) noexcept nogil:
    # The largest float32 value that rounds to 0 in this storage (round to
    # nearest even: half its smallest subnormal); p only selects the type.
    # float32 and float64 data store what was computed: 0.
    if storage is f16_t:
        return ldexpf(1.0, -25)
    elif storage is bf16_t:
        return ldexpf(1.0, -134)
    return 0
