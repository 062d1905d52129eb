//! Command lines of the two binaries. Both share the exit codes of the spec: 0 ok,
//! 2 usage errors (clap's own), 1 every other failure, reported as one `error:` line.
//!
//! Everything either binary writes on stderr goes through [`stderr_line`]: with
//! `BACKUPY_LOG_FORMAT=json` every line is one JSON object (log records, the final
//! `error:`, clap's usage errors, a panic), and a message with line breaks in it (a
//! hook's output) stays inside its one line and its one field.

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
        let message = record.args().to_string();
        writeln!(buf, "{}", stderr_line(record.level(), record.target(), &message, json))
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
    if json {
        // A panic's report is a stderr line too.
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            let message = format!("thread '{}' panicked: {info}", thread.name().unwrap_or("?"));
            eprintln!("{}", stderr_line(log::Level::Error, "panic", &message, true));
        }));
    }
}

/// One line for stderr, without its newline, redacted: a JSON object (`ts`, `level`,
/// `module`, `message`) when `json`, else `[ts LEVEL module] message`. Line breaks in
/// the message never start a new line: JSON escapes them, and text shows them as `\n`,
/// so a hook's multi-line output cannot split a record or pass for a record of its own.
pub fn stderr_line(level: log::Level, module: &str, message: &str, json: bool) -> String {
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let message = crate::secrets::redact(message);
    if json {
        serde_json::json!({
            "ts": ts,
            "level": level.as_str(),
            "module": module,
            "message": message.trim_end(),
        })
        .to_string()
    } else {
        format!("[{ts} {level:<5} {module}] {}", one_line(message.trim_end()))
    }
}

/// `text` with CR and LF shown as `\r` and `\n`.
fn one_line(text: &str) -> String {
    text.replace('\r', "\\r").replace('\n', "\\n")
}

/// The last words of a failed command, `program: error: …` in text: one line either way.
pub fn error_line(program: &str, message: &str) {
    if crate::env::Env::get().log_json {
        eprintln!("{}", stderr_line(log::Level::Error, program, &format!("error: {message}"), true));
    } else {
        eprintln!("{program}: error: {}", one_line(crate::secrets::redact(message).trim_end()));
    }
}

/// Parses the command line. Help and `--version` print as clap prints them (stdout); a
/// usage error exits 2 as clap's would, as one JSON line when the logs are JSON.
pub fn parse_args<P: clap::Parser>(program: &str) -> P {
    match P::try_parse() {
        Ok(p) => p,
        Err(e) if !e.use_stderr() || !crate::env::Env::get().log_json => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            eprintln!("{}", stderr_line(log::Level::Error, program, rendered.trim(), true));
            std::process::exit(e.exit_code());
        }
    }
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
    error_line(program, &msg);
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
