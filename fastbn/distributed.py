"""Synchronized batch normalization across MPI processes (mpi4py).

In data-parallel training every process holds a slice of the global batch.
:func:`sync_batchnorm_forward` normalizes each slice with the statistics of
the whole global batch, and :func:`sync_batchnorm_backward` returns the
gradients of the whole-batch computation: every rank gets the ``dx`` of its
own slice and the same ``dgamma``/``dbeta`` (sums over every slice). The
results equal those of :func:`fastbn.batchnorm_forward` /
:func:`fastbn.batchnorm_backward` on the concatenated batch.

Communication per call, with ``C`` channels and ``P`` ranks:

* forward (training): each rank computes its per-channel count, mean and
  ``M2 = sum((x - mean)**2)`` with its backend's ``stats`` kernel and sends
  these ``3C`` float64 values in one ``Allgather``. Every rank then merges
  the ``P`` triples in rank order with the parallel variance formula of
  Chan, Golub and LeVeque, so every rank computes bitwise the same mean,
  variance and running statistics.
* backward: one ``Allreduce`` (sum) of ``(sum_dy, sum_dy_xhat)``, ``2C``
  float64 values.
* before either, a small ``allgather`` of each rank's metadata (channel
  count, dtype, axis, mode, backward method) and of any local input error,
  so that a mismatch, or a bad input on one rank, raises the same error on
  every rank instead of leaving the others waiting in a collective.

None of this depends on the number of samples: a rank may hold any number
of them, zero included.

This is the only module of fastbn that imports MPI; it needs the ``[mpi]``
extra (``pip install "fastbn[mpi]"``: mpi4py over the system's MPI; or
``fastbn[mpich]``: mpi4py and the MPICH wheels), and the
program runs under ``mpiexec -n 4 python train.py``.
"""

import numpy as np

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "fastbn.distributed needs mpi4py and an MPI library: pip install 'fastbn[mpi]' "
        "(mpi4py over the system's MPI) or 'fastbn[mpich]' (with MPICH's wheels)") from exc

from . import registry
from ._syncstats import elemt_sums, global_statistics, local_moments, update_running
from .validation import (canonical_shape, channel_axis, channel_param, check_comm, check_eps,
                         check_running, check_scalar)

__all__ = ["sync_batchnorm_forward", "sync_batchnorm_backward", "SyncBatchNormCache"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_METHODS = ("simplified", "staged")
_ERROR_TYPES = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError}


class SyncBatchNormCache:
    """What :func:`sync_batchnorm_backward` needs from the forward pass.

    Like :class:`fastbn.BatchNormCache`, it holds a reference to the local
    ``x`` (never a copy) and per-channel values only.

    Attributes
    ----------
    x : ndarray
        This rank's forward input.
    mean, invstd : ndarray of float64, shape (C,)
        The global batch statistics in training mode (the same bits on
        every rank); the running statistics in evaluation mode.
    gamma : ndarray of float64, shape (C,)
        The scale, with the values of ``x.dtype``.
    eps : float
    axis : int
        The channel axis, non-negative.
    training : bool
    backend : str
        The backend that ran this rank's kernels.
    comm : mpi4py.MPI.Intracomm
        The communicator of the forward pass; the backward uses it too.
    count : int
        Values per channel over all ranks (the ``M`` of the formulas).
    local_count : int
        Values per channel on this rank.
    """

    __slots__ = ("x", "mean", "invstd", "gamma", "eps", "axis", "training",
                 "backend", "comm", "count", "local_count")

    def __init__(self, x, mean, invstd, gamma, eps, axis, training, backend, comm,
                 count, local_count):
        self.x = x
        self.mean = mean
        self.invstd = invstd
        self.gamma = gamma
        self.eps = eps
        self.axis = axis
        self.training = training
        self.backend = backend
        self.comm = comm
        self.count = count
        self.local_count = local_count

    @property
    def mode(self):
        """``"train"`` or ``"eval"``."""
        return "train" if self.training else "eval"

    def __repr__(self):
        return (f"SyncBatchNormCache(shape={tuple(self.x.shape)}, dtype={self.x.dtype}, "
                f"axis={self.axis}, mode={self.mode!r}, backend={self.backend!r}, "
                f"count={self.count}, ranks={self.comm.Get_size()})")


# --------------------------------------------------------------------------
# Local checks (the function API's errors and messages)
# --------------------------------------------------------------------------



def _host_backend(name):
    """Name and module of a host (CPU) backend; ``None`` is the default."""
    if name is None:
        name = registry.default_backend()
    elif not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {name!r}; available "
                         f"backends: {', '.join(registry.available_backends())}")
    module = registry.get_backend(name)
    if module.ON_DEVICE:
        raise ValueError(f"synchronized batch norm runs on host (CPU) backends only, "
                         f"got backend {name!r}")
    return name, module


def _host_array(obj, what):
    if not isinstance(obj, np.ndarray) and (
            hasattr(obj, "__cuda_array_interface__")
            or getattr(type(obj), "__cuda_ndarray__", False)):
        raise ValueError(f"{what} is a device array; synchronized batch norm needs host arrays")
    return np.asarray(obj)


def _check_dtype(dtype, what):
    if np.dtype(dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must have dtype float32 or float64, got dtype {np.dtype(dtype)}")


def _layout(x, axis):
    """``(axis, A, C, B)`` of a local input; ``A * B`` may be 0 (an empty slice)."""
    _check_dtype(x.dtype, "x")
    shape = tuple(x.shape)
    if len(shape) < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {shape}")
    axis = channel_axis(axis, shape)
    channels = shape[axis]
    if channels == 0:
        raise ValueError(f"x has no channels: shape {shape}, axis {axis}")
    return (axis,) + canonical_shape(shape, axis)






# --------------------------------------------------------------------------
# Agreement between ranks
# --------------------------------------------------------------------------

def _ranks_text(ranks):
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _agree(comm, function, error, fields, count):
    """One small collective: every rank learns every rank's error and metadata.

    ``error`` is this rank's local input error (or None), ``fields`` a tuple
    of ``(description, value)`` that must be equal on every rank, ``count``
    this rank's number of values per channel (allowed to differ). Raises the
    same exception, with the same message, on every rank when some rank
    failed its local checks (the lowest such rank's error) or when the
    fields differ; otherwise returns the list of counts, in rank order.
    """
    local_error = None
    if error is not None:
        local_error = (type(error).__name__, str(error))
    # Only the values travel; the descriptions are the same text everywhere.
    records = comm.allgather((local_error, tuple(value for _, value in fields), count))
    size = len(records)
    for rank, (remote_error, _, _) in enumerate(records):
        if remote_error is not None:
            kind, message = remote_error
            exc_type = _ERROR_TYPES.get(kind, RuntimeError)
            if exc_type is RuntimeError and kind != "RuntimeError":
                message = f"{kind}: {message}"
            raise exc_type(f"{message} (on rank {rank} of {size})") from error
    for index, (description, value) in enumerate(fields):
        values = [record[1][index] for record in records]
        if any(v != values[0] for v in values):
            groups = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            detail = "; ".join(f"{v!r} on {_ranks_text(r)}" for v, r in groups.items())
            raise ValueError(f"{function}: the ranks disagree on {description}: {detail}")
    return [record[2] for record in records]


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------

def sync_batchnorm_forward(x_local, gamma=None, beta=None, *, comm=None, training=True,
                           running_mean=None, running_var=None, momentum=0.1, eps=1e-5,
                           axis=1, backend=None):
    """Batch normalization forward pass over a batch split across MPI ranks.

    Every rank calls it with its own slice of the global batch (any number
    of samples, zero included) and the same parameters. In training mode
    each slice is normalized with the mean and biased variance of the whole
    global batch; the running statistics, when given, are updated with them
    (the same values on every rank when they started equal). The results
    equal :func:`fastbn.batchnorm_forward` on the concatenation of the
    slices.

    Parameters
    ----------
    x_local : ndarray, float32 or float64, ``ndim >= 2``
        This rank's slice, e.g. ``(n, D)``, ``(n, C, H, W)`` or channels-last
        ``(n, H, W, C)`` with ``axis=-1``; ``n`` may be 0. Never modified.
    gamma, beta : array_like of shape (C,), optional
        Scale and shift, cast to ``x_local.dtype``; ``None``: ones / zeros.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share the batch; default ``MPI.COMM_WORLD``.
    training : bool, default True
        False: normalize with ``running_mean``/``running_var`` (both
        required); no statistics are exchanged.
    running_mean, running_var : ndarray of shape (C,), optional
        Updated in place in training mode, PyTorch's convention:
        ``running = (1 - momentum) * running + momentum * batch``, with the
        unbiased global variance for ``running_var``.
    momentum : float in [0, 1], default 0.1
    eps : float, default 1e-5
        ``> 0`` in training mode, ``>= 0`` in evaluation mode.
    axis : int, default 1
        The channel axis.
    backend : str, optional
        A CPU backend from :func:`fastbn.available_backends`; default: the
        process default. Ranks may use different backends.

    Returns
    -------
    out : ndarray
        This rank's normalized slice, ``x_local.dtype``, ``x_local.shape``.
    cache : SyncBatchNormCache
        What :func:`sync_batchnorm_backward` needs.

    Raises
    ------
    TypeError, ValueError, RuntimeError
        The errors of :func:`fastbn.batchnorm_forward`, raised on every rank
        when any rank's input is bad (the message names the rank), and a
        ``ValueError`` on every rank when the ranks disagree on the channel
        count, dtype, number of dimensions, channel axis, mode, ``eps`` or
        ``momentum``. ``ValueError: Expected more than 1 value per channel
        when training`` when the global batch has fewer than 2 values per
        channel.

    Notes
    -----
    Communication: one ``allgather`` of a few bytes of metadata per rank,
    then, in training mode, one ``Allgather`` of ``3C`` float64 values per
    rank (count, mean, M2), merged on every rank in rank order.
    """
    return _forward(x_local, gamma, beta, comm=comm, training=training,
                    running_mean=running_mean, running_var=running_var, momentum=momentum,
                    eps=eps, axis=axis, backend=backend)


def _forward(x_local, gamma, beta, *, comm, training, running_mean, running_var, momentum,
             eps, axis, backend, check_input=None):
    """:func:`sync_batchnorm_forward`; ``check_input(x)``, when given, is one
    more local check whose error every rank raises (the layer's channel check)."""
    comm = check_comm(comm)
    error = None
    fields = ()
    local_count = 0
    try:
        if check_input is not None:
            check_input(x_local)
        name, module = _host_backend(backend)
        x = _host_array(x_local, "x")
        axis, A, C, B = _layout(x, axis)
        dtype = np.dtype(x.dtype)
        local_count = A * B
        training = bool(training)
        eps = check_eps(eps, training)
        momentum = check_scalar(momentum, "momentum", 0.0, 1.0)
        gamma64 = channel_param(gamma, C, dtype, "gamma", 1.0)
        beta64 = channel_param(beta, C, dtype, "beta", 0.0)
        if training:
            if (running_mean is None) != (running_var is None):
                raise ValueError("give both running_mean and running_var, or neither")
            track = running_mean is not None
        else:
            if running_mean is None or running_var is None:
                raise ValueError("training=False needs running_mean and running_var")
            track = False
        if running_mean is not None:
            running_mean64 = check_running(running_mean, C, "running_mean", track)
            running_var64 = check_running(running_var, C, "running_var", track)
            running_mean64 = running_mean64.astype(np.float64)
            running_var64 = running_var64.astype(np.float64)
        fields = (("the number of channels", C), ("the dtype", dtype.name),
                  ("the number of dimensions of x", x.ndim), ("the channel axis", axis),
                  ("the mode", "train" if training else "eval"), ("eps", eps),
                  ("momentum", momentum))
    except Exception as exc:  # reported to every rank by _agree
        error = exc
    counts = _agree(comm, "sync_batchnorm_forward", error, fields, local_count)
    count = sum(counts)
    if training and count < 2:
        raise ValueError("Expected more than 1 value per channel when training, got "
                         f"{count} value(s) per channel over {len(counts)} ranks")

    x3 = np.ascontiguousarray(x).reshape(A, C, B)
    out = np.empty(x.shape, dtype=dtype)
    out3 = out.reshape(A, C, B)
    if training:
        gathered = np.empty((comm.Get_size(), 3, C), dtype=np.float64)
        comm.Allgather(local_moments(module, x3, C), gathered)
        _, mean, invstd, m2 = global_statistics(gathered, eps)
        if track:
            running_mean[...], running_var[...] = update_running(
                running_mean64, running_var64, mean, m2, count, momentum)
    else:
        mean = np.ascontiguousarray(running_mean64, dtype=np.float64)
        invstd = np.ascontiguousarray(1.0 / np.sqrt(running_var64 + eps), dtype=np.float64)
    if local_count > 0:
        module.normalize(x3, mean, invstd, gamma64, beta64, out3)
    cache = SyncBatchNormCache(x_local, mean, invstd, gamma64, eps, axis, training, name,
                               comm, count, local_count)
    return out, cache


def sync_batchnorm_backward(dout_local, cache, *, method="simplified"):
    """Backward pass of :func:`sync_batchnorm_forward`.

    Every rank calls it with the upstream gradient of its own slice.

    Parameters
    ----------
    dout_local : ndarray
        This rank's upstream gradient, shape and dtype of its forward input.
    cache : SyncBatchNormCache
        From :func:`sync_batchnorm_forward`; its communicator and backend
        are used.
    method : {"simplified"}, default "simplified"
        The closed form
        ``dx = gamma * invstd * (dout - sum(dout) / M - xhat * sum(dout * xhat) / M)``,
        with the sums and ``M`` taken over the global batch. The staged
        graph (``method="staged"`` in :func:`fastbn.batchnorm_backward`)
        would need one collective per reduction stage and is not offered
        here: it raises ``ValueError``.

    Returns
    -------
    dx : ndarray
        Gradient with respect to this rank's ``x_local``.
    dgamma, dbeta : ndarray of shape (C,)
        Gradients with respect to ``gamma`` and ``beta``: sums over the
        global batch, the same on every rank, ``x.dtype``.

    Raises
    ------
    ValueError
        ``cache`` is not a :class:`SyncBatchNormCache` (raised locally: no
        communicator is known then); on every rank: a bad ``method`` or a
        ``dout_local`` not matching its cache on any rank, or ranks that
        disagree on the method, channel count, dtype, axis or mode.

    Notes
    -----
    Communication: one ``allgather`` of a few bytes of metadata per rank,
    then one ``Allreduce`` of ``2C`` float64 values (``sum_dy``,
    ``sum_dy_xhat``).
    """
    if not isinstance(cache, SyncBatchNormCache):
        raise ValueError(f"cache must be the SyncBatchNormCache returned by "
                         f"sync_batchnorm_forward, got {type(cache).__name__}")
    comm = cache.comm
    x = np.asarray(cache.x)
    shape, dtype, axis = tuple(x.shape), np.dtype(x.dtype), cache.axis
    A, C, B = canonical_shape(shape, axis)
    error = None
    try:
        if method not in _METHODS:
            raise ValueError(f"method must be 'simplified' or 'staged', got {method!r}")
        if method == "staged":
            raise ValueError("method='staged' is not available for synchronized batch norm "
                             "(its graph needs one collective per reduction stage); "
                             "use method='simplified'")
        dout = _host_array(dout_local, "dout")
        if tuple(dout.shape) != shape or np.dtype(dout.dtype) != dtype:
            raise ValueError(f"dout must have the forward input's shape {shape} and dtype "
                             f"{dtype}, got shape {tuple(dout.shape)} and dtype "
                             f"{np.dtype(dout.dtype)}")
        module = registry.get_backend(cache.backend)
    except Exception as exc:  # reported to every rank by _agree
        error = exc
    fields = (("the backward method", method if isinstance(method, str) else repr(method)),
              ("the number of channels", C), ("the dtype", dtype.name),
              ("the number of dimensions of x", len(shape)), ("the channel axis", axis),
              ("the mode", cache.mode))
    _agree(comm, "sync_batchnorm_backward", error, fields, cache.local_count)

    local_count = cache.local_count
    dx = np.empty(shape, dtype=dtype)
    dx3 = dx.reshape(A, C, B)
    local = np.zeros((2, C), dtype=np.float64)
    if local_count > 0:
        dy3 = np.ascontiguousarray(dout).reshape(A, C, B)
        x3 = np.ascontiguousarray(x).reshape(A, C, B)
        sum_dy, sum_dy_xhat = module.backward_reduce(dy3, x3, cache.mean, cache.invstd)
        local[0] = sum_dy
        local[1] = sum_dy_xhat
    total = np.empty_like(local)
    comm.Allreduce(local, total, op=MPI.SUM)
    if local_count > 0:
        if cache.training:
            sum_dy, sum_dy_xhat = elemt_sums(total, local_count, cache.count)
            module.backward_elemt(dy3, x3, cache.mean, cache.invstd, cache.gamma,
                                  sum_dy, sum_dy_xhat, dx3)
        else:
            # Evaluation mode: mean and invstd are constants,
            # dx = dout * gamma * invstd.
            zeros = np.zeros(C, dtype=np.float64)
            module.normalize(dy3, zeros, cache.invstd, cache.gamma, zeros, dx3)
    return dx, total[1].astype(dtype), total[0].astype(dtype)
