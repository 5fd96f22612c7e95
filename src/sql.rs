//! The one place identifiers are quoted, and the qualified names of backfilld's own tables.

/// Quotes an identifier the way PostgreSQL's `quote_ident` does: always, doubling embedded quotes.
/// Always quoting keeps mixed-case and reserved-word names exact.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// An identifier as PostgreSQL's `quote_ident` shows it: bare when it is lower-case letters,
/// digits, `_` and `$` (not first), else quoted, so `public."Order Items"` and `"my.schema".t`
/// read unambiguously in messages.
pub fn shown_ident(ident: &str) -> String {
    let mut chars = ident.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        ident.to_owned()
    } else {
        quote_ident(ident)
    }
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A job name as part of a table name: lower-case ASCII letters, digits and `_`, then `suffix`,
/// at most 63 bytes in all (PostgreSQL's identifier limit).
pub fn table_name_for(job: &str, suffix: &str) -> String {
    let mut base = ascii_word(job);
    base.truncate(63usize.saturating_sub(suffix.len()));
    format!("{base}{suffix}")
}

/// `s` in lower-case ASCII letters, digits and `_` (every other character becomes `_`).
pub fn ascii_word(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The longest start of `s` of at most `max` bytes that ends on a character boundary (as
/// PostgreSQL cuts an identifier to 63 bytes).
pub fn clip_bytes(s: &str, max: usize) -> &str {
    let mut cut = max.min(s.len());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// A column name as a person gives it: bare (`unit_price`, matched exactly) or as SQL writes it
/// (`"Unit Price"`: quotes removed, doubled quotes undone), so a name that needs quotes in SQL can
/// be given either way.
pub fn unquote_ident(given: &str) -> String {
    let given = given.trim();
    match given.strip_prefix('"').and_then(|g| g.strip_suffix('"')) {
        Some(inner) if !inner.is_empty() => inner.replace("\"\"", "\""),
        _ => given.to_owned(),
    }
}

/// A schema-qualified table name as SQL reads it (`public.orders`, `"Sales"."Odd Table"`): the
/// schema and the table, quoted parts unquoted and bare ones folded to lower case as PostgreSQL
/// folds them. `None` unless it is exactly two names, each bare (a letter or `_`, then letters,
/// digits, `_` or `$`) or quoted.
pub fn split_qualified(given: &str) -> Option<(String, String)> {
    let parts = split_outside_quotes(given, '.');
    let name = |part: &str| {
        let part = part.trim();
        if let Some(inner) = part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            let lone_quote = inner.replace("\"\"", "").contains('"');
            return (!inner.is_empty() && !lone_quote).then(|| inner.replace("\"\"", "\""));
        }
        let mut chars = part.chars();
        let first = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_');
        let rest = chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$');
        (first && rest).then(|| part.to_lowercase())
    };
    match parts.as_slice() {
        [schema, table] => Some((name(schema)?, name(table)?)),
        _ => None,
    }
}

/// Splits a comma-separated list of column names, bare or quoted as in SQL, at the commas outside
/// double quotes (`a,"b,c"` is two names), and unquotes each.
pub fn split_idents(given: &str) -> Vec<String> {
    split_outside_quotes(given, ',')
        .into_iter()
        .map(unquote_ident)
        .collect()
}

/// The byte offsets of `separator` in `given` outside double-quoted identifiers.
pub fn outside_quotes(given: &str, separator: char) -> Vec<usize> {
    let mut quoted = false;
    let mut found = Vec::new();
    for (i, c) in given.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == separator && !quoted => found.push(i),
            _ => {}
        }
    }
    found
}

/// `given` split at each `separator` outside double-quoted identifiers.
fn split_outside_quotes(given: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for i in outside_quotes(given, separator) {
        parts.push(&given[start..i]);
        start = i + separator.len_utf8();
    }
    parts.push(&given[start..]);
    parts
}

/// Quotes a string literal (used only for DDL, where parameters are not allowed).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Names of backfilld's own objects inside the configured schema.
#[derive(Debug, Clone)]
pub struct Names {
    pub schema: String,
    /// `"backfill"."jobs"`
    pub jobs: String,
}

impl Names {
    pub fn new(schema: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            jobs: qualified(schema, "jobs"),
        }
    }

    /// Replaces `{schema}`, `{jobs}` and `{job_row}` (`JobRow::columns`) in a SQL template.
    pub fn render(&self, template: &str) -> String {
        let rendered = template
            .replace("{jobs}", &self.jobs)
            .replace("{schema}", &quote_ident(&self.schema));
        if rendered.contains("{job_row}") {
            rendered.replace("{job_row}", &crate::job::JobRow::columns(None))
        } else {
            rendered
        }
    }
}

/// A statement, always unnamed: backfilld never leaves prepared statements on a server
/// connection, so it works through transaction poolers (see `db`). Planning is per execution
/// anyway: batch transactions run with `plan_cache_mode = force_custom_plan`.
#[allow(clippy::disallowed_methods)]
pub fn query(sql: &str) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql).persistent(false)
}

/// `query` mapping rows to `O`.
#[allow(clippy::disallowed_methods)]
pub fn query_as<O>(
    sql: &str,
) -> sqlx::query::QueryAs<'_, sqlx::Postgres, O, sqlx::postgres::PgArguments>
where
    O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    sqlx::query_as(sql).persistent(false)
}

/// `query` returning the first column.
#[allow(clippy::disallowed_methods)]
pub fn query_scalar<O>(
    sql: &str,
) -> sqlx::query::QueryScalar<'_, sqlx::Postgres, O, sqlx::postgres::PgArguments>
where
    (O,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    sqlx::query_scalar(sql).persistent(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn qualified_names_read_as_sql_reads_them() {
        use super::split_qualified as q;
        let pair = |a: &str, b: &str| Some((a.to_owned(), b.to_owned()));
        assert_eq!(q("public.orders"), pair("public", "orders"));
        assert_eq!(q("public.Orders"), pair("public", "orders"));
        assert_eq!(q(r#"public."Odd Table""#), pair("public", "Odd Table"));
        assert_eq!(q(r#""a.b"."x""y""#), pair("a.b", "x\"y"));
        assert_eq!(q(r#"["public.orders"]"#), None);
        assert_eq!(q("orders"), None);
        assert_eq!(q("a.b.c"), None);
        assert_eq!(q("public.Odd Table"), None);
    }

    use super::*;

    #[test]
    fn column_lists_split_at_commas_outside_quotes() {
        let cases: [(&str, &[&str]); 5] = [
            ("a", &["a"]),
            ("tenant_id, email", &["tenant_id", "email"]),
            (r#"a,"b,c""#, &["a", "b,c"]),
            (r#""x""y,z", "Id""#, &[r#"x"y,z"#, "Id"]),
            ("a,,b", &["a", "", "b"]),
        ];
        for (given, expected) in cases {
            assert_eq!(split_idents(given), expected, "{given}");
        }
    }

    #[test]
    fn quoting() {
        let cases = [
            ("orders", "\"orders\""),
            ("Order Items", "\"Order Items\""),
            ("we\"ird", "\"we\"\"ird\""),
            ("select", "\"select\""),
        ];
        for (input, expected) in cases {
            assert_eq!(quote_ident(input), expected);
        }
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(qualified("a", "b"), "\"a\".\"b\"");
    }
}
