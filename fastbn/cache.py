"""The object a forward pass hands to the backward pass."""


class BatchNormCache:
    """What :func:`fastbn.batchnorm_backward` needs from the forward pass.

    Holds a reference to ``x`` (never a copy) and per-channel values only:
    no full-size intermediate is stored. The staged backward rebuilds the
    nodes of its graph from ``x``, ``mean`` and ``invstd``.

    Attributes
    ----------
    x : array
        The forward input, as the caller passed it.
    mean, invstd : ndarray of float64, shape (C,)
        Batch statistics in training mode; running statistics in evaluation
        mode (``invstd = 1 / sqrt(var + eps)``). Device arrays for a device
        backend.
    gamma, beta : array of shape (C,), or None
        The scale and shift as the backend takes them: for a CPU backend
        float64 host arrays with the values of the parameter dtype
        (``x.dtype``, float32 for 16-bit ``x``); for a device backend the
        caller's device arrays (``None`` for ones / zeros). The backward
        reads ``beta`` only to rebuild a fused ReLU's mask.
    eps : float
    axis : int
        The channel axis, normalized to be non-negative.
    training : bool
        Mode of the forward pass.
    activation : {None, "relu"}
        The activation fused into the forward pass.
    backend : str
        The backend that ran the forward pass; the backward runs on it too.
    """

    __slots__ = ("x", "mean", "invstd", "gamma", "eps", "axis", "training",
                 "backend", "beta", "activation")

    def __init__(self, x, mean, invstd, gamma, eps, axis, training, backend,
                 beta=None, activation=None):
        self.x = x
        self.mean = mean
        self.invstd = invstd
        self.gamma = gamma
        self.eps = eps
        self.axis = axis
        self.training = training
        self.backend = backend
        self.beta = beta
        self.activation = activation

    @property
    def mode(self):
        """``"train"`` or ``"eval"``."""
        return "train" if self.training else "eval"

    def __repr__(self):
        return (f"BatchNormCache(shape={tuple(self.x.shape)}, dtype={self.x.dtype}, "
                f"axis={self.axis}, mode={self.mode!r}, backend={self.backend!r}, "
                f"activation={self.activation!r})")
