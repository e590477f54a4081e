//! Counting that outlives the agent process: the counter maps and the links
//! of the counting programs pinned in bpffs, under
//! `<pin-path>/v<LAYOUT>/{maps,links}/`.
//!
//! While no agent runs (a crash, an OOM kill, an eviction, a rolling
//! upgrade) the pinned programs keep adding to the pinned maps; the next
//! agent finds them and adopts them, so its counters continue from where
//! they were, with the gap's time and bytes in them.
//!
//! * **Adopt.** Pins of this [`LAYOUT`] whose maps have the expected type
//!   and sizes are reused as they are: the loader opens the pinned maps
//!   instead of making new ones, and the new programs replace the old ones
//!   link by link (`cgroup_skb` atomically, by `BPF_LINK_UPDATE`, so no
//!   packet is counted twice or missed; `sched_switch` and the tick by
//!   attaching the new link before unpinning the old, which can at worst
//!   count a context switch twice while both run and never bills time
//!   twice: both read and advance the same per-CPU state, and a switch
//!   program that finds a switch handled already (the state shows `next`
//!   running, at its runtime now) leaves it alone).
//! * **Reset.** Pins of another layout cannot be read by this agent: they
//!   are removed (which detaches their programs) and counting starts again
//!   from zero, said in the log at warning level and in
//!   `podmeter_counters_origin_info{origin="reset"}`, never silently.
//! * **Cleanup.** `podmeter cleanup` removes every pin ([`cleanup`]).
//!
//! The `cgroup` mkdir/rmdir programs and their ring buffer are not pinned:
//! the new agent walks the cgroup tree at start anyway.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};
use podmeter_common::{CpuCounters, DROP_SLOTS, NetCounters, NetOnCpu, OnCpu, WaitHistogram};

/// The version of everything pinned: the maps' types, keys and values, and
/// what the programs keep in them (the per-CPU [`OnCpu`] protocol). A new
/// agent adopts pins of its own layout only. Bump it with any change to
/// `podmeter-common`'s map values or to how the programs use them.
pub const LAYOUT: u32 = 5;

/// `statfs` type of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where bpffs is conventionally mounted, and where the agent mounts it if
/// it is missing.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The maps that are pinned, with the layout this agent expects of each:
/// (name, type, key size, value size).
fn expected() -> [(&'static str, MapType, u32, u32); 6] {
    let size = |n: usize| n as u32;
    [
        (
            "PM_CPU",
            MapType::PerCpuHash,
            8,
            size(size_of::<CpuCounters>()),
        ),
        (
            "PM_NET",
            MapType::PerCpuHash,
            8,
            size(size_of::<NetCounters>()),
        ),
        (
            "PM_ONCPU",
            MapType::PerCpuArray,
            4,
            size(size_of::<OnCpu>()),
        ),
        (
            "PM_NET_ONCPU",
            MapType::PerCpuArray,
            4,
            size(size_of::<NetOnCpu>()),
        ),
        ("PM_DROPS", MapType::PerCpuArray, 4, 8),
        (
            "PM_WAIT_HIST",
            MapType::PerCpuHash,
            8,
            size(size_of::<WaitHistogram>()),
        ),
    ]
}

/// The names of the pinned maps.
pub fn map_names() -> [&'static str; 6] {
    expected().map(|(n, ..)| n)
}

/// Where counting state came from at start, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Compatible pins were found: every counter continues, including what
    /// the kernel counted while no agent ran.
    Adopted,
    /// There were no pins: counting starts now, pinned.
    Created,
    /// Pins this agent cannot read were removed (what, why): every counter
    /// restarted from zero.
    Reset(String),
    /// Not pinned (why): counting lives and dies with this process.
    Unpinned(String),
}

impl Origin {
    /// The `origin` label of `podmeter_counters_origin_info`.
    pub fn label(&self) -> &'static str {
        match self {
            Origin::Adopted => "adopted",
            Origin::Created => "created",
            Origin::Reset(_) => "reset",
            Origin::Unpinned(_) => "unpinned",
        }
    }
}

/// A pin directory this agent owns: `<pin-path>/v<LAYOUT>`.
#[derive(Debug, Clone)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    /// Makes `root` usable (mounting bpffs at [`BPFFS`] if `root` is under
    /// it and it is not mounted), removes pins of other layouts or of an
    /// incompatible shape, and says what is left to adopt. `Err` says why
    /// nothing can be pinned.
    ///
    /// Maps of another capacity than `max_cgroups` count as incompatible:
    /// a changed `--max-cgroups` takes effect, with the reset announced. So
    /// does a wait histogram of another capacity than `wait_hist` (a
    /// `--wait-histogram` turned on or off).
    pub fn prepare(
        root: &Path,
        max_cgroups: u32,
        wait_hist: u32,
    ) -> Result<(Self, Origin), String> {
        ensure_bpffs(root)?;
        let dir = root.join(format!("v{LAYOUT}"));
        let mut removed = Vec::new();
        for path in layouts(root).map_err(|e| format!("{}: {e}", root.display()))? {
            if path != dir {
                remove_tree(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
                removed.push(format!(
                    "{} (another layout; this agent's is v{LAYOUT})",
                    path.display()
                ));
            }
        }
        let mut origin = Origin::Created;
        if dir.join("maps").exists() {
            match check_maps(&dir.join("maps"), max_cgroups, wait_hist) {
                Ok(()) => origin = Origin::Adopted,
                Err(why) => {
                    remove_tree(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
                    removed.push(format!("{} ({why})", dir.display()));
                }
            }
        } else if dir.exists() {
            // Links without maps: a start that failed half-way. Their
            // programs count into maps nobody can open.
            remove_tree(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
        }
        if !removed.is_empty() {
            origin = Origin::Reset(removed.join("; "));
        }
        for sub in ["maps", "links"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        Ok((Self { dir }, origin))
    }

    /// The pin of map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    /// The pin of link `name`.
    pub fn link(&self, name: &str) -> PathBuf {
        self.dir.join("links").join(name)
    }

    /// The pinned link `name` of an earlier agent, if there is one.
    pub fn old_link(&self, name: &str) -> Option<OwnedFd> {
        let path = self.link(name);
        if !path.exists() {
            return None;
        }
        match obj_get(&path) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!("cannot open pinned link {} ({e}); replacing it", path.display());
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Link pins not in `keep` (ticks of CPUs no longer online, a switch
    /// program of the other flavour): removed, which detaches them.
    pub fn remove_links_except(&self, keep: &[String]) {
        let Ok(entries) = fs::read_dir(self.dir.join("links")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                tracing::info!("unpinning stale link {name}");
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Checks every pinned map against what this agent expects.
fn check_maps(maps: &Path, max_cgroups: u32, wait_hist: u32) -> Result<(), String> {
    for (name, ty, key, value) in expected() {
        let path = maps.join(name);
        let info =
            MapInfo::from_pin(&path).map_err(|e| format!("map {name} unreadable: {e}"))?;
        let found = info
            .map_type()
            .map_err(|e| format!("map {name} of unknown type: {e}"))?;
        if found != ty || info.key_size() != key || info.value_size() != value {
            return Err(format!(
                "map {name} is a {found:?} of {}-byte keys and {}-byte values; this agent needs \
                 a {ty:?} of {key} and {value}",
                info.key_size(),
                info.value_size()
            ));
        }
        if matches!(name, "PM_CPU" | "PM_NET") && info.max_entries() != max_cgroups {
            return Err(format!(
                "map {name} holds {} cgroups; --max-cgroups asks for {max_cgroups}",
                info.max_entries()
            ));
        }
        if name == "PM_WAIT_HIST" && info.max_entries() != wait_hist {
            return Err(format!(
                "map PM_WAIT_HIST holds {} cgroups; this agent needs {wait_hist} (--wait-histogram \
                 was turned {})",
                info.max_entries(),
                if wait_hist > 1 { "on" } else { "off" }
            ));
        }
        if name == "PM_DROPS" && info.max_entries() < DROP_SLOTS {
            return Err(format!(
                "map PM_DROPS has {} slots; this agent needs {DROP_SLOTS}",
                info.max_entries()
            ));
        }
    }
    Ok(())
}

/// Mounts bpffs at [`BPFFS`] when `root` lies under it and nothing is
/// mounted there, as Cilium does, then makes `root`. `Err` when `root` is not
/// on a bpffs and cannot be put on one.
pub fn ensure_bpffs(root: &Path) -> Result<(), String> {
    let base = Path::new(BPFFS);
    if root.starts_with(base) && !is_bpffs(base) {
        if !base.is_dir() {
            return Err(format!("{BPFFS} does not exist to mount bpffs on"));
        }
        nix::mount::mount(
            Some("bpf"),
            base,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| {
            format!("no bpffs at {BPFFS}, and mounting one failed ({e}; it needs CAP_SYS_ADMIN)")
        })?;
        tracing::warn!(
            "mounted bpffs at {BPFFS}, where the host had none; in a container this mount, and \
             the pins in it, last only as long as the container (mount bpffs on the host, as \
             systemd does at boot, for counting that outlives it)"
        );
    }
    fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    if !is_bpffs(root) {
        return Err(format!("{} is not on a bpffs mount", root.display()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// The layout directories (`v<digits>`) under `root`: only these are ever
/// removed, so a `--pin-path` shared with other software loses nothing of
/// theirs.
fn layouts(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Removes every podmeter pin under `root` (detaching the programs the
/// links held, and freeing the maps once no agent has them open), then
/// `root` itself if that leaves it empty; returns the pins removed. A
/// missing `root` is nothing to do.
pub fn cleanup(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    for dir in layouts(root)? {
        collect(&dir, &mut removed)?;
        remove_tree(&dir)?;
    }
    // Not empty: someone else's pins, which stay.
    let _ = fs::remove_dir(root);
    Ok(removed)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// `rm -r` that also takes a single pin.
fn remove_tree(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `enum bpf_cmd`.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

pub(super) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a `bpf_attr` member laid out for `cmd`, valid for
    // the call; the kernel reads no more than `size_of::<T>()` bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned object (aya's own is not public for links).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a new descriptor the kernel just returned, owned by no one.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes link `link` run `prog` instead of its program, atomically (cgroup
/// links since 5.7; other kinds refuse).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_labels() {
        assert_eq!(Origin::Adopted.label(), "adopted");
        assert_eq!(Origin::Reset("x".into()).label(), "reset");
        assert_eq!(Origin::Unpinned("x".into()).label(), "unpinned");
    }

    #[test]
    fn cleanup_of_a_missing_path_is_nothing() {
        let removed = cleanup(Path::new("/nonexistent/podmeter-pins")).unwrap();
        assert!(removed.is_empty());
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        let d = std::env::temp_dir().join(format!("pm-pins-{}", std::process::id()));
        let e = ensure_bpffs(&d).unwrap_err();
        assert!(e.contains("is not on a bpffs mount"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }
}
