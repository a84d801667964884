"""Kernel plans, and wisdom: the plans measured fastest on this machine.

A *plan* holds every choice a CPU kernel makes for a call: its strategy
(for example one fused pass over cache-sized slabs, or two passes), block
and slab sizes, and how the work is split. Each backend names its plan
fields and computes its *default plan* from the shape and this machine's
caches (today's heuristics). Plans change speed and, since they change
the order of summation, may change the last bits of a result; the same
plan gives the same bits run to run and for any thread count.

A plan is chosen per *call class*: backend, layout class (``"nd"`` for
``(N, D)`` arrays, ``"short"`` for ``(N, C, ...)`` with rows shorter than
:data:`SHORT_ROW`, ``"medium"`` with rows shorter than :data:`LONG_ROW`,
``"rows"`` with longer rows), size class (the bytes of ``x``
within ``"l2"``, within the last-level share ``"llc"``, or ``"memory"``
beyond), dtype, and pass (``"forward"`` training, ``"eval"``, ``"backward"``).

``fastbn tune`` times candidate plans with the timing core and writes the
winners as *wisdom*: a JSON file in the user's cache directory
(``$XDG_CACHE_HOME/fastbn/wisdom.json``, else ``~/.cache/fastbn/...``),
keyed by this machine (:func:`machine_key`: processor model, features,
cache sizes, cores, fastbn's version and the backends' builds). At import,
wisdom is used only when its key matches this machine; otherwise it is
ignored and :func:`status` says why. ``FASTBN_WISDOM=off`` ignores any
wisdom (the default plans, pinned), ``FASTBN_WISDOM=/path/file.json`` reads
and writes another file.

``set_tuning("measure")`` (like ``torch.backends.cudnn.benchmark``) times
the candidates on the first call of a new call class and keeps the winner
for the process; it is off by default.
"""
import contextlib
import json
import os

import numpy as np

from . import machine

WISDOM_ENV = "FASTBN_WISDOM"
WISDOM_FORMAT = 1
PASSES = ("forward", "eval", "backward")
# The full-size arrays each pass streams: x and out; dy, x and out.
PASS_ARRAYS = {"forward": 2, "eval": 2, "backward": 3}
# Rows (the B axis of the (A, C, B) view) shorter than this are a layout class
# of their own: their loops are short and their best split differs.
SHORT_ROW = 64
# Rows shorter than this (and not short) are the "medium" class: the default
# plans change at this length (the backends fuse, and numba reduces by rows,
# only rows of at least 256 values), so that the shapes of a class mostly
# share their default plan, and tune can keep another plan for the medium
# rows (e.g. (N, 256, 14, 14)) without moving the long ones.
LONG_ROW = 256
TUNING_MODES = ("off", "measure")

_state = {"loaded": False, "builds": {}, "wisdom": {}, "source": None,
          "reason": "not loaded yet", "measured": {}, "forced": {}, "tuning": "off",
          "generation": 0}


def _changed():
    """Count a change of the stored plans or of the tuning mode: a backend
    that keeps its calls' plans (see :func:`generation`) makes them again."""
    _state["generation"] += 1


def generation():
    """A number that changes whenever the plan a call gets may change (wisdom
    loaded or forgotten, a plan forced or measured, the tuning mode set).
    Backends keep the plans of their calls' shapes while it stays the same."""
    return _state["generation"]


def layout_class(shape):
    """``"nd"``, ``"short"``, ``"medium"`` or ``"rows"`` for an ``(A, C, B)`` shape."""
    B = shape[2]
    if B == 1:
        return "nd"
    if B < SHORT_ROW:
        return "short"
    return "medium" if B < LONG_ROW else "rows"


def _machine_caches():
    """This machine's cache sizes, read once (reading sysfs takes ~0.5 ms)."""
    if "caches" not in _state:
        _state["caches"] = machine.cache_sizes()
    return _state["caches"]


def size_class(nbytes, caches=None):
    """``"l2"``, ``"llc"`` or ``"memory"``: where an array of ``nbytes`` fits.

    The last-level share is all of L3, or 16 L2s' worth where L3 is shared by
    more cores (or virtual machines) than that.
    """
    caches = caches or _machine_caches()
    if nbytes <= caches["l2"]:
        return "l2"
    if nbytes <= min(caches["l3"], 16 * caches["l2"]):
        return "llc"
    return "memory"


def call_class(shape, dtype_name, pass_name, itemsize):
    """The call class of a kernel call, as a string key: ``"rows/llc/float32/backward"``."""
    if pass_name not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")
    nbytes = shape[0] * shape[1] * shape[2] * itemsize
    return f"{layout_class(shape)}/{size_class(nbytes)}/{dtype_name}/{pass_name}"


def machine_key(builds):
    """What wisdom is valid for.

    Parameters
    ----------
    builds : dict
        ``backend -> str`` naming each backend's build (its compiler target,
        the variant of its extension).

    Returns
    -------
    dict
    """
    from . import __version__

    facts = machine.describe()
    caches = {name: facts["caches"][name] for name in ("l1d", "l2", "l3")}
    return {"processor": facts["processor"], "machine": facts["machine"],
            "features": sorted(machine.cpu_flags()), "caches": caches,
            "cores": facts["cores"], "fastbn": __version__, "builds": dict(builds)}


def wisdom_path():
    """The wisdom file (None when ``FASTBN_WISDOM=off``)."""
    value = os.environ.get(WISDOM_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastbn", "wisdom.json")


def _differences(stored, current):
    return sorted(name for name in set(stored) | set(current)
                  if stored.get(name) != current.get(name))


def load(builds):
    """Read the wisdom file, if its key matches this machine; see :func:`status`.

    Parameters
    ----------
    builds : dict
        ``backend -> build`` of the backends to read plans for: a backend's
        plans are kept when the file's key names the same build.
    """
    _state.update(loaded=True, builds=dict(builds), wisdom={}, source=None)
    _changed()
    path = wisdom_path()
    if path is None:
        _state["reason"] = f"{WISDOM_ENV}=off: default plans"
        return
    _state["source"] = path
    try:
        with open(path, encoding="utf-8") as file:
            stored = json.load(file)
    except FileNotFoundError:
        _state["reason"] = f"no wisdom file at {path} (run fastbn tune): default plans"
        return
    except (OSError, ValueError) as exc:
        _state["reason"] = f"wisdom file {path} unreadable ({exc}): default plans"
        return
    if not isinstance(stored, dict) or stored.get("format") != WISDOM_FORMAT:
        _state["reason"] = f"wisdom file {path} has another format: default plans"
        return
    stored_key = stored.get("key", {})
    changed = [name for name in _differences(stored_key, machine_key(builds)) if name != "builds"]
    stored_builds = stored_key.get("builds", {})
    other_build = sorted(name for name in stored.get("plans", {})
                         if name in builds and stored_builds.get(name) != builds[name])
    if changed or other_build:
        what = ", ".join(changed + (["builds"] if other_build else []))
        _state["reason"] = (f"wisdom file {path} is for another machine or build ({what} "
                            f"differ): default plans")
        return
    _state["wisdom"] = {name: classes for name, classes in stored.get("plans", {}).items()
                        if name in builds}
    _changed()
    _state["reason"] = f"wisdom from {path}"


def status():
    """Whether wisdom is in use, from which file, and why (or why not).

    Returns
    -------
    dict
        ``in_use`` (bool), ``file`` (str or None), ``reason`` (str),
        ``tuning`` (:func:`set_tuning`'s mode) and ``classes`` (the number
        of call classes with a stored plan, per backend).
    """
    return {"in_use": bool(_state["wisdom"]), "file": _state["source"],
            "reason": _state["reason"], "tuning": _state["tuning"],
            "classes": {backend: len(plans) for backend, plans in _state["wisdom"].items()}}


def save(builds, plans, path=None):
    """Write ``plans`` (``backend -> {call class -> plan}``) as wisdom, merged
    with what the file already holds for this machine; returns the path.

    A plan of None (the default plan won) removes the class's stored plan:
    each shape of the class then takes its own default plan.
    """
    path = path or wisdom_path()
    if path is None:
        raise ValueError(f"{WISDOM_ENV}=off: there is no wisdom file to write")
    merged, merged_builds = {}, {}
    try:
        with open(path, encoding="utf-8") as file:
            stored = json.load(file)
        stored_key = stored.get("key", {})
        same_machine = not [name for name in _differences(stored_key, machine_key(builds))
                            if name != "builds"]
        if stored.get("format") == WISDOM_FORMAT and same_machine:
            # keep every backend's plans measured with the build it has now
            # (the other backends' builds are not checked here)
            merged_builds = dict(stored_key.get("builds", {}))
            merged = {name: classes for name, classes in stored.get("plans", {}).items()
                      if name in merged_builds and builds.get(name, merged_builds[name])
                      == merged_builds[name]}
    except (OSError, ValueError, AttributeError):
        pass
    merged_builds.update(builds)
    key = machine_key(merged_builds)
    for backend, classes in plans.items():
        kept = merged.setdefault(backend, {})
        for call, plan in classes.items():
            if plan is None:
                kept.pop(call, None)    # the default plan won: nothing stored
            else:
                kept[call] = plan
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump({"format": WISDOM_FORMAT, "key": key, "plans": merged}, file, indent=1,
                  sort_keys=True)
    os.replace(temporary, path)      # readers never see half a file
    return path


def set_tuning(mode):
    """``"measure"``: time candidate plans on the first call of each new call
    class and keep the winner for this process; ``"off"`` (the default):
    use wisdom or the default plans."""
    if mode not in TUNING_MODES:
        raise ValueError(f"tuning mode must be one of {TUNING_MODES}, got {mode!r}")
    _state["tuning"] = mode
    _changed()


def tuning_mode():
    """The mode :func:`set_tuning` set."""
    return _state["tuning"]


def stored_plan(backend, key):
    """The plan for a call class: forced (:func:`forced`), measured in this
    process, or kept as wisdom; None when there is none (the default plan)."""
    forced_plan = _state["forced"].get((backend, key))
    if forced_plan is not None:
        return forced_plan
    measured = _state["measured"].get((backend, key))
    if measured is not None:
        return measured
    return _state["wisdom"].get(backend, {}).get(key)


# call -> call class, for lookup (a call class is computed once per call shape)
_keys = {}


def builds():
    """``backend -> build`` of every available backend that has plans (what
    wisdom is keyed by, with :func:`machine_key`)."""
    from . import registry

    found = {}
    for name in registry.available_backends():
        module = registry.get_backend(name)
        if hasattr(module, "plan_build"):
            found[name] = module.plan_build()
    return found


def lookup(backend, build, shape, dtype, pass_name):
    """The plan a kernel call uses, or None for the backend's default plan.

    The backends call this on every call of a planned kernel, so it returns
    at once while no plan is stored. Wisdom is read on a backend's first
    call, for its build.
    With ``set_tuning("measure")``, the first call of a call class with no
    stored plan times the candidates (:func:`fastbn.tune.measure`) and keeps
    the winner.

    Parameters
    ----------
    backend : str
    build : str
        The backend's ``plan_build()``.
    shape : tuple of int
        ``(A, C, B)``.
    dtype : numpy.dtype or str
        The storage dtype (``"float32"``, bfloat16, ...). Its name is read
        only on a call class's first call: ``dtype.name`` is a Python
        property, slow on a hot path.
    pass_name : {"forward", "eval", "backward"}
    """
    if not _state["loaded"] or backend not in _state["builds"]:
        load({**_state["builds"], backend: build})
    if not (_state["forced"] or _state["measured"] or _state["wisdom"].get(backend)
            or _state["tuning"] == "measure"):
        return None
    call = (tuple(shape), dtype, pass_name)
    key = _keys.get(call)
    if key is None:
        dtype = np.dtype(dtype)
        key = _keys[call] = call_class(shape, dtype.name, pass_name, dtype.itemsize)
    plan = stored_plan(backend, key)
    if plan is None and _state["tuning"] == "measure" and not _state["forced"]:
        from . import tune

        plan = tune.measure(backend, key, shape, np.dtype(dtype).name, pass_name)
        remember(backend, key, plan)
    return plan or None          # {}: measured, and the default won


def remember(backend, key, plan):
    """Keep a plan measured in this process (``set_tuning("measure")``)."""
    _state["measured"][(backend, key)] = dict(plan)
    _changed()


@contextlib.contextmanager
def forced(backend, key, plan):
    """Within the block, calls of ``backend`` in call class ``key`` use ``plan``
    (how ``fastbn tune`` and the tests run a candidate)."""
    previous = _state["forced"].get((backend, key))
    _state["forced"][(backend, key)] = plan
    _changed()
    try:
        yield
    finally:
        if previous is None:
            del _state["forced"][(backend, key)]
        else:
            _state["forced"][(backend, key)] = previous
        _changed()


def forget():
    """Drop the plans measured in this process and any wisdom loaded (tests)."""
    _state.update(loaded=False, builds={}, wisdom={}, source=None, reason="not loaded yet",
                  measured={})
    _changed()
