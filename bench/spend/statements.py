"""How many SQL statements one spend sends, and which: `python -m bench.spend.statements --account ID [-n N]`.

The real app (`service.api.create_app`, configuration from the environment as for the server) in this process,
called through Starlette's TestClient, so that SQLAlchemy's `before_cursor_execute` event sees every statement
of the request — the idempotency claim, the account look-up and lock, the ledger's reads and writes, and the
response record. Each spend also costs a BEGIN and a COMMIT and the pool's pre-ping, which are not cursor
executions and not counted. Prints one JSON object: the statements per spend over N spends, and the
statements of the last one in short (verb and table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets

from fastapi.testclient import TestClient
from sqlalchemy import event

from service import runtime
from service.api import create_app
from service.config import Settings


def short(statement: str) -> str:
    """`SELECT … FROM credit_grants`, `INSERT INTO ledger_entries`, `SELECT … FROM accounts FOR UPDATE`: what a
    statement does to which table, for the README's list."""
    text = " ".join(statement.split())
    found = re.match(r"(INSERT INTO|UPDATE|DELETE FROM) (\w+)", text) or re.match(r"SELECT .*? FROM (\w+)", text)
    if found is None:
        return text[:60]
    what = f"{found[1]} {found[2]}" if found.lastindex == 2 else f"SELECT … FROM {found[1]}"
    return what + (" FOR UPDATE" if text.endswith("FOR UPDATE") else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spend.statements", description=__doc__)
    parser.add_argument("--account", required=True)
    parser.add_argument("-n", "--requests", type=int, default=20)
    args = parser.parse_args(argv)
    rt = runtime.load(Settings())
    seen: list[str] = []

    @event.listens_for(rt.engine, "before_cursor_execute")
    def _count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        seen.append(short(statement))

    headers = {"Authorization": f"Bearer {os.environ['CREDITS_API_TOKEN']}"}
    run = secrets.token_hex(3)
    with TestClient(create_app(rt)) as client:
        client.post(f"/v1/accounts/{args.account}/spend", json={"amount": 1},  # warm-up: caches, pool
                    headers={**headers, "Idempotency-Key": f"stmt-{run}-w"}).raise_for_status()
        seen.clear()
        for i in range(args.requests):
            last = len(seen)
            client.post(f"/v1/accounts/{args.account}/spend", json={"amount": 1},
                        headers={**headers, "Idempotency-Key": f"stmt-{run}-{i}"}).raise_for_status()
    rt.engine.dispose()
    print(json.dumps({"spends": args.requests, "statements_per_spend": round(len(seen) / args.requests, 2),
                      "last_spend": seen[last:]}))


if __name__ == "__main__":
    main()
