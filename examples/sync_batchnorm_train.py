"""Data-parallel training with synchronized batch norm over MPI.

    mpiexec -n 2 python examples/sync_batchnorm_train.py
    python examples/sync_batchnorm_train.py            # one process, the same losses

The net is ``affine - SyncBatchNorm - ReLU - affine - softmax`` on a
synthetic classification problem (Gaussian clusters; no download). Every
step draws a global batch (the same on every rank, from a fixed seed) and
splits it across the ranks, unequally when the batch does not divide.
Each rank runs the net on its slice:

* ``SyncBatchNorm`` normalizes with the statistics of the whole global batch
  and returns ``grad_gamma``/``grad_beta`` summed over it;
* the loss is the mean over the global batch, so each rank's gradient of
  its own part is a share of the global gradient, and one ``Allreduce``
  sums the weight gradients.

Every rank then takes the same SGD step, so the parameters stay identical,
and the losses equal those of one process on the whole batch (up to the
order of floating-point sums). ``--json PATH`` writes the losses (rank 0).
"""
import argparse
import json

import numpy as np
from mpi4py import MPI

from fastbn.nn import SyncBatchNorm


def make_data(n_samples, n_features, n_classes, seed):
    """Gaussian clusters, one per class, in ``n_features`` dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.5, (n_classes, n_features))
    y = rng.integers(0, n_classes, n_samples)
    X = centres[y] + rng.normal(0, 1.0, (n_samples, n_features))
    return X, y


def softmax_loss_sum(scores, y):
    """Sum of the cross-entropy over the rows of ``scores``, and the softmax."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(y)), y].sum(), np.exp(log_probs)


def main():
    parser = argparse.ArgumentParser(description="data-parallel training with SyncBatchNorm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100, help="global batch size")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dtype = np.dtype(args.dtype)
    X, y = make_data(2000, 20, 5, seed=0)
    X = X.astype(dtype)

    # The same initial parameters on every rank (same seed).
    rng = np.random.default_rng(1)
    W1 = (rng.standard_normal((20, args.hidden)) * 0.1).astype(dtype)
    W2 = (rng.standard_normal((args.hidden, 5)) * 0.1).astype(dtype)
    b2 = np.zeros(5, dtype)
    bn = SyncBatchNorm(args.hidden, dtype=dtype, backend=args.backend, comm=comm)
    weights = [W1, W2, b2]
    velocity = [np.zeros_like(w) for w in weights] + [np.zeros_like(bn.gamma),
                                                       np.zeros_like(bn.beta)]

    batches = np.random.default_rng(2)
    losses = []
    for step in range(args.steps):
        batch = batches.choice(len(X), args.batch, replace=False)
        mine = np.array_split(batch, size)[rank]       # this rank's slice (may be empty)
        X_local, y_local = X[mine], y[mine]

        # Forward: affine (no bias: batch norm's beta takes its place),
        # batch norm over the global batch, ReLU, affine, softmax.
        h = X_local @ W1
        a = bn.forward(h)
        r = np.maximum(a, 0)
        scores = r @ W2 + b2
        local_loss, probs = softmax_loss_sum(scores, y_local)
        loss = comm.allreduce(float(local_loss)) / args.batch
        losses.append(loss)

        # Backward of the global mean loss, on this rank's slice.
        dscores = probs
        dscores[np.arange(len(y_local)), y_local] -= 1
        dscores /= args.batch
        dW2 = r.T @ dscores
        db2 = dscores.sum(axis=0)
        dr = dscores @ W2.T
        da = dr * (a > 0)
        dh = bn.backward(da)                 # grad_gamma/grad_beta: global sums
        dW1 = X_local.T @ dh

        # One Allreduce sums the weight gradients over the ranks.
        local_grads = np.concatenate([g.ravel() for g in (dW1, dW2, db2)]).astype(np.float64)
        grads = np.empty_like(local_grads)
        comm.Allreduce(local_grads, grads, op=MPI.SUM)
        parts = np.split(grads, np.cumsum([w.size for w in weights])[:-1])
        grads = [p.reshape(w.shape).astype(dtype) for p, w in zip(parts, weights)]
        grads += [bn.grad_gamma, bn.grad_beta]

        # SGD with momentum, the same on every rank.
        for param, grad, v in zip(weights + [bn.gamma, bn.beta], grads, velocity):
            v *= 0.9
            v -= args.lr * grad
            param += v
        if rank == 0:
            print(f"step {step:3d}  loss {loss:.12f}")

    # Evaluation mode: the running statistics, the same on every rank.
    bn.eval()
    mine = np.array_split(np.arange(len(X)), size)[rank]
    scores = np.maximum(bn.forward(X[mine] @ W1), 0) @ W2 + b2
    correct = comm.allreduce(int((scores.argmax(axis=1) == y[mine]).sum()))
    if rank == 0:
        print(f"{size} rank(s), training accuracy {correct / len(X):.4f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": size, "losses": losses, "accuracy": correct / len(X)}, f)


if __name__ == "__main__":
    main()
