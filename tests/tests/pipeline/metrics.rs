//! Metric names cannot drift: every metric an alert rule or a dashboard panel uses is exported
//! by the real binaries. Counters and gauges must be there from start (at 0, with their label
//! values); histograms appear with their first observation, so the test then drives the
//! traffic that produces each one (webhooks, apply transactions, a reconciliation) and checks
//! again. The names come from the PromQL itself: every `billing_…` token, with `_bucket`,
//! `_sum` and `_count` kept as written (a histogram's series), and every `name{label="value"}`
//! matcher must match an exported series.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use e2e::harness::{FakeStripe, Pipeline, eventually, unique_tag};
use e2e::stripe_events::{Customer, subscription_lifecycle};
use serde_json::json;

/// The PromQL of the alert rules and the dashboard, with where each comes from.
fn used_expressions() -> Vec<(String, String)> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");
    let mut found: Vec<(String, String)> = alerts
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("expr:"))
        .map(|expr| ("alerts.yml".to_owned(), expr.trim().to_owned()))
        .collect();
    assert!(
        found
            .iter()
            .all(|(_, e)| !e.is_empty() && e != "|" && e != ">"),
        "alerts.yml: write each expr on one line, or teach this test block scalars"
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/dashboards/billing.json"))
            .expect("billing.json"),
    )
    .expect("dashboard JSON");
    fn walk(panels: &serde_json::Value, found: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let title = panel["title"].as_str().unwrap_or("");
                    found.push((format!("billing.json '{title}'"), expr.to_owned()));
                }
            }
            walk(&panel["panels"], found);
        }
    }
    walk(&dashboard["panels"], &mut found);
    assert!(found.len() > 20, "found only {} expressions", found.len());
    found
}

/// `billing_…` names in an expression (outside quoted strings), and its `name{label="value"}`
/// exact matchers.
fn names_and_matchers(expr: &str) -> (BTreeSet<String>, Vec<(String, String, String)>) {
    let mut names = BTreeSet::new();
    let mut matchers = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    let ident = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    while i < bytes.len() {
        if bytes[i] == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += 1;
            }
            i += 1;
            continue;
        }
        let starts_word = i == 0 || !ident(bytes[i - 1]);
        if starts_word && expr[i..].starts_with("billing_") {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let name = expr[start..i].to_owned();
            if bytes.get(i) == Some(&b'{') {
                let end = expr[i..].find('}').map(|e| i + e).expect("closing brace");
                for matcher in expr[i + 1..end].split(',') {
                    if let Some((label, value)) = matcher.split_once("=\"")
                        && !label.ends_with(['!', '=', '~'])
                    {
                        let value = value.trim_end_matches('"');
                        matchers.push((name.clone(), label.trim().to_owned(), value.to_owned()));
                    }
                }
                i = end;
            }
            names.insert(name);
            continue;
        }
        i += 1;
    }
    (names, matchers)
}

/// Series exported at `url`: name → the label sets seen (as `label="value"` strings).
async fn scrape(url: &str) -> BTreeMap<String, BTreeSet<String>> {
    let text = reqwest::get(url)
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let head = line.rsplit_once(' ').map_or(line, |(head, _)| head);
        let (name, labels) = match head.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (head, ""),
        };
        let entry = series.entry(name.to_owned()).or_default();
        for label in labels.split(',').filter(|l| !l.is_empty()) {
            entry.insert(label.to_owned());
        }
    }
    series
}

/// What of `used` the scrapes lack: names, and exact matchers no series has.
fn missing(
    used: &[(String, String)],
    exported: &BTreeMap<String, BTreeSet<String>>,
    histograms_too: bool,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (where_, expr) in used {
        let (names, matchers) = names_and_matchers(expr);
        for name in names {
            let histogram = ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.ends_with(s));
            if histogram && !histograms_too {
                continue;
            }
            if !exported.contains_key(&name) {
                missing.push(format!("{where_}: {name} is not exported ({expr})"));
            }
        }
        for (name, label, value) in matchers {
            let wanted = format!("{label}=\"{value}\"");
            if exported.get(&name).is_some_and(|l| !l.contains(&wanted)) {
                missing.push(format!("{where_}: no {name} series with {wanted}"));
            }
        }
    }
    missing
}

fn merged(
    a: BTreeMap<String, BTreeSet<String>>,
    b: BTreeMap<String, BTreeSet<String>>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = a;
    for (name, labels) in b {
        out.entry(name).or_default().extend(labels);
    }
    out
}

#[tokio::test]
async fn every_metric_an_alert_or_panel_uses_is_exported_counters_and_gauges_from_start() {
    let used = used_expressions();
    let (stripe, url) = FakeStripe::start().await;
    let mut p = Pipeline::start(&[
        ("STRIPE_SECRET_KEY", "sk_test_fake"),
        ("STRIPE_API_BASE", &url),
        ("SWEEP_INTERVAL_MS", "200"),
    ])
    .await;
    // A reconciliation every second (against the empty fake Stripe), for its histogram.
    p.start_worker_with(&[("RECONCILE_SCHEDULE", "* * * * * *")]);
    let worker_url = p.worker_metrics_url.clone();
    let at_start = eventually(Duration::from_secs(20), "both /metrics", || async {
        let worker = reqwest::get(&worker_url).await.ok()?;
        worker.status().is_success().then_some(())?;
        Some(merged(
            scrape(&p.ingest_metrics_url).await,
            scrape(&worker_url).await,
        ))
    })
    .await;
    let before = missing(&used, &at_start, false);
    assert!(
        before.is_empty(),
        "counters and gauges missing before any traffic:\n{}",
        before.join("\n")
    );

    // Traffic: a lifecycle applied (webhook and apply histograms, event lag), a refused
    // webhook, an Enterprise request; the schedule runs the reconciliations.
    let customer = Customer::new(&unique_tag());
    for step in subscription_lifecycle(&customer, chrono::Utc::now().timestamp() - 60) {
        assert_eq!(p.client.post_event(&step.event).await.0, 200);
    }
    assert_eq!(p.client.post_webhook_raw(b"{}".to_vec(), None).await.0, 400);
    let request = json!({"organization_id": "org_m", "organization_name": "M",
                         "admin_email": "it@m.example", "member_count": 3});
    assert_eq!(p.client.enterprise_request(&request, None).await.0, 200);
    let after = eventually(
        Duration::from_secs(60),
        "every histogram after traffic",
        || async {
            let exported = merged(
                scrape(&p.ingest_metrics_url).await,
                scrape(&worker_url).await,
            );
            missing(&used, &exported, true)
                .is_empty()
                .then_some(exported)
        },
    )
    .await;
    // A label value an increment site uses that was not registered at start.
    for (name, labels) in &after {
        if let Some(registered) = at_start.get(name) {
            let unregistered: Vec<_> = labels
                .iter()
                .filter(|l| !l.starts_with("le=") && !l.starts_with("quantile="))
                .filter(|l| !registered.contains(*l))
                .collect();
            assert!(
                unregistered.is_empty(),
                "{name} gained {unregistered:?} after start: list it in shared/src/metrics.rs"
            );
        }
    }
    drop(stripe);
}
