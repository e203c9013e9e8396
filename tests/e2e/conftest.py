"""End-to-end fixtures: a real fake Stripe (localstripe, in-process) and the real service (uvicorn), both on
127.0.0.1 with ports the kernel picked, talking to each other over HTTP.

localstripe is an aiohttp app (`localstripe.server.app`) that keeps its objects in a module-level `Store`
and posts every event it creates, signed, to the webhooks registered with `POST /_config/webhooks/{name}`
(form fields `url` and `secret`), one second after the API call that created it (`webhooks._send_webhook`).
Its Store pickles itself to /tmp/localstripe.pickle on every write; that is switched off here so a test
run leaves nothing on disk and never reads a stale store back.

- `localstripe_server` (session): the aiohttp app on its own event loop in a daemon thread. The app is a module
  global and can be frozen only once, so there is one per test session; each test starts from an empty
  store (`DELETE /_config/data`) and, at its end, waits until every webhook localstripe scheduled has been
  delivered, so no event of one test reaches the next test's service.
- `credits_service` (per test, so per database: it uses the parametrised `engine` fixture of
  tests/conftest.py): `service.entry.api.create_app(Runtime(...))` served by uvicorn in a thread, configured to
  call localstripe as its Stripe API and registered with localstripe as its webhook endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import stripe
import uvicorn
from pydantic import SecretStr
from sqlalchemy import Engine
from tenacity import wait_none

from service.entry.api import create_app
from service.infra import catalogue
from service.infra.config import Settings
from service.infra.db import make_sessionmaker
from service.infra.runtime import Runtime
from service.infra.stripe_client import StripeGateway

API_TOKEN = "e2e-api-token"
ADMIN_TOKEN = "e2e-admin-token"
STRIPE_KEY = "sk_test_12345"
START_TIMEOUT = 10.0
# localstripe sleeps 1 s before each delivery; deliveries run concurrently.
DELIVERY_TIMEOUT = 10.0

T = TypeVar("T")


def _listening_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on a free port (never 0.0.0.0), handed to the server as is, so
    there is no window in which another process could take the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = DELIVERY_TIMEOUT, every: float = 0.05) -> T:
    """Poll `probe` until it returns something other than None (or False), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last is not None and last is not False:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@dataclass
class LocalStripe:
    """localstripe running on its own loop; `api` is a real `stripe` client pointed at it."""

    url: str
    loop: asyncio.AbstractEventLoop
    api: stripe.StripeClient

    def reset(self) -> None:
        """Forget every object (and so every event) of earlier tests."""
        httpx.delete(f"{self.url}/_config/data", timeout=5).raise_for_status()

    def register_webhook(self, name: str, url: str, secret: str, events: list[str] | None = None) -> None:
        """localstripe's own endpoint: POST /_config/webhooks/{name} with form fields url, secret and,
        optionally, events[] (only those types are delivered). The same name again replaces the webhook."""
        form: dict[str, str | list[str]] = {"url": url, "secret": secret}
        if events is not None:
            form["events[]"] = events
        httpx.post(f"{self.url}/_config/webhooks/{name}", data=form, timeout=5).raise_for_status()

    def event_ids(self) -> dict[str, str]:
        """Every event localstripe has created since the last reset: id → type."""
        page = self.api.v1.events.list({"limit": 100})
        assert not page.has_more, "more than 100 events: raise the limit"
        return {e.id: e.type for e in page.data}

    def drain(self, timeout: float = DELIVERY_TIMEOUT) -> None:
        """Block until every webhook delivery localstripe has scheduled has been answered (or failed)."""
        asyncio.run_coroutine_threadsafe(_drain_deliveries(timeout), self.loop).result(timeout + 2)


async def _drain_deliveries(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pending = [
            t for t in asyncio.all_tasks() if not t.done() and getattr(t.get_coro(), "__name__", "") == "_send_webhook"
        ]
        if not pending:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(pending)} localstripe webhook deliveries still pending after {timeout} s")
        await asyncio.wait(pending, timeout=left)


@pytest.fixture(scope="session")
def localstripe_server() -> Iterator[LocalStripe]:
    """localstripe's aiohttp app served in-process on 127.0.0.1, with its disk persistence switched off."""
    from aiohttp import web
    from localstripe import resources

    with pytest.MonkeyPatch.context() as mp:
        # Store.__setitem__/__delitem__ (and the server's save_store_middleware) call dump_to_disk on every
        # write, pickling the whole store to /tmp/localstripe.pickle; keep the store in memory only.
        mp.setattr(resources.Store, "dump_to_disk", lambda self: None)
        mp.setattr(resources.Store, "try_load_from_disk", lambda self: None)
        from localstripe.server import app

        resources.store.clear()
        sock = _listening_socket()
        port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="localstripe", daemon=True)
        thread.start()
        runner = web.AppRunner(app, handle_signals=False, access_log=None)

        async def start() -> None:
            await runner.setup()
            await web.SockSite(runner, sock).start()

        asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT)
        url = f"http://127.0.0.1:{port}"
        api = stripe.StripeClient(
            STRIPE_KEY,
            base_addresses={"api": url},
            http_client=stripe.HTTPXClient(timeout=10, allow_sync_methods=True),
            max_network_retries=0,
        )
        try:
            yield LocalStripe(url, loop, api)
        finally:
            try:
                asyncio.run_coroutine_threadsafe(_drain_deliveries(DELIVERY_TIMEOUT), loop).result(DELIVERY_TIMEOUT + 2)
            finally:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(START_TIMEOUT)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(START_TIMEOUT)
                if not thread.is_alive():
                    loop.close()
                sock.close()
                resources.store.clear()


CATALOGUE = """\
# Written by tests/e2e: "pro_monthly" is the legacy plan id created in localstripe (2017 API: plans, no prices).
[plans.pro]
prices = ["pro_monthly"]
credits = 1500
rollover = "cap"
rollover_cap = 2.0

[free]
credits = 0
"""


@dataclass
class CreditsService:
    """The running service: its base URL, an API client carrying the bearer token, and its Runtime."""

    url: str
    http: httpx.Client
    rt: Runtime
    webhook_secret: str
    webhook_name: str = "credits-e2e"


@pytest.fixture
def credits_service(localstripe_server: LocalStripe, engine: Engine, tmp_path: Path) -> Iterator[CreditsService]:
    """The service under uvicorn on 127.0.0.1, its Stripe API being localstripe, registered as localstripe's
    webhook endpoint, on the test's database (SQLite or PostgreSQL)."""
    localstripe = localstripe_server
    localstripe.reset()
    config = tmp_path / "credits.toml"
    config.write_text(CATALOGUE)
    secret = f"whsec_e2e_{uuid.uuid4().hex}"
    settings = Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        credits_config=config,
        credits_api_token=SecretStr(API_TOKEN),
        credits_admin_token=SecretStr(ADMIN_TOKEN),
        stripe_webhook_secret=SecretStr(secret),
        stripe_api_key=SecretStr(STRIPE_KEY),
        stripe_api_base=localstripe.url,
    )
    gateway = StripeGateway(settings, retry_wait=wait_none())
    rt = Runtime(settings, catalogue.load(settings.credits_config), engine, make_sessionmaker(engine), gateway)

    sock = _listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(create_app(rt), log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="credits-uvicorn", daemon=True)
    thread.start()
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)
    try:
        wait_for("uvicorn to start", lambda: server.started or _dead(thread), START_TIMEOUT)
        assert http.get("/healthz").status_code == 200
        localstripe.register_webhook("credits-e2e", f"{url}/webhooks/stripe", secret)
        yield CreditsService(url, http, rt, secret)
    finally:
        try:
            # Let every delivery of this test land here, not at the next test's service.
            localstripe.drain()
        finally:
            http.close()
            server.should_exit = True
            thread.join(START_TIMEOUT + 5)
            sock.close()
            assert not thread.is_alive(), "uvicorn did not stop"


def _dead(thread: threading.Thread) -> bool:
    if not thread.is_alive():
        raise AssertionError("uvicorn exited before it started (see the captured log)")
    return False
