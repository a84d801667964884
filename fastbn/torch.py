"""fastbn inside PyTorch models: a function, drop-in modules, synchronized batch norm.

``import fastbn.torch`` registers two operators with ``torch.library``,
``fastbn::batch_norm`` (the forward, with an autograd formula) and
``fastbn::batch_norm_backward``, each with a fake implementation, so that
``torch.compile`` traces a model through them without a graph break.
``torch.library`` gives autograd formulas to functional operators only, so
the forward does not update the running statistics in its arguments: it
returns the updated statistics (computed by fastbn's kernels, in a copy of
the ``C`` values), and :func:`batch_norm` writes them into the caller's
tensors with ``copy_``, which ``torch.compile`` records as the mutation of
those buffers. The operator's dispatch costs several times the kernels on
small tensors, so eager calls on CPU tensors take a lean path to the same
kernels instead (:class:`_EagerBatchNorm`, see :func:`batch_norm`). On top:

- :func:`batch_norm`, with the signature and meaning of
  ``torch.nn.functional.batch_norm``, double backward included;
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`,
  subclasses of PyTorch's with the same parameters, buffers, state dict and
  repr, whose ``forward`` runs fastbn;
- :class:`SyncBatchNorm` (``fastbn/_torch_sync.py``), synchronized batch
  norm of CPU tensors over ``torch.distributed``;
- :func:`convert_batchnorm` / :func:`revert_batchnorm`, which switch every
  ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` of a model
  to fastbn and back, in place.

See docs/pytorch.md.

How tensors reach the kernels
-----------------------------
A contiguous CPU tensor is passed as a NumPy view of its own memory
(``Tensor.numpy()``), a ``channels_last`` (or ``channels_last_3d``) tensor
as the view of its memory order with the channel axis last (``axis=-1``):
no copy either way, and the output is written straight into the result
tensor. float16 tensors are NumPy float16 views; bfloat16 tensors are viewed
through their bits as ``ml_dtypes.bfloat16`` (no copy); both use fastbn's
16-bit storage (float32 arithmetic, float64 accumulation). Any other
strided CPU tensor is copied once into the contiguous layout. Per-channel
tensors (weight, bias, running statistics) are used in place when they are
contiguous float16/32/64 CPU tensors, else through a float32 copy of their
``C`` values (the running statistics are written back). Small eager calls
on the numba backend pass the tensors' memory addresses instead of views
(see :func:`_at_kernels`). Large CPU outputs take memory kept from earlier
outputs that nothing references any more (``fastbn/_torch_arrays.py``,
:func:`fastbn._torch_arrays.host_memory`).

CUDA tensors go to the ``cuda`` backend through ``__cuda_array_interface__``,
with no copy. That backend launches its kernels on the legacy default
stream. When PyTorch's current stream is that stream, the work is ordered
with the caller's by the stream itself, and nothing is synchronized. When
it is another stream, the call first waits for that stream
(``torch.cuda.current_stream().synchronize()``) and, before returning,
for the device (``torch.cuda.synchronize()``): correct, at the price of two
host synchronizations per call, until the backend can launch on a given
stream.
"""

import numpy as np
import torch

from . import _torch_arrays as _arrays, plans, registry, validation
from .api import batchnorm_backward, batchnorm_forward
from .backends._host import relu_floor
from .cache import BatchNormCache

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FusedReLU", "SyncBatchNorm",
           "batch_norm", "convert_batchnorm", "fuse_batchnorm_relu", "revert_batchnorm"]

# --------------------------------------------------------------------------
# The operators
# --------------------------------------------------------------------------

@torch.library.custom_op("fastbn::batch_norm", mutates_args=())
def _batch_norm_op(input: torch.Tensor, running_mean: torch.Tensor | None,
                   running_var: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, training: bool, momentum: float, eps: float,
                   activation: str, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(output, mean, invstd, new_running_mean, new_running_var)``.

    ``mean``/``invstd`` (float64, ``(C,)``) are what the backward needs (the
    batch statistics in training mode). The new running statistics are
    updated copies in training mode, unchanged copies in evaluation mode,
    empty tensors where none were given.
    """
    source, permutation, axis = _arrays.kernel_layout(input)
    output = _arrays.empty_like(source)
    new_mean, mean_array = _arrays.updated_running(running_mean, input)
    new_var, var_array = _arrays.updated_running(running_var, input)
    with _arrays.CudaOrder(input):
        _, cache = batchnorm_forward(
            _arrays.tensor_array(source, permutation), _arrays.channel_array(weight),
            _arrays.channel_array(bias),
            training=training, running_mean=mean_array, running_var=var_array,
            momentum=momentum, eps=eps, axis=axis, backend=_arrays.backend_name(backend, input),
            out=_arrays.tensor_array(output, permutation), activation=activation or None)
    return (output, _arrays.as_tensor(cache.mean, input.device),
            _arrays.as_tensor(cache.invstd, input.device), new_mean, new_var)


@_batch_norm_op.register_fake
def _batch_norm_fake(input, running_mean, running_var, weight, bias, training, momentum, eps,
                     activation, backend):
    source, _, _ = _arrays.kernel_layout(input)
    channels = input.shape[1]
    new_running = []
    for tensor in (running_mean, running_var):
        if tensor is None:
            new_running.append(input.new_empty((0,)))
        else:
            dtype = tensor.dtype if tensor.dtype in _arrays.CHANNEL_DTYPES else torch.float32
            new_running.append(tensor.new_empty((channels,), dtype=dtype))
    return (torch.empty_like(source), input.new_empty((channels,), dtype=torch.float64),
            input.new_empty((channels,), dtype=torch.float64), *new_running)


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(grad_output: torch.Tensor, input: torch.Tensor,
                            weight: torch.Tensor | None, bias: torch.Tensor | None,
                            mean: torch.Tensor, invstd: torch.Tensor, training: bool,
                            eps: float, activation: str, backend: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(grad_input, grad_weight, grad_bias)``; the parameter
    gradients in float32 for 16-bit input, else in the input's dtype."""
    source, permutation, axis = _arrays.kernel_layout(input)
    grad = _arrays.like_layout(grad_output, permutation)
    grad_input = _arrays.empty_like(source)
    name = _arrays.backend_name(backend, input)
    x = _arrays.tensor_array(source, permutation)
    channels = input.shape[1]
    if input.device.type == "cuda":
        module = registry.get_backend(name)
        gamma = None if weight is None else module.to_device(weight.detach())
        beta = None if bias is None else module.to_device(bias.detach())
        mean_arg, invstd_arg = module.to_device(mean.detach()), module.to_device(invstd.detach())
    else:
        param_dtype = validation.parameter_dtype(np.dtype(x.dtype))
        gamma = validation.channel_param(_arrays.channel_array(weight), channels, param_dtype,
                                         "gamma", 1.0)
        beta = validation.channel_param(_arrays.channel_array(bias), channels, param_dtype,
                                        "beta", 0.0)
        mean_arg, invstd_arg = mean.numpy(), invstd.numpy()
    cache = BatchNormCache(x, mean_arg, invstd_arg, gamma, eps, axis % input.dim(), training,
                           name, beta=beta, activation=activation or None)
    with _arrays.CudaOrder(input):
        _, grad_gamma, grad_beta = batchnorm_backward(
            _arrays.tensor_array(grad, permutation), cache,
            out=_arrays.tensor_array(grad_input, permutation))
    return (grad_input, _as_param_tensor(grad_gamma, input), _as_param_tensor(grad_beta, input))


def _as_param_tensor(array, input):
    if input.device.type == "cuda":
        return torch.as_tensor(array, device=input.device).to(_arrays.param_dtype(input))
    return torch.from_numpy(np.asarray(array)).to(_arrays.param_dtype(input))


@_batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(grad_output, input, weight, bias, mean, invstd, training, eps,
                              activation, backend):
    source, _, _ = _arrays.kernel_layout(input)
    channels = input.shape[1]
    param_dtype = _arrays.param_dtype(input)
    return (torch.empty_like(source), input.new_empty((channels,), dtype=param_dtype),
            input.new_empty((channels,), dtype=param_dtype))


def _setup_context(ctx, inputs, output):
    input, _, _, weight, bias, training, _, eps, activation, backend = inputs
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.training, ctx.eps, ctx.activation, ctx.backend = training, eps, activation, backend


def _backward(ctx, grad_output, *grad_statistics):
    input, weight, bias, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():   # create_graph=True: a backward that autograd can differentiate
        grads = _differentiable_backward(grad_output, input, weight, bias, mean, invstd,
                                         ctx.training, ctx.eps, ctx.activation)
    else:
        grads = _batch_norm_backward_op(grad_output, input, weight, bias, mean, invstd,
                                        ctx.training, ctx.eps, ctx.activation, ctx.backend)
    grad_input, grad_weight, grad_bias = _select_grads(grads, weight, bias, needs[0], needs[3],
                                                       needs[4])
    return (grad_input, None, None, grad_weight, grad_bias, None, None, None, None, None)


def _select_grads(grads, weight, bias, need_input, need_weight, need_bias):
    """The requested gradients, those of the parameters in their dtypes."""
    grad_input, grad_weight, grad_bias = grads
    return (grad_input if need_input else None,
            _in_dtype(grad_weight, weight) if weight is not None and need_weight else None,
            _in_dtype(grad_bias, bias) if bias is not None and need_bias else None)


def _in_dtype(grad, param):
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


def _differentiable_backward(grad_output, input, weight, bias, mean, invstd, training, eps,
                             activation):
    """``(grad_input, grad_weight, grad_bias)`` as a graph of PyTorch operations.

    Used for ``create_graph=True`` (double backward: gradient penalties
    such as WGAN-GP's or R1), where autograd must differentiate the
    gradient itself. An explicit formula, not fastbn's kernels: in training
    mode the batch statistics are recomputed from ``input`` with PyTorch
    operations, so that their dependence on ``input`` is part of the graph;
    then, with ``xhat = (x - mean) * invstd``::

        dy = grad_output * (y > 0)          (after a fused ReLU only)
        grad_bias   = sum(dy)
        grad_weight = sum(dy * xhat)
        grad_input  = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))   (training)
        grad_input  = weight * invstd * dy                                      (evaluation)

    sums and means over every axis but the channel axis. 16-bit input is
    computed in float32. ``mean``/``invstd`` are the forward's (float64,
    ``(C,)``): the running statistics' in evaluation mode.
    """
    compute = torch.float32 if input.element_size() == 2 else input.dtype
    x = input.to(compute)
    dy = grad_output.to(compute)
    dims = [axis for axis in range(input.dim()) if axis != 1]
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    if training:
        centred = x - x.mean(dims, keepdim=True)
        inv = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    else:
        centred = x - mean.to(compute).view(shape)
        inv = invstd.to(compute).view(shape)
    xhat = centred * inv
    scale = inv if weight is None else inv * weight.to(compute).view(shape)
    if activation:
        y = xhat if weight is None else xhat * weight.to(compute).view(shape)
        if bias is not None:
            y = y + bias.to(compute).view(shape)
        dy = dy * (y > 0).to(compute)
    grad_bias = dy.sum(dims)
    grad_weight = (dy * xhat).sum(dims)
    if training:
        grad_input = scale * (dy - dy.mean(dims, keepdim=True)
                              - xhat * (dy * xhat).mean(dims, keepdim=True))
    else:
        grad_input = scale * dy
    param = _arrays.param_dtype(input)
    return grad_input.to(input.dtype), grad_weight.to(param), grad_bias.to(param)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastbn::batch_norm_backward is not differentiable; a double backward "
                       "through fastbn.torch.batch_norm differentiates a PyTorch formula of "
                       "the gradient instead (create_graph=True)")


_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)
_batch_norm_backward_op.register_autograd(_no_double_backward)


# --------------------------------------------------------------------------
# The eager path
# --------------------------------------------------------------------------

class _EagerBatchNorm(torch.autograd.Function):
    """The same computation as the operators, for eager calls on CPU tensors.

    ``torch.library``'s dispatch of a custom operator (its schema checks,
    the autograd wrapper, the functional copies of the running statistics)
    costs several times the kernels on a small tensor. This function calls
    the backend's kernels directly (:func:`_eager_forward`,
    :func:`_eager_backward`, with the checks of the call's
    :class:`_CallClass`): the running statistics are updated in place when
    NumPy can view them, and what the backward needs is kept on the
    context. The double backward is :func:`_differentiable_backward`, as for
    the operator.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, options):
        call, running_mean, running_var = options
        output, saved = _eager_forward(call, input, weight, bias, running_mean, running_var,
                                       True)
        ctx.save_for_backward(input, weight, bias)
        ctx.saved, ctx.call = saved, call
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors   # also checks for in-place changes
        saved, call = ctx.saved, ctx.call
        if torch.is_grad_enabled():
            mean, invstd = _saved_statistics(saved)
            grads = _differentiable_backward(grad_output, input, weight, bias, mean, invstd,
                                             call.training, call.eps, call.activation)
        elif isinstance(saved, tuple):   # in the parameters' dtypes, None where not needed
            return (*_backward_at(grad_output, input, weight, bias, saved, call,
                                  ctx.needs_input_grad), None)
        else:
            grads = _eager_backward(grad_output, saved, call)
        return (*_select_grads(grads, weight, bias, *ctx.needs_input_grad[:3]), None)


class _CallClass:
    """What an eager call works out once per kind of call.

    A kind of call (:func:`_call_class`) is the input's shape, dtype and
    layout, the mode, ``momentum``, ``eps``, the activation, the backend and
    which running statistics are given. Making one runs the checks of
    :func:`batch_norm` and :func:`fastbn.batchnorm_forward` on these values
    (:func:`_check_call`), so a later call of the same kind skips them; the
    per-channel tensors are checked on every call.

    Attributes
    ----------
    permutation, axis : tuple or None, int
        The input's memory order (:func:`fastbn._torch_arrays.kernel_layout`)
        and channel axis in it.
    memory_format : torch.memory_format
        The same order as PyTorch names it.
    channels : int
    shape3 : tuple of 3 ints, or None
        The canonical ``(A, C, B)`` view of the memory; None for an empty
        batch (which goes through :func:`fastbn.batchnorm_forward`).
    module, backend : module, str
        The backend and its name.
    param_dtype : numpy.dtype
        The weight's and bias' dtype: the input's, float32 for 16-bit input.
    training, momentum, eps, activation
        The call's options, checked (``activation``: None or ``"relu"``).
    at : tuple or None
        For a backend with address entry points (:func:`_at_kernels`), the
        scalars that pick their compiled variant and the ReLU mask's floor:
        ``(storage scalar, parameter scalar, parameter tensor dtype, floor,
        NumPy dtype of the input)``; None otherwise.
    statistics : torch.Tensor or None
        A float64 ``(2, C)`` tensor of the kind that holds a call's ``mean``
        and ``invstd`` on the address path (``torch.empty_like`` of it is
        the cheapest allocation).
    serial, generation : dict, int
        Per pass, the backend's entry point when it runs the pass serially
        (else None), as decided under plan generation ``generation``
        (:func:`fastbn.plans.generation`).
    """

    __slots__ = ("permutation", "axis", "channels", "shape3", "module", "backend",
                 "param_dtype", "training", "momentum", "eps", "activation", "at",
                 "serial", "generation", "memory_format", "statistics")

    def __init__(self, source, permutation, axis, training, momentum, eps, activation, backend):
        self.permutation, self.axis = permutation, axis
        self.memory_format = _MEMORY_FORMATS[None if permutation is None else len(permutation)]
        self.channels = channels = source.shape[1]
        size = source.numel()
        if size == 0:
            self.shape3 = None
        elif axis == 1:
            self.shape3 = (source.shape[0], channels, size // (source.shape[0] * channels))
        else:
            self.shape3 = (size // channels, channels, 1)
        self.module = registry.get_backend(backend)
        self.backend = backend
        self.param_dtype = _arrays.PARAM_DTYPES[source.dtype]
        self.training = training
        self.momentum = momentum
        self.eps = eps
        self.activation = activation
        self.at = self.statistics = None
        if self.shape3 is not None and hasattr(self.module, "serial_entry"):
            self.statistics = torch.empty((2, channels), dtype=torch.float64)
            dtype = _arrays.numpy_dtype(source.dtype)
            self.at = (*self.module.address_scalars(dtype),
                       _arrays.param_dtype(source), relu_floor(dtype), dtype)
        self.serial = {}
        self.generation = None


# The memory format of the kernels' layout (by the permutation's length).
_MEMORY_FORMATS = {None: torch.contiguous_format, 4: torch.channels_last,
                   5: torch.channels_last_3d}

# The kinds of eager call seen so far (a model has a few dozen).
_CALL_CLASSES = {}


def _call_class(input, running_mean, running_var, training, momentum, eps, activation,
                backend):
    """``(source, call)``: the tensor the kernels read (the input, or its
    contiguous copy) and the call's :class:`_CallClass`."""
    source, permutation, axis = _arrays.kernel_layout(input)
    training = bool(training)
    momentum = validation.check_scalar(momentum, "momentum", 0.0, 1.0)
    eps = float(eps)
    if activation not in (None, "relu"):   # before it goes into a key
        _check_call(input, running_mean, running_var, training, eps, activation)
    if backend is not None and type(backend) is not str:
        validation.check_backend_name(backend)   # raises: not a name
    backend = backend or registry.default_backend()
    key = (source.shape, source.dtype, permutation, training, momentum, eps, activation,
           backend, running_mean is None, running_var is None)
    call = _CALL_CLASSES.get(key)
    if call is None:
        _check_call(input, running_mean, running_var, training, eps, activation)
        call = _CallClass(source, permutation, axis, training, momentum, eps, activation,
                          backend)
        if len(_CALL_CLASSES) >= 1024:
            _CALL_CLASSES.clear()
        _CALL_CLASSES[key] = call
    return source, call


def _eager_forward(call, source, weight, bias, running_mean, running_var, backward):
    """``(output, saved)`` of a forward on CPU tensors.

    Where :func:`_at_kernels` allows, the backend's address entry points
    run it (:func:`_forward_at`), and ``saved`` is ``(statistics, backward
    entry point)``; else the kernels run on NumPy views
    (:func:`_forward_arrays`), and ``saved`` is a
    :class:`fastbn.cache.BatchNormCache`. ``backward``: whether a backward
    may follow (its kernel is then chosen now).
    """
    kernels = _at_kernels(call, weight, bias, running_mean, running_var, backward)
    if kernels is not None:
        return _forward_at(call, kernels, source, weight, bias, running_mean, running_var)
    return _forward_arrays(call, source, weight, bias, running_mean, running_var)


def _at_kernels(call, weight, bias, running_mean, running_var, backward):
    """``(forward, backward)`` address entry points of a call, or None.

    A call runs on the tensors' addresses when its backend has such entry
    points (``serial_entry``: the numba backend), its passes run serially
    under the current plans, and every per-channel tensor given is a
    contiguous CPU tensor of ``(C,)`` values in the parameters' dtype.
    Anything else (every error included) takes the NumPy views. Without
    ``backward`` the second entry point is None.
    """
    at = call.at
    if at is None:
        return None
    dtype, shape = at[2], (call.channels,)
    for tensor in (weight, bias, running_mean, running_var):
        if tensor is not None and not (tensor.dtype == dtype and tensor.shape == shape
                                       and tensor.is_cpu and tensor.is_contiguous()):
            return None
    generation = plans.generation()
    if generation != call.generation:   # plans changed: decide again
        call.serial.clear()
        call.generation = generation
    passes = ("forward", "backward") if call.training else ("eval", "backward_eval")
    forward = _serial_entry(call, passes[0])
    if forward is None:
        return None
    if not backward:
        return forward, None
    backward = _serial_entry(call, passes[1])
    return None if backward is None else (forward, backward)


def _serial_entry(call, pass_name):
    """The backend's ``serial_entry`` for a kind of call, kept on it."""
    try:
        return call.serial[pass_name]
    except KeyError:
        entry = call.module.serial_entry(call.shape3, call.at[4], pass_name,
                                         call.activation is not None)
        call.serial[pass_name] = entry
        return entry


def _forward_at(call, kernels, source, weight, bias, running_mean, running_var):
    """:func:`_eager_forward` by the backend's address entry points: no NumPy
    views (what they cost is most of a small call). ``saved`` holds a
    float64 ``(2, C)`` tensor of ``mean`` and ``invstd`` when a backward may
    follow (None otherwise: the kernel keeps them in scratch memory)."""
    output = torch.empty_like(source)
    forward, backward = kernels
    stats = None if backward is None else torch.empty_like(call.statistics)
    stats_at = 0 if stats is None else stats.data_ptr()
    storage, param = call.at[0], call.at[1]
    gamma_at = 0 if weight is None else weight.data_ptr()
    beta_at = 0 if bias is None else bias.data_ptr()
    lo = None if call.activation is None else 0.0
    if call.training:
        forward(source.data_ptr(), output.data_ptr(), call.shape3, storage, gamma_at, beta_at,
                0 if running_mean is None else running_mean.data_ptr(),
                0 if running_var is None else running_var.data_ptr(), param, stats_at,
                call.eps, call.momentum, lo)
    else:
        forward(source.data_ptr(), output.data_ptr(), call.shape3, storage, gamma_at, beta_at,
                running_mean.data_ptr(), running_var.data_ptr(), param, stats_at, call.eps, lo)
    return output, (stats, backward)


def _backward_at(grad_output, input, weight, bias, saved, call, needs_input_grad):
    """``(grad_input, grad_weight, grad_bias)`` by the backward entry point
    that the forward chose (``saved``); each only where it is wanted (else
    None)."""
    if not grad_output.is_contiguous(memory_format=call.memory_format):
        grad_output = grad_output.contiguous(memory_format=call.memory_format)
    grad_input = torch.empty_like(input)
    grad_weight = grad_bias = None
    gamma_at = beta_at = grad_weight_at = grad_bias_at = 0
    if weight is not None:
        gamma_at = weight.data_ptr()
        if needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)   # in the parameters' dtype (checked)
            grad_weight_at = grad_weight.data_ptr()
    if bias is not None:
        beta_at = bias.data_ptr()
        if needs_input_grad[2]:
            grad_bias = torch.empty_like(bias)
            grad_bias_at = grad_bias.data_ptr()
    stats, backward = saved
    storage, param, _, floor, _ = call.at
    backward(grad_output.data_ptr(), input.data_ptr(), grad_input.data_ptr(), call.shape3,
             storage, stats.data_ptr(), gamma_at, beta_at, param, grad_weight_at, grad_bias_at,
             call.training, None if call.activation is None else floor)
    return grad_input if needs_input_grad[0] else None, grad_weight, grad_bias


def _saved_statistics(saved):
    """``(mean, invstd)`` tensors of what a forward kept for its backward."""
    if isinstance(saved, tuple):
        return saved[0][0], saved[0][1]
    return (torch.from_numpy(np.asarray(saved.mean)),
            torch.from_numpy(np.asarray(saved.invstd)))


def _forward_arrays(call, source, weight, bias, running_mean, running_var):
    """``(output, cache)`` of a forward on CPU tensors through NumPy views, in
    place where it can.

    ``call`` holds what was checked once for this kind of call; the
    per-channel tensors are checked here as :func:`fastbn.batchnorm_forward`
    checks them. An empty batch goes through that function.
    """
    permutation = call.permutation
    output, out = _arrays.new_output(source, permutation)
    x = _arrays.host_view(source, permutation)
    channels = call.channels
    mean_array, mean_back = _running_array(running_mean, channels, "running_mean")
    var_array, var_back = _running_array(running_var, channels, "running_var")
    training, eps, activation = call.training, call.eps, call.activation
    if call.shape3 is None:
        _, cache = batchnorm_forward(x, _arrays.channel_array(weight), _arrays.channel_array(bias),
                                     training=training, running_mean=mean_array,
                                     running_var=var_array, momentum=call.momentum, eps=eps,
                                     axis=call.axis, backend=call.backend, out=out,
                                     activation=activation)
        return output, cache
    gamma = _arrays.host_param(weight, channels, call.param_dtype, 1.0, "gamma")
    beta = _arrays.host_param(bias, channels, call.param_dtype, 0.0, "beta")
    x3, out3 = x.reshape(call.shape3), out.reshape(call.shape3)
    module = call.module
    fused = {"relu": True} if activation else {}
    if training:
        mean, invstd = module.forward_train(x3, gamma, beta, eps, out3, mean_array, var_array,
                                            call.momentum, **fused)
        if mean_back is not None:
            running_mean.copy_(mean_back)
            running_var.copy_(var_back)
    else:
        mean, invstd = module.forward_eval(x3, gamma, beta, mean_array, var_array, eps, out3,
                                           **fused)
    cache = BatchNormCache(x, mean, invstd, gamma, eps, call.axis % x.ndim, training,
                           call.backend, beta=beta, activation=activation)
    return output, cache


def _eager_backward(grad_output, cache, call):
    """``(grad_input, grad_weight, grad_bias)`` from the backend's backward kernels,
    for the forward of ``cache`` and ``call``."""
    permutation = call.permutation
    grad = _arrays.like_layout(grad_output, permutation)
    grad_input, dx = _arrays.new_output(grad, permutation)
    dy = _arrays.host_view(grad, permutation)
    x = cache.x
    if dy.dtype != x.dtype or call.shape3 is None:
        _, grad_weight, grad_bias = batchnorm_backward(dy, cache, out=dx)
    else:
        shape3 = call.shape3
        fused = {"beta": cache.beta, "relu": True} if cache.activation else {}
        kernel = call.module.backward_train if cache.training else call.module.backward_eval
        grad_bias, grad_weight = kernel(dy.reshape(shape3), x.reshape(shape3), cache.mean,
                                        cache.invstd, cache.gamma, dx.reshape(shape3), **fused)
        # the float64 sums in the parameters' dtype (NumPy's cast: cheaper than PyTorch's)
        grad_weight = grad_weight.astype(call.param_dtype, copy=False)
        grad_bias = grad_bias.astype(call.param_dtype, copy=False)
    return grad_input, torch.from_numpy(grad_weight), torch.from_numpy(grad_bias)


def _running_array(tensor, channels, name):
    """(the array the kernels update, the tensor to copy it back into, or None).

    A contiguous CPU tensor of a dtype NumPy can view is updated in place;
    any other (bfloat16) through a float32 copy, written back afterwards.
    """
    if tensor is None:
        return None, None
    if tensor.dtype in _arrays.CHANNEL_DTYPES and tensor.is_contiguous():
        array = _arrays.channel_view(tensor)
        if array.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                             f"got shape {array.shape}")
        return array, None
    if tensor.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                         f"got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got dtype {tensor.dtype}")
    copy = tensor.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return copy.numpy(), copy


def _function_apply(function):
    """``function.apply`` without its Python prologue (default-argument
    binding, the unwrapping of dead ``torch.func`` wrappers): the C++
    ``apply`` that it ends in. Only for calls made outside ``torch.func``
    transforms (see :func:`_use_operator`), where that prologue does nothing
    but unwrap tensors that escaped a finished transform, which
    :func:`_apply_eager` still does."""
    try:
        return torch._C._FunctionBase.__dict__["apply"].__get__(None, function)
    except (AttributeError, KeyError, TypeError):   # a torch without it: the public one
        return function.apply


_EAGER_APPLY = _function_apply(_EagerBatchNorm)
_UNWRAP_IF_DEAD = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead",
                          lambda tensor: tensor)


def _apply_eager(input, weight, bias, call, running_mean, running_var):
    unwrap = _UNWRAP_IF_DEAD
    return _EAGER_APPLY(unwrap(input), None if weight is None else unwrap(weight),
                        None if bias is None else unwrap(bias), (call, running_mean, running_var))


def _needs_grad(input, weight, bias):
    return torch.is_grad_enabled() and (
        input.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad))


def _use_operator(input):
    """True where a call must go through the registered operator: anything
    but a plain CPU tensor in eager mode (``torch.compile`` tracing, fake and
    meta tensors, ``torch.func`` transforms, CUDA tensors)."""
    return (type(input) is not torch.Tensor or not input.is_cpu or _COMPILING()
            or _TRANSFORMS_ACTIVE())


_COMPILING = torch.compiler.is_compiling   # torch >= 2.3
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _check_call(input, running_mean, running_var, training, eps, activation):
    """:func:`batch_norm`'s checks of the input and the options (``eps`` a float)."""
    _arrays.check_tensor(input)
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), "
                         f"got shape {tuple(input.shape)}")
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training and input.numel() == input.shape[1]:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {tuple(input.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm needs running_mean and running_var when training is False")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm needs both running_mean and running_var, or neither")
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")


# --------------------------------------------------------------------------
# The function
# --------------------------------------------------------------------------

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, backend=None, activation=None):
    """Batch normalization of a tensor: ``torch.nn.functional.batch_norm`` on fastbn.

    Parameters
    ----------
    input : torch.Tensor, ``(N, C, ...)``
        float16, bfloat16, float32 or float64, on the CPU or a CUDA device;
        any memory layout (contiguous and channels-last are read in place).
    running_mean, running_var : torch.Tensor of shape (C,) or None
        Updated in place in training mode when given; required when
        ``training`` is False.
    weight, bias : torch.Tensor of shape (C,), optional
        Scale and shift (None: ones / zeros); gradients flow to them.
    training : bool, default False
        Normalize with the batch statistics (and update the running ones).
    momentum : float, default 0.1
        Weight of the batch in the running statistics.
    eps : float, default 1e-5
        Added to the variance: ``> 0`` in training, ``>= 0`` in evaluation.
    backend : str, optional
        A fastbn backend; default ``cuda`` for CUDA tensors, else the
        process default at the time of each call.
    activation : {None, "relu"}, default None
        ``"relu"`` returns ``relu(batch_norm(...))`` from one fused pass.

    Returns
    -------
    torch.Tensor
        Of ``input``'s shape, dtype and memory layout (contiguous for an
        input that was neither contiguous nor channels-last).

    Raises
    ------
    ValueError
        As ``torch.nn.functional.batch_norm`` (``eps``, one value per channel
        in training, missing running statistics in evaluation), one running
        statistic given without the other, plus those of
        :func:`fastbn.batchnorm_forward`.
    TypeError
        An unsupported dtype.

    Notes
    -----
    Autograd gives gradients for ``input``, ``weight`` and ``bias``, from
    fastbn's backward kernels. With ``create_graph=True`` the gradient is
    instead built from PyTorch operations (an explicit formula), so that a
    double backward (gradient penalties) works.

    Eager calls on CPU tensors run through a lean ``torch.autograd.Function``
    (the running statistics updated in place); under ``torch.compile``,
    on fake, meta and CUDA tensors and inside ``torch.func`` transforms,
    the call goes through the registered operator ``fastbn::batch_norm``.
    Both run the same kernels.
    """
    if not _use_operator(input):
        source, call = _call_class(input, running_mean, running_var, training, momentum, eps,
                                   activation, backend)
        if _needs_grad(source, weight, bias):
            return _apply_eager(source, weight, bias, call, running_mean, running_var)
        return _eager_forward(call, source, weight, bias, running_mean, running_var, False)[0]
    eps = float(eps)
    _check_call(input, running_mean, running_var, training, eps, activation)
    output, _, _, new_mean, new_var = _batch_norm_op(
        input, running_mean, running_var, weight, bias, bool(training), float(momentum), eps,
        activation or "", backend or "")
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return output


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------



class _FastbnForward:
    """The forward of fastbn's BatchNorm modules: PyTorch's, on :func:`batch_norm`.

    Attributes set on the module: ``backend`` (a name or None) and
    ``activation`` (None or ``"relu"``).
    """

    def forward(self, input):
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: the k-th batch weighs 1/k
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if pass_running else None,
                          self.running_var if pass_running else None, self.weight, self.bias,
                          use_batch_stats, momentum, self.eps, backend=self.backend,
                          activation=self.activation)

    def extra_repr(self):
        text = super().extra_repr()
        return text if self.activation is None else f"{text}, activation={self.activation!r}"


class BatchNorm1d(_FastbnForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` whose forward runs fastbn.

    Parameters are PyTorch's, plus ``backend`` (a fastbn backend name; None:
    the default at each call) and ``activation`` (None, or ``"relu"`` for
    ``relu(bn(x))`` in one fused pass). Parameters, buffers, state dict and
    repr (with no activation) are those of ``torch.nn.BatchNorm1d``.
    """

    def __init__(self, *args, backend=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = validation.check_backend_name(backend)
        self.activation = _check_activation(activation)


class BatchNorm2d(_FastbnForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` whose forward runs fastbn (see :class:`BatchNorm1d`)."""

    def __init__(self, *args, backend=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = validation.check_backend_name(backend)
        self.activation = _check_activation(activation)


class BatchNorm3d(_FastbnForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` whose forward runs fastbn (see :class:`BatchNorm1d`)."""

    def __init__(self, *args, backend=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = validation.check_backend_name(backend)
        self.activation = _check_activation(activation)


def _check_activation(activation):
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation


from ._torch_sync import SyncBatchNorm  # noqa: E402  (it uses the helpers above)

_TO_FASTBN = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
              torch.nn.BatchNorm3d: BatchNorm3d, torch.nn.SyncBatchNorm: SyncBatchNorm}
_TO_TORCH = {fast: stock for stock, fast in _TO_FASTBN.items()}
# The converted classes that can compute the ReLU after them (not SyncBatchNorm)
_FUSABLE = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


class FusedReLU(torch.nn.Identity):
    """Stands where a ``torch.nn.ReLU`` was, once its batch norm computes the ReLU.

    :func:`revert_batchnorm` puts a ``torch.nn.ReLU(inplace)`` back.
    """

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


def _switch_class(module, new_class, backend=None, activation=None):
    """Change a batch-norm module's class in place: its parameters, buffers,
    hooks and mode stay the very same objects."""
    module.__class__ = new_class
    if new_class in _TO_TORCH:
        module.backend = backend
        if new_class in _FUSABLE:
            module.activation = activation
    else:
        del module.backend
        module.__dict__.pop("activation", None)


def convert_batchnorm(module, backend=None, *, fuse_relu=False):
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``
    of ``module`` run fastbn, in place.

    Each batch norm becomes the matching :class:`BatchNorm1d`/``2d``/``3d``
    or :class:`SyncBatchNorm`: the same object, with the same parameters,
    buffers (running statistics, ``num_batches_tracked``), process group,
    hooks and mode, so the state dict, an optimizer built on the model, and
    saved checkpoints stay valid. Other subclasses of PyTorch's batch norms
    (lazy ones, your own) are left as they are. For a distributed model,
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`` then this
    function gives synchronized batch norm that runs on CPU tensors.

    Parameters
    ----------
    module : torch.nn.Module
        A model (or one batch-norm module).
    backend : str, optional
        fastbn backend for every converted module (None: the default at
        each call).
    fuse_relu : bool, default False
        Where a batch norm is followed directly by a ``torch.nn.ReLU`` in a
        ``torch.nn.Sequential``, compute the ReLU in the batch norm's pass
        (not for :class:`SyncBatchNorm`)
        (``activation="relu"``) and put a :class:`FusedReLU` (an identity)
        in the ReLU's place. ReLUs called from a ``forward`` method (as in
        torchvision's ResNet blocks) are not seen, and stay: see
        :func:`fuse_batchnorm_relu` for those.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.

    Examples
    --------
    >>> model = fastbn.torch.convert_batchnorm(torchvision.models.resnet50())  # doctest: +SKIP
    """
    backend = validation.check_backend_name(backend)
    for submodule in list(module.modules()):
        if type(submodule) in _TO_FASTBN:
            _switch_class(submodule, _TO_FASTBN[type(submodule)], backend)
    for submodule in list(module.modules()):
        if fuse_relu and isinstance(submodule, torch.nn.Sequential):
            children = list(submodule.named_children())
            for (_, first), (name, second) in zip(children, children[1:]):
                if (type(first) in _FUSABLE and first.activation is None
                        and type(second) is torch.nn.ReLU):
                    first.activation = "relu"
                    setattr(submodule, name, FusedReLU(second.inplace))
    return module


def revert_batchnorm(module):
    """Undo :func:`convert_batchnorm` in place: PyTorch batch norms (and
    ``torch.nn.SyncBatchNorm``) again, and
    ``torch.nn.ReLU`` where a :class:`FusedReLU` stands.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.
    """
    for submodule in list(module.modules()):
        if type(submodule) in _TO_TORCH:
            _switch_class(submodule, _TO_TORCH[type(submodule)])
        for name, child in list(submodule.named_children()):
            if type(child) is FusedReLU:
                setattr(submodule, name, torch.nn.ReLU(child.inplace))
    return module


def fuse_batchnorm_relu(module):
    """A traced copy of a converted model with each batch norm whose output
    goes only to a ``torch.nn.ReLU`` computing that ReLU itself.

    ``torch.fx.symbolic_trace`` records the model's ``forward`` as a graph;
    where a fastbn batch norm (called once in the graph) feeds a ReLU module
    and nothing else, the batch norm gets ``activation="relu"`` and the
    ReLU node is removed. This reaches the ReLUs that ``forward`` methods
    call, as in torchvision's ResNets (where :func:`convert_batchnorm`'s
    ``fuse_relu`` sees none).

    Parameters
    ----------
    module : torch.nn.Module
        A model after :func:`convert_batchnorm`, traceable by ``torch.fx``.

    Returns
    -------
    torch.fx.GraphModule
        The fused model. It shares its parameters, buffers and submodules
        with ``module``; the fused batch norms also apply their ReLU when
        ``module`` itself is called, which changes none of its results (a
        ReLU after a ReLU is the identity).
    """
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, submodule, qualified_name):
            return (type(submodule) in _TO_TORCH
                    or super().is_leaf_module(submodule, qualified_name))

    traced = torch.fx.GraphModule(module, Tracer().trace(module))
    submodules = dict(traced.named_modules())
    calls = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or type(submodules[node.target]) is not torch.nn.ReLU:
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"):
            continue
        norm = submodules[source.target]
        if (type(norm) in _FUSABLE and norm.activation is None and calls[source.target] == 1
                and len(source.users) == 1):
            norm.activation = "relu"
            node.replace_all_uses_with(source)
            traced.graph.erase_node(node)
    traced.recompile()
    return traced
