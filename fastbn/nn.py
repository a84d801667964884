"""Layer objects over the batch-norm functions.

:class:`BatchNorm` keeps the state of a batch-normalization layer (scale,
shift, running statistics, mode) and calls :func:`fastbn.batchnorm_forward`
and :func:`fastbn.batchnorm_backward`; it has no math of its own. Its meaning
and its state-dict keys are those of ``torch.nn.BatchNorm1d/2d/3d``.
:class:`SyncBatchNorm` is the same layer over :mod:`fastbn.distributed`
(batch statistics of the whole batch split across MPI ranks); it imports
MPI only when one is made.
"""
import math
import numbers

import numpy as np

from .api import batchnorm_backward, batchnorm_forward
from .validation import check_backend_name, check_comm, check_scalar

__all__ = ["BatchNorm", "SyncBatchNorm"]


def _check_positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)




class BatchNorm:
    """Batch normalization layer, with PyTorch's meaning.

    Normalizes each channel of the input over every other axis. In training
    mode it uses the batch statistics and updates the running statistics;
    in evaluation mode it uses the running statistics. One class serves
    ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` (``torch.nn.BatchNorm1d`` /
    ``2d`` / ``3d``) and channels-last inputs (``axis=-1``).

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    eps : float, default 1e-5
        Added to the variance inside the square root.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running statistics:
        ``running = (1 - momentum) * running + momentum * batch``. ``None``
        keeps the cumulative average of every batch seen (the weight of the
        ``k``-th batch is ``1 / k``).
    affine : bool, default True
        Learn a scale ``gamma`` (ones) and a shift ``beta`` (zeros).
    track_running_stats : bool, default True
        Keep running statistics. If False, the batch statistics are used in
        both modes and ``running_mean``/``running_var`` are None.
    axis : int, default 1
        The channel axis of the input (``-1`` for channels-last).
    dtype : dtype, default float32
        Dtype of ``gamma``, ``beta`` and the running statistics.
    backend : str, optional
        Backend for every call (default: the process default at call time).
    bias : bool, default True
        With ``affine``, also learn the shift ``beta``; ``bias=False`` keeps
        the scale only (``beta`` is None and the state dict has no
        ``bias`` key), as ``torch.nn.BatchNorm*d(..., bias=False)``.

    Attributes
    ----------
    gamma, beta : ndarray of shape (C,) or None
        Scale and shift (None when ``affine=False``; ``beta`` also when
        ``bias=False``).
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics, zeros and ones at first (None when
        ``track_running_stats=False``).
    num_batches_tracked : int
        Training batches seen since the running statistics were reset.
    training : bool
        The mode; set by :meth:`train` and :meth:`eval`.
    grad_gamma, grad_beta : ndarray of shape (C,) or None
        Gradients from the last :meth:`backward` (None when ``affine=False``
        or before the first backward; ``grad_beta`` also when ``bias=False``).

    Notes
    -----
    ``eps`` must be ``>= 0`` when the layer is made, and ``> 0`` for a
    forward in training mode (PyTorch 2.13's rule; ``eps = 0`` works in
    evaluation mode). An empty batch (e.g. shape ``(0, C, L)``) gives an
    empty output, leaves the running statistics unchanged and still counts
    in ``num_batches_tracked``; its backward gives an empty ``dx`` and
    zero parameter gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.nn import BatchNorm
    >>> layer = BatchNorm(16, dtype=np.float64)
    >>> x = np.random.default_rng(0).standard_normal((32, 16, 8, 8))
    >>> y = layer.forward(x)
    >>> dx = layer.backward(np.ones_like(y))
    >>> layer.grad_gamma.shape
    (16,)
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32, backend=None, *,
                 bias=True):
        self.num_features = _check_positive_int(num_features, "num_features")
        self.eps = check_scalar(eps, "eps", 0.0, math.inf)
        self.momentum = None if momentum is None else check_scalar(momentum, "momentum", 0.0, 1.0)
        self.affine = bool(affine)
        self.bias = bool(bias)
        self.track_running_stats = bool(track_running_stats)
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise ValueError(f"axis must be an integer, got {axis!r}")
        self.axis = int(axis)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got dtype {self.dtype}")
        self.backend = check_backend_name(backend)

        channels = self.num_features
        if self.affine:
            self.gamma = np.ones(channels, dtype=self.dtype)
            self.beta = np.zeros(channels, dtype=self.dtype) if self.bias else None
        else:
            self.gamma = None
            self.beta = None
        if self.track_running_stats:
            self.running_mean = np.zeros(channels, dtype=self.dtype)
            self.running_var = np.ones(channels, dtype=self.dtype)
        else:
            self.running_mean = None
            self.running_var = None
        self.num_batches_tracked = 0
        self.training = True
        self.grad_gamma = None
        self.grad_beta = None
        self._cache = None

    # ------------------------------------------------------------------
    # Mode
    # ------------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (``mode=False``: evaluation mode); return the layer."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode; return the layer."""
        return self.train(False)

    # ------------------------------------------------------------------
    # The two calls a subclass may replace (e.g. a synchronized batch norm)
    # ------------------------------------------------------------------
    def _forward_fn(self, x, **kwargs):
        """Run the forward function; ``kwargs`` are batchnorm_forward's keywords."""
        return batchnorm_forward(x, **kwargs)

    def _backward_fn(self, dout, cache, method):
        """Run the backward function; return ``(dx, dgamma, dbeta)``."""
        return batchnorm_backward(dout, cache, method=method)

    # ------------------------------------------------------------------
    # Forward and backward
    # ------------------------------------------------------------------
    def _check_channels(self, x):
        shape = np.shape(x)
        if len(shape) >= 2 and -len(shape) <= self.axis < len(shape):
            if shape[self.axis] != self.num_features:
                raise ValueError(f"expected {self.num_features} channels on axis {self.axis}, "
                                 f"got input of shape {tuple(shape)}")

    def forward(self, x):
        """Normalize ``x``; in training mode also update the running statistics.

        Parameters
        ----------
        x : ndarray, float32 or float64, ``ndim >= 2``
            Input with ``num_features`` channels on ``axis``.

        Returns
        -------
        out : ndarray of ``x``'s shape and dtype
        """
        self._check_channels(x)
        use_batch_stats = self.training or not self.track_running_stats
        update_running = self.training and self.track_running_stats
        momentum = self.momentum
        if update_running and momentum is None:
            # Cumulative moving average: the k-th batch has weight 1/k.
            momentum = 1.0 / (self.num_batches_tracked + 1)
        out, cache = self._forward_fn(
            x, gamma=self.gamma, beta=self.beta, training=use_batch_stats,
            running_mean=self.running_mean if (update_running or not use_batch_stats) else None,
            running_var=self.running_var if (update_running or not use_batch_stats) else None,
            momentum=0.0 if momentum is None else momentum,
            eps=self.eps, axis=self.axis, backend=self.backend)
        if update_running:
            self.num_batches_tracked += 1
        self._cache = cache
        return out

    __call__ = forward

    def backward(self, dout, method="simplified"):
        """Gradient through the last forward pass.

        Stores ``grad_gamma`` and ``grad_beta`` (when ``affine``) and returns
        the gradient with respect to the input.

        Parameters
        ----------
        dout : ndarray
            Upstream gradient, of the last forward input's shape and dtype.
        method : {"simplified", "staged"}
            Backward pass of :func:`fastbn.batchnorm_backward`.

        Returns
        -------
        dx : ndarray of ``dout``'s shape
        """
        if self._cache is None:
            raise RuntimeError("backward called before forward: call forward(x) first")
        dx, dgamma, dbeta = self._backward_fn(dout, self._cache, method)
        if self.affine:
            self.grad_gamma = dgamma
            self.grad_beta = dbeta if self.beta is not None else None
        return dx

    # ------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------
    def reset_running_stats(self):
        """Running mean to zeros, running variance to ones, counter to 0."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
        self.num_batches_tracked = 0

    def state_dict(self):
        """The layer's state under PyTorch's key names (copies).

        Keys: ``weight`` and ``bias`` (when ``affine``; no ``bias`` when
        ``bias=False``), ``running_mean``,
        ``running_var`` and ``num_batches_tracked`` (a 0-d int64 array; when
        ``track_running_stats``).
        """
        state = {}
        if self.affine:
            state["weight"] = self.gamma.copy()
            if self.beta is not None:
                state["bias"] = self.beta.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from a state dict (NumPy arrays or CPU torch tensors).

        Parameters
        ----------
        state_dict : mapping
            Keys as :meth:`state_dict` gives them.
        strict : bool, default True
            Raise ``KeyError`` for missing or unexpected keys.

        Nothing is changed when a key or a shape is wrong.
        """
        expected = list(self.state_dict())
        missing = [key for key in expected if key not in state_dict]
        unexpected = [key for key in state_dict if key not in expected]
        if strict and (missing or unexpected):
            raise KeyError(f"state dict mismatch: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        values = {}
        for key in expected:
            if key not in state_dict:
                continue
            value = np.asarray(state_dict[key])
            if key == "num_batches_tracked":
                if value.size != 1 or value.dtype.kind not in "iu":
                    raise ValueError(f"num_batches_tracked must be one integer, got {value!r}")
                values[key] = int(value.reshape(()))
            else:
                if value.shape != (self.num_features,):
                    raise ValueError(f"{key} must have shape ({self.num_features},), "
                                     f"got shape {value.shape}")
                if value.dtype.kind not in "biuf":
                    raise TypeError(f"{key} must be real numbers, got dtype {value.dtype}")
                values[key] = value
        targets = {"weight": self.gamma, "bias": self.beta,
                   "running_mean": self.running_mean, "running_var": self.running_var}
        for key, value in values.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                targets[key][...] = value

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.beta is not None}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name}, backend={self.backend!r})")


class SyncBatchNorm(BatchNorm):
    """Synchronized batch normalization layer over MPI ranks (``torch.nn.SyncBatchNorm``).

    The same layer as :class:`BatchNorm` (parameters, attributes, modes,
    state dict), but in training mode every rank's slice is normalized with
    the statistics of the whole global batch, and ``grad_gamma`` /
    ``grad_beta`` are sums over every rank's slice, the same on every rank:
    it calls :func:`fastbn.distributed.sync_batchnorm_forward` and
    :func:`~fastbn.distributed.sync_batchnorm_backward`. Every rank must
    call ``forward`` and ``backward`` in the same order. A rank may hold
    zero samples.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, axis, dtype, backend, bias
        As for :class:`BatchNorm` (``backend``: a CPU backend).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share the batch; default ``MPI.COMM_WORLD``.

    Raises
    ------
    ImportError
        mpi4py is not installed (``pip install "fastbn[mpi]"``).

    Notes
    -----
    Errors in ``forward``/``backward`` (a wrong channel count, dtype, ...)
    are raised on every rank when any rank's input is bad, so that no rank
    is left waiting. ``backward(dout, method="staged")`` is not available
    (``ValueError``).

    Examples
    --------
    Run with ``mpiexec -n 2 python script.py``:

    >>> from fastbn.nn import SyncBatchNorm
    >>> layer = SyncBatchNorm(16, dtype=np.float64)     # doctest: +SKIP
    >>> y = layer.forward(x_local)                      # doctest: +SKIP
    >>> dx = layer.backward(dout_local)                 # doctest: +SKIP
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32, backend=None,
                 comm=None, *, bias=True):
        from . import distributed  # needs mpi4py: imported for this layer only
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=axis, dtype=dtype,
                         backend=backend, bias=bias)
        self._distributed = distributed
        self.comm = check_comm(comm)

    def _check_channels(self, x):
        # Checked inside the forward function instead, where a failure on one
        # rank is raised on every rank.
        pass

    def _forward_fn(self, x, **kwargs):
        return self._distributed._forward(
            x, kwargs.pop("gamma"), kwargs.pop("beta"), comm=self.comm,
            check_input=lambda x_local: BatchNorm._check_channels(self, x_local), **kwargs)

    def _backward_fn(self, dout, cache, method):
        return self._distributed.sync_batchnorm_backward(dout, cache, method=method)

    def __repr__(self):
        return "Sync" + super().__repr__()
