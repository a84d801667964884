"""Backends: one module per implementation of the same small set of kernels.

Every backend module works on the canonical 3-D view ``(A, C, B)`` that
:mod:`fastbn.api` builds: ``A`` is the product of the axes before the channel
axis, ``C`` the number of channels, ``B`` the product of the axes after it.
Validation, dtype checks, the 3-D view, allocation of outputs and the update
of running statistics all happen in :mod:`fastbn.api`; a backend never
repeats them.

What the API hands to a kernel
------------------------------
* ``x``, ``dy``, ``out``: C-contiguous 3-D arrays ``(A, C, B)`` of one dtype,
  float32 or float64 (``out`` is writable and never aliases an input).
* ``mean``, ``invstd``, ``gamma``, ``beta``, ``sum_dy``, ``sum_dy_xhat``:
  C-contiguous float64 arrays of shape ``(C,)``. ``gamma``/``beta`` have been
  cast to ``x.dtype`` first, then to float64, so their values are those of
  ``x.dtype``.
* ``eps``: a Python float.

Kernels (module-level functions) and what they return
-----------------------------------------------------
``stats(x) -> (mean, var)``
    Per-channel mean and biased variance, float64 ``(C,)``, accumulated in
    float64 with a numerically stable scheme (two passes, shifted sums or
    Welford/Chan merges): a constant channel has variance exactly 0.
``normalize(x, mean, invstd, gamma, beta, out) -> None``
    ``out = (x - mean) * invstd * gamma + beta``. The centring ``x - mean``
    must be accurate for float32 (computed in float64, or with a split
    ``mean = hi + lo``), so that a channel whose mean is 1e4 times its
    standard deviation is normalized to within 1e-4. Also used for the
    evaluation backward ``dx = dy * invstd * gamma`` (``mean = beta = 0``).
``forward_train(x, gamma, beta, eps, out) -> (mean, var)``
    ``stats`` then ``normalize`` with ``invstd = 1 / sqrt(var + eps)``, fused
    where that moves fewer bytes. Returns float64 ``mean`` and biased ``var``.
``backward_reduce(dy, x, mean, invstd) -> (sum_dy, sum_dy_xhat)``
    float64 ``(C,)``: ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)`` over
    ``A`` and ``B``.
``backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out) -> None``
    ``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)`` with
    ``M = A * B`` and ``xhat = (x - mean) * invstd``.
``backward_train(dy, x, mean, invstd, gamma, out) -> (sum_dy, sum_dy_xhat)``
    ``backward_reduce`` then ``backward_elemt``, fused where that moves
    fewer bytes. ``dgamma = sum_dy_xhat``, ``dbeta = sum_dy``.
``backward_staged(dy, x, mean, invstd, gamma, eps, out) -> (dgamma, dbeta)``
    The teaching graph of the cs231n notebooks, stage by stage, each stage
    one pass that writes a full-size intermediate of ``x.dtype`` (reductions
    accumulate in float64). Stages, in this order::

        xmu    = x - mean                      # rebuilt forward, full size
        xhat   = xmu * invstd                  # full size
        dbeta  = sum(dy)                       # step 9
        dgamma = sum(dy * xhat)                # step 8
        dxhat  = dy * gamma                    # full size
        divar  = sum(dxhat * xmu)              # step 7
        dxmu1  = dxhat * invstd                # full size
        dsqrtvar = -invstd**2 * divar          # step 6, per channel
        dvar   = 0.5 * invstd * dsqrtvar       # step 5, per channel
        dsq    = dvar / M  (broadcast)         # step 4, full size
        dxmu2  = 2 * xmu * dsq                 # step 3, full size
        dx1    = dxmu1 + dxmu2                 # step 2, full size
        dmu    = -sum(dx1)                     # step 2, per channel
        out    = dx1 + dmu / M                 # steps 1 and 0

    It must stay staged in every backend, so that the speedup of the
    simplified backward over it measures the algorithm, not the backend.
    ``dgamma``/``dbeta`` are float64 ``(C,)``.

Module attributes
-----------------
``availability() -> (bool, str)``
    Whether the backend can run here and, if not, why (empty string when it
    can). Must not raise.
``info() -> dict``
    At least ``threads`` (int), ``openmp`` (bool), ``device`` (str).
``ON_DEVICE``
    False for CPU backends. True for the CUDA backend, which also provides:

    ``to_device(obj)``
        A NumPy array -> a new device array (a copy); an object with
        ``__cuda_array_interface__`` (Numba device array, CuPy array, PyTorch
        CUDA tensor) -> a Numba device array viewing the same memory, no copy.
    ``empty(shape, dtype)``
        A new C-contiguous device array.
    ``to_host(arr)``
        A device array -> a NumPy array.
    ``is_device_array(obj)``
        True for objects with ``__cuda_array_interface__``.

    For an ``ON_DEVICE`` backend the API moves everything to the device
    first and hands the kernels device arrays only (3-D arrays and the
    per-channel float64 ``(C,)`` arrays alike); the kernels return device
    arrays for their per-channel results and the API calls ``to_host`` where
    it needs their values on the host. The API copies results back to the
    host when the caller passed host arrays.
"""
