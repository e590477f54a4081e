//! Per-event kernel cost of podmeter's eBPF programs: `run_time_ns /
//! run_cnt` from `bpftool prog show` while the kernel's BPF run-time
//! statistics are on (`BPF_ENABLE_STATS`, the switch behind
//! `kernel.bpf_stats_enabled=1`, held by a `pm-work bpf-stats` child so that
//! it goes off however the run ends), under a context-switch storm
//! (`stress-ng --switch`), a small-packet flood (`iperf3 -u -l 64`) and
//! TCP under 5 % random loss between two network namespaces (`iperf3`, for
//! the retransmit program).
//!
//! The statistics add two clock reads per program run, so these figures
//! are upper bounds; the context-switch throughput with and without the
//! agent (statistics off) is printed next to them.

use std::{
    collections::{BTreeMap, HashSet},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use podmeter_test_support::{random_loss, veth_pair};
use serde_json::Value;

use super::{
    Agent, Bench, Proc, free_port, output, progress,
    results::{Kernel, Load, ProgramCost, SwitchRun, SwitchThroughput},
    round,
};
use crate::schema::rounded;

/// One program's counters.
#[derive(Clone, Debug)]
pub struct Prog {
    pub name: String,
    pub kind: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Runs the kernel skipped because the program was already running on
    /// that CPU.
    pub recursion_misses: u64,
}

/// Some programs' counters, and when they were read.
pub type Snapshot = (Instant, BTreeMap<u64, Prog>);

/// Every loaded BPF program, by id.
pub fn programs() -> Result<BTreeMap<u64, Prog>> {
    let text = output(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let v: Value = serde_json::from_str(&text).context("bpftool -j prog show")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()?,
                Prog {
                    name: p["name"].as_str().unwrap_or("").to_owned(),
                    kind: p["type"].as_str().unwrap_or("").to_owned(),
                    run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                    run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                    recursion_misses: p["recursion_misses"].as_u64().unwrap_or(0),
                },
            ))
        })
        .collect())
}

/// Counters of `ids` now.
pub(super) fn snapshot(ids: &[u64]) -> Result<Snapshot> {
    let t = Instant::now();
    let all = programs()?;
    let mine = ids
        .iter()
        .filter_map(|id| all.get(id).map(|p| (*id, p.clone())))
        .collect();
    Ok((t, mine))
}

/// Per-program deltas between two snapshots.
fn deltas(a: &Snapshot, b: &Snapshot) -> Vec<ProgramCost> {
    let secs = b.0.duration_since(a.0).as_secs_f64();
    b.1.iter()
        .filter_map(|(id, p1)| {
            let p0 = a.1.get(id)?;
            let cnt = p1.run_cnt.saturating_sub(p0.run_cnt);
            let ns = p1.run_time_ns.saturating_sub(p0.run_time_ns);
            Some(ProgramCost {
                program: p1.name.clone(),
                kind: p1.kind.clone(),
                events: cnt,
                events_per_sec: round(cnt as f64 / secs, 0),
                ns_per_event: (cnt > 0).then(|| round(ns as f64 / cnt as f64, 1)),
                cpu_pct_of_one_core: round(ns as f64 / 1e9 / secs * 100.0, 3),
                recursion_misses: Some(p1.recursion_misses.saturating_sub(p0.recursion_misses)),
            })
        })
        .collect()
}

/// `stress-ng --switch <cpus>` for `secs`: bogo ops/s and ns per switch.
pub(super) fn stress_switch(b: &Bench, secs: u64) -> Result<SwitchRun> {
    let yaml = b.scratch.join("stress-switch.yaml");
    let _ = std::fs::remove_file(&yaml);
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    output(
        Command::new("stress-ng")
            .args(["--switch", &cpus.to_string(), "--timeout"])
            .arg(format!("{secs}s"))
            .args(["--metrics-brief", "--yaml"])
            .arg(&yaml),
    )?;
    let text = std::fs::read_to_string(&yaml)?;
    let field = |k: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok(SwitchRun {
        instances: cpus as u64,
        secs,
        bogo_ops_per_sec: rounded(field("bogo-ops-per-second-real-time"), 0),
        ns_per_switch: rounded(field("nanosecs-per-context-switch-pipe-method"), 0),
        runs_bogo_ops_per_sec: None,
    })
}

/// BPF run-time statistics on while this lives.
pub(super) struct Stats {
    _held: Proc,
}

impl Stats {
    pub(super) fn on(b: &Bench) -> Result<Self> {
        let mut p = Proc::spawn(
            "pm-work bpf-stats",
            Command::new(&b.pm_work).arg("bpf-stats"),
        )?;
        let l = p.line()?;
        if l.first().map(String::as_str) != Some("enabled") {
            bail!("pm-work bpf-stats said {l:?}");
        }
        Ok(Self { _held: p })
    }
}

/// The best (highest) throughput of several runs, and all of them.
fn best(runs: Vec<SwitchRun>) -> Result<SwitchRun> {
    let f = |r: &SwitchRun| r.bogo_ops_per_sec.unwrap_or(0.0);
    let mut top = runs
        .iter()
        .max_by(|a, b| f(a).total_cmp(&f(b)))
        .cloned()
        .context("no runs")?;
    top.runs_bogo_ops_per_sec = Some(runs.iter().map(|r| r.bogo_ops_per_sec).collect());
    Ok(top)
}

pub fn run(b: &Bench) -> Result<Kernel> {
    let secs = b.plan.kernel_secs;
    let others = programs()?
        .values()
        .filter(|p| p.name.starts_with("pm_"))
        .count();
    // Context-switch throughput without and with the agent, alternated
    // (other work on the machine shifts both); the best of each counts.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut agent = None;
    let mut ours: Vec<u64> = Vec::new();
    for round in 1..=2 {
        if let Some(a) = agent.take() {
            Agent::stop(a)?;
        }
        progress(&format!(
            "context-switch throughput without our agent ({} s, round {round} of 2)",
            b.plan.switch_compare_secs
        ));
        without.push(stress_switch(b, b.plan.switch_compare_secs)?);
        let a;
        (a, ours) = started(|| Agent::start(b, "kernel"))?;
        progress(&format!(
            "context-switch throughput with the agent, statistics off ({} s, round {round} of 2)",
            b.plan.switch_compare_secs
        ));
        with.push(stress_switch(b, b.plan.switch_compare_secs)?);
        agent = Some(a);
    }
    let agent = agent.context("agent")?;

    let stats = Stats::on(b)?;
    progress(&format!(
        "stress-ng --switch with BPF statistics on ({secs} s)"
    ));
    let s0 = snapshot(&ours)?;
    let measured = stress_switch(b, secs)?;
    let s1 = snapshot(&ours)?;
    let switch_progs = deltas(&s0, &s1);

    progress(&format!("iperf3 -u -l 64 -b 0 over loopback ({secs} s)"));
    let port = free_port()?;
    let _server = iperf3_server(port)?;
    let port = port.to_string();
    let f0 = snapshot(&ours)?;
    let client = output(Command::new("iperf3").args([
        "-c",
        "127.0.0.1",
        "-p",
        &port,
        "-u",
        "-b",
        "0",
        "-l",
        "64",
        "-t",
        &secs.to_string(),
        "-J",
    ]))?;
    let f1 = snapshot(&ours)?;
    let flood_progs = deltas(&f0, &f1);
    let iperf: Value = serde_json::from_str(&client).unwrap_or(Value::Null);
    let sum = &iperf["end"]["sum"];
    // Its failure (no veth, no way to drop packets) leaves the other loads.
    let lossy_tcp = lossy_tcp(&ours, secs)
        .inspect_err(|e| eprintln!("bench: TCP under loss not measured: {e:#}"))
        .ok();
    agent.stop()?;
    let histogram = switch_with_histogram(b, secs)
        .inspect_err(|e| {
            eprintln!("bench: the switch path with --wait-histogram not measured: {e:#}")
        })
        .ok();
    drop(stats);

    Ok(Kernel {
        other_podmeter_programs_loaded: others as u64,
        context_switch_load: Load {
            load: format!("stress-ng --switch {} ({secs} s)", measured.instances),
            iperf3_packets: None,
            iperf3_lost_percent: None,
            iperf3_retransmits: None,
            programs: switch_progs,
        },
        switch_throughput: SwitchThroughput {
            without_agent: best(without)?,
            with_agent_stats_off: best(with)?,
            with_agent_stats_on: measured,
        },
        packet_flood: Load {
            load: format!("iperf3 -u -b 0 -l 64 over loopback ({secs} s)"),
            iperf3_packets: sum["packets"].as_u64(),
            iperf3_lost_percent: sum["lost_percent"].as_f64(),
            iperf3_retransmits: None,
            programs: flood_progs,
        },
        lossy_tcp,
        context_switch_load_wait_histogram: histogram,
    })
}

/// An `iperf3` server on loopback `port`, once it listens.
pub(super) fn iperf3_server(port: u16) -> Result<Proc> {
    let server = Proc::quiet(
        "iperf3 -s",
        Command::new("iperf3")
            .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stderr(Stdio::null()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while output(Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]))?
        .trim()
        .is_empty()
    {
        if Instant::now() > deadline {
            bail!("iperf3 server did not listen on {port}");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(server)
}

/// An agent from `start`, and the `pm_*` programs that appeared with it.
pub(super) fn started(start: impl FnOnce() -> Result<Agent>) -> Result<(Agent, Vec<u64>)> {
    let before: HashSet<u64> = programs()?.into_keys().collect();
    let agent = start()?;
    let ours: Vec<u64> = programs()?
        .into_iter()
        .filter(|(id, p)| !before.contains(id) && p.name.starts_with("pm_"))
        .map(|(id, _)| id)
        .collect();
    if ours.is_empty() {
        bail!("no pm_* programs appeared when podmeter started");
    }
    Ok((agent, ours))
}

/// The context-switch storm with BPF statistics on, under an agent run
/// with `--wait-histogram`: what bucketing each wait adds to the switch.
fn switch_with_histogram(b: &Bench, secs: u64) -> Result<Load> {
    let (agent, ours) = started(|| Agent::start_with(b, "kernel-hist", &["--wait-histogram"]))?;
    // Where the kernel counts no waits the flag is ignored (and logged):
    // this would measure the switch without it.
    let log = std::fs::read_to_string(b.scratch.join("podmeter-kernel-hist.log"))?;
    if log.contains("--wait-histogram: kernel BTF has no sched_info") {
        bail!("this kernel counts no run-queue waits: --wait-histogram is off");
    }
    progress(&format!(
        "stress-ng --switch with --wait-histogram, BPF statistics on ({secs} s)"
    ));
    let s0 = snapshot(&ours)?;
    let run = stress_switch(b, secs)?;
    let s1 = snapshot(&ours)?;
    agent.stop()?;
    Ok(Load {
        load: format!(
            "stress-ng --switch {} ({secs} s), agent with --wait-histogram",
            run.instances
        ),
        iperf3_packets: None,
        iperf3_lost_percent: None,
        iperf3_retransmits: None,
        programs: deltas(&s0, &s1),
    })
}

/// Loss on the bench's veth pair, in % of the segments to [`LOSSY_PORT`].
const LOSS_PERCENT: u32 = 5;
const LOSSY_PORT: u16 = 7200;

/// `iperf3` TCP for `secs` from one network namespace to another, with
/// [`LOSS_PERCENT`] % of the segments dropped: what each of `ours` cost.
fn lossy_tcp(ours: &[u64], secs: u64) -> Result<Load> {
    progress(&format!(
        "iperf3 TCP between network namespaces, {LOSS_PERCENT} % loss ({secs} s)"
    ));
    // test-support's helpers panic, as tests want; here that is an error.
    let (a, r) = std::panic::catch_unwind(|| veth_pair("bench"))
        .map_err(|_| anyhow::anyhow!("could not make the veth pair (see the panic above)"))?;
    let how = random_loss(&a, &r, LOSSY_PORT, LOSS_PERCENT).map_err(anyhow::Error::msg)?;
    let port = LOSSY_PORT.to_string();
    let _server = Proc::quiet(
        "iperf3 -s (receiver's namespace)",
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &r.0,
                "iperf3",
                "-s",
                "-B",
                "10.231.0.2",
                "-p",
            ])
            .arg(&port)
            .stderr(Stdio::null()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while output(Command::new("ip").args([
        "netns",
        "exec",
        &r.0,
        "ss",
        "-Hltn",
        &format!("sport = :{port}"),
    ]))?
    .trim()
    .is_empty()
    {
        if Instant::now() > deadline {
            bail!("iperf3 server did not listen on {port} in {}", r.0);
        }
        sleep(Duration::from_millis(50));
    }
    let t0 = snapshot(ours)?;
    let client = output(Command::new("ip").args([
        "netns",
        "exec",
        &a.0,
        "iperf3",
        "-c",
        "10.231.0.2",
        "-p",
        &port,
        "-t",
        &secs.to_string(),
        "-J",
    ]))?;
    let t1 = snapshot(ours)?;
    let iperf: Value = serde_json::from_str(&client).unwrap_or(Value::Null);
    Ok(Load {
        load: format!("iperf3 TCP over a veth pair, {LOSS_PERCENT} % loss ({how}) ({secs} s)"),
        iperf3_packets: None,
        iperf3_lost_percent: None,
        iperf3_retransmits: iperf["end"]["sum_sent"]["retransmits"].as_u64(),
        programs: deltas(&t0, &t1),
    })
}
