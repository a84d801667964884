"""16-bit storage and the fused batch norm + ReLU at (64, 256, 56, 56): the table
of ``benchmarks/results/half_relu.md``.

Usage (from the repository root, fastbn installed)::

    python benchmarks/half_relu.py                 # writes benchmarks/results/half_relu.md
    python benchmarks/half_relu.py --out -         # print only
    python benchmarks/half_relu.py --rounds 3 --shape 32x64x56x56 --out -   # a quick look

Two parts, each timed in interleaved rounds in one process: round ``r``
calls every kernel of the part once, starting one kernel later than round
``r - 1``, so that a burst of load from other processes hits all of them
alike. A figure is the best of the rounds, its median beside it; every
ratio is of two figures of the same run, computed from the best times (and,
in parentheses, from the medians).

1. *16-bit storage*: per backend (numba, cython, numpy for reference, and
   PyTorch's mixed-precision CPU batch norm as the peer), the training
   forward and the simplified backward in float32, float16 and bfloat16,
   with ``np.copyto`` of each dtype in the same rounds. ``vs own f32`` is
   the backend's float32 time / its 16-bit time. ``limit`` is the fraction
   of the copy limit: the compulsory bytes (forward 2, simplified backward
   3 item sizes per element; 2-byte items for float16/bfloat16) at the
   bandwidth of ``np.copyto`` on an array of the same dtype; ``limit @f32``
   holds the same bytes to the bandwidth of the float32 copy instead.
2. *Fused ReLU*: per dtype, numba and cython with ``activation="relu"``
   (fused), the same backends as two separate passes (fastbn's batch norm,
   then ``np.maximum(out, 0, out=out)``; backward ``dout * (out > 0)`` then
   fastbn's backward), and PyTorch's ``native_batch_norm`` + ``relu_``
   (backward: ``threshold_backward`` then ``native_batch_norm_backward``).

Bars (the issue this answers): at (64, 256, 56, 56) on numba and cython,
float16 forward and simplified backward >= 1.6x the backend's own float32
time and >= 0.7 of the copy limit; fused forward and backward >= 1.6x the
separate passes and >= 1.5x PyTorch's batch_norm + relu_.

Functions here are not asv benchmarks (no ``time_``/``track_`` names): asv
imports this module with the suite and finds nothing to run.
"""
import argparse
import gc
import os
import platform
import statistics
import sys
import time

SHAPE = "64x256x56x56"
DTYPES = ("float32", "float16", "bfloat16")
STORAGE_BACKENDS = ("numba", "cython", "numpy", "torch")
RELU_BACKENDS = ("numba", "cython")
ROUNDS = 5
# A group whose round is slow (the NumPy backend and NumPy's ReLU passes in 16
# bits take seconds per call) gets fewer rounds, never fewer than MIN_ROUNDS:
# as many as fit in GROUP_SECONDS, judged from the untimed first calls.
MIN_ROUNDS = 3
GROUP_SECONDS = 12.0
HALF_BAR = 1.6
LIMIT_BAR = 0.7
SEPARATE_BAR = 1.6
TORCH_BAR = 1.5
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           "half_relu.md")


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def interleaved(funcs, rounds, min_rounds=MIN_ROUNDS, group_seconds=GROUP_SECONDS):
    """Wall times of zero-argument callables, timed in interleaved rounds.

    Each callable is called once untimed first (JIT compilation, page
    faults). Round ``r`` starts with the ``r``-th callable (rotating).
    After ``min(rounds, min_rounds)`` rounds, a further round is timed only
    if it would end within ``group_seconds`` of the first one's start (at
    the pace of the last round), up to ``rounds`` in all.

    Parameters
    ----------
    funcs : dict of str to callable
    rounds : int
    min_rounds : int, optional
    group_seconds : float, optional

    Returns
    -------
    dict of str to list of float
        Seconds per call, one per round.
    """
    for func in funcs.values():
        func()
    names = list(funcs)
    samples = {name: [] for name in names}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        group_start = time.perf_counter()
        last_round = 0.0
        for r in range(rounds):
            elapsed = time.perf_counter() - group_start
            if r >= min(rounds, min_rounds) and elapsed + last_round > group_seconds:
                break
            round_start = time.perf_counter()
            start_at = r % len(names)
            for name in names[start_at:] + names[:start_at]:
                start = time.perf_counter()
                funcs[name]()
                samples[name].append(time.perf_counter() - start)
            last_round = time.perf_counter() - round_start
    finally:
        if was_enabled:
            gc.enable()
    return samples


def _summary(seconds):
    return {"best": min(seconds) * 1e3, "median": statistics.median(seconds) * 1e3,
            "rounds": len(seconds)}


def make_all_data(shape, dtypes):
    """The inputs of every dtype, shared by both parts (None where it cannot be made)."""
    from fastbn.bench import DtypeUnavailable, make_data

    data = {}
    for dtype in dtypes:
        try:
            data[dtype] = make_data(shape, dtype)
        except DtypeUnavailable:
            data[dtype] = None
    return data


def _share_buffers(kernels, first):
    """Let ``kernels`` write its dx into ``first``'s and drop its own copy target.

    Only one copy is timed per group, and the fastbn backward writes into
    ``self.dx`` at call time: sharing keeps the large shape's memory down.
    PyTorch's tensors are bound at setup and keep their own.
    """
    kernels.copy_dst = None
    if kernels.backend != "torch" and first.backend != "torch":
        kernels.dx = first.dx


def measure_storage(data, backends, dtypes, rounds):
    """Part 1: forward and simplified backward per backend and dtype.

    Returns
    -------
    dict
        ``rows``: one per backend and dtype (``skipped`` = why, or the
        figures); ``copy``: the copy timing per dtype; ``load``.
    """
    from fastbn.bench import Kernels, why_unsupported

    result = {"rows": [], "copy": {}, "load": [_loadavg()]}
    for backend in backends:
        funcs = {}
        for dtype in dtypes:
            reason = why_unsupported(backend, dtype)
            if reason is not None:
                result["rows"].append({"backend": backend, "dtype": dtype, "skipped": reason})
                continue
            kernels = Kernels(backend, data[dtype])
            funcs[f"{dtype} copy"] = kernels.copy
            funcs[f"{dtype} forward"] = kernels.forward
            funcs[f"{dtype} backward"] = kernels.simplified
        if not funcs:
            continue
        print(f"  {backend}: {', '.join(sorted({k.split()[0] for k in funcs}))}",
              file=sys.stderr, flush=True)
        samples = interleaved(funcs, rounds)
        for dtype in dtypes:
            if f"{dtype} forward" not in samples:
                continue
            copy = _summary(samples[f"{dtype} copy"])
            # The copy is timed in every backend's rounds: keep the best.
            known = result["copy"].get(dtype)
            if known is None or copy["best"] < known["best"]:
                result["copy"][dtype] = copy
            result["rows"].append({
                "backend": backend, "dtype": dtype,
                "forward": _summary(samples[f"{dtype} forward"]),
                "backward": _summary(samples[f"{dtype} backward"]),
            })
        del funcs, samples
    result["load"].append(_loadavg())
    return result


def measure_relu(data, backends, dtypes, rounds, with_torch=True):
    """Part 2: fused batch norm + ReLU, the separate passes and PyTorch's, per dtype.

    Returns
    -------
    dict
        ``rows``: one per backend, dtype and kind (``fused``, ``separate``,
        ``torch``), with ``skipped`` = why or the figures; ``copy``; ``load``.
    """
    from fastbn.bench import Kernels, why_unsupported

    result = {"rows": [], "copy": {}, "load": [_loadavg()]}
    kinds = [(backend, "fused", "relu") for backend in backends]
    kinds += [(backend, "separate", "relu_separate") for backend in backends]
    if with_torch:
        kinds.append(("torch", "torch", "relu"))
    for dtype in dtypes:
        if data[dtype] is None:  # bfloat16 without ml_dtypes
            for backend, kind, activation in kinds:
                result["rows"].append({"backend": backend, "dtype": dtype, "kind": kind,
                                       "skipped": why_unsupported(backend, dtype)})
            continue
        funcs = {}
        first = None
        for backend, kind, activation in kinds:
            reason = why_unsupported(backend, dtype, activation)
            if reason is not None:
                result["rows"].append({"backend": backend, "dtype": dtype, "kind": kind,
                                       "skipped": reason})
                continue
            kernels = Kernels(backend, data[dtype], activation=activation)
            if first is None:
                first = kernels
                funcs["- copy"] = kernels.copy
            else:
                _share_buffers(kernels, first)
            funcs[f"{backend} {kind} forward"] = kernels.forward
            funcs[f"{backend} {kind} backward"] = kernels.simplified
        if not funcs:
            continue
        print(f"  relu {dtype}", file=sys.stderr, flush=True)
        samples = interleaved(funcs, rounds)
        result["copy"][dtype] = _summary(samples["- copy"])
        for backend, kind, activation in kinds:
            if f"{backend} {kind} forward" not in samples:
                continue
            result["rows"].append({
                "backend": backend, "dtype": dtype, "kind": kind,
                "forward": _summary(samples[f"{backend} {kind} forward"]),
                "backward": _summary(samples[f"{backend} {kind} backward"]),
            })
        del funcs, samples, first
    result["load"].append(_loadavg())
    return result


def _ratio(num, den, key):
    return num[key] / den[key]


def _pair(num, den):
    """``"1.72 (1.65)"``: ratio of the best times (of the medians)."""
    return f"{_ratio(num, den, 'best'):.2f} ({_ratio(num, den, 'median'):.2f})"


def _ms(summary):
    return f"{summary['best']:.2f} / {summary['median']:.2f}"


def _limit(kernel, summary, copy, itemsize, copy_itemsize):
    from fastbn.bench import fraction_of_copy_limit

    return fraction_of_copy_limit(kernel, summary["best"], copy["best"], itemsize=itemsize,
                                  copy_itemsize=copy_itemsize)


ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


def _order(rows, backends, dtypes):
    """Rows sorted by backend, then dtype, in the order of the run."""
    return sorted(rows, key=lambda row: (backends.index(row["backend"]),
                                         dtypes.index(row["dtype"])))


def _reasons(rows, label):
    """``- backend dtype [kind]: reason`` for every row that could not run."""
    return [f"- {label(row)}: {row['skipped']}" for row in rows if "skipped" in row]


def storage_table(part, elements, backends, dtypes):
    """Markdown table of part 1, the reasons for n/a rows, the bar checks, the copies."""
    lines = [
        "| backend | dtype | fwd ms best / median | bwd ms best / median "
        "| fwd vs own f32 | bwd vs own f32 | fwd limit | bwd limit "
        "| fwd limit @f32 | bwd limit @f32 | r |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    rows = _order(part["rows"], backends, dtypes)
    f32 = {row["backend"]: row for row in rows
           if row["dtype"] == "float32" and "skipped" not in row}
    copy32 = part["copy"].get("float32")
    for row in rows:
        backend, dtype = row["backend"], row["dtype"]
        if "skipped" in row:
            lines.append(f"| {backend} | {dtype} | n/a | n/a | | | | | | | |")
            continue
        copy = part["copy"][dtype]
        size = ITEMSIZE[dtype]
        base = f32.get(backend)
        vs_fwd = _pair(base["forward"], row["forward"]) if base else "-"
        vs_bwd = _pair(base["backward"], row["backward"]) if base else "-"
        fwd_limit = _limit("forward", row["forward"], copy, size, size)
        bwd_limit = _limit("backward", row["backward"], copy, size, size)
        if copy32 is not None:
            fwd32 = f"{_limit('forward', row['forward'], copy32, size, 4):.2f}"
            bwd32 = f"{_limit('backward', row['backward'], copy32, size, 4):.2f}"
        else:
            fwd32 = bwd32 = "-"
        lines.append(f"| {backend} | {dtype} | {_ms(row['forward'])} | {_ms(row['backward'])} "
                     f"| {vs_fwd} | {vs_bwd} | {fwd_limit:.2f} | {bwd_limit:.2f} "
                     f"| {fwd32} | {bwd32} | {row['forward']['rounds']} |")
        if backend in RELU_BACKENDS and dtype == "float16" and base:
            for name, key, limit in (("forward", "forward", fwd_limit),
                                     ("simplified backward", "backward", bwd_limit)):
                ratio = _ratio(base[key], row[key], "best")
                checks.append(
                    f"{backend} float16 {name}: {ratio:.2f}x own float32 "
                    f"({'meets' if ratio >= HALF_BAR else 'misses'} >= {HALF_BAR}x), "
                    f"{limit:.2f} of the copy limit "
                    f"({'meets' if limit >= LIMIT_BAR else 'misses'} >= {LIMIT_BAR})")
    reasons = _reasons(rows, lambda row: f"{row['backend']} {row['dtype']}")
    copies = []
    for dtype in dtypes:
        copy = part["copy"].get(dtype)
        if copy is None:
            continue
        gbps = 2 * ITEMSIZE[dtype] * elements / (copy["best"] * 1e-3) / 1e9
        copies.append(f"{dtype} {copy['best']:.2f} ms ({gbps:.1f} GB/s)")
    return lines, reasons, checks, copies


def relu_table(part, backends, dtypes):
    """Markdown table of part 2, the reasons for n/a cells, and the bar checks."""
    lines = [
        "| backend | dtype | fused fwd ms | separate fwd ms | torch fwd ms "
        "| fused bwd ms | separate bwd ms | torch bwd ms "
        "| fwd vs separate | bwd vs separate | fwd vs torch | bwd vs torch "
        "| fused fwd limit | fused bwd limit | r |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    found = {(row["backend"], row["dtype"], row["kind"]): row for row in part["rows"]
             if "skipped" not in row}
    for dtype in dtypes:
        peer = found.get(("torch", dtype, "torch"))
        for backend in backends:
            fused = found.get((backend, dtype, "fused"))
            separate = found.get((backend, dtype, "separate"))
            if fused is None and separate is None and peer is None:
                continue

            def ms(row, key):
                return "n/a" if row is None else _ms(row[key])

            def vs(row, key):
                return "-" if row is None or fused is None else _pair(row[key], fused[key])

            copy = part["copy"].get(dtype)
            size = ITEMSIZE[dtype]
            limits = ["-", "-"]
            if fused is not None and copy is not None:
                limits = [f"{_limit(kernel, fused[kernel], copy, size, size):.2f}"
                          for kernel in ("forward", "backward")]
            cells = [backend, dtype,
                     ms(fused, "forward"), ms(separate, "forward"), ms(peer, "forward"),
                     ms(fused, "backward"), ms(separate, "backward"), ms(peer, "backward"),
                     vs(separate, "forward"), vs(separate, "backward"),
                     vs(peer, "forward"), vs(peer, "backward")] + limits
            some = fused or separate or peer
            cells.append(str(some["forward"]["rounds"]))
            lines.append("| " + " | ".join(cells) + " |")
            if fused is None:
                continue
            for key in ("forward", "backward"):
                parts = []
                for other, name, bar in ((separate, "separate", SEPARATE_BAR),
                                         (peer, "PyTorch", TORCH_BAR)):
                    if other is None:
                        continue
                    ratio = _ratio(other[key], fused[key], "best")
                    parts.append(f"{ratio:.2f}x {name} "
                                 f"({'meets' if ratio >= bar else 'misses'} >= {bar}x)")
                if parts:
                    checks.append(f"{backend} {dtype} fused {key}: " + ", ".join(parts))
    reasons = _reasons(_order(part["rows"], backends + ["torch"], dtypes),
                       lambda row: f"{row['backend']} {row['dtype']} {row['kind']}")
    return lines, reasons, checks


def _machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def _versions():
    import numpy

    import fastbn
    parts = [f"fastbn {getattr(fastbn, '__version__', '?')}",
             f"Python {platform.python_version()}", f"NumPy {numpy.__version__}"]
    for name in ("numba", "torch", "ml_dtypes"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        parts.append(f"{name} {module.__version__}")
    return ", ".join(parts)


def _threads(backends):
    import fastbn
    info = fastbn.backend_info()
    parts = [f"{name} {info[name].get('threads')}" for name in backends
             if name in info and info[name].get("available")]
    try:
        import torch
        parts.append(f"torch {torch.get_num_threads()}")
    except ImportError:
        pass
    return ", ".join(parts)


def report(storage, relu, args, elapsed, command):
    """The Markdown of ``half_relu.md``."""
    from fastbn.bench import parse_shape

    shape = parse_shape(args.shape)
    elements = 1
    for n in shape:
        elements *= n
    s_lines, s_reasons, s_checks, copies = storage_table(
        storage, elements, args.storage_backends, args.dtype_list)
    r_lines, r_reasons, r_checks = relu_table(relu, args.relu_backend_list, args.dtype_list)
    out = [
        "# 16-bit storage and the fused batch norm + ReLU",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} with `{command}` "
        f"({elapsed:.0f} s), shape {tuple(shape)} (channel axis 1), training mode, "
        "through the public API with `out=`.",
        "",
        f"- machine: {_machine()}",
        f"- {_versions()}",
        f"- threads: {_threads(args.storage_backends)}",
        f"- rounds: up to {args.rounds} interleaved rounds per group (one backend's dtypes "
        "in the storage part, one dtype in the ReLU part), one call per kernel per round "
        f"after one untimed call; a slow group stops after {min(args.rounds, MIN_ROUNDS)} "
        f"rounds once the next would end more than {GROUP_SECONDS:.0f} s after its start "
        "(column *r*); times are best / median of the rounds, ratios from the best times "
        "(in parentheses: from the medians)",
        f"- load average (1 min) before/after: storage part {storage['load'][0]} / "
        f"{storage['load'][1]}, ReLU part {relu['load'][0]} / {relu['load'][1]} "
        f"({os.cpu_count()} cores; above the core count other processes took CPU time)",
        f"- `np.copyto` (one thread) best: {'; '.join(copies)}",
        "",
    ]
    loads = [value for value in storage["load"] + relu["load"] if value is not None]
    if loads and max(loads) > (os.cpu_count() or 1):
        out += [
            f"**The load average reached {max(loads)} on {os.cpu_count()} cores: other "
            "processes held CPU time during the run, so times are long and ratios "
            "uncertain. Re-run on a quiet machine before reading the bars.**",
            "",
        ]
    out += [
        "## 16-bit storage: forward and simplified backward",
        "",
        "x, dout, out and dx in the row's dtype; gamma, beta and the running statistics "
        "float32 for 16-bit data (PyTorch too: its mixed-precision CPU batch norm). "
        "*vs own f32*: the backend's float32 time / this time. *limit*: fraction of the "
        "copy limit, compulsory bytes (forward 2, backward 3 item sizes per element) at "
        "the bandwidth of `np.copyto` on an array of the same dtype in the same rounds; "
        "*limit @f32*: the same bytes at the float32 copy's bandwidth.",
        "",
    ] + s_lines + ([""] + s_reasons if s_reasons else []) + [
        "",
        "## Fused batch norm + ReLU",
        "",
        "*fused*: `activation=\"relu\"` (the backward rebuilds the mask from x and the "
        "statistics); *separate*: the same backend's batch norm, then "
        "`np.maximum(out, 0, out=out)`, backward `dout * (out > 0)` into a buffer, then the "
        "backward; *torch*: `native_batch_norm` + `relu_`, backward `threshold_backward` + "
        "`native_batch_norm_backward`. *vs*: the other's time / the fused time. *limit*: as "
        "above, 2 and 3 item sizes per element. NumPy's float16 and bfloat16 ufuncs "
        "(`np.maximum`, `np.greater`, `np.multiply`) convert element by element, far slower "
        "per byte than their float32 loops, so the 16-bit *separate* rows measure those "
        "loops more than memory traffic; the float32 rows show the traffic argument "
        "(2 and 3 item sizes fused against 4 and 6 with a separate pass).",
        "",
    ] + r_lines + ([""] + r_reasons if r_reasons else [])
    out += ["", "## Bars", ""]
    out += [f"- {text}" for text in s_checks + r_checks] or ["- (no bar could be checked)"]
    out.append("")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=SHAPE, help=f"shape, channel axis 1 ({SHAPE})")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"interleaved rounds per part ({ROUNDS})")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"comma-separated dtypes ({','.join(DTYPES)})")
    parser.add_argument("--storage-backends", default=",".join(STORAGE_BACKENDS),
                        help=f"backends of the storage part ({','.join(STORAGE_BACKENDS)})")
    parser.add_argument("--relu-backends", default=",".join(RELU_BACKENDS),
                        help=f"backends of the ReLU part ({','.join(RELU_BACKENDS)}; "
                             "PyTorch's batch_norm + relu_ is always added when installed)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="Markdown file to write, '-' to print only "
                             "(default: benchmarks/results/half_relu.md)")
    args = parser.parse_args(argv)
    from fastbn import bench

    shape = bench.parse_shape(args.shape)
    dtypes = bench.parse_dtypes(args.dtypes)
    available = set(bench.default_backends())
    args.storage_backends = [b for b in args.storage_backends.split(",") if b in available]
    relu_backends = [b for b in args.relu_backends.split(",") if b in available and b != "torch"]
    args.dtype_list = dtypes
    args.relu_backend_list = relu_backends
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python benchmarks/half_relu.py"] + given)
    start = time.perf_counter()
    print("storage part", file=sys.stderr, flush=True)
    data = make_all_data(shape, dtypes)
    storage = measure_storage(data, args.storage_backends, dtypes, args.rounds)
    print("relu part", file=sys.stderr, flush=True)
    relu = measure_relu(data, relu_backends, dtypes, args.rounds,
                        with_torch="torch" in available)
    text = report(storage, relu, args, time.perf_counter() - start, command)
    print(text)
    if args.out != "-":
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
