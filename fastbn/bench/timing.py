"""The timing core of every fastbn benchmark: interleaved rounds.

Kernels that are compared are timed in the same rounds: each round calls
every kernel once (a *sample*: enough back-to-back calls to last
``min_seconds``, their mean time per call), the starting kernel rotating
from round to round, so that load from other processes falls on all of
them alike. The figures of a kernel are the best (minimum) and the median
of its samples, and its spread ``(median - best) / best``. While a spread
exceeds :data:`UNSTABLE` more rounds are timed (up to ``max_rounds``); a
figure still above it is flagged. The copy limit (``np.copyto`` of the same
bytes) is one more kernel of the same rounds. Before each sample the core
can sleep (``settle_seconds``), so that the spinning threads of one OpenMP
runtime do not slow the next kernel (the suites time PyTorch, whose own
runtime a sleep did not tame, in a process of its own: see
:mod:`fastbn.bench.peer`; :func:`merged` puts the two groups in one
table), then call the kernel once untimed (``warm_up``), so that the
sample times it at its own steady speed; :func:`same_start` gives both
options to the two groups a suite compares. The 1-minute load average is read before and after.

Variants: ``synchronize`` (a device: called after each sample, inside the
timed interval, e.g. ``cuda.synchronize``) and ``barrier`` (MPI: called
before each sample, outside it; see :func:`per_rank`). The core knows no
suite, no kernel and no report format.
"""
import gc
import time

import numpy as np

from .. import machine

ROUNDS = 5
MIN_SECONDS = 2e-3
UNSTABLE = 0.25
# A sleep before each sample of a group (see interleaved): longer than an
# OpenMP pool's spin-wait after a parallel region (libgomp's default
# GOMP_SPINCOUNT), so that one kernel's idle threads do not compete with the
# next kernel's.
SETTLE_SECONDS = 0.01
COPY = "copy"
# Compulsory memory traffic per element, in item sizes: a copy reads and
# writes (2), the training forward reads x and writes y (2), the simplified
# backward reads dy and x and writes dx (3). A fused ReLU adds nothing.
BYTES_PER_ELEMENT = {"copy": 2, "forward": 2, "backward": 3}


class KernelTiming:
    """The samples of one kernel and what they give.

    Attributes
    ----------
    name : str
    samples : list of float
        Seconds per call, one per round.
    calls : int
        Calls per sample.
    error : str or None
        ``"Type: message"`` of the exception that stopped this kernel.
    """

    def __init__(self, name):
        self.name = name
        self.samples = []
        self.calls = 1
        self.error = None

    @property
    def best(self):
        """Fastest sample in seconds (None without samples)."""
        return min(self.samples) if self.samples else None

    @property
    def median(self):
        """Median sample in seconds (None without samples)."""
        return float(np.median(self.samples)) if self.samples else None

    @property
    def spread(self):
        """``(median - best) / best``, 0 for a single sample."""
        if not self.samples or self.best <= 0:
            return 0.0
        return (self.median - self.best) / self.best

    @property
    def unstable(self):
        return self.spread > UNSTABLE

    def as_dict(self):
        return {"best_s": self.best, "median_s": self.median, "spread": self.spread,
                "samples": len(self.samples), "calls": self.calls,
                "unstable": self.unstable, "error": self.error}

    def to_message(self):
        """The raw figures as a JSON-ready dict (what a peer process sends back)."""
        return {"samples": list(self.samples), "calls": self.calls, "error": self.error}

    @classmethod
    def from_message(cls, name, message):
        """The inverse of :meth:`to_message`."""
        timing = cls(name)
        timing.samples = [float(s) for s in message["samples"]]
        timing.calls = int(message["calls"])
        timing.error = message["error"]
        return timing


class Timings(dict):
    """``name -> KernelTiming`` of one group, with the load around it.

    Attributes
    ----------
    rounds : int
    load_before, load_after : float or None
        1-minute load average.
    seconds : float
        Wall time of the group.
    """

    rounds = 0
    load_before = None
    load_after = None
    seconds = 0.0

    def ratio(self, numerator, denominator, statistic="best"):
        """``numerator``'s time / ``denominator``'s, or None if either has none."""
        top = getattr(self[numerator], statistic) if numerator in self else None
        bottom = getattr(self[denominator], statistic) if denominator in self else None
        if top is None or not bottom:
            return None
        return top / bottom

    def warnings(self, label=""):
        """Lines for errors, unstable figures and a load above the core count."""
        notes = []
        prefix = f"{label}: " if label else ""
        for timing in self.values():
            if timing.error:
                notes.append(f"{prefix}{timing.name} failed: {timing.error}")
            elif timing.unstable:
                notes.append(f"{prefix}{timing.name} unstable: median {timing.spread:.0%} "
                             f"above best over {len(timing.samples)} rounds")
        note = load_warning(self.load_before, self.load_after)
        if note:
            notes.append(prefix + note)
        return notes

    def to_message(self):
        """Every kernel's samples and the group's facts as a JSON-ready dict."""
        return {"kernels": {name: t.to_message() for name, t in self.items()},
                "rounds": self.rounds, "load_before": self.load_before,
                "load_after": self.load_after, "seconds": self.seconds}

    @classmethod
    def from_message(cls, message):
        """The inverse of :meth:`to_message`."""
        result = cls((name, KernelTiming.from_message(name, kernel))
                     for name, kernel in message["kernels"].items())
        result.rounds = message["rounds"]
        result.load_before = message["load_before"]
        result.load_after = message["load_after"]
        result.seconds = message["seconds"]
        return result


def merged(*groups):
    """One :class:`Timings` holding the kernels of ``groups``, timed one after another.

    Used to put the groups of two processes (fastbn's, then PyTorch's peer)
    in one table: ``rounds`` is the most rounds of a group, the load the
    highest read before and after, ``seconds`` the sum.

    Parameters
    ----------
    *groups : Timings
        Their kernel names must differ.

    Returns
    -------
    Timings
    """
    result = Timings()
    for group in groups:
        clash = set(result) & set(group)
        if clash:
            raise ValueError(f"kernels timed twice: {sorted(clash)}")
        result.update(group)
        result.rounds = max(result.rounds, group.rounds)
        result.seconds += group.seconds
        for attribute in ("load_before", "load_after"):
            values = [v for v in (getattr(result, attribute), getattr(group, attribute))
                      if v is not None]
            setattr(result, attribute, max(values) if values else None)
    return result


def load_warning(before, after, cores=None):
    """A warning when the load average exceeded the core count, else None."""
    cores = cores or machine.cpu_count()
    load = max(before or 0.0, after or 0.0)
    if load <= cores:
        return None
    return (f"load average {load:.1f} above the {cores} cores: other processes took "
            "CPU time, figures may be slow (ratios within a round still hold)")


def same_start():
    """The options of :func:`interleaved` that start every sample alike: the
    other kernels' pools asleep (:data:`SETTLE_SECONDS`), then one untimed
    call of the kernel (``warm_up``), so that a sample times the kernel at
    its own steady speed, whatever ran before it. A suite passes them to
    both groups it compares, fastbn's and PyTorch's peer's."""
    return {"settle_seconds": SETTLE_SECONDS, "warm_up": True}


def copy_kernel(array):
    """``np.copyto`` of ``array`` into a filled buffer: the bandwidth reference.

    Returns
    -------
    callable
    """
    target = np.full(array.shape, 0, dtype=array.dtype)

    def copy():
        np.copyto(target, array)

    return copy


def fraction_of_copy_limit(kernel, seconds, copy_seconds, itemsize=1, copy_itemsize=None):
    """Limit time / kernel time; 1.0 means the kernel runs at copy speed.

    The limit is the kernel's compulsory bytes (``BYTES_PER_ELEMENT[kernel]
    * itemsize`` per element) at the bandwidth of a copy that moved ``2 *
    copy_itemsize`` bytes per element (default: the kernel's own item size).

    Parameters
    ----------
    kernel : {"forward", "backward"}
    seconds, copy_seconds : float
        Times of the kernel and of the copy of as many elements.
    itemsize, copy_itemsize : int, optional

    Returns
    -------
    float or None
        None when either time is missing.
    """
    if not seconds or copy_seconds is None:
        return None
    copy_itemsize = itemsize if copy_itemsize is None else copy_itemsize
    limit = (copy_seconds * BYTES_PER_ELEMENT[kernel] * itemsize
             / (BYTES_PER_ELEMENT["copy"] * copy_itemsize))
    return limit / seconds


def _describe_error(exc):
    lines = str(exc).strip().splitlines()
    message = lines[0][:160] if lines else ""
    return f"{type(exc).__name__}: {message}".rstrip(": ")


def interleaved(kernels, rounds=ROUNDS, *, copy_of=None, max_rounds=None,
                min_seconds=MIN_SECONDS, calls=None, budget_seconds=None,
                synchronize=None, barrier=None, settle_seconds=0.0, warm_up=False,
                clock=time.perf_counter):
    """Time ``kernels`` in interleaved rounds.

    Parameters
    ----------
    kernels : dict
        ``name -> callable`` with no arguments, in the order of the first round.
    rounds : int, optional
        Rounds to time; more, up to ``max_rounds`` (default ``2 * rounds``),
        while a figure is unstable.
    copy_of : ndarray, optional
        Adds the kernel :data:`COPY`, ``np.copyto`` of this array.
    min_seconds : float, optional
        A sample lasts at least this long (calls per sample from one
        untimed warm-up call).
    calls : int, optional
        Fixed calls per sample (the same on every MPI rank).
    budget_seconds : float, optional
        Stop after 3 rounds once the group has run this long.
    synchronize : callable, optional
        Called at the end of each sample, inside the timed interval.
    barrier : callable, optional
        Called before each sample, outside the timed interval.
    settle_seconds : float, optional
        Sleep this long before each sample, outside the timed interval (when
        there is more than one kernel): the threads of the previous sample's
        runtime (PyTorch's own OpenMP, fastbn's) stop spinning and leave the
        cores to the next kernel. :data:`SETTLE_SECONDS` is long enough for
        libgomp's default spin.
    warm_up : bool, optional
        Before each sample (after the settle, outside the timed interval),
        call the kernel once: its threads wake up and its data comes back
        into cache, whatever ran before it (see :func:`same_start`).
    clock : callable, optional
        Seconds (tests pass a fake one).

    Returns
    -------
    Timings
        A kernel that raised keeps its samples so far, has ``error`` set
        and is left out of later rounds.
    """
    kernels = dict(kernels)
    if copy_of is not None:
        kernels[COPY] = copy_kernel(copy_of)
    sync = synchronize or (lambda: None)
    result = Timings((name, KernelTiming(name)) for name in kernels)
    result.load_before = machine.load_average()
    max_rounds = max(rounds, max_rounds or 2 * rounds)
    started = clock()
    for name, function in kernels.items():   # warm-up, and calls per sample
        timing = result[name]
        try:
            if barrier:
                barrier()
            function()   # compiles, touches pages, starts thread pools
            sync()
            if barrier:
                barrier()
            start = clock()
            function()
            sync()
            once = clock() - start
        except Exception as exc:
            timing.error = _describe_error(exc)
            continue
        timing.calls = calls or (max(1, int(min_seconds / once)) if once > 0 else 1)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while result.rounds < max_rounds:
            live = [name for name in kernels if result[name].error is None]
            if not live:
                break
            first = result.rounds % len(live)
            for name in live[first:] + live[:first]:
                timing = result[name]
                if settle_seconds and len(live) > 1:
                    time.sleep(settle_seconds)
                if barrier:
                    barrier()
                try:
                    if warm_up:
                        kernels[name]()
                        sync()
                    start = clock()
                    for _ in range(timing.calls):
                        kernels[name]()
                    sync()
                    timing.samples.append((clock() - start) / timing.calls)
                except Exception as exc:
                    timing.error = _describe_error(exc)
            result.rounds += 1
            if barrier is not None:
                continue   # every rank must time the same rounds
            if (budget_seconds is not None and result.rounds >= min(3, rounds)
                    and clock() - started > budget_seconds):
                break
            if result.rounds >= rounds and not any(result[n].unstable for n in live):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    result.seconds = clock() - started
    result.load_after = machine.load_average()
    return result


def per_rank(kernels, comm, rounds=ROUNDS):
    """The MPI variant: every rank times the same rounds, one call per sample.

    Each sample starts after ``comm.Barrier()``; a round's figure of a kernel
    is the slowest rank's sample.

    Parameters
    ----------
    kernels : dict
        ``name -> callable``; each rank passes its own (e.g. its slice).
    comm : mpi4py.MPI.Comm
    rounds : int, optional

    Returns
    -------
    Timings
        The slowest rank's samples, the same on every rank; ``per_rank``
        attribute: each rank's own Timings as dicts.
    """
    own = interleaved(kernels, rounds, max_rounds=rounds, calls=1, barrier=comm.Barrier)
    gathered = comm.allgather({name: t.samples for name, t in own.items()})
    slowest = Timings((name, KernelTiming(name)) for name in own)
    for name, timing in slowest.items():
        timing.error = own[name].error
        counts = [len(rank[name]) for rank in gathered]
        timing.samples = [max(rank[name][i] for rank in gathered) for i in range(min(counts))]
    slowest.rounds = own.rounds
    slowest.load_before, slowest.load_after = own.load_before, own.load_after
    slowest.seconds = own.seconds
    slowest.per_rank = [{name: {"best_s": min(s) if s else None,
                                "median_s": float(np.median(s)) if s else None}
                         for name, s in rank.items()} for rank in gathered]
    return slowest
