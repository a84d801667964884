"""The asv suite and the ``bench`` main job stay runnable.

Every asv benchmark body (``setup``, ``time_*``, ``peakmem_*``, ``track_*``)
runs once on tiny shapes, for every backend parameter; a backend that cannot
run here is skipped the way asv skips it (``NotImplementedError`` in
``setup``). The benchmark modules are imported by path from the repository's
``benchmarks/`` folder. Then ``fastbn.bench.run`` runs on a tiny shape.
"""
import argparse
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
from fastbn import bench

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
                     "time_backward_staged", "peakmem_forward", "peakmem_backward",
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
    assert set(common.DTYPES) == {"float32", "float64", "float16", "bfloat16"}
    if cls.__name__.endswith("Large"):
        assert cls.params[2] == common.DTYPES
    else:
        assert cls.params[2] == common.dtypes()
    for shape in cls.params[1]:
        assert len(shape.split("x")) >= 2
    for attr in dir(cls):
        if attr.startswith("track_"):
            assert getattr(cls, attr).unit in ("x", "fraction")


def test_default_and_slow_profiles():
    common = importlib.import_module(f"{PACKAGE}.common")
    for shape in ("256x4096", "128x512x7x7", "64x256x14x14", "32x64x56x56"):
        assert shape in common.SHAPES
    assert common.LARGE_SHAPES == ["64x256x56x56"]
    assert "64x256x56x56" not in common.SHAPES


def test_large_classes_skip_without_slow_profile(monkeypatch):
    monkeypatch.delenv("FASTBN_BENCH_PROFILE", raising=False)
    large = [cls for name, cls in benchmark_classes() if name.endswith("Large")]
    assert large
    for cls in large:
        with pytest.raises(NotImplementedError):
            cls().setup("numpy", "4x3x2x2", "float32")


@pytest.mark.parametrize("cls, method, backend", benchmark_cases())
def test_benchmark_runs_once(cls, method, backend, monkeypatch):
    """setup + the benchmark body, on tiny shapes, both dtypes."""
    monkeypatch.setenv("FASTBN_BENCH_PROFILE", "slow")
    ran = 0
    reasons = []
    for shape in TINY_SHAPES:
        for dtype in cls.params[2]:
            instance = cls()
            instance.n_repeat = 1
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
        case.forward_train()
        case.backward("simplified")
        ref = common.Case("numpy", "4x3x2x2", "float64")
        ref.forward_train()
        ref.backward("simplified")
        np.testing.assert_allclose(case.out, ref.out, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(case.dx, ref.dx, rtol=1e-8, atol=1e-10)


def test_suite_shares_the_bench_helpers():
    """The asv suite times with fastbn.bench's code, not a copy of it."""
    common = importlib.import_module(f"{PACKAGE}.common")
    assert common.best_time is bench.best_time
    assert common.fraction_of_copy_limit is bench.fraction_of_copy_limit
    assert issubclass(common.Case, bench.Kernels)
    case = common.Case("numpy", "4x3x2x2", "float64", seed=7)
    data = bench.make_data((4, 3, 2, 2), "float64", seed=7)
    np.testing.assert_array_equal(case.x, data["x"])
    assert bench.fraction_of_copy_limit("forward", 2.0, 1.0) == pytest.approx(0.5)
    assert bench.fraction_of_copy_limit("backward", 3.0, 2.0) == pytest.approx(1.0)


def test_best_time_warmup():
    calls = []
    bench.best_time(lambda: calls.append(1), 3)
    assert len(calls) == 4
    calls.clear()
    bench.best_time(lambda: calls.append(1), 3, warmup=False)
    assert len(calls) == 3


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
    for req in ("numpy", "numba", "threadpoolctl", "meson-python", "meson", "ninja", "cython"):
        assert req in conf["matrix"]["req"]


# The bench main job ---------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


TINY_ARGS = ["--shapes", "8x3x4,6x5", "--dtype", "float32", "--repeat", "1", "--no-progress"]


def test_bench_run_prints_table(capsys, tmp_path):
    path = tmp_path / "bench.json"
    status = bench.run(parse(TINY_ARGS + ["--json", str(path)]))
    out = capsys.readouterr().out
    assert status == 0
    backends = bench.default_backends()
    assert "cuda" not in backends
    assert set(fastbn.available_backends()) - {"cuda"} <= set(backends)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["backend", "shape", "dtype"]
    for backend in backends:
        assert any(line.startswith(backend + " ") and "8x3x4" in line for line in lines)

    data = json.loads(path.read_text())
    assert {"meta", "results"} <= set(data)
    assert len(data["results"]) == 2 * len(backends)
    keys = {"backend", "shape", "dtype", "copy_ms", "forward_ms", "simplified_ms",
            "staged_ms", "speedup_simplified_over_staged",
            "forward_fraction_of_copy_limit", "backward_fraction_of_copy_limit",
            "forward_ratio_to_torch", "backward_ratio_to_torch"}
    for row in data["results"]:
        assert keys <= set(row)
        assert row["dtype"] == "float32"
        assert row["forward_ms"] > 0 and row["simplified_ms"] > 0
        if row["backend"] == "torch":
            assert row["staged_ms"] is None
            assert row["forward_ratio_to_torch"] == pytest.approx(1.0)
        else:
            assert row["speedup_simplified_over_staged"] > 0


def test_bench_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    status = bench.run(parse(TINY_ARGS + ["--backends", "numpy", "--plot", str(path)]))
    assert status == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status = bench.run(parse(TINY_ARGS + ["--plot", str(tmp_path / "x.png")]))
    assert status == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bench_text_progress_without_tqdm(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    argv = [a for a in TINY_ARGS if a != "--no-progress"]
    status = bench.run(parse(argv + ["--backends", "numpy"]))
    captured = capsys.readouterr()
    assert status == 0
    assert "[1/2] numpy 8x3x4 float32" in captured.err


def test_bench_threads_are_restored(capsys):
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    status = bench.run(parse(TINY_ARGS + ["--threads", "1"]))
    assert status == 0
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("argv", [
    ["--backends", "nosuch"],
    ["--shapes", "7"],
    ["--shapes", "4xq"],
    ["--threads", "0"],
])
def test_bench_bad_options(argv, capsys):
    assert bench.run(parse(TINY_ARGS + argv)) == 2
    assert "error" in capsys.readouterr().err


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
    assert bench.fraction_of_copy_limit("forward", 1.0, 1.0, itemsize=2) == pytest.approx(1.0)
    # the same float16 forward held to a float32 copy's bandwidth: half the time
    assert bench.fraction_of_copy_limit("forward", 1.0, 1.0, itemsize=2,
                                        copy_itemsize=4) == pytest.approx(0.5)
    # simplified backward: 3 x 2 bytes per element
    assert bench.fraction_of_copy_limit("backward", 1.5, 1.0, itemsize=2) == pytest.approx(1.0)


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
        case.forward_train()
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


def test_half_relu_script_writes_its_report(tmp_path):
    """benchmarks/half_relu.py: one round on a tiny shape, every section written."""
    script = importlib.import_module(f"{PACKAGE}.half_relu")
    path = tmp_path / "half_relu.md"
    argv = ["--shape", "8x3x4x4", "--rounds", "1", "--storage-backends", "numpy,torch",
            "--relu-backends", "numpy", "--out", str(path)]
    assert script.main(argv) == 0
    text = path.read_text()
    for heading in ("## 16-bit storage", "## Fused batch norm + ReLU", "## Bars",
                    "load average"):
        assert heading in text
    rows = [line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| numpy | float32 |")]
    storage = [cells for cells in rows if len(cells) == 11]
    relu = [cells for cells in rows if len(cells) == 15]
    assert len(storage) == 1 and storage[0][4].strip() == "1.00 (1.00)"
    assert len(relu) == 1
    if bench.why_unsupported("numpy", "float32", "relu") is None:
        assert "n/a" not in relu[0][2] and "x separate" in text
