//! What a key may reach, through real servers: resources by mode (ALL, INCLUDE, EXCLUDE)
//! and network allowlists (IPv4, IPv6, IPv4-mapped IPv6), set at IssueKey, changed by
//! UpdateKey with effect on the next call, and validated.

mod common;

use common::*;
use keywarden::proto::{self, ResourceAccessMode, VerifyCode};
use prost_types::FieldMask;
use tonic::Code;

fn access(mode: ResourceAccessMode, targets: &[&str]) -> Option<proto::ResourceAccess> {
    Some(proto::ResourceAccess {
        mode: mode as i32,
        targets: targets.iter().map(|t| t.to_string()).collect(),
    })
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

both_backends!(
    resources_by_mode,
    network_allowlists_at_their_edges,
    malformed_ranges_targets_and_addresses_are_refused,
);
