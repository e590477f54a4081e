//! Finding the cgroup2 mount (and the v1 memory and cpu controllers on hybrid
//! hosts) from `/proc/self/mountinfo`, never from a hard-coded path: a v1
//! controller is found by its name in the mount's super options, so a
//! co-mounted `cpu,cpuacct` hierarchy (with `cpu` and `cpuacct` symlinks
//! beside it) is found under its real mount point.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

/// Where podmeter reads cgroups from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounts {
    /// The cgroup2 mount: ids are inode numbers of directories below it.
    pub unified: PathBuf,
    /// The cgroup v1 `memory` controller, on hybrid hosts.
    pub memory_v1: Option<PathBuf>,
    /// The cgroup v1 `cpu` controller (CFS bandwidth: quota, throttling),
    /// on hybrid hosts. A controller is bound to one hierarchy at a time, so
    /// when this is set the cgroup2 tree has no `cpu.max` files.
    pub cpu_v1: Option<PathBuf>,
    /// Which cgroup of the hierarchy `unified` shows: `/` for a mount of the
    /// whole tree, `/kubepods` for one a cgroup namespace confines. The
    /// kernel's events name cgroups from the hierarchy's root. `None` when
    /// the mount's root lies outside this process's cgroup namespace (a pod
    /// with its own cgroup namespace bind-mounting the host's tree: the
    /// kernel shows the root as `/../..`), so its place is unknown.
    pub unified_shows: Option<String>,
    /// Whether the kernel tracks pressure stalls (PSI) in the cgroup2 tree:
    /// `cpu.pressure` at the mount's top (see `cgroup::pressure`).
    pub psi: bool,
    /// Whether cgroup2 was mounted with `memory_localevents`: its
    /// `memory.events` then count a cgroup's own events only, like
    /// `memory.events.local`, and hold nothing of removed children.
    pub memory_local_events: bool,
}

/// Why the cgroup2 hierarchy could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Nothing of type cgroup2 is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (checked /proc/self/mountinfo); podmeter needs cgroup v2 \
         or a hybrid host with the unified hierarchy (e.g. /sys/fs/cgroup/unified); \
         if it is mounted elsewhere in this container, pass --cgroup-root"
    )]
    NoCgroup2,
    /// `--cgroup-root` names something that is not a cgroup2 mount.
    #[error(
        "--cgroup-root {path}: not a cgroup2 filesystem, nor a directory with one at unified/; \
         point it at the cgroup2 mount or at the host's /sys/fs/cgroup"
    )]
    NotCgroup2 {
        /// The path given.
        path: PathBuf,
    },
    /// `--cgroup-root` cannot be inspected.
    #[error("--cgroup-root {path}: {source}")]
    Inaccessible {
        /// The path given.
        path: PathBuf,
        /// What the kernel said.
        source: nix::Error,
    },
    /// mountinfo could not be read.
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(#[from] io::Error),
}

impl Mounts {
    /// Mounts where no file exists (cgroup2 at `/nonexistent`, no v1
    /// hierarchies, no pressure): for unit tests that feed the index by
    /// hand, whose cgroups read nothing.
    #[cfg(test)]
    pub fn nowhere() -> Self {
        Self {
            unified: "/nonexistent".into(),
            memory_v1: None,
            cpu_v1: None,
            unified_shows: Some("/".into()),
            psi: false,
            memory_local_events: false,
        }
    }

    /// The mount of the hierarchy holding the cpu controller: the v1 `cpu`
    /// one on hybrid hosts, else the cgroup2 one.
    pub fn cpu_hierarchy(&self) -> &Path {
        self.cpu_v1.as_deref().unwrap_or(&self.unified)
    }

    /// Detects the mounts of this host. `cgroup_root` overrides detection:
    /// either the cgroup2 mount itself, or a directory holding a hybrid
    /// host's hierarchies (`<dir>/unified`, `<dir>/memory`, `<dir>/cpu`),
    /// such as the host's /sys/fs/cgroup mounted into a container.
    pub fn detect(cgroup_root: Option<&Path>) -> Result<Self, MountError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let mut mounts = Self::detect_in(&mountinfo, cgroup_root)?;
        mounts.unified_shows = hierarchy_path(&mountinfo, &mounts.unified);
        mounts.psi = mounts.unified.join("cpu.pressure").exists();
        mounts.memory_local_events = memory_local_events(&mountinfo, &mounts.unified);
        Ok(mounts)
    }

    fn detect_in(mountinfo: &str, cgroup_root: Option<&Path>) -> Result<Self, MountError> {
        let Some(path) = cgroup_root else {
            return Ok(Self {
                unified: find_cgroup2(mountinfo).ok_or(MountError::NoCgroup2)?,
                memory_v1: find_v1_controller(mountinfo, "memory"),
                cpu_v1: find_v1_controller(mountinfo, "cpu"),
                unified_shows: Some("/".into()),
                psi: false,
                memory_local_events: false,
            });
        };
        let inaccessible = |source| MountError::Inaccessible {
            path: path.to_owned(),
            source,
        };
        if statfs(path).map_err(inaccessible)?.filesystem_type() == CGROUP2_SUPER_MAGIC {
            // A cgroup2 mount given directly: a hybrid host's v1
            // controllers are its siblings, if mounted alongside.
            let sibling = |name, is_v1: fn(&Path) -> bool| {
                path.parent()
                    .map(|p| p.join(name))
                    .filter(|d| is_v1(d))
                    .or_else(|| find_v1_controller(mountinfo, name))
            };
            return Ok(Self {
                unified: path.to_owned(),
                memory_v1: sibling("memory", is_v1_memory),
                cpu_v1: sibling("cpu", is_v1_cpu),
                unified_shows: Some("/".into()),
                psi: false,
                memory_local_events: false,
            });
        }
        let unified = path.join("unified");
        if statfs(&unified).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC) {
            let (memory, cpu) = (path.join("memory"), path.join("cpu"));
            return Ok(Self {
                unified,
                memory_v1: is_v1_memory(&memory).then_some(memory),
                cpu_v1: is_v1_cpu(&cpu).then_some(cpu),
                unified_shows: Some("/".into()),
                psi: false,
                memory_local_events: false,
            });
        }
        Err(MountError::NotCgroup2 {
            path: path.to_owned(),
        })
    }
}

fn is_v1_memory(dir: &Path) -> bool {
    dir.join("memory.usage_in_bytes").exists()
}

/// `cpu.shares` is in every v1 cpu hierarchy; `cpu,cpuacct` co-mounts are
/// usually reached through a `cpu` symlink, which `join` follows.
fn is_v1_cpu(dir: &Path) -> bool {
    dir.join("cpu.shares").exists()
}

/// One line of mountinfo, the fields podmeter needs.
struct Mount<'a> {
    root: &'a str,
    point: PathBuf,
    fstype: &'a str,
    super_opts: &'a str,
}

fn parse_line(line: &str) -> Option<Mount<'_>> {
    // id parent major:minor root point opts [optional...] - fstype source super
    let (pre, post) = line.split_once(" - ")?;
    let mut pre = pre.split(' ');
    let root = pre.nth(3)?;
    let point = unescape(pre.next()?);
    let mut post = post.split(' ');
    let fstype = post.next()?;
    let super_opts = post.nth(1).unwrap_or("");
    Some(Mount {
        root,
        point: PathBuf::from(point),
        fstype,
        super_opts,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Bytes, not `&str` slices: a backslash before a multi-byte
        // character must not split it.
        if b[i] == b'\\' {
            if let Some(v) = b.get(i + 1..i + 4).and_then(octal_byte) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Three octal digits (`040`) as the byte they name, if it is one.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    digits.iter().try_fold(0u8, |v, &d| {
        if (b'0'..=b'7').contains(&d) {
            v.checked_mul(8)?.checked_add(d - b'0')
        } else {
            None
        }
    })
}

/// The cgroup2 mount: the conventional places first, then any whole-tree one.
pub fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<_> = mountinfo
        .lines()
        .filter_map(parse_line)
        .filter(|m| m.fstype == "cgroup2")
        .collect();
    for preferred in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Some(m) = mounts.iter().find(|m| m.point == Path::new(preferred)) {
            return Some(m.point.clone());
        }
    }
    mounts
        .iter()
        .find(|m| m.root == "/")
        .or(mounts.first())
        .map(|m| m.point.clone())
}

/// The cgroup of the cgroup2 hierarchy that directory `dir` shows: the root
/// of the cgroup2 mount it lies in (mountinfo's fourth field) joined with
/// the rest of `dir` below the mount point. `/` when no mount is found;
/// `None` when the mount's root is outside this process's cgroup namespace.
pub fn hierarchy_path(mountinfo: &str, dir: &Path) -> Option<String> {
    let Some((below, m)) = cgroup2_holding(mountinfo, dir) else {
        return Some("/".into());
    };
    // The kernel shows a root outside the reader's cgroup namespace relative
    // to the namespace's own root, whose place in the hierarchy is hidden.
    if Path::new(m.root)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return None;
    }
    let joined = Path::new(m.root).join(below);
    let s = joined.to_string_lossy();
    Some(match s.trim_end_matches('/') {
        "" => "/".into(),
        t => t.to_owned(),
    })
}

/// Whether the cgroup2 mount `dir` lies in has `memory_localevents` among
/// its super options (false when none is found).
pub fn memory_local_events(mountinfo: &str, dir: &Path) -> bool {
    cgroup2_holding(mountinfo, dir)
        .is_some_and(|(_, m)| m.super_opts.split(',').any(|o| o == "memory_localevents"))
}

/// The cgroup2 mount `dir` lies in, and the rest of `dir` below its mount
/// point: the deepest mount point containing `dir` (later lines win a tie:
/// they are mounted over the earlier ones).
fn cgroup2_holding<'a>(mountinfo: &'a str, dir: &Path) -> Option<(PathBuf, Mount<'a>)> {
    mountinfo
        .lines()
        .filter_map(parse_line)
        .filter(|m| m.fstype == "cgroup2")
        .filter_map(|m| Some((dir.strip_prefix(&m.point).ok()?.to_owned(), m)))
        .max_by_key(|(_, m)| m.point.components().count())
}

/// A cgroup v1 controller's mount (hybrid hosts), by controller name.
pub fn find_v1_controller(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(parse_line)
        .filter(|m| m.fstype == "cgroup")
        .find(|m| m.super_opts.split(',').any(|o| o == controller))
        .map(|m| m.point)
}

/// Every mount point, unescaped, in mountinfo's order.
pub fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo.lines().filter_map(parse_line).map(|m| m.point)
}

/// The mount points of filesystems of type `fstype` (`bpf`, `cgroup2`),
/// unescaped, in mountinfo's order.
pub fn mount_points_of<'a>(
    mountinfo: &'a str,
    fstype: &'a str,
) -> impl Iterator<Item = PathBuf> + 'a {
    mountinfo
        .lines()
        .filter_map(parse_line)
        .filter(move |m| m.fstype == fstype)
        .map(|m| m.point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mount_point() {
        let points: Vec<PathBuf> = mount_points(HYBRID).collect();
        assert_eq!(points.len(), HYBRID.lines().count());
        assert_eq!(points[0], Path::new("/sys"));
        assert_eq!(points.last().unwrap(), Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn mount_points_of_one_type() {
        let v1: Vec<PathBuf> = mount_points_of(HYBRID, "cgroup").collect();
        assert_eq!(
            v1,
            [
                Path::new("/sys/fs/cgroup/cpu"),
                Path::new("/sys/fs/cgroup/memory")
            ]
        );
        assert_eq!(mount_points_of(HYBRID, "bpf").count(), 0);
    }

    const HYBRID: &str = "\
25 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// Debian/Ubuntu-style hybrid: cpu and cpuacct co-mounted (plus
    /// cpuset, whose name starts with "cpu" too).
    const COMOUNTED: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 30 0:30 / /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpuset
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
";
    const PURE_V2: &str = "\
25 1 0:22 / /sys rw - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const CONTAINER: &str = "\
600 500 0:26 / /host/sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
601 500 0:26 /kubepods /sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_host() {
        assert_eq!(find_cgroup2(HYBRID), Some("/sys/fs/cgroup/unified".into()));
        assert_eq!(
            find_v1_controller(HYBRID, "memory"),
            Some("/sys/fs/cgroup/memory".into())
        );
        assert_eq!(
            find_v1_controller(HYBRID, "cpu"),
            Some("/sys/fs/cgroup/cpu".into())
        );
    }

    #[test]
    fn comounted_cpu_found_by_super_option() {
        assert_eq!(
            find_v1_controller(COMOUNTED, "cpu"),
            Some("/sys/fs/cgroup/cpu,cpuacct".into())
        );
        assert_eq!(
            find_v1_controller(COMOUNTED, "cpuacct"),
            Some("/sys/fs/cgroup/cpu,cpuacct".into())
        );
        assert_eq!(
            find_v1_controller(COMOUNTED, "cpuset"),
            Some("/sys/fs/cgroup/cpuset".into())
        );
        assert_eq!(find_v1_controller(COMOUNTED, "memory"), None);
    }

    #[test]
    fn pure_v2_host() {
        assert_eq!(find_cgroup2(PURE_V2), Some("/sys/fs/cgroup".into()));
        assert_eq!(find_v1_controller(PURE_V2, "memory"), None);
        assert_eq!(find_v1_controller(PURE_V2, "cpu"), None);
    }

    #[test]
    fn prefers_conventional_then_whole_tree() {
        // /sys/fs/cgroup here is a namespaced sub-tree; /host/... is whole.
        assert_eq!(find_cgroup2(CONTAINER), Some("/sys/fs/cgroup".into()));
        let only_host = CONTAINER.lines().next().unwrap();
        assert_eq!(find_cgroup2(only_host), Some("/host/sys/fs/cgroup".into()));
    }

    #[test]
    fn hierarchy_path_of_a_mount() {
        let p = |info, dir: &str| hierarchy_path(info, Path::new(dir)).unwrap();
        assert_eq!(p(HYBRID, "/sys/fs/cgroup/unified"), "/");
        assert_eq!(p(PURE_V2, "/sys/fs/cgroup"), "/");
        assert_eq!(
            p(PURE_V2, "/sys/fs/cgroup/kubepods/burstable"),
            "/kubepods/burstable"
        );
        assert_eq!(p(CONTAINER, "/host/sys/fs/cgroup"), "/");
        assert_eq!(p(CONTAINER, "/sys/fs/cgroup"), "/kubepods");
        assert_eq!(
            p(CONTAINER, "/sys/fs/cgroup/besteffort"),
            "/kubepods/besteffort"
        );
        // Not below any cgroup2 mount, or no mountinfo at all.
        assert_eq!(p(HYBRID, "/sys/fs/cgroup/memory"), "/");
        assert_eq!(p("", "/sys/fs/cgroup"), "/");
        // What a process in a private cgroup namespace two levels down reads
        // for the host's cgroup2 mount (seen on this kernel with unshare -C).
        let outside = "41 31 0:38 /../.. /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(
            hierarchy_path(outside, Path::new("/sys/fs/cgroup/unified")),
            None
        );
    }

    #[test]
    fn memory_local_events_from_the_holding_mounts_options() {
        let local =
            "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,memory_localevents";
        assert!(memory_local_events(local, Path::new("/sys/fs/cgroup")));
        assert!(memory_local_events(
            local,
            Path::new("/sys/fs/cgroup/kubepods")
        ));
        assert!(!memory_local_events(PURE_V2, Path::new("/sys/fs/cgroup")));
        assert!(!memory_local_events(
            HYBRID,
            Path::new("/sys/fs/cgroup/unified")
        ));
        // The option of another mount does not count.
        assert!(!memory_local_events(local, Path::new("/elsewhere")));
        assert!(!memory_local_events("", Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn none_and_garbage() {
        assert_eq!(find_cgroup2(""), None);
        assert_eq!(find_cgroup2("garbage\n- - -\n1 2 3"), None);
        assert_eq!(find_v1_controller("x - cgroup", "memory"), None);
    }

    #[test]
    fn escaped_mount_point() {
        let line = "40 25 0:30 / /mnt/with\\040space rw - cgroup2 cgroup2 rw";
        assert_eq!(find_cgroup2(line), Some("/mnt/with space".into()));
    }

    #[test]
    fn escapes_next_to_multibyte_characters() {
        // A backslash before `é` used to panic: the three bytes after it
        // were sliced as a `&str`, inside the character.
        let line = "40 25 0:30 / /mnt/\\é1\\04 rw - cgroup2 cgroup2 rw";
        assert_eq!(find_cgroup2(line), Some("/mnt/\\é1\\04".into()));
        // Not an escape: past a byte's range, or not octal digits.
        let line = "40 25 0:30 / /a\\777\\08a rw - cgroup2 cgroup2 rw";
        assert_eq!(find_cgroup2(line), Some("/a\\777\\08a".into()));
    }
}
