"""Numba CUDA backend: ``@cuda.jit`` kernels on the canonical ``(A, C, B)`` view.

This backend is ``ON_DEVICE``: :mod:`fastbn.api` moves every array to the GPU
with :func:`to_device` / :func:`empty` before calling a kernel, and the kernels
below receive device arrays only (3-D ``(A, C, B)`` C-contiguous arrays and
per-channel float64 ``(C,)`` arrays). Per-channel results are returned as new
float64 device arrays; full-size results are written into ``out``. Nothing is
copied back to the host here.

Reductions (statistics and the backward sums) are two-level and deterministic
(no floating-point atomics):

1. a grid of blocks, each reducing one chunk of one channel in float64 through
   a shared-memory tree, writes its partial sums to a float64 buffer
   ``(nchunks, C, Bp)``;
2. a small merge kernel sums the partials of each channel in a fixed order and
   finishes the result (for example ``mean``/``var`` from shifted sums).

Two layouts of step 1 are used, picked by the inner extent ``B``:

* ``B >= SMALL_INNER`` (e.g. ``(N, C, H, W)``): blocks of one channel; the
  threads of a block walk the channel's ``A * B`` elements in a grid-stride
  loop whose consecutive threads read consecutive ``b`` (coalesced).
* ``B < SMALL_INNER`` (``(N, D)`` and channels-last, ``B == 1``): 2-D blocks
  over the ``(A, C * B)`` matrix: ``threadIdx.x`` runs along a row (coalesced,
  many channels per block), ``threadIdx.y`` and ``blockIdx.y`` split the rows.

Statistics use sums shifted by the channel's first value ``K = x[0, c, 0]``::

    S1 = sum(x - K),  S2 = sum((x - K)**2)
    mean = K + S1 / M,  var = (S2 - S1 * S1 / M) / M

accumulated in float64 for float32 and float64 inputs alike. With one shift
per channel the partials of different blocks merge by plain addition, a
constant channel gives ``S1 = S2 = 0`` and so a variance of exactly 0, and NaN
propagates to the channel's mean and variance.

Elementwise kernels compute in float64 (centring ``x - mean`` included) and
store in ``x.dtype``; they use flat grid-stride loops with the channel of
element ``i`` given by ``(i // B) % C``.

Notes
-----
The shared-memory trees synchronize with ``cuda.syncthreads()`` at every
level, down to the last pair. Warp shuffles (``cuda.shfl_down_sync``) would
save the last five synchronizations on a GPU, but Numba's CUDA simulator does
not implement them, and this backend is tested under the simulator only.

The float64 arithmetic is cheap on data-centre GPUs (A100, H100) and slow on
consumer GPUs (1/32 or 1/64 of the float32 rate); the kernels are memory-bound
on the former.

Settings (module attributes, read at every call)
------------------------------------------------
``THREADS_PER_BLOCK``
    Threads per block, a power of two in ``[1, 1024]``; default 256, or the
    environment variable ``FASTBN_CUDA_THREADS_PER_BLOCK`` at import. Tests
    lower it (e.g. 8) so that a small channel spans several blocks.
``ITEMS_PER_THREAD``
    Roughly how many elements one thread reduces or writes before the grid
    is considered large enough.
``MAX_CHUNKS``
    Most blocks per channel (or per column of blocks) in a reduction.
``MAX_BLOCKS``
    Most blocks of an elementwise grid; grid-stride loops cover the rest.
``SMALL_INNER``
    Inner extents ``B`` below this use the row-wise reduction layout.
"""

import contextlib
import math
import os
import threading
import warnings
from types import SimpleNamespace

import numpy as np

try:
    from numba import cuda
    from numba import float64
    from numba.core import config as _numba_config

    _IMPORT_ERROR = ""
except Exception as import_error:  # ImportError, CudaSupportError, ...
    cuda = None
    float64 = None
    _numba_config = None
    _IMPORT_ERROR = f"{type(import_error).__name__}: {import_error}"

ON_DEVICE = True

DEFAULT_THREADS_PER_BLOCK = 256
ITEMS_PER_THREAD = 4
MAX_CHUNKS = 512
MAX_BLOCKS = 65535
SMALL_INNER = 32
WARP_SIZE = 32


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
# replaces this module's global ``cuda`` by its fake module: calls from
# several Python threads are serialized there. A GPU needs no such lock.
_SIMULATOR_LOCK = threading.RLock()
_BUILD_LOCK = threading.Lock()
_KERNELS_BY_THREADS = {}


def _serialized():
    """A lock under the simulator, a no-op context on a GPU."""
    if _SIMULATOR:
        return _SIMULATOR_LOCK
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Availability and information
# ---------------------------------------------------------------------------

def availability():
    """Whether this backend can run here and, if not, why.

    Returns
    -------
    available : bool
    reason : str
        Empty when available.
    """
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
    """Raise RuntimeError when the backend cannot run here."""
    available, reason = availability()
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
        device array viewing the same memory, without a copy.

    Returns
    -------
    numba device array
    """
    _require()
    with _serialized():
        if _is_numba_device_array(obj):
            return obj
        if is_device_array(obj):
            return cuda.as_cuda_array(obj)
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

def _build_reduction(term, finish, threads):
    """The three kernels of one two-level per-channel reduction.

    Parameters
    ----------
    term : CUDA device function ``(u, v, p_c, q_c) -> (t1, t2)``
        The two float64 terms that element ``(u, v)`` of channel ``c``
        contributes; ``p_c`` and ``q_c`` are per-channel parameters.
    finish : CUDA device function ``(s1, s2, count, p_c, q_c) -> (r1, r2)``
        The per-channel results from the two sums over the ``count`` elements.
    threads : int
        Threads per block (a power of two); sizes the shared memory.

    Returns
    -------
    SimpleNamespace
        ``by_channel``, ``by_rows`` (the two layouts of the first level) and
        ``merge`` (the second level).
    """

    @cuda.jit
    def by_channel(u, v, p, q, nchunks, partial1, partial2):
        # Block ``blockIdx.x`` reduces chunk ``chunk`` of channel ``c``: the
        # channel's flat index m = a * B + b starts at chunk * threads + tid
        # and advances by nchunks * threads (a grid-stride loop over the
        # channel's blocks), consecutive threads on consecutive b.
        extent_a = u.shape[0]
        extent_b = u.shape[2]
        c = cuda.blockIdx.x // nchunks
        chunk = cuda.blockIdx.x - c * nchunks
        tid = cuda.threadIdx.x
        p_c = p[c]
        q_c = q[c]

        first = chunk * threads + tid
        a = first // extent_b
        b = first - a * extent_b
        stride = nchunks * threads
        step_a = stride // extent_b
        step_b = stride - step_a * extent_b

        sum1 = float64(0.0)
        sum2 = float64(0.0)
        while a < extent_a:
            term1, term2 = term(u[a, c, b], v[a, c, b], p_c, q_c)
            sum1 += term1
            sum2 += term2
            a += step_a
            b += step_b
            if b >= extent_b:
                b -= extent_b
                a += 1

        shared1 = cuda.shared.array(threads, float64)
        shared2 = cuda.shared.array(threads, float64)
        shared1[tid] = sum1
        shared2[tid] = sum2
        cuda.syncthreads()
        # Tree: after the level of width w, slot t < w holds the sum of
        # slots t, t + w, t + 2w, ... (every thread reaches each barrier).
        width = threads // 2
        while width > 0:
            if tid < width:
                shared1[tid] += shared1[tid + width]
                shared2[tid] += shared2[tid + width]
            cuda.syncthreads()
            width //= 2
        if tid == 0:
            partial1[chunk, c, 0] = shared1[0]
            partial2[chunk, c, 0] = shared2[0]

    @cuda.jit
    def by_rows(u, v, p, q, partial1, partial2):
        # The view as a matrix (A, C * B): column ``column`` is (c, b).
        # threadIdx.x walks along a row (coalesced), threadIdx.y and
        # blockIdx.y split the rows: thread row ``row_start`` then every
        # ``gridDim.y * blockDim.y`` rows.
        extent_a = u.shape[0]
        extent_c = u.shape[1]
        extent_b = u.shape[2]
        width_x = cuda.blockDim.x
        height_y = cuda.blockDim.y
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        slot = ty * width_x + tx
        column = cuda.blockIdx.x * width_x + tx
        c = column // extent_b
        b = column - c * extent_b
        row_chunk = cuda.blockIdx.y

        sum1 = float64(0.0)
        sum2 = float64(0.0)
        if c < extent_c:
            p_c = p[c]
            q_c = q[c]
            a = row_chunk * height_y + ty
            row_stride = cuda.gridDim.y * height_y
            while a < extent_a:
                term1, term2 = term(u[a, c, b], v[a, c, b], p_c, q_c)
                sum1 += term1
                sum2 += term2
                a += row_stride

        shared1 = cuda.shared.array(threads, float64)
        shared2 = cuda.shared.array(threads, float64)
        shared1[slot] = sum1
        shared2[slot] = sum2
        cuda.syncthreads()
        # Tree over threadIdx.y, column by column.
        height = height_y // 2
        while height > 0:
            if ty < height:
                shared1[slot] += shared1[slot + height * width_x]
                shared2[slot] += shared2[slot + height * width_x]
            cuda.syncthreads()
            height //= 2
        if ty == 0 and c < extent_c:
            partial1[row_chunk, c, b] = shared1[slot]
            partial2[row_chunk, c, b] = shared2[slot]

    @cuda.jit
    def merge(partial1, partial2, p, q, count, result1, result2):
        # One thread per channel sums its partials in a fixed order (chunk,
        # then b), so results do not depend on scheduling.
        nchunks = partial1.shape[0]
        extent_c = partial1.shape[1]
        extent_b = partial1.shape[2]
        c = cuda.grid(1)
        while c < extent_c:
            sum1 = float64(0.0)
            sum2 = float64(0.0)
            for chunk in range(nchunks):
                for b in range(extent_b):
                    sum1 += partial1[chunk, c, b]
                    sum2 += partial2[chunk, c, b]
            value1, value2 = finish(sum1, sum2, count, p[c], q[c])
            result1[c] = value1
            result2[c] = value2
            c += cuda.gridsize(1)

    return SimpleNamespace(by_channel=by_channel, by_rows=by_rows, merge=merge)


def _build_kernels(threads):
    """Every kernel of the backend for ``threads`` threads per block."""

    # -- terms and finishes of the reductions (device functions) ----------

    @cuda.jit(device=True)
    def term_shifted_squares(x, unused, shift, unused_q):
        # d = x - K in float64; contributes (d, d**2).
        centred = float64(x) - shift
        return centred, centred * centred

    @cuda.jit(device=True)
    def finish_mean_var(sum1, sum2, count, shift, unused_q):
        # mean = K + S1 / M, var = (S2 - S1 * S1 / M) / M (>= 0; NaN stays).
        mean = shift + sum1 / count
        var = (sum2 - sum1 * (sum1 / count)) / count
        if var < 0.0:
            var = 0.0
        return mean, var

    @cuda.jit(device=True)
    def term_dy_and_dy_centred(dy, x, mean_c, unused_q):
        # (dy, dy * (x - mean)); invstd is applied once per channel.
        grad = float64(dy)
        return grad, grad * (float64(x) - mean_c)

    @cuda.jit(device=True)
    def finish_scale_second(sum1, sum2, count, unused_p, invstd_c):
        # sum_dy, sum_dy_xhat = sum(dy * (x - mean)) * invstd.
        return sum1, sum2 * invstd_c

    @cuda.jit(device=True)
    def term_value(u, unused, unused_p, unused_q):
        return float64(u), 0.0

    @cuda.jit(device=True)
    def term_product(u, v, unused_p, unused_q):
        return float64(u) * float64(v), 0.0

    @cuda.jit(device=True)
    def finish_identity(sum1, sum2, count, unused_p, unused_q):
        return sum1, sum2

    @cuda.jit(device=True)
    def finish_negate(sum1, sum2, count, unused_p, unused_q):
        return -sum1, -sum2

    # -- per-channel kernels (one thread per channel) -----------------------

    @cuda.jit
    def channel_first_value(x, shift):
        # K_c = x[0, c, 0], the shift of the statistics' sums.
        c = cuda.grid(1)
        while c < shift.shape[0]:
            shift[c] = float64(x[0, c, 0])
            c += cuda.gridsize(1)

    @cuda.jit
    def channel_invstd(var, eps, invstd):
        # invstd = 1 / sqrt(var + eps)
        c = cuda.grid(1)
        while c < var.shape[0]:
            invstd[c] = 1.0 / math.sqrt(var[c] + eps)
            c += cuda.gridsize(1)

    @cuda.jit
    def staged_dsqrtvar(invstd, divar, dsqrtvar):
        # step 6: dsqrtvar = -1 / sqrtvar**2 * divar = -invstd**2 * divar
        c = cuda.grid(1)
        while c < invstd.shape[0]:
            dsqrtvar[c] = -(invstd[c] * invstd[c]) * divar[c]
            c += cuda.gridsize(1)

    @cuda.jit
    def staged_dvar(invstd, dsqrtvar, dvar):
        # step 5: dvar = 0.5 / sqrt(var + eps) * dsqrtvar
        c = cuda.grid(1)
        while c < invstd.shape[0]:
            dvar[c] = 0.5 * invstd[c] * dsqrtvar[c]
            c += cuda.gridsize(1)

    # -- elementwise kernels on flat views, channel c = (i // B) % C --------

    @cuda.jit
    def normalize_flat(x, mean, invstd, gamma, beta, channels, inner, out):
        # out = (x - mean) * (invstd * gamma) + beta, in float64.
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = (i // inner) % channels
            out[i] = ((float64(x[i]) - mean[c]) * (invstd[c] * gamma[c])
                      + beta[c])

    @cuda.jit
    def backward_elemt_flat(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat,
                            inv_count, channels, inner, out):
        # dx = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = (i // inner) % channels
            xhat = (float64(x[i]) - mean[c]) * invstd[c]
            out[i] = (gamma[c] * invstd[c]) * (
                float64(dy[i]) - sum_dy[c] * inv_count
                - xhat * (sum_dy_xhat[c] * inv_count))

    @cuda.jit
    def stage_subtract_channel(u, p, channels, inner, out):
        # out = u - p[c]
        for i in range(cuda.grid(1), u.shape[0], cuda.gridsize(1)):
            c = (i // inner) % channels
            out[i] = float64(u[i]) - p[c]

    @cuda.jit
    def stage_multiply_channel(u, p, channels, inner, out):
        # out = u * p[c]
        for i in range(cuda.grid(1), u.shape[0], cuda.gridsize(1)):
            c = (i // inner) % channels
            out[i] = float64(u[i]) * p[c]

    @cuda.jit
    def stage_channel_divided(p, count, channels, inner, out):
        # out = p[c] / M, broadcast to full size
        for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            c = (i // inner) % channels
            out[i] = p[c] / count

    @cuda.jit
    def stage_twice_product(u, v, out):
        # out = 2 * u * v
        for i in range(cuda.grid(1), u.shape[0], cuda.gridsize(1)):
            out[i] = 2.0 * float64(u[i]) * float64(v[i])

    @cuda.jit
    def stage_add(u, v, out):
        # out = u + v
        for i in range(cuda.grid(1), u.shape[0], cuda.gridsize(1)):
            out[i] = float64(u[i]) + float64(v[i])

    @cuda.jit
    def stage_add_channel_divided(u, p, count, channels, inner, out):
        # out = u + p[c] / M
        for i in range(cuda.grid(1), u.shape[0], cuda.gridsize(1)):
            c = (i // inner) % channels
            out[i] = float64(u[i]) + p[c] / count

    return SimpleNamespace(
        threads=threads,
        stats=_build_reduction(term_shifted_squares, finish_mean_var, threads),
        backward=_build_reduction(term_dy_and_dy_centred, finish_scale_second,
                                  threads),
        sum=_build_reduction(term_value, finish_identity, threads),
        negated_sum=_build_reduction(term_value, finish_negate, threads),
        sum_of_product=_build_reduction(term_product, finish_identity,
                                        threads),
        channel_first_value=channel_first_value,
        channel_invstd=channel_invstd,
        staged_dsqrtvar=staged_dsqrtvar,
        staged_dvar=staged_dvar,
        normalize_flat=normalize_flat,
        backward_elemt_flat=backward_elemt_flat,
        stage_subtract_channel=stage_subtract_channel,
        stage_multiply_channel=stage_multiply_channel,
        stage_channel_divided=stage_channel_divided,
        stage_twice_product=stage_twice_product,
        stage_add=stage_add,
        stage_add_channel_divided=stage_add_channel_divided,
    )


def _kernels():
    """The kernels for the current ``THREADS_PER_BLOCK`` (built on first use)."""
    _require()
    threads = THREADS_PER_BLOCK
    if not _is_valid_threads(threads):
        raise ValueError(
            f"THREADS_PER_BLOCK must be a power of two in [1, 1024], "
            f"got {threads!r}")
    threads = int(threads)
    with _BUILD_LOCK:
        kernels = _KERNELS_BY_THREADS.get(threads)
        if kernels is None:
            kernels = _build_kernels(threads)
            _KERNELS_BY_THREADS[threads] = kernels
    return kernels


# ---------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------

def _ceil_div(numerator, denominator):
    return -(-numerator // denominator)


def _elementwise_blocks(size, threads):
    """Blocks of a flat grid-stride launch over ``size`` elements."""
    blocks = _ceil_div(size, threads * ITEMS_PER_THREAD)
    return max(1, min(blocks, MAX_BLOCKS))


def _channel_blocks(channels, threads):
    """Blocks of a one-thread-per-channel launch."""
    return max(1, min(_ceil_div(channels, threads), MAX_BLOCKS))


def _flat(arr):
    """A 1-D view of a C-contiguous device array."""
    return arr.reshape(arr.size)


def _new_channel_array(channels):
    return cuda.device_array(channels, dtype=np.float64)


def _reduction_layout(shape, threads):
    """Launch configuration of the first level of a reduction over ``shape``.

    Parameters
    ----------
    shape : tuple of int
        ``(A, C, B)``.
    threads : int
        Threads per block.

    Returns
    -------
    layout : str
        ``"by_channel"`` (``B >= SMALL_INNER``) or ``"by_rows"``.
    grid : int or tuple of int
        Blocks: ``nchunks * C`` for ``by_channel``; ``(ceil(C * B / width),
        nchunks)`` for ``by_rows``.
    block : int or tuple of int
        ``threads``, or ``(width, threads // width)`` for ``by_rows``.
    partial_shape : tuple of int
        ``(nchunks, C, 1)`` or ``(nchunks, C, B)``: the float64 partials.
    """
    extent_a, channels, extent_b = shape
    if extent_b >= SMALL_INNER:
        per_channel = extent_a * extent_b
        nchunks = _ceil_div(per_channel, threads * ITEMS_PER_THREAD)
        nchunks = max(1, min(nchunks, MAX_CHUNKS))
        return ("by_channel", nchunks * channels, threads,
                (nchunks, channels, 1))
    # A row of C * B values is split among ``width`` threads (a warp at most,
    # a power of two no wider than the row); the rest of the block goes down
    # the rows.
    columns = channels * extent_b
    width = min(threads, WARP_SIZE, 1 << (columns - 1).bit_length())
    height = threads // width
    nchunks = _ceil_div(extent_a, height * ITEMS_PER_THREAD)
    nchunks = max(1, min(nchunks, MAX_CHUNKS))
    return ("by_rows", (_ceil_div(columns, width), nchunks), (width, height),
            (nchunks, channels, extent_b))


def _reduce(kernels, reduction, u, v, p, q):
    """Run a two-level per-channel reduction; float64 ``(C,)`` device results.

    Parameters
    ----------
    kernels : SimpleNamespace
        From :func:`_kernels`.
    reduction : SimpleNamespace
        One of ``kernels.stats``, ``kernels.backward``, ...
    u, v : device arrays ``(A, C, B)``
        The element inputs of the reduction's term (``v`` may be ``u``).
    p, q : float64 device arrays ``(C,)``
        Per-channel parameters of the term and finish.
    """
    threads = kernels.threads
    extent_a, channels, extent_b = u.shape
    layout, grid, block, partial_shape = _reduction_layout(
        (extent_a, channels, extent_b), threads)
    partial1 = cuda.device_array(partial_shape, dtype=np.float64)
    partial2 = cuda.device_array(partial_shape, dtype=np.float64)
    if layout == "by_channel":
        nchunks = partial_shape[0]
        reduction.by_channel[grid, block](u, v, p, q, nchunks, partial1,
                                          partial2)
    else:
        reduction.by_rows[grid, block](u, v, p, q, partial1, partial2)
    result1 = _new_channel_array(channels)
    result2 = _new_channel_array(channels)
    count = float(extent_a * extent_b)
    reduction.merge[_channel_blocks(channels, threads), threads](
        partial1, partial2, p, q, count, result1, result2)
    return result1, result2


def _launch_flat(kernels, kernel, size, *args):
    """Launch an elementwise kernel over ``size`` elements."""
    threads = kernels.threads
    kernel[_elementwise_blocks(size, threads), threads](*args)


def _launch_channels(kernels, kernel, channels, *args):
    """Launch a one-thread-per-channel kernel."""
    threads = kernels.threads
    kernel[_channel_blocks(channels, threads), threads](*args)


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
        channels = x.shape[1]
        shift = _new_channel_array(channels)
        _launch_channels(kernels, kernels.channel_first_value, channels,
                         x, shift)
        return _reduce(kernels, kernels.stats, x, x, shift, shift)


def normalize(x, mean, invstd, gamma, beta, out):
    """``out = (x - mean) * invstd * gamma + beta`` (computed in float64)."""
    kernels = _kernels()
    with _serialized():
        _, channels, inner = x.shape
        _launch_flat(kernels, kernels.normalize_flat, x.size, _flat(x), mean,
                     invstd, gamma, beta, channels, inner, _flat(out))


def forward_train(x, gamma, beta, eps, out):
    """``stats`` then ``normalize`` with ``invstd = 1 / sqrt(var + eps)``.

    The two cannot share one pass on a GPU without a grid-wide barrier, so
    they stay two launches.

    Returns
    -------
    mean, var : float64 device arrays ``(C,)``
    """
    kernels = _kernels()
    with _serialized():
        mean, var = stats(x)
        channels = x.shape[1]
        invstd = _new_channel_array(channels)
        _launch_channels(kernels, kernels.channel_invstd, channels,
                         var, float(eps), invstd)
        normalize(x, mean, invstd, gamma, beta, out)
        return mean, var


def backward_reduce(dy, x, mean, invstd):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)``.

    Returns
    -------
    sum_dy, sum_dy_xhat : float64 device arrays ``(C,)``
    """
    kernels = _kernels()
    with _serialized():
        return _reduce(kernels, kernels.backward, dy, x, mean, invstd)


def backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out):
    """``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)``."""
    kernels = _kernels()
    with _serialized():
        extent_a, channels, inner = x.shape
        inv_count = 1.0 / float(extent_a * inner)
        _launch_flat(kernels, kernels.backward_elemt_flat, x.size, _flat(dy),
                     _flat(x), mean, invstd, gamma, sum_dy, sum_dy_xhat,
                     inv_count, channels, inner, _flat(out))


def backward_train(dy, x, mean, invstd, gamma, out):
    """``backward_reduce`` then ``backward_elemt`` (two launches).

    Returns
    -------
    sum_dy, sum_dy_xhat : float64 device arrays ``(C,)``
        ``dbeta`` and ``dgamma``.
    """
    with _serialized():
        sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, invstd)
        backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out)
        return sum_dy, sum_dy_xhat


def backward_staged(dy, x, mean, invstd, gamma, eps, out):
    """The staged (cs231n) backward graph, one kernel per stage.

    Every full-size stage writes a new device array of ``x.dtype``; the
    reductions accumulate in float64. ``eps`` is part of the contract's
    signature; ``invstd`` already includes it.

    Returns
    -------
    dgamma, dbeta : float64 device arrays ``(C,)``
    """
    kernels = _kernels()
    with _serialized():
        extent_a, channels, inner = x.shape
        size = x.size
        count = float(extent_a * inner)
        dtype = x.dtype

        def full_size():
            return cuda.device_array(x.shape, dtype=dtype)

        # xmu = x - mean (rebuilt forward)
        xmu = full_size()
        _launch_flat(kernels, kernels.stage_subtract_channel, size, _flat(x),
                     mean, channels, inner, _flat(xmu))
        # xhat = xmu * invstd
        xhat = full_size()
        _launch_flat(kernels, kernels.stage_multiply_channel, size,
                     _flat(xmu), invstd, channels, inner, _flat(xhat))
        # step 9: dbeta = sum(dy)
        dbeta, _ = _reduce(kernels, kernels.sum, dy, dy, mean, mean)
        # step 8: dgamma = sum(dy * xhat)
        dgamma, _ = _reduce(kernels, kernels.sum_of_product, dy, xhat,
                            mean, mean)
        # dxhat = dy * gamma
        dxhat = full_size()
        _launch_flat(kernels, kernels.stage_multiply_channel, size,
                     _flat(dy), gamma, channels, inner, _flat(dxhat))
        # step 7: divar = sum(dxhat * xmu)
        divar, _ = _reduce(kernels, kernels.sum_of_product, dxhat, xmu,
                           mean, mean)
        # dxmu1 = dxhat * invstd
        dxmu1 = full_size()
        _launch_flat(kernels, kernels.stage_multiply_channel, size,
                     _flat(dxhat), invstd, channels, inner, _flat(dxmu1))
        # step 6: dsqrtvar = -invstd**2 * divar
        dsqrtvar = _new_channel_array(channels)
        _launch_channels(kernels, kernels.staged_dsqrtvar, channels,
                         invstd, divar, dsqrtvar)
        # step 5: dvar = 0.5 * invstd * dsqrtvar
        dvar = _new_channel_array(channels)
        _launch_channels(kernels, kernels.staged_dvar, channels,
                         invstd, dsqrtvar, dvar)
        # step 4: dsq = dvar / M, broadcast to full size
        dsq = full_size()
        _launch_flat(kernels, kernels.stage_channel_divided, size, dvar,
                     count, channels, inner, _flat(dsq))
        # step 3: dxmu2 = 2 * xmu * dsq
        dxmu2 = full_size()
        _launch_flat(kernels, kernels.stage_twice_product, size, _flat(xmu),
                     _flat(dsq), _flat(dxmu2))
        # step 2: dx1 = dxmu1 + dxmu2
        dx1 = full_size()
        _launch_flat(kernels, kernels.stage_add, size, _flat(dxmu1),
                     _flat(dxmu2), _flat(dx1))
        # step 2: dmu = -sum(dx1)
        dmu, _ = _reduce(kernels, kernels.negated_sum, dx1, dx1, mean, mean)
        # steps 1 and 0: out = dx1 + dmu / M
        _launch_flat(kernels, kernels.stage_add_channel_divided, size,
                     _flat(dx1), dmu, count, channels, inner, _flat(out))
        return dgamma, dbeta
