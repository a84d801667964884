"""torchvision ResNets on the CPU, stock batch norm vs fastbn (``--suite torch-model``).

For each model (ResNet-18, ResNet-50; random weights, nothing downloaded),
input size (224x224, 112x112; batch 32) and storage (float32, bfloat16),
three versions of the same model are timed in interleaved rounds:

- ``torch``: stock PyTorch batch norm;
- ``fastbn``: after :func:`fastbn.torch.convert_batchnorm`;
- ``fastbn+relu``: also :func:`fastbn.torch.fuse_batchnorm_relu` (the stem's
  and each block's first batch norm compute the ReLU that follows them).

Each is timed on a training step (forward, cross-entropy, backward, SGD
step) and on an evaluation forward; the figures are medians of the rounds.
Three more training steps of each (one in the tiny profile), under
``torch.profiler`` in interleaved rounds, give the time spent in batch norm
(the forward op and its backward node, inclusive: medians) and its share of
the step; batch norm's time against PyTorch's is the median of the rounds'
ratios.

Before the models, a first table gives the cost of one call on a tiny
tensor (``(2, 8, 4, 4)`` float32): ``torch.nn.functional.batch_norm``
against :func:`fastbn.torch.batch_norm`, training forward, evaluation
forward, and training forward + backward (weight and bias requiring
gradients), timed in the same interleaved rounds.

Bars (ResNet-50, batch 32, 224x224, float32 training step): the converted
model saves at least the batch-norm time that fastbn saves (no cost added
elsewhere); with and without the fused ReLU, batch norm's own time is at
least 2x lower, and the training step and the evaluation forward are at
least as fast as PyTorch's. Per call:
fastbn's training forward at most 2x PyTorch's time, forward + backward at
most 1.2x.
"""
import copy
import functools
import importlib.util
import math
import os
import statistics
import time
import warnings

from .. import timing
from ..kernels import Threads
from ..report import Report, cell
from . import progress

MODELS = ["resnet18", "resnet50"]
SIZES = [224, 112]
BATCH = 32
DTYPES = ["float32", "bfloat16"]
VARIANTS = ["torch", "fastbn", "fastbn+relu"]
THREADS = 2
BN_BAR = 2.0
PER_CALL_SHAPE = (2, 8, 4, 4)
# The most fastbn's time per call may be, as a multiple of PyTorch's.
PER_CALL_BARS = {"training forward": 2.0, "forward + backward": 1.2}
PER_CALL_SECONDS = 0.02
PER_CALL_CASES = ("training forward", "evaluation forward", "forward + backward")
BUDGET_SECONDS = 240.0
# Profiled training steps per variant, in interleaved rounds (batch norm's time)
PROFILED_ROUNDS = 3
CLASSES = 1000
# Profiler events that hold a whole batch-norm call (inclusive times)
BN_EVENTS = {"torch": ("aten::batch_norm", "NativeBatchNormBackward0"),
             "fastbn": ("_EagerBatchNorm", "_EagerBatchNormBackward",   # eager calls
                        "fastbn::batch_norm",                            # the operator
                        "GeneratedBackwardFor_fastbn_batch_norm_defaultBackward")}


# What a failed ``import torchvision`` prints when its compiled operators
# cannot load beside this torch (the one failure the workaround is for).
_MISSING_OPERATOR = "operator torchvision::nms does not exist"
# The schemas torchvision's Python import registers fake kernels for.
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_PROBE = ("import warnings; warnings.simplefilter('ignore'); import torchvision")


def _plain_import_fails():
    """The failure of ``import torchvision`` in a fresh interpreter: None when
    it imports, else the end of its error output.

    Tried in a subprocess, so that a failure (or an abort) there leaves this
    process untouched, with nothing registered twice.
    """
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=300, check=False)
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout or f"exit status {done.returncode}")[-2000:]


def import_torchvision():
    """torchvision, imported as the user's installation allows.

    A torchvision built for the installed torch imports plainly, and that is
    what this does whenever it can: first in this process when torchvision
    is already imported, else after trying the plain import in a fresh
    interpreter. Only when that try fails with the one known failure is a
    workaround used: PyPI's torchvision wheels are built against CUDA torch,
    so beside the CPU build of torch their compiled operators
    (``torchvision/_C.so``) do not load, and the import then fails
    registering fake kernels for ``torchvision::nms`` ("operator
    torchvision::nms does not exist"). The models are plain Python and use
    none of those operators, so the two schemas the import needs are defined
    here (with no kernel), each only where no such operator exists, and
    torchvision imports. The compiled library that failed to load in the
    fresh interpreter does not load here either, so nothing registers an
    operator twice (which aborts the process).

    Raises
    ------
    ImportError
        torchvision is not installed (``pip install "fastbn[torchvision]"``),
        or it fails to import for another reason (the message gives it).
    """
    import sys

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError('torchvision is not installed: pip install "fastbn[torchvision]"')
    import torch

    failure = _plain_import_fails()
    if failure is not None:
        if _MISSING_OPERATOR not in failure:
            raise ImportError(f"import torchvision fails in this environment:\n{failure}")
        _define_missing_schemas(torch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "Failed to load image Python extension", ...
        import torchvision
    return torchvision


def _define_missing_schemas(torch):
    """Define ``torchvision::nms``/``qnms`` (no kernels) where they do not exist yet."""
    missing = []
    for schema in _SCHEMAS:
        name = schema.split("(", 1)[0]
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            missing.append(schema)
    if not missing:
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing:
        library.define(schema)
    # kept alive with the process: the schemas go when the library object does
    _define_missing_schemas.libraries = [*getattr(_define_missing_schemas, "libraries", []),
                                         library]


def _models(torchvision, name, dtype, backend):
    """The three versions of one randomly initialized model, same weights."""
    import torch

    import fastbn.torch

    torch.manual_seed(0)
    stock = getattr(torchvision.models, name)(num_classes=CLASSES).to(dtype)
    converted = fastbn.torch.convert_batchnorm(copy.deepcopy(stock), backend=backend)
    fused = fastbn.torch.fuse_batchnorm_relu(
        fastbn.torch.convert_batchnorm(copy.deepcopy(stock), backend=backend))
    return {"torch": stock, "fastbn": converted, "fastbn+relu": fused}


def _train_step(model, x, target):
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
    return step


def _eval_forward(model, x):
    import torch

    def forward():
        model.eval()
        with torch.no_grad():
            model(x)
    return forward


def _profiled_bn(step, variant):
    """(seconds of one profiled training step, seconds in batch norm within it)."""
    from torch.profiler import ProfilerActivity, profile

    names = BN_EVENTS["torch" if variant == "torch" else "fastbn"]
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    in_bn = sum(event.cpu_time_total for event in profiler.key_averages()
                if event.key in names) * 1e-6
    return seconds, in_bn


def _profiled_rounds(steps, rounds):
    """Batch norm's time in the training steps, profiled in interleaved rounds.

    Each round profiles one step of every variant, the first variant
    rotating from round to round (as :func:`fastbn.bench.timing.interleaved`
    does), so that a change in the machine's speed falls on all of them.

    Returns
    -------
    profiled : dict
        ``variant -> (median step seconds, median batch-norm seconds)``.
    bn_ratios : dict
        ``variant -> median over the rounds of (PyTorch's batch-norm time /
        the variant's)``, from the same round.
    """
    variants = list(steps)
    samples = {v: [] for v in variants}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            samples[variant].append(_profiled_bn(steps[variant], variant))
    profiled = {v: (statistics.median(s[0] for s in samples[v]),
                    statistics.median(s[1] for s in samples[v])) for v in variants}
    bn_ratios = {v: statistics.median(stock[1] / own[1] if own[1] > 0 else math.inf
                                      for stock, own in zip(samples["torch"], samples[v]))
                 for v in variants}
    return profiled, bn_ratios


def _per_call_kernels(torch, backend):
    """``"<torch|fastbn> <case>" -> callable``: one call of each case on a
    tiny tensor, with running statistics, weight and bias."""
    import fastbn.torch as fastbn_torch

    generator = torch.Generator().manual_seed(0)
    channels = PER_CALL_SHAPE[1]
    x = torch.randn(PER_CALL_SHAPE, generator=generator)
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    grad = torch.randn(PER_CALL_SHAPE, generator=generator)

    def cases(function):
        stats = (torch.zeros(channels), torch.ones(channels))
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        return dict(zip(PER_CALL_CASES, (
            lambda: function(x, *stats, weight, bias, training=True),
            lambda: function(x, *stats, weight, bias, training=False),
            lambda: function(leaves[0], *stats, *leaves[1:], training=True).backward(grad))))

    kernels = {}
    for name, function in (("torch", torch.nn.functional.batch_norm),
                           ("fastbn", functools.partial(fastbn_torch.batch_norm,
                                                        backend=backend))):
        kernels.update({f"{name} {case}": call for case, call in cases(function).items()})
    return kernels


def per_call_medians(backend, rounds, threads):
    """``case -> (PyTorch's median, fastbn's median)`` in seconds, and the
    rounds timed: :func:`_per_call_kernels` in interleaved rounds, with
    ``threads`` threads."""
    import torch

    with Threads(threads, use_torch=True):
        got = timing.interleaved(_per_call_kernels(torch, backend), rounds,
                                 min_seconds=PER_CALL_SECONDS)
    return {case: (got[f"torch {case}"].median, got[f"fastbn {case}"].median)
            for case in PER_CALL_CASES}, got.rounds


# Times the per-call table in a child process (argv: backend or "", rounds,
# threads) and prints it as JSON: see _per_call.
_PER_CALL_SCRIPT = """
import json, sys
from fastbn.bench.suites.torch_model import per_call_medians
medians, rounds = per_call_medians(sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3]))
print(json.dumps({"medians": medians, "rounds": rounds}))
"""


def _per_call(backend, rounds, threads, report):
    """The per-call table and its bars (see the module docstring).

    With ``OMP_WAIT_POLICY=passive`` (which the model timings use), PyTorch's
    OpenMP threads sleep between calls, and waking them costs a tiny call
    more than the call itself (140 us instead of 9 us on a 2-core Zen 4).
    No user pays that with the default policy, so the table is then timed
    in a child process without it.
    """
    if os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive":
        import json
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        done = subprocess.run([sys.executable, "-c", _PER_CALL_SCRIPT, backend or "",
                               str(rounds), str(threads)], env=env, capture_output=True,
                              text=True, timeout=600, check=True)
        result = json.loads(done.stdout.splitlines()[-1])
        medians, timed_rounds = result["medians"], result["rounds"]
        where = "in a child process without OMP_WAIT_POLICY"
    else:
        medians, timed_rounds = per_call_medians(backend, rounds, threads)
        where = "in this process"
    rows = []
    for case in PER_CALL_CASES:
        stock, own = medians[case]
        ratio = own / stock
        rows.append([case, f"{stock * 1e6:.1f}", f"{own * 1e6:.1f}", cell(ratio, 2, "x")])
        if case in PER_CALL_BARS:
            bar = PER_CALL_BARS[case]
            report.add_bar(f"per call, {case}: fastbn's time <= {bar:g}x PyTorch's",
                           ratio <= bar, cell(ratio, 2, "x"))
    report.add_table(
        f"One call on {PER_CALL_SHAPE} float32 (us)",
        ["case", "torch.nn.functional.batch_norm", "fastbn.torch.batch_norm",
         "fastbn / torch"], rows,
        f"Medians of {timed_rounds} interleaved rounds of about {PER_CALL_SECONDS * 1e3:g} ms "
        f"of back-to-back calls, {threads} thread(s), {where}; running statistics, weight "
        "and bias given (requiring gradients in *forward + backward*).")


def _ms(t):
    return "-" if t is None or t.median is None else f"{t.median * 1e3:.0f} ({t.best * 1e3:.0f})"


def run(options):
    """Time the models; return the report."""
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError('the torch-model suite needs torch: pip install "fastbn[torch]"') \
            from exc
    try:
        torchvision = import_torchvision()
    except ImportError as exc:
        raise RuntimeError(str(exc)) from exc
    import fastbn

    models = options.pick(MODELS, MODELS, ["resnet18"])
    sizes = options.pick(SIZES, [112], [32])
    batch = options.pick(BATCH, BATCH, 4)
    if options.shapes:   # --shapes 32x3x224x224: batch and square input sizes
        if any(len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]
               for shape in options.shapes) or len({s[0] for s in options.shapes}) != 1:
            raise ValueError("--shapes for torch-model: Nx3xSxS, one batch size N")
        batch = options.shapes[0][0]
        sizes = [shape[2] for shape in options.shapes]
    dtypes = options.dtypes or options.pick(DTYPES, ["float32"], ["float32"])
    rounds = options.rounds or options.pick(5, 3, 2)
    profiled_rounds = options.pick(PROFILED_ROUNDS, PROFILED_ROUNDS, 1)
    threads = (options.threads or [THREADS])[0]
    backend = (options.backends or [None])[0]
    if backend == "torch":
        raise ValueError("--backends names the fastbn backend of the converted models")
    backend_name = backend or fastbn.registry.default_backend()

    report = Report("fastbn inside PyTorch models: torchvision ResNets on the CPU",
                    options.command)
    report.add_fact(f"batch {batch}; threads: {threads} (PyTorch, numba, OpenMP); fastbn "
                    f"backend: {backend_name}; OMP_WAIT_POLICY: "
                    f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    rows = []
    progress(options, "torch-model per call")
    _per_call(backend, rounds, threads, report)
    with Threads(threads, use_torch=True):
        for name in models:
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                versions = _models(torchvision, name, dtype, backend)
                carriers = sum(1 for m in versions["fastbn+relu"].modules()
                               if getattr(m, "activation", None) == "relu")
                norms = sum(1 for m in versions["fastbn"].modules()
                            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
                report.add_fact(f"{name}: {norms} batch norms, {carriers} of them fused with "
                                f"the ReLU after them in fastbn+relu")
                for size in sizes:
                    generator = torch.Generator().manual_seed(size)
                    x = torch.randn(batch, 3, size, size, generator=generator).to(dtype)
                    target = torch.randint(0, CLASSES, (batch,), generator=generator)
                    steps = {v: _train_step(versions[v], x, target) for v in VARIANTS}
                    kernels = {f"{v} train": steps[v] for v in VARIANTS}
                    kernels.update({f"{v} eval": _eval_forward(versions[v], x)
                                    for v in VARIANTS})
                    progress(options, f"torch-model {name} {size}x{size} {dtype_name}")
                    got = timing.interleaved(kernels, rounds, min_seconds=0.0,
                                             budget_seconds=BUDGET_SECONDS)
                    report.add_warnings(got.warnings(f"{name} {size} {dtype_name}"))
                    profiled, bn_ratios = _profiled_rounds(steps, profiled_rounds)
                    stock_step, stock_bn = profiled["torch"]
                    for variant in VARIANTS:
                        step_seconds, bn_seconds = profiled[variant]
                        train_speedup = got.ratio("torch train", f"{variant} train", "median")
                        eval_speedup = got.ratio("torch eval", f"{variant} eval", "median")
                        bn_speedup = bn_ratios[variant]
                        rows.append([
                            name, f"{size}x{size}", dtype_name, variant,
                            _ms(got[f"{variant} train"]), cell(train_speedup, 2, "x"),
                            _ms(got[f"{variant} eval"]), cell(eval_speedup, 2, "x"),
                            f"{bn_seconds * 1e3:.1f}", cell(100 * bn_seconds / step_seconds, 1,
                                                             "%"),
                            cell(bn_speedup, 2, "x"), str(got.rounds)])
                        report.data[f"{name} {size} {dtype_name} {variant}"] = {
                            "train_median_s": got[f"{variant} train"].median,
                            "eval_median_s": got[f"{variant} eval"].median,
                            "profiled_step_s": step_seconds, "profiled_bn_s": bn_seconds}
                        if (name, size, dtype_name, variant) == ("resnet50", 224, "float32",
                                                                 "fastbn"):
                            stock_median = got["torch train"].median
                            saved_end_to_end = stock_median - got["fastbn train"].median
                            saved_in_bn = (stock_bn - bn_seconds) * stock_median / stock_step
                            report.add_bar(
                                "ResNet-50 224x224 float32 training step: time saved end to "
                                "end >= batch-norm time saved",
                                saved_end_to_end >= saved_in_bn,
                                f"saved {100 * saved_end_to_end / stock_median:.1f}% of the "
                                f"step end to end; batch norm's saving is "
                                f"{100 * saved_in_bn / stock_median:.1f}% of it")
                        if (name, size, dtype_name) == ("resnet50", 224, "float32") \
                                and variant != "torch":
                            report.add_bar(f"ResNet-50 224x224 float32, {variant}: batch "
                                           f"norm's own time >= {BN_BAR}x lower",
                                           bn_speedup is not None and bn_speedup >= BN_BAR,
                                           f"{cell(bn_speedup, 2)}x")
                            report.add_bar(f"ResNet-50 224x224 float32, {variant}: training "
                                           "step and evaluation forward at least as fast as "
                                           "PyTorch's",
                                           train_speedup is not None and eval_speedup is not None
                                           and min(train_speedup, eval_speedup) >= 1.0,
                                           f"step {cell(train_speedup, 2)}x, evaluation "
                                           f"{cell(eval_speedup, 2)}x")
    report.add_table(
        "Training step and evaluation forward",
        ["model", "input", "dtype", "batch norm", "train ms median (best)", "train vs torch",
         "eval ms median (best)", "eval vs torch", "BN ms in step", "BN share of step",
         "BN vs torch", "r"],
        rows,
        "Training step: forward, cross-entropy, backward, SGD step (momentum 0.9). "
        "Evaluation: forward under `torch.no_grad()`. *vs torch*: the stock model's median "
        "/ this median (> 1: faster). *BN ms in step*, *BN share*: medians of "
        f"{profiled_rounds} more training steps under `torch.profiler`, one per variant in "
        "each interleaved round (batch-norm forward ops and backward nodes, inclusive; "
        "the profiler slows the step down a little); *BN vs torch*: the median over those "
        "rounds of the stock batch-norm time / this one. bfloat16: weights, activations and "
        "running statistics in bfloat16. "
        "*r*: interleaved rounds.")
    return report
