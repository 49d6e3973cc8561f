//! What a key may reach, through real servers: resources by mode (ALL, INCLUDE, EXCLUDE)
//! and network allowlists (IPv4, IPv6, IPv4-mapped IPv6), set at IssueKey, changed by
//! UpdateKey with effect on the next call, and validated; access groups; and the team's
//! reach, which caps every key of the team.

mod common;

use common::*;
use keywarden::proto::{self, ResourceAccessMode, VerifyCode};
use prost_types::FieldMask;
use tonic::Code;

fn access(mode: ResourceAccessMode, targets: &[&str]) -> Option<proto::ResourceAccess> {
    Some(proto::ResourceAccess {
        mode: mode as i32,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        access_groups: Vec::new(),
    })
}

fn via_groups(mode: ResourceAccessMode, groups: &[&str]) -> Option<proto::ResourceAccess> {
    Some(proto::ResourceAccess {
        mode: mode as i32,
        targets: Vec::new(),
        access_groups: groups.iter().map(|g| g.to_string()).collect(),
    })
}

type GroupClient = proto::access_group_service_client::AccessGroupServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

fn groups(channel: &tonic::transport::Channel) -> GroupClient {
    proto::access_group_service_client::AccessGroupServiceClient::with_interceptor(
        channel.clone(),
        bearer(ADMIN_TOKEN),
    )
}

async fn set_group(
    channel: &tonic::transport::Channel,
    name: &str,
    targets: &[&str],
    create: bool,
) {
    let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    if create {
        groups(channel)
            .create_access_group(proto::CreateAccessGroupRequest {
                workspace_id: "ws_test".into(),
                name: name.into(),
                targets,
                actor: Some(actor()),
            })
            .await
            .unwrap();
    } else {
        groups(channel)
            .update_access_group(proto::UpdateAccessGroupRequest {
                workspace_id: "ws_test".into(),
                name: name.into(),
                targets,
                actor: Some(actor()),
            })
            .await
            .unwrap();
    }
}

async fn verify_on(channel: &tonic::transport::Channel, key: &str, resource: &str) -> VerifyCode {
    let r = proto::verify_service_client::VerifyServiceClient::with_interceptor(
        channel.clone(),
        bearer(VERIFIER_TOKEN),
    )
    .verify_key(proto::VerifyKeyRequest {
        key: key.to_owned(),
        resource: resource.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    code(&r)
}

/// A target added to a group is reachable on the next call without touching the key,
/// here and on another replica (which learns of it from the event log); a target taken
/// out of an EXCLUDE group likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_changes_reach_the_next_call_on_every_replica() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let b_server = keywarden::server::start(&test_settings(&app.db), app.clock.clone())
        .await
        .unwrap();
    let b = channel_to(&b_server).await;
    set_group(&app.channel, "frontier", &["gpt-4o"], true).await;
    set_group(&app.channel, "banned", &["o1"], true).await;
    let included = app
        .issue_with(|r| r.resource_access = via_groups(ResourceAccessMode::Include, &["frontier"]))
        .await;
    let excluded = app
        .issue_with(|r| r.resource_access = via_groups(ResourceAccessMode::Exclude, &["banned"]))
        .await;
    assert_eq!(
        verify_on(&b, &included.key, "gpt-4o").await,
        VerifyCode::Valid
    );
    assert_eq!(
        verify_on(&b, &included.key, "o3").await,
        VerifyCode::ResourceForbidden
    );
    assert_eq!(
        verify_on(&app.channel, &excluded.key, "o1").await,
        VerifyCode::ResourceForbidden
    );

    set_group(&app.channel, "frontier", &["gpt-4o", "o3"], false).await;
    set_group(&app.channel, "banned", &[], false).await;
    // This replica at once.
    assert_eq!(
        verify_on(&app.channel, &included.key, "o3").await,
        VerifyCode::Valid
    );
    assert_eq!(
        verify_on(&app.channel, &excluded.key, "o1").await,
        VerifyCode::Valid
    );
    // The other one as soon as it reads the log.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while verify_on(&b, &included.key, "o3").await != VerifyCode::Valid {
        assert!(
            std::time::Instant::now() < deadline,
            "B never saw the group change"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The key itself was not touched.
    let info = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: included.key_info.as_ref().unwrap().key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(info.updated_at, included.key_info.unwrap().updated_at);
    b_server.shutdown().await.unwrap();
}

type TeamClient = proto::team_service_client::TeamServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

fn teams(channel: &tonic::transport::Channel) -> TeamClient {
    proto::team_service_client::TeamServiceClient::with_interceptor(
        channel.clone(),
        bearer(ADMIN_TOKEN),
    )
}

fn team_policy(reach: Option<proto::ResourceAccess>) -> proto::TeamPolicy {
    proto::TeamPolicy {
        resource_access: reach,
        ..Default::default()
    }
}

async fn set_team_reach(channel: &tonic::transport::Channel, reach: Option<proto::ResourceAccess>) {
    teams(channel)
        .update_team(proto::UpdateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            actor: Some(actor()),
            policy: Some(team_policy(reach)),
            update_mask: Some(FieldMask {
                paths: vec!["policy".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn eventually_on(
    channel: &tonic::transport::Channel,
    key: &str,
    resource: &str,
    want: VerifyCode,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = verify_on(channel, key, resource).await;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{resource}: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A key never reaches a target its team cannot reach, even a key an admin issued with
/// ALL; the team's reach may name access groups; changing the reach or one of its groups
/// takes effect on the next call, here and on another replica, without touching the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_never_reaches_what_its_team_cannot() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let b_server = keywarden::server::start(&test_settings(&app.db), app.clock.clone())
        .await
        .unwrap();
    let b = channel_to(&b_server).await;
    set_group(&app.channel, "frontier", &["gpt-4o"], true).await;

    // A reach naming a group that does not exist is refused, and no team is made.
    let refused = teams(&app.channel)
        .create_team(proto::CreateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            name: "ML".into(),
            policy: Some(team_policy(via_groups(
                ResourceAccessMode::Include,
                &["nope"],
            ))),
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("nope"), "{refused:?}");

    let mut reach = via_groups(ResourceAccessMode::Include, &["frontier"]);
    if let Some(r) = reach.as_mut() {
        r.targets = vec!["claude-haiku".into()];
    }
    teams(&app.channel)
        .create_team(proto::CreateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            name: "ML".into(),
            policy: Some(team_policy(reach.clone())),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    let shown = teams(&app.channel)
        .get_team(proto::GetTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    assert_eq!(shown.policy.unwrap().resource_access, reach);

    let everything = app.issue_with(|r| r.team_id = "team_ml".into()).await;
    let but_gpt = app
        .issue_with(|r| {
            r.team_id = "team_ml".into();
            r.resource_access = access(ResourceAccessMode::Exclude, &["gpt-4o"]);
        })
        .await;
    let outside_team = app.issue().await;
    let before = everything.key_info.clone().unwrap();
    for channel in [&app.channel, &b] {
        assert_eq!(
            verify_on(channel, &everything.key, "gpt-4o").await,
            VerifyCode::Valid
        );
        assert_eq!(
            verify_on(channel, &everything.key, "claude-haiku").await,
            VerifyCode::Valid
        );
        assert_eq!(
            verify_on(channel, &everything.key, "o3").await,
            VerifyCode::ResourceForbidden
        );
        assert_eq!(
            verify_on(channel, &everything.key, "").await,
            VerifyCode::ResourceForbidden,
            "a team with a list needs the request to name its resource"
        );
        assert_eq!(
            verify_on(channel, &but_gpt.key, "gpt-4o").await,
            VerifyCode::ResourceForbidden
        );
        assert_eq!(
            verify_on(channel, &but_gpt.key, "claude-haiku").await,
            VerifyCode::Valid
        );
        assert_eq!(
            verify_on(channel, &outside_team.key, "o3").await,
            VerifyCode::Valid
        );
    }

    // A target added to the team's group: reachable at once here, soon on B.
    set_group(&app.channel, "frontier", &["gpt-4o", "o3"], false).await;
    assert_eq!(
        verify_on(&app.channel, &everything.key, "o3").await,
        VerifyCode::Valid
    );
    eventually_on(&b, &everything.key, "o3", VerifyCode::Valid).await;

    // The team's reach narrowed: every key of the team follows, on both replicas.
    set_team_reach(&app.channel, access(ResourceAccessMode::Exclude, &["o3"])).await;
    assert_eq!(
        verify_on(&app.channel, &everything.key, "o3").await,
        VerifyCode::ResourceForbidden
    );
    assert_eq!(
        verify_on(&app.channel, &everything.key, "mistral").await,
        VerifyCode::Valid
    );
    eventually_on(&b, &everything.key, "o3", VerifyCode::ResourceForbidden).await;
    eventually_on(&b, &everything.key, "mistral", VerifyCode::Valid).await;
    assert_eq!(
        verify_on(&b, &but_gpt.key, "gpt-4o").await,
        VerifyCode::ResourceForbidden
    );
    assert_eq!(
        verify_on(&b, &outside_team.key, "o3").await,
        VerifyCode::Valid
    );

    // A group the team names cannot be deleted; once the team no longer names it, it can.
    set_team_reach(
        &app.channel,
        via_groups(ResourceAccessMode::Exclude, &["frontier"]),
    )
    .await;
    let delete = proto::DeleteAccessGroupRequest {
        workspace_id: "ws_test".into(),
        name: "frontier".into(),
        actor: Some(actor()),
    };
    let refused = groups(&app.channel)
        .delete_access_group(delete.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("team"), "{refused:?}");
    set_team_reach(&app.channel, None).await;
    groups(&app.channel)
        .delete_access_group(delete)
        .await
        .unwrap();
    for channel in [&app.channel, &b] {
        eventually_on(channel, &everything.key, "o3", VerifyCode::Valid).await;
    }

    // The keys themselves were never touched.
    let after = app
        .admin()
        .get_key(proto::GetKeyRequest {
            key_id: before.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_info
        .unwrap();
    assert_eq!(after.updated_at, before.updated_at);
    b_server.shutdown().await.unwrap();
}

async fn groups_must_exist_and_cannot_go_while_named(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut r = issue_request("ws_test");
    r.resource_access = via_groups(ResourceAccessMode::Include, &["nope"]);
    let refused = app.admin().issue_key(r).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("nope"), "{refused:?}");

    set_group(&app.channel, "frontier", &["gpt-4o"], true).await;
    let dup = groups(&app.channel)
        .create_access_group(proto::CreateAccessGroupRequest {
            workspace_id: "ws_test".into(),
            name: "frontier".into(),
            targets: vec![],
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    app.issue_with(|r| r.resource_access = via_groups(ResourceAccessMode::Include, &["frontier"]))
        .await;
    let delete = |name: &str| proto::DeleteAccessGroupRequest {
        workspace_id: "ws_test".into(),
        name: name.into(),
        actor: Some(actor()),
    };
    let refused = groups(&app.channel)
        .delete_access_group(delete("frontier"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    set_group(&app.channel, "unused", &[], true).await;
    groups(&app.channel)
        .delete_access_group(delete("unused"))
        .await
        .unwrap();
    let listed = groups(&app.channel)
        .list_access_groups(proto::ListAccessGroupsRequest {
            workspace_id: "ws_test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_groups;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].targets, ["gpt-4o"]);
    let bad = groups(&app.channel)
        .create_access_group(proto::CreateAccessGroupRequest {
            workspace_id: "ws_test".into(),
            name: "Bad Name".into(),
            targets: vec!["two words".into()],
            actor: Some(actor()),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["name", "targets[0]"]);
}

async fn verify_at(app: &TestApp, key: &str, resource: &str, client_ip: &str) -> VerifyCode {
    let r = app
        .verifier()
        .verify_key(proto::VerifyKeyRequest {
            key: key.to_owned(),
            resource: resource.to_owned(),
            client_ip: client_ip.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    code(&r)
}

async fn resources_by_mode(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let all = app.issue().await;
    let include = app
        .issue_with(|r| {
            r.resource_access = access(ResourceAccessMode::Include, &["gpt-4o", "claude-sonnet"])
        })
        .await;
    let exclude = app
        .issue_with(|r| r.resource_access = access(ResourceAccessMode::Exclude, &["gpt-4o"]))
        .await;
    for (key, resource, expected) in [
        (&all, "anything", VerifyCode::Valid),
        (&all, "", VerifyCode::Valid),
        (&include, "gpt-4o", VerifyCode::Valid),
        (&include, "claude-sonnet", VerifyCode::Valid),
        (&include, "o3", VerifyCode::ResourceForbidden),
        (&include, "", VerifyCode::ResourceForbidden),
        (&exclude, "gpt-4o", VerifyCode::ResourceForbidden),
        (&exclude, "o3", VerifyCode::Valid),
        (&exclude, "", VerifyCode::ResourceForbidden),
    ] {
        assert_eq!(
            verify_at(&app, &key.key, resource, "").await,
            expected,
            "{:?} {resource:?}",
            key.key_info.as_ref().unwrap().resource_access
        );
    }
    let info = include.key_info.unwrap();
    let shown = info.resource_access.unwrap();
    assert_eq!(shown.mode(), ResourceAccessMode::Include);
    assert_eq!(shown.targets, ["claude-sonnet", "gpt-4o"]);

    // A change applies to the very next call.
    app.admin()
        .update_key(proto::UpdateKeyRequest {
            key_id: info.key_id.clone(),
            actor: Some(actor()),
            resource_access: access(ResourceAccessMode::Include, &["o3"]),
            update_mask: Some(FieldMask {
                paths: vec!["resource_access".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        verify_at(&app, &include.key, "o3", "").await,
        VerifyCode::Valid
    );
    assert_eq!(
        verify_at(&app, &include.key, "gpt-4o", "").await,
        VerifyCode::ResourceForbidden
    );
}

async fn network_allowlists_at_their_edges(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let with = |cidrs: &[&str]| {
        let cidrs: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
        let app = &app;
        async move { app.issue_with(|r| r.allowed_cidrs = cidrs).await }
    };
    let host = with(&["203.0.113.7/32"]).await;
    let any_v4 = with(&["0.0.0.0/0"]).await;
    let any_v6 = with(&["::/0"]).await;
    let mixed = with(&["10.0.0.0/8", "2001:db8::/32"]).await;
    let open = app.issue().await;
    for (key, ip, expected) in [
        (&host, "203.0.113.7", VerifyCode::Valid),
        (&host, "203.0.113.8", VerifyCode::IpForbidden),
        (&host, "::ffff:203.0.113.7", VerifyCode::Valid),
        (&host, "::ffff:203.0.113.8", VerifyCode::IpForbidden),
        (&host, "", VerifyCode::IpForbidden),
        (&any_v4, "198.51.100.1", VerifyCode::Valid),
        (&any_v4, "2001:db8::1", VerifyCode::IpForbidden),
        (&any_v4, "::1", VerifyCode::IpForbidden),
        (&any_v4, "::ffff:198.51.100.1", VerifyCode::Valid),
        (&any_v6, "2001:db8::1", VerifyCode::Valid),
        (&any_v6, "198.51.100.1", VerifyCode::IpForbidden),
        (&mixed, "10.200.0.1", VerifyCode::Valid),
        (&mixed, "2001:db8:ffff::1", VerifyCode::Valid),
        (&mixed, "2001:db9::1", VerifyCode::IpForbidden),
        (&open, "", VerifyCode::Valid),
        (&open, "2001:db8::1", VerifyCode::Valid),
    ] {
        let cidrs = &key.key_info.as_ref().unwrap().allowed_cidrs;
        assert_eq!(
            verify_at(&app, &key.key, "", ip).await,
            expected,
            "{cidrs:?} from {ip:?}"
        );
    }
    assert_eq!(
        host.key_info.unwrap().allowed_cidrs,
        ["203.0.113.7/32".to_owned()]
    );
}

async fn malformed_ranges_targets_and_addresses_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let before = app.db.count("SELECT count(*) FROM api_keys").await;
    for (cidrs, field) in [
        (vec!["10.0.0.0/33"], "allowed_cidrs[0]"),
        (vec!["10.0.0.0/8", "banana"], "allowed_cidrs[1]"),
        (vec!["2001:db8::/129"], "allowed_cidrs[0]"),
        (vec![""], "allowed_cidrs[0]"),
    ] {
        let mut r = issue_request("ws_test");
        r.allowed_cidrs = cidrs.iter().map(|c| c.to_string()).collect();
        let status = app.admin().issue_key(r).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field], "{cidrs:?}");
    }
    let mut r = issue_request("ws_test");
    r.allowed_cidrs = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
    let status = app.admin().issue_key(r).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["allowed_cidrs"]);
    let mut r = issue_request("ws_test");
    r.resource_access = access(ResourceAccessMode::All, &["gpt-4o"]);
    let status = app.admin().issue_key(r).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["resource_access.targets"]);
    let mut r = issue_request("ws_test");
    r.resource_access = access(ResourceAccessMode::Include, &["two words"]);
    let status = app.admin().issue_key(r).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["resource_access.targets[0]"]);
    assert_eq!(app.db.count("SELECT count(*) FROM api_keys").await, before);

    // VerifyKey: a malformed address or resource is a bad request, not a crash.
    let issued = app.issue().await;
    for (resource, client_ip, field) in [
        ("", "300.1.1.1", "client_ip"),
        ("", "10.0.0.1/8", "client_ip"),
        ("", "not an ip", "client_ip"),
        ("two words", "", "resource"),
    ] {
        let status = app
            .verifier()
            .verify_key(proto::VerifyKeyRequest {
                key: issued.key.clone(),
                resource: resource.into(),
                client_ip: client_ip.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), [field]);
    }
}

/// A team key may narrow its team's reach, never widen it: IssueKey and UpdateKey refuse
/// a key listing targets or groups its team cannot reach (FAILED_PRECONDITION naming
/// them, audited, nothing written), and accept one within it (a target of one of the
/// team's groups counts) or one that excludes.
async fn a_team_key_s_reach_cannot_widen_its_team_s(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    set_group(&app.channel, "frontier", &["gpt-4o"], true).await;
    set_group(&app.channel, "cheap", &["haiku"], true).await;
    let mut reach = via_groups(ResourceAccessMode::Include, &["frontier"]);
    if let Some(r) = reach.as_mut() {
        r.targets = vec!["claude".into()];
    }
    teams(&app.channel)
        .create_team(proto::CreateTeamRequest {
            workspace_id: "ws_test".into(),
            team_id: "team_ml".into(),
            name: "ML".into(),
            policy: Some(team_policy(reach)),
            actor: Some(actor()),
        })
        .await
        .unwrap();
    let keys_before = app.db.count("SELECT count(*) FROM api_keys").await;
    let mut wide = proto::ResourceAccess {
        mode: ResourceAccessMode::Include as i32,
        targets: vec!["claude".into(), "o3".into()],
        access_groups: vec!["frontier".into(), "cheap".into()],
    };
    let mut r = issue_request("ws_test");
    r.team_id = "team_ml".into();
    r.resource_access = Some(wide.clone());
    let status = app.admin().issue_key(r).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("o3, group:cheap"), "{status:?}");
    assert!(status.message().contains("team team_ml"), "{status:?}");
    assert_eq!(
        app.db.count("SELECT count(*) FROM api_keys").await,
        keys_before
    );
    let denied = app
        .audit("ws_test")
        .await
        .into_iter()
        .filter(|e| e.action == "key.issue" && e.outcome == proto::AuditOutcome::Denied as i32)
        .count();
    assert_eq!(denied, 1);

    // Within: a listed target, a target of the team's group, the team's group; and a
    // key that excludes.
    wide.targets = vec!["claude".into(), "gpt-4o".into()];
    wide.access_groups = vec!["frontier".into()];
    let within = app
        .issue_with(|r| {
            r.team_id = "team_ml".into();
            r.resource_access = Some(wide.clone());
        })
        .await;
    app.issue_with(|r| {
        r.team_id = "team_ml".into();
        r.resource_access = access(ResourceAccessMode::Exclude, &["o3"]);
    })
    .await;
    // Outside a team, a key lists what it likes.
    app.issue_with(|r| r.resource_access = access(ResourceAccessMode::Include, &["o3"]))
        .await;

    // UpdateKey: the same rule, the key unchanged when refused.
    let key_id = within.key_info.unwrap().key_id;
    let update = |reach| proto::UpdateKeyRequest {
        key_id: key_id.clone(),
        actor: Some(actor()),
        resource_access: reach,
        update_mask: Some(FieldMask {
            paths: vec!["resource_access".into()],
        }),
        ..Default::default()
    };
    let status = app
        .admin()
        .update_key(update(access(ResourceAccessMode::Include, &["o3"])))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(": o3"), "{status:?}");
    let verify = verify_on(&app.channel, &within.key, "gpt-4o").await;
    assert_eq!(
        verify,
        VerifyCode::Valid,
        "the refused update changed nothing"
    );
    app.admin()
        .update_key(update(access(ResourceAccessMode::Include, &["claude"])))
        .await
        .unwrap();
    assert_eq!(
        verify_on(&app.channel, &within.key, "gpt-4o").await,
        VerifyCode::ResourceForbidden
    );
}

both_backends!(
    a_team_key_s_reach_cannot_widen_its_team_s,
    groups_must_exist_and_cannot_go_while_named,
    resources_by_mode,
    network_allowlists_at_their_edges,
    malformed_ranges_targets_and_addresses_are_refused,
);
