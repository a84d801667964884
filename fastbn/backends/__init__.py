"""Backends: implementations of the same small set of kernels.

``numpy_backend`` is one module; ``numba_cpu`` and ``numba_cuda`` are packages
split by layer (configuration, 16-bit load/store or device functions, loop
skeletons or kernel builders, the contract functions in ``__init__``);
``cython_omp`` loads the compiled extension (``_cython_omp.pyx`` and the
``.pxd`` files and C headers of ``_cython/``). The staged backward is walked
once, in ``_staged``, over primitives each backend supplies.

Every backend module works on the canonical 3-D view ``(A, C, B)`` that
:mod:`fastbn.api` builds: ``A`` is the product of the axes before the channel
axis, ``C`` the number of channels, ``B`` the product of the axes after it.
Validation, dtype checks, the 3-D view and allocation of outputs happen in
:mod:`fastbn.api`; a backend never repeats them. Per-channel work is the
backend's, where its data lives: turning sums into ``mean``/``invstd`` and
updating the caller's running statistics in place. The CPU backends share
one host implementation of it (:mod:`fastbn.backends._host`); the CUDA
backend does it on the device, in the kernel that merges its partial sums.

What the API hands to a kernel
------------------------------
* ``x``, ``dy``, ``out``: C-contiguous 3-D arrays ``(A, C, B)`` of one
  storage dtype: float32, float64, or 16-bit (NumPy's float16,
  ``ml_dtypes.bfloat16``) (``out`` is writable and never aliases an input).
  16-bit arrays are computed in float32 (the *compute dtype*; it is
  ``x.dtype`` otherwise), reductions accumulate in float64, and each result
  is rounded once (to nearest even) into the 16-bit ``out``. A compiled
  kernel may view 16-bit arrays as ``uint16`` bit patterns and convert in
  its loops; NaN stays NaN.
* ``mean``, ``invstd``, ``gamma``, ``beta``, ``sum_dy``, ``sum_dy_xhat``:
  C-contiguous float64 arrays of shape ``(C,)``. ``gamma``/``beta`` have been
  cast to the parameter dtype first (``x.dtype``; float32 for 16-bit
  storage), then to float64, so their values are those of that dtype.
  (Device backends: see ``ON_DEVICE`` below.)
* ``relu``: True when a ReLU is fused (``activation="relu"``). The forward
  kernels then write ``max(y, 0)``. The backward kernels then get the
  forward's ``beta`` too and mask ``dy`` by ``y > 0`` first, with
  ``y = (x - mean) * invstd * gamma + beta`` rebuilt by the same arithmetic
  as their forward's normalize pass (so the mask is the forward's
  ``out > 0``), inside the kernels: no mask array is stored. Everything
  after the mask is the plain backward of the masked ``dy``. The API passes
  ``relu`` and ``beta`` only when a ReLU is fused.
* ``running_mean``, ``running_var``: the caller's own writable float arrays
  of shape ``(C,)`` (any float dtype), or ``None``; ``momentum``, ``eps``:
  Python floats.

Kernels (module-level functions) and what they return
-----------------------------------------------------
``stats(x) -> (mean, var)``
    Per-channel mean and biased variance, float64 ``(C,)``, accumulated in
    float64 with a numerically stable scheme (two passes, shifted sums or
    Welford/Chan merges): a constant channel has variance exactly 0.
``normalize(x, mean, invstd, gamma, beta, out, relu=False) -> None``
    ``out = (x - mean) * invstd * gamma + beta`` (then ``max(out, 0)``). The centring ``x - mean``
    must be accurate for float32 (computed in float64, or with a split
    ``mean = hi + lo``), so that a channel whose mean is 1e4 times its
    standard deviation is normalized to within 1e-4. Also used for the
    evaluation backward ``dx = dy * invstd * gamma`` (``mean = beta = 0``).
``forward_train(x, gamma, beta, eps, out, running_mean, running_var, momentum, relu=False) -> (mean, invstd)``
    ``stats`` then ``normalize`` with ``invstd = 1 / sqrt(var + eps)``, fused
    where that moves fewer bytes. When ``running_mean`` is given, updates
    both running statistics in place, PyTorch's way:
    ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased batch variance ``var * M / (M - 1)``. Returns float64 ``mean``
    and ``invstd`` (what the cache keeps).
``forward_eval(x, gamma, beta, running_mean, running_var, eps, out, relu=False) -> (mean, invstd)``
    ``normalize`` with ``mean = running_mean`` and
    ``invstd = 1 / sqrt(running_var + eps)``; returns those two.
``backward_reduce(dy, x, mean, invstd, gamma=None, beta=None, relu=False) -> (sum_dy, sum_dy_xhat)``
    float64 ``(C,)``: ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)`` over
    ``A`` and ``B``.
``backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, out, beta=None, relu=False) -> None``
    ``out = gamma * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)`` with
    ``M = A * B`` and ``xhat = (x - mean) * invstd``.
``backward_train(dy, x, mean, invstd, gamma, out, beta=None, relu=False) -> (sum_dy, sum_dy_xhat)``
    ``backward_reduce`` then ``backward_elemt``, fused where that moves
    fewer bytes. ``dgamma = sum_dy_xhat``, ``dbeta = sum_dy``.
``backward_eval(dy, x, mean, invstd, gamma, out, beta=None, relu=False) -> (sum_dy, sum_dy_xhat)``
    The evaluation-mode backward, where ``mean`` and ``invstd`` are
    constants: ``out = dy * gamma * invstd`` and the two sums of
    ``backward_reduce``.
``backward_staged(dy, x, mean, invstd, gamma, eps, out, beta=None, relu=False) -> (dgamma, dbeta)``
    The teaching graph of the cs231n notebooks, stage by stage, each stage
    one pass that writes a full-size intermediate of the compute dtype
    (reductions accumulate in float64). With ``relu``, one more stage comes
    first: ``y`` rebuilt full size, then ``dy = where(y > 0, dy, 0)`` full
    size. Stages, in this order::

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

    For an ``ON_DEVICE`` backend the API checks metadata only and hands the
    kernels device arrays: the 3-D arrays, ``out``, and the caller's own
    per-channel arrays as they are (``gamma``/``beta`` of any real dtype, or
    ``None`` for ones/zeros; the running statistics of any float dtype),
    copied over once when the caller gave host arrays. The backend casts
    them on the device. Per-channel results are device arrays: ``mean`` and
    ``invstd`` in float64, the backward's sums in the parameter dtype. The API never
    reads a device value; it copies results back to the host only when the
    caller passed host arrays.
"""
