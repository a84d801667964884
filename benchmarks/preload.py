"""Imports fastbn's backends and PyTorch once, before asv forks the benchmarks.

This module holds no benchmark. asv imports every module of the suite when
it discovers the benchmarks, and its ``forkserver`` launch method (``asv run
--launch-method forkserver``, used by ``fastbn dashboard --quick``) imports
them once in a server process and forks one child per benchmark and
parameter set. The children then start with Numba, the compiled extension
and PyTorch already imported (about 1.5 s per child otherwise on a small
machine). Nothing is run here: a thread pool started before ``fork`` (GNU
OpenMP's, Numba's) is not safe to use in the child.

With the ``spawn`` launch method (asv's default) every benchmark runs in a
fresh process that imports only its own module, so this one changes nothing
there.
"""
from .common import backends

try:
    import fastbn
except ImportError:  # a commit where fastbn does not build: setup skips it
    fastbn = None
else:
    # Imports the backend modules (Numba, the Cython extension) to check them.
    fastbn.available_backends()

if "torch" in backends():
    try:
        import torch  # noqa: F401
    except ImportError:  # PyTorch rows are skipped in setup
        pass
