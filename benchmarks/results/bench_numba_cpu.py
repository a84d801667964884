"""Numba CPU kernels vs PyTorch CPU vs np.copyto, side by side in one run.

usage: PYTHONPATH=. python benchmarks/results/bench_numba_cpu.py [--reps N] [--rounds R] [--runs K]
                                                                  [--shapes i,j] [--no-staged]

Calls the backend kernels directly on the (A, C, B) view (no API overhead).
Per (dtype, shape): K runs; each run takes, per column, the best of REPS calls
over R interleaved rounds (copy, numba, torch); the table shows the median of
the K runs per column (the machine is shared, so single runs are noisy).
"""
import argparse
import statistics
import time

import numpy as np
import torch

from fastbn.backends import numba_cpu as nb

SHAPES = [(256, 4096), (128, 512, 7, 7), (64, 256, 14, 14), (32, 64, 56, 56), (64, 256, 56, 56)]


def best_of(f, reps):
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def one_run(args, x, y, x3, dy3, g64, b64, out, dx, dxs, mean, invstd, xt, dyt, gt, bt, sm, si):
    """Best time of each column over args.rounds interleaved rounds, so that a
    burst of load from other processes hits all columns alike."""
    inf = float("inf")
    t_copy = t_fwd = t_bwd = t_st = t_tf = t_tb = inf
    for _ in range(args.rounds):
        t_copy = min(t_copy, best_of(lambda: np.copyto(y, x), args.reps))
        t_fwd = min(t_fwd, best_of(lambda: nb.forward_train(x3, g64, b64, 1e-5, out), args.reps))
        t_bwd = min(t_bwd, best_of(lambda: nb.backward_train(dy3, x3, mean, invstd, g64, dx),
                                   args.reps))
        t_tf = min(t_tf, best_of(lambda: torch.native_batch_norm(
            xt, gt, bt, None, None, True, 0.1, 1e-5), args.reps))
        t_tb = min(t_tb, best_of(lambda: torch.ops.aten.native_batch_norm_backward(
            dyt, xt, gt, None, None, sm, si, True, 1e-5, [True, True, True]), args.reps))
        if not args.no_staged:
            t_st = min(t_st, best_of(
                lambda: nb.backward_staged(dy3, x3, mean, invstd, g64, 1e-5, dxs), 2))
    if args.no_staged:
        t_st = float("nan")
    return t_copy, t_fwd, t_bwd, t_st, t_tf, t_tb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0,3")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--no-staged", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds per run (copy, numba, torch); the best of all is kept")
    ap.add_argument("--runs", type=int, default=3, help="runs per shape; the median is reported")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    threads = nb.numba.get_num_threads()
    torch.set_num_threads(threads)
    print(f"threads {threads}, layer {nb.info()['threading_layer']}, torch {torch.__version__}")
    print("| dtype | shape | MB | copy ms | fwd ms | torch fwd ms | fwd x torch | fwd roof "
          "| bwd ms | torch bwd ms | bwd x torch | bwd roof | staged ms | staged/simpl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtname in args.dtypes.split(","):
        dtype = np.dtype(dtname)
        for shp in shapes:
            rng = np.random.default_rng(0)
            x = (3 * rng.standard_normal(shp, dtype=np.float32) + 5).astype(dtype)
            dy = rng.standard_normal(shp, dtype=np.float32).astype(dtype)
            C = shp[1]
            g = rng.standard_normal(C).astype(dtype)
            b = rng.standard_normal(C).astype(dtype)
            A, B = shp[0], int(np.prod(shp[2:], dtype=np.int64))
            x3, dy3 = x.reshape(A, C, B), dy.reshape(A, C, B)
            g64, b64 = g.astype(np.float64), b.astype(np.float64)
            y = np.empty_like(x)
            out = np.empty_like(x3)
            dx = np.empty_like(x3)
            dxs = np.empty_like(x3)
            xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
            gt, bt = torch.from_numpy(g), torch.from_numpy(b)
            mean, var = nb.forward_train(x3, g64, b64, 1e-5, out)
            invstd = 1.0 / np.sqrt(var + 1e-5)
            _, sm, si = torch.native_batch_norm(xt, gt, bt, None, None, True, 0.1, 1e-5)
            runs = []
            for _ in range(args.runs):
                runs.append(one_run(args, x, y, x3, dy3, g64, b64, out, dx, dxs, mean, invstd,
                                    xt, dyt, gt, bt, sm, si))
            t_copy, t_fwd, t_bwd, t_st, t_tf, t_tb = [statistics.median(col) for col in zip(*runs)]
            # limit = compulsory bytes / copy bandwidth; copy moves 2 itemsizes per element
            lim_f, lim_b = t_copy, 1.5 * t_copy
            print(f"| {dtname} | {shp} | {x.nbytes / 1e6:.1f} | {t_copy * 1e3:.3f} "
                  f"| {t_fwd * 1e3:.3f} | {t_tf * 1e3:.3f} | {t_tf / t_fwd:.2f} | {lim_f / t_fwd:.2f} "
                  f"| {t_bwd * 1e3:.3f} | {t_tb * 1e3:.3f} | {t_tb / t_bwd:.2f} | {lim_b / t_bwd:.2f} "
                  f"| {t_st * 1e3:.2f} | {t_st / t_bwd:.2f} |", flush=True)


if __name__ == "__main__":
    main()
