"""Program run in a subprocess by tests/test_fork.py.

    python tests/fork_worker.py BACKEND SCENARIO [START_METHOD]

The parent process uses fastbn as SCENARIO says, starts worker processes
with START_METHOD (``fork``, ``forkserver`` or ``spawn``; default ``fork``),
and each worker runs the same training forward and simplified backward on
the same input. The parent checks that every worker's results are bit for
bit its own, computed before the workers started and again after they
ended, then prints ``ok``. A failed check exits non-zero; a hang is caught
by the test's timeout.

Scenarios:

``process``
    the parent runs the kernels, then starts one ``multiprocessing.Process``;
``pool``
    the parent runs the kernels, then maps over a ``Pool(2)``;
``imported``
    the parent only imports fastbn before starting the ``Process``;
``threads``
    the parent runs the kernels from two Python threads at once first, and
    the worker runs them in a thread of its own;
``grandchild``
    a forked worker forks a worker of its own, which runs the kernels;
``dataloader``
    a ``torch.utils.data.DataLoader`` with two workers whose dataset calls
    fastbn.
"""
import multiprocessing
import sys
import threading

import numpy as np

import fastbn

# (64, 32, 16, 16) float32: large enough for the parallel kernels.
SHAPE = (64, 32, 16, 16)


def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, SHAPE[1]).astype(np.float32)
    beta = rng.standard_normal(SHAPE[1]).astype(np.float32)
    return x, dy, gamma, beta


def results(backend):
    """Training forward and simplified backward: (out, mean, invstd, dx, dgamma, dbeta)."""
    x, dy, gamma, beta = inputs()
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dy, cache)
    return [np.asarray(a) for a in (out, cache.mean, cache.invstd, dx, dgamma, dbeta)]


def check_same(got, expected, who):
    for index, (a, b) in enumerate(zip(got, expected)):
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            sys.exit(f"{who}: result {index} differs from the parent's")


def child_results(backend, _=None):
    return results(backend)


def child_to_queue(backend, queue):
    queue.put(results(backend))


def child_thread_to_queue(backend, queue):
    got = []
    thread = threading.Thread(target=lambda: got.append(results(backend)))
    thread.start()
    thread.join()
    queue.put(got[0])


def grandchild_to_queue(backend, queue):
    inner = multiprocessing.get_context("fork").Queue()
    worker = multiprocessing.get_context("fork").Process(target=child_to_queue,
                                                          args=(backend, inner))
    worker.start()
    got = inner.get()
    worker.join()
    queue.put(got)


def run_process(context, backend, target):
    queue = context.Queue()
    worker = context.Process(target=target, args=(backend, queue))
    worker.start()
    got = queue.get()
    worker.join()
    if worker.exitcode != 0:
        sys.exit(f"the worker exited with {worker.exitcode}")
    return [got]


def run_pool(context, backend):
    from functools import partial
    with context.Pool(2) as pool:
        return pool.map(partial(child_results, backend), range(4))


class BatchNormDataset:
    """Each item: fastbn's results on the same input (numpy arrays)."""

    def __init__(self, backend):
        self.backend = backend

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return results(self.backend)


def run_dataloader(context, backend):
    import torch.utils.data
    loader = torch.utils.data.DataLoader(BatchNormDataset(backend), batch_size=None,
                                         num_workers=2, multiprocessing_context=context)
    return [[np.asarray(a) for a in item] for item in loader]


def run_in_threads(backend):
    failures = []

    def work():
        try:
            for _ in range(3):
                results(backend)
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def main():
    backend, scenario = sys.argv[1], sys.argv[2]
    method = sys.argv[3] if len(sys.argv) > 3 else "fork"
    context = multiprocessing.get_context(method)
    before = None
    if scenario != "imported":
        before = results(backend)
    if scenario == "threads":
        run_in_threads(backend)
    if scenario in ("process", "imported"):
        got = run_process(context, backend, child_to_queue)
    elif scenario == "threads":
        got = run_process(context, backend, child_thread_to_queue)
    elif scenario == "grandchild":
        got = run_process(context, backend, grandchild_to_queue)
    elif scenario == "pool":
        got = run_pool(context, backend)
    elif scenario == "dataloader":
        got = run_dataloader(context, backend)
    else:
        sys.exit(f"unknown scenario {scenario!r}")
    after = results(backend)
    if before is not None:
        check_same(after, before, "the parent after the workers")
    for index, item in enumerate(got):
        check_same(item, after, f"worker {index}")
    layer = fastbn.backend_info()[backend].get("threading_layer") or "-"
    print("ok", backend, scenario, method, len(got), layer)


if __name__ == "__main__":
    main()
