# Declarations of cpu.h: the OpenMP shim, prefetch hints, streaming
# stores, the vector width.

cdef extern from "_cython/cpu.h":
    # 1 when the extension was compiled with OpenMP, else 0.
    bint FASTBN_OPENMP_ENABLED
    # omp_get_max_threads() with OpenMP (honours OMP_NUM_THREADS and
    # threadpoolctl's omp_set_num_threads), 1 without.
    int fastbn_max_threads() noexcept nogil
    void fastbn_prefetch(const void* p) noexcept nogil
    void fastbn_prefetch_write(const void* p) noexcept nogil
    # n bytes from src to dst with non-temporal stores (SSE2; else memcpy),
    # and the fence that makes a thread's streaming stores visible.
    void fastbn_stream(void* dst, const void* src, size_t n) noexcept nogil
    void fastbn_stream_fence() noexcept nogil
    # 64 with AVX-512, 32 with AVX, 16 otherwise.
    int FASTBN_VECTOR_BYTES
