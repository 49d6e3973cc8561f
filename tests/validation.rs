//! Bad input gets a clear error and loses nothing: every RPC answers malformed, oversized
//! and hostile input with INVALID_ARGUMENT naming each offending field (google.rpc.BadRequest)
//! and writes nothing; VerifyKey answers a malformed key with `valid = false` and
//! VERIFY_CODE_MALFORMED, never with an error. On both stores.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use common::*;
use keywarden::domain::key_format::{ApiKey, Brand, Environment};
use keywarden::proto::{self, KeyStatus, VerifyCode};
use prost_types::{FieldMask, Timestamp};
use tonic::Status;

/// A change to a valid IssueKey request.
type Adjust = Box<dyn Fn(&mut proto::IssueKeyRequest)>;

const INJECTION: &str = "x'); DROP TABLE api_keys;--";

/// Rows in every table a request could write: keys, secrets, audit events.
async fn rows(app: &TestApp) -> [i64; 3] {
    [
        app.db.count("SELECT COUNT(*) FROM api_keys").await,
        app.db.count("SELECT COUNT(*) FROM key_secrets").await,
        app.db.count("SELECT COUNT(*) FROM audit_events").await,
    ]
}

fn refused<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>) -> Status {
    match result {
        Ok(r) => panic!("the request was accepted: {:?}", r.into_inner()),
        Err(status) => status,
    }
}

/// The fields an IssueKey request adjusted from the valid [`issue_request`] is refused for.
async fn issue_violations(
    app: &TestApp,
    adjust: impl FnOnce(&mut proto::IssueKeyRequest),
) -> Vec<String> {
    let mut req = issue_request("ws_test");
    adjust(&mut req);
    violated_fields(&refused(app.admin().issue_key(req).await))
}

async fn get(app: &TestApp, key_id: &str) -> proto::KeyInfo {
    app.admin()
        .get_key(proto::GetKeyRequest {
            key_id: key_id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: strings(paths),
    })
}

fn token(raw: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn seconds(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

const ZERO_KEY_ID: &str = "key_000000000000000000000000";

async fn values_at_every_limit_are_accepted(backend: Backend) {
    // The refusals below mean something only if the limits themselves are usable.
    let app = TestApp::spawn(backend).await;
    app.db.create_workspaces(&[&"w".repeat(64)], "pro").await;
    let name: String = "é".repeat(128);
    let metadata: HashMap<String, String> = (0..16)
        .map(|i| (format!("{i:0>64}"), "v".repeat(512)))
        .collect();
    let scopes: Vec<String> = (0..32).map(|i| format!("scope{i}")).collect();
    let mut permissions = scopes.clone();
    permissions.extend((0..31).map(|i| format!("extra{i}")));
    // An admin actor, so that the longest owner is not its own id.
    permissions.push("admin".into());
    let issued = app
        .issue_with(|r| {
            r.workspace_id = "w".repeat(64);
            r.name = name.clone();
            r.scopes = scopes.clone();
            r.metadata = metadata.clone();
            r.expires_at = Some(ts_in(&app.clock, 3650 * 86_400));
            r.owner = Some(user(&"u".repeat(128)));
            r.actor = Some(proto::Actor {
                id: "a".repeat(128),
                permissions,
            });
        })
        .await;
    let info = get(&app, &issued.key_info.unwrap().key_id).await;
    assert_eq!(info.name, name);
    assert_eq!(info.scopes.len(), 32);
    assert_eq!(info.metadata, metadata);
    let mut admin = app.admin();
    admin
        .list_keys(proto::ListKeysRequest {
            workspace_id: "w".repeat(64),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .revoke_key(proto::RevokeKeyRequest {
            key_id: info.key_id.clone(),
            actor: Some(actor()),
            reason: "r".repeat(512),
        })
        .await
        .unwrap();
    assert_eq!(rows(&app).await, [1, 1, 2]);
}

async fn issue_refuses_bad_workspace_ids_and_writes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for ws in [
        String::new(),
        "w".repeat(65),
        "ws test".into(),
        " ws_test".into(),
        "ws_tést".into(),
        "ワークスペース".into(),
        "ws\0".into(),
        "ws/../other".into(),
        "ws_test'; DROP TABLE api_keys;--".into(),
        "ws_test' OR '1'='1".into(),
    ] {
        let fields = issue_violations(&app, |r| r.workspace_id = ws.clone()).await;
        assert_eq!(fields, ["workspace_id"], "{ws:?}");
    }
    assert_eq!(rows(&app).await, [0, 0, 0]);
}

async fn issue_refuses_blank_control_or_overlong_names(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for name in [
        String::new(),
        "   ".into(),
        " \t\n ".into(),
        "\u{3000}".into(),
        "bell\u{7}".into(),
        "nul\0byte".into(),
        "two\nlines".into(),
        "esc\u{1b}[31mred".into(),
        "del\u{7f}".into(),
        "x".repeat(129),
        "é".repeat(129),
    ] {
        let fields = issue_violations(&app, |r| r.name = name.clone()).await;
        assert_eq!(fields, ["name"], "{name:?}");
    }
    assert_eq!(rows(&app).await, [0, 0, 0]);
}

/// Unicode format characters (category Cf: bidi controls, zero-width characters, the
/// byte-order mark, the soft hyphen) draw nothing or reorder what follows, so a name
/// holding one lists as something else: refused in key, workspace and team names, and
/// nothing is written.
async fn names_with_invisible_format_characters_are_refused_and_nothing_is_written(
    backend: Backend,
) {
    use keywarden::proto::team_service_client::TeamServiceClient;
    use keywarden::proto::workspace_service_client::WorkspaceServiceClient;
    let app = TestApp::spawn(backend).await;
    let tables = async || {
        let mut counts = rows(&app).await.to_vec();
        counts.push(app.db.count("SELECT COUNT(*) FROM workspaces").await);
        counts.push(app.db.count("SELECT COUNT(*) FROM teams").await);
        counts
    };
    let before = tables().await;
    let mut workspaces =
        WorkspaceServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN));
    let mut teams = TeamServiceClient::with_interceptor(app.channel.clone(), bearer(ADMIN_TOKEN));
    for name in [
        "\u{202e}gnp.exe",
        "ci\u{200b}key",
        "\u{feff}ci key",
        "ci \u{2066}key\u{2069}",
        "ci \u{2067}key\u{2069}",
        "ci \u{2068}key\u{2069}",
        "ci\u{ad}key",
    ] {
        let fields = issue_violations(&app, |r| r.name = name.to_owned()).await;
        assert_eq!(fields, ["name"], "IssueKey {name:?}");
        let status = refused(
            workspaces
                .create_workspace(proto::CreateWorkspaceRequest {
                    workspace_id: "ws_new".into(),
                    name: name.to_owned(),
                    plan: proto::Plan::Pro as i32,
                    actor: Some(actor()),
                })
                .await,
        );
        assert_eq!(
            violated_fields(&status),
            ["name"],
            "CreateWorkspace {name:?}"
        );
        let status = refused(
            teams
                .create_team(proto::CreateTeamRequest {
                    workspace_id: "ws_test".into(),
                    team_id: "team_new".into(),
                    name: name.to_owned(),
                    policy: None,
                    actor: Some(actor()),
                })
                .await,
        );
        assert_eq!(violated_fields(&status), ["name"], "CreateTeam {name:?}");
    }
    assert_eq!(tables().await, before);
}

async fn issue_refuses_unknown_or_missing_environments_and_owners(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases: Vec<(&str, Adjust, &[&str])> = vec![
        (
            "environment 99",
            Box::new(|r| r.environment = 99),
            &["environment"],
        ),
        (
            "environment -1",
            Box::new(|r| r.environment = -1),
            &["environment"],
        ),
        (
            "no environment",
            Box::new(|r| r.environment = 0),
            &["environment"],
        ),
        ("no owner", Box::new(|r| r.owner = None), &["owner"]),
        (
            "owner kind 42",
            Box::new(|r| r.owner.as_mut().unwrap().kind = 42),
            &["owner.kind"],
        ),
        (
            "no owner kind",
            Box::new(|r| r.owner.as_mut().unwrap().kind = 0),
            &["owner.kind"],
        ),
        (
            "empty owner id",
            Box::new(|r| r.owner.as_mut().unwrap().id = String::new()),
            &["owner.id"],
        ),
        (
            "owner id with a space",
            Box::new(|r| r.owner.as_mut().unwrap().id = "user 1".into()),
            &["owner.id"],
        ),
        (
            "unicode owner id",
            Box::new(|r| r.owner.as_mut().unwrap().id = "usér".into()),
            &["owner.id"],
        ),
        (
            "overlong owner id",
            Box::new(|r| r.owner.as_mut().unwrap().id = "u".repeat(129)),
            &["owner.id"],
        ),
        (
            "owner kind and id both bad",
            Box::new(|r| {
                r.owner = Some(proto::Owner {
                    kind: 42,
                    id: INJECTION.into(),
                })
            }),
            &["owner.kind", "owner.id"],
        ),
    ];
    for (case, adjust, expected) in cases {
        let fields = issue_violations(&app, adjust).await;
        assert_eq!(fields, expected, "{case}");
    }
    assert_eq!(rows(&app).await, [0, 0, 0]);
}

async fn issue_refuses_malformed_scopes_and_more_than_32(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (strings(&["read", "Write"]), &["scopes[1]"]),
        (strings(&[""]), &["scopes[0]"]),
        (strings(&["1read"]), &["scopes[0]"]),
        (strings(&["read write"]), &["scopes[0]"]),
        (strings(&["réad"]), &["scopes[0]"]),
        (strings(&["read\n"]), &["scopes[0]"]),
        (vec!["a".repeat(65)], &["scopes[0]"]),
        (
            strings(&["read", INJECTION, "write", "*"]),
            &["scopes[1]", "scopes[3]"],
        ),
        ((0..33).map(|i| format!("scope{i}")).collect(), &["scopes"]),
    ];
    for (scopes, expected) in cases {
        let fields = issue_violations(&app, |r| r.scopes = scopes.clone()).await;
        assert_eq!(fields, expected, "{scopes:?}");
    }
    assert_eq!(rows(&app).await, [0, 0, 0]);
}

async fn issue_refuses_missing_or_malformed_actors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = || strings(&["admin"]);
    let cases: Vec<(Option<proto::Actor>, &[&str])> = vec![
        (None, &["actor"]),
        (
            Some(proto::Actor {
                id: String::new(),
                permissions: admin(),
            }),
            &["actor.id"],
        ),
        (
            Some(proto::Actor {
                id: "user admin".into(),
                permissions: admin(),
            }),
            &["actor.id"],
        ),
        (
            Some(proto::Actor {
                id: "a".repeat(129),
                permissions: admin(),
            }),
            &["actor.id"],
        ),
        (
            Some(proto::Actor {
                id: "user_admin".into(),
                permissions: vec![INJECTION.into(), "admin".into()],
            }),
            &["actor.permissions[0]"],
        ),
        (
            Some(proto::Actor {
                id: "user_admin".into(),
                permissions: vec!["admin".into(), "ADMIN".into(), "".into()],
            }),
            &["actor.permissions[1]", "actor.permissions[2]"],
        ),
        (
            Some(proto::Actor {
                id: "user_admin".into(),
                permissions: (0..65).map(|i| format!("p{i}")).collect(),
            }),
            &["actor.permissions"],
        ),
    ];
    for (actor, expected) in cases {
        let fields = issue_violations(&app, |r| r.actor = actor.clone()).await;
        assert_eq!(fields, expected, "{actor:?}");
    }
    assert_eq!(rows(&app).await, [0, 0, 0]);
}

async fn issue_refuses_bad_metadata_keys_too_many_entries_and_long_values(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let one = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
    let cases: Vec<(HashMap<String, String>, Vec<String>)> = vec![
        (one("bad key", "v"), strings(&["metadata[bad?key]"])),
        (one("", "v"), strings(&["metadata[]"])),
        (one("ключ", "v"), strings(&["metadata[????]"])),
        (one("a'b", "v"), strings(&["metadata[a'b]"])),
        (one("k\0", "v"), strings(&["metadata[k?]"])),
        // An overlong key is named by a short prefix, never echoed whole.
        (
            one(&"k".repeat(65), "v"),
            vec![format!("metadata[{}]", "k".repeat(8))],
        ),
        (
            one("kw_live_SECRET SECRET", "v"),
            strings(&["metadata[kw_live_]"]),
        ),
        (one("long", &"v".repeat(513)), strings(&["metadata[long]"])),
        (one("ctl", "line\r\nbreak"), strings(&["metadata[ctl]"])),
        (
            (0..17).map(|i| (format!("k{i}"), "v".into())).collect(),
            strings(&["metadata"]),
        ),
        (
            HashMap::from([
                ("ok".into(), "fine".into()),
                ("z z".into(), "v".into()),
                ("team".into(), "\u{7}".into()),
            ]),
            strings(&["metadata[team]", "metadata[z?z]"]),
        ),
    ];
    for (metadata, expected) in cases {
        let fields = issue_violations(&app, |r| r.metadata = metadata.clone()).await;
        assert_eq!(fields, expected, "{metadata:?}");
    }
    assert_eq!(rows(&app).await, [0, 0, 0]);
}

async fn issue_refuses_expiries_past_too_far_ahead_or_invalid(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let ahead = ts_in(&app.clock, 3600);
    for expires_at in [
        ts_in(&app.clock, -1),
        ts_in(&app.clock, 0),
        Timestamp {
            seconds: 0,
            nanos: 0,
        },
        ts_in(&app.clock, 11 * 365 * 86_400),
        Timestamp {
            seconds: ahead.seconds,
            nanos: -1,
        },
        Timestamp {
            seconds: ahead.seconds,
            nanos: 1_000_000_000,
        },
        Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        },
        Timestamp {
            seconds: i64::MIN,
            nanos: 0,
        },
    ] {
        let fields = issue_violations(&app, |r| r.expires_at = Some(expires_at)).await;
        assert_eq!(fields, ["expires_at"], "{expires_at:?}");
    }
    assert_eq!(rows(&app).await, [0, 0, 0]);
}

async fn several_violations_in_one_request_are_all_reported(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let status = refused(
        app.admin()
            .issue_key(proto::IssueKeyRequest {
                workspace_id: "ws test".into(),
                name: "  ".into(),
                environment: 99,
                scopes: strings(&["read", "BAD"]),
                expires_at: Some(ts_in(&app.clock, -60)),
                owner: Some(proto::Owner {
                    kind: 42,
                    id: String::new(),
                }),
                actor: Some(proto::Actor {
                    id: String::new(),
                    permissions: strings(&["No"]),
                }),
                metadata: HashMap::from([("bad key".into(), "v".into())]),
                rate_limits: vec![
                    proto::RateLimit {
                        unit: 0,
                        window: 99,
                        limit: 5,
                    },
                    proto::RateLimit {
                        unit: proto::RateLimitUnit::Tokens as i32,
                        window: proto::RateLimitWindow::Day as i32,
                        limit: 0,
                    },
                ],
                max_budget_micros: Some(0),
                resource_access: Some(proto::ResourceAccess {
                    mode: 42,
                    targets: vec!["has space".into()],
                    access_groups: Vec::new(),
                }),
                allowed_cidrs: vec!["10.0.0.0/33".into()],
                team_id: "team x".into(),
                budget_period: 0,
                budget_period_days: 0,
            })
            .await,
    );
    assert_eq!(
        violated_fields(&status),
        [
            "workspace_id",
            "name",
            "environment",
            "scopes[1]",
            "expires_at",
            "owner.kind",
            "owner.id",
            "actor.id",
            "actor.permissions[0]",
            "metadata[bad?key]",
            "rate_limits[0].unit",
            "rate_limits[0].window",
            "max_budget_micros",
            "resource_access.mode",
            "resource_access.targets[0]",
            "allowed_cidrs[0]",
            "team_id",
        ]
    );
    // The message names them too, for a human reading a log.
    for field in ["workspace_id", "name", "environment", "owner.kind"] {
        assert!(status.message().contains(field), "{}", status.message());
    }
    assert_eq!(rows(&app).await, [0, 0, 0]);
}

/// A client on its own connection that accepts trailers of at most 8 KiB (gRPC core's
/// default; hyper's is 16 KiB).
async fn strict_admin(app: &TestApp) -> AdminClient {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.server().addr()))
        .unwrap()
        .http2_max_header_list_size(8 * 1024)
        .connect()
        .await
        .unwrap();
    keywarden::proto::key_service_client::KeyServiceClient::with_interceptor(
        channel,
        bearer(ADMIN_TOKEN),
    )
}

async fn a_flood_of_violations_is_reported_in_an_answer_the_client_can_read(backend: Backend) {
    // Every list at its maximum length and every entry wrong: the answer must still reach
    // the client, name the violations in order as far as it goes, say how many it left
    // out, and leave the connection usable.
    let app = TestApp::spawn(backend).await;
    let mut admin = strict_admin(&app).await;
    let status = refused(
        admin
            .issue_key(proto::IssueKeyRequest {
                workspace_id: "w".repeat(100_000),
                name: "n".repeat(100_000),
                environment: i32::MAX,
                scopes: (0..32).map(|i| format!("BAD{i}")).collect(),
                expires_at: Some(Timestamp {
                    seconds: i64::MIN,
                    nanos: i32::MIN,
                }),
                owner: Some(proto::Owner {
                    kind: i32::MIN,
                    id: "o".repeat(100_000),
                }),
                actor: Some(proto::Actor {
                    id: "a".repeat(100_000),
                    permissions: (0..64).map(|i| format!("BAD{i}")).collect(),
                }),
                metadata: (0..16)
                    .map(|i| (format!("bad key {i:0>60}"), "v".repeat(100_000)))
                    .collect(),
                rate_limits: (0..100)
                    .map(|_| proto::RateLimit {
                        unit: -1,
                        window: -1,
                        limit: 0,
                    })
                    .collect(),
                max_budget_micros: Some(u64::MAX),
                resource_access: None,
                allowed_cidrs: Vec::new(),
                team_id: String::new(),
                budget_period: 0,
                budget_period_days: 0,
            })
            .await,
    );
    let mut all = strings(&["workspace_id", "name", "environment"]);
    all.extend((0..32).map(|i| format!("scopes[{i}]")));
    all.extend(strings(&[
        "expires_at",
        "owner.kind",
        "owner.id",
        "actor.id",
    ]));
    all.extend((0..64).map(|i| format!("actor.permissions[{i}]")));
    let fields = violated_fields(&status);
    assert!(fields.len() >= 10, "{fields:?}");
    assert_eq!(fields, all[..fields.len()]);
    assert!(
        status.message().ends_with(&format!(
            "; and {} more violations not shown",
            // Metadata (16), rate_limits (1: too many) and max_budget_micros.
            all.len() + 16 + 2 - fields.len()
        )),
        "{}",
        status.message()
    );

    // UpdateKey has no bound on the number of mask paths, each of them echoed.
    let key_id = app.issue().await.key_info.unwrap().key_id;
    let status = refused(
        admin
            .update_key(proto::UpdateKeyRequest {
                key_id: key_id.clone(),
                actor: Some(actor()),
                update_mask: Some(FieldMask {
                    paths: (0..10_000)
                        .map(|i| format!("{}{i}", "é".repeat(100)))
                        .collect(),
                }),
                ..Default::default()
            })
            .await,
    );
    let fields = violated_fields(&status);
    assert!(!fields.is_empty() && fields.iter().all(|f| f == "update_mask"));
    assert!(status.message().contains("more violations not shown"));

    // The connection survived both answers.
    let listed = admin
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    assert_eq!(rows(&app).await, [1, 1, 1]);
}

async fn get_refuses_empty_overlong_and_hostile_key_ids(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await.key_info.unwrap();
    for key_id in [
        String::new(),
        "key_".into(),
        "key_short".into(),
        format!("{ZERO_KEY_ID}0"),
        format!("kex_{}", &ZERO_KEY_ID[4..]),
        format!(" {}", issued.key_id),
        issued.key_id.to_uppercase(),
        "k".repeat(100_000),
        "key_' OR '1'='1' --".into(),
        format!("{}'; DROP TABLE api_keys;--", issued.key_id),
        "key_ключключключключключключ".into(),
    ] {
        let status = refused(
            app.admin()
                .get_key(proto::GetKeyRequest {
                    key_id: key_id.clone(),
                    ..Default::default()
                })
                .await,
        );
        assert_eq!(violated_fields(&status), ["key_id"], "{key_id:?}");
    }
    assert_eq!(get(&app, &issued.key_id).await, issued);
    assert_eq!(rows(&app).await, [1, 1, 1]);
}

async fn list_keys_refuses_bad_workspaces_filters_and_page_sizes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.issue().await;
    let valid = || proto::ListKeysRequest {
        workspace_id: "ws_test".into(),
        ..Default::default()
    };
    let cases: Vec<(proto::ListKeysRequest, &[&str])> = vec![
        (
            proto::ListKeysRequest {
                workspace_id: String::new(),
                ..valid()
            },
            &["workspace_id"],
        ),
        (
            proto::ListKeysRequest {
                workspace_id: "ws_test' OR '1'='1".into(),
                ..valid()
            },
            &["workspace_id"],
        ),
        (
            proto::ListKeysRequest {
                workspace_id: "w".repeat(65),
                ..valid()
            },
            &["workspace_id"],
        ),
        (
            proto::ListKeysRequest {
                owner: Some(proto::Owner {
                    kind: 42,
                    id: "user_1".into(),
                }),
                ..valid()
            },
            &["owner.kind"],
        ),
        (
            proto::ListKeysRequest {
                owner: Some(proto::Owner {
                    kind: proto::OwnerKind::User as i32,
                    id: INJECTION.into(),
                }),
                ..valid()
            },
            &["owner.id"],
        ),
        (
            proto::ListKeysRequest {
                status: 17,
                ..valid()
            },
            &["status"],
        ),
        (
            proto::ListKeysRequest {
                page_size: -1,
                ..valid()
            },
            &["page_size"],
        ),
        (
            proto::ListKeysRequest {
                page_size: 1001,
                ..valid()
            },
            &["page_size"],
        ),
        (
            proto::ListKeysRequest {
                page_size: i32::MIN,
                ..valid()
            },
            &["page_size"],
        ),
        (
            proto::ListKeysRequest {
                page_size: i32::MAX,
                ..valid()
            },
            &["page_size"],
        ),
        (
            proto::ListKeysRequest {
                workspace_id: "ws test".into(),
                owner: Some(proto::Owner {
                    kind: 42,
                    id: String::new(),
                }),
                status: 17,
                page_size: -1,
                page_token: "garbage!".into(),
                unused_since: Some(Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..Default::default()
            },
            &[
                "workspace_id",
                "owner.kind",
                "owner.id",
                "status",
                "page_size",
                "page_token",
                "unused_since",
            ],
        ),
    ];
    for (req, expected) in cases {
        let status = refused(app.admin().list_keys(req.clone()).await);
        assert_eq!(violated_fields(&status), expected, "{req:?}");
    }
    assert_eq!(rows(&app).await, [1, 1, 1]);
}

async fn list_keys_refuses_forged_and_garbage_page_tokens(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.issue().await;
    app.clock.advance(Duration::from_millis(1));
    app.issue().await;
    let list = |page_token: String| {
        let mut admin = app.admin();
        async move {
            admin
                .list_keys(proto::ListKeysRequest {
                    workspace_id: "ws_test".into(),
                    page_size: 1,
                    page_token,
                    ..Default::default()
                })
                .await
        }
    };
    // A token the service issued works.
    let first = list(String::new()).await.unwrap().into_inner();
    assert_eq!(first.keys.len(), 1);
    let second = list(first.next_page_token).await.unwrap().into_inner();
    assert_eq!(second.keys.len(), 1);
    assert_ne!(second.keys[0].key_id, first.keys[0].key_id);

    for forged in [
        "garbage!".to_owned(),
        "not a token".into(),
        "====".into(),
        "\u{1F511}".into(),
        token([0xff, 0xfe, 0xfd]),
        token("a1:5"),
        token(format!("k2:1:{ZERO_KEY_ID}")),
        token(format!("k1:abc:{ZERO_KEY_ID}")),
        token(format!("k1:99999999999999999999:{ZERO_KEY_ID}")),
        token("k1:1:key_short"),
        token("k1:1:key_' OR '1'='1' --"),
        token(format!("k1:1:{ZERO_KEY_ID}'; DROP TABLE api_keys;--")),
        token(format!("k1:1; DROP TABLE api_keys:{ZERO_KEY_ID}")),
        "A".repeat(100_000),
    ] {
        let status = refused(list(forged.clone()).await);
        assert_eq!(
            violated_fields(&status),
            ["page_token"],
            "{}",
            &forged[..forged.len().min(64)]
        );
    }
    assert_eq!(rows(&app).await, [2, 2, 2]);
}

async fn list_audit_events_refuses_bad_workspaces_page_sizes_and_tokens(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.issue().await;
    app.issue().await;
    let list = |workspace_id: &str, page_size: i32, page_token: String| {
        let mut admin = app.admin();
        let req = proto::ListAuditEventsRequest {
            workspace_id: workspace_id.to_owned(),
            page_size,
            page_token,
            ..Default::default()
        };
        async move { admin.list_audit_events(req).await }
    };
    let first = list("ws_test", 1, String::new())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.events.len(), 1);
    let second = list("ws_test", 1, first.next_page_token)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.events.len(), 1);
    assert!(second.events[0].id < first.events[0].id);

    let cases: Vec<(&str, i32, String, &[&str])> = vec![
        ("", 0, String::new(), &["workspace_id"]),
        ("ws test", 0, String::new(), &["workspace_id"]),
        ("ws_tést", 0, String::new(), &["workspace_id"]),
        (
            "ws'; DELETE FROM audit_events;--",
            0,
            String::new(),
            &["workspace_id"],
        ),
        ("ws_test", -1, String::new(), &["page_size"]),
        ("ws_test", 1001, String::new(), &["page_size"]),
        ("ws_test", 0, "garbage!".into(), &["page_token"]),
        (
            "ws_test",
            0,
            token(format!("k1:1:{ZERO_KEY_ID}")),
            &["page_token"],
        ),
        ("ws_test", 0, token("a1:0"), &["page_token"]),
        ("ws_test", 0, token("a1:-1"), &["page_token"]),
        ("ws_test", 0, token("a1:x"), &["page_token"]),
        ("ws_test", 0, token("a1:1 OR 1=1"), &["page_token"]),
        (
            "ws_test",
            0,
            token("a1:99999999999999999999"),
            &["page_token"],
        ),
        ("ws_test", 0, "A".repeat(100_000), &["page_token"]),
        (
            "",
            -1,
            "garbage!".into(),
            &["workspace_id", "page_size", "page_token"],
        ),
    ];
    for (ws, page_size, page_token, expected) in cases {
        let status = refused(list(ws, page_size, page_token.clone()).await);
        assert_eq!(
            violated_fields(&status),
            expected,
            "{ws:?} {page_size} {}",
            &page_token[..page_token.len().min(64)]
        );
    }
    assert_eq!(rows(&app).await, [2, 2, 2]);
}

async fn update_refuses_bad_masks_and_fields_and_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app
        .issue_with(|r| {
            r.metadata.insert("team".into(), "ml".into());
        })
        .await;
    let before = issued.key_info.unwrap();
    let key_id = before.key_id.clone();
    let valid = || proto::UpdateKeyRequest {
        key_id: key_id.clone(),
        actor: Some(actor()),
        name: "renamed".into(),
        scopes: strings(&["write"]),
        expires_at: Some(ts_in(&app.clock, 3600)),
        metadata: HashMap::from([("team".into(), "infra".into())]),
        update_mask: mask(&["name", "scopes", "expires_at", "metadata"]),
        rate_limits: Vec::new(),
        max_budget_micros: None,
        resource_access: None,
        allowed_cidrs: Vec::new(),
        budget_period: 0,
        budget_period_days: 0,
    };
    let cases: Vec<(&str, proto::UpdateKeyRequest, &[&str])> = vec![
        (
            "no mask",
            proto::UpdateKeyRequest {
                update_mask: None,
                ..valid()
            },
            &["update_mask"],
        ),
        (
            "empty mask",
            proto::UpdateKeyRequest {
                update_mask: mask(&[]),
                ..valid()
            },
            &["update_mask"],
        ),
        (
            "unknown path",
            proto::UpdateKeyRequest {
                update_mask: mask(&["name", "owner"]),
                ..valid()
            },
            &["update_mask"],
        ),
        (
            "immutable path",
            proto::UpdateKeyRequest {
                update_mask: mask(&["key_id", "workspace_id"]),
                ..valid()
            },
            &["update_mask", "update_mask"],
        ),
        (
            "hostile path",
            proto::UpdateKeyRequest {
                update_mask: Some(FieldMask {
                    paths: vec![format!("name\r\nx-injected: 1{}", "é".repeat(100_000))],
                }),
                ..valid()
            },
            &["update_mask"],
        ),
        (
            "bad key id",
            proto::UpdateKeyRequest {
                key_id: "key_' OR 1=1 --".into(),
                ..valid()
            },
            &["key_id"],
        ),
        (
            "no actor",
            proto::UpdateKeyRequest {
                actor: None,
                ..valid()
            },
            &["actor"],
        ),
        (
            "bad name",
            proto::UpdateKeyRequest {
                name: " \t ".into(),
                ..valid()
            },
            &["name"],
        ),
        (
            "bad scopes",
            proto::UpdateKeyRequest {
                scopes: strings(&["read", "Write!"]),
                ..valid()
            },
            &["scopes[1]"],
        ),
        (
            "past expiry",
            proto::UpdateKeyRequest {
                expires_at: Some(ts_in(&app.clock, -1)),
                ..valid()
            },
            &["expires_at"],
        ),
        (
            "far expiry",
            proto::UpdateKeyRequest {
                expires_at: Some(ts_in(&app.clock, 11 * 365 * 86_400)),
                ..valid()
            },
            &["expires_at"],
        ),
        (
            "too much metadata",
            proto::UpdateKeyRequest {
                metadata: (0..17).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..valid()
            },
            &["metadata"],
        ),
        (
            "everything wrong",
            proto::UpdateKeyRequest {
                key_id: String::new(),
                actor: Some(proto::Actor {
                    id: "x y".into(),
                    permissions: strings(&["admin", "NOPE"]),
                }),
                name: "x".repeat(129),
                scopes: strings(&[""]),
                expires_at: Some(Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                metadata: HashMap::from([("long".into(), "v".repeat(513))]),
                update_mask: mask(&[
                    "name",
                    "scopes",
                    "expires_at",
                    "metadata",
                    "status",
                    "rate_limits",
                    "max_budget_micros",
                ]),
                rate_limits: vec![
                    proto::RateLimit {
                        unit: proto::RateLimitUnit::Requests as i32,
                        window: proto::RateLimitWindow::Minute as i32,
                        limit: 10,
                    },
                    proto::RateLimit {
                        unit: proto::RateLimitUnit::Requests as i32,
                        window: proto::RateLimitWindow::Minute as i32,
                        limit: u64::MAX,
                    },
                ],
                max_budget_micros: Some(u64::MAX),
                resource_access: None,
                allowed_cidrs: Vec::new(),
                budget_period: 0,
                budget_period_days: 0,
            },
            &[
                "key_id",
                "actor.id",
                "actor.permissions[1]",
                "name",
                "scopes[0]",
                "expires_at",
                "metadata[long]",
                "update_mask",
                "rate_limits[1].limit",
                "rate_limits[1]",
                "max_budget_micros",
            ],
        ),
    ];
    for (case, req, expected) in cases {
        let status = refused(app.admin().update_key(req).await);
        assert_eq!(violated_fields(&status), expected, "{case}");
    }
    assert_eq!(get(&app, &key_id).await, before);
    assert_eq!(rows(&app).await, [1, 1, 1]);
    // The valid request it was all derived from goes through.
    let updated = app
        .admin()
        .update_key(valid())
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(updated.name, "renamed");
}

async fn rotate_refuses_bad_grace_periods_and_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let before = issued.key_info.unwrap();
    let week = 7 * 86_400;
    let cases: Vec<(&str, proto::RotateKeyRequest, &[&str])> = vec![
        (
            "negative grace",
            proto::RotateKeyRequest {
                key_id: before.key_id.clone(),
                actor: Some(actor()),
                grace_period: seconds(-1),
            },
            &["grace_period"],
        ),
        (
            "negative nanos",
            proto::RotateKeyRequest {
                key_id: before.key_id.clone(),
                actor: Some(actor()),
                grace_period: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: -1,
                }),
            },
            &["grace_period"],
        ),
        (
            "a second over seven days",
            proto::RotateKeyRequest {
                key_id: before.key_id.clone(),
                actor: Some(actor()),
                grace_period: seconds(week + 1),
            },
            &["grace_period"],
        ),
        (
            "a year",
            proto::RotateKeyRequest {
                key_id: before.key_id.clone(),
                actor: Some(actor()),
                grace_period: seconds(365 * 86_400),
            },
            &["grace_period"],
        ),
        (
            "i64::MAX seconds",
            proto::RotateKeyRequest {
                key_id: before.key_id.clone(),
                actor: Some(actor()),
                grace_period: seconds(i64::MAX),
            },
            &["grace_period"],
        ),
        (
            "bad key id",
            proto::RotateKeyRequest {
                key_id: "k".repeat(10_000),
                actor: Some(actor()),
                grace_period: None,
            },
            &["key_id"],
        ),
        (
            "no actor",
            proto::RotateKeyRequest {
                key_id: before.key_id.clone(),
                actor: None,
                grace_period: None,
            },
            &["actor"],
        ),
        (
            "everything wrong",
            proto::RotateKeyRequest {
                key_id: String::new(),
                actor: Some(proto::Actor {
                    id: String::new(),
                    permissions: vec![],
                }),
                grace_period: seconds(-86_400),
            },
            &["key_id", "actor.id", "grace_period"],
        ),
    ];
    for (case, req, expected) in cases {
        let status = refused(app.admin().rotate_key(req).await);
        assert_eq!(violated_fields(&status), expected, "{case}");
    }
    assert_eq!(get(&app, &before.key_id).await, before);
    assert!(app.verify(&issued.key, &[]).await.valid);
    assert_eq!(rows(&app).await, [1, 1, 1]);
    // Exactly seven days is allowed.
    let rotated = app
        .admin()
        .rotate_key(proto::RotateKeyRequest {
            key_id: before.key_id.clone(),
            actor: Some(actor()),
            grace_period: seconds(week),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.old_key_valid_until, Some(ts_in(&app.clock, week)));
}

async fn revoke_refuses_long_reasons_and_bad_actors_and_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let before = issued.key_info.unwrap();
    let valid = || proto::RevokeKeyRequest {
        key_id: before.key_id.clone(),
        actor: Some(actor()),
        reason: "leaked".into(),
    };
    let cases: Vec<(&str, proto::RevokeKeyRequest, &[&str])> = vec![
        (
            "reason of 513 characters",
            proto::RevokeKeyRequest {
                reason: "r".repeat(513),
                ..valid()
            },
            &["reason"],
        ),
        (
            "reason of 100 000 characters",
            proto::RevokeKeyRequest {
                reason: "é".repeat(100_000),
                ..valid()
            },
            &["reason"],
        ),
        (
            "reason with control characters",
            proto::RevokeKeyRequest {
                reason: "leaked\0\r\nx".into(),
                ..valid()
            },
            &["reason"],
        ),
        (
            "empty key id",
            proto::RevokeKeyRequest {
                key_id: String::new(),
                ..valid()
            },
            &["key_id"],
        ),
        (
            "no actor",
            proto::RevokeKeyRequest {
                actor: None,
                ..valid()
            },
            &["actor"],
        ),
        (
            "actor id with a space",
            proto::RevokeKeyRequest {
                actor: Some(proto::Actor {
                    id: "user admin".into(),
                    permissions: strings(&["admin"]),
                }),
                ..valid()
            },
            &["actor.id"],
        ),
        (
            "everything wrong",
            proto::RevokeKeyRequest {
                key_id: "key_short".into(),
                actor: Some(proto::Actor {
                    id: "ok".into(),
                    permissions: strings(&["Admin"]),
                }),
                reason: "r".repeat(600),
            },
            &["key_id", "actor.permissions[0]", "reason"],
        ),
    ];
    for (case, req, expected) in cases {
        let status = refused(app.admin().revoke_key(req).await);
        assert_eq!(violated_fields(&status), expected, "{case}");
    }
    let after = get(&app, &before.key_id).await;
    assert_eq!(after, before);
    assert_eq!(after.status, KeyStatus::Active as i32);
    assert!(app.verify(&issued.key, &[]).await.valid);
    assert_eq!(rows(&app).await, [1, 1, 1]);
}

async fn delete_refuses_bad_key_ids_and_actors_and_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let before = issued.key_info.unwrap();
    let cases: Vec<(proto::DeleteKeyRequest, &[&str])> = vec![
        (
            proto::DeleteKeyRequest {
                key_id: String::new(),
                actor: Some(actor()),
            },
            &["key_id"],
        ),
        (
            proto::DeleteKeyRequest {
                key_id: format!("{}%", &before.key_id[..before.key_id.len() - 1]),
                actor: Some(actor()),
            },
            &["key_id"],
        ),
        (
            proto::DeleteKeyRequest {
                key_id: "key_' OR '1'='1".into(),
                actor: Some(actor()),
            },
            &["key_id"],
        ),
        (
            proto::DeleteKeyRequest {
                key_id: before.key_id.clone(),
                actor: None,
            },
            &["actor"],
        ),
        (
            proto::DeleteKeyRequest {
                key_id: before.key_id.clone(),
                actor: Some(proto::Actor {
                    id: "\u{1F600}".into(),
                    permissions: strings(&["admin"]),
                }),
            },
            &["actor.id"],
        ),
        (
            proto::DeleteKeyRequest {
                key_id: "k".repeat(100_000),
                actor: None,
            },
            &["key_id", "actor"],
        ),
    ];
    for (req, expected) in cases {
        let status = refused(app.admin().delete_key(req.clone()).await);
        assert_eq!(
            violated_fields(&status),
            expected,
            "{}",
            &req.key_id[..req.key_id.len().min(64)]
        );
    }
    assert_eq!(get(&app, &before.key_id).await, before);
    assert!(app.verify(&issued.key, &[]).await.valid);
    assert_eq!(rows(&app).await, [1, 1, 1]);
}

async fn verify_refuses_malformed_required_scopes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (strings(&["read", "BAD"]), &["required_scopes[1]"]),
        (strings(&[""]), &["required_scopes[0]"]),
        (strings(&[INJECTION]), &["required_scopes[0]"]),
        (vec!["r".repeat(65)], &["required_scopes[0]"]),
        (
            (0..33).map(|i| format!("s{i}")).collect(),
            &["required_scopes"],
        ),
    ];
    for (required_scopes, expected) in cases {
        let status = refused(
            app.verifier()
                .verify_key(proto::VerifyKeyRequest {
                    key: issued.key.clone(),
                    required_scopes: required_scopes.clone(),
                    cost: 0,
                    resource: String::new(),
                    client_ip: String::new(),
                })
                .await,
        );
        assert_eq!(violated_fields(&status), expected, "{required_scopes:?}");
    }
    assert!(app.verify(&issued.key, &["read"]).await.valid);
    assert_eq!(rows(&app).await, [1, 1, 1]);
}

/// Keys that are not keys of this deployment, each with what is wrong with it.
fn malformed_keys(real: &str) -> Vec<(&'static str, String)> {
    let last = real.chars().last().unwrap();
    let flipped = if last == 'a' { 'b' } else { 'a' };
    let wrong_checksum = format!("{}{flipped}", &real[..real.len() - 1]);
    let mid = "kw_live_".len() + 5;
    let flipped_secret = {
        let c = real.as_bytes()[mid];
        let other = if c == b'a' { 'b' } else { 'a' };
        format!("{}{other}{}", &real[..mid], &real[mid + 1..])
    };
    let other_brand = ApiKey::generate(
        &mut getrandom::SysRng,
        &Brand::parse("clne").unwrap(),
        Environment::Live,
    )
    .unwrap();
    vec![
        ("100 KB", "k".repeat(100 * 1024)),
        (
            "100 KB starting like a real key",
            format!("{real}{}", "A".repeat(100 * 1024)),
        ),
        ("empty", String::new()),
        ("wrong checksum", wrong_checksum),
        ("a changed secret character", flipped_secret),
        ("another brand", other_brand.expose().to_owned()),
        ("rebranded", real.replacen("kw_", "kx_", 1)),
        ("another environment", real.replacen("_live_", "_prod_", 1)),
        ("one character short", real[..real.len() - 1].to_owned()),
        ("one character long", format!("{real}A")),
        ("surrounded by spaces", format!(" {real} ")),
        ("bearer-prefixed", format!("Bearer {real}")),
        ("random unicode", "🔑ключ鍵\u{202e}\u{0}ñ".to_owned()),
        (
            "unicode of a key's length",
            format!("kw_live_{}", "é".repeat(19)),
        ),
        ("SQL injection", "kw_live_' OR '1'='1' --".to_owned()),
    ]
}

async fn verify_answers_malformed_keys_with_a_code_not_an_error(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    for (case, key) in malformed_keys(&issued.key) {
        let answer = app
            .verifier()
            .verify_key(proto::VerifyKeyRequest {
                key,
                required_scopes: vec![],
                cost: 0,
                resource: String::new(),
                client_ip: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{case}: an error instead of an answer: {e:?}"))
            .into_inner();
        assert!(!answer.valid, "{case}");
        assert_eq!(code(&answer), VerifyCode::Malformed, "{case}");
        assert_eq!(answer.key_id, "", "{case}: a malformed key matches no key");
    }
    assert!(app.verify(&issued.key, &[]).await.valid);
    assert_eq!(rows(&app).await, [1, 1, 1]);
}

async fn malformed_keys_are_refused_before_any_storage_access(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let issued = app.issue().await;
    app.db.hide_key_tables().await;
    for (case, key) in malformed_keys(&issued.key) {
        let answer = app
            .verifier()
            .verify_key(proto::VerifyKeyRequest {
                key,
                required_scopes: vec![],
                cost: 0,
                resource: String::new(),
                client_ip: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{case}: storage was consulted: {e:?}"))
            .into_inner();
        assert_eq!(code(&answer), VerifyCode::Malformed, "{case}");
    }
    app.db.restore_key_tables().await;
    assert!(app.verify(&issued.key, &[]).await.valid);
}

async fn hostile_but_valid_text_is_stored_literally_and_the_tables_survive(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let names = [
        INJECTION.to_owned(),
        "Robert'); DELETE FROM key_secrets; --".to_owned(),
        "\"; DROP TABLE audit_events; --".to_owned(),
        "%_\\ LIKE '%".to_owned(),
        "clé 🔑 ключ 鍵 txt.exe".to_owned(),
    ];
    let mut issued = Vec::new();
    for name in &names {
        let key = app
            .issue_with(|r| {
                r.name = name.clone();
                r.metadata.insert(
                    "note".into(),
                    "'; UPDATE api_keys SET scopes='admin';--".into(),
                );
            })
            .await;
        issued.push(key);
    }
    for (name, key) in names.iter().zip(&issued) {
        let info = get(&app, &key.key_info.as_ref().unwrap().key_id).await;
        assert_eq!(&info.name, name);
        assert_eq!(info.scopes, ["read"]);
        assert_eq!(
            info.metadata.get("note").map(String::as_str),
            Some("'; UPDATE api_keys SET scopes='admin';--")
        );
        assert!(app.verify(&key.key, &["read"]).await.valid);
    }
    // Through UpdateKey and RevokeKey too.
    let target = issued[0].key_info.as_ref().unwrap().key_id.clone();
    let mut admin = app.admin();
    admin
        .update_key(proto::UpdateKeyRequest {
            key_id: target.clone(),
            actor: Some(actor()),
            name: "y'); DROP TABLE key_secrets;--".into(),
            update_mask: mask(&["name"]),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .revoke_key(proto::RevokeKeyRequest {
            key_id: target.clone(),
            actor: Some(actor()),
            reason: "'); DROP TABLE audit_events;--".into(),
        })
        .await
        .unwrap();
    let info = get(&app, &target).await;
    assert_eq!(info.name, "y'); DROP TABLE key_secrets;--");
    assert_eq!(info.revoke_reason, "'); DROP TABLE audit_events;--");
    let listed = admin
        .list_keys(proto::ListKeysRequest {
            workspace_id: "ws_test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), names.len());
    // Every table is still there and holds exactly what was written.
    assert_eq!(rows(&app).await, [5, 5, 7]);
}

/// Sends request bodies as given, bytes that need not be a valid message, and reads
/// answers as bytes: what a broken or hostile client puts on the wire.
#[derive(Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use prost::bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// Calls `path` with `body` as the request message's bytes, the caller token `token`.
async fn call_raw(app: &TestApp, path: &'static str, token: &str, body: &[u8]) -> Status {
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(body.to_vec());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let route = http::uri::PathAndQuery::from_static(path);
    let answered = if path.ends_with("/WatchRevocations") {
        match grpc.server_streaming(request, route, RawBytes).await {
            Ok(mut stream) => stream.get_mut().message().await.map(|_| ()),
            Err(status) => Err(status),
        }
    } else {
        grpc.unary(request, route, RawBytes).await.map(|_| ())
    };
    match answered {
        Ok(()) => panic!("{path} accepted {body:02x?}"),
        Err(status) => status,
    }
}

/// A request body that is not a valid protobuf message (a truncated varint, a string
/// field holding invalid UTF-8, a field with a wire type that does not exist) is the
/// caller's mistake: INVALID_ARGUMENT with the reason MALFORMED_REQUEST, not INTERNAL
/// (which means a fault of the server, and is what alerts watch). Nothing is written.
async fn request_bodies_that_do_not_decode_are_invalid_argument(backend: Backend) {
    use tonic_types::StatusExt;
    let app = TestApp::spawn(backend).await;
    let before = rows(&app).await;
    // Field 3 (environment, a varint) whose varint never ends.
    let truncated_varint = [0x18, 0xff];
    // Field 2 (name, a string) holding 0xC3 0x28: not UTF-8.
    let bad_utf8 = [0x12, 0x02, 0xc3, 0x28];
    // Field 1 with wire type 7, which protobuf does not define.
    let bad_wire_type = [0x0f];
    // Field 1 (key, a string) holding a lone continuation byte.
    let bad_key_utf8 = [0x0a, 0x01, 0x80];
    let cases: [(&'static str, &str, &[u8]); 5] = [
        (
            "/keywarden.v1.KeyService/IssueKey",
            ADMIN_TOKEN,
            &truncated_varint,
        ),
        ("/keywarden.v1.KeyService/IssueKey", ADMIN_TOKEN, &bad_utf8),
        (
            "/keywarden.v1.KeyService/IssueKey",
            ADMIN_TOKEN,
            &bad_wire_type,
        ),
        (
            "/keywarden.v1.VerifyService/VerifyKey",
            VERIFIER_TOKEN,
            &bad_key_utf8,
        ),
        // A server-streaming method decodes its request the same way.
        (
            "/keywarden.v1.RevocationService/WatchRevocations",
            EDGE_TOKEN,
            &truncated_varint,
        ),
    ];
    for (path, token, body) in cases {
        let status = call_raw(&app, path, token, body).await;
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{path} {body:02x?}: {status:?}"
        );
        let info = status
            .get_details_error_info()
            .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
        assert_eq!(
            (info.domain.as_str(), info.reason.as_str()),
            ("keywarden.dev", "MALFORMED_REQUEST"),
            "{path} {body:02x?}"
        );
        assert!(status.get_details_retry_info().is_none(), "{status:?}");
    }
    // The same bytes framed as a valid message go through: the refusal is the body's.
    let valid = prost::Message::encode_to_vec(&issue_request("ws_test"));
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(valid);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static("/keywarden.v1.KeyService/IssueKey"),
        RawBytes,
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&app).await,
        [before[0] + 1, before[1] + 1, before[2] + 1]
    );
}

both_backends!(
    values_at_every_limit_are_accepted,
    issue_refuses_bad_workspace_ids_and_writes_nothing,
    issue_refuses_blank_control_or_overlong_names,
    names_with_invisible_format_characters_are_refused_and_nothing_is_written,
    issue_refuses_unknown_or_missing_environments_and_owners,
    issue_refuses_malformed_scopes_and_more_than_32,
    issue_refuses_missing_or_malformed_actors,
    issue_refuses_bad_metadata_keys_too_many_entries_and_long_values,
    issue_refuses_expiries_past_too_far_ahead_or_invalid,
    several_violations_in_one_request_are_all_reported,
    a_flood_of_violations_is_reported_in_an_answer_the_client_can_read,
    get_refuses_empty_overlong_and_hostile_key_ids,
    list_keys_refuses_bad_workspaces_filters_and_page_sizes,
    list_keys_refuses_forged_and_garbage_page_tokens,
    list_audit_events_refuses_bad_workspaces_page_sizes_and_tokens,
    update_refuses_bad_masks_and_fields_and_changes_nothing,
    rotate_refuses_bad_grace_periods_and_changes_nothing,
    revoke_refuses_long_reasons_and_bad_actors_and_changes_nothing,
    delete_refuses_bad_key_ids_and_actors_and_changes_nothing,
    verify_refuses_malformed_required_scopes,
    verify_answers_malformed_keys_with_a_code_not_an_error,
    malformed_keys_are_refused_before_any_storage_access,
    hostile_but_valid_text_is_stored_literally_and_the_tables_survive,
    request_bodies_that_do_not_decode_are_invalid_argument,
);
