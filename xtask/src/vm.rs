//! `cargo xtask vm-test [KERNEL...]`: the privileged integration tests on
//! the kernels our users' nodes run, each booted in qemu (TCG: no KVM here)
//! from an initramfs that holds podmeter, the test binaries and what they
//! call (aya's way: no disk image, no 9p, which Debian's cloud kernels
//! lack). Inside, the hierarchy is pure cgroup v2 at `/sys/fs/cgroup` with
//! cpu and memory delegated, as on a systemd node, and not the host's
//! hybrid one.
//!
//! Kernels are Debian's cloud kernels (the newest build of each series in
//! its suite), fetched with apt's ordinary client through a private sources
//! list and state directory (the machine's apt configuration is left
//! alone), and cached by package name under
//! `/var/cache/podmeter/kernels/`. A kernel already cached is used without
//! the network.
//!
//! `--arch arm64` boots Debian's arm64 cloud kernels in
//! `qemu-system-aarch64` (TCG; about as fast as x86 TCG here for these tests),
//! with podmeter and the tests cross-built and a Debian arm64 userland
//! (see `arch.rs`) in the initramfs.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    arch::{self, Arch},
    cargo, image, root, setup, sh,
};

mod monitor;

/// Debian cloud kernels by series: the suite that carries them.
const KERNELS: [(&str, &str); 3] = [
    ("5.10", "bullseye-security"),
    ("6.1", "bookworm and bookworm-security"),
    ("6.12", "bookworm-security"),
];

/// Debian's arm64 cloud kernels. bullseye-security lists an arm64 cloud
/// 5.10 too, but the package registry these machines reach answers 404 for
/// its files (signed and unsigned builds alike).
const KERNELS_ARM64: [(&str, &str); 2] = [
    ("6.1", "bookworm and bookworm-security"),
    ("6.12", "bookworm-security"),
];

fn kernels(arch: Arch) -> &'static [(&'static str, &'static str)] {
    match arch {
        Arch::Amd64 => &KERNELS,
        Arch::Arm64 => &KERNELS_ARM64,
    }
}

/// What the VMs need on the host: qemu, the initramfs's shell and tools.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-arm",
    "busybox-static",
    "cpio",
    "iproute2",
    "bpftool",
    "util-linux",
    "nftables",
];

/// Host programs copied into the VM (with their libraries): what the tests
/// call besides busybox.
const PROGRAMS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/bpftool",
    "/usr/bin/setpriv",
    "/usr/bin/prlimit",
    "/usr/bin/unshare",
    "/usr/sbin/nft",
    "/usr/sbin/tc",
];

/// The line a guest prints every [`BEAT_SECONDS`] while a test file runs.
const BEAT: &str = "PM-BEAT";
const BEAT_SECONDS: u64 = 5;
/// A guest that has beaten once and then prints nothing from its user
/// space for this long is frozen (its kernel may still print: see
/// [`is_kernel_line`]). Twelve beats: a live guest's beat is late by
/// scheduling, not by a minute, even with three guests on two host cores.
const FROZEN_AFTER_SECONDS: u64 = 60;

/// Kernel modules the tests load (veth pairs, netem and nftables random
/// loss), in dependency order, under `lib/modules/<release>/kernel/`.
const MODULES: [&str; 6] = [
    "drivers/net/veth",
    "net/sched/sch_netem",
    "lib/libcrc32c",
    "net/netfilter/nfnetlink",
    "net/netfilter/nf_tables",
    "net/netfilter/nft_numgen",
];

/// The test files each VM runs by default: CPU against `cpu.stat`, TCP/UDP
/// over loopback and veth between namespaces, lifecycle and churn, CPU
/// limits, throttling and capabilities, pinning, run-queue waits against
/// schedstat, TCP retransmits under random loss, and OOM kills, memory
/// limits and PSI from cgroup v2 files.
pub const DEFAULT_TESTS: [&str; 8] = [
    "cpu",
    "net",
    "lifecycle",
    "limits",
    "pins",
    "runqueue",
    "retransmits",
    "signals",
];

/// `cargo xtask vm-test`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Kernel series to boot (5.10, 6.1, 6.12; arm64: 6.1, 6.12); all of
    /// them by default.
    pub kernels: Vec<String>,
    /// CPU architecture of the VMs: arm64 cross-builds podmeter and the
    /// tests and runs them in qemu-system-aarch64.
    #[arg(long, value_enum, default_value = Arch::HOST.name())]
    pub arch: Arch,
    /// Test files (tests/tests/<name>.rs) to run in each VM.
    #[arg(
        long,
        value_delimiter = ',',
        default_values = DEFAULT_TESTS
    )]
    pub tests: Vec<String>,
    /// Only tests whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Memory of each VM, in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: u32,
    /// Virtual CPUs of each VM.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// How many VMs run at once. The tests wait more than they compute, so
    /// even on 2 host cores three VMs at once finish well before three in
    /// turn (each file's own timings stretch a little: the table shows).
    #[arg(long, default_value_t = 3)]
    pub jobs: usize,
    /// Give up on a VM after this many minutes.
    #[arg(long, default_value_t = 25)]
    pub timeout_minutes: u64,
    /// Give up on one test file after this many seconds: the guest prints
    /// where each of its tasks is blocked, kills them, and goes on with the
    /// next file.
    #[arg(long, default_value_t = 300)]
    pub file_timeout_seconds: u64,
    /// Crash the guest kernel (sysrq c) right after this test file, to
    /// exercise the crash handling: the second boot runs the files after it.
    #[arg(long, hide = true)]
    pub crash_after: Option<String>,
    /// Silence the guest for good right after this test file (its init
    /// sleeps, so neither its heartbeat nor its watchdog speaks), to
    /// exercise the frozen-guest handling: qemu is killed after 60 s
    /// without a heartbeat and the second boot runs the files after it.
    #[arg(long, hide = true)]
    pub freeze_after: Option<String>,
    /// Stop the guest's tests right after this test file while its kernel
    /// goes on printing (an error line every 10 s, as a soft-locked-up
    /// guest's watchdog does), to exercise that kernel messages alone do
    /// not keep a guest alive: qemu is killed after 60 s without a
    /// heartbeat and the second boot runs the files after it.
    #[arg(long, hide = true)]
    pub lockup_after: Option<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    let known = kernels(opts.arch);
    let mut series: Vec<&str> = if opts.kernels.is_empty() {
        known.iter().map(|(s, _)| *s).collect()
    } else {
        opts.kernels.iter().map(String::as_str).collect()
    };
    // One VM per kernel: two of the same would share their files.
    let mut seen = std::collections::HashSet::new();
    series.retain(|s| seen.insert(*s));
    for s in &series {
        if !known.iter().any(|(k, _)| k == s) {
            let names: Vec<&str> = known.iter().map(|(k, _)| *k).collect();
            bail!(
                "no {} kernel series {s:?}; there are: {}",
                opts.arch.name(),
                names.join(", ")
            );
        }
    }
    setup::apt(PACKAGES)?;
    let payload = Payload::build(&opts.tests, opts.arch)?;
    // Fetched one at a time (apt's lock), as is another architecture's
    // userland (one directory for all its VMs), then booted up to `jobs`
    // at once.
    if opts.arch != Arch::HOST {
        arch::userland(opts.arch)?;
    }
    let kernels = series
        .iter()
        .map(|s| fetch_kernel(s, opts.arch))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let jobs = opts.jobs.clamp(1, kernels.len().max(1));
    let next = AtomicUsize::new(0);
    let (done, results) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let (next, done, kernels, payload) = (&next, done.clone(), &kernels, &payload);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(kernel) = kernels.get(i) else { break };
                    let outcome = run_kernel(kernel, payload, opts)
                        .with_context(|| format!("kernel {}", kernel.release));
                    if done.send((i, outcome)).is_err() {
                        break;
                    }
                }
            });
        }
    });
    drop(done);
    let mut outcomes: Vec<(usize, Result<Outcome>)> = results.into_iter().collect();
    outcomes.sort_by_key(|(i, _)| *i);
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let mut errors = Vec::new();
    for ((_, outcome), kernel) in outcomes.into_iter().zip(kernels) {
        match outcome {
            Ok(o) => {
                if !o.passed() {
                    failed.push(kernel.release.clone());
                }
                rows.push((kernel, o));
            }
            // The other kernels' results are still worth the table.
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    eprint!("{}", table(&rows));
    eprintln!(
        "vm-test: {} kernel(s), up to {} at once, in {:.0} s",
        rows.len() + errors.len(),
        jobs,
        started.elapsed().as_secs_f64()
    );
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    if !failed.is_empty() {
        bail!("tests failed on {} (logs in target/vm/)", failed.join(", "));
    }
    Ok(())
}

/// One kernel's boot, and a second one for the files a guest crash or
/// freeze kept from finishing.
fn run_kernel(kernel: &Kernel, payload: &Payload, opts: &Options) -> Result<Outcome> {
    let vm_dir = crate::cmd::target_dir().join("vm");
    let freeze_log = vm_dir.join(format!("{}.freeze.log", kernel.release));
    let _ = fs::remove_file(&freeze_log);
    let mut outcome = boot(kernel, payload, opts)?;
    // The guest kernel itself crashing (seen on 6.12: int3 traps in
    // enqueue_entity and, twice, __schedule while a static key was being
    // patched, a hazard of qemu's multi-threaded TCG with self-modifying
    // kernel text) or freezing whole (seen twice on 5.10) is taken for
    // the emulator's, not a test's: boot again, once, for the files not
    // finished, and say so. A test or agent that hangs in a live guest
    // is the in-guest watchdog's HUNG, which fails and is not retried.
    if let Some(oops) = outcome.guest_crash.clone() {
        // The second boot writes the console log again: keep the crash's.
        let dir = crate::cmd::target_dir().join("vm");
        let crash_log = dir.join(format!("{}.crash.log", kernel.release));
        let _ = fs::rename(dir.join(format!("{}.log", kernel.release)), &crash_log);
        eprintln!(
            "vm: {}: the guest kernel failed ({oops}; console in {}); booting it again, once",
            kernel.release,
            crash_log.display()
        );
        // The oops and its call trace, for CI's log: what was running.
        let console = fs::read_to_string(&crash_log).unwrap_or_default();
        let from = console
            .lines()
            .position(|l| l.contains("Oops:") || l.contains("Internal error:"));
        for l in console.lines().skip(from.unwrap_or(usize::MAX)).take(45) {
            eprintln!("vm: {}: | {}", kernel.release, l.trim_end());
        }
        // Only the files the crash kept from finishing: the ones done
        // stand (their results are in the table already).
        let done: Vec<&str> = outcome.files.iter().map(|f| f.name.as_str()).collect();
        let rest = payload.without(&done);
        let mut again = boot(kernel, &rest, opts)?;
        let mut files = std::mem::take(&mut outcome.files);
        files.append(&mut again.files);
        again.files = files;
        again.cpu_error_pct = match (outcome.cpu_error_pct, again.cpu_error_pct) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        again.secs += outcome.secs;
        again.longest_beat_gap = again.longest_beat_gap.max(outcome.longest_beat_gap);
        // A freeze's instruction pointers, named from the second boot's
        // symbols (the same addresses: nokaslr).
        if let (Ok(diagnosis), Ok(kallsyms)) = (
            fs::read_to_string(&freeze_log),
            fs::read_to_string(vm_dir.join(format!("{}.kallsyms", kernel.release))),
        ) {
            let named = monitor::named(&diagnosis, &kallsyms);
            for l in &named {
                eprintln!("vm: {}: frozen: {l}", kernel.release);
            }
            fs::write(&freeze_log, format!("{}\n{diagnosis}", named.join("\n")))?;
        }
        again.crashed_before = Some(oops);
        outcome = again;
    }
    Ok(outcome)
}

/// A kernel unpacked from its Debian package.
pub struct Kernel {
    /// `uname -r`, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// The Debian package version, e.g. `6.1.192-3`.
    pub version: String,
    pub arch: Arch,
    dir: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.dir.join(format!("boot/vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.dir.join(format!("lib/modules/{}", self.release))
    }
}

/// apt with a private sources list, state and architecture, under the
/// kernel cache.
fn apt_private(tool: &str, arch: Arch) -> Result<Command> {
    let dir = setup::cache_dir().join(match arch {
        // amd64's lists are where they always were.
        Arch::Amd64 => "kernels/apt".to_owned(),
        a => format!("kernels/apt-{}", a.name()),
    });
    arch::apt_private(tool, &dir, arch)
}

/// The newest cloud kernel of `series`, from the cache or Debian.
fn fetch_kernel(series: &str, arch: Arch) -> Result<Kernel> {
    let cache = setup::cache_dir().join("kernels");
    fs::create_dir_all(&cache)?;
    let prefix = format!("linux-image-{series}");
    let suffix = format!("-cloud-{}", arch.name());
    let cached = |cache: &Path| -> Option<Kernel> {
        let mut found: Vec<PathBuf> = fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("version").exists())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    (n.starts_with(&format!("{prefix}.")) || n.starts_with(&format!("{prefix}-")))
                        && n.ends_with(&suffix)
                })
            })
            .collect();
        found.sort_by_key(|p| version_key(&p.file_name().unwrap_or_default().to_string_lossy()));
        let dir = found.pop()?;
        let release = dir
            .file_name()?
            .to_str()?
            .strip_prefix("linux-image-")?
            .to_owned();
        let version = fs::read_to_string(dir.join("version"))
            .ok()?
            .trim()
            .to_owned();
        Some(Kernel {
            release,
            version,
            arch,
            dir,
        })
    };
    if let Some(k) = cached(&cache) {
        return Ok(k);
    }
    let suite = kernels(arch)
        .iter()
        .find(|(s, _)| *s == series)
        .map_or("?", |(_, suite)| suite);
    eprintln!(
        "vm: fetching Debian's newest {series} {} cloud kernel from {suite} (once; cached under {})",
        arch.name(),
        cache.display()
    );
    sh(apt_private("apt-get", arch)?.args(["update", "-qq"]))?;
    let out = apt_private("apt-cache", arch)?
        .args(["search", "--names-only"])
        .arg(format!(
            "^linux-image-{}[.-].*cloud-{}$",
            regex_escape(series),
            arch.name()
        ))
        .output()
        .context("apt-cache search")?;
    let mut packages: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| !p.contains("-dbg") && !p.contains("unsigned"))
        // Only packages named by an ABI (`-57-`, `+deb12-`), not metas.
        .filter(|p| {
            p.chars()
                .nth(prefix.len() + 1)
                .is_some_and(|c| c.is_ascii_digit())
        })
        .map(str::to_owned)
        .collect();
    packages.sort_by_key(|p| version_key(p));
    let package = packages.pop().with_context(|| {
        format!(
            "no {} cloud kernel of series {series} in Debian's lists",
            arch.name()
        )
    })?;
    let dl = cache.join("downloads");
    fs::create_dir_all(&dl)?;
    sh(apt_private("apt-get", arch)?
        .arg("download")
        .arg(&package)
        .current_dir(&dl))?;
    let deb = fs::read_dir(&dl)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let version = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('_').nth(1))
        .unwrap_or("?")
        .to_owned();
    let dir = cache.join(&package);
    let partial = cache.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::write(partial.join("version"), &version)?;
    fs::rename(&partial, &dir)?;
    fs::remove_file(&deb)?;
    cached(&cache).context("the kernel just unpacked is not found in the cache")
}

/// Orders `linux-image-6.1.0-57-cloud-amd64` after `...-6.1.0-9-...`.
fn version_key(package: &str) -> Vec<u64> {
    package
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}

/// What goes into every VM: the agent, the test binaries, `pm-work`.
struct Payload {
    arch: Arch,
    podmeter: PathBuf,
    pm_work: PathBuf,
    /// `(file name, path)` of each test binary, in the order asked.
    tests: Vec<(String, PathBuf)>,
    /// Print the kernel's text symbols first (`PM-SYM` lines): the boot
    /// after a freeze, whose addresses are the frozen one's.
    symbols: bool,
}

impl Payload {
    /// The same payload but for the test files named in `done`.
    fn without(&self, done: &[&str]) -> Self {
        Payload {
            arch: self.arch,
            podmeter: self.podmeter.clone(),
            pm_work: self.pm_work.clone(),
            tests: self
                .tests
                .iter()
                .filter(|(n, _)| !done.contains(&n.as_str()))
                .cloned()
                .collect(),
            symbols: true,
        }
    }

    fn build(tests: &[String], arch: Arch) -> Result<Self> {
        crate::build::agent_for(arch)?;
        image::build_pm_work_for(arch)?;
        let mut test = cargo();
        test.args([
            "test",
            "--release",
            "--package",
            "podmeter-tests",
            "--no-run",
            "--message-format=json",
        ]);
        arch.cargo_args(&mut test)?;
        let out = test
            .args(tests.iter().flat_map(|t| ["--test", t.as_str()]))
            .current_dir(root())
            .stderr(Stdio::inherit())
            .output()
            .context("building the test binaries")?;
        if !out.status.success() {
            bail!("building the test binaries failed");
        }
        let mut found = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(name), Some(exe)) =
                (msg["target"]["name"].as_str(), msg["executable"].as_str())
            else {
                continue;
            };
            if msg["target"]["kind"][0] == "test" {
                found.push((name.to_owned(), PathBuf::from(exe)));
            }
        }
        let mut ordered = Vec::new();
        for t in tests {
            let f = found
                .iter()
                .find(|(n, _)| n == t)
                .with_context(|| format!("no test file tests/tests/{t}.rs"))?;
            ordered.push(f.clone());
        }
        let release = arch.release_dir();
        Ok(Self {
            arch,
            podmeter: release.join("podmeter"),
            pm_work: release.join("pm-work"),
            tests: ordered,
            symbols: false,
        })
    }
}

/// The result of one VM: each test file's exit code and counts.
struct Outcome {
    files: Vec<FileResult>,
    /// The largest error of podmeter's CPU seconds against `cpu.stat` that
    /// the CPU test printed, in percent.
    cpu_error_pct: Option<f64>,
    secs: f64,
    /// Set when the VM did not report every file (a crash, a timeout).
    incomplete: Option<String>,
    /// podmeter's exit code and error line on the v1-only boot.
    v1_only: Option<(i32, String)>,
    /// The guest kernel's oops line and where, when it crashed.
    guest_crash: Option<String>,
    /// The crash of a first boot that this one repeated.
    crashed_before: Option<String>,
    /// The longest time between two of the guest's heartbeats, in seconds.
    longest_beat_gap: f64,
}

struct FileResult {
    name: String,
    /// Killed by the guest's per-file timeout.
    hung: bool,
    code: i32,
    passed: u32,
    failed: u32,
    secs: f64,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.incomplete.is_none()
            && self.files.iter().all(|f| f.code == 0)
            && self.v1_only.as_ref().is_some_and(v1_refused)
    }
}

/// Boots `kernel` with the payload and runs the tests; the serial console
/// goes to `target/vm/<release>.log`.
fn boot(kernel: &Kernel, payload: &Payload, opts: &Options) -> Result<Outcome> {
    let work = crate::cmd::target_dir().join("vm");
    let stage = work.join(format!("root-{}", kernel.release));
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;
    stage_root(&stage, kernel, payload, opts)?;
    let initrd = work.join(format!("initrd-{}.cpio", kernel.release));
    pack(&stage, &initrd)?;
    let log_path = work.join(format!("{}.log", kernel.release));
    eprintln!(
        "vm: booting {} ({}) with {} (console: {})",
        kernel.release,
        kernel.version,
        payload
            .tests
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        log_path.display()
    );
    // qemu's monitor, for the registers of a guest that freezes; in the
    // temporary directory, as a socket path must be short.
    let monitor = std::env::temp_dir().join(format!(
        "podmeter-vm-{}-{}.monitor",
        std::process::id(),
        kernel.release
    ));
    let _ = fs::remove_file(&monitor);
    let freeze_log = work.join(format!("{}.freeze.log", kernel.release));
    let started = Instant::now();
    // x86 guests run their vCPUs on one host thread (`thread=single`):
    // with a thread each (qemu's default), a vCPU may run code another has
    // just patched (the kernel patches its text with int3 traps whenever a
    // tracepoint is attached or detached) from a stale translation, and the
    // guest kernel traps on an int3 that is no longer there (6.12: an
    // oops in `__schedule` as podmeter detached) or locks up (6.1: a
    // soft lockup in podmeter's detach, its tests stopped for good).
    let (qemu, machine, cpu, console, accel) = match kernel.arch {
        Arch::Amd64 => (
            "qemu-system-x86_64",
            "q35",
            "max",
            "ttyS0",
            "tcg,thread=single",
        ),
        // `max` with the architected pointer authentication is several
        // times slower under TCG; the implementation-defined one is not.
        Arch::Arm64 => (
            "qemu-system-aarch64",
            "virt",
            "max,pauth-impdef=on",
            "ttyAMA0",
            "tcg",
        ),
    };
    // Made before qemu starts: nothing between its start and its end
    // returns early, so no qemu outlives its run (the next kernel's runs on
    // this thread).
    let mut log = fs::File::create(&log_path)?;
    let mut child = crate::cmd::dies_with_xtask(&mut Command::new(qemu))
        .args(["-machine", machine, "-accel", accel, "-cpu", cpu])
        .args(["-nographic", "-no-reboot"])
        .args(["-m", &opts.memory_mib.to_string()])
        .args(["-smp", &opts.cpus.to_string()])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(&initrd)
        // nokaslr: a later boot's /proc/kallsyms names a frozen guest's
        // instruction pointers.
        .args([
            "-append",
            &format!("console={console} panic=-1 quiet nokaslr"),
        ])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {qemu}"))?;
    let stdout = child.stdout.take().expect("piped");
    let deadline = Duration::from_secs(opts.timeout_minutes * 60);
    // A guest that has stopped running its user space is frozen: seen on
    // 5.10, both vCPUs spinning in the guest kernel with nothing on the
    // console, never reaching the in-guest watchdog. While a file runs, the
    // guest prints a heartbeat every BEAT_SECONDS, so a live guest is never
    // this quiet, however long a test is silent; before the first beat
    // (the kernel's boot, `quiet`), only the in-guest watchdog's bound says
    // anything.
    let silence = |beating: bool| {
        Duration::from_secs(if beating {
            FROZEN_AFTER_SECONDS
        } else {
            opts.file_timeout_seconds + 120
        })
    };
    let start = Instant::now();
    // Milliseconds from `start` to the last line the guest's user space
    // printed (a beat, a test's output). Kernel messages do not count: a
    // guest whose user space has stopped may go on printing them (6.1
    // under TCG: a soft lockup reported every 28 s for 25 minutes, until
    // the overall deadline), and they are no sign that its tests still run.
    let last_life = Arc::new(AtomicU64::new(0));
    let beating = Arc::new(AtomicBool::new(false));
    let froze = Arc::new(AtomicBool::new(false));
    let exited = Arc::new(AtomicBool::new(false));
    // qemu's own timer: kill it when the deadline passes, whatever it
    // prints, or when the guest has been silent for `silence`.
    let pid = child.id();
    let watchdog = {
        let (last_life, froze, exited) = (last_life.clone(), froze.clone(), exited.clone());
        let (monitor, freeze_log) = (monitor.clone(), freeze_log.clone());
        let release = kernel.release.clone();
        let beating = beating.clone();
        let (early, late) = (silence(false), silence(true));
        std::thread::spawn(move || {
            while start.elapsed() < deadline {
                std::thread::sleep(Duration::from_secs(1));
                if exited.load(Ordering::Relaxed) || !Path::new(&format!("/proc/{pid}")).exists() {
                    return;
                }
                let silence = if beating.load(Ordering::Relaxed) {
                    late
                } else {
                    early
                };
                // Saturating: the reader may store a line's time just after
                // this thread read the clock.
                let quiet = start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last_life.load(Ordering::Relaxed)));
                if quiet > silence {
                    froze.store(true, Ordering::Relaxed);
                    let diagnosis = monitor::diagnose(&monitor);
                    for line in diagnosis.lines().take_while(|l| !l.is_empty()) {
                        eprintln!("vm: {release}: frozen: {line}");
                    }
                    if let Err(e) = fs::write(&freeze_log, diagnosis) {
                        eprintln!("vm: {release}: writing {}: {e}", freeze_log.display());
                    }
                    break;
                }
            }
            if !exited.load(Ordering::Relaxed) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        })
    };
    let mut log_error = None;
    let mut files = Vec::new();
    let mut current: Option<(String, u32, u32)> = None;
    let mut cpu_error_pct: Option<f64> = None;
    let mut v1_only = None;
    let mut oops: Option<String> = None;
    let mut guest_crash = None;
    let mut hung = Vec::new();
    let mut kallsyms = String::new();
    // What came before a heartbeat on its line: the beat's one write may
    // fall between two of a test's (`test x ... ` and `ok`), and the line
    // is whole again once the beat is taken out.
    let mut before_beat = String::new();
    let (mut last_beat, mut longest_beat_gap) = (None::<Instant>, 0.0_f64);
    // Between a file's PM-HUNG and the next PM-START: beats the guest
    // printed before its watchdog killed them must not bring back the
    // short bound while the killed tasks die, or a slow death would pass
    // for a frozen guest and the hung file would be run again.
    let mut hung_file = false;
    for line in BufReader::new(stdout).lines() {
        let now = start.elapsed().as_millis() as u64;
        let Some(line) = without_beat(line.unwrap_or_default(), &mut before_beat) else {
            last_life.store(now, Ordering::Relaxed);
            if !hung_file {
                beating.store(true, Ordering::Relaxed);
            }
            // How late a live guest's beat gets: the margin the frozen
            // bound has, in the table.
            if let Some(last) = last_beat.replace(Instant::now()) {
                longest_beat_gap = longest_beat_gap.max(last.elapsed().as_secs_f64());
            }
            continue;
        };
        let clean = line.trim();
        if !is_kernel_line(clean) {
            last_life.store(now, Ordering::Relaxed);
        }
        if let Some(sym) = clean.strip_prefix("PM-SYM ") {
            kallsyms.push_str(sym);
            kallsyms.push('\n');
            continue;
        }
        if let Err(e) = writeln!(log, "{line}") {
            log_error.get_or_insert(e);
        }
        // `[   66.6] Oops: int3: ...`, then `RIP: 0010:enqueue_entity+0x127/0x520`
        // (arm64: `Internal error: ...`, then `pc : enqueue_entity+0x...`).
        let kmsg = clean.split_once("] ").map_or(clean, |(_, m)| m);
        if kmsg.starts_with("Oops:")
            || kmsg.starts_with("BUG:")
            || kmsg.starts_with("Internal error:")
        {
            oops.get_or_insert_with(|| kmsg.to_owned());
        } else if let Some(at) = kmsg.strip_prefix("RIP: ").or(kmsg.strip_prefix("pc : "))
            && let Some(o) = oops.as_mut()
            && !o.contains(" at ")
        {
            o.push_str(&format!(" at {at}"));
        } else if kmsg.starts_with("Kernel panic") {
            guest_crash = Some(oops.clone().unwrap_or_else(|| kmsg.to_owned()));
        }
        if let Some(e) = cpu_error(clean) {
            cpu_error_pct = Some(cpu_error_pct.map_or(e, |m: f64| m.max(e)));
        }
        if let Some(rest) = clean.strip_prefix("PM-V1ONLY ") {
            let (code, line) = rest.split_once(' ').unwrap_or((rest, ""));
            v1_only = Some((code.parse().unwrap_or(-1), line.to_owned()));
        }
        if let Some(rest) = clean.strip_prefix("PM-HUNG ") {
            // The in-guest watchdog kills everything, the beat too, and a
            // hung task may take long to die: that is a HUNG file, not a
            // frozen guest, so the long bound holds until the next beat.
            beating.store(false, Ordering::Relaxed);
            hung_file = true;
            last_beat = None;
            eprintln!(
                "vm: {}: {rest} s without finishing: where each task was blocked, then all killed",
                kernel.release
            );
            hung.push(rest.split_whitespace().next().unwrap_or("?").to_owned());
        } else if clean.starts_with("PM-DIAG ") {
            eprintln!("vm: {}: {clean}", kernel.release);
        }
        if let Some(rest) = clean.strip_prefix("PM-START ") {
            hung_file = false;
            eprintln!("vm: {}: {rest} ...", kernel.release);
            current = Some((rest.to_owned(), 0, 0));
        } else if let Some(rest) = clean.strip_prefix("test result: ") {
            if let Some((_, passed, failed)) = current.as_mut() {
                *passed += count(rest, "passed");
                *failed += count(rest, "failed");
            }
        } else if clean.starts_with("test ") && clean.ends_with("FAILED") {
            eprintln!("vm: {}: {clean}", kernel.release);
        } else if let Some(rest) = clean.strip_prefix("PM-END ") {
            // The next file's beat starts afresh: the gap between files is
            // not a late beat.
            last_beat = None;
            let mut it = rest.split_whitespace();
            let (name, code, secs) = (
                it.next().unwrap_or("?").to_owned(),
                it.next().and_then(|c| c.parse().ok()).unwrap_or(-1),
                it.next().and_then(|c| c.parse().ok()).unwrap_or(0.0),
            );
            let (passed, failed) = current.take().map_or((0, 0), |(_, p, f)| (p, f));
            eprintln!(
                "vm: {}: {name}: {passed} passed, {failed} failed, exit {code}, {secs:.0} s",
                kernel.release
            );
            files.push(FileResult {
                hung: hung.contains(&name),
                name,
                code,
                passed,
                failed,
                secs,
            });
        }
    }
    // A line a beat cut and nothing completed (qemu killed mid-test): the
    // running test's name, for the log and the freeze's message.
    let cut = before_beat.trim().to_owned();
    if !cut.is_empty()
        && let Err(e) = writeln!(log, "{cut}")
    {
        log_error.get_or_insert(e);
    }
    let status = child.wait();
    // Reaped: its pid may be another process's from now on.
    exited.store(true, Ordering::Relaxed);
    let status = status?;
    let _ = watchdog.join();
    if let Some(e) = log_error {
        return Err(e).with_context(|| format!("writing {}", log_path.display()));
    }
    let _ = fs::remove_file(&monitor);
    if !kallsyms.is_empty() {
        fs::write(work.join(format!("{}.kallsyms", kernel.release)), &kallsyms)?;
    }
    if froze.load(Ordering::Relaxed)
        && guest_crash.is_none()
        && hung_file
        && let Some((name, passed, failed)) = current.take()
    {
        // The hung file's tasks never died after its watchdog killed them
        // (one stuck in the kernel): a hang, which fails, and which a
        // second boot must not run again and hide.
        files.push(FileResult {
            hung: true,
            name,
            code: -1,
            passed,
            failed,
            secs: 0.0,
        });
    } else if froze.load(Ordering::Relaxed) && guest_crash.is_none() {
        let silence = silence(beating.load(Ordering::Relaxed));
        let when = match (&current, files.last()) {
            (Some((name, _, _)), _) if !cut.is_empty() => format!("during {name} ({cut})"),
            (Some((name, _, _)), _) => format!("during {name}"),
            (None, Some(f)) => format!("after {}", f.name),
            (None, None) => "before the first file".to_owned(),
        };
        guest_crash = Some(format!(
            "the guest froze: no heartbeat or other output from its user space for {} s {when}, \
             qemu killed (its vCPUs' registers: {})",
            silence.as_secs(),
            freeze_log.display()
        ));
    }
    let secs = started.elapsed().as_secs_f64();
    let incomplete = if files.len() < payload.tests.len() {
        Some(if secs >= deadline.as_secs_f64() {
            format!("timed out after {} min", opts.timeout_minutes)
        } else {
            format!(
                "the VM stopped ({status}) after {} of {} test files",
                files.len(),
                payload.tests.len()
            )
        })
    } else {
        None
    };
    Ok(Outcome {
        files,
        v1_only,
        cpu_error_pct,
        secs,
        incomplete: incomplete.filter(|_| guest_crash.is_none()).or(guest_crash
            .as_ref()
            .map(|c| format!("the guest kernel crashed: {c}"))),
        guest_crash,
        crashed_before: None,
        longest_beat_gap,
    })
}

/// Whether podmeter refused the v1-only boot as it should: exit 1 and one
/// line that says cgroup v2 is needed.
fn v1_refused((code, line): &(i32, String)) -> bool {
    *code == 1 && line.contains("no cgroup2 filesystem is mounted")
}

/// `E` from the CPU test's `cgroup N: podmeter ... cpu.stat ... error E %`.
fn cpu_error(line: &str) -> Option<f64> {
    if !line.contains("cpu.stat") {
        return None;
    }
    line.split("error ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `N` from `... N passed; ...`.
fn count(summary: &str, what: &str) -> u32 {
    summary
        .split(';')
        .find_map(|part| {
            let mut it = part.split_whitespace();
            let n = it.find_map(|w| w.parse::<u32>().ok())?;
            it.next().filter(|w| *w == what).map(|_| n)
        })
        .unwrap_or(0)
}

/// Fills the initramfs tree: busybox, the host programs and their
/// libraries, veth, the payload (stripped of debug info, or the initramfs
/// would hold ~1 GB of it) and `/init`.
fn stage_root(stage: &Path, kernel: &Kernel, payload: &Payload, opts: &Options) -> Result<()> {
    let mut libs = std::collections::BTreeSet::new();
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "pm/t/deps",
        "etc",
    ] {
        fs::create_dir_all(stage.join(d))?;
    }
    // The host's userland, or a Debian userland of the VM's architecture:
    // where programs come from, and how their libraries are found.
    let userland = match payload.arch {
        Arch::HOST => None,
        a => Some(arch::userland(a)?),
    };
    let program = |name: &str, host: &str| -> Result<PathBuf> {
        match &userland {
            None => Ok(PathBuf::from(host)),
            Some(root) => arch::find_program(root, name),
        }
    };
    let mut add_libs = |binary: &Path| -> Result<()> {
        match &userland {
            None => libs.extend(image::shared_libs(binary)?),
            Some(root) => libs.extend(
                arch::shared_libs(binary, root)?
                    .into_iter()
                    .map(|rel| PathBuf::from("/").join(rel)),
            ),
        }
        Ok(())
    };
    fs::copy(
        program("busybox", "/bin/busybox")?,
        stage.join("bin/busybox"),
    )
    .context("copying busybox")?;
    // A real /bin/sh for the tests' `sh -c`: Debian's static busybox runs
    // its own applets first (its `unshare` lacks --cgroup).
    let dash = program("dash", "/bin/dash")?;
    fs::copy(&dash, stage.join("bin/sh")).context("copying dash")?;
    add_libs(&dash)?;
    for applet in [
        "mount", "umount", "mkdir", "cat", "echo", "poweroff", "insmod", "sleep", "kill",
        "taskset", "date", "ls", "uname", "grep", "rm", "ln", "dmesg", "awk",
    ] {
        std::os::unix::fs::symlink("busybox", stage.join("bin").join(applet))?;
    }
    for host in PROGRAMS {
        let name = Path::new(host)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(host);
        let from = program(name, host)?;
        let dest = stage.join(host.trim_start_matches('/'));
        fs::copy(&from, &dest).with_context(|| format!("copying {}", from.display()))?;
        add_libs(&from)?;
    }
    let strip = |from: &Path, to: &Path| -> Result<()> {
        sh(Command::new(payload.arch.strip())
            .arg("--strip-debug")
            .arg("-o")
            .arg(to)
            .arg(from))
    };
    strip(&payload.podmeter, &stage.join("pm/podmeter"))?;
    strip(&payload.pm_work, &stage.join("pm/t/pm-work"))?;
    add_libs(&payload.podmeter)?;
    add_libs(&payload.pm_work)?;
    for (name, exe) in &payload.tests {
        strip(exe, &stage.join("pm/t/deps").join(name))?;
        add_libs(exe)?;
    }
    for lib in libs {
        let from = match &userland {
            None => lib.clone(),
            Some(root) => root.join(lib.strip_prefix("/").unwrap_or(&lib)),
        };
        let dest = stage.join(lib.to_string_lossy().trim_start_matches('/'));
        fs::create_dir_all(dest.parent().expect("a library has a directory"))?;
        fs::copy(&from, &dest).with_context(|| format!("copying {}", from.display()))?;
    }
    // Modules the tests need, in load order (`/init` loads what is there).
    for (i, rel) in MODULES.iter().enumerate() {
        let module = kernel.modules().join(format!("kernel/{rel}.ko"));
        let xz = module.with_extension("ko.xz");
        let dest = stage.join(format!("m{i}.ko"));
        if module.exists() {
            fs::copy(&module, dest)?;
        } else if xz.exists() {
            let out = Command::new("xz").arg("-dc").arg(&xz).output()?;
            fs::write(dest, out.stdout)?;
        }
    }
    let filter = opts.filter.clone().unwrap_or_default();
    let mut init = String::from(INIT_HEAD);
    let _ = writeln!(init, "PM_FILE_TIMEOUT={}", opts.file_timeout_seconds);
    let _ = writeln!(init, "PM_BEAT_SECONDS={BEAT_SECONDS}");
    if payload.symbols {
        init.push_str(
            "awk '$2 ~ /^[tT]$/ { print \"PM-SYM \" $1 \" \" $2 \" \" $3 }' /proc/kallsyms\n",
        );
    }
    for (name, _) in &payload.tests {
        let _ = writeln!(
            init,
            "run_tests {name} {}",
            if filter.is_empty() {
                "''".to_owned()
            } else {
                format!("'{}'", filter.replace('\'', ""))
            }
        );
        if opts.crash_after.as_deref() == Some(name) {
            init.push_str("echo c > /proc/sysrq-trigger\n");
        }
        if opts.freeze_after.as_deref() == Some(name) {
            init.push_str("exec sleep 100000\n");
        }
        if opts.lockup_after.as_deref() == Some(name) {
            // `<3>`: an error, which the `quiet` console still shows.
            init.push_str(
                "while :; do echo '<3>vm-test: --lockup-after' > /dev/kmsg; sleep 10; done\n",
            );
        }
    }
    init.push_str(V1_ONLY);
    init.push_str("echo PM-DONE\npoweroff -f\n");
    let path = stage.join("init");
    fs::write(&path, init)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The VM's `/init`: mounts, a pure cgroup v2 hierarchy with cpu, memory
/// and pids delegated, loopback and veth, then one `run_tests` per file.
const INIT_HEAD: &str = r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /var && ln -s /run /var/run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
# As containerd's service unit does (LimitMEMLOCK=infinity): kernels before
# 5.11 charge BPF maps to it (one test lowers it again on purpose).
ulimit -l unlimited
ip link set lo up
for m in /m*.ko; do [ -f "$m" ] && insmod "$m"; done
echo "PM-KERNEL $(uname -r) controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
export PODMETER_BIN=/pm/podmeter RUST_BACKTRACE=1 HOME=/tmp
# What every task is blocked on, for a file that hangs: the console is all
# the host sees of the guest.
diagnose() {
    echo "PM-DIAG begin"
    for t in /proc/[0-9]*/task/[0-9]*; do
        # User-space tasks only: kernel threads have no executable.
        [ -e "${t%/task/*}/exe" ] || continue
        stat=$(cat "$t/stat" 2>/dev/null) || continue
        state=${stat##*) }
        echo "PM-DIAG task ${t#/proc/} ($(cat "$t/comm" 2>/dev/null)) ${state%% *} wchan=$(cat "$t/wchan" 2>/dev/null)"
        sed 's/^/PM-DIAG   /' "$t/stack" 2>/dev/null
    done
    dmesg | tail -n 20 | sed 's/^/PM-DIAG dmesg /'
    echo "PM-DIAG end"
}
# One file at a time, each given PM_FILE_TIMEOUT seconds: a hang then costs
# one file, says where every task was blocked, and the rest still run.
run_tests() {
    echo "PM-START $1"
    start=$(cat /proc/uptime)
    # The host's sign that this guest still runs its user space, however
    # long a test is silent: it takes a guest quiet for a minute for frozen.
    ( while :; do echo PM-BEAT; sleep "$PM_BEAT_SECONDS"; done ) &
    beat=$!
    /pm/t/deps/$1 --test-threads=1 --nocapture $2 &
    pid=$!
    (
        sleep "$PM_FILE_TIMEOUT"
        if kill -0 "$pid" 2>/dev/null; then
            # On a line of its own, whatever the test was printing.
            echo
            echo "PM-HUNG $1 $PM_FILE_TIMEOUT"
            diagnose
            # Everything but init (PID 1) and this shell: the test binary
            # and whatever agents and workloads it left.
            kill -9 -1
        fi
    ) &
    watchdog=$!
    wait "$pid"
    code=$?
    kill "$watchdog" "$beat" 2>/dev/null
    end=$(cat /proc/uptime)
    echo "PM-END $1 $code $(echo "${start%% *} ${end%% *}" | awk '{ printf "%.0f", $2 - $1 }')"
}
"#;

/// After the tests, the same kernel as a v1-only node: cgroup2 unmounted
/// (its controllers handed back first) and the cpu and memory controllers
/// mounted as v1 hierarchies. podmeter must refuse with one line.
const V1_ONLY: &str = r#"echo "-cpu -memory -pids" > /sys/fs/cgroup/cgroup.subtree_control
umount /sys/fs/cgroup
mount -t tmpfs cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/cpu,cpuacct /sys/fs/cgroup/memory
mount -t cgroup -o cpu,cpuacct cgroup /sys/fs/cgroup/cpu,cpuacct
mount -t cgroup -o memory cgroup /sys/fs/cgroup/memory
# Beating, as during a file; a podmeter that does not refuse is stopped
# after 60 s (exit 137, which fails the check) rather than left running.
( while :; do echo PM-BEAT; sleep "$PM_BEAT_SECONDS"; done ) &
beat=$!
/pm/podmeter --no-kubernetes --listen 127.0.0.1:9740 >/dev/null 2>/tmp/v1.err &
pm=$!
( sleep 60; kill -9 "$pm" 2>/dev/null ) &
stop=$!
wait "$pm"
code=$?
kill "$stop" "$beat" 2>/dev/null
echo "PM-V1ONLY $code $(grep -m1 'podmeter: error' /tmp/v1.err)"
"#;

/// `cpio -o -H newc` of the tree (uncompressed: faster to make and to boot
/// under TCG than gzip).
fn pack(stage: &Path, out: &Path) -> Result<()> {
    let files = Command::new("find")
        .arg(".")
        .current_dir(stage)
        .output()
        .context("find")?;
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(stage)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out)?)
        .spawn()
        .context("cpio")?;
    cpio.stdin.take().expect("piped").write_all(&files.stdout)?;
    let st = cpio.wait()?;
    if !st.success() {
        bail!("cpio failed: {st}");
    }
    Ok(())
}

/// Whether a console line is a kernel message (`[ 318.759643] rcu: ...`),
/// which the kernel prints even when user space no longer runs.
fn is_kernel_line(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim_start();
            !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
}

/// A console line with the heartbeat taken out: `None` for a line that
/// ended in one (what came before it is kept in `before_beat`), else the
/// line with whatever a beat had cut off in front of it.
fn without_beat(mut line: String, before_beat: &mut String) -> Option<String> {
    if let Some(before) = line.trim_end().strip_suffix(BEAT) {
        before_beat.push_str(before);
        return None;
    }
    line.insert_str(0, &std::mem::take(before_beat));
    Some(line)
}

/// One row per kernel and test file.
fn table(rows: &[(Kernel, Outcome)]) -> String {
    let mut out = String::from("\nvm-test results (qemu TCG, pure cgroup v2):\n");
    let _ = writeln!(
        out,
        "  {:<24} {:<14} {:<10} {:>6} {:>6} {:>7}",
        "kernel", "package", "tests", "passed", "failed", "seconds"
    );
    for (k, o) in rows {
        for f in &o.files {
            let _ = writeln!(
                out,
                "  {:<24} {:<14} {:<10} {:>6} {:>6} {:>7.0}{}",
                k.release,
                k.version,
                f.name,
                f.passed,
                f.failed,
                f.secs,
                match (f.code, f.hung) {
                    (_, true) => "  HUNG (killed)",
                    (0, _) => "",
                    _ => "  FAILED",
                }
            );
        }
        if let Some(why) = &o.incomplete {
            let _ = writeln!(
                out,
                "  {:<24} {:<14} INCOMPLETE: {why}",
                k.release, k.version
            );
        }
        let v1 = match &o.v1_only {
            Some(r) if v1_refused(r) => "refused with one line".to_owned(),
            Some((code, line)) => format!("NOT REFUSED RIGHT (exit {code}: {line:?})"),
            None => "not reached".to_owned(),
        };
        let _ = writeln!(out, "  {:<24} v1-only boot: {v1}", k.release);
        let cpu = o
            .cpu_error_pct
            .map_or_else(|| "not measured".to_owned(), |e| format!("{e:.2} %"));
        let _ = writeln!(
            out,
            "  {:<24} boot to power-off {:.0} s; CPU vs cpu.stat, largest error: {cpu}; \
             heartbeats at most {} apart (frozen after {FROZEN_AFTER_SECONDS} s)",
            k.release,
            o.secs,
            if o.longest_beat_gap > 0.0 {
                format!("{:.1} s", o.longest_beat_gap)
            } else {
                "(no two beats seen)".to_owned()
            }
        );
        if let Some(c) = &o.crashed_before {
            let _ = writeln!(
                out,
                "  {:<24} booted twice: the first boot's guest kernel failed ({c}); the files it had not finished ran in the second",
                k.release
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_a_test_summary() {
        let s = "ok. 9 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 22.33s";
        assert_eq!(count(s, "passed"), 9);
        assert_eq!(count(s, "failed"), 1);
        assert_eq!(count(s, "ignored"), 0);
    }

    #[test]
    fn kernel_messages_are_told_from_user_space_output() {
        assert!(is_kernel_line(
            "[  345.315420] watchdog: BUG: soft lockup - CPU#1 stuck for 45s! [podmeter:953]"
        ));
        assert!(is_kernel_line("[0.000000] Linux version 6.1.0"));
        assert!(!is_kernel_line("test a ... ok"));
        assert!(!is_kernel_line("PM-END cpu 0 27"));
        // A test's own brackets are not a kernel timestamp.
        assert!(!is_kernel_line("[a] b"));
        assert!(!is_kernel_line("[] b"));
        assert!(!is_kernel_line("[12"));
    }

    #[test]
    fn a_heartbeat_is_taken_out_of_the_line_it_cut() {
        let mut before = String::new();
        let lines = [
            "PM-BEAT\r",
            "test a ... PM-BEAT\r",
            "ok\r",
            "test result: ok. 1 passed\r",
        ];
        let out: Vec<String> = lines
            .iter()
            .filter_map(|l| without_beat((*l).to_owned(), &mut before))
            .collect();
        assert_eq!(out, ["test a ... ok\r", "test result: ok. 1 passed\r"]);
        assert!(before.is_empty());
        // Only a line's end is a beat.
        assert_eq!(
            without_beat("PM-BEAT late".into(), &mut before).as_deref(),
            Some("PM-BEAT late")
        );
    }

    #[test]
    fn cpu_error_from_the_cpu_test() {
        let l = "cgroup 3: podmeter 4.1234 s, cpu.stat 4.1200 s, error 0.083 %";
        assert_eq!(cpu_error(l), Some(0.083));
        assert_eq!(
            cpu_error("working set: podmeter 1 bytes, kernel 1 bytes"),
            None
        );
    }

    #[test]
    fn newest_abi_sorts_last() {
        let mut p = [
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-53-cloud-amd64",
        ];
        p.sort_by_key(|p| version_key(p));
        assert_eq!(p.last(), Some(&"linux-image-6.1.0-57-cloud-amd64"));
        let mut p = [
            "linux-image-6.12.118+deb12-cloud-amd64",
            "linux-image-6.12.99+deb12-cloud-amd64",
        ];
        p.sort_by_key(|p| version_key(p));
        assert_eq!(p.last(), Some(&"linux-image-6.12.118+deb12-cloud-amd64"));
    }
}
