"""fastbn.torch with the cuda backend: under the CUDA simulator (CPU tensors
copied to the simulated device) and, on a machine with a CUDA build of
PyTorch and a GPU, on CUDA tensors made on a non-default stream."""
import pytest

import fastbn

torch = pytest.importorskip("torch")
import fastbn.torch  # noqa: E402

pytestmark = pytest.mark.cuda


def _inputs(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    running_mean = torch.randn(channels, generator=generator, dtype=torch.float64)
    running_var = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    return x, running_mean, running_var, weight, bias


def test_cuda_backend_on_host_tensors():
    """The cuda backend takes CPU tensors too (one copy each way): under the
    simulator this runs the custom op through the CUDA kernels."""
    if "cuda" not in fastbn.available_backends():
        pytest.skip("the cuda backend is not available here (no GPU, no simulator)")
    x, running_mean, running_var, weight, bias = _inputs((4, 3, 2, 2))
    for training in (True, False):
        expected = [running_mean.clone(), running_var.clone()]
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        reference = torch.nn.functional.batch_norm(xs, *expected, ws, bs, training=training)
        reference.sum().backward()
        grads = [t.grad for t in (xs, ws, bs)]
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        out = fastbn.torch.batch_norm(xs, running_mean, running_var, ws, bs,
                                      training=training, backend="cuda")
        out.sum().backward()
        torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close([xs.grad, ws.grad, bs.grad], grads, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close([running_mean, running_var], expected, rtol=1e-12,
                                   atol=1e-12)


def test_cuda_tensor_on_a_side_stream():
    """A tensor made on a non-default torch stream is normalized correctly
    with no synchronization by the caller."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of PyTorch and a GPU (the CUDA simulator "
                    "cannot take torch CUDA tensors)")
    if "cuda" not in fastbn.available_backends():
        pytest.skip("the cuda backend is not available here")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.randn(64, 32, 64, 64, device="cuda")
        x.mul_(3.0).add_(1.0)   # queued work the op must wait for
        running_mean = torch.zeros(32, device="cuda")
        running_var = torch.ones(32, device="cuda")
        out = fastbn.torch.batch_norm(x, running_mean, running_var, training=True)
        doubled = out * 2.0      # queued on the same stream after the op
    stream.synchronize()
    reference = torch.nn.functional.batch_norm(x.double(), None, None, training=True).float()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(doubled, 2.0 * reference, rtol=1e-5, atol=1e-5)
