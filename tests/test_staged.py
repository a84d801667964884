"""The one walker of the staged backward (``fastbn/backends/_staged.py``).

Every backend's ``backward_staged`` is this walk over its own primitives, so
what holds here holds for each of them: the stages and their order, one new
full-size array per stage, and the peak number of full-size arrays alive at
once, which is what the memory check asks for (``_staged.temporaries``).
"""
import gc
import weakref

import numpy as np
import pytest

from conftest import ref_backward
from fastbn.backends import _staged


class _RecordingOps(_staged.HostChannels):
    """float64 NumPy primitives that log each stage and count live full-size arrays."""

    def __init__(self, shape):
        self.shape = shape
        self.stages = []
        self.live = 0
        self.peak = 0

    def _new(self, name, values):
        array = np.array(values, dtype=np.float64)     # always a new array
        self.stages.append(name)
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(array, self._freed)
        return array

    def _freed(self):
        self.live -= 1

    def normalize(self, x, mean, invstd, gamma, beta):
        return self._new("normalize", (x - mean[:, None]) * invstd[:, None] * gamma[:, None]
                         + beta[:, None])

    def mask_positive(self, u, v):
        return self._new("mask_positive", np.where(v > 0, u, 0.0))

    def subtract(self, u, p):
        return self._new("subtract", u - p[:, None])

    def multiply(self, u, p):
        return self._new("multiply", u * p[:, None])

    def broadcast(self, p):
        return self._new("broadcast", np.broadcast_to(p[:, None], self.shape))

    def twice_product(self, u, v):
        return self._new("twice_product", 2 * u * v)

    def add(self, u, v):
        return self._new("add", u + v)

    def add_into(self, u, p, out):
        self.stages.append("add_into")
        out[...] = u + p[:, None]

    def sum(self, u):
        self.stages.append("sum")
        return u.sum(axis=(0, 2))

    def sum_of_product(self, u, v):
        self.stages.append("sum_of_product")
        return (u * v).sum(axis=(0, 2))


def _inputs(relu, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 5)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    gamma = rng.uniform(0.5, 1.5, 4)
    beta = rng.standard_normal(4) if relu else np.zeros(4)
    return x, dy, gamma, beta


@pytest.mark.parametrize("relu", [False, True])
def test_the_walk_is_the_staged_graph_and_its_peak_is_what_memory_is_asked_for(relu):
    x, dy, gamma, beta = _inputs(relu)
    mean = x.mean(axis=(0, 2))
    invstd = 1 / np.sqrt(x.var(axis=(0, 2)) + 1e-5)
    ops = _RecordingOps(x.shape)
    out = np.empty_like(x)
    gc.disable()        # the count relies on reference counting alone
    try:
        dgamma, dbeta = _staged.backward(ops, dy, x, mean, invstd, gamma, beta, relu, out,
                                         x.shape[0] * x.shape[2])
    finally:
        gc.enable()
    first = ["normalize", "mask_positive"] if relu else []
    assert ops.stages == first + [
        "subtract", "multiply", "sum", "sum_of_product", "multiply", "sum_of_product",
        "multiply", "broadcast", "twice_product", "add", "sum", "add_into"]
    assert ops.peak == _staged.temporaries(relu)
    assert ops.live == 0
    # The walk is the gradient: compare with the closed form in float64. Both
    # sum 15 values per channel in float64 (error about 15 * 2**-53 of the
    # magnitudes, which are of order 1 here), far inside 1e-12.
    y = (x - mean[:, None]) * invstd[:, None] * gamma[:, None] + beta[:, None]
    masked = np.where(y > 0, dy, 0.0) if relu else dy
    want_dx, want_dgamma, want_dbeta = ref_backward(masked, x, gamma, eps=1e-5)
    np.testing.assert_allclose(out, want_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dgamma, want_dgamma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbeta, want_dbeta, rtol=1e-12, atol=1e-12)


def test_relu_without_beta_is_refused():
    x, dy, gamma, _ = _inputs(True)
    ones = np.ones(4)
    with pytest.raises(ValueError, match="beta"):
        _staged.backward(_RecordingOps(x.shape), dy, x, ones, ones, gamma, None, True,
                         np.empty_like(x), 15)
