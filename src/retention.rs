//! Retention: which stored backups of a job to delete after a successful run.
//!
//! A backup is deleted only when no rule keeps it: younger than `retention_days`, or
//! among the newest `keep_last`. A rule left out keeps nothing; with neither rule nothing
//! is deleted; the newest backup is never deleted. Objects without a manifest
//! (incomplete backups) older than the newest complete backup are deleted too. Runs on
//! the worker thread that finished the run; a failure to prune is reported, never fatal.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::storage::{ForeignManifest, Manifest, Storage, manifest_key};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    pub retention_days: Option<u32>,
    pub keep_last: Option<u32>,
}

/// The object keys to delete (manifests are deleted with their objects).
pub fn plan(rules: Rules, manifests: &[Manifest], incomplete: &[String], now: DateTime<Utc>) -> Vec<String> {
    if rules.retention_days.is_none() && rules.keep_last.is_none() {
        return Vec::new();
    }
    let mut sorted: Vec<&Manifest> = manifests.iter().collect();
    sorted.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    let mut delete = Vec::new();
    for (i, m) in sorted.iter().enumerate() {
        let by_count = rules.keep_last.is_some_and(|n| (i as u32) < n.max(1));
        let by_age = rules.retention_days.is_some_and(|days| {
            parse_time(&m.started_at).is_none_or(|t| now - t < chrono::Duration::days(days as i64))
        });
        if i == 0 || by_count || by_age {
            continue;
        }
        delete.push(m.object_key.clone());
    }
    let newest = sorted.first().and_then(|m| parse_time(&m.started_at));
    for key in incomplete {
        if let (Some(t), Some(newest)) = (key_time(key), newest)
            && t < newest
        {
            delete.push(key.clone());
        }
    }
    delete
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

/// Applies the rules to `job`'s backups in `storage`. Only manifests the storage layer
/// accepts as this job's own count ([`Manifest::check_stored_at`]); a foreign manifest
/// is reported and neither it nor the object beside it is touched, whatever its
/// `object_key` says.
pub fn prune(storage: &Storage, target: &str, job: &str, rules: Rules) -> Result<Pruned, String> {
    let prefix = format!("{target}/{job}/");
    let listing = storage.manifests_checked(&prefix).map_err(|e| format!("cannot list {prefix}: {e}"))?;
    let manifests: Vec<Manifest> =
        listing.manifests.into_iter().filter(|m| m.target == target && m.job == job).collect();
    // Objects beside a foreign or unreadable manifest are not "incomplete": someone put
    // a manifest there, and it is not ours to judge.
    let not_ours: std::collections::HashSet<String> = listing
        .foreign
        .iter()
        .map(|f| f.key.clone())
        .chain(listing.unreadable.iter().cloned())
        .filter_map(|k| k.strip_suffix(".json").map(str::to_string))
        .collect();
    let with_manifest: std::collections::HashSet<&str> =
        manifests.iter().map(|m| m.object_key.as_str()).collect();
    let incomplete: Vec<String> = storage
        .list(&prefix)
        .map_err(|e| format!("cannot list {prefix}: {e}"))?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !k.ends_with(".json") && !with_manifest.contains(k.as_str()) && !not_ours.contains(k))
        .collect();
    let mut deleted = Vec::new();
    for key in plan(rules, &manifests, &incomplete, Utc::now()) {
        // The manifest goes first: an object without one is merely incomplete, while a
        // manifest without its object would promise a backup that is gone.
        storage.delete(&manifest_key(&key)).map_err(|e| format!("cannot delete {key}.json: {e}"))?;
        storage.delete(&key).map_err(|e| format!("cannot delete {key}: {e}"))?;
        deleted.push(key);
    }
    Ok(Pruned { deleted, foreign: listing.foreign })
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

    fn m(id: &str, days_ago: i64, now: DateTime<Utc>) -> Manifest {
        let t = now - chrono::Duration::days(days_ago);
        Manifest {
            manifest_version: 1,
            id: id.into(),
            job: "j".into(),
            target: "t".into(),
            engine: "sqlite".into(),
            engine_version: String::new(),
            object_key: format!("t/j/{}-{id}.sqlite", t.format("%Y%m%dT%H%M%SZ")),
            size_bytes: 1,
            dump_bytes: 1,
            sha256: String::new(),
            compression: "none".into(),
            encryption: "none".into(),
            key_id: String::new(),
            started_at: crate::storage::rfc3339(t),
            finished_at: crate::storage::rfc3339(t),
            agent_version: String::new(),
            content: None,
        }
    }

    fn ids(keys: &[String]) -> Vec<String> {
        let mut v: Vec<String> = keys
            .iter()
            .map(|k| k.rsplit('-').next().unwrap().trim_end_matches(".sqlite").to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn keep_last_keeps_exactly_the_newest_n() {
        let now = Utc::now();
        let all: Vec<_> = (0..5).map(|i| m(&format!("b{i}"), i, now)).collect();
        let del = plan(Rules { keep_last: Some(2), retention_days: None }, &all, &[], now);
        assert_eq!(ids(&del), ["b2", "b3", "b4"]);
    }

    #[test]
    fn either_rule_keeps_a_backup() {
        let now = Utc::now();
        let all: Vec<_> = (0..6).map(|i| m(&format!("b{i}"), i * 3, now)).collect(); // 0,3,6,9,12,15 days
        let del = plan(Rules { keep_last: Some(1), retention_days: Some(7) }, &all, &[], now);
        assert_eq!(ids(&del), ["b3", "b4", "b5"]);
    }

    #[test]
    fn no_rules_delete_nothing_and_the_newest_is_never_deleted() {
        let now = Utc::now();
        let all: Vec<_> = (0..3).map(|i| m(&format!("b{i}"), 100 + i, now)).collect();
        assert!(plan(Rules::default(), &all, &[], now).is_empty());
        let del = plan(Rules { retention_days: Some(1), keep_last: None }, &all, &[], now);
        assert_eq!(ids(&del), ["b1", "b2"], "b0 is the newest and stays although it is old");
        let del = plan(Rules { retention_days: None, keep_last: Some(0) }, &all, &[], now);
        assert_eq!(ids(&del), ["b1", "b2"], "keep_last is at least 1");
    }

    #[test]
    fn incomplete_objects_older_than_the_newest_backup_go() {
        let now = Utc::now();
        let all = vec![m("b0", 1, now)];
        let old = format!("t/j/{}-x.sqlite", (now - chrono::Duration::days(3)).format("%Y%m%dT%H%M%SZ"));
        let newer = format!("t/j/{}-y.sqlite", now.format("%Y%m%dT%H%M%SZ"));
        let del = plan(Rules { keep_last: Some(5), retention_days: None }, &all, &[old.clone(), newer], now);
        assert_eq!(del, vec![old]);
    }
}
