"""Shared parameters and helpers of the fastbn asv benchmarks.

The benchmarks use only fastbn's public API (and PyTorch, as a peer row), so
that the same benchmark code can time any commit that asv builds. The
timer, the copy-limit arithmetic, the data and the kernels (PyTorch's
included) come from :mod:`fastbn.bench`, the module of ``python -m fastbn
bench``, so that both time the same code.

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
* ``dtype``: ``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``.
  For the 16-bit dtypes ``x``, ``dout``, ``out`` and ``dx`` are 16-bit and
  ``gamma``, ``beta`` and the running statistics float32 (mixed precision,
  PyTorch's rows too). A dtype that cannot run here (bfloat16 without
  ``ml_dtypes``, a backend without 16-bit kernels) is skipped the same way,
  with the reason.

Profiles
--------
``SHAPES`` are the default profile. The memory-bound ``LARGE_SHAPES`` live
in the ``*Large`` benchmark classes, which are skipped unless the
environment variable ``FASTBN_BENCH_PROFILE`` is ``slow``. With
``FASTBN_BENCH_PROFILE=tiny`` the ordinary classes run on ``TINY_SHAPES``
in float32 only (a check that the suite and the dashboard work, in seconds;
its timings mean little). ``FASTBN_BENCH_PROFILE=quick``, the profile of
``fastbn dashboard --quick``, runs them on the two small ``QUICK_SHAPES`` in
float32 and float64 (every backend, shape kind and float dtype of the
dashboard in a short run; its timings mean little too).
"""
import os

# best_time and fraction_of_copy_limit are imported for bench_batchnorm.py.
from fastbn.bench import (Kernels, best_time, fraction_of_copy_limit,  # noqa: F401
                          make_data, parse_shape, why_unsupported)

DEFAULT_BACKENDS = ["numpy", "numba", "cython", "torch"]
SHAPES = ["256x4096", "128x512x7x7", "64x256x14x14", "32x64x56x56"]
LARGE_SHAPES = ["64x256x56x56"]
TINY_SHAPES = ["4x8x4x4"]
QUICK_SHAPES = ["64x256", "8x32x8x8"]
QUICK_DTYPES = ["float32", "float64"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
PARAM_NAMES = ["backend", "shape", "dtype"]


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
    """The benchmark profile, from ``FASTBN_BENCH_PROFILE``.

    Returns
    -------
    str
        ``"default"``, ``"slow"``, ``"quick"`` or ``"tiny"``.
    """
    return os.environ.get("FASTBN_BENCH_PROFILE", "default").strip().lower()


def shapes():
    """The shape parameter list of the ordinary classes for the profile.

    Returns
    -------
    list of str
        ``TINY_SHAPES`` when ``FASTBN_BENCH_PROFILE=tiny``, ``QUICK_SHAPES``
        when it is ``quick``, else ``SHAPES``.
    """
    return list({"tiny": TINY_SHAPES, "quick": QUICK_SHAPES}.get(profile(), SHAPES))


def dtypes():
    """The dtype parameter list for the profile.

    Returns
    -------
    list of str
        float32 only when ``tiny``, ``QUICK_DTYPES`` when ``quick``, else
        ``DTYPES``.
    """
    return list({"tiny": ["float32"], "quick": QUICK_DTYPES}.get(profile(), DTYPES))


def require_slow_profile():
    """Skip a large-shape benchmark unless ``FASTBN_BENCH_PROFILE=slow``.

    Raises
    ------
    NotImplementedError
        When the slow profile is not selected.
    """
    if profile() != "slow":
        raise NotImplementedError("large shapes run with FASTBN_BENCH_PROFILE=slow")


def require_backend(backend):
    """Skip (the asv way) a backend that cannot run here.

    Parameters
    ----------
    backend : str
        A fastbn backend name or ``"torch"``.

    Raises
    ------
    NotImplementedError
        When PyTorch is not installed, fastbn cannot be imported, or the
        fastbn backend is unknown or not available, with the reason.
    """
    if backend == "torch":
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError("PyTorch is not installed") from exc
        return
    try:
        import fastbn
    except ImportError as exc:
        raise NotImplementedError(f"fastbn cannot be imported: {exc}") from exc
    if backend not in fastbn.available_backends():
        info = fastbn.backend_info().get(backend, {})
        reason = info.get("reason") or "unknown backend"
        raise NotImplementedError(f"backend {backend!r} is not available: {reason}")


def require_support(backend, dtype, activation=None):
    """Skip (the asv way) a dtype or activation that the backend cannot run here.

    Parameters
    ----------
    backend : str
    dtype : str
    activation : {None, "relu", "relu_separate"}, optional

    Raises
    ------
    NotImplementedError
        With the reason of :func:`fastbn.bench.why_unsupported` (bfloat16
        without ``ml_dtypes``, a backend without 16-bit or fused-ReLU kernels).
    """
    reason = why_unsupported(backend, dtype, activation)
    if reason is not None:
        suffix = f" with activation {activation!r}" if activation else ""
        raise NotImplementedError(f"{backend} cannot run {dtype}{suffix}: {reason}")


class Case(Kernels):
    """Filled inputs, preallocated outputs and kernels for one parameter set.

    :class:`fastbn.bench.Kernels` on :func:`fastbn.bench.make_data`, after a
    check that the backend can run here. Every kernel is a method with no
    arguments (``backward`` takes an optional method) that writes into the
    preallocated outputs (``out=``), so that a timing measures the kernel
    and not the allocator.

    Parameters
    ----------
    backend : str
        A fastbn backend name or ``"torch"``.
    shape : str or tuple of int
        ``(N, C, ...)``; the channel axis is 1.
    dtype : str
        One of :data:`DTYPES`.
    seed : int, optional
    activation : {None, "relu", "relu_separate"}, optional
        See :class:`fastbn.bench.Kernels`: ``"relu"`` is the fused batch
        norm + ReLU (PyTorch: ``batch_norm`` then ``relu_``),
        ``"relu_separate"`` fastbn's batch norm then a NumPy ReLU pass.

    Raises
    ------
    NotImplementedError
        When the backend cannot run here, or cannot run this dtype or
        activation.
    """

    def __init__(self, backend, shape, dtype, seed=1234, activation=None):
        require_backend(backend)
        require_support(backend, dtype, activation)
        shape = parse_shape(shape) if isinstance(shape, str) else tuple(shape)
        super().__init__(backend, make_data(shape, dtype, seed), activation=activation)

    def forward_train(self):
        """Training forward into ``self.out``; keeps the cache.

        Returns
        -------
        object
            The cache.
        """
        return self.forward()
