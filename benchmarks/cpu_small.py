"""CPU speed on small and in-cache shapes: per-call overhead and the in-cache
table against PyTorch, three runs, medians against the bars.

Usage (from the repository root, fastbn installed)::

    python benchmarks/cpu_small.py                 # writes benchmarks/results/cpu_small.md
    python benchmarks/cpu_small.py --runs 1 --out -   # one run, print only

Each run is a fresh Python process (``--one-run``) that prints JSON. Inside a
run, every kernel of one case (PyTorch's and each backend's) is timed in
interleaved rounds: round ``r`` times PyTorch, then numba, then cython, so
that a burst of load from other processes hits all of them alike. A round
is the mean of enough back-to-back calls to last about ``ROUND_SECONDS``;
a figure is the median of the rounds, its spread the min and max. A ratio
``vs torch`` is PyTorch's median / the backend's median in the same run.
The report gives, per cell, the median over the runs of those ratios.

Bars (the issue this answers): per call on an (8, 16) float32 array with
running statistics, training forward <= 25 us and simplified backward
<= 20 us; on the in-cache shapes, forward and simplified backward >= 1.2x
PyTorch, float32 and float64, numba and cython.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

OVERHEAD_SHAPES = ((8, 16), (8, 16, 4, 4))
IN_CACHE_SHAPES = ((256, 4096), (128, 512, 7, 7), (64, 256, 14, 14))
BACKENDS = ("numba", "cython")
OVERHEAD_BACKENDS = ("numba", "cython", "numpy")
FORWARD_BAR_US = 25.0
BACKWARD_BAR_US = 20.0
TORCH_BAR = 1.2
ROUND_SECONDS = 0.02
ROUNDS = 9
UNSTABLE_SPREAD = 0.25   # (max - min) / median of the rounds above this: flagged


def _calls_per_round(func):
    """Calls that take about ROUND_SECONDS."""
    func()
    start = time.perf_counter()
    func()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(ROUND_SECONDS / once))


def interleaved(funcs, rounds=ROUNDS):
    """{name: [seconds per call, one per round]} for zero-argument callables."""
    import gc

    counts = {name: _calls_per_round(func) for name, func in funcs.items()}
    times = {name: [] for name in funcs}
    gc.disable()
    try:
        for _ in range(rounds):
            for name, func in funcs.items():
                n = counts[name]
                start = time.perf_counter()
                for _ in range(n):
                    func()
                times[name].append((time.perf_counter() - start) / n)
    finally:
        gc.enable()
    return times


def summary(samples):
    med = statistics.median(samples)
    return {"median": med, "min": min(samples), "max": max(samples),
            "spread": (max(samples) - min(samples)) / med}


def one_run(threads):
    """Measure everything once; return a JSON-able dict."""
    import torch

    import fastbn
    from fastbn.bench import Kernels, make_data

    torch.set_num_threads(threads)
    result = {"overhead": [], "in_cache": [], "load_before": os.getloadavg()[0]}
    available = fastbn.available_backends()
    for shape in OVERHEAD_SHAPES:
        data = make_data(shape, "float32")
        kernels = {name: Kernels(name, data) for name in ("torch",) + OVERHEAD_BACKENDS
                   if name == "torch" or name in available}
        funcs = {}
        for name, k in kernels.items():
            funcs[f"{name} forward"] = k.forward
            k.forward()
            funcs[f"{name} backward"] = k.simplified
        for key, samples in interleaved(funcs).items():
            name, kernel = key.split()
            result["overhead"].append({"shape": list(shape), "backend": name, "kernel": kernel,
                                       **summary([s * 1e6 for s in samples])})
    for dtype in ("float32", "float64"):
        for shape in IN_CACHE_SHAPES:
            data = make_data(shape, dtype)
            kernels = {name: Kernels(name, data) for name in ("torch",) + BACKENDS
                       if name == "torch" or name in available}
            funcs = {}
            for name, k in kernels.items():
                funcs[f"{name} forward"] = k.forward
                k.forward()
                funcs[f"{name} backward"] = k.simplified
            times = interleaved(funcs)
            for name in kernels:
                for kernel in ("forward", "backward"):
                    row = {"shape": list(shape), "dtype": dtype, "backend": name,
                           "kernel": kernel,
                           **summary([s * 1e3 for s in times[f"{name} {kernel}"]])}
                    row["vs_torch"] = (statistics.median(times[f"torch {kernel}"])
                                       / statistics.median(times[f"{name} {kernel}"]))
                    result["in_cache"].append(row)
    result["load_after"] = os.getloadavg()[0]
    return result


def _cell(rows, **match):
    for row in rows:
        if all(row[k] == v for k, v in match.items()):
            return row
    return None


def _fmt_shape(shape):
    return "(" + ", ".join(str(n) for n in shape) + ")"


def report(runs, threads, command):
    """The Markdown report of several runs."""
    import fastbn
    import torch

    n = len(runs)
    lines = ["# CPU speed on small and in-cache shapes", ""]
    lines += [
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}: {n} runs, each a fresh process, "
        f"{threads} threads for numba, OpenMP and PyTorch {torch.__version__} "
        f"(`torch.native_batch_norm` and `native_batch_norm_backward`, with `out=`), "
        f"{platform.machine()} with {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"NumPy {np.__version__}. Every call goes through the public API "
        "(`fastbn.batchnorm_forward` with running statistics and `out=`, "
        "`fastbn.batchnorm_backward` simplified with `out=`).",
        "",
        f"Within a run the kernels of a case are timed in {ROUNDS} interleaved rounds of about "
        f"{ROUND_SECONDS * 1e3:.0f} ms each (mean per call within a round); a figure is the "
        "median of the rounds. `vs torch` is PyTorch's median / the backend's median in the "
        "same run (above 1: fastbn faster). Tables give the median over the runs; "
        "`spread` is the largest (max - min) / median of the rounds among the runs, and a "
        f"figure whose spread exceeds {UNSTABLE_SPREAD:.0%} in some run is marked `unstable`.",
        "",
        "Load average (1 min) before/after each run: "
        + ", ".join(f"{r['load_before']:.1f}/{r['load_after']:.1f}" for r in runs) + ".",
        "",
        "## Per-call overhead (float32, running statistics, us per call)",
        "",
        f"Bars: training forward <= {FORWARD_BAR_US:.0f} us and backward <= "
        f"{BACKWARD_BAR_US:.0f} us on (8, 16), numba and cython.",
        "",
        "| shape | kernel | " + " | ".join(("torch",) + OVERHEAD_BACKENDS) + " | bar met |",
        "|---|---|" + "---|" * (len(OVERHEAD_BACKENDS) + 2),
    ]
    misses = []
    for shape in OVERHEAD_SHAPES:
        for kernel in ("forward", "backward"):
            cells = []
            met = []
            for name in ("torch",) + OVERHEAD_BACKENDS:
                found = [_cell(r["overhead"], shape=list(shape), backend=name, kernel=kernel)
                         for r in runs]
                found = [f for f in found if f is not None]
                if not found:
                    cells.append("-")
                    continue
                med = statistics.median(f["median"] for f in found)
                spread = max(f["spread"] for f in found)
                flag = " unstable" if spread > UNSTABLE_SPREAD else ""
                cells.append(f"{med:.1f} (spread {spread:.0%}{flag})")
                if tuple(shape) == (8, 16) and name in BACKENDS:
                    bar = FORWARD_BAR_US if kernel == "forward" else BACKWARD_BAR_US
                    ok = med <= bar
                    met.append(f"{name} {'yes' if ok else 'NO'}")
                    if not ok:
                        misses.append(f"overhead {name} {kernel} {_fmt_shape(shape)}: "
                                      f"{med:.1f} us > {bar:.0f} us")
            lines.append(f"| {_fmt_shape(shape)} | {kernel} | " + " | ".join(cells)
                         + f" | {', '.join(met) or '-'} |")
    lines += [
        "",
        "## In-cache shapes against PyTorch",
        "",
        f"Bar: `vs torch` >= {TORCH_BAR} for forward and simplified backward, every cell.",
        "",
        "| backend | dtype | shape | fwd ms | torch fwd ms | fwd vs torch | bwd ms | "
        "torch bwd ms | bwd vs torch | per-run vs torch (fwd; bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in BACKENDS:
        for dtype in ("float32", "float64"):
            for shape in IN_CACHE_SHAPES:
                parts = [name, dtype, _fmt_shape(shape)]
                per_run = []
                for kernel in ("forward", "backward"):
                    found = [_cell(r["in_cache"], shape=list(shape), dtype=dtype, backend=name,
                                   kernel=kernel) for r in runs]
                    torch_found = [_cell(r["in_cache"], shape=list(shape), dtype=dtype,
                                         backend="torch", kernel=kernel) for r in runs]
                    if any(f is None for f in found):
                        parts += ["-", "-", "-"]
                        continue
                    med = statistics.median(f["median"] for f in found)
                    tmed = statistics.median(f["median"] for f in torch_found)
                    ratio = statistics.median(f["vs_torch"] for f in found)
                    unstable = any(f["spread"] > UNSTABLE_SPREAD for f in found + torch_found)
                    flag = " unstable" if unstable else ""
                    mark = "" if ratio >= TORCH_BAR else " **miss**"
                    parts += [f"{med:.3f}", f"{tmed:.3f}", f"{ratio:.2f}x{mark}{flag}"]
                    per_run.append(", ".join(f"{f['vs_torch']:.2f}" for f in found))
                    if ratio < TORCH_BAR:
                        misses.append(f"{name} {dtype} {_fmt_shape(shape)} {kernel}: "
                                      f"{ratio:.2f}x PyTorch")
                parts.append("; ".join(per_run))
                lines.append("| " + " | ".join(parts) + " |")
    lines += ["", "## Cells that miss a bar", ""]
    lines += [f"- {m}" for m in misses] or ["None."]
    lines += ["", "## Raw runs", "", "```json", json.dumps(runs, indent=1), "```", ""]
    info = fastbn.backend_info()
    lines.insert(4, "Backends: " + ", ".join(
        f"{name} ({'threads %s' % info[name].get('threads') if info[name]['available'] else info[name]['reason']})"
        for name in OVERHEAD_BACKENDS) + ".")
    lines.insert(5, "")
    return "\n".join(lines), misses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs, each a fresh process (3)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "cpu_small.md"),
                        help="the Markdown file to write, or - to print it")
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_run:
        json.dump(one_run(args.threads), sys.stdout)
        return 0
    runs = []
    for i in range(args.runs):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   NUMBA_NUM_THREADS=str(args.threads))
        proc = subprocess.run([sys.executable, __file__, "--one-run", "--threads",
                               str(args.threads)], capture_output=True, text=True, env=env,
                              check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    command = "python benchmarks/cpu_small.py" + ("" if args.runs == 3 else f" --runs {args.runs}")
    text, misses = report(runs, args.threads, command)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.out}; {len(misses)} cell(s) miss a bar", file=sys.stderr)
        for m in misses:
            print("  miss:", m, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
