//! Dry-run plans and verification. Both walk the key range up to the frozen upper bound in
//! keyset windows (never one statement over the whole table), counting the rows the predicate
//! selects. A plan adds sample rows with before/after values, the EXPLAIN of one batch's write,
//! and a duration estimate at the job's throttle from a timed trial of that write.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;

use crate::db::Db;
use tokio_util::sync::CancellationToken;

use crate::change::Change;
use crate::error::JobError;
use crate::job::{Action, Throttle};
use crate::keyset::{Key, Keyset, bind_keys};
use crate::sql::quote_ident;
use crate::target::Target;
use crate::throttle::Controller;

/// The dry-run report stored in `jobs.plan`, read back typed (fields a plan stored by an older
/// version lacks take their defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Plan {
    /// Rows up to the upper bound that the predicate selects: the rows the job would change.
    pub rows_matching: i64,
    /// Keys up to the upper bound: what the job will scan.
    pub rows_in_range: i64,
    pub upper_bound: Value,
    pub samples: Vec<Value>,
    pub explain: Value,
    pub estimated_seconds: f64,
    pub estimate_basis: String,
    /// The timed, rolled-back write of the first window the estimate scales (`None`: not run).
    pub trial: Option<Trial>,
    pub count_seconds: f64,
    /// `[keys up to here, last key]` per counting window: where parallel slices are cut.
    pub boundaries: Vec<(i64, Value)>,
    /// The first and the last counting window with a matching row (`None`: no match, or a plan
    /// from before this was recorded): the walk is narrowed to them (`Plan::walk`).
    pub matching_windows: Option<(usize, usize)>,
    /// Keys the batches walk: `rows_in_range`, or fewer when the matches lie in part of it.
    pub keys_to_walk: Option<i64>,
    /// Would a second run change the sampled rows again? (Updates only.)
    pub idempotency: Option<crate::idempotency::Verdict>,
    /// Foreign keys a delete would cascade through, with their child rows. (Deletes only.)
    pub cascades: Vec<crate::cascade::Cascade>,
    /// Updates from a data file: staged keys that match no target row (they change nothing).
    pub unmatched_staged_keys: Option<i64>,
    /// Tables other than the target that every batch would read in full (`fullscan`).
    pub warnings: Vec<String>,
    /// What the job planned under (its tables' oids, its key, row-level security): a later
    /// attempt refuses what changed since (`pin`). Empty in older plans.
    pub pinned: crate::pin::Pinned,
}

impl Plan {
    /// The plan of a job whose table had no key when it started: nothing to walk.
    pub fn of_empty_range() -> Plan {
        Plan {
            upper_bound: Value::Null,
            keys_to_walk: Some(0),
            estimate_basis: "the key range was empty when planned".into(),
            ..Default::default()
        }
    }

    /// The plan as stored in the job row.
    pub fn from_stored(value: &Value) -> Result<Plan, serde_json::Error> {
        Plan::deserialize(value)
    }

    pub fn to_stored(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }

    /// The counting boundaries whose keys fit `width`.
    pub fn key_boundaries(&self, width: usize) -> Vec<(i64, Key)> {
        self.boundaries
            .iter()
            .filter_map(|(n, key)| Some((*n, Key::from_json(key, width)?)))
            .collect()
    }

    /// The part of the key range the batches walk: from the end of the window before the first
    /// one with a match to the end of the last one with a match. A sparse job whose matches
    /// cluster (recent rows, one tenant, a bad import) scans about its range of matches instead
    /// of the whole table. Rows that start to match after the plan outside that part are not
    /// changed; the verification after the walk counts the whole range, so they show in
    /// `remaining` (and `backfilld wait` does not pass).
    pub fn walk(&self, width: usize) -> Walk {
        let bounds = self.key_boundaries(width);
        if bounds.len() != self.boundaries.len() || bounds.is_empty() {
            return Walk::Whole;
        }
        let Some((first, last)) = self.matching_windows else {
            return if self.rows_matching == 0 {
                Walk::Nothing
            } else {
                Walk::Whole
            };
        };
        if first > last || last >= bounds.len() {
            return Walk::Whole;
        }
        if first == 0 && last == bounds.len() - 1 {
            return Walk::Whole;
        }
        let before = if first == 0 { 0 } else { bounds[first - 1].0 };
        Walk::Part {
            from: (first > 0).then(|| bounds[first - 1].1.clone()),
            to: (last < bounds.len() - 1).then(|| bounds[last].1.clone()),
            keys: (before, bounds[last].0),
        }
    }
}

/// Where the batches go (see `Plan::walk`).
#[derive(Debug, Clone, PartialEq)]
pub enum Walk {
    /// The whole range up to the upper bound.
    Whole,
    /// Keys in `(from, to]` (`None`: the range's own start, or the upper bound), which are the
    /// keys counted from `keys.0` (exclusive) to `keys.1` (inclusive).
    Part {
        from: Option<Key>,
        to: Option<Key>,
        keys: (i64, i64),
    },
    /// The plan found no matching row: nothing to walk.
    Nothing,
}

/// What counting needs: the table, its keys, the predicate and the bound.
pub struct Counter<'a> {
    pub pool: &'a Db,
    pub job: &'a str,
    /// How errors name the job's table (`Target::named_with`).
    pub table: &'a str,
    pub target: &'a Target,
    pub keyset: &'a Keyset,
    pub predicate: &'a str,
    pub upper: &'a Key,
    pub throttle: &'a Throttle,
    pub cancel: &'a CancellationToken,
}

/// Block windows for verification: 8 MiB to start, at most 1 GiB, adapted to `target_batch_ms`.
const BLOCK_WINDOW: (i64, i64, i64) = (1024, 128, 131_072);

/// What a keyset count found.
#[derive(Debug, Clone, Default)]
pub struct Counted {
    /// Keys up to the upper bound.
    pub keys: i64,
    /// Of those, rows the predicate selects.
    pub matching: i64,
    /// `(keys up to here, last key)` at the end of each window: where slices may be cut.
    pub boundaries: Vec<(i64, Value)>,
    /// The first and the last window with a matching row.
    pub matching_windows: Option<(usize, usize)>,
}

/// A count's statements (`Counter::count_statements`), `[first window, next windows]`.
struct CountSql {
    /// Keys in the window and its last key; without `matching`, also its matching rows.
    window: [String; 2],
    /// With a subquery in the predicate: the rows in `(cursor, last]` it selects.
    matching: Option<[String; 2]>,
}

/// Count windows are reads, so they may be larger than write batches.
const COUNT_WINDOW_FACTOR: i64 = 10;

impl Counter<'_> {
    fn err(&self, step: &'static str) -> impl Fn(sqlx::Error) -> JobError + '_ {
        move |e| JobError::sql(self.job, self.table, step, e)
    }

    fn count_sql(&self, has_cursor: bool) -> String {
        let (range, limit) = self.keyset.range(None, has_cursor);
        let inner = format!(
            "SELECT {cols}, coalesce(({pred}), false) AS _bf_match
             FROM {table} WHERE {range} ORDER BY {order} LIMIT ${limit}",
            cols = self.keyset.columns(None),
            pred = self.predicate,
            table = self.target.quoted,
            order = self.keyset.order(None, false),
        );
        self.keyset
            .summarise(&inner, &["count(*) FILTER (WHERE _bf_match)"])
    }

    /// `(keys in range, keys matching)`, counted window by window with the job's pause between
    /// windows. Returns `None` if cancelled part-way.
    pub async fn count(&self) -> Result<Option<Counted>, JobError> {
        let mut sizing = self.throttle.clone();
        sizing.initial_size *= COUNT_WINDOW_FACTOR;
        sizing.max_size *= COUNT_WINDOW_FACTOR;
        let mut controller = Controller::new(&sizing, None);
        let (mut cursor, mut counted) = (None::<Key>, Counted::default());
        let sql = self.count_statements();
        loop {
            let started = Instant::now();
            let window = self
                .count_window(&sql, cursor.as_ref(), controller.size())
                .await;
            if window.is_err() && self.cancel.is_cancelled() {
                return Ok(None);
            }
            let Some((in_window, matching, last)) = window? else {
                return Ok(Some(counted));
            };
            counted.keys += in_window;
            counted.matching += matching;
            if matching > 0 {
                let window = counted.boundaries.len();
                let first = counted.matching_windows.map_or(window, |(f, _)| f);
                counted.matching_windows = Some((first, window));
            }
            counted.boundaries.push((counted.keys, last.to_json()));
            // A window short of its limit has read the rest of the range.
            if in_window < controller.size() {
                return Ok(Some(counted));
            }
            cursor = Some(last);
            controller.observe(started.elapsed());
            if !self.pause().await {
                return Ok(None);
            }
        }
    }

    /// The statements of a count, each for the first window and for the next ones. A predicate
    /// without a subquery is evaluated in the window's own scan (one pass). One with a subquery
    /// is counted by a second statement with the predicate in `WHERE`, as the batches write it:
    /// in a select list PostgreSQL runs the subquery once per row and cannot join, so an
    /// unindexed one (a self-join that finds duplicates) read the whole table for every key
    /// (14.5 s for a 20,000-row plan).
    fn count_statements(&self) -> CountSql {
        let cases = |f: &dyn Fn(bool) -> String| [f(false), f(true)];
        if !crate::fragment::has_subquery(self.predicate) {
            return CountSql {
                window: cases(&|c| self.count_sql(c)),
                matching: None,
            };
        }
        let matching = |has_cursor| {
            let (range, _) = self.keyset.range(None, has_cursor);
            format!(
                "SELECT count(*) FROM {} WHERE {range} AND ({})",
                self.target.quoted, self.predicate
            )
        };
        CountSql {
            window: cases(&|c| self.keyset.window_sql(c)),
            matching: Some(cases(&matching)),
        }
    }

    /// One window after `cursor` of up to `size` keys: its keys, its matching rows and its last
    /// key; `None` past the end of the range. A stop cancels its statements server-side (a
    /// window of an unindexed predicate can run for seconds).
    async fn count_window(
        &self,
        sql: &CountSql,
        cursor: Option<&Key>,
        size: i64,
    ) -> Result<Option<(i64, i64, Key)>, JobError> {
        let step = "counting matching rows";
        let (mut conn, pid) = self.counting_connection().await?;
        let counting = self.count_window_on(&mut conn, sql, cursor, size);
        let cancel = || self.pool.cancel_backend(pid, false);
        let counted = crate::db::cancellable(counting, self.cancel, cancel)
            .await
            .map_err(self.err(step))?;
        conn.finish().await.map_err(self.err(step))?;
        Ok(counted)
    }

    /// A pooled connection for one counting statement, and its backend's pid (to cancel it).
    async fn counting_connection(&self) -> Result<(crate::db::Conn, i32), JobError> {
        let step = "counting matching rows";
        let mut conn = self.pool.acquire().await.map_err(self.err(step))?;
        let pid = crate::sql::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .map_err(self.err(step))?;
        Ok((conn, pid))
    }

    async fn count_window_on(
        &self,
        conn: &mut sqlx::PgConnection,
        sql: &CountSql,
        cursor: Option<&Key>,
        size: i64,
    ) -> sqlx::Result<Option<(i64, i64, Key)>> {
        let which = usize::from(cursor.is_some());
        let Some(matching_sql) = &sql.matching else {
            return self
                .count_in_window(conn, &sql.window[which], cursor, size)
                .await;
        };
        let window = self
            .keyset
            .read_window(&mut *conn, &sql.window[which], (cursor, self.upper), size)
            .await?;
        let Some((in_window, last)) = window else {
            return Ok(None);
        };
        let bounds: Vec<&Key> = cursor.into_iter().chain([&last]).collect();
        let counted = bind_keys(crate::sql::query(&matching_sql[which]), &bounds)
            .fetch_one(&mut *conn)
            .await?;
        let matching = counted.try_get::<i64, _>(0)?;
        Ok(Some((in_window, matching, last)))
    }

    /// A window counted in one pass (`count_sql`): its keys, its matching rows, its last key.
    async fn count_in_window(
        &self,
        conn: &mut sqlx::PgConnection,
        sql: &str,
        cursor: Option<&Key>,
        size: i64,
    ) -> sqlx::Result<Option<(i64, i64, Key)>> {
        let window =
            crate::keyset::fetch_window(conn, (sql, false), (cursor, self.upper), size).await?;
        let Some((in_window, row)) = window else {
            return Ok(None);
        };
        let matching = row.try_get::<i64, _>(1)?;
        let last = Key::from_row(&row, 2, self.keyset.width())?;
        Ok(Some((in_window, matching, last)))
    }

    /// Tightens a narrowed walk from window ends to its matches: it then starts right before
    /// the first matching key and ends at the last. Each read stops at the first match from its
    /// end of the range, which lies in the first (last) window the plan found a match in, so it
    /// reads at most a window's keys, never the table. Matches gone since the plan leave the
    /// walk as it was.
    pub async fn tighten(&self, walk: Walk) -> Result<Walk, JobError> {
        let Walk::Part { from, to, keys } = walk else {
            return Ok(walk);
        };
        let end = to.clone().unwrap_or_else(|| self.upper.clone());
        let (Some(first), Some(last)) = (
            self.edge_match(from.as_ref(), &end, false).await?,
            self.edge_match(from.as_ref(), &end, true).await?,
        ) else {
            return Ok(Walk::Part { from, to, keys });
        };
        let before = format!(
            "SELECT {} FROM {} WHERE {} < {} ORDER BY {} LIMIT 1",
            self.keyset.as_text_output(),
            self.target.quoted,
            self.keyset.row(None),
            self.keyset.params(1),
            self.keyset.order(None, true)
        );
        let row = bind_keys(crate::sql::query(&before), &[&first])
            .fetch_optional(self.pool)
            .await
            .map_err(self.err("finding where the matches start"))?;
        let from = match row {
            Some(row) => Some(
                Key::from_row(&row, 0, self.keyset.width()).map_err(self.err("reading a key"))?,
            ),
            None => None,
        };
        Ok(Walk::Part {
            from,
            to: Some(last),
            keys,
        })
    }

    /// The first (or, `descending`, the last) key in `(from, to]` the predicate selects.
    async fn edge_match(
        &self,
        from: Option<&Key>,
        to: &Key,
        descending: bool,
    ) -> Result<Option<Key>, JobError> {
        let (range, _) = self.keyset.range(None, from.is_some());
        let sql = format!(
            "SELECT {} FROM {} WHERE {range} AND ({}) ORDER BY {} LIMIT 1",
            self.keyset.as_text_output(),
            self.target.quoted,
            self.predicate,
            self.keyset.order(None, descending)
        );
        let bounds: Vec<&Key> = from.into_iter().chain([to]).collect();
        let row = bind_keys(crate::sql::query(&sql), &bounds)
            .fetch_optional(self.pool)
            .await
            .map_err(self.err("finding where the matches start and end"))?;
        row.map(|r| Key::from_row(&r, 0, self.keyset.width()))
            .transpose()
            .map_err(self.err("reading a key"))
    }

    /// The job's pause between windows; `false` when cancelled.
    async fn pause(&self) -> bool {
        let pause = Duration::from_millis(self.throttle.sleep_ms as u64);
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }
}

/// Verification only needs a count, not key order, so it reads the table in physical block ranges
/// (TID range scans: sequential reads after a backfill has scattered new row versions), one
/// window per statement, throttled like the keyset walk. Rows moved by concurrent updates while
/// it runs may be seen in two windows or none; the number is a moment's reading, like any count
/// under live traffic.
impl Counter<'_> {
    /// Rows up to the upper bound that match the predicate; `None` if cancelled part-way.
    /// Partitioned parents have no blocks of their own and are counted by keyset instead.
    pub async fn count_matching(&self) -> Result<Option<i64>, JobError> {
        if self.target.partitioned {
            return Ok(self.count().await?.map(|c| c.matching));
        }
        let (upper, next) = self.keyset.range(None, false);
        let sql = format!(
            "SELECT count(*) FROM {table}
             WHERE ctid >= ${next}::tid AND ctid < ${}::tid AND {upper} AND ({pred})",
            next + 1,
            table = self.target.quoted,
            pred = self.predicate,
        );
        let (initial_size, min_size, max_size) = BLOCK_WINDOW;
        let sizing = Throttle {
            initial_size,
            min_size,
            max_size,
            ..self.throttle.clone()
        };
        let mut controller = Controller::new(&sizing, None);
        let (mut from, mut blocks, mut matching) = (0i64, self.blocks().await?, 0i64);
        while from < blocks {
            let started = Instant::now();
            let to = from + controller.size();
            let (mut conn, pid) = self.counting_connection().await?;
            let counting = bind_keys(crate::sql::query(&sql), &[self.upper])
                .bind(format!("({from},0)"))
                .bind(format!("({to},0)"))
                .try_map(|row: sqlx::postgres::PgRow| row.try_get(0))
                .fetch_one(&mut *conn);
            let cancel = || self.pool.cancel_backend(pid, false);
            let n: i64 = match crate::db::cancellable(counting, self.cancel, cancel).await {
                Err(_) if self.cancel.is_cancelled() => return Ok(None),
                counted => counted.map_err(self.err("verifying"))?,
            };
            conn.finish().await.map_err(self.err("verifying"))?;
            matching += n;
            from = to;
            controller.observe(started.elapsed());
            if from >= blocks {
                // Blocks added meanwhile (new row versions) are read too.
                blocks = self.blocks().await?;
            }
            if from < blocks && !self.pause().await {
                return Ok(None);
            }
        }
        Ok(Some(matching))
    }

    async fn blocks(&self) -> Result<i64, JobError> {
        crate::sql::query_scalar(
            "SELECT pg_relation_size($1) / current_setting('block_size')::bigint",
        )
        .bind(sqlx::postgres::types::Oid(self.target.oid))
        .fetch_one(self.pool)
        .await
        .map_err(self.err("verifying"))
    }
}

impl Counter<'_> {
    /// The `jsonb_build_object` arguments of one sample row: key plus before and after values
    /// (update), the values to insert (insert), or the whole row (delete).
    fn sample_body(&self, assignments: &[crate::fragment::Assignment], action: Action) -> String {
        let pairs = json_object;
        let key = format!("jsonb_build_array({})", self.keyset.as_text());
        match action {
            Action::Update => {
                let before = pairs(
                    assignments
                        .iter()
                        .map(|a| (a.column.clone(), quote_ident(&a.column)))
                        .collect(),
                );
                let after = pairs(
                    assignments
                        .iter()
                        .map(|a| (a.column.clone(), sample_value(&a.expr)))
                        .collect(),
                );
                format!("'key', {key}, 'before', {before}, 'after', {after}")
            }
            Action::Insert => {
                let row = pairs(
                    assignments
                        .iter()
                        .map(|a| (a.column.clone(), sample_value(&a.expr)))
                        .collect(),
                );
                format!("'key', {key}, 'insert', {row}")
            }
            _ => {
                let row = pairs(
                    self.target
                        .columns
                        .iter()
                        .map(|c| (c.name.clone(), quote_ident(&c.name)))
                        .collect(),
                );
                format!("'key', {key}, 'row', {row}")
            }
        }
    }

    /// Sample rows the change would touch: key plus before and after values (update), or the
    /// whole row (delete).
    pub async fn samples(
        &self,
        assignments: &[crate::fragment::Assignment],
        action: Action,
        limit: i64,
    ) -> Result<Vec<Value>, JobError> {
        let body = self.sample_body(assignments, action);
        let (range, limit_param) = self.keyset.range(None, false);
        let sql = format!(
            "SELECT jsonb_build_object({body}) FROM {table}
             WHERE {range} AND ({predicate}) ORDER BY {order} LIMIT ${limit_param}",
            table = self.target.quoted,
            predicate = self.predicate,
            order = self.keyset.order(None, false),
        );
        // The after-values evaluate the set clause, which may call functions that write (an
        // audit insert): in a transaction that is rolled back, so a dry run commits nothing.
        // (Sequence values it draws stay drawn, as in any rolled-back transaction.)
        let mut tx = self.pool.begin().await.map_err(self.err("sampling rows"))?;
        let rows = bind_keys(crate::sql::query(&sql), &[self.upper])
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(self.err("sampling rows"))?;
        tx.rollback().await.map_err(self.err("sampling rows"))?;
        rows.iter()
            .map(|r| r.try_get::<Value, _>(0))
            .collect::<sqlx::Result<Vec<_>>>()
            .map_err(self.err("sampling rows"))
    }
}

/// An assigned expression as a sample shows it: evaluated, except `DEFAULT`, which only an
/// INSERT or UPDATE may say (shown as the word).
fn sample_value(expr: &str) -> String {
    if expr.trim().eq_ignore_ascii_case("default") {
        "'DEFAULT'::text".into()
    } else {
        format!("({expr})")
    }
}

/// The first window of up to `size` keys: how many it holds and its last key; `None` for an
/// empty range.
pub async fn first_window(
    pool: &Db,
    keyset: &Keyset,
    upper: &Key,
    size: i64,
) -> sqlx::Result<Option<(i64, Key)>> {
    let sql = keyset.window_sql(false);
    keyset.read_window(pool, &sql, (None, upper), size).await
}

/// `EXPLAIN (FORMAT JSON, VERBOSE)` of the first batch's write (never executed), the window
/// ending at `first_hi`. Explains the plain statement, since a dry run creates no archive table.
pub async fn explain(pool: &Db, change: &Change, first_hi: &Key) -> Value {
    let sql = format!("EXPLAIN (FORMAT JSON, VERBOSE) {}", change.statement(false));
    let result = bind_keys(crate::sql::query(&sql), &[first_hi])
        .fetch_one(pool)
        .await
        .and_then(|row| row.try_get::<Value, _>(0));
    match result {
        Ok(v) => v,
        Err(e) => Value::String(format!("EXPLAIN failed: {e}")),
    }
}

/// The plan's timed write of the walk's first windows, rolled back (`runner::planning`): this
/// server's speed for this change, which the estimate scales to the whole walk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Trial {
    /// Keys in the windows the trial wrote.
    pub keys: i64,
    /// Rows the change touched in them.
    pub changed: i64,
    pub seconds: f64,
    /// A write reached the batch ceiling (`max_batch_ms`) and was cancelled: `seconds` is a
    /// lower bound, and so is the estimate.
    pub timed_out: bool,
    /// Each window written, in walk order (none smaller than the one before). Empty in plans
    /// written before windows were recorded.
    pub windows: Vec<TrialWindow>,
}

/// One window of a trial: its keys and how long reading and writing it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TrialWindow {
    pub keys: i64,
    pub seconds: f64,
}

impl Trial {
    /// Seconds per key of the last window: the trial grows its windows towards a batch's
    /// duration, so the last one carries a batch's fixed part (window read, statement start-up,
    /// checkpoint) in about the proportion the batches will, and none of the first statements'
    /// warm-up. Plans written before windows were recorded: all keys over all seconds.
    pub fn per_key(&self) -> f64 {
        match self.windows.last() {
            Some(w) if w.keys > 0 => w.seconds / w.keys as f64,
            _ => self.seconds / self.keys.max(1) as f64,
        }
    }
}

/// Time to finish at the job's throttle, `slices` walking at once. With a trial: the controller
/// sizes batches so each takes `target_batch_ms` (within `min_size`..`max_size`), so the walk
/// costs its keys at the trial's speed plus one pause per batch. Without one: batches of the
/// initial size of `target_batch_ms` each, roughly. The rows-per-second cap when that
/// is slower. Neither counts health holds or the bloat guard's VACUUMs.
pub fn estimate(
    t: &Throttle,
    walk: i64,
    matching: i64,
    trial: Option<&Trial>,
    slices: usize,
) -> (f64, String) {
    let (seconds, basis) = match trial.filter(|tr| tr.keys > 0 && tr.seconds > 0.0) {
        Some(tr) => by_trial(t, walk, tr),
        None => by_formula(t, walk),
    };
    let (by_batches, basis) = match slices {
        0 | 1 => (seconds, basis),
        n => (
            seconds / n as f64,
            format!("{basis}, in {n} slices at once"),
        ),
    };
    if t.max_rows_per_second > 0 {
        let by_rate = matching as f64 / t.max_rows_per_second as f64;
        if by_rate > by_batches {
            return (
                by_rate,
                format!("max_rows_per_second={}", t.max_rows_per_second),
            );
        }
    }
    (by_batches, basis)
}

/// The walk's keys at the trial's speed, in batches sized to the target, plus their pauses.
fn by_trial(t: &Throttle, walk: i64, tr: &Trial) -> (f64, String) {
    let per_key = tr.per_key();
    let target = t.target_batch_ms as f64 / 1000.0;
    let size = (target / per_key.max(f64::MIN_POSITIVE))
        .clamp(t.min_size as f64, t.max_size as f64)
        .round();
    let batches = (walk as f64 / size).ceil();
    let last = match tr.windows.as_slice() {
        [_, .., w] => format!(
            " in {} windows, the last of {} keys in {:.1} ms",
            tr.windows.len(),
            w.keys,
            w.seconds * 1000.0
        ),
        _ => String::new(),
    };
    let basis = format!(
        "{}a trial write of the walk's first {} keys{last} ({} rows changed{}) took {:.1} ms, \
         rolled back: about {batches} batches of {size} keys at target_batch_ms={}, plus \
         sleep_ms={} each",
        if tr.timed_out { "at least: " } else { "" },
        tr.keys,
        tr.changed,
        if tr.timed_out {
            ", cancelled at max_batch_ms"
        } else {
            ""
        },
        tr.seconds * 1000.0,
        t.target_batch_ms,
        t.sleep_ms,
    );
    let sleep = t.sleep_ms as f64 / 1000.0;
    (walk as f64 * per_key + batches * sleep, basis)
}

/// Without a trial: batches of the job's initial size taking the target each, plus their
/// pauses. Rough: the controller may grow or shrink the batches (it had taken batches of
/// `max_size`, and said "0s" for a copy that ran 272 batches in 18 s).
fn by_formula(t: &Throttle, walk: i64) -> (f64, String) {
    let size = t.initial_size.clamp(t.min_size, t.max_size).max(1);
    let batches = (walk as f64 / size as f64).ceil();
    let per_batch = (t.target_batch_ms + t.sleep_ms) as f64 / 1000.0;
    let basis = format!(
        "roughly: no trial write; {batches} batches of {size} keys (the initial batch size) at \
         target_batch_ms={} plus sleep_ms={}",
        t.target_batch_ms, t.sleep_ms
    );
    (batches * per_batch, basis)
}

/// A JSON object of `(name, SQL expression)` pairs. PostgreSQL passes at most 100 arguments to a
/// function, so `jsonb_build_object` takes 50 pairs at a time and the pieces are merged with `||`
/// (a table of 51 columns could not be sampled before).
fn json_object(pairs: Vec<(String, String)>) -> String {
    if pairs.is_empty() {
        return "'{}'::jsonb".into();
    }
    pairs
        .chunks(50)
        .map(|chunk| {
            let args: Vec<String> = chunk
                .iter()
                .map(|(name, expr)| format!("{}, {expr}", crate::sql::quote_literal(name)))
                .collect();
            format!("jsonb_build_object({})", args.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" || ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle {
            initial_size: 1000,
            min_size: 100,
            max_size: 10_000,
            target_batch_ms: 400,
            max_batch_ms: 800,
            sleep_ms: 100,
            max_rows_per_second: 0,
            preset: crate::job::Preset::Gentle,
        }
    }

    #[test]
    fn estimate_takes_the_slower_of_batches_and_rate() {
        let t = throttle();
        // 100 batches of the initial 1,000 keys, 400 ms each plus a pause of 100 ms.
        assert_eq!(estimate(&t, 100_000, 100_000, None, 1).0, 50.0);
        let capped = Throttle {
            max_rows_per_second: 100,
            ..t
        };
        assert_eq!(estimate(&capped, 100_000, 10_000, None, 1).0, 100.0);
    }

    #[test]
    fn a_trial_sizes_batches_to_the_target_and_adds_a_pause_per_batch() {
        let t = throttle();
        // 1000 keys in 0.1 s: 0.1 ms per key, so 4000-key batches of 400 ms; 100k keys are 10 s
        // of writing and 25 pauses of 100 ms.
        let trial = Trial {
            keys: 1000,
            changed: 1000,
            seconds: 0.1,
            ..Default::default()
        };
        let (secs, basis) = estimate(&t, 100_000, 100_000, Some(&trial), 1);
        assert!((secs - 12.5).abs() < 1e-9, "{secs}");
        assert!(basis.contains("25 batches of 4000 keys"), "{basis}");
        // Two slices share the walk.
        assert!((estimate(&t, 100_000, 100_000, Some(&trial), 2).0 - 6.25).abs() < 1e-9);
        // Fast writes: batches stop at max_size (10 pauses); slow ones at min_size (1000 pauses).
        let fast = Trial {
            seconds: 0.001,
            ..trial.clone()
        };
        assert!((estimate(&t, 100_000, 100_000, Some(&fast), 1).0 - 1.1).abs() < 1e-9);
        let slow = Trial {
            seconds: 10.0,
            timed_out: true,
            ..trial
        };
        let (secs, basis) = estimate(&t, 100_000, 100_000, Some(&slow), 1);
        assert!((secs - 1100.0).abs() < 1e-9, "{secs}");
        assert!(basis.starts_with("at least"), "{basis}");
    }

    #[test]
    fn the_last_window_sets_the_speed() {
        let t = throttle();
        // A first window slowed by the first statements' start-up (1000 keys in 30 ms), then
        // 4000 keys in 40 ms: 10 µs per key, so 40,000-key batches, capped at 10,000.
        let window = |keys, seconds| TrialWindow { keys, seconds };
        let trial = Trial {
            keys: 5000,
            changed: 5000,
            seconds: 0.07,
            timed_out: false,
            windows: vec![window(1000, 0.03), window(4000, 0.04)],
        };
        assert!((trial.per_key() - 1e-5).abs() < 1e-12);
        let (secs, basis) = estimate(&t, 100_000, 100_000, Some(&trial), 1);
        assert!((secs - 2.0).abs() < 1e-9, "{secs}");
        assert!(
            basis.contains("first 5000 keys in 2 windows, the last of 4000 keys in 40.0 ms"),
            "{basis}"
        );
    }
}
