//! `action = 'insert'`: `INSERT INTO <table_name> (…) SELECT … FROM <source_table> WHERE <window>
//! AND (<predicate>) ON CONFLICT DO NOTHING`, walking the source's keys. Idempotent: a row whose
//! key (any unique constraint of the target) exists already is skipped, so a second run inserts
//! nothing. With an archive, the statement's `RETURNING` records each inserted row's key and its
//! whole row as text, in the same statement: a revert deletes exactly those rows, and skips one
//! that changed since (or that someone else re-inserted under the same key).

use super::Statements;
use crate::archive::ArchiveTable;
use crate::fragment::{Fragments, insert_select};
use crate::keyset::Keyset;
use crate::sql::quote_ident;
use crate::target::Target;

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
        "WITH _bf_new AS ({insert} RETURNING {keys}, ROW({into}.*)::text)
         INSERT INTO {archive} ({cols}) SELECT * FROM _bf_new",
        keys = keys.join(", "),
        into = into.quoted,
        archive = archive.quoted,
        cols = archive.insert_columns(),
    )
}
