"""The loop shapes of the Numba CPU backend, each written once.

:func:`elementwise` takes an op of :mod:`._ops` and returns its kernels in
every loop shape; :func:`reduction` does the same for a reduction term;
:func:`fused` puts a reduction and an elementwise pass of the same channels
into one work item, for the training forward and backward. numba compiles
the op into each kernel (a direct call that LLVM inlines, not a call
through a pointer).

Loop shapes
-----------
*Segments*: the innermost loops run over contiguous 1-D views (``row[lo:hi]``),
so that LLVM sees unit stride and vectorizes. Sums run over blocks of
``SUM_BLOCK`` elements in the compute type (several vector partial sums
each), merged in float64.

*Rows* (``(A, C, B)`` with ``B`` large): an elementwise work item is a row
``(a, c)`` of ``B`` elements with scalar parameters; a reduction work item
is ``(channel, chunk of the channel)``, ``n_split`` chunks per channel
(``_chunk_range``), merged in chunk order.

*Columns* (``B`` small): the arrays are viewed as ``(A, J)``, ``J = C*B``,
with per-column parameters (``_read_per_column``), so that inner loops run
over long contiguous rows. These kernels write their per-column parameters
and partial sums into a work array that the caller passes in (``work``,
:func:`work_size`): allocated in the kernel, a few hundred KiB per call
would be a fresh mapping whose pages fault on every call. Elementwise items
are ``(ELEMENT_ROWS rows, COLUMN_BLOCK columns)``, two rows per pass sharing the parameter loads.
Reduction items are ``(block of rows, block of COLUMN_BLOCK columns)``; each
adds four rows at a time into its own float64 partial-sum row, and the
partial rows are merged in row-block order and folded over each channel's
``B`` columns.

*Serial*: one compiled loop over the rows ``(a, c)``, ``a``-major, no
parallel region; a reduction adds each row's terms in float64.

*Fused*: a work item is a block of channels whose sums and elementwise pass
run back to back, so that the second read comes from cache. On ``(A, C, B)``
arrays the rows of the block are visited ``a``-major (runs of ``block*B``
contiguous elements) and the forward's statistics pass prefetches the row it
will read ``PREFETCH_ROWS_AHEAD`` rows later (``llvm.prefetch``: the
hardware prefetcher stops at each page boundary); on ``(N, D)`` arrays
(``B == 1``) a block is a set of columns, summed over all rows as in the
columns shape.

*Streaming stores*: the ``rows_streamed`` kernels, and the fused rows kernels
with ``stream``, compute each whole cache line of a row into a one-line buffer and
write it past the caches (:mod:`._loadstore`); the partial lines at a
row's ends take plain stores. The op is the same, in a loop of its own.

The split into work items depends on the shape only, and every item sums in
a fixed order, so results do not depend on the thread count.

Caching
-------
Every kernel is ``cache=True``. A kernel made by a factory is a closure, and
numba keys its cache on the pickled contents of the closure's cells. Ops,
terms and the factories' helpers are therefore ``register_jitable``
functions: an op pickles by its module and name, a helper by its code and
the globals it names. None of them may name an ``@njit`` dispatcher: a
dispatcher pickles with a new random id in every process, and a kernel
whose key held one would never hit the cache. Each kernel a factory makes
is named after its op (``affine.rows``, ``shifted.columns``, ...), which
gives it cache files of its own, and so is each piece it calls
(``affine.segment``, ...), which gives the piece a machine-code symbol of
its own (:func:`_piece`).
"""

import collections

import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from . import _ops
from ._config import (COLUMN_BLOCK, ELEMENT_ROWS, JIT, JITABLE, PJIT, PREFETCH_ROWS_AHEAD,
                      STREAM_ITEM_BYTES, SUM_BLOCK)
from ._ops import channel_shift, dx_coefficients, finish_channel, mean_var
from ._loadstore import (LINE_BYTES, _cz, _ld, _prefetch_seg, _st, _stream_fence, _stream_out,
                         _to_line)

Elementwise = collections.namedtuple(
    "Elementwise", ["rows", "rows_streamed", "columns", "serial", "channels", "column_channels"])
Reduction = collections.namedtuple(
    "Reduction", ["rows", "columns", "serial", "channels", "column_channels"])


@njit(**JIT)
def _chunk_range(k, n, n_chunks):
    """Chunk k of n_chunks over range(n): [k*n // n_chunks, (k+1)*n // n_chunks).
    The chunks tile range(n) in order; sizes differ by at most one. int64
    throughout (k*n < 2**63 for any n an array can have and n_chunks <= 2**31)."""
    return k * n // n_chunks, (k + 1) * n // n_chunks


@register_jitable(**JITABLE)
def _read_per_column(values, B, read, gate, bound, work):
    """Per-channel (C,) -> per-column (C*B,) values (column j is channel j // B),
    written into ``work[:C*B]``, when the op reads the parameter: always
    (``read``), or as a ReLU gate parameter (``gate``) when there is a
    ``bound``; else ``values`` as they are (never read, not expanded)."""
    if B == 1 or not (read or (gate and bound is not None)):
        return values[:]
    expanded = work[:values.shape[0] * B]
    for c in range(values.shape[0]):
        expanded[c * B:(c + 1) * B] = values[c]
    return expanded


def work_size(shape, n_row_blocks=0):
    """Float64 elements of the ``work`` array of a columns kernel on ``(A, C, B)``
    arrays: six per-column parameter rows for an elementwise kernel
    (``n_row_blocks=0``), three and the partial-sum rows for a reduction."""
    J = shape[1] * shape[2]
    return (6 if n_row_blocks == 0 else 3 + 2 * n_row_blocks) * J


@register_jitable(**JITABLE)
def _stream_buffer(out, stream):
    """A work item's one-line buffer for streaming stores (LINE_BYTES of
    out's dtype), or an empty array for plain stores."""
    return np.empty(LINE_BYTES // out.itemsize if stream else 0, out.dtype)


def _reads(n_read, gate):
    """Per parameter: (read always, read as a gate parameter with a bound)."""
    return tuple((k < n_read, gate is not None and gate <= k < gate + 2) for k in range(6))


def _kernel(name, options):
    """``njit(**options)``, the function first renamed ``name``: numba names a
    kernel's cache files after it, so that the kernels a factory makes for
    each op get files of their own (numba's cache index is not safe for two
    processes compiling different kernels into one file at once)."""
    return _renamed(name, njit(**options))


def _piece(name):
    """``register_jitable(**JITABLE)``, the function first renamed ``name``.

    A piece's machine-code symbol is its qualified name, the argument types
    and a number counted up per process. Unrenamed, the ``segment`` of
    ``affine`` and the ``segment`` of ``combine`` would both be
    ``elementwise.<locals>.segment``: two processes that each compiled one
    of them first gave both the same symbol, and a third process that loaded
    both kernels from the cache ran one op's body in the other's kernel."""
    return _renamed(name, register_jitable(**JITABLE))


def _renamed(name, decorator):
    """``decorator``, the function first renamed ``name`` (its ``__qualname__``)."""
    def decorate(function):
        function.__qualname__ = name
        return decorator(function)
    return decorate


# ---------------------------------------------------------------------------
# Elementwise passes: out = op(u, v, p0, ..., p5, bound)
# ---------------------------------------------------------------------------

def elementwise(op, n_read, gate=None):
    """The kernels of one elementwise op, in every loop shape.

    Parameters
    ----------
    op : function
        ``op(u, v, p0, p1, p2, p3, p4, p5, bound)``, an op of :mod:`._ops`.
    n_read : int
        The op reads ``p0 .. p[n_read - 1]``.
    gate : int, optional
        The op reads ``p[gate]``, ``p[gate + 1]`` (the ReLU mask's) only when
        ``bound`` is not None.

    Returns
    -------
    Elementwise
        ``rows``, ``rows_streamed`` (streaming stores), ``columns``
        (parallel) and ``serial`` kernels, each ``kernel(u, v, p0, p1, p2,
        p3, p4, p5, bound, out)`` on ``(A, C, B)`` arrays with ``(C,)``
        float64 parameters (``columns`` takes a last argument, ``work``:
        float64, :func:`work_size` elements); and the
        pieces of the fused kernels, ``channels`` and ``column_channels(u,
        v, p0, ..., p5, bound, c_lo, c_hi, out, line)``: channels ``[c_lo,
        c_hi)`` only, ``line`` a one-line buffer for streaming stores or an
        empty array for plain ones (``column_channels`` ignores it).
    """
    (r0, g0), (r1, g1), (r2, g2), (r3, g3), (r4, g4), (r5, g5) = _reads(n_read, gate)

    @_piece(f"{op.__name__}.segment")
    def segment(u, v, p0, p1, p2, p3, p4, p5, bound, out):
        # contiguous 1-D segments, scalar parameters
        for j in range(out.shape[0]):
            _st(out, j, op(_ld(u[j]), _ld(v[j]), p0, p1, p2, p3, p4, p5, bound))

    @_piece(f"{op.__name__}.block")
    def block(u, v, p0, p1, p2, p3, p4, p5, bound, a_lo, a_hi, j_lo, j_hi, out):
        # rows [a_lo, a_hi) and columns [j_lo, j_hi) of (A, J) arrays, (J,)
        # parameters read from L1 for every row; two rows per pass share them
        q0 = p0[j_lo:j_hi]
        q1 = p1[j_lo:j_hi]
        q2 = p2[j_lo:j_hi]
        q3 = p3[j_lo:j_hi]
        q4 = p4[j_lo:j_hi]
        q5 = p5[j_lo:j_hi]
        a = a_lo
        while a + 2 <= a_hi:
            u0 = u[a, j_lo:j_hi]
            u1 = u[a + 1, j_lo:j_hi]
            v0 = v[a, j_lo:j_hi]
            v1 = v[a + 1, j_lo:j_hi]
            o0 = out[a, j_lo:j_hi]
            o1 = out[a + 1, j_lo:j_hi]
            for j in range(o0.shape[0]):
                y0 = op(_ld(u0[j]), _ld(v0[j]), q0[j], q1[j], q2[j], q3[j], q4[j], q5[j], bound)
                y1 = op(_ld(u1[j]), _ld(v1[j]), q0[j], q1[j], q2[j], q3[j], q4[j], q5[j], bound)
                _st(o0, j, y0)
                _st(o1, j, y1)
            a += 2
        if a < a_hi:
            u0 = u[a, j_lo:j_hi]
            v0 = v[a, j_lo:j_hi]
            o0 = out[a, j_lo:j_hi]
            for j in range(o0.shape[0]):
                _st(o0, j, op(_ld(u0[j]), _ld(v0[j]), q0[j], q1[j], q2[j], q3[j], q4[j], q5[j],
                              bound))

    @_piece(f"{op.__name__}.streamed")
    def streamed(u, v, p0, p1, p2, p3, p4, p5, bound, out, line):
        # a contiguous 1-D segment: its whole cache lines computed one at a
        # time into ``line`` (one line of out's dtype, in L1) and written
        # with a streaming store, its partial first and last lines with
        # plain stores
        n = out.shape[0]
        per_line = LINE_BYTES // out.itemsize
        head = _to_line(out)
        n_lines = (n - head) // per_line
        segment(u[:head], v[:head], p0, p1, p2, p3, p4, p5, bound, out[:head])
        u_body = u[head:]
        v_body = v[head:]
        out_body = out[head:]
        for k in range(n_lines):
            for t in range(per_line):
                _st(line, t, op(_ld(u_body[k * per_line + t]), _ld(v_body[k * per_line + t]),
                                p0, p1, p2, p3, p4, p5, bound))
            _stream_out(line, out_body, k * per_line)
        tail = head + n_lines * per_line
        segment(u[tail:], v[tail:], p0, p1, p2, p3, p4, p5, bound, out[tail:])

    @_piece(f"{op.__name__}.channels")
    def channels(u, v, p0, p1, p2, p3, p4, p5, bound, c_lo, c_hi, out, line):
        # channels [c_lo, c_hi) of (A, C, B) arrays, rows visited a-major; line
        # empty: plain stores, else a one-line buffer for streaming stores
        # (the caller fences)
        for a in range(out.shape[0]):
            for c in range(c_lo, c_hi):
                if line.shape[0] == 0:
                    segment(u[a, c, :], v[a, c, :], p0[c], p1[c], p2[c], p3[c], p4[c], p5[c],
                            bound, out[a, c, :])
                else:
                    streamed(u[a, c, :], v[a, c, :], p0[c], p1[c], p2[c], p3[c], p4[c], p5[c],
                             bound, out[a, c, :], line)

    @_piece(f"{op.__name__}.column_channels")
    def column_channels(u, v, p0, p1, p2, p3, p4, p5, bound, c_lo, c_hi, out, line):
        # channels [c_lo, c_hi) of (A, C, 1) arrays: all rows of those columns
        # (short pieces of rows: plain stores, line unused)
        A, C, B = out.shape
        block(u.reshape((A, C)), v.reshape((A, C)), p0, p1, p2, p3, p4, p5, bound, 0, A, c_lo,
              c_hi, out.reshape((A, C)))

    @_kernel(f"{op.__name__}.rows", PJIT)
    def rows(u, v, p0, p1, p2, p3, p4, p5, bound, out):
        """Rows shape: work item = row (a, c)."""
        A, C, B = out.shape
        for item in prange(A * C):
            a = item // C
            c = item - a * C
            segment(u[a, c, :], v[a, c, :], p0[c], p1[c], p2[c], p3[c], p4[c], p5[c], bound,
                    out[a, c, :])

    @_kernel(f"{op.__name__}.rows_streamed", PJIT)
    def rows_streamed(u, v, p0, p1, p2, p3, p4, p5, bound, out):
        """Rows shape with streaming stores: work item = a group of about
        STREAM_ITEM_BYTES of rows (a, c), a-major, so that one line buffer
        and one fence serve many rows."""
        A, C, B = out.shape
        group = max(1, STREAM_ITEM_BYTES // (B * out.itemsize))
        for item in prange((A * C + group - 1) // group):
            line = _stream_buffer(out, True)
            for row in range(item * group, min(A * C, (item + 1) * group)):
                a = row // C
                c = row - a * C
                streamed(u[a, c, :], v[a, c, :], p0[c], p1[c], p2[c], p3[c], p4[c], p5[c],
                         bound, out[a, c, :], line)
            _stream_fence()

    @_kernel(f"{op.__name__}.columns", PJIT)
    def columns(u, v, p0, p1, p2, p3, p4, p5, bound, out, work):
        """Columns shape: work item = (ELEMENT_ROWS rows, COLUMN_BLOCK columns) of (A, C*B)."""
        A, C, B = out.shape
        J = C * B
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        n_row_blocks = (A + ELEMENT_ROWS - 1) // ELEMENT_ROWS
        u2 = u.reshape((A, J))
        v2 = v.reshape((A, J))
        out2 = out.reshape((A, J))
        # the per-column parameters, only those the op reads
        q0 = _read_per_column(p0, B, r0, g0, bound, work[0:J])
        q1 = _read_per_column(p1, B, r1, g1, bound, work[J:2 * J])
        q2 = _read_per_column(p2, B, r2, g2, bound, work[2 * J:3 * J])
        q3 = _read_per_column(p3, B, r3, g3, bound, work[3 * J:4 * J])
        q4 = _read_per_column(p4, B, r4, g4, bound, work[4 * J:5 * J])
        q5 = _read_per_column(p5, B, r5, g5, bound, work[5 * J:6 * J])
        for item in prange(n_row_blocks * n_col_blocks):
            k = item // n_col_blocks
            a_lo = k * ELEMENT_ROWS
            j_lo = (item - k * n_col_blocks) * COLUMN_BLOCK
            block(u2, v2, q0, q1, q2, q3, q4, q5, bound, a_lo, min(A, a_lo + ELEMENT_ROWS), j_lo,
                  min(J, j_lo + COLUMN_BLOCK), out2)

    @_kernel(f"{op.__name__}.serial", JIT)
    def serial(u, v, p0, p1, p2, p3, p4, p5, bound, out):
        """Serial: every channel, a-major."""
        channels(u, v, p0, p1, p2, p3, p4, p5, bound, 0, out.shape[1], out,
                 np.empty(0, out.dtype))

    return Elementwise(rows, rows_streamed, columns, serial, channels, column_channels)


# ---------------------------------------------------------------------------
# Reductions: sum1[c] = sum(t1), sum2[c] = sum(t2), (t1, t2) = term(u, v, p0, p1, p2, bound)
# ---------------------------------------------------------------------------

def reduction(term, n_read, gate=None):
    """The kernels of one reduction, in every loop shape.

    Parameters
    ----------
    term : function
        ``term(u, v, p0, p1, p2, bound) -> (t1, t2)``, a term of :mod:`._ops`.
    n_read, gate : int
        Which parameters the term reads, as for :func:`elementwise`.

    Returns
    -------
    Reduction
        ``rows(u, v, p0, p1, p2, bound, n_split, sum1, sum2)``,
        ``columns(u, v, p0, p1, p2, bound, n_row_blocks, sum1, sum2, work)``
        (``work``: float64, :func:`work_size` elements)
        (parallel) and ``serial(u, v, p0, p1, p2, bound, sum1, sum2)``, on
        ``(A, C, B)`` arrays with ``(C,)`` float64 parameters, writing the
        float64 ``(C,)`` sums; and the pieces of the fused kernels,
        ``channels`` and ``column_channels(u, v, p0, p1, p2, bound, c_lo,
        c_hi, ahead) -> (s1, s2)``: the sums of channels ``[c_lo, c_hi)``.
    """
    (r0, g0), (r1, g1), (r2, g2) = _reads(n_read, gate)[:3]

    @_piece(f"{term.__name__}.block_sums")
    def block_sums(u, v, p0, p1, p2, bound):
        # at most SUM_BLOCK elements, summed in the compute type
        s1 = _cz(u)
        s2 = _cz(u) * _cz(v)
        for j in range(u.shape[0]):
            t1, t2 = term(_ld(u[j]), _ld(v[j]), p0, p1, p2, bound)
            s1 += t1
            s2 += t2
        return s1, s2

    @_piece(f"{term.__name__}.segment")
    def segment(u, v, p0, p1, p2, bound):
        # a contiguous 1-D segment: blocks of SUM_BLOCK merged in float64
        s1 = 0.0
        s2 = 0.0
        n = u.shape[0]
        for lo in range(0, n, SUM_BLOCK):
            hi = min(n, lo + SUM_BLOCK)
            r1, r2 = block_sums(u[lo:hi], v[lo:hi], p0, p1, p2, bound)
            s1 += r1
            s2 += r2
        return s1, s2

    @_piece(f"{term.__name__}.partials")
    def partials(u, v, p0, p1, p2, bound, a_lo, a_hi, j_lo, j_hi, part1, part2):
        # part1[j - j_lo] += t1, part2[j - j_lo] += t2 over rows [a_lo, a_hi) of
        # the columns [j_lo, j_hi) of (A, J) arrays, (J,) parameters; four rows
        # per pass (summed in the compute type), so that part1/part2 are loaded
        # and stored once per four rows
        q0 = p0[j_lo:j_hi]
        q1 = p1[j_lo:j_hi]
        q2 = p2[j_lo:j_hi]
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
            for j in range(q0.shape[0]):
                x0, y0 = term(_ld(u0[j]), _ld(v0[j]), q0[j], q1[j], q2[j], bound)
                x1, y1 = term(_ld(u1[j]), _ld(v1[j]), q0[j], q1[j], q2[j], bound)
                x2, y2 = term(_ld(u2[j]), _ld(v2[j]), q0[j], q1[j], q2[j], bound)
                x3, y3 = term(_ld(u3[j]), _ld(v3[j]), q0[j], q1[j], q2[j], bound)
                part1[j] += (x0 + x1) + (x2 + x3)
                part2[j] += (y0 + y1) + (y2 + y3)
            a += 4
        for a in range(a, a_hi):
            u0 = u[a, j_lo:j_hi]
            v0 = v[a, j_lo:j_hi]
            for j in range(q0.shape[0]):
                x0, y0 = term(_ld(u0[j]), _ld(v0[j]), q0[j], q1[j], q2[j], bound)
                part1[j] += x0
                part2[j] += y0

    @_piece(f"{term.__name__}.channels")
    def channels(u, v, p0, p1, p2, bound, c_lo, c_hi, ahead):
        # channels [c_lo, c_hi) of (A, C, B) arrays, rows visited a-major; each
        # channel's sums in the order of `rows` with one chunk. ahead > 0:
        # prefetch the row of u that is read `ahead` rows later
        A = u.shape[0]
        width = c_hi - c_lo
        s1 = np.zeros(width)
        s2 = np.zeros(width)
        for a in range(A):
            for c in range(c_lo, c_hi):
                later = a * width + (c - c_lo) + ahead
                if ahead > 0 and later < A * width:
                    _prefetch_seg(u[later // width, c_lo + later % width, :])
                r1, r2 = segment(u[a, c, :], v[a, c, :], p0[c], p1[c], p2[c], bound)
                s1[c - c_lo] += r1
                s2[c - c_lo] += r2
        return s1, s2

    @_piece(f"{term.__name__}.column_channels")
    def column_channels(u, v, p0, p1, p2, bound, c_lo, c_hi, ahead):
        # channels [c_lo, c_hi) of (A, C, 1) arrays: all rows of those columns,
        # in the order of `columns` with one row block (no prefetch)
        A, C, B = u.shape
        s1 = np.zeros(c_hi - c_lo)
        s2 = np.zeros(c_hi - c_lo)
        partials(u.reshape((A, C)), v.reshape((A, C)), p0, p1, p2, bound, 0, A, c_lo, c_hi,
                 s1, s2)
        return s1, s2

    @_kernel(f"{term.__name__}.rows", PJIT)
    def rows(u, v, p0, p1, p2, bound, n_split, sum1, sum2):
        """Rows shape: work item = (channel, chunk of its A*B elements)."""
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
                r1, r2 = segment(u[a, c, b_lo:b_hi], v[a, c, b_lo:b_hi], p0[c], p1[c], p2[c],
                                 bound)
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

    @_kernel(f"{term.__name__}.columns", PJIT)
    def columns(u, v, p0, p1, p2, bound, n_row_blocks, sum1, sum2, work):
        """Columns shape: work item = (block of rows, COLUMN_BLOCK columns) of (A, C*B)."""
        A, C, B = u.shape
        J = C * B
        n_col_blocks = (J + COLUMN_BLOCK - 1) // COLUMN_BLOCK
        u2 = u.reshape((A, J))
        v2 = v.reshape((A, J))
        # the per-column parameters, only those the term reads, and the
        # partial sums of each row block
        q0 = _read_per_column(p0, B, r0, g0, bound, work[0:J])
        q1 = _read_per_column(p1, B, r1, g1, bound, work[J:2 * J])
        q2 = _read_per_column(p2, B, r2, g2, bound, work[2 * J:3 * J])
        part1 = work[3 * J:(3 + n_row_blocks) * J].reshape((n_row_blocks, J))
        part2 = work[(3 + n_row_blocks) * J:(3 + 2 * n_row_blocks) * J].reshape((n_row_blocks, J))
        for item in prange(n_row_blocks * n_col_blocks):
            k = item // n_col_blocks
            a_lo, a_hi = _chunk_range(k, A, n_row_blocks)
            j_lo = (item - k * n_col_blocks) * COLUMN_BLOCK
            j_hi = min(J, j_lo + COLUMN_BLOCK)
            row1 = part1[k, j_lo:j_hi]
            row2 = part2[k, j_lo:j_hi]
            row1[:] = 0.0           # each item starts its own partial sums
            row2[:] = 0.0
            partials(u2, v2, q0, q1, q2, bound, a_lo, a_hi, j_lo, j_hi, row1, row2)
        for c in prange(C):
            s1 = 0.0
            s2 = 0.0
            for k in range(n_row_blocks):
                for j in range(c * B, (c + 1) * B):
                    s1 += part1[k, j]
                    s2 += part2[k, j]
            sum1[c] = s1
            sum2[c] = s2

    @_kernel(f"{term.__name__}.serial", JIT)
    def serial(u, v, p0, p1, p2, bound, sum1, sum2):
        """Serial: rows (a, c) a-major, each row's terms added in float64."""
        A, C, B = u.shape
        for c in range(C):
            sum1[c] = 0.0
            sum2[c] = 0.0
        for a in range(A):
            for c in range(C):
                useg = u[a, c, :]
                vseg = v[a, c, :]
                s1 = 0.0
                s2 = 0.0
                for b in range(B):
                    t1, t2 = term(_ld(useg[b]), _ld(vseg[b]), p0[c], p1[c], p2[c], bound)
                    s1 += t1
                    s2 += t2
                sum1[c] += s1
                sum2[c] += s2

    return Reduction(rows, columns, serial, channels, column_channels)


# ---------------------------------------------------------------------------
# Fused training kernels: a work item is a block of channels, its sums and its
# elementwise pass back to back. On (A, C, B) arrays they take the rows
# pieces (`channels`), on (N, D) arrays the columns pieces (`column_channels`).
# ---------------------------------------------------------------------------

def fused(layout, shifted_sums, normalize, product_sums, combine):
    """The fused training kernels over one layout.

    Parameters
    ----------
    layout : str
        ``"rows"`` or ``"columns"``, for the kernels' names.
    shifted_sums, normalize, product_sums, combine : function
        The ``channels`` pieces (rows layout) or the ``column_channels``
        pieces (columns layout) of ``SHIFTED``, ``AFFINE``, ``PRODUCTS`` and
        ``COMBINE``.

    Returns
    -------
    forward(x, gamma, beta, eps, lo, block, out, mean, invstd, rm, rv, momentum, update, stream)
        Work item = ``block`` consecutive channels: their shifted sums, then
        ``out = max((x - mean) * (invstd * gamma) + beta, lo)`` on them;
        writes ``mean`` and ``invstd`` and (``update``) the running
        statistics ``rm`` and ``rv``, as ``finish_stats`` does.
    backward(dy, x, mean, invstd, gamma, gq, gr, floor, block, out, sum_dy, sum_dy_xhat, stream)
        Work item = ``block`` consecutive channels: ``sum(dy)`` and ``sum(dy *
        (x - mean))`` (``dy`` masked by the ReLU when ``floor`` is not None),
        then ``dx = k*dy + kx*(x - mean) + k0`` on them.

    With ``stream`` (rows layout), ``out`` is written with streaming stores
    (see :mod:`._loadstore`): it does not evict the slab whose second read
    follows, and no line of it is read before it is written.
    """

    @_kernel(f"fused_{layout}.forward", PJIT)
    def forward(x, gamma, beta, eps, lo, block, out, mean, invstd, rm, rv, momentum, update,
                stream):
        A, C, B = x.shape
        shift = channel_shift(x)
        scale = np.empty(C)
        for item in prange((C + block - 1) // block):
            c_lo = item * block
            c_hi = min(C, c_lo + block)
            line = _stream_buffer(out, stream)
            s1, s2 = shifted_sums(x, x, shift, shift, shift, None, c_lo, c_hi,
                                  PREFETCH_ROWS_AHEAD)
            for c in range(c_lo, c_hi):
                mean[c], var = mean_var(shift[c], s1[c - c_lo], s2[c - c_lo], A * B)
                finish_channel(c, var, A * B, eps, gamma, mean, invstd, scale, rm, rv,
                               momentum, update)
            normalize(x, x, mean, scale, beta, beta, beta, beta, lo, c_lo, c_hi, out, line)
            if stream:
                _stream_fence()

    @_kernel(f"fused_{layout}.backward", PJIT)
    def backward(dy, x, mean, invstd, gamma, gq, gr, floor, block, out, sum_dy, sum_dy_xhat,
                 stream):
        A, C, B = x.shape
        k = np.empty(C)
        kx = np.empty(C)
        k0 = np.empty(C)
        for item in prange((C + block - 1) // block):
            c_lo = item * block
            c_hi = min(C, c_lo + block)
            line = _stream_buffer(out, stream)
            s1, s2 = product_sums(dy, x, mean, gq, gr, floor, c_lo, c_hi, 0)
            for c in range(c_lo, c_hi):
                sum_dy[c] = s1[c - c_lo]
                sum_dy_xhat[c] = s2[c - c_lo] * invstd[c]
                k[c], kx[c], k0[c] = dx_coefficients(A * B, invstd[c], gamma[c], sum_dy[c],
                                                     sum_dy_xhat[c])
            combine(dy, x, k, mean, kx, k0, gq, gr, floor, c_lo, c_hi, out, line)
            if stream:
                _stream_fence()

    return forward, backward


# ---------------------------------------------------------------------------
# The kernels of this backend
# ---------------------------------------------------------------------------

# (the parameters each op reads: see elementwise's n_read and gate)
AFFINE = elementwise(_ops.affine, 3)
COMBINE = elementwise(_ops.combine, 4, gate=4)
GATED = elementwise(_ops.gated, 2, gate=2)
PRODUCT = elementwise(_ops.product, 1)
FILL = elementwise(_ops.fill, 1)
SHIFTED = reduction(_ops.shifted, 1)
PRODUCTS = reduction(_ops.products, 1, gate=1)

forward_rows_fused, backward_rows_fused = fused(
    "rows", SHIFTED.channels, AFFINE.channels, PRODUCTS.channels, COMBINE.channels)
forward_columns_fused, backward_columns_fused = fused(
    "columns", SHIFTED.column_channels, AFFINE.column_channels, PRODUCTS.column_channels,
    COMBINE.column_channels)
