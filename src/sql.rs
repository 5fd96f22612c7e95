//! The one place identifiers are quoted, and the qualified names of backfilld's own tables.

/// Quotes an identifier the way PostgreSQL's `quote_ident` does: always, doubling embedded quotes.
/// Always quoting keeps mixed-case and reserved-word names exact.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
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

    /// Replaces `{schema}` and `{jobs}` in a SQL template.
    pub fn render(&self, template: &str) -> String {
        template
            .replace("{jobs}", &self.jobs)
            .replace("{schema}", &quote_ident(&self.schema))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
