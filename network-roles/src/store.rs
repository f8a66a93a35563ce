//! The roles' database: SQLite by default (one file; `sqlite::memory:` for throwaway runs),
//! through sqlx, with the migrations in `network-roles/migrations/` compiled in and applied at
//! start. Queries are plain SQL strings (no compile-time query macros: they would need a
//! database at build time).

use crate::error::RoleError;
use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{SqlSafeStr, SqlitePool};

/// What can go wrong opening the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or querying.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The migrations, in order.
fn migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("pva"),
            MigrationType::Simple,
            include_str!("../migrations/0001_pva.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("pva clock"),
            MigrationType::Simple,
            include_str!("../migrations/0002_pva_clock.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("flow"),
            MigrationType::Simple,
            include_str!("../migrations/0003_flow.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            4,
            Cow::Borrowed("task seq"),
            MigrationType::Simple,
            include_str!("../migrations/0004_task_seq.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            5,
            Cow::Borrowed("imsi seq"),
            MigrationType::Simple,
            include_str!("../migrations/0005_imsi_seq.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            6,
            Cow::Borrowed("owners"),
            MigrationType::Simple,
            include_str!("../migrations/0006_owners.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            7,
            Cow::Borrowed("ownership"),
            MigrationType::Simple,
            include_str!("../migrations/0007_ownership.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            8,
            Cow::Borrowed("change of SHO"),
            MigrationType::Simple,
            include_str!("../migrations/0008_change.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            9,
            Cow::Borrowed("remote instructions"),
            MigrationType::Simple,
            include_str!("../migrations/0009_instruction.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            10,
            Cow::Borrowed("renewal of initial credentials"),
            MigrationType::Simple,
            include_str!("../migrations/0010_renewal.sql").into_sql_str(),
            false,
        ),
    ])
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A database failure (logged, and answered as UNAVAILABLE without details, by
/// [`crate::error`]).
pub fn db_err(e: sqlx::Error) -> RoleError {
    RoleError::Database(e)
}

/// A random id, 32 hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut b);
    hex::encode(b)
}

/// Opens (creating if needed) the database at `url` and applies the migrations.
pub async fn open(url: &str) -> Result<SqlitePool, StoreError> {
    let options: SqliteConnectOptions = url.parse()?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options.create_if_missing(true))
        .await?;
    migrator().run(&pool).await?;
    Ok(pool)
}

/// A transaction that writes: `BEGIN IMMEDIATE` takes SQLite's write lock at once, waiting
/// (busy timeout) for another writer, so a transaction that reads before it writes never fails
/// with "database is locked" when another connection wrote in between (a deferred transaction
/// cannot upgrade its read lock then, and SQLite refuses without waiting).
pub async fn begin_write(
    db: &SqlitePool,
) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, RoleError> {
    db.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)
}

/// Wakes this process's long polls (a device's task stream, the SHO waiting for a verdict)
/// when what they wait for is written. A waiter also re-reads every [`REREAD`], for writes by
/// another process on the same database.
#[derive(Debug)]
pub struct Changes(tokio::sync::watch::Sender<u64>);

/// The re-read period of a long poll.
pub const REREAD: std::time::Duration = std::time::Duration::from_millis(250);

impl Default for Changes {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(0))
    }
}

impl Changes {
    /// Something was written: wake the waiters.
    pub fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Subscribe *before* reading, then [`ChangeWatch::wait`] after a read that found nothing:
    /// a write in between is not missed.
    pub fn watch(&self) -> ChangeWatch {
        ChangeWatch(self.0.subscribe())
    }
}

/// A subscription from [`Changes::watch`].
#[derive(Debug)]
pub struct ChangeWatch(tokio::sync::watch::Receiver<u64>);

impl ChangeWatch {
    /// Waits for a write, at most `max` (and at most [`REREAD`]).
    pub async fn wait(&mut self, max: std::time::Duration) {
        let _ = tokio::time::timeout(max.min(REREAD), self.0.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    /// Every file in `migrations/` is compiled in, in order, and applies to a new database.
    #[tokio::test]
    async fn every_migration_file_is_listed_and_applies() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<i64> = super::migrator().iter().map(|m| m.version).collect();
        let numbered: Vec<i64> = files
            .iter()
            .map(|f| f[..4].parse().unwrap_or_else(|e| panic!("{f}: {e}")))
            .collect();
        assert_eq!(listed, numbered, "{files:?}");
        super::open("sqlite::memory:")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
