"""``fastbn.fold_batchnorm``: a layer followed by evaluation-mode batch norm
equals the folded layer.

The layers are computed here with plain NumPy (a matrix product for dense
layers, an explicit sum over patches for a 2-D convolution, itself checked
against PyTorch's ``conv2d``); the batch norm is fastbn's, on every backend.
"""
import numpy as np
import pytest

import fastbn
from conftest import Snapshot, normwise_error

EPS = 1e-5


def bn_params(rng, channels):
    """gamma, beta, running_mean, running_var (float64), with varied scales."""
    gamma = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.standard_normal(channels)
    running_mean = 3 * rng.standard_normal(channels)
    running_var = rng.uniform(0.1, 4.0, channels)
    return gamma, beta, running_mean, running_var


def eval_bn(z, gamma, beta, running_mean, running_var, axis, backend, eps=EPS):
    out, _ = fastbn.batchnorm_forward(z, gamma, beta, training=False,
                                      running_mean=running_mean, running_var=running_var,
                                      eps=eps, axis=axis, backend=backend)
    return out


def conv2d(x, weight, bias):
    """Valid 2-D cross-correlation, stride 1: out[n, o, i, j] =
    sum_{c, u, v} weight[o, c, u, v] * x[n, c, i + u, j + v] + bias[o]."""
    kh, kw = weight.shape[2:]
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    out = np.einsum("ncijuv,ocuv->noij", patches, weight)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def assert_equal_to_1e12(folded, reference, what):
    err = normwise_error(folded, reference)
    assert err <= 1e-12, f"{what}: normwise relative error {err:.2e}"


# ---------------------------------------------------------------------------
# the folded layer equals layer + evaluation batch norm
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_dense_layer(backend, rng, with_bias):
    """Linear weight (out, in), axis=0: x @ W.T + b, then batch norm over features."""
    n_in, n_out = 7, 5
    x = rng.standard_normal((12, n_in))
    weight = rng.standard_normal((n_out, n_in))
    bias = rng.standard_normal(n_out) if with_bias else None
    gamma, beta, rm, rv = bn_params(rng, n_out)
    snap = Snapshot(x=x, weight=weight, bias=bias, gamma=gamma, beta=beta, rm=rm, rv=rv)

    z = x @ weight.T + (bias if with_bias else 0.0)
    expected = eval_bn(z, gamma, beta, rm, rv, axis=1, backend=backend)
    folded_w, folded_b = fastbn.fold_batchnorm(weight, bias, rm, rv, gamma, beta, eps=EPS)
    snap.assert_unchanged()

    assert folded_w.shape == weight.shape and folded_w.dtype == np.float64
    assert folded_b.shape == (n_out,) and folded_b.dtype == np.float64
    assert not np.shares_memory(folded_w, weight)
    assert_equal_to_1e12(x @ folded_w.T + folded_b, expected, "dense")
    # the folding is not the identity: the batch norm really acted
    assert normwise_error(z, expected) > 1e-2


def test_conv2d_weight(backend, rng):
    """Conv2d weight (out, in, kh, kw), axis=0: an explicit convolution, then
    batch norm over the output channels (NCHW, axis=1)."""
    x = rng.standard_normal((2, 3, 6, 5))
    weight = rng.standard_normal((4, 3, 3, 2))
    bias = rng.standard_normal(4)
    gamma, beta, rm, rv = bn_params(rng, 4)
    snap = Snapshot(x=x, weight=weight, bias=bias, gamma=gamma, beta=beta, rm=rm, rv=rv)

    z = conv2d(x, weight, bias)
    assert z.shape == (2, 4, 4, 4)
    expected = eval_bn(z, gamma, beta, rm, rv, axis=1, backend=backend)
    folded_w, folded_b = fastbn.fold_batchnorm(weight, bias, rm, rv, gamma, beta, eps=EPS,
                                               axis=0)
    snap.assert_unchanged()
    assert folded_w.shape == weight.shape
    assert_equal_to_1e12(conv2d(x, folded_w, folded_b), expected, "conv2d")


def test_conv2d_helper_matches_torch(rng):
    """The test's own convolution is PyTorch's conv2d (float64)."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 6, 5))
    weight = rng.standard_normal((4, 3, 3, 2))
    bias = rng.standard_normal(4)
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight),
                                      torch.from_numpy(bias)).numpy()
    np.testing.assert_allclose(conv2d(x, weight, bias), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("axis", [1, -1])
def test_transposed_dense_weight(backend, rng, axis):
    """An (in, out) weight with axis=1 (or -1): x @ W + b, then batch norm."""
    n_in, n_out = 6, 4
    x = rng.standard_normal((9, n_in))
    weight = rng.standard_normal((n_in, n_out))
    bias = rng.standard_normal(n_out)
    gamma, beta, rm, rv = bn_params(rng, n_out)
    expected = eval_bn(x @ weight + bias, gamma, beta, rm, rv, axis=1, backend=backend)
    folded_w, folded_b = fastbn.fold_batchnorm(weight, bias, rm, rv, gamma, beta, eps=EPS,
                                               axis=axis)
    assert folded_w.shape == (n_in, n_out)
    assert_equal_to_1e12(x @ folded_w + folded_b, expected, "transposed dense")
    # the same folding as the (out, in) layout's
    w0, b0 = fastbn.fold_batchnorm(weight.T, bias, rm, rv, gamma, beta, eps=EPS, axis=0)
    np.testing.assert_array_equal(folded_w, w0.T)
    np.testing.assert_array_equal(folded_b, b0)


def test_conv_transpose_weight_axis1(rng):
    """ConvTranspose2d's (in, out, kh, kw): axis=1 scales output channels."""
    weight = rng.standard_normal((3, 5, 2, 2))
    gamma, beta, rm, rv = bn_params(rng, 5)
    folded_w, folded_b = fastbn.fold_batchnorm(weight, None, rm, rv, gamma, beta, axis=1)
    scale = gamma / np.sqrt(rv + EPS)
    np.testing.assert_allclose(folded_w, weight * scale.reshape(1, 5, 1, 1), rtol=1e-15)
    np.testing.assert_allclose(folded_b, beta - rm * scale, rtol=1e-14, atol=1e-15)


def test_defaults_gamma_beta_eps(backend, rng):
    """gamma=None / beta=None mean ones / zeros, eps defaults to 1e-5."""
    x = rng.standard_normal((8, 5))
    weight = rng.standard_normal((3, 5))
    _, _, rm, rv = bn_params(rng, 3)
    expected = eval_bn(x @ weight.T, None, None, rm, rv, axis=1, backend=backend)
    folded_w, folded_b = fastbn.fold_batchnorm(weight, None, rm, rv)
    assert_equal_to_1e12(x @ folded_w.T + folded_b, expected, "defaults")


def test_eps_is_used(rng):
    weight = rng.standard_normal((3, 4))
    _, _, rm, _ = bn_params(rng, 3)
    rv = np.array([1e-6, 0.0, 2.0])
    w1, _ = fastbn.fold_batchnorm(weight, None, rm, rv, eps=1e-3)
    np.testing.assert_allclose(w1, weight / np.sqrt(rv + 1e-3).reshape(3, 1), rtol=1e-15)
    w0, _ = fastbn.fold_batchnorm(weight, None, rm, rv + 1.0, eps=0.0)
    np.testing.assert_allclose(w0, weight / np.sqrt(rv + 1.0).reshape(3, 1), rtol=1e-15)


def test_float32_weight_rounded_once(rng):
    """float32 weights: the float64 folding, rounded once to float32."""
    weight = rng.standard_normal((4, 6)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    gamma, beta, rm, rv = (a.astype(np.float32) for a in bn_params(rng, 4))
    w, b = fastbn.fold_batchnorm(weight, bias, rm, rv, gamma, beta)
    assert w.dtype == np.float32 and b.dtype == np.float32
    scale = gamma.astype(np.float64) / np.sqrt(rv.astype(np.float64) + EPS)
    np.testing.assert_array_equal(w, (weight.astype(np.float64) * scale[:, None])
                                  .astype(np.float32))
    np.testing.assert_array_equal(
        b, ((bias.astype(np.float64) - rm) * scale + beta.astype(np.float64)).astype(np.float32))


# ---------------------------------------------------------------------------
# bad input: clear errors, nothing modified
# ---------------------------------------------------------------------------
def _good(rng):
    weight = rng.standard_normal((4, 3, 2, 2))
    bias = rng.standard_normal(4)
    gamma, beta, rm, rv = bn_params(rng, 4)
    return dict(weight=weight, bias=bias, running_mean=rm, running_var=rv, gamma=gamma,
                beta=beta)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex128, object,
                                   np.float16])
def test_bad_weight_dtype(rng, dtype):
    args = _good(rng)
    args["weight"] = (args["weight"] * 3).astype(dtype)
    snap = Snapshot(**args)
    with pytest.raises(TypeError, match=str(np.dtype(dtype))):
        fastbn.fold_batchnorm(**args)
    snap.assert_unchanged()


@pytest.mark.parametrize("name", ["bias", "running_mean", "running_var", "gamma", "beta"])
@pytest.mark.parametrize("shape", [(3,), (5,), (4, 1), (1, 4), ()])
def test_bad_channel_shape(rng, name, shape):
    args = _good(rng)
    args[name] = np.ones(shape)
    snap = Snapshot(**args)
    with pytest.raises(ValueError) as info:
        fastbn.fold_batchnorm(**args)
    message = str(info.value)
    assert name in message and "(4,)" in message and str(shape) in message, message
    snap.assert_unchanged()


@pytest.mark.parametrize("name", ["bias", "running_mean", "running_var", "gamma", "beta"])
def test_bad_channel_dtype(rng, name):
    args = _good(rng)
    args[name] = np.ones(4, dtype=np.complex128)
    with pytest.raises(TypeError, match=name):
        fastbn.fold_batchnorm(**args)


@pytest.mark.parametrize("axis", [4, -5, 10])
def test_axis_out_of_range(rng, axis):
    args = _good(rng)
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\)"):
        fastbn.fold_batchnorm(**args, axis=axis)


@pytest.mark.parametrize("axis", [1.0, "0", None, True])
def test_axis_not_an_integer(rng, axis):
    with pytest.raises(ValueError, match="axis"):
        fastbn.fold_batchnorm(**_good(rng), axis=axis)


def test_axis_selects_the_channel_count(rng):
    """With axis=1 the per-channel arguments must have weight.shape[1] values."""
    args = _good(rng)   # 4 output channels along axis 0, 3 along axis 1
    with pytest.raises(ValueError, match=r"\(3,\)"):
        fastbn.fold_batchnorm(**args, axis=1)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), "1e-5", None])
def test_bad_eps(rng, eps):
    with pytest.raises(ValueError, match="eps"):
        fastbn.fold_batchnorm(**_good(rng), eps=eps)


def test_running_statistics_required(rng):
    args = _good(rng)
    for name in ("running_mean", "running_var"):
        bad = dict(args, **{name: None})
        with pytest.raises(ValueError, match=name):
            fastbn.fold_batchnorm(**bad)


def test_scalar_weight(rng):
    with pytest.raises(ValueError, match="weight"):
        fastbn.fold_batchnorm(np.float64(2.0), None, np.zeros(1), np.ones(1))


def test_lists_accepted_and_new_arrays_returned(rng):
    """Array-likes work; the results never alias the inputs."""
    weight = rng.standard_normal((2, 3))
    w, b = fastbn.fold_batchnorm(weight.tolist(), [0.5, -0.5], [0.0, 1.0], [1.0, 4.0],
                                 [1.0, 2.0], [0.0, 0.0], eps=0.0)
    np.testing.assert_allclose(w, weight * np.array([[1.0], [1.0]]), rtol=1e-15)
    np.testing.assert_allclose(b, [0.5, -1.5], rtol=1e-15)
    ones = np.ones(2)
    w2, b2 = fastbn.fold_batchnorm(weight, None, np.zeros(2), ones - EPS, eps=EPS)
    assert not np.shares_memory(w2, weight)
    np.testing.assert_allclose(w2, weight, rtol=1e-15)
    np.testing.assert_array_equal(b2, np.zeros(2))
