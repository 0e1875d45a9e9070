//! Sends a signed demo subscription lifecycle, built from Stripe's fixture objects, to a
//! running ingest and prints the organization's billing state after each event.
//!
//! `stripe-demo [INGEST_URL]` (default `http://127.0.0.1:8080`); reads `STRIPE_WEBHOOK_SECRET`
//! (the first secret signs) and `INTERNAL_API_TOKEN`.

use std::time::{Duration, Instant};

use e2e::stripe_events::{Customer, subscription_lifecycle};
use serde_json::Value;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let base = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
    let secret = std::env::var("STRIPE_WEBHOOK_SECRET")?;
    let secret = secret
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let token = std::env::var("INTERNAL_API_TOKEN")?;
    let http = reqwest::Client::new();
    let customer = Customer::new(&format!("demo_{}", chrono::Utc::now().timestamp()));
    println!(
        "organization {}: sending a signed subscription lifecycle to {base}",
        customer.organization_id
    );
    let columns = ["event", "plan_status", "access", "cancel@end", "period_end"];
    println!(
        "{:<32} {:<12} {:<10} {:<10} {}",
        columns[0], columns[1], columns[2], columns[3], columns[4]
    );

    for step in subscription_lifecycle(&customer, chrono::Utc::now().timestamp()) {
        let body = serde_json::to_vec(&step.event)?;
        let signature =
            shared::signature::header_for(&body, &secret, chrono::Utc::now().timestamp());
        let response = http
            .post(format!("{base}/v1/webhooks/stripe"))
            .header("Stripe-Signature", signature)
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "ingest answered {}",
            response.status()
        );
        let state = wait_for_state(&http, &base, &token, &customer.organization_id, &step).await?;
        println!(
            "{:<32} {:<12} {:<10} {:<10} {}",
            step.event["type"].as_str().unwrap_or_default(),
            state["plan_status"].as_str().unwrap_or_default(),
            state["access"].as_str().unwrap_or_default(),
            state["cancel_at_period_end"],
            state["current_period_end"].as_str().unwrap_or("-"),
        );
    }
    println!("done: every event went ingest → Postgres → Redis → worker → billing state");
    Ok(())
}

/// Polls the billing endpoint until it shows the step's expected state.
async fn wait_for_state(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    organization_id: &str,
    step: &e2e::stripe_events::Step,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = http
            .get(format!("{base}/v1/organizations/{organization_id}/billing"))
            .bearer_auth(token)
            .send()
            .await?;
        if response.status().is_success() {
            let state: Value = response.json().await?;
            if state["plan_status"] == step.plan_status
                && state["cancel_at_period_end"] == step.cancel_at_period_end
            {
                return Ok(state);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the worker did not apply {} within 15 s",
            step.event["id"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
