"""The timing core (on a fake clock), the reports, ``fastbn bench`` and each suite
in its tiny profile (seconds), writing a report whose tables parse."""
import json
import shutil

import pytest

from fastbn import machine
from fastbn.__main__ import main
from fastbn.bench import report, suites, timing


class FakeClock:
    """A clock that only kernels move: each call adds its own duration."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def __call__(self):
        return self.now

    def kernel(self, name, durations):
        """A kernel taking ``durations[i]`` seconds on its i-th call (the last repeats)."""
        def run():
            i = sum(1 for c in self.calls if c == name)
            self.calls.append(name)
            self.now += durations[min(i, len(durations) - 1)]
        return run


def test_rounds_are_interleaved_and_rotate():
    clock = FakeClock()
    kernels = {n: clock.kernel(n, [1.0]) for n in "abc"}
    got = timing.interleaved(kernels, rounds=3, max_rounds=3, min_seconds=0, clock=clock)
    timed = clock.calls[6:]   # two untimed calls each: warm-up and calibration
    assert clock.calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert timed == list("abc" "bca" "cab")
    assert got.rounds == 3 and all(len(t.samples) == 3 for t in got.values())


def test_settle_sleeps_before_each_sample_outside_the_timed_interval(monkeypatch):
    clock = FakeClock()
    sleeps = []

    def sleep(seconds):
        sleeps.append((seconds, len(clock.calls)))
        clock.now += 100.0      # would show in a sample if it were timed

    monkeypatch.setattr(timing.time, "sleep", sleep)
    kernels = {n: clock.kernel(n, [1.0]) for n in "ab"}
    got = timing.interleaved(kernels, rounds=2, max_rounds=2, min_seconds=0,
                             settle_seconds=0.5, clock=clock)
    # one sleep before each of the 4 samples (after the 4 untimed calls), none before
    assert [calls for _, calls in sleeps] == [4, 5, 6, 7]
    assert all(seconds == 0.5 for seconds, _ in sleeps)
    assert all(t.samples == [1.0, 1.0] for t in got.values())
    # a single kernel has no other runtime to wait for
    sleeps.clear()
    timing.interleaved({"a": kernels["a"]}, rounds=2, max_rounds=2, min_seconds=0,
                       settle_seconds=0.5, clock=clock)
    assert sleeps == []


def test_warm_up_calls_each_kernel_once_untimed_before_its_sample(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "sleep", lambda seconds: None)
    # warm-up, calibration, then per round: an untimed call (100 s) and the sample (1 s)
    kernels = {n: clock.kernel(n, [1.0, 1.0] + [100.0, 1.0] * 2) for n in "ab"}
    got = timing.interleaved(kernels, rounds=2, max_rounds=2, min_seconds=0,
                             **timing.same_start(), clock=clock)
    assert clock.calls[4:] == list("aabb" "bbaa")
    assert all(t.samples == [1.0, 1.0] for t in got.values())


def test_statistics_on_a_fake_clock():
    clock = FakeClock()
    # warm-up, calibration, then samples 1, 3, 2, 10, 2 (seconds)
    slow = clock.kernel("k", [9.0, 9.0, 1.0, 3.0, 2.0, 10.0, 2.0])
    got = timing.interleaved({"k": slow}, rounds=5, max_rounds=5, min_seconds=0, clock=clock)
    k = got["k"]
    assert k.samples == [1.0, 3.0, 2.0, 10.0, 2.0]
    assert k.best == 1.0 and k.median == 2.0 and k.spread == pytest.approx(1.0)
    assert k.unstable and "unstable" in got.warnings()[0]
    assert k.calls == 1


def test_calls_per_sample_and_ratio(monkeypatch):
    monkeypatch.setattr(machine, "load_average", lambda: 0.0)
    clock = FakeClock()
    kernels = {"fast": clock.kernel("fast", [0.001]), "slow": clock.kernel("slow", [0.004])}
    got = timing.interleaved(kernels, rounds=2, min_seconds=0.01, clock=clock)
    assert got["fast"].calls == 10 and got["slow"].calls == 2
    assert got["fast"].best == pytest.approx(0.001)
    assert got.ratio("slow", "fast", "median") == pytest.approx(4.0)
    assert got.rounds == 2 and not got.warnings()


def test_unstable_figures_are_timed_again():
    clock = FakeClock()
    noisy = clock.kernel("n", [1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0])
    got = timing.interleaved({"n": noisy}, rounds=2, max_rounds=6, min_seconds=0, clock=clock)
    assert got.rounds == 3   # [1, 5] is unstable; a third round settles it
    assert not got["n"].unstable


def test_a_kernel_that_raises_is_reported():
    clock = FakeClock()
    calls = []

    def broken():
        calls.append(1)
        if len(calls) > 3:
            raise ZeroDivisionError("boom")
        clock.now += 1.0

    got = timing.interleaved({"ok": clock.kernel("ok", [1.0]), "broken": broken},
                             rounds=4, max_rounds=4, min_seconds=0, clock=clock)
    assert got["broken"].error == "ZeroDivisionError: boom"
    assert len(got["broken"].samples) == 1 and len(got["ok"].samples) == 4
    assert any("broken failed: ZeroDivisionError: boom" in w for w in got.warnings())


def test_load_warning(monkeypatch):
    assert timing.load_warning(0.5, 1.0, cores=2) is None
    assert "load average 3.5 above the 2 cores" in timing.load_warning(0.5, 3.5, cores=2)
    loads = iter([9.0, 9.5])
    monkeypatch.setattr(machine, "load_average", lambda: next(loads))
    got = timing.interleaved({"a": lambda: None}, rounds=1, min_seconds=0)
    assert (got.load_before, got.load_after) == (9.0, 9.5)
    assert any("load average 9.5" in w for w in got.warnings())


def test_copy_limit_in_the_same_rounds():
    import numpy as np
    x = np.ones(1000)
    got = timing.interleaved({"a": lambda: None}, rounds=2, copy_of=x, min_seconds=0)
    assert got[timing.COPY].samples and got[timing.COPY].error is None
    assert timing.fraction_of_copy_limit("forward", 2.0, 1.0) == pytest.approx(0.5)
    assert timing.fraction_of_copy_limit("backward", 3.0, 2.0) == pytest.approx(1.0)
    assert timing.fraction_of_copy_limit("forward", 1.0, 1.0, 2, 4) == pytest.approx(0.5)
    assert timing.fraction_of_copy_limit("forward", None, 1.0) is None


def test_report_header_and_tables_parse():
    page = report.Report("Title", "fastbn bench --suite x")
    page.add_bar("a bar", True, "1.5x")
    page.add_bar("another", False)
    page.add_table("T", ["a", "b"], [["1", "2"], ["3", "4"]], "text")
    text = page.finish().to_markdown()
    assert text.startswith("# Title\n\nMade by `fastbn bench --suite x` on ")
    assert machine.summary() in text and "- versions: python" in text
    assert "- met: a bar (1.5x)" in text and "- **missed**: another" in text
    assert report.parse_tables(text)["T"] == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    assert json.loads(page.to_json())["tables"]["T"][1]["b"] == "4"


def run_suite(tmp_path, capsys, name, *extra):
    path = tmp_path / f"{name}.md"
    status = main(["bench", "--suite", name, "--profile", "tiny", "--no-progress",
                   "--report", str(path), "--json", str(tmp_path / "r.json"), *extra])
    capsys.readouterr()
    assert status == 0
    text = path.read_text()
    assert f"Made by `fastbn bench --suite {name} --profile tiny" in text
    assert machine.summary() in text
    tables = report.parse_tables(text)
    assert tables and all(rows for rows in tables.values())
    return tables


def test_default_suite(tmp_path, capsys):
    tables = run_suite(tmp_path, capsys, "default", "--backends", "numpy,numba")
    rows = tables["Times and ratios"]
    assert [r["backend"] for r in rows] == ["numpy", "numba"]
    assert all(float(r["staged/simplified"]) > 0 for r in rows)


def test_small_suite(tmp_path, capsys):
    run_suite(tmp_path, capsys, "small", "--backends", "numpy,numba")


def test_threads_suite(tmp_path, capsys):
    tables = run_suite(tmp_path, capsys, "threads", "--backends", "numba", "--threads", "1,2")
    assert "fwd x1->2" in tables["Times per thread count and scaling"][0]


def test_half_relu_suite(tmp_path, capsys):
    tables = run_suite(tmp_path, capsys, "half-relu", "--backends", "numba,numpy")
    storage = tables["16-bit storage: forward and simplified backward"]
    assert {r["dtype"] for r in storage} >= {"float32", "float16"}


def test_mpi_suite(tmp_path, capsys):
    pytest.importorskip("mpi4py")
    if not shutil.which("mpiexec"):
        pytest.skip("no mpiexec")
    tables = run_suite(tmp_path, capsys, "mpi")
    assert [r["ranks"] for r in tables["Time per step (forward + backward)"]] == ["1", "2"]


def test_cuda_suite_without_a_gpu_says_why(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the suite runs on the device check")
    assert main(["bench", "--suite", "cuda", "--profile", "tiny", "--no-progress"]) == 2
    assert "cuda suite needs" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--backends", "nosuch"], ["--shapes", "4xq"],
                                  ["--threads", "0"], ["--dtype", "int8"]])
def test_bad_options(argv, capsys):
    assert main(["bench", "--profile", "tiny", *argv]) == 2
    assert "fastbn bench:" in capsys.readouterr().err


def test_every_suite_is_registered():
    assert set(suites.SUITES) == {"default", "small", "half-relu", "threads", "mpi", "cuda",
                                  "torch-model"}
    with pytest.raises(ValueError, match="unknown suite"):
        suites.run("nosuch", suites.Options())
