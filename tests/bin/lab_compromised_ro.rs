//! `mcim-lab-compromised-ro --db URL --package FILE` (or `MCIM_DB=URL`): makes a lab's Registration Operator
//! misbehave the way an attacker in control of its database would (`mcimctl lab run
//! --dpf-serves ...`). A trigger swaps the package the SHO authorises (TR 33.812 5.1.3.6.2
//! step 11) for the genuine, SHO-signed package in FILE that is not this device's for this
//! registration; the device must refuse it at step 13 and install nothing.
//!
//! Test support, not a tool for operators: it lives beside the roles' other test support
//! (this crate) so that the command line links neither the roles nor their database.

use std::path::PathBuf;
use std::process::ExitCode;

use sqlx::Connection;

fn args() -> Result<(String, PathBuf), String> {
    let mut db = None;
    let mut package = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--db" => db = it.next(),
            "--package" => package = it.next().map(PathBuf::from),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((
        db.or_else(|| std::env::var("MCIM_DB").ok())
            .ok_or("--db URL or MCIM_DB (sqlite://... or postgres://...) is required")?,
        package.ok_or("--package FILE is required")?,
    ))
}

async fn install(db: String, forged: Vec<u8>) -> Result<(), String> {
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&db)
        .await
        .map_err(|e| format!("{db}: {e}"))?;
    // The package is bytes we read, hex-encoded into a literal.
    let hex: String = forged.iter().map(|b| format!("{b:02x}")).collect();
    let sql = if db.starts_with("sqlite:") {
        format!(
            "CREATE TRIGGER lab_compromised_dpf AFTER UPDATE OF package ON ro_registration \
             WHEN NEW.package IS NOT NULL \
             BEGIN UPDATE ro_registration SET package = X'{hex}' WHERE id = NEW.id; END"
        )
    } else {
        format!(
            "CREATE FUNCTION lab_compromised_dpf() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.package IS NOT NULL THEN NEW.package := '\\x{hex}'::bytea; END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER lab_compromised_dpf BEFORE UPDATE OF package ON ro_registration \
             FOR EACH ROW EXECUTE FUNCTION lab_compromised_dpf();"
        )
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    let _ = c.close().await;
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
