//! backfilld's own schema: versioned, idempotent migrations applied by `backfilld migrate`.

use crate::db::Db;

use crate::sql::{Names, quote_ident};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i32,
        name: &'static str,
        source: sqlx::Error,
    },
    #[error("{step} schema {schema}: {source}")]
    Database {
        /// "migrating" or "checking".
        step: &'static str,
        schema: String,
        source: sqlx::Error,
    },
    #[error(
        "schema {schema} is at version {found}, newer than this backfilld knows ({known}); upgrade backfilld"
    )]
    TooNew {
        schema: String,
        found: i32,
        known: i32,
    },
    #[error("schema {schema} is at version {found}, expected {known}: run `backfilld migrate`")]
    Outdated {
        schema: String,
        found: i32,
        known: i32,
    },
}

pub type Result<T> = std::result::Result<T, SchemaError>;

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Append-only: a released migration is never edited, only followed by a new one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "jobs",
        sql: include_str!("schema/0001_jobs.sql"),
    },
    Migration {
        version: 2,
        name: "slices",
        sql: include_str!("schema/0002_slices.sql"),
    },
    Migration {
        version: 3,
        name: "gentle",
        sql: include_str!("schema/0003_gentle.sql"),
    },
    Migration {
        version: 4,
        name: "checklist",
        sql: include_str!("schema/0004_checklist.sql"),
    },
    Migration {
        version: 5,
        name: "wakeups",
        sql: include_str!("schema/0005_wakeups.sql"),
    },
    Migration {
        version: 6,
        name: "started_at_checked",
        sql: include_str!("schema/0006_started_at_checked.sql"),
    },
    Migration {
        version: 7,
        name: "started_at_while_checking",
        sql: include_str!("schema/0007_started_at_while_checking.sql"),
    },
];

pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies every migration not yet in the ledger, in one transaction under an advisory lock, so
/// running it twice is a no-op and two replicas running it at once apply each migration once.
pub async fn migrate(pool: &Db, names: &Names) -> Result<Vec<i32>> {
    let db = |source| SchemaError::Database {
        step: "migrating",
        schema: names.schema.clone(),
        source,
    };
    let mut tx = pool.begin().await.map_err(db)?;
    crate::sql::query("SELECT pg_advisory_xact_lock(hashtext('backfilld.migrate.' || $1))")
        .bind(&names.schema)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    // Only when missing: `CREATE SCHEMA IF NOT EXISTS` needs CREATE on the database even when
    // the schema exists, which the recommended set-up (a schema created for the role) omits.
    let exists: bool =
        crate::sql::query_scalar("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)")
            .bind(&names.schema)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    if !exists {
        sqlx::raw_sql(&names.render("CREATE SCHEMA {schema}"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    sqlx::raw_sql(&names.render(
        "CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    ))
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let current = current_version(&mut tx, names).await.map_err(db)?;
    if current > latest_version() {
        return Err(too_new(names, current));
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        apply(&mut tx, names, m).await?;
        applied.push(m.version);
    }
    tx.commit().await.map_err(db)?;
    Ok(applied)
}

async fn apply(tx: &mut sqlx::PgConnection, names: &Names, m: &Migration) -> Result<()> {
    let err = |source| SchemaError::Migration {
        version: m.version,
        name: m.name,
        source,
    };
    sqlx::raw_sql(&names.render(m.sql))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    let ledger = format!(
        "INSERT INTO {}.schema_migrations (version, name) VALUES ($1, $2)",
        quote_ident(&names.schema)
    );
    crate::sql::query(&ledger)
        .bind(m.version)
        .bind(m.name)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    tracing::info!(version = m.version, name = m.name, schema = %names.schema, "applied migration");
    Ok(())
}

async fn current_version(conn: &mut sqlx::PgConnection, names: &Names) -> sqlx::Result<i32> {
    let sql = format!(
        "SELECT coalesce(max(version), 0) FROM {}.schema_migrations",
        quote_ident(&names.schema)
    );
    crate::sql::query_scalar(&sql).fetch_one(conn).await
}

fn too_new(names: &Names, found: i32) -> SchemaError {
    SchemaError::TooNew {
        schema: names.schema.clone(),
        found,
        known: latest_version(),
    }
}

/// Refuses to run the daemon against a schema that is missing, older or newer than this build.
pub async fn check(pool: &Db, names: &Names) -> Result<()> {
    let db = |source| SchemaError::Database {
        step: "checking",
        schema: names.schema.clone(),
        source,
    };
    let exists: bool = crate::sql::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{}.schema_migrations", quote_ident(&names.schema)))
        .fetch_one(pool)
        .await
        .map_err(db)?;
    let found = if exists {
        let mut conn = pool.acquire().await.map_err(db)?;
        let found = current_version(&mut conn, names).await.map_err(db)?;
        conn.finish().await.map_err(db)?;
        found
    } else {
        0
    };
    match found.cmp(&latest_version()) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(too_new(names, found)),
        std::cmp::Ordering::Less => Err(SchemaError::Outdated {
            schema: names.schema.clone(),
            found,
            known: latest_version(),
        }),
    }
}
