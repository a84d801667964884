"""The default suite (``fastbn bench``): every CPU backend against PyTorch CPU.

Per shape and dtype, one group of interleaved rounds holds the copy and,
for every fastbn backend, the training forward, the simplified and the
staged backward; then PyTorch's peer process (:mod:`fastbn.bench.peer`)
times PyTorch's forward and simplified backward on the same data, in rounds
of their own, at the same thread count. Figures are medians of the rounds:
times in ms, staged / simplified, PyTorch's time / the backend's (``vs
torch``, above 1: faster), and the fraction of the copy limit (``roof``;
forward 2, simplified backward 3 item sizes per element at the bandwidth of
``np.copyto`` of the same array in fastbn's rounds).
"""
import math

from .. import timing
from ..kernels import (DtypeUnavailable, Kernels, Threads, default_backends, fastbn_thread_count,
                       format_shape, make_data, threads_in_use, why_unsupported)
from ..peer import Peer
from ..report import Report, cell
from . import progress

DEFAULT_SHAPES = [(256, 4096), (128, 512, 7, 7), (64, 256, 14, 14), (32, 64, 56, 56)]
LARGE_SHAPES = [(64, 256, 56, 56)]
TINY_SHAPES = [(4, 8, 4, 4)]
COMPILED = ("numba", "cython")
ROOF_BAR = 0.7
BUDGET_SECONDS = 40.0
COLUMNS = ["backend", "dtype", "shape", "fwd ms", "bwd ms", "staged ms", "staged/simplified",
           "fwd vs torch", "bwd vs torch", "fwd roof", "bwd roof", "spread"]


def time_backends(backends, shape, dtype, rounds, kinds=("forward", "simplified", "staged"),
                  min_seconds=timing.MIN_SECONDS, peer=None):
    """Time ``kinds`` of every backend on one shape and dtype.

    fastbn's backends and the copy are timed here, interleaved; then, if
    ``"torch"`` is among ``backends``, ``peer`` times PyTorch's kernels (not
    the staged backward) in its own process, with the same rounds.

    Parameters
    ----------
    backends : list of str
    shape : tuple of int
    dtype : str
    rounds : int
    kinds : tuple of str, optional
    min_seconds : float, optional
    peer : fastbn.bench.peer.Peer, optional
        Needed for ``"torch"``; without one, a peer is started for this call.

    Returns
    -------
    timings : fastbn.bench.timing.Timings
        Kernel names ``"<backend> <kind>"`` and ``"copy"``.
    skipped : dict
        ``backend -> reason`` for a backend that cannot run this dtype.
    """
    kernels, skipped = {}, {}
    try:
        data = make_data(shape, dtype, seed=0)
    except DtypeUnavailable as exc:
        return timing.interleaved({}, rounds), {backend: str(exc) for backend in backends}
    for backend in backends:
        if backend == "torch":
            continue
        reason = why_unsupported(backend, dtype)
        if reason:
            skipped[backend] = reason
            continue
        case = Kernels(backend, data)
        for kind in kinds:
            kernels[f"{backend} {kind}"] = getattr(case, kind)
    # The settle stays: numba's OpenMP layer and the cython backend's libgomp
    # are two runtimes in this process too. PyTorch's peer starts its samples
    # the same way (same_start).
    timings = timing.interleaved(kernels, rounds, copy_of=data["x"],
                                 budget_seconds=BUDGET_SECONDS, min_seconds=min_seconds,
                                 **timing.same_start())
    if "torch" not in backends:
        return timings, skipped
    wanted = {f"torch {kind}": {"kind": kind, "dtype": dtype} for kind in kinds
              if kind != "staged"}
    if peer is None:
        with Peer(fastbn_thread_count(backends)) as own_peer:
            theirs, not_run = own_peer.time(shape, wanted, rounds, min_seconds=min_seconds,
                                            budget_seconds=BUDGET_SECONDS,
                                            **timing.same_start())
    else:
        theirs, not_run = peer.time(shape, wanted, rounds, min_seconds=min_seconds,
                                    budget_seconds=BUDGET_SECONDS, **timing.same_start())
    if not_run:
        skipped["torch"] = next(iter(not_run.values()))
    return timing.merged(timings, theirs), skipped


def peer_facts(peer):
    """The page's line on how PyTorch was timed (its version, its threads)."""
    version = peer.torch_version or "not started"
    return (f"PyTorch: {peer.method} (torch {version}, {peer.threads_used or peer.threads} "
            "threads): per shape and dtype fastbn's group of rounds, then PyTorch's in a "
            "fresh process; ratios are of the two groups' medians")


def median_ms(timings, name):
    """Median of kernel ``name`` in ms, or None."""
    found = timings.get(name)
    return None if found is None or found.median is None else found.median * 1e3


def rows_of(timings, backends, shape, dtype, skipped):
    """Table rows and figures (dicts) of one group."""
    rows, figures = [], []
    for backend in backends:
        if backend in skipped:
            rows.append([backend, dtype, str(shape)] + ["n/a"] * (len(COLUMNS) - 3))
            continue
        med = {k: median_ms(timings, f"{backend} {k}") for k in ("forward", "simplified",
                                                                 "staged")}
        copy_ms = median_ms(timings, timing.COPY)
        spread = max((t.spread for n, t in timings.items() if n.startswith(backend + " ")),
                     default=0.0)
        figure = {
            "backend": backend, "shape": list(shape), "dtype": dtype,
            "forward_ms": med["forward"], "simplified_ms": med["simplified"],
            "staged_ms": med["staged"], "copy_ms": copy_ms,
            "speedup_simplified_over_staged": timings.ratio(
                f"{backend} staged", f"{backend} simplified", "median"),
            "forward_ratio_to_torch": timings.ratio("torch forward", f"{backend} forward",
                                                    "median"),
            "backward_ratio_to_torch": timings.ratio("torch simplified",
                                                     f"{backend} simplified", "median"),
            "forward_fraction_of_copy_limit": timing.fraction_of_copy_limit(
                "forward", med["forward"], copy_ms),
            "backward_fraction_of_copy_limit": timing.fraction_of_copy_limit(
                "backward", med["simplified"], copy_ms),
            "spread": spread,
        }
        figures.append(figure)
        rows.append([backend, dtype, str(shape), cell(med["forward"], 3),
                     cell(med["simplified"], 3), cell(med["staged"], 2),
                     cell(figure["speedup_simplified_over_staged"]),
                     cell(figure["forward_ratio_to_torch"]),
                     cell(figure["backward_ratio_to_torch"]),
                     cell(figure["forward_fraction_of_copy_limit"]),
                     cell(figure["backward_fraction_of_copy_limit"]),
                     f"{spread:.0%}" + (" !" if spread > timing.UNSTABLE else "")])
    return rows, figures


def run(options):
    """Time the default grid; see the module docstring.

    Returns
    -------
    fastbn.bench.report.Report
    """
    shapes = options.shapes or options.pick(DEFAULT_SHAPES + LARGE_SHAPES, DEFAULT_SHAPES,
                                            TINY_SHAPES)
    dtypes = options.dtypes or options.pick(["float32", "float64"], ["float32"], ["float32"])
    backends = options.backends or default_backends()
    rounds = options.rounds or options.pick(7, 5, 2)
    threads = options.threads[0] if options.threads else None
    report = Report("CPU backends vs PyTorch CPU and the copy limit", options.command)
    rows, figures = [], []
    ours = [b for b in backends if b != "torch"]
    with Threads(threads, use_torch=False), Peer(fastbn_thread_count(ours, threads)) as peer:
        for dtype in dtypes:
            for shape in shapes:
                progress(options, f"default {format_shape(shape)} {dtype}")
                timings, skipped = time_backends(backends, shape, dtype, rounds, peer=peer)
                group_rows, group_figures = rows_of(timings, backends, shape, dtype, skipped)
                rows += group_rows
                figures += group_figures
                label = f"{format_shape(shape)} {dtype}"
                report.add_warnings(timings.warnings(label))
                report.add_warnings(f"{label}: {b} skipped: {r}" for b, r in skipped.items())
        report.add_fact("threads: " + ", ".join(f"{b} {threads_in_use(b)}" for b in ours)
                        + ("" if "torch" not in backends else
                           f", torch {peer.threads_used or peer.threads}")
                        + "; `np.copyto` one thread")
        if "torch" in backends:
            report.add_fact(peer_facts(peer))
    report.add_fact(f"timing: {rounds} interleaved rounds per shape and dtype (more while a "
                    "figure is unstable); every sample, fastbn's and PyTorch's, starts after "
                    f"a {timing.SETTLE_SECONDS * 1e3:.0f} ms sleep and one untimed call; every "
                    "figure is the median of the rounds; `spread` "
                    "is the largest (median - best) / best of the row's kernels, `!` above "
                    f"{timing.UNSTABLE:.0%}")
    report.add_table("Times and ratios", COLUMNS, rows,
                     "Times in ms. *vs torch*: PyTorch's time / the backend's (above 1: "
                     "faster). *roof*: fraction of the copy limit (forward 2, simplified "
                     "backward 3 item sizes per element at the bandwidth of `np.copyto` on "
                     "the same array, in fastbn's rounds).")
    add_bars(report, figures, shapes)
    report.data["rows"] = figures
    return report


def add_bars(report, figures, shapes):
    """Simplified faster than staged; compiled backends vs PyTorch and the roof."""
    speedups = [f["speedup_simplified_over_staged"] for f in figures
                if f["speedup_simplified_over_staged"] is not None]
    if speedups:
        report.add_bar("the simplified backward is faster than the staged one, every backend "
                       "and case", min(speedups) > 1, f"smallest {min(speedups):.2f}x")
    compiled = [f for f in figures if f["backend"] in COMPILED]
    torch_ratios = [f[k] for f in compiled for k in ("forward_ratio_to_torch",
                                                     "backward_ratio_to_torch")
                    if f[k] is not None]
    if torch_ratios:
        report.add_bar("numba and cython at least as fast as PyTorch CPU, forward and "
                       "backward, every case", min(torch_ratios) >= 1.0,
                       f"worst {min(torch_ratios):.2f}x")
    largest = max(shapes, key=lambda s: math.prod(s))
    roofs = [f[k] for f in compiled if tuple(f["shape"]) == tuple(largest)
             for k in ("forward_fraction_of_copy_limit", "backward_fraction_of_copy_limit")
             if f[k] is not None]
    if roofs:
        report.add_bar(f"numba and cython reach {ROOF_BAR} of the copy limit on "
                       f"{tuple(largest)}", min(roofs) >= ROOF_BAR, f"worst {min(roofs):.2f}")
