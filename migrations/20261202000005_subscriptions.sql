-- Billing state per subscription: an organization with several subscriptions (a replacement,
-- an upgrade by a new subscription, a lifetime purchase beside a monthly plan) keeps each one's
-- own state and ordering marker; the organization's columns become the stored result of one
-- derivation over them (shared::billing::organization::derive).
-- Append-only: never edit this file once it has landed; add a new migration instead.

-- One row per Stripe subscription. The status has one ordering marker (status_event_*): a
-- newer event may replace it, an older one may not. status_invoice: the invoice event that
-- set the status, if one did (its rule is applied again on an older snapshot's status). The other columns are the details of the
-- newest snapshot delivered (snapshot_event_created), which an older snapshot may still
-- replace when it is newer than the one they came from.
CREATE TABLE subscriptions (
    id                     text PRIMARY KEY,
    organization_id        text NOT NULL REFERENCES organizations (id),
    customer_id            text,
    status                 plan_status NOT NULL,
    plan                   text,
    price_ids              text[] NOT NULL DEFAULT '{}',
    quantity               bigint,
    current_period_end     timestamptz,
    cancel_at_period_end   boolean NOT NULL DEFAULT false,
    cancel_at              timestamptz,
    canceled_at            timestamptz,
    ended_at               timestamptz,
    trial_end              timestamptz,
    started_at             timestamptz,
    pending_update         boolean NOT NULL DEFAULT false,
    status_event_id        text NOT NULL,
    status_event_created   timestamptz NOT NULL,
    status_invoice         jsonb,
    snapshot_event_created timestamptz,
    failed_invoice_id      text,
    failed_invoice_created timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX subscriptions_organization_idx ON subscriptions (organization_id);

-- cancel_at: the governing subscription's scheduled end (portal cancellations in flexible
-- billing mode set it instead of cancel_at_period_end). access_ends_at: when access ends if
-- nothing changes. lifetime_*: the paid one-time checkout that grants lifetime access.
ALTER TABLE organizations
    ADD COLUMN cancel_at           timestamptz,
    ADD COLUMN access_ends_at      timestamptz,
    ADD COLUMN lifetime_event_id   text,
    ADD COLUMN lifetime_granted_at timestamptz;

ALTER TABLE billing_audit ADD COLUMN subscription_id text;

-- Carry the state of existing organizations over: the subscription each one held becomes a
-- row with the same marker, and a lifetime plan becomes the lifetime purchase.
INSERT INTO subscriptions (id, organization_id, customer_id, status, plan, current_period_end,
                           cancel_at_period_end, ended_at, status_event_id,
                           status_event_created, snapshot_event_created)
SELECT stripe_subscription_id, id, stripe_customer_id, plan_status, plan, current_period_end,
       cancel_at_period_end, ended_at, state_event_id, state_event_created,
       CASE WHEN plan IS NOT NULL THEN state_event_created END
FROM organizations
WHERE stripe_subscription_id IS NOT NULL AND plan_status <> 'none'
  AND state_event_id IS NOT NULL AND state_event_created IS NOT NULL
ON CONFLICT (id) DO NOTHING;

UPDATE organizations
SET lifetime_event_id = state_event_id, lifetime_granted_at = state_event_created
WHERE plan = 'lifetime';
