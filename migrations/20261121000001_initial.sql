-- The billing state store and the webhook inbox.
-- Append-only: never edit this file once it has landed; add a new migration instead.

CREATE TYPE plan_status AS ENUM (
    'none',
    'incomplete',
    'incomplete_expired',
    'trialing',
    'active',
    'past_due',
    'canceled',
    'unpaid',
    'paused'
);

-- One row per customer organization of the SaaS. `state_event_*` name the Stripe event whose
-- snapshot the state columns hold: a newer event may replace it, an older one may not.
CREATE TABLE organizations (
    id                     text PRIMARY KEY,
    name                   text,
    stripe_customer_id     text UNIQUE,
    stripe_subscription_id text,
    plan                   text,
    plan_status            plan_status NOT NULL DEFAULT 'none',
    billing_email          text,
    cancel_at_period_end   boolean NOT NULL DEFAULT false,
    current_period_end     timestamptz,
    ended_at               timestamptz,
    state_event_created    timestamptz,
    state_event_id         text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- The inbox: every verified webhook, byte for byte, and its fate.
-- status: pending (stored, to be applied), deferred (waiting for its organization link),
-- processed (a decision was recorded), dead (gave up; see last_error).
CREATE TABLE webhook_events (
    id                 text PRIMARY KEY,
    type               text NOT NULL,
    livemode           boolean NOT NULL,
    api_version        text,
    stripe_created     timestamptz NOT NULL,
    payload            bytea NOT NULL,
    received_at        timestamptz NOT NULL DEFAULT now(),
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'deferred', 'processed', 'dead')),
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    stripe_customer_id text,
    processed_at       timestamptz,
    enqueued_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhook_events_unfinished_idx ON webhook_events (enqueued_at)
    WHERE status IN ('pending', 'deferred');
CREATE INDEX webhook_events_deferred_customer_idx ON webhook_events (stripe_customer_id)
    WHERE status = 'deferred';

-- Idempotency: a row here commits together with the state change of that event.
CREATE TABLE processed_events (
    id         text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per decision taken on an event: what it did to which organization.
CREATE TABLE billing_audit (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    organization_id text,
    decision        text NOT NULL
                    CHECK (decision IN ('applied', 'stale', 'tie', 'refetched', 'deferred',
                                        'ignored', 'duplicate')),
    status_before   plan_status,
    status_after    plan_status,
    detail          text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX billing_audit_event_idx ON billing_audit (event_id);
CREATE INDEX billing_audit_organization_idx ON billing_audit (organization_id, created_at);
