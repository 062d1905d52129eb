// Compiles `proto/backup/v1/*.proto` with protox (a pure-Rust protobuf compiler), so a
// build needs no system `protoc`; and records what `version --json` reports about the
// build: git commit, build date (SOURCE_DATE_EPOCH when set, for reproducible builds)
// and target triple.
use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("backup/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(&files, [&dir])?;
    prost_build::Config::new().compile_fds(fds)?;
    build_info();
    Ok(())
}

fn build_info() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-env-changed=BACKUPY_GIT_COMMIT");
    let commit = std::env::var("BACKUPY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when HEAD moves (a commit, a checkout), not on every build.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git_ref_path(),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=BACKUPY_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=BACKUPY_BUILD_DATE={}", rfc3339_utc(epoch));
    println!("cargo:rustc-env=BACKUPY_BUILD_TARGET={}", std::env::var("TARGET").unwrap_or_default());
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The file of the branch HEAD points at (in a worktree it lives in the common dir).
fn git_ref_path() -> Option<String> {
    let name = git(&["symbolic-ref", "-q", "HEAD"])?;
    git(&["rev-parse", "--git-path", &name])
}

fn rfc3339_utc(epoch: i64) -> String {
    chrono::DateTime::from_timestamp(epoch, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
