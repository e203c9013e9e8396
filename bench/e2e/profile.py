"""Where the worker's time goes: bench/ingest/profile.py's py-spy recorder on the `credits worker` process,
summarised by the part of the processing each sample is in.

The worker is one thread that alternates between Python and waiting on PostgreSQL, so the samples are of
wall-clock time (`--idle`: waiting on the socket and sleeping between polls included) rather than of the
GIL; and they are taken without pausing the process (`--nonblocking`), because this profile runs during
the measured run — py-spy costs the run its own CPU (reported), not stops of the worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.ingest import profile

SAMPLING = ("--idle", "--nonblocking", "--subprocesses")  # the worker's processes (WORKER_PROCESSES), not their supervisor alone

# (label, pattern on one frame "func (file"); the first rule matching any frame of the stack wins, so the
# more specific parts of the processing come first (a ledger write inside a rollover inside a refill is "ledger").
STAGES = [
    ("commit: the session's pending writes flushed, then COMMIT (WAL flush)", r"(^|\.)commit \(sqlalchemy/"),
    ("ledger writes (service/ledger.py: grant, expire, allocations)", r"\(service/ledger\.py"),
    ("rollover at renewal (service/rollover.py)", r"\(service/rollover\.py"),
    ("referral attribution and payouts (service/referrals.py)", r"\(service/referrals\.py"),
    ("payment records (service/payments.py)", r"\(service/payments\.py"),
    ("pack grants (service/purchases.py)", r"\(service/purchases\.py"),
    ("plan refills (service/refills.py)", r"\(service/refills\.py"),
    ("account resolve and lock (service/accounts.py)", r"\(service/accounts\.py"),
    ("other handler code (webhooks/handlers.py)", r"\(webhooks/handlers\.py"),
    ("inbox: picking the due events (inbox.due)", r"(^|\.)due \(webhooks/inbox\.py"),
    ("inbox: claiming the events (SELECT … FOR UPDATE SKIP LOCKED, payload and all; a thread's lanes at once)",
     r"(^|\.)claim(_lanes)? \(webhooks/inbox\.py"),
    ("inbox: marking it (finish, record_failure)", r"\(webhooks/inbox\.py"),
    ("logging (structlog)", r"\(structlog/|\(service/logs\.py"),
    ("transaction begin/rollback (service/db.py)", r"\(service/db\.py"),
    ("idle between polls (stop.wait)", r"(^|\.)wait \(threading\.py"),
    ("dispatch and the drain loop (webhooks/dispatch.py, jobs/worker.py)", r"\((webhooks/dispatch|jobs/worker)\.py"),
    ("idle threads of the pool, waiting for a share of a batch", r"(^|\.)_worker \(.*concurrent/futures/thread\.py"),
    ("the supervisor, and each process's watch on it: waiting (jobs/supervisor.py)", r"\(jobs/supervisor\.py"),
    ("multiprocessing's resource tracker process, idle", r"multiprocessing\.resource_tracker"),
]
OTHER = "other (interpreter, start-up)"


RATE = 50  # samples a second: enough for shares to a percent over a run, at half py-spy's default CPU


def recorder(pid: int, raw: Path) -> profile.Recorder:
    return profile.Recorder(pid, raw, rate=RATE, sampling=SAMPLING)


def summarise(rec: profile.Recorder) -> dict[str, Any]:
    """The by-stage and by-library shares of the samples, py-spy's command and its sample counts."""
    summary = (profile.summarise(rec.output, stages_rules=STAGES, stage_other=OTHER) if rec.output.exists()
               else {"error": rec.log.read_text(errors="replace")})
    return {**summary, "command": " ".join(rec.command).replace(str(rec.output), "$WORKDIR/worker.pyspy.txt"),
            "sampler": profile.sampler_stats(rec.log)}
