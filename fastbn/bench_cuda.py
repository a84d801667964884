"""``fastbn bench --device cuda``: the cuda backend against PyTorch CUDA.

Times, on device arrays and in one run, fastbn's ``cuda`` backend and
PyTorch's batch norm on the same GPU (``torch.nn.functional.batch_norm``
for the forward, its autograd backward, through cuDNN where PyTorch picks
it), and prints one table per dtype:

* ``ms``: time per call, best of several loops of calls, with the device
  synchronized before and after each loop (wall clock, launch overhead
  included, as a training loop sees it);
* ``roof``: the fraction of the copy limit, the compulsory traffic (2 item
  sizes per element forward, 3 backward) at the speed of a device-to-device
  copy of the same tensor timed in the same row;
* ``vs torch``: PyTorch's time / fastbn's (above 1: fastbn is faster);
* ``staged x``: the staged backward's time / the simplified one's;
* ``err``: the largest error against a float64 PyTorch computation of the
  same batch norm, relative to the largest value.

A first table gives the host overhead per call on a tiny tensor, where the
GPU work is negligible: calls are issued back to back with one
synchronization at the end, so the time per call is the host's.

Dtypes: float32, float64, float16 and bfloat16. For the 16-bit dtypes the
tensors are 16-bit and the parameters and running statistics float32 on both
sides (PyTorch's mixed-precision batch norm), and the copy limit counts the
16-bit bytes (2 x 2 bytes per element forward, 3 x 2 backward). ``act``
``relu`` rows time fastbn's fused ``activation="relu"`` (forward and the
backward on its cache) against PyTorch's ``F.batch_norm`` followed by
``relu_`` and the autograd backward through both.

fastbn's inputs are Numba device arrays viewing the PyTorch tensors' memory
(made once, outside the timing; a bfloat16 tensor, which has no CUDA array
interface type, is viewed through its int16 bits as a Numba device array of
dtype ``ml_dtypes.bfloat16``); its outputs are preallocated (``out=``).
torch and a CUDA GPU are needed; nothing here runs on the CPU.
"""
import json
import time

import numpy as np

DEFAULT_SHAPES = ((256, 4096), (128, 512, 7, 7), (64, 256, 14, 14), (32, 64, 56, 56),
                  (64, 256, 56, 56), (256, 256, 56, 56))
QUICK_SHAPES = DEFAULT_SHAPES[:4]
TINY_SHAPE = (8, 16, 4, 4)
REPEAT = 5
EPS = 1e-5
MOMENTUM = 0.1


def _numpy_dtype(name):
    """The NumPy dtype of a dtype name (bfloat16 from ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _param_dtype(torch, tdtype):
    """float32 parameters for 16-bit tensors (mixed precision), else the tensor's."""
    return torch.float32 if tdtype in (torch.float16, torch.bfloat16) else tdtype


def _as_numba(tensor):
    """A Numba device array viewing a CUDA tensor's memory (no copy).

    bfloat16 tensors have no ``__cuda_array_interface__`` type: their int16
    bits are viewed and the Numba array gets the ``ml_dtypes.bfloat16`` dtype.
    """
    import torch
    from numba import cuda
    if tensor.dtype != torch.bfloat16:
        return cuda.as_cuda_array(tensor)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    bits = cuda.as_cuda_array(tensor.view(torch.int16))
    return DeviceNDArray(bits.shape, bits.strides, _numpy_dtype("bfloat16"),
                         gpu_data=bits.gpu_data)


def _as_torch(array):
    """A CUDA tensor viewing a Numba device array (bfloat16 through its bits)."""
    import torch
    if np.dtype(array.dtype).name != "bfloat16":
        return torch.as_tensor(array, device="cuda")
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    bits = DeviceNDArray(array.shape, array.strides, np.int16, gpu_data=array.gpu_data)
    return torch.as_tensor(bits, device="cuda").view(torch.bfloat16)


def _parse_shapes(text):
    if not text:
        return None
    return tuple(tuple(int(n) for n in part.lower().split("x")) for part in text.split(","))


def _loop_time(function, calls, repeat, synchronize):
    """Best time per call over ``repeat`` loops of ``calls`` calls."""
    function()
    synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _calls_for(nbytes):
    """Enough calls per loop that one loop takes milliseconds, not microseconds."""
    return int(max(3, min(200, 2e9 / max(nbytes, 1))))


def _relative_error(actual, expected):
    actual = actual.detach().double()
    expected = expected.detach().double()
    scale = float(expected.abs().max())
    return float((actual - expected).abs().max()) / (scale if scale > 0 else 1.0)


def measure(shapes, dtypes, repeat, activations=(None,)):
    """Time every shape, dtype and activation; returns a dict of rows (see module doc)."""
    import torch
    import torch.nn.functional as F
    from numba import cuda

    import fastbn

    def synchronize():
        torch.cuda.synchronize()
        cuda.synchronize()

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(), "overhead": [], "rows": []}
    generator = torch.Generator(device="cuda").manual_seed(0)

    # Host overhead per call on a tiny tensor.
    for dtype in dtypes:
        tdtype = getattr(torch, dtype)
        pdtype = _param_dtype(torch, tdtype)
        x = torch.randn(TINY_SHAPE, device="cuda", dtype=tdtype, generator=generator)
        dy = torch.randn_like(x)
        C = TINY_SHAPE[1]
        weight = torch.ones(C, device="cuda", dtype=pdtype)
        bias = torch.zeros(C, device="cuda", dtype=pdtype)
        rm = torch.zeros(C, device="cuda", dtype=pdtype)
        rv = torch.ones(C, device="cuda", dtype=pdtype)
        nx, ndy = _as_numba(x), _as_numba(dy)
        nw, nb = cuda.as_cuda_array(weight), cuda.as_cuda_array(bias)
        nrm, nrv = cuda.as_cuda_array(rm), cuda.as_cuda_array(rv)
        out = cuda.device_array(TINY_SHAPE, dtype=_numpy_dtype(dtype))
        dx = cuda.device_array(TINY_SHAPE, dtype=_numpy_dtype(dtype))
        _, cache = fastbn.batchnorm_forward(nx, nw, nb, running_mean=nrm, running_var=nrv)

        def fb_forward():
            fastbn.batchnorm_forward(nx, nw, nb, running_mean=nrm, running_var=nrv, out=out)

        def fb_forward_torch_tensors():
            fastbn.batchnorm_forward(x, weight, bias, running_mean=rm, running_var=rv)

        def fb_backward():
            fastbn.batchnorm_backward(ndy, cache, out=dx)

        xg = x.detach().requires_grad_(True)
        wg = weight.detach().requires_grad_(True)
        bg = bias.detach().requires_grad_(True)
        y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)

        def torch_forward():
            F.batch_norm(x, rm, rv, weight, bias, training=True, momentum=MOMENTUM, eps=EPS)

        def torch_backward():
            torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)

        calls = 2000
        row = {
            "dtype": dtype, "shape": list(TINY_SHAPE),
            "fastbn_forward_us": 1e6 * _loop_time(fb_forward, calls, repeat, synchronize),
            "fastbn_forward_torch_tensors_us": float("nan"),
            "fastbn_backward_us": 1e6 * _loop_time(fb_backward, calls, repeat, synchronize),
            "torch_forward_us": 1e6 * _loop_time(torch_forward, calls, repeat, synchronize),
            "torch_backward_us": 1e6 * _loop_time(torch_backward, calls, repeat, synchronize),
        }
        if tdtype != torch.bfloat16:   # no CUDA array interface for bfloat16 tensors
            row["fastbn_forward_torch_tensors_us"] = 1e6 * _loop_time(
                fb_forward_torch_tensors, calls, repeat, synchronize)
        results["overhead"].append(row)

    for dtype in dtypes:
        tdtype = getattr(torch, dtype)
        pdtype = _param_dtype(torch, tdtype)
        for activation in activations:
            for shape in shapes:
                results["rows"].append(_measure_row(
                    shape, dtype, tdtype, pdtype, activation, repeat, generator,
                    synchronize))
                torch.cuda.empty_cache()
    return results


def _measure_row(shape, dtype, tdtype, pdtype, activation, repeat, generator, synchronize):
    """One row: fastbn and PyTorch at one shape, dtype and activation."""
    import torch
    import torch.nn.functional as F
    from numba import cuda

    import fastbn

    relu = activation == "relu"
    C = shape[1]
    x = (torch.randn(shape, device="cuda", dtype=torch.float32, generator=generator) * 3
         + 1).to(tdtype)
    dy = torch.randn(shape, device="cuda", dtype=torch.float32, generator=generator).to(tdtype)
    weight = torch.rand(C, device="cuda", dtype=pdtype, generator=generator) + 0.5
    bias = torch.randn(C, device="cuda", dtype=pdtype, generator=generator)
    rm = torch.zeros(C, device="cuda", dtype=pdtype)
    rv = torch.ones(C, device="cuda", dtype=pdtype)
    nx, ndy = _as_numba(x), _as_numba(dy)
    nw, nb = cuda.as_cuda_array(weight), cuda.as_cuda_array(bias)
    nrm, nrv = cuda.as_cuda_array(rm.clone()), cuda.as_cuda_array(rv.clone())
    out = cuda.device_array(shape, dtype=_numpy_dtype(dtype))
    dx = cuda.device_array(shape, dtype=_numpy_dtype(dtype))
    copy_target = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    calls = _calls_for(nbytes)
    act = {"activation": "relu"} if relu else {}

    def fastbn_forward():
        return fastbn.batchnorm_forward(nx, nw, nb, running_mean=nrm, running_var=nrv,
                                        out=out, **act)

    _, cache = fastbn_forward()

    def torch_forward():
        result = F.batch_norm(x, rm, rv, weight, bias, training=True, momentum=MOMENTUM,
                              eps=EPS)
        if relu:
            result.relu_()
        return result

    xg = x.detach().requires_grad_(True)
    wg = weight.detach().requires_grad_(True)
    bg = bias.detach().requires_grad_(True)
    y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)
    if relu:
        y = y.relu_()

    # Errors against float64 PyTorch, from one call of each.
    x64 = x.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    b64 = bias.double().requires_grad_(True)
    y64 = F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS)
    if relu:
        y64 = torch.relu(y64)
    dx64, dw64, db64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    _, dgamma, dbeta = fastbn.batchnorm_backward(ndy, cache, out=dx)
    synchronize()
    error_forward = _relative_error(_as_torch(out), y64)
    error_dx = _relative_error(_as_torch(dx), dx64)
    error_dgamma = _relative_error(torch.as_tensor(dgamma, device="cuda"), dw64)
    torch_out = torch_forward()
    torch_dx, torch_dw, _ = torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)
    synchronize()
    torch_error_forward = _relative_error(torch_out, y64)
    torch_error_dx = _relative_error(torch_dx, dx64)
    del x64, w64, b64, y64, dx64, dw64, db64, torch_out, torch_dx, torch_dw

    times = {
        "copy": _loop_time(lambda: copy_target.copy_(x), calls, repeat, synchronize),
        "fastbn_forward": _loop_time(fastbn_forward, calls, repeat, synchronize),
        "fastbn_backward": _loop_time(
            lambda: fastbn.batchnorm_backward(ndy, cache, out=dx), calls, repeat, synchronize),
        "fastbn_staged": _loop_time(
            lambda: fastbn.batchnorm_backward(ndy, cache, method="staged", out=dx),
            max(3, calls // 4), max(2, repeat // 2), synchronize),
        "torch_forward": _loop_time(torch_forward, calls, repeat, synchronize),
        "torch_backward": _loop_time(
            lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True),
            calls, repeat, synchronize),
    }
    # copy moves 2 item sizes per element (16-bit: 2 x 2 bytes); forward 2, backward 3
    limit_forward = times["copy"]
    limit_backward = times["copy"] * 1.5
    return {
        "shape": list(shape), "dtype": dtype, "activation": activation or "none",
        "megabytes": nbytes / 1e6,
        "ms": {k: 1e3 * v for k, v in times.items()},
        "copy_tb_per_s": 2 * nbytes / times["copy"] / 1e12,
        "roof_forward": limit_forward / times["fastbn_forward"],
        "roof_backward": limit_backward / times["fastbn_backward"],
        "torch_roof_forward": limit_forward / times["torch_forward"],
        "torch_roof_backward": limit_backward / times["torch_backward"],
        "vs_torch_forward": times["torch_forward"] / times["fastbn_forward"],
        "vs_torch_backward": times["torch_backward"] / times["fastbn_backward"],
        "staged_over_simplified": times["fastbn_staged"] / times["fastbn_backward"],
        "error_forward": error_forward, "error_dx": error_dx,
        "error_dgamma": error_dgamma,
        "torch_error_forward": torch_error_forward, "torch_error_dx": torch_error_dx,
    }


def format_tables(results):
    """The results as Markdown tables (a list of lines)."""
    lines = [f"device: {results['device']}, torch {results['torch']}, "
             f"cuDNN {results['cudnn']}", ""]
    lines += ["Host overhead per call, tiny tensor (µs; back-to-back calls, one sync):", "",
              "| dtype | shape | fastbn fwd | fastbn fwd (torch tensors in) | fastbn bwd "
              "| torch fwd | torch bwd |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["overhead"]:
        shape = "x".join(str(n) for n in row["shape"])
        lines.append(
            f"| {row['dtype']} | {shape} | {row['fastbn_forward_us']:.0f} "
            f"| {row['fastbn_forward_torch_tensors_us']:.0f} | {row['fastbn_backward_us']:.0f} "
            f"| {row['torch_forward_us']:.0f} | {row['torch_backward_us']:.0f} |")
    lines += ["", "| shape | dtype | act | MB | copy TB/s | fwd ms | torch fwd ms "
              "| fwd vs torch | fwd roof | torch fwd roof | bwd ms | torch bwd ms "
              "| bwd vs torch | bwd roof | torch bwd roof | staged ms | staged x | err fwd "
              "| err dx | err dgamma | torch err fwd | torch err dx |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["rows"]:
        ms = row["ms"]
        shape = "x".join(str(n) for n in row["shape"])
        lines.append(
            f"| {shape} | {row['dtype']} | {row.get('activation', 'none')} "
            f"| {row['megabytes']:.0f} | {row['copy_tb_per_s']:.2f} "
            f"| {ms['fastbn_forward']:.3f} | {ms['torch_forward']:.3f} "
            f"| {row['vs_torch_forward']:.2f}x | {row['roof_forward']:.2f} "
            f"| {row['torch_roof_forward']:.2f} | {ms['fastbn_backward']:.3f} "
            f"| {ms['torch_backward']:.3f} | {row['vs_torch_backward']:.2f}x "
            f"| {row['roof_backward']:.2f} | {row['torch_roof_backward']:.2f} "
            f"| {ms['fastbn_staged']:.3f} | {row['staged_over_simplified']:.1f}x "
            f"| {row['error_forward']:.1e} | {row['error_dx']:.1e} | {row['error_dgamma']:.1e} "
            f"| {row.get('torch_error_forward', float('nan')):.1e} "
            f"| {row.get('torch_error_dx', float('nan')):.1e} |")
    return lines


def _dtypes_from(text, quick):
    """Dtype names from ``--dtype`` (comma-separated; "both" = float32,float64)."""
    if not text:
        return ["float32"] if quick else ["float32", "float64"]
    from .bench import parse_dtypes
    return parse_dtypes(text)


def _activations_from(text):
    """``--activation``: none -> [None], relu -> ["relu"], both -> [None, "relu"]."""
    return {"relu": ["relu"], "both": [None, "relu"]}.get(text or "none", [None])


def run(args):
    """The ``bench --device cuda`` command.

    Reads ``args.shapes``, ``args.dtype`` (comma-separated names among
    float32, float64, float16, bfloat16, or "both"), ``args.activation``
    (none, relu or both), ``args.repeat``, ``args.quick`` and ``args.json``
    (see :func:`fastbn.bench.add_arguments`).

    Returns
    -------
    int
        The exit status: 0, or 1 when PyTorch or a CUDA GPU is missing.
    """
    try:
        import torch
    except ImportError:
        print("fastbn bench --device cuda needs PyTorch with CUDA (the peer it is timed against)")
        return 1
    if not torch.cuda.is_available():
        print("fastbn bench --device cuda needs a CUDA GPU; torch.cuda.is_available() is False")
        return 1
    import fastbn
    if "cuda" not in fastbn.available_backends():
        print(f"the cuda backend cannot run here: {fastbn.backend_info()['cuda']['reason']}")
        return 1
    quick = bool(getattr(args, "quick", False))
    shapes = _parse_shapes(getattr(args, "shapes", None)) or (
        QUICK_SHAPES if quick else DEFAULT_SHAPES)
    try:
        dtypes = _dtypes_from(getattr(args, "dtype", None), quick)
    except ValueError as error:
        print(error)
        return 1
    if "bfloat16" in dtypes:
        try:
            _numpy_dtype("bfloat16")
        except ImportError:
            print("bfloat16 needs ml_dtypes (pip install ml_dtypes, or the fastbn[bfloat16] "
                  "extra)")
            return 1
    activations = _activations_from(getattr(args, "activation", None))
    repeat = getattr(args, "repeat", None) or (3 if quick else REPEAT)
    results = measure(shapes, dtypes, repeat, activations)
    print("\n".join(format_tables(results)))
    if getattr(args, "json", None):
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


def main(argv=None):
    """``python -m fastbn.bench_cuda``: the same as ``fastbn bench --device cuda``."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m fastbn.bench_cuda",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four shapes, float32")
    parser.add_argument("--shapes", help='e.g. "256x4096,64x256x56x56"')
    parser.add_argument("--dtype", metavar="DTYPES",
                        help='comma-separated among float32, float64, float16, bfloat16, '
                             'or "both" (float32,float64; the default)')
    parser.add_argument("--activation", choices=("none", "relu", "both"), default="none",
                        help="relu: fastbn's fused batch norm + ReLU against PyTorch's "
                             "batch_norm then relu_; both: rows of each")
    parser.add_argument("--repeat", type=int, help=f"loops per timing, best kept ({REPEAT})")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
