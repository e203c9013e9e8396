"""The reconciliation benchmark: `python -m bench.reconcile [--sizes 10000,50000,100000] [--profile-size N]`.

For each size N, from scratch:
1. a fresh PostgreSQL database (`credits_bench_<random>`, migrated to head, dropped at the end), seeded with
   what the service holds after processing N paid invoices' webhooks, a few deliberately missing
   (bench/reconcile/seed.py; not measured);
2. the fake Stripe API serving those N invoices and their N `invoice.paid` events
   (bench/reconcile/fake_stripe.py, a process of its own);
3. the floor: the service's Stripe client paging through both lists and discarding them
   (bench/reconcile/floor.py) — what reconciliation cannot beat;
4. `credits reconcile` itself (`python -m service.cli reconcile --since … --until … --format json`), its wall
   time and peak RSS (ru_maxrss of that child, from wait4), its findings checked against the dataset's.
Then, once: the peak RSS of merely importing the CLI (`python -m service.cli --help`), and a py-spy profile of
reconcile at `--profile-size` (a separate run: sampling slows it down).

Every child process is stopped in a `finally`; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import invocation
from bench.ingest import profile
from bench.ingest.run import (DEFAULT_ADMIN_URL, PYTHON, ROOT, Child, conninfo, create_database, drop_database,
                              free_port, machine, migrate, shown, wait_listening)
from bench.reconcile import report
from bench.reconcile.dataset import Dataset
from bench.reconcile.seed import seed

WINDOW = timedelta(days=3)  # reconcile's default window
CUTOFF_GRACE = timedelta(minutes=5)  # jobs.reconcile.GRACE: the newest item is older than this
TIMEOUT_SECONDS = 900  # one child process, at most
POLL_SECONDS = 0.02  # how often a timed child's peak RSS is read


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,100000",
                        help="invoices (and events) per run, comma-separated (default %(default)s)")
    parser.add_argument("--profile-size", type=int, default=100_000,
                        help="profile reconcile with py-spy at this size, one of --sizes (0: no profile)")
    parser.add_argument("--admin-url", default=os.environ.get("BENCH_ADMIN_DATABASE_URL", DEFAULT_ADMIN_URL),
                        help="PostgreSQL URL used to create/drop the bench databases (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in args.sizes.split(",")]
    if not all(1000 <= size <= 1_000_000 for size in args.sizes):
        parser.error("each size must be between 1,000 and 1,000,000")
    return args


def timed(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run a child to completion (its output to `log`): wall seconds, CPU seconds (from wait4) and peak RSS
    (the child's VmHWM, see `_wait4`)."""
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        status, usage, peak_kib = _wait4(process.pid, started + TIMEOUT_SECONDS)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return {"command": shown(command), "exit_code": os.waitstatus_to_exitcode(status),
            "seconds": round(time.monotonic() - started, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(peak_kib / 1024, 1), "output_tail": log.read_text(errors="replace")[-1500:]}


def _wait4(pid: int, deadline: float) -> tuple[int, Any, int]:
    """Wait for the child, reading its peak RSS (VmHWM, KiB) every `POLL_SECONDS` until it exits.

    Not `ru_maxrss`: Linux carries the high-water mark across exec, so a child's counts the RSS it inherited
    from this process at fork — after seeding, ~125 MB, more than a reconcile run's own peak. VmHWM belongs
    to the exec'd program; it only rises, so the last reading is at most one poll old.
    """
    peak_kib = 0
    while time.monotonic() < deadline:
        peak_kib = max(peak_kib, _vm_hwm_kib(pid))
        reaped, status, usage = os.wait4(pid, os.WNOHANG)
        if reaped:
            return status, usage, peak_kib
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"process {pid} ran longer than {TIMEOUT_SECONDS} s")


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set size so far, 0 when it cannot be read (gone, or a zombie)."""
    with suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def stripe_stats(port: int) -> dict[str, Any]:
    """Requests and bytes the fake Stripe served since the last call (which resets them)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats?reset=1", timeout=5) as response:
        return json.loads(response.read())


def one_size(count: int, admin: dict[str, Any], workdir: Path, profile_it: bool, say: Any) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    since, cutoff = now - WINDOW, now - CUTOFF_GRACE
    data = Dataset(count, int((cutoff - timedelta(minutes=5)).timestamp()))
    dbname = create_database(admin)
    server: Child | None = None
    result: dict[str, Any] = {"count": count, "expected_findings": data.expected()}
    try:
        db = {**admin, "dbname": dbname}
        url = f"postgresql+psycopg://{db['user']}@{db['host']}:{db['port']}/{dbname}"
        migrate(url)
        clock = time.monotonic()
        result["seeded_rows"] = seed(db, data)
        result["seed_seconds"] = round(time.monotonic() - clock, 1)
        say(f"{count:,}: seeded in {result['seed_seconds']} s; starting the fake Stripe")
        port = free_port()
        server = Child(f"fake_stripe_{count}", [PYTHON, "-m", "bench.reconcile.fake_stripe", "--port", str(port),
                                                "--count", str(count), "--newest", str(data.newest)], dict(os.environ), workdir)
        wait_listening(server, port, "/__stats")
        stripe_stats(port)
        env = {**os.environ, "DATABASE_URL": url, "STRIPE_API_BASE": f"http://127.0.0.1:{port}",
               "STRIPE_API_KEY": "sk_test_bench", "CREDITS_CONFIG": str(ROOT / "credits.toml"), "LOG_FORMAT": "json",
               "PYTHONUNBUFFERED": "1"}
        result["server_command"] = shown(server.command)
        floor = [PYTHON, "-m", "bench.reconcile.floor", "--since", str(int(since.timestamp())),
                 "--until", str(int(cutoff.timestamp()))]
        result["floor"] = timed(floor, env, workdir / f"floor_{count}.json")
        result["floor"]["stripe"] = stripe_stats(port)
        result["floor"]["seen"] = _last_json(workdir / f"floor_{count}.json")
        say(f"{count:,}: floor {result['floor']['seconds']} s; reconcile …")
        output = workdir / f"reconcile_{count}.json"
        command = [PYTHON, "-m", "service.cli", "reconcile", "--since", since.isoformat(), "--until", now.isoformat(),
                   "--format", "json", "--output", str(output)]
        result["reconcile"] = timed(command, env, workdir / f"reconcile_{count}.log")
        result["reconcile"]["stripe"] = stripe_stats(port)
        result["reconcile"]["command"] = shown(command).replace(str(output), "$WORKDIR/reconcile.json")
        if output.exists():
            result["reconcile"]["summary"] = json.loads(output.read_text())["summary"]
        say(f"{count:,}: reconcile {result['reconcile']['seconds']} s, exit {result['reconcile']['exit_code']}, "
            f"peak RSS {result['reconcile']['peak_rss_mib']} MiB")
        if profile_it:
            result["profile"] = profiled(command, env, workdir, count, say)
    finally:
        if server is not None:
            server.stop()
        drop_database(admin, dbname)
    return result


def profiled(command: list[str], env: dict[str, str], workdir: Path, count: int, say: Any) -> dict[str, Any]:
    """Reconcile again under py-spy, summarised: samples of whichever thread holds the GIL — the main one or
    the page prefetcher (jobs/pages.py) — so the shares are of the CPU work, waits on Stripe and PostgreSQL
    left out (they overlap the other thread's work)."""
    if profile.find_py_spy() is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    say(f"{count:,}: profiling reconcile with py-spy …")
    raw = workdir / f"reconcile_{count}.pyspy.txt"
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with profile.Recorder(process.pid, raw) as recorder:
            process.wait(timeout=TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if not raw.exists():
        return {"error": recorder.log.read_text(errors="replace")}
    summary = profile.summarise(raw, stages_rules=report.PROFILE_STAGES, stage_other=report.PROFILE_OTHER,
                                library_rules=report.PROFILE_LIBRARIES)
    return {**summary, "command": shown(recorder.command).replace(str(raw), "$WORKDIR/reconcile.pyspy.txt")}


def _last_json(path: Path) -> dict[str, Any]:
    with suppress(OSError, ValueError, IndexError):
        return json.loads(path.read_text().strip().splitlines()[-1])
    return {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started, clock = datetime.now(UTC), time.monotonic()
    previous_handler = signal.signal(signal.SIGTERM, invocation.raise_on_sigterm)
    admin = conninfo(args.admin_url)
    workdir = Path(tempfile.mkdtemp(prefix="credits-bench-reconcile-"))

    say = invocation.progress("bench.reconcile", clock)

    results: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "workdir": str(workdir),
                               "command": shown([PYTHON, "-m", "bench.reconcile", *_argv_shown(args)])}
    try:
        results["machine"] = machine(admin)
        baseline = timed([PYTHON, "-m", "service.cli", "--help"], dict(os.environ), workdir / "help.txt")
        results["import_baseline"] = baseline
        results["sizes"] = [one_size(count, admin, workdir, count == args.profile_size, say) for count in args.sizes]
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return invocation.finished(results, clock, report)


def _argv_shown(args: argparse.Namespace) -> list[str]:
    defaults = parse([])
    out = []
    if args.sizes != defaults.sizes:
        out += ["--sizes", ",".join(map(str, args.sizes))]
    if args.profile_size != defaults.profile_size:
        out += ["--profile-size", str(args.profile_size)]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return invocation.main(argv, parse, run, report)
