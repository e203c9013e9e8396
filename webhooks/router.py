"""POST /webhooks/stripe: verify the signature on the raw body, store the event, answer, then process.

The 2xx goes out only once the event is committed to the inbox (webhooks/writer.py stores concurrent
deliveries together); a database outage is a 503 so Stripe retries.
The stored event's id is then handed to the processing the app wired in (`on_stored`: the API process's
inline processor), so a slow handler or a Stripe look-up never delays Stripe's 2xx; anything not processed
there is the worker's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import stripe
from sqlalchemy.exc import DataError, IntegrityError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.infra import db, logs, metrics
from service.infra.runtime import Runtime
from webhooks import inbox
from webhooks.writer import InboxWriter, Stopped

PATH = "/webhooks/stripe"
TOLERANCE_SECONDS = 300
log = logs.get("webhooks")


class Refused(Exception):
    """The delivery is not acceptable; nothing is stored."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code, self.reason = status_code, reason


def endpoint(rt: Runtime, writer: InboxWriter, on_stored: Callable[[str, str | None], None]) -> ASGIApp:
    """The webhook endpoint, an ASGI app of its own: events verified with STRIPE_WEBHOOK_SECRET (every secret it
    lists, for a rotation), stored by `writer`, and each new one passed to `on_stored` (its id and its customer)
    once its 2xx is decided. The raw body is what the signature covers, so there is nothing for FastAPI to parse
    or validate, and every failure is answered here."""

    async def app(scope: Scope, receive_message: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            body = await _body(receive_message)
            if body is None:  # nobody is left to answer, and nothing was stored
                metrics.WEBHOOKS.labels("unverified", "disconnected").inc()
                return
            signature = dict(scope["headers"]).get(b"stripe-signature", b"").decode("latin-1")
            response = await receive(body, signature)
        else:
            response = _error(405, "http_error", "Method Not Allowed")  # as the API answers it
            response.headers["Allow"] = "POST"
        await response(scope, receive_message, send)

    async def receive(body: bytes, signature: str) -> JSONResponse:
        """Stripe's webhook endpoint: 200 once the event is stored (also for a redelivery or a type the
        service ignores), so Stripe never retries what is safely in the inbox."""
        try:
            event, text = verified_event(body, signature, rt.settings.webhook_secrets)
        except Refused as refused:
            metrics.WEBHOOKS.labels("unverified", f"refused_{refused.status_code}").inc()
            log.warning("webhook.refused", status=refused.status_code, reason=refused.reason)
            return _error(refused.status_code, "refused", refused.reason)
        try:
            new = await writer.store(event, text)
        except (*db.UNAVAILABLE, Stopped) as exc:
            metrics.WEBHOOKS.labels(event["type"], "unavailable").inc()
            log.error("webhook.unavailable", event_id=event["id"], error=type(exc).__name__)
            return _error(503, "database_unavailable", "the database is unavailable; retry later")
        except (DataError, IntegrityError) as exc:  # a value no database column holds: retrying cannot help
            metrics.WEBHOOKS.labels(event["type"], "unstorable").inc()
            log.error("webhook.unstorable", event_id=event["id"], error=type(exc).__name__)
            return _error(422, "invalid_request", "the event holds a value that cannot be stored")
        metrics.WEBHOOKS.labels(event["type"], "stored" if new else "duplicate").inc()
        log.info("webhook.received", event_id=event["id"], event_type=event["type"], duplicate=not new)
        if new:
            on_stored(event["id"], inbox.customer_named(event))
        return JSONResponse({"received": True, "duplicate": not new})

    return app


async def _body(receive: Receive) -> bytes | None:
    """The request's body as sent (None when the client went away first); the app's BodyLimit bounds it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def verified_event(body: bytes, header: str, secrets: list[str]) -> tuple[dict[str, Any], str]:
    """The event and its JSON text, if `header` signs `body` exactly as received with any of `secrets`, within
    the tolerance in either direction; else Refused(400). The text is the body as received, unless NUL
    characters or lone surrogates, which no database stores in text, had to be replaced: a verified event must
    be stored, not refused (Stripe would retry it for days)."""
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
        text = json.dumps(event)
    if not (isinstance(event, dict) and isinstance(event.get("id"), str) and isinstance(event.get("type"), str)):
        raise Refused(400, "body is not a Stripe event (no id or type)")
    if not event["id"] or len(event["id"]) > 255 or len(event["type"]) > 100:
        raise Refused(400, "event id or type out of range")
    return event, text


def _no_constants(name: str) -> Any:
    """NaN and Infinity are not JSON (and no database column takes them the same way): refuse the body."""
    raise ValueError(f"{name} is not JSON")


def _storable(value: Any) -> Any:
    """The payload with NUL characters and lone surrogates replaced."""
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
