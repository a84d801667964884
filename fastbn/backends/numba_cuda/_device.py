"""The device: numba.cuda, the simulator, availability and transfers.

Everything here talks to ``numba.cuda`` outside a kernel: whether the
backend can run (:func:`availability`, :func:`_require`), which device it
runs on, and the transfers of the ``ON_DEVICE`` contract (:func:`to_device`,
:func:`empty`, :func:`to_host`, :func:`is_device_array`).

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), a kernel runs
its CUDA threads as Python threads and, while it runs, replaces the global
``cuda`` of the module that defines it (:mod:`._builders`) by a fake module;
its kernel objects keep their launch configuration as mutable state. Calls
from several host threads are therefore serialized there
(:func:`_serialized`); a GPU needs no such lock.
"""

import contextlib
import threading
from importlib import util as _importlib_util

import numpy as np

try:
    from numba import cuda
    from numba.core import config as _numba_config

    _IMPORT_ERROR = ""
except Exception as import_error:  # ImportError, CudaSupportError, ...
    cuda = None
    _numba_config = None
    _IMPORT_ERROR = f"{type(import_error).__name__}: {import_error}"

_SIMULATOR = bool(_numba_config is not None and _numba_config.ENABLE_CUDASIM)

_SIMULATOR_LOCK = threading.RLock()
_NO_LOCK = contextlib.nullcontext()
_AVAILABILITY = []     # the first answer of availability(), kept


def _serialized():
    """A lock under the simulator, a no-op context on a GPU."""
    return _SIMULATOR_LOCK if _SIMULATOR else _NO_LOCK


# ---------------------------------------------------------------------------
# Availability
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
        with _serialized():
            found = bool(cuda.is_available())
    except Exception as error:  # a broken driver must not raise here
        return False, f"numba.cuda.is_available() failed: {error}"
    if not found:
        return False, "no CUDA GPU found (numba.cuda.is_available() is False)"
    return True, ""


def _require():
    """Raise RuntimeError when the backend cannot run here (asked once)."""
    if not _AVAILABILITY:
        _AVAILABILITY.append(availability())
    available, reason = _AVAILABILITY[0]
    if not available:
        raise RuntimeError(f"the cuda backend cannot run here: {reason}")


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
        array of dtype bfloat16, copied as its bits). A device object is
        returned as a Numba device array viewing the same memory: no copy,
        and no synchronization on the stream it names.

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
