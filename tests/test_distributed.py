"""Synchronized batch norm over MPI: fastbn.distributed under ``mpiexec``.

Each MPI run is one ``mpiexec -n P python tests/mpi_worker.py ...`` in a
subprocess, with a timeout so that a hang (a rank left waiting in a
collective) fails the test instead of blocking the suite. The worker writes
what it measured as JSON; the assertions are here.

Needs the ``[mpi]`` extra (mpi4py and an MPI with ``mpiexec``). Without it
the MPI tests are skipped, except under CI (``CI`` set), where .ci/run
installs the extra and a missing MPI is a failure.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BACKENDS

WORKER = Path(__file__).with_name("mpi_worker.py")
TIMEOUT_S = 300
CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]
RANK_COUNTS = (2, 3)


def _mpiexec():
    """Path of ``mpiexec`` (next to this Python first), or None."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which("mpiexec", path=path)


def _mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'fastbn[mpi]')"
    if _mpiexec() is None:
        return "mpiexec not found (pip install 'fastbn[mpi]')"
    return None


def _require_mpi():
    if not CPU_BACKENDS:
        pytest.skip("no CPU backend selected (FASTBN_TEST_BACKENDS)")
    reason = _mpi_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the MPI tests: {reason}")
    pytest.skip(reason)


def run_mpi(ranks, mode, result_path, backends=()):
    """Run the worker on ``ranks`` processes; return its JSON result."""
    run_mpiexec(ranks, [str(WORKER), mode, str(result_path), *backends])
    return json.loads(Path(result_path).read_text())


def run_mpiexec(ranks, arguments):
    """``mpiexec -n ranks python arguments...``, one thread per rank; fail on
    a non-zero exit or after TIMEOUT_S seconds."""
    command = [_mpiexec(), "-n", str(ranks), sys.executable, *arguments]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    # Own process group, so that a timeout ends mpiexec and every rank.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"mpiexec -n {ranks} {arguments} did not finish in {TIMEOUT_S} s "
                    f"(a rank left waiting?); output:\n{output[-4000:]}")
    assert process.returncode == 0, f"mpiexec -n {ranks} {arguments} failed:\n{output[-4000:]}"


@pytest.fixture(scope="module", params=RANK_COUNTS, ids=lambda n: f"{n}ranks")
def parity_run(request, tmp_path_factory):
    _require_mpi()
    path = tmp_path_factory.mktemp("mpi") / f"parity{request.param}.json"
    return run_mpi(request.param, "parity", path, CPU_BACKENDS)


@pytest.fixture(scope="module", params=RANK_COUNTS, ids=lambda n: f"{n}ranks")
def mismatch_run(request, tmp_path_factory):
    _require_mpi()
    path = tmp_path_factory.mktemp("mpi") / f"mismatch{request.param}.json"
    return run_mpi(request.param, "mismatch", path)


# Relative tolerances of the issue: the largest difference over the array,
# divided by the reference's largest magnitude.
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}
LAYOUTS = ("nd", "nchw", "nhwc")
SPLITS = ("unequal", "empty")


def _cases(run, backend, dtype):
    return [case for case in run["cases"]
            if case["backend"] == backend and case["dtype"] == dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_parity_with_single_process(parity_run, backend, dtype):
    cases = _cases(parity_run, backend, dtype)
    # every layout, split and mode ran
    assert {(c["layout"], c["split"], c["mode"]) for c in cases} == {
        (layout, split, mode) for layout in LAYOUTS for split in SPLITS
        for mode in ("train", "eval")}
    assert any(0 in c["sizes"] for c in cases)
    assert any(len(set(c["sizes"])) == parity_run["ranks"] and 0 not in c["sizes"]
               for c in cases)
    for case in cases:
        label = (f"{case['layout']} {case['split']} {case['sizes']} {case['mode']} "
                 f"on {parity_run['ranks']} ranks")
        for name, diff in case["diffs"].items():
            assert diff <= TOLERANCE[dtype], f"{name} differs by {diff:.3g}: {label}"
        assert case["dtypes_ok"], label
        assert case["running_changed"] == (case["mode"] == "train"), label


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_statistics_bitwise_equal_on_every_rank(parity_run, backend):
    cases = [c for c in parity_run["cases"] if c["backend"] == backend]
    assert cases
    for case in cases:
        assert case["bitwise"], (f"mean/invstd/running stats/dgamma/dbeta differ between "
                                 f"ranks: {case}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sync_layer_matches_single_process_layer(parity_run, backend):
    """fastbn.nn.SyncBatchNorm on the slices = fastbn.nn.BatchNorm on the whole
    batch: outputs, gradients, three gradient steps, running statistics,
    state dict; momentum 0.1 and None (cumulative average)."""
    layers = [c for c in parity_run["layers"] if c["backend"] == backend]
    assert {c["momentum"] for c in layers} == {0.1, None}
    for case in layers:
        for name, diff in case["diffs"].items():
            assert diff <= 1e-12, f"{name} differs by {diff:.3g}: {case}"
        assert case["state_diff"] <= 1e-12, case
        assert case["same_keys"] and case["num_batches_tracked"] == 3, case
        assert case["bitwise"], case


# scenario -> (error type, text the message must contain)
EXPECTED_ERRORS = {
    "channels": ("ValueError", "the ranks disagree on the number of channels"),
    "dtype": ("ValueError", "the ranks disagree on the dtype"),
    "axis": ("ValueError", "the ranks disagree on the channel axis"),
    "ndim": ("ValueError", "the ranks disagree on the number of dimensions"),
    "mode": ("ValueError", "the ranks disagree on the mode"),
    "eps": ("ValueError", "the ranks disagree on eps"),
    "eps_zero_training": ("ValueError", "eps must be positive in training mode, got 0.0"),
    "integer_dtype": ("TypeError", "got dtype int64 (on rank {last} of {size})"),
    "gamma_shape": ("ValueError", "gamma must have shape (3,)"),
    "backend_name": ("ValueError", "unknown backend 'no-such-backend'"),
    "method_staged": ("ValueError", "method='staged' is not available"),
    "method_unknown": ("ValueError", "method must be 'simplified' or 'staged'"),
    "dout_shape": ("ValueError", "dout must have the forward input's shape"),
    "too_few_values": ("ValueError", "Expected more than 1 value per channel when training"),
    "layer_channels": ("ValueError", "expected 3 channels on axis 1"),
}


@pytest.mark.parametrize("scenario", sorted(EXPECTED_ERRORS))
def test_mismatch_raises_same_error_on_every_rank(mismatch_run, scenario):
    size = mismatch_run["ranks"]
    result = mismatch_run["scenarios"][scenario]
    outcomes = result["outcomes"]
    assert len(outcomes) == size
    assert all(outcome is not None for outcome in outcomes), outcomes
    assert all(outcome == outcomes[0] for outcome in outcomes), outcomes
    kind, text = EXPECTED_ERRORS[scenario]
    assert outcomes[0][0] == kind
    assert text.format(last=size - 1, size=size) in outcomes[0][1]
    # no rank was left behind in a collective: the next call ran in step
    assert result["in_step_after"]


def test_missing_mpi4py_names_the_extra():
    """Without mpi4py, importing fastbn.distributed says which extra to install,
    and the rest of fastbn imports without touching MPI."""
    code = (
        "import sys\n"
        "sys.modules['mpi4py'] = None\n"   # makes `import mpi4py` raise ImportError
        "import importlib, importlib.util, fastbn\n"
        "if importlib.util.find_spec('fastbn.nn'): importlib.import_module('fastbn.nn')\n"
        "assert 'fastbn.distributed' not in sys.modules\n"
        "try:\n"
        "    import fastbn.distributed\n"
        "except ImportError as exc:\n"
        "    print('IMPORTERROR', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORTERROR" in result.stdout
    assert "fastbn[mpi]" in result.stdout


def test_fastbn_does_not_import_mpi():
    code = ("import importlib, importlib.util, sys, fastbn\n"
            "if importlib.util.find_spec('fastbn.nn'): importlib.import_module('fastbn.nn')\n"
            "print(sorted(m for m in sys.modules if m.startswith('mpi4py')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sync_batchnorm_train.py"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not in this tree")
def test_example_same_losses_on_1_2_3_ranks(tmp_path):
    """The data-parallel example gives the losses of one process on 2 and 3
    ranks (same global batches, float64; only the order of sums differs)."""
    _require_mpi()
    losses = {}
    for ranks in (1, 2, 3):
        run_mpiexec(ranks, [str(EXAMPLE), "--steps", "8",
                            "--json", str(tmp_path / f"example{ranks}.json")])
        losses[ranks] = json.loads((tmp_path / f"example{ranks}.json").read_text())["losses"]
    assert len(losses[1]) == 8
    assert losses[1][-1] < losses[1][0]          # it trains
    for ranks in (2, 3):
        for one, many in zip(losses[1], losses[ranks]):
            assert abs(many - one) <= 1e-10 * abs(one), (ranks, losses)


FCNET_EXAMPLE = EXAMPLE.with_name("sync_batchnorm_fcnet.py")


@pytest.mark.skipif(not FCNET_EXAMPLE.exists(), reason="examples/ not in this tree")
def test_fcnet_example_same_losses_on_1_and_2_ranks(tmp_path):
    """The seed-003 net with SyncBatchNorm, data-parallel on the digits:
    the losses of 2 ranks are those of 1 process on the same global batches."""
    _require_mpi()
    pytest.importorskip("sklearn", reason="the digits need the [experiments] extra")
    losses = {}
    for ranks in (1, 2):
        path = tmp_path / f"fcnet{ranks}.json"
        run_mpiexec(ranks, [str(FCNET_EXAMPLE), "--steps", "6", "--json", str(path)])
        losses[ranks] = json.loads(path.read_text())["losses"]
    assert len(losses[1]) == 6
    assert losses[1][-1] < losses[1][0]          # it trains
    for one, two in zip(losses[1], losses[2]):
        assert abs(two - one) <= 1e-10 * abs(one), losses
