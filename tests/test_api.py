"""The public API of DESIGN.md: registry, use_backend, backend_info, out=,
layouts, the cache object, inputs never modified, threads."""
import concurrent.futures

import numpy as np
import pytest

import fastbn
from conftest import (BACKENDS, CUDASIM, Snapshot, assert_close, make_input, make_params,
                      make_running, ref_backward, ref_forward, tol_for)

KNOWN = ("numba", "cython", "numpy", "cuda")


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------
def test_public_names():
    for name in ("batchnorm_forward", "batchnorm_backward", "available_backends",
                 "set_backend", "use_backend", "backend_info", "gradcheck"):
        assert hasattr(fastbn, name), name
    for name in ("rel_error", "eval_numerical_gradient", "eval_numerical_gradient_array"):
        assert callable(getattr(fastbn.gradcheck, name)), name
    from fastbn.compat import cs231n
    for name in ("batchnorm_forward", "batchnorm_backward", "batchnorm_backward_alt",
                 "spatial_batchnorm_forward", "spatial_batchnorm_backward"):
        assert callable(getattr(cs231n, name)), name


def test_available_backends():
    names = fastbn.available_backends()
    assert isinstance(names, tuple)
    assert all(isinstance(n, str) for n in names)
    assert len(set(names)) == len(names)
    assert "numpy" in names  # the reference backend always runs
    assert set(names) <= set(KNOWN)
    cpu = [n for n in names if n != "cuda"]
    # fastest CPU first: compiled backends before numpy
    assert cpu[-1] == "numpy"


def test_backend_info():
    info = fastbn.backend_info()
    assert isinstance(info, dict)
    assert set(KNOWN) <= set(info)
    avail = set(fastbn.available_backends())
    for name, entry in info.items():
        assert isinstance(entry["available"], bool), name
        assert entry["available"] == (name in avail), name
        if entry["available"]:
            assert isinstance(entry["threads"], int) and entry["threads"] >= 1, name
            assert isinstance(entry["openmp"], bool), name
            assert isinstance(entry["device"], str) and entry["device"], name
        else:
            assert isinstance(entry["reason"], str) and entry["reason"], name


def test_explicit_backend_recorded_in_cache(backend, rng):
    x = make_input(rng, (6, 3))
    _, cache = fastbn.batchnorm_forward(x, backend=backend)
    assert cache.backend == backend


def _default_backend():
    _, cache = fastbn.batchnorm_forward(np.arange(6.0).reshape(3, 2))
    return cache.backend


def test_default_is_fastest_cpu_backend():
    assert _default_backend() == [n for n in fastbn.available_backends() if n != "cuda"][0]


def test_use_backend_block(backend):
    before = _default_backend()
    with fastbn.use_backend(backend):
        assert _default_backend() == backend
        with fastbn.use_backend("numpy"):
            assert _default_backend() == "numpy"
        assert _default_backend() == backend
    assert _default_backend() == before


def test_use_backend_restores_after_exception(backend):
    before = _default_backend()
    with pytest.raises(KeyError):
        with fastbn.use_backend(backend):
            raise KeyError("boom")
    assert _default_backend() == before


def test_set_backend(backend):
    before = _default_backend()
    try:
        fastbn.set_backend(backend)
        assert _default_backend() == backend
        # the explicit argument wins over the default
        _, cache = fastbn.batchnorm_forward(np.ones((3, 2)) * np.arange(3)[:, None],
                                            backend="numpy")
        assert cache.backend == "numpy"
    finally:
        fastbn.set_backend(before)
    assert _default_backend() == before


def test_repeated_calls_of_one_kind_are_checked_like_the_first(backend, rng):
    """A kind of call (shape, dtype, options, backend) is checked once; what
    may change between calls of that kind must still be read and checked on
    every call: the default backend, the per-channel arrays, ``out``."""
    x = rng.standard_normal((4, 3, 5))
    gamma, beta = np.full(3, 2.0), np.ones(3)
    if backend == "cuda":
        pytest.skip("host arrays on a host backend")
    with fastbn.use_backend(backend):
        first = fastbn.batchnorm_forward(x, gamma, beta)
        assert first[1].backend == backend
        with fastbn.use_backend("numpy"):
            assert fastbn.batchnorm_forward(x, gamma, beta)[1].backend == "numpy"
        again = fastbn.batchnorm_forward(x, gamma, beta)
        assert again[1].backend == backend
        np.testing.assert_array_equal(again[0], first[0])   # one plan, one rounding
        gamma[:] = 3.0   # values are read per call
        scaled = fastbn.batchnorm_forward(x, gamma, beta)[0]
        np.testing.assert_allclose(scaled - 1.0, (first[0] - 1.0) * 1.5, rtol=1e-13,
                                   atol=1e-13)
        with pytest.raises(ValueError, match="gamma must have shape"):
            fastbn.batchnorm_forward(x, np.ones(4), beta)
        with pytest.raises(ValueError, match="out must have shape"):
            fastbn.batchnorm_forward(x, gamma, beta, out=np.empty((4, 3, 4)))
        with pytest.raises(ValueError, match="running_mean must have shape"):
            fastbn.batchnorm_forward(x, gamma, beta, running_mean=np.zeros(2),
                                     running_var=np.ones(3))
        with pytest.raises(ValueError, match="momentum"):
            fastbn.batchnorm_forward(x, gamma, beta, momentum=1.5)
        with pytest.raises(ValueError, match="eps"):
            fastbn.batchnorm_forward(x, gamma, beta, eps=0.0)


def test_backward_runs_on_cache_backend(backend, rng):
    """The cache remembers its backend; a different default does not change the result."""
    x = make_input(rng, (8, 3, 4))
    dout = rng.standard_normal(x.shape)
    _, cache = fastbn.batchnorm_forward(x, backend=backend)
    want = fastbn.batchnorm_backward(dout, cache)
    other = "numpy" if backend != "numpy" else fastbn.available_backends()[0]
    with fastbn.use_backend(other):
        got = fastbn.batchnorm_backward(dout, cache)
    assert cache.backend == backend
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------
# the cache object
# ---------------------------------------------------------------------------
def _attributes(obj):
    names = set()
    for klass in type(obj).__mro__:
        names.update(getattr(klass, "__slots__", ()))
    names.update(getattr(obj, "__dict__", {}))
    names.update(n for n in dir(obj) if not n.startswith("__"))
    for name in sorted(names):
        try:
            yield name, getattr(obj, name)
        except AttributeError:
            continue


def _arrays_in(value, depth=0):
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        yield value
    elif isinstance(value, (list, tuple)) and depth < 3:
        for v in value:
            yield from _arrays_in(v, depth + 1)
    elif isinstance(value, dict) and depth < 3:
        for v in value.values():
            yield from _arrays_in(v, depth + 1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", [((8, 5), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)],
                         ids=["ND", "NCHW", "NHWC"])
def test_cache_contents(backend, rng, training, shape, axis):
    C = shape[axis]
    x = make_input(rng, shape, axis=axis)
    gamma, beta = make_params(rng, C)
    rm, rv = make_running(rng, C)
    eps = 3e-4
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm,
                                          running_var=rv, eps=eps, axis=axis, backend=backend)
    assert not isinstance(cache, (tuple, list, dict))
    assert cache.x is x
    ref = ref_forward(x, gamma, beta, training=training, running_mean=rm, running_var=rv,
                      eps=eps, axis=axis)
    host = lambda a: a if isinstance(a, np.ndarray) else a.copy_to_host()
    assert tuple(cache.mean.shape) == (C,) and tuple(cache.invstd.shape) == (C,)
    np.testing.assert_allclose(host(cache.mean), ref["mean"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(host(cache.invstd), ref["invstd"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(host(cache.gamma), np.float64), gamma, rtol=1e-15)
    assert cache.eps == eps
    assert cache.axis % x.ndim == axis % x.ndim
    assert cache.backend == backend
    _, other = fastbn.batchnorm_forward(x, training=not training, running_mean=rm.copy(),
                                        running_var=rv.copy(), axis=axis, backend=backend)
    assert cache.mode != other.mode
    # no full-size intermediates: nothing but x has x's size
    for name, value in _attributes(cache):
        if name == "x":
            continue
        for arr in _arrays_in(value):
            assert int(np.prod(arr.shape)) < x.size, f"cache.{name} has a full-size array"


def test_cache_references_x_for_float32_and_readonly(backend, rng):
    x = make_input(rng, (6, 4, 3), dtype=np.float32)
    x.flags.writeable = False
    _, cache = fastbn.batchnorm_forward(x, backend=backend)
    assert cache.x is x


# ---------------------------------------------------------------------------
# out=
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", ["simplified", "staged"])
def test_out_buffers(backend, rng, dtype, training, method):
    shape = (4, 3, 5, 2)
    x = make_input(rng, shape, dtype=dtype)
    gamma, beta = make_params(rng, 3, dtype)
    rm, rv = make_running(rng, 3, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    out_buf = np.full(shape, np.nan, dtype)
    res, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm.copy(),
                                          running_var=rv.copy(), out=out_buf, backend=backend)
    assert res is out_buf
    want, cache2 = fastbn.batchnorm_forward(x, gamma, beta, training=training,
                                            running_mean=rm.copy(), running_var=rv.copy(),
                                            backend=backend)
    np.testing.assert_array_equal(out_buf, want)
    dx_buf = np.full(shape, np.nan, dtype)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method, out=dx_buf)
    assert dx is dx_buf
    dx2, dgamma2, dbeta2 = fastbn.batchnorm_backward(dout, cache2, method=method)
    np.testing.assert_array_equal(dx_buf, dx2)
    np.testing.assert_array_equal(dgamma, dgamma2)
    np.testing.assert_array_equal(dbeta, dbeta2)


def test_out_for_noncontiguous_and_channels_last(backend, rng):
    base = make_input(rng, (6, 4, 5, 8))
    x = base[:, :, :, ::2]                      # non-contiguous
    out_buf = np.empty(x.shape)
    res, cache = fastbn.batchnorm_forward(x, out=out_buf, backend=backend)
    assert res is out_buf
    assert_close(out_buf, ref_forward(x)["out"], 1e-12, "out")
    xl = make_input(rng, (3, 4, 5, 6), axis=-1)
    out_buf = np.empty(xl.shape)
    res, _ = fastbn.batchnorm_forward(xl, axis=-1, out=out_buf, backend=backend)
    assert res is out_buf
    assert_close(out_buf, ref_forward(xl, axis=-1)["out"], 1e-12, "out")


# ---------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------
LAYOUTS = [(16, 6), (4, 3, 10), (4, 3, 5, 6), (2, 3, 2, 3, 4)]


@pytest.mark.parametrize("shape", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layouts_vs_reference(backend, rng, shape, dtype):
    C = shape[1]
    x = make_input(rng, shape, dtype=dtype, shift=3.0)
    gamma, beta = make_params(rng, C, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, ref_forward(x, gamma, beta)["out"], tol_for(dtype), "out")
    want = ref_backward(dout, x, gamma)
    for method in ("simplified", "staged"):
        for name, g, w in zip(("dx", "dgamma", "dbeta"),
                              fastbn.batchnorm_backward(dout, cache, method=method), want):
            assert g.dtype == x.dtype and g.shape == w.shape
            assert_close(g, w, tol_for(dtype), f"{method} {name}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("channels_last_axis", [-1, 3])
def test_channels_last_matches_nchw(backend, rng, dtype, channels_last_axis):
    x = make_input(rng, (3, 4, 5, 6), dtype=dtype, shift=1.0)
    gamma, beta = make_params(rng, 4, dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    rm1, rv1 = make_running(rng, 4, dtype)
    rm2, rv2 = rm1.copy(), rv1.copy()
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, running_mean=rm1, running_var=rv1,
                                          backend=backend)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    d_nhwc = np.ascontiguousarray(dout.transpose(0, 2, 3, 1))
    out_l, cache_l = fastbn.batchnorm_forward(x_nhwc, gamma, beta, running_mean=rm2,
                                              running_var=rv2, axis=channels_last_axis,
                                              backend=backend)
    assert cache_l.x is x_nhwc
    tol = tol_for(dtype)
    assert_close(out_l.transpose(0, 3, 1, 2), out, tol, "out")
    assert_close(rm2, rm1, tol, "running_mean")
    assert_close(rv2, rv1, tol, "running_var")
    for method in ("simplified", "staged"):
        g = fastbn.batchnorm_backward(dout, cache, method=method)
        g_l = fastbn.batchnorm_backward(d_nhwc, cache_l, method=method)
        assert_close(g_l[0].transpose(0, 3, 1, 2), g[0], tol, "dx")
        assert_close(g_l[1], g[1], tol, "dgamma")
        assert_close(g_l[2], g[2], tol, "dbeta")


def _noncontiguous_cases(rng):
    base = make_input(rng, (8, 6, 5, 4))
    return {
        "slice_batch": (base[::2], 1),
        "slice_channels": (base[:, ::2], 1),
        "slice_spatial": (base[:, :, 1:4, ::3], 1),
        "transpose_nhwc": (base.transpose(0, 2, 3, 1), -1),
        "fortran": (np.asfortranarray(base), 1),
        "transpose_2d": (make_input(rng, (5, 12)).T, 1),
        "negative_stride": (base[::-1, :, ::-1], 1),
    }


@pytest.mark.parametrize("case", ["slice_batch", "slice_channels", "slice_spatial",
                                  "transpose_nhwc", "fortran", "transpose_2d",
                                  "negative_stride"])
def test_noncontiguous_inputs(backend, rng, case):
    x, axis = _noncontiguous_cases(rng)[case]
    C = x.shape[axis]
    gamma, beta = make_params(rng, C)
    dout_base = rng.standard_normal(x.shape[::-1])
    dout = dout_base.T                           # non-contiguous too
    snap = Snapshot(x=x, gamma=gamma, beta=beta, dout=dout)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, axis=axis, backend=backend)
    assert_close(out, ref_forward(x, gamma, beta, axis=axis)["out"], 1e-12, "out")
    want = ref_backward(dout, x, gamma, axis=axis)
    for method in ("simplified", "staged"):
        for name, g, w in zip(("dx", "dgamma", "dbeta"),
                              fastbn.batchnorm_backward(dout, cache, method=method), want):
            assert_close(g, w, 1e-11, f"{method} {name}")
    snap.assert_unchanged()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_readonly_inputs(backend, rng, training):
    x = make_input(rng, (6, 3, 4))
    gamma, beta = make_params(rng, 3)
    rm, rv = make_running(rng, 3)
    dout = rng.standard_normal(x.shape)
    for a in (x, gamma, beta, dout):
        a.flags.writeable = False
    if not training:
        rm.flags.writeable = False
        rv.flags.writeable = False
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm,
                                          running_var=rv, backend=backend)
    ref = ref_forward(x, gamma, beta, training=training, running_mean=rm, running_var=rv)
    assert_close(out, ref["out"], 1e-12, "out")
    assert out.flags.writeable
    want = ref_backward(dout, x, gamma, training=training, running_mean=rm, running_var=rv)
    for method in ("simplified", "staged"):
        for g, w in zip(fastbn.batchnorm_backward(dout, cache, method=method), want):
            assert_close(g, w, 1e-11, method)


# ---------------------------------------------------------------------------
# what successful calls modify
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inputs_never_modified_running_stats_in_place(backend, rng, dtype, training):
    x = make_input(rng, (5, 4, 3, 2), dtype=dtype)
    gamma, beta = make_params(rng, 4, dtype)
    rm, rv = make_running(rng, 4, dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    snap = Snapshot(x=x, gamma=gamma, beta=beta, dout=dout)
    rm0, rv0 = rm.copy(), rv.copy()
    rm_id, rv_id = id(rm), id(rv)
    _, cache = fastbn.batchnorm_forward(x, gamma, beta, training=training, running_mean=rm,
                                        running_var=rv, backend=backend)
    for method in ("simplified", "staged"):
        fastbn.batchnorm_backward(dout, cache, method=method)
    snap.assert_unchanged()
    assert id(rm) == rm_id and id(rv) == rv_id
    assert rm.dtype == np.dtype(dtype) and rv.dtype == np.dtype(dtype)
    if training:
        assert not np.array_equal(rm, rm0) and not np.array_equal(rv, rv0)
        ref = ref_forward(x, gamma, beta, running_mean=rm0, running_var=rv0)
        assert_close(rm, ref["running_mean"], tol_for(dtype), "running_mean")
        assert_close(rv, ref["running_var"], tol_for(dtype), "running_var")
    else:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)


def test_running_stats_views_updated_in_place(backend, rng):
    """Running stats that are views into a larger buffer are written through."""
    x = make_input(rng, (10, 3))
    store = np.zeros((2, 6))
    rm, rv = store[0, ::2], store[1, 1::2]
    rv[...] = 1.0
    fastbn.batchnorm_forward(x, running_mean=rm, running_var=rv, backend=backend)
    np.testing.assert_allclose(store[0, ::2], 0.1 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(store[1, 1::2], 0.9 + 0.1 * x.var(axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(store[0, 1::2], 0.0)
    np.testing.assert_array_equal(store[1, ::2], 0.0)


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------
def _work(backend, x, gamma, beta, dout, method):
    rm, rv = np.zeros(x.shape[1], x.dtype), np.ones(x.shape[1], x.dtype)
    out, cache = fastbn.batchnorm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                          backend=backend)
    dx, dgamma, dbeta = fastbn.batchnorm_backward(dout, cache, method=method)
    return out, dx, dgamma, dbeta, rm, rv


def test_threads_match_serial(backend, rng):
    jobs = []
    for i in range(8 if CUDASIM else 16):
        dtype = np.float32 if i % 2 else np.float64
        shape = ([(8, 3), (2, 3, 2, 3), (2, 3, 3, 2)] if CUDASIM
                 else [(32, 7), (4, 6, 8, 5), (3, 5, 7, 9)])[i % 3]
        x = make_input(rng, shape, dtype=dtype, shift=float(i))
        gamma, beta = make_params(rng, shape[1], dtype)
        dout = rng.standard_normal(shape).astype(dtype)
        jobs.append((backend, x, gamma, beta, dout, ("simplified", "staged")[i % 2]))
    serial = [_work(*job) for job in jobs]
    for _ in range(1 if CUDASIM else 3):
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(pool.map(lambda job: _work(*job), jobs))
        for s, p in zip(serial, parallel):
            for a, b in zip(s, p):
                np.testing.assert_array_equal(a, b)


def test_threads_mixed_backends(rng):
    """All tested backends at once, from 4 threads."""
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    jobs = []
    for i in range(12):
        x = make_input(rng, (6, 4, 5, 3))
        gamma, beta = make_params(rng, 4)
        dout = rng.standard_normal(x.shape)
        jobs.append((BACKENDS[i % len(BACKENDS)], x, gamma, beta, dout, "simplified"))
    serial = [_work(*job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda job: _work(*job), jobs))
    for s, p in zip(serial, parallel):
        for a, b in zip(s, p):
            np.testing.assert_array_equal(a, b)
