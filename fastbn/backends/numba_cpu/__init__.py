"""Numba CPU backend: ``@njit(parallel=True, cache=True)`` loops on ``(A, C, B)``.

The kernels follow the contract in :mod:`fastbn.backends`. They are compiled
with ``error_model='numpy'``, ``boundscheck=False`` and
``fastmath={'reassoc', 'contract'}``.

The package
-----------
``_config``
    The threading layer, the guard of every parallel call (``_guard``), the
    features of the CPU numba compiles for, and the loop-shape and
    work-splitting constants (re-exported here; the work-splitting helpers
    of this module read them from here).
``_loadstore``
    16-bit loads and stores (F16C or integer conversions) and the helpers
    that pick the compute type at compile time (``_ld``, ``_st``, ``_ct``,
    ``_center``, ``_gate``, ``_relu``).
``_ops``
    What is computed: the elementwise ops (``affine``, ``combine``,
    ``gated``, ``product``, ``fill``), the reduction terms (``shifted``,
    ``products``) and the per-channel steps.
``_loops``
    How it is looped: every loop shape (segments, rows, columns, serial,
    fused) written once, as a factory that compiles an op or a term into
    it; ``AFFINE``, ``SHIFTED``, ... are the kernels of this backend.
``_small``
    Each contract kernel in one compiled call, for small arrays; also
    called on memory addresses (``forward_train_at``, ...; see
    :func:`serial_entry`), where making NumPy views would cost more than
    the kernel.
this module
    The contract's kernels: which loop shape a call takes, and the staged
    backward (the walk of :mod:`fastbn.backends._staged` over this
    backend's kernels).

Storage and compute types
-------------------------
Each kernel is written once; what it loads, stores and computes in is chosen
at compile time by the dtype of its arrays:

* float32 and float64 storage compute in float64 (float32 data is converted
  element by element before anything else);
* float16 and bfloat16 storage compute in float32. Numba cannot type those
  dtypes, so the Python wrappers view them, without a copy, as ``uint16``
  (float16) and ``int16`` (bfloat16) bit patterns, and the kernels convert:
  float16 with LLVM's ``half`` type (``fpext``/``fptrunc``, i.e.
  ``vcvtph2ps``/``vcvtps2ph``, vectorized) when the CPU numba compiles for
  has F16C, else with branch-free integer code; bfloat16 with integer code
  (the upper half of a float32; stores round to nearest even, NaN stays a
  quiet NaN). ``x - mean`` uses a split ``mean = hi + lo`` in float32, so a
  channel whose mean is far larger than its spread keeps its precision.
  Sums run in float32 over blocks of ``SUM_BLOCK`` elements (vectorized
  partial sums of at most a few dozen terms each) merged in float64; the
  staged backward's full-size intermediates are float32.

Fused ReLU
----------
With ``relu`` the forward kernels store ``max(y, 0)`` (``lo = 0``) in the
normalize pass; a NaN ``y`` stays NaN. The backward kernels mask ``dy`` in
every pass that reads it: ``y = (x - mean) * (invstd * gamma) + beta`` is
recomputed with the forward's arithmetic and ``dy`` kept where ``y >
floor``. ``floor`` is 0 (float64 and 16-bit storage) or ``2**-150``
(float32 storage, whose forward computes ``y`` in float64 and stores
``float32(y)``, positive exactly when ``y > 2**-150``), so the mask is the
forward's ``out > 0``. A NaN ``y`` masks its ``dy``, as in every backend.
Without ReLU, ``lo`` and ``floor`` are ``None``: numba compiles those
kernels apart, with no bound and no mask, so the plain kernels do not pay
for the ReLU. The staged backward rebuilds ``y`` and the masked ``dy`` as
two more full-size stages.

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

Which loop shape a call takes
-----------------------------
(The loop shapes themselves are described in :mod:`._loops`.)

For ``forward_train``, ``forward_eval`` and ``backward_train`` these choices
are the *default plan* (:func:`default_plan`); a plan measured on the
machine (``fastbn tune``, :mod:`fastbn.plans`) replaces it per call class.
The other kernels always take the default choices.

* Arrays of fewer than ``SERIAL_BELOW`` elements run the serial kernels
  (:mod:`._small`): no parallel region, about 2 us for an (8, 16) array.
* Elementwise passes use the rows shape when ``B >= ROWS_MIN_B`` (e.g.
  NCHW), else the columns shape (``(N, D)``, channels-last, 7x7 and 14x14
  maps).
* Reductions use the rows shape when ``B >= REDUCE_ROWS_MIN_B``: one work
  item per channel with at least ``FUSED_MIN_CHANNELS`` channels, else each
  channel split in chunks (``_chunks_per_channel``) so that every core has
  work. Otherwise the columns shape, with few row blocks (``_row_blocks``,
  about ``COLUMN_ITEMS`` items) to keep the float64 partial rows small.
* The training kernels run fused when the arrays they touch exceed the
  last-level cache (``FUSED_MIN_BYTES``), rows are long (``FUSED_MIN_B``)
  and every channel is one reduction item: a work item is a block of
  consecutive channels of about ``FUSED_SLAB_BYTES`` (``_fused_block``), so
  only the compulsory bytes cross the memory bus. ``(N, D)`` arrays whose
  reduction has a single row block (``_fuses_cols``, e.g. (256, 4096)) run
  fused per block of columns (``_fused_cols_width``). Other arrays take two
  parallel passes (the second streams from L3).
* Outputs of at least the last-level share (``STREAM_MIN_BYTES``), float32
  and float64, written whole rows at a time (the rows loop shape, the fused
  kernels on ``B > 1``) in rows of at least ``STREAM_MIN_ROW_BYTES``, use
  streaming stores (``_streams``): each cache line of a row is computed
  into a one-line buffer and written past the caches, so it is not first
  read, and the fused kernels' slab stays in L2 for its second read.

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
(:mod:`fastbn.backends._staged`). The other kernels allocate nothing of the
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
several Python threads at once. When this package is imported before any
Numba parallel region has run, and neither ``NUMBA_THREADING_LAYER`` nor
``numba.config.THREADING_LAYER`` has been set by the user, it sets
``numba.config.THREADING_LAYER_PRIORITY`` to ``['omp', 'tbb', 'workqueue']``:
the GNU OpenMP layer (libgomp, the runtime the Cython backend also uses, so
both share one OpenMP runtime), then TBB, and only then workqueue. The
kernels release the GIL (``nogil=True``). If the layer in use is
``workqueue`` (neither libgomp nor tbb loads, or someone else chose it), every
parallel kernel call from this package is serialized by a process-wide lock,
so concurrent calls stay correct. ``info()["threading_layer"]`` reports the
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

Numba's cache
-------------
Every kernel is cached on disk and loads without compiling in a new process
(:mod:`._loops` says why the factories' closures stay cacheable). Numba
keys its cache on the CPU name and features, and the F16C choice follows the
same features, so a cache never mixes the two paths. Numba checks a cached
function against its own source file only: a kernel does not notice a
change of a function it compiled in from another module of this package.
After editing one, delete ``fastbn/backends/numba_cpu/__pycache__`` (or run
with another ``NUMBA_CACHE_DIR``).
"""

import functools
import threading

import numpy as np

from ... import plans as _plans
from .. import _fork, _host, _staged
# the tuning numbers, the guard and the compile target's facts (see _config);
# the work-splitting helpers below read the numbers from this module
from ._config import (CACHES, COLUMN_BLOCK, COLUMN_ITEMS, ELEMENT_ROWS, FUSED_COLS,  # noqa: F401
                      FUSED_COLS_BYTES, FUSED_MIN_B, FUSED_MIN_BYTES, FUSED_MIN_CHANNELS,
                      FUSED_SLAB_BYTES, MIN_ITEM_ELEMENTS, PREFETCH_ROWS_AHEAD,
                      REDUCE_ROWS_MIN_B, ROWS_MIN_B, SERIAL_BELOW, STREAM_MIN_BYTES,
                      STREAM_MIN_ROW_BYTES, SUM_BLOCK, TARGET_ITEMS, VECTOR_BYTES,
                      _IMPORT_ERROR, _NO_LOCK, _guard, _layer_initialized, _predicted_layer,
                      _target_name, _thread_count, numba)

ON_DEVICE = False

if numba is not None:
    from . import _small
    from ._small import backward_at, forward_eval_at, forward_train_at  # noqa: F401
    # the 16-bit conversions, reached from here by the tests
    from ._loadstore import (_F16C, _bf16_to_f32, _f32_to_bf16, _f32_to_half_f16c,  # noqa: F401
                             _f32_to_half_soft, _half_to_f32_f16c, _half_to_f32_soft)
    from ._loops import (AFFINE, COMBINE, FILL, GATED, PRODUCT, PRODUCTS, SHIFTED,  # noqa: F401
                         _chunk_range, backward_columns_fused, backward_rows_fused,
                         forward_columns_fused, forward_rows_fused, work_size)
    from ._ops import (channel_shift, dx_coefficients, eval_coefficients, finish_stats,
                       moments)


def tuning():
    """The machine-dependent constants this backend chose at import.

    Returns
    -------
    dict
        ``vector_bytes`` (of the CPU numba compiles for), ``sum_block``,
        ``fused_slab_bytes``, ``fused_cols_bytes``, ``fused_min_bytes``,
        ``stream_min_bytes`` and ``caches`` (the sizes they come from,
        :func:`fastbn.machine.cache_sizes`).
    """
    return {"vector_bytes": VECTOR_BYTES, "sum_block": SUM_BLOCK,
            "fused_slab_bytes": FUSED_SLAB_BYTES, "fused_cols_bytes": FUSED_COLS_BYTES,
            "fused_min_bytes": FUSED_MIN_BYTES, "stream_min_bytes": STREAM_MIN_BYTES,
            "caches": dict(CACHES)}


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


def _fused_cols_width(x, width_bytes=None):
    """Channels per work item of the fused (N, D) kernels: about ``width_bytes``
    (default FUSED_COLS_BYTES) of x, at least COLUMN_BLOCK (a call then cuts
    it to two items per thread: :func:`_per_thread_width`). Each channel is
    summed alone over all rows, so the width changes speed, never results."""
    A, C, B = x.shape
    by_cache = (width_bytes or FUSED_COLS_BYTES) // (A * x.itemsize)
    return max(COLUMN_BLOCK, by_cache // 16 * 16)


def _per_thread_width(width, C):
    """A fused (N, D) width cut so that each thread has at least two work
    items, never under COLUMN_BLOCK (within :func:`_guard`)."""
    by_threads = -(-C // (2 * _thread_count()))
    return max(COLUMN_BLOCK, min(width, by_threads // 16 * 16))


def _fuses(shape, itemsize, n_arrays):
    """Whether a training kernel touching ``n_arrays`` arrays of x's size runs
    fused by default: rows shape, whole-channel items, rows of at least
    FUSED_MIN_B, and a working set larger than the last-level cache."""
    nbytes = shape[0] * shape[1] * shape[2] * itemsize
    return (_reduces_by_rows(shape) and _chunks_per_channel(shape) == 1
            and shape[2] >= FUSED_MIN_B and n_arrays * nbytes >= FUSED_MIN_BYTES)


def _streams(shape, itemsize):
    """Whether a plan that writes whole rows streams its output by default:
    float32 or float64 outputs of at least STREAM_MIN_BYTES (beyond the
    last-level share, where a plain store first reads each line it writes)
    in rows of at least STREAM_MIN_ROW_BYTES (shorter rows are mostly
    partial lines and per-row work: float64 rows of 49 values ran at
    0.4-0.5x the plain stores)."""
    return (itemsize >= 4 and shape[2] * itemsize >= STREAM_MIN_ROW_BYTES
            and shape[0] * shape[1] * shape[2] * itemsize >= STREAM_MIN_BYTES)


def _fused_block(shape, itemsize, slab_bytes=None):
    """Channels per fused work item: a slab of about ``slab_bytes`` (default
    FUSED_SLAB_BYTES, so that both passes over it hit L2), keeping at least
    FUSED_MIN_CHANNELS work items."""
    A, C, B = shape
    by_cache = (slab_bytes or FUSED_SLAB_BYTES) // max(1, A * B * itemsize)
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


def _fused_width(x, plan):
    """Channels per work item of a ``"fused"`` plan's kernel: the (N, D)
    column-block kernel's width when ``B == 1``, else the rows kernel's block."""
    if x.shape[2] == 1:
        return _fused_cols_width(x, plan["slab_bytes"])
    return _fused_block(x.shape, x.itemsize, plan["slab_bytes"])


def _guard_for(x):
    """What a call on x runs under: nothing for the serial kernels (they start
    no parallel region), :func:`_guard` otherwise."""
    return _NO_LOCK if _serial(x) else _guard()


# ---------------------------------------------------------------------------
# Plans (fastbn.plans): every choice of the training forward, the evaluation
# forward and the simplified backward, as the fields of a plan. The default
# plan is the heuristics above; wisdom or set_tuning("measure") replace it.
# ---------------------------------------------------------------------------

_LOOPS = ("rows", "columns")


def default_plan(shape, itemsize, pass_name):
    """The plan these heuristics choose for a call.

    Parameters
    ----------
    shape : tuple of int
        ``(A, C, B)``.
    itemsize : int
    pass_name : {"forward", "eval", "backward"}

    Returns
    -------
    dict
        ``strategy``: ``"serial"`` (one compiled call, no parallel region),
        ``"passes"`` (a reduction, then an elementwise pass) or ``"fused"``
        (both passes per cache-sized slab of channels; the (N, D) column-block
        kernel when ``B == 1``). ``reduce`` and ``apply``: the loop shape,
        ``"rows"`` or ``"columns"``, of the reduction and of the elementwise
        pass (``"passes"``; ``eval`` has no reduction). ``slab_bytes``: the
        bytes of x per fused work item (``"fused"``). ``stores``, for the
        plans whose elementwise pass writes whole rows (the rows loop
        shape, the fused kernels on ``B > 1``): ``"streaming"``
        (non-temporal stores, for float32 and float64 outputs of at least
        STREAM_MIN_BYTES in rows of at least STREAM_MIN_ROW_BYTES) or
        ``"cached"`` (plain stores).
    """
    if shape[0] * shape[1] * shape[2] < SERIAL_BELOW:
        return {"strategy": "serial"}
    apply = "rows" if _uses_rows(shape) else "columns"
    if pass_name == "eval":
        plan = {"strategy": "passes", "apply": apply}
    elif _fuses(shape, itemsize, _plans.PASS_ARRAYS[pass_name]):
        plan = {"strategy": "fused", "slab_bytes": FUSED_SLAB_BYTES}
    elif _fuses_cols(shape):
        plan = {"strategy": "fused", "slab_bytes": FUSED_COLS_BYTES}
    else:
        plan = {"strategy": "passes",
                "reduce": "rows" if _reduces_by_rows(shape) else "columns", "apply": apply}
    if _writes_rows(plan, shape):
        plan["stores"] = "streaming" if _streams(shape, itemsize) else "cached"
    return plan


def _writes_rows(plan, shape):
    """Whether a plan's elementwise pass writes whole rows (the rows loop
    shape, or the fused kernels on ``B > 1``): those have a ``stores`` field."""
    if plan["strategy"] == "fused":
        return shape[2] > 1
    return plan["strategy"] == "passes" and plan["apply"] == "rows"


def plan_candidates(shape, itemsize, pass_name):
    """The plans ``fastbn tune`` times for a call, the default first.

    Every loop shape of each pass, the fused kernel with half, the same and
    twice the default slab (and four times on ``(N, D)`` arrays, whose
    column blocks read a short piece of every row), and the serial kernels
    for arrays within a few times the serial threshold; those that write
    whole rows with plain and with streaming stores. Any candidate
    computes the contract's result (only the order of summation differs).
    """
    candidates = [default_plan(shape, itemsize, pass_name)]
    if pass_name == "eval":
        options = [{"strategy": "passes", "apply": loop} for loop in _LOOPS]
    else:
        options = [{"strategy": "passes", "reduce": reduce, "apply": apply}
                   for reduce in _LOOPS for apply in _LOOPS]
        if shape[2] == 1:
            sizes = (FUSED_COLS_BYTES // 2, FUSED_COLS_BYTES, 2 * FUSED_COLS_BYTES,
                     4 * FUSED_COLS_BYTES)
        else:
            sizes = (FUSED_SLAB_BYTES // 2, FUSED_SLAB_BYTES, 2 * FUSED_SLAB_BYTES)
        options += [{"strategy": "fused", "slab_bytes": size} for size in sizes]
    if shape[0] * shape[1] * shape[2] < 8 * SERIAL_BELOW:
        options.append({"strategy": "serial"})
    for option in options:
        stores = ("cached", "streaming") if _writes_rows(option, shape) else (None,)
        for store in stores:
            plan = {**option, "stores": store} if store else option
            if plan not in candidates:
                candidates.append(plan)
    return candidates


@functools.lru_cache(maxsize=None)
def plan_build():
    """The build a plan was measured for: numba's version and compile target."""
    return f"numba {numba.__version__} {_target_name()}"


def _valid_plan(plan, pass_name):
    strategy = plan.get("strategy")
    if plan.get("stores", "cached") not in ("cached", "streaming"):
        return False
    if strategy == "serial":
        return True
    if strategy == "fused":
        return pass_name != "eval" and isinstance(plan.get("slab_bytes"), int)
    return (strategy == "passes" and plan.get("apply") in _LOOPS
            and (pass_name == "eval" or plan.get("reduce") in _LOOPS))


def _plan(x, pass_name):
    """The plan of a call on x (its storage dtype, before :func:`_storage`): a
    stored one (forced, measured in this process, or wisdom), else the default."""
    plan = _plans.lookup("numba", plan_build(), x.shape, x.dtype, pass_name)
    if plan is None or not _valid_plan(plan, pass_name):
        return default_plan(x.shape, x.itemsize, pass_name)
    return plan


# A call's plan and fused block, kept per call shape: making them is Python
# on the shape, tens of microseconds when the previous call's kernel has
# evicted the interpreter's code and data from the caches; a hit costs a
# few. Kept while fastbn.plans.generation() and the settings stay the same.
_DECISIONS = {}


def _settings():
    """The module settings that the default plan and the blocks read."""
    return (SERIAL_BELOW, ROWS_MIN_B, REDUCE_ROWS_MIN_B, FUSED_MIN_B, FUSED_MIN_BYTES,
            STREAM_MIN_BYTES, STREAM_MIN_ROW_BYTES, FUSED_MIN_CHANNELS, FUSED_COLS,
            FUSED_SLAB_BYTES, FUSED_COLS_BYTES, COLUMN_BLOCK)


def _decide(x, pass_name):
    """``(plan, block)`` of a call on x (its storage dtype): :func:`_plan`,
    and for a ``"fused"`` plan its kernel's channels per work item."""
    key = (x.shape, x.dtype, pass_name, _settings())
    generation = _plans.generation()
    kept = _DECISIONS.get(key)
    if kept is not None and kept[0] == generation:
        return kept[1], kept[2]
    plan = _plan(x, pass_name)
    block = _fused_width(x, plan) if plan["strategy"] == "fused" else 0
    if len(_DECISIONS) >= 4096:
        _DECISIONS.clear()
    _DECISIONS[key] = (_plans.generation(), plan, block)
    return plan, block


def address_scalars(dtype):
    """``(storage, parameter)``: scalars of the types the address entry points
    of :mod:`._small` take for an array of ``dtype`` (float16, bfloat16,
    float32 or float64): its storage type (16-bit values as their bits) and
    the per-channel values' (float32 for 16-bit storage)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 2:
        return (np.uint16(0) if dtype == np.float16 else np.int16(0)), np.float32(0)
    return dtype.type(0), dtype.type(0)


def serial_entry(shape, dtype, pass_name, relu):
    """The compiled address entry point of a pass that runs serially.

    Parameters
    ----------
    shape : tuple of 3 ints
        ``(A, C, B)``.
    dtype : numpy dtype
        The array's (float16, bfloat16, float32 or float64).
    pass_name : str
        ``"forward"``, ``"eval"``, ``"backward"`` (their plans decide) or
        ``"backward_eval"`` (the size does).
    relu : bool

    Returns
    -------
    callable or None
        None when the call's plan is not the serial one. Otherwise the
        compiled function of ``forward_train_at``, ``forward_eval_at`` or
        ``backward_at`` (:mod:`._small`) for these argument types (scalars
        from :func:`address_scalars`; the last argument ``lo`` or ``floor``
        is None without ReLU, else the forward's 0.0 or the backward's
        :func:`_relu_floor`), which computes
        what the contract's kernel computes. Called directly, it skips the
        dispatcher's typing of each argument, which is a good part of a
        small call.
    """
    if pass_name == "backward_eval":
        serial = shape[0] * shape[1] * shape[2] < SERIAL_BELOW
    else:
        layout = np.broadcast_to(np.empty((), dtype), shape)   # a plan reads the metadata only
        serial = _decide(layout, pass_name)[0]["strategy"] == "serial"
    if not serial:
        return None
    storage, param = address_scalars(dtype)
    shape = tuple(int(n) for n in shape)
    relu = 0.0 if relu else None   # the forward's lower bound; the backward's mask floor
    if pass_name in ("forward", "eval"):
        kernel = forward_train_at if pass_name == "forward" else forward_eval_at
        sample = (0, 0, shape, storage, 0, 0, 0, 0, param, 0, 0.0) + (
            (0.0, relu) if pass_name == "forward" else (relu,))
    else:
        kernel = backward_at
        sample = (0, 0, 0, shape, storage, 0, 0, 0, param, 0, 0, pass_name == "backward", relu)
    return kernel.compile(tuple(numba.typeof(value) for value in sample))


# ---------------------------------------------------------------------------
# Storage and the fused ReLU (Python level).
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
    """The ReLU mask keeps ``dy`` where the recomputed ``y > floor``, with
    ``floor`` the largest value the store rounds to 0
    (:func:`fastbn.backends._host.relu_floor`): so the mask is the forward's
    ``out > 0``. ``y`` is computed in float64 for float32 storage (floor
    2**-150), in float32 for 16-bit storage (float16: 2**-25, bfloat16:
    2**-134), in float64 for float64 (floor 0). ``x`` as :func:`_storage`
    returns it."""
    storage = {np.dtype(np.uint16): "float16", np.dtype(np.int16): "bfloat16"}.get(x.dtype, x.dtype)
    return _host.relu_floor(storage)


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


# ---------------------------------------------------------------------------
# Passes over the full arrays, in the loop shape of their shape.
# ---------------------------------------------------------------------------

# Each thread's work array for the columns kernels (their per-column
# parameters and partial sums), grown to the largest call and kept: a new
# allocation of more than glibc's mmap threshold (128 KiB until the process
# frees a larger mapped block) is a fresh mapping, and its pages faulted on
# every call (about 260 faults, a third of the kernel's time, at float32
# (64, 256, 14, 14)). Work arrays larger than WORK_KEEP_BYTES are not kept.
_WORK = threading.local()
WORK_KEEP_BYTES = 64 * 2**20


def _work(n):
    """A float64 array of at least ``n`` elements for this thread's next kernel."""
    work = getattr(_WORK, "array", None)
    if work is not None and work.size >= n:
        return work
    work = np.empty(n)
    if 8 * n <= WORK_KEEP_BYTES:
        _WORK.array = work
    return work


def _apply(kernels, u, v, params, bound, out, loop=None, stream=False):
    """``out = op(u, v, *params, bound)``, ``op`` the elementwise op of ``kernels``.

    Parameters
    ----------
    kernels : Elementwise
        ``AFFINE``, ``COMBINE``, ... of :mod:`._loops`.
    u, v, out : ndarray, (A, C, B)
        ``v`` is any input array of the shape when the op does not read it.
    params : tuple of ndarray, (C,), float64
        The op's parameters, in its order (:mod:`._ops`).
    bound : float or None
    loop : {"rows", "columns"}, optional
        A plan's loop shape; by default the serial kernel for small arrays,
        else the loop shape of out's shape.
    stream : bool, optional
        The rows loop shape writes ``out`` with streaming stores.
    """
    if loop is None:
        loop = "serial" if _serial(out) else "rows" if _uses_rows(out.shape) else "columns"
    # every kernel takes six parameters; the op reads only its own
    padded = tuple(params) + (params[0],) * (6 - len(params))
    if loop == "columns":
        kernels.columns(u, v, *padded, bound, out, _work(work_size(out.shape)))
    elif loop == "rows" and stream:
        kernels.rows_streamed(u, v, *padded, bound, out)
    else:
        getattr(kernels, loop)(u, v, *padded, bound, out)


def _sums(kernels, u, v, params, bound=None, loop=None):
    """The two per-channel sums of the reduction ``kernels`` (float64 ``(C,)``).

    Parameters
    ----------
    kernels : Reduction
        ``SHIFTED`` or ``PRODUCTS`` of :mod:`._loops`.
    u, v : ndarray, (A, C, B)
    params : tuple of ndarray, (C,), float64
        The term's parameters (:mod:`._ops`).
    bound : float or None
    loop : {"rows", "columns"}, optional
        A plan's loop shape; by default the serial kernel for small arrays,
        else the loop shape of u's shape.
    """
    A, C, B = u.shape
    sum1 = np.empty(C)
    sum2 = np.empty(C)
    p0, p1, p2 = tuple(params) + (params[0],) * (3 - len(params))
    if loop is None:
        loop = "serial" if _serial(u) else "rows" if _reduces_by_rows(u.shape) else "columns"
    if loop == "serial":
        kernels.serial(u, v, p0, p1, p2, bound, sum1, sum2)
    elif loop == "rows":
        kernels.rows(u, v, p0, p1, p2, bound, _chunks_per_channel(u.shape), sum1, sum2)
    else:
        n_row_blocks = _row_blocks(A, C * B)
        kernels.columns(u, v, p0, p1, p2, bound, n_row_blocks, sum1, sum2,
                        _work(work_size(u.shape, n_row_blocks)))
    return sum1, sum2


def _statistics(x, mean, var, loop=None):
    """Per-channel mean and biased variance of x, from sums shifted by x[0, c, 0]."""
    shift = channel_shift(x)
    s1, s2 = _sums(SHIFTED, x, x, (shift,), loop=loop)
    moments(shift, s1, s2, x.shape[0] * x.shape[2], mean, var)


def _backward_sums(dy, x, mean, invstd, gq, gr, floor, loop=None):
    """``sum(du)`` and ``invstd * sum(du * (x - mean))``, ``du`` the masked ``dy``."""
    sum_dy, sum_dy_xmu = _sums(PRODUCTS, dy, x, (mean, gq, gr), floor, loop)
    return sum_dy, sum_dy_xmu * invstd


def _backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, gq, gr, floor,
                    loop=None, stream=False):
    # dx = gamma*invstd*(du - sum_dy/M - (x - mean)*invstd*sum_dy_xhat/M)
    #    = k*du + kx*(x - mean) + k0, du = dy masked by the ReLU
    k, kx, k0 = dx_coefficients(x.shape[0] * x.shape[2], invstd, gamma, sum_dy, sum_dy_xhat)
    _apply(COMBINE, dy, x, (k, mean, kx, k0, gq, gr), floor, out, loop, stream)


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
    mean = np.empty(x.shape[1])
    var = np.empty(x.shape[1])
    if _serial(x):
        _small.stats(x, mean, var)
    else:
        with _guard():
            _statistics(x, mean, var)
    return mean, var


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
    with _guard_for(x):
        _apply(AFFINE, x, x, (mean, invstd * gamma, beta), _lo(relu), out)


def forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None, momentum=0.1,
                  relu=False):
    """Training forward: statistics, normalize into ``out``, running statistics.

    Also computes ``invstd`` and updates ``running_mean``/``running_var`` in
    place (float32 or float64 arrays are updated directly; others through a
    float64 copy). The call's plan (:func:`default_plan`) chooses: small
    arrays run one compiled serial call; large ones with long rows (or
    ``(N, D)`` ones) run fused per block of channels.

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
    plan, block = _decide(x, "forward")
    stream = plan.get("stores") == "streaming"
    x = _storage(x)
    out = _storage(out)
    A, C, B = x.shape
    mean = np.empty(C)
    invstd = np.empty(C)
    rm, rv, update = _host.running_arrays(running_mean, running_var, mean, invstd)
    eps = float(eps)
    momentum = float(momentum)
    lo = _lo(relu)
    strategy = plan["strategy"]
    if strategy == "serial":
        _small.forward_train(x, gamma, beta, eps, lo, out, mean, invstd, rm, rv, momentum,
                              update)
    elif strategy == "fused":
        # the statistics' finish (invstd, the running statistics) runs in the kernel
        with _guard():
            if B == 1:
                forward_columns_fused(x, gamma, beta, eps, lo, _per_thread_width(block, C), out,
                                      mean, invstd, rm, rv, momentum, update, False)
            else:
                forward_rows_fused(x, gamma, beta, eps, lo, block, out, mean, invstd, rm, rv,
                                   momentum, update, stream)
    else:
        var = np.empty(C)
        scale = np.empty(C)
        with _guard():
            _statistics(x, mean, var, plan["reduce"])
            finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)
            _apply(AFFINE, x, x, (mean, scale, beta), lo, out, plan["apply"], stream)
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
    plan, _ = _decide(x, "eval")
    x = _storage(x)
    out = _storage(out)
    C = x.shape[1]
    mean = np.empty(C)
    invstd = np.empty(C)
    rm, rv = _host.readable_running(running_mean, running_var)
    if plan["strategy"] == "serial":
        _small.forward_eval(x, gamma, beta, rm, rv, float(eps), _lo(relu), out, mean, invstd)
        return mean, invstd
    scale = np.empty(C)
    eval_coefficients(rm, rv, float(eps), gamma, mean, invstd, scale)
    with _guard():
        _apply(AFFINE, x, x, (mean, scale, beta), _lo(relu), out, plan["apply"],
               plan.get("stores") == "streaming")
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
        _small.backward_eval(dy, x, mean, invstd, gamma, gq, gr, floor, out, sum_dy,
                              sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        sum_dy, sum_dy_xhat = _backward_sums(dy, x, mean, invstd, gq, gr, floor)
        if relu:
            _apply(GATED, dy, x, (gamma * invstd, mean, gq, gr), floor, out)
        else:
            zeros = np.zeros(x.shape[1])
            _apply(AFFINE, dy, dy, (zeros, gamma * invstd, zeros), None, out)
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
        _small.backward_reduce(dy, x, mean, invstd, gq, gr, floor, sum_dy, sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        return _backward_sums(dy, x, mean, invstd, gq, gr, floor)


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
    with _guard_for(x):
        _backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, gq, gr, floor)


def backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """Simplified backward: ``backward_reduce`` then ``backward_elemt``.

    With the rows loop shape and enough channels, both passes run per block
    of channels back to back (the second read of ``dy`` and ``x`` comes from
    cache); small arrays run one serial compiled kernel. With ``relu``,
    ``dy`` is masked by ``y > 0`` in both passes (``y`` recomputed from ``x``).

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, (C,), float64
        ``dbeta`` and ``dgamma``.
    """
    plan, block = _decide(x, "backward")
    stream = plan.get("stores") == "streaming"
    dy, x, out = _storage(dy), _storage(x), _storage(out)
    gq, gr, floor = _gate_params(x, invstd, gamma, beta, relu)
    C = x.shape[1]
    sum_dy = np.empty(C)
    sum_dy_xhat = np.empty(C)
    if plan["strategy"] == "serial":
        _small.backward_train(dy, x, mean, invstd, gamma, gq, gr, floor, out, sum_dy,
                               sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        if plan["strategy"] == "fused":
            if x.shape[2] == 1:
                fused, block = backward_columns_fused, _per_thread_width(block, C)
            else:
                fused = backward_rows_fused
            fused(dy, x, mean, invstd, gamma, gq, gr, floor, block, out, sum_dy, sum_dy_xhat,
                  stream)
        else:
            sum_dy, sum_dy_xhat = _backward_sums(dy, x, mean, invstd, gq, gr, floor,
                                                 plan["reduce"])
            _backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, gq, gr, floor,
                            plan["apply"], stream)
    return sum_dy, sum_dy_xhat


# ---------------------------------------------------------------------------
# The staged backward: the walk of fastbn.backends._staged over these kernels.
# ---------------------------------------------------------------------------

class _StagedOps(_staged.HostChannels):
    """The staged walk's primitives: this backend's kernels, each writing a new
    full-size array of the compute dtype (16-bit ``x`` and ``dy`` are read
    as they are stored); sums accumulate in float64."""

    def __init__(self, x):
        self.shape = x.shape
        self.dtype = _compute_dtype(x)
        self.zeros = np.zeros(x.shape[1])
        self.ones = np.ones(x.shape[1])
        self.floor = _relu_floor(x)     # y > floor: the stored out > 0

    def _new(self, kernels, u, v, params, bound=None):
        result = np.empty(self.shape, self.dtype)
        _apply(kernels, u, v, params, bound, result)
        return result

    def normalize(self, x, mean, invstd, gamma, beta):
        return self._new(AFFINE, x, x, (mean, invstd * gamma, beta))

    def mask_positive(self, u, v):
        # u where v * 1 + 0 > floor, else 0
        return self._new(GATED, u, v, (self.ones, self.zeros, self.ones, self.zeros),
                         self.floor)

    def subtract(self, u, p):
        return self._new(AFFINE, u, u, (p, self.ones, self.zeros))

    def multiply(self, u, p):
        return self._new(AFFINE, u, u, (self.zeros, p, self.zeros))

    def broadcast(self, p):
        result = np.empty(self.shape, self.dtype)
        _apply(FILL, result, result, (p,), None, result)
        return result

    def twice_product(self, u, v):
        return self._new(PRODUCT, u, v, (2.0 * self.ones,))

    def add(self, u, v):
        # u * 1 + (v - 0) * 1 + 0
        return self._new(COMBINE, u, v, (self.ones, self.zeros, self.ones, self.zeros))

    def add_into(self, u, p, out):
        _apply(AFFINE, u, u, (self.zeros, self.ones, p), None, out)

    def sum(self, u):
        return _sums(PRODUCTS, u, u, (self.zeros,))[0]

    def sum_of_product(self, u, v):
        return _sums(PRODUCTS, u, v, (self.zeros,))[1]


def backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False):
    """The cs231n computational graph, one pass per stage.

    The walk is :func:`fastbn.backends._staged.backward`; every full-size
    stage is one of this backend's kernels writing a new array of the
    compute dtype (float32 for 16-bit storage, else ``x.dtype``); reductions
    accumulate in float64; ``dx`` is rounded once into ``out``. With ``relu``
    the graph has one more node on top, walked back first: ``y`` rebuilt full
    size, then ``dy = where(y > 0, dy, 0)`` full size.

    Raises
    ------
    MemoryError
        Before allocating anything, when the intermediates do not fit in the
        available memory.

    Returns
    -------
    dgamma, dbeta : ndarray, (C,), float64
    """
    dy, x, out = _storage(dy), _storage(x), _storage(out)
    _staged.require_memory(x.size, _compute_dtype(x).itemsize, relu)
    with _guard_for(x):
        return _staged.backward(_StagedOps(x), dy, x, mean, invstd, gamma, beta, relu, out,
                                x.shape[0] * x.shape[2])
