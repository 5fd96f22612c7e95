//! How backfilld reaches PostgreSQL: `Db`, the pool every module uses, directly or through a
//! connection pooler.
//!
//! Two rules make the same code work through PgBouncer in transaction mode, where each
//! transaction (and each statement outside one) may run on a different server connection:
//!
//! 1. **Unnamed statements only.** Named prepared statements live on a server connection, so a
//!    pooler hands them to other clients (`prepared statement "sqlx_s_1" already exists`) or
//!    loses them. Every statement is built with `sql::query*`, which marks it non-persistent
//!    (clippy's `disallowed-methods` keeps `sqlx::query*` out of the crate).
//! 2. **No statement outside a transaction** (`database.pool_mode = "transaction"` only). sqlx
//!    sends an unnamed statement's Parse and its Bind/Execute in two round trips, each ending in
//!    Sync; between them the server is idle and the pooler may give it to another client. Inside
//!    a transaction the pooler keeps the server. So `Db` runs each lone statement in its own
//!    `BEGIN … COMMIT`, and `acquire` hands out a connection inside a transaction (`Conn`,
//!    committed by `finish`). Session settings become `SET LOCAL` in those `BEGIN`s.
//!
//! Session-level work cannot go through such a pooler at all: `LISTEN` (notifications arrive on
//! one server connection) and `VACUUM` (never inside a transaction) with its session settings.
//! `listener` and `session` open those on `database.direct_url` when it is set, and otherwise
//! return `None`: the daemon polls, the bloat guard leaves vacuuming to autovacuum.

use std::ops::{Deref, DerefMut};

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{
    PgConnectOptions, PgListener, PgPoolOptions, PgQueryResult, PgRow, PgStatement, PgTypeInfo,
};
use sqlx::{Describe, Either, Execute, Executor, PgConnection, PgPool, Postgres, Transaction};

use crate::config::{Config, PoolMode};

/// The connection pool, aware of the pooler in front of the server.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
    mode: PoolMode,
    /// `BEGIN` with the session defaults as `SET LOCAL` (transaction pooling only).
    begin: String,
    /// Connections past the pooler (`database.direct_url`) for LISTEN and VACUUM.
    direct: Option<PgPool>,
}

impl Db {
    /// A pool that talks to PostgreSQL directly (or through a session pooler).
    pub fn direct(pool: PgPool) -> Self {
        Self {
            pool,
            mode: PoolMode::Session,
            begin: "BEGIN".into(),
            direct: None,
        }
    }

    /// Opens the pool. Every connection carries `application_name` (so DBAs can see who we are)
    /// and the batch `lock_timeout`/`statement_timeout` as defaults: no statement backfilld runs
    /// (validation, planning, bookkeeping) may wait forever behind a lock. And
    /// `idle_in_transaction_session_timeout` = `worker.lease_ttl`: a replica frozen inside a
    /// transaction (SIGSTOP, a hung host) would otherwise keep its row locks, the job row's
    /// among them, and no other replica could ever claim the job (`FOR UPDATE SKIP LOCKED`
    /// skips a locked row); the server ends such a session once its lease could have expired
    /// anyway. Batch transactions set the same (`TxSettings`). Directly these are
    /// start-up options; through a transaction pooler, which refuses start-up options and would
    /// leak session settings to other clients, they are `SET LOCAL` in every transaction.
    pub async fn connect(cfg: &Config) -> sqlx::Result<Self> {
        let db = &cfg.database;
        let timeouts = [
            ("lock_timeout", cfg.batch.lock_timeout),
            ("statement_timeout", cfg.batch.statement_timeout),
            ("idle_in_transaction_session_timeout", cfg.worker.lease_ttl),
        ];
        let options: PgConnectOptions = db.url.parse()?;
        let options = quiet_slow_statements(options.application_name(&db.application_name));
        let pool_options = || {
            PgPoolOptions::new()
                .max_connections(db.max_connections)
                .acquire_timeout(db.connect_timeout)
        };
        // `standard_conforming_strings = on` (the default since 9.1, but a database or role may
        // say otherwise): fragments are checked by a lexer that reads `'\'` as PostgreSQL does
        // with it on; with it off, a backslash would end a string the check thought still open.
        let session = |o: PgConnectOptions| {
            o.options(timeouts.map(|(k, v)| (k, format!("{}ms", v.as_millis()))))
                .options([("standard_conforming_strings", "on")])
        };
        if db.pool_mode == PoolMode::Session {
            let options = session(options);
            probe(&options, db.connect_timeout).await?;
            return Ok(Self::direct(pool_options().connect_lazy_with(options)));
        }
        // PgBouncer accepts only the start-up parameters it tracks.
        let options = options.extra_float_digits(None);
        probe(&options, db.connect_timeout).await?;
        let pool = pool_options().connect_lazy_with(options);
        let direct = match db.direct_url.as_str() {
            "" => None,
            url => {
                let o: PgConnectOptions = url.parse()?;
                let o = session(quiet_slow_statements(
                    o.application_name(&db.application_name),
                ));
                // As many as the pool: each running job may hold one (a guard VACUUM, a revert's
                // archive and target VACUUMs at once), and LISTEN keeps one.
                Some(pool_options().connect_lazy_with(o))
            }
        };
        let set = timeouts.map(|(k, v)| format!("; SET LOCAL {k} = '{}ms'", v.as_millis()));
        Ok(Self {
            pool,
            mode: PoolMode::Transaction,
            begin: format!(
                "BEGIN{}; SET LOCAL standard_conforming_strings = on",
                set.concat()
            ),
            direct,
        })
    }

    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    fn pooled(&self) -> bool {
        self.mode == PoolMode::Transaction
    }

    /// A transaction with the session defaults.
    pub async fn begin(&self) -> sqlx::Result<Transaction<'static, Postgres>> {
        if self.pooled() {
            self.pool.begin_with(self.begin.clone()).await
        } else {
            self.pool.begin().await
        }
    }

    /// A transaction opened by `statement` (a `BEGIN` with its own `SET LOCAL`s).
    pub async fn begin_with(
        &self,
        statement: String,
    ) -> sqlx::Result<Transaction<'static, Postgres>> {
        self.pool.begin_with(statement).await
    }

    /// A connection for a few statements in a row. Through a transaction pooler it is inside a
    /// transaction: call `finish` to commit what it wrote (dropping it rolls back).
    pub async fn acquire(&self) -> sqlx::Result<Conn> {
        Ok(if self.pooled() {
            Conn::Tx(self.begin().await?)
        } else {
            Conn::Plain(self.pool.acquire().await?)
        })
    }

    /// Where session-level work goes: past the pooler when `direct_url` is set, else the pool
    /// itself unless it is a transaction pooler.
    fn sessions(&self) -> Option<&PgPool> {
        self.direct
            .as_ref()
            .or((!self.pooled()).then_some(&self.pool))
    }

    /// A connection for session-level work (VACUUM, session settings), or `None` through a
    /// transaction pooler without `database.direct_url`. Reset what you set before dropping it.
    pub async fn session(&self) -> sqlx::Result<Option<PoolConnection<Postgres>>> {
        match self.sessions() {
            Some(pool) => pool.acquire().await.map(Some),
            None => Ok(None),
        }
    }

    /// Cancels the statement backend `pid` runs, from a connection of its role (a role may
    /// cancel only its own statements): a session connection (`direct_url` behind a pooler)
    /// when `on_session`, where VACUUMs run, else the pool.
    pub async fn cancel_backend(&self, pid: i32, on_session: bool) -> sqlx::Result<()> {
        let cancel = crate::sql::query("SELECT pg_cancel_backend($1)").bind(pid);
        match on_session.then(|| self.session()) {
            Some(session) => match session.await? {
                Some(mut conn) => cancel.execute(&mut *conn).await.map(drop),
                None => cancel.execute(self).await.map(drop),
            },
            None => cancel.execute(self).await.map(drop),
        }
    }

    /// Whether `session` can return a connection.
    pub fn has_session(&self) -> bool {
        self.sessions().is_some()
    }

    /// A LISTEN connection, or `None` through a transaction pooler without `direct_url`.
    pub async fn listener(&self) -> sqlx::Result<Option<PgListener>> {
        match self.sessions() {
            Some(pool) => PgListener::connect_with(pool).await.map(Some),
            None => Ok(None),
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
        if let Some(direct) = &self.direct {
            direct.close().await;
        }
    }
}

/// Statements over a second are expected here (the bloat guard's VACUUM of a large table, a
/// revert's index build, staging a large file): sqlx's slow-statement report is logged at info,
/// not as a warning an operator would chase. Batches have their own ceiling, far below a second.
fn quiet_slow_statements(options: PgConnectOptions) -> PgConnectOptions {
    use sqlx::ConnectOptions;
    options.log_slow_statements(log::LevelFilter::Info, std::time::Duration::from_secs(1))
}

/// Opens and closes one connection: the pool would only report that it timed out, this says why
/// (refused, authentication, unknown database).
async fn probe(options: &PgConnectOptions, timeout: std::time::Duration) -> sqlx::Result<()> {
    use sqlx::Connection;
    let connecting = PgConnection::connect_with(options);
    match tokio::time::timeout(timeout, connecting).await {
        Ok(conn) => conn?.close().await,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

/// A connection from `Db::acquire`: plain, or inside a transaction behind a transaction pooler.
pub enum Conn {
    Plain(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

impl Conn {
    /// Commits what the connection wrote (through a transaction pooler) and returns it.
    pub async fn finish(self) -> sqlx::Result<()> {
        match self {
            Conn::Plain(_) => Ok(()),
            Conn::Tx(tx) => tx.commit().await,
        }
    }
}

impl Deref for Conn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self {
            Conn::Plain(c) => c,
            Conn::Tx(t) => t,
        }
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Conn::Plain(c) => c,
            Conn::Tx(t) => t,
        }
    }
}

/// A lone statement: on the pool directly, or in its own transaction behind a transaction
/// pooler (rows are collected before the commit, so a stream ends only after it).
impl<'c> Executor<'c> for &'c Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, sqlx::Result<Either<PgQueryResult, PgRow>>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pooled() {
            return self.pool.fetch_many(query);
        }
        let all = async move {
            let mut tx = self.begin().await?;
            let rows: Vec<_> = tx.fetch_many(query).try_collect().await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(stream::iter(rows.into_iter().map(Ok)))
        };
        stream::once(all).try_flatten().boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, sqlx::Result<Option<PgRow>>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pooled() {
            return self.pool.fetch_optional(query);
        }
        Box::pin(async move {
            let mut tx = self.begin().await?;
            let row = tx.fetch_optional(query).await?;
            tx.commit().await?;
            Ok(row)
        })
    }

    // Part of the trait; backfilld itself never prepares a named statement.
    #[allow(clippy::disallowed_methods)]
    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, sqlx::Result<PgStatement<'q>>>
    where
        'c: 'e,
    {
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, sqlx::Result<Describe<Postgres>>>
    where
        'c: 'e,
    {
        self.pool.describe(sql)
    }
}

/// Runs `statement` to its end. When `wake` fires first, runs `cancel` (a lazy future, e.g.
/// [`Db::cancel_backend`] of the statement's backend) and waits for the statement to end, with
/// 57014 at its next interrupt check: a stop never waits out a long VACUUM or index build, and
/// the connection is left idle, not mid-statement.
pub async fn cancellable<T>(
    statement: impl std::future::Future<Output = sqlx::Result<T>>,
    wake: &tokio_util::sync::CancellationToken,
    cancel: impl std::future::Future<Output = sqlx::Result<()>>,
) -> sqlx::Result<T> {
    tokio::pin!(statement);
    tokio::select! {
        done = &mut statement => done,
        _ = wake.cancelled() => {
            if let Err(e) = cancel.await {
                tracing::warn!(error = %e, "could not cancel a statement on stopping");
            }
            statement.await
        }
    }
}
