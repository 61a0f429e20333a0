"""How many torch CPU threads a command uses when ``--threads 0`` (the default) leaves it to kvkd.

torch's own default is one thread per core. Each of its parallel regions ends at an OpenMP
barrier where the finished threads spin, waiting for the slowest one. When other processes hold
some cores, a thread of ours is descheduled and its partners spin through their time slices for
it: the step's CPU time grows with no extra work done. ``benchmarks/contention.py`` measured it on
2 cores (``benchmarks/RESULTS.md``, section 9): 2 threads went from 3.2 s/step quiet to 34 s/step
with 2 busy background processes and other jobs running, while 1 thread, which has no partner to
wait for, lost far less, and on a quiet machine only ~12%. So kvkd asks for the cores that are
free when the command starts: the core count minus the busy ones (the 1-minute load average,
rounded), at least 1. ``--threads N`` (N >= 1) is used as given.
"""

from __future__ import annotations

import os


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """torch threads for a process starting now: free cores = ``cores - round(load)``, at least 1.

    Args:
        cores: CPU cores this process may run on (default: ``os.sched_getaffinity``, else
            ``os.cpu_count()``).
        load: runnable processes, i.e. the 1-minute load average (default: ``os.getloadavg()[0]``;
            0 where the platform has none).
    Returns:
        An int in ``[1, cores]``.
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, cores - round(load)))


def resolve_threads(requested: int) -> tuple[int, str]:
    """The thread count to set and a one-line reason for the log.

    Args:
        requested: ``--threads``: 0 = auto (``auto_threads``), N >= 1 = exactly N.
    Returns:
        ``(threads, reason)``, e.g. ``(1, "1 of 2 cores (load average 1.6): --threads 0 = free cores")``.
    Raises:
        ValueError: ``requested`` < 0.
    """
    if requested < 0:
        raise ValueError(f"--threads must be 0 (free cores) or a positive count, got {requested}")
    if requested:
        return requested, f"{requested} (--threads)"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    n = auto_threads(cores, load)
    return n, f"{n} of {cores} cores (load average {load:.1f}; --threads 0 = the free cores)"
