//! Access groups: named sets of targets per workspace. Keys name groups in their
//! resource access; the groups' targets are resolved when a key is loaded into the
//! VerifyKey cache. A change appends an `updated` event for every key naming the group
//! (in the change's transaction), so this replica drops those keys at once and every
//! other replica when its tailer reads the events.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::cache::VerifyCache;
use crate::clock::Clock;
use crate::domain::access::AccessGroup;
use crate::domain::refusal::{Reason, Refusal};
use crate::events::EventHub;
use crate::events::invalidate_committed;
use crate::store::Acting;
use crate::store::{Store, StoreError};

/// Why an access-group operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessGroupError {
    /// Refused, with the reason that decides the status code (see `api::error`).
    #[error("{0}")]
    Refused(Refusal),
    #[error("workspace {0} does not exist")]
    WorkspaceNotFound(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for AccessGroupError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Precondition(refusal) => AccessGroupError::Refused(refusal),
            other => AccessGroupError::Store(other),
        }
    }
}

pub struct AccessGroups {
    store: Arc<dyn Store>,
    cache: Arc<VerifyCache>,
    events: Arc<EventHub>,
    clock: Clock,
}

impl AccessGroups {
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<VerifyCache>,
        events: Arc<EventHub>,
        clock: Clock,
    ) -> Self {
        AccessGroups {
            store,
            cache,
            events,
            clock,
        }
    }

    pub async fn create(
        &self,
        acting: &Acting,
        workspace_id: String,
        name: String,
        targets: BTreeSet<String>,
    ) -> Result<AccessGroup, AccessGroupError> {
        if self.store.get_workspace(&workspace_id).await?.is_none() {
            return Err(AccessGroupError::WorkspaceNotFound(workspace_id));
        }
        let now = self.clock.now();
        let group = AccessGroup {
            workspace_id,
            name,
            targets,
            created_at: now,
            updated_at: now,
        };
        let audit = acting.audit("access_group.create", detail(&group.name, &group.targets));
        match self.store.insert_group(&group, &audit).await {
            Ok(()) => Ok(group),
            Err(StoreError::AlreadyExists) => Err(AccessGroupError::Refused(
                Refusal::new(
                    Reason::AccessGroupAlreadyExists,
                    format!(
                        "access group {} exists already in workspace {}",
                        group.name, group.workspace_id
                    ),
                )
                .with("workspace_id", &group.workspace_id)
                .with("access_group", &group.name),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list(&self, workspace_id: &str) -> Result<Vec<AccessGroup>, AccessGroupError> {
        let groups = self.store.list_groups(workspace_id).await?;
        if groups.is_empty() && !self.store.workspace_exists(workspace_id).await? {
            return Err(AccessGroupError::WorkspaceNotFound(workspace_id.to_owned()));
        }
        Ok(groups)
    }

    pub async fn update(
        &self,
        acting: &Acting,
        workspace_id: &str,
        name: &str,
        targets: BTreeSet<String>,
    ) -> Result<AccessGroup, AccessGroupError> {
        let (group, stale) = self
            .store
            .update_group(
                workspace_id,
                name,
                &targets,
                self.clock.now(),
                &acting.audit("access_group.update", detail(name, &targets)),
            )
            .await
            .map_err(|e| group_error(e, workspace_id, name))?;
        invalidate_committed(&self.cache, &self.events, &stale);
        Ok(group)
    }

    pub async fn delete(
        &self,
        acting: &Acting,
        workspace_id: &str,
        name: &str,
    ) -> Result<(), AccessGroupError> {
        self.store
            .delete_group(
                workspace_id,
                name,
                self.clock.now(),
                &acting.audit("access_group.delete", detail(name, &BTreeSet::new())),
            )
            .await
            .map_err(|e| group_error(e, workspace_id, name))?;
        Ok(())
    }
}

/// A storage error about one group: "not found" names the group (not a key).
fn group_error(e: StoreError, workspace_id: &str, name: &str) -> AccessGroupError {
    match e {
        StoreError::NotFound => AccessGroupError::Refused(
            Refusal::new(
                Reason::AccessGroupNotFound,
                format!("access group {name} does not exist in workspace {workspace_id}"),
            )
            .with("workspace_id", workspace_id)
            .with("access_group", name),
        ),
        other => other.into(),
    }
}

fn detail(name: &str, targets: &BTreeSet<String>) -> String {
    format!("group: {name}, targets: {}", targets.len())
}
