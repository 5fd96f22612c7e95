//! Keyset pagination over a target's key columns: the cursor, the frozen upper bound, and the SQL
//! that walks the key range in key order with row-value comparisons (never OFFSET).

use serde_json::Value;

use crate::sql::quote_ident;
use crate::target::{KeyColumn, Target};

/// A position in the key space: each key column's value in its exact `::text` form. Stored in
/// the job row as a JSON array of strings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Key(pub Vec<String>);

impl std::fmt::Display for Key {
    /// `(42)`, `(7, ab)`: the key columns' text forms.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<&str> = self.0.iter().map(String::as_str).collect();
        write!(f, "({})", parts.join(", "))
    }
}

impl Key {
    pub fn to_json(&self) -> Value {
        Value::Array(self.0.iter().cloned().map(Value::String).collect())
    }

    /// Reads `width` text columns starting at column `first` of a result row.
    pub fn from_row(row: &sqlx::postgres::PgRow, first: usize, width: usize) -> sqlx::Result<Key> {
        use sqlx::Row;
        (first..first + width)
            .map(|i| row.try_get::<String, _>(i))
            .collect::<sqlx::Result<Vec<_>>>()
            .map(Key)
    }

    /// Reads a key stored by `to_json`; `None` for a missing or malformed value.
    pub fn from_json(value: &Value, width: usize) -> Option<Key> {
        let items = value.as_array()?;
        if items.len() != width {
            return None;
        }
        items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(Key)
    }
}

/// The SQL pieces for one target's keys. Built once per job run and reused by every batch.
#[derive(Debug, Clone)]
pub struct Keyset {
    keys: Vec<KeyColumn>,
    table: String,
}

impl Keyset {
    pub fn new(target: &Target) -> Self {
        Self {
            keys: target.keys.clone(),
            table: target.quoted.clone(),
        }
    }

    /// The key's column names, in the walk's order.
    pub fn names(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.name.clone()).collect()
    }

    pub fn width(&self) -> usize {
        self.keys.len()
    }

    /// `"a", "b"` with an optional table alias.
    pub fn columns(&self, alias: Option<&str>) -> String {
        self.keys
            .iter()
            .map(|k| match alias {
                Some(a) => format!("{a}.{}", quote_ident(&k.name)),
                None => quote_ident(&k.name),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `ROW("a", "b")`: a row value, so `>`/`<=` compare lexicographically and use the index.
    pub fn row(&self, alias: Option<&str>) -> String {
        format!("ROW({})", self.columns(alias))
    }

    /// `ROW($3::text::bigint, $4::text::text)`: bind parameters cast from their text form.
    pub fn params(&self, first: usize) -> String {
        let casts: Vec<String> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("${}::text::{}", first + i, k.sql_type))
            .collect();
        format!("ROW({})", casts.join(", "))
    }

    /// `"a"::text, "b"::text` to read key values back in their exact text form.
    pub fn as_text(&self) -> String {
        self.keys
            .iter()
            .map(|k| format!("{}::text", quote_ident(&k.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn order(&self, alias: Option<&str>, descending: bool) -> String {
        let dir = if descending { " DESC" } else { "" };
        self.keys
            .iter()
            .map(|k| match alias {
                Some(a) => format!("{a}.{}{dir}", quote_ident(&k.name)),
                None => format!("{}{dir}", quote_ident(&k.name)),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `"a"::text AS _bf_k0, …` for select lists. The alias matters: an output column named like
    /// the key would capture `ORDER BY "a"` and sort by the text form (`'9999' > '10000'`).
    pub fn as_text_output(&self) -> String {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{}::text AS _bf_k{i}", quote_ident(&k.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The largest key now in the table: the upper bound frozen at job start.
    pub fn upper_bound_sql(&self) -> String {
        format!(
            "SELECT {} FROM {} ORDER BY {} LIMIT 1",
            self.as_text_output(),
            self.table,
            self.order(None, true)
        )
    }

    /// The range `(cursor, upper]` as a WHERE condition. Parameters: the cursor (when present)
    /// from `$1`, then the upper bound.
    pub fn range(&self, alias: Option<&str>, has_cursor: bool) -> (String, usize) {
        let row = self.row(alias);
        let width = self.width();
        if has_cursor {
            let cond = format!(
                "{row} > {} AND {row} <= {}",
                self.params(1),
                self.params(1 + width)
            );
            (cond, 1 + 2 * width)
        } else {
            (format!("{row} <= {}", self.params(1)), 1 + width)
        }
    }

    /// Picks the next window of at most `$n` keys after the cursor. Returns one row: the number
    /// of keys in the window and the last key (as text); no row, or a count of 0, when the range is
    /// exhausted. Only key columns are read, so the scan can be index-only.
    pub fn window_sql(&self, has_cursor: bool) -> String {
        let (range, limit) = self.range(None, has_cursor);
        let inner = format!(
            "SELECT {cols} FROM {table} WHERE {range} ORDER BY {order} LIMIT ${limit}",
            cols = self.columns(None),
            table = self.table,
            order = self.order(None, false),
        );
        self.summarise(&inner, &[])
    }

    /// Runs a window query (`window_sql`, for `cursor` or the range's start) of at most `size`
    /// keys up to `upper`: the keys in the window and its last key; `None` when the range is
    /// exhausted.
    pub async fn read_window<'e>(
        &self,
        db: impl sqlx::PgExecutor<'e>,
        sql: &str,
        bounds: (Option<&Key>, &Key),
        size: i64,
    ) -> sqlx::Result<Option<(i64, Key)>> {
        self.read_window_kept(db, (sql, false), bounds, size).await
    }

    /// `read_window`, keeping the statement prepared on the connection when `keep` (see
    /// `Db::keeps_statements`).
    pub async fn read_window_kept<'e>(
        &self,
        db: impl sqlx::PgExecutor<'e>,
        (sql, keep): (&str, bool),
        bounds: (Option<&Key>, &Key),
        size: i64,
    ) -> sqlx::Result<Option<(i64, Key)>> {
        let Some((keys, row)) = fetch_window(db, (sql, keep), bounds, size).await? else {
            return Ok(None);
        };
        Ok(Some((keys, Key::from_row(&row, 1, self.width())?)))
    }

    /// Summarises a key-ordered, limited window query `inner` (selecting the key columns and
    /// whatever `extra` aggregates need) as one row: `count(*)`, the `extra` aggregates, then the
    /// last key as text. Single-column keys take `max()`: one pass, no sort. Composite keys take
    /// the first row in descending key order (so does uuid, which has no `max()`).
    pub fn summarise(&self, inner: &str, extra: &[&str]) -> String {
        // PostgreSQL has no max(uuid); every other key type has a max() in the column's order.
        if let [key] = self.keys.as_slice()
            && key.sql_type != "uuid"
        {
            let extras: String = extra.iter().map(|e| format!(", {e}")).collect();
            return format!(
                "SELECT count(*){extras}, max({k})::text AS _bf_k0 FROM ({inner}) AS win",
                k = quote_ident(&key.name)
            );
        }
        let extras: String = extra
            .iter()
            .map(|e| format!(", (SELECT {e} FROM win)"))
            .collect();
        format!(
            "WITH win AS MATERIALIZED ({inner})
             SELECT (SELECT count(*) FROM win){extras}, {text} FROM win ORDER BY {desc} LIMIT 1",
            text = self.as_text_output(),
            desc = self.order(None, true),
        )
    }
}

/// Runs a summarised window query (see [`Keyset::summarise`]) whose first column counts the
/// window's keys: that count and the row; `None` when the window is empty.
pub async fn fetch_window<'e>(
    db: impl sqlx::PgExecutor<'e>,
    (sql, keep): (&str, bool),
    (cursor, upper): (Option<&Key>, &Key),
    size: i64,
) -> sqlx::Result<Option<(i64, sqlx::postgres::PgRow)>> {
    use sqlx::Row;
    let bounds: Vec<&Key> = cursor.into_iter().chain([upper]).collect();
    let row = bind_keys(crate::sql::query(sql).persistent(keep), &bounds)
        .bind(size)
        .fetch_optional(db)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let keys: i64 = row.try_get(0)?;
    Ok((keys > 0).then_some((keys, row)))
}

/// Binds key values in order (e.g. cursor, then upper bound) as text parameters.
pub fn bind_keys<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    keys: &[&'q Key],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for value in keys.iter().flat_map(|k| k.0.iter()) {
        query = query.bind(value.as_str());
    }
    query
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Column;

    fn target(keys: &[(&str, &str)]) -> Target {
        Target {
            oid: 1,
            schema: "public".into(),
            table: "t".into(),
            quoted: "\"public\".\"t\"".into(),
            keys: keys
                .iter()
                .map(|(n, t)| KeyColumn {
                    name: n.to_string(),
                    sql_type: t.to_string(),
                })
                .collect(),
            columns: Vec::<Column>::new(),
            partitioned: false,
            conflicts: Default::default(),
        }
    }

    #[test]
    fn composite_range_uses_row_comparison() {
        let ks = Keyset::new(&target(&[("tenant", "integer"), ("id", "uuid")]));
        let (cond, next) = ks.range(None, true);
        assert_eq!(
            cond,
            "ROW(\"tenant\", \"id\") > ROW($1::text::integer, $2::text::uuid) AND \
             ROW(\"tenant\", \"id\") <= ROW($3::text::integer, $4::text::uuid)"
        );
        assert_eq!(next, 5);
        let (cond, next) = ks.range(Some("t"), false);
        assert_eq!(
            cond,
            "ROW(t.\"tenant\", t.\"id\") <= ROW($1::text::integer, $2::text::uuid)"
        );
        assert_eq!(next, 3);
    }

    #[test]
    fn text_outputs_never_shadow_key_columns_in_order_by() {
        let ks = Keyset::new(&target(&[("id", "bigint")]));
        assert!(
            ks.upper_bound_sql()
                .starts_with("SELECT \"id\"::text AS _bf_k0 FROM")
        );
        assert!(
            ks.window_sql(true)
                .starts_with("SELECT count(*), max(\"id\")::text AS _bf_k0 FROM (")
        );
        let composite = Keyset::new(&target(&[("a", "integer"), ("b", "uuid")]));
        assert!(composite.window_sql(true).contains(
            "\"a\"::text AS _bf_k0, \"b\"::text AS _bf_k1 FROM win ORDER BY \"a\" DESC, \"b\" DESC"
        ));
        let uuid = Keyset::new(&target(&[("id", "uuid")]));
        assert!(!uuid.window_sql(true).contains("max("));
    }

    #[test]
    fn key_round_trips_through_json() {
        let k = Key(vec!["42".into(), "a\"b".into()]);
        assert_eq!(Key::from_json(&k.to_json(), 2), Some(k.clone()));
        assert_eq!(Key::from_json(&k.to_json(), 1), None);
        assert_eq!(Key::from_json(&serde_json::json!([1, 2]), 2), None);
    }
}
