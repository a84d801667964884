"""The public batch-norm functions: validation, the canonical view, dispatch.

Everything a backend should not have to repeat lives here: input checks,
casting of the per-channel parameters, the ``(A, C, B)`` view, allocation
and checking of outputs, host/device transfers for device backends, and the
update of running statistics.
"""
import math
import numbers

import numpy as np

from . import registry
from .cache import BatchNormCache

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_METHODS = ("simplified", "staged")


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------

def _is_device_array(obj):
    """True for CUDA device arrays: anything with ``__cuda_array_interface__``,
    and Numba's device arrays (also the CUDA simulator's, which lack it)."""
    if isinstance(obj, np.ndarray):
        return False
    return (hasattr(obj, "__cuda_array_interface__")
            or bool(getattr(type(obj), "__cuda_ndarray__", False)))


def _resolve_backend(name, x):
    """The backend name and module for a call (``name=None``: the default)."""
    if name is None:
        name = "cuda" if _is_device_array(x) else registry.default_backend()
    elif not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {name!r}; available "
                         f"backends: {', '.join(registry.available_backends())}")
    module = registry.get_backend(name)
    if _is_device_array(x) and not module.ON_DEVICE:
        raise ValueError(f"x is a device array; backend {name!r} needs a host "
                         f"array (use backend='cuda' or copy x to the host)")
    return name, module


def _as_array(obj, module, what):
    """A NumPy array, or a device array for a device backend."""
    if _is_device_array(obj):
        if not module.ON_DEVICE:
            raise ValueError(f"{what} is a device array but the backend runs on the host")
        return module.to_device(obj)
    return np.asarray(obj)


def _check_float_dtype(dtype, what):
    if np.dtype(dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must have dtype float32 or float64, got dtype {np.dtype(dtype)}")


def _channel_axis(axis, shape):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"axis must be an integer, got {axis!r}")
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for input of shape {tuple(shape)}")
    return int(axis) % ndim


def _check_input(x, axis, what="x"):
    """Check dtype and shape of the main input; return (axis, A, C, B)."""
    _check_float_dtype(x.dtype, what)
    shape = tuple(x.shape)
    if len(shape) < 2:
        raise ValueError(f"{what} must have at least 2 dimensions (N, C, ...), got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{what} is empty: shape {shape}")
    axis = _channel_axis(axis, shape)
    return axis, math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _check_scalar(value, name, low, high):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _host_values(obj, module):
    """Host NumPy values of a per-channel argument (device arrays are copied)."""
    if _is_device_array(obj):
        return module.to_host(module.to_device(obj))
    return np.asarray(obj)


def _channel_param(value, channels, dtype, name, module, fill):
    """A per-channel parameter as float64 ``(C,)`` holding values of ``dtype``."""
    if value is None:
        return np.full(channels, fill, dtype=np.float64)
    array = _host_values(value, module)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be real numbers, got dtype {array.dtype}")
    if array.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                         f"got shape {array.shape}")
    return array.astype(dtype).astype(np.float64)


def _check_running(value, channels, name, module, writable):
    """Validate a running statistic; return its host float64 values."""
    if writable and not (isinstance(value, np.ndarray) or _is_device_array(value)):
        raise ValueError(f"{name} must be an array (it is updated in place), "
                         f"got {type(value).__name__}")
    array = _host_values(value, module)
    if array.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                         f"got shape {array.shape}")
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype, got dtype {array.dtype}")
    if writable and isinstance(value, np.ndarray) and not value.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place in training mode")
    return array.astype(np.float64)


def _write_channel(target, values, module):
    """Write per-channel float64 ``values`` into ``target`` in place."""
    if isinstance(target, np.ndarray):
        target[...] = values
    else:
        device = module.to_device(target)
        device.copy_to_device(np.ascontiguousarray(values, dtype=device.dtype))


def _check_out(out, shape, dtype, module, inputs):
    """Validate a caller's output buffer; return it (or None)."""
    if out is None:
        return None
    if _is_device_array(out):
        if not module.ON_DEVICE:
            raise ValueError("out is a device array but the backend runs on the host")
        out = module.to_device(out)
        contiguous = out.is_c_contiguous()
    elif isinstance(out, np.ndarray):
        contiguous = out.flags.c_contiguous and out.flags.writeable
    else:
        raise ValueError(f"out must be an array, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or np.dtype(out.dtype) != np.dtype(dtype):
        raise ValueError(f"out must have shape {tuple(shape)} and dtype {np.dtype(dtype)}, "
                         f"got shape {tuple(out.shape)} and dtype {np.dtype(out.dtype)}")
    if not contiguous:
        raise ValueError("out must be a writable C-contiguous array")
    if isinstance(out, np.ndarray) and any(
            isinstance(a, np.ndarray) and np.may_share_memory(out, a) for a in inputs):
        raise ValueError("out must not overlap the inputs")
    return out


def _view3(array, A, C, B, module):
    """The canonical ``(A, C, B)`` view (a copy only for non-contiguous input)."""
    if module.ON_DEVICE and not isinstance(array, np.ndarray):
        if not array.is_c_contiguous():
            raise ValueError("device arrays must be C-contiguous")
        return array.reshape(A, C, B)
    return np.ascontiguousarray(array).reshape(A, C, B)


class _Call:
    """Moves arrays between the caller and a backend's kernels.

    For host backends every method is the identity; for a device backend it
    copies host inputs to the device and results back to the host when the
    caller passed host arrays.
    """

    def __init__(self, module, x):
        self.module = module
        self.on_device = module.ON_DEVICE
        self.host_caller = not _is_device_array(x)

    def array3(self, array, A, C, B):
        if self.on_device:
            if isinstance(array, np.ndarray):
                array = np.ascontiguousarray(array)
            array = self.module.to_device(array)
        return _view3(array, A, C, B, self.module)

    def channel(self, values):
        values = np.ascontiguousarray(values, dtype=np.float64)
        return self.module.to_device(values) if self.on_device else values

    def host(self, values):
        return self.module.to_host(values) if self.on_device else values

    def output(self, out, shape, dtype):
        """(user-facing result, kernel's 3-D-reshapeable buffer)."""
        if not self.on_device:
            result = np.empty(shape, dtype=dtype) if out is None else out
            return result, result
        if self.host_caller:
            result = np.empty(shape, dtype=dtype) if out is None else out
            return result, self.module.empty(tuple(shape), np.dtype(dtype))
        result = self.module.empty(tuple(shape), np.dtype(dtype)) if out is None else out
        return result, result

    def finish(self, result, buffer):
        """Copy the kernel's buffer into the host result when they differ."""
        if result is not buffer:
            result[...] = self.module.to_host(buffer).reshape(result.shape)
        return result

    def per_channel_result(self, values, dtype):
        """A per-channel result of ``dtype`` where the caller's arrays live."""
        values = np.asarray(values, dtype=dtype)
        if self.on_device and not self.host_caller:
            return self.module.to_device(values)
        return values


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------

def batchnorm_forward(x, gamma=None, beta=None, *, training=True,
                      running_mean=None, running_var=None, momentum=0.1,
                      eps=1e-5, axis=1, backend=None, out=None):
    """Batch normalization forward pass.

    ``out = (x - mean) / sqrt(var + eps) * gamma + beta`` per channel, with
    the statistics taken over every axis but ``axis``.

    Parameters
    ----------
    x : array_like, float32 or float64, ``ndim >= 2``
        Input, e.g. ``(N, D)``, ``(N, C, H, W)`` or channels-last
        ``(N, H, W, C)`` with ``axis=-1``. May be non-contiguous or
        read-only; never modified. A CUDA device array (anything with
        ``__cuda_array_interface__``) selects the ``cuda`` backend.
    gamma, beta : array_like of shape (C,), optional
        Scale and shift, cast to ``x.dtype``; ``None`` means ones / zeros.
    training : bool, default True
        True: normalize with the batch statistics and update the running
        statistics when given. False: normalize with ``running_mean`` and
        ``running_var`` (both required).
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics, updated in place in training mode (PyTorch's
        convention): ``running = (1 - momentum) * running + momentum * batch``,
        with the unbiased batch variance for ``running_var``.
    momentum : float in [0, 1], default 0.1
        Weight of the new batch in the running statistics.
    eps : float >= 0, default 1e-5
        Added to the variance inside the square root.
    axis : int, default 1
        The channel axis.
    backend : str, optional
        A name from :func:`fastbn.available_backends`; default: the process
        default (see :func:`fastbn.set_backend`).
    out : ndarray, optional
        C-contiguous array of ``x``'s shape and dtype to write into.

    Returns
    -------
    out : ndarray
        The normalized output, ``x.dtype``, ``x.shape``.
    cache : BatchNormCache
        What :func:`batchnorm_backward` needs.

    Raises
    ------
    TypeError
        ``x`` is not float32/float64.
    ValueError
        Bad shape, axis, parameter shape, ``eps``, ``momentum``, ``out``,
        missing running statistics in evaluation mode, or a single value
        per channel in training mode.
    RuntimeError
        The backend is known but cannot run here.
    """
    name, module = _resolve_backend(backend, x)
    x_array = _as_array(x, module, "x")
    axis, A, C, B = _check_input(x_array, axis)
    dtype = np.dtype(x_array.dtype)
    eps = _check_scalar(eps, "eps", 0.0, math.inf)
    momentum = _check_scalar(momentum, "momentum", 0.0, 1.0)
    gamma64 = _channel_param(gamma, C, dtype, "gamma", module, 1.0)
    beta64 = _channel_param(beta, C, dtype, "beta", module, 0.0)
    training = bool(training)
    count = A * B
    if training and count < 2:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(x_array.shape)}")
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError("give both running_mean and running_var, or neither")
        track = running_mean is not None
    else:
        if running_mean is None or running_var is None:
            raise ValueError("training=False needs running_mean and running_var")
        track = False
    if running_mean is not None:
        running_mean64 = _check_running(running_mean, C, "running_mean", module, track)
        running_var64 = _check_running(running_var, C, "running_var", module, track)
    out = _check_out(out, x_array.shape, dtype, module, (x_array,))

    call = _Call(module, x)
    x3 = call.array3(x_array, A, C, B)
    result, buffer = call.output(out, x_array.shape, dtype)
    out3 = _view3(buffer, A, C, B, module)
    if training:
        mean, var = module.forward_train(x3, call.channel(gamma64), call.channel(beta64),
                                         eps, out3)
        mean_host = np.asarray(call.host(mean), dtype=np.float64)
        var_host = np.asarray(call.host(var), dtype=np.float64)
        invstd = 1.0 / np.sqrt(var_host + eps)
        if track:
            # PyTorch's convention: momentum weighs the new batch, and the
            # running variance takes the unbiased batch variance.
            unbiased_var = var_host * (count / (count - 1))
            _write_channel(running_mean,
                           (1.0 - momentum) * running_mean64 + momentum * mean_host, module)
            _write_channel(running_var,
                           (1.0 - momentum) * running_var64 + momentum * unbiased_var, module)
        mean_cached = mean
        invstd_cached = call.channel(invstd)
    else:
        mean_cached = call.channel(running_mean64)
        invstd_cached = call.channel(1.0 / np.sqrt(running_var64 + eps))
        module.normalize(x3, mean_cached, invstd_cached, call.channel(gamma64),
                         call.channel(beta64), out3)
    result = call.finish(result, buffer)
    cache = BatchNormCache(x, mean_cached, invstd_cached, gamma64, eps, axis, training, name)
    return result, cache


def batchnorm_backward(dout, cache, *, method="simplified", out=None):
    """Batch normalization backward pass.

    Parameters
    ----------
    dout : array_like
        Upstream gradient, same shape and dtype as the forward input.
    cache : BatchNormCache
        From :func:`batchnorm_forward`; the backward runs on its backend.
    method : {"simplified", "staged"}, default "simplified"
        ``"simplified"``: the closed form
        ``dx = gamma * invstd * (dout - mean(dout) - xhat * mean(dout * xhat))``
        (one reduction pass, one elementwise pass). ``"staged"``: the
        computational graph walked back stage by stage, one full-size
        intermediate per stage, as in the cs231n notebooks. In evaluation
        mode both give ``dx = dout * gamma / sqrt(running_var + eps)``.
    out : ndarray, optional
        C-contiguous array of ``dout``'s shape and dtype for ``dx``.

    Returns
    -------
    dx : ndarray
        Gradient with respect to ``x``.
    dgamma, dbeta : ndarray of shape (C,)
        Gradients with respect to ``gamma`` and ``beta``, ``x.dtype``.

    Raises
    ------
    ValueError
        Unknown ``method``, ``dout`` not matching the cache, or a bad ``out``.
    """
    if not isinstance(cache, BatchNormCache):
        raise ValueError(f"cache must be the BatchNormCache returned by batchnorm_forward, "
                         f"got {type(cache).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be 'simplified' or 'staged', got {method!r}")
    module = registry.get_backend(cache.backend)
    dout_array = _as_array(dout, module, "dout")
    x = cache.x
    x_array = module.to_device(x) if _is_device_array(x) else np.asarray(x)
    shape, dtype = tuple(x_array.shape), np.dtype(x_array.dtype)
    if tuple(dout_array.shape) != shape or np.dtype(dout_array.dtype) != dtype:
        raise ValueError(f"dout must have the forward input's shape {shape} and dtype {dtype}, "
                         f"got shape {tuple(dout_array.shape)} and dtype "
                         f"{np.dtype(dout_array.dtype)}")
    axis = cache.axis
    A, C, B = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    out = _check_out(out, shape, dtype, module, (dout_array, x_array))

    call = _Call(module, dout)
    dy3 = call.array3(dout_array, A, C, B)
    x3 = call.array3(x_array, A, C, B)
    gamma = call.channel(cache.gamma)
    result, buffer = call.output(out, shape, dtype)
    dx3 = _view3(buffer, A, C, B, module)
    if not cache.training:
        # Evaluation mode: mean and invstd are constants, dx = dout * gamma * invstd.
        dbeta, dgamma = module.backward_reduce(dy3, x3, cache.mean, cache.invstd)
        zeros = call.channel(np.zeros(C))
        module.normalize(dy3, zeros, cache.invstd, gamma, zeros, dx3)
    elif method == "simplified":
        dbeta, dgamma = module.backward_train(dy3, x3, cache.mean, cache.invstd, gamma, dx3)
    else:
        dgamma, dbeta = module.backward_staged(dy3, x3, cache.mean, cache.invstd, gamma,
                                               cache.eps, dx3)
    result = call.finish(result, buffer)
    dgamma = call.per_channel_result(call.host(dgamma), dtype)
    dbeta = call.per_channel_result(call.host(dbeta), dtype)
    return result, dgamma, dbeta
