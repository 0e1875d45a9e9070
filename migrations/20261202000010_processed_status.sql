-- `processed_events` and `webhook_events.status = 'processed'` recorded one fact twice: every
-- applied event cost an insert into processed_events (heap row and primary-key entry) on top
-- of the inbox's status update, in the same transaction. The apply transaction now claims an
-- event by updating its inbox row to 'processed' when it was not (a concurrent claim waits
-- for the row lock and then finds it processed, exactly as it waited for the conflicting
-- insert before), so the status is the one record, and processed_events becomes a view of it:
-- what read the table reads the same ids (created_at is when the decision was committed).
-- Every processed_events row had its inbox row processed (both were written in one
-- transaction, and a deferral deleted its claim), so nothing is lost.
-- Append-only: never edit this file once it has landed; add a new migration instead.
DROP TABLE processed_events;
CREATE VIEW processed_events AS
    SELECT id, processed_at AS created_at FROM webhook_events WHERE status = 'processed';
