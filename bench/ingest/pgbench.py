"""The database's own limit for one durable insert per event: pgbench, same payload, same concurrency.

A table equivalent to the inbox's core (id text primary key, payload jsonb, status text, created timestamptz;
the payload compressed as the inbox's is, see `compressed_as_the_inbox`) and a custom script (`-f`) that inserts the benchmark's own event body as JSONB, one autocommitted
transaction per event, with ON CONFLICT (id) DO NOTHING as the service's insert has.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg

TABLE = "bench_pgbench_events"
DDL = f"CREATE TABLE {TABLE} (id text PRIMARY KEY, payload jsonb NOT NULL, status text NOT NULL, created timestamptz NOT NULL)"


def compressed_as_the_inbox(conn: psycopg.Connection[Any], table: str) -> None:
    """Give `table`'s payload column the TOAST compression of the inbox's (stripe_events.payload: lz4 where
    the server has it, migration 0007), so that the reference stores a body for the same CPU as the service."""
    if conn.info.server_version < 140000:  # no per-column compression before PostgreSQL 14: pglz everywhere
        return
    method = conn.execute("SELECT attcompression FROM pg_attribute WHERE attrelid = 'stripe_events'::regclass "
                          "AND attname = 'payload'").fetchone()
    named = {"l": "lz4", "p": "pglz"}.get(method[0] if method else "")
    if named:
        conn.execute(f"ALTER TABLE {table} ALTER COLUMN payload SET COMPRESSION {named}")


def find_pgbench() -> str | None:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    return str(candidates[0]) if candidates else None


def script(payload: bytes) -> str:
    """The pgbench script: one INSERT of `payload` (as a SQL literal) under a fresh id."""
    literal = payload.decode().replace("'", "''")
    return (
        f"INSERT INTO {TABLE} (id, payload, status, created)\n"
        f"VALUES ('evt_pgb_' || gen_random_uuid(), '{literal}'::jsonb, 'pending', now())\n"
        f"ON CONFLICT (id) DO NOTHING;\n"
    )


def run(conninfo: dict[str, Any], workdir: Path, payload: bytes, transactions: int, clients: int,
        threads: int = 2, timeout: float = 120.0) -> dict[str, Any]:
    """Create the table, run pgbench, and return its TPS and latency with the exact command."""
    with psycopg.connect(autocommit=True, **conninfo) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(DDL)
        compressed_as_the_inbox(conn, TABLE)
    path = workdir / "pgbench_insert.sql"
    path.write_text(script(payload))
    limit = ["-t", str(max(1, math.ceil(transactions / clients)))]
    result = run_script(conninfo, path, clients, limit, threads=threads, timeout=timeout)
    if "error" not in result:
        with psycopg.connect(autocommit=True, **conninfo) as conn:
            result["rows"] = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]  # type: ignore[index]
    return result


def run_script(conninfo: dict[str, Any], path: Path, clients: int, limit: list[str], *, threads: int = 2,
               defines: dict[str, object] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Run pgbench with the custom script at `path` (`limit`: `-t N` per client or `-T seconds`; `defines`:
    its `-D name=value` variables) and return its TPS and latency with the exact command."""
    exe = find_pgbench()
    if exe is None:
        return {"error": "pgbench not found"}
    variables = [arg for name, value in (defines or {}).items() for arg in ("-D", f"{name}={value}")]
    command = [exe, "-n", "-h", conninfo["host"], "-p", str(conninfo["port"]), "-U", conninfo["user"],
               "-c", str(clients), "-j", str(threads), *limit, *variables, "-f", str(path), conninfo["dbname"]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    out = done.stdout + done.stderr
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    return {
        "command": shlex.join(command),
        "script": str(path),
        "exit_code": done.returncode,
        "tps": float(tps[1]) if tps else None,
        "latency_avg_ms": float(latency[1]) if latency else None,
        "transactions": int(processed[1]) if processed else None,
        "failed": int(failed[1]) if failed else 0,
        "clients": clients,
        "threads": threads,
        "output_tail": "\n".join(out.strip().splitlines()[-6:]) if done.returncode else None,
    }
