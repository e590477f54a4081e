//! Memory working set per cgroup, read from cgroupfs.
//!
//! Working set is what the kubelet and cAdvisor call it: usage minus
//! inactive file cache, i.e. memory the kernel cannot easily reclaim.
//! * cgroup v2: `memory.current` − `inactive_file` (memory.stat);
//! * cgroup v1: `memory.usage_in_bytes` − `total_inactive_file`.
//!
//! On hybrid hosts the memory controller lives in v1 at the same relative
//! path as the cgroup2 directory (the kubelet and runc create both).

use std::{
    fs,
    io::{self, Read as _},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use nix::{
    fcntl::{self, OFlag},
    sys::stat::Mode,
};

use super::{Mounts, files::StatFile};

/// The files a cgroup's working set is computed from.
#[derive(Debug)]
pub struct Files {
    usage: StatFile,
    stat: StatFile,
    /// The key of inactive file cache in `stat`.
    inactive_key: &'static str,
}

impl Files {
    /// The memory files of the cgroup at `rel` (relative to the mounts), or
    /// `None` for the root, which has none (the node is node-exporter's).
    /// Nothing is opened yet.
    pub fn new(mounts: &Mounts, rel: &str) -> Option<Self> {
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            return None;
        }
        // A controller is bound to one hierarchy: with a v1 memory hierarchy
        // mounted, the cgroup2 tree has no memory.current to try first.
        let (root, usage, inactive_key) = match &mounts.memory_v1 {
            Some(v1) => (v1, "memory.usage_in_bytes", "total_inactive_file"),
            None => (&mounts.unified, "memory.current", "inactive_file"),
        };
        Some(Self {
            usage: StatFile::new(root, format!("{rel}/{usage}")),
            stat: StatFile::new(root, format!("{rel}/memory.stat")),
            inactive_key,
        })
    }

    /// The working set now, or `None` when the hierarchy does not account
    /// memory for the cgroup (or it is gone).
    pub fn working_set(&self) -> io::Result<Option<u64>> {
        let usage = self.usage.read()?;
        let stat = self.stat.read()?;
        Ok(working_set_of(&usage, &stat, self.inactive_key))
    }

    /// Closes the files (the cgroup is gone).
    pub fn close(&self) {
        self.usage.close();
        self.stat.close();
    }
}

/// Descriptors of the hierarchies' mount points, opened once: per-cgroup
/// files are opened relative to them (`openat`), so the kernel resolves
/// only the part of the path below the mount, not `/sys/fs/cgroup/...`
/// again for each of thousands of files.
static ROOTS: Mutex<Vec<(PathBuf, Arc<OwnedFd>)>> = Mutex::new(Vec::new());

pub(super) fn root_fd(root: &Path) -> io::Result<Arc<OwnedFd>> {
    let mut roots = ROOTS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, fd)) = roots.iter().find(|(p, _)| p == root) {
        return Ok(fd.clone());
    }
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = Arc::new(fcntl::open(root, flags, Mode::empty())?);
    roots.push((root.to_owned(), fd.clone()));
    Ok(fd)
}

/// A small cgroupfs file's contents, `rel` (no leading `/` needed) below
/// the hierarchy mounted at `root`. Unlike `fs::read_to_string`, no
/// `statx` for a size hint first (cgroupfs reports size 0 anyway): these
/// reads run for every cgroup, every scrape or refresh.
pub fn read_small(root: &Path, rel: &str) -> io::Result<String> {
    let rel = rel.trim_start_matches('/');
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let fd = fcntl::openat(&*root_fd(root)?, rel, flags, Mode::empty())?;
    let mut file = fs::File::from(fd);
    let mut buf = Vec::with_capacity(2048);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity());
        }
        let start = buf.len();
        buf.resize(buf.capacity(), 0);
        match file.read(&mut buf[start..]) {
            Ok(0) => {
                buf.truncate(start);
                break;
            }
            Ok(n) => buf.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The working set from the usage file's text (`memory.current`,
/// `memory.usage_in_bytes`) and `memory.stat`'s: usage less the inactive
/// file cache under `inactive_key`; `None` when the usage is not a number.
pub fn working_set_of(usage: &str, stat: &str, inactive_key: &str) -> Option<u64> {
    let usage: u64 = usage.trim().parse().ok()?;
    Some(usage.saturating_sub(stat_value(stat, inactive_key).unwrap_or(0)))
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
    fn reads_small_and_large_files() {
        let dir = std::env::temp_dir();
        let name = format!("podmeter-read-{}", std::process::id());
        let path = dir.join(&name);
        for len in [0, 5, 2047, 2048, 2049, 10_000] {
            let text: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            fs::write(&path, &text).unwrap();
            assert_eq!(read_small(&dir, &name).unwrap(), text);
            assert_eq!(read_small(&dir, &format!("/{name}")).unwrap(), text);
        }
        fs::remove_file(&path).unwrap();
        assert!(read_small(&dir, &name).is_err());
    }

    #[test]
    fn stat_lookup_is_exact() {
        let stat = "inactive_anon 1\ntotal_inactive_file 300\ninactive_file 200\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(200));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(300));
        assert_eq!(stat_value(stat, "active_file"), None);
        assert_eq!(stat_value("garbage", "inactive_file"), None);
    }

    #[test]
    fn working_set_is_usage_less_inactive_file() {
        let stat = "active_file 50\ninactive_file 200\n";
        assert_eq!(working_set_of("1000\n", stat, "inactive_file"), Some(800));
        // More inactive cache than usage (the files are read apart): zero.
        assert_eq!(working_set_of("100", stat, "inactive_file"), Some(0));
        assert_eq!(working_set_of("1000", "", "inactive_file"), Some(1000));
        assert_eq!(working_set_of("max", stat, "inactive_file"), None);
    }
}
