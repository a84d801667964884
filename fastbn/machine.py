"""What processor this is: model, instruction-set features and cache sizes.

The CPU backends size their blocks from these figures at import (see
:mod:`fastbn.backends.numba_cpu` and :mod:`fastbn.backends.cython_omp`), every
benchmark report names the processor that made it, and ``fastbn info`` prints
them. Everything here reads Linux's ``/proc/cpuinfo`` and
``/sys/devices/system/cpu``; elsewhere, or when a file is missing, each
figure falls back to a stated default and says so.
"""

import os
import platform

SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"
PROC_CPUINFO = "/proc/cpuinfo"

# Used when sysfs does not tell: sizes common to current x86-64 and arm64
# server cores (per-core L1d and L2, shared last level).
FALLBACK_CACHES = {"l1d": 32 * 1024, "l2": 1024 * 1024, "l3": 32 * 1024 * 1024}

# The features that change how the kernels are compiled or which paths they take.
KERNEL_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                   "avx512vl", "avx512_bf16", "avx512_fp16", "asimd", "sve")


# Instruction-set levels the Cython kernels are built for (one extension per
# level, see fastbn/backends/meson.build), from the lowest: each level is the
# flags /proc/cpuinfo must list, on top of the levels below it. x86-64-v3 and
# -v4 are the psABI's microarchitecture levels (what GCC's -march=x86-64-v3
# and -v4 may use); "baseline" is x86-64 (SSE2) or arm64 (NEON).
CPU_LEVELS = {
    "x86_64": (
        ("baseline", ()),
        # x86-64-v2's flags, then v3's own
        ("v3", ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3",
                "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")),
        ("v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
    ),
    "aarch64": (
        ("baseline", ()),
    ),
}


def cpu_levels(flags=None, machine=None):
    """The instruction-set levels this CPU runs, lowest first.

    Parameters
    ----------
    flags : iterable of str, optional
        The CPU's flags (default: :func:`cpu_flags`).
    machine : str, optional
        ``platform.machine()`` (default: this one's).

    Returns
    -------
    list of str
        Names from :data:`CPU_LEVELS` whose flags (and every lower level's)
        are all present; ``["baseline"]`` at least on a known architecture,
        ``[]`` on any other.
    """
    flags = set(cpu_flags() if flags is None else flags)
    levels = []
    for name, needed in CPU_LEVELS.get(_architecture(machine), ()):
        if not flags.issuperset(needed):
            break
        levels.append(name)
    return levels


def missing_flags(level, flags=None, machine=None):
    """The flags this CPU lacks for ``level`` (and the levels below it), sorted."""
    flags = set(cpu_flags() if flags is None else flags)
    architecture = _architecture(machine)
    missing = set()
    for name, needed in CPU_LEVELS.get(architecture, ()):
        missing.update(set(needed) - flags)
        if name == level:
            return sorted(missing)
    raise ValueError(f"unknown CPU level {level!r} for {architecture}; known: "
                     f"{', '.join(name for name, _ in CPU_LEVELS.get(architecture, ()))}")


def _architecture(machine=None):
    """``platform.machine()`` under the names of :data:`CPU_LEVELS`."""
    machine = (machine or platform.machine()).lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _parse_size(text):
    """``"48K"``, ``"2048K"``, ``"32M"`` or a plain byte count -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale


def _read(path):
    with open(path) as handle:
        return handle.read().strip()


def cache_sizes(root=SYSFS_CACHE):
    """Per-core L1 data and L2 cache sizes and the last-level cache size, in bytes.

    Parameters
    ----------
    root : str
        A directory laid out as ``/sys/devices/system/cpu/cpu0/cache``: one
        ``indexN`` folder per cache with ``level``, ``type`` and ``size``.

    Returns
    -------
    dict
        ``l1d``, ``l2``, ``l3`` (bytes; ``l3`` is the largest level present,
        so a CPU without an L3 reports its L2 there) and ``source``:
        ``"sysfs"`` when every size was read from ``root``, else
        ``"fallback"`` with :data:`FALLBACK_CACHES` for the sizes it lacked.
    """
    found = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        entries = []
    for entry in entries:
        if not entry.startswith("index"):
            continue
        folder = os.path.join(root, entry)
        try:
            level = int(_read(os.path.join(folder, "level")))
            kind = _read(os.path.join(folder, "type"))
            size = _parse_size(_read(os.path.join(folder, "size")))
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size <= 0:
            continue
        found[level] = max(size, found.get(level, 0))
    sizes = {}
    if 1 in found:
        sizes["l1d"] = found[1]
    if 2 in found:
        sizes["l2"] = found[2]
    if found and max(found) >= 2:
        sizes["l3"] = found[max(found)]
    complete = len(sizes) == 3
    for name, value in FALLBACK_CACHES.items():
        sizes.setdefault(name, value)
    sizes["source"] = "sysfs" if complete else "fallback"
    return sizes


def _cpuinfo_fields(path=PROC_CPUINFO):
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty if unreadable)."""
    fields = {}
    try:
        with open(path) as handle:
            for line in handle:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(path=PROC_CPUINFO):
    """The processor's model name, e.g. ``"AMD EPYC 7B13"`` (``platform`` when
    /proc/cpuinfo has none)."""
    fields = _cpuinfo_fields(path)
    for key in ("model name", "Model Name", "cpu model", "Processor"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags(path=PROC_CPUINFO):
    """Every instruction-set flag the kernel reports (x86 ``flags``, arm64 ``Features``)."""
    fields = _cpuinfo_fields(path)
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def cpu_count():
    """Cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average():
    """The 1-minute load average, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def describe():
    """The processor as reports and ``fastbn info`` print it.

    Returns
    -------
    dict
        ``processor`` (model name), ``machine`` (``platform.machine()``),
        ``cores`` (usable by this process), ``features`` (those of
        :data:`KERNEL_FEATURES` present), ``caches`` (:func:`cache_sizes`)
        and ``load_average`` (1 minute).
    """
    flags = cpu_flags()
    return {
        "processor": cpu_model(),
        "machine": platform.machine(),
        "cores": cpu_count(),
        "features": [name for name in KERNEL_FEATURES if name in flags],
        "caches": cache_sizes(),
        "load_average": load_average(),
    }


def summary():
    """One line naming the processor, e.g. for the header of a report:
    ``"Intel(R) Xeon(R) Processor (x86_64, 2 cores; avx2 fma f16c avx512f; L2 2 MiB, L3 300 MiB)"``."""
    facts = describe()
    caches = facts["caches"]
    features = " ".join(facts["features"]) or "no listed features"
    return (f"{facts['processor']} ({facts['machine']}, {facts['cores']} cores; {features}; "
            f"L2 {caches['l2'] / 2**20:g} MiB, L3 {caches['l3'] / 2**20:g} MiB)")
