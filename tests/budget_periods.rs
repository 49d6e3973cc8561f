//! Budgets with a period, through real servers on both stores, with counters in memory
//! and in Redis: a monthly budget spent in one month admits again at the month's turn
//! (the test clock's, never a sleep), with the stored spend of the month before counting
//! nothing; an admin resets a budget by hand (audited, on another replica at its next
//! call); a member may not; and the period's fields are validated.

mod common;

use std::time::Duration;

use common::*;
use keywarden::domain::budget::{self, BudgetPeriod};
use keywarden::proto::{self, VerifyCode};
use prost_types::FieldMask;
use tokio::time::Instant;
use tonic::Code;

async fn spawn(backend: Backend, counters: Counters) -> TestApp {
    let prefix = redis_prefix();
    TestApp::spawn_with(backend, |s| use_counters(s, counters, &prefix)).await
}

fn reset(key_id: &str, actor: proto::Actor) -> proto::ResetBudgetRequest {
    proto::ResetBudgetRequest {
        key_id: key_id.to_owned(),
        actor: Some(actor),
    }
}

/// The issue's own example: a monthly budget spent this month refuses until the month's
/// turn, then admits again from zero; what was stored for the month before counts
/// nothing, and KeyInfo shows the new month's spend and when it resets.
async fn a_monthly_budget_resets_at_the_months_turn(backend: Backend, counters: Counters) {
    let app = spawn(backend, counters).await;
    let issued = app
        .issue_with(|r| {
            r.max_budget_micros = Some(1_000);
            r.budget_period = proto::BudgetPeriod::Monthly as i32;
        })
        .await;
    let info = issued.key_info.clone().unwrap();
    assert_eq!(info.budget_period(), proto::BudgetPeriod::Monthly);
    let this_month = budget::epoch(BudgetPeriod::Month, 0, 0, app.clock.now());
    assert_eq!(
        info.budget_resets_at
            .as_ref()
            .map(|t| t.seconds * 1_000_000),
        Some(this_month.ends),
        "the first of next month, 00:00 UTC"
    );
    let key_id = info.key_id;
    let verifier = app.verifier();
    assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    assert_eq!(
        report_with(&verifier, &key_id, 0, 1_000).await.unwrap(),
        1_000
    );
    let refused = verify_with(&verifier, &issued.key, 1).await;
    assert_eq!(code(&refused), VerifyCode::BudgetExceeded);
    // Written to storage with this month's epoch.
    app.server().flush_usage().await;
    assert_eq!(app.key_info(&key_id).await.spent_micros, 1_000);

    // Still this month a second before its end; next month an hour after its start.
    let to_end = Duration::from_micros((this_month.ends - app.clock.now()) as u64);
    app.clock.advance(to_end - Duration::from_secs(1));
    assert_eq!(
        code(&verify_with(&verifier, &issued.key, 1).await),
        VerifyCode::BudgetExceeded
    );
    app.clock.advance(Duration::from_secs(3_601));
    let r = verify_with(&verifier, &issued.key, 1).await;
    assert!(r.valid, "a new month admits again: {r:?}");
    assert_eq!(r.spent_micros, 0);
    let info = app.key_info(&key_id).await;
    assert_eq!(
        info.spent_micros, 0,
        "last month's stored spend counts nothing"
    );
    assert_eq!(
        info.budget_period_start.map(|t| t.seconds * 1_000_000),
        Some(this_month.ends)
    );
    assert_eq!(report_with(&verifier, &key_id, 0, 600).await.unwrap(), 600);
    assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    assert_eq!(
        report_with(&verifier, &key_id, 0, 400).await.unwrap(),
        1_000
    );
    assert_eq!(
        code(&verify_with(&verifier, &issued.key, 1).await),
        VerifyCode::BudgetExceeded
    );
    app.server().flush_usage().await;
    assert_eq!(app.key_info(&key_id).await.spent_micros, 1_000);
}

/// An admin resets a spent budget: audited, and admitted again at once, also on another
/// replica that had verified the key (its cached record is reloaded by the event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_reset_admits_again_on_every_replica() {
    let prefix = redis_prefix();
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        use_counters(s, Counters::Redis, &prefix)
    })
    .await;
    let b = Replica::start(&app, |s| use_counters(s, Counters::Redis, &prefix)).await;
    let issued = app.issue_with(|r| r.max_budget_micros = Some(500)).await;
    let key_id = issued.key_info.as_ref().unwrap().key_id.clone();
    let on_b = b.verifier();
    assert!(verify_with(&on_b, &issued.key, 1).await.valid);
    report_with(&on_b, &key_id, 0, 500).await.unwrap();
    assert_eq!(
        code(&verify_with(&on_b, &issued.key, 1).await),
        VerifyCode::BudgetExceeded
    );
    app.clock.advance(Duration::from_secs(5));
    let info = app
        .admin()
        .reset_budget(reset(&key_id, actor()))
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(info.spent_micros, 0);
    assert!(info.budget_period_start.is_some());
    assert!(
        info.budget_resets_at.is_none(),
        "a lifetime budget never resets by itself"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = verify_with(&on_b, &issued.key, 1).await;
        if r.valid {
            assert_eq!(r.spent_micros, 0);
            break;
        }
        assert!(Instant::now() < deadline, "B never saw the reset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        app.db
            .count(
                "SELECT count(*) FROM audit_events WHERE action = 'key.reset_budget' \
                 AND outcome = 'success'"
            )
            .await,
        1
    );
}

/// A self-service member cannot start its own budget again: PERMISSION_DENIED with its
/// reason, audited, and the spend stays.
async fn a_member_may_not_reset_a_budget(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app
        .issue_with(|r| {
            r.max_budget_micros = Some(500);
            r.owner = Some(user("member_1"));
        })
        .await;
    let key_id = issued.key_info.as_ref().unwrap().key_id.clone();
    report_with(&app.verifier(), &key_id, 0, 500).await.unwrap();
    let member = proto::Actor {
        id: "member_1".into(),
        permissions: vec!["read".into()],
    };
    let status = app
        .admin()
        .reset_budget(reset(&key_id, member))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "BUDGET_RESET_NEEDS_ADMIN");
    assert_eq!(
        code(&verify_with(&app.verifier(), &issued.key, 1).await),
        VerifyCode::BudgetExceeded
    );
    assert_eq!(
        app.db
            .count(
                "SELECT count(*) FROM audit_events WHERE action = 'key.reset_budget' \
                 AND outcome = 'denied'"
            )
            .await,
        1
    );
    // An unknown key is NOT_FOUND; a malformed id names the field.
    let unknown = keywarden::domain::ids::new_key_id(&mut getrandom::SysRng).unwrap();
    let status = app
        .admin()
        .reset_budget(reset("key_nope", actor()))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["key_id"]);
    let status = app
        .admin()
        .reset_budget(reset(&unknown, actor()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// A rolling period needs its days, and only a rolling period takes them; UpdateKey sets
/// a period with the mask path `budget_period`.
async fn budget_periods_are_validated_and_updated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let bad = |period: proto::BudgetPeriod, days: u32| {
        let mut r = issue_request("ws_test");
        r.budget_period = period as i32;
        r.budget_period_days = days;
        r
    };
    for (period, days) in [
        (proto::BudgetPeriod::RollingDays, 0),
        (proto::BudgetPeriod::RollingDays, 367),
        (proto::BudgetPeriod::Monthly, 30),
    ] {
        let status = app.admin().issue_key(bad(period, days)).await.unwrap_err();
        assert_eq!(
            violated_fields(&status),
            ["budget_period_days"],
            "{period:?} {days}"
        );
    }
    let mut unknown = issue_request("ws_test");
    unknown.budget_period = 99;
    let status = app.admin().issue_key(unknown).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["budget_period"]);
    assert_eq!(app.db.count("SELECT count(*) FROM api_keys").await, 0);

    let issued = app.issue().await;
    let key_id = issued.key_info.unwrap().key_id;
    let updated = app
        .admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: key_id.clone(),
            actor: Some(actor()),
            budget_period: proto::BudgetPeriod::RollingDays as i32,
            budget_period_days: 30,
            update_mask: Some(FieldMask {
                paths: vec!["budget_period".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(
        (updated.budget_period(), updated.budget_period_days),
        (proto::BudgetPeriod::RollingDays, 30)
    );
    assert!(updated.budget_resets_at.is_some());
}

each_store_and_counter!(a_monthly_budget_resets_at_the_months_turn);

both_backends!(
    a_member_may_not_reset_a_budget,
    budget_periods_are_validated_and_updated,
);

/// Spend reported right after a reset, before any VerifyKey, counts in the new period:
/// the reset's event makes the replica read the key's record again at its next report,
/// rather than count in the period its usage book knew (whose writes the store ignores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_reported_right_after_a_reset_counts_in_the_new_period() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let issued = app.issue_with(|r| r.max_budget_micros = Some(1_000)).await;
    let key_id = issued.key_info.as_ref().unwrap().key_id.clone();
    let verifier = app.verifier();
    assert!(verify_with(&verifier, &issued.key, 1).await.valid);
    report_with(&verifier, &key_id, 0, 400).await.unwrap();
    app.server().flush_usage().await;
    app.clock.advance(Duration::from_secs(5));
    let seen = app.server().events().published();
    app.admin()
        .reset_budget(reset(&key_id, actor()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.server().events().published() <= seen {
        assert!(Instant::now() < deadline, "the reset's event never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.clock.advance(Duration::from_secs(1));
    report_with(&verifier, &key_id, 0, 300).await.unwrap();
    app.server().flush_usage().await;
    assert_eq!(
        app.key_info(&key_id).await.spent_micros,
        300,
        "the report after the reset counts in the new period"
    );
}
