"""The per-channel work that every CPU backend shares.

A CPU backend's fused kernels return the batch ``mean`` and biased ``var``;
turning them into ``invstd`` and updating the caller's running statistics in
place is the same few lines of NumPy for each of them, so it lives here once.
The CUDA backend does the same work in its own merge kernel, on the device.

Conventions (PyTorch's): ``momentum`` weighs the new batch, and the running
variance takes the unbiased batch variance ``var * M / (M - 1)``.
"""
import numpy as np


def finish_statistics(mean, var, count, eps, running_mean, running_var, momentum):
    """``invstd`` of the batch, and the running statistics updated in place.

    Parameters
    ----------
    mean, var : ndarray of float64, shape (C,)
        Batch mean and biased batch variance over ``count`` values per channel.
    count : int
        Values per channel, ``M = A * B`` (at least 2 in training).
    eps : float
    running_mean, running_var : ndarray of shape (C,) or None
        Writable float arrays, updated in place:
        ``running = (1 - momentum) * running + momentum * batch``.
    momentum : float

    Returns
    -------
    invstd : ndarray of float64, shape (C,)
        ``1 / sqrt(var + eps)``.
    """
    invstd = 1.0 / np.sqrt(var + eps)
    if running_mean is not None:
        keep = 1.0 - momentum
        unbiased_var = var * (count / (count - 1))
        running_mean[...] = keep * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = keep * running_var.astype(np.float64) + momentum * unbiased_var
    return invstd


def forward_train(fused_kernel, x, gamma, beta, eps, out, running_mean, running_var, momentum):
    """A training forward from a kernel that returns ``(mean, var)``.

    Parameters
    ----------
    fused_kernel : callable ``(x, gamma, beta, eps, out) -> (mean, var)``
        Statistics then normalization into ``out``.
    x, gamma, beta, eps, out, running_mean, running_var, momentum
        As in the kernel contract (:mod:`fastbn.backends`).

    Returns
    -------
    mean, invstd : ndarray of float64, shape (C,)
    """
    mean, var = fused_kernel(x, gamma, beta, eps, out)
    count = x.shape[0] * x.shape[2]
    invstd = finish_statistics(mean, var, count, eps, running_mean, running_var, momentum)
    return mean, invstd


def forward_eval(normalize, x, gamma, beta, running_mean, running_var, eps, out):
    """An evaluation forward: normalize with the running statistics.

    Returns
    -------
    mean, invstd : ndarray of float64, shape (C,)
        The running mean and ``1 / sqrt(running_var + eps)``, what the
        backward needs.
    """
    mean = np.asarray(running_mean, dtype=np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    normalize(x, mean, invstd, gamma, beta, out)
    return mean, invstd


def backward_eval(backward_reduce, normalize, dy, x, mean, invstd, gamma, out):
    """The evaluation backward: ``mean`` and ``invstd`` are constants.

    ``dx = dy * gamma * invstd`` is :func:`normalize` applied to ``dy`` with
    zero mean and zero shift; ``dgamma`` and ``dbeta`` are the usual sums.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of float64, shape (C,)
        ``dbeta`` and ``dgamma``.
    """
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, invstd)
    zeros = np.zeros_like(mean)
    normalize(dy, zeros, invstd, gamma, zeros, out)
    return sum_dy, sum_dy_xhat
