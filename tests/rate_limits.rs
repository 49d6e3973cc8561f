//! Rate limits, usage and budgets through real servers: the decision in every VerifyKey
//! answer (in memory and in Redis), token windows and budgets spent through ReportUsage,
//! limits changed by UpdateKey taking effect at once (on another replica too), replicas
//! sharing Redis admitting exactly the limit, Redis unreachable (open / closed), a hung
//! Redis (a process of the test's own, stopped) opening the circuit and closing it again
//! once it resumes, spend surviving a restart, and `last_used_at` / `unused_since`.
//!
//! Time is the test's manual clock: windows pass by advancing it, never by sleeping.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use keywarden::config::LimiterSettings;
use keywarden::domain::limits::{LimitUnit, LimitWindow, RateLimit};
use keywarden::proto::{self, VerifyCode};
use keywarden::ratelimit::FailureMode;
use keywarden::ratelimit::breaker::CircuitSettings;
use prost_types::FieldMask;
use secrecy::SecretString;
use tokio::time::Instant;
use tonic::Code;

async fn spawn(backend: Backend, counters: Counters) -> TestApp {
    let prefix = redis_prefix();
    TestApp::spawn_with(backend, |s| use_counters(s, counters, &prefix)).await
}

fn limit(unit: proto::RateLimitUnit, window: proto::RateLimitWindow, n: u64) -> proto::RateLimit {
    proto::RateLimit {
        unit: unit as i32,
        window: window as i32,
        limit: n,
    }
}

fn rpm(n: u64) -> proto::RateLimit {
    limit(
        proto::RateLimitUnit::Requests,
        proto::RateLimitWindow::Minute,
        n,
    )
}

async fn set_limits(admin: &AdminClient, key_id: &str, limits: Vec<proto::RateLimit>) {
    admin
        .clone()
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(actor()),
            rate_limits: limits,
            update_mask: Some(FieldMask {
                paths: vec!["rate_limits".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn key_id(issued: &proto::IssueKeyResponse) -> String {
    issued.key_info.as_ref().unwrap().key_id.clone()
}

fn unix_seconds(app: &TestApp) -> i64 {
    app.clock.now() / 1_000_000
}

// ---------------------------------------------------------------------------------------
// The decision

async fn ten_a_minute_admits_ten_then_refuses_with_retry_after(
    backend: Backend,
    counters: Counters,
) {
    let app = spawn(backend, counters).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(10)]).await;
    let verifier = app.verifier();
    for expected_remaining in (0..10).rev() {
        let r = verify_with(&verifier, &issued.key, 0).await;
        assert!(r.valid, "{r:?}");
        let d = r.rate_limit.unwrap();
        assert!(d.allowed);
        assert_eq!((d.limit, d.remaining), (10, expected_remaining));
        assert!(d.retry_after.is_none());
        // Everything counted now leaves the window 60 s (plus at most a bucket) from now.
        assert!((unix_seconds(&app) + 60..=unix_seconds(&app) + 62).contains(&d.reset_at));
    }
    let refused = verify_with(&verifier, &issued.key, 1).await;
    assert!(!refused.valid);
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    assert_eq!(refused.key_id, key_id(&issued), "the key is still named");
    let d = refused.rate_limit.unwrap();
    assert!(!d.allowed);
    assert_eq!((d.limit, d.remaining), (10, 0));
    let retry = d.retry_after.unwrap();
    assert!((60..=61).contains(&retry.seconds), "{retry:?}");
    assert_eq!(d.windows.len(), 1);
    assert_eq!(d.windows[0].used, 10, "a refused call consumes nothing");

    // Refused again and again until the window has passed, then admitted.
    app.clock.advance(Duration::from_secs(30));
    assert_eq!(
        code(&verify_with(&verifier, &issued.key, 1).await),
        VerifyCode::RateLimited
    );
    app.clock.advance(Duration::from_secs(32));
    let r = verify_with(&verifier, &issued.key, 1).await;
    assert!(r.valid, "{r:?}");
    assert_eq!(r.rate_limit.unwrap().remaining, 9);
}

async fn cost_counts_several_requests_at_once(backend: Backend, counters: Counters) {
    let app = spawn(backend, counters).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(10)]).await;
    let verifier = app.verifier();
    assert_eq!(
        verify_with(&verifier, &issued.key, 7)
            .await
            .rate_limit
            .unwrap()
            .remaining,
        3
    );
    let refused = verify_with(&verifier, &issued.key, 4).await;
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    assert!(verify_with(&verifier, &issued.key, 3).await.valid);
    // A cost above the limit never passes, and no retry time is promised.
    let never = verify_with(&verifier, &issued.key, 11).await;
    assert_eq!(code(&never), VerifyCode::RateLimited);
    assert!(never.rate_limit.unwrap().retry_after.is_none());
}

async fn the_minute_passes_while_the_hour_refuses(backend: Backend, counters: Counters) {
    let app = spawn(backend, counters).await;
    let issued = app
        .issue_with(|r| {
            r.rate_limits = vec![
                rpm(3),
                limit(
                    proto::RateLimitUnit::Requests,
                    proto::RateLimitWindow::Hour,
                    4,
                ),
            ]
        })
        .await;
    let verifier = app.verifier();
    for _ in 0..3 {
        assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    }
    app.clock.advance(Duration::from_secs(61));
    assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    let refused = verify_with(&verifier, &issued.key, 1).await;
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    let d = refused.rate_limit.unwrap();
    assert_eq!(d.limit, 4, "the hour is the window that refused");
    let minute = &d.windows[0];
    let hour = &d.windows[1];
    assert!(minute.allowed && !hour.allowed, "{d:?}");
    assert!(d.retry_after.unwrap().seconds > 3000, "{d:?}");
}

async fn the_deployment_default_applies_to_keys_that_name_none(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.default_limits = Arc::new(vec![RateLimit {
            unit: LimitUnit::Requests,
            window: LimitWindow::Minute,
            limit: 3,
        }])
    })
    .await;
    let plain = app.issue().await;
    let own = app.issue_with(|r| r.rate_limits = vec![rpm(5)]).await;
    assert!(
        app.key_info(&key_id(&plain)).await.rate_limits.is_empty(),
        "the key names none"
    );
    let verifier = app.verifier();
    for _ in 0..3 {
        assert!(verify_with(&verifier, &plain.key, 1).await.valid);
    }
    let refused = verify_with(&verifier, &plain.key, 1).await;
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    assert_eq!(refused.rate_limit.unwrap().limit, 3);
    // A key's own limits replace the default.
    for _ in 0..5 {
        assert!(verify_with(&verifier, &own.key, 1).await.valid);
    }
}

// ---------------------------------------------------------------------------------------
// Usage: tokens and budgets

async fn spent_tokens_refuse_the_next_call(backend: Backend, counters: Counters) {
    let app = spawn(backend, counters).await;
    let issued = app
        .issue_with(|r| {
            r.rate_limits = vec![
                rpm(100),
                limit(
                    proto::RateLimitUnit::Tokens,
                    proto::RateLimitWindow::Minute,
                    1000,
                ),
            ]
        })
        .await;
    let verifier = app.verifier();
    assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    report_with(&app.verifier(), &key_id(&issued), 600, 0)
        .await
        .unwrap();
    let r = verify_with(&verifier, &issued.key, 1).await;
    assert!(r.valid);
    assert_eq!(r.rate_limit.unwrap().windows[1].used, 600);
    report_with(&app.verifier(), &key_id(&issued), 400, 0)
        .await
        .unwrap();
    let refused = verify_with(&verifier, &issued.key, 1).await;
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    let d = refused.rate_limit.unwrap();
    assert_eq!(
        (d.limit, d.remaining),
        (1000, 0),
        "the token window refused"
    );
    assert_eq!(d.windows[0].used, 2, "the refused call was not counted");
    // The tokens leave with their minute.
    app.clock.advance(Duration::from_secs(62));
    assert!(verify_with(&verifier, &issued.key, 1).await.valid);
}

async fn a_spent_budget_refuses_the_next_call(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue_with(|r| r.max_budget_micros = Some(5_000)).await;
    let id = key_id(&issued);
    let verifier = app.verifier();
    let r = verify_with(&verifier, &issued.key, 1).await;
    assert_eq!((r.max_budget_micros, r.spent_micros), (Some(5_000), 0));
    assert_eq!(
        report_with(&app.verifier(), &id, 0, 3_000).await.unwrap(),
        3_000
    );
    let r = verify_with(&verifier, &issued.key, 1).await;
    assert!(r.valid);
    assert_eq!(r.spent_micros, 3_000);
    assert_eq!(
        report_with(&app.verifier(), &id, 0, 2_000).await.unwrap(),
        5_000
    );
    let refused = verify_with(&verifier, &issued.key, 1).await;
    assert!(!refused.valid);
    assert_eq!(code(&refused), VerifyCode::BudgetExceeded);
    assert_eq!(refused.spent_micros, 5_000);
    // Raising the budget lets it through again at once.
    app.admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: id.clone(),
            actor: Some(actor()),
            max_budget_micros: Some(6_000),
            update_mask: Some(FieldMask {
                paths: vec!["max_budget_micros".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    // Once written, the spend shows in KeyInfo.
    app.server().flush_usage().await;
    let info = app.key_info(&id).await;
    assert_eq!(
        (info.spent_micros, info.max_budget_micros),
        (5_000, Some(6_000))
    );
}

async fn reported_spend_survives_a_restart(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let issued = app.issue_with(|r| r.max_budget_micros = Some(1_000)).await;
    let id = key_id(&issued);
    assert!(verify_with(&app.verifier(), &issued.key, 1).await.valid);
    report_with(&app.verifier(), &id, 10, 400).await.unwrap();
    report_with(&app.verifier(), &id, 10, 600).await.unwrap();
    // A graceful shutdown writes what was not written yet.
    app.server.take().unwrap().shutdown().await.unwrap();
    let server = keywarden::server::start(&test_settings(&app.db), app.clock.clone())
        .await
        .unwrap();
    let channel = channel_to(&server).await;
    app.server = Some(server);
    app.channel = channel;
    let info = app.key_info(&id).await;
    assert_eq!(info.spent_micros, 1_000);
    assert!(info.last_used_at.is_some());
    let r = verify_with(&app.verifier(), &issued.key, 1).await;
    assert_eq!(code(&r), VerifyCode::BudgetExceeded);
    assert_eq!(r.spent_micros, 1_000);
}

/// Spend saturates at `MAX_SPEND_MICROS`: ReportUsage answers the ceiling, and the
/// flushes write it. A total stored above the ceiling (before there was one) stays as it
/// is and no longer fails the write: before, adding to a total near the BIGINT limit
/// failed every flush ("bigint out of range"), and every key in the same statement with it.
async fn spend_past_the_ceiling_saturates_and_never_fails_a_flush(backend: Backend) {
    use keywarden::domain::limits::MAX_SPEND_MICROS;
    use keywarden::domain::validate::MAX_USAGE;
    let app = TestApp::spawn(backend).await;
    let (near, above, other) = (
        key_id(&app.issue().await),
        key_id(&app.issue().await),
        key_id(&app.issue().await),
    );
    let stored_above = i64::MAX - 807;
    for (id, spent) in [
        (&near, MAX_SPEND_MICROS as i64 - 10),
        (&above, stored_above),
    ] {
        app.db
            .execute(&format!(
                "UPDATE api_keys SET spent_micros = {spent} WHERE key_id = '{id}'"
            ))
            .await;
    }
    assert_eq!(
        report_with(&app.verifier(), &near, 0, MAX_USAGE)
            .await
            .unwrap(),
        MAX_SPEND_MICROS
    );
    assert_eq!(
        report_with(&app.verifier(), &above, 0, MAX_USAGE)
            .await
            .unwrap(),
        stored_above as u64
    );
    assert_eq!(report_with(&app.verifier(), &other, 0, 1).await.unwrap(), 1);
    app.server().flush_usage().await;
    assert_eq!(
        report_with(&app.verifier(), &near, 0, MAX_USAGE)
            .await
            .unwrap(),
        MAX_SPEND_MICROS
    );
    assert_eq!(report_with(&app.verifier(), &other, 0, 1).await.unwrap(), 2);
    app.server().flush_usage().await;
    app.server().flush_usage().await;
    for (id, spent) in [
        (&near, MAX_SPEND_MICROS),
        (&above, stored_above as u64),
        (&other, 2),
    ] {
        assert_eq!(app.key_info(id).await.spent_micros, spent);
    }
}

async fn last_used_at_moves_once_written_and_unused_since_lists_the_rest(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let keys: Vec<_> = [app.issue().await, app.issue().await, app.issue().await]
        .into_iter()
        .collect();
    let ids: Vec<String> = keys.iter().map(key_id).collect();
    let verifier = app.verifier();

    app.clock.advance(Duration::from_secs(10));
    let t1 = app.clock.now();
    assert!(verify_with(&verifier, &keys[0].key, 1).await.valid);
    // Not written per call: nothing in storage until the batch is written.
    assert!(app.key_info(&ids[0]).await.last_used_at.is_none());
    app.server().flush_usage().await;
    let used = app.key_info(&ids[0]).await.last_used_at.unwrap();
    assert_eq!(used.seconds * 1_000_000 + i64::from(used.nanos / 1000), t1);
    assert!(app.key_info(&ids[1]).await.last_used_at.is_none());

    app.clock.advance(Duration::from_secs(10));
    let t2 = app.clock.now();
    assert!(verify_with(&verifier, &keys[1].key, 1).await.valid);
    app.server().flush_usage().await;

    let unused_since = |at: i64| {
        app.listed_key_ids(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            unused_since: Some(keywarden::api::convert::timestamp(at)),
            ..Default::default()
        })
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // Not used since t2: the first (used at t1) and the never-used third.
    assert_eq!(
        unused_since(t2).await,
        sorted(vec![ids[0].clone(), ids[2].clone()])
    );
    // Not used since t1: only the never-used one (the first was used at t1 itself).
    assert_eq!(unused_since(t1).await, sorted(vec![ids[2].clone()]));
    assert_eq!(unused_since(t2 + 1).await, sorted(ids.clone()));
}

/// A token bucket in Redis saturates at `MAX_BUCKET_COUNT` instead of overflowing
/// HINCRBY's 64-bit integer, an error that made the report fail (UNAVAILABLE when the
/// limiter fails closed) for as long as the bucket lived. A bucket already above the
/// ceiling (counted before there was one) stays as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_token_buckets_saturate_at_their_ceiling_instead_of_overflowing() {
    use keywarden::domain::limits::{MAX_BUCKET_COUNT, MAX_LIMIT};
    use keywarden::domain::validate::MAX_USAGE;
    use std::collections::HashMap;
    let prefix = redis_prefix();
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        use_counters(s, Counters::Redis, &prefix)
    })
    .await;
    let issued = app
        .issue_with(|r| {
            r.rate_limits = vec![
                rpm(100),
                limit(
                    proto::RateLimitUnit::Tokens,
                    proto::RateLimitWindow::Day,
                    MAX_LIMIT,
                ),
            ]
        })
        .await;
    let id = key_id(&issued);
    report_with(&app.verifier(), &id, 1, 0).await.unwrap();
    let redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let hash = |window: &str| format!("{prefix}:rl:{{{id}}}:tokens:{window}");
    let buckets = |window: &str| {
        let (mut redis, hash) = (redis.clone(), hash(window));
        async move {
            let counted: HashMap<String, i64> = redis::cmd("HGETALL")
                .arg(hash)
                .query_async(&mut redis)
                .await
                .unwrap();
            counted
        }
    };
    let above = i64::MAX - 5;
    let near = MAX_BUCKET_COUNT as i64 - 10;
    let mut set = Vec::new();
    for (window, value) in [("minute", above), ("day", near)] {
        let counted = buckets(window).await;
        assert_eq!(counted.values().collect::<Vec<_>>(), [&1]);
        let bucket = counted.into_keys().next().unwrap();
        set.push((window, bucket, value));
    }
    for (window, bucket, value) in &set {
        let _: () = redis::cmd("HSET")
            .arg(hash(window))
            .arg(bucket)
            .arg(value)
            .query_async(&mut redis.clone())
            .await
            .unwrap();
    }

    report_with(&app.verifier(), &id, MAX_USAGE, 0)
        .await
        .unwrap();
    let value = async |window: &str| buckets(window).await.into_values().next().unwrap();
    assert_eq!(
        value("minute").await,
        above,
        "above the ceiling: left as it is"
    );
    assert_eq!(value("day").await, MAX_BUCKET_COUNT as i64, "saturated");
    assert_eq!(value("hour").await, 1 + MAX_USAGE as i64);
    let refused = verify_with(&app.verifier(), &issued.key, 1).await;
    assert_eq!(code(&refused), VerifyCode::RateLimited);
    assert_eq!(
        refused.rate_limit.unwrap().windows[1].used,
        MAX_BUCKET_COUNT
    );
}

/// The usage book writes at most `USAGE_CHUNK` (1 000) keys per statement. Here the
/// database refuses one key's row (a trigger raises on its update), so every statement
/// holding it fails. Each other key's spend must be written exactly once however many
/// flushes follow (not again at each flush, as when the chunks written before a failing
/// one were left in the book), and the refused key's spend kept, not lost or doubled,
/// until the database takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_key_the_database_refuses_leaves_every_other_keys_spend_written_once() {
    use futures::StreamExt;
    const KEYS: usize = 1_500;
    let app = TestApp::spawn(Backend::Postgres).await;
    let store = keywarden::store::open(&app.db.url, 5).await.unwrap();
    let audit = keywarden::store::AuditContext {
        actor_id: "user_admin".into(),
        caller: "test-admin".into(),
        action: "key.issue",
        detail: String::new(),
    };
    let ids: Vec<String> = futures::stream::iter(0..=KEYS)
        .map(|_| {
            let (store, audit) = (store.clone(), audit.clone());
            async move {
                let key = key_record("ws_test", 1);
                let hash = keywarden::domain::key_format::KeyHash::of(&key.key_id);
                store.insert_key(&key, &hash, None, &audit).await.unwrap();
                key.key_id
            }
        })
        .buffer_unordered(5)
        .collect()
        .await;
    let refused = ids[0].clone();
    app.db
        .execute(&format!(
            "CREATE FUNCTION refuse_usage() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.key_id = '{refused}' THEN RAISE EXCEPTION 'refused by the test'; \
             END IF; RETURN NEW; END $$"
        ))
        .await;
    app.db
        .execute(
            "CREATE TRIGGER refuse_usage BEFORE UPDATE ON api_keys \
             FOR EACH ROW EXECUTE FUNCTION refuse_usage()",
        )
        .await;
    let refused = refused.as_str();
    let spent: Vec<u64> =
        futures::stream::iter(&ids)
            .map(|id| {
                let app = &app;
                async move {
                    report_with(&app.verifier(), id, 0, if id == refused { 5 } else { 1 }).await
                }
            })
            .buffer_unordered(8)
            .map(Result::unwrap)
            .collect()
            .await;
    assert_eq!(spent.iter().sum::<u64>(), KEYS as u64 + 5);
    // How many of the other keys have a persisted spend `op` (`= 1`, `> 1`), and the
    // refused key's.
    let persisted = async |op: &str| {
        app.db
            .count(&format!(
                "SELECT count(*) FROM api_keys WHERE key_id <> '{refused}' \
                 AND spent_micros {op}"
            ))
            .await
    };
    let refused_persisted = async || {
        app.db
            .count(&format!(
                "SELECT spent_micros FROM api_keys WHERE key_id = '{refused}'"
            ))
            .await
    };

    for flush in 1..=3 {
        app.server().flush_usage().await;
        assert_eq!(
            persisted("> 1").await,
            0,
            "after flush {flush}, keys whose spend was written again"
        );
        assert_eq!(refused_persisted().await, 0);
    }
    assert_eq!(
        persisted("= 1").await,
        KEYS as i64,
        "every other key's spend is written"
    );
    // The refused key's spend is kept by the replica: its budget still counts it.
    assert_eq!(
        report_with(&app.verifier(), refused, 0, 0).await.unwrap(),
        5
    );

    app.db
        .execute("DROP TRIGGER refuse_usage ON api_keys")
        .await;
    app.server().flush_usage().await;
    app.server().flush_usage().await;
    assert_eq!(
        refused_persisted().await,
        5,
        "written once, not lost or doubled"
    );
    assert_eq!(persisted("= 1").await, KEYS as i64);
}

// ---------------------------------------------------------------------------------------
// Limit changes and replicas

async fn raising_a_limit_admits_the_next_call_at_once(backend: Backend, counters: Counters) {
    let app = spawn(backend, counters).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(2)]).await;
    let verifier = app.verifier();
    for _ in 0..2 {
        assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    }
    assert_eq!(
        code(&verify_with(&verifier, &issued.key, 1).await),
        VerifyCode::RateLimited
    );
    set_limits(&app.admin(), &key_id(&issued), vec![rpm(5)]).await;
    let r = verify_with(&verifier, &issued.key, 1).await;
    assert!(r.valid, "{r:?}");
    let d = r.rate_limit.unwrap();
    assert_eq!(
        (d.limit, d.remaining),
        (5, 2),
        "the calls already made still count"
    );
    // Back to the deployment's default (generous here).
    set_limits(&app.admin(), &key_id(&issued), vec![]).await;
    assert_eq!(
        verify_with(&verifier, &issued.key, 1)
            .await
            .rate_limit
            .unwrap()
            .limit,
        1_000_000
    );
}

/// A limit changed through replica A is applied by replica B on its next call (B learns
/// of it from the event log, and its cached record is dropped).
async fn a_limit_change_reaches_another_replica(counters: Counters) {
    let prefix = redis_prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| use_counters(s, counters, &prefix)).await;
    let b = Replica::start(&app, |s| use_counters(s, counters, &prefix)).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(1)]).await;
    let on_b = b.verifier();
    assert!(verify_with(&on_b, &issued.key, 1).await.valid);
    assert_eq!(
        code(&verify_with(&on_b, &issued.key, 1).await),
        VerifyCode::RateLimited
    );
    set_limits(&app.admin(), &key_id(&issued), vec![rpm(3)]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = verify_with(&on_b, &issued.key, 1).await;
        if r.valid {
            assert_eq!(r.rate_limit.unwrap().limit, 3);
            break;
        }
        assert!(Instant::now() < deadline, "B never applied the new limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 200 concurrent calls, half through each replica, against 50 a minute.
async fn admitted_by_two_replicas(counters: Counters) -> usize {
    let prefix = redis_prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| use_counters(s, counters, &prefix)).await;
    let b = Replica::start(&app, |s| use_counters(s, counters, &prefix)).await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(50)]).await;
    let verifiers = [app.verifier(), b.verifier()];
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let verifier = verifiers[i % 2].clone();
            let key = issued.key.clone();
            tokio::spawn(async move { verify_with(&verifier, &key, 1).await })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match code(&r) {
            VerifyCode::Valid => admitted += 1,
            VerifyCode::RateLimited => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_sharing_redis_admit_exactly_the_limit() {
    assert_eq!(admitted_by_two_replicas(Counters::Redis).await, 50);
}

/// The documented per-replica behaviour of the in-memory backend: each replica admits
/// the limit on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_in_memory_counters_each_replica_admits_the_limit_on_its_own() {
    assert_eq!(admitted_by_two_replicas(Counters::Memory).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_change_reaches_another_replica_in_memory() {
    a_limit_change_reaches_another_replica(Counters::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_change_reaches_another_replica_with_redis() {
    a_limit_change_reaches_another_replica(Counters::Redis).await;
}

/// Nothing listens on port 1: `open` lets calls through without a decision (marked
/// unknown, not a decision of zeros), `closed` refuses them with UNAVAILABLE; both answer
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_fails_open_or_closed_as_configured() {
    for (failure, expect_valid) in [(FailureMode::Open, true), (FailureMode::Closed, false)] {
        let app = TestApp::spawn_with(Backend::Sqlite, |s| {
            s.limiter = LimiterSettings::Redis {
                url: SecretString::from("redis://127.0.0.1:1".to_owned()),
                prefix: redis_prefix(),
                failure,
                circuit: Default::default(),
                lease: None,
                clock_skew: Duration::ZERO,
            };
        })
        .await;
        let issued = app.issue_with(|r| r.rate_limits = vec![rpm(1)]).await;
        for _ in 0..3 {
            let r = app
                .verifier()
                .verify_key(proto::VerifyKeyRequest {
                    key: issued.key.clone(),
                    required_scopes: Vec::new(),
                    cost: 1,
                    resource: String::new(),
                    client_ip: String::new(),
                })
                .await;
            if expect_valid {
                let r = r.unwrap().into_inner();
                assert!(r.valid, "{r:?}");
                assert!(
                    r.rate_limit.is_none() && r.rate_limit_unknown,
                    "passed without a decision: {r:?}"
                );
            } else {
                assert_eq!(r.unwrap_err().code(), Code::Unavailable);
            }
        }
        let tokens = report_with(&app.verifier(), &key_id(&issued), 5, 0).await;
        assert_eq!(tokens.is_ok(), expect_valid, "{tokens:?}");
    }
}

/// A `redis-server` of one test's own on a free loopback port, so the test can stop it
/// (SIGSTOP) without touching the Redis other tests share. Killed on drop, also when the
/// test panics (SIGKILL ends a stopped process too).
struct OwnRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        let redis = OwnRedis {
            child,
            port,
            _dir: dir,
        };
        let client = redis::Client::open(redis.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return redis;
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("cannot run kill")
            .success();
        assert!(ok, "kill {signal} failed");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `series` (exactly as rendered) on the server's `/metrics`.
async fn metric(app: &TestApp, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.server().metrics_addr().expect("metrics are on");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Redis hangs (SIGSTOP) instead of refusing, failing open. The first calls each wait
/// out the response timeout and pass without a decision; after 3 of them the circuit
/// opens, and later calls pass without a decision too but without calling Redis (the
/// failure count stays put). Once Redis resumes, the background probe closes the circuit
/// and decisions come back. Nothing here asserts a latency: "at once" is "Redis not
/// called".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_opens_the_circuit_and_calls_pass_undecided_without_calling_it() {
    let redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        s.limiter = LimiterSettings::Redis {
            url: SecretString::from(url),
            prefix: redis_prefix(),
            failure: FailureMode::Open,
            circuit: CircuitSettings {
                failures: 3,
                probe_interval: Duration::from_millis(200),
            },
            lease: None,
            clock_skew: Duration::ZERO,
        };
    })
    .await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(100)]).await;
    let verifier = app.verifier();
    let decided = verify_with(&verifier, &issued.key, 1).await;
    assert_eq!(decided.rate_limit.map(|d| d.limit), Some(100));
    assert!(!decided.rate_limit_unknown);

    redis.signal("-STOP");
    let undecided = |r: &proto::VerifyKeyResponse| {
        assert!(r.valid, "{r:?}");
        assert!(
            r.rate_limit.is_none() && r.rate_limit_unknown,
            "passed without a decision, and says so: {r:?}"
        );
    };
    for _ in 0..3 {
        undecided(&verify_with(&verifier, &issued.key, 1).await);
    }
    let failures = "keywarden_ratelimit_backend_failures_total";
    assert_eq!(metric(&app, failures).await, 3.0);
    assert_eq!(metric(&app, "keywarden_ratelimit_circuit_open").await, 1.0);
    for _ in 0..5 {
        undecided(&verify_with(&verifier, &issued.key, 1).await);
    }
    assert_eq!(
        metric(&app, failures).await,
        3.0,
        "calls while the circuit is open do not call Redis"
    );
    assert_eq!(
        metric(
            &app,
            r#"keywarden_ratelimit_decisions_total{outcome="unknown"}"#
        )
        .await,
        8.0
    );
    assert_eq!(
        metric(
            &app,
            r#"keywarden_ratelimit_circuit_transitions_total{to="open"}"#
        )
        .await,
        1.0
    );

    redis.signal("-CONT");
    // The window stands still: the quota leases left unused come back only because
    // their settles are retried, and a grant whose answer timed out while Redis hung
    // (Redis runs it when it resumes) is cancelled.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = verify_with(&verifier, &issued.key, 1).await;
        assert!(r.valid, "{r:?}");
        if let Some(d) = r.rate_limit {
            assert_eq!(d.limit, 100);
            assert!(!r.rate_limit_unknown);
            break;
        }
        assert!(r.rate_limit_unknown, "{r:?}");
        assert!(Instant::now() < deadline, "the circuit never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&app, "keywarden_ratelimit_circuit_open").await, 0.0);
    assert_eq!(
        metric(
            &app,
            r#"keywarden_ratelimit_circuit_transitions_total{to="closed"}"#
        )
        .await,
        1.0
    );
}

// ---------------------------------------------------------------------------------------
// Validation and roles

async fn usage_and_cost_are_validated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let id = key_id(&issued);
    for (req, field) in [
        (
            proto::ReportUsageRequest {
                key_id: "nope".into(),
                ..Default::default()
            },
            "key_id",
        ),
        (
            proto::ReportUsageRequest {
                key_id: id.clone(),
                tokens: u64::MAX,
                spend_micros: 0,
            },
            "tokens",
        ),
        (
            proto::ReportUsageRequest {
                key_id: id.clone(),
                tokens: 0,
                spend_micros: u64::MAX,
            },
            "spend_micros",
        ),
    ] {
        let status = app.verifier().report_usage(req).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    // Unknown (or deleted) keys are NOT_FOUND, and nothing is recorded for them.
    let unknown = keywarden::domain::ids::new_key_id(&mut getrandom::SysRng).unwrap();
    let status = report_with(&app.verifier(), &unknown, 1, 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = app
        .verifier()
        .verify_key(proto::VerifyKeyRequest {
            key: issued.key.clone(),
            required_scopes: Vec::new(),
            cost: u64::MAX,
            resource: String::new(),
            client_ip: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["cost"]);
    // ReportUsage is the verifier's, not the admin's.
    let status = proto::verify_service_client::VerifyServiceClient::with_interceptor(
        app.channel.clone(),
        bearer(ADMIN_TOKEN),
    )
    .report_usage(proto::ReportUsageRequest {
        key_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.server().flush_usage().await;
    assert_eq!(app.key_info(&id).await.spent_micros, 0);
    assert_eq!(
        app.db
            .count(&format!(
                "SELECT count(*) FROM api_keys WHERE key_id = '{unknown}'"
            ))
            .await,
        0
    );
}

// ---------------------------------------------------------------------------------------

each_store_and_counter!(
    ten_a_minute_admits_ten_then_refuses_with_retry_after,
    cost_counts_several_requests_at_once,
    the_minute_passes_while_the_hour_refuses,
    spent_tokens_refuse_the_next_call,
    raising_a_limit_admits_the_next_call_at_once,
);

both_backends!(
    the_deployment_default_applies_to_keys_that_name_none,
    a_spent_budget_refuses_the_next_call,
    reported_spend_survives_a_restart,
    spend_past_the_ceiling_saturates_and_never_fails_a_flush,
    last_used_at_moves_once_written_and_unused_since_lists_the_rest,
    usage_and_cost_are_validated,
);

/// A replica deciding from quota leases and a Redis that hangs: calls keep being admitted
/// from the lease it holds, with no Redis call, then follow the failure mode (closed:
/// UNAVAILABLE); once Redis answers again, nothing stays parked: leases are granted
/// again in the same window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_leaves_a_leasing_replica_its_lease_then_the_failure_mode() {
    let redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.limiter = LimiterSettings::Redis {
            url: SecretString::from(url),
            prefix: redis_prefix(),
            failure: FailureMode::Closed,
            circuit: CircuitSettings {
                failures: 1,
                probe_interval: Duration::from_millis(100),
            },
            lease: Some(keywarden::ratelimit::leased::LeaseSettings {
                life: Duration::from_secs(2),
                max_keys: 1000,
            }),
            clock_skew: Duration::ZERO,
        };
    })
    .await;
    let issued = app.issue_with(|r| r.rate_limits = vec![rpm(1000)]).await;
    let verifier = app.verifier();
    // A few calls in quick succession: the demand grows the lease (refilled ahead).
    for _ in 0..20 {
        let r = verify_with(&verifier, &issued.key, 1).await;
        assert_eq!(code(&r), VerifyCode::Valid);
    }
    redis.signal("-STOP");
    let mut from_the_lease = 0;
    let refused = loop {
        match verifier
            .clone()
            .verify_key(proto::VerifyKeyRequest {
                key: issued.key.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(code(&r), VerifyCode::Valid);
                let d = r
                    .rate_limit
                    .expect("a call from a lease carries its decision");
                assert_eq!(d.limit, 1000);
                from_the_lease += 1;
                assert!(from_the_lease <= 1000, "the lease never ran out");
            }
            Err(status) => break status,
        }
    };
    assert!(
        from_the_lease >= 1,
        "the lease held admitted calls while Redis hung"
    );
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    redis.signal("-CONT");
    // The window stands still: the quota leases left unused come back only because
    // their settles are retried, and a grant whose answer timed out while Redis hung
    // (Redis runs it when it resumes) is cancelled.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = verifier
            .clone()
            .verify_key(proto::VerifyKeyRequest {
                key: issued.key.clone(),
                ..Default::default()
            })
            .await
            && code(r.get_ref()) == VerifyCode::Valid
        {
            break;
        }
        assert!(Instant::now() < deadline, "no lease after Redis resumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
