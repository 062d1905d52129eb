//! Command lines of the two binaries. Both share the exit codes of the spec: 0 ok,
//! 2 usage errors (clap's own), 1 every other failure, reported as one `error:` line.

pub mod agent;
pub mod decrypt;
pub mod discover;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Logs go to stderr; the level comes from `BACKUPY_LOG_LEVEL` (default `info`), the
/// format from `BACKUPY_LOG_FORMAT` (`text`, or `json`: one object per line with
/// `ts`, `level`, `module` and `message`).
pub fn init_logging(default_level: &str) {
    let level = std::env::var("BACKUPY_LOG_LEVEL").unwrap_or_else(|_| default_level.to_string());
    let mut builder = env_logger::Builder::new();
    let json = std::env::var("BACKUPY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Every line passes the redaction layer, whichever module wrote it.
    builder.format(move |buf, record| {
        use std::io::Write as _;
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let message = crate::secrets::redact(&record.args().to_string());
        if json {
            let line = serde_json::json!({
                "ts": ts,
                "level": record.level().as_str(),
                "module": record.target(),
                "message": message,
            });
            writeln!(buf, "{line}")
        } else {
            writeln!(buf, "[{ts} {:<5} {}] {message}", record.level(), record.target())
        }
    });
    let _ = builder
        .parse_filters(&level)
        // ureq logs request URIs, which for presigned S3 requests carry the signature
        // and credential scope: never below warn, whatever the agent's level.
        .filter_module("ureq", log::LevelFilter::Warn)
        .filter_module("ureq_proto", log::LevelFilter::Warn)
        .filter_module("rustls", log::LevelFilter::Warn)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .try_init();
}

/// Prints `error: …` (with its causes) on stderr and returns exit code 1.
pub fn report(program: &str, err: &anyhow::Error) -> ExitCode {
    let mut msg = err.to_string();
    for cause in err.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    eprintln!("{program}: error: {}", crate::secrets::redact(&msg));
    ExitCode::from(1)
}

/// A progress bar on stderr when it is a terminal; `None` otherwise (log lines instead).
pub fn progress_bar(len: Option<u64>, quiet: bool) -> Option<ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} {bar:30} {binary_bytes_per_sec} {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} {binary_bytes_per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}
