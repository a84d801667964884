"""The cuda backend against PyTorch CUDA (``--suite cuda``; needs a GPU).

Per shape and dtype, one group of interleaved rounds on the device (the
timing core's device variant: a sample is back-to-back calls followed by
a synchronization of Numba and PyTorch, inside the timed interval):
fastbn's training forward, simplified and staged backward on Numba device
arrays that view PyTorch's tensors, with ``out=``; PyTorch's
``F.batch_norm`` and its autograd backward (cuDNN); and ``copy_`` of the
same tensor, the bandwidth of the copy limit. A first table gives the host
overhead per call on a tiny tensor.
"""
import numpy as np

from .. import timing
from ..kernels import EPS, MOMENTUM, format_shape, numpy_dtype
from ..report import Report, cell
from . import progress

SHAPES = [(256, 4096), (128, 512, 7, 7), (64, 256, 14, 14), (32, 64, 56, 56),
          (64, 256, 56, 56), (256, 256, 56, 56)]
TINY_SHAPE = (8, 16, 4, 4)
DTYPES = ["float32", "float64", "float16", "bfloat16"]


def _as_numba(tensor):
    """A Numba device array viewing a CUDA tensor (bfloat16 through its int16 bits)."""
    import torch
    from numba import cuda

    if tensor.dtype != torch.bfloat16:
        return cuda.as_cuda_array(tensor)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    bits = cuda.as_cuda_array(tensor.view(torch.int16))
    return DeviceNDArray(bits.shape, bits.strides, numpy_dtype("bfloat16"),
                         gpu_data=bits.gpu_data)


def device_kernels(shape, dtype):
    """fastbn's and PyTorch's kernels, and the copy, on one CUDA batch.

    Returns
    -------
    dict
        ``name -> callable`` with no arguments.
    """
    import torch
    import torch.nn.functional as F
    from numba import cuda

    import fastbn

    tdtype = getattr(torch, dtype)
    pdtype = torch.float32 if dtype in ("float16", "bfloat16") else tdtype
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=generator).to(tdtype)
    dy = torch.randn(shape, device="cuda", generator=generator).to(tdtype)
    weight = torch.rand(shape[1], device="cuda", dtype=pdtype, generator=generator) + 0.5
    bias = torch.randn(shape[1], device="cuda", dtype=pdtype, generator=generator)
    rm = torch.zeros(shape[1], device="cuda", dtype=pdtype)
    rv = torch.ones(shape[1], device="cuda", dtype=pdtype)
    nx, ndy = _as_numba(x), _as_numba(dy)
    nw, nb = cuda.as_cuda_array(weight), cuda.as_cuda_array(bias)
    nrm, nrv = cuda.as_cuda_array(rm.clone()), cuda.as_cuda_array(rv.clone())
    out = cuda.device_array(shape, dtype=numpy_dtype(dtype))
    dx = cuda.device_array(shape, dtype=numpy_dtype(dtype))
    copy_target = torch.empty_like(x)
    _, cache = fastbn.batchnorm_forward(nx, nw, nb, running_mean=nrm, running_var=nrv,
                                        out=out)
    xg = x.detach().requires_grad_(True)
    wg = weight.detach().requires_grad_(True)
    bg = bias.detach().requires_grad_(True)
    y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)
    return {
        "fastbn forward": lambda: fastbn.batchnorm_forward(
            nx, nw, nb, running_mean=nrm, running_var=nrv, out=out),
        "fastbn simplified": lambda: fastbn.batchnorm_backward(ndy, cache, out=dx),
        "fastbn staged": lambda: fastbn.batchnorm_backward(ndy, cache, method="staged",
                                                           out=dx),
        "torch forward": lambda: F.batch_norm(x, rm, rv, weight, bias, training=True,
                                              momentum=MOMENTUM, eps=EPS),
        "torch simplified": lambda: torch.autograd.grad(y, (xg, wg, bg), dy,
                                                        retain_graph=True),
        timing.COPY: lambda: copy_target.copy_(x),
    }


def run(options):
    """The overhead table and the timing table; see the module docstring.

    Returns
    -------
    fastbn.bench.report.Report

    Raises
    ------
    RuntimeError
        Without PyTorch CUDA, a GPU or the cuda backend.
    """
    try:
        import torch
    except ImportError:
        raise RuntimeError("the cuda suite needs PyTorch with CUDA (its peer)") from None
    if not torch.cuda.is_available():
        raise RuntimeError("the cuda suite needs a CUDA GPU; torch.cuda.is_available() is False")
    import fastbn
    if "cuda" not in fastbn.available_backends():
        reason = fastbn.backend_info().get("cuda", {}).get("reason")
        raise RuntimeError(f"the cuda backend cannot run here: {reason}")
    from numba import cuda

    def synchronize():
        torch.cuda.synchronize()
        cuda.synchronize()

    shapes = options.shapes or options.pick(SHAPES, SHAPES[:4], [TINY_SHAPE])
    dtypes = options.dtypes or options.pick(DTYPES, ["float32"], ["float32"])
    rounds = options.rounds or options.pick(5, 3, 2)
    report = Report("fastbn `cuda` backend against PyTorch CUDA", options.command)
    report.add_fact(f"device: {torch.cuda.get_device_name()}, cuDNN "
                    f"{torch.backends.cudnn.version()}; {rounds} interleaved rounds, each "
                    "sample back-to-back calls then a device synchronization; medians")
    overhead = []
    for dtype in dtypes:
        got = timing.interleaved(device_kernels(TINY_SHAPE, dtype), rounds,
                                 min_seconds=0.02, synchronize=synchronize)
        overhead.append([dtype] + [cell(got[n].median * 1e6 if got[n].median else None, 1)
                                   for n in ("fastbn forward", "fastbn simplified",
                                             "torch forward", "torch simplified")])
    report.add_table(f"Host overhead per call, {TINY_SHAPE}, us", [
        "dtype", "fastbn fwd", "fastbn bwd", "torch fwd", "torch bwd"], overhead)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            progress(options, f"cuda {format_shape(shape)} {dtype}")
            got = timing.interleaved(device_kernels(shape, dtype), rounds,
                                     min_seconds=0.01, synchronize=synchronize)
            report.add_warnings(got.warnings(f"{format_shape(shape)} {dtype}"))
            ms = {n: (t.median * 1e3 if t.median else None) for n, t in got.items()}
            rows.append([dtype, str(shape)] + [cell(ms[n], 3) for n in (
                "fastbn forward", "fastbn simplified", "fastbn staged", "torch forward",
                "torch simplified")] + [
                cell(got.ratio("torch forward", "fastbn forward", "median")),
                cell(got.ratio("torch simplified", "fastbn simplified", "median")),
                cell(timing.fraction_of_copy_limit("forward", ms["fastbn forward"],
                                                   ms[timing.COPY])),
                cell(timing.fraction_of_copy_limit("backward", ms["fastbn simplified"],
                                                   ms[timing.COPY])),
                cell(got.ratio("fastbn staged", "fastbn simplified", "median"))])
            torch.cuda.empty_cache()
    report.add_table("Times and ratios", [
        "dtype", "shape", "fwd ms", "bwd ms", "staged ms", "torch fwd ms", "torch bwd ms",
        "fwd vs torch", "bwd vs torch", "fwd roof", "bwd roof", "staged/simplified"], rows,
        "*vs torch*: PyTorch's time / fastbn's; *roof*: fraction of the copy limit "
        "(2 item sizes per element forward, 3 backward, at the bandwidth of `copy_`).")
    report.data["numpy"] = np.__version__
    return report
