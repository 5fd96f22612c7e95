//! How backfilld reaches PostgreSQL: `Db`, the pool every module uses, directly or through a
//! connection pooler.
//!
//! Two rules make the same code work through PgBouncer in transaction mode, where each
//! transaction (and each statement outside one) may run on a different server connection:
//!
//! 1. **Unnamed statements only.** Named prepared statements live on a server connection, so a
//!    pooler hands them to other clients (`prepared statement "sqlx_s_1" already exists`) or
//!    loses them. Every statement is built with `sql::query*`, which marks it non-persistent
//!    (clippy's `disallowed-methods` keeps `sqlx::query*` out of the crate). Without a
//!    transaction pooler the batch's statements are kept prepared (`keeps_statements`).
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
    /// The date settings and `extra_float_digits` as `SET LOCAL`s, appended to every
    /// `begin_with` statement (transaction pooling only; sessions get them on connecting).
    set_local: String,
    /// The date settings every connection reads with (`None` for a pool from elsewhere).
    dates: Option<DateSettings>,
    /// Connections past the pooler (`database.direct_url`) for LISTEN and VACUUM.
    direct: Option<PgPool>,
    /// Whether `direct` reaches the pool's database on the pool's server, checked once
    /// (`direct_matches`).
    direct_checked: std::sync::Arc<tokio::sync::OnceCell<bool>>,
}

impl Db {
    /// A pool that talks to PostgreSQL directly (or through a session pooler).
    pub fn direct(pool: PgPool) -> Self {
        Self {
            pool,
            mode: PoolMode::Session,
            begin: "BEGIN".into(),
            set_local: String::new(),
            dates: None,
            direct: None,
            direct_checked: Default::default(),
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
        // `standard_conforming_strings = on` (the default since 9.1, but a database or role may
        // say otherwise): fragments are checked by a lexer that reads `'\'` as PostgreSQL does
        // with it on; with it off, a backslash would end a string the check thought still open.
        let session = |o: PgConnectOptions| {
            o.options(timeouts.map(|(k, v)| (k, format!("{}ms", v.as_millis()))))
                .options([("standard_conforming_strings", "on")])
        };
        let options: PgConnectOptions = db.url.parse()?;
        let options = quiet_slow_statements(options.application_name(&db.application_name));
        let options = match db.pool_mode {
            PoolMode::Session => session(options),
            // PgBouncer accepts only the start-up parameters it tracks.
            PoolMode::Transaction => options.extra_float_digits(None),
        };
        // Its connection is also the probe: a failure says why (refused, authentication,
        // unknown database), where the lazy pool would only report that it timed out.
        let dates = DateSettings::resolve(&options, db).await?;
        let set_dates = dates.statement("SET");
        let pool_options = || {
            let set_dates = set_dates.clone();
            PgPoolOptions::new()
                .max_connections(db.max_connections)
                .acquire_timeout(db.connect_timeout)
                .after_connect(move |conn, _| {
                    let set_dates = set_dates.clone();
                    Box::pin(async move { conn.execute(set_dates.as_str()).await.map(drop) })
                })
        };
        if db.pool_mode == PoolMode::Session {
            let pool = pool_options().connect_lazy_with(options);
            return Ok(Self {
                dates: Some(dates),
                ..Self::direct(pool)
            });
        }
        // Through a transaction pooler a session setting would reach other clients: the date
        // settings are `SET LOCAL` in every transaction instead, as the timeouts are.
        let pool = PgPoolOptions::new()
            .max_connections(db.max_connections)
            .acquire_timeout(db.connect_timeout)
            .connect_lazy_with(options);
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
        // With the dates, as the driver's start-up parameter would have: floats print exactly
        // (the revert and the CSV predicate compare values by their text, and at a database's
        // `extra_float_digits = 0` two different floats can print alike).
        let set_local = format!(
            "; {}; SET LOCAL extra_float_digits = 3",
            dates.statement("SET LOCAL")
        );
        Ok(Self {
            pool,
            mode: PoolMode::Transaction,
            begin: format!(
                "BEGIN{}; SET LOCAL standard_conforming_strings = on{set_local}",
                set.concat()
            ),
            set_local,
            dates: Some(dates),
            direct,
            direct_checked: Default::default(),
        })
    }

    /// The date settings connections read with (see `DateSettings`).
    pub fn dates(&self) -> Option<&DateSettings> {
        self.dates.as_ref()
    }

    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    fn pooled(&self) -> bool {
        self.mode == PoolMode::Transaction
    }

    /// Whether a statement may stay prepared on its connection (rule 1's exception): only when
    /// every connection is ours for the session. Batches run the same three statements
    /// thousands of times, and a prepared one skips the Parse round trip and the parse (under
    /// CPU contention each round trip is a scheduling delay, and the checkpoint's are spent
    /// holding the batch's row locks).
    pub fn keeps_statements(&self) -> bool {
        !self.pooled()
    }

    /// A transaction with the session defaults.
    pub async fn begin(&self) -> sqlx::Result<Transaction<'static, Postgres>> {
        if self.pooled() {
            self.pool.begin_with(self.begin.clone()).await
        } else {
            self.pool.begin().await
        }
    }

    /// A transaction opened by `statement` (a `BEGIN` with its own `SET LOCAL`s), with the date
    /// and float settings (`set_local`).
    pub async fn begin_with(
        &self,
        statement: String,
    ) -> sqlx::Result<Transaction<'static, Postgres>> {
        self.pool.begin_with(statement + &self.set_local).await
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

    /// Where session-level work goes: past the pooler when `direct_url` is set (and reaches
    /// the pool's database: `direct_matches`), else the pool itself unless it is a transaction
    /// pooler.
    async fn sessions(&self) -> sqlx::Result<Option<&PgPool>> {
        match &self.direct {
            Some(direct) => Ok(self.direct_matches(direct).await?.then_some(direct)),
            None => Ok((!self.pooled()).then_some(&self.pool)),
        }
    }

    /// Whether `direct` (`database.direct_url`) reaches the database the pool does: the same
    /// database name on a server started at the same instant. A URL naming another database (or
    /// a standby) would VACUUM a table of the same name there, and LISTEN where no job is ever
    /// inserted: such a URL is not used (logged once), as if it were not set. Checked once; a
    /// check that fails to connect is tried again next time.
    async fn direct_matches(&self, direct: &PgPool) -> sqlx::Result<bool> {
        const WHERE: &str = "SELECT current_database()::text, pg_postmaster_start_time()::text";
        let check = || async {
            let pooled: (String, String) = crate::sql::query_as(WHERE).fetch_one(self).await?;
            let reached: (String, String) = crate::sql::query_as(WHERE).fetch_one(direct).await?;
            if pooled != reached {
                tracing::error!(
                    pool_database = %pooled.0,
                    pool_server_started = %pooled.1,
                    direct_database = %reached.0,
                    direct_server_started = %reached.1,
                    "database.direct_url reaches another database or server than the pool; not \
                     using it: no LISTEN (the daemon polls) and no VACUUM (the bloat guard \
                     waits for autovacuum). Point it at the server and database behind the pooler"
                );
            }
            Ok::<_, sqlx::Error>(pooled == reached)
        };
        self.direct_checked.get_or_try_init(check).await.copied()
    }

    /// A connection for session-level work (VACUUM, session settings), or `None` through a
    /// transaction pooler without `database.direct_url`. Reset what you set before dropping it.
    pub async fn session(&self) -> sqlx::Result<Option<PoolConnection<Postgres>>> {
        match self.sessions().await? {
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

    /// A LISTEN connection, or `None` through a transaction pooler without `direct_url`.
    pub async fn listener(&self) -> sqlx::Result<Option<PgListener>> {
        match self.sessions().await? {
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

/// How job fragments and data files read dates and times: the `TimeZone` and the date field
/// order a psql session of the same role in the same database gets. sqlx sends `TimeZone=UTC` and
/// `DateStyle=ISO, MDY` as start-up parameters on every connection, which override the
/// database's and the role's settings: without this, `created_at < '02/01/2024'` or
/// `day = created_at::date` would select or write other rows than the same SQL in psql. The
/// output style stays ISO (keys are read back from their text for cursors and checks).
#[derive(Debug, Clone, PartialEq)]
pub struct DateSettings {
    pub timezone: String,
    /// `ISO, DMY`, `ISO, MDY` or `ISO, YMD`.
    pub datestyle: String,
    /// Where they came from, for the log.
    pub from: &'static str,
}

/// The settings `ALTER DATABASE/ROLE … SET` gave this login, most specific first (database and
/// role, role, database, all): `(TimeZone, DateStyle)`, each NULL when none says.
const ROLE_SETTINGS: &str = "
SELECT (array_agg(v ORDER BY rank DESC) FILTER (WHERE k = 'timezone'))[1],
       (array_agg(v ORDER BY rank DESC) FILTER (WHERE k = 'datestyle'))[1]
FROM (SELECT lower(split_part(c, '=', 1)) AS k, substr(c, strpos(c, '=') + 1) AS v,
             (s.setrole <> 0)::int * 2 + (s.setdatabase <> 0)::int AS rank
      FROM pg_db_role_setting s, unnest(s.setconfig) c
      WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
        AND s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = session_user))) o";

/// The server configuration's values (`postgresql.conf`, `ALTER SYSTEM`), where the role may read
/// them (superuser or `pg_read_all_settings`).
const FILE_SETTINGS: &str = "
SELECT (array_agg(setting ORDER BY seqno DESC) FILTER (WHERE name = 'timezone'))[1],
       (array_agg(setting ORDER BY seqno DESC) FILTER (WHERE name = 'datestyle'))[1]
FROM pg_file_settings WHERE applied";

impl DateSettings {
    /// `database.timezone`/`datestyle` when set; else the role's and database's settings; else
    /// the server configuration's; else `log_timezone` (which the server configuration sets
    /// to the same zone as `timezone`, and a client cannot change) and PostgreSQL's default
    /// field order, MDY.
    async fn resolve(
        options: &PgConnectOptions,
        cfg: &crate::config::DatabaseConfig,
    ) -> sqlx::Result<Self> {
        use sqlx::Connection;
        let mut conn =
            tokio::time::timeout(cfg.connect_timeout, PgConnection::connect_with(options))
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??;
        // In a transaction: through a transaction pooler a lone statement may change servers.
        let mut tx = conn.begin().await?;
        let (mut zone, mut style): (Option<String>, Option<String>) =
            crate::sql::query_as(ROLE_SETTINGS)
                .fetch_one(&mut *tx)
                .await?;
        let mut from = "database and role settings";
        if zone.is_none() || style.is_none() {
            let readable: bool = crate::sql::query_scalar(
                "SELECT has_table_privilege('pg_catalog.pg_file_settings', 'SELECT')",
            )
            .fetch_one(&mut *tx)
            .await?;
            if readable {
                let (z, d): (Option<String>, Option<String>) = crate::sql::query_as(FILE_SETTINGS)
                    .fetch_one(&mut *tx)
                    .await?;
                zone = zone.or(z);
                style = style.or(d);
                from = "database and role settings, server configuration";
            }
        }
        if zone.is_none() {
            zone = crate::sql::query_scalar("SELECT current_setting('log_timezone')")
                .fetch_optional(&mut *tx)
                .await?;
            from = "database and role settings, log_timezone";
        }
        let configured = |v: &str| (!v.is_empty()).then(|| v.to_owned());
        if configured(&cfg.timezone).is_some() || configured(&cfg.datestyle).is_some() {
            from = "backfilld configuration (database.timezone, database.datestyle)";
        }
        let zone = configured(&cfg.timezone)
            .or(zone)
            .unwrap_or_else(|| "UTC".into());
        let order = configured(&cfg.datestyle)
            .or(style)
            .and_then(|s| date_order(&s))
            .unwrap_or("MDY");
        let dates = Self {
            timezone: zone,
            datestyle: format!("ISO, {order}"),
            from,
        };
        // A zone the server does not know fails here, naming where it came from, rather than
        // every connection later.
        if let Err(e) = tx.execute(dates.statement("SET LOCAL").as_str()).await {
            return Err(sqlx::Error::Configuration(
                format!("TimeZone {:?} (from {from}): {e}", dates.timezone).into(),
            ));
        }
        tx.commit().await?;
        conn.close().await?;
        Ok(dates)
    }

    /// `SET TimeZone = …; SET DateStyle = …` with `set` as the verb (`SET` or `SET LOCAL`).
    fn statement(&self, set: &str) -> String {
        format!(
            "{set} TimeZone = {}; {set} DateStyle = {}",
            crate::sql::quote_literal(&self.timezone),
            crate::sql::quote_literal(&self.datestyle)
        )
    }
}

/// The date field order a `DateStyle` value sets, as PostgreSQL reads it: `DMY`, `MDY` or
/// `YMD` (or their old names `European`, `NonEuropean`/`US`), `German` alone meaning DMY; `None`
/// when it names none.
pub fn date_order(datestyle: &str) -> Option<&'static str> {
    let mut order = None;
    let mut german = false;
    for word in datestyle.split([',', ' ']).filter(|w| !w.is_empty()) {
        match word.to_ascii_lowercase().as_str() {
            "dmy" | "euro" | "european" => order = Some("DMY"),
            "mdy" | "us" | "noneuro" | "noneuropean" => order = Some("MDY"),
            "ymd" => order = Some("YMD"),
            "german" => german = true,
            _ => {}
        }
    }
    order.or(german.then_some("DMY"))
}

/// Statements over a second are expected here (the bloat guard's VACUUM of a large table, a
/// revert's index build, staging a large file): sqlx's slow-statement report is logged at info,
/// not as a warning an operator would chase. Batches have their own ceiling, far below a second.
fn quiet_slow_statements(options: PgConnectOptions) -> PgConnectOptions {
    use sqlx::ConnectOptions;
    options.log_slow_statements(log::LevelFilter::Info, std::time::Duration::from_secs(1))
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

/// Runs `statement` to its end. When `wake` fires first, runs `cancel` (e.g.
/// [`Db::cancel_backend`] of the statement's backend) and waits for the statement to end, with
/// 57014 at its next interrupt check: a stop never waits out a long VACUUM or index build, and
/// the connection is left idle, not mid-statement. The cancel is sent again every
/// `CANCEL_AGAIN` while the statement runs on: one that reached the backend before the
/// statement did (the stop came as it was being sent, or before its first poll) cancels nothing.
pub async fn cancellable<T, F>(
    statement: impl std::future::Future<Output = sqlx::Result<T>>,
    wake: &tokio_util::sync::CancellationToken,
    cancel: impl Fn() -> F,
) -> sqlx::Result<T>
where
    F: std::future::Future<Output = sqlx::Result<()>>,
{
    tokio::pin!(statement);
    tokio::select! {
        done = &mut statement => return done,
        _ = wake.cancelled() => {}
    }
    loop {
        if let Err(e) = cancel().await {
            tracing::warn!(error = %e, "could not cancel a statement on stopping");
        }
        tokio::select! {
            done = &mut statement => return done,
            _ = tokio::time::sleep(CANCEL_AGAIN) => {}
        }
    }
}

/// How long a statement cancelled on stopping may run on before it is cancelled again.
const CANCEL_AGAIN: std::time::Duration = std::time::Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::date_order;

    /// A stop that comes as the statement is being sent: the first cancel reaches a backend
    /// that is not running it yet and is lost (a final VACUUM then ran its whole course, which
    /// a cost-limited one made minutes). The cancel is sent again until the statement ends.
    #[tokio::test]
    async fn a_cancel_that_came_too_early_is_sent_again() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let wake = tokio_util::sync::CancellationToken::new();
        wake.cancel();
        let cancels = Arc::new(AtomicU32::new(0));
        let seen = cancels.clone();
        let statement = async move {
            // Only the second cancel finds the statement running.
            while seen.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err::<(), _>(sqlx::Error::Protocol("canceling statement".into()))
        };
        let cancel = || {
            let cancels = cancels.clone();
            async move {
                cancels.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        };
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            super::cancellable(statement, &wake, cancel),
        )
        .await;
        assert!(matches!(ended, Ok(Err(_))), "{ended:?}");
        assert_eq!(cancels.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn date_order_reads_datestyle_as_postgresql_does() {
        for (style, order) in [
            ("ISO, MDY", Some("MDY")),
            ("SQL, DMY", Some("DMY")),
            ("dmy", Some("DMY")),
            ("Postgres,YMD", Some("YMD")),
            ("German", Some("DMY")),
            ("German, MDY", Some("MDY")),
            ("European", Some("DMY")),
            ("US", Some("MDY")),
            ("ISO", None),
            ("", None),
        ] {
            assert_eq!(date_order(style), order, "{style}");
        }
    }
}
