"""The seed-003 net trained data-parallel, with synchronized batch norm.

    mpiexec -n 2 python examples/sync_batchnorm_fcnet.py
    python examples/sync_batchnorm_fcnet.py            # one process, the same losses

``fastbn.experiments.FullyConnectedNet`` (affine - batch norm - ReLU blocks,
softmax loss, L2 regularization) on scikit-learn's digits
(``pip install "fastbn[experiments,mpi]"``), with its batch-norm layers
replaced by ``fastbn.nn.SyncBatchNorm``. Every step draws a global batch
(the same on every rank, from a fixed seed) and gives each rank an equal
slice of it, so the global batch size must divide by the number of ranks.

The net's loss is the mean over the slice it sees, and its gradients are
those of that local mean. With equal slices of ``N / P`` samples, each
rank's upstream gradient is ``P`` times its share of the gradient of the
global mean loss, on every rank alike, so ``SyncBatchNorm`` (which sums over
all slices) returns ``P`` times the global ``dgamma``/``dbeta``, and the
``P`` ranks' weight gradients sum to ``P`` times the global ones. Hence:
one ``Allreduce`` sums the weight gradients, and every gradient is divided
by ``P``. Every rank then takes the same SGD-with-momentum step, the
parameters stay identical, and the losses equal those of one process on
the whole batch (up to the order of floating-point sums). ``--json PATH``
writes the losses (rank 0). (The plain loop in sync_batchnorm_train.py
handles unequal and empty slices too.)
"""
import argparse
import json

import numpy as np
from mpi4py import MPI

from fastbn.experiments.data import load_digits_data
from fastbn.experiments.net import FullyConnectedNet
from fastbn.nn import SyncBatchNorm


def main():
    parser = argparse.ArgumentParser(description="the seed-003 net, data-parallel")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-scale", type=float, default=2e-2)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.batch % size:
        raise SystemExit(f"--batch {args.batch} must divide by the number of ranks ({size})")
    data = load_digits_data(np.float64)
    X, y = data["X_train"], data["y_train"]

    # Same seed on every rank: the same initial parameters everywhere.
    net = FullyConnectedNet([100, 100, 100], use_batchnorm=True, reg=1e-3,
                            weight_scale=args.weight_scale, dtype=np.float64, seed=0,
                            backend=args.backend)
    for i, layer in enumerate(net.bn_layers):
        sync = SyncBatchNorm(layer.num_features, momentum=layer.momentum, dtype=np.float64,
                             backend=args.backend, comm=comm)
        net.bn_layers[i] = sync
        net.params[f"gamma{i + 1}"] = sync.gamma
        net.params[f"beta{i + 1}"] = sync.beta
    names = sorted(net.params)
    per_channel = {name for name in names if name.startswith(("gamma", "beta"))}
    velocity = {name: np.zeros_like(net.params[name]) for name in names}

    batches = np.random.default_rng(1)
    losses = []
    for step in range(args.steps):
        batch = batches.choice(len(X), args.batch, replace=False)
        mine = np.array_split(batch, size)[rank]
        local_loss, grads = net.loss(X[mine], y[mine])
        loss = comm.allreduce(local_loss) / size
        losses.append(loss)

        # Weight gradients: one Allreduce (sum); gamma/beta: already summed
        # over the global batch by SyncBatchNorm. Then divide everything by P.
        weights = [name for name in names if name not in per_channel]
        local = np.concatenate([grads[name].ravel() for name in weights])
        summed = np.empty_like(local)
        comm.Allreduce(local, summed, op=MPI.SUM)
        offsets = np.cumsum([grads[name].size for name in weights])[:-1]
        for name, part in zip(weights, np.split(summed, offsets)):
            grads[name] = part.reshape(grads[name].shape)
        for name in names:
            v = velocity[name]
            v *= 0.9
            v -= args.lr * (grads[name] / size)
            net.params[name] += v
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss:.12f}")

    # Validation accuracy in evaluation mode (running statistics), each rank
    # scoring its share of the validation set.
    mine = np.array_split(np.arange(len(data["X_val"])), size)[rank]
    scores = net.loss(data["X_val"][mine])
    correct = comm.allreduce(int((scores.argmax(axis=1) == data["y_val"][mine]).sum()))
    accuracy = correct / len(data["X_val"])
    if rank == 0:
        print(f"{size} rank(s), validation accuracy {accuracy:.4f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": size, "losses": losses, "val_accuracy": accuracy}, f)


if __name__ == "__main__":
    main()
