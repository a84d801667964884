"""The staged backward: one walker of the cs231n graph for every backend.

The staged backward is the baseline that the simplified (closed-form)
backward is measured against, so it must stay staged in every backend: each
stage of the graph is one pass that writes a new full-size intermediate of
the compute dtype. :func:`backward` walks the graph once, here, over a few
primitives that each backend supplies (an *ops* object, below). A backend
cannot fuse two stages without changing this file, and the peak number of
full-size intermediates (:func:`temporaries`) is a property of the walk, not
of four copies of it.

The ops object
--------------
Full-size arrays are whatever the backend computes on (a NumPy array of the
canonical ``(A, C, B)`` view, a device array); per-channel values are
whatever its ``sum`` returns. Each full-size primitive returns a **new**
array of the compute dtype (float32 for 16-bit storage):

``normalize(x, mean, invstd, gamma, beta)``
    ``y = (x - mean) * invstd * gamma + beta``, by the same arithmetic as
    the backend's forward (so ``y > 0`` is the forward's ReLU mask).
``mask_positive(u, v)``
    ``where(v > 0, u, 0)``.
``subtract(u, p)``, ``multiply(u, p)``
    ``u - p`` and ``u * p`` with a per-channel ``p``.
``broadcast(p)``
    ``p`` repeated over the full size.
``twice_product(u, v)``
    ``2 * u * v``.
``add(u, v)``
    ``u + v``.

and these write or reduce:

``add_into(u, p, out)``
    ``out = u + p``, rounded once into the storage dtype of ``out``.
``sum(u)``, ``sum_of_product(u, v)``
    Per channel, accumulated in float64.
``dsq_value(invstd, divar, count)``, ``dmu_value(sum_dx1, count)``
    The per-channel steps 6 to 4 and step 2 (:class:`HostChannels` has them
    for float64 NumPy vectors).
``results(dgamma, dbeta)``
    What ``backward_staged`` returns.
"""

from fastbn.backends import _memory

__all__ = ["HostChannels", "backward", "require_memory", "temporaries"]


def temporaries(relu):
    """Peak number of full-size intermediates alive during :func:`backward`.

    Four (``xmu``, ``dxmu1``, ``dsq``, ``dxmu2`` at step 3), five with the
    ReLU's masked ``dy``.
    """
    return 4 + bool(relu)


def require_memory(size, itemsize, relu, copies=0):
    """Refuse, before anything is allocated, a walk that cannot fit.

    Parameters
    ----------
    size : int
        Elements of ``x``.
    itemsize : int
        Bytes per element of the compute dtype.
    relu : bool
    copies : int
        Further full-size arrays of the compute dtype that the backend holds
        around the walk (for example float32 copies of 16-bit ``x``, ``dy``
        and ``out``).

    Raises
    ------
    MemoryError
        When they do not fit in the available memory.
    """
    _memory.require((temporaries(relu) + copies) * size * itemsize, "the staged backward")


class HostChannels:
    """The per-channel steps on float64 NumPy vectors (the CPU backends)."""

    @staticmethod
    def dsq_value(invstd, divar, count):
        dsqrtvar = -invstd * invstd * divar     # step 6: ivar = 1 / sqrtvar
        dvar = 0.5 * invstd * dsqrtvar          # step 5: sqrtvar = sqrt(var + eps)
        return dvar / count                     # step 4: var = mean(sq)

    @staticmethod
    def dmu_value(sum_dx1, count):
        return -sum_dx1 / count                 # step 2: dmu = -sum(dx1), over M

    @staticmethod
    def results(dgamma, dbeta):
        return dgamma, dbeta


def backward(ops, dy, x, mean, invstd, gamma, beta, relu, out, count):
    """Walk the cs231n graph back, stage by stage.

    Parameters
    ----------
    ops : object
        The backend's primitives (see the module notes).
    dy, x : full-size arrays of the compute dtype (or what ``ops`` reads)
    mean, invstd, gamma, beta : per-channel values (``beta`` only with ``relu``)
    relu : bool
        The graph has one more node on top, ``relu = max(y, 0)``, walked back
        first.
    out : full-size array
        Receives ``dx``.
    count : int
        ``M``, the number of values per channel.

    Returns
    -------
    ``ops.results(dgamma, dbeta)``
    """
    if relu:
        if beta is None:
            raise ValueError("relu=True needs the forward's beta")
        # step 10: relu = max(y, 0), with y rebuilt full size
        y = ops.normalize(x, mean, invstd, gamma, beta)
        dy = ops.mask_positive(dy, y)
        del y
    xmu = ops.subtract(x, mean)                 # step 2 forward: xmu = x - mu
    xhat = ops.multiply(xmu, invstd)            # step 7 forward: xhat = xmu * ivar
    dbeta = ops.sum(dy)                         # step 9: out = gammax + beta
    dgamma = ops.sum_of_product(dy, xhat)       # step 8: gammax = gamma * xhat
    del xhat
    dxhat = ops.multiply(dy, gamma)
    divar = ops.sum_of_product(dxhat, xmu)      # step 7: xhat = xmu * ivar
    dxmu1 = ops.multiply(dxhat, invstd)
    del dxhat
    dsq = ops.broadcast(ops.dsq_value(invstd, divar, count))   # steps 6, 5, 4
    dxmu2 = ops.twice_product(xmu, dsq)         # step 3: sq = xmu**2
    del xmu, dsq
    dx1 = ops.add(dxmu1, dxmu2)                 # step 2: both paths into xmu
    del dxmu1, dxmu2
    dmu = ops.dmu_value(ops.sum(dx1), count)
    ops.add_into(dx1, dmu, out)                 # steps 1 and 0: mu = mean(x)
    return ops.results(dgamma, dbeta)
