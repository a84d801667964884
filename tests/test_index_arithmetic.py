"""Work splits and launch grids at extents near and past 2**31 and 2**32, no large array.

The helpers that split an ``(A, C, B)`` array into work items (numba_cpu),
into blocks (the numpy backend's 16-bit path) or into a launch grid
(numba_cuda's ``_Layout``) are checked with extents an array of 2**31 or
2**32 elements would have: the items must tile every index exactly once,
with exact first offsets, counts and last sizes, and grids must stay within
CUDA's limits. Nothing of that size is allocated. The CUDA checks are plain
Python and run in the default suite and under ``NUMBA_ENABLE_CUDASIM=1``.
"""
import types

import numpy as np
import pytest

from fastbn.backends import numba_cpu, numba_cuda, numpy_backend

BIG_EXTENTS = [2**31 - 1, 2**31, 2**31 + 5, 2**32 - 1, 2**32, 2**32 + 3]
INT64_MAX = 2**63 - 1

needs_numba = pytest.mark.skipif(numba_cpu.numba is None, reason="numba is not installed")


def _assert_tiles(bounds, n):
    """[lo, hi) pairs that cover range(n) in order, each non-empty, sizes within one."""
    assert bounds[0][0] == 0
    assert bounds[-1][1] == n
    for (lo, hi), (next_lo, _) in zip(bounds, bounds[1:]):
        assert hi == next_lo
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------
# numba_cpu: shape-only work splits (Python ints) and the compiled chunk bounds
# ---------------------------------------------------------------------------

@needs_numba
@pytest.mark.parametrize("n", BIG_EXTENTS)
def test_chunks_per_channel_one_huge_channel(n):
    for shape in [(1, 1, n), (n // 1024, 1, 1024), (2, 3, n)]:
        n_split = numba_cpu._chunks_per_channel(shape)
        # few channels: TARGET_ITEMS items over the channels, limited by size
        per_channel = shape[0] * shape[2]
        wanted = -(-numba_cpu.TARGET_ITEMS // shape[1])
        assert n_split == max(1, min(wanted, per_channel // numba_cpu.MIN_ITEM_ELEMENTS))
        assert n_split * per_channel <= INT64_MAX


@needs_numba
def test_chunks_per_channel_many_channels():
    shape = (8, numba_cpu.FUSED_MIN_CHANNELS, 2**26)     # 2**35 elements
    assert numba_cpu._chunks_per_channel(shape) == 1


@needs_numba
@pytest.mark.parametrize("n", BIG_EXTENTS)
@pytest.mark.parametrize("n_chunks", [1, 7, 64, 65535])
def test_chunk_range_compiled(n, n_chunks):
    """The kernels' chunk bounds, computed by the compiled helper (int64)."""
    bounds = [numba_cpu._chunk_range(k, n, n_chunks) for k in range(n_chunks)]
    assert bounds == [(k * n // n_chunks, (k + 1) * n // n_chunks) for k in range(n_chunks)]
    _assert_tiles(bounds, n)
    last = n - (n_chunks - 1) * n // n_chunks
    assert bounds[-1][1] - bounds[-1][0] == last
    assert all(isinstance(lo, int) for lo, _ in bounds)


@needs_numba
@pytest.mark.parametrize("n", [2**31 + 5, 2**32 + 3])
def test_rows_chunks_cover_a_channel_of_rows(n):
    """_stats_rows walks chunk [m_lo, m_hi) of a channel's A*B values as row
    segments [b_lo, b_hi) of rows m_lo // B .. (m_hi - 1) // B; they must
    cover the chunk exactly."""
    B = 1024 + 3
    A = n // B + 1
    n_split = numba_cpu._chunks_per_channel((A, 1, B))
    for k in (0, 1, n_split // 2, n_split - 1):
        m_lo, m_hi = numba_cpu._chunk_range(k, A * B, n_split)
        covered = 0
        for a in range(m_lo // B, (m_hi - 1) // B + 1):
            b_lo = max(m_lo - a * B, 0)
            b_hi = min(m_hi - a * B, B)
            assert 0 <= b_lo < b_hi <= B
            covered += b_hi - b_lo
        assert covered == m_hi - m_lo


@needs_numba
@pytest.mark.parametrize("A", BIG_EXTENTS)
@pytest.mark.parametrize("J", [1, 2, 3, 256, 257])
def test_row_blocks(A, J):
    n_row_blocks = numba_cpu._row_blocks(A, J)
    column_blocks = -(-J // numba_cpu.COLUMN_BLOCK)
    wanted = -(-numba_cpu.COLUMN_ITEMS // column_blocks)
    by_size = max(1, A * min(J, numba_cpu.COLUMN_BLOCK) // numba_cpu.MIN_ITEM_ELEMENTS)
    assert n_row_blocks == max(1, min(A, wanted, by_size))
    bounds = [numba_cpu._chunk_range(k, A, n_row_blocks) for k in range(n_row_blocks)]
    _assert_tiles(bounds, A)
    # the (row block, column block) item count and the partial sums stay small
    assert n_row_blocks * column_blocks <= max(numba_cpu.COLUMN_ITEMS, column_blocks)
    assert n_row_blocks * J < 2**31


@needs_numba
@pytest.mark.parametrize("A, C, B", [(1, 1, 2**31 + 5), (8, 64, 2**22 + 1), (2, 70000, 2**15),
                                     (2**31 + 5, 1, 1), (1, 2**32 + 3, 1)])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_fused_block(A, C, B, itemsize):
    block = numba_cpu._fused_block((A, C, B), itemsize)
    assert 1 <= block <= max(1, C // numba_cpu.FUSED_MIN_CHANNELS)
    n_blocks = (C + block - 1) // block
    assert (n_blocks - 1) * block < C <= n_blocks * block
    last = C - (n_blocks - 1) * block
    assert 1 <= last <= block


@needs_numba
@pytest.mark.parametrize("A", [1, 1000, 2**31 + 5, 2**32 + 3])
@pytest.mark.parametrize("C", [257, 4096, 2**31 + 5])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_fused_cols_width(A, C, itemsize):
    x = types.SimpleNamespace(shape=(A, C, 1), itemsize=itemsize)   # shape only
    width = numba_cpu._fused_cols_width(x)
    assert width >= numba_cpu.COLUMN_BLOCK
    assert width % 16 == 0 or width == numba_cpu.COLUMN_BLOCK
    n_col_blocks = (C + width - 1) // width
    assert (n_col_blocks - 1) * width < C <= n_col_blocks * width


# ---------------------------------------------------------------------------
# numpy backend: the blocks of the 16-bit path
# ---------------------------------------------------------------------------

def _block_extent(index, shape):
    """Elements of block ``index`` of an (A, C, B) array, and its flat start."""
    A, C, B = shape
    a = index[0].indices(A)
    b = index[2].indices(B) if len(index) == 3 else (0, B, 1)
    rows = a[1] - a[0]
    cols = b[1] - b[0]
    return rows * C * cols, (a[0] * C * B + b[0])


@pytest.mark.parametrize("shape", [(1, 1, 2**31 + 5), (8, 64, 2**22 + 1), (2**31 + 5, 1, 1),
                                   (2**32 + 3, 2, 1), (3, 2**24 + 1, 2), (1, 7, 2**32 + 3)])
def test_numpy_blocks_tile_the_array(shape):
    A, C, B = shape
    blocks = numpy_backend._blocks(shape)
    sizes = [_block_extent(index, shape)[0] for index in blocks]
    assert sum(sizes) == A * C * B
    assert min(sizes) >= 1
    # a block is at most BLOCK_ELEMENTS, or one column of one row
    assert max(sizes) <= max(numpy_backend.BLOCK_ELEMENTS, C)
    # in order, without overlap: row blocks by first row, else (row, column)
    starts = [(index[0].start, index[2].start if len(index) == 3 else 0) for index in blocks]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    first = blocks[0]
    assert first[0].start == 0
    last = blocks[-1]
    assert last[0].stop == A or last[0].indices(A)[1] == A
    if len(last) == 3:
        assert last[2].indices(B)[1] == B


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(5, 3, 7), (1, 2, 101), (97, 3, 1)])
def test_numpy_blocked_path_matches_one_block(monkeypatch, dtype, shape):
    """The 16-bit path gives the same results with many small blocks as with one."""
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    C = shape[1]
    gamma = rng.uniform(0.5, 2.0, C)
    beta = rng.uniform(-1.0, 1.0, C)

    def run():
        out = np.empty(shape, dtype)
        dx = np.empty(shape, dtype)
        mean, invstd = numpy_backend.forward_train(x, gamma, beta, 1e-5, out, relu=True)
        sums = numpy_backend.backward_train(dy, x, mean, invstd, gamma, dx, beta=beta,
                                            relu=True)
        return mean, invstd, out, dx, sums

    one = run()
    monkeypatch.setattr(numpy_backend, "BLOCK_ELEMENTS", 4)
    assert len(numpy_backend._blocks(shape)) > 1
    many = run()
    # per-channel float64 sums of float32 terms, added in another order:
    # relative differences of a few float64 roundings per block
    for got, want in [(many[0], one[0]), (many[1], one[1]), (many[4][0], one[4][0]),
                      (many[4][1], one[4][1])]:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # elementwise passes: identical arithmetic per element, so equal within
    # the rounding of the (almost equal) statistics to 16 bits
    for got, want in [(many[2], one[2]), (many[3], one[3])]:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=2.0**-7, atol=2.0**-14)


# ---------------------------------------------------------------------------
# numba_cuda: launch geometry (plain Python; under the simulator too)
# ---------------------------------------------------------------------------

CUDA_SHAPES = [
    (2, 70000, 64),          # C > 65535, rows layout
    (3, 70000, 1),           # C > 65535, columns layout
    (1, 2**17 + 1, 49),      # C > 2**17, rows layout
    (1, 1, 2**31 + 5),       # one channel, one row of 2**31 + 5 values
    (2**31 + 5, 1, 1),       # one channel of 2**31 + 5 rows
    (2**32 + 3, 2, 1),       # 2**32 + 3 rows, two columns
    (2**16 + 1, 3, 2**15),   # a channel of 2**31 + 2**15 values over 65537 rows
]


@pytest.mark.parametrize("threads", [8, 256, 1024])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_layout(shape, threads):
    A, C, B = shape
    layout = numba_cuda._Layout(shape, threads)
    bx, by = layout.block
    assert bx * by == threads
    lanes, nchunks = layout.reduce_grid
    # channels (rows) or column tiles (columns) along x, never along y or z
    assert lanes == (C if layout.rows else -(-(C * B) // bx))
    assert 1 <= lanes <= numba_cuda.MAX_GRID_X
    assert 1 <= nchunks <= numba_cuda.MAX_GRID_Y
    # the reduction's row chunks tile range(A): whole blocks of by rows
    rows_per_chunk = layout.rows_per_chunk
    assert rows_per_chunk % by == 0
    assert (nchunks - 1) * rows_per_chunk < A <= nchunks * rows_per_chunk
    last = A - (nchunks - 1) * rows_per_chunk
    assert 1 <= last <= rows_per_chunk
    assert layout.partial_shape == (2, nchunks, C * layout.width)
    grid_x, grid_y = layout.elementwise_grid
    assert grid_x == lanes and 1 <= grid_y <= numba_cuda.MAX_GRID_Y
    # the largest flat index a thread forms, (a * C + c) * B + b, is the last element
    assert ((A - 1) * C + (C - 1)) * B + (B - 1) == A * C * B - 1 <= INT64_MAX


def test_cuda_grid_limits():
    assert numba_cuda._channel_blocks(70000, 8) == 8750
    assert numba_cuda._channel_blocks(2**31 + 5, 1024) == -(-(2**31 + 5) // 1024)
    with pytest.raises(ValueError, match="limit"):
        numba_cuda._channel_blocks(2**31, 1)
    with pytest.raises(ValueError, match="limit"):
        numba_cuda._Layout((1, 2**31, 64), 8)
