//! The Stripe API client's settings and the reconciliation schedule.

use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

use super::{ConfigError, Source, parse_age};
use crate::billing_actions::CheckoutPrices;
use crate::stripe_api::ClientSettings;

/// How the product reaches Stripe's API.
#[derive(Debug, Clone)]
pub struct StripeApiConfig {
    /// `STRIPE_SECRET_KEY`; without it nothing calls Stripe.
    pub secret_key: Option<SecretString>,
    /// `STRIPE_API_BASE`, default Stripe's API; tests point it at a local fake.
    pub base: String,
    /// `STRIPE_API_RATE_LIMIT` (requests/s, default 20), `STRIPE_API_CONCURRENCY` (requests
    /// in flight, default 8), `STRIPE_API_MAX_RETRIES` (retries of a transient failure,
    /// default 6) and `STRIPE_API_RETRY_BASE_MS` (first backoff, default 500; doubles, with
    /// jitter, up to 30 s).
    pub settings: ClientSettings,
}

impl StripeApiConfig {
    /// Reads `STRIPE_SECRET_KEY`, `STRIPE_API_BASE` and the client settings.
    pub fn load(source: &Source) -> Result<StripeApiConfig, ConfigError> {
        let rate_limit = source.positive("STRIPE_API_RATE_LIMIT", 20)?;
        let rate_limit = u32::try_from(rate_limit)
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or_else(|| ConfigError::Invalid {
                name: "STRIPE_API_RATE_LIMIT",
                reason: "must be a number of requests a second, at most 4294967295".into(),
            })?;
        Ok(StripeApiConfig {
            secret_key: source.get("STRIPE_SECRET_KEY").map(SecretString::from),
            base: source.base_url("STRIPE_API_BASE", "https://api.stripe.com")?,
            settings: ClientSettings {
                rate_limit,
                concurrency: source.positive("STRIPE_API_CONCURRENCY", 8)? as usize,
                max_retries: source.parsed("STRIPE_API_MAX_RETRIES", 6)?,
                retry_base: source.millis("STRIPE_API_RETRY_BASE_MS", 500)?,
                ..ClientSettings::default()
            },
        })
    }
}

/// Ingest's billing-action routes (Checkout and Customer Portal sessions).
#[derive(Debug, Clone)]
pub struct BillingActionsConfig {
    /// The Stripe API; without `STRIPE_SECRET_KEY` the routes answer `503 not_configured`.
    pub stripe: StripeApiConfig,
    /// What Checkout sells: the first key of `STRIPE_BASIC_PRICE_KEY` and of
    /// `STRIPE_PREMIUM_PRICE_KEY` (a price id or lookup key; required with the key), and
    /// `STRIPE_LIFETIME_PRICE_KEY` (optional).
    pub prices: Option<CheckoutPrices>,
    /// `BILLING_ACTIONS_CONCURRENCY`, default 8: actions in flight; beyond, `503`.
    pub concurrency: usize,
    /// `BILLING_ACTIONS_TIMEOUT_MS`, default 15000: an action's deadline, Stripe's answers
    /// and retries included; beyond, `503`.
    pub timeout: Duration,
}

impl BillingActionsConfig {
    /// Reads the Stripe API settings, the prices, `BILLING_ACTIONS_CONCURRENCY` and
    /// `BILLING_ACTIONS_TIMEOUT_MS`.
    pub fn load(source: &Source) -> Result<BillingActionsConfig, ConfigError> {
        let stripe = StripeApiConfig::load(source)?;
        let sold = |name: &'static str| -> Result<String, ConfigError> {
            let first = source.keys(name)?.remove(0);
            if first.starts_with("prod_") {
                return Err(ConfigError::Invalid {
                    name,
                    reason: "its first key is the price Checkout sells: a price id or lookup                              key, not a product"
                        .into(),
                });
            }
            Ok(first)
        };
        let prices = match stripe.secret_key {
            Some(_) => Some(CheckoutPrices {
                basic: sold("STRIPE_BASIC_PRICE_KEY")?,
                premium: sold("STRIPE_PREMIUM_PRICE_KEY")?,
                lifetime: source
                    .get("STRIPE_LIFETIME_PRICE_KEY")
                    .map(|k| k.trim().to_owned()),
            }),
            None => None,
        };
        Ok(BillingActionsConfig {
            stripe,
            prices,
            concurrency: source.positive("BILLING_ACTIONS_CONCURRENCY", 8)? as usize,
            timeout: source.millis("BILLING_ACTIONS_TIMEOUT_MS", 15_000)?,
        })
    }
}

/// When the nightly backfill and reconciliation run.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// `RECONCILE_SCHEDULE`: a cron expression (seconds first: `0 0 3 * * *`, the default, is
    /// 03:00 UTC daily); `None` when set to `off`.
    pub schedule: Option<cron::Schedule>,
    /// `RECONCILE_BACKFILL_WINDOW`: how far back the scheduled backfill lists events (an
    /// age: `3d`, the default, `36h`…; at most Stripe's 30 days).
    pub backfill_window: Duration,
}

/// Stripe keeps events listable this long.
pub const EVENT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

impl ReconcileConfig {
    /// Reads `RECONCILE_SCHEDULE` and `RECONCILE_BACKFILL_WINDOW`.
    pub fn load(source: &Source) -> Result<ReconcileConfig, ConfigError> {
        let schedule = match source.get("RECONCILE_SCHEDULE") {
            Some(text) if text.trim().eq_ignore_ascii_case("off") => None,
            text => {
                let text = text.unwrap_or_else(|| "0 0 3 * * *".to_owned());
                Some(
                    cron::Schedule::from_str(text.trim()).map_err(|e| ConfigError::Invalid {
                        name: "RECONCILE_SCHEDULE",
                        reason: format!(
                            "not a cron expression (seconds first, e.g. \"0 0 3 * * *\"), or \
                             \"off\": {e}"
                        ),
                    })?,
                )
            }
        };
        let window = source
            .get("RECONCILE_BACKFILL_WINDOW")
            .unwrap_or_else(|| "3d".to_owned());
        let backfill_window = parse_age(&window)
            .and_then(|age| age.to_std().ok())
            .filter(|age| *age <= EVENT_RETENTION && !age.is_zero())
            .ok_or_else(|| ConfigError::Invalid {
                name: "RECONCILE_BACKFILL_WINDOW",
                reason: "must be an age such as 3d or 36h, at most 30d (Stripe keeps events \
                         30 days)"
                    .into(),
            })?;
        Ok(ReconcileConfig {
            schedule,
            backfill_window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_a_cron_expression_or_off_and_the_window_an_age() {
        let load = |pairs: &[(&str, &str)]| ReconcileConfig::load(&Source::from_pairs(pairs));
        let default = load(&[]).expect("defaults");
        assert!(default.schedule.is_some());
        assert_eq!(default.backfill_window, Duration::from_secs(3 * 86_400));
        assert!(
            load(&[("RECONCILE_SCHEDULE", "off")])
                .expect("off")
                .schedule
                .is_none()
        );
        let error = load(&[("RECONCILE_SCHEDULE", "every night")]).expect_err("bad cron");
        assert!(
            error
                .to_string()
                .starts_with("RECONCILE_SCHEDULE is invalid"),
            "{error}"
        );
        let error = load(&[("RECONCILE_BACKFILL_WINDOW", "45d")]).expect_err("too long");
        assert!(
            error
                .to_string()
                .starts_with("RECONCILE_BACKFILL_WINDOW is invalid"),
            "{error}"
        );
        let error = StripeApiConfig::load(&Source::from_pairs(&[("STRIPE_API_RATE_LIMIT", "0")]))
            .expect_err("zero");
        assert!(
            error
                .to_string()
                .starts_with("STRIPE_API_RATE_LIMIT is invalid"),
            "{error}"
        );
    }
}
