"""Checks of user input that several modules share.

:mod:`fastbn.api` validates every call to the batch-norm functions; the
layers (:mod:`fastbn.nn`), folding (:mod:`fastbn.fold`), synchronized batch
norm (:mod:`fastbn.distributed`) and :mod:`fastbn.torch` check the same
things with the same words. Each check raises ``ValueError`` for a bad
value and ``TypeError`` for a bad dtype, with a message that names the
argument, and returns the value in the form the caller works with. Device
arrays are checked by metadata only: no value is read.
"""
import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def is_device_array(obj):
    """True for CUDA device arrays: anything with ``__cuda_array_interface__``,
    and Numba's device arrays (also the CUDA simulator's, which lack it)."""
    if isinstance(obj, np.ndarray):
        return False
    return (hasattr(obj, "__cuda_array_interface__")
            or bool(getattr(type(obj), "__cuda_ndarray__", False)))


def check_float_dtype(dtype, what):
    """float16, bfloat16 (ml_dtypes), float32 or float64; anything else is a TypeError.

    bfloat16 is recognised by name, so ml_dtypes is never imported here.
    """
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES and dtype.name != "bfloat16":
        raise TypeError(f"{what} must have dtype float16, bfloat16, float32 or float64, "
                        f"got dtype {dtype}")


def parameter_dtype(dtype):
    """The dtype of gamma, beta, dgamma and dbeta: float32 for 16-bit storage
    (as mixed-precision batch norm keeps them), ``dtype`` otherwise."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def channel_axis(axis, shape, what="input"):
    """``axis`` as a non-negative int, checked against ``shape`` (``what`` names the array)."""
    if type(axis) is not int and (isinstance(axis, (bool, np.bool_))
                                  or not isinstance(axis, numbers.Integral)):
        raise ValueError(f"axis must be an integer, got {axis!r}")
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {what} of shape {tuple(shape)}")
    return int(axis) % ndim


def canonical_shape(shape, axis):
    """The canonical ``(A, C, B)`` view of ``shape`` with its channels on ``axis``:
    ``A`` the product of the dimensions before the channel axis, ``C`` the
    channels, ``B`` the product of those after it (1 when there are none)."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def check_scalar(value, name, low, high):
    """``value`` as a float in ``[low, high]`` (NaN and bools are refused)."""
    if type(value) is not float:  # the common case skips the slower ABC checks
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a real number, got {value!r}")
        value = float(value)
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_eps(eps, training):
    """``eps`` as a float: ``> 0`` in training, ``>= 0`` in evaluation (PyTorch's rule)."""
    eps = check_scalar(eps, "eps", 0.0, math.inf)
    if training and eps == 0.0:
        raise ValueError(f"eps must be positive in training mode, got {eps}")
    return eps


def channel_param(value, channels, dtype, name, fill):
    """A host per-channel parameter as float64 ``(C,)`` holding values of ``dtype``."""
    if value is None:
        return np.full(channels, fill, dtype=np.float64)
    if type(value) is np.ndarray:
        array = value
    else:
        check_host(value, name)
        array = np.asarray(value)
    check_channel_metadata(array, channels, name, "biuf")
    # One copy when the values already have the parameter dtype (always a
    # new array: the cache keeps it).
    if array.dtype != dtype:
        array = array.astype(dtype)
    return array.astype(np.float64)


def check_host(value, name):
    if is_device_array(value):
        raise ValueError(f"{name} is a device array but the backend runs on the host")


def check_channel_metadata(array, channels, name, kinds):
    """Dtype kind and shape of a per-channel array (metadata only)."""
    dtype = np.dtype(array.dtype)
    if dtype.kind not in kinds:
        what = "real numbers" if "i" in kinds else "a floating dtype"
        raise TypeError(f"{name} must have {what}, got dtype {dtype}")
    if tuple(array.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                         f"got shape {tuple(array.shape)}")


def check_running(value, channels, name, writable):
    """Validate a host running statistic; return it (an ndarray when ``writable``)."""
    check_host(value, name)
    if writable and not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be an array (it is updated in place), "
                         f"got {type(value).__name__}")
    array = np.asarray(value)
    if tuple(array.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                         f"got shape {tuple(array.shape)}")
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype, got dtype {array.dtype}")
    if writable and not array.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place in training mode")
    return array


def check_backend_name(name):
    """A backend name that can run here, or None; fail early otherwise.

    Raises
    ------
    ValueError
        ``name`` is not a string, or no backend has that name.
    RuntimeError
        The backend exists but cannot run here (the reason is in the message).
    """
    from .registry import available_backends, backend_info

    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {name!r}; available "
                         f"backends: {', '.join(available_backends())}")
    if name in available_backends():
        return name
    info = backend_info().get(name)
    if info is None:
        raise ValueError(f"unknown backend {name!r}; available backends: "
                         f"{', '.join(available_backends())}")
    raise RuntimeError(f"backend {name!r} cannot run here: {info.get('reason', 'unavailable')}")


def check_comm(comm):
    """An mpi4py intracommunicator; ``None`` is ``MPI.COMM_WORLD`` (imports mpi4py)."""
    from mpi4py import MPI

    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py intracommunicator (e.g. MPI.COMM_WORLD), "
                        f"got {type(comm).__name__}")
    return comm
