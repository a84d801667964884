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
ROUND_SECONDS = 0.005
ROUNDS = 15
UNSTABLE_SPREAD = 0.25   # (max - min) / median of the rounds above this: flagged


def _calls_per_round(func):
    """Calls that take about ROUND_SECONDS."""
    func()
    start = time.perf_counter()
    func()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(ROUND_SECONDS / once))


def interleaved(funcs, rounds=ROUNDS):
    """Per-call wall times and process CPU times of zero-argument callables.

    Returns
    -------
    wall, cpu : dict of list of float
        ``{name: [seconds per call, one per round]}``.
    """
    import gc

    counts = {name: _calls_per_round(func) for name, func in funcs.items()}
    wall = {name: [] for name in funcs}
    cpu = {name: [] for name in funcs}
    gc.disable()
    try:
        for _ in range(rounds):
            for name, func in funcs.items():
                n = counts[name]
                start_cpu = time.process_time()
                start = time.perf_counter()
                for _ in range(n):
                    func()
                wall[name].append((time.perf_counter() - start) / n)
                cpu[name].append((time.process_time() - start_cpu) / n)
    finally:
        gc.enable()
    return wall, cpu


def summary(samples):
    """best (min), median, max and spread = (median - best) / best of the rounds."""
    best = min(samples)
    med = statistics.median(samples)
    return {"best": best, "median": med, "max": max(samples), "spread": (med - best) / best}


def _set_threads(count):
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(count)
    threadpool_limits(limits=count, user_api="openmp")
    torch.set_num_threads(count)


def one_run(threads):
    """Measure everything once; return a JSON-able dict.

    Overhead shapes at ``threads`` threads; in-cache shapes at ``threads``
    threads (wall time) and at 1 thread (wall and process CPU time: with one
    thread, CPU time does not count the time other processes hold the core).
    """
    import fastbn
    from fastbn.bench import Kernels, make_data

    result = {"overhead": [], "in_cache": [], "load_before": os.getloadavg()[0]}
    available = fastbn.available_backends()
    _set_threads(threads)
    for shape in OVERHEAD_SHAPES:
        data = make_data(shape, "float32")
        kernels = {name: Kernels(name, data) for name in ("torch",) + OVERHEAD_BACKENDS
                   if name == "torch" or name in available}
        funcs = {}
        for name, k in kernels.items():
            funcs[f"{name} forward"] = k.forward
            k.forward()
            funcs[f"{name} backward"] = k.simplified
        wall, _ = interleaved(funcs)
        for key, samples in wall.items():
            name, kernel = key.split()
            result["overhead"].append({"shape": list(shape), "backend": name, "kernel": kernel,
                                       **summary([t * 1e6 for t in samples])})
    for count in dict.fromkeys((threads, 1)):
        _set_threads(count)
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
                wall, cpu = interleaved(funcs)
                for name in kernels:
                    for kernel in ("forward", "backward"):
                        key = f"{name} {kernel}"
                        torch_key = f"torch {kernel}"
                        row = {"shape": list(shape), "dtype": dtype, "backend": name,
                               "kernel": kernel, "threads": count,
                               **summary([t * 1e3 for t in wall[key]])}
                        row["vs_torch"] = min(wall[torch_key]) / min(wall[key])
                        row["vs_torch_median"] = (statistics.median(wall[torch_key])
                                                  / statistics.median(wall[key]))
                        row["cpu_best"] = min(cpu[key]) * 1e3
                        row["vs_torch_cpu"] = min(cpu[torch_key]) / min(cpu[key])
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


def _median_of_runs(runs, section, key, **match):
    found = [_cell(r[section], **match) for r in runs]
    found = [f for f in found if f is not None]
    if not found:
        return None, []
    return statistics.median(f[key] for f in found), found


def report(runs, threads, command):
    """The Markdown report of several runs, and the list of cells that miss a bar."""
    import fastbn
    import torch

    info = fastbn.backend_info()
    n = len(runs)
    lines = [
        "# CPU speed on small and in-cache shapes",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}: {n} runs, each a fresh process, "
        f"on a {os.cpu_count()}-core {platform.machine()} machine shared with other jobs; "
        f"{threads} threads for numba, OpenMP and PyTorch {torch.__version__} "
        "(`torch.native_batch_norm` and `native_batch_norm_backward`, with `out=`) unless "
        f"stated; Python {platform.python_version()}, NumPy {np.__version__}. Every fastbn "
        "call goes through the public API (`fastbn.batchnorm_forward` with running "
        "statistics and `out=`, `fastbn.batchnorm_backward` simplified with `out=`). "
        "Backends: " + ", ".join(
            f"{name} ({'threads %s' % info[name].get('threads') if info[name]['available'] else info[name]['reason']})"
            for name in OVERHEAD_BACKENDS) + ".",
        "",
        f"How it is timed: within a run, the kernels of one case (PyTorch's and each "
        f"backend's) are timed in {ROUNDS} interleaved rounds of about "
        f"{ROUND_SECONDS * 1e3:.0f} ms (the mean per call of a round is one sample), so that "
        "load from other processes hits all of them alike. `best` is the fastest round, "
        "`med` the median round. `vs torch` = PyTorch's best / the backend's best in the "
        "same run (above 1: fastbn faster); `[med x]` is the same ratio of the median "
        "rounds. A cell gives the median over the runs; `spread` is the largest "
        "(median - best) / best in any run, and a figure whose spread exceeds "
        f"{UNSTABLE_SPREAD:.0%} is marked `unstable`: re-run it on a quiet machine.",
        "",
        "Load average (1 min) before/after each run: "
        + ", ".join(f"{r['load_before']:.1f}/{r['load_after']:.1f}" for r in runs)
        + f" (on {os.cpu_count()} cores).",
        "",
        f"## Per-call overhead (float32, running statistics, us per call, {threads} threads)",
        "",
        f"Bars, on the median rounds: training forward <= {FORWARD_BAR_US:.0f} us and "
        f"simplified backward <= {BACKWARD_BAR_US:.0f} us on (8, 16), numba and cython.",
        "",
        "| shape | kernel | " + " | ".join(("torch",) + OVERHEAD_BACKENDS) + " | bar |",
        "|---|---|" + "---|" * (len(OVERHEAD_BACKENDS) + 2),
    ]
    misses = []
    for shape in OVERHEAD_SHAPES:
        for kernel in ("forward", "backward"):
            cells = []
            met = []
            for name in ("torch",) + OVERHEAD_BACKENDS:
                med, found = _median_of_runs(runs, "overhead", "median", shape=list(shape),
                                             backend=name, kernel=kernel)
                if med is None:
                    cells.append("-")
                    continue
                best = statistics.median(f["best"] for f in found)
                spread = max(f["spread"] for f in found)
                flag = ", unstable" if spread > UNSTABLE_SPREAD else ""
                cells.append(f"med {med:.1f}, best {best:.1f} (spread {spread:.0%}{flag})")
                if tuple(shape) == (8, 16) and name in BACKENDS:
                    bar = FORWARD_BAR_US if kernel == "forward" else BACKWARD_BAR_US
                    met.append(f"{name} {'met' if med <= bar else 'MISSED'}")
                    if med > bar:
                        misses.append(f"overhead {name} {kernel} {_fmt_shape(shape)}: "
                                      f"{med:.1f} us > {bar:.0f} us")
            lines.append(f"| {_fmt_shape(shape)} | {kernel} | " + " | ".join(cells)
                         + f" | {', '.join(met) or '-'} |")
    lines += [
        "",
        f"## In-cache shapes against PyTorch ({threads} threads)",
        "",
        f"Bar: `vs torch` >= {TORCH_BAR} for the forward and the simplified backward, every "
        "cell (median of the runs' best-round ratios).",
        "",
        "| backend | dtype | shape | fwd ms | torch fwd ms | fwd vs torch | bwd ms | "
        "torch bwd ms | bwd vs torch | per run (fwd; bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in BACKENDS:
        for dtype in ("float32", "float64"):
            for shape in IN_CACHE_SHAPES:
                parts = [name, dtype, _fmt_shape(shape)]
                per_run = []
                for kernel in ("forward", "backward"):
                    match = dict(shape=list(shape), dtype=dtype, kernel=kernel, threads=threads)
                    ratio, found = _median_of_runs(runs, "in_cache", "vs_torch", backend=name,
                                                   **match)
                    if ratio is None:
                        parts += ["-", "-", "-"]
                        continue
                    tbest, tfound = _median_of_runs(runs, "in_cache", "best", backend="torch",
                                                    **match)
                    best = statistics.median(f["best"] for f in found)
                    ratio_med = statistics.median(f["vs_torch_median"] for f in found)
                    unstable = any(f["spread"] > UNSTABLE_SPREAD for f in found + tfound)
                    mark = "" if ratio >= TORCH_BAR else " **miss**"
                    flag = ", unstable" if unstable else ""
                    shown = f"{ratio:.3f}" if ratio < TORCH_BAR <= round(ratio, 2) else f"{ratio:.2f}"
                    parts += [f"{best:.3f}", f"{tbest:.3f}",
                              f"{shown}x{mark} [med {ratio_med:.2f}x{flag}]"]
                    per_run.append(", ".join(f"{f['vs_torch']:.2f}" for f in found))
                    if ratio < TORCH_BAR:
                        misses.append(f"{name} {dtype} {_fmt_shape(shape)} {kernel}: "
                                      f"{ratio:.3f}x PyTorch (best rounds; median rounds "
                                      f"{ratio_med:.2f}x; per run {per_run[-1]})")
                parts.append("; ".join(per_run))
                lines.append("| " + " | ".join(parts) + " |")
    if threads != 1:
        lines += [
            "",
            f"## Thread scaling and one-thread CPU time",
            "",
            f"`x1->{threads}`: best time at 1 thread / best time at {threads} threads "
            "(wall), for the backend and for PyTorch. `1-thread CPU vs torch`: PyTorch's "
            "process CPU time per call / the backend's, both on one thread; unlike wall "
            "time, it does not count time other processes held the core, so it is the "
            "steadiest comparison of the kernels' own work on a busy machine.",
            "",
            f"| backend | dtype | shape | fwd x1->{threads} | torch fwd x1->{threads} | "
            f"bwd x1->{threads} | torch bwd x1->{threads} | 1-thread CPU vs torch (fwd; bwd) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in BACKENDS:
            for dtype in ("float32", "float64"):
                for shape in IN_CACHE_SHAPES:
                    parts = [name, dtype, _fmt_shape(shape)]
                    cpu_parts = []
                    for kernel in ("forward", "backward"):
                        for who in (name, "torch"):
                            speedups = []
                            for r in runs:
                                one = _cell(r["in_cache"], shape=list(shape), dtype=dtype,
                                            kernel=kernel, backend=who, threads=1)
                                many = _cell(r["in_cache"], shape=list(shape), dtype=dtype,
                                             kernel=kernel, backend=who, threads=threads)
                                if one and many:
                                    speedups.append(one["best"] / many["best"])
                            parts.append(f"{statistics.median(speedups):.2f}x"
                                         if speedups else "-")
                        cpu_ratio, _ = _median_of_runs(runs, "in_cache", "vs_torch_cpu",
                                                       shape=list(shape), dtype=dtype,
                                                       kernel=kernel, backend=name, threads=1)
                        cpu_parts.append("-" if cpu_ratio is None else f"{cpu_ratio:.2f}x")
                    parts.append("; ".join(cpu_parts))
                    lines.append("| " + " | ".join(parts) + " |")
    lines += ["", "## Cells that miss a bar", ""]
    lines += [f"- {m}" for m in misses] or ["None."]
    lines += ["", "## Raw runs", "", "```json", json.dumps(runs), "```", ""]
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
