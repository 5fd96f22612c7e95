//! `action = 'insert'`: `INSERT INTO <table_name> (…) SELECT … FROM <source_table> WHERE <window>
//! AND (<predicate>) ON CONFLICT DO NOTHING`, walking the source's keys. Idempotent: a row whose
//! key (any unique constraint of the target) exists already is skipped, so a second run inserts
//! nothing. With an archive, the statement's `RETURNING` records each inserted row's key and its
//! whole row as text, in the same statement: a revert deletes exactly those rows, and skips one
//! that changed since (or that someone else re-inserted under the same key).
//!
//! A source row whose target row exists already is not pending: [`pending_predicate`] adds to
//! the predicate a `NOT EXISTS` per unique key of the target that the set clause assigns in full,
//! so the plan's count, `remaining`, `wait` and the idempotency check see the conflicts that `ON
//! CONFLICT DO NOTHING` would skip, even for a predicate such as `true` (a copy into a new table).
//! The batches write with the job's own predicate: `ON CONFLICT` skips those rows anyway, and a
//! second probe per row cost a 2M-row copy 24 %.

use super::Statements;
use crate::archive::ArchiveTable;
use crate::fragment::{FragmentError, Fragments, ServerCheck, insert_select};
use crate::keyset::Keyset;
use crate::sql::quote_ident;
use crate::target::{Conflicts, Target, UniqueIndex};
use sqlx::PgConnection;

#[derive(Debug, Clone)]
pub struct Insert {
    pub(super) statements: Statements,
}

impl Insert {
    /// `keyset` walks `source`; rows go into `into`.
    pub fn new(
        source: &Target,
        into: &Target,
        keyset: &Keyset,
        fragments: &Fragments,
        archive: Option<&ArchiveTable>,
    ) -> Self {
        let statements = Statements::render(keyset, None, |range| {
            let insert = insert_select(source, into, fragments, range);
            match archive {
                None => insert,
                Some(a) => archived(into, a, &insert),
            }
        });
        Self { statements }
    }
}

fn archived(into: &Target, archive: &ArchiveTable, insert: &str) -> String {
    let keys: Vec<String> = into
        .keys
        .iter()
        .map(|k| format!("{}.{}", into.quoted, quote_ident(&k.name)))
        .collect();
    format!(
        "WITH _bf_new AS ({insert} RETURNING {keys}, to_jsonb({into}.*)::text)
         INSERT INTO {archive} ({cols}) SELECT * FROM _bf_new",
        keys = keys.join(", "),
        into = into.quoted,
        archive = archive.quoted,
        cols = archive.insert_columns(),
    )
}

/// The unique indexes of the insert's target whose conflicts `ON CONFLICT DO NOTHING` skips: not
/// deferrable (plain columns and not partial, as every [`UniqueIndex`] is), and where deferrable
/// constraints make the statement name its arbiter ([`Conflicts::On`]), that one only: a
/// source row that conflicts on another key fails the batch, so it is not already inserted.
async fn unique_keys(conn: &mut PgConnection, into: &Target) -> sqlx::Result<Vec<UniqueIndex>> {
    let mut all = crate::target::unique_indexes(conn, into.oid).await?;
    // A bare `ON CONFLICT DO NOTHING` skips conflicts with partial unique indexes too.
    if into.conflicts == Conflicts::Any {
        all.extend(crate::target::partial_unique_indexes(conn, into.oid).await?);
    }
    let arbiter = |k: &UniqueIndex| match &into.conflicts {
        Conflicts::Any => true,
        Conflicts::On(columns) => &k.columns == columns,
        Conflicts::Deferred(keys) => keys.first() == Some(&k.columns),
    };
    Ok(all
        .into_iter()
        .filter(|k| k.immediate && arbiter(k))
        .collect())
}

/// Where the target's keys are deferrable ([`Conflicts::Deferred`]), the unique key the insert
/// names in `ON CONFLICT`: the first (not deferrable, on NOT NULL columns) that the set clause
/// assigns in full. A key left to its default (a serial) never conflicts, so rows inserted
/// already would go in again and fail on the deferrable key, and none would ever count as done.
fn arbiter(into: &Target, f: &Fragments) -> Result<Conflicts, FragmentError> {
    let Conflicts::Deferred(keys) = &into.conflicts else {
        return Ok(into.conflicts.clone());
    };
    let assigned = |c: &String| f.assignments.iter().any(|a| &a.column == c);
    keys.iter()
        .find(|k| k.iter().all(assigned))
        .map(|k| Conflicts::On(k.clone()))
        .ok_or_else(|| FragmentError::NoArbiter {
            keys: into
                .keys
                .iter()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// An insert job's fragments, shape-checked and parsed by the server: `(written, counted)`, the
/// job's own, which its batches write with, and those narrowed to the rows still to insert
/// ([`pending`]), which the plan, verification and the idempotency check count with.
pub async fn checked_fragments(
    conn: &mut PgConnection,
    predicate: &str,
    set: &str,
    source: &Target,
    into: &mut Target,
) -> Result<(Fragments, Fragments), ServerCheck> {
    let written = crate::fragment::validate_insert(predicate, set, into)?;
    into.conflicts = arbiter(into, &written)?;
    crate::fragment::validate_insert_on_server(conn, source, into, &written).await?;
    let counted = pending(conn, source, into, &written).await?;
    Ok((written, counted))
}

/// `f` with its predicate narrowed to the source rows still to insert ([`pending_predicate`]),
/// checked by the server like the job's own fragments. If the server rejects the generated part
/// (an assigned expression that compares to no key type), `f` is returned unchanged and the
/// caller's counts include rows whose target row exists.
async fn pending(
    conn: &mut PgConnection,
    source: &Target,
    into: &Target,
    f: &Fragments,
) -> sqlx::Result<Fragments> {
    let keys = unique_keys(conn, into).await?;
    let narrowed = Fragments {
        predicate: pending_predicate(into, f, &keys),
        assignments: f.assignments.clone(),
    };
    if narrowed.predicate == f.predicate {
        return Ok(narrowed);
    }
    match crate::fragment::validate_insert_on_server(conn, source, into, &narrowed).await {
        Ok(()) => Ok(narrowed),
        Err(ServerCheck::Transient(e)) => Err(e),
        Err(ServerCheck::Rejected(e)) => {
            tracing::warn!(
                error = %e,
                table = %into.display(),
                "cannot compare the insert's values with the target's unique keys; counts include rows already inserted"
            );
            Ok(f.clone())
        }
    }
}

/// The insert job's predicate with, for each unique key the set clause assigns in full, `NOT
/// EXISTS` a target row with the values the row would get: the source rows still to insert. The
/// target's columns are renamed inside the subquery (`_bf_u0`, …) so that the assigned
/// expressions' unqualified names keep meaning the source row's columns. Keys the set clause
/// leaves to defaults (a serial id) are skipped: their values are new by construction. A partial
/// index counts the target rows its predicate covers (evaluated inside the subquery, over the
/// target's columns), if the set clause assigns none of the predicate's columns (the new row
/// then takes their defaults, which a soft-delete predicate such as `deleted_at IS NULL` covers).
pub fn pending_predicate(into: &Target, f: &Fragments, keys: &[UniqueIndex]) -> String {
    let assigned = |column: &str| f.assignments.iter().find(|a| a.column == column);
    let absent: Vec<String> = keys
        .iter()
        .filter(|key| key.only_columns.iter().all(|c| assigned(c).is_none()))
        .filter_map(|key| {
            let exprs: Vec<_> = key
                .columns
                .iter()
                .map(|c| assigned(c))
                .collect::<Option<_>>()?;
            let renamed: Vec<String> = key
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{} AS _bf_u{i}", quote_ident(c)))
                .collect();
            let equal = if key.nulls_not_distinct {
                "IS NOT DISTINCT FROM"
            } else {
                "="
            };
            let matches: Vec<String> = exprs
                .iter()
                .zip(&key.declared_types)
                .enumerate()
                .map(|(i, (a, ty))| {
                    let ty = untruncated(ty);
                    format!("_bf_t._bf_u{i} {equal} CAST(({}) AS {ty})", a.expr)
                })
                .collect();
            // `OFFSET 0` keeps the subquery a per-row probe of the key's index: as an anti-join
            // the planner hashes the whole target once a window is large (measured: a 35k-row
            // window of a 2M-row copy took 400 ms instead of 32 ms), so counting would cost the
            // target's size per window instead of the window's.
            let only = key
                .only
                .as_ref()
                .map_or(String::new(), |p| format!(" WHERE {p}"));
            Some(format!(
                "NOT EXISTS (SELECT 1 FROM (SELECT {} FROM {}{only}) AS _bf_t WHERE {} OFFSET 0)",
                renamed.join(", "),
                into.quoted,
                matches.join(" AND ")
            ))
        })
        .collect();
    if absent.is_empty() {
        return f.predicate.clone();
    }
    format!("({}) AND {}", f.predicate, absent.join(" AND "))
}

/// The type a value is compared as with a key of declared type `ty`: as the INSERT would store
/// it, except that an explicit cast to `character varying(n)` cuts a longer value to `n`
/// characters where the INSERT's assignment fails (22001), so a source row `c05X` would count as
/// already inserted under the key `c05`. Compared unbounded, it counts as still to insert, as
/// it is: its batch fails with 22001, where the plan had called the job idempotent.
fn untruncated(ty: &str) -> &str {
    match ty.strip_prefix("character varying(") {
        Some(rest) if rest.ends_with(')') && !rest.contains('[') => "character varying",
        _ => ty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fragment::Assignment;

    fn key(columns: &[&str], nulls_not_distinct: bool) -> UniqueIndex {
        UniqueIndex {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            types: columns.iter().map(|_| "int8".to_string()).collect(),
            declared_types: columns.iter().map(|_| "bigint".to_string()).collect(),
            not_null: !nulls_not_distinct,
            nulls_not_distinct,
            immediate: true,
            only: None,
            only_columns: Vec::new(),
        }
    }

    #[test]
    fn pending_rows_exclude_keys_assigned_in_full_and_skip_the_rest() {
        let into = Target {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            quoted: "\"public\".\"t\"".into(),
            keys: Vec::new(),
            columns: Vec::new(),
            partitioned: false,
            conflicts: Default::default(),
        };
        let f = Fragments {
            predicate: "true".into(),
            assignments: vec![Assignment {
                column: "user_id".into(),
                expr: "id".into(),
            }],
        };
        let serial_only = [key(&["id"], false)];
        assert_eq!(pending_predicate(&into, &f, &serial_only), "true");
        let keys = [key(&["id"], false), key(&["user_id"], true)];
        assert_eq!(
            pending_predicate(&into, &f, &keys),
            "(true) AND NOT EXISTS (SELECT 1 FROM (SELECT \"user_id\" AS _bf_u0 FROM \"public\".\"t\") \
             AS _bf_t WHERE _bf_t._bf_u0 IS NOT DISTINCT FROM CAST((id) AS bigint) OFFSET 0)"
        );
        let live = UniqueIndex {
            only: Some("(deleted_at IS NULL)".into()),
            only_columns: vec!["deleted_at".into()],
            ..key(&["user_id"], false)
        };
        assert!(
            pending_predicate(&into, &f, std::slice::from_ref(&live))
                .contains("FROM \"public\".\"t\" WHERE (deleted_at IS NULL)) AS _bf_t"),
            "a partial index counts the rows its predicate covers"
        );
        let reviving = Fragments {
            assignments: vec![
                f.assignments[0].clone(),
                Assignment {
                    column: "deleted_at".into(),
                    expr: "NULL".into(),
                },
            ],
            ..f.clone()
        };
        assert_eq!(
            pending_predicate(&into, &reviving, &[live]),
            "true",
            "unless the insert assigns the predicate's columns"
        );
    }
}
