"""The batch-normalization seed on real data: a fully-connected net with
optional batch norm, its solver, the digits data and the two experiments.

Needs the optional extra: ``pip install "fastbn[experiments]"`` (scikit-learn
for the digits, matplotlib for the plots, tqdm for the progress bar); the
net and the solver themselves need only NumPy and fastbn.
"""
from .data import load_digits_data
from .experiments import (baseline_vs_batchnorm, plot_baseline_vs_batchnorm, plot_weight_scale,
                          weight_scale)
from .net import FullyConnectedNet, softmax_loss
from .solver import Solver, adam, sgd_momentum

__all__ = [
    "FullyConnectedNet",
    "Solver",
    "adam",
    "baseline_vs_batchnorm",
    "load_digits_data",
    "plot_baseline_vs_batchnorm",
    "plot_weight_scale",
    "sgd_momentum",
    "softmax_loss",
    "weight_scale",
]
