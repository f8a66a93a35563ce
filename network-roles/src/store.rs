//! The roles' database, through sqlx's `Any` driver so that one set of queries serves both
//! engines: SQLite by default (one file; `sqlite::memory:` for throwaway runs) and PostgreSQL
//! (`postgres://...`), where any number of a role's processes may share one database. Queries
//! are plain SQL strings with `$1`-style parameters, which both engines read (no compile-time
//! query macros: they would need a database at build time). The migrations are the same
//! versions with the same meaning in `migrations/sqlite/` and `migrations/postgres/`, compiled
//! in and applied at start.

use crate::error::RoleError;
use std::borrow::Cow;

use sqlx::SqlSafeStr;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// A role's database: a pool of connections to SQLite or PostgreSQL.
pub type Db = sqlx::AnyPool;

/// A transaction on a [`Db`].
pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// What can go wrong opening the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or querying.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A URL of neither engine.
    #[error("database URL: {0}")]
    Url(String),
}

/// The database engines a role runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One file, one writer at a time (`sqlite://PATH`, `sqlite::memory:`).
    Sqlite,
    /// A server shared by any number of processes (`postgres://...`, `postgresql://...`).
    Postgres,
}

impl Engine {
    /// The engine a database URL names.
    pub fn of(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(StoreError::Url(
                "expected sqlite://PATH, sqlite::memory: or postgres://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE"
                    .into(),
            ))
        }
    }

    /// The engine of an open database.
    pub fn of_db(db: &Db) -> Self {
        match db.connect_options().database_url.scheme() {
            "sqlite" => Self::Sqlite,
            _ => Self::Postgres,
        }
    }
}

/// The migrations of each engine: (file, description), in version order, the file in
/// `migrations/sqlite/` and in `migrations/postgres/`.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_pva.sql", "pva"),
    ("0002_pva_clock.sql", "pva clock"),
    ("0003_flow.sql", "flow"),
    ("0004_task_seq.sql", "task seq"),
    ("0005_imsi_seq.sql", "imsi seq"),
    ("0006_owners.sql", "owners"),
    ("0007_ownership.sql", "ownership"),
    ("0008_change.sql", "change of SHO"),
    ("0009_instruction.sql", "remote instructions"),
    ("0010_renewal.sql", "renewal of initial credentials"),
    ("0011_made.sql", "registration order"),
    ("0012_follow.sql", "registration followers"),
    ("0013_indexes.sql", "indexes"),
    ("0014_registering_ro.sql", "the RO of each SHO registration"),
];

/// The migrations' SQL for an engine, in order.
fn sql(engine: Engine) -> [&'static str; MIGRATIONS.len()] {
    macro_rules! files {
        ($dir:literal) => {
            [
                include_str!(concat!("../migrations/", $dir, "/0001_pva.sql")),
                include_str!(concat!("../migrations/", $dir, "/0002_pva_clock.sql")),
                include_str!(concat!("../migrations/", $dir, "/0003_flow.sql")),
                include_str!(concat!("../migrations/", $dir, "/0004_task_seq.sql")),
                include_str!(concat!("../migrations/", $dir, "/0005_imsi_seq.sql")),
                include_str!(concat!("../migrations/", $dir, "/0006_owners.sql")),
                include_str!(concat!("../migrations/", $dir, "/0007_ownership.sql")),
                include_str!(concat!("../migrations/", $dir, "/0008_change.sql")),
                include_str!(concat!("../migrations/", $dir, "/0009_instruction.sql")),
                include_str!(concat!("../migrations/", $dir, "/0010_renewal.sql")),
                include_str!(concat!("../migrations/", $dir, "/0011_made.sql")),
                include_str!(concat!("../migrations/", $dir, "/0012_follow.sql")),
                include_str!(concat!("../migrations/", $dir, "/0013_indexes.sql")),
                include_str!(concat!("../migrations/", $dir, "/0014_registering_ro.sql")),
            ]
        };
    }
    match engine {
        Engine::Sqlite => files!("sqlite"),
        Engine::Postgres => files!("postgres"),
    }
}

/// The migrations, in order.
fn migrator(engine: Engine) -> Migrator {
    let sql = sql(engine);
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .zip(sql)
            .zip(1..)
            .map(|(((_, description), sql), version)| {
                Migration::new(
                    version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
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

/// Opens the database at `url` and applies the migrations. An SQLite file is created if
/// missing (unless the URL names another `mode`); a PostgreSQL database is created if missing,
/// when the user may (`CREATE DATABASE`, through the server's `postgres` database).
pub async fn open(url: &str) -> Result<Db, StoreError> {
    sqlx::any::install_default_drivers();
    let engine = check_url(url)?;
    let pool = match engine {
        Engine::Sqlite if url.contains(":memory:") || url.contains("mode=memory") => {
            // Every new connection to `:memory:` is another database: keep exactly one.
            AnyPoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect(url)
                .await?
        }
        Engine::Sqlite => {
            let url = if url.contains("mode=") {
                url.to_string()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            // No ping before each use: an SQLite connection is a file handle that does not go
            // stale (sqlx would otherwise add a round trip to the connection's worker thread
            // to every statement run on the pool; it still pings when a connection is given
            // back, which also rolls back what a dropped call left open).
            let pool = AnyPoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .after_connect(|c, _| {
                    Box::pin(async move {
                        sqlx::raw_sql(SQLITE_SESSION).execute(c).await?;
                        Ok(())
                    })
                })
                .connect(&url)
                .await?;
            // Write-ahead logging (kept in the file): a commit is one append and one fsync
            // of the log instead of the rollback journal's two or three, and readers never
            // wait for the writer.
            sqlx::raw_sql("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
            pool
        }
        Engine::Postgres => {
            if let Some(why) = unauthenticated_database(url) {
                tracing::warn!("{why}");
            }
            // One connection first: a server that is down or refuses fails at once (a pool
            // would retry for its acquire timeout), and a missing database is created.
            use sqlx::Connection;
            let first = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::AnyConnection::connect(url))
                .await
                .map_err(|_| {
                    StoreError::Url(format!(
                        "no answer from the PostgreSQL server within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    ))
                })?;
            match first {
                Ok(c) => {
                    let _ = c.close().await;
                }
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
                    create_postgres_database(url).await?;
                }
                Err(e) => return Err(e.into()),
            }
            // A server that goes away is answered UNAVAILABLE (with a retry hint) within
            // 5 s, not after sqlx's default 30 s of reconnecting.
            AnyPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .after_connect(|c, _| {
                    Box::pin(async move {
                        sqlx::raw_sql(SESSION_LIMITS).execute(c).await?;
                        Ok(())
                    })
                })
                .connect(url)
                .await?
        }
    };
    migrator(engine).run(&pool).await?;
    Ok(pool)
}

/// Every SQLite connection of the roles: each commit is on disk before the call that made it
/// is answered (FULL: the log is synced at every commit, so a power cut loses no answered
/// write, as with PostgreSQL's default), and a connection waits up to 5 s for another
/// writer.
const SQLITE_SESSION: &str = "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000";

/// How long opening a PostgreSQL database waits for the server's first answer.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Every PostgreSQL session of the roles bounds how long it waits and how long it may hold
/// what it took: a transaction waits at most 10 s for a lock (then the call is answered
/// UNAVAILABLE with a retry hint, and its session stops waiting), a statement runs at most
/// 30 s, and a session idle inside a transaction for 30 s is ended by the server, which frees
/// its locks. So a replica that freezes while it holds [`begin_write`]'s lock (a stopped
/// process, a paused VM, a cut network) holds up the others for at most 30 s. Transactions
/// here never wait on the network (no call to another role inside one).
const SESSION_LIMITS: &str = "SET lock_timeout = '10s'; SET statement_timeout = '30s'; \
     SET idle_in_transaction_session_timeout = '30s'";

/// PostgreSQL cuts names longer than this many bytes without a word (two long names would be
/// one database).
const MAX_NAME: usize = 63;

/// The engine of a database URL, and for PostgreSQL that the database's name is not longer
/// than PostgreSQL keeps (`mcim-roles all` checks its second SHO's `NAME-sho2` too, before it
/// opens either).
pub fn check_url(url: &str) -> Result<Engine, StoreError> {
    let engine = Engine::of(url)?;
    if engine == Engine::Postgres {
        let (_, name) = postgres_parts(url)?;
        if name.len() > MAX_NAME {
            return Err(StoreError::Url(format!(
                "the database name is {} bytes; PostgreSQL keeps {MAX_NAME} (mcim-roles all adds \
                 \"-sho2\" for its second SHO)",
                name.len()
            )));
        }
    }
    Ok(engine)
}

/// `CREATE DATABASE` for the database a `postgres://` URL names, through the same server's
/// `postgres` database. Another process creating it at the same time is no failure.
async fn create_postgres_database(url: &str) -> Result<(), StoreError> {
    use sqlx::Connection;
    let (admin, name) = postgres_parts(url)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
    {
        return Err(StoreError::Url(
            "a database to create must be named with ASCII letters, digits, '_' and '-' only"
                .into(),
        ));
    }
    let mut c = sqlx::AnyConnection::connect(&admin).await?;
    let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut c)
        .await;
    let _ = c.close().await;
    match created {
        Ok(_) => Ok(()),
        // 42P04: duplicate_database; 23505: two creators raced on the catalogue.
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Why the connection a `postgres://` URL makes is not authenticated, when it is not: a
/// server on another host reached without TLS that checks the server's certificate and name
/// (`sslmode=verify-full` with `sslrootcert=` the operator's CA; libpq's and sqlx's default
/// `prefer` falls back to plain text and checks nothing, `verify-ca` does not check the name).
/// A loopback address or a Unix socket stays on the machine. The URL is read by sqlx's own
/// parser (with its environment defaults, `PGHOST` and the like), so that what is judged is
/// what sqlx will connect to. The roles say it when they open the database.
pub fn unauthenticated_database(url: &str) -> Option<String> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    if Engine::of(url).ok()? != Engine::Postgres {
        return None;
    }
    let opts: PgConnectOptions = match url.parse() {
        Ok(o) => o,
        // Opening it fails with sqlx's own error.
        Err(_) => return None,
    };
    let mode = opts.get_ssl_mode();
    if matches!(mode, PgSslMode::VerifyFull) {
        return None;
    }
    let host = opts.get_host();
    let local = opts.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let mode = match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    };
    (!local).then(|| {
        format!(
            "the connection to PostgreSQL at {host} is not authenticated (sslmode={mode}): give \
             sslmode=verify-full&sslrootcert=CA.pem (and sslcert=, sslkey= where the server \
             asks for a client certificate) in the database URL"
        )
    })
}

/// The URL of the `postgres` database on the server `url` names, and the name of the database
/// `url` names (as written: percent-encoding aside).
fn postgres_parts(url: &str) -> Result<(String, String), StoreError> {
    let bad = |why: &str| StoreError::Url(why.to_string());
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (rest, query) = rest
        .split_once('?')
        .map_or((rest, None), |(r, q)| (r, Some(q)));
    let (server, name) = rest
        .split_once('/')
        .ok_or_else(|| bad("the URL names no database (postgres://HOST/DATABASE)"))?;
    if name.is_empty() {
        return Err(bad("the URL names no database (postgres://HOST/DATABASE)"));
    }
    let admin = match query {
        Some(q) => format!("{scheme}://{server}/postgres?{q}"),
        None => format!("{scheme}://{server}/postgres"),
    };
    Ok((admin, name.to_string()))
}

/// The key of the PostgreSQL advisory lock that [`begin_write`] takes ("mcim" in ASCII).
const WRITE_LOCK: i64 = 0x6d63_696d;

/// A transaction that writes, serialised with every other such transaction on the database
/// (from this process or another), so that a transaction that reads and then writes acts on
/// what it read:
/// - SQLite: `BEGIN IMMEDIATE` takes the write lock at once, waiting (busy timeout) for
///   another writer (a deferred transaction cannot upgrade its read lock when another
///   connection wrote in between, and SQLite refuses without waiting);
/// - PostgreSQL: the transaction first takes an advisory lock held until it ends, the same
///   one-writer-at-a-time rule across every replica of every role on the database. Reads in it
///   (READ COMMITTED) see everything committed before the lock was granted.
///
/// On PostgreSQL the BEGIN is sent from a task of its own, so that a caller that goes away
/// meanwhile (tonic drops a handler's future when its gRPC caller hangs up or is killed)
/// cannot stop it between sending BEGIN and reading the answer: sqlx 0.9 then forgets the
/// BEGIN it sent and puts the connection back in the pool inside a transaction, where the
/// autocommit writes of later calls are seen by no other session until that session ends
/// (found by the netns fleet test;
/// `tests::a_transaction_dropped_while_it_begins_leaves_no_connection_inside_one`). A
/// transaction begun for a caller that went away is rolled back when the task's result is
/// dropped. The lock is taken back in the caller's task: no task hop while it is held.
/// (SQLite's worker thread keeps the transaction depth itself and rolls a dropped BEGIN
/// back.)
pub async fn begin_write(db: &Db) -> Result<Tx, RoleError> {
    match Engine::of_db(db) {
        Engine::Sqlite => db.begin_with("BEGIN IMMEDIATE").await.map_err(db_err),
        Engine::Postgres => {
            let pool = db.clone();
            // The task fails only when it is cancelled: the runtime is stopping (the process
            // ends). UNAVAILABLE, as for a database that cannot be reached: whoever asked may
            // try again (the SHO's follower must not mark a registration failed for it).
            let mut tx = tokio::spawn(async move { pool.begin().await })
                .await
                .map_err(|e| RoleError::unavailable(format!("beginning a transaction: {e}")))?
                .map_err(db_err)?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(WRITE_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            Ok(tx)
        }
    }
}

/// Wakes long polls (a device's task stream, the SHO waiting for a verdict) when what they
/// wait for is written. In this process a write wakes them at once. On PostgreSQL a write in
/// any process on the database wakes them too: [`Changes::bump`] sends `NOTIFY` on
/// [`CHANNEL`] with the topic as payload, and every process `LISTEN`s (issue 16: replicas wake
/// each other, they do not poll). A waiter also re-reads after [`REREAD`] on SQLite (another
/// process may write the same file) and after [`REREAD_NOTIFIED`] on PostgreSQL (a safety net
/// for notifications lost while a listener reconnects).
#[derive(Debug)]
pub struct Changes {
    local: tokio::sync::watch::Sender<u64>,
    /// PostgreSQL: topics to `NOTIFY` (a task sends them, coalesced).
    remote: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    reread: std::time::Duration,
}

/// The re-read period of a long poll on SQLite.
pub const REREAD: std::time::Duration = std::time::Duration::from_millis(250);

/// The re-read period of a long poll on PostgreSQL, where writes in other processes wake it.
pub const REREAD_NOTIFIED: std::time::Duration = std::time::Duration::from_secs(5);

/// The PostgreSQL notification channel of [`Changes`].
pub const CHANNEL: &str = "mcim_changes";

impl Changes {
    /// Changes of `topic` (a name such as `ro_task`) on `db`: in this process only on
    /// SQLite; on PostgreSQL in every process, which starts a listener and a notifier task
    /// (when called inside a Tokio runtime).
    pub fn new(db: &Db, topic: &'static str) -> Self {
        let local = tokio::sync::watch::Sender::new(0);
        let handle = tokio::runtime::Handle::try_current().ok();
        match (Engine::of_db(db), handle) {
            (Engine::Postgres, Some(rt)) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                rt.spawn(notify(db.clone(), topic, rx));
                rt.spawn(listen(
                    db.connect_options().database_url.to_string(),
                    topic,
                    local.clone(),
                ));
                Self {
                    local,
                    remote: Some(tx),
                    reread: REREAD_NOTIFIED,
                }
            }
            _ => Self {
                local,
                remote: None,
                reread: REREAD,
            },
        }
    }

    /// Something was written (and committed): wake the waiters, here and elsewhere.
    pub fn bump(&self) {
        self.local.send_modify(|n| *n = n.wrapping_add(1));
        if let Some(remote) = &self.remote {
            let _ = remote.send(());
        }
    }

    /// Subscribe *before* reading, then [`ChangeWatch::wait`] after a read that found nothing:
    /// a write in between is not missed.
    pub fn watch(&self) -> ChangeWatch {
        ChangeWatch {
            rx: self.local.subscribe(),
            reread: self.reread,
        }
    }
}

/// Sends one `NOTIFY` per burst of [`Changes::bump`]s, until the [`Changes`] is dropped.
async fn notify(db: Db, topic: &'static str, mut rx: tokio::sync::mpsc::UnboundedReceiver<()>) {
    while rx.recv().await.is_some() {
        while rx.try_recv().is_ok() {}
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(topic)
            .execute(&db)
            .await;
        if let Err(e) = sent {
            // Waiters elsewhere still re-read within REREAD_NOTIFIED.
            tracing::warn!(topic, "NOTIFY failed: {e}");
        }
    }
}

/// `LISTEN`s on [`CHANNEL`] and wakes this process's waiters on `topic`; reconnects when the
/// connection is lost (waking the waiters then: a notification may have been missed).
async fn listen(url: String, topic: &'static str, local: tokio::sync::watch::Sender<u64>) {
    let wake = || local.send_modify(|n| *n = n.wrapping_add(1));
    loop {
        // The Changes is gone (only this task's sender is left, and no waiter).
        if local.sender_count() == 1 && local.is_closed() {
            return;
        }
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut l) => {
                if let Err(e) = l.listen(CHANNEL).await {
                    tracing::warn!(topic, "LISTEN failed: {e}");
                } else {
                    wake();
                    loop {
                        match l.try_recv().await {
                            Ok(Some(n)) if n.payload() == topic => wake(),
                            Ok(Some(_)) => {}
                            // Reconnected: something may have been missed.
                            Ok(None) => wake(),
                            Err(e) => {
                                tracing::warn!(topic, "LISTEN connection: {e}");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(topic, "LISTEN connection: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// A subscription from [`Changes::watch`].
#[derive(Debug)]
pub struct ChangeWatch {
    rx: tokio::sync::watch::Receiver<u64>,
    reread: std::time::Duration,
}

impl ChangeWatch {
    /// Waits for a write, at most `max` (and at most the re-read period). True when a write
    /// woke it, false when the time ran out.
    pub async fn wait(&mut self, max: std::time::Duration) -> bool {
        matches!(
            tokio::time::timeout(max.min(self.reread), self.rx.changed()).await,
            Ok(Ok(()))
        )
    }
}

/// The databases a unit test runs on: SQLite in memory, and a fresh PostgreSQL database when
/// `MCIM_TEST_POSTGRES` names a server (`ci/test.sh` starts one).
#[cfg(test)]
pub(crate) fn test_urls() -> Vec<String> {
    let mut urls = vec!["sqlite::memory:".to_string()];
    if let Some(server) = std::env::var("MCIM_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty())
    {
        urls.push(format!(
            "{}/mcim_unit_{}",
            server.trim_end_matches('/'),
            new_id()
        ));
    }
    urls
}

#[cfg(test)]
mod tests {

    /// A server elsewhere without verified TLS is named; verified TLS, loopback and Unix
    /// sockets are not; SQLite is never.
    #[test]
    fn an_unauthenticated_database_connection_is_named() {
        for url in [
            "postgres://u@db.example:5432/x",
            "postgres://u:pw@10.0.0.5/x?sslmode=require",
            "postgresql://u@[2001:db8::1]:5432/x?sslmode=prefer",
            "postgres://u@127.0.0.1/x?host=db.example",
            // What the outside attack found the first reading let through: the last of two
            // values counts, hostaddr is the address, a fragment is no query, keys are
            // case-sensitive, verify-ca checks no name.
            "postgres://u@db.example/x?sslmode=verify-full&sslmode=disable",
            "postgres://u@db.example/x?ssl-mode=verify-full&sslmode=disable",
            "postgres://u@localhost/x?hostaddr=192.0.2.2&sslmode=disable",
            "postgres://u@db.example/x?host=localhost&host=192.0.2.2",
            "postgres://u@192.0.2.2/x?sslmode=disable#&host=localhost",
            "postgres://u@db.example/x?SSLMODE=verify-full",
            "postgres://u@db.example/x?sslmode=verify-ca&sslrootcert=/ca.pem",
        ] {
            let why = super::unauthenticated_database(url).unwrap_or_default();
            assert!(why.contains("not authenticated"), "{url}: {why:?}");
            assert!(!why.contains("pw"), "{url}: the password leaked: {why}");
        }
        for url in [
            "postgres://u@db.example/x?sslmode=verify-full&sslrootcert=/ca.pem",
            "postgres://u@db.example/x?sslmode=disable&sslmode=verify-full",
            "postgres://u@127.0.0.1:5432/x",
            "postgres://u@localhost/x?sslmode=disable",
            "postgres://u@[::1]:5432/x",
            "postgres:///x?host=/var/run/postgresql",
            "sqlite:///tmp/x.db",
        ] {
            assert_eq!(super::unauthenticated_database(url), None, "{url}");
        }
    }
    /// Every file in each engine's `migrations/` directory is compiled in, in order, the same
    /// files for both engines, and they apply to a new database (SQLite; PostgreSQL too with
    /// `MCIM_TEST_POSTGRES`), and once more to the same one.
    #[tokio::test]
    async fn every_migration_file_is_listed_and_applies() {
        let listed: Vec<&str> = super::MIGRATIONS.iter().map(|(f, _)| *f).collect();
        for engine in ["sqlite", "postgres"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(engine);
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{e}"))
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".sql"))
                .collect();
            files.sort();
            assert_eq!(listed, files, "{engine}");
        }
        for (i, (file, _)) in super::MIGRATIONS.iter().enumerate() {
            let n: usize = file[..4].parse().unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(n, i + 1, "{file}");
        }
        for url in super::test_urls() {
            let db = super::open(&url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            // Again on the same database: nothing left to apply, nothing refused.
            if !url.contains(":memory:") {
                db.close().await;
                super::open(&url)
                    .await
                    .unwrap_or_else(|e| panic!("{url} again: {e}"));
            }
        }
    }

    /// A write wakes the waiters of its topic: in this process on every engine, and on
    /// PostgreSQL in another process on the database too (here: another pool), by NOTIFY,
    /// before the re-read period; another topic wakes no one.
    #[tokio::test]
    async fn a_write_wakes_its_waiters_here_and_on_postgresql_elsewhere() {
        use std::time::Duration;
        for url in super::test_urls() {
            let a = super::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
            let here = super::Changes::new(&a, "t");
            let mut w = here.watch();
            here.bump();
            assert!(
                w.wait(Duration::from_secs(30)).await,
                "{url}: in this process"
            );
            if super::Engine::of_db(&a) == super::Engine::Sqlite {
                continue;
            }
            // The listener wakes its waiters once it listens.
            let mut listening = false;
            for _ in 0..6 {
                let mut w = here.watch();
                if w.wait(Duration::from_secs(30)).await {
                    listening = true;
                    break;
                }
            }
            assert!(listening, "{url}: the listener never listened");
            let b = super::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
            let there = super::Changes::new(&b, "t");
            let other = super::Changes::new(&b, "other");
            let mut w = here.watch();
            other.bump();
            assert!(
                !w.wait(Duration::from_millis(1500)).await,
                "{url}: another topic woke the waiter"
            );
            let mut w = here.watch();
            there.bump();
            assert!(
                w.wait(Duration::from_secs(30)).await,
                "{url}: not woken by the other process's write within the re-read period"
            );
        }
    }

    /// Every PostgreSQL session of the roles bounds its lock waits, statements and idle
    /// transactions (a frozen replica cannot hold the write lock for long).
    #[tokio::test]
    async fn postgresql_sessions_bound_lock_waits_and_idle_transactions() {
        for url in super::test_urls() {
            let db = super::open(&url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            if super::Engine::of_db(&db) != super::Engine::Postgres {
                continue;
            }
            for (setting, want) in [
                ("lock_timeout", "10s"),
                ("statement_timeout", "30s"),
                ("idle_in_transaction_session_timeout", "30s"),
            ] {
                let (got,): (String,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT current_setting('{setting}')"
                )))
                .fetch_one(&db)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got, want, "{setting}");
            }
        }
    }

    /// A write transaction whose caller goes away while it begins (a gRPC caller that hangs
    /// up, a peer replica killed mid-call: tonic drops the handler's future) leaves no pooled
    /// connection inside a transaction. Found by the netns fleet test: sqlx 0.9 sends BEGIN
    /// to PostgreSQL and, dropped while it waits for the answer, forgets it did; the
    /// connection went back to the pool inside a transaction, and the autocommit writes of
    /// later calls on it were seen by nobody else (an attach attempt, a grant, a report
    /// "lost") until the session ended. Checked from outside, by another session: on
    /// PostgreSQL the server's own view of its sessions after each drop, on both engines a
    /// write on every pooled connection read back. (SQLite on a file: another session.)
    #[tokio::test]
    async fn a_transaction_dropped_while_it_begins_leaves_no_connection_inside_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for url in super::test_urls() {
            let url = if url.starts_with("sqlite") {
                format!("sqlite://{}", dir.path().join("dropped.db").display())
            } else {
                url
            };
            let db = super::open(&url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let other = super::open(&url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let postgres = super::Engine::of_db(&db) == super::Engine::Postgres;
            sqlx::query("CREATE TABLE t_seen (n BIGINT NOT NULL)")
                .execute(&db)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let in_transaction = || async {
                if !postgres {
                    return 0;
                }
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND state LIKE 'idle in transaction%'",
                )
                .fetch_one(&other)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                n
            };
            // Dropped at every point from before the BEGIN is sent to after it is answered
            // (after its first, second, ... wait: where a future can be dropped), each looked
            // at before another transaction could use (and so mend) the connection.
            let (mut dropped, mut left_open) = (0, 0);
            for i in 0..240usize {
                let mut begin = Box::pin(super::begin_write(&db));
                let mut waits = 0;
                let done = std::future::poll_fn(|cx| match begin.as_mut().poll(cx) {
                    std::task::Poll::Ready(_) => std::task::Poll::Ready(true),
                    std::task::Poll::Pending => {
                        waits += 1;
                        if waits > i % 12 {
                            std::task::Poll::Ready(false)
                        } else {
                            std::task::Poll::Pending
                        }
                    }
                })
                .await;
                drop(begin);
                if !done {
                    dropped += 1;
                    // A returned connection is checked (and a dropped transaction rolled
                    // back) by a task of sqlx's pool.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    left_open += in_transaction().await;
                }
            }
            assert!(
                dropped > 0,
                "{url}: no transaction was dropped while it began"
            );
            assert_eq!(
                left_open, 0,
                "{url}: pooled connections left inside a transaction ({dropped} dropped)"
            );
            // Every connection of the pool at once, each writing one row by itself.
            let size = usize::try_from(db.size()).unwrap_or(1);
            let mut held = Vec::new();
            for _ in 0..size {
                held.push(db.acquire().await.unwrap_or_else(|e| panic!("{e}")));
            }
            for (n, c) in held.iter_mut().enumerate() {
                sqlx::query("INSERT INTO t_seen (n) VALUES ($1)")
                    .bind(i64::try_from(n).unwrap_or(0))
                    .execute(&mut **c)
                    .await
                    .unwrap_or_else(|e| panic!("{url}: {e}"));
            }
            let (seen,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t_seen")
                .fetch_one(&other)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                seen,
                i64::try_from(size).unwrap_or(0),
                "{url}: writes another session does not see"
            );
        }
    }

    /// A database to create is named from the URL, on the same server, with its options.
    #[test]
    fn the_database_to_create_comes_from_the_url() {
        let (admin, name) =
            super::postgres_parts("postgres://u:p@127.0.0.1:5433/mcim-roles?sslmode=disable")
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            admin,
            "postgres://u:p@127.0.0.1:5433/postgres?sslmode=disable"
        );
        assert_eq!(name, "mcim-roles");
        for bad in ["postgres://h", "postgres://h/"] {
            assert!(super::postgres_parts(bad).is_err(), "{bad}");
        }
        // PostgreSQL would cut a longer name: two names would be one database.
        let long = format!("postgres://h/{}", "n".repeat(64));
        assert!(super::check_url(&long).is_err());
        assert!(super::check_url(&long[..long.len() - 1]).is_ok());
        assert!(super::Engine::of("mysql://h/d").is_err());
        assert_eq!(
            super::Engine::of("postgresql://h/d").ok(),
            Some(super::Engine::Postgres)
        );
        assert_eq!(
            super::Engine::of("sqlite::memory:").ok(),
            Some(super::Engine::Sqlite)
        );
    }
}
