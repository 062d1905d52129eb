//! `backupy-agent`: `backup`, `keygen`, `version`.

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

use crate::config::Config;
use crate::crypto::Identity;
use crate::pipeline::{Cancel, Progress};
use crate::runner::{self, AGENT_VERSION};

#[derive(Parser)]
#[command(name = "backupy-agent", version = AGENT_VERSION, about = "Database backup agent: dump, compress, encrypt and store in constant memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job now (or every job in turn) from a standalone config.
    #[command(after_help = "Example:\n  backupy-agent backup --config backupy.toml --job app-nightly")]
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
    #[command(after_help = "Example:\n  backupy-agent keygen --out /secure/backupy.key > backupy.pub")]
    Keygen {
        /// Where to write the private key (refuses to overwrite).
        #[arg(long, value_name = "PATH", default_value = "./backupy.key")]
        out: PathBuf,
    },
    /// Print the version.
    #[command(after_help = "Example:\n  backupy-agent version --json")]
    Version {
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    super::init_logging("info");
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => super::report("backupy-agent", &e),
    }
}

fn dispatch(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Backup { config, job } => backup(&config, job.as_deref()),
        Command::Keygen { out } => keygen(&out).map(|_| ExitCode::SUCCESS),
        Command::Version { json } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "version": AGENT_VERSION,
                        "target": format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
                    })
                );
            } else {
                println!("backupy-agent {AGENT_VERSION}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn backup(config: &Path, only: Option<&str>) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
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
    let mut failed = 0;
    for job in jobs {
        let progress = Arc::new(Progress::default());
        let bar = super::progress_bar(None, false);
        if let Some(b) = &bar {
            b.set_message(format!("job {}", job.id));
        }
        let cancel = Cancel::default();
        let result = std::thread::scope(|s| {
            let h = s.spawn(|| runner::run_job(&cfg, job, &cancel, progress.clone()));
            while !h.is_finished() {
                if let Some(b) = &bar {
                    b.set_position(progress.dump_bytes.load(Ordering::Relaxed));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            h.join().unwrap_or_else(|_| {
                Err(runner::RunError { job: job.id.clone(), message: "the run panicked".into() })
            })
        });
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        match result {
            Ok(r) => println!(
                "{}\tok\t{}\t{} bytes\t{:.1}s\tsha256:{}",
                job.id,
                r.storage_path.display(),
                r.manifest.size_bytes,
                r.elapsed.as_secs_f64(),
                r.manifest.sha256
            ),
            Err(e) => {
                failed += 1;
                eprintln!("backupy-agent: error: {e}");
            }
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
