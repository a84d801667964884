"""Program run under ``mpiexec`` by tests/test_distributed.py.

    mpiexec -n P python tests/mpi_worker.py parity|mismatch RESULT.json [BACKEND ...]

Every rank builds the same global batch from a fixed seed, takes its slice
and calls fastbn.distributed; rank 0 writes what was measured to RESULT.json
and the test asserts on it.

``parity``: for each backend, dtype, layout, split and mode, the largest
difference (scaled by the reference's largest magnitude) between the
synchronized results and single-process ``batchnorm_forward/backward`` on the
concatenated batch, over every rank, and whether the statistics, running
statistics and ``dgamma``/``dbeta`` are bitwise equal on every rank.

``mismatch``: for each scenario, the error each rank raised (type and
message), or None; after every scenario one good synchronized call checks
that no rank was left behind in a collective.
"""
import json
import sys

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import sync_batchnorm_backward, sync_batchnorm_forward

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()

LAYOUTS = {
    # name: (shape of one sample, channel axis)
    "nd": ((5,), 1),
    "nchw": ((3, 4, 5), 1),
    "nhwc": ((4, 5, 3), -1),
}


def split_sizes(split):
    """Samples per rank: 'unequal' (every rank non-empty, sizes differ) or
    'empty' (rank 1 holds no sample)."""
    if split == "unequal":
        return [1 + (3 * r + 4) % (SIZE + 2) for r in range(SIZE)]
    sizes = [2 + r for r in range(SIZE)]
    sizes[1] = 0
    return sizes


def scaled_diff(value, reference):
    value = np.asarray(value, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if value.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(reference))), 1e-300)
    return float(np.max(np.abs(value - reference)) / scale)


def same_on_every_rank(*arrays):
    blob = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    blobs = COMM.allgather(blob)
    return all(b == blobs[0] for b in blobs)


def parity_case(backend, dtype, layout, split, training):
    sample_shape, axis = LAYOUTS[layout]
    sizes = split_sizes(split)
    start = sum(sizes[:RANK])
    local = slice(start, start + sizes[RANK])
    rng = np.random.default_rng(1234)
    shape = (sum(sizes),) + sample_shape
    channels = shape[axis]
    channel_shape = [1] * len(shape)
    channel_shape[axis] = channels
    # Channels of different means and scales; a mean of 3 standard deviations
    # makes the centring matter.
    offset = rng.uniform(-3, 3, channels).reshape(channel_shape)
    spread = rng.uniform(0.5, 2, channels).reshape(channel_shape)
    x = (rng.standard_normal(shape) * spread + offset).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.uniform(-1, 1, channels).astype(dtype)
    running_mean0 = rng.uniform(-1, 1, channels).astype(dtype)
    running_var0 = rng.uniform(0.5, 2, channels).astype(dtype)

    ref_mean, ref_var = running_mean0.copy(), running_var0.copy()
    ref_out, ref_cache = fastbn.batchnorm_forward(
        x, gamma, beta, training=training, running_mean=ref_mean, running_var=ref_var,
        momentum=0.2, axis=axis, backend=backend)
    ref_dx, ref_dgamma, ref_dbeta = fastbn.batchnorm_backward(dout, ref_cache)

    run_mean, run_var = running_mean0.copy(), running_var0.copy()
    x_local = x[local].copy()
    out, cache = sync_batchnorm_forward(
        x_local, gamma, beta, comm=COMM, training=training, running_mean=run_mean,
        running_var=run_var, momentum=0.2, axis=axis, backend=backend)
    dx, dgamma, dbeta = sync_batchnorm_backward(dout[local].copy(), cache)

    local_diffs = {
        "out": scaled_diff(out, ref_out[local]),
        "dx": scaled_diff(dx, ref_dx[local]),
        "dgamma": scaled_diff(dgamma, ref_dgamma),
        "dbeta": scaled_diff(dbeta, ref_dbeta),
        "running_mean": scaled_diff(run_mean, ref_mean),
        "running_var": scaled_diff(run_var, ref_var),
    }
    dtypes_ok = (out.dtype == x.dtype and dx.dtype == x.dtype and dgamma.dtype == x.dtype
                 and dbeta.dtype == x.dtype and out.shape == x_local.shape
                 and dx.shape == x_local.shape)
    all_diffs = COMM.allgather(local_diffs)
    bitwise = same_on_every_rank(cache.mean, cache.invstd, run_mean, run_var, dgamma, dbeta)
    return {
        "backend": backend, "dtype": np.dtype(dtype).name, "layout": layout,
        "split": split, "sizes": sizes, "mode": "train" if training else "eval",
        "diffs": {key: max(d[key] for d in all_diffs) for key in local_diffs},
        "dtypes_ok": all(COMM.allgather(bool(dtypes_ok))),
        "bitwise": bitwise,
        # the running statistics moved (training) or stayed (evaluation)
        "running_changed": bool(np.any(run_mean != running_mean0)),
    }


def layer_case(backend, momentum):
    """SyncBatchNorm on the slices against BatchNorm on the whole batch:
    three training steps (forward, backward, a gradient step on gamma and
    beta), then one evaluation forward; float64, NCHW, unequal slices."""
    from fastbn.nn import BatchNorm, SyncBatchNorm

    sizes = split_sizes("unequal")
    start = sum(sizes[:RANK])
    local = slice(start, start + sizes[RANK])
    rng = np.random.default_rng(99)
    sync = SyncBatchNorm(3, momentum=momentum, dtype=np.float64, backend=backend, comm=COMM)
    single = BatchNorm(3, momentum=momentum, dtype=np.float64, backend=backend)
    diffs = {"out": 0.0, "dx": 0.0, "grad_gamma": 0.0, "grad_beta": 0.0, "eval_out": 0.0}
    for _ in range(3):
        x = rng.standard_normal((sum(sizes), 3, 2, 3)) * 2 + 1
        dout = rng.standard_normal(x.shape)
        ref_out = single.forward(x)
        ref_dx = single.backward(dout)
        out = sync.forward(x[local].copy())
        dx = sync.backward(dout[local].copy())
        for key, value, ref in (("out", out, ref_out[local]), ("dx", dx, ref_dx[local]),
                                ("grad_gamma", sync.grad_gamma, single.grad_gamma),
                                ("grad_beta", sync.grad_beta, single.grad_beta)):
            diffs[key] = max(diffs[key], scaled_diff(value, ref))
        for layer in (sync, single):
            layer.gamma -= 0.1 * layer.grad_gamma
            layer.beta -= 0.1 * layer.grad_beta
    x = rng.standard_normal((sum(sizes), 3, 2, 3))
    diffs["eval_out"] = scaled_diff(sync.eval().forward(x[local].copy()),
                                    single.eval().forward(x)[local])
    state, ref_state = sync.state_dict(), single.state_dict()
    state_diff = max(scaled_diff(state[key], ref_state[key]) for key in ref_state)
    all_diffs = COMM.allgather(diffs)
    return {
        "backend": backend, "momentum": momentum, "sizes": sizes,
        "diffs": {key: max(d[key] for d in all_diffs) for key in diffs},
        "state_diff": max(COMM.allgather(state_diff)),
        "same_keys": sorted(state) == sorted(ref_state),
        "num_batches_tracked": int(state["num_batches_tracked"]),
        "bitwise": same_on_every_rank(sync.gamma, sync.beta, sync.running_mean,
                                      sync.running_var),
    }


def layer_channel_mismatch():
    """A layer of 3 channels given 4 on the last rank: every rank raises."""
    from fastbn.nn import SyncBatchNorm

    layer = SyncBatchNorm(3, dtype=np.float64, comm=COMM)
    x = _data(channels=4 if RANK == SIZE - 1 else 3)
    try:
        layer.forward(x)
        outcome = None
    except Exception as exc:
        outcome = [type(exc).__name__, str(exc)]
    return COMM.allgather(outcome)


def run_parity(backends):
    results = []
    for backend in backends:
        for dtype in (np.float64, np.float32):
            for layout in LAYOUTS:
                for split in ("unequal", "empty"):
                    for training in (True, False):
                        results.append(parity_case(backend, dtype, layout, split, training))
    layers = [layer_case(backend, momentum) for backend in backends for momentum in (0.1, None)]
    return {"ranks": SIZE, "cases": results, "layers": layers}


# --------------------------------------------------------------------------
# Mismatch scenarios: the last rank differs from the others
# --------------------------------------------------------------------------

def _data(dtype=np.float64, channels=3, layout="nchw", n=4):
    rng = np.random.default_rng(RANK)
    if layout == "nchw":
        return rng.standard_normal((n, channels, 2, 2)).astype(dtype)
    return rng.standard_normal((n, 2, 2, channels)).astype(dtype)


def _forward(**changes):
    args = {"x": _data(), "axis": 1, "training": True, "eps": 1e-5}
    if RANK == SIZE - 1:
        args.update(changes)
    x = args.pop("x")
    return sync_batchnorm_forward(x, comm=COMM, running_mean=np.zeros(x.shape[args["axis"]]),
                                  running_var=np.ones(x.shape[args["axis"]]), **args)


def _backward(method_last="simplified", dout_last=None):
    x = _data()
    _, cache = sync_batchnorm_forward(x, comm=COMM)
    dout = np.ones_like(x)
    method = "simplified"
    if RANK == SIZE - 1:
        method = method_last
        if dout_last is not None:
            dout = dout_last
    return sync_batchnorm_backward(dout, cache, method=method)


def _too_few():
    x = np.ones((1 if RANK == 0 else 0, 3))
    return sync_batchnorm_forward(x, comm=COMM)


SCENARIOS = {
    "channels": lambda: _forward(x=_data(channels=4)),
    "dtype": lambda: _forward(x=_data(dtype=np.float32)),
    "axis": lambda: _forward(x=_data(layout="nhwc"), axis=-1),
    "ndim": lambda: _forward(x=_data()[:, :, 0]),
    "mode": lambda: _forward(training=False),
    "eps": lambda: _forward(eps=1e-3),
    "eps_zero_training": lambda: _forward(eps=0.0),
    "integer_dtype": lambda: _forward(x=np.ones((4, 3, 2, 2), dtype=np.int64)),
    "gamma_shape": lambda: _forward(gamma=np.ones(5)),
    "backend_name": lambda: _forward(backend="no-such-backend"),
    "method_staged": lambda: _backward(method_last="staged"),
    "method_unknown": lambda: _backward(method_last="fast"),
    "dout_shape": lambda: _backward(dout_last=np.ones((4, 3, 2, 3))),
    "too_few_values": _too_few,
    "layer_channels": "layer",
}


def run_mismatch():
    results = {}
    for name, scenario in SCENARIOS.items():
        if scenario == "layer":
            outcomes = layer_channel_mismatch()
        else:
            try:
                scenario()
                outcome = None
            except Exception as exc:
                outcome = [type(exc).__name__, str(exc)]
            outcomes = COMM.allgather(outcome)
        # Every rank must still be in step: a good call completes and agrees.
        x = _data()
        out, cache = sync_batchnorm_forward(x, comm=COMM)
        in_step = same_on_every_rank(cache.mean, cache.invstd)
        results[name] = {"outcomes": outcomes, "in_step_after": in_step}
    return {"ranks": SIZE, "scenarios": results}


def main():
    mode, path = sys.argv[1], sys.argv[2]
    backends = sys.argv[3:] or [b for b in fastbn.available_backends() if b != "cuda"]
    result = run_parity(backends) if mode == "parity" else run_mismatch()
    if RANK == 0:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
