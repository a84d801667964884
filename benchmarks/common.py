"""Shared parameters and helpers of the fastbn asv benchmarks.

The benchmarks use only fastbn's public API (and PyTorch, as a peer row), so
that the same benchmark code can time any commit that asv builds.

Parameters
----------
Every benchmark class is parametrized over ``backend x shape x dtype``:

* ``backend``: the fastbn CPU backends plus ``"torch"`` (PyTorch CPU through
  ``torch.native_batch_norm``), a parameter of the benchmarks only, never of
  the package. A backend that cannot run here is skipped: ``Case`` raises
  ``NotImplementedError`` from the benchmark's ``setup``. The list can be
  replaced with the environment variable ``FASTBN_BENCH_BACKENDS`` (comma
  separated, e.g. ``numba,cython``).
* ``shape``: strings such as ``"32x64x56x56"``, parsed by ``parse_shape``;
  the channel axis is axis 1.
* ``dtype``: ``"float32"`` or ``"float64"``.

Profiles
--------
``SHAPES`` are the default profile. The memory-bound ``LARGE_SHAPES`` live
in the ``*Large`` benchmark classes, which are skipped unless the
environment variable ``FASTBN_BENCH_PROFILE`` is ``slow``.
"""
import gc
import os
import time

import numpy as np

DEFAULT_BACKENDS = ["numpy", "numba", "cython", "torch"]
SHAPES = ["256x4096", "128x512x7x7", "64x256x14x14", "32x64x56x56"]
LARGE_SHAPES = ["64x256x56x56"]
DTYPES = ["float32", "float64"]
PARAM_NAMES = ["backend", "shape", "dtype"]

EPS = 1e-5
MOMENTUM = 0.1

# Compulsory memory traffic per element of x, in item sizes (DESIGN.md,
# performance model). The limit time of a kernel is its bytes divided by the
# copy bandwidth, i.e. copy time * BYTES_PER_ELEMENT[kernel] / 2.
BYTES_PER_ELEMENT = {"copy": 2, "forward": 2, "backward": 3}


def backends():
    """The backend parameter list, from ``FASTBN_BENCH_BACKENDS`` if set.

    Returns
    -------
    list of str
    """
    names = os.environ.get("FASTBN_BENCH_BACKENDS", "")
    names = [name.strip() for name in names.split(",") if name.strip()]
    return names or list(DEFAULT_BACKENDS)


def profile():
    """The benchmark profile, ``"default"`` or ``"slow"``.

    Returns
    -------
    str
    """
    return os.environ.get("FASTBN_BENCH_PROFILE", "default").strip().lower()


def require_slow_profile():
    """Skip a large-shape benchmark unless ``FASTBN_BENCH_PROFILE=slow``.

    Raises
    ------
    NotImplementedError
        When the slow profile is not selected.
    """
    if profile() != "slow":
        raise NotImplementedError("large shapes run with FASTBN_BENCH_PROFILE=slow")


def parse_shape(text):
    """``"32x64x56x56"`` -> ``(32, 64, 56, 56)``.

    Parameters
    ----------
    text : str

    Returns
    -------
    tuple of int
    """
    return tuple(int(part) for part in text.lower().split("x"))


def best_time(func, repeat):
    """Best (minimum) wall time of ``repeat`` calls of ``func``, in seconds.

    The garbage collector is off while timing, as in :mod:`timeit`. Warm up
    ``func`` before calling this.

    Parameters
    ----------
    func : callable
        Called with no arguments.
    repeat : int
        Number of timed calls, at least 1.

    Returns
    -------
    float
    """
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


def fraction_of_copy_limit(kernel, seconds, copy_seconds):
    """Share of the memory-bound limit that a kernel reaches.

    Parameters
    ----------
    kernel : {"forward", "backward"}
        ``"forward"`` moves 2 item sizes per element, the simplified
        ``"backward"`` 3.
    seconds : float
        Time of the kernel.
    copy_seconds : float
        Time of ``np.copyto`` of an array of the same size and dtype
        (2 item sizes per element), measured in the same run.

    Returns
    -------
    float
        Limit time / kernel time; 1.0 means the kernel runs at copy speed.
    """
    limit = copy_seconds * BYTES_PER_ELEMENT[kernel] / BYTES_PER_ELEMENT["copy"]
    return limit / seconds


def _require(backend):
    """Import what ``backend`` needs, or raise ``NotImplementedError``."""
    if backend == "torch":
        try:
            import torch
        except ImportError as exc:
            raise NotImplementedError("PyTorch is not installed") from exc
        return torch
    try:
        import fastbn
    except ImportError as exc:
        raise NotImplementedError(f"fastbn cannot be imported: {exc}") from exc
    if backend not in fastbn.available_backends():
        info = fastbn.backend_info().get(backend, {})
        reason = info.get("reason") or "unknown backend"
        raise NotImplementedError(f"backend {backend!r} is not available: {reason}")
    return fastbn


def _no_sync():
    pass


class Case:
    """Filled inputs, preallocated outputs and kernels for one parameter set.

    Every kernel is a method with no arguments that writes into the
    preallocated outputs (``out=``), so that a timing measures the kernel
    and not the allocator.

    Parameters
    ----------
    backend : str
        A fastbn backend name or ``"torch"``.
    shape : str or tuple of int
        ``(N, C, ...)``; the channel axis is 1.
    dtype : str
        ``"float32"`` or ``"float64"``.
    seed : int, optional

    Raises
    ------
    NotImplementedError
        When the backend cannot run here.
    """

    def __init__(self, backend, shape, dtype, seed=1234):
        self.backend = backend
        self.shape = parse_shape(shape) if isinstance(shape, str) else tuple(shape)
        self.dtype = np.dtype(dtype)
        self._lib = _require(backend)

        rng = np.random.default_rng(seed)
        channels = self.shape[1]
        self.x = rng.standard_normal(self.shape, dtype=self.dtype)
        self.dout = rng.standard_normal(self.shape, dtype=self.dtype)
        self.gamma = rng.uniform(0.5, 1.5, channels).astype(self.dtype)
        self.beta = rng.uniform(-0.5, 0.5, channels).astype(self.dtype)
        self.running_mean = np.zeros(channels, dtype=self.dtype)
        self.running_var = np.ones(channels, dtype=self.dtype)
        # np.full writes every page now (np.zeros would map them lazily).
        self.out = np.full(self.shape, 0.0, dtype=self.dtype)
        self.dx = np.full(self.shape, 0.0, dtype=self.dtype)
        self.copy_dst = np.full(self.shape, 0.0, dtype=self.dtype)
        self.copy_src = self.x
        self.cache = None
        self._sync = _no_sync
        if backend == "torch":
            self._torch_setup()
        elif self._lib.backend_info()[backend].get("device", "cpu") != "cpu":
            self._device_setup()

    # fastbn ---------------------------------------------------------------

    def forward_train(self):
        """Training forward into ``self.out``; keeps the cache."""
        if self.backend == "torch":
            return self._torch_forward(training=True)
        _, self.cache = self._lib.batchnorm_forward(
            self.x, self.gamma, self.beta, training=True,
            running_mean=self.running_mean, running_var=self.running_var,
            momentum=MOMENTUM, eps=EPS, backend=self.backend, out=self.out)
        self._sync()
        return self.cache

    def forward_eval(self):
        """Evaluation forward (running statistics) into ``self.out``."""
        if self.backend == "torch":
            return self._torch_forward(training=False)
        result = self._lib.batchnorm_forward(
            self.x, self.gamma, self.beta, training=False,
            running_mean=self.running_mean, running_var=self.running_var,
            eps=EPS, backend=self.backend, out=self.out)
        self._sync()
        return result

    def backward(self, method="simplified"):
        """Training backward into ``self.dx``.

        Parameters
        ----------
        method : {"simplified", "staged"}

        Raises
        ------
        NotImplementedError
            For ``"staged"`` on PyTorch, which has no staged backward.
        """
        if self.cache is None:
            self.forward_train()
        if self.backend == "torch":
            if method != "simplified":
                raise NotImplementedError("PyTorch has no staged backward")
            return self._torch_backward()
        result = self._lib.batchnorm_backward(
            self.dout, self.cache, method=method, out=self.dx)
        self._sync()
        return result

    def copy(self):
        """``np.copyto`` of ``x``: the bandwidth reference (2 item sizes).

        On a device backend, a device-to-device copy of the same bytes.
        """
        if isinstance(self.copy_dst, np.ndarray):
            np.copyto(self.copy_dst, self.copy_src)
        else:
            self.copy_dst.copy_to_device(self.copy_src)
            self._sync()

    # Device backends (CUDA) -----------------------------------------------

    def _device_setup(self):
        """Move every array to the device; synchronize after each kernel."""
        from numba import cuda

        for name in ("x", "dout", "gamma", "beta", "running_mean", "running_var",
                     "out", "dx", "copy_dst"):
            setattr(self, name, cuda.to_device(getattr(self, name)))
        self.copy_src = self.x
        self._sync = cuda.synchronize

    # PyTorch --------------------------------------------------------------

    def _torch_setup(self):
        """Tensors that share memory with the NumPy arrays."""
        torch = self._lib
        self._t = {name: torch.from_numpy(getattr(self, name)) for name in (
            "x", "dout", "gamma", "beta", "running_mean", "running_var",
            "out", "dx")}
        self._t["dgamma"] = torch.empty_like(self._t["gamma"])
        self._t["dbeta"] = torch.empty_like(self._t["beta"])
        t = self._t
        _, save_mean, save_invstd = torch.native_batch_norm(
            t["x"], t["gamma"], t["beta"], None, None, True, MOMENTUM, EPS)
        t["save_mean"] = save_mean
        t["save_invstd"] = save_invstd
        # Evaluation mode returns empty statistics: keep separate buffers so
        # that an evaluation forward never resizes the training ones.
        _, eval_mean, eval_invstd = torch.native_batch_norm(
            t["x"], t["gamma"], t["beta"], t["running_mean"].clone(),
            t["running_var"].clone(), False, MOMENTUM, EPS)
        t["eval_save_mean"] = eval_mean
        t["eval_save_invstd"] = eval_invstd

    def _torch_forward(self, training):
        torch = self._lib
        t = self._t
        prefix = "" if training else "eval_"
        result = torch.native_batch_norm(
            t["x"], t["gamma"], t["beta"], t["running_mean"], t["running_var"],
            training, MOMENTUM, EPS,
            out=(t["out"], t[prefix + "save_mean"], t[prefix + "save_invstd"]))
        if training:
            self.cache = result
        return result

    def _torch_backward(self):
        torch = self._lib
        t = self._t
        return torch.ops.aten.native_batch_norm_backward.out(
            t["dout"], t["x"], t["gamma"], t["running_mean"], t["running_var"],
            t["save_mean"], t["save_invstd"], True, EPS, [True, True, True],
            out0=t["dx"], out1=t["dgamma"], out2=t["dbeta"])
