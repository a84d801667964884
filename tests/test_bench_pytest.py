"""pytest-benchmark timings: forward, staged and simplified backward per backend.

Skipped in the ordinary test run. Run them with::

    pytest tests/test_bench_pytest.py --benchmark-only

(or set ``FASTBN_PYTEST_BENCH=1``). Results are grouped by pass, shape and
dtype, so that each group compares the backends, and the staged and
simplified backward of each backend, side by side. The memory-bound shape
``64x256x56x56`` is added with ``FASTBN_BENCH_PROFILE=slow``. Backends: every
available fastbn CPU backend and PyTorch when installed (the same rows as
``python -m fastbn bench``). Dtypes: float32, float64, float16 and bfloat16
(a backend that cannot run one is skipped with the reason). The ``relu
forward`` / ``relu backward`` groups put the fused batch norm + ReLU, the
separate passes (fastbn, then a NumPy ReLU) and PyTorch's batch_norm +
relu_ side by side. Narrow with ``-k``, e.g. ``-k "float16 and 32x64x56x56"``.
"""
import os

import pytest

pytest.importorskip("pytest_benchmark")

from fastbn.bench import kernels as bench  # noqa: E402
from fastbn.bench.suites.default import DEFAULT_SHAPES, LARGE_SHAPES  # noqa: E402

SHAPES = list(DEFAULT_SHAPES)
if os.environ.get("FASTBN_BENCH_PROFILE", "").lower() == "slow":
    SHAPES += list(LARGE_SHAPES)
DTYPES = list(bench.DTYPES)
BACKENDS = bench.default_backends()


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    """Skip unless ``--benchmark-only`` or ``FASTBN_PYTEST_BENCH`` is given."""
    only = request.config.getoption("benchmark_only", default=False)
    if not (only or os.environ.get("FASTBN_PYTEST_BENCH")):
        pytest.skip("benchmarks: run with --benchmark-only or FASTBN_PYTEST_BENCH=1")


_DATA = {}


def kernels(backend, shape, dtype, activation=None):
    """Kernels on inputs shared by every test of one shape and dtype.

    Skips, with the reason, what the backend cannot run here.
    """
    reason = bench.why_unsupported(backend, dtype, activation)
    if reason is not None:
        pytest.skip(f"{backend} {dtype}: {reason}")
    key = (shape, dtype)
    if key not in _DATA:
        _DATA.clear()  # keep one shape in memory at a time
        _DATA[key] = bench.make_data(shape, dtype)
    return bench.Kernels(backend, _DATA[key], activation=activation)


def label(shape, dtype):
    return f"{'x'.join(map(str, shape))} {dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_train(benchmark, backend, shape, dtype):
    k = kernels(backend, shape, dtype)
    k.forward()
    benchmark.group = f"forward {label(shape, dtype)}"
    benchmark(k.forward)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", ["simplified", "staged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward(benchmark, backend, method, shape, dtype):
    if backend == "torch" and method == "staged":
        pytest.skip("PyTorch has no staged backward")
    k = kernels(backend, shape, dtype)
    func = k.simplified if method == "simplified" else k.staged
    func()
    benchmark.group = f"backward {label(shape, dtype)}"
    benchmark.extra_info["method"] = method
    benchmark(func)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["fused", "separate"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_relu(benchmark, backend, direction, kind, shape, dtype):
    """Batch norm + ReLU: fused (torch: batch_norm + relu_) or as two passes."""
    if backend == "torch" and kind == "separate":
        pytest.skip("PyTorch's batch_norm + relu_ is its 'fused' row (two passes)")
    activation = "relu" if kind == "fused" else "relu_separate"
    k = kernels(backend, shape, dtype, activation=activation)
    func = k.forward if direction == "forward" else k.simplified
    k.forward()
    func()
    benchmark.group = f"relu {direction} {label(shape, dtype)}"
    benchmark.extra_info["kind"] = kind
    benchmark(func)
