//! Harness for podmeter's integration tests: RAII guards for every kernel
//! object a test makes (cgroups, network namespaces, processes, the agent
//! and its BPF programs), so a failing test still leaves the machine as it
//! found it, and a scrape parser to compare podmeter with the kernel.
//!
//! The tests run as root, one at a time (`--test-threads=1`): they share
//! kernel state. `cargo xtask test` runs them with `PODMETER_BIN` set.

pub mod dashboard;

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Where the cgroup2 hierarchy is mounted here (pure v2 or hybrid).
pub fn unified_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split_once(" - "))
        .filter(|(_, post)| post.starts_with("cgroup2 "))
        .filter_map(|(pre, _)| pre.split(' ').nth(4))
        .collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|p| points.contains(p))
        .or(points.first().copied())
        .expect("a cgroup2 mount")
        .into()
}

/// The cgroup v1 memory controller, on hybrid hosts.
pub fn memory_v1_root() -> Option<PathBuf> {
    let p = PathBuf::from("/sys/fs/cgroup/memory");
    p.join("memory.usage_in_bytes").exists().then_some(p)
}

/// The cgroup v1 `cpu` controller's mount, on hybrid hosts: found by the
/// `cpu` super option, so a `cpu,cpuacct` co-mount counts too.
pub fn cpu_v1_root() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split(' ');
        let (fstype, super_opts) = (post.next()?, post.nth(1)?);
        (fstype == "cgroup" && super_opts.split(',').any(|o| o == "cpu"))
            .then(|| pre.split(' ').nth(4).map(PathBuf::from))
            .flatten()
    })
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

/// The `pm-work` helper binary: cargo builds it next to the test's `deps/`.
pub fn pm_work() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).unwrap().join("pm-work");
    assert!(p.exists(), "{} missing", p.display());
    p
}

/// The agent under test.
pub fn podmeter_bin() -> PathBuf {
    let p = std::env::var_os("PODMETER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/podmeter")
        });
    assert!(
        p.exists(),
        "{} missing: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Kills every process in a cgroup directory and waits until it is empty.
fn empty_cgroup(dir: &Path) {
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

/// Removes a cgroup sub-tree bottom-up, killing what runs in it.
fn remove_tree(dir: &Path) {
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
        let tree = Self::make(tag, Some(cpu));
        if cpu == CpuController::Unified {
            enable_cpu(&tree.roots[0].join(&tree.name));
        }
        tree
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
        Self { name, roots, cpu }
    }

    /// Creates `rel` (may be nested) below the top cgroup.
    pub fn cgroup(&self, rel: &str) -> TestCgroup {
        let dirs: Vec<PathBuf> = self
            .roots
            .iter()
            .map(|r| r.join(&self.name).join(rel))
            .collect();
        if self.cpu == Some(CpuController::Unified) {
            // cpu.max exists where the parent enables cpu for its children:
            // enable it at every level of the test's own tree above `rel`.
            let mut dir = self.roots[0].join(&self.name);
            for part in Path::new(rel).parent().into_iter().flat_map(Path::iter) {
                dir.push(part);
                fs::create_dir_all(&dir).unwrap();
                enable_cpu(&dir);
            }
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

/// `+cpu` in a test cgroup's subtree_control (it has no processes of its own).
fn enable_cpu(dir: &Path) {
    fs::write(dir.join("cgroup.subtree_control"), "+cpu")
        .unwrap_or_else(|e| panic!("enabling cpu in {}: {e}", dir.display()));
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
        let mut cmd = Command::new(pm_work());
        for d in &self.dirs {
            cmd.arg("--cgroup").arg(d);
        }
        if let Some(ns) = netns {
            cmd.args(["--netns", ns]);
        }
        let mut child = cmd.args(args).stdout(Stdio::piped()).spawn().unwrap();
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

/// A running `pm-work`; killed on drop.
pub struct Work {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Work {
    /// The next `key value...` line it prints, split on whitespace.
    pub fn line(&mut self) -> Vec<String> {
        let mut s = String::new();
        self.stdout.read_line(&mut s).unwrap();
        assert!(!s.is_empty(), "pm-work exited without reporting");
        s.split_whitespace().map(str::to_owned).collect()
    }

    /// Waits for it to exit successfully.
    pub fn wait(&mut self) {
        let st = self.child.wait().unwrap();
        assert!(st.success(), "pm-work failed: {st}");
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A network namespace; deleted on drop.
pub struct NetNs(pub String);

impl NetNs {
    /// `ip netns add <name>` with loopback up.
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self(name.to_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `ip` with `args`, panicking on failure.
pub fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2)");
    assert!(st.success(), "ip {args:?} failed");
}

/// Two namespaces joined by a veth pair: `a` has 10.231.0.1, `b` 10.231.0.2.
/// Both ends live only in namespaces this test made.
pub fn veth_pair(tag: &str) -> (NetNs, NetNs) {
    let (a, b) = (
        NetNs::new(&format!("pm-{tag}-a")),
        NetNs::new(&format!("pm-{tag}-b")),
    );
    ip(&[
        "-n", &a.0, "link", "add", "pmveth0", "type", "veth", "peer", "name", "pmveth1", "netns",
        &b.0,
    ]);
    ip(&["-n", &a.0, "addr", "add", "10.231.0.1/24", "dev", "pmveth0"]);
    ip(&["-n", &b.0, "addr", "add", "10.231.0.2/24", "dev", "pmveth1"]);
    ip(&["-n", &a.0, "link", "set", "pmveth0", "up"]);
    ip(&["-n", &b.0, "link", "set", "pmveth1", "up"]);
    (a, b)
}

/// A running podmeter on a free loopback port; SIGTERM, then SIGKILL, on drop.
pub struct Agent {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    log: PathBuf,
}

impl Agent {
    /// Starts podmeter with `args` and waits until `/readyz` says ready.
    pub fn start(args: &[&str]) -> Self {
        Self::start_under(&[], args)
    }

    /// Like [`Agent::start`], through a `wrapper` command that executes
    /// podmeter in the same process (e.g. `setpriv` with fewer capabilities).
    pub fn start_under(wrapper: &[&str], args: &[&str]) -> Self {
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("podmeter-test-{}-{port}.log", std::process::id()));
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut c = Command::new(program);
                c.args(wrapper_args).arg(podmeter_bin());
                c
            }
            None => Command::new(podmeter_bin()),
        };
        let child = cmd
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--log-level",
                "debug",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut agent = Self {
            child: Some(child),
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("podmeter exited ({st}) during start:\n{}", agent.log());
            }
            if agent.get("/readyz").is_ok_and(|(code, _)| code == 200) {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "podmeter not ready in 30 s:\n{}",
                agent.log()
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path: status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        let resp = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .call()?;
        let code = resp.status().as_u16();
        Ok((code, resp.into_body().read_to_string()?))
    }

    /// One parsed scrape of `/metrics`.
    pub fn scrape(&self) -> Scrape {
        let (code, body) = self.get("/metrics").expect("scrape");
        assert_eq!(code, 200, "{body}");
        Scrape::parse(&body)
    }

    /// Scrapes until `ok` holds, or panics after `timeout`.
    pub fn scrape_until(
        &self,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&Scrape) -> bool,
    ) -> Scrape {
        poll_scrape(timeout, what, || self.scrape(), ok)
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        if std::thread::panicking() {
            eprintln!("--- podmeter log ---\n{}", self.log());
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// Calls `scrape` until `ok` holds for what it returns, or panics after
/// `timeout` showing the last scrape.
pub fn poll_scrape(
    timeout: Duration,
    what: &str,
    scrape: impl Fn() -> Scrape,
    ok: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        let s = scrape();
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{}",
            s.text
        );
        sleep(Duration::from_millis(250));
    }
}

/// A parsed `/metrics` body.
pub struct Scrape {
    /// The raw text.
    pub text: String,
    samples: Vec<prometheus_parse::Sample>,
}

impl Scrape {
    /// Parses the Prometheus text format.
    pub fn parse(text: &str) -> Self {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
        Self {
            text: text.to_owned(),
            samples: scrape.samples,
        }
    }

    /// Every sample of `metric` whose labels include all of `labels`.
    pub fn find(
        &self,
        metric: &str,
        labels: &[(&str, &str)],
    ) -> Vec<(HashMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| {
                let v = match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                };
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (labels, v)
            })
            .collect()
    }

    /// The single value of `metric` with `labels`, if present.
    pub fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.find(metric, labels);
        assert!(
            found.len() <= 1,
            "{metric}{labels:?} matches {} series",
            found.len()
        );
        found.first().map(|(_, v)| *v)
    }

    /// The value of a host cgroup's metric.
    pub fn cgroup(&self, metric: &str, path: &str) -> Option<f64> {
        self.value(&format!("podmeter_cgroup_{metric}"), &[("cgroup", path)])
    }
}

/// Program ids of podmeter's BPF programs currently loaded (`bpftool`).
pub fn podmeter_prog_ids() -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("pm_")))
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Calls `ok` every `every` until it returns `Some`; panics naming `what`
/// after `timeout`.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut ok: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = ok() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(every);
    }
}

/// The local Kubernetes cluster (`cargo xtask cluster up`), through kubectl.
pub struct Kube {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Kube {
    /// From `PODMETER_KUBECTL` and `KUBECONFIG`, which `cargo xtask test` sets.
    pub fn from_env() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{k} unset: run the e2e tests with `cargo xtask test`"))
        };
        Self {
            kubectl: var("PODMETER_KUBECTL"),
            kubeconfig: var("KUBECONFIG"),
        }
    }

    /// kubectl with `args`; stdout, or the error output.
    pub fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// kubectl with `args`, panicking on failure.
    pub fn run(&self, args: &[&str]) -> String {
        self.try_run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `kubectl apply -f -` with `yaml`.
    pub fn apply(&self, yaml: &str) {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
        assert!(
            child.wait().unwrap().success(),
            "kubectl apply failed:\n{yaml}"
        );
    }

    /// `kubectl get <what> -o json`.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.run(&a)).unwrap()
    }

    /// Polls `ok` every half second until it returns `Some`, or panics.
    pub fn until<T>(&self, timeout: Duration, what: &str, ok: impl FnMut() -> Option<T>) -> T {
        poll(timeout, Duration::from_millis(500), what, ok)
    }

    /// Waits until pod `ns/name` has `phase`; returns the pod.
    pub fn pod_phase(&self, ns: &str, name: &str, phase: &str) -> serde_json::Value {
        self.until(
            Duration::from_secs(120),
            &format!("pod {ns}/{name} {phase}"),
            || {
                let p = self.json(&["pod", "-n", ns, name]);
                (p["status"]["phase"] == phase).then_some(p)
            },
        )
    }
}

/// A namespace deleted (with everything in it) on drop.
pub struct Namespace<'a> {
    kube: &'a Kube,
    /// Its name.
    pub name: String,
}

impl<'a> Namespace<'a> {
    /// Creates `name`, replacing a leftover one.
    pub fn new(kube: &'a Kube, name: &str) -> Self {
        let _ = kube.try_run(&["delete", "namespace", name, "--wait=true", "--timeout=120s"]);
        kube.run(&["create", "namespace", name]);
        Self {
            kube,
            name: name.to_owned(),
        }
    }
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self.kube.try_run(&[
            "delete",
            "namespace",
            &self.name,
            "--wait=true",
            "--timeout=120s",
            "--grace-period=1",
        ]);
    }
}
