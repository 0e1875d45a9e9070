-- Enterprise plan requests and the email outbox.
-- Append-only: never edit this file once it has landed; add a new migration instead.

-- One row per Enterprise plan request of the product's backend (no Stripe checkout for
-- Enterprise: sales handles it). `idempotency_key` is the caller's `Idempotency-Key` header:
-- a repeated call with the same key finds this row instead of making a new one.
CREATE TABLE enterprise_requests (
    id                uuid PRIMARY KEY,
    organization_id   text NOT NULL,
    organization_name text NOT NULL,
    admin_email       text NOT NULL,
    member_count      integer NOT NULL CHECK (member_count BETWEEN 1 AND 1000000),
    idempotency_key   text UNIQUE,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX enterprise_requests_organization_idx
    ON enterprise_requests (organization_id, created_at);

-- The email outbox: one row per email to send, written in the same transaction as what it
-- tells about, sent by the worker with an idempotency key derived from the row id.
-- status: pending (to send; retry_at set after a failed attempt), sent (resend_email_id,
-- sent_at), dead (gave up; see last_error). enqueued_at: when a job was last pushed for it.
CREATE TABLE email_outbox (
    id              uuid PRIMARY KEY,
    request_id      uuid NOT NULL REFERENCES enterprise_requests (id),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sent', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    retry_at        timestamptz,
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    resend_email_id text,
    sent_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX email_outbox_request_idx ON email_outbox (request_id);
-- What the sweeper scans: pending rows by their due time.
CREATE INDEX email_outbox_pending_idx ON email_outbox (coalesce(retry_at, enqueued_at))
    WHERE status = 'pending';
CREATE INDEX email_outbox_dead_idx ON email_outbox (created_at) WHERE status = 'dead';
