//! Issue 17, defect 10: every command's `--help` lists its exit codes, and every
//! `--config <FILE>` (and `check-config`'s `<FILE>`) has a description. The commands are
//! taken from the binary's own `--help`, so a new command is checked too.

use crate::common::*;

fn help(mut c: std::process::Command, args: &[&str]) -> String {
    c.args(args);
    let out = run(c);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The text after `token` on its line, or else the next line, trimmed.
fn description<'a>(help: &'a str, token: &str) -> Option<&'a str> {
    let lines: Vec<&str> = help.lines().collect();
    let i = lines.iter().position(|l| l.trim_start().starts_with(token))?;
    let rest = lines[i].trim_start()[token.len()..].trim();
    if !rest.is_empty() {
        return Some(rest);
    }
    let next = lines.get(i + 1)?.trim();
    (!next.is_empty() && !next.starts_with('-') && !next.starts_with('<')).then_some(next)
}

fn assert_exit_codes(what: &str, help: &str) {
    let section = help
        .split_once("Exit codes:")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("{what}: no exit codes:\n{help}"));
    for code in ["0", "2"] {
        assert!(
            section.lines().any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "{what}: exit code {code} is not listed:\n{help}"
        );
    }
}

#[test]
fn every_command_lists_its_exit_codes_and_describes_its_config_file() {
    let top = help(agent(), &["--help"]);
    let commands: Vec<String> = top
        .split_once("Commands:")
        .expect("a Commands: section")
        .1
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A command's line starts two spaces in; a wrapped description, further.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 12, "{commands:?}");
    for cmd in &commands {
        let h = help(agent(), &[cmd.as_str(), "--help"]);
        assert_exit_codes(cmd, &h);
        if cmd != "version" {
            let failure = h.split_once("Exit codes:").unwrap().1;
            assert!(failure.lines().any(|l| l.trim_start().starts_with("1 ")), "{cmd}: no exit code 1:\n{h}");
        }
        if h.contains("--config <FILE>") {
            let d = description(&h, "--config <FILE>")
                .unwrap_or_else(|| panic!("{cmd}: --config undescribed:\n{h}"));
            assert!(d.to_lowercase().contains("config"), "{cmd}: --config <FILE> {d}");
        }
    }
    let h = help(agent(), &["check-config", "--help"]);
    assert!(description(&h, "<FILE>").is_some(), "check-config <FILE> undescribed:\n{h}");
    // `backup` names what 1 means for it: a failed run.
    let h = help(agent(), &["backup", "--help"]);
    assert!(h.contains("1  a run failed"), "{h}");
    assert_exit_codes("backupy-decrypt", &help(decrypt(), &["--help"]));
}
