//! `mcim-lab-compromised-ro --db ROLES.db --package FILE`: makes a lab's Registration Operator
//! misbehave the way an attacker in control of its database would (`mcimctl lab run
//! --dpf-serves ...`). A trigger swaps the package the SHO authorises (TR 33.812 5.1.3.6.2
//! step 11) for the genuine, SHO-signed package in FILE that is not this device's for this
//! registration; the device must refuse it at step 13 and install nothing.
//!
//! Test support, not a tool for operators: it lives beside the roles' other test support
//! (this crate) so that the command line links neither the roles nor their database.

use std::path::PathBuf;
use std::process::ExitCode;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

fn args() -> Result<(PathBuf, PathBuf), String> {
    let mut db = None;
    let mut package = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--db" => db = it.next().map(PathBuf::from),
            "--package" => package = it.next().map(PathBuf::from),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((
        db.ok_or("--db ROLES.db is required")?,
        package.ok_or("--package FILE is required")?,
    ))
}

async fn install(db: PathBuf, forged: Vec<u8>) -> Result<(), String> {
    let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&db))
        .await
        .map_err(|e| format!("{}: {e}", db.display()))?;
    // The package is bytes we read, hex-encoded into a blob literal.
    let sql = format!(
        "CREATE TRIGGER lab_compromised_dpf AFTER UPDATE OF package ON ro_registration \
         WHEN NEW.package IS NOT NULL \
         BEGIN UPDATE ro_registration SET package = X'{}' WHERE id = NEW.id; END",
        forged
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .map_err(|e| e.to_string())?;
    pool.close().await;
    Ok(())
}

fn main() -> ExitCode {
    let run = || -> Result<(), String> {
        let (db, package) = args()?;
        let forged = std::fs::read(&package).map_err(|e| format!("{}: {e}", package.display()))?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(install(db, forged))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcim-lab-compromised-ro: {e}");
            ExitCode::from(2)
        }
    }
}
