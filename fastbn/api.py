"""The public batch-norm functions: validation, the canonical view, dispatch.

Everything a backend should not have to repeat lives here: input checks,
the ``(A, C, B)`` view, allocation and checking of outputs, and the
host/device transfers of a device call. Per-channel work (turning sums into
``mean``/``invstd``, updating the running statistics in place) is the
backend's, done where the data lives: the CPU backends share one host
implementation (:mod:`fastbn.backends._host`), the CUDA backend does it in a
kernel. For device arrays this module checks metadata only (shape, dtype,
strides) and never reads a value.
"""

import numpy as np

from . import registry
from .cache import BatchNormCache
from .validation import (canonical_shape, channel_axis, channel_param, check_channel_metadata,
                         check_eps, check_float_dtype, check_running, check_scalar,
                         is_device_array, parameter_dtype)

_METHODS = ("simplified", "staged")
_ACTIVATIONS = (None, "relu")


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _is_host(obj):
    """True unless ``obj`` lives on a device (lists and scalars live on the host)."""
    return not is_device_array(obj)


def _resolve_backend(name, x):
    """The backend name and module for a call (``name=None``: the default)."""
    if name is None:
        name = "cuda" if is_device_array(x) else registry.default_backend()
    elif not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {name!r}; available "
                         f"backends: {', '.join(registry.available_backends())}")
    module = registry.get_backend(name)
    if is_device_array(x) and not module.ON_DEVICE:
        raise ValueError(f"x is a device array; backend {name!r} needs a host "
                         f"array (use backend='cuda' or copy x to the host)")
    return name, module


def _as_array(obj, module, what):
    """A NumPy array, or a device array for a device backend."""
    if is_device_array(obj):
        if not module.ON_DEVICE:
            raise ValueError(f"{what} is a device array but the backend runs on the host")
        return module.to_device(obj)
    return np.asarray(obj)


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation


def _check_input(x, axis, what="x"):
    """Check dtype and shape of the main input; return (axis, A, C, B)."""
    check_float_dtype(x.dtype, what)
    shape = tuple(x.shape)
    if len(shape) < 2:
        raise ValueError(f"{what} must have at least 2 dimensions (N, C, ...), got shape {shape}")
    axis = channel_axis(axis, shape)
    if shape[axis] == 0:
        raise ValueError(f"{what} has no channels: shape {shape}")
    # An empty batch (C > 0, no values per channel) is not an error: PyTorch's rule.
    return (axis,) + canonical_shape(shape, axis)


def _check_out(out, shape, dtype, module, inputs):
    """Validate a caller's output buffer; return it (or None)."""
    if out is None:
        return None
    if is_device_array(out):
        if not module.ON_DEVICE:
            raise ValueError("out is a device array but the backend runs on the host")
        out = module.to_device(out)
        contiguous = out.is_c_contiguous()
    elif isinstance(out, np.ndarray):
        flags = out.flags
        contiguous = flags.c_contiguous and flags.writeable
    else:
        raise ValueError(f"out must be an array, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or np.dtype(out.dtype) != dtype:
        raise ValueError(f"out must have shape {tuple(shape)} and dtype {np.dtype(dtype)}, "
                         f"got shape {tuple(out.shape)} and dtype {np.dtype(out.dtype)}")
    if not contiguous:
        raise ValueError("out must be a writable C-contiguous array")
    if isinstance(out, np.ndarray):
        for array in inputs:
            if isinstance(array, np.ndarray) and np.may_share_memory(out, array):
                raise ValueError("out must not overlap the inputs")
    return out


def _empty_batch_channels(channels, dtype, module, on_device):
    """Two per-channel zero arrays for an empty batch: its ``mean``/``invstd``
    (never read: an empty batch has no element to normalize) or its
    ``dgamma``/``dbeta``. On the device they are copied over from the host:
    ``2 * C`` values, the one host-to-device copy of such a call."""
    zeros = (np.zeros(channels, dtype=dtype), np.zeros(channels, dtype=dtype))
    if on_device:
        return tuple(module.to_device(array) for array in zeros)
    return zeros


def _view3(array, A, C, B):
    """The canonical ``(A, C, B)`` view of a host array (a copy only if non-contiguous)."""
    return np.ascontiguousarray(array).reshape(A, C, B)


class _Device:
    """The transfers of one call to a device backend.

    Device arrays are wrapped, never copied, and their values are never read
    on the host: only metadata is checked. Host arrays given to a device call
    are copied to the device once, and what the call writes (outputs, running
    statistics) is copied back once, at :meth:`finish`.
    """

    def __init__(self, module):
        self.module = module
        self.copy_back = []   # (host array, device array) pairs

    def array3(self, array, A, C, B):
        """A C-contiguous ``(A, C, B)`` device view of a full-size input."""
        if isinstance(array, np.ndarray):
            array = self.module.to_device(np.ascontiguousarray(array))
        if not array.is_c_contiguous():
            raise ValueError("device arrays must be C-contiguous")
        return array.reshape(A, C, B)

    def channel(self, value, channels, name, kinds, writable=False):
        """A per-channel argument on the device (``None`` stays ``None``)."""
        if value is None:
            return None
        if not is_device_array(value):
            host = (check_running(value, channels, name, True) if writable
                    else np.asarray(value))
            check_channel_metadata(host, channels, name, kinds)
            device = self.module.to_device(np.ascontiguousarray(host))
            if writable:
                self.copy_back.append((host, device))
            return device
        device = self.module.to_device(value)
        check_channel_metadata(device, channels, name, kinds)
        if writable and not device.is_c_contiguous():
            raise ValueError(f"{name} must be C-contiguous (it is updated in place)")
        return device

    def output(self, out, shape, dtype, on_host):
        """(the caller's result, the device buffer a kernel writes).

        Outputs live where the caller's main input lives (``on_host``); a
        host result is filled from the device buffer at :meth:`finish`.
        """
        if out is not None and not isinstance(out, np.ndarray):
            return out, out
        buffer = self.module.empty(tuple(shape), dtype)
        if out is None and not on_host:
            return buffer, buffer
        result = np.empty(shape, dtype=dtype) if out is None else out
        self.copy_back.append((result, buffer))
        return result, buffer

    def finish(self):
        """Copy what the call wrote back into the host arrays it came from."""
        for host, device in self.copy_back:
            host[...] = self.module.to_host(device).reshape(host.shape)


class _ForwardCall:
    """A forward call's checked options and the facts of its input's metadata:
    the backend (``name``, ``module``), the channel ``axis``, the canonical
    view's ``A, C, B``, ``x``'s ``dtype`` and the parameters' ``param_dtype``,
    ``training``, ``eps``, ``momentum``, ``relu``."""

    __slots__ = ("name", "module", "axis", "A", "C", "B", "dtype", "param_dtype", "training",
                 "eps", "momentum", "relu")


# The checked kinds of host forward call (see _forward_call); a program
# makes a few dozen.
_FORWARD_CALLS = {}


def _forward_call(x, axis, training, eps, momentum, activation, backend, running_mean,
                  running_var):
    """``(call, x_array)``: the :class:`_ForwardCall` of a call, with every
    check of its options and of ``x``'s shape and dtype done, and ``x`` as
    the backend takes it (a NumPy or device array).

    A NumPy ``x`` with options of the plain Python types makes a kind of
    call: ``x``'s shape and dtype, the options, the backend and whether
    running statistics are given. Its checks run on its first call only,
    and later calls of that kind reuse the result. Python work costs most
    right after a kernel has run (its data has evicted the interpreter's
    from the caches), so this is what keeps a call on an in-cache array near
    its kernel's time. The per-channel arrays and ``out`` are checked on
    every call.
    """
    key = None
    if (type(x) is np.ndarray and type(axis) is int and type(training) is bool
            and type(eps) is float and type(momentum) is float
            and (activation is None or type(activation) is str)
            and (backend is None or type(backend) is str)):
        name = registry.default_backend() if backend is None else backend
        key = (x.shape, x.dtype, axis, training, eps, momentum, activation, name,
               running_mean is None, running_var is None)
        call = _FORWARD_CALLS.get(key)
        if call is not None:
            return call, x
    name, module = _resolve_backend(backend, x)
    x_array = _as_array(x, module, "x")
    axis, A, C, B = _check_input(x_array, axis)
    relu = _check_activation(activation) == "relu"
    training = bool(training)
    eps = check_eps(eps, training)
    momentum = check_scalar(momentum, "momentum", 0.0, 1.0)
    if training and A * B == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(x_array.shape)}")
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError("give both running_mean and running_var, or neither")
    elif running_mean is None or running_var is None:
        raise ValueError("training=False needs running_mean and running_var")
    call = _ForwardCall()
    call.name, call.module, call.axis, call.A, call.C, call.B = name, module, axis, A, C, B
    call.dtype = np.dtype(x_array.dtype)
    call.param_dtype = parameter_dtype(call.dtype)
    call.training, call.eps, call.momentum, call.relu = training, eps, momentum, relu
    if key is not None:
        if len(_FORWARD_CALLS) >= 1024:
            _FORWARD_CALLS.clear()
        _FORWARD_CALLS[key] = call
    return call, x_array


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------

def batchnorm_forward(x, gamma=None, beta=None, *, training=True,
                      running_mean=None, running_var=None, momentum=0.1,
                      eps=1e-5, axis=1, backend=None, out=None, activation=None):
    """Batch normalization forward pass.

    ``out = (x - mean) / sqrt(var + eps) * gamma + beta`` per channel, with
    the statistics taken over every axis but ``axis``; with
    ``activation="relu"``, ``max(out, 0)`` in the same pass.

    Parameters
    ----------
    x : array_like, float16, bfloat16, float32 or float64, ``ndim >= 2``
        Input, e.g. ``(N, D)``, ``(N, C, H, W)`` or channels-last
        ``(N, H, W, C)`` with ``axis=-1``. May be non-contiguous or
        read-only; never modified. A CUDA device array (anything with
        ``__cuda_array_interface__``) selects the ``cuda`` backend.
        16-bit inputs (NumPy's float16, ``ml_dtypes.bfloat16``) are stored
        in 16 bits and computed in float32, with float64 accumulation.
    gamma, beta : array_like of shape (C,), optional
        Scale and shift, cast to ``x.dtype`` (to float32 for 16-bit ``x``);
        ``None`` means ones / zeros.
    training : bool, default True
        True: normalize with the batch statistics and update the running
        statistics when given. False: normalize with ``running_mean`` and
        ``running_var`` (both required).
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics, updated in place in training mode (PyTorch's
        convention; on the device, by the backend's own kernel): ``running = (1 - momentum) * running + momentum * batch``,
        with the unbiased batch variance for ``running_var``.
    momentum : float in [0, 1], default 0.1
        Weight of the new batch in the running statistics.
    eps : float, default 1e-5
        Added to the variance inside the square root: ``> 0`` in training
        mode, ``>= 0`` in evaluation mode (PyTorch's rule).
    axis : int, default 1
        The channel axis.
    backend : str, optional
        A name from :func:`fastbn.available_backends`; default: the process
        default (see :func:`fastbn.set_backend`).
    out : ndarray, optional
        C-contiguous array of ``x``'s shape and dtype to write into.
    activation : {None, "relu"}, default None
        ``"relu"`` fuses ``max(y, 0)`` into the normalize pass; the backward
        on this cache then masks ``dout`` by ``y > 0``, rebuilding ``y``
        from ``x`` and the statistics (no mask is stored).

    Returns
    -------
    out : ndarray
        The normalized output, ``x.dtype``, ``x.shape``. An empty batch
        (``C > 0`` channels with no value each, e.g. ``(0, C, L)``) gives an
        empty output and leaves the running statistics unchanged.
    cache : BatchNormCache
        What :func:`batchnorm_backward` needs.

    Raises
    ------
    TypeError
        ``x`` is not float16, bfloat16, float32 or float64.
    ValueError
        Bad shape, axis, parameter shape, ``eps``, ``momentum``, ``out``,
        ``activation``, missing running statistics in evaluation mode, or a
        single value per channel in training mode.
    RuntimeError
        The backend is known but cannot run here.
    """
    call, x_array = _forward_call(x, axis, training, eps, momentum, activation, backend,
                                  running_mean, running_var)
    name, module, axis, A, C, B, dtype = (call.name, call.module, call.axis, call.A, call.C,
                                          call.B, call.dtype)
    training, eps, momentum, relu = call.training, call.eps, call.momentum, call.relu
    on_device = module.ON_DEVICE

    if on_device:
        device = _Device(module)
        gamma_arg = device.channel(gamma, C, "gamma", "biuf")
        beta_arg = device.channel(beta, C, "beta", "biuf")
        running_mean = device.channel(running_mean, C, "running_mean", "f", training)
        running_var = device.channel(running_var, C, "running_var", "f", training)
        out = _check_out(out, x_array.shape, dtype, module, ())
        x3 = device.array3(x_array, A, C, B)
        result, buffer = device.output(out, x_array.shape, dtype, _is_host(x))
        out3 = buffer.reshape(A, C, B)
    else:
        gamma_arg = channel_param(gamma, C, call.param_dtype, "gamma", 1.0)
        beta_arg = channel_param(beta, C, call.param_dtype, "beta", 0.0)
        if running_mean is not None:
            running_mean = check_running(running_mean, C, "running_mean", training)
            running_var = check_running(running_var, C, "running_var", training)
        result = _check_out(out, x_array.shape, dtype, module, (x_array,))
        if result is None:
            result = np.empty(x_array.shape, dtype=dtype)
        x3 = _view3(x_array, A, C, B)
        out3 = result.reshape(A, C, B)

    # The activation is passed only when there is one, so the plain call
    # stays as cheap as it was.
    fused = {"relu": True} if relu else {}
    if A * B == 0:
        # An empty batch: nothing to normalize, running statistics unchanged.
        mean, invstd = _empty_batch_channels(C, np.float64, module, on_device)
    elif training:
        mean, invstd = module.forward_train(x3, gamma_arg, beta_arg, eps, out3,
                                            running_mean, running_var, momentum, **fused)
    else:
        mean, invstd = module.forward_eval(x3, gamma_arg, beta_arg, running_mean,
                                           running_var, eps, out3, **fused)
    if on_device:
        device.finish()
    cache = BatchNormCache(x, mean, invstd, gamma_arg, eps, axis, training, name,
                           beta=beta_arg, activation="relu" if relu else None)
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
        After a forward with ``activation="relu"``, ``dout`` is first
        masked by ``y > 0`` (the staged graph walks that node back as one
        more stage).
    out : ndarray, optional
        C-contiguous array of ``dout``'s shape and dtype for ``dx``.

    Returns
    -------
    dx : ndarray
        Gradient with respect to ``x``.
    dgamma, dbeta : ndarray of shape (C,)
        Gradients with respect to ``gamma`` and ``beta``: ``x.dtype``, or
        float32 for 16-bit ``x``; zeros for an empty batch.

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
    on_device = module.ON_DEVICE
    dout_array = _as_array(dout, module, "dout")
    x_array = cache.x if _is_host(cache.x) else module.to_device(cache.x)
    shape, dtype = tuple(x_array.shape), np.dtype(x_array.dtype)
    if tuple(dout_array.shape) != shape or np.dtype(dout_array.dtype) != dtype:
        raise ValueError(f"dout must have the forward input's shape {shape} and dtype {dtype}, "
                         f"got shape {tuple(dout_array.shape)} and dtype "
                         f"{np.dtype(dout_array.dtype)}")
    axis = cache.axis
    A, C, B = canonical_shape(shape, axis)

    if on_device:
        device = _Device(module)
        out = _check_out(out, shape, dtype, module, ())
        dy3 = device.array3(dout_array, A, C, B)
        x3 = device.array3(x_array, A, C, B)
        result, buffer = device.output(out, shape, dtype, _is_host(dout))
        dx3 = buffer.reshape(A, C, B)
    else:
        result = _check_out(out, shape, dtype, module, (dout_array, x_array))
        if result is None:
            result = np.empty(shape, dtype=dtype)
        dy3 = _view3(dout_array, A, C, B)
        x3 = _view3(x_array, A, C, B)
        dx3 = result.reshape(A, C, B)

    fused = {"beta": cache.beta, "relu": True} if cache.activation == "relu" else {}
    if A * B == 0:
        # An empty batch: empty dx, zero dgamma and dbeta.
        if on_device:
            device.finish()
        return (result,) + _empty_batch_channels(C, parameter_dtype(dtype), module,
                                                 on_device and not _is_host(dout))
    if not cache.training:
        dbeta, dgamma = module.backward_eval(dy3, x3, cache.mean, cache.invstd, cache.gamma, dx3,
                                             **fused)
    elif method == "simplified":
        dbeta, dgamma = module.backward_train(dy3, x3, cache.mean, cache.invstd, cache.gamma,
                                              dx3, **fused)
    else:
        dgamma, dbeta = module.backward_staged(dy3, x3, cache.mean, cache.invstd, cache.gamma,
                                               cache.eps, dx3, **fused)
    if on_device:
        device.finish()
        if _is_host(dout):
            dgamma, dbeta = module.to_host(dgamma), module.to_host(dbeta)
        return result, dgamma, dbeta
    param_dtype = parameter_dtype(dtype)
    return (result, dgamma.astype(param_dtype, copy=False),
            dbeta.astype(param_dtype, copy=False))
