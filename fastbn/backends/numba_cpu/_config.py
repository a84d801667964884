"""Settings of the Numba CPU backend: threading layer, fork guard, tuning numbers.

Everything here is plain Python, read once at import: which threading layer
numba should prefer, the guard every parallel kernel call runs under
(:func:`_guard`), the features of the CPU numba compiles for, and the
loop-shape and work-splitting constants. :mod:`fastbn.backends.numba_cpu`
re-exports the constants; its work-splitting helpers read them from there,
so that a change of ``numba_cpu.SERIAL_BELOW`` (say) takes effect. Constants
that compiled loops read (``COLUMN_BLOCK``, ``ELEMENT_ROWS``, ``SUM_BLOCK``,
``PREFETCH_ROWS_AHEAD``) are frozen into the kernels when they compile.
"""

import os
import threading

from ... import machine as _machine
from .. import _fork

try:
    import numba
    from numba.np.ufunc import parallel as _parallel
    _IMPORT_ERROR = ""
except ImportError as exc:  # numba missing: the package still imports
    numba = None
    _IMPORT_ERROR = f"numba is not importable: {exc}"

# Loop-shape and work-splitting constants. They depend on the shape and on
# this machine (its caches and vector width, read once at import), never on
# the thread count, so that results do not depend on the thread count.
ROWS_MIN_B = 16             # B at or above which elementwise passes use the rows loop shape
REDUCE_ROWS_MIN_B = 256     # B at or above which reductions use the rows loop shape
FUSED_MIN_CHANNELS = 64     # channels needed to make one channel one work item
TARGET_ITEMS = 64           # work items aimed at when channels are split
MIN_ITEM_ELEMENTS = 16384   # smallest work item when splitting
COLUMN_BLOCK = 256          # columns per work item in the columns loop shape
COLUMN_ITEMS = 16           # reduction items aimed at in the columns shape (few: small partials)
ELEMENT_ROWS = 16           # rows per elementwise work item in the columns loop shape
FUSED_MIN_B = 256           # rows at least this long for the fused channel-by-channel order
FUSED_COLS = True           # (N, D) with one row block: fused per block of channels
SERIAL_BELOW = 32768        # arrays with fewer elements run serial kernels (no parallel region)
PREFETCH_ROWS_AHEAD = 2     # the fused forward prefetches the row it will read this many rows later
STREAM_ITEM_BYTES = 65536   # rows kernels with streaming stores: bytes of out per work item

# From the machine (see tuning()): the cache sizes of fastbn.machine and the
# vector width of the CPU numba compiles for.
CACHES = _machine.cache_sizes()
# channels per fused work item: a slab of about a quarter of L2 (read twice,
# with its output, while it stays in L2)
FUSED_SLAB_BYTES = CACHES["l2"] // 4
# fused (N, D) kernels: a block of channels whose rows fill about half of L2;
# a channel's sums do not depend on the block width
FUSED_COLS_BYTES = CACHES["l2"] // 2
# fuse only working sets larger than the share of the last-level cache this
# process can count on: all of it, or 16 L2s' worth where it is shared by
# more cores (or, on a virtual machine, other guests) than that
FUSED_MIN_BYTES = min(CACHES["l3"], 16 * CACHES["l2"])
# plans that write whole rows use streaming stores for outputs at least
# this large (the same last-level share: they cannot stay in cache) in rows
# of at least STREAM_MIN_ROW_BYTES (as cython's default)
STREAM_MIN_BYTES = min(CACHES["l3"], 16 * CACHES["l2"])
STREAM_MIN_ROW_BYTES = 2048

_PRIORITY = ["omp", "tbb", "workqueue"]


# ---------------------------------------------------------------------------
# Threading layer selection (before the first parallel region).
# ---------------------------------------------------------------------------

def _layer_initialized():
    from numba.np.ufunc import parallel as _parallel
    return bool(_parallel._is_initialized)


def _choose_threading_layer():
    """Prefer 'omp' unless the user or an earlier parallel call decided."""
    if _layer_initialized():
        return
    user_set = os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER != "default"
    if not user_set:
        numba.config.THREADING_LAYER_PRIORITY = list(_PRIORITY)


def _predicted_layer():
    """The layer numba has loaded, or the one it will load at its first parallel call."""
    if _layer_initialized():
        return numba.threading_layer()
    requested = numba.config.THREADING_LAYER
    if requested in ("omp", "tbb", "workqueue"):
        return requested
    order = list(numba.config.THREADING_LAYER_PRIORITY)
    if requested == "safe":
        order = ["tbb"]
    elif requested == "threadsafe":
        order = [name for name in order if name in ("omp", "tbb")]
    elif requested == "forksafe":
        order = [name for name in order if name in ("tbb", "workqueue")]
    for name in order:
        try:
            if name == "omp":
                from numba.np.ufunc import omppool  # noqa: F401  (loads libgomp)
            elif name == "tbb":
                from numba.np.ufunc import tbbpool  # noqa: F401
            return name
        except ImportError:
            continue
    return "workqueue"


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _OneThread:
    """Runs a kernel on one thread: the guard of a forked child under ``omp``.

    Sets numba's thread count of the calling thread to 1 at every call (a
    thread started in the child, or a ``numba.set_num_threads`` there, may
    have another count), so that libgomp never reaches for the parent's pool.
    """
    def __enter__(self):
        if numba.get_num_threads() != 1:
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()
_ONE_THREAD = _OneThread()

# The guard, once numba has loaded its threading layer (it cannot change
# then), and the lock that serializes calls under workqueue. Both are made
# anew in a forked child: a lock held by a thread of the parent at the fork
# would stay held forever there.
_GUARD = []
_WORKQUEUE_LOCK = [threading.Lock()]
# The layer's thread-count function, found by _guard (see _thread_count).
_THREAD_COUNT = []


def _after_fork_in_child():
    _GUARD.clear()
    _WORKQUEUE_LOCK[0] = threading.Lock()


def _restart_layer_in_forked_child(layer):
    """Make numba's threading layer usable in a forked child.

    ``omp``: numba's layer records the process that started it and terminates
    its children at their first parallel region; starting it again with one
    thread records this process instead (the kernels then run on one thread,
    see :class:`_OneThread`). ``workqueue``: its pool was freed at the fork
    (its threads are not inherited) and is started again with every thread.
    ``tbb``: numba stops TBB before a fork and restarts it in both processes.
    """
    from ctypes import CFUNCTYPE, c_int
    if layer == "omp":
        from numba.np.ufunc import omppool
        CFUNCTYPE(None, c_int)(omppool.launch_threads)(1)
    elif layer == "workqueue":
        from numba.np.ufunc import workqueue
        CFUNCTYPE(None, c_int)(workqueue.launch_threads)(numba.config.NUMBA_NUM_THREADS)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _guard():
    """What a parallel kernel runs under: a lock when the threading layer is
    workqueue (not thread-safe), one thread in a forked child under omp, else
    nothing."""
    if _GUARD:
        return _GUARD[0]
    if not _layer_initialized():
        # Start the threading layer before the first parallel kernel runs.
        # numba starts it when it compiles or loads a parallel function, but
        # a cached kernel whose parallel loops sit in functions it calls,
        # compiled earlier in the process that wrote the cache, is saved
        # without that hook (numba 0.68): loaded first in a new process, it
        # ran with no threads started and crashed (segmentation fault).
        from numba.np.ufunc.parallel import _launch_threads
        _launch_threads()
    layer = numba.threading_layer()
    if _fork.in_forked_child():
        _restart_layer_in_forked_child(layer)
    if layer == "workqueue":
        guard = _WORKQUEUE_LOCK[0]
    elif layer == "omp" and _fork.in_forked_child():
        guard = _ONE_THREAD
    else:
        guard = _NO_LOCK
    _GUARD.append(guard)
    _THREAD_COUNT[:] = [getattr(_parallel, "_get_num_threads", None) or numba.get_num_threads]
    return guard


def _thread_count():
    """``numba.get_num_threads()`` without its locks (about 2 microseconds a
    call): the threading layer's own count for this thread. Only after
    :func:`_guard` (which starts the layer and finds the layer's function)."""
    return _THREAD_COUNT[0]()


def _has_f16c():
    """Whether the CPU numba compiles for has F16C (half <-> float conversions).

    Read from the features of numba's CPU code generator, the same features
    that key its on-disk cache (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``
    included): a generic target has no explicit ``+f16c`` and gets the
    integer conversions.
    """
    return "+f16c" in _target_features()


def _target_features():
    """The features of numba's CPU code generator (``NUMBA_CPU_NAME`` /
    ``NUMBA_CPU_FEATURES`` included), e.g. ``{"+avx2", "+fma", ...}``; empty
    when numba is missing or does not say."""
    try:
        from numba.core.registry import cpu_target
        features = cpu_target.target_context.codegen()._tm_features
    except Exception:   # a numba without this attribute: the portable path
        return frozenset()
    return frozenset(str(features).split(","))


def _vector_bytes(features):
    """Width of the widest float vector registers of the compile target."""
    if "+avx512f" in features:
        return 64
    if "+avx" in features or "+avx2" in features:
        return 32
    return 16   # SSE2 (every x86-64), NEON


def _target_name():
    """The CPU numba compiles for: ``NUMBA_CPU_NAME`` or the host's name."""
    if numba.config.CPU_NAME:
        return numba.config.CPU_NAME
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_name()


# Elements per block of the float32 sums over 16-bit data (merged in
# float64): each float32 lane of a 4-times unrolled vector loop then adds at
# most 16 terms, whatever the vector width, so the error bound of a block,
# gamma(SUM_BLOCK + 1) in float32 units, is what the tests derive tolerances from.
VECTOR_BYTES = _vector_bytes(_target_features())
SUM_BLOCK = 16 * 4 * (VECTOR_BYTES // 4)


# Options of every compiled function. fastmath: only 'reassoc' (lets LLVM
# vectorize the float64 sums with several partial sums) and 'contract'
# (fused multiply-add). No 'nnan' / 'ninf' / 'nsz' / 'arcp' / 'afn': NaN and
# Inf propagate as in IEEE.
FASTMATH = {"reassoc", "contract"}
# helpers compiled into the kernels that call them (numba.extending.register_jitable)
JITABLE = dict(fastmath=FASTMATH, error_model="numpy", boundscheck=False)
# kernels called from Python, cached on disk
JIT = dict(JITABLE, cache=True, nogil=True)
PJIT = dict(JIT, parallel=True)

if numba is not None:
    _choose_threading_layer()
