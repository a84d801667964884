"""Arrays past 2**31 elements on every CPU backend (marked ``huge``, not run by default).

Run with::

    FASTBN_HUGE=1 pytest -m huge -v -s tests/test_huge.py

It needs about 14 GB of free memory (three float16 arrays of 2**31 + a few
elements: ``x``, ``dy`` and one output buffer) and some minutes per case.
Each case (backend, shape) runs in its own Python process, so that a crash
(a segmentation fault, the kernel's OOM killer) fails that case instead of
ending the test run.

The three shapes put more than 2**31 elements in one array with many
channels (NCHW), in one channel, and in ``A`` (rows of an ``(N, 1)``
array). In each case the worker checks

* the training statistics (``mean``, ``invstd``) against an independent
  float64 computation made chunk by chunk, within a bound derived from the
  backends' arithmetic: 16-bit data are centred and summed in float32 blocks
  of at most ``SUM_BLOCK`` elements, merged in float64, so a sum of ``n``
  terms ``t`` is off by at most ``(SUM_BLOCK + 2) * 2**-24 * sum(|t|)``;
* the training output (plain and with the fused ReLU), the evaluation
  output and ``dx`` of the simplified backward at elements past flat index
  2**31 and at the end of the array, against float64 formulas: one rounding
  to float16 (half an ulp, at most ``2**-11 |y|``) after float32
  arithmetic, so ``|out - y| <= 2**-10 |y| + 2**-24`` (one float16 ulp,
  and the smallest subnormal);
* ``dgamma`` and ``dbeta`` of the simplified backward against float64 sums
  over chunks, within the bound above;
* the staged backward: either the same ``dx`` as above, or a ``MemoryError``
  raised before ``dx`` was touched (its full-size float32 intermediates need
  more memory than most machines have at this size).
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

N_PAST = 2**31 + 5
SHAPES = {
    # 8 * 64 * (2**22 + 1) = 2**31 + 512 elements, 2**25 + 8 per channel
    "nchw_many_channels": (8, 64, 2**22 + 1),
    # one channel of 2**31 + 5 elements, all in one row (A = 1)
    "one_channel": (1, 1, N_PAST),
    # 2**31 + 5 rows of one column: (A, C, B) = (2**31 + 5, 1, 1)
    "rows": (N_PAST, 1),
}
BACKENDS = ("numpy", "numba", "cython")
EPS = 1e-5
SUM_BLOCK = 1024                  # the longest float32 block a backend sums (numba's)
SUM_GAMMA = (SUM_BLOCK + 2) * 2.0**-24
CHUNK = 1 << 24                   # elements per chunk of the float64 reference
WINDOW = 4096                     # elements checked after 2**31 and at the end
NEEDED_BYTES = 14 * 2**30


def _available_bytes():
    from fastbn.backends import _memory
    return _memory.available_bytes()


def _selected(config):
    return os.environ.get("FASTBN_HUGE") == "1" or config.option.markexpr == "huge"


@pytest.mark.huge
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge(backend, shape_name, request):
    if not _selected(request.config):
        pytest.skip("needs ~14 GB and minutes: run with FASTBN_HUGE=1 pytest -m huge")
    import fastbn
    if backend not in fastbn.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    available = _available_bytes()
    if available is not None and available < NEEDED_BYTES:
        pytest.skip(f"needs {NEEDED_BYTES / 2**30:.0f} GiB free, {available / 2**30:.1f} GiB are")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, __file__, backend, shape_name],
                         capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - start
    print(run.stdout, end="")
    ok = run.returncode == 0 and run.stdout.rstrip().endswith("ok")
    print(f"CASE {backend:6s} {shape_name:20s} {elapsed:7.1f} s  {'ok' if ok else 'FAILED'}")
    assert ok, (f"worker exit status {run.returncode}\n--- stdout\n{run.stdout}"
                f"\n--- stderr\n{run.stderr[-4000:]}")


# ---------------------------------------------------------------------------
# The worker (run as ``python tests/test_huge.py BACKEND SHAPE``).
# ---------------------------------------------------------------------------

def _canonical(shape):
    """(A, C, B) of a channel axis 1 shape."""
    return (shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64)))


def _chunks(shape3):
    """Index tuples covering an (A, C, B) array, at most CHUNK elements each
    (or one (1, C, 1) row)."""
    A, C, B = shape3
    if C * B <= CHUNK:
        rows = CHUNK // (C * B)
        for a in range(0, A, rows):
            yield (slice(a, min(A, a + rows)),)
    else:
        width = max(1, CHUNK // C)
        for a in range(A):
            for b in range(0, B, width):
                yield (slice(a, a + 1), slice(None), slice(b, min(B, b + width)))


def _fill(flat, seed, loc, scale):
    """Fill a float16 array with a normal sample of odd period 2**20 + 7."""
    period = np.random.default_rng(seed).normal(loc, scale, 2**20 + 7).astype(np.float16)
    for lo in range(0, flat.size, period.size):
        hi = min(flat.size, lo + period.size)
        flat[lo:hi] = period[:hi - lo]


def _check_close(what, got, want, bound):
    """Assert |got - want| <= bound elementwise; print the worst ratio."""
    got = np.asarray(got, dtype=np.float64)
    error = np.abs(got - want)
    ratio = float(np.max(error / bound)) if error.size else 0.0
    print(f"  {what}: max |error| / bound = {ratio:.3g}", flush=True)
    if not (np.all(np.isfinite(got)) and np.all(error <= bound)):
        bad = int(np.argmax(np.where(np.isfinite(error), error / bound, np.inf)))
        raise AssertionError(f"{what}: element {bad}: got {got.flat[bad]!r}, "
                             f"want {want.flat[bad]!r}, bound {bound.flat[bad]!r}")


def _positions(size):
    """Flat indices checked: just before and past 2**31, and the last ones."""
    past = np.arange(2**31 - 8, min(size, 2**31 + WINDOW))
    last = np.arange(max(0, size - WINDOW), size)
    return np.unique(np.concatenate([past, last]))


def _check_output(what, out, x, mean, scale, shift, B, C, positions, relu=False):
    """out.flat[i] against float64 (x - mean) * scale + shift (max(., 0) with relu)."""
    channel = (positions // B) % C
    x64 = x.reshape(-1)[positions].astype(np.float64)
    want = (x64 - mean[channel]) * scale[channel] + shift[channel]
    if relu:
        want = np.maximum(want, 0.0)
    got = out.reshape(-1)[positions]
    _check_close(what, got, want, 2.0**-10 * np.abs(want) + 2.0**-24)


def _reference_stats(x3):
    """Per-channel float64 mean and variance (two passes over chunks), and the
    sums of |x - x0| and (x - x0)**2 that bound the backends' rounding."""
    A, C, B = x3.shape
    count = A * B
    x0 = x3[0, :, 0].astype(np.float64).reshape(1, C, 1)
    total = np.zeros(C)
    total_abs = np.zeros(C)
    total_sq = np.zeros(C)
    for index in _chunks(x3.shape):
        d = x3[index].astype(np.float64) - x0
        total += d.sum(axis=(0, 2))
        total_abs += np.abs(d).sum(axis=(0, 2))
        total_sq += (d * d).sum(axis=(0, 2))
    mean = x0.reshape(C) + total / count
    centred_sq = np.zeros(C)
    for index in _chunks(x3.shape):
        d = x3[index].astype(np.float64) - mean.reshape(1, C, 1)
        centred_sq += (d * d).sum(axis=(0, 2))
    var = centred_sq / count
    # shifted sums S1 = sum(d), S2 = sum(d*d): var = (S2 - S1**2 / M) / M
    mean_bound = SUM_GAMMA * total_abs / count
    var_bound = SUM_GAMMA * (total_sq / count + 2 * np.abs(total / count) * total_abs / count)
    return mean, var, mean_bound, var_bound


def _reference_backward_sums(dy3, x3, mean, invstd):
    """float64 sum(dy) and sum(dy * (x - mean)) * invstd over chunks, with
    their sums of absolute terms."""
    C = x3.shape[1]
    sum_dy = np.zeros(C)
    sum_dy_abs = np.zeros(C)
    sum_dy_xmu = np.zeros(C)
    sum_dy_xmu_abs = np.zeros(C)
    for index in _chunks(x3.shape):
        dy64 = dy3[index].astype(np.float64)
        xmu = x3[index].astype(np.float64) - mean.reshape(1, C, 1)
        sum_dy += dy64.sum(axis=(0, 2))
        sum_dy_abs += np.abs(dy64).sum(axis=(0, 2))
        product = dy64 * xmu
        sum_dy_xmu += product.sum(axis=(0, 2))
        sum_dy_xmu_abs += np.abs(product).sum(axis=(0, 2))
    return sum_dy, sum_dy_abs, sum_dy_xmu * invstd, sum_dy_xmu_abs * invstd


def _check_dx(what, dx, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, B, C, positions):
    """dx.flat[i] against float64 gamma * invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M)."""
    count = x.size // C
    channel = (positions // B) % C
    k = gamma[channel] * invstd[channel]
    kx = -k * invstd[channel] * sum_dy_xhat[channel] / count
    k0 = -k * sum_dy[channel] / count
    dy64 = dy.reshape(-1)[positions].astype(np.float64)
    xmu = x.reshape(-1)[positions].astype(np.float64) - mean[channel]
    want = k * dy64 + kx * xmu + k0
    # float16 rounding of the result, and a few float32 roundings of each term
    bound = 2.0**-10 * np.abs(want) + 2.0**-20 * (np.abs(k * dy64) + np.abs(kx * xmu)
                                                  + np.abs(k0)) + 2.0**-24
    _check_close(what, dx.reshape(-1)[positions], want, bound)


def _worker(backend, shape_name):
    import fastbn

    def step(name, function):
        start = time.perf_counter()
        result = function()
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
        return result

    shape = SHAPES[shape_name]
    A, C, B = _canonical(shape)
    print(f"{backend} {shape_name} {shape}: (A, C, B) = {(A, C, B)}, {A * C * B} elements",
          flush=True)
    x = np.empty(shape, np.float16)
    dy = np.empty(shape, np.float16)
    out = np.empty(shape, np.float16)
    step("fill x, dy", lambda: (_fill(x.reshape(-1), 0, 3.0, 2.0),
                                _fill(dy.reshape(-1), 1, 0.5, 1.0)))
    x3 = x.reshape(A, C, B)
    dy3 = dy.reshape(A, C, B)
    rng = np.random.default_rng(2)
    gamma = rng.uniform(0.5, 2.0, C).astype(np.float16)
    beta = rng.uniform(-1.0, 1.0, C).astype(np.float16)
    gamma64 = gamma.astype(np.float64)
    beta64 = beta.astype(np.float64)
    positions = _positions(x.size)

    ref_mean, ref_var, mean_bound, var_bound = step("float64 reference statistics",
                                                     lambda: _reference_stats(x3))

    # forward, training
    out.fill(np.nan)
    running_mean = np.zeros(C, np.float32)
    running_var = np.ones(C, np.float32)
    _, cache = step("forward train", lambda: fastbn.batchnorm_forward(
        x, gamma, beta, training=True, running_mean=running_mean, running_var=running_var,
        backend=backend, out=out))
    mean = np.asarray(cache.mean, dtype=np.float64)
    invstd = np.asarray(cache.invstd, dtype=np.float64)
    _check_close("mean", mean, ref_mean, mean_bound + 1e-300)
    ref_invstd = 1.0 / np.sqrt(ref_var + EPS)
    # d(invstd) = -invstd**3 / 2 * d(var)
    _check_close("invstd", invstd, ref_invstd, 0.5 * ref_invstd**3 * var_bound + 1e-300)
    count = A * B
    want_rm = 0.1 * ref_mean
    want_rv = 0.9 + 0.1 * ref_var * count / (count - 1)
    # float32 running statistics: one float32 rounding of each
    _check_close("running_mean", running_mean, want_rm,
                 0.1 * mean_bound + 2.0**-23 * np.abs(want_rm) + 1e-300)
    _check_close("running_var", running_var, want_rv,
                 0.1 * var_bound + 2.0**-23 * np.abs(want_rv))
    _check_output("forward train out", out, x, mean, invstd * gamma64, beta64, B, C, positions)

    # forward, training, fused ReLU
    out.fill(np.nan)
    _, cache_relu = step("forward train relu", lambda: fastbn.batchnorm_forward(
        x, gamma, beta, training=True, backend=backend, out=out, activation="relu"))
    _check_output("forward relu out", out, x, np.asarray(cache_relu.mean, np.float64),
                  np.asarray(cache_relu.invstd, np.float64) * gamma64, beta64, B, C, positions,
                  relu=True)

    # forward, evaluation (running statistics of the training call)
    out.fill(np.nan)
    step("forward eval", lambda: fastbn.batchnorm_forward(
        x, gamma, beta, training=False, running_mean=running_mean, running_var=running_var,
        backend=backend, out=out))
    eval_mean = running_mean.astype(np.float64)
    eval_invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + EPS)
    _check_output("forward eval out", out, x, eval_mean, eval_invstd * gamma64, beta64, B, C,
                  positions)

    # backward, simplified
    ref_dbeta, dbeta_abs, ref_dgamma, dgamma_abs = step(
        "float64 reference backward sums",
        lambda: _reference_backward_sums(dy3, x3, mean, invstd))
    out.fill(np.nan)
    dx, dgamma, dbeta = step("backward simplified", lambda: fastbn.batchnorm_backward(
        dy, cache, method="simplified", out=out))
    # dgamma/dbeta are float32 for 16-bit storage: one more float32 rounding
    _check_close("dbeta", dbeta, ref_dbeta,
                 SUM_GAMMA * dbeta_abs + 2.0**-23 * np.abs(ref_dbeta) + 1e-300)
    _check_close("dgamma", dgamma, ref_dgamma,
                 SUM_GAMMA * dgamma_abs + 2.0**-23 * np.abs(ref_dgamma) + 1e-300)
    _check_dx("backward simplified dx", out, dy, x, mean, invstd, gamma64, ref_dbeta,
              ref_dgamma, B, C, positions)

    # backward, staged: dx, or a MemoryError before dx is touched
    out.fill(np.nan)
    try:
        step("backward staged", lambda: fastbn.batchnorm_backward(
            dy, cache, method="staged", out=out))
    except MemoryError as error:
        print(f"  backward staged: MemoryError: {error}", flush=True)
        assert np.all(np.isnan(out.reshape(-1)[positions])), "dx touched before MemoryError"
    else:
        _check_dx("backward staged dx", out, dy, x, mean, invstd, gamma64, ref_dbeta,
                  ref_dgamma, B, C, positions)
    print("ok", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
