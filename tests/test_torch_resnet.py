"""convert_batchnorm / revert_batchnorm on torchvision's ResNet-18 (random
init, nothing downloaded): the state survives bitwise, and the converted
model's forward and backward equal the stock model's in float64."""
import copy

import pytest

from conftest import BACKENDS, assert_same_training_step

torch = pytest.importorskip("torch")
import fastbn.torch  # noqa: E402

CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]
if not CPU_BACKENDS:
    pytest.skip("no CPU backend selected (FASTBN_TEST_BACKENDS)", allow_module_level=True)


def _import_torchvision():
    """torchvision beside the CPU build of torch (see the suite's helper), or a skip."""
    from fastbn.bench.suites.torch_model import import_torchvision
    try:
        return import_torchvision()
    except ImportError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def resnet18():
    torchvision = _import_torchvision()
    torch.manual_seed(18)
    model = torchvision.models.resnet18(num_classes=10).double()
    # non-trivial batch-norm state, as after some training
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 1.5)
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_convert_then_revert_keeps_the_state_bitwise(resnet18):
    model = copy.deepcopy(resnet18)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    fastbn.torch.convert_batchnorm(model, fuse_relu=True)
    converted = [m for m in model.modules() if isinstance(m, fastbn.torch.BatchNorm2d)]
    assert len(converted) == 20   # every BatchNorm2d of ResNet-18
    assert list(model.state_dict()) == list(before)
    fastbn.torch.revert_batchnorm(model)
    assert not any(isinstance(m, fastbn.torch.BatchNorm2d) for m in model.modules())
    assert repr(model) == repr(resnet18)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_converted_forward_and_backward_equal_the_original(resnet18, backend):
    """Training step (outputs, every parameter's gradient, running statistics,
    counters) and evaluation forward, float64, to 1e-10 of each array's scale."""
    stock = copy.deepcopy(resnet18)
    model = fastbn.torch.convert_batchnorm(copy.deepcopy(resnet18), backend=backend)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 10, (4,), generator=generator)

    def close(a, b, what):
        a, b = a.detach(), b.detach()
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        assert float((a - b).abs().max()) <= 1e-10 * scale, what

    outputs = []
    for net in (stock, model):
        net.train()
        out = net(x)
        torch.nn.functional.cross_entropy(out, target).backward()
        outputs.append(out)
    close(outputs[1], outputs[0], "training output")
    for (name, a), (_, b) in zip(model.named_parameters(), stock.named_parameters()):
        close(a.grad, b.grad, f"grad of {name}")
    for (name, a), (_, b) in zip(model.state_dict().items(), stock.state_dict().items()):
        close(a.double(), b.double(), name)
    for net in (stock, model):
        net.eval()
    with torch.no_grad():
        close(model(x), stock(x), "evaluation output")


def test_fuse_batchnorm_relu_on_resnet18(resnet18):
    """The traced, fused ResNet-18 (stem and each block's first batch norm
    carry the ReLU) gives the stock model's training step, float64."""
    stock = copy.deepcopy(resnet18)
    model = fastbn.torch.convert_batchnorm(copy.deepcopy(resnet18))
    fused = fastbn.torch.fuse_batchnorm_relu(model)
    carriers = [m for m in fused.modules()
                if isinstance(m, fastbn.torch.BatchNorm2d) and m.activation == "relu"]
    assert len(carriers) == 1 + 8   # the stem's bn1 and each BasicBlock's bn1
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    assert_same_training_step(stock, model, x, run=fused)
