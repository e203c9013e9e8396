"""Background work: the inbox worker, reconciliation, backfill and the free-plan refill."""
