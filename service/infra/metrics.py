"""Prometheus metrics: what the on-call engineer watches.

Counters and histograms live in the process's default registry. Inbox depth, the oldest pending event and
open reconciliation findings are read from the database at scrape time (a collector per app), so every API
replica reports the same truth. Credits are counted only once their transaction commits (the unit of work
publishes them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.infra import logs
from service.infra.models import Finding, StripeEvent, utcnow

log = logs.get("metrics")

WEBHOOKS = Counter(
    "credits_webhook_deliveries_total", "Webhook deliveries by event type and outcome.", ["type", "outcome"]
)
PROCESSING = Histogram("credits_event_processing_seconds", "Time to handle one inbox event.", ["type", "status"])
CREDITS = Counter(
    "credits_credits_total",
    "Credits moved, by kind (grant, spend, expire, reverse) and grant source.",
    ["kind", "source"],
)
STRIPE_CALLS = Counter("credits_stripe_api_calls_total", "Outbound Stripe API calls by outcome.", ["outcome"])
STRIPE_RETRIES = Counter("credits_stripe_api_retries_total", "Outbound Stripe API calls retried, by error.", ["error"])


def stripe_retry(error: BaseException) -> None:
    """The Stripe gateway's retry hook."""
    STRIPE_RETRIES.labels(type(error).__name__).inc()


class DatabaseCollector(Collector):
    """Inbox depth by status, the oldest pending event's age, and open findings by kind, read per scrape;
    logs a warning when the oldest pending event is older than `alert_seconds`."""

    def __init__(self, sessions: sessionmaker[Session], alert_seconds: float) -> None:
        self.sessions, self.alert_seconds = sessions, alert_seconds

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("credits_inbox_events", "Inbox events by status.", labels=["status"])
        oldest = GaugeMetricFamily("credits_inbox_oldest_pending_seconds", "Age of the oldest unprocessed event.")
        findings = GaugeMetricFamily(
            "credits_reconcile_open_findings", "Open reconciliation findings by kind.", labels=["kind"]
        )
        with self.sessions() as session:
            for status, n in session.execute(select(StripeEvent.status, func.count()).group_by(StripeEvent.status)):
                depth.add_metric([status], n)
            first = session.scalar(
                select(func.min(StripeEvent.received_at)).where(StripeEvent.status.in_(("pending", "failed")))
            )
            for kind, n in session.execute(
                select(Finding.kind, func.count()).where(Finding.status == "open").group_by(Finding.kind)
            ):
                findings.add_metric([kind], n)
        age = (utcnow() - first).total_seconds() if first is not None else 0.0
        oldest.add_metric([], age)
        if age > self.alert_seconds:
            log.warning("inbox.backlog", oldest_pending_seconds=round(age), threshold_seconds=self.alert_seconds)
        yield from (depth, oldest, findings)


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of the process's metrics plus the app's database-backed ones."""
    return generate_latest(REGISTRY) + generate_latest(registry)
