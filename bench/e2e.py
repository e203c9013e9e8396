"""End to end: signups (customer.created, checkout.session.completed, customer.subscription.created, invoice.paid,
invoice.payment_succeeded), renewals, pack purchases and referrals over billing months sent in waves, delivered
to the API by 32 connections (each customer's events in order) and processed by the workers; events/s from the
first delivery until the last balance is final, against pgbench doing the same row writes per event. Every
final balance is checked against the catalogue's arithmetic, read from the database.

A month's renewals go out only once the month before is processed (a renewal's rollover depends on it), and
no customer's events start while `--max-backlog` events are unsettled, so the processing is always fed and
what is left when sending stops settles within the run. Row writes per event are PostgreSQL's own counts
(pg_stat_user_tables); the pgbench script does as many inserts and updates per event, the event's body first.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import resource
import secrets
import threading
import time
import tomllib
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

from bench import events as se
from bench import load
from bench.harness import (
    Rows,
    Run,
    Sampled,
    arguments,
    command_of,
    cpu_since,
    num,
    one,
    pgbench,
    ratio,
    row,
    standalone,
    tree_cpu,
)

LIMITS = """Every event is received, stored and acknowledged by the API, then claimed, handled and marked by a
worker, whose statements go through SQLAlchemy and psycopg around each row: the processing, not the
delivery, sets the pace, and on two cores the workers share the CPU with the API, PostgreSQL and the load
generator, so the machine's CPU per event bounds the rate. pgbench writes the same rows with none of that
Python around them, which is why it is the reference for what the database allows."""

# (plan, Stripe price, amount charged, weight of the draw, renews monthly within the run)
OFFERS = (
    ("starter", "price_starter_monthly", 34_900, 60, True),
    ("pro", "price_pro_monthly", 79_900, 20, True),
    ("outreach", "price_outreach_monthly", 14_900, 10, True),
    ("pro_annual", "price_pro_annual", 799_000, 10, False),
)
PACK, PACK_AMOUNT, REFERRED_SHARE, PACK_SHARE = "boost", 4_900, 0.4, 0.25
CARRIERS = ("checkout", "customer", "subscription")  # where a referee's code travels
SIGNUP = (
    "customer.created",
    "checkout.session.completed",
    "customer.subscription.created",
    "invoice.paid",
    "invoice.payment_succeeded",
)
RENEWAL = ("invoice.paid", "invoice.payment_succeeded", "customer.subscription.updated")
PURCHASE = ("checkout.session.completed", "payment_intent.succeeded")
MONTH = timedelta(days=30)


class Account(NamedTuple):
    key: str  # "<month>_<i>"
    offer: tuple[str, str, int, int, bool]
    month: int
    referrer: str | None
    carrier: str | None
    packs: frozenset[int]


def invoiced(a: Account, month: int) -> bool:
    return month == a.month or (a.offer[4] and month > a.month)


def kinds(a: Account, month: int) -> tuple[str, ...]:
    """What the account does in `month`, in the order Stripe sends it: its signup or renewal, then a pack."""
    invoice = SIGNUP if month == a.month else RENEWAL if invoiced(a, month) else ()
    return invoice + (PURCHASE if month in a.packs else ())


def chains(accounts: list[Account], month: int) -> list[Account]:
    return [a for a in accounts if a.month <= month and kinds(a, month)]


def draw(per_month: int, months: int, seed: int) -> list[Account]:
    """Every draw depends on (seed, month, i) alone, so a month's first N signups are the same at any size.
    Referrers are month 1's annual accounts: no renewal in the run, so a payout never races their rollover."""
    accounts: list[Account] = []
    for month in range(1, months + 1):
        referrers = [a.key for a in accounts if a.month == 1 and not a.offer[4]]
        for i in range(per_month):
            rng = random.Random(f"{seed}:{month}:{i}")
            offer = OFFERS[-1] if (month, i) == (1, 0) else rng.choices(OFFERS, [o[3] for o in OFFERS])[0]
            referred = month > 1 and referrers and rng.random() < REFERRED_SHARE
            accounts.append(
                Account(
                    f"{month}_{i}",
                    offer,
                    month,
                    rng.choice(referrers) if referred else None,
                    rng.choice(CARRIERS) if referred else None,
                    frozenset(m for m in range(month, months + 1) if rng.random() < PACK_SHARE),
                )
            )
    return accounts


def plan(events: int, months: int, seed: int) -> list[Account]:
    """The smallest mix with at least `events` events."""
    count = lambda accounts: sum(len(kinds(a, m)) for m in range(1, months + 1) for a in chains(accounts, m))  # noqa: E731
    low, high = 1, max(1, -(-events // (len(SIGNUP) * months)))
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if count(draw(mid, months, seed)) >= events else (mid + 1, high)
    return draw(low, months, seed)


def catalogue(checkout: Path) -> dict[str, Any]:
    """The checkout's credits.toml, checked to sell what the mix buys."""
    cat = tomllib.loads((checkout / "credits.toml").read_text())
    for name, price, _, _, monthly in OFFERS:
        found = cat["plans"].get(name, {})
        if price not in found.get("prices", []) or (found.get("interval", "month") == "year") == monthly:
            raise SystemExit(f"bench.e2e: the catalogue no longer sells {price} as plan {name!r}")
    if PACK not in cat.get("packs", {}) or cat["referrals"].get("qualify_on") != "first_paid_invoice":
        raise SystemExit("bench.e2e: the catalogue's packs or referral terms are not what the mix assumes")
    return cat


def expected_balances(
    accounts: list[Account], months: int, cat: dict[str, Any], delivered: dict[int, set[str]]
) -> dict[str, int]:
    """Each account's balance from the catalogue alone: a paid invoice first cuts what the plan's rollover policy
    holds to what may carry over, then grants the plan's credits; a referee's first invoice pays both sides;
    packs are outside the policy."""
    held: dict[str, int] = defaultdict(int)
    packs: dict[str, int] = defaultdict(int)
    for month in range(1, months + 1):
        for a in (a for a in chains(accounts, month) if a.key in delivered.get(month, set())):
            plan_ = cat["plans"][a.offer[0]]
            if invoiced(a, month):
                policy, credits = plan_.get("rollover", "cap"), plan_["credits"]
                limit = (
                    None
                    if policy == "all"
                    else credits
                    if policy == "none"
                    else int(plan_.get("rollover_cap", 2.0) * credits)
                )
                if limit is not None:
                    held[a.key] = min(held[a.key], max(0, limit - credits))
                held[a.key] += credits
            if month == a.month and a.referrer:
                held[a.key] += cat["referrals"]["referee_credits"]
                held[a.referrer] += cat["referrals"]["referrer_credits"]
            if month in a.packs:
                packs[a.key] += cat["packs"][PACK]["credits"]
    return {key: held[key] + packs[key] for key in {*held, *packs}}


class Builder:
    """The months' bodies, stamped from one template per shape (plan, months, where the code travels)."""

    def __init__(self, prefix: str, codes: dict[str, str], months: int) -> None:
        self.prefix, self.codes, self.templates = prefix, codes, dict[tuple[Any, ...], list[str]]()
        self.base = datetime.now(UTC).replace(microsecond=0) - (months - 1) * MONTH

    def bodies(self, a: Account, month: int) -> list[bytes]:
        shape = (a.offer, a.month, a.carrier if a.referrer else None, month, month in a.packs)
        if shape not in self.templates:
            stand_in = a._replace(key=se.TAG, referrer="BENCHCODE" if a.referrer else None)
            self.templates[shape] = [se.body(e).decode() for e in self.events(stand_in, month)]
        code = self.codes.get(a.referrer or "", "")
        return [
            t.replace(se.TAG, f"{self.prefix}{a.key}").replace("BENCHCODE", code).encode()
            for t in self.templates[shape]
        ]

    def events(self, a: Account, month: int) -> list[dict[str, Any]]:
        """Every object names its account, so no event needs a call to Stripe."""
        tag, (_, price, amount, _, monthly), start, todo = (
            a.key,
            a.offer,
            self.base + (month - 1) * MONTH,
            kinds(a, month),
        )
        account, customer, sub, email, intent = (
            f"acct_{tag}",
            f"cus_{tag}",
            f"sub_{tag}",
            f"{tag}@customers.example",
            f"pi_{tag}_{month}p",
        )
        carried, period = {"account_id": account}, (start, start + (MONTH if monthly else timedelta(days=365)))
        on = lambda carrier: {"referral_code": a.referrer} if a.referrer and a.carrier == carrier else {}  # noqa: E731
        out = []
        for n, kind in enumerate(todo):
            if kind == "customer.created":
                obj = se.recorded("customer", id=customer, email=email, metadata={**carried, **on("customer")})
            elif kind.startswith("customer.subscription."):
                obj = se.subscription(
                    subscription_id=sub,
                    customer=customer,
                    price=price,
                    period_end=period[1],
                    metadata={**carried, **on("subscription")},
                )
            elif kind.startswith("invoice."):
                obj = se.invoice(
                    invoice_id=f"in_{tag}_{month}",
                    customer=customer,
                    price=price,
                    amount_paid=amount,
                    billing_reason="subscription_create" if month == a.month else "subscription_cycle",
                    subscription=sub,
                    period=period,
                    metadata={**carried, **on("subscription")},
                    payment_intent=f"pi_{tag}_{month}i",
                ) | {"customer_email": email}
            elif kind == "payment_intent.succeeded":
                obj = se.recorded(
                    "payment_intent",
                    id=intent,
                    customer=customer,
                    amount=PACK_AMOUNT,
                    amount_received=PACK_AMOUNT,
                    status="succeeded",
                    metadata={"pack": PACK, **carried},
                    currency="usd",
                    latest_charge=f"ch_{tag}_{month}p",
                )
            else:
                pack = n >= len(todo) - (len(PURCHASE) if month in a.packs else 0)
                obj = (
                    se.checkout_session(
                        session_id=f"cs_{tag}_{month}p",
                        customer=customer,
                        client_reference_id=account,
                        payment_intent=intent,
                        amount_total=PACK_AMOUNT,
                        metadata={"pack": PACK, **carried},
                    )
                    if pack
                    else se.checkout_session(
                        session_id=f"cs_{tag}_{month}",
                        customer=customer,
                        client_reference_id=account,
                        mode="subscription",
                        payment_intent=None,
                        subscription=sub,
                        amount_total=amount,
                        metadata=on("checkout"),
                    )
                )
                obj["customer_details"] = {**(obj.get("customer_details") or {}), "email": email}
            out.append(se.event(kind, obj, f"evt_{tag}_{month}_{n}", start + timedelta(seconds=n)))
        return out


class Backlog(threading.Thread):
    """Events not final yet (pending, or failed and due again), polled every 0.25 s on a thread of its own;
    `admit` holds a new customer back while `limit` or more are waiting."""

    def __init__(self, db: str, limit: int) -> None:
        super().__init__(daemon=True)
        self.conn, self.limit, self.count, self.done = psycopg.connect(db, autocommit=True), limit, 0, threading.Event()

    def poll(self) -> int:
        self.count = one(self.conn.execute("SELECT count(*) FROM stripe_events WHERE status IN ('pending', 'failed')"))[
            0
        ]
        return self.count

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.poll()

    async def admit(self) -> None:
        while self.count >= self.limit:
            await asyncio.sleep(0.05)


def written(db: str) -> dict[str, int]:
    """Rows inserted, updated and deleted so far, and commits, by PostgreSQL's own counters."""
    with psycopg.connect(db, autocommit=True) as conn:
        ins, upd, dele = one(
            conn.execute("SELECT sum(n_tup_ins), sum(n_tup_upd), sum(n_tup_del) FROM pg_stat_user_tables")
        )
        commits = one(conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))[0]
    return {"inserts": int(ins or 0), "updates": int(upd or 0), "deletes": int(dele or 0), "commits": int(commits)}


def pgbench_script(payload: bytes, inserts: int, updates: int) -> str:
    """One event's writes: the body as JSONB, autocommitted (the service answers once its row is committed),
    then one transaction: the inbox row marked, random accounts-like rows updated, ledger-like rows inserted."""
    lines = [
        "\\set aid random(1, 10000)",
        "INSERT INTO bench_inbox VALUES ('evt_' || gen_random_uuid(), '"
        + payload.decode().replace("'", "''")
        + "'::jsonb, 'pending', now()) RETURNING id AS evt \\gset",
        "BEGIN;",
    ]
    lines += ["UPDATE bench_inbox SET status = 'processed' WHERE id = ':evt';"] if updates > 0 else []
    lines += ["UPDATE bench_accounts SET touched = touched + 1, updated = now() WHERE id = :aid;"] * max(0, updates - 1)
    lines += ["INSERT INTO bench_rows (account_id, amount, note) VALUES (:aid, 1, 'bench');"] * max(0, inserts - 1)
    return "\n".join([*lines, "COMMIT;"]) + "\n"


PGBENCH_TABLES = Path(__file__).with_name("pgbench_e2e.sql")


def pgbench_tables(db: str) -> None:
    """The reference's tables, its body's column compressed as the inbox's payload is (lz4 or pglz)."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(PGBENCH_TABLES.read_text())
        found = conn.execute(
            "SELECT attcompression FROM pg_attribute WHERE attrelid = 'stripe_events'::regclass AND attname = 'payload'"
        ).fetchone()
        if found and found[0] in ("l", "p"):
            conn.execute(
                f"ALTER TABLE bench_inbox ALTER COLUMN payload SET COMPRESSION {'lz4' if found[0] == 'l' else 'pglz'}"
            )
        conn.execute("ANALYZE")


def parse(argv: list[str] | None = None) -> Any:
    parser = arguments("python -m bench.e2e", __doc__)
    parser.add_argument("--events", type=int, default=20_000, help="events to deliver, at least (default 20000)")
    parser.add_argument("--months", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-backlog", type=int, default=1000, help="no customer starts while this many are unsettled"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=240.0, help="no customer starts later (from the first send)"
    )
    return parser.parse_args(argv)


def run(args: Any) -> dict[str, Any]:
    with Run(args, "e2e") as bench:
        cat, accounts = catalogue(bench.checkout), plan(args.events, args.months, args.seed)
        db = bench.database()
        env = bench.env(db)
        api, base = bench.serve(env)
        workers = bench.workers(env)
        prefix, referrers = f"{secrets.token_hex(2)}x", sorted({a.referrer for a in accounts if a.referrer})
        bench.say(f"{len(accounts):,} customers over {args.months} months; {len(referrers)} referral codes first")
        codes = {}
        for key in referrers:  # through the API, as a referrer has its link before sharing it
            request = urllib.request.Request(
                f"{base}/v1/accounts/acct_{prefix}{key}/referral-code",
                data=b"{}",
                method="POST",
                headers={
                    "Authorization": f"Bearer {bench.api_token}",
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"code-{prefix}{key}",
                },
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                codes[key] = json.loads(response.read())["code"]
        builder, hook = Builder(prefix, codes, args.months), base + "/webhooks/stripe"
        months = [[(a.key, builder.bodies(a, m)) for a in chains(accounts, m)] for m in range(1, args.months + 1)]
        time.sleep(1.5)  # backends report their write counters at most once a second
        before, server = written(db), _postmaster(db)
        cpu0 = [tree_cpu(p.pid) for p in [api, *workers]], resource.getrusage(resource.RUSAGE_SELF)
        backlog, report, delivered = Backlog(db, args.max_backlog), [], {}
        with Sampled(server) as pg:
            backlog.start()
            first = time.time()
            try:
                for number, bodies in enumerate(months, 1):
                    at = int(time.time())  # signed when the month starts: Stripe's tolerance is 300 s
                    signed = [
                        (
                            key,
                            [
                                (hook, b, {**load.WEBHOOK_HEADERS, "Stripe-Signature": se.sign(b, bench.secret, at)})
                                for b in chain
                            ],
                        )
                        for key, chain in bodies
                    ]
                    out = load.closed_loop(
                        signed, 32, seconds=first + args.max_seconds - time.time(), admit=backlog.admit
                    )
                    sent = time.time()
                    while backlog.poll() and time.time() < first + args.max_seconds + 120:
                        time.sleep(0.25)
                    delivered[number] = set(out.completed)
                    report.append(
                        {
                            "events": sum(len(c) for _, c in bodies),
                            "ok": out.ok,
                            "statuses": dict(out.statuses),
                            "sending": round(out.seconds, 2),
                            "settling": round(time.time() - sent, 2),
                        }
                    )
                    settled = time.time() - sent
                    bench.say(
                        f"month {number}: {out.ok:,} delivered in {out.seconds:.1f} s, settled {settled:.1f} s later"
                    )
                    if backlog.count:
                        break  # the next month's renewals would race what is still waiting
            finally:
                backlog.done.set()
                backlog.join()
                backlog.conn.close()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        spent = [cpu_since(b, tree_cpu(p.pid)) for b, p in zip(cpu0[0], [api, *workers], strict=True)]
        cpu = {
            "api": spent[0],
            "workers": sum(spent[1:]),
            "postgresql": pg.seconds,
            "load": usage.ru_utime + usage.ru_stime - cpu0[1].ru_utime - cpu0[1].ru_stime,
        }
        for proc in [api, *workers]:
            proc.stop()  # their backends exit, which reports their last write counters
        time.sleep(1.5)
        with psycopg.connect(db, autocommit=True) as conn:
            statuses: dict[str, int] = dict(
                conn.execute("SELECT status, count(*) FROM stripe_events GROUP BY 1").fetchall()
            )
            last = one(conn.execute("SELECT extract(epoch FROM max(processed_at)) FROM stripe_events"))[0]
            actual: dict[str, int] = dict(
                conn.execute(
                    "SELECT a.public_id, coalesce(sum(g.remaining) FILTER (WHERE g.expires_at IS NULL "
                    "OR g.expires_at > now()), 0)::bigint FROM accounts a LEFT JOIN credit_grants g "
                    "ON g.account_id = a.id GROUP BY 1"
                ).fetchall()
            )
        writes = {k: v - before[k] for k, v in written(db).items()}
        expected = {f"acct_{prefix}{k}": v for k, v in expected_balances(accounts, args.months, cat, delivered).items()}
        wrong = sum(1 for k, v in expected.items() if actual.get(k) != v) + sum(
            1 for k, v in actual.items() if k not in expected and v
        )
        check = bench.cli("check", env=env, check=False)

        bench.say("pgbench …")
        pgbench_tables(db)
        events = max(1, sum(statuses.values()))
        inserts, updates = (
            max(1, round(writes["inserts"] / events)),
            round((writes["updates"] + writes["deletes"]) / events),
        )
        payload = builder.bodies(next(a for a in chains(accounts, 1)), 1)[SIGNUP.index("invoice.paid")]
        per_client = math.ceil(min(events, 10_000) / 32)
        with Sampled(server) as pg:
            reference = pgbench(
                db, pgbench_script(payload, inserts, updates), bench.workdir, clients=32, limit=["-t", str(per_client)]
            )
        return {
            "command": command_of("bench.e2e", args, parse),
            "planned": sum(len(c) for m in months for _, c in m),
            "customers": len(accounts),
            "months": report,
            "statuses": statuses,
            "writes": writes,
            "cpu": cpu,
            "seconds": round(float(last) - first, 2) if last else None,
            "check_exit": check.returncode,
            "balances": {"expected": len(expected), "wrong": wrong},
            "pgbench": reference
            | {
                "inserts": inserts,
                "updates": updates,
                "postgresql_ms": 1000 * pg.seconds / (32 * per_client) if pg.seconds else None,
            },
        }


def _postmaster(db: str) -> int | None:
    """PostgreSQL's main process when it runs here (a backend's parent), for its CPU."""
    with psycopg.connect(db, autocommit=True) as conn:  # read while the backend lives
        stat = Path(f"/proc/{one(conn.execute('SELECT pg_backend_pid()'))[0]}/stat")
        return int(stat.read_text().rsplit(")", 1)[1].split()[1]) if stat.exists() else None


def rows(r: dict[str, Any]) -> Rows:
    processed, command, pg = r["statuses"].get("processed", 0), r["command"], r["pgbench"]
    n, rate = max(1, processed), processed / r["seconds"] if r["seconds"] else None
    ok, pending = sum(m["ok"] for m in r["months"]), sum(v for k, v in r["statuses"].items() if k != "processed")
    per = lambda key: num(r["writes"][key] / n)  # noqa: E731
    ms = lambda seconds: "—" if seconds is None else num(1000 * seconds / n)  # noqa: E731
    return [
        row(
            "events/s, first delivery → last balance final",
            num(rate, "/s"),
            f"pgbench {num(pg['tps'])} tps ({pg['inserts']} inserts + {pg['updates']} updates an event)",
            ratio(rate, pg["tps"]),
            command,
        ),
        row("pgbench, the reference", num(pg["tps"], " tps"), "", None, pg["command"]),
        row(
            "events delivered (2xx) / planned",
            f"{ok:,} / {r['planned']:,}",
            f"{r['customers']:,} customers",
            "all" if ok == r["planned"] else "**not all**",
            command,
        ),
        row(
            "events processed / not final",
            f"{processed:,} / {pending:,}",
            "",
            "yes" if not pending else "**no**",
            command,
        ),
        row(
            "balances equal to the catalogue's arithmetic",
            f"{r['balances']['expected'] - r['balances']['wrong']:,} of {r['balances']['expected']:,}",
            "",
            "yes" if not r["balances"]["wrong"] else "**no**",
            command,
        ),
        row(
            "`credits check`",
            "passed" if r["check_exit"] == 0 else f"exit {r['check_exit']}",
            "",
            None,
            "credits check",
        ),
        row(
            "row writes per event (inserts / updates / deletes)",
            f"{per('inserts')} / {per('updates')} / {per('deletes')}",
            f"pgbench {pg['inserts']} / {pg['updates']} / 0",
            None,
            command,
        ),
        row("commits per event (read-only transactions included)", per("commits"), "pgbench 2", None, command),
        row(
            "CPU per event: API / workers / PostgreSQL / load generator",
            " / ".join(ms(r["cpu"][k]) for k in ("api", "workers", "postgresql", "load")) + " ms",
            f"pgbench: PostgreSQL {num(pg['postgresql_ms'], ' ms')} a transaction",
            None,
            command,
        ),
    ]


if __name__ == "__main__":
    standalone(parse, run, rows)
