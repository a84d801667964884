"""fastbn.gradcheck (cs231n semantics) and cs231n-style numerical gradient
checks of both backward methods, training and evaluation mode, float64."""
import numpy as np
import pytest

import fastbn
from conftest import CUDASIM, gradcheck_problem
from fastbn.gradcheck import eval_numerical_gradient, eval_numerical_gradient_array, rel_error

# ---------------------------------------------------------------------------
# the helpers themselves
# ---------------------------------------------------------------------------


def test_rel_error_values():
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    # max over elements of |x - y| / max(1e-8, |x| + |y|)
    assert rel_error(np.array([1.0, 3.0]), np.array([1.0, 1.0])) == pytest.approx(0.5)
    assert rel_error(np.array([0.0]), np.array([1e-9])) == pytest.approx(1e-9 / 1e-8)
    assert rel_error(np.array([-1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0


def test_eval_numerical_gradient_scalar_function(rng):
    x = rng.standard_normal((3, 4))
    x0 = x.copy()
    f = lambda z: float(np.sum(z ** 3) + 2.0 * np.sum(z))
    grad = eval_numerical_gradient(f, x, h=1e-5)
    assert grad.shape == x.shape
    assert rel_error(grad, 3 * x0 ** 2 + 2.0) < 1e-8
    np.testing.assert_array_equal(x, x0)  # restored after each probe


def test_eval_numerical_gradient_is_central_difference():
    # f(x) = x^2 on one element: the central difference is exact for a quadratic,
    # a one-sided difference is off by h.
    x = np.array([3.0])
    grad = eval_numerical_gradient(lambda z: float(z[0] ** 2), x, h=1e-3)
    assert grad[0] == pytest.approx(6.0, abs=1e-9)


def test_eval_numerical_gradient_array(rng):
    x = rng.standard_normal((4, 5))
    W = rng.standard_normal((5, 3))
    df = rng.standard_normal((4, 3))
    x0 = x.copy()
    grad = eval_numerical_gradient_array(lambda z: z.dot(W), x, df, h=1e-5)
    assert grad.shape == x.shape
    assert rel_error(grad, df.dot(W.T)) < 1e-8
    np.testing.assert_array_equal(x, x0)


def test_eval_numerical_gradient_array_differences_before_summing():
    """cs231n computes ``np.sum((pos - neg) * df) / (2 * h)``: outputs that do
    not depend on x cancel exactly. Summing ``f(x) * df`` first and then
    differencing two large scalars loses the gradient in their roundoff."""
    x = np.array([0.3, -1.2])
    f = lambda z: np.array([2.0 * z[0], 1e10, -3.0 * z[1], 7e9])
    df = np.ones(4)
    grad = eval_numerical_gradient_array(f, x, df)
    np.testing.assert_allclose(grad, [2.0, -3.0], rtol=1e-9)


def test_eval_numerical_gradient_array_default_h(rng):
    x = rng.standard_normal(6)
    df = rng.standard_normal(6)
    grad = eval_numerical_gradient_array(lambda z: np.sin(z), x, df)
    assert rel_error(grad, np.cos(x) * df) < 1e-8


# ---------------------------------------------------------------------------
# batch norm gradient checks, cs231n style
# ---------------------------------------------------------------------------
# (N, D) with N = 8 rather than the notebook's 4: with four rows per column
# the space of well-conditioned upstream gradients (see gradcheck_problem)
# is too small to keep every dx element away from zero.
SHAPES = [(8, 3), (2, 2, 2, 3)] if CUDASIM else [(8, 5), (2, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", ["simplified", "staged"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_check(backend, rng, shape, method, training):
    x, gamma, beta, dout, rm, rv = gradcheck_problem(rng, shape)
    # running stats are not updated in the probes: in training mode pass none,
    # in evaluation mode they are read only
    kw = dict(training=training, backend=backend)
    if not training:
        kw.update(running_mean=rm, running_var=rv)

    fx = lambda z: fastbn.batchnorm_forward(z, gamma, beta, **kw)[0]
    fg = lambda g: fastbn.batchnorm_forward(x, g, beta, **kw)[0]
    fb = lambda b: fastbn.batchnorm_forward(x, gamma, b, **kw)[0]

    dx_num = eval_numerical_gradient_array(fx, x, dout)
    dgamma_num = eval_numerical_gradient_array(fg, gamma, dout)
    dbeta_num = eval_numerical_gradient_array(fb, beta, dout)

    _, cache = fastbn.batchnorm_forward(x, gamma, beta, **kw)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)

    errs = (rel_error(dx_num, dx), rel_error(dgamma_num, dgamma), rel_error(dbeta_num, dbeta))
    assert errs[0] < 1e-8, f"dx error {errs[0]:.2e}"
    assert errs[1] < 1e-10, f"dgamma error {errs[1]:.2e}"
    assert errs[2] < 1e-10, f"dbeta error {errs[2]:.2e}"


@pytest.mark.parametrize("method", ["simplified", "staged"])
def test_gradient_check_channels_last(backend, rng, method):
    """axis=-1 on (N, H, W, C): the same checks."""
    shape = (2, 2, 3, 2) if CUDASIM else (2, 3, 4, 3)
    x, gamma, beta, dout, _, _ = gradcheck_problem(rng, shape, axis=-1)
    fx = lambda z: fastbn.batchnorm_forward(z, gamma, beta, axis=-1, backend=backend)[0]
    fg = lambda g: fastbn.batchnorm_forward(x, g, beta, axis=-1, backend=backend)[0]
    dx_num = eval_numerical_gradient_array(fx, x, dout)
    dgamma_num = eval_numerical_gradient_array(fg, gamma, dout)
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, axis=-1, backend=backend)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
    assert rel_error(dx_num, dx) < 1e-8
    assert rel_error(dgamma_num, dgamma) < 1e-10
    np.testing.assert_allclose(dbeta, dout.sum(axis=(0, 1, 2)), rtol=1e-12)


def test_gradient_of_scalar_loss(backend, rng):
    """eval_numerical_gradient on a scalar loss through the forward pass.

    The target is chosen so that the loss gradient at x is the well-conditioned
    dout of gradcheck_problem (no element of dx near zero)."""
    x, gamma, beta, dout, _, _ = gradcheck_problem(rng, (6, 3))
    out0, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    target = out0 - dout

    def loss(z):
        out = fastbn.batchnorm_forward(z, gamma, beta, backend=backend)[0]
        return 0.5 * float(np.sum((out - target) ** 2))

    dx, _, _ = fastbn.batchnorm_backward(out0 - target, cache)
    dx_num = eval_numerical_gradient(loss, x, h=1e-5)
    assert rel_error(dx_num, dx) < 1e-7
