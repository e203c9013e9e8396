"""`credits demo`: a realistic, signed sequence of Stripe events posted to the service, for a newcomer to
watch it work — signup through Checkout, the first invoice, a spend, two renewals (the second one cut by
the rollover cap), a pack bought through Checkout, and a half refund of that pack.

Without a URL the demo starts the real service on a free local port, on the configured database, and posts
to it over HTTP, as Stripe and the product would. Everything carries `metadata.account_id`, so no call to
Stripe is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr

from service.entry.api import create_app
from service.infra import runtime
from service.infra.catalogue import Catalogue
from service.infra.config import Settings
from service.infra.migrate import upgrade

Post = Callable[[str, bytes, dict[str, str]], tuple[int, Any]]
SECRET, TOKEN = "whsec_demo", "demo-api-token"


def sign(body: bytes, secret: str, at: int | None = None) -> str:
    """The Stripe-Signature header Stripe would send for `body` (HMAC-SHA256 of "t.body")."""
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def run_here(settings: Settings) -> tuple[str, list[tuple[str, int]]]:
    """Migrate the configured database, start the service on a free local port and post the story to it, each
    step once the one before is processed; returns the demo account id and (step, HTTP status) for each step."""
    secret = (settings.webhook_secrets or [SECRET])[0]
    token = settings.credits_api_token.get_secret_value() if settings.credits_api_token else TOKEN
    settings = settings.model_copy(
        update={
            "stripe_webhook_secret": SecretStr(secret),
            "credits_api_token": SecretStr(token),
            "credits_admin_token": SecretStr(token + "-admin"),
        }
    )
    rt = runtime.load(settings)
    upgrade(rt.engine)
    app = create_app(rt)
    with _serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        return tell(rt.catalogue, _poster(client, app.state.inline.wait_idle), secret, token)


def post_story(catalogue: Catalogue, url: str, secret: str, token: str) -> tuple[str, list[tuple[str, int]]]:
    """Post the story to a service running at `url`, which processes each step within milliseconds."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return tell(catalogue, _poster(client, lambda: time.sleep(0.5)), secret, token)


def _poster(client: httpx.Client, settle: Callable[[], None]) -> Post:
    def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        response = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
        settle()  # each step of the story builds on the one before
        return response.status_code, response.json()

    return post


@contextmanager
def _serving(app: Any) -> Iterator[str]:
    """The app served by uvicorn on a free port of 127.0.0.1 for the duration of the block; its base URL."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, name="demo-server", daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            time.sleep(0.01)
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        listening.close()


def tell(catalogue: Catalogue, post: Post, secret: str, api_token: str) -> tuple[str, list[tuple[str, int]]]:
    """Post the story; returns the demo account id and (step, HTTP status) for each step."""
    run_id = uuid.uuid4().hex[:8]
    account = f"acct_demo_{run_id}"
    steps: list[tuple[str, int]] = []
    for label, kind, payload in _story(catalogue, run_id, account):
        if kind == "event":
            body = json.dumps(payload).encode()
            status, _ = post("/webhooks/stripe", body, {"Stripe-Signature": sign(body, secret)})
        else:
            headers = {"Authorization": f"Bearer {api_token}", "Idempotency-Key": f"demo-{run_id}-{len(steps)}"}
            status, _ = post(f"/v1/accounts/{account}/spend", json.dumps(payload).encode(), headers)
        steps.append((label, status))
    return account, steps


def _story(catalogue: Catalogue, run_id: str, account: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    plan = next(p for p in catalogue.plans.values() if p.interval == "month")
    pack_name = next(iter(catalogue.packs), None)
    customer, sub = f"cus_demo_{run_id}", f"sub_demo_{run_id}"
    start = datetime.now(UTC).replace(microsecond=0)
    yield (
        "signup through Checkout",
        "event",
        _event(
            "checkout.session.completed",
            {
                "object": "checkout.session",
                "id": f"cs_demo_{run_id}",
                "mode": "subscription",
                "payment_status": "paid",
                "customer": customer,
                "client_reference_id": account,
                "subscription": sub,
                "metadata": {},
            },
        ),
    )
    for month, reason in enumerate(["subscription_create", "subscription_cycle", "subscription_cycle"]):
        begin = start + timedelta(days=30 * month)
        label = "first invoice paid" if month == 0 else f"renewal {month} (rollover: {plan.rollover})"
        yield (
            label,
            "event",
            _event(
                "invoice.paid",
                _invoice(
                    f"in_demo_{run_id}_{month}",
                    customer,
                    account,
                    sub,
                    plan.prices[0],
                    reason,
                    begin,
                    begin + timedelta(days=30),
                ),
            ),
        )
        if month == 0:
            yield f"spend {plan.credits // 4} credits", "spend", {"amount": plan.credits // 4, "reason": "demo spend"}
    if pack_name:
        intent = f"pi_demo_{run_id}"
        yield (
            f"buy the {pack_name} pack",
            "event",
            _event(
                "checkout.session.completed",
                {
                    "object": "checkout.session",
                    "id": f"cs_demo_pack_{run_id}",
                    "mode": "payment",
                    "payment_status": "paid",
                    "customer": customer,
                    "client_reference_id": account,
                    "payment_intent": intent,
                    "amount_total": 1000,
                    "currency": "usd",
                    "metadata": {"pack": pack_name},
                },
            ),
        )
        yield (
            f"refund half of the {pack_name} pack",
            "event",
            _event(
                "charge.refunded",
                {
                    "object": "charge",
                    "id": f"ch_demo_{run_id}",
                    "amount": 1000,
                    "amount_refunded": 500,
                    "payment_intent": intent,
                    "customer": customer,
                    "refunds": {
                        "object": "list",
                        "data": [{"id": f"re_demo_{run_id}", "amount": 500, "created": int(time.time())}],
                    },
                },
            ),
        )


def _invoice(
    invoice_id: str, customer: str, account: str, sub: str, price: str, reason: str, begin: datetime, end: datetime
) -> dict[str, Any]:
    return {
        "object": "invoice",
        "id": invoice_id,
        "customer": customer,
        "amount_paid": 34900,
        "currency": "usd",
        "billing_reason": reason,
        "status": "paid",
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": sub, "metadata": {"account_id": account}},
        },
        "lines": {
            "object": "list",
            "data": [
                {
                    "object": "line_item",
                    "id": f"il_{invoice_id}",
                    "amount": 34900,
                    "pricing": {"type": "price_details", "price_details": {"price": price}},
                    "period": {"start": int(begin.timestamp()), "end": int(end.timestamp())},
                }
            ],
        },
        "status_transitions": {"paid_at": int(begin.timestamp())},
    }


def _event(type_: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"evt_demo_{uuid.uuid4().hex[:16]}",
        "object": "event",
        "type": type_,
        "api_version": "2025-03-31.basil",
        "created": int(time.time()),
        "livemode": False,
        "data": {"object": obj},
    }
