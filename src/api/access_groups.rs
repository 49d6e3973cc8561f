//! `keywarden.v1.AccessGroupService`: validate, convert, call [`AccessGroups`].

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::error::check;
use super::mutation::Mutation;
use crate::access_groups::AccessGroups;
use crate::domain::access::{self, AccessGroup};
use crate::domain::validate::Violations;
use crate::proto;
use crate::proto::access_group_service_server::AccessGroupService;

pub struct AccessGroupApi {
    groups: Arc<AccessGroups>,
}

impl AccessGroupApi {
    pub fn new(groups: Arc<AccessGroups>) -> Self {
        AccessGroupApi { groups }
    }
}

fn group_pb(g: &AccessGroup) -> proto::AccessGroup {
    proto::AccessGroup {
        workspace_id: g.workspace_id.clone(),
        name: g.name.clone(),
        targets: g.targets.iter().cloned().collect(),
        created_at: Some(convert::timestamp(g.created_at)),
        updated_at: Some(convert::timestamp(g.updated_at)),
    }
}

/// The workspace, the group name and (when given) the targets of a request.
fn group_fields(
    workspace_id: &str,
    name: &str,
    targets: Option<&[String]>,
    v: &mut Violations,
) -> BTreeSet<String> {
    v.workspace_id("workspace_id", workspace_id);
    if !access::is_group_name(name) {
        v.add(
            "name",
            "must be 1 to 64 of a-z, 0-9, '_' and '-', starting with a letter",
        );
    }
    let targets = targets.unwrap_or_default();
    if targets.len() > access::MAX_TARGETS {
        v.add(
            "targets",
            format!("must hold at most {} targets", access::MAX_TARGETS),
        );
        return BTreeSet::new();
    }
    for (i, t) in targets.iter().enumerate() {
        if !access::is_target(t) {
            v.add(
                format!("targets[{i}]"),
                "must be 1 to 128 printable ASCII characters without spaces",
            );
        }
    }
    targets.iter().cloned().collect()
}

#[tonic::async_trait]
impl AccessGroupService for AccessGroupApi {
    async fn create_access_group(
        &self,
        request: Request<proto::CreateAccessGroupRequest>,
    ) -> Result<Response<proto::AccessGroupResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        let targets = group_fields(&r.workspace_id, &r.name, Some(&r.targets), v);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        let group = self
            .groups
            .create(&acting, r.workspace_id, r.name, targets)
            .await?;
        Ok(Response::new(proto::AccessGroupResponse {
            access_group: Some(group_pb(&group)),
        }))
    }

    async fn list_access_groups(
        &self,
        request: Request<proto::ListAccessGroupsRequest>,
    ) -> Result<Response<proto::ListAccessGroupsResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        check(v)?;
        let groups = self.groups.list(&r.workspace_id).await?;
        Ok(Response::new(proto::ListAccessGroupsResponse {
            access_groups: groups.iter().map(group_pb).collect(),
        }))
    }

    async fn update_access_group(
        &self,
        request: Request<proto::UpdateAccessGroupRequest>,
    ) -> Result<Response<proto::AccessGroupResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        let targets = group_fields(&r.workspace_id, &r.name, Some(&r.targets), v);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        let group = self
            .groups
            .update(&acting, &r.workspace_id, &r.name, targets)
            .await?;
        Ok(Response::new(proto::AccessGroupResponse {
            access_group: Some(group_pb(&group)),
        }))
    }

    async fn delete_access_group(
        &self,
        request: Request<proto::DeleteAccessGroupRequest>,
    ) -> Result<Response<proto::DeleteAccessGroupResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        group_fields(&r.workspace_id, &r.name, None, v);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        self.groups
            .delete(&acting, &r.workspace_id, &r.name)
            .await?;
        Ok(Response::new(proto::DeleteAccessGroupResponse {}))
    }
}
