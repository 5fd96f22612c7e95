//! `backfilld check`: before the migration that tightens a table (`SET NOT NULL`, a unique index, a
//! foreign key), count the rows the constraint would reject, without one long statement per check.
//!
//! NOT NULL and foreign-key violations are properties of one row, so they are counted the way a dry
//! run counts (`plan::Counter::count`): in keyset windows over the table's key, walked in key order
//! up to the largest key when the check starts, each window one statement sized toward
//! `batch.target_batch_ms` (ten write batches wide at most, like the plan's counting windows),
//! `batch.sleep_ms` between windows. Uniqueness is not a property of one row: see `duplicates`.
//!
//! The table is resolved exactly as a job's target (`target::Resolve`: the same allowlist and
//! schema refusals, the same key), and every column named on the command line must be one of its
//! columns before it is quoted into SQL.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use crate::db::Db;

use crate::config::{BatchConfig, Config};
use crate::error::JobError;
use crate::job::{Preset, Throttle};
use crate::keyset::{Key, Keyset, bind_keys};
use crate::sql::{Names, quote_ident};
use crate::target::{Column, Resolve, Target, column_list};
use crate::throttle::Controller;

/// Offending keys or duplicated values shown per check.
pub const SAMPLES: i64 = 5;

/// Counting windows are reads, so like the plan's they may be ten write batches wide.
const WINDOW_FACTOR: i64 = 10;

/// What the shared target and SQL errors name in place of a job.
const LABEL: &str = "check";

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The table cannot be checked: missing, not a table, refused (our schema, the catalogs, not
    /// in `safety.allowed_tables`), or without a key to walk.
    #[error("cannot check {table}: {reason}")]
    Refused { table: String, reason: String },
    #[error("table {table} has no column {column:?}")]
    UnknownColumn { table: String, column: String },
    #[error("--unique {given:?}: expected one or more comma-separated column names")]
    BadUnique { given: String },
    #[error("--references {given:?}: expected PARENT(COLUMN), e.g. public.customers(id)")]
    BadReference { given: String },
    #[error("--references: no table {given:?} (a view or another relation does not count)")]
    NoParent { given: String },
    #[error(
        "--references {parent}({column}): {parent} has no unique key on exactly ({column}) (a \
         primary key, unique constraint or unique index, neither partial nor deferrable): a \
         foreign key cannot reference it, whatever the data"
    )]
    NotReferable { parent: String, column: String },
    #[error(
        "counting duplicates of ({columns}) in {table} reached statement_timeout ({timeout}): it \
         reads the whole table in one statement; raise it for this command, e.g. \
         BACKFILLD_BATCH__STATEMENT_TIMEOUT=10m"
    )]
    UniqueTimedOut {
        table: String,
        columns: String,
        timeout: String,
    },
    /// A statement failed; names the table, the step and the SQLSTATE.
    #[error("{}", check_failed(.0))]
    Sql(JobError),
}

/// A failed statement's message, read as the check's own ("check on public.t: … failed: …"),
/// not as a job's.
fn check_failed(e: &JobError) -> String {
    let text = e.to_string();
    match text.strip_prefix(&format!("job {LABEL} on ")) {
        Some(rest) => format!("{LABEL} on {rest}"),
        None => text,
    }
}

/// One check as given on the command line. Column names are matched exactly against the table's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Rows where the column is NULL: what `SET NOT NULL` would reject.
    NotNull(String),
    /// Duplicate groups among rows with no NULL in the columns: what a unique index would reject.
    Unique(Vec<String>),
    /// Rows whose non-NULL `column` has no `parent(parent_column)` row: what a foreign key would
    /// reject.
    Orphans {
        column: String,
        parent: String,
        parent_column: String,
    },
}

impl Check {
    /// `--not-null col`.
    pub fn not_null(given: &str) -> Check {
        Check::NotNull(crate::sql::unquote_ident(given))
    }

    /// `--unique a,b`.
    pub fn unique(given: &str) -> Result<Check, CheckError> {
        let columns: Vec<String> = crate::sql::split_idents(given);
        if columns.iter().any(String::is_empty) {
            return Err(CheckError::BadUnique {
                given: given.into(),
            });
        }
        Ok(Check::Unique(columns))
    }

    /// `--orphans COL --references PARENT(COL)`. The parent's name is parsed by the server
    /// (`to_regclass`), as a target's is.
    pub fn orphans(column: &str, references: &str) -> Result<Check, CheckError> {
        let bad = || CheckError::BadReference {
            given: references.into(),
        };
        let given = references.trim();
        // The last `(` outside double quotes opens the column: `public.pp("a(b)")`.
        let open = crate::sql::outside_quotes(given, '(').pop();
        let (parent, rest) = given.split_at(open.ok_or_else(bad)?);
        let parent_column = rest[1..].strip_suffix(')').ok_or_else(bad)?.trim();
        if parent.trim().is_empty() || parent_column.is_empty() {
            return Err(bad());
        }
        Ok(Check::Orphans {
            column: crate::sql::unquote_ident(column),
            parent: parent.trim().into(),
            parent_column: crate::sql::unquote_ident(parent_column),
        })
    }
}

/// What one check found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `not_null`, `unique` or `orphans`.
    pub check: &'static str,
    /// What was checked: `email`, `tenant_id, email`, `customer_id -> public.customers(id)`.
    pub subject: String,
    /// Rows (`not_null`, `orphans`) or duplicate groups (`unique`) the constraint would reject.
    pub violations: i64,
    /// `unique`: rows in the duplicate groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_rows: Option<i64>,
    /// `unique`: rows with a NULL in any of the columns, which a unique index lets through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_with_null: Option<i64>,
    /// Up to `SAMPLES` offending keys in key order (`{"key", "value"}`), or the duplicated values
    /// with the most rows (`{"value", "rows"}`).
    pub samples: Vec<Value>,
}

impl Finding {
    fn new(check: &'static str, subject: String) -> Self {
        Self {
            check,
            subject,
            violations: 0,
            duplicate_rows: None,
            rows_with_null: None,
            samples: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `schema.table`.
    pub table: String,
    /// Keys the windowed checks read (up to the largest key when the check started).
    pub rows_checked: i64,
    pub findings: Vec<Finding>,
}

impl Report {
    /// No check found a violation (rows a unique index lets through are not violations).
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.violations == 0)
    }
}

/// Runs `checks` against `table`, in the order given.
#[tracing::instrument(skip(pool, names, cfg, checks))]
pub async fn run(
    pool: &Db,
    names: &Names,
    cfg: &Config,
    table: &str,
    key_columns: Option<&[String]>,
    checks: &[Check],
) -> Result<Report, CheckError> {
    let target = resolve(pool, names, cfg, table, key_columns).await?;
    let mut resolved = Resolved::default();
    for check in checks {
        resolved.add(pool, &target, check).await?;
    }
    let walk = Walk {
        pool,
        target: &target,
        keyset: Keyset::new(&target),
        rows: &resolved.rows,
        batch: &cfg.batch,
    };
    let rows_checked = walk.run(&mut resolved.findings).await?;
    for (finding, columns) in &resolved.unique {
        let timeout = cfg.batch.statement_timeout;
        duplicates(
            pool,
            &target,
            columns,
            timeout,
            &mut resolved.findings[*finding],
        )
        .await?;
    }
    tracing::info!(
        rows_checked,
        passed = resolved.findings.iter().all(|f| f.violations == 0),
        "checked"
    );
    Ok(Report {
        table: target.display(),
        rows_checked,
        findings: resolved.findings,
    })
}

async fn resolve(
    pool: &Db,
    names: &Names,
    cfg: &Config,
    table: &str,
    key_columns: Option<&[String]>,
) -> Result<Target, CheckError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| CheckError::Sql(JobError::sql(LABEL, table, "connecting", e)))?;
    let resolve = Resolve {
        job: LABEL,
        table_name: table,
        key_columns,
        own_schema: &names.schema,
        allowed_tables: &cfg.safety.allowed_tables,
    };
    let resolved = resolve.run(&mut conn).await;
    // The windows' aliases start with the reserved prefix, as a job's statements' do.
    let resolved = resolved.and_then(|t| crate::validate::reserved_names(LABEL, t));
    let target = resolved.map_err(|e| match e {
        JobError::Invalid { reason, .. } => CheckError::Refused {
            table: table.into(),
            reason,
        },
        other => CheckError::Sql(other),
    })?;
    conn.finish()
        .await
        .map_err(|e| CheckError::Sql(JobError::sql(LABEL, table, "committing", e)))?;
    Ok(target)
}

/// A row check counted in every window: a condition true (never NULL) for an offending row.
struct RowCheck {
    finding: usize,
    condition: String,
    tally: Tally,
}

enum Tally {
    /// Rows the constraint rejects; samples show the key and, when set, this SQL value.
    Violations { shown: Option<String> },
    /// Rows with a NULL in a unique check's columns: counted, not violations.
    RowsWithNull,
}

/// The checks resolved against the table: findings in order, the conditions the keyset walk
/// counts, and the unique checks' columns.
#[derive(Default)]
struct Resolved {
    findings: Vec<Finding>,
    rows: Vec<RowCheck>,
    unique: Vec<(usize, Vec<Column>)>,
}

impl Resolved {
    async fn add(&mut self, pool: &Db, target: &Target, check: &Check) -> Result<(), CheckError> {
        match check {
            Check::NotNull(name) => self.not_null(target, name),
            Check::Unique(names) => self.unique(target, names),
            Check::Orphans {
                column,
                parent,
                parent_column,
            } => {
                let parent = find_parent(pool, parent, parent_column).await?;
                comparable(pool, target, column, &parent, parent_column).await?;
                self.orphans(target, column, &parent, parent_column)
            }
        }
    }

    fn push(&mut self, finding: Finding, condition: String, tally: Tally) {
        tracing::debug!(check = finding.check, subject = %finding.subject, %condition, "row check");
        let finding_index = self.findings.len();
        self.findings.push(finding);
        self.rows.push(RowCheck {
            finding: finding_index,
            condition,
            tally,
        });
    }

    fn not_null(&mut self, target: &Target, name: &str) -> Result<(), CheckError> {
        let condition = is_null(&quote_ident(name), column(target, name)?);
        let finding = Finding::new("not_null", name.to_owned());
        self.push(finding, condition, Tally::Violations { shown: None });
        Ok(())
    }

    /// Rows with a NULL are counted in the walk; the duplicates after it (`duplicates`).
    fn unique(&mut self, target: &Target, names: &[String]) -> Result<(), CheckError> {
        let columns = names
            .iter()
            .map(|n| column(target, n).cloned())
            .collect::<Result<Vec<_>, _>>()?;
        let mut finding = Finding::new("unique", names.join(", "));
        (finding.duplicate_rows, finding.rows_with_null) = (Some(0), Some(0));
        self.unique.push((self.findings.len(), columns.clone()));
        self.push(finding, any_null(&columns), Tally::RowsWithNull);
        Ok(())
    }

    fn orphans(
        &mut self,
        target: &Target,
        name: &str,
        parent: &Parent,
        parent_column: &str,
    ) -> Result<(), CheckError> {
        let condition = orphan(target, column(target, name)?, parent, parent_column);
        let finding = Finding::new(
            "orphans",
            format!("{name} -> {}({parent_column})", parent.display),
        );
        let shown = Some(format!("{}::text", quote_ident(name)));
        self.push(finding, condition, Tally::Violations { shown });
        Ok(())
    }
}

/// The table's column `name`, or an error naming both.
fn column<'t>(target: &'t Target, name: &str) -> Result<&'t Column, CheckError> {
    target
        .column(name)
        .ok_or_else(|| CheckError::UnknownColumn {
            table: target.display(),
            column: name.into(),
        })
}

/// `sql IS NULL` as a constraint reads it: the value itself is NULL. For a composite column `IS
/// NULL` also holds for a row of NULL fields, which NOT NULL accepts and a unique index compares
/// like any value; `IS NOT DISTINCT FROM NULL` tests the value alone.
fn is_null(sql: &str, column: &Column) -> String {
    if column.scalar {
        format!("{sql} IS NULL")
    } else {
        format!("{sql} IS NOT DISTINCT FROM NULL")
    }
}

fn any_null(columns: &[Column]) -> String {
    let tests: Vec<String> = columns
        .iter()
        .map(|c| is_null(&quote_ident(&c.name), c))
        .collect();
    format!("({})", tests.join(" OR "))
}

/// A child row whose non-NULL value has no parent row (a foreign key's MATCH SIMPLE lets NULL
/// through). The child column is qualified by the table's name, so it stays the child's even when
/// the parent is the same table (a self-reference) or has a column of the same name. `OFFSET 0`
/// keeps the probe per row: as an anti-join the planner may hash the whole parent in every batch.
/// The child's value is compared under the parent column's collation, as the parent's key is
/// unique under it; without it, two columns of different collations could not be compared.
fn orphan(target: &Target, child: &Column, parent: &Parent, parent_column: &str) -> String {
    let value = format!("{}.{}", target.quoted, quote_ident(&child.name));
    let collate = parent
        .collation
        .as_ref()
        .map_or(String::new(), |c| format!(" COLLATE {c}"));
    format!(
        "NOT ({null}) AND NOT EXISTS (SELECT FROM {table} AS _bf_parent WHERE _bf_parent.{pc} = {value}{collate} OFFSET 0)",
        null = is_null(&value, child),
        table = parent.quoted,
        pc = quote_ident(parent_column),
    )
}

/// The parent table of an orphans check.
struct Parent {
    quoted: String,
    display: String,
    /// The parent column's collation, quoted (`None` for a type without one).
    collation: Option<String>,
    /// The parent column's type (`format_type`).
    sql_type: String,
}

/// Whether the child column's values can be compared with the parent column's, as a foreign key
/// between them needs: a refusal naming both types, rather than the counting statement's
/// SQLSTATE ("collations are not supported by type integer" for an integer against a text key).
async fn comparable(
    pool: &Db,
    target: &Target,
    column_name: &str,
    parent: &Parent,
    parent_column: &str,
) -> Result<(), CheckError> {
    let child = column(target, column_name)?;
    let probe = format!(
        "SELECT NULL::{} = NULL::{}{}",
        child.sql_type,
        parent.sql_type,
        parent
            .collation
            .as_ref()
            .map_or(String::new(), |c| format!(" COLLATE {c}"))
    );
    match crate::sql::query(&probe).execute(pool).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42883" | "42804")) => {
            Err(CheckError::Refused {
                table: target.display(),
                reason: format!(
                    "--orphans {column_name} ({}) cannot be compared with {}({parent_column}) \
                     ({}): {}",
                    child.sql_type,
                    parent.display,
                    parent.sql_type,
                    e.message()
                ),
            })
        }
        Err(e) => Err(CheckError::Sql(JobError::sql(
            LABEL,
            &target.display(),
            "comparing the column types",
            e,
        ))),
    }
}

/// The parent table of an orphans check, resolved by the server like a target, and whether it has
/// the column. It is only read (one probe per child row), so the allowlist, which names the tables
/// jobs may change, does not apply to it.
async fn find_parent(pool: &Db, given: &str, column: &str) -> Result<Parent, CheckError> {
    // Schema, table, whether it has the column, the column's type and collation, and whether a
    // foreign key could reference the column: a unique key on exactly it, neither partial nor
    // deferrable (PostgreSQL refuses the key otherwise, whatever the data).
    type Found = (String, String, bool, Option<String>, Option<String>, bool);
    let row: Option<Found> = crate::sql::query_as(
        "SELECT n.nspname::text, c.relname::text, a.attnum IS NOT NULL,
                format_type(a.atttypid, a.atttypmod),
                (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname)
                 FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace
                 WHERE co.oid = a.attcollation),
                EXISTS (SELECT FROM pg_index i
                        WHERE i.indrelid = c.oid AND i.indisunique AND i.indimmediate
                          AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
                          AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum)
         FROM pg_class c
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $2 AND a.attnum > 0
                                 AND NOT a.attisdropped
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
    )
    .bind(given)
    .bind(column)
    .fetch_optional(pool)
    .await
    .map_err(|e| CheckError::Sql(JobError::sql(LABEL, given, "resolving the parent table", e)))?;
    let Some((schema, table, has_column, sql_type, collation, referable)) = row else {
        return Err(CheckError::NoParent {
            given: given.into(),
        });
    };
    let display = format!("{schema}.{table}");
    if !has_column {
        return Err(CheckError::UnknownColumn {
            table: display,
            column: column.into(),
        });
    }
    if !referable {
        return Err(CheckError::NotReferable {
            parent: display,
            column: column.into(),
        });
    }
    Ok(Parent {
        quoted: crate::sql::qualified(&schema, &table),
        display,
        collation,
        sql_type: sql_type.unwrap_or_default(),
    })
}

/// Window sizes: the configured batch sizes, ten times wider, adapted toward `target_batch_ms`.
fn sizing(batch: &BatchConfig) -> Throttle {
    Throttle {
        initial_size: batch.size * WINDOW_FACTOR,
        min_size: batch.min_size * WINDOW_FACTOR,
        max_size: batch.max_size * WINDOW_FACTOR,
        target_batch_ms: batch.target_batch_ms,
        max_batch_ms: batch.max_batch_ms,
        sleep_ms: batch.sleep_ms,
        max_rows_per_second: 0,
        preset: Preset::Gentle,
    }
}

/// The keyset walk counting every row check, window by window.
struct Walk<'a> {
    pool: &'a Db,
    target: &'a Target,
    keyset: Keyset,
    rows: &'a [RowCheck],
    batch: &'a BatchConfig,
}

/// One window: its keys, each row check's count, its last key.
struct Window {
    keys: i64,
    counts: Vec<i64>,
    last: Key,
}

impl Walk<'_> {
    fn err(&self, step: &'static str) -> impl Fn(sqlx::Error) -> CheckError + '_ {
        move |e| CheckError::Sql(JobError::sql(LABEL, &self.target.display(), step, e))
    }

    /// Walks the key range as it is now; returns the keys read. Counts and samples go into the
    /// row checks' findings.
    async fn run(&self, findings: &mut [Finding]) -> Result<i64, CheckError> {
        let Some(upper) = self.upper().await? else {
            return Ok(0);
        };
        let (first, next) = (self.window_sql(false), self.window_sql(true));
        let mut controller = Controller::new(&sizing(self.batch), None);
        let (mut cursor, mut keys) = (None::<Key>, 0);
        loop {
            let (started, size) = (Instant::now(), controller.size());
            let sql = if cursor.is_some() { &next } else { &first };
            let Some(window) = self.window(sql, cursor.as_ref(), &upper, size).await? else {
                return Ok(keys);
            };
            controller.observe(started.elapsed());
            keys += window.keys;
            self.tally(&window, cursor.as_ref(), findings).await?;
            // A window short of its limit has read the rest of the range.
            if window.keys < size {
                return Ok(keys);
            }
            cursor = Some(window.last);
            tokio::time::sleep(Duration::from_millis(self.batch.sleep_ms as u64)).await;
        }
    }

    /// The largest key now: the walk ends there, so it ends even while rows are inserted.
    async fn upper(&self) -> Result<Option<Key>, CheckError> {
        let row = crate::sql::query(&self.keyset.upper_bound_sql())
            .fetch_optional(self.pool)
            .await
            .map_err(self.err("reading the largest key"))?;
        row.map(|r| Key::from_row(&r, 0, self.keyset.width()))
            .transpose()
            .map_err(self.err("reading the largest key"))
    }

    /// One statement per window: its key count, one count per row check, its last key.
    fn window_sql(&self, has_cursor: bool) -> String {
        let (range, limit) = self.keyset.range(None, has_cursor);
        let flags: String = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| format!(", ({}) AS _bf_c{i}", r.condition))
            .collect();
        let inner = format!(
            "SELECT {cols}{flags} FROM {table} WHERE {range} ORDER BY {order} LIMIT ${limit}",
            cols = self.keyset.columns(None),
            table = self.target.quoted,
            order = self.keyset.order(None, false),
        );
        let counts: Vec<String> = (0..self.rows.len())
            .map(|i| format!("count(*) FILTER (WHERE _bf_c{i})"))
            .collect();
        let counts: Vec<&str> = counts.iter().map(String::as_str).collect();
        self.keyset.summarise(&inner, &counts)
    }

    async fn window(
        &self,
        sql: &str,
        cursor: Option<&Key>,
        upper: &Key,
        size: i64,
    ) -> Result<Option<Window>, CheckError> {
        let bounds: Vec<&Key> = cursor.into_iter().chain([upper]).collect();
        let row = bind_keys(crate::sql::query(sql), &bounds)
            .bind(size)
            .fetch_optional(self.pool)
            .await
            .map_err(self.err("counting violations"))?;
        let Some(row) = row else { return Ok(None) };
        let keys: i64 = row.try_get(0).map_err(self.err("counting violations"))?;
        if keys == 0 {
            return Ok(None);
        }
        let n = self.rows.len();
        let counts = (1..=n)
            .map(|i| row.try_get::<i64, _>(i))
            .collect::<sqlx::Result<Vec<_>>>()
            .map_err(self.err("counting violations"))?;
        let last = Key::from_row(&row, 1 + n, self.keyset.width())
            .map_err(self.err("counting violations"))?;
        Ok(Some(Window { keys, counts, last }))
    }

    /// Adds a window's counts to the findings, sampling offending keys while a check has fewer
    /// than `SAMPLES` (so at most that many extra statements per check).
    async fn tally(
        &self,
        window: &Window,
        cursor: Option<&Key>,
        findings: &mut [Finding],
    ) -> Result<(), CheckError> {
        for (check, &count) in self.rows.iter().zip(&window.counts) {
            let finding = &mut findings[check.finding];
            let shown = match &check.tally {
                Tally::RowsWithNull => {
                    *finding.rows_with_null.get_or_insert(0) += count;
                    continue;
                }
                Tally::Violations { shown } => shown.as_deref(),
            };
            finding.violations += count;
            let wanted = SAMPLES - finding.samples.len() as i64;
            if count > 0 && wanted > 0 {
                let found = self
                    .samples(check, shown, cursor, &window.last, wanted)
                    .await?;
                finding.samples.extend(found);
            }
        }
        Ok(())
    }

    /// Up to `limit` offending keys of the window `(cursor, last]`, in key order.
    async fn samples(
        &self,
        check: &RowCheck,
        shown: Option<&str>,
        cursor: Option<&Key>,
        last: &Key,
        limit: i64,
    ) -> Result<Vec<Value>, CheckError> {
        let (range, limit_param) = self.keyset.range(None, cursor.is_some());
        let value = shown.map_or(String::new(), |v| format!(", 'value', {v}"));
        let sql = format!(
            "SELECT jsonb_build_object('key', jsonb_build_array({keys}){value}) FROM {table}
             WHERE {range} AND ({condition}) ORDER BY {order} LIMIT ${limit_param}",
            keys = self.keyset.as_text(),
            table = self.target.quoted,
            condition = check.condition,
            order = self.keyset.order(None, false),
        );
        let bounds: Vec<&Key> = cursor.into_iter().chain([last]).collect();
        let rows = bind_keys(crate::sql::query(&sql), &bounds)
            .bind(limit)
            .fetch_all(self.pool)
            .await
            .map_err(self.err("sampling violations"))?;
        rows.iter()
            .map(|r| r.try_get::<Value, _>(0))
            .collect::<sqlx::Result<Vec<_>>>()
            .map_err(self.err("sampling violations"))
    }
}

/// Counts the duplicate groups of `columns` (and their rows, with samples of the largest) in one
/// grouped statement over the whole table, bounded by the session's `statement_timeout` (the
/// pool's default, `batch.statement_timeout`).
///
/// Why not keyset windows over the table's key: duplicates span windows, so a count per window
/// misses them. Walking the columns' own values in keyset order (`GROUP BY … ORDER BY … LIMIT n`
/// after the last value seen) would find every group window by window, but only with an index led
/// by those columns, which a table about to get its first unique index usually lacks, and without
/// one every window is a scan of the whole table. The one statement reads the table once, as the
/// `CREATE UNIQUE INDEX` it gates will; it takes only an ACCESS SHARE lock, so it blocks no reads
/// or writes; and the timeout turns a table too large for it into a clear error, not an hour-long
/// query.
async fn duplicates(
    pool: &Db,
    target: &Target,
    columns: &[Column],
    timeout: Duration,
    finding: &mut Finding,
) -> Result<(), CheckError> {
    let cols = column_list(columns.iter().map(|c| c.name.as_str()));
    let texts: Vec<String> = columns
        .iter()
        .map(|c| format!("{}::text", quote_ident(&c.name)))
        .collect();
    let sql = format!(
        "WITH dup AS (
             SELECT {cols}, count(*) AS _bf_rows FROM {table}
             WHERE NOT {any_null} GROUP BY {cols} HAVING count(*) > 1
         ),
         top AS (
             SELECT _bf_rows, {cols},
                    jsonb_build_object('value', jsonb_build_array({texts}), 'rows', _bf_rows) AS _bf_s
             FROM dup ORDER BY _bf_rows DESC, {cols} LIMIT $1
         )
         SELECT (SELECT count(*) FROM dup), (SELECT coalesce(sum(_bf_rows), 0)::bigint FROM dup),
                (SELECT coalesce(jsonb_agg(_bf_s ORDER BY _bf_rows DESC, {cols}), '[]') FROM top)",
        table = target.quoted,
        any_null = any_null(columns),
        texts = texts.join(", "),
    );
    let (groups, rows, samples): (i64, i64, Value) = crate::sql::query_as(&sql)
        .bind(SAMPLES)
        .fetch_one(pool)
        .await
        .map_err(|e| duplicates_error(target, &cols, timeout, e))?;
    finding.violations = groups;
    finding.duplicate_rows = Some(rows);
    finding.samples = match samples {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    Ok(())
}

fn duplicates_error(target: &Target, cols: &str, timeout: Duration, e: sqlx::Error) -> CheckError {
    let error = JobError::sql(LABEL, &target.display(), "counting duplicates", e);
    if error.sqlstate() == Some("57014") {
        return CheckError::UniqueTimedOut {
            table: target.display(),
            columns: cols.to_owned(),
            timeout: humantime::format_duration(timeout).to_string(),
        };
    }
    CheckError::Sql(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_statement_reads_as_the_checks_not_a_jobs() {
        let e = JobError::sql(LABEL, "public.t", "connecting", sqlx::Error::PoolTimedOut);
        let message = CheckError::Sql(e).to_string();
        assert!(
            message.starts_with("check on public.t: connecting failed: "),
            "{message}"
        );
    }

    #[test]
    fn command_line_checks_parse() {
        let cases: [(&str, Option<Check>); 5] = [
            (
                "public.customers(id)",
                Some(Check::Orphans {
                    column: "customer_id".into(),
                    parent: "public.customers".into(),
                    parent_column: "id".into(),
                }),
            ),
            (
                " \"Odd (name)\"( Id ) ",
                Some(Check::Orphans {
                    column: "customer_id".into(),
                    parent: "\"Odd (name)\"".into(),
                    parent_column: "Id".into(),
                }),
            ),
            ("customers", None),
            ("customers()", None),
            ("(id)", None),
        ];
        for (given, expected) in cases {
            assert_eq!(
                Check::orphans("customer_id", given).ok(),
                expected,
                "{given}"
            );
        }
        assert_eq!(
            Check::unique("tenant_id, email").ok(),
            Some(Check::Unique(vec!["tenant_id".into(), "email".into()]))
        );
        assert_eq!(
            Check::unique(r#"tenant_id,"last, first""#).ok(),
            Some(Check::Unique(vec![
                "tenant_id".into(),
                "last, first".into()
            ]))
        );
        assert_eq!(
            Check::unique(r#"tenant_id, "E-Mail ""Work""""#).ok(),
            Some(Check::Unique(vec![
                "tenant_id".into(),
                r#"E-Mail "Work""#.into()
            ]))
        );
        assert_eq!(
            Check::not_null(" \"Unit Price\" "),
            Check::NotNull("Unit Price".into())
        );
        assert!(Check::unique("a,,b").is_err());
    }

    #[test]
    fn null_tests_follow_what_a_constraint_sees() {
        let col = |scalar| Column {
            name: "c".into(),
            sql_type: "t".into(),
            generated: false,
            generated_from: Vec::new(),
            identity_always: false,
            scalar,
        };
        assert_eq!(is_null("\"c\"", &col(true)), "\"c\" IS NULL");
        assert_eq!(
            is_null("\"c\"", &col(false)),
            "\"c\" IS NOT DISTINCT FROM NULL"
        );
        assert_eq!(
            any_null(&[col(true), col(true)]),
            "(\"c\" IS NULL OR \"c\" IS NULL)"
        );
    }
}
