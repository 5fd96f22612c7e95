//! The checklist's "run it twice, the second run must change zero rows", checked in the plan
//! before any data changes: in a transaction that is always rolled back, the change is applied to
//! a sample of the rows it selects, and the predicate is evaluated again on the changed rows. A
//! predicate that still selects them means a second run would change them again. It warns; it
//! does not block (some changes are meant to be applied once per run, by design of the job). The
//! trial is also the first time the change meets real rows: when it fails on them (a constraint,
//! a bad cast), the error is returned and the plan fails, as every batch reaching them would.

use crate::db::Db;
use serde::{Deserialize, Serialize};

use crate::fragment::{Fragments, render_assignments};
use crate::keyset::{Key, Keyset, bind_keys};
use crate::sql::quote_ident;
use crate::target::Target;

/// What the plan says about running the job twice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Verdict {
    /// Sample rows the change was applied to (and rolled back).
    pub sampled: i64,
    /// Of those, rows the predicate still selects after the change.
    pub still_selected: i64,
    /// `None` when the check could not run (then `summary` says why).
    pub idempotent: Option<bool>,
    pub summary: String,
    /// The check itself failed (as opposed to finding no row to check). Only logged, not stored.
    #[serde(skip)]
    failed: bool,
}

impl Verdict {
    /// Worth a warning in the log: not idempotent, or not checked because the check failed (a
    /// plan with no matching row has nothing to check and says so without a warning).
    pub fn warns(&self) -> bool {
        self.idempotent == Some(false) || self.failed
    }

    /// The verdict on `(sampled, still selected)`, or on the error that stopped the check; an
    /// error of the change itself on the sampled data is returned (see [`rejects_data`]).
    fn from_result(result: sqlx::Result<(i64, i64)>) -> sqlx::Result<Self> {
        match result {
            Ok((sampled, still)) => Ok(Self::measured(sampled, still)),
            Err(e) if rejects_data(&e) => Err(e),
            Err(e) => Ok(Self {
                summary: format!("could not check: {e}"),
                failed: true,
                ..Self::default()
            }),
        }
    }

    fn measured(sampled: i64, still_selected: i64) -> Self {
        let summary = match (sampled, still_selected) {
            (0, _) => "no row matches the predicate: nothing to check".to_owned(),
            (n, 0) => format!(
                "idempotent: the predicate selects none of the {n} sampled rows after the change"
            ),
            (n, m) => format!(
                "the predicate still selects {m} of {n} sampled rows after the change: \
                 not idempotent (a second run would change them again)"
            ),
        };
        Self {
            sampled,
            still_selected,
            idempotent: (sampled > 0).then_some(still_selected == 0),
            summary,
            failed: false,
        }
    }
}

/// Whether the trial change failed on the data itself: a data exception or an integrity
/// violation (SQLSTATE class 22 or 23: a NULL into a NOT NULL column, a CHECK, a duplicate, a bad
/// cast), which every batch reaching those rows would hit as well. Other errors (a lock or
/// statement timeout, a privilege) only mean the check could not run.
fn rejects_data(e: &sqlx::Error) -> bool {
    let code = e.as_database_error().and_then(|db| db.code());
    code.is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
}

/// Applies the update to up to `limit` rows the predicate selects (keys up to `upper`) in a
/// transaction it rolls back, and counts the rows the predicate still selects. `Err` is the
/// change failing on the sampled data (see [`rejects_data`]).
pub async fn check(
    pool: &Db,
    target: &Target,
    keyset: &Keyset,
    fragments: &Fragments,
    upper: &Key,
    limit: i64,
) -> sqlx::Result<Verdict> {
    let sql = statement(target, keyset, fragments);
    let measured = async {
        let mut tx = pool.begin().await?;
        let rows: Vec<bool> = bind_keys(crate::sql::query(&sql), &[upper])
            .bind(limit)
            .try_map(|row: sqlx::postgres::PgRow| sqlx::Row::try_get(&row, 0))
            .fetch_all(&mut *tx)
            .await?;
        tx.rollback().await?;
        let still = rows.iter().filter(|selected| **selected).count();
        Ok::<_, sqlx::Error>((rows.len() as i64, still as i64))
    };
    Verdict::from_result(measured.await)
}

/// For an insert job: inserts the rows of up to `limit` source rows the predicate selects (keys
/// up to `upper`) in a transaction it rolls back, then evaluates the predicate again over the same
/// stretch of source keys. A predicate that still selects them (no `NOT EXISTS`, and no unique
/// key of the target that the set clause assigns in full) would insert them again. `Err` is the
/// insert failing on the sampled data (see [`rejects_data`]).
pub async fn check_insert(
    pool: &Db,
    source: &Target,
    into: &Target,
    keyset: &Keyset,
    fragments: &Fragments,
    upper: &Key,
    limit: i64,
) -> sqlx::Result<Verdict> {
    let (insert, recount) = insert_statements(source, into, keyset, fragments);
    let measured = async {
        let mut tx = pool.begin().await?;
        let row = bind_keys(crate::sql::query(&insert), &[upper])
            .bind(limit)
            .fetch_one(&mut *tx)
            .await?;
        let sampled: i64 = sqlx::Row::try_get(&row, 0)?;
        let still = if sampled == 0 {
            0
        } else {
            let last = Key::from_row(&row, 1, keyset.width())?;
            let counted = bind_keys(crate::sql::query(&recount), &[&last])
                .fetch_one(&mut *tx)
                .await?;
            sqlx::Row::try_get::<i64, _>(&counted, 0)?
        };
        tx.rollback().await?;
        Ok::<_, sqlx::Error>((sampled, still))
    };
    Verdict::from_result(measured.await)
}

/// The sample's insert (returning how many source rows it covered and the last one's key) and
/// the recount of the rows the predicate selects up to that key afterwards.
fn insert_statements(
    source: &Target,
    into: &Target,
    keyset: &Keyset,
    fragments: &Fragments,
) -> (String, String) {
    let table = &source.quoted;
    let (range, _) = keyset.range(None, false);
    let pred = &fragments.predicate;
    let sample = first_selected(table, keyset, pred, &keyset.columns(None));
    let chosen = format!(
        "{} IN (SELECT {} FROM _bf_s)",
        keyset.row(None),
        keyset.columns(None)
    );
    let insert = format!(
        "WITH _bf_s AS MATERIALIZED ({sample}), _bf_i AS ({insert})
         SELECT * FROM ({summary}) AS _bf_r",
        insert = crate::fragment::insert_select(source, into, fragments, &chosen),
        summary = keyset.summarise("SELECT * FROM _bf_s", &[]),
    );
    // The predicate in WHERE, where PostgreSQL may join a subquery rather than run it per row.
    let recount = format!("SELECT count(*) FROM {table} WHERE {range} AND ({pred})");
    (insert, recount)
}

/// `WITH _bf_s AS (keys of the first rows selected) UPDATE … FROM _bf_s RETURNING (predicate)`:
/// `RETURNING` sees the changed row, so it is the predicate after the change.
fn statement(target: &Target, keyset: &Keyset, fragments: &Fragments) -> String {
    let table = &target.quoted;
    let keys: Vec<String> = target
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} AS _bf_k{i}", quote_ident(&k.name)))
        .collect();
    let join: Vec<String> = target
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{table}.{} = _bf_s._bf_k{i}", quote_ident(&k.name)))
        .collect();
    format!(
        "WITH _bf_s AS ({sample})
         UPDATE {table} SET {set} FROM _bf_s WHERE {join}
         RETURNING coalesce(({pred}), false)",
        sample = first_selected(table, keyset, &fragments.predicate, &keys.join(", ")),
        pred = fragments.predicate,
        set = render_assignments(&fragments.assignments),
        join = join.join(" AND "),
    )
}

/// `SELECT <columns>` of the first rows (in key order, keys up to `$1…`) the predicate selects,
/// at most `$n`: the sample both checks apply their change to.
fn first_selected(table: &str, keyset: &Keyset, predicate: &str, columns: &str) -> String {
    let (range, limit) = keyset.range(None, false);
    format!(
        "SELECT {columns} FROM {table} WHERE {range} AND ({predicate})
         ORDER BY {order} LIMIT ${limit}",
        order = keyset.order(None, false),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_say_what_a_second_run_would_do() {
        assert_eq!(Verdict::measured(10, 0).idempotent, Some(true));
        let not = Verdict::measured(10, 10);
        assert_eq!(not.idempotent, Some(false));
        assert!(
            not.summary
                .contains("still selects 10 of 10 sampled rows after the change: not idempotent"),
            "{}",
            not.summary
        );
        assert_eq!(Verdict::measured(0, 0).idempotent, None);
        assert!(
            !Verdict::measured(0, 0).warns(),
            "nothing to check is no warning"
        );
        assert!(not.warns() && !Verdict::measured(10, 0).warns());
    }
}
