//! SQL fragments from job rows (`predicate`, `set_clause`) are data written by whoever may insert
//! into `backfill.jobs`. This module tokenizes them with PostgreSQL's lexical rules (strings,
//! escape strings, dollar quotes, quoted identifiers, nested comments) and enforces their shape:
//! exactly one parenthesis-balanced expression, no statement separators, no comments, no calls to
//! session- or server-level functions. The server then parses the assembled statement (prepare
//! only, never executed) in `validate_on_server`, which catches everything else: syntax, unknown
//! columns, a predicate that is not boolean.

use sqlx::PgConnection;

use crate::target::Target;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// Unquoted identifier or keyword, folded to lower case.
    Word(String),
    /// `"Quoted"` identifier, exact.
    Quoted(String),
    /// String literal of any form (`'..'`, `E'..'`, `$tag$..$tag$`, `B'..'`, `X'..'`, `U&'..'`).
    Literal,
    Number,
    Param,
    Op(String),
    Open,
    Close,
    Comma,
    Semicolon,
    Comment,
}

/// Functions a fragment may not call: they act on the server, other sessions, files or this
/// session's settings, never on the row being changed.
const FORBIDDEN_FUNCTIONS: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_logical_emit_message",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "set_config",
    "pg_notify",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "lo_create",
    "lo_from_bytea",
    "lo_put",
    "pg_advisory_lock",
    "pg_advisory_xact_lock",
    "pg_try_advisory_lock",
    "pg_try_advisory_xact_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock_all",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "pg_file_write",
    "pg_file_unlink",
    "pg_file_rename",
    "query_to_xml",
    "query_to_json",
    "table_to_xml",
    "cursor_to_xml",
];

/// Which fragment of a job row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Predicate,
    SetClause,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Predicate => "predicate",
            Part::SetClause => "set_clause",
        })
    }
}

/// What is wrong with a fragment; its message is written into `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    #[error("unterminated {0}")]
    Unterminated(&'static str),
    #[error("{0} is empty")]
    Empty(Part),
    #[error("{0} contains ';': a fragment is one expression, never a statement list")]
    Semicolon(Part),
    #[error("{0} contains a comment; comments are not allowed in fragments")]
    Comment(Part),
    #[error("{0} contains a $n parameter placeholder")]
    Parameter(Part),
    #[error("{0} closes a parenthesis it never opened: it would escape its enclosing expression")]
    NeverOpened(Part),
    #[error("{0} has unbalanced parentheses")]
    Unbalanced(Part),
    #[error("{part} calls {function}(), which is not allowed in a backfill")]
    ForbiddenCall { part: Part, function: String },
    #[error("{0} must be a single expression, found a top-level ','")]
    TopLevelComma(Part),
    #[error(
        "{0} locks rows (FOR UPDATE / FOR SHARE): a subquery's row locks would be held by every batch, and by a dry run"
    )]
    RowLock(Part),
    #[error("set_clause part {part:?} {problem}")]
    Assignment { part: String, problem: &'static str },
    #[error("set_clause assigns generated column {0:?}")]
    GeneratedColumn(String),
    #[error(
        "set_clause assigns column {0:?}, an identity GENERATED ALWAYS: an UPDATE may set it \
         only to DEFAULT, so the revert could not write its old values back"
    )]
    IdentityAlways(String),
    #[error("set_clause assigns key column {0:?}; a keyset backfill cannot change its own keys")]
    KeyColumn(String),
    #[error(
        "set_clause assigns column {column:?}, from which key column {key:?} is generated; a \
         keyset backfill cannot change its own keys (the row would move ahead of the cursor and \
         change again)"
    )]
    KeySource { column: String, key: String },
    #[error("set_clause assigns column {0:?} twice")]
    AssignedTwice(String),
    #[error(
        "the target's key ({keys}) is DEFERRABLE, and ON CONFLICT cannot skip a row on a \
         deferrable key; no other unique key of the target that is not deferrable, on NOT NULL \
         columns, is assigned in full by set_clause, so rows inserted already would not be \
         skipped. Make the key NOT DEFERRABLE, or assign (or add) such a unique key"
    )]
    NoArbiter { keys: String },
    #[error("{part} rejected by PostgreSQL: SQLSTATE {sqlstate}: {message}")]
    Rejected {
        part: Part,
        sqlstate: String,
        message: String,
    },
}

/// Why `validate_on_server` did not accept the fragments.
#[derive(Debug, thiserror::Error)]
pub enum ServerCheck {
    /// The server's verdict on a fragment: the job row is at fault.
    #[error(transparent)]
    Rejected(#[from] FragmentError),
    /// Lock timeout, lost connection and the like: worth retrying.
    #[error(transparent)]
    Transient(#[from] sqlx::Error),
}

/// Whether a (validated) fragment contains a subquery: a `SELECT` keyword outside literals,
/// quoted identifiers and comments.
pub fn has_subquery(fragment: &str) -> bool {
    tokenize(fragment).is_ok_and(|tokens| tokens.iter().any(|t| *t == Token::Word("select".into())))
}

pub fn tokenize(src: &str) -> Result<Vec<Token>, FragmentError> {
    let mut lexer = Lexer {
        chars: src.chars().collect(),
        pos: 0,
    };
    let mut tokens = Vec::new();
    while let Some(tok) = lexer.next()? {
        tokens.push(tok);
    }
    Ok(tokens)
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

impl Lexer {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn next(&mut self) -> Result<Option<Token>, FragmentError> {
        while self.peek(0).is_some_and(is_space) {
            self.pos += 1;
        }
        let Some(c) = self.peek(0) else {
            return Ok(None);
        };
        let tok = match c {
            '-' if self.peek(1) == Some('-') => self.line_comment(),
            '/' if self.peek(1) == Some('*') => self.block_comment()?,
            '\'' => self.string(false)?,
            '"' => self.quoted_ident()?,
            '$' if self.peek(1).is_some_and(|d| d.is_ascii_digit()) => self.param(),
            '$' => self.dollar_string()?,
            '(' | '[' => self.single(Token::Open),
            ')' | ']' => self.single(Token::Close),
            ',' => self.single(Token::Comma),
            ';' => self.single(Token::Semicolon),
            c if c.is_ascii_digit()
                || (c == '.' && self.peek(1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                self.number()
            }
            c if ident_start(c) => self.word()?,
            _ => self.operator(),
        };
        Ok(Some(tok))
    }

    fn single(&mut self, tok: Token) -> Token {
        self.pos += 1;
        tok
    }

    fn line_comment(&mut self) -> Token {
        while self.peek(0).is_some_and(|c| c != '\n') {
            self.pos += 1;
        }
        Token::Comment
    }

    fn block_comment(&mut self) -> Result<Token, FragmentError> {
        // PostgreSQL block comments nest.
        let mut depth = 0;
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some('/'), Some('*')) => {
                    depth += 1;
                    self.pos += 2;
                }
                (Some('*'), Some('/')) => {
                    depth -= 1;
                    self.pos += 2;
                    if depth == 0 {
                        return Ok(Token::Comment);
                    }
                }
                (Some(_), _) => self.pos += 1,
                (None, _) => return Err(FragmentError::Unterminated("/* comment")),
            }
        }
    }

    /// `'...'` with `''` escapes; with `backslash`, also `\'` (E-strings).
    fn string(&mut self, backslash: bool) -> Result<Token, FragmentError> {
        self.pos += 1;
        loop {
            match self.peek(0) {
                None => return Err(FragmentError::Unterminated("string literal")),
                Some('\\') if backslash => self.pos += 2,
                Some('\'') if self.peek(1) == Some('\'') => self.pos += 2,
                Some('\'') => {
                    self.pos += 1;
                    return Ok(Token::Literal);
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn quoted_ident(&mut self) -> Result<Token, FragmentError> {
        self.pos += 1;
        let mut name = String::new();
        loop {
            match self.peek(0) {
                None => return Err(FragmentError::Unterminated("quoted identifier")),
                Some('"') if self.peek(1) == Some('"') => {
                    name.push('"');
                    self.pos += 2;
                }
                Some('"') => {
                    self.pos += 1;
                    return Ok(Token::Quoted(truncate_identifier(name)));
                }
                Some(c) => {
                    name.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn param(&mut self) -> Token {
        self.pos += 1;
        while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        Token::Param
    }

    fn dollar_string(&mut self) -> Result<Token, FragmentError> {
        let start = self.pos;
        let mut end = self.pos + 1;
        // A tag starts like an identifier and has no `$` (`$1` is a parameter, lexed before).
        while self
            .chars
            .get(end)
            .is_some_and(|c| ident_start(*c) || c.is_ascii_digit())
        {
            end += 1;
        }
        if self.chars.get(end) != Some(&'$') {
            self.pos += 1;
            return Ok(Token::Op("$".into()));
        }
        let tag: Vec<char> = self.chars[start..=end].to_vec();
        self.pos = end + 1;
        while self.pos + tag.len() <= self.chars.len() {
            if self.chars[self.pos..self.pos + tag.len()] == tag[..] {
                self.pos += tag.len();
                return Ok(Token::Literal);
            }
            self.pos += 1;
        }
        Err(FragmentError::Unterminated("dollar-quoted string"))
    }

    fn number(&mut self) -> Token {
        while self
            .peek(0)
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        {
            // Exponent signs: 1e-5
            if matches!(self.peek(0), Some('e' | 'E')) && matches!(self.peek(1), Some('+' | '-')) {
                self.pos += 1;
            }
            self.pos += 1;
        }
        Token::Number
    }

    fn word(&mut self) -> Result<Token, FragmentError> {
        let start = self.pos;
        while self
            .peek(0)
            .is_some_and(|c| ident_start(c) || c.is_ascii_digit() || c == '$')
        {
            self.pos += 1;
        }
        let word: String = self.chars[start..self.pos].iter().collect();
        // Prefixed string literals: E'..', B'..', X'..', N'..', U&'..'.
        if self.peek(0) == Some('\'') {
            match word.to_ascii_lowercase().as_str() {
                "e" => return self.string(true),
                "b" | "x" | "n" => return self.string(false),
                _ => {}
            }
        }
        if word.eq_ignore_ascii_case("u") && self.peek(0) == Some('&') {
            match self.peek(1) {
                Some('\'') => {
                    self.pos += 1;
                    return self.string(false);
                }
                Some('"') => {
                    self.pos += 1;
                    return self.quoted_ident();
                }
                _ => {}
            }
        }
        Ok(Token::Word(truncate_identifier(word.to_ascii_lowercase())))
    }

    fn operator(&mut self) -> Token {
        const OP_CHARS: &str = "+-*/<>=~!@#%^&|`?:.";
        let start = self.pos;
        while self.peek(0).is_some_and(|c| OP_CHARS.contains(c)) {
            // An operator never swallows the start of a comment.
            if self.pos > start
                && matches!(
                    (self.peek(0), self.peek(1)),
                    (Some('-'), Some('-')) | (Some('/'), Some('*'))
                )
            {
                break;
            }
            self.pos += 1;
        }
        if self.pos == start {
            self.pos += 1;
        }
        Token::Op(self.chars[start..self.pos].iter().collect())
    }
}

/// PostgreSQL's whitespace (`scan.l`: space, tab, newline, carriage return, form feed). Anything
/// else, a no-break space included, is part of a token for the server, so it must be for us.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c')
}

/// PostgreSQL's identifier start (`scan.l`: `[A-Za-z\200-\377_]`): every non-ASCII character
/// (each of its UTF-8 bytes is in `\200-\377`) continues or starts an identifier, and a dollar
/// quote's tag. Unicode's own classes (`char::is_alphabetic`) disagree on symbols such as `€`:
/// a lexer using them would see a dollar quote the server does not, and could be steered past
/// every shape check.
fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
}

/// An identifier as PostgreSQL keeps it: at most 63 bytes (`NAMEDATALEN - 1`), cut on a character
/// boundary. Checks on column names must see the name the server will use.
fn truncate_identifier(mut name: String) -> String {
    let keep = crate::sql::clip_bytes(&name, 63).len();
    name.truncate(keep);
    name
}

/// Shape checks common to both fragment kinds.
fn check_shape(tokens: &[Token], part: Part) -> Result<(), FragmentError> {
    if tokens.is_empty() {
        return Err(FragmentError::Empty(part));
    }
    let mut depth: i32 = 0;
    for (i, tok) in tokens.iter().enumerate() {
        match tok {
            Token::Semicolon => return Err(FragmentError::Semicolon(part)),
            Token::Comment => return Err(FragmentError::Comment(part)),
            Token::Param => return Err(FragmentError::Parameter(part)),
            Token::Open => depth += 1,
            Token::Close => {
                depth -= 1;
                if depth < 0 {
                    return Err(FragmentError::NeverOpened(part));
                }
            }
            // `FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`, `FOR KEY SHARE` in a subquery
            // lock another table's rows (a dry run's too). `FOR` before anything else is a
            // function argument (`substring(s FOR 3)`).
            Token::Word(w)
                if w == "for"
                    && matches!(
                        tokens.get(i + 1),
                        Some(Token::Word(n)) if matches!(n.as_str(), "update" | "share" | "no" | "key")
                    ) =>
            {
                return Err(FragmentError::RowLock(part));
            }
            // Quoted too: `"pg_sleep"(1)` calls the same function.
            Token::Word(w) | Token::Quoted(w) if FORBIDDEN_FUNCTIONS.contains(&w.as_str()) => {
                if matches!(tokens.get(i + 1), Some(Token::Open)) {
                    return Err(FragmentError::ForbiddenCall {
                        part,
                        function: w.clone(),
                    });
                }
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(FragmentError::Unbalanced(part));
    }
    Ok(())
}

/// Validates a predicate's shape; returns it unchanged for wrapping in parentheses.
pub fn predicate(src: &str) -> Result<String, FragmentError> {
    let tokens = tokenize(src)?;
    check_shape(&tokens, Part::Predicate)?;
    reject_top_level_commas(&tokens, Part::Predicate)?;
    Ok(src.trim().to_owned())
}

/// The columns a predicate requires to be NULL: its top-level conjuncts of the exact form
/// `column IS NULL` (parentheses around a conjunct allowed). A row the predicate selects has NULL
/// in each of them, in whatever version PostgreSQL evaluates it on. Nothing is pinned when the
/// top level has `OR` (lower precedence than `AND`) or syntax with an `AND` of its own (`BETWEEN
/// … AND …`, `CASE WHEN … AND …`), or when the predicate does not lex.
pub fn null_pinned(predicate: &str) -> Vec<String> {
    let Ok(tokens) = tokenize(predicate) else {
        return Vec::new();
    };
    let mut conjuncts: Vec<&[Token]> = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, tok) in tokens.iter().enumerate() {
        match tok {
            Token::Open => depth += 1,
            Token::Close => depth = depth.saturating_sub(1),
            Token::Word(w) if depth == 0 => match w.as_str() {
                "or" | "between" | "case" => return Vec::new(),
                "and" => {
                    conjuncts.push(&tokens[start..i]);
                    start = i + 1;
                }
                _ => {}
            },
            _ => {}
        }
    }
    conjuncts.push(&tokens[start..]);
    conjuncts
        .into_iter()
        .filter_map(|c| match unwrap_parens(c) {
            [
                Token::Word(col) | Token::Quoted(col),
                Token::Word(is),
                Token::Word(null),
            ] if is == "is" && null == "null" => Some(col.clone()),
            _ => None,
        })
        .collect()
}

/// `tokens` without parentheses that enclose all of it.
fn unwrap_parens(mut tokens: &[Token]) -> &[Token] {
    while let [Token::Open, inner @ .., Token::Close] = tokens {
        let mut depth = 0i32;
        let encloses = inner.iter().all(|t| {
            match t {
                Token::Open => depth += 1,
                Token::Close => depth -= 1,
                _ => {}
            }
            depth >= 0
        });
        if !encloses {
            break;
        }
        tokens = inner;
    }
    tokens
}

fn reject_top_level_commas(tokens: &[Token], part: Part) -> Result<(), FragmentError> {
    let mut depth = 0;
    for tok in tokens {
        match tok {
            Token::Open => depth += 1,
            Token::Close => depth -= 1,
            Token::Comma if depth == 0 => return Err(FragmentError::TopLevelComma(part)),
            _ => {}
        }
    }
    Ok(())
}

/// One `column = expression` of a set clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub column: String,
    pub expr: String,
}

/// Splits a set clause into assignments at top-level commas. Each part must be
/// `identifier = expression`; the expression is kept as source text.
pub fn set_clause(src: &str) -> Result<Vec<Assignment>, FragmentError> {
    let tokens = tokenize(src)?;
    check_shape(&tokens, Part::SetClause)?;
    split_top_level(src)?
        .into_iter()
        .map(|part| assignment(&part))
        .collect()
}

/// Splits source text at commas outside parentheses, strings and quoted identifiers.
fn split_top_level(src: &str) -> Result<Vec<String>, FragmentError> {
    let mut lexer = Lexer {
        chars: src.chars().collect(),
        pos: 0,
    };
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    loop {
        let before = lexer.pos;
        let Some(tok) = lexer.next()? else { break };
        match tok {
            Token::Open => depth += 1,
            Token::Close => depth -= 1,
            Token::Comma if depth == 0 => {
                let comma = lexer.chars[before..lexer.pos]
                    .iter()
                    .position(|c| *c == ',')
                    .map_or(lexer.pos - 1, |p| before + p);
                parts.push(lexer.chars[start..comma].iter().collect::<String>());
                start = comma + 1;
            }
            _ => {}
        }
    }
    parts.push(lexer.chars[start..].iter().collect());
    Ok(parts)
}

fn assignment(part: &str) -> Result<Assignment, FragmentError> {
    let tokens = tokenize(part)?;
    let bad = |problem| FragmentError::Assignment {
        part: part.trim().to_owned(),
        problem,
    };
    let column = match tokens.first() {
        Some(Token::Word(w)) => w.clone(),
        Some(Token::Quoted(q)) => q.clone(),
        _ => return Err(bad("must start with a column name")),
    };
    if tokens.get(1) != Some(&Token::Op("=".into())) {
        return Err(bad("must have the form column = expression"));
    }
    if tokens.len() < 3 {
        return Err(bad("has no expression"));
    }
    // The expression starts after the `=` token, found by lexing past the column (whose quoted
    // name may itself hold a `=`).
    let mut lexer = Lexer {
        chars: part.chars().collect(),
        pos: 0,
    };
    lexer.next()?;
    while lexer.peek(0).is_some_and(is_space) {
        lexer.pos += 1;
    }
    let expr: String = lexer.chars[lexer.pos + 1..].iter().collect();
    Ok(Assignment {
        column,
        expr: expr.trim().to_owned(),
    })
}

/// Renders assignments with every column quoted and every expression parenthesized, so an
/// expression can never extend into the rest of the statement.
pub fn render_assignments(assignments: &[Assignment]) -> String {
    assignments
        .iter()
        .map(|a| format!("{} = ({})", crate::sql::quote_ident(&a.column), a.expr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The validated fragments of one job, checked against its target table.
#[derive(Debug, Clone)]
pub struct Fragments {
    pub predicate: String,
    pub assignments: Vec<Assignment>,
}

/// Checks both fragments' shape and their columns against the target.
pub fn validate(
    predicate_src: &str,
    set_src: Option<&str>,
    target: &Target,
) -> Result<Fragments, FragmentError> {
    let predicate = predicate(predicate_src)?;
    let assignments = match set_src {
        Some(s) => set_clause(s)?,
        None => Vec::new(),
    };
    check_assignments(&assignments, target, false)?;
    Ok(Fragments {
        predicate,
        assignments,
    })
}

/// No generated column, no column twice, and a key column only where `keys_allowed` (a new
/// row's key is set; an existing row's is not). A missing column is left to the server's parse,
/// which names it with SQLSTATE 42703.
fn check_assignments(
    assignments: &[Assignment],
    target: &Target,
    keys_allowed: bool,
) -> Result<(), FragmentError> {
    let mut seen = std::collections::HashSet::new();
    for a in assignments {
        if target.column(&a.column).is_some_and(|c| c.generated) {
            return Err(FragmentError::GeneratedColumn(a.column.clone()));
        }
        if !keys_allowed {
            key_untouched(&a.column, target)?;
            if target.column(&a.column).is_some_and(|c| c.identity_always) {
                return Err(FragmentError::IdentityAlways(a.column.clone()));
            }
        }
        if !seen.insert(a.column.clone()) {
            return Err(FragmentError::AssignedTwice(a.column.clone()));
        }
    }
    Ok(())
}

/// An existing row's key must not change: neither a key column nor a column a generated key
/// column is computed from may be assigned.
fn key_untouched(column: &str, target: &Target) -> Result<(), FragmentError> {
    for key in &target.keys {
        if key.name == column {
            return Err(FragmentError::KeyColumn(column.to_owned()));
        }
        let generated_from = target.column(&key.name).map(|c| &c.generated_from);
        if generated_from.is_some_and(|from| from.iter().any(|f| f == column)) {
            return Err(FragmentError::KeySource {
                column: column.to_owned(),
                key: key.name.clone(),
            });
        }
    }
    Ok(())
}

/// An insert job's fragments: the predicate over the source table, and the set clause as
/// `target_column = expression over the source row`. Key columns may be assigned (it is a new
/// row); generated ones may not, nor may a column be assigned twice.
pub fn validate_insert(
    predicate_src: &str,
    set_src: &str,
    into: &Target,
) -> Result<Fragments, FragmentError> {
    let predicate = predicate(predicate_src)?;
    let assignments = set_clause(set_src)?;
    check_assignments(&assignments, into, true)?;
    Ok(Fragments {
        predicate,
        assignments,
    })
}

/// The insert's statement parsed by the server (never run): unknown columns, type mismatches and
/// a non-boolean predicate are its verdict.
pub async fn validate_insert_on_server(
    conn: &mut PgConnection,
    source: &Target,
    into: &Target,
    fragments: &Fragments,
) -> Result<(), ServerCheck> {
    let select = format!(
        "SELECT 1 FROM {} WHERE ({}) LIMIT 0",
        source.quoted, fragments.predicate
    );
    server_parse(conn, &select, Part::Predicate).await?;
    server_parse(
        conn,
        &insert_select(source, into, fragments, "false"),
        Part::SetClause,
    )
    .await
}

/// `INSERT INTO into (columns) SELECT (expressions) FROM source WHERE <condition> AND
/// (<predicate>) ON CONFLICT DO NOTHING`: the one shape of an insert job's write (the conflict
/// names `into`'s keys where deferrable constraints forbid the bare form: `Target::on_conflict`).
pub fn insert_select(source: &Target, into: &Target, f: &Fragments, condition: &str) -> String {
    let columns: Vec<String> = f
        .assignments
        .iter()
        .map(|a| crate::sql::quote_ident(&a.column))
        .collect();
    let values: Vec<String> = f
        .assignments
        .iter()
        .map(|a| format!("({})", a.expr))
        .collect();
    let overriding = if f
        .assignments
        .iter()
        .any(|a| into.column(&a.column).is_some_and(|c| c.identity_always))
    {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    format!(
        "INSERT INTO {into} ({columns}){overriding} SELECT {values} FROM {source}
         WHERE {condition} AND ({pred}) {on_conflict}",
        into = into.quoted,
        on_conflict = into.on_conflict(),
        columns = columns.join(", "),
        values = values.join(", "),
        source = source.quoted,
        pred = f.predicate,
    )
}

/// Has the server parse (never run) the statements the job will execute. A prepared statement
/// holds exactly one command, so stacking is impossible even if the lexer missed something.
pub async fn validate_on_server(
    conn: &mut PgConnection,
    target: &Target,
    fragments: &Fragments,
) -> Result<(), ServerCheck> {
    let select = format!(
        "SELECT 1 FROM {} WHERE ({}) LIMIT 0",
        target.quoted, fragments.predicate
    );
    server_parse(conn, &select, Part::Predicate).await?;
    if !fragments.assignments.is_empty() {
        let update = format!(
            "UPDATE {} SET {} WHERE ({}) AND false",
            target.quoted,
            render_assignments(&fragments.assignments),
            fragments.predicate
        );
        server_parse(conn, &update, Part::SetClause).await?;
    }
    Ok(())
}

/// Has the server parse, analyze and plan `sql` without running it: `EXPLAIN` (no `ANALYZE`, so
/// no statement-level trigger fires) as one unnamed extended-protocol statement, which holds
/// exactly one command.
/// It runs in a transaction of its own (a savepoint inside the caller's) with
/// `backfilld.checking` on, so `job_started_at` of a job not started yet reads as now() when the
/// planner calls it to estimate a comparison (schema migration 7); rolled back, setting and all.
async fn server_parse(conn: &mut PgConnection, sql: &str, part: Part) -> Result<(), ServerCheck> {
    use sqlx::Connection;
    let explain = format!("EXPLAIN (COSTS OFF) {sql}");
    let checked = async {
        let mut tx = conn.begin().await?;
        crate::sql::query("SELECT set_config('backfilld.checking', 'on', true)")
            .execute(&mut *tx)
            .await?;
        let planned = crate::sql::query(&explain).execute(&mut *tx).await;
        tx.rollback().await?;
        planned
    };
    match checked.await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(db))
            if !crate::error::is_transient_sqlstate(db.code().as_deref().unwrap_or_default()) =>
        {
            Err(ServerCheck::Rejected(FragmentError::Rejected {
                part,
                sqlstate: db.code().unwrap_or_default().into_owned(),
                message: db.message().to_owned(),
            }))
        }
        Err(transient) => Err(ServerCheck::Transient(transient)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Characters the server lexes differently from Unicode's classes: `€` and a no-break space
    /// are identifier characters for PostgreSQL, so `a€$q$` is one identifier, not `a`, `€` and
    /// a dollar quote that would hide what follows from the shape checks.
    #[test]
    fn non_ascii_characters_lex_as_the_server_lexes_them() {
        let escape = "id = -1 AND EXISTS (SELECT 1 a€$q$) ) OR ( EXISTS (SELECT 1 b€$q$)";
        assert!(matches!(
            predicate(escape),
            Err(FragmentError::NeverOpened(_))
        ));
        let nbsp = "id = -1 AND EXISTS (SELECT 1 a\u{a0}$q$) ) OR ( EXISTS (SELECT 1 b\u{a0}$q$)";
        assert!(predicate(nbsp).is_err(), "{:?}", predicate(nbsp));
        // `$€$` opens a dollar quote for the server: its contents are a literal.
        assert!(predicate("note = $€$ ) OR true OR ( $€$").is_ok());
        assert_eq!(
            tokenize("Äpfel").unwrap(),
            [Token::Word("Äpfel".into())],
            "only ASCII letters fold to lower case"
        );
        assert_eq!(tokenize("ÄPFEL").unwrap(), [Token::Word("Äpfel".into())]);
    }

    #[test]
    fn identifiers_are_cut_to_63_bytes_as_the_server_cuts_them() {
        let long = "k".repeat(63);
        let given = format!("{long}zzz = {long} + 1000");
        let parsed = set_clause(&given).unwrap();
        assert_eq!(parsed[0].column, long);
        let quoted = format!("\"{}é\"", "x".repeat(62));
        assert_eq!(tokenize(&quoted).unwrap(), [Token::Quoted("x".repeat(62))]);
    }

    #[test]
    fn quoted_calls_of_forbidden_functions_are_refused() {
        for p in [
            "\"pg_sleep\"(1) IS NOT NULL",
            "\"pg_catalog\".\"set_config\"('a', 'b', false) = 'b'",
        ] {
            assert!(
                matches!(predicate(p), Err(FragmentError::ForbiddenCall { .. })),
                "{p}: {:?}",
                predicate(p)
            );
        }
    }

    #[test]
    fn row_locking_subqueries_are_refused() {
        for p in [
            "id IN (SELECT id FROM other FOR UPDATE)",
            "EXISTS (SELECT 1 FROM o WHERE o.id = t.id FOR NO KEY UPDATE)",
            "id IN (SELECT id FROM other FOR SHARE)",
            "id IN (SELECT id FROM other for key share)",
        ] {
            assert!(
                matches!(predicate(p), Err(FragmentError::RowLock(_))),
                "{p}"
            );
        }
        assert!(predicate("substring(note FOR 3) = 'abc'").is_ok());
        assert!(predicate("note = 'for update'").is_ok());
    }

    #[test]
    fn a_quoted_column_may_hold_an_equals_sign() {
        let parsed = set_clause("\"a=b\" = 'z', c = 1").unwrap();
        assert_eq!(parsed[0].column, "a=b");
        assert_eq!(parsed[0].expr, "'z'");
        assert_eq!(parsed[1].expr, "1");
    }

    #[test]
    fn subqueries_are_told_from_words_in_literals_and_identifiers() {
        assert!(has_subquery("EXISTS (SELECT 1 FROM o WHERE o.id = t.id)"));
        assert!(!has_subquery("note = 'select' AND \"SELECT\" IS NULL"));
        assert!(!has_subquery("status IS NULL"));
    }

    #[test]
    fn predicates() {
        let ok = [
            "status IS NULL",
            "amount > 10 AND (note <> ';' OR note = $$a;b$$)",
            "name = 'it''s -- not a comment'",
            "\"Weird Col\" = E'\\';'",
            "id IN (SELECT id FROM other WHERE x = 1)",
            "tags @> ARRAY['a', 'b']",
            "created_at < now() - interval '1 day'",
        ];
        for p in ok {
            assert!(predicate(p).is_ok(), "{p}: {:?}", predicate(p));
        }
        let bad = [
            ("", "empty"),
            ("true; DROP TABLE orders", "';'"),
            ("true) OR (1=1", "never opened"),
            ("(true", "unbalanced"),
            ("true -- hidden", "comment"),
            ("true /* a /* nested */ b */", "comment"),
            ("a = 1, b = 2", "single expression"),
            (
                "pg_terminate_backend(42) IS NOT NULL",
                "pg_terminate_backend",
            ),
            ("PG_SLEEP(1) IS NULL", "pg_sleep"),
            ("id = $1", "parameter"),
            ("x = 'open", "unterminated"),
            ("x = $t$open", "unterminated"),
        ];
        for (p, want) in bad {
            let e = predicate(p).expect_err(p).to_string();
            assert!(e.contains(want), "{p}: {e}");
        }
    }

    #[test]
    fn null_pinned_columns_are_top_level_is_null_conjuncts() {
        let cases: [(&str, &[&str]); 12] = [
            ("balance_cents IS NULL", &["balance_cents"]),
            ("a > 1 AND (b IS NULL) AND \"C\" is null", &["b", "C"]),
            ("((b IS NULL)) AND x", &["b"]),
            ("b IS NULL OR x", &[]),
            ("x OR y AND b IS NULL", &[]),
            ("NOT b IS NULL", &[]),
            ("b IS NOT NULL", &[]),
            ("b IS NULL IS TRUE", &[]),
            ("x BETWEEN 1 AND b IS NULL", &[]),
            ("CASE WHEN y AND b IS NULL AND z THEN true END", &[]),
            ("(x AND b IS NULL) = false", &[]),
            ("f(x AND b IS NULL)", &[]),
        ];
        for (p, want) in cases {
            assert_eq!(null_pinned(p), want, "{p}");
        }
    }

    #[test]
    fn set_clauses() {
        let a = set_clause("status = 'a,b', n = coalesce(n, 0) + 1, \"Mixed\" = lower(x)").unwrap();
        assert_eq!(
            a,
            vec![
                Assignment {
                    column: "status".into(),
                    expr: "'a,b'".into()
                },
                Assignment {
                    column: "n".into(),
                    expr: "coalesce(n, 0) + 1".into()
                },
                Assignment {
                    column: "Mixed".into(),
                    expr: "lower(x)".into()
                },
            ]
        );
        assert_eq!(render_assignments(&a[..1]), "\"status\" = ('a,b')");
        let bad = [
            ("status", "form column = expression"),
            ("= 1", "column name"),
            ("(a, b) = (1, 2)", "column name"),
            ("a = 1; DELETE FROM t", "';'"),
            ("a = 1 WHERE true --", "comment"),
            ("a = ", "no expression"),
            ("a = 1) , b = (2", "never opened"),
        ];
        for (s, want) in bad {
            let e = set_clause(s).expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
