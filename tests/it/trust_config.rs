//! Issue 16, defect 13: a standalone job with `format = "v1"` and a compression other
//! than zstd makes objects the original Go backupy-decrypt cannot open (it always
//! zstd-decodes v1). Allowed, but warned about at config load, naming the reason, and
//! `check-config` shows it.

use crate::common::{agent, run, text};

fn check_config(job_lines: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("backupy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[storage]\ndir = \"./b\"\n[encryption]\nkey_file = \"raw.key\"\n\
             [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"legacy\"\ntarget = \"app\"\n{job_lines}"
        ),
    )
    .unwrap();
    let mut c = agent();
    c.arg("check-config").arg(&cfg);
    let out = run(c);
    (out.status.code(), text(&out.stderr))
}

#[test]
fn format_v1_with_gzip_or_no_compression_is_warned_about_and_zstd_is_not() {
    for compression in ["gzip", "none"] {
        let (code, err) = check_config(&format!("format = \"v1\"\ncompression = \"{compression}\"\n"));
        assert_eq!(code, Some(0), "still a valid config: {err}");
        let warning =
            err.lines().find(|l| l.contains("format v1")).unwrap_or_else(|| panic!("no warning: {err}"));
        assert!(
            warning.contains("legacy")
                && warning.contains(&format!("compression \"{compression}\""))
                && warning.contains("original Go backupy-decrypt")
                && warning.contains("backupy.toml:"),
            "{warning}"
        );
    }
    for job in ["format = \"v1\"\ncompression = \"zstd\"\n", "format = \"v1\"\n", "compression = \"gzip\"\n"]
    {
        let (code, err) = check_config(job);
        assert_eq!(code, Some(0), "{err}");
        assert!(!err.contains("format v1"), "{job}: {err}");
    }
}
