"""A check, before allocating, that large temporaries fit in memory.

Linux overcommits memory: ``np.empty`` of more bytes than the machine has
left usually succeeds, and the process is killed later, when the pages are
touched. Kernels that allocate full-size temporaries (the staged backward)
ask :func:`require` first, so that a call too large for the machine raises
``MemoryError`` before it touches any memory.
"""
import os


def available_bytes():
    """Memory a new allocation can use without swapping, in bytes, or None if unknown.

    ``MemAvailable`` of ``/proc/meminfo`` (free memory plus the page cache
    the kernel can drop), else ``os.sysconf``'s available physical pages.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


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
        When more than the available memory (:func:`available_bytes`) is
        asked for. Nothing is checked where that amount is unknown.
    """
    available = available_bytes()
    if available is not None and nbytes > available:
        raise MemoryError(f"{what} needs {nbytes / 2**30:.1f} GiB of temporaries, "
                          f"but only {available / 2**30:.1f} GiB of memory are available")
