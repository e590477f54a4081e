//! The benchmark's results: what `bench/results/<time>-<mode>.json` holds
//! (schema [`SCHEMA_VERSION`]; version 1 files, written before the field
//! existed, read the same) and what the report is rendered from.

use serde::{Deserialize, Serialize};

use crate::schema::version_1;
pub use crate::schema::{Outcome, Ran, SCHEMA_VERSION};

/// One run of `cargo xtask bench`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BenchResults {
    #[serde(default = "version_1")]
    pub schema_version: u32,
    /// `quick` or `full`.
    pub mode: String,
    /// UTC, `2026-11-30T184237Z`.
    pub started: String,
    /// A remark added by hand after the run, shown above the tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub machine: Machine,
    pub plan: PlanRecord,
    /// Each scenario, absent when the run left it out
    /// (`PODMETER_BENCH_ONLY`) or was made before it existed (`overhead`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overhead: Option<Scenario<Overhead>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Scenario<Kernel>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scenario<Scale>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<Scenario<Accuracy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side_by_side: Option<Scenario<SideBySide>>,
    pub total_secs: Option<f64>,
    /// Judged from the figures when written (and again when rendered).
    #[serde(default)]
    pub targets: Vec<Target>,
}

/// A scenario's figures or error, with what the machine did meanwhile.
pub type Scenario<T> = Ran<Conditions, T>;

/// What the machine did while a scenario ran (this benchmark included).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Conditions {
    /// `/proc/loadavg`'s first three fields.
    #[serde(default)]
    pub load_at_start: Option<String>,
    #[serde(default)]
    pub load_at_end: Option<String>,
    #[serde(default)]
    pub machine_busy_pct: Option<f64>,
    #[serde(default)]
    pub machine_steal_pct: Option<f64>,
    #[serde(default)]
    pub secs: Option<f64>,
}

/// The machine, kernel and versions, for the record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Machine {
    pub cpu: String,
    pub cpus: u64,
    pub hypervisor: bool,
    pub memory_gib: f64,
    pub kernel: String,
    pub cgroups: String,
    pub podmeter: String,
    pub kubelet: String,
    pub node_exporter: String,
    pub stress_ng: String,
    pub iperf3: String,
    pub bpftool: String,
    pub rustc: String,
}

/// How long and how big the scenarios were ([`crate::bench::Plan`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PlanRecord {
    pub kernel_secs: u64,
    pub scales: Vec<u64>,
    pub idle_secs: u64,
    pub window_secs: u64,
    pub scrape_every_secs: u64,
    pub burst: u64,
    pub accuracy_secs: u64,
    pub tcp_bytes: u64,
    pub udp_count: u64,
    pub light_pods: u64,
    pub cadvisor_burst: u64,
    pub light_worker: String,
    /// Absent in runs before the scale scenario's pods had CPU limits.
    #[serde(default)]
    pub scale_cpu_limit_millicores: Option<u64>,
    /// Rounds and seconds per workload run of the A/B scenario (absent in
    /// runs before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab_rounds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab_secs: Option<u64>,
}

// ---------------------------------------------------------------------------
// 0. What workloads pay (A/B)

/// Interleaved runs of workloads without the agent, with it, and with it
/// and BPF statistics on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Overhead {
    pub rounds: u64,
    /// Each workload run's length. (Not `secs`: the scenario's JSON object
    /// also holds its [`Conditions`], whose `secs` is the whole scenario's.)
    pub run_secs: u64,
    pub workloads: Vec<AbWorkload>,
}

/// One workload's throughput in each arm, a figure per round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AbWorkload {
    /// `switch`, `udp` or `tcp`.
    pub name: String,
    /// The command line.
    pub load: String,
    /// What the figures count (`bogo ops/s`, `packets/s`, `Gbit/s`).
    pub unit: String,
    pub detached: Vec<Option<f64>>,
    /// Attached, BPF statistics off.
    pub attached: Vec<Option<f64>>,
    pub attached_stats: Vec<Option<f64>>,
    /// No agent, empty programs where its programs attach (the floor);
    /// absent from runs before it was measured.
    #[serde(default)]
    pub empty_programs: Vec<Option<f64>>,
    /// The programs' cost during the statistics-on runs, every round's
    /// together.
    pub programs: Vec<ProgramCost>,
}

/// A range that holds the median of what was sampled with at least the
/// given confidence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
    /// The chance that such a range holds the median, 0 to 1.
    pub confidence: f64,
}

/// The confidence [`median_interval`] asks for.
pub const INTERVAL_CONFIDENCE: f64 = 0.9;

/// The narrowest interval between order statistics, `x(k)` to
/// `x(n+1-k)`, that holds the median of independent draws with a chance of
/// at least [`INTERVAL_CONFIDENCE`], whatever their distribution: each draw
/// falls below the median with probability one half, so the chance is
/// `1 - 2 P(Binomial(n, 1/2) < k)`. `None` below 5 figures, too few for
/// any such interval.
pub fn median_interval(v: &[f64]) -> Option<Interval> {
    let mut x = v.to_vec();
    x.sort_by(f64::total_cmp);
    let n = x.len();
    // P(Binomial(n, 1/2) <= j) for j = 0, 1, ...
    let mut below = Vec::with_capacity(n);
    let (mut choose, mut sum) = (1.0_f64, 0.0);
    for j in 0..n {
        sum += choose;
        below.push(sum / 2f64.powi(n as i32));
        choose = choose * (n - j) as f64 / (j + 1) as f64;
    }
    // The largest k whose interval still has the confidence.
    let k = (1..=n / 2)
        .take_while(|&k| 1.0 - 2.0 * below[k - 1] >= INTERVAL_CONFIDENCE)
        .last()?;
    Some(Interval {
        lo: x[k - 1],
        hi: x[n - k],
        confidence: 1.0 - 2.0 * below[k - 1],
    })
}

/// Each round's loss of `with` against `without`, in %, where both ran
/// (positive: slower with).
fn paired(without: &[Option<f64>], with: &[Option<f64>]) -> Vec<f64> {
    without
        .iter()
        .zip(with)
        .filter_map(|(d, a)| {
            let d = d.filter(|d| *d > 0.0)?;
            Some((d - (*a)?) / d * 100.0)
        })
        .collect()
}

/// The median of the figures there are (the mean of the middle two for an
/// even count).
pub fn median(v: &[Option<f64>]) -> Option<f64> {
    let mut x: Vec<f64> = v.iter().flatten().copied().collect();
    if x.is_empty() {
        return None;
    }
    x.sort_by(f64::total_cmp);
    let n = x.len();
    Some(if n % 2 == 1 {
        x[n / 2]
    } else {
        (x[n / 2 - 1] + x[n / 2]) / 2.0
    })
}

impl AbWorkload {
    /// Throughput lost with the agent, in % of the median without it, from
    /// the medians (statistics on with `stats`): negative when faster.
    pub fn loss_pct(&self, stats: bool) -> Option<f64> {
        let base = median(&self.detached).filter(|b| *b > 0.0)?;
        let with = median(if stats {
            &self.attached_stats
        } else {
            &self.attached
        })?;
        Some((base - with) / base * 100.0)
    }

    /// What the empty programs alone cost, in % of the medians: the part
    /// of [`AbWorkload::loss_pct`] no program body can save.
    pub fn empty_programs_loss_pct(&self) -> Option<f64> {
        let base = median(&self.detached).filter(|b| *b > 0.0)?;
        Some((base - median(&self.empty_programs)?) / base * 100.0)
    }

    /// Each round's own loss (statistics on with `stats`), in %: the
    /// spread.
    pub fn round_losses(&self, stats: bool) -> Vec<f64> {
        let with = if stats {
            &self.attached_stats
        } else {
            &self.attached
        };
        paired(&self.detached, with)
    }

    /// The median of the rounds' own losses: each compares runs made
    /// minutes apart at most, so a machine whose speed drifts over the
    /// scenario (a VM's neighbours) weighs on it less than on the medians'
    /// difference. The targets are judged on it.
    pub fn round_median_loss_pct(&self, stats: bool) -> Option<f64> {
        let v: Vec<Option<f64>> = self.round_losses(stats).into_iter().map(Some).collect();
        median(&v)
    }

    /// A distribution-free interval for [`AbWorkload::round_median_loss_pct`]
    /// (see [`median_interval`]).
    pub fn round_loss_interval(&self, stats: bool) -> Option<Interval> {
        median_interval(&self.round_losses(stats))
    }

    /// Each round's own loss with the empty programs alone, in %.
    pub fn round_floor_losses(&self) -> Vec<f64> {
        paired(&self.detached, &self.empty_programs)
    }

    /// The median of [`AbWorkload::round_floor_losses`].
    pub fn round_median_empty_programs_loss_pct(&self) -> Option<f64> {
        let v: Vec<Option<f64>> = self.round_floor_losses().into_iter().map(Some).collect();
        median(&v)
    }

    /// The per-event cost of `program` during the statistics-on runs.
    pub fn ns_per_event(&self, program: &str) -> Option<f64> {
        self.programs
            .iter()
            .find(|p| p.program == program)?
            .ns_per_event
    }
}

// ---------------------------------------------------------------------------
// 1. Kernel

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Kernel {
    /// `pm_*` programs of other podmeter instances loaded at the start.
    pub other_podmeter_programs_loaded: u64,
    pub switch_throughput: SwitchThroughput,
    pub context_switch_load: Load,
    pub packet_flood: Load,
    /// TCP under random loss, for the retransmit program (absent from runs
    /// made before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lossy_tcp: Option<Load>,
    /// The context-switch storm again, with an agent run with
    /// `--wait-histogram` (absent from runs made before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_switch_load_wait_histogram: Option<Load>,
}

impl Kernel {
    /// Every load measured, in the order run.
    pub fn loads(&self) -> impl Iterator<Item = &Load> {
        [&self.context_switch_load, &self.packet_flood]
            .into_iter()
            .chain(self.lossy_tcp.as_ref())
            .chain(self.context_switch_load_wait_histogram.as_ref())
    }

    /// Context-switch throughput lost with the agent attached (statistics
    /// off), in % of the throughput without it: negative when faster.
    pub fn switch_slowdown_pct(&self) -> Option<f64> {
        let sw = &self.switch_throughput;
        let base = sw.without_agent.bogo_ops_per_sec.filter(|b| *b > 0.0)?;
        let with = sw.with_agent_stats_off.bogo_ops_per_sec?;
        Some((base - with) / base * 100.0)
    }
}

/// `stress-ng --switch` without the agent, with it (statistics off), and
/// with it and BPF statistics on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SwitchThroughput {
    pub without_agent: SwitchRun,
    pub with_agent_stats_off: SwitchRun,
    pub with_agent_stats_on: SwitchRun,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SwitchRun {
    pub instances: u64,
    pub secs: u64,
    pub bogo_ops_per_sec: Option<f64>,
    pub ns_per_switch: Option<f64>,
    /// Every run's throughput, when this is the best of several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_bogo_ops_per_sec: Option<Vec<Option<f64>>>,
}

/// One load and what each program cost under it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Load {
    /// The load, as a command line.
    pub load: String,
    /// The packet flood's own figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iperf3_packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iperf3_lost_percent: Option<f64>,
    /// Segments the TCP sender retransmitted, by iperf3's count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iperf3_retransmits: Option<u64>,
    pub programs: Vec<ProgramCost>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ProgramCost {
    pub program: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub events: u64,
    pub events_per_sec: f64,
    /// None when the program did not run.
    pub ns_per_event: Option<f64>,
    pub cpu_pct_of_one_core: f64,
    /// Runs skipped because the program was already running on that CPU
    /// (not recorded before 2026-11-30).
    #[serde(default)]
    pub recursion_misses: Option<u64>,
}

// ---------------------------------------------------------------------------
// 2. Scale

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Scale {
    pub by_pods: Vec<ScaleRow>,
}

/// One pod count: its figures, or why there are none.
pub type ScaleRow = Ran<Pods, AtPods>;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Pods {
    pub pods: u64,
}

/// The agent with that many pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AtPods {
    pub all_seen_after_secs: f64,
    /// Without scrapes.
    pub background_cpu_pct: f64,
    pub window_secs: f64,
    pub window_scrapes: u64,
    /// Over the window scraped every 15 s: the headline figures.
    pub cpu_secs_per_min: f64,
    pub cpu_pct_of_one_core: f64,
    pub proc_stat_cpu_secs_per_min: f64,
    pub peak_rss_mib: f64,
    pub rss_mib: f64,
    /// Schema 3: the window's scrapes between its first and last, in order,
    /// timed as the burst's (body not decoded). Schema 2 and before: the
    /// first scrape too, all timed with curl decoding the body.
    pub window_scrape_ms: Vec<f64>,
    /// The same scrapes, summed up: latency as Prometheus sees it, each 15 s
    /// after the one before (runs before it have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spaced: Option<BurstSummary>,
    /// The burst of back-to-back scrapes.
    pub scrape: BurstSummary,
    pub cpu_ms_per_scrape: f64,
    /// The same burst without `Accept-Encoding: gzip` (runs before gzip
    /// have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain: Option<PlainBurst>,
    pub payload_bytes: u64,
    pub series: u64,
    pub bpf_map_entries_cpu: Option<f64>,
    pub tracked_live: Option<f64>,
    pub cpu_accuracy: CpuAccuracy,
}

/// A burst of scrapes that did not accept gzip, and its CPU per scrape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PlainBurst {
    pub scrape: BurstSummary,
    pub cpu_ms_per_scrape: f64,
}

/// Latency and size of a burst of scrapes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BurstSummary {
    pub scrapes: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Of the last scrape (gzip, where the exposer compresses).
    pub wire_bytes: u64,
}

/// podmeter's CPU against every container's `cpu.stat` over the window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CpuAccuracy {
    pub containers: u64,
    pub missing_in_podmeter: u64,
    pub kernel_cpu_secs: f64,
    pub podmeter_cpu_secs: f64,
    pub total_error_pct: Option<f64>,
    pub per_container_abs_error_pct: Percentiles,
    pub max_cpu_stat_read_spread_ms: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

// ---------------------------------------------------------------------------
// 3. Accuracy on this host

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Accuracy {
    pub cpu: HostCpu,
    pub network: HostNetwork,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HostCpu {
    pub window_secs: f64,
    pub cgroups: Vec<HostCgroupCpu>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HostCgroupCpu {
    pub cgroup: String,
    /// `pm-work` arguments.
    pub work: String,
    pub kernel_cpu_pct: f64,
    pub kernel_cpu_secs: f64,
    pub podmeter_cpu_secs: Option<f64>,
    pub error_pct: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HostNetwork {
    pub flows: Vec<Flow>,
    pub tcp_application: TcpApplication,
    pub udp_datagrams: UdpDatagrams,
}

/// One direction of one flow: podmeter against a ground truth.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Flow {
    /// `tcp` or `udp`.
    pub flow: String,
    /// Which side and direction.
    pub counter: String,
    pub podmeter_bytes: f64,
    pub truth_bytes: f64,
    /// What the truth is.
    pub truth: String,
    pub error_pct: Option<f64>,
}

/// What the TCP sender (and receiver) reported.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TcpApplication {
    pub payload_written: Option<f64>,
    pub payload_on_wire_incl_retransmits: Option<f64>,
    /// On this host only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmitted: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_received: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct UdpDatagrams {
    pub sent: u64,
    pub received_by_the_application: f64,
}

// ---------------------------------------------------------------------------
// 4. Side by side

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SideBySide {
    pub bench_pods: u64,
    pub pods_on_node: u64,
    pub exposers: Vec<Exposer>,
    pub cpu: Vec<PodCpu>,
    pub network: Vec<PodNetwork>,
    pub node_exporter_args: Vec<String>,
    pub tcp_application: TcpApplication,
    pub udp_datagrams_sent: u64,
}

/// One `/metrics` exposer's cost.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Exposer {
    /// `podmeter`, `node-exporter` or `kubelet cAdvisor`.
    pub exposer: String,
    pub scrape: BurstSummary,
    pub payload_bytes: u64,
    pub series: u64,
    pub cpu_ms_per_scrape: f64,
    pub idle_cpu_pct: f64,
    pub cpu_source: String,
}

/// A pod's CPU: podmeter and cAdvisor against `cpu.stat`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PodCpu {
    pub pod: String,
    pub kernel_cpu_pct: f64,
    pub kernel_cpu_secs: f64,
    pub podmeter_cpu_secs: Option<f64>,
    pub podmeter_error_pct: Option<f64>,
    pub cadvisor_cpu_secs: Option<f64>,
    pub kernel_cpu_secs_at_cadvisor_times: Option<f64>,
    pub cadvisor_error_pct: Option<f64>,
    pub cadvisor_sample_age_max_secs: Option<f64>,
}

/// A pod's bytes one way: podmeter and cAdvisor against the pod's IP
/// counters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PodNetwork {
    pub pod: String,
    /// `transmit` or `receive`.
    pub direction: String,
    pub truth_ip_bytes: f64,
    pub podmeter_bytes: f64,
    pub podmeter_error_pct: Option<f64>,
    pub cadvisor_eth0_bytes: Option<f64>,
    pub cadvisor_error_pct: Option<f64>,
}

// ---------------------------------------------------------------------------
// Targets

/// One target: what was measured, and whether it is met. `met` is `None`
/// when the run did not produce the figure (`measured` is `None` too), or,
/// beside a figure, when the A/B rounds cannot tell (see
/// [`median_interval`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Target {
    pub target: String,
    pub measured: Option<String>,
    pub met: Option<bool>,
}

impl BenchResults {
    /// Whether some scenario was left out (`PODMETER_BENCH_ONLY`).
    pub fn is_partial(&self) -> bool {
        self.overhead.is_none()
            || self.kernel.is_none()
            || self.scale.is_none()
            || self.accuracy.is_none()
            || self.side_by_side.is_none()
    }

    pub fn kernel(&self) -> Option<&Kernel> {
        self.kernel.as_ref()?.outcome.measured()
    }

    pub fn overhead(&self) -> Option<&Overhead> {
        self.overhead.as_ref()?.outcome.measured()
    }

    /// The A/B figures of workload `name`.
    pub fn workload(&self, name: &str) -> Option<&AbWorkload> {
        self.overhead()?.workloads.iter().find(|w| w.name == name)
    }

    pub fn scale(&self) -> Option<&Scale> {
        self.scale.as_ref()?.outcome.measured()
    }

    pub fn accuracy(&self) -> Option<&Accuracy> {
        self.accuracy.as_ref()?.outcome.measured()
    }

    pub fn side_by_side(&self) -> Option<&SideBySide> {
        self.side_by_side.as_ref()?.outcome.measured()
    }

    /// The scale scenario's figures at `n` pods.
    pub fn at_pods(&self, n: u64) -> Option<&AtPods> {
        self.scale()?
            .by_pods
            .iter()
            .find(|r| r.meta.pods == n)?
            .outcome
            .measured()
    }

    /// The side-by-side figures of the exposer called `name`.
    pub fn exposer(&self, name: &str) -> Option<&Exposer> {
        self.side_by_side()?
            .exposers
            .iter()
            .find(|e| e.exposer == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_is_between_order_statistics() {
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        let i = median_interval(&ten).unwrap();
        // 1 - 2 (1 + 10) / 1024: the 2nd and 9th of 10.
        assert_eq!((i.lo, i.hi), (2.0, 9.0));
        assert!((i.confidence - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
        let five = [5.0, 1.0, 3.0, 2.0, 4.0];
        let i = median_interval(&five).unwrap();
        assert_eq!((i.lo, i.hi, i.confidence), (1.0, 5.0, 1.0 - 2.0 / 32.0));
        // Four draws: even their whole range holds the median only 87.5 %
        // of the time.
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, 4.0]), None);
        assert_eq!(median_interval(&[]), None);
    }
}
