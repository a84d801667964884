"""asv benchmarks: batch-norm forward and backward on every backend.

Every class is parametrized over ``backend x shape x dtype`` (see
:mod:`benchmarks.common`; dtypes float32, float64, float16, bfloat16). Data
are made and filled in ``setup``, which also calls every timed kernel once
so that JIT compilation and first-touch page faults stay out of the
timings. A backend that cannot run here (not built, PyTorch not installed,
no ``ml_dtypes`` for bfloat16, no 16-bit or fused-ReLU kernels) raises
``NotImplementedError`` in ``setup`` and asv reports the benchmark as
skipped.

Batch norm + ReLU: ``ForwardReLU`` and ``BackwardReLU`` time the fused
``activation="relu"`` (PyTorch: ``batch_norm`` then ``relu_``, and backward
through both); ``ReLUSeparate`` times fastbn's batch norm followed by a
separate NumPy ReLU pass and the speedup of the fused kernels over it.

The ``track_*`` benchmarks time two things inside one call, as best-of-N with
``time.perf_counter``, and return their ratio, so that they compare like with
like on a noisy machine:

* ``track_speedup_simplified_over_staged`` (unit ``"x"``): staged backward
  time / simplified backward time.
* ``track_fraction_of_copy_limit`` (unit ``"fraction"``): the memory-bound
  limit time / the kernel's time, the limit being the kernel's compulsory
  bytes (forward 2, simplified backward 3 item sizes per element, with or
  without the fused ReLU; 2-byte items for float16/bfloat16) at the
  bandwidth of ``np.copyto`` (2 item sizes per element) on an array of the
  same size and dtype, timed in the same call.
* ``track_forward_speedup_fused_over_separate``,
  ``track_backward_speedup_fused_over_separate`` (unit ``"x"``): time of
  the two separate passes / time of the fused batch norm + ReLU.

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

    def make_case(self, backend, shape, dtype, activation=None):
        """Build the inputs; raises NotImplementedError to skip."""
        self.case = Case(backend, shape, dtype, activation=activation)
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


class ForwardReLU(_Benchmark):
    """Training forward of batch norm + ReLU, fused (``activation="relu"``).

    PyTorch's row is ``native_batch_norm`` then ``relu_`` (two passes).
    """

    def setup(self, backend, shape, dtype):
        case = self.make_case(backend, shape, dtype, activation="relu")
        case.forward_train()
        case.copy()

    def time_forward_relu(self, backend, shape, dtype):
        self.case.forward_train()

    def track_fraction_of_copy_limit(self, backend, shape, dtype):
        return self.copy_limit_fraction("forward", self.case.forward_train)

    track_fraction_of_copy_limit.unit = "fraction"


class BackwardReLU(_Benchmark):
    """Simplified backward through the fused batch norm + ReLU (mask rebuilt from x).

    PyTorch's row is ``threshold_backward`` (relu_'s gradient) then
    ``native_batch_norm_backward``.
    """

    def setup(self, backend, shape, dtype):
        case = self.make_case(backend, shape, dtype, activation="relu")
        case.forward_train()
        case.backward("simplified")
        case.copy()

    def time_backward_relu(self, backend, shape, dtype):
        self.case.backward("simplified")

    def track_fraction_of_copy_limit(self, backend, shape, dtype):
        return self.copy_limit_fraction("backward", lambda: self.case.backward("simplified"))

    track_fraction_of_copy_limit.unit = "fraction"


class ReLUSeparate(_Benchmark):
    """Batch norm, then ReLU as a NumPy pass of its own, against the fused kernels.

    Forward: fastbn's forward, then ``np.maximum(out, 0, out=out)``;
    backward: ``dout * (out > 0)`` into a buffer, then fastbn's simplified
    backward. PyTorch's batch_norm + relu_ is already two passes (its rows
    are in :class:`ForwardReLU` and :class:`BackwardReLU`): skipped here.
    """

    def setup(self, backend, shape, dtype):
        if backend == "torch":
            raise NotImplementedError("PyTorch's batch_norm + relu_ is in ForwardReLU and "
                                      "BackwardReLU")
        self.fused = self.make_case(backend, shape, dtype, activation="relu")
        self.separate = Case(backend, shape, dtype, activation="relu_separate")
        for case in (self.fused, self.separate):
            case.forward_train()
            case.backward("simplified")

    def time_forward_relu_separate(self, backend, shape, dtype):
        self.separate.forward_train()

    def time_backward_relu_separate(self, backend, shape, dtype):
        self.separate.backward("simplified")

    def track_forward_speedup_fused_over_separate(self, backend, shape, dtype):
        separate = self.best_of_n(self.separate.forward_train)
        fused = self.best_of_n(self.fused.forward_train)
        return separate / fused

    track_forward_speedup_fused_over_separate.unit = "x"

    def track_backward_speedup_fused_over_separate(self, backend, shape, dtype):
        separate = self.best_of_n(lambda: self.separate.backward("simplified"))
        fused = self.best_of_n(lambda: self.fused.backward("simplified"))
        return separate / fused

    track_backward_speedup_fused_over_separate.unit = "x"


class ForwardLarge(_LargeProfile, Forward):
    """:class:`Forward` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""


class BackwardLarge(_LargeProfile, Backward):
    """:class:`Backward` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""


class BackwardStagedLarge(_LargeProfile, BackwardStaged):
    """:class:`BackwardStaged` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""


class ForwardReLULarge(_LargeProfile, ForwardReLU):
    """:class:`ForwardReLU` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""


class BackwardReLULarge(_LargeProfile, BackwardReLU):
    """:class:`BackwardReLU` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""


class ReLUSeparateLarge(_LargeProfile, ReLUSeparate):
    """:class:`ReLUSeparate` on the memory-bound shape (``FASTBN_BENCH_PROFILE=slow``)."""
