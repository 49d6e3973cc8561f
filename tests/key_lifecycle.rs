//! The key lifecycle through a real server: issue, get, list, update, rotate, revoke,
//! delete, on both stores.

mod common;

use std::time::Duration;

use common::*;
use keywarden::proto::{self, KeyStatus, VerifyCode};
use prost_types::FieldMask;

async fn issue_returns_the_plaintext_once_and_a_masked_record(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app
        .issue_with(|r| {
            r.metadata.insert("team".into(), "ml".into());
            r.scopes = vec!["write".into(), "read".into()];
        })
        .await;
    assert!(issued.key.starts_with("kw_live_"), "{}", issued.key);
    let info = issued.key_info.unwrap();
    assert!(info.key_id.starts_with("key_"));
    assert_eq!(info.workspace_id, "ws_test");
    assert_eq!(info.name, "ci key");
    assert_eq!(info.environment, proto::Environment::Live as i32);
    assert_eq!(
        info.display,
        format!("kw_live_...{}", &issued.key[issued.key.len() - 4..])
    );
    assert_eq!(info.scopes, ["read", "write"]);
    assert_eq!(info.status, KeyStatus::Active as i32);
    assert_eq!(info.owner, Some(user("user_1")));
    assert_eq!(info.created_by, "user_admin");
    assert_eq!(info.metadata.get("team").map(String::as_str), Some("ml"));
    assert!(info.created_at.is_some() && info.expires_at.is_none() && info.revoked_at.is_none());

    let got = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: info.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(got, info);
    // Nothing a later read returns holds the key.
    assert!(!format!("{got:?}").contains(&issued.key[8..40]));
}

async fn test_keys_carry_their_environment(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app
        .issue_with(|r| r.environment = proto::Environment::Test as i32)
        .await;
    assert!(issued.key.starts_with("kw_test_"));
    let v = app.verify(&issued.key, &[]).await;
    assert!(v.valid);
    assert_eq!(v.environment, proto::Environment::Test as i32);
}

async fn get_of_an_unknown_key_is_not_found(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let err = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: "key_000000000000000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

async fn list_pages_newest_first_and_is_stable_under_concurrent_inserts(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(app.issue().await.key_info.unwrap().key_id);
        app.clock.advance(Duration::from_millis(1));
    }
    // Another workspace's keys never show.
    app.issue_with(|r| r.workspace_id = "ws_other".into()).await;
    ids.reverse();

    let mut admin = app.admin();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_keys(proto::ListKeysRequest {
                workspace_id: "ws_test".into(),
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.keys.iter().map(|k| k.key_id.clone()));
        // A key issued while paging must neither shift nor duplicate what follows.
        app.issue().await;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);
}

async fn list_filters_by_owner_and_status(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mine = app
        .issue_with(|r| r.owner = Some(user("alice")))
        .await
        .key_info
        .unwrap();
    let revoked = app
        .issue_with(|r| r.owner = Some(user("alice")))
        .await
        .key_info
        .unwrap();
    let expiring = app
        .issue_with(|r| r.expires_at = Some(ts_in(&app.clock, 60)))
        .await
        .key_info
        .unwrap();
    let theirs = app
        .issue_with(|r| r.owner = Some(user("bob")))
        .await
        .key_info
        .unwrap();
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: revoked.key_id.clone(),
            actor: Some(actor()),
            reason: "test".into(),
        })
        .await
        .unwrap();
    app.clock.advance(Duration::from_secs(61));

    let list = |owner: Option<proto::Owner>, status: KeyStatus| {
        app.listed_key_ids(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            owner,
            status: status as i32,
            ..Default::default()
        })
    };
    let sorted = |mut v: Vec<&str>| {
        v.sort();
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(
        list(Some(user("alice")), KeyStatus::Unspecified).await,
        sorted(vec![&mine.key_id, &revoked.key_id])
    );
    assert_eq!(
        list(None, KeyStatus::Active).await,
        sorted(vec![&mine.key_id, &theirs.key_id])
    );
    assert_eq!(
        list(None, KeyStatus::Revoked).await,
        sorted(vec![&revoked.key_id])
    );
    assert_eq!(
        list(None, KeyStatus::Expired).await,
        sorted(vec![&expiring.key_id])
    );
}

async fn update_changes_only_the_masked_fields(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app
        .issue_with(|r| {
            r.metadata.insert("a".into(), "1".into());
            r.expires_at = Some(ts_in(&app.clock, 3600));
        })
        .await;
    let key_id = issued.key_info.unwrap().key_id;
    let updated = app
        .admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor()),
            name: "renamed".into(),
            scopes: vec!["write".into()],
            // Not in the mask: must stay.
            metadata: Default::default(),
            expires_at: None,
            update_mask: Some(FieldMask {
                paths: vec!["name".into(), "scopes".into(), "expires_at".into()],
            }),
            // Not in the mask either.
            rate_limits: Vec::new(),
            max_budget_micros: Some(5),
            resource_access: None,
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            budget_period: proto::BudgetPeriod::Monthly as i32,
            budget_period_days: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.scopes, ["write"]);
    assert_eq!(
        updated.expires_at, None,
        "expires_at in the mask and unset removes the expiry"
    );
    assert_eq!(updated.metadata.get("a").map(String::as_str), Some("1"));
    let v = app.verify(&issued.key, &["write"]).await;
    assert!(v.valid, "{v:?}");
}

async fn rotate_without_grace_stops_the_old_secret_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let info = issued.key_info.unwrap();
    assert!(app.verify(&issued.key, &[]).await.valid);
    let rotated = app
        .admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: info.key_id.clone(),
            actor: Some(actor()),
            grace_period: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.key, issued.key);
    let new_info = rotated.key_info.unwrap();
    assert_eq!(new_info.key_id, info.key_id);
    assert_eq!(
        new_info.display,
        format!("kw_live_...{}", &rotated.key[rotated.key.len() - 4..])
    );
    assert!(new_info.rotated_at.is_some());
    let old = app.verify(&issued.key, &[]).await;
    assert_eq!(code(&old), VerifyCode::Revoked);
    let new = app.verify(&rotated.key, &[]).await;
    assert!(new.valid);
    assert_eq!(new.key_id, info.key_id);
}

async fn rotate_with_grace_keeps_the_old_secret_until_the_grace_ends(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let key_id = issued.key_info.unwrap().key_id;
    assert!(app.verify(&issued.key, &[]).await.valid);
    let rotated = app
        .admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id,
            actor: Some(actor()),
            grace_period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.old_key_valid_until, Some(ts_in(&app.clock, 3600)));
    app.clock.advance(Duration::from_secs(3599));
    assert!(app.verify(&issued.key, &[]).await.valid);
    assert!(app.verify(&rotated.key, &[]).await.valid);
    app.clock.advance(Duration::from_secs(1));
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        VerifyCode::Revoked
    );
    assert!(app.verify(&rotated.key, &[]).await.valid);
}

async fn rotation_grace_never_outlives_the_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app
        .issue_with(|r| r.expires_at = Some(ts_in(&app.clock, 600)))
        .await;
    let rotated = app
        .admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: issued.key_info.unwrap().key_id,
            actor: Some(actor()),
            grace_period: Some(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.old_key_valid_until, Some(ts_in(&app.clock, 600)));
    app.clock.advance(Duration::from_secs(600));
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        VerifyCode::Revoked
    );
    assert_eq!(
        code(&app.verify(&rotated.key, &[]).await),
        VerifyCode::Expired
    );
}

async fn rotating_a_revoked_or_expired_key_is_refused_and_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let revoked = app.issue().await.key_info.unwrap().key_id;
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: revoked.clone(),
            actor: Some(actor()),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    let expired = app
        .issue_with(|r| r.expires_at = Some(ts_in(&app.clock, 5)))
        .await;
    app.clock.advance(Duration::from_secs(5));
    let audit_before = app.audit("ws_test").await.len();
    for (key_id, why) in [
        (revoked, "revoked"),
        (expired.key_info.unwrap().key_id, "expired"),
    ] {
        let err = app
            .admin()
            .rotate_key(proto::RotateKeyRequest {
                key_id,
                actor: Some(actor()),
                grace_period: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains(why), "{}", err.message());
    }
    assert_eq!(app.audit("ws_test").await.len(), audit_before);
    assert_eq!(app.db.count("SELECT COUNT(*) FROM key_secrets").await, 2);
}

async fn revoke_is_immediate_and_idempotent(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let key_id = issued.key_info.unwrap().key_id;
    assert!(app.verify(&issued.key, &[]).await.valid);
    let revoke = proto::RevokeKeyRequest {
        key_id: key_id.clone(),
        actor: Some(actor()),
        reason: "leaked in a public repo".into(),
    };
    let first = app
        .admin()
        .revoke_key(revoke.clone())
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(first.status, KeyStatus::Revoked as i32);
    assert_eq!(first.revoke_reason, "leaked in a public repo");
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        VerifyCode::Revoked
    );
    app.clock.advance(Duration::from_secs(10));
    let second = app
        .admin()
        .revoke_key(revoke)
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(
        second.revoked_at, first.revoked_at,
        "a second revoke changes nothing"
    );
}

async fn delete_hides_the_key_for_good_but_keeps_its_audit_trail(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let key_id = issued.key_info.unwrap().key_id;
    assert!(app.verify(&issued.key, &[]).await.valid);
    app.admin()
        .delete_key(proto::DeleteKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        VerifyCode::NotFound
    );
    let mut admin = app.admin();
    let err = admin
        .get_key(proto::GetKeyRequest {
            key_id: key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let listed = admin
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.keys.is_empty());
    let again = admin
        .delete_key(proto::DeleteKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    let actions: Vec<_> = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.key_id == key_id)
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["key.delete", "key.issue"]);
}

async fn expiry_turns_a_key_expired(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app
        .issue_with(|r| r.expires_at = Some(ts_in(&app.clock, 30)))
        .await;
    assert!(app.verify(&issued.key, &[]).await.valid);
    app.clock.advance(Duration::from_secs(30));
    assert_eq!(
        code(&app.verify(&issued.key, &[]).await),
        VerifyCode::Expired
    );
    let info = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: issued.key_info.unwrap().key_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(info.status, KeyStatus::Expired as i32);
}

both_backends!(
    issue_returns_the_plaintext_once_and_a_masked_record,
    test_keys_carry_their_environment,
    get_of_an_unknown_key_is_not_found,
    list_pages_newest_first_and_is_stable_under_concurrent_inserts,
    list_filters_by_owner_and_status,
    update_changes_only_the_masked_fields,
    rotate_without_grace_stops_the_old_secret_at_once,
    rotate_with_grace_keeps_the_old_secret_until_the_grace_ends,
    rotation_grace_never_outlives_the_key,
    rotating_a_revoked_or_expired_key_is_refused_and_changes_nothing,
    revoke_is_immediate_and_idempotent,
    delete_hides_the_key_for_good_but_keeps_its_audit_trail,
    expiry_turns_a_key_expired,
);
