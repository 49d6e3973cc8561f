//! Provider keys (BYOK) through real servers: masked everywhere but ResolveProviderKey,
//! roles, plans (SPARK refuses, PRO accepts, a downgrade goes back to managed access),
//! hostile input, no plaintext at rest, tampered and moved ciphertexts, KEK rotation with
//! an online rewrap while resolves run, and start-up refusing a missing or wrong KEK.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use keywarden::config::{KekMaterial, Settings};
use keywarden::proto::provider_key_service_client::ProviderKeyServiceClient;
use keywarden::proto::{self, Provider};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroizing;

type Client = ProviderKeyServiceClient<InterceptedService<Channel, Bearer>>;

const ANTHROPIC_KEY: &str = "sk-ant-api03-Zq8pV2xL9mK4nR7tW1yB6cD3fG5hJ0aS-Xw_Q";
const OPENAI_KEY: &str = "sk-proj-Hn4Tq9Lm2Vx7Pw1Rk6Bz3Cy8Fd5Gs0Ja";

fn client(channel: &Channel, token: &str) -> Client {
    ProviderKeyServiceClient::with_interceptor(channel.clone(), bearer(token))
}

fn admin(app: &TestApp) -> Client {
    client(&app.channel, ADMIN_TOKEN)
}

fn resolver(app: &TestApp) -> Client {
    client(&app.channel, RESOLVER_TOKEN)
}

fn put_req(ws: &str, provider: Provider, key: &str) -> proto::PutProviderKeyRequest {
    proto::PutProviderKeyRequest {
        workspace_id: ws.to_owned(),
        provider: provider as i32,
        api_key: key.to_owned(),
        actor: Some(actor()),
    }
}

async fn resolve(app: &TestApp, ws: &str, provider: Provider) -> Result<String, tonic::Status> {
    resolver(app)
        .resolve_provider_key(proto::ResolveProviderKeyRequest {
            workspace_id: ws.to_owned(),
            provider: provider as i32,
        })
        .await
        .map(|r| r.into_inner().api_key)
}

fn kek(version: u32, byte: u8) -> (u32, KekMaterial) {
    (version, KekMaterial::Raw(Zeroizing::new([byte; 32])))
}

fn with_keks(keks: Vec<(u32, KekMaterial)>) -> impl FnOnce(&mut Settings) {
    move |s| s.keks = keks
}

async fn set_plan(app: &TestApp, ws: &str, plan: proto::Plan) {
    proto::workspace_service_client::WorkspaceServiceClient::with_interceptor(
        app.channel.clone(),
        bearer(ADMIN_TOKEN),
    )
    .update_workspace(proto::UpdateWorkspaceRequest {
        workspace_id: ws.to_owned(),
        actor: Some(actor()),
        plan: plan as i32,
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["plan".into()],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Starts another server on the app's database with `keks` instead of the app's.
async fn restart_with(app: &mut TestApp, keks: Vec<(u32, KekMaterial)>) {
    app.server.take().unwrap().shutdown().await.unwrap();
    let mut settings = test_settings(&app.db);
    settings.keks = keks;
    let server = keywarden::server::start(&settings, app.clock.clone())
        .await
        .unwrap();
    app.channel = channel_to(&server).await;
    app.server = Some(server);
}

async fn stored_rows(app: &TestApp) -> i64 {
    app.db.count("SELECT count(*) FROM provider_keys").await
}

async fn keys_are_masked_everywhere_and_resolved_just_in_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let put = admin(&app)
        .put_provider_key(put_req("ws_test", Provider::Anthropic, ANTHROPIC_KEY))
        .await
        .unwrap()
        .into_inner()
        .provider_key
        .unwrap();
    assert_eq!(put.last_four, "Xw_Q");
    assert_eq!(put.kek_version, 1);
    assert!(!format!("{put:?}").contains(&ANTHROPIC_KEY[..12]));
    admin(&app)
        .put_provider_key(put_req("ws_test", Provider::Openai, OPENAI_KEY))
        .await
        .unwrap();
    let listed = admin(&app)
        .list_provider_keys(proto::ListProviderKeysRequest {
            workspace_id: "ws_test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .provider_keys;
    assert_eq!(listed.len(), 2);
    let got = admin(&app)
        .get_provider_key(proto::GetProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: Provider::Anthropic as i32,
        })
        .await
        .unwrap()
        .into_inner();
    for text in [format!("{listed:?}"), format!("{got:?}")] {
        assert!(!text.contains(&ANTHROPIC_KEY[8..]) && !text.contains(&OPENAI_KEY[8..]));
    }
    assert_eq!(
        resolve(&app, "ws_test", Provider::Anthropic).await.unwrap(),
        ANTHROPIC_KEY
    );
    assert_eq!(
        resolve(&app, "ws_test", Provider::Openai).await.unwrap(),
        OPENAI_KEY
    );

    // Replace to rotate: the new key resolves, created_at stays.
    app.clock.advance(std::time::Duration::from_secs(5));
    let replacement = "sk-ant-api03-NEWNEWNEWNEWNEWNEWNEW-abcd";
    let replaced = admin(&app)
        .put_provider_key(put_req("ws_test", Provider::Anthropic, replacement))
        .await
        .unwrap()
        .into_inner()
        .provider_key
        .unwrap();
    assert_eq!(replaced.created_at, put.created_at);
    assert!(replaced.updated_at.unwrap().seconds > put.updated_at.unwrap().seconds);
    assert_eq!(
        resolve(&app, "ws_test", Provider::Anthropic).await.unwrap(),
        replacement
    );
    assert_eq!(stored_rows(&app).await, 2);

    // Delete: back to managed access.
    admin(&app)
        .delete_provider_key(proto::DeleteProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: Provider::Anthropic as i32,
            actor: Some(actor()),
        })
        .await
        .unwrap();
    let gone = resolve(&app, "ws_test", Provider::Anthropic)
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // Every put, delete and resolve is audited, never with the secret.
    let events = app
        .admin()
        .list_audit_events(proto::ListAuditEventsRequest {
            workspace_id: "ws_test".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let count = |action: &str| events.iter().filter(|e| e.action == action).count();
    assert_eq!(count("provider_key.put"), 3);
    assert_eq!(count("provider_key.delete"), 1);
    assert_eq!(count("provider_key.resolve"), 3);
    let resolved = events
        .iter()
        .find(|e| e.action == "provider_key.resolve")
        .unwrap();
    assert_eq!(resolved.caller, "test-resolver");
    assert!(!format!("{events:?}").contains(&ANTHROPIC_KEY[8..]));
}

async fn each_role_calls_only_what_it_may(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    admin(&app)
        .put_provider_key(put_req("ws_test", Provider::Anthropic, ANTHROPIC_KEY))
        .await
        .unwrap();
    // The admin cannot resolve.
    let status = admin(&app)
        .resolve_provider_key(proto::ResolveProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: Provider::Anthropic as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // The verifier cannot put.
    let status = client(&app.channel, VERIFIER_TOKEN)
        .put_provider_key(put_req("ws_test", Provider::Openai, OPENAI_KEY))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // The resolver can call nothing else, here or in any other service.
    let mut r = resolver(&app);
    let denied = [
        r.put_provider_key(put_req("ws_test", Provider::Openai, OPENAI_KEY))
            .await
            .unwrap_err(),
        r.list_provider_keys(proto::ListProviderKeysRequest {
            workspace_id: "ws_test".into(),
        })
        .await
        .unwrap_err(),
        r.get_provider_key(proto::GetProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: Provider::Anthropic as i32,
        })
        .await
        .unwrap_err(),
        r.delete_provider_key(proto::DeleteProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: Provider::Anthropic as i32,
            actor: Some(actor()),
        })
        .await
        .unwrap_err(),
        r.rewrap_provider_keys(proto::RewrapProviderKeysRequest {
            actor: Some(actor()),
        })
        .await
        .unwrap_err(),
        app.admin_with(RESOLVER_TOKEN)
            .issue_key(issue_request("ws_test"))
            .await
            .unwrap_err(),
        app.verifier_with(RESOLVER_TOKEN)
            .verify_key(proto::VerifyKeyRequest::default())
            .await
            .unwrap_err(),
    ];
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    assert_eq!(stored_rows(&app).await, 1);
    // No token at all.
    let status = ProviderKeyServiceClient::new(app.channel.clone())
        .resolve_provider_key(proto::ResolveProviderKeyRequest {
            workspace_id: "ws_test".into(),
            provider: Provider::Anthropic as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// SPARK (the free tier) refuses BYOK, PRO accepts. A downgrade to SPARK keeps the key
/// sealed but resolves NOT_FOUND (managed access) at once; an upgrade brings it back.
async fn plans_decide_byok_and_a_downgrade_goes_back_to_managed_access(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.db.create_workspaces(&["ws_free"], "spark").await;
    let refused = admin(&app)
        .put_provider_key(put_req("ws_free", Provider::Anthropic, ANTHROPIC_KEY))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("SPARK") && refused.message().contains("BYOK"));
    assert_eq!(stored_rows(&app).await, 0);
    let missing = admin(&app)
        .put_provider_key(put_req("ws_nowhere", Provider::Anthropic, ANTHROPIC_KEY))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    admin(&app)
        .put_provider_key(put_req("ws_test", Provider::Anthropic, ANTHROPIC_KEY))
        .await
        .unwrap();
    set_plan(&app, "ws_test", proto::Plan::Spark).await;
    assert_eq!(
        resolve(&app, "ws_test", Provider::Anthropic)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(stored_rows(&app).await, 1, "kept, sealed");
    set_plan(&app, "ws_test", proto::Plan::Team).await;
    assert_eq!(
        resolve(&app, "ws_test", Provider::Anthropic).await.unwrap(),
        ANTHROPIC_KEY
    );
}

async fn hostile_input_is_refused_and_nothing_is_stored(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let huge = format!("sk-ant-{}", "a".repeat(5000));
    let cases: Vec<(proto::PutProviderKeyRequest, &[&str])> = vec![
        (put_req("ws_test", Provider::Anthropic, ""), &["api_key"]),
        (put_req("ws_test", Provider::Anthropic, &huge), &["api_key"]),
        (
            put_req(
                "ws_test",
                Provider::Anthropic,
                "sk-ant-api03-ÄÖÜäöü-abcdefghijkl",
            ),
            &["api_key"],
        ),
        (
            put_req("ws_test", Provider::Anthropic, OPENAI_KEY),
            &["api_key"],
        ),
        // OpenAI's prefix `sk-` is a prefix of Anthropic's: an Anthropic key pasted into
        // the OpenAI slot is refused too.
        (
            put_req("ws_test", Provider::Openai, ANTHROPIC_KEY),
            &["api_key"],
        ),
        (
            put_req(
                "ws_test",
                Provider::Openai,
                "pk-live-abcdefghijklmnopqrstuvwxyz",
            ),
            &["api_key"],
        ),
        (
            put_req("ws_test", Provider::Unspecified, ANTHROPIC_KEY),
            &["provider"],
        ),
        (
            put_req("ws test", Provider::Anthropic, ANTHROPIC_KEY),
            &["workspace_id"],
        ),
        (
            proto::PutProviderKeyRequest {
                actor: None,
                ..put_req("ws_test", Provider::Anthropic, ANTHROPIC_KEY)
            },
            &["actor"],
        ),
    ];
    for (req, fields) in cases {
        let status = admin(&app).put_provider_key(req.clone()).await.unwrap_err();
        assert_eq!(violated_fields(&status), fields, "{}", req.workspace_id);
        // The refusal never echoes the key.
        assert!(!status.message().contains("abcdefghijkl"), "{status:?}");
        assert!(!status.message().contains(&OPENAI_KEY[8..]), "{status:?}");
        assert!(
            !status.message().contains(&ANTHROPIC_KEY[8..]),
            "{status:?}"
        );
    }
    assert_eq!(stored_rows(&app).await, 0);
    let status = resolve(&app, "ws test", Provider::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["workspace_id", "provider"]);
}

/// After puts, no table holds the plaintext or any 8-character run of it.
async fn no_table_holds_the_key_or_any_part_of_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (ws, provider, key) in [
        ("ws_test", Provider::Anthropic, ANTHROPIC_KEY),
        ("ws_a", Provider::Openai, OPENAI_KEY),
    ] {
        admin(&app)
            .put_provider_key(put_req(ws, provider, key))
            .await
            .unwrap();
        assert_eq!(resolve(&app, ws, provider).await.unwrap(), key);
    }
    let dump = app.db.dump_text().await;
    for key in [ANTHROPIC_KEY, OPENAI_KEY] {
        let chars: Vec<char> = key.chars().collect();
        for run in chars.windows(8) {
            let run: String = run.iter().collect();
            assert!(
                !dump.contains(&run) && !dump.contains(&hex::encode(&run)),
                "`{run}` of a provider key is stored"
            );
        }
    }
}

/// A ciphertext or wrapped key changed by one bit fails with an error (never another
/// plaintext); a sealed record copied to another workspace's row does not open there.
async fn tampered_or_moved_secrets_never_open(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for ws in ["ws_test", "ws_a"] {
        admin(&app)
            .put_provider_key(put_req(ws, Provider::Anthropic, ANTHROPIC_KEY))
            .await
            .unwrap();
    }
    // Change one byte of each sealed part in turn (read, flip a bit, write back).
    for column in ["ciphertext", "wrapped_dek"] {
        let original = app
            .db
            .bytes(&format!(
                "SELECT {column} FROM provider_keys WHERE workspace_id = 'ws_test'"
            ))
            .await;
        let mut altered = original.clone();
        altered[20] ^= 0x01;
        app.db
            .set_bytes(
                &format!("UPDATE provider_keys SET {column} = $1 WHERE workspace_id = 'ws_test'"),
                &altered,
            )
            .await;
        let status = resolve(&app, "ws_test", Provider::Anthropic)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{column}: {status:?}");
        use tonic_types::StatusExt;
        assert_eq!(
            status.get_details_error_info().map(|i| i.reason),
            Some("INTERNAL_ERROR".to_owned())
        );
        assert!(!status.message().contains(&ANTHROPIC_KEY[8..]));
        app.db
            .set_bytes(
                &format!("UPDATE provider_keys SET {column} = $1 WHERE workspace_id = 'ws_test'"),
                &original,
            )
            .await;
        assert_eq!(
            resolve(&app, "ws_test", Provider::Anthropic).await.unwrap(),
            ANTHROPIC_KEY
        );
    }
    // ws_a's sealed secret moved into ws_test's row (its own record id kept).
    for column in ["ciphertext", "wrapped_dek"] {
        let theirs = app
            .db
            .bytes(&format!(
                "SELECT {column} FROM provider_keys WHERE workspace_id = 'ws_a'"
            ))
            .await;
        app.db
            .set_bytes(
                &format!("UPDATE provider_keys SET {column} = $1 WHERE workspace_id = 'ws_test'"),
                &theirs,
            )
            .await;
    }
    let status = resolve(&app, "ws_test", Provider::Anthropic)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
}

/// KEK 1 → configure 1 and 2 → rewrap online while resolves run: every resolve succeeds
/// with the right plaintext throughout; afterwards KEK 1 can leave the configuration.
async fn kek_rotation_rewraps_online_and_the_old_kek_can_go(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, with_keks(vec![kek(1, 11)])).await;
    let workspaces = ["ws_test", "ws_a", "ws_b", "ws_c", "ws_other", "ws_ok"];
    for ws in workspaces {
        for (provider, key) in [
            (Provider::Anthropic, ANTHROPIC_KEY),
            (Provider::Openai, OPENAI_KEY),
        ] {
            admin(&app)
                .put_provider_key(put_req(ws, provider, key))
                .await
                .unwrap();
        }
    }
    restart_with(&mut app, vec![kek(1, 11), kek(2, 22)]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let resolved = Arc::new(AtomicU64::new(0));
    let mut resolvers = Vec::new();
    for t in 0..4 {
        let (stop, resolved, mut r) = (stop.clone(), resolved.clone(), resolver(&app));
        resolvers.push(tokio::spawn(async move {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let ws = workspaces[i % workspaces.len()];
                let (provider, key) = if i % 2 == 0 {
                    (Provider::Anthropic, ANTHROPIC_KEY)
                } else {
                    (Provider::Openai, OPENAI_KEY)
                };
                let got = r
                    .resolve_provider_key(proto::ResolveProviderKeyRequest {
                        workspace_id: ws.into(),
                        provider: provider as i32,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .api_key;
                assert_eq!(got, key);
                resolved.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let before = resolved.load(Ordering::Relaxed);
    let rewrap = admin(&app)
        .rewrap_provider_keys(proto::RewrapProviderKeysRequest {
            actor: Some(actor()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rewrap.rewrapped, rewrap.kek_version), (12, 2));
    while resolved.load(Ordering::Relaxed) < before + 50 {
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    for r in resolvers {
        r.await.unwrap();
    }
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM provider_keys WHERE kek_version = 2")
            .await,
        12
    );
    // Nothing is left to rewrap.
    let again = admin(&app)
        .rewrap_provider_keys(proto::RewrapProviderKeysRequest {
            actor: Some(actor()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.rewrapped, 0);
    restart_with(&mut app, vec![kek(2, 22)]).await;
    for ws in workspaces {
        assert_eq!(
            resolve(&app, ws, Provider::Openai).await.unwrap(),
            OPENAI_KEY
        );
    }
}

/// Records wrapped by KEK 1 and a configuration without it, or with another key under
/// version 1: the server refuses to start, naming the version.
async fn start_refuses_a_missing_or_wrong_kek(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, with_keks(vec![kek(1, 11)])).await;
    admin(&app)
        .put_provider_key(put_req("ws_test", Provider::Anthropic, ANTHROPIC_KEY))
        .await
        .unwrap();
    app.server.take().unwrap().shutdown().await.unwrap();
    for (keks, expected) in [
        (vec![kek(2, 22)], "KEK version 1, which is not configured"),
        (vec![kek(1, 99)], "KEK version 1 is not the key"),
        (vec![], "KEK version 1, which is not configured"),
    ] {
        let mut settings = test_settings(&app.db);
        settings.keks = keks;
        let err = keywarden::server::start(&settings, app.clock.clone())
            .await
            .err()
            .expect("the server must refuse to start");
        assert!(err.to_string().contains(expected), "{err}");
    }
}

both_backends!(
    keys_are_masked_everywhere_and_resolved_just_in_time,
    each_role_calls_only_what_it_may,
    plans_decide_byok_and_a_downgrade_goes_back_to_managed_access,
    hostile_input_is_refused_and_nothing_is_stored,
    no_table_holds_the_key_or_any_part_of_it,
    tampered_or_moved_secrets_never_open,
    kek_rotation_rewraps_online_and_the_old_kek_can_go,
    start_refuses_a_missing_or_wrong_kek,
);
