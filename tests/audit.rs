//! The audit log through the gRPC API (ListAuditEvents), on both stores: every mutation
//! writes one event saying who did what to which key and when; reads and refusals write
//! none; the log pages newest first and never holds a plaintext key.

mod common;

use std::time::Duration;

use common::*;
use keywarden::domain::key_format::KeyHash;
use keywarden::proto::{self, AuditOutcome};
use prost_types::FieldMask;

const CALLER: &str = "test-admin";

fn actor_named(id: &str) -> proto::Actor {
    proto::Actor {
        id: id.to_owned(),
        permissions: vec!["admin".to_owned()],
    }
}

/// The manual clock's current time, as the API renders it.
fn now_ts(app: &TestApp) -> prost_types::Timestamp {
    ts_in(&app.clock, 0)
}

async fn audit_page(
    app: &TestApp,
    workspace_id: &str,
    page_size: i32,
    page_token: String,
) -> proto::ListAuditEventsResponse {
    app.admin()
        .list_audit_events(proto::ListAuditEventsRequest {
            workspace_id: workspace_id.to_owned(),
            page_size,
            page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn audit_rows(app: &TestApp) -> i64 {
    app.db.count("SELECT COUNT(*) FROM audit_events").await
}

async fn revoke(app: &TestApp, key_id: &str) {
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
            reason: "test".into(),
        })
        .await
        .unwrap();
}

/// After a mutation: exactly one new event, at the head, as expected; the rest unchanged.
fn assert_one_new_event(
    before: &[proto::AuditEvent],
    after: &[proto::AuditEvent],
    expected: &proto::AuditEvent,
) {
    assert_eq!(after.len(), before.len() + 1, "{after:#?}");
    assert_eq!(&after[1..], before, "older events are unchanged");
    let mut got = after[0].clone();
    // The id and detail are the store's to choose; everything else is fixed.
    assert!(before.first().is_none_or(|b| got.id > b.id));
    got.id = expected.id;
    got.detail = expected.detail.clone();
    assert_eq!(&got, expected);
}

async fn every_mutation_writes_one_success_event_with_who_what_which_and_when(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut admin = app.admin();
    let expected_event =
        |app: &TestApp, actor: &str, action: &str, key_id: &str| proto::AuditEvent {
            id: 0,
            workspace_id: "ws_test".into(),
            actor_id: actor.into(),
            caller: CALLER.into(),
            action: action.into(),
            key_id: key_id.into(),
            outcome: AuditOutcome::Success as i32,
            detail: String::new(),
            occurred_at: Some(now_ts(app)),
        };
    // Each step at its own instant, with sub-second parts, so a wrong time shows.
    let step = Duration::from_micros(7_000_123);

    app.clock.advance(step);
    let before = app.audit("ws_test").await;
    assert!(before.is_empty());
    let key_id = app
        .issue_with(|r| r.actor = Some(actor_named("user_issuer")))
        .await
        .key_info
        .unwrap()
        .key_id;
    let after = app.audit("ws_test").await;
    assert_one_new_event(
        &before,
        &after,
        &expected_event(&app, "user_issuer", "key.issue", &key_id),
    );

    app.clock.advance(step);
    let before = after;
    admin
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor_named("user_updater")),
            name: "renamed".into(),
            update_mask: Some(FieldMask {
                paths: vec!["name".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let after = app.audit("ws_test").await;
    assert_one_new_event(
        &before,
        &after,
        &expected_event(&app, "user_updater", "key.update", &key_id),
    );

    app.clock.advance(step);
    let before = after;
    admin
        .rotate_key(proto::RotateKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor_named("user_rotator")),
            grace_period: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await
        .unwrap();
    let after = app.audit("ws_test").await;
    assert_one_new_event(
        &before,
        &after,
        &expected_event(&app, "user_rotator", "key.rotate", &key_id),
    );

    app.clock.advance(step);
    let before = after;
    admin
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor_named("user_revoker")),
            reason: "leaked".into(),
        })
        .await
        .unwrap();
    let after = app.audit("ws_test").await;
    assert_one_new_event(
        &before,
        &after,
        &expected_event(&app, "user_revoker", "key.revoke", &key_id),
    );

    app.clock.advance(step);
    let before = after;
    admin
        .delete_key(proto::DeleteKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor_named("user_deleter")),
        })
        .await
        .unwrap();
    let after = app.audit("ws_test").await;
    assert_one_new_event(
        &before,
        &after,
        &expected_event(&app, "user_deleter", "key.delete", &key_id),
    );

    let actions: Vec<&str> = after.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "key.delete",
            "key.revoke",
            "key.rotate",
            "key.update",
            "key.issue"
        ]
    );
    assert_eq!(audit_rows(&app).await, 5);
}

async fn events_list_newest_first_and_pages_walk_each_event_exactly_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut key_ids = Vec::new();
    for _ in 0..4 {
        key_ids.push(app.issue().await.key_info.unwrap().key_id);
        // Another workspace's events interleave, so this one's ids have gaps.
        app.issue_with(|r| r.workspace_id = "ws_other".into()).await;
        app.clock.advance(Duration::from_secs(1));
    }
    for key_id in &key_ids[..3] {
        revoke(&app, key_id).await;
        app.clock.advance(Duration::from_secs(1));
    }

    let all = app.audit("ws_test").await;
    assert_eq!(all.len(), 7);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(
        all.windows(2).all(|w| {
            let at = |e: &proto::AuditEvent| e.occurred_at.map(|t| (t.seconds, t.nanos));
            at(&w[0]) > at(&w[1])
        }),
        "newest first"
    );
    let order: Vec<(&str, &str)> = all
        .iter()
        .map(|e| (e.action.as_str(), e.key_id.as_str()))
        .collect();
    let expected: Vec<(&str, &str)> = key_ids[..3]
        .iter()
        .rev()
        .map(|k| ("key.revoke", k.as_str()))
        .chain(key_ids.iter().rev().map(|k| ("key.issue", k.as_str())))
        .collect();
    assert_eq!(order, expected);

    for page_size in [1, 2, 3, 6, 7, 8] {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = audit_page(&app, "ws_test", page_size, token).await;
            pages += 1;
            assert!(page.events.len() <= page_size as usize);
            seen.extend(page.events);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
            assert!(pages < 20, "paging does not end");
        }
        assert_eq!(seen, all, "page size {page_size}");
        assert_eq!(
            pages,
            7usize.div_ceil(page_size as usize),
            "page size {page_size}: the last page has an empty token"
        );
    }
}

async fn audit_events_are_isolated_by_workspace(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let a1 = app.issue_with(|r| r.workspace_id = "ws_a".into()).await;
    let a2 = app.issue_with(|r| r.workspace_id = "ws_a".into()).await;
    let b1 = app.issue_with(|r| r.workspace_id = "ws_b".into()).await;
    revoke(&app, &a2.key_info.as_ref().unwrap().key_id).await;
    app.admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: b1.key_info.as_ref().unwrap().key_id.clone(),
            actor: Some(actor()),
            grace_period: None,
        })
        .await
        .unwrap();

    let key_ids = |events: &[proto::AuditEvent]| {
        let mut v: Vec<String> = events.iter().map(|e| e.key_id.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let a = app.audit("ws_a").await;
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|e| e.workspace_id == "ws_a"));
    let mut expected_a = vec![a1.key_info.unwrap().key_id, a2.key_info.unwrap().key_id];
    expected_a.sort();
    assert_eq!(key_ids(&a), expected_a);

    let b = app.audit("ws_b").await;
    assert_eq!(b.len(), 2);
    assert!(b.iter().all(|e| e.workspace_id == "ws_b"));
    assert_eq!(key_ids(&b), [b1.key_info.unwrap().key_id]);

    assert!(app.audit("ws_c").await.is_empty());
}

async fn reads_write_no_audit_event(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let key_id = issued.key_info.unwrap().key_id;
    let deleted = app.issue().await;
    app.admin()
        .delete_key(proto::DeleteKeyRequest {
            key_id: deleted.key_info.unwrap().key_id,
            actor: Some(actor()),
        })
        .await
        .unwrap();
    let before = app.audit("ws_test").await;
    let rows = audit_rows(&app).await;
    assert_eq!(before.len(), 3);
    assert_eq!(rows, 3);

    let mut admin = app.admin();
    admin
        .get_key(proto::GetKeyRequest {
            key_id: key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let missing = admin
        .get_key(proto::GetKeyRequest {
            key_id: "key_000000000000000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    admin
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            owner: Some(user("user_1")),
            status: proto::KeyStatus::Active as i32,
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    // Verifications that pass, lack a scope, hit a deleted key or a malformed one.
    assert!(app.verify(&issued.key, &["read"]).await.valid);
    assert!(!app.verify(&issued.key, &["admin"]).await.valid);
    assert!(!app.verify(&deleted.key, &[]).await.valid);
    assert!(!app.verify("kw_live_not-a-key", &[]).await.valid);
    audit_page(&app, "ws_test", 10, String::new()).await;

    assert_eq!(app.audit("ws_test").await, before);
    assert_eq!(audit_rows(&app).await, rows);
}

async fn refused_mutations_write_no_audit_event(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let revoked = app.issue().await.key_info.unwrap().key_id;
    revoke(&app, &revoked).await;
    let deleted = app.issue().await.key_info.unwrap().key_id;
    app.admin()
        .delete_key(proto::DeleteKeyRequest {
            key_id: deleted.clone(),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    let live = app.issue().await.key_info.unwrap().key_id;
    let unknown = "key_000000000000000000000000".to_owned();

    let before = app.audit("ws_test").await;
    let rows = audit_rows(&app).await;
    let secrets = app.db.count("SELECT COUNT(*) FROM key_secrets").await;
    assert_eq!(before.len(), 5);

    let mut admin = app.admin();
    let rotate = |key_id: &str| proto::RotateKeyRequest {
        key_id: key_id.to_owned(),
        actor: Some(actor()),
        grace_period: None,
    };
    let revoke_req = |key_id: &str| proto::RevokeKeyRequest {
        key_id: key_id.to_owned(),
        actor: Some(actor()),
        reason: "r".into(),
    };
    let update = |key_id: &str| proto::UpdateKeyRequest {
        key_id: key_id.to_owned(),
        actor: Some(actor()),
        name: "renamed".into(),
        update_mask: Some(FieldMask {
            paths: vec!["name".into()],
        }),
        ..Default::default()
    };
    let delete = |key_id: &str| proto::DeleteKeyRequest {
        key_id: key_id.to_owned(),
        actor: Some(actor()),
    };

    let refusals = [
        (
            "rotate revoked",
            admin.rotate_key(rotate(&revoked)).await.map(|_| ()),
            tonic::Code::FailedPrecondition,
        ),
        (
            "revoke unknown",
            admin.revoke_key(revoke_req(&unknown)).await.map(|_| ()),
            tonic::Code::NotFound,
        ),
        (
            "rotate unknown",
            admin.rotate_key(rotate(&unknown)).await.map(|_| ()),
            tonic::Code::NotFound,
        ),
        (
            "update unknown",
            admin.update_key(update(&unknown)).await.map(|_| ()),
            tonic::Code::NotFound,
        ),
        (
            "delete unknown",
            admin.delete_key(delete(&unknown)).await.map(|_| ()),
            tonic::Code::NotFound,
        ),
        (
            "revoke deleted",
            admin.revoke_key(revoke_req(&deleted)).await.map(|_| ()),
            tonic::Code::NotFound,
        ),
        (
            "rotate deleted",
            admin.rotate_key(rotate(&deleted)).await.map(|_| ()),
            tonic::Code::NotFound,
        ),
        (
            "update deleted",
            admin.update_key(update(&deleted)).await.map(|_| ()),
            tonic::Code::NotFound,
        ),
        (
            "delete deleted",
            admin.delete_key(delete(&deleted)).await.map(|_| ()),
            tonic::Code::NotFound,
        ),
        (
            "update with an expiry in the past",
            admin
                .update_key(proto::UpdateKeyRequest {
                    expires_at: Some(ts_in(&app.clock, -60)),
                    update_mask: Some(FieldMask {
                        paths: vec!["expires_at".into()],
                    }),
                    ..update(&live)
                })
                .await
                .map(|_| ()),
            tonic::Code::InvalidArgument,
        ),
        (
            "issue without an owner",
            admin
                .issue_key(proto::IssueKeyRequest {
                    owner: None,
                    ..issue_request("ws_test")
                })
                .await
                .map(|_| ()),
            tonic::Code::InvalidArgument,
        ),
    ];
    for (what, result, code) in refusals {
        let err = result.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
    }

    assert_eq!(app.audit("ws_test").await, before);
    assert_eq!(audit_rows(&app).await, rows);
    assert_eq!(
        app.db.count("SELECT COUNT(*) FROM key_secrets").await,
        secrets
    );
}

async fn a_scope_ceiling_refusal_writes_one_denied_event_and_nothing_else(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let limited = proto::Actor {
        id: "user_reader".into(),
        permissions: vec!["read".into()],
    };
    let err = app
        .admin()
        .issue_key(proto::IssueKeyRequest {
            scopes: vec!["write".into()],
            actor: Some(limited.clone()),
            ..issue_request("ws_test")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let events = app.audit("ws_test").await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.outcome, AuditOutcome::Denied as i32);
    assert_eq!(e.action, "key.issue");
    assert_eq!(e.actor_id, "user_reader");
    assert_eq!(e.caller, CALLER);
    assert_eq!(e.workspace_id, "ws_test");
    assert_eq!(e.key_id, "");
    assert_eq!(e.occurred_at, Some(now_ts(&app)));
    assert_eq!(app.db.count("SELECT COUNT(*) FROM api_keys").await, 0);

    // The reader's own key (a member without the admin permission manages only its own).
    let key_id = app
        .issue_with(|r| r.owner = Some(user("user_reader")))
        .await
        .key_info
        .unwrap()
        .key_id;
    app.clock.advance(Duration::from_secs(1));
    let err = app
        .admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id.clone(),
            actor: Some(limited),
            scopes: vec!["admin".into()],
            update_mask: Some(FieldMask {
                paths: vec!["scopes".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let events = app.audit("ws_test").await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].outcome, AuditOutcome::Denied as i32);
    assert_eq!(events[0].action, "key.update");
    assert_eq!(events[0].key_id, key_id);
    assert_eq!(events[0].occurred_at, Some(now_ts(&app)));
    assert_eq!(events[1].outcome, AuditOutcome::Success as i32);
    assert_eq!(events[1].action, "key.issue");
}

async fn no_audit_event_detail_contains_a_plaintext_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut admin = app.admin();
    let mut plaintexts = Vec::new();

    let first = app.issue().await;
    plaintexts.push(first.key.clone());
    let first_id = first.key_info.unwrap().key_id;
    let second = app
        .issue_with(|r| r.environment = proto::Environment::Test as i32)
        .await;
    plaintexts.push(second.key.clone());
    let second_id = second.key_info.unwrap().key_id;

    admin
        .update_key(proto::UpdateKeyRequest {
            key_id: first_id.clone(),
            actor: Some(actor()),
            name: "renamed".into(),
            scopes: vec!["write".into()],
            metadata: [("team".to_owned(), "ml".to_owned())].into(),
            update_mask: Some(FieldMask {
                paths: vec!["name".into(), "scopes".into(), "metadata".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    for grace in [3600, 0] {
        let rotated = admin
            .rotate_key(proto::RotateKeyRequest {
                key_id: first_id.clone(),
                actor: Some(actor()),
                grace_period: Some(prost_types::Duration {
                    seconds: grace,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        plaintexts.push(rotated.key);
    }
    revoke(&app, &first_id).await;
    admin
        .delete_key(proto::DeleteKeyRequest {
            key_id: second_id,
            actor: Some(actor()),
        })
        .await
        .unwrap();

    let events = app.audit("ws_test").await;
    assert_eq!(events.len(), 7);
    for event in &events {
        for key in &plaintexts {
            // The whole key, its secret body alone, and its stored hash.
            let secret_body = &key[8..40];
            let hash = KeyHash::of(key).to_hex();
            for needle in [key.as_str(), secret_body, hash.as_str()] {
                assert!(
                    !event.detail.contains(needle),
                    "{} event detail holds a key: {}",
                    event.action,
                    event.detail
                );
                assert!(
                    !format!("{event:?}").contains(needle),
                    "{} event holds a key",
                    event.action
                );
            }
        }
    }
}

/// ListAuditEvents narrows by key, actor, action and time through the API, and names the
/// field of a filter it cannot take.
async fn events_filter_by_key_actor_action_and_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let first = app.issue().await.key_info.unwrap().key_id;
    app.clock.advance(Duration::from_secs(10));
    let middle = now_ts(&app);
    let second = app
        .issue_with(|r| r.actor = Some(actor_named("user_bob")))
        .await
        .key_info
        .unwrap()
        .key_id;
    revoke(&app, &first).await;
    app.clock.advance(Duration::from_secs(10));
    let end = now_ts(&app);
    app.admin()
        .revoke_key(proto::RevokeKeyRequest {
            key_id: second.clone(),
            actor: Some(actor_named("user_bob")),
            reason: "done".into(),
        })
        .await
        .unwrap();

    let list = |request: proto::ListAuditEventsRequest| {
        let mut admin = app.admin();
        async move {
            admin
                .list_audit_events(proto::ListAuditEventsRequest {
                    workspace_id: "ws_test".into(),
                    ..request
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .events
                        .into_iter()
                        .map(|e| (e.action, e.key_id, e.actor_id))
                        .collect::<Vec<_>>()
                })
        }
    };
    let event = |action: &str, key: &str, actor: &str| {
        (action.to_owned(), key.to_owned(), actor.to_owned())
    };
    let admin_id = actor().id;
    assert_eq!(
        list(proto::ListAuditEventsRequest {
            key_id: first.clone(),
            ..Default::default()
        })
        .await
        .unwrap(),
        [
            event("key.revoke", &first, &admin_id),
            event("key.issue", &first, &admin_id)
        ]
    );
    assert_eq!(
        list(proto::ListAuditEventsRequest {
            actor_id: "user_bob".into(),
            ..Default::default()
        })
        .await
        .unwrap(),
        [
            event("key.revoke", &second, "user_bob"),
            event("key.issue", &second, "user_bob")
        ]
    );
    assert_eq!(
        list(proto::ListAuditEventsRequest {
            action: "key.revoke".into(),
            ..Default::default()
        })
        .await
        .unwrap(),
        [
            event("key.revoke", &second, "user_bob"),
            event("key.revoke", &first, &admin_id)
        ]
    );
    assert_eq!(
        list(proto::ListAuditEventsRequest {
            since: Some(middle),
            until: Some(end),
            ..Default::default()
        })
        .await
        .unwrap(),
        [
            event("key.revoke", &first, &admin_id),
            event("key.issue", &second, "user_bob")
        ]
    );

    for (request, field) in [
        (
            proto::ListAuditEventsRequest {
                key_id: "nope".into(),
                ..Default::default()
            },
            "key_id",
        ),
        (
            proto::ListAuditEventsRequest {
                actor_id: "user bob".into(),
                ..Default::default()
            },
            "actor_id",
        ),
        (
            proto::ListAuditEventsRequest {
                action: "Key Revoke".into(),
                ..Default::default()
            },
            "action",
        ),
        (
            proto::ListAuditEventsRequest {
                since: Some(end),
                until: Some(middle),
                ..Default::default()
            },
            "until",
        ),
    ] {
        let status = list(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        assert_eq!(violated_fields(&status), [field]);
    }
}

both_backends!(
    events_filter_by_key_actor_action_and_time,
    every_mutation_writes_one_success_event_with_who_what_which_and_when,
    events_list_newest_first_and_pages_walk_each_event_exactly_once,
    audit_events_are_isolated_by_workspace,
    reads_write_no_audit_event,
    refused_mutations_write_no_audit_event,
    a_scope_ceiling_refusal_writes_one_denied_event_and_nothing_else,
    no_audit_event_detail_contains_a_plaintext_key,
);
