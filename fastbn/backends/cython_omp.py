"""The Cython + OpenMP backend (``backend="cython"``).

The kernels live in the compiled extension :mod:`fastbn.backends._cython_omp`
(built by meson-python from ``_cython_omp.pyx``); this module re-exports them
under the names of the kernel contract (see :mod:`fastbn.backends`). Importing
it never raises: when the extension is missing or broken,
:func:`availability` returns ``(False, "extension not built: <reason>")`` and
every kernel raises :class:`RuntimeError`.

Storage dtypes: float32, float64, float16 and bfloat16 (``ml_dtypes``); 16-bit
arrays are read as uint16 bit patterns and converted in the kernels (exact
loads, round-to-nearest-even stores; float16 through the x86-64 F16C
instructions where the CPU has them). Every kernel takes the fused ReLU
(``relu=True``; the backward kernels also take the forward's ``beta``).

In a process forked from one that imported fastbn, the kernels run on one
thread (:mod:`fastbn.backends._fork`): libgomp's thread pool of the parent
is not inherited, and a parallel region would wait for it forever.
"""

import os

from .. import machine as _machine
from . import _fork

ON_DEVICE = False

# Cache-dependent block sizes, from this machine's caches (set in the
# extension at import): a fused block of channels (all rows, every array it
# touches) within half of L2, so its second read comes from L2; the channel
# path fuses arrays of at least half the last-level share that
# numba_cpu.FUSED_MIN_BYTES counts on (all of L3, or 16 L2s where it is
# shared by more cores than that). Smaller arrays stay in the last-level
# cache between two plain passes, which are then faster.
CACHES = _machine.cache_sizes()
ROW_FUSE_BYTES = CACHES["l2"] // 2
FUSE_MIN_BYTES = min(CACHES["l3"], 16 * CACHES["l2"]) // 2


def _source_tree_root():
    """The repository root when this fastbn is an uncompiled source tree, else None.

    A source tree has ``_cython_omp.pyx`` beside this file, a ``pyproject.toml``
    two levels up, and no compiled ``_cython_omp`` module beside it: what
    Python imports when run from a clone's root without the package built.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    if not (os.path.exists(os.path.join(here, "_cython_omp.pyx"))
            and os.path.exists(os.path.join(root, "pyproject.toml"))):
        return None
    if any(name.startswith("_cython_omp.") and name.endswith((".so", ".pyd"))
           for name in os.listdir(here)):
        return None
    return root


try:
    from fastbn.backends import _cython_omp as _ext
except Exception as exc:  # ImportError, or a broken build (missing symbol)
    _ext = None
    _ROOT = _source_tree_root() if isinstance(exc, ImportError) else None
    if _ROOT is not None:
        _IMPORT_ERROR = (f"this fastbn is imported from a source tree at {_ROOT}, where "
                         "the extension is not compiled; pip install . or an editable "
                         "install (pip install --no-build-isolation -e .) builds it")
    else:
        _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = ""
    _ext.set_cache_tuning(ROW_FUSE_BYTES, FUSE_MIN_BYTES)
    # A forked child runs the kernels on one thread (see fastbn.backends._fork),
    # also when this module is first imported there.
    os.register_at_fork(after_in_child=_ext.use_one_thread_after_fork)
    if _fork.in_forked_child():
        _ext.use_one_thread_after_fork()


def availability():
    """Whether the backend can run here.

    Returns
    -------
    available : bool
    reason : str
        Empty when available, else ``"extension not built: <reason>"``.
    """
    if _ext is None:
        return False, f"extension not built: {_IMPORT_ERROR}"
    return True, ""


def info():
    """Threads, OpenMP and device of this backend.

    Returns
    -------
    dict
        ``threads``: threads a kernel started now would use
        (``omp_get_max_threads()``, read at every call, so ``OMP_NUM_THREADS``
        and ``threadpoolctl`` limits show); ``openmp``: whether the extension
        was built with OpenMP; ``device``: ``"cpu"``; ``tuning``: the
        vector width the extension was compiled for (``vector_bytes``: 64
        with AVX-512, 32 with AVX, 16 otherwise) and the cache-dependent
        block sizes in use, with the cache sizes they come from.
    """
    if _ext is None:
        return {"threads": 0, "openmp": False, "device": "cpu"}
    tuning = {"vector_bytes": int(_ext.VECTOR_BYTES), **_ext.cache_tuning(),
              "caches": dict(CACHES)}
    return {"threads": int(_ext.max_threads()), "openmp": bool(_ext.OPENMP_ENABLED),
            "device": "cpu", "tuning": tuning}


def _missing(*args, **kwargs):
    raise RuntimeError(f"the cython backend cannot run: {availability()[1]}")


if _ext is not None:
    forward_train = _ext.forward_train
    forward_eval = _ext.forward_eval
    backward_eval = _ext.backward_eval
    stats = _ext.stats
    normalize = _ext.normalize
    backward_reduce = _ext.backward_reduce
    backward_elemt = _ext.backward_elemt
    backward_train = _ext.backward_train
    backward_staged = _ext.backward_staged
else:
    forward_train = forward_eval = backward_eval = stats = normalize = _missing
    backward_reduce = backward_elemt = backward_train = backward_staged = _missing
