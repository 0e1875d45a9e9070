//! The worker's command line: its commands, their arguments and how they are parsed. What
//! each command does is in `main.rs` (`run`, `migrate`) and `commands.rs` (the operators').

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use worker::ops;

/// Applies Stripe events to organizations' billing state.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Consume the event queue and sweep the inbox (the default). Configured by environment
    /// variables; see README.
    Run,
    /// Apply pending database migrations, then exit. Needs only DATABASE_URL.
    Migrate,
    /// Events and emails the worker gave up on.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// One stored event.
    #[command(subcommand)]
    Events(Events),
    /// Compare Stripe's subscriptions with the stored ones and heal drift. Needs the worker's
    /// environment and STRIPE_SECRET_KEY.
    #[command(subcommand)]
    Reconcile(Reconcile),
    /// Store the events Stripe still has (30 days) that the inbox lacks, and enqueue them.
    /// Needs the worker's environment and STRIPE_SECRET_KEY.
    Backfill {
        /// From when: RFC 3339 time, date, or age (6h, 3d); at most 30 days ago.
        #[arg(long, value_name = "TIME", value_parser = within_event_retention)]
        since: DateTime<Utc>,
        /// Only events of this type (repeatable); default every type the rules handle.
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// Count what would be stored; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Reconcile {
    /// Run one reconciliation now, in this process.
    Now {
        /// Show the drift per organization; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recent runs, newest first. Needs only DATABASE_URL.
    History {
        /// At most this many.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLetters {
    /// List dead letters, newest first. Needs only DATABASE_URL.
    List {
        /// Only this type (e.g. customer.subscription.updated, or email.enterprise_request).
        #[arg(long = "type", value_name = "TYPE")]
        event_type: Option<String>,
        /// Only those that died since: RFC 3339 time, date, or age (30m, 6h, 7d).
        #[arg(long, value_name = "TIME", value_parser = since)]
        since: Option<DateTime<Utc>>,
        /// At most this many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply dead letters again, now, in this process. Needs the worker's environment.
    Replay {
        /// The dead letter to replay: an event id (evt_…) or an outbox email id (a UUID).
        #[arg(
            long,
            value_name = "EVENT_ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        id: Option<String>,
        /// Every dead letter (narrowed by --type and --since): events, oldest Stripe event
        /// first, then emails.
        #[arg(long)]
        all: bool,
        /// With --all: only events of this type.
        #[arg(long = "type", value_name = "TYPE", conflicts_with = "id")]
        event_type: Option<String>,
        /// With --all: only those that died since: RFC 3339 time, date, or age (30m, 6h, 7d).
        #[arg(long, value_name = "TIME", value_parser = since, conflicts_with = "id")]
        since: Option<DateTime<Utc>>,
        /// Show what would change for each organization; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Events {
    /// Apply one stored event again, now, in this process. Needs the worker's environment.
    Replay {
        /// The Stripe event id (evt_…).
        event_id: String,
        /// Run the rules even if the event was already applied.
        #[arg(long)]
        force: bool,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The inbox row, its decisions and its organization's state. Needs only DATABASE_URL.
    Show {
        /// The Stripe event id (evt_…).
        event_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn since(value: &str) -> Result<DateTime<Utc>, String> {
    ops::parse_since(value, Utc::now())
}

pub(crate) fn within_event_retention(value: &str) -> Result<DateTime<Utc>, String> {
    let time = since(value)?;
    let oldest = Utc::now()
        - chrono::TimeDelta::from_std(shared::config::EVENT_RETENTION).unwrap_or_default();
    if time < oldest {
        return Err(format!(
            "{value:?} is more than 30 days ago: Stripe keeps events for 30 days"
        ));
    }
    Ok(time)
}
