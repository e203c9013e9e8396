"""The TOML catalogue: plans, packs, the free allowance, referral terms and action prices.

It is validated completely at start-up so that a typo stops the service with the offending line named,
instead of surfacing later as a webhook that cannot be credited.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

Credits = Annotated[int, Field(ge=0, strict=True)]
Rollover = Literal["none", "cap", "all"]


class CatalogueError(ValueError):
    """The catalogue cannot be used; the message names the file, the line and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RolloverPolicy(_Strict):
    """What happens at renewal to credits granted under this policy (README.md, Refills)."""

    credits: Credits
    rollover: Rollover = "cap"
    rollover_cap: Annotated[float, Field(ge=0)] = 2.0

    def carry_limit(self, incoming: int | None = None) -> int | None:
        """Most credits under the policy held after a renewal grant of `incoming` lands (by default the
        policy's `credits`; more for a plan priced per seat); None means no limit."""
        granted = self.credits if incoming is None else incoming
        if self.rollover == "all":
            return None
        if self.rollover == "none":
            return granted
        return int(self.rollover_cap * granted)


class Plan(RolloverPolicy):
    """A subscription plan; `credits` are granted per paid invoice (a year's worth on an annual plan)."""

    prices: Annotated[list[str], Field(min_length=1)]
    interval: Literal["month", "year"] = "month"
    # Priced per seat: an invoice grants `credits` for each unit of its line's quantity.
    per_seat: bool = False

    def credits_for(self, quantity: int) -> int:
        """Credits an invoice for `quantity` units of the plan grants."""
        return self.credits * max(1, quantity) if self.per_seat else self.credits


class Pack(_Strict):
    """A one-time credit pack, named by `metadata.pack` or matched by its price."""

    prices: list[str] = []
    credits: Annotated[int, Field(gt=0, strict=True)]
    expires_after_days: Annotated[int, Field(gt=0, strict=True)] | None = None


class Free(RolloverPolicy):
    """The monthly allowance of accounts without a paid plan."""

    credits: Credits = 0


class Referrals(_Strict):
    """Referral terms: who is paid what, and when (README.md, Referrals)."""

    qualify_on: Literal["first_paid_invoice", "signup"] = "first_paid_invoice"
    referrer_credits: Credits = 0
    referee_credits: Credits = 0
    min_amount: Credits = 1
    clawback_days: Credits = 30
    max_rewards_per_referrer_per_month: Credits = 100
    # "policy": a payout counts under the account's rollover policy, which a renewal or free refill may cut;
    # "never": a payout is a grant of its own that no renewal cuts. Each grant records the choice it was made
    # under, so changing it never rewrites past payouts.
    rollover: Literal["policy", "never"] = "policy"
    expires_after_days: Annotated[int, Field(gt=0, strict=True)] | None = None


# Names a priced action's field cannot take: the spend body's own fields, and the keys a spend's ledger metadata
# already uses (tests/test_action_prices.py keeps this in step with the spend body).
SPEND_FIELDS = frozenset({"amount", "action", "quantity", "resource", "member_id", "team_id", "reason", "base"})


class ActionPrice(_Strict):
    """An action priced by formula: `base` plus the positive integer the spend gives in its field `add`
    (`[actions.gift]` with `base = 8`, `add = "denomination"`: a gift of 25 costs 33), × quantity."""

    base: Credits
    add: Annotated[str, Field(strict=True, pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]

    @field_validator("add")
    @classmethod
    def _not_a_spend_field(cls, name: str) -> str:
        if name in SPEND_FIELDS:
            raise ValueError(f"{name!r} is taken by every spend (its body or its ledger metadata); name another field")
        return name


def _price_kind(value: Any) -> str:
    """Which of the price forms a value is, so a bad table's error names the table's own keys."""
    return "formula" if isinstance(value, dict | ActionPrice) else "flat"


# A flat price (`postcard_us = 1`) or a table priced by formula (`[actions.gift]`). The tag keeps a bad table's
# error to the table's own keys (load() leaves the tag out of the key it names).
Price = Annotated[
    Annotated[Annotated[int, Field(gt=0, strict=True)], Tag("flat")] | Annotated[ActionPrice, Tag("formula")],
    Discriminator(_price_kind),
]


class Catalogue(_Strict):
    """The whole catalogue with its look-ups."""

    plans: dict[str, Plan] = {}
    packs: dict[str, Pack] = {}
    free: Free = Free()
    referrals: Referrals = Referrals()
    actions: dict[str, Price] = {}

    @model_validator(mode="after")
    def _each_price_means_one_thing(self) -> Catalogue:
        seen: dict[str, str] = {}
        for kind, items in (("plans", self.plans), ("packs", self.packs)):
            for name, item in items.items():
                for price in item.prices:
                    owner = f"{kind}.{name}"
                    if price in seen:
                        raise ValueError(f"price {price!r} is in both {seen[price]} and {owner}")
                    seen[price] = owner
        return self

    def plan_for_price(self, price_id: str) -> tuple[str, Plan] | None:
        """The plan a Stripe price (or legacy plan) id stands for, if the catalogue knows it."""
        return next(((n, p) for n, p in self.plans.items() if price_id in p.prices), None)

    def pack_for_price(self, price_id: str) -> tuple[str, Pack] | None:
        """The pack a Stripe price id stands for, if the catalogue knows it."""
        return next(((n, p) for n, p in self.packs.items() if price_id in p.prices), None)


def load(path: Path) -> Catalogue:
    """Read and validate the catalogue at `path`, or raise CatalogueError naming the line at fault."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read the catalogue ({exc.strerror})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Catalogue.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        if loc[:1] == ["actions"] and len(loc) > 2:
            del loc[2]  # the price's kind (flat or formula) is the union's tag, not a key
        message = first["msg"]
        if first["type"] == "value_error" and not loc:
            price = re.search(r"price '([^']+)'", message)
            line = _line_of_value(text, price.group(1)) if price else None
        else:
            line = _line_of_key(text, loc)
        where = f"{path}:{line}" if line else str(path)
        key = ".".join(loc) or "catalogue"
        raise CatalogueError(f"{where}: {key}: {message}") from exc


def _line_of_key(text: str, loc: list[str]) -> int | None:
    """The 1-based line that defines the key at `loc` (e.g. plans.starter.credits), best effort.

    tomllib keeps no positions, so this walks the table headers: the deepest header that is a prefix of
    `loc` opens the section, and the next path element is looked up as a key inside it.
    """
    table: list[str] = []
    best: int | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        header = re.fullmatch(r"\[([^\[\]]+)\]", line)
        if header:
            table = [part.strip().strip('"') for part in header.group(1).split(".")]
            if loc[: len(table)] == table:
                best = number
            continue
        key = re.match(r"([A-Za-z0-9_\-\"]+)\s*=", line)
        if key and loc[: len(table)] == table and len(loc) > len(table) and key.group(1).strip('"') == loc[len(table)]:
            return number
    return best


def _line_of_value(text: str, value: str) -> int | None:
    """The last line mentioning `value` in quotes: for a duplicate, the second occurrence is the culprit."""
    hits = [n for n, raw in enumerate(text.splitlines(), start=1) if f'"{value}"' in raw]
    return hits[-1] if hits else None
