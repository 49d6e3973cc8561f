//! The usage history through real servers on both stores: QueryUsage's sums match the
//! calls made (admitted, refused by reason, tokens, spend), grouped by key, owner, team
//! and workspace, by hour and by day, a page at a time; writes add up; a self-service
//! member reads only its own keys; bad queries are refused naming the field.

mod common;

use common::*;
use keywarden::proto::usage_service_client::UsageServiceClient;
use keywarden::proto::{self, UsageGranularity as G, UsageGroupBy as By, VerifyCode};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Usage = UsageServiceClient<InterceptedService<Channel, Bearer>>;

fn usage(app: &TestApp) -> Usage {
    UsageServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN))
}

fn query(app: &TestApp, by: By, granularity: G) -> proto::QueryUsageRequest {
    proto::QueryUsageRequest {
        workspace_id: "ws_test".into(),
        group_by: by as i32,
        granularity: granularity as i32,
        since: Some(ts_in(&app.clock, -3_600)),
        until: None,
        page_size: 0,
        page_token: String::new(),
        actor: Some(actor()),
    }
}

async fn records(app: &TestApp, q: proto::QueryUsageRequest) -> Vec<proto::UsageRecord> {
    usage(app)
        .query_usage(q)
        .await
        .unwrap()
        .into_inner()
        .records
}

/// Sums of each group, whatever the buckets they fall in.
fn by_group(records: &[proto::UsageRecord]) -> Vec<(String, u64, u64, u64, u64)> {
    let mut sums: Vec<(String, u64, u64, u64, u64)> = Vec::new();
    for r in records {
        match sums.iter_mut().find(|s| s.0 == r.group) {
            Some(s) => {
                s.1 += r.admitted;
                s.2 += r.refused;
                s.3 += r.tokens;
                s.4 += r.spend_micros;
            }
            None => sums.push((
                r.group.clone(),
                r.admitted,
                r.refused,
                r.tokens,
                r.spend_micros,
            )),
        }
    }
    sums.sort();
    sums
}

struct Keys {
    /// user_1, team_ml: 3 admitted, 100 tokens, 50 spend.
    a: proto::IssueKeyResponse,
    /// user_1, no team: 2 admitted, 10 tokens, 5 spend.
    b: proto::IssueKeyResponse,
    /// user_2, team_ml, one a minute: 1 admitted, 1 rate limited.
    c: proto::IssueKeyResponse,
}

fn id(k: &proto::IssueKeyResponse) -> String {
    k.key_info.as_ref().unwrap().key_id.clone()
}

/// Makes the calls the tests count, then writes the history.
async fn traffic(app: &TestApp) -> Keys {
    keywarden::proto::team_service_client::TeamServiceClient::with_interceptor(
        app.channel.clone(),
        bearer(ADMIN_TOKEN),
    )
    .create_team(proto::CreateTeamRequest {
        workspace_id: "ws_test".into(),
        team_id: "team_ml".into(),
        name: "ML".into(),
        policy: None,
        actor: Some(actor()),
    })
    .await
    .unwrap();
    let a = app.issue_with(|r| r.team_id = "team_ml".into()).await;
    let b = app.issue().await;
    let c = app
        .issue_with(|r| {
            r.team_id = "team_ml".into();
            r.owner = Some(user("user_2"));
            r.rate_limits = vec![proto::RateLimit {
                unit: proto::RateLimitUnit::Requests as i32,
                window: proto::RateLimitWindow::Minute as i32,
                limit: 1,
            }];
        })
        .await;
    for (key, n) in [(&a, 3), (&b, 2), (&c, 1)] {
        for _ in 0..n {
            assert_eq!(
                code(&verify_with(&app.verifier(), &key.key, 1).await),
                VerifyCode::Valid
            );
        }
    }
    assert_eq!(
        code(&verify_with(&app.verifier(), &c.key, 1).await),
        VerifyCode::RateLimited
    );
    // Invented keys name no key: never counted.
    assert_eq!(
        code(
            &verify_with(
                &app.verifier(),
                "kw_live_0000000000000000000000000000000000000000",
                1
            )
            .await
        ),
        VerifyCode::Malformed
    );
    report_with(&app.verifier(), &id(&a), 100, 50)
        .await
        .unwrap();
    report_with(&app.verifier(), &id(&b), 10, 5).await.unwrap();
    app.server().flush_usage().await;
    Keys { a, b, c }
}

async fn sums_match_the_calls_made_grouped_each_way(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let keys = traffic(&app).await;
    for granularity in [G::Hour, G::Day] {
        let all = records(&app, query(&app, By::Workspace, granularity)).await;
        assert_eq!(
            by_group(&all),
            [("ws_test".to_owned(), 6, 1, 110, 55)],
            "{granularity:?}"
        );
        let refusals = all[0].refused_by_reason.unwrap();
        assert_eq!(refusals.rate_limited, 1);
    }
    let by_key = by_group(&records(&app, query(&app, By::Key, G::Day)).await);
    let mut expected = vec![
        (id(&keys.a), 3, 0, 100, 50),
        (id(&keys.b), 2, 0, 10, 5),
        (id(&keys.c), 1, 1, 0, 0),
    ];
    expected.sort();
    assert_eq!(by_key, expected);
    assert_eq!(
        by_group(&records(&app, query(&app, By::Owner, G::Hour)).await),
        [
            ("user:user_1".to_owned(), 5, 0, 110, 55),
            ("user:user_2".to_owned(), 1, 1, 0, 0),
        ]
    );
    assert_eq!(
        by_group(&records(&app, query(&app, By::Team, G::Day)).await),
        [
            (String::new(), 2, 0, 10, 5),
            ("team_ml".to_owned(), 4, 1, 100, 50),
        ],
        "the empty group is the keys of no team"
    );

    // A second write adds to the same rows.
    assert_eq!(
        code(&verify_with(&app.verifier(), &keys.b.key, 1).await),
        VerifyCode::Valid
    );
    app.server().flush_usage().await;
    assert_eq!(
        by_group(&records(&app, query(&app, By::Workspace, G::Day)).await),
        [("ws_test".to_owned(), 7, 1, 110, 55)]
    );

    // Pages of one record each, in order, until the token is empty.
    let mut q = query(&app, By::Key, G::Day);
    q.page_size = 1;
    let mut seen = Vec::new();
    loop {
        let page = usage(&app)
            .query_usage(q.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(page.records.len() <= 1);
        seen.extend(page.records.into_iter().map(|r| r.group));
        if page.next_page_token.is_empty() {
            break;
        }
        q.page_token = page.next_page_token;
    }
    let mut ids = vec![id(&keys.a), id(&keys.b), id(&keys.c)];
    ids.sort();
    assert_eq!(seen, ids);
}

/// A self-service member reads only the keys it owns, whatever it groups by.
async fn a_member_reads_only_its_own_keys(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let keys = traffic(&app).await;
    let member = proto::Actor {
        id: "user_2".into(),
        permissions: vec!["read".into()],
    };
    for by in [By::Workspace, By::Key, By::Team] {
        let mut q = query(&app, by, G::Day);
        q.actor = Some(member.clone());
        let sums = by_group(&records(&app, q).await);
        let admitted: u64 = sums.iter().map(|s| s.1).sum();
        let refused: u64 = sums.iter().map(|s| s.2).sum();
        assert_eq!((admitted, refused), (1, 1), "{by:?}: {sums:?}");
    }
    let mut q = query(&app, By::Key, G::Day);
    q.actor = Some(member);
    let groups: Vec<String> = records(&app, q)
        .await
        .into_iter()
        .map(|r| r.group)
        .collect();
    assert_eq!(groups, [id(&keys.c)]);
}

async fn bad_queries_are_refused_naming_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let refused = |q: proto::QueryUsageRequest| {
        let app = &app;
        async move { usage(app).query_usage(q).await.unwrap_err() }
    };
    let mut q = query(&app, By::Key, G::Hour);
    q.since = None;
    assert_eq!(violated_fields(&refused(q).await), ["since"]);
    let mut q = query(&app, By::Key, G::Hour);
    q.since = Some(ts_in(&app.clock, -32 * 86_400));
    assert_eq!(
        violated_fields(&refused(q).await),
        ["until"],
        "at most 31 days of hours"
    );
    let mut q = query(&app, By::Key, G::Day);
    q.since = Some(ts_in(&app.clock, -32 * 86_400));
    usage(&app).query_usage(q).await.unwrap();
    let mut q = query(&app, By::Key, G::Day);
    q.since = Some(ts_in(&app.clock, 60));
    assert_eq!(
        violated_fields(&refused(q).await),
        ["until"],
        "since after until"
    );
    let mut q = query(&app, By::Key, G::Day);
    q.page_token = "not-a-token".into();
    assert_eq!(violated_fields(&refused(q).await), ["page_token"]);
    let mut q = query(&app, By::Key, G::Day);
    q.group_by = 99;
    q.granularity = 99;
    q.actor = None;
    let mut fields = violated_fields(&refused(q).await);
    fields.sort();
    assert_eq!(fields, ["actor", "granularity", "group_by"]);
    let mut q = query(&app, By::Key, G::Day);
    q.workspace_id = "ws_missing".into();
    assert_eq!(refused(q).await.code(), Code::NotFound);
    // A verifier token cannot read usage.
    let status = UsageServiceClient::with_interceptor(app.channel.clone(), bearer(VERIFIER_TOKEN))
        .query_usage(query(&app, By::Key, G::Day))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

both_backends!(
    sums_match_the_calls_made_grouped_each_way,
    a_member_reads_only_its_own_keys,
    bad_queries_are_refused_naming_the_field,
);
