//! One conformance suite for the `Store` trait, run directly against both
//! implementations: whatever the SQLite store does, the Postgres store does alike.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::Connection;

use common::*;
use keywarden::domain::Micros;
use keywarden::domain::access::{AccessGroup, AccessMode, ResourceAccess};
use keywarden::domain::budget::BudgetPeriod;
use keywarden::domain::event::EventKind;
use keywarden::domain::ids::new_key_id;
use keywarden::domain::key::{KeyRecord, KeyStatus, Owner, OwnerKind};
use keywarden::domain::key_format::{Environment, KeyHash};
use keywarden::domain::limits::{LimitScope, LimitUnit, LimitWindow, RateLimit};
use keywarden::domain::pools::{PoolBudget, StoredSpend};
use keywarden::domain::refusal::{Reason, Refusal};
use keywarden::domain::team::{SelfServiceKey, ServiceAccount, Team, TeamPolicy};
use keywarden::store::{
    AuditContext, AuditFilter, AuditOutcome, AuditRecord, DeniedAudit, KeyCursor, KeyFilter,
    KeyPatch, KeySelection, OwnerPool, Store, StoreError, TeamPatch, UsageDelta, WorkspacePatch,
};

const S: Micros = 1_000_000;
/// An arbitrary instant with a non-zero microsecond part, so that any truncation shows.
const T0: Micros = 1_700_000_000_123_457;
const WS: &str = "ws_conf";

async fn open(backend: Backend) -> (TestDb, Arc<dyn Store>) {
    let db = TestDb::new(backend).await;
    let store = keywarden::store::open(&db.url, 5).await.unwrap();
    (db, store)
}

fn owner(kind: OwnerKind, id: &str) -> Owner {
    Owner {
        kind,
        id: id.to_owned(),
    }
}

/// A fresh, unique secret hash.
fn new_secret() -> KeyHash {
    KeyHash::of(&format!(
        "kw_live_{}",
        new_key_id(&mut getrandom::SysRng).unwrap()
    ))
}

fn ctx(action: &'static str) -> AuditContext {
    AuditContext {
        actor_id: "user_admin".to_owned(),
        caller: "test-admin".to_owned(),
        action,
        detail: format!("{action} detail"),
    }
}

async fn insert(store: &dyn Store, key: &KeyRecord) -> KeyHash {
    let secret = new_secret();
    store
        .insert_key(key, &secret, None, &ctx("key.issue"))
        .await
        .unwrap();
    secret
}

fn filter(workspace_id: &str, now: Micros) -> KeyFilter {
    KeyFilter {
        workspace_id: workspace_id.to_owned(),
        owner: None,
        name_prefix: None,
        metadata: None,
        team_id: None,
        status: None,
        now,
        unused_since: None,
    }
}

fn ids(keys: &[KeyRecord]) -> Vec<String> {
    keys.iter().map(|k| k.key_id.clone()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Keys in the order the stores must list them: created_at DESC, key_id DESC.
fn newest_first(keys: &[KeyRecord]) -> Vec<String> {
    let mut keys = keys.to_vec();
    keys.sort_by(|a, b| (b.created_at, &b.key_id).cmp(&(a.created_at, &a.key_id)));
    ids(&keys)
}

fn audit_of(workspace_id: &str) -> AuditFilter {
    AuditFilter {
        workspace_id: workspace_id.to_owned(),
        ..AuditFilter::default()
    }
}

async fn audit(store: &dyn Store, workspace_id: &str) -> Vec<AuditRecord> {
    store
        .list_audit(&audit_of(workspace_id), 1000, None)
        .await
        .unwrap()
}

async fn all_audit_rows(db: &TestDb) -> i64 {
    db.count("SELECT COUNT(*) FROM audit_events").await
}

async fn secret_rows(db: &TestDb, key_id: &str) -> i64 {
    db.count(&format!(
        "SELECT COUNT(*) FROM key_secrets WHERE key_id = '{key_id}'"
    ))
    .await
}

async fn current_secret_rows(db: &TestDb, key_id: &str) -> i64 {
    db.count(&format!(
        "SELECT COUNT(*) FROM key_secrets WHERE key_id = '{key_id}' AND valid_until IS NULL"
    ))
    .await
}

fn hash_set(hashes: &[KeyHash]) -> Vec<String> {
    let mut v: Vec<String> = hashes.iter().map(KeyHash::to_hex).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// Insert, get, find.

async fn insert_then_get_and_find_secret_round_trip_every_field(backend: Backend) {
    let (_db, store) = open(backend).await;
    let full = KeyRecord {
        key_id: new_key_id(&mut getrandom::SysRng).unwrap(),
        workspace_id: WS.to_owned(),
        name: "ingest pipeline – eu".to_owned(),
        environment: Environment::Test,
        display: "kw_test_...Zq9x".to_owned(),
        scopes: vec!["admin".into(), "models:read".into(), "write.x".into()],
        owner: owner(OwnerKind::ServiceAccount, "svc-ingest@example.com"),
        created_by: "user_7".to_owned(),
        metadata: BTreeMap::from([
            ("team".to_owned(), "ml".to_owned()),
            ("quoted".to_owned(), r#"a "b" \ c {}"#.to_owned()),
            ("unicode".to_owned(), "Zürich ✓".to_owned()),
            ("empty".to_owned(), String::new()),
        ]),
        created_at: T0,
        updated_at: T0 + 5,
        expires_at: Some(T0 + 86_400 * S + 1),
        revoked_at: Some(T0 + 3),
        revoke_reason: Some("pre-revoked: it's \"leaked\"".to_owned()),
        rotated_at: Some(T0 + 2),
        deleted_at: None,
        rate_limits: vec![],
        max_budget_micros: None,
        budget_period: BudgetPeriod::Days(30),
        budget_reset_at: T0 + 4,
        spent_micros: 0,
        spend_epoch: T0 + 4,
        last_used_at: None,
        resource_access: Default::default(),
        network: Default::default(),
        team_id: None,
        team_access: Default::default(),
    };
    let minimal = KeyRecord {
        scopes: Vec::new(),
        ..key_record(WS, T0 - 1)
    };
    for key in [full, minimal] {
        let secret = insert(&*store, &key).await;
        assert_eq!(store.get_key(&key.key_id).await.unwrap(), Some(key.clone()));
        let found = store.find_secret(&secret).await.unwrap().unwrap();
        assert_eq!(found.key, key);
        assert_eq!(found.valid_until, None, "a new key's secret is current");
    }
}

async fn get_of_an_unknown_key_and_find_of_an_unknown_hash_are_none(backend: Backend) {
    let (_db, store) = open(backend).await;
    insert(&*store, &key_record(WS, T0)).await;
    assert_eq!(
        store
            .get_key(&new_key_id(&mut getrandom::SysRng).unwrap())
            .await
            .unwrap(),
        None
    );
    assert!(store.find_secret(&new_secret()).await.unwrap().is_none());
}

// ---------------------------------------------------------------------------------------
// Listing.

async fn list_orders_newest_first_with_key_id_breaking_ties(backend: Backend) {
    let (_db, store) = open(backend).await;
    // Three keys share a created_at; their ids mix cases and digits, so the tie-break is
    // byte order (what SQLite does, and Postgres under the C collation).
    let with_id = |id: String, created_at| KeyRecord {
        key_id: id,
        ..key_record(WS, created_at)
    };
    let keys = vec![
        key_record(WS, T0),
        with_id(format!("key_{}", "a".repeat(24)), T0 + 1),
        key_record(WS, T0 + 2),
        with_id(format!("key_{}", "B".repeat(24)), T0 + 1),
        with_id(format!("key_{}", "0".repeat(24)), T0 + 1),
        key_record(WS, T0 - S),
    ];
    for key in &keys {
        insert(&*store, key).await;
    }
    let expected = newest_first(&keys);
    let all = store.list_keys(&filter(WS, T0), 100, None).await.unwrap();
    assert_eq!(ids(&all), expected);
    // The rows come back whole.
    assert_eq!(all[0], keys[2]);
    let two = store.list_keys(&filter(WS, T0), 2, None).await.unwrap();
    assert_eq!(ids(&two), expected[..2]);
}

async fn list_cursor_continues_after_the_cursor_without_gaps_or_repeats(backend: Backend) {
    let (_db, store) = open(backend).await;
    let keys: Vec<KeyRecord> = (0..8)
        .map(|i| key_record(WS, T0 + (i / 3) * S)) // groups of equal created_at
        .collect();
    for key in &keys {
        insert(&*store, key).await;
    }
    let expected = newest_first(&keys);

    let mut seen = Vec::new();
    let mut after: Option<KeyCursor> = None;
    let mut pages = 0;
    loop {
        let page = store
            .list_keys(&filter(WS, T0), 3, after.as_ref())
            .await
            .unwrap();
        pages += 1;
        seen.extend(ids(&page));
        let Some(last) = page.last() else { break };
        after = Some(KeyCursor {
            created_at: last.created_at,
            key_id: last.key_id.clone(),
        });
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen, expected);
    assert_eq!(pages, 4, "3 + 3 + 2 keys, then an empty page");

    // A cursor is a position, not a row: one between rows resumes right after it.
    let all = store.list_keys(&filter(WS, T0), 100, None).await.unwrap();
    let pivot = &all[4];
    let cursor = KeyCursor {
        created_at: pivot.created_at,
        key_id: format!("{}0", &pivot.key_id[..pivot.key_id.len() - 1]),
    };
    let expected_after: Vec<String> = all
        .iter()
        .filter(|k| (k.created_at, k.key_id.as_str()) < (cursor.created_at, &cursor.key_id))
        .map(|k| k.key_id.clone())
        .collect();
    let resumed = store
        .list_keys(&filter(WS, T0), 100, Some(&cursor))
        .await
        .unwrap();
    assert_eq!(ids(&resumed), expected_after);
}

async fn list_filters_by_owner_kind_and_id(backend: Backend) {
    let (_db, store) = open(backend).await;
    let alice_user = [
        KeyRecord {
            owner: owner(OwnerKind::User, "alice"),
            ..key_record(WS, T0)
        },
        KeyRecord {
            owner: owner(OwnerKind::User, "alice"),
            ..key_record(WS, T0 + 1)
        },
    ];
    let alice_service = KeyRecord {
        owner: owner(OwnerKind::ServiceAccount, "alice"),
        ..key_record(WS, T0 + 2)
    };
    let bob = KeyRecord {
        owner: owner(OwnerKind::User, "bob"),
        ..key_record(WS, T0 + 3)
    };
    for key in alice_user.iter().chain([&alice_service, &bob]) {
        insert(&*store, key).await;
    }
    let by = |kind, id: &str| KeyFilter {
        owner: Some(owner(kind, id)),
        ..filter(WS, T0)
    };
    let list = |f: KeyFilter| {
        let store = store.clone();
        async move { ids(&store.list_keys(&f, 100, None).await.unwrap()) }
    };
    assert_eq!(
        list(by(OwnerKind::User, "alice")).await,
        newest_first(&alice_user)
    );
    assert_eq!(
        list(by(OwnerKind::ServiceAccount, "alice")).await,
        std::slice::from_ref(&alice_service.key_id)
    );
    assert_eq!(
        list(by(OwnerKind::User, "bob")).await,
        std::slice::from_ref(&bob.key_id)
    );
    assert!(list(by(OwnerKind::User, "carol")).await.is_empty());
    assert_eq!(list(filter(WS, T0)).await.len(), 4);
}

async fn list_filters_by_status_as_of_the_filters_now(backend: Backend) {
    let (_db, store) = open(backend).await;
    let active = key_record(WS, T0);
    let expires_later = KeyRecord {
        expires_at: Some(T0 + 100 * S),
        ..key_record(WS, T0)
    };
    let expires_at_boundary = KeyRecord {
        expires_at: Some(T0 + 10 * S),
        ..key_record(WS, T0)
    };
    let expired_long_ago = KeyRecord {
        expires_at: Some(T0 + 1),
        ..key_record(WS, T0)
    };
    // Revoked and past its expiry: revocation wins.
    let revoked = KeyRecord {
        expires_at: Some(T0 + 5 * S),
        ..key_record(WS, T0)
    };
    for key in [
        &active,
        &expires_later,
        &expires_at_boundary,
        &expired_long_ago,
        &revoked,
    ] {
        insert(&*store, key).await;
    }
    store
        .revoke_key(&revoked.key_id, "test", T0 + 1, &ctx("key.revoke"))
        .await
        .unwrap();

    let list = |status: KeyStatus, now: Micros| {
        let store = store.clone();
        async move {
            let f = KeyFilter {
                status: Some(status),
                ..filter(WS, now)
            };
            sorted(ids(&store.list_keys(&f, 100, None).await.unwrap()))
        }
    };
    let set = |keys: &[&KeyRecord]| sorted(keys.iter().map(|k| k.key_id.clone()).collect());

    let now = T0 + 10 * S - 1;
    assert_eq!(
        list(KeyStatus::Active, now).await,
        set(&[&active, &expires_later, &expires_at_boundary])
    );
    assert_eq!(
        list(KeyStatus::Expired, now).await,
        set(&[&expired_long_ago])
    );
    assert_eq!(list(KeyStatus::Revoked, now).await, set(&[&revoked]));

    // Expiry is inclusive of its instant.
    let now = T0 + 10 * S;
    assert_eq!(
        list(KeyStatus::Active, now).await,
        set(&[&active, &expires_later])
    );
    assert_eq!(
        list(KeyStatus::Expired, now).await,
        set(&[&expires_at_boundary, &expired_long_ago])
    );
    assert_eq!(list(KeyStatus::Revoked, now).await, set(&[&revoked]));

    let now = T0 + 1000 * S;
    assert_eq!(list(KeyStatus::Active, now).await, set(&[&active]));
    assert_eq!(
        list(KeyStatus::Expired, now).await,
        set(&[&expires_later, &expires_at_boundary, &expired_long_ago])
    );
    assert_eq!(list(KeyStatus::Revoked, now).await, set(&[&revoked]));
}

async fn list_is_confined_to_its_workspace_and_skips_deleted_keys(backend: Backend) {
    let (_db, store) = open(backend).await;
    let a_kept = key_record("ws_a", T0);
    let a_deleted = key_record("ws_a", T0 + 1);
    let b = key_record("ws_b", T0 + 2);
    for key in [&a_kept, &a_deleted, &b] {
        insert(&*store, key).await;
    }
    store
        .delete_key(&a_deleted.key_id, T0 + S, &ctx("key.delete"))
        .await
        .unwrap();
    let list = |ws: &'static str, status: Option<KeyStatus>| {
        let store = store.clone();
        async move {
            let f = KeyFilter {
                status,
                ..filter(ws, T0 + S)
            };
            ids(&store.list_keys(&f, 100, None).await.unwrap())
        }
    };
    assert_eq!(
        list("ws_a", None).await,
        std::slice::from_ref(&a_kept.key_id)
    );
    assert_eq!(
        list("ws_a", Some(KeyStatus::Active)).await,
        std::slice::from_ref(&a_kept.key_id)
    );
    assert_eq!(list("ws_b", None).await, std::slice::from_ref(&b.key_id));
    assert!(list("ws_c", None).await.is_empty());
}

// ---------------------------------------------------------------------------------------
// Update.

async fn update_applies_only_the_patched_fields_and_returns_every_secret_as_stale(
    backend: Backend,
) {
    let (_db, store) = open(backend).await;
    let original = KeyRecord {
        metadata: BTreeMap::from([("team".to_owned(), "ml".to_owned())]),
        expires_at: Some(T0 + 3600 * S),
        ..key_record(WS, T0)
    };
    let first_secret = insert(&*store, &original).await;
    let second_secret = new_secret();
    let rotated = store
        .rotate_key(
            &original.key_id,
            &second_secret,
            "kw_live_...wxyz",
            60 * S,
            T0 + S,
            &ctx("key.rotate"),
        )
        .await
        .unwrap()
        .key;
    let both = hash_set(&[first_secret, second_secret]);

    // Only the name.
    let t = T0 + 10 * S;
    let changed = store
        .update_key(
            &original.key_id,
            &KeyPatch {
                name: Some("renamed".to_owned()),
                ..Default::default()
            },
            t,
            &ctx("key.update"),
        )
        .await
        .unwrap();
    let mut expected = rotated.clone();
    expected.name = "renamed".to_owned();
    expected.updated_at = t;
    assert_eq!(changed.key, expected);
    assert_eq!(hash_set(&changed.stale_hashes), both);
    assert_eq!(
        store.get_key(&original.key_id).await.unwrap(),
        Some(expected.clone())
    );

    // Scopes and metadata, replaced whole.
    let t = T0 + 20 * S;
    let metadata = BTreeMap::from([("owner".to_owned(), "data".to_owned())]);
    let changed = store
        .update_key(
            &original.key_id,
            &KeyPatch {
                scopes: Some(vec!["read".into(), "write".into()]),
                metadata: Some(metadata.clone()),
                ..Default::default()
            },
            t,
            &ctx("key.update"),
        )
        .await
        .unwrap();
    expected.scopes = vec!["read".into(), "write".into()];
    expected.metadata = metadata;
    expected.updated_at = t;
    assert_eq!(changed.key, expected);
    assert_eq!(hash_set(&changed.stale_hashes), both);
    assert_eq!(
        store.get_key(&original.key_id).await.unwrap(),
        Some(expected.clone())
    );

    // Expiry removed, then set again.
    let t = T0 + 30 * S;
    let changed = store
        .update_key(
            &original.key_id,
            &KeyPatch {
                expires_at: Some(None),
                ..Default::default()
            },
            t,
            &ctx("key.update"),
        )
        .await
        .unwrap();
    expected.expires_at = None;
    expected.updated_at = t;
    assert_eq!(changed.key, expected);
    let t = T0 + 40 * S;
    let changed = store
        .update_key(
            &original.key_id,
            &KeyPatch {
                expires_at: Some(Some(T0 + 7200 * S)),
                ..Default::default()
            },
            t,
            &ctx("key.update"),
        )
        .await
        .unwrap();
    expected.expires_at = Some(T0 + 7200 * S);
    expected.updated_at = t;
    assert_eq!(changed.key, expected);
    assert_eq!(
        store.get_key(&original.key_id).await.unwrap(),
        Some(expected)
    );
}

// ---------------------------------------------------------------------------------------
// Rotate.

async fn rotate_ends_the_old_secret_at_now_plus_grace_and_makes_the_new_one_current(
    backend: Backend,
) {
    let (db, store) = open(backend).await;
    let key = key_record(WS, T0);
    let old = insert(&*store, &key).await;
    let new = new_secret();
    let now = T0 + 10 * S;
    let rotated = store
        .rotate_key(
            &key.key_id,
            &new,
            "kw_live_...NEW1",
            3600 * S,
            now,
            &ctx("key.rotate"),
        )
        .await
        .unwrap();
    assert_eq!(rotated.old_secret_valid_until, now + 3600 * S);
    assert!(rotated.stale_hashes.contains(&old));
    assert!(!rotated.stale_hashes.contains(&new));

    let mut expected = key.clone();
    expected.display = "kw_live_...NEW1".to_owned();
    expected.rotated_at = Some(now);
    expected.updated_at = now;
    assert_eq!(rotated.key, expected);
    assert_eq!(store.get_key(&key.key_id).await.unwrap(), Some(expected));

    let found_old = store.find_secret(&old).await.unwrap().unwrap();
    assert_eq!(found_old.valid_until, Some(now + 3600 * S));
    assert_eq!(found_old.key, rotated.key);
    let found_new = store.find_secret(&new).await.unwrap().unwrap();
    assert_eq!(found_new.valid_until, None);
    assert_eq!(found_new.key, rotated.key);
    assert_eq!(secret_rows(&db, &key.key_id).await, 2);
    assert_eq!(current_secret_rows(&db, &key.key_id).await, 1);
}

async fn rotate_caps_the_old_secrets_end_at_the_keys_expiry(backend: Backend) {
    let (_db, store) = open(backend).await;
    let now = T0 + 10 * S;
    let key = KeyRecord {
        expires_at: Some(now + 60 * S),
        ..key_record(WS, T0)
    };
    let old = insert(&*store, &key).await;
    let rotated = store
        .rotate_key(
            &key.key_id,
            &new_secret(),
            "kw_live_...NEW1",
            3600 * S,
            now,
            &ctx("key.rotate"),
        )
        .await
        .unwrap();
    assert_eq!(rotated.old_secret_valid_until, now + 60 * S);
    assert_eq!(
        store.find_secret(&old).await.unwrap().unwrap().valid_until,
        Some(now + 60 * S)
    );
    assert_eq!(rotated.key.expires_at, Some(now + 60 * S));
}

async fn rotating_twice_keeps_the_earlier_end_of_the_first_old_secret(backend: Backend) {
    let (db, store) = open(backend).await;
    let key = key_record(WS, T0);
    let s0 = insert(&*store, &key).await;
    let (s1, s2, s3) = (new_secret(), new_secret(), new_secret());
    let t1 = T0 + 10 * S;
    let rotate = |secret: KeyHash, grace: Micros, now: Micros| {
        let store = store.clone();
        let key_id = key.key_id.clone();
        async move {
            store
                .rotate_key(
                    &key_id,
                    &secret,
                    "kw_live_...abcd",
                    grace,
                    now,
                    &ctx("key.rotate"),
                )
                .await
                .unwrap()
        }
    };
    let valid_until = |h: KeyHash| {
        let store = store.clone();
        async move { store.find_secret(&h).await.unwrap().unwrap().valid_until }
    };

    rotate(s1, 60 * S, t1).await;
    assert_eq!(valid_until(s0).await, Some(t1 + 60 * S));

    // A longer grace later does not lengthen the first old secret's life.
    let second = rotate(s2, 3600 * S, t1 + 10 * S).await;
    assert_eq!(second.old_secret_valid_until, t1 + 10 * S + 3600 * S);
    assert_eq!(valid_until(s0).await, Some(t1 + 60 * S));
    assert_eq!(valid_until(s1).await, Some(t1 + 10 * S + 3600 * S));
    assert_eq!(valid_until(s2).await, None);
    assert_eq!(hash_set(&second.stale_hashes), hash_set(&[s0, s1]));

    // A shorter one cuts every older secret short.
    let third = rotate(s3, 0, t1 + 20 * S).await;
    assert_eq!(third.old_secret_valid_until, t1 + 20 * S);
    assert_eq!(valid_until(s0).await, Some(t1 + 20 * S));
    assert_eq!(valid_until(s1).await, Some(t1 + 20 * S));
    assert_eq!(valid_until(s2).await, Some(t1 + 20 * S));
    assert_eq!(valid_until(s3).await, None);
    assert_eq!(hash_set(&third.stale_hashes), hash_set(&[s0, s1, s2]));
    assert_eq!(current_secret_rows(&db, &key.key_id).await, 1);
}

async fn rotating_a_revoked_or_expired_key_is_a_precondition_and_leaves_nothing_behind(
    backend: Backend,
) {
    let (db, store) = open(backend).await;
    let revoked = key_record(WS, T0);
    insert(&*store, &revoked).await;
    store
        .revoke_key(&revoked.key_id, "leaked", T0 + S, &ctx("key.revoke"))
        .await
        .unwrap();
    let expired = KeyRecord {
        expires_at: Some(T0 + 5 * S),
        ..key_record(WS, T0)
    };
    insert(&*store, &expired).await;

    let audit_before = audit(&*store, WS).await;
    let rows_before = all_audit_rows(&db).await;
    for key_id in [&revoked.key_id, &expired.key_id] {
        let before = store.get_key(key_id).await.unwrap();
        let new = new_secret();
        let err = store
            .rotate_key(
                key_id,
                &new,
                "kw_live_...NEW1",
                60 * S,
                T0 + 5 * S,
                &ctx("key.rotate"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Precondition(_)), "{err:?}");
        assert!(store.find_secret(&new).await.unwrap().is_none());
        assert_eq!(secret_rows(&db, key_id).await, 1);
        assert_eq!(current_secret_rows(&db, key_id).await, 1);
        assert_eq!(store.get_key(key_id).await.unwrap(), before);
    }
    assert_eq!(audit(&*store, WS).await, audit_before);
    assert_eq!(all_audit_rows(&db).await, rows_before);
}

// ---------------------------------------------------------------------------------------
// Revoke and delete.

async fn revoke_sets_revoked_at_and_reason_once(backend: Backend) {
    let (_db, store) = open(backend).await;
    let key = key_record(WS, T0);
    let secret = insert(&*store, &key).await;
    let t1 = T0 + 10 * S;
    let first = store
        .revoke_key(&key.key_id, "leaked", t1, &ctx("key.revoke"))
        .await
        .unwrap();
    let mut expected = key.clone();
    expected.revoked_at = Some(t1);
    expected.revoke_reason = Some("leaked".to_owned());
    expected.updated_at = t1;
    assert_eq!(first.key, expected);
    assert_eq!(first.stale_hashes, [secret]);

    let second = store
        .revoke_key(&key.key_id, "again", t1 + 60 * S, &ctx("key.revoke"))
        .await
        .unwrap();
    assert_eq!(second.key, expected, "a second revoke changes nothing");
    assert_eq!(
        store.get_key(&key.key_id).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        store.find_secret(&secret).await.unwrap().unwrap().key,
        expected
    );
}

async fn delete_hides_the_key_but_find_secret_still_returns_it_marked_deleted(backend: Backend) {
    let (_db, store) = open(backend).await;
    let key = key_record(WS, T0);
    let old = insert(&*store, &key).await;
    let new = new_secret();
    store
        .rotate_key(
            &key.key_id,
            &new,
            "kw_live_...NEW1",
            60 * S,
            T0 + S,
            &ctx("key.rotate"),
        )
        .await
        .unwrap();
    let t = T0 + 10 * S;
    let deleted = store
        .delete_key(&key.key_id, t, &ctx("key.delete"))
        .await
        .unwrap();
    assert_eq!(deleted.key.deleted_at, Some(t));
    assert_eq!(hash_set(&deleted.stale_hashes), hash_set(&[old, new]));

    assert_eq!(store.get_key(&key.key_id).await.unwrap(), None);
    assert!(
        store
            .list_keys(&filter(WS, t), 100, None)
            .await
            .unwrap()
            .is_empty()
    );
    for (hash, valid_until) in [(old, Some(T0 + S + 60 * S)), (new, None)] {
        let found = store.find_secret(&hash).await.unwrap().unwrap();
        assert_eq!(found.key, deleted.key);
        assert_eq!(found.key.deleted_at, Some(t));
        assert_eq!(found.valid_until, valid_until);
    }
}

async fn mutations_of_unknown_or_deleted_keys_are_not_found_and_write_nothing(backend: Backend) {
    let (db, store) = open(backend).await;
    let deleted = key_record(WS, T0);
    insert(&*store, &deleted).await;
    store
        .delete_key(&deleted.key_id, T0 + S, &ctx("key.delete"))
        .await
        .unwrap();
    let rows_before = all_audit_rows(&db).await;
    let secrets_before = db.count("SELECT COUNT(*) FROM key_secrets").await;
    let now = T0 + 10 * S;

    for key_id in [
        new_key_id(&mut getrandom::SysRng).unwrap(),
        deleted.key_id.clone(),
    ] {
        let patch = KeyPatch {
            name: Some("x".into()),
            ..Default::default()
        };
        let results = [
            store
                .update_key(&key_id, &patch, now, &ctx("key.update"))
                .await
                .map(|_| ()),
            store
                .rotate_key(
                    &key_id,
                    &new_secret(),
                    "kw_live_...abcd",
                    0,
                    now,
                    &ctx("key.rotate"),
                )
                .await
                .map(|_| ()),
            store
                .revoke_key(&key_id, "r", now, &ctx("key.revoke"))
                .await
                .map(|_| ()),
            store
                .delete_key(&key_id, now, &ctx("key.delete"))
                .await
                .map(|_| ()),
        ];
        for (i, r) in results.into_iter().enumerate() {
            assert!(
                matches!(r, Err(StoreError::NotFound)),
                "mutation {i} of {key_id}: {r:?}"
            );
        }
    }
    assert_eq!(all_audit_rows(&db).await, rows_before);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM key_secrets").await,
        secrets_before
    );
    // The deleted key stays as it was deleted.
    let row = db
        .count(&format!(
            "SELECT COUNT(*) FROM api_keys WHERE key_id = '{}' AND deleted_at = {} \
             AND revoked_at IS NULL AND name = 'conformance key'",
            deleted.key_id,
            T0 + S
        ))
        .await;
    assert_eq!(row, 1);
}

// ---------------------------------------------------------------------------------------
// Audit.

async fn every_successful_mutation_writes_one_audit_row_newest_first(backend: Backend) {
    let (db, store) = open(backend).await;
    let key = key_record(WS, T0);
    let who = |action: &'static str, n: u32| AuditContext {
        actor_id: format!("actor_{n}"),
        caller: format!("caller-{n}"),
        action,
        detail: format!("detail {n}"),
    };
    let mut expected: Vec<(AuditContext, Micros)> = Vec::new();
    let check = |expected: &Vec<(AuditContext, Micros)>| {
        let store = store.clone();
        let expected = expected.clone();
        let key_id = key.key_id.clone();
        async move {
            let events = audit(&*store, WS).await;
            assert_eq!(events.len(), expected.len());
            for (event, (ctx, at)) in events.iter().zip(expected.iter().rev()) {
                assert_eq!(event.workspace_id, WS);
                assert_eq!(event.key_id.as_deref(), Some(key_id.as_str()));
                assert_eq!(event.actor_id, ctx.actor_id);
                assert_eq!(event.caller, ctx.caller);
                assert_eq!(event.action, ctx.action);
                assert_eq!(event.detail, ctx.detail);
                assert_eq!(event.outcome, AuditOutcome::Success);
                assert_eq!(event.occurred_at, *at);
            }
            assert!(events.windows(2).all(|w| w[0].id > w[1].id), "newest first");
        }
    };

    let c = who("key.issue", 1);
    store
        .insert_key(&key, &new_secret(), None, &c)
        .await
        .unwrap();
    expected.push((c, T0));
    check(&expected).await;

    let c = who("key.update", 2);
    let t = T0 + S;
    store
        .update_key(
            &key.key_id,
            &KeyPatch {
                name: Some("n".into()),
                ..Default::default()
            },
            t,
            &c,
        )
        .await
        .unwrap();
    expected.push((c, t));
    check(&expected).await;

    let c = who("key.rotate", 3);
    let t = T0 + 2 * S;
    store
        .rotate_key(&key.key_id, &new_secret(), "kw_live_...abcd", S, t, &c)
        .await
        .unwrap();
    expected.push((c, t));
    check(&expected).await;

    let c = who("key.revoke", 4);
    let t = T0 + 3 * S;
    store.revoke_key(&key.key_id, "r", t, &c).await.unwrap();
    expected.push((c, t));
    check(&expected).await;

    // Revoking again succeeds, so it is recorded too.
    let c = who("key.revoke", 5);
    let t = T0 + 4 * S;
    store.revoke_key(&key.key_id, "r", t, &c).await.unwrap();
    expected.push((c, t));
    check(&expected).await;

    let c = who("key.delete", 6);
    let t = T0 + 5 * S;
    store.delete_key(&key.key_id, t, &c).await.unwrap();
    expected.push((c, t));
    check(&expected).await;

    assert_eq!(all_audit_rows(&db).await, 6);
}

async fn record_denied_writes_a_denied_row_and_changes_nothing_else(backend: Backend) {
    let (db, store) = open(backend).await;
    let key = key_record(WS, T0);
    insert(&*store, &key).await;
    let denied = |key_id: Option<String>, at: Micros| DeniedAudit {
        workspace_id: WS.to_owned(),
        key_id,
        context: AuditContext {
            actor_id: "user_low".to_owned(),
            caller: "test-admin".to_owned(),
            action: "key.update",
            detail: "may not grant: admin".to_owned(),
        },
        occurred_at: at,
    };
    store
        .record_denied(&denied(Some(key.key_id.clone()), T0 + S))
        .await
        .unwrap();
    store
        .record_denied(&denied(None, T0 + 2 * S))
        .await
        .unwrap();

    let events = audit(&*store, WS).await;
    assert_eq!(events.len(), 3);
    for (event, key_id, at) in [
        (&events[0], None, T0 + 2 * S),
        (&events[1], Some(key.key_id.as_str()), T0 + S),
    ] {
        assert_eq!(event.outcome, AuditOutcome::Denied);
        assert_eq!(event.key_id.as_deref(), key_id);
        assert_eq!(event.workspace_id, WS);
        assert_eq!(event.actor_id, "user_low");
        assert_eq!(event.caller, "test-admin");
        assert_eq!(event.action, "key.update");
        assert_eq!(event.detail, "may not grant: admin");
        assert_eq!(event.occurred_at, at);
    }
    assert_eq!(events[2].outcome, AuditOutcome::Success);
    assert_eq!(store.get_key(&key.key_id).await.unwrap(), Some(key));
    assert_eq!(db.count("SELECT COUNT(*) FROM key_secrets").await, 1);
}

async fn list_audit_pages_by_before_id(backend: Backend) {
    let (_db, store) = open(backend).await;
    // Interleave another workspace, so this one's ids have gaps.
    for i in 0..7 {
        insert(&*store, &key_record(WS, T0 + i)).await;
        insert(&*store, &key_record("ws_other", T0 + i)).await;
    }
    let all = audit(&*store, WS).await;
    assert_eq!(all.len(), 7);
    assert!(all.iter().all(|e| e.workspace_id == WS));

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut before = None;
    loop {
        let page = store.list_audit(&audit_of(WS), 3, before).await.unwrap();
        sizes.push(page.len());
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        seen.extend(page);
        assert!(sizes.len() < 10, "paging does not end");
    }
    assert_eq!(sizes, [3, 3, 1, 0]);
    assert_eq!(seen, all);

    // A before_id between two events resumes right below it.
    let mid = all[2].id;
    let below: Vec<i64> = store
        .list_audit(&audit_of(WS), 100, Some(mid))
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let expected: Vec<i64> = all[3..].iter().map(|e| e.id).collect();
    assert_eq!(below, expected);
}

/// Each filter of the audit listing (key, actor, action, since, until), alone and
/// together, selects exactly the workspace's events that match, newest first, and pages
/// by before_id within the filter.
async fn list_audit_filters_by_key_actor_action_and_time(backend: Backend) {
    let (_db, store) = open(backend).await;
    let keys: Vec<String> = (0..3)
        .map(|_| new_key_id(&mut getrandom::SysRng).unwrap())
        .collect();
    let actions = ["key.update", "key.revoke", "key.rotate"];
    for i in 0..24u32 {
        for ws in [WS, "ws_other"] {
            let denied = DeniedAudit {
                workspace_id: ws.to_owned(),
                key_id: (i % 4 != 3).then(|| keys[i as usize % 3].clone()),
                context: AuditContext {
                    actor_id: format!("user_{}", i % 2),
                    caller: "test-admin".to_owned(),
                    action: actions[(i as usize / 2) % 3],
                    detail: format!("event {i}"),
                },
                occurred_at: T0 + Micros::from(i) * S,
            };
            store.record_denied(&denied).await.unwrap();
        }
    }
    let all = audit(&*store, WS).await;
    assert_eq!(all.len(), 24);
    let filters = [
        AuditFilter {
            key_id: Some(keys[1].clone()),
            ..audit_of(WS)
        },
        AuditFilter {
            actor_id: Some("user_1".into()),
            ..audit_of(WS)
        },
        AuditFilter {
            action: Some("key.revoke".into()),
            ..audit_of(WS)
        },
        AuditFilter {
            since: Some(T0 + 20 * S),
            ..audit_of(WS)
        },
        AuditFilter {
            until: Some(T0 + 3 * S),
            ..audit_of(WS)
        },
        AuditFilter {
            key_id: Some(keys[0].clone()),
            actor_id: Some("user_0".into()),
            since: Some(T0 + 2 * S),
            until: Some(T0 + 20 * S),
            ..audit_of(WS)
        },
        AuditFilter {
            action: Some("team.delete".into()),
            ..audit_of(WS)
        },
    ];
    for filter in filters {
        let expected: Vec<&AuditRecord> = all
            .iter()
            .filter(|e| {
                filter
                    .key_id
                    .as_ref()
                    .is_none_or(|k| e.key_id.as_ref() == Some(k))
            })
            .filter(|e| filter.actor_id.as_ref().is_none_or(|a| &e.actor_id == a))
            .filter(|e| filter.action.as_ref().is_none_or(|a| e.action == *a))
            .filter(|e| filter.since.is_none_or(|t| e.occurred_at >= t))
            .filter(|e| filter.until.is_none_or(|t| e.occurred_at < t))
            .collect();
        let listed = store.list_audit(&filter, 1000, None).await.unwrap();
        assert_eq!(listed.iter().collect::<Vec<_>>(), expected, "{filter:?}");
        // Paging by before_id stays within the filter.
        let mut paged = Vec::new();
        let mut before = None;
        loop {
            let page = store.list_audit(&filter, 2, before).await.unwrap();
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            paged.extend(page);
        }
        assert_eq!(
            paged.iter().collect::<Vec<_>>(),
            expected,
            "{filter:?} paged"
        );
    }
}

/// ListKeys narrows by name prefix (case-sensitive, wildcards literal), by one metadata
/// entry (exactly that key with that value) and by team.
async fn list_keys_filters_by_name_prefix_metadata_and_team(backend: Backend) {
    let (_db, store) = open(backend).await;
    let mk = |name: &str, meta: &[(&str, &str)], team: Option<&str>, at: Micros| KeyRecord {
        name: name.to_owned(),
        metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        team_id: team.map(str::to_owned),
        ..key_record(WS, at)
    };
    let keys = [
        mk("ci-runner", &[("env", "prod")], None, T0),
        mk("ci_other", &[("env", "Prod")], None, T0 + 1),
        mk("CI-upper", &[("env", "prod"), ("team", "ml")], None, T0 + 2),
        mk("batch", &[("note", "\"env\":\"prod\"")], None, T0 + 3),
        mk("cix", &[("environment", "prod")], None, T0 + 4),
    ];
    for key in &keys {
        insert(&*store, key).await;
    }
    let list = |f: KeyFilter| {
        let store = store.clone();
        async move { sorted(ids(&store.list_keys(&f, 100, None).await.unwrap())) }
    };
    let set = |picked: &[usize]| sorted(picked.iter().map(|i| keys[*i].key_id.clone()).collect());
    let prefix = |p: &str| KeyFilter {
        name_prefix: Some(p.to_owned()),
        ..filter(WS, T0)
    };
    assert_eq!(list(prefix("ci-")).await, set(&[0]));
    assert_eq!(list(prefix("ci")).await, set(&[0, 1, 4]), "case-sensitive");
    assert_eq!(list(prefix("ci_")).await, set(&[1]), "'_' is no wildcard");
    assert_eq!(list(prefix("%")).await, set(&[]));
    let meta = |k: &str, v: &str| KeyFilter {
        metadata: Some((k.to_owned(), v.to_owned())),
        ..filter(WS, T0)
    };
    assert_eq!(
        list(meta("env", "prod")).await,
        set(&[0, 2]),
        "exact key and value"
    );
    assert_eq!(list(meta("env", "Prod")).await, set(&[1]));
    assert_eq!(list(meta("team", "ml")).await, set(&[2]));
    assert_eq!(list(meta("env", "pro")).await, set(&[]));
}

/// A bulk revocation takes the selected keys neither revoked nor deleted, a chunk per
/// call by key id, each with its Revoked event and audit row; a repeat takes none.
async fn revoke_keys_takes_the_selection_a_chunk_at_a_time(backend: Backend) {
    let (db, store) = open(backend).await;
    let owned = |id: &str, at: Micros| KeyRecord {
        owner: Owner {
            kind: OwnerKind::User,
            id: id.to_owned(),
        },
        ..key_record(WS, at)
    };
    let mut ann: Vec<KeyRecord> = (0..5).map(|i| owned("user_ann", T0 + i)).collect();
    let bob = owned("user_bob", T0 + 10);
    let other_ws = KeyRecord {
        owner: ann[0].owner.clone(),
        ..key_record("ws_other", T0 + 11)
    };
    for key in ann.iter().chain([&bob, &other_ws]) {
        insert(&*store, key).await;
    }
    // One of ann's is revoked already.
    store
        .revoke_key(&ann[4].key_id, "before", T0 + S, &ctx("key.revoke"))
        .await
        .unwrap();
    ann.pop();
    let events_before = db.count("SELECT count(*) FROM key_events").await;
    let audit_before = all_audit_rows(&db).await;
    let selection = KeySelection {
        workspace_id: WS.to_owned(),
        owner: Some(ann[0].owner.clone()),
        ..KeySelection::default()
    };
    let mut counts = Vec::new();
    let mut stale = 0;
    loop {
        let (n, hashes) = store
            .revoke_keys(&selection, "offboarded", 3, T0 + 2 * S, &ctx("key.revoke"))
            .await
            .unwrap();
        counts.push(n);
        stale += hashes.len();
        if n < 3 {
            break;
        }
    }
    assert_eq!(counts, [3, 1]);
    assert_eq!(stale, 4);
    for key in &ann {
        let got = store.get_key(&key.key_id).await.unwrap().unwrap();
        assert_eq!(got.revoked_at, Some(T0 + 2 * S));
        assert_eq!(got.revoke_reason.as_deref(), Some("offboarded"));
    }
    for untouched in [&bob, &other_ws] {
        assert_eq!(
            store
                .get_key(&untouched.key_id)
                .await
                .unwrap()
                .unwrap()
                .revoked_at,
            None
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM key_events").await,
        events_before + 4
    );
    assert_eq!(all_audit_rows(&db).await, audit_before + 4);
    // Idempotent.
    let (n, hashes) = store
        .revoke_keys(&selection, "again", 3, T0 + 3 * S, &ctx("key.revoke"))
        .await
        .unwrap();
    assert_eq!((n, hashes.len()), (0, 0));
    // All of the workspace: only bob's is left.
    let (n, _) = store
        .revoke_keys(
            &KeySelection {
                workspace_id: WS.to_owned(),
                ..KeySelection::default()
            },
            "tenant suspended",
            100,
            T0 + 3 * S,
            &ctx("key.revoke"),
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(
        store
            .get_key(&other_ws.key_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none()
    );
}

/// Each audit filter is served by an index on both stores: the plan of the listing's
/// statement for a key, an actor or an action names that filter's own index, one for a
/// time range an index of the workspace, and none reads the table whole (Postgres is told to avoid a sequential
/// scan where it can, as a table of a few rows would otherwise invite one).
/// Every usage-history query (each grouping, with and without an owner and a cursor)
/// reads `usage_rollups` through an index of the workspace (or the owner's), never a scan
/// of the whole table.
async fn usage_queries_are_served_by_indexes(backend: Backend) {
    use keywarden::domain::rollup::{Granularity, GroupBy};
    use keywarden::store::UsageQuery;
    let (db, _store) = open(backend).await;
    if backend == Backend::Postgres {
        // Statistics of a table shared by many workspaces, as in production: on an empty
        // table the planner's costs tie and it may pick any index.
        db.execute(&format!(
            "INSERT INTO usage_rollups (key_id, granularity, bucket_start, workspace_id, \
             owner_kind, owner_id, team_id) SELECT 'key_' || g, 'hour', {T0}, 'ws_' || g, \
             'user', 'u' || g, '' FROM generate_series(1, 5000) AS g"
        ))
        .await;
        db.execute("ANALYZE usage_rollups").await;
    }
    for group_by in [
        GroupBy::Key,
        GroupBy::Owner,
        GroupBy::Team,
        GroupBy::Workspace,
    ] {
        for (owner, after) in [
            (None, None),
            (
                Some(owner(OwnerKind::User, "user_x")),
                Some((T0, "g".to_owned())),
            ),
        ] {
            let q = UsageQuery {
                workspace_id: WS.to_owned(),
                group_by,
                granularity: Granularity::Hour,
                since: T0,
                until: T0 + 86_400 * S,
                owner: owner.clone(),
                after: after.clone(),
                limit: 10,
            };
            let sql = keywarden::store::usage_query_sql(&q);
            let mut values = vec![
                format!("'{WS}'"),
                "'hour'".to_owned(),
                T0.to_string(),
                (T0 + 86_400 * S).to_string(),
            ];
            if let Some(o) = &owner {
                values.push(format!("'{}'", o.kind.as_str()));
                values.push(format!("'{}'", o.id));
            }
            if let Some((bucket, group)) = &after {
                values.push(bucket.to_string());
                values.push(format!("'{group}'"));
            }
            values.push("11".to_owned());
            let mut literal = sql.clone();
            for (i, value) in values.iter().enumerate().rev() {
                literal = literal.replace(&format!("${}", i + 1), value);
            }
            let plan = explain(backend, &db, &literal).await;
            let wanted = if owner.is_some() {
                "usage_rollups_by_owner"
            } else {
                "usage_rollups_by_workspace"
            };
            assert!(
                plan.contains(wanted),
                "{group_by:?}: {wanted} not in the plan:\n{plan}"
            );
            assert!(!plan.contains("Seq Scan"), "{group_by:?}:\n{plan}");
            assert!(
                !plan.contains("SCAN usage_rollups\n") && !plan.ends_with("SCAN usage_rollups"),
                "{group_by:?}:\n{plan}"
            );
        }
    }
}

/// The plan of a statement with its values in place: SQLite's EXPLAIN QUERY PLAN, or
/// Postgres's EXPLAIN with sequential scans priced out (a small table would otherwise be
/// scanned whatever its indexes).
async fn explain(backend: Backend, db: &TestDb, literal: &str) -> String {
    match backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            let rows: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {literal}")))
                    .fetch_all(&mut c)
                    .await
                    .unwrap();
            rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query("SET enable_seqscan = off")
                .execute(&mut c)
                .await
                .unwrap();
            let rows: Vec<(String,)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN {literal}")))
                    .fetch_all(&mut c)
                    .await
                    .unwrap();
            rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("\n")
        }
    }
}

async fn audit_filters_are_served_by_indexes(backend: Backend) {
    let (db, _store) = open(backend).await;
    let filters = [
        AuditFilter {
            key_id: Some("key_x".into()),
            ..audit_of(WS)
        },
        AuditFilter {
            actor_id: Some("user_x".into()),
            ..audit_of(WS)
        },
        AuditFilter {
            action: Some("key.revoke".into()),
            ..audit_of(WS)
        },
        AuditFilter {
            since: Some(T0),
            until: Some(T0 + S),
            ..audit_of(WS)
        },
    ];
    for filter in filters {
        let sql = keywarden::store::list_audit_sql(&filter);
        // Literal values in place of the parameters, in order: workspace, before id, then
        // each filter set, then the limit.
        let mut values = vec!["'ws_test'".to_owned(), "9223372036854775807".to_owned()];
        for text in [&filter.key_id, &filter.actor_id, &filter.action]
            .into_iter()
            .flatten()
        {
            values.push(format!("'{text}'"));
        }
        for at in [filter.since, filter.until].into_iter().flatten() {
            values.push(at.to_string());
        }
        values.push("10".to_owned());
        let mut literal = sql.clone();
        for (i, value) in values.iter().enumerate().rev() {
            literal = literal.replace(&format!("${}", i + 1), value);
        }
        let plan = explain(backend, &db, &literal).await;
        let wanted = if filter.key_id.is_some() {
            "audit_events_by_key"
        } else if filter.actor_id.is_some() {
            "audit_events_by_actor"
        } else if filter.action.is_some() {
            "audit_events_by_action"
        } else {
            // A time range alone: an index of the workspace either way. On a few rows both
            // stores walk the workspace's ids newest first and filter the range (no sort);
            // on a long log Postgres weighs audit_events_by_time against that walk.
            "audit_events_by_"
        };
        assert!(
            plan.contains(wanted),
            "{filter:?}: {wanted} not in the plan:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{filter:?}:\n{plan}");
        assert!(
            !plan.contains("SCAN audit_events\n") && !plan.ends_with("SCAN audit_events"),
            "{filter:?}:\n{plan}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Atomicity and concurrency.

async fn a_failed_insert_leaves_neither_the_key_nor_an_audit_row(backend: Backend) {
    let (db, store) = open(backend).await;
    let first = key_record(WS, T0);
    let secret = insert(&*store, &first).await;

    // The same secret hash for another key, in this workspace and another.
    for ws in [WS, "ws_other"] {
        let dup = key_record(ws, T0 + S);
        let err = store
            .insert_key(&dup, &secret, None, &ctx("key.issue"))
            .await
            .unwrap_err();
        assert!(
            !matches!(err, StoreError::NotFound | StoreError::Precondition(_)),
            "{err:?}"
        );
        assert_eq!(store.get_key(&dup.key_id).await.unwrap(), None);
        assert_eq!(
            db.count(&format!(
                "SELECT COUNT(*) FROM api_keys WHERE key_id = '{}'",
                dup.key_id
            ))
            .await,
            0
        );
    }
    // The same key id with a new secret.
    let other_secret = new_secret();
    assert!(
        store
            .insert_key(&first, &other_secret, None, &ctx("key.issue"))
            .await
            .is_err()
    );
    assert!(store.find_secret(&other_secret).await.unwrap().is_none());

    assert_eq!(
        ids(&store.list_keys(&filter(WS, T0), 100, None).await.unwrap()),
        std::slice::from_ref(&first.key_id)
    );
    assert_eq!(audit(&*store, WS).await.len(), 1);
    assert!(audit(&*store, "ws_other").await.is_empty());
    assert_eq!(all_audit_rows(&db).await, 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM api_keys").await, 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM key_secrets").await, 1);
    assert_eq!(
        store.find_secret(&secret).await.unwrap().unwrap().key,
        first
    );
}

async fn concurrent_rotations_of_one_key_all_succeed_and_leave_one_current_secret(
    backend: Backend,
) {
    let (db, store) = open(backend).await;
    let key = key_record(WS, T0);
    let original = insert(&*store, &key).await;
    let now = T0 + S;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            let key_id = key.key_id.clone();
            let secret = new_secret();
            let display = format!("kw_live_...{i:04}");
            tokio::spawn(async move {
                let r = store
                    .rotate_key(&key_id, &secret, &display, 60 * S, now, &ctx("key.rotate"))
                    .await;
                (secret, display, r)
            })
        })
        .collect();
    let mut secrets = vec![(original, key.display.clone())];
    for task in tasks {
        let (secret, display, r) = task.await.unwrap();
        let rotated = r.unwrap();
        assert!(!rotated.stale_hashes.contains(&secret));
        assert!(rotated.stale_hashes.contains(&original));
        secrets.push((secret, display));
    }

    assert_eq!(secret_rows(&db, &key.key_id).await, 21);
    assert_eq!(current_secret_rows(&db, &key.key_id).await, 1);
    let current = store.get_key(&key.key_id).await.unwrap().unwrap();
    let mut current_count = 0;
    for (secret, display) in &secrets {
        let found = store.find_secret(secret).await.unwrap().unwrap();
        match found.valid_until {
            None => {
                current_count += 1;
                // The key shows the display of its current secret.
                assert_eq!(&current.display, display);
            }
            Some(until) => assert_eq!(until, now + 60 * S),
        }
    }
    assert_eq!(current_count, 1);
    assert_eq!(audit(&*store, WS).await.len(), 21);
}

async fn concurrent_revokes_and_rotations_leave_a_consistent_key(backend: Backend) {
    let (db, store) = open(backend).await;
    let key = key_record(WS, T0);
    let original = insert(&*store, &key).await;
    let now = T0 + S;

    enum Outcome {
        Revoked(String, KeyRecord),
        Rotated(KeyHash, String, KeyRecord),
        RefusedRevoked,
    }
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            let key_id = key.key_id.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let reason = format!("reason {i}");
                    let changed = store
                        .revoke_key(&key_id, &reason, now, &ctx("key.revoke"))
                        .await
                        .unwrap();
                    Outcome::Revoked(reason, changed.key)
                } else {
                    let secret = new_secret();
                    let display = format!("kw_live_...{i:04}");
                    match store
                        .rotate_key(&key_id, &secret, &display, 0, now, &ctx("key.rotate"))
                        .await
                    {
                        Ok(rotated) => Outcome::Rotated(secret, display, rotated.key),
                        Err(StoreError::Precondition(_)) => Outcome::RefusedRevoked,
                        Err(e) => panic!("rotation {i} failed uncleanly: {e:?}"),
                    }
                }
            })
        })
        .collect();

    let mut reasons = Vec::new();
    let mut rotated = Vec::new();
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Outcome::Revoked(reason, k) => {
                assert_eq!(k.revoked_at, Some(now));
                reasons.push((reason, k.revoke_reason.unwrap()));
            }
            Outcome::Rotated(secret, display, k) => {
                assert_eq!(
                    k.revoked_at, None,
                    "a rotation that succeeded preceded the revoke"
                );
                rotated.push((secret, display));
            }
            Outcome::RefusedRevoked => refused += 1,
        }
    }
    assert_eq!(reasons.len(), 10);
    assert_eq!(rotated.len() + refused, 10);

    // Every revoke reports the one that won.
    let final_key = store.get_key(&key.key_id).await.unwrap().unwrap();
    let winner = final_key.revoke_reason.clone().unwrap();
    assert!(reasons.iter().any(|(asked, _)| *asked == winner));
    assert!(reasons.iter().all(|(_, reported)| *reported == winner));
    assert_eq!(final_key.revoked_at, Some(now));

    assert_eq!(
        secret_rows(&db, &key.key_id).await,
        1 + rotated.len() as i64
    );
    assert_eq!(current_secret_rows(&db, &key.key_id).await, 1);
    let mut current = Vec::new();
    for (secret, display) in std::iter::once((original, key.display.clone())).chain(rotated.clone())
    {
        let found = store.find_secret(&secret).await.unwrap().unwrap();
        if found.valid_until.is_none() {
            current.push(display);
        }
    }
    assert_eq!(current.len(), 1);
    assert_eq!(final_key.display, current[0]);
    assert_eq!(
        audit(&*store, WS).await.len(),
        1 + reasons.len() + rotated.len()
    );
}

async fn limits_and_budgets_round_trip_and_update_patches_them(backend: Backend) {
    let (_db, store) = open(backend).await;
    let mut key = key_record(WS, T0);
    key.rate_limits = vec![
        RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit: 10,
        },
        RateLimit {
            unit: LimitUnit::Tokens,
            window: LimitWindow::Day,
            limit: 1_000_000,
        },
    ];
    key.max_budget_micros = Some(i64::MAX as u64);
    insert(store.as_ref(), &key).await;
    assert_eq!(store.get_key(&key.key_id).await.unwrap().unwrap(), key);
    let patch = KeyPatch {
        rate_limits: Some(vec![]),
        max_budget_micros: Some(None),
        ..KeyPatch::default()
    };
    let changed = store
        .update_key(&key.key_id, &patch, T0 + S, &ctx("key.update"))
        .await
        .unwrap();
    let stored = store.get_key(&key.key_id).await.unwrap().unwrap();
    assert_eq!(changed.key, stored);
    assert!(stored.rate_limits.is_empty());
    assert_eq!(stored.max_budget_micros, None);
}

async fn usage_adds_spend_and_moves_last_use_forward_only(backend: Backend) {
    let (_db, store) = open(backend).await;
    let key = key_record(WS, T0);
    insert(store.as_ref(), &key).await;
    let delta = |spend: u64, used: Option<Micros>| UsageDelta {
        key_id: key.key_id.clone(),
        epoch: 0,
        spend_micros: spend,
        last_used_at: used,
    };
    let unknown = UsageDelta {
        key_id: new_key_id(&mut getrandom::SysRng).unwrap(),
        epoch: 0,
        spend_micros: 7,
        last_used_at: Some(T0),
    };
    let totals = store
        .record_usage(&[delta(5, Some(T0 + 100)), unknown])
        .await
        .unwrap();
    assert_eq!(
        totals,
        [(key.key_id.clone(), 5, 0)],
        "unknown keys are skipped"
    );
    // An older use never moves last_used_at back; spend adds up.
    let totals = store
        .record_usage(&[delta(3, Some(T0 + 50))])
        .await
        .unwrap();
    assert_eq!(totals, [(key.key_id.clone(), 8, 0)]);
    let totals = store.record_usage(&[delta(0, None)]).await.unwrap();
    assert_eq!(totals, [(key.key_id.clone(), 8, 0)]);
    let stored = store.get_key(&key.key_id).await.unwrap().unwrap();
    assert_eq!(
        (stored.spent_micros, stored.last_used_at),
        (8, Some(T0 + 100))
    );
    assert_eq!(store.record_usage(&[]).await.unwrap(), []);
}

/// Spend belongs to an epoch: a write of a newer epoch replaces the stored spend, one of
/// an older epoch changes nothing, and a budget reset starts a new epoch at zero.
async fn usage_of_a_newer_epoch_replaces_an_older_one_and_a_reset_starts_one(backend: Backend) {
    let (_db, store) = open(backend).await;
    let key = KeyRecord {
        max_budget_micros: Some(1_000),
        budget_period: BudgetPeriod::Month,
        ..key_record(WS, T0)
    };
    insert(store.as_ref(), &key).await;
    let spend = |epoch: Micros, spend: u64| UsageDelta {
        key_id: key.key_id.clone(),
        epoch,
        spend_micros: spend,
        last_used_at: None,
    };
    let (january, february) = (T0, T0 + 31 * 86_400 * S);
    let id = key.key_id.clone();
    assert_eq!(
        store.record_usage(&[spend(january, 40)]).await.unwrap(),
        [(id.clone(), 40, january)]
    );
    assert_eq!(
        store.record_usage(&[spend(february, 7)]).await.unwrap(),
        [(id.clone(), 7, february)],
        "a new epoch starts from its own spend"
    );
    assert_eq!(
        store.record_usage(&[spend(january, 100)]).await.unwrap(),
        [(id.clone(), 7, february)],
        "a late write of an ended epoch changes nothing"
    );
    let reset_at = february + 5 * S;
    let changed = store
        .reset_budget(&id, reset_at, &ctx("key.reset_budget"))
        .await
        .unwrap();
    assert_eq!(changed.key.spent_micros, 0);
    assert_eq!(changed.key.budget_reset_at, reset_at);
    assert_eq!(changed.key.spend_epoch, reset_at);
    assert!(
        !changed.stale_hashes.is_empty(),
        "every replica reloads the key"
    );
    assert_eq!(
        store.record_usage(&[spend(february, 9)]).await.unwrap(),
        [(id.clone(), 0, reset_at)],
        "spend from before the reset does not count after it"
    );
    let stored = store.get_key(&id).await.unwrap().unwrap();
    assert_eq!(
        (
            stored.spent_micros,
            stored.spend_epoch,
            stored.budget_period
        ),
        (0, reset_at, BudgetPeriod::Month)
    );
    assert!(matches!(
        store
            .reset_budget("key_missing", reset_at, &ctx("key.reset_budget"))
            .await,
        Err(StoreError::NotFound)
    ));
}

/// A periodic budget whose period turned is started again by the sweep, once: its stored
/// spend at zero in the new epoch, an UPDATED event for the key and an audit row by
/// `keywarden`; a lifetime budget never is.
async fn the_budget_sweep_starts_turned_periods_once_with_an_event_and_an_audit_row(
    backend: Backend,
) {
    use keywarden::domain::budget;
    let (_db, store) = open(backend).await;
    let monthly = KeyRecord {
        max_budget_micros: Some(1_000),
        budget_period: BudgetPeriod::Month,
        ..key_record(WS, T0)
    };
    let lifetime = KeyRecord {
        max_budget_micros: Some(1_000),
        ..key_record(WS, T0)
    };
    insert(store.as_ref(), &monthly).await;
    insert(store.as_ref(), &lifetime).await;
    let this_month = budget::epoch(BudgetPeriod::Month, 0, 0, T0);
    let spend = |k: &KeyRecord, epoch| UsageDelta {
        key_id: k.key_id.clone(),
        epoch,
        spend_micros: 400,
        last_used_at: None,
    };
    store
        .record_usage(&[spend(&monthly, this_month.start), spend(&lifetime, 0)])
        .await
        .unwrap();
    let seq = store.event_bounds().await.unwrap().head;
    assert_eq!(
        store
            .reset_due_budgets(this_month.ends - 1, 100)
            .await
            .unwrap(),
        0,
        "not before the month's end"
    );
    let after = this_month.ends + 5 * S;
    assert_eq!(store.reset_due_budgets(after, 100).await.unwrap(), 1);
    assert_eq!(
        store.reset_due_budgets(after, 100).await.unwrap(),
        0,
        "once"
    );
    let key = store.get_key(&monthly.key_id).await.unwrap().unwrap();
    assert_eq!((key.spent_micros, key.spend_epoch), (0, this_month.ends));
    let events = store.read_events(seq, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].key_id, monthly.key_id);
    assert_eq!(events[0].kind, EventKind::Updated);
    let rows = audit(store.as_ref(), WS).await;
    let reset: Vec<_> = rows
        .iter()
        .filter(|r| r.action == "key.budget_period_reset")
        .collect();
    assert_eq!(reset.len(), 1);
    assert_eq!(reset[0].actor_id, "keywarden");
    let untouched = store.get_key(&lifetime.key_id).await.unwrap().unwrap();
    assert_eq!(untouched.spent_micros, 400);
    // The next turn is a month later.
    let next = budget::epoch(BudgetPeriod::Month, 0, 0, after).ends;
    assert_eq!(store.reset_due_budgets(next - 1, 100).await.unwrap(), 0);
    assert_eq!(store.reset_due_budgets(next, 100).await.unwrap(), 1);
}

/// Rollups add up per key, granularity and bucket; a query reads one granularity of one
/// workspace, optionally one owner's; pruning removes hours and days by their own age;
/// tokens and spend saturate rather than overflow.
async fn rollups_add_up_are_queried_and_pruned_by_age(backend: Backend) {
    use keywarden::domain::limits::MAX_SPEND_MICROS as MAX;
    use keywarden::domain::rollup::{Granularity, GroupBy, Tally};
    use keywarden::store::{Rollup, UsageQuery};
    let (db, store) = open(backend).await;
    db.create_workspaces(&["ws_other"], "pro").await;
    let (mine, other_owner) = (
        key_record(WS, T0),
        KeyRecord {
            owner: owner(OwnerKind::User, "user_9"),
            ..key_record(WS, T0 + 1)
        },
    );
    let elsewhere = key_record("ws_other", T0 + 2);
    for k in [&mine, &other_owner, &elsewhere] {
        insert(store.as_ref(), k).await;
    }
    let hour = Granularity::Hour.bucket(T0);
    let row = |k: &KeyRecord, g: Granularity, at: Micros, admitted: u64, spend: u64| Rollup {
        key_id: k.key_id.clone(),
        granularity: g,
        bucket_start: g.bucket(at),
        tally: Tally {
            admitted,
            spend_micros: spend,
            ..Tally::default()
        },
    };
    let unknown = KeyRecord::sample(&new_key_id(&mut getrandom::SysRng).unwrap());
    store
        .record_rollups(&[
            row(&mine, Granularity::Hour, hour, 2, 10),
            row(&mine, Granularity::Day, hour, 2, 10),
            row(&other_owner, Granularity::Hour, hour, 1, 0),
            row(&elsewhere, Granularity::Hour, hour, 7, 0),
            row(&unknown, Granularity::Hour, hour, 5, 0),
        ])
        .await
        .unwrap();
    store
        .record_rollups(&[row(&mine, Granularity::Hour, hour, 3, MAX)])
        .await
        .unwrap();
    store
        .record_rollups(&[row(&mine, Granularity::Hour, hour, 0, MAX)])
        .await
        .unwrap();
    let q = |group_by, owner: Option<Owner>| UsageQuery {
        workspace_id: WS.to_owned(),
        group_by,
        granularity: Granularity::Hour,
        since: hour,
        until: hour + 3_600 * S,
        owner,
        after: None,
        limit: 10,
    };
    let rows = store
        .query_usage(&q(GroupBy::Workspace, None))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].group, WS);
    assert_eq!(
        rows[0].tally.admitted, 6,
        "2 + 3 of mine, 1 of the other owner"
    );
    assert_eq!(rows[0].tally.spend_micros, MAX, "saturated, not overflowed");
    let rows = store
        .query_usage(&q(GroupBy::Owner, Some(mine.owner.clone())))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].group, format!("user:{}", mine.owner.id));
    assert_eq!(rows[0].tally.admitted, 5);
    let rows = store.query_usage(&q(GroupBy::Key, None)).await.unwrap();
    assert_eq!(
        rows.len(),
        2,
        "the unknown key was skipped, ws_other not read"
    );
    let after = Some((rows[0].bucket_start, rows[0].group.clone()));
    let rest = store
        .query_usage(&UsageQuery {
            after,
            ..q(GroupBy::Key, None)
        })
        .await
        .unwrap();
    assert_eq!(rest, rows[1..]);

    // Hours go before days: an hour older than its cutoff, a day not older than its own.
    let pruned = store
        .prune_rollups(hour + 1, Granularity::Day.bucket(hour))
        .await
        .unwrap();
    assert_eq!(pruned, 3, "the three hour rows in either workspace");
    let days = store
        .query_usage(&UsageQuery {
            granularity: Granularity::Day,
            since: Granularity::Day.bucket(hour),
            until: Granularity::Day.bucket(hour) + 86_400 * S,
            ..q(GroupBy::Workspace, None)
        })
        .await
        .unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].tally.admitted, 2);
}

/// A key's stored spend saturates at `MAX_SPEND_MICROS`, whatever the deltas, and the
/// statement never overflows BIGINT (which would fail it for every key in the batch); a
/// total already above the ceiling (stored before there was one) neither grows nor falls.
async fn usage_saturates_spend_at_the_ceiling_without_overflowing(backend: Backend) {
    use keywarden::domain::limits::MAX_SPEND_MICROS as MAX;
    let (db, store) = open(backend).await;
    let (key, above) = (key_record(WS, T0), key_record(WS, T0 + 1));
    insert(store.as_ref(), &key).await;
    insert(store.as_ref(), &above).await;
    let spend = |k: &KeyRecord, spend: u64| UsageDelta {
        key_id: k.key_id.clone(),
        epoch: 0,
        spend_micros: spend,
        last_used_at: None,
    };
    let totals = store.record_usage(&[spend(&key, MAX - 10)]).await.unwrap();
    assert_eq!(totals, [(key.key_id.clone(), MAX - 10, 0)]);
    let totals = store.record_usage(&[spend(&key, 100)]).await.unwrap();
    assert_eq!(totals, [(key.key_id.clone(), MAX, 0)]);
    let totals = store.record_usage(&[spend(&key, u64::MAX)]).await.unwrap();
    assert_eq!(totals, [(key.key_id.clone(), MAX, 0)]);

    let stored_above = i64::MAX - 807;
    db.execute(&format!(
        "UPDATE api_keys SET spent_micros = {stored_above} WHERE key_id = '{}'",
        above.key_id
    ))
    .await;
    let mut totals = store
        .record_usage(&[spend(&above, 1_000_000_000_000), spend(&key, 1)])
        .await
        .unwrap();
    totals.sort();
    let mut expected = vec![
        (above.key_id.clone(), stored_above as u64, 0),
        (key.key_id.clone(), MAX, 0),
    ];
    expected.sort();
    assert_eq!(totals, expected);
    let stored = store.get_key(&key.key_id).await.unwrap().unwrap();
    assert_eq!(stored.spent_micros, MAX);
}

/// Before spend had a ceiling, SQLite stored a sum past the INTEGER range as REAL, and the
/// usage statement's RETURNING then failed to decode it after the statement had
/// committed, so every key written with it was written again at the next flush. Such a
/// total is now turned into the largest integer by the next write, which succeeds and
/// writes the other keys once.
#[tokio::test]
async fn sqlite_a_spend_stored_as_real_by_an_old_overflow_is_written_back_as_an_integer() {
    let (db, store) = open(Backend::Sqlite).await;
    let (real, other) = (key_record(WS, T0), key_record(WS, T0 + 1));
    insert(store.as_ref(), &real).await;
    insert(store.as_ref(), &other).await;
    db.execute(&format!(
        "UPDATE api_keys SET spent_micros = 9223372036854775000 + 1000000000000 \
         WHERE key_id = '{}'",
        real.key_id
    ))
    .await;
    let typeof_real = format!(
        "SELECT count(*) FROM api_keys WHERE typeof(spent_micros) = 'real' AND key_id = '{}'",
        real.key_id
    );
    assert_eq!(db.count(&typeof_real).await, 1);
    let delta = |k: &KeyRecord, spend: u64| UsageDelta {
        key_id: k.key_id.clone(),
        epoch: 0,
        spend_micros: spend,
        last_used_at: None,
    };
    let mut totals = store
        .record_usage(&[delta(&real, 5), delta(&other, 7)])
        .await
        .unwrap();
    totals.sort();
    let mut expected = vec![
        (real.key_id.clone(), i64::MAX as u64, 0),
        (other.key_id.clone(), 7, 0),
    ];
    expected.sort();
    assert_eq!(totals, expected);
    assert_eq!(db.count(&typeof_real).await, 0);
    let stored = store.get_key(&real.key_id).await.unwrap().unwrap();
    assert_eq!(stored.spent_micros, i64::MAX as u64);
}

async fn list_filters_by_unused_since(backend: Backend) {
    let (_db, store) = open(backend).await;
    let (old, recent, never) = (
        key_record(WS, T0),
        key_record(WS, T0 + 1),
        key_record(WS, T0 + 2),
    );
    for k in [&old, &recent, &never] {
        insert(store.as_ref(), k).await;
    }
    let used = |k: &KeyRecord, at: Micros| UsageDelta {
        key_id: k.key_id.clone(),
        epoch: 0,
        spend_micros: 0,
        last_used_at: Some(at),
    };
    store
        .record_usage(&[used(&old, T0 + 10 * S), used(&recent, T0 + 20 * S)])
        .await
        .unwrap();
    let unused_since = |at: Micros| {
        let store = store.clone();
        async move {
            let mut f = filter(WS, T0 + 30 * S);
            f.unused_since = Some(at);
            let mut found = ids(&store.list_keys(&f, 10, None).await.unwrap());
            found.sort();
            found
        }
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        unused_since(T0 + 20 * S).await,
        sorted(vec![old.key_id.clone(), never.key_id.clone()])
    );
    assert_eq!(
        unused_since(T0 + 10 * S).await,
        sorted(vec![never.key_id.clone()])
    );
    assert_eq!(
        unused_since(T0 + 21 * S).await,
        sorted(vec![
            old.key_id.clone(),
            recent.key_id.clone(),
            never.key_id.clone()
        ])
    );
}

/// The usage book rewrites `spent_micros` and `last_used_at` of every key in use, in
/// batches. No index may name either column: then Postgres can update the row in place
/// (a heap-only tuple, with room left on each page) and no index is written on a flush.
async fn no_index_names_a_column_the_usage_book_writes(backend: Backend) {
    let (db, _store) = open(backend).await;
    let (indexed, room) = match backend {
        Backend::Sqlite => (
            "SELECT COUNT(*) FROM pragma_index_list('api_keys') AS l \
             JOIN pragma_index_info(l.name) AS i \
             WHERE i.name IN ('spent_micros', 'last_used_at')",
            None,
        ),
        Backend::Postgres => (
            "SELECT COUNT(*) FROM pg_index AS i JOIN pg_attribute AS a \
             ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
             WHERE i.indrelid = 'api_keys'::regclass \
             AND a.attname IN ('spent_micros', 'last_used_at')",
            Some(
                "SELECT COUNT(*) FROM pg_class, unnest(reloptions) AS o \
                 WHERE relname = 'api_keys' AND o LIKE 'fillfactor=%' \
                 AND split_part(o, '=', 2)::int < 100",
            ),
        ),
    };
    assert_eq!(db.count(indexed).await, 0, "an index names a usage column");
    if let Some(room) = room {
        assert_eq!(db.count(room).await, 1, "api_keys pages keep no room");
    }
}

/// A team update applies its patch to the team as it stands: an update of the name,
/// made by a caller that read the team before a policy change, keeps that policy.
async fn team_updates_of_different_fields_both_take_effect(backend: Backend) {
    let (db, store) = open(backend).await;
    db.create_workspaces(&[WS], "pro").await;
    let team = Team {
        workspace_id: WS.to_owned(),
        team_id: "team_ml".to_owned(),
        name: "ML".to_owned(),
        policy: TeamPolicy::default(),
        rate_limits: Vec::new(),
        budget: None,
        spend: Default::default(),
        created_at: T0,
        updated_at: T0,
    };
    store.insert_team(&team, &ctx("team.create")).await.unwrap();
    let policy = TeamPolicy {
        max_keys_per_user: 3,
        require_expiry: true,
        ..TeamPolicy::default()
    };
    let patch = |name: Option<&str>, policy: Option<&TeamPolicy>| TeamPatch {
        name: name.map(str::to_owned),
        policy: policy.cloned(),
        rate_limits: None,
        budget: None,
    };
    let (first, _) = store
        .update_team(
            WS,
            "team_ml",
            &patch(None, Some(&policy)),
            T0 + S,
            &ctx("team.update"),
        )
        .await
        .unwrap();
    assert_eq!((first.name.as_str(), &first.policy), ("ML", &policy));
    let (written, stale) = store
        .update_team(
            WS,
            "team_ml",
            &patch(Some("Machine learning"), None),
            T0 + 2 * S,
            &ctx("team.update"),
        )
        .await
        .unwrap();
    let expected = Team {
        name: "Machine learning".to_owned(),
        policy,
        updated_at: T0 + 2 * S,
        ..team
    };
    assert_eq!(written, expected);
    assert!(
        stale.is_empty(),
        "the reach did not change: no key is stale"
    );
    assert_eq!(store.get_team(WS, "team_ml").await.unwrap(), Some(expected));
    let audit_rows = all_audit_rows(&db).await;
    assert!(matches!(
        store
            .update_team(
                WS,
                "team_none",
                &patch(Some("x"), None),
                T0,
                &ctx("team.update")
            )
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        all_audit_rows(&db).await,
        audit_rows,
        "a failed update audits nothing"
    );
}

fn group(name: &str) -> AccessGroup {
    AccessGroup {
        workspace_id: WS.to_owned(),
        name: name.to_owned(),
        targets: ["claude-sonnet".to_owned()].into(),
        created_at: T0,
        updated_at: T0,
    }
}

fn reaching(groups: &[&str]) -> ResourceAccess {
    ResourceAccess {
        mode: AccessMode::Include,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        ..ResourceAccess::default()
    }
}

fn team_reaching(team_id: &str, groups: &[&str]) -> Team {
    Team {
        workspace_id: WS.to_owned(),
        team_id: team_id.to_owned(),
        name: team_id.to_owned(),
        policy: TeamPolicy {
            resource_access: reaching(groups),
            ..TeamPolicy::default()
        },
        rate_limits: Vec::new(),
        budget: None,
        spend: Default::default(),
        created_at: T0,
        updated_at: T0,
    }
}

/// The store's refusal of a reach naming groups the workspace lacks: the missing ones only.
/// The store's refusal of a mutation, for `reason`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, StoreError>, reason: Reason) -> Refusal {
    match result {
        Err(StoreError::Precondition(refusal)) if refusal.reason == reason => refusal,
        other => panic!("expected a refusal for {reason:?}, got {other:?}"),
    }
}

fn assert_groups_missing<T: std::fmt::Debug>(result: Result<T, StoreError>, missing: &str) {
    let refusal = assert_refused(result, Reason::AccessGroupsMissing);
    assert!(
        refusal.message.ends_with(&format!(": {missing}")),
        "{}",
        refusal.message
    );
}

/// Every mutation that writes a reach (a key's or a team's) checks the groups it names in
/// its own transaction: a missing one refuses the whole mutation, which writes nothing.
async fn a_reach_naming_a_missing_group_is_refused_and_writes_nothing(backend: Backend) {
    let (db, store) = open(backend).await;
    db.create_workspaces(&[WS], "pro").await;
    store
        .insert_group(&group("g_known"), &ctx("access_group.create"))
        .await
        .unwrap();
    let kept = key_record(WS, T0);
    insert(store.as_ref(), &kept).await;
    store
        .insert_team(&team_reaching("team_ml", &["g_known"]), &ctx("team.create"))
        .await
        .unwrap();
    let (audit_rows, key_rows) = (
        all_audit_rows(&db).await,
        db.count("SELECT COUNT(*) FROM api_keys").await,
    );

    let key = KeyRecord {
        resource_access: reaching(&["g_known", "g_gone"]),
        ..key_record(WS, T0)
    };
    assert_groups_missing(
        store
            .insert_key(&key, &new_secret(), None, &ctx("key.issue"))
            .await,
        "g_gone",
    );
    assert_eq!(store.get_key(&key.key_id).await.unwrap(), None);
    let patch = KeyPatch {
        name: Some("renamed".to_owned()),
        resource_access: Some(reaching(&["g_gone"])),
        ..KeyPatch::default()
    };
    assert_groups_missing(
        store
            .update_key(&kept.key_id, &patch, T0 + S, &ctx("key.update"))
            .await,
        "g_gone",
    );
    assert_eq!(
        store.get_key(&kept.key_id).await.unwrap(),
        Some(kept.clone())
    );
    assert_groups_missing(
        store
            .insert_team(&team_reaching("team_new", &["g_gone"]), &ctx("team.create"))
            .await,
        "g_gone",
    );
    assert_eq!(store.get_team(WS, "team_new").await.unwrap(), None);
    let team_patch = TeamPatch {
        name: Some("renamed".to_owned()),
        policy: Some(team_reaching("team_ml", &["g_gone"]).policy),
        rate_limits: None,
        budget: None,
    };
    assert_groups_missing(
        store
            .update_team(WS, "team_ml", &team_patch, T0 + S, &ctx("team.update"))
            .await,
        "g_gone",
    );
    assert_eq!(
        store.get_team(WS, "team_ml").await.unwrap(),
        Some(team_reaching("team_ml", &["g_known"]))
    );
    assert_eq!(
        all_audit_rows(&db).await,
        audit_rows,
        "refusals audit nothing here"
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM api_keys").await, key_rows);

    // The same mutations naming only known groups go through.
    let key = KeyRecord {
        resource_access: reaching(&["g_known"]),
        ..key_record(WS, T0)
    };
    insert(store.as_ref(), &key).await;
    assert_eq!(
        store
            .get_key(&key.key_id)
            .await
            .unwrap()
            .map(|k| k.resource_access.groups),
        Some(["g_known".to_owned()].into())
    );
}

/// A key of `owner` in team `team_ml`, issued at `at`.
fn member_key(owner_id: &str, at: Micros) -> KeyRecord {
    KeyRecord {
        owner: owner(OwnerKind::User, owner_id),
        team_id: Some("team_ml".to_owned()),
        ..key_record(WS, at)
    }
}

/// `find_secret` gives the key with its reach resolved as it stands: its team's reach,
/// and the targets of the groups the key and its team name (and only those), read again
/// on every call, so a group changed since shows its new targets.
async fn find_secret_resolves_the_key_s_reach(backend: Backend) {
    let (db, store) = open(backend).await;
    db.create_workspaces(&[WS], "pro").await;
    let with_targets = |name: &str, targets: &[&str]| AccessGroup {
        targets: targets.iter().map(|t| (*t).to_owned()).collect(),
        ..group(name)
    };
    for g in [
        with_targets("g_key", &["opus"]),
        with_targets("g_team", &["sonnet"]),
        with_targets("g_other", &["secret"]),
    ] {
        store
            .insert_group(&g, &ctx("access_group.create"))
            .await
            .unwrap();
    }
    store
        .insert_team(&team_reaching("team_ml", &["g_team"]), &ctx("team.create"))
        .await
        .unwrap();
    let key = KeyRecord {
        team_id: Some("team_ml".to_owned()),
        resource_access: reaching(&["g_key"]),
        ..key_record(WS, T0)
    };
    let secret = insert(store.as_ref(), &key).await;
    let found = store.find_secret(&secret).await.unwrap().unwrap().key;
    assert_eq!(
        found.resource_access.group_targets,
        ["opus".to_owned()].into()
    );
    assert_eq!(found.team_access.groups, ["g_team".to_owned()].into());
    assert_eq!(
        found.team_access.group_targets,
        ["sonnet".to_owned()].into()
    );
    store
        .update_group(
            WS,
            "g_team",
            &["haiku".to_owned()].into(),
            T0 + S,
            &ctx("access_group.update"),
        )
        .await
        .unwrap();
    let found = store.find_secret(&secret).await.unwrap().unwrap().key;
    assert_eq!(found.team_access.group_targets, ["haiku".to_owned()].into());
    // A key of no team naming no group has nothing to resolve.
    let plain = key_record(WS, T0);
    let secret = insert(store.as_ref(), &plain).await;
    let found = store.find_secret(&secret).await.unwrap().unwrap().key;
    assert_eq!(found.team_access, ResourceAccess::default());
    assert!(found.resource_access.group_targets.is_empty());
}

/// A key's pools come back with it, owner, team then workspace, each under its own
/// counter name; setting a pool reloads exactly the keys it covers; an owner's pool needs
/// its workspace.
async fn find_secret_loads_the_key_s_pools_and_a_pool_change_reloads_its_keys(backend: Backend) {
    let (db, store) = open(backend).await;
    db.create_workspaces(&[WS, "ws_other"], "pro").await;
    let rpm = |limit| {
        vec![RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit,
        }]
    };
    store
        .insert_team(&team_reaching("team_ml", &[]), &ctx("team.create"))
        .await
        .unwrap();
    let team_key = KeyRecord {
        team_id: Some("team_ml".to_owned()),
        ..key_record(WS, T0)
    };
    let team_secret = insert(store.as_ref(), &team_key).await;
    let plain = key_record(WS, T0);
    let plain_secret = insert(store.as_ref(), &plain).await;
    // No pool anywhere: nothing to count against but the key's own limits.
    let found = store.find_secret(&team_secret).await.unwrap().unwrap();
    assert!(found.pools.is_empty());

    let (team, stale) = store
        .update_team(
            WS,
            "team_ml",
            &TeamPatch {
                rate_limits: Some(rpm(10)),
                ..TeamPatch::default()
            },
            T0 + S,
            &ctx("team.update"),
        )
        .await
        .unwrap();
    assert_eq!(team.rate_limits, rpm(10));
    assert_eq!(stale, [team_secret], "the team's key, not the other");
    let (workspace, stale) = store
        .update_workspace(
            WS,
            &WorkspacePatch {
                rate_limits: Some(rpm(100)),
                ..WorkspacePatch::default()
            },
            T0 + S,
            &ctx("workspace.update"),
        )
        .await
        .unwrap();
    assert_eq!(workspace.rate_limits, rpm(100));
    assert_eq!(stale.len(), 2, "every key of the workspace");
    let (_, stale) = store
        .set_owner_limits(
            WS,
            &team_key.owner,
            &rpm(5),
            None,
            T0 + S,
            &ctx("owner.limits"),
        )
        .await
        .unwrap();
    assert_eq!(stale.len(), 2, "both keys have the same owner");
    assert_eq!(
        store
            .owner_limits(WS, &team_key.owner)
            .await
            .unwrap()
            .rate_limits,
        rpm(5)
    );

    let found = store.find_secret(&team_secret).await.unwrap().unwrap();
    let pools: Vec<_> = found
        .pools
        .iter()
        .map(|p| (p.scope, p.limits.clone()))
        .collect();
    assert_eq!(
        pools,
        [
            (LimitScope::Owner, rpm(5)),
            (LimitScope::Team, rpm(10)),
            (LimitScope::Workspace, rpm(100)),
        ]
    );
    let names: std::collections::HashSet<_> = found.pools.iter().map(|p| &p.counter).collect();
    assert_eq!(names.len(), 3);
    let found = store.find_secret(&plain_secret).await.unwrap().unwrap();
    assert_eq!(
        found.pools.len(),
        2,
        "no team: the owner's and the workspace's"
    );

    // Unchanged limits reload nothing; an empty list removes the pool.
    let (_, stale) = store
        .set_owner_limits(
            WS,
            &team_key.owner,
            &rpm(5),
            None,
            T0 + S,
            &ctx("owner.limits"),
        )
        .await
        .unwrap();
    assert!(stale.is_empty());
    store
        .set_owner_limits(WS, &team_key.owner, &[], None, T0 + S, &ctx("owner.limits"))
        .await
        .unwrap();
    assert_eq!(
        store.owner_limits(WS, &team_key.owner).await.unwrap(),
        OwnerPool::default()
    );
    let found = store.find_secret(&plain_secret).await.unwrap().unwrap();
    assert_eq!(found.pools.len(), 1);
    assert!(matches!(
        store
            .set_owner_limits(
                "ws_missing",
                &team_key.owner,
                &rpm(5),
                None,
                T0,
                &ctx("owner.limits")
            )
            .await,
        Err(StoreError::NotFound)
    ));
}

/// Pool budgets: set on a workspace, a team and an owner (a rolling period anchored when
/// set, kept while the period stays), read with the key by find_secret with the spend
/// stored for each; pool spend is written to the pool's row per epoch as a key's is
/// (a newer epoch replaces, an older one changes nothing), and a pool with no row has
/// no total.
async fn pool_spend_is_written_to_the_pools_row_per_epoch(backend: Backend) {
    let (db, store) = open(backend).await;
    db.create_workspaces(&[WS], "pro").await;
    store
        .insert_team(&team_reaching("team_ml", &[]), &ctx("team.create"))
        .await
        .unwrap();
    let key = KeyRecord {
        team_id: Some("team_ml".to_owned()),
        ..key_record(WS, T0)
    };
    let secret = insert(store.as_ref(), &key).await;
    let budget = |max, period| PoolBudget {
        max_micros: max,
        period,
        anchor: 0,
    };
    let (workspace, stale) = store
        .update_workspace(
            WS,
            &WorkspacePatch {
                budget: Some(Some(budget(1_000, BudgetPeriod::Month))),
                ..WorkspacePatch::default()
            },
            T0 + S,
            &ctx("workspace.update"),
        )
        .await
        .unwrap();
    assert_eq!(workspace.budget, Some(budget(1_000, BudgetPeriod::Month)));
    assert_eq!(stale, [secret], "its keys reload");
    let (team, _) = store
        .update_team(
            WS,
            "team_ml",
            &TeamPatch {
                budget: Some(Some(budget(50, BudgetPeriod::Days(30)))),
                ..TeamPatch::default()
            },
            T0 + S,
            &ctx("team.update"),
        )
        .await
        .unwrap();
    assert_eq!(team.budget.unwrap().anchor, T0 + S, "anchored when set");
    let (team, stale) = store
        .update_team(
            WS,
            "team_ml",
            &TeamPatch {
                budget: Some(Some(budget(50, BudgetPeriod::Days(30)))),
                ..TeamPatch::default()
            },
            T0 + 9 * S,
            &ctx("team.update"),
        )
        .await
        .unwrap();
    assert_eq!(
        team.budget.unwrap().anchor,
        T0 + S,
        "the same period keeps it"
    );
    assert!(stale.is_empty(), "nothing changed: nothing reloads");
    let (owner, _) = store
        .set_owner_limits(
            WS,
            &key.owner,
            &[],
            Some(budget(7, BudgetPeriod::Lifetime)),
            T0 + S,
            &ctx("owner.limits"),
        )
        .await
        .unwrap();
    assert_eq!(owner.budget, Some(budget(7, BudgetPeriod::Lifetime)));
    assert!(owner.rate_limits.is_empty(), "a budget alone is a pool");

    let found = store.find_secret(&secret).await.unwrap().unwrap();
    let counter = |scope| {
        found
            .pools
            .iter()
            .find(|p| p.scope == scope)
            .unwrap()
            .counter
            .clone()
    };
    let (ws, team_ml, mine) = (
        counter(LimitScope::Workspace),
        counter(LimitScope::Team),
        counter(LimitScope::Owner),
    );
    let spend = |name: &str, epoch: Micros, micros: u64| UsageDelta {
        key_id: name.to_owned(),
        epoch,
        spend_micros: micros,
        last_used_at: None,
    };
    let (january, february) = (T0, T0 + 31 * 86_400 * S);
    let mut totals = store
        .record_pool_usage(&[
            spend(&ws, january, 40),
            spend(&team_ml, T0 + S, 5),
            spend(&mine, 0, 3),
            spend("owner ws_conf user:nobody", 0, 9),
        ])
        .await
        .unwrap();
    totals.sort();
    let mut expected = vec![
        (ws.clone(), 40, january),
        (team_ml.clone(), 5, T0 + S),
        (mine.clone(), 3, 0),
    ];
    expected.sort();
    assert_eq!(totals, expected, "an owner with no pool row has no total");
    assert_eq!(
        store
            .record_pool_usage(&[spend(&ws, january, 2)])
            .await
            .unwrap(),
        [(ws.clone(), 42, january)]
    );
    assert_eq!(
        store
            .record_pool_usage(&[spend(&ws, february, 7)])
            .await
            .unwrap(),
        [(ws.clone(), 7, february)],
        "a new epoch starts from its own spend"
    );
    assert_eq!(
        store
            .record_pool_usage(&[spend(&ws, january, 100)])
            .await
            .unwrap(),
        [(ws.clone(), 7, february)],
        "a late write of an ended epoch changes nothing"
    );

    let found = store.find_secret(&secret).await.unwrap().unwrap();
    let stored: Vec<_> = found
        .pools
        .iter()
        .map(|p| (p.scope, p.budget.map(|b| b.max_micros), p.spend))
        .collect();
    assert_eq!(
        stored,
        [
            (
                LimitScope::Owner,
                Some(7),
                StoredSpend {
                    micros: 3,
                    epoch: 0
                }
            ),
            (
                LimitScope::Team,
                Some(50),
                StoredSpend {
                    micros: 5,
                    epoch: T0 + S
                }
            ),
            (
                LimitScope::Workspace,
                Some(1_000),
                StoredSpend {
                    micros: 7,
                    epoch: february
                }
            ),
        ]
    );
    let workspace = store.get_workspace(WS).await.unwrap().unwrap();
    assert_eq!(
        workspace.spend,
        StoredSpend {
            micros: 7,
            epoch: february
        }
    );
    assert_eq!(
        store
            .owner_limits(WS, &key.owner)
            .await
            .unwrap()
            .spend
            .micros,
        3
    );
}

/// What a self-service member asks for in these tests: nothing the policy limits but the
/// number of keys.
const MEMBER: SelfServiceKey<'static> = SelfServiceKey {
    max_budget_micros: None,
    expires_at: None,
    effective_limits: &[],
};

/// Team `team_ml` with self-service on and at most `cap` keys per member.
fn member_team(cap: u32) -> Team {
    let mut team = team_reaching("team_ml", &[]);
    team.policy.self_service_enabled = true;
    team.policy.max_keys_per_user = cap;
    team
}

/// For a self-service member, `insert_key` counts the owner's live keys in the key's team
/// in its own transaction, under the team's policy as it stands: revoked, deleted and
/// expired keys, other owners' and other teams' do not count; a refused insert writes its
/// `denied` audit row and nothing else; for an admin's issue nothing is counted.
async fn insert_key_holds_a_member_to_the_team_s_cap(backend: Backend) {
    let (db, store) = open(backend).await;
    db.create_workspaces(&[WS], "pro").await;
    store
        .insert_team(&member_team(2), &ctx("team.create"))
        .await
        .unwrap();
    let issue = |key: KeyRecord, member: Option<SelfServiceKey<'static>>| {
        let store = store.clone();
        async move {
            store
                .insert_key(&key, &new_secret(), member.as_ref(), &ctx("key.issue"))
                .await
        }
    };
    let (revoked, deleted) = (member_key("user_ann", T0), member_key("user_ann", T0));
    for key in [&revoked, &deleted] {
        issue(key.clone(), None).await.unwrap();
    }
    store
        .revoke_key(&revoked.key_id, "test", T0 + S, &ctx("key.revoke"))
        .await
        .unwrap();
    store
        .delete_key(&deleted.key_id, T0 + S, &ctx("key.delete"))
        .await
        .unwrap();
    let expired = KeyRecord {
        expires_at: Some(T0 + 2 * S),
        ..member_key("user_ann", T0)
    };
    issue(expired, None).await.unwrap();
    // Someone else's key in the team, and the member's key outside it.
    issue(member_key("user_bob", T0), None).await.unwrap();
    issue(
        KeyRecord {
            team_id: None,
            ..member_key("user_ann", T0)
        },
        None,
    )
    .await
    .unwrap();

    // At T0 + 3 s none of the member's keys above is live in the team: two more fit.
    let at = T0 + 3 * S;
    issue(member_key("user_ann", at), Some(MEMBER))
        .await
        .unwrap();
    issue(member_key("user_ann", at), Some(MEMBER))
        .await
        .unwrap();
    let (audit_rows, key_rows) = (
        all_audit_rows(&db).await,
        db.count("SELECT COUNT(*) FROM api_keys").await,
    );
    let third = member_key("user_ann", at);
    assert_refused(
        issue(third.clone(), Some(MEMBER)).await,
        Reason::SelfServiceKeyLimitReached,
    );
    assert_eq!(store.get_key(&third.key_id).await.unwrap(), None);
    assert_eq!(db.count("SELECT COUNT(*) FROM api_keys").await, key_rows);
    // The refusal is audited in the insert's own transaction: one `denied` row.
    assert_eq!(all_audit_rows(&db).await, audit_rows + 1);
    let denied = store.list_audit(&audit_of(WS), 1, None).await.unwrap();
    assert_eq!(denied[0].outcome, AuditOutcome::Denied);
    assert_eq!(denied[0].action, "key.issue");
    assert_eq!(denied[0].key_id, None);
    assert!(denied[0].detail.contains("maximum of 2 keys"), "{denied:?}");
    // A higher cap, or an admin's issue, lets it in.
    store
        .update_team(
            WS,
            "team_ml",
            &TeamPatch {
                policy: Some(member_team(3).policy),
                ..TeamPatch::default()
            },
            at,
            &ctx("team.update"),
        )
        .await
        .unwrap();
    issue(third, Some(MEMBER)).await.unwrap();
    issue(member_key("user_ann", at), None).await.unwrap();
}

fn service_account(id: &str, team_id: &str) -> ServiceAccount {
    ServiceAccount {
        workspace_id: WS.to_owned(),
        team_id: team_id.to_owned(),
        service_account_id: id.to_owned(),
        name: id.to_owned(),
        created_at: T0,
    }
}

/// A team key owned by a service account of `team`'s.
fn account_key(account_id: &str, team_id: &str) -> KeyRecord {
    KeyRecord {
        owner: owner(OwnerKind::ServiceAccount, account_id),
        team_id: Some(team_id.to_owned()),
        ..key_record(WS, T0)
    }
}

/// Workspace WS with teams `team_ml` and `team_ops`, and a service account in each
/// (`sa_ml`, `sa_ops`).
async fn teams_with_accounts(store: &dyn Store) {
    for team in ["team_ml", "team_ops"] {
        store
            .insert_team(&team_reaching(team, &[]), &ctx("team.create"))
            .await
            .unwrap();
    }
    for (account, team) in [("sa_ml", "team_ml"), ("sa_ops", "team_ops")] {
        store
            .insert_service_account(&service_account(account, team), &ctx("sa.create"))
            .await
            .unwrap();
    }
}

/// A team key owned by a service account is owned by one of that team's, checked in
/// the insert's transaction: another team's account or an unknown one is refused, and
/// nothing is written but the refusal's `denied` audit row. Keys outside a team, and
/// users' keys, are not checked.
async fn a_team_key_of_a_service_account_needs_one_of_the_teams(backend: Backend) {
    let (db, store) = open(backend).await;
    db.create_workspaces(&[WS], "pro").await;
    teams_with_accounts(store.as_ref()).await;
    let issue = |key: KeyRecord| {
        let store = store.clone();
        async move {
            store
                .insert_key(&key, &new_secret(), None, &ctx("key.issue"))
                .await
        }
    };
    issue(account_key("sa_ml", "team_ml")).await.unwrap();
    let (audit_rows, key_rows) = (
        all_audit_rows(&db).await,
        db.count("SELECT COUNT(*) FROM api_keys").await,
    );
    assert_refused(
        issue(account_key("sa_ops", "team_ml")).await,
        Reason::ServiceAccountNotInTeam,
    );
    assert_refused(
        issue(account_key("sa_gone", "team_ml")).await,
        Reason::ServiceAccountNotInTeam,
    );
    assert_eq!(all_audit_rows(&db).await, audit_rows + 2);
    let denied = store.list_audit(&audit_of(WS), 2, None).await.unwrap();
    assert!(
        denied
            .iter()
            .all(|d| d.outcome == AuditOutcome::Denied && d.action == "key.issue"),
        "{denied:?}"
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM api_keys").await, key_rows);
    issue(KeyRecord {
        team_id: None,
        ..account_key("sa_ops", "team_ml")
    })
    .await
    .unwrap();
    issue(member_key("user_ann", T0)).await.unwrap();
}

/// Waits until another session of the test's database waits for a lock: the mutation
/// under test has reached the lock a raw transaction holds.
async fn until_a_session_waits_for_a_lock(db: &TestDb) {
    for _ in 0..500 {
        let waiting = db
            .count(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock'",
            )
            .await;
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no session waited for the raw transaction's lock");
}

/// Runs `mutation` against the raw transaction `raw`: waits until the mutation blocks on
/// the raw transaction's locks, commits it, and returns what the mutation then did.
async fn after_commit_of<T: Send + 'static>(
    db: &TestDb,
    mut raw: sqlx::PgConnection,
    mutation: impl Future<Output = T> + Send + 'static,
) -> T {
    let running = tokio::spawn(mutation);
    until_a_session_waits_for_a_lock(db).await;
    sqlx::query("COMMIT").execute(&mut raw).await.unwrap();
    running.await.unwrap()
}

/// Issues `key` (for a self-service `member` or not) against the raw transaction `raw`,
/// as [`after_commit_of`] runs a mutation.
async fn issue_after_commit_of(
    db: &TestDb,
    store: &Arc<dyn Store>,
    raw: sqlx::PgConnection,
    key: &KeyRecord,
    member: Option<SelfServiceKey<'static>>,
) -> Result<(), StoreError> {
    let (store, key) = (store.clone(), key.clone());
    after_commit_of(db, raw, async move {
        store
            .insert_key(&key, &new_secret(), member.as_ref(), &ctx("key.issue"))
            .await
    })
    .await
}

/// A Postgres store whose workspace holds access group `name`.
async fn postgres_with_group(name: &str) -> (TestDb, Arc<dyn Store>) {
    let (db, store) = open(Backend::Postgres).await;
    db.create_workspaces(&[WS], "pro").await;
    store
        .insert_group(&group(name), &ctx("access_group.create"))
        .await
        .unwrap();
    (db, store)
}

/// A raw transaction on the test's database, left open after `sql` (a statement of a
/// concurrent mutation's, holding its locks).
async fn open_transaction(db: &TestDb, sql: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// IssueKey against a delete of the group it names, the delete first: the key's check
/// waits for the delete's row lock, then finds the group gone, and the key is refused.
/// (Checked before the transaction, the group was still there and the key was written
/// naming a deleted group.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_key_naming_a_group_deleted_meanwhile_is_refused() {
    let (db, store) = postgres_with_group("g_doomed").await;
    let deleting = open_transaction(&db, "DELETE FROM access_groups WHERE name = 'g_doomed'").await;
    let key = KeyRecord {
        resource_access: reaching(&["g_doomed"]),
        ..key_record(WS, T0)
    };
    let issuing = issue_after_commit_of(&db, &store, deleting, &key, None).await;
    assert_groups_missing(issuing, "g_doomed");
    assert_eq!(store.get_key(&key.key_id).await.unwrap(), None);
}

/// A delete of a group against a key update naming it, the update first (its transaction
/// holds the group's share lock, as `update_key` takes it, and names the group): the delete
/// waits, then sees the committed key and is refused. (Counting the group's users before
/// deleting, it counted none, waited, and deleted a group the key names.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_group_named_meanwhile_by_a_key_is_not_deleted() {
    let (db, store) = postgres_with_group("g_kept").await;
    let key = key_record(WS, T0);
    insert(store.as_ref(), &key).await;
    let mut naming = open_transaction(
        &db,
        "SELECT name FROM access_groups WHERE name = 'g_kept' FOR SHARE",
    )
    .await;
    sqlx::query("UPDATE api_keys SET resource_groups = 'g_kept' WHERE key_id = $1")
        .bind(&key.key_id)
        .execute(&mut naming)
        .await
        .unwrap();
    let deleting = {
        let store = store.clone();
        after_commit_of(&db, naming, async move {
            store
                .delete_group(WS, "g_kept", T0 + S, &ctx("access_group.delete"))
                .await
        })
        .await
    };
    assert_refused(deleting, Reason::AccessGroupInUse);
    let groups = store.list_groups(WS).await.unwrap();
    assert_eq!(
        groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["g_kept"]
    );
}

/// A key update naming groups takes the groups' locks before the key row's, in the order
/// `update_group` takes them (its group, then the keys naming it): the other order
/// deadlocked an update of a key against an update of a group it names. Here a raw
/// transaction holds the group as `update_group` would; the key update waits for it
/// without having locked the key, so the raw transaction can still lock the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_key_update_locks_its_groups_before_its_row() {
    let (db, store) = postgres_with_group("g_busy").await;
    let key = KeyRecord {
        resource_access: reaching(&["g_busy"]),
        ..key_record(WS, T0)
    };
    insert(store.as_ref(), &key).await;
    let mut group_update = open_transaction(
        &db,
        "SELECT name FROM access_groups WHERE name = 'g_busy' FOR UPDATE",
    )
    .await;
    let updating = {
        let (store, key_id) = (store.clone(), key.key_id.clone());
        tokio::spawn(async move {
            let patch = KeyPatch {
                resource_access: Some(ResourceAccess {
                    targets: ["claude-haiku".to_owned()].into(),
                    ..reaching(&["g_busy"])
                }),
                ..KeyPatch::default()
            };
            store
                .update_key(&key_id, &patch, T0 + S, &ctx("key.update"))
                .await
        })
    };
    until_a_session_waits_for_a_lock(&db).await;
    let key_row = sqlx::query("SELECT key_id FROM api_keys WHERE key_id = $1 FOR UPDATE NOWAIT")
        .bind(&key.key_id)
        .execute(&mut group_update)
        .await;
    assert!(
        key_row.is_ok(),
        "the key update held the key row while it waited for the group: {key_row:?}"
    );
    sqlx::query("COMMIT")
        .execute(&mut group_update)
        .await
        .unwrap();
    updating.await.unwrap().unwrap();
    let updated = store.get_key(&key.key_id).await.unwrap().unwrap();
    assert!(updated.resource_access.targets.contains("claude-haiku"));
}

/// Two issues of one member racing for the last place under the cap: the later one
/// waits for the earlier one's lock on the team, then counts its key, and is refused.
/// Here a raw transaction stands for the earlier issue: it holds the team's lock and has
/// given the member a key in the team, not yet committed. (Counted without the lock, the
/// uncommitted key was not seen and both issues went through.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_issue_racing_another_for_the_last_place_is_refused() {
    let (db, store) = open(Backend::Postgres).await;
    db.create_workspaces(&[WS], "pro").await;
    store
        .insert_team(&member_team(1), &ctx("team.create"))
        .await
        .unwrap();
    let earlier = KeyRecord {
        team_id: None,
        ..member_key("user_ann", T0)
    };
    insert(store.as_ref(), &earlier).await;
    let mut issuing = open_transaction(
        &db,
        "SELECT team_id FROM teams WHERE team_id = 'team_ml' FOR UPDATE",
    )
    .await;
    sqlx::query("UPDATE api_keys SET team_id = 'team_ml' WHERE key_id = $1")
        .bind(&earlier.key_id)
        .execute(&mut issuing)
        .await
        .unwrap();
    let later = member_key("user_ann", T0);
    let racing = issue_after_commit_of(&db, &store, issuing, &later, Some(MEMBER)).await;
    assert_refused(racing, Reason::SelfServiceKeyLimitReached);
    assert_eq!(store.get_key(&later.key_id).await.unwrap(), None);
}

/// A team key issued to a service account being deleted, the delete first: the issue
/// waits for the delete's lock, then finds the account gone and is refused. (Checked
/// before the insert's transaction, the account was still there, and the key was written
/// owned by a deleted account.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_key_of_a_service_account_deleted_meanwhile_is_refused() {
    let (db, store) = open(Backend::Postgres).await;
    db.create_workspaces(&[WS], "pro").await;
    teams_with_accounts(store.as_ref()).await;
    let deleting = open_transaction(
        &db,
        "DELETE FROM service_accounts WHERE service_account_id = 'sa_ml'",
    )
    .await;
    let key = account_key("sa_ml", "team_ml");
    let issuing = issue_after_commit_of(&db, &store, deleting, &key, None).await;
    assert_refused(issuing, Reason::ServiceAccountNotInTeam);
    assert_eq!(store.get_key(&key.key_id).await.unwrap(), None);
}

/// A delete of a service account against an issue of a key it owns, the issue first
/// (its transaction holds the account's share lock and has the key): the delete waits,
/// then sees the committed key and is refused. (Counting keys before deleting, it
/// counted none, waited, and deleted the owner of a live key.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_service_account_given_a_key_meanwhile_is_not_deleted() {
    let (db, store) = open(Backend::Postgres).await;
    db.create_workspaces(&[WS], "pro").await;
    teams_with_accounts(store.as_ref()).await;
    let key = member_key("user_ann", T0);
    insert(store.as_ref(), &key).await;
    let mut issuing = open_transaction(
        &db,
        "SELECT team_id FROM service_accounts WHERE service_account_id = 'sa_ml' FOR SHARE",
    )
    .await;
    sqlx::query(
        "UPDATE api_keys SET owner_kind = 'service_account', owner_id = 'sa_ml' \
         WHERE key_id = $1",
    )
    .bind(&key.key_id)
    .execute(&mut issuing)
    .await
    .unwrap();
    let deleting = {
        let store = store.clone();
        after_commit_of(&db, issuing, async move {
            store
                .delete_service_account(WS, "sa_ml", T0 + S, &ctx("sa.delete"))
                .await
        })
        .await
    };
    assert_refused(deleting, Reason::ServiceAccountOwnsKeys);
    assert!(
        store
            .get_service_account(WS, "sa_ml")
            .await
            .unwrap()
            .is_some()
    );
}

/// Connections are not pinged before every query (a round trip each), but one idle for a
/// while is: when the server has dropped every pooled connection (a restart, a proxy's
/// idle cut-off), the next call still succeeds on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replaces_pooled_connections_the_server_dropped_while_idle() {
    let (db, store) = open(Backend::Postgres).await;
    let key = key_record(WS, T0);
    insert(store.as_ref(), &key).await;
    let dropped = db
        .count(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
        )
        .await;
    assert!(dropped >= 1, "the pool held no connection to drop");
    // Idle past the threshold below which a connection is handed out unpinged.
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    for _ in 0..3 {
        let found = store.get_key(&key.key_id).await.unwrap();
        assert_eq!(found.map(|k| k.key_id), Some(key.key_id.clone()));
    }
}

both_backends!(
    pool_spend_is_written_to_the_pools_row_per_epoch,
    usage_queries_are_served_by_indexes,
    audit_filters_are_served_by_indexes,
    list_keys_filters_by_name_prefix_metadata_and_team,
    revoke_keys_takes_the_selection_a_chunk_at_a_time,
    list_audit_filters_by_key_actor_action_and_time,
    insert_then_get_and_find_secret_round_trip_every_field,
    get_of_an_unknown_key_and_find_of_an_unknown_hash_are_none,
    list_orders_newest_first_with_key_id_breaking_ties,
    list_cursor_continues_after_the_cursor_without_gaps_or_repeats,
    list_filters_by_owner_kind_and_id,
    list_filters_by_status_as_of_the_filters_now,
    list_is_confined_to_its_workspace_and_skips_deleted_keys,
    update_applies_only_the_patched_fields_and_returns_every_secret_as_stale,
    rotate_ends_the_old_secret_at_now_plus_grace_and_makes_the_new_one_current,
    rotate_caps_the_old_secrets_end_at_the_keys_expiry,
    rotating_twice_keeps_the_earlier_end_of_the_first_old_secret,
    rotating_a_revoked_or_expired_key_is_a_precondition_and_leaves_nothing_behind,
    revoke_sets_revoked_at_and_reason_once,
    delete_hides_the_key_but_find_secret_still_returns_it_marked_deleted,
    mutations_of_unknown_or_deleted_keys_are_not_found_and_write_nothing,
    every_successful_mutation_writes_one_audit_row_newest_first,
    record_denied_writes_a_denied_row_and_changes_nothing_else,
    list_audit_pages_by_before_id,
    a_failed_insert_leaves_neither_the_key_nor_an_audit_row,
    concurrent_rotations_of_one_key_all_succeed_and_leave_one_current_secret,
    concurrent_revokes_and_rotations_leave_a_consistent_key,
    limits_and_budgets_round_trip_and_update_patches_them,
    usage_adds_spend_and_moves_last_use_forward_only,
    usage_saturates_spend_at_the_ceiling_without_overflowing,
    usage_of_a_newer_epoch_replaces_an_older_one_and_a_reset_starts_one,
    rollups_add_up_are_queried_and_pruned_by_age,
    the_budget_sweep_starts_turned_periods_once_with_an_event_and_an_audit_row,
    list_filters_by_unused_since,
    no_index_names_a_column_the_usage_book_writes,
    team_updates_of_different_fields_both_take_effect,
    a_reach_naming_a_missing_group_is_refused_and_writes_nothing,
    insert_key_holds_a_member_to_the_team_s_cap,
    find_secret_resolves_the_key_s_reach,
    find_secret_loads_the_key_s_pools_and_a_pool_change_reloads_its_keys,
    a_team_key_of_a_service_account_needs_one_of_the_teams,
);
