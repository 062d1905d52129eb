// Compiles `proto/backup/v1/*.proto` with protox (a pure-Rust protobuf compiler), so a
// build needs no system `protoc`.
use std::path::PathBuf;

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
    Ok(())
}
