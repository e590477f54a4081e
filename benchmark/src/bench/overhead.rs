//! What every workload on the node pays for podmeter: interleaved A/B runs
//! of a switch-heavy workload (`stress-ng --switch`), a small-packet UDP
//! flood and a bulk TCP stream (`iperf3` over loopback), each without the
//! agent, with only empty programs where the agent's switch and packet
//! programs attach ([`floor`]: what entering any program there costs; the
//! agent's 100 Hz tick and its rare cgroup and retransmit events are left
//! out), with the agent, and with it and the
//! kernel's BPF run-time statistics on (which give each program's cost per
//! event during the same runs).
//!
//! A round runs every workload in each of the four arms; the arms' order
//! flips from one round to the next (without, empty programs, with, with
//! statistics; then the reverse; the full plan has an even number of
//! rounds), so that a drift in the machine's speed weighs on both sides.
//! Rounds are many and short rather than few and long for the same reason:
//! each round's own loss compares runs close together, and the targets are
//! judged on the median of those (the medians' difference is shown too),
//! with a distribution-free interval: a target the interval spans, or one
//! with too few rounds for an interval, is "cannot tell", not met or missed
//! by noise.
//!
//! [`floor`]: podmeter_test_support::empty_programs

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use podmeter_test_support::empty_programs::Floor;
use serde_json::Value;

use super::{
    Agent, Bench, free_port,
    kernel::{Snapshot, Stats, iperf3_server, programs, snapshot, started, stress_switch},
    output, progress,
    results::{AbWorkload, Overhead, ProgramCost},
    round,
};

/// One of the four arms of a round.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Arm {
    Detached,
    /// No agent; empty programs where its programs attach.
    EmptyPrograms,
    Attached,
    AttachedStats,
}

/// The workloads, in the order each arm runs them.
const WORKLOADS: [(&str, &str); 3] = [
    ("switch", "bogo ops/s"),
    ("udp", "packets/s"),
    ("tcp", "Gbit/s"),
];

/// One workload's run: its throughput in its unit.
fn measure(b: &Bench, name: &str, port: u16, secs: u64) -> Result<Option<f64>> {
    Ok(match name {
        "switch" => stress_switch(b, secs)?.bogo_ops_per_sec,
        "udp" => {
            // Not pinned: client and server pinned to one CPU varied less,
            // but took turns on it, which changes the workload: 100k
            // switches a second against 55k unpinned on the same VM, and a
            // third fewer packets, so the switch program's cost would weigh
            // on the packet target.
            let v = iperf3_client(port, &["-u", "-b", "0", "-l", "64"], secs)?;
            let sum = &v["end"]["sum"];
            sum["packets"]
                .as_f64()
                .zip(sum["seconds"].as_f64().filter(|s| *s > 0.0))
                .map(|(p, s)| round(p / s, 0))
        }
        "tcp" => {
            let v = iperf3_client(port, &[], secs)?;
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .map(|bps| round(bps / 1e9, 3))
        }
        other => anyhow::bail!("no workload {other}"),
    })
}

/// `iperf3 -c` to the loopback server for `secs`, its JSON.
fn iperf3_client(port: u16, extra: &[&str], secs: u64) -> Result<Value> {
    let text = output(
        Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-J", "-t"])
            .arg(secs.to_string())
            .args(extra),
    )?;
    serde_json::from_str(&text).context("iperf3 -J")
}

/// The command line of a workload, for the report.
fn load(name: &str, secs: u64) -> String {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    match name {
        "switch" => format!("stress-ng --switch {cpus} ({secs} s)"),
        "udp" => format!("iperf3 -u -b 0 -l 64 over loopback ({secs} s)"),
        _ => format!("iperf3 TCP over loopback ({secs} s)"),
    }
}

/// Program counters summed over the rounds, by program name (each round
/// has its own agent, so its own program ids).
#[derive(Default)]
struct Costs(BTreeMap<String, (String, u64, u64, f64, u64)>);

impl Costs {
    fn add(&mut self, a: &Snapshot, b: &Snapshot) {
        let secs = b.0.duration_since(a.0).as_secs_f64();
        for (id, p1) in &b.1 {
            let Some(p0) = a.1.get(id) else { continue };
            let e = self
                .0
                .entry(p1.name.clone())
                .or_insert_with(|| (p1.kind.clone(), 0, 0, 0.0, 0));
            e.1 += p1.run_cnt.saturating_sub(p0.run_cnt);
            e.2 += p1.run_time_ns.saturating_sub(p0.run_time_ns);
            e.3 += secs;
            e.4 += p1.recursion_misses.saturating_sub(p0.recursion_misses);
        }
    }

    fn costs(&self) -> Vec<ProgramCost> {
        self.0
            .iter()
            .map(|(name, (kind, cnt, ns, secs, misses))| ProgramCost {
                program: name.clone(),
                kind: kind.clone(),
                events: *cnt,
                events_per_sec: round(*cnt as f64 / secs.max(1e-9), 0),
                ns_per_event: (*cnt > 0).then(|| round(*ns as f64 / *cnt as f64, 1)),
                cpu_pct_of_one_core: round(*ns as f64 / 1e9 / secs.max(1e-9) * 100.0, 3),
                recursion_misses: Some(*misses),
            })
            .collect()
    }
}

pub fn run(b: &Bench) -> Result<Overhead> {
    let (rounds, secs) = (b.plan.ab_rounds, b.plan.ab_secs);
    // Another podmeter's programs would be attached in the "without" arm.
    let others = programs()?
        .values()
        .filter(|p| p.name.starts_with("pm_"))
        .count();
    if others > 0 {
        bail!("{others} pm_* programs of another podmeter are loaded: no run would be without one");
    }
    let cgroup2_root = podmeter_test_support::cgroups::try_unified_root()
        .context("no cgroup2 mount for the empty packet programs")?;
    let port = free_port()?;
    let _server = iperf3_server(port)?;
    let mut rows: Vec<AbWorkload> = WORKLOADS
        .iter()
        .map(|(name, unit)| AbWorkload {
            name: (*name).to_owned(),
            load: load(name, secs),
            unit: (*unit).to_owned(),
            detached: Vec::new(),
            attached: Vec::new(),
            attached_stats: Vec::new(),
            empty_programs: Vec::new(),
            programs: Vec::new(),
        })
        .collect();
    let mut costs: Vec<Costs> = WORKLOADS.iter().map(|_| Costs::default()).collect();

    for r in 0..rounds {
        let mut arms = [
            Arm::Detached,
            Arm::EmptyPrograms,
            Arm::Attached,
            Arm::AttachedStats,
        ];
        if r % 2 == 1 {
            arms.reverse();
        }
        let mut agent: Option<(Agent, Vec<u64>)> = None;
        for arm in arms {
            if matches!(arm, Arm::Detached | Arm::EmptyPrograms) {
                if let Some((a, _)) = agent.take() {
                    a.stop()?;
                }
            } else if agent.is_none() {
                agent = Some(started(|| Agent::start(b, "overhead"))?);
            }
            let stats = (arm == Arm::AttachedStats)
                .then(|| Stats::on(b))
                .transpose()?;
            // Empty programs that cannot attach (something at the root
            // that refuses a second program) leave this arm's gaps, not the
            // scenario.
            let floor = match arm {
                Arm::EmptyPrograms => match Floor::attach(&cgroup2_root) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        eprintln!("bench: empty programs not attached: {e:#}");
                        for row in &mut rows {
                            row.empty_programs.push(None);
                        }
                        continue;
                    }
                },
                _ => None,
            };
            for (i, (name, _)) in WORKLOADS.iter().enumerate() {
                progress(&format!(
                    "A/B round {} of {rounds}: {} ({arm:?})",
                    r + 1,
                    load(name, secs)
                ));
                let ours = agent.as_ref().map(|(_, ids)| ids.as_slice()).unwrap_or(&[]);
                let s0 = snapshot(ours)?;
                // A failed run leaves a gap in its round, not the scenario.
                let v = measure(b, name, port, secs)
                    .inspect_err(|e| eprintln!("bench: {name} ({arm:?}) failed: {e:#}"))
                    .ok()
                    .flatten();
                let s1 = snapshot(ours)?;
                let row = &mut rows[i];
                match arm {
                    Arm::Detached => row.detached.push(v),
                    Arm::EmptyPrograms => row.empty_programs.push(v),
                    Arm::Attached => row.attached.push(v),
                    Arm::AttachedStats => {
                        row.attached_stats.push(v);
                        costs[i].add(&s0, &s1);
                    }
                }
            }
            drop(stats);
            drop(floor);
        }
        if let Some((a, _)) = agent.take() {
            a.stop()?;
        }
    }
    for (row, c) in rows.iter_mut().zip(&costs) {
        row.programs = c.costs();
    }
    Ok(Overhead {
        rounds,
        run_secs: secs,
        workloads: rows,
    })
}
