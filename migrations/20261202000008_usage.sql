-- Metered usage: records accepted from the product's backend, and the meter events that
-- report them to Stripe Billing Meters, each exactly once.
-- Append-only: never edit this file once it has landed; add a new migration instead.

-- One row per usage record. (organization, meter, identifier) is the caller's idempotency:
-- a repeat is accepted and not counted twice. report_id: the report that covers it (null
-- while pending).
CREATE TABLE usage_records (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_id text NOT NULL,
    meter           text NOT NULL,
    identifier      text NOT NULL,
    value           bigint NOT NULL CHECK (value > 0),
    occurred_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    report_id       bigint,
    UNIQUE (organization_id, meter, identifier)
);

CREATE INDEX usage_records_pending_idx ON usage_records (organization_id, meter, id)
    WHERE report_id IS NULL;
CREATE INDEX usage_records_report_idx ON usage_records (report_id) WHERE report_id IS NOT NULL;

-- One row per meter event: the sum of exactly the records bound to it, under an identifier
-- derived from them. It is committed, records bound, before Stripe is called, so a crash
-- after the call sends the same identifier again (Stripe deduplicates it). At most one
-- unfinished report per organization and meter (the partial unique index): one call in
-- flight per customer and meter, and each report's records are fixed.
-- status: sending (to send; retry_at after a failed attempt, lease_until while a worker
-- sends it), sent (stripe_answer, sent_at), dead (a permanent refusal: last_error).
CREATE TABLE usage_reports (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_id text NOT NULL,
    meter           text NOT NULL,
    customer_id     text,
    identifier      text NOT NULL UNIQUE,
    value           bigint NOT NULL,
    records         integer NOT NULL,
    occurred_at     timestamptz NOT NULL,
    status          text NOT NULL DEFAULT 'sending'
                    CHECK (status IN ('sending', 'sent', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    retry_at        timestamptz,
    lease_until     timestamptz,
    stripe_answer   jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    died_at         timestamptz
);

CREATE UNIQUE INDEX usage_reports_one_unfinished_idx ON usage_reports (organization_id, meter)
    WHERE status = 'sending';
CREATE INDEX usage_reports_dead_idx ON usage_reports (died_at DESC) WHERE status = 'dead';
