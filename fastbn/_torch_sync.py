"""``fastbn.torch.SyncBatchNorm``: synchronized batch norm of CPU tensors over
``torch.distributed``.

PyTorch's own ``torch.nn.SyncBatchNorm`` refuses CPU tensors. This one runs
fastbn's kernels on each rank's slice and exchanges only per-channel
numbers, merged with the arithmetic of :mod:`fastbn._syncstats` (the same
as the MPI path of :mod:`fastbn.distributed`):

- forward (training): one ``all_gather`` of each rank's ``(count, mean, M2)``
  (``3C`` float64 values), merged in rank order, so every rank computes
  bitwise the same statistics and running statistics;
- backward: one ``all_reduce`` of ``(sum_dy, sum_dy_xhat)`` (``2C`` float64).

An empty slice (a rank with no samples) still takes part in both
collectives. Evaluation mode, and a group of one process, communicate
nothing: they run :func:`fastbn.torch.batch_norm`.
"""

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import registry, validation
from ._syncstats import elemt_sums, global_statistics, local_moments, update_running
from . import _torch_arrays as _arrays
from .torch import batch_norm

class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward and backward of one rank's slice; ``options`` holds
    ``(running_mean, running_var, momentum, eps, group, world_size, backend)``."""

    @staticmethod
    def forward(ctx, input, weight, bias, options):
        running_mean, running_var, momentum, eps, group, world_size, backend = options
        name = backend or registry.default_backend()
        module = registry.get_backend(name)
        if module.ON_DEVICE:
            raise ValueError(f"SyncBatchNorm on CPU tensors needs a CPU backend, got {name!r}")
        source, permutation, axis = _arrays.kernel_layout(input)
        x = _arrays.host_view(source, permutation)
        axis %= x.ndim
        shape3 = validation.canonical_shape(x.shape, axis)
        channels = shape3[1]
        x3 = x.reshape(shape3)
        local = torch.from_numpy(local_moments(module, x3, channels))
        gathered = torch.empty((world_size, 3, channels), dtype=torch.float64)
        dist.all_gather(list(gathered.unbind(0)), local, group=group)
        count, mean, invstd, m2 = global_statistics(gathered.numpy(), eps)
        if count < 2:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{count} value(s) per channel over {world_size} ranks")
        if running_mean is not None:
            new_mean, new_var = update_running(
                running_mean.detach().to(torch.float64).numpy(),
                running_var.detach().to(torch.float64).numpy(), mean, m2, count, momentum)
            running_mean.copy_(torch.from_numpy(new_mean))
            running_var.copy_(torch.from_numpy(new_var))
        param_dtype = _arrays.PARAM_DTYPES[input.dtype]
        gamma = _arrays.host_param(weight, channels, param_dtype, 1.0, "weight")
        beta = _arrays.host_param(bias, channels, param_dtype, 0.0, "bias")
        output, out = _arrays.new_output(source, permutation)
        if x3.size:
            module.normalize(x3, mean, invstd, gamma, beta, out.reshape(shape3))
        ctx.save_for_backward(input, weight, bias)
        ctx.state = (x3, mean, invstd, gamma, count, name, group, permutation)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors   # also checks for in-place changes
        x3, mean, invstd, gamma, count, name, group, permutation = ctx.state
        module = registry.get_backend(name)
        grad = _arrays.like_layout(grad_output, permutation)
        dy3 = _arrays.host_view(grad, permutation).reshape(x3.shape)
        local_count = x3.shape[0] * x3.shape[2]
        local = np.zeros((2, x3.shape[1]), dtype=np.float64)
        if local_count:
            local[0], local[1] = module.backward_reduce(dy3, x3, mean, invstd)
        total = torch.from_numpy(local.copy())
        dist.all_reduce(total, group=group)
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input, dx = _arrays.new_output(grad, permutation)
            if local_count:
                sum_dy, sum_dy_xhat = elemt_sums(total.numpy(), local_count, count)
                module.backward_elemt(dy3, x3, mean, invstd, gamma, sum_dy, sum_dy_xhat,
                                      dx.reshape(x3.shape))
        # The parameters' gradients are this rank's contributions, as in
        # PyTorch: DistributedDataParallel sums (averages) them over ranks.
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = torch.from_numpy(local[1]).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.from_numpy(local[0]).to(bias.dtype)
        return grad_input, grad_weight, grad_bias, None


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` that also runs on CPU tensors, on fastbn.

    The constructor is PyTorch's, plus ``backend`` (a fastbn CPU backend;
    None: the default at each call). Parameters, buffers, state dict and
    ``process_group`` are PyTorch's.

    On CPU tensors in training mode, with an initialized
    ``torch.distributed`` process group (gloo, or any backend with
    ``all_gather`` and ``all_reduce`` on CPU tensors) of more than one
    process, each rank normalizes its slice with the mean and variance of
    the whole batch: its output and input gradient are its slice of one
    batch norm over the concatenated batch, on every rank the running
    statistics (unbiased variance over the total count) and
    ``num_batches_tracked`` are the whole batch's, and the weight and bias
    gradients are the rank's own contributions (PyTorch's convention:
    ``DistributedDataParallel`` averages them). Ranks may hold different
    numbers of samples, one or none included. ``process_group`` picks a
    subgroup. The forward is one ``all_gather`` of ``3C`` float64 values
    (count, mean and centred sum of squares per channel, merged exactly in
    rank order), the backward one ``all_reduce`` of ``2C``.

    float16, bfloat16, float32 and float64 CPU tensors are synchronized
    (16-bit ones with fastbn's 16-bit storage: float32 arithmetic, float64
    sums, the weight and bias used as float32 values); evaluation mode, and
    a process group of one, run :func:`fastbn.torch.batch_norm` with no
    communication. CUDA tensors defer to PyTorch's implementation
    (``torch.nn.SyncBatchNorm.forward``, NCCL).
    """

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = validation.check_backend_name(backend)

    def forward(self, input):
        if input.device.type != "cpu":
            return super().forward(input)
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:   # cumulative average: the k-th batch weighs 1/k
                momentum = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_running else None
        running_var = self.running_var if pass_running else None
        group, world_size = None, 1
        if (self.training and batch_stats and dist.is_available()
                and dist.is_initialized()):
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size == 1:
            return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                              batch_stats, momentum, self.eps, backend=self.backend)
        _arrays.check_tensor(input)
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias,
            (running_mean, running_var, momentum, float(self.eps), group, world_size,
             self.backend))

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None, *, backend=None):
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` giving this class:
        every ``torch.nn.BatchNorm*d`` of ``module`` becomes a fastbn
        ``SyncBatchNorm`` over ``process_group`` (the returned module; the
        state is kept)."""
        from .torch import convert_batchnorm
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        return convert_batchnorm(converted, backend=backend)


def _allow_cpu_sync_batchnorm_in_ddp():
    """Let ``DistributedDataParallel`` wrap CPU models whose synchronized batch
    norms are all fastbn's.

    DDP's constructor refuses a CPU model holding any ``torch.nn.SyncBatchNorm``
    ("SyncBatchNorm layers only work with GPU modules"), because PyTorch's
    runs on GPUs only; the check is ``isinstance``, so it refuses this
    subclass too. The check is replaced by one that refuses only the other
    (PyTorch's own) synchronized batch norms of a CPU model, with PyTorch's
    message; GPU models are checked as before.
    """
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    check = getattr(ddp, "_passing_sync_batchnorm_handle", None)
    if check is None or getattr(check, "_fastbn", False):
        return

    def passing_sync_batchnorm_handle(self, module):
        if getattr(self, "device_type", None) == "cpu":
            others = [layer for layer in module.modules()
                      if isinstance(layer, torch.nn.SyncBatchNorm)
                      and not isinstance(layer, SyncBatchNorm)]
            if not others:
                return None
        return check(self, module)

    passing_sync_batchnorm_handle._fastbn = True
    ddp._passing_sync_batchnorm_handle = passing_sync_batchnorm_handle


_allow_cpu_sync_batchnorm_in_ddp()
