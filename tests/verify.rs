//! VerifyKey: every answer code, scope implications, and the cache (hits without the
//! database, invalidation on every mutation, no stale fill after a revoke).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use keywarden::domain::key_format::{ApiKey, Brand, Environment};
use keywarden::proto::{self, VerifyCode};
use prost_types::FieldMask;

fn unknown_key() -> String {
    ApiKey::generate(&mut getrandom::SysRng, &Brand::default(), Environment::Live)
        .unwrap()
        .expose()
        .to_owned()
}

async fn a_valid_key_is_answered_with_its_identity(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app
        .issue_with(|r| {
            r.scopes = vec!["write".into()];
            r.expires_at = Some(ts_in(&app.clock, 3600));
            r.metadata.insert("app".into(), "chat".into());
        })
        .await;
    let info = issued.key_info.unwrap();
    let v = app.verify(&issued.key, &["write"]).await;
    assert!(v.valid);
    assert_eq!(code(&v), VerifyCode::Valid);
    assert_eq!(v.key_id, info.key_id);
    assert_eq!(v.workspace_id, "ws_test");
    assert_eq!(v.environment, proto::Environment::Live as i32);
    assert_eq!(v.scopes, ["write"]);
    assert_eq!(v.owner, Some(user("user_1")));
    assert_eq!(v.expires_at, info.expires_at);
    assert_eq!(v.metadata.get("app").map(String::as_str), Some("chat"));
}

async fn implied_scopes_satisfy_required_ones(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin_key = app
        .issue_with(|r| r.scopes = vec!["admin".into()])
        .await
        .key;
    assert!(
        app.verify(&admin_key, &["read", "write", "admin"])
            .await
            .valid
    );
    let read_key = app.issue().await.key;
    let v = app.verify(&read_key, &["read", "write"]).await;
    assert!(!v.valid);
    assert_eq!(code(&v), VerifyCode::InsufficientScope);
    assert_eq!(
        v.key_id.len(),
        28,
        "a found key is identified even when refused"
    );
}

async fn unknown_keys_are_not_found(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let v = app.verify(&unknown_key(), &[]).await;
    assert!(!v.valid);
    assert_eq!(code(&v), VerifyCode::NotFound);
    assert!(v.key_id.is_empty());
}

async fn malformed_keys_are_refused_without_touching_storage(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let good = app.issue().await.key;
    let mut typo = good.clone().into_bytes();
    typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    app.db.hide_key_tables().await;
    for bad in [
        typo.as_str(),
        "",
        "kw_live_short",
        "sk-ant-1234",
        &good.replace("kw_", "xx_"),
    ] {
        let v = app.verify(bad, &[]).await;
        assert_eq!(code(&v), VerifyCode::Malformed, "{bad:?}");
    }
    // Control: a well-formed key that is not cached does need the (now missing) tables.
    let err = app
        .verifier()
        .verify_key(proto::VerifyKeyRequest {
            key: unknown_key(),
            required_scopes: vec![],
            cost: 0,
            resource: String::new(),
            client_ip: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), tonic::Code::Internal | tonic::Code::Unavailable),
        "{err:?}"
    );
    assert!(
        !err.message().contains("kw_live_"),
        "errors never carry the key"
    );
}

async fn a_repeated_key_is_served_from_the_cache(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let key = app.issue().await.key;
    assert!(app.verify(&key, &["read"]).await.valid);
    app.db.hide_key_tables().await;
    for _ in 0..3 {
        assert!(
            app.verify(&key, &["read"]).await.valid,
            "answered without the database"
        );
    }
    assert_eq!(
        code(&app.verify(&key, &["write"]).await),
        VerifyCode::InsufficientScope
    );
}

async fn unknown_hashes_are_remembered_in_the_negative_cache(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let key = unknown_key();
    assert_eq!(code(&app.verify(&key, &[]).await), VerifyCode::NotFound);
    app.db.hide_key_tables().await;
    assert_eq!(code(&app.verify(&key, &[]).await), VerifyCode::NotFound);
}

async fn revoke_invalidates_the_cached_key_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    assert!(app.verify(&issued.key, &[]).await.valid);
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: issued.key_info.unwrap().key_id,
            actor: Some(actor()),
            reason: "compromised".into(),
        })
        .await
        .unwrap();
    let v = app.verify(&issued.key, &[]).await;
    assert!(!v.valid);
    assert_eq!(code(&v), VerifyCode::Revoked);
}

async fn a_scope_change_is_seen_by_the_next_verification(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    assert_eq!(
        code(&app.verify(&issued.key, &["write"]).await),
        VerifyCode::InsufficientScope
    );
    let update = |scopes: Vec<String>| proto::UpdateKeyRequest {
        key_id: issued.key_info.clone().unwrap().key_id,
        actor: Some(actor()),
        scopes,
        update_mask: Some(FieldMask {
            paths: vec!["scopes".into()],
        }),
        ..Default::default()
    };
    app.admin()
        .update_key(update(vec!["write".into()]))
        .await
        .unwrap();
    assert!(app.verify(&issued.key, &["write"]).await.valid);
    app.admin().update_key(update(vec![])).await.unwrap();
    assert_eq!(
        code(&app.verify(&issued.key, &["read"]).await),
        VerifyCode::InsufficientScope
    );
}

async fn an_expiry_change_is_seen_by_the_next_verification(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    assert!(app.verify(&issued.key, &[]).await.valid);
    app.admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: issued.key_info.unwrap().key_id,
            actor: Some(actor()),
            expires_at: Some(ts_in(&app.clock, 10)),
            update_mask: Some(FieldMask {
                paths: vec!["expires_at".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(app.verify(&issued.key, &[]).await.valid);
    app.clock.advance(std::time::Duration::from_secs(10));
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        VerifyCode::Expired
    );
}

async fn a_deleted_key_is_not_found_even_when_it_was_cached(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    assert!(app.verify(&issued.key, &[]).await.valid);
    app.admin()
        .delete_key(proto::DeleteKeyRequest {
            key_id: issued.key_info.unwrap().key_id,
            actor: Some(actor()),
        })
        .await
        .unwrap();
    let v = app.verify(&issued.key, &[]).await;
    assert_eq!(code(&v), VerifyCode::NotFound);
    assert!(v.key_id.is_empty());
}

/// Verifications race a revoke from many tasks: once RevokeKey has answered, no
/// verification may be valid again, whatever fills were in flight when it committed.
async fn no_verification_is_valid_after_a_revoke_returns(backend: Backend) {
    let app = Arc::new(TestApp::spawn(backend).await);
    for round in 0..5 {
        let issued = app.issue().await;
        let revoked = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (app, key, revoked) = (app.clone(), issued.key.clone(), revoked.clone());
            tasks.push(tokio::spawn(async move {
                let mut after = 0;
                while after < 20 {
                    let was_revoked = revoked.load(Ordering::SeqCst);
                    let v = app.verify(&key, &[]).await;
                    if was_revoked {
                        assert_eq!(code(&v), VerifyCode::Revoked, "round {round}: stale answer");
                        after += 1;
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        tokio::task::yield_now().await;
        app.admin()
            .revoke_key(proto::RevokeKeyRequest {
                key_id: issued.key_info.unwrap().key_id,
                actor: Some(actor()),
                reason: String::new(),
            })
            .await
            .unwrap();
        revoked.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
    }
}

both_backends!(
    a_valid_key_is_answered_with_its_identity,
    implied_scopes_satisfy_required_ones,
    unknown_keys_are_not_found,
    malformed_keys_are_refused_without_touching_storage,
    a_repeated_key_is_served_from_the_cache,
    unknown_hashes_are_remembered_in_the_negative_cache,
    revoke_invalidates_the_cached_key_at_once,
    a_scope_change_is_seen_by_the_next_verification,
    an_expiry_change_is_seen_by_the_next_verification,
    a_deleted_key_is_not_found_even_when_it_was_cached,
    no_verification_is_valid_after_a_revoke_returns,
);
