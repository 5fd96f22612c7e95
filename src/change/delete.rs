//! `action = 'delete'`: `DELETE … WHERE <window> AND (<predicate>)`, archiving whole rows first —
//! in the same statement, from `RETURNING`, so the archived row is exactly the deleted version.

use super::Statements;
use crate::archive::{ArchiveTable, Watched};
use crate::keyset::Keyset;
use crate::sql::quote_ident;
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Delete {
    pub(super) statements: Statements,
    /// With an archive: the columns its images were written for.
    pub(super) watched: Option<Watched>,
}

impl Delete {
    pub fn new(
        target: &Target,
        keyset: &Keyset,
        predicate: &str,
        archive: Option<&ArchiveTable>,
    ) -> Self {
        let statements = Statements::render(keyset, None, |range| {
            let delete = format!(
                "DELETE FROM {} WHERE {range} AND ({predicate})",
                target.quoted
            );
            match archive {
                None => delete,
                Some(a) => {
                    // Named columns, not `*`: a column added to the table while the job runs
                    // (or since the archive was made, for a later attempt) is not the archive's.
                    let cols: Vec<&str> = target
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .filter(|c| a.holds(c))
                        .collect();
                    let returned: Vec<String> = cols
                        .iter()
                        .map(|c| format!("{}.{}", target.quoted, quote_ident(c)))
                        .collect();
                    format!(
                        "WITH _bf_gone AS ({delete} RETURNING {returned})
                         INSERT INTO {archive} ({cols}) SELECT * FROM _bf_gone",
                        returned = returned.join(", "),
                        archive = a.quoted,
                        cols = crate::target::column_list(cols.iter().copied()),
                    )
                }
            }
        });
        Self {
            statements,
            watched: archive.and_then(|a| a.watched(target)),
        }
    }
}
