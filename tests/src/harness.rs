//! The test harness: a Postgres database and a Redis queue prefix of one's own per test
//! (dropped afterwards), the real `ingest` and `worker` binaries as child processes with their
//! logs in `target/e2e-logs/`, and signed deliveries.

pub use crate::fake_resend::{FakeResend, ResendReply, ResendRequest};
pub use crate::fake_stripe::FakeStripe;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;

/// Postgres of this machine (trust auth); `TEST_DATABASE_URL` overrides.
pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Redis of this machine; `TEST_REDIS_URL` overrides.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The webhook secret the tests configure.
pub const WEBHOOK_SECRET: &str = "whsec_test_primary";
/// The internal API token the tests configure.
pub const INTERNAL_TOKEN: &str = "test-internal-token";
/// The sender the tests configure.
pub const EMAIL_FROM: &str = "Billing <billing@example.com>";
/// Where the tests' Enterprise requests go.
pub const SALES_EMAIL: &str = "sales@example.com";
/// Resend API key the tests configure (the fake checks it).
pub const RESEND_API_KEY: &str = "re_test_key";
/// A loopback address nothing listens on: the default `RESEND_BASE_URL` of tests that do not
/// start a [`FakeResend`], so no test can ever reach the real Resend.
pub const NO_RESEND: &str = "http://127.0.0.1:9";

/// A unique, short tag for ids, database and queue names.
pub fn unique_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A database of one's own, migrated; dropped when this is dropped.
pub struct TestDb {
    /// A pool on it.
    pub pool: PgPool,
    /// Its URL, for child processes.
    pub url: String,
    name: String,
}

impl TestDb {
    /// Creates and migrates a fresh database.
    pub async fn new() -> TestDb {
        let name = format!("billing_test_{}", unique_tag());
        let admin = PgPool::connect(&admin_database_url())
            .await
            .expect("connect to the admin database");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let url = database_url(&name);
        let pool = PgPool::connect(&url)
            .await
            .expect("connect to the test database");
        shared::db::MIGRATOR
            .run(&pool)
            .await
            .expect("migrate the test database");
        TestDb { pool, url, name }
    }
}

fn database_url(name: &str) -> String {
    let admin = admin_database_url();
    let base = admin
        .rsplit_once('/')
        .map(|(base, _)| base)
        .unwrap_or(&admin);
    format!("{base}/{name}")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which is blocked here: do the cleanup on a thread
        // and runtime of its own, and let FORCE close this pool's connections.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(admin) = PgPool::connect(&admin_database_url()).await {
                        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&admin).await;
                    }
                });
            }
        })
        .join();
    }
}

/// A Redis queue prefix of one's own; its keys are deleted when this is dropped.
pub struct TestQueue {
    /// The `QUEUE_PREFIX` to configure.
    pub prefix: String,
}

impl TestQueue {
    /// A fresh prefix.
    pub fn new() -> TestQueue {
        TestQueue {
            prefix: format!("test-{}", unique_tag()),
        }
    }

    /// Jobs waiting in the event queue: its active list plus its scheduled set (apalis-redis
    /// puts new jobs in the scheduled set, due now).
    pub fn waiting_jobs(&self) -> usize {
        waiting_in(&<shared::queue::ApplyEventV1 as shared::queue::Job>::queue_name(&self.prefix))
    }

    /// Jobs waiting in the email queue (as [`waiting_jobs`](Self::waiting_jobs)).
    pub fn waiting_email_jobs(&self) -> usize {
        waiting_in(&<shared::queue::SendEmailV1 as shared::queue::Job>::queue_name(&self.prefix))
    }

    /// The producer of this prefix's email queue, to push jobs as the sweeper or an operator
    /// would.
    pub async fn email_queue(&self) -> shared::queue::EmailQueue {
        shared::queue::EmailQueue::new(self.connect().await, &self.prefix)
    }

    /// The producer of this prefix's event queue.
    pub async fn event_queue(&self) -> shared::queue::EventQueue {
        shared::queue::EventQueue::new(self.connect().await, &self.prefix)
    }

    async fn connect(&self) -> redis::aio::ConnectionManager {
        let config = shared::config::QueueConfig {
            redis_url: redis_url(),
            prefix: self.prefix.clone(),
        };
        shared::queue::connect(&config).await.expect("redis")
    }
}

/// Active list plus scheduled set of one apalis queue.
fn waiting_in(queue: &str) -> usize {
    let mut conn = redis::Client::open(redis_url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let active: usize = redis::cmd("LLEN")
        .arg(format!("{queue}:active"))
        .query(&mut conn)
        .expect("LLEN");
    let scheduled: usize = redis::cmd("ZCARD")
        .arg(format!("{queue}:scheduled"))
        .query(&mut conn)
        .expect("ZCARD");
    active + scheduled
}

impl TestQueue {
    /// Deletes every Redis key of this prefix: the test's own `FLUSHALL` (a real one would
    /// empty the queues of tests running beside it). Returns how many keys were deleted.
    pub fn flush(&self) -> usize {
        let Ok(mut conn) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) else {
            return 0;
        };
        // One script, so the keys vanish at once, as when Redis restarts empty. A KEYS and a
        // DEL let a list created in between survive while the job data it names was deleted.
        redis::Script::new(
            "local keys = redis.call('KEYS', ARGV[1])
             for _, key in ipairs(keys) do redis.call('DEL', key) end
             return #keys",
        )
        .arg(format!("{}*", self.prefix))
        .invoke(&mut conn)
        .unwrap_or(0)
    }
}

impl Default for TestQueue {
    fn default() -> Self {
        TestQueue::new()
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Path of a workspace binary, built by `cargo build --workspace --bins` (the README's test
/// command does that first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A free loopback port for a child process to bind: checked free by binding it, and taken
/// below the kernel's ephemeral range (32768 and up), so no `bind(…:0)` of another test (a
/// fake API, a proxy) can be given it before the child binds it. Each test process counts
/// through its own window of 1,000 ports (chosen by pid), so parallel test binaries differ.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 10_000 + (std::process::id() % 20) as u16 * 1_000;
    for _ in 0..1_000 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 1_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 10000..30000 for this test process");
}

/// A child process, killed when dropped.
pub struct Process {
    child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Process {
    /// Starts `binary` with exactly `env` (plus PATH) and its output in a log file.
    pub fn start(
        binary_name: &str,
        args: &[&str],
        env: &[(String, String)],
        log_name: &str,
    ) -> Process {
        let log_dir = binary(binary_name)
            .parent()
            .expect("target dir")
            .join("e2e-logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log = log_dir.join(format!("{log_name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary(binary_name))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start the binary");
        Process { child, log }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Exited by itself?
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP client for ingest's API: signed webhooks and the internal endpoints.
#[derive(Clone)]
pub struct IngestClient {
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    http: reqwest::Client,
}

impl IngestClient {
    /// A client for ingest at `base_url`.
    pub fn new(base_url: String) -> IngestClient {
        // reqwest is built without a bundled TLS provider; use the one the services use.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        IngestClient {
            base_url,
            http: reqwest::Client::new(),
        }
    }

    /// Posts `body` with `signature` as the `Stripe-Signature` header (or none).
    pub async fn post_webhook_raw(&self, body: Vec<u8>, signature: Option<String>) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/v1/webhooks/stripe", self.base_url))
            .body(body);
        if let Some(signature) = signature {
            request = request.header("Stripe-Signature", signature);
        }
        let response = request.send().await.expect("webhook request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts an event signed now with the tests' secret, as Stripe would.
    pub async fn post_event(&self, event: &Value) -> (u16, Value) {
        let body = serde_json::to_vec(event).expect("serialize event");
        let signature =
            shared::signature::header_for(&body, WEBHOOK_SECRET, chrono::Utc::now().timestamp());
        self.post_webhook_raw(body, Some(signature)).await
    }

    /// `GET /v1/organizations/{id}/billing` with the tests' token.
    pub async fn billing(&self, organization_id: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!(
                "{}/v1/organizations/{organization_id}/billing",
                self.base_url
            ))
            .bearer_auth(INTERNAL_TOKEN)
            .send()
            .await
            .expect("billing request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `GET` an internal API path (e.g. `/v1/organizations/o/payments`), with the tests' token
    /// or, when `token` is false, none.
    pub async fn internal_get(&self, path: &str, token: bool) -> (u16, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base_url));
        if token {
            request = request.bearer_auth(INTERNAL_TOKEN);
        }
        let response = request.send().await.expect("internal API request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `POST /v1/enterprise-requests` with `body` as JSON, the tests' token and an optional
    /// `Idempotency-Key`.
    pub async fn enterprise_request(
        &self,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> (u16, Value) {
        let body = serde_json::to_vec(body).expect("serialize");
        self.post_enterprise_raw(body, Some(INTERNAL_TOKEN), idempotency_key)
            .await
    }

    /// `POST /v1/enterprise-requests` with raw bytes, any bearer token (or none) and an
    /// optional `Idempotency-Key`.
    pub async fn post_enterprise_raw(
        &self,
        body: Vec<u8>,
        token: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> (u16, Value) {
        let (status, answer, _) = self
            .post_internal("/v1/enterprise-requests", body, token, idempotency_key)
            .await;
        (status, answer)
    }

    /// `POST path` of the internal API: raw body, any bearer token (or none), an optional
    /// `Idempotency-Key`; the status, the JSON answer and its `Retry-After`.
    pub async fn post_internal(
        &self,
        path: &str,
        body: Vec<u8>,
        token: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> (u16, Value, Option<String>) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.expect("internal request");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (
            status,
            response.json().await.unwrap_or(Value::Null),
            retry_after,
        )
    }

    /// `POST path` with `body` as JSON and the tests' token.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let body = serde_json::to_vec(body).expect("serialize");
        let (status, answer, _) = self
            .post_internal(path, body, Some(INTERNAL_TOKEN), None)
            .await;
        (status, answer)
    }

    /// `GET path`, status only.
    pub async fn get_status(&self, path: &str) -> Option<u16> {
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }
}

/// The environment both binaries get in tests.
pub fn pipeline_env(db: &TestDb, queue: &TestQueue) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", &redis_url()),
        ("QUEUE_PREFIX", &queue.prefix),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("INTERNAL_API_TOKEN", INTERNAL_TOKEN),
        ("STRIPE_BASIC_PRICE_KEY", crate::stripe_events::BASIC_PRICE),
        (
            "STRIPE_PREMIUM_PRICE_KEY",
            crate::stripe_events::PREMIUM_PRICE,
        ),
        (
            "STRIPE_ENTERPRISE_PRODUCT_KEY",
            crate::stripe_events::ENTERPRISE_PRODUCT,
        ),
        ("QUEUE_POLL_INTERVAL_MS", "100"),
        // A test with a Stripe key must not meet a reconciliation it did not ask for.
        ("RECONCILE_SCHEDULE", "off"),
        ("RESEND_API_KEY", RESEND_API_KEY),
        ("RESEND_BASE_URL", NO_RESEND),
        ("EMAIL_FROM", EMAIL_FROM),
        ("ENTERPRISE_SALES_EMAIL", SALES_EMAIL),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The real pipeline: its own database and queue, `ingest` and `worker` running.
pub struct Pipeline {
    /// The ingest process.
    pub ingest: Process,
    /// The worker process, when running.
    pub worker: Option<Process>,
    /// The Prometheus endpoint of the worker last started.
    pub worker_metrics_url: String,
    /// The Prometheus endpoint of ingest.
    pub ingest_metrics_url: String,
    /// Client of the ingest API.
    pub client: IngestClient,
    env: Vec<(String, String)>,
    // Dropped after the processes (fields drop in order), so no process sees its database
    // vanish.
    /// The database (the pool is for assertions).
    pub db: TestDb,
    /// The queue prefix.
    pub queue: TestQueue,
}

impl Pipeline {
    /// Starts ingest (waits until it is ready), with `extra` variables; no worker yet.
    pub async fn start(extra: &[(&str, &str)]) -> Pipeline {
        Pipeline::start_with(extra, |_| Vec::new()).await
    }

    /// [`Pipeline::start`], with variables for ingest alone made from the database and queue
    /// (e.g. a `DATABASE_URL` through a [`TcpProxy`]).
    pub async fn start_with(
        extra: &[(&str, &str)],
        ingest_only: impl FnOnce(&TestDb) -> Vec<(String, String)>,
    ) -> Pipeline {
        let db = TestDb::new().await;
        let queue = TestQueue::new();
        let mut env = pipeline_env(&db, &queue);
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let port = free_port();
        let mut ingest_env = env.clone();
        ingest_env.extend(ingest_only(&db));
        ingest_env.push(("INGEST_ADDR".into(), format!("127.0.0.1:{port}")));
        let ingest_metrics_addr = format!("127.0.0.1:{}", free_port());
        ingest_env.push(("METRICS_ADDR".into(), ingest_metrics_addr.clone()));
        let mut ingest = Process::start(
            "ingest",
            &[],
            &ingest_env,
            &format!("ingest-{}", queue.prefix),
        );
        let client = IngestClient::new(format!("http://127.0.0.1:{port}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.get_status("/readyz").await != Some(200) {
            if let Some(status) = ingest.exited() {
                let log = std::fs::read_to_string(&ingest.log).unwrap_or_default();
                panic!("ingest exited with {status}: {log}");
            }
            assert!(
                Instant::now() < deadline,
                "ingest not ready after 20 s; log: {}",
                ingest.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Pipeline {
            db,
            queue,
            ingest,
            worker: None,
            worker_metrics_url: String::new(),
            ingest_metrics_url: format!("http://{ingest_metrics_addr}/metrics"),
            client,
            env,
        }
    }

    /// Counts rows of a table (assertions).
    pub async fn count(&self, table: &'static str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.db.pool)
            .await
            .expect("count rows")
    }

    /// The audit decisions of one event, oldest first.
    pub async fn decisions(&self, event_id: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT decision FROM billing_audit WHERE event_id = $1 ORDER BY id")
            .bind(event_id)
            .fetch_all(&self.db.pool)
            .await
            .expect("audit query")
    }

    /// Waits until the event has a decision in the audit table; returns the decisions.
    pub async fn wait_for_decision(&self, event_id: &str) -> Vec<String> {
        eventually(
            Duration::from_secs(20),
            &format!("a decision on {event_id}"),
            || async {
                let decisions = self.decisions(event_id).await;
                (!decisions.is_empty()).then_some(decisions)
            },
        )
        .await
    }

    /// Waits until the inbox holds `total` events and every one of them is processed.
    pub async fn wait_until_all_processed(&self, total: i64) {
        eventually(
            Duration::from_secs(90),
            &format!("all {total} events to be processed"),
            || async {
                let (stored, processed): (i64, i64) = sqlx::query_as(
                    "SELECT count(*), count(*) FILTER (WHERE status = 'processed')
                     FROM webhook_events",
                )
                .fetch_one(&self.db.pool)
                .await
                .expect("count");
                (stored == total && processed == total).then_some(())
            },
        )
        .await;
    }

    /// For each event with a final decision (anything but `deferred` and `duplicate`), how
    /// many it has: exactly one each when nothing was applied twice.
    pub async fn final_decisions(&self) -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT event_id, count(*) FROM billing_audit
             WHERE decision NOT IN ('deferred', 'duplicate') GROUP BY event_id ORDER BY event_id",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("audit")
    }

    /// Runs a `worker` operator command to completion with the pipeline's environment:
    /// (exit code, stdout, stderr).
    pub async fn worker_command(&self, args: &[&str]) -> (i32, String, String) {
        self.run_to_completion("worker", args).await
    }

    /// [`Pipeline::worker_command`] with some variables changed (`""` removes one).
    pub async fn worker_command_with(
        &self,
        changes: &[(&str, &str)],
        args: &[&str],
    ) -> (i32, String, String) {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !changes.iter().any(|(c, _)| c == k))
            .cloned()
            .collect();
        env.extend(
            changes
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        run_binary("worker", args, env).await
    }

    /// Runs a workspace binary to completion with the pipeline's environment:
    /// (exit code, stdout, stderr).
    pub async fn run_to_completion(
        &self,
        binary_name: &str,
        args: &[&str],
    ) -> (i32, String, String) {
        run_binary(binary_name, args, self.env.clone()).await
    }

    /// A pipeline whose binaries talk to a fake Stripe API of their own (a test key, short
    /// retries: 3, from 20 ms), and the fake; `extra` adds or overrides variables. No worker
    /// is started.
    pub async fn start_with_fake_stripe(extra: &[(&str, &str)]) -> (Pipeline, FakeStripe) {
        let (stripe, url) = FakeStripe::start().await;
        let mut env: Vec<(&str, &str)> = vec![
            ("STRIPE_SECRET_KEY", "sk_test_fake"),
            ("STRIPE_API_BASE", &url),
            ("STRIPE_API_MAX_RETRIES", "3"),
            ("STRIPE_API_RETRY_BASE_MS", "20"),
        ];
        env.extend_from_slice(extra);
        (Pipeline::start(&env).await, stripe)
    }

    /// Starts a (new) worker process.
    pub fn start_worker(&mut self) {
        self.start_worker_with(&[]);
    }

    /// Starts a (new) worker process with some variables added or changed.
    pub fn start_worker_with(&mut self, extra: &[(&str, &str)]) {
        let mut env = self.env.clone();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        self.worker_metrics_url = format!("http://{metrics_addr}/metrics");
        env.push(("METRICS_ADDR".into(), metrics_addr));
        let log = format!("worker-{}-{}", self.queue.prefix, unique_tag());
        self.worker = Some(Process::start("worker", &["run"], &env, &log));
    }

    /// The billing state once `check` accepts it, or a panic naming what was seen last.
    pub async fn wait_for_billing(
        &self,
        organization_id: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let last = std::sync::Mutex::new(Value::Null);
        let result = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let (status, body) = self.client.billing(organization_id).await;
                if status == 200 && check(&body) {
                    return body;
                }
                *last.lock().expect("lock") = body;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        match result {
            Ok(body) => body,
            Err(_) => panic!(
                "timed out waiting for {what}; last billing answer: {}; worker log: {}",
                last.lock().expect("lock"),
                self.worker
                    .as_ref()
                    .map(|w| w.log.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }
}

/// Runs a workspace binary to completion with exactly `env` (and `PATH`).
async fn run_binary(
    binary_name: &str,
    args: &[&str],
    env: Vec<(String, String)>,
) -> (i32, String, String) {
    let path = binary(binary_name);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(path)
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run the binary")
    })
    .await
    .expect("binary run");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A TCP forwarder on loopback that a test can cut, to take Postgres or Redis away from one
/// process without stopping the server every other test uses. While cut it closes every
/// connection it carries and every new one at once, as a stopped server would.
pub struct TcpProxy {
    /// The port to connect to instead of the target.
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards a new loopback port to `target` (e.g. `127.0.0.1:5432`).
    pub async fn start(target: &str) -> TcpProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections =
            std::sync::Arc::new(std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let target = target.to_owned();
        let accept = tokio::spawn({
            let up = up.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let target = target.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().expect("lock").push(task.abort_handle());
                }
            }
        });
        TcpProxy {
            port,
            up,
            connections,
            accept,
        }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().expect("lock").drain(..) {
            connection.abort();
        }
    }

    /// Carries connections again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
