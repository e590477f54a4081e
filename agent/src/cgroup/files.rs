//! A cgroup's interface files, kept open and re-read in place.
//!
//! podmeter reads the same few files of every counted cgroup (and one of
//! each cgroup v2 pod-level cgroup) over and over:
//! memory, limits, OOM kills and pressure at each refresh, `cpu.stat` at
//! each scrape.
//! Opening one walks its path through cgroupfs (permission check and
//! revalidation per component) and then needs a `close`: together several
//! times the cost of the read itself, and most of a scrape's CPU at a
//! thousand pods. Every cgroupfs file is a seq_file, which regenerates its
//! contents when read from offset 0, so a file opened once is re-read with
//! a single `pread`.
//!
//! A [`StatFile`] opens on its first read and stays open until
//! [`StatFile::close`] (when its cgroup is gone) or a read fails. Kept-open
//! files draw on a descriptor budget ([`set_budget`]: the open-files limit
//! less a reserve for sockets, maps and the like); past it, a file is
//! opened, read and closed each time, so a node with more cgroups than the
//! descriptor limit still gets its numbers, only at the old price, and the
//! agent never runs out of descriptors for its connections.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use nix::{
    errno::Errno,
    fcntl::{self, OFlag},
    sys::stat::Mode,
};

use super::{
    Mounts, cpu,
    memory::{self, read_small, root_fd},
    pressure,
};

/// The files podmeter reads of one cgroup, by what they are for.
#[derive(Debug)]
pub struct CgroupFiles {
    /// Memory usage (for the working set), limit and OOM kills.
    pub memory: Option<memory::Files>,
    /// CPU limit and throttling.
    pub cpu: Option<cpu::Files>,
    /// Pressure stalls, where the kernel tracks them.
    pub pressure: Option<pressure::Files>,
}

impl CgroupFiles {
    /// The files of the cgroup at `rel` (relative to the mounts) in the
    /// hierarchies that hold its controllers; `pod_level`: a pod's own
    /// cgroup, whose subtree's OOM kills are read too. Nothing is opened
    /// yet.
    pub fn new(mounts: &Mounts, rel: &str, pod_level: bool) -> Self {
        Self {
            memory: memory::Files::new(mounts, rel, pod_level),
            cpu: cpu::Files::new(mounts, rel),
            pressure: pressure::Files::new(mounts, rel),
        }
    }

    /// Closes every file (the cgroup is gone).
    pub fn close(&self) {
        if let Some(m) = &self.memory {
            m.close();
        }
        if let Some(c) = &self.cpu {
            c.close();
        }
        if let Some(p) = &self.pressure {
            p.close();
        }
    }
}

/// One cgroupfs file, opened on first use and re-read with `pread`, until
/// it is closed for good.
#[derive(Debug)]
pub struct StatFile {
    root: PathBuf,
    rel: String,
    file: Mutex<Option<File>>,
    /// Set by [`StatFile::close`], under the `file` lock: the cgroup is
    /// gone, and a later cgroup at the same path is another one, which a
    /// read through this file must not open (nor hold open).
    closed: AtomicBool,
}

/// Warned once: a node out of descriptors would otherwise log every read.
static WARNED_NOFILE: AtomicBool = AtomicBool::new(false);

/// Descriptors that kept-open files may hold, and how many they hold.
#[derive(Debug)]
pub struct Budget {
    limit: AtomicUsize,
    open: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` descriptors.
    pub const fn new(limit: usize) -> Self {
        Self {
            limit: AtomicUsize::new(limit),
            open: AtomicUsize::new(0),
        }
    }

    /// Takes one descriptor, if the budget has one left.
    pub fn take(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives one back.
    pub fn give(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Descriptors held now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// The budget of every [`StatFile`]: unlimited until [`set_budget`].
static BUDGET: Budget = Budget::new(usize::MAX);

/// Sets how many descriptors kept-open cgroup files may hold in all. Files
/// open beyond it stay open until their cgroup goes.
pub fn set_budget(limit: usize) {
    BUDGET.limit.store(limit, Ordering::Relaxed);
}

/// Kept-open cgroup files now.
pub fn open_files() -> usize {
    BUDGET.open()
}

impl StatFile {
    /// `rel` (e.g. `a/b/cpu.stat`) below the hierarchy mounted at `root`.
    /// Nothing is opened yet.
    pub fn new(root: &Path, rel: String) -> Self {
        Self {
            root: root.to_owned(),
            rel,
            file: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    /// The file's current contents.
    pub fn read(&self) -> io::Result<String> {
        let mut guard = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Relaxed) {
            // Read as a removed cgroup's file reads.
            return Err(io::Error::from_raw_os_error(Errno::ENODEV as i32));
        }
        if guard.is_none() {
            if !BUDGET.take() {
                return read_small(&self.root, &self.rel);
            }
            match self.open() {
                Ok(f) => *guard = Some(f),
                Err(e) if is_out_of_descriptors(&e) => {
                    BUDGET.give();
                    if !WARNED_NOFILE.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "out of file descriptors ({e}); cgroup files are now opened for each \
                             read, which costs more CPU: raise the open-files limit (RLIMIT_NOFILE)"
                        );
                    }
                    return read_small(&self.root, &self.rel);
                }
                Err(e) => {
                    BUDGET.give();
                    return Err(e);
                }
            }
        }
        let file = guard.as_ref().expect("opened above");
        match read_from_start(file) {
            Ok(s) => Ok(s),
            Err(e) => {
                // A removed cgroup's files fail with ENODEV; whatever it
                // was, the next read opens the file again.
                *guard = None;
                BUDGET.give();
                Err(e)
            }
        }
    }

    /// The id of the cgroup the file belongs to in its hierarchy: its
    /// directory's inode number, which is the cgroup's kernfs node id (on
    /// 64-bit kernels, the only ones podmeter runs on).
    pub fn cgroup_id(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        let path = self.root.join(&self.rel);
        let dir = path.parent().unwrap_or(&path);
        Ok(std::fs::metadata(dir)?.ino())
    }

    /// Closes the file for good (its cgroup is gone: an open file would
    /// keep the dead cgroup's kernel state around). Later reads fail as a
    /// removed cgroup's do.
    pub fn close(&self) {
        let mut guard = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        self.closed.store(true, Ordering::Relaxed);
        let file = guard.take();
        drop(guard);
        if file.is_some() {
            BUDGET.give();
        }
    }

    /// Whether the file is open now.
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        self.file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn open(&self) -> io::Result<File> {
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let fd = fcntl::openat(
            &*root_fd(&self.root)?,
            self.rel.as_str(),
            flags,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }
}

/// Whether a read failed because the cgroup is gone (removed while being
/// read, or before): normal under churn, not a failure of the reader.
pub fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ENOENT | Errno::ENODEV)
    )
}

impl Drop for StatFile {
    fn drop(&mut self) {
        self.close();
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE)
    )
}

/// Reads `file` from offset 0 to its end, with `pread`: a seq_file read at
/// offset 0 starts over, so this is the file's current contents.
///
/// A cgroupfs file is one seq_file record, which a read copies out whole if
/// the buffer can hold it: a read that leaves room in the buffer has reached
/// the end, and the usual read that returns 0 would be a second syscall for
/// nothing (half of them, for thousands of files a scrape). A longer file is
/// read on from where the last `pread` stopped.
fn read_from_start(file: &File) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Raises this process's soft open-files limit to its hard limit.
///
/// A cgroup keeps up to ten files open while it is counted (four of memory,
/// three of CPU, three of pressure), so a node with a thousand containers
/// needs ten thousand descriptors: more than the
/// customary soft limit of 1024, well within the usual hard limit. Returns
/// the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn a_budget_lends_what_it_has_and_no_more() {
        let b = Budget::new(2);
        assert!(b.take() && b.take());
        assert!(!b.take(), "the third is refused");
        assert_eq!(b.open(), 2);
        b.give();
        assert!(b.take());
        let none = Budget::new(0);
        assert!(!none.take());
    }

    #[test]
    fn rereads_current_contents_in_place() {
        let dir = std::env::temp_dir().join(format!("podmeter-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = StatFile::new(&dir, "stat".into());
        assert!(f.read().is_err(), "a missing file is an error");
        assert!(!f.is_open());

        fs::write(dir.join("stat"), "a 1\n").unwrap();
        assert_eq!(f.read().unwrap(), "a 1\n");
        assert!(f.is_open());
        // Rewritten in place (same inode, as cgroupfs regenerates): the
        // kept-open file sees the new contents, longer than its buffer too.
        let long: String = (0..5000).map(|i| format!("k{i} {i}\n")).collect();
        fs::write(dir.join("stat"), &long).unwrap();
        assert_eq!(f.read().unwrap(), long);
        fs::write(dir.join("stat"), "b 2\n").unwrap();
        assert_eq!(f.read().unwrap(), "b 2\n");

        // Closed for good: a read fails as a removed cgroup's, and opens
        // nothing, though the file is still there.
        f.close();
        assert!(!f.is_open());
        let e = f.read().unwrap_err();
        assert!(is_gone(&e), "{e}");
        assert!(!f.is_open());
        fs::remove_dir_all(&dir).unwrap();
    }
}
