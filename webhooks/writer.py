"""Group commit for the webhook endpoint: the events of concurrent deliveries share one INSERT and one commit.

Each delivery must be durable before it is answered, and a commit costs far more than the row. So the
endpoint hands its row to the writer (service/group_commit.py) and awaits the outcome; the writer's thread
takes every row waiting at that moment, writes them with one INSERT … ON CONFLICT (id) DO NOTHING …
RETURNING id (inbox.inserter, pipelined on PostgreSQL), commits, and answers each waiting delivery. A row
the database refuses fails only its own delivery; a lost connection fails the batch, and every delivery in
it answers 503 so Stripe retries.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine

from service.infra.group_commit import GroupCommit
from webhooks import inbox


class InboxWriter(GroupCommit[dict[str, Any], bool]):
    """Stores inbox rows in batches on a thread of its own (started on first use)."""

    def __init__(self, engine: Engine, max_batch: int = 128) -> None:
        insert = inbox.inserter(engine.dialect.name)

        def write(conn: Connection, rows: list[dict[str, Any]]) -> list[bool]:
            """Each row: True when it is new, False for a redelivery (also one earlier in the same batch)."""
            with conn.begin():
                new = insert(conn, rows)
            seen: set[str] = set()
            answers = []
            for row in rows:
                answers.append(row["id"] in new and row["id"] not in seen)
                seen.add(row["id"])
            return answers

        super().__init__(engine, write, name="inbox-writer", max_batch=max_batch)

    async def store(self, row: dict[str, Any]) -> bool:
        """Store one row durably; True when it is new, False for a redelivery (also one in the same batch).
        Raises what the database raised (OperationalError when it is unreachable), or Stopped."""
        return await self.submit(row)
