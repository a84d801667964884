"""fastbn.nn.BatchNorm against torch.nn.BatchNorm1d/2d (float64), its state
dict, its modes and its errors."""
import numpy as np
import pytest

import fastbn
from fastbn.nn import BatchNorm

from conftest import sim_skip_slow

torch = pytest.importorskip("torch")

TOL = 1e-12


def _torch_layer(ndim, channels, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[ndim]
    return cls(channels, dtype=torch.float64, **kwargs)


def _close(a, b, tol=TOL):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b.detach().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    return np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


def _step_both(layer, reference, x, dout):
    """One forward and backward of the layer and of its PyTorch reference on
    the same ``x`` and ``dout``; asserts that outputs and input gradients agree."""
    out = layer.forward(x)
    dx = layer.backward(dout)
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = reference(xt)
    out_t.backward(torch.from_numpy(dout))
    assert _close(out, out_t)
    assert _close(dx, xt.grad)


@pytest.mark.parametrize("shape", [(16, 5), (8, 4, 7), (6, 3, 5, 4)])
@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_over_train_and_eval_steps(backend, shape, momentum, affine):
    """Outputs, input/parameter gradients, running statistics and the batch
    counter follow PyTorch over several training steps, then in eval mode."""
    if backend == "cuda":
        sim_skip_slow()
    rng = np.random.default_rng(1)
    channels = shape[1]
    layer = BatchNorm(channels, momentum=momentum, affine=affine, dtype=np.float64,
                      backend=backend)
    reference = _torch_layer(len(shape), channels, momentum=momentum, affine=affine)
    if affine:
        layer.gamma[...] = rng.uniform(0.5, 2.0, channels)
        layer.beta[...] = rng.standard_normal(channels)
        with torch.no_grad():
            reference.weight.copy_(torch.from_numpy(layer.gamma))
            reference.bias.copy_(torch.from_numpy(layer.beta))

    for step in range(4):
        x = 3.0 * rng.standard_normal(shape) + rng.standard_normal()
        dout = rng.standard_normal(shape)
        _step_both(layer, reference, x, dout)
        if affine:
            assert _close(layer.grad_gamma, reference.weight.grad)
            assert _close(layer.grad_beta, reference.bias.grad)
            reference.weight.grad = None
            reference.bias.grad = None
        else:
            assert layer.grad_gamma is None and layer.grad_beta is None
        assert _close(layer.running_mean, reference.running_mean)
        assert _close(layer.running_var, reference.running_var)
        assert layer.num_batches_tracked == int(reference.num_batches_tracked) == step + 1

    assert layer.eval() is layer and not layer.training
    reference.eval()
    x = rng.standard_normal(shape)
    dout = rng.standard_normal(shape)
    running_before = layer.running_mean.copy()
    _step_both(layer, reference, x, dout)
    np.testing.assert_array_equal(layer.running_mean, running_before)
    assert layer.num_batches_tracked == 4
    assert layer.train() is layer and layer.training


def test_no_running_stats_uses_batch_statistics_in_eval():
    rng = np.random.default_rng(2)
    layer = BatchNorm(4, track_running_stats=False, dtype=np.float64)
    reference = torch.nn.BatchNorm1d(4, track_running_stats=False, dtype=torch.float64)
    assert layer.running_mean is None and layer.running_var is None
    layer.eval()
    reference.eval()
    x = rng.standard_normal((10, 4)) * 2 + 1
    assert _close(layer.forward(x), reference(torch.from_numpy(x)))
    assert layer.num_batches_tracked == 0
    assert set(layer.state_dict()) == {"weight", "bias"} == set(reference.state_dict())


def test_channels_last_matches_channels_first():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 5, 6))
    first = BatchNorm(3, dtype=np.float64)
    last = BatchNorm(3, axis=-1, dtype=np.float64)
    out_first = first.forward(x)
    out_last = last.forward(np.moveaxis(x, 1, -1))
    np.testing.assert_allclose(np.moveaxis(out_last, -1, 1), out_first, rtol=0, atol=1e-12)
    np.testing.assert_allclose(last.running_var, first.running_var, rtol=1e-12)


def test_backward_methods_agree_and_match_functions(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12, 6))
    dout = rng.standard_normal((12, 6))
    layer = BatchNorm(6, dtype=np.float64, backend=backend)
    layer.gamma[...] = rng.uniform(0.5, 1.5, 6)
    out = layer.forward(x)
    dx_simplified = layer.backward(dout)
    dgamma_simplified = layer.grad_gamma.copy()
    dx_staged = layer.backward(dout, method="staged")
    assert fastbn.gradcheck.rel_error(dx_simplified, dx_staged) < 1e-10
    assert fastbn.gradcheck.rel_error(dgamma_simplified, layer.grad_gamma) < 1e-10
    expected, cache = fastbn.batchnorm_forward(x, layer.gamma, layer.beta, backend=backend)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(dx_simplified, fastbn.batchnorm_backward(dout, cache)[0])


def test_float32_layer():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    layer = BatchNorm(8)
    assert layer.gamma.dtype == np.float32 and layer.running_var.dtype == np.float32
    out = layer.forward(x)
    assert out.dtype == np.float32
    assert layer.backward(np.ones_like(out)).dtype == np.float32


def test_state_dict_round_trip_with_torch():
    rng = np.random.default_rng(6)
    layer = BatchNorm(5, momentum=None, dtype=np.float64)
    layer.gamma[...] = rng.uniform(0.5, 2.0, 5)
    layer.beta[...] = rng.standard_normal(5)
    for _ in range(3):
        layer.forward(rng.standard_normal((7, 5, 3, 3)) * 2 + 1)

    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var",
                           "num_batches_tracked"]
    reference = torch.nn.BatchNorm2d(5, momentum=None, dtype=torch.float64)
    assert set(reference.state_dict()) == set(state)
    reference.load_state_dict({key: torch.from_numpy(np.asarray(value))
                               for key, value in state.items()})
    assert int(reference.num_batches_tracked) == 3

    # One more training step on both: the cumulative average continues from 3 batches.
    x = rng.standard_normal((7, 5, 3, 3))
    layer.forward(x)
    reference(torch.from_numpy(x))
    assert _close(layer.running_var, reference.running_var)

    # And back: a fresh layer loads torch's state.
    fresh = BatchNorm(5, momentum=None, dtype=np.float64)
    fresh.load_state_dict(reference.state_dict())
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value.numpy())
    assert fresh.num_batches_tracked == 4
    fresh.eval()
    reference.eval()
    x = rng.standard_normal((2, 5, 3, 3))
    assert _close(fresh.forward(x), reference(torch.from_numpy(x)))


def test_state_dict_is_a_copy_and_reset():
    layer = BatchNorm(3)
    state = layer.state_dict()
    state["running_mean"][...] = 7
    assert np.all(layer.running_mean == 0)
    layer.forward(np.arange(12, dtype=np.float32).reshape(4, 3))
    assert layer.num_batches_tracked == 1 and np.any(layer.running_mean != 0)
    layer.reset_running_stats()
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_features": 0}, ValueError, "num_features"),
    ({"num_features": 2.5}, ValueError, "num_features"),
    ({"num_features": 3, "eps": -1.0}, ValueError, "eps"),
    ({"num_features": 3, "eps": float("nan")}, ValueError, "eps"),
    ({"num_features": 3, "momentum": 1.5}, ValueError, "momentum"),
    ({"num_features": 3, "momentum": float("nan")}, ValueError, "momentum"),
    ({"num_features": 3, "dtype": np.int32}, TypeError, "int32"),
    ({"num_features": 3, "axis": 1.0}, ValueError, "axis"),
    ({"num_features": 3, "backend": "no-such-backend"}, ValueError, "available backends"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNorm(**kwargs)


def test_unavailable_backend_is_a_runtime_error():
    unavailable = [name for name, info in fastbn.backend_info().items() if not info["available"]]
    if not unavailable:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=unavailable[0]):
        BatchNorm(3, backend=unavailable[0])


@pytest.mark.parametrize("x, error, match", [
    (np.ones((4, 3), dtype=np.int64), TypeError, "int64"),
    (np.ones((4, 3), dtype=np.complex128), TypeError, "complex128"),
    (np.ones(3), ValueError, "at least 2 dimensions"),
    (np.ones((4, 0)), ValueError, "expected 3 channels"),
    (np.ones((4, 5)), ValueError, "expected 3 channels"),
    (np.ones((1, 3)), ValueError, "Expected more than 1 value per channel when training"),
])
def test_forward_errors_change_nothing(x, error, match):
    layer = BatchNorm(3)
    state = layer.state_dict()
    with pytest.raises(error, match=match):
        layer.forward(x)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((4, 3)))


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        BatchNorm(3, axis=5).forward(np.ones((4, 3)))


def test_backward_errors():
    layer = BatchNorm(3)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((4, 3), dtype=np.float32))
    layer.forward(np.arange(12, dtype=np.float32).reshape(4, 3))
    with pytest.raises(ValueError, match="dout"):
        layer.backward(np.ones((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="dout"):
        layer.backward(np.ones((4, 3), dtype=np.float64))
    with pytest.raises(ValueError, match="method"):
        layer.backward(np.ones((4, 3), dtype=np.float32), method="fast")


def test_load_state_dict_errors_change_nothing():
    layer = BatchNorm(3)
    good = layer.state_dict()
    with pytest.raises(KeyError, match="missing keys \\['weight'\\]"):
        layer.load_state_dict({k: v for k, v in good.items() if k != "weight"})
    with pytest.raises(KeyError, match="unexpected keys \\['extra'\\]"):
        layer.load_state_dict({**good, "extra": np.zeros(3)})
    bad = {**good, "running_mean": np.full(3, 5.0), "running_var": np.zeros(4)}
    with pytest.raises(ValueError, match="running_var must have shape"):
        layer.load_state_dict(bad)
    np.testing.assert_array_equal(layer.running_mean, 0)
    partial = BatchNorm(3)
    partial.load_state_dict({"running_mean": np.full(3, 2.0)}, strict=False)
    np.testing.assert_array_equal(partial.running_mean, 2.0)


# ---------------------------------------------------------------------------
# Where PyTorch 2.13's BatchNorm*d differs from the layer's first version:
# bias=False, an empty batch, eps <= 0 in training.
# ---------------------------------------------------------------------------
def test_bias_false_is_a_scale_without_shift(backend):
    rng = np.random.default_rng(7)
    layer = BatchNorm(4, bias=False, dtype=np.float64, backend=backend)
    reference = torch.nn.BatchNorm1d(4, bias=False, dtype=torch.float64)
    assert layer.beta is None and reference.bias is None
    assert list(layer.state_dict()) == list(reference.state_dict())
    assert "bias=False" in repr(layer)
    layer.gamma[...] = rng.uniform(0.5, 2.0, 4)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(layer.gamma))
    x, dout = rng.standard_normal((6, 4, 5)), rng.standard_normal((6, 4, 5))
    _step_both(layer, reference, x, dout)
    assert _close(layer.grad_gamma, reference.weight.grad)
    assert layer.grad_beta is None
    assert _close(layer.running_mean, reference.running_mean)
    assert _close(layer.running_var, reference.running_var)
    state = reference.state_dict()
    fresh = BatchNorm(4, bias=False, dtype=np.float64)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.gamma, state["weight"].numpy())
    with pytest.raises(KeyError, match="bias"):
        fresh.load_state_dict({**state, "bias": torch.zeros(4, dtype=torch.float64)})


@pytest.mark.parametrize("shape", [(0, 5, 9), (0, 5), (3, 5, 0)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(backend, shape, training):
    """PyTorch's rule: empty output and input gradient, zero parameter
    gradients, running statistics unchanged, the batch still counted."""
    rng = np.random.default_rng(8)
    layer = BatchNorm(5, momentum=0.3, dtype=np.float64, backend=backend).train(training)
    layer.running_mean[...] = rng.standard_normal(5)
    layer.running_var[...] = rng.uniform(0.5, 2.0, 5)
    before = layer.state_dict()
    out = layer.forward(np.empty(shape))
    dx = layer.backward(np.empty(shape))
    assert out.shape == shape and dx.shape == shape
    np.testing.assert_array_equal(layer.grad_gamma, np.zeros(5))
    np.testing.assert_array_equal(layer.grad_beta, np.zeros(5))
    np.testing.assert_array_equal(layer.running_mean, before["running_mean"])
    np.testing.assert_array_equal(layer.running_var, before["running_var"])
    assert layer.num_batches_tracked == (1 if training else 0)


@pytest.mark.parametrize("eps", [0.0, 5e-324])
def test_eps_positive_in_training_zero_allowed_in_eval(eps):
    layer = BatchNorm(3, eps=eps, dtype=np.float64)
    x = np.random.default_rng(9).standard_normal((4, 3))
    if eps == 0.0:
        with pytest.raises(ValueError, match="eps must be positive"):
            layer.forward(x)
        assert layer.num_batches_tracked == 0
    else:
        layer.forward(x)
    out = layer.eval().forward(x)
    np.testing.assert_allclose(out, (x - layer.running_mean) / np.sqrt(layer.running_var + eps),
                               rtol=1e-14)
