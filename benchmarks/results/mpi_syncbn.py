"""Cost of synchronized batch norm over MPI: bytes communicated and time per step.

Run under mpiexec, once per number of ranks, at a fixed global batch:

    for round in 1 2 3; do for P in 1 2 4; do
        NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 mpiexec -n $P \\
            python benchmarks/results/mpi_syncbn.py --shape 64x64x32x32 \\
            --json syncbn_${P}_$round.json
    done; done
    python benchmarks/results/mpi_syncbn.py --summarize syncbn_*.json

Each rank takes its slice of the global batch (``np.array_split`` on the
first axis). One step is ``sync_batchnorm_forward`` (training, running
statistics updated) then ``sync_batchnorm_backward``. The communicator is
wrapped so that every collective records the payload it hands to MPI (bytes
sent by this rank, bytes received) and the time spent in it. A step's time
is the slowest rank's, median over ``--repeats`` steps after ``--warmup``,
each step started after a barrier. With one rank the script also times the
single-process ``batchnorm_forward``/``batchnorm_backward`` on the whole
batch, the cost without MPI.
"""
import argparse
import json
import pickle
import time

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import sync_batchnorm_backward, sync_batchnorm_forward


class CountingComm(MPI.Intracomm):
    """``COMM_WORLD`` with each collective's payload and time recorded."""

    def __new__(cls, comm):
        self = super().__new__(cls, comm)
        self.records = []
        return self

    def _record(self, name, sent, received, seconds):
        self.records.append({"op": name, "sent": sent, "received": received,
                             "seconds": seconds})

    def allgather(self, obj):
        start = time.perf_counter()
        result = super().allgather(obj)
        seconds = time.perf_counter() - start
        self._record("allgather (metadata)", len(pickle.dumps(obj)),
                     sum(len(pickle.dumps(item)) for item in result), seconds)
        return result

    def Allgather(self, sendbuf, recvbuf):
        start = time.perf_counter()
        super().Allgather(sendbuf, recvbuf)
        self._record("Allgather (count, mean, M2)", sendbuf.nbytes, recvbuf.nbytes,
                     time.perf_counter() - start)

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        start = time.perf_counter()
        super().Allreduce(sendbuf, recvbuf, op=op)
        self._record("Allreduce (sum_dy, sum_dy_xhat)", sendbuf.nbytes, recvbuf.nbytes,
                     time.perf_counter() - start)


def summarize(paths):
    """A Markdown table of result files: one row per rank count, the median
    (and range) over the files of each rank count's median step time."""
    runs = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        runs.setdefault(result["ranks"], []).append(result)
    first = next(iter(runs.values()))[0]
    print(f"global batch {'x'.join(map(str, first['shape']))} {first['dtype']}, "
          f"backend {first['backend']}, {first['threads']} thread(s) per rank\n")
    print("| ranks | samples per rank | step (forward + backward), ms | in collectives "
          "(incl. waiting), ms | forward: sent / received per rank, bytes | "
          "backward: sent / received per rank, bytes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ranks in sorted(runs):
        results = runs[ranks]
        steps = [r["step_ms_median"] for r in results]
        comms = [r["comm_ms_median"] for r in results]
        r = results[0]

        def traffic(records):
            return " + ".join(f"{c['sent']} / {c['received']}" for c in records)
        print(f"| {ranks} | {r['local_batch_sizes'][0]} | {np.median(steps):.2f} "
              f"({min(steps):.2f}-{max(steps):.2f}) | {np.median(comms):.2f} | "
              f"{traffic(r['forward_collectives'])} | {traffic(r['backward_collectives'])} |")
    singles = [r["single_process_step_ms_median"] for r in runs.get(1, [])]
    if singles:
        print(f"\nsingle process, batchnorm_forward + batchnorm_backward on the whole "
              f"batch (no MPI): {np.median(singles):.2f} ms "
              f"({min(singles):.2f}-{max(singles):.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="print a Markdown table of result files and exit")
    parser.add_argument("--shape", default="64x64x32x32", help="global batch, e.g. 64x64x32x32")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None, help="write the result here (rank 0)")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return

    world = MPI.COMM_WORLD
    comm = CountingComm(world)
    rank, size = comm.Get_rank(), comm.Get_size()
    shape = tuple(int(s) for s in args.shape.split("x"))
    dtype = np.dtype(args.dtype)
    backend = args.backend or fastbn.available_backends()[0]
    channels = shape[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    x_local = np.ascontiguousarray(np.array_split(x, size)[rank])
    dout_local = np.ascontiguousarray(np.array_split(dout, size)[rank])
    gamma, beta = np.ones(channels, dtype), np.zeros(channels, dtype)
    running_mean, running_var = np.zeros(channels, dtype), np.ones(channels, dtype)

    def step():
        out, cache = sync_batchnorm_forward(x_local, gamma, beta, comm=comm,
                                            running_mean=running_mean,
                                            running_var=running_var, backend=backend)
        sync_batchnorm_backward(dout_local, cache)

    def timed(fn, n):
        times = []
        for _ in range(n):
            world.Barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times

    for _ in range(args.warmup):
        step()
    # Bytes of one step: the records of the last warm-up step.
    comm.records.clear()
    step()
    one_step = list(comm.records)
    comm.records.clear()
    step_times = np.array(timed(step, args.repeats))
    comm_times = np.array([sum(r["seconds"] for r in comm.records[i:i + len(one_step)])
                           for i in range(0, len(comm.records), len(one_step))])
    # The slowest rank's time per step, then the median over steps.
    step_slowest = np.empty_like(step_times)
    world.Allreduce(step_times, step_slowest, op=MPI.MAX)
    comm_slowest = np.empty_like(comm_times)
    world.Allreduce(comm_times, comm_slowest, op=MPI.MAX)

    single = None
    if size == 1:
        def single_step():
            out, cache = fastbn.batchnorm_forward(x, gamma, beta, running_mean=running_mean,
                                                  running_var=running_var, backend=backend)
            fastbn.batchnorm_backward(dout, cache)
        for _ in range(args.warmup):
            single_step()
        single = float(np.median(timed(single_step, args.repeats)))

    if rank == 0:
        forward = [r for r in one_step[:2]]
        backward = [r for r in one_step[2:]]
        result = {
            "ranks": size, "shape": list(shape), "dtype": dtype.name, "backend": backend,
            "threads": fastbn.backend_info()[backend].get("threads"),
            "local_batch_sizes": [len(part) for part in np.array_split(x, size)],
            "forward_collectives": forward, "backward_collectives": backward,
            "step_ms_median": 1e3 * float(np.median(step_slowest)),
            "comm_ms_median": 1e3 * float(np.median(comm_slowest)),
            "single_process_step_ms_median": None if single is None else 1e3 * single,
        }
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
