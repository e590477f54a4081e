//! Memory working set, limit and OOM kills per cgroup, read from cgroupfs.
//!
//! Working set is what the kubelet and cAdvisor call it: usage minus
//! inactive file cache, i.e. memory the kernel cannot easily reclaim.
//! * cgroup v2: `memory.current` − `inactive_file` (memory.stat);
//! * cgroup v1: `memory.usage_in_bytes` − `total_inactive_file`.
//!
//! The limit is v2 `memory.max` (`max`: none) or v1
//! `memory.limit_in_bytes` (no limit reads as `PAGE_COUNTER_MAX` pages,
//! about 2^63 bytes); like the CPU limit it bounds the cgroup's subtree.
//!
//! OOM kills are the `oom_kill` count of v2 `memory.events.local` or v1
//! `memory.oom_control`. Both count a kill in the victim's own cgroup only
//! (v1: checked on 6.18 with the limit on the parent and the victim in a
//! child: the child counts it, the parent not), so, like podmeter's other
//! counters, they are exclusive. v2 `memory.events` is hierarchical (every
//! ancestor counts a kill below it, and keeps it after the child is
//! removed): it is read for pod-level cgroups only, as the pod's kills
//! including those of containers since gone. An OOM-killed main process
//! ends its container, and the runtime removes the cgroup within a second,
//! before a refresh could read its own count. Not on v1, whose counts are
//! the cgroup's own, nor under `memory_localevents`, which makes v2's so.
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

/// The files a cgroup's working set, limit and OOM kills are read from.
#[derive(Debug)]
pub struct Files {
    usage: StatFile,
    stat: StatFile,
    /// The key of inactive file cache in `stat`.
    inactive_key: &'static str,
    /// `memory.max` or `memory.limit_in_bytes`.
    limit: StatFile,
    /// `memory.events.local` (5.2 and later; podmeter needs 5.8) or
    /// `memory.oom_control`.
    events: StatFile,
    /// v2 `memory.events`, hierarchical, where it is read (see the module
    /// docs).
    subtree_events: Option<StatFile>,
    v1: bool,
}

impl Files {
    /// The memory files of the cgroup at `rel` (relative to the mounts), or
    /// `None` for the root, which has none (the node is node-exporter's).
    /// `subtree`: also the OOM kills of its whole subtree, where the kernel
    /// keeps them (a pod-level cgroup). Nothing is opened yet.
    pub fn new(mounts: &Mounts, rel: &str, subtree: bool) -> Option<Self> {
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            return None;
        }
        // A controller is bound to one hierarchy: with a v1 memory hierarchy
        // mounted, the cgroup2 tree has no memory.current to try first.
        let (root, usage, inactive_key, limit, events) = match &mounts.memory_v1 {
            Some(v1) => (
                v1,
                "memory.usage_in_bytes",
                "total_inactive_file",
                "memory.limit_in_bytes",
                "memory.oom_control",
            ),
            None => (
                &mounts.unified,
                "memory.current",
                "inactive_file",
                "memory.max",
                "memory.events.local",
            ),
        };
        let file = |name: &str| StatFile::new(root, format!("{rel}/{name}"));
        Some(Self {
            usage: file(usage),
            stat: file("memory.stat"),
            inactive_key,
            limit: file(limit),
            events: file(events),
            subtree_events: (subtree && mounts.memory_v1.is_none() && !mounts.memory_local_events)
                .then(|| file("memory.events")),
            v1: mounts.memory_v1.is_some(),
        })
    }

    /// The working set now, or `None` when the hierarchy does not account
    /// memory for the cgroup (or it is gone).
    pub fn working_set(&self) -> io::Result<Option<u64>> {
        let usage = self.usage.read()?;
        let stat = self.stat.read()?;
        Ok(working_set_of(&usage, &stat, self.inactive_key))
    }

    /// The memory limit in bytes now, or `None` without one.
    pub fn limit(&self) -> io::Result<Option<u64>> {
        let text = self.limit.read()?;
        Ok(if self.v1 {
            parse_limit_in_bytes(&text)
        } else {
            parse_memory_max(&text)
        })
    }

    /// Processes of the cgroup the OOM killer killed so far.
    pub fn oom_kills(&self) -> io::Result<Option<u64>> {
        Ok(stat_value(&self.events.read()?, "oom_kill"))
    }

    /// Processes the OOM killer killed so far in the cgroup and in every
    /// cgroup below it, removed ones included; `None` where not read (see
    /// [`Files::new`]).
    pub fn subtree_oom_kills(&self) -> io::Result<Option<u64>> {
        match &self.subtree_events {
            Some(f) => Ok(stat_value(&f.read()?, "oom_kill")),
            None => Ok(None),
        }
    }

    /// Closes the files (the cgroup is gone).
    pub fn close(&self) {
        self.usage.close();
        self.stat.close();
        self.limit.close();
        self.events.close();
        if let Some(f) = &self.subtree_events {
            f.close();
        }
    }
}

/// v2 `memory.max`: bytes, or `max` for no limit (`None`).
pub fn parse_memory_max(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// v1 limits at or above this are no limit: the kernel shows an unlimited
/// cgroup's `PAGE_COUNTER_MAX` pages in bytes, 2^63 less a page or so
/// (rounded down to the page size, which depends on the architecture), and
/// no machine has 4 EiB of memory.
const V1_UNLIMITED: u64 = 1 << 62;

/// v1 `memory.limit_in_bytes`: bytes, `None` for the unlimited value.
pub fn parse_limit_in_bytes(s: &str) -> Option<u64> {
    s.trim().parse().ok().filter(|&b| b < V1_UNLIMITED)
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
    fn memory_limits() {
        assert_eq!(parse_memory_max("268435456\n"), Some(268_435_456));
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max(""), None);
        // 6.18 x86_64, a cgroup without a limit (4 KiB pages).
        assert_eq!(parse_limit_in_bytes("9223372036854771712\n"), None);
        // arm64 with 64 KiB pages rounds lower, still far above 2^62.
        assert_eq!(parse_limit_in_bytes("9223372036854710272\n"), None);
        assert_eq!(parse_limit_in_bytes("67108864\n"), Some(64 << 20));
        assert_eq!(
            parse_limit_in_bytes(&format!("{}", (1u64 << 62) - 4096)),
            Some((1 << 62) - 4096)
        );
        assert_eq!(parse_limit_in_bytes("-1"), None);
    }

    #[test]
    fn oom_kills_from_both_formats() {
        // The kernel's formats (values made up).
        let events = include_str!("testdata/memory.events.local");
        assert_eq!(stat_value(events, "oom_kill"), Some(3));
        // `oom_kill_disable` is another key.
        let control = include_str!("testdata/memory.oom_control");
        assert_eq!(stat_value(control, "oom_kill"), Some(2));
        // Before 4.13 v1 had no oom_kill line: no count, not zero.
        assert_eq!(
            stat_value("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"),
            None
        );
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
