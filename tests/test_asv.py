"""The asv suite and the ``bench`` main job stay runnable.

Every asv benchmark body (``setup``, ``time_*``, ``peakmem_*``, ``track_*``)
runs once on tiny shapes, for every backend parameter; a backend that cannot
run here is skipped the way asv skips it (``NotImplementedError`` in
``setup``). The benchmark modules are imported by path from the repository's
``benchmarks/`` folder. The default grid is counted, so that it cannot
grow past the time bar of ``asv run --python=same --quick`` unnoticed.
"""
import importlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn.bench import kernels as bench
from fastbn.bench import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
PACKAGE = "_fastbn_asv_benchmarks"
TINY_SHAPES = ["6x3", "4x3x2x5"]
PREFIXES = ("time_", "timeraw_", "peakmem_", "mem_", "track_")


def load_suite():
    """Import ``benchmarks/`` as a package under a private name.

    Returns
    -------
    list of module
        Every benchmark module (not ``__init__``), sorted by name.
    """
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, BENCH_DIR / "__init__.py",
            submodule_search_locations=[str(BENCH_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return [importlib.import_module(f"{PACKAGE}.{path.stem}")
            for path in sorted(BENCH_DIR.glob("*.py")) if path.stem != "__init__"]


def benchmark_classes():
    """``(name, class)`` of every class that asv would collect."""
    found = []
    for module in load_suite():
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not isinstance(obj, type):
                continue
            if obj.__module__ != module.__name__:
                continue
            if any(attr.startswith(PREFIXES) for attr in dir(obj)):
                found.append((f"{module.__name__.split('.')[-1]}.{name}", obj))
    return found


def benchmark_cases():
    """One pytest parameter per (class, benchmark method, backend)."""
    cases = []
    for name, cls in benchmark_classes():
        for method in sorted(attr for attr in dir(cls) if attr.startswith(PREFIXES)):
            for backend in cls.params[0]:
                cases.append(pytest.param(cls, method, backend,
                                          id=f"{name}.{method}-{backend}"))
    return cases


def test_suite_is_found():
    names = [name for name, _ in benchmark_classes()]
    assert names, "no asv benchmark classes found"
    methods = {attr for _, cls in benchmark_classes() for attr in dir(cls)}
    for required in ("time_forward_train", "time_forward_eval", "time_backward_simplified",
                     "time_backward_staged", "peakmem_backward_staged",
                     "track_speedup_simplified_over_staged",
                     "track_fraction_of_copy_limit", "time_forward_relu", "time_backward_relu",
                     "time_forward_relu_separate", "time_backward_relu_separate",
                     "track_forward_speedup_fused_over_separate",
                     "track_backward_speedup_fused_over_separate"):
        assert required in methods


@pytest.mark.parametrize("name_cls", benchmark_classes(), ids=lambda item: item[0])
def test_params_and_units(name_cls):
    _, cls = name_cls
    assert len(cls.params) == len(cls.param_names) == 3
    assert cls.param_names == ["backend", "shape", "dtype"]
    if not os.environ.get("FASTBN_BENCH_BACKENDS"):
        assert {"numpy", "numba", "cython", "torch"} <= set(cls.params[0])
    common = importlib.import_module(f"{PACKAGE}.common")
    assert cls.params[1:] == list(common.PROFILES[common.profile()])
    for shape in cls.params[1]:
        assert len(shape.split("x")) >= 2
    for attr in dir(cls):
        if attr.startswith("track_"):
            assert getattr(cls, attr).unit in ("x", "fraction")


# Processes of `asv run --python=same --quick` in the default profile: one
# per benchmark and parameter set, 16 x 8 = 128; the time measured on a
# 2-core machine is in benchmarks/README.md, and the bar is 10 minutes.
DEFAULT_GRID_LIMIT = 128


def test_default_grid_stays_small(monkeypatch):
    """Count the default grid's parameter sets; the slow profile holds the full grid."""
    common = importlib.import_module(f"{PACKAGE}.common")
    monkeypatch.delenv("FASTBN_BENCH_PROFILE", raising=False)
    monkeypatch.delenv("FASTBN_BENCH_BACKENDS", raising=False)
    backends, shapes, dtypes = common.params()
    per_benchmark = len(backends) * len(shapes) * len(dtypes)
    methods = [attr for _, cls in benchmark_classes() for attr in dir(cls)
               if attr.startswith(PREFIXES)]
    assert len(methods) * per_benchmark <= DEFAULT_GRID_LIMIT
    staged = dict(benchmark_classes())["bench_batchnorm.BackwardStaged"]
    assert "track_speedup_simplified_over_staged" in dir(staged)
    assert {"numpy", "numba", "cython"} <= set(backends)
    monkeypatch.setenv("FASTBN_BENCH_PROFILE", "slow")
    _, slow_shapes, slow_dtypes = common.params()
    assert set(shapes) < set(slow_shapes) and "64x256x56x56" in slow_shapes
    assert set(slow_dtypes) == {"float32", "float64", "float16", "bfloat16"}


@pytest.mark.parametrize("cls, method, backend", benchmark_cases())
def test_benchmark_runs_once(cls, method, backend, monkeypatch):
    """setup + the benchmark body, on tiny shapes, both dtypes."""
    monkeypatch.setenv("FASTBN_BENCH_PROFILE", "slow")
    ran = 0
    reasons = []
    for shape in TINY_SHAPES:
        for dtype in cls.params[2]:
            instance = cls()
            instance.interleaved_rounds = 1
            try:
                instance.setup(backend, shape, dtype)
            except NotImplementedError as exc:
                reasons.append(str(exc))
                continue
            result = getattr(instance, method)(backend, shape, dtype)
            if method.startswith("track_"):
                assert isinstance(result, float)
                assert math.isfinite(result) and result > 0
            if hasattr(instance, "teardown"):
                instance.teardown(backend, shape, dtype)
            ran += 1
    if not ran:
        pytest.skip("; ".join(sorted(set(reasons))))


def test_numpy_and_torch_are_not_skipped():
    """The reference backend always runs; torch runs when installed."""
    common = importlib.import_module(f"{PACKAGE}.common")
    common.Case("numpy", "4x3x2x2", "float32")
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(NotImplementedError):
            common.Case("torch", "4x3x2x2", "float32")
    else:
        case = common.Case("torch", "4x3x2x2", "float64")
        case.forward()
        case.backward("simplified")
        ref = common.Case("numpy", "4x3x2x2", "float64")
        ref.forward()
        ref.backward("simplified")
        np.testing.assert_allclose(case.out, ref.out, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(case.dx, ref.dx, rtol=1e-8, atol=1e-10)


def test_suite_shares_the_bench_helpers():
    """The asv suite times with fastbn.bench's code, not a copy of it."""
    common = importlib.import_module(f"{PACKAGE}.common")
    assert common.timing is timing
    assert issubclass(common.Case, bench.Kernels)
    case = common.Case("numpy", "4x3x2x2", "float64", seed=7)
    data = bench.make_data((4, 3, 2, 2), "float64", seed=7)
    np.testing.assert_array_equal(case.x, data["x"])
    assert timing.fraction_of_copy_limit("forward", 2.0, 1.0) == pytest.approx(0.5)
    assert timing.fraction_of_copy_limit("backward", 3.0, 2.0) == pytest.approx(1.0)


def test_parse_shape():
    assert bench.parse_shape(" 32X64x5 ") == (32, 64, 5)
    for bad in ("7", "4xq", "0x3"):
        with pytest.raises(ValueError, match="bad shape"):
            bench.parse_shape(bad)
    assert bench.parse_shapes("6x5,,8x3x4") == [(6, 5), (8, 3, 4)]
    with pytest.raises(ValueError, match="no shapes"):
        bench.parse_shapes(" , ")


def test_asv_conf():
    with open(ROOT / "asv.conf.json", encoding="utf-8") as fh:
        conf = json.load(fh)
    assert conf["benchmark_dir"] == "benchmarks"
    for key in ("results_dir", "html_dir", "env_dir"):
        assert conf[key].startswith(".asv/")
    assert conf["launch_method"] == "forkserver"
    for req in ("numpy", "numba", "threadpoolctl", "meson-python", "meson", "ninja", "cython"):
        assert req in conf["matrix"]["req"]


def test_bench_imports_no_optional_dependency():
    """torch, matplotlib and tqdm load only when used."""
    code = ("import sys, fastbn; before = set(sys.modules); import fastbn.bench; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'tqdm') "
            "if m in set(sys.modules) - before))")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(pathlib.Path(fastbn.__file__).resolve().parents[1])]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


# 16-bit data and the fused ReLU ---------------------------------------------

def test_half_data_and_copy_reference():
    """16-bit x/dout/out/dx, float32 weights and running stats, a 16-bit copy."""
    pytest.importorskip("ml_dtypes")
    for name in ("float16", "bfloat16"):
        data = bench.make_data((4, 3, 5), name, seed=3)
        assert bench.dtype_name(data["x"].dtype) == name
        assert data["x"].dtype.itemsize == data["dout"].dtype.itemsize == 2
        assert data["gamma"].dtype == data["beta"].dtype == np.float32
        k = bench.Kernels("numpy", data)
        for array in (k.out, k.dx, k.copy_dst, k.copy_src):
            assert array.dtype == data["x"].dtype
        assert k.running_mean.dtype == k.running_var.dtype == np.float32
        k.copy()
        np.testing.assert_array_equal(k.copy_dst.view(np.uint16), data["x"].view(np.uint16))


def test_fraction_counts_the_bytes_of_the_item_size():
    # forward: 2 x 2 bytes per element for float16; a float16 copy moves 2 x 2
    assert timing.fraction_of_copy_limit("forward", 1.0, 1.0, itemsize=2) == pytest.approx(1.0)
    # the same float16 forward held to a float32 copy's bandwidth: half the time
    assert timing.fraction_of_copy_limit("forward", 1.0, 1.0, itemsize=2,
                                        copy_itemsize=4) == pytest.approx(0.5)
    # simplified backward: 3 x 2 bytes per element
    assert timing.fraction_of_copy_limit("backward", 1.5, 1.0, itemsize=2) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_peer_matches_numpy(dtype):
    """PyTorch's mixed-precision rows compute the same batch norm as fastbn's."""
    pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    common = importlib.import_module(f"{PACKAGE}.common")
    try:
        ref = common.Case("numpy", "8x3x5", dtype)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    peer = common.Case("torch", "8x3x5", dtype)
    for case in (ref, peer):
        case.forward()
        case.backward("simplified")
    tol = 1e-2 if dtype == "float16" else 6e-2   # a few units in the last place
    np.testing.assert_allclose(peer.out.astype(np.float32), ref.out.astype(np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(peer.dx.astype(np.float32), ref.dx.astype(np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(peer.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)


def _numpy_relu_support():
    reason = bench.why_unsupported("numpy", "float64", "relu")
    if reason is not None:
        pytest.skip(f"numpy backend without the fused ReLU: {reason}")


def test_relu_rows_compute_the_same_thing():
    """Fused, separate and PyTorch's batch_norm + relu_ give one result."""
    _numpy_relu_support()
    data = bench.make_data((16, 3, 5), "float64", seed=11)
    fused = bench.Kernels("numpy", data, activation="relu")
    separate = bench.Kernels("numpy", data, activation="relu_separate")
    plain = bench.Kernels("numpy", data)
    for k in (fused, separate, plain):
        k.forward()
        k.backward("simplified")
    assert (fused.out == 0).any() and (fused.out > 0).any()
    np.testing.assert_allclose(fused.out, np.maximum(plain.out, 0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(separate.out, fused.out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(separate.dx, fused.dx, rtol=1e-10, atol=1e-12)
    assert np.abs(fused.dx - plain.dx).max() > 1e-3, "the mask changes the gradient"
    staged = bench.Kernels("numpy", data, activation="relu")
    staged.forward()
    staged.backward("staged")
    np.testing.assert_allclose(staged.dx, fused.dx, rtol=1e-9, atol=1e-12)
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    peer = bench.Kernels("torch", data, activation="relu")
    peer.forward()
    peer.backward("simplified")
    np.testing.assert_allclose(peer.out, fused.out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(peer.dx, fused.dx, rtol=1e-8, atol=1e-10)


def test_relu_separate_is_for_fastbn_only():
    data = bench.make_data((4, 3), "float32")
    with pytest.raises(ValueError, match="relu_separate"):
        bench.Kernels("torch", data, activation="relu_separate")
    with pytest.raises(ValueError, match="unknown activation"):
        bench.Kernels("numpy", data, activation="gelu")


def test_bfloat16_without_ml_dtypes_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    monkeypatch.setattr(bench, "_UNSUPPORTED", {})
    common = importlib.import_module(f"{PACKAGE}.common")
    with pytest.raises(NotImplementedError, match="ml_dtypes"):
        common.Case("numpy", "4x3x2", "bfloat16")
    with pytest.raises(bench.DtypeUnavailable, match="ml_dtypes"):
        bench.make_data((4, 3), "bfloat16")
    assert "ml_dtypes" in bench.why_unsupported("torch", "bfloat16")


def test_unsupported_backend_is_skipped_with_its_reason(monkeypatch):
    """A backend whose kernels reject a dtype: the asv setup skips, saying why."""
    original = bench.Kernels.forward

    def forward(self):
        if self.backend == "numpy" and self.dtype == np.float16:
            raise TypeError("no 16-bit kernels in this backend")
        return original(self)

    monkeypatch.setattr(bench.Kernels, "forward", forward)
    monkeypatch.setattr(bench, "_UNSUPPORTED", {})
    suite = importlib.import_module(f"{PACKAGE}.bench_batchnorm")
    with pytest.raises(NotImplementedError, match="no 16-bit kernels"):
        suite.Forward().setup("numpy", "4x3x2", "float16")
    suite.Forward().setup("numpy", "4x3x2", "float32")
