"""The data and kernels that every fastbn benchmark times.

One description shared by the suites of ``fastbn bench``, the asv suite
(``benchmarks/``) and pytest-benchmark (``tests/test_bench_pytest.py``):
:func:`make_data` fills the inputs of one shape and dtype, :class:`Kernels`
holds one backend's zero-argument kernels on them (PyTorch's included),
writing into preallocated outputs (``out=``), and :func:`why_unsupported`
says why a backend cannot run a dtype or activation here.

Dtypes: float32, float64, float16 and bfloat16 (through ``ml_dtypes``). For
the 16-bit dtypes ``x``, ``dout``, ``out`` and ``dx`` are 16-bit and
``gamma``, ``beta`` and the running statistics float32, as in mixed
precision (PyTorch's rows too).
"""
import numpy as np

EPS = 1e-5
MOMENTUM = 0.1
DTYPES = ("float32", "float64", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
# Activation rows: None (batch norm alone), "relu" (fastbn: fused into the
# batch norm kernels; torch: batch_norm then relu_), "relu_separate" (fastbn
# batch norm, then a NumPy ReLU pass; fastbn backends only).
ACTIVATIONS = (None, "relu", "relu_separate")

def parse_shape(text):
    """``"32x64x56x56"`` -> ``(32, 64, 56, 56)``.

    Parameters
    ----------
    text : str
        Dimensions joined by ``x``; the channel axis is axis 1.

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        For a shape with fewer than two positive dimensions.
    """
    item = text.strip().lower()
    try:
        shape = tuple(int(part) for part in item.split("x"))
    except ValueError:
        raise ValueError(f"bad shape {item!r}: expected e.g. 32x64x56x56") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"bad shape {item!r}: need at least 2 positive dimensions")
    return shape


def parse_shapes(text):
    """``"256x4096,32x64x56x56"`` -> ``[(256, 4096), (32, 64, 56, 56)]``.

    Parameters
    ----------
    text : str
        Comma-separated shapes, each as :func:`parse_shape` reads it.

    Returns
    -------
    list of tuple of int

    Raises
    ------
    ValueError
        For a bad shape, or when no shape is given.
    """
    shapes = [parse_shape(item) for item in text.split(",") if item.strip()]
    if not shapes:
        raise ValueError("no shapes given")
    return shapes


def parse_dtypes(text):
    """``"float16,bfloat16"`` -> ``["float16", "bfloat16"]``; ``"both"`` -> float32, float64.

    Parameters
    ----------
    text : str
        Comma-separated names among :data:`DTYPES`, or ``"both"``.

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        For an unknown name, or when no dtype is given.
    """
    names = []
    for item in str(text).split(","):
        name = item.strip().lower()
        if not name:
            continue
        expanded = ["float32", "float64"] if name == "both" else [name]
        for one in expanded:
            if one not in DTYPES:
                raise ValueError(f"bad dtype {item.strip()!r}: expected a comma-separated "
                                 f"list of {', '.join(DTYPES)} (or both)")
            if one not in names:
                names.append(one)
    if not names:
        raise ValueError("no dtypes given")
    return names


class DtypeUnavailable(ValueError):
    """A dtype that cannot be made here (bfloat16 without ``ml_dtypes``)."""


def numpy_dtype(dtype):
    """The NumPy dtype of a name in :data:`DTYPES` (bfloat16 from ``ml_dtypes``).

    Parameters
    ----------
    dtype : str or numpy.dtype

    Returns
    -------
    numpy.dtype

    Raises
    ------
    DtypeUnavailable
        For bfloat16 when ``ml_dtypes`` is not installed.
    """
    if isinstance(dtype, np.dtype):
        return dtype
    if str(dtype) == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise DtypeUnavailable("bfloat16 needs ml_dtypes (pip install ml_dtypes, or "
                                   "the fastbn[bfloat16] extra)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def dtype_name(dtype):
    """``"float32"``, ..., ``"bfloat16"`` for a dtype or a name."""
    return np.dtype(dtype).name if isinstance(dtype, np.dtype) else str(dtype)


def param_dtype(dtype):
    """Dtype of gamma, beta and the running statistics: float32 for 16-bit data."""
    return np.dtype(np.float32) if dtype_name(dtype) in HALF_DTYPES else numpy_dtype(dtype)


def format_shape(shape):
    return "x".join(str(n) for n in shape)


def _torch_installed():
    # Found, not imported: the suites time PyTorch in a peer process.
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def default_backends():
    """Every available fastbn backend except CUDA, then ``"torch"`` if installed.

    Returns
    -------
    list of str
    """
    import fastbn

    names = [name for name in fastbn.available_backends() if name != "cuda"]
    if _torch_installed():
        names.append("torch")
    return names


def resolve_backends(text):
    """The backend list of ``--backends`` (or the default one).

    Raises
    ------
    ValueError
        For a name that is unknown or cannot run here, with the reason.
    """
    if not text:
        return default_backends()
    import fastbn

    available = fastbn.available_backends()
    info = fastbn.backend_info()
    names = []
    for name in (part.strip() for part in text.split(",")):
        if not name or name in names:
            continue
        if name == "torch":
            if not _torch_installed():
                raise ValueError("backend 'torch' needs PyTorch, which is not installed")
        elif name not in available:
            if name in info:
                reason = info[name].get("reason") or "not available"
                raise ValueError(f"backend {name!r} cannot run here: {reason}")
            raise ValueError(f"unknown backend {name!r}; available: "
                             f"{', '.join(available)} (and torch)")
        names.append(name)
    if not names:
        raise ValueError("no backends given")
    return names


def make_data(shape, dtype, seed=0):
    """Filled inputs for one shape and dtype, shared by every backend.

    Parameters
    ----------
    shape : tuple of int
        ``(N, C, ...)``; the channel axis is 1.
    dtype : str or numpy.dtype
        One of :data:`DTYPES`. For float16 and bfloat16, ``x`` and ``dout``
        are standard normal float32 values rounded to the 16-bit dtype, and
        ``gamma``/``beta`` are float32 (mixed precision).
    seed : int, optional

    Returns
    -------
    dict of ndarray
        ``x``, ``dout``, ``gamma``, ``beta``.

    Raises
    ------
    DtypeUnavailable
        For bfloat16 without ``ml_dtypes``.
    """
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(dtype)
    channels = shape[1]
    if dtype_name(dtype) in HALF_DTYPES:
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        dout = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    else:
        x = rng.standard_normal(shape, dtype=dtype)
        dout = rng.standard_normal(shape, dtype=dtype)
    params = param_dtype(dtype)
    return {
        "x": x,
        "dout": dout,
        "gamma": rng.uniform(0.5, 1.5, channels).astype(params),
        "beta": rng.uniform(-0.5, 0.5, channels).astype(params),
    }


class Kernels:
    """Zero-argument kernels of one backend on shared data.

    fastbn's kernels write into preallocated, filled outputs (``out=``), so
    that their timings measure neither the allocator nor first-touch page
    faults; PyTorch's functional ops allocate theirs, as they do in a model
    (the case's ``out`` and ``dx`` then view PyTorch's latest results).
    The arrays are attributes: ``x``, ``dout``, ``gamma``, ``beta``,
    ``running_mean``, ``running_var``, ``out``, ``dx``. Device backends
    (CUDA, only when named in ``--backends``) get device copies of the data
    and are synchronized after each call. PyTorch runs its functional ops,
    the ones ``F.batch_norm`` and autograd run (``torch.native_batch_norm``,
    ``aten.native_batch_norm_backward``), on ``torch.from_numpy`` views of
    the arrays (bfloat16 through a ``uint16`` view); they allocate their
    results, as they do in a model. For 16-bit data its weights and running
    statistics are float32, as in mixed precision.

    Parameters
    ----------
    backend : str
        A fastbn backend name or ``"torch"``.
    data : dict
        From :func:`make_data`.
    activation : {None, "relu", "relu_separate"}, optional
        ``None``: batch norm alone. ``"relu"``: batch norm + ReLU, fused
        (``activation="relu"``) on a fastbn backend; on PyTorch
        ``native_batch_norm`` then ``relu_`` forward, and backward through
        both (``threshold_backward``, then ``native_batch_norm_backward``),
        as autograd runs ``batch_norm`` + ``relu_``. ``"relu_separate"``
        (fastbn backends): the two separate passes, fastbn's batch norm then
        ``np.maximum(out, 0, out=out)`` forward, and backward ``dout *
        (out > 0)`` (``np.greater`` into a preallocated mask,
        ``np.multiply`` into a preallocated buffer) then fastbn's backward.

    Raises
    ------
    ValueError
        For an unknown activation, or ``"relu_separate"`` on PyTorch.
    """

    ARRAYS = ("x", "dout", "gamma", "beta", "running_mean", "running_var", "out", "dx")

    def __init__(self, backend, data, activation=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of "
                             f"{ACTIVATIONS}")
        if activation == "relu_separate" and backend == "torch":
            raise ValueError("PyTorch's batch_norm + relu_ is its 'relu' row; "
                             "'relu_separate' is for fastbn backends")
        self.backend = backend
        self.activation = activation
        x = data["x"]
        channels = x.shape[1]
        self.shape = x.shape
        self.dtype = x.dtype
        self.x = x
        self.dout = data["dout"]
        self.gamma = data["gamma"]
        self.beta = data["beta"]
        params = param_dtype(x.dtype)
        self.running_mean = np.zeros(channels, dtype=params)
        self.running_var = np.ones(channels, dtype=params)
        # np.full writes every page now (np.zeros would map them lazily).
        self.out = np.full(x.shape, 0.0, dtype=x.dtype)
        self.dx = np.full(x.shape, 0.0, dtype=x.dtype)
        self.copy_dst = np.full(x.shape, 0.0, dtype=x.dtype)
        self.copy_src = x
        if activation == "relu_separate":
            self.zero = np.zeros((), dtype=x.dtype)
            self.mask = np.full(x.shape, False)
            self.dout_masked = np.full(x.shape, 0.0, dtype=x.dtype)
        self.cache = None
        self._sync = _no_sync
        if backend == "torch":
            self._setup_torch()
            return
        import fastbn

        self._fastbn = fastbn
        if fastbn.backend_info().get(backend, {}).get("device", "cpu") != "cpu":
            self._setup_device()

    def copy(self):
        """``np.copyto`` of ``x``: the bandwidth reference (2 item sizes).

        For a device backend, a device-to-device copy of the same bytes.
        """
        if isinstance(self.copy_dst, np.ndarray):
            np.copyto(self.copy_dst, self.copy_src)
        else:
            self.copy_dst.copy_to_device(self.copy_src)
            self._sync()

    def _activation_kwargs(self):
        return {"activation": "relu"} if self.activation == "relu" else {}

    def forward(self):
        """Training forward into ``out``, running statistics updated.

        Returns
        -------
        object
            The cache, also kept for :meth:`backward`.
        """
        if self.backend == "torch":
            return self._torch_forward(training=True)
        _, self.cache = self._fastbn.batchnorm_forward(
            self.x, self.gamma, self.beta, training=True,
            running_mean=self.running_mean, running_var=self.running_var,
            momentum=MOMENTUM, eps=EPS, backend=self.backend, out=self.out,
            **self._activation_kwargs())
        if self.activation == "relu_separate":
            np.maximum(self.out, self.zero, out=self.out)
        self._sync()
        return self.cache

    def forward_eval(self):
        """Evaluation forward (running statistics) into ``out``.

        Returns
        -------
        object
            What the backend's forward returns.
        """
        if self.backend == "torch":
            return self._torch_forward(training=False)
        result = self._fastbn.batchnorm_forward(
            self.x, self.gamma, self.beta, training=False,
            running_mean=self.running_mean, running_var=self.running_var,
            eps=EPS, backend=self.backend, out=self.out, **self._activation_kwargs())
        if self.activation == "relu_separate":
            np.maximum(self.out, self.zero, out=self.out)
        self._sync()
        return result

    def backward(self, method="simplified"):
        """Training backward into ``dx``; runs :meth:`forward` first if needed.

        Parameters
        ----------
        method : {"simplified", "staged"}

        Returns
        -------
        object
            What the backend's backward returns.

        Raises
        ------
        NotImplementedError
            For ``"staged"`` on PyTorch, which has no staged backward.
        """
        if self.cache is None:
            self.forward()
        if self.backend == "torch":
            if method != "simplified":
                raise NotImplementedError("PyTorch has no staged backward")
            return self._torch_backward()
        dout = self.dout
        if self.activation == "relu_separate":
            # The ReLU's backward as a NumPy pass of its own: dout * (out > 0).
            np.greater(self.out, self.zero, out=self.mask)
            np.multiply(self.dout, self.mask, out=self.dout_masked)
            dout = self.dout_masked
        result = self._fastbn.batchnorm_backward(dout, self.cache, method=method,
                                                 out=self.dx)
        self._sync()
        return result

    def simplified(self):
        """Simplified (closed-form) backward."""
        return self.backward("simplified")

    def staged(self):
        """Staged (computational-graph) backward; not for PyTorch."""
        return self.backward("staged")

    # Device backends (CUDA) -----------------------------------------------

    def _setup_device(self):
        """Move every array to the device; synchronize after each kernel."""
        from numba import cuda

        for name in self.ARRAYS + ("copy_dst",):
            setattr(self, name, cuda.to_device(getattr(self, name)))
        # The bandwidth reference of a device backend is a device copy.
        self.copy_src = self.x
        self._sync = cuda.synchronize

    # PyTorch --------------------------------------------------------------

    def _setup_torch(self):
        """Tensors that share memory with the arrays, and the saved statistics."""
        import torch

        self._torch = torch
        t = {name: _torch_view(getattr(self, name)) for name in self.ARRAYS}
        y, t["save_mean"], t["save_invstd"] = torch.native_batch_norm(
            t["x"], t["gamma"], t["beta"], None, None, True, MOMENTUM, EPS)
        if self.activation == "relu":
            t["relu_out"] = y.relu_()     # the forward's output, which relu_'s backward reads
        self.t = t

    def _torch_forward(self, training):
        # The functional op, the one F.batch_norm and autograd run (its out=
        # variant computes into temporaries and copies: slower).
        t = self.t
        result = self._torch.native_batch_norm(
            t["x"], t["gamma"], t["beta"], t["running_mean"], t["running_var"],
            training, MOMENTUM, EPS)
        if self.activation == "relu":
            result[0].relu_()
        if training:
            self.cache = result
        self.out = _numpy_view(result[0])    # a view of the new output (no copy)
        return result

    def _torch_backward(self):
        t = self.t
        dout = t["dout"]
        aten = self._torch.ops.aten
        if self.activation == "relu":
            # What autograd runs for relu_: grad * (result > 0).
            dout = aten.threshold_backward(dout, t["relu_out"], 0)
        # The functional op, as autograd runs it (not the slower out= variant).
        result = aten.native_batch_norm_backward(
            dout, t["x"], t["gamma"], t["running_mean"], t["running_var"],
            t["save_mean"], t["save_invstd"], True, EPS, [True, True, True])
        self.dx = _numpy_view(result[0])     # a view of the new gradient (no copy)
        return result


def _torch_view(array):
    """A tensor sharing memory with ``array`` (bfloat16 through a uint16 view)."""
    import torch

    if dtype_name(array.dtype) == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _numpy_view(tensor):
    """A NumPy view of a CPU tensor (bfloat16 through its bits), no copy."""
    import torch

    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _no_sync():
    pass


_PROBE_SHAPE = (4, 3, 5)
_UNSUPPORTED = {}


def why_unsupported(backend, dtype, activation=None):
    """Why ``backend`` cannot run ``dtype`` (with ``activation``) here, or None.

    Builds the data (bfloat16 needs ``ml_dtypes``) and runs the training
    forward and the simplified backward once on a tiny array; the first
    ``TypeError``, ``ValueError``, ``RuntimeError``, ``NotImplementedError``
    or ``ImportError``, type and message, is the reason (any other error
    propagates). The answer is kept per process.

    Parameters
    ----------
    backend : str
        A fastbn backend name or ``"torch"``.
    dtype : str
        One of :data:`DTYPES`.
    activation : {None, "relu", "relu_separate"}, optional

    Returns
    -------
    str or None
    """
    key = (backend, dtype_name(dtype), activation)
    if key not in _UNSUPPORTED:
        try:
            data = make_data(_PROBE_SHAPE, dtype, seed=0)
            kernels = Kernels(backend, data, activation=activation)
            kernels.forward()
            kernels.backward("simplified")
        except DtypeUnavailable as exc:
            _UNSUPPORTED[key] = str(exc)
        except (TypeError, ValueError, RuntimeError, NotImplementedError, ImportError) as exc:
            # What "cannot run this dtype here" raises (the backend's own
            # words); any other error is a bug and propagates.
            lines = str(exc).strip().splitlines()
            message = lines[0] if lines else ""
            if len(message) > 160:
                message = message[:157] + "..."
            _UNSUPPORTED[key] = f"{type(exc).__name__}: {message}".rstrip(": ")
        else:
            _UNSUPPORTED[key] = None
    return _UNSUPPORTED[key]


class Threads:
    """Set numba, OpenMP (threadpoolctl) and torch thread counts; restore on exit."""

    def __init__(self, count, use_torch):
        self.count = count
        self.use_torch = use_torch
        self._restore = []

    def __enter__(self):
        if self.count is None:
            return self
        try:
            import numba
        except ImportError:
            pass
        else:
            before = numba.get_num_threads()
            numba.set_num_threads(min(self.count, numba.config.NUMBA_NUM_THREADS))
            self._restore.append(lambda: numba.set_num_threads(before))
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            limiter = threadpool_limits(limits=self.count, user_api="openmp")
            self._restore.append(limiter.restore_original_limits)
        if self.use_torch:
            import torch
            before_torch = torch.get_num_threads()
            torch.set_num_threads(self.count)
            self._restore.append(lambda: torch.set_num_threads(before_torch))
        return self

    def __exit__(self, *exc):
        while self._restore:
            self._restore.pop()()
        return False


def parse_threads(text):
    """``"1,2"`` -> ``[1, 2]``; ``None`` -> ``[None]`` (the current counts).

    Raises
    ------
    ValueError
        For a count below 1 or a malformed list.
    """
    if text is None:
        return [None]
    try:
        counts = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"bad --threads {text!r}: expected e.g. 2 or 1,2") from None
    if not counts or min(counts) < 1:
        raise ValueError("--threads must be at least 1")
    return list(dict.fromkeys(counts))


def threads_in_use(backend):
    """The thread count a kernel of ``backend`` started now would use."""
    if backend == "torch":
        import torch
        return int(torch.get_num_threads())
    import fastbn
    return fastbn.backend_info().get(backend, {}).get("threads")


def fastbn_thread_count(backends, requested=None):
    """The thread count PyTorch's peer gets: ``requested``, else the most
    threads a fastbn backend of ``backends`` uses now (None without one).

    Parameters
    ----------
    backends : list of str
        Backend names; ``"torch"`` is ignored.
    requested : int, optional
        ``--threads``.

    Returns
    -------
    int or None
    """
    if requested:
        return requested
    counts = [threads_in_use(b) for b in backends if b != "torch"]
    counts = [c for c in counts if c]
    return max(counts) if counts else None
