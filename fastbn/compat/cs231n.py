"""The cs231n assignment's batch-norm functions, running on fastbn.

Conventions of the assignment, translated onto :func:`fastbn.batchnorm_forward`:

* ``bn_param`` is a dict with ``mode`` (``"train"`` or ``"test"``, required),
  and optional ``eps`` (default 1e-5), ``momentum`` (default 0.9),
  ``running_mean`` and ``running_var`` (zeros of shape ``(D,)`` when absent).
* ``momentum`` weighs the *old* value:
  ``running = momentum * running + (1 - momentum) * batch``, i.e. fastbn's
  momentum is ``1 - momentum``.
* The running variance takes the *biased* batch variance.
* The running statistics are written back into ``bn_param``.
* The cache is fastbn's :class:`~fastbn.BatchNormCache`; both backward
  functions accept it.
"""
import numpy as np

from .. import api


def _running_stats(bn_param, channels, dtype):
    running_mean = bn_param.get("running_mean")
    running_var = bn_param.get("running_var")
    if running_mean is None:
        running_mean = np.zeros(channels, dtype=dtype)
    if running_var is None:
        running_var = np.zeros(channels, dtype=dtype)
    return running_mean, running_var


def _forward(x, gamma, beta, bn_param):
    """Both forward functions: channels on axis 1, ``(N, D)`` or ``(N, C, H, W)``."""
    if "mode" not in bn_param:
        raise ValueError("bn_param must contain 'mode' ('train' or 'test')")
    mode = bn_param["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f"Invalid forward batchnorm mode {mode!r}")
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    x = np.asarray(x)
    channels = x.shape[1] if x.ndim >= 2 else 0
    running_mean, running_var = _running_stats(bn_param, channels, x.dtype)
    if mode == "test":
        out, cache = api.batchnorm_forward(
            x, gamma, beta, training=False, running_mean=running_mean,
            running_var=running_var, eps=eps)
    else:
        out, cache = api.batchnorm_forward(x, gamma, beta, training=True, eps=eps)
        batch_mean = np.asarray(cache.mean, dtype=np.float64)
        batch_var = 1.0 / np.asarray(cache.invstd, dtype=np.float64) ** 2 - eps
        running_mean = momentum * running_mean + (1 - momentum) * batch_mean
        running_var = momentum * running_var + (1 - momentum) * batch_var
    bn_param["running_mean"] = np.asarray(running_mean, dtype=x.dtype)
    bn_param["running_var"] = np.asarray(running_var, dtype=x.dtype)
    return out, cache


def batchnorm_forward(x, gamma, beta, bn_param):
    """Forward pass for ``(N, D)`` input, as in the assignment.

    Returns
    -------
    out : ndarray of shape (N, D)
    cache : BatchNormCache
    """
    return _forward(x, gamma, beta, bn_param)


def batchnorm_backward(dout, cache):
    """Backward pass through the staged computational graph.

    Returns
    -------
    dx, dgamma, dbeta
    """
    return api.batchnorm_backward(dout, cache, method="staged")


def batchnorm_backward_alt(dout, cache):
    """Backward pass with the simplified closed form.

    Returns
    -------
    dx, dgamma, dbeta
    """
    return api.batchnorm_backward(dout, cache, method="simplified")


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Forward pass for ``(N, C, H, W)`` input: statistics per channel ``C``.

    No transpose is made: fastbn views ``x`` as ``(N, C, H*W)``.
    """
    return _forward(x, gamma, beta, bn_param)


def spatial_batchnorm_backward(dout, cache):
    """Backward pass for ``(N, C, H, W)`` input (simplified form).

    Returns
    -------
    dx, dgamma, dbeta
    """
    return api.batchnorm_backward(dout, cache, method="simplified")
