-- One-time purchases: a ledger of payments, one row per payment (a payment-mode Checkout and
-- its payment intent), each with its own ordering markers, from which the organization's
-- lifetime access is derived (shared::billing::payment).
-- Append-only: never edit this file once it has landed; add a new migration instead.

CREATE TYPE payment_status AS ENUM (
    'pending', 'succeeded', 'failed', 'refunded', 'partially_refunded', 'disputed'
);
CREATE TYPE payment_outcome AS ENUM ('pending', 'succeeded', 'failed');
CREATE TYPE dispute_status AS ENUM ('open', 'won', 'lost');

-- id: the payment intent id when the first event seen knew it, else the checkout session id;
-- never changes. organization_id is null while only events that name no organization (a
-- refund delivered before its checkout) are known: the checkout that arrives later claims the
-- row. status is derived from outcome, refunds and dispute (stored for readers and filters).
-- Each of the three has the event that set it (id and created): the ordering markers.
CREATE TABLE payments (
    id                     text PRIMARY KEY,
    organization_id        text REFERENCES organizations (id),
    checkout_session_id    text UNIQUE,
    payment_intent_id      text UNIQUE,
    customer_id            text,
    amount                 bigint,
    currency               text,
    status                 payment_status NOT NULL,
    outcome                payment_outcome NOT NULL,
    outcome_event_id       text,
    outcome_event_created  timestamptz,
    failure_reason         text,
    amount_refunded        bigint NOT NULL DEFAULT 0,
    fully_refunded         boolean NOT NULL DEFAULT false,
    refund_event_id        text,
    refund_event_created   timestamptz,
    dispute_id             text,
    dispute_status         dispute_status,
    dispute_event_id       text,
    dispute_event_created  timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX payments_organization_idx ON payments (organization_id);

-- Carry existing lifetime purchases over: each organization whose lifetime_event_id is set
-- gets a succeeded payment (amount unknown) granted by that event, so lifetime access stays
-- derived from payments alone.
INSERT INTO payments (id, organization_id, customer_id, checkout_session_id, status, outcome,
                      outcome_event_id, outcome_event_created)
SELECT 'legacy_' || lifetime_event_id, id, stripe_customer_id, 'legacy_' || lifetime_event_id,
       'succeeded', 'succeeded', lifetime_event_id, lifetime_granted_at
FROM organizations
WHERE lifetime_event_id IS NOT NULL
ON CONFLICT (id) DO NOTHING;
