"""The CPU priority `credits worker` gives up, so that on shared cores the API is served first.

`os.nice` alone does not do it on Linux. With autogroup scheduling (CONFIG_SCHED_AUTOGROUP, on in the
common distributions' kernels; /proc/sys/kernel/sched_autogroup_enabled) the scheduler first shares the CPU
fairly between sessions, and a process's niceness only ranks it among the processes of its own session. A
worker in a session of its own (started by a supervisor or a harness with `setsid`, a service manager, a
container's init) took a whole session's share beside the API whatever WORKER_NICE said: on the 2-core bench
host the webhook endpoint's p99 at 500 deliveries a second was 16–80 ms beside it, and 11 ms with the
worker's session niced as well (bench/README.md, ingest). So a worker that leads its session nices the
session too (/proc/self/autogroup). One started from a shell shares the shell's session with whatever else
runs there, so it nices only itself, which ranks it below those. Where processes are in cgroups of their
own (containers), neither applies between them: the cgroups' CPU weights do (deploy/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")


def lower(nice: int) -> bool:
    """Add `nice` to this process's niceness and, when it leads its session, to the session's (what its
    children inherit). True when the session's was set too; False where there is no autogroup to set
    (not Linux, autogroup off, or a session shared with others)."""
    os.nice(nice)
    if nice == 0 or os.getsid(0) != os.getpid():
        return False
    try:
        AUTOGROUP.write_text(str(nice))
    except OSError:  # no /proc/self/autogroup (another OS, or a kernel without it): the niceness alone applies
        return False
    return True
