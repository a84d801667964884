"""Numba CUDA backend: ``@cuda.jit`` kernels on the canonical ``(A, C, B)`` view.

This backend is ``ON_DEVICE``. :mod:`fastbn.api` checks metadata only and
hands the kernels device arrays; everything per channel (sums into ``mean``
and ``invstd``, the cast of ``gamma``/``beta`` to ``x.dtype``, the update of
the running statistics) happens here, on the device. A call on device arrays
makes no host<->device copy and no synchronization: every launch goes to the
default stream and returns at once.

The package, by layer
---------------------
``__init__`` (this module)
    The module settings below, the launch geometry of a shape
    (:class:`_Layout`), and the kernel contract of :mod:`fastbn.backends`:
    each contract function picks its kernels and launches them in order.
    The staged backward is :func:`fastbn.backends._staged.backward` over
    this backend's launches (:class:`_StagedOps`).
:mod:`._launch`
    Per-thread float64 scratch arrays, the flat and row views that kernels
    take and return, the launch of a full-size pass in either layout or of a
    per-channel kernel, and direct launches through the driver.
:mod:`._builders`
    Every device function and kernel: block sums, loads and stores of each
    storage dtype, the reduction and elementwise passes in both layouts, and
    the per-channel kernels; built once per threads-per-block value.
:mod:`._device`
    ``numba.cuda`` outside the kernels: availability, the device's name,
    the simulator's lock, and the transfers ``to_device``, ``empty``,
    ``to_host``, ``is_device_array``.

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

The staged backward stays staged: one launch per full-size stage of the
graph, each a new array, and two per sum (partials, then one thread per
channel); the per-channel steps between them are one launch each, so that
nothing is copied to the host in the middle (19 launches, 22 with the ReLU).

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
handed to the kernels as its uint16 bit patterns (:func:`._launch._flat`),
and the kernels convert them with integer operations
(:func:`._builders._build_storage`). The kernels never take an integer
array for bfloat16: :func:`._launch._flat` refuses every dtype but the four.
For 16-bit storage the parameters (``gamma``, ``beta``, ``dgamma``,
``dbeta``) are float32, and so are the staged backward's full-size
intermediates.

Fused ReLU
----------
``relu=True`` makes the normalize pass store ``max(y, 0)`` (NaN stays NaN).
The backward kernels take the forward's ``beta`` and mask ``dy`` by
``y > 0``, with ``y`` rebuilt in the kernel by the forward's own device
function (``affine``) from the same per-channel scale and shift, so no mask
array exists and the launch counts do not change. The staged backward adds
the ReLU as two more full-size stages (``y``, then the masked ``dy``).

Block reductions use warp shuffles on a GPU and a shared-memory tree under
Numba's CUDA simulator (which has no shuffles); :func:`._builders._use_shuffles`
is the one place that picks, and :func:`._builders._build_bit_casts` the only
other place where the simulator and the GPU run different code.

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

Settings (attributes of this module, read at every call)
--------------------------------------------------------
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

import os
import warnings

import numpy as np

from fastbn.backends import _staged

from ._builders import _BUILD_LOCK, COEF_ROWS, WARP_SIZE, _build_kernels, _kind
# availability() and the transfers are part of the contract; the tests reach
# _SIMULATOR and _channel_blocks here too
from ._device import (_SIMULATOR, _device_name, _require, _serialized,  # noqa: F401
                      availability, cuda, empty, is_device_array, to_device, to_host)
from ._launch import (MAX_GRID_X, MAX_GRID_Y, _ceil_div, _channel_blocks,  # noqa: F401
                      _elementwise, _flat, _mean_only, _or_dummy, _param_flags, _per_channel,
                      _reduce, _rows_of, _scratch_array)

ON_DEVICE = True

DEFAULT_THREADS_PER_BLOCK = 256
ROWS_MIN_B = 32
TARGET_BLOCKS = 4096
MIN_ITEMS_PER_THREAD = 16


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
_KERNELS_BY_THREADS = {}
_LAYOUTS = {}


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
# Launch geometry
# ---------------------------------------------------------------------------

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


def _layout(shape, threads):
    key = (shape, threads, ROWS_MIN_B, TARGET_BLOCKS, MIN_ITEMS_PER_THREAD)
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _Layout(shape, threads)
    return layout


def _param_dtype(dtype):
    """gamma/beta/dgamma/dbeta dtype: float32 for 16-bit storage, else ``dtype``.

    It is also the compute dtype of the staged backward's intermediates.
    """
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype



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
    return "backward", _mean_only(mean)


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


# ---------------------------------------------------------------------------
# The staged backward: fastbn.backends._staged over this backend's launches
# ---------------------------------------------------------------------------

class _StagedOps:
    """The primitives of :func:`fastbn.backends._staged.backward` on the device.

    Full-size arrays are flat device arrays. Each full-size primitive is one
    elementwise launch into a new device array of the compute dtype; ``sum``
    and ``sum_of_product`` are a reduction and the per-channel ``staged_sum``
    (two launches); ``dsq_value`` and ``dmu_value`` are one per-channel
    launch each; ``results`` launches nothing. Nothing is copied to the host.

    Per-channel values are row indices. ``MEAN``, ``INVSTD``, ``GAMMA``,
    ``DSQ`` and ``DMU`` are rows of ``coef``, the coefficients the
    elementwise stages read (``[mean, invstd, gamma, dsq, dmu]``, filled by
    ``staged_channels``, ``staged_dsq`` and ``staged_dmu``). A sum is a row
    of ``sums`` (float64) and of ``totals`` (the same values in the
    parameter dtype, the rows that ``results`` returns). ``BETA`` names the
    forward's beta, which only the ReLU's ``normalize`` reads.

    Parameters
    ----------
    kernels : _Kernels
    x : device array ``(A, C, B)``
    mean, invstd, gamma, beta : device arrays ``(C,)``
        ``gamma`` and ``beta`` may be None.
    """

    MEAN, INVSTD, GAMMA, DSQ, DMU = range(COEF_ROWS)
    BETA = "beta"
    SUMS = 4        # the walk takes four sums: dbeta, dgamma, divar, sum(dx1)

    def __init__(self, kernels, x, mean, invstd, gamma, beta):
        self.kernels = kernels
        self.shape = tuple(x.shape)
        self.channels = self.shape[1]
        self.count = float(self.shape[0] * self.shape[2])
        self.layout = _layout(self.shape, kernels.threads)
        self.dtype = _param_dtype(x.dtype)
        self.x3 = x
        self.x = _flat(x)
        self.mean, self.invstd, self.gamma, self.beta = mean, invstd, gamma, beta
        self.flags = _param_flags(x.dtype, gamma)
        self.coef = _scratch_array("staged_coef", (COEF_ROWS, self.channels))
        self.sums = _scratch_array("staged_sums", (self.SUMS, self.channels))
        self.totals = cuda.device_array((self.SUMS, self.channels), dtype=self.dtype)
        self.sums_taken = 0

    def _stage(self, name, u, v):
        """A new full-size array: elementwise pass ``name`` of ``u`` and ``v``."""
        result = cuda.device_array(self.x.size, dtype=self.dtype)
        _elementwise(self.kernels, name, self.layout, u, v, self.coef, self.shape, result)
        return result

    def _sum(self, name, u, v):
        """The next row of ``sums`` and ``totals``: reduction ``name``, then
        ``staged_sum`` adds the partials of each channel."""
        row = self.sums_taken
        if row == self.SUMS:
            raise RuntimeError(f"the staged backward takes {self.SUMS} sums")
        self.sums_taken += 1
        partial = _reduce(self.kernels, name, self.layout, u, v, self.shape,
                          _mean_only(self.mean))
        _per_channel(self.kernels, self.kernels.staged_sum, self.channels, partial,
                     self.layout.width, row, self.sums, self.totals)
        return row

    def set_channels(self):
        """``coef = [mean, invstd, gamma, 0, 0]`` (gamma 1 when None)."""
        _per_channel(self.kernels, self.kernels.staged_channels, self.channels, self.mean,
                     self.invstd, _or_dummy(self.gamma), self.flags, self.coef)

    def normalize(self, x, mean, invstd, gamma, beta):
        # y of the inputs, by the contract's normalize (the forward's
        # arithmetic, from gamma * invstd: coef holds the two apart), stored
        # as the forward stores it (x's dtype), so that the mask's y > 0 is
        # the forward's out > 0 also where the store rounds a tiny y to 0
        y = cuda.device_array(self.shape, dtype=self.x3.dtype)
        normalize(self.x3, self.mean, self.invstd, self.gamma, self.beta, y)
        return _flat(y)

    def mask_positive(self, u, v):
        return self._stage("mask_positive", u, v)

    def subtract(self, u, p):
        return self._stage(f"subtract_p{p}", u, u)

    def multiply(self, u, p):
        return self._stage(f"multiply_p{p}", u, u)

    def broadcast(self, p):
        # the op ignores the values it is given; the pass takes its extent from x
        return self._stage(f"broadcast_p{p}", self.x, self.x)

    def twice_product(self, u, v):
        return self._stage("twice_product", u, v)

    def add(self, u, v):
        return self._stage("add", u, v)

    def add_into(self, u, p, out):
        _elementwise(self.kernels, f"add_p{p}", self.layout, u, u, self.coef, self.shape, out)

    def sum(self, u):
        return self._sum("sum", u, u)

    def sum_of_product(self, u, v):
        return self._sum("sum_of_product", u, v)

    def dsq_value(self, invstd, divar, count):
        _per_channel(self.kernels, self.kernels.staged_dsq, self.channels, count, self.sums,
                     divar, self.coef, invstd, self.DSQ)
        return self.DSQ

    def dmu_value(self, sum_dx1, count):
        _per_channel(self.kernels, self.kernels.staged_dmu, self.channels, count, self.sums,
                     sum_dx1, self.coef, self.DMU)
        return self.DMU

    def results(self, dgamma, dbeta):
        return _rows_of(self.totals, (dgamma, dbeta))


def backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False):
    """The staged (cs231n) backward graph, one launch per stage.

    The walk is :func:`fastbn.backends._staged.backward` over
    :class:`_StagedOps`. Every full-size stage writes a new device array of
    the compute dtype (``x.dtype``; float32 for 16-bit ``x``); the
    reductions accumulate in float64; ``dx`` is rounded once into ``out``.
    With ``relu`` the graph has one more node on top, walked back first:
    ``y`` rebuilt full size in ``x``'s dtype, as the forward stores it, then
    ``dy = where(y > 0, dy, 0)`` full size.
    ``eps`` is part of the contract's signature; ``invstd`` already
    includes it.

    Returns
    -------
    dgamma, dbeta : device arrays ``(C,)`` of the parameter dtype
    """
    kernels = _kernels()
    with _serialized():
        ops = _StagedOps(kernels, x, mean, invstd, gamma, beta)
        ops.set_channels()
        return _staged.backward(ops, _flat(dy), ops.x, ops.MEAN, ops.INVSTD, ops.GAMMA,
                                ops.BETA, relu, _flat(out), ops.count)
