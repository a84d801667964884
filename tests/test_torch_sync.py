"""fastbn.torch.SyncBatchNorm over torch.distributed (gloo on the loopback
address): 2 and 3 spawned ranks against one float64 batch norm over the
gathered batch, a subgroup, evaluation mode, and a DDP training step; plus
the conversions, in this process."""
import os
import socket
import time

import pytest

from conftest import BACKENDS

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import fastbn.torch  # noqa: E402

CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]
if not CPU_BACKENDS:
    pytest.skip("no CPU backend selected (FASTBN_TEST_BACKENDS)", allow_module_level=True)
if not dist.is_available():
    pytest.skip("this torch is built without torch.distributed", allow_module_level=True)

# Seconds a spawned group may take, imports and numba's compilation included,
# before its ranks are killed and the test fails (a hang fails, never stalls).
TIMEOUT = float(os.environ.get("FASTBN_TORCH_SYNC_TIMEOUT", 600))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(case, world, timeout=TIMEOUT, **options):
    """Run ``torch_sync_worker.run`` on ``world`` spawned ranks; fail with the
    first rank's traceback, or after ``timeout`` seconds."""
    import torch_sync_worker

    context = torch.multiprocessing.start_processes(
        torch_sync_worker.run,
        args=(world, f"tcp://127.0.0.1:{_free_port()}", case, options),
        nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{case} on {world} ranks: still running after {timeout:.0f} s")


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_gets_its_slice_of_one_batch_norm(world):
    spawn("matches_one_batch_norm", world, backends=CPU_BACKENDS)


def test_process_group_picks_a_subgroup():
    spawn("subgroup", 3, backends=CPU_BACKENDS)


def test_evaluation_mode_does_not_communicate():
    spawn("evaluation_does_not_communicate", 2, backends=CPU_BACKENDS)


def test_ddp_step_equals_the_one_process_step_on_the_whole_batch():
    spawn("ddp_step", 2, backends=CPU_BACKENDS)


# --------------------------------------------------------------------------
# In this process (no process group)
# --------------------------------------------------------------------------

def _synced_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.BatchNorm1d(36))
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def test_convert_and_revert_sync_batchnorm_keep_the_state():
    model = _synced_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    fastbn.torch.convert_batchnorm(model, backend="numpy", fuse_relu=True)
    assert [type(m) for m in norms] == [fastbn.torch.SyncBatchNorm] * 2
    assert all(m.backend == "numpy" for m in norms)
    assert type(model[2]) is torch.nn.ReLU   # synchronized norms compute no ReLU
    assert list(model.state_dict()) == list(before)
    fastbn.torch.revert_batchnorm(model)
    assert [type(m) for m in norms] == [torch.nn.SyncBatchNorm] * 2
    assert not any(hasattr(m, "backend") for m in norms)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_constructor_and_convert_sync_batchnorm_of_the_subclass():
    norm = fastbn.torch.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=False,
                                      track_running_stats=True, backend="numpy")
    stock = torch.nn.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=False)
    assert isinstance(norm, torch.nn.SyncBatchNorm) and repr(norm) == repr(stock)
    assert list(norm.state_dict()) == list(stock.state_dict())
    with pytest.raises(ValueError, match="unknown backend"):
        fastbn.torch.SyncBatchNorm(5, backend="nope")
    model = fastbn.torch.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.BatchNorm2d(3)), backend="numpy")
    assert type(model[0]) is fastbn.torch.SyncBatchNorm and model[0].backend == "numpy"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_a_process_group_it_is_batch_norm(backend):
    """No process group: the module is a batch norm on fastbn (no error on
    CPU tensors, unlike PyTorch's), in training and evaluation mode."""
    torch.manual_seed(3)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    norm = fastbn.torch.SyncBatchNorm(3, momentum=None, backend=backend).double()
    stock = torch.nn.BatchNorm2d(3, momentum=None).double()
    for mode in (True, True, False):
        norm.train(mode)
        stock.train(mode)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = norm(xs), stock(xr)
        out.backward(torch.cos(out))
        expected.backward(torch.cos(expected))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
        for got, want in zip(norm.state_dict().values(), stock.state_dict().values()):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
