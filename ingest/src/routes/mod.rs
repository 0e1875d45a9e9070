//! The HTTP routes of ingest. Handlers only orchestrate: extract, one call into `shared`, answer.

pub mod billing;
pub mod enterprise;
pub mod health;
pub mod payments;
pub mod webhooks;
