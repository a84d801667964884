"""Numerical gradients and relative error, with the cs231n semantics."""
import numpy as np


def rel_error(x, y):
    """Maximum elementwise relative error ``|x - y| / max(1e-8, |x| + |y|)``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y))))


def _centred_difference(f, x, h, difference, verbose=False):
    """``difference(f(x + h e_i), f(x - h e_i)) / 2h`` for every element ``i``.

    ``x`` is perturbed in place, one element at a time, and restored.
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        index = it.multi_index
        saved = x[index]
        x[index] = saved + h
        f_plus = np.array(f(x), copy=True)
        x[index] = saved - h
        f_minus = np.array(f(x), copy=True)
        x[index] = saved
        grad[index] = difference(f_plus, f_minus) / (2 * h)
        if verbose:
            print(index, grad[index])
        it.iternext()
    return grad


def eval_numerical_gradient(f, x, verbose=False, h=1e-5):
    """Centred-difference gradient of a scalar function ``f`` at ``x``.

    Parameters
    ----------
    f : callable
        ``f(x) -> float``.
    x : ndarray
        Point at which to evaluate the gradient (perturbed in place and
        restored).
    verbose : bool, default False
        Print each partial derivative.
    h : float, default 1e-5
        Step.

    Returns
    -------
    grad : ndarray of ``x``'s shape
    """
    return _centred_difference(f, x, h, np.subtract, verbose)


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Centred-difference gradient of ``sum(f(x) * df)`` at ``x``.

    ``f`` returns an array; ``df`` is the upstream gradient of its output.
    ``x`` is perturbed in place and restored.

    Returns
    -------
    grad : ndarray of ``x``'s shape
    """
    # Difference the outputs before weighting and summing them, as cs231n
    # does: the difference of two large sums would lose the gradient.
    return _centred_difference(f, x, h, lambda f_plus, f_minus: np.sum((f_plus - f_minus) * df))
