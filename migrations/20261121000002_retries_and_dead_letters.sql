-- Retries owned by Postgres, bounded deferral, and dead letters an operator can find.
-- Append-only: never edit this file once it has landed; add a new migration instead.

-- retry_at: when a failed or deferred event may run again; the sweeper enqueues it then.
-- deferrals / deferred_since: how often and since when an event has waited for its
-- organization; past the deferral window it becomes a dead letter.
ALTER TABLE webhook_events
    ADD COLUMN retry_at       timestamptz,
    ADD COLUMN deferrals      integer NOT NULL DEFAULT 0,
    ADD COLUMN deferred_since timestamptz;

-- Dead letters, newest first, for `worker dead-letters list`.
CREATE INDEX webhook_events_dead_idx ON webhook_events (processed_at DESC) WHERE status = 'dead';

-- An event that was given up on gets an audit row too, and so does an operator's replay.
ALTER TABLE billing_audit DROP CONSTRAINT billing_audit_decision_check;
ALTER TABLE billing_audit ADD CONSTRAINT billing_audit_decision_check
    CHECK (decision IN ('applied', 'stale', 'tie', 'refetched', 'deferred', 'ignored',
                        'duplicate', 'dead'));
