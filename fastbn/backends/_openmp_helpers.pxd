# OpenMP shim: lets _cython_omp.pyx build with or without OpenMP.
#
# With OpenMP (the compiler defines _OPENMP), the helpers forward to the
# OpenMP runtime. Without it, they report one thread and Cython's prange
# loops run serially (its "#pragma omp" lines are then ignored).
# The idea is scikit-learn's sklearn/utils/_openmp_helpers.pxd; this is our
# own minimal version.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_OPENMP_ENABLED 1
    static inline int fastbn_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define FASTBN_OPENMP_ENABLED 0
    static inline int fastbn_max_threads(void) { return 1; }
    #endif
    """
    # 1 when the extension was compiled with OpenMP, else 0.
    bint FASTBN_OPENMP_ENABLED
    # omp_get_max_threads() with OpenMP (honours OMP_NUM_THREADS and
    # threadpoolctl's omp_set_num_threads), 1 without.
    int fastbn_max_threads() noexcept nogil
