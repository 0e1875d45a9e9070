//! Metered usage settings.

use std::time::Duration;

use super::{ConfigError, Source, parse_age};

/// `USAGE_METERS`, `USAGE_REPORT_INTERVAL`, `USAGE_REPORT_LEASE`.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    /// `USAGE_METERS`: the Stripe meters' `event_name`s usage may be recorded for,
    /// comma-separated; empty (unset) turns the usage routes off (`503 not_configured`).
    pub meters: Vec<String>,
    /// `USAGE_REPORT_INTERVAL`: how often the worker reports pending usage (an age: `60s`, the
    /// default, `5m`…).
    pub report_interval: Duration,
    /// `USAGE_REPORT_LEASE`: how long one worker may take to send a report before another
    /// sends it again under the same identifier (an age; default `2m`).
    pub report_lease: Duration,
}

impl UsageConfig {
    /// Reads `USAGE_METERS`, `USAGE_REPORT_INTERVAL` and `USAGE_REPORT_LEASE`.
    pub fn load(source: &Source) -> Result<UsageConfig, ConfigError> {
        let meters = match source.get("USAGE_METERS") {
            None => Vec::new(),
            Some(_) => source.keys("USAGE_METERS")?,
        };
        if let Some(bad) = meters.iter().find(|m| m.len() > 100) {
            return Err(ConfigError::Invalid {
                name: "USAGE_METERS",
                reason: format!("{bad:?} is longer than Stripe's 100 characters"),
            });
        }
        let age = |name: &'static str, default: &str| {
            let text = source.get(name).unwrap_or_else(|| default.to_owned());
            parse_age(&text)
                .and_then(|age| age.to_std().ok())
                .filter(|age| !age.is_zero())
                .ok_or_else(|| ConfigError::Invalid {
                    name,
                    reason: "must be an age such as 60s or 5m".into(),
                })
        };
        Ok(UsageConfig {
            meters,
            report_interval: age("USAGE_REPORT_INTERVAL", "60s")?,
            report_lease: age("USAGE_REPORT_LEASE", "2m")?,
        })
    }
}
