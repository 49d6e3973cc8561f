//! Access groups: named target sets that keys and teams' reach refer to, and the two
//! transaction helpers every mutation naming a group uses (`lock_groups`,
//! `teams_naming_group`).
//!
//! A group and the keys naming it are locked in one order everywhere: the group first,
//! then the key rows. Changing a group appends an `updated` event for every key it
//! reaches, so replicas reload them; deleting one is refused while anything names it.

use std::collections::BTreeSet;

use crate::domain::Micros;
use crate::domain::access::AccessGroup;
use crate::domain::key_format::KeyHash;
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::team::Team;
use crate::store::sql::rows::{GroupRow, KeyRow, TeamRow, join_set, key_columns, team_columns};
use crate::store::sql::{Backend, Bind, Column, Mutation, SqlStore};
use crate::store::{AccessGroupStore, AuditContext, StoreError};

/// Every access group of a workspace (`GroupRow`), by name.
pub(super) const WORKSPACE_GROUPS: &str = "SELECT workspace_id, name, targets, created_at, \
     updated_at FROM access_groups WHERE workspace_id = $1 ORDER BY name";

impl<B: Backend> Mutation<B>
where
    for<'c> &'c mut B::Connection: sqlx::Executor<'c, Database = B>,
    for<'r> &'r str: sqlx::ColumnIndex<B::Row>,
    usize: sqlx::ColumnIndex<B::Row>,
    i64: Column<B>,
    String: Column<B>,
    Vec<u8>: Column<B>,
    Option<i64>: Column<B>,
    Option<String>: Column<B>,
    for<'a> &'a str: Bind<B>,
    for<'a> &'a [u8]: Bind<B>,
{
    /// Every access group `groups` names must exist in the workspace, checked in the
    /// mutation's own transaction. On Postgres each group row stays share-locked until
    /// commit, so a concurrent `delete_group` either waits for this transaction (and
    /// then sees the key or team naming the group) or this one waits for the delete
    /// (and then finds the group gone): never a reach naming a deleted group.
    pub(super) async fn lock_groups(
        &mut self,
        workspace_id: &str,
        groups: &BTreeSet<String>,
    ) -> Result<(), StoreError> {
        let mut missing = Vec::new();
        for name in groups {
            let found: Option<String> = sqlx::query_scalar(B::for_share(
                "SELECT name FROM access_groups WHERE workspace_id = $1 AND name = $2",
            ))
            .bind(workspace_id)
            .bind(name)
            .fetch_optional(self.conn())
            .await?;
            if found.is_none() {
                missing.push(name.as_str());
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Precondition(
                crate::domain::access::groups_missing(workspace_id, &missing),
            ))
        }
    }

    /// The teams of a workspace whose reach names access group `name`.
    pub(super) async fn teams_naming_group(
        &mut self,
        workspace_id: &str,
        name: &str,
    ) -> Result<Vec<String>, StoreError> {
        let rows: Vec<TeamRow> = sqlx::query_as(concat!(
            "SELECT ",
            team_columns!(),
            " FROM teams WHERE workspace_id = $1 ORDER BY team_id"
        ))
        .bind(workspace_id)
        .fetch_all(self.conn())
        .await?;
        let mut named = Vec::new();
        for row in rows {
            let team: Team = row.try_into()?;
            if team.policy.resource_access.groups.contains(name) {
                named.push(team.team_id);
            }
        }
        Ok(named)
    }
}

#[async_trait::async_trait]
impl<B: Backend> AccessGroupStore for SqlStore<B>
where
    for<'c> &'c mut B::Connection: sqlx::Executor<'c, Database = B>,
    for<'r> &'r str: sqlx::ColumnIndex<B::Row>,
    usize: sqlx::ColumnIndex<B::Row>,
    i64: Column<B>,
    String: Column<B>,
    Vec<u8>: Column<B>,
    Option<i64>: Column<B>,
    Option<String>: Column<B>,
    for<'a> &'a str: Bind<B>,
    for<'a> &'a [u8]: Bind<B>,
{
    #[tracing::instrument(level = "debug", skip_all)]
    async fn insert_group(
        &self,
        group: &AccessGroup,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO access_groups (workspace_id, name, targets, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (workspace_id, name) DO NOTHING",
        )
        .bind(&group.workspace_id)
        .bind(&group.name)
        .bind(join_set(&group.targets))
        .bind(group.created_at)
        .execute(m.conn())
        .await?;
        if B::rows_affected(&inserted) == 0 {
            return Err(StoreError::AlreadyExists);
        }
        m.commit_with_audit(&group.workspace_id, audit, group.created_at)
            .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_groups(&self, workspace_id: &str) -> Result<Vec<AccessGroup>, StoreError> {
        let rows: Vec<GroupRow> = sqlx::query_as(WORKSPACE_GROUPS)
            .bind(workspace_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn update_group(
        &self,
        workspace_id: &str,
        name: &str,
        targets: &BTreeSet<String>,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(AccessGroup, Vec<KeyHash>), StoreError> {
        let mut m = self.begin().await?;
        let row: Option<GroupRow> = sqlx::query_as(B::for_update(
            "SELECT workspace_id, name, targets, created_at, updated_at FROM access_groups \
             WHERE workspace_id = $1 AND name = $2",
        ))
        .bind(workspace_id)
        .bind(name)
        .fetch_optional(m.conn())
        .await?;
        let mut group: AccessGroup = row.ok_or(StoreError::NotFound)?.into();
        group.targets = targets.clone();
        group.updated_at = now;
        sqlx::query(
            "UPDATE access_groups SET targets = $3, updated_at = $4 \
             WHERE workspace_id = $1 AND name = $2",
        )
        .bind(workspace_id)
        .bind(name)
        .bind(join_set(targets))
        .bind(now)
        .execute(m.conn())
        .await?;
        // Every key that names the group, or whose team's reach names it, is
        // reloaded by every replica.
        let mut rows: Vec<KeyRow> = sqlx::query_as(B::for_update(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE workspace_id = $1 AND deleted_at IS NULL \
             AND (' ' || resource_groups || ' ') LIKE ('% ' || $2 || ' %') ORDER BY key_id"
        )))
        .bind(workspace_id)
        .bind(name)
        .fetch_all(m.conn())
        .await?;
        for team_id in m.teams_naming_group(workspace_id, name).await? {
            let team_rows: Vec<KeyRow> = sqlx::query_as(B::for_update(concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE workspace_id = $1 AND team_id = $2 \
                 AND deleted_at IS NULL \
                 AND NOT ((' ' || resource_groups || ' ') LIKE ('% ' || $3 || ' %')) \
                 ORDER BY key_id"
            )))
            .bind(workspace_id)
            .bind(&team_id)
            .bind(name)
            .fetch_all(m.conn())
            .await?;
            rows.extend(team_rows);
        }
        let stale = m.reload_keys(rows, now).await?;
        m.commit_with_audit(workspace_id, audit, now).await?;
        Ok((group, stale))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_group(
        &self,
        workspace_id: &str,
        name: &str,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        // Delete first, then look for users: the delete waits for any transaction
        // that has share-locked the group to name it (see `lock_groups`), and the
        // look that follows, a statement of its own, sees what that one committed.
        // Found users roll the delete back.
        let deleted =
            sqlx::query("DELETE FROM access_groups WHERE workspace_id = $1 AND name = $2")
                .bind(workspace_id)
                .bind(name)
                .execute(m.conn())
                .await?;
        if B::rows_affected(&deleted) == 0 {
            return Err(StoreError::NotFound);
        }
        let users: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM api_keys WHERE workspace_id = $1 AND deleted_at IS NULL \
             AND (' ' || resource_groups || ' ') LIKE ('% ' || $2 || ' %')",
        )
        .bind(workspace_id)
        .bind(name)
        .fetch_one(m.conn())
        .await?;
        if users > 0 {
            return Err(StoreError::Precondition(
                Refusal::new(
                    Reason::AccessGroupInUse,
                    "the access group is referenced by keys: change them first",
                )
                .with("access_group", name),
            ));
        }
        if !m.teams_naming_group(workspace_id, name).await?.is_empty() {
            return Err(StoreError::Precondition(
                Refusal::new(
                    Reason::AccessGroupInUse,
                    "the access group is referenced by a team's reach: change it first",
                )
                .with("access_group", name),
            ));
        }
        m.commit_with_audit(workspace_id, audit, now).await
    }
}
