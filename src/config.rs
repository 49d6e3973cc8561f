//! Configuration: a TOML file, overridden by `KEYWARDEN_*` environment variables
//! (`KEYWARDEN_DATABASE_URL`, `KEYWARDEN_LISTEN`, `KEYWARDEN_CACHE__MAX_KEYS`, ...), then
//! checked into [`Settings`], the validated form the server runs with.
//!
//! Secrets (the database URL may hold a password) are [`SecretString`]s, which cannot be
//! printed by accident. Caller tokens are configured as SHA-256 hashes, never in the clear.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::usage_history::HistorySettings;

use crate::api::auth::{CallerTokens, Role, TokenEntry};
use crate::api::ext_authz::settings::{ExtAuthzInput, ExtAuthzSettings};
use crate::cache::CacheSizes;
use crate::crypto::{KdfParams, derive_kek};
use crate::domain::key_format::{Brand, KeyHash};
use crate::domain::limits::{LimitUnit, LimitWindow, RateLimit};
use crate::domain::scopes::ScopeImplications;
use crate::domain::validate::Violations;
use crate::domain::workspace::{PlanPolicy, Plans};
use crate::events::EventSettings;
use crate::ratelimit::FailureMode;
use crate::ratelimit::breaker::CircuitSettings;
use crate::ratelimit::leased::LeaseSettings;
use base64::Engine;
use zeroize::Zeroizing;

/// The configuration as written by an operator.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// `postgres://...` (production) or `sqlite:...` (single node). Required.
    pub database_url: Option<SecretString>,
    pub database_max_connections: u32,
    /// `serve`: a database that cannot be reached at start is waited for (retried with
    /// backoff while health answers NOT_SERVING); `false`: the first failure ends the
    /// process. `migrate` never waits.
    pub database_wait_at_start: bool,
    /// The key prefix of this deployment (`kw` gives `kw_live_...`).
    pub brand: String,
    /// Scope implications: `admin = ["write"]`, `write = ["read"]`. Transitive.
    pub scope_implications: HashMap<String, Vec<String>>,
    /// Caller tokens: who may call which service.
    pub tokens: Vec<TokenConfig>,
    pub cache: CacheConfig,
    pub events: EventsConfig,
    pub rate_limits: RateLimitsConfig,
    pub usage: UsageConfig,
    /// What each plan allows (`[plans.spark]`, `[plans.pro]`, ...).
    pub plans: PlansConfig,
    /// Key-encryption keys for provider keys (`[[keks]]`); the newest version wraps.
    pub keks: Vec<KekConfig>,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub tracing: TracingConfig,
    pub tls: TlsConfig,
    pub transport: TransportConfig,
    /// Envoy's external authorization API (`[ext_authz]`).
    pub ext_authz: ExtAuthzConfig,
    /// HTTP/JSON by the Connect protocol on the gRPC port (`[connect]`).
    pub connect: ConnectConfig,
    /// The HTTP listener of its own: the secret-scanning endpoint (`[http]`).
    pub http: HttpConfig,
    /// Webhook delivery (`[webhooks]`).
    pub webhooks: WebhooksConfig,
}

/// `[webhooks]`: how endpoints are reached and when notices go out.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Deliver at all (`false`: the outbox fills and waits; endpoints can still be
    /// managed).
    pub enabled: bool,
    /// Let endpoints name, and deliveries reach, private and loopback addresses (the SSRF
    /// guard off). Dev mode turns it on: a developer's receiver runs on localhost.
    pub allow_private_addresses: bool,
    /// When `key.expiring` notices go out, in hours before `expires_at`.
    pub expiry_notice_hours: Vec<u64>,
    /// How often due deliveries are looked for.
    pub poll_interval_ms: u64,
    /// How often due expiry and budget notices are looked for.
    pub sweep_interval_ms: u64,
    /// How long one delivery may take (connect, TLS, answer).
    pub timeout_ms: u64,
    /// Endpoints delivered to at once by this replica.
    pub max_concurrent: usize,
    /// Delivered outbox events are pruned after this long.
    pub retention_hours: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            enabled: true,
            allow_private_addresses: false,
            expiry_notice_hours: vec![7 * 24, 24],
            poll_interval_ms: 1000,
            sweep_interval_ms: 60_000,
            timeout_ms: 10_000,
            max_concurrent: 8,
            retention_hours: 7 * 24,
        }
    }
}

impl WebhooksConfig {
    fn settings(&self) -> Result<crate::webhooks::WebhookSettings, ConfigError> {
        if self
            .expiry_notice_hours
            .iter()
            .any(|h| *h == 0 || *h > 24 * 366)
        {
            return Err(ConfigError::Webhooks(
                "expiry_notice_hours: each must be 1 to 8784 hours".into(),
            ));
        }
        Ok(crate::webhooks::WebhookSettings {
            enabled: self.enabled,
            allow_private: self.allow_private_addresses,
            expiry_leads: self
                .expiry_notice_hours
                .iter()
                .map(|h| Duration::from_secs(h * 3600))
                .collect(),
            poll_interval: Duration::from_millis(self.poll_interval_ms.max(10)),
            sweep_interval: Duration::from_millis(self.sweep_interval_ms.max(10)),
            timeout: Duration::from_millis(self.timeout_ms.max(100)),
            max_concurrent: self.max_concurrent.max(1),
            retention: Duration::from_secs(self.retention_hours.max(1).saturating_mul(3600)),
        })
    }
}

/// `[http]`: a listener of its own (off unless `listen` is set; TLS with the `[tls]` files
/// when those are set) for the secret-scanning endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: Option<SocketAddr>,
    /// The secret scanners whose signed reports are taken (`[[http.scanners]]`).
    pub scanners: Vec<ScannerConfig>,
}

/// One secret scanner: its public key (PEM, P-256) under the identifier its reports name,
/// and how many reports a minute it may send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScannerConfig {
    /// Who it is in the audit log (`scanner:<name>`).
    pub name: String,
    /// The key identifier its reports carry (`Github-Public-Key-Identifier`).
    pub key_id: String,
    pub public_key_pem: String,
    #[serde(default = "default_reports_per_minute")]
    pub reports_per_minute: u64,
}

fn default_reports_per_minute() -> u64 {
    60
}

impl HttpConfig {
    fn settings(&self) -> Result<HttpSettings, ConfigError> {
        use p256::pkcs8::DecodePublicKey;
        let mut scanners = Vec::with_capacity(self.scanners.len());
        for (i, s) in self.scanners.iter().enumerate() {
            let field = |f: &str| format!("scanners[{i}].{f}");
            if s.name.is_empty()
                || s.name.len() > 64
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::Http(format!(
                    "{}: 1 to 64 letters, digits, - or _",
                    field("name")
                )));
            }
            if s.key_id.is_empty()
                || scanners
                    .iter()
                    .any(|o: &ScannerSettings| o.key_id == s.key_id)
            {
                return Err(ConfigError::Http(format!(
                    "{}: required, and unique",
                    field("key_id")
                )));
            }
            let key = p256::ecdsa::VerifyingKey::from_public_key_pem(s.public_key_pem.trim())
                .map_err(|e| {
                    ConfigError::Http(format!(
                        "{}: not a P-256 public key in PEM: {e}",
                        field("public_key_pem")
                    ))
                })?;
            if s.reports_per_minute == 0 {
                return Err(ConfigError::Http(format!(
                    "{}: at least 1",
                    field("reports_per_minute")
                )));
            }
            scanners.push(ScannerSettings {
                name: s.name.clone(),
                key_id: s.key_id.clone(),
                key,
                reports_per_minute: s.reports_per_minute,
            });
        }
        Ok(HttpSettings {
            listen: self.listen,
            scanners,
        })
    }
}

/// The HTTP listener as configured.
#[derive(Debug, Clone, Default)]
pub struct HttpSettings {
    /// `None`: no listener.
    pub listen: Option<SocketAddr>,
    pub scanners: Vec<ScannerSettings>,
}

#[derive(Debug, Clone)]
pub struct ScannerSettings {
    pub name: String,
    pub key_id: String,
    pub key: p256::ecdsa::VerifyingKey,
    pub reports_per_minute: u64,
}

/// `[connect]`: the Connect protocol (JSON and binary unary calls over HTTP/1.1 and 2) on
/// the gRPC port, and CORS for browser consoles (off unless origins are listed).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectConfig {
    pub enabled: bool,
    /// Origins a browser may call from (`https://console.example.com`), or `["*"]` for
    /// any; empty: no CORS headers are sent, and browsers refuse cross-origin calls.
    pub cors_allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub cors_max_age_seconds: u64,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            enabled: true,
            cors_allowed_origins: Vec::new(),
            cors_max_age_seconds: 600,
        }
    }
}

impl ConnectConfig {
    fn settings(&self) -> Result<ConnectSettings, ConfigError> {
        let cors = if self.cors_allowed_origins.is_empty() {
            None
        } else if self.cors_allowed_origins.iter().any(|o| o == "*") {
            if self.cors_allowed_origins.len() > 1 {
                return Err(ConfigError::Connect(
                    "cors_allowed_origins: \"*\" stands alone".into(),
                ));
            }
            Some(CorsOrigins::Any)
        } else {
            let mut origins = Vec::with_capacity(self.cors_allowed_origins.len());
            for origin in &self.cors_allowed_origins {
                let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
                    && !origin.ends_with('/')
                    && http::HeaderValue::from_str(origin).is_ok();
                if !valid {
                    return Err(ConfigError::Connect(format!(
                        "cors_allowed_origins: {origin:?} is not an origin (scheme://host[:port], no path)"
                    )));
                }
                origins.push(origin.clone());
            }
            Some(CorsOrigins::List(origins))
        };
        Ok(ConnectSettings {
            enabled: self.enabled,
            cors,
            cors_max_age: Duration::from_secs(self.cors_max_age_seconds),
        })
    }
}

/// The Connect protocol as configured.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    pub enabled: bool,
    /// `None`: CORS off.
    pub cors: Option<CorsOrigins>,
    pub cors_max_age: Duration,
}

/// Which origins CORS allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    List(Vec<String>),
}

/// Trace export (`[tracing]`).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// An OTLP/gRPC collector (`http://otel-collector:4317`); unset: no export.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the spans carry.
    pub service_name: String,
    /// Which spans are exported (`tracing` filter syntax): the RPC and store spans are
    /// at `debug` under `keywarden`.
    pub otlp_filter: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: "keywarden".to_owned(),
            otlp_filter: "keywarden=debug".to_owned(),
        }
    }
}

/// How the process logs (to stderr).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json` (one object per line, for log shippers). The level
    /// filter is `RUST_LOG` (default `info`; see `telemetry`).
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// TLS on the gRPC port (`[tls]`); unset: plaintext (a private network, or a mesh that
/// terminates TLS).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Mutual TLS: every caller must present a certificate this CA (PEM) signed.
    pub client_ca_file: Option<PathBuf>,
}

/// Limits and keep-alives of the gRPC port (`[transport]`).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// The largest request message a service decodes (RESOURCE_EXHAUSTED beyond it).
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams per connection (calls and open streams); unset: the
    /// HTTP/2 stack's default.
    pub max_concurrent_streams: Option<u32>,
    /// The longest a call may take to answer (a client's own shorter `grpc-timeout` is
    /// honoured too); 0: no server-side limit. A stream's lifetime is not bounded by it.
    pub request_timeout_ms: u64,
    /// HTTP/2 PING interval on idle connections, so load balancers and NATs keep edge
    /// streams open and dead peers are found; 0: off.
    pub http2_keepalive_interval_seconds: u64,
    /// How long a PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout_seconds: u64,
    /// TCP keep-alive idle time; 0: off.
    pub tcp_keepalive_seconds: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: None,
            request_timeout_ms: 30_000,
            http2_keepalive_interval_seconds: 30,
            http2_keepalive_timeout_seconds: 20,
            tcp_keepalive_seconds: 60,
        }
    }
}

impl TransportConfig {
    fn settings(&self) -> TransportSettings {
        let seconds = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        TransportSettings {
            max_message_bytes: self.max_message_bytes.max(1024),
            max_concurrent_streams: self.max_concurrent_streams,
            request_timeout: (self.request_timeout_ms > 0)
                .then(|| Duration::from_millis(self.request_timeout_ms)),
            http2_keepalive_interval: seconds(self.http2_keepalive_interval_seconds),
            http2_keepalive_timeout: seconds(self.http2_keepalive_timeout_seconds),
            tcp_keepalive: seconds(self.tcp_keepalive_seconds),
        }
    }
}

/// The transport as the server applies it.
#[derive(Clone, Debug)]
pub struct TransportSettings {
    pub max_message_bytes: usize,
    pub max_concurrent_streams: Option<u32>,
    pub request_timeout: Option<Duration>,
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Option<Duration>,
    pub tcp_keepalive: Option<Duration>,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportConfig::default().settings()
    }
}

/// TLS material, read at start.
#[derive(Clone)]
pub struct TlsSettings {
    pub cert_pem: Vec<u8>,
    pub key_pem: Zeroizing<Vec<u8>>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("key_pem", &"[redacted]")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish()
    }
}

impl TlsConfig {
    fn settings(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| ConfigError::Tls(format!("{field} {}: {e}", path.display())))
        };
        match (&self.cert_file, &self.key_file) {
            (None, None) => {
                if self.client_ca_file.is_some() {
                    return Err(ConfigError::Tls(
                        "client_ca_file needs cert_file and key_file".into(),
                    ));
                }
                Ok(None)
            }
            (Some(cert), Some(key)) => Ok(Some(TlsSettings {
                cert_pem: read("cert_file", cert)?,
                key_pem: Zeroizing::new(read("key_file", key)?),
                client_ca_pem: self
                    .client_ca_file
                    .as_deref()
                    .map(|ca| read("client_ca_file", ca))
                    .transpose()?,
            })),
            _ => Err(ConfigError::Tls(
                "cert_file and key_file go together".into(),
            )),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics` (plain HTTP, a port of its own); unset: no metrics.
    pub listen: Option<SocketAddr>,
}

/// `[ext_authz]`: how `envoy.service.auth.v3.Authorization/Check` reads a proxied request.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExtAuthzConfig {
    pub enabled: bool,
    /// Where the key is looked for, in order (`authorization` carries `Bearer <key>`).
    pub key_headers: Vec<String>,
    /// Path prefix → scopes the request needs (`"/v1/admin" = ["admin"]`); the longest
    /// matching prefix wins, and a path no prefix matches needs none.
    pub path_scopes: HashMap<String, Vec<String>>,
    /// The header naming the resource (model) of the request (`x-model`); unset: none.
    pub resource_header: Option<String>,
    /// Headers passed upstream with the verified key's id and workspace.
    pub key_id_header: String,
    pub workspace_id_header: String,
}

impl Default for ExtAuthzConfig {
    fn default() -> Self {
        let d = ExtAuthzSettings::default();
        ExtAuthzConfig {
            enabled: d.enabled,
            key_headers: d.key_headers,
            path_scopes: HashMap::new(),
            resource_header: d.resource_header,
            key_id_header: d.key_id_header,
            workspace_id_header: d.workspace_id_header,
        }
    }
}

impl ExtAuthzConfig {
    fn settings(&self) -> Result<ExtAuthzSettings, ConfigError> {
        ExtAuthzSettings::new(ExtAuthzInput {
            enabled: self.enabled,
            key_headers: &self.key_headers,
            path_scopes: &self.path_scopes,
            resource_header: self.resource_header.as_deref(),
            key_id_header: &self.key_id_header,
            workspace_id_header: &self.workspace_id_header,
        })
        .map_err(ConfigError::ExtAuthz)
    }
}

/// One key-encryption key: 32 raw bytes (base64), or a passphrase stretched with Argon2id
/// under a salt (base64, at least 8 bytes) and parameters kept here with the version.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekConfig {
    pub version: u32,
    pub key_base64: Option<SecretString>,
    pub passphrase: Option<SecretString>,
    pub salt_base64: Option<String>,
    pub m_cost_kib: Option<u32>,
    pub t_cost: Option<u32>,
    pub p_cost: Option<u32>,
}

/// A validated KEK, not yet derived (Argon2id runs at start).
#[derive(Clone)]
pub enum KekMaterial {
    Raw(Zeroizing<[u8; 32]>),
    Passphrase {
        passphrase: SecretString,
        salt: Vec<u8>,
        params: KdfParams,
    },
}

impl std::fmt::Debug for KekMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KekMaterial::Raw(_) => f.write_str("Raw([redacted])"),
            KekMaterial::Passphrase { params, .. } => {
                write!(f, "Passphrase([redacted], {params:?})")
            }
        }
    }
}

impl KekMaterial {
    pub fn key(&self) -> Result<Zeroizing<[u8; 32]>, crate::crypto::CryptoError> {
        match self {
            KekMaterial::Raw(k) => Ok(k.clone()),
            KekMaterial::Passphrase {
                passphrase,
                salt,
                params,
            } => derive_kek(passphrase.expose_secret().as_bytes(), salt, *params),
        }
    }
}

impl KekConfig {
    fn material(&self) -> Result<KekMaterial, ConfigError> {
        let bad = |what: &str| ConfigError::Kek(self.version, what.to_owned());
        if self.version == 0 {
            return Err(bad("version must be 1 or more"));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        match (&self.key_base64, &self.passphrase) {
            (Some(key), None) => {
                let bytes = Zeroizing::new(
                    b64.decode(key.expose_secret().trim())
                        .map_err(|_| bad("key_base64 is not base64"))?,
                );
                let key: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad("key_base64 must decode to 32 bytes"))?;
                Ok(KekMaterial::Raw(Zeroizing::new(key)))
            }
            (None, Some(passphrase)) => {
                if passphrase.expose_secret().len() < 12 {
                    return Err(bad("the passphrase must be at least 12 characters"));
                }
                let salt = b64
                    .decode(
                        self.salt_base64
                            .as_deref()
                            .ok_or_else(|| bad("a passphrase needs salt_base64"))?
                            .trim(),
                    )
                    .map_err(|_| bad("salt_base64 is not base64"))?;
                if salt.len() < 8 {
                    return Err(bad("the salt must be at least 8 bytes"));
                }
                let d = KdfParams::default();
                Ok(KekMaterial::Passphrase {
                    passphrase: passphrase.clone(),
                    salt,
                    params: KdfParams {
                        m_cost_kib: self.m_cost_kib.unwrap_or(d.m_cost_kib),
                        t_cost: self.t_cost.unwrap_or(d.t_cost),
                        p_cost: self.p_cost.unwrap_or(d.p_cost),
                    },
                })
            }
            _ => Err(bad("set exactly one of key_base64 and passphrase")),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlansConfig {
    pub spark: PlanConfig,
    pub pro: PlanConfig,
    pub team: PlanConfig,
    pub enterprise: PlanConfig,
}

/// A plan's rules; an unset one keeps the plan's default (keys on every plan, BYOK on
/// every plan but SPARK).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanConfig {
    pub api_keys: Option<bool>,
    pub byok: Option<bool>,
}

impl PlansConfig {
    fn plans(&self) -> Plans {
        let d = Plans::default();
        let merge = |c: &PlanConfig, d: PlanPolicy| PlanPolicy {
            api_keys: c.api_keys.unwrap_or(d.api_keys),
            byok: c.byok.unwrap_or(d.byok),
        };
        Plans {
            spark: merge(&self.spark, d.spark),
            pro: merge(&self.pro, d.pro),
            team: merge(&self.team, d.team),
            enterprise: merge(&self.enterprise, d.enterprise),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Limits for keys that name none.
    pub default: Vec<RateLimitConfig>,
    /// `memory` (one replica's own counters) or `redis` (shared by every replica).
    pub backend: LimiterBackendKind,
    /// Required with `backend = "redis"`.
    pub redis_url: Option<SecretString>,
    /// Prefix of every Redis key this deployment writes.
    pub redis_prefix: String,
    /// When Redis cannot be reached: `open` (let calls through, logged and counted) or
    /// `closed` (UNAVAILABLE).
    pub redis_failure: FailureMode,
    /// Consecutive failed Redis calls that open the circuit: calls then skip Redis and
    /// answer under `redis_failure` at once, until a background probe gets an answer.
    pub redis_circuit_failures: u32,
    /// While the circuit is open, Redis is probed (PING) this often, in milliseconds.
    pub redis_circuit_probe_ms: u64,
    /// Redis backend: how long a replica admits calls from one quota lease, in
    /// milliseconds; 0: no leases, one Redis call per decision.
    pub lease_ms: u64,
    /// Redis backend: how far replicas' clocks may disagree, in milliseconds; a lease is
    /// counted this much past its end.
    pub clock_skew_ms: u64,
    /// How long an edge node may admit calls from one quota lease (LeaseQuota), in
    /// milliseconds; 0: this replica leases nothing to edges (they verify each
    /// rate-limited call).
    pub edge_lease_ms: u64,
    /// Redis backend: how many keys' leases a replica holds (the least recently used
    /// go). The memory backend keeps a key's counters, in its ledger record, while they
    /// count anything, so a count is never lost to a bound.
    pub max_keys: u64,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LimiterBackendKind {
    Memory,
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `requests` or `tokens`.
    pub unit: String,
    /// `minute`, `hour` or `day`.
    pub window: String,
    pub limit: u64,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        RateLimitsConfig {
            default: vec![RateLimitConfig {
                unit: "requests".into(),
                window: "minute".into(),
                limit: 100,
            }],
            backend: LimiterBackendKind::Memory,
            redis_url: None,
            redis_prefix: "kw".into(),
            redis_failure: FailureMode::Open,
            redis_circuit_failures: CircuitSettings::default().failures,
            redis_circuit_probe_ms: CircuitSettings::default().probe_interval.as_millis() as u64,
            lease_ms: LeaseSettings::default().life.as_millis() as u64,
            clock_skew_ms: 1000,
            edge_lease_ms: 2000,
            max_keys: 1_000_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    /// How often spend and last use are written to the database.
    pub flush_interval_ms: u64,
    /// How often the usage history's tally is written.
    pub history_interval_ms: u64,
    /// How long the usage history keeps hour rows (at least 31: a query reads up to 31
    /// days of hours).
    pub history_hour_retention_days: u64,
    /// How long it keeps day rows.
    pub history_day_retention_days: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            flush_interval_ms: 1000,
            history_interval_ms: 60_000,
            history_hour_retention_days: 35,
            history_day_retention_days: 400,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Safety-net poll of the event log, in milliseconds.
    pub poll_interval_ms: u64,
    pub heartbeat_seconds: u64,
    pub retention_hours: u64,
    pub prune_interval_seconds: u64,
    pub grace_sweep_interval_ms: u64,
    /// Events a WatchRevocations subscriber may fall behind before it is ended.
    pub subscriber_lag: usize,
    /// LISTEN for Postgres notifications (off behind a transaction-pooling proxy).
    pub listen: bool,
    /// How long the replica may go without a successful read of the event log and still
    /// answer from its cache, in milliseconds (0: no bound; not for production).
    pub max_staleness_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        let d = EventSettings::default();
        EventsConfig {
            poll_interval_ms: d.poll_interval.as_millis() as u64,
            heartbeat_seconds: d.heartbeat_interval.as_secs(),
            retention_hours: d.retention.as_secs() / 3600,
            prune_interval_seconds: d.prune_interval.as_secs(),
            grace_sweep_interval_ms: d.grace_sweep_interval.as_millis() as u64,
            subscriber_lag: d.subscriber_lag,
            listen: d.listen,
            max_staleness_ms: d.max_staleness.map_or(0, |b| b.as_millis() as u64),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs and the audit log (`admin-console`, `gateway`).
    pub name: String,
    /// Hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: String,
    pub roles: Vec<Role>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Off only to measure what the cache is worth: every VerifyKey then reads the database.
    pub enabled: bool,
    pub max_keys: u64,
    pub ttl_seconds: u64,
    pub negative_max_keys: u64,
    pub negative_ttl_seconds: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        let d = CacheSizes::default();
        CacheConfig {
            enabled: true,
            max_keys: d.max_keys,
            ttl_seconds: d.ttl.as_secs(),
            negative_max_keys: d.negative_max_keys,
            negative_ttl_seconds: d.negative_ttl.as_secs(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database_url: None,
            database_max_connections: 16,
            database_wait_at_start: true,
            brand: "kw".to_owned(),
            scope_implications: HashMap::new(),
            tokens: Vec::new(),
            cache: CacheConfig::default(),
            events: EventsConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            usage: UsageConfig::default(),
            plans: PlansConfig::default(),
            keks: Vec::new(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            tracing: TracingConfig::default(),
            tls: TlsConfig::default(),
            transport: TransportConfig::default(),
            ext_authz: ExtAuthzConfig::default(),
            connect: ConnectConfig::default(),
            http: HttpConfig::default(),
            webhooks: WebhooksConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error(
        "configuration: database_url is required (set KEYWARDEN_DATABASE_URL or database_url in the config file); run `keywarden serve --dev` for a local server on SQLite"
    )]
    MissingDatabaseUrl,
    #[error("configuration: brand: {0}")]
    Brand(#[from] crate::domain::key_format::InvalidBrand),
    #[error("configuration: scope_implications: {0}")]
    Implications(#[from] crate::domain::scopes::InvalidImplication),
    #[error("configuration: tokens[{0}].sha256 must be 64 hex digits")]
    TokenHash(usize),
    #[error("configuration: tokens[{0}] needs a name and at least one role")]
    TokenShape(usize),
    #[error("configuration: rate_limits.default: {0}")]
    DefaultLimits(String),
    #[error("configuration: rate_limits.redis_url is required with backend = \"redis\"")]
    MissingRedisUrl,
    #[error("configuration: keks (version {0}): {1}")]
    Kek(u32, String),
    #[error("configuration: ext_authz.{0}")]
    ExtAuthz(String),
    #[error("configuration: connect.{0}")]
    Connect(String),
    #[error("configuration: http.{0}")]
    Http(String),
    #[error("configuration: webhooks.{0}")]
    Webhooks(String),
    #[error("configuration: tls.{0}")]
    Tls(String),
}

impl Config {
    /// Reads `file` (if given) and the `KEYWARDEN_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            // Only variables naming a setting: KEYWARDEN_CONFIG and others are not settings.
            .merge(
                Env::prefixed("KEYWARDEN_")
                    .filter(|k| is_setting(k.as_str()))
                    .split("__"),
            )
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        let database_url = self.database_url.ok_or(ConfigError::MissingDatabaseUrl)?;
        if database_url.expose_secret().trim().is_empty() {
            return Err(ConfigError::MissingDatabaseUrl);
        }
        let mut entries = Vec::with_capacity(self.tokens.len());
        for (i, t) in self.tokens.into_iter().enumerate() {
            let hash = hex::decode(t.sha256.trim())
                .ok()
                .and_then(|b| KeyHash::from_slice(&b))
                .ok_or(ConfigError::TokenHash(i))?;
            if t.name.is_empty() || t.roles.is_empty() {
                return Err(ConfigError::TokenShape(i));
            }
            entries.push(TokenEntry::new(t.name, hash, t.roles));
        }
        let default_limits = self.rate_limits.default_limits()?;
        let limiter = match self.rate_limits.backend {
            LimiterBackendKind::Memory => LimiterSettings::Memory,
            LimiterBackendKind::Redis => LimiterSettings::Redis {
                url: self
                    .rate_limits
                    .redis_url
                    .filter(|u| !u.expose_secret().trim().is_empty())
                    .ok_or(ConfigError::MissingRedisUrl)?,
                prefix: self.rate_limits.redis_prefix,
                failure: self.rate_limits.redis_failure,
                circuit: CircuitSettings {
                    failures: self.rate_limits.redis_circuit_failures.max(1),
                    probe_interval: Duration::from_millis(
                        self.rate_limits.redis_circuit_probe_ms.max(10),
                    ),
                },
                lease: (self.rate_limits.lease_ms > 0).then(|| LeaseSettings {
                    life: Duration::from_millis(self.rate_limits.lease_ms.max(10)),
                    max_keys: self.rate_limits.max_keys,
                }),
                clock_skew: Duration::from_millis(self.rate_limits.clock_skew_ms),
            },
        };
        let mut keks = Vec::with_capacity(self.keks.len());
        for kek in &self.keks {
            if keks.iter().any(|(v, _)| *v == kek.version) {
                return Err(ConfigError::Kek(kek.version, "configured twice".into()));
            }
            keks.push((kek.version, kek.material()?));
        }
        let ext_authz = Arc::new(self.ext_authz.settings()?);
        let connect = self.connect.settings()?;
        let http = self.http.settings()?;
        let webhooks = self.webhooks.settings()?;
        Ok(Settings {
            connect,
            http,
            webhooks,
            tls: self.tls.settings()?,
            transport: self.transport.settings(),
            ext_authz,
            keks,
            metrics_listen: self.metrics.listen,
            plans: Arc::new(self.plans.plans()),
            default_limits: Arc::new(default_limits),
            limiter,
            usage_flush_interval: Duration::from_millis(self.usage.flush_interval_ms.max(10)),
            usage_history: HistorySettings {
                interval: Duration::from_millis(self.usage.history_interval_ms.max(10)),
                hour_retention: Duration::from_secs(
                    86_400 * self.usage.history_hour_retention_days.max(31),
                ),
                day_retention: Duration::from_secs(
                    86_400 * self.usage.history_day_retention_days.max(1),
                ),
            },
            edge_lease: (self.rate_limits.edge_lease_ms > 0)
                .then(|| Duration::from_millis(self.rate_limits.edge_lease_ms.max(10))),
            listen: self.listen,
            database_url,
            database_max_connections: self.database_max_connections,
            database_wait_at_start: self.database_wait_at_start,
            brand: Brand::parse(&self.brand)?,
            implications: Arc::new(ScopeImplications::new(&self.scope_implications)?),
            tokens: Arc::new(CallerTokens::new(entries)),
            cache_enabled: self.cache.enabled,
            cache: CacheSizes {
                max_keys: self.cache.max_keys,
                ttl: Duration::from_secs(self.cache.ttl_seconds),
                negative_max_keys: self.cache.negative_max_keys,
                negative_ttl: Duration::from_secs(self.cache.negative_ttl_seconds),
            },
            events: EventSettings {
                poll_interval: Duration::from_millis(self.events.poll_interval_ms.max(10)),
                heartbeat_interval: Duration::from_secs(self.events.heartbeat_seconds.max(1)),
                retention: Duration::from_secs(self.events.retention_hours.saturating_mul(3600)),
                prune_interval: Duration::from_secs(self.events.prune_interval_seconds.max(1)),
                grace_sweep_interval: Duration::from_millis(
                    self.events.grace_sweep_interval_ms.max(10),
                ),
                subscriber_lag: self.events.subscriber_lag.max(16),
                listen: self.events.listen,
                max_staleness: (self.events.max_staleness_ms > 0)
                    .then(|| Duration::from_millis(self.events.max_staleness_ms.max(10))),
            },
        })
    }
}

/// The top-level settings; `KEYWARDEN_*` variables that name none of them (the CLI's
/// `KEYWARDEN_CONFIG`, a test suite's own variables) are not configuration and are left
/// alone, while unknown keys in the file are still refused as typos.
const SETTINGS: [&str; 22] = [
    "tracing",
    "tls",
    "transport",
    "metrics",
    "log",
    "listen",
    "database_url",
    "database_max_connections",
    "database_wait_at_start",
    "brand",
    "scope_implications",
    "tokens",
    "cache",
    "events",
    "rate_limits",
    "usage",
    "plans",
    "keks",
    "ext_authz",
    "connect",
    "http",
    "webhooks",
];

fn is_setting(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SETTINGS.iter().any(|s| {
        key == *s
            || key
                .strip_prefix(s)
                .is_some_and(|rest| rest.starts_with("__"))
    })
}

/// The validated configuration the server runs with.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database_url: SecretString,
    pub database_max_connections: u32,
    /// `serve` waits for a database it cannot reach at start (see `startup`).
    pub database_wait_at_start: bool,
    pub brand: Brand,
    pub implications: Arc<ScopeImplications>,
    pub tokens: Arc<CallerTokens>,
    pub cache_enabled: bool,
    pub cache: CacheSizes,
    pub events: EventSettings,
    /// Limits for keys that name none.
    pub default_limits: Arc<Vec<RateLimit>>,
    pub limiter: LimiterSettings,
    /// How long edge nodes may use a quota lease; `None`: LeaseQuota is refused.
    pub edge_lease: Option<Duration>,
    pub usage_flush_interval: Duration,
    /// How the usage history is written and kept.
    pub usage_history: HistorySettings,
    /// What each workspace plan allows.
    pub plans: Arc<Plans>,
    /// Key-encryption keys by version (none: provider keys are unavailable).
    pub keks: Vec<(u32, KekMaterial)>,
    /// Where to serve Prometheus metrics; `None`: no metrics are kept.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on the gRPC port; `None`: plaintext.
    pub tls: Option<TlsSettings>,
    pub transport: TransportSettings,
    /// Envoy's external authorization API.
    pub ext_authz: Arc<ExtAuthzSettings>,
    /// HTTP/JSON by the Connect protocol, and CORS.
    pub connect: ConnectSettings,
    /// The HTTP listener (secret scanning).
    pub http: HttpSettings,
    /// Webhook delivery.
    pub webhooks: crate::webhooks::WebhookSettings,
}

/// Where rate-limit counters live.
#[derive(Debug, Clone, Default)]
pub enum LimiterSettings {
    /// In this replica, exact; unbounded by `rate_limits.max_keys` (which bounds Redis
    /// lease slots): a key's counters live in its ledger record while they count anything
    /// (see `crate::ledger`).
    #[default]
    Memory,
    Redis {
        url: SecretString,
        prefix: String,
        failure: FailureMode,
        circuit: CircuitSettings,
        /// Quota leases (`None`: one Redis call per decision).
        lease: Option<LeaseSettings>,
        clock_skew: Duration,
    },
}

impl RateLimitsConfig {
    fn default_limits(&self) -> Result<Vec<RateLimit>, ConfigError> {
        let mut out = Vec::with_capacity(self.default.len());
        for (i, l) in self.default.iter().enumerate() {
            let bad = |what: &str| ConfigError::DefaultLimits(format!("[{i}]: {what}"));
            out.push(RateLimit {
                unit: LimitUnit::parse(&l.unit)
                    .ok_or_else(|| bad("unit must be requests or tokens"))?,
                window: LimitWindow::parse(&l.window)
                    .ok_or_else(|| bad("window must be minute, hour or day"))?,
                limit: l.limit,
            });
        }
        let mut v = Violations::default();
        let out = v.rate_limits("default", &out);
        match v.0.first() {
            Some(first) => Err(ConfigError::DefaultLimits(format!(
                "{}: {}",
                first.field, first.description
            ))),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_database_url_is_a_clear_error() {
        let err = Config::default().into_settings().unwrap_err();
        assert!(matches!(err, ConfigError::MissingDatabaseUrl));
        assert!(err.to_string().contains("KEYWARDEN_DATABASE_URL"));
    }

    /// A TLS file that cannot be read is named with its path: copying a documented
    /// config whose files do not exist here says which file is missing.
    #[test]
    fn a_missing_tls_file_is_named_with_its_path() {
        let config = Config {
            database_url: Some("sqlite::memory:".into()),
            tls: TlsConfig {
                cert_file: Some("/nonexistent/keywarden/server.pem".into()),
                key_file: Some("/nonexistent/keywarden/server.key".into()),
                ..TlsConfig::default()
            },
            ..Config::default()
        };
        let err = config.into_settings().unwrap_err().to_string();
        assert!(
            err.contains("cert_file /nonexistent/keywarden/server.pem"),
            "{err}"
        );
    }

    /// The README's production configuration, copied as printed (its TLS section
    /// commented out), loads.
    #[test]
    fn the_readme_production_config_loads_as_printed() {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        let readme = include_str!("../README.md");
        let start = readme
            .find("```toml\nlisten = \"0.0.0.0:50051\"")
            .expect("the production TOML block")
            + "```toml\n".len();
        let len = readme[start..].find("```").expect("its end");
        let config: Config = Figment::new()
            .merge(Toml::string(&readme[start..start + len]))
            .extract()
            .unwrap();
        let settings = config.into_settings().unwrap();
        assert!(settings.tls.is_none());
    }

    #[test]
    fn token_hashes_must_be_sha256_hex() {
        let config = Config {
            database_url: Some("sqlite::memory:".into()),
            tokens: vec![TokenConfig {
                name: "x".into(),
                sha256: "abc".into(),
                roles: vec![Role::Admin],
            }],
            ..Config::default()
        };
        assert!(matches!(
            config.into_settings(),
            Err(ConfigError::TokenHash(0))
        ));
    }

    #[test]
    fn rate_limits_default_to_100_per_minute_and_bad_ones_are_refused() {
        let base = || Config {
            database_url: Some("sqlite::memory:".into()),
            ..Config::default()
        };
        let settings = base().into_settings().unwrap();
        assert_eq!(
            settings.default_limits.as_slice(),
            &[RateLimit {
                unit: LimitUnit::Requests,
                window: LimitWindow::Minute,
                limit: 100
            }]
        );
        let mut config = base();
        config.rate_limits.default[0].limit = 0;
        assert!(matches!(
            config.into_settings(),
            Err(ConfigError::DefaultLimits(_))
        ));
        let mut config = base();
        config.rate_limits.default[0].window = "week".into();
        assert!(matches!(
            config.into_settings(),
            Err(ConfigError::DefaultLimits(_))
        ));
        let mut config = base();
        config.rate_limits.backend = LimiterBackendKind::Redis;
        assert!(matches!(
            config.into_settings(),
            Err(ConfigError::MissingRedisUrl)
        ));
    }

    #[test]
    fn the_redis_circuit_opens_after_3_failures_and_probes_every_second_unless_configured() {
        let circuit = |toml: &str| {
            let config: Config = Figment::new()
                .merge(Toml::string(&format!(
                    "database_url = \"sqlite::memory:\"\n[rate_limits]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n{toml}"
                )))
                .extract()
                .unwrap();
            match config.into_settings().unwrap().limiter {
                LimiterSettings::Redis { circuit, .. } => circuit,
                LimiterSettings::Memory => panic!("not redis"),
            }
        };
        assert_eq!(
            circuit(""),
            CircuitSettings {
                failures: 3,
                probe_interval: Duration::from_secs(1)
            }
        );
        assert_eq!(
            circuit("redis_circuit_failures = 5\nredis_circuit_probe_ms = 250"),
            CircuitSettings {
                failures: 5,
                probe_interval: Duration::from_millis(250)
            }
        );
        // Zero failures or a zero interval (a busy probe loop) make no sense: floors apply.
        assert_eq!(
            circuit("redis_circuit_failures = 0\nredis_circuit_probe_ms = 0"),
            CircuitSettings {
                failures: 1,
                probe_interval: Duration::from_millis(10)
            }
        );
    }

    #[test]
    fn webhooks_are_guarded_by_default_and_their_lead_times_checked() {
        let settings = |toml: &str| {
            let config: Config = Figment::new()
                .merge(Toml::string(&format!(
                    "database_url = \"sqlite::memory:\"\n{toml}"
                )))
                .extract()
                .unwrap();
            config.into_settings().map(|s| s.webhooks)
        };
        let default = settings("").unwrap();
        assert!(default.enabled && !default.allow_private);
        assert_eq!(
            default.expiry_leads,
            [Duration::from_secs(7 * 86_400), Duration::from_secs(86_400)]
        );
        let set =
            settings("[webhooks]\nallow_private_addresses = true\nexpiry_notice_hours = [72]\n")
                .unwrap();
        assert!(set.allow_private);
        assert_eq!(set.expiry_leads, [Duration::from_secs(72 * 3600)]);
        let err = settings("[webhooks]\nexpiry_notice_hours = [0]\n").unwrap_err();
        assert!(
            err.to_string().contains("webhooks.expiry_notice_hours"),
            "{err}"
        );
        assert!(is_setting("WEBHOOKS__ALLOW_PRIVATE_ADDRESSES"));
    }

    #[test]
    fn plans_keep_their_defaults_where_the_file_is_silent() {
        let config: Config = Figment::new()
            .merge(Toml::string(
                "database_url = \"sqlite::memory:\"\n[plans.spark]\napi_keys = false\n[plans.pro]\nbyok = false\n",
            ))
            .extract()
            .unwrap();
        let plans = config.into_settings().unwrap().plans;
        assert_eq!(
            plans.spark,
            PlanPolicy {
                api_keys: false,
                byok: false
            }
        );
        assert_eq!(
            plans.pro,
            PlanPolicy {
                api_keys: true,
                byok: false
            }
        );
        assert_eq!(plans.team, Plans::default().team);
    }

    #[test]
    fn keks_need_one_valid_source_and_hide_their_secrets() {
        let kek = |toml: &str| {
            let config: Config = Figment::new()
                .merge(Toml::string(&format!(
                    "database_url = \"sqlite::memory:\"\n[[keks]]\n{toml}"
                )))
                .extract()
                .unwrap();
            config.into_settings()
        };
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let ok = kek(&format!("version = 1\nkey_base64 = \"{key}\"")).unwrap();
        assert_eq!(ok.keks.len(), 1);
        assert!(!format!("{ok:?}").contains(&key));
        let ok = kek(
            "version = 2\npassphrase = \"correct horse battery\"\nsalt_base64 = \"c2FsdHNhbHQ=\"",
        )
        .unwrap();
        assert!(!format!("{ok:?}").contains("horse"));
        for bad in [
            "version = 0\nkey_base64 = \"AAAA\"".to_owned(),
            "version = 1\nkey_base64 = \"AAAA\"".to_owned(),
            "version = 1".to_owned(),
            format!("version = 1\nkey_base64 = \"{key}\"\npassphrase = \"correct horse battery\""),
            "version = 1\npassphrase = \"short\"\nsalt_base64 = \"c2FsdHNhbHQ=\"".to_owned(),
            "version = 1\npassphrase = \"correct horse battery\"".to_owned(),
        ] {
            assert!(matches!(kek(&bad), Err(ConfigError::Kek(..))), "{bad}");
        }
    }

    #[test]
    fn only_settings_are_read_from_the_environment() {
        assert!(is_setting("DATABASE_URL"));
        assert!(is_setting("CACHE__MAX_KEYS"));
        assert!(!is_setting("CONFIG"));
        assert!(!is_setting("TEST_DATABASE_URL"));
        assert!(!is_setting("CACHEX"));
    }

    #[test]
    fn ext_authz_is_read_from_the_file_and_checked() {
        let load = |toml: &str| {
            let config: Config = Figment::new()
                .merge(Toml::string(&format!(
                    "database_url = \"sqlite::memory:\"\n[ext_authz]\n{toml}"
                )))
                .extract()
                .unwrap();
            config.into_settings()
        };
        let s = load(
            "resource_header = \"x-model\"\n[ext_authz.path_scopes]\n\"/v1/\" = [\"read\"]\n\"/v1/admin\" = [\"admin\"]",
        )
        .unwrap();
        assert!(s.ext_authz.enabled);
        assert_eq!(s.ext_authz.key_headers, ["authorization", "x-api-key"]);
        assert_eq!(s.ext_authz.resource_header.as_deref(), Some("x-model"));
        assert_eq!(s.ext_authz.routes.required_for("/v1/admin/x"), ["admin"]);
        let err = load("key_headers = [\"X-Api-Key\"]").unwrap_err();
        assert!(matches!(err, ConfigError::ExtAuthz(_)), "{err}");
        assert!(
            err.to_string().contains("ext_authz.key_headers[0]"),
            "{err}"
        );
        assert!(is_setting("EXT_AUTHZ__RESOURCE_HEADER"));
    }

    #[test]
    fn connect_is_on_cors_off_by_default_and_origins_are_checked() {
        let load = |toml: &str| {
            let config: Config = Figment::new()
                .merge(Toml::string(&format!(
                    "database_url = \"sqlite::memory:\"\n[connect]\n{toml}"
                )))
                .extract()
                .unwrap();
            config.into_settings()
        };
        let s = load("").unwrap();
        assert!(s.connect.enabled);
        assert_eq!(s.connect.cors, None);
        let s = load("cors_allowed_origins = [\"https://console.example\"]").unwrap();
        assert_eq!(
            s.connect.cors,
            Some(CorsOrigins::List(vec!["https://console.example".into()]))
        );
        assert_eq!(
            load("cors_allowed_origins = [\"*\"]").unwrap().connect.cors,
            Some(CorsOrigins::Any)
        );
        for bad in [
            "[\"console.example\"]",
            "[\"https://console.example/\"]",
            "[\"*\", \"https://a.example\"]",
        ] {
            let err = load(&format!("cors_allowed_origins = {bad}")).unwrap_err();
            assert!(matches!(err, ConfigError::Connect(_)), "{bad}: {err}");
        }
        assert!(is_setting("CONNECT__ENABLED"));
    }

    #[test]
    fn debug_output_hides_the_database_url() {
        let config = Config {
            database_url: Some("postgres://u:hunter2@db/kw".into()),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
