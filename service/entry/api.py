"""The HTTP API: translates requests into ledger calls and results into JSON. No domain logic here."""

from __future__ import annotations

import contextvars
import hmac
import json
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.entry import idempotency

from service.domain import accounts, findings, ledger, referrals, spending, usage

from service.infra import heap, logs, metrics
from service.domain.accounts import AccountNotFound
from service.infra.db import transaction
from service.infra.group_commit import Stopped
from service.infra.models import utcnow
from service.infra.runtime import Runtime
from service.entry.spends import SpendJob, Spends
from service.entry.schemas import (
    GrantRequest,
    MemberRequest,
    NoBody,
    ReferralRequest,
    SpendRequest,
    balance_view,
    entry_view,
    grant_view,
)
from webhooks.inline import InlineProcessor
from webhooks import router as webhooks
from webhooks.router import MAX_BODY
from webhooks.writer import InboxWriter

log = logs.get("api")
SPEND_PATH = "/v1/accounts/{account}/spend"
USUAL_WAY = "credits.usual_way"  # scope key: a door passes this request on through the middleware stack
SWITCH_INTERVAL = 0.0005  # seconds a thread may hold the GIL while another waits for it (Python's default: 0.005)
SPEND_DOOR = re.compile(r"/v1/accounts/([^/]+)/spend")  # SPEND_PATH, as Starlette matches it
bearer = HTTPBearer(auto_error=False, description="CREDITS_API_TOKEN, or CREDITS_ADMIN_TOKEN for admin routes")


class ApiError(Exception):
    """An error answered as `{"error": code, "message": …}` with its HTTP status."""

    def __init__(self, status_code: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status_code, self.code, self.message, self.extra = status_code, code, message, extra


async def runtime(request: Request) -> Runtime:
    """The app's loaded configuration and database sessions. Async, like the other dependencies that never
    block: FastAPI runs a plain `def` dependency on its thread pool, a hand-off per dependency per request."""
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(runtime)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def _matches(given: str, secret: Any) -> bool:
    return secret is not None and hmac.compare_digest(given.encode(), secret.get_secret_value().encode())


def _role(token: str, rt: Runtime) -> str | None:
    """"admin" or "api" for a valid bearer token, else None."""
    if _matches(token, rt.settings.credits_admin_token):
        return "admin"
    if _matches(token, rt.settings.credits_api_token):
        return "api"
    return None


async def require_api(creds: Credentials, rt: RuntimeDep) -> str:
    """Any valid token (the admin token may do what the API token does)."""
    if creds is None:
        raise ApiError(401, "unauthorized", "Authorization: Bearer <token> is required")
    role = _role(creds.credentials, rt)
    if role is None:
        raise ApiError(401, "unauthorized", "the bearer token is not valid")
    return role


async def require_admin(role: Annotated[str, Depends(require_api)]) -> str:
    """Only the admin token."""
    if role != "admin":
        raise ApiError(403, "forbidden", "this route needs the admin token")
    return role


IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", description="Required on every POST; a retry reuses it.")
]


def _key(value: str | None) -> str:
    if not value or len(value) > idempotency.MAX_KEY_LENGTH:
        raise ApiError(400, "idempotency_key_required", "an Idempotency-Key header of 1-255 characters is required")
    return value


Work = Callable[[Session], tuple[int, dict[str, Any]]]


def _once(rt: Runtime, request: Request, key: str | None, body: BaseModel, work: Work) -> JSONResponse:
    """Run `work` in one transaction under the request's Idempotency-Key, replaying an earlier outcome."""
    client_key, digest = _key(key), _digest(request, body)
    with transaction(rt.sessions) as session:
        return _answer(idempotency.run_once(session, client_key, digest, lambda: work(session)))


def _digest(request: Request, body: BaseModel) -> str:
    """The request's fingerprint over its method, its path as the server received it (the scope's, which
    `request.url.path` re-escapes after building the whole URL: a tenth of the spend door's CPU) and its body."""
    return idempotency.fingerprint(request.method, request.scope["path"], body.model_dump(mode="json"))


def _answer(outcome: idempotency.Outcome) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)


health = APIRouter(tags=["health"])


@health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@health.get("/readyz")
def readyz(rt: RuntimeDep) -> JSONResponse:
    """The process can reach its database (200), or not (503)."""
    try:
        with rt.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError:
        return JSONResponse({"status": "unavailable", "error": "database_unavailable"}, status_code=503)
    return JSONResponse({"status": "ready"})


v1 = APIRouter(prefix="/v1", tags=["accounts"], dependencies=[Depends(require_api)])


@v1.get("/accounts/{account}/balance")
def get_balance(account: str, rt: RuntimeDep) -> dict[str, Any]:
    """The spendable balance and the grants it is made of, soonest-expiring first."""
    with transaction(rt.sessions) as session:
        return balance_view(session, _account(session, account))


@v1.get("/accounts/{account}/ledger")
def get_ledger(
    account: str,
    rt: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor from the previous page")] = None,
) -> dict[str, Any]:
    """Ledger entries, newest first; pass `next_cursor` back as `cursor` for the next page."""
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise ApiError(400, "invalid_cursor", "cursor must be a next_cursor value from an earlier page")
    with transaction(rt.sessions) as session:
        entries = ledger.history(session, _account(session, account), limit + 1, int(cursor) if cursor else None)
    page = entries[:limit]
    return {
        "entries": [entry_view(e) for e in page],
        "next_cursor": str(page[-1].id) if len(entries) > limit else None,
    }


@v1.post("/accounts/{account}/grants", status_code=201, dependencies=[Depends(require_admin)])
def post_grant(
    account: str, body: GrantRequest, request: Request, rt: RuntimeDep, key: IdempotencyKey = None
) -> JSONResponse:
    """Grant credits by hand (admin token). Creates the account when it is new."""
    if body.expires_at is not None and body.expires_at <= utcnow():
        raise ApiError(422, "invalid_request", "expires_at must be in the future")

    def work(session: Session) -> tuple[int, dict[str, Any]]:
        acct = accounts.get_or_create(session, account)
        structlog.contextvars.bind_contextvars(account_id=acct.public_id)
        posted = ledger.grant(
            session,
            acct,
            body.amount,
            source="admin",
            key=f"grant:{acct.public_id}:{key}",
            reason=body.reason,
            actor="api:admin",
            expires_at=body.expires_at,
        )
        created = session.scalars(ledger.grant_of(posted.entry)).one()
        view = balance_view(session, acct)
        return 201, {**view, "entry_id": posted.entry.id, "grant": grant_view(created)}

    return _once(rt, request, key, body, work)


@v1.post(
    SPEND_PATH.removeprefix("/v1"),
    responses={402: {"description": "insufficient_credits or member_limit_reached: nothing was spent"},
               404: {"description": "unknown account or member"}, 422: {"description": "unknown action"}},
)
async def post_spend(account: str, body: SpendRequest, request: Request, key: IdempotencyKey = None) -> JSONResponse:
    """Spend credits, soonest-expiring first: an amount, or an action priced by the catalogue. With a
    `resource`, once per (action, resource) in the account; with a `member_id`, from that member's
    allocation or within its limit. 402 when short; nothing is then spent.

    A well-formed request with a valid token is served by `SpendDoor` (below) before it gets here; this
    operation answers the others (401, 400, 422), a streamed body, and documents the route. Both hand the
    spend to the process's batches of spends (service/spends.py)."""
    return _answer(await _spend(request, account, body, _key(key)))


async def _spend(request: Request, account: str, body: SpendRequest, key: str) -> idempotency.Outcome:
    """The spend done in the next batch, with the request's context (its request id) for its log lines."""
    job = SpendJob(account, body, key, _digest(request, body), contextvars.copy_context())
    return await request.app.state.spends.submit(job)  # type: ignore[no-any-return]


class SpendDoor:
    """POST /v1/accounts/{account}/spend, the product's hot path, taken at the app's door (see `Api`): none
    of the middleware stack, route matching over every operation, dependency solving or body parsing into a
    model twice.

    A request that declares its length, carries a valid bearer token and an Idempotency-Key, and has a JSON
    body SpendRequest accepts is answered here, its spend done in the next batch (service/spends.py); an
    error is answered by the app's own exception handlers, as on the usual way. Every other request goes on,
    body intact, the usual way to the FastAPI operation `post_spend`, so a refusal (401, 400, 413, 422) or a
    streamed body is exactly FastAPI's.
    """

    def __init__(self, app: Api) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        rt: Runtime = self.app.state.runtime  # read per request, as the `runtime` dependency does
        declared = request.headers.get("content-length", "")
        if not declared.isdigit() or int(declared) > MAX_BODY:  # streamed or too large: FastAPI reads (and caps) it
            await self.app({**scope, USUAL_WAY: True}, receive, send)
            return
        raw = await _read_body(receive)
        if raw is None:  # the client went away
            return
        body = _well_formed(request, raw, rt)
        if body is None:
            await self.app({**scope, USUAL_WAY: True}, _replay(raw, receive), send)
            return
        try:
            response: Response = _answer(await _spend(request, SPEND_DOOR.fullmatch(scope["path"])[1],  # type: ignore[index]
                                                      body, request.headers["idempotency-key"]))
        except Exception as exc:  # noqa: BLE001 - answered as the app answers it (404, 409, 503, a logged 500)
            response = await self.app.error_response(request, exc)
        await response(scope, receive, send)


def _well_formed(request: Request, raw: bytes, rt: Runtime) -> SpendRequest | None:
    """The body, when the request is one `post_spend` would serve (not refuse); else None."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    if scheme.lower() != "bearer" or not token or _role(token, rt) is None:
        return None
    if not 0 < len(request.headers.get("idempotency-key", "")) <= idempotency.MAX_KEY_LENGTH:
        return None
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
        return None
    try:
        return SpendRequest.model_validate(json.loads(raw))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or not a valid spend (ValidationError)
        return None


async def _read_body(receive: Receive) -> bytes | None:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(raw: bytes, receive: Receive) -> Receive:
    """`receive` for a body already read: the body once, then the client's own messages (a disconnect)."""
    pending = [{"type": "http.request", "body": raw, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


@v1.post("/accounts/{account}/members", dependencies=[Depends(require_admin)], tags=["members"])
def post_member(account: str, body: MemberRequest, request: Request, rt: RuntimeDep, key: IdempotencyKey = None) -> JSONResponse:
    """Add or update a team member (admin token). An allocation larger than the pool is 422."""

    def work(session: Session) -> tuple[int, dict[str, Any]]:
        acct = _account(session, account)
        try:
            spending.set_member(session, acct, body.member_id, allocation=body.allocation, limit_per_period=body.limit_per_period)
        except spending.AllocationTooLarge as exc:
            return 422, {"error": "allocation_too_large", "message": str(exc)}
        return 200, _members_view(session, rt, acct)

    return _once(rt, request, key, body, work)


@v1.get("/accounts/{account}/members", tags=["members"])
def get_members(account: str, rt: RuntimeDep) -> dict[str, Any]:
    """The account's members with their allocation, limit and usage this period, and the shared pool."""
    with transaction(rt.sessions) as session:
        return _members_view(session, rt, _account(session, account))


@v1.delete("/accounts/{account}/members/{member_id}", dependencies=[Depends(require_admin)], tags=["members"])
def delete_member(account: str, member_id: str, rt: RuntimeDep) -> dict[str, Any]:
    """Remove a member (admin token); its unspent allocation returns to the pool."""
    with transaction(rt.sessions) as session:
        acct = _account(session, account)
        try:
            spending.remove_member(session, acct, member_id)
        except spending.UnknownMember as exc:
            raise ApiError(404, "member_not_found", f"no member {member_id!r} in {acct.public_id}") from exc
        return _members_view(session, rt, acct)


@v1.get("/accounts/{account}/usage", tags=["accounts"])
def get_usage(account: str, rt: RuntimeDep, period: Annotated[Literal["current", "previous"], Query()] = "current") -> dict[str, Any]:
    """Credits granted, spent (by action and member), expired, reversed and remaining in a billing period."""
    with transaction(rt.sessions) as session:
        return usage.report(session, rt.catalogue, _account(session, account), period)


def _members_view(session: Session, rt: Runtime, acct: Any) -> dict[str, Any]:
    return {"account_id": acct.public_id, "pool": spending.pool(session, acct, utcnow()),
            "members": spending.members(session, rt.catalogue, acct)}


@v1.post("/accounts/{account}/referral-code", tags=["referrals"])
def post_referral_code(account: str, request: Request, rt: RuntimeDep, key: IdempotencyKey = None) -> JSONResponse:
    """The account's referral code and link; always the same code for the same account (created when new)."""

    def work(session: Session) -> tuple[int, dict[str, Any]]:
        acct = accounts.get_or_create(session, account)
        code = referrals.code_for(session, acct)
        return 200, {"code": code, "link": referrals.link(code, rt.settings.referral_link_base)}

    return _once(rt, request, key, NoBody(), work)


@v1.post(
    "/referrals",
    status_code=201,
    tags=["referrals"],
    responses={200: {"description": "the same attribution again"}, 404: {"description": "unknown code"},
               409: {"description": "the referee is attributed to someone else"}, 422: {"description": "self-referral"}},
)
def post_referral(body: ReferralRequest, request: Request, rt: RuntimeDep, key: IdempotencyKey = None) -> JSONResponse:
    """Attribute a referee to a referral code at signup. The first attribution wins and is locked."""

    def work(session: Session) -> tuple[int, dict[str, Any]]:
        referee = accounts.get_or_create(session, body.referee_account_id)
        structlog.contextvars.bind_contextvars(account_id=referee.public_id)
        try:
            made = referrals.attribute(session, rt.catalogue, referee, body.code, source="api", email=body.email)
        except referrals.UnknownCode:
            return 404, {"error": "unknown_code", "message": f"no account has the referral code {body.code!r}"}
        except referrals.AlreadyAttributed:
            return 409, {"error": "already_attributed", "message": "the referee keeps its first attribution"}
        referral = made.referral
        view = {"referral_id": referral.id, "referee_account_id": referee.public_id, "status": referral.status,
                "reason": referral.reason}
        if referral.status == "rejected":
            return 422, {"error": "self_referral", **view}
        return (201 if made.created else 200), view

    return _once(rt, request, key, body, work)


@v1.get("/accounts/{account}/referrals", tags=["referrals"])
def get_referrals(account: str, rt: RuntimeDep) -> dict[str, Any]:
    """Settings → Referrals: the code and link, credits earned, and every referral with its status."""
    with transaction(rt.sessions) as session:
        return referrals.view(session, _account(session, account), rt.settings.referral_link_base)


admin = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@admin.get("/findings")
def get_findings(rt: RuntimeDep) -> dict[str, Any]:
    """Open reconciliation findings, oldest first, with when each was first and last seen."""
    with transaction(rt.sessions) as session:
        return {"findings": findings.open_findings(session)}


def _account(session: Session, ref: str) -> Any:
    account = accounts.get(session, ref)
    structlog.contextvars.bind_contextvars(account_id=account.public_id)
    return account


def _error(status_code: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status_code)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure is JSON with a stable `error` code; a database outage is 503 so clients retry."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status_code, exc.code, exc.message, **exc.extra)

    @app.exception_handler(AccountNotFound)
    async def _not_found(_: Request, exc: AccountNotFound) -> JSONResponse:
        return _error(404, "account_not_found", f"no account or Stripe customer {exc.args[0]!r}")

    @app.exception_handler(idempotency.KeyReused)
    async def _reused(_: Request, exc: idempotency.KeyReused) -> JSONResponse:
        return _error(409, "idempotency_key_reused", "this Idempotency-Key was used with a different request")

    @app.exception_handler(idempotency.KeyInFlight)
    async def _in_flight(_: Request, exc: idempotency.KeyInFlight) -> JSONResponse:
        return _error(409, "request_in_progress", "a request with this Idempotency-Key is still running")

    @app.exception_handler(Stopped)
    async def _stopping(_: Request, exc: Stopped) -> JSONResponse:
        return _error(503, "shutting_down", "the service is shutting down; retry")

    @app.exception_handler(ledger.IdempotencyConflict)
    async def _conflict(_: Request, exc: ledger.IdempotencyConflict) -> JSONResponse:
        return _error(409, "idempotency_conflict", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        return _error(422, "invalid_request", "the request is not valid", details=details)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(DataError)
    async def _unstorable(_: Request, exc: DataError) -> JSONResponse:
        # A value the database cannot hold (a NUL character, an over-long id): the request's fault, not ours.
        return _error(422, "invalid_request", "the request holds a value that cannot be stored (e.g. a NUL character or an over-long id)")

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database.unavailable", error=str(exc.orig).splitlines()[0] if exc.orig else "")
        return _error(503, "database_unavailable", "the database is unavailable; retry later")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request.failed")
        return _error(500, "internal_error", "unexpected error; it has been logged")


class RequestContext:
    """Bind a request id to every log line of the request (from X-Request-Id, else new; echoed back) and
    log one line per request. Pure ASGI: cheaper than a BaseHTTPMiddleware on the webhook's hot path."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = given or secrets.token_hex(16)  # 32 hex digits, as uuid4().hex, without building a UUID
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started, status = time.perf_counter(), 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("request", method=scope["method"], path=scope["path"], status=status,
                     duration_ms=round((time.perf_counter() - started) * 1000, 1))


@health.get("/metrics", include_in_schema=False)
def get_metrics(request: Request, creds: Credentials, rt: RuntimeDep) -> Response:
    """Prometheus metrics; behind METRICS_TOKEN when one is set."""
    token = rt.settings.metrics_token
    if token is not None and (creds is None or not _matches(creds.credentials, token)):
        raise ApiError(401, "unauthorized", "Authorization: Bearer $METRICS_TOKEN is required")
    return Response(metrics.exposition(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


class BodyLimit:
    """Refuse request bodies over 1 MiB with 413 before anything reads them (declared or streamed)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > MAX_BODY:
            await _error(413, "body_too_large", "request bodies are limited to 1 MiB")(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise ApiError(413, "body_too_large", "request bodies are limited to 1 MiB")
            return message  # type: ignore[no-any-return]

        await self.app(scope, limited, send)


class Api(FastAPI):
    """The service's FastAPI app, with its two hot paths taken at the door.

    A Stripe delivery and a spend need none of the app's middleware or routing. So POST /webhooks/stripe
    goes straight to the webhook receiver (which caps the body and answers every failure itself) and POST
    /v1/accounts/{account}/spend to `SpendDoor`, each wrapped in RequestContext alone (the request id and
    the request log line); every other request — and whatever a door passes on — takes the usual way through
    the middleware stack. The routes stay in the router too, so the paths answer other methods, show in the
    route table and in the OpenAPI schema, as before."""

    webhook_door: ASGIApp | None = None
    spend_door: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get(USUAL_WAY):
            door = self.webhook_door if scope["path"] == webhooks.PATH else (
                self.spend_door if SPEND_DOOR.fullmatch(scope["path"]) else None)
            if door is not None:
                scope["app"] = self  # as Starlette sets it: `request.app` on the door's way too
                await door(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def error_response(self, request: Request, exc: Exception) -> Response:
        """The answer the app's exception handlers give `exc` (the most specific one registered)."""
        handler = next(self.exception_handlers[kind] for kind in type(exc).__mro__ if kind in self.exception_handlers)
        return await handler(request, exc)  # type: ignore[no-any-return]


def create_app(rt: Runtime) -> FastAPI:
    """The ASGI app for a loaded runtime; refuses tokens that would let the API token act as admin."""
    problem = rt.settings.token_problem()
    if problem:
        raise ValueError(problem)
    # The app's threads (the group commits' of webhooks and spends, the inline processor) wait on the database
    # and then for the GIL, which the event loop holds meanwhile for up to the switch interval. At Python's
    # default 5 ms that wait is taken after nearly every round trip and was most of a batch of spends' time
    # (bench/spend: a batch of 15 took 34 ms for 10 ms of CPU); the process asks for it back sooner.
    sys.setswitchinterval(SWITCH_INTERVAL)
    inline, writer, spends = InlineProcessor(rt), InboxWriter(rt.engine), Spends(rt)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        with heap.frozen():  # a full collection walking the start-up heap stalled every delivery (service/heap.py)
            yield
        await run_in_threadpool(writer.stop)  # answer the deliveries in hand
        await run_in_threadpool(spends.stop)  # and the spends
        await run_in_threadpool(inline.stop)  # finish the events in hand; the worker gets the rest

    # No OpenTelemetry here (metrics are Prometheus, logs structlog): FastAPI's native telemetry off, which
    # also spares each request its provider look-ups.
    app = Api(title="stripe-credits", version="0.1.0", description="Credit balances kept from Stripe billing.",
              lifespan=lifespan, telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.runtime = rt
    app.state.inline, app.state.writer, app.state.spends = inline, writer, spends
    app.state.metrics = CollectorRegistry()
    app.state.metrics.register(metrics.DatabaseCollector(rt.sessions, rt.settings.inbox_alert_seconds))
    install_error_handlers(app)
    app.include_router(health)
    app.include_router(v1)
    app.include_router(admin)
    receiver = webhooks.Receiver(rt.settings.webhook_secrets, writer, inline)
    app.router.routes.insert(0, webhooks.route(receiver))
    app.webhook_door, app.spend_door = RequestContext(receiver), RequestContext(SpendDoor(app))
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestContext)
    return app
