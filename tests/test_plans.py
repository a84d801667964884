"""Kernel plans and wisdom (fastbn.plans): call classes, the wisdom file and
its key; the plans of the backends that have them (every candidate against
the float64 reference, wisdom and measured plans reaching the kernels), and
``fastbn tune``."""
import json
import os

import numpy as np
import pytest
from conftest import kernel_reference, make_kernel_case, normwise_error
from contract_support import SPECS

from fastbn import machine, plans, registry, tune

BUILDS = {"numba": "numba 0 for test-cpu"}


@pytest.fixture(autouse=True)
def clean_state(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(plans.WISDOM_ENV, raising=False)
    plans.forget()
    yield
    plans.forget()
    plans.set_tuning("off")


def test_call_classes():
    caches = machine.cache_sizes()
    assert plans.layout_class((256, 4096, 1)) == "nd"
    assert plans.layout_class((32, 64, 49)) == "short"
    assert plans.layout_class((32, 64, 63)) == "short"
    assert plans.layout_class((32, 64, 64)) == "medium"
    assert plans.layout_class((64, 256, 196)) == "medium"
    assert plans.layout_class((32, 64, 255)) == "medium"
    assert plans.layout_class((32, 64, 256)) == "rows"
    assert plans.layout_class((32, 64, 3136)) == "rows"
    if "numba" in PLANNED:
        # the medium class ends where numba's default plans change
        numba_cpu = registry.get_backend("numba")
        assert plans.LONG_ROW == numba_cpu.FUSED_MIN_B == numba_cpu.REDUCE_ROWS_MIN_B
    assert plans.size_class(caches["l2"], caches) == "l2"
    assert plans.size_class(caches["l2"] + 1, caches) in ("llc", "memory")
    assert plans.size_class(10 * caches["l3"] + 16 * caches["l2"], caches) == "memory"
    assert plans.call_class((32, 64, 3136), "float32", "backward", 4).startswith("rows/")
    with pytest.raises(ValueError, match="pass"):
        plans.call_class((1, 2, 3), "float32", "sideways", 4)


def test_default_wisdom_path_is_in_the_users_cache(tmp_path):
    assert plans.wisdom_path() == str(tmp_path / "cache" / "fastbn" / "wisdom.json")


def test_saved_wisdom_is_used_on_the_same_machine():
    key = "rows/memory/float32/backward"
    path = plans.save(BUILDS, {"numba": {key: {"fuse": False}}})
    plans.load(BUILDS)
    state = plans.status()
    assert state["in_use"] and state["file"] == path and "wisdom from" in state["reason"]
    assert state["classes"] == {"numba": 1}
    assert plans.stored_plan("numba", key) == {"fuse": False}
    assert plans.stored_plan("numba", "nd/l2/float32/forward") is None
    # a second save merges
    plans.save(BUILDS, {"numba": {"nd/l2/float32/forward": {"fuse": True}}})
    plans.load(BUILDS)
    assert plans.status()["classes"] == {"numba": 2}


def test_wisdom_of_another_machine_or_build_is_ignored_and_says_why():
    key = "rows/memory/float32/backward"
    path = plans.save(BUILDS, {"numba": {key: {"fuse": False}}})
    plans.load({"numba": "another build"})
    state = plans.status()
    assert not state["in_use"] and "builds" in state["reason"]
    assert plans.stored_plan("numba", key) is None
    with open(path) as file:
        stored = json.load(file)
    stored["key"]["processor"] = "some other processor"
    with open(path, "w") as file:
        json.dump(stored, file)
    plans.load(BUILDS)
    assert not plans.status()["in_use"] and "processor" in plans.status()["reason"]


def test_wisdom_off_and_a_missing_or_broken_file(monkeypatch, tmp_path):
    plans.save(BUILDS, {"numba": {"nd/l2/float32/eval": {"fuse": True}}})
    monkeypatch.setenv(plans.WISDOM_ENV, "off")
    plans.load(BUILDS)
    assert plans.wisdom_path() is None
    assert not plans.status()["in_use"] and "off" in plans.status()["reason"]
    with pytest.raises(ValueError, match="off"):
        plans.save(BUILDS, {})
    other = tmp_path / "elsewhere.json"
    monkeypatch.setenv(plans.WISDOM_ENV, str(other))
    plans.load(BUILDS)
    assert "no wisdom file" in plans.status()["reason"]
    other.write_text("{not json")
    plans.load(BUILDS)
    assert "unreadable" in plans.status()["reason"]


def test_a_default_winner_removes_the_stored_plan():
    key = "rows/memory/float32/backward"
    plans.save(BUILDS, {"numba": {key: {"fuse": False}, "nd/l2/float32/eval": {"fuse": True}}})
    plans.save(BUILDS, {"numba": {key: None}})
    plans.load(BUILDS)
    assert plans.stored_plan("numba", key) is None
    assert plans.stored_plan("numba", "nd/l2/float32/eval") == {"fuse": True}


def test_forced_plans_come_first_and_are_undone():
    key = "short/l2/float64/forward"
    plans.remember("numba", key, {"fuse": True})
    with plans.forced("numba", key, {"fuse": False}):
        assert plans.stored_plan("numba", key) == {"fuse": False}
    assert plans.stored_plan("numba", key) == {"fuse": True}


def test_tuning_modes():
    assert plans.tuning_mode() == "off"
    plans.set_tuning("measure")
    assert plans.tuning_mode() == "measure"
    with pytest.raises(ValueError, match="tuning mode"):
        plans.set_tuning("sometimes")


# ---------------------------------------------------------------------------
# The plans of the backends that have them
# ---------------------------------------------------------------------------

PLANNED = [name for name in registry.available_backends()
           if hasattr(registry.get_backend(name), "plan_candidates")]
EPS = 1e-5
# One shape per layout class, each under the serial threshold times eight, so
# that every strategy (serial included) is a candidate: (N, D), short rows,
# long rows.
PLAN_SHAPES = [(64, 300, 1), (16, 24, 49), (8, 6, 1100)]


def _tolerances(dtype, count):
    """Per-channel results (float64 sums of ``count`` terms in any order):
    a float64 rounding per term, four times over for the ratios that use
    them; elementwise results: a few roundings of the compute type, then one
    rounding to the storage type (float32: 2**-24 each)."""
    statistics = 4 * (count + 4) * 2.0**-53
    elementwise = 16 * 2.0**-24 if dtype == np.float32 else 16 * (count + 4) * 2.0**-53
    return statistics, elementwise


def _run_pass(kernels, pass_name, x, dy, gamma, beta, ref):
    """The pass's results, as a dict of float64 arrays."""
    out = np.empty_like(x)
    if pass_name == "forward":
        mean, invstd = kernels.forward_train(x, gamma, beta, EPS, out)
        return {"mean": mean, "invstd": invstd, "y": out}
    if pass_name == "eval":
        kernels.forward_eval(x, gamma, beta, ref["mean"], ref["var"], EPS, out)
        return {"y": out}
    sum_dy, sum_dy_xhat = kernels.backward_train(dy, x, ref["mean"], ref["invstd"], gamma, out)
    return {"sum_dy": sum_dy, "sum_dy_xhat": sum_dy_xhat, "dx": out}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", PLANNED)
def test_every_candidate_plan_matches_the_float64_reference(backend, shape, dtype, monkeypatch):
    """Each candidate plan of each pass computes the contract's result within
    the bounds of its arithmetic, and the same bits run to run and for one or
    two threads."""
    kernels = registry.get_backend(backend)
    x, dy, gamma, beta = make_kernel_case(shape, dtype, seed=sum(shape))
    ref = kernel_reference(x, gamma, beta, dy, EPS)
    statistics, elementwise = _tolerances(np.dtype(dtype), shape[0] * shape[2])
    spec = SPECS[backend]
    strategies = set()
    for pass_name in plans.PASSES:
        key = plans.call_class(shape, np.dtype(dtype).name, pass_name, x.itemsize)
        candidates = kernels.plan_candidates(shape, x.itemsize, pass_name)
        assert candidates[0] == kernels.default_plan(shape, x.itemsize, pass_name)
        assert len(candidates) == len({repr(sorted(plan.items())) for plan in candidates})
        for plan in candidates:
            strategies.add(plan["strategy"])
            what = f"{pass_name} {plan}"
            runs = []
            for threads in (1, 2, 2):
                cleanup = []
                spec.threads(monkeypatch, cleanup, threads)
                try:
                    with plans.forced(backend, key, plan):
                        runs.append(_run_pass(kernels, pass_name, x, dy, gamma, beta, ref))
                finally:
                    for undo in reversed(cleanup):
                        undo()
            got = runs[0]
            for name, value in got.items():
                tol = elementwise if value.ndim == 3 else statistics
                assert normwise_error(value, ref[name]) <= tol, f"{what}: {name}"
                for other in runs[1:]:
                    np.testing.assert_array_equal(other[name], value, err_msg=f"{what}: {name}")
    assert strategies >= {"passes", "fused"}


@pytest.mark.parametrize("backend", PLANNED)
def test_wisdom_and_measured_plans_reach_the_kernels(backend, tmp_path, monkeypatch):
    kernels = registry.get_backend(backend)
    shape = (16, 24, 49)
    x = np.ones(shape, np.float32)
    key = plans.call_class(shape, "float32", "backward", 4)
    default = kernels.default_plan(shape, 4, "backward")
    other = next(plan for plan in kernels.plan_candidates(shape, 4, "backward")
                 if plan != default)
    # no wisdom: the default plan, and no stored plan
    monkeypatch.setenv(plans.WISDOM_ENV, "off")
    assert plans.lookup(backend, kernels.plan_build(), shape, "float32", "backward") is None
    assert kernels._plan(x, "backward") == default
    # wisdom for this machine and build: its plan
    path = tmp_path / "wisdom.json"
    monkeypatch.setenv(plans.WISDOM_ENV, str(path))
    plans.save(plans.builds(), {backend: {key: other}})
    plans.forget()
    assert kernels._plan(x, "backward") == other
    assert plans.status()["in_use"]
    # a plan the backend does not know (a damaged file): the default
    plans.save(plans.builds(), {backend: {key: {"strategy": "sideways"}}})
    plans.forget()
    assert kernels._plan(x, "backward") == default
    # set_tuning("measure"): the first call of a class times its candidates
    monkeypatch.setenv(plans.WISDOM_ENV, "off")
    plans.forget()
    plans.set_tuning("measure")
    forward_key = plans.call_class(shape, "float32", "forward", 4)
    out = np.empty_like(x)
    kernels.forward_train(x, np.ones(24), np.zeros(24), EPS, out)
    measured = plans.stored_plan(backend, forward_key)
    # {}: the default plan won; else one of the other candidates
    assert measured == {} or measured in kernels.plan_candidates(shape, 4, "forward")[1:]
    np.testing.assert_array_equal(out, 0.0)      # a constant channel: y = beta


def test_numba_kept_plans_follow_every_change(monkeypatch):
    """numba keeps each call shape's plan (_decide); a forced plan, wisdom
    loaded or forgotten and a changed module setting all reach the next call."""
    if "numba" not in PLANNED:
        pytest.skip("numba is not available")
    nb = registry.get_backend("numba")
    monkeypatch.setenv(plans.WISDOM_ENV, "off")
    x = np.ones((64, 48, 512), np.float32)
    default = nb.default_plan(x.shape, 4, "forward")
    assert nb._decide(x, "forward")[0] == default
    assert nb._decide(x, "forward")[0] == default          # kept
    other = next(plan for plan in nb.plan_candidates(x.shape, 4, "forward")
                 if plan != default)
    key = plans.call_class(x.shape, "float32", "forward", 4)
    with plans.forced("numba", key, other):
        assert nb._decide(x, "forward")[0] == other
    assert nb._decide(x, "forward")[0] == default
    # a module setting changed after the call (as the tests' modes do)
    serial_below = nb.SERIAL_BELOW
    monkeypatch.setattr(nb, "SERIAL_BELOW", 2**62)
    assert nb._decide(x, "forward")[0] == {"strategy": "serial"}
    monkeypatch.setattr(nb, "SERIAL_BELOW", serial_below)
    assert nb._decide(x, "forward")[0] == default


@pytest.mark.parametrize("backend", PLANNED)
def test_tune_keeps_the_default_unless_another_plan_is_faster(backend, tmp_path, monkeypatch):
    monkeypatch.setenv(plans.WISDOM_ENV, str(tmp_path / "wisdom.json"))
    results = tune.tune(backends=[backend], shapes=[(8, 16, 16, 16)], dtypes=["float32"],
                        quick=True, progress=False)
    path = results.pop("_wisdom")
    kernels = registry.get_backend(backend)
    with open(path) as file:
        stored = json.load(file)
    assert len(results[backend]) == 3
    # only a plan that beat the default is stored: a class the default won
    # keeps each shape's own default plan
    assert set(stored["plans"][backend]) == {
        key for key, found in results[backend].items() if not found["default"]}
    for key, found in results[backend].items():
        pass_name = key.rsplit("/", 1)[1]
        candidates = kernels.plan_candidates((8, 16, 256), 4, pass_name)
        assert found["plan"] in candidates
        assert found["default"] == (found["plan"] == candidates[0])
        assert found["default"] or found["speedup"] >= 1 + tune.MARGIN
        if not found["default"]:
            assert stored["plans"][backend][key] == found["plan"]
    assert plans.status()["in_use"] and plans.status()["file"] == path


def test_info_says_whether_wisdom_is_used_and_the_plan_of_each_class(capsys, monkeypatch):
    from fastbn.__main__ import main

    monkeypatch.setenv(plans.WISDOM_ENV, "off")
    assert main(["info"]) == 0
    shown = json.loads(capsys.readouterr().out)["plans"]
    assert not shown["wisdom"]["in_use"] and "off" in shown["wisdom"]["reason"]
    for backend in PLANNED:
        classes = shown[backend]
        assert classes and all(entry["source"] == "default" for entry in classes.values())
        assert {key.rsplit("/", 1)[1] for key in classes} == set(plans.PASSES)


@pytest.mark.skipif("cython" not in PLANNED, reason="the cython backend is not built")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(64, 2048, 1), (32, 64, 200)], ids=["rows", "segments"])
def test_cython_plans_give_the_same_bits(shape, dtype):
    """The cython kernels sum in the same chunks and order whether fused or
    not, and whatever the fused block: every candidate plan gives the
    default's bits. (64, 2048, 1) has enough channel blocks to fuse."""
    kernels = registry.get_backend("cython")
    x, dy, gamma, beta = make_kernel_case(shape, dtype, seed=3)
    ref = kernel_reference(x, gamma, beta, dy, EPS)
    for pass_name in ("forward", "backward"):
        key = plans.call_class(shape, np.dtype(dtype).name, pass_name, x.itemsize)
        candidates = kernels.plan_candidates(shape, x.itemsize, pass_name)
        assert {plan["strategy"] for plan in candidates} == {"passes", "fused"}
        results = []
        for plan in candidates:
            with plans.forced("cython", key, plan):
                results.append(_run_pass(kernels, pass_name, x, dy, gamma, beta, ref))
        for plan, got in zip(candidates[1:], results[1:]):
            for name, value in got.items():
                np.testing.assert_array_equal(value, results[0][name],
                                              err_msg=f"{pass_name} {plan}: {name}")


# ---------------------------------------------------------------------------
# How tune chooses, and tune --check
# ---------------------------------------------------------------------------

P = {"strategy": "passes", "reduce": "rows", "apply": "rows"}
Q = {"strategy": "fused", "slab_bytes": 4096}
R = {"strategy": "fused", "slab_bytes": 8192}


def test_tune_compares_each_shape_with_its_own_default():
    # two shapes of one class whose defaults differ (P, then Q), so that each
    # lists the same plans in another order: R is 0.8 and 0.85 of the defaults
    timed = [([P, Q, R], [1.0, 0.9, 0.8]), ([Q, R, P], [1.0, 0.85, 1.5])]
    plan, speedup = tune.choose(timed)
    assert plan == R
    assert speedup == pytest.approx((0.8 * 0.85) ** -0.5)
    # Q is the first shape's 0.9 and the second's default: 1.05x on average
    plan, speedup = tune.choose([([P, Q], [1.0, 0.9]), ([Q, P], [1.0, 1.5])])
    assert plan == Q and speedup == pytest.approx(0.9 ** -0.5)


def test_tune_never_keeps_a_plan_slower_than_a_default_on_any_shape():
    # R halves one shape's time but is 5% slower on the other: not kept
    assert tune.choose([([P, R], [1.0, 0.5]), ([P, R], [1.0, 1.05])]) == (None, 1.0)
    # within the margin of the default: not kept
    assert tune.choose([([P, R], [1.0, 1 / (1 + tune.MARGIN / 2)])]) == (None, 1.0)
    # a plan that one shape did not time is not kept
    assert tune.choose([([P, R], [1.0, 0.5]), ([P], [1.0])]) == (None, 1.0)
    plan, speedup = tune.choose([([P, R], [1.0, 0.5])])
    assert plan == R and speedup == pytest.approx(2.0)


@pytest.mark.parametrize("backend", PLANNED)
@pytest.mark.parametrize("wins_again", [False, True], ids=["noise", "confirmed"])
def test_tune_keeps_a_winner_only_if_it_wins_again(backend, wins_again, tmp_path, monkeypatch):
    # The screening (QUICK_ROUNDS) says every other plan halves the time; the
    # second timing, the winner against the default alone, says half in
    # every round (confirmed), or half in all rounds but two (noise).
    monkeypatch.setenv(plans.WISDOM_ENV, str(tmp_path / "wisdom.json"))
    timed_again = []

    def fake_time_plans(backend_name, key, shape, dtype, pass_name, candidates, rounds):
        return [1.0] + [0.5] * (len(candidates) - 1)

    def fake_paired_ratios(backend_name, key, shape, dtype, pass_name, pair, rounds):
        timed_again.append(key)
        assert rounds == tune.CONFIRM_ROUNDS and len(pair) == 2 and pair[1] != pair[0]
        return [0.5] * (rounds - 2) + ([0.5, 0.5] if wins_again else [1.0, 1.1])

    monkeypatch.setattr(tune, "_time_plans", fake_time_plans)
    monkeypatch.setattr(tune, "_paired_ratios", fake_paired_ratios)
    results = tune.tune(backends=[backend], shapes=[(8, 16, 16, 16)], dtypes=["float32"],
                        quick=True, progress=False)
    results.pop("_wisdom")
    kernels = registry.get_backend(backend)
    assert sorted(timed_again) == sorted(results[backend])
    for key, found in results[backend].items():
        candidates = kernels.plan_candidates((8, 16, 256), 4, key.rsplit("/", 1)[1])
        if wins_again:
            assert found["plan"] == candidates[1] and found["speedup"] == pytest.approx(2.0)
        else:
            assert found["default"] and found["plan"] == candidates[0]


@pytest.mark.parametrize("backend", PLANNED)
def test_tune_check_times_the_plans_in_use_against_the_defaults(backend, monkeypatch):
    monkeypatch.setenv(plans.WISDOM_ENV, "off")
    shape = (8, 16, 16, 16)
    kernels = registry.get_backend(backend)
    assert tune.check(backends=[backend], shapes=[shape], dtypes=["float32"], rounds=1,
                      progress=False) == []
    key = plans.call_class((8, 16, 256), "float32", "backward", 4)
    default = kernels.default_plan((8, 16, 256), 4, "backward")
    other = next(plan for plan in kernels.plan_candidates((8, 16, 256), 4, "backward")
                 if plan != default)
    with plans.forced(backend, key, other):
        rows = tune.check(backends=[backend], shapes=[shape], dtypes=["float32"], rounds=1,
                          progress=False)
    assert [(row["pass"], row["plan"], row["default"]) for row in rows] == [
        ("backward", other, default)]
    assert rows[0]["shape"] == shape and rows[0]["class"] == key and rows[0]["speedup"] > 0


def test_tune_check_from_the_command_line(capsys, monkeypatch):
    from fastbn.__main__ import main

    monkeypatch.setenv(plans.WISDOM_ENV, "off")
    assert main(["tune", "--check", "--quick", "--no-progress", "--shapes", "8x16x16x16",
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "FASTBN_WISDOM=off" in out and "nothing to check" in out


# ---------------------------------------------------------------------------
# No per-call allocation that faults its pages in
# ---------------------------------------------------------------------------

FAULTS_SCRIPT = """
import json, resource, sys
import numpy as np
from fastbn import plans, registry
from fastbn.bench import kernels
backend, shape = sys.argv[1], (16, 256, 14, 14)
module = registry.get_backend(backend)
case = kernels.Kernels(backend, kernels.make_data(shape, "float32", seed=0))
passes = {"forward": case.forward, "backward": case.simplified, "eval": case.forward_eval}
found = []
for pass_name, run in passes.items():
    key = plans.call_class((16, 256, 196), "float32", pass_name, 4)
    for plan in module.plan_candidates((16, 256, 196), 4, pass_name):
        with plans.forced(backend, key, plan):
            run(); run()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                run()
            found.append([pass_name, plan,
                          resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before])
print(json.dumps(found))
"""


@pytest.mark.skipif(not hasattr(__import__("resource"), "getrusage"), reason="no getrusage")
@pytest.mark.parametrize("backend", PLANNED)
def test_kernels_allocate_nothing_per_call_that_faults(backend, tmp_path):
    """A fresh process (glibc maps every allocation above 128 KiB afresh) runs
    every candidate plan: five calls after two fault fewer pages than one
    per-column parameter row of the columns loop shape has (256 * 196
    float64: 98 pages). numba's columns kernels used to allocate those rows
    and their partial sums on every call: 262 faults a call."""
    import subprocess
    import sys

    import fastbn

    # the fastbn this process imported (installed, with its extension, or a
    # built source tree), not the source tree in the working directory
    # (``python -c`` puts that first on its path)
    home = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    env = dict(os.environ, FASTBN_WISDOM="off",
               PYTHONPATH=os.pathsep.join([home, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, backend], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    assert len(found) >= 6
    row_pages = 256 * 196 * 8 // 4096
    faulted = [(pass_name, plan, faults) for pass_name, plan, faults in found
               if faults >= row_pages]
    assert not faulted
