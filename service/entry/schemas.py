"""The API's request bodies and the JSON views of ledger rows (one place for the wire format)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

from service.domain import ledger, spending
from service.infra.catalogue import Catalogue
from service.infra.models import Account, Grant, LedgerEntry, utcnow
from service.infra.uow import UnitOfWork

MAX_AMOUNT = 10**12


def aware_utc(value: datetime) -> datetime:
    """Naive timestamps are taken as UTC; all are normalised to UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Amount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT, description="Credits, a positive integer.")]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
UTCDatetime = Annotated[datetime, AfterValidator(aware_utc)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrantRequest(_Body):
    """An admin grant: support credits, a goodwill gesture, a manual correction."""

    amount: Amount
    reason: Text
    expires_at: UTCDatetime | None = None


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]


# The field an action priced by formula adds to its base (`"denomination": 25`), given beside the spend's own.
FormulaField = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT, description="What the action's formula adds.")]


class SpendRequest(_Body):
    """A spend: an `amount`, or an `action` (× `quantity`) priced by the catalogue; optionally once per
    `resource`, and by a team `member_id`. An action priced by formula takes its field too, a positive integer
    (`{"action": "gift", "denomination": 25}`); which one, and that no other is given, the spend checks."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, FormulaField] = Field(init=False)

    amount: Amount | None = None
    action: Name | None = None
    quantity: Annotated[StrictInt, Field(gt=0, le=100_000)] = 1
    resource: Name | None = None
    member_id: Name | None = None
    reason: Text | None = None

    @model_validator(mode="after")
    def _amount_or_action(self) -> SpendRequest:
        if (self.amount is None) == (self.action is None):
            raise ValueError("give either amount or action")
        if self.action is None and (self.quantity != 1 or self.resource is not None):
            raise ValueError("quantity and resource go with an action")
        return self


class MemberRequest(_Body):
    """A member, set as given: with an allocation (its own credits out of the pool, or out of its team's
    allocation), a limit per billing period, or neither (it shares the pool, or its team's credits); in a team
    (`team_id`, which must exist) or not."""

    member_id: Name
    allocation: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)] | None = None
    limit_per_period: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)] | None = None
    team_id: Name | None = None


class TeamRequest(_Body):
    """A team, set as given: with an allocation (credits out of the pool for its members), a limit per billing
    period on what its members spend together, both, or neither."""

    team_id: Name
    allocation: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)] | None = None
    limit_per_period: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)] | None = None


class NoBody(_Body):
    """A POST that takes no fields (its Idempotency-Key still makes a retry safe)."""


class ReferralRequest(_Body):
    """An attribution captured at signup: the referee used this code."""

    code: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]
    referee_account_id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
    email: Annotated[str, StringConstraints(strip_whitespace=True, max_length=320)] | None = None


def grant_view(grant: Grant) -> dict[str, Any]:
    """A grant as the API shows it."""
    return {
        "id": grant.id,
        "source": grant.source,
        "amount": grant.amount,
        "remaining": grant.remaining,
        "expires_at": _iso(grant.expires_at),
    }


def entry_view(entry: LedgerEntry) -> dict[str, Any]:
    """A ledger entry as the API and `credits ledger --json` show it."""
    return {
        "id": entry.id,
        "kind": entry.kind,
        "amount": entry.amount,
        "idempotency_key": entry.idempotency_key,
        "reason": entry.reason,
        "actor": entry.actor,
        "metadata": entry.meta,
        "created_at": _iso(entry.created_at),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def balance_view(uow: UnitOfWork, account: Account) -> dict[str, Any]:
    """What GET …/balance and `credits balance` show: the spendable total and the grants it is made of."""
    grants = ledger.open_grants(uow, account)
    return {
        "account_id": account.public_id,
        "balance": sum(g.remaining for g in grants),
        "grants": [grant_view(g) for g in grants],
    }


def members_view(uow: UnitOfWork, catalogue: Catalogue, account: Account) -> dict[str, Any]:
    """What …/members and `credits members list` show: the shared pool and every member."""
    return {
        "account_id": account.public_id,
        "pool": spending.pool(uow, account, utcnow()),
        "members": spending.members(uow, catalogue, account),
    }


def teams_view(uow: UnitOfWork, catalogue: Catalogue, account: Account) -> dict[str, Any]:
    """What …/teams and `credits teams list` show: the shared pool and every team."""
    return {
        "account_id": account.public_id,
        "pool": spending.pool(uow, account, utcnow()),
        "teams": spending.teams(uow, catalogue, account),
    }
