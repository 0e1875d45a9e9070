-- Stripe customers that Stripe says belong to no organization (their customer object names
-- no metadata.organization_id, or it was deleted): their events are `ignored` at once instead
-- of waiting days for a link. Written by the worker's customer lookup under the customer's
-- link lock; removed when the customer is linked after all (a checkout, or a customer.updated
-- that adds the metadata), so from then on its events apply again.
-- Append-only: never edit this file once it has landed; add a new migration instead.
CREATE TABLE foreign_customers (
    customer_id text PRIMARY KEY,
    reason      text NOT NULL,
    checked_at  timestamptz NOT NULL DEFAULT now()
);
