//! The alerts (deploy/prometheus/alerts.yml) and the Grafana dashboard
//! (deploy/grafana/backfilld-dashboard.json) against a real Prometheus (Debian's `prometheus`
//! package, which scripts/test installs) scraping a real daemon the way production does: scrape
//! job `backfilld`, `honor_labels: false`, so the backfill job's name is stored as `exported_job`.
//! Checks that every rule evaluates cleanly, that a failed job fires `BackfilldJobFailed`, that a
//! job's first error is visible to `increase()` (its counters start at 0 when its attempt
//! starts), that every dashboard query runs and the main panels show the jobs, and that a
//! finished job's series leave `/metrics` after `metrics.finished_job_ttl` and go stale in
//! Prometheus.
#![allow(clippy::disallowed_methods)] // tests talk to PostgreSQL directly, never via a pooler

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Db, NewJob, free_port, http_get};
use serde_json::Value;
use sqlx::PgPool;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/backfilld-dashboard.json"
);
/// Every wait of this test; the whole test takes about 16 s.
const LIMIT: Duration = Duration::from_secs(30);
/// What Grafana's `$__rate_interval` is with its default 15 s scrape interval.
const RATE_INTERVAL: &str = "1m";

/// A Prometheus server in a temporary directory, killed (and the directory removed) on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    /// Scrapes `127.0.0.1:target` every second as job `backfilld`, evaluates `alerts.yml` every
    /// second, and waits until it is ready.
    async fn start(target: u16) -> Self {
        assert!(
            std::path::Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} not found: install Debian's prometheus (scripts/test does)"
        );
        let dir = std::env::temp_dir().join(format!(
            "backfilld-prometheus-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        // JSON strings are YAML strings: the path needs no further quoting.
        let rules = serde_json::to_string(ALERTS).unwrap();
        std::fs::write(
            &config,
            format!(
                "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: backfilld
    honor_labels: false # as the ServiceMonitor and PodMonitor: the per-job label is exported_job
    static_configs:
      - targets: ['127.0.0.1:{target}']
"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {PROMETHEUS}: {e}"));
        let mut prometheus = Self { child, dir, port };
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = prometheus.child.try_wait().unwrap() {
                panic!(
                    "prometheus exited with {status} (refused its configuration?):\n{}",
                    prometheus.log()
                );
            }
            if let Some((200, _)) = http_get(port, "/-/ready").await {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after {LIMIT:?}:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path; `data` of a successful answer, or the whole answer as the error.
    async fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.port, path)
            .await
            .ok_or_else(|| format!("GET {path}: no answer"))?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("GET {path}: HTTP {status}, not JSON ({e}): {body}"))?;
        if status == 200 && v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("GET {path}: HTTP {status}: {body}"))
        }
    }

    /// An instant query at `time` (Unix seconds): its series (`metric`, `value`).
    async fn query_at(&self, expr: &str, time: f64) -> Result<Vec<Value>, String> {
        let data = self
            .api(&format!(
                "/api/v1/query?query={}&time={time:.3}",
                encode(expr)
            ))
            .await?;
        series(expr, &data)
    }

    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        self.query_at(expr, now()).await
    }

    /// A range query, one point per second: its series (`metric`, `values`).
    async fn query_range(&self, expr: &str, start: f64, end: f64) -> Result<Vec<Value>, String> {
        let data = self
            .api(&format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
                encode(expr)
            ))
            .await?;
        series(expr, &data)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn series(expr: &str, data: &Value) -> Result<Vec<Value>, String> {
    match data["result"].as_array() {
        Some(r) if data["resultType"] == "vector" || data["resultType"] == "matrix" => {
            Ok(r.clone())
        }
        _ => Err(format!("{expr}: not a vector or matrix: {data}")),
    }
}

/// Percent-encodes a query parameter (everything but RFC 3986 unreserved characters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The value of an instant-query sample (`[time, "value"]`).
fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {sample}"))
}

/// Every value of a range-query series.
fn values(series: &Value) -> Vec<f64> {
    series["values"]
        .as_array()
        .unwrap_or_else(|| panic!("no values in {series}"))
        .iter()
        .map(|p| p[1].as_str().and_then(|v| v.parse().ok()).unwrap())
        .collect()
}

fn label<'a>(series: &'a Value, name: &str) -> &'a str {
    series["metric"][name].as_str().unwrap_or_default()
}

/// Polls `check` until it returns `Ok`; after `LIMIT`, panics naming `what` with its last error
/// and `context()` (the logs).
async fn eventually(
    what: &str,
    context: impl Fn() -> String,
    mut check: impl AsyncFnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "gave up after {LIMIT:?} waiting for {what}; last: {last}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sample lines (not comments) of a `/metrics` body.
fn samples(body: &str) -> Vec<&str> {
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The alert names in alerts.yml (`- alert: Name` lines).
fn alert_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(ALERTS).unwrap();
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect();
    assert!(names.contains("BackfilldJobFailed"), "{names:?}");
    names
}

/// Every rule Prometheus loaded was evaluated at or after `since` (Unix seconds), and the
/// alerting rules are exactly those of alerts.yml. A rule whose evaluation failed fails the
/// test at once.
async fn rules_healthy(
    prom: &Prometheus,
    expected: &BTreeSet<String>,
    since: f64,
) -> Result<(), String> {
    let data = prom.api("/api/v1/rules").await?;
    let mut alerting = BTreeSet::new();
    for group in data["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let name = rule["name"].as_str().unwrap_or_default();
            assert!(rule["health"] != "err", "rule {name} fails: {rule}");
            let evaluated = rule["lastEvaluation"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
            if rule["health"] != "ok" || evaluated < since {
                return Err(format!("rule {name} not evaluated since {since}: {rule}"));
            }
            if rule["type"] == "alerting" {
                alerting.insert(name.to_owned());
            }
            // Prometheus stores the backfill job's name as exported_job (`job` is the scrape
            // job's): a query an annotation suggests must select on that.
            for (key, text) in rule["annotations"].as_object().into_iter().flatten() {
                let text = text.as_str().unwrap_or_default();
                assert!(
                    !text.contains("{job=") && !text.contains(",job="),
                    "rule {name}, annotation {key}: selects on `job`, not `exported_job`: {text}"
                );
            }
        }
    }
    if &alerting != expected {
        return Err(format!(
            "alerting rules loaded {alerting:?}, alerts.yml has {expected:?}: {data}"
        ));
    }
    Ok(())
}

/// The `backfilld_*` metric names a query mentions.
fn metric_names(query: &str) -> BTreeSet<String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    query
        .split(|c: char| !word(c))
        .filter(|w| w.starts_with("backfilld_"))
        .map(str::to_owned)
        .collect()
}

/// A dashboard query with a concrete time and job selection ("All" selected).
struct Target {
    panel: String,
    expr: String,
    instant: bool,
    /// The labels its legend shows (`{{label}}`).
    legend: Vec<String>,
}

/// Every query of the dashboard, its variables replaced the way Grafana does with "All"
/// selected (the variable's `allValue`) and `$__rate_interval` at its value for the default
/// scrape interval.
fn dashboard_targets() -> Vec<Target> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut vars: Vec<(String, String)> = vec![
        ("__rate_interval".into(), RATE_INTERVAL.into()),
        ("__interval".into(), "15s".into()),
        ("__range".into(), "1h".into()),
    ];
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "datasource" {
            continue;
        }
        let all = v["allValue"]
            .as_str()
            .unwrap_or_else(|| panic!("variable without allValue: {v}"));
        vars.push((v["name"].as_str().unwrap().to_owned(), all.to_owned()));
    }
    // Longest names first: `$__rate_interval` before `$__range`, `$__interval`.
    vars.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    let mut targets = Vec::new();
    while let Some(panel) = panels.pop() {
        // Rows collapsed in the JSON keep their panels inside.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for t in panel["targets"].as_array().into_iter().flatten() {
            let mut expr = t["expr"].as_str().unwrap_or_default().to_owned();
            if expr.is_empty() {
                continue;
            }
            for (name, value) in &vars {
                for form in [
                    format!("${{{name}}}"),
                    format!("[[{name}]]"),
                    format!("${name}"),
                ] {
                    expr = expr.replace(&form, value);
                }
            }
            let panel = panel["title"].as_str().unwrap_or_default().to_owned();
            assert!(
                !expr.contains('$'),
                "panel {panel:?}: unknown variable in {expr}"
            );
            let legend = t["legendFormat"]
                .as_str()
                .unwrap_or_default()
                .split("{{")
                .skip(1)
                .filter_map(|s| s.split_once("}}"))
                .map(|(l, _)| l.trim().to_owned())
                .collect();
            targets.push(Target {
                panel,
                expr,
                instant: t["instant"] == true && t["range"] != true,
                legend,
            });
        }
    }
    assert!(targets.len() >= 10, "dashboard queries: {}", targets.len());
    targets
}

#[sqlx::test]
async fn alerts_and_dashboard_work_against_a_real_prometheus(pool: PgPool) {
    let began = Instant::now();
    let expected_alerts = alert_names();
    let targets = dashboard_targets();
    let db = Db::new(pool).await;
    db.exec(
        "CREATE TABLE good (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO good SELECT g FROM generate_series(1, 300) g;
         CREATE TABLE bad (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO bad SELECT g FROM generate_series(1, 1000) g;
         CREATE TABLE gate (open int); INSERT INTO gate VALUES (1);",
    )
    .await;
    let metrics = free_port();
    let daemon = db
        .daemon()
        .max_batch(10)
        .env("BACKFILLD_METRICS__LISTEN", &format!("127.0.0.1:{metrics}"))
        .env("BACKFILLD_METRICS__FINISHED_JOB_TTL", "5s")
        .spawn();
    let prom = Prometheus::start(metrics).await;
    let logs = || {
        format!(
            "--- daemon\n{}\n--- prometheus\n{}",
            daemon.log(),
            prom.log()
        )
    };

    // The target is scraped and every rule evaluates; the failed-jobs gauge has a 0 sample (and
    // no failed job has a finishing time yet).
    eventually(
        "the first scrape, the failed-jobs gauge at 0",
        logs,
        async || {
            let up = prom.query("up{job=\"backfilld\"} == 1").await?;
            let failed = prom.query("backfilld_jobs{state=\"failed\"}").await?;
            match (up.len(), failed.as_slice()) {
                (1, [s]) if value(s) == 0.0 && label(s, "job") == "backfilld" => Ok(()),
                _ => Err(format!("up: {up:?}, failed: {failed:?}")),
            }
        },
    )
    .await;
    let scraped = now();
    eventually("every rule evaluated with series", logs, async || {
        rules_healthy(&prom, &expected_alerts, scraped).await
    })
    .await;
    let (_, body) = http_get(metrics, "/metrics").await.expect("metrics");
    let idle_samples = samples(&body).len();

    // `ok_job` runs about 3 s and succeeds. `bad_job` commits batches until the gate closes,
    // then divides by zero: a permanent error fails it.
    let jobs_start = now();
    NewJob::new("ok_job", "good")
        .predicate("n = 0")
        .set("n = n + 1")
        .raw("batch_size", "10")
        .raw("sleep_ms", "100")
        .insert(&db)
        .await;
    NewJob::new("bad_job", "bad")
        .predicate("n = 0")
        .set("n = 1 / (SELECT count(*)::int FROM gate)")
        .raw("batch_size", "10")
        .raw("sleep_ms", "100")
        .insert(&db)
        .await;
    // One scrape with bad_job's batches counted and its error counter at 0.
    let scrape = "backfilld_batch_errors_total{exported_job=\"bad_job\",kind=\"permanent\"} == 0
         and on (exported_job) backfilld_rows_changed_total{exported_job=\"bad_job\"} > 0";
    eventually(
        "bad_job's batches counted and its error counter at 0",
        logs,
        async || match prom.query(scrape).await?.as_slice() {
            [s] if label(s, "job") == "backfilld" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    db.exec("DELETE FROM gate").await;
    for (name, state) in [("bad_job", "failed"), ("ok_job", "succeeded")] {
        eventually(&format!("{name} {state}"), logs, async || {
            let row = db.job(name).await;
            (row.state == state).then_some(()).ok_or(format!("{row:?}"))
        })
        .await;
    }
    let err = db.job("bad_job").await.last_error.unwrap_or_default();
    assert!(
        err.contains("22012"),
        "bad_job failed for another reason: {err}"
    );

    // A moment at which Prometheus holds both ended jobs in the state gauges and still holds the
    // finished jobs' own series (they expire 5 s after the end). Instant queries are evaluated at
    // that moment, so what comes later (expiry, staleness) does not change their answers.
    let mut at = 0.0;
    eventually("the ended jobs in Prometheus", logs, async || {
        let t = now();
        let ended = prom
            .query_at(
                "max by (state) (backfilld_jobs{state=~\"succeeded|failed\"}) == 1",
                t,
            )
            .await?;
        let progress = prom
            .query_at("backfilld_job_progress_ratio{exported_job=\"ok_job\"}", t)
            .await?;
        if ended.len() == 2 && progress.len() == 1 {
            at = t;
            Ok(())
        } else {
            Err(format!("ended: {ended:?}, progress: {progress:?}"))
        }
    })
    .await;

    // (c) The first error of bad_job is an increase from 0.
    let increase = prom
        .query_at(
            "sum by (exported_job, kind) (increase(backfilld_batch_errors_total{exported_job=\"bad_job\"}[1m])) > 0",
            at,
        )
        .await
        .unwrap();
    assert!(
        matches!(increase.as_slice(), [s] if label(s, "kind") == "permanent" && value(s) > 0.0),
        "bad_job's error is not visible to increase(): {increase:?}\n{}",
        logs()
    );

    // (b) BackfilldJobFailed is pending or (without a `for`, as now) firing; nothing else fires.
    eventually("BackfilldJobFailed pending or firing", logs, async || {
        let data = prom.api("/api/v1/alerts").await?;
        let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
        let name = |a: &Value| {
            a["labels"]["alertname"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let failed = alerts.iter().any(|a| {
            name(a) == "BackfilldJobFailed" && (a["state"] == "firing" || a["state"] == "pending")
        });
        let others = alerts
            .iter()
            .any(|a| a["state"] == "firing" && name(a) != "BackfilldJobFailed");
        if failed && !others {
            Ok(())
        } else {
            Err(format!("{alerts:?}"))
        }
    })
    .await;

    // (d) Every dashboard query runs (range queries as Grafana's time series panels send them,
    // ending at `at` exactly: their points are `from` + whole steps) and returns data carrying
    // the labels its legend shows, and the main panels show the jobs.
    let from = at - (at - jobs_start + 5.0).ceil();
    let mut shown: Vec<(String, Vec<Value>)> = Vec::new();
    for t in &targets {
        let result = if t.instant {
            prom.query_at(&t.expr, at).await
        } else {
            prom.query_range(&t.expr, from, at).await
        };
        let result =
            result.unwrap_or_else(|e| panic!("panel {:?}: {}: {e}\n{}", t.panel, t.expr, logs()));
        // All of them show something here: counters start at 0, both jobs ran batches.
        assert!(
            !result.is_empty(),
            "panel {:?}: no data (a misspelled metric or label?): {}",
            t.panel,
            t.expr
        );
        for s in &result {
            for l in &t.legend {
                assert!(
                    s["metric"].get(l).is_some(),
                    "panel {:?}: legend label {l} missing from {s} ({})",
                    t.panel,
                    t.expr
                );
            }
        }
        println!(
            "panel {:?} ({}): {} series",
            t.panel,
            if t.instant { "instant" } else { "range" },
            result.len()
        );
        shown.push((t.expr.clone(), result));
    }
    let panel = |metric: &str| -> &Vec<Value> {
        let found: Vec<&Vec<Value>> = shown
            .iter()
            .filter(|(expr, _)| expr.contains(metric))
            .map(|(_, r)| r)
            .collect();
        assert_eq!(found.len(), 1, "one dashboard query on {metric}");
        found[0]
    };
    let peak = |metric: &str, job_label: &str, job: &str| -> f64 {
        panel(metric)
            .iter()
            .filter(|s| label(s, job_label) == job)
            .flat_map(|s| {
                if s.get("values").is_some() {
                    values(s)
                } else {
                    vec![value(s)]
                }
            })
            .fold(f64::NAN, f64::max)
    };
    let progress = peak("backfilld_job_progress_ratio", "exported_job", "ok_job");
    assert!(progress > 0.0, "progress of ok_job: {progress}");
    let rows = peak("backfilld_rows_changed_total", "exported_job", "ok_job");
    assert!(rows > 0.0, "rows changed / s of ok_job: {rows}");
    let errors_shown = panel("backfilld_batch_errors_total")
        .iter()
        .filter(|s| label(s, "exported_job") == "bad_job" && label(s, "kind") == "permanent")
        .flat_map(values)
        .fold(f64::NAN, f64::max);
    assert!(errors_shown > 0.0, "errors panel, bad_job: {errors_shown}");
    for state in ["succeeded", "failed"] {
        let n = peak("backfilld_jobs", "state", state);
        assert_eq!(n, 1.0, "jobs by state, {state}");
    }
    let data = prom
        .api(&format!(
            "/api/v1/label/exported_job/values?match[]={}&start={:.3}&end={at:.3}",
            encode("{__name__=~\"backfilld_.+\"}"),
            from
        ))
        .await
        .unwrap();
    assert_eq!(
        data,
        serde_json::json!(["bad_job", "ok_job"]),
        "the dashboard's job variable"
    );

    // Every metric the rules and the dashboard name exists (an empty answer is no error).
    let names = prom.api("/api/v1/label/__name__/values").await.unwrap();
    let rules = prom.api("/api/v1/rules").await.unwrap();
    let queries = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .map(|r| r["query"].as_str().unwrap_or_default().to_owned())
        .chain(targets.iter().map(|t| t.expr.clone()));
    for query in queries {
        for name in metric_names(&query) {
            assert!(
                names
                    .as_array()
                    .unwrap()
                    .contains(&Value::from(name.clone())),
                "{name} (in {query}) is no metric Prometheus has: {names}"
            );
        }
    }

    // (a) again, now that every rule has seen the jobs' series.
    let ended = now();
    eventually(
        "every rule evaluated with the jobs' series",
        logs,
        async || rules_healthy(&prom, &expected_alerts, ended).await,
    )
    .await;

    // (e) After the TTL the finished jobs' series leave /metrics (back to the idle daemon's
    // series), and Prometheus marks them stale.
    eventually(
        "the finished jobs' series dropped from /metrics",
        logs,
        async || {
            let (_, body) = http_get(metrics, "/metrics").await.ok_or("no answer")?;
            let left: Vec<&str> = samples(&body)
                .into_iter()
                .filter(|l| l.contains("job=\"ok_job\"") || l.contains("job=\"bad_job\""))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:#?}"))
            }
        },
    )
    .await;
    let (_, body) = http_get(metrics, "/metrics").await.expect("metrics");
    // The ledger still holds both jobs: when the last failed and succeeded one finished stays.
    let ledger = "backfilld_jobs_last_finished_timestamp_seconds{";
    let finished: Vec<&str> = samples(&body)
        .into_iter()
        .filter(|l| l.starts_with(ledger))
        .collect();
    assert_eq!(finished.len(), 2, "{finished:?}");
    assert_eq!(
        samples(&body).len() - finished.len(),
        idle_samples,
        "series of an idle daemon vs. after the jobs expired:\n{body}"
    );
    assert!(
        body.contains("backfilld_jobs{state=\"succeeded\"} 1")
            && body.contains("backfilld_jobs{state=\"failed\"} 1"),
        "{body}"
    );
    eventually(
        "the finished jobs' series stale in Prometheus",
        logs,
        async || {
            let left = prom
                .query("{__name__=~\"backfilld_.+\",exported_job=~\"ok_job|bad_job\"}")
                .await?;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{} series: {left:?}", left.len()))
            }
        },
    )
    .await;
    let stale = now();
    eventually("every rule evaluated after the expiry", logs, async || {
        rules_healthy(&prom, &expected_alerts, stale).await
    })
    .await;
    println!("took {:?}", began.elapsed());
}
