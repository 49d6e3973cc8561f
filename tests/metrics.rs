//! The Prometheus endpoint of a real server: VerifyKey answers by code, per-RPC latency
//! histograms, cache lookups and size, rate-limit decisions, stream subscribers and
//! events, pool figures; served on its own port; and no key, key id or token in any of it.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use keywarden::domain::key_format::{ApiKey, Brand, Environment};
use keywarden::domain::limits::{LimitUnit, LimitWindow, RateLimit};
use keywarden::proto::{self, VerifyCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` over a plain TCP connection, as Prometheus scrapes: (status line, body).
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

async fn scrape(app: &TestApp) -> String {
    let addr = app.server().metrics_addr().expect("metrics are on");
    let (status, body) = get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    body
}

/// The value of the sample `name{labels}` (exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn spawn_with_metrics(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        s.default_limits = Arc::new(vec![RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit: 2,
        }]);
    })
    .await
}

async fn verifications_caches_limits_and_rpcs_are_counted(backend: Backend) {
    let app = spawn_with_metrics(backend).await;
    let issued = app.issue().await;
    let revoked = app.issue().await;
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: revoked.key_info.as_ref().unwrap().key_id.clone(),
            actor: Some(actor()),
            reason: "test".into(),
        })
        .await
        .unwrap();
    // The tailer has applied the revoke (seq 1) before the revoked key is verified: its
    // invalidation, arriving after that verification's fill, would otherwise drop the
    // entry, and the cache would hold one key instead of two.
    wait_published(app.server(), 1).await;
    // Valid twice (a miss, then a hit), then over the limit of 2 a minute.
    for want in [
        VerifyCode::Valid,
        VerifyCode::Valid,
        VerifyCode::RateLimited,
    ] {
        assert_eq!(code(&app.verify(&issued.key, &["read"]).await), want);
    }
    assert_eq!(
        code(&app.verify(&revoked.key, &["read"]).await),
        VerifyCode::Revoked
    );
    assert_eq!(
        code(&app.verify("kw_live_nope", &[]).await),
        VerifyCode::Malformed
    );
    // Well-formed, never issued.
    let unknown = ApiKey::generate(
        &mut getrandom::SysRng,
        &Brand::parse("kw").unwrap(),
        Environment::Live,
    )
    .unwrap()
    .expose()
    .to_owned();
    assert_eq!(code(&app.verify(&unknown, &[]).await), VerifyCode::NotFound);

    let text = scrape(&app).await;
    assert_eq!(
        sample(&text, r#"keywarden_verify_total{code="valid"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"keywarden_verify_total{code="rate_limited"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"keywarden_verify_total{code="revoked"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"keywarden_verify_total{code="malformed"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"keywarden_verify_total{code="not_found"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"keywarden_verify_total{code="expired"}"#),
        Some(0.0)
    );
    // The issued key: a miss, then two hits; the revoked one: a miss.
    assert_eq!(
        sample(
            &text,
            r#"keywarden_verify_cache_lookups_total{result="hit"}"#
        ),
        Some(2.0)
    );
    assert!(
        sample(
            &text,
            r#"keywarden_verify_cache_lookups_total{result="miss"}"#
        )
        .unwrap()
            >= 2.0
    );
    assert!(sample(&text, "keywarden_verify_cache_entries").unwrap() >= 2.0);
    assert_eq!(
        sample(
            &text,
            r#"keywarden_ratelimit_decisions_total{outcome="allowed"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"keywarden_ratelimit_decisions_total{outcome="limited"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "keywarden_ratelimit_backend_failures_total"),
        Some(0.0)
    );
    // Six VerifyKey calls, each timed under its own method.
    assert_eq!(
        sample(
            &text,
            r#"keywarden_rpc_duration_seconds_count{method="/keywarden.v1.VerifyService/VerifyKey"}"#
        ),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"keywarden_rpc_duration_seconds_count{method="/keywarden.v1.KeyService/IssueKey"}"#
        ),
        Some(2.0)
    );
    assert!(text.contains(r#"keywarden_rpc_duration_seconds_bucket{method="/keywarden.v1.VerifyService/VerifyKey",le="0.001"}"#));
    // Pool figures are there, and sane.
    let max = sample(&text, r#"keywarden_db_pool_connections{state="max"}"#).unwrap();
    assert!(max >= 1.0, "{text}");
    assert!(sample(&text, r#"keywarden_db_pool_connections{state="idle"}"#).unwrap() <= max);
    // Help text is rendered.
    assert!(text.contains("# HELP keywarden_verify_total"));

    // Nothing secret, and no key id, anywhere in the exposition.
    for secret in [
        issued.key.as_str(),
        revoked.key.as_str(),
        unknown.as_str(),
        ADMIN_TOKEN,
        VERIFIER_TOKEN,
        issued.key_info.as_ref().unwrap().key_id.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret} leaked into metrics");
    }
    // A method the server does not route is counted as `other`, not as a new label.
    assert!(!text.contains("NoSuchMethod"));
}

async fn streams_and_events_are_counted(backend: Backend) {
    let app = spawn_with_metrics(backend).await;
    let issued = app.issue().await;
    let mut stream = app
        .edge()
        .watch_revocations(proto::WatchRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sample(&scrape(&app).await, "keywarden_stream_subscribers"),
        Some(1.0)
    );
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: issued.key_info.as_ref().unwrap().key_id.clone(),
            actor: Some(actor()),
            reason: "test".into(),
        })
        .await
        .unwrap();
    // The stream gets the event (heartbeats aside), so it has been published.
    loop {
        let message = stream.message().await.unwrap().unwrap();
        if matches!(
            message.message,
            Some(proto::watch_revocations_response::Message::Event(_))
        ) {
            break;
        }
    }
    let text = scrape(&app).await;
    assert_eq!(
        sample(&text, "keywarden_events_published_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "keywarden_event_lag_seconds_count"),
        Some(1.0)
    );
    assert!(sample(&text, "keywarden_event_log_head").unwrap() >= 1.0);
    drop(stream);
}

async fn only_the_metrics_path_is_served_and_off_means_no_port(backend: Backend) {
    let app = spawn_with_metrics(backend).await;
    let addr = app.server().metrics_addr().unwrap();
    let (status, _) = get(addr, "/").await;
    assert!(status.contains("404"), "{status}");
    let (status, _) = get(addr, "/metrics/../admin").await;
    assert!(status.contains("404"), "{status}");

    let off = TestApp::spawn(backend).await;
    assert_eq!(off.server().metrics_addr(), None);
}

both_backends!(
    verifications_caches_limits_and_rpcs_are_counted,
    streams_and_events_are_counted,
    only_the_metrics_path_is_served_and_off_means_no_port,
);
