/* What the compiler and the OpenMP runtime give the Cython + OpenMP kernels:
   the thread count, prefetch hints and the widest float vectors. */
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
