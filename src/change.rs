//! The kinds of data change a batch applies to one window of keys `(cursor, hi]`. Each kind
//! renders its statement once per job run; every statement takes the window bounds as its only
//! parameters (`$1..$k` the cursor when present, then the window's last key) and reports the rows
//! it changed as its affected-row count.
//!
//! **Invariant:** every write repeats the job's predicate, so a row that live traffic changed
//! between the window read and the write is re-checked by PostgreSQL and never clobbered.

mod delete;
mod insert;
mod revert;
mod update;

pub use delete::Delete;
pub use insert::{Insert, checked_fragments as checked_insert_fragments};
pub use revert::Revert;
pub use update::Update;

use crate::keyset::Keyset;

#[derive(Debug, Clone)]
pub enum Change {
    Update(Update),
    Delete(Delete),
    Revert(Revert),
    Insert(Insert),
}

impl Change {
    /// The statement for a window with or without a lower bound.
    pub fn statement(&self, has_cursor: bool) -> &str {
        let pair = match self {
            Change::Update(c) => &c.statements,
            Change::Delete(c) => &c.statements,
            Change::Revert(c) => &c.statements,
            Change::Insert(c) => &c.statements,
        };
        if has_cursor {
            &pair.with_cursor
        } else {
            &pair.first
        }
    }

    /// The statement to redo a batch with when the primary one reported a race; only archiving
    /// updates have one (their primary statement is optimistic and returns `(captured, changed)`).
    pub fn locked_statement(&self, has_cursor: bool) -> Option<&str> {
        match self {
            Change::Update(Update {
                locked: Some(pair), ..
            }) => Some(pair.get(has_cursor)),
            _ => None,
        }
    }

    /// Archiving updates join the window to the table by `ctid`; a nested loop of TID fetches is
    /// the cheap plan for that, and the batch transaction disables hash and merge joins for it.
    pub fn wants_nested_loop(&self) -> bool {
        self.locked_statement(false).is_some()
    }

    /// The table's columns an archiving update's or delete's images were written for: each
    /// batch checks them before it commits (see `archive::layout`).
    pub fn watched(&self) -> Option<&crate::archive::Watched> {
        match self {
            Change::Update(c) => c.watched.as_ref(),
            Change::Delete(c) => c.watched.as_ref(),
            _ => None,
        }
    }

    /// Reverts count the window rows they did not restore (changed again since the backfill).
    pub fn counts_skipped(&self) -> bool {
        matches!(self, Change::Revert(_))
    }
}

/// A statement rendered for the first window (no cursor) and for every later one.
#[derive(Debug, Clone)]
pub struct Statements {
    first: String,
    with_cursor: String,
}

impl Statements {
    fn get(&self, has_cursor: bool) -> &str {
        if has_cursor {
            &self.with_cursor
        } else {
            &self.first
        }
    }

    /// Renders `build(range_condition)` for both cursor shapes; the condition selects the keys
    /// `(cursor, hi]`. `alias` qualifies the key columns in it.
    fn render(keyset: &Keyset, alias: Option<&str>, build: impl Fn(&str) -> String) -> Self {
        Self::render_each(keyset, &[alias], |ranges| build(&ranges[0]))
    }

    /// Like `render`, with one range condition per alias, all bound to the same parameters: for
    /// a statement that joins two tables on the key and bounds both by the window.
    fn render_each(
        keyset: &Keyset,
        aliases: &[Option<&str>],
        build: impl Fn(&[String]) -> String,
    ) -> Self {
        let statement = |has_cursor: bool| {
            let ranges: Vec<String> = aliases
                .iter()
                .map(|alias| keyset.range(*alias, has_cursor).0)
                .collect();
            build(&ranges)
        };
        Self {
            first: statement(false),
            with_cursor: statement(true),
        }
    }
}
