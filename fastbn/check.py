"""``python -m fastbn check``: gradient and parity checks on every backend.

For each available backend, shape and dtype, compares the forward output,
both backward passes and the parameter gradients with the NumPy backend run
in float64 on the same data, with PyTorch (when installed) and with
cs231n-style numerical gradients, and prints one row per comparison.
"""
import numpy as np

from . import api, gradcheck, registry

CHECK_SHAPES = (((32, 10), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((3, 4, 2, 3, 2), 1))
GRADCHECK_SHAPES = (((6, 4), 1), ((2, 3, 3, 2), 1))
TOLERANCE = {"float32": 1e-5, "float64": 1e-11}
GRADCHECK_TOLERANCE = {"dx": 1e-8, "dgamma": 1e-10, "dbeta": 1e-10}


def _normwise_error(result, reference):
    """``max |result - reference| / max(|reference|)`` over all outputs given."""
    worst = 0.0
    for got, want in zip(result, reference):
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        scale = max(float(np.max(np.abs(want))), 1e-300)
        worst = max(worst, float(np.max(np.abs(got - want))) / scale)
    return worst


def _problem(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = (2.0 * rng.standard_normal(shape) + 3.0).astype(dtype)
    gamma = (rng.standard_normal(channels) + 1.0).astype(dtype)
    beta = rng.standard_normal(channels).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, dout


def _run(backend, x, gamma, beta, dout, axis, training):
    channels = x.shape[axis]
    running_mean = np.linspace(-1, 1, channels)
    running_var = np.linspace(0.5, 2, channels)
    out, cache = api.batchnorm_forward(
        x, gamma, beta, training=training, running_mean=running_mean,
        running_var=running_var, axis=axis, backend=backend)
    dx, dgamma, dbeta = api.batchnorm_backward(dout, cache, method="simplified")
    dx_staged, _, _ = api.batchnorm_backward(dout, cache, method="staged")
    return out, dx, dx_staged, dgamma, dbeta, running_mean, running_var


def _run_torch(torch, x, gamma, beta, dout, axis, training):
    channels = x.shape[axis]
    xt = torch.tensor(np.moveaxis(x, axis, 1), requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    running_mean = torch.tensor(np.linspace(-1, 1, channels))
    running_var = torch.tensor(np.linspace(0.5, 2, channels))
    out = torch.nn.functional.batch_norm(xt, running_mean, running_var, gt, bt,
                                         training=training, momentum=0.1, eps=1e-5)
    out.backward(torch.tensor(np.moveaxis(dout, axis, 1)))
    dx = np.moveaxis(xt.grad.numpy(), 1, axis)
    return (np.moveaxis(out.detach().numpy(), 1, axis), dx, dx, gt.grad.numpy(),
            bt.grad.numpy(), running_mean.numpy(), running_var.numpy())


def _gradcheck(backend, shape, axis, method, training):
    """Worst ratio of numerical-gradient error to its tolerance."""
    x, gamma, beta, dout = _problem(shape, axis, np.float64, seed=1)
    channels = x.shape[axis]
    stats = dict(running_mean=np.linspace(-1, 1, channels),
                 running_var=np.linspace(0.5, 2, channels))

    def forward(x_, gamma_, beta_):
        kwargs = {} if training else dict(stats, training=False)
        return api.batchnorm_forward(x_, gamma_, beta_, axis=axis, backend=backend,
                                     **kwargs)[0]

    _, cache = api.batchnorm_forward(x, gamma, beta, axis=axis, backend=backend,
                                     **({} if training else dict(stats, training=False)))
    dx, dgamma, dbeta = api.batchnorm_backward(dout, cache, method=method)
    numeric = {
        "dx": gradcheck.eval_numerical_gradient_array(lambda v: forward(v, gamma, beta), x, dout),
        "dgamma": gradcheck.eval_numerical_gradient_array(lambda v: forward(x, v, beta), gamma, dout),
        "dbeta": gradcheck.eval_numerical_gradient_array(lambda v: forward(x, gamma, v), beta, dout),
    }
    analytic = {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}
    errors = {k: gradcheck.rel_error(numeric[k], analytic[k]) for k in numeric}
    return errors


def run_checks(backends=None, torch_module=None, report=print):
    """Run every check; return the list of result rows.

    Each row is ``(backend, check, shape, dtype, error, tolerance, passed)``.
    """
    backends = backends or registry.available_backends()
    rows = []
    for backend in backends:
        for shape, axis in CHECK_SHAPES:
            for dtype in ("float32", "float64"):
                x, gamma, beta, dout = _problem(shape, axis, dtype)
                args64 = [a.astype(np.float64) for a in (x, gamma, beta, dout)]
                for training in (True, False):
                    mode = "train" if training else "eval"
                    got = _run(backend, x, gamma, beta, dout, axis, training)
                    want = _run("numpy", *args64, axis, training)
                    error = _normwise_error(got, want)
                    rows.append((backend, f"numpy64 {mode}", shape, dtype, error,
                                 TOLERANCE[dtype], error <= TOLERANCE[dtype]))
                    report(rows[-1])
                    if torch_module is not None:
                        want = _run_torch(torch_module, *args64, axis, training)
                        error = _normwise_error(got, want)
                        rows.append((backend, f"torch {mode}", shape, dtype, error,
                                     TOLERANCE[dtype], error <= TOLERANCE[dtype]))
                        report(rows[-1])
        for shape, axis in GRADCHECK_SHAPES:
            for method in ("simplified", "staged"):
                for training in (True, False):
                    errors = _gradcheck(backend, shape, axis, method, training)
                    mode = "train" if training else "eval"
                    for name, error in errors.items():
                        tolerance = GRADCHECK_TOLERANCE[name]
                        rows.append((backend, f"gradcheck {method} {mode} {name}", shape,
                                     "float64", error, tolerance, error <= tolerance))
                        report(rows[-1])
    return rows


def format_row(row):
    backend, check, shape, dtype, error, tolerance, passed = row
    return (f"{backend:8s} {check:34s} {str(shape):18s} {dtype:8s} "
            f"{error:10.2e} {tolerance:8.0e}  {'pass' if passed else 'FAIL'}")


def main(backends=None):
    """Print the check table; return 0 when every check passes, else 1."""
    try:
        import torch
        torch.set_default_dtype(torch.float64)
    except ImportError:
        torch = None
        print("PyTorch not installed: PyTorch parity rows skipped")
    print(f"{'backend':8s} {'check':34s} {'shape':18s} {'dtype':8s} "
          f"{'max error':>10s} {'tol':>8s}  result")
    rows = run_checks(backends, torch, report=lambda row: print(format_row(row), flush=True))
    failed = [row for row in rows if not row[-1]]
    print(f"{len(rows)} checks, {len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
