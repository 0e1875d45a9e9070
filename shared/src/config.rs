//! Configuration: the only module that reads the environment. Each binary gets one typed
//! config, validated once at start; a missing or malformed variable is an error naming it, and
//! `main` exits non-zero with that message. Secrets are `SecretString`, so `Debug` prints
//! `[REDACTED]` instead of them.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

mod stripe;
mod usage;

pub use self::stripe::{BillingActionsConfig, EVENT_RETENTION, ReconcileConfig, StripeApiConfig};
pub use self::usage::UsageConfig;
use crate::billing::payment::RefundPolicy;
use crate::email_address;
use crate::retry::Backoff;
use crate::stripe::PlanMapping;

/// A variable that is missing or cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set (or empty).
    #[error("{0} is required but not set")]
    Missing(&'static str),
    /// A variable is set to something unusable.
    #[error("{name} is invalid: {reason}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// What is wrong with it (never its value, which may be a secret).
        reason: String,
    },
}

/// Looks a variable up by name.
type Lookup = Box<dyn Fn(&str) -> Option<String>>;

/// Where variables come from: the process environment, or a map in tests.
pub struct Source(Lookup);

impl Source {
    /// The process environment.
    pub fn env() -> Source {
        Source(Box::new(|name| std::env::var(name).ok()))
    }

    /// Fixed pairs, for tests.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Source {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Source(Box::new(move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }))
    }

    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.get(name).ok_or(ConfigError::Missing(name))
    }

    fn secret(&self, name: &'static str) -> Result<SecretString, ConfigError> {
        self.required(name).map(SecretString::from)
    }

    fn parsed<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e: T::Err| ConfigError::Invalid {
                    name,
                    reason: e.to_string(),
                }),
        }
    }

    fn positive(&self, name: &'static str, default: u64) -> Result<u64, ConfigError> {
        match self.parsed(name, default)? {
            0 => Err(ConfigError::Invalid {
                name,
                reason: "must be greater than 0".into(),
            }),
            n => Ok(n),
        }
    }

    /// A required comma-separated list of Stripe keys (ids or lookup keys), none empty.
    fn keys(&self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        let raw = self.required(name)?;
        let keys: Vec<String> = raw.split(',').map(|k| k.trim().to_owned()).collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(ConfigError::Invalid {
                name,
                reason: "an empty item in the comma-separated list".into(),
            });
        }
        Ok(keys)
    }

    fn plans(&self) -> Result<PlanMapping, ConfigError> {
        PlanMapping::new([
            ("enterprise", self.keys("STRIPE_ENTERPRISE_PRODUCT_KEY")?),
            ("premium", self.keys("STRIPE_PREMIUM_PRICE_KEY")?),
            ("basic", self.keys("STRIPE_BASIC_PRICE_KEY")?),
        ])
        .map_err(|key| ConfigError::Invalid {
            name: "STRIPE_BASIC_PRICE_KEY",
            reason: format!(
                "{key:?} names two plans (STRIPE_BASIC_PRICE_KEY, STRIPE_PREMIUM_PRICE_KEY and \
                 STRIPE_ENTERPRISE_PRODUCT_KEY must not share a key)"
            ),
        })
    }

    fn millis(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.positive(name, default).map(Duration::from_millis)
    }

    /// A bare address (`name@example.com`).
    fn email_address(&self, name: &'static str) -> Result<String, ConfigError> {
        let address = self.required(name)?.trim().to_owned();
        email_address::check(&address).map_err(|e| ConfigError::Invalid {
            name,
            reason: e.to_string(),
        })?;
        Ok(address)
    }

    /// A sender: `name@example.com` or `Display Name <name@example.com>`.
    fn mailbox(&self, name: &'static str) -> Result<String, ConfigError> {
        let mailbox = self.required(name)?.trim().to_owned();
        email_address::check_mailbox(&mailbox).map_err(|e| ConfigError::Invalid {
            name,
            reason: format!("{e} (or Display Name <name@example.com>)"),
        })?;
        Ok(mailbox)
    }

    /// An `http://` or `https://` base URL without a trailing slash.
    fn base_url(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let url = self.get(name).unwrap_or_else(|| default.to_owned());
        let url = url.trim().trim_end_matches('/');
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        match rest {
            Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
                Ok(url.to_owned())
            }
            _ => Err(ConfigError::Invalid {
                name,
                reason: "expected an http:// or https:// URL".into(),
            }),
        }
    }

    fn backoff(&self) -> Result<Backoff, ConfigError> {
        self.backoff_named(("RETRY_BASE_MS", 1000), ("RETRY_MAX_MS", 600_000))
    }

    /// A backoff from a base and a cap variable (milliseconds), the cap not below the base.
    fn backoff_named(
        &self,
        (base_name, base_default): (&'static str, u64),
        (max_name, max_default): (&'static str, u64),
    ) -> Result<Backoff, ConfigError> {
        let base = self.millis(base_name, base_default)?;
        let max = self.millis(max_name, max_default)?;
        if max < base {
            return Err(ConfigError::Invalid {
                name: max_name,
                reason: format!("must not be less than {base_name}"),
            });
        }
        Ok(Backoff { base, max })
    }

    fn database_url(&self) -> Result<SecretString, ConfigError> {
        let url = self.required("DATABASE_URL")?;
        let invalid = |reason: String| ConfigError::Invalid {
            name: "DATABASE_URL",
            reason,
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "expected a postgres:// or postgresql:// URL".into(),
            ));
        }
        sqlx::postgres::PgConnectOptions::from_str(&url).map_err(|e| invalid(e.to_string()))?;
        Ok(SecretString::from(url))
    }

    fn redis_url(&self) -> Result<String, ConfigError> {
        let url = self.required("REDIS_URL")?;
        redis::Client::open(url.as_str()).map_err(|e| ConfigError::Invalid {
            name: "REDIS_URL",
            reason: e.to_string(),
        })?;
        Ok(url)
    }

    fn queue_prefix(&self) -> Result<String, ConfigError> {
        let prefix = self
            .get("QUEUE_PREFIX")
            .unwrap_or_else(|| "billing".to_owned());
        if prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:.".contains(c))
        {
            Ok(prefix)
        } else {
            Err(ConfigError::Invalid {
                name: "QUEUE_PREFIX",
                reason: "use letters, digits and - _ : . only".into(),
            })
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (local runs).
    Text,
    /// One JSON object per line (deployed).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected text or json, got {other:?}")),
        }
    }
}

/// Only `DATABASE_URL`: for `worker migrate` and the operator commands.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Postgres connection URL (secret: it may hold a password).
    pub url: SecretString,
    /// Pool size (`DATABASE_MAX_CONNECTIONS`).
    pub max_connections: u32,
}

impl DatabaseConfig {
    /// Reads `DATABASE_URL` and `DATABASE_MAX_CONNECTIONS` (default `default_pool`).
    pub fn load(source: &Source, default_pool: u32) -> Result<DatabaseConfig, ConfigError> {
        Ok(DatabaseConfig {
            url: source.database_url()?,
            max_connections: source.positive("DATABASE_MAX_CONNECTIONS", default_pool.into())?
                as u32,
        })
    }
}

/// Redis and the queue names.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Redis connection URL.
    pub redis_url: String,
    /// Prefix of every queue name (`QUEUE_PREFIX`, default `billing`), so several
    /// deployments (or tests) can share one Redis.
    pub prefix: String,
}

impl QueueConfig {
    /// Reads `REDIS_URL` and `QUEUE_PREFIX`.
    pub fn load(source: &Source) -> Result<QueueConfig, ConfigError> {
        Ok(QueueConfig {
            redis_url: source.redis_url()?,
            prefix: source.queue_prefix()?,
        })
    }
}

/// Everything `ingest` needs.
#[derive(Debug)]
pub struct IngestConfig {
    /// Postgres.
    pub database: DatabaseConfig,
    /// Redis queue.
    pub queue: QueueConfig,
    /// `STRIPE_WEBHOOK_SECRET`: one or more endpoint secrets, comma-separated.
    pub webhook_secrets: Vec<SecretString>,
    /// `INTERNAL_API_TOKEN`: bearer token of the product's backend.
    pub internal_api_token: SecretString,
    /// `INGEST_ADDR`, default `0.0.0.0:8080`.
    pub listen_addr: SocketAddr,
    /// `METRICS_ADDR`, default `0.0.0.0:9100`.
    pub metrics_addr: SocketAddr,
    /// `WEBHOOK_BODY_LIMIT_BYTES`, default 1 MiB.
    pub body_limit_bytes: usize,
    /// Limits that bound ingest's resources under abuse.
    pub limits: IngestLimits,
    /// The billing-action routes.
    pub billing_actions: BillingActionsConfig,
    /// The usage routes (`USAGE_METERS`).
    pub usage: UsageConfig,
    /// `LOG_FORMAT`, `text` (default) or `json`.
    pub log_format: LogFormat,
}

impl IngestConfig {
    /// Reads and validates every ingest variable.
    pub fn load(source: &Source) -> Result<IngestConfig, ConfigError> {
        let secrets: Vec<SecretString> = source
            .required("STRIPE_WEBHOOK_SECRET")?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| SecretString::from(s.to_owned()))
            .collect();
        if secrets.is_empty() {
            return Err(ConfigError::Missing("STRIPE_WEBHOOK_SECRET"));
        }
        let body_limit_bytes = source.positive("WEBHOOK_BODY_LIMIT_BYTES", 1024 * 1024)? as usize;
        Ok(IngestConfig {
            database: DatabaseConfig::load(source, 16)?,
            queue: QueueConfig::load(source)?,
            webhook_secrets: secrets,
            internal_api_token: source.secret("INTERNAL_API_TOKEN")?,
            listen_addr: source.parsed("INGEST_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            metrics_addr: source.parsed("METRICS_ADDR", SocketAddr::from(([0, 0, 0, 0], 9100)))?,
            body_limit_bytes,
            limits: IngestLimits::load(source, body_limit_bytes)?,
            billing_actions: BillingActionsConfig::load(source)?,
            usage: UsageConfig::load(source)?,
            log_format: source.parsed("LOG_FORMAT", LogFormat::Text)?,
        })
    }
}

/// What bounds ingest's connections, time and memory under hostile traffic.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    /// `INGEST_HEADER_TIMEOUT_MS`, default 10000: time to receive a request's headers, and
    /// how long an idle kept-alive connection waits for its next request.
    pub header_timeout: Duration,
    /// `INGEST_BODY_TIMEOUT_MS`, default 10000: time to receive a request's whole body.
    pub body_timeout: Duration,
    /// `INGEST_BODY_BUDGET_BYTES`, default 16 MiB: request body bytes held at once, at least
    /// twice `WEBHOOK_BODY_LIMIT_BYTES`.
    pub body_budget_bytes: usize,
    /// `INGEST_MAX_CONNECTIONS`, default 1024: open connections at once.
    pub max_connections: usize,
}

impl IngestLimits {
    fn load(source: &Source, body_limit_bytes: usize) -> Result<IngestLimits, ConfigError> {
        let body_budget_bytes =
            source.positive("INGEST_BODY_BUDGET_BYTES", 16 * 1024 * 1024)? as usize;
        if body_budget_bytes < body_limit_bytes.saturating_mul(2) {
            return Err(ConfigError::Invalid {
                name: "INGEST_BODY_BUDGET_BYTES",
                reason: "must be at least twice WEBHOOK_BODY_LIMIT_BYTES".into(),
            });
        }
        Ok(IngestLimits {
            header_timeout: source.millis("INGEST_HEADER_TIMEOUT_MS", 10_000)?,
            body_timeout: source.millis("INGEST_BODY_TIMEOUT_MS", 10_000)?,
            body_budget_bytes,
            max_connections: source.positive("INGEST_MAX_CONNECTIONS", 1024)? as usize,
        })
    }
}

/// Everything `worker run` needs.
#[derive(Debug)]
pub struct WorkerConfig {
    /// Postgres.
    pub database: DatabaseConfig,
    /// Redis queue.
    pub queue: QueueConfig,
    /// `STRIPE_BASIC_PRICE_KEY`, `STRIPE_PREMIUM_PRICE_KEY`, `STRIPE_ENTERPRISE_PRODUCT_KEY`:
    /// the prices, lookup keys or products of each plan, comma-separated.
    pub plans: PlanMapping,
    /// The Stripe API (`STRIPE_SECRET_KEY` enables refetching ties, reconciliation and
    /// backfill).
    pub stripe: StripeApiConfig,
    /// The nightly backfill and reconciliation.
    pub reconcile: ReconcileConfig,
    /// The usage reporter (`USAGE_METERS`, `USAGE_REPORT_INTERVAL`).
    pub usage: UsageConfig,
    /// `METRICS_ADDR`, default `0.0.0.0:9101`.
    pub metrics_addr: SocketAddr,
    /// `WORKER_CONCURRENCY`: event jobs in flight per process, default 1024. They wait for
    /// group apply; it is not a number of connections. It bounds how many events can wait for
    /// one transaction, so it stays well above `APPLY_BATCH_SIZE` × `APPLY_TRANSACTIONS`.
    pub concurrency: usize,
    /// `APPLY_BATCH_SIZE`: most events applied in one transaction, default 256 (1 applies
    /// each event alone). Larger batches let the worker keep up with ingest in steady state
    /// (BENCHMARKS.md, issue 18: 32 left a growing backlog).
    pub apply_batch_size: usize,
    /// `APPLY_TRANSACTIONS`: apply transactions in flight per process, default 2.
    pub apply_transactions: usize,
    /// `EMAIL_CONCURRENCY`: email jobs in flight per process, default 4.
    pub email_concurrency: usize,
    /// `QUEUE_POLL_INTERVAL_MS`: how often an idle worker looks for jobs, default 250.
    pub poll_interval: Duration,
    /// `MAX_ATTEMPTS`: failed attempts before an event becomes a dead letter, default 8.
    pub max_attempts: i32,
    /// `RETRY_BASE_MS` (default 1000) and `RETRY_MAX_MS` (default 600000): the backoff
    /// between failed attempts.
    pub retry: Backoff,
    /// `DEFERRAL_RECHECK_BASE_MS` (default 60000) and `DEFERRAL_RECHECK_MAX_MS` (default
    /// 7200000): the sparse schedule on which an event waiting for its organization is
    /// checked again (1, 2, 4 … minutes, then every 2 hours), within the deferral window. A
    /// link that resolves it releases it at once, whatever this schedule says.
    pub deferral_recheck: Backoff,
    /// `DEFERRAL_WINDOW_SECS`: how long an event may wait for its organization before it
    /// becomes a dead letter, default 259200 (3 days, Stripe's own retry horizon).
    pub deferral_window: Duration,
    /// `SWEEP_INTERVAL_MS`: how often the sweeper looks for due rows, default 5000.
    pub sweep_interval: Duration,
    /// `SWEEP_GRACE_MS`: how long a pending row's job may be missing before the sweeper
    /// enqueues it again, default 120000.
    pub sweep_grace: Duration,
    /// Sending emails (Resend).
    pub email: EmailConfig,
    /// `LOG_FORMAT`, `text` (default) or `json`.
    pub log_format: LogFormat,
    /// `REDIS_ALLOW_EVICTION` (`true`/`false`, default false): start even though Redis'
    /// `maxmemory-policy` may delete keys (see `queue::EvictionPolicy`).
    pub redis_allow_eviction: bool,
    /// `STRIPE_MODE` (`live` or `test`; unset accepts both): events of the other mode are
    /// stored and `ignored`, never applied.
    pub stripe_mode: Option<StripeMode>,
    /// `REFUND_REVOKES_ACCESS` (`true` or `false`, default `true`): whether a full refund or a
    /// lost dispute of a one-time purchase revokes the lifetime access it granted.
    pub refunds: RefundPolicy,
}

/// Sending emails through Resend.
#[derive(Debug, Clone)]
pub struct EmailConfig {
    /// `RESEND_API_KEY`.
    pub resend_api_key: SecretString,
    /// `RESEND_BASE_URL`, default Resend's API; tests point it at a local fake.
    pub resend_base_url: String,
    /// `EMAIL_FROM`: our sender, `name@example.com` or `Display Name <name@example.com>`
    /// (a domain verified in Resend).
    pub from: String,
    /// `ENTERPRISE_SALES_EMAIL`: where Enterprise plan requests go.
    pub enterprise_sales: String,
}

impl EmailConfig {
    /// Reads `RESEND_API_KEY`, `RESEND_BASE_URL`, `EMAIL_FROM`, `ENTERPRISE_SALES_EMAIL`.
    pub fn load(source: &Source) -> Result<EmailConfig, ConfigError> {
        Ok(EmailConfig {
            resend_api_key: source.secret("RESEND_API_KEY")?,
            resend_base_url: source.base_url("RESEND_BASE_URL", "https://api.resend.com")?,
            from: source.mailbox("EMAIL_FROM")?,
            enterprise_sales: source.email_address("ENTERPRISE_SALES_EMAIL")?,
        })
    }
}

impl WorkerConfig {
    /// Reads and validates every worker variable.
    pub fn load(source: &Source) -> Result<WorkerConfig, ConfigError> {
        let concurrency = source.positive("WORKER_CONCURRENCY", 1024)? as usize;
        let apply_transactions = source.positive("APPLY_TRANSACTIONS", 2)? as usize;
        let email_concurrency = source.positive("EMAIL_CONCURRENCY", 4)? as usize;
        // Each apply transaction and email job holds a connection; the rest serve the sweeper,
        // the fallback of a failed batch and the operator commands.
        let pool = apply_transactions + email_concurrency + 4;
        Ok(WorkerConfig {
            database: DatabaseConfig::load(source, pool as u32)?,
            queue: QueueConfig::load(source)?,
            plans: source.plans()?,
            stripe: StripeApiConfig::load(source)?,
            reconcile: ReconcileConfig::load(source)?,
            usage: UsageConfig::load(source)?,
            metrics_addr: source.parsed("METRICS_ADDR", SocketAddr::from(([0, 0, 0, 0], 9101)))?,
            concurrency,
            apply_batch_size: source.positive("APPLY_BATCH_SIZE", 256)? as usize,
            apply_transactions,
            email_concurrency,
            poll_interval: source.millis("QUEUE_POLL_INTERVAL_MS", 250)?,
            max_attempts: source.positive("MAX_ATTEMPTS", 8)?.min(i32::MAX as u64) as i32,
            retry: source.backoff()?,
            deferral_recheck: source.backoff_named(
                ("DEFERRAL_RECHECK_BASE_MS", 60_000),
                ("DEFERRAL_RECHECK_MAX_MS", 7_200_000),
            )?,
            deferral_window: Duration::from_secs(
                source.positive("DEFERRAL_WINDOW_SECS", 3 * 24 * 3600)?,
            ),
            sweep_interval: source.millis("SWEEP_INTERVAL_MS", 5000)?,
            sweep_grace: source.millis("SWEEP_GRACE_MS", 120_000)?,
            email: EmailConfig::load(source)?,
            log_format: source.parsed("LOG_FORMAT", LogFormat::Text)?,
            redis_allow_eviction: source.parsed("REDIS_ALLOW_EVICTION", false)?,
            refunds: RefundPolicy {
                refund_revokes_access: source.parsed("REFUND_REVOKES_ACCESS", true)?,
            },
            stripe_mode: match source.get("STRIPE_MODE") {
                None => None,
                Some(mode) => Some(mode.trim().parse().map_err(|reason| ConfigError::Invalid {
                    name: "STRIPE_MODE",
                    reason,
                })?),
            },
        })
    }
}

/// Which of Stripe's modes a deployment serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeMode {
    /// Live mode (`livemode: true`).
    Live,
    /// Test mode (`livemode: false`).
    Test,
}

impl StripeMode {
    /// The mode of an event's `livemode`.
    pub fn of(livemode: bool) -> StripeMode {
        if livemode {
            StripeMode::Live
        } else {
            StripeMode::Test
        }
    }

    /// `live` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            StripeMode::Live => "live",
            StripeMode::Test => "test",
        }
    }
}

impl FromStr for StripeMode {
    type Err = String;
    fn from_str(value: &str) -> Result<StripeMode, String> {
        match value {
            "live" => Ok(StripeMode::Live),
            "test" => Ok(StripeMode::Test),
            _ => Err("must be live or test (or unset, to accept both)".to_owned()),
        }
    }
}

/// An age such as `90s`, `30m`, `6h` or `7d`; `None` for anything else (or a negative one).
pub fn parse_age(value: &str) -> Option<chrono::TimeDelta> {
    let value = value.trim();
    let (number, unit) = value.split_at(value.len().checked_sub(1)?);
    let number: i64 = number.parse().ok()?;
    match unit {
        "s" => chrono::TimeDelta::try_seconds(number),
        "m" => chrono::TimeDelta::try_minutes(number),
        "h" => chrono::TimeDelta::try_hours(number),
        "d" => chrono::TimeDelta::try_days(number),
        _ => None,
    }
    .filter(|age| *age >= chrono::TimeDelta::zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INGEST: &[(&str, &str)] = &[
        (
            "DATABASE_URL",
            "postgres://postgres:pg-password@127.0.0.1:5432/db",
        ),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_old, whsec_new"),
        ("INTERNAL_API_TOKEN", "token-123"),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> Source {
        let mut pairs: Vec<(&str, &str)> = INGEST
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .copied()
            .collect();
        pairs.extend_from_slice(extra);
        Source::from_pairs(&pairs)
    }

    #[test]
    fn ingest_config_reads_defaults_and_secret_list() {
        let config = IngestConfig::load(&with(&[])).expect("valid config");
        assert_eq!(config.webhook_secrets.len(), 2);
        assert_eq!(config.listen_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(config.body_limit_bytes, 1024 * 1024);
        assert_eq!(config.queue.prefix, "billing");
        assert_eq!(config.limits.body_budget_bytes, 16 * 1024 * 1024);
        assert_eq!(config.limits.max_connections, 1024);
        assert_eq!(config.limits.header_timeout, Duration::from_secs(10));
        let small = IngestConfig::load(&with(&[("INGEST_BODY_BUDGET_BYTES", "1048577")]));
        assert!(
            small
                .expect_err("must fail")
                .to_string()
                .starts_with("INGEST_BODY_BUDGET_BYTES is invalid")
        );
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let config = IngestConfig::load(&with(&[])).expect("valid config");
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("whsec_old") && !debug.contains("token-123"),
            "{debug}"
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let missing = IngestConfig::load(&with(&[("INTERNAL_API_TOKEN", " ")]));
        assert_eq!(
            missing.expect_err("must fail").to_string(),
            "INTERNAL_API_TOKEN is required but not set"
        );
        let bad_addr = IngestConfig::load(&with(&[("INGEST_ADDR", "localhost")]));
        assert!(
            bad_addr
                .expect_err("must fail")
                .to_string()
                .starts_with("INGEST_ADDR is invalid")
        );
        let bad_db = IngestConfig::load(&with(&[("DATABASE_URL", "mysql://x")]));
        assert!(
            bad_db
                .expect_err("must fail")
                .to_string()
                .starts_with("DATABASE_URL is invalid")
        );
        let zero = IngestConfig::load(&with(&[("WEBHOOK_BODY_LIMIT_BYTES", "0")]));
        assert!(
            zero.expect_err("must fail")
                .to_string()
                .contains("greater than 0")
        );
        let commas = IngestConfig::load(&with(&[("STRIPE_WEBHOOK_SECRET", ",")]));
        assert_eq!(
            commas.expect_err("must fail").to_string(),
            "STRIPE_WEBHOOK_SECRET is required but not set"
        );
    }

    const WORKER: &[(&str, &str)] = &[
        (
            "DATABASE_URL",
            "postgres://postgres:pg-password@127.0.0.1:5432/db",
        ),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("STRIPE_BASIC_PRICE_KEY", "price_basic"),
        ("STRIPE_PREMIUM_PRICE_KEY", "price_premium"),
        ("STRIPE_ENTERPRISE_PRODUCT_KEY", "prod_enterprise"),
        ("RESEND_API_KEY", "re_secret_key"),
        ("EMAIL_FROM", "Billing <billing@example.com>"),
        ("ENTERPRISE_SALES_EMAIL", "sales@example.com"),
    ];

    fn worker_with(extra: &[(&'static str, &'static str)]) -> Result<WorkerConfig, ConfigError> {
        let mut pairs: Vec<(&str, &str)> = WORKER
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .copied()
            .collect();
        pairs.extend_from_slice(extra);
        WorkerConfig::load(&Source::from_pairs(&pairs))
    }

    #[test]
    fn worker_config_reads_email_settings_and_retry_defaults() {
        let config = worker_with(&[]).expect("valid config");
        assert_eq!(config.email.resend_base_url, "https://api.resend.com");
        assert_eq!(config.email.from, "Billing <billing@example.com>");
        assert_eq!(config.email.enterprise_sales, "sales@example.com");
        assert_eq!(config.retry, Backoff::default());
        assert!(!format!("{config:?}").contains("re_secret_key"));

        let config = worker_with(&[
            ("RESEND_BASE_URL", "http://127.0.0.1:4010/"),
            ("RETRY_BASE_MS", "50"),
            ("RETRY_MAX_MS", "200"),
        ])
        .expect("valid config");
        assert_eq!(config.email.resend_base_url, "http://127.0.0.1:4010");
        assert_eq!(
            config.retry,
            Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_millis(200)
            }
        );
    }

    #[test]
    fn worker_email_settings_are_required_and_checked_naming_the_variable() {
        for name in ["RESEND_API_KEY", "EMAIL_FROM", "ENTERPRISE_SALES_EMAIL"] {
            let error = worker_with(&[(name, "")]).expect_err("must fail");
            assert_eq!(error.to_string(), format!("{name} is required but not set"));
        }
        for (name, value) in [
            ("EMAIL_FROM", "billing"),
            ("EMAIL_FROM", "Billing <billing>"),
            ("ENTERPRISE_SALES_EMAIL", "Sales <sales@example.com>"),
            ("ENTERPRISE_SALES_EMAIL", "sales@@example.com"),
            ("RESEND_BASE_URL", "api.resend.com"),
            ("RETRY_BASE_MS", "0"),
            ("RETRY_MAX_MS", "soon"),
        ] {
            let error = worker_with(&[(name, value)]).expect_err("must fail");
            assert!(
                error.to_string().starts_with(&format!("{name} is invalid")),
                "{name}={value}: {error}"
            );
        }
        let error = worker_with(&[("RETRY_BASE_MS", "5000"), ("RETRY_MAX_MS", "1000")])
            .expect_err("must fail");
        assert_eq!(
            error.to_string(),
            "RETRY_MAX_MS is invalid: must not be less than RETRY_BASE_MS"
        );
    }

    #[test]
    fn plans_take_comma_separated_keys_and_refuse_empty_or_shared_ones() {
        let config = worker_with(&[("STRIPE_BASIC_PRICE_KEY", "price_m, price_y,prod_basic")])
            .expect("valid worker config");
        let price = |id: &str, product: &str| shared_price(id, product);
        assert_eq!(
            config.plans.plan_for_price(&price("price_y", "prod_x")),
            Some("basic")
        );
        assert_eq!(
            config.plans.plan_for_price(&price("price_z", "prod_basic")),
            Some("basic")
        );
        assert_eq!(
            config.plans.plan_for_price(&price("price_z", "prod_x")),
            None
        );
        let error =
            worker_with(&[("STRIPE_BASIC_PRICE_KEY", "price_m,,price_y")]).expect_err("must fail");
        assert_eq!(
            error.to_string(),
            "STRIPE_BASIC_PRICE_KEY is invalid: an empty item in the comma-separated list"
        );
        let error =
            worker_with(&[("STRIPE_BASIC_PRICE_KEY", "price_premium")]).expect_err("must fail");
        assert!(error.to_string().contains("names two plans"), "{error}");
    }

    fn shared_price(id: &str, product: &str) -> crate::stripe::Price {
        serde_json::from_value(serde_json::json!({ "id": id, "product": product })).expect("price")
    }

    #[test]
    fn worker_recovery_settings_have_defaults_and_are_checked() {
        let config = worker_with(&[]).expect("valid worker config");
        assert_eq!(config.retry, Backoff::default());
        assert_eq!(config.deferral_window, Duration::from_secs(259_200));
        assert_eq!(
            config.deferral_recheck,
            Backoff {
                base: Duration::from_secs(60),
                max: Duration::from_secs(7200),
            }
        );
        let error = worker_with(&[("DEFERRAL_RECHECK_MAX_MS", "1000")]).expect_err("must fail");
        assert_eq!(
            error.to_string(),
            "DEFERRAL_RECHECK_MAX_MS is invalid: must not be less than DEFERRAL_RECHECK_BASE_MS"
        );
        assert_eq!(config.sweep_interval, Duration::from_secs(5));
        assert_eq!(config.sweep_grace, Duration::from_secs(120));
        let error = worker_with(&[("SWEEP_GRACE_MS", "soon")]).expect_err("must fail");
        assert!(
            error.to_string().starts_with("SWEEP_GRACE_MS is invalid"),
            "{error}"
        );
        let error = worker_with(&[("DEFERRAL_WINDOW_SECS", "0")]).expect_err("must fail");
        assert_eq!(
            error.to_string(),
            "DEFERRAL_WINDOW_SECS is invalid: must be greater than 0"
        );
    }
}
