"""Imports fastbn's backends and PyTorch once, before asv forks the benchmarks.

This module holds no benchmark. asv imports every module of the suite when
it discovers the benchmarks, and its ``forkserver`` launch method (``asv run
--launch-method forkserver``, used by ``fastbn dashboard --quick``) imports
them once in a server process and forks one child per benchmark and
parameter set. The children then start with Numba, the compiled extension
and PyTorch already imported (about 1.5 s per child otherwise on a small
machine), and with Numba's compiler set up by one small serial function
(setting it up costs about 0.9 s in every child that runs a Numba kernel,
even when each kernel comes from Numba's cache). No parallel kernel runs
here: a thread pool started before ``fork`` (GNU OpenMP's, which Numba's
``omp`` layer uses) is not safe to use in the child.

With the ``spawn`` launch method (asv's default) every benchmark runs in a
fresh process that imports only its own module, so this one changes nothing
there.
"""
from .common import params

try:
    import fastbn
except ImportError:  # a commit where fastbn does not build: setup skips it
    fastbn = None
else:
    # Imports the backend modules (Numba, the Cython extension) to check them.
    if "numba" in fastbn.available_backends():
        import numba
        import numpy as np

        # Serial, not cached: sets up the compiler, starts no thread.
        numba.njit(cache=False)(lambda values: values.sum())(np.ones(2))

if "torch" in params()[0]:
    try:
        import torch  # noqa: F401
    except ImportError:  # PyTorch rows are skipped in setup
        pass
