"""Numba CPU backend: ``@njit(parallel=True, cache=True)`` loops on ``(A, C, B)``.

The kernels follow the contract in :mod:`fastbn.backends`. They are compiled
for float32 and float64 inputs with ``error_model='numpy'``,
``boundscheck=False`` and ``fastmath={'reassoc', 'contract'}``; statistics,
reductions and the centring ``x - mean`` are computed in float64 (float32
data is converted element by element before anything else).

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
only the compulsory bytes cross the memory bus. ``(N, D)`` arrays whose
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
layer. Note: GNU OpenMP is not fork-safe after a parallel region has run
(use the ``spawn`` start method for multiprocessing).
"""

import os
import threading

from . import _host

try:
    import numpy as np
    import numba
    from numba import njit, prange
    _IMPORT_ERROR = ""
except ImportError as exc:  # numba (or numpy) missing: the module still imports
    numba = None
    _IMPORT_ERROR = f"numba is not importable: {exc}"

ON_DEVICE = False

# Loop-shape and work-splitting constants. They depend on nothing but the
# shape, so that results do not depend on the thread count.
ROWS_MIN_B = 16             # B at or above which elementwise passes use the rows loop shape
REDUCE_ROWS_MIN_B = 256     # B at or above which reductions use the rows loop shape
FUSED_MIN_CHANNELS = 64     # channels needed to make one channel one work item
TARGET_ITEMS = 64           # work items aimed at when channels are split
MIN_ITEM_ELEMENTS = 16384   # smallest work item when splitting
COLUMN_BLOCK = 256          # columns per work item in the columns loop shape
COLUMN_ITEMS = 16           # reduction items aimed at in the columns shape (few: small partials)
ELEMENT_ROWS = 16           # rows per elementwise work item in the columns loop shape
FUSED_SLAB_BYTES = 512 * 1024  # channels per fused work item: a slab of about this size
FUSED_MIN_BYTES = 32 * 1024 * 1024  # fuse only working sets larger than the last-level cache
FUSED_MIN_B = 256           # ... and rows long enough for the channel-by-channel order
FUSED_COLS = True           # (N, D) with one row block: fused per block of channels ...
FUSED_COLS_BYTES = 1024 * 1024  # ... whose rows fill about this much of x (L2); a channel's
                                # sums do not depend on the block width
SERIAL_BELOW = 32768        # arrays with fewer elements run serial kernels (no parallel region)

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


_WORKQUEUE_LOCK = threading.Lock()
_NO_LOCK = _NoLock()


_GUARD = []   # the guard, once numba has loaded its threading layer (it cannot change then)


def _guard():
    """A lock when the threading layer is workqueue (not thread-safe), else nothing."""
    if _GUARD:
        return _GUARD[0]
    guard = _WORKQUEUE_LOCK if _predicted_layer() == "workqueue" else _NO_LOCK
    if _layer_initialized():
        _GUARD.append(guard)
    return guard


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
        threading layer is OpenMP), ``device`` ("cpu"), ``threading_layer``.
    """
    if numba is None:
        return {"threads": 0, "openmp": False, "device": "cpu",
                "threading_layer": None, "reason": _IMPORT_ERROR}
    layer = _predicted_layer()
    return {"threads": int(numba.get_num_threads()), "openmp": layer == "omp",
            "device": "cpu", "threading_layer": layer}


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

    # -----------------------------------------------------------------------
    # Serial helpers on contiguous 1-D segments (called inside parallel
    # loops). Segment views (``row[lo:hi]``) let LLVM see unit stride, so
    # the loops vectorize.
    # -----------------------------------------------------------------------

    @njit(**_JIT)
    def _shifted_sums(seg, shift):
        """sum(d), sum(d*d) with d = seg - shift, in float64."""
        s1 = 0.0
        s2 = 0.0
        for j in range(seg.shape[0]):
            d = np.float64(seg[j]) - shift
            s1 += d
            s2 += d * d
        return s1, s2

    @njit(**_JIT)
    def _product_sums(useg, su, vseg, sv):
        """sum(du), sum(du*dv) with du = useg - su, dv = vseg - sv, in float64."""
        s1 = 0.0
        s2 = 0.0
        for j in range(useg.shape[0]):
            du = np.float64(useg[j]) - su
            s1 += du
            s2 += du * (np.float64(vseg[j]) - sv)
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
    def _affine_seg(useg, p, q, r, oseg):
        """oseg = (useg - p) * q + r, scalars p, q, r."""
        for j in range(useg.shape[0]):
            oseg[j] = (np.float64(useg[j]) - p) * q + r

    @njit(**_JIT)
    def _combine_seg(useg, q, vseg, s, t, r, oseg):
        """oseg = useg * q + (vseg - s) * t + r, scalar parameters."""
        for j in range(useg.shape[0]):
            oseg[j] = np.float64(useg[j]) * q + (np.float64(vseg[j]) - s) * t + r

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
            shift = np.float64(x[0, c, 0])
            m_lo = k * n // n_split
            m_hi = (k + 1) * n // n_split
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
            mean[c], var[c] = _mean_var(np.float64(x[0, c, 0]), s1, s2, n)

    @njit(**_PJIT)
    def _sums_rows(u, su, v, sv, n_split, sum1, sum2):
        """sum1[c] = sum(u - su[c]), sum2[c] = sum((u - su[c]) * (v - sv[c]))."""
        A, C, B = u.shape
        n = A * B
        part1 = np.empty((C, n_split))
        part2 = np.empty((C, n_split))
        for item in prange(C * n_split):
            c = item // n_split
            k = item - c * n_split
            m_lo = k * n // n_split
            m_hi = (k + 1) * n // n_split
            s1 = 0.0
            s2 = 0.0
            for a in range(m_lo // B, (m_hi - 1) // B + 1):
                b_lo = max(m_lo - a * B, 0)
                b_hi = min(m_hi - a * B, B)
                r1, r2 = _product_sums(u[a, c, b_lo:b_hi], su[c], v[a, c, b_lo:b_hi], sv[c])
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
    def _affine_rows(u, p, q, r, out):
        """out = (u - p[c]) * q[c] + r[c]."""
        A, C, B = u.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            _affine_seg(u[a, c, :], p[c], q[c], r[c], out[a, c, :])

    @njit(**_PJIT)
    def _combine_rows(u, q, v, s, t, r, out):
        """out = u * q[c] + (v - s[c]) * t[c] + r[c]."""
        A, C, B = u.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            _combine_seg(u[a, c, :], q[c], v[a, c, :], s[c], t[c], r[c], out[a, c, :])

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
            wc = w[c]
            for b in range(B):
                oseg[b] = wc * np.float64(useg[b]) * np.float64(vseg[b])

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
                oseg[b] = rc

    @njit(**_PJIT)
    def _forward_rows_fused(x, gamma, beta, eps, block, out, mean, var):
        """Work item = ``block`` consecutive channels: their shifted sums, then
        normalize the same channels while they are still in cache,
        out = (x - mean) * (invstd * gamma) + beta. Rows are visited a-major, so
        reads and writes are runs of block*B contiguous elements. Each channel's
        sums are formed in the same order as in ``_stats_rows`` (one chunk)."""
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
                    r1, r2 = _shifted_sums(x[a, c, :], np.float64(x[0, c, 0]))
                    acc1[c - c_lo] += r1
                    acc2[c - c_lo] += r2
            scale = np.empty(c_hi - c_lo)
            for c in range(c_lo, c_hi):
                mean_c, var_c = _mean_var(np.float64(x[0, c, 0]), acc1[c - c_lo], acc2[c - c_lo], n)
                mean[c] = mean_c
                var[c] = var_c
                scale[c - c_lo] = gamma[c] / np.sqrt(var_c + eps)
            for a in range(A):
                for c in range(c_lo, c_hi):
                    _affine_seg(x[a, c, :], mean[c], scale[c - c_lo], beta[c], out[a, c, :])

    @njit(**_PJIT)
    def _backward_rows_fused(dy, x, mean, invstd, gamma, block, out, sum_dy, sum_dy_xhat):
        """Work item = ``block`` consecutive channels: sum(dy), sum(dy * (x - mean)),
        then on the cached channels
        dx = gamma*invstd*(dy - sum_dy/M - xhat*sum_dy_xhat/M)."""
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
                    r1, r2 = _product_sums(dy[a, c, :], 0.0, x[a, c, :], mean[c])
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
                                 kx[c - c_lo], k0[c - c_lo], out[a, c, :])

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
        four rows per pass, so that p1/p2 are loaded and stored once per four rows."""
        su_seg = su[j_lo:j_hi]
        a = a_lo
        while a + 4 <= a_hi:
            u0 = u[a, j_lo:j_hi]
            u1 = u[a + 1, j_lo:j_hi]
            u2 = u[a + 2, j_lo:j_hi]
            u3 = u[a + 3, j_lo:j_hi]
            for j in range(su_seg.shape[0]):
                d0 = np.float64(u0[j]) - su_seg[j]
                d1 = np.float64(u1[j]) - su_seg[j]
                d2 = np.float64(u2[j]) - su_seg[j]
                d3 = np.float64(u3[j]) - su_seg[j]
                p1[j] += (d0 + d1) + (d2 + d3)
                p2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            a += 4
        for a in range(a, a_hi):
            u0 = u[a, j_lo:j_hi]
            for j in range(su_seg.shape[0]):
                d0 = np.float64(u0[j]) - su_seg[j]
                p1[j] += d0
                p2[j] += d0 * d0

    @njit(**_JIT)
    def _partials_products(u, su, v, sv, a_lo, a_hi, j_lo, j_hi, p1, p2):
        """p1[j] += du, p2[j] += du*dv, du = u[a, j] - su[j], dv = v[a, j] - sv[j],
        over rows [a_lo, a_hi), four rows per pass."""
        su_seg = su[j_lo:j_hi]
        sv_seg = sv[j_lo:j_hi]
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
            for j in range(su_seg.shape[0]):
                du0 = np.float64(u0[j]) - su_seg[j]
                du1 = np.float64(u1[j]) - su_seg[j]
                du2 = np.float64(u2[j]) - su_seg[j]
                du3 = np.float64(u3[j]) - su_seg[j]
                p1[j] += (du0 + du1) + (du2 + du3)
                p2[j] += ((du0 * (np.float64(v0[j]) - sv_seg[j]) + du1 * (np.float64(v1[j]) - sv_seg[j]))
                          + (du2 * (np.float64(v2[j]) - sv_seg[j]) + du3 * (np.float64(v3[j]) - sv_seg[j])))
            a += 4
        for a in range(a, a_hi):
            u0 = u[a, j_lo:j_hi]
            v0 = v[a, j_lo:j_hi]
            for j in range(su_seg.shape[0]):
                du0 = np.float64(u0[j]) - su_seg[j]
                p1[j] += du0
                p2[j] += du0 * (np.float64(v0[j]) - sv_seg[j])

    @njit(**_PJIT)
    def _sums_cols(u, su, v, sv, same, n_row_blocks, B, sum1, sum2):
        """sum1[c] = sum(u - su[j]), sum2[c] = sum((u - su[j]) * (v - sv[j])) over
        the rows and the B columns j of channel c. ``same``: v is u and sv is su
        (sum2 is then the sum of squares, read from u alone)."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        part1 = np.zeros((n_row_blocks, J))
        part2 = np.zeros((n_row_blocks, J))
        for item in prange(n_row_blocks * n_col_blocks):
            k = item // n_col_blocks
            jb = item - k * n_col_blocks
            a_lo = k * A // n_row_blocks
            a_hi = (k + 1) * A // n_row_blocks
            j_lo = jb * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            if same:
                _partials_same(u, su, a_lo, a_hi, j_lo, j_hi, part1[k, j_lo:j_hi], part2[k, j_lo:j_hi])
            else:
                _partials_products(u, su, v, sv, a_lo, a_hi, j_lo, j_hi,
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
    def _affine_cols(u, p, q, r, out):
        """out = (u - p[j]) * q[j] + r[j]. Item = (ELEMENT_ROWS rows, COLUMN_BLOCK
        columns); two rows per pass share the loads of the parameters."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        n_row_blocks = (A + ELEMENT_ROWS - 1) // ELEMENT_ROWS
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
                    o0[j] = (np.float64(u0[j]) - pseg[j]) * qseg[j] + rseg[j]
                    o1[j] = (np.float64(u1[j]) - pseg[j]) * qseg[j] + rseg[j]
                a += 2
            if a < a_hi:
                u0 = u[a, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                for j in range(pseg.shape[0]):
                    o0[j] = (np.float64(u0[j]) - pseg[j]) * qseg[j] + rseg[j]

    @njit(**_PJIT)
    def _combine_cols(u, q, v, s, t, r, out):
        """out = u * q[j] + (v - s[j]) * t[j] + r[j] (items as in ``_affine_cols``)."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        n_row_blocks = (A + ELEMENT_ROWS - 1) // ELEMENT_ROWS
        for item in prange(n_row_blocks * n_col_blocks):
            k = item // n_col_blocks
            j_lo = (item - k * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            qseg = q[j_lo:j_hi]
            sseg = s[j_lo:j_hi]
            tseg = t[j_lo:j_hi]
            rseg = r[j_lo:j_hi]
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
                    o0[j] = np.float64(u0[j]) * qseg[j] + (np.float64(v0[j]) - sseg[j]) * tseg[j] + rseg[j]
                    o1[j] = np.float64(u1[j]) * qseg[j] + (np.float64(v1[j]) - sseg[j]) * tseg[j] + rseg[j]
                a += 2
            if a < a_hi:
                u0 = u[a, j_lo:j_hi]
                v0 = v[a, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                for j in range(qseg.shape[0]):
                    o0[j] = np.float64(u0[j]) * qseg[j] + (np.float64(v0[j]) - sseg[j]) * tseg[j] + rseg[j]

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
                oseg[j] = wseg[j] * np.float64(useg[j]) * np.float64(vseg[j])

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
                oseg[j] = rseg[j]

    @njit(**_JIT)
    def _stats_cols(x, B, n_row_blocks, mean, var):
        """Columns shape: sums shifted by each channel's first element x[0, c*B]."""
        A, J = x.shape
        C = J // B
        shift = np.empty(C)
        for c in range(C):
            shift[c] = x[0, c * B]
        shift_col = _per_column(shift, B)
        s1 = np.empty(C)
        s2 = np.empty(C)
        _sums_cols(x, shift_col, x, shift_col, True, n_row_blocks, B, s1, s2)
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
    def _backward_cols(dy, x, B, mean, invstd, gamma, n_row_blocks, out, sum_dy, sum_dy_xhat):
        """Columns shape: sum(dy), sum(dy * xhat), then dx."""
        A, J = x.shape
        C = J // B
        mean_col = _per_column(mean, B)
        zeros_col = np.zeros(J)
        sum_dy_xmu = np.empty(C)
        _sums_cols(dy, zeros_col, x, mean_col, False, n_row_blocks, B, sum_dy, sum_dy_xmu)
        for c in range(C):
            sum_dy_xhat[c] = sum_dy_xmu[c] * invstd[c]
        k, kx, k0 = _dx_coefficients(A * B, invstd, gamma, sum_dy, sum_dy_xhat)
        _combine_cols(dy, _per_column(k, B), x, mean_col, _per_column(kx, B),
                      _per_column(k0, B), out)

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
    def _forward_cols_train(x, B, gamma, beta, eps, n_row_blocks, out, mean, invstd,
                            rm, rv, momentum, update):
        """Columns shape: statistics, finish, out = (x - mean) * scale + beta."""
        A, J = x.shape
        C = mean.shape[0]
        var = np.empty(C)
        scale = np.empty(C)
        _stats_cols(x, B, n_row_blocks, mean, var)
        _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)
        _affine_cols(x, _per_column(mean, B), _per_column(scale, B), _per_column(beta, B), out)

    @njit(**_JIT)
    def _forward_rows_train(x, n_split, gamma, beta, eps, out, mean, invstd,
                            rm, rv, momentum, update):
        """Rows shape, two passes: statistics, finish, normalize."""
        A, C, B = x.shape
        var = np.empty(C)
        scale = np.empty(C)
        _stats_rows(x, n_split, mean, var)
        _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)
        _affine_rows(x, mean, scale, beta, out)

    @njit(**_JIT)
    def _forward_fused_train(x, gamma, beta, eps, block, out, mean, invstd,
                             rm, rv, momentum, update):
        """Rows shape, fused per block of channels, then the finishing work."""
        A, C, B = x.shape
        var = np.empty(C)
        scale = np.empty(C)
        _forward_rows_fused(x, gamma, beta, eps, block, out, mean, var)
        _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)

    @njit(**_PJIT)
    def _forward_cols_fused(x, gamma, beta, eps, width, out, mean, var, invstd):
        """(N, D) with one row block: work item = a block of COLUMN_BLOCK channels,
        whose sums over all rows (``_partials_same``, as in ``_sums_cols``) and
        normalize pass run back to back, so the second read comes from L2.
        The sums are those of the two-pass kernels, in the same order."""
        A, J = x.shape
        n_col_blocks = (J + width - 1) // width
        shift = np.empty(J)
        for j in range(J):
            shift[j] = x[0, j]
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
                    o0[j] = (np.float64(u0[j]) - mseg[j]) * scale[j] + bseg[j]

    @njit(**_PJIT)
    def _backward_cols_fused(dy, x, mean, invstd, gamma, width, out, sum_dy, sum_dy_xhat):
        """(N, D) with one row block: work item = a block of COLUMN_BLOCK channels:
        sum(dy), sum(dy * (x - mean)) over all rows (``_partials_products``, as in
        ``_sums_cols``), then dx = k*dy + kx*(x - mean) + k0 while the block is
        in L2."""
        A, J = x.shape
        n_col_blocks = (J + width - 1) // width
        zeros = np.zeros(J)
        for jb in prange(n_col_blocks):
            j_lo = jb * width
            j_hi = min(J, j_lo + width)
            n = j_hi - j_lo
            p1 = np.zeros(n)
            p2 = np.zeros(n)
            _partials_products(dy, zeros, x, mean, 0, A, j_lo, j_hi, p1, p2)
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
            for a in range(A):
                d0 = dy[a, j_lo:j_hi]
                u0 = x[a, j_lo:j_hi]
                o0 = out[a, j_lo:j_hi]
                for j in range(n):
                    o0[j] = np.float64(d0[j]) * k[j] + (np.float64(u0[j]) - mseg[j]) * kx[j] + k0[j]

    @njit(**_JIT)
    def _forward_cols_fused_train(x, gamma, beta, eps, width, out, mean, invstd, rm, rv,
                                  momentum, update):
        """``_forward_cols_fused``, then the running statistics."""
        A, J = x.shape
        var = np.empty(J)
        scale = np.empty(J)
        _forward_cols_fused(x, gamma, beta, eps, width, out, mean, var, invstd)
        _finish_stats(mean, var, A, eps, gamma, invstd, scale, rm, rv, momentum, update)

    # -----------------------------------------------------------------------
    # Serial kernels for small arrays (fewer than SERIAL_BELOW elements): one
    # compiled call per kernel, no parallel region (starting one costs more
    # than the work), no temporaries but per-channel accumulators. The sums
    # run a-major over (a, c, b), shifted by each channel's first element,
    # in float64; the order depends on the shape only.
    # -----------------------------------------------------------------------

    @njit(**_JIT)
    def _serial_sums(u, su, v, sv, same, sum1, sum2):
        """sum1[c] = sum(u - su[c]), sum2[c] = sum((u - su[c]) * (v - sv[c]))
        (``same``: v is u, sv is su)."""
        A, C, B = u.shape
        for c in range(C):
            sum1[c] = 0.0
            sum2[c] = 0.0
        for a in range(A):
            for c in range(C):
                s = su[c]
                t = sv[c]
                s1 = 0.0
                s2 = 0.0
                if same:
                    for b in range(B):
                        d = np.float64(u[a, c, b]) - s
                        s1 += d
                        s2 += d * d
                else:
                    for b in range(B):
                        d = np.float64(u[a, c, b]) - s
                        s1 += d
                        s2 += d * (np.float64(v[a, c, b]) - t)
                sum1[c] += s1
                sum2[c] += s2

    @njit(**_JIT)
    def _serial_stats(x, mean, var):
        """Shifted sums: mean = K + S1/M, var = (S2 - S1^2/M)/M, K = x[0, c, 0]."""
        A, C, B = x.shape
        shift = np.empty(C)
        for c in range(C):
            shift[c] = x[0, c, 0]
        s1 = np.empty(C)
        s2 = np.empty(C)
        _serial_sums(x, shift, x, shift, True, s1, s2)
        for c in range(C):
            mean[c], var[c] = _mean_var(shift[c], s1[c], s2[c], A * B)

    @njit(**_JIT)
    def _serial_affine(u, p, q, r, out):
        """out = (u - p[c]) * q[c] + r[c]."""
        A, C, B = u.shape
        for a in range(A):
            for c in range(C):
                pc = p[c]
                qc = q[c]
                rc = r[c]
                for b in range(B):
                    out[a, c, b] = (np.float64(u[a, c, b]) - pc) * qc + rc

    @njit(**_JIT)
    def _serial_combine(u, q, v, s, t, r, out):
        """out = u * q[c] + (v - s[c]) * t[c] + r[c]."""
        A, C, B = u.shape
        for a in range(A):
            for c in range(C):
                qc = q[c]
                sc = s[c]
                tc = t[c]
                rc = r[c]
                for b in range(B):
                    out[a, c, b] = (np.float64(u[a, c, b]) * qc
                                    + (np.float64(v[a, c, b]) - sc) * tc + rc)

    @njit(**_JIT)
    def _serial_forward_train(x, gamma, beta, eps, out, mean, invstd, rm, rv, momentum, update):
        """Statistics, finish (running statistics included), normalize."""
        A, C, B = x.shape
        var = np.empty(C)
        scale = np.empty(C)
        _serial_stats(x, mean, var)
        _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum, update)
        _serial_affine(x, mean, scale, beta, out)

    @njit(**_JIT)
    def _eval_coefficients(rm, rv, eps, gamma, mean, invstd, scale):
        """mean = running_mean, invstd = 1/sqrt(running_var + eps), scale = gamma*invstd."""
        for c in range(mean.shape[0]):
            mean[c] = rm[c]
            invstd[c] = 1.0 / np.sqrt(np.float64(rv[c]) + eps)
            scale[c] = gamma[c] * invstd[c]

    @njit(**_JIT)
    def _serial_forward_eval(x, gamma, beta, rm, rv, eps, out, mean, invstd):
        scale = np.empty(mean.shape[0])
        _eval_coefficients(rm, rv, eps, gamma, mean, invstd, scale)
        _serial_affine(x, mean, scale, beta, out)

    @njit(**_JIT)
    def _serial_backward_reduce(dy, x, mean, invstd, sum_dy, sum_dy_xhat):
        """sum(dy), invstd * sum(dy * (x - mean))."""
        zeros = np.zeros(mean.shape[0])
        _serial_sums(dy, zeros, x, mean, False, sum_dy, sum_dy_xhat)
        for c in range(mean.shape[0]):
            sum_dy_xhat[c] *= invstd[c]

    @njit(**_JIT)
    def _serial_backward_train(dy, x, mean, invstd, gamma, out, sum_dy, sum_dy_xhat):
        """Sums, then dx = k*dy + kx*(x - mean) + k0."""
        A, C, B = x.shape
        _serial_backward_reduce(dy, x, mean, invstd, sum_dy, sum_dy_xhat)
        k, kx, k0 = _dx_coefficients(A * B, invstd, gamma, sum_dy, sum_dy_xhat)
        _serial_combine(dy, k, x, mean, kx, k0, out)

    @njit(**_JIT)
    def _serial_backward_eval(dy, x, mean, invstd, gamma, out, sum_dy, sum_dy_xhat):
        """Sums, then dx = dy * gamma * invstd (mean and invstd are constants)."""
        _serial_backward_reduce(dy, x, mean, invstd, sum_dy, sum_dy_xhat)
        zeros = np.zeros(mean.shape[0])
        _serial_affine(dy, zeros, gamma * invstd, zeros, out)

# ---------------------------------------------------------------------------
# Shape dispatch (Python level).
# ---------------------------------------------------------------------------

def _as_cols(arr):
    A, C, B = arr.shape
    return arr.reshape(A, C * B)


def _channel_sums(u, su, v, sv):
    """sum(u - su[c]) and sum((u - su[c]) * (v - sv[c])) per channel, float64."""
    A, C, B = u.shape
    sum1 = np.empty(C)
    sum2 = np.empty(C)
    if _reduces_by_rows(u.shape):
        _sums_rows(u, su, v, sv, _chunks_per_channel(u.shape), sum1, sum2)
    else:
        _sums_cols(_as_cols(u), _per_column(su, B), _as_cols(v), _per_column(sv, B), False,
                   _row_blocks(A, C * B), B, sum1, sum2)
    return sum1, sum2


def _affine(u, p, q, r, out):
    """out = (u - p[c]) * q[c] + r[c]."""
    B = u.shape[2]
    if _uses_rows(u.shape):
        _affine_rows(u, p, q, r, out)
    else:
        _affine_cols(_as_cols(u), _per_column(p, B), _per_column(q, B), _per_column(r, B),
                     _as_cols(out))


def _combine(u, q, v, s, t, r, out):
    """out = u * q[c] + (v - s[c]) * t[c] + r[c]."""
    B = u.shape[2]
    if _uses_rows(u.shape):
        _combine_rows(u, q, v, s, t, r, out)
    else:
        _combine_cols(_as_cols(u), _per_column(q, B), _as_cols(v), _per_column(s, B),
                      _per_column(t, B), _per_column(r, B), _as_cols(out))


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


def _backward_reduce_unlocked(dy, x, mean, invstd):
    zeros = np.zeros(x.shape[1])
    sum_dy, sum_dy_xmu = _channel_sums(dy, zeros, x, mean)
    return sum_dy, sum_dy_xmu * invstd


def _backward_elemt_unlocked(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    # dx = gamma*invstd*(dy - sum_dy/M - (x - mean)*invstd*sum_dy_xhat/M)
    #    = k*dy + kx*(x - mean) + k0
    n = x.shape[0] * x.shape[2]
    k, kx, k0 = _dx_coefficients(n, invstd, gamma, sum_dy, sum_dy_xhat)
    _combine(dy, k, x, mean, kx, k0, out)


# ---------------------------------------------------------------------------
# The kernels of the contract.
# ---------------------------------------------------------------------------

def stats(x):
    """Per-channel mean and biased variance.

    Parameters
    ----------
    x : ndarray, (A, C, B), float32 or float64, C-contiguous

    Returns
    -------
    mean, var : ndarray, (C,), float64
        Shifted float64 sums: ``d = x - x[0, c, 0]``,
        ``mean = x[0, c, 0] + sum(d)/M``, ``var = (sum(d*d) - sum(d)**2/M)/M``.
    """
    if _serial(x):
        mean = np.empty(x.shape[1])
        var = np.empty(x.shape[1])
        _serial_stats(x, mean, var)
        return mean, var
    with _guard():
        return _stats_unlocked(x)


def normalize(x, mean, invstd, gamma, beta, out):
    """``out = (x - mean) * invstd * gamma + beta``, computed in float64.

    Parameters
    ----------
    x, out : ndarray, (A, C, B), same dtype
    mean, invstd, gamma, beta : ndarray, (C,), float64
    """
    if _serial(x):
        _serial_affine(x, mean, invstd * gamma, beta, out)
        return
    with _guard():
        _affine(x, mean, invstd * gamma, beta, out)


def forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None, momentum=0.1):
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

    Returns
    -------
    mean, invstd : ndarray, (C,), float64
    """
    C = x.shape[1]
    mean = np.empty(C)
    invstd = np.empty(C)
    rm, rv, update = _host.running_arrays(running_mean, running_var, mean, invstd)
    eps = float(eps)
    momentum = float(momentum)
    if _serial(x):
        _serial_forward_train(x, gamma, beta, eps, out, mean, invstd, rm, rv, momentum, update)
    else:
        with _guard():
            A, C, B = x.shape
            if _fuses(x, 2):
                _forward_fused_train(x, gamma, beta, eps, _fused_block(x.shape, x.itemsize),
                                     out, mean, invstd, rm, rv, momentum, update)
            elif _fuses_cols(x.shape):
                _forward_cols_fused_train(_as_cols(x), gamma, beta, eps, _fused_cols_width(x),
                                          _as_cols(out), mean, invstd, rm, rv, momentum,
                                          update)
            elif not _uses_rows(x.shape):
                _forward_cols_train(_as_cols(x), B, gamma, beta, eps, _row_blocks(A, C * B),
                                    _as_cols(out), mean, invstd, rm, rv, momentum, update)
            elif _reduces_by_rows(x.shape):
                _forward_rows_train(x, _chunks_per_channel(x.shape), gamma, beta, eps, out,
                                    mean, invstd, rm, rv, momentum, update)
            else:
                var = np.empty(C)
                _stats_cols(_as_cols(x), B, _row_blocks(A, C * B), mean, var)
                scale = np.empty(C)
                _finish_stats(mean, var, A * B, eps, gamma, invstd, scale, rm, rv, momentum,
                              update)
                _affine_rows(x, mean, scale, beta, out)
    if update:
        _host.write_back(running_mean, running_var, rm, rv)
    return mean, invstd


def forward_eval(x, gamma, beta, running_mean, running_var, eps, out):
    """Evaluation forward: normalize with the running statistics.

    Returns
    -------
    mean, invstd : ndarray, (C,), float64
        ``running_mean`` and ``1 / sqrt(running_var + eps)``.
    """
    C = x.shape[1]
    mean = np.empty(C)
    invstd = np.empty(C)
    rm, rv = _host.readable_running(running_mean, running_var)
    if _serial(x):
        _serial_forward_eval(x, gamma, beta, rm, rv, float(eps), out, mean, invstd)
        return mean, invstd
    scale = np.empty(C)
    _eval_coefficients(rm, rv, float(eps), gamma, mean, invstd, scale)
    with _guard():
        _affine(x, mean, scale, beta, out)
    return mean, invstd


def backward_eval(dy, x, mean, invstd, gamma, out):
    """Evaluation backward ``dx = dy * gamma * invstd``, and the two sums.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, (C,), float64
    """
    if _serial(x):
        C = x.shape[1]
        sum_dy = np.empty(C)
        sum_dy_xhat = np.empty(C)
        _serial_backward_eval(dy, x, mean, invstd, gamma, out, sum_dy, sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        sum_dy, sum_dy_xhat = _backward_reduce_unlocked(dy, x, mean, invstd)
        zeros = np.zeros(x.shape[1])
        _affine(dy, zeros, gamma * invstd, zeros, out)
    return sum_dy, sum_dy_xhat


def backward_reduce(dy, x, mean, invstd):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)``.

    Parameters
    ----------
    dy, x : ndarray, (A, C, B), same dtype
    mean, invstd : ndarray, (C,), float64

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, (C,), float64
    """
    if _serial(x):
        C = x.shape[1]
        sum_dy = np.empty(C)
        sum_dy_xhat = np.empty(C)
        _serial_backward_reduce(dy, x, mean, invstd, sum_dy, sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        return _backward_reduce_unlocked(dy, x, mean, invstd)


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    """``out = gamma * invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M)``.

    Parameters
    ----------
    dy, x, out : ndarray, (A, C, B), same dtype
    mean, invstd, gamma, sum_dy, sum_dy_xhat : ndarray, (C,), float64
    """
    if _serial(x):
        k, kx, k0 = _dx_coefficients(x.shape[0] * x.shape[2], invstd, gamma, sum_dy,
                                     sum_dy_xhat)
        _serial_combine(dy, k, x, mean, kx, k0, out)
        return
    with _guard():
        _backward_elemt_unlocked(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out)


def backward_train(dy, x, mean, invstd, gamma, out):
    """Simplified backward: ``backward_reduce`` then ``backward_elemt``.

    With the rows loop shape and enough channels, both passes run per channel
    back to back (the second read of ``dy`` and ``x`` comes from cache);
    small arrays run one serial compiled kernel.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, (C,), float64
        ``dbeta`` and ``dgamma``.
    """
    C = x.shape[1]
    sum_dy = np.empty(C)
    sum_dy_xhat = np.empty(C)
    if _serial(x):
        _serial_backward_train(dy, x, mean, invstd, gamma, out, sum_dy, sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    with _guard():
        if _fuses(x, 3):
            _backward_rows_fused(dy, x, mean, invstd, gamma, _fused_block(x.shape, x.itemsize),
                                 out, sum_dy, sum_dy_xhat)
        elif _fuses_cols(x.shape):
            _backward_cols_fused(_as_cols(dy), _as_cols(x), mean, invstd, gamma,
                                 _fused_cols_width(x), _as_cols(out), sum_dy, sum_dy_xhat)
        elif not _uses_rows(x.shape):
            A, C, B = x.shape
            _backward_cols(_as_cols(dy), _as_cols(x), B, mean, invstd, gamma,
                           _row_blocks(A, C * B), _as_cols(out), sum_dy, sum_dy_xhat)
        else:
            sum_dy, sum_dy_xhat = _backward_reduce_unlocked(dy, x, mean, invstd)
            _backward_elemt_unlocked(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out)
        return sum_dy, sum_dy_xhat


def backward_staged(dy, x, mean, invstd, gamma, eps, out):
    """The cs231n computational graph, one pass per stage.

    Every full-size stage is its own parallel loop writing a new array of
    ``x.dtype``; reductions accumulate in float64.

    Returns
    -------
    dgamma, dbeta : ndarray, (C,), float64
    """
    with _guard():
        A, C, B = x.shape
        n = A * B
        zeros = np.zeros(C)
        ones = np.ones(C)
        xmu = np.empty_like(x)
        _affine(x, mean, ones, zeros, xmu)                  # xmu = x - mean
        xhat = np.empty_like(x)
        _affine(xmu, zeros, invstd, zeros, xhat)            # xhat = xmu * invstd
        dbeta, _ = _channel_sums(dy, zeros, dy, zeros)      # step 9: sum(dy)
        _, dgamma = _channel_sums(dy, zeros, xhat, zeros)   # step 8: sum(dy * xhat)
        del xhat
        dxhat = np.empty_like(x)
        _affine(dy, zeros, gamma, zeros, dxhat)             # dxhat = dy * gamma
        _, divar = _channel_sums(dxhat, zeros, xmu, zeros)  # step 7: sum(dxhat * xmu)
        dxmu1 = np.empty_like(x)
        _affine(dxhat, zeros, invstd, zeros, dxmu1)         # dxmu1 = dxhat * invstd
        del dxhat
        dsqrtvar = -invstd * invstd * divar                 # step 6
        dvar = 0.5 * invstd * dsqrtvar                      # step 5
        dsq = np.empty_like(x)
        _fill(dvar / n, dsq)                                # step 4: dsq = dvar / M
        dxmu2 = np.empty_like(x)
        _product(xmu, dsq, 2.0 * ones, dxmu2)               # step 3: 2 * xmu * dsq
        del xmu, dsq
        dx1 = np.empty_like(x)
        _combine(dxmu1, ones, dxmu2, zeros, ones, zeros, dx1)  # step 2: dxmu1 + dxmu2
        del dxmu1, dxmu2
        dmu_sum, _ = _channel_sums(dx1, zeros, dx1, zeros)
        dmu = -dmu_sum                                      # step 2: dmu = -sum(dx1)
        _affine(dx1, zeros, ones, dmu / n, out)             # steps 1, 0: dx1 + dmu / M
        return dgamma, dbeta
