//! One RunBackup of connected mode, from the control plane's job spec and target to the
//! `BackupCompleted` it reports: pushed hooks (only with `BACKUPY_ALLOW_HOOKS=true`), the
//! key decision of wire-v1.md (raw 32-byte data key, or the recipient extension), the
//! dump, and the pipeline into the multipart extension or the presigned PUT.
//!
//! Runs on a `run-…` worker thread started by the connected main loop; it reports its
//! step and size estimate as [`RunEvent`]s on the main loop's channel and returns its
//! outcome the same way. The pipeline it starts owns its own stage threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::crypto::{DataKey, Encryption, Recipient};
use crate::drivers::{self, Engine, Strategy, TargetSpec};
use crate::pipeline::{self, Cancel, Compression, Progress};
use crate::storage::ObjectWriter;
use crate::storage::s3::{PresignedPut, S3Storage, S3Target};
use crate::wire::pb;
use crate::{hooks, secrets};

/// What a run tells the main loop while it works.
#[derive(Debug)]
pub enum RunEvent {
    Step {
        run_id: String,
        step: &'static str,
    },
    /// The dump's expected size, for `progress_percent`.
    Estimate {
        run_id: String,
        bytes: u64,
    },
    Finished {
        run_id: String,
        result: Result<pb::BackupCompleted, String>,
    },
}

/// Host settings a run needs.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub state_dir: PathBuf,
    pub allow_hooks: bool,
    pub allow_insecure: bool,
    pub hook_timeout: Duration,
    /// BACKUPY_CA_FILE: trusted for pushed S3 targets too.
    pub ca_file: Option<PathBuf>,
}

/// Everything one run works from, resolved by the main loop when RunBackup arrived.
pub struct RunInput {
    pub job: pb::BackupJobSpec,
    pub target: pb::Target,
    pub command: pb::RunBackup,
}

/// The engine of a wire `DbType`.
pub fn engine_of(db_type: i32) -> Result<Engine, String> {
    Ok(match pb::DbType::try_from(db_type) {
        Ok(pb::DbType::Postgresql) => Engine::PostgreSql,
        Ok(pb::DbType::Mysql) => Engine::MySql,
        Ok(pb::DbType::Mariadb) => Engine::MariaDb,
        Ok(pb::DbType::Mongodb) => Engine::MongoDb,
        Ok(pb::DbType::Redis) => Engine::Redis,
        Ok(pb::DbType::Sqlite) => Engine::Sqlite,
        Ok(pb::DbType::DbUnspecified) => return Err("the target has no database type".into()),
        Err(_) => return Err(format!("unknown database type {db_type} (a newer control plane?)")),
    })
}

/// A control plane `Target` as the drivers take it. The password reference is resolved
/// here (agent.md "Secrets"), so it is only ever in memory for the run.
pub fn target_spec(target: &pb::Target) -> Result<TargetSpec, String> {
    let engine = engine_of(target.r#type).map_err(|e| format!("target {}: {e}", target.id))?;
    let c = target.connection.clone().unwrap_or_default();
    let mut spec = TargetSpec::new(&target.id, engine);
    spec.strategy = match pb::ConnectionStrategy::try_from(c.strategy) {
        Ok(pb::ConnectionStrategy::Tcp) => Strategy::Tcp,
        Ok(pb::ConnectionStrategy::UnixSocket) => Strategy::UnixSocket,
        Ok(pb::ConnectionStrategy::DockerExec) => {
            if c.container_id.is_empty() {
                return Err(format!("target {}: DOCKER_EXEC needs a container_id", target.id));
            }
            Strategy::DockerExec { container: c.container_id.clone() }
        }
        Err(_) => return Err(format!("target {}: unknown connection strategy {}", target.id, c.strategy)),
    };
    spec.host = c.host;
    spec.port = u16::try_from(c.port)
        .map_err(|_| format!("target {}: port {} is out of range", target.id, c.port))?;
    spec.database = c.database;
    spec.username = c.username;
    if !c.password_secret_ref.is_empty() {
        let password = secrets::resolve(&c.password_secret_ref)
            .map_err(|e| format!("target {}: password: {e}", target.id))?;
        spec.password = Some(password);
    }
    Ok(spec)
}

/// The key decision of wire-v1.md and agent.md "Encryption fails closed".
pub fn encryption_for(job: &pb::BackupJobSpec, cmd: &pb::RunBackup) -> Result<Encryption, String> {
    let chunk_size = crate::crypto::v2::DEFAULT_CHUNK;
    if !cmd.recipient_public_key.is_empty() {
        let bytes: [u8; 32] = cmd.recipient_public_key.as_slice().try_into().map_err(|_| {
            format!(
                "recipient_public_key has {} bytes; an X25519 public key has 32",
                cmd.recipient_public_key.len()
            )
        })?;
        return Ok(Encryption::V2Recipient { recipient: Recipient::from_bytes(bytes), chunk_size });
    }
    match cmd.encrypted_dek.len() {
        0 if job.encryption_enabled => {
            Err("no data key: the job requires encryption but RunBackup carried no encrypted_dek".into())
        }
        0 => Ok(Encryption::None),
        32 => Ok(Encryption::V2Raw {
            key: DataKey::from_slice(&cmd.encrypted_dek).map_err(|e| e.to_string())?,
            chunk_size,
        }),
        n => Err(format!("encrypted_dek has {n} bytes; a raw data key has 32")),
    }
}

/// The presigned PUT sends its spooled object only at commit: that is the "uploading"
/// step of wire-v1.md.
struct StepOnCommit {
    inner: Box<dyn ObjectWriter>,
    run_id: String,
    events: Sender<RunEvent>,
}

impl std::io::Write for StepOnCommit {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for StepOnCommit {
    fn commit(self: Box<Self>) -> std::io::Result<crate::storage::StoredObject> {
        let _ = self.events.send(RunEvent::Step { run_id: self.run_id.clone(), step: "uploading" });
        self.inner.commit()
    }
}

/// Runs one backup to completion on this thread and reports through `events`.
pub fn run(
    settings: &RunSettings,
    input: RunInput,
    cancel: Cancel,
    progress: Arc<Progress>,
    events: Sender<RunEvent>,
) {
    let run_id = input.command.run_id.clone();
    crate::logfwd::set_job(Some(&input.job.id));
    let result =
        run_with_hooks(settings, &input, &cancel, progress, &events).map_err(|e| secrets::redact(&e));
    crate::logfwd::set_job(None);
    let _ = events.send(RunEvent::Finished { run_id, result });
}

fn run_with_hooks(
    settings: &RunSettings,
    input: &RunInput,
    cancel: &Cancel,
    progress: Arc<Progress>,
    events: &Sender<RunEvent>,
) -> Result<pb::BackupCompleted, String> {
    let (job, cmd) = (&input.job, &input.command);
    let step = |step| {
        let _ = events.send(RunEvent::Step { run_id: cmd.run_id.clone(), step });
    };
    if (!job.pre_hooks.is_empty() || !job.post_hooks.is_empty()) && !settings.allow_hooks {
        return Err(format!(
            "job {} has {} pre-hook(s) and {} post-hook(s) pushed by the control plane; this host runs pushed hooks only with BACKUPY_ALLOW_HOOKS=true",
            job.id,
            job.pre_hooks.len(),
            job.post_hooks.len()
        ));
    }
    let ctx = |run_status| hooks::HookContext {
        job_id: &job.id,
        run_id: &cmd.run_id,
        target_id: &job.target_id,
        run_status,
    };
    let mut result = Ok(());
    if !job.pre_hooks.is_empty() {
        step("pre_hooks");
        for hook in &job.pre_hooks {
            if let Err(e) = hooks::run(hook, &ctx(None), settings.hook_timeout, cancel) {
                log::error!("job {}: {e}", job.id);
                result = Err(format!("{e}; the backup did not start"));
                break;
            }
        }
    }
    let result = result.and_then(|()| backup(settings, input, cancel, progress, &step, events));
    if !job.post_hooks.is_empty() {
        step("post_hooks");
        let status = match &result {
            Ok(_) => "success",
            Err(_) if cancel.is_cancelled() => "cancelled",
            Err(_) => "failed",
        };
        for hook in &job.post_hooks {
            if let Err(e) = hooks::run(hook, &ctx(Some(status)), settings.hook_timeout, &Cancel::default()) {
                log::warn!("job {}: {e}", job.id);
            }
        }
    }
    result
}

fn backup(
    settings: &RunSettings,
    input: &RunInput,
    cancel: &Cancel,
    progress: Arc<Progress>,
    step: &dyn Fn(&'static str),
    events: &Sender<RunEvent>,
) -> Result<pb::BackupCompleted, String> {
    let (job, cmd) = (&input.job, &input.command);
    let t0 = Instant::now();
    let spec = target_spec(&input.target)?;
    let compression = Compression::parse(&job.compression).map_err(|e| format!("job {}: {e}", job.id))?;
    let encryption = encryption_for(job, cmd)?;
    let prepared = encryption
        .prepare(compression.header_code())
        .map_err(|e| format!("cannot prepare encryption: {e}"))?;
    let creds = cmd.upload_creds.clone().unwrap_or_default();
    let (writer, s3_key): (Box<dyn ObjectWriter>, String) = match &creds.multipart {
        Some(mp) => {
            let mut target = S3Target::from_wire(mp, settings.allow_insecure).map_err(|e| e.to_string())?;
            target.ca_file = settings.ca_file.clone();
            let storage = S3Storage::new(target, Some(&settings.state_dir)).map_err(|e| e.to_string())?;
            (Box::new(storage.create_cancellable(&mp.key, cancel.clone())), mp.key.clone())
        }
        None if !creds.presigned_put_url.is_empty() => {
            let mut put = PresignedPut::new(
                &creds.presigned_put_url,
                &creds.final_s3_key,
                creds.expires_at_ms,
                &settings.state_dir.join("spool"),
            )
            .map_err(|e| e.to_string())?;
            if let Some(ca) = &settings.ca_file {
                put = put.with_ca_file(ca).map_err(|e| e.to_string())?;
            }
            let writer =
                StepOnCommit { inner: Box::new(put), run_id: cmd.run_id.clone(), events: events.clone() };
            (Box::new(writer), creds.final_s3_key.clone())
        }
        None => {
            return Err("RunBackup carried no upload target (neither multipart nor presigned_put_url)".into());
        }
    };
    step("dumping");
    let ctx = drivers::DumpContext {
        temp_dir: settings.state_dir.join("tmp"),
        pipeline_compresses: compression != Compression::None,
    };
    let drivers::Dump { source, engine_version } = drivers::dump(&spec, &ctx).map_err(|e| e.to_string())?;
    if let Some(bytes) = source.size_hint {
        let _ = events.send(RunEvent::Estimate { run_id: cmd.run_id.clone(), bytes });
    }
    log::info!(
        "job {}: run {} backing up target {} ({engine_version}) to {s3_key}",
        job.id,
        cmd.run_id,
        spec.id
    );
    let key_id = prepared.key_id.clone();
    let encrypted_dek = prepared.encrypted_dek.clone();
    let opts = pipeline::Options::new(compression, prepared);
    let out = pipeline::run(source, opts, writer, cancel, progress).map_err(|e| e.to_string())?;
    log::info!(
        "job {}: run {} stored {s3_key} ({} bytes, dump {} bytes)",
        job.id,
        cmd.run_id,
        out.stored_bytes,
        out.dump_bytes
    );
    Ok(pb::BackupCompleted {
        job_id: job.id.clone(),
        run_id: cmd.run_id.clone(),
        s3_key,
        size_bytes: out.stored_bytes,
        sha256: out.sha256,
        duration_ms: t0.elapsed().as_millis() as u64,
        dek_kms_id: key_id,
        encrypted_dek,
        compression: compression.name().to_string(),
        db_engine_version: engine_version,
    })
}
