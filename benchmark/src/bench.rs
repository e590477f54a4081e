//! `cargo xtask bench [--quick]`: what podmeter costs and how right it is,
//! measured on this machine next to what users already run (the kubelet's
//! cAdvisor and node-exporter). It prints figures; it asserts nothing.
//!
//! Scenarios, in order (each one's failure is recorded and the rest go on):
//! 0. [`overhead`]: what workloads pay, from interleaved A/B runs of a
//!    switch-heavy, a small-packet UDP and a bulk TCP workload without and
//!    with the agent (and with BPF statistics on, for the cost per event);
//! 1. [`kernel`]: per-event cost of each eBPF program (`bpf_stats`) under a
//!    context-switch storm and a small-packet flood;
//! 2. [`scale`]: the agent's CPU and peak RSS with 10, 100 and 1000
//!    kubelet-style pod cgroups that carry work, scraped every 15 s, and its
//!    `/metrics` latency and size;
//! 3. [`accuracy`]: podmeter against `cpu.stat` and the kernel's IP byte
//!    counters on this host;
//! 4. [`side`]: real pods on the local cluster, podmeter next to cAdvisor
//!    and node-exporter: scrape cost, and CPU and network against the same
//!    ground truth.
//!
//! Results ([`results::BenchResults`], schema [`results::SCHEMA_VERSION`])
//! go to `bench/results/<time>-<mode>.json`, the report rendered from them
//! ([`report`]) to `.md` next to it and to `bench/RESULTS.md`, whose other
//! sections (the soak's, the kernel matrix) stay.
//! `PODMETER_BENCH_ONLY=kernel,side` runs only the scenarios named (for
//! trying a change; such a partial run leaves `bench/RESULTS.md` alone);
//! `PODMETER_BENCH_RENDER=<json>` writes an earlier run's markdown again
//! from its JSON. Everything the run makes (cgroups,
//! processes, network namespaces, the `bench` namespace, the BPF statistics
//! switch) is removed when it ends, also on failure.

mod accuracy;
mod cgroups;
mod kernel;
mod overhead;
mod plot;
mod process;
pub mod report;
pub mod results;
mod scale;
mod scrape;
mod side;

use std::{
    fs,
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use crate::schema::round;
use crate::{Host, is_root};
use results::{BenchResults, Conditions, Machine, Outcome, PlanRecord, SCHEMA_VERSION, Scenario};

pub use cgroups::{Cg, Remove, Tree};
pub use kernel::programs;
pub use process::{Agent, Proc, Workers, scrape_until};
pub use scrape::{Endpoint, Fetch, Sample, burst_summary, parse_exposition};

/// How long and how big each scenario is.
pub struct Plan {
    /// `quick` or `full`.
    pub mode: &'static str,
    /// Each measured load in the kernel scenario.
    pub kernel_secs: u64,
    /// Context-switch throughput runs with and without the agent.
    pub switch_compare_secs: u64,
    /// Rounds of the A/B scenario (even, so that each arm order runs as
    /// often as the other).
    pub ab_rounds: u64,
    /// Each workload run's length in the A/B scenario.
    pub ab_secs: u64,
    /// Pod counts for the scale scenario.
    pub scales: &'static [usize],
    /// Window without scrapes, for the agent's background cost.
    pub idle_secs: u64,
    /// Window scraped every [`SCRAPE_EVERY`]: the headline CPU figure.
    pub window_secs: u64,
    /// Back-to-back scrapes for latency percentiles and CPU per scrape.
    pub burst: usize,
    /// CPU accuracy window (host and real pods).
    pub accuracy_secs: u64,
    /// TCP bytes per transfer and UDP datagrams (1000 bytes) per run.
    pub tcp_bytes: u64,
    pub udp_count: u64,
    /// Light pods on the real cluster (besides the CPU and network pods).
    pub light_pods: usize,
    /// Back-to-back scrapes of the kubelet's cAdvisor endpoint.
    pub cadvisor_burst: usize,
}

pub const QUICK: Plan = Plan {
    mode: "quick",
    kernel_secs: 10,
    switch_compare_secs: 5,
    ab_rounds: 2,
    ab_secs: 3,
    scales: &[10, 100, 1000],
    idle_secs: 10,
    window_secs: 45,
    burst: 50,
    accuracy_secs: 30,
    tcp_bytes: 100_000_000,
    udp_count: 20_000,
    light_pods: 6,
    cadvisor_burst: 15,
};

const FULL: Plan = Plan {
    mode: "full",
    kernel_secs: 30,
    switch_compare_secs: 15,
    ab_rounds: 10,
    ab_secs: 4,
    scales: &[10, 100, 1000],
    idle_secs: 30,
    window_secs: 300,
    burst: 200,
    accuracy_secs: 120,
    tcp_bytes: 500_000_000,
    udp_count: 100_000,
    light_pods: 24,
    cadvisor_burst: 50,
};

/// Scrape interval of the cost windows, as the issue asks.
pub const SCRAPE_EVERY: Duration = Duration::from_secs(15);

/// A light pod's worker: wakes every 100 ms and spins 20 µs. (Every 10 ms
/// would be 100,000 wake-ups a second at 1000 pods: more than 2 cores.)
pub const LIGHT_TICK: [&str; 3] = ["tick", "100000", "20"];

/// Debian packages the benchmark drives, beyond `cargo xtask setup`'s.
const PACKAGES: &[&str] = &["prometheus-node-exporter", "stress-ng", "iperf3", "curl"];

/// State shared by the scenarios.
pub struct Bench<'h> {
    pub host: &'h dyn Host,
    pub plan: &'static Plan,
    pub podmeter: PathBuf,
    pub pm_work: PathBuf,
    /// Scratch files (logs, scrapes) under target/bench.
    pub scratch: PathBuf,
    pub tree: Tree,
    /// USER_HZ, for /proc/<pid>/stat.
    pub clk_tck: f64,
}

/// `cargo xtask bench`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Shorter windows and fewer samples (under 10 minutes).
    #[arg(long)]
    pub quick: bool,
}

/// `cargo xtask bench`.
pub fn run(opts: &Options, host: &dyn Host) -> Result<()> {
    let quick = opts.quick;
    let root = host.root();
    if let Some(json) = std::env::var_os("PODMETER_BENCH_RENDER") {
        return render(&root, Path::new(&json));
    }
    if !is_root() {
        bail!(
            "the benchmark loads eBPF programs and makes cgroups: run `sudo -E cargo xtask bench`"
        );
    }
    let started = Instant::now();
    let plan = if quick { &QUICK } else { &FULL };
    host.prepare(PACKAGES)?;
    let target = host.target_dir();
    let scratch = target.join("bench");
    fs::create_dir_all(&scratch)?;
    let clk_tck = output(Command::new("getconf").arg("CLK_TCK"))?
        .trim()
        .parse()
        .context("getconf CLK_TCK")?;
    let b = Bench {
        host,
        plan,
        podmeter: target.join("release/podmeter"),
        pm_work: target.join("release/pm-work"),
        scratch,
        tree: Tree::new()?,
        clk_tck,
    };
    let stamp = output(Command::new("date").args(["-u", "+%Y-%m-%dT%H%M%SZ"]))?
        .trim()
        .to_owned();
    eprintln!("bench: {} run {stamp}", plan.mode);
    let machine = machine(&b);
    eprintln!(
        "bench: {}",
        serde_json::to_string_pretty(&machine).unwrap_or_default()
    );

    let plan_record = PlanRecord {
        kernel_secs: plan.kernel_secs,
        scales: plan.scales.iter().map(|&n| n as u64).collect(),
        idle_secs: plan.idle_secs,
        window_secs: plan.window_secs,
        scrape_every_secs: SCRAPE_EVERY.as_secs(),
        burst: plan.burst as u64,
        accuracy_secs: plan.accuracy_secs,
        tcp_bytes: plan.tcp_bytes,
        udp_count: plan.udp_count,
        light_pods: plan.light_pods as u64,
        cadvisor_burst: plan.cadvisor_burst as u64,
        light_worker: LIGHT_TICK.join(" "),
        scale_cpu_limit_millicores: Some(scale::CPU_LIMIT_MILLICORES),
        ab_rounds: Some(plan.ab_rounds),
        ab_secs: Some(plan.ab_secs),
    };
    // PODMETER_BENCH_ONLY=kernel,side runs only those (for trying changes).
    let only = std::env::var("PODMETER_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|o| name.starts_with(o.trim()));
    let mut results = BenchResults {
        schema_version: SCHEMA_VERSION,
        mode: plan.mode.to_owned(),
        started: stamp.clone(),
        note: None,
        machine,
        plan: plan_record,
        overhead: run("overhead").then(|| scenario(&b, "overhead", overhead::run)),
        kernel: run("kernel").then(|| scenario(&b, "kernel", kernel::run)),
        scale: run("scale").then(|| scenario(&b, "scale", scale::run)),
        accuracy: run("accuracy").then(|| scenario(&b, "accuracy", accuracy::run)),
        side_by_side: run("side_by_side").then(|| scenario(&b, "side_by_side", side::run)),
        total_secs: Some(round(started.elapsed().as_secs_f64(), 0)),
        targets: Vec::new(),
    };

    let dir = root.join("bench/results");
    fs::create_dir_all(&dir)?;
    let base = dir.join(if only.is_empty() {
        format!("{stamp}-{}", plan.mode)
    } else {
        format!("{stamp}-{}-only-{}", plan.mode, only.replace(',', "-"))
    });
    let json_path = base.with_extension("json");
    results.targets = report::targets(&results);
    fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    let md = publish(&root, &results, &json_path)?;
    println!("{md}");
    eprintln!(
        "bench: {} run took {:.0} s; wrote {}",
        plan.mode,
        started.elapsed().as_secs_f64(),
        json_path.display(),
    );
    Ok(())
}

/// Renders `results` to markdown next to their JSON and, for a run of every
/// scenario, to the top of `bench/RESULTS.md` (a partial run does not
/// replace the latest full table); says where, and returns the markdown.
fn publish(root: &Path, results: &BenchResults, json_path: &Path) -> Result<String> {
    // The plots go next to the JSON; each markdown links them from where
    // it lies.
    let stem = json_path
        .file_stem()
        .and_then(|s| s.to_str())
        .context("a results file name")?;
    let (mut here, mut top) = (Vec::new(), Vec::new());
    for (name, title, svg) in plot::plots(results) {
        let file = format!("{stem}-{name}.svg");
        fs::write(json_path.with_file_name(&file), svg)?;
        top.push((title.clone(), format!("results/{file}")));
        here.push((title, file));
    }
    let md = report::markdown_with(results, &here);
    fs::write(json_path.with_extension("md"), &md)?;
    let partial = results.is_partial();
    if !partial {
        let md = report::markdown_with(results, &top);
        fs::write(root.join("bench/RESULTS.md"), with_others(root, &md))?;
    }
    eprintln!(
        "bench: rendered {}{}",
        json_path.with_extension("md").display(),
        if partial { "" } else { " and bench/RESULTS.md" }
    );
    Ok(md)
}

/// Runs one scenario: its figures or error, and what the machine did
/// meanwhile.
fn scenario<T>(b: &Bench, name: &str, f: fn(&Bench) -> Result<T>) -> Scenario<T> {
    let load = loadavg();
    eprintln!("\nbench: == {name} == (load {load})");
    let t = Instant::now();
    let cpu0 = machine_cpu();
    let outcome = Outcome::from(f(b));
    if let Some(e) = outcome.error() {
        eprintln!("bench: {name} failed: {e}");
    }
    let mut meta = Conditions {
        load_at_start: Some(load),
        load_at_end: Some(loadavg()),
        ..Conditions::default()
    };
    if let (Some(a), Some(z)) = (cpu0, machine_cpu()) {
        // What the whole machine did meanwhile, the benchmark included.
        let total = (z.total - a.total).max(1) as f64;
        meta.machine_busy_pct = Some(round((z.busy - a.busy) as f64 / total * 100.0, 1));
        meta.machine_steal_pct = Some(round((z.steal - a.steal) as f64 / total * 100.0, 1));
    }
    meta.secs = Some(round(t.elapsed().as_secs_f64(), 1));
    Scenario { meta, outcome }
}

/// Writes the markdown of an earlier run's JSON again (after a change to
/// the report, without measuring again): next to it and, for a full run,
/// as `bench/RESULTS.md`.
fn render(root: &Path, json_path: &Path) -> Result<()> {
    let text = fs::read_to_string(json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let mut results: BenchResults = serde_json::from_str(&text)
        .with_context(|| format!("reading {} as benchmark results", json_path.display()))?;
    results.targets = report::targets(&results);
    publish(root, &results, json_path).map(drop)
}

/// `md` followed by the sections of the current `bench/RESULTS.md` the
/// report does not write (the soak's, the kernel matrix), which it keeps.
fn with_others(root: &Path, md: &str) -> String {
    let existing = fs::read_to_string(root.join("bench/RESULTS.md")).unwrap_or_default();
    report::with_other_sections(md, &existing)
}

/// The machine, kernel and versions, for the record.
fn machine(b: &Bench) -> Machine {
    let root = b.host.root();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let first_line = |cmd: &mut Command| {
        output(cmd)
            .ok()
            .and_then(|s| s.lines().find(|l| !l.trim().is_empty()).map(str::to_owned))
            .unwrap_or_else(|| "not found".into())
    };
    let git = |args: &[&str]| first_line(Command::new("git").current_dir(&root).args(args));
    let dirty = !Command::new("git")
        .current_dir(&root)
        .args(["diff", "--quiet", "HEAD", "--", "agent", "agent-ebpf"])
        .status()
        .is_ok_and(|s| s.success());
    // The running kubelet's, else the one the side-by-side scenario starts.
    let kubelet = fs::read_to_string(b.host.cluster_state().join("pids/kubelet.pid"))
        .ok()
        .and_then(|p| fs::read_link(format!("/proc/{}/exe", p.trim())).ok())
        .unwrap_or_else(|| b.host.kubelet_bin());
    let kubelet = first_line(Command::new(kubelet).arg("--version"));
    Machine {
        cpu: field("model name"),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
        hypervisor: cpuinfo.contains(" hypervisor"),
        memory_gib: round(mem_kib as f64 / 1048576.0, 1),
        kernel: first_line(Command::new("uname").arg("-r")),
        cgroups: if Path::new("/sys/fs/cgroup/unified")
            .join("cgroup.procs")
            .exists()
        {
            "hybrid (v1 controllers, cgroup2 at /sys/fs/cgroup/unified)"
        } else {
            "cgroup2"
        }
        .to_owned(),
        podmeter: format!(
            "{} ({}{})",
            first_line(Command::new(&b.podmeter).arg("--version")),
            git(&["rev-parse", "--short", "HEAD"]),
            if dirty {
                ", agent/ differs from the commit"
            } else {
                ""
            }
        ),
        kubelet,
        node_exporter: first_line(Command::new("prometheus-node-exporter").arg("--version")),
        stress_ng: first_line(Command::new("stress-ng").arg("--version")),
        iperf3: first_line(Command::new("iperf3").arg("--version")),
        bpftool: first_line(Command::new("bpftool").arg("--version")),
        rustc: first_line(Command::new("rustc").arg("--version")),
    }
}

// ---------------------------------------------------------------------------
// Small helpers

/// Runs `cmd` and returns its stdout; fails with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// /proc/loadavg's first three fields.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Jiffies of all CPUs from /proc/stat.
struct MachineCpu {
    total: u64,
    busy: u64,
    steal: u64,
}

fn machine_cpu() -> Option<MachineCpu> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let total: u64 = f.iter().take(8).sum();
    let (idle, steal) = (f.get(3)? + f.get(4)?, *f.get(7)?);
    Some(MachineCpu {
        total,
        busy: total - idle - steal,
        steal,
    })
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A number a helper printed (None if absent or not a number).
pub fn number(word: Option<&String>) -> Option<f64> {
    word.and_then(|w| w.parse::<f64>().ok())
        .and_then(crate::schema::finite)
}

/// Nearest-rank percentile of `v` (`p` in 0..=100); NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Signed relative error of `measured` against `truth`, in percent.
pub fn error_pct(measured: f64, truth: f64) -> f64 {
    if truth == 0.0 {
        return if measured == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (measured - truth) / truth * 100.0
}

/// utime + stime of a process, in seconds (clock-tick resolution).
pub fn proc_cpu_secs(pid: u32, clk_tck: f64) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; fields count from after its ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| -> Result<f64> {
        f.get(i - 3)
            .context("short /proc stat")?
            .parse::<f64>()
            .context("bad /proc stat")
    };
    Ok((ticks(14)? + ticks(15)?) / clk_tck)
}

/// A `/proc/<pid>/status` value in bytes (`VmHWM`, `VmRSS`).
pub fn proc_status_bytes(pid: u32, key: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

/// `cpu.stat` `usage_usec` of a cgroup2 directory, in seconds.
pub fn cgroup_cpu_secs(dir: &Path) -> Result<f64> {
    let stat = fs::read_to_string(dir.join("cpu.stat"))
        .with_context(|| format!("reading {}/cpu.stat", dir.display()))?;
    let usec: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .context("no usage_usec in cpu.stat")?
        .trim()
        .parse()?;
    Ok(usec as f64 / 1e6)
}

/// `InOctets` and `OutOctets` (IPv4 bytes, headers included) of the network
/// namespace `pid` lives in.
pub fn ip_octets(pid: u32) -> Result<(u64, u64)> {
    ip_octets_of(&fs::read_to_string(format!("/proc/{pid}/net/netstat"))?)
}

/// [`ip_octets`] of the named network namespace.
pub fn netns_ip_octets(ns: &str) -> Result<(u64, u64)> {
    ip_octets_of(&output(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "cat",
        "/proc/net/netstat",
    ]))?)
}

/// `InOctets` and `OutOctets` from the text of `/proc/net/netstat`.
fn ip_octets_of(text: &str) -> Result<(u64, u64)> {
    let mut rows = text.lines().filter(|l| l.starts_with("IpExt:"));
    let (names, values) = (rows.next(), rows.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no IpExt in /proc/net/netstat");
    };
    let get = |k: &str| -> Result<u64> {
        let i = names
            .split_whitespace()
            .position(|n| n == k)
            .with_context(|| format!("no {k} in IpExt"))?;
        Ok(values
            .split_whitespace()
            .nth(i)
            .context("short IpExt")?
            .parse()?)
    };
    Ok((get("InOctets")?, get("OutOctets")?))
}

/// Writes a line to stderr now (progress of long windows).
pub fn progress(msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "bench: {msg}");
}
