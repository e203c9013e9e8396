"""Helpers shared by the reliability tests: settings and runtimes for any database, the real commands
(`credits serve`, `credits worker`) in subprocesses on 127.0.0.1, bounded polling, signed delivery, and a
comparable view of the ledger.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tenacity import wait_none

from service.infra import catalogue
from service.infra.config import Settings
from service.infra.db import make_engine, make_sessionmaker
from service.infra.models import Account, Grant, LedgerEntry, Referral, StripeEvent
from service.infra.runtime import Runtime
from service.infra.stripe_client import StripeGateway
from tests.conftest import ADMIN_TOKEN, API_TOKEN, DATA
from tests.stripe_events import SECRET, sign

CATALOGUE = DATA / "catalogue.toml"
# Nothing listens on the discard port: an outbound Stripe call a test did not plan for fails at once, on
# 127.0.0.1, instead of leaving the machine.
NO_STRIPE = "http://127.0.0.1:9"
T = TypeVar("T")


def settings_for(database_url: str, **overrides: Any) -> Settings:
    """Settings as tests/conftest.py's `settings` builds them, for any database URL."""
    values: dict[str, Any] = dict(  # noqa: C408 - the keywords are Settings' own
        database_url=database_url,
        credits_config=CATALOGUE,
        credits_api_token=SecretStr(API_TOKEN),
        credits_admin_token=SecretStr(ADMIN_TOKEN),
        stripe_webhook_secret=SecretStr(SECRET),
        stripe_api_key=SecretStr("sk_test_123"),
        stripe_api_base=NO_STRIPE,
        serve_worker=False,  # an in-process app processes inline only; the tests run the worker themselves
    )
    values.update(overrides)
    return Settings(**values)


def runtime_for(settings: Settings) -> Runtime:
    """A Runtime as tests/conftest.py's `rt` builds it: the test catalogue, no Stripe retry waits."""
    engine = make_engine(settings.database_url)
    gateway = StripeGateway(settings, retry_wait=wait_none())
    return Runtime(settings, catalogue.load(settings.credits_config), engine, make_sessionmaker(engine), gateway)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post_signed(http: httpx.Client, url: str, body: bytes) -> httpx.Response:
    """POST a webhook body signed now, as Stripe signs each (re)delivery."""
    return http.post(url, content=body, headers={"Stripe-Signature": sign(body), "Content-Type": "application/json"})


# --- the real commands in subprocesses -------------------------------------------------------------------


def credits_command() -> list[str]:
    """The `credits` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("credits")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from service.entry.cli import main; main()"]


def service_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment `credits serve` / `credits worker` read, as a deployment would set it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITS_", "STRIPE_", "DATABASE_", "WORKER_"))}
    env.update(
        DATABASE_URL=database_url,
        STRIPE_WEBHOOK_SECRET=SECRET,
        STRIPE_API_KEY="sk_test_123",
        STRIPE_API_BASE=NO_STRIPE,
        CREDITS_CONFIG=str(CATALOGUE),
        CREDITS_API_TOKEN=API_TOKEN,
        CREDITS_ADMIN_TOKEN=ADMIN_TOKEN,
        LOG_FORMAT="json",
        # Quiet, so that a failure's lines stand out, and cheap: the INFO lines, several an event, cost a fifth
        # of the server's CPU. The worker's processes read it too (a wrapper around `credits` would not reach them).
        LOG_LEVEL="warning",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p),
    )
    env.update(extra)
    return env


@dataclass
class Process:
    """A command running in its own process group, its output (JSON logs) in a file, not on the terminal."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Process:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the graceful path), then SIGKILL if it has not exited within `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def cpu_seconds(self) -> float | None:
        """User + system CPU time used so far (Linux /proc), for the test's timing summary."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- last lines of {self.name} ({self.log_path}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def exited(self) -> str:
        """How the process ended, for an assertion's message: its exit code and its last log lines."""
        return f"{self.name} exited {self.proc.returncode if self.proc else None}\n{self.tail()}"


def start_servers(
    names: list[str], env: dict[str, str], log_dir: Path, timeout: float = 20.0
) -> list[tuple[Process, str]]:
    """`credits serve --host 127.0.0.1 --port P`, one per name, each on a free port, started side by side;
    returns (process, base URL) pairs once every /healthz answers."""
    taken: set[int] = set()  # the kernel may offer a port again while the server it was picked for starts
    launched = [_launch_server(name, env, log_dir, taken) for name in names]
    return [_await_server(server, url, env, log_dir, timeout, taken) for server, url in launched]


def _launch_server(name: str, env: dict[str, str], log_dir: Path, taken: set[int]) -> tuple[Process, str]:
    port = free_port()
    while port in taken:
        port = free_port()
    taken.add(port)
    args = [*credits_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    return Process(name, args, env, log_dir / f"{name}.log").start(), f"http://127.0.0.1:{port}"


def _await_server(
    server: Process, url: str, env: dict[str, str], log_dir: Path, timeout: float, taken: set[int]
) -> tuple[Process, str]:
    for _ in range(3):  # the port was free when picked; another process could take it before uvicorn binds it
        wait_for(f"{server.name} to answer /healthz", partial(_up, server, url), timeout, every=0.1)
        if server.alive():
            return server, url
        if "address already in use" not in server.tail(200).lower():
            raise AssertionError(f"{server.name} exited at start-up\n{server.tail()}")
        server, url = _launch_server(server.name, env, log_dir, taken)
    raise AssertionError(f"{server.name} could not bind a free port three times")


def _up(server: Process, url: str) -> bool | None:
    """True once the server answers /healthz, or has exited (decided by the caller); None while it starts."""
    if not server.alive():
        return True
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return None


def start_worker(name: str, env: dict[str, str], log_dir: Path) -> Process:
    """`credits worker` (runs until SIGTERM, which lets it finish its current event)."""
    return Process(name, [*credits_command(), "worker"], env, log_dir / f"{name}.log").start()


# --- comparable ledger views -----------------------------------------------------------------------------

Row = tuple[str, int, str]


def ledgers(session: Session) -> dict[str, list[Row]]:
    """Per account id: (kind, amount, idempotency key) of every entry, sorted by key.

    A referral payout's key carries the referral's row id (`referral:{id}:{side}`), which depends on the order
    events were processed in; it is written as `referral:{referee account id}:{side}` so that two databases
    that processed the same events in different orders can be compared entry for entry.
    """
    referees = dict(
        session.execute(select(Referral.id, Account.public_id).join(Account, Account.id == Referral.referee_id)).all()
    )
    names = dict(session.execute(select(Account.id, Account.public_id)).all())
    out: dict[str, list[Row]] = {}
    for entry in session.scalars(select(LedgerEntry)):
        key = entry.idempotency_key
        if key.startswith("referral:"):
            _, referral_id, side = key.split(":")
            key = f"referral:{referees[int(referral_id)]}:{side}"
        out.setdefault(names[entry.account_id], []).append((entry.kind, entry.amount, key))
    return {account: sorted(rows, key=lambda r: r[2]) for account, rows in out.items()}


def balances(session: Session) -> dict[str, int]:
    """Per account id holding any grant: the sum of its grants' remaining credits."""
    rows = session.execute(
        select(Account.public_id, func.sum(Grant.remaining))
        .join(Grant, Grant.account_id == Account.id)
        .group_by(Account.public_id)
    ).all()
    return {account: int(total) for account, total in rows}


def event_statuses(session: Session) -> dict[str, int]:
    """How many inbox events have each status."""
    return {
        status: int(n)
        for status, n in session.execute(select(StripeEvent.status, func.count()).group_by(StripeEvent.status))
    }
