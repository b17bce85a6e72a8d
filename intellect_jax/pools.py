"""Per-process thread pools for host work that releases the GIL (numpy array passes, hashlib on large buffers).

A pool belongs to the process that made it: after ``fork`` the parent's worker threads do not exist in the child,
so a child asking for a pool gets a new one instead of queueing work nobody will run.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[str, tuple[int, ThreadPoolExecutor]] = {}
_LOCK = threading.Lock()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def pool(name: str, threads: int) -> ThreadPoolExecutor:
    """This process's pool `name` (created with `threads` workers the first time it is asked for)."""
    with _LOCK:
        pid = os.getpid()
        if name not in _POOLS or _POOLS[name][0] != pid:
            _POOLS[name] = (pid, ThreadPoolExecutor(max(1, threads), thread_name_prefix=f"ij-{name}"))
        return _POOLS[name][1]
