"""The ``bench`` job's options: spread of each timing and its warnings, thread
scaling, and the hand-over of ``--device cuda`` to ``fastbn.bench_cuda``."""
import argparse
import json
import sys
import types

import numpy as np
import pytest

from fastbn import bench

TINY_ARGS = ["--shapes", "6x5", "--dtype", "float32", "--repeat", "2", "--no-progress"]


def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


class FakeClock:
    """``time.perf_counter`` stand-in: each call of :meth:`work` lasts the
    next of the given durations."""

    def __init__(self, durations):
        self.now = 0.0
        self.durations = list(durations)
        self.calls = 0

    def perf_counter(self):
        return self.now

    def work(self):
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1


def test_time_spread_stable(monkeypatch):
    clock = FakeClock([1.0] * 50)
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    result = bench.time_spread(clock.work, 5)
    assert result["best"] == 1.0 and result["median"] == 1.0
    assert result["calls"] == 5 and not result["unstable"]


def test_time_spread_times_more_then_flags_unstable(monkeypatch):
    # warm-up, then samples alternating 1 s and 3 s: the median stays far
    # above the best, so the kernel is timed MAX_REPEAT_FACTOR times as often.
    clock = FakeClock([1.0] + [1.0, 3.0, 3.0] * 100)
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    result = bench.time_spread(clock.work, 3)
    assert result["calls"] == bench.MAX_REPEAT_FACTOR * 3
    assert result["best"] == 1.0 and result["median"] == 3.0
    assert result["spread"] == pytest.approx(2.0) and result["unstable"]


def test_time_spread_stops_once_samples_agree(monkeypatch):
    # One slow first batch, then steady: more samples pull the median down.
    clock = FakeClock([1.0, 1.0, 5.0, 5.0] + [1.0] * 100)
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    result = bench.time_spread(clock.work, 3)
    assert 3 < result["calls"] < bench.MAX_REPEAT_FACTOR * 3
    assert result["median"] == 1.0 and not result["unstable"]


def test_short_calls_are_timed_in_loops(monkeypatch):
    clock = FakeClock([bench.SAMPLE_SECONDS / 10] * 1000)
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    result = bench.time_spread(clock.work, 2)
    assert clock.calls == 1 + 2 * 10
    assert result["best"] == pytest.approx(bench.SAMPLE_SECONDS / 10)


def test_stability_warnings():
    row = {"backend": "torch", "shape": [256, 4096], "dtype": "float32", "threads": 2,
           "forward_ms": 0.5, "forward_median_ms": 91.0, "calls": {"forward": 28},
           "unstable": ["forward"]}
    warnings = bench.stability_warnings([row], 0.5, 0.7)
    assert len(warnings) == 1
    assert "torch 256x4096 float32" in warnings[0] and "unstable" in warnings[0]
    assert "91.000 ms" in warnings[0]
    busy = bench.stability_warnings([], 0.5, 1000.0)
    assert len(busy) == 1 and "load average" in busy[0]


def test_bench_prints_spread_and_writes_medians(tmp_path, capsys):
    path = tmp_path / "bench.json"
    status = bench.run(parse(TINY_ARGS + ["--backends", "numpy", "--json", str(path)]))
    out = capsys.readouterr().out
    assert status == 0
    assert "%)" in out.splitlines()[2]          # "0.012 (+3%)" cells
    data = json.loads(path.read_text())
    row = data["results"][0]
    for kernel in ("forward", "simplified", "staged", "copy"):
        assert row[f"{kernel}_median_ms"] >= row[f"{kernel}_ms"] > 0
    assert isinstance(row["unstable"], list) and row["calls"]["forward"] >= 2
    assert isinstance(data["meta"]["warnings"], list)


def test_bench_thread_scaling_table(capsys):
    pytest.importorskip("numba")
    status = bench.run(parse(TINY_ARGS + ["--backends", "numba,numpy", "--threads", "1,2"]))
    out = capsys.readouterr().out
    assert status == 0
    assert "Thread scaling" in out
    table = out[out.index("Thread scaling"):].splitlines()
    assert "fwd x1->2" in table[1] and "bwd x1->2" in table[1]
    assert any(line.startswith("numba ") and "x" in line.split()[-1] for line in table[3:])


@pytest.mark.parametrize("threads", ["0", "1,x", ","])
def test_bench_bad_thread_lists(threads, capsys):
    assert bench.run(parse(TINY_ARGS + ["--threads", threads])) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--device", "cuda"], ["--backends", "cuda"]])
def test_cuda_is_handed_to_bench_cuda(argv, monkeypatch):
    seen = []
    fake = types.ModuleType("fastbn.bench_cuda")
    fake.run = lambda args: seen.append(args) or 7
    monkeypatch.setitem(sys.modules, "fastbn.bench_cuda", fake)
    import fastbn
    monkeypatch.setattr(fastbn, "bench_cuda", fake, raising=False)
    args = parse(TINY_ARGS + argv)
    assert bench.run(args) == 7
    assert seen == [args]
    assert seen[0].shapes == "6x5" and seen[0].dtype == "float32" and seen[0].repeat == 2


def test_device_default_is_cpu():
    assert parse([]).device == "cpu"


def test_bench_warns_once_about_a_source_tree(monkeypatch, capsys):
    from fastbn import registry
    reason = "extension not built: this fastbn is imported from a source tree at /x"
    monkeypatch.setattr(registry, "source_tree_reasons", lambda: {"cython": reason})
    assert bench.run(parse(TINY_ARGS + ["--backends", "numpy"])) == 0
    err = capsys.readouterr().err
    assert err.count("source tree") == 1 and "'cython' is not timed" in err


# --dtype lists, 16-bit rows, --activation ------------------------------------

def test_parse_dtypes():
    assert bench.parse_dtypes("float16,bfloat16") == ["float16", "bfloat16"]
    assert bench.parse_dtypes("both") == ["float32", "float64"]
    assert bench.parse_dtypes(" Float32 ,both,float16") == ["float32", "float64", "float16"]
    for bad in ("float8", "float32,half", " , "):
        with pytest.raises(ValueError):
            bench.parse_dtypes(bad)


@pytest.mark.parametrize("dtype", ["float8", "float32,int8", ","])
def test_bench_bad_dtypes(dtype, capsys):
    assert bench.run(parse(["--shapes", "6x5", "--dtype", dtype, "--no-progress"])) == 2
    assert "dtype" in capsys.readouterr().err


def test_bench_half_rows_count_16bit_bytes(tmp_path, capsys):
    pytest.importorskip("ml_dtypes")
    path = tmp_path / "bench.json"
    argv = ["--shapes", "6x5", "--dtype", "float16,bfloat16", "--repeat", "1",
            "--no-progress", "--backends", "numpy", "--json", str(path)]
    status = bench.run(parse(argv))
    out = capsys.readouterr().out
    assert status == 0
    rows = json.loads(path.read_text())["results"]
    assert [row["dtype"] for row in rows] == ["float16", "bfloat16"]
    for row in rows:
        if row.get("skipped"):
            assert "n/a" in out and row["skipped"] in out
            continue
        assert row["itemsize"] == 2
        # the copy moved 2 x 2 bytes per element of the 16-bit array
        assert row["copy_gb_per_s"] == pytest.approx(2 * 2 * 30 / (row["copy_ms"] * 1e-3) / 1e9)
        assert row["forward_fraction_of_copy_limit"] == pytest.approx(
            row["copy_ms"] / row["forward_ms"])
        assert row["backward_fraction_of_copy_limit"] == pytest.approx(
            1.5 * row["copy_ms"] / row["simplified_ms"])
        assert f"6x5    {row['dtype']}" in out


def test_bench_bfloat16_without_ml_dtypes_says_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    monkeypatch.setattr(bench, "_UNSUPPORTED", {})
    path = tmp_path / "bench.json"
    argv = ["--shapes", "6x5", "--dtype", "float32,bfloat16", "--repeat", "1",
            "--no-progress", "--backends", "numpy", "--json", str(path)]
    assert bench.run(parse(argv)) == 0
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())["results"]
    assert [row.get("skipped") is None for row in rows] == [True, False]
    assert "ml_dtypes" in rows[1]["skipped"]
    line = next(line for line in out.splitlines() if "bfloat16" in line and "n/a" in line)
    assert line.startswith("numpy")
    assert "numpy bfloat16: bfloat16 needs ml_dtypes" in out


def test_bench_backend_without_a_dtype_says_why(monkeypatch, capsys):
    original = bench.Kernels.forward

    def forward(self):
        if self.backend == "numpy" and self.dtype == np.float16:
            raise TypeError("no 16-bit kernels in this backend")
        return original(self)

    monkeypatch.setattr(bench.Kernels, "forward", forward)
    monkeypatch.setattr(bench, "_UNSUPPORTED", {})
    argv = ["--shapes", "6x5", "--dtype", "float16", "--repeat", "1", "--no-progress",
            "--backends", "numpy"]
    assert bench.run(parse(argv)) == 0
    out = capsys.readouterr().out
    assert "numpy float16: TypeError: no 16-bit kernels in this backend" in out


def test_bench_activation_rows(tmp_path, capsys):
    if bench.why_unsupported("numpy", "float32", "relu") is not None:
        pytest.skip("numpy backend without the fused ReLU")
    path = tmp_path / "bench.json"
    backends = "numpy,torch" if bench._torch_installed() else "numpy"
    argv = ["--shapes", "6x5", "--dtype", "float32", "--repeat", "1", "--no-progress",
            "--backends", backends, "--activation", "both", "--json", str(path)]
    assert bench.run(parse(argv)) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:4] == ["backend", "shape", "dtype", "act"]
    assert "sep" in header
    rows = {(r["backend"], r["activation"]): r for r in json.loads(path.read_text())["results"]}
    expected = {("numpy", None), ("numpy", "relu"), ("numpy", "relu_separate")}
    if "torch" in backends:
        expected |= {("torch", None), ("torch", "relu")}
    assert set(rows) == expected
    fused, separate = rows["numpy", "relu"], rows["numpy", "relu_separate"]
    assert fused["forward_ratio_to_separate"] == pytest.approx(
        separate["forward_ms"] / fused["forward_ms"])
    assert fused["backward_ratio_to_separate"] == pytest.approx(
        separate["simplified_ms"] / fused["simplified_ms"])
    assert separate["forward_ratio_to_separate"] is None
    assert rows["numpy", None]["forward_ratio_to_separate"] is None
    if "torch" in backends:
        peer = rows["torch", "relu"]
        assert fused["forward_ratio_to_torch"] == pytest.approx(
            peer["forward_ms"] / fused["forward_ms"])
        assert rows["numpy", None]["forward_ratio_to_torch"] == pytest.approx(
            rows["torch", None]["forward_ms"] / rows["numpy", None]["forward_ms"])
        assert peer["staged_ms"] is None
    assert any(line.startswith("numpy") and " relu sep " in line for line in out.splitlines())
    assert "batch_norm then relu_" in out


def test_bench_without_activation_has_no_activation_columns(capsys):
    assert bench.run(parse(TINY_ARGS + ["--backends", "numpy"])) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "act" not in header.split() and "sep" not in header
