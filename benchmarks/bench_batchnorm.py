"""asv benchmarks: batch-norm forward and backward on every backend.

Every class is parametrized over ``backend x shape x dtype`` (see
:mod:`benchmarks.common`). Data are made and filled in ``setup``, which also
calls every timed kernel once so that JIT compilation and first-touch page
faults stay out of the timings. A backend that cannot run here (not built,
PyTorch not installed) raises ``NotImplementedError`` in ``setup`` and asv
reports the benchmark as skipped.

The ``track_*`` benchmarks time two things inside one call, as best-of-N with
``time.perf_counter``, and return their ratio, so that they compare like with
like on a noisy machine:

* ``track_speedup_simplified_over_staged`` (unit ``"x"``): staged backward
  time / simplified backward time.
* ``track_fraction_of_copy_limit`` (unit ``"fraction"``): the memory-bound
  limit time / the kernel's time, the limit being the kernel's compulsory
  bytes (forward 2, simplified backward 3 item sizes per element) at the
  bandwidth of ``np.copyto`` (2 item sizes per element) on an array of the
  same size, timed in the same call.

The ``*Large`` classes hold the memory-bound shape ``64x256x56x56``; they are
skipped unless ``FASTBN_BENCH_PROFILE=slow``; ``FASTBN_BENCH_PROFILE=tiny``
puts one tiny shape, float32 only, in the ordinary classes.
"""
from .common import (DTYPES, LARGE_SHAPES, PARAM_NAMES, Case, backends,
                     best_time, dtypes, fraction_of_copy_limit,
                     require_slow_profile, shapes)


class _Benchmark:
    """Parameters, timeout and repetition count shared by every class."""

    params = [backends(), shapes(), dtypes()]
    param_names = PARAM_NAMES
    timeout = 120
    # Repetitions of each timing inside a track_* call (best of n_repeat).
    n_repeat = 5

    def make_case(self, backend, shape, dtype):
        """Build the inputs; raises NotImplementedError to skip."""
        self.case = Case(backend, shape, dtype)
        return self.case

    def best_of_n(self, func):
        """Best of ``n_repeat`` timed calls of ``func`` (``setup`` warmed it up)."""
        return best_time(func, self.n_repeat, warmup=False)

    def copy_limit_fraction(self, kernel, func):
        """Copy timed first, then ``func``: the kernel's fraction of the copy limit."""
        copy_seconds = self.best_of_n(self.case.copy)
        seconds = self.best_of_n(func)
        return fraction_of_copy_limit(kernel, seconds, copy_seconds)


class _LargeProfile:
    """Mixin: the memory-bound shape, skipped unless ``FASTBN_BENCH_PROFILE=slow``.

    Put it first in the bases, before the benchmark class it resizes.
    """

    params = [backends(), LARGE_SHAPES, DTYPES]
    timeout = 600
    n_repeat = 3

    def setup(self, backend, shape, dtype):
        require_slow_profile()
        super().setup(backend, shape, dtype)


class Forward(_Benchmark):
    """Training and evaluation forward."""

    def setup(self, backend, shape, dtype):
        case = self.make_case(backend, shape, dtype)
        case.forward_train()
        case.forward_eval()
        case.copy()

    def time_forward_train(self, backend, shape, dtype):
        self.case.forward_train()

    def time_forward_eval(self, backend, shape, dtype):
        self.case.forward_eval()

    def peakmem_forward(self, backend, shape, dtype):
        self.case.forward_train()

    def track_fraction_of_copy_limit(self, backend, shape, dtype):
        return self.copy_limit_fraction("forward", self.case.forward_train)

    track_fraction_of_copy_limit.unit = "fraction"


class Backward(_Benchmark):
    """Simplified (closed-form) training backward."""

    def setup(self, backend, shape, dtype):
        case = self.make_case(backend, shape, dtype)
        case.forward_train()
        case.backward("simplified")
        case.copy()

    def time_backward_simplified(self, backend, shape, dtype):
        self.case.backward("simplified")

    def peakmem_backward(self, backend, shape, dtype):
        self.case.backward("simplified")

    def track_fraction_of_copy_limit(self, backend, shape, dtype):
        return self.copy_limit_fraction("backward", lambda: self.case.backward("simplified"))

    track_fraction_of_copy_limit.unit = "fraction"


class BackwardStaged(_Benchmark):
    """Staged (computational-graph) backward, and its cost over the simplified one.

    PyTorch has no staged backward: its rows are skipped here only.
    """

    def setup(self, backend, shape, dtype):
        if backend == "torch":
            raise NotImplementedError("PyTorch has no staged backward")
        case = self.make_case(backend, shape, dtype)
        case.forward_train()
        case.backward("staged")
        case.backward("simplified")

    def time_backward_staged(self, backend, shape, dtype):
        self.case.backward("staged")

    def peakmem_backward_staged(self, backend, shape, dtype):
        self.case.backward("staged")

    def track_speedup_simplified_over_staged(self, backend, shape, dtype):
        staged = self.best_of_n(lambda: self.case.backward("staged"))
        simplified = self.best_of_n(lambda: self.case.backward("simplified"))
        return staged / simplified

    track_speedup_simplified_over_staged.unit = "x"


class ForwardLarge(_LargeProfile, Forward):
    """:class:`Forward` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""


class BackwardLarge(_LargeProfile, Backward):
    """:class:`Backward` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""


class BackwardStagedLarge(_LargeProfile, BackwardStaged):
    """:class:`BackwardStaged` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""
