"""The per-channel work that every CPU backend shares.

A CPU backend's fused kernels return the batch ``mean`` and biased ``var``;
turning them into ``invstd`` and updating the caller's running statistics in
place is the same few lines of NumPy for each of them, so it lives here once.
The CUDA backend does the same work in its own merge kernel, on the device.

Conventions (PyTorch's): ``momentum`` weighs the new batch, and the running
variance takes the unbiased batch variance ``var * M / (M - 1)``.
"""
import numpy as np


def finish_statistics(mean, var, count, eps, running_mean, running_var, momentum):
    """``invstd`` of the batch, and the running statistics updated in place.

    Parameters
    ----------
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased batch variance over ``count`` values per channel.
    count : int
        Values per channel, ``M = A * B`` (at least 2 in training).
    eps : float
    running_mean, running_var : ndarray of shape (C,) or None
        Writable float arrays, updated in place:
        ``running = (1 - momentum) * running + momentum * batch``.
    momentum : float

    Returns
    -------
    invstd : ndarray of float64, shape (C,)
        ``1 / sqrt(var + eps)``.
    """
    invstd = 1.0 / np.sqrt(var + eps)
    if running_mean is not None:
        keep = 1.0 - momentum
        unbiased_var = var * (count / (count - 1))
        running_mean[...] = keep * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = keep * running_var.astype(np.float64) + momentum * unbiased_var
    return invstd


def forward_train(fused_kernel, x, gamma, beta, eps, out, running_mean, running_var, momentum):
    """A training forward from a kernel that returns ``(mean, var)``.

    Parameters
    ----------
    fused_kernel : callable ``(x, gamma, beta, eps, out) -> (mean, var)``
        Statistics then normalization into ``out``.
    x, gamma, beta, eps, out, running_mean, running_var, momentum
        As in the kernel contract (:mod:`fastbn.backends`).

    Returns
    -------
    mean, invstd : ndarray of float64, shape (C,)
    """
    mean, var = fused_kernel(x, gamma, beta, eps, out)
    count = x.shape[0] * x.shape[2]
    invstd = finish_statistics(mean, var, count, eps, running_mean, running_var, momentum)
    return mean, invstd


def forward_eval(normalize, x, gamma, beta, running_mean, running_var, eps, out):
    """An evaluation forward: normalize with the running statistics.

    Returns
    -------
    mean, invstd : ndarray of float64, shape (C,)
        The running mean and ``1 / sqrt(running_var + eps)``, what the
        backward needs.
    """
    mean = np.asarray(running_mean, dtype=np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    normalize(x, mean, invstd, gamma, beta, out)
    return mean, invstd


_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _kernel_ready(array):
    """A native float32/float64 C-contiguous writable array a kernel may update directly."""
    return (type(array) is np.ndarray and array.dtype in _KERNEL_DTYPES
            and array.flags.c_contiguous and array.flags.writeable)


def running_arrays(running_mean, running_var, mean, invstd):
    """The running statistics as a compiled kernel takes them.

    Parameters
    ----------
    running_mean, running_var : ndarray of shape (C,) or None
        The caller's arrays.
    mean, invstd : ndarray of float64, shape (C,)
        Stand-ins passed when there are no running statistics (never written).

    Returns
    -------
    rm, rv : ndarray
        The caller's arrays when both are float32/float64 of one dtype and
        C-contiguous (updated in place by the kernel); otherwise float64
        copies, which :func:`write_back` copies into the caller's arrays.
    update : bool
        Whether there are running statistics to update.
    """
    if running_mean is None:
        return mean, invstd, False
    if (_kernel_ready(running_mean) and _kernel_ready(running_var)
            and running_mean.dtype == running_var.dtype):
        return running_mean, running_var, True
    return (np.ascontiguousarray(running_mean, dtype=np.float64),
            np.ascontiguousarray(running_var, dtype=np.float64), True)


def write_back(running_mean, running_var, rm, rv):
    """Copy float64 stand-ins made by :func:`running_arrays` back (no-op otherwise)."""
    if rm is not running_mean:
        running_mean[...] = rm
        running_var[...] = rv


def readable_running(running_mean, running_var):
    """Running statistics a kernel may read: float32/float64 C-contiguous arrays as
    they are, anything else as float64 copies."""
    if not (type(running_mean) is np.ndarray and running_mean.dtype in _KERNEL_DTYPES
            and running_mean.flags.c_contiguous):
        running_mean = np.ascontiguousarray(running_mean, dtype=np.float64)
    if not (type(running_var) is np.ndarray and running_var.dtype in _KERNEL_DTYPES
            and running_var.flags.c_contiguous):
        running_var = np.ascontiguousarray(running_var, dtype=np.float64)
    return running_mean, running_var


# The largest value that rounds to 0 when stored in each dtype (round to
# nearest even): half the smallest subnormal. float64 is stored as computed.
_STORED_AS_ZERO = {"float16": 2.0**-25, "bfloat16": 2.0**-134, "float32": 2.0**-150,
                   "float64": 0.0}


def relu_floor(storage_dtype):
    """The fused ReLU's mask threshold for a storage dtype.

    The forward stores ``max(y, 0)`` rounded once to the storage dtype, from
    ``y`` computed in a wider (or the same) dtype; the backward recomputes
    ``y`` by the same arithmetic and keeps ``dy`` where ``y > floor``. With
    ``floor`` the largest value that rounds to 0 in storage, that is exactly
    where the forward's stored output is positive: a tiny positive ``y`` that
    the store made 0 is masked too. (When ``y`` is computed in the storage
    dtype itself, ``y > floor`` and ``y > 0`` are the same test.)

    Parameters
    ----------
    storage_dtype : numpy dtype or str
        float16, bfloat16, float32 or float64.

    Returns
    -------
    float
    """
    return _STORED_AS_ZERO[np.dtype(storage_dtype).name]
