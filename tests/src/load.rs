//! Bodies for the load generator (`loadgen`) and the worker benchmark (`worker-bench`):
//! realistic 4–6 KB Stripe events built once from the fixture builders of
//! [`crate::stripe_events`], then stamped with a unique event id per request.
//!
//! Building and serializing a 5 KB event costs tens of microseconds, far more than sending it
//! on loopback, so a generator that built each body while timing would measure itself. Instead
//! [`BodyFactory`] serializes one template per (customer, event kind) before the timed phase,
//! each with a fixed-width placeholder id; a body is then one copy of its template with
//! [`ID_DIGITS`] digits written over the placeholder. Ids are `evt_<run tag><sequence>`, so
//! every request's id is known from its sequence number alone (verification needs no list
//! from the generator's hot path).
//!
//! The mix is 40 % subscription events (created, updated), 40 % invoice events (paid,
//! payment failed) and 20 % completed checkouts, over many customers. Every object names its
//! organization (`client_reference_id` or `metadata.organization_id`), so the worker applies
//! each event without waiting for a checkout (no deferrals skew its throughput).

use serde_json::{Value, json};

use crate::stripe_events::{Customer, event};

/// Digits of the sequence number in an event id.
pub const ID_DIGITS: usize = 12;
/// Length of the run tag in an event id.
pub const RUN_TAG_LEN: usize = 8;

/// The kinds of events in the mix, in the order sequence numbers cycle through them.
const MIX: [&str; 10] = [
    "customer.subscription.updated",
    "invoice.paid",
    "customer.subscription.created",
    "invoice.payment_failed",
    "checkout.session.completed",
    "customer.subscription.updated",
    "invoice.paid",
    "customer.subscription.updated",
    "invoice.paid",
    "checkout.session.completed",
];

/// One serialized event with a placeholder id at a known offset.
#[derive(Debug, Clone)]
struct Template {
    bytes: Vec<u8>,
    id_at: usize,
    event_type: &'static str,
}

/// Makes unique signed-ready bodies fast; see the module doc.
#[derive(Debug, Clone)]
pub struct BodyFactory {
    run_tag: String,
    templates: Vec<Template>,
}

impl BodyFactory {
    /// Templates for `customers` customers of run `run_tag` (exactly [`RUN_TAG_LEN`] ASCII
    /// letters or digits), each event created `created` (unix seconds).
    pub fn new(run_tag: &str, customers: usize, created: i64) -> BodyFactory {
        BodyFactory::with_foreign(run_tag, customers, created, 0)
    }

    /// [`BodyFactory::new`] where `foreign_percent` % of the customers (those whose number
    /// modulo 100 is below it) belong to no organization: their subscription and invoice
    /// events name none and no checkout of theirs is sent, so the worker defers them all.
    pub fn with_foreign(
        run_tag: &str,
        customers: usize,
        created: i64,
        foreign_percent: usize,
    ) -> BodyFactory {
        assert_eq!(run_tag.len(), RUN_TAG_LEN, "run tag length");
        assert!(run_tag.chars().all(|c| c.is_ascii_alphanumeric()));
        let placeholder = format!("evt_{run_tag}{}", "X".repeat(ID_DIGITS));
        let mut templates = Vec::with_capacity(customers.max(1) * MIX.len());
        for n in 0..customers.max(1) {
            let customer = Customer::new(&format!("{run_tag}_{n}"));
            let foreign = n % 100 < foreign_percent;
            for (k, kind) in MIX.iter().enumerate() {
                let object = if foreign {
                    foreign_object_of(&customer, kind, created)
                } else {
                    object_of(&customer, kind, created)
                };
                let kind = if foreign && *kind == "checkout.session.completed" {
                    "customer.subscription.updated"
                } else {
                    *kind
                };
                let ev = event(&placeholder, kind, created + k as i64, object);
                // Pretty-printed as Stripe sends it when that stays within 6 KB; the bigger
                // subscription and invoice events compact (4.4–4.7 KB), as the bench wants
                // 4–6 KB bodies.
                let pretty = serde_json::to_vec_pretty(&ev).expect("events serialize");
                let bytes = if pretty.len() <= 6000 {
                    pretty
                } else {
                    serde_json::to_vec(&ev).expect("events serialize")
                };
                let id_at = find(&bytes, placeholder.as_bytes()).expect("the id is in the body")
                    + "evt_".len()
                    + RUN_TAG_LEN;
                templates.push(Template {
                    bytes,
                    id_at,
                    event_type: kind,
                });
            }
        }
        BodyFactory {
            run_tag: run_tag.to_owned(),
            templates,
        }
    }

    /// The run tag in every id.
    pub fn run_tag(&self) -> &str {
        &self.run_tag
    }

    /// The event id of sequence number `seq`.
    pub fn event_id(&self, seq: u64) -> String {
        format!("evt_{}{seq:0width$}", self.run_tag, width = ID_DIGITS)
    }

    /// The sequence number of an event id of this run.
    pub fn sequence_of(&self, event_id: &str) -> Option<u64> {
        event_id
            .strip_prefix("evt_")?
            .strip_prefix(self.run_tag.as_str())?
            .parse()
            .ok()
    }

    /// The body of sequence number `seq`: a unique event id in one of the templates.
    pub fn body(&self, seq: u64) -> Vec<u8> {
        let template = &self.templates[(seq % self.templates.len() as u64) as usize];
        let mut bytes = template.bytes.clone();
        write_digits(&mut bytes[template.id_at..template.id_at + ID_DIGITS], seq);
        bytes
    }

    /// The event type of sequence number `seq`.
    pub fn event_type(&self, seq: u64) -> &'static str {
        self.templates[(seq % self.templates.len() as u64) as usize].event_type
    }

    /// Smallest and largest body, in bytes.
    pub fn size_range(&self) -> (usize, usize) {
        let sizes = self.templates.iter().map(|t| t.bytes.len());
        (sizes.clone().min().unwrap_or(0), sizes.max().unwrap_or(0))
    }
}

fn object_of(customer: &Customer, kind: &str, created: i64) -> Value {
    let period_end = created + 30 * 86_400;
    let organization = json!({ "organization_id": customer.organization_id });
    match kind {
        "checkout.session.completed" => customer.checkout_session("subscription"),
        "customer.subscription.created" | "customer.subscription.updated" => {
            let mut sub = customer.subscription("active", false, period_end);
            sub["metadata"] = organization;
            sub
        }
        _ => {
            let paid = kind == "invoice.paid";
            let mut invoice = customer.invoice(if paid { 2000 } else { 0 }, "subscription_cycle");
            invoice["parent"]["subscription_details"]["metadata"] = organization;
            invoice
        }
    }
}

/// The object of an event of a customer linked to no organization: no metadata naming one,
/// and a subscription update instead of a checkout (which would link the customer). The event
/// of a checkout slot becomes `customer.subscription.updated`.
fn foreign_object_of(customer: &Customer, kind: &str, created: i64) -> Value {
    match kind {
        "invoice.paid" | "invoice.payment_failed" => {
            let paid = kind == "invoice.paid";
            customer.invoice(if paid { 2000 } else { 0 }, "subscription_cycle")
        }
        _ => customer.subscription("active", false, created + 30 * 86_400),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn write_digits(slot: &mut [u8], mut value: u64) {
    for byte in slot.iter_mut().rev() {
        *byte = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// A worker's `billing_events_decided_total` read from its Prometheus endpoint, summed over
/// decisions (what the benchmarks follow instead of counting the inbox).
pub async fn worker_decisions(http: &reqwest::Client, metrics_url: &str) -> anyhow::Result<i64> {
    let text = http
        .get(metrics_url)
        .timeout(std::time::Duration::from_secs(2))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let name = shared::metrics::EVENTS_DECIDED;
    let total: f64 = text
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Ok(total as i64)
}

/// CPU time (user + system) of a process so far, in clock ticks (Linux `/proc/PID/stat`,
/// 100 ticks a second); 0 if it is gone.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// The ids of the processes whose command name (`/proc/PID/comm`) is `comm`.
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim_end() == comm)
        })
        .collect()
}

/// A run tag of [`RUN_TAG_LEN`] characters, unique enough per run.
pub fn new_run_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..RUN_TAG_LEN].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_stripe_events_of_four_to_six_kilobytes_with_unique_ids() {
        let factory = BodyFactory::new("abcd1234", 3, 1_800_000_000);
        let (min, max) = factory.size_range();
        assert!(min >= 4000 && max <= 6000, "{min}..{max}");
        for seq in [0, 1, 7, 29, 123_456_789] {
            let body: Value = serde_json::from_slice(&factory.body(seq)).expect("JSON");
            let id = body["id"].as_str().expect("id");
            assert_eq!(id, factory.event_id(seq));
            assert_eq!(factory.sequence_of(id), Some(seq));
            assert_eq!(body["type"], factory.event_type(seq));
        }
    }
}
