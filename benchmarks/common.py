"""Parameters and helpers of the fastbn asv benchmarks.

The benchmarks use fastbn's public API only (and PyTorch, as a peer row).
The data and kernels come from :mod:`fastbn.bench.kernels` and the
``track_*`` ratios are timed by :mod:`fastbn.bench.timing`, the code of
``fastbn bench``, so that both time the same thing the same way.

Every class is parametrized over ``backend x shape x dtype``:

* ``backend``: the fastbn CPU backends and ``"torch"`` (PyTorch CPU);
  replace the list with ``FASTBN_BENCH_BACKENDS=numba,cython``. A backend
  that cannot run here, or cannot run a dtype, is skipped: ``Case`` raises
  ``NotImplementedError`` in ``setup``.
* ``shape`` (channel axis 1) and ``dtype`` by profile
  (``FASTBN_BENCH_PROFILE``):

  ========= ============================================ ===================
  profile   shapes                                       dtypes
  ========= ============================================ ===================
  default   ``DEFAULT_SHAPES`` (two kinds of shape)      float32
  slow      ``SHAPES`` + the memory-bound ``64x256x56x56`` all four
  quick     two small shapes (``fastbn dashboard --quick``) float32, float64
  tiny      ``4x8x4x4`` (a check in seconds)             float32
  ========= ============================================ ===================
"""
import os

from fastbn.bench import timing
from fastbn.bench.kernels import Kernels, make_data, parse_shape, why_unsupported

DEFAULT_BACKENDS = ["numpy", "numba", "cython", "torch"]
DEFAULT_SHAPES = ["128x512x7x7", "32x64x56x56"]
SHAPES = ["256x4096", "128x512x7x7", "64x256x14x14", "32x64x56x56", "64x256x56x56"]
PROFILES = {
    "default": (DEFAULT_SHAPES, ["float32"]),
    "slow": (SHAPES, ["float32", "float64", "float16", "bfloat16"]),
    "quick": (["64x256", "8x32x8x8"], ["float32", "float64"]),
    "tiny": (["4x8x4x4"], ["float32"]),
}
PARAM_NAMES = ["backend", "shape", "dtype"]


def profile():
    """``FASTBN_BENCH_PROFILE`` (default ``"default"``)."""
    name = os.environ.get("FASTBN_BENCH_PROFILE", "default").strip().lower()
    return name if name in PROFILES else "default"


def params():
    """The ``[backends, shapes, dtypes]`` grid of the profile."""
    names = os.environ.get("FASTBN_BENCH_BACKENDS", "")
    backends = [name.strip() for name in names.split(",") if name.strip()]
    shapes, dtypes = PROFILES[profile()]
    return [backends or list(DEFAULT_BACKENDS), list(shapes), list(dtypes)]


def require_backend(backend):
    """Raise ``NotImplementedError`` (asv: skipped) for a backend that cannot run here."""
    if backend == "torch":
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError("PyTorch is not installed") from exc
        return
    import fastbn
    if backend not in fastbn.available_backends():
        reason = fastbn.backend_info().get(backend, {}).get("reason") or "unknown backend"
        raise NotImplementedError(f"backend {backend!r} is not available: {reason}")


class Case(Kernels):
    """:class:`fastbn.bench.kernels.Kernels` for one parameter set, or a skip.

    Raises
    ------
    NotImplementedError
        When the backend cannot run here, or cannot run this dtype or activation.
    """

    def __init__(self, backend, shape, dtype, seed=1234, activation=None):
        require_backend(backend)
        reason = why_unsupported(backend, dtype, activation)
        if reason is not None:
            raise NotImplementedError(f"{backend} cannot run {dtype} "
                                      f"{activation or ''}: {reason}")
        super().__init__(backend, make_data(parse_shape(shape), dtype, seed),
                         activation=activation)


def ratio(numerator, denominator, rounds):
    """Median time of ``numerator`` / that of ``denominator``, timed in interleaved rounds."""
    got = timing.interleaved({"a": numerator, "b": denominator}, rounds, max_rounds=rounds)
    return got.ratio("a", "b", "median")


def fraction_of_copy_limit(case, kernel, function, rounds):
    """The kernel's fraction of the copy limit, copy and kernel in the same rounds."""
    got = timing.interleaved({"kernel": function}, rounds, copy_of=case.x, max_rounds=rounds)
    return timing.fraction_of_copy_limit(kernel, got["kernel"].median, got[timing.COPY].median)
