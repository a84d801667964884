"""PyTorch's own test cases for BatchNorm1d/2d/3d, run against fastbn.

``torch.testing._internal.common_modules`` lists, for each of PyTorch's
batch-norm modules, the constructor arguments and inputs its own test suite
uses (affine or not, a scale without shift, momentum None, no running
statistics, an empty batch, ...) and the inputs that must raise. Each case
runs here against ``fastbn.torch.BatchNorm*d`` and ``fastbn.nn.BatchNorm``,
on every CPU backend, in training and in evaluation mode, for two steps,
and is compared with the PyTorch module given the same state:

- float64: outputs, input/weight/bias gradients, running statistics,
  ``num_batches_tracked`` and the state-dict keys agree to 1e-10;
- float32, float16 and bfloat16: the same quantities, against the float64
  PyTorch module run on the same stored values, within a bound derived from
  fastbn's arithmetic (see :func:`_bounds`).
"""
import numpy as np
import pytest

import fastbn
from conftest import BACKENDS

torch = pytest.importorskip("torch")
common_modules = pytest.importorskip("torch.testing._internal.common_modules",
                                     reason="PyTorch's test cases need expecttest")
import fastbn.nn  # noqa: E402
import fastbn.torch  # noqa: E402

CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]
if not CPU_BACKENDS:
    pytest.skip("no CPU backend selected (FASTBN_TEST_BACKENDS)", allow_module_level=True)

MODULE_INFOS = {info.module_cls.__name__: info for info in common_modules.module_db
                if info.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
                                       torch.nn.BatchNorm3d)}
FASTBN_CLASSES = {"BatchNorm1d": fastbn.torch.BatchNorm1d, "BatchNorm2d": fastbn.torch.BatchNorm2d,
                  "BatchNorm3d": fastbn.torch.BatchNorm3d}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
# unit roundoff of each storage dtype
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24,
                 torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# half the spacing of the subnormals: the absolute error of a rounding near zero
UNDERFLOW = {2.0 ** -53: 2.0 ** -1075, 2.0 ** -24: 2.0 ** -150, 2.0 ** -11: 2.0 ** -25,
             2.0 ** -8: 2.0 ** -134}
FLOAT64_TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _module_inputs(name, dtype, training):
    info = MODULE_INFOS[name]
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                   training=training)


def _case_id(module_input):
    return module_input.desc or "default"


def _to_numpy(tensor):
    """A float64 NumPy copy of a tensor (bfloat16 included)."""
    return tensor.detach().to(torch.float64).numpy().copy()


def _as_array(tensor):
    """A NumPy array of the tensor's own dtype (bfloat16 as ml_dtypes.bfloat16)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def _random_state(module, generator):
    """Random parameters and running statistics (so evaluation is not trivial)."""
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.num_features, generator=generator))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _run_torch_module(module, x, dout):
    """One step of a torch module: float64 NumPy results."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(dout)
    result = {"out": _to_numpy(out), "dx": _to_numpy(x.grad)}
    for key, param in (("dweight", module.weight), ("dbias", module.bias)):
        result[key] = None if param is None else _to_numpy(param.grad)
        if param is not None:
            param.grad = None
    for key in ("running_mean", "running_var"):
        buffer = getattr(module, key)
        result[key] = None if buffer is None else _to_numpy(buffer)
    tracked = module.num_batches_tracked
    result["num_batches_tracked"] = None if tracked is None else int(tracked)
    result["keys"] = list(module.state_dict())
    return result


def _run_fastbn_layer(layer, x, dout):
    """One step of a fastbn.nn.BatchNorm on the tensors' values: float64 results."""
    out = layer.forward(_as_array(x))
    dx = layer.backward(_as_array(dout))
    as64 = lambda a: None if a is None else np.asarray(a).astype(np.float64)
    return {"out": as64(out), "dx": as64(dx), "dweight": as64(layer.grad_gamma),
            "dbias": as64(layer.grad_beta), "running_mean": as64(layer.running_mean),
            "running_var": as64(layer.running_var),
            "num_batches_tracked": layer.num_batches_tracked if layer.track_running_stats
            else None,
            "keys": list(layer.state_dict())}


def _stored_state(candidate):
    """The candidate's state dict as float64 tensors (the counter as int64)."""
    state = {}
    for key, value in candidate.state_dict().items():
        value = torch.as_tensor(np.asarray(value)) if not torch.is_tensor(value) else value
        state[key] = value.to(torch.float64) if value.is_floating_point() else value.clone()
    return state


def _fastbn_layer(reference, backend, param_dtype):
    """A fastbn.nn.BatchNorm with the configuration and state of a torch module."""
    layer = fastbn.nn.BatchNorm(reference.num_features, eps=reference.eps,
                                momentum=reference.momentum, affine=reference.affine,
                                track_running_stats=reference.track_running_stats,
                                dtype=param_dtype, backend=backend,
                                bias=reference.bias is not None or not reference.affine)
    layer.load_state_dict({key: _to_numpy(value).astype(param_dtype)
                           if value.is_floating_point() else value.numpy()
                           for key, value in reference.state_dict().items()})
    return layer


def _bounds(x, dout, state, training, momentum, eps, u_out, u_param, u_running):
    """Per-element bounds on the error of fastbn's results in 32- or 16-bit storage.

    fastbn computes 16-bit and float32 storage in float32 with float64
    sums. ``x``, ``dout`` and ``state`` hold the stored values (exactly, in
    float64), so the exact results of those values (the float64 module)
    differ from fastbn's by

    - one rounding of each result to its storage dtype: ``u_store * |r|``,
      or half the subnormal spacing near zero (float16: ``2**-25``);
    - the float32 arithmetic: at most ``K = 8`` roundings of relative size
      ``u32`` on the terms of each result (four in the elementwise chain
      ``(x - mean) * invstd * gamma + beta``, the per-channel coefficients
      rounded to float32, and a factor 2 to spare), relative to the sum of
      the terms' magnitudes, with ``mean`` rounded to float32 counted as
      ``|mean| * invstd``. The float64 sums (at most a few thousand terms)
      add a relative ``n * 2**-53``, far below ``u32``.
    """
    K, u32 = 8.0, 2.0 ** -24
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    count = x.size // x.shape[1]
    gamma = state.get("weight", np.ones(x.shape[1]))
    beta = state.get("bias", np.zeros(x.shape[1]))
    batch_statistics = training or "running_mean" not in state
    if batch_statistics and count > 0:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    elif not batch_statistics:
        mean, var = state["running_mean"], state["running_var"]
    else:
        mean, var = np.zeros(x.shape[1]), np.ones(x.shape[1])
    invstd = 1.0 / np.sqrt(var + eps)
    b = lambda v: np.asarray(v).reshape(shape)
    xhat = np.abs(x - b(mean)) * b(invstd) + b(np.abs(mean) * invstd)
    if batch_statistics and count > 0:
        mean_dy = np.abs(dout.mean(axis=axes))
        mean_dy_xhat = np.abs((dout * (x - b(mean)) * b(invstd)).mean(axis=axes))
        dx_terms = b(np.abs(gamma * invstd)) * (np.abs(dout) + b(mean_dy) + xhat * b(mean_dy_xhat))
    else:
        dx_terms = b(np.abs(gamma * invstd)) * np.abs(dout)
    bounds = {
        "out": (u_out, K * u32 * (b(np.abs(gamma)) * xhat + b(np.abs(beta)))),
        "dx": (u_out, K * u32 * dx_terms),
        "dweight": (u_param, K * u32 * (np.abs(dout) * xhat).sum(axis=axes)),
        "dbias": (u_param, K * u32 * np.abs(dout).sum(axis=axes)),
    }
    if "running_mean" in state and training and count > 1:
        m = momentum
        bounds["running_mean"] = (u_running, K * u32 * ((1 - m) * np.abs(state["running_mean"])
                                                        + m * np.abs(mean)))
        unbiased = var * count / (count - 1)
        bounds["running_var"] = (u_running, K * u32 * ((1 - m) * np.abs(state["running_var"])
                                                       + m * unbiased))
    return bounds


def _compare(name, actual, expected, bounds, exact):
    assert actual["keys"] == expected["keys"], (name, actual["keys"], expected["keys"])
    assert actual["num_batches_tracked"] == expected["num_batches_tracked"]
    for key in ("out", "dx", "dweight", "dbias", "running_mean", "running_var"):
        a, r = actual[key], expected[key]
        assert (a is None) == (r is None), (name, key)
        if a is None:
            continue
        assert a.shape == r.shape, (name, key, a.shape, r.shape)
        if a.size == 0:
            continue
        error = np.abs(a - r)
        if exact:
            allowed = FLOAT64_TOL * max(1.0, float(np.max(np.abs(r))))
        elif key in bounds:
            u_store, arithmetic = bounds[key]
            allowed = u_store * np.abs(r) + UNDERFLOW[u_store] + arithmetic
        else:  # running statistics not updated: bitwise unchanged
            allowed = 0.0
        worst = np.max(error - allowed)
        assert worst <= 0, (f"{name} {key}: error {np.max(error):.3g} over its bound "
                            f"by {worst:.3g}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("module_name", list(MODULE_INFOS))
@pytest.mark.parametrize("implementation", ["fastbn.torch", "fastbn.nn"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pytorch_module_cases(backend, implementation, module_name, dtype_name, training):
    dtype = DTYPES[dtype_name]
    exact = dtype == torch.float64
    generator = torch.Generator().manual_seed(19)
    torch.manual_seed(19)   # the cases' inputs come from the global generator
    for case in _module_inputs(module_name, dtype, training):
        name = f"{module_name}[{_case_id(case)}]"
        args, kwargs = case.constructor_input.args, case.constructor_input.kwargs
        reference = getattr(torch.nn, module_name)(*args, **kwargs).to(torch.float64)
        _random_state(reference, generator)
        state16 = {key: value.to(dtype) if value.is_floating_point() else value.clone()
                   for key, value in reference.state_dict().items()}
        reference.load_state_dict(state16)   # the stored values, exactly, in float64
        if implementation == "fastbn.torch":
            candidate = FASTBN_CLASSES[module_name](*args, backend=backend, **kwargs).to(dtype)
            candidate.load_state_dict(state16)
            assert repr(candidate) == repr(reference)
            candidate.train(training)
            run = _run_torch_module
            u_param = u_running = UNIT_ROUNDOFF[dtype]
        else:
            param_dtype = np.float64 if exact else np.float32
            candidate = _fastbn_layer(reference, backend, param_dtype).train(training)
            run = _run_fastbn_layer
            u_param = u_running = UNIT_ROUNDOFF[torch.float64 if exact else torch.float32]
        reference.train(training)
        x = case.forward_input.args[0]
        for step in range(2):
            if step:
                x = (torch.rand(x.shape, generator=generator) * 18 - 9).to(dtype)
            dout = torch.randn(x.shape, generator=generator).to(dtype)
            if step and not exact:
                # the reference continues from the candidate's stored state
                reference.load_state_dict(_stored_state(candidate))
            before = {key: _to_numpy(value) for key, value in reference.state_dict().items()
                      if value.is_floating_point()}
            expected = _run_torch_module(reference, x.to(torch.float64), dout.to(torch.float64))
            actual = run(candidate, x, dout)
            momentum = reference.momentum
            if momentum is None:
                momentum = 1.0 / max(1, expected["num_batches_tracked"] or 1)
            bounds = {} if exact else _bounds(
                _to_numpy(x), _to_numpy(dout), before, training, momentum, reference.eps, UNIT_ROUNDOFF[dtype], u_param, u_running)
            if not training or not reference.track_running_stats:
                bounds.pop("running_mean", None)
                bounds.pop("running_var", None)
            _compare(f"{name} step {step}", actual, expected, bounds, exact)


@pytest.mark.parametrize("module_name", list(MODULE_INFOS))
@pytest.mark.parametrize("implementation", ["fastbn.torch", "fastbn.nn"])
def test_pytorch_error_cases(implementation, module_name):
    """PyTorch's error inputs (eps <= 0) raise ValueError in training, as PyTorch does.

    ``fastbn.nn.BatchNorm`` refuses a negative ``eps`` already when it is made
    (``eps=0`` is allowed there, for evaluation mode).
    """
    info = MODULE_INFOS[module_name]
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64,
                                           requires_grad=False, training=True)
    assert errors
    for error in errors:
        case = error.module_error_input
        args, kwargs = case.constructor_input.args, case.constructor_input.kwargs
        x = case.forward_input.args[0]
        with pytest.raises(error.error_type, match=error.error_regex):
            getattr(torch.nn, module_name)(*args, **kwargs)(x)
        if implementation == "fastbn.torch":
            module = FASTBN_CLASSES[module_name](*args, **kwargs).double()
            with pytest.raises(error.error_type, match=error.error_regex):
                module(x)
            assert int(module.num_batches_tracked) <= 1
        else:
            with pytest.raises(error.error_type, match="eps must be"):
                layer = fastbn.nn.BatchNorm(*args, dtype=np.float64, **kwargs)
                layer.forward(x.numpy())
