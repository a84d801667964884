"""The Cython + OpenMP backend (``backend="cython"``).

The kernels live in a compiled extension built by meson-python from
``_cython_omp.pyx`` and the sources it cimports from ``_cython/``: one per
instruction-set level, ``fastbn.backends._cython_omp_<level>``, of which this
module imports the highest this CPU runs (:func:`choose_variant`), or
``fastbn.backends._cython_omp`` in a ``-Dcpu=native`` build. This module
re-exports them under the names of the kernel contract (see
:mod:`fastbn.backends`), and walks the staged backward
(:mod:`fastbn.backends._staged`) over the extension's parallel elementwise
and reduction kernels. Importing it never raises: when the extension is
missing or broken, :func:`availability` returns
``(False, "extension not built: <reason>")`` and every kernel raises
:class:`RuntimeError`.

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

import numpy as np

from .. import machine as _machine
from .. import plans as _plans
from . import _fork, _host, _staged

ON_DEVICE = False

# Cache-dependent block sizes, from this machine's caches (set in the
# extension at import): a fused block of channels (all rows, every array it
# touches) within half of L2, so its second read comes from L2; the channel
# path fuses arrays of at least half the last-level share that
# numba_cpu.FUSED_MIN_BYTES counts on (all of L3, or 16 L2s where it is
# shared by more cores than that). Smaller arrays stay in the last-level
# cache between two plain passes, which are then faster. Outputs of at least
# the last-level share (in long rows) are written with streaming stores:
# they cannot stay in cache, and a plain store would first read each line it
# writes.
CACHES = _machine.cache_sizes()
ROW_FUSE_BYTES = CACHES["l2"] // 2
FUSE_MIN_BYTES = min(CACHES["l3"], 16 * CACHES["l2"]) // 2
STREAM_MIN_BYTES = min(CACHES["l3"], 16 * CACHES["l2"])


LEVEL_ENV = "FASTBN_CPU_LEVEL"


def _source_tree_root():
    """The repository root when this fastbn is an uncompiled source tree, else None.

    A source tree has ``_cython_omp.pyx`` beside this file, a ``pyproject.toml``
    two levels up, and no compiled ``_cython_omp*`` module beside it: what
    Python imports when run from a clone's root without the package built.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    if not (os.path.exists(os.path.join(here, "_cython_omp.pyx"))
            and os.path.exists(os.path.join(root, "pyproject.toml"))):
        return None
    if _built_variants():
        return None
    return root


def _built_variants():
    """``name -> module name`` of the extensions built beside this file:
    ``{"native": ...}`` for a ``-Dcpu=native`` build, else one per level."""
    here = os.path.dirname(os.path.abspath(__file__))
    variants = {}
    for filename in os.listdir(here):
        stem = filename.split(".")[0]
        if filename.endswith((".so", ".pyd")) and stem.startswith("_cython_omp"):
            level = stem[len("_cython_omp_"):] or "native"
            variants[level] = f"fastbn.backends.{stem}"
    return variants


def choose_variant(built, levels, forced=None):
    """The extension variant to load, and why.

    Parameters
    ----------
    built : collection of str
        The variants built: ``"native"``, or levels (``"baseline"``, ``"v3"``, ``"v4"``).
    levels : list of str
        The levels this CPU runs, lowest first (:func:`fastbn.machine.cpu_levels`).
    forced : str, optional
        A level asked for (``FASTBN_CPU_LEVEL``).

    Returns
    -------
    (str, str)
        The variant and the reason.

    Raises
    ------
    RuntimeError
        When ``forced`` is not built, or this CPU cannot run it (so that the
        extension is never imported where it would die of an illegal
        instruction), or no variant is built that this CPU runs.
    """
    if "native" in built:
        if forced:
            raise RuntimeError(f"{LEVEL_ENV}={forced}, but this fastbn was built with "
                               "-Dcpu=native (one variant, for the build machine's CPU); "
                               "unset it or build with -Dcpu=dispatch")
        return "native", "built with -march=native (-Dcpu=native): the build machine's CPU"
    if forced:
        if forced not in built:
            raise RuntimeError(f"{LEVEL_ENV}={forced}: not a variant of this build; "
                               f"built: {', '.join(sorted(built))}")
        if forced not in levels:
            lacks = ", ".join(_machine.missing_flags(forced))
            raise RuntimeError(f"{LEVEL_ENV}={forced}: this CPU cannot run it (it lacks "
                               f"{lacks}); it runs {', '.join(levels) or 'no known level'}")
        return forced, f"{LEVEL_ENV}={forced}"
    usable = [level for level in levels if level in built]
    if not usable:
        raise RuntimeError(f"no variant of this build runs on this CPU: built "
                           f"{', '.join(sorted(built)) or 'none'}, the CPU runs "
                           f"{', '.join(levels) or 'no known level'}")
    best = usable[-1]
    return best, (f"the highest level built that this CPU runs (it runs "
                  f"{', '.join(levels)}; built: {', '.join(sorted(built))})")


def _import_extension():
    """``(module, variant, reason)``: the extension chosen by :func:`choose_variant`."""
    import importlib

    built = _built_variants()
    forced = os.environ.get(LEVEL_ENV, "").strip().lower() or None
    variant, reason = choose_variant(built, _machine.cpu_levels(), forced)
    return importlib.import_module(built[variant]), variant, reason


try:
    _ext, VARIANT, VARIANT_REASON = _import_extension()
except Exception as exc:  # not built, a level this CPU lacks, or a broken build
    _ext = None
    VARIANT, VARIANT_REASON = None, ""
    _ROOT = _source_tree_root() if not _built_variants() else None
    if _ROOT is not None:
        _IMPORT_ERROR = (f"this fastbn is imported from a source tree at {_ROOT}, where "
                         "the extension is not compiled; pip install . or an editable "
                         "install (pip install --no-build-isolation -e .) builds it")
    elif isinstance(exc, RuntimeError):
        _IMPORT_ERROR = str(exc)
    else:
        _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = ""
    _ext.set_cache_tuning(ROW_FUSE_BYTES, FUSE_MIN_BYTES, STREAM_MIN_BYTES)
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
        if VARIANT is None and _built_variants():
            return False, _IMPORT_ERROR
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
        block sizes in use, with the cache sizes they come from;
        ``variant``: the instruction-set variant loaded (``"baseline"``,
        ``"v3"``, ``"v4"`` or ``"native"``) and ``variant_reason``: why.
    """
    if _ext is None:
        return {"threads": 0, "openmp": False, "device": "cpu"}
    tuning = {"vector_bytes": int(_ext.VECTOR_BYTES), **_ext.cache_tuning(),
              "caches": dict(CACHES)}
    return {"threads": int(_ext.max_threads()), "openmp": bool(_ext.OPENMP_ENABLED),
            "device": "cpu", "variant": VARIANT, "variant_reason": VARIANT_REASON,
            "tuning": tuning}


def _missing(*args, **kwargs):
    raise RuntimeError(f"the cython backend cannot run: {availability()[1]}")


class _StagedOps(_staged.HostChannels):
    """The staged walk's primitives: the extension's parallel passes.

    Every full-size primitive writes a new array of the compute dtype
    (float32 or float64) with one parallel pass; sums accumulate in float64.
    """

    def __init__(self, dtype, shape, storage):
        self.dtype = dtype
        self.shape = shape
        self.zeros = np.zeros(shape[1])
        # the mask keeps u where v > floor: where the forward stored out > 0
        self.floors = np.full(shape[1], _host.relu_floor(storage))

    def _new(self, op, u, v, p=None):
        out = np.empty(self.shape, dtype=self.dtype)
        p = self.zeros if p is None else p
        _ext._elementwise_py(_ext.OPS[op], u, v, out, p, p, p, p)
        return out

    def normalize(self, x, mean, invstd, gamma, beta):
        y = np.empty(self.shape, dtype=self.dtype)
        _ext.normalize(x, mean, invstd, gamma, beta, y)
        return y

    def mask_positive(self, u, v):
        return self._new("mask", u, v, self.floors)

    def subtract(self, u, p):
        return self._new("subtract", u, u, p)

    def multiply(self, u, p):
        return self._new("multiply", u, u, p)

    def broadcast(self, p):
        out = np.empty(self.shape, dtype=self.dtype)
        _ext._elementwise_py(_ext.OPS["fill"], out, out, out, p, p, p, p)
        return out

    def twice_product(self, u, v):
        return self._new("twice_product", u, v)

    def add(self, u, v):
        return self._new("add", u, v)

    def add_into(self, u, p, out):
        if out.dtype == self.dtype:
            _ext._elementwise_py(_ext.OPS["add_p"], u, u, out, p, p, p, p)
        else:                                   # 16-bit storage: rounded once
            _ext.from_float32(self._new("add_p", u, u, p), out)

    def sum(self, u):
        return _ext._reduce_py(u, u, self.zeros, self.zeros)[0]

    def sum_of_product(self, u, v):
        return _ext._reduce_py(u, v, self.zeros, self.zeros)[1]


def _backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False):
    """The staged (cs231n) backward graph, one parallel pass per stage.

    The walk is :func:`fastbn.backends._staged.backward`; every full-size
    stage writes an intermediate of the compute dtype (``x.dtype``; float32
    for 16-bit data, whose ``x`` and ``dy`` are first converted to float32
    and whose ``dx`` is rounded once into ``out``); reductions accumulate in
    float64. It stays staged on purpose: it is the baseline that the
    simplified backward is measured against.

    Parameters
    ----------
    dy, x, out : ndarray, shape (A, C, B), one dtype (float32, float64, float16, bfloat16)
    mean, invstd, gamma : ndarray, float64, shape (C,)
    eps : float
        Unused: ``invstd`` already holds ``1 / sqrt(var + eps)``.
    beta : ndarray, float64, shape (C,), or None (read only with ``relu``)
    relu : bool

    Raises
    ------
    MemoryError
        Before allocating anything, when the intermediates (and for 16-bit
        storage the float32 copies of ``x``, ``dy`` and ``out``) do not fit in
        the available memory.

    Returns
    -------
    dgamma, dbeta : ndarray, float64, shape (C,)
    """
    storage = x.dtype
    is16 = x.dtype.itemsize == 2
    _staged.require_memory(x.size, 4 if is16 else x.itemsize, relu, copies=3 if is16 else 0)
    if is16:
        x, dy = _ext.to_float32(x), _ext.to_float32(dy)
    ops = _StagedOps(x.dtype, x.shape, storage)
    return _staged.backward(ops, dy, x, mean, invstd, gamma, beta, relu, out,
                            x.shape[0] * x.shape[2])


# ---------------------------------------------------------------------------
# Plans (fastbn.plans): the choices of forward_train and backward_train
# ---------------------------------------------------------------------------

def default_plan(shape, itemsize, pass_name):
    """The plan the extension's heuristics choose for a call.

    Parameters
    ----------
    shape : tuple of int
        ``(A, C, B)``.
    itemsize : int
    pass_name : {"forward", "eval", "backward"}

    Returns
    -------
    dict
        ``strategy``: ``"fused"`` (a channel, or a block of channels on the
        row path ``B == 1``, reduced and then normalized while it is in
        cache) or ``"passes"`` (a parallel reduction, then a parallel
        elementwise pass); ``eval`` is one elementwise pass. ``block_bytes``:
        the row path's fused block (all rows of every array it touches).
        ``stores``: ``"streaming"`` (non-temporal stores, for float32 and
        float64 outputs beyond the last-level cache in rows of at least
        2 KiB) or ``"cached"`` (plain stores).
    """
    A, C, B = shape
    stores = "streaming" if _ext.default_streaming(A, C, B, itemsize) else "cached"
    if pass_name == "eval":
        return {"strategy": "passes", "stores": stores}
    if not _ext.default_fused(A, C, B, itemsize, _plans.PASS_ARRAYS[pass_name]):
        return {"strategy": "passes", "stores": stores}
    if B == 1:
        return {"strategy": "fused", "block_bytes": _ext.cache_tuning()["row_fuse_bytes"],
                "stores": stores}
    return {"strategy": "fused", "stores": stores}


def plan_candidates(shape, itemsize, pass_name):
    """The plans ``fastbn tune`` times for a call, the default first: both
    strategies (on the row path, fused blocks of 1/2 to 8 times the
    default's bytes, up to 1024 channels wide), each with plain and with
    streaming stores. Every candidate computes the same sums in the same
    chunks (see ``_use_fused``) and stores the same values, so all of them
    give the same bits."""
    candidates = [default_plan(shape, itemsize, pass_name)]
    if pass_name == "eval":
        options = [{"strategy": "passes"}]
    elif shape[2] == 1:
        block = _ext.cache_tuning()["row_fuse_bytes"]
        options = [{"strategy": "passes"}] + [
            {"strategy": "fused", "block_bytes": int(block * scale)}
            for scale in (0.5, 1, 2, 4, 8)]
    else:
        options = [{"strategy": "passes"}, {"strategy": "fused"}]
    for option in options:
        for stores in ("cached", "streaming"):
            plan = {**option, "stores": stores}
            if plan not in candidates:
                candidates.append(plan)
    return candidates


def plan_build():
    """The build a plan was measured for: the extension variant loaded."""
    return _PLAN_BUILD


_PLAN_BUILD = f"cython {VARIANT}"


def _stored_plan(x, pass_name):
    """The stored plan of a call on x (forced, measured in this process, or
    wisdom), or None."""
    plan = _plans.lookup("cython", plan_build(), x.shape, x.dtype, pass_name)
    if (plan is None or plan.get("strategy") not in ("passes", "fused")
            or plan.get("stores", "default") not in _ext.STORES):
        return None
    block = plan.get("block_bytes", 0)
    return plan if isinstance(block, int) and block >= 0 else None


def _plan(x, pass_name):
    """The plan of a call on x: the stored one, else the default."""
    return _stored_plan(x, pass_name) or default_plan(x.shape, x.itemsize, pass_name)


def _plan_args(x, pass_name):
    """``(strategy, block_bytes, stores)`` for the extension: the stored
    plan's, or ``(0, 0, 0)`` (the heuristics, which :func:`default_plan`
    describes)."""
    plan = _stored_plan(x, pass_name)
    if plan is None:
        return 0, 0, 0
    return (_ext.STRATEGIES[plan["strategy"]], plan.get("block_bytes", 0),
            _ext.STORES[plan.get("stores", "default")])


def _forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None,
                   momentum=0.1, relu=False):
    """The extension's ``forward_train`` with this call's plan."""
    strategy, block_bytes, stores = _plan_args(x, "forward")
    return _ext.forward_train(x, gamma, beta, eps, out, running_mean, running_var, momentum,
                              relu, strategy, block_bytes, stores)


def _forward_eval(x, gamma, beta, running_mean, running_var, eps, out, relu=False):
    """The extension's ``forward_eval`` with this call's plan."""
    stores = _plan_args(x, "eval")[2]
    return _ext.forward_eval(x, gamma, beta, running_mean, running_var, eps, out, relu,
                             stores)


def _backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """The extension's ``backward_train`` with this call's plan."""
    strategy, block_bytes, stores = _plan_args(x, "backward")
    return _ext.backward_train(dy, x, mean, invstd, gamma, out, beta, relu, strategy,
                               block_bytes, stores)


if _ext is not None:
    forward_train = _forward_train
    forward_eval = _forward_eval
    backward_eval = _ext.backward_eval
    stats = _ext.stats
    normalize = _ext.normalize
    backward_reduce = _ext.backward_reduce
    backward_elemt = _ext.backward_elemt
    backward_train = _backward_train
    backward_staged = _backward_staged
else:
    forward_train = forward_eval = backward_eval = stats = normalize = _missing
    backward_reduce = backward_elemt = backward_train = backward_staged = _missing
