"""The CPU priority `credits worker` gives up, so that on cores it shares with the API the API is served first.

`os.nice` alone does not do it on Linux. With autogroup scheduling (CONFIG_SCHED_AUTOGROUP, on in the
common distributions' kernels; /proc/sys/kernel/sched_autogroup_enabled) the scheduler first shares the CPU
fairly between sessions, and a process's niceness only ranks it among the processes of its own session. A
worker in a session of its own (started by a supervisor or a harness with `setsid`) took a whole session's
share beside the API whatever WORKER_NICE said: on the 2-core bench host the webhook endpoint's p99 at 500
deliveries a second was 15–80 ms beside it, and 12–16 ms with the worker's session niced as well
(bench/README.md, ingest). So a worker that leads its session sets the session's niceness too
(/proc/self/autogroup). One started from a shell shares the shell's session with whatever else runs there,
so it nices only itself, which ranks it below those. Autogroup applies only to processes outside cgroups
of their own: between containers, or systemd units with the cpu controller, the cgroups' CPU weights decide
(deploy/README.md), and writing the session's niceness is harmless and does nothing there.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")
ATTEMPTS = 5  # the kernel refuses (EAGAIN) any write of any process's autogroup within 100 ms of the last


def lower(nice: int) -> bool:
    """Add `nice` to this process's niceness and, when it leads its session, set the session's niceness to
    `nice` (what its children share). True when the session's niceness was written, which says nothing of
    whether autogroup is on; False when it was not: `nice` is 0, the session is shared with others, or there
    is no autogroup file to write (another OS, a kernel without it)."""
    os.nice(nice)
    if nice == 0 or os.getsid(0) != os.getpid():
        return False
    for _ in range(ATTEMPTS):
        failure = _write_autogroup(nice)
        if failure != errno.EAGAIN:
            return failure is None
        time.sleep(0.1)
    return False  # refused every time: the niceness alone applies


def _write_autogroup(nice: int) -> int | None:
    """Set the session's niceness; None when done, else the errno the kernel answered."""
    try:
        AUTOGROUP.write_text(str(nice))
    except OSError as exc:
        return exc.errno
    return None
