//! `backupy-decrypt`: turns a stored object back into the dump.
//!
//! Streams input → (SHA-256 of the input) → decrypt → decompress by magic → output in
//! O(chunk) memory. A file output is written under a temporary name and renamed only
//! after the object authenticated completely and its SHA-256 matched. SIGINT/SIGTERM
//! (`interrupt`) remove the temporary file and exit 130/143.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{ArgGroup, Parser};

use crate::crypto::{self, Format, Identity, KeySource, token};
use crate::interrupt::{Interrupt, LastResort};
use crate::pipeline::compress::decompress_by_magic;
use crate::verify::{self, HashingReader};

#[derive(Parser)]
#[command(
    name = "backupy-decrypt",
    version,
    about = "Decrypt (and decompress) a backupy backup object",
    long_about = "Decrypt (and decompress) a backupy backup object.\n\n\
        A decryption token's signature cannot be checked offline (the verification key stays on the \
        server): its claims (issuer, audience, expiry, key) are checked, its signature is not.",
    after_help = "Examples:\n  backupy-decrypt --in app.sqlite.zst.bkpy --out app.sqlite --identity backupy.key\n  \
        backupy-decrypt --in - --out dump.pgdump --token-file token.jwt < object.bkpy\n\n\
        Exit codes:\n  \
        0  decrypted (and the SHA-256 matched when one was expected)\n  \
        1  refused or failed: a wrong or expired key or token, a tampered or truncated object, a SHA-256 \
        mismatch (the output is removed), an existing --out without --force\n  \
        2  usage error: an unknown, missing or conflicting flag or argument\n  \
        130  stopped by SIGINT (Ctrl-C): the temporary output is removed, --out is never left half-written\n  \
        143  stopped by SIGTERM: the same",
    group(ArgGroup::new("key").required(true).args(["token", "token_file", "identity", "key_file"]))
)]
struct Cli {
    /// The stored object, or - for stdin.
    #[arg(long = "in", value_name = "FILE|-")]
    input: String,
    /// Where to write the dump, or - for stdout.
    #[arg(long = "out", value_name = "FILE|-")]
    output: String,
    /// A decryption token (JWT) from the control plane.
    #[arg(long, value_name = "JWT")]
    token: Option<String>,
    /// A file holding a decryption token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A private key file (from `backupy-agent keygen`) for objects sealed to its public key.
    #[arg(long, value_name = "KEYFILE")]
    identity: Option<PathBuf>,
    /// A raw 32-byte data-key file (64 hex digits or base64).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Expected SHA-256 of the whole object (takes precedence over the token's claim).
    #[arg(long, value_name = "HEX", conflicts_with = "no_verify_sha256")]
    sha256: Option<String>,
    /// Do not compare the object's SHA-256 with an expected value.
    #[arg(long)]
    no_verify_sha256: bool,
    /// Write the decrypted bytes without decompressing them.
    #[arg(long)]
    skip_decompress: bool,
    /// No progress bar and no warnings.
    #[arg(long)]
    quiet: bool,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
}

pub fn main() -> ExitCode {
    let cli: Cli = super::parse_args("backupy-decrypt");
    super::init_logging("warn");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::report("backupy-decrypt", &e),
    }
}

fn run(cli: Cli) -> Result<()> {
    let (key, token_sha) = key_source(&cli)?;
    let expected = match (&cli.sha256, cli.no_verify_sha256) {
        (_, true) => None,
        (Some(h), false) => {
            let h = h.trim().to_ascii_lowercase();
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("--sha256 must be 64 hex digits");
            }
            Some(h)
        }
        (None, false) => token_sha,
    };

    let output = Output::prepare(&cli.output, cli.force)?;
    // On a signal, the signal thread removes the temporary output and exits: the copy may
    // be blocked on a read of stdin that never returns.
    let remove_temp = output.temp_path().map(|p| -> LastResort {
        Box::new(move || {
            let _ = std::fs::remove_file(p);
        })
    });
    let _interrupt = Interrupt::exit_at_once("decrypting", remove_temp)?;
    let (input, len): (Box<dyn Read>, Option<u64>) = if cli.input == "-" {
        (Box::new(io::stdin().lock()), None)
    } else {
        let f = File::open(&cli.input).with_context(|| format!("cannot open input {}", cli.input))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let bar = super::progress_bar(len, cli.quiet);
    let input: Box<dyn Read> = match &bar {
        Some(b) => Box::new(b.wrap_read(input)),
        None => input,
    };
    let (hashing, digest) = HashingReader::new(io::BufReader::with_capacity(1 << 20, input));

    let (format, plain) = crypto::open(hashing, &key).map_err(describe_io)?;
    let mut reader: Box<dyn Read> =
        if cli.skip_decompress { plain } else { decompress_by_magic(plain).map_err(describe_io)?.1 };
    let mut out = output;
    let copied = io::copy(&mut reader, out.writer()?);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    copied.map_err(describe_io)?;

    let actual = digest.lock().map_err(|_| anyhow!("internal error: digest lock poisoned"))?.hex();
    match &expected {
        Some(exp) if *exp != actual => {
            out.discard();
            bail!(
                "SHA-256 mismatch: the object hashes to {actual}, expected {exp}; it is not the object that was \
                 stored (output removed)"
            );
        }
        Some(_) => {}
        None if format == Format::V1 && !cli.quiet => {
            let warning = "warning: format v1 cannot detect dropped or reordered frames; pass --sha256 to \
                           verify the whole object";
            if crate::env::Env::get().log_json {
                eprintln!("{}", super::stderr_line(log::Level::Warn, "backupy-decrypt", warning, true));
            } else {
                eprintln!("backupy-decrypt: {warning}");
            }
        }
        None => {}
    }
    out.finish()
}

fn key_source(cli: &Cli) -> Result<(KeySource, Option<String>)> {
    let now = chrono::Utc::now().timestamp();
    if let Some(jwt) = &cli.token {
        let t = token::parse(jwt, now)?;
        return Ok((KeySource::Raw(t.key), t.sha256));
    }
    if let Some(path) = &cli.token_file {
        let jwt = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read token file {}", path.display()))?;
        let t = token::parse(&jwt, now)?;
        return Ok((KeySource::Raw(t.key), t.sha256));
    }
    if let Some(path) = &cli.identity {
        return Ok((KeySource::Identity(Identity::from_file(path)?), None));
    }
    if let Some(path) = &cli.key_file {
        return Ok((KeySource::Raw(crypto::keys::read_raw_key_file(path)?), None));
    }
    Err(anyhow!("one of --token, --token-file, --identity or --key-file is required"))
}

/// Turns a stream error into the message of its failure class.
fn describe_io(e: io::Error) -> anyhow::Error {
    anyhow!(verify::describe(e))
}

enum Output {
    Stdout(io::Stdout),
    File { temp: Option<tempfile::NamedTempFile>, path: PathBuf, force: bool },
}

impl Output {
    fn prepare(out: &str, force: bool) -> Result<Self> {
        if out == "-" {
            return Ok(Output::Stdout(io::stdout()));
        }
        let path = PathBuf::from(out);
        if path.exists() && !force {
            bail!("{} already exists; pass --force to overwrite it", path.display());
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => Path::new(".").to_path_buf(),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        Ok(Output::File { temp: Some(temp), path, force })
    }

    /// The temporary file the output is written to until it is complete.
    fn temp_path(&self) -> Option<PathBuf> {
        match self {
            Output::File { temp: Some(t), .. } => Some(t.path().to_path_buf()),
            _ => None,
        }
    }

    fn writer(&mut self) -> Result<&mut dyn Write> {
        Ok(match self {
            Output::Stdout(s) => s,
            Output::File { temp, .. } => temp.as_mut().context("output already finished")?.as_file_mut(),
        })
    }

    fn discard(&mut self) {
        if let Output::File { temp, .. } = self {
            temp.take();
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Output::Stdout(mut s) => s.flush().context("cannot write to stdout"),
            Output::File { temp, path, force } => {
                let temp = temp.context("output already discarded")?;
                temp.as_file().sync_all().context("cannot fsync the output")?;
                // Without --force, a file that appeared meanwhile is still never replaced.
                let persisted = if force { temp.persist(&path) } else { temp.persist_noclobber(&path) };
                persisted
                    .map_err(|e| anyhow!("cannot rename the output to {}: {}", path.display(), e.error))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .context("cannot fsync the output directory")?;
                }
                Ok(())
            }
        }
    }
}
