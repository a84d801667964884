"""What the kernel-contract suite needs to know about each backend module.

A :class:`Spec` per backend names its module, its capabilities (device
arrays, the dtype of the gradients its fused backwards return, how its
thread count or block size is varied, how many 16-bit terms it adds in
float32 before a float64 merge) and its shape classes: ``(A, C, B)`` views
chosen so that each takes the loop shape or work split its name says, with
the module settings (``configure``) that make it so on any machine. The
suite takes everything backend-specific from here. The float64 references
are in ``tests/conftest.py``; the data and error bounds of the 16-bit and
fused-ReLU properties are at the end of this module.
"""
import functools
import importlib
import sys

import numpy as np
import pytest

EPS = 1e-5


class Spec:
    """A backend module as the contract suite drives it."""

    name = ""                   # registry name (FASTBN_TEST_BACKENDS, backend_params())
    module_name = ""
    on_device = False
    modes = ("default",)        # module settings each property runs under
    shapes = {}                 # shape class -> (A, C, B)
    properties = {}             # property -> shape classes it runs on
    thread_settings = ()        # values for ``threads``; empty: nothing to vary
    thread_atol = 0.0           # float64 results may move by this (normwise) across them
    strided_running = True      # running statistics may be strided views
    read_only_params = False    # per-channel float64 inputs may be read-only too

    @property
    def module(self):
        return importlib.import_module(self.module_name)

    def configure(self, monkeypatch, cleanup, mode, shape_class):
        """Module settings for ``mode`` and ``shape_class`` (undone by
        ``monkeypatch`` and the callables appended to ``cleanup``); returns the
        shape."""
        return self.shapes[shape_class]

    def threads(self, monkeypatch, cleanup, value):
        """Run with ``value`` threads (or threads per block) from now on."""
        raise NotImplementedError

    def grads_dtype(self, dtype):
        """dtype of the sums that backward_train/_eval/_staged return."""
        return np.dtype(np.float64)

    def sum_block(self):
        """The most 16-bit terms one float32 partial sum adds before it is
        merged in float64 (1: every term is converted to float64 first)."""
        return 1

    # host <-> the arrays the kernels take
    def put(self, array):
        return None if array is None else array

    def get(self, array):
        return np.asarray(array)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)


class NumpyBackend(Spec):
    """The NumPy reference backend. Its float32 statistics are float32-accurate
    (``NOT_CONTRACT``), so it runs only the properties listed here."""
    name = "numpy"
    module_name = "fastbn.backends.numpy_backend"
    # whole: one block per array; blocks: the 16-bit path walks several
    # blocks of rows, and parts of rows, per array
    modes = ("whole", "blocks")
    shapes = {
        "rows": (16, 3, 300),      # blocks: parts of rows
        "cols": (300, 4, 1),       # blocks: several rows per block
        "mixed": (4, 30, 49),      # blocks: parts of rows, a channel across two
    }
    properties = {
        "half": ["rows", "cols", "mixed"],
        "relu": ["rows", "cols", "mixed"],
        "exact": ["rows"],
    }
    BLOCKS_ELEMENTS = 700

    def configure(self, monkeypatch, cleanup, mode, shape_class):
        if mode == "blocks":
            monkeypatch.setattr(self.module, "BLOCK_ELEMENTS", self.BLOCKS_ELEMENTS)
        return self.shapes[shape_class]


class NumbaCpu(Spec):
    name = "numba"
    module_name = "fastbn.backends.numba_cpu"
    modes = ("unfused", "fused", "serial")
    shapes = {
        "cols_B1": (261, 1100, 1),        # (N, D): columns shape, two column blocks
        "cols_fused": (100, 600, 1),      # (N, D), one row block: fused per column block
        "cols_smallB": (9, 13, 5),        # 1 < B < ROWS_MIN_B: columns shape, folded over B
        "mixed_B49": (9, 30, 49),         # 7x7 maps: rows elementwise, columns reductions
                                          # (a channel straddles two column blocks)
        "rows_largeC": (3, 70, 300),      # rows shape, one channel per reduction item
        "rows_smallC": (3, 2, 50000),     # rows shape, channels split in chunks
        "rows_partial": (7, 3, 7001),     # rows shape, chunks end inside rows
        # accuracy cases
        "rows": (16, 3, 300), "cols": (50, 3, 1), "rows_many": (2, 70, 300),
        "mixed_small": (4, 30, 49), "rows_long": (64, 3, 300), "cols_long": (300, 4, 1),
        "read_only": (4, 70, 300),
    }
    properties = {
        "reference": ["cols_B1", "cols_fused", "cols_smallB", "mixed_B49", "rows_largeC",
                      "rows_smallC", "rows_partial"],
        "running": ["cols_B1", "cols_smallB", "mixed_B49", "rows_largeC"],
        "constant_nan": ["rows", "cols", "rows_many", "mixed_small"],
        "large_mean": ["rows_long", "cols_long"],
        "read_only": ["read_only"],
    }
    properties["threads"] = properties["reference"]
    properties["half"] = properties["reference"]
    properties["relu"] = ["cols_B1", "cols_fused", "cols_smallB", "mixed_B49", "rows_largeC",
                          "rows_smallC"]
    properties["exact"] = ["rows"]         # module settings only: the tests make their arrays
    thread_settings = (1, 2)
    read_only_params = True

    def configure(self, monkeypatch, cleanup, mode, shape_class):
        """unfused / fused even on small arrays / the serial small-array kernels."""
        nb = self.module
        monkeypatch.setattr(nb, "SERIAL_BELOW", 2**62 if mode == "serial" else 0)
        monkeypatch.setattr(nb, "FUSED_COLS", mode == "fused")
        if mode == "fused":
            monkeypatch.setattr(nb, "FUSED_MIN_BYTES", 0)
            monkeypatch.setattr(nb, "FUSED_MIN_B", 1)
        return self.shapes[shape_class]

    def threads(self, monkeypatch, cleanup, value):
        import numba
        if numba.config.NUMBA_NUM_THREADS < 2:
            pytest.skip("needs 2 numba threads")
        cleanup.append(functools.partial(numba.set_num_threads, numba.get_num_threads()))
        numba.set_num_threads(value)

    def sum_block(self):
        """``SUM_BLOCK``: chosen at import from the vector width numba compiles for."""
        kernels = self.module
        block = getattr(kernels, "SUM_BLOCK", None)
        if block is None:
            block = kernels.tuning()["sum_block"]
        return int(block)


class CythonOmp(Spec):
    name = "cython"
    module_name = "fastbn.backends.cython_omp"
    shapes = {
        "rows_B1_large_C": (256, 1100, 1),     # B == 1: vectorized across C, column blocks
        "rows_B1_fused": (64, 1500, 1),        # B == 1: fused per block of channels (in L2)
        "rows_B1_small_C": (40000, 3, 1),      # B == 1, few channels, many row chunks
        "channels_fused": (8, 64, 4100),       # B large, many channels (fused: float64 >= 16 MiB)
        "channels_split": (3, 2, 70001),       # B large, C < threads: split channels, odd sizes
        "channels_small_B": (64, 40, 49),      # short segments
        "tiny": (3, 5, 7),                     # runs on one thread
        # accuracy cases
        "segments": (16, 4, 300), "rows_B1": (300, 4, 1), "channels_long": (8, 64, 40000),
        "segments_long": (64, 3, 500), "rows_B1_long": (4000, 7, 1),
        "rows_B1_wide": (64, 1500, 1), "read_only": (8, 6, 50),
    }
    properties = {
        "reference": ["rows_B1_large_C", "rows_B1_fused", "rows_B1_small_C", "channels_fused",
                      "channels_split", "channels_small_B", "tiny"],
        "threads": ["rows_B1_large_C", "rows_B1_fused", "rows_B1_small_C", "channels_fused",
                    "channels_split", "channels_small_B"],
        "running": ["rows_B1_large_C", "rows_B1_fused", "channels_small_B", "tiny"],
        "constant_nan": ["segments", "rows_B1", "channels_long"],
        "large_mean": ["segments_long", "rows_B1_long", "rows_B1_wide"],
        "read_only": ["read_only"],
        "half": ["rows_B1_large_C", "rows_B1_fused", "rows_B1_small_C", "channels_fused",
                 "channels_split", "channels_small_B", "tiny"],
        "relu": ["rows_B1_large_C", "rows_B1_fused", "channels_fused", "channels_split",
                 "channels_small_B", "tiny"],
        "exact": ["tiny"],                 # module settings only: the tests make their arrays
    }
    thread_settings = (1, 2)
    # The shapes were sized for these cache-dependent block sizes (a fused row
    # block within 1 MiB, the channel path fused from 16 MiB). The extension
    # sets its own from this machine's caches at import; pinned here, each
    # shape takes the path its comment names on any CPU.
    PINNED_TUNING = {"row_fuse_bytes": 1024 * 1024, "fuse_min_bytes": 16 * 1024 * 1024}

    def configure(self, monkeypatch, cleanup, mode, shape_class):
        ext = self.module._ext
        cleanup.append(functools.partial(ext.set_cache_tuning, **ext.cache_tuning()))
        ext.set_cache_tuning(**self.PINNED_TUNING)
        return self.shapes[shape_class]

    def threads(self, monkeypatch, cleanup, value):
        threadpoolctl = pytest.importorskip("threadpoolctl")
        limits = threadpoolctl.threadpool_limits(value, user_api="openmp")
        cleanup.append(limits.restore_original_limits)
        if self.module.info()["openmp"]:
            assert self.module.info()["threads"] == value

    # The channel path adds the float32 values of 16-bit data four at a time
    # (``lanes_f32``: a fixed tree over four blocks of lanes) before each
    # float64 addition; the row path converts every value to float64. A
    # constant of the source, not of the machine (the extension does not
    # expose it); read from the extension or its tuning info where it does.
    SUM_BLOCK = 4

    def sum_block(self):
        block = getattr(getattr(self.module, "_ext", None), "SUM_BLOCK", None)
        if block is None:
            block = self.module.info().get("tuning", {}).get("sum_block", self.SUM_BLOCK)
        return int(block)


class NumbaCuda(Spec):
    name = "cuda"
    module_name = "fastbn.backends.numba_cuda"
    on_device = True
    strided_running = False
    # name -> shape as the API would build it. Extents do not divide the block
    # sizes, so that every layout has partial blocks, partial rows and
    # remainders of the unrolled loops.
    shapes = {
        "N_D": (37, 5, 1),                 # columns layout, one column per channel
        "N_D_unrolled": (37, 5, 1),        # ... on two row blocks: the unrolled loops
        "channels_last": (45, 3, 1),       # (5, 3, 3, 3) channels-last: columns
        "NCHW_short_rows": (5, 3, 5),      # columns with B > 1
        "NCHW": (3, 2, 42),                # rows layout, one row per block
        "NCHW_unrolled": (3, 2, 70),       # rows of 70 with 16 threads: unrolled loops
        "NCHW_rows_per_block": (7, 3, 6),  # ROWS_MIN_B = 4: several rows per block
    }
    # (ROWS_MIN_B, TARGET_BLOCKS) of each shape class
    LAYOUT = {"N_D_unrolled": (32, 2), "NCHW_rows_per_block": (4, 4096)}
    properties = {
        "reference": sorted(shapes),
        "threads": ["NCHW"],
        "running": ["N_D", "NCHW"],
        "constant_nan": ["N_D", "NCHW"],
        "large_mean": ["NCHW"],
        "read_only": [],                   # device arrays: no NumPy write flag
        "half": ["N_D", "NCHW_unrolled"],
        "relu": ["N_D", "NCHW"],
        "exact": ["NCHW"],                 # module settings only: the tests make their arrays
    }
    thread_settings = (1, 4, 32)           # threads per block
    # A block size changes the float64 summation order (never its accuracy):
    # results move by a few float64 roundings of their terms.
    thread_atol = 1e-12

    def configure(self, monkeypatch, cleanup, mode, shape_class):
        """16 threads per block, so that the small shapes span several blocks;
        a short GIL switch interval (the simulator polls its threads at
        ``syncthreads``: the barriers get several times faster)."""
        backend = self.module
        rows_min_b, target_blocks = self.LAYOUT.get(shape_class, (32, 4096))
        monkeypatch.setattr(backend, "THREADS_PER_BLOCK", 16)
        monkeypatch.setattr(backend, "MIN_ITEMS_PER_THREAD", 1)
        monkeypatch.setattr(backend, "ROWS_MIN_B", rows_min_b)
        monkeypatch.setattr(backend, "TARGET_BLOCKS", target_blocks)
        cleanup.append(functools.partial(sys.setswitchinterval, sys.getswitchinterval()))
        sys.setswitchinterval(1e-4)
        return self.shapes[shape_class]

    def threads(self, monkeypatch, cleanup, value):
        monkeypatch.setattr(self.module, "THREADS_PER_BLOCK", value)

    def grads_dtype(self, dtype):
        """The parameter dtype: float32 for 16-bit storage, else x's."""
        return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)

    def sum_block(self):
        """Every 16-bit value is converted to float64 when loaded; partial sums,
        block reductions and merges are float64."""
        return 1

    def put(self, array):
        return None if array is None else self.module.to_device(array)

    def get(self, array):
        assert self.module.is_device_array(array), type(array)
        return self.module.to_host(array)

    def empty(self, shape, dtype):
        return self.module.empty(shape, dtype)


SPECS = {spec.name: spec for spec in (NumpyBackend(), NumbaCpu(), CythonOmp(), NumbaCuda())}

# Backends that do not (yet) meet the contract's accuracy: float32 statistics
# are float32-accurate there (var within 1e-8, not 1e-12; a mean 1e4 times the
# spread is not centred within 1e-4). They run the properties their Spec
# lists; this is the reason the others are skipped.
NOT_CONTRACT = {"numpy": "float32 statistics are not accumulated in float64"}

# (backend, test, storage) -> why it fails the contract today. The suite runs
# them as strict expected failures: a fix makes them pass, which fails the run
# until the entry is removed here.
KNOWN_FAILURES = {}


# ---------------------------------------------------------------------------
# 16-bit storage and the fused ReLU: data, rounding and error bounds
# ---------------------------------------------------------------------------
#
# The contract's arithmetic (``fastbn.backends``): 16-bit values convert
# exactly to float32, elementwise results are computed in float32 (a backend
# may use float64) and rounded once, to nearest even, into the storage dtype;
# reductions accumulate in float64, 16-bit terms possibly in float32 partial
# sums of at most ``Spec.sum_block()`` terms first. Every bound below is
# Higham's ``gamma(n) = n u / (1 - n u)`` for the roundings a result goes
# through, times the magnitude of the terms they round, so it holds for any
# summation order, vectorization or fused multiply-add a compiler picks.

U32 = 2.0**-24          # unit roundoff of float32
U64 = 2.0**-53          # unit roundoff of float64
HALF = ("float16", "bfloat16")
STORAGE = ("float32", "float64") + HALF

# roundings of an elementwise result in the compute dtype, at most: the
# normalize pass (centring with a split mean: 2; the scale invstd * gamma: 2;
# the product: 1; + beta: 1), the simplified and evaluation backward (at
# most 8: the centring, xhat, three per-channel coefficients, two products,
# two additions), the staged graph's dx (10: its stages are each rounded, see
# staged_expectation)
FORWARD_ROUNDINGS = 6
BACKWARD_ROUNDINGS = 8
STAGED_ROUNDINGS = 10
# roundings of a term of sum(dy * xhat) before it is added: the centring (2),
# invstd (1, or 2 when applied per term), the product (1), and one more where
# the staged graph multiplies float32 intermediates
PRODUCT_TERM_ROUNDINGS = 6

# (mantissa bits, exponent of the smallest normal, exponent of the largest)
_FORMATS = {"float16": (10, -14, 15), "bfloat16": (7, -126, 127),
            "float32": (23, -126, 127), "float64": (52, -1022, 1023)}


def storage_dtype(name):
    """The NumPy dtype of a storage name (bfloat16 from ml_dtypes)."""
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


def compute_unit(dtype):
    """Unit roundoff of the compute dtype of a storage dtype: float32 for 16-bit
    and float32 storage (a backend computing in float64 is within it too),
    float64 for float64."""
    return U64 if np.dtype(dtype) == np.float64 else U32


def rounding_unit(dtype):
    """Unit roundoff of one rounding of a float64 result into ``dtype`` (the
    float32 sums some backends return; 0 for float64)."""
    return {np.dtype(np.float32): U32, np.dtype(np.float64): 0.0}[np.dtype(dtype)]


def sum_block(spec, dtype):
    """The longest float32 partial sum of ``spec``'s reductions over ``dtype``
    storage: ``spec.sum_block()`` for 16-bit storage, else 1 (float32 and
    float64 data accumulate in float64)."""
    return spec.sum_block() if np.dtype(dtype).itemsize == 2 else 1


def gamma(n, unit):
    """Higham's gamma_n: the relative error bound of n roundings of ``unit``."""
    return n * unit / (1 - n * unit)


def spacing(values, dtype):
    """The distance between adjacent values of ``dtype`` at ``|values|``
    (float64 in, float64 out; the subnormal spacing below the normal range)."""
    mantissa_bits, min_exponent, _ = _FORMATS[np.dtype(dtype).name]
    magnitude = np.maximum(np.abs(np.asarray(values, np.float64)), 2.0**min_exponent)
    _, exponent = np.frexp(magnitude)           # magnitude = f * 2**exponent, 0.5 <= f < 1
    return np.ldexp(1.0, exponent - 1 - mantissa_bits)


def per_channel(values):
    """(C,) -> (1, C, 1)."""
    return np.asarray(values, np.float64).reshape(1, -1, 1)


def channel_mean(values):
    """Per-channel mean over A and B, broadcastable: (A, C, B) -> (1, C, 1)."""
    return values.mean(axis=(0, 2), keepdims=True)


def half_case(shape, dtype, seed):
    """16-bit ``x``, ``dy`` and float64 ``gamma``, ``beta`` holding float32
    values (what the API hands the kernels for 16-bit storage). Channel 0 has
    a mean 2000 times its spread (the centring must be accurate)."""
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal(shape) + 5
    x[:, 0, :] = 1e3 + 0.5 * rng.standard_normal((shape[0], shape[2]))
    x = x.astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.standard_normal(shape[1]).astype(np.float32).astype(np.float64)
    beta = rng.standard_normal(shape[1]).astype(np.float32).astype(np.float64)
    return x, dy, gamma, beta


def integer_dy(shape, dtype, seed):
    """dy of nonzero integers in [-8, 8]: exact in every storage dtype, and
    every partial sum of a channel is an integer below 2**24, so float32 block
    sums and float64 merges of any subset of it are exact in any order."""
    rng = np.random.default_rng(seed)
    magnitude = rng.integers(1, 9, size=shape)
    return (magnitude * rng.choice([-1, 1], size=shape)).astype(dtype)


def sum_bound(abs_terms, roundings, dtype, block):
    """Bound on |kernel's sum - float64 reference sum|, per channel, of terms
    of magnitude ``abs_terms`` (``(A, C, B)``), each rounded ``roundings``
    times in the compute dtype of ``dtype`` storage and added in partial sums
    of at most ``block`` terms in it (:func:`sum_block`): gamma(block +
    roundings) in compute-dtype units, in any order; the partial sums merged
    in float64: gamma(n + roundings) in float64 units, twice (the reference's
    own float64 sum errs as much)."""
    n = abs_terms.shape[0] * abs_terms.shape[2]
    total = abs_terms.sum(axis=(0, 2))
    return (gamma(block + roundings, compute_unit(dtype))
            + 2 * gamma(n + roundings, U64)) * total


def statistics_bounds(x64, block):
    """Bounds on the errors of the per-channel mean and biased variance of
    16-bit ``x`` (float64 copy, ``(A, C, B)``) against the float64 reference.

    The kernels sum ``d = x - K`` and ``d*d`` with ``K`` an element of the
    channel or its mean (``|d| <= R``, the channel's range), each term rounded
    at most three times in float32, in float32 partial sums of at most
    ``block`` terms merged in float64: ``|dS1| <= b n R`` and
    ``|dS2| <= b n R**2`` with ``b = gamma(block + 3)`` in float32 units plus
    the float64 merge (twice, for the reference's own sums). Then
    ``mean = K + S1/n`` and ``var = (S2 - S1**2/n) / n`` are off by at most
    ``b R`` and ``(3 b + b**2) R**2``, plus float64 roundings of the values'
    magnitude (a mean summed from raw values in float64 included).
    """
    n = x64.shape[0] * x64.shape[2]
    spread = x64.max(axis=(0, 2)) - x64.min(axis=(0, 2))
    magnitude = np.abs(x64).max(axis=(0, 2))
    b = gamma(block + 3, U32) + 2 * gamma(n + 3, U64)
    mean_bound = b * spread + 2 * gamma(n + 4, U64) * magnitude
    var_bound = (3 * b + b**2) * spread**2 + 2 * gamma(n + 8, U64) * magnitude**2
    return mean_bound, var_bound


def invstd_bound(var, var_bound, eps):
    """How far ``1/sqrt(var + eps)`` moves when ``var`` moves by ``var_bound``,
    plus the float64 roundings of the kernel's and the reference's formula."""
    low = np.maximum(var - var_bound, 0.0) + eps
    invstd = 1.0 / np.sqrt(var + eps)
    return 1.0 / np.sqrt(low) - invstd + 8 * U64 * invstd


def centred(x64, mean, invstd):
    """``x - mean``, ``xhat`` and a bound on ``|xhat|`` as the kernels form it
    (a split ``mean = hi + lo`` in float32 leaves ``u32 * |mean|`` of ``lo``)."""
    xmu = x64 - per_channel(mean)
    xhat = xmu * per_channel(invstd)
    xhat_magnitude = np.abs(xhat) + U32 * per_channel(np.abs(mean) * invstd)
    return xmu, xhat, xhat_magnitude


def forward_expectation(x64, mean, invstd, gamma_, beta, unit):
    """``y = (x - mean) * invstd * gamma + beta`` in float64 from the given
    (the kernel's own) statistics, and the error its compute dtype allows
    before the store: FORWARD_ROUNDINGS roundings of the terms' magnitude."""
    xmu, _, _ = centred(x64, mean, invstd)
    k = per_channel(invstd * gamma_)
    want = xmu * k + per_channel(beta)
    terms = np.abs(k) * (np.abs(xmu) + U32 * per_channel(np.abs(mean))) + np.abs(per_channel(beta))
    return want, gamma(FORWARD_ROUNDINGS, unit) * terms


def backward_expectation(dy64, x64, mean, invstd, gamma_, sum_dy, sum_dy_xhat, unit,
                         sums_unit=0.0):
    """``dx = gamma * invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M)`` in float64
    from the given (the kernel's own) sums, and the error allowed before the
    store: BACKWARD_ROUNDINGS roundings of the terms' magnitude, plus
    ``sums_unit`` of them where the sums given were rounded (float32 results
    of a kernel that used the float64 sums)."""
    M = x64.shape[0] * x64.shape[2]
    _, xhat, xhat_magnitude = centred(x64, mean, invstd)
    k = per_channel(gamma_ * invstd)
    s1, s2 = per_channel(sum_dy) / M, per_channel(sum_dy_xhat) / M
    want = k * (dy64 - s1 - xhat * s2)
    terms = np.abs(k) * (np.abs(dy64) + np.abs(s1) + xhat_magnitude * np.abs(s2))
    return want, (gamma(BACKWARD_ROUNDINGS, unit) + sums_unit) * terms


def eval_expectation(dy64, invstd, gamma_, unit):
    """The evaluation backward ``dx = dy * gamma * invstd`` and its allowed error."""
    want = dy64 * per_channel(gamma_ * invstd)
    return want, gamma(BACKWARD_ROUNDINGS, unit) * np.abs(want)


def staged_expectation(dy64, x64, mean, invstd, gamma_, unit, block):
    """The staged graph's dx in float64 (its sums in partial sums of at most
    ``block`` terms, :func:`sum_block`), ``dx1 - mean(dx1)`` with
    ``dx1 = k dy - k xhat S2/M`` (``k = gamma invstd``, ``S2 = sum(dy xhat)``:
    what its stages compute), and the error its stages allow before the store.

    Each stage rounds to the compute dtype. ``dx1`` (xmu, xhat, dxhat, dxmu1,
    dsq, dxmu2, their sum) is within a few roundings of ``a = |k| (|dy| +
    |xhat| |S2|/M)``, plus what the error of ``divar = sum(dxhat xmu)`` moves
    ``dxmu2`` by: ``b = |k| |xhat| sum|dy xhat|/M`` times the sum's bound.
    ``dmu = -sum(dx1)`` carries the errors of every ``dx1`` and its own
    summation error, divided by M: the channel means of ``a`` and ``b``.
    """
    M = x64.shape[0] * x64.shape[2]
    _, xhat, xhat_magnitude = centred(x64, mean, invstd)
    k = per_channel(gamma_ * invstd)
    s2 = (dy64 * xhat).sum(axis=(0, 2), keepdims=True) / M
    dx1 = k * dy64 - k * xhat * s2
    want = dx1 - channel_mean(dx1)
    a = np.abs(k) * (np.abs(dy64) + xhat_magnitude * np.abs(s2))
    b = np.abs(k) * xhat_magnitude * channel_mean(np.abs(dy64) * xhat_magnitude)
    sums = gamma(block + PRODUCT_TERM_ROUNDINGS, unit) + 2 * gamma(M + PRODUCT_TERM_ROUNDINGS, U64)
    dmu = gamma(block + STAGED_ROUNDINGS, unit) + gamma(M + STAGED_ROUNDINGS, U64)
    slack = gamma(STAGED_ROUNDINGS, unit) * a + dmu * channel_mean(a) \
        + sums * (b + channel_mean(b))
    return want, slack


def rounding_targets(dtype):
    """Inputs whose results are exact in float32 (and float64): ``x`` (K,)
    of the 16-bit ``dtype`` (every last-bit parity, both signs, and a NaN),
    and per-channel float32 ``gamma``, ``beta`` (C,) such that each
    ``x * gamma + beta`` is a float32 value that the store must round once,
    to nearest even:

    * ``gamma = 1``, ``x`` in [1, 2) (spacing ``q``), ``beta`` in {0, q/2,
      q/2 +- a float32 ulp, q/4, 3q/4, -q/2, -(q/2 - a float32 ulp)}: values
      kept exactly, ties (to even, up and down), one float32 ulp either side
      of a tie, and plain roundings;
    * ``gamma`` a power of two into the subnormal range (ties among them),
      to half the smallest subnormal (the tie rounds to zero), and to the
      largest binade, with ``beta = q/2`` there (the tie past the largest
      value rounds to infinity).
    """
    mantissa_bits, min_exponent, max_exponent = _FORMATS[np.dtype(dtype).name]
    q = 2.0**-mantissa_bits
    ulp32 = 2.0**-23
    ks = [k for k in (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 63, 64, 96, 127,
                      255, 511, 1023) if k < 2**mantissa_bits]
    magnitudes = 1 + np.array(ks, np.float64) * q
    x = np.concatenate([magnitudes, -magnitudes, [np.nan]]).astype(dtype)
    channels = [(1.0, delta) for delta in (0.0, q / 2, q / 2 + ulp32, q / 2 - ulp32, q / 4,
                                           3 * q / 4, -q / 2, -(q / 2 - ulp32))]
    channels += [(2.0**(min_exponent - 4), 0.0),
                 (2.0**(min_exponent - mantissa_bits - 1), 0.0),
                 (2.0**max_exponent, 0.0),
                 (2.0**max_exponent, 2.0**(max_exponent - mantissa_bits - 1))]
    gamma_ = np.array([g for g, _ in channels])
    beta = np.array([b for _, b in channels])
    assert np.array_equal(gamma_.astype(np.float32), gamma_)
    assert np.array_equal(beta.astype(np.float32), beta)
    return x, gamma_, beta


def rounded_once(values32, dtype):
    """float32 values (exact) rounded once, to nearest even, into ``dtype``
    (NumPy's and ml_dtypes' float32 casts), overflow to infinity included."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values32, np.float32).astype(dtype)
