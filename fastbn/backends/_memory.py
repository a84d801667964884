"""A check, before allocating, that large temporaries fit in memory.

Linux overcommits memory: ``np.empty`` of more bytes than the machine (or
the container's memory cgroup) has left usually succeeds, and the process is
killed later, when the pages are touched. Kernels that allocate full-size
temporaries (the staged backward) ask :func:`require` first, so that a call
too large for the machine raises ``MemoryError`` before it touches any
memory.
"""
import os

# Where the cgroup file systems are mounted, and this process's cgroups.
CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"
# A cgroup limit at or above this many bytes means "no limit" (cgroup v1
# reports an unlimited group as the largest page-aligned signed 64-bit value).
_UNLIMITED = 2**60


def available_bytes():
    """Memory a new allocation can use without swapping or being killed, in bytes.

    The smaller of the machine's ``MemAvailable`` (free memory plus the page
    cache the kernel can drop; else ``os.sysconf``'s available physical
    pages) and what this process's memory cgroup has left
    (:func:`cgroup_available_bytes`), or None when neither is known. A
    container's limit is often far below the machine's free memory, and the
    kernel ends a process that goes past it.
    """
    candidates = [value for value in (meminfo_available_bytes(), cgroup_available_bytes())
                  if value is not None]
    return min(candidates) if candidates else None


def meminfo_available_bytes(meminfo_path="/proc/meminfo"):
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, else ``os.sysconf``'s
    available physical pages, else None."""
    try:
        with open(meminfo_path) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def cgroup_available_bytes(root=None, self_cgroup=None):
    """Bytes this process's memory cgroups have left, or None without a limit.

    Reads the process's cgroups from ``self_cgroup`` and, for each group
    from the process's own up to ``root``:

    - cgroup v2 (the ``0::PATH`` line, files under ``root``):
      ``memory.max`` minus ``memory.current``;
    - cgroup v1 (the line naming the ``memory`` controller, files under
      ``root/memory``): ``memory.limit_in_bytes`` minus
      ``memory.usage_in_bytes``.

    The usage counts the group's page cache; its inactive file pages
    (``inactive_file`` of ``memory.stat``, ``total_inactive_file`` in v1) are
    what the kernel reclaims first, so they count as available. The result
    is the least over the groups with a limit (``max`` or an unlimited v1
    value is no limit). A group directory that is not there (a cgroup
    namespace shows the process's group as the root) is read at the root.

    Parameters
    ----------
    root : str, optional
        Where the cgroup file systems are mounted (default ``CGROUP_ROOT``).
    self_cgroup : str, optional
        The process's ``/proc/<pid>/cgroup`` (default ``SELF_CGROUP``).

    Returns
    -------
    int or None
    """
    root = CGROUP_ROOT if root is None else root
    self_cgroup = SELF_CGROUP if self_cgroup is None else self_cgroup
    try:
        with open(self_cgroup) as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return None
    remaining = []
    for entry in entries:
        if len(entry) != 3:
            continue
        hierarchy, controllers, path = entry
        if hierarchy == "0" and controllers == "":
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = os.path.join(root, "memory"), ("memory.limit_in_bytes",
                                                         "memory.usage_in_bytes",
                                                         "total_inactive_file")
        else:
            continue
        remaining.extend(_group_remaining(directory, *files)
                         for directory in _groups_up_to(base, path))
    remaining = [value for value in remaining if value is not None]
    return min(remaining) if remaining else None


def _groups_up_to(base, path):
    """The directories of the group at ``path`` and of its ancestors up to ``base``."""
    parts = [part for part in path.split("/") if part]
    if not os.path.isdir(os.path.join(base, *parts)):
        parts = []      # not visible here (a cgroup namespace): read the root
    return [os.path.join(base, *parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_int(path):
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _group_remaining(directory, limit_file, usage_file, inactive_key):
    """``limit - (usage - inactive file pages)`` of one group, or None without a limit."""
    limit = _read_int(os.path.join(directory, limit_file))
    if limit is None or limit >= _UNLIMITED:
        return None
    usage = _read_int(os.path.join(directory, usage_file)) or 0
    inactive = 0
    try:
        with open(os.path.join(directory, "memory.stat")) as stat:
            for line in stat:
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
                    break
    except (OSError, ValueError):
        pass
    return max(0, limit - max(0, usage - inactive))


def require(nbytes, what):
    """Raise ``MemoryError`` when ``nbytes`` of new temporaries cannot fit.

    Parameters
    ----------
    nbytes : int
        Bytes the caller is about to allocate (and touch).
    what : str
        What needs them, for the message.

    Raises
    ------
    MemoryError
        When more than the available memory (:func:`available_bytes`: the
        machine's, or the memory cgroup's where that is less) is asked for.
        Nothing is checked where that amount is unknown.
    """
    available = available_bytes()
    if available is not None and nbytes > available:
        raise MemoryError(f"{what} needs {nbytes / 2**30:.1f} GiB of temporaries, "
                          f"but only {available / 2**30:.1f} GiB of memory are available")
