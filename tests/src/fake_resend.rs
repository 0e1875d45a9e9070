//! A local stand-in for Resend's API on loopback (`POST /emails`): records every request,
//! answers scripted replies, honours idempotency keys as Resend does.

use serde_json::Value;

/// One request the fake Resend received.
#[derive(Debug, Clone)]
pub struct ResendRequest {
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The JSON body (`from`, `to`, `reply_to`, `subject`, `html`, `text`, …).
    pub body: Value,
}

/// What the fake Resend answers: a status, extra headers and a JSON body.
#[derive(Debug, Clone)]
pub struct ResendReply {
    /// HTTP status.
    pub status: u16,
    /// Extra headers (e.g. `ratelimit-reset`).
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: Value,
}

impl ResendReply {
    /// An error as Resend shapes it: `{statusCode, name, message}`.
    pub fn error(status: u16, name: &str, message: &str) -> ResendReply {
        ResendReply {
            status,
            headers: Vec::new(),
            body: serde_json::json!({ "statusCode": status, "name": name, "message": message }),
        }
    }

    /// A 429 that resets in `seconds`.
    pub fn rate_limited(seconds: u64) -> ResendReply {
        ResendReply {
            status: 429,
            headers: vec![
                ("ratelimit-limit", "2".to_owned()),
                ("ratelimit-remaining", "0".to_owned()),
                ("ratelimit-reset", seconds.to_string()),
            ],
            body: serde_json::json!({
                "statusCode": 429,
                "name": "rate_limit_exceeded",
                "message": "Too many requests."
            }),
        }
    }
}

#[derive(Default)]
struct FakeResendState {
    requests: Vec<ResendRequest>,
    /// Replies to give next, in order; once empty, every email is accepted.
    script: std::collections::VecDeque<ResendReply>,
    /// Idempotency key → id of the email accepted under it (Resend answers a repeat with the
    /// first answer and sends nothing).
    accepted: std::collections::HashMap<String, String>,
    /// Emails actually accepted (repeats of a key excluded), in order.
    emails: Vec<ResendRequest>,
}

/// A local stand-in for Resend's `POST /emails`: records every request, answers the scripted
/// replies first, then accepts; honours idempotency keys as Resend does.
#[derive(Clone, Default)]
pub struct FakeResend {
    state: std::sync::Arc<std::sync::Mutex<FakeResendState>>,
}

impl FakeResend {
    /// Serves on a loopback port; returns the fake and its base URL (for `RESEND_BASE_URL`).
    pub async fn start() -> (FakeResend, String) {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        let fake = FakeResend::default();
        let app = axum::Router::new()
            .route(
                "/emails",
                axum::routing::post(
                    |State(fake): State<FakeResend>,
                     headers: HeaderMap,
                     axum::Json(body): axum::Json<Value>| async move {
                        let header = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        let request = ResendRequest {
                            idempotency_key: header("idempotency-key"),
                            authorization: header("authorization"),
                            body,
                        };
                        let mut state = fake.state.lock().expect("lock");
                        state.requests.push(request.clone());
                        let reply = match state.script.pop_front() {
                            Some(reply) => reply,
                            None => {
                                let repeat = request
                                    .idempotency_key
                                    .as_ref()
                                    .and_then(|key| state.accepted.get(key).cloned());
                                let id = match repeat {
                                    Some(id) => id,
                                    None => {
                                        let id = uuid::Uuid::new_v4().to_string();
                                        if let Some(key) = &request.idempotency_key {
                                            state.accepted.insert(key.clone(), id.clone());
                                        }
                                        state.emails.push(request);
                                        id
                                    }
                                };
                                ResendReply {
                                    status: 200,
                                    headers: Vec::new(),
                                    body: serde_json::json!({ "id": id }),
                                }
                            }
                        };
                        let mut response = (
                            StatusCode::from_u16(reply.status).expect("status"),
                            axum::Json(reply.body),
                        )
                            .into_response();
                        for (name, value) in reply.headers {
                            response
                                .headers_mut()
                                .insert(name, value.parse().expect("header value"));
                        }
                        response
                    },
                ),
            )
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Resend");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, url)
    }

    /// Answers these replies to the next requests, in order (after any still scripted).
    pub fn script(&self, replies: impl IntoIterator<Item = ResendReply>) {
        self.state.lock().expect("lock").script.extend(replies);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<ResendRequest> {
        self.state.lock().expect("lock").requests.clone()
    }

    /// The emails accepted so far (a repeated idempotency key counts once).
    pub fn emails(&self) -> Vec<ResendRequest> {
        self.state.lock().expect("lock").emails.clone()
    }

    /// The id the fake gave the email accepted under `key`.
    pub fn email_id(&self, key: &str) -> Option<String> {
        self.state.lock().expect("lock").accepted.get(key).cloned()
    }
}
