/* 16-bit storage for the Cython + OpenMP kernels: float16 (IEEE binary16)
   and bfloat16 values as uint16 bit patterns, and their conversions to and
   from float32.

   The two formats are distinct one-field structs (fastbn_f16, fastbn_bf16),
   so that they are distinct members of the kernels' `storage` fused type
   (half.pxd). Loads are exact; stores round to nearest even; NaN stays NaN.
   The scalar conversions are branch-free (selects written as bit masks), so
   gcc vectorizes them on any x86-64 or aarch64. On x86-64 the float16 blocks
   use the F16C instructions (vcvtph2ps / vcvtps2ph, round-to-nearest-even)
   when the compiler targets them or, chosen at run time, when the CPU has
   them; fastbn_f16c_enabled = 0 forces the portable code (the tests compare
   both). */
#ifndef FASTBN_HALF_H
#define FASTBN_HALF_H

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

#endif /* FASTBN_HALF_H */
