"""Parity with PyTorch: ``torch.nn.functional.batch_norm`` with autograd.

Outputs, dx (both methods), dgamma, dbeta and the updated running statistics
(PyTorch's convention: momentum is the new batch's weight, running_var takes
the unbiased variance), over the layouts of DESIGN.md, float32 and float64,
training and evaluation. The largest normwise relative errors seen are
printed in the terminal summary (and written to $FASTBN_ERROR_REPORT when set).
"""
import numpy as np
import pytest

import fastbn
from conftest import LAYOUTS, layout_ids, make_input, make_params, make_running, normwise_error, record_error

torch = pytest.importorskip("torch")

SHAPES = LAYOUTS
IDS = layout_ids(SHAPES)

# normwise relative tolerances (max |a - t| / max |t|) on well-conditioned data
RTOL = {np.float64: 1e-10, np.float32: 2e-5}


def _torch_reference(x, gamma, beta, rm, rv, dout, training, momentum, eps, axis):
    """Run F.batch_norm on x moved to channels-first; return numpy results in x's layout."""
    ax = axis % x.ndim
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, ax, 1))).requires_grad_(True)
    g = torch.from_numpy(gamma.copy()).requires_grad_(True)
    b = torch.from_numpy(beta.copy()).requires_grad_(True)
    rmt = torch.from_numpy(rm.copy())
    rvt = torch.from_numpy(rv.copy())
    y = torch.nn.functional.batch_norm(xt, rmt, rvt, g, b, training=training,
                                       momentum=momentum, eps=eps)
    y.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(dout, ax, 1))))
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, ax)
    return dict(out=back(y), dx=back(xt.grad), dgamma=g.grad.numpy(), dbeta=b.grad.numpy(),
                running_mean=rmt.numpy(), running_var=rvt.numpy())


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_parity(backend, rng, shape, axis, dtype, training):
    C = shape[axis]
    x = make_input(rng, shape, axis=axis, dtype=dtype, scale=2.0, shift=1.0)
    gamma, beta = make_params(rng, C, dtype)
    rm, rv = make_running(rng, C, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    momentum, eps = 0.1, 1e-5

    want = _torch_reference(x, gamma, beta, rm, rv, dout, training, momentum, eps, axis)

    rm_, rv_ = rm.copy(), rv.copy()
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training,
                                          running_mean=rm_, running_var=rv_,
                                          momentum=momentum, eps=eps, axis=axis,
                                          backend=backend)
    got = dict(out=out, running_mean=rm_, running_var=rv_)
    tol = RTOL[dtype]
    dname = np.dtype(dtype).name
    mode = "train" if training else "eval"
    failures = []
    for method in ("simplified", "staged"):
        dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
        got.update({f"dx[{method}]": dx, f"dgamma[{method}]": dgamma,
                    f"dbeta[{method}]": dbeta})
    for key, value in got.items():
        base = key.split("[")[0]
        err = normwise_error(value, want[base])
        record_error((dname, mode, key), err)
        if err > tol:
            failures.append(f"{key}: {err:.3e}")
    assert not failures, f"normwise relative errors above {tol:.0e}: {failures}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_parity_running_stats_over_steps(backend, rng, dtype):
    """Several training steps then evaluation: running stats track PyTorch's module."""
    C = 4
    bn = torch.nn.BatchNorm2d(C, momentum=0.1, eps=1e-5, dtype=getattr(torch, np.dtype(dtype).name))
    rm = np.zeros(C, dtype)
    rv = np.ones(C, dtype)
    for _ in range(5):
        x = make_input(rng, (3, C, 4, 4), dtype=dtype, scale=1.5, shift=2.0)
        bn.train()
        bn(torch.from_numpy(x))
        fastbn.batchnorm_forward(x, running_mean=rm, running_var=rv, backend=backend)
    tol = RTOL[dtype]
    assert normwise_error(rm, bn.running_mean.numpy()) < tol
    assert normwise_error(rv, bn.running_var.numpy()) < tol
    x = make_input(rng, (3, C, 4, 4), dtype=dtype, scale=1.5, shift=2.0)
    bn.eval()
    with torch.no_grad():
        want = bn(torch.from_numpy(x)).numpy()
    out, _ = fastbn.batchnorm_forward(x, training=False, running_mean=rm, running_var=rv,
                                      backend=backend)
    assert normwise_error(out, want) < tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_native_batch_norm_stats(backend, rng, dtype):
    """cache.mean / cache.invstd equal torch.native_batch_norm's save_mean / save_invstd."""
    x = make_input(rng, (6, 3, 4, 5), dtype=dtype, scale=3.0, shift=-4.0)
    gamma, beta = make_params(rng, 3, dtype)
    _, save_mean, save_invstd = torch.native_batch_norm(
        torch.from_numpy(x), torch.from_numpy(gamma), torch.from_numpy(beta),
        None, None, True, 0.1, 1e-5)
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    mean = np.asarray(_host(cache.mean), np.float64)
    invstd = np.asarray(_host(cache.invstd), np.float64)
    tol = RTOL[dtype]
    assert normwise_error(mean, save_mean.numpy()) < tol
    assert normwise_error(invstd, save_invstd.numpy()) < tol


def _host(a):
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)
