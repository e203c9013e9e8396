-- The reconcile benchmark's local side: what the service holds had it processed every delivered invoice's webhook,
-- derived from the dataset's rules (bench/fake_stripe.py). {n}, {newest}, {span}, {period} are filled in by
-- bench/reconcile.py; %(name)s are its parameters (the invoice.paid templates), %% a literal %.
CREATE TEMP TABLE items AS SELECT i, 'b' || lpad(i::text, 7, '0') AS tag, {newest} - (i * {span}) / {n} AS paid,
    CASE WHEN i %% 10 = 0 THEN 'subscription_create' ELSE 'subscription_cycle' END AS reason
  FROM generate_series(0::bigint, {n} - 1) AS i WHERE i %% 1000 <> 500;
INSERT INTO accounts (id, public_id, stripe_customer_id, plan, status, referral_code, created_at)
  SELECT {n} + 1 + k, 'acct_bench_referrer_' || k, 'cus_bench_referrer_' || k, 'starter', 'active',
         'BREF' || lpad(k::text, 2, '0'), to_timestamp({newest} - (({n} - 1)::bigint * {span}) / {n}) FROM generate_series(0, 9) AS k;
INSERT INTO accounts (id, public_id, stripe_customer_id, plan, status, period_end, subscription_id, email, created_at)
  SELECT i + 1, 'acct_' || tag, 'cus_' || tag, 'starter', 'active', to_timestamp(paid + {period}), 'sub_' || tag,
         tag || '@example.com', to_timestamp(paid) FROM items ORDER BY i;
INSERT INTO stripe_events (id, type, object_type, object_id, api_version, livemode, created, payload, status, attempts,
                           outcome, next_attempt_at, received_at, processed_at)
  SELECT 'evt_' || tag, 'invoice.paid', 'invoice', 'in_' || tag, '2025-03-31.basil', false, to_timestamp(paid),
         replace(replace(replace(CASE WHEN i %% 10 = 0 THEN %(first)s ELSE %(renewal)s END, %(tag)s, tag), %(t_paid)s, paid::text),
                 %(t_end)s, (paid + {period})::text)::jsonb, 'processed', 1, 'granted 2000 credits (starter)',
         to_timestamp(paid), to_timestamp(paid), to_timestamp(paid) FROM items ORDER BY i;
INSERT INTO payments (id, account_id, kind, amount, currency, subscription_id, billing_reason, product, credits, outcome,
                      paid_at, created_at)
  SELECT 'in_' || tag, i + 1, 'invoice', 34900, 'usd', 'sub_' || tag, reason, 'starter', 2000, 'granted', to_timestamp(paid),
         to_timestamp(paid) FROM items ORDER BY i;
INSERT INTO ledger_entries (account_id, kind, amount, idempotency_key, reason, actor, metadata, created_at)
  SELECT i + 1, 'grant', 2000, 'invoice:in_' || tag, 'starter plan, invoice in_' || tag, 'stripe',
         jsonb_build_object('source', 'plan', 'invoice', 'in_' || tag, 'plan', 'starter', 'billing_reason', reason, 'period_end',
                            to_char(to_timestamp(paid + {period}) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')),
         to_timestamp(paid) FROM items ORDER BY i;
INSERT INTO referrals (referrer_id, referee_id, code, source, status, qualifying_payment, attributed_at, qualified_at, paid_at)
  SELECT {n} + 1 + i %% 10, i + 1, 'BREF' || lpad((i %% 10)::text, 2, '0'), 'subscription', 'paid', 'in_' || tag,
         to_timestamp(paid), to_timestamp(paid), to_timestamp(paid) FROM items WHERE i %% 200 = 0 ORDER BY i;
INSERT INTO ledger_entries (account_id, kind, amount, idempotency_key, reason, actor, metadata, created_at)
  SELECT CASE side WHEN 'referrer' THEN referrer_id ELSE referee_id END, 'grant', 3000, 'referral:' || id || ':' || side,
         'referral ' || id || ' (' || side || ')', 'referrals', jsonb_build_object('source', 'referral', 'referral', id, 'side', side),
         paid_at FROM referrals, (VALUES (1, 'referrer'), (2, 'referee')) AS sides (n, side) ORDER BY id, n;
INSERT INTO credit_grants (account_id, entry_id, source, amount, remaining, spent, expired, reversed, rollover, created_at)
  SELECT account_id, id, metadata ->> 'source', amount, amount, 0, 0, 0, true, created_at FROM ledger_entries ORDER BY id;
SELECT setval(pg_get_serial_sequence('accounts', 'id'), (SELECT max(id) FROM accounts));
