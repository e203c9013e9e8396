"""The floor reconciliation cannot beat: page through the same lists with the service's own Stripe client
and throw every item away. `python -m bench.reconcile.floor --since EPOCH --until EPOCH`.

Same client (`service.stripe_client.StripeGateway`, configured from the environment like the service), same
parameters as `jobs.reconcile` (event types, window, page size), no database, nothing kept. It prints one
JSON line: items seen per list.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

from service.config import Settings
from service.stripe_client import StripeGateway
from webhooks.handlers import HANDLERS


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile.floor", description=__doc__)
    parser.add_argument("--since", type=int, required=True, help="created[gte], epoch seconds")
    parser.add_argument("--until", type=int, required=True, help="created[lte], epoch seconds")
    args = parser.parse_args()
    stripe = StripeGateway(Settings())
    window = {"created_gte": args.since, "created_lte": args.until}
    seen = {"events": _count(stripe.iterate_events(**window, types=sorted(HANDLERS))),
            "invoices": _count(stripe.iterate_invoices("paid", **window))}
    print(json.dumps(seen), flush=True)


def _count(items: Iterable[Any]) -> int:
    return sum(1 for _ in items)


if __name__ == "__main__":
    main()
