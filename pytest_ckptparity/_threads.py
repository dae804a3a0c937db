"""How many threads one process keeps busy: the cores it may run on, shared among the
pytest-xdist workers of the run.

Why: each xdist worker is its own process, and by default both its tensorstore pool (which
decodes chunks) and the comparison's thread pool are sized to every core. N workers on C
cores then keep up to 2 * N * C threads busy on C cores, and spend the difference switching
between them. Each worker takes C / N instead (at least one).

`CKPTPARITY_THREADS=N` in the environment sets the number for every process: for xdist
workers spread over several hosts (`PYTEST_XDIST_WORKER_COUNT` counts the workers of every
host), or to give one process less of a shared machine.
"""

from __future__ import annotations

import os

from pytest_ckptparity.errors import CkptParityUsageError


def cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_threads() -> int:
    """Threads for this process: CKPTPARITY_THREADS, or the cores shared among xdist workers."""
    explicit = os.environ.get("CKPTPARITY_THREADS", "").strip()
    if explicit:
        try:
            n = int(explicit)
        except ValueError:
            n = 0
        if n < 1:
            raise CkptParityUsageError(f"CKPTPARITY_THREADS must be a positive whole number of threads, got {explicit!r}; unset it to use every core.")
        return n
    try:
        workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        workers = 1
    return max(1, cores() // workers)


def tensorstore_context() -> dict:
    """Context resources that hold tensorstore's decoding to this process's share (nothing
    when the share is every core: tensorstore's own default)."""
    n = process_threads()
    return {} if n >= cores() else {"data_copy_concurrency": {"limit": n}}
