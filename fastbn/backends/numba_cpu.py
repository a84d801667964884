"""Numba CPU backend: ``@njit(parallel=True, cache=True)`` loops on ``(A, C, B)``.

The kernels follow the contract in :mod:`fastbn.backends`. Every kernel is
compiled with ``fastmath=False`` (NaN and Inf propagate, no reassociation),
``error_model='numpy'`` and ``boundscheck=False``, for float32 and float64
inputs; statistics, reductions and the centring ``x - mean`` are computed in
float64.

Loop shapes
-----------
*Rows* (``B >= ROWS_MIN_B``, e.g. NCHW): a channel is ``A`` contiguous rows
of ``B`` elements. Reduction work items are ``(channel, chunk of the
channel)``: with at least ``FUSED_MIN_CHANNELS`` channels a chunk is the
whole channel; with fewer, each channel is split into chunks of its ``A*B``
elements so that every core has work. Elementwise work items are rows
``(a, c)``. When the arrays a kernel touches exceed the last-level cache
(``FUSED_MIN_BYTES``), rows are long (``FUSED_MIN_B``) and there are enough
channels, the training kernels are fused: a work item is a
block of consecutive channels (about ``FUSED_SLAB_BYTES``), whose statistics
(or backward sums) and elementwise pass run back to back, so the second
read comes from L2/L3 and only the compulsory bytes cross the memory bus.
Smaller arrays use two parallel loops (measured faster here: the second
pass streams from L3).

*Columns* (``B < ROWS_MIN_B``: ``(N, D)``, channels-last, tiny spatial
sizes): the array is viewed as ``(A, C*B)``. Work items are (block of rows,
block of columns); each accumulates float64 partial sums for its columns in
a ``(row_chunks, C*B)`` buffer, the inner loop running over contiguous
columns so that it vectorizes. The partials are merged at the end.

Reductions vectorize without ``fastmath``: a row is accumulated into a
small float64 buffer of ``LANES`` partial sums (``acc[j] += x[s + j]``, an
elementwise loop), which is summed at the end. Variance uses sums shifted
by the channel's first element, ``d = x - x[0, c, 0]``: ``var = (S2 -
S1**2 / M) / M`` with ``S1 = sum(d)``, ``S2 = sum(d*d)`` (a constant channel
gives exactly 0; no raw ``E[x^2] - E[x]^2``).

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
ROWS_MIN_B = 16             # B at or above which the rows loop shape is used
FUSED_MIN_CHANNELS = 64     # channels needed to make one channel one work item
TARGET_ITEMS = 64           # work items aimed at when channels are split
MIN_ITEM_ELEMENTS = 16384   # smallest work item when splitting
COLUMN_BLOCK = 512          # columns per work item in the columns loop shape
LANES = 64                  # partial sums per reduction buffer
WIDE = 4                    # LANES-blocks added together before touching the buffer
FUSED_SLAB_BYTES = 512 * 1024  # channels per fused work item: a slab of about this size
FUSED_MIN_BYTES = 32 * 1024 * 1024  # fuse only working sets larger than the last-level cache
FUSED_MIN_B = 256           # ... and rows long enough for the channel-by-channel order

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


def _guard():
    """A lock when the threading layer is workqueue (not thread-safe), else nothing."""
    if _predicted_layer() == "workqueue":
        return _WORKQUEUE_LOCK
    return _NO_LOCK


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
    return shape[2] >= ROWS_MIN_B


def _chunks_per_channel(shape):
    """Rows shape: chunks of one channel's ``A*B`` elements (1 = whole channel)."""
    A, C, B = shape
    if C >= FUSED_MIN_CHANNELS:
        return 1
    per_channel = A * B
    wanted = -(-TARGET_ITEMS // C)
    by_size = max(1, per_channel // MIN_ITEM_ELEMENTS)
    return max(1, min(wanted, by_size))


def _fuses(x, n_arrays):
    """Whether a training kernel touching ``n_arrays`` arrays of x's size runs
    fused: rows shape, whole-channel items, rows of at least FUSED_MIN_B, and a
    working set larger than the last-level cache."""
    return (_uses_rows(x.shape) and _chunks_per_channel(x.shape) == 1
            and x.shape[2] >= FUSED_MIN_B and n_arrays * x.nbytes >= FUSED_MIN_BYTES)


def _fused_block(shape, itemsize):
    """Channels per fused work item: a slab of about FUSED_SLAB_BYTES (so both
    passes over it hit L2), keeping at least FUSED_MIN_CHANNELS work items."""
    A, C, B = shape
    by_cache = FUSED_SLAB_BYTES // max(1, A * B * itemsize)
    by_items = C // FUSED_MIN_CHANNELS
    return max(1, min(by_cache, by_items))


def _row_chunks(A, J):
    """Columns shape: blocks of rows, so that there are about TARGET_ITEMS items."""
    column_blocks = -(-J // COLUMN_BLOCK)
    wanted = -(-TARGET_ITEMS // column_blocks)
    by_size = max(1, (A * min(J, COLUMN_BLOCK)) // MIN_ITEM_ELEMENTS)
    return max(1, min(A, wanted, by_size))


if numba is not None:
    _choose_threading_layer()

    _JIT = dict(cache=True, fastmath=False, error_model="numpy", boundscheck=False, nogil=True)
    _PJIT = dict(_JIT, parallel=True)

    # -----------------------------------------------------------------------
    # Serial helpers on contiguous 1-D segments (called inside parallel
    # loops). Segment views (``row[lo:hi]``) let LLVM see unit stride, so
    # the loops vectorize; reductions go through LANES float64 partial sums.
    # -----------------------------------------------------------------------

    @njit(**_JIT)
    def _sum_lanes(acc):
        """Sum of a partial-sum buffer, fixed order."""
        total = 0.0
        for j in range(acc.shape[0]):
            total += acc[j]
        return total

    @njit(**_JIT)
    def _add_shifted(seg, shift, acc1, acc2):
        """acc1[j] += d, acc2[j] += d*d with d = seg[i] - shift, i = j (mod LANES).

        Blocks of WIDE*LANES elements first add their WIDE values of lane j
        pairwise, then into acc[j] (fewer accumulator loads and stores); the
        order depends only on the segment length."""
        span = WIDE * LANES
        n_wide = seg.shape[0] // span
        for blk in range(n_wide):
            part = seg[blk * span:(blk + 1) * span]
            for j in range(LANES):
                d0 = np.float64(part[j]) - shift
                d1 = np.float64(part[j + LANES]) - shift
                d2 = np.float64(part[j + 2 * LANES]) - shift
                d3 = np.float64(part[j + 3 * LANES]) - shift
                acc1[j] += (d0 + d1) + (d2 + d3)
                acc2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        rest = seg[n_wide * span:]
        n_full = rest.shape[0] // LANES
        for blk in range(n_full):
            part = rest[blk * LANES:(blk + 1) * LANES]
            for j in range(LANES):
                d = np.float64(part[j]) - shift
                acc1[j] += d
                acc2[j] += d * d
        part = rest[n_full * LANES:]
        for j in range(part.shape[0]):
            d = np.float64(part[j]) - shift
            acc1[j] += d
            acc2[j] += d * d

    @njit(**_JIT)
    def _add_products(useg, su, vseg, sv, acc1, acc2):
        """acc1[j] += du, acc2[j] += du*dv with du = u - su, dv = v - sv
        (same blocking and order as ``_add_shifted``)."""
        span = WIDE * LANES
        n_wide = useg.shape[0] // span
        for blk in range(n_wide):
            upart = useg[blk * span:(blk + 1) * span]
            vpart = vseg[blk * span:(blk + 1) * span]
            for j in range(LANES):
                du0 = np.float64(upart[j]) - su
                du1 = np.float64(upart[j + LANES]) - su
                du2 = np.float64(upart[j + 2 * LANES]) - su
                du3 = np.float64(upart[j + 3 * LANES]) - su
                dv0 = np.float64(vpart[j]) - sv
                dv1 = np.float64(vpart[j + LANES]) - sv
                dv2 = np.float64(vpart[j + 2 * LANES]) - sv
                dv3 = np.float64(vpart[j + 3 * LANES]) - sv
                acc1[j] += (du0 + du1) + (du2 + du3)
                acc2[j] += (du0 * dv0 + du1 * dv1) + (du2 * dv2 + du3 * dv3)
        urest = useg[n_wide * span:]
        vrest = vseg[n_wide * span:]
        n_full = urest.shape[0] // LANES
        for blk in range(n_full):
            upart = urest[blk * LANES:(blk + 1) * LANES]
            vpart = vrest[blk * LANES:(blk + 1) * LANES]
            for j in range(LANES):
                du = np.float64(upart[j]) - su
                acc1[j] += du
                acc2[j] += du * (np.float64(vpart[j]) - sv)
        upart = urest[n_full * LANES:]
        vpart = vrest[n_full * LANES:]
        for j in range(upart.shape[0]):
            du = np.float64(upart[j]) - su
            acc1[j] += du
            acc2[j] += du * (np.float64(vpart[j]) - sv)

    @njit(**_JIT)
    def _chunk_shifted_sums(x, shift, c, m_lo, m_hi):
        """Over elements m in [m_lo, m_hi) of channel c (m = a*B + b):
        S1 = sum(d), S2 = sum(d*d) with d = x - shift, float64, fixed order."""
        B = x.shape[2]
        acc1 = np.zeros(LANES)
        acc2 = np.zeros(LANES)
        for a in range(m_lo // B, (m_hi - 1) // B + 1):
            b_lo = max(m_lo - a * B, 0)
            b_hi = min(m_hi - a * B, B)
            _add_shifted(x[a, c, b_lo:b_hi], shift, acc1, acc2)
        return _sum_lanes(acc1), _sum_lanes(acc2)

    @njit(**_JIT)
    def _chunk_sums(u, su, v, sv, c, m_lo, m_hi):
        """Over elements [m_lo, m_hi) of channel c:
        sum(u - su) and sum((u - su) * (v - sv)), float64, fixed order."""
        B = u.shape[2]
        acc1 = np.zeros(LANES)
        acc2 = np.zeros(LANES)
        for a in range(m_lo // B, (m_hi - 1) // B + 1):
            b_lo = max(m_lo - a * B, 0)
            b_hi = min(m_hi - a * B, B)
            _add_products(u[a, c, b_lo:b_hi], su, v[a, c, b_lo:b_hi], sv, acc1, acc2)
        return _sum_lanes(acc1), _sum_lanes(acc2)

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
    def _affine2_seg(useg, p, q, vseg, s, t, r, oseg):
        """oseg = (useg - p) * q + (vseg - s) * t + r, scalar parameters."""
        for j in range(useg.shape[0]):
            oseg[j] = (np.float64(useg[j]) - p) * q + (np.float64(vseg[j]) - s) * t + r

    # -----------------------------------------------------------------------
    # Rows loop shape: (A, C, B) with B large.
    # -----------------------------------------------------------------------

    @njit(**_PJIT)
    def _stats_rows(x, n_split, mean, var):
        """Per-channel shifted sums over n_split chunks per channel, merged in order."""
        A, C, B = x.shape
        n = A * B
        part1 = np.empty((C, n_split))
        part2 = np.empty((C, n_split))
        for item in prange(C * n_split):
            c = item // n_split
            k = item - c * n_split
            shift = np.float64(x[0, c, 0])
            s1, s2 = _chunk_shifted_sums(x, shift, c, k * n // n_split, (k + 1) * n // n_split)
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
            s1, s2 = _chunk_sums(u, su[c], v, sv[c], c, k * n // n_split, (k + 1) * n // n_split)
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
    def _affine2_rows(u, p, q, v, s, t, r, out):
        """out = (u - p[c]) * q[c] + (v - s[c]) * t[c] + r[c]."""
        A, C, B = u.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            _affine2_seg(u[a, c, :], p[c], q[c], v[a, c, :], s[c], t[c], r[c], out[a, c, :])

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
        sums are formed in the same order as in ``_stats_rows``."""
        A, C, B = x.shape
        n = A * B
        n_blocks = (C + block - 1) // block
        for item in prange(n_blocks):
            c_lo = item * block
            c_hi = min(C, c_lo + block)
            acc1 = np.zeros((c_hi - c_lo, LANES))
            acc2 = np.zeros((c_hi - c_lo, LANES))
            for a in range(A):
                for c in range(c_lo, c_hi):
                    _add_shifted(x[a, c, :], np.float64(x[0, c, 0]), acc1[c - c_lo], acc2[c - c_lo])
            scale = np.empty(c_hi - c_lo)
            for c in range(c_lo, c_hi):
                mean_c, var_c = _mean_var(np.float64(x[0, c, 0]), _sum_lanes(acc1[c - c_lo]),
                                          _sum_lanes(acc2[c - c_lo]), n)
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
            acc1 = np.zeros((c_hi - c_lo, LANES))
            acc2 = np.zeros((c_hi - c_lo, LANES))
            for a in range(A):
                for c in range(c_lo, c_hi):
                    _add_products(dy[a, c, :], 0.0, x[a, c, :], mean[c], acc1[c - c_lo], acc2[c - c_lo])
            k = np.empty(c_hi - c_lo)
            kx = np.empty(c_hi - c_lo)
            k0 = np.empty(c_hi - c_lo)
            for c in range(c_lo, c_hi):
                s_dy = _sum_lanes(acc1[c - c_lo])
                s_dy_xhat = _sum_lanes(acc2[c - c_lo]) * invstd[c]
                sum_dy[c] = s_dy
                sum_dy_xhat[c] = s_dy_xhat
                # dx = k * dy + kx * (x - mean) + k0
                k[c - c_lo] = gamma[c] * invstd[c]
                kx[c - c_lo] = -k[c - c_lo] * invstd[c] * (s_dy_xhat / n)
                k0[c - c_lo] = -k[c - c_lo] * (s_dy / n)
            for a in range(A):
                for c in range(c_lo, c_hi):
                    _affine2_seg(dy[a, c, :], 0.0, k[c - c_lo], x[a, c, :], mean[c],
                                 kx[c - c_lo], k0[c - c_lo], out[a, c, :])

    # -----------------------------------------------------------------------
    # Columns loop shape: (A, J) with J = C*B, per-column parameters.
    # Work item = (block of rows, block of COLUMN_BLOCK columns).
    # -----------------------------------------------------------------------

    @njit(**_PJIT)
    def _sums_cols(u, su, v, sv, n_rows_split, B, sum1, sum2):
        """Per-column partials over blocks of rows, merged in row-block order, then
        folded over the B columns of each channel. su/sv are per column."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        part1 = np.zeros((n_rows_split, J))
        part2 = np.zeros((n_rows_split, J))
        for item in prange(n_rows_split * n_col_blocks):
            k = item // n_col_blocks
            jb = item - k * n_col_blocks
            a_lo = k * A // n_rows_split
            a_hi = (k + 1) * A // n_rows_split
            j_lo = jb * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            p1 = part1[k, j_lo:j_hi]
            p2 = part2[k, j_lo:j_hi]
            su_seg = su[j_lo:j_hi]
            sv_seg = sv[j_lo:j_hi]
            for a in range(a_lo, a_hi):
                useg = u[a, j_lo:j_hi]
                vseg = v[a, j_lo:j_hi]
                for j in range(useg.shape[0]):
                    du = np.float64(useg[j]) - su_seg[j]
                    p1[j] += du
                    p2[j] += du * (np.float64(vseg[j]) - sv_seg[j])
        C = J // B
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            for b in range(B):
                j = c * B + b
                for k in range(n_rows_split):
                    s1 += part1[k, j]
                    s2 += part2[k, j]
            sum1[c] = s1
            sum2[c] = s2

    @njit(**_PJIT)
    def _affine_cols(u, p, q, r, out):
        """out = (u - p[j]) * q[j] + r[j]."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        for item in prange(A * n_col_blocks):
            a = item // n_col_blocks
            j_lo = (item - a * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            useg = u[a, j_lo:j_hi]
            oseg = out[a, j_lo:j_hi]
            pseg = p[j_lo:j_hi]
            qseg = q[j_lo:j_hi]
            rseg = r[j_lo:j_hi]
            for j in range(useg.shape[0]):
                oseg[j] = (np.float64(useg[j]) - pseg[j]) * qseg[j] + rseg[j]

    @njit(**_PJIT)
    def _affine2_cols(u, p, q, v, s, t, r, out):
        """out = (u - p[j]) * q[j] + (v - s[j]) * t[j] + r[j]."""
        A, J = u.shape
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        for item in prange(A * n_col_blocks):
            a = item // n_col_blocks
            j_lo = (item - a * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            useg = u[a, j_lo:j_hi]
            vseg = v[a, j_lo:j_hi]
            oseg = out[a, j_lo:j_hi]
            pseg = p[j_lo:j_hi]
            qseg = q[j_lo:j_hi]
            sseg = s[j_lo:j_hi]
            tseg = t[j_lo:j_hi]
            rseg = r[j_lo:j_hi]
            for j in range(useg.shape[0]):
                oseg[j] = ((np.float64(useg[j]) - pseg[j]) * qseg[j]
                           + (np.float64(vseg[j]) - sseg[j]) * tseg[j] + rseg[j])

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


# ---------------------------------------------------------------------------
# Shape dispatch (Python level).
# ---------------------------------------------------------------------------

def _per_column(values, B):
    """Per-channel float64 (C,) -> per-column (C*B,) for the columns shape."""
    if B == 1:
        return values
    return np.repeat(values, B)


def _as_cols(arr):
    A, C, B = arr.shape
    return arr.reshape(A, C * B)


def _channel_sums(u, su, v, sv):
    """sum(u - su[c]) and sum((u - su[c]) * (v - sv[c])) per channel, float64."""
    A, C, B = u.shape
    sum1 = np.empty(C)
    sum2 = np.empty(C)
    if _uses_rows(u.shape):
        _sums_rows(u, su, v, sv, _chunks_per_channel(u.shape), sum1, sum2)
    else:
        _sums_cols(_as_cols(u), _per_column(su, B), _as_cols(v), _per_column(sv, B),
                   _row_chunks(A, C * B), B, sum1, sum2)
    return sum1, sum2


def _affine(u, p, q, r, out):
    """out = (u - p[c]) * q[c] + r[c]."""
    B = u.shape[2]
    if _uses_rows(u.shape):
        _affine_rows(u, p, q, r, out)
    else:
        _affine_cols(_as_cols(u), _per_column(p, B), _per_column(q, B), _per_column(r, B),
                     _as_cols(out))


def _affine2(u, p, q, v, s, t, r, out):
    """out = (u - p[c]) * q[c] + (v - s[c]) * t[c] + r[c]."""
    B = u.shape[2]
    if _uses_rows(u.shape):
        _affine2_rows(u, p, q, v, s, t, r, out)
    else:
        _affine2_cols(_as_cols(u), _per_column(p, B), _per_column(q, B), _as_cols(v),
                      _per_column(s, B), _per_column(t, B), _per_column(r, B), _as_cols(out))


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
    if _uses_rows(x.shape):
        mean = np.empty(C)
        var = np.empty(C)
        _stats_rows(x, _chunks_per_channel(x.shape), mean, var)
        return mean, var
    # columns: shift each channel by its first element, x[0, c, 0]
    shift = np.ascontiguousarray(x[0, :, 0], dtype=np.float64)
    s1, s2 = _channel_sums(x, shift, x, shift)
    n = A * B
    mean = shift + s1 / n
    var = (s2 - s1 * (s1 / n)) / n
    np.maximum(var, 0.0, out=var)  # NaN stays NaN
    return mean, var


def _backward_reduce_unlocked(dy, x, mean, invstd):
    zeros = np.zeros(x.shape[1])
    sum_dy, sum_dy_xmu = _channel_sums(dy, zeros, x, mean)
    return sum_dy, sum_dy_xmu * invstd


def _backward_elemt_unlocked(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    # dx = gamma*invstd*(dy - sum_dy/M - (x - mean)*invstd*sum_dy_xhat/M)
    n = x.shape[0] * x.shape[2]
    zeros = np.zeros(x.shape[1])
    k = gamma * invstd
    kx = -k * invstd * (sum_dy_xhat / n)
    k0 = -k * (sum_dy / n)
    _affine2(dy, zeros, k, x, mean, kx, k0, out)


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
    with _guard():
        return _stats_unlocked(x)


def normalize(x, mean, invstd, gamma, beta, out):
    """``out = (x - mean) * invstd * gamma + beta``, computed in float64.

    Parameters
    ----------
    x, out : ndarray, (A, C, B), same dtype
    mean, invstd, gamma, beta : ndarray, (C,), float64
    """
    with _guard():
        _affine(x, mean, invstd * gamma, beta, out)


def forward_train(x, gamma, beta, eps, out):
    """Batch statistics, then ``out = (x - mean) * invstd * gamma + beta``.

    With the rows loop shape and enough channels, both passes run per channel
    back to back (the second read comes from cache).

    Parameters
    ----------
    x, out : ndarray, (A, C, B), same dtype
    gamma, beta : ndarray, (C,), float64
    eps : float

    Returns
    -------
    mean, var : ndarray, (C,), float64 (var biased)
    """
    with _guard():
        C = x.shape[1]
        if _fuses(x, 2):
            mean = np.empty(C)
            var = np.empty(C)
            _forward_rows_fused(x, gamma, beta, float(eps), _fused_block(x.shape, x.itemsize),
                                out, mean, var)
            return mean, var
        mean, var = _stats_unlocked(x)
        invstd = 1.0 / np.sqrt(var + eps)
        _affine(x, mean, invstd * gamma, beta, out)
        return mean, var


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
    with _guard():
        return _backward_reduce_unlocked(dy, x, mean, invstd)


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    """``out = gamma * invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M)``.

    Parameters
    ----------
    dy, x, out : ndarray, (A, C, B), same dtype
    mean, invstd, gamma, sum_dy, sum_dy_xhat : ndarray, (C,), float64
    """
    with _guard():
        _backward_elemt_unlocked(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out)


def backward_train(dy, x, mean, invstd, gamma, out):
    """Simplified backward: ``backward_reduce`` then ``backward_elemt``.

    With the rows loop shape and enough channels, both passes run per channel
    back to back (the second read of ``dy`` and ``x`` comes from cache).

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray, (C,), float64
        ``dbeta`` and ``dgamma``.
    """
    with _guard():
        C = x.shape[1]
        if _fuses(x, 3):
            sum_dy = np.empty(C)
            sum_dy_xhat = np.empty(C)
            _backward_rows_fused(dy, x, mean, invstd, gamma, _fused_block(x.shape, x.itemsize),
                                 out, sum_dy, sum_dy_xhat)
            return sum_dy, sum_dy_xhat
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
        _affine2(dxmu1, zeros, ones, dxmu2, zeros, ones, zeros, dx1)  # step 2: dxmu1 + dxmu2
        del dxmu1, dxmu2
        dmu_sum, _ = _channel_sums(dx1, zeros, dx1, zeros)
        dmu = -dmu_sum                                      # step 2: dmu = -sum(dx1)
        _affine(dx1, zeros, ones, dmu / n, out)             # steps 1, 0: dx1 + dmu / M
        return dgamma, dbeta
