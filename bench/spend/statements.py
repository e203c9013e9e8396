"""How many SQL statements one spend sends, and which, and how long it holds the account's row lock:
`python -m bench.spend.statements --account ID [-n N]`.

The real app (`service.api.create_app`, configuration from the environment as for the server) in this process,
called through Starlette's TestClient, so that SQLAlchemy's `before_cursor_execute` event sees every statement
of the request — the idempotency claim, the account lock, the ledger's reads and writes, and the response
record. Each spend also costs a BEGIN and a COMMIT and the pool's pre-ping, which are not cursor executions and
not counted. The lock is held from the moment the statement with `FOR UPDATE` returns until COMMIT has
returned; the spends run one at a time, so the hold is the spend's own (round trips and Python), with no
waiting on other spends — what bounds one hot account's rate. Prints one JSON object: the statements per spend over N spends,
the statements of the last one in short (verb and table), the statements after the lock, and the median hold.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import time

from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from service import runtime
from service.api import create_app
from service.config import Settings


WRITES = re.compile(r"(?<!FOR )(?<!DO )(INSERT INTO|UPDATE|DELETE FROM) (\w+)")  # not FOR UPDATE, DO UPDATE


def short(statement: str) -> str:
    """`SELECT … FROM credit_grants`, `INSERT INTO ledger_entries`, `SELECT … FROM accounts FOR UPDATE`, and for
    a data-modifying CTE `WITH … INSERT INTO a, UPDATE b`: what a statement does to which table, for the
    README's list."""
    text = " ".join(statement.split())
    if text.startswith("WITH"):
        writes = dict.fromkeys(" ".join(found) for found in WRITES.findall(text))
        return "WITH … " + ", ".join([*writes, *(["SELECT … FOR UPDATE"] if locks(text) else [])])
    written = re.match(r"(INSERT INTO|UPDATE|DELETE FROM) (\w+)", text)
    read = list(dict.fromkeys(re.findall(r"(?:FROM|JOIN) (\w+)", text)))  # every table, subqueries' too
    if written is None and not (text.startswith("SELECT") and read):
        return text[:60]
    what = f"{written[1]} {written[2]}" if written else f"SELECT … FROM {', '.join(read)}"
    return what + (" FOR UPDATE" if locks(text) else "")


def locks(statement: str) -> bool:
    """Whether the statement takes row locks (the account's, for a spend)."""
    return " FOR UPDATE" in statement


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spend.statements", description=__doc__)
    parser.add_argument("--account", required=True)
    parser.add_argument("-n", "--requests", type=int, default=20)
    args = parser.parse_args(argv)
    rt = runtime.load(Settings())
    seen: list[str] = []
    locked_at: list[float] = []  # when the current spend's FOR UPDATE returned
    holds: list[float] = []

    @event.listens_for(rt.engine, "before_cursor_execute")
    def _count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        seen.append(short(statement))

    @event.listens_for(rt.engine, "after_cursor_execute")
    def _locked(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if locks(statement):
            locked_at[:] = [time.perf_counter()]

    @event.listens_for(Session, "after_commit")
    def _released(_session: Session) -> None:
        if locked_at:
            holds.append(time.perf_counter() - locked_at.pop())

    headers = {"Authorization": f"Bearer {os.environ['CREDITS_API_TOKEN']}"}
    run = secrets.token_hex(3)
    with TestClient(create_app(rt)) as client:
        client.post(f"/v1/accounts/{args.account}/spend", json={"amount": 1},  # warm-up: caches, pool
                    headers={**headers, "Idempotency-Key": f"stmt-{run}-w"}).raise_for_status()
        seen.clear()
        holds.clear()
        for i in range(args.requests):
            last = len(seen)
            client.post(f"/v1/accounts/{args.account}/spend", json={"amount": 1},
                        headers={**headers, "Idempotency-Key": f"stmt-{run}-{i}"}).raise_for_status()
    rt.engine.dispose()
    last_spend = seen[last:]
    lock = next((i for i, s in enumerate(last_spend) if locks(s)), len(last_spend) - 1)
    print(json.dumps({"spends": args.requests, "statements_per_spend": round(len(seen) / args.requests, 2),
                      "last_spend": last_spend, "statements_after_lock": len(last_spend) - lock - 1,
                      "lock_hold_ms": round(1000 * statistics.median(holds), 2) if holds else None}))


if __name__ == "__main__":
    main()
