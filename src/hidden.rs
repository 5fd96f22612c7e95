//! What a job's plan cannot see in its own statements, and says in `plan.warnings`: rules that
//! rewrite its writes, user triggers that fire on its writes (a BEFORE trigger that changes the row, or one that writes
//! or deletes other rows: neither is in the archive, and a revert cannot undo it), and row-level
//! security that hides rows from the daemon's role (the job changes only the rows its policies
//! let it see; `remaining` does not count the others).

use crate::db::Db;
use crate::target::Target;

/// The write a job does to `target`: `INSERT`, `UPDATE` or `DELETE`.
pub type Event = &'static str;

/// The plan's warnings about `target` for a job writing `event`.
pub async fn warnings(pool: &Db, target: &Target, event: Event) -> sqlx::Result<Vec<String>> {
    let mut found = Vec::new();
    if let Some(triggers) = triggers(pool, target, event).await? {
        found.push(format!(
            "{} has triggers that fire on this job's {event}s: {triggers}. A BEFORE trigger that \
             changes the row, or a trigger that writes or deletes other rows, is not in the \
             archive: the job's counts and its revert do not cover what they do",
            target.display()
        ));
    }
    if let Some(rules) = rules(pool, target, event).await? {
        found.push(format!(
            "{} has rules on this job's {event}s: {rules}. A rule rewrites the job's statements \
             (DO INSTEAD NOTHING skips every row, and the job then ends with rows remaining); \
             the job's counts, archive and revert see only what the rewritten statement returns",
            target.display()
        ));
    }
    if let Some(role) = row_security(pool, target).await? {
        found.push(format!(
            "row-level security on {} applies to role {role}: the job changes only the rows its \
             policies let that role see and write, and counts only those",
            target.display()
        ));
    }
    Ok(found)
}

/// `name (BEFORE ROW)`, … for the enabled user triggers on `event`; `None` without any.
async fn triggers(pool: &Db, target: &Target, event: Event) -> sqlx::Result<Option<String>> {
    // pg_trigger.tgtype bits: ROW 1, BEFORE 2, INSERT 4, DELETE 8, UPDATE 16, INSTEAD 64.
    let bit: i32 = match event {
        "INSERT" => 4,
        "DELETE" => 8,
        _ => 16,
    };
    crate::sql::query_scalar(
        "SELECT string_agg(format('%s (%s %s)', t.tgname,
                    CASE WHEN t.tgtype & 2 <> 0 THEN 'BEFORE'
                         WHEN t.tgtype & 64 <> 0 THEN 'INSTEAD OF' ELSE 'AFTER' END,
                    CASE WHEN t.tgtype & 1 <> 0 THEN 'ROW' ELSE 'STATEMENT' END),
                    ', ' ORDER BY t.tgname)
         FROM pg_trigger t
         WHERE t.tgrelid = $1::oid AND NOT t.tgisinternal AND t.tgenabled <> 'D'
           AND t.tgtype & $2 <> 0",
    )
    .bind(target.oid as i64)
    .bind(bit)
    .fetch_one(pool)
    .await
}

/// `name (INSTEAD)`, … for the enabled rules on `event`; `None` without any.
async fn rules(pool: &Db, target: &Target, event: Event) -> sqlx::Result<Option<String>> {
    // pg_rewrite.ev_type: '2' UPDATE, '3' INSERT, '4' DELETE ('1' SELECT: a view's _RETURN).
    let kind = match event {
        "INSERT" => "3",
        "DELETE" => "4",
        _ => "2",
    };
    crate::sql::query_scalar(
        "SELECT string_agg(format('%s (%s)', r.rulename,
                    CASE WHEN r.is_instead THEN 'INSTEAD' ELSE 'ALSO' END), ', ' ORDER BY r.rulename)
         FROM pg_rewrite r
         WHERE r.ev_class = $1::oid AND r.ev_type = $2::\"char\" AND r.ev_enabled <> 'D'",
    )
    .bind(target.oid as i64)
    .bind(kind)
    .fetch_one(pool)
    .await
}

/// The connected role, when row-level security applies to it on `target` (enabled, and the role
/// neither a superuser nor `BYPASSRLS`, nor the owner unless the table forces it on its owner):
/// PostgreSQL's own `row_security_active`, which the job's pins compare too (`pin`).
async fn row_security(pool: &Db, target: &Target) -> sqlx::Result<Option<String>> {
    crate::sql::query_scalar("SELECT current_user::text WHERE row_security_active($1::int8::oid)")
        .bind(target.oid as i64)
        .fetch_optional(pool)
        .await
}
