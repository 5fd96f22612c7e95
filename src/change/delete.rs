//! `action = 'delete'`: `DELETE … WHERE <window> AND (<predicate>)`, archiving whole rows first —
//! in the same statement, from `RETURNING`, so the archived row is exactly the deleted version.

use super::Statements;
use crate::archive::ArchiveTable;
use crate::keyset::Keyset;
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Delete {
    pub(super) statements: Statements,
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
                Some(a) => format!(
                    "WITH _bf_gone AS ({delete} RETURNING {table}.*)
                     INSERT INTO {archive} SELECT * FROM _bf_gone",
                    table = target.quoted,
                    archive = a.quoted,
                ),
            }
        });
        Self { statements }
    }
}
