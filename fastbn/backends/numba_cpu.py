"""Numba CPU backend: ``@njit(parallel=True, cache=True)`` loops on ``(A, C, B)``.

The kernels follow the contract in :mod:`fastbn.backends`. They are compiled
with ``error_model='numpy'``, ``boundscheck=False`` and
``fastmath={'reassoc', 'contract'}``.

Storage and compute types
-------------------------
Each kernel is written once; what it loads, stores and computes in is chosen
at compile time by the dtype of its arrays, through small overloaded helpers
(``_ld`` loads an element in the compute type, ``_st`` rounds a result once
into the storage type, ``_ct`` casts a float64 per-channel scalar to the
compute type, ``_center`` forms ``x - mean``):

* float32 and float64 storage compute in float64 (float32 data is converted
  element by element before anything else);
* float16 and bfloat16 storage compute in float32. Numba cannot type those
  dtypes, so the Python wrappers view them, without a copy, as ``uint16``
  (float16) and ``int16`` (bfloat16) bit patterns, and the helpers convert:
  float16 with LLVM's ``half`` type (``fpext``/``fptrunc``, i.e.
  ``vcvtph2ps``/``vcvtps2ph``, vectorized) when the CPU numba compiles for
  has F16C, else with branch-free integer code; bfloat16 with integer code
  (the upper half of a float32; stores round to nearest even, NaN stays a
  quiet NaN). ``x - mean`` uses a split ``mean = hi + lo`` in float32, so a
  channel whose mean is far larger than its spread keeps its precision.
  Sums run in float32 over blocks of ``SUM_BLOCK`` elements (vectorized
  partial sums of at most a few dozen terms each) merged in float64; the
  staged backward's full-size intermediates are float32.

Numba's on-disk cache is keyed on the CPU name and features, and the F16C
choice follows the same features, so a cache never mixes the two paths.

Fused ReLU
----------
With ``relu`` the forward kernels store ``max(y, 0)`` (``lo = 0``) in the
normalize pass; a NaN ``y`` stays NaN. The
backward kernels mask ``dy`` in every pass that reads it: ``y = (x - mean) *
(invstd * gamma) + beta`` is recomputed with the forward's arithmetic and
``dy`` kept where ``y > floor``. ``floor`` is 0 (float64 and 16-bit
storage) or ``2**-150`` (float32 storage, whose forward computes ``y`` in
float64 and stores ``float32(y)``, positive exactly when ``y > 2**-150``),
so the mask is the forward's ``out > 0``. A NaN ``y`` masks its ``dy``, as
in every backend. Without ReLU, ``lo`` and ``floor`` are
``None``: numba compiles those kernels apart, with no bound and no mask, so
the plain kernels do not pay for the ReLU. The staged backward rebuilds ``y`` and the masked
``dy`` as two more full-size stages.

fastmath choice
---------------
Only two LLVM flags are enabled: ``reassoc`` lets the vectorizer split a
float64 sum ``s += d`` into several vector partial sums (so a plain loop
vectorizes), and ``contract`` allows fused multiply-adds. Neither assumes
anything about the values, so NaN and Inf propagate as in IEEE arithmetic
(``nnan``, ``ninf``, ``nsz``, ``arcp``, ``afn`` and ``fastmath=True`` are not
used; the tests check NaN propagation). The order of a reassociated sum
depends only on the loop's length and the compiled code, never on the
thread count (see below).

Loop shapes
-----------
*Rows* (``B >= ROWS_MIN_B``, e.g. NCHW) for elementwise passes: a work item
is a row ``(a, c)`` of ``B`` contiguous elements with per-channel scalars.

*Rows* reductions (``B >= REDUCE_ROWS_MIN_B``): work items are ``(channel,
chunk of the channel)``: with at least ``FUSED_MIN_CHANNELS`` channels a
chunk is the whole channel; with fewer, each channel is split into chunks of
its ``A*B`` elements so that every core has work.

*Columns* (reductions with ``B < REDUCE_ROWS_MIN_B``, elementwise passes with
``B < ROWS_MIN_B``: ``(N, D)``, channels-last, 7x7 and 14x14 maps): the array
is viewed as ``(A, J)`` with ``J = C*B``, so that every inner loop runs over
long contiguous rows instead of short per-channel rows. Reduction items are
``(block of rows, block of COLUMN_BLOCK columns)``; each adds four rows at a
time into its own float64 partial-sum row (``p[j] += d0 + d1 + d2 + d3``),
and the partial rows are merged in order and folded over each channel's
``B`` columns. Few row blocks (``COLUMN_ITEMS``) keep the partials small.
Elementwise items are ``(ELEMENT_ROWS rows, COLUMN_BLOCK columns)`` with
per-column parameters (``_per_column``) read from L1, two rows per pass.

*Fused* training kernels: when the arrays a kernel touches exceed the
last-level cache (``FUSED_MIN_BYTES``), rows are long (``FUSED_MIN_B``) and
there are enough channels, a work item is a block of consecutive channels
(about ``FUSED_SLAB_BYTES``), whose statistics (or backward sums) and
elementwise pass run back to back, so the second read comes from L2/L3 and
only the compulsory bytes cross the memory bus. The fused forward's
statistics pass visits a channel's rows ``(a, c)``, ``(a + 1, c)``, ... one
channel-row apart; it prefetches the row it will read
``PREFETCH_ROWS_AHEAD`` rows later (``llvm.prefetch``), since the hardware
prefetcher stops at each page boundary. ``(N, D)`` arrays whose
reduction has a single row block (``_fuses_cols``, e.g. (256, 4096)) run
fused per block of ``COLUMN_BLOCK`` channels: all rows of the block are
summed, then normalized while the block is in L2. Other arrays use two
parallel loops (the second pass streams from L3).

*Serial* kernels: arrays of fewer than ``SERIAL_BELOW`` elements run one
compiled serial kernel per call (starting a parallel region costs more than
the work), which also finishes the statistics and updates the running
statistics, so that a call on an (8, 16) array costs about 2 us.

Variance uses sums shifted by the channel's first element, ``d = x -
x[0, c, 0]``: ``var = (S2 - S1**2 / M) / M`` with ``S1 = sum(d)``, ``S2 =
sum(d*d)`` (a constant channel gives exactly 0; no raw ``E[x^2] - E[x]^2``).
The simplified backward writes ``dx = k*dy + kx*(x - mean) + k0`` with
``k = gamma*invstd``, ``kx = -k*invstd*sum(dy*xhat)/M``, ``k0 = -k*sum(dy)/M``.

Sizes
-----
Any array NumPy can hold, of any shape (more than 2**31 elements in one
array, in one channel, or in ``A``): extents, indices, loop bounds
(``prange`` included) and products of extents are Numba's ``intp``
(int64), and Numba widens integer arithmetic on smaller types to ``intp``;
the uint16/int16 views are only ever element values, never indices. The
work-split helpers (``_chunks_per_channel``, ``_row_blocks``,
``_fused_block``, ``_fused_cols_width``) are plain Python on Python ints.
The staged backward allocates its full-size intermediates (at most four of
the compute dtype at once, five with the ReLU) only after checking that
they fit in the memory available; otherwise it raises ``MemoryError``
(:mod:`fastbn.backends._memory`). The other kernels allocate nothing of the
array's size.

Determinism across thread counts
--------------------------------
How the work is split into items depends on the shape only, never on the
thread count; each item sums its elements in a fixed order and the
partials are merged serially in a fixed order. Results are therefore
bitwise identical for any ``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``.

Threading layer
---------------
Numba's ``workqueue`` layer must not run parallel regions launched from
several Python threads at once. When this module is imported before any
Numba parallel region has run, and neither ``NUMBA_THREADING_LAYER`` nor
``numba.config.THREADING_LAYER`` has been set by the user, it sets
``numba.config.THREADING_LAYER_PRIORITY`` to ``['omp', 'tbb', 'workqueue']``:
the GNU OpenMP layer (libgomp, the runtime the Cython backend also uses, so
both share one OpenMP runtime), then TBB, and only then workqueue. The
kernels release the GIL (``nogil=True``). If the layer in use is
``workqueue`` (neither libgomp nor tbb loads, or someone else chose it), every
kernel call from this module is serialized by a process-wide lock, so
concurrent calls stay correct. ``info()["threading_layer"]`` reports the
layer.

Forked children
---------------
In a process forked from one that imported fastbn (``multiprocessing``'s
``fork`` start method, PyTorch's ``DataLoader`` workers), the first kernel
call restarts the threading layer for the child (:mod:`fastbn.backends._fork`):
under ``omp`` the kernels then run on one thread (numba's layer would
terminate the child, and libgomp's pool of the parent is not there);
``workqueue`` gets a new pool with every thread; ``tbb`` restarts itself.
The kernels are the same, so the results are bit for bit the parent's.
"""

import os
import threading

from .. import machine as _machine
from . import _fork, _host, _memory

try:
    import numpy as np
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit, prange
    from numba.core import cgutils
    from numba.core import types as nbtypes
    from numba.extending import intrinsic, overload
    _IMPORT_ERROR = ""
except ImportError as exc:  # numba (or numpy) missing: the module still imports
    numba = None
    _IMPORT_ERROR = f"numba is not importable: {exc}"

ON_DEVICE = False

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
    return guard


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


# Elements per block of the float32 sums over 16-bit data (merged in
# float64): each float32 lane of a 4-times unrolled vector loop then adds at
# most 16 terms, whatever the vector width, so the error bound of a block,
# gamma(SUM_BLOCK + 1) in float32 units, is what the tests derive tolerances from.
VECTOR_BYTES = _vector_bytes(_target_features())
SUM_BLOCK = 16 * 4 * (VECTOR_BYTES // 4)


def tuning():
    """The machine-dependent constants this backend chose at import.

    Returns
    -------
    dict
        ``vector_bytes`` (of the CPU numba compiles for), ``sum_block``,
        ``fused_slab_bytes``, ``fused_cols_bytes``, ``fused_min_bytes`` and
        ``caches`` (the sizes they come from, :func:`fastbn.machine.cache_sizes`).
    """
    return {"vector_bytes": VECTOR_BYTES, "sum_block": SUM_BLOCK,
            "fused_slab_bytes": FUSED_SLAB_BYTES, "fused_cols_bytes": FUSED_COLS_BYTES,
            "fused_min_bytes": FUSED_MIN_BYTES, "caches": dict(CACHES)}


def availability():
    """Whether this backend can run here.

    Returns
    -------
    (bool, str)
        ``(True, "")`` when numba imports, else ``(False, reason)``.
    """
    if numba is None:
        return False, _IMPORT_ERROR
    return True, ""


def info():
    """Facts about this backend.

    Returns
    -------
    dict
        ``threads`` (numba's thread count), ``openmp`` (True when the
        threading layer is OpenMP), ``device`` ("cpu"), ``threading_layer``,
        ``target`` (the CPU name numba compiles for) and ``tuning``
        (:func:`tuning`).
    """
    if numba is None:
        return {"threads": 0, "openmp": False, "device": "cpu",
                "threading_layer": None, "reason": _IMPORT_ERROR}
    layer = _predicted_layer()
    threads = 1 if layer == "omp" and _fork.in_forked_child() else numba.get_num_threads()
    return {"threads": int(threads), "openmp": layer == "omp",
            "device": "cpu", "threading_layer": layer, "target": _target_name(),
            "tuning": tuning()}


def _target_name():
    """The CPU numba compiles for: ``NUMBA_CPU_NAME`` or the host's name."""
    if numba.config.CPU_NAME:
        return numba.config.CPU_NAME
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_name()


# ---------------------------------------------------------------------------
# Work splitting (shape only).
# ---------------------------------------------------------------------------

def _uses_rows(shape):
    """Elementwise passes: rows (a, c) of B elements, or the columns shape."""
    return shape[2] >= ROWS_MIN_B


def _reduces_by_rows(shape):
    """Reductions: per channel over its rows, or the columns shape (better for
    short rows: one long vectorized loop instead of a short one per row)."""
    return shape[2] >= REDUCE_ROWS_MIN_B


def _chunks_per_channel(shape):
    """Rows shape: chunks of one channel's ``A*B`` elements (1 = whole channel)."""
    A, C, B = shape
    if C >= FUSED_MIN_CHANNELS:
        return 1
    per_channel = A * B
    wanted = -(-TARGET_ITEMS // C)
    by_size = max(1, per_channel // MIN_ITEM_ELEMENTS)
    return max(1, min(wanted, by_size))


def _serial(x):
    """Small arrays run the serial kernels (depends on the shape only)."""
    return x.size < SERIAL_BELOW


def _fuses_cols(shape):
    """(N, D) shapes whose reduction has one row block run fused per column block."""
    A, C, B = shape
    return (B == 1 and FUSED_COLS and C > COLUMN_BLOCK
            and _row_blocks(A, C) == 1)


def _fused_cols_width(x):
    """Channels per work item of the fused (N, D) kernels: about FUSED_COLS_BYTES of
    x, at least COLUMN_BLOCK, and at least two items per thread. Each channel is
    summed alone over all rows, so the width changes speed, never results."""
    A, C, B = x.shape
    by_cache = FUSED_COLS_BYTES // (A * x.itemsize)
    by_threads = -(-C // (2 * numba.get_num_threads()))
    return max(COLUMN_BLOCK, min(by_cache, by_threads) // 16 * 16)


def _fuses(x, n_arrays):
    """Whether a training kernel touching ``n_arrays`` arrays of x's size runs
    fused: rows shape, whole-channel items, rows of at least FUSED_MIN_B, and a
    working set larger than the last-level cache."""
    return (_reduces_by_rows(x.shape) and _chunks_per_channel(x.shape) == 1
            and x.shape[2] >= FUSED_MIN_B and n_arrays * x.nbytes >= FUSED_MIN_BYTES)


def _fused_block(shape, itemsize):
    """Channels per fused work item: a slab of about FUSED_SLAB_BYTES (so both
    passes over it hit L2), keeping at least FUSED_MIN_CHANNELS work items."""
    A, C, B = shape
    by_cache = FUSED_SLAB_BYTES // max(1, A * B * itemsize)
    by_items = C // FUSED_MIN_CHANNELS
    return max(1, min(by_cache, by_items))


def _row_blocks(A, J):
    """Columns shape, reductions: blocks of rows, so that there are about
    COLUMN_ITEMS (row block, column block) items of at least MIN_ITEM_ELEMENTS.
    Each row block has its own (C*B,) float64 partial sums, so they are kept few."""
    column_blocks = -(-J // COLUMN_BLOCK)
    wanted = -(-COLUMN_ITEMS // column_blocks)
    by_size = max(1, (A * min(J, COLUMN_BLOCK)) // MIN_ITEM_ELEMENTS)
    return max(1, min(A, wanted, by_size))


if numba is not None:
    _choose_threading_layer()

    # fastmath: only 'reassoc' (lets LLVM vectorize the float64 sums with
    # several partial sums) and 'contract' (fused multiply-add). No 'nnan' /
    # 'ninf' / 'nsz' / 'arcp' / 'afn': NaN and Inf propagate as in IEEE.
    _FASTMATH = {"reassoc", "contract"}
    _JIT = dict(cache=True, fastmath=_FASTMATH, error_model="numpy", boundscheck=False, nogil=True)
    _PJIT = dict(_JIT, parallel=True)
    _F16C = _has_f16c()

    # -----------------------------------------------------------------------
    # Storage: loads, stores and the compute type, chosen by the array's
    # dtype at compile time. float32 and float64 arrays compute in float64;
    # float16 (viewed as uint16) and bfloat16 (viewed as int16) in float32.
    # The overloads below have no fastmath flags of their own, so LLVM never
    # reassociates the split centring (x - hi) - lo.
    # -----------------------------------------------------------------------

    @intrinsic
    def _f32_from_bits(typingctx, bits):
        """The float32 whose bit pattern is the low 32 bits of an integer."""
        if not isinstance(bits, nbtypes.Integer):
            return None

        def codegen(context, builder, signature, args):
            value = args[0]
            if bits.bitwidth > 32:
                value = builder.trunc(value, llvm_ir.IntType(32))
            elif bits.bitwidth < 32:
                value = builder.zext(value, llvm_ir.IntType(32))
            return builder.bitcast(value, llvm_ir.FloatType())
        return nbtypes.float32(bits), codegen

    @intrinsic
    def _f32_bits(typingctx, value):
        """The bit pattern of a float32, as uint32."""
        if value != nbtypes.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_ir.IntType(32))
        return nbtypes.uint32(value), codegen

    @intrinsic
    def _half_to_f32_f16c(typingctx, bits):
        """IEEE binary16 bits -> float32 (LLVM fpext: vcvtph2ps with F16C)."""
        if bits != nbtypes.uint16:
            return None

        def codegen(context, builder, signature, args):
            half = builder.bitcast(args[0], llvm_ir.HalfType())
            return builder.fpext(half, llvm_ir.FloatType())
        return nbtypes.float32(bits), codegen

    @intrinsic
    def _f32_to_half_f16c(typingctx, value):
        """float32 -> IEEE binary16 bits, round to nearest even (LLVM fptrunc:
        vcvtps2ph with F16C)."""
        if value != nbtypes.float32:
            return None

        def codegen(context, builder, signature, args):
            half = builder.fptrunc(args[0], llvm_ir.HalfType())
            return builder.bitcast(half, llvm_ir.IntType(16))
        return nbtypes.uint16(value), codegen

    @njit(**_JIT)
    def _half_to_f32_soft(bits):
        """IEEE binary16 bits -> float32, integer code (no F16C needed)."""
        h = np.int64(bits) & 0xFFFF
        sign = (h & 0x8000) << 16
        em = h & 0x7FFF
        out = (em << 13) + 0x38000000                   # normal: rebias 15 -> 127
        if em >= 0x7C00:
            out = (em << 13) | 0x7F800000               # inf, NaN (payload kept)
        if em < 0x400:                                  # zero, subnormal: em * 2**-24
            out = np.int64(_f32_bits(np.float32(em) * np.float32(5.960464477539063e-08)))
        return _f32_from_bits(out | sign)

    @njit(**_JIT)
    def _f32_to_half_soft(value):
        """float32 -> IEEE binary16 bits, round to nearest even, integer code."""
        b = np.int64(_f32_bits(value))
        sign = (b >> 16) & 0x8000
        a = b & 0x7FFFFFFF
        # normal: rebias 127 -> 15, add half an ulp (minus one when the kept lsb is even)
        out = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
        if a < 0x38800000:
            # |value| < 2**-14: adding 0.5 puts binary16's subnormal ulp (2**-24)
            # in float32's last place, so the FPU rounds to nearest even
            out = np.int64(_f32_bits(_f32_from_bits(a) + np.float32(0.5))) - 0x3F000000
        if a >= 0x47800000:                             # |value| >= 65536: inf
            out = 0x7C00
        if a > 0x7F800000:                              # NaN: quiet, top of the payload
            out = 0x7E00 | ((a >> 13) & 0x3FF)
        return np.uint16(out | sign)

    @intrinsic
    def _bf16_to_f32(typingctx, bits):
        """bfloat16 bits (int16) -> float32: the upper half of the float32."""
        if bits != nbtypes.int16:
            return None

        def codegen(context, builder, signature, args):
            i32 = llvm_ir.IntType(32)
            wide = builder.shl(builder.zext(args[0], i32), i32(16))
            return builder.bitcast(wide, llvm_ir.FloatType())
        return nbtypes.float32(bits), codegen

    @intrinsic
    def _f32_to_bf16(typingctx, value):
        """float32 -> bfloat16 bits (int16), round to nearest even; NaN stays a
        quiet NaN. 32-bit integer IR, so that it vectorizes 8 or 16 wide."""
        if value != nbtypes.float32:
            return None

        def codegen(context, builder, signature, args):
            i32 = llvm_ir.IntType(32)
            bits = builder.bitcast(args[0], i32)
            upper = builder.lshr(bits, i32(16))
            # + 0x7fff + lsb of the kept half: ties go to the even neighbour
            rounded = builder.add(builder.add(bits, i32(0x7FFF)),
                                  builder.and_(upper, i32(1)))
            result = builder.lshr(rounded, i32(16))
            quiet_nan = builder.or_(upper, i32(0x40))
            is_nan = builder.fcmp_unordered("uno", args[0], args[0])
            result = builder.select(is_nan, quiet_nan, result)
            return builder.trunc(result, llvm_ir.IntType(16))
        return nbtypes.int16(value), codegen

    if _F16C:
        _half_to_f32 = _half_to_f32_f16c
        _f32_to_half = _f32_to_half_f16c
    else:
        _half_to_f32 = _half_to_f32_soft
        _f32_to_half = _f32_to_half_soft

    def _ld(value):
        """A stored element in the compute type."""

    def _st(arr, index, value):
        """arr[index] = value, rounded once to the storage type."""

    def _ct(value, arr):
        """A float64 scalar in the compute type of ``arr``'s storage."""

    def _cz(arr):
        """Zero in the compute type of ``arr``'s storage."""

    def _center(value, p):
        """``value - p`` (value in the compute type, p float64), accurate."""

    def _zero(value):
        """Zero of a scalar's own type."""

    def _is16(dtype):
        return dtype in (nbtypes.uint16, nbtypes.int16)

    @overload(_ld)
    def _ld_impl(value):
        if value == nbtypes.uint16:
            return lambda value: _half_to_f32(value)
        if value == nbtypes.int16:
            return lambda value: _bf16_to_f32(value)
        if value == nbtypes.float32:
            return lambda value: np.float64(value)
        if value == nbtypes.float64:
            return lambda value: value
        return None

    @overload(_st)
    def _st_impl(arr, index, value):
        if arr.dtype == nbtypes.uint16:
            def store(arr, index, value):
                arr[index] = _f32_to_half(np.float32(value))
        elif arr.dtype == nbtypes.int16:
            def store(arr, index, value):
                arr[index] = _f32_to_bf16(np.float32(value))
        else:
            def store(arr, index, value):
                arr[index] = value
        return store

    @overload(_ct)
    def _ct_impl(value, arr):
        if isinstance(value, nbtypes.NoneType):
            return lambda value, arr: None
        if _is16(arr.dtype):
            return lambda value, arr: np.float32(value)
        return lambda value, arr: np.float64(value)

    @overload(_cz)
    def _cz_impl(arr):
        if _is16(arr.dtype):
            return lambda arr: np.float32(0.0)
        return lambda arr: 0.0

    @overload(_zero)
    def _zero_impl(value):
        if value == nbtypes.float32:
            return lambda value: np.float32(0.0)
        return lambda value: 0.0

    @overload(_center)
    def _center_impl(value, p):
        if value == nbtypes.float32:
            def center(value, p):
                # split p = hi + lo in float32: x - hi is exact when x is near
                # hi (a channel whose mean is far larger than its spread)
                hi = np.float32(p)
                lo = np.float32(p - np.float64(hi))
                return (value - hi) - lo
            return center
        return lambda value, p: value - p

    def _gate(u, dv, gq, gr, floor):
        """The ReLU mask: u where y = dv * gq + gr (the forward's arithmetic) is
        > floor, else 0 (NaN y: 0); floor None (no ReLU): u, nothing computed."""

    def _relu(y, lo):
        """max(y, lo), NaN kept; lo None (no ReLU): y."""

    @overload(_gate, jit_options=dict(fastmath=_FASTMATH))
    def _gate_impl(u, dv, gq, gr, floor):
        if isinstance(floor, nbtypes.NoneType):
            return lambda u, dv, gq, gr, floor: u

        def gate(u, dv, gq, gr, floor):
            return u if dv * gq + gr > floor else _zero(u)
        return gate

    @overload(_relu)
    def _relu_impl(y, lo):
        if isinstance(lo, nbtypes.NoneType):
            return lambda y, lo: y
        return lambda y, lo: lo if y < lo else y

    # A read-only prefetch of a row a kernel will stream from memory soon:
    # the fused forward visits a channel's rows (a, c), (a + 1, c), ... which
    # lie C*B elements apart, and the hardware prefetcher stops at page
    # boundaries. (The fused backward, which streams dy and x, measured no
    # gain from it.)
    _PTR_SUFFIX = "p0" if str(llvm_ir.IntType(8).as_pointer()) == "ptr" else "p0i8"

    @intrinsic
    def _prefetch(typingctx, arr, index):
        """llvm.prefetch (read, keep in all cache levels) of &arr[index]."""
        if not (isinstance(arr, nbtypes.Array) and arr.ndim == 1
                and isinstance(index, nbtypes.Integer)):
            return None

        def codegen(context, builder, signature, args):
            array = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, signature.args[0], array,
                                           [args[1]], wraparound=False)
            i8p = llvm_ir.IntType(8).as_pointer()
            i32 = llvm_ir.IntType(32)
            fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty,
                                                "llvm.prefetch." + _PTR_SUFFIX)
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()
        return nbtypes.none(arr, index), codegen

    @njit(**_JIT)
    def _prefetch_seg(seg):
        """Prefetch every cache line of a contiguous segment."""
        step = max(1, 64 // seg.itemsize)
        for j in range(0, seg.shape[0], step):
            _prefetch(seg, j)

    @njit(**_JIT)
    def _chunk_range(k, n, n_chunks):
        """Chunk k of n_chunks over range(n): [k*n // n_chunks, (k+1)*n // n_chunks).
        The chunks tile range(n) in order; sizes differ by at most one. int64
        throughout (k*n < 2**63 for any n an array can have and n_chunks <= 2**31)."""
        return k * n // n_chunks, (k + 1) * n // n_chunks

    # -----------------------------------------------------------------------
    # Serial helpers on contiguous 1-D segments (called inside parallel
    # loops). Segment views (``row[lo:hi]``) let LLVM see unit stride, so
    # the loops vectorize. Sums run over blocks of SUM_BLOCK elements in the
    # compute type (several vector partial sums each), merged in float64.
    # -----------------------------------------------------------------------

    @njit(**_JIT)
    def _block_sums(seg, shift):
        """sum(d), sum(d*d) with d = seg - shift, in the compute type."""
        s1 = _cz(seg)
        s2 = _cz(seg)
        for j in range(seg.shape[0]):
            d = _ld(seg[j]) - shift
            s1 += d
            s2 += d * d
        return s1, s2

    @njit(**_JIT)
    def _shifted_sums(seg, shift):
        """sum(d), sum(d*d) with d = seg - shift (shift in the compute type), in float64."""
        s1 = 0.0
        s2 = 0.0
        n = seg.shape[0]
        for lo in range(0, n, SUM_BLOCK):
            r1, r2 = _block_sums(seg[lo:min(n, lo + SUM_BLOCK)], shift)
            s1 += r1
            s2 += r2
        return s1, s2

    @njit(**_JIT)
    def _block_products(useg, vseg, sv, gq, gr, floor):
        """sum(du), sum(du*dv), dv = vseg - sv, du = useg masked by dv*gq + gr."""
        s1 = _cz(useg)
        s2 = _cz(useg) * _cz(vseg)
        gqc = _ct(gq, vseg)
        grc = _ct(gr, vseg)
        floorc = _ct(floor, vseg)
        for j in range(useg.shape[0]):
            dv = _center(_ld(vseg[j]), sv)
            du = _gate(_ld(useg[j]), dv, gqc, grc, floorc)
            s1 += du
            s2 += du * dv
        return s1, s2

    @njit(**_JIT)
    def _product_sums(useg, vseg, sv, gq, gr, floor):
        """sum(du), sum(du*dv) (see ``_block_products``), in float64."""
        s1 = 0.0
        s2 = 0.0
        n = useg.shape[0]
        for lo in range(0, n, SUM_BLOCK):
            hi = min(n, lo + SUM_BLOCK)
            r1, r2 = _block_products(useg[lo:hi], vseg[lo:hi], sv, gq, gr, floor)
            s1 += r1
            s2 += r2
        return s1, s2

    @njit(**_JIT)
    def _mean_var(shift, s1, s2, n):
        """mean = shift + S1/n; var = (S2 - S1^2/n) / n, clipped at 0 (NaN kept)."""
        mean = shift + s1 / n
        var = (s2 - s1 * (s1 / n)) / n
        if var < 0.0:
            var = 0.0
        return mean, var

    @njit(**_JIT)
    def _affine_seg(useg, p, q, r, lo, oseg):
        """oseg = max((useg - p) * q + r, lo), scalars p, q, r, lo (lo None: no max)."""
        qc = _ct(q, useg)
        rc = _ct(r, useg)
        loc = _ct(lo, useg)
        for j in range(useg.shape[0]):
            y = _center(_ld(useg[j]), p) * qc + rc
            _st(oseg, j, _relu(y, loc))

    @njit(**_JIT)
    def _combine_seg(useg, q, vseg, s, t, r, gq, gr, floor, oseg):
        """oseg = du * q + dv * t + r, dv = vseg - s, du = useg masked by
        dv * gq + gr (``_gate``), scalar parameters."""
        qc = _ct(q, useg)
        tc = _ct(t, vseg)
        rc = _ct(r, useg)
        gqc = _ct(gq, vseg)
        grc = _ct(gr, vseg)
        floorc = _ct(floor, vseg)
        for j in range(useg.shape[0]):
            dv = _center(_ld(vseg[j]), s)
            du = _gate(_ld(useg[j]), dv, gqc, grc, floorc)
            _st(oseg, j, du * qc + dv * tc + rc)

    @njit(**_JIT)
    def _gated_scale_seg(useg, q, vseg, s, gq, gr, floor, oseg):
        """oseg = du * q, du = useg masked by (vseg - s) * gq + gr."""
        qc = _ct(q, useg)
        gqc = _ct(gq, vseg)
        grc = _ct(gr, vseg)
        floorc = _ct(floor, vseg)
        for j in range(useg.shape[0]):
            dv = _center(_ld(vseg[j]), s)
            _st(oseg, j, _gate(_ld(useg[j]), dv, gqc, grc, floorc) * qc)

    @njit(**_JIT)
    def _per_column(values, B):
        """Per-channel (C,) -> per-column (C*B,) values (column j is channel j // B)."""
        if B == 1:
            return values
        expanded = np.empty(values.shape[0] * B)
        for c in range(values.shape[0]):
            expanded[c * B:(c + 1) * B] = values[c]
        return expanded

    # -----------------------------------------------------------------------
    # Rows loop shape: (A, C, B) with B large. Reduction items are
    # (channel, chunk of the channel); elementwise items are rows (a, c).
    # -----------------------------------------------------------------------

    @njit(**_PJIT)
    def _stats_rows(x, n_split, mean, var):
        """Per-channel sums shifted by x[0, c, 0] over n_split chunks per channel,
        merged in chunk order."""
        A, C, B = x.shape
        n = A * B
        part1 = np.empty((C, n_split))
        part2 = np.empty((C, n_split))
        for item in prange(C * n_split):
            c = item // n_split
            k = item - c * n_split
            shift = _ld(x[0, c, 0])
            m_lo, m_hi = _chunk_range(k, n, n_split)
            s1 = 0.0
            s2 = 0.0
            for a in range(m_lo // B, (m_hi - 1) // B + 1):
                b_lo = max(m_lo - a * B, 0)
                b_hi = min(m_hi - a * B, B)
                r1, r2 = _shifted_sums(x[a, c, b_lo:b_hi], shift)
                s1 += r1
                s2 += r2
            part1[c, k] = s1
            part2[c, k] = s2
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            for k in range(n_split):
                s1 += part1[c, k]
                s2 += part2[c, k]
            mean[c], var[c] = _mean_var(np.float64(_ld(x[0, c, 0])), s1, s2, n)

    @njit(**_PJIT)
    def _sums_rows(u, v, sv, gq, gr, floor, n_split, sum1, sum2):
        """sum1[c] = sum(du), sum2[c] = sum(du * (v - sv[c])), du = u masked by
        (v - sv[c]) * gq[c] + gr[c] (floor None: no mask)."""
        A, C, B = u.shape
        n = A * B
        part1 = np.empty((C, n_split))
        part2 = np.empty((C, n_split))
        for item in prange(C * n_split):
            c = item // n_split
            k = item - c * n_split
            m_lo, m_hi = _chunk_range(k, n, n_split)
            s1 = 0.0
            s2 = 0.0
            for a in range(m_lo // B, (m_hi - 1) // B + 1):
                b_lo = max(m_lo - a * B, 0)
                b_hi = min(m_hi - a * B, B)
                r1, r2 = _product_sums(u[a, c, b_lo:b_hi], v[a, c, b_lo:b_hi], sv[c],
                                       gq[c], gr[c], floor)
                s1 += r1
                s2 += r2
            part1[c, k] = s1
            part2[c, k] = s2
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            for k in range(n_split):
                s1 += part1[c, k]
                s2 += part2[c, k]
            sum1[c] = s1
            sum2[c] = s2

    @njit(**_PJIT)
    def _affine_rows(u, p, q, r, lo, out):
        """out = max((u - p[c]) * q[c] + r[c], lo)."""
        A, C, B = u.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            _affine_seg(u[a, c, :], p[c], q[c], r[c], lo, out[a, c, :])

    @njit(**_PJIT)
    def _combine_rows(u, q, v, s, t, r, gq, gr, floor, out):
        """out = du * q[c] + (v - s[c]) * t[c] + r[c] (du: u masked, see ``_combine_seg``)."""
        A, C, B = u.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            _combine_seg(u[a, c, :], q[c], v[a, c, :], s[c], t[c], r[c], gq[c], gr[c], floor,
                         out[a, c, :])

    @njit(**_PJIT)
    def _gated_scale_rows(u, q, v, s, gq, gr, floor, out):
        """out = du * q[c], du = u masked by (v - s[c]) * gq[c] + gr[c]."""
        A, C, B = u.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            _gated_scale_seg(u[a, c, :], q[c], v[a, c, :], s[c], gq[c], gr[c], floor,
                             out[a, c, :])

    @njit(**_PJIT)
    def _product_rows(u, v, w, out):
        """out = w[c] * u * v."""
        A, C, B = u.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            useg = u[a, c, :]
            vseg = v[a, c, :]
            oseg = out[a, c, :]
            wc = _ct(w[c], useg)
            for b in range(B):
                _st(oseg, b, wc * _ld(useg[b]) * _ld(vseg[b]))

    @njit(**_PJIT)
    def _fill_rows(r, out):
        """out = r[c]."""
        A, C, B = out.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            oseg = out[a, c, :]
            rc = r[c]
            for b in range(B):
                _st(oseg, b, rc)

    @njit(**_PJIT)
    def _forward_rows_fused(x, gamma, beta, eps, lo, block, out, mean, var):
        """Work item = ``block`` consecutive channels: their shifted sums, then
        normalize the same channels while they are still in cache,
        out = max((x - mean) * (invstd * gamma) + beta, lo). Rows are visited
        a-major, so reads and writes are runs of block*B contiguous elements.
        Each channel's sums are formed in the same order as in ``_stats_rows``
        (one chunk)."""
        A, C, B = x.shape
        n = A * B
        n_blocks = (C + block - 1) // block
        for item in prange(n_blocks):
            c_lo = item * block
            c_hi = min(C, c_lo + block)
            acc1 = np.zeros(c_hi - c_lo)
            acc2 = np.zeros(c_hi - c_lo)
            width = c_hi - c_lo
            for a in range(A):
                for c in range(c_lo, c_hi):
                    ahead = a * width + (c - c_lo) + PREFETCH_ROWS_AHEAD
                    if ahead < A * width:
                        _prefetch_seg(x[ahead // width, c_lo + ahead % width, :])
                    r1, r2 = _shifted_sums(x[a, c, :], _ld(x[0, c, 0]))
                    acc1[c - c_lo] += r1
                    acc2[c - c_lo] += r2
            scale = np.empty(c_hi - c_lo)
            for c in range(c_lo, c_hi):
                mean_c, var_c = _mean_var(np.float64(_ld(x[0, c, 0])), acc1[c - c_lo],
                                          acc2[c - c_lo], n)
                mean[c] = mean_c
                var[c] = var_c
                # gamma * invstd, exactly as _finish_stats and normalize form it
                scale[c - c_lo] = gamma[c] * (1.0 / np.sqrt(var_c + eps))
            for a in range(A):
                for c in range(c_lo, c_hi):
                    _affine_seg(x[a, c, :], mean[c], scale[c - c_lo], beta[c], lo, out[a, c, :])

    @njit(**_PJIT)
    def _backward_rows_fused(dy, x, mean, invstd, gamma, gr, floor, block, out,
                             sum_dy, sum_dy_xhat):
        """Work item = ``block`` consecutive channels: sum(dy), sum(dy * (x - mean))
        (dy masked by the ReLU when floor is not None, gr = beta), then on the
        cached channels dx = gamma*invstd*(dy - sum_dy/M - xhat*sum_dy_xhat/M)."""
        A, C, B = x.shape
        n = A * B
        n_blocks = (C + block - 1) // block
        for item in prange(n_blocks):
            c_lo = item * block
            c_hi = min(C, c_lo + block)
            acc1 = np.zeros(c_hi - c_lo)
            acc2 = np.zeros(c_hi - c_lo)
            for a in range(A):
                for c in range(c_lo, c_hi):
                    r1, r2 = _product_sums(dy[a, c, :], x[a, c, :], mean[c],
                                           invstd[c] * gamma[c], gr[c], floor)
                    acc1[c - c_lo] += r1
                    acc2[c - c_lo] += r2
            k = np.empty(c_hi - c_lo)
            kx = np.empty(c_hi - c_lo)
            k0 = np.empty(c_hi - c_lo)
            for c in range(c_lo, c_hi):
                s_dy = acc1[c - c_lo]
                s_dy_xhat = acc2[c - c_lo] * invstd[c]
                sum_dy[c] = s_dy
                sum_dy_xhat[c] = s_dy_xhat
                # dx = k * dy + kx * (x - mean) + k0
                k[c - c_lo] = gamma[c] * invstd[c]
                kx[c - c_lo] = -k[c - c_lo] * invstd[c] * (s_dy_xhat / n)
                k0[c - c_lo] = -k[c - c_lo] * (s_dy / n)
            for a in range(A):
                for c in range(c_lo, c_hi):
                    _combine_seg(dy[a, c, :], k[c - c_lo], x[a, c, :], mean[c],
                                 kx[c - c_lo], k0[c - c_lo], invstd[c] * gamma[c], gr[c],
                                 floor, out[a, c, :])

    # -----------------------------------------------------------------------
    # Columns loop shape: (A, J) with J = C*B (B small: (N, D), channels-last,
    # 7x7 or 14x14 maps), so that every inner loop runs over long contiguous
    # rows. Parameters are per column (``_per_column``).
    # Reductions: item = (block of rows, block of COLUMN_BLOCK columns), each
    # adding into its own float64 partial-sum row; partials are merged in
    # row-block order and folded over each channel's B columns.
    # Elementwise: item = (row, block of COLUMN_BLOCK columns).
    # -----------------------------------------------------------------------

    @njit(**_JIT)
    def _partials_same(u, su, a_lo, a_hi, j_lo, j_hi, p1, p2):
        """p1[j] += d, p2[j] += d*d, d = u[a, j] - su[j], over rows [a_lo, a_hi);
        four rows per pass (summed in the compute type), so that p1/p2 are
        loaded and stored once per four rows."""
        su_seg = su[j_lo:j_hi]
        a = a_lo
        while a + 4 <= a_hi:
            u0 = u[a, j_lo:j_hi]
            u1 = u[a + 1, j_lo:j_hi]
            u2 = u[a + 2, j_lo:j_hi]
            u3 = u[a + 3, j_lo:j_hi]
            for j in range(su_seg.shape[0]):
                s = _ct(su_seg[j], u)
                d0 = _ld(u0[j]) - s
                d1 = _ld(u1[j]) - s
                d2 = _ld(u2[j]) - s
                d3 = _ld(u3[j]) - s
                p1[j] += (d0 + d1) + (d2 + d3)
                p2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            a += 4
        for a in range(a, a_hi):
            u0 = u[a, j_lo:j_hi]
            for j in range(su_seg.shape[0]):
                d0 = _ld(u0[j]) - _ct(su_seg[j], u)
                p1[j] += d0
                p2[j] += d0 * d0

    @njit(**_JIT)
    def _partials_products(u, v, sv, gq, gr, floor, a_lo, a_hi, j_lo, j_hi, p1, p2):
        """p1[j] += du, p2[j] += du*dv, dv = v[a, j] - sv[j], du = u[a, j] masked
        by dv * gq[j] + gr[j], over rows [a_lo, a_hi), four rows per pass."""
        sv_seg = sv[j_lo:j_hi]
        gq_seg = gq[j_lo:j_hi]
        gr_seg = gr[j_lo:j_hi]
        floorc = _ct(floor, v)
        a = a_lo
        while a + 4 <= a_hi:
            u0 = u[a, j_lo:j_hi]
            u1 = u[a + 1, j_lo:j_hi]
            u2 = u[a + 2, j_lo:j_hi]
            u3 = u[a + 3, j_lo:j_hi]
            v0 = v[a, j_lo:j_hi]
            v1 = v[a + 1, j_lo:j_hi]
            v2 = v[a + 2, j_lo:j_hi]
            v3 = v[a + 3, j_lo:j_hi]
            for j in range(sv_seg.shape[0]):
                s = sv_seg[j]
                gqc = _ct(gq_seg[j], v)
                grc = _ct(gr_seg[j], v)
                dv0 = _center(_ld(v0[j]), s)
                dv1 = _center(_ld(v1[j]), s)
                dv2 = _center(_ld(v2[j]), s)
                dv3 = _center(_ld(v3[j]), s)
                du0 = _gate(_ld(u0[j]), dv0, gqc, grc, floorc)
                du1 = _gate(_ld(u1[j]), dv1, gqc, grc, floorc)
                du2 = _gate(_ld(u2[j]), dv2, gqc, grc, floorc)
                du3 = _gate(_ld(u3[j]), dv3, gqc, grc, floorc)
                p1[j] += (du0 + du1) + (du2 + du3)
                p2[j] += (du0 * dv0 + du1 * dv1) + (du2 * dv2 + du3 * dv3)
            a += 4
        for a in range(a, a_hi):
            u0 = u[a, j_lo:j_hi]
            v0 = v[a, j_lo:j_hi]
            for j in range(sv_seg.shape[0]):
                dv0 = _center(_ld(v0[j]), sv_seg[j])
                du0 = _gate(_ld(u0[j]), dv0, _ct(gq_seg[j], v), _ct(gr_seg[j], v), floorc)
                p1[j] += du0
                p2[j] += du0 * dv0

    @njit(**_PJIT)
    def _sums_cols(u, su, v, sv, gq, gr, floor, same, n_row_blocks, B, sum1, sum2):
        """Over the rows and the B columns j of channel c: ``same`` (v is u, sv
        is su): sum1[c] = sum(u - su[j]), sum2[c] = sum((u - su[j])**2);
        otherwise sum1[c] = sum(du), sum2[c] = sum(du * (v - sv[j])) with du = u
        masked by (v - sv[j]) * gq[j] + gr[j] (floor None: no mask)."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        part1 = np.zeros((n_row_blocks, J))
        part2 = np.zeros((n_row_blocks, J))
        for item in prange(n_row_blocks * n_col_blocks):
            k = item // n_col_blocks
            jb = item - k * n_col_blocks
            a_lo, a_hi = _chunk_range(k, A, n_row_blocks)
            j_lo = jb * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            if same:
                _partials_same(u, su, a_lo, a_hi, j_lo, j_hi, part1[k, j_lo:j_hi],
                               part2[k, j_lo:j_hi])
            else:
                _partials_products(u, v, sv, gq, gr, floor, a_lo, a_hi, j_lo, j_hi,
                                   part1[k, j_lo:j_hi], part2[k, j_lo:j_hi])
        C = J // B
        for c in prange(C):
            s1 = 0.0
            s2 = 0.0
            for k in range(n_row_blocks):
                for j in range(c * B, (c + 1) * B):
                    s1 += part1[k, j]
                    s2 += part2[k, j]
            sum1[c] = s1
            sum2[c] = s2

    @njit(**_PJIT)
    def _affine_cols(u, p, q, r, lo, out):
        """out = max((u - p[j]) * q[j] + r[j], lo). Item = (ELEMENT_ROWS rows,
        COLUMN_BLOCK columns); two rows per pass share the loads of the parameters."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        n_row_blocks = (A + ELEMENT_ROWS - 1) // ELEMENT_ROWS
        loc = _ct(lo, u)
        for item in prange(n_row_blocks * n_col_blocks):
            k = item // n_col_blocks
            j_lo = (item - k * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            pseg = p[j_lo:j_hi]
            qseg = q[j_lo:j_hi]
            rseg = r[j_lo:j_hi]
            a = k * ELEMENT_ROWS
            a_hi = min(A, a + ELEMENT_ROWS)
            while a + 2 <= a_hi:
                u0 = u[a, j_lo:j_hi]
                u1 = u[a + 1, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                o1 = out[a + 1, j_lo:j_hi]
                for j in range(pseg.shape[0]):
                    qc = _ct(qseg[j], u)
                    rc = _ct(rseg[j], u)
                    y0 = _center(_ld(u0[j]), pseg[j]) * qc + rc
                    y1 = _center(_ld(u1[j]), pseg[j]) * qc + rc
                    _st(o0, j, _relu(y0, loc))
                    _st(o1, j, _relu(y1, loc))
                a += 2
            if a < a_hi:
                u0 = u[a, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                for j in range(pseg.shape[0]):
                    y0 = _center(_ld(u0[j]), pseg[j]) * _ct(qseg[j], u) + _ct(rseg[j], u)
                    _st(o0, j, _relu(y0, loc))

    @njit(**_PJIT)
    def _combine_cols(u, q, v, s, t, r, gq, gr, floor, out):
        """out = du * q[j] + dv * t[j] + r[j], dv = v - s[j], du = u masked by
        dv * gq[j] + gr[j] (items as in ``_affine_cols``)."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        n_row_blocks = (A + ELEMENT_ROWS - 1) // ELEMENT_ROWS
        floorc = _ct(floor, v)
        for item in prange(n_row_blocks * n_col_blocks):
            k = item // n_col_blocks
            j_lo = (item - k * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            qseg = q[j_lo:j_hi]
            sseg = s[j_lo:j_hi]
            tseg = t[j_lo:j_hi]
            rseg = r[j_lo:j_hi]
            gq_seg = gq[j_lo:j_hi]
            gr_seg = gr[j_lo:j_hi]
            a = k * ELEMENT_ROWS
            a_hi = min(A, a + ELEMENT_ROWS)
            while a + 2 <= a_hi:
                u0 = u[a, j_lo:j_hi]
                u1 = u[a + 1, j_lo:j_hi]
                v0 = v[a, j_lo:j_hi]
                v1 = v[a + 1, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                o1 = out[a + 1, j_lo:j_hi]
                for j in range(qseg.shape[0]):
                    qc = _ct(qseg[j], u)
                    tc = _ct(tseg[j], v)
                    rc = _ct(rseg[j], u)
                    gqc = _ct(gq_seg[j], v)
                    grc = _ct(gr_seg[j], v)
                    dv0 = _center(_ld(v0[j]), sseg[j])
                    dv1 = _center(_ld(v1[j]), sseg[j])
                    du0 = _gate(_ld(u0[j]), dv0, gqc, grc, floorc)
                    du1 = _gate(_ld(u1[j]), dv1, gqc, grc, floorc)
                    _st(o0, j, du0 * qc + dv0 * tc + rc)
                    _st(o1, j, du1 * qc + dv1 * tc + rc)
                a += 2
            if a < a_hi:
                u0 = u[a, j_lo:j_hi]
                v0 = v[a, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                for j in range(qseg.shape[0]):
                    dv0 = _center(_ld(v0[j]), sseg[j])
                    du0 = _gate(_ld(u0[j]), dv0, _ct(gq_seg[j], v), _ct(gr_seg[j], v), floorc)
                    _st(o0, j, du0 * _ct(qseg[j], u) + dv0 * _ct(tseg[j], v) + _ct(rseg[j], u))

    @njit(**_PJIT)
    def _gated_scale_cols(u, q, v, s, gq, gr, floor, out):
        """out = du * q[j], du = u masked by (v - s[j]) * gq[j] + gr[j]."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        floorc = _ct(floor, v)
        for item in prange(A * n_col_blocks):
            a = item // n_col_blocks
            j_lo = (item - a * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            u0 = u[a, j_lo:j_hi]
            v0 = v[a, j_lo:j_hi]
            o0 = out[a, j_lo:j_hi]
            qseg = q[j_lo:j_hi]
            sseg = s[j_lo:j_hi]
            gq_seg = gq[j_lo:j_hi]
            gr_seg = gr[j_lo:j_hi]
            for j in range(u0.shape[0]):
                dv0 = _center(_ld(v0[j]), sseg[j])
                du0 = _gate(_ld(u0[j]), dv0, _ct(gq_seg[j], v), _ct(gr_seg[j], v), floorc)
                _st(o0, j, du0 * _ct(qseg[j], u))

    @njit(**_PJIT)
    def _product_cols(u, v, w, out):
        """out = w[j] * u * v."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        for item in prange(A * n_col_blocks):
            a = item // n_col_blocks
            j_lo = (item - a * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            useg = u[a, j_lo:j_hi]
            vseg = v[a, j_lo:j_hi]
            oseg = out[a, j_lo:j_hi]
            wseg = w[j_lo:j_hi]
            for j in range(useg.shape[0]):
                _st(oseg, j, _ct(wseg[j], u) * _ld(useg[j]) * _ld(vseg[j]))

    @njit(**_PJIT)
    def _fill_cols(r, out):
        """out = r[j]."""
        A, J = out.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        for item in prange(A * n_col_blocks):
            a = item // n_col_blocks
            j_lo = (item - a * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            oseg = out[a, j_lo:j_hi]
            rseg = r[j_lo:j_hi]
            for j in range(oseg.shape[0]):
                _st(oseg, j, rseg[j])

    @njit(**_JIT)
    def _stats_cols(x, B, n_row_blocks, mean, var):
        """Columns shape: sums shifted by each channel's first element x[0, c*B]."""
        A, J = x.shape
        C = J // B
        shift = np.empty(C)
        for c in range(C):
            shift[c] = _ld(x[0, c * B])
        shift_col = _per_column(shift, B)
        s1 = np.empty(C)
        s2 = np.empty(C)
        _sums_cols(x, shift_col, x, shift_col, shift_col, shift_col, None, True,
                   n_row_blocks, B, s1, s2)
        for c in range(C):
            mean[c], var[c] = _mean_var(shift[c], s1[c], s2[c], A * B)

    @njit(**_JIT)
    def _dx_coefficients(n, invstd, gamma, sum_dy, sum_dy_xhat):
        """dx = k*dy + kx*(x - mean) + k0: k = gamma*invstd,
        kx = -k*invstd*sum_dy_xhat/M, k0 = -k*sum_dy/M."""
        k = gamma * invstd
        kx = -k * invstd * (sum_dy_xhat / n)
        k0 = -k * (sum_dy / n)
        return k, kx, k0

    @njit(**_JIT)
    def _backward_cols(dy, x, B, mean, invstd, gamma, gq, gr, floor, n_row_blocks, out,
                       sum_dy, sum_dy_xhat):
        """Columns shape: sum(dy), sum(dy * xhat), then dx (dy masked by the
        ReLU when floor is not None)."""
        A, J = x.shape
        C = J // B
        mean_col = _per_column(mean, B)
        gq_col = _per_column(gq, B)
        gr_col = _per_column(gr, B)
        sum_dy_xmu = np.empty(C)
        _sums_cols(dy, mean_col, x, mean_col, gq_col, gr_col, floor, False, n_row_blocks, B,
                   sum_dy, sum_dy_xmu)
        for c in range(C):
            sum_dy_xhat[c] = sum_dy_xmu[c] * invstd[c]
        k, kx, k0 = _dx_coefficients(A * B, invstd, gamma, sum_dy, sum_dy_xhat)
        _combine_cols(dy, _per_column(k, B), x, mean_col, _per_column(kx, B),
                      _per_column(k0, B), gq_col, gr_col, floor, out)

    # -----------------------------------------------------------------------
    # Per-channel finishing work, inside the compiled drivers: invstd, the
    # normalize scale and the running-statistic update (PyTorch's rule:
    # running = (1 - momentum) * running + momentum * batch, with the
    # unbiased variance var * M / (M - 1)), so that no NumPy temporary is
    # made per call.
    # -----------------------------------------------------------------------

    @njit(**_JIT)
    def _finish_stats(mean, var, n, eps, gamma, invstd, scale, rm, rv, momentum, update):
        """invstd = 1/sqrt(var + eps), scale = gamma*invstd; running stats in place."""
        keep = 1.0 - momentum
        unbias = n / (n - 1.0) if n > 1 else np.inf
        for c in range(mean.shape[0]):
            invstd[c] = 1.0 / np.sqrt(var[c] + eps)
            scale[c] = gamma[c] * invstd[c]
            if update:
                rm[c] = keep * np.float64(rm[c]) + momentum * mean[c]
                rv[c] = keep * np.float64(rv[c]) + momentum * (var[c] * unbias)

    @njit(**_JIT)
    def _forward_cols_train(x, B, gamma, beta, eps, lo, n_row_blocks, out, mean, invstd,
                            rm, rv, momentum, update):
        """Columns shape: statistics, finish, out = max((x - mean) * scale + beta, lo)."""
        A, J = x.shape
        C = mean.shape[0]
        var = np.empty(C)
        scale = np.empty(C)
        _stats_cols(x, B, n_row_blocks, mean, var)
        _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)
        _affine_cols(x, _per_column(mean, B), _per_column(scale, B), _per_column(beta, B), lo,
                     out)

    @njit(**_JIT)
    def _forward_rows_train(x, n_split, gamma, beta, eps, lo, out, mean, invstd,
                            rm, rv, momentum, update):
        """Rows shape, two passes: statistics, finish, normalize."""
        A, C, B = x.shape
        var = np.empty(C)
        scale = np.empty(C)
        _stats_rows(x, n_split, mean, var)
        _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)
        _affine_rows(x, mean, scale, beta, lo, out)

    @njit(**_JIT)
    def _forward_fused_train(x, gamma, beta, eps, lo, block, out, mean, invstd,
                             rm, rv, momentum, update):
        """Rows shape, fused per block of channels, then the finishing work."""
        A, C, B = x.shape
        var = np.empty(C)
        scale = np.empty(C)
        _forward_rows_fused(x, gamma, beta, eps, lo, block, out, mean, var)
        _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)

    @njit(**_PJIT)
    def _forward_cols_fused(x, gamma, beta, eps, lo, width, out, mean, var, invstd):
        """(N, D) with one row block: work item = a block of COLUMN_BLOCK channels,
        whose sums over all rows (``_partials_same``, as in ``_sums_cols``) and
        normalize pass run back to back, so the second read comes from L2.
        The sums are those of the two-pass kernels, in the same order."""
        A, J = x.shape
        n_col_blocks = (J + width - 1) // width
        shift = np.empty(J)
        for j in range(J):
            shift[j] = _ld(x[0, j])
        loc = _ct(lo, x)
        for jb in prange(n_col_blocks):
            j_lo = jb * width
            j_hi = min(J, j_lo + width)
            p1 = np.zeros(j_hi - j_lo)
            p2 = np.zeros(j_hi - j_lo)
            _partials_same(x, shift, 0, A, j_lo, j_hi, p1, p2)
            scale = np.empty(j_hi - j_lo)
            for j in range(j_lo, j_hi):
                m, v = _mean_var(shift[j], p1[j - j_lo], p2[j - j_lo], A)
                mean[j] = m
                var[j] = v
                invstd[j] = 1.0 / np.sqrt(v + eps)
                scale[j - j_lo] = gamma[j] * invstd[j]
            bseg = beta[j_lo:j_hi]
            mseg = mean[j_lo:j_hi]
            for a in range(A):
                u0 = x[a, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                for j in range(scale.shape[0]):
                    y = _center(_ld(u0[j]), mseg[j]) * _ct(scale[j], x) + _ct(bseg[j], x)
                    _st(o0, j, _relu(y, loc))

    @njit(**_PJIT)
    def _backward_cols_fused(dy, x, mean, invstd, gamma, gq, gr, floor, width, out,
                             sum_dy, sum_dy_xhat):
        """(N, D) with one row block: work item = a block of COLUMN_BLOCK channels:
        sum(dy), sum(dy * (x - mean)) over all rows (``_partials_products``, as in
        ``_sums_cols``), then dx = k*dy + kx*(x - mean) + k0 while the block is
        in L2 (dy masked by the ReLU when floor is not None)."""
        A, J = x.shape
        n_col_blocks = (J + width - 1) // width
        floorc = _ct(floor, x)
        for jb in prange(n_col_blocks):
            j_lo = jb * width
            j_hi = min(J, j_lo + width)
            n = j_hi - j_lo
            p1 = np.zeros(n)
            p2 = np.zeros(n)
            _partials_products(dy, x, mean, gq, gr, floor, 0, A, j_lo, j_hi, p1, p2)
            k = np.empty(n)
            kx = np.empty(n)
            k0 = np.empty(n)
            for j in range(j_lo, j_hi):
                s_dy = p1[j - j_lo]
                s_dy_xhat = p2[j - j_lo] * invstd[j]
                sum_dy[j] = s_dy
                sum_dy_xhat[j] = s_dy_xhat
                k[j - j_lo] = gamma[j] * invstd[j]
                kx[j - j_lo] = -k[j - j_lo] * invstd[j] * (s_dy_xhat / A)
                k0[j - j_lo] = -k[j - j_lo] * (s_dy / A)
            mseg = mean[j_lo:j_hi]
            gq_seg = gq[j_lo:j_hi]
            gr_seg = gr[j_lo:j_hi]
            for a in range(A):
                d0 = dy[a, j_lo:j_hi]
                u0 = x[a, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                for j in range(n):
                    dv = _center(_ld(u0[j]), mseg[j])
                    du = _gate(_ld(d0[j]), dv, _ct(gq_seg[j], x), _ct(gr_seg[j], x), floorc)
                    _st(o0, j, du * _ct(k[j], dy) + dv * _ct(kx[j], x) + _ct(k0[j], dy))

    @njit(**_JIT)
    def _forward_cols_fused_train(x, gamma, beta, eps, lo, width, out, mean, invstd, rm, rv,
                                  momentum, update):
        """``_forward_cols_fused``, then the running statistics."""
        A, J = x.shape
        var = np.empty(J)
        scale = np.empty(J)
        _forward_cols_fused(x, gamma, beta, eps, lo, width, out, mean, var, invstd)
        _finish_stats(mean, var, A, eps, gamma, invstd, scale, rm, rv, momentum, update)

    # -----------------------------------------------------------------------
    # Serial kernels for small arrays (fewer than SERIAL_BELOW elements): one
    # compiled call per kernel, no parallel region (starting one costs more
    # than the work), no temporaries but per-channel accumulators. The sums
    # run a-major over (a, c, b), shifted by each channel's first element,
    # in float64; the order depends on the shape only.
    # -----------------------------------------------------------------------

    @njit(**_JIT)
    def _serial_sums(u, su, v, sv, gq, gr, floor, same, sum1, sum2):
        """``same`` (v is u, sv is su): sum1[c] = sum(u - su[c]),
        sum2[c] = sum((u - su[c])**2); otherwise sum1[c] = sum(du),
        sum2[c] = sum(du * (v - sv[c])), du = u masked by (v - sv[c]) * gq[c] + gr[c]."""
        A, C, B = u.shape
        floorc = _ct(floor, v)
        for c in range(C):
            sum1[c] = 0.0
            sum2[c] = 0.0
        for a in range(A):
            for c in range(C):
                s1 = 0.0
                s2 = 0.0
                if same:
                    s = _ct(su[c], u)
                    for b in range(B):
                        d = _ld(u[a, c, b]) - s
                        s1 += d
                        s2 += d * d
                else:
                    t = sv[c]
                    gqc = _ct(gq[c], v)
                    grc = _ct(gr[c], v)
                    for b in range(B):
                        dv = _center(_ld(v[a, c, b]), t)
                        du = _gate(_ld(u[a, c, b]), dv, gqc, grc, floorc)
                        s1 += du
                        s2 += du * dv
                sum1[c] += s1
                sum2[c] += s2

    @njit(**_JIT)
    def _serial_stats(x, mean, var):
        """Shifted sums: mean = K + S1/M, var = (S2 - S1^2/M)/M, K = x[0, c, 0]."""
        A, C, B = x.shape
        shift = np.empty(C)
        for c in range(C):
            shift[c] = _ld(x[0, c, 0])
        s1 = np.empty(C)
        s2 = np.empty(C)
        _serial_sums(x, shift, x, shift, shift, shift, None, True, s1, s2)
        for c in range(C):
            mean[c], var[c] = _mean_var(shift[c], s1[c], s2[c], A * B)

    @njit(**_JIT)
    def _serial_affine(u, p, q, r, lo, out):
        """out = max((u - p[c]) * q[c] + r[c], lo)."""
        A, C, B = u.shape
        loc = _ct(lo, u)
        for a in range(A):
            for c in range(C):
                pc = p[c]
                qc = _ct(q[c], u)
                rc = _ct(r[c], u)
                for b in range(B):
                    y = _center(_ld(u[a, c, b]), pc) * qc + rc
                    _st(out, (a, c, b), _relu(y, loc))

    @njit(**_JIT)
    def _serial_combine(u, q, v, s, t, r, gq, gr, floor, out):
        """out = du * q[c] + (v - s[c]) * t[c] + r[c], du = u masked by
        (v - s[c]) * gq[c] + gr[c]."""
        A, C, B = u.shape
        floorc = _ct(floor, v)
        for a in range(A):
            for c in range(C):
                qc = _ct(q[c], u)
                sc = s[c]
                tc = _ct(t[c], v)
                rc = _ct(r[c], u)
                gqc = _ct(gq[c], v)
                grc = _ct(gr[c], v)
                for b in range(B):
                    dv = _center(_ld(v[a, c, b]), sc)
                    du = _gate(_ld(u[a, c, b]), dv, gqc, grc, floorc)
                    _st(out, (a, c, b), du * qc + dv * tc + rc)

    @njit(**_JIT)
    def _serial_gated_scale(u, q, v, s, gq, gr, floor, out):
        """out = du * q[c], du = u masked by (v - s[c]) * gq[c] + gr[c]."""
        A, C, B = u.shape
        floorc = _ct(floor, v)
        for a in range(A):
            for c in range(C):
                qc = _ct(q[c], u)
                sc = s[c]
                gqc = _ct(gq[c], v)
                grc = _ct(gr[c], v)
                for b in range(B):
                    dv = _center(_ld(v[a, c, b]), sc)
                    _st(out, (a, c, b), _gate(_ld(u[a, c, b]), dv, gqc, grc, floorc) * qc)

    @njit(**_JIT)
    def _serial_forward_train(x, gamma, beta, eps, lo, out, mean, invstd, rm, rv, momentum,
                              update):
        """Statistics, finish (running statistics included), normalize."""
        A, C, B = x.shape
        var = np.empty(C)
        scale = np.empty(C)
        _serial_stats(x, mean, var)
        _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)
        _serial_affine(x, mean, scale, beta, lo, out)

    @njit(**_JIT)
    def _eval_coefficients(rm, rv, eps, gamma, mean, invstd, scale):
        """mean = running_mean, invstd = 1/sqrt(running_var + eps), scale = gamma*invstd."""
        for c in range(mean.shape[0]):
            mean[c] = rm[c]
            invstd[c] = 1.0 / np.sqrt(np.float64(rv[c]) + eps)
            scale[c] = gamma[c] * invstd[c]

    @njit(**_JIT)
    def _serial_forward_eval(x, gamma, beta, rm, rv, eps, lo, out, mean, invstd):
        scale = np.empty(mean.shape[0])
        _eval_coefficients(rm, rv, eps, gamma, mean, invstd, scale)
        _serial_affine(x, mean, scale, beta, lo, out)

    @njit(**_JIT)
    def _serial_backward_reduce(dy, x, mean, invstd, gq, gr, floor, sum_dy, sum_dy_xhat):
        """sum(dy), invstd * sum(dy * (x - mean)) (dy masked when floor is not None)."""
        _serial_sums(dy, mean, x, mean, gq, gr, floor, False, sum_dy, sum_dy_xhat)
        for c in range(mean.shape[0]):
            sum_dy_xhat[c] *= invstd[c]

    @njit(**_JIT)
    def _serial_backward_train(dy, x, mean, invstd, gamma, gq, gr, floor, out,
                               sum_dy, sum_dy_xhat):
        """Sums, then dx = k*du + kx*(x - mean) + k0."""
        A, C, B = x.shape
        _serial_backward_reduce(dy, x, mean, invstd, gq, gr, floor, sum_dy, sum_dy_xhat)
        k, kx, k0 = _dx_coefficients(A * B, invstd, gamma, sum_dy, sum_dy_xhat)
        _serial_combine(dy, k, x, mean, kx, k0, gq, gr, floor, out)

    @njit(**_JIT)
    def _serial_backward_eval(dy, x, mean, invstd, gamma, gq, gr, floor, out,
                              sum_dy, sum_dy_xhat):
        """Sums, then dx = du * gamma * invstd (mean and invstd are constants)."""
        _serial_backward_reduce(dy, x, mean, invstd, gq, gr, floor, sum_dy, sum_dy_xhat)
        _serial_gated_scale(dy, gamma * invstd, x, mean, gq, gr, floor, out)

# ---------------------------------------------------------------------------
# Shape dispatch (Python level).
# ---------------------------------------------------------------------------

def _storage(arr):
    """A view numba can type: float16 as uint16, bfloat16 as int16 bit
    patterns (zero-copy); float32/float64 arrays as they are."""
    if arr.dtype.itemsize == 2:
        return arr.view(np.uint16 if arr.dtype == np.float16 else np.int16)
    return arr


def _compute_dtype(x):
    """The dtype of the staged backward's full-size intermediates: float32 for
    16-bit storage, x.dtype otherwise (x as returned by ``_storage``)."""
    return np.dtype(np.float32) if x.dtype.itemsize == 2 else x.dtype


def _relu_floor(x):
    """The ReLU mask keeps ``dy`` where the recomputed ``y > floor``. float32
    storage computes ``y`` in float64 and stores ``float32(y)``, which is
    positive exactly when ``y > 2**-150``; so the mask is the forward's
    ``out > 0``. 16-bit storage computes ``y`` in float32, float64 in float64."""
    return 2.0 ** -150 if x.dtype == np.float32 else 0.0


def _gate_params(x, invstd, gamma, beta, relu):
    """(gq, gr, floor) of the ReLU mask ``y = (x - mean) * gq + gr > floor``;
    without ReLU, floor = None (the kernels are compiled without a mask)."""
    if not relu:
        zeros = np.zeros(x.shape[1])
        return zeros, zeros, None
    return invstd * gamma, np.ascontiguousarray(beta, dtype=np.float64), _relu_floor(x)


def _lo(relu):
    """The forward's lower bound: 0 for a fused ReLU, None (no bound) otherwise."""
    return 0.0 if relu else None


def _as_cols(arr):
    A, C, B = arr.shape
    return arr.reshape(A, C * B)


def _channel_sums(u, v, sv, gq=None, gr=None, floor=None):
    """sum(du) and sum(du * (v - sv[c])) per channel, float64; du = u masked by
    (v - sv[c]) * gq[c] + gr[c] > floor (floor None: no mask)."""
    A, C, B = u.shape
    if gq is None:
        gq = gr = np.zeros(C)
    sum1 = np.empty(C)
    sum2 = np.empty(C)
    if _reduces_by_rows(u.shape):
        _sums_rows(u, v, sv, gq, gr, floor, _chunks_per_channel(u.shape), sum1, sum2)
    else:
        sv_col = _per_column(sv, B)
        _sums_cols(_as_cols(u), sv_col, _as_cols(v), sv_col, _per_column(gq, B),
                   _per_column(gr, B), floor, False, _row_blocks(A, C * B), B, sum1, sum2)
    return sum1, sum2


def _affine(u, p, q, r, out, lo=None):
    """out = max((u - p[c]) * q[c] + r[c], lo) (lo None: no max)."""
    B = u.shape[2]
    if _uses_rows(u.shape):
        _affine_rows(u, p, q, r, lo, out)
    else:
        _affine_cols(_as_cols(u), _per_column(p, B), _per_column(q, B), _per_column(r, B), lo,
                     _as_cols(out))


def _combine(u, q, v, s, t, r, out, gq=None, gr=None, floor=None):
    """out = du * q[c] + (v - s[c]) * t[c] + r[c], du = u masked (floor None: du = u)."""
    B = u.shape[2]
    if gq is None:
        gq = gr = np.zeros(u.shape[1])
    if _uses_rows(u.shape):
        _combine_rows(u, q, v, s, t, r, gq, gr, floor, out)
    else:
        _combine_cols(_as_cols(u), _per_column(q, B), _as_cols(v), _per_column(s, B),
                      _per_column(t, B), _per_column(r, B), _per_column(gq, B),
                      _per_column(gr, B), floor, _as_cols(out))


def _gated_scale(u, q, v, s, gq, gr, floor, out):
    """out = du * q[c], du = u where (v - s[c]) * gq[c] + gr[c] > floor, else 0."""
    B = u.shape[2]
    if _uses_rows(u.shape):
        _gated_scale_rows(u, q, v, s, gq, gr, floor, out)
    else:
        _gated_scale_cols(_as_cols(u), _per_column(q, B), _as_cols(v), _per_column(s, B),
                          _per_column(gq, B), _per_column(gr, B), floor, _as_cols(out))


def _product(u, v, w, out):
    """out = w[c] * u * v."""
    if _uses_rows(u.shape):
        _product_rows(u, v, w, out)
    else:
        _product_cols(_as_cols(u), _as_cols(v), _per_column(w, u.shape[2]), _as_cols(out))


def _fill(r, out):
    """out = r[c]."""
    if _uses_rows(out.shape):
        _fill_rows(r, out)
    else:
        _fill_cols(_per_column(r, out.shape[2]), _as_cols(out))


def _stats_unlocked(x):
    A, C, B = x.shape
    mean = np.empty(C)
    var = np.empty(C)
    if _reduces_by_rows(x.shape):
        _stats_rows(x, _chunks_per_channel(x.shape), mean, var)
    else:
        _stats_cols(_as_cols(x), B, _row_blocks(A, C * B), mean, var)
    return mean, var


def _backward_reduce_unlocked(dy, x, mean, invstd, gq, gr, floor):
    sum_dy, sum_dy_xmu = _channel_sums(dy, x, mean, gq, gr, floor)
    return sum_dy, sum_dy_xmu * invstd


def _backward_elemt_unlocked(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out,
                             gq, gr, floor):
    # dx = gamma*invstd*(du - sum_dy/M - (x - mean)*invstd*sum_dy_xhat/M)
    #    = k*du + kx*(x - mean) + k0, du = dy masked by the ReLU
    n = x.shape[0] * x.shape[2]
    k, kx, k0 = _dx_coefficients(n, invstd, gamma, sum_dy, sum_dy_xhat)
    _combine(dy, k, x, mean, kx, k0, out, gq, gr, floor)


# ---------------------------------------------------------------------------
# The kernels of the contract.
# ---------------------------------------------------------------------------

def stats(x):
    """Per-channel mean and biased variance.

    Parameters
    ----------
    x : ndarray, (A, C, B), float16, bfloat16, float32 or float64, C-contiguous

    Returns
    -------
    mean, var : ndarray, (C,), float64
        Shifted sums: ``d = x - x[0, c, 0]``, ``mean = x[0, c, 0] + sum(d)/M``,
        ``var = (sum(d*d) - sum(d)**2/M)/M``, accumulated in float64 (16-bit
        storage: float32 blocks of SUM_BLOCK elements merged in float64).
    """
    x = _storage(x)
    if _serial(x):
        mean = np.empty(x.shape[1])
        var = np.empty(x.shape[1])
        _serial_stats(x, mean, var)
        return mean, var
    with _guard():
        return _stats_unlocked(x)


def normalize(x, mean, invstd, gamma, beta, out, relu=False):
    """``out = (x - mean) * invstd * gamma + beta``, then ``max(out, 0)`` when ``relu``.

    Computed in float64 for float32/float64 storage, in float32 (split mean)
    for 16-bit storage, rounded once into ``out``.

    Parameters
    ----------
    x, out : ndarray, (A, C, B), same dtype
    mean, invstd, gamma, beta : ndarray, (C,), float64
    relu : bool
    """
    x = _storage(x)
    out = _storage(out)
    if _serial(x):
        _serial_affine(x, mean, invstd * gamma, beta, _lo(relu), out)
        return
    with _guard():
        _affine(x, mean, invstd * gamma, beta, out, _lo(relu))


def forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None, momentum=0.1,
                  relu=False):
    """Training forward: statistics, normalize into ``out``, running statistics.

    The compiled driver of each loop shape also computes ``invstd`` and
    updates ``running_mean``/``running_var`` in place (float32 or float64
    arrays are updated directly; others through a float64 copy).

    Parameters
    ----------
    x, out : ndarray, (A, C, B), same dtype
    gamma, beta : ndarray, (C,), float64
    eps : float
    running_mean, running_var : ndarray, (C,), or None
    momentum : float
    relu : bool
        Write ``max(y, 0)`` (in the same pass).

    Returns
    -------
    mean, invstd : ndarray, (C,), float64
    """
    x = _storage(x)
    out = _storage(out)
    C = x.shape[1]
    mean = np.empty(C)
    invstd = np.empty(C)
    rm, rv, update = _host.running_arrays(running_mean, running_var, mean, invstd)
    eps = float(eps)
    momentum = float(momentum)
    lo = _lo(relu)
    if _serial(x):
        _serial_forward_train(x, gamma, beta, eps, lo, out, mean, invstd, rm, rv, momentum,
                              update)
    else:
        with _guard():
            A, C, B = x.shape
            if _fuses(x, 2):
                _forward_fused_train(x, gamma, beta, eps, lo, _fused_block(x.shape, x.itemsize),
                                     out, mean, invstd, rm, rv, momentum, update)
            elif _fuses_cols(x.shape):
                _forward_cols_fused_train(_as_cols(x), gamma, beta, eps, lo,
                                          _fused_cols_width(x), _as_cols(out), mean, invstd,
                                          rm, rv, momentum, update)
            elif not _uses_rows(x.shape):
                _forward_cols_train(_as_cols(x), B, gamma, beta, eps, lo, _row_blocks(A, C * B),
                                    _as_cols(out), mean, invstd, rm, rv, momentum, update)
            elif _reduces_by_rows(x.shape):
                _forward_rows_train(x, _chunks_per_channel(x.shape), gamma, beta, eps, lo, out,
                                    mean, invstd, rm, rv, momentum, update)
            else:
                var = np.empty(C)
                _stats_cols(_as_cols(x), B, _row_blocks(A, C * B), mean, var)
                scale = np.empty(C)
                _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum,
                              update)
                _affine_rows(x, mean, scale, beta, lo, out)
    if update:
        _host.write_back(running_mean, running_var, rm, rv)
    return mean, invstd


def forward_eval(x, gamma, beta, running_mean, running_var, eps, out, relu=False):
    """Evaluation forward: normalize with the running statistics (then ``max(y, 0)``
    when ``relu``).

    Returns
    -------
    mean, invstd : ndarray, (C,), float64
        ``running_mean`` and ``1 / sqrt(running_var + eps)``.
    """
    x = _storage(x)
    out = _storage(out)
    C = x.shape[1]
    mean = np.empty(C)
    invstd = np.empty(C)
    rm, rv = _host.readable_running(running_mean, running_var)
    if _serial(x):
        _serial_forward_eval(x, gamma, beta, rm, rv, float(eps), _lo(relu), out, mean, invstd)
        return mean, invstd
    scale = np.empty(C)
    _eval_coefficients(rm, rv, float(eps), gamma, mean, invstd, scale)
    with _guard():
        _affine(x, mean, scale, beta, out, _lo(relu))
    return mean, invstd


def backward_eval(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """Evaluation backward ``dx = dy * gamma * invstd``, and the two sums.

    With ``relu``, ``dy`` is first masked by ``y > 0``, ``y`` recomputed from
    ``x`` as the forward computes it.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, (C,), float64
    """
    dy, x, out = _storage(dy), _storage(x), _storage(out)
    gq, gr, floor = _gate_params(x, invstd, gamma, beta, relu)
    if _serial(x):
        C = x.shape[1]
        sum_dy = np.empty(C)
        sum_dy_xhat = np.empty(C)
        _serial_backward_eval(dy, x, mean, invstd, gamma, gq, gr, floor, out, sum_dy,
                              sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        sum_dy, sum_dy_xhat = _backward_reduce_unlocked(dy, x, mean, invstd, gq, gr, floor)
        if relu:
            _gated_scale(dy, gamma * invstd, x, mean, gq, gr, floor, out)
        else:
            zeros = np.zeros(x.shape[1])
            _affine(dy, zeros, gamma * invstd, zeros, out)
    return sum_dy, sum_dy_xhat


def backward_reduce(dy, x, mean, invstd, gamma=None, beta=None, relu=False):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)``.

    Parameters
    ----------
    dy, x : ndarray, (A, C, B), same dtype
    mean, invstd : ndarray, (C,), float64
    gamma, beta : ndarray, (C,), float64, or None
        Read only with ``relu``: ``dy`` is masked by ``y > 0`` first.
    relu : bool

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, (C,), float64
    """
    dy, x = _storage(dy), _storage(x)
    gq, gr, floor = _gate_params(x, invstd, gamma, beta, relu)
    if _serial(x):
        C = x.shape[1]
        sum_dy = np.empty(C)
        sum_dy_xhat = np.empty(C)
        _serial_backward_reduce(dy, x, mean, invstd, gq, gr, floor, sum_dy, sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        return _backward_reduce_unlocked(dy, x, mean, invstd, gq, gr, floor)


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta=None,
                   relu=False):
    """``out = gamma * invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M)``.

    Parameters
    ----------
    dy, x, out : ndarray, (A, C, B), same dtype
    mean, invstd, gamma, sum_dy, sum_dy_xhat : ndarray, (C,), float64
    beta : ndarray, (C,), float64, or None
        Read only with ``relu``: ``dy`` is masked by ``y > 0`` first.
    relu : bool
    """
    dy, x, out = _storage(dy), _storage(x), _storage(out)
    gq, gr, floor = _gate_params(x, invstd, gamma, beta, relu)
    if _serial(x):
        k, kx, k0 = _dx_coefficients(x.shape[0] * x.shape[2], invstd, gamma, sum_dy,
                                     sum_dy_xhat)
        _serial_combine(dy, k, x, mean, kx, k0, gq, gr, floor, out)
        return
    with _guard():
        _backward_elemt_unlocked(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out,
                                 gq, gr, floor)


def backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """Simplified backward: ``backward_reduce`` then ``backward_elemt``.

    With the rows loop shape and enough channels, both passes run per channel
    back to back (the second read of ``dy`` and ``x`` comes from cache);
    small arrays run one serial compiled kernel. With ``relu``, ``dy`` is
    masked by ``y > 0`` in both passes (``y`` recomputed from ``x``).

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, (C,), float64
        ``dbeta`` and ``dgamma``.
    """
    dy, x, out = _storage(dy), _storage(x), _storage(out)
    gq, gr, floor = _gate_params(x, invstd, gamma, beta, relu)
    C = x.shape[1]
    sum_dy = np.empty(C)
    sum_dy_xhat = np.empty(C)
    if _serial(x):
        _serial_backward_train(dy, x, mean, invstd, gamma, gq, gr, floor, out, sum_dy,
                               sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        if _fuses(x, 3):
            _backward_rows_fused(dy, x, mean, invstd, gamma, gr, floor,
                                 _fused_block(x.shape, x.itemsize), out, sum_dy, sum_dy_xhat)
        elif _fuses_cols(x.shape):
            _backward_cols_fused(_as_cols(dy), _as_cols(x), mean, invstd, gamma, gq, gr, floor,
                                 _fused_cols_width(x), _as_cols(out), sum_dy, sum_dy_xhat)
        elif not _uses_rows(x.shape):
            A, C, B = x.shape
            _backward_cols(_as_cols(dy), _as_cols(x), B, mean, invstd, gamma, gq, gr, floor,
                           _row_blocks(A, C * B), _as_cols(out), sum_dy, sum_dy_xhat)
        else:
            sum_dy, sum_dy_xhat = _backward_reduce_unlocked(dy, x, mean, invstd, gq, gr, floor)
            _backward_elemt_unlocked(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out,
                                     gq, gr, floor)
        return sum_dy, sum_dy_xhat


def backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False):
    """The cs231n computational graph, one pass per stage.

    Every full-size stage is its own parallel loop writing a new array of the
    compute dtype (float32 for 16-bit storage, else ``x.dtype``); reductions
    accumulate in float64; ``dx`` is rounded once into ``out``. With ``relu``
    the graph has one more node on top, walked back first: ``y`` rebuilt full
    size, then ``dy = where(y > 0, dy, 0)`` full size.

    Returns
    -------
    dgamma, dbeta : ndarray, (C,), float64
    """
    dy, x, out = _storage(dy), _storage(x), _storage(out)
    work = _compute_dtype(x)
    # At most four full-size intermediates live at once (dxmu1, xmu, dsq,
    # dxmu2 at step 3), five with the ReLU's masked dy.
    _memory.require((4 + bool(relu)) * x.size * work.itemsize, "the staged backward")
    with _guard():
        A, C, B = x.shape
        n = A * B
        zeros = np.zeros(C)
        ones = np.ones(C)
        if relu:
            y = np.empty(x.shape, work)
            _affine(x, mean, invstd * gamma, beta, y)       # step 10: y = xhat * gamma + beta
            dy_relu = np.empty(x.shape, work)
            _gated_scale(dy, ones, y, zeros, ones, zeros, _relu_floor(x), dy_relu)
            dy = dy_relu                                    # dy = where(y > 0, dy, 0)
            del y
        xmu = np.empty(x.shape, work)
        _affine(x, mean, ones, zeros, xmu)                  # xmu = x - mean
        xhat = np.empty(x.shape, work)
        _affine(xmu, zeros, invstd, zeros, xhat)            # xhat = xmu * invstd
        dbeta, _ = _channel_sums(dy, dy, zeros)             # step 9: sum(dy)
        _, dgamma = _channel_sums(dy, xhat, zeros)          # step 8: sum(dy * xhat)
        del xhat
        dxhat = np.empty(x.shape, work)
        _affine(dy, zeros, gamma, zeros, dxhat)             # dxhat = dy * gamma
        _, divar = _channel_sums(dxhat, xmu, zeros)         # step 7: sum(dxhat * xmu)
        dxmu1 = np.empty(x.shape, work)
        _affine(dxhat, zeros, invstd, zeros, dxmu1)         # dxmu1 = dxhat * invstd
        del dxhat
        dsqrtvar = -invstd * invstd * divar                 # step 6
        dvar = 0.5 * invstd * dsqrtvar                      # step 5
        dsq = np.empty(x.shape, work)
        _fill(dvar / n, dsq)                                # step 4: dsq = dvar / M
        dxmu2 = np.empty(x.shape, work)
        _product(xmu, dsq, 2.0 * ones, dxmu2)               # step 3: 2 * xmu * dsq
        del xmu, dsq
        dx1 = np.empty(x.shape, work)
        _combine(dxmu1, ones, dxmu2, zeros, ones, zeros, dx1)  # step 2: dxmu1 + dxmu2
        del dxmu1, dxmu2
        dmu_sum, _ = _channel_sums(dx1, dx1, zeros)
        dmu = -dmu_sum                                      # step 2: dmu = -sum(dx1)
        _affine(dx1, zeros, ones, dmu / n, out)             # steps 1, 0: dx1 + dmu / M
        return dgamma, dbeta
