//! The agent at 10, 100 and 1000 pods: kubelet-style cgroupfs pod and
//! container cgroups (`.../kubepods/burstable/pod<uid>/<64 hex>`, in the
//! cgroup2 hierarchy and, on hybrid hosts, the v1 memory, cpu and cpuacct
//! ones), each container running a light `pm-work tick`. A fresh agent per
//! size, so its peak RSS is that size's.
//!
//! Per size: an idle window (no scrapes: background cost), a window scraped
//! every 15 s (the headline CPU seconds per minute, and the latency of
//! scrapes as Prometheus makes them), then a burst of back-to-back scrapes
//! (latency percentiles, CPU per scrape). The first and last scrape of the
//! 15 s window are compared with every container's `cpu.stat`.

use std::{
    collections::HashMap,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::Result;
use sha2::{Digest as _, Sha256};

use super::{
    Agent, Bench, Cg, LIGHT_TICK, Remove, SCRAPE_EVERY, Sample, Workers, burst_summary,
    parse_exposition, percentile, progress,
    results::{AtPods, CpuAccuracy, Outcome, Percentiles, PlainBurst, Pods, Scale, ScaleRow},
    round, scrape_until,
};
use crate::schema::{num, rounded};

const CPU: &str = "podmeter_container_cpu_usage_seconds_total";

/// A pod-like cgroup pair: the container's cgroup below its pod's.
pub struct FakePod {
    pub container_id: String,
    pub cg: Cg,
}

/// Deterministic, unique-per-run ids that look like the kubelet's.
fn ids(seed: &str) -> (String, String) {
    let h = hex(&Sha256::digest(seed.as_bytes()));
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    let cid = hex(&Sha256::digest(format!("{seed}/container").as_bytes()));
    (uid, cid)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A container's CPU limit in the scale scenario: far above what a light
/// worker uses, so never throttled, but podmeter reads every container's
/// throttling counters at each scrape, as it would on a node whose pods
/// all have limits (the costlier case).
pub const CPU_LIMIT_MILLICORES: u64 = 500;

/// Creates `n` pods under `rel`, each container limited to
/// [`CPU_LIMIT_MILLICORES`], and starts a light worker in each.
pub fn fake_pods(b: &Bench, rel: &str, n: usize) -> Result<(Vec<FakePod>, Workers)> {
    let mut pods = Vec::with_capacity(n);
    let mut workers = Workers::default();
    for i in 0..n {
        let (uid, container_id) = ids(&format!("{}/{rel}/{i}", std::process::id()));
        let cg = b
            .tree
            .cgroup(&format!("{rel}/kubepods/burstable/pod{uid}/{container_id}"))?;
        if !cg.limit_cpu(CPU_LIMIT_MILLICORES)? && i == 0 {
            progress("no cpu controller covers the pods: they run without CPU limits");
        }
        workers.0.push(cg.worker(b, &LIGHT_TICK)?);
        pods.push(FakePod { container_id, cg });
    }
    Ok((pods, workers))
}

/// podmeter's CPU counter per container id.
fn cpu_by_container(s: &[Sample]) -> HashMap<&str, f64> {
    s.iter()
        .filter(|x| x.name == CPU)
        .filter_map(|x| Some((x.label("container_id")?, x.value)))
        .collect()
}

/// The kernel's CPU of every pod read just before and just after one
/// scrape (midpoint, and the spread between the two reads).
struct Point {
    kernel: Vec<f64>,
    spread: Vec<f64>,
    podmeter: Vec<Option<f64>>,
    body_len: usize,
    samples: Vec<Sample>,
}

fn point(agent: &Agent, pods: &[FakePod]) -> Result<Point> {
    let before: Vec<f64> = pods
        .iter()
        .map(|p| p.cg.cpu_secs())
        .collect::<Result<_>>()?;
    let (_, body) = agent.endpoint.fetch()?;
    let after: Vec<f64> = pods
        .iter()
        .map(|p| p.cg.cpu_secs())
        .collect::<Result<_>>()?;
    let samples = parse_exposition(&body)?;
    let by_id = cpu_by_container(&samples);
    Ok(Point {
        kernel: before
            .iter()
            .zip(&after)
            .map(|(a, c)| (a + c) / 2.0)
            .collect(),
        spread: before.iter().zip(&after).map(|(a, c)| c - a).collect(),
        podmeter: pods
            .iter()
            .map(|p| by_id.get(p.container_id.as_str()).copied())
            .collect(),
        body_len: body.len(),
        samples,
    })
}

/// Per-container CPU error between two points: podmeter's delta against
/// the kernel's.
fn cpu_errors(a: &Point, c: &Point) -> CpuAccuracy {
    let mut errs = Vec::new();
    let (mut pm_sum, mut k_sum, mut missing) = (0.0, 0.0, 0);
    for i in 0..a.kernel.len() {
        let (Some(p0), Some(p1)) = (a.podmeter[i], c.podmeter[i]) else {
            missing += 1;
            continue;
        };
        let dk = c.kernel[i] - a.kernel[i];
        let dp = p1 - p0;
        pm_sum += dp;
        k_sum += dk;
        if dk > 0.0 {
            errs.push(((dp - dk) / dk * 100.0).abs());
        }
    }
    let spread = a
        .spread
        .iter()
        .chain(&c.spread)
        .fold(0.0f64, |m, x| m.max(*x));
    CpuAccuracy {
        containers: a.kernel.len() as u64,
        missing_in_podmeter: missing,
        kernel_cpu_secs: round(k_sum, 4),
        podmeter_cpu_secs: round(pm_sum, 4),
        total_error_pct: rounded(super::error_pct(pm_sum, k_sum), 3),
        per_container_abs_error_pct: Percentiles {
            p50: rounded(percentile(&errs, 50.0), 3),
            p99: rounded(percentile(&errs, 99.0), 3),
            max: rounded(percentile(&errs, 100.0), 3),
        },
        max_cpu_stat_read_spread_ms: round(spread * 1e3, 3),
    }
}

fn gauge(s: &[Sample], name: &str, label: (&str, &str)) -> Option<f64> {
    s.iter()
        .find(|x| x.name == name && x.label(label.0) == Some(label.1))
        .map(|x| x.value)
}

fn one(b: &Bench, n: usize) -> Result<AtPods> {
    let rel = format!("scale-{n}");
    // Dropped last: the workers go first, then their cgroups.
    let _cgroups = Remove(&b.tree, rel.clone());
    let t = Instant::now();
    let (pods, workers) = fake_pods(b, &rel, n)?;
    progress(&format!(
        "{n} pods: cgroups and workers started in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let agent = Agent::start(b, &rel)?;
    let t = Instant::now();
    let ids: Vec<&str> = pods.iter().map(|p| p.container_id.as_str()).collect();
    scrape_until(
        &agent,
        Duration::from_secs(120),
        &format!("all {n} containers"),
        |s| {
            let m = cpu_by_container(s);
            ids.iter().all(|id| m.contains_key(id))
        },
    )?;
    let seen_secs = t.elapsed().as_secs_f64();

    let idle = Duration::from_secs(b.plan.idle_secs);
    progress(&format!("{n} pods: idle window ({} s)", idle.as_secs()));
    let c0 = agent.cpu_secs()?;
    let t0 = Instant::now();
    sleep(idle);
    let background = (agent.cpu_secs()? - c0) / t0.elapsed().as_secs_f64();

    let window = Duration::from_secs(b.plan.window_secs);
    progress(&format!(
        "{n} pods: scraped every {} s for {} s",
        SCRAPE_EVERY.as_secs(),
        window.as_secs()
    ));
    let cpu0 = agent.cpu_secs()?;
    let proc0 = super::proc_cpu_secs(agent.pid(), b.clk_tck)?;
    let t0 = Instant::now();
    let first = point(&agent, &pods)?;
    // The scrapes between the first and the last are timed as Prometheus
    // makes them: 15 s apart, gzip accepted, each on a connection of its
    // own. Their bodies are not decoded (curl inflating 4 MB would add its
    // own milliseconds), as in the burst.
    let mut spaced = Vec::new();
    let mut k = 1;
    while SCRAPE_EVERY * k < window {
        sleep((t0 + SCRAPE_EVERY * k).saturating_duration_since(Instant::now()));
        spaced.extend(agent.endpoint.burst(1)?);
        k += 1;
    }
    sleep((t0 + window).saturating_duration_since(Instant::now()));
    let secs = t0.elapsed().as_secs_f64();
    let cpu = agent.cpu_secs()? - cpu0;
    let proc_cpu = super::proc_cpu_secs(agent.pid(), b.clk_tck)? - proc0;
    let last = point(&agent, &pods)?;
    let accuracy = cpu_errors(&first, &last);

    progress(&format!("{n} pods: {} back-to-back scrapes", b.plan.burst));
    let c0 = agent.cpu_secs()?;
    let t0 = Instant::now();
    let burst = agent.endpoint.burst(b.plan.burst)?;
    let dur = t0.elapsed().as_secs_f64();
    let burst_cpu = agent.cpu_secs()? - c0;
    let per_scrape = (burst_cpu - background * dur).max(0.0) / burst.len() as f64;
    // The same without gzip: what compression costs and saves.
    let c0 = agent.cpu_secs()?;
    let t0 = Instant::now();
    let plain = agent.endpoint.burst_asking(b.plan.burst, false)?;
    let dur = t0.elapsed().as_secs_f64();
    let plain_cpu = agent.cpu_secs()? - c0;
    let plain_per_scrape = (plain_cpu - background * dur).max(0.0) / plain.len() as f64;
    let hwm = agent.hwm_bytes()?;
    let rss = super::proc_status_bytes(agent.pid(), "VmRSS")?;
    let s = &last.samples;
    let window_ms: Vec<f64> = spaced.iter().map(|f| f.secs * 1e3).collect();
    let result = AtPods {
        all_seen_after_secs: round(seen_secs, 1),
        background_cpu_pct: round(background * 100.0, 3),
        window_secs: round(secs, 1),
        // The first and the ones between: the last comes after the window's
        // CPU was read.
        window_scrapes: spaced.len() as u64 + 1,
        cpu_secs_per_min: round(cpu / secs * 60.0, 3),
        cpu_pct_of_one_core: round(cpu / secs * 100.0, 3),
        proc_stat_cpu_secs_per_min: round(proc_cpu / secs * 60.0, 3),
        peak_rss_mib: round(hwm as f64 / 1048576.0, 1),
        rss_mib: round(rss as f64 / 1048576.0, 1),
        window_scrape_ms: window_ms.iter().map(|x| round(*x, 2)).collect(),
        spaced: (!spaced.is_empty()).then(|| burst_summary(&spaced)),
        scrape: burst_summary(&burst),
        cpu_ms_per_scrape: round(per_scrape * 1e3, 3),
        plain: Some(PlainBurst {
            scrape: burst_summary(&plain),
            cpu_ms_per_scrape: round(plain_per_scrape * 1e3, 3),
        }),
        payload_bytes: last.body_len as u64,
        series: s.len() as u64,
        bpf_map_entries_cpu: gauge(s, "podmeter_bpf_map_entries", ("map", "cpu")),
        tracked_live: gauge(s, "podmeter_tracked_cgroups", ("state", "live")),
        cpu_accuracy: accuracy,
    };
    agent.stop()?;
    drop(workers);
    Ok(result)
}

pub fn run(b: &Bench) -> Result<Scale> {
    let mut by_pods = Vec::new();
    for &n in b.plan.scales {
        let outcome = Outcome::from(one(b, n));
        match &outcome {
            Outcome::Failed(e) => progress(&format!("{n} pods failed: {e}")),
            Outcome::Measured(v) => progress(&format!(
                "{n} pods: {} % of one core, peak RSS {} MiB, /metrics p50 {} ms p99 {} ms back to back, p50 {} ms max {} ms 15 s apart, {} bytes",
                v.cpu_pct_of_one_core,
                v.peak_rss_mib,
                num(v.scrape.p50_ms, 2),
                num(v.scrape.p99_ms, 2),
                num(v.spaced.as_ref().and_then(|s| s.p50_ms), 2),
                num(v.spaced.as_ref().and_then(|s| s.max_ms), 2),
                v.payload_bytes
            )),
        }
        by_pods.push(ScaleRow {
            meta: Pods { pods: n as u64 },
            outcome,
        });
    }
    Ok(Scale { by_pods })
}
