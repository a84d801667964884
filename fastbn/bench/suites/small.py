"""Small and in-cache shapes (``--suite small``).

Per-call overhead on ``(8, 16)`` and ``(8, 16, 4, 4)`` float32 (us per
call), and the in-cache shapes against PyTorch in float32 and float64.
Every fastbn call goes through the public API with running statistics and
``out=``. The kernels of one shape and dtype (each backend's forward and
simplified backward) are timed in interleaved rounds of about 5 ms each,
then PyTorch's in its peer process with the same rounds (see
:func:`fastbn.bench.suites.default.time_backends`); figures are medians of
the rounds.

Bars (on the medians): training forward <= 25 us and simplified backward
<= 20 us on ``(8, 16)``, numba and cython; in-cache ``vs torch`` >= 1.2,
forward and backward, every cell.
"""
from .. import timing
from ..kernels import Threads, default_backends, fastbn_thread_count, format_shape, threads_in_use
from ..peer import Peer
from ..report import Report, cell
from . import progress
from .default import median_ms, peer_facts, time_backends

OVERHEAD_SHAPES = [(8, 16), (8, 16, 4, 4)]
IN_CACHE_SHAPES = [(256, 4096), (128, 512, 7, 7), (64, 256, 14, 14)]
COMPILED = ("numba", "cython")
FORWARD_BAR_US = 25.0
BACKWARD_BAR_US = 20.0
TORCH_BAR = 1.2
ROUND_SECONDS = 0.005
KINDS = ("forward", "simplified")


def run(options):
    """Both tables; see the module docstring.

    Returns
    -------
    fastbn.bench.report.Report
    """
    backends = options.backends or default_backends()
    rounds = options.rounds or options.pick(15, 7, 2)
    overhead_shapes = options.pick(OVERHEAD_SHAPES, OVERHEAD_SHAPES, OVERHEAD_SHAPES[:1])
    in_cache_shapes = options.shapes or options.pick(IN_CACHE_SHAPES, IN_CACHE_SHAPES,
                                                     [(16, 32, 4, 4)])
    dtypes = options.dtypes or options.pick(["float32", "float64"], ["float32"], ["float32"])
    threads = options.threads[0] if options.threads else None
    min_seconds = options.pick(ROUND_SECONDS, ROUND_SECONDS, 1e-4)
    report = Report("CPU speed on small and in-cache shapes", options.command)
    rows = []
    ours = [b for b in backends if b != "torch"]
    with Threads(threads, use_torch=False), Peer(fastbn_thread_count(ours, threads)) as peer:
        report.add_fact("threads: " + ", ".join(
            [f"{b} {threads_in_use(b)}" for b in ours]
            + ([f"torch {peer.threads}"] if "torch" in backends else [])))
        report.add_fact(f"timing: {rounds} interleaved rounds of about {min_seconds * 1e3:g} ms "
                        "per shape and dtype; cells are medians of the rounds (best in "
                        "parentheses)")
        for shape in overhead_shapes:
            progress(options, f"small overhead {format_shape(shape)}")
            got, skipped = time_backends(backends, shape, "float32", rounds, KINDS, min_seconds,
                                         peer)
            report.add_warnings(got.warnings(format_shape(shape)))
            for kind, bar in (("forward", FORWARD_BAR_US), ("simplified", BACKWARD_BAR_US)):
                cells = [str(shape), kind]
                for backend in backends:
                    t = got.get(f"{backend} {kind}")
                    cells.append("n/a" if t is None or t.median is None else
                                 f"{t.median * 1e6:.1f} ({t.best * 1e6:.1f})")
                    if shape == OVERHEAD_SHAPES[0] and backend in COMPILED and t is not None:
                        report.add_bar(f"{backend} {kind} on {shape} <= {bar:g} us",
                                       t.median * 1e6 <= bar, f"{t.median * 1e6:.1f} us")
                rows.append(cells)
        report.add_table("Per-call overhead (float32, us per call)",
                         ["shape", "kernel"] + list(backends), rows)
        rows = []
        for dtype in dtypes:
            for shape in in_cache_shapes:
                progress(options, f"small in-cache {format_shape(shape)} {dtype}")
                got, skipped = time_backends(backends, shape, dtype, rounds, KINDS,
                                             min_seconds, peer)
                report.add_warnings(got.warnings(f"{format_shape(shape)} {dtype}"))
                for backend in backends:
                    if backend == "torch" or backend in skipped:
                        continue
                    cells = [backend, dtype, str(shape)]
                    for kind in KINDS:
                        ratio = got.ratio(f"torch {kind}", f"{backend} {kind}", "median")
                        spread = got[f"{backend} {kind}"].spread
                        cells += [cell(median_ms(got, f"{backend} {kind}"), 3),
                                  cell(median_ms(got, f"torch {kind}"), 3),
                                  cell(ratio) + (" !" if spread > timing.UNSTABLE else "")]
                        if ratio is not None and backend in COMPILED:
                            report.add_bar(f"{backend} {dtype} {shape} {kind} >= {TORCH_BAR}x "
                                           "PyTorch", ratio >= TORCH_BAR, f"{ratio:.2f}x")
                    rows.append(cells)
        if "torch" in backends:
            report.add_fact(peer_facts(peer))
    report.add_table("In-cache shapes against PyTorch", [
        "backend", "dtype", "shape", "fwd ms", "torch fwd ms", "fwd vs torch", "bwd ms",
        "torch bwd ms", "bwd vs torch"], rows,
        "*vs torch*: PyTorch's median / the backend's (above 1: faster); `!`: a spread above "
        f"{timing.UNSTABLE:.0%}.")
    return report
