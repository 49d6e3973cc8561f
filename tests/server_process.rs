//! The real `keywarden` binary as an operator runs it: `serve --dev`, `serve --config`,
//! `migrate`, `token`, SIGTERM, health and reflection, each in a child process.

mod common;
mod process_harness;

use common::*;
use keywarden::proto::{self, IssueKeyRequest, VerifyCode};
use process_harness::*;
use sha2::{Digest, Sha256};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A valid IssueKey request whose admin actor holds the `read` scope it asks for (the
/// configured servers here run without scope implications).
fn issue_req(workspace_id: &str) -> IssueKeyRequest {
    let mut r = issue_request(workspace_id);
    r.actor.as_mut().unwrap().permissions = vec!["admin".into(), "read".into()];
    r
}

/// Issues a key with `admin_token` and checks that `verifier_token` verifies it.
async fn issue_and_verify(server: &Server, admin_token: &str, verifier_token: &str) -> String {
    server.create_workspace(admin_token, "ws_proc").await;
    let issued = server
        .admin(admin_token)
        .await
        .issue_key(issue_req("ws_proc"))
        .await
        .unwrap()
        .into_inner();
    assert!(issued.key.starts_with("kw_live_"), "{}", issued.key);
    let verdict = verify(server, verifier_token, &issued.key).await;
    assert!(verdict.valid, "{verdict:?}");
    assert_eq!(verdict.key_id, issued.key_info.unwrap().key_id);
    assert_eq!(verdict.workspace_id, "ws_proc");
    issued.key
}

async fn verify(server: &Server, verifier_token: &str, key: &str) -> proto::VerifyKeyResponse {
    server
        .verifier(verifier_token)
        .await
        .verify_key(proto::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: vec!["read".into()],
            cost: 0,
            resource: String::new(),
            client_ip: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The token of the dev-mode line `<role> token: <token>`.
fn dev_token(server: &Server, role: &str) -> String {
    let token = server.stdout_value(&format!("{role} token: "));
    assert!(
        token.starts_with("kwt_") && token.len() > 20 && !token.contains(char::is_whitespace),
        "{role} token {token:?}"
    );
    token
}

fn assert_exited_cleanly(status: std::process::ExitStatus, process: &Process) {
    assert!(status.success(), "{status}\n{}", process.transcript());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_prints_working_tokens_and_keeps_keys_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // Not there yet: dev mode creates it.
    let data_dir = dir.path().join("data");

    let mut first = Server::start(dev_server(&data_dir)).await;
    let out = first.process.stdout();
    assert!(out.contains("DEV MODE"), "{out}");
    let admin = dev_token(&first, "admin");
    let verifier = dev_token(&first, "verifier");
    assert_ne!(admin, verifier);

    let key = issue_and_verify(&first, &admin, &verifier).await;
    // Dev mode has the product's scopes: an actor holding only `admin` grants `read`.
    assert!(
        out.contains("admin implies write, write implies read"),
        "{out}"
    );
    let mut by_admin = issue_request("ws_proc");
    by_admin.scopes = vec!["read".into(), "write".into()];
    by_admin.actor.as_mut().unwrap().permissions = vec!["admin".into()];
    first.admin(&admin).await.issue_key(by_admin).await.unwrap();
    // Each token has its own role only.
    let err = first
        .admin(&verifier)
        .await
        .issue_key(issue_req("ws_proc"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = first
        .verifier(&admin)
        .await
        .verify_key(proto::VerifyKeyRequest {
            key: key.clone(),
            required_scopes: vec![],
            cost: 0,
            resource: String::new(),
            client_ip: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let db_file = data_dir.join("keywarden.db");
    assert!(db_file.is_file(), "no {}", db_file.display());
    let status = first.terminate().await;
    assert_exited_cleanly(status, &first.process);

    // Same data dir: the key is still there; the tokens are new.
    let mut second = Server::start(dev_server(&data_dir)).await;
    assert!(second.process.stdout().contains("DEV MODE"));
    let admin2 = dev_token(&second, "admin");
    let verifier2 = dev_token(&second, "verifier");
    assert_ne!(admin2, admin);
    assert_ne!(verifier2, verifier);
    let verdict = verify(&second, &verifier2, &key).await;
    assert!(verdict.valid, "{verdict:?}");
    assert_eq!(verdict.code, VerifyCode::Valid as i32);
    let err = second
        .verifier(&verifier)
        .await
        .verify_key(proto::VerifyKeyRequest {
            key,
            required_scopes: vec![],
            cost: 0,
            resource: String::new(),
            client_ip: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let status = second.terminate().await;
    assert_exited_cleanly(status, &second.process);
}

/// Dev mode's database holds key hashes, the audit log and wrapped provider keys: the
/// file, its write-ahead log and its shared-memory index are owner-only (0600), like the
/// KEK beside them, whatever the umask (022 here); a data directory whose database was
/// left readable by all (by an older version) is made owner-only at start.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_keeps_its_database_files_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let modes = || {
        [
            "keywarden.db",
            "keywarden.db-wal",
            "keywarden.db-shm",
            "kek.key",
        ]
        .map(|name| {
            let meta =
                std::fs::metadata(data_dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, format!("{:o}", meta.permissions().mode() & 0o777))
        })
    };
    let owner_only = [
        "keywarden.db",
        "keywarden.db-wal",
        "keywarden.db-shm",
        "kek.key",
    ]
    .map(|name| (name, "600".to_owned()));

    let mut server = Server::start(with_umask("022", &dev_server(&data_dir))).await;
    let (admin, verifier) = (dev_token(&server, "admin"), dev_token(&server, "verifier"));
    // A write: the write-ahead log and its index exist while the server runs.
    issue_and_verify(&server, &admin, &verifier).await;
    assert_eq!(modes(), owner_only);
    assert_exited_cleanly(server.terminate().await, &server.process);

    std::fs::set_permissions(
        data_dir.join("keywarden.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut server = Server::start(with_umask("022", &dev_server(&data_dir))).await;
    let (admin, verifier) = (dev_token(&server, "admin"), dev_token(&server, "verifier"));
    issue_and_verify(&server, &admin, &verifier).await;
    assert_eq!(modes(), owner_only);
    assert_exited_cleanly(server.terminate().await, &server.process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_database_url_fails_with_a_clear_error() {
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = keywarden(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.current_dir(cwd.path());
    let mut process = Process::spawn(cmd);
    let status = process.wait().await;
    assert!(!status.success(), "{status}\n{}", process.transcript());
    let stderr = process.stderr();
    assert!(stderr.contains("database_url is required"), "{stderr}");
    assert!(stderr.contains("KEYWARDEN_DATABASE_URL"), "{stderr}");
    assert!(!process.stdout().contains("listening on"));
    // Nothing was created on the way.
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_config_file_on_postgres() {
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&db.url), ADMIN_TOKEN, VERIFIER_TOKEN);

    let mut server = Server::start(config_server(&config)).await;
    assert!(!server.process.stdout().contains("DEV MODE"));
    let key = issue_and_verify(&server, ADMIN_TOKEN, VERIFIER_TOKEN).await;
    // The key went to this Postgres database.
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM key_secrets WHERE encode(secret_hash, 'hex') = '{hash}'"
        ))
        .await,
        1
    );
    let err = server
        .admin("not-a-configured-token")
        .await
        .issue_key(issue_req("ws_proc"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let status = server.terminate().await;
    assert_exited_cleanly(status, &server.process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_the_database_url_from_the_environment() {
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), None, ADMIN_TOKEN, VERIFIER_TOKEN);
    let mut cmd = config_server(&config);
    cmd.env("KEYWARDEN_DATABASE_URL", &db.url);

    let mut server = Server::start(cmd).await;
    let key = issue_and_verify(&server, ADMIN_TOKEN, VERIFIER_TOKEN).await;
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM key_secrets WHERE encode(secret_hash, 'hex') = '{hash}'"
        ))
        .await,
        1
    );
    let status = server.terminate().await;
    assert_exited_cleanly(status, &server.process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_the_config_file_named_by_keywarden_config() {
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&db.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let mut cmd = keywarden(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.env("KEYWARDEN_CONFIG", &config);

    let mut server = Server::start(cmd).await;
    issue_and_verify(&server, ADMIN_TOKEN, VERIFIER_TOKEN).await;
    assert_eq!(db.count("SELECT count(*) FROM api_keys").await, 1);
    let status = server.terminate().await;
    assert_exited_cleanly(status, &server.process);
}

/// A database that is down at start, for a server process: the URL of a fresh Postgres
/// database, but on a loopback port that is bound and not listening (connections are
/// refused) until [`DownDatabase::come_up`] forwards it to the real server.
struct DownDatabase {
    db: TestDb,
    url: String,
    socket: Option<tokio::net::TcpSocket>,
    real: String,
}

impl DownDatabase {
    async fn new() -> DownDatabase {
        use std::str::FromStr;
        let db = TestDb::new(Backend::Postgres).await;
        let admin = sqlx::postgres::PgConnectOptions::from_str(&postgres_admin_url()).unwrap();
        let real = format!("{}:{}", admin.get_host(), admin.get_port());
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let url = db.url.replacen(&real, &format!("127.0.0.1:{port}"), 1);
        assert_ne!(url, db.url, "{real} is not in {}", db.url);
        DownDatabase {
            db,
            url,
            socket: Some(socket),
            real,
        }
    }

    /// The port starts listening and forwards every connection to the real server.
    fn come_up(&mut self) {
        let listener = self.socket.take().unwrap().listen(64).unwrap();
        let real = self.real.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let real = real.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&real).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    }
}

/// What `serve` logs when an attempt to open the database failed and it will try again.
const WAITING_FOR_THE_DATABASE: &str = "the database is not available yet";

/// The health of each of `services` on the server at `addr`.
async fn health_of(addr: std::net::SocketAddr, services: &[&str]) -> Vec<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut out = Vec::new();
    for service in services {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("Check({service:?}): {e:?}"))
            .into_inner()
            .status;
        out.push(ServingStatus::try_from(status).unwrap());
    }
    out
}

/// The address of the `starting on ADDR` line: the port listens before the database is
/// open.
async fn starting_addr(process: &mut Process) -> std::net::SocketAddr {
    let line = process
        .wait_for_stdout_line(|l| l.starts_with("starting on "))
        .await;
    line["starting on ".len()..].trim().parse().unwrap()
}

/// A replica started while Postgres is down does not exit: it keeps trying to open the
/// database, and meanwhile its port answers health NOT_SERVING (the whole server and each
/// service) and every other call UNAVAILABLE (STORAGE_UNAVAILABLE, with a retry delay), as
/// orchestrators expect. Once Postgres answers, the same port serves for real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_waits_for_a_database_that_is_down_at_start() {
    use tonic_types::StatusExt;
    const SERVICES: [&str; 3] = ["", "keywarden.v1.KeyService", "keywarden.v1.VerifyService"];
    let mut database = DownDatabase::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&database.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let mut process = Process::spawn(config_server(&config));
    let addr = starting_addr(&mut process).await;

    // An attempt failed, and the process is still there, answering.
    process
        .wait_for_stderr(|e| e.contains(WAITING_FOR_THE_DATABASE))
        .await;
    assert!(process.is_running(), "{}", process.transcript());
    assert_eq!(
        health_of(addr, &SERVICES).await,
        [ServingStatus::NotServing; 3]
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = keywarden::proto::key_service_client::KeyServiceClient::with_interceptor(
        channel,
        bearer(ADMIN_TOKEN),
    )
    .issue_key(issue_req("ws_proc"))
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "STORAGE_UNAVAILABLE", "{err:?}");
    assert!(err.get_details_retry_info().is_some(), "{err:?}");
    assert!(!process.stdout().contains("listening on"));
    // A watcher hears NOT_SERVING now; its stream ends when the full server takes over,
    // so that it watches again there.
    let mut watch = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .watch(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap()
    .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::NotServing as i32);

    database.come_up();
    let mut server = Server {
        addr,
        process: {
            process
                .wait_for_stdout_line(|l| l == format!("listening on {addr}"))
                .await;
            process
        },
    };
    assert_eq!(
        health_of(addr, &SERVICES).await,
        [ServingStatus::Serving; 3]
    );
    let ended = tokio::time::timeout(TIMEOUT, watch.message())
        .await
        .expect("the stand-in's Watch stream ends");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    issue_and_verify(&server, ADMIN_TOKEN, VERIFIER_TOKEN).await;
    assert_eq!(database.db.count("SELECT count(*) FROM api_keys").await, 1);
    let status = server.terminate().await;
    assert_exited_cleanly(status, &server.process);
}

/// SIGTERM while the database is still down ends the process cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_the_database_exits_cleanly() {
    let database = DownDatabase::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&database.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let mut process = Process::spawn(config_server(&config));
    let addr = starting_addr(&mut process).await;
    process
        .wait_for_stderr(|e| e.contains(WAITING_FOR_THE_DATABASE))
        .await;
    assert_eq!(health_of(addr, &[""]).await, [ServingStatus::NotServing]);
    let status = process.terminate().await;
    assert_exited_cleanly(status, &process);
    assert!(process.stderr().contains("shutting down"));
    assert!(!process.stdout().contains("listening on"));
}

/// `database_wait_at_start = false` restores failing fast: the process exits when the
/// first attempt to reach the database fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_fails_fast_when_told_not_to_wait_for_the_database() {
    let database = DownDatabase::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&database.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("database_wait_at_start = false\n{toml}")).unwrap();
    let mut process = Process::spawn(config_server(&config));
    let status = process.wait().await;
    assert!(!status.success(), "{status}\n{}", process.transcript());
    let stderr = process.stderr();
    assert!(stderr.contains("cannot open the database"), "{stderr}");
    assert!(!stderr.contains(WAITING_FOR_THE_DATABASE), "{stderr}");
    assert!(!process.stdout().contains("listening on"));
}

/// `keywarden migrate` (a Job, a deploy step) does not wait: a database that is down is
/// an error at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_fails_fast_when_the_database_is_down() {
    let database = DownDatabase::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&database.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let mut process = Process::spawn(keywarden(&[
        "migrate".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]));
    let status = process.wait().await;
    assert!(!status.success(), "{status}\n{}", process.transcript());
    assert!(!process.stdout().contains("migrations applied"));
    assert!(!process.stderr().contains(WAITING_FOR_THE_DATABASE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_migrations_and_exits() {
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&db.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let tables = "SELECT count(*) FROM information_schema.tables \
                  WHERE table_schema = 'public' AND table_name = 'api_keys'";
    assert_eq!(db.count(tables).await, 0);

    let mut process = Process::spawn(keywarden(&[
        "migrate".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]));
    let status = process.wait().await;
    assert_exited_cleanly(status, &process);
    assert!(process.stdout().contains("migrations applied"));
    assert_eq!(db.count(tables).await, 1);
    assert_eq!(db.count("SELECT count(*) FROM api_keys").await, 0);
    assert_eq!(db.count("SELECT count(*) FROM key_secrets").await, 0);

    // Again, on the migrated database, with JSON logs configured and DEBUG on: migrate
    // follows `log.format`, and Postgres's notice that the migrations table exists
    // (`relation "_sqlx_migrations" already exists, skipping`) is not logged.
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{toml}\n[log]\nformat = \"json\"\n")).unwrap();
    let mut again = keywarden(&["migrate".as_ref(), "--config".as_ref(), config.as_os_str()]);
    again.env("RUST_LOG", "debug");
    let mut process = Process::spawn(again);
    let status = process.wait().await;
    assert_exited_cleanly(status, &process);
    let stderr = process.stderr();
    assert!(!stderr.contains("already exists, skipping"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "DEBUG logs nothing: {stderr}");
    for line in lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON log line: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_the_server_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dev_server(dir.path())).await;
    let verifier = dev_token(&server, "verifier");
    // A connection is open when the signal comes.
    let mut client = server.verifier(&verifier).await;
    client.ping(proto::PingRequest {}).await.unwrap();

    let status = server.terminate().await;
    assert_exited_cleanly(status, &server.process);
    assert_eq!(status.code(), Some(0));
    let stderr = server.process.stderr();
    assert!(stderr.contains("shutting down"), "{stderr}");
    // Log lines written to a pipe carry no colour codes.
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    // The server is gone: a new connection is refused.
    assert!(
        tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dev_server(dir.path())).await;
    let mut health = HealthClient::new(server.channel().await);
    // Every service the server lists, so that a probe naming any of them (a Kubernetes
    // gRPC probe on RevocationService, say) is answered.
    let listed = listed_services(&server).await;
    let keywarden: Vec<&str> = listed
        .iter()
        .map(String::as_str)
        .filter(|s| s.starts_with("keywarden.v1."))
        .collect();
    assert_eq!(keywarden.len(), 9, "{listed:?}");
    for service in std::iter::once("").chain(keywarden) {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("Check({service:?}): {e:?}"))
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    drop(health);
    let status = server.terminate().await;
    assert_exited_cleanly(status, &server.process);
}

/// The services the server lists by reflection (v1alpha).
async fn listed_services(server: &Server) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a list_services answer: {response:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

const SERVICES: [&str; 3] = [
    "keywarden.v1.KeyService",
    "keywarden.v1.VerifyService",
    "grpc.health.v1.Health",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_lists_the_services() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dev_server(dir.path())).await;
    let names = listed_services(&server).await;
    for service in SERVICES {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not in {names:?}"
        );
    }
    let status = server.terminate().await;
    assert_exited_cleanly(status, &server.process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dev_server(dir.path())).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a list_services answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in SERVICES {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not in {names:?}"
        );
    }
    drop((responses, client));
    let status = server.terminate().await;
    assert_exited_cleanly(status, &server.process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_a_token_and_its_sha256() {
    let mut process = Process::spawn(keywarden(&["token"]));
    let status = process.wait().await;
    assert_exited_cleanly(status, &process);
    let lines = process.stdout_lines();
    let value = |label: &str| {
        let found: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(label).map(str::trim))
            .collect();
        assert_eq!(found.len(), 1, "one {label:?} line in {lines:?}");
        found[0].to_owned()
    };
    let token = value("token:");
    let sha256 = value("sha256:");
    assert!(token.starts_with("kwt_") && token.len() > 20, "{token:?}");
    assert_eq!(sha256, hex::encode(Sha256::digest(token.as_bytes())));

    // A second run gives another token.
    let mut again = Process::spawn(keywarden(&["token"]));
    assert!(again.wait().await.success());
    assert!(!again.stdout().contains(&token));
}

/// Two `keywarden serve` processes on one Postgres, as replicas behind a load balancer:
/// answers cached on B stop the moment A revokes, rotates or narrows a key, and B's
/// WatchRevocations subscriber receives each event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_on_one_postgres_stay_coherent() {
    use keywarden::proto::watch_revocations_response::Message;
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&db.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let edge_sha = hex::encode(Sha256::digest(EDGE_TOKEN.as_bytes()));
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&format!(
        "\n[[tokens]]\nname = \"edges\"\nsha256 = \"{edge_sha}\"\nroles = [\"edge\"]\n"
    ));
    std::fs::write(&config, toml).unwrap();
    let mut a = Server::start(config_server(&config)).await;
    let mut b = Server::start(config_server(&config)).await;
    a.create_workspace(ADMIN_TOKEN, "ws_proc").await;
    let mut admin = a.admin(ADMIN_TOKEN).await;
    let issue = async |admin: &mut AdminClient| {
        let mut r = issue_req("ws_proc");
        r.scopes = vec!["read".into()];
        admin.issue_key(r).await.unwrap().into_inner()
    };
    let (revoked, rotated, narrowed) = (
        issue(&mut admin).await,
        issue(&mut admin).await,
        issue(&mut admin).await,
    );
    let verify_on_b = async |key: &str, scopes: &[&str]| {
        let r = b
            .verifier(VERIFIER_TOKEN)
            .await
            .verify_key(proto::VerifyKeyRequest {
                key: key.to_owned(),
                required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
                cost: 0,
                resource: String::new(),
                client_ip: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        code(&r)
    };
    for issued in [&revoked, &rotated, &narrowed] {
        for _ in 0..2 {
            assert_eq!(verify_on_b(&issued.key, &["read"]).await, VerifyCode::Valid);
        }
    }
    let mut stream = edge_client(b.channel().await, EDGE_TOKEN)
        .watch_revocations(proto::WatchRevocationsRequest {
            after_seq: 0,
            workspace_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let next = async |stream: &mut tonic::Streaming<proto::WatchRevocationsResponse>| loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
            .await
            .expect("a message within 10 s")
            .unwrap()
            .unwrap();
        if let Some(Message::Event(e)) = m.message {
            return e;
        }
    };
    let key_id = |i: &proto::IssueKeyResponse| i.key_info.as_ref().unwrap().key_id.clone();
    let eventually_on_b = async |key: &str, scopes: &[&str], expected: VerifyCode| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while verify_on_b(key, scopes).await != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "B kept a stale answer"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };

    admin
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id(&revoked),
            actor: Some(actor()),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    let e = next(&mut stream).await;
    assert_eq!(
        (e.kind, e.key_id.clone()),
        (proto::KeyEventKind::Revoked as i32, key_id(&revoked))
    );
    eventually_on_b(&revoked.key, &["read"], VerifyCode::Revoked).await;

    let new = admin
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id(&rotated),
            actor: Some(actor()),
            grace_period: None,
        })
        .await
        .unwrap()
        .into_inner();
    let e = next(&mut stream).await;
    assert_eq!(
        (e.kind, e.key_id.clone()),
        (proto::KeyEventKind::Rotated as i32, key_id(&rotated))
    );
    eventually_on_b(&rotated.key, &["read"], VerifyCode::Revoked).await;
    assert_eq!(verify_on_b(&new.key, &["read"]).await, VerifyCode::Valid);

    admin
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id(&narrowed),
            actor: Some(proto::Actor {
                id: "user_admin".into(),
                permissions: vec!["admin".into(), "list".into()],
            }),
            scopes: vec!["list".into()],
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["scopes".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    // The rotation had no grace period: the sweeper announces its end with a second
    // ROTATED event for the old secret, whenever its next sweep comes (before or after
    // this update's event).
    let mut e = next(&mut stream).await;
    if e.kind == proto::KeyEventKind::Rotated as i32 && e.key_id == key_id(&rotated) {
        e = next(&mut stream).await;
    }
    assert_eq!(
        (e.kind, e.key_id.clone()),
        (proto::KeyEventKind::Updated as i32, key_id(&narrowed))
    );
    eventually_on_b(&narrowed.key, &["read"], VerifyCode::InsufficientScope).await;
    a.terminate().await;
    b.terminate().await;
}

/// KEK rotation as an operator does it: a server stores a provider key under KEK 1; the
/// configuration gains KEK 2; `keywarden kek rewrap` moves every data key to it; a server
/// configured with KEK 2 alone resolves the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rewrap_moves_every_provider_key_to_the_newest_kek() {
    use keywarden::proto::provider_key_service_client::ProviderKeyServiceClient;
    const KEY: &str = "sk-ant-api03-Rw8Lm2Vx9Kw4Rt1Yb6Cd3Fg8Hj5Sa0Zp";
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), Some(&db.url), ADMIN_TOKEN, VERIFIER_TOKEN);
    let base = std::fs::read_to_string(&config).unwrap();
    let resolver_sha = hex::encode(Sha256::digest(RESOLVER_TOKEN.as_bytes()));
    let kek = |version: u32, byte: u8| {
        use base64::Engine;
        format!(
            "\n[[keks]]\nversion = {version}\nkey_base64 = \"{}\"\n",
            base64::engine::general_purpose::STANDARD.encode([byte; 32])
        )
    };
    let write = |keks: &str| {
        std::fs::write(
            &config,
            format!(
                "{base}\n[[tokens]]\nname = \"router\"\nsha256 = \"{resolver_sha}\"\nroles = [\"provider-resolver\"]\n{keks}"
            ),
        )
        .unwrap();
    };

    write(&kek(1, 5));
    let mut server = Server::start(config_server(&config)).await;
    server.create_workspace(ADMIN_TOKEN, "ws_proc").await;
    ProviderKeyServiceClient::with_interceptor(server.channel().await, bearer(ADMIN_TOKEN))
        .put_provider_key(proto::PutProviderKeyRequest {
            workspace_id: "ws_proc".into(),
            provider: proto::Provider::Anthropic as i32,
            api_key: KEY.into(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    server.terminate().await;

    write(&format!("{}{}", kek(1, 5), kek(2, 6)));
    let mut rewrap = Process::spawn(keywarden(&[
        "kek".as_ref(),
        "rewrap".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]));
    let status = rewrap.wait().await;
    assert_exited_cleanly(status, &rewrap);
    assert!(
        rewrap
            .stdout()
            .contains("rewrapped 1 provider key(s) to KEK version 2"),
        "{}",
        rewrap.transcript()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM provider_keys WHERE kek_version = 2")
            .await,
        1
    );

    write(&kek(2, 6));
    let mut server = Server::start(config_server(&config)).await;
    let resolved =
        ProviderKeyServiceClient::with_interceptor(server.channel().await, bearer(RESOLVER_TOKEN))
            .resolve_provider_key(proto::ResolveProviderKeyRequest {
                workspace_id: "ws_proc".into(),
                provider: proto::Provider::Anthropic as i32,
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(resolved.api_key, KEY);
    server.terminate().await;
}
