//! The secret-scanning endpoint: `POST /v1/secret-scanning/reports`, the way token
//! issuers take part in GitHub's secret-scanning partner program. A scanner POSTs the
//! tokens it found; each that is a live key of ours is revoked at once (reason `leaked`,
//! audited with the scanner as actor, streamed), and the answer labels every token.
//!
//! The request, refused whole (4xx, nothing read or changed) unless all of it holds:
//! - a body of at most 1 MiB;
//! - `Github-Public-Key-Identifier` naming a configured scanner key, and
//!   `Github-Public-Key-Signature`: base64 of the DER ECDSA P-256 signature (SHA-256) of
//!   the raw body, checked before the body is parsed;
//! - within the scanner's reports per minute;
//! - a JSON array of `{"token", "type", "url", "source"}` (at most [`MAX_TOKENS`]).
//!
//! The answer: `[{"token_hash", "token_type", "label"}]`, `token_hash` the SHA-256 of the
//! token in hex (the protocol's alternative to echoing `token_raw`, so no key is ever
//! written back), `label` `true_positive` (a key of ours, live or not) or
//! `false_positive`. A token's checksum is checked first: an invented one touches no
//! storage. Repeating a report is harmless: a revoked key is found dead and left alone.

use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::config::ScannerSettings;
use crate::domain::actor::Actor;
use crate::domain::key_format::KeyHash;
use crate::domain::leak::LeakLabel;
use crate::domain::limits::{self, LimitUnit, LimitWindow, RateLimit, WindowUsage};
use crate::keys::KeyLifecycle;
use crate::metrics::{Metrics, ScanRefusal};
use crate::store::Acting;

/// The largest report taken.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The most tokens one report may name.
pub const MAX_TOKENS: usize = 1000;
/// The headers a report is signed with (GitHub's names for them).
pub const KEY_ID_HEADER: &str = "github-public-key-identifier";
pub const SIGNATURE_HEADER: &str = "github-public-key-signature";
/// The path reports are POSTed to.
pub const PATH: &str = "/v1/secret-scanning/reports";

/// One scanner as the endpoint knows it: its key and its reports in the last minute.
struct Scanner {
    settings: ScannerSettings,
    limit: [RateLimit; 1],
    usage: Mutex<[WindowUsage; 1]>,
}

pub struct SecretScanning {
    scanners: Vec<Scanner>,
    lifecycle: Arc<KeyLifecycle>,
    metrics: Arc<Metrics>,
    clock: Clock,
}

#[derive(Deserialize)]
struct Reported {
    token: String,
    #[serde(default, rename = "type")]
    token_type: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    source: String,
}

#[derive(Serialize)]
struct Labelled {
    token_hash: String,
    token_type: String,
    label: &'static str,
}

impl SecretScanning {
    pub fn new(
        scanners: &[ScannerSettings],
        lifecycle: Arc<KeyLifecycle>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        SecretScanning {
            scanners: scanners
                .iter()
                .map(|s| Scanner {
                    limit: [RateLimit {
                        unit: LimitUnit::Requests,
                        window: LimitWindow::Minute,
                        limit: s.reports_per_minute,
                    }],
                    usage: Mutex::new([WindowUsage::default()]),
                    settings: s.clone(),
                })
                .collect(),
            lifecycle,
            metrics,
            clock,
        }
    }

    /// The endpoint's routes.
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(PATH, axum::routing::post(report))
            // Over the limit, the body is not read at all (413).
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self)
    }

    fn refuse(&self, why: ScanRefusal, status: StatusCode, message: &str) -> Response {
        self.metrics.scan_refused(why);
        tracing::info!(reason = why.label(), "a secret-scanning report was refused");
        (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
    }

    /// The scanner whose key signed `body`, if the headers name one and its signature
    /// holds; otherwise why not.
    fn signer(&self, headers: &HeaderMap, body: &[u8]) -> Result<&Scanner, ScanRefusal> {
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let Some(scanner) = header(KEY_ID_HEADER)
            .and_then(|id| self.scanners.iter().find(|s| s.settings.key_id == id))
        else {
            return Err(ScanRefusal::UnknownKeyId);
        };
        let signature = header(SIGNATURE_HEADER)
            .and_then(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(s.trim())
                    .ok()
            })
            .and_then(|der| p256::ecdsa::Signature::from_der(&der).ok());
        match signature {
            Some(signature) if scanner.settings.key.verify(body, &signature).is_ok() => Ok(scanner),
            _ => Err(ScanRefusal::BadSignature),
        }
    }

    /// Counts a report against its scanner's reports per minute.
    fn admit(&self, scanner: &Scanner) -> bool {
        let mut usage = scanner.usage.lock().unwrap_or_else(PoisonError::into_inner);
        limits::decide(&scanner.limit, &mut *usage, self.clock.now(), 1).allowed
    }
}

async fn report(
    State(this): State<Arc<SecretScanning>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scanner = match this.signer(&headers, &body) {
        Ok(scanner) => scanner,
        Err(why) => {
            let message = match why {
                ScanRefusal::UnknownKeyId => "unknown or missing key identifier",
                _ => "the signature does not verify",
            };
            return this.refuse(why, StatusCode::UNAUTHORIZED, message);
        }
    };
    if !this.admit(scanner) {
        return this.refuse(
            ScanRefusal::RateLimited,
            StatusCode::TOO_MANY_REQUESTS,
            "too many reports from this key; try again in a minute",
        );
    }
    let tokens: Vec<Reported> = match serde_json::from_slice(&body) {
        Ok(tokens) => tokens,
        Err(_) => {
            return this.refuse(
                ScanRefusal::Malformed,
                StatusCode::BAD_REQUEST,
                "the body must be a JSON array of {token, type, url, source}",
            );
        }
    };
    if tokens.len() > MAX_TOKENS {
        return this.refuse(
            ScanRefusal::Malformed,
            StatusCode::BAD_REQUEST,
            "too many tokens in one report",
        );
    }
    let acting = Acting {
        caller: Arc::from("secret-scanning"),
        actor: Actor {
            id: format!("scanner:{}", scanner.settings.name),
            permissions: Vec::new(),
        },
    };
    let mut answer = Vec::with_capacity(tokens.len());
    for reported in tokens {
        let found_at = if reported.source.is_empty() {
            reported.url.clone()
        } else {
            format!("{} ({})", reported.url, reported.source)
        };
        let found = match this
            .lifecycle
            .report_leak(&acting, &reported.token, &found_at)
            .await
        {
            Ok(found) => found,
            // Storage failed: the scanner retries the whole report, which is harmless.
            Err(e) => {
                tracing::warn!(error = %e, "a secret-scanning report could not be handled");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({ "error": "try again later" })),
                )
                    .into_response();
            }
        };
        let label = found.label();
        match label {
            LeakLabel::TruePositive => this.metrics.leaks_true_positive.increment(1),
            LeakLabel::FalsePositive => this.metrics.leaks_false_positive.increment(1),
        }
        answer.push(Labelled {
            token_hash: KeyHash::of(&reported.token).to_hex(),
            token_type: reported.token_type,
            label: label.as_str(),
        });
    }
    (StatusCode::OK, axum::Json(answer)).into_response()
}
