//! Reading the usage history (`UsageService.QueryUsage`): a workspace's rows of one
//! granularity over a bounded span, grouped as asked, a page at a time. A self-service
//! member reads only the keys it owns; an admin reads the whole workspace.

use std::sync::Arc;

use crate::domain::Micros;
use crate::domain::actor::Actor;
use crate::domain::rollup::{Granularity, GroupBy};
use crate::store::{Store, StoreError, UsageQuery, UsageRow, split_page};

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("workspace {0} does not exist")]
    WorkspaceNotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a caller asks for, checked by the API (`domain::rollup::check_span` included).
#[derive(Clone, Debug)]
pub struct UsageRequest {
    pub workspace_id: String,
    pub group_by: GroupBy,
    pub granularity: Granularity,
    pub since: Micros,
    pub until: Micros,
    pub page_size: u32,
    pub after: Option<(Micros, String)>,
}

pub struct UsageReports {
    store: Arc<dyn Store>,
}

impl UsageReports {
    pub fn new(store: Arc<dyn Store>) -> Self {
        UsageReports { store }
    }

    /// One page of rows and the cursor of the next page, if any.
    pub async fn query(
        &self,
        actor: &Actor,
        request: UsageRequest,
    ) -> Result<(Vec<UsageRow>, Option<(Micros, String)>), UsageError> {
        let query = UsageQuery {
            workspace_id: request.workspace_id,
            group_by: request.group_by,
            granularity: request.granularity,
            // Whole buckets: the one `since` falls in, up to the one `until` ends.
            since: request.granularity.bucket(request.since),
            until: request.until,
            owner: actor.is_self_service().then(|| actor.as_owner()),
            after: request.after,
            // One row more than asked tells whether there is a next page.
            limit: request.page_size + 1,
        };
        let rows = self.store.query_usage(&query).await?;
        if rows.is_empty() && !self.store.workspace_exists(&query.workspace_id).await? {
            return Err(UsageError::WorkspaceNotFound(query.workspace_id));
        }
        Ok(split_page(rows, request.page_size, |r| {
            (r.bucket_start, r.group.clone())
        }))
    }
}
