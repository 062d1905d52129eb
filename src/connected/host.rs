//! Host figures for heartbeats (`AgentMetrics`): CPU from `/proc/stat` between two
//! samples, memory from `/proc/meminfo`, disk of the state volume from statvfs. Called on
//! the session thread once per heartbeat; holds only the previous CPU sample.

use std::path::{Path, PathBuf};

pub struct HostSampler {
    state_dir: PathBuf,
    last_cpu: Option<(u64, u64)>,
}

/// What one heartbeat reports about the host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostFigures {
    pub cpu_percent: f32,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
}

impl HostSampler {
    pub fn new(state_dir: &Path) -> Self {
        Self { state_dir: state_dir.to_path_buf(), last_cpu: cpu_times() }
    }

    pub fn sample(&mut self) -> HostFigures {
        let mut f = HostFigures::default();
        if let Some((busy, total)) = cpu_times() {
            if let Some((b0, t0)) = self.last_cpu
                && total > t0
            {
                f.cpu_percent = (busy.saturating_sub(b0) as f64 * 100.0 / (total - t0) as f64) as f32;
            }
            self.last_cpu = Some((busy, total));
        }
        if let Some((total, available)) = meminfo() {
            f.mem_total_bytes = total;
            f.mem_used_bytes = total.saturating_sub(available);
        }
        if let Some((total, free)) = disk(&self.state_dir) {
            f.disk_total_bytes = total;
            f.disk_used_bytes = total.saturating_sub(free);
        }
        f
    }
}

/// (busy, total) jiffies of all CPUs.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// (MemTotal, MemAvailable) in bytes.
fn meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// (total, available to us) bytes of the filesystem holding `dir`.
fn disk(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a statvfs struct we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_plausible_for_this_host() {
        let mut s = HostSampler::new(Path::new("/"));
        std::thread::sleep(std::time::Duration::from_millis(50));
        let f = s.sample();
        assert!(f.mem_total_bytes > 64 << 20, "{f:?}");
        assert!(f.mem_used_bytes > 0 && f.mem_used_bytes < f.mem_total_bytes, "{f:?}");
        assert!(f.disk_total_bytes > 0 && f.disk_used_bytes <= f.disk_total_bytes, "{f:?}");
        assert!((0.0..=100.0).contains(&f.cpu_percent), "{f:?}");
    }
}
