"""A fake Stripe API in a process of its own: `python -m bench.reconcile.fake_stripe --port P --count N --newest T`.

It serves what `credits reconcile` asks Stripe for, with Stripe's list pagination (`limit`, `starting_after`,
`has_more`, newest first, `created[gte]`/`created[lte]`):

- `GET /v1/events` and `GET /v1/invoices` — the dataset's N events and N paid invoices;
- `GET /v1/customers` — the customers of the first invoices (the others were created a period earlier),
  with `metadata.referral_code` where the dataset says so; `GET /v1/customers/{id}` — any one of them;
- `GET /v1/checkout/sessions?status=complete` — the sessions that created the first invoices' subscriptions;
- `GET /__stats` — requests and bytes served per route since the last `?reset=1`, for the report.

Pages are stamped from the dataset's templates when asked for (bench/reconcile/dataset.py), so the server
holds no list: its memory does not grow with N. Anything else is a 404 in Stripe's error shape, which the
service treats as a failed run — so a new call reconciliation starts making shows up as a broken benchmark.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from bench.reconcile.dataset import Dataset

MAX_LIMIT = 100  # Stripe's largest page


@dataclass(frozen=True)
class Listing:
    """One list endpoint over the dataset's indexes: which items it holds, when each was created (newest
    first as i grows), how one is rendered, and whether a query's filters (`types`, `status`) match it."""

    url: str
    render: Callable[[int], str]
    created: Callable[[int], int]
    holds: Callable[[int], bool]
    matches: Callable[[web.Request], bool]


class FakeStripe:
    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        data, every, first = self.data, (lambda i: True), self.data.first_invoice
        listings = [
            Listing("/v1/events", data.event_json, data.created, every, _of_types("invoice.paid")),
            Listing("/v1/invoices", data.invoice_json, data.created, every, _with_status("paid")),
            Listing("/v1/customers", data.customer_json, data.customer_created, first, lambda _: True),
            Listing("/v1/checkout/sessions", data.checkout_json, data.checkout_created, first, _with_status("complete")),
        ]
        for listing in listings:
            app.router.add_get(listing.url, self._list(listing))
        app.router.add_get("/v1/customers/{id}", self._customer)
        app.router.add_get("/__stats", self._stats)
        return app

    def _list(self, listing: Listing) -> Callable[[web.Request], web.Response]:
        url, count = listing.url, self.data.count

        def held(i: int) -> int:
            """The first index from i on that the list holds (`count` when none)."""
            while i < count and not listing.holds(i):
                i += 1
            return i

        def handler(request: web.Request) -> web.Response:
            query = request.query
            if not listing.matches(request):
                return self._respond(url, _page(url, [], False))
            limit = min(int(query.get("limit", 10)), MAX_LIMIT)
            gte, lte = int(query.get("created[gte]", 0)), int(query.get("created[lte]", 2**62))
            after = query.get("starting_after")
            i = held(0 if after is None else (self.data.index(after) or 0) + 1)
            while i < count and listing.created(i) > lte:
                i = held(i + 1)
            items = []
            while i < count and len(items) < limit and listing.created(i) >= gte:
                items.append(listing.render(i))
                i = held(i + 1)
            has_more = i < count and listing.created(i) >= gte
            return self._respond(url, _page(url, items, has_more))

        return handler

    def _customer(self, request: web.Request) -> web.Response:
        i = self.data.index(request.match_info["id"])
        if i is None or i >= self.data.count:
            error = {"error": {"type": "invalid_request_error", "code": "resource_missing",
                               "message": f"No such customer: '{request.match_info['id']}'"}}
            return self._respond("/v1/customers/{id}", json.dumps(error), status=404)
        return self._respond("/v1/customers/{id}", self.data.customer_json(i))

    def _stats(self, request: web.Request) -> web.Response:
        body = json.dumps({"requests": dict(self.requests), "bytes": dict(self.bytes)})
        if request.query.get("reset"):
            self.requests.clear()
            self.bytes.clear()
        return web.Response(text=body, content_type="application/json")

    def _respond(self, route: str, body: str, status: int = 200) -> web.Response:
        self.requests[route] += 1
        self.bytes[route] += len(body)
        return web.Response(text=body, status=status, content_type="application/json",
                            headers={"Request-Id": f"req_bench_{self.requests.total()}"})


def _of_types(handled: str) -> Callable[[web.Request], bool]:
    """The events list holds only `handled` events: a `types` filter without it matches none."""
    def matches(request: web.Request) -> bool:
        types = [value for key, value in request.query.items() if key.startswith("types")]
        return not types or handled in types

    return matches


def _with_status(held: str) -> Callable[[web.Request], bool]:
    """A list whose items all have status `held`: a `status` filter for another matches none."""
    return lambda request: request.query.get("status", held) == held


def _page(url: str, items: list[str], has_more: bool) -> str:
    """A list object, the items' JSON spliced in as rendered (no parse and re-encode)."""
    return f'{{\n  "object": "list",\n  "url": "{url}",\n  "has_more": {json.dumps(has_more)},\n  "data": [\n{",".join(items)}\n  ]\n}}'


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile.fake_stripe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True, help="invoices (and invoice.paid events) to serve")
    parser.add_argument("--newest", type=int, required=True, help="epoch seconds of the newest item")
    args = parser.parse_args()
    server = FakeStripe(Dataset(args.count, args.newest))
    web.run_app(server.app(), host="127.0.0.1", port=args.port, access_log=None, print=lambda text: print(text, flush=True))


if __name__ == "__main__":
    main()
