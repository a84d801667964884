"""``fastbn experiment {baseline-vs-batchnorm,weight-scale}``: arguments and run.

This module imports only the standard library at import time, so that the
``fastbn`` command starts fast; the experiment code is imported when run.
"""
import importlib.util
import json
import sys

EXPERIMENTS = ("baseline-vs-batchnorm", "weight-scale")


def add_arguments(parser):
    """Add the experiment's arguments to an ``argparse`` (sub)parser."""
    parser.add_argument("name", choices=EXPERIMENTS,
                        help="baseline-vs-batchnorm: one deep net with and without batch norm "
                             "at weight scale 2e-2; weight-scale: both nets across 20 "
                             "weight-initialization scales")
    parser.add_argument("--plot", metavar="PATH", help="write the figure to PATH (PNG)")
    parser.add_argument("--json", metavar="PATH", help="write every number to PATH (JSON)")
    parser.add_argument("--backend", help="fastbn backend of the batch-norm layers "
                                          "(default: the fastest available)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights and the minibatches (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a short version: 3 epochs (and 2 weight scales)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the nets (default float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_baseline(result, out):
    config = result["config"]
    print(f"baseline-vs-batchnorm on digits: {len(config['hidden_dims']) + 1} layers of "
          f"{config['hidden_dims'][0]}, weight scale {config['weight_scale']:g}, "
          f"{config['num_epochs']} epochs, backend {result['backend']}, seed {result['seed']}",
          file=out)
    print(f"{'net':<10} {'val acc per epoch':<60} {'best val':>8} {'final loss':>10} "
          f"{'BN share':>8}", file=out)
    for name, run in result["runs"].items():
        history = " ".join(f"{v:.2f}" for v in run["val_acc_history"])
        print(f"{name:<10} {history:<60} {run['best_val_acc']:>8.3f} "
              f"{run['final_loss']:>10.3f} {run['time']['batchnorm_fraction_of_step']:>8.2f}",
              file=out)


def _print_weight_scale(result, out):
    config = result["config"]
    print(f"weight-scale on digits: {len(config['hidden_dims']) + 1} layers of "
          f"{config['hidden_dims'][0]}, {config['num_epochs']} epochs, "
          f"backend {result['backend']}, seed {result['seed']}", file=out)
    print(f"{'scale':>9} {'best val (base)':>15} {'best val (BN)':>13} "
          f"{'final loss (base)':>17} {'final loss (BN)':>15}", file=out)
    base, bn = result["baseline"], result["batchnorm"]
    for i, scale in enumerate(result["weight_scales"]):
        print(f"{scale:>9.2e} {base['best_val_acc'][i]:>15.3f} {bn['best_val_acc'][i]:>13.3f} "
              f"{base['final_loss'][i]:>17.3f} {bn['final_loss'][i]:>15.3f}", file=out)
    print(f"batch norm's share of a training step (batch-norm net): "
          f"{bn['time']['batchnorm_fraction_of_step']:.2f}", file=out)


def run(args, out=None):
    """Run the experiment named in ``args``; write the plot and JSON asked for."""
    out = sys.stdout if out is None else out
    needed = ["sklearn"] + (["matplotlib"] if args.plot else []) + (
        [] if args.no_progress else ["tqdm"])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(f"fastbn experiment needs {', '.join(missing)}: "
              f"pip install 'fastbn[experiments]'", file=sys.stderr)
        return 2
    from . import experiments
    kwargs = {"seed": args.seed, "backend": args.backend, "quick": args.quick,
              "progress": not args.no_progress, "dtype": args.dtype}
    if args.name == "baseline-vs-batchnorm":
        result = experiments.baseline_vs_batchnorm(**kwargs)
        _print_baseline(result, out)
        plot = experiments.plot_baseline_vs_batchnorm
    else:
        result = experiments.weight_scale(**kwargs)
        _print_weight_scale(result, out)
        plot = experiments.plot_weight_scale
    if args.plot:
        plot(result, args.plot)
        print(f"plot written to {args.plot}", file=out)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
        print(f"results written to {args.json}", file=out)
    return 0
