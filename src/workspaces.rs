//! Workspaces: create, get, update (name, plan, pool), owners' pools, each audited in the
//! mutation's own transaction, and what each plan allows in this deployment.

use std::sync::Arc;

use crate::cache::VerifyCache;
use crate::clock::Clock;
use crate::domain::key::Owner;
use crate::domain::limits::RateLimit;
use crate::domain::pools::PoolBudget;
use crate::domain::workspace::{Plan, PlanPolicy, Plans, Workspace};
use crate::events::{EventHub, invalidate_committed};
use crate::store::Acting;
use crate::store::{OwnerPool, StoreError, WorkspacePatch, WorkspaceStore, split_page};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace {0} does not exist")]
    NotFound(String),
    #[error("workspace {0} exists already")]
    AlreadyExists(String),
    #[error(transparent)]
    Store(StoreError),
}

pub struct Workspaces {
    /// Only the workspace aggregate: the composition root upcasts its `Arc<dyn Store>`.
    store: Arc<dyn WorkspaceStore>,
    /// A change of plan reloads the workspace's keys (whether they verify depends on it).
    cache: Arc<VerifyCache>,
    events: Arc<EventHub>,
    clock: Clock,
    plans: Arc<Plans>,
}

impl Workspaces {
    /// The time now, by the service's clock (what answers compute periods from).
    pub fn now(&self) -> crate::domain::Micros {
        self.clock.now()
    }

    pub fn new(
        store: Arc<dyn WorkspaceStore>,
        cache: Arc<VerifyCache>,
        events: Arc<EventHub>,
        clock: Clock,
        plans: Arc<Plans>,
    ) -> Self {
        Workspaces {
            store,
            cache,
            events,
            clock,
            plans,
        }
    }

    pub fn policy(&self, plan: Plan) -> PlanPolicy {
        self.plans.policy(plan)
    }

    pub async fn create(
        &self,
        acting: &Acting,
        workspace_id: String,
        name: String,
        plan: Plan,
    ) -> Result<Workspace, WorkspaceError> {
        let now = self.clock.now();
        let workspace = Workspace {
            workspace_id,
            name,
            plan,
            rate_limits: Vec::new(),
            budget: None,
            spend: Default::default(),
            created_at: now,
            updated_at: now,
        };
        let audit = acting.audit("workspace.create", format!("plan: {}", plan.as_str()));
        match self.store.insert_workspace(&workspace, &audit).await {
            Ok(()) => {
                tracing::info!(workspace_id = %workspace.workspace_id, "workspace created");
                Ok(workspace)
            }
            Err(StoreError::AlreadyExists) => {
                Err(WorkspaceError::AlreadyExists(workspace.workspace_id))
            }
            Err(e) => Err(WorkspaceError::Store(e)),
        }
    }

    pub async fn get(&self, workspace_id: &str) -> Result<Workspace, WorkspaceError> {
        self.store
            .get_workspace(workspace_id)
            .await
            .map_err(WorkspaceError::Store)?
            .ok_or_else(|| WorkspaceError::NotFound(workspace_id.to_owned()))
    }

    /// One page of workspaces by id and the id the next page starts after, if any.
    pub async fn list(
        &self,
        page_size: u32,
        after: Option<&str>,
    ) -> Result<(Vec<Workspace>, Option<String>), WorkspaceError> {
        // One row more than asked tells whether there is a next page.
        let rows = self
            .store
            .list_workspaces(page_size + 1, after)
            .await
            .map_err(WorkspaceError::Store)?;
        Ok(split_page(rows, page_size, |w| w.workspace_id.clone()))
    }

    pub async fn update(
        &self,
        acting: &Acting,
        workspace_id: &str,
        patch: WorkspacePatch,
    ) -> Result<Workspace, WorkspaceError> {
        let detail = [
            patch.name.as_ref().map(|_| "name".to_owned()),
            patch.plan.map(|p| format!("plan: {}", p.as_str())),
            patch
                .rate_limits
                .as_ref()
                .map(|l| format!("pool: {}", pool_text(l))),
            patch
                .budget
                .as_ref()
                .map(|b| format!("budget: {}", budget_text(b.as_ref()))),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        let audit = acting.audit("workspace.update", detail);
        match self
            .store
            .update_workspace(workspace_id, &patch, self.clock.now(), &audit)
            .await
        {
            Ok((w, stale)) => {
                invalidate_committed(&self.cache, &self.events, &stale);
                Ok(w)
            }
            Err(StoreError::NotFound) => Err(WorkspaceError::NotFound(workspace_id.to_owned())),
            Err(e) => Err(WorkspaceError::Store(e)),
        }
    }

    /// The pool `owner`'s keys in the workspace share (all empty: none).
    pub async fn owner_limits(
        &self,
        workspace_id: &str,
        owner: &Owner,
    ) -> Result<OwnerPool, WorkspaceError> {
        let limits = self
            .store
            .owner_limits(workspace_id, owner)
            .await
            .map_err(WorkspaceError::Store)?;
        if limits == OwnerPool::default()
            && !self
                .store
                .workspace_exists(workspace_id)
                .await
                .map_err(WorkspaceError::Store)?
        {
            return Err(WorkspaceError::NotFound(workspace_id.to_owned()));
        }
        Ok(limits)
    }

    /// Sets the pool `owner`'s keys in the workspace share (empty: none), taking effect
    /// on the next call of each of them on every replica.
    pub async fn set_owner_limits(
        &self,
        acting: &Acting,
        workspace_id: &str,
        owner: &Owner,
        limits: Vec<RateLimit>,
        budget: Option<PoolBudget>,
    ) -> Result<OwnerPool, WorkspaceError> {
        let audit = acting.audit(
            "owner.limits",
            format!(
                "owner: {owner}, pool: {}, budget: {}",
                pool_text(&limits),
                budget_text(budget.as_ref())
            ),
        );
        match self
            .store
            .set_owner_limits(
                workspace_id,
                owner,
                &limits,
                budget,
                self.clock.now(),
                &audit,
            )
            .await
        {
            Ok((pool, stale)) => {
                invalidate_committed(&self.cache, &self.events, &stale);
                Ok(pool)
            }
            Err(StoreError::NotFound) => Err(WorkspaceError::NotFound(workspace_id.to_owned())),
            Err(e) => Err(WorkspaceError::Store(e)),
        }
    }
}

/// A pool's limits as the audit log shows them (`none` for no pool).
pub fn pool_text(limits: &[RateLimit]) -> String {
    if limits.is_empty() {
        "none".to_owned()
    } else {
        crate::domain::limits::join(limits)
    }
}

/// A pool's budget as the audit log shows it (`none` for none).
pub fn budget_text(budget: Option<&PoolBudget>) -> String {
    match budget {
        None => "none".to_owned(),
        Some(b) => format!(
            "{} micros {}",
            b.max_micros,
            match b.period {
                crate::domain::budget::BudgetPeriod::Lifetime => "in all".to_owned(),
                p => format!("per {}", p.as_text()),
            }
        ),
    }
}
