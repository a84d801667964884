"""Ranks of tests/test_torch_sync.py: each spawned process joins a gloo group
on the loopback address and runs one case. A failed check raises, and the
parent's join reports it with this rank's traceback."""
import copy
import datetime

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastbn.torch

EPS64 = float(np.finfo(np.float64).eps)
# (shape of one sample, memory format) of the inputs: 2-D, 3-D, 4-D (both
# layouts) and 5-D
LAYOUTS = [((5,), None), ((4, 7), None), ((3, 4, 5), None),
           ((3, 4, 5), torch.channels_last), ((2, 3, 4, 3), None)]
# Samples per rank: uneven, with a rank of one sample and an empty rank
SIZES = {2: [[3, 1], [0, 4]], 3: [[2, 0, 3], [1, 1, 1]]}


def run(rank, world, init_method, case, options):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        CASES[case](rank, world, **options)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------
# Bounds from the arithmetic
# --------------------------------------------------------------------------

def _bound(dtype, count, magnitude):
    """Error bound of a result of ``dtype`` whose terms have ``magnitude``:
    a few roundings to ``dtype`` (storage and the elementwise arithmetic),
    and float64 sums of ``count`` terms (the statistics and reductions)."""
    eps = float(torch.finfo(dtype).eps)
    return (8 * eps + 4 * count * EPS64) * magnitude


def _close(name, got, expected, bound):
    error = (got.double() - expected).abs()
    worst = (error - bound).max().item() if error.numel() else 0.0
    assert worst <= 0, (f"{name}: error {error.max().item():.3e} over its bound "
                        f"(largest excess {worst:.3e})")


def _reference(x, dy, weight, bias, running_mean, running_var, momentum, eps):
    """One float64 batch norm over the whole batch: output, statistics, gradients."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    count = x.numel() // x.shape[1]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    invstd = 1.0 / torch.sqrt(var + eps)
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    leaf = x.clone().requires_grad_()
    out = F.batch_norm(leaf, None, None, weight, bias, True, 0.0, eps)
    out.backward(dy)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * count / (count - 1)
    return dict(out=out.detach(), dx=leaf.grad, xhat=xhat, mean=mean, var=var, invstd=invstd,
                count=count, running_mean=new_mean, running_var=new_var, shape=shape,
                dims=dims)


def _check_rank(rank, sizes, x_full, dy_full, module, ref, dtype, label):
    """Forward and backward of ``module`` on this rank's slice, against ``ref``."""
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    shape, dims, count = ref["shape"], ref["dims"], ref["count"]
    x = x_full[start:stop].to(dtype)
    memory_format = getattr(module, "_test_format", None)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_()
    out = module(x)
    out.backward(dy_full[start:stop].to(dtype))
    x64 = x_full[start:stop]
    dy64 = dy_full[start:stop]
    gamma = module.weight.detach().double().view(shape)
    beta = module.bias.detach().double().view(shape)
    invstd = ref["invstd"].view(shape)
    centred = (x64.abs() + ref["mean"].view(shape).abs()) * invstd
    _close(f"{label} out", out.detach(), ref["out"][start:stop],
           _bound(dtype, count, centred * gamma.abs() + beta.abs()))
    mean_dy = dy_full.mean(dims).view(shape)
    mean_dy_xhat = (dy_full * ref["xhat"]).mean(dims).view(shape)
    _close(f"{label} dx", x.grad, ref["dx"][start:stop],
           _bound(dtype, count, gamma.abs() * invstd * (
               dy64.abs() + mean_dy.abs() + centred * mean_dy_xhat.abs())))
    xhat = ref["xhat"][start:stop]
    # the weight and bias gradients: this rank's own contributions
    _close(f"{label} dweight", module.weight.grad, (dy64 * xhat).sum(dims),
           _bound(dtype, count, (dy64.abs() * centred).sum(dims)))
    _close(f"{label} dbias", module.bias.grad, dy64.sum(dims),
           _bound(dtype, count, dy64.abs().sum(dims)))
    if memory_format is not None and out.numel():
        assert out.is_contiguous(memory_format=memory_format), label
    return out


def _check_running(module, ref, previous, dtype, label, group=None):
    count = ref["count"]
    mean_bound = _bound(dtype, count, previous[0].abs() + ref["mean"].abs())
    var_bound = _bound(dtype, count, previous[1].abs() + ref["var"] * count / (count - 1))
    _close(f"{label} running_mean", module.running_mean, ref["running_mean"], mean_bound)
    _close(f"{label} running_var", module.running_var, ref["running_var"], var_bound)
    assert int(module.num_batches_tracked) == 1, label
    # bitwise the same on every rank of the group: the merge is exact, in rank order
    state = torch.stack([module.running_mean.double(), module.running_var.double()])
    size = dist.get_world_size(group)
    copies = [torch.empty_like(state) for _ in range(size)]
    dist.all_gather(copies, state, group=group)
    assert all(torch.equal(copy, copies[0]) for copy in copies), label


def _module(channels, dtype, backend, generator, memory_format, **kwargs):
    module = fastbn.torch.SyncBatchNorm(channels, backend=backend, **kwargs).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
        module.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        module.running_mean.copy_(torch.randn(channels, generator=generator,
                                              dtype=torch.float64))
        module.running_var.copy_(torch.rand(channels, generator=generator,
                                            dtype=torch.float64) + 0.5)
    module._test_format = memory_format
    return module


def _batch(sizes, sample_shape, dtype, generator):
    """The whole batch (values of ``dtype``, held in float64) and its upstream gradient."""
    total = sum(sizes)
    scale = torch.rand((1, sample_shape[0]) + (1,) * (len(sample_shape) - 1),
                       generator=generator, dtype=torch.float64) * 3 + 0.5
    shift = torch.randn((1, sample_shape[0]) + (1,) * (len(sample_shape) - 1),
                        generator=generator, dtype=torch.float64) * 2
    x = torch.randn((total,) + sample_shape, generator=generator, dtype=torch.float64)
    x = (x * scale + shift).to(dtype).double()
    dy = torch.randn((total,) + sample_shape, generator=generator, dtype=torch.float64)
    return x, dy.to(dtype).double()


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

def matches_one_batch_norm(rank, world, backends):
    """Every layout, dtype, backend and split: each rank's results are its
    slice of one float64 batch norm over the gathered batch. 16-bit inputs
    (a module of 16-bit parameters and buffers) run fastbn's 16-bit storage:
    their bounds are those of a few roundings to 16 bits."""
    eps = 1e-5
    for backend in backends:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            for sizes in SIZES[world]:
                for index, (sample_shape, memory_format) in enumerate(LAYOUTS):
                    label = (f"rank {rank}/{world} {backend} {dtype} sizes {sizes} "
                             f"sample {sample_shape} {memory_format}")
                    generator = torch.Generator().manual_seed(1000 * index + sum(sizes))
                    x_full, dy_full = _batch(sizes, sample_shape, dtype, generator)
                    momentum = None if index == 2 else 0.3
                    module = _module(sample_shape[0], dtype, backend, generator,
                                     memory_format, momentum=momentum, eps=eps)
                    previous = (module.running_mean.double().clone(),
                                module.running_var.double().clone())
                    ref = _reference(x_full, dy_full, module.weight.detach().double(),
                                     module.bias.detach().double(), previous[0],
                                     previous[1], 1.0 if momentum is None else momentum, eps)
                    _check_rank(rank, sizes, x_full, dy_full, module, ref, dtype, label)
                    _check_running(module, ref, previous, dtype, label)


def subgroup(rank, world, backends):
    """``process_group=`` picks a subgroup: ranks 0 and 2 share the statistics
    of their two slices; rank 1, in a group of its own, runs alone."""
    pair = dist.new_group([0, 2])
    solo = dist.new_group([1])   # every rank creates every group, in the same order
    members, group = ([1], solo) if rank == 1 else ([0, 2], pair)
    sizes = [3, 2, 4]
    generator = torch.Generator().manual_seed(7)
    x_full, dy_full = _batch(sizes, (3, 4), torch.float64, generator)
    slices = [slice(sum(sizes[:r]), sum(sizes[:r + 1])) for r in members]
    x_group = torch.cat([x_full[s] for s in slices])
    dy_group = torch.cat([dy_full[s] for s in slices])
    for backend in backends:
        label = f"rank {rank} in {members} {backend}"
        module = _module(3, torch.float64, backend, torch.Generator().manual_seed(8), None,
                         process_group=group)
        previous = (module.running_mean.double().clone(), module.running_var.double().clone())
        ref = _reference(x_group, dy_group, module.weight.detach().double(),
                         module.bias.detach().double(), previous[0], previous[1], 0.1, 1e-5)
        _check_rank(members.index(rank), [sizes[r] for r in members], x_group, dy_group,
                    module, ref, torch.float64, label)
        _check_running(module, ref, previous, torch.float64, label, group=group)


def evaluation_does_not_communicate(rank, world, backends):
    """Evaluation mode: PyTorch's batch norm with the running statistics, and
    not one collective (each is replaced by one that fails)."""
    def refuse(*args, **kwargs):
        raise AssertionError("evaluation mode called a collective")

    generator = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(2 + rank, 3, 4, 5, generator=generator, dtype=torch.float64)
    saved = {name: getattr(dist, name) for name in ("all_gather", "all_reduce",
                                                    "all_gather_into_tensor", "broadcast")}
    for backend in backends:
        module = _module(3, torch.float64, backend, generator, None).eval()
        stock = torch.nn.BatchNorm2d(3).double().eval()
        stock.load_state_dict(module.state_dict())
        try:
            for name in saved:
                setattr(dist, name, refuse)
            xs = x.clone().requires_grad_()
            out = module(xs)
            out.backward(torch.ones_like(out))
        finally:
            for name, function in saved.items():
                setattr(dist, name, function)
        xr = x.clone().requires_grad_()
        expected = stock(xr)
        expected.backward(torch.ones_like(expected))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-12, atol=1e-12)
        assert int(module.num_batches_tracked) == 0


def _small_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).double()


def ddp_step(rank, world, backends, steps=2):
    """DistributedDataParallel over a converted model: after each SGD step the
    parameters and running statistics equal those of one process training
    the stock model on the whole batch."""
    sizes = [3, 5, 4][:world]
    total = sum(sizes)
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for backend in backends:
        torch.manual_seed(5)
        stock = _small_net()
        model = copy.deepcopy(stock)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        fastbn.torch.convert_batchnorm(model, backend=backend)
        assert sum(isinstance(m, fastbn.torch.SyncBatchNorm) for m in model.modules()) == 3
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
        reference = torch.optim.SGD(stock.parameters(), lr=0.5, momentum=0.9)
        generator = torch.Generator().manual_seed(17)
        for step in range(steps):
            x = torch.randn(total, 3, 6, 5, generator=generator, dtype=torch.float64)
            target = torch.randint(0, 3, (total,), generator=generator)
            reference.zero_grad()
            F.cross_entropy(stock(x), target).backward()
            reference.step()
            optimizer.zero_grad()
            # DDP averages the ranks' gradients: scale each rank's summed loss
            # so that the average is the whole batch's mean loss
            loss = F.cross_entropy(ddp(x[start:stop]), target[start:stop], reduction="sum")
            (loss * world / total).backward()
            optimizer.step()
            for (name, got), expected in zip(model.state_dict().items(),
                                             stock.state_dict().values()):
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11,
                                           msg=f"rank {rank} {backend} step {step} {name}")


def ddp_resnet18_step_time(rank, world, backends, result):
    """Time of a DDP training step of torchvision's ResNet-18 (batch per rank,
    size, threads and rounds in ``result``): fastbn's SyncBatchNorm against
    unsynchronized batch norm on each rank (PyTorch's, and fastbn's), in
    interleaved rounds of fastbn.bench.timing; rank 0 writes the figures.
    Run by hand (see docs/pytorch.md), not by the tests."""
    from fastbn.bench import timing
    from fastbn.bench.suites.torch_model import import_torchvision

    torch.set_num_threads(int(result["threads"]))
    torchvision = import_torchvision()
    batch, size = int(result["batch"]), int(result["size"])
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=100)
    converted = fastbn.torch.convert_batchnorm(copy.deepcopy(plain))
    synced = fastbn.torch.convert_batchnorm(
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)))
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 100, (batch,))
    steps = {}
    for name, model in (("torch BatchNorm2d", plain), ("fastbn BatchNorm2d", converted),
                        ("fastbn SyncBatchNorm", synced)):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)

        def step(ddp=ddp, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), target).backward()
            optimizer.step()
        steps[name] = step
    rounds = int(result["rounds"])
    got = timing.interleaved(steps, rounds=rounds, max_rounds=rounds, min_seconds=0.0,
                             calls=1, barrier=dist.barrier)
    if rank == 0:
        with open(result["path"], "w") as file:
            for name in steps:
                file.write(f"{name}: median {got[name].median:.4f} s, best "
                           f"{got[name].best:.4f} s, load {got.load_before} -> "
                           f"{got.load_after}\n")


CASES = {"matches_one_batch_norm": matches_one_batch_norm, "subgroup": subgroup,
         "evaluation_does_not_communicate": evaluation_does_not_communicate,
         "ddp_step": ddp_step, "ddp_resnet18_step_time": ddp_resnet18_step_time}
