"""Command line: ``python -m fastbn {info,check,bench,tune,experiment,dashboard}`` (or the ``fastbn``
script). It parses and dispatches; the benchmark suites live in :mod:`fastbn.bench`."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fastbn", description="Fast batch-normalization kernels.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="show the processor, the backends, their threads and tuning")
    check = commands.add_parser(
        "check", help="gradient and parity checks on every available backend")
    check.add_argument("--backends", help="comma-separated backend names (default: all available)")
    bench = commands.add_parser(
        "bench", help="run a benchmark suite (default: every CPU backend vs PyTorch CPU) "
                      "and print its report")
    add_bench_arguments(bench)
    experiment = commands.add_parser(
        "experiment", help="the batch-norm seed experiments on the digits, with plots "
                           "(needs the [experiments] extra)")
    from .experiments import cli as experiment_cli
    experiment_cli.add_arguments(experiment)
    tune = commands.add_parser(
        "tune", help="time candidate kernel plans on this machine and keep the fastest "
                     "as wisdom (see fastbn.plans)")
    from . import tune as tune_module
    tune_module.add_arguments(tune)
    dashboard = commands.add_parser(
        "dashboard", help="run the asv suite for this commit, publish and serve the dashboard "
                          "(needs the [bench] extra and a clone of the repository)")
    from . import dashboard as dashboard_module  # standard library only at import
    dashboard_module.add_arguments(dashboard)
    args = parser.parse_args(argv)

    if args.command == "info":
        from . import machine, registry, tune
        # the processor (model, features, caches); per backend, the constants
        # it chose for it (its "tuning" entry); whether wisdom is in use, and
        # the plan each call class of the default grid gets
        print(json.dumps({"machine": machine.describe(), "backends": registry.backend_info(),
                          "plans": tune.planned()}, indent=2))
        return 0
    if args.command == "check":
        from . import check as check_module
        backends = args.backends.split(",") if args.backends else None
        return check_module.main(backends)
    if args.command == "experiment":
        return experiment_cli.run(args)
    if args.command == "dashboard":
        return dashboard_module.run(args)
    if args.command == "tune":
        return tune_module.run(args)
    return run_bench(args, argv)


def add_bench_arguments(parser):
    """The options of ``fastbn bench``."""
    from .bench.suites import SUITES

    parser.add_argument("--suite", choices=tuple(SUITES), default="default",
                        help="; ".join(f"{name}: {what}" for name, (_, what) in SUITES.items()))
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and rounds (the default suite: under a minute)")
    parser.add_argument("--profile", choices=("full", "quick", "tiny"),
                        help="full (default), quick (= --quick), tiny (a check in seconds)")
    parser.add_argument("--report", metavar="PATH", help="write the Markdown page here")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    parser.add_argument("--shapes", metavar="SHAPES",
                        help='comma-separated shapes, channel axis 1, e.g. "256x4096,32x64x56x56"')
    parser.add_argument("--dtype", metavar="DTYPES",
                        help="comma-separated float32, float64, float16, bfloat16 "
                             "(both = float32,float64)")
    parser.add_argument("--backends", metavar="NAMES",
                        help="comma-separated fastbn backends and/or torch")
    parser.add_argument("--threads", metavar="N[,N...]",
                        help="thread count(s) for numba, OpenMP and torch")
    parser.add_argument("--rounds", type=int, metavar="N", help="interleaved rounds")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")


def run_bench(args, argv=None):
    """Parse the ``bench`` options into suite options, run the suite, write the report."""
    from .bench import kernels, suites

    words = sys.argv[1:] if argv is None else list(argv)
    try:
        options = suites.Options(
            profile=args.profile or ("quick" if args.quick else "full"),
            command=" ".join(["fastbn"] + words),
            shapes=kernels.parse_shapes(args.shapes) if args.shapes else None,
            dtypes=kernels.parse_dtypes(args.dtype) if args.dtype else None,
            backends=kernels.resolve_backends(args.backends) if args.backends else None,
            threads=kernels.parse_threads(args.threads) if args.threads else None,
            rounds=args.rounds, progress=not args.no_progress)
        report = suites.run(args.suite, options)
    except (ValueError, RuntimeError) as exc:
        print(f"fastbn bench: {exc}", file=sys.stderr)
        return 2
    text = report.to_markdown()
    print(text)
    for path, content in ((args.report, text), (args.json, report.to_json())):
        if path:
            with open(path, "w") as f:
                f.write(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
