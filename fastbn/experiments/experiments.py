"""The two experiments of the batch-normalization seed, on the digits.

- :func:`baseline_vs_batchnorm`: a deep net trained with and without batch
  normalization at one weight scale (defaults: 6 layers, 100 hidden units,
  weight scale 2e-2).
- :func:`weight_scale`: best accuracies and final loss of both nets across
  weight-initialization scales (defaults: 20 scales on ``logspace(-4, 0)``,
  8 layers, 50 hidden units).

Both follow the seed notebook: Adam at learning rate 1e-3, minibatches of
50, 10 epochs, 1000 training images. At each weight scale the two nets
start from the same weights and see the same minibatches. Results are
plain dicts (JSON-ready) and depend only on the seed and the backend.
"""
import time

import numpy as np

from ..api import batchnorm_forward
from ..nn import BatchNorm
from .data import load_digits_data
from .net import FullyConnectedNet
from .solver import Solver

#: Steps averaged for the "final training loss" (the notebook's last 100).
FINAL_LOSS_STEPS = 100

BASELINE_DEFAULTS = {
    "hidden_dims": [100] * 5, "weight_scale": 2e-2, "num_epochs": 10, "batch_size": 50,
    "learning_rate": 1e-3, "update_rule": "adam", "dtype": "float32",
}
BASELINE_QUICK = {"num_epochs": 3}

WEIGHT_SCALE_DEFAULTS = {
    "hidden_dims": [50] * 7, "weight_scales": np.logspace(-4, 0, num=20).tolist(),
    "num_epochs": 10, "batch_size": 50, "learning_rate": 1e-3, "update_rule": "adam",
    "dtype": "float32",
}
WEIGHT_SCALE_QUICK = {"weight_scales": [1e-3, 1e-1], "num_epochs": 3}


def _resolve_backend(backend):
    """The backend name the layers will use (the process default when None)."""
    if backend is None:
        # The cache records the backend that ran: the process default here.
        return batchnorm_forward(np.zeros((2, 1)))[1].backend
    return backend


def _progress_bar(total, description, enabled):
    """A tqdm bar (to stderr) or None; its ``update`` is called once per step."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=description, unit="step", leave=False)


def _warm_up(config, backend):
    """Call the batch-norm functions once on the shapes and dtype of training
    and evaluation, so that a just-in-time compilation is not timed."""
    dtype = np.dtype(config["dtype"])
    width = config["hidden_dims"][0]
    rng = np.random.default_rng(0)
    for rows in (config["batch_size"], 200):
        x = rng.standard_normal((rows, width)).astype(dtype)
        layer = BatchNorm(width, dtype=dtype, backend=backend)
        layer.backward(layer.forward(x))
        layer.eval().backward(layer.forward(x))


def _train_pair(data, config, weight_scale, seed, backend, bar):
    """Train the baseline and the batch-norm net from the same start; return both runs."""
    _warm_up(config, backend)
    runs = {}
    for name, use_batchnorm in (("baseline", False), ("batchnorm", True)):
        model = FullyConnectedNet(config["hidden_dims"], input_dim=data["X_train"].shape[1],
                                  num_classes=10, use_batchnorm=use_batchnorm,
                                  weight_scale=weight_scale, dtype=np.dtype(config["dtype"]),
                                  seed=seed, backend=backend)
        solver = Solver(model, data, update_rule=config["update_rule"],
                        optim_config={"learning_rate": config["learning_rate"]},
                        batch_size=config["batch_size"], num_epochs=config["num_epochs"],
                        seed=seed, progress=None if bar is None else bar.update)
        start = time.perf_counter()
        solver.train()
        total = time.perf_counter() - start
        test_acc = solver.check_accuracy(data["X_test"], data["y_test"])
        runs[name] = _run_record(solver, test_acc, total)
    return runs


def _run_record(solver, test_acc, total_s):
    losses = solver.loss_history
    step_s = solver.time["step_s"]
    bn_s = solver.time["batchnorm_forward_s"] + solver.time["batchnorm_backward_s"]
    return {
        "loss_history": [float(v) for v in losses],
        "train_acc_history": solver.train_acc_history,
        "val_acc_history": solver.val_acc_history,
        "best_train_acc": max(solver.train_acc_history),
        "best_val_acc": max(solver.val_acc_history),
        "final_loss": float(np.mean(losses[-FINAL_LOSS_STEPS:])),
        "test_acc_at_best_val": test_acc,
        "time": {
            "total_s": total_s,
            "steps": len(losses),
            "step_s": step_s,
            "batchnorm_forward_s": solver.time["batchnorm_forward_s"],
            "batchnorm_backward_s": solver.time["batchnorm_backward_s"],
            "batchnorm_fraction_of_step": bn_s / step_s if step_s > 0 else 0.0,
            # Medians over the steps: robust to a busy machine's stalls.
            "median_step_s": float(np.median(solver.step_times)),
            "median_batchnorm_s": float(np.median(solver.batchnorm_times)),
        },
    }


def _config(defaults, quick_overrides, quick, overrides):
    config = dict(defaults)
    if quick:
        config.update(quick_overrides)
    config.update({k: v for k, v in overrides.items() if v is not None})
    config["hidden_dims"] = [int(h) for h in config["hidden_dims"]]
    config["dtype"] = np.dtype(config["dtype"]).name
    return config


def _first_epoch_reaching(history, level):
    """First epoch whose accuracy is at least ``level`` (None if never)."""
    for epoch, value in enumerate(history):
        if value >= level:
            return epoch
    return None


def baseline_vs_batchnorm(seed=0, backend=None, quick=False, progress=False, data=None,
                          **overrides):
    """Train one deep net with and one without batch normalization.

    Parameters
    ----------
    seed : int, default 0
        Seed of the initial weights (shared by both nets) and of the minibatches.
    backend : str, optional
        fastbn backend of the batch-norm layers (default: the process default).
    quick : bool, default False
        Fewer epochs (:data:`BASELINE_QUICK`), for a check in seconds.
    progress : bool, default False
        Show a progress bar on stderr.
    data : dict, optional
        Data as :func:`load_digits_data` returns it (loaded when None).
    **overrides
        Any key of :data:`BASELINE_DEFAULTS` (``hidden_dims``,
        ``weight_scale``, ``num_epochs``, ``batch_size``, ``learning_rate``,
        ``update_rule``, ``dtype``).

    Returns
    -------
    result : dict
        ``config``, ``backend``, ``runs`` (``baseline`` and ``batchnorm``:
        histories, best accuracies, final loss, time in batch norm against
        the whole step) and ``summary``.
    """
    config = _config(BASELINE_DEFAULTS, BASELINE_QUICK, quick, overrides)
    backend = _resolve_backend(backend)
    if data is None:
        data = load_digits_data()
    steps = 2 * config["num_epochs"] * max(data["X_train"].shape[0] // config["batch_size"], 1)
    bar = _progress_bar(steps, "baseline-vs-batchnorm", progress)
    try:
        runs = _train_pair(data, config, config["weight_scale"], [seed, 0], backend, bar)
    finally:
        if bar is not None:
            bar.close()
    summary = {}
    for name, run in runs.items():
        summary[name] = {
            "best_val_acc": run["best_val_acc"],
            "val_acc_after_epoch_1": run["val_acc_history"][1],
            "epoch_reaching_val_acc_0.9": _first_epoch_reaching(run["val_acc_history"], 0.9),
            "final_loss": run["final_loss"],
            "batchnorm_fraction_of_step": run["time"]["batchnorm_fraction_of_step"],
        }
    return {"experiment": "baseline-vs-batchnorm", "seed": seed, "backend": backend,
            "quick": bool(quick), "config": config, "runs": runs, "summary": summary}


def weight_scale(seed=0, backend=None, quick=False, progress=False, data=None, **overrides):
    """Train both nets at each weight-initialization scale.

    Parameters are those of :func:`baseline_vs_batchnorm`; the overrides are
    the keys of :data:`WEIGHT_SCALE_DEFAULTS` (``weight_scales`` instead of
    ``weight_scale``). ``quick`` trains at two scales for three epochs
    (:data:`WEIGHT_SCALE_QUICK`).

    Returns
    -------
    result : dict
        ``config``, ``backend``, ``weight_scales`` and, per net (``baseline``,
        ``batchnorm``), lists over the scales: ``best_val_acc``,
        ``best_train_acc``, ``final_loss``, ``test_acc_at_best_val``; ``time``
        summed over the scales.
    """
    config = _config(WEIGHT_SCALE_DEFAULTS, WEIGHT_SCALE_QUICK, quick, overrides)
    config["weight_scales"] = [float(s) for s in config["weight_scales"]]
    backend = _resolve_backend(backend)
    if data is None:
        data = load_digits_data()
    scales = config["weight_scales"]
    steps_per_run = config["num_epochs"] * max(data["X_train"].shape[0] // config["batch_size"], 1)
    bar = _progress_bar(2 * len(scales) * steps_per_run, "weight-scale", progress)
    keys = ("best_val_acc", "best_train_acc", "final_loss", "test_acc_at_best_val")
    results = {name: {key: [] for key in keys} for name in ("baseline", "batchnorm")}
    times = {name: {"total_s": 0.0, "step_s": 0.0, "batchnorm_forward_s": 0.0,
                    "batchnorm_backward_s": 0.0, "steps": 0} for name in results}
    try:
        for index, scale in enumerate(scales):
            runs = _train_pair(data, config, scale, [seed, index], backend, bar)
            for name, run in runs.items():
                for key in keys:
                    results[name][key].append(run[key])
                for key in times[name]:
                    times[name][key] += run["time"][key]
    finally:
        if bar is not None:
            bar.close()
    for name in results:
        t = times[name]
        bn_s = t["batchnorm_forward_s"] + t["batchnorm_backward_s"]
        t["batchnorm_fraction_of_step"] = bn_s / t["step_s"] if t["step_s"] > 0 else 0.0
        results[name]["time"] = t
    return {"experiment": "weight-scale", "seed": seed, "backend": backend,
            "quick": bool(quick), "config": config, "weight_scales": scales, **results}


# ---------------------------------------------------------------------------
# Plots (the notebook's panels)
# ---------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_baseline_vs_batchnorm(result, path, dpi=72):
    """Training loss per step, train and validation accuracy per epoch (PNG)."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 10))
    runs = result["runs"]
    for name in ("baseline", "batchnorm"):
        run = runs[name]
        axes[0].plot(run["loss_history"], "o", markersize=2, label=name)
        axes[1].plot(run["train_acc_history"], "-o", label=name)
        axes[2].plot(run["val_acc_history"], "-o", label=name)
    titles = ("Training loss", "Training accuracy", "Validation accuracy")
    xlabels = ("Iteration", "Epoch", "Epoch")
    for ax, title, xlabel in zip(axes, titles, xlabels):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(loc="best", ncol=2)
    config = result["config"]
    fig.suptitle(f"digits, {len(config['hidden_dims']) + 1} layers of "
                 f"{config['hidden_dims'][0]}, weight scale {config['weight_scale']:g}, "
                 f"backend {result['backend']}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_weight_scale(result, path, dpi=72):
    """Best validation and train accuracy and final loss against weight scale (PNG)."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 10))
    scales = result["weight_scales"]
    panels = (("best_val_acc", "Best val accuracy vs weight initialization scale",
               "Best val accuracy"),
              ("best_train_acc", "Best train accuracy vs weight initialization scale",
               "Best training accuracy"),
              ("final_loss", "Final training loss vs weight initialization scale",
               "Final training loss (log scale)"))
    for ax, (key, title, ylabel) in zip(axes, panels):
        for name in ("baseline", "batchnorm"):
            ax.semilogx(scales, result[name][key], "-o", label=name)
        if key == "final_loss":
            ax.set_yscale("log")  # a diverging net's loss would flatten the others
        ax.set_title(title)
        ax.set_xlabel("Weight initialization scale")
        ax.set_ylabel(ylabel)
        ax.legend(loc="best", ncol=2)
    config = result["config"]
    fig.suptitle(f"digits, {len(config['hidden_dims']) + 1} layers of "
                 f"{config['hidden_dims'][0]}, backend {result['backend']}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
