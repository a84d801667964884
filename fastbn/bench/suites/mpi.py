"""Synchronized batch norm over MPI (``--suite mpi``): bytes and time per step.

A fixed global batch (default ``64x64x32x32`` float32) is split over 1, 2
and 4 ranks (``np.array_split`` on the first axis). One step is
``sync_batchnorm_forward`` (training, running statistics updated) then
``sync_batchnorm_backward``. For each rank count the suite starts
``mpiexec -n P`` on :func:`worker` (one thread per rank); the communicator
is wrapped so that every collective records the payload handed to MPI and
the time spent in it. Steps are timed with
:func:`fastbn.bench.timing.per_rank`: after a barrier, the slowest rank's
time, medians of the rounds. With one rank the single-process
``batchnorm_forward`` + ``batchnorm_backward`` on the whole batch is timed
in the same rounds: the cost without MPI.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..kernels import format_shape
from ..report import Report, cell
from . import progress

SHAPE = (64, 64, 32, 32)
RANKS = [1, 2, 4]


def run(options):
    """Start one ``mpiexec`` per rank count and tabulate; see the module docstring.

    Returns
    -------
    fastbn.bench.report.Report

    Raises
    ------
    RuntimeError
        When mpiexec or mpi4py is missing, or a run fails.
    """
    mpiexec = shutil.which("mpiexec") or shutil.which(os.path.join(
        os.path.dirname(sys.executable), "mpiexec"))
    if mpiexec is None:
        raise RuntimeError("the mpi suite needs mpiexec and mpi4py: pip install 'fastbn[mpi]'")
    shape = options.shapes[0] if options.shapes else options.pick(SHAPE, SHAPE, (8, 4, 4, 4))
    dtype = (options.dtypes or ["float32"])[0]
    ranks = options.threads or options.pick(RANKS, RANKS[:2], RANKS[:2])
    rounds = options.rounds or options.pick(50, 20, 3)
    backend = (options.backends or [None])[0]
    report = Report("Synchronized batch norm over MPI: bytes and time per step",
                    options.command)
    results = []
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as folder:
        for size in ranks:
            progress(options, f"mpi {size} ranks")
            path = os.path.join(folder, f"{size}.json")
            task = json.dumps({"shape": shape, "dtype": dtype, "rounds": rounds,
                               "backend": backend, "path": path})
            done = subprocess.run(
                [mpiexec, "-n", str(size), sys.executable, "-c",
                 "import sys; from fastbn.bench.suites import mpi; mpi.worker(sys.argv[1])",
                 task], env=env, capture_output=True, text=True)
            if done.returncode != 0 or not os.path.exists(path):
                raise RuntimeError(f"mpiexec -n {size} failed:\n{done.stderr[-2000:]}")
            with open(path) as f:
                results.append(json.load(f))
    first = results[0]
    report.add_fact(f"global batch {format_shape(shape)} {dtype}, backend {first['backend']}, "
                    "1 thread per rank (`NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1`); ranks "
                    f"beyond the {report.machine['cores']} cores are oversubscribed; "
                    f"{rounds} rounds per rank count")

    def traffic(records):
        return " + ".join(f"{r['sent']} / {r['received']}" for r in records)

    report.add_table("Bytes communicated (payload handed to MPI, per rank, per call)",
                     ["ranks", "forward: check + Allgather (count, mean, M2)",
                      "backward: check + Allreduce (sum_dy, sum_dy_xhat)"],
                     [[str(r["ranks"]), traffic(r["forward"]), traffic(r["backward"])]
                      for r in results],
                     "Sent / received bytes per collective; the first collective of each call "
                     "is the agreement check (a pickled tuple), the second the statistics.")
    rows = []
    for r in results:
        rows.append([str(r["ranks"]), str(r["local_batch"]), cell(r["step_ms"]),
                     cell(r["step_best_ms"]), cell(r["comm_ms"]), cell(r.get("single_ms"))])
    report.add_table("Time per step (forward + backward)",
                     ["ranks", "samples per rank", "step ms (median)", "step ms (best)",
                      "in collectives ms (median, incl. waiting)", "no MPI, one process, ms"],
                     rows, "Each sample starts after a barrier and is the slowest rank's time.")
    report.add_warnings(w for r in results for w in r["warnings"])
    report.data["ranks"] = results
    return report


def worker(task):
    """One rank's part, under mpiexec: time the steps, rank 0 writes the JSON."""
    from mpi4py import MPI

    import fastbn
    from fastbn.distributed import sync_batchnorm_backward, sync_batchnorm_forward

    from .. import timing

    task = json.loads(task)
    world = MPI.COMM_WORLD
    comm = _counting(MPI)(world)
    rank, size = world.Get_rank(), world.Get_size()
    shape, dtype = tuple(task["shape"]), np.dtype(task["dtype"])
    backend = task["backend"] or fastbn.available_backends()[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    x_local = np.ascontiguousarray(np.array_split(x, size)[rank])
    dout_local = np.ascontiguousarray(np.array_split(dout, size)[rank])
    channels = shape[1]
    gamma, beta = np.ones(channels, dtype), np.zeros(channels, dtype)
    running_mean, running_var = np.zeros(channels, dtype), np.ones(channels, dtype)

    def step():
        _, cache = sync_batchnorm_forward(x_local, gamma, beta, comm=comm,
                                          running_mean=running_mean, running_var=running_var,
                                          backend=backend)
        sync_batchnorm_backward(dout_local, cache)

    def single_step():
        _, cache = fastbn.batchnorm_forward(x, gamma, beta, running_mean=running_mean,
                                            running_var=running_var, backend=backend)
        fastbn.batchnorm_backward(dout, cache)

    step()
    comm.records.clear()
    step()
    one_step = list(comm.records)
    kernels = {"step": step}
    if size == 1:
        kernels["single"] = single_step
    comm.records.clear()
    got = timing.per_rank(kernels, world, task["rounds"])
    per_step = len(one_step)
    comm_seconds = [sum(r["seconds"] for r in comm.records[i:i + per_step])
                    for i in range(0, len(comm.records) - per_step + 1, per_step)]
    comm_slowest = world.allreduce(float(np.median(comm_seconds)), op=MPI.MAX)
    if rank == 0:
        result = {
            "ranks": size, "backend": backend,
            "local_batch": len(np.array_split(x, size)[0]),
            "forward": one_step[:2], "backward": one_step[2:],
            "step_ms": got["step"].median * 1e3, "step_best_ms": got["step"].best * 1e3,
            "comm_ms": comm_slowest * 1e3,
            "single_ms": got["single"].median * 1e3 if "single" in got else None,
            "warnings": got.warnings(f"{size} ranks"),
        }
        with open(task["path"], "w") as f:
            json.dump(result, f)


def _counting(MPI):
    """An ``Intracomm`` subclass that records each collective's payload and time."""

    class CountingComm(MPI.Intracomm):
        def __new__(cls, comm):
            self = super().__new__(cls, comm)
            self.records = []
            return self

        def _timed(self, name, sent, call):
            start = time.perf_counter()
            result, received = call()
            self.records.append({"op": name, "sent": sent, "received": received,
                                 "seconds": time.perf_counter() - start})
            return result

        def allgather(self, obj):
            def call():
                result = super(CountingComm, self).allgather(obj)
                return result, sum(len(pickle.dumps(item)) for item in result)
            return self._timed("allgather", len(pickle.dumps(obj)), call)

        def Allgather(self, sendbuf, recvbuf):
            return self._timed("Allgather", sendbuf.nbytes, lambda: (
                super(CountingComm, self).Allgather(sendbuf, recvbuf), recvbuf.nbytes))

        def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
            return self._timed("Allreduce", sendbuf.nbytes, lambda: (
                super(CountingComm, self).Allreduce(sendbuf, recvbuf, op=op), recvbuf.nbytes))

    return CountingComm
