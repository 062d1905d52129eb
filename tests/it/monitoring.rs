//! The shipped monitoring files: the alert rules pass `promtool check rules` and their
//! unit tests, and every metric the rules and the Grafana dashboard use is one the agent
//! exports (names taken from a real registry's exposition, not from a list here).

use std::collections::BTreeSet;
use std::process::Command;

use backupy_agent::metrics::Metrics;

fn promtool(args: &[&str]) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/monitoring"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is needed ({e}): apt-get install prometheus, or run scripts/install-deps.sh core"
            )
        })
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `backupy_agent_*` / `process_*` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("backupy_agent_") || word.starts_with("process_") {
            out.insert(
                word.trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum")
                    .to_string(),
            );
        }
    }
    out
}

#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    let m = Metrics::new().unwrap();
    // Touch every labelled family so it appears in the exposition.
    m.record_run("j", "success", std::time::Duration::from_secs(1), Some(1));
    m.set_connection_state("standalone");
    m.health_check_up.with_label_values(&["c"]).set(1.0);
    m.health_check_duration_seconds.with_label_values(&["c"]).observe(0.1);
    let exported = metric_names(&m.render());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/monitoring");
    let dashboard = std::fs::read_to_string(format!("{dir}/grafana-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let rules = std::fs::read_to_string(format!("{dir}/alerts.yml")).unwrap();
    for (file, text) in [("grafana-dashboard.json", &dashboard), ("alerts.yml", &rules)] {
        let used = metric_names(text);
        assert!(!used.is_empty());
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} uses metrics the agent does not export: {unknown:?}");
    }
}

/// Every rule of alerts.yml has, in alerts_test.yml, an evaluation where it fires and one
/// where it does not (issue 17: firing and resolving, for each rule). The unit tests
/// themselves run in the test above.
#[test]
fn every_alert_rule_is_unit_tested_firing_and_not_firing() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/monitoring");
    let rules = std::fs::read_to_string(format!("{dir}/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(format!("{dir}/alerts_test.yml")).unwrap();
    let alerts: Vec<&str> =
        rules.lines().filter_map(|l| l.trim().strip_prefix("- alert:")).map(str::trim).collect();
    assert!(alerts.len() >= 5, "{alerts:?}");
    // (alertname, fires?) of each `alertname:` block: `exp_alerts: []` is "does not fire".
    let mut seen = std::collections::BTreeSet::new();
    let mut current: Option<&str> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim());
        } else if let (Some(name), Some(rest)) = (current, line.strip_prefix("exp_alerts:")) {
            seen.insert((name.to_string(), rest.trim() != "[]"));
            current = None;
        }
    }
    for alert in &alerts {
        for fires in [true, false] {
            assert!(
                seen.contains(&(alert.to_string(), fires)),
                "alerts_test.yml has no evaluation where {alert} {}",
                if fires { "fires" } else { "does not fire" }
            );
        }
    }
    for required in
        ["BackupyHealthCheckDown", "BackupyLastRunFailed", "BackupyBackupTooOld", "BackupyAgentDown"]
    {
        assert!(alerts.contains(&required), "alerts.yml has no {required}");
    }
}
