/* What the compiler and the OpenMP runtime give the Cython + OpenMP kernels:
   the thread count, prefetch hints, streaming stores and the widest float
   vectors. */
#ifndef FASTBN_CPU_H
#define FASTBN_CPU_H

/* OpenMP is optional (the idea is scikit-learn's _openmp_helpers.pxd): with
   OpenMP (the compiler defines _OPENMP) the thread count is the runtime's,
   which honours OMP_NUM_THREADS and threadpoolctl's omp_set_num_threads;
   without it one thread, and Cython's prange loops run serially (their
   "#pragma omp" lines are then ignored). */
#ifdef _OPENMP
#include <omp.h>
#define FASTBN_OPENMP_ENABLED 1
static inline int fastbn_max_threads(void) { return omp_get_max_threads(); }
#else
#define FASTBN_OPENMP_ENABLED 0
static inline int fastbn_max_threads(void) { return 1; }
#endif

/* Prefetch hints (no-ops for compilers without __builtin_prefetch). */
#if defined(__GNUC__) || defined(__clang__)
#define fastbn_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
#define fastbn_prefetch_write(p) __builtin_prefetch((const void *)(p), 1, 3)
#else
#define fastbn_prefetch(p) ((void)0)
#define fastbn_prefetch_write(p) ((void)0)
#endif

/* Streaming stores: fastbn_stream copies n bytes from an L1 buffer to dst
   with non-temporal stores where dst is 16-byte aligned (SSE2, every x86-64
   build), so that an output larger than the caches is written to memory
   without first being read into them (a plain store reads each line it
   writes, and evicts data the kernel reads again). Elsewhere a plain copy.
   A thread's streaming stores are made visible by fastbn_stream_fence()
   before other threads read its output. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
static inline void fastbn_stream(void *dst, const void *src, size_t n) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (head > n)
        head = n;
    memcpy(d, s, head);
    d += head; s += head; n -= head;
    for (; n >= 16; n -= 16, d += 16, s += 16)
        _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
    memcpy(d, s, n);
}
static inline void fastbn_stream_fence(void) { _mm_sfence(); }
#else
static inline void fastbn_stream(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
static inline void fastbn_stream_fence(void) { }
#endif

/* The widest float vectors the compiler was allowed to use (-march=native
   or not). */
#if defined(__AVX512F__)
#define FASTBN_VECTOR_BYTES 64
#elif defined(__AVX__)
#define FASTBN_VECTOR_BYTES 32
#else
#define FASTBN_VECTOR_BYTES 16
#endif

#endif /* FASTBN_CPU_H */
