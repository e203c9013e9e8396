"""Reconciliation benchmark: `credits reconcile` over 10k, 50k and 100k paid invoices and events served by a
fake Stripe, against the floor of merely paging through the same lists.

Modules, one job each:
- `run`          the orchestrator: per size a fresh database, the fake Stripe, the floor, reconcile; a profile
- `dataset`      the N invoices and events, derived from an index (which are first invoices, missing, referred)
- `fake_stripe`  the fake Stripe API (aiohttp, its own process): events, invoices, customers and Checkout
                 sessions, listed with Stripe's paging; a customer by id
- `seed`         the local side: what the service holds after processing the dataset's webhooks (COPY)
- `floor`        the reference: the service's Stripe client paging through both lists, discarding them
- `report`       the table printed at the end and the README section
"""
