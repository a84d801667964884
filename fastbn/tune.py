"""``fastbn tune``: time candidate plans on this machine and keep the winners as wisdom.

For each backend that has plans (a backend module with ``plan_candidates``,
see :mod:`fastbn.plans`), each shape and dtype of the grid and each pass,
the candidates of the call's class are timed side by side with the timing
core (interleaved rounds, medians, a settle between samples). Each shape's
own default plan is always a candidate. Shapes of one call class share a
plan (their defaults may differ): the winner is the candidate with the
smallest product of its time ratios to each shape's default, among those
no slower than the default on any shape of the class, and only when it is
faster by more than :data:`MARGIN` on average. The winner of many
candidates is the one that noise favoured most, so it is timed again
against the defaults alone (:data:`CONFIRM_ROUNDS` rounds per shape) and
kept only if it was faster in all rounds but one on every shape, and by
more than the margin (:func:`_confirm`). So tuning never picks a plan
slower than the default on the shapes it timed. ``fastbn tune --check``
times the plans in use against the defaults again, shape by shape.
"""
import json
import math
import sys
import time

from . import plans, registry
from .bench import kernels, timing
from .bench.suites.default import DEFAULT_SHAPES, LARGE_SHAPES
from .validation import canonical_shape

GRID_SHAPES = DEFAULT_SHAPES + LARGE_SHAPES
GRID_DTYPES = ("float32", "float64")
# A candidate must beat the default plans' medians by this fraction (geometric
# mean over the class's shapes) to replace them.
MARGIN = 0.03
ROUNDS = 7
QUICK_ROUNDS = 3
# Rounds of the second timing of a class's winner against its shapes' defaults.
CONFIRM_ROUNDS = 7
_PASS_KERNEL = {"forward": "forward", "eval": "forward_eval", "backward": "simplified"}


def _canonical(shape):
    """The ``(A, C, B)`` view of a shape with its channel axis 1."""
    return canonical_shape(shape, 1)


def grid(shapes, dtypes):
    """``call class -> [(shape, dtype, pass)]``: the calls of the grid, by class."""
    import numpy as np

    classes = {}
    for dtype in dtypes:
        itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
        for shape in shapes:
            for pass_name in plans.PASSES:
                key = plans.call_class(_canonical(shape), dtype, pass_name, itemsize)
                classes.setdefault(key, []).append((shape, dtype, pass_name))
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


def _timings(backend, key, shape, dtype, pass_name, candidates, rounds):
    """The timing core's :class:`~fastbn.bench.timing.Timings` of the plans of
    ``candidates`` on one shape, side by side (kernel ``str(i)`` is plan i)."""
    case = kernels.Kernels(backend, kernels.make_data(shape, dtype, seed=0))
    run = getattr(case, _PASS_KERNEL[pass_name])

    def forced(plan):
        def call():
            with plans.forced(backend, key, plan):
                run()
        return call

    return timing.interleaved({str(i): forced(plan) for i, plan in enumerate(candidates)},
                              rounds, max_rounds=rounds, **timing.same_start())


def _time_plans(backend, key, shape, dtype, pass_name, candidates, rounds):
    """Median seconds of each plan of ``candidates`` on one shape, timed side by side."""
    timings = _timings(backend, key, shape, dtype, pass_name, candidates, rounds)
    return [timings[str(i)].median for i in range(len(candidates))]


def _paired_ratios(backend, key, shape, dtype, pass_name, pair, rounds):
    """Per round, the second plan's time over the first's (timed in the same round)."""
    timings = _timings(backend, key, shape, dtype, pass_name, pair, rounds)
    return [b / a for a, b in zip(timings["0"].samples, timings["1"].samples)]


def _time_candidates(backend, module, key, shape, dtype, pass_name, rounds):
    """The candidate plans of one shape (its default first) and their medians."""
    itemsize = kernels.numpy_dtype(dtype).itemsize
    candidates = module.plan_candidates(_canonical(shape), itemsize, pass_name)
    if len(candidates) == 1:
        return candidates, [1.0]            # nothing to choose
    return candidates, _time_plans(backend, key, shape, dtype, pass_name, candidates, rounds)


def _label(backend, shape, dtype, pass_name):
    """A call as the progress bar shows it: ``numba 64x256x14x14 float64 backward``."""
    return f"{backend} {'x'.join(map(str, shape))} {dtype} {pass_name}"


def _median(ratios):
    """The middle of the per-round ratios (the upper one of an even count); None if none."""
    ratios = sorted(ratios)
    return ratios[len(ratios) // 2] if ratios else None


def _planned_backends(backends):
    """``backends``, or every available backend that has plans."""
    return backends or [name for name in registry.available_backends()
                        if hasattr(registry.get_backend(name), "plan_candidates")]


def _plan_id(plan):
    return json.dumps(plan, sort_keys=True)


def choose(timed):
    """The plan a call class gets from its shapes' timings.

    Parameters
    ----------
    timed : list of (list of dict, list of float)
        Per shape of the class: its candidate plans, its own default first,
        and their median seconds. Shapes of a class may have different
        defaults (and so list the same plans in another order).

    Returns
    -------
    plan : dict or None
        The plan timed on every shape, no slower than the default there,
        with the smallest product of its time ratios to the defaults; None
        (each shape keeps its own default) unless that product's geometric
        mean is a speedup of more than :data:`MARGIN`.
    speedup : float
        The geometric mean of the default's time over the plan's (1.0 for None).
    """
    totals, worst, seen, found = {}, {}, {}, {}
    for candidates, medians in timed:
        for plan, median in zip(candidates, medians):
            ident = _plan_id(plan)
            ratio = math.log(median / medians[0])
            totals[ident] = totals.get(ident, 0.0) + ratio
            worst[ident] = max(worst.get(ident, ratio), ratio)
            seen[ident] = seen.get(ident, 0) + 1
            found[ident] = plan
    eligible = [ident for ident in totals if seen[ident] == len(timed) and worst[ident] <= 0.0]
    if not eligible:
        return None, 1.0
    best = min(eligible, key=totals.get)
    speedup = math.exp(-totals[best] / len(timed))
    if speedup < 1 + MARGIN:
        return None, 1.0                    # within noise: keep the defaults
    return found[best], speedup


def measure(backend, key, shape, dtype, pass_name):
    """The fastest candidate plan of one call class, timed now on ``shape``
    (``set_tuning("measure")``; :data:`QUICK_ROUNDS` rounds); ``{}`` when the
    default plan is the fastest."""
    module = registry.get_backend(backend)
    timed = _time_candidates(backend, module, key, shape, dtype, pass_name, QUICK_ROUNDS)
    plan, _ = choose([timed])
    if plan is not None:
        plan, _ = _confirm(backend, key, [(shape, dtype, pass_name)], [timed], plan)
    return plan or {}


def _confirm(backend, key, members, timed, plan, bar=None):
    """Time ``plan`` again against each member shape's default alone
    (:data:`CONFIRM_ROUNDS` rounds): ``(plan, speedup)`` when it was faster
    in all rounds but at most one on every shape, and faster by more than
    :data:`MARGIN` (the geometric mean over the shapes of its median
    per-round ratio); else ``(None, 1.0)``. Rounds pair the two plans'
    samples, so a slow spell of the machine cancels in each ratio."""
    logs = []
    for (shape, dtype, pass_name), (candidates, _) in zip(members, timed):
        if bar is not None:
            bar.step(_label(backend, shape, dtype, pass_name) + " (again)")
        if plan == candidates[0]:           # this shape's default: nothing to time
            logs.append(0.0)
            continue
        ratios = _paired_ratios(backend, key, shape, dtype, pass_name,
                                [candidates[0], plan], CONFIRM_ROUNDS)
        if not ratios or sum(ratio >= 1.0 for ratio in ratios) > 1:
            return None, 1.0
        logs.append(math.log(_median(ratios)))
    speedup = math.exp(-sum(logs) / len(logs))
    if speedup < 1 + MARGIN:
        return None, 1.0
    return plan, speedup


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
        :data:`QUICK_ROUNDS` rounds per shape instead of :data:`ROUNDS`.
    progress : bool
        A progress bar on a terminal (progress lines otherwise).
    save : bool
        Write the winners to the wisdom file.

    Returns
    -------
    dict
        ``backend -> {call class -> {"plan", "default", "speedup", "shapes"}}``
        (``plan`` is the winner, or the first shape's default when
        ``default``) and, under ``"_wisdom"``, the file written (or None).
    """
    names = _planned_backends(backends)
    shapes = list(shapes or GRID_SHAPES)
    dtypes = list(dtypes or GRID_DTYPES)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    work = {}
    for name in names:
        module = registry.get_backend(name)
        if not hasattr(module, "plan_candidates"):
            raise ValueError(f"backend {name!r} has no plans to tune")
        work[name] = (module, grid(shapes, dtypes))
    bar = _Bar(sum(len(m) for _, classes in work.values() for m in classes.values()), progress)
    results, winners = {}, {}
    try:
        for name, (module, classes) in work.items():
            for key, members in classes.items():
                timed = []
                for shape, dtype, pass_name in members:
                    bar.step(_label(name, shape, dtype, pass_name))
                    timed.append(_time_candidates(name, module, key, shape, dtype, pass_name,
                                                  rounds))
                plan, speedup = choose(timed)
                if plan is not None:
                    bar.total += len(members)
                    plan, speedup = _confirm(name, key, members, timed, plan, bar)
                results.setdefault(name, {})[key] = {
                    "plan": plan or timed[0][0][0], "default": plan is None, "speedup": speedup,
                    "shapes": ["x".join(map(str, s)) for s, _, _ in members]}
                # the defaults won: store nothing, so that each shape of the
                # class keeps its own default plan
                winners.setdefault(name, {})[key] = plan
    finally:
        bar.close()
    path = None
    if save and winners:
        builds = {name: build for name, build in plans.builds().items() if name in winners}
        path = plans.save(builds, winners)
        plans.load(plans.builds())
    results["_wisdom"] = path
    return results


def check(backends=None, shapes=None, dtypes=None, rounds=ROUNDS, progress=True):
    """Time the plan each call of the grid gets now against its default plan.

    Every call whose plan (from wisdom, or :func:`fastbn.plans.forced`)
    differs from its shape's default is timed side by side with the default,
    as :func:`tune` times candidates: ``fastbn tune --check`` shows whether
    a stored plan made any shape slower than the default plan.

    Parameters
    ----------
    backends, shapes, dtypes : optional
        As for :func:`tune`.
    rounds : int
    progress : bool

    Returns
    -------
    list of dict
        One per call whose plan is not its default: ``backend``, ``shape``,
        ``dtype``, ``pass``, ``class``, ``plan``, ``default`` and
        ``speedup`` (the default's time over the plan's: the median of the
        rounds' ratios).
    """
    plans.load(plans.builds())
    classes = grid(list(shapes or GRID_SHAPES), list(dtypes or GRID_DTYPES))
    work = []
    for name in _planned_backends(backends):
        module = registry.get_backend(name)
        for key, members in classes.items():
            for shape, dtype, pass_name in members:
                stored = plans.stored_plan(name, key)
                default = module.default_plan(
                    _canonical(shape), kernels.numpy_dtype(dtype).itemsize, pass_name)
                if stored is not None and stored != default:
                    work.append({"backend": name, "shape": shape, "dtype": dtype,
                                 "pass": pass_name, "class": key, "plan": stored,
                                 "default": default})
    bar = _Bar(len(work), progress)
    try:
        for row in work:
            bar.step(_label(row["backend"], row["shape"], row["dtype"], row["pass"]))
            row["speedup"] = 1.0 / _median(_paired_ratios(
                row["backend"], row["class"], row["shape"], row["dtype"], row["pass"],
                [row["default"], row["plan"]], rounds))
    finally:
        bar.close()
    return work


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
        for key, members in grid(GRID_SHAPES, GRID_DTYPES).items():
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
                        help=f"{QUICK_ROUNDS} rounds per shape instead of {ROUNDS} (about a minute on 2 cores)")
    parser.add_argument("--backends", metavar="NAMES",
                        help="comma-separated backends (default: every one with plans)")
    parser.add_argument("--shapes", metavar="SHAPES",
                        help='comma-separated shapes, channel axis 1, e.g. "256x4096,32x64x56x56"')
    parser.add_argument("--dtype", metavar="DTYPES", help="comma-separated (default float32,float64)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing: time each shape's plan in use against its "
                             "default plan")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _format_plan(plan):
    return ", ".join(f"{k}={v}" for k, v in sorted(plan.items()))


def _run_check(args, options):
    rows = check(rounds=QUICK_ROUNDS if args.quick else ROUNDS, **options)
    print(plans.status()["reason"])
    if not rows:
        print("every call of the grid runs its default plan: nothing to check")
        return 0
    for row in rows:
        call = f"{row['backend']} {'x'.join(map(str, row['shape']))} {row['dtype']} {row['pass']}"
        print(f"  {call:40s} {row['speedup']:5.2f}x the default  {_format_plan(row['plan'])}")
    slowest = min(rows, key=lambda row: row["speedup"])
    print(f"slowest against its default: {slowest['speedup']:.2f}x "
          f"({slowest['backend']} {'x'.join(map(str, slowest['shape']))} {slowest['dtype']} "
          f"{slowest['pass']})")
    return 0


def run(args):
    """``fastbn tune``: tune, print the plan each call class got, write the
    wisdom; with ``--check``, time the plans in use against the defaults."""
    try:
        options = {
            "backends": args.backends.split(",") if args.backends else None,
            "shapes": kernels.parse_shapes(args.shapes) if args.shapes else None,
            "dtypes": kernels.parse_dtypes(args.dtype) if args.dtype else None,
            "progress": not args.no_progress}
        if args.check:
            return _run_check(args, options)
        results = tune(quick=args.quick, **options)
    except (ValueError, RuntimeError) as exc:
        print(f"fastbn tune: {exc}", file=sys.stderr)
        return 2
    path = results.pop("_wisdom")
    for name, classes in results.items():
        print(f"{name}:")
        for key, found in sorted(classes.items()):
            source = "default" if found["default"] else f"{found['speedup']:.2f}x the default"
            print(f"  {key:32s} {source:18s} {_format_plan(found['plan'])}")
    print(f"wisdom: {path}" if path else "wisdom: not written")
    return 0
