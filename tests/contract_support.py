"""What the kernel-contract suite needs to know about each backend module.

A :class:`Spec` per backend names its module, its capabilities (device
arrays, the dtype of the gradients its fused backwards return, how its
thread count or block size is varied) and its shape classes: ``(A, C, B)``
views chosen so that each takes the loop shape or work split its name says,
with the module settings (``configure``) that make it so on any machine.
The suite takes everything backend-specific from here; the data helpers and
float64 references are in ``tests/conftest.py``.
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

    # host <-> the arrays the kernels take
    def put(self, array):
        return None if array is None else array

    def get(self, array):
        return np.asarray(array)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)


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

    def put(self, array):
        return None if array is None else self.module.to_device(array)

    def get(self, array):
        assert self.module.is_device_array(array), type(array)
        return self.module.to_host(array)

    def empty(self, shape, dtype):
        return self.module.empty(shape, dtype)


SPECS = {spec.name: spec for spec in (NumbaCpu(), CythonOmp(), NumbaCuda())}

# Backends that do not (yet) meet the contract's accuracy: float32 statistics
# are float32-accurate there (var within 1e-8, not 1e-12; a mean 1e4 times the
# spread is not centred within 1e-4).
NOT_CONTRACT = {"numpy": "float32 statistics are not accumulated in float64"}

