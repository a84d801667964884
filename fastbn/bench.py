"""The ``bench`` main job: ``python -m fastbn bench`` (or ``fastbn bench``).

Times the training forward, the simplified backward and the staged backward
of every available CPU backend (and of PyTorch when it is installed) on a
suite of shapes, and prints one table (``--device cuda``: the GPU job of
:mod:`fastbn.bench_cuda`). Every figure is a best-of-N wall time
(``time.perf_counter``, after one warm-up call) with its spread: the median
of the same N calls, shown as ``+x%`` above the best. When the median and
the best disagree by more than ``AGREE`` the kernel is timed again, up to
``MAX_REPEAT_FACTOR`` times as often; a figure still more than ``UNSTABLE``
apart is flagged ``!`` and named in a warning after the table (as pyperf
does), as is a load average above the core count. Every comparison is a
ratio of times taken in the same run:

* ``speedup``: staged backward time / simplified backward time.
* ``fraction of the copy limit``: batch norm is memory-bound; its limit time
  is its compulsory traffic (training forward 2, simplified backward 3 item
  sizes per element) at the bandwidth of ``np.copyto`` (2 item sizes per
  element) on an array of the same size and dtype, timed in the same row.
  1.0 means the kernel runs at copy speed.
* ``vs torch``: PyTorch's time / the backend's time (above 1: faster than
  PyTorch), for the same shape, dtype and activation.
* ``vs sep`` (``--activation relu``): time of the two separate passes
  (fastbn batch norm, then a NumPy ReLU) / time of the fused batch norm +
  ReLU of the same backend.

Dtypes: float32, float64, float16 and bfloat16 (through ``ml_dtypes``). For
the 16-bit dtypes ``x``, ``dout``, ``out`` and ``dx`` are 16-bit and
``gamma``, ``beta`` and the running statistics float32, as in mixed
precision (PyTorch's rows too). The copy reference is ``np.copyto`` of the
16-bit array, so the limit counts 16-bit bytes. A backend that cannot run a
dtype or the fused ReLU (no ``ml_dtypes``, no 16-bit kernels) gets an
``n/a`` row and the reason below the table.

Kernels write into preallocated outputs (``out=``), PyTorch included, so
that allocation is not timed. torch, tqdm and matplotlib are optional and
imported only when used.

The asv suite (``benchmarks/common.py``) imports :func:`best_time`,
:func:`fraction_of_copy_limit`, :func:`make_data`, :func:`parse_shape` and
:class:`Kernels` from here, so that both time the same code.
"""
import gc
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

DEFAULT_SHAPES = ((256, 4096), (128, 512, 7, 7), (64, 256, 14, 14), (32, 64, 56, 56))
LARGE_SHAPES = ((64, 256, 56, 56),)
REPEAT = 7
QUICK_REPEAT = 5
# Spread of a figure, (median - best) / best: above AGREE the kernel is timed
# again (up to MAX_REPEAT_FACTOR * repeat calls in all); above UNSTABLE it is
# flagged as unstable.
AGREE = 0.05
SAMPLE_SECONDS = 2e-4
UNSTABLE = 0.25
MAX_REPEAT_FACTOR = 4
EPS = 1e-5
MOMENTUM = 0.1
# Compulsory memory traffic per element of x, in item sizes (DESIGN.md,
# performance model). The limit time of a kernel is its bytes divided by the
# copy bandwidth, i.e. copy time * BYTES_PER_ELEMENT[kernel] / 2.
# With a fused ReLU the traffic is the same (the backward rebuilds the mask
# from x and the statistics); the separate passes move more, but are held to
# the same compulsory bytes.
BYTES_PER_ELEMENT = {"copy": 2, "forward": 2, "backward": 3}
DTYPES = ("float32", "float64", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
# Activation rows: None (batch norm alone), "relu" (fastbn: fused into the
# batch norm kernels; torch: batch_norm then relu_), "relu_separate" (fastbn
# batch norm, then a NumPy ReLU pass; fastbn backends only).
ACTIVATIONS = (None, "relu", "relu_separate")
ACTIVATION_LABELS = {None: "-", "relu": "relu", "relu_separate": "relu sep"}


def add_arguments(parser):
    """Add the ``bench`` options to an :mod:`argparse` parser.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    parser.add_argument(
        "--quick", action="store_true",
        help="the default shapes without the large memory-bound one, float32 "
             f"only, {QUICK_REPEAT} repetitions (under a minute)")
    parser.add_argument(
        "--shapes", metavar="SHAPES",
        help='comma-separated shapes, channel axis 1, e.g. "256x4096,32x64x56x56" '
             "(default: " + ",".join(_format_shape(s) for s in DEFAULT_SHAPES + LARGE_SHAPES)
             + "; --quick leaves out the last)")
    parser.add_argument(
        "--dtype", metavar="DTYPES", default=None,
        help="comma-separated dtypes among " + ", ".join(DTYPES) + ' (e.g. '
             '"float16,bfloat16"; bfloat16 needs ml_dtypes); "both" means '
             "float32,float64 (default: both; float32 with --quick)")
    parser.add_argument(
        "--activation", choices=("none", "relu", "both"), default="none",
        help="none (default): batch norm alone; relu: batch norm + ReLU, fused "
             "(fastbn activation='relu'; torch: batch_norm then relu_) and as two "
             "separate passes (fastbn, then a NumPy ReLU); both: all of these rows")
    parser.add_argument(
        "--backends", metavar="NAMES",
        help="comma-separated backends, fastbn's and/or torch (default: every "
             "available CPU backend, and torch when installed)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu (default): the CPU backends and PyTorch CPU; cuda: the GPU "
             "timing job (fastbn.bench_cuda), which reads --shapes, --dtype, "
             "--repeat, --quick and --json")
    parser.add_argument(
        "--threads", metavar="N[,N...]",
        help='thread count(s) for numba, OpenMP (threadpoolctl) and torch; a list '
             '("1,2") times every case at each count and adds a scaling table')
    parser.add_argument(
        "--repeat", type=int, metavar="N",
        help=f"timed repetitions per kernel, best kept and the median shown "
             f"(default {REPEAT}, {QUICK_REPEAT} with --quick; up to "
             f"{MAX_REPEAT_FACTOR}x as many when they disagree)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--plot", metavar="PATH",
        help="also write a PNG bar chart (needs matplotlib: pip install 'fastbn[bench]')")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    return parser


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


def _format_shape(shape):
    return "x".join(str(n) for n in shape)


def _torch_installed():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


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


def best_time(func, repeat, warmup=True):
    """Best (minimum) wall time of ``repeat`` calls of ``func``, in seconds.

    The garbage collector is off while timing, as in :mod:`timeit`.

    Parameters
    ----------
    func : callable
        Called with no arguments.
    repeat : int
        Number of timed calls, at least 1.
    warmup : bool, optional
        Call ``func`` once, untimed, before the timed calls (default). The
        asv benchmarks pass False: their ``setup`` already warmed up.

    Returns
    -------
    float
    """
    if warmup:
        func()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        best = float("inf")
        for _ in range(max(1, int(repeat))):
            start = time.perf_counter()
            func()
            best = min(best, time.perf_counter() - start)
    finally:
        if was_enabled:
            gc.enable()
    return best


def time_spread(func, repeat, warmup=True):
    """Best and median wall time of ``func``, timed more when they disagree.

    ``repeat`` samples are timed (garbage collector off, after one warm-up
    call; a sample is the mean of enough calls to last SAMPLE_SECONDS);
    while ``(median - best) / best`` exceeds :data:`AGREE` and fewer than
    ``MAX_REPEAT_FACTOR * repeat`` calls were timed, ``repeat`` more are.

    Parameters
    ----------
    func : callable
        Called with no arguments.
    repeat : int
        Calls per batch, at least 1.
    warmup : bool, optional

    Returns
    -------
    dict
        ``best`` and ``median`` (seconds), ``calls`` (timed calls), ``spread``
        (``(median - best) / best``) and ``unstable`` (spread above
        :data:`UNSTABLE`).
    """
    start = time.perf_counter()
    func()
    once = time.perf_counter() - start
    if not warmup:
        once = 0.0
    # Calls shorter than SAMPLE_SECONDS are timed in loops of `number` calls
    # (as timeit does), so that one sample is not at the clock's resolution.
    number = max(1, int(SAMPLE_SECONDS / once)) if once > 0 else 1
    repeat = max(1, int(repeat))
    samples = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            for _ in range(repeat):
                start = time.perf_counter()
                for _ in range(number):
                    func()
                samples.append((time.perf_counter() - start) / number)
            best = min(samples)
            median = float(np.median(samples))
            spread = (median - best) / best if best > 0 else 0.0
            if spread <= AGREE or len(samples) >= MAX_REPEAT_FACTOR * repeat:
                break
    finally:
        if was_enabled:
            gc.enable()
    return {"best": best, "median": median, "calls": len(samples), "spread": spread,
            "unstable": spread > UNSTABLE}


def fraction_of_copy_limit(kernel, seconds, copy_seconds, itemsize=1, copy_itemsize=None):
    """Share of the memory-bound limit that a kernel reaches.

    The limit is the kernel's compulsory bytes, ``BYTES_PER_ELEMENT[kernel]
    * itemsize`` per element, at the bandwidth of a copy that moved
    ``2 * copy_itemsize`` bytes per element of an array with as many
    elements. With the copy taken on the kernel's own dtype (the default,
    ``copy_itemsize = itemsize``) the item sizes cancel: a float16 forward
    is held to 2 x 2 bytes per element at the bandwidth of a float16 copy.

    Parameters
    ----------
    kernel : {"forward", "backward"}
        ``"forward"`` moves 2 item sizes per element, the simplified
        ``"backward"`` 3 (:data:`BYTES_PER_ELEMENT`), with or without a
        fused ReLU.
    seconds : float
        Time of the kernel.
    copy_seconds : float
        Time of ``np.copyto`` of an array of the same number of elements
        (2 item sizes per element), measured in the same run.
    itemsize : int, optional
        Bytes per element of the kernel's data.
    copy_itemsize : int, optional
        Bytes per element of the copied array (default: ``itemsize``).

    Returns
    -------
    float
        Limit time / kernel time; 1.0 means the kernel runs at copy speed.
    """
    if copy_itemsize is None:
        copy_itemsize = itemsize
    kernel_bytes = BYTES_PER_ELEMENT[kernel] * itemsize
    copy_bytes = BYTES_PER_ELEMENT["copy"] * copy_itemsize
    limit = copy_seconds * kernel_bytes / copy_bytes
    return limit / seconds


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

    Every kernel writes into preallocated, filled outputs (``out=``), so
    that timings measure neither the allocator nor first-touch page faults.
    The arrays are attributes: ``x``, ``dout``, ``gamma``, ``beta``,
    ``running_mean``, ``running_var``, ``out``, ``dx``. Device backends
    (CUDA, only when named in ``--backends``) get device copies of the data
    and are synchronized after each call. PyTorch runs
    ``torch.native_batch_norm`` on ``torch.from_numpy`` views of the arrays
    (bfloat16 through a ``uint16`` view); for 16-bit data its weights and
    running statistics are float32, as in mixed precision.

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
        t["dgamma"] = torch.empty_like(t["gamma"])
        t["dbeta"] = torch.empty_like(t["beta"])
        if self.activation == "relu":
            # relu_'s gradient (threshold_backward) goes here, then into batch norm's.
            t["dout_masked"] = torch.zeros_like(t["dout"])
        _, t["save_mean"], t["save_invstd"] = torch.native_batch_norm(
            t["x"], t["gamma"], t["beta"], None, None, True, MOMENTUM, EPS)
        # Evaluation mode returns empty statistics: keep separate buffers so
        # that an evaluation forward never resizes the training ones.
        _, t["eval_save_mean"], t["eval_save_invstd"] = torch.native_batch_norm(
            t["x"], t["gamma"], t["beta"], t["running_mean"].clone(),
            t["running_var"].clone(), False, MOMENTUM, EPS)
        self.t = t

    def _torch_forward(self, training):
        t = self.t
        prefix = "" if training else "eval_"
        result = self._torch.native_batch_norm(
            t["x"], t["gamma"], t["beta"], t["running_mean"], t["running_var"],
            training, MOMENTUM, EPS,
            out=(t["out"], t[prefix + "save_mean"], t[prefix + "save_invstd"]))
        if self.activation == "relu":
            t["out"].relu_()
        if training:
            self.cache = result
        return result

    def _torch_backward(self):
        t = self.t
        dout = t["dout"]
        if self.activation == "relu":
            # What autograd runs for relu_: grad * (result > 0).
            self._torch.ops.aten.threshold_backward.grad_input(
                dout, t["out"], 0, grad_input=t["dout_masked"])
            dout = t["dout_masked"]
        return self._torch.ops.aten.native_batch_norm_backward.out(
            dout, t["x"], t["gamma"], t["running_mean"], t["running_var"],
            t["save_mean"], t["save_invstd"], True, EPS, [True, True, True],
            out0=t["dx"], out1=t["dgamma"], out2=t["dbeta"])


def _torch_view(array):
    """A tensor sharing memory with ``array`` (bfloat16 through a uint16 view)."""
    import torch

    if dtype_name(array.dtype) == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


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


def skipped_row(backend, shape, dtype, activation, reason):
    """A result row for a case that cannot run here: every figure None, ``skipped`` = why."""
    row = {"backend": backend, "shape": list(shape), "dtype": dtype_name(dtype),
           "activation": activation, "skipped": reason}
    for key in ("copy_ms", "forward_ms", "simplified_ms", "staged_ms", "forward_median_ms",
                "simplified_median_ms", "staged_median_ms", "copy_median_ms",
                "speedup_simplified_over_staged", "forward_fraction_of_copy_limit",
                "backward_fraction_of_copy_limit", "forward_ratio_to_torch",
                "backward_ratio_to_torch", "forward_ratio_to_separate",
                "backward_ratio_to_separate", "copy_gb_per_s", "itemsize"):
        row[key] = None
    row["calls"] = {}
    row["unstable"] = []
    return row


def measure(backend, data, repeat, activation=None, staged=True):
    """Time one backend on one shape, dtype and activation.

    Parameters
    ----------
    backend : str
    data : dict
        From :func:`make_data`.
    repeat : int
    activation : {None, "relu", "relu_separate"}, optional
        See :class:`Kernels`.
    staged : bool, optional
        Also time the staged backward (never for PyTorch).

    Returns
    -------
    dict
        One result row (times in milliseconds, ratios without unit);
        ``staged_ms`` and the speedup are None for PyTorch. The fractions of
        the copy limit count the item size of ``data["x"]`` (2 bytes for
        float16/bfloat16), the copy being of an array of that dtype.
    """
    x = data["x"]
    kernels = Kernels(backend, data, activation=activation)
    copy = time_spread(kernels.copy, repeat)
    forward = time_spread(kernels.forward, repeat)
    simplified = time_spread(kernels.simplified, repeat)
    staged_timing = None
    if staged and backend != "torch":
        staged_timing = time_spread(kernels.staged, repeat)
    # A second copy timing, after the kernels, guards against a slow start.
    copy_again = time_spread(kernels.copy, repeat)
    if copy_again["best"] < copy["best"]:
        copy = copy_again
    copy_s, forward_s = copy["best"], forward["best"]
    simplified_s = simplified["best"]
    staged_s = None if staged_timing is None else staged_timing["best"]
    timings = {"copy": copy, "forward": forward, "simplified": simplified,
               "staged": staged_timing}
    return {
        "backend": backend,
        "shape": list(x.shape),
        "dtype": dtype_name(x.dtype),
        "activation": activation,
        "itemsize": x.dtype.itemsize,
        "copy_ms": copy_s * 1e3,
        "copy_gb_per_s": BYTES_PER_ELEMENT["copy"] * x.nbytes / copy_s / 1e9,
        "forward_ms": forward_s * 1e3,
        "simplified_ms": simplified_s * 1e3,
        "staged_ms": None if staged_s is None else staged_s * 1e3,
        "forward_median_ms": forward["median"] * 1e3,
        "simplified_median_ms": simplified["median"] * 1e3,
        "staged_median_ms": None if staged_timing is None else staged_timing["median"] * 1e3,
        "copy_median_ms": copy["median"] * 1e3,
        "calls": {name: t["calls"] for name, t in timings.items() if t is not None},
        "unstable": [name for name, t in timings.items() if t is not None and t["unstable"]],
        "speedup_simplified_over_staged": None if staged_s is None else staged_s / simplified_s,
        "forward_fraction_of_copy_limit": fraction_of_copy_limit("forward", forward_s, copy_s),
        "backward_fraction_of_copy_limit": fraction_of_copy_limit("backward", simplified_s,
                                                                  copy_s),
        "forward_ratio_to_torch": None,
        "backward_ratio_to_torch": None,
        "forward_ratio_to_separate": None,
        "backward_ratio_to_separate": None,
    }


def _family(activation):
    """Rows compared with one PyTorch row: batch norm alone, or with a ReLU."""
    return None if activation is None else "relu"


def add_torch_ratios(rows):
    """Fill ``*_ratio_to_torch`` (torch time / row time) for one shape and dtype.

    A batch-norm row is compared with PyTorch's batch norm, a ReLU row
    (fused or separate) with PyTorch's batch_norm + relu_.
    """
    reference = {}
    for row in rows:
        if row["backend"] == "torch" and not row.get("skipped"):
            reference.setdefault(_family(row.get("activation")), row)
    for row in rows:
        ref = reference.get(_family(row.get("activation")))
        if ref is None or row.get("skipped"):
            continue
        row["forward_ratio_to_torch"] = ref["forward_ms"] / row["forward_ms"]
        row["backward_ratio_to_torch"] = ref["simplified_ms"] / row["simplified_ms"]


def add_separate_ratios(rows):
    """Fill ``*_ratio_to_separate`` of fused ReLU rows: separate time / fused time."""
    separate = {row["backend"]: row for row in rows
                if row.get("activation") == "relu_separate" and not row.get("skipped")}
    for row in rows:
        ref = separate.get(row["backend"])
        if row.get("activation") != "relu" or ref is None or row.get("skipped"):
            continue
        row["forward_ratio_to_separate"] = ref["forward_ms"] / row["forward_ms"]
        row["backward_ratio_to_separate"] = ref["simplified_ms"] / row["simplified_ms"]


COLUMNS = (
    # header, key, format
    ("backend", "backend", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("act", "activation", "{}"),
    ("threads", "threads", "{}"),
    ("fwd ms", "forward_ms", "{:.3f}"),
    ("simpl ms", "simplified_ms", "{:.3f}"),
    ("staged ms", "staged_ms", "{:.3f}"),
    ("staged/simpl", "speedup_simplified_over_staged", "{:.2f}x"),
    ("fwd limit", "forward_fraction_of_copy_limit", "{:.2f}"),
    ("bwd limit", "backward_fraction_of_copy_limit", "{:.2f}"),
    ("fwd vs torch", "forward_ratio_to_torch", "{:.2f}x"),
    ("bwd vs torch", "backward_ratio_to_torch", "{:.2f}x"),
    ("fwd vs sep", "forward_ratio_to_separate", "{:.2f}x"),
    ("bwd vs sep", "backward_ratio_to_separate", "{:.2f}x"),
)
# Shown only when a row has an activation.
_ACTIVATION_COLUMNS = ("activation", "forward_ratio_to_separate", "backward_ratio_to_separate")
# Left-aligned (label) columns.
_LABEL_COLUMNS = ("backend", "shape", "dtype", "activation", "threads")

LEGEND = (
    "staged/simpl: speedup of the simplified backward over the staged one.\n"
    "fwd/bwd limit: fraction of the copy limit (compulsory bytes, forward 2 and "
    "backward 3 item sizes per element,\n  2-byte items for float16/bfloat16, at the "
    "bandwidth of np.copyto on an array of the row's dtype timed\n  in the same row); "
    "1.00 = copy speed.\n"
    "vs torch: PyTorch time / backend time (above 1: faster than PyTorch). "
    "Times: best of {repeat} or more calls, ms;\n  (+x%): the median of the same calls is "
    "x% above the best; !: unstable (median more than {unstable:.0%} above the best)."
)
LEGEND_ACTIVATION = (
    "act relu: batch norm + ReLU, fused on fastbn backends (activation='relu'), "
    "batch_norm then relu_ on torch;\n  relu sep: fastbn batch norm, then a NumPy ReLU "
    "pass (forward np.maximum, backward dout * (out > 0)).\n"
    "vs sep: relu sep time / fused relu time of the same backend (above 1: fused faster)."
)

_SPREAD_KEYS = {"forward_ms": "forward_median_ms", "simplified_ms": "simplified_median_ms",
                "staged_ms": "staged_median_ms"}


def format_table(rows):
    """The result rows as an aligned text table.

    The activation columns (``act``, ``fwd vs sep``, ``bwd vs sep``) appear
    only when some row has an activation. A row that could not run shows
    ``n/a`` (the reasons: :func:`skip_notes`).

    Returns
    -------
    str
    """
    with_activation = any(row.get("activation") for row in rows)
    columns = [column for column in COLUMNS
               if with_activation or column[1] not in _ACTIVATION_COLUMNS]
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = row.get(key)
            if key == "activation":
                line.append(ACTIVATION_LABELS.get(value, str(value)))
            elif row.get("skipped") and key not in _LABEL_COLUMNS:
                line.append("n/a")
            elif value is None:
                line.append("-")
            elif key == "shape":
                line.append(_format_shape(value))
            elif key in _SPREAD_KEYS and row.get(_SPREAD_KEYS[key]) is not None:
                median = row[_SPREAD_KEYS[key]]
                flag = "!" if key.replace("_ms", "") in row.get("unstable", ()) else ""
                line.append(f"{fmt.format(value)} (+{(median - value) / value:.0%}{flag})")
            else:
                line.append(fmt.format(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for n, line in enumerate(cells):
        parts = [text.ljust(width) if columns[i][1] in _LABEL_COLUMNS else text.rjust(width)
                 for i, (text, width) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def skip_notes(rows):
    """One line per distinct reason why rows are ``n/a``.

    Returns
    -------
    list of str
    """
    by_reason = {}
    for row in rows:
        if row.get("skipped"):
            label = f"{row['backend']} {row['dtype']}"
            if row.get("activation"):
                label += f" {ACTIVATION_LABELS[row['activation']]}"
            labels = by_reason.setdefault(row["skipped"], [])
            if label not in labels:
                labels.append(label)
    return [f"{', '.join(labels)}: {reason}" for reason, labels in by_reason.items()]


def _metadata(args, backends, repeat, threads):
    import fastbn

    info = fastbn.backend_info()
    meta = {
        "fastbn": getattr(fastbn, "__version__", "unknown"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "repeat": repeat,
        "quick": bool(args.quick),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backends": {name: info.get(name, {}) for name in backends if name != "torch"},
    }
    try:
        import numba
        meta["numba"] = numba.__version__
    except ImportError:
        pass
    try:
        import ml_dtypes
        meta["ml_dtypes"] = ml_dtypes.__version__
    except ImportError:
        pass
    if "torch" in backends:
        import torch
        meta["torch"] = torch.__version__
        meta["torch_threads"] = torch.get_num_threads()
    return meta


class _Threads:
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


class _Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total, enabled):
        self.total = total
        self.enabled = enabled
        self.done = 0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc="fastbn bench", unit="case",
                                 file=sys.stderr, leave=False)

    def step(self, label):
        """Announce the case that starts now."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def plot(rows, path):
    """Write a PNG bar chart of the speedups and of the fractions of the limit.

    Three panels share one x axis of cases (shape, dtype and, with several
    thread counts, threads), one bar per backend: the speedup of the
    simplified backward over the staged one, and the fraction of the copy
    limit of the forward and of the simplified backward (a dashed line marks
    1.0, copy speed). Bars are computed from the best times; a black error
    bar reaches down to the same figure computed from the median times, so
    its length shows the spread. ReLU rows are series of their own
    (``numba relu``, ``numba relu sep``); ``n/a`` rows are left out.

    Parameters
    ----------
    rows : list of dict
    path : str
    """
    from matplotlib.figure import Figure

    rows = [row for row in rows if not row.get("skipped")]
    cases = []
    for row in rows:
        case = (tuple(row["shape"]), row["dtype"], row.get("threads_requested"))
        if case not in cases:
            cases.append(case)
    backends = []
    for row in rows:
        if _series(row) not in backends:
            backends.append(_series(row))
    lookup = {(tuple(r["shape"]), r["dtype"], r.get("threads_requested"), _series(r)): r
              for r in rows}
    panels = (
        ("speedup_simplified_over_staged", "simplified over staged backward (x)", None),
        ("forward_fraction_of_copy_limit", "training forward: fraction of copy limit", 1.0),
        ("backward_fraction_of_copy_limit", "simplified backward: fraction of copy limit", 1.0),
    )
    fig = Figure(figsize=(max(8.0, 1.6 * len(cases) + 3), 10), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True)
    width = 0.8 / max(1, len(backends))
    positions = np.arange(len(cases))
    for ax, (key, title, line) in zip(axes, panels):
        for i, backend in enumerate(backends):
            values = []
            lower = []
            for shape, dtype, threads in cases:
                row = lookup.get((shape, dtype, threads, backend))
                value = None if row is None else row.get(key)
                values.append(np.nan if value is None else value)
                at_median = None if value is None else _at_median(row, key)
                lower.append(0.0 if at_median is None else max(0.0, value - at_median))
            ax.bar(positions + (i - (len(backends) - 1) / 2) * width, values, width,
                   label=backend, yerr=[lower, [0.0] * len(lower)], capsize=2,
                   error_kw={"elinewidth": 1})
        if line is not None:
            ax.axhline(line, color="black", linestyle="--", linewidth=1)
        else:
            ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncols=min(len(backends), 5), fontsize="small")
    axes[-1].set_xticks(positions)
    axes[-1].set_xticklabels(
        [f"{_format_shape(s)}\n{d}" + ("" if t is None else f"\n{t} threads")
         for s, d, t in cases], fontsize="small")
    fig.suptitle("fastbn bench (bars: best-of-N; error bars: down to the medians; "
                 "ratios within one run)")
    fig.savefig(path, dpi=100)


def _series(row):
    """Plot label of a row: the backend, and its activation if any."""
    if not row.get("activation"):
        return row["backend"]
    return f"{row['backend']} {ACTIVATION_LABELS[row['activation']]}"


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


def _threads_in_use(backend):
    """The thread count a kernel of ``backend`` started now would use."""
    if backend == "torch":
        import torch
        return int(torch.get_num_threads())
    import fastbn
    return fastbn.backend_info().get(backend, {}).get("threads")


def scaling_table(rows, counts):
    """Speedup from the first to each further thread count, per case and backend.

    Returns
    -------
    str
    """
    by_key = {}
    for row in rows:
        if row.get("skipped"):
            continue
        key = (_series(row), tuple(row["shape"]), row["dtype"])
        by_key.setdefault(key, {})[row["threads_requested"]] = row
    header = ["backend", "shape", "dtype"]
    for count in counts:
        header += [f"fwd ms @{count}", f"bwd ms @{count}"]
    for count in counts[1:]:
        header += [f"fwd x{counts[0]}->{count}", f"bwd x{counts[0]}->{count}"]
    cells = [header]
    for (backend, shape, dtype), per_count in by_key.items():
        line = [backend, _format_shape(shape), dtype]
        for count in counts:
            row = per_count.get(count)
            line += (["-", "-"] if row is None
                     else [f"{row['forward_ms']:.3f}", f"{row['simplified_ms']:.3f}"])
        base = per_count.get(counts[0])
        for count in counts[1:]:
            row = per_count.get(count)
            if row is None or base is None:
                line += ["-", "-"]
            else:
                line += [f"{base['forward_ms'] / row['forward_ms']:.2f}x",
                         f"{base['simplified_ms'] / row['simplified_ms']:.2f}x"]
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(text.ljust(w) if i < 3 else text.rjust(w)
                               for i, (text, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stability_warnings(rows, load_before, load_after):
    """Warnings, pyperf style, for unstable figures and a busy machine.

    Returns
    -------
    list of str
    """
    notes = []
    cores = os.cpu_count() or 1
    load = max(load_before or 0.0, load_after or 0.0)
    if load > cores:
        notes.append(f"the load average ({load:.1f}) exceeded the {cores} cores while "
                        "timing: other processes took CPU time, figures and ratios may be "
                        "off; re-run on a quiet machine")
    for row in rows:
        for kernel in row.get("unstable", ()):
            key = "copy" if kernel == "copy" else kernel
            best = row[f"{key}_ms"]
            median = row[f"{key}_median_ms"]
            notes.append(
                f"{_series(row)} {_format_shape(row['shape'])} {row['dtype']} "
                f"threads={row.get('threads')} {kernel}: unstable, median {median:.3f} ms is "
                f"{(median - best) / best:.0%} above the best {best:.3f} ms over "
                f"{row['calls'][kernel]} calls")
    return notes


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _at_median(row, key):
    """A plotted figure of ``row`` recomputed from the median times (or None)."""
    def median(name):
        return row.get(f"{name}_median_ms")

    if key == "speedup_simplified_over_staged":
        if median("staged") is None or median("simplified") is None:
            return None
        return median("staged") / median("simplified")
    kernel = "forward" if key.startswith("forward") else "simplified"
    if median(kernel) is None or median("copy") is None:
        return None
    bytes_key = "forward" if kernel == "forward" else "backward"
    return fraction_of_copy_limit(bytes_key, median(kernel), median("copy"))


def run(args):
    """Run the benchmark described by parsed ``args``; print the table.

    Parameters
    ----------
    args : argparse.Namespace
        From a parser set up with :func:`add_arguments`. ``--device cuda``
        (or ``cuda`` in ``--backends``) hands over to :func:`fastbn.bench_cuda.run`.

    Returns
    -------
    int
        0 on success (``n/a`` rows included: a backend that cannot run a
        dtype or the fused ReLU says why), 1 when a backend failed while
        timing, 2 for bad options.
    """
    names = [part.strip() for part in (args.backends or "").split(",") if part.strip()]
    if getattr(args, "device", "cpu") == "cuda" or "cuda" in names:
        from . import bench_cuda
        return bench_cuda.run(args)
    try:
        if args.shapes:
            shapes = parse_shapes(args.shapes)
        elif args.quick:
            shapes = list(DEFAULT_SHAPES)
        else:
            shapes = list(DEFAULT_SHAPES + LARGE_SHAPES)
        with warnings.catch_warnings():
            # bench says it itself, once, below
            warnings.simplefilter("ignore", RuntimeWarning)
            backends = resolve_backends(args.backends)
        thread_counts = parse_threads(args.threads)
        if args.repeat is not None and args.repeat < 1:
            raise ValueError("--repeat must be at least 1")
        dtypes = parse_dtypes(args.dtype or ("float32" if args.quick else "both"))
    except ValueError as exc:
        print(f"fastbn bench: error: {exc}", file=sys.stderr)
        return 2
    activations = {"none": [None], "relu": ["relu", "relu_separate"],
                   "both": [None, "relu", "relu_separate"]}[
                       getattr(args, "activation", None) or "none"]
    cases = [(backend, activation) for backend in backends for activation in activations
             if not (backend == "torch" and activation == "relu_separate")]
    repeat = args.repeat or (QUICK_REPEAT if args.quick else REPEAT)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fastbn bench: error: --plot needs matplotlib "
                  "(pip install matplotlib, or the 'bench' extra)", file=sys.stderr)
            return 2
    from . import registry

    for name, reason in registry.source_tree_reasons().items():
        print(f"fastbn bench: warning: backend {name!r} is not timed: {reason}",
              file=sys.stderr)

    rows = []
    failures = 0
    load_before = _loadavg()
    progress = _Progress(len(shapes) * len(dtypes) * len(cases) * len(thread_counts),
                         enabled=not args.no_progress)
    try:
        for count in thread_counts:
            with _Threads(count, "torch" in backends):
                for shape in shapes:
                    for dt in dtypes:
                        try:
                            data = make_data(shape, dt)
                        except DtypeUnavailable:
                            data = None  # every row of this dtype says why
                        group = []
                        for backend, activation in cases:
                            label = f"{backend} {_format_shape(shape)} {dt}"
                            if activation:
                                label += f" {ACTIVATION_LABELS[activation]}"
                            progress.step(label if count is None else f"{label} threads={count}")
                            reason = why_unsupported(backend, dt, activation)
                            try:
                                if reason is not None:
                                    row = skipped_row(backend, shape, dt, activation, reason)
                                else:
                                    row = measure(backend, data, repeat, activation=activation)
                                row["threads"] = _threads_in_use(backend)
                                row["threads_requested"] = count
                                group.append(row)
                            except Exception as exc:  # report, keep the other rows
                                failures += 1
                                print(f"fastbn bench: {label} failed: {exc!r}", file=sys.stderr)
                            progress.advance()
                        add_torch_ratios(group)
                        add_separate_ratios(group)
                        rows.extend(group)
                        del data
                meta = _metadata(args, backends, repeat, count)
    finally:
        progress.close()
    load_after = _loadavg()
    meta["threads"] = thread_counts if len(thread_counts) > 1 else thread_counts[0]
    meta["load_average"] = [load_before, load_after]

    print(format_table(rows))
    print()
    print(LEGEND.format(repeat=repeat, unstable=UNSTABLE))
    if any(row.get("activation") for row in rows):
        print(LEGEND_ACTIVATION)
    skipped = skip_notes(rows)
    if skipped:
        print()
        print("n/a (cannot run here):")
        for text in skipped:
            print(f"  {text}")
    if len(thread_counts) > 1:
        print()
        print("Thread scaling (best times; speedup = time at the first count / time at the "
              "next):")
        print(scaling_table(rows, thread_counts))
    notes = stability_warnings(rows, load_before, load_after)
    if notes:
        print()
        for text in notes:
            print(f"WARNING: {text}")
    meta["warnings"] = notes
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)
            fh.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 1 if failures else 0


def main(argv=None):
    """``python -m fastbn.bench``: the same job without the fastbn front end."""
    import argparse

    parser = argparse.ArgumentParser(prog="fastbn bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
