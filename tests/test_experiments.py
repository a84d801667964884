"""The seed-003 system: the fully-connected net (whole-network gradient
checks on every CPU backend), the solver, the digits data, the two
experiments (quick versions, qualitative results) and the CLI."""
import json

import numpy as np
import pytest

from conftest import BACKENDS
from fastbn.experiments import (FullyConnectedNet, Solver, adam, baseline_vs_batchnorm,
                                sgd_momentum, softmax_loss, weight_scale)
from fastbn.gradcheck import eval_numerical_gradient, rel_error

CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]

# Training runs: part of the main test run, not of the CUDA-simulator run
# (which selects only the cuda backend and deselects slow tests).
pytestmark = pytest.mark.slow


def _cpu_backend():
    """The reference backend when selected, else the first CPU backend selected."""
    if not CPU_BACKENDS:
        pytest.skip("no CPU backend selected (FASTBN_TEST_BACKENDS)")
    return "numpy" if "numpy" in CPU_BACKENDS else CPU_BACKENDS[0]

sklearn = pytest.importorskip("sklearn")
from fastbn.experiments import load_digits_data  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


# ---------------------------------------------------------------------------
# The net
# ---------------------------------------------------------------------------
def test_softmax_loss_gradient():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((6, 4))
    y = rng.integers(4, size=6)
    loss, dscores = softmax_loss(scores, y)
    assert abs(loss - (-np.mean(np.log(np.exp(scores[np.arange(6), y])
                                      / np.exp(scores).sum(axis=1))))) < 1e-12
    numerical = eval_numerical_gradient(lambda s: softmax_loss(s, y)[0], scores.copy())
    assert rel_error(dscores, numerical) < 1e-8


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("use_batchnorm", [False, True], ids=["baseline", "batchnorm"])
@pytest.mark.parametrize("reg", [0.0, 3.14])
def test_network_gradient_check(backend, use_batchnorm, reg):
    """The notebook's check (hidden layers of 20 and 30, 15 inputs, 10
    classes, weight scale 5e-2, float64), on a batch of 10 samples."""
    rng = np.random.default_rng(0)
    N, D, H1, H2, C = 10, 15, 20, 30, 10
    X = rng.standard_normal((N, D))
    y = rng.integers(C, size=N)
    model = FullyConnectedNet([H1, H2], input_dim=D, num_classes=C, reg=reg,
                              weight_scale=5e-2, dtype=np.float64,
                              use_batchnorm=use_batchnorm, seed=0, backend=backend)
    loss, grads = model.loss(X, y)
    assert np.isfinite(loss)
    expected = {f"W{i}" for i in (1, 2, 3)} | {f"b{i}" for i in (1, 2, 3)}
    if use_batchnorm:
        expected |= {"gamma1", "gamma2", "beta1", "beta2"}
    assert set(grads) == expected
    errors = {}
    for name in sorted(grads):
        numerical = eval_numerical_gradient(lambda _: model.loss(X, y)[0], model.params[name],
                                            h=1e-5)
        if use_batchnorm and name in ("b1", "b2"):
            # A bias before batch norm is removed by the mean: its gradient is zero.
            errors[name] = max(np.abs(numerical).max(), np.abs(grads[name]).max())
            assert errors[name] < 1e-9, (name, errors[name])
            continue
        errors[name] = rel_error(numerical, grads[name])
        limit = 1e-4 if name.startswith("W") else 1e-6
        assert errors[name] < limit, (name, errors)


def test_net_initialization_and_eval_scores():
    model = FullyConnectedNet([7, 5], input_dim=4, num_classes=3, use_batchnorm=True,
                              weight_scale=0.5, seed=3)
    assert model.params["W1"].shape == (4, 7) and model.params["W1"].dtype == np.float32
    assert abs(float(model.params["W1"].std()) - 0.5) < 0.2
    np.testing.assert_array_equal(model.params["gamma2"], 1)
    np.testing.assert_array_equal(model.params["beta1"], 0)
    same = FullyConnectedNet([7, 5], input_dim=4, num_classes=3, weight_scale=0.5, seed=3)
    np.testing.assert_array_equal(same.params["W2"], model.params["W2"])
    X = np.random.default_rng(0).standard_normal((8, 4))
    scores = model.loss(X)
    assert scores.shape == (8, 3)
    # Evaluation mode uses the running statistics: untouched by the call.
    assert model.bn_layers[0].num_batches_tracked == 0
    model.loss(X, np.zeros(8, dtype=int))
    assert model.bn_layers[0].num_batches_tracked == 1


# ---------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------
def test_update_rules_in_place():
    w = np.array([1.0, -2.0])
    dw = np.array([0.5, 0.5])
    config = {"learning_rate": 0.1, "momentum": 0.9}
    sgd_momentum(w, dw, config)
    np.testing.assert_allclose(w, [0.95, -2.05])
    sgd_momentum(w, dw, config)
    np.testing.assert_allclose(w, [0.95 - 0.095, -2.05 - 0.095])
    w = np.array([1.0, -2.0])
    config = {"learning_rate": 0.1}
    adam(w, np.array([0.5, -3.0]), config)
    # First Adam step moves each weight by about the learning rate, against the gradient.
    np.testing.assert_allclose(w, [0.9, -1.9], atol=1e-6)
    assert config["t"] == 1


def test_solver_records_and_keeps_best(digits):
    model = FullyConnectedNet([20], use_batchnorm=True, weight_scale=1e-1, seed=1)
    solver = Solver(model, digits, update_rule="adam", optim_config={"learning_rate": 1e-3},
                    batch_size=50, num_epochs=2, seed=1)
    solver.train()
    assert len(solver.loss_history) == 2 * 20
    assert len(solver.train_acc_history) == len(solver.val_acc_history) == 3
    assert solver.best_val_acc == max(solver.val_acc_history)
    # The best parameters are restored into the model.
    assert solver.check_accuracy(digits["X_val"], digits["y_val"]) == pytest.approx(
        solver.best_val_acc, abs=0.01)
    assert solver.time["step_s"] > solver.time["batchnorm_forward_s"] > 0
    with pytest.raises(ValueError, match="update_rule"):
        Solver(model, digits, update_rule="rmsprop")


def test_digits_split(digits):
    assert digits["X_train"].shape == (1000, 64)
    assert digits["X_val"].shape == (397, 64) and digits["X_test"].shape == (400, 64)
    assert set(np.unique(digits["y_train"])) == set(range(10))
    # Standardized with training statistics: training pixels have mean 0 and std 1 (or 0).
    np.testing.assert_allclose(digits["X_train"].mean(axis=0), 0, atol=1e-12)
    stds = digits["X_train"].std(axis=0)
    assert np.all((np.abs(stds - 1) < 1e-12) | (stds == 0))
    again = load_digits_data()
    np.testing.assert_array_equal(again["y_val"], digits["y_val"])


# ---------------------------------------------------------------------------
# The experiments, quick versions (3 epochs). Thresholds from measured runs:
# see docs/experiments.md.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quick_baseline_vs_batchnorm(backend, digits):
    result = baseline_vs_batchnorm(seed=0, backend=backend, quick=True, data=digits)
    base, bn = result["runs"]["baseline"], result["runs"]["batchnorm"]
    assert len(bn["val_acc_history"]) == 4 and len(bn["loss_history"]) == 60
    # Measured (seed 0): batch norm 0.96-0.97, baseline 0.34 best validation accuracy.
    assert bn["best_val_acc"] >= 0.9
    assert bn["best_val_acc"] - base["best_val_acc"] >= 0.4
    assert bn["final_loss"] < base["final_loss"]
    assert base["time"]["batchnorm_forward_s"] == 0
    assert 0 < bn["time"]["batchnorm_fraction_of_step"] < 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quick_weight_scale(backend, digits):
    result = weight_scale(seed=0, backend=backend, quick=True, data=digits)
    assert result["weight_scales"] == [1e-3, 1e-1]
    base, bn = result["baseline"], result["batchnorm"]
    # Measured (seed 0) at weight scale 1e-3: baseline 0.108 (chance: 0.1),
    # batch norm 0.58-0.59 best validation accuracy after 3 epochs.
    assert base["best_val_acc"][0] < 0.15
    assert bn["best_val_acc"][0] - base["best_val_acc"][0] >= 0.4
    assert bn["final_loss"][0] < base["final_loss"][0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_experiments_are_deterministic(backend, digits):
    kwargs = {"seed": 5, "backend": backend, "data": digits,
              "hidden_dims": [30, 30], "num_epochs": 1}
    first = baseline_vs_batchnorm(**kwargs)
    second = baseline_vs_batchnorm(**kwargs)
    for name in ("baseline", "batchnorm"):
        assert first["runs"][name]["loss_history"] == second["runs"][name]["loss_history"]
        assert first["runs"][name]["val_acc_history"] == second["runs"][name]["val_acc_history"]
    other = baseline_vs_batchnorm(**{**kwargs, "seed": 6})
    assert other["runs"]["batchnorm"]["loss_history"] != first["runs"]["batchnorm"]["loss_history"]


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["baseline-vs-batchnorm", "weight-scale"])
def test_cli_writes_png_and_json(name, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastbn.__main__ import main

    plot, data = tmp_path / "fig.png", tmp_path / "result.json"
    backend = _cpu_backend()
    code = main(["experiment", name, "--quick", "--no-progress", "--backend", backend,
                 "--seed", "1", "--plot", str(plot), "--json", str(data)])
    assert code == 0
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 10_000
    result = json.loads(data.read_text())
    assert result["experiment"] == name
    assert result["backend"] == backend and result["seed"] == 1 and result["quick"] is True
    runs = result["runs"] if name == "baseline-vs-batchnorm" else result
    for net in ("baseline", "batchnorm"):
        assert "batchnorm_fraction_of_step" in runs[net]["time"]
    printed = capsys.readouterr().out
    assert "batchnorm" in printed or "BN" in printed
    assert str(plot) in printed and str(data) in printed
