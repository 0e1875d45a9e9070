-- Talking back to Stripe: reconciliation runs, backfilled events, and the `reconciled` decision.
-- Append-only: never edit this file once it has landed; add a new migration instead.

-- One row per reconciliation run (`worker reconcile now`, or the schedule). A scheduled run is
-- claimed by inserting its tick (scheduled_for is unique), so one replica runs each tick.
-- `cursor` is the last subscription listed: a run that failed resumes from its cursor
-- (resumed_from names the run it continues).
CREATE TABLE reconciliation_runs (
    id                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    trigger               text NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    scheduled_for         timestamptz UNIQUE,
    dry_run               boolean NOT NULL DEFAULT false,
    status                text NOT NULL DEFAULT 'running'
                          CHECK (status IN ('running', 'succeeded', 'failed')),
    started_at            timestamptz NOT NULL DEFAULT now(),
    finished_at           timestamptz,
    resumed_from          bigint REFERENCES reconciliation_runs (id),
    cursor                text,
    listing_complete      boolean NOT NULL DEFAULT false,
    subscriptions_listed  integer NOT NULL DEFAULT 0,
    organizations_checked integer NOT NULL DEFAULT 0,
    drifted               integer NOT NULL DEFAULT 0,
    healed                integer NOT NULL DEFAULT 0,
    orphans               integer NOT NULL DEFAULT 0,
    unlinked              integer NOT NULL DEFAULT 0,
    errors                integer NOT NULL DEFAULT 0,
    events_backfilled     integer NOT NULL DEFAULT 0,
    error                 text,
    report                jsonb
);

CREATE INDEX reconciliation_runs_started_idx ON reconciliation_runs (started_at DESC);

-- Where an inbox row came from: a webhook delivery, or `worker backfill` (the Events API).
ALTER TABLE webhook_events ADD COLUMN source text NOT NULL DEFAULT 'webhook'
    CHECK (source IN ('webhook', 'backfill'));

ALTER TABLE billing_audit DROP CONSTRAINT billing_audit_decision_check;
ALTER TABLE billing_audit ADD CONSTRAINT billing_audit_decision_check
    CHECK (decision IN ('applied', 'stale', 'tie', 'refetched', 'deferred', 'ignored',
                        'duplicate', 'dead', 'reconciled'));
