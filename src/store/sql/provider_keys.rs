//! Provider keys (a workspace's own upstream API keys, sealed under a data key that a
//! KEK wraps) and the KEK bookkeeping: which records to rewrap after a KEK rotation, the
//! compare-and-swap that rewraps one, and the stored check value of each KEK version.
//!
//! Only put and delete are principal mutations (audited, in a [`Mutation`]). A rewrap
//! changes no content, only the wrapping, so it is a single compare-and-swap outside
//! any audit: a concurrent put wins.
//!
//! [`Mutation`]: super::Mutation

use crate::domain::Micros;
use crate::domain::provider_key::{Provider, ProviderKeyRecord};
use crate::store::sql::rows::{ProviderKeyRow, provider_key_columns};
use crate::store::sql::{Backend, Bind, Column, SqlStore};
use crate::store::{AuditContext, ProviderKeyStore, StoreError};

#[async_trait::async_trait]
impl<B: Backend> ProviderKeyStore for SqlStore<B>
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
    async fn put_provider_key(
        &self,
        record: &ProviderKeyRecord,
        audit: &AuditContext,
    ) -> Result<ProviderKeyRecord, StoreError> {
        let mut m = self.begin().await?;
        let row: ProviderKeyRow = sqlx::query_as(concat!(
            "INSERT INTO provider_keys (",
            provider_key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (workspace_id, provider) DO UPDATE SET \
             record_id = excluded.record_id, last_four = excluded.last_four, \
             kek_version = excluded.kek_version, wrapped_dek = excluded.wrapped_dek, \
             ciphertext = excluded.ciphertext, updated_at = excluded.updated_at \
             RETURNING ",
            provider_key_columns!()
        ))
        .bind(&record.record_id)
        .bind(&record.workspace_id)
        .bind(record.provider.as_str())
        .bind(&record.last_four)
        .bind(i64::from(record.kek_version))
        .bind(&record.wrapped_dek)
        .bind(&record.ciphertext)
        .bind(record.updated_at)
        .fetch_one(m.conn())
        .await?;
        m.commit_with_audit(&record.workspace_id, audit, record.updated_at)
            .await?;
        row.try_into()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_provider_key(
        &self,
        workspace_id: &str,
        provider: Provider,
    ) -> Result<Option<ProviderKeyRecord>, StoreError> {
        let row: Option<ProviderKeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            provider_key_columns!(),
            " FROM provider_keys WHERE workspace_id = $1 AND provider = $2"
        ))
        .bind(workspace_id)
        .bind(provider.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_provider_keys(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError> {
        let rows: Vec<ProviderKeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            provider_key_columns!(),
            " FROM provider_keys WHERE workspace_id = $1 ORDER BY provider"
        ))
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_provider_key(
        &self,
        workspace_id: &str,
        provider: Provider,
        now: Micros,
        audit: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut m = self.begin().await?;
        let deleted =
            sqlx::query("DELETE FROM provider_keys WHERE workspace_id = $1 AND provider = $2")
                .bind(workspace_id)
                .bind(provider.as_str())
                .execute(m.conn())
                .await?;
        if B::rows_affected(&deleted) == 0 {
            return Err(StoreError::NotFound);
        }
        m.commit_with_audit(workspace_id, audit, now).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn provider_keys_to_rewrap(
        &self,
        current: u32,
        limit: u32,
    ) -> Result<Vec<ProviderKeyRecord>, StoreError> {
        let rows: Vec<ProviderKeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            provider_key_columns!(),
            " FROM provider_keys WHERE kek_version <> $1 ORDER BY record_id LIMIT $2"
        ))
        .bind(i64::from(current))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn swap_wrapped_dek(
        &self,
        record_id: &str,
        expected: &[u8],
        kek_version: u32,
        wrapped_dek: &[u8],
    ) -> Result<bool, StoreError> {
        let swapped = sqlx::query(
            "UPDATE provider_keys SET kek_version = $3, wrapped_dek = $4 \
             WHERE record_id = $1 AND wrapped_dek = $2",
        )
        .bind(record_id)
        .bind(expected)
        .bind(i64::from(kek_version))
        .bind(wrapped_dek)
        .execute(&self.pool)
        .await?;
        Ok(B::rows_affected(&swapped) == 1)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn kek_versions_in_use(&self) -> Result<Vec<u32>, StoreError> {
        let versions: Vec<i64> = sqlx::query_scalar(
            "SELECT kek_version FROM provider_keys UNION \
             SELECT kek_version FROM webhook_endpoints ORDER BY kek_version",
        )
        .fetch_all(&self.pool)
        .await?;
        versions
            .into_iter()
            .map(|v| u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("kek_version {v}"))))
            .collect()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn kek_check(
        &self,
        version: u32,
        value: &[u8],
        now: Micros,
    ) -> Result<Vec<u8>, StoreError> {
        sqlx::query(
            "INSERT INTO kek_checks (version, check_value, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(i64::from(version))
        .bind(value)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let stored: Vec<u8> =
            sqlx::query_scalar("SELECT check_value FROM kek_checks WHERE version = $1")
                .bind(i64::from(version))
                .fetch_one(&self.pool)
                .await?;
        Ok(stored)
    }
}
