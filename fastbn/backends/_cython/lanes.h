/* float64 sums of float32 data in registers, for the channel path.

   fastbn_sums_f32 adds, over n values, u = a - ka and u * v with
   v = b - kb, all in float64 (each float32 value converted exactly), into
   FASTBN_F32_LANES float64 lanes: value i into lane i % FASTBN_F32_LANES in
   increasing i; then lane j is added to acc_u[j] and acc_uv[j]. The lanes
   live in vector registers and a and b are read in order (sums.pxd's
   general lanes keep LANES partial sums in memory, loaded and stored every
   four values): 1.4x faster on float32 data, measured on a Zen 1 core.

   The order depends on n only: with AVX the lanes are two registers of four
   float64, with SSE2 (every x86-64 build) four registers of two; elsewhere
   a plain loop adds in the same order. No multiply-add is fused (the build
   has -ffp-contract=off), so the bits are the same in all three. */
#ifndef FASTBN_LANES_H
#define FASTBN_LANES_H

#include <stddef.h>

#define FASTBN_F32_LANES 8

/* Values i0..n-1 into lanes 0, 1, ... (the tail after the last whole group
   of lanes, or all of them), then lane j into acc_u[j] and acc_uv[j]. */
static inline void fastbn_lanes_finish(const float *a, const float *b, ptrdiff_t i0,
                                       ptrdiff_t n, double ka, double kb,
                                       double *lane_u, double *lane_uv,
                                       double *acc_u, double *acc_uv) {
    ptrdiff_t i;
    for (i = i0; i < n; i++) {
        double u = (double)a[i] - ka;
        double v = (double)b[i] - kb;
        lane_u[(i - i0) % FASTBN_F32_LANES] += u;
        lane_uv[(i - i0) % FASTBN_F32_LANES] += u * v;
    }
    for (i = 0; i < FASTBN_F32_LANES; i++) {
        acc_u[i] += lane_u[i];
        acc_uv[i] += lane_uv[i];
    }
}

#if defined(__AVX__)
#include <immintrin.h>

static inline void fastbn_sums_f32(const float *a, const float *b, ptrdiff_t n,
                                   double ka, double kb, double *acc_u, double *acc_uv) {
    __m256d su0 = _mm256_setzero_pd(), su1 = su0, suv0 = su0, suv1 = su0;
    __m256d ka4 = _mm256_set1_pd(ka), kb4 = _mm256_set1_pd(kb);
    double lane_u[FASTBN_F32_LANES], lane_uv[FASTBN_F32_LANES];
    ptrdiff_t i = 0;
    for (; i + FASTBN_F32_LANES <= n; i += FASTBN_F32_LANES) {
        __m256d u0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i)), ka4);
        __m256d u1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i + 4)), ka4);
        __m256d v0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(b + i)), kb4);
        __m256d v1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(b + i + 4)), kb4);
        su0 = _mm256_add_pd(su0, u0);
        su1 = _mm256_add_pd(su1, u1);
        suv0 = _mm256_add_pd(suv0, _mm256_mul_pd(u0, v0));
        suv1 = _mm256_add_pd(suv1, _mm256_mul_pd(u1, v1));
    }
    _mm256_storeu_pd(lane_u, su0);
    _mm256_storeu_pd(lane_u + 4, su1);
    _mm256_storeu_pd(lane_uv, suv0);
    _mm256_storeu_pd(lane_uv + 4, suv1);
    fastbn_lanes_finish(a, b, i, n, ka, kb, lane_u, lane_uv, acc_u, acc_uv);
}
#elif defined(__SSE2__)
#include <emmintrin.h>

/* u and u * v of two values (one register of two lanes) into the lanes */
#define FASTBN_LANE_PAIR(su, suv, a2, b2)                          \
    do {                                                           \
        __m128d u_ = _mm_sub_pd(_mm_cvtps_pd(a2), ka2);           \
        __m128d v_ = _mm_sub_pd(_mm_cvtps_pd(b2), kb2);           \
        su = _mm_add_pd(su, u_);                                   \
        suv = _mm_add_pd(suv, _mm_mul_pd(u_, v_));                 \
    } while (0)

static inline void fastbn_sums_f32(const float *a, const float *b, ptrdiff_t n,
                                   double ka, double kb, double *acc_u, double *acc_uv) {
    __m128d su0 = _mm_setzero_pd(), su1 = su0, su2 = su0, su3 = su0;
    __m128d suv0 = su0, suv1 = su0, suv2 = su0, suv3 = su0;
    __m128d ka2 = _mm_set1_pd(ka), kb2 = _mm_set1_pd(kb);
    double lane_u[FASTBN_F32_LANES], lane_uv[FASTBN_F32_LANES];
    ptrdiff_t i = 0;
    for (; i + FASTBN_F32_LANES <= n; i += FASTBN_F32_LANES) {
        __m128 a0 = _mm_loadu_ps(a + i), a1 = _mm_loadu_ps(a + i + 4);
        __m128 b0 = _mm_loadu_ps(b + i), b1 = _mm_loadu_ps(b + i + 4);
        FASTBN_LANE_PAIR(su0, suv0, a0, b0);
        FASTBN_LANE_PAIR(su1, suv1, _mm_movehl_ps(a0, a0), _mm_movehl_ps(b0, b0));
        FASTBN_LANE_PAIR(su2, suv2, a1, b1);
        FASTBN_LANE_PAIR(su3, suv3, _mm_movehl_ps(a1, a1), _mm_movehl_ps(b1, b1));
    }
    _mm_storeu_pd(lane_u, su0);
    _mm_storeu_pd(lane_u + 2, su1);
    _mm_storeu_pd(lane_u + 4, su2);
    _mm_storeu_pd(lane_u + 6, su3);
    _mm_storeu_pd(lane_uv, suv0);
    _mm_storeu_pd(lane_uv + 2, suv1);
    _mm_storeu_pd(lane_uv + 4, suv2);
    _mm_storeu_pd(lane_uv + 6, suv3);
    fastbn_lanes_finish(a, b, i, n, ka, kb, lane_u, lane_uv, acc_u, acc_uv);
}
#undef FASTBN_LANE_PAIR
#else
static inline void fastbn_sums_f32(const float *a, const float *b, ptrdiff_t n,
                                   double ka, double kb, double *acc_u, double *acc_uv) {
    double lane_u[FASTBN_F32_LANES] = {0}, lane_uv[FASTBN_F32_LANES] = {0};
    fastbn_lanes_finish(a, b, 0, n, ka, kb, lane_u, lane_uv, acc_u, acc_uv);
}
#endif

#endif /* FASTBN_LANES_H */
