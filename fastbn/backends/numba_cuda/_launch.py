"""Launches of the CUDA backend: scratch, the views kernels take, the launch itself.

The layer between the contract functions (the package's ``__init__``) and
the kernels (:mod:`._builders`): the float64 scratch arrays each host thread
reuses, the flat and row views of device arrays that kernels take and
return, the launch of a full-size pass in either layout (:func:`_reduce`,
:func:`_elementwise`) or of a per-channel kernel (:func:`_per_channel`), and
the packing of per-channel parameters (:func:`_param_flags`).

Direct launches
---------------
numba-cuda's launch path re-derives, on every call, what an argument list
of known types needs (about 20 us, plus 4 us per array argument, measured on
an H200). After a kernel has been launched once through numba for a
signature, :func:`_launch` packs the arguments of later launches with the
same signature as numba does and calls the driver directly. Any failure to
set this up falls back to numba's own launch, for good. ``DIRECT_LAUNCH``
(an attribute of this module) turns it off; the simulator always launches
through numba.
"""

import threading

import numpy as np

from ._device import _SIMULATOR, cuda

MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1

DIRECT_LAUNCH = True
_DIRECT = {}
_scratch = threading.local()


def _ceil_div(numerator, denominator):
    return -(-numerator // denominator)


# ---------------------------------------------------------------------------
# Scratch and views
# ---------------------------------------------------------------------------

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
    :func:`._builders._build_storage`). Any other dtype is a TypeError: an integer
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


def _rows_of(block, rows=(0, 1)):
    """Rows of a 2-D ``(rows, C)`` device array as 1-D arrays.

    Built from the block's memory directly on a GPU (slicing a Numba device
    array costs about 25 us); sliced under the simulator.
    """
    if _SIMULATOR:
        return tuple(block[row] for row in rows)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    channels = block.shape[1]
    itemsize = block.dtype.itemsize
    row_bytes = channels * itemsize
    return tuple(
        DeviceNDArray((channels,), (itemsize,), block.dtype,
                      gpu_data=block.gpu_data.view(row * row_bytes, (row + 1) * row_bytes))
        for row in rows)


# ---------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------

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


def _per_channel(kernels, kernel, channels, *args):
    """Launch a one-thread-per-channel kernel."""
    threads = kernels.threads
    _launch(kernel, _channel_blocks(channels, threads), threads, *args)


# ---------------------------------------------------------------------------
# Per-channel parameters
# ---------------------------------------------------------------------------

def _param_flags(dtype, gamma, beta=None, last=False):
    """The flags of a per-channel kernel, one int: bit 0 float32 parameters
    (x float32 or 16-bit), bit 1 gamma given, bit 2 beta given, bit 3
    ``last`` (running statistics given, or training)."""
    return (int(np.dtype(dtype) != np.float64) | 2 * (gamma is not None)
            | 4 * (beta is not None) | 8 * bool(last))


def _or_dummy(array):
    """``array``, or a one-element scratch array in place of None (the kernels
    take an array; the flags say it is absent)."""
    return _scratch_array("dummy", (1,)) if array is None else array


def _mean_only(mean):
    """The parameters ``(mean, invstd, gamma, beta, flags)`` of a reduction
    that reads ``mean`` only."""
    dummy = _scratch_array("dummy", (1,))
    return (mean, dummy, dummy, dummy, 0)
