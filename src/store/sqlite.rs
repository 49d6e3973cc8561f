//! The embedded store, [`SqlStore`] over bundled SQLite: WAL mode for concurrent readers, and every write
//! transaction begins `IMMEDIATE`, so writers queue on SQLite's lock (with a busy timeout)
//! instead of failing when a read transaction tries to upgrade.
//!
//! A database file this store creates is owner-only (0600): it holds key hashes, the
//! audit log and wrapped provider keys. SQLite would create it with 0644 less the umask,
//! so the store creates it first; SQLite then gives the write-ahead log (`-wal`) and its
//! index (`-shm`) the database file's mode, whatever the umask. An existing file keeps
//! the mode it has (dev mode tightens its own, see `main.rs`).

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, SqlStr, Sqlite};

use super::StoreError;
use super::sql::{Backend, JsonColumn, SqlStore, epoch_spend};

pub type SqliteStore = SqlStore<Sqlite>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl SqliteStore {
    /// Opens (creating it if missing) the database file and runs the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Internal)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        if !in_memory(url) {
            create_owner_only(options.get_filename())?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            // A file in this process has no far end to lose; sqlx's default ping before
            // every acquire would only be a round trip to the connection's worker thread.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore::new(pool))
    }
}

/// Whether the URL names a database in memory, as sqlx reads it: `sqlite::memory:`, or
/// `mode=memory` among the parameters. (sqlx's own options do not say, and their URL
/// form cannot be built for `sqlite::memory:`.)
fn in_memory(url: &str) -> bool {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    database == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}

/// Creates the database file, empty and owner-only, if it does not exist yet (SQLite
/// takes an empty file for an empty database).
fn create_owner_only(path: &std::path::Path) -> Result<(), StoreError> {
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    match file.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Internal(sqlx::Error::Io(std::io::Error::new(
            e.kind(),
            format!("cannot create {}: {e}", path.display()),
        )))),
    }
}

/// A write transaction holds SQLite's write lock from its first statement, so the lock
/// suffixes are empty: nothing else writes until it commits.
impl Backend for Sqlite {
    const BEGIN_WRITE: Option<&'static str> = Some("BEGIN IMMEDIATE");

    const NOTIFY: Option<&'static str> = None;

    const POSITION_FN: &'static str = "instr";

    const RECORD_USAGE: &'static str = concat!(
        "UPDATE api_keys SET ",
        epoch_spend!("api_keys"),
        ", last_used_at = CASE WHEN d.has_use = 1 AND (api_keys.last_used_at IS NULL \
         OR api_keys.last_used_at < d.used) THEN d.used ELSE api_keys.last_used_at END \
         FROM (SELECT json_extract(value, '$[0]') AS key_id, json_extract(value, '$[1]') AS spend, \
         json_extract(value, '$[2]') AS used, json_extract(value, '$[3]') AS has_use, \
         json_extract(value, '$[4]') AS epoch FROM json_each($1)) AS d \
         WHERE api_keys.key_id = d.key_id \
         RETURNING api_keys.key_id, api_keys.spent_micros, api_keys.spend_epoch"
    );

    fn json_rows(columns: &[(&str, JsonColumn)]) -> String {
        let list: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, (name, _))| format!("json_extract(value, '$[{i}]') AS {name}"))
            .collect();
        format!("SELECT {} FROM json_each($1)", list.join(", "))
    }

    fn for_update(sql: &'static str) -> SqlStr {
        SqlStr::from_static(sql)
    }

    fn for_share(sql: &'static str) -> SqlStr {
        SqlStr::from_static(sql)
    }

    fn rows_affected(result: &Self::QueryResult) -> u64 {
        result.rows_affected()
    }

    fn postgres_pool(_: &Pool<Self>) -> Option<&sqlx::PgPool> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_file_is_created_owner_only_and_an_existing_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keywarden.db");
        create_owner_only(&file).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&file, b"kept").unwrap();
        create_owner_only(&file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"kept");
    }

    #[test]
    fn databases_in_memory_are_told_from_files() {
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://data/k.db?mode=memory",
            "sqlite:k.db?cache=shared&mode=memory",
        ] {
            assert!(in_memory(url), "{url}");
        }
        for url in [
            "sqlite://data/keywarden.db",
            "sqlite:keywarden.db?mode=rwc",
            "sqlite:///var/lib/keywarden/memory.db",
        ] {
            assert!(!in_memory(url), "{url}");
        }
    }
}
