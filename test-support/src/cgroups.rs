//! Where the cgroup hierarchies are, and test cgroups: trees of kubelet-style
//! cgroups mirrored in every hierarchy that matters on this host, removed
//! (processes and all) on drop. The mountinfo parser is the agent's own.

use std::{
    fs,
    io::BufReader,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use podmeter::cgroup::mount;

use crate::work::{Work, alive, pm_work};

fn mountinfo() -> String {
    fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
}

/// Where the cgroup2 hierarchy is mounted here (pure v2 or hybrid).
pub fn unified_root() -> PathBuf {
    try_unified_root().expect("a cgroup2 mount")
}

/// [`unified_root`], or `None` on a host without cgroup2.
pub fn try_unified_root() -> Option<PathBuf> {
    mount::find_cgroup2(&mountinfo())
}

/// A command that runs `program` inside the cgroup directory `dir` from its
/// first instruction: a shell joins the cgroup, then becomes the program.
pub fn command_in(dir: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(dir)
        .arg(program);
    c
}

/// The cgroup2 directory of a container, wherever the kubelet put it
/// under `kubepods` (either driver, any QoS class): the directory named by
/// its id.
pub fn container_cgroup(id: &str) -> Option<PathBuf> {
    fn find(dir: &Path, name: &str) -> Option<PathBuf> {
        for e in fs::read_dir(dir).ok()?.flatten() {
            if e.file_type().ok()?.is_dir() {
                if e.file_name() == name {
                    return Some(e.path());
                }
                if let Some(p) = find(&e.path(), name) {
                    return Some(p);
                }
            }
        }
        None
    }
    find(&try_unified_root()?.join("kubepods"), id)
}

/// The cgroup v1 memory controller, on hybrid hosts.
pub fn memory_v1_root() -> Option<PathBuf> {
    let p = PathBuf::from("/sys/fs/cgroup/memory");
    p.join("memory.usage_in_bytes").exists().then_some(p)
}

/// The cgroup v1 `cpu` controller's mount, on hybrid hosts: found by the
/// `cpu` super option, so a `cpu,cpuacct` co-mount counts too.
pub fn cpu_v1_root() -> Option<PathBuf> {
    mount::find_v1_controller(&mountinfo(), "cpu")
}

/// The v1 hierarchies a kubelet on a hybrid host lays pods out in besides
/// cgroup2: memory, cpu and cpuacct (none on a pure v2 host).
pub fn v1_roots() -> Vec<PathBuf> {
    let info = mountinfo();
    let mut roots: Vec<PathBuf> = Vec::new();
    for controller in ["memory", "cpu", "cpuacct"] {
        if let Some(dir) = mount::find_v1_controller(&info, controller)
            && !roots.contains(&dir)
        {
            roots.push(dir);
        }
    }
    roots
}

/// Whether the cgroup2 root hands the cpu controller to its children, so
/// test cgroups can get `cpu.max`.
pub fn cpu_in_unified() -> bool {
    fs::read_to_string(unified_root().join("cgroup.subtree_control"))
        .is_ok_and(|s| s.split_whitespace().any(|c| c == "cpu"))
}

/// Where a [`TestTree`] made with [`TestTree::with_cpu`] sets CPU limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuController {
    /// `cpu.max` in the cgroup2 directories.
    Unified,
    /// `cpu.cfs_quota_us` in the v1 cpu hierarchy, mirrored like memory.
    V1,
}

/// Kills every process in a cgroup directory and waits until it is empty.
pub fn empty_cgroup(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        sleep(Duration::from_millis(20));
    }
}

/// Removes a cgroup sub-tree bottom-up, killing what runs in it; a
/// warning, not a panic, if it will not go (best effort, also on drop).
pub fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    empty_cgroup(dir);
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => sleep(Duration::from_millis(20)), // zombie tasks still exiting
        }
    }
    eprintln!("warning: could not remove {}", dir.display());
}

/// A tree of test cgroups under `/podmeter-test-<pid>-<tag>`, in the cgroup2
/// hierarchy and (on hybrid hosts) mirrored in the v1 memory controller, the
/// way the kubelet and runc lay them out. Removed, processes and all, on drop.
pub struct TestTree {
    /// Name of the top cgroup, relative to each hierarchy root.
    pub name: String,
    roots: Vec<PathBuf>,
    cpu: Option<CpuController>,
}

impl TestTree {
    /// Creates the top cgroup; first clears what crashed earlier runs left.
    pub fn new(tag: &str) -> Self {
        Self::make(tag, None)
    }

    /// Like [`TestTree::new`], with a cpu controller for every cgroup: in
    /// the cgroup2 tree where the root delegates it (`+cpu` down the test's
    /// own sub-tree), else in the v1 cpu hierarchy, where the tree is
    /// mirrored and `pm-work` joins it too. Panics if neither exists.
    pub fn with_cpu(tag: &str) -> Self {
        let cpu = if cpu_in_unified() {
            CpuController::Unified
        } else {
            assert!(
                cpu_v1_root().is_some(),
                "no cpu controller: neither in cgroup2's subtree_control nor mounted as v1"
            );
            CpuController::V1
        };
        Self::make(tag, Some(cpu))
    }

    /// Which cpu controller [`TestTree::with_cpu`] found.
    pub fn cpu_controller(&self) -> Option<CpuController> {
        self.cpu
    }

    fn make(tag: &str, cpu: Option<CpuController>) -> Self {
        let mut roots = vec![unified_root()];
        roots.extend(memory_v1_root());
        // Stale trees are swept from the v1 cpu hierarchy too, whoever made them.
        let mut sweep = roots.clone();
        sweep.extend(cpu_v1_root());
        if cpu == Some(CpuController::V1) {
            roots.extend(cpu_v1_root());
        }
        for root in &sweep {
            for e in fs::read_dir(root).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stale = name
                    .strip_prefix("podmeter-test-")
                    .and_then(|r| r.split('-').next())
                    .and_then(|p| p.parse::<i32>().ok())
                    .is_some_and(|pid| !alive(pid));
                if stale {
                    remove_tree(&e.path());
                }
            }
        }
        let name = format!("podmeter-test-{}-{tag}", std::process::id());
        for root in &roots {
            fs::create_dir_all(root.join(&name)).unwrap();
        }
        let tree = Self { name, roots, cpu };
        tree.delegate(&tree.roots[0].join(&tree.name));
        tree
    }

    /// Hands the cgroup2 controllers down from `dir` to its children, as
    /// systemd does down `kubepods.slice` on a pure v2 node: memory and
    /// pids wherever the root delegates them (else a nested cgroup has no
    /// `memory.current`), cpu for a [`TestTree::with_cpu`] tree. Nothing on a
    /// hybrid host, whose cgroup2 root delegates none.
    fn delegate(&self, dir: &Path) {
        let offered =
            fs::read_to_string(self.roots[0].join("cgroup.subtree_control")).unwrap_or_default();
        for c in ["memory", "pids"] {
            if offered.split_whitespace().any(|o| o == c) {
                fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"))
                    .unwrap_or_else(|e| panic!("enabling {c} in {}: {e}", dir.display()));
            }
        }
        if self.cpu == Some(CpuController::Unified) {
            // cpu.max exists where the parent enables cpu for its children.
            fs::write(dir.join("cgroup.subtree_control"), "+cpu")
                .unwrap_or_else(|e| panic!("enabling cpu in {}: {e}", dir.display()));
        }
    }

    /// Creates `rel` (may be nested) below the top cgroup.
    pub fn cgroup(&self, rel: &str) -> TestCgroup {
        let dirs: Vec<PathBuf> = self
            .roots
            .iter()
            .map(|r| r.join(&self.name).join(rel))
            .collect();
        // Every level of the test's own tree above `rel` delegates.
        let mut dir = self.roots[0].join(&self.name);
        for part in Path::new(rel).parent().into_iter().flat_map(Path::iter) {
            dir.push(part);
            fs::create_dir_all(&dir).unwrap();
            self.delegate(&dir);
        }
        for d in &dirs {
            fs::create_dir_all(d).unwrap();
        }
        let cpu_dir = match self.cpu {
            Some(CpuController::Unified) => Some(dirs[0].clone()),
            Some(CpuController::V1) => dirs.last().cloned(),
            None => None,
        };
        TestCgroup {
            path: format!("/{}/{rel}", self.name),
            dirs,
            cpu_dir,
        }
    }
}

impl Drop for TestTree {
    fn drop(&mut self) {
        for root in &self.roots {
            remove_tree(&root.join(&self.name));
        }
    }
}

/// One test cgroup (cleaned up by its [`TestTree`]).
pub struct TestCgroup {
    /// Path relative to the cgroup2 root, as podmeter labels host cgroups.
    pub path: String,
    /// Its directories: cgroup2 first, then v1 memory if any, then v1 cpu
    /// for a [`TestTree::with_cpu`] tree on a hybrid host.
    pub dirs: Vec<PathBuf>,
    cpu_dir: Option<PathBuf>,
}

/// The kernel's CFS bandwidth counters of one cgroup (`cpu.stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throttling {
    /// `nr_periods`.
    pub periods: u64,
    /// `nr_throttled`.
    pub throttled_periods: u64,
    /// `throttled_usec` (v2) or `throttled_time` (v1, ns), in seconds.
    pub throttled_seconds: f64,
}

impl TestCgroup {
    /// The cgroup2 directory.
    pub fn dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// The kernel's own CPU usage of this cgroup (cpu.stat usage_usec), in seconds.
    pub fn cpu_stat_seconds(&self) -> f64 {
        let stat = fs::read_to_string(self.dir().join("cpu.stat")).unwrap();
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .expect("usage_usec in cpu.stat")
            .trim()
            .parse()
            .unwrap();
        usec as f64 / 1e6
    }

    /// `cpu_stat_seconds` just before and just after `f`: the kernel's count
    /// at the moment `f` looked lies between the two.
    pub fn cpu_stat_around<T>(&self, f: impl FnOnce() -> T) -> (T, (f64, f64)) {
        let before = self.cpu_stat_seconds();
        let out = f();
        (out, (before, self.cpu_stat_seconds()))
    }

    /// The directory holding its CPU bandwidth files (a [`TestTree::with_cpu`] tree).
    pub fn cpu_dir(&self) -> &Path {
        self.cpu_dir
            .as_deref()
            .expect("a cgroup of a TestTree::with_cpu tree")
    }

    /// Limits it to `quota_us` of CPU time every `period_us`.
    pub fn set_cpu_limit(&self, quota_us: u64, period_us: u64) {
        let dir = self.cpu_dir();
        if dir.join("cpu.max").exists() {
            fs::write(dir.join("cpu.max"), format!("{quota_us} {period_us}")).unwrap();
        } else {
            // Period first: a quota is checked against the current period.
            fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string()).unwrap();
            fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string()).unwrap();
        }
    }

    /// The kernel's throttling counters for it, now.
    pub fn throttling(&self) -> Throttling {
        let dir = self.cpu_dir();
        let stat = fs::read_to_string(dir.join("cpu.stat")).unwrap();
        let get = |key: &str| -> Option<u64> {
            stat.lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim().parse().unwrap())
        };
        let throttled_seconds = match get("throttled_usec") {
            Some(us) => us as f64 / 1e6,
            None => get("throttled_time").expect("throttled_time in v1 cpu.stat") as f64 / 1e9,
        };
        Throttling {
            periods: get("nr_periods").expect("nr_periods in cpu.stat"),
            throttled_periods: get("nr_throttled").expect("nr_throttled in cpu.stat"),
            throttled_seconds,
        }
    }

    /// The cgroup id podmeter keys it by.
    pub fn id(&self) -> u64 {
        fs::metadata(self.dir()).unwrap().ino()
    }

    /// Starts `pm-work` inside this cgroup (and `netns`, if given).
    pub fn spawn(&self, netns: Option<&str>, args: &[&str]) -> Work {
        self.spawn_with(netns, args, Stdio::inherit())
    }

    /// Like [`TestCgroup::spawn`], with a pipe to its stdin
    /// ([`Work::say`]).
    pub fn spawn_piped(&self, args: &[&str]) -> Work {
        self.spawn_with(None, args, Stdio::piped())
    }

    fn spawn_with(&self, netns: Option<&str>, args: &[&str], stdin: Stdio) -> Work {
        let mut cmd = Command::new(pm_work());
        for d in &self.dirs {
            cmd.arg("--cgroup").arg(d);
        }
        if let Some(ns) = netns {
            cmd.args(["--netns", ns]);
        }
        let mut child = cmd
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Work { child, stdout }
    }

    /// Removes this cgroup now (its processes must be gone).
    pub fn remove(&self) {
        for d in self.dirs.iter().rev() {
            remove_tree(d);
        }
    }
}

/// The kernel's CPU seconds between two scrapes, each bracketed by
/// `cpu.stat` readings (`(before, after)`, see
/// [`TestCgroup::cpu_stat_around`]): from the second's first reading less
/// the first's last, to the second's last less the first's first. A test
/// descheduled between a scrape and a reading widens the range instead of
/// counting as podmeter's error.
pub fn cpu_between((b0, a0): (f64, f64), (b1, a1): (f64, f64)) -> (f64, f64) {
    (b1 - a0, a1 - b0)
}

/// How far `value` lies outside `[lo, hi]`, relative to the end it
/// passed; 0 inside.
pub fn range_error(value: f64, (lo, hi): (f64, f64)) -> f64 {
    if value < lo {
        (lo - value) / lo
    } else {
        (value - hi).max(0.0) / hi
    }
}

/// The widest range [`assert_in_range`] takes, relative to its low end: a
/// wider one would let a podmeter that is wrong by more than the tolerance
/// pass.
pub const MAX_RANGE: f64 = 0.10;

/// Asserts that podmeter's `value` for `what` lies within `tolerance`
/// (relative) of the range `[lo, hi]` the kernel's readings allow, and that
/// the range is narrow enough (at most [`MAX_RANGE`]) for that to hold
/// podmeter to anything.
pub fn assert_in_range(what: &str, value: f64, (lo, hi): (f64, f64), tolerance: f64) {
    let err = range_error(value, (lo, hi));
    let width = (hi - lo) / lo;
    eprintln!(
        "{what}: podmeter {value:.4} s, cpu.stat {lo:.4} to {hi:.4} s ({:.2} % wide), error {:.3} %",
        width * 100.0,
        err * 100.0
    );
    assert!(
        width <= MAX_RANGE,
        "{what}: the cpu.stat readings around the scrapes allow {lo} to {hi} s, too wide a range \
         to hold podmeter ({value} s) to anything (the test stalled between a scrape and a reading)"
    );
    assert!(
        err < tolerance,
        "{what}: podmeter {value} s vs cpu.stat {lo} to {hi} s ({:.2} %)",
        err * 100.0
    );
}
