"""16-bit storage and the fused batch norm + ReLU (``--suite half-relu``).

Two parts on one shape (default ``(64, 256, 56, 56)``), each group timed in
interleaved rounds with the copy of its dtype:

1. per backend (numba, cython, numpy, PyTorch's mixed-precision batch norm):
   training forward and simplified backward in float32, float16 and
   bfloat16; the 16-bit time against the backend's own float32 time and
   the fraction of the copy limit (16-bit bytes at the 16-bit copy's
   bandwidth, and at the float32 copy's);
2. per dtype: numba and cython fused (``activation="relu"``), the same as
   two separate passes (fastbn, then a NumPy ReLU), and PyTorch's
   ``batch_norm`` + ``relu_``.

PyTorch's kernels are timed in its peer process (:mod:`fastbn.bench.peer`):
its storage group there, and in part 2, after each dtype's group of fastbn
kernels, PyTorch's ``batch_norm`` + ``relu_`` with the same rounds.

Bars: float16 >= 1.6x the backend's float32 and >= 0.7 of the copy limit;
fused >= 1.6x the separate passes and >= 1.5x PyTorch.
"""
from .. import timing
from ..kernels import (DtypeUnavailable, Kernels, fastbn_thread_count, format_shape, make_data,
                       why_unsupported)
from ..peer import Peer
from ..report import Report, cell
from . import progress

SHAPE = (64, 256, 56, 56)
DTYPES = ["float32", "float16", "bfloat16"]
STORAGE_BACKENDS = ["numba", "cython", "numpy", "torch"]
RELU_BACKENDS = ["numba", "cython"]
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
HALF_BAR = 1.6
LIMIT_BAR = 0.7
SEPARATE_BAR = 1.6
TORCH_BAR = 1.5
BUDGET_SECONDS = 12.0


def _ms(t):
    return "-" if t is None or t.median is None else f"{t.median * 1e3:.2f} ({t.best * 1e3:.2f})"


def _installed(backends):
    """The fastbn backends that run float32 here, and ``"torch"`` if named (its
    peer says what it cannot run)."""
    return [b for b in backends if b == "torch" or why_unsupported(b, "float32") is None]


def _torch_storage_group(peer, shape, data, dtypes, rounds):
    """PyTorch's storage group, timed by its peer: (timings, dtype -> reason)."""
    wanted = {}
    for dtype in dtypes:
        if data.get(dtype) is None:
            continue
        wanted[f"{dtype} copy"] = {"kind": "copy", "dtype": dtype}
        wanted[f"{dtype} forward"] = {"kind": "forward", "dtype": dtype}
        wanted[f"{dtype} backward"] = {"kind": "simplified", "dtype": dtype}
    got, not_run = peer.time(shape, wanted, rounds, budget_seconds=BUDGET_SECONDS)
    reasons = {dtype: not_run[f"{dtype} forward"] for dtype in dtypes
               if f"{dtype} forward" in not_run}
    # A dtype without both kernels has no row.
    for dtype in reasons:
        for kind in ("copy", "forward", "backward"):
            got.pop(f"{dtype} {kind}", None)
    return got, reasons


def storage_part(report, data, backends, dtypes, rounds, options, peer):
    """Part 1: one group per backend, its dtypes and their copies."""
    rows, copies = [], {}
    shape = next((d["x"].shape for d in data.values() if d is not None), None)
    for backend in backends:
        progress(options, f"half-relu storage {backend}")
        if backend == "torch":
            got, reasons = _torch_storage_group(peer, shape, data, dtypes, rounds)
        else:
            kernels, reasons = {}, {}
            for dtype in dtypes:
                reason = why_unsupported(backend, dtype)
                if reason or data.get(dtype) is None:
                    reasons[dtype] = reason
                    continue
                case = Kernels(backend, data[dtype])
                kernels[f"{dtype} copy"] = timing.copy_kernel(data[dtype]["x"])
                kernels[f"{dtype} forward"] = case.forward
                kernels[f"{dtype} backward"] = case.simplified
            got = timing.interleaved(kernels, rounds, budget_seconds=BUDGET_SECONDS)
        for dtype, reason in reasons.items():
            rows.append([backend, dtype] + ["n/a"] * 9)
            report.add_warnings([f"{backend} {dtype} skipped: {reason}"])
        report.add_warnings(got.warnings(f"storage {backend}"))
        for dtype in dtypes:
            if f"{dtype} forward" not in got:
                continue
            copy = got[f"{dtype} copy"].median
            copies[dtype] = min(copy, copies.get(dtype, copy))
            copy32 = got["float32 copy"].median if "float32 copy" in got else None
            size = ITEMSIZE[dtype]
            figures = {}
            for kind in ("forward", "backward"):
                seconds = got[f"{dtype} {kind}"].median
                figures[kind] = (
                    got.ratio(f"float32 {kind}", f"{dtype} {kind}", "median"),
                    timing.fraction_of_copy_limit(kind, seconds, copy, size),
                    timing.fraction_of_copy_limit(kind, seconds, copy32, size, 4))
            rows.append([backend, dtype, _ms(got[f"{dtype} forward"]),
                         _ms(got[f"{dtype} backward"])]
                        + [cell(figures[k][i]) for i in range(3) for k in ("forward", "backward")]
                        + [str(got.rounds)])
            if backend in RELU_BACKENDS and dtype == "float16":
                for kind in ("forward", "backward"):
                    speedup, limit, _ = figures[kind]
                    report.add_bar(f"{backend} float16 {kind} >= {HALF_BAR}x own float32",
                                   speedup is not None and speedup >= HALF_BAR,
                                   f"{cell(speedup)}x")
                    report.add_bar(f"{backend} float16 {kind} >= {LIMIT_BAR} of the copy limit",
                                   limit is not None and limit >= LIMIT_BAR, cell(limit))
    report.add_table(
        "16-bit storage: forward and simplified backward",
        ["backend", "dtype", "fwd ms median (best)", "bwd ms median (best)", "fwd vs own f32",
         "bwd vs own f32", "fwd limit", "bwd limit", "fwd limit @f32", "bwd limit @f32", "r"],
        rows,
        "x, dout, out and dx in the row's dtype; gamma, beta and the running statistics "
        "float32 for 16-bit data (PyTorch too). *vs own f32*: the backend's float32 time / "
        "this time. *limit*: fraction of the copy limit at the bandwidth of `np.copyto` of "
        "the same dtype in the same rounds; *@f32*: at the float32 copy's bandwidth. "
        "Ratios of medians; *r*: rounds.")
    elements = data[dtypes[0]]["x"].size if data.get(dtypes[0]) is not None else 0
    report.add_fact("`np.copyto` (one thread) median: " + "; ".join(
        f"{d} {s * 1e3:.2f} ms ({2 * ITEMSIZE[d] * elements / s / 1e9:.1f} GB/s)"
        for d, s in copies.items()))


def relu_part(report, data, backends, dtypes, rounds, options, peer):
    """Part 2: one group per dtype: fused and separate here, then PyTorch's
    ``batch_norm`` + ``relu_`` in its peer (when ``peer`` is given)."""
    rows = []
    kinds = [(b, "fused", "relu") for b in backends] + [(b, "separate", "relu_separate")
                                                         for b in backends]
    for dtype in dtypes:
        if data.get(dtype) is None:
            continue
        kernels = {}
        for backend, kind, activation in kinds:
            reason = why_unsupported(backend, dtype, activation)
            if reason:
                report.add_warnings([f"{backend} {dtype} {kind} skipped: {reason}"])
                continue
            case = Kernels(backend, data[dtype], activation=activation)
            kernels[f"{backend} {kind} forward"] = case.forward
            kernels[f"{backend} {kind} backward"] = case.simplified
        progress(options, f"half-relu relu {dtype}")
        got = timing.interleaved(kernels, rounds, copy_of=data[dtype]["x"],
                                 budget_seconds=BUDGET_SECONDS, **timing.same_start())
        if peer is not None:
            wanted = {f"torch torch {kind}": {"kind": pass_name, "dtype": dtype,
                                              "activation": "relu"}
                      for kind, pass_name in (("forward", "forward"),
                                              ("backward", "simplified"))}
            theirs, not_run = peer.time(data[dtype]["x"].shape, wanted, rounds,
                                        budget_seconds=BUDGET_SECONDS, **timing.same_start())
            if not_run:
                report.add_warnings([f"torch {dtype} torch skipped: "
                                     f"{next(iter(not_run.values()))}"])
            got = timing.merged(got, theirs)
        report.add_warnings(got.warnings(f"relu {dtype}"))
        copy = got[timing.COPY].median
        for backend in backends:
            fused = f"{backend} fused"
            cells = [backend, dtype]
            cells += [_ms(got.get(f"{name} {kind}")) for kind in ("forward", "backward")
                      for name in (fused, f"{backend} separate", "torch torch")]
            for other, bar in ((f"{backend} separate", SEPARATE_BAR), ("torch torch", TORCH_BAR)):
                for kind in ("forward", "backward"):
                    ratio = got.ratio(f"{other} {kind}", f"{fused} {kind}", "median")
                    cells.append(cell(ratio))
                    if ratio is not None:
                        report.add_bar(f"{backend} {dtype} fused {kind} >= {bar}x "
                                       f"{'the separate passes' if 'separate' in other else 'PyTorch'}",
                                       ratio >= bar, f"{ratio:.2f}x")
            size = ITEMSIZE[dtype]
            for kind in ("forward", "backward"):
                t = got.get(f"{fused} {kind}")
                cells.append(cell(timing.fraction_of_copy_limit(
                    kind, t.median if t else None, copy, size)))
            rows.append(cells + [str(got.rounds)])
    report.add_table(
        "Fused batch norm + ReLU",
        ["backend", "dtype", "fused fwd ms", "separate fwd ms", "torch fwd ms", "fused bwd ms",
         "separate bwd ms", "torch bwd ms", "fwd vs separate", "bwd vs separate",
         "fwd vs torch", "bwd vs torch", "fused fwd limit", "fused bwd limit", "r"],
        rows,
        "ms: median (best) of the rounds. *vs separate*: the separate passes' time / the "
        "fused time; *vs torch*: PyTorch's `batch_norm` + `relu_` time / the fused time.")


def run(options):
    """Both parts; see the module docstring.

    Returns
    -------
    fastbn.bench.report.Report
    """
    shape = options.shapes[0] if options.shapes else options.pick(SHAPE, SHAPE,
                                                                  (4, 8, 4, 4))
    dtypes = options.dtypes or DTYPES
    if "float32" not in dtypes:
        dtypes = ["float32"] + list(dtypes)
    rounds = options.rounds or options.pick(5, 3, 2)
    backends = options.backends or STORAGE_BACKENDS
    storage_backends = _installed(backends)
    relu_backends = [b for b in storage_backends if b in RELU_BACKENDS]
    report = Report("16-bit storage and the fused batch norm + ReLU", options.command)
    report.add_fact(f"shape {shape} (channel axis 1), training mode, public API with `out=`; "
                    f"up to {rounds} interleaved rounds per group, a slow group stops after 3 "
                    f"once it has run {BUDGET_SECONDS:g} s; in the ReLU groups, fastbn's and "
                    f"PyTorch's, every sample starts after a "
                    f"{timing.SETTLE_SECONDS * 1e3:.0f} ms sleep and one untimed call")
    data = {}
    for dtype in dtypes:
        try:
            data[dtype] = make_data(shape, dtype)
        except DtypeUnavailable as exc:
            data[dtype] = None
            report.add_warnings([f"{dtype} skipped: {exc}"])
    with_torch = "torch" in storage_backends
    with Peer(fastbn_thread_count(storage_backends)) as peer:
        storage_part(report, data, storage_backends, dtypes, rounds, options, peer)
        relu_part(report, data, relu_backends, dtypes, rounds, options,
                  peer if with_torch else None)
        if with_torch:
            report.add_fact(f"PyTorch: {peer.method} (torch {peer.torch_version or 'not started'}, "
                            f"{peer.threads_used or peer.threads} threads; a fresh process "
                            "per group): its storage group there; in the ReLU part, after "
                            "each dtype's group of fastbn's rounds")
    report.title += f" at {format_shape(shape)}"
    return report
