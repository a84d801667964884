"""Double backward of fastbn.torch.batch_norm: torch.autograd.gradgradcheck in
training and evaluation mode, float64, NCHW and channels-last, through the
eager path and through the registered operator; and the differentiable
gradient (create_graph=True, an explicit PyTorch formula) equals the one
fastbn's kernels give."""
import pytest

from conftest import BACKENDS

torch = pytest.importorskip("torch")
import fastbn.torch  # noqa: E402

CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]
if not CPU_BACKENDS:
    pytest.skip("no CPU backend selected (FASTBN_TEST_BACKENDS)", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(channels_last, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 3, 2, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(4, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    running_mean = torch.randn(4, generator=generator, dtype=torch.float64)
    running_var = torch.rand(4, generator=generator, dtype=torch.float64) + 0.5
    return x, weight, bias, running_mean, running_var


@pytest.fixture(params=["eager", "operator"])
def path(request, monkeypatch):
    """The eager autograd.Function, or the registered operator (as under torch.compile)."""
    if request.param == "operator":
        monkeypatch.setattr(fastbn.torch, "_use_operator", lambda input: True)
    return request.param


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradgradcheck(path, backend, training, channels_last):
    x, weight, bias, running_mean, running_var = _inputs(channels_last)

    def function(x, weight, bias):
        # copies: the check calls the function many times, and training
        # updates the running statistics it is given
        return fastbn.torch.batch_norm(x, running_mean.clone(), running_var.clone(), weight,
                                       bias, training=training, backend=backend)

    inputs = tuple(t.clone().requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_create_graph_gives_the_kernels_gradient(path, backend, training, activation, dtype):
    """The gradient built for a double backward equals the first-order one of
    fastbn's kernels: float64 to 1e-12; float32 within a few roundings of each
    term (float32 arithmetic in PyTorch's formula, float64 sums in fastbn)."""
    x, weight, bias, running_mean, running_var = (t.to(dtype) for t in _inputs(False, 1))
    grad_out = torch.cos(torch.arange(x.numel(), dtype=dtype)).reshape(x.shape)
    results = []
    for create_graph in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = fastbn.torch.batch_norm(leaves[0], running_mean.clone(), running_var.clone(),
                                      leaves[1], leaves[2], training=training,
                                      backend=backend, activation=activation)
        results.append(torch.autograd.grad(out, leaves, grad_out, create_graph=create_graph))
    count = x.numel() // x.shape[1]
    eps = torch.finfo(dtype).eps
    for name, got, expected in zip(("input", "weight", "bias"), results[1], results[0]):
        assert got.dtype == expected.dtype
        # sums of `count` terms of size about |grad_out| * |xhat| (< 4 here)
        bound = 1e-12 if dtype == torch.float64 else 8 * count * eps * 4.0
        assert (got.detach() - expected).abs().max().item() <= bound, name


def test_double_backward_of_a_gradient_penalty():
    """A WGAN-GP-like penalty: the gradient of ||d out / d x||^2 with respect
    to the weight equals the one through PyTorch's batch norm."""
    x, weight, bias, running_mean, running_var = _inputs(False, 2)
    penalties = []
    for batch_norm in (torch.nn.functional.batch_norm, fastbn.torch.batch_norm):
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = batch_norm(xs, running_mean.clone(), running_var.clone(), ws, bias, True)
        (grad,) = torch.autograd.grad((out * torch.sin(out)).sum(), xs, create_graph=True)
        (grad_weight,) = torch.autograd.grad((grad ** 2).sum(), ws)
        penalties.append(grad_weight)
    torch.testing.assert_close(penalties[1], penalties[0], rtol=1e-10, atol=1e-12)
