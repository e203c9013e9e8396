"""POST /webhooks/stripe: verify the signature on the raw body, store the event, answer, then process.

The 200 goes out only once the event is committed to the inbox (webhooks/writer.py batches the commits of
concurrent deliveries); a database outage is a 503 so Stripe retries. The event is then handed to the
process's inline processor (webhooks/inline.py), so a slow handler or a Stripe look-up never delays Stripe's
2xx; anything left unprocessed is the worker's.

The endpoint is a plain ASGI app on a Starlette route, not a FastAPI operation: Stripe's deliveries are the
service's hot path, and it needs neither dependency injection nor a request model — the raw bytes are what
the signature covers.
"""

from __future__ import annotations

import json
import time
from typing import Any

import stripe
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.infra import logs, metrics
from service.infra.group_commit import Stopped
from service.infra.models import utcnow
from webhooks import inbox
from webhooks.inline import InlineProcessor
from webhooks.writer import InboxWriter

MAX_BODY = 1024 * 1024
TOLERANCE_SECONDS = 300
PATH = "/webhooks/stripe"
# While the endpoint is quiet — at most this many deliveries in flight, and at most this many a second — the
# receiving process processes each new event itself, right after its 2xx. Beyond either it is taking a burst:
# the events stay pending for the worker, because this process's Python runs on one core (one GIL), and an
# event's processing costs several times its acceptance: a steady 500 deliveries a second processed here
# would hold the GIL against the event loop and turn milliseconds of latency into hundreds.
QUIET_DELIVERIES = 8
QUIET_PER_SECOND = 50

log = logs.get("webhooks")


class Refused(Exception):
    """The delivery is not acceptable; nothing is stored."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code, self.reason = status_code, reason


class Receiver:
    """Stripe's webhook endpoint (signed with STRIPE_WEBHOOK_SECRET), as an ASGI app."""

    def __init__(self, secrets: list[str], writer: InboxWriter, inline: InlineProcessor) -> None:
        self.secrets, self.writer, self.inline = secrets, writer, inline
        self.in_flight = 0
        self.pace = Pace()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.in_flight += 1
        self.pace.tick(time.monotonic())
        try:
            await self._receive(scope, receive, send)
        except Exception:  # a bug: answered as the app answers one, since the app's handlers are not on this path
            log.exception("request.failed")
            await _answer(500, "internal_error", "unexpected error; it has been logged")(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _receive(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = dict(scope["headers"])
            body = await _read_capped(receive, headers.get(b"content-length", b""))
            signature = headers.get(b"stripe-signature", b"").decode("latin-1")
            event, payload = _verified_event(body, signature, self.secrets)
        except Refused as refused:
            metrics.WEBHOOKS.labels("unverified", f"refused_{refused.status_code}").inc()
            log.warning("webhook.refused", status=refused.status_code, reason=refused.reason)
            await _answer(refused.status_code, "refused", refused.reason)(scope, receive, send)
            return
        try:
            new = await self.writer.store(inbox.row(event, utcnow(), payload))
        except (OperationalError, InterfaceError, PoolTimeout, Stopped) as exc:
            metrics.WEBHOOKS.labels(event["type"], "unavailable").inc()
            log.error("webhook.unavailable", event_id=event["id"], error=type(exc).__name__)
            await _answer(503, "database_unavailable", "the database is unavailable; retry later")(scope, receive, send)
            return
        except (DataError, IntegrityError) as exc:  # a value no database column holds: retrying cannot help
            metrics.WEBHOOKS.labels(event["type"], "unstorable").inc()
            log.error("webhook.unstorable", event_id=event["id"], error=type(exc).__name__)
            await _answer(422, "invalid_request", "the event holds a value that cannot be stored")(scope, receive, send)
            return
        metrics.WEBHOOKS.labels(event["type"], "stored" if new else "duplicate").inc()
        log.info("webhook.received", event_id=event["id"], event_type=event["type"], duplicate=not new)
        if new and self.in_flight <= QUIET_DELIVERIES and self.pace.per_second() <= QUIET_PER_SECOND:
            self.inline.submit(event["id"])
        await JSONResponse({"received": True, "duplicate": not new})(scope, receive, send)


class Pace:
    """Deliveries a second: the last whole second's count, or this second's once it is higher."""

    def __init__(self) -> None:
        self.second, self.count, self.last = 0, 0, 0

    def tick(self, now: float) -> None:
        second = int(now)
        if second != self.second:
            self.last = self.count if second == self.second + 1 else 0
            self.second, self.count = second, 0
        self.count += 1

    def per_second(self) -> int:
        return max(self.last, self.count)


def _answer(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def route(receiver: Receiver) -> Route:
    """The POST route for the app's router."""
    return Route(PATH, receiver, methods=["POST"], name="stripe_webhook")


async def _read_capped(receive: Receive, declared: bytes) -> bytes:
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise Refused(413, "body larger than 1 MiB")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise Refused(413, "body larger than 1 MiB")
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _verified_event(body: bytes, header: str, secrets: list[str]) -> tuple[dict[str, Any], str]:
    """The event and the JSON text to store for it, if `header` signs `body` exactly as received with any of
    `secrets` (a rotation accepts old and new), within the tolerance in either direction; else Refused(400).
    The text is the body as Stripe sent it, unless characters no database stores had to be replaced."""
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
