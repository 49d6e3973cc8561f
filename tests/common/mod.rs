//! Test harness: each test gets its own database (a fresh SQLite file, or a fresh
//! Postgres database created for it and dropped after), a real server on an ephemeral
//! port, and real tonic clients.
#![allow(dead_code)]

pub mod pg_cluster;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keywarden::api::auth::{CallerTokens, Role, TokenEntry};
use keywarden::cache::CacheSizes;
use keywarden::clock::Clock;
use keywarden::config::{LimiterSettings, Settings};
use keywarden::domain::key_format::{Brand, KeyHash};
use keywarden::domain::limits::{LimitUnit, LimitWindow, RateLimit};
use keywarden::domain::scopes::ScopeImplications;
use keywarden::proto::key_service_client::KeyServiceClient;
use keywarden::proto::revocation_service_client::RevocationServiceClient;
use keywarden::proto::verify_service_client::VerifyServiceClient;
use keywarden::proto::{self, Actor, IssueKeyRequest, Owner, OwnerKind};
use keywarden::ratelimit::FailureMode;
use keywarden::server::RunningServer;
use secrecy::SecretString;
use sqlx::Connection;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The workspaces every [`TestApp`] has (plan PRO).
pub const TEST_WORKSPACES: &[&str] = &["ws_test", "ws_a", "ws_b", "ws_c", "ws_other", "ws_ok"];

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const VERIFIER_TOKEN: &str = "test-verifier-token";
/// A caller token with the `edge` role (RevocationService).
pub const EDGE_TOKEN: &str = "test-edge-token";
/// A caller token with the `provider-resolver` role (ResolveProviderKey only).
pub const RESOLVER_TOKEN: &str = "test-resolver-token";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named `async fn name(backend: Backend)` as two tests, one per store.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Runs each named `async fn name(backend: Backend, counters: Counters)` as three tests:
/// SQLite with counters in memory, Postgres with counters in memory, Postgres with Redis.
#[macro_export]
macro_rules! each_store_and_counter {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite_memory() {
                    use super::common::{Backend, Counters};
                    super::$name(Backend::Sqlite, Counters::Memory).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_memory() {
                    use super::common::{Backend, Counters};
                    super::$name(Backend::Postgres, Counters::Memory).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_redis() {
                    use super::common::{Backend, Counters};
                    super::$name(Backend::Postgres, Counters::Redis).await
                }
            }
        )*
    };
}

pub fn postgres_admin_url() -> String {
    std::env::var("KEYWARDEN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of this test's own.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("keywarden.db").display());
                TestDb {
                    backend,
                    url,
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let name = format!("kw_test_{}", hex::encode(rand_bytes()));
                let admin = postgres_admin_url();
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("Postgres must be running for the tests (the test command starts it)");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.ok();
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap().to_owned();
                TestDb {
                    backend,
                    url: format!("{base}/{name}"),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    /// A Postgres database the test does not own (e.g. on a [`pg_cluster::PgCluster`]):
    /// nothing is dropped after.
    pub fn existing_postgres(url: String) -> TestDb {
        TestDb {
            backend: Backend::Postgres,
            url,
            pg_name: None,
            _dir: None,
        }
    }

    /// Creates workspaces on `plan` directly in the database (after the migrations ran).
    pub async fn create_workspaces(&self, ids: &[&str], plan: &str) {
        for id in ids {
            self.execute(&format!(
                "INSERT INTO workspaces (workspace_id, name, plan, created_at, updated_at) \
                 VALUES ('{id}', '{id}', '{plan}', 0, 0)"
            ))
            .await;
        }
    }

    /// Runs one statement directly on the database, behind the server's back.
    pub async fn execute(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    }

    /// One bytes value (the first column of the first row).
    pub async fn bytes(&self, sql: &str) -> Vec<u8> {
        match self.backend {
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                    .fetch_one(&mut c)
                    .await
                    .unwrap()
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                    .fetch_one(&mut c)
                    .await
                    .unwrap()
            }
        }
    }

    /// Runs `sql` with `value` bound as `$1`.
    pub async fn set_bytes(&self, sql: &str, value: &[u8]) {
        match self.backend {
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                    .bind(value)
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                    .bind(value)
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    }

    /// Everything the database holds, as text: every row of every table (Postgres), or
    /// the raw bytes of the database and its write-ahead log (SQLite).
    pub async fn dump_text(&self) -> String {
        match self.backend {
            Backend::Sqlite => {
                let path = self.url.trim_start_matches("sqlite://").to_owned();
                let mut out = Vec::new();
                for file in [path.clone(), format!("{path}-wal")] {
                    if let Ok(bytes) = std::fs::read(&file) {
                        out.extend(bytes);
                    }
                }
                String::from_utf8_lossy(&out).into_owned()
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT table_name::text FROM information_schema.tables \
                     WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                )
                .fetch_all(&mut c)
                .await
                .unwrap();
                let mut out = String::new();
                for table in tables {
                    let rows: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM \"{table}\" t"
                    )))
                    .fetch_one(&mut c)
                    .await
                    .unwrap();
                    out.push_str(&rows);
                    out.push('\n');
                }
                out
            }
        }
    }

    /// Counts rows with a query returning one integer.
    pub async fn count(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                    .fetch_one(&mut c)
                    .await
                    .unwrap()
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                    .fetch_one(&mut c)
                    .await
                    .unwrap()
            }
        }
    }

    /// Breaks the database for the server: the key tables disappear. Anything answered
    /// afterwards was answered without storage.
    pub async fn hide_key_tables(&self) {
        self.execute("ALTER TABLE key_secrets RENAME TO key_secrets_hidden")
            .await;
        self.execute("ALTER TABLE api_keys RENAME TO api_keys_hidden")
            .await;
    }

    pub async fn restore_key_tables(&self) {
        self.execute("ALTER TABLE key_secrets_hidden RENAME TO key_secrets")
            .await;
        self.execute("ALTER TABLE api_keys_hidden RENAME TO api_keys")
            .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // Drop runs outside async context: use a thread with its own runtime.
            let admin = postgres_admin_url();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    b
}

pub fn test_tokens() -> Arc<CallerTokens> {
    Arc::new(CallerTokens::new(vec![
        TokenEntry::new(
            "test-admin".into(),
            KeyHash::of(ADMIN_TOKEN),
            vec![Role::Admin],
        ),
        TokenEntry::new(
            "test-verifier".into(),
            KeyHash::of(VERIFIER_TOKEN),
            vec![Role::Verifier],
        ),
        TokenEntry::new(
            "test-edge".into(),
            KeyHash::of(EDGE_TOKEN),
            vec![Role::Edge],
        ),
        TokenEntry::new(
            "test-resolver".into(),
            KeyHash::of(RESOLVER_TOKEN),
            vec![Role::ProviderResolver],
        ),
    ]))
}

/// The settings tests run with: the product's `admin > write > read` implications.
pub fn test_settings(db: &TestDb) -> Settings {
    let mut implications = HashMap::new();
    implications.insert("admin".to_owned(), vec!["write".to_owned()]);
    implications.insert("write".to_owned(), vec!["read".to_owned()]);
    Settings {
        metrics_listen: None,
        tls: None,
        transport: Default::default(),
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: SecretString::from(db.url.clone()),
        database_max_connections: 5,
        database_wait_at_start: true,
        brand: Brand::default(),
        implications: Arc::new(ScopeImplications::new(&implications).unwrap()),
        tokens: test_tokens(),
        cache_enabled: true,
        cache: CacheSizes::default(),
        events: keywarden::events::EventSettings {
            poll_interval: std::time::Duration::from_millis(200),
            heartbeat_interval: std::time::Duration::from_secs(1),
            grace_sweep_interval: std::time::Duration::from_millis(100),
            ..Default::default()
        },
        // Generous, so tests about other things never meet a limit on a clock that stands
        // still; tests of limits set their own (tests/rate_limits.rs).
        default_limits: Arc::new(vec![RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit: 1_000_000,
        }]),
        limiter: Default::default(),
        edge_lease: Some(std::time::Duration::from_secs(2)),
        plans: Default::default(),
        keks: vec![(
            1,
            keywarden::config::KekMaterial::Raw(zeroize::Zeroizing::new([1u8; 32])),
        )],
        ext_authz: Default::default(),
        connect: keywarden::config::ConnectSettings {
            enabled: true,
            cors: None,
            cors_max_age: std::time::Duration::from_secs(600),
        },
        http: Default::default(),
        // Tests write usage when they mean to (`RunningServer::flush_usage`), so "not
        // written yet" is never a race with the periodic flush.
        usage_flush_interval: std::time::Duration::from_secs(3600),
        usage_history: Default::default(),
        // The tests' receivers listen on 127.0.0.1.
        webhooks: keywarden::webhooks::WebhookSettings {
            allow_private: true,
            poll_interval: std::time::Duration::from_millis(50),
            sweep_interval: std::time::Duration::from_millis(50),
            ..Default::default()
        },
    }
}

pub use keywarden::bearer::Bearer;

pub type AdminClient = KeyServiceClient<InterceptedService<Channel, Bearer>>;
pub type VerifierClient = VerifyServiceClient<InterceptedService<Channel, Bearer>>;
pub type EdgeClient = RevocationServiceClient<InterceptedService<Channel, Bearer>>;

pub struct TestApp {
    pub db: TestDb,
    pub clock: Clock,
    pub server: Option<RunningServer>,
    pub channel: Channel,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
        let db = TestDb::new(backend).await;
        let mut settings = test_settings(&db);
        adjust(&mut settings);
        let clock = Clock::manual_from_now();
        let server = keywarden::server::start(&settings, clock.clone())
            .await
            .unwrap();
        // The workspaces the tests issue keys in, on a plan that allows everything,
        // written behind the server's back so that no test sees their audit rows.
        db.create_workspaces(TEST_WORKSPACES, "pro").await;
        let channel = Channel::from_shared(format!("http://{}", server.addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        TestApp {
            db,
            clock,
            server: Some(server),
            channel,
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }

    pub fn admin(&self) -> AdminClient {
        self.admin_with(ADMIN_TOKEN)
    }

    /// The ids ListKeys answers `request` with (one page), sorted.
    pub async fn listed_key_ids(&self, request: proto::ListKeysRequest) -> Vec<String> {
        let mut ids: Vec<String> = self
            .admin()
            .list_keys(request)
            .await
            .unwrap()
            .into_inner()
            .keys
            .into_iter()
            .map(|k| k.key_id)
            .collect();
        ids.sort();
        ids
    }

    pub fn admin_with(&self, token: &str) -> AdminClient {
        KeyServiceClient::with_interceptor(self.channel.clone(), bearer(token))
    }

    pub fn verifier(&self) -> VerifierClient {
        self.verifier_with(VERIFIER_TOKEN)
    }

    pub fn verifier_with(&self, token: &str) -> VerifierClient {
        VerifyServiceClient::with_interceptor(self.channel.clone(), bearer(token))
    }

    /// A RevocationService client with the `edge` token.
    pub fn edge(&self) -> EdgeClient {
        self.edge_with(EDGE_TOKEN)
    }

    pub fn edge_with(&self, token: &str) -> EdgeClient {
        edge_client(self.channel.clone(), token)
    }

    /// Issues a key with [`issue_request`] adjusted by `adjust`.
    pub async fn issue_with(
        &self,
        adjust: impl FnOnce(&mut IssueKeyRequest),
    ) -> proto::IssueKeyResponse {
        let mut req = issue_request("ws_test");
        adjust(&mut req);
        self.admin().issue_key(req).await.unwrap().into_inner()
    }

    pub async fn issue(&self) -> proto::IssueKeyResponse {
        self.issue_with(|_| {}).await
    }

    pub async fn verify(&self, key: &str, scopes: &[&str]) -> proto::VerifyKeyResponse {
        self.verifier()
            .verify_key(proto::VerifyKeyRequest {
                key: key.to_owned(),
                required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
                cost: 0,
                resource: String::new(),
                client_ip: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// The key as GetKey answers it.
    pub async fn key_info(&self, key_id: &str) -> proto::KeyInfo {
        self.admin()
            .get_key(proto::GetKeyRequest {
                key_id: key_id.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .key_info
            .unwrap()
    }

    pub async fn audit(&self, workspace_id: &str) -> Vec<proto::AuditEvent> {
        self.admin()
            .list_audit_events(proto::ListAuditEventsRequest {
                workspace_id: workspace_id.to_owned(),
                page_size: 1000,
                page_token: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
    }
}

/// A RevocationService client over `channel` (e.g. to another replica) with `token`.
pub fn edge_client(channel: Channel, token: &str) -> EdgeClient {
    RevocationServiceClient::with_interceptor(channel, bearer(token))
}

/// A channel to a server started with `keywarden::server::start` (another replica).
pub async fn channel_to(server: &RunningServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub fn bearer(token: &str) -> Bearer {
    Bearer::indexed(token).unwrap()
}

pub fn actor() -> Actor {
    Actor {
        id: "user_admin".to_owned(),
        permissions: vec!["admin".to_owned()],
    }
}

pub fn user(id: &str) -> Owner {
    Owner {
        kind: OwnerKind::User as i32,
        id: id.to_owned(),
    }
}

/// A valid IssueKey request: a live key with `read` for `user_1`, issued by an admin actor.
pub fn issue_request(workspace_id: &str) -> IssueKeyRequest {
    IssueKeyRequest {
        workspace_id: workspace_id.to_owned(),
        name: "ci key".to_owned(),
        environment: proto::Environment::Live as i32,
        scopes: vec!["read".to_owned()],
        expires_at: None,
        owner: Some(user("user_1")),
        actor: Some(actor()),
        metadata: HashMap::new(),
        rate_limits: Vec::new(),
        max_budget_micros: None,
        resource_access: None,
        allowed_cidrs: Vec::new(),
        team_id: String::new(),
        budget_period: 0,
        budget_period_days: 0,
    }
}

/// VerifyKey through `verifier` (any replica's), counting `cost` requests.
pub async fn verify_with(
    verifier: &VerifierClient,
    key: &str,
    cost: u64,
) -> proto::VerifyKeyResponse {
    verifier
        .clone()
        .verify_key(proto::VerifyKeyRequest {
            key: key.to_owned(),
            cost,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// ReportUsage through `verifier`: the key's spend as that replica then sees it.
pub async fn report_with(
    verifier: &VerifierClient,
    key_id: &str,
    tokens: u64,
    spend_micros: u64,
) -> Result<u64, Status> {
    verifier
        .clone()
        .report_usage(proto::ReportUsageRequest {
            key_id: key_id.to_owned(),
            tokens,
            spend_micros,
        })
        .await
        .map(|r| r.into_inner().spent_micros)
}

pub fn code(resp: &proto::VerifyKeyResponse) -> proto::VerifyCode {
    proto::VerifyCode::try_from(resp.code).unwrap()
}

/// The google.rpc.ErrorInfo reason of a status.
pub fn reason(status: &Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// The google.rpc.BadRequest field names of an INVALID_ARGUMENT status.
pub fn violated_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

pub fn ts_in(clock: &Clock, seconds: i64) -> prost_types::Timestamp {
    let at = clock.now() + seconds * 1_000_000;
    prost_types::Timestamp {
        seconds: at / 1_000_000,
        nanos: ((at % 1_000_000) * 1000) as i32,
    }
}

/// A plain active key record of `workspace_id` with the `read` scope, for tests that
/// drive the store or the cache directly.
pub fn key_record(
    workspace_id: &str,
    created_at: keywarden::domain::Micros,
) -> keywarden::domain::key::KeyRecord {
    keywarden::domain::key::KeyRecord {
        name: "conformance key".to_owned(),
        display: "kw_live_...abcd".to_owned(),
        scopes: vec!["read".to_owned()],
        ..keywarden::domain::key::KeyRecord::issued(
            keywarden::domain::ids::new_key_id(&mut getrandom::SysRng).unwrap(),
            workspace_id.to_owned(),
            keywarden::domain::key_format::Environment::Live,
            keywarden::domain::key::Owner {
                kind: keywarden::domain::key::OwnerKind::User,
                id: "user_1".to_owned(),
            },
            "user_admin".to_owned(),
            created_at,
        )
    }
}

/// How long a test waits for what happens in the background (an event applied, a stream
/// caught up) before it fails. Not a timing assertion: only a bound on a hang.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Polls `check` until it holds, failing the test after [`EVENTUALLY`].
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `server`'s tailer has published (and so applied the invalidations of)
/// every event up to `seq`.
pub async fn wait_published(server: &RunningServer, seq: i64) {
    eventually(&format!("the replica to publish seq {seq}"), async || {
        server.events().published() >= seq
    })
    .await;
}

/// Where the rate-limit counters are: each replica's memory, or Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counters {
    Memory,
    Redis,
}

pub fn redis_url() -> String {
    std::env::var("KEYWARDEN_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A Redis key prefix of this test's own.
pub fn redis_prefix() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    format!("kwtest_{}", hex::encode(b))
}

pub fn use_counters(s: &mut Settings, counters: Counters, prefix: &str) {
    s.limiter = match counters {
        Counters::Memory => LimiterSettings::default(),
        Counters::Redis => LimiterSettings::Redis {
            url: SecretString::from(redis_url()),
            prefix: prefix.to_owned(),
            failure: FailureMode::Closed,
            circuit: Default::default(),
            lease: None,
            clock_skew: Duration::ZERO,
        },
    };
}

/// Another replica on the test's database and clock.
pub struct Replica {
    _server: keywarden::server::RunningServer,
    pub channel: Channel,
}

impl Replica {
    pub async fn start(app: &TestApp, adjust: impl FnOnce(&mut Settings)) -> Replica {
        let mut settings = test_settings(&app.db);
        adjust(&mut settings);
        let server = keywarden::server::start(&settings, app.clock.clone())
            .await
            .unwrap();
        let channel = channel_to(&server).await;
        Replica {
            _server: server,
            channel,
        }
    }

    pub fn verifier(&self) -> VerifierClient {
        proto::verify_service_client::VerifyServiceClient::with_interceptor(
            self.channel.clone(),
            bearer(VERIFIER_TOKEN),
        )
    }
}
