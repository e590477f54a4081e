//! Memory working set per cgroup, read from cgroupfs.
//!
//! Working set is what the kubelet and cAdvisor call it: usage minus
//! inactive file cache, i.e. memory the kernel cannot easily reclaim.
//! * cgroup v2: `memory.current` − `inactive_file` (memory.stat);
//! * cgroup v1: `memory.usage_in_bytes` − `total_inactive_file`.
//!
//! On hybrid hosts the memory controller lives in v1 at the same relative
//! path as the cgroup2 directory (the kubelet and runc create both).

use std::{fs, path::Path};

use super::Mounts;

/// Working set of the cgroup at `rel` (relative to the mounts), or `None`
/// when neither hierarchy has memory accounting for it.
pub fn working_set(mounts: &Mounts, rel: &str) -> Option<u64> {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        return None; // the root has no memory.current; the node is node-exporter's
    }
    let v2 = mounts.unified.join(rel);
    if let Some(ws) = read(&v2, "memory.current", "inactive_file") {
        return Some(ws);
    }
    let v1 = mounts.memory_v1.as_ref()?.join(rel);
    read(&v1, "memory.usage_in_bytes", "total_inactive_file")
}

fn read(dir: &Path, usage_file: &str, inactive_key: &str) -> Option<u64> {
    let usage: u64 = fs::read_to_string(dir.join(usage_file))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = fs::read_to_string(dir.join("memory.stat")).ok()?;
    Some(usage.saturating_sub(stat_value(&stat, inactive_key).unwrap_or(0)))
}

/// The value of `key` in a `key value` listing (memory.stat, cpu.stat).
pub fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lookup_is_exact() {
        let stat = "inactive_anon 1\ntotal_inactive_file 300\ninactive_file 200\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(200));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(300));
        assert_eq!(stat_value(stat, "active_file"), None);
        assert_eq!(stat_value("garbage", "inactive_file"), None);
    }
}
