"""fastbn in worker processes: ``fork``, ``forkserver`` and ``spawn``.

Each case runs tests/fork_worker.py in a new interpreter with a timeout, so
that a worker that hangs fails the test instead of stalling the run. The
worker program checks that every worker's results are bit for bit the
parent's (the kernels split their work by shape only, so one thread and
several give the same bits); here the test checks that it said so, that
nothing was written to stderr, and for numba that the threading layer asked
for is the one that ran.
"""
import os
import subprocess
import sys

import pytest

from conftest import BACKENDS

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fork_worker.py")
TIMEOUT = 240   # seconds; a cold numba cache compiles the kernels in the parent first

CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]


def layer_env(layer):
    """The environment of a worker asking numba for ``layer`` (None: its default).

    The ``tbb`` package from PyPI puts ``libtbb`` in the environment's
    ``lib/``, which is not on the loader's path outside conda: it is added.
    """
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    if layer == "tbb":
        paths = [os.path.join(sys.prefix, "lib"), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _loadable(layer):
    module = f"numba.np.ufunc.{layer}pool" if layer != "workqueue" else "numba.np.ufunc.workqueue"
    done = subprocess.run([sys.executable, "-c", f"import {module}"], env=layer_env(layer),
                          capture_output=True, timeout=TIMEOUT)
    return done.returncode == 0


def numba_layers():
    """numba's threading layers, each skipped where it cannot load."""
    if "numba" not in CPU_BACKENDS:
        return []
    return [pytest.param(layer, id=layer, marks=[] if _loadable(layer) else
                         [pytest.mark.skip(reason=f"numba's {layer} layer cannot load here")])
            for layer in ("omp", "tbb", "workqueue")]


def run_worker(backend, scenario, method="fork", layer=None):
    """Run the worker program; return its stdout, after checking it passed."""
    env = layer_env(layer)
    # Python 3.12+ warns (DeprecationWarning) when a process with threads
    # forks; that is its own notice, not fastbn's, so it is silenced here.
    command = [sys.executable, "-W", "ignore::DeprecationWarning", WORKER, backend,
               scenario, method]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                              env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{backend} {scenario} {method}: no result within {TIMEOUT} s "
                    f"(a hang); stderr: {exc.stderr!r}")
    assert done.returncode == 0, (f"{backend} {scenario} {method} exited with "
                                  f"{done.returncode}\nstdout: {done.stdout}\n"
                                  f"stderr: {done.stderr}")
    assert done.stderr == "", f"{backend} {scenario} {method} wrote to stderr: {done.stderr}"
    words = done.stdout.split()
    assert words[:4] == ["ok", backend, scenario, method], done.stdout
    return words


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_worker_process_matches_parent(backend, method):
    run_worker(backend, "process", method)


@pytest.mark.parametrize("scenario", ["pool", "imported", "threads", "grandchild"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forked_workers_match_parent(backend, scenario):
    run_worker(backend, scenario)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dataloader_with_forked_workers(backend):
    pytest.importorskip("torch")
    run_worker(backend, "dataloader")


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba backend not available")
@pytest.mark.parametrize("scenario", ["process", "pool", "threads", "grandchild"])
@pytest.mark.parametrize("layer", numba_layers())
def test_numba_threading_layers_survive_fork(layer, scenario):
    words = run_worker("numba", scenario, "fork", layer=layer)
    assert words[-1] == layer, f"asked for the {layer} layer, ran {words[-1]}"
