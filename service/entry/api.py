"""The HTTP API: translates requests into domain calls and results into JSON. No domain logic here.

Each request that reads or writes opens one unit of work and commits it; a POST runs under its
Idempotency-Key (service/entry/idempotency.py), so a retry replays the first answer. The process also
processes what it receives: right after a webhook's 2xx while deliveries are quiet (webhooks/inline.py), and,
unless SERVE_WORKER is false, the worker's own drain loop on threads of its own (jobs/worker.py).
"""

from __future__ import annotations

import hmac
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import structlog
from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel, SecretStr
from sqlalchemy import text
from sqlalchemy.exc import DataError, DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs import worker
from service.domain import accounts, findings, ledger, referrals, spending, usage
from service.domain.accounts import AccountNotFound
from service.entry import contract, idempotency
from service.entry.schemas import (
    GrantRequest,
    MemberRequest,
    NoBody,
    ReferralRequest,
    SpendRequest,
    TeamRequest,
    balance_view,
    entry_view,
    grant_view,
    members_view,
    teams_view,
)
from service.infra import db, echo, logs, metrics
from service.infra.models import Account, utcnow
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork
from webhooks import router as webhooks
from webhooks.inline import InlineProcessor
from webhooks.writer import InboxWriter

log = logs.get("api")
MAX_BODY = 1024 * 1024
# Threads the plain-`def` routes run on at once (anyio's default is 40). Each holds a pooled connection for its
# transaction, and past a few, more threads only contend for the GIL (bench/README.md, "What the mechanisms
# save"). With the writer, the two inline threads and up to nine worker threads they fit in db.POOL_SIZE;
# beyond that a transaction waits for a free connection.
ROUTE_THREADS = 8
bearer = HTTPBearer(auto_error=False, description="CREDITS_API_TOKEN, or CREDITS_ADMIN_TOKEN for admin routes")


class ApiError(Exception):
    """An error answered as `{"error": code, "message": …}` with its HTTP status."""

    def __init__(self, status_code: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status_code, self.code, self.message, self.extra = status_code, code, message, extra


async def runtime(request: Request) -> Runtime:
    """The app's loaded configuration and database sessions. Async, like the other dependencies that never
    block: FastAPI runs a plain `def` dependency on its thread pool, a hand-off per dependency per request."""
    loaded: Runtime = request.app.state.runtime
    return loaded


RuntimeDep = Annotated[Runtime, Depends(runtime)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def _matches(given: str, secret: SecretStr | None) -> bool:
    return secret is not None and hmac.compare_digest(given.encode(), secret.get_secret_value().encode())


def _role(token: str, rt: Runtime) -> str | None:
    """ "admin" or "api" for a valid bearer token, else None."""
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


Work = Callable[[UnitOfWork], tuple[int, dict[str, Any]]]


# Answers that refuse what was asked and write nothing. Like a body that does not validate, they are not
# stored: the key stays free for the corrected request, as at Stripe. A 402 is a result, and replays.
REFUSALS = frozenset(
    {
        "invalid_request",
        "unknown_action",
        "allocation_too_large",
        "allocation_too_small",
        "member_not_found",
        "team_not_found",
    }
)


def _once(rt: Runtime, request: Request, key: str | None, body: BaseModel, work: Work) -> JSONResponse:
    """Run `work` in one transaction under the request's Idempotency-Key, replaying an earlier outcome; a
    refusal rolls back, claim and all."""
    client_key = _key(key)
    digest = idempotency.fingerprint(request.method, request.url.path, body.model_dump(mode="json"))
    with rt.uow() as uow:
        outcome = idempotency.run_once(uow, client_key, digest, lambda: work(uow))
        if outcome.replayed or outcome.body.get("error") not in REFUSALS:
            uow.commit()
    return _answer(outcome)


def _answer(outcome: idempotency.Outcome) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return JSONResponse(_clipped(outcome.body), status_code=outcome.status_code, headers=headers)


health = APIRouter(tags=["health"])


@health.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up. On the event loop, not a route thread: a liveness probe must answer while every
    route thread waits on an unreachable database."""
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
    with rt.uow() as uow:
        return balance_view(uow, _account(uow, account))


@v1.get(
    "/accounts/{account}/ledger",
    responses={400: {"description": "invalid_cursor: a cursor that is no next_cursor of an earlier page"}},
)
def get_ledger(
    account: str,
    rt: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor from the previous page")] = None,
) -> dict[str, Any]:
    """Ledger entries, newest first; pass `next_cursor` back as `cursor` for the next page."""
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise ApiError(400, "invalid_cursor", "cursor must be a next_cursor value from an earlier page")
    with rt.uow() as uow:
        entries = ledger.history(uow, _account(uow, account), limit + 1, int(cursor) if cursor else None)
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

    def work(uow: UnitOfWork) -> tuple[int, dict[str, Any]]:
        acct = accounts.get_or_create(uow, account)
        structlog.contextvars.bind_contextvars(account_id=acct.public_id)
        posted = ledger.grant(
            uow,
            acct,
            body.amount,
            source="admin",
            key=idempotency.scoped("grant", acct.public_id, _key(key)),
            reason=body.reason,
            actor="api:admin",
            expires_at=body.expires_at,
        )
        created = ledger.grant_of(uow, posted.entry.idempotency_key)
        assert created is not None  # a grant entry always has its grant
        view = balance_view(uow, acct)
        return 201, {**view, "entry_id": posted.entry.id, "grant": grant_view(created)}

    return _once(rt, request, key, body, work)


@v1.post(
    "/accounts/{account}/spend",
    responses={
        402: {"description": "insufficient_credits, member_limit_reached or team_limit_reached: nothing was spent"},
        404: {"description": "unknown account or member"},
        422: {"description": "unknown action; a formula's field missing or not a positive integer, or one not taken"},
    },
)
def post_spend(
    account: str, body: SpendRequest, request: Request, rt: RuntimeDep, key: IdempotencyKey = None
) -> JSONResponse:
    """Spend credits, soonest-expiring first: an amount, or an action priced by the catalogue. With a
    `resource`, once per (action, resource) in the account; with a `member_id`, from that member's allocation
    (or its team's) and within its limit and its team's — and never more than the balance. 402 when short;
    nothing is then spent."""
    fields = body.model_extra or {}
    try:  # the field an action priced by formula adds, checked like the rest of the body: before anything else
        spending.check_fields(rt.catalogue, body.action, fields)
    except spending.FieldRefused as refused:
        details = [{"loc": ["body", refused.field], "message": refused.problem}]
        raise ApiError(422, "invalid_request", str(refused), details=details) from refused

    def work(uow: UnitOfWork) -> tuple[int, dict[str, Any]]:
        acct = _account(uow, account, lock=True)
        charge = spending.Charge(
            body.amount, body.action, body.quantity, body.resource, body.member_id, body.reason, fields
        )
        try:
            spent = spending.spend(
                uow, rt.catalogue, acct, charge, key=idempotency.scoped("spend", acct.public_id, _key(key))
            )
        except ledger.InsufficientCredits as refused:
            log.info("spend.refused", available=refused.available, requested=refused.requested)
            return 402, {
                "error": "insufficient_credits",
                "message": str(refused),
                "balance": refused.available,
                "requested": refused.requested,
            }
        except spending.MemberLimitReached as refused:
            return 402, {
                "error": "member_limit_reached",
                "message": str(refused),
                "limit": refused.limit,
                "used": refused.used,
                "requested": refused.requested,
            }
        except spending.TeamLimitReached as refused:
            return 402, {
                "error": "team_limit_reached",
                "message": str(refused),
                "team_id": refused.team_id,
                "limit": refused.limit,
                "used": refused.used,
                "requested": refused.requested,
            }
        except spending.UnknownMember:
            return 404, {
                "error": "member_not_found",
                "message": f"no member {echo.quoted(body.member_id)} in {echo.quoted(acct.public_id)}",
            }
        except spending.UnknownAction as unknown:
            return 422, {"error": "unknown_action", "message": str(unknown), "known_actions": unknown.known}
        given = {
            name: value
            for name, value in (
                ("action", body.action),
                ("quantity", body.quantity if body.action else None),
                *fields.items(),
                ("resource", body.resource),
                ("member_id", body.member_id),
            )
            if value is not None
        }
        return 200, {
            "balance": spent.balance,
            "spent": spent.charged,
            "charged": spent.charged,
            "entry_id": spent.entry_id,
            **given,
        }

    return _once(rt, request, key, body, work)


@v1.post(
    "/accounts/{account}/members",
    dependencies=[Depends(require_admin)],
    tags=["members"],
    responses={
        404: {"description": "unknown account or team"},
        422: {"description": "allocation_too_large: more than the pool (in a team with an allocation, the team's)"},
    },
)
def post_member(
    account: str, body: MemberRequest, request: Request, rt: RuntimeDep, key: IdempotencyKey = None
) -> JSONResponse:
    """Add or set a member (admin token), as given: its allocation, limit and team. An allocation larger than
    the pool (in a team with an allocation, than the team's unallocated credits) is 422; an unknown team 404."""

    def work(uow: UnitOfWork) -> tuple[int, dict[str, Any]]:
        acct = _account(uow, account, lock=True)
        try:
            spending.set_member(
                uow,
                acct,
                body.member_id,
                allocation=body.allocation,
                limit_per_period=body.limit_per_period,
                team_id=body.team_id,
            )
        except spending.AllocationTooLarge as exc:
            return 422, {"error": "allocation_too_large", "message": str(exc)}
        except spending.UnknownTeam:
            return 404, {
                "error": "team_not_found",
                "message": f"no team {echo.quoted(body.team_id)} in {echo.quoted(acct.public_id)}",
            }
        return 200, members_view(uow, rt.catalogue, acct)

    return _once(rt, request, key, body, work)


@v1.get("/accounts/{account}/members", tags=["members"])
def get_members(account: str, rt: RuntimeDep) -> dict[str, Any]:
    """The account's members with their allocation, limit and usage this period, and the shared pool."""
    with rt.uow() as uow:
        return members_view(uow, rt.catalogue, _account(uow, account))


@v1.delete("/accounts/{account}/members/{member_id}", dependencies=[Depends(require_admin)], tags=["members"])
def delete_member(account: str, member_id: str, rt: RuntimeDep) -> dict[str, Any]:
    """Remove a member (admin token); its unspent allocation returns to the pool (or to its team's allocation)."""
    with rt.uow() as uow:
        acct = _account(uow, account, lock=True)
        try:
            spending.remove_member(uow, acct, member_id)
        except spending.UnknownMember as exc:
            raise ApiError(
                404, "member_not_found", f"no member {echo.quoted(member_id)} in {echo.quoted(acct.public_id)}"
            ) from exc
        view = members_view(uow, rt.catalogue, acct)
        uow.commit()
        return view


@v1.post(
    "/accounts/{account}/teams",
    dependencies=[Depends(require_admin)],
    tags=["members"],
    responses={
        422: {
            "description": "allocation_too_large (more than the pool) or allocation_too_small (less than its members')"
        }
    },
)
def post_team(
    account: str, body: TeamRequest, request: Request, rt: RuntimeDep, key: IdempotencyKey = None
) -> JSONResponse:
    """Add or set a team (admin token), as given: its allocation and limit per billing period. An allocation
    larger than the pool is 422 `allocation_too_large`; one smaller than its members' allocations, 422
    `allocation_too_small`."""

    def work(uow: UnitOfWork) -> tuple[int, dict[str, Any]]:
        acct = _account(uow, account, lock=True)
        try:
            spending.set_team(
                uow, acct, body.team_id, allocation=body.allocation, limit_per_period=body.limit_per_period
            )
        except spending.AllocationTooLarge as exc:
            return 422, {"error": "allocation_too_large", "message": str(exc)}
        except spending.AllocationTooSmall as exc:
            return 422, {"error": "allocation_too_small", "message": str(exc)}
        return 200, teams_view(uow, rt.catalogue, acct)

    return _once(rt, request, key, body, work)


@v1.get("/accounts/{account}/teams", tags=["members"])
def get_teams(account: str, rt: RuntimeDep) -> dict[str, Any]:
    """The account's teams with their allocation, limit, usage this period and members, and the shared pool."""
    with rt.uow() as uow:
        return teams_view(uow, rt.catalogue, _account(uow, account))


@v1.get("/accounts/{account}/usage", tags=["accounts"])
def get_usage(
    account: str, rt: RuntimeDep, period: Annotated[Literal["current", "previous"], Query()] = "current"
) -> dict[str, Any]:
    """Credits granted, spent (by action, member and team), expired, reversed and remaining in a billing period."""
    with rt.uow() as uow:
        return usage.report(uow, rt.catalogue, _account(uow, account), period)


@v1.post("/accounts/{account}/referral-code", tags=["referrals"])
def post_referral_code(account: str, request: Request, rt: RuntimeDep, key: IdempotencyKey = None) -> JSONResponse:
    """The account's referral code and link; always the same code for the same account (created when new)."""

    def work(uow: UnitOfWork) -> tuple[int, dict[str, Any]]:
        acct = accounts.get_or_create(uow, account)
        code = referrals.code_for(uow, acct)
        return 200, {"code": code, "link": referrals.link(code, rt.settings.referral_link_base)}

    return _once(rt, request, key, NoBody(), work)


@v1.post(
    "/referrals",
    status_code=201,
    tags=["referrals"],
    responses={
        200: {"description": "the same attribution again"},
        404: {"description": "unknown code"},
        409: {"description": "the referee is attributed to someone else"},
        422: {"description": "self-referral"},
    },
)
def post_referral(body: ReferralRequest, request: Request, rt: RuntimeDep, key: IdempotencyKey = None) -> JSONResponse:
    """Attribute a referee to a referral code at signup. The first attribution wins and is locked."""

    def work(uow: UnitOfWork) -> tuple[int, dict[str, Any]]:
        referee = accounts.get_or_create(uow, body.referee_account_id)
        structlog.contextvars.bind_contextvars(account_id=referee.public_id)
        try:
            made = referrals.attribute(uow, rt.catalogue, referee, body.code, source="api", email=body.email)
        except referrals.UnknownCode:
            return 404, {
                "error": "unknown_code",
                "message": f"no account has the referral code {echo.quoted(body.code)}",
            }
        except referrals.AlreadyAttributed:
            return 409, {"error": "already_attributed", "message": "the referee keeps its first attribution"}
        referral = made.referral
        view = {
            "referral_id": referral.id,
            "referee_account_id": referee.public_id,
            "status": referral.status,
            "reason": referral.reason,
        }
        if referral.status == "rejected":
            return 422, {"error": "self_referral", "message": "an account cannot refer itself", **view}
        return (201 if made.created else 200), view

    return _once(rt, request, key, body, work)


@v1.get("/accounts/{account}/referrals", tags=["referrals"])
def get_referrals(account: str, rt: RuntimeDep) -> dict[str, Any]:
    """Settings → Referrals: the code and link, credits earned, and every referral with its status."""
    with rt.uow() as uow:
        return referrals.view(uow, _account(uow, account), rt.settings.referral_link_base)


admin = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@admin.get("/findings")
def get_findings(rt: RuntimeDep) -> dict[str, Any]:
    """Open reconciliation findings, oldest first, with when each was first and last seen."""
    with rt.uow() as uow:
        return {"findings": findings.open_findings(uow)}


@admin.get("/referrals")
def get_admin_referrals(
    rt: RuntimeDep,
    status: Annotated[referrals.Status | None, Query(description="only referrals in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Referrals for support, oldest first: held ones wait for `credits referrals release`, rejected ones say why."""
    with rt.uow() as uow:
        return {"referrals": referrals.listing(uow, status, limit)}


def _account(uow: UnitOfWork, ref: str, *, lock: bool = False) -> Account:
    account = accounts.get(uow, ref, lock=lock)
    structlog.contextvars.bind_contextvars(account_id=account.public_id)
    return account


MESSAGE = 300  # characters of an error's message at most


def _clipped(body: dict[str, Any]) -> dict[str, Any]:
    """An error body that repeats no more than a short prefix of what was sent: its message at most MESSAGE
    characters, each name in a `details` location at most echo.MOST."""
    if "error" not in body:
        return body
    short = {**body, "message": echo.clipped(str(body.get("message", "")), MESSAGE)}
    if isinstance(body.get("details"), list):
        short["details"] = [
            {**d, "loc": [echo.clipped(p) if isinstance(p, str) else p for p in d["loc"]]} for d in body["details"]
        ]
    return short


def _methods_of(scope: Scope) -> list[str]:
    """Every method the request's path takes, across the routes that share it (Starlette's 405 names only the
    first route it matched)."""
    methods: set[str] = set()
    for route in [*health.routes, *v1.routes, *admin.routes]:
        if isinstance(route, APIRoute) and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _error(status_code: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(_clipped({"error": code, "message": message, **extra}), status_code=status_code)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure is JSON with a stable `error` code; a database outage is 503 so clients retry."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status_code, exc.code, exc.message, **exc.extra)

    @app.exception_handler(AccountNotFound)
    async def _not_found(_: Request, exc: AccountNotFound) -> JSONResponse:
        return _error(404, "account_not_found", f"no account or Stripe customer {echo.quoted(exc.args[0])}")

    @app.exception_handler(idempotency.KeyReused)
    async def _reused(_: Request, exc: idempotency.KeyReused) -> JSONResponse:
        return _error(409, "idempotency_key_reused", "this Idempotency-Key was used with a different request")

    @app.exception_handler(ledger.IdempotencyConflict)
    async def _conflict(_: Request, exc: ledger.IdempotencyConflict) -> JSONResponse:
        return _error(409, "idempotency_conflict", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        return _error(422, "invalid_request", "the request is not valid", details=details)

    @app.exception_handler(BodyTooLarge)
    async def _too_large_body(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return _too_large()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        response = _error(exc.status_code, "http_error", str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_methods_of(request.scope))
        return response

    @app.exception_handler(DataError)
    async def _unstorable(_: Request, exc: DataError) -> JSONResponse:
        # A value the database cannot hold (a NUL character, an over-long id): the request's fault, not ours.
        return _error(
            422,
            "invalid_request",
            "the request holds a value that cannot be stored (e.g. a NUL character or an over-long id)",
        )

    async def _db_down(_: Request, exc: Exception) -> JSONResponse:
        detail = str(exc.orig if isinstance(exc, DBAPIError) else exc)
        log.error("database.unavailable", error=(detail.splitlines() or [type(exc).__name__])[0])
        return _error(503, "database_unavailable", "the database is unavailable; retry later")

    for unavailable in db.UNAVAILABLE:
        app.add_exception_handler(unavailable, _db_down)


class RequestContext:
    """Bind a request id to every log line of the request (from X-Request-Id, else new; echoed back), log one
    line per request, and answer an unexpected error as a JSON 500 that carries the request id (logged with
    its traceback) — here, the outermost of the app's own layers, so that even that answer has the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = given or f"{random.getrandbits(128):032x}"  # an id, not a secret: no system call for it
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        began, status, started = time.perf_counter(), 500, False

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request.failed")
            if started:
                raise
            await _error(500, "internal_error", "unexpected error; it has been logged")(scope, receive, send_with_id)
        finally:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - began) * 1000, 1),
            )


@health.get("/metrics", include_in_schema=False)
def get_metrics(request: Request, creds: Credentials, rt: RuntimeDep) -> Response:
    """Prometheus metrics: behind METRICS_TOKEN (or the admin token) unless METRICS_PUBLIC=true."""
    settings = rt.settings
    if not settings.metrics_public:
        given = creds.credentials if creds is not None else ""
        if not given or not any(_matches(given, t) for t in (settings.metrics_token, settings.credits_admin_token)):
            raise ApiError(
                401, "unauthorized", "Authorization: Bearer $METRICS_TOKEN is required (or METRICS_PUBLIC=true)"
            )
    return Response(metrics.exposition(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


class BodyTooLarge(HTTPException):
    """A request body over MAX_BODY, found while it is read."""

    def __init__(self) -> None:
        super().__init__(413, "request bodies are limited to 1 MiB")


class BodyLimit:
    """Refuse request bodies over 1 MiB with 413 before anything reads them: a declared length at once, a
    streamed body as soon as it passes the limit (every endpoint reads its body before answering)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > MAX_BODY:
            await _too_large()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:  # FastAPI's routes answer it themselves (install_error_handlers); the webhook does not
            await _too_large()(scope, receive, send)


def _too_large() -> JSONResponse:
    return _error(413, "body_too_large", "request bodies are limited to 1 MiB")


class Service(FastAPI):
    """The service's app: Stripe's deliveries taken at the door, everything else through FastAPI.

    The webhook endpoint reads the raw body and answers every failure itself, so FastAPI's layers (its
    middleware, exception handling and routing) would only cost each delivery API CPU: 5–7% of what accepting
    one costs (bench/README.md, "What the mechanisms save"). A delivery gets the two layers of ours it needs:
    the request context and the body limit."""

    webhook: ASGIApp  # set by create_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == webhooks.PATH:
            await self.webhook(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(rt: Runtime) -> Service:
    """The ASGI app for a loaded runtime; refuses tokens that would let the API token act as admin."""
    problem = rt.settings.token_problem()
    if problem:
        raise ValueError(problem)
    inline, writer = InlineProcessor(rt), InboxWriter(rt)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        to_thread.current_default_thread_limiter().total_tokens = ROUTE_THREADS
        stop = threading.Event()
        drains = threading.Thread(target=worker.run_beside_the_api, args=(rt, stop), name="worker", daemon=True)
        if rt.settings.serve_worker:
            drains.start()
        yield
        stop.set()
        await run_in_threadpool(writer.stop)  # store the deliveries in hand
        await run_in_threadpool(inline.stop)  # finish the events in hand; the worker gets the rest
        if drains.is_alive():
            await run_in_threadpool(drains.join)

    # Metrics are Prometheus and logs structlog: FastAPI's own OpenTelemetry hooks are off.
    app = Service(
        title="stripe-credits",
        version="0.1.0",
        description="Credit balances kept from Stripe billing.",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.runtime = rt
    app.state.inline = inline
    app.state.metrics = CollectorRegistry()
    app.state.metrics.register(metrics.DatabaseCollector(rt.sessions, rt.settings.inbox_alert_seconds))
    install_error_handlers(app)
    app.include_router(health)
    app.include_router(v1)
    app.include_router(admin)
    contract.install(app, [v1, admin], require_admin)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestContext)
    app.webhook = RequestContext(BodyLimit(webhooks.endpoint(rt, writer, inline.submit)))
    return app
