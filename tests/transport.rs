//! The gRPC port's transport, through real servers and real tonic clients: TLS (a client
//! must trust the server's CA; a plaintext client gets nothing), mutual TLS (a caller
//! without a certificate from the configured CA is turned away before any RPC), TLS
//! configuration errors refuse to start, the request size limit, client deadlines
//! honoured (a call past its deadline is abandoned and writes nothing), streams per
//! connection bounded, and HTTP/2 keep-alive (a peer that stops answering PINGs is
//! disconnected; one that answers stays).

mod common;

use std::time::Duration;

use common::*;
use keywarden::config::{Config, TlsSettings};
use keywarden::proto::{self, verify_service_client::VerifyServiceClient};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

/// A CA, and PEM pairs it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// (certificate, key) for `names`.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

async fn start_tls(
    db: &TestDb,
    server_ca: &Ca,
    client_ca: Option<&Ca>,
) -> keywarden::server::RunningServer {
    let mut settings = test_settings(db);
    let (cert, key) = server_ca.issue(&["localhost"]);
    settings.tls = Some(TlsSettings {
        cert_pem: cert.into_bytes(),
        key_pem: Zeroizing::new(key.into_bytes()),
        client_ca_pem: client_ca.map(|ca| ca.pem().into_bytes()),
    });
    keywarden::server::start(&settings, keywarden::clock::Clock::System)
        .await
        .unwrap()
}

/// A TLS channel to `localhost:port`, trusting `trust`, presenting `identity`.
async fn tls_channel(
    port: u16,
    trust: &Ca,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// A Ping through `channel` with the verifier token.
async fn ping(channel: Channel) -> Result<(), tonic::Status> {
    VerifyServiceClient::with_interceptor(channel, bearer(VERIFIER_TOKEN))
        .ping(proto::PingRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_its_ca_and_no_plaintext() {
    let db = TestDb::new(Backend::Sqlite).await;
    let ca = Ca::new("keywarden test CA");
    let server = start_tls(&db, &ca, None).await;
    let port = server.addr().port();

    let channel = tls_channel(port, &ca, None).await.unwrap();
    ping(channel).await.unwrap();

    // A client that trusts another CA does not get a connection.
    let stranger = Ca::new("someone else");
    assert!(tls_channel(port, &stranger, None).await.is_err());

    // Plaintext HTTP/2 to the TLS port: no call gets through.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(5));
    match plain.connect().await {
        Err(_) => {}
        Ok(channel) => assert!(ping(channel).await.is_err()),
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_turns_away_callers_without_a_certificate_from_the_ca() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let server = start_tls(&db, &server_ca, Some(&client_ca)).await;
    let port = server.addr().port();

    // A certificate from the client CA: served (the caller token is still required).
    let channel = tls_channel(port, &server_ca, Some(client_ca.issue(&["gateway"])))
        .await
        .unwrap();
    ping(channel.clone()).await.unwrap();
    let no_token = VerifyServiceClient::new(channel)
        .ping(proto::PingRequest::default())
        .await
        .unwrap_err();
    assert_eq!(no_token.code(), Code::Unauthenticated);

    // No certificate, or one from another CA: the handshake fails, no RPC runs.
    for identity in [None, Some(Ca::new("rogue CA").issue(&["gateway"]))] {
        match tls_channel(port, &server_ca, identity).await {
            Err(_) => {}
            Ok(channel) => assert!(ping(channel).await.is_err()),
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_misconfiguration_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, _) = ca.issue(&["localhost"]);
    let cert_file = dir.path().join("server.pem");
    std::fs::write(&cert_file, &cert).unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let config = |tls: &str| -> Result<keywarden::config::Settings, String> {
        let file = dir.path().join("keywarden.toml");
        std::fs::write(
            &file,
            format!("database_url = \"sqlite::memory:\"\n[tls]\n{tls}\n"),
        )
        .unwrap();
        Config::load(Some(&file))
            .map_err(|e| e.to_string())?
            .into_settings()
            .map_err(|e| e.to_string())
    };
    let cert = cert_file.display();
    let err = config(&format!("cert_file = \"{cert}\"")).unwrap_err();
    assert!(err.contains("cert_file and key_file go together"), "{err}");
    let err = config(&format!("client_ca_file = \"{cert}\"")).unwrap_err();
    assert!(err.contains("client_ca_file needs"), "{err}");
    let err = config(&format!(
        "cert_file = \"{cert}\"\nkey_file = \"{}\"",
        dir.path().join("missing.pem").display()
    ))
    .unwrap_err();
    assert!(err.contains("tls.key_file"), "{err}");
    // A key that does not parse: the configuration loads, the server does not start.
    let settings = config(&format!(
        "cert_file = \"{cert}\"\nkey_file = \"{}\"",
        garbage.display()
    ))
    .unwrap();
    assert!(
        !format!("{settings:?}").contains("not a key"),
        "key material in Debug output"
    );
    let refused = keywarden::server::start(&settings, keywarden::clock::Clock::System).await;
    assert!(refused.is_err());
}

async fn an_oversized_request_is_refused_before_it_is_decoded(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.transport.max_message_bytes = 64 * 1024).await;
    let status = app
        .verifier()
        .verify_key(proto::VerifyKeyRequest {
            key: "k".repeat(100 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // The connection is fine for the next call.
    let issued = app.issue().await;
    assert!(app.verify(&issued.key, &["read"]).await.valid);
}

both_backends!(an_oversized_request_is_refused_before_it_is_decoded);

/// A client deadline is honoured: an IssueKey stuck behind a lock is abandoned when its
/// deadline passes (DEADLINE_EXCEEDED or CANCELLED), and its transaction with it, so the
/// key it was writing never appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_is_abandoned_and_writes_nothing() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let before = app.db.count("SELECT count(*) FROM api_keys").await;
    // Hold a lock IssueKey needs, from a connection of our own.
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut request = tonic::Request::new(issue_request("ws_test"));
    request.set_timeout(Duration::from_millis(300));
    let status = app.admin().issue_key(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The client's timer and the server's both run from the call's start; the client's
    // may fire first. Give the server's time to fire too before the lock goes: a call the
    // server has not abandoned yet may still finish, as gRPC allows for a call that ends
    // at its deadline, and that is not what this test is about.
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.rollback().await.unwrap();
    // Nothing was written then, and nothing is written later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.db.count("SELECT count(*) FROM api_keys").await, before);
    // The server is fine.
    app.issue().await;
    pool.close().await;
}

/// `transport.max_concurrent_streams` bounds the calls one connection carries at once: with
/// a limit of one, an open WatchRevocations stream holds the connection's only stream, so
/// a Ping on the same connection waits (and runs out its deadline); once the stream ends,
/// the Ping goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_bounded() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.transport.max_concurrent_streams = Some(1)
    })
    .await;
    let channel = channel_to(app.server()).await;
    let mut stream = edge_client(channel.clone(), EDGE_TOKEN)
        .watch_revocations(proto::WatchRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // The stream is open (its first message, a heartbeat or reset, has arrived).
    stream.message().await.unwrap();
    let mut ping = tonic::Request::new(proto::PingRequest::default());
    ping.set_timeout(Duration::from_millis(500));
    let waited = VerifyServiceClient::with_interceptor(channel.clone(), bearer(VERIFIER_TOKEN))
        .ping(ping)
        .await
        .unwrap_err();
    assert!(
        matches!(waited.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{waited:?}"
    );
    drop(stream);
    ping_with_retry(channel).await;
}

/// A Ping that succeeds once the connection has a free stream again.
async fn ping_with_retry(channel: Channel) {
    for _ in 0..50 {
        if ping(channel.clone()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the connection never freed its stream");
}

/// An HTTP/2 peer spoken to over a raw socket, so a test can decide whether it answers
/// the server's PINGs, which every HTTP/2 library does on its own.
struct RawPeer {
    tcp: tokio::net::TcpStream,
}

/// HTTP/2 frame types and flags (RFC 9113, section 6).
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

impl RawPeer {
    /// Connects and sends the client preface and an empty SETTINGS frame.
    async fn connect(addr: std::net::SocketAddr) -> RawPeer {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut peer = RawPeer { tcp };
        peer.send(SETTINGS, 0, &[]).await;
        peer
    }

    async fn send(&mut self, kind: u8, flags: u8, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// The next frame's (type, flags, payload); `None` once the server has closed.
    async fn next(&mut self) -> Option<(u8, u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        self.tcp.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.tcp.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], payload))
    }
}

/// A server that PINGs an idle connection every 200 ms and gives a PING 200 ms to be
/// answered.
async fn pinging_app() -> TestApp {
    TestApp::spawn_with(Backend::Sqlite, |s| {
        s.transport.http2_keepalive_interval = Some(Duration::from_millis(200));
        s.transport.http2_keepalive_timeout = Some(Duration::from_millis(200));
    })
    .await
}

/// `transport.http2_keepalive_*`, a peer that stops answering: the server PINGs the idle
/// connection and, with no answer within the timeout, closes it, so a vanished edge node
/// does not hold its stream and its memory for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_answer_pings_is_disconnected() {
    let app = pinging_app().await;
    let mut peer = RawPeer::connect(app.server().addr()).await;
    let mut pings = 0;
    // Generous bound: the close is expected within about half a second.
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some((kind, flags, _)) = peer.next().await {
            if kind == PING && flags & ACK == 0 {
                pings += 1;
            }
        }
    })
    .await
    .expect("the server kept a peer that never answered its PINGs");
    assert!(pings >= 1, "closed without pinging first");
}

/// The same server keeps a peer that answers its PINGs, idle as it is: the close above
/// is the keep-alive's doing, not an idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_pings_stays_connected() {
    let app = pinging_app().await;
    let mut peer = RawPeer::connect(app.server().addr()).await;
    let mut pings = 0;
    // Five PINGs answered means the connection outlived interval + timeout five times.
    while pings < 5 {
        let (kind, flags, payload) = tokio::time::timeout(Duration::from_secs(30), peer.next())
            .await
            .expect("no frame from the server")
            .expect("the server closed a connection whose peer answered every PING");
        match (kind, flags & ACK) {
            (SETTINGS, 0) => peer.send(SETTINGS, ACK, &[]).await,
            (PING, 0) => {
                pings += 1;
                peer.send(PING, ACK, &payload).await;
            }
            _ => {}
        }
    }
}
