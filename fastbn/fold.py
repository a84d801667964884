"""Folding an evaluation-mode batch norm into the layer before it."""
import math

import numpy as np

from .validation import channel_axis, check_scalar


def fold_batchnorm(weight, bias, running_mean, running_var, gamma=None, beta=None,
                   eps=1e-5, axis=0):
    """Fold evaluation-mode batch norm into the preceding linear or convolution layer.

    In evaluation mode batch norm is an affine map per output channel,
    ``bn(z) = scale * z + (beta - scale * running_mean)`` with
    ``scale = gamma / sqrt(running_var + eps)``. Applied after
    ``z = W x + b`` it gives ``(scale * W) x + scale * (b - running_mean) + beta``,
    so inference can skip the batch norm altogether.

    Parameters
    ----------
    weight : array_like, float32 or float64
        The layer's weight; ``axis`` is its output-channel axis. PyTorch's
        ``Linear`` ``(out, in)`` and ``Conv2d`` ``(out, in, kh, kw)`` use
        ``axis=0``; ``(in, out)`` weights and ``ConvTranspose2d``
        ``(in, out, kh, kw)`` use ``axis=1``.
    bias : array_like of shape (C,), or None
        The layer's bias; ``None`` for a layer without one.
    running_mean, running_var : array_like of shape (C,)
        The batch norm's running statistics.
    gamma, beta : array_like of shape (C,), optional
        The batch norm's scale and shift; ``None`` means ones / zeros.
    eps : float >= 0, default 1e-5
        The batch norm's ``eps``.
    axis : int, default 0
        The output-channel axis of ``weight``.

    Returns
    -------
    weight : ndarray
        ``weight * scale`` along ``axis``, a new array of ``weight``'s dtype
        and shape.
    bias : ndarray of shape (C,)
        ``(bias - running_mean) * scale + beta``, a new array of
        ``weight``'s dtype (always returned: the folded layer has a bias).

    Raises
    ------
    TypeError
        ``weight`` is not float32/float64, or a per-channel argument is not real.
    ValueError
        ``axis`` out of range, a per-channel argument not of shape ``(C,)``,
        or a bad ``eps``.

    Notes
    -----
    The folding is computed in float64 and rounded once to ``weight``'s
    dtype. Inputs are never modified.
    """
    weight = np.asarray(weight)
    if weight.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"weight must have dtype float32 or float64, got dtype {weight.dtype}")
    if weight.ndim < 1:
        raise ValueError(f"weight must have at least 1 dimension, got shape {weight.shape}")
    axis = channel_axis(axis, weight.shape, "weight")
    eps = check_scalar(eps, "eps", 0.0, math.inf)
    channels = weight.shape[axis]

    def per_channel(value, name, fill):
        """``value`` as float64 ``(C,)``; ``None`` gives ``fill`` (``fill=None``: required)."""
        if value is None:
            if fill is None:
                raise ValueError(f"{name} is required")
            return np.full(channels, fill)
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
        if array.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) (one value per output "
                             f"channel of weight along axis {axis}), got shape {array.shape}")
        return array.astype(np.float64)

    running_mean = per_channel(running_mean, "running_mean", None)
    running_var = per_channel(running_var, "running_var", None)
    gamma = per_channel(gamma, "gamma", 1.0)
    beta = per_channel(beta, "beta", 0.0)
    bias = per_channel(bias, "bias", 0.0)

    scale = gamma / np.sqrt(running_var + eps)
    broadcast = [1] * weight.ndim
    broadcast[axis] = channels
    folded_weight = (weight.astype(np.float64) * scale.reshape(broadcast)).astype(weight.dtype)
    folded_bias = ((bias - running_mean) * scale + beta).astype(weight.dtype)
    return folded_weight, folded_bias
