"""PyTorch tensors as the NumPy arrays fastbn's kernels take, and back.

Shared by :mod:`fastbn.torch` and its synchronized batch norm
(``fastbn/_torch_sync.py``); see :mod:`fastbn.torch` for how each kind of
tensor reaches the kernels. Importing this module imports torch.
"""

import collections
import ctypes
import os
import threading
import weakref

import numpy as np
import torch

from . import registry

# NumPy can view these tensor dtypes without a copy (bfloat16 through its bits).
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# NumPy's dtype for each tensor dtype it can allocate.
NUMPY_ITEMS = {torch.float64: np.float64, torch.float32: np.float32,
                torch.float16: np.float16}
# The dtype of gamma/beta for each input dtype: float32 for 16-bit storage.
PARAM_DTYPES = {torch.float64: np.dtype(np.float64), torch.float32: np.dtype(np.float32),
                 torch.float16: np.dtype(np.float32), torch.bfloat16: np.dtype(np.float32)}
# Per-channel tensors the host functions can use as they are.
CHANNEL_DTYPES = (torch.float64, torch.float32, torch.float16)


def numpy_dtype(dtype):
    """The NumPy dtype of a kernel dtype (bfloat16: ``ml_dtypes.bfloat16``)."""
    if dtype == torch.bfloat16:
        import ml_dtypes  # the bfloat16 extra; imported only for bfloat16 tensors
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(NUMPY_ITEMS[dtype])


# --------------------------------------------------------------------------
# Tensors as arrays
# --------------------------------------------------------------------------

def kernel_layout(tensor):
    """(the tensor the kernels read, its permutation to memory order, channel axis).

    A contiguous tensor is read as it is (axis 1); a channels-last one as
    its memory order, channels last (axis -1); anything else is copied once
    into the contiguous layout. Works on fake tensors too (metadata only).
    """
    if tensor.is_contiguous():
        return tensor, None, 1
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor, (0, 2, 3, 1), -1
    if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        return tensor, (0, 2, 3, 4, 1), -1
    return tensor.contiguous(), None, 1


def like_layout(tensor, permutation):
    """``tensor`` with the memory layout that ``permutation`` stands for (a copy if needed)."""
    if permutation is None:
        return tensor.contiguous()
    if len(permutation) == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor.contiguous(memory_format=torch.channels_last_3d)


def tensor_array(tensor, permutation=None):
    """The array the kernels get for a full-size tensor, viewing its memory.

    A CPU tensor gives a NumPy view (bfloat16: ``ml_dtypes.bfloat16`` over
    the same bits), a CUDA tensor the tensor itself (read through
    ``__cuda_array_interface__``), permuted to memory order.
    """
    if permutation is not None:
        tensor = tensor.permute(permutation)
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        if tensor.dtype == torch.bfloat16:
            raise TypeError("bfloat16 CUDA tensors are not supported "
                            "(__cuda_array_interface__ has no bfloat16); use float16")
        return tensor
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes  # the bfloat16 extra; imported only for bfloat16 tensors
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def check_tensor(input):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"fastbn.torch runs on CPU and CUDA tensors, got a tensor on "
                         f"{input.device}; move it with .cpu() or .cuda()")
    if input.dtype not in KERNEL_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, "
                        f"got dtype {input.dtype}")


def channel_array(tensor):
    """A per-channel tensor as the functions take it (None stays None)."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        return tensor
    if tensor.dtype not in CHANNEL_DTYPES:
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def updated_running(tensor, input):
    """(a copy of a running statistic for the kernels to update, its array).

    ``None`` gives an empty tensor (the operator's outputs are tensors) and
    no array. The copy has the statistic's dtype, float32 for bfloat16.
    """
    if tensor is None:
        return input.new_empty((0,)), None
    dtype = tensor.dtype if tensor.dtype in CHANNEL_DTYPES else torch.float32
    copy = tensor.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return copy, channel_array(copy)


def backend_name(backend, input):
    """The backend a call runs on: ``backend``, else ``cuda`` for CUDA tensors,
    else the process default at the time of the call."""
    if backend:
        return backend
    return "cuda" if input.device.type == "cuda" else registry.default_backend()


def param_dtype(input):
    return torch.float32 if input.element_size() == 2 else input.dtype


class CudaOrder:
    """Orders the cuda backend's work (legacy default stream) with PyTorch's current stream.

    On the legacy default stream nothing needs doing. On another stream, wait
    for it before the call and for the device after it (see the module notes).
    """

    def __init__(self, tensor):
        self.stream = None
        if tensor.device.type == "cuda":
            stream = torch.cuda.current_stream(tensor.device)
            if stream.cuda_stream != 0:
                self.stream = stream

    def __enter__(self):
        if self.stream is not None:
            self.stream.synchronize()
        return self

    def __exit__(self, *exc_info):
        if self.stream is not None:
            torch.cuda.synchronize(self.stream.device)


def empty_like(source):
    """An uninitialized tensor with ``source``'s shape, dtype, strides and device.

    On the CPU its memory comes from NumPy (:func:`host_memory`), which asks
    the kernel for transparent huge pages for large arrays (``madvise``):
    the first writes into a fresh 100 MB output then fault 512 times less
    often than into memory from PyTorch's allocator, and the faults cost
    more than the batch norm itself (on a 2-core Xeon, allocating and
    filling (32, 256, 56, 56) float32 takes 21 ms from PyTorch, 7 ms from
    NumPy, 2 ms in place). The strides are ``torch.empty_like``'s, so the
    result matches the fake implementation's, and the tensor is no view
    (autograd lets a model modify it in place). bfloat16, which NumPy
    cannot hand over, and device tensors come from PyTorch.
    """
    if source.device.type != "cpu" or source.dtype == torch.bfloat16:
        return torch.empty_like(source)
    strides = torch.empty_like(source, device="meta").stride()
    # NumPy array of memory-order shape, then transposed to the logical order
    order = sorted(range(source.dim()), key=lambda axis: -strides[axis])
    memory = host_memory([source.shape[axis] for axis in order], NUMPY_ITEMS[source.dtype])
    output = torch.from_numpy(memory.transpose(np.argsort(order)))
    if output.stride() != strides:   # size-1 axes: any stride will do, keep PyTorch's
        return torch.empty_like(source)
    return output


def new_output(source, permutation):
    """``(tensor, array)``: an uninitialized CPU tensor for the result of a call
    on ``source``, and the array the kernels write (its memory, in memory order).

    ``source`` is contiguous (``permutation`` None) or channels-last (its
    memory order given by ``permutation``); the result has the same layout,
    its memory from :func:`host_memory` (see :func:`empty_like` for why),
    with no meta tensor or stride sort on the way: what the eager path pays
    per call. bfloat16, which NumPy cannot hand over, comes from PyTorch.
    """
    item = NUMPY_ITEMS.get(source.dtype)
    if item is None:
        output = torch.empty_like(source)
        return output, tensor_array(output, permutation)
    if permutation is None:
        memory = host_memory(source.shape, item)
        return torch.from_numpy(memory), memory
    memory = host_memory([source.shape[axis] for axis in permutation], item)
    return torch.from_numpy(memory).permute(INVERSE[len(permutation)]), memory


# --------------------------------------------------------------------------
# Output memory kept for reuse
# --------------------------------------------------------------------------
# A large new array is a fresh mapping: its first writes fault its pages in,
# and with transparent huge pages requested (NumPy's madvise) a fault may
# wait while the kernel compacts memory. In a training step, where every
# layer's output is new, that cost more than the batch norm itself and
# varied from step to step: in ResNet-50 (batch 32, 224x224, float32) on a
# 2-core Zen 4, the forwards at (32, 256, 56, 56) took 76-383 ms per step.
# The same shapes come back every step, so the memory of large outputs that
# nothing references any more is kept (up to POOL_KEEP_BYTES, the least
# recently freed dropped first) and handed out again for the same size.
#
# A block is a NumPy array that owns the memory; the pool holds it. What is
# handed out is an array over a ctypes view of the block's memory: every
# array and tensor made from it (views, transposes, ``torch.from_numpy``)
# references that ctypes object, so when it is collected nothing can reach
# the memory any more, and the block returns to the pool.

POOL_MIN_BYTES = 1 << 20   # smaller arrays come from malloc's own free lists


def _pool_keep_bytes():
    """``FASTBN_OUTPUT_POOL`` (bytes; 0 keeps nothing), else an eighth of
    the physical memory."""
    setting = os.environ.get("FASTBN_OUTPUT_POOL")
    if setting is not None:
        try:
            return max(int(setting), 0)
        except ValueError:
            raise ValueError(f"FASTBN_OUTPUT_POOL must be a number of bytes, got {setting!r}") \
                from None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
    except (AttributeError, OSError, ValueError):
        return 0


POOL_KEEP_BYTES = _pool_keep_bytes()
# Free blocks by size, least recently freed size first, and their total
# bytes; blocks freed but not yet filed (see _release).
_FREE = collections.OrderedDict()
_FREE_BYTES = [0]
_FREED = collections.deque()
_POOL_LOCK = threading.Lock()


def host_memory(shape, dtype):
    """An uninitialized C-contiguous NumPy array: from NumPy, or for at least
    POOL_MIN_BYTES a free block of the same size kept from an earlier
    output (see above)."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    if nbytes < POOL_MIN_BYTES or POOL_KEEP_BYTES == 0:
        return np.empty(shape, dtype)
    with _POOL_LOCK:
        _file_freed()
        blocks = _FREE.get(nbytes)
        block = blocks.pop() if blocks else None
        if block is not None:
            _FREE_BYTES[0] -= nbytes
            if not blocks:
                del _FREE[nbytes]
    if block is None:
        block = np.empty(nbytes, np.uint8)
    owner = (ctypes.c_char * nbytes).from_address(block.ctypes.data)
    weakref.finalize(owner, _release, block).atexit = False
    return np.frombuffer(owner, dtype).reshape(shape)


def _release(block):
    """A block that no array uses any more: filed now, or by the next call
    that holds the lock. (This runs whenever the last view of an output is
    collected, in any thread, possibly while this thread holds the lock:
    it never waits for it.)"""
    _FREED.append(block)
    if _POOL_LOCK.acquire(blocking=False):
        try:
            _file_freed()
        finally:
            _POOL_LOCK.release()


def _file_freed():
    """File the freed blocks (the lock held), dropping the least recently
    freed ones beyond POOL_KEEP_BYTES."""
    while _FREED:
        block = _FREED.popleft()
        nbytes = block.nbytes
        if nbytes > POOL_KEEP_BYTES:
            continue
        while _FREE and _FREE_BYTES[0] + nbytes > POOL_KEEP_BYTES:
            size = next(iter(_FREE))
            blocks = _FREE[size]
            blocks.pop(0)
            _FREE_BYTES[0] -= size
            if not blocks:
                del _FREE[size]
        _FREE.setdefault(nbytes, []).append(block)
        _FREE.move_to_end(nbytes)
        _FREE_BYTES[0] += nbytes


def forget_pool():
    """Drop every kept block (their memory goes back to the system)."""
    with _POOL_LOCK:
        _FREED.clear()
        _FREE.clear()
        _FREE_BYTES[0] = 0


def _pool_after_fork():
    # a child must not wait on a lock some parent thread held at the fork,
    # nor keep copies of the parent's free blocks
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _FREED.clear()
    _FREE.clear()
    _FREE_BYTES[0] = 0


os.register_at_fork(after_in_child=_pool_after_fork)


def host_view(tensor, permutation=None):
    """:func:`array` of a CPU tensor, with no ``detach`` where none is needed."""
    if tensor.dtype == torch.bfloat16:
        return tensor_array(tensor, permutation)
    if tensor.requires_grad:
        tensor = tensor.detach()
    if permutation is not None:
        tensor = tensor.permute(permutation)
    return tensor.numpy()


def host_param(tensor, channels, dtype, fill, name):
    """A weight or bias as the host kernels take it: float64 ``(C,)`` holding
    the values rounded to ``dtype`` (a NumPy dtype: the input's, float32 for
    16-bit input); ``None`` gives ``fill``. As :func:`fastbn.batchnorm_forward`
    checks it (NumPy's conversions: cheaper than PyTorch's on ``C`` values)."""
    if tensor is None:
        return np.full(channels, fill, dtype=np.float64)
    if tensor.dtype in CHANNEL_DTYPES:
        array = channel_view(tensor)
    else:
        if tensor.is_complex():
            raise TypeError(f"{name} must have real numbers, got dtype {tensor.dtype}")
        array = tensor.detach().to(torch.float32).numpy()
    if array.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                         f"got shape {array.shape}")
    if array.dtype != dtype:
        array = array.astype(dtype)
    return array.astype(np.float64)


# NumPy views of per-channel CPU tensors, by the tensor's id. A model passes
# the same weight, bias and running statistics on every call, and a view
# made anew (detach, Tensor.numpy) costs several microseconds. An entry is
# (a weak reference to the tensor, the address of the memory it viewed, the
# view): it is used only for that same live tensor over the same memory, so
# a reused id, ``tensor.data = ...`` and ``set_`` make a new view.
_VIEWS = {}


def channel_view(tensor):
    """A NumPy view of a per-channel CPU tensor of a dtype NumPy can view
    (:data:`CHANNEL_DTYPES`), kept while the tensor and its memory live."""
    entry = _VIEWS.get(id(tensor))
    if (entry is not None and entry[0]() is tensor and entry[1] == tensor.data_ptr()
            and entry[2].shape == tensor.shape):
        return entry[2]
    array = tensor.detach().numpy()
    if len(_VIEWS) >= 1024:
        _VIEWS.clear()
    _VIEWS[id(tensor)] = (weakref.ref(tensor), tensor.data_ptr(), array)
    return array


# The permutation back from memory order (channels last) to (N, C, ...).
INVERSE = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}


def as_tensor(array, device):
    """A tensor owning ``array``'s values (a CPU copy, or a view of a device array)."""
    if device.type == "cuda":
        return torch.as_tensor(array, device=device)
    return torch.from_numpy(np.array(array, dtype=np.float64, copy=True))
