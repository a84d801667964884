"""Command line: ``python -m fastbn {info,check,bench,experiment}`` (or the ``fastbn`` script)."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fastbn", description="Fast batch-normalization kernels.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="show the backends and their threads")
    check = commands.add_parser(
        "check", help="gradient and parity checks on every available backend")
    check.add_argument("--backends", help="comma-separated backend names (default: all available)")
    bench = commands.add_parser(
        "bench", help="time every available backend (and PyTorch) on the default shapes")
    from . import bench as bench_module
    bench_module.add_arguments(bench)
    experiment = commands.add_parser(
        "experiment", help="the batch-norm seed experiments on the digits, with plots "
                           "(needs the [experiments] extra)")
    from .experiments import cli as experiment_cli
    experiment_cli.add_arguments(experiment)
    dashboard = commands.add_parser(
        "dashboard", help="run the asv suite for this commit, publish and serve the dashboard "
                          "(needs the [bench] extra and a clone of the repository)")
    from . import dashboard as dashboard_module  # standard library only at import
    dashboard_module.add_arguments(dashboard)
    args = parser.parse_args(argv)

    if args.command == "info":
        from . import registry
        print(json.dumps(registry.backend_info(), indent=2))
        return 0
    if args.command == "check":
        from . import check as check_module
        backends = args.backends.split(",") if args.backends else None
        return check_module.main(backends)
    if args.command == "experiment":
        return experiment_cli.run(args)
    if args.command == "dashboard":
        return dashboard_module.run(args)
    return bench_module.run(args)


if __name__ == "__main__":
    sys.exit(main())
