"""A fake Stripe API for the reconcile benchmark, and the dataset both it and the seeding derive from an index.
`python -m bench.fake_stripe --port P --count N --newest EPOCH`.

Item i (0 = newest, as Stripe lists) is a customer of its own paying the `starter` plan once in the window:
every 10th invoice is a subscription's first (its customer and Checkout session created ten minutes before
it, inside the window); every 200th a referred signup, paid; every 1000th (offset 500) never reached the
service (a `missing_refill`); every 5000th (offset 10) a customer whose metadata carries a referral code the
service never saw (a `missed_referral_payout`). Lists are paged as Stripe pages them (`limit`,
`starting_after`, `has_more`, newest first, `created[gte]`/`created[lte]`) and stamped from templates when
asked for, so the server holds no list. Anything else is a 404, which reconcile treats as an error: a new
call shows up as a broken benchmark, not a silent one.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property

from aiohttp import web

from bench import events

PRICE, PLAN, CREDITS, AMOUNT_PAID, REFERRAL_CREDITS, REFERRERS = (
    "price_starter_monthly",
    "starter",
    2000,
    34900,
    3000,
    10,
)
SPAN, PERIOD, SIGNUP = (
    2 * 86400,
    30 * 86400,
    600,
)  # invoices over the window's last two days; a period; signup → invoice
T_PAID, T_END = 1_111_111_111, 1_222_222_222  # stand-ins for the two times in a template
ID = re.compile(r"^(?:in|evt|cus|sub|cs)_b(\d{7})$")


def referrer_code(k: int) -> str:
    return f"BREF{k:02d}"


@dataclass(frozen=True)
class Dataset:
    count: int
    newest: int

    def tag(self, i: int) -> str:
        return f"b{i:07d}"

    def created(self, i: int) -> int:
        return self.newest - (i * SPAN) // max(self.count, 1)

    def customer_created(self, i: int) -> int:
        return self.created(i) - (SIGNUP if self.first(i) else PERIOD)

    first = staticmethod(lambda i: i % 10 == 0)
    referred = staticmethod(lambda i: i % 200 == 0)
    missing = staticmethod(lambda i: i % 1000 == 500)
    carries_code = staticmethod(lambda i: i % 5000 == 10)

    def expected(self) -> dict[str, int]:
        return {
            "missing_refill": sum(map(self.missing, range(self.count))),
            "missed_referral_payout": sum(map(self.carries_code, range(self.count))),
        }

    def invoice_json(self, i: int) -> str:
        return self._stamp(self._templates[0][self.first(i)], i)

    def event_json(self, i: int) -> str:
        return self._stamp(self._templates[1][self.first(i)], i)

    def customer_json(self, i: int) -> str:
        code = {"referral_code": referrer_code(i % REFERRERS)} if self.carries_code(i) else {}
        obj = events.recorded(
            "customer",
            id=f"cus_{self.tag(i)}",
            email=f"{self.tag(i)}@example.com",
            metadata={"account_id": f"acct_{self.tag(i)}", **code},
        )
        return json.dumps(obj | {"created": self.customer_created(i)}, indent=2)

    def checkout_json(self, i: int) -> str:
        obj = events.checkout_session(
            session_id=f"cs_{self.tag(i)}",
            customer=f"cus_{self.tag(i)}",
            client_reference_id=None,
            mode="subscription",
            payment_intent=None,
            subscription=f"sub_{self.tag(i)}",
            amount_total=AMOUNT_PAID,
            metadata={},
        )
        return json.dumps(obj | {"created": self.created(i) - SIGNUP}, indent=2)

    def _stamp(self, template: str, i: int) -> str:
        paid = self.created(i)
        return (
            template.replace(events.TAG, self.tag(i))
            .replace(str(T_PAID), str(paid))
            .replace(str(T_END), str(paid + PERIOD))
        )

    @cached_property
    def _templates(self) -> tuple[dict[bool, str], dict[bool, str]]:
        """(invoices, their invoice.paid events), each keyed by `first`."""
        invoices, evts, tag, paid = {}, {}, events.TAG, datetime.fromtimestamp(T_PAID, UTC)
        for first in (False, True):
            obj = events.invoice(
                invoice_id=f"in_{tag}",
                customer=f"cus_{tag}",
                price=PRICE,
                amount_paid=AMOUNT_PAID,
                billing_reason="subscription_create" if first else "subscription_cycle",
                subscription=f"sub_{tag}",
                period=(paid, datetime.fromtimestamp(T_END, UTC)),
                metadata={"account_id": f"acct_{tag}"},
            )
            obj.update(created=T_PAID, effective_at=T_PAID, customer_email=f"{tag}@example.com")
            invoices[first] = json.dumps(obj, indent=2)
            evts[first] = json.dumps(events.event("invoice.paid", obj, f"evt_{tag}", paid), indent=2)
        return invoices, evts


def app(data: Dataset) -> web.Application:
    served = [0]

    def respond(text: str, status: int = 200) -> web.Response:
        served[0] += 1
        return web.Response(
            text=text, status=status, content_type="application/json", headers={"Request-Id": f"req_{served[0]}"}
        )

    def listing(
        url: str,
        render: Callable[[int], str],
        created: Callable[[int], int],
        holds: Callable[[int], bool],
        matches: Callable[[web.Request], bool],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        def held(i: int) -> int:  # the first index from i on that the list holds
            while i < data.count and not holds(i):
                i += 1
            return i

        async def handler(request: web.Request) -> web.Response:
            q, items, more = request.query, list[str](), False
            if matches(request):
                limit, gte, lte = (
                    min(int(q.get("limit", 10)), 100),
                    int(q.get("created[gte]", 0)),
                    int(q.get("created[lte]", 2**62)),
                )
                after = ID.match(q.get("starting_after", ""))
                i = held(int(after[1]) + 1 if after else 0)
                while i < data.count and created(i) > lte:
                    i = held(i + 1)
                while i < data.count and len(items) < limit and created(i) >= gte:
                    items.append(render(i))
                    i = held(i + 1)
                more = i < data.count and created(i) >= gte
            return respond(
                f'{{\n  "object": "list",\n  "url": "{url}",\n  "has_more": {json.dumps(more)},\n'
                f'  "data": [\n{",".join(items)}\n  ]\n}}'
            )

        return handler

    async def customer(request: web.Request) -> web.Response:
        found = ID.match(request.match_info["id"])
        if found and int(found[1]) < data.count:
            return respond(data.customer_json(int(found[1])))
        return respond(
            json.dumps(
                {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "resource_missing",
                        "message": f"No such customer: '{request.match_info['id']}'",
                    }
                }
            ),
            404,
        )

    async def ready(_: web.Request) -> web.Response:
        return web.Response(text="{}")

    types = lambda r: [v for k, v in r.query.items() if k.startswith("types")]  # noqa: E731
    status = lambda held: lambda r: r.query.get("status", held) == held  # noqa: E731
    every, anything = (lambda i: True), (lambda r: True)
    server = web.Application()
    for url, render, created, holds, matches in [
        ("/v1/events", data.event_json, data.created, every, lambda r: not types(r) or "invoice.paid" in types(r)),
        ("/v1/invoices", data.invoice_json, data.created, every, status("paid")),
        ("/v1/customers", data.customer_json, data.customer_created, data.first, anything),
        (
            "/v1/checkout/sessions",
            data.checkout_json,
            lambda i: data.created(i) - SIGNUP,
            data.first,
            status("complete"),
        ),
    ]:
        server.router.add_get(url, listing(url, render, created, holds, matches))
    server.router.add_get("/v1/customers/{id}", customer)
    server.router.add_get("/ready", ready)
    return server


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.fake_stripe", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--newest", type=int, required=True, help="epoch seconds of the newest item")
    args = parser.parse_args()
    web.run_app(app(Dataset(args.count, args.newest)), host="127.0.0.1", port=args.port, access_log=None, print=None)
