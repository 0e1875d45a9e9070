//! Test support shared by the end-to-end tests, the local demo and the load generator:
//! Stripe events built from Stripe's fixture objects, signed deliveries, a database and Redis
//! queue prefix of one's own per test, and the real binaries as child processes.

pub mod fake_resend;
pub mod fake_stripe;
pub mod harness;
pub mod load;
pub mod scenarios;
pub mod stripe_events;
