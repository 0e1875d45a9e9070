//! `worker`: applies queued Stripe events to organizations' billing state, sends the outbox's
//! emails, and the operators' commands.

pub mod apply;
pub mod consume;
pub mod email;
pub mod lookup;
pub mod ops;
pub mod reconcile;
pub mod sweeper;
pub mod usage;
