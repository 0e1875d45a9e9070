//! The harness's fake Stripe API as a program, for measuring reconciliation: serves
//! `--subscriptions N` subscriptions built from the fixtures (`sub_bench_<n>` of customer
//! `cus_bench_<n>`), prints its base URL on the first line of stdout, and serves until killed.
//! With `--database-url`, first links each customer to an organization `org_bench_<n>` there,
//! so every subscription resolves and, the database holding none of them, drifts.
//!
//! `fake-stripe --subscriptions 10000 [--rate-limit 100] [--database-url URL]
//! [--meter-latency-ms 50]`

use clap::Parser;
use e2e::fake_stripe::FakeStripe;
use e2e::stripe_events::Customer;

/// Serves a fake Stripe API with generated subscriptions.
#[derive(Debug, Parser)]
struct Args {
    /// How many subscriptions to serve.
    #[arg(long, default_value_t = 10_000)]
    subscriptions: usize,
    /// Refuse requests beyond this many a second with 429, as Stripe does (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    rate_limit: f64,
    /// Link every customer to an organization in this database.
    #[arg(long)]
    database_url: Option<String>,
    /// How long each meter event takes to answer, in milliseconds.
    #[arg(long, default_value_t = 20)]
    meter_latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (stripe, url) = FakeStripe::start().await;
    let period_end = chrono::Utc::now().timestamp() + 20 * 86_400;
    for n in 0..args.subscriptions {
        let customer = Customer::new(&format!("bench_{n}"));
        stripe.set_subscription(customer.subscription("active", false, period_end));
    }
    stripe.set_meter_latency(std::time::Duration::from_millis(args.meter_latency_ms));
    if args.rate_limit > 0.0 {
        stripe.limit_rate(args.rate_limit, args.rate_limit);
    }
    if let Some(database_url) = &args.database_url {
        let pool = sqlx::PgPool::connect(database_url).await?;
        sqlx::query(
            "INSERT INTO organizations (id, stripe_customer_id)
             SELECT 'org_bench_' || n, 'cus_bench_' || n FROM generate_series(0, $1 - 1) AS n
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(args.subscriptions as i64)
        .execute(&pool)
        .await?;
    }
    println!("{url}");
    eprintln!(
        "fake Stripe on {url}: {} subscriptions; Ctrl-C stops it",
        args.subscriptions
    );
    tokio::signal::ctrl_c().await?;
    eprintln!(
        "served {} of {} requests",
        stripe.served(),
        stripe.requests()
    );
    Ok(())
}
