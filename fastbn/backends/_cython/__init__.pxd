# Build-time sources of the Cython + OpenMP extension fastbn.backends._cython_omp
# (cimported by _cython_omp.pyx; nothing here is installed).
