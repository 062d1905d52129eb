//! Retention: which stored backups of a job to keep, and deleting the others: after each
//! successful scheduled run (standalone) and in `backupy-agent prune`, through the same
//! code ([`prune_job`]).
//!
//! The decision is a pure function ([`decide`]) of the rules, the backups (from their
//! manifests) and the time. Rules (all additive, restic `forget` semantics): `keep_last`,
//! the grandfather-father-son buckets `keep_hourly`/`keep_daily`/`keep_weekly` (ISO
//! weeks)/`keep_monthly`/`keep_yearly` (UTC calendar periods: the newest backup of each
//! of the N most recent periods that have one), `keep_within` (younger than a duration
//! before the newest backup) and `retention_days` (younger than N days before now). A
//! backup is deleted only when no rule keeps it; with no rule at all nothing is deleted.
//! Never deleted, whatever the rules say: the newest backup (manifests are written only
//! for successful runs), a backup under an Object Lock retention date, a backup whose
//! start time cannot be read, and objects without a readable manifest (orphans: reported,
//! deleted only by `prune --orphans`, and then only when older than the newest backup,
//! since a newer one may still be being written). Foreign manifests (see
//! [`Storage::manifests_checked`]) and the objects beside them are never touched.
//!
//! Runs on the worker thread that finished the run, or on main for `prune`; a failure to
//! prune is reported, never fatal to the backup that just succeeded.

use chrono::{DateTime, Datelike, Duration, Months, NaiveDateTime, Timelike, Utc};
use serde::Serialize;

use crate::storage::{ForeignManifest, Manifest, Storage, manifest_key};

/// A job's retention rules. `None` (or 0 for the bucket rules) keeps nothing by that rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    pub retention_days: Option<u32>,
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within: Option<Within>,
}

impl Rules {
    /// Whether any rule is set; without one, retention deletes nothing.
    pub fn any(&self) -> bool {
        self.retention_days.is_some()
            || self.keep_last.is_some()
            || self.keep_within.is_some()
            || [self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_yearly]
                .iter()
                .any(|n| n.is_some_and(|n| n > 0))
    }
}

/// A `keep_within` duration: `30d`, `2w`, `12h`, `1y6m`, `1y5m7d2h` (y = years and m =
/// months as calendar steps, w = 7 days, d = days, h = hours), as restic takes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Within {
    pub years: u32,
    pub months: u32,
    pub days: u32,
    pub hours: u32,
}

impl Within {
    pub fn parse(s: &str) -> Result<Within, String> {
        let bad = || {
            format!(
                "keep_within {s:?} is not a duration: write a number and a unit, e.g. \"30d\", \"12h\", \"2w\", \"1y6m\" \
                 (units y, m, w, d, h)"
            )
        };
        let mut w = Within::default();
        let mut num = String::new();
        let mut any = false;
        for c in s.trim().chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let n: u32 = num.parse().map_err(|_| bad())?;
            num.clear();
            let slot = match c {
                'y' => &mut w.years,
                'm' => &mut w.months,
                'w' => {
                    w.days = w.days.checked_add(n.checked_mul(7).ok_or_else(bad)?).ok_or_else(bad)?;
                    any = true;
                    continue;
                }
                'd' => &mut w.days,
                'h' => &mut w.hours,
                _ => return Err(bad()),
            };
            *slot = slot.checked_add(n).ok_or_else(bad)?;
            any = true;
        }
        if !num.is_empty() || !any || w.years > 1000 {
            return Err(bad());
        }
        Ok(w)
    }

    /// `t` minus this duration (calendar steps for years and months).
    pub fn before(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let months = self.years.saturating_mul(12).saturating_add(self.months);
        t.checked_sub_months(Months::new(months)).unwrap_or(DateTime::<Utc>::MIN_UTC)
            - Duration::days(self.days as i64)
            - Duration::hours(self.hours as i64)
    }
}

impl std::fmt::Display for Within {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, u) in [(self.years, 'y'), (self.months, 'm'), (self.days, 'd'), (self.hours, 'h')] {
            if n > 0 {
                write!(f, "{n}{u}")?;
            }
        }
        if *self == Within::default() {
            write!(f, "0h")?;
        }
        Ok(())
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub object_key: String,
    /// `None` when the manifest's `started_at` cannot be read: such a backup is kept.
    pub started_at: Option<DateTime<Utc>>,
    /// An Object Lock retention date; the backup is kept until it has passed.
    pub locked_until: Option<DateTime<Utc>>,
}

impl Candidate {
    pub fn from_manifest(m: &Manifest) -> Candidate {
        Candidate {
            id: m.id.clone(),
            object_key: m.object_key.clone(),
            started_at: parse_time(&m.started_at),
            locked_until: None,
        }
    }
}

/// What retention decided for one backup, and every rule that keeps it
/// (`last 1`, `daily 2026-12-01`, `weekly 2026-W49`, `within 30d`, `newest`…).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub object_key: String,
    pub started_at: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

#[derive(Clone, Copy)]
enum Bucket {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Bucket {
    fn name(self) -> &'static str {
        match self {
            Bucket::Hourly => "hourly",
            Bucket::Daily => "daily",
            Bucket::Weekly => "weekly",
            Bucket::Monthly => "monthly",
            Bucket::Yearly => "yearly",
        }
    }

    /// The UTC calendar period of `t`, as it is shown (`2026-12-01T13`, `2026-12-01`,
    /// `2026-W49` (ISO week: Monday to Sunday, the ISO year), `2026-12`, `2026`).
    fn period(self, t: DateTime<Utc>) -> String {
        match self {
            Bucket::Hourly => format!("{}T{:02}", t.format("%Y-%m-%d"), t.hour()),
            Bucket::Daily => t.format("%Y-%m-%d").to_string(),
            Bucket::Weekly => {
                let w = t.iso_week();
                format!("{}-W{:02}", w.year(), w.week())
            }
            Bucket::Monthly => t.format("%Y-%m").to_string(),
            Bucket::Yearly => t.year().to_string(),
        }
    }
}

/// Decides, for every backup, keep or delete and why. Pure: the same input gives the
/// same answer; `now` only serves `retention_days` and Object Lock dates. The result is
/// ordered newest first (by start time, then id).
pub fn decide(rules: &Rules, backups: &[Candidate], now: DateTime<Utc>) -> Vec<Decision> {
    let mut sorted: Vec<&Candidate> = backups.iter().collect();
    // Newest first; unreadable start times sort last (they are kept anyway).
    sorted.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    let newest = sorted.first().and_then(|c| c.started_at);
    let mut buckets: Vec<(Bucket, u32, Option<String>)> = [
        (Bucket::Hourly, rules.keep_hourly),
        (Bucket::Daily, rules.keep_daily),
        (Bucket::Weekly, rules.keep_weekly),
        (Bucket::Monthly, rules.keep_monthly),
        (Bucket::Yearly, rules.keep_yearly),
    ]
    .into_iter()
    .filter_map(|(b, n)| n.filter(|n| *n > 0).map(|n| (b, n, None)))
    .collect();
    let any = rules.any();
    let mut out = Vec::with_capacity(sorted.len());
    for (i, c) in sorted.iter().enumerate() {
        let mut reasons = Vec::new();
        if i == 0 {
            reasons.push("newest".to_string());
        }
        if let Some(until) = c.locked_until.filter(|u| *u > now) {
            reasons.push(format!("locked until {}", crate::storage::rfc3339(until)));
        }
        if !any {
            reasons.push("no retention rules".to_string());
        }
        if let Some(n) = rules.keep_last
            && (i as u32) < n.max(1)
        {
            reasons.push(format!("last {}", i + 1));
        }
        match c.started_at {
            None => reasons.push("started_at unreadable".to_string()),
            Some(t) => {
                // The newest backup of each period: the first one seen, newest first.
                for (bucket, left, last) in buckets.iter_mut() {
                    let period = bucket.period(t);
                    if *left > 0 && last.as_deref() != Some(period.as_str()) {
                        reasons.push(format!("{} {period}", bucket.name()));
                        *left -= 1;
                        *last = Some(period);
                    }
                }
                if let (Some(w), Some(newest)) = (rules.keep_within, newest)
                    && t > w.before(newest)
                {
                    reasons.push(format!("within {w}"));
                }
                if let Some(days) = rules.retention_days
                    && now - t < Duration::days(days as i64)
                {
                    reasons.push(format!("retention_days {days}"));
                }
            }
        }
        out.push(Decision {
            id: c.id.clone(),
            object_key: c.object_key.clone(),
            started_at: c.started_at.map(crate::storage::rfc3339).unwrap_or_default(),
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    out
}

/// An object under a job's prefix without a readable manifest of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    pub key: String,
    pub size: u64,
    /// Whether `prune --orphans` deletes it (or did): only when it is older than the
    /// job's newest backup; a newer one may be a backup still being written.
    pub deletable: bool,
    pub deleted: bool,
    /// A `.json` beside it that is not a readable manifest: never deleted, not even by
    /// `prune --orphans` (someone put a file there; it is not ours to judge).
    pub unreadable_manifest: bool,
}

/// What to do in one pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Decide and report; delete nothing.
    pub dry_run: bool,
    /// Also delete orphans (objects without a manifest) older than the newest backup.
    pub orphans: bool,
}

/// One job's pass: every backup with its decision, the orphans, the foreign manifests
/// left alone, what was deleted and what could not be.
#[derive(Debug, Default, Serialize)]
pub struct JobReport {
    pub target: String,
    pub job: String,
    pub dry_run: bool,
    pub backups: Vec<Decision>,
    pub orphans: Vec<Orphan>,
    pub foreign: Vec<ForeignReport>,
    /// Object keys deleted, each with its manifest.
    pub deleted: Vec<String>,
    /// Deletes that failed: "key: error".
    pub errors: Vec<String>,
    /// How many of those the storage refused (HTTP 403 / permission denied: a lock the
    /// agent did not know of, or credentials without delete permission). Never retried
    /// within a pass.
    pub refused: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForeignReport {
    pub key: String,
    pub reason: String,
}

/// What one pass of retention did: the object keys it deleted (each with its manifest)
/// and the manifests it left alone as foreign.
#[derive(Debug, Default)]
pub struct Pruned {
    pub deleted: Vec<String>,
    pub foreign: Vec<ForeignManifest>,
}

/// Applies the rules to `job`'s backups in `storage`; returns the deleted keys.
pub fn apply(storage: &Storage, target: &str, job: &str, rules: Rules) -> Result<Vec<String>, String> {
    prune(storage, target, job, rules).map(|p| p.deleted)
}

/// [`prune_job`] without orphans, a failed delete an error (the deleted keys and the
/// foreign manifests found). Only manifests the storage layer accepts as this job's own count
/// ([`Manifest::check_stored_at`]); a foreign manifest is reported and neither it nor
/// the object beside it is touched, whatever its `object_key` says.
pub fn prune(storage: &Storage, target: &str, job: &str, rules: Rules) -> Result<Pruned, String> {
    let (report, foreign) = prune_job_checked(storage, target, job, rules, Options::default(), Utc::now())?;
    if let Some(e) = report.errors.first() {
        return Err(format!("cannot delete {e}"));
    }
    Ok(Pruned { deleted: report.deleted, foreign })
}

/// Decides and (unless `dry_run`) deletes for one job: the code behind both the
/// retention after each successful run and `backupy-agent prune`.
pub fn prune_job(
    storage: &Storage,
    target: &str,
    job: &str,
    rules: Rules,
    opts: Options,
    now: DateTime<Utc>,
) -> Result<JobReport, String> {
    prune_job_checked(storage, target, job, rules, opts, now).map(|(r, _)| r)
}

fn prune_job_checked(
    storage: &Storage,
    target: &str,
    job: &str,
    rules: Rules,
    opts: Options,
    now: DateTime<Utc>,
) -> Result<(JobReport, Vec<ForeignManifest>), String> {
    let prefix = format!("{target}/{job}/");
    let listing = storage.manifests_checked(&prefix).map_err(|e| format!("cannot list {prefix}: {e}"))?;
    let manifests: Vec<Manifest> =
        listing.manifests.into_iter().filter(|m| m.target == target && m.job == job).collect();
    // Objects beside a foreign manifest are not orphans: someone put a manifest there,
    // and it is not ours to judge. Beside an unreadable one they are orphans that stay.
    let foreign_objects: std::collections::HashSet<String> =
        listing.foreign.iter().filter_map(|f| f.key.strip_suffix(".json").map(str::to_string)).collect();
    let unreadable_objects: std::collections::HashSet<String> =
        listing.unreadable.iter().filter_map(|k| k.strip_suffix(".json").map(str::to_string)).collect();
    let with_manifest: std::collections::HashSet<&str> =
        manifests.iter().map(|m| m.object_key.as_str()).collect();
    let mut candidates: Vec<Candidate> = manifests.iter().map(Candidate::from_manifest).collect();
    if storage.object_lock() {
        // A locked object cannot be deleted before its date anyway; asking first keeps
        // the manifest of a backup that stays (the manifest is deleted before the object).
        for c in &mut candidates {
            c.locked_until = storage
                .locked_until(&c.object_key)
                .map_err(|e| format!("cannot read the lock of {}: {e}", c.object_key))?;
        }
    }
    let newest = candidates.iter().filter_map(|c| c.started_at).max();
    let orphans: Vec<Orphan> = storage
        .list(&prefix)
        .map_err(|e| format!("cannot list {prefix}: {e}"))?
        .into_iter()
        .filter(|(k, _)| {
            !k.ends_with(".json") && !with_manifest.contains(k.as_str()) && !foreign_objects.contains(k)
        })
        .map(|(key, size)| {
            let unreadable_manifest = unreadable_objects.contains(&key);
            Orphan {
                deletable: !unreadable_manifest
                    && matches!((key_time(&key), newest), (Some(t), Some(n)) if t < n),
                key,
                size,
                deleted: false,
                unreadable_manifest,
            }
        })
        .collect();
    let mut report = JobReport {
        target: target.to_string(),
        job: job.to_string(),
        dry_run: opts.dry_run,
        backups: decide(&rules, &candidates, now),
        orphans,
        foreign: listing
            .foreign
            .iter()
            .map(|f| ForeignReport { key: f.key.clone(), reason: f.reason.clone() })
            .collect(),
        ..JobReport::default()
    };
    if opts.dry_run {
        return Ok((report, listing.foreign));
    }
    for d in report.backups.iter().filter(|d| !d.keep) {
        // The manifest goes first: an object without one is merely an orphan, while a
        // manifest without its object would promise a backup that is gone.
        let key = &d.object_key;
        let result = storage
            .delete(&manifest_key(key))
            .map_err(|e| (format!("{key}.json: {e}"), is_refusal(&e)))
            .and_then(|_| storage.delete(key).map_err(|e| (format!("{key}: {e}"), is_refusal(&e))));
        match result {
            Ok(()) => {
                // A drill's report goes with its backup; left behind it is only clutter.
                if let Err(e) = storage.delete(&crate::storage::drill_report_key(key)) {
                    log::warn!("retention: cannot delete the drill report of {key}: {e}");
                }
                report.deleted.push(key.clone())
            }
            Err((e, refused)) => {
                report.refused += u64::from(refused);
                report.errors.push(e);
                // Stop at the first refusal: the next delete would most likely be refused
                // the same way, and the next pass tries again.
                return Ok((report, listing.foreign));
            }
        }
    }
    if opts.orphans {
        for o in report.orphans.iter_mut().filter(|o| o.deletable) {
            match storage.delete(&o.key) {
                Ok(()) => o.deleted = true,
                Err(e) => {
                    report.refused += u64::from(is_refusal(&e));
                    report.errors.push(format!("{}: {e}", o.key));
                    break;
                }
            }
        }
    }
    Ok((report, listing.foreign))
}

/// Whether the storage refused a delete (rather than failing to answer): S3 HTTP 403
/// (AccessDenied, e.g. on a locked version or for credentials without delete
/// permission), or a directory's permission denied.
fn is_refusal(e: &std::io::Error) -> bool {
    use crate::storage::s3::S3Error;
    e.kind() == std::io::ErrorKind::PermissionDenied
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<S3Error>())
            .is_some_and(|s| matches!(s, S3Error::Status { status: 403, .. }))
}

/// Retention after a successful scheduled run ([`prune_job`], the code of `prune`):
/// what it deleted is logged, orphans are reported, a failed or refused delete is
/// logged once and ends the pass (the next run tries again; nothing loops), and refusals
/// are counted in `backupy_agent_retention_deletes_refused_total{job_id}`.
pub fn after_run(
    storage: &Storage,
    target: &str,
    job: &str,
    rules: Rules,
    metrics: &crate::metrics::Metrics,
) {
    let report = match prune_job(storage, target, job, rules, Options::default(), Utc::now()) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("job {job}: retention failed: {e}");
            return;
        }
    };
    if !report.deleted.is_empty() {
        log::info!(
            "job {job}: retention deleted {} old backup(s): {}",
            report.deleted.len(),
            report.deleted.join(", ")
        );
    }
    if !report.orphans.is_empty() {
        let keys: Vec<&str> = report.orphans.iter().map(|o| o.key.as_str()).collect();
        log::warn!(
            "job {job}: {} object(s) without a manifest left alone (see `backupy-agent prune --orphans`): {}",
            keys.len(),
            keys.join(", ")
        );
    }
    if report.refused > 0 {
        metrics.retention_deletes_refused_total.with_label_values(&[job]).inc_by(report.refused);
    }
    if let Some(e) = report.errors.first() {
        log::warn!("job {job}: retention failed: cannot delete {e}; the rest is left for the next run");
    }
}

/// The text `prune` prints for its reports: one line per backup and orphan.
pub fn render_text(reports: &[JobReport]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for r in reports {
        let mode = if r.dry_run { " (dry run: nothing deleted)" } else { "" };
        let _ = writeln!(s, "job {} (target {}){mode}", r.job, r.target);
        if r.backups.is_empty() {
            let _ = writeln!(s, "  no backups");
        }
        for d in &r.backups {
            let action = match (d.keep, r.dry_run) {
                (true, _) => "keep",
                (false, true) => "would delete",
                (false, false) if r.deleted.contains(&d.object_key) => "deleted",
                (false, false) => "delete (not done)",
            };
            let why =
                if d.reasons.is_empty() { "no rule keeps it".to_string() } else { d.reasons.join(", ") };
            let _ = writeln!(s, "  {:<36}  {:<20}  {:<12}  {why}", d.id, d.started_at, action);
        }
        for o in &r.orphans {
            let state = match (o.deleted, o.deletable) {
                (true, _) => "orphan, deleted",
                (false, false) if o.unreadable_manifest => "orphan: its manifest cannot be read; left alone",
                (false, true) => "orphan: no manifest; `prune --orphans` deletes it",
                (false, false) => {
                    "orphan: no manifest, newer than the newest backup (maybe still being written); left"
                }
            };
            let _ = writeln!(s, "  {} ({} bytes): {state}", o.key, o.size);
        }
        for f in &r.foreign {
            let _ = writeln!(s, "  {}: foreign manifest, left alone: {}", f.key, f.reason);
        }
        for e in &r.errors {
            let _ = writeln!(s, "  error: cannot delete {e}");
        }
    }
    s
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// The UTC time in an object key's file name (`…/20261127T003327Z-<run id>.ext`).
fn key_time(key: &str) -> Option<DateTime<Utc>> {
    let name = key.rsplit('/').next()?;
    let stamp = name.get(..16)?;
    NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").ok().map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone};

    fn at(s: &str) -> DateTime<Utc> {
        // "2026-12-07" (03:00 UTC) or "2026-12-07T13:05".
        if s.len() == 10 {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
            return d.and_hms_opt(3, 0, 0).unwrap().and_utc();
        }
        NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M").unwrap().and_utc()
    }

    fn c(id: &str, t: DateTime<Utc>) -> Candidate {
        Candidate {
            id: id.into(),
            object_key: format!("t/j/{}-{id}.sqlite", t.format("%Y%m%dT%H%M%SZ")),
            started_at: Some(t),
            locked_until: None,
        }
    }

    /// One backup per label, the label being its id and its time.
    fn backups(times: &[&str]) -> Vec<Candidate> {
        times.iter().map(|s| c(s, at(s))).collect()
    }

    fn kept(rules: &Rules, all: &[Candidate], now: DateTime<Utc>) -> Vec<String> {
        let mut v: Vec<String> =
            decide(rules, all, now).into_iter().filter(|d| d.keep).map(|d| d.id).collect();
        v.sort();
        v
    }

    fn sorted(v: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    /// Daily backups at 03:00 UTC from `first` to `last`, both included.
    fn daily(first: &str, last: &str) -> Vec<Candidate> {
        let (mut d, end) = (at(first), at(last));
        let mut v = Vec::new();
        while d <= end {
            v.push(c(&d.format("%Y-%m-%d").to_string(), d));
            d += Duration::days(1);
        }
        v
    }

    fn gfs(last: u32, h: u32, d: u32, w: u32, m: u32, y: u32) -> Rules {
        let n = |x: u32| (x > 0).then_some(x);
        Rules {
            keep_last: n(last),
            keep_hourly: n(h),
            keep_daily: n(d),
            keep_weekly: n(w),
            keep_monthly: n(m),
            keep_yearly: n(y),
            ..Rules::default()
        }
    }

    /// restic's documented example: daily backups, `--keep-daily 7 --keep-weekly 5
    /// --keep-monthly 12 --keep-yearly 75` keeps the 7 most recent dailies, then the last
    /// backup of each further week (the dailies already cover some weeks), the last of
    /// each further month up to 12 months, and the last of each year. Here over one
    /// year ending Monday 2026-12-07; the expected set is worked out from the calendar.
    #[test]
    fn restic_example_daily_7_weekly_5_monthly_12_yearly_75_over_a_year() {
        let all = daily("2025-12-08", "2026-12-07");
        let rules = gfs(0, 0, 7, 5, 12, 75);
        let want = sorted(&[
            // daily 7
            "2026-12-01",
            "2026-12-02",
            "2026-12-03",
            "2026-12-04",
            "2026-12-05",
            "2026-12-06",
            "2026-12-07",
            // weekly: W50 (12-07) and W49 (Sunday 12-06) are dailies already; W48, W47, W46
            "2026-11-29",
            "2026-11-22",
            "2026-11-15",
            // monthly: 2026-12 is 12-07 already; the last day of each month back to January
            "2026-11-30",
            "2026-10-31",
            "2026-09-30",
            "2026-08-31",
            "2026-07-31",
            "2026-06-30",
            "2026-05-31",
            "2026-04-30",
            "2026-03-31",
            "2026-02-28",
            "2026-01-31",
            // yearly: 2026 is 12-07 already; 2025's last backup
            "2025-12-31",
        ]);
        assert_eq!(kept(&rules, &all, at("2026-12-07")), want);
        // Each kept backup names every rule that keeps it, once.
        let d = decide(&rules, &all, at("2026-12-07"));
        let newest = d.iter().find(|d| d.id == "2026-12-07").unwrap();
        assert_eq!(
            newest.reasons,
            ["newest", "daily 2026-12-07", "weekly 2026-W50", "monthly 2026-12", "yearly 2026"]
        );
        let sunday = d.iter().find(|d| d.id == "2026-11-29").unwrap();
        assert_eq!(sunday.reasons, ["weekly 2026-W48"]);
        let dropped = d.iter().find(|d| d.id == "2026-11-28").unwrap();
        assert!(!dropped.keep && dropped.reasons.is_empty(), "{dropped:?}");
    }

    /// The same year simulated day by day with a fake clock: a backup each day, then
    /// retention over what is left. Pruning every day ends with the same set as pruning
    /// once, and never holds more than the rules allow plus the newest.
    #[test]
    fn a_year_of_daily_runs_pruned_each_day_keeps_the_same_set() {
        let rules = gfs(0, 0, 7, 5, 12, 75);
        let mut stored: Vec<Candidate> = Vec::new();
        for b in daily("2025-12-08", "2026-12-07") {
            let now = b.started_at.unwrap() + Duration::minutes(5);
            stored.push(b);
            let keep: Vec<String> =
                decide(&rules, &stored, now).into_iter().filter(|d| d.keep).map(|d| d.id).collect();
            stored.retain(|c| keep.contains(&c.id));
            assert!(stored.len() <= 7 + 5 + 12 + 75, "{} kept on {now}", stored.len());
        }
        let mut ids: Vec<String> = stored.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        assert_eq!(ids, kept(&rules, &daily("2025-12-08", "2026-12-07"), at("2026-12-07")));
        assert_eq!(ids.len(), 22);
    }

    /// restic: "for the last n days which have one or more snapshots, keep only the most
    /// recent one for each day": days without a backup do not count.
    #[test]
    fn bucket_rules_count_only_periods_that_have_a_backup() {
        let all = backups(&["2026-11-01", "2026-11-02", "2026-11-05", "2026-11-10"]);
        let rules = gfs(0, 0, 3, 0, 0, 0);
        assert_eq!(kept(&rules, &all, at("2026-12-07")), sorted(&["2026-11-02", "2026-11-05", "2026-11-10"]));
    }

    /// The newest of each period is the one kept; older ones in the same period go.
    #[test]
    fn hourly_keeps_the_newest_backup_of_each_hour() {
        let all = backups(&[
            "2026-12-01T10:05",
            "2026-12-01T10:55",
            "2026-12-01T11:00",
            "2026-12-01T11:30",
            "2026-12-01T13:10",
        ]);
        let rules = gfs(0, 3, 0, 0, 0, 0);
        let d = decide(&rules, &all, at("2026-12-02"));
        let keep: Vec<(&str, &[String])> =
            d.iter().filter(|d| d.keep).map(|d| (d.id.as_str(), d.reasons.as_slice())).collect();
        assert_eq!(
            keep,
            [
                ("2026-12-01T13:10", &["newest".to_string(), "hourly 2026-12-01T13".to_string()][..]),
                ("2026-12-01T11:30", &["hourly 2026-12-01T11".to_string()][..]),
                ("2026-12-01T10:55", &["hourly 2026-12-01T10".to_string()][..]),
            ]
        );
    }

    /// ISO weeks run Monday to Sunday and belong to the ISO year: 2025-12-29 (a Monday)
    /// is in 2026-W01 with 2026-01-04, while Sunday 2025-12-28 is 2025-W52.
    #[test]
    fn weekly_uses_iso_weeks_across_a_year_boundary() {
        let all = backups(&["2025-12-28", "2025-12-29", "2026-01-04", "2026-01-05"]);
        let rules = gfs(0, 0, 0, 3, 0, 0);
        let d = decide(&rules, &all, at("2026-02-01"));
        let reasons = |id: &str| d.iter().find(|d| d.id == id).unwrap().reasons.clone();
        assert_eq!(reasons("2026-01-05"), ["newest", "weekly 2026-W02"]);
        assert_eq!(reasons("2026-01-04"), ["weekly 2026-W01"]);
        assert_eq!(reasons("2025-12-29"), Vec::<String>::new());
        assert_eq!(reasons("2025-12-28"), ["weekly 2025-W52"]);
    }

    /// A backup kept by several rules is kept once and uses up a slot of each: the
    /// rules are independent, as in restic (`--keep-last 2 --keep-daily 2`).
    #[test]
    fn a_backup_kept_by_several_rules_is_counted_once() {
        let all = backups(&["2026-12-01T08:00", "2026-12-02T08:00", "2026-12-02T20:00", "2026-12-03T08:00"]);
        let rules = gfs(2, 0, 2, 0, 0, 0);
        let d = decide(&rules, &all, at("2026-12-04"));
        assert_eq!(d.iter().filter(|d| d.keep).count(), 2, "{d:?}");
        let reasons = |id: &str| d.iter().find(|d| d.id == id).unwrap().reasons.clone();
        assert_eq!(reasons("2026-12-03T08:00"), ["newest", "last 1", "daily 2026-12-03"]);
        assert_eq!(reasons("2026-12-02T20:00"), ["last 2", "daily 2026-12-02"]);
        assert!(reasons("2026-12-02T08:00").is_empty(), "not the newest of its day, not among the last 2");
        assert!(reasons("2026-12-01T08:00").is_empty(), "the two daily slots are used by 12-03 and 12-02");
    }

    /// restic's `--keep-within 2y5m7d3h`: every backup younger than that before the
    /// newest backup (not before now: a schedule that stopped does not age everything out).
    #[test]
    fn keep_within_counts_back_from_the_newest_backup() {
        let w = Within::parse("2y5m7d3h").unwrap();
        assert_eq!(w, Within { years: 2, months: 5, days: 7, hours: 3 });
        assert_eq!(w.before(at("2026-12-10T12:00")), at("2024-07-03T09:00"));
        assert_eq!(Within::parse("2w").unwrap(), Within { days: 14, ..Within::default() });
        for bad in ["", "30", "d", "30x", "-3d", "1.5d", "30 d"] {
            assert!(Within::parse(bad).is_err(), "{bad:?} accepted");
        }
        let all = backups(&["2026-06-01", "2026-06-20", "2026-06-25", "2026-06-30"]);
        let rules = Rules { keep_within: Some(Within::parse("10d").unwrap()), ..Rules::default() };
        // A year later, the last ten days before the newest backup are still kept.
        let d = decide(&rules, &all, at("2027-06-30"));
        assert_eq!(kept(&rules, &all, at("2027-06-30")), sorted(&["2026-06-25", "2026-06-30"]));
        assert_eq!(d[1].reasons, ["within 10d"]);
    }

    #[test]
    fn keep_last_and_retention_days_keep_their_old_meaning() {
        let now = at("2026-12-07");
        let all: Vec<_> = (0..6).map(|i| c(&format!("b{i}"), now - Duration::days(i * 3))).collect(); // 0,3,..,15 days
        let r = Rules { keep_last: Some(2), ..Rules::default() };
        assert_eq!(kept(&r, &all, now), ["b0", "b1"]);
        let r = Rules { keep_last: Some(1), retention_days: Some(7), ..Rules::default() };
        assert_eq!(kept(&r, &all, now), ["b0", "b1", "b2"]);
        let r = Rules { keep_last: Some(0), ..Rules::default() };
        assert_eq!(kept(&r, &all, now), ["b0"], "keep_last is at least 1");
    }

    /// Whatever the rules: nothing goes without a rule; the newest, a locked backup and
    /// one whose start time cannot be read always stay.
    #[test]
    fn never_deleted_whatever_the_rules() {
        let now = at("2026-12-07");
        let mut all: Vec<_> = (0..4).map(|i| c(&format!("b{i}"), now - Duration::days(100 + i))).collect();
        assert_eq!(kept(&Rules::default(), &all, now), ["b0", "b1", "b2", "b3"]);
        all[2].locked_until = Some(now + Duration::days(1));
        all[3].locked_until = Some(now - Duration::days(1)); // expired: no protection
        all.push(Candidate { started_at: None, ..c("odd", now) });
        let r = Rules { retention_days: Some(1), ..Rules::default() };
        let d = decide(&r, &all, now);
        assert_eq!(kept(&r, &all, now), ["b0", "b2", "odd"]);
        let reasons = |id: &str| d.iter().find(|d| d.id == id).unwrap().reasons.clone();
        assert_eq!(reasons("b0"), ["newest"]);
        assert_eq!(reasons("b2"), ["locked until 2026-12-08T03:00:00Z"]);
        assert_eq!(reasons("odd"), ["started_at unreadable"]);
    }

    #[test]
    fn key_time_reads_the_stamp_of_an_object_name() {
        let t = Utc.with_ymd_and_hms(2026, 11, 27, 0, 33, 27).unwrap();
        assert_eq!(key_time(&format!("t/j/{}-x.sqlite", t.format("%Y%m%dT%H%M%SZ"))), Some(t));
        assert_eq!(key_time("t/j/garbage"), None);
    }
}
