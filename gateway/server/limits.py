"""Limits a server derives from its process's resources, for the gateway and the workers
alike: a connection cap below the descriptor limit, so that an idle-connection flood meets
the cap (and its eviction) before accept() meets EMFILE; and the CPUs the process may use
(its affinity, and a container's CPU quota), which sizes the threads that run models."""
import math
import os
import resource


def default_max_connections() -> int:
    """Client connections at most: what the descriptor limit leaves once a quarter (64 at
    least) is kept for upstream connections, the store and logs; 100,000 at most."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(16, min(100_000, soft - max(64, soft // 4)))


def usable_cpus() -> int:
    """CPUs this process may keep busy: its affinity mask, or less where cgroup v2's
    cpu.max sets a quota (a container given 2 CPUs on a 64-core host may use 2)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux
    cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 here, or not its format
        pass
    return cpus
