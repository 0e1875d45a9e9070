//! `worker`: applies queued Stripe events to organizations' billing state, and the operators'
//! commands.

pub mod apply;
pub mod consume;
pub mod ops;
pub mod stripe_api;
pub mod sweeper;
