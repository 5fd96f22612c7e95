//! Parallel slices: cutting the frozen key range at the plan's counting boundaries, running one
//! batch loop per slice, and merging how they ended.

use serde::Deserialize;

use super::*;
use crate::plan::Walk;

impl Attempt<'_> {
    /// Runs every slice of the key range at once and merges how they ended. `Ok(None)` when the
    /// whole range is exhausted.
    pub(super) async fn run_slices(
        &mut self,
        p: &Prepared,
        change: &Change,
        upper: &Key,
        plan: &Plan,
    ) -> Result<Option<Outcome>, JobError> {
        let slices = self.slices(p, plan, upper).await?;
        self.slice_count
            .store(slices.len(), std::sync::atomic::Ordering::Relaxed);
        if slices.len() > 1 {
            tracing::info!(
                slices = slices.len(),
                "walking the key range in parallel slices"
            );
        }
        let guard = self.bloat_guard(p).await;
        let this: &Self = self;
        let progress = std::sync::Mutex::new(Progress::new(&this.row));
        let stop = this.interrupt.child_token();
        // A slice that ends for any reason but exhaustion stops its siblings.
        let runs = slices.iter().map(|slice| async {
            let result = this
                .batch_loop(p, change, slice, &progress, &guard, &stop)
                .await;
            if !matches!(result, Ok(None)) {
                stop.cancel();
            }
            result
        });
        let ended = merge(futures_util::future::join_all(runs).await)?;
        if ended.is_none() && guard.wants_final() {
            self.vacuum_held(p, &guard, Pass::Final, &self.interrupt)
                .await;
        }
        Ok(ended)
    }

    /// The slices of this run: stored ones when resuming, else cut from the plan's window
    /// boundaries (only before the first batch), else the single `cursor`.
    async fn slices(
        &mut self,
        p: &Prepared,
        plan: &Plan,
        upper: &Key,
    ) -> Result<Vec<Slice>, JobError> {
        let width = p.keyset.width();
        if let Some(stored) = &self.row.slices {
            return Slice::parse_all(stored, width).ok_or_else(|| {
                JobError::invalid(
                    &self.row.name,
                    format!("stored slices {stored} do not fit the key columns"),
                )
            });
        }
        let fresh = self.row.cursor.is_none();
        let Some((from, to, keys)) = self.walk_range(p, plan, upper, fresh).await? else {
            return Ok(Vec::new());
        };
        let parts = if fresh { p.spec.parallelism } else { 1 };
        let cuts = cut_points(&plan.key_boundaries(width), keys, parts);
        if cuts.is_empty() && from.is_none() && to == *upper {
            let cursor = self.stored_cursor(width)?;
            return Ok(vec![Slice {
                slot: None,
                cursor,
                upper: upper.clone(),
            }]);
        }
        let starts = std::iter::once(from).chain(cuts.iter().cloned().map(Some));
        let ends = cuts.iter().cloned().chain([to]);
        let slices: Vec<Slice> = starts
            .zip(ends)
            .enumerate()
            .map(|(i, (cursor, upper))| Slice {
                slot: Some(i),
                cursor,
                upper,
            })
            .collect();
        let stored = Slice::store_all(&slices).map_err(|e| {
            JobError::invalid(&self.row.name, format!("the slices cannot be stored ({e})"))
        })?;
        self.store(RowUpdate {
            slices: Some(stored),
            ..Default::default()
        })
        .await?;
        Ok(slices)
    }
}

impl Attempt<'_> {
    /// Where a run walks: keys in `(from, to]`, counted from `keys.0` to `keys.1` by the plan; a
    /// fresh run only where the plan found matches, `None` when it found none.
    async fn walk_range(
        &self,
        p: &Prepared,
        plan: &Plan,
        upper: &Key,
        fresh: bool,
    ) -> Result<Option<(Option<Key>, Key, (i64, i64))>, JobError> {
        let walk = if fresh {
            plan.walk(p.keyset.width())
        } else {
            Walk::Whole
        };
        Ok(match self.tighten(p, upper, walk).await? {
            Walk::Whole => Some((None, upper.clone(), (0, plan.rows_in_range))),
            Walk::Nothing => {
                tracing::info!("the plan found no matching row: nothing to walk");
                None
            }
            Walk::Part { from, to, keys } => {
                tracing::info!(
                    from = ?from.as_ref().map(|k| &k.0),
                    to = ?to.as_ref().map(|k| &k.0),
                    keys_at_most = keys.1 - keys.0,
                    of = plan.rows_in_range,
                    "walking only the part of the key range where the plan found matches"
                );
                Some((from, to.unwrap_or_else(|| upper.clone()), keys))
            }
        })
    }

    /// The walk from the key range the job walks (the archive, for a revert), tightened to the
    /// matches (see `Counter::tighten`).
    async fn tighten(&self, p: &Prepared, upper: &Key, walk: Walk) -> Result<Walk, JobError> {
        let mut target = p.target.clone();
        if let Some(a) = &p.source_archive {
            target = super::prepare::archive_as_target(a, &p.target);
        }
        let counter = Counter {
            target: &target,
            ..self.counter(p, upper, &p.fragments.predicate, &p.spec.throttle)
        };
        counter.tighten(walk).await
    }
}

/// One slice of the key range: keys in `(cursor, upper]`, checkpointed into `slices[slot]`, or
/// into the job's `cursor` when the job runs as a single slice (`slot = None`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Slice {
    pub(super) slot: Option<usize>,
    pub(super) cursor: Option<Key>,
    pub(super) upper: Key,
}

/// A slice as stored in the job row's `slices` array (its index is its slot).
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    cursor: Option<Key>,
    upper: Key,
}

impl Slice {
    fn store_all(slices: &[Slice]) -> Result<Value, serde_json::Error> {
        let stored: Vec<Stored> = slices
            .iter()
            .map(|s| Stored {
                cursor: s.cursor.clone(),
                upper: s.upper.clone(),
            })
            .collect();
        serde_json::to_value(stored)
    }

    /// The stored slices; `None` when they do not parse or do not fit the key's width.
    fn parse_all(stored: &Value, width: usize) -> Option<Vec<Slice>> {
        let stored = Vec::<Stored>::deserialize(stored).ok()?;
        let fits = |k: &Key| k.0.len() == width;
        stored
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                (fits(&s.upper) && s.cursor.as_ref().is_none_or(fits)).then_some(Slice {
                    slot: Some(i),
                    cursor: s.cursor,
                    upper: s.upper,
                })
            })
            .collect()
    }
}

/// Keys that cut the range into `parts` slices of about equal key counts, taken from the plan's
/// window boundaries (ascending, deduplicated, never the upper bound itself).
fn cut_points(bounds: &[(i64, Key)], (lo, hi): (i64, i64), parts: usize) -> Vec<Key> {
    let mut cuts: Vec<Key> = Vec::new();
    for i in 1..parts as i64 {
        let target = lo + (hi - lo) * i / parts as i64;
        if let Some((n, key)) = bounds.iter().find(|(n, _)| *n >= target)
            && *n > lo
            && *n < hi
            && cuts.last() != Some(key)
        {
            cuts.push(key.clone());
        }
    }
    cuts
}

/// How a set of slices ended, as one outcome: an error wins (a permanent one over a transient
/// one), then lease loss, cancel, pause, shutdown; a slice stopped by a sibling defers to it.
fn merge(results: Vec<Result<Option<Outcome>, JobError>>) -> Result<Option<Outcome>, JobError> {
    fn rank(o: Outcome) -> u8 {
        match o {
            Outcome::LeaseLost => 5,
            Outcome::Cancelled => 4,
            Outcome::Paused => 3,
            Outcome::Shutdown => 2,
            Outcome::Stopped => 1,
            Outcome::Succeeded | Outcome::Planned => 0,
        }
    }
    let mut error: Option<JobError> = None;
    let mut outcome: Option<Outcome> = None;
    for result in results {
        match result {
            Err(e) => {
                if error
                    .as_ref()
                    .is_none_or(|held| held.is_retryable() && !e.is_retryable())
                {
                    error = Some(e);
                }
            }
            Ok(Some(o)) if outcome.is_none_or(|held| rank(o) > rank(held)) => outcome = Some(o),
            Ok(_) => {}
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    // Only siblings' stops and no cause: hand the job back rather than call it done.
    Ok(outcome.map(|o| {
        if o == Outcome::Stopped {
            Outcome::Shutdown
        } else {
            o
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: i64) -> Value {
        serde_json::json!([n.to_string()])
    }

    fn stored(json: serde_json::Value) -> Plan {
        // Read back from JSON as stored: the other plan fields take their defaults.
        Plan::from_stored(&json).unwrap()
    }

    fn k(n: i64) -> Key {
        Key(vec![n.to_string()])
    }

    #[test]
    fn cut_points_split_by_key_counts() {
        let plan = stored(serde_json::json!({
            "rows_in_range": 1000,
            "boundaries": [[100, key(100)], [300, key(300)], [600, key(600)], [1000, key(1000)]],
        }));
        let bounds = plan.key_boundaries(1);
        assert_eq!(cut_points(&bounds, (0, 1000), 2), vec![k(600)]);
        assert_eq!(cut_points(&bounds, (0, 1000), 4), vec![k(300), k(600)]);
        // Within a narrowed walk: only boundaries strictly inside it.
        assert_eq!(cut_points(&bounds, (0, 600), 2), vec![k(300)]);
        assert_eq!(cut_points(&bounds, (100, 1000), 2), vec![k(600)]);
        let one = stored(serde_json::json!({"rows_in_range": 5, "boundaries": [[5, key(5)]]}));
        assert!(cut_points(&one.key_boundaries(1), (0, 5), 3).is_empty());
    }

    #[test]
    fn the_walk_narrows_to_the_windows_with_matches() {
        let bounds = serde_json::json!([
            [100, key(100)],
            [300, key(300)],
            [600, key(600)],
            [1000, key(1000)]
        ]);
        let with = |windows: serde_json::Value, matching: i64| {
            stored(serde_json::json!({
                "rows_in_range": 1000, "rows_matching": matching,
                "boundaries": bounds, "matching_windows": windows,
            }))
            .walk(1)
        };
        assert_eq!(
            with(serde_json::json!([1, 2]), 7),
            Walk::Part {
                from: Some(k(100)),
                to: Some(k(600)),
                keys: (100, 600)
            }
        );
        assert_eq!(
            with(serde_json::json!([2, 3]), 7),
            Walk::Part {
                from: Some(k(300)),
                to: None,
                keys: (300, 1000)
            }
        );
        assert_eq!(
            with(serde_json::json!([0, 0]), 7),
            Walk::Part {
                from: None,
                to: Some(k(100)),
                keys: (0, 100)
            }
        );
        assert_eq!(with(serde_json::json!([0, 3]), 7), Walk::Whole);
        assert_eq!(with(serde_json::Value::Null, 0), Walk::Nothing);
        // A plan stored before matching windows were recorded walks everything.
        assert_eq!(with(serde_json::Value::Null, 7), Walk::Whole);
    }

    #[test]
    fn merge_prefers_errors_then_the_strongest_outcome() {
        let lost = || JobError::LeaseLost {
            job: "j".into(),
            attempt: 1,
        };
        assert!(matches!(
            merge(vec![Ok(None), Ok(Some(Outcome::Stopped)), Err(lost())]),
            Err(JobError::LeaseLost { .. })
        ));
        assert_eq!(
            merge(vec![Ok(Some(Outcome::Stopped)), Ok(Some(Outcome::Paused))]).unwrap(),
            Some(Outcome::Paused)
        );
        assert_eq!(
            merge(vec![Ok(Some(Outcome::Stopped)), Ok(None)]).unwrap(),
            Some(Outcome::Shutdown)
        );
        assert_eq!(merge(vec![Ok(None), Ok(None)]).unwrap(), None);
    }
}
