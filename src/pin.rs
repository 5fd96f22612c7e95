//! What a job pins when it plans, and checks before each later attempt and in every batch's
//! checkpoint: the tables its statements name (by oid), the walked table's key columns (number,
//! sort family, collation), and whether row-level security hides rows from the daemon's role.
//!
//! Statements name tables and columns by name, and PostgreSQL analyses a prepared statement
//! again after DDL, so without these checks a job followed silently: a table swapped under its
//! name (from the old table's cursor, into its archive), a key retyped or re-collated (the
//! frozen bound and cursor, stored as text, then sort elsewhere: rows skipped or changed twice),
//! an inheritance child attached (its rows changed too), or policies that hide rows (skipped,
//! and uncounted by the verification). Each is a `JobError` naming what changed; the batch that
//! found it rolls back.

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::error::JobError;
use crate::target::Target;

/// The state a job planned under, stored in the plan as `pinned`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Pinned {
    /// The tables the statements name (quoted) with their oids: the target, and an insert's
    /// table.
    pub tables: Vec<(String, u32)>,
    /// The walked table's key columns as the walk sorts them (`key_identity!`); empty for a
    /// revert, which walks its archive.
    pub keys: Vec<String>,
    /// Row-level security hid rows of the written table from the daemon's role.
    pub row_security: bool,
    /// Where a check looks (not stored: a later attempt finds them anew).
    #[serde(skip)]
    pub sites: Sites,
}

/// Where the pinned things are: the walked table's key names and oid (none for a revert), and
/// the written table's oid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sites {
    pub key_names: Vec<String>,
    pub keyed: Option<u32>,
    pub written: u32,
    /// The key columns' raw fingerprint (`key_fingerprint!`) when pinned: a checkpoint reads
    /// only that, and the full `key_identity!` when it differs.
    pub fingerprint: Vec<String>,
}

/// What the pinned things are now: the oids the names resolve to (0: none), the key columns,
/// row-level security, and whether a plain pinned table has inheritance children.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Found {
    pub oids: Vec<i64>,
    /// `key_fingerprint!`: column number, type and collation oids.
    pub fingerprint: Vec<String>,
    pub row_security: bool,
    pub inherited: bool,
}

/// A pinned thing that is not as the job planned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    Replaced {
        name: String,
        planned: u32,
        now: String,
    },
    Key {
        was: String,
        now: String,
    },
    RowSecurity,
    Inherited,
}

/// The key names `$names` (`k.name`, in order `k.i`) with their columns of table `$oid` (`a`,
/// NULL for a name the table no longer has): the rows both key expressions read.
macro_rules! key_columns {
    ($names:literal, $oid:literal) => {
        concat!(
            "unnest(",
            $names,
            "::text[]) WITH ORDINALITY AS k(name, i)
      LEFT JOIN pg_attribute a ON a.attrelid = ",
            $oid,
            "::int8::oid AND a.attname = k.name
                              AND a.attnum > 0 AND NOT a.attisdropped"
        )
    };
}

/// One text per key column of a table, as the walk sorts it: its name, number, sort family (the
/// integer types sort and print alike, so `int` to `bigint` is no change; so do `text` and
/// `varchar`) and collation. Arguments: the placeholders of the key names and the table's oid.
macro_rules! key_identity {
    ($names:literal, $oid:literal) => {
        concat!(
            "ARRAY(SELECT CASE WHEN a.attnum IS NULL THEN k.name || ': gone (dropped or renamed)'
                          ELSE format('%s: column %s, %s%s', a.attname, a.attnum,
                          CASE WHEN t.typname IN ('int2', 'int4', 'int8') THEN 'an integer'
                               WHEN t.typname IN ('text', 'varchar') THEN 'text'
                               ELSE format_type(a.atttypid, NULL) END,
                          CASE WHEN a.attcollation = 0 THEN '' ELSE (
                            -- What the collation sorts by, not its name: the database's default
                            -- named explicitly, or C for C.UTF-8 (both code point order), is no
                            -- change. Read through to_jsonb: the columns differ by version.
                            SELECT ' sorted by '
                                   || CASE WHEN l.provider = 'libc'
                                                AND l.locale IN ('c', 'posix', 'c.utf8')
                                           THEN 'code point' ELSE l.provider || ' ' || l.locale END
                                   || l.extra
                            FROM (SELECT 1 AS o,
                                         CASE c ->> 'collprovider' WHEN 'i' THEN 'icu'
                                              ELSE 'libc' END AS provider,
                                         lower(replace(coalesce(c ->> 'colliculocale',
                                               c ->> 'colllocale', c ->> 'collcollate'), '-', ''))
                                           AS locale,
                                         CASE WHEN (c ->> 'collisdeterministic')::bool THEN ''
                                              ELSE ' (nondeterministic)' END AS extra
                                  FROM (SELECT to_jsonb(co) AS c) x
                                  WHERE c ->> 'collprovider' <> 'd'
                                  UNION ALL
                                  SELECT 2, CASE d ->> 'datlocprovider' WHEN 'i' THEN 'icu'
                                                 ELSE 'libc' END,
                                         lower(replace(coalesce(d ->> 'daticulocale',
                                               d ->> 'datlocale', d ->> 'datcollate'), '-', '')),
                                         ''
                                  FROM (SELECT to_jsonb(db) AS d FROM pg_database db
                                        WHERE db.datname = current_database()) y
                                  ORDER BY 1 LIMIT 1) l) END) END
      FROM ",
            key_columns!($names, $oid),
            "
      LEFT JOIN pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_collation co ON co.oid = a.attcollation
      ORDER BY k.i)"
        )
    };
}

/// One text per key column: its number, type and collation as oids. Cheap enough for every
/// checkpoint; when it differs from the pinned one, `key_identity!` says whether the walk's
/// order changed (`int` to `bigint` does not).
macro_rules! key_fingerprint {
    ($names:literal, $oid:literal) => {
        concat!(
            "ARRAY(SELECT coalesce(concat_ws(':', a.attnum, a.atttypid, a.attcollation), '')
      FROM ",
            $crate::pin::key_columns!($names, $oid),
            "
      ORDER BY k.i)"
        )
    };
}

/// The `Found` columns, for a `SELECT` or a `RETURNING`: `$names` the pinned tables' names,
/// `$keys` the key names, `$keyed` the walked table's oid (NULL: no key check), `$written` the
/// written table's oid.
macro_rules! found_sql {
    ($names:literal, $keys:literal, $keyed:literal, $written:literal) => {
        concat!(
            "ARRAY(SELECT coalesce(to_regclass(n)::oid::int8, 0)
             FROM unnest(",
            $names,
            "::text[]) WITH ORDINALITY AS u(n, i) ORDER BY i) AS oids,
  ",
            $crate::pin::key_fingerprint!($keys, $keyed),
            " AS fingerprint,
  coalesce(row_security_active(",
            $written,
            "::int8::oid), false) AS row_security,
  EXISTS (SELECT FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhparent
          WHERE c.relkind = 'r'
            AND h.inhparent = ANY (ARRAY(SELECT to_regclass(n)::oid FROM unnest(",
            $names,
            "::text[]) n))) AS inherited"
        )
    };
}
pub(crate) use {found_sql, key_columns, key_fingerprint};

impl Pinned {
    /// The pins of a job on `target` (an insert's source) and `into` (the table an insert
    /// writes), with the key names its walk uses when it walks `target` (`None` for a revert,
    /// which walks its archive), as they are now.
    pub async fn of_job(
        conn: &mut PgConnection,
        target: &Target,
        into: Option<&Target>,
        walked_keys: Option<Vec<String>>,
    ) -> sqlx::Result<Self> {
        let tables = std::iter::once(target).chain(into);
        let tables = tables.map(|t| (t.quoted.clone(), t.oid)).collect();
        let sites = Sites {
            keyed: walked_keys.is_some().then_some(target.oid),
            key_names: walked_keys.unwrap_or_default(),
            written: into.unwrap_or(target).oid,
            fingerprint: Vec::new(),
        };
        Self::now(conn, tables, sites).await
    }

    /// The pins stored in a job's `plan` (none in an older plan, or none at all).
    pub fn stored(plan: Option<&serde_json::Value>) -> Self {
        let stored = plan.and_then(|p| p.get("pinned")).cloned();
        stored
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }

    /// The pins of a job's tables (`tables`, the written one last), its walked table's key
    /// `keys` (none for a revert) as they are now.
    pub async fn now(
        conn: &mut PgConnection,
        tables: Vec<(String, u32)>,
        sites: Sites,
    ) -> sqlx::Result<Self> {
        let mut pinned = Self {
            tables,
            sites,
            ..Default::default()
        };
        let found = pinned.found(&mut *conn).await?;
        pinned.keys = pinned.identity(conn).await?;
        pinned.sites.fingerprint = found.fingerprint;
        pinned.row_security = found.row_security;
        Ok(pinned)
    }

    /// The walked key's columns as the walk sorts them now (`key_identity!`).
    async fn identity<'e>(&self, conn: impl sqlx::PgExecutor<'e>) -> sqlx::Result<Vec<String>> {
        crate::sql::query_scalar(concat!("SELECT ", key_identity!("$1", "$2")))
            .bind(&self.sites.key_names)
            .bind(self.sites.keyed.map(i64::from))
            .fetch_one(conn)
            .await
    }

    /// How `found` (by a checkpoint in the batch's transaction, on `conn`, or after a batch
    /// failed) differs from these pins; the key's full identity is read on `conn` only when its
    /// fingerprint changed.
    pub async fn check(
        &self,
        conn: &mut PgConnection,
        found: &Found,
    ) -> sqlx::Result<Option<Drift>> {
        if let Some(drift) = self.drift(found) {
            return Ok(Some(drift));
        }
        if self.keys.is_empty() || found.fingerprint == self.sites.fingerprint {
            return Ok(None);
        }
        let keys = self.identity(conn).await?;
        Ok(self.changed(&keys, false))
    }

    /// What the pinned things are now, read outside any batch (after a batch failed).
    pub async fn found<'e>(&self, conn: impl sqlx::PgExecutor<'e>) -> sqlx::Result<Found> {
        crate::sql::query_as(concat!("SELECT ", found_sql!("$1", "$2", "$3", "$4")))
            .bind(self.names())
            .bind(&self.sites.key_names)
            .bind(self.sites.keyed.map(i64::from))
            .bind(i64::from(self.sites.written))
            .fetch_one(conn)
            .await
    }

    /// The names, for `to_regclass` in the checkpoint.
    pub fn names(&self) -> Vec<&str> {
        self.tables.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// How `found` differs from these pins, the key aside (`check`).
    fn drift(&self, found: &Found) -> Option<Drift> {
        let replaced = self
            .tables
            .iter()
            .zip(&found.oids)
            .find(|((_, oid), now)| i64::from(*oid) != **now);
        if let Some(((name, planned), now)) = replaced {
            return Some(Drift::Replaced {
                name: name.clone(),
                planned: *planned,
                now: oid_text(*now),
            });
        }
        (found.row_security && !self.row_security)
            .then_some(Drift::RowSecurity)
            .or_else(|| found.inherited.then_some(Drift::Inherited))
    }

    /// How these pins (taken now) differ from `earlier`, those the job planned with (an older
    /// plan has none: nothing to compare).
    pub fn drift_since(&self, earlier: &Pinned) -> Option<Drift> {
        let replaced = earlier.tables.iter().find_map(|(name, planned)| {
            let now = self.tables.iter().find(|(n, _)| n == name)?.1;
            (now != *planned).then(|| Drift::Replaced {
                name: name.clone(),
                planned: *planned,
                now: now.to_string(),
            })
        });
        if replaced.is_some() || earlier.tables.is_empty() {
            return replaced;
        }
        earlier.changed(&self.keys, self.row_security)
    }

    fn changed(&self, keys: &[String], row_security: bool) -> Option<Drift> {
        if !self.keys.is_empty() && self.keys != keys {
            return Some(Drift::Key {
                was: self.keys.join("; "),
                now: keys.join("; "),
            });
        }
        (row_security && !self.row_security).then_some(Drift::RowSecurity)
    }
}

impl Drift {
    /// The error that ends the job: `job` on `table` (as messages name it).
    pub fn error(self, job: &str, table: &str) -> JobError {
        let (job, table) = (job.to_owned(), table.to_owned());
        let what = match self {
            Drift::Replaced { name, planned, now } => {
                return JobError::TableReplaced {
                    job,
                    table,
                    name,
                    planned,
                    now,
                };
            }
            Drift::Key { was, now } => format!(
                "the key changed since the job planned (then {was}; now {now}): the frozen bound \
                 and the checkpoint hold key values as they sorted then, and the walk would skip \
                 or repeat rows"
            ),
            Drift::RowSecurity => "row-level security hides rows of the table from the \
                                   daemon's role since the job planned: the job would skip them, \
                                   and its verification could not count them"
                .into(),
            Drift::Inherited => "a table inherits from it since the job planned: the job's \
                                 statements would change the child's rows too"
                .into(),
        };
        JobError::TableAltered { job, table, what }
    }
}

fn oid_text(oid: i64) -> String {
    if oid == 0 {
        "none".into()
    } else {
        oid.to_string()
    }
}
