"""``fastbn tune``: time candidate plans on this machine and keep the winners as wisdom.

For each backend that has plans (a backend module with ``plan_candidates``,
see :mod:`fastbn.plans`), each shape and dtype of the grid and each pass,
the candidates of the call's class are timed side by side with the timing
core (interleaved rounds, medians, a settle between samples). The default
plan is always a candidate, and another wins only when its median is
faster by more than :data:`MARGIN`, so tuning never picks a plan slower than
the default on the shapes it timed. Shapes of one call class share a plan:
the winner is the candidate with the smallest product of its time ratios to
the default over those shapes.
"""
import math
import sys
import time

from . import plans, registry
from .validation import canonical_shape
from .bench import kernels, timing
from .bench.suites.default import DEFAULT_SHAPES, LARGE_SHAPES

GRID_SHAPES = DEFAULT_SHAPES + LARGE_SHAPES
GRID_DTYPES = ("float32", "float64")
# A candidate must beat the default plan's median by this fraction to replace it.
MARGIN = 0.03
ROUNDS = 7
QUICK_ROUNDS = 3
_PASS_KERNEL = {"forward": "forward", "eval": "forward_eval", "backward": "simplified"}


def _canonical(shape):
    """The ``(A, C, B)`` view of a shape with its channel axis 1."""
    return canonical_shape(shape, 1)


def grid(shapes, dtypes, quick):
    """``call class -> [(shape, dtype)]`` for one backend; with ``quick``, one
    shape per class (the first of the grid)."""
    import numpy as np

    classes = {}
    for dtype in dtypes:
        itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
        for shape in shapes:
            for pass_name in plans.PASSES:
                key = plans.call_class(_canonical(shape), dtype, pass_name, itemsize)
                members = classes.setdefault(key, [])
                if not (quick and members):
                    members.append((shape, dtype, pass_name))
    return classes


class _Bar:
    """One progress line on a terminal (stderr), rewritten in place."""

    def __init__(self, total, enabled):
        self.total, self.done = total, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.plain = enabled and not self.enabled
        self.started = time.perf_counter()

    def step(self, text):
        self.done += 1
        if self.enabled:
            width = 24
            filled = width * self.done // max(1, self.total)
            line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                    f"{time.perf_counter() - self.started:5.0f}s {text}")
            print(line[:120].ljust(120), end="", file=sys.stderr, flush=True)
        elif self.plain:
            print(f"[fastbn tune] {self.done}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print(file=sys.stderr, flush=True)


def _time_candidates(backend, module, key, shape, dtype, pass_name, rounds):
    """Median seconds of each candidate plan on one shape, timed side by side."""
    itemsize = kernels.numpy_dtype(dtype).itemsize
    candidates = module.plan_candidates(_canonical(shape), itemsize, pass_name)
    if len(candidates) == 1:
        return candidates, [1.0]            # nothing to choose
    case = kernels.Kernels(backend, kernels.make_data(shape, dtype, seed=0))
    run = getattr(case, _PASS_KERNEL[pass_name])

    def forced(plan):
        def call():
            with plans.forced(backend, key, plan):
                run()
        return call

    timings = timing.interleaved({str(i): forced(plan) for i, plan in enumerate(candidates)},
                                 rounds, max_rounds=rounds, **timing.same_start())
    return candidates, [timings[str(i)].median for i in range(len(candidates))]


def _winner(candidates, log_ratios, count):
    """The candidate with the smallest summed log time ratio to the default
    (the first) over ``count`` shapes, and its speedup; the default unless
    another is faster by more than :data:`MARGIN`."""
    best = min(range(len(candidates)), key=lambda i: log_ratios[i])
    speedup = math.exp(-log_ratios[best] / count)
    if best != 0 and speedup < 1 + MARGIN:
        return 0, 1.0                       # within noise: keep the default
    return best, speedup


def measure(backend, key, shape, dtype, pass_name):
    """The fastest candidate plan of one call class, timed now on ``shape``
    (``set_tuning("measure")``; :data:`QUICK_ROUNDS` rounds); ``{}`` when the
    default plan is the fastest."""
    module = registry.get_backend(backend)
    candidates, medians = _time_candidates(backend, module, key, shape, dtype, pass_name,
                                           QUICK_ROUNDS)
    best, _ = _winner(candidates, [math.log(m / medians[0]) for m in medians], 1)
    return candidates[best] if best else {}


def tune(backends=None, shapes=None, dtypes=None, quick=False, progress=True, save=True):
    """Time candidate plans and (with ``save``) write the winners as wisdom.

    Parameters
    ----------
    backends : list of str, optional
        Backends with plans (default: every available one that has them).
    shapes : list of tuple, optional
        Shapes with the channel axis 1 (default: the bench's default grid).
    dtypes : list of str, optional
        Default float32 and float64.
    quick : bool
        One shape per call class and :data:`QUICK_ROUNDS` rounds.
    progress : bool
        A progress bar on a terminal (progress lines otherwise).
    save : bool
        Write the winners to the wisdom file.

    Returns
    -------
    dict
        ``backend -> {call class -> {"plan", "default", "speedup", "shapes"}}``
        and, under ``"_wisdom"``, the file written (or None).
    """
    names = backends or [name for name in registry.available_backends()
                         if hasattr(registry.get_backend(name), "plan_candidates")]
    shapes = list(shapes or GRID_SHAPES)
    dtypes = list(dtypes or GRID_DTYPES)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    work = {}
    for name in names:
        module = registry.get_backend(name)
        if not hasattr(module, "plan_candidates"):
            raise ValueError(f"backend {name!r} has no plans to tune")
        work[name] = (module, grid(shapes, dtypes, quick))
    bar = _Bar(sum(len(m) for _, classes in work.values() for m in classes.values()), progress)
    results, winners = {}, {}
    try:
        for name, (module, classes) in work.items():
            for key, members in classes.items():
                log_ratios = None
                for shape, dtype, pass_name in members:
                    bar.step(f"{name} {'x'.join(map(str, shape))} {dtype} {pass_name}")
                    candidates, medians = _time_candidates(name, module, key, shape, dtype,
                                                           pass_name, rounds)
                    ratios = [math.log(m / medians[0]) for m in medians]
                    log_ratios = ratios if log_ratios is None else [
                        a + b for a, b in zip(log_ratios, ratios)]
                best, speedup = _winner(candidates, log_ratios, len(members))
                results.setdefault(name, {})[key] = {
                    "plan": candidates[best], "default": best == 0, "speedup": speedup,
                    "shapes": ["x".join(map(str, s)) for s, _, _ in members]}
                # the default won: store nothing, so that each shape of the
                # class keeps its own default plan (the timed shape's is
                # not the others')
                winners.setdefault(name, {})[key] = candidates[best] if best else None
    finally:
        bar.close()
    path = None
    if save and winners:
        builds = {name: build for name, build in plans.builds().items() if name in winners}
        path = plans.save(builds, winners)
        plans.load(plans.builds())
    results["_wisdom"] = path
    return results


def planned():
    """The plan each call class of the default grid gets now, per backend
    with plans (``fastbn info``).

    Returns
    -------
    dict
        ``"wisdom"``: :func:`fastbn.plans.status`; for each backend with plans,
        ``{call class: {"plan": dict, "source": "wisdom" or "default"}}``.
    """
    import numpy as np

    plans.load(plans.builds())
    result = {"wisdom": plans.status()}
    for name in registry.available_backends():
        module = registry.get_backend(name)
        if not hasattr(module, "plan_candidates"):
            continue
        entries = result[name] = {}
        for key, members in grid(GRID_SHAPES, GRID_DTYPES, quick=True).items():
            shape, dtype, pass_name = members[0]
            stored = plans.stored_plan(name, key)
            entries[key] = {
                "plan": stored if stored is not None else module.default_plan(
                    _canonical(shape), np.dtype(dtype).itemsize, pass_name),
                "source": "default" if stored is None else "wisdom"}
    return result


def add_arguments(parser):
    """The options of ``fastbn tune``."""
    parser.add_argument("--quick", action="store_true",
                        help="one shape per call class, fewer rounds (minutes on 2 cores)")
    parser.add_argument("--backends", metavar="NAMES",
                        help="comma-separated backends (default: every one with plans)")
    parser.add_argument("--shapes", metavar="SHAPES",
                        help='comma-separated shapes, channel axis 1, e.g. "256x4096,32x64x56x56"')
    parser.add_argument("--dtype", metavar="DTYPES", help="comma-separated (default float32,float64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args):
    """``fastbn tune``: tune, print the plan each call class got, write the wisdom."""
    try:
        results = tune(
            backends=args.backends.split(",") if args.backends else None,
            shapes=kernels.parse_shapes(args.shapes) if args.shapes else None,
            dtypes=kernels.parse_dtypes(args.dtype) if args.dtype else None,
            quick=args.quick, progress=not args.no_progress)
    except (ValueError, RuntimeError) as exc:
        print(f"fastbn tune: {exc}", file=sys.stderr)
        return 2
    path = results.pop("_wisdom")
    for name, classes in results.items():
        print(f"{name}:")
        for key, found in sorted(classes.items()):
            source = "default" if found["default"] else f"{found['speedup']:.2f}x the default"
            fields = ", ".join(f"{k}={v}" for k, v in sorted(found["plan"].items()))
            print(f"  {key:32s} {source:18s} {fields}")
    print(f"wisdom: {path}" if path else "wisdom: not written")
    return 0
