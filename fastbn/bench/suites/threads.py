"""Thread scaling (``--suite threads``).

For each thread count (default: 1 and every count up to the cores, in
powers of two), the forward and the simplified backward of every backend
and of PyTorch, interleaved per shape with the copy, at that many threads
(numba, OpenMP through threadpoolctl; torch in its peer process, see
:func:`fastbn.bench.suites.default.time_backends`). Figures are medians of
the rounds; the scaling is the time at the first count / the time at the
others.
"""
from ..kernels import Threads, default_backends, format_shape, threads_in_use
from ..peer import Peer
from ..report import Report, cell
from ... import machine
from . import progress
from .default import DEFAULT_SHAPES, TINY_SHAPES, median_ms, time_backends

KINDS = ("forward", "simplified")
COMPILED = ("numba", "cython")
SCALING_BAR = 1.3


def default_counts():
    """1, 2, 4, ... up to the cores this process may use."""
    counts, n = [], 1
    while n <= machine.cpu_count():
        counts.append(n)
        n *= 2
    return counts


def run(options):
    """The scaling table; see the module docstring.

    Returns
    -------
    fastbn.bench.report.Report
    """
    counts = options.threads or default_counts()
    backends = options.backends or default_backends()
    shapes = options.shapes or options.pick(DEFAULT_SHAPES, DEFAULT_SHAPES[-2:], TINY_SHAPES)
    dtypes = options.dtypes or ["float32"]
    rounds = options.rounds or options.pick(7, 5, 2)
    report = Report("Thread scaling of the CPU backends and PyTorch", options.command)
    medians = {}
    ours = [b for b in backends if b != "torch"]
    with Peer() as peer:
        for count in counts:
            peer.threads = count
            with Threads(count, use_torch=False):
                for dtype in dtypes:
                    for shape in shapes:
                        progress(options, f"threads {count} {format_shape(shape)} {dtype}")
                        got, _ = time_backends(backends, shape, dtype, rounds, KINDS, peer=peer)
                        report.add_warnings(got.warnings(f"{count} threads "
                                                         f"{format_shape(shape)}"))
                        for backend in backends:
                            for kind in KINDS:
                                medians[backend, dtype, shape, kind, count] = median_ms(
                                    got, f"{backend} {kind}")
                report.add_fact(f"at {count}: " + ", ".join(
                    [f"{b} {threads_in_use(b)}" for b in ours]
                    + ([f"torch {peer.threads_used}"] if "torch" in backends else [])))
        if "torch" in backends:
            report.add_fact(f"PyTorch: {peer.method} (torch {peer.torch_version or 'not started'}): "
                            "per thread count, shape and dtype fastbn's group of rounds, then "
                            "PyTorch's in a fresh process")
    first = counts[0]
    columns = ["backend", "dtype", "shape"]
    columns += [f"{k} ms @{c}" for c in counts for k in ("fwd", "bwd")]
    columns += [f"{k} x{first}->{c}" for c in counts[1:] for k in ("fwd", "bwd")]
    rows = []
    for backend in backends:
        for dtype in dtypes:
            for shape in shapes:
                cells = [backend, dtype, str(shape)]
                cells += [cell(medians.get((backend, dtype, shape, k, c)), 3)
                          for c in counts for k in KINDS]
                for c in counts[1:]:
                    for kind in KINDS:
                        base = medians.get((backend, dtype, shape, kind, first))
                        now = medians.get((backend, dtype, shape, kind, c))
                        scaling = base / now if base and now else None
                        cells.append(cell(scaling))
                        if (scaling is not None and backend in COMPILED
                                and shape == shapes[-1] and c == counts[-1]):
                            report.add_bar(f"{backend} {kind} on {shape}: {c} threads >= "
                                           f"{SCALING_BAR}x {first}", scaling >= SCALING_BAR,
                                           f"{scaling:.2f}x")
                rows.append(cells)
    report.add_table("Times per thread count and scaling", columns, rows,
                     "Medians of the rounds in ms; *x1->N*: the time at the first count / "
                     "the time at N.")
    return report
