"""Whether this process is a ``fork`` of one that may have started thread pools.

GNU OpenMP (libgomp) keeps its worker threads in a pool that a forked child
inherits as memory but not as threads: a parallel region of more than one
thread in the child waits forever for them. Numba's ``omp`` layer goes
further and terminates a child of the process that started it. The compiled
backends therefore run their kernels on one thread in any process created
by ``fork`` (at any depth) from a process that imported fastbn, and each
repairs what its threading runtime needs in the child (see
``numba_cpu._guard`` and ``cython_omp``). Children started by ``spawn`` or
``forkserver`` are new interpreters and get every core.

The kernels split their work by shape only, so a forked child's results are
bit for bit those of its parent.
"""
import os

_FORKED = [False]


def in_forked_child():
    """True in a process forked (directly or not) from one that imported fastbn."""
    return _FORKED[0]


def _mark_forked():
    _FORKED[0] = True


os.register_at_fork(after_in_child=_mark_forked)
