//! Command lines of the two binaries. Both share the exit codes of the spec: 0 ok,
//! 2 usage errors (clap's own), 1 every other failure, reported as one `error:` line.

pub mod agent;
pub mod decrypt;
pub mod discover;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Logs go to stderr; the level comes from `BACKUPY_LOG_LEVEL` (default `info`; a level,
/// or an env_logger filter such as `info,backupy_agent::session=debug`), the format from
/// `BACKUPY_LOG_FORMAT` (`text`, or `json`: one object per line with `ts`, `level`,
/// `module` and `message`). Connected mode may change the level at run time and forward
/// records as LogEvents (see [`crate::logfwd`]).
pub fn init_logging(default_level: &str) {
    let env = crate::env::Env::get();
    let level = env.log_level.clone().unwrap_or_else(|| default_level.to_string());
    let mut builder = env_logger::Builder::new();
    let json = env.log_json;
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
    let simple = crate::logfwd::parse_level(&level);
    match simple {
        Some(_) => builder.filter_level(log::LevelFilter::Trace),
        None => builder.parse_filters(&level),
    };
    let inner = builder.target(env_logger::Target::Stderr).build();
    crate::logfwd::set_local_level(simple.unwrap_or(inner.filter()));
    let _ = log::set_boxed_logger(Box::new(AgentLogger { inner, per_module: simple.is_none() }));
    // set_boxed_logger leaves the max level alone: publish ours again.
    crate::logfwd::set_local_level(crate::logfwd::local_level());
}

/// The process logger: capped noisy modules, the run-time level of [`crate::logfwd`], the
/// operator's filter, redaction, and the LogEvent capture.
struct AgentLogger {
    inner: env_logger::Logger,
    /// `BACKUPY_LOG_LEVEL` is a per-module filter rather than one level: `inner` applies it.
    per_module: bool,
}

impl AgentLogger {
    /// ureq logs request URIs, which for presigned S3 requests carry the signature and
    /// credential scope: never below warn, whatever the agent's level; rustls alike.
    fn capped(meta: &log::Metadata<'_>) -> bool {
        let t = meta.target();
        meta.level() > log::Level::Warn
            && (t.starts_with("ureq") || t.starts_with("rustls") || t.starts_with("tungstenite"))
    }
}

impl log::Log for AgentLogger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        !Self::capped(meta) && crate::logfwd::enabled(meta.level())
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let local = crate::logfwd::enabled_locally(record.level())
            && (!self.per_module || self.inner.matches(record));
        if local {
            self.inner.log(record);
        }
        if crate::logfwd::forwarded(record.level()) {
            let message = crate::secrets::redact(&record.args().to_string());
            crate::logfwd::capture(record.level(), record.target(), &message);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
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
