"""Backend registry: name -> module, availability, and the default backend."""
import contextlib
import importlib
import threading
import warnings

# Registers the fork hook before any backend runs, so that a forked child
# knows it is one even if it loads its first backend there.
from .backends import _fork  # noqa: F401

# Known backends, fastest CPU backend first (by the medians in
# benchmarks/results/cpu_backends.md: numba is ahead of cython on most shapes
# and on the memory-bound ones); "cuda" runs on a GPU and is the default only
# for inputs that already live on the device.
_MODULES = {
    "numba": "fastbn.backends.numba_cpu",
    "cython": "fastbn.backends.cython_omp",
    "numpy": "fastbn.backends.numpy_backend",
    "cuda": "fastbn.backends.numba_cuda",
}
KNOWN_BACKENDS = tuple(_MODULES)

_lock = threading.Lock()
_loaded = {}            # name -> (module or None, available, reason)
_default = [None]       # process default set by set_backend
_fastest = []           # the fastest available CPU backend, once known
_local = threading.local()  # per-thread stack of use_backend names


def _load(name):
    """Import a backend module once and ask it whether it can run here."""
    with _lock:
        if name not in _loaded:
            try:
                module = importlib.import_module(_MODULES[name])
                available, reason = module.availability()
            except Exception as exc:  # a broken backend must not break the others
                module, available, reason = None, False, f"import failed: {exc!r}"
            _loaded[name] = (module, bool(available), reason)
        return _loaded[name]


def available_backends():
    """Names of the backends usable here, fastest CPU backend first.

    Returns
    -------
    tuple of str
        For example ``("numba", "cython", "numpy")``; ``"cuda"`` is listed
        last when a CUDA GPU (or the CUDA simulator) is available.
    """
    names = tuple(name for name in KNOWN_BACKENDS if _load(name)[1])
    _warn_source_tree()
    return names


_warned = set()


def source_tree_reasons():
    """``{name: reason}`` for the backends missing only because this fastbn is
    imported from an uncompiled source tree (see :func:`backend_info`)."""
    return {name: _loaded[name][2] for name in KNOWN_BACKENDS
            if name in _loaded and not _loaded[name][1] and "source tree" in _loaded[name][2]}


def _warn_source_tree():
    """Warn once per backend that is missing because the source tree is not built."""
    for name, reason in source_tree_reasons().items():
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"fastbn backend {name!r} is not available: {reason}",
                          RuntimeWarning, stacklevel=3)


def _check_name(name):
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; available backends: "
                         f"{', '.join(available_backends())}")
    module, available, reason = _load(name)
    if not available:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return module


def get_backend(name):
    """The module of backend ``name``; ``ValueError`` or ``RuntimeError`` if unusable."""
    entry = _loaded.get(name)
    if entry is not None and entry[1]:   # fast path: loaded and available
        return entry[0]
    return _check_name(name)


def default_backend():
    """The backend used when none is named: innermost ``use_backend`` block,
    else ``set_backend``'s choice, else the fastest available CPU backend."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _default[0] is not None:
        return _default[0]
    if not _fastest:
        # Availability is decided once per process (at a backend's first
        # load), so the fastest available CPU backend is looked up once.
        _fastest.append(next(name for name in available_backends() if name != "cuda"))
    return _fastest[0]


def set_backend(name):
    """Set the process-wide default backend.

    Parameters
    ----------
    name : str or None
        A name from :func:`available_backends`, or ``None`` to go back to
        the fastest available CPU backend.
    """
    if name is not None:
        _check_name(name)
    _default[0] = name


@contextlib.contextmanager
def use_backend(name):
    """Use backend ``name`` as the default inside a ``with`` block (this thread only).

    Examples
    --------
    >>> with fastbn.use_backend("numpy"):
    ...     out, cache = fastbn.batchnorm_forward(x)
    """
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def backend_info():
    """Facts about every known backend.

    Returns
    -------
    dict
        ``{name: {"available": bool, "reason": str, "threads": int,
        "openmp": bool, "device": str, ...}}``; the last keys only for
        available backends.
    """
    result = {}
    for name in KNOWN_BACKENDS:
        module, available, reason = _load(name)
        entry = {"available": available, "reason": reason}
        if available:
            entry.update(module.info())
        result[name] = entry
    return result
