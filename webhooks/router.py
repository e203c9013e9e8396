"""POST /webhooks/stripe: verify the signature on the raw body, store the event, answer, then process.

The 200 goes out only once the event is committed to the inbox; a database outage is a 503 so Stripe
retries. The event is then handed to the process's inline processor (webhooks/inline.py), so a slow
handler or a Stripe look-up never delays Stripe's 2xx; anything left unprocessed is the worker's.
"""

from __future__ import annotations

import json
import time
from typing import Any

import stripe
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from service import logs, metrics
from service.db import transaction
from service.models import utcnow
from service.runtime import Runtime
from webhooks import inbox

MAX_BODY = 1024 * 1024
TOLERANCE_SECONDS = 300

log = logs.get("webhooks")
router = APIRouter(tags=["stripe"])


class Refused(Exception):
    """The delivery is not acceptable; nothing is stored."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code, self.reason = status_code, reason


@router.post("/webhooks/stripe", responses={400: {"description": "bad signature or body"}, 503: {"description": "retry"}})
async def receive(request: Request) -> JSONResponse:
    """Stripe's webhook endpoint (signed with STRIPE_WEBHOOK_SECRET)."""
    rt: Runtime = request.app.state.runtime
    try:
        body = await _read_capped(request)
        event = _verified_event(body, request.headers.get("stripe-signature"), rt.settings.webhook_secrets)
    except Refused as refused:
        metrics.WEBHOOKS.labels("unverified", f"refused_{refused.status_code}").inc()
        log.warning("webhook.refused", status=refused.status_code, reason=refused.reason)
        return JSONResponse({"error": "refused", "message": refused.reason}, status_code=refused.status_code)
    try:
        new = await run_in_threadpool(_store, rt, event)
    except DBAPIError:
        metrics.WEBHOOKS.labels(event["type"], "unavailable").inc()
        raise
    metrics.WEBHOOKS.labels(event["type"], "stored" if new else "duplicate").inc()
    log.info("webhook.received", event_id=event["id"], event_type=event["type"], duplicate=not new)
    if new:
        request.app.state.inline.submit(event["id"])
    return JSONResponse({"received": True, "duplicate": not new})


def _store(rt: Runtime, event: dict[str, Any]) -> bool:
    with transaction(rt.sessions) as session:
        return inbox.store(session, event, utcnow())


async def _read_capped(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise Refused(413, "body larger than 1 MiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise Refused(413, "body larger than 1 MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _verified_event(body: bytes, header: str | None, secrets: list[str]) -> dict[str, Any]:
    """The event, if `header` signs `body` exactly as received with any of `secrets` (a rotation accepts
    old and new), within the tolerance in either direction; else Refused(400)."""
    if not header:
        raise Refused(400, "missing Stripe-Signature header")
    if not secrets:
        raise Refused(400, "no STRIPE_WEBHOOK_SECRET is configured")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(400, "body is not UTF-8") from exc
    if not any(_signed_by(text, header, secret) for secret in secrets):
        raise Refused(400, "signature does not match, or is too old")
    if _signed_at(header) > time.time() + TOLERANCE_SECONDS:
        raise Refused(400, "signature timestamp is in the future")
    try:
        event = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise Refused(400, "body is not JSON (or is nested too deeply)") from exc
    if "\\u" in text:  # only an escape can smuggle in a NUL or a lone surrogate
        event = _storable(event)
    if not (isinstance(event, dict) and isinstance(event.get("id"), str) and isinstance(event.get("type"), str)):
        raise Refused(400, "body is not a Stripe event (no id or type)")
    if not event["id"] or len(event["id"]) > 255 or len(event["type"]) > 100:
        raise Refused(400, "event id or type out of range")
    return event


def _no_constants(name: str) -> Any:
    """NaN and Infinity are not JSON (and no database column takes them the same way): refuse the body."""
    raise ValueError(f"{name} is not JSON")


def _storable(value: Any) -> Any:
    """The payload with NUL characters and lone surrogates replaced: no database stores them in text, and a
    verified event must be stored, not refused (Stripe would retry it for days)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_storable(item) for item in value]
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    return value


def _signed_by(text: str, header: str, secret: str) -> bool:
    try:
        return bool(stripe.WebhookSignature.verify_header(text, header, secret, tolerance=TOLERANCE_SECONDS))
    except stripe.SignatureVerificationError:
        return False


def _signed_at(header: str) -> int:
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            return int(value)
    return 0
