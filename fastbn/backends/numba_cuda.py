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

Storage: float16, bfloat16, float32, float64
--------------------------------------------
``x``, ``dy`` and ``out`` may be float16, bfloat16 (``ml_dtypes.bfloat16``),
float32 or float64 device arrays; every element is converted to float64 when
loaded and rounded once, to nearest even, when stored. float16 is converted
by the hardware. bfloat16 has no CUDA array-interface type and no arithmetic
in Numba's simulator, so a bfloat16 device array (a Numba device array of
dtype ``bfloat16``, as ``to_device`` makes from a host bfloat16 array) is
handed to the kernels as its uint16 bit patterns (:func:`_flat`), and the
kernels convert them with integer operations (:func:`_build_storage`). The
kernels never take an integer array for bfloat16: :func:`_flat` refuses
every dtype but the four. For 16-bit storage the parameters (``gamma``,
``beta``, ``dgamma``, ``dbeta``) are float32, and so are the staged
backward's full-size intermediates.

Fused ReLU
----------
``relu=True`` makes the normalize pass store ``max(y, 0)`` (NaN stays NaN).
The backward kernels take the forward's ``beta`` and mask ``dy`` by
``y > 0``, with ``y`` rebuilt in the kernel by the forward's own device
function (``affine``) from the same per-channel scale and shift, so no mask
array exists and the launch counts do not change. The staged backward adds
the ReLU as two more full-size stages (``y``, then the masked ``dy``).

Block reductions use warp shuffles on a GPU and a shared-memory tree under
Numba's CUDA simulator (which has no shuffles); :func:`_use_shuffles` is the
one place that picks, and :func:`_build_bit_casts` the only other place where
the simulator and the GPU run different code.

Sizes
-----
Any array the GPU can hold. Channels go along the grid's x (up to
``MAX_GRID_X = 2**31 - 1`` blocks, so any channel count; more raises
``ValueError`` before a launch), never along y or z; the grid's y (chunks
of the rows ``A``) is capped at ``MAX_GRID_Y = 65535``, and a block then
sums ``rows_per_chunk`` rows, with ``nchunks * rows_per_chunk >= A``
(:class:`_Layout`, a plain Python class that tests check at any extent).
The elementwise passes are grid-stride loops, so they cover any ``A`` with
a capped grid. In the kernels, ``threadIdx``/``blockIdx``/``blockDim``/
``gridDim`` are int32, but Numba widens integer arithmetic to int64, and
every index is formed from int64 extents (``(a * C + c) * B + b``), so
flat indices past 2**31 are exact. A channel of one long row (``A = 1``)
is reduced by one block per channel: correct at any length, though slow.

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
    from numba import float32, float64, int32, int64
    from numba.core import config as _numba_config

    _IMPORT_ERROR = ""
except Exception as import_error:  # ImportError, CudaSupportError, ...
    cuda = None
    float32 = float64 = int32 = int64 = None
    _numba_config = None
    _IMPORT_ERROR = f"{type(import_error).__name__}: {import_error}"

ON_DEVICE = True

DEFAULT_THREADS_PER_BLOCK = 256
WARP_SIZE = 32
ROWS_MIN_B = 32
TARGET_BLOCKS = 4096
MIN_ITEMS_PER_THREAD = 16
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1


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
        new C-contiguous device array (a bfloat16 array gives a Numba device
        array of dtype bfloat16, copied as its bits). A device object is returned as a Numba
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
        array = np.ascontiguousarray(obj)
        if array.dtype.name == "bfloat16":
            # bfloat16 has no buffer-protocol format: copy its bits
            return _retyped(cuda.to_device(array.view(np.uint16)), array.dtype)
        return cuda.to_device(array)


def _retyped(array, dtype):
    """The same device memory as ``array`` with another dtype of the same size."""
    if _SIMULATOR:
        return array.view(dtype)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray(array.shape, array.strides, np.dtype(dtype), gpu_data=array.gpu_data)


def empty(shape, dtype):
    """A new, uninitialized, C-contiguous device array."""
    _require()
    with _serialized():
        return cuda.device_array(shape, dtype=np.dtype(dtype), order="C")


def to_host(arr):
    """A NumPy copy of a device array (a NumPy array is returned as is).

    A bfloat16 device array comes back as a bfloat16 NumPy array.
    """
    if not is_device_array(arr):
        return np.asarray(arr)
    _require()
    with _serialized():
        if not _is_numba_device_array(arr):
            arr = cuda.as_cuda_array(arr)
        dtype = np.dtype(arr.dtype)
        if dtype.name == "bfloat16":
            # bfloat16 has no buffer-protocol format: copy its bits
            return _retyped(arr, np.uint16).copy_to_host().view(dtype)
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


def _build_bit_casts():
    """Device functions between a float32 and its bit pattern.

    Returns
    -------
    float_bits : device function ``float32 -> int64`` in ``[0, 2**32)``
    bits_float : device function ``int64`` bit pattern ``-> float32``

    On a GPU these are libdevice's ``__nv_float_as_int`` and
    ``__nv_int_as_float`` (one register move each); the simulator, which has
    no libdevice, reinterprets through NumPy. This and :func:`_use_shuffles`
    are the only places where the two paths differ.
    """
    if _SIMULATOR:
        @cuda.jit(device=True)
        def float_bits(value):
            return int(np.float32(value).view(np.uint32))

        @cuda.jit(device=True)
        def bits_float(bits):
            return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

        return float_bits, bits_float

    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def float_bits(value):
        return int64(libdevice.float_as_int(float32(value))) & 0xFFFFFFFF

    @cuda.jit(device=True)
    def bits_float(bits):
        return libdevice.int_as_float(int32(bits))

    return float_bits, bits_float


def _build_storage():
    """Loads and stores of each storage kind (see :func:`_kind`).

    Returns
    -------
    load : dict kind -> device function ``(array, i) -> float64``
    store : dict kind -> device function ``(array, i, float64 value)``

    ``"f"``: float16, float32 and float64 arrays, converted by the hardware
    (a store rounds to nearest even once, float64 -> float16 included).
    ``"b"``: bfloat16 held as uint16 bit patterns: a load is a 16-bit shift
    into a float32; a store rounds the float64 value once to bfloat16,
    nearest even, by rounding to float32 *to odd* (exact when it can be,
    else the float32 toward zero with its last bit set) and then to
    bfloat16 to nearest even with integer operations; NaN stays a quiet
    NaN, overflow gives infinity.
    """
    float_bits, bits_float = _build_bit_casts()

    @cuda.jit(device=True)
    def load_float(array, i):
        return float64(array[i])

    @cuda.jit(device=True)
    def store_float(array, i, value):
        array[i] = value

    @cuda.jit(device=True)
    def load_bfloat16(array, i):
        return float64(bits_float(int64(array[i]) << 16))

    @cuda.jit(device=True)
    def bfloat16_bits(value):
        single = float32(value)
        bits = float_bits(single)
        if (bits & 0x7FFFFFFF) > 0x7F800000:          # NaN
            return (bits >> 16) | 0x40
        wide = float64(single)
        if wide != value:                              # inexact: round to odd
            if abs(wide) > abs(value):
                bits -= 1
            bits |= 1
        return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16

    @cuda.jit(device=True)
    def store_bfloat16(array, i, value):
        array[i] = bfloat16_bits(value)

    return ({"f": load_float, "b": load_bfloat16},
            {"f": store_float, "b": store_bfloat16})


def _build_reduction(term, shift_of, load_u, load_v, block_sum, column_sum):
    """The first level of a per-channel two-sum reduction, in both layouts.

    Parameters
    ----------
    term : device function ``(u, v, s0, s1, s2) -> (t1, t2)``
        The two float64 terms of element ``(u, v)`` (float64 values) of a
        channel.
    shift_of : device function ``(u, mean, invstd, gamma, beta, flags, c,
            extent_b) -> (s0, s1, s2)``
        The per-channel values ``term`` receives.
    load_u, load_v : device functions ``(array, i) -> float64``

    Returns
    -------
    rows, columns : kernels
        ``rows[(C, nchunks), (bx, by)](u, v, mean, invstd, gamma, beta,
        flags, extent_c, extent_b, rows_per_chunk, partial)`` writes
        ``partial[:, chunk, c]``; ``columns[(ceil(J / bx), nchunks), (bx,
        by)](u, v, mean, invstd, gamma, beta, flags, columns_total,
        extent_b, rows_per_chunk, partial)`` writes ``partial[:, chunk, j]``
        for each column ``j = c * B + b`` of the ``(A, J)`` matrix.
    """

    @cuda.jit(device=True)
    def one_term(u, v, i, s0, s1, s2):
        return term(load_u(u, i), load_v(v, i), s0, s1, s2)

    @cuda.jit(device=True)
    def four_terms(u, v, i, step, s0, s1, s2):
        # elements i, i + step, i + 2 step, i + 3 step: four loads in flight
        a0 = load_u(u, i)
        a1 = load_u(u, i + step)
        a2 = load_u(u, i + 2 * step)
        a3 = load_u(u, i + 3 * step)
        b0 = load_v(v, i)
        b1 = load_v(v, i + step)
        b2 = load_v(v, i + 2 * step)
        b3 = load_v(v, i + 3 * step)
        s1_, s2_ = term(a0, b0, s0, s1, s2)
        t1, t2 = term(a1, b1, s0, s1, s2)
        r1, r2 = term(a2, b2, s0, s1, s2)
        q1, q2 = term(a3, b3, s0, s1, s2)
        return (s1_ + t1) + (r1 + q1), (s2_ + t2) + (r2 + q2)

    @cuda.jit
    def rows(u, v, mean, invstd, gamma, beta, flags, extent_c, extent_b, rows_per_chunk,
             partial):
        c = cuda.blockIdx.x
        chunk = cuda.blockIdx.y
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        height = cuda.blockDim.y
        extent_a = u.shape[0] // (extent_c * extent_b)
        s0, s1, s2 = shift_of(u, mean, invstd, gamma, beta, flags, c, extent_b)
        a = chunk * rows_per_chunk + ty
        a_end = min(chunk * rows_per_chunk + rows_per_chunk, extent_a)
        sum1 = 0.0
        sum2 = 0.0
        while a < a_end:
            row = (a * extent_c + c) * extent_b
            b = tx
            # four loads in flight per thread, then the remainder
            while b + 3 * width < extent_b:
                t1, t2 = four_terms(u, v, row + b, width, s0, s1, s2)
                sum1 += t1
                sum2 += t2
                b += 4 * width
            while b < extent_b:
                t1, t2 = one_term(u, v, row + b, s0, s1, s2)
                sum1 += t1
                sum2 += t2
                b += width
            a += height
        total1, total2 = block_sum(sum1, sum2, ty * width + tx)
        if tx == 0 and ty == 0:
            partial[0, chunk, c] = total1
            partial[1, chunk, c] = total2

    @cuda.jit
    def columns(u, v, mean, invstd, gamma, beta, flags, columns_total, extent_b,
                rows_per_chunk, partial):
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
            s0, s1, s2 = shift_of(u, mean, invstd, gamma, beta, flags, c, extent_b)
            a = chunk * rows_per_chunk + ty
            a_end = min(chunk * rows_per_chunk + rows_per_chunk, extent_a)
            step = height * columns_total
            i = a * columns_total + j
            end = a_end * columns_total + j
            while i + 3 * step < end:
                t1, t2 = four_terms(u, v, i, step, s0, s1, s2)
                sum1 += t1
                sum2 += t2
                i += 4 * step
            while i < end:
                t1, t2 = one_term(u, v, i, s0, s1, s2)
                sum1 += t1
                sum2 += t2
                i += step
        total1, total2 = column_sum(sum1, sum2, tx, ty, width, height)
        if ty == 0 and j < columns_total:
            partial[0, chunk, j] = total1
            partial[1, chunk, j] = total2

    return rows, columns


def _build_elementwise(op, load_u, load_v, store):
    """An elementwise pass ``out = op(u, v, p0, p1, p2, p3, p4)`` in both layouts.

    ``p0..p4`` are ``coef[0..4, c]``, read once per thread; ``load_u``,
    ``load_v`` and ``store`` convert from and to each array's storage.

    Returns
    -------
    rows, columns : kernels
        ``rows[(C, grid_y), (bx, by)](u, v, coef, extent_c, extent_b, out)``;
        ``columns[(ceil(J / bx), grid_y), (bx, by)](u, v, coef,
        columns_total, extent_b, out)``.
    """

    @cuda.jit(device=True)
    def one(u, v, out, i, p0, p1, p2, p3, p4):
        store(out, i, op(load_u(u, i), load_v(v, i), p0, p1, p2, p3, p4))

    @cuda.jit(device=True)
    def four(u, v, out, i, step, p0, p1, p2, p3, p4):
        # elements i, i + step, i + 2 step, i + 3 step: four loads in flight
        u0 = load_u(u, i)
        u1 = load_u(u, i + step)
        u2 = load_u(u, i + 2 * step)
        u3 = load_u(u, i + 3 * step)
        v0 = load_v(v, i)
        v1 = load_v(v, i + step)
        v2 = load_v(v, i + 2 * step)
        v3 = load_v(v, i + 3 * step)
        store(out, i, op(u0, v0, p0, p1, p2, p3, p4))
        store(out, i + step, op(u1, v1, p0, p1, p2, p3, p4))
        store(out, i + 2 * step, op(u2, v2, p0, p1, p2, p3, p4))
        store(out, i + 3 * step, op(u3, v3, p0, p1, p2, p3, p4))

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
        p4 = coef[4, c]
        a = cuda.blockIdx.y * height + cuda.threadIdx.y
        while a < extent_a:
            row = (a * extent_c + c) * extent_b
            b = tx
            while b + 3 * width < extent_b:
                four(u, v, out, row + b, width, p0, p1, p2, p3, p4)
                b += 4 * width
            while b < extent_b:
                one(u, v, out, row + b, p0, p1, p2, p3, p4)
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
        p4 = coef[4, c]
        step = cuda.gridDim.y * height * columns_total
        i = (cuda.blockIdx.y * height + cuda.threadIdx.y) * columns_total + j
        end = u.shape[0]
        while i + 3 * step < end:
            four(u, v, out, i, step, p0, p1, p2, p3, p4)
            i += 4 * step
        while i < end:
            one(u, v, out, i, p0, p1, p2, p3, p4)
            i += step

    return rows, columns


# Coefficient rows of the elementwise passes (coef[k, c] = pk):
#   normalize, eval backward:  [mean, scale, shift, -, -], scale = gamma * invstd
#   simplified backward:       [mean, scale, centred_scale, offset, shift]
# ``shift`` (beta) is what a fused ReLU needs to rebuild y = (x - mean) * scale + shift.
COEF_ROWS = 5


def _build_kernels(threads):
    """Every kernel of the backend for ``threads`` threads per block.

    The per-channel (finishing) kernels are built here; the passes over the
    full arrays are built per storage kind of their arrays, on first use
    (see :meth:`_Kernels.reduction` and :meth:`_Kernels.elementwise`).
    """
    block_sum, column_sum = _build_block_sums(threads)
    load, store = _build_storage()

    # -- per-channel parameters, shared by every kernel that needs them ------

    @cuda.jit(device=True)
    def as_param_dtype(value, single):
        # gamma and beta take the values of the parameter dtype: float32
        # for float32 and 16-bit storage (flag bit 0), float64 otherwise
        if single:
            return float64(float32(value))
        return float64(value)

    @cuda.jit(device=True)
    def channel_scale(c, invstd, gamma, flags):
        # gamma * invstd (invstd when gamma is None)
        if (flags & 2):
            return as_param_dtype(gamma[c], (flags & 1)) * invstd
        return invstd

    @cuda.jit(device=True)
    def channel_shift(c, beta, flags):
        # beta (0 when beta is None)
        if (flags & 4):
            return as_param_dtype(beta[c], (flags & 1))
        return 0.0

    @cuda.jit(device=True)
    def affine(x, mean, scale, shift):
        # y = (x - mean) * (gamma * invstd) + beta: the forward's arithmetic,
        # also what a fused ReLU's backward rebuilds for its mask
        return (x - mean) * scale + shift

    # -- what the reductions sum (terms get float64 values) ------------------

    def first_value_of(load_u):
        @cuda.jit(device=True)
        def first_value(u, mean, invstd, gamma, beta, flags, c, extent_b):
            # K_c = x[0, c, 0], the shift of the statistics' sums
            return load_u(u, c * extent_b), 0.0, 0.0
        return first_value

    @cuda.jit(device=True)
    def channel_mean(u, mean, invstd, gamma, beta, flags, c, extent_b):
        return mean[c], 0.0, 0.0

    @cuda.jit(device=True)
    def channel_affine(u, mean, invstd, gamma, beta, flags, c, extent_b):
        # what y = affine(x, ...) needs, computed as the forward computes it
        return (mean[c], channel_scale(c, invstd[c], gamma, flags),
                channel_shift(c, beta, flags))

    @cuda.jit(device=True)
    def term_shifted_squares(x, unused, shift, unused_s1, unused_s2):
        centred = x - shift
        return centred, centred * centred

    @cuda.jit(device=True)
    def term_dy_and_dy_centred(dy, x, mean, unused_s1, unused_s2):
        # (dy, dy * (x - mean)); invstd is applied once per channel
        return dy, dy * (x - mean)

    @cuda.jit(device=True)
    def term_relu(dy, x, mean, scale, shift):
        # the same with dy masked by y > 0 (fused ReLU)
        grad = dy if affine(x, mean, scale, shift) > 0.0 else 0.0
        return grad, grad * (x - mean)

    @cuda.jit(device=True)
    def term_value(u, unused, unused_s0, unused_s1, unused_s2):
        return u, 0.0

    @cuda.jit(device=True)
    def term_product(u, v, unused_s0, unused_s1, unused_s2):
        return u * v, 0.0

    # -- what the elementwise passes compute (p0..p4 = coef[0..4, c]) --------

    @cuda.jit(device=True)
    def op_normalize(x, unused, mean, scale, shift, unused_p3, unused_p4):
        # out = (x - mean) * (gamma * invstd) + beta
        return affine(x, mean, scale, shift)

    @cuda.jit(device=True)
    def op_normalize_relu(x, unused, mean, scale, shift, unused_p3, unused_p4):
        # out = max(y, 0); NaN stays NaN
        y = affine(x, mean, scale, shift)
        if y <= 0.0:
            return 0.0
        return y

    @cuda.jit(device=True)
    def op_backward(dy, x, mean, k, centred_scale, offset, unused_shift):
        # dx = k * dy - (x - mean) * (k * invstd * sum_dy_xhat / M) - k * sum_dy / M,
        # with k = gamma * invstd: the closed form
        # gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)
        return k * dy - (x - mean) * centred_scale + offset

    @cuda.jit(device=True)
    def op_backward_relu(dy, x, mean, k, centred_scale, offset, shift):
        # the same with dy masked by y > 0, y = affine(x, mean, k, shift)
        grad = dy if affine(x, mean, k, shift) > 0.0 else 0.0
        return k * grad - (x - mean) * centred_scale + offset

    @cuda.jit(device=True)
    def op_eval(dy, unused, mean, scale, shift, unused_p3, unused_p4):
        # dx = dy * gamma * invstd
        return dy * scale

    @cuda.jit(device=True)
    def op_eval_relu(dy, x, mean, scale, shift, unused_p3, unused_p4):
        # dx = dy * gamma * invstd where y > 0, else 0
        grad = dy if affine(x, mean, scale, shift) > 0.0 else 0.0
        return grad * scale

    @cuda.jit(device=True)
    def op_mask_positive(u, v, p0, p1, p2, p3, p4):
        # u where v > 0, else 0 (the staged graph's ReLU node)
        if v > 0.0:
            return u
        return 0.0

    @cuda.jit(device=True)
    def op_subtract_p0(u, unused, p0, p1, p2, p3, p4):
        return u - p0

    @cuda.jit(device=True)
    def op_multiply_p1(u, unused, p0, p1, p2, p3, p4):
        return u * p1

    @cuda.jit(device=True)
    def op_multiply_p2(u, unused, p0, p1, p2, p3, p4):
        return u * p2

    @cuda.jit(device=True)
    def op_broadcast_p3(unused_u, unused_v, p0, p1, p2, p3, p4):
        return p3

    @cuda.jit(device=True)
    def op_twice_product(u, v, p0, p1, p2, p3, p4):
        return 2.0 * u * v

    @cuda.jit(device=True)
    def op_add(u, v, p0, p1, p2, p3, p4):
        return u + v

    @cuda.jit(device=True)
    def op_add_p3(u, unused, p0, p1, p2, p3, p4):
        return u + p3

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

    def mean_var_of(load_x):
        @cuda.jit(device=True)
        def mean_var(partial, width, x, extent_b, count, c):
            # mean = K + S1 / M, var = (S2 - S1**2 / M) / M (>= 0; NaN stays)
            sum1 = sum_partials(partial, 0, c, width)
            sum2 = sum_partials(partial, 1, c, width)
            mean = load_x(x, c * extent_b) + sum1 / count
            var = (sum2 - sum1 * (sum1 / count)) / count
            if var < 0.0:
                var = 0.0
            return mean, var
        return mean_var

    @cuda.jit(device=True)
    def set_normalize_coef(c, mean, invstd, gamma, beta, flags, coef):
        # coef = [mean, gamma * invstd, beta]; flag bits as in _param_flags
        coef[0, c] = mean
        coef[1, c] = channel_scale(c, invstd, gamma, flags)
        coef[2, c] = channel_shift(c, beta, flags)

    @cuda.jit(device=True)
    def set_backward_coef(c, count, mean, invstd, gamma, beta, flags, sum_dy, sum_dy_xhat,
                          coef):
        # dx = k * dy - (x - mean) * (k * invstd * sum_dy_xhat / M) - k * sum_dy / M;
        # coef[4] = beta, for a fused ReLU's mask
        k = channel_scale(c, invstd, gamma, flags)
        coef[0, c] = mean
        coef[1, c] = k
        coef[2, c] = k * invstd * (sum_dy_xhat / count)
        coef[3, c] = -k * (sum_dy / count)
        coef[4, c] = channel_shift(c, beta, flags)

    def finish_stats_of(load_x):
        mean_var = mean_var_of(load_x)

        @cuda.jit
        def finish_stats(partial, width, x, extent_b, count, mean_var_out):
            c = cuda.grid(1)
            if c < mean_var_out.shape[1]:
                mean, var = mean_var(partial, width, x, extent_b, count, c)
                mean_var_out[0, c] = mean
                mean_var_out[1, c] = var
        return finish_stats

    def finish_forward_of(load_x):
        mean_var = mean_var_of(load_x)

        @cuda.jit
        def finish_forward(partial, width, x, extent_b, count, eps, gamma, beta,
                           flags, momentum, running_mean, running_var, stats, coef):
            # flags: bit 0 float32 parameters, bit 1 gamma given, bit 2 beta
            # given, bit 3 running statistics given
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
        return finish_forward

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
    def elemt_coefficients(count, mean, invstd, gamma, beta, flags, sum_dy, sum_dy_xhat,
                           coef):
        c = cuda.grid(1)
        if c < coef.shape[1]:
            set_backward_coef(c, count, mean[c], invstd[c], gamma, beta, flags, sum_dy[c],
                              sum_dy_xhat[c], coef)

    @cuda.jit
    def finish_backward(partial, width, count, mean, invstd, gamma, beta, flags, grads,
                        coef):
        # grads[0] = dgamma = sum(dy * xhat), grads[1] = dbeta = sum(dy), in
        # the parameter dtype; flag bit 3: training (else dx = dy * gamma * invstd)
        c = cuda.grid(1)
        if c >= grads.shape[1]:
            return
        sum_dy = sum_partials(partial, 0, c, width)
        sum_dy_xhat = sum_partials(partial, 1, c, width) * invstd[c]
        grads[0, c] = sum_dy_xhat
        grads[1, c] = sum_dy
        if (flags & 8):
            set_backward_coef(c, count, mean[c], invstd[c], gamma, beta, flags, sum_dy,
                              sum_dy_xhat, coef)
        else:
            set_normalize_coef(c, mean[c], invstd[c], gamma, beta, flags, coef)

    @cuda.jit
    def staged_channels(mean, invstd, gamma, flags, coef):
        # coef = [mean, invstd, gamma, 0, 0] for the stages of the graph
        c = cuda.grid(1)
        if c < coef.shape[1]:
            coef[0, c] = mean[c]
            coef[1, c] = invstd[c]
            coef[2, c] = 1.0
            if (flags & 2):
                coef[2, c] = as_param_dtype(gamma[c], (flags & 1))
            coef[3, c] = 0.0
            coef[4, c] = 0.0

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
        # grads = [dgamma, dbeta] = [sums[1], sums[0]] in the parameter dtype
        c = cuda.grid(1)
        if c < coef.shape[1]:
            coef[3, c] = -sums[3, c] / count
            grads[0, c] = sums[1, c]
            grads[1, c] = sums[0, c]

    reductions = {
        "stats": lambda kind: (term_shifted_squares, first_value_of(load[kind])),
        "backward": lambda kind: (term_dy_and_dy_centred, channel_mean),
        "backward_relu": lambda kind: (term_relu, channel_affine),
        "sum": lambda kind: (term_value, channel_mean),
        "sum_of_product": lambda kind: (term_product, channel_mean),
    }
    operations = {
        "normalize": op_normalize, "normalize_relu": op_normalize_relu,
        "backward": op_backward, "backward_relu": op_backward_relu,
        "eval": op_eval, "eval_relu": op_eval_relu, "mask_positive": op_mask_positive,
        "subtract_p0": op_subtract_p0, "multiply_p1": op_multiply_p1,
        "multiply_p2": op_multiply_p2, "broadcast_p3": op_broadcast_p3,
        "twice_product": op_twice_product, "add": op_add, "add_p3": op_add_p3,
    }

    def build_reduction(name, kind_u, kind_v):
        term, shift_of = reductions[name](kind_u)
        return _build_reduction(term, shift_of, load[kind_u], load[kind_v], block_sum,
                                column_sum)

    def build_elementwise(name, kind_u, kind_v, kind_out):
        return _build_elementwise(operations[name], load[kind_u], load[kind_v],
                                  store[kind_out])

    return _Kernels(
        threads, build_reduction, build_elementwise,
        finish_stats={kind: finish_stats_of(load[kind]) for kind in load},
        finish_forward={kind: finish_forward_of(load[kind]) for kind in load},
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


class _Kernels:
    """The kernels of one threads-per-block value.

    Per-channel kernels are attributes. Passes over the full arrays depend on
    the storage of their arrays and are built on first use:
    ``reduction(name, u, v)`` and ``elementwise(name, u, v, out)`` take the
    flat arrays the kernel will get and return its ``(rows, columns)`` pair.
    """

    def __init__(self, threads, build_reduction, build_elementwise, **per_channel):
        self.threads = threads
        self._build_reduction = build_reduction
        self._build_elementwise = build_elementwise
        self._passes = {}
        self.__dict__.update(per_channel)

    def _get(self, key, build):
        kernels = self._passes.get(key)
        if kernels is None:
            with _BUILD_LOCK:
                kernels = self._passes.get(key)
                if kernels is None:
                    kernels = self._passes[key] = build(*key[1:])
        return kernels

    def reduction(self, name, u, v):
        return self._get(("reduction", name, _kind(u), _kind(v)), self._build_reduction)

    def elementwise(self, name, u, v, out):
        return self._get(("elementwise", name, _kind(u), _kind(v), _kind(out)),
                         self._build_elementwise)


def _kind(flat):
    """The storage kind of a flat device array a kernel gets: ``"b"`` for
    bfloat16 bit patterns (see :func:`_flat`), ``"f"`` for float arrays."""
    return "b" if flat.dtype == np.uint16 else "f"


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
        if lanes > MAX_GRID_X:
            raise ValueError(f"shape {tuple(shape)} needs {lanes} blocks along the grid's x, "
                             f"more than CUDA's limit of {MAX_GRID_X}")
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
    """The 1-D view a kernel gets of a C-contiguous device array.

    float16, float32 and float64 arrays are viewed as they are; a bfloat16
    array as uint16 bit patterns (the kernels convert them, see
    :func:`_build_storage`). Any other dtype is a TypeError: an integer
    array is never taken for bfloat16 bits.
    """
    dtype = np.dtype(arr.dtype)
    if dtype.name == "bfloat16":
        if _SIMULATOR:
            return arr.reshape(arr.size).view(np.uint16)
        # Built from the array's memory directly (a reshape and a view cost
        # about 25 us each on the host).
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        return DeviceNDArray((arr.size,), (2,), np.dtype(np.uint16), gpu_data=arr.gpu_data)
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"the cuda kernels take float16, bfloat16, float32 or float64 "
                        f"arrays, got dtype {dtype}")
    return arr.reshape(arr.size)


def _param_dtype(dtype):
    """gamma/beta/dgamma/dbeta dtype: float32 for 16-bit storage, else ``dtype``.

    It is also the compute dtype of the staged backward's intermediates.
    """
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def _channel_blocks(channels, threads):
    """Blocks of a one-thread-per-channel launch (a 1-D grid along x)."""
    blocks = max(1, _ceil_div(channels, threads))
    if blocks > MAX_GRID_X:
        raise ValueError(f"{channels} channels need {blocks} blocks, more than CUDA's "
                         f"limit of {MAX_GRID_X}")
    return blocks


def _reduce(kernels, name, layout, u, v, shape, params=None):
    """Launch the first level of reduction ``name`` over flat ``u``, ``v``;
    return its partials.

    ``params``: ``(mean, invstd, gamma, beta, flags)`` for the reductions
    that read them (``None``: the statistics, which read none).
    """
    partial = _scratch_array("partial", layout.partial_shape)
    rows, columns = kernels.reduction(name, u, v)
    if params is None:
        dummy = _scratch_array("dummy", (1,))
        params = (dummy, dummy, dummy, dummy, 0)
    _, channels, extent_b = shape
    if layout.rows:
        _launch(rows, layout.reduce_grid, layout.block,
                u, v, *params, channels, extent_b, layout.rows_per_chunk, partial)
    else:
        _launch(columns, layout.reduce_grid, layout.block,
                u, v, *params, channels * extent_b, extent_b, layout.rows_per_chunk, partial)
    return partial


def _elementwise(kernels, name, layout, u, v, coef, shape, out):
    """Launch elementwise pass ``name`` over flat views."""
    rows, columns = kernels.elementwise(name, u, v, out)
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
    """The flags of a per-channel kernel, one int: bit 0 float32 parameters
    (x float32 or 16-bit), bit 1 gamma given, bit 2 beta given, bit 3
    ``last`` (running statistics given, or training)."""
    return (int(np.dtype(dtype) != np.float64) | 2 * (gamma is not None)
            | 4 * (beta is not None) | 8 * bool(last))


def _or_dummy(array):
    return _scratch_array("dummy", (1,)) if array is None else array


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
        partial = _reduce(kernels, "stats", layout, x_flat, x_flat, shape)
        mean_var = cuda.device_array((2, shape[1]), dtype=np.float64)
        _per_channel(kernels, kernels.finish_stats[_kind(x_flat)], shape[1], partial,
                     layout.width, x_flat, shape[2], float(shape[0] * shape[2]), mean_var)
        return _rows_of(mean_var)


def normalize(x, mean, invstd, gamma, beta, out, relu=False):
    """``out = (x - mean) * invstd * gamma + beta`` (computed in float64),
    then ``max(out, 0)`` when ``relu``.

    ``gamma``/``beta``: device arrays of any real dtype, or None.
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        layout = _layout(shape, kernels.threads)
        coef = _scratch_array("coef", (COEF_ROWS, shape[1]))
        _per_channel(kernels, kernels.normalize_coefficients, shape[1], mean, invstd,
                     _or_dummy(gamma), _or_dummy(beta), _param_flags(x.dtype, gamma, beta),
                     coef)
        x_flat = _flat(x)
        _elementwise(kernels, "normalize_relu" if relu else "normalize", layout, x_flat,
                     x_flat, coef, shape, _flat(out))


def forward_train(x, gamma, beta, eps, out, running_mean=None, running_var=None,
                  momentum=0.1, relu=False):
    """Statistics, running statistics, normalization (and ReLU): three launches.

    Parameters
    ----------
    x, out : device arrays ``(A, C, B)``, float16, bfloat16, float32 or float64
    gamma, beta : device arrays ``(C,)`` of any real dtype, or None
    eps, momentum : float
    running_mean, running_var : device arrays ``(C,)`` or None
        Updated in place, in the launch that finishes the statistics.
    relu : bool
        ``out = max(y, 0)``, in the normalize pass.

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
        coef = _scratch_array("coef", (COEF_ROWS, channels))
        dummy = _scratch_array("dummy", (1,))
        track = running_mean is not None
        partial = _reduce(kernels, "stats", layout, x_flat, x_flat, shape)
        stats_out = cuda.device_array((2, channels), dtype=np.float64)
        _per_channel(kernels, kernels.finish_forward[_kind(x_flat)], channels, partial,
                     layout.width, x_flat, shape[2], float(shape[0] * shape[2]), float(eps),
                     _or_dummy(gamma), _or_dummy(beta),
                     _param_flags(x.dtype, gamma, beta, track), float(momentum),
                     running_mean if track else dummy, running_var if track else dummy,
                     stats_out, coef)
        _elementwise(kernels, "normalize_relu" if relu else "normalize", layout, x_flat,
                     x_flat, coef, shape, _flat(out))
        return _rows_of(stats_out)


def forward_eval(x, gamma, beta, running_mean, running_var, eps, out, relu=False):
    """Normalization with the running statistics (and ReLU): two launches.

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
        coef = _scratch_array("coef", (COEF_ROWS, channels))
        stats_out = cuda.device_array((2, channels), dtype=np.float64)
        _per_channel(kernels, kernels.finish_eval_forward, channels, running_mean,
                     running_var, float(eps), _or_dummy(gamma), _or_dummy(beta),
                     _param_flags(x.dtype, gamma, beta), stats_out, coef)
        x_flat = _flat(x)
        _elementwise(kernels, "normalize_relu" if relu else "normalize", layout, x_flat,
                     x_flat, coef, shape, _flat(out))
        return _rows_of(stats_out)


def _reduction_of(x, mean, invstd, gamma, beta, relu):
    """Name and parameters of the backward's reduction: with ``relu``, dy is
    masked by ``y > 0``, ``y`` rebuilt from ``mean``, ``invstd``, ``gamma``
    and ``beta`` in the kernel."""
    if relu:
        return "backward_relu", (mean, invstd, _or_dummy(gamma), _or_dummy(beta),
                                 _param_flags(x.dtype, gamma, beta))
    dummy = _scratch_array("dummy", (1,))
    return "backward", (mean, dummy, dummy, dummy, 0)


def backward_reduce(dy, x, mean, invstd, gamma=None, beta=None, relu=False):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)``.

    With ``relu``, of ``dy`` masked by ``y > 0`` (``y`` rebuilt from ``x``
    with ``gamma`` and ``beta`` as the forward computed it).

    Returns
    -------
    sum_dy, sum_dy_xhat : float64 device arrays ``(C,)``
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        layout = _layout(shape, kernels.threads)
        name, params = _reduction_of(x, mean, invstd, gamma, beta, relu)
        partial = _reduce(kernels, name, layout, _flat(dy), _flat(x), shape, params)
        sums = cuda.device_array((2, shape[1]), dtype=np.float64)
        _per_channel(kernels, kernels.finish_reduce, shape[1], partial, layout.width,
                     invstd, sums)
        return _rows_of(sums)


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta=None,
                   relu=False):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``,
    with ``dy`` masked by ``y > 0`` when ``relu``."""
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        layout = _layout(shape, kernels.threads)
        coef = _scratch_array("coef", (COEF_ROWS, shape[1]))
        _per_channel(kernels, kernels.elemt_coefficients, shape[1],
                     float(shape[0] * shape[2]), mean, invstd, _or_dummy(gamma),
                     _or_dummy(beta), _param_flags(x.dtype, gamma, beta), sum_dy,
                     sum_dy_xhat, coef)
        _elementwise(kernels, "backward_relu" if relu else "backward", layout, _flat(dy),
                     _flat(x), coef, shape, _flat(out))


def _backward(dy, x, mean, invstd, gamma, out, training, beta, relu):
    """Reduce, finish (sums and coefficients), elementwise: three launches."""
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        channels = shape[1]
        layout = _layout(shape, kernels.threads)
        dy_flat, x_flat = _flat(dy), _flat(x)
        coef = _scratch_array("coef", (COEF_ROWS, channels))
        name, params = _reduction_of(x, mean, invstd, gamma, beta, relu)
        partial = _reduce(kernels, name, layout, dy_flat, x_flat, shape, params)
        grads = cuda.device_array((2, channels), dtype=_param_dtype(x.dtype))
        _per_channel(kernels, kernels.finish_backward, channels, partial, layout.width,
                     float(shape[0] * shape[2]), mean, invstd, _or_dummy(gamma),
                     _or_dummy(beta), _param_flags(x.dtype, gamma, beta, training), grads,
                     coef)
        if training:
            _elementwise(kernels, "backward_relu" if relu else "backward", layout, dy_flat,
                         x_flat, coef, shape, _flat(out))
        elif relu:
            _elementwise(kernels, "eval_relu", layout, dy_flat, x_flat, coef, shape,
                         _flat(out))
        else:
            _elementwise(kernels, "eval", layout, dy_flat, dy_flat, coef, shape, _flat(out))
        dgamma, dbeta = _rows_of(grads)
        return dbeta, dgamma


def backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """The simplified backward: three launches.

    ``beta`` (device array or None) and ``relu``: the forward's; with
    ``relu``, ``dy`` is masked by ``y > 0`` in the reduction and in the
    elementwise pass, ``y`` rebuilt there from ``x`` (no mask array).

    Returns
    -------
    sum_dy, sum_dy_xhat : device arrays ``(C,)`` of the parameter dtype
        ``dbeta`` and ``dgamma`` (float32 for 16-bit ``x``, else ``x.dtype``).
    """
    return _backward(dy, x, mean, invstd, gamma, out, True, beta, relu)


def backward_eval(dy, x, mean, invstd, gamma, out, beta=None, relu=False):
    """The evaluation backward ``dx = dy * gamma * invstd``: three launches.

    With ``relu``, ``dy`` is masked by ``y > 0`` first.

    Returns
    -------
    sum_dy, sum_dy_xhat : device arrays ``(C,)`` of the parameter dtype
    """
    return _backward(dy, x, mean, invstd, gamma, out, False, beta, relu)


def backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False):
    """The staged (cs231n) backward graph, one launch per stage.

    Every full-size stage writes a new device array of the compute dtype
    (``x.dtype``; float32 for 16-bit ``x``); the reductions accumulate in
    float64; ``dx`` is rounded once into ``out``. With ``relu`` the graph
    has one more node on top, walked back first: ``y`` rebuilt full size,
    then ``dy = where(y > 0, dy, 0)`` full size. ``eps`` is part of the
    contract's signature; ``invstd`` already includes it.

    Returns
    -------
    dgamma, dbeta : device arrays ``(C,)`` of the parameter dtype
    """
    kernels = _kernels()
    with _serialized():
        shape = tuple(x.shape)
        channels = shape[1]
        count = float(shape[0] * shape[2])
        layout = _layout(shape, kernels.threads)
        stage_dtype = _param_dtype(x.dtype)
        dy_flat, x_flat = _flat(dy), _flat(x)
        coef = _scratch_array("coef", (COEF_ROWS, channels))
        sums = _scratch_array("staged_sums", (4, channels))
        dummy = _scratch_array("dummy", (1,))
        grads = cuda.device_array((2, channels), dtype=stage_dtype)

        def stage(name, u, v, stage_coef=coef):
            result = cuda.device_array(x.size, dtype=stage_dtype)
            _elementwise(kernels, name, layout, u, v, stage_coef, shape, result)
            return result

        def channel_sum(name, u, v, row):
            partial = _reduce(kernels, name, layout, u, v, shape,
                              (mean, dummy, dummy, dummy, 0))
            _per_channel(kernels, kernels.staged_sum, channels, partial, layout.width,
                         sums, row)

        if relu:
            # step 10: relu = max(y, 0); y rebuilt full size as the forward
            # computed it, then dy = where(y > 0, dy, 0) full size
            relu_coef = _scratch_array("relu_coef", (COEF_ROWS, channels))
            _per_channel(kernels, kernels.normalize_coefficients, channels, mean, invstd,
                         _or_dummy(gamma), _or_dummy(beta), _param_flags(x.dtype, gamma, beta),
                         relu_coef)
            y = stage("normalize", x_flat, x_flat, relu_coef)
            dy_flat = stage("mask_positive", dy_flat, y)
        # coef = [mean, invstd, gamma, 0, 0]
        _per_channel(kernels, kernels.staged_channels, channels, mean, invstd,
                     _or_dummy(gamma), _param_flags(x.dtype, gamma), coef)
        xmu = stage("subtract_p0", x_flat, x_flat)                # xmu = x - mean
        xhat = stage("multiply_p1", xmu, xmu)                     # xhat = xmu * invstd
        channel_sum("sum", dy_flat, dy_flat, 0)                   # step 9: dbeta = sum(dy)
        channel_sum("sum_of_product", dy_flat, xhat, 1)           # step 8: dgamma
        dxhat = stage("multiply_p2", dy_flat, dy_flat)            # dxhat = dy * gamma
        channel_sum("sum_of_product", dxhat, xmu, 2)              # step 7: divar
        dxmu1 = stage("multiply_p1", dxhat, dxhat)                # dxmu1 = dxhat * invstd
        _per_channel(kernels, kernels.staged_dsq, channels, invstd, count, sums, coef)
        dsq = stage("broadcast_p3", xmu, xmu)                     # step 4: dsq = dvar / M
        dxmu2 = stage("twice_product", xmu, dsq)                  # step 3: 2 * xmu * dsq
        dx1 = stage("add", dxmu1, dxmu2)                          # step 2: dxmu1 + dxmu2
        channel_sum("sum", dx1, dx1, 3)                           # step 2: sum(dx1)
        _per_channel(kernels, kernels.staged_dmu, channels, count, sums, coef, grads)
        _elementwise(kernels, "add_p3", layout, dx1, dx1, coef, shape, _flat(out))  # steps 1, 0
        return _rows_of(grads)
