"""The arithmetic of synchronized batch norm, shared by every transport.

Each rank reduces its slice to per-channel numbers, the ranks exchange them
(mpi4py in :mod:`fastbn.distributed`, ``torch.distributed`` in
:mod:`fastbn.torch`), and every rank finishes with the functions here, so
that both transports compute bitwise the same statistics from the same
exchanged values. Nothing here communicates.

Forward: each rank contributes ``(count, mean, M2)`` per channel
(:func:`local_moments`); the rows of all ranks, in rank order, are merged
exactly (:func:`merge`) into the global mean and biased variance
(:func:`global_statistics`), and the running statistics are updated with
the unbiased variance over the total count (:func:`update_running`).
Backward: the ranks sum ``(sum_dy, sum_dy_xhat)``; :func:`elemt_sums`
scales the global sums for a backend's ``backward_elemt`` kernel, which
divides by the local count.
"""
import numpy as np


def local_moments(module, x3, channels):
    """This rank's ``(3, C)`` float64 rows: count, mean and ``M2 = sum((x - mean)**2)``.

    ``x3`` is the canonical ``(A, C, B)`` view of the local slice and
    ``module`` the backend whose ``stats`` kernel reads it. An empty slice
    (``A * B == 0``) gives zeros, and still takes part in the exchange.
    """
    local_count = x3.shape[0] * x3.shape[2]
    local = np.zeros((3, channels), dtype=np.float64)
    local[0] = local_count
    if local_count > 0:
        mean, var = module.stats(x3)
        local[1] = mean
        local[2] = np.asarray(var, dtype=np.float64) * local_count
    return local


def merge(triples):
    """Merge per-rank ``(count, mean, M2)`` rows in rank order.

    ``triples`` has shape ``(P, 3, C)``. For two groups ``a`` and ``b``
    (Chan, Golub and LeVeque, 1979)::

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta**2 * n_a * n_b / n

    A rank with ``n_b = 0`` leaves the running result unchanged; after a run
    of empty ranks, the first non-empty one is taken exactly.

    Returns
    -------
    count, mean, m2 : ndarray of float64, shape (C,)
    """
    triples = np.asarray(triples, dtype=np.float64)
    count = triples[0, 0].copy()
    mean = triples[0, 1].copy()
    m2 = triples[0, 2].copy()
    for count_b, mean_b, m2_b in triples[1:]:
        total = count + count_b
        safe_total = np.where(total > 0, total, 1.0)
        delta = mean_b - mean
        mean = mean + delta * (count_b / safe_total)
        m2 = m2 + m2_b + delta * delta * (count * count_b / safe_total)
        count = total
    return count, mean, m2


def global_statistics(triples, eps):
    """``(count, mean, invstd, m2)`` of the whole batch from the gathered rows.

    ``count`` is the total number of values per channel (an int); ``mean``
    and ``invstd = 1 / sqrt(M2 / count + eps)`` are contiguous float64.
    The caller checks ``count >= 2`` (training needs two values per channel).
    """
    counts, mean, m2 = merge(triples)
    count = int(counts[0])
    var = m2 / max(count, 1)
    invstd = 1.0 / np.sqrt(var + eps)
    return (count, np.ascontiguousarray(mean, dtype=np.float64),
            np.ascontiguousarray(invstd, dtype=np.float64), m2)


def update_running(running_mean, running_var, mean, m2, count, momentum):
    """The new running statistics, PyTorch's convention, in float64.

    ``momentum`` weighs the batch, and the running variance takes the
    unbiased batch variance ``M2 / (count - 1)``.
    """
    new_mean = (1.0 - momentum) * np.asarray(running_mean, dtype=np.float64) + momentum * mean
    new_var = ((1.0 - momentum) * np.asarray(running_var, dtype=np.float64)
               + momentum * (m2 / (count - 1)))
    return new_mean, new_var


def elemt_sums(total, local_count, count):
    """``(sum_dy, sum_dy_xhat)`` for a backend's ``backward_elemt`` on one slice.

    ``total`` holds the global sums, shape ``(2, C)``. The kernel divides
    the sums by the local count ``M = A * B``; the global formula divides by
    the global count, so it is handed the sums scaled by
    ``local_count / count``: ``(S * local_count / count) / local_count = S / count``.
    """
    scale = local_count / count
    return total[0] * scale, total[1] * scale
