"""The inbox keeps the Stripe customer each event's object names, in place of a lane: a worker batch takes
customers whole, and no two transactions handle one customer's events at once. The events still due when it
runs are given their customer, so they wait for that customer's lock like every event stored after it; the
settled ones keep NULL (nothing handles them again but a replay, which reads the payload).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 14:00:00
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.drop_column("lane")
        batch_op.add_column(sa.Column("customer", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_stripe_events_customer"), ["customer"], unique=False)
    _name_customers_of_due_events()


def downgrade() -> None:
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stripe_events_customer"))
        batch_op.drop_column("customer")
        batch_op.add_column(sa.Column("lane", sa.String(length=255), nullable=True))


EVENTS = sa.table(
    "stripe_events",
    sa.column("id", sa.String),
    sa.column("status", sa.String),
    sa.column("customer", sa.String),
    sa.column("payload", sa.JSON),
)


def _name_customers_of_due_events() -> None:
    bind = op.get_bind()
    due = bind.execute(sa.select(EVENTS.c.id, EVENTS.c.payload).where(EVENTS.c.status.in_(("pending", "failed"))))
    for event_id, payload in due.all():
        customer = _customer_named(payload)
        if customer:
            bind.execute(EVENTS.update().where(EVENTS.c.id == event_id).values(customer=customer[:255]))


def _customer_named(payload: Any) -> str | None:
    """The customer the event's object names: the customer itself, or its `customer` field (an id or an
    expanded object). A migration keeps its own copy: it must read the rows as they were when it was written."""
    data = payload.get("data") if isinstance(payload, dict) else None
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return None
    value = obj.get("id") if obj.get("object") == "customer" else obj.get("customer")
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None
