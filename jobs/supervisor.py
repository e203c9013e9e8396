"""`credits worker` as several processes, one per partition of the lanes (WORKER_PROCESSES, PostgreSQL only).

One worker process is bound by its interpreter's lock: its threads take turns at one core, however many
cores wait beside it (bench/README.md, end to end). Each process here drains its own share of the lanes
(inbox.Partition), so they never fetch the same events, and one customer's events stay in order in one of
them. The supervisor only starts them and passes SIGTERM on; when one exits on its own (a crash, a kill),
it stops the others and exits non-zero, so the service manager restarts the whole worker and the failure
is seen, not papered over. A killed process loses nothing: its transactions roll back, the events stay due.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.resource_tracker
import signal
import sys
import threading
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from jobs import worker
from service.infra import logs, runtime
from service.infra.config import Settings
from webhooks.inbox import Partition

log = logs.get("supervisor")
CHECK_SECONDS = 0.5  # how often the supervisor looks at its stop flag between exits
STOPPING = (signal.SIGTERM, signal.SIGINT)


def run(processes: int, stop: threading.Event) -> int:
    """Run `processes` workers until `stop` is set, then stop them; the exit code for `credits worker`."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no engine or lock shared by fork
    children = [context.Process(target=_work, args=(Partition(n, processes),), name=f"worker-{n + 1}")
                for n in range(processes)]
    # Inherited by each process, the stop signals are held until it has its handlers. The resource tracker is
    # started first: starting it unblocks them in this thread (multiprocessing/resource_tracker.py).
    multiprocessing.resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING)
    try:
        for child in children:
            child.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING)
    log.info("supervisor.started", processes=[child.pid for child in children])
    lost = False  # a process exited on its own, not because this supervisor was asked to stop
    while not stop.is_set() and not lost:
        exited = wait([child.sentinel for child in children], timeout=CHECK_SECONDS)
        if exited and not stop.is_set():  # Ctrl-C, or a stop sent to the process group, stops them all at once
            gone = next(child for child in children if child.sentinel in exited)
            gone.join()
            log.error("supervisor.worker_exited", process=gone.name, pid=gone.pid, exit_code=gone.exitcode)
            lost = True
    _stop(children)
    failed = [child.name for child in children if child.exitcode != 0]
    log.info("supervisor.stopped", failed=failed)
    return 1 if lost or failed else 0


def _stop(children: list[BaseProcess]) -> None:
    """SIGTERM to each process still running, then wait for each to finish the events in hand."""
    for child in children:
        if child.is_alive():
            child.terminate()
    for child in children:
        child.join()


def _work(partition: Partition) -> None:
    """One worker process: `credits worker`'s loop over its partition, stopped by SIGTERM or SIGINT. Every log
    line names its partition; a failure is one logged line and exit code 1, as `credits worker` alone gives."""
    settings = Settings()
    logs.configure(settings.log_format, settings.log_threshold, static={"partition": str(partition)})
    stop = threading.Event()
    for signum in STOPPING:
        signal.signal(signum, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING)  # a stop sent while this process started is seen now
    threading.Thread(target=_orphaned, args=(stop,), name="supervisor-watch", daemon=True).start()
    try:
        worker.run(runtime.load(settings), stop, settings.worker_poll_seconds, partition)
    except Exception:  # noqa: BLE001 - the supervisor sees the exit code; the log says why
        log.exception("worker.failed")
        sys.exit(1)
    finally:
        for signum in STOPPING:  # stopping already: a second stop (a group's, then the supervisor's) changes nothing
            signal.signal(signum, signal.SIG_IGN)


def _orphaned(stop: threading.Event) -> None:
    """Stop this worker when its supervisor is gone (killed with SIGKILL, say): left running, it would go on
    beside the workers of the supervisor started in its place, unseen by the service manager."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        log.warning("worker.supervisor_gone")
        stop.set()
