//! `backupy-agent`: `run` (standalone or connected; the default command), `check-config`,
//! `backup`, `list`, `prune`, `verify`, `restore`, `drill`, `keygen`, `version`, `health-check`,
//! `dump-state`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::cancel::Cancel;
use crate::config::Config;
use crate::crypto::{Identity, KeySource};
use crate::interrupt::{self, Interrupt};
use crate::pipeline::Progress;
use crate::state::StateDb;
use crate::storage::Manifest;
use crate::{AGENT_VERSION, runner};

/// `Example…` help text followed by the command's exit codes: `0` and `1` as given, then
/// the usage error every command shares. A literal, so that clap takes it as it is.
macro_rules! help {
    ($example:literal, $ok:literal, $failed:literal) => {
        concat!(
            $example,
            "\n\nExit codes:\n  0  ",
            $ok,
            "\n  1  ",
            $failed,
            "\n  2  usage error: an unknown, missing or conflicting flag or argument"
        )
    };
    // A one-shot command that handles SIGINT and SIGTERM (`interrupt`): `$stopped` says
    // what a signal leaves behind.
    ($example:literal, $ok:literal, $failed:literal, $stopped:literal) => {
        concat!(
            help!($example, $ok, $failed),
            "\n  130  stopped by SIGINT (Ctrl-C): ",
            $stopped,
            "\n  143  stopped by SIGTERM: the same"
        )
    };
}

#[derive(Parser)]
#[command(
    name = "backupy-agent",
    version = AGENT_VERSION,
    about = "Database backup agent: dump, compress, encrypt and store in constant memory",
    after_help = "Exit codes: 0 ok, 1 failure (one `error:` line on stderr), 2 usage error; \
        each command's --help says what they mean for it."
)]
struct Cli {
    /// Without a command: `run`.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run until SIGTERM/SIGINT: standalone with `--config` (the jobs on their cron
    /// schedules; running backups get `shutdown_grace_sec` to finish), connected to a
    /// control plane when BACKUPY_SERVER_URL is set (the default command).
    #[command(after_help = help!(
        "Examples:\n  backupy-agent run --config /etc/backupy/backupy.toml\n  \
        BACKUPY_SERVER_URL=https://backupy.example.com BACKUPY_AGENT_KEY_FILE=/etc/backupy/agent.key backupy-agent run",
        "stopped after SIGTERM or SIGINT, once every run finished or was cancelled (SIGHUP re-executes an installed update instead of exiting)",
        "could not start: the configuration or an environment setting was refused, another agent holds the state directory, no job has a cron schedule, the metrics address is taken"
    ))]
    Run {
        /// The standalone TOML configuration; without it, connected mode (BACKUPY_SERVER_URL).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print what the state database holds (config version, session, outbox depth, runs)
    /// as JSON; works while `run` is running. Secrets are masked unless --allow-secrets.
    #[command(after_help = help!(
        "Example:\n  BACKUPY_STATE_DIR=/var/lib/backupy backupy-agent dump-state",
        "printed",
        "no state database in the directory, it cannot be read, or the agent key cannot be read"
    ))]
    DumpState {
        /// Show secret references and values from the stored config.
        #[arg(long)]
        allow_secrets: bool,
        /// The state directory (default: BACKUPY_STATE_DIR, else /var/lib/backupy).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Validate a configuration and print each job's target, storage and next three fire
    /// times (UTC). Exit 0 when valid, 1 when refused.
    #[command(after_help = help!(
        "Example:\n  backupy-agent check-config /etc/backupy/backupy.toml",
        "the configuration is valid",
        "the configuration is refused (the error names the file, line and reason)"
    ))]
    CheckConfig {
        /// The standalone TOML configuration to check.
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a job now (or every job in turn) from a standalone config.
    #[command(after_help = help!(
        "Example:\n  backupy-agent backup --config backupy.toml --job app-nightly",
        "every run succeeded",
        "a run failed (each failure is one `error:` line; the other jobs still ran), or the configuration or --job was refused",
        "the run was cancelled and recorded as such in state.db, its dump child or exec killed, the unfinished object removed or the upload aborted; no further job started (a second signal exits at once, cleanup takes at most 10 s)"
    ))]
    Backup {
        /// The standalone TOML configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Run only this job (default: every job in turn).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
    /// Create an X25519 key pair: the private key goes to a 0600 file, the public key
    /// (the `recipient` of [encryption]) is printed as the only line on stdout.
    #[command(after_help = help!(
        "Example:\n  backupy-agent keygen --out /secure/backupy.key > backupy.pub",
        "the key pair was written; the public key is on stdout",
        "the file exists already (never overwritten) or cannot be written"
    ))]
    Keygen {
        /// Where to write the private key (refuses to overwrite).
        #[arg(long, value_name = "PATH", default_value = "./backupy.key")]
        out: PathBuf,
    },
    /// List the backups in storage, from their manifests (works on a fresh host).
    #[command(after_help = help!(
        "Example:\n  backupy-agent list --config backupy.toml --job app-nightly --json",
        "listed (an empty list included)",
        "the configuration is refused or the storage cannot be listed",
        "nothing to clean up"
    ))]
    List {
        /// The standalone TOML configuration (its storage is listed).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this job's backups.
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// Print the manifests as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Apply each job's retention rules now: list every backup with keep or delete and
    /// the rules that keep it (`last 1`, `daily 2026-12-01`, `newest`…), then delete the
    /// others (each object with its manifest). Objects without a manifest are listed as
    /// orphans and deleted only with --orphans.
    #[command(after_help = help!(
        "Examples:\n  backupy-agent prune --config backupy.toml --job app-nightly --dry-run\n  \
        backupy-agent prune --config backupy.toml --orphans --json",
        "done: every backup the rules do not keep was deleted (with --dry-run: nothing was deleted)",
        "the configuration or --job is refused, the storage cannot be listed, or a delete was refused (the rest of that job is left for the next pass)",
        "what was deleted is deleted (each object after its manifest); nothing else to clean up"
    ))]
    Prune {
        /// The standalone TOML configuration (its storage and the jobs' retention rules).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this job (default: every job).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// Decide and list; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also delete objects without a manifest that are older than the job's newest backup.
        #[arg(long)]
        orphans: bool,
        /// Print the decisions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a backup, check its size and SHA-256 against its manifest, decrypt it
    /// and check the dump's magic. Exit 1 on any mismatch.
    #[command(after_help = help!(
        "Example:\n  backupy-agent verify --config backupy.toml --backup latest --job app-nightly",
        "the backup is intact: size, SHA-256, every chunk and the dump's magic check out",
        "any mismatch, a backup that cannot be found, read or decrypted, or a refused configuration",
        "nothing to clean up: verify only reads"
    ))]
    Verify {
        #[command(flatten)]
        stored: StoredBackup,
    },
    /// Restore a backup: SQLite to a file, Redis to a data directory or a server, the
    /// other engines into a server (password from the URL or BACKUPY_RESTORE_PASSWORD,
    /// which takes env:/file: references). Into a server, the whole object is first
    /// downloaded to state_dir/tmp and checked (every chunk authenticated, SHA-256
    /// against the manifest); only then is it applied (PostgreSQL in one transaction).
    #[command(after_help = help!(
        "Examples:\n  backupy-agent restore --config backupy.toml --backup latest --job app-nightly --to ./restored.db\n  \
        BACKUPY_RESTORE_PASSWORD=env:PGPASS backupy-agent restore --config backupy.toml --backup 3f2c… --to postgres://postgres@127.0.0.1/app_restored",
        "restored",
        "the restore failed or was refused (an existing destination without --force, a backup that does not verify, a refused configuration)",
        "the download stopped and the restore tool was killed; PostgreSQL rolls back (one transaction), a SQLite or Redis file is not written, MySQL/MariaDB and MongoDB keep what was applied before (see the user guide); cleanup takes at most 10 s, a second signal exits at once"
    ))]
    Restore {
        #[command(flatten)]
        stored: StoredBackup,
        /// Destination: a file path (SQLite), a directory (Redis RDB) or a server URL.
        #[arg(long, value_name = "URL|PATH")]
        to: String,
        /// Replace an existing file, or existing tables/collections/keys on the server.
        #[arg(long)]
        force: bool,
        /// Apply the backup to the server while it is downloaded and decrypted, in one
        /// pass, instead of checking the whole object first: a damaged or tampered
        /// object is then found only part-way through the restore.
        #[arg(long)]
        no_preverify: bool,
    },
    /// Prove a backup restores: verify the stored object, restore it into scratch (SQLite:
    /// a temporary file in state_dir/tmp), count the rows of every table and compare them
    /// with the counts its manifest recorded at backup time. The report is written beside
    /// the backup as <object>.drill.json. SQLite (a temporary file) and PostgreSQL (a
    /// scratch database on the target's server, always dropped) so far (docs/drills.md).
    #[command(after_help = help!(
        "Examples:\n  backupy-agent drill --config backupy.toml --job app-nightly\n  \
        backupy-agent drill --config backupy.toml --job app-nightly --backup 3f2c… --json",
        "the drill passed: the object verified, restored, and every table holds exactly the rows its manifest recorded",
        "the drill failed (a tampered or corrupt object, a failed restore, a table whose count differs: each is named) or could not run (no such backup, an engine not built yet, a manifest without a content block, a refused configuration)",
        "the download stopped, the restore tool was killed and the scratch copy removed (a scratch database dropped); no report is written"
    ))]
    Drill {
        /// The standalone TOML configuration (storage, and the key to use).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The job whose backup to drill.
        #[arg(long, value_name = "ID")]
        job: String,
        /// A backup ID (the run id from `list`), or `latest` (the default).
        #[arg(long, value_name = "ID|latest", default_value = "latest")]
        backup: String,
        /// The private key (default: [encryption] identity, else backupy.key beside the config).
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Accept a backup whose manifest says `"encryption": "none"` although this config
        /// encrypts its job.
        #[arg(long)]
        allow_plaintext: bool,
        /// Print the drill report as JSON (the same document as <object>.drill.json).
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent's /healthz (on BACKUPY_METRICS_LISTEN_ADDR); exit 0 when
    /// healthy, 1 otherwise. For Docker's HEALTHCHECK.
    #[command(after_help = help!(
        "Example:\n  BACKUPY_METRICS_LISTEN_ADDR=127.0.0.1:9090 backupy-agent health-check",
        "healthy: /healthz answered 200",
        "unhealthy: /healthz answered otherwise, did not answer within 5 s, or BACKUPY_METRICS_LISTEN_ADDR is empty"
    ))]
    HealthCheck,
    /// Print the database containers Docker discovery finds (BACKUPY_DOCKER_SOCKET).
    #[command(after_help = help!(
        "Examples:\n  backupy-agent discover\n  backupy-agent discover --toml >> backupy.toml",
        "printed (no container found included)",
        "the Docker socket did not answer, or the scan failed"
    ))]
    Discover {
        /// Print the report as JSON.
        #[arg(long, conflicts_with = "toml")]
        json: bool,
        /// Print standalone [[targets]] and [[jobs]] for what was found (passwords as env: references).
        #[arg(long)]
        toml: bool,
    },
    /// Download a signed release, check its SHA-256 and signature against the
    /// compiled-in update key, and install it (the previous binary is kept). A running
    /// `run` on the same state directory re-executes into it and must prove itself
    /// within 60 s (standalone: its scheduler starts; connected: RegisterAck arrives),
    /// else the previous binary comes back.
    #[command(after_help = help!(
        "Example:\n  backupy-agent self-update --url https://example.com/backupy-agent-0.2.0 \\\n    --sha256 9f86d0…0f00a08 --signature backupy-agent-0.2.0.sig --config /etc/backupy/backupy.toml",
        "installed (and the running agent asked to re-execute into it)",
        "refused or failed: download, SHA-256, signature or version check; nothing was installed"
    ))]
    SelfUpdate {
        /// Where to download the new binary (https://; http:// only with BACKUPY_DEV_ALLOW_INSECURE=true).
        #[arg(long)]
        url: String,
        /// Hex SHA-256 of the binary.
        #[arg(long, value_name = "HEX")]
        sha256: String,
        /// The DER signature file (`cosign sign-blob`, `openssl dgst -sha256 -sign`).
        #[arg(long, value_name = "FILE")]
        signature: PathBuf,
        /// Install even a downgrade or the running version.
        #[arg(long)]
        force: bool,
        /// The standalone TOML configuration whose state_dir to use (default
        /// BACKUPY_STATE_DIR, else /var/lib/backupy).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Internal: watches a freshly updated agent and rolls back if it never confirms.
    #[command(hide = true)]
    SelfUpdateGuard {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        pid: i32,
    },
    /// Print the version.
    #[command(after_help = "Example:\n  backupy-agent version --json\n\nExit codes:\n  0  printed\n  \
        2  usage error: an unknown, missing or conflicting flag or argument")]
    Version {
        /// Print the version, build and engine capabilities as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which stored backup `verify` and `restore` work on, and the key that opens it.
#[derive(clap::Args, Debug)]
pub struct StoredBackup {
    /// The standalone TOML configuration (storage, and the key to use).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// A backup ID (the run id from `list`), or `latest`.
    #[arg(long, value_name = "ID|latest")]
    backup: String,
    /// With `latest`: the newest backup of this job.
    #[arg(long, value_name = "ID")]
    job: Option<String>,
    /// The private key (default: [encryption] identity, else backupy.key beside the config).
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Accept a backup whose manifest says `"encryption": "none"` although this config
    /// encrypts its job: anyone who can write to the storage can plant such a backup.
    #[arg(long)]
    allow_plaintext: bool,
}

pub fn main() -> ExitCode {
    let cli: Cli = super::parse_args("backupy-agent");
    super::init_logging("info");
    match dispatch(cli.command.unwrap_or(Command::Run { config: None })) {
        Ok(code) => code,
        Err(e) => super::report("backupy-agent", &e),
    }
}

fn dispatch(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::HealthCheck => {
            let addr = crate::env::Env::get()
                .metrics_listen_addr
                .clone()
                .context("BACKUPY_METRICS_LISTEN_ADDR is empty: the agent serves no health endpoint")?;
            crate::metrics::health_check(&addr).map_err(|e| anyhow::anyhow!(e))?;
            println!("healthy");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config: Some(config) } => crate::standalone::run(&config).map(|_| ExitCode::SUCCESS),
        Command::Run { config: None } => {
            if crate::env::Env::get().server_url.is_none() {
                bail!(
                    "nothing to run: give --config FILE for standalone mode, or set BACKUPY_SERVER_URL (and BACKUPY_AGENT_KEY or BACKUPY_AGENT_KEY_FILE) for connected mode"
                );
            }
            crate::connected::run().map(|_| ExitCode::SUCCESS)
        }
        Command::DumpState { allow_secrets, state_dir } => {
            let dir = state_dir.unwrap_or_else(|| crate::env::Env::get().state_dir());
            let key = crate::connected::agent_key_from_env()?;
            let state = crate::connected::dump_state::dump(&dir, key.as_ref(), allow_secrets)?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Discover { json, toml } => super::discover::run(json, toml).map(|_| ExitCode::SUCCESS),
        Command::SelfUpdate { url, sha256, signature, force, config } => {
            self_update(url, sha256, &signature, force, config.as_deref())
        }
        Command::SelfUpdateGuard { state_dir, pid } => {
            crate::selfupdate::guard(&state_dir, pid)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Backup { config, job } => backup(&config, job.as_deref()),
        Command::Keygen { out } => keygen(&out).map(|_| ExitCode::SUCCESS),
        Command::List { config, job, json } => list(&config, job.as_deref(), json),
        Command::Restore { stored: s, to, force, no_preverify } => restore(&s, &to, force, !no_preverify),
        Command::Verify { stored: s } => verify(&s),
        Command::Prune { config, job, dry_run, orphans, json } => {
            prune(&config, job.as_deref(), crate::retention::Options { dry_run, orphans }, json)
        }
        Command::Drill { config, job, backup, identity, allow_plaintext, json } => {
            let s = StoredBackup { config, backup, job: Some(job), identity, allow_plaintext };
            drill(&s, json)
        }
        Command::Version { json } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "version": AGENT_VERSION,
                        "git_commit": env!("BACKUPY_BUILD_COMMIT"),
                        "build_date": env!("BACKUPY_BUILD_DATE"),
                        "target": env!("BACKUPY_BUILD_TARGET"),
                        "update_key_id": crate::selfupdate::compiled_key_id(),
                        "self_update": crate::selfupdate::status(),
                        "engines": crate::drivers::capabilities()
                            .into_iter()
                            .map(|(e, detail)| (e.name().to_string(), serde_json::json!(detail)))
                            .collect::<serde_json::Map<_, _>>(),
                    })
                );
            } else {
                println!("backupy-agent {AGENT_VERSION}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn self_update(
    url: String,
    sha256: String,
    signature: &Path,
    force: bool,
    config: Option<&Path>,
) -> Result<ExitCode> {
    let state_dir = match config {
        Some(c) => Config::load(c)?.state_dir,
        None => crate::env::Env::get().state_dir(),
    };
    let signature = std::fs::read(signature)
        .with_context(|| format!("cannot read the signature file {}", signature.display()))?;
    let signature = crate::selfupdate::signature_from_file(&signature);
    // The operator's own --force may also downgrade.
    let req = crate::selfupdate::UpdateRequest {
        url,
        sha256,
        signature,
        version: None,
        force,
        allow_downgrade: force,
    };
    let settings = crate::selfupdate::Settings::from_env(&state_dir)?;
    let applied = crate::selfupdate::apply(&req, &settings)?;
    println!("installed {} over {} at {}", applied.version, applied.previous_version, applied.exe.display());
    match crate::selfupdate::running_agent(&state_dir) {
        Some(pid) => {
            // SAFETY: kill(2) on the pid of the agent that owns this state directory.
            unsafe { libc::kill(pid, libc::SIGHUP) };
            println!("asked the running agent (pid {pid}) to re-execute into it");
        }
        None => println!("no agent is running on {}: the next start runs it", state_dir.display()),
    }
    Ok(ExitCode::SUCCESS)
}

fn backup(config: &Path, only: Option<&str>) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    crate::leftovers::clean_for(&cfg, false);
    let jobs: Vec<_> = match only {
        Some(id) => vec![cfg.job(id).with_context(|| {
            let known: Vec<&str> = cfg.jobs.iter().map(|j| j.id.as_str()).collect();
            format!("{}: no job {id:?} (jobs: {})", config.display(), known.join(", "))
        })?],
        None => cfg.jobs.iter().collect(),
    };
    if jobs.is_empty() {
        bail!("{}: no [[jobs]] defined", config.display());
    }
    // The run is recorded like a scheduled one, beside a `run` that may own the directory.
    let state = match StateDb::open_shared(&cfg.state_dir) {
        Ok(db) => Some(db),
        Err(e) => {
            log::warn!("{e}; this run is not recorded in the state database");
            None
        }
    };
    let metrics = crate::metrics::Metrics::new().context("cannot create the metrics registry")?;
    let cancel = Cancel::default();
    let interrupt = Interrupt::install(cancel.clone(), "the backup", None)?;
    let mut failed = 0;
    for job in jobs {
        let progress = Arc::new(Progress::default());
        let bar = super::progress_bar(None, false);
        if let Some(b) = &bar {
            b.set_message(format!("job {}", job.id));
        }
        let run_id = uuid::Uuid::new_v4().to_string();
        if let Some(db) = &state {
            runner::record_start(db, &job.id, &run_id, 1);
        }
        let outcome = std::thread::scope(|s| {
            let h = s.spawn(|| match crate::standalone::plan(&cfg, job, &run_id) {
                Ok(plan) => runner::execute(plan, &cancel, progress.clone(), &()),
                Err(e) => runner::RunOutcome::refused(&job.id, &run_id, e),
            });
            while !h.is_finished() {
                if let Some(b) = &bar {
                    b.set_position(progress.dump_bytes.load(Ordering::Relaxed));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            h.join().unwrap_or_else(|_| {
                let e = runner::RunError::new(&job.id, runner::ErrorKind::Pipeline, "the run panicked");
                runner::RunOutcome::refused(&job.id, &run_id, e)
            })
        });
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        if let Some(db) = &state {
            let error = outcome.result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            runner::record_finish(db, &metrics, &outcome, &error);
        }
        match outcome.result {
            Ok(r) => println!(
                "{}\tok\t{}\t{} bytes\t{:.1}s\tsha256:{}",
                job.id,
                r.location,
                r.stored_bytes,
                r.elapsed.as_secs_f64(),
                r.sha256
            ),
            Err(e) => match interrupt.signal() {
                Some(signal) if e.is_cancelled() => {
                    // The stages stopped the dump child or exec and removed the unfinished
                    // object (or aborted the upload) before the run returned.
                    log::warn!(
                        "{}: job {}: run {run_id} cancelled and recorded; the dump was stopped and its \
                         unfinished object removed",
                        interrupt::signal_name(signal),
                        job.id
                    );
                    return Ok(ExitCode::from(interrupt::exit_status(signal)));
                }
                _ => {
                    failed += 1;
                    super::error_line("backupy-agent", &e.to_string());
                }
            },
        }
        if let Some(signal) = interrupt.signal() {
            // The signal came after the run had finished: start no further job.
            log::warn!("{}: no further job started", interrupt::signal_name(signal));
            return Ok(ExitCode::from(interrupt::exit_status(signal)));
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn keygen(out: &Path) -> Result<()> {
    let identity = Identity::generate()?;
    let recipient = identity.recipient()?;
    let text = identity.to_file_text()?;
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!("{} already exists; refusing to overwrite a private key", out.display())
        } else {
            anyhow::anyhow!("cannot create {}: {e}", out.display())
        }
    })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("{recipient}");
    log::info!("private key written to {}; keep it safe, it is the only way to restore", out.display());
    Ok(())
}

fn list(config: &Path, job: Option<&str>, json: bool) -> Result<ExitCode> {
    let _interrupt = Interrupt::exit_at_once("listing", None)?;
    let cfg = Config::load(config)?;
    let storage = cfg.open_storage().map_err(|e| anyhow::anyhow!(e))?;
    let mut manifests = storage.manifests("").context("cannot list the storage")?;
    if let Some(j) = job {
        manifests.retain(|m| m.job == j);
    }
    // With Object Lock, each backup's retention date (HeadObject), shown beside it.
    let locks: Vec<Option<String>> = if storage.object_lock() {
        manifests
            .iter()
            .map(|m| storage.locked_until(&m.object_key).map(|t| t.map(crate::storage::rfc3339)))
            .collect::<std::io::Result<_>>()
            .context("cannot read the Object Lock dates")?
    } else {
        vec![None; manifests.len()]
    };
    if json {
        let mut out = serde_json::to_value(&manifests)?;
        if storage.object_lock()
            && let Some(items) = out.as_array_mut()
        {
            for (item, lock) in items.iter_mut().zip(&locks) {
                item["locked_until"] = serde_json::json!(lock);
            }
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    // Objects without a manifest are incomplete backups (a crash between the two writes).
    let with_manifest: std::collections::HashSet<&str> =
        manifests.iter().map(|m| m.object_key.as_str()).collect();
    let incomplete: Vec<(String, u64)> = storage
        .list("")?
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".json") && !with_manifest.contains(k.as_str()))
        .filter(|(k, _)| job.is_none_or(|j| k.split('/').nth(1) == Some(j)))
        .collect();
    println!(
        "{:<36}  {:<16}  {:<12}  {:<20}  {:>12}  {:<10}",
        "ID", "JOB", "TARGET", "STARTED (UTC)", "SIZE", "ENCRYPTION"
    );
    for (m, lock) in manifests.iter().zip(&locks) {
        let lock = lock.as_ref().map(|t| format!("  locked until {t}")).unwrap_or_default();
        println!(
            "{:<36}  {:<16}  {:<12}  {:<20}  {:>12}  {:<10}{lock}",
            m.id, m.job, m.target, m.started_at, m.size_bytes, m.encryption
        );
    }
    for (key, size) in &incomplete {
        println!("{:<36}  {key} ({size} bytes): incomplete, no manifest", "-");
    }
    Ok(ExitCode::SUCCESS)
}

/// `prune`: [`crate::retention::prune_job`] for each job (the code of the retention
/// after each scheduled run), printed; exit 1 when a delete failed.
fn prune(config: &Path, only: Option<&str>, opts: crate::retention::Options, json: bool) -> Result<ExitCode> {
    let _interrupt = Interrupt::exit_at_once("pruning", None)?;
    let cfg = Config::load(config)?;
    let jobs: Vec<_> = match only {
        Some(id) => vec![cfg.job(id).with_context(|| format!("{}: no job {id:?}", config.display()))?],
        None => cfg.jobs.iter().collect(),
    };
    let storage = cfg.open_storage().map_err(|e| anyhow::anyhow!(e))?;
    let now = chrono::Utc::now();
    let mut reports = Vec::new();
    for job in jobs {
        let r = crate::retention::prune_job(&storage, &job.target, &job.id, job.retention, opts, now)
            .map_err(|e| anyhow::anyhow!("job {}: {e}", job.id))?;
        reports.push(r);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", crate::retention::render_text(&reports));
    }
    if let Some(e) = reports.iter().flat_map(|r| &r.errors).next() {
        bail!("cannot delete {e}; the other backups are left for the next pass");
    }
    Ok(ExitCode::SUCCESS)
}

/// Finds a backup by id, or the newest of `job` (or of all jobs) for `latest`.
fn find_backup(manifests: Vec<Manifest>, id: &str, job: Option<&str>) -> Result<Manifest> {
    if id == "latest" {
        return manifests
            .into_iter()
            .filter(|m| job.is_none_or(|j| m.job == j))
            .max_by(|a, b| a.started_at.cmp(&b.started_at).then(a.finished_at.cmp(&b.finished_at)))
            .with_context(|| match job {
                Some(j) => format!("no backup of job {j:?} in storage"),
                None => "no backup in storage".to_string(),
            });
    }
    manifests
        .into_iter()
        .find(|m| m.id == id)
        .with_context(|| format!("no backup with ID {id:?} (see `list`)"))
}

/// The key for restore/verify: --identity, [encryption] identity, backupy.key beside the
/// config, or the configured raw key file.
fn restore_key(cfg: &Config, identity: Option<&Path>, m: &Manifest) -> Result<Option<KeySource>> {
    if m.encryption == "none" {
        return Ok(None);
    }
    if let Some(p) = identity {
        return Ok(Some(KeySource::Identity(Identity::from_file(p)?)));
    }
    if let (true, Some(k)) = (m.key_id.is_empty(), &cfg.encryption.key_file) {
        return Ok(Some(KeySource::Raw(crate::crypto::keys::read_raw_key_file(k)?)));
    }
    if let Some(p) = &cfg.encryption.identity {
        return Ok(Some(KeySource::Identity(Identity::from_file(p)?)));
    }
    let beside = cfg.file.parent().unwrap_or(Path::new(".")).join("backupy.key");
    if beside.exists() {
        return Ok(Some(KeySource::Identity(Identity::from_file(&beside)?)));
    }
    bail!(
        "backup {} is encrypted and no private key was found: pass --identity FILE, set [encryption] identity, \
         or put backupy.key beside {}",
        m.id,
        cfg.file.display()
    )
}

/// Refuses a plaintext backup of a job this config encrypts (issue 16.9): a store writer
/// could otherwise plant a plaintext dump for a host that always encrypts. The config
/// requires encryption for the backup's job when it defines that job without
/// `encryption = "none"`, or, for a job it does not define, when it names a key at all.
fn check_plaintext(cfg: &Config, m: &Manifest, allow_plaintext: bool) -> Result<()> {
    if m.encryption != "none" || allow_plaintext {
        return Ok(());
    }
    let required = match cfg.job(&m.job) {
        Some(job) => !job.plaintext,
        None => cfg.encryption.recipient.is_some() || cfg.encryption.key_file.is_some(),
    };
    if required {
        bail!(
            "backup {} ({}) is not encrypted (its manifest says \"encryption\": \"none\"), but {} encrypts job {:?}; \
             refusing it, since anyone who can write to the storage can plant such a backup. \
             Pass --allow-plaintext if you know this backup is genuine",
            m.id,
            m.object_key,
            cfg.file.display(),
            m.job
        );
    }
    Ok(())
}

fn verify(s: &StoredBackup) -> Result<ExitCode> {
    // Verify only reads: a signal has nothing to clean up.
    let _interrupt = Interrupt::exit_at_once("verifying", None)?;
    let cfg = Config::load(&s.config)?;
    let storage = cfg.open_storage().map_err(|e| anyhow::anyhow!(e))?;
    let m =
        find_backup(storage.manifests("").context("cannot list the storage")?, &s.backup, s.job.as_deref())?;
    check_plaintext(&cfg, &m, s.allow_plaintext)?;
    let key = restore_key(&cfg, s.identity.as_deref(), &m)?;
    match crate::verify::verify(&storage, &m, key.as_ref()) {
        Ok(v) => {
            println!(
                "{}\tok\t{}\t{} bytes stored\t{} bytes of {} dump\tsha256:{}",
                m.id, m.object_key, v.size, v.dump_bytes, m.engine, v.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => bail!("backup {} ({}): {e}", m.id, m.object_key),
    }
}

fn restore(s: &StoredBackup, to: &str, force: bool, preverify: bool) -> Result<ExitCode> {
    let cfg = Config::load(&s.config)?;
    crate::leftovers::clean_for(&cfg, false);
    let storage = cfg.open_storage().map_err(|e| anyhow::anyhow!(e))?;
    let m =
        find_backup(storage.manifests("").context("cannot list the storage")?, &s.backup, s.job.as_deref())?;
    check_plaintext(&cfg, &m, s.allow_plaintext)?;
    let key = restore_key(&cfg, s.identity.as_deref(), &m)?;
    let cancel = Cancel::default();
    let interrupt = Interrupt::install(cancel.clone(), "the restore", None)?;
    let opts = crate::restore::RestoreOptions {
        to: to.to_string(),
        force,
        temp_dir: cfg.state_dir.join("tmp"),
        preverify,
        cancel,
    };
    match crate::restore::restore(&storage, &m, key.as_ref(), &opts) {
        Ok(msg) => {
            println!("{msg}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => match interrupt.signal() {
            Some(signal) => {
                // The download stopped, the restore tool was killed with its process
                // group, and the temporary files went with their guards.
                log::warn!(
                    "{}: restore of backup {} stopped ({e}); {}",
                    interrupt::signal_name(signal),
                    m.id,
                    crate::restore::what_a_stop_leaves(&m.engine)
                );
                Ok(ExitCode::from(interrupt::exit_status(signal)))
            }
            None => bail!("restore of backup {} ({}): {e}", m.id, m.object_key),
        },
    }
}

fn drill(s: &StoredBackup, json: bool) -> Result<ExitCode> {
    let cfg = Config::load(&s.config)?;
    crate::leftovers::clean_for(&cfg, false);
    let job = s.job.as_deref().unwrap_or_default();
    if cfg.job(job).is_none() {
        let known: Vec<&str> = cfg.jobs.iter().map(|j| j.id.as_str()).collect();
        bail!("{}: no job {job:?} (jobs: {})", s.config.display(), known.join(", "));
    }
    let storage = cfg.open_storage().map_err(|e| anyhow::anyhow!(e))?;
    let m = find_backup(storage.manifests("").context("cannot list the storage")?, &s.backup, Some(job))?;
    if m.job != job {
        bail!("backup {} belongs to job {:?}, not {job:?}", m.id, m.job);
    }
    check_plaintext(&cfg, &m, s.allow_plaintext)?;
    let key = restore_key(&cfg, s.identity.as_deref(), &m)?;
    let cancel = Cancel::default();
    let interrupt = Interrupt::install(cancel.clone(), "the drill", None)?;
    let target = cfg.job(job).and_then(|j| cfg.targets.get(&j.target)).cloned();
    let opts = crate::drill::DrillOptions { temp_dir: cfg.state_dir.join("tmp"), cancel, target };
    match crate::drill::drill(&storage, &m, key.as_ref(), &opts) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let tables = report.tables.len();
                let rows: u64 = report.tables.iter().filter_map(|t| t.found).sum();
                println!(
                    "{}\t{}\t{}\t{tables} table(s), {rows} {}\trestore {:.2}s\tsha256:{}",
                    m.id,
                    report.status,
                    m.object_key,
                    report.unit,
                    report.restore_seconds,
                    report.object_sha256
                );
            }
            if report.passed() {
                Ok(ExitCode::SUCCESS)
            } else {
                bail!("drill of backup {} ({}) failed: {}", m.id, m.object_key, report.error)
            }
        }
        Err(crate::drill::DrillError::Cancelled(e)) => {
            let signal = interrupt.signal().map(interrupt::signal_name).unwrap_or("cancelled");
            log::warn!("{signal}: {e}");
            Ok(ExitCode::from(interrupt.signal().map_or(1, interrupt::exit_status)))
        }
        Err(crate::drill::DrillError::Refused(e)) => {
            bail!("drill of backup {} ({}): {e}", m.id, m.object_key)
        }
    }
}

fn check_config(config: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let storage = match &cfg.storage {
        crate::config::StorageConfig::Dir(d) => d.display().to_string(),
        crate::config::StorageConfig::S3(t) => format!("s3://{}/{} at {}", t.bucket, t.prefix, t.endpoint),
    };
    println!("{}: valid", config.display());
    println!("storage: {storage}");
    println!("state_dir: {}", cfg.state_dir.display());
    let schedules = crate::standalone::schedules(&cfg)?;
    let plan = crate::scheduler::plan(&schedules, chrono::Utc::now(), 3);
    for job in &cfg.jobs {
        let target = &cfg.targets[&job.target];
        println!("job {}: target {} ({})", job.id, target.id, target.engine);
        match plan.iter().find(|p| p.job_id == job.id) {
            Some(p) => {
                let times: Vec<String> = p.next.iter().map(|t| crate::storage::rfc3339(*t)).collect();
                println!("  cron {}: next {}", job.cron.as_deref().unwrap_or(""), times.join(", "));
            }
            None => println!("  no cron: runs only with `backup --job {}`", job.id),
        }
    }
    Ok(ExitCode::SUCCESS)
}
