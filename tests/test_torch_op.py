"""fastbn.torch: the custom op (opcheck, gradcheck, double backward), the
zero-copy views, errors, module conversion and torch.compile (CUDA:
tests/test_torch_cuda.py)."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import BACKENDS, assert_same_training_step

torch = pytest.importorskip("torch")
import fastbn.torch  # noqa: E402
from fastbn import _torch_arrays  # noqa: E402

CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]
if not CPU_BACKENDS:
    pytest.skip("no CPU backend selected (FASTBN_TEST_BACKENDS)", allow_module_level=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(shape=(4, 3, 5, 6), dtype=torch.float64, channels_last=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    running_mean = torch.randn(channels, generator=generator, dtype=torch.float64)
    running_var = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    return [t.to(dtype) for t in (x, running_mean, running_var, weight, bias)]


def test_import_fastbn_does_not_import_torch():
    code = "import sys, fastbn, fastbn.nn; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, training, channels_last):
    if backend == "cuda":
        pytest.skip("CPU backends")
    x, running_mean, running_var, weight, bias = _inputs(channels_last=channels_last)
    args = (x.requires_grad_(), running_mean, running_var, weight.requires_grad_(),
            bias.requires_grad_(), training, 0.1, 1e-5, "", backend)
    result = torch.library.opcheck(torch.ops.fastbn.batch_norm.default, args)
    assert all(value == "SUCCESS" for value in result.values()), result


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck(backend, training, channels_last, activation):
    if backend == "cuda":
        pytest.skip("CPU backends")
    x, running_mean, running_var, weight, bias = _inputs((3, 2, 3, 2), channels_last=channels_last)

    def function(x, weight, bias):
        # fresh running statistics each call: gradcheck calls it many times
        return fastbn.torch.batch_norm(x, running_mean.clone(), running_var.clone(), weight,
                                       bias, training=training, backend=backend,
                                       activation=activation)

    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d",
                                    "strided"])
def test_matches_functional_batch_norm(backend, training, layout):
    """Output (and its layout), gradients and running statistics equal
    torch.nn.functional.batch_norm's, float64, to 1e-12."""
    shape = (4, 3, 2, 5, 6) if layout == "channels_last_3d" else (4, 3, 5, 6)
    x, running_mean, running_var, weight, bias = _inputs(shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.to(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = x[:, :, ::2]
    results = []
    for function in (torch.nn.functional.batch_norm, fastbn.torch.batch_norm):
        kwargs = {"backend": backend} if function is fastbn.torch.batch_norm else {}
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        stats = [running_mean.clone(), running_var.clone()]
        out = function(xs, *stats, ws, bs, training=training, momentum=0.3, eps=1e-4, **kwargs)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
        results.append((out, xs.grad, ws.grad, bs.grad, *stats))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if layout in ("contiguous", "channels_last", "channels_last_3d"):
        assert results[1][0].stride() == x.stride()


def test_cpu_tensors_reach_the_kernels_as_views(monkeypatch):
    """Contiguous and channels-last tensors, float16 and bfloat16 included,
    are passed to the backend's kernel as NumPy views of their own memory,
    and the output is written in place; a strided tensor is copied once.
    (The address entry points, which small calls may take, are turned off.)"""
    seen = []
    module = fastbn.registry.get_backend(fastbn.registry.default_backend())
    forward = module.forward_train

    def spy(x3, gamma, beta, eps, out3, *args, **kwargs):
        seen.append((x3.__array_interface__["data"][0], out3.__array_interface__["data"][0],
                     x3.shape, x3.dtype.name))
        return forward(x3, gamma, beta, eps, out3, *args, **kwargs)

    monkeypatch.setattr(module, "forward_train", spy)
    monkeypatch.setattr(fastbn.torch, "_at_kernels", lambda *args: None)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            x, running_mean, running_var, weight, bias = _inputs(dtype=dtype,
                                                                 channels_last=channels_last)
            out = fastbn.torch.batch_norm(x, running_mean, running_var, weight, bias,
                                          training=True)
            x_address, out_address, shape3, name = seen.pop()
            assert x_address == x.data_ptr() and out_address == out.data_ptr()
            n, c, h, w = x.shape
            assert shape3 == ((n * h * w, c, 1) if channels_last else (n, c, h * w))
            assert name == str(dtype).replace("torch.", "")
            assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                                     else torch.contiguous_format)
    x = _inputs()[0][:, :, ::2]
    fastbn.torch.batch_norm(x, None, None, training=True)
    assert seen.pop()[0] != x.data_ptr()


# --------------------------------------------------------------------------
# Small calls on the tensors' addresses (backends with serial entry points)
# --------------------------------------------------------------------------

def _address_backends():
    return [name for name in CPU_BACKENDS
            if hasattr(fastbn.registry.get_backend(name), "serial_entry")]


def _spy_entries(monkeypatch, module):
    """Record ``(pass, x address, out address, shape)`` of every call of the
    entry points that ``module.serial_entry`` hands out from now on."""
    seen = []
    serial_entry = module.serial_entry

    def spy_entry(shape, dtype, pass_name, relu):
        entry = serial_entry(shape, dtype, pass_name, relu)
        if entry is None:
            return None

        def spy(*args):
            x_at, out_at = (args[0], args[1]) if pass_name in ("forward", "eval") else \
                (args[1], args[2])
            seen.append((pass_name, x_at, out_at, args[3 if pass_name.startswith("b") else 2]))
            return entry(*args)
        return spy

    monkeypatch.setattr(module, "serial_entry", spy_entry)
    monkeypatch.setattr(fastbn.torch, "_CALL_CLASSES", {})   # decide anew
    return seen


def _step(x, running_mean, running_var, weight, bias, training, activation, backend):
    """Output, the three gradients and the running statistics of one call."""
    xs = x.detach().clone().requires_grad_()
    ws = None if weight is None else weight.detach().clone().requires_grad_()
    bs = None if bias is None else bias.detach().clone().requires_grad_()
    stats = [None if t is None else t.clone() for t in (running_mean, running_var)]
    out = fastbn.torch.batch_norm(xs, *stats, ws, bs, training=training, momentum=0.3,
                                  eps=1e-4, backend=backend, activation=activation)
    grad = torch.cos(torch.arange(out.numel(), dtype=torch.float64)).reshape(out.shape)
    out.backward(grad.to(out.dtype).contiguous(memory_format=torch.channels_last)
                 if x.dim() == 4 and not x.is_contiguous() else grad.to(out.dtype))
    return [out, xs.grad, None if ws is None else ws.grad, None if bs is None else bs.grad,
            *stats]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nd"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("affine", [True, False])
def test_small_calls_on_addresses_compute_what_the_views_compute(monkeypatch, dtype, layout,
                                                                 training, activation, affine):
    """A small call runs the backend's serial entry points on the tensors'
    own memory (no NumPy views, the output written in place), and gives
    what the same kernels give through NumPy views: the output, the three
    gradients and the running statistics.

    The two paths are separately compiled, so a sum may be taken in
    another order: the bound is one rounding to the stored dtype plus ``n``
    float64 roundings (the ``n`` values of a channel) of the largest value.
    """
    for backend in _address_backends():
        module = fastbn.registry.get_backend(backend)
        shape = (12, 5) if layout == "nd" else (3, 5, 4, 6)
        x, running_mean, running_var, weight, bias = _inputs(shape, dtype=dtype,
                                                             channels_last=layout == "channels_last")
        param_dtype = torch.float32 if x.element_size() == 2 else dtype
        running_mean, running_var, weight, bias = (
            t.to(param_dtype) for t in (running_mean, running_var, weight, bias))
        if not affine:
            weight = bias = None
        if training and not affine:
            running_mean = running_var = None   # also no running statistics
        seen = _spy_entries(monkeypatch, module)
        got = _step(x, running_mean, running_var, weight, bias, training, activation, backend)
        forward_pass, backward_pass = ("forward", "backward") if training else \
            ("eval", "backward_eval")
        assert [entry[0] for entry in seen] == [forward_pass, backward_pass]
        assert seen[0][1] != 0 and seen[0][2] == got[0].data_ptr()   # the output in place
        assert seen[0][3] == ((x.numel() // 5, 5, 1) if layout != "contiguous"
                              else (3, 5, 24))
        monkeypatch.setattr(fastbn.torch, "_at_kernels", lambda *args: None)
        expected = _step(x, running_mean, running_var, weight, bias, training, activation,
                         backend)
        monkeypatch.undo()
        n = x.numel() // 5
        for a, b in zip(got, expected):
            if b is None:
                assert a is None
                continue
            assert a.dtype == b.dtype and a.stride() == b.stride()
            bound = torch.finfo(a.dtype).eps + n * torch.finfo(torch.float64).eps
            scale = float(b.detach().double().abs().max())
            torch.testing.assert_close(a.double(), b.double(), rtol=bound, atol=bound * scale)


def test_calls_that_the_address_path_cannot_take_use_the_views(monkeypatch):
    """Per-channel tensors of another dtype, strided or of the wrong shape,
    a large input, and a plan that is not serial all take the NumPy views;
    the wrong shape still raises the views' error."""
    for backend in _address_backends():
        module = fastbn.registry.get_backend(backend)
        seen = _spy_entries(monkeypatch, module)
        x, running_mean, running_var, weight, bias = _inputs(dtype=torch.float32)
        fastbn.torch.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                                backend=backend)
        assert len(seen) == 1
        seen.clear()
        for other in (weight.double(), torch.stack([weight, weight], 1)[:, 0]):
            fastbn.torch.batch_norm(x, running_mean, running_var, other, bias, training=True,
                                    backend=backend)
        with pytest.raises(ValueError, match="one value per channel"):
            fastbn.torch.batch_norm(x, running_mean, running_var, weight[:2], bias,
                                    training=True, backend=backend)
        large = torch.randn(4, 3, 100, 100)
        fastbn.torch.batch_norm(large, running_mean, running_var, weight, bias, training=True,
                                backend=backend)
        key = fastbn.plans.call_class((4, 3, 30), "float32", "forward", 4)
        with fastbn.plans.forced(backend, key, {"strategy": "passes", "reduce": "rows",
                                                "apply": "rows"}):
            fastbn.torch.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                                    backend=backend)
        assert seen == []
        monkeypatch.undo()


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape, memory_format", [
    ((4, 3, 5, 6), torch.contiguous_format), ((4, 3, 5, 6), torch.channels_last),
    ((4, 1, 1, 6), torch.channels_last), ((2, 3, 4, 5, 6), torch.channels_last_3d),
    ((0, 3, 4), torch.contiguous_format), ((5, 3), torch.contiguous_format)])
def test_outputs_have_empty_like_strides_and_are_no_views(shape, memory_format, dtype):
    """The operators allocate their outputs with NumPy (huge pages); the
    tensors must look exactly like ``torch.empty_like``'s (the fake
    implementation's), and be no views, so that a model may modify them in place."""
    source = torch.randn(shape).to(getattr(torch, dtype)).contiguous(memory_format=memory_format)
    output = _torch_arrays.empty_like(source)
    expected = torch.empty_like(source)
    assert (output.shape, output.stride(), output.dtype) == \
        (expected.shape, expected.stride(), expected.dtype)
    assert not output._is_view()
    output.fill_(1.5)   # owns writable memory of its full extent
    assert float(output.sum()) == 1.5 * source.numel()


def test_errors():
    x, running_mean, running_var, weight, bias = _inputs()
    with pytest.raises(ValueError, match="eps must be positive during training"):
        fastbn.torch.batch_norm(x, running_mean, running_var, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        fastbn.torch.batch_norm(x, running_mean, running_var, training=False, eps=-1.0)
    fastbn.torch.batch_norm(x, running_mean, running_var, training=False, eps=0.0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fastbn.torch.batch_norm(x[:1, :, :1, :1], None, None, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        fastbn.torch.batch_norm(x, None, None, training=False)
    for stats in ((running_mean, None), (None, running_var)):   # one of the two
        with pytest.raises(ValueError, match="both running_mean and running_var"):
            fastbn.torch.batch_norm(x, *stats, training=True)
    with pytest.raises(TypeError, match="int64"):
        fastbn.torch.batch_norm(x.long(), None, None, training=True)
    with pytest.raises(ValueError, match="activation"):
        fastbn.torch.batch_norm(x, None, None, training=True, activation="gelu")
    with pytest.raises(ValueError, match="unknown backend"):
        fastbn.torch.BatchNorm2d(3, backend="nope")


def test_eager_calls_follow_their_tensors(backend):
    """The eager path keeps NumPy views of the per-channel tensors and the
    checks of each kind of call. Every call must still read the tensors'
    current values and memory: in-place updates, new memory (``.data =``),
    a wrong shape, and bad options after good ones of the same shape."""
    if backend == "cuda":
        pytest.skip("CPU backends")
    x, running_mean, running_var, weight, bias = _inputs()
    weight.requires_grad_()
    reference_stats = [running_mean.clone(), running_var.clone()]

    def check():
        out = fastbn.torch.batch_norm(x, running_mean, running_var, weight, bias,
                                      training=True, backend=backend)
        expected = torch.nn.functional.batch_norm(x, *reference_stats, weight.detach(), bias,
                                                  training=True)
        # float64 throughout: a few roundings per element
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(running_mean, reference_stats[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(running_var, reference_stats[1], rtol=1e-12, atol=1e-12)

    check()
    with torch.no_grad():
        weight.mul_(2.0)
        bias.add_(1.0)
    check()
    old_mean = running_mean.data
    kept = old_mean.clone()
    running_mean.data = torch.randn(3, dtype=torch.float64)
    reference_stats[0] = running_mean.clone()
    weight.data = torch.full((3,), 0.25, dtype=torch.float64)
    check()
    assert torch.equal(old_mean, kept)   # the replaced memory is no longer written
    weight.data = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="gamma must have shape"):
        fastbn.torch.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                                backend=backend)
    with pytest.raises(ValueError, match="momentum"):
        fastbn.torch.batch_norm(x, running_mean, running_var, training=True, momentum=2.0,
                                backend=backend)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        fastbn.torch.batch_norm(x, running_mean, running_var, training=True, eps=0.0,
                                backend=backend)


def _small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_convert_and_revert(backend, fuse_relu):
    """Converted: same objects, state and repr (bar the fused activation),
    same results as stock PyTorch in float64; reverted: stock modules again."""
    torch.manual_seed(0)
    stock = _small_cnn().double()
    model = _small_cnn().double()
    model.load_state_dict(stock.state_dict())
    parameters = list(model.parameters())
    assert fastbn.torch.convert_batchnorm(model, backend=backend, fuse_relu=fuse_relu) is model
    assert list(model.parameters()) == parameters
    assert isinstance(model[1], fastbn.torch.BatchNorm2d) and isinstance(model[8],
                                                                         torch.nn.BatchNorm1d)
    assert type(model[2]) is (fastbn.torch.FusedReLU if fuse_relu else torch.nn.ReLU)
    assert (model[4].activation == "relu") == fuse_relu
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    for training in (True, False):
        stock.train(training)
        model.train(training)
        assert_same_training_step(stock, model, x)
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-10, atol=1e-10)
    assert fastbn.torch.revert_batchnorm(model) is model
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]
    assert repr(model) == repr(stock)
    assert not hasattr(model[1], "backend")


def test_compile_fullgraph_matches_eager():
    """A small CNN on fastbn modules compiles with no graph break (fullgraph)
    and gives eager's results, float64: outputs, gradients, running statistics."""
    torch.manual_seed(1)
    eager = fastbn.torch.convert_batchnorm(_small_cnn().double(), fuse_relu=True)
    compiled_model = fastbn.torch.convert_batchnorm(_small_cnn().double(), fuse_relu=True)
    compiled_model.load_state_dict(eager.state_dict())
    explanation = torch._dynamo.explain(compiled_model)(torch.randn(2, 3, 6, 6,
                                                                    dtype=torch.float64))
    assert explanation.graph_break_count == 0
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
        assert_same_training_step(eager, compiled_model, x, run=compiled)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, rtol=1e-10,
                                   atol=1e-10, msg=key)
    assert int(compiled_model[1].num_batches_tracked) == 2
    assert not torch.equal(compiled_model[1].running_mean, torch.zeros(8, dtype=torch.float64))


# --------------------------------------------------------------------------
# Large outputs: memory kept for reuse
# --------------------------------------------------------------------------

def test_large_outputs_reuse_memory_that_nothing_references(backend, monkeypatch):
    """The memory of a large output returns to the pool only when no tensor
    or array views it any more, and a later output of the same size gets
    it; outputs alive at the same time never share memory."""
    if backend == "cuda":
        pytest.skip("CPU backends")
    monkeypatch.setattr(_torch_arrays, "POOL_KEEP_BYTES", 1 << 30)
    _torch_arrays.forget_pool()
    x, _, _, weight, bias = _inputs((8, 16, 48, 48), dtype=torch.float32)   # 1.2 MB
    reference = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)

    def call():
        return fastbn.torch.batch_norm(x, None, None, weight, bias, training=True,
                                       backend=backend)

    first, second = call(), call()
    assert first.data_ptr() != second.data_ptr()
    address = first.data_ptr()
    views = [first[1:], first.numpy()[2:], first.permute(0, 2, 3, 1)]
    del first
    while views:
        assert call().data_ptr() != address   # a view still holds the memory
        views.pop()
    third = call()
    assert third.data_ptr() == address      # reused once nothing viewed it
    kept = second.clone()
    fourth = call()
    assert fourth.data_ptr() not in (address, second.data_ptr())
    # float32 storage of float64 arithmetic: a few roundings per element
    for output in (second, third, fourth):
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(second, kept)
    _torch_arrays.forget_pool()


def test_the_pool_keeps_at_most_its_bytes(monkeypatch):
    """Blocks beyond POOL_KEEP_BYTES are dropped, the least recently freed
    first; with 0 nothing is kept."""
    megabyte = 1 << 20
    monkeypatch.setattr(_torch_arrays, "POOL_KEEP_BYTES", 3 * megabyte)
    _torch_arrays.forget_pool()
    arrays = [_torch_arrays.host_memory((megabyte,), np.uint8) for _ in range(2)]
    arrays += [_torch_arrays.host_memory((2 * megabyte,), np.uint8)]
    del arrays[:2]
    assert _torch_arrays._FREE_BYTES[0] == 2 * megabyte
    arrays.clear()   # the 2 MB block: one 1 MB block goes
    assert _torch_arrays._FREE_BYTES[0] == 3 * megabyte
    assert sorted(_torch_arrays._FREE) == [megabyte, 2 * megabyte]
    monkeypatch.setattr(_torch_arrays, "POOL_KEEP_BYTES", 0)
    _torch_arrays.forget_pool()
    array = _torch_arrays.host_memory((2 * megabyte,), np.uint8)
    del array
    assert _torch_arrays._FREE_BYTES[0] == 0


def test_the_pool_setting(monkeypatch):
    monkeypatch.setenv("FASTBN_OUTPUT_POOL", "12345")
    assert _torch_arrays._pool_keep_bytes() == 12345
    monkeypatch.setenv("FASTBN_OUTPUT_POOL", "lots")
    with pytest.raises(ValueError, match="FASTBN_OUTPUT_POOL"):
        _torch_arrays._pool_keep_bytes()
    monkeypatch.delenv("FASTBN_OUTPUT_POOL")
    assert _torch_arrays._pool_keep_bytes() > 0


def test_a_forked_child_starts_with_an_empty_pool(monkeypatch):
    import os
    monkeypatch.setattr(_torch_arrays, "POOL_KEEP_BYTES", 1 << 30)
    array = _torch_arrays.host_memory((1 << 20,), np.uint8)
    del array
    assert _torch_arrays._FREE_BYTES[0] > 0
    pid = os.fork()
    if pid == 0:   # the child: nothing kept, and the lock is free
        empty = _torch_arrays._FREE_BYTES[0] == 0 and not _torch_arrays._FREE
        free = _torch_arrays._POOL_LOCK.acquire(timeout=5)
        os._exit(0 if empty and free else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _torch_arrays.forget_pool()
