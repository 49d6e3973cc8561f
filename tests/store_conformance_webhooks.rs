//! The conformance suite of the webhook part of the `Store` trait (`WebhookStore`, and
//! the outbox the key mutations write), run against both implementations like
//! `tests/store_conformance.rs`.

mod common;

use std::sync::Arc;

use common::*;
use keywarden::domain::Micros;
use keywarden::domain::ids::{new_key_id, new_webhook_id};
use keywarden::domain::key::KeyRecord;
use keywarden::domain::key_format::KeyHash;
use keywarden::domain::webhook::EventType;
use keywarden::store::{
    AuditContext, AuditFilter, DeliveryFailure, Store, StoreError, WebhookRecord,
};

const S: Micros = 1_000_000;
const DAY: Micros = 24 * 3600 * S;
const T0: Micros = 1_700_000_000_123_457;
const WS: &str = "ws_hooks";

async fn open(backend: Backend) -> (TestDb, Arc<dyn Store>) {
    let db = TestDb::new(backend).await;
    let store = keywarden::store::open(&db.url, 5).await.unwrap();
    db.create_workspaces(&[WS, "ws_quiet"], "pro").await;
    (db, store)
}

fn ctx(action: &'static str) -> AuditContext {
    AuditContext {
        actor_id: "user_admin".to_owned(),
        caller: "test-admin".to_owned(),
        action,
        detail: format!("{action} detail"),
    }
}

fn endpoint(workspace_id: &str, types: &[EventType], at: Micros) -> WebhookRecord {
    WebhookRecord {
        webhook_id: new_webhook_id(&mut getrandom::SysRng).unwrap(),
        workspace_id: workspace_id.to_owned(),
        url: "https://hooks.example.com/kw".to_owned(),
        event_types: types.to_vec(),
        kek_version: 1,
        wrapped_dek: vec![1, 2, 3],
        ciphertext: vec![4, 5, 6],
        created_at: at,
        updated_at: at,
        delivered_seq: 0,
        failing_since: None,
        failures: 0,
        next_attempt_at: 0,
        last_error: String::new(),
        disabled_at: None,
    }
}

async fn issue(store: &dyn Store, key: &KeyRecord) -> KeyHash {
    let secret = KeyHash::of(&format!(
        "kw_live_{}",
        new_key_id(&mut getrandom::SysRng).unwrap()
    ));
    store
        .insert_key(key, &secret, None, &ctx("key.issue"))
        .await
        .unwrap();
    secret
}

async fn outbox(store: &dyn Store, workspace_id: &str) -> Vec<(i64, EventType, String)> {
    store
        .read_outbox(workspace_id, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.event_type, e.key_id))
        .collect()
}

async fn the_outbox_is_written_with_the_mutation_for_workspaces_with_endpoints(backend: Backend) {
    let (db, store) = open(backend).await;
    // No endpoint: nothing is written.
    let quiet = key_record(WS, T0);
    issue(store.as_ref(), &quiet).await;
    assert!(outbox(store.as_ref(), WS).await.is_empty());
    let hook = store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyIssued], T0),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    assert_eq!(hook.delivered_seq, 0, "starts at the head");
    let key = key_record(WS, T0 + S);
    issue(store.as_ref(), &key).await;
    store
        .revoke_key(&key.key_id, "test", T0 + 2 * S, &ctx("key.revoke"))
        .await
        .unwrap();
    // Revoking again changes nothing and announces nothing.
    store
        .revoke_key(&key.key_id, "test", T0 + 3 * S, &ctx("key.revoke"))
        .await
        .unwrap();
    store
        .rotate_key(
            &quiet.key_id,
            &KeyHash::of("kw_live_x"),
            "kw_live_...x",
            0,
            T0 + 4 * S,
            &ctx("key.rotate"),
        )
        .await
        .unwrap();
    store
        .delete_key(&quiet.key_id, T0 + 5 * S, &ctx("key.delete"))
        .await
        .unwrap();
    // An update announces nothing.
    store
        .update_key(
            &key.key_id,
            &Default::default(),
            T0 + 6 * S,
            &ctx("key.update"),
        )
        .await
        .unwrap();
    assert_eq!(
        outbox(store.as_ref(), WS).await,
        [
            (1, EventType::KeyIssued, key.key_id.clone()),
            (2, EventType::KeyRevoked, key.key_id.clone()),
            (3, EventType::KeyRotated, quiet.key_id.clone()),
            (4, EventType::KeyDeleted, quiet.key_id.clone()),
        ]
    );
    let events = store.read_outbox(WS, 2, 10).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    let data: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(data["key"]["key_id"], quiet.key_id.as_str());
    assert_eq!(events[0].occurred_at, T0 + 4 * S);
    // Another workspace's outbox is its own.
    issue(store.as_ref(), &key_record("ws_quiet", T0)).await;
    assert!(outbox(store.as_ref(), "ws_quiet").await.is_empty());
    // An endpoint created later starts after what was committed before it.
    let later = store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyRevoked], T0),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    assert_eq!(later.delivered_seq, 4);
    // A failed mutation leaves no outbox row and no seq behind.
    let mut dup = key_record(WS, T0 + 7 * S);
    dup.key_id = key.key_id.clone();
    let secret = KeyHash::of("kw_live_dup");
    assert!(
        store
            .insert_key(&dup, &secret, None, &ctx("key.issue"))
            .await
            .is_err()
    );
    assert_eq!(outbox(store.as_ref(), WS).await.len(), 4);
    let next = key_record(WS, T0 + 8 * S);
    issue(store.as_ref(), &next).await;
    assert_eq!(outbox(store.as_ref(), WS).await.last().unwrap().0, 5);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM webhook_events").await,
        5,
        "nothing of the quiet workspace"
    );
}

async fn cursors_move_forward_and_failures_disable_with_an_audit_row(backend: Backend) {
    let (db, store) = open(backend).await;
    let hook = store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyIssued], T0),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    let id = hook.webhook_id.clone();
    assert!(
        store.due_webhooks(T0, 10).await.unwrap().is_empty(),
        "nothing to send"
    );
    for i in 0..3 {
        issue(store.as_ref(), &key_record(WS, T0 + i)).await;
    }
    let due = store.due_webhooks(T0, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(store.oldest_undelivered().await.unwrap(), Some(T0));
    store.webhook_delivered(&id, 2).await.unwrap();
    store.webhook_delivered(&id, 1).await.unwrap();
    let got = store.get_webhook(WS, &id).await.unwrap().unwrap();
    assert_eq!(got.delivered_seq, 2, "never back");
    assert_eq!(store.oldest_undelivered().await.unwrap(), Some(T0 + 2));
    // Two failures: the first time is kept, the count grows, the retry waits.
    for (i, at) in [T0 + S, T0 + 2 * S].into_iter().enumerate() {
        store
            .webhook_failed(
                &id,
                &DeliveryFailure {
                    at,
                    next_attempt_at: at + 10 * S,
                    error: format!("HTTP 50{i}"),
                    disable: None,
                },
            )
            .await
            .unwrap();
    }
    let got = store.get_webhook(WS, &id).await.unwrap().unwrap();
    assert_eq!(
        (
            got.failures,
            got.failing_since,
            got.next_attempt_at,
            got.last_error.as_str()
        ),
        (2, Some(T0 + S), T0 + 12 * S, "HTTP 501")
    );
    assert!(
        store
            .due_webhooks(T0 + 11 * S, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.due_webhooks(T0 + 12 * S, 10).await.unwrap().len(), 1);
    // Given up: disabled, audited in the same transaction, no longer due.
    let audits_before = db.count("SELECT COUNT(*) FROM audit_events").await;
    store
        .webhook_failed(
            &id,
            &DeliveryFailure {
                at: T0 + DAY,
                next_attempt_at: T0 + DAY + S,
                error: "HTTP 500".into(),
                disable: Some(AuditContext {
                    actor_id: "keywarden".into(),
                    caller: "webhooks".into(),
                    action: "webhook.disabled",
                    detail: format!("webhook: {id}"),
                }),
            },
        )
        .await
        .unwrap();
    let got = store.get_webhook(WS, &id).await.unwrap().unwrap();
    assert_eq!(got.disabled_at, Some(T0 + DAY));
    assert!(
        store
            .due_webhooks(T0 + 2 * DAY, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.oldest_undelivered().await.unwrap(), None);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM audit_events").await,
        audits_before + 1
    );
    let audit = store
        .list_audit(
            &AuditFilter {
                workspace_id: WS.into(),
                action: Some("webhook.disabled".into()),
                ..Default::default()
            },
            10,
            None,
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    // A disabled endpoint does not keep the workspace writing the outbox.
    let before = outbox(store.as_ref(), WS).await.len();
    issue(store.as_ref(), &key_record(WS, T0 + 3 * DAY)).await;
    assert_eq!(outbox(store.as_ref(), WS).await.len(), before);
    // Success clears the failures of an enabled endpoint.
    let other = store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyIssued], T0),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    store
        .webhook_failed(
            &other.webhook_id,
            &DeliveryFailure {
                at: T0,
                next_attempt_at: T0 + S,
                error: "HTTP 500".into(),
                disable: None,
            },
        )
        .await
        .unwrap();
    store.webhook_delivered(&other.webhook_id, 3).await.unwrap();
    let got = store
        .get_webhook(WS, &other.webhook_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (got.failures, got.failing_since, got.last_error.as_str()),
        (0, None, "")
    );
}

async fn endpoints_are_listed_replaced_and_deleted_with_audit_rows(backend: Backend) {
    let (db, store) = open(backend).await;
    let a = store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyIssued, EventType::KeyLeaked], T0),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    let b = store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyRevoked], T0 + 1),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    let listed = store.list_webhooks(WS).await.unwrap();
    assert_eq!(listed, [a.clone(), b.clone()]);
    assert!(store.list_webhooks("ws_quiet").await.unwrap().is_empty());
    assert!(
        store
            .get_webhook("ws_quiet", &a.webhook_id)
            .await
            .unwrap()
            .is_none()
    );
    // Debug output never shows the sealed secret.
    assert!(!format!("{a:?}").contains("[4, 5, 6]"));
    let replaced = store
        .replace_webhook_secret(
            WS,
            &a.webhook_id,
            (2, &[7, 7], &[8, 8]),
            T0 + S,
            &ctx("webhook.rotate_secret"),
        )
        .await
        .unwrap();
    assert_eq!(
        (replaced.kek_version, replaced.ciphertext.as_slice()),
        (2, &[8u8, 8][..])
    );
    assert_eq!(replaced.updated_at, T0 + S);
    assert_eq!(store.kek_versions_in_use().await.unwrap(), [1, 2]);
    // A KEK rotation's rewrap: the endpoints under another version, swapped only while
    // their wrapped key is still the one read.
    let stale = store.webhooks_to_rewrap(2, 10).await.unwrap();
    assert_eq!(
        stale.iter().map(|w| &w.webhook_id).collect::<Vec<_>>(),
        [&b.webhook_id]
    );
    assert!(
        !store
            .swap_webhook_dek(&b.webhook_id, &[9], 2, &[1])
            .await
            .unwrap()
    );
    assert!(
        store
            .swap_webhook_dek(&b.webhook_id, &b.wrapped_dek, 2, &[1])
            .await
            .unwrap()
    );
    assert!(store.webhooks_to_rewrap(2, 10).await.unwrap().is_empty());
    assert_eq!(store.kek_versions_in_use().await.unwrap(), [2]);
    assert!(matches!(
        store
            .replace_webhook_secret(
                "ws_quiet",
                &a.webhook_id,
                (2, &[7], &[8]),
                T0,
                &ctx("webhook.rotate_secret")
            )
            .await,
        Err(StoreError::NotFound)
    ));
    let audits = db.count("SELECT COUNT(*) FROM audit_events").await;
    assert!(matches!(
        store
            .delete_webhook("ws_quiet", &b.webhook_id, T0, &ctx("webhook.delete"))
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        db.count("SELECT COUNT(*) FROM audit_events").await,
        audits,
        "nothing written"
    );
    store
        .delete_webhook(WS, &b.webhook_id, T0, &ctx("webhook.delete"))
        .await
        .unwrap();
    let left = store.list_webhooks(WS).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].webhook_id, replaced.webhook_id);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM audit_events").await,
        audits + 1
    );
}

async fn notices_are_announced_once(backend: Backend) {
    let (db, store) = open(backend).await;
    store
        .insert_webhook(
            &endpoint(
                WS,
                &[EventType::KeyExpiring, EventType::KeyBudgetThreshold],
                T0,
            ),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    let leads = [7 * DAY, DAY];
    let mut expiring = key_record(WS, T0);
    expiring.expires_at = Some(T0 + 10 * DAY);
    issue(store.as_ref(), &expiring).await;
    let mut elsewhere = key_record("ws_quiet", T0);
    elsewhere.expires_at = Some(T0 + 10 * DAY);
    issue(store.as_ref(), &elsewhere).await;
    assert_eq!(
        store
            .announce_expiring(T0 + 2 * DAY, &leads, 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .announce_expiring(T0 + 3 * DAY, &leads, 10)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .announce_expiring(T0 + 4 * DAY, &leads, 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .announce_expiring(T0 + 9 * DAY, &leads, 10)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .announce_expiring(T0 + 9 * DAY + S, &leads, 10)
            .await
            .unwrap(),
        0
    );
    let notices: Vec<serde_json::Value> = store
        .read_outbox(WS, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == EventType::KeyExpiring)
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(
        notices
            .iter()
            .map(|n| n["lead_seconds"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [7 * 24 * 3600, 24 * 3600]
    );
    assert!(
        outbox(store.as_ref(), "ws_quiet").await.is_empty(),
        "no endpoint there"
    );
    // Budgets: the stored spend of the current period.
    let mut budgeted = key_record(WS, T0);
    budgeted.max_budget_micros = Some(1_000);
    issue(store.as_ref(), &budgeted).await;
    let spend = |micros| keywarden::store::UsageDelta {
        key_id: budgeted.key_id.clone(),
        epoch: 0,
        spend_micros: micros,
        last_used_at: None,
    };
    store.record_usage(&[spend(799)]).await.unwrap();
    assert_eq!(store.announce_budget_thresholds(T0, 10).await.unwrap(), 0);
    store.record_usage(&[spend(1)]).await.unwrap();
    assert_eq!(store.announce_budget_thresholds(T0, 10).await.unwrap(), 1);
    assert_eq!(store.announce_budget_thresholds(T0, 10).await.unwrap(), 0);
    store.record_usage(&[spend(500)]).await.unwrap();
    assert_eq!(store.announce_budget_thresholds(T0, 10).await.unwrap(), 1);
    assert_eq!(store.announce_budget_thresholds(T0, 10).await.unwrap(), 0);
    // Pruning keeps every mark that still matters: the current period's, a live key's
    // expiry marks; too recent ones are kept whatever they are.
    let marks = || db.count("SELECT COUNT(*) FROM webhook_notices");
    assert_eq!(marks().await, 4);
    assert_eq!(store.prune_notices(T0 + 30 * DAY).await.unwrap(), 0);
    // A new period: the old period's budget marks go (not before they are old enough).
    store
        .reset_budget(&budgeted.key_id, T0 + DAY, &ctx("key.reset_budget"))
        .await
        .unwrap();
    assert_eq!(store.prune_notices(T0).await.unwrap(), 0);
    assert_eq!(store.prune_notices(T0 + 30 * DAY).await.unwrap(), 2);
    // A deleted key's marks go.
    store
        .delete_key(&expiring.key_id, T0 + DAY, &ctx("key.delete"))
        .await
        .unwrap();
    assert_eq!(store.prune_notices(T0 + 30 * DAY).await.unwrap(), 2);
    assert_eq!(marks().await, 0);
}

async fn the_outbox_is_pruned_behind_every_endpoint(backend: Backend) {
    let (_db, store) = open(backend).await;
    let a = store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyIssued], T0),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    let b = store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyRevoked], T0),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    for i in 0..4 {
        issue(store.as_ref(), &key_record(WS, T0 + i)).await;
    }
    store.webhook_delivered(&a.webhook_id, 4).await.unwrap();
    store.webhook_delivered(&b.webhook_id, 2).await.unwrap();
    // Too recent: kept.
    assert_eq!(store.prune_outbox(T0).await.unwrap(), 0);
    // Old enough: only what both passed.
    assert_eq!(store.prune_outbox(T0 + DAY).await.unwrap(), 2);
    assert_eq!(
        outbox(store.as_ref(), WS)
            .await
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        [3, 4]
    );
    store
        .delete_webhook(WS, &b.webhook_id, T0, &ctx("webhook.delete"))
        .await
        .unwrap();
    assert_eq!(store.prune_outbox(T0 + DAY).await.unwrap(), 2);
    // The seq goes on from the head, not from what is left.
    issue(store.as_ref(), &key_record(WS, T0 + 10)).await;
    assert_eq!(outbox(store.as_ref(), WS).await[0].0, 5);
}

/// The trap of a log read by `seq > last`: a mutation holding seq N commits after one
/// holding N + 1, and a reader past N + 1 never sees N. Here a transaction holds the
/// workspace's next seq open; a key issued meanwhile waits for it (on the head row's
/// lock) instead of committing a later seq first, so a reader sees neither, then both in
/// order. Postgres only: SQLite's write transactions are exclusive already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_seq_order_is_commit_order_on_postgres() {
    use sqlx::Connection;
    let (db, store) = open(Backend::Postgres).await;
    store
        .insert_webhook(
            &endpoint(WS, &[EventType::KeyIssued], T0),
            &ctx("webhook.create"),
        )
        .await
        .unwrap();
    let first = key_record(WS, T0);
    issue(store.as_ref(), &first).await;
    let mut held = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx = held.begin().await.unwrap();
    let seq: i64 = sqlx::query_scalar(
        "UPDATE webhook_heads SET head = head + 1 WHERE workspace_id = $1 RETURNING head",
    )
    .bind(WS)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(seq, 2);
    let later = key_record(WS, T0 + S);
    let writer = {
        let store = store.clone();
        let later = later.clone();
        tokio::spawn(async move { issue(store.as_ref(), &later).await })
    };
    // The writer is waiting on the head row's lock.
    eventually("the second writer to wait for the head row", async || {
        db.count(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        outbox(store.as_ref(), WS).await.len(),
        1,
        "nothing later is visible"
    );
    sqlx::query(
        "INSERT INTO webhook_events (workspace_id, seq, event_type, key_id, data, occurred_at) \
         VALUES ($1, 2, 'key.revoked', $2, '{}', $3)",
    )
    .bind(WS)
    .bind(&first.key_id)
    .bind(T0)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    writer.await.unwrap();
    assert_eq!(
        outbox(store.as_ref(), WS).await,
        [
            (1, EventType::KeyIssued, first.key_id.clone()),
            (2, EventType::KeyRevoked, first.key_id.clone()),
            (3, EventType::KeyIssued, later.key_id.clone()),
        ]
    );
}

both_backends!(
    the_outbox_is_written_with_the_mutation_for_workspaces_with_endpoints,
    cursors_move_forward_and_failures_disable_with_an_audit_row,
    endpoints_are_listed_replaced_and_deleted_with_audit_rows,
    notices_are_announced_once,
    the_outbox_is_pruned_behind_every_endpoint,
);
