"""The end-to-end benchmark's customers: who signs up in which month, on which plan, who was referred by
whom, who renews and who buys a pack — and what every balance must be once all of it is processed.

Billing time is compressed into `months` waves. Month m brings new signups (customer, Checkout session,
subscription, first invoice paid), the renewals of every monthly subscription signed up before m, and pack
purchases; a wave starts only once the previous one is processed, as a month passes between an invoice and
its renewal in real life. That matters for the balances, not for the service: a renewal's rollover cuts
what is held *before* it, so a renewal handled ahead of its account's earlier invoice — possible whenever
both are in the inbox at once, since the API's inline threads and the worker take events side by side —
would end at another (also correct) balance. Within a wave everything is order-independent by construction:

- a referee's payout always lands after its own first invoice (it qualifies on that paid invoice), and its
  renewals come in later waves;
- referrers are annual-plan accounts that signed up in month 1 — no renewal inside the run, so the payouts
  they receive in later months never race a rollover of their own; each gets far fewer than the
  catalogue's `max_rewards_per_referrer_per_month`, so none is held;
- packs are outside every rollover policy.

Every draw depends only on (seed, month, i), so the first N signups of a month are the same whatever the
total: the number of signups per month is the smallest that gives at least the requested number of events.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from service.catalogue import Catalogue


@dataclass(frozen=True)
class Offer:
    """A plan as the mix sells it: the catalogue's plan name, the Stripe price that means it, what an
    invoice charges, how often it is chosen, and whether it renews monthly (inside the run)."""

    plan: str
    price: str
    amount: int
    weight: int
    monthly: bool


OFFERS = (
    Offer("starter", "price_starter_monthly", 34_900, 60, True),
    Offer("pro", "price_pro_monthly", 79_900, 20, True),
    Offer("outreach", "price_outreach_monthly", 14_900, 10, True),
    Offer("pro_annual", "price_pro_annual", 799_000, 10, False),
)
PACK, PACK_AMOUNT = "boost", 4_900  # metadata.pack of every purchase, and what it charges
REFERRED_SHARE = 0.4  # of the signups after month 1, the share that arrive with a referral code
PACK_SHARE = 0.25  # chance that an account buys a pack in a given month (its signup month included)
CARRIERS = ("checkout", "customer", "subscription")  # where a referee's referral_code travels

# The events of one account in one month, in the order Stripe sends them (one chain of the load generator).
SIGNUP = ("customer.created", "checkout.session.completed", "customer.subscription.created", "invoice.paid",
          "invoice.payment_succeeded")
RENEWAL = ("invoice.paid", "invoice.payment_succeeded", "customer.subscription.updated")
PURCHASE = ("checkout.session.completed", "payment_intent.succeeded")


@dataclass(frozen=True)
class Account:
    """One customer of the mix; `referrer` is the referrer's `key`, `carrier` where the code travels."""

    key: str  # "<month>_<i>", stable whatever the mix's size
    offer: Offer
    month: int
    referrer: str | None
    carrier: str | None
    packs: frozenset[int]


@dataclass(frozen=True)
class Chain:
    """What one account does in one month: its signup or renewal (or neither) and a pack or not."""

    account: Account
    month: int

    @property
    def signup(self) -> bool:
        return self.month == self.account.month

    @property
    def invoice(self) -> bool:
        return self.signup or (self.account.offer.monthly and self.month > self.account.month)

    @property
    def pack(self) -> bool:
        return self.month in self.account.packs

    @property
    def kinds(self) -> tuple[str, ...]:
        return (SIGNUP if self.signup else RENEWAL if self.invoice else ()) + (PURCHASE if self.pack else ())


@dataclass(frozen=True)
class Mix:
    months: int
    seed: int
    accounts: tuple[Account, ...]

    def chains(self, month: int) -> list[Chain]:
        """The month's chains, in the accounts' order (the load generator interleaves C of them)."""
        chains = (Chain(account, month) for account in self.accounts if account.month <= month)
        return [chain for chain in chains if chain.kinds]

    @property
    def events(self) -> int:
        return sum(len(c.kinds) for m in range(1, self.months + 1) for c in self.chains(m))

    @property
    def referrers(self) -> list[Account]:
        """Accounts whose referral code some referee carries: their codes are made before the clock starts."""
        keys = {a.referrer for a in self.accounts if a.referrer}
        return [a for a in self.accounts if a.key in keys]

    def counts(self) -> dict[str, dict[str, int]]:
        """Events by type, and the mix's shape (signups, renewals, pack purchases, referred signups, referrers)."""
        types: dict[str, int] = defaultdict(int)
        shape: dict[str, int] = defaultdict(int)
        for m in range(1, self.months + 1):
            for chain in self.chains(m):
                for kind in chain.kinds:
                    types[kind] += 1
                shape["signups"] += chain.signup
                shape["renewals"] += chain.invoice and not chain.signup
                shape["pack purchases"] += chain.pack
                shape["referred signups"] += chain.signup and chain.account.referrer is not None
        shape["referrers"] = len(self.referrers)
        return {"types": dict(types), "shape": dict(shape)}


def _draw(seed: int, month: int, i: int, months: int, referrers: list[str]) -> Account:
    rng = random.Random(f"{seed}:{month}:{i}")
    offer = OFFERS[-1] if (month, i) == (1, 0) else rng.choices(OFFERS, [o.weight for o in OFFERS])[0]
    referred = month > 1 and referrers and rng.random() < REFERRED_SHARE
    return Account(
        key=f"{month}_{i}",
        offer=offer,
        month=month,
        referrer=rng.choice(referrers) if referred else None,
        carrier=rng.choice(CARRIERS) if referred else None,
        packs=frozenset(m for m in range(month, months + 1) if rng.random() < PACK_SHARE),
    )


def _mix(per_month: int, months: int, seed: int) -> Mix:
    accounts: list[Account] = []
    for month in range(1, months + 1):
        referrers = [a.key for a in accounts if a.month == 1 and not a.offer.monthly]
        accounts += [_draw(seed, month, i, months, referrers) for i in range(per_month)]
    return Mix(months, seed, tuple(accounts))


def plan(events: int, months: int, seed: int) -> Mix:
    """The smallest mix with at least `events` events (its signups per month found by bisection)."""
    low, high = 1, max(1, -(-events // (len(SIGNUP) * months)))  # a signup alone is 5 events
    while low < high:
        mid = (low + high) // 2
        if _mix(mid, months, seed).events >= events:
            high = mid
        else:
            low = mid + 1
    return _mix(low, months, seed)


def check_catalogue(catalogue: Catalogue) -> None:
    """Fail before anything starts if the catalogue no longer sells what the mix buys."""
    for offer in OFFERS:
        found = catalogue.plan_for_price(offer.price)
        if not found or found[0] != offer.plan:
            raise SystemExit(f"bench.e2e: {offer.price} is not plan {offer.plan!r} in the catalogue")
        if offer.monthly == (catalogue.plans[offer.plan].interval == "year"):
            raise SystemExit(f"bench.e2e: plan {offer.plan!r} does not renew as the mix assumes")
    if PACK not in catalogue.packs:
        raise SystemExit(f"bench.e2e: pack {PACK!r} is not in the catalogue")
    if catalogue.referrals.qualify_on != "first_paid_invoice":
        raise SystemExit("bench.e2e: the mix assumes referrals qualify on the first paid invoice")


def expected_balances(mix: Mix, catalogue: Catalogue, delivered: dict[int, set[str]]) -> dict[str, int]:
    """Each account's balance once the chains in `delivered` (month → account keys) are processed,
    computed from the catalogue alone, independently of the service's code: a paid invoice first cuts the
    credits held under its plan's rollover policy (plan and referral credits) to what may carry over, then
    grants the plan's credits; the referee's first invoice pays both referral sides; packs add outside the
    policy (their 365-day expiry is far away)."""
    policy: dict[str, int] = defaultdict(int)
    packs: dict[str, int] = defaultdict(int)
    terms = catalogue.referrals
    for month in range(1, mix.months + 1):
        for chain in _delivered(mix, month, delivered):
            key, plan = chain.account.key, catalogue.plans[chain.account.offer.plan]
            if chain.invoice:
                limit = plan.carry_limit()
                if limit is not None:
                    policy[key] = min(policy[key], max(0, limit - plan.credits))
                policy[key] += plan.credits
            if chain.signup and chain.account.referrer:
                policy[key] += terms.referee_credits
                policy[chain.account.referrer] += terms.referrer_credits
            if chain.pack:
                packs[key] += catalogue.packs[PACK].credits
    return {key: policy[key] + packs[key] for key in {*policy, *packs}}


def _delivered(mix: Mix, month: int, delivered: dict[int, set[str]]) -> Iterator[Chain]:
    keys = delivered.get(month, set())
    return (chain for chain in mix.chains(month) if chain.account.key in keys)
