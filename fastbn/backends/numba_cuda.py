"""Numba CUDA backend: ``@cuda.jit`` kernels on the canonical ``(A, C, B)`` view.

This backend is ``ON_DEVICE``. :mod:`fastbn.api` checks metadata only and
hands the kernels device arrays; everything per channel (sums into ``mean``
and ``invstd``, the cast of ``gamma``/``beta`` to ``x.dtype``, the update of
the running statistics) happens here, on the device. A call on device arrays
makes no host<->device copy and no synchronization: every launch goes to the
default stream and returns at once.

Launches
--------
A training forward is three launches, and so is the simplified backward:

1. ``partial``: a grid of blocks, each reducing a slab of one channel (or of
   a tile of columns) to float64 partial sums in a scratch buffer;
2. ``finish``: one thread per channel adds its partials in a fixed order
   (so results do not depend on scheduling) and turns them into the
   per-channel results: ``mean``/``invstd`` and the running statistics
   (forward), ``dgamma``/``dbeta`` (backward), and the coefficients of the
   elementwise pass;
3. the elementwise pass (``normalize`` or the backward's ``dx``).

The staged backward stays staged: one launch per stage of the graph, each
full-size stage a new array.

Two layouts, picked by the inner extent ``B``:

* ``B >= ROWS_MIN_B`` (``(N, C, H, W)``): "rows". ``blockIdx.x`` is the
  channel, so the channel is known per block and no index is ever divided;
  ``threadIdx.x`` walks along a row of ``B`` contiguous values (coalesced),
  ``threadIdx.y`` and ``blockIdx.y`` split the ``A`` rows of the channel.
* ``B < ROWS_MIN_B`` (``(N, D)``, channels-last, short rows): "columns". The
  view is a matrix ``(A, C * B)``; ``threadIdx.x`` runs along a row of it
  (coalesced along ``C``), each thread owns one column (its channel is
  computed once per thread), ``threadIdx.y`` and ``blockIdx.y`` split the
  rows.

Inner loops are unrolled four times, so that a warp has four loads in flight
(memory-level parallelism is what an HBM-bound kernel lives on).

Numerics
--------
Statistics are float64 sums shifted by the channel's first value
``K = x[0, c, 0]``: ``S1 = sum(x - K)``, ``S2 = sum((x - K)**2)``,
``mean = K + S1 / M``, ``var = (S2 - S1**2 / M) / M``. With one shift per
channel, partials merge by addition; a constant channel gives exactly 0; NaN
propagates to its channel. Elementwise passes compute in float64 with the
centring ``x - mean`` kept (``(x - mean) * scale + beta``, ``scale = gamma *
invstd``): folding the mean into a shift would lose the accuracy a channel
whose mean is 1e4 times its spread needs, and would not map a constant
channel exactly to ``beta``.

Block reductions use warp shuffles on a GPU and a shared-memory tree under
Numba's CUDA simulator (which has no shuffles); :func:`_use_shuffles` is the
one place that picks.

Settings (module attributes, read at every call)
------------------------------------------------
``THREADS_PER_BLOCK``
    A power of two in ``[1, 1024]``; default 256, or the environment variable
    ``FASTBN_CUDA_THREADS_PER_BLOCK`` at import. Tests lower it so that small
    arrays span several blocks.
``ROWS_MIN_B``
    Inner extents ``B`` at or above this use the rows layout.
``TARGET_BLOCKS``
    Blocks a launch aims for (an H200 has 132 multiprocessors, each holding
    8 blocks of 256 threads).
``MIN_ITEMS_PER_THREAD``
    A reduction block gets at least this many elements per thread.
"""

import contextlib
import math
import os
import threading
import warnings
from types import SimpleNamespace
from importlib import util as _importlib_util

import numpy as np

try:
    from numba import cuda
    from numba import float32, float64
    from numba.core import config as _numba_config

    _IMPORT_ERROR = ""
except Exception as import_error:  # ImportError, CudaSupportError, ...
    cuda = None
    float32 = float64 = None
    _numba_config = None
    _IMPORT_ERROR = f"{type(import_error).__name__}: {import_error}"

ON_DEVICE = True

DEFAULT_THREADS_PER_BLOCK = 256
WARP_SIZE = 32
ROWS_MIN_B = 32
TARGET_BLOCKS = 4096
MIN_ITEMS_PER_THREAD = 16
MAX_GRID_Y = 65535


def _is_valid_threads(value):
    """True when ``value`` is a usable threads-per-block count."""
    return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            and 1 <= value <= 1024 and (value & (value - 1)) == 0)


def _threads_from_environment():
    """Threads per block from ``FASTBN_CUDA_THREADS_PER_BLOCK``, or the default.

    An invalid value is reported with a warning, never an exception, so that
    importing this module cannot fail.
    """
    text = os.environ.get("FASTBN_CUDA_THREADS_PER_BLOCK", "").strip()
    if not text:
        return DEFAULT_THREADS_PER_BLOCK
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not _is_valid_threads(value):
        warnings.warn(
            f"FASTBN_CUDA_THREADS_PER_BLOCK={text!r} is not a power of two in "
            f"[1, 1024]; using {DEFAULT_THREADS_PER_BLOCK}", RuntimeWarning,
            stacklevel=2)
        return DEFAULT_THREADS_PER_BLOCK
    return value


THREADS_PER_BLOCK = _threads_from_environment()

_SIMULATOR = bool(_numba_config is not None and _numba_config.ENABLE_CUDASIM)

# The CUDA simulator runs one kernel at a time and, while a kernel runs,
# replaces this module's global ``cuda`` by its fake module, and its kernel
# objects keep their launch configuration as mutable state: calls from
# several Python threads are serialized there. A GPU needs no such lock.
_SIMULATOR_LOCK = threading.RLock()
_BUILD_LOCK = threading.Lock()
_KERNELS_BY_THREADS = {}
_AVAILABILITY = []     # the first answer of availability(), kept


_NO_LOCK = contextlib.nullcontext()


def _serialized():
    """A lock under the simulator, a no-op context on a GPU."""
    return _SIMULATOR_LOCK if _SIMULATOR else _NO_LOCK


def _use_shuffles(threads):
    """Warp shuffles for block reductions: on a GPU, with whole warps.

    The one place that picks the reduction path: the simulator implements
    no shuffles, so it runs (and its tests check) the shared-memory tree.
    """
    return not _SIMULATOR and threads >= WARP_SIZE


# ---------------------------------------------------------------------------
# Availability and information
# ---------------------------------------------------------------------------

def _numpy_incompatibility():
    """Why the installed numba-cuda cannot compile under this NumPy, or ``""``.

    numba-cuda up to 0.30.x registers an overload of ``np.row_stack`` when it
    compiles its first kernel; NumPy 2.5 removed ``row_stack``, so every
    compilation fails with an ``AttributeError``. The check reads the source
    of numba-cuda's array module instead of compiling anything.
    """
    if hasattr(np, "row_stack"):
        return ""
    try:
        spec = _importlib_util.find_spec("numba.cuda.np.arrayobj")
        with open(spec.origin, encoding="utf-8") as source:
            uses_row_stack = "np.row_stack" in source.read()
    except Exception:   # not found or unreadable: nothing to report
        return ""
    if not uses_row_stack:
        return ""
    return (f"the installed numba-cuda cannot compile kernels under NumPy "
            f"{np.__version__} (it uses numpy.row_stack, removed in NumPy 2.5); "
            f"install NumPy < 2.5 (pip install 'fastbn[cuda]' does) or a "
            f"numba-cuda release that supports this NumPy")


def availability():
    """Whether this backend can run here and, if not, why.

    Returns
    -------
    available : bool
    reason : str
        Empty when available.
    """
    incompatibility = _numpy_incompatibility()
    if incompatibility:
        return False, incompatibility
    if cuda is None:
        return False, f"numba.cuda not importable: {_IMPORT_ERROR}"
    try:
        # Under the simulator a running kernel swaps this module's ``cuda``
        # global for a fake one; the lock keeps this call out of that window.
        with _serialized():
            found = bool(cuda.is_available())
    except Exception as error:  # a broken driver must not raise here
        return False, f"numba.cuda.is_available() failed: {error}"
    if not found:
        return False, "no CUDA GPU found (numba.cuda.is_available() is False)"
    return True, ""


def _device_name():
    """The GPU's name, ``"CUDA simulator"``, or ``"none"``."""
    if cuda is None:
        return "none"
    if _SIMULATOR:
        return "CUDA simulator"
    try:
        if not cuda.is_available():
            return "none"
        name = cuda.get_current_device().name
    except Exception:
        return "unknown CUDA device"
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return str(name)


def info():
    """Backend information.

    Returns
    -------
    dict
        ``threads`` (threads per block), ``openmp`` (always False),
        ``device`` (GPU name, ``"CUDA simulator"`` or ``"none"``).
    """
    return {"threads": int(THREADS_PER_BLOCK), "openmp": False,
            "device": _device_name()}


def _require():
    """Raise RuntimeError when the backend cannot run here (asked once)."""
    if not _AVAILABILITY:
        _AVAILABILITY.append(availability())
    available, reason = _AVAILABILITY[0]
    if not available:
        raise RuntimeError(f"the cuda backend cannot run here: {reason}")


# ---------------------------------------------------------------------------
# Transfers
# ---------------------------------------------------------------------------

def _is_numba_device_array(obj):
    """True for Numba device arrays (and the simulator's fake ones)."""
    return bool(getattr(type(obj), "__cuda_ndarray__", False))


def is_device_array(obj):
    """True for objects that live on the GPU.

    Numba device arrays and any object exposing ``__cuda_array_interface__``
    (CuPy arrays, PyTorch CUDA tensors, ...).
    """
    if _is_numba_device_array(obj):
        return True
    try:
        getattr(obj, "__cuda_array_interface__")
    except Exception:  # absent, or a property refusing (a CPU tensor)
        return False
    return True


def to_device(obj):
    """An array on the device.

    Parameters
    ----------
    obj : numpy.ndarray, Numba device array or ``__cuda_array_interface__``
        A NumPy array (or anything ``numpy.asarray`` accepts) is copied to a
        new C-contiguous device array. A device object is returned as a Numba
        device array viewing the same memory: no copy, and no
        synchronization on the stream it names.

    Returns
    -------
    numba device array
    """
    if _is_numba_device_array(obj):
        return obj
    _require()
    with _serialized():
        if is_device_array(obj):
            return cuda.as_cuda_array(obj, sync=False)
        return cuda.to_device(np.ascontiguousarray(obj))


def empty(shape, dtype):
    """A new, uninitialized, C-contiguous device array."""
    _require()
    with _serialized():
        return cuda.device_array(shape, dtype=np.dtype(dtype), order="C")


def to_host(arr):
    """A NumPy copy of a device array (a NumPy array is returned as is)."""
    if not is_device_array(arr):
        return np.asarray(arr)
    _require()
    with _serialized():
        if not _is_numba_device_array(arr):
            arr = cuda.as_cuda_array(arr)
        return arr.copy_to_host()


# ---------------------------------------------------------------------------
# Kernels, built once per threads-per-block value
# ---------------------------------------------------------------------------

def _build_block_sums(threads):
    """Device functions summing two float64 values over a thread block.

    Returns
    -------
    block_sum : device function ``(value1, value2, slot) -> (total1, total2)``
        Over every thread of the block (``slot`` its linear index); the
        totals are valid in slot 0.
    column_sum : device function ``(value1, value2, tx, ty, width, height)``
        Over ``threadIdx.y`` only, column by column; valid where ``ty == 0``.
    """
    warps = max(1, threads // WARP_SIZE)

    @cuda.jit(device=True)
    def block_sum_shared(value1, value2, slot):
        shared1 = cuda.shared.array(threads, float64)
        shared2 = cuda.shared.array(threads, float64)
        shared1[slot] = value1
        shared2[slot] = value2
        cuda.syncthreads()
        # Tree: after the level of width w, slot t < w holds the sum of
        # slots t, t + w, t + 2w, ... (every thread reaches each barrier).
        width = threads // 2
        while width > 0:
            if slot < width:
                shared1[slot] += shared1[slot + width]
                shared2[slot] += shared2[slot + width]
            cuda.syncthreads()
            width //= 2
        return shared1[0], shared2[0]

    @cuda.jit(device=True)
    def warp_sum(value1, value2):
        offset = WARP_SIZE // 2
        while offset > 0:
            value1 += cuda.shfl_down_sync(0xFFFFFFFF, value1, offset)
            value2 += cuda.shfl_down_sync(0xFFFFFFFF, value2, offset)
            offset //= 2
        return value1, value2

    @cuda.jit(device=True)
    def block_sum_shuffle(value1, value2, slot):
        # Each warp sums its 32 values with shuffles; warp 0 then sums the
        # per-warp totals the same way.
        shared1 = cuda.shared.array(warps, float64)
        shared2 = cuda.shared.array(warps, float64)
        lane = slot % WARP_SIZE
        warp = slot // WARP_SIZE
        value1, value2 = warp_sum(value1, value2)
        if lane == 0:
            shared1[warp] = value1
            shared2[warp] = value2
        cuda.syncthreads()
        value1 = 0.0
        value2 = 0.0
        if warp == 0:
            if lane < warps:
                value1 = shared1[lane]
                value2 = shared2[lane]
            value1, value2 = warp_sum(value1, value2)
        return value1, value2

    @cuda.jit(device=True)
    def column_sum(value1, value2, tx, ty, width, height):
        shared1 = cuda.shared.array(threads, float64)
        shared2 = cuda.shared.array(threads, float64)
        slot = ty * width + tx
        shared1[slot] = value1
        shared2[slot] = value2
        cuda.syncthreads()
        level = height // 2
        while level > 0:
            if ty < level:
                shared1[slot] += shared1[slot + level * width]
                shared2[slot] += shared2[slot + level * width]
            cuda.syncthreads()
            level //= 2
        return shared1[slot], shared2[slot]

    block_sum = block_sum_shuffle if _use_shuffles(threads) else block_sum_shared
    return block_sum, column_sum


def _build_reduction(term, shift_of, block_sum, column_sum):
    """The first level of a per-channel two-sum reduction, in both layouts.

    Parameters
    ----------
    term : device function ``(u, v, shift) -> (t1, t2)``
        The two float64 terms of element ``(u, v)`` of a channel.
    shift_of : device function ``(u_flat, p, c, extent_b) -> float64``
        The per-channel value ``term`` receives.

    Returns
    -------
    rows, columns : kernels
        ``rows[(C, nchunks), (bx, by)](u, v, p, extent_c, extent_b,
        rows_per_chunk, partial)`` writes ``partial[:, chunk, c]``;
        ``columns[(ceil(J / bx), nchunks), (bx, by)](u, v, p, columns_total,
        extent_b, rows_per_chunk, partial)`` writes ``partial[:, chunk, j]``
        for each column ``j = c * B + b`` of the ``(A, J)`` matrix.
    """

    @cuda.jit(device=True)
    def four_terms(u, v, i, step, shift):
        # elements i, i + step, i + 2 step, i + 3 step: four loads in flight
        s1, s2 = term(u[i], v[i], shift)
        t1, t2 = term(u[i + step], v[i + step], shift)
        r1, r2 = term(u[i + 2 * step], v[i + 2 * step], shift)
        q1, q2 = term(u[i + 3 * step], v[i + 3 * step], shift)
        return (s1 + t1) + (r1 + q1), (s2 + t2) + (r2 + q2)

    @cuda.jit
    def rows(u, v, p, extent_c, extent_b, rows_per_chunk, partial):
        c = cuda.blockIdx.x
        chunk = cuda.blockIdx.y
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        extent_a = u.shape[0] // (extent_c * extent_b)
        shift = shift_of(u, p, c, extent_b)
        a = chunk * rows_per_chunk + ty
        a_end = min(chunk * rows_per_chunk + rows_per_chunk, extent_a)
        sum1 = 0.0
        sum2 = 0.0
        while a < a_end:
            row = (a * extent_c + c) * extent_b
            b = tx
            # four loads in flight per thread, then the remainder
            while b + 3 * width < extent_b:
                s1, s2 = four_terms(u, v, row + b, width, shift)
                sum1 += s1
                sum2 += s2
                b += 4 * width
            while b < extent_b:
                s1, s2 = term(u[row + b], v[row + b], shift)
                sum1 += s1
                sum2 += s2
                b += width
            a += height
        total1, total2 = block_sum(sum1, sum2, ty * width + tx)
        if tx == 0 and ty == 0:
            partial[0, chunk, c] = total1
            partial[1, chunk, c] = total2

    @cuda.jit
    def columns(u, v, p, columns_total, extent_b, rows_per_chunk, partial):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        j = cuda.blockIdx.x * width + tx
        chunk = cuda.blockIdx.y
        extent_a = u.shape[0] // columns_total
        sum1 = 0.0
        sum2 = 0.0
        if j < columns_total:
            c = j // extent_b          # once per thread
            shift = shift_of(u, p, c, extent_b)
            a = chunk * rows_per_chunk + ty
            a_end = min(chunk * rows_per_chunk + rows_per_chunk, extent_a)
            step = height * columns_total
            i = a * columns_total + j
            end = a_end * columns_total + j
            while i + 3 * step < end:
                s1, s2 = four_terms(u, v, i, step, shift)
                sum1 += s1
                sum2 += s2
                i += 4 * step
            while i < end:
                s1, s2 = term(u[i], v[i], shift)
                sum1 += s1
                sum2 += s2
                i += step
        total1, total2 = column_sum(sum1, sum2, tx, ty, width, height)
        if ty == 0 and j < columns_total:
            partial[0, chunk, j] = total1
            partial[1, chunk, j] = total2

    return rows, columns


def _build_elementwise(op):
    """An elementwise pass ``out = op(u, v, p0, p1, p2, p3)`` in both layouts.

    ``p0..p3`` are ``coef[0..3, c]``, read once per thread.

    Returns
    -------
    rows, columns : kernels
        ``rows[(C, grid_y), (bx, by)](u, v, coef, extent_c, extent_b, out)``;
        ``columns[(ceil(J / bx), grid_y), (bx, by)](u, v, coef,
        columns_total, extent_b, out)``.
    """

    @cuda.jit(device=True)
    def four(u, v, out, i, step, p0, p1, p2, p3):
        # elements i, i + step, i + 2 step, i + 3 step: four loads in flight
        u0 = u[i]
        u1 = u[i + step]
        u2 = u[i + 2 * step]
        u3 = u[i + 3 * step]
        v0 = v[i]
        v1 = v[i + step]
        v2 = v[i + 2 * step]
        v3 = v[i + 3 * step]
        out[i] = op(u0, v0, p0, p1, p2, p3)
        out[i + step] = op(u1, v1, p0, p1, p2, p3)
        out[i + 2 * step] = op(u2, v2, p0, p1, p2, p3)
        out[i + 3 * step] = op(u3, v3, p0, p1, p2, p3)

    @cuda.jit
    def rows(u, v, coef, extent_c, extent_b, out):
        c = cuda.blockIdx.x
        tx = cuda.threadIdx.x
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        extent_a = u.shape[0] // (extent_c * extent_b)
        p0 = coef[0, c]
        p1 = coef[1, c]
        p2 = coef[2, c]
        p3 = coef[3, c]
        a = cuda.blockIdx.y * height + cuda.threadIdx.y
        while a < extent_a:
            row = (a * extent_c + c) * extent_b
            b = tx
            while b + 3 * width < extent_b:
                four(u, v, out, row + b, width, p0, p1, p2, p3)
                b += 4 * width
            while b < extent_b:
                out[row + b] = op(u[row + b], v[row + b], p0, p1, p2, p3)
                b += width
            a += cuda.gridDim.y * height

    @cuda.jit
    def columns(u, v, coef, columns_total, extent_b, out):
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        j = cuda.blockIdx.x * width + cuda.threadIdx.x
        if j >= columns_total:
            return
        c = j // extent_b          # once per thread
        p0 = coef[0, c]
        p1 = coef[1, c]
        p2 = coef[2, c]
        p3 = coef[3, c]
        step = cuda.gridDim.y * height * columns_total
        i = (cuda.blockIdx.y * height + cuda.threadIdx.y) * columns_total + j
        end = u.shape[0]
        while i + 3 * step < end:
            four(u, v, out, i, step, p0, p1, p2, p3)
            i += 4 * step
        while i < end:
            out[i] = op(u[i], v[i], p0, p1, p2, p3)
            i += step

    return rows, columns


def _build_kernels(threads):
    """Every kernel of the backend for ``threads`` threads per block."""
    block_sum, column_sum = _build_block_sums(threads)

    # -- what the reductions sum ------------------------------------------

    @cuda.jit(device=True)
    def first_value(u, p, c, extent_b):
        # K_c = x[0, c, 0], the shift of the statistics' sums
        return float64(u[c * extent_b])

    @cuda.jit(device=True)
    def channel_value(u, p, c, extent_b):
        return p[c]

    @cuda.jit(device=True)
    def term_shifted_squares(x, unused, shift):
        centred = float64(x) - shift
        return centred, centred * centred

    @cuda.jit(device=True)
    def term_dy_and_dy_centred(dy, x, mean):
        # (dy, dy * (x - mean)); invstd is applied once per channel
        grad = float64(dy)
        return grad, grad * (float64(x) - mean)

    @cuda.jit(device=True)
    def term_value(u, unused, unused_shift):
        return float64(u), 0.0

    @cuda.jit(device=True)
    def term_product(u, v, unused_shift):
        return float64(u) * float64(v), 0.0

    # -- what the elementwise passes compute (p0..p3 = coef[0..3, c]) -------

    @cuda.jit(device=True)
    def op_normalize(x, unused, mean, scale, shift, unused_p3):
        # out = (x - mean) * (gamma * invstd) + beta
        return (float64(x) - mean) * scale + shift

    @cuda.jit(device=True)
    def op_backward(dy, x, mean, k, centred_scale, shift):
        # dx = k * dy - (x - mean) * (k * invstd * sum_dy_xhat / M) - k * sum_dy / M,
        # with k = gamma * invstd: the closed form
        # gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)
        return k * float64(dy) - (float64(x) - mean) * centred_scale + shift

    @cuda.jit(device=True)
    def op_subtract_p0(u, unused, p0, p1, p2, p3):
        return float64(u) - p0

    @cuda.jit(device=True)
    def op_multiply_p1(u, unused, p0, p1, p2, p3):
        return float64(u) * p1

    @cuda.jit(device=True)
    def op_multiply_p2(u, unused, p0, p1, p2, p3):
        return float64(u) * p2

    @cuda.jit(device=True)
    def op_broadcast_p3(unused_u, unused_v, p0, p1, p2, p3):
        return p3

    @cuda.jit(device=True)
    def op_twice_product(u, v, p0, p1, p2, p3):
        return 2.0 * float64(u) * float64(v)

    @cuda.jit(device=True)
    def op_add(u, v, p0, p1, p2, p3):
        return float64(u) + float64(v)

    @cuda.jit(device=True)
    def op_add_p3(u, unused, p0, p1, p2, p3):
        return float64(u) + p3

    # -- finishing kernels: one thread per channel --------------------------

    @cuda.jit(device=True)
    def sum_partials(partial, which, c, width):
        # fixed order: chunk, then the B columns of channel c
        total = 0.0
        base = c * width
        for chunk in range(partial.shape[1]):
            for b in range(width):
                total += partial[which, chunk, base + b]
        return total

    @cuda.jit(device=True)
    def mean_var(partial, width, x, extent_b, count, c):
        # mean = K + S1 / M, var = (S2 - S1**2 / M) / M (>= 0; NaN stays)
        sum1 = sum_partials(partial, 0, c, width)
        sum2 = sum_partials(partial, 1, c, width)
        mean = float64(x[c * extent_b]) + sum1 / count
        var = (sum2 - sum1 * (sum1 / count)) / count
        if var < 0.0:
            var = 0.0
        return mean, var

    @cuda.jit(device=True)
    def as_input_dtype(value, single):
        # gamma and beta take the values of x.dtype
        if single:
            return float64(float32(value))
        return float64(value)

    @cuda.jit(device=True)
    def set_normalize_coef(c, mean, invstd, gamma, beta, flags, coef):
        # coef = [mean, gamma * invstd, beta]; flag bits as in _param_flags
        scale = invstd
        if (flags & 2):
            scale = as_input_dtype(gamma[c], (flags & 1)) * invstd
        offset = 0.0
        if (flags & 4):
            offset = as_input_dtype(beta[c], (flags & 1))
        coef[0, c] = mean
        coef[1, c] = scale
        coef[2, c] = offset

    @cuda.jit(device=True)
    def set_backward_coef(c, count, mean, invstd, gamma, flags, sum_dy, sum_dy_xhat,
                          coef):
        # dx = k * dy - (x - mean) * (k * invstd * sum_dy_xhat / M) - k * sum_dy / M
        k = invstd
        if (flags & 2):
            k = as_input_dtype(gamma[c], (flags & 1)) * invstd
        coef[0, c] = mean
        coef[1, c] = k
        coef[2, c] = k * invstd * (sum_dy_xhat / count)
        coef[3, c] = -k * (sum_dy / count)

    @cuda.jit
    def finish_stats(partial, width, x, extent_b, count, mean_var_out):
        c = cuda.grid(1)
        if c < mean_var_out.shape[1]:
            mean, var = mean_var(partial, width, x, extent_b, count, c)
            mean_var_out[0, c] = mean
            mean_var_out[1, c] = var

    @cuda.jit
    def finish_forward(partial, width, x, extent_b, count, eps, gamma, beta,
                       flags, momentum, running_mean, running_var, stats, coef):
        # flags: bit 0 x is float32, bit 1 gamma given, bit 2 beta given,
        # bit 3 running statistics given
        c = cuda.grid(1)
        if c >= stats.shape[1]:
            return
        mean, var = mean_var(partial, width, x, extent_b, count, c)
        invstd = 1.0 / math.sqrt(var + eps)
        stats[0, c] = mean
        stats[1, c] = invstd
        set_normalize_coef(c, mean, invstd, gamma, beta, flags, coef)
        if (flags & 8):
            # PyTorch: momentum weighs the batch; the running variance takes
            # the unbiased batch variance var * M / (M - 1)
            keep = 1.0 - momentum
            running_mean[c] = keep * float64(running_mean[c]) + momentum * mean
            running_var[c] = (keep * float64(running_var[c])
                              + momentum * (var * (count / (count - 1.0))))

    @cuda.jit
    def finish_eval_forward(running_mean, running_var, eps, gamma, beta, flags,
                            stats, coef):
        c = cuda.grid(1)
        if c < stats.shape[1]:
            mean = float64(running_mean[c])
            invstd = 1.0 / math.sqrt(float64(running_var[c]) + eps)
            stats[0, c] = mean
            stats[1, c] = invstd
            set_normalize_coef(c, mean, invstd, gamma, beta, flags, coef)

    @cuda.jit
    def normalize_coefficients(mean, invstd, gamma, beta, flags, coef):
        c = cuda.grid(1)
        if c < coef.shape[1]:
            set_normalize_coef(c, mean[c], invstd[c], gamma, beta, flags, coef)

    @cuda.jit
    def finish_reduce(partial, width, invstd, sums):
        # sums = [sum(dy), sum(dy * (x - mean)) * invstd]
        c = cuda.grid(1)
        if c < sums.shape[1]:
            sums[0, c] = sum_partials(partial, 0, c, width)
            sums[1, c] = sum_partials(partial, 1, c, width) * invstd[c]

    @cuda.jit
    def elemt_coefficients(count, mean, invstd, gamma, flags, sum_dy, sum_dy_xhat, coef):
        c = cuda.grid(1)
        if c < coef.shape[1]:
            set_backward_coef(c, count, mean[c], invstd[c], gamma, flags, sum_dy[c],
                              sum_dy_xhat[c], coef)

    @cuda.jit
    def finish_backward(partial, width, count, mean, invstd, gamma, flags, grads,
                        coef):
        # grads[0] = dgamma = sum(dy * xhat), grads[1] = dbeta = sum(dy), in
        # x.dtype; flag bit 3: training (else dx = dy * gamma * invstd)
        c = cuda.grid(1)
        if c >= grads.shape[1]:
            return
        sum_dy = sum_partials(partial, 0, c, width)
        sum_dy_xhat = sum_partials(partial, 1, c, width) * invstd[c]
        grads[0, c] = sum_dy_xhat
        grads[1, c] = sum_dy
        if (flags & 8):
            set_backward_coef(c, count, mean[c], invstd[c], gamma, flags, sum_dy,
                              sum_dy_xhat, coef)
        else:
            set_normalize_coef(c, 0.0, invstd[c], gamma, gamma, flags, coef)

    @cuda.jit
    def staged_channels(mean, invstd, gamma, flags, coef):
        # coef = [mean, invstd, gamma, 0] for the stages of the graph
        c = cuda.grid(1)
        if c < coef.shape[1]:
            coef[0, c] = mean[c]
            coef[1, c] = invstd[c]
            coef[2, c] = 1.0
            if (flags & 2):
                coef[2, c] = as_input_dtype(gamma[c], (flags & 1))
            coef[3, c] = 0.0

    @cuda.jit
    def staged_sum(partial, width, sums, row):
        # sums[row, c] = the first sum of channel c's partials
        c = cuda.grid(1)
        if c < sums.shape[1]:
            sums[row, c] = sum_partials(partial, 0, c, width)

    @cuda.jit
    def staged_dsq(invstd, count, sums, coef):
        # step 6: dsqrtvar = -invstd**2 * divar (divar = sums[2])
        # step 5: dvar = 0.5 * invstd * dsqrtvar
        # step 4: dsq = dvar / M, into coef[3] for the broadcast stage
        c = cuda.grid(1)
        if c < coef.shape[1]:
            dsqrtvar = -(invstd[c] * invstd[c]) * sums[2, c]
            dvar = 0.5 * invstd[c] * dsqrtvar
            coef[3, c] = dvar / count

    @cuda.jit
    def staged_dmu(count, sums, coef, grads):
        # step 2: dmu = -sum(dx1) (sums[3]); steps 1 and 0 add dmu / M.
        # grads = [dgamma, dbeta] = [sums[1], sums[0]] in x.dtype
        c = cuda.grid(1)
        if c < coef.shape[1]:
            coef[3, c] = -sums[3, c] / count
            grads[0, c] = sums[1, c]
            grads[1, c] = sums[0, c]

    def reduction(term, shift_of):
        return _build_reduction(term, shift_of, block_sum, column_sum)

    return SimpleNamespace(
        threads=threads,
        stats=reduction(term_shifted_squares, first_value),
        backward=reduction(term_dy_and_dy_centred, channel_value),
        sum=reduction(term_value, channel_value),
        sum_of_product=reduction(term_product, channel_value),
        normalize=_build_elementwise(op_normalize),
        backward_elemt=_build_elementwise(op_backward),
        subtract_p0=_build_elementwise(op_subtract_p0),
        multiply_p1=_build_elementwise(op_multiply_p1),
        multiply_p2=_build_elementwise(op_multiply_p2),
        broadcast_p3=_build_elementwise(op_broadcast_p3),
        twice_product=_build_elementwise(op_twice_product),
        add=_build_elementwise(op_add),
        add_p3=_build_elementwise(op_add_p3),
        finish_stats=finish_stats,
        finish_forward=finish_forward,
        finish_eval_forward=finish_eval_forward,
        normalize_coefficients=normalize_coefficients,
        finish_reduce=finish_reduce,
        elemt_coefficients=elemt_coefficients,
        finish_backward=finish_backward,
        staged_channels=staged_channels,
        staged_sum=staged_sum,
        staged_dsq=staged_dsq,
        staged_dmu=staged_dmu,
    )


def _kernels():
    """The kernels for the current ``THREADS_PER_BLOCK`` (built on first use)."""
    _require()
    threads = THREADS_PER_BLOCK
    kernels = _KERNELS_BY_THREADS.get(threads)
    if kernels is not None:
        return kernels
    if not _is_valid_threads(threads):
        raise ValueError(
            f"THREADS_PER_BLOCK must be a power of two in [1, 1024], "
            f"got {threads!r}")
    with _BUILD_LOCK:
        kernels = _KERNELS_BY_THREADS.get(int(threads))
        if kernels is None:
            kernels = _build_kernels(int(threads))
            _KERNELS_BY_THREADS[int(threads)] = kernels
    return kernels


# ---------------------------------------------------------------------------
# Launch geometry and scratch
# ---------------------------------------------------------------------------

def _ceil_div(numerator, denominator):
    return -(-numerator // denominator)


class _Layout:
    """Launch geometry of one ``(A, C, B)`` shape.

    Attributes
    ----------
    rows : bool
        The rows layout (``B >= ROWS_MIN_B``) or the columns layout.
    block : (int, int)
        ``(bx, by)`` threads.
    reduce_grid, elementwise_grid : (int, int)
        Blocks of the partial-sum pass and of the elementwise pass.
    rows_per_chunk : int
        Rows of ``A`` each reduction block sums.
    partial_shape : (2, nchunks, width * C)
        The float64 partial sums; ``width`` is 1 (rows) or ``B`` (columns).
    width : int
    """

    def __init__(self, shape, threads):
        extent_a, channels, extent_b = shape
        self.rows = extent_b >= ROWS_MIN_B
        if self.rows:
            # bx: the largest power of two <= B, at most a block; the rest of
            # the block goes down the rows of the channel.
            bx = min(threads, 1 << (extent_b.bit_length() - 1))
            by = threads // bx
            lanes = channels
            self.width = 1
        else:
            columns_total = channels * extent_b
            bx = min(threads, WARP_SIZE, 1 << max(0, (columns_total - 1).bit_length()))
            by = threads // bx
            lanes = _ceil_div(columns_total, bx)
            self.width = extent_b
        self.block = (bx, by)
        # Reduction: enough blocks to fill the GPU, each with at least
        # MIN_ITEMS_PER_THREAD elements per thread.
        per_lane = extent_a * (extent_b if self.rows else bx)
        most_chunks = max(1, per_lane // (threads * MIN_ITEMS_PER_THREAD))
        nchunks = max(1, min(_ceil_div(TARGET_BLOCKS, lanes), most_chunks,
                             _ceil_div(extent_a, by), MAX_GRID_Y))
        self.rows_per_chunk = _ceil_div(_ceil_div(extent_a, nchunks), by) * by
        nchunks = _ceil_div(extent_a, self.rows_per_chunk)
        self.reduce_grid = (lanes, nchunks)
        self.partial_shape = (2, nchunks, channels * self.width)
        # Elementwise: rows of A split over grid_y blocks (grid-stride).
        grid_y = max(1, min(_ceil_div(TARGET_BLOCKS, lanes), _ceil_div(extent_a, by),
                            MAX_GRID_Y))
        self.elementwise_grid = (lanes, grid_y)


_LAYOUTS = {}
_scratch = threading.local()


def _layout(shape, threads):
    key = (shape, threads, ROWS_MIN_B, TARGET_BLOCKS, MIN_ITEMS_PER_THREAD)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _Layout(shape, threads)
    return layout


def _scratch_array(name, shape):
    """A float64 device scratch array, reused by this host thread.

    Launches of one host thread go to one stream in order, so a later call
    reuses the buffers only after the earlier call's kernels have read them.
    Each host thread has its own buffers, so two threads never share one.
    """
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (name, shape)
    array = buffers.get(key)
    if array is None:
        if len(buffers) > 64:
            buffers.clear()
        array = buffers[key] = cuda.device_array(shape, dtype=np.float64)
    return array


def _flat(arr):
    """A 1-D view of a C-contiguous device array."""
    return arr.reshape(arr.size)


def _channel_blocks(channels, threads):
    return max(1, _ceil_div(channels, threads))


def _reduce(reduction, layout, u, v, p, shape):
    """Launch the first level of a reduction; return its partials."""
    partial = _scratch_array("partial", layout.partial_shape)
    rows, columns = reduction
    _, channels, extent_b = shape
    if layout.rows:
        _launch(rows, layout.reduce_grid, layout.block,
                u, v, p, channels, extent_b, layout.rows_per_chunk, partial)
    else:
        _launch(columns, layout.reduce_grid, layout.block,
                u, v, p, channels * extent_b, extent_b, layout.rows_per_chunk, partial)
    return partial


def _elementwise(pass_kernels, layout, u, v, coef, shape, out):
    """Launch an elementwise pass over flat views."""
    rows, columns = pass_kernels
    _, channels, extent_b = shape
    if layout.rows:
        _launch(rows, layout.elementwise_grid, layout.block,
                u, v, coef, channels, extent_b, out)
    else:
        _launch(columns, layout.elementwise_grid, layout.block,
                u, v, coef, channels * extent_b, extent_b, out)


# Direct launches. numba-cuda's launch path re-derives, on every call, what
# an argument list of known types needs (about 20 us, plus 4 us per array
# argument, measured on an H200). After a kernel has been launched once
# through numba for a signature, later launches with the same signature
# pack the arguments as numba does and call the driver directly. Any
# failure to set this up falls back to numba's own launch, for good.
DIRECT_LAUNCH = True
_DIRECT = {}


def _argument_key(value):
    if isinstance(value, (int, float)):
        return type(value)
    return (value.dtype, value.ndim, value.is_c_contiguous())


def _pack_array(value, kernel_args):
    # numba's array ABI: meminfo, parent, size, itemsize, data, shape, strides
    kernel_args.extend((0, 0, value.size, value.dtype.itemsize,
                        value.device_ctypes_pointer.value))
    kernel_args.extend(value.shape)
    kernel_args.extend(value.strides)


def _direct_entry(kernel, grid, block, args):
    """What a direct launch of ``kernel`` with arguments like ``args`` needs."""
    try:
        import ctypes

        from cuda.core import LaunchConfig
        from cuda.core import launch as core_launch
        from numba.cuda import types
        from numba.cuda.cudadrv import driver
        from numba.cuda.errors import normalize_kernel_dimensions

        argument_types = tuple(kernel.typeof_pyval(value) for value in args)
        compiled = kernel.overloads[argument_types]
        if compiled.debug or compiled.cooperative or compiled.extensions:
            return False
        packers = []
        for argument_type in argument_types:
            if isinstance(argument_type, types.Array):
                packers.append(_pack_array)
            elif isinstance(argument_type, types.Integer):
                ctype = getattr(ctypes, f"c_{argument_type}")
                packers.append(lambda value, out, ctype=ctype: out.append(ctype(value)))
            elif argument_type == types.float64:
                packers.append(lambda value, out: out.append(ctypes.c_double(value)))
            else:
                return False
        grid, block = normalize_kernel_dimensions(grid, block)
        try:
            config = LaunchConfig(grid=grid, block=block, shmem_size=0, is_cooperative=False)
        except TypeError:   # cuda.core before 1.0
            config = LaunchConfig(grid=grid, block=block, shmem_size=0,
                                  cooperative_launch=False)
        function = compiled._codelibrary.get_cufunc().kernel
        return (core_launch, driver._to_core_stream(0), config, function, tuple(packers))
    except Exception:
        return False


def _launch(kernel, grid, block, *args):
    """Launch ``kernel[grid, block](*args)`` on the default stream."""
    if _SIMULATOR or not DIRECT_LAUNCH:
        kernel[grid, block](*args)
        return
    key = (kernel, grid, block, tuple(_argument_key(value) for value in args))
    entry = _DIRECT.get(key)
    if not entry:
        kernel[grid, block](*args)   # compiles on first use
        if entry is None:
            if len(_DIRECT) > 4096:
                _DIRECT.clear()
            _DIRECT[key] = _direct_entry(kernel, grid, block, args)
        return
    core_launch, stream, config, function, packers = entry
    kernel_args = []
    for pack, value in zip(packers, args):
        pack(value, kernel_args)
    core_launch(stream, config, function, *kernel_args)


def _rows_of(block):
    """The two rows of a ``(2, C)`` device array as 1-D arrays.

    Built from the block's memory directly on a GPU (slicing a Numba device
    array costs about 25 us); sliced under the simulator.
    """
    if _SIMULATOR:
        return block[0], block[1]
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    channels = block.shape[1]
    itemsize = block.dtype.itemsize
    row_bytes = channels * itemsize
    return tuple(
        DeviceNDArray((channels,), (itemsize,), block.dtype,
                      gpu_data=block.gpu_data.view(row * row_bytes, (row + 1) * row_bytes))
        for row in (0, 1))


def _per_channel(kernels, kernel, channels, *args):
    """Launch a one-thread-per-channel kernel."""
    threads = kernels.threads
    _launch(kernel, _channel_blocks(channels, threads), threads, *args)


def _param_flags(dtype, gamma, beta=None, last=False):
    """The flags of a finishing kernel, one int: bit 0 x is float32, bit 1
    gamma given, bit 2 beta given, bit 3 ``last`` (running statistics given,
    or training)."""
    return (int(np.dtype(dtype) == np.float32) | 2 * (gamma is not None)
            | 4 * (beta is not None) | 8 * bool(last))


# ---------------------------------------------------------------------------
# The kernel contract (see fastbn.backends)
# ---------------------------------------------------------------------------

def stats(x):
    """Per-channel mean and biased variance of ``x`` ``(A, C, B)``.

    Returns
    -------
    mean, var : float64 device arrays ``(C,)``
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        layout = _layout(shape, kernels.threads)
        x_flat = _flat(x)
        partial = _reduce(kernels.stats, layout, x_flat, x_flat, x_flat, shape)
        mean_var = cuda.device_array((2, shape[1]), dtype=np.float64)
        _per_channel(kernels, kernels.finish_stats, shape[1], partial, layout.width,
                     x_flat, shape[2], float(shape[0] * shape[2]), mean_var)
        return _rows_of(mean_var)


def normalize(x, mean, invstd, gamma, beta, out):
    """``out = (x - mean) * invstd * gamma + beta`` (computed in float64).

    ``gamma``/``beta``: device arrays of any real dtype, or None.
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        layout = _layout(shape, kernels.threads)
        coef = _scratch_array("coef", (4, shape[1]))
        dummy = _scratch_array("dummy", (1,))
        _per_channel(kernels, kernels.normalize_coefficients, shape[1], mean, invstd,
                     dummy if gamma is None else gamma, dummy if beta is None else beta,
                     _param_flags(x.dtype, gamma, beta), coef)
        x_flat = _flat(x)
        _elementwise(kernels.normalize, layout, x_flat, x_flat, coef, shape, _flat(out))


def forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None,
                  momentum=0.1):
    """Statistics, running statistics, normalization: three launches.

    Parameters
    ----------
    x, out : device arrays ``(A, C, B)``
    gamma, beta : device arrays ``(C,)`` of any real dtype, or None
    eps, momentum : float
    running_mean, running_var : device arrays ``(C,)`` or None
        Updated in place, in the launch that finishes the statistics.

    Returns
    -------
    mean, invstd : float64 device arrays ``(C,)``
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        channels = shape[1]
        layout = _layout(shape, kernels.threads)
        x_flat = _flat(x)
        coef = _scratch_array("coef", (4, channels))
        dummy = _scratch_array("dummy", (1,))
        track = running_mean is not None
        partial = _reduce(kernels.stats, layout, x_flat, x_flat, x_flat, shape)
        stats_out = cuda.device_array((2, channels), dtype=np.float64)
        _per_channel(kernels, kernels.finish_forward, channels, partial, layout.width,
                     x_flat, shape[2], float(shape[0] * shape[2]), float(eps),
                     dummy if gamma is None else gamma, dummy if beta is None else beta,
                     _param_flags(x.dtype, gamma, beta, track), float(momentum),
                     running_mean if track else dummy, running_var if track else dummy,
                     stats_out, coef)
        _elementwise(kernels.normalize, layout, x_flat, x_flat, coef, shape, _flat(out))
        return _rows_of(stats_out)


def forward_eval(x, gamma, beta, running_mean, running_var, eps, out):
    """Normalization with the running statistics: two launches.

    Returns
    -------
    mean, invstd : float64 device arrays ``(C,)``
        ``running_mean`` and ``1 / sqrt(running_var + eps)``.
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        channels = shape[1]
        layout = _layout(shape, kernels.threads)
        coef = _scratch_array("coef", (4, channels))
        dummy = _scratch_array("dummy", (1,))
        stats_out = cuda.device_array((2, channels), dtype=np.float64)
        _per_channel(kernels, kernels.finish_eval_forward, channels, running_mean,
                     running_var, float(eps), dummy if gamma is None else gamma,
                     dummy if beta is None else beta, _param_flags(x.dtype, gamma, beta),
                     stats_out, coef)
        x_flat = _flat(x)
        _elementwise(kernels.normalize, layout, x_flat, x_flat, coef, shape, _flat(out))
        return _rows_of(stats_out)


def backward_reduce(dy, x, mean, invstd):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)``.

    Returns
    -------
    sum_dy, sum_dy_xhat : float64 device arrays ``(C,)``
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        layout = _layout(shape, kernels.threads)
        partial = _reduce(kernels.backward, layout, _flat(dy), _flat(x), mean, shape)
        sums = cuda.device_array((2, shape[1]), dtype=np.float64)
        _per_channel(kernels, kernels.finish_reduce, shape[1], partial, layout.width,
                     invstd, sums)
        return _rows_of(sums)


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``."""
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        layout = _layout(shape, kernels.threads)
        coef = _scratch_array("coef", (4, shape[1]))
        _per_channel(kernels, kernels.elemt_coefficients, shape[1],
                     float(shape[0] * shape[2]), mean, invstd,
                     _scratch_array("dummy", (1,)) if gamma is None else gamma, _param_flags(x.dtype, gamma),
                     sum_dy, sum_dy_xhat, coef)
        _elementwise(kernels.backward_elemt, layout, _flat(dy), _flat(x), coef, shape,
                     _flat(out))


def _backward(dy, x, mean, invstd, gamma, out, training):
    """Reduce, finish (sums and coefficients), elementwise: three launches."""
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        channels = shape[1]
        layout = _layout(shape, kernels.threads)
        dy_flat, x_flat = _flat(dy), _flat(x)
        coef = _scratch_array("coef", (4, channels))
        partial = _reduce(kernels.backward, layout, dy_flat, x_flat, mean, shape)
        grads = cuda.device_array((2, channels), dtype=x.dtype)
        _per_channel(kernels, kernels.finish_backward, channels, partial, layout.width,
                     float(shape[0] * shape[2]), mean, invstd,
                     _scratch_array("dummy", (1,)) if gamma is None else gamma,
                     _param_flags(x.dtype, gamma, None, training), grads, coef)
        if training:
            _elementwise(kernels.backward_elemt, layout, dy_flat, x_flat, coef, shape,
                         _flat(out))
        else:
            _elementwise(kernels.normalize, layout, dy_flat, dy_flat, coef, shape, _flat(out))
        dgamma, dbeta = _rows_of(grads)
        return dbeta, dgamma


def backward_train(dy, x, mean, invstd, gamma, out):
    """The simplified backward: three launches.

    Returns
    -------
    sum_dy, sum_dy_xhat : device arrays ``(C,)`` of ``x.dtype``
        ``dbeta`` and ``dgamma``.
    """
    return _backward(dy, x, mean, invstd, gamma, out, True)


def backward_eval(dy, x, mean, invstd, gamma, out):
    """The evaluation backward ``dx = dy * gamma * invstd``: three launches.

    Returns
    -------
    sum_dy, sum_dy_xhat : device arrays ``(C,)`` of ``x.dtype``
    """
    return _backward(dy, x, mean, invstd, gamma, out, False)


def backward_staged(dy, x, mean, invstd, gamma, eps, out):
    """The staged (cs231n) backward graph, one launch per stage.

    Every full-size stage writes a new device array of ``x.dtype``; the
    reductions accumulate in float64. ``eps`` is part of the contract's
    signature; ``invstd`` already includes it.

    Returns
    -------
    dgamma, dbeta : device arrays ``(C,)`` of ``x.dtype``
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        channels = shape[1]
        count = float(shape[0] * shape[2])
        threads = kernels.threads
        layout = _layout(shape, threads)
        dy_flat, x_flat = _flat(dy), _flat(x)
        coef = _scratch_array("coef", (4, channels))
        sums = _scratch_array("staged_sums", (4, channels))
        grads = cuda.device_array((2, channels), dtype=x.dtype)

        def stage(pass_kernels, u, v):
            result = cuda.device_array(x.size, dtype=x.dtype)
            _elementwise(pass_kernels, layout, u, v, coef, shape, result)
            return result

        def channel_sum(reduction, u, v, row):
            partial = _reduce(reduction, layout, u, v, mean, shape)
            _per_channel(kernels, kernels.staged_sum, channels, partial, layout.width,
                         sums, row)

        # coef = [mean, invstd, gamma, 0]
        _per_channel(kernels, kernels.staged_channels, channels, mean, invstd,
                     _scratch_array("dummy", (1,)) if gamma is None else gamma, _param_flags(x.dtype, gamma), coef)
        xmu = stage(kernels.subtract_p0, x_flat, x_flat)             # xmu = x - mean
        xhat = stage(kernels.multiply_p1, xmu, xmu)                  # xhat = xmu * invstd
        channel_sum(kernels.sum, dy_flat, dy_flat, 0)                # step 9: dbeta = sum(dy)
        channel_sum(kernels.sum_of_product, dy_flat, xhat, 1)        # step 8: dgamma
        dxhat = stage(kernels.multiply_p2, dy_flat, dy_flat)         # dxhat = dy * gamma
        channel_sum(kernels.sum_of_product, dxhat, xmu, 2)           # step 7: divar
        dxmu1 = stage(kernels.multiply_p1, dxhat, dxhat)             # dxmu1 = dxhat * invstd
        _per_channel(kernels, kernels.staged_dsq, channels, invstd, count, sums, coef)
        dsq = stage(kernels.broadcast_p3, xmu, xmu)                  # step 4: dsq = dvar / M
        dxmu2 = stage(kernels.twice_product, xmu, dsq)               # step 3: 2 * xmu * dsq
        dx1 = stage(kernels.add, dxmu1, dxmu2)                       # step 2: dxmu1 + dxmu2
        channel_sum(kernels.sum, dx1, dx1, 3)                        # step 2: sum(dx1)
        _per_channel(kernels, kernels.staged_dmu, channels, count, sums, coef, grads)
        _elementwise(kernels.add_p3, layout, dx1, dx1, coef, shape, _flat(out))  # steps 1, 0
        return _rows_of(grads)
