//! The table a job changes: resolved through `regclass`, checked against the allowlist and our own
//! schema, with its keyset columns discovered (primary key, else a unique NOT NULL index).

use sqlx::PgConnection;

use crate::error::JobError;
use crate::sql::{qualified, quote_ident};

/// Key column types backfilld can paginate: they have a total btree order and a text form that
/// round-trips exactly through `::text`.
const KEY_TYPES: &[&str] = &[
    "int2",
    "int4",
    "int8",
    "uuid",
    "text",
    "varchar",
    "timestamp",
    "timestamptz",
    "date",
];

#[derive(Debug, Clone)]
pub struct KeyColumn {
    pub name: String,
    /// `format_type()` of the column, used to cast cursor text back: `$1::text::bigint`.
    pub sql_type: String,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub sql_type: String,
    pub generated: bool,
    /// For a generated column, the columns its expression reads (`pg_depend`).
    pub generated_from: Vec<String>,
    pub identity_always: bool,
    /// Its type is a base, enum or range type, for which `IS NULL` means the value is NULL (for
    /// a composite type, or a domain over one, it also holds for a row of NULL fields).
    pub scalar: bool,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    /// `"schema"."table"`, ready for SQL.
    pub quoted: String,
    pub keys: Vec<KeyColumn>,
    pub columns: Vec<Column>,
    /// A partitioned parent has no blocks of its own (no TID range scans over it).
    pub partitioned: bool,
    /// Which conflicts an `INSERT … ON CONFLICT DO NOTHING` into it may name (see `on_conflict`).
    pub conflicts: Conflicts,
}

/// What `ON CONFLICT DO NOTHING` may arbitrate on a table. PostgreSQL refuses a bare `ON CONFLICT
/// DO NOTHING` (55000) on a table with any deferrable unique, primary-key or exclusion
/// constraint; naming a non-deferrable unique index instead still works.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Conflicts {
    /// No deferrable constraint: a conflict on any unique key is skipped.
    #[default]
    Any,
    /// Deferrable constraints exist, the keys' own unique index is not deferrable: only a
    /// conflict on these columns is skipped (one on another unique key fails the statement).
    On(Vec<String>),
    /// The keys' own constraint is deferrable: the unique keys on NOT NULL columns that are not
    /// (columns each, primary key first), one of which a statement must name. A revert restoring
    /// whole rows names the first; an insert the first its set clause assigns in full
    /// (`change::insert`), since a key left to its default (a serial) never conflicts.
    Deferred(Vec<Vec<String>>),
}

impl Conflicts {
    /// The `ON CONFLICT … DO NOTHING` clause.
    fn clause(&self) -> String {
        match self {
            Conflicts::Any => "ON CONFLICT DO NOTHING".into(),
            Conflicts::On(columns) => format!(
                "ON CONFLICT ({}) DO NOTHING",
                column_list(columns.iter().map(String::as_str))
            ),
            // No such key: no clause (the bare form fails with 55000). An insert is refused
            // then (`change::insert`); a revert's re-insert skips rows by its keys itself.
            Conflicts::Deferred(keys) => match keys.first() {
                Some(columns) => Conflicts::On(columns.clone()).clause(),
                None => String::new(),
            },
        }
    }
}

impl Target {
    /// `ON CONFLICT DO NOTHING`, or `ON CONFLICT ("k") DO NOTHING` where deferrable
    /// constraints forbid the bare form (see [`Conflicts`]).
    pub fn on_conflict(&self) -> String {
        self.conflicts.clause()
    }

    /// Whether the keys' own unique constraint is deferrable, so no `ON CONFLICT` can skip a
    /// row on them.
    pub fn keys_deferrable(&self) -> bool {
        matches!(self.conflicts, Conflicts::Deferred(_))
    }

    /// `schema.table` for messages and metrics, each part quoted where it needs it
    /// (`public."Order Items"`), as PostgreSQL shows names.
    pub fn display(&self) -> String {
        format!(
            "{}.{}",
            crate::sql::shown_ident(&self.schema),
            crate::sql::shown_ident(&self.table)
        )
    }

    /// How a job's messages name its table: the table it changes, and for an insert also the
    /// one whose keys it walks (`public.orders (from public.import)`), `self` being that one.
    pub fn named_with(&self, into: Option<&Target>) -> String {
        match into {
            Some(into) => format!("{} (from {})", into.display(), self.display()),
            None => self.display(),
        }
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// Schemas no job may target: ours, and the system catalogs.
fn forbidden_schema(schema: &str, own: &str) -> bool {
    schema == own
        || schema == "pg_catalog"
        || schema == "information_schema"
        || schema.starts_with("pg_toast")
        || schema.starts_with("pg_temp")
}

pub struct Resolve<'a> {
    pub job: &'a str,
    pub table_name: &'a str,
    pub key_columns: Option<&'a [String]>,
    pub own_schema: &'a str,
    pub allowed_tables: &'a [String],
}

impl Resolve<'_> {
    pub async fn run(&self, conn: &mut PgConnection) -> Result<Target, JobError> {
        let (oid, schema, table, partitioned) = self.find_table(conn).await?;
        let display = format!("{schema}.{table}");
        if forbidden_schema(&schema, self.own_schema) {
            return Err(self.invalid(format!(
                "table {display} is in schema {schema}, which backfilld never changes"
            )));
        }
        let listed = |entry: &String| {
            crate::sql::split_qualified(entry).is_some_and(|(s, t)| s == schema && t == table)
        };
        if !self.allowed_tables.is_empty() && !self.allowed_tables.iter().any(listed) {
            return Err(self.invalid(format!(
                "table {display} is not in safety.allowed_tables ({})",
                self.allowed_tables.join(", ")
            )));
        }
        let columns = load_columns(conn, oid)
            .await
            .map_err(|e| JobError::sql(self.job, &display, "reading columns", e))?;
        let (keys, conflicts) = self.find_keys(conn, oid, &display, &columns).await?;
        Ok(Target {
            oid,
            quoted: qualified(&schema, &table),
            schema,
            table,
            keys,
            columns,
            partitioned,
            conflicts,
        })
    }

    fn invalid(&self, reason: String) -> JobError {
        JobError::invalid(self.job, reason)
    }

    /// A table with inheritance children (`INHERITS`, not partitions): a statement on it reads
    /// and changes their rows too, its key is unique in the parent alone, and its archive could
    /// hold only the parent's columns, so a revert would put the children's rows back into the
    /// parent without their own columns. Refused; each table of the tree can be a target.
    async fn refuse_inheritance_parent(
        &self,
        conn: &mut PgConnection,
        oid: u32,
        schema: &str,
        table: &str,
    ) -> Result<(), JobError> {
        let children: Vec<String> = crate::sql::query_scalar(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE i.inhparent = $1 ORDER BY 1 LIMIT 5",
        )
        .bind(sqlx::postgres::types::Oid(oid))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| JobError::sql(self.job, table, "reading inheritance children", e))?;
        if children.is_empty() {
            return Ok(());
        }
        Err(self.invalid(format!(
            "{schema}.{table} has inheritance children ({}): a statement on it changes their rows \
             too, which its key and its archive do not cover; target each child table instead \
             (the parent's own rows cannot be a target while it has children)",
            children.join(", ")
        )))
    }

    async fn find_table(
        &self,
        conn: &mut PgConnection,
    ) -> Result<(u32, String, String, bool), JobError> {
        // to_regclass returns NULL for a missing table instead of raising, and parses the name
        // with the server's own rules (quoting, search_path).
        let row: Option<(sqlx::postgres::types::Oid, String, String, String)> =
            crate::sql::query_as(
                "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass($1)",
            )
            .bind(self.table_name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| {
                match JobError::sql(self.job, self.table_name, "resolving table", e) {
                    err if err.is_retryable() => err,
                    err => self.invalid(format!(
                        "{:?} is not a valid table name: {err}",
                        self.table_name
                    )),
                }
            })?;
        let Some((oid, schema, table, kind)) = row else {
            return Err(self.invalid(format!("table {} does not exist", self.table_name)));
        };
        if kind != "r" && kind != "p" {
            return Err(self.invalid(format!(
                "{schema}.{table} is not a table (relkind {kind}); target the underlying table"
            )));
        }
        if kind == "r" {
            self.refuse_inheritance_parent(conn, oid.0, &schema, &table)
                .await?;
        }
        Ok((oid.0, schema, table, kind == "p"))
    }

    async fn find_keys(
        &self,
        conn: &mut PgConnection,
        oid: u32,
        display: &str,
        columns: &[Column],
    ) -> Result<(Vec<KeyColumn>, Conflicts), JobError> {
        let indexes = unique_indexes(conn, oid)
            .await
            .map_err(|e| JobError::sql(self.job, display, "reading indexes", e))?;
        let chosen = match self.key_columns {
            Some(wanted) => self.explicit_key(wanted, &indexes, display, columns)?,
            None => indexes.iter().find(|i| i.not_null).ok_or_else(|| {
                self.invalid(format!(
                    "table {display} has no primary key or unique index on NOT NULL columns \
                     (under the columns' own collations and default operator classes); add \
                     one (or a unique constraint on NOT NULL columns), which is then found"
                ))
            })?,
        };
        let keys = chosen
            .columns
            .iter()
            .zip(&chosen.types)
            .map(|(name, typ)| self.key_column(display, name, typ, columns))
            .collect::<Result<_, _>>()?;
        let deferrable: bool = crate::sql::query_scalar(
            "SELECT EXISTS (SELECT FROM pg_constraint
                            WHERE conrelid = $1 AND contype IN ('p', 'u', 'x') AND condeferrable)",
        )
        .bind(sqlx::postgres::types::Oid(oid))
        .fetch_one(conn)
        .await
        .map_err(|e| JobError::sql(self.job, display, "reading constraints", e))?;
        let conflicts = match (deferrable, chosen.immediate) {
            (false, _) => Conflicts::Any,
            (true, true) => Conflicts::On(chosen.columns.clone()),
            (true, false) => Conflicts::Deferred(
                indexes
                    .iter()
                    .filter(|i| i.immediate && i.not_null)
                    .map(|i| i.columns.clone())
                    .collect(),
            ),
        };
        Ok((keys, conflicts))
    }

    fn explicit_key<'i>(
        &self,
        wanted: &[String],
        indexes: &'i [UniqueIndex],
        display: &str,
        columns: &[Column],
    ) -> Result<&'i UniqueIndex, JobError> {
        for name in wanted {
            if !columns.iter().any(|c| &c.name == name) {
                return Err(
                    self.invalid(format!("key column {name:?} does not exist in {display}"))
                );
            }
        }
        let mut sorted = wanted.to_vec();
        sorted.sort();
        let index = indexes.iter().find(|i| {
            let mut cols = i.columns.clone();
            cols.sort();
            cols == sorted
        });
        match index {
            Some(i) if i.not_null => Ok(i),
            Some(_) => Err(self.invalid(format!(
                "key_columns {wanted:?} of {display} allow NULL; keyset columns must be NOT NULL"
            ))),
            None => Err(self.invalid(format!(
                "key_columns {wanted:?} of {display} are not unique: no unique index covers exactly them"
            ))),
        }
    }

    fn key_column(
        &self,
        display: &str,
        name: &str,
        typ: &str,
        columns: &[Column],
    ) -> Result<KeyColumn, JobError> {
        if !KEY_TYPES.contains(&typ) {
            return Err(self.invalid(format!(
                "key column {name} of {display} has type {typ}, which backfilld cannot paginate \
                 (supported: {})",
                KEY_TYPES.join(", ")
            )));
        }
        let sql_type = columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.sql_type.clone())
            .unwrap_or_else(|| typ.to_owned());
        Ok(KeyColumn {
            name: name.to_owned(),
            sql_type,
        })
    }
}

/// A valid, plain-column unique index: not partial, except where `partial_unique_indexes` says.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UniqueIndex {
    pub columns: Vec<String>,
    /// Each column's type name (`pg_type.typname`), as key columns are bound.
    pub types: Vec<String>,
    /// Each column's declared type with its modifier (`format_type`, e.g. `numeric(12,2)`), as
    /// an INSERT casts a value assigned to it.
    pub declared_types: Vec<String>,
    /// Every column is NOT NULL.
    pub not_null: bool,
    /// `NULLS NOT DISTINCT` (PostgreSQL 15+): NULLs conflict too.
    pub nulls_not_distinct: bool,
    /// Not deferrable: checked by each statement, as `ON CONFLICT` needs.
    pub immediate: bool,
    /// For a partial index: its predicate (`pg_get_expr`), over the table's bare column names.
    #[sqlx(default)]
    pub only: Option<String>,
    /// For a partial index: the columns it depends on besides its keys (those of `only`).
    #[sqlx(default)]
    pub only_columns: Vec<String>,
}

/// The select list `unique_indexes` and `partial_unique_indexes` share: one row per index, its
/// key columns in order.
macro_rules! unique_index_columns {
    () => {
        "SELECT array_agg(a.attname::text ORDER BY k.ord) AS columns,
                array_agg(t.typname::text ORDER BY k.ord) AS types,
                array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord) AS declared_types,
                bool_and(a.attnotnull) AS not_null,
                bool_or(coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false))
                    AS nulls_not_distinct,
                bool_and(i.indimmediate) AS immediate"
    };
}

/// The `FROM` of those queries: each index's key columns (`k`), their attributes (`a`) and types
/// (`t`).
macro_rules! unique_index_from {
    () => {
        "
         FROM pg_index i
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         JOIN pg_type t ON t.oid = a.atttypid"
    };
}

/// Valid, non-partial, plain-column unique indexes of `oid`; the primary key first, then the
/// narrowest.
pub async fn unique_indexes(conn: &mut PgConnection, oid: u32) -> sqlx::Result<Vec<UniqueIndex>> {
    crate::sql::query_as(concat!(
        unique_index_columns!(),
        unique_index_from!(),
        "
         JOIN pg_opclass opc ON opc.oid = i.indclass[(k.ord - 1)::int]
         WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indisready
           AND i.indpred IS NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
         GROUP BY i.indexrelid, i.indisprimary
         -- The walk compares keys with the columns' own collation and default operators: an
         -- index unique under another (`COLLATE \"C\"` on a case-insensitive column) is not a key.
         HAVING bool_and(i.indcollation[(k.ord - 1)::int] = a.attcollation AND opc.opcdefault)
         ORDER BY i.indisprimary DESC, count(*), i.indexrelid"
    ))
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(conn)
    .await
}

/// Valid, plain-column, partial unique indexes of `oid` (`UNIQUE (user_id, group_id) WHERE
/// deleted_at IS NULL`): never a job's key, but an insert's `ON CONFLICT DO NOTHING` skips rows
/// that conflict with one, so the insert counts them as inserted already.
pub async fn partial_unique_indexes(
    conn: &mut PgConnection,
    oid: u32,
) -> sqlx::Result<Vec<UniqueIndex>> {
    crate::sql::query_as(concat!(
        unique_index_columns!(),
        ",
                pg_get_expr(i.indpred, i.indrelid) AS only,
                ARRAY(SELECT d.attname::text FROM pg_depend p
                      JOIN pg_attribute d ON d.attrelid = p.refobjid AND d.attnum = p.refobjsubid
                      WHERE p.classid = 'pg_class'::regclass AND p.objid = i.indexrelid
                        AND p.refobjid = i.indrelid AND p.refobjsubid > 0
                        AND p.refobjsubid <> ALL (i.indkey::int2[])) AS only_columns",
        unique_index_from!(),
        "
         WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indisready
           AND i.indpred IS NOT NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
         GROUP BY i.indexrelid, i.indpred, i.indrelid, i.indkey
         ORDER BY i.indexrelid"
    ))
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(conn)
    .await
}

async fn load_columns(conn: &mut PgConnection, oid: u32) -> sqlx::Result<Vec<Column>> {
    let rows: Vec<(String, String, bool, Vec<String>, bool, bool)> = crate::sql::query_as(
        "SELECT attname::text, format_type(atttypid, atttypmod), attgenerated <> '',
                ARRAY(SELECT b.attname::text
                      FROM pg_attrdef ad
                      JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                      JOIN pg_attribute b ON b.attrelid = d.refobjid AND b.attnum = d.refobjsubid
                      WHERE a.attgenerated <> '' AND ad.adrelid = a.attrelid
                        AND ad.adnum = a.attnum AND d.refclassid = 'pg_class'::regclass
                        AND d.refobjid = a.attrelid AND d.refobjsubid NOT IN (0, a.attnum)
                      ORDER BY b.attnum),
                attidentity = 'a', t.typtype IN ('b', 'e', 'r', 'm')
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
         ORDER BY attnum",
    )
    .bind(sqlx::postgres::types::Oid(oid))
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(name, sql_type, generated, generated_from, identity_always, scalar)| Column {
                name,
                sql_type,
                generated,
                generated_from,
                identity_always,
                scalar,
            },
        )
        .collect())
}

/// `"a", "b"` for a list of column names.
pub fn column_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(", ")
}
