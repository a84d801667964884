"""asv benchmarks: batch-norm forward and backward on every backend.

Every class is parametrized over ``backend x shape x dtype`` (see
:mod:`benchmarks.common` for the grids of the profiles). ``setup`` builds
the data and calls every timed kernel once (JIT compilation, first-touch
page faults); a backend that cannot run a case raises
``NotImplementedError`` there and asv reports it as skipped.

The ``track_*`` benchmarks time two kernels in the interleaved rounds of
:func:`fastbn.bench.timing.interleaved` and return the ratio of the
medians: ``track_speedup_simplified_over_staged`` (unit ``x``: staged /
simplified), ``track_fraction_of_copy_limit`` (unit ``fraction``: the
compulsory bytes at ``np.copyto``'s bandwidth / the kernel's time), and
``track_*_speedup_fused_over_separate`` (unit ``x``: batch norm then a
NumPy ReLU pass / the fused batch norm + ReLU). Peak memory is tracked for
the staged backward, the one kernel that allocates full-size intermediates.
"""
from .common import PARAM_NAMES, Case, fraction_of_copy_limit, params, profile, ratio


class _Benchmark:
    """Parameters, timeout and asv's repeats, shared by every class."""

    params = params()
    param_names = PARAM_NAMES
    timeout = 600 if profile() == "slow" else 120
    # asv's own repeats, kept short: at most 5 samples of at least 20 ms,
    # 2 rounds (one per process start), so that a full run stays in minutes.
    repeat = (1, 5, 2.0)
    rounds = 2
    warmup_time = 0.05
    # Interleaved rounds inside a track_* call.
    interleaved_rounds = 5


class Forward(_Benchmark):
    """Training and evaluation forward."""

    def setup(self, backend, shape, dtype):
        self.case = Case(backend, shape, dtype)
        self.case.forward()
        self.case.forward_eval()

    def time_forward_train(self, backend, shape, dtype):
        self.case.forward()

    def time_forward_eval(self, backend, shape, dtype):
        self.case.forward_eval()

    def track_fraction_of_copy_limit(self, backend, shape, dtype):
        return fraction_of_copy_limit(self.case, "forward", self.case.forward,
                                      self.interleaved_rounds)

    track_fraction_of_copy_limit.unit = "fraction"


class Backward(_Benchmark):
    """Simplified (closed-form) training backward."""

    def setup(self, backend, shape, dtype):
        self.case = Case(backend, shape, dtype)
        self.case.simplified()

    def time_backward_simplified(self, backend, shape, dtype):
        self.case.simplified()

    def track_fraction_of_copy_limit(self, backend, shape, dtype):
        return fraction_of_copy_limit(self.case, "backward", self.case.simplified,
                                      self.interleaved_rounds)

    track_fraction_of_copy_limit.unit = "fraction"


class BackwardStaged(_Benchmark):
    """Staged (computational-graph) backward and its cost over the simplified one.

    PyTorch has no staged backward: its rows are skipped here only.
    """

    def setup(self, backend, shape, dtype):
        if backend == "torch":
            raise NotImplementedError("PyTorch has no staged backward")
        self.case = Case(backend, shape, dtype)
        self.case.staged()
        self.case.simplified()

    def time_backward_staged(self, backend, shape, dtype):
        self.case.staged()

    def peakmem_backward_staged(self, backend, shape, dtype):
        self.case.staged()

    def track_speedup_simplified_over_staged(self, backend, shape, dtype):
        return ratio(self.case.staged, self.case.simplified, self.interleaved_rounds)

    track_speedup_simplified_over_staged.unit = "x"


class ForwardReLU(_Benchmark):
    """Fused batch norm + ReLU forward; PyTorch: ``native_batch_norm`` then ``relu_``."""

    def setup(self, backend, shape, dtype):
        self.case = Case(backend, shape, dtype, activation="relu")
        self.case.forward()

    def time_forward_relu(self, backend, shape, dtype):
        self.case.forward()

    def track_fraction_of_copy_limit(self, backend, shape, dtype):
        return fraction_of_copy_limit(self.case, "forward", self.case.forward,
                                      self.interleaved_rounds)

    track_fraction_of_copy_limit.unit = "fraction"


class BackwardReLU(_Benchmark):
    """Backward through the fused batch norm + ReLU; PyTorch: ``threshold_backward``
    then ``native_batch_norm_backward``."""

    def setup(self, backend, shape, dtype):
        self.case = Case(backend, shape, dtype, activation="relu")
        self.case.simplified()

    def time_backward_relu(self, backend, shape, dtype):
        self.case.simplified()

    def track_fraction_of_copy_limit(self, backend, shape, dtype):
        return fraction_of_copy_limit(self.case, "backward", self.case.simplified,
                                      self.interleaved_rounds)

    track_fraction_of_copy_limit.unit = "fraction"


class ReLUSeparate(_Benchmark):
    """Batch norm then a NumPy ReLU pass, against the fused kernels (fastbn only)."""

    def setup(self, backend, shape, dtype):
        if backend == "torch":
            raise NotImplementedError("PyTorch's batch_norm + relu_ is in ForwardReLU")
        self.fused = Case(backend, shape, dtype, activation="relu")
        self.separate = Case(backend, shape, dtype, activation="relu_separate")
        for case in (self.fused, self.separate):
            case.simplified()

    def time_forward_relu_separate(self, backend, shape, dtype):
        self.separate.forward()

    def time_backward_relu_separate(self, backend, shape, dtype):
        self.separate.simplified()

    def track_forward_speedup_fused_over_separate(self, backend, shape, dtype):
        return ratio(self.separate.forward, self.fused.forward, self.interleaved_rounds)

    track_forward_speedup_fused_over_separate.unit = "x"

    def track_backward_speedup_fused_over_separate(self, backend, shape, dtype):
        return ratio(self.separate.simplified, self.fused.simplified, self.interleaved_rounds)

    track_backward_speedup_fused_over_separate.unit = "x"
