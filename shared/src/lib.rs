//! What `ingest` and `worker` share: configuration, all SQL, the billing rules, the Stripe
//! payload models, signature checks, Enterprise requests, group work, the queues, telemetry and metrics.

pub mod billing;
pub mod billing_actions;
pub mod config;
pub mod db;
pub mod email_address;
pub mod enterprise;
pub mod envelope;
pub mod group;
pub mod metrics;
pub mod queue;
pub mod retry;
pub mod shutdown;
pub mod signature;
pub mod stripe;
pub mod stripe_api;
pub mod telemetry;
pub mod usage;
