"""PyTorch's kernels, timed in a process of their own (the *peer*).

Two OpenMP runtimes in one process (PyTorch's bundled libgomp and the one
fastbn's compiled kernels use) leave threads spinning after their parallel
regions and take the cores from the next kernel of a round, so PyTorch's
figures came out slower than PyTorch alone. The suites that compare with
PyTorch therefore never import it: they time fastbn's kernels of a group in
their own process, then ask the peer, ``python -m fastbn.bench.peer``, to time
PyTorch's kernels of the same shape and dtype with the same timing core
(:func:`fastbn.bench.timing.interleaved`), the same rounds and the same
thread count, and merge the two groups' samples into one table. The peer
never runs a fastbn kernel; by default each group gets a fresh one, so that
PyTorch's figure is that of its op timed alone in a fresh process.

Before it times a request, the peer brings glibc's malloc to the state of
a long-lived training process (:func:`steady_heap`). Without that, each of
PyTorch's new outputs of a few MiB could land on pages the heap had just
given back to the system, and its figures moved by up to 2.5x with the
page faults that the heap's history happened to leave.

Protocol: one JSON object per line. The peer first writes ``{"ready": true,
"torch": version}`` (or ``{"error": ...}``); then, for each request line
(:meth:`Peer.time` writes them), it writes one answer line; it exits at the
end of its input.
"""
import ctypes
import json
import os
import site
import subprocess
import sys
import time

from . import timing
from .kernels import DtypeUnavailable, Kernels, make_data, why_unsupported

METHOD = "PyTorch timed in its own process, alternating with fastbn's rounds"
KINDS = ("forward", "simplified", "copy")

# glibc's mallopt parameters, and the largest value its adaptive mmap
# threshold reaches on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_ADAPTIVE_THRESHOLD = 32 << 20
# The heap touched before a request is timed, in arrays of its shape: room
# for each output PyTorch allocates while the previous one is still held,
# and for the holes they leave (an aligned block does not fit the hole of
# one of its size). With 6, the backward at (32, 64, 56, 56) float64 still
# grew the heap into fresh pages every few calls; with 12, never. At least
# HEAP_MIN_BYTES, at most a quarter of the physical memory and half of what
# is free.
HEAP_ARRAYS = 12
HEAP_MIN_BYTES = 32 << 20


def glibc():
    """This process's C library through ctypes when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def steady_heap(pool_bytes):
    """Bring glibc's malloc to the steady state of a long-lived process.

    PyTorch allocates each output afresh. In a fresh process that times one
    op, glibc keeps its 128 KiB starting thresholds, gives freed blocks back
    to the system and grows its heap into untouched pages, so that a new
    output of a few MiB costs a page fault per 4 KiB, more or less often as
    the heap's history goes (on an AMD EPYC, PyTorch's backward at (256,
    4096) float32 took 0.46-1.81 ms in such processes, 0.41-0.78 ms on a
    steady heap). In a training process, the thresholds have adapted to its
    largest blocks and earlier steps have touched the pages its heap keeps.
    That state is set up here at once: the heap is never trimmed, blocks up
    to 32 MiB come from it (larger ones too while its free top has room),
    and ``pool_bytes`` of its top are touched and freed before any timing.

    Parameters
    ----------
    pool_bytes : int
        Heap to touch (at most a quarter of the physical memory and half of
        the free memory).

    Returns
    -------
    str
        What was done, for the page.
    """
    libc = glibc()
    if libc is None:
        return "malloc as the process starts (the C library is not glibc)"
    version = libc.gnu_get_libc_version
    version.restype = ctypes.c_char_p
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_ADAPTIVE_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, -1)     # -1: never trim
    page = os.sysconf("SC_PAGE_SIZE")
    pool_bytes = min(pool_bytes, os.sysconf("SC_PHYS_PAGES") * page // 4,
                     os.sysconf("SC_AVPHYS_PAGES") * page // 2)
    # Blocks under the threshold, so that they come from the heap's top.
    block = _LARGEST_ADAPTIVE_THRESHOLD // 2
    pool = [libc.malloc(block) for _ in range(-(-pool_bytes // block))]
    for address in pool:
        if address:
            ctypes.memset(address, 0, block)
    for address in pool:
        libc.free(address)
    return (f"glibc {version().decode()} malloc as in a long-lived process (a heap "
            f"never trimmed, {HEAP_ARRAYS} arrays of it touched before timing, as memory "
            "allows)")


class PeerError(RuntimeError):
    """The peer process could not start or answer."""


class Peer:
    """A peer process for PyTorch's kernels, started on a request.

    Use it as a context manager (or call :meth:`close`), so that the process
    ends with the suite.

    Parameters
    ----------
    threads : int, optional
        ``torch.set_num_threads`` in the peer (None: PyTorch's default).
    fresh : bool, optional
        A new process for each request (the default): PyTorch's figures are
        then those of the op timed alone in a fresh process. Its allocator
        otherwise keeps the heap of the earlier shapes, which moves its
        timings (either way) by up to 2x on this page's shapes.

    Attributes
    ----------
    torch_version : str or None
        ``torch.__version__`` in the peer, once started.
    heap : str or None
        What the peer did to its malloc (:func:`steady_heap`), once it
        answered.
    threads_used : int or None
        ``torch.get_num_threads()`` at the latest request.
    """

    def __init__(self, threads=None, fresh=True):
        self.threads = threads
        self.fresh = fresh
        self.torch_version = None
        self.heap = None
        self.threads_used = None
        self._process = None
        self._failure = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self):
        """Start the process (if not yet) and read its greeting.

        Raises
        ------
        PeerError
            When it cannot start or PyTorch cannot be imported there.
        """
        if self._failure:
            raise PeerError(self._failure)
        if self._process is not None:
            return
        # The peer imports the same fastbn as this process: from a source tree
        # or another folder, that folder goes first on its path (an installed
        # fastbn is found without it).
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        env = dict(os.environ)
        if package_parent not in site.getsitepackages() + [site.getusersitepackages()]:
            env["PYTHONPATH"] = os.pathsep.join(
                [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._process = subprocess.Popen(
            [sys.executable, "-m", "fastbn.bench.peer"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        greeting = self._read()
        if "error" in greeting:
            self._fail(f"the PyTorch peer process cannot start: {greeting['error']}")
        self.torch_version = greeting["torch"]

    @property
    def method(self):
        """How PyTorch is timed, for the page: :data:`METHOD` and the heap."""
        return f"{METHOD}, {self.heap or 'malloc as it starts'}"

    def _read(self):
        """The next message; a peer that ended fails for good."""
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            self._fail(f"the PyTorch peer process exited (status {code})")
        return json.loads(line)

    def _fail(self, reason):
        self._failure = reason
        self.close()
        raise PeerError(reason)

    def time(self, shape, kernels, rounds=timing.ROUNDS, **options):
        """Time PyTorch's ``kernels`` on one shape in the peer.

        Parameters
        ----------
        shape : tuple of int
        kernels : dict
            ``name -> {"kind": "forward" | "simplified" | "copy", "dtype":
            str, "activation": None | "relu"}``; the data is
            :func:`fastbn.bench.kernels.make_data` ``(shape, dtype, seed=0)``,
            the same as in the suites; ``"copy"`` is ``np.copyto`` of ``x``.
        rounds : int, optional
        **options
            ``min_seconds``, ``max_rounds``, ``budget_seconds``,
            ``settle_seconds``, ``warm_up``, passed on to
            :func:`fastbn.bench.timing.interleaved` (a suite passes
            :func:`fastbn.bench.timing.same_start` to both groups).

        Returns
        -------
        timings : fastbn.bench.timing.Timings
            The kernels PyTorch ran.
        skipped : dict
            ``name -> reason`` for the kernels it cannot run (every kernel,
            with the reason, when the peer failed).
        """
        request = {"shape": list(shape), "kernels": kernels, "rounds": rounds,
                   "threads": self.threads, "options": options}
        try:
            self.start()
            # Let this process's OpenMP threads stop spinning before PyTorch's
            # group, and the peer's before whatever runs next here.
            time.sleep(timing.SETTLE_SECONDS)
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            answer = self._read()
            if self.fresh:
                self.close()
            time.sleep(timing.SETTLE_SECONDS)
        except (PeerError, OSError, ValueError) as exc:
            answer = {"error": str(exc) if isinstance(exc, PeerError) else
                      f"the PyTorch peer: {type(exc).__name__}: {exc}"}
        if "error" in answer:    # this request failed; the peer may serve the next
            return timing.Timings(), {name: answer["error"] for name in kernels}
        self.threads_used = answer["threads"]
        self.heap = answer.get("heap")
        return timing.Timings.from_message(answer["timings"]), answer["skipped"]

    def close(self):
        """End the process (its input closed: it exits)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.close()
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        finally:
            process.stdout.close()


def answer(request):
    """Time one request's kernels here (in the peer); the answer as a dict."""
    import torch

    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    shape = tuple(request["shape"])
    cases, data, kernels, skipped = {}, {}, {}, {}
    for name, spec in request["kernels"].items():
        kind, dtype, activation = spec["kind"], spec["dtype"], spec.get("activation")
        if kind not in KINDS:
            skipped[name] = f"ValueError: unknown kind {kind!r}"
            continue
        try:
            if dtype not in data:
                data[dtype] = make_data(shape, dtype, seed=0)
        except DtypeUnavailable as exc:
            skipped[name] = str(exc)
            continue
        if kind == "copy":
            kernels[name] = timing.copy_kernel(data[dtype]["x"])
            continue
        reason = why_unsupported("torch", dtype, activation)
        if reason:
            skipped[name] = reason
            continue
        key = (dtype, activation)
        if key not in cases:
            cases[key] = Kernels("torch", data[dtype], activation=activation)
        kernels[name] = getattr(cases[key], kind)
    largest = max((array.nbytes for arrays in data.values() for array in arrays.values()),
                  default=0)
    heap = steady_heap(max(HEAP_MIN_BYTES, HEAP_ARRAYS * largest))
    got = timing.interleaved(kernels, request["rounds"], **request.get("options", {}))
    return {"timings": got.to_message(), "skipped": skipped,
            "threads": int(torch.get_num_threads()), "heap": heap}


def main():
    """Serve requests from stdin, one JSON line each, until its end."""
    # Answers go to the original stdout; anything else printed goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        import torch
    except ImportError as exc:
        replies.write(json.dumps({"error": f"ImportError: {exc}"}) + "\n")
        return 1
    replies.write(json.dumps({"ready": True, "torch": torch.__version__}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            message = answer(json.loads(line))
        except Exception as exc:   # said to the suite, which names it on the page
            message = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(message) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
