"""The seed-004 example: matrix-form gradients of relu(BN(X G1)) G2 around
batchnorm_backward, against centred differences and the per-node loops."""
import importlib.util
from pathlib import Path

import pytest

from fastbn.gradcheck import rel_error

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "matrix_form.py"
PARAMS = ("G1", "G2", "gamma", "beta")


def _load_example():
    spec = importlib.util.spec_from_file_location("matrix_form_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(scope="module")
def problem():
    p = example.make_problem(seed=1)
    args = (p["X"], p["y"], p["G1"], p["G2"], p["gamma"], p["beta"])
    return args, example.gradients_numerical(*args), example.gradients_loop(*args)


def test_loop_form_matches_numerical(problem):
    args, numerical, loop = problem
    for name in PARAMS:
        assert loop[name].shape == numerical[name].shape
        assert rel_error(loop[name], numerical[name]) < 1e-6, name


def test_closed_form_matches_loop(problem):
    args, numerical, loop = problem
    closed = example.gradients_closed_form(*args)
    for name in PARAMS:
        assert rel_error(closed[name], loop[name]) < 1e-12, name


def test_matrix_form_on_backend(problem, backend):
    if backend == "cuda":
        pytest.skip("CPU backends: the example runs on host arrays")
    args, numerical, loop = problem
    matrix = example.gradients_matrix(*args, backend=backend)
    for name in PARAMS:
        assert matrix[name].shape == numerical[name].shape
        assert rel_error(matrix[name], numerical[name]) < 1e-6, name
        assert rel_error(matrix[name], loop[name]) < 1e-12, name


def test_constant_statistics_shortcut_is_not_the_gradient(problem):
    """Treating the column mean and spread as constants misses two terms of dZ."""
    args, numerical, loop = problem
    shortcut = example.constant_statistics_G1(*args)
    assert rel_error(shortcut, numerical["G1"]) > 1e-2


def test_example_runs(capsys):
    example.main()
    printed = capsys.readouterr().out
    assert "vs numerical" in printed and "not the gradient" in printed
