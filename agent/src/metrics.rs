//! Prometheus exposition of podmeter's numbers.
//!
//! [`Exporter`] turns each scrape's [`Snapshot`] into metric families:
//! `podmeter_container_*` for cgroups the kubelet made (labels `namespace`,
//! `pod`, `container` from the Kubernetes API, `pod_uid`, `container_id` —
//! empty for the pod-level cgroup — `runtime`, `qos`, and the optional
//! owner and pod-label labels) and
//! `podmeter_cgroup_*` for everything else (label `cgroup`, the path). Every
//! series also carries `node`. Counters are exclusive, not hierarchical: a
//! cgroup is billed for the tasks and sockets directly in it, so summing
//! containers gives the pod without double counting. The limit, throttling,
//! pressure and subtree OOM kill families are the exception: they are the
//! kernel's own per-cgroup numbers, which cover the cgroup's whole subtree.
//! `podmeter_node_cpus` puts usage in proportion to the node.

use crate::ids::IdMap;
use podmeter_common::{WAIT_BUCKETS, wait_bucket_bound_ns};
use prometheus::{
    Histogram, HistogramOpts, IntGauge, Opts, Registry,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    bpf::Signals,
    cgroup::{Identity, cpu::Throttling, pressure::Totals},
    kube::Names,
    node,
    tracker::{COLLECTORS, Row, Snapshot, Tracker},
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use bytes::Bytes;
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

/// One family's exposition text, with a fingerprint of what made it: two
/// families with the same fingerprint have the same text (xxh3-128), so a
/// scrape can take the last scrape's text again, and gzip its compressed
/// bytes, without looking at the text.
#[derive(Clone, Debug)]
pub struct Family {
    pub text: Bytes,
    pub fingerprint: u128,
}

impl Family {
    /// A family fingerprinted by its text.
    pub fn new(text: String) -> Self {
        Self {
            fingerprint: xxh3_128(text.as_bytes()),
            text: text.into(),
        }
    }
}

/// The last scrape's families by name: what the next may reuse.
type Last = HashMap<String, Family>;

/// A row's label block and sort key, as the last scrape wrote them, by
/// cgroup id. They are the same while the row's cgroup is the same `Arc`
/// (a cgroup's path and identity never change) and its names are the same
/// `Arc` or equal ones (names change by being replaced): at a thousand
/// pods, escaping and writing
/// them was a tenth of a scrape. An entry holds both `Arc`s, so neither
/// can be freed and its address reused by another cgroup's while cached
/// (until the next scrape: a departed cgroup's files are closed already).
#[derive(Clone, Default)]
struct LabelCache(IdMap<Labels>);

#[derive(Clone)]
struct Labels {
    cgroup: Arc<crate::index::Cgroup>,
    names: Option<Arc<Names>>,
    key: Arc<str>,
    text: Arc<str>,
}

impl Labels {
    fn fits(&self, row: &Row) -> bool {
        Arc::ptr_eq(&self.cgroup, &row.cgroup)
            && match (&self.names, &row.names) {
                // Names not yet final (a pod sandbox's, which never has a
                // container name) come in a new Arc at every scrape: equal
                // values are the same labels.
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// How one per-cgroup metric is named, described and read from a [`Row`].
struct Spec {
    suffix: &'static str,
    help: &'static str,
    kind: MetricType,
    value: fn(&Row) -> Option<f64>,
    /// What the kernel must count for the family to go out at all: a
    /// family the programs cannot count is left out, not exported as zeros.
    needs: Need,
    /// Whether the value is one the refresher reads (memory, limits, OOM
    /// kills, pressure): it changes only when the index is published
    /// again, so its family can be rendered between scrapes
    /// ([`Exporter::prerender`]). The others come from the maps and
    /// `cpu.stat`, read by each scrape.
    refreshed: bool,
}

#[derive(Clone, Copy)]
enum Need {
    Nothing,
    RunQueue,
    Retransmits,
}

impl Need {
    fn met(self, s: Signals) -> bool {
        match self {
            Need::Nothing => true,
            Need::RunQueue => s.run_queue,
            Need::Retransmits => s.retransmits,
        }
    }
}

const NS_PER_S: f64 = 1e9;
const US_PER_S: f64 = 1e6;

/// The per-cgroup metrics (exposed in family name order). Documented in the
/// README.
const SPECS: [Spec; 23] = [
    Spec {
        suffix: "cpu_usage_seconds_total",
        help: "CPU time consumed by tasks in the cgroup (sched_switch accounting, idle excluded).",
        kind: MetricType::COUNTER,
        value: |r| r.cpu.map(|c| c.time_ns as f64 / NS_PER_S),
        needs: Need::Nothing,
        refreshed: false,
    },
    Spec {
        suffix: "context_switches_total",
        help: "Times a task of the cgroup left the CPU.",
        kind: MetricType::COUNTER,
        value: |r| r.cpu.map(|c| c.switches as f64),
        needs: Need::Nothing,
        refreshed: false,
    },
    Spec {
        suffix: "cpu_wait_seconds_total",
        help: "Time tasks of the cgroup waited, runnable, in a CPU run queue (the kernel's sched_info run_delay), summed over tasks.",
        kind: MetricType::COUNTER,
        value: |r| r.cpu.map(|c| c.wait_ns as f64 / NS_PER_S),
        needs: Need::RunQueue,
        refreshed: false,
    },
    Spec {
        suffix: "cpu_waits_total",
        help: "Run-queue waits of the cgroup's tasks that ended on a CPU (sched_info pcount); average delay = rate(cpu_wait_seconds_total) / rate(cpu_waits_total).",
        kind: MetricType::COUNTER,
        value: |r| r.cpu.map(|c| c.waits as f64),
        needs: Need::RunQueue,
        refreshed: false,
    },
    Spec {
        suffix: "network_receive_bytes_total",
        help: "Bytes received by sockets of the cgroup, IP headers included.",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.rx_bytes as f64),
        needs: Need::Nothing,
        refreshed: false,
    },
    Spec {
        suffix: "network_receive_packets_total",
        help: "Packets received by sockets of the cgroup.",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.rx_packets as f64),
        needs: Need::Nothing,
        refreshed: false,
    },
    Spec {
        suffix: "network_transmit_bytes_total",
        help: "Bytes sent by sockets of the cgroup, IP headers included.",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.tx_bytes as f64),
        needs: Need::Nothing,
        refreshed: false,
    },
    Spec {
        suffix: "network_transmit_packets_total",
        help: "Packets sent by sockets of the cgroup.",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.tx_packets as f64),
        needs: Need::Nothing,
        refreshed: false,
    },
    Spec {
        suffix: "network_tcp_retransmits_total",
        help: "TCP segments retransmitted by sockets of the cgroup (their tcpi_total_retrans, billed to the socket's cgroup).",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.retransmits as f64),
        needs: Need::Retransmits,
        refreshed: false,
    },
    Spec {
        suffix: "memory_working_set_bytes",
        help: "Memory working set of the cgroup: usage minus inactive file cache.",
        kind: MetricType::GAUGE,
        value: |r| r.memory.map(|m| m as f64),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "memory_limit_bytes",
        help: "Memory limit of the cgroup in bytes (memory.max, or memory.limit_in_bytes); it applies to the cgroup's whole subtree. Absent without a limit.",
        kind: MetricType::GAUGE,
        value: |r| r.memory_limit.map(|m| m as f64),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "oom_kills_total",
        help: "Processes of the cgroup killed by the OOM killer (memory.events.local oom_kill on cgroup v2, memory.oom_control oom_kill on v1).",
        kind: MetricType::COUNTER,
        value: |r| r.oom_kills.map(|n| n as f64),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "subtree_oom_kills_total",
        help: "Processes killed by the OOM killer in the cgroup and every cgroup below it, removed ones included (memory.events oom_kill, hierarchical): for pod-level cgroups, the pod's kills, also those that ended a container. Cgroup v2 only, and not under the memory_localevents mount option.",
        kind: MetricType::COUNTER,
        value: |r| r.subtree_oom_kills.map(|n| n as f64),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "pressure_cpu_waiting_seconds_total",
        help: "Time some task of the cgroup or its descendants was runnable but waiting for a CPU, in seconds (cpu.pressure some total; pressure stall information covers the whole subtree).",
        kind: MetricType::COUNTER,
        value: |r| some(r.pressure.cpu),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "pressure_cpu_stalled_seconds_total",
        help: "Time all non-idle tasks of the cgroup and its descendants were waiting for a CPU at once, in seconds (cpu.pressure full total; covers the whole subtree). Absent at the root and before Linux 5.13.",
        kind: MetricType::COUNTER,
        value: |r| full(r.pressure.cpu),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "pressure_memory_waiting_seconds_total",
        help: "Time some task of the cgroup or its descendants was stalled on memory (reclaim, refaults, swap-in), in seconds (memory.pressure some total; covers the whole subtree).",
        kind: MetricType::COUNTER,
        value: |r| some(r.pressure.memory),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "pressure_memory_stalled_seconds_total",
        help: "Time all non-idle tasks of the cgroup and its descendants were stalled on memory at once, in seconds (memory.pressure full total; covers the whole subtree).",
        kind: MetricType::COUNTER,
        value: |r| full(r.pressure.memory),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "pressure_io_waiting_seconds_total",
        help: "Time some task of the cgroup or its descendants was waiting for IO, in seconds (io.pressure some total; covers the whole subtree).",
        kind: MetricType::COUNTER,
        value: |r| some(r.pressure.io),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "pressure_io_stalled_seconds_total",
        help: "Time all non-idle tasks of the cgroup and its descendants were waiting for IO at once, in seconds (io.pressure full total; covers the whole subtree).",
        kind: MetricType::COUNTER,
        value: |r| full(r.pressure.io),
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "cpu_limit_cores",
        help: "CPU limit of the cgroup in cores: CFS quota / period (cpu.max, or cpu.cfs_quota_us / cpu.cfs_period_us). Absent without a limit.",
        kind: MetricType::GAUGE,
        value: |r| r.cpu_limit,
        needs: Need::Nothing,
        refreshed: true,
    },
    Spec {
        suffix: "cpu_periods_total",
        help: "CFS bandwidth enforcement periods in which the cgroup had runnable tasks (cpu.stat nr_periods).",
        kind: MetricType::COUNTER,
        value: |r| throttling(r).map(|t| t.periods as f64),
        needs: Need::Nothing,
        refreshed: false,
    },
    Spec {
        suffix: "cpu_throttled_periods_total",
        help: "CFS periods in which the cgroup used up its quota and was throttled (cpu.stat nr_throttled).",
        kind: MetricType::COUNTER,
        value: |r| throttling(r).map(|t| t.throttled_periods as f64),
        needs: Need::Nothing,
        refreshed: false,
    },
    Spec {
        suffix: "cpu_throttled_seconds_total",
        help: "Time the cgroup's tasks were throttled by its CPU limit, in seconds (cpu.stat throttled_usec, or throttled_time).",
        kind: MetricType::COUNTER,
        value: |r| throttling(r).map(|t| t.throttled_seconds),
        needs: Need::Nothing,
        refreshed: false,
    },
];

fn throttling(r: &Row) -> Option<Throttling> {
    r.throttling
}

fn some(t: Option<Totals>) -> Option<f64> {
    t.map(|t| t.some_us as f64 / US_PER_S)
}

fn full(t: Option<Totals>) -> Option<f64> {
    t?.full_us.map(|us| us as f64 / US_PER_S)
}

/// The run-queue wait histogram (`--wait-histogram`), by prefix.
const WAIT_HIST: (&str, &str) = (
    "cpu_wait_duration_seconds",
    "Run-queue waits of the cgroup's tasks by duration (--wait-histogram): each wait that ended on a CPU, in log2 buckets from 2^18 ns (262 us) to 2^24 ns (16.8 ms); _sum is cpu_wait_seconds_total.",
);

/// A row's wait histogram as `(upper bound in seconds, cumulative count)`
/// per bucket (the last `+Inf`), and the sum in seconds: for rows with CPU
/// counters and a histogram read.
fn wait_buckets(r: &Row) -> Option<([(f64, u64); WAIT_BUCKETS], f64)> {
    let cpu = r.cpu?;
    let counts = r.wait_hist?.counts;
    let mut out = [(f64::INFINITY, 0); WAIT_BUCKETS];
    let mut total = 0;
    for (i, (o, n)) in out.iter_mut().zip(counts).enumerate() {
        total += n;
        if i < WAIT_BUCKETS - 1 {
            o.0 = wait_bucket_bound_ns(i) as f64 / NS_PER_S;
        }
        o.1 = total;
    }
    Some((out, cpu.wait_ns as f64 / NS_PER_S))
}

const CONTAINER_PREFIX: &str = "podmeter_container_";
const CGROUP_PREFIX: &str = "podmeter_cgroup_";
const MAPS: [&str; 2] = ["cpu", "net"];

/// Renders per-cgroup metrics and podmeter's own map and tracking gauges
/// from a [`Snapshot`].
///
/// The per-cgroup families are the bulk of a scrape (23 families × every
/// counted cgroup), so they are written straight in the text exposition
/// format: each row's label set is escaped and formatted once per scrape,
/// not once per family, and no intermediate `MetricFamily` is built. The
/// output is what `prometheus::TextEncoder` wrote for the same families
/// after `Registry::gather` (families by name, samples by label values);
/// a unit test holds the two equal.
struct Cgroups {
    node: String,
    extra_labels: Vec<String>,
}

/// Labels of every `podmeter_container_*` series, before the optional ones.
const CONTAINER_LABELS: [&str; 8] = [
    "node",
    "namespace",
    "pod",
    "container",
    "pod_uid",
    "container_id",
    "runtime",
    "qos",
];

const SELF_FAMILIES: [(&str, &str, &[&str]); 4] = [
    (
        "podmeter_tracked_cgroups",
        "Cgroups podmeter tracks, by state: live (counted and in the tree), departed (in the grace period), unresolved (counted, never seen in the tree), awaiting_metadata (pod cgroups held back until the API names them).",
        &["state"],
    ),
    (
        "podmeter_bpf_map_entries",
        "Entries in a per-cgroup BPF counter map.",
        &["map"],
    ),
    (
        "podmeter_bpf_map_capacity_entries",
        "Capacity of a per-cgroup BPF counter map.",
        &["map"],
    ),
    (
        "podmeter_bpf_map_dropped_updates_total",
        "Counter updates lost because a BPF map was full (raise --max-cgroups if this grows), or, rarely, busy on its CPU.",
        &["map"],
    ),
];

const TREE_UPDATES: (&str, &str, &[&str]) = (
    "podmeter_cgroup_tree_updates_total",
    "How podmeter learned of new and removed cgroups: kernel cgroup2 mkdir and rmdir events, and walks of the whole tree (at start, every --rescan-interval, after lost events, for unknown ids; every refresh where the kernel provides no events).",
    &["source"],
);
const COLLECTOR_SUCCESS: (&str, &str, &[&str]) = (
    "podmeter_scrape_collector_success",
    "Whether a collector worked in this scrape (1) or failed (0; its families are missing or partial, and the log says why): cgroup_tree (the last walk of the cgroup tree), cpu and network (the kernel counter maps), kubernetes (the API pod watch), memory (working set, memory limit, OOM kill and CPU limit reads of the last refresh), pressure (pressure stall reads of the last refresh; absent where the kernel tracks none), throttling (cpu.stat reads).",
    &["collector"],
);
const KUBE_PODS: (&str, &str) = (
    "podmeter_kubernetes_pods",
    "Pods of this node in the Kubernetes API watch's store.",
);
const KUBE_ERRORS: (&str, &str) = (
    "podmeter_kubernetes_watch_errors_total",
    "Errors of the Kubernetes API pod watch; each is retried with backoff, serving the last known names meanwhile.",
);
const NODE_CPUS: (&str, &str) = (
    "podmeter_node_cpus",
    "Online CPUs of the node (/sys/devices/system/cpu/online): the denominator of node CPU saturation.",
);

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

fn sample(labels: Vec<LabelPair>, kind: MetricType, value: f64) -> Metric {
    let mut m = Metric::from_label(labels);
    if kind == MetricType::COUNTER {
        let mut c = Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

/// A self-metric family with one label, one sample per `(value, sample)`,
/// samples in label value order (as `Registry::gather` sorts them).
fn by_label(
    (name, help, labels): (&str, &str, &[&str]),
    kind: MetricType,
    values: &[(&str, f64)],
) -> MetricFamily {
    let mut values = values.to_vec();
    values.sort_by(|a, b| a.0.cmp(b.0));
    let ms = values
        .iter()
        .map(|(v, x)| sample(vec![label(labels[0], v)], kind, *x))
        .collect();
    family(name.to_owned(), help, kind, ms)
}

fn family(name: String, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name);
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// A histogram family of [`wait_buckets`] as exposition text, empty
/// without samples.
fn histogram_text(name: &str, help: &str, group: &[Labelled<'_>]) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    for l in group {
        let Some((buckets, sum)) = wait_buckets(l.row) else {
            continue;
        };
        if text.is_empty() {
            let _ = write!(text, "# HELP {name} ");
            push_escaped(&mut text, help, false);
            let _ = writeln!(text, "\n# TYPE {name} histogram");
        }
        // `{a="b"}` less its closing brace, for the `le` label.
        let open = &l.text[..l.text.len() - 1];
        for (bound, count) in buckets {
            text.push_str(name);
            text.push_str("_bucket");
            text.push_str(open);
            if bound.is_infinite() {
                text.push_str(",le=\"+Inf\"} ");
            } else {
                let _ = write!(text, ",le=\"{bound}\"}} ");
            }
            push_value(&mut text, count as f64);
            text.push('\n');
        }
        for (suffix, v) in [("_sum", sum), ("_count", buckets[WAIT_BUCKETS - 1].1 as f64)] {
            text.push_str(name);
            text.push_str(suffix);
            text.push_str(&l.text);
            text.push(' ');
            push_value(&mut text, v);
            text.push('\n');
        }
    }
    text
}

/// Appends `v` escaped as the text format wants: `\` and newline always,
/// `"` in label values.
fn push_escaped(out: &mut String, v: &str, quote: bool) {
    let special = |c: char| c == '\\' || c == '\n' || (quote && c == '"');
    if !v.contains(special) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// A sample value in the text format, faster than `f64`'s `Display`
/// (which `TextEncoder` uses): formatting took a third of the text's
/// rendering at a thousand pods. Whole numbers below 2^53 (counts, bytes)
/// are their integer digits, as `Display` writes them. Other values take
/// `ryu`'s digits, the shortest that read back, as `Display`'s are; where
/// two such strings are equally near (an exact tie, rare: `…641.3125` as
/// `.312` or `.313`) the two may pick differently, but either reads back
/// as the same `f64`.
fn push_value(out: &mut String, v: f64) {
    const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.fract() == 0.0 && v.abs() < EXACT_INTEGERS {
        if v == 0.0 && v.is_sign_negative() {
            out.push_str("-0");
        } else {
            out.push_str(itoa::Buffer::new().format(v as i64));
        }
        return;
    }
    // Whole numbers above 2^53: ryu would add `.0`.
    if v.is_finite() && v.fract() != 0.0 {
        let mut b = ryu::Buffer::new();
        let s = b.format_finite(v);
        // ryu writes very small and very large values with an exponent;
        // Display never does.
        if !s.contains('e') {
            out.push_str(s);
            return;
        }
    }
    use std::fmt::Write as _;
    let _ = write!(out, "{v}");
}

/// One cgroup's labels, ready to write: the sort key and the rendered
/// `{k="v",...}`.
struct Labelled<'a> {
    /// The values in label order, each ended by a NUL: byte order on it is
    /// the order of the values themselves (NUL sorts before any byte a
    /// value holds: names, uids and paths have none), at one `memcmp` per
    /// comparison instead of one per label. Sorting 1000 pods by their
    /// values took a quarter of a plain scrape's CPU.
    key: Arc<str>,
    text: Arc<str>,
    row: &'a Row,
}

impl Cgroups {
    fn label_values<'a>(&'a self, row: &'a Row) -> Vec<&'a str> {
        match &row.cgroup.identity {
            Identity::Pod(p) => {
                let names = row.names.as_deref();
                let name = |f: fn(&Names) -> &str| names.map_or("", f);
                let mut values =
                    Vec::with_capacity(CONTAINER_LABELS.len() + self.extra_labels.len());
                values.extend([
                    self.node.as_str(),
                    name(|n| &n.namespace),
                    name(|n| &n.pod),
                    name(|n| &n.container),
                    &p.pod_uid,
                    p.container_id.as_deref().unwrap_or(""),
                    p.runtime.unwrap_or(""),
                    p.qos.as_str(),
                ]);
                for i in 0..self.extra_labels.len() {
                    values.push(
                        names
                            .and_then(|n| n.extra.get(i))
                            .map_or("", String::as_str),
                    );
                }
                values
            }
            Identity::Host => vec![&self.node, &row.cgroup.path],
        }
    }

    /// `row`'s labels: the last scrape's where they still fit (see
    /// [`LabelCache`]), taken from `kept`, and put in `next` either way.
    fn labelled<'a>(
        &'a self,
        row: &'a Row,
        names: &[&str],
        kept: &mut LabelCache,
        next: &mut LabelCache,
    ) -> Labelled<'a> {
        let labels = match kept.0.remove(&row.id).filter(|l| l.fits(row)) {
            Some(l) => l,
            None => {
                let (key, text) = self.label_text(row, names);
                Labels {
                    cgroup: row.cgroup.clone(),
                    names: row.names.clone(),
                    key: key.into(),
                    text: text.into(),
                }
            }
        };
        let out = Labelled {
            key: labels.key.clone(),
            text: labels.text.clone(),
            row,
        };
        next.0.insert(row.id, labels);
        out
    }

    /// `row`'s sort key and label block (see [`Labelled`]).
    fn label_text(&self, row: &Row, names: &[&str]) -> (String, String) {
        let values = self.label_values(row);
        let mut text = String::with_capacity(256);
        let mut key = String::with_capacity(160);
        for (i, (name, value)) in names.iter().zip(&values).enumerate() {
            key.push_str(value);
            key.push('\0');
            text.push_str(if i == 0 { "{" } else { "," });
            text.push_str(name);
            text.push_str("=\"");
            push_escaped(&mut text, value, true);
            text.push('"');
        }
        text.push('}');
        (key, text)
    }

    /// The per-cgroup families as exposition text, `(name, family)` each,
    /// empty families left out. A family whose rows, in the same order
    /// and with the same label blocks, have the same values as in `last`
    /// is `last`'s text again: at a thousand pods most families (limits,
    /// OOM kills, throttling of never-throttled containers, idle pressure)
    /// do not change from one scrape to the next, and writing their text
    /// was most of rendering.
    ///
    /// `refreshed_only`: only the families of [`Spec::refreshed`] values
    /// (what a render between scrapes makes).
    fn cgroup_text(
        &self,
        snap: &Snapshot,
        last: &Last,
        labels: &mut LabelCache,
        refreshed_only: bool,
    ) -> Vec<(String, Family)> {
        let mut kept = std::mem::take(labels);
        labels.0.reserve(snap.rows.len());
        let container_names: Vec<&str> = CONTAINER_LABELS
            .iter()
            .copied()
            .chain(self.extra_labels.iter().map(String::as_str))
            .collect();
        let (mut pods, mut hosts) = (Vec::new(), Vec::new());
        for row in &snap.rows {
            match row.cgroup.identity {
                Identity::Pod(_) => {
                    pods.push(self.labelled(row, &container_names, &mut kept, labels))
                }
                Identity::Host => {
                    hosts.push(self.labelled(row, &["node", "cgroup"], &mut kept, labels))
                }
            }
        }
        // Registry::gather's order: by label values, in label order.
        pods.sort_by(|a, b| a.key.cmp(&b.key));
        hosts.sort_by(|a, b| a.key.cmp(&b.key));
        // Every label block in order: what a family's text holds besides
        // its name and values. (A block has no raw newline: it is escaped.)
        let blocks = |group: &[Labelled<'_>]| {
            let mut h = Xxh3::new();
            for l in group {
                h.update(l.text.as_bytes());
                h.update(b"\n");
            }
            h.digest128().to_le_bytes()
        };
        let groups = [
            (CONTAINER_PREFIX, &pods, blocks(&pods)),
            (CGROUP_PREFIX, &hosts, blocks(&hosts)),
        ];

        let mut out = Vec::with_capacity(2 * SPECS.len());
        let mut made = Vec::new();
        // Each row's value, found once for the fingerprint and the text.
        let mut values: Vec<Option<f64>> = Vec::new();
        let wanted = |s: &&Spec| s.needs.met(snap.signals) && (s.refreshed || !refreshed_only);
        for spec in SPECS.iter().filter(wanted) {
            for (prefix, group, blocks) in &groups {
                let name = format!("{prefix}{}", spec.suffix);
                // The name (which fixes help and type), the label blocks,
                // then each row's value or its absence.
                made.clear();
                made.extend_from_slice(blocks);
                made.extend_from_slice(name.as_bytes());
                // The text's length, near enough: what it reserves is what
                // the kept text holds until the next scrape.
                let mut len = 0;
                values.clear();
                for l in group.iter() {
                    let value = (spec.value)(l.row);
                    values.push(value);
                    match value {
                        Some(v) => {
                            made.push(1);
                            made.extend_from_slice(&v.to_bits().to_le_bytes());
                            len += name.len() + l.text.len() + 24;
                        }
                        None => made.push(0),
                    }
                }
                let fingerprint = xxh3_128(&made);
                if let Some(f) = last.get(&name).filter(|f| f.fingerprint == fingerprint) {
                    out.push((name, f.clone()));
                    continue;
                }
                let mut text = String::new();
                for (l, value) in group.iter().zip(&values) {
                    let Some(v) = *value else {
                        continue;
                    };
                    if text.is_empty() {
                        text.reserve(len + spec.help.len() + 2 * name.len() + 32);
                        text.push_str("# HELP ");
                        text.push_str(&name);
                        text.push(' ');
                        push_escaped(&mut text, spec.help, false);
                        text.push_str("\n# TYPE ");
                        text.push_str(&name);
                        text.push_str(if spec.kind == MetricType::COUNTER {
                            " counter\n"
                        } else {
                            " gauge\n"
                        });
                    }
                    text.push_str(&name);
                    text.push_str(&l.text);
                    text.push(' ');
                    push_value(&mut text, v);
                    text.push('\n');
                }
                if !text.is_empty() {
                    let text = text.into();
                    out.push((name, Family { text, fingerprint }));
                }
            }
        }
        if snap.signals.wait_histogram && !refreshed_only {
            for (prefix, group) in [(CONTAINER_PREFIX, &pods), (CGROUP_PREFIX, &hosts)] {
                let name = format!("{prefix}{}", WAIT_HIST.0);
                let text = histogram_text(&name, WAIT_HIST.1, group);
                if !text.is_empty() {
                    out.push((name, Family::new(text)));
                }
            }
        }
        out
    }

    /// podmeter's own tracking, map and Kubernetes watch families.
    fn self_families(&self, snap: &Snapshot) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let [tracked, entries, capacity, dropped] = SELF_FAMILIES;
        let cap = f64::from(snap.capacity);
        let [live, departed, unresolved, awaiting] = snap.tracked.map(|n| n as f64);
        out.push(by_label(
            tracked,
            MetricType::GAUGE,
            &[
                ("live", live),
                ("departed", departed),
                ("unresolved", unresolved),
                ("awaiting_metadata", awaiting),
            ],
        ));
        let collectors: Vec<(&str, f64)> = COLLECTORS
            .iter()
            .zip(&snap.collectors)
            .filter_map(|(name, ok)| Some((*name, f64::from(u8::from(ok.as_ref()?.is_ok())))))
            .collect();
        out.push(by_label(COLLECTOR_SUCCESS, MetricType::GAUGE, &collectors));
        let [mkdir, rmdir, scan] = snap.tree_updates.map(|n| n as f64);
        out.push(by_label(
            TREE_UPDATES,
            MetricType::COUNTER,
            &[("mkdir", mkdir), ("rmdir", rmdir), ("scan", scan)],
        ));
        if let Some((pods, errors)) = snap.kubernetes {
            let one = |(name, help): (&str, &str), kind, v: f64| {
                family(name.to_owned(), help, kind, vec![sample(vec![], kind, v)])
            };
            out.push(one(KUBE_PODS, MetricType::GAUGE, pods as f64));
            out.push(one(KUBE_ERRORS, MetricType::COUNTER, errors as f64));
        }
        out.push(by_label(
            entries,
            MetricType::GAUGE,
            &[
                (MAPS[0], snap.entries[0] as f64),
                (MAPS[1], snap.entries[1] as f64),
            ],
        ));
        out.push(by_label(
            capacity,
            MetricType::GAUGE,
            &[(MAPS[0], cap), (MAPS[1], cap)],
        ));
        out.push(by_label(
            dropped,
            MetricType::COUNTER,
            &[
                (MAPS[0], snap.dropped[0] as f64),
                (MAPS[1], snap.dropped[1] as f64),
            ],
        ));
        out
    }

    fn node_cpus(&self, cpus: usize) -> MetricFamily {
        let (name, help) = NODE_CPUS;
        let m = sample(
            vec![label("node", &self.node)],
            MetricType::GAUGE,
            cpus as f64,
        );
        family(name.to_owned(), help, MetricType::GAUGE, vec![m])
    }
}

/// podmeter's metrics: the per-cgroup families, build info and scrape timing.
pub struct Exporter {
    tracker: Arc<Tracker>,
    cgroups: Cgroups,
    /// Build info and scrape timing.
    pub registry: Registry,
    /// Time to collect and encode one scrape.
    pub scrape_duration: Histogram,
    /// The last scrape's families, taken by a scrape and replaced by its
    /// own (a scrape beside another may find none, and renders all).
    last: Mutex<Option<Last>>,
    /// The last scrape's label blocks, taken and replaced the same way.
    labels: Mutex<Option<LabelCache>>,
    /// When the last scrape started: renders between scrapes are made
    /// only for an agent that is scraped.
    scraped: Mutex<Option<Instant>>,
}

impl Exporter {
    /// Registers everything podmeter exposes.
    pub fn new(
        tracker: Arc<Tracker>,
        node: String,
        kernel: &str,
        extra_labels: Vec<String>,
        origin: &str,
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let build = IntGauge::with_opts(
            Opts::new(
                "podmeter_build_info",
                "podmeter's version and the kernel it runs on; always 1.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION"))
            .const_label("kernel", kernel)
            .const_label("node", node.clone()),
        )?;
        build.set(1);
        registry.register(Box::new(build))?;
        let started = IntGauge::with_opts(
            Opts::new(
                "podmeter_counters_origin_info",
                "Where this agent's counters started from; always 1. origin: adopted (pins of an \
                 earlier agent: every counter continues, with what the kernel counted while no \
                 agent ran), created (no pins found: counting started now), reset (pins this \
                 agent cannot read were removed: every counter restarted from zero), unpinned \
                 (--no-pin or no bpffs: counting stops with this process).",
            )
            .const_label("origin", origin)
            .const_label("node", node.clone()),
        )?;
        started.set(1);
        registry.register(Box::new(started))?;
        let scrape_duration = Histogram::with_opts(
            HistogramOpts::new(
                "podmeter_scrape_duration_seconds",
                "Time to collect and encode one /metrics response.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?;
        registry.register(Box::new(scrape_duration.clone()))?;
        Ok(Self {
            tracker,
            cgroups: Cgroups { node, extra_labels },
            registry,
            scrape_duration,
            last: Mutex::new(None),
            labels: Mutex::new(None),
            scraped: Mutex::new(None),
        })
    }

    /// One `/metrics` body in the Prometheus text format. A collector that
    /// fails leaves its families out and says so in
    /// `podmeter_scrape_collector_success` (and the log), as node-exporter
    /// does: the rest still goes out.
    ///
    /// The families' texts come apart, in name order (their concatenation
    /// is the body), so that gzip can reuse what it compressed for a family
    /// that has not changed since the last scrape ([`crate::gzip`]), and
    /// the per-cgroup families reuse the last scrape's text where their
    /// values did not change.
    pub fn render(&self) -> Vec<Family> {
        let timer = self.scrape_duration.start_timer();
        *self.scraped.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let snap = self.tracker.snapshot();
        let last = take(&self.last).unwrap_or_default();
        let mut labels = take(&self.labels).unwrap_or_default();
        let out = families(
            &self.cgroups,
            &snap,
            node::online_cpus(),
            self.registry.gather(),
            &last,
            &mut labels,
        );
        drop(last);
        *self.labels.lock().unwrap_or_else(PoisonError::into_inner) = Some(labels);
        // Only what the next scrape may reuse: the others are small, or
        // written each time (the wait histogram).
        let next = out
            .iter()
            .filter(|(n, _)| per_cgroup(n))
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect();
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(next);
        timer.observe_duration();
        out.into_iter().map(|(_, f)| f).collect()
    }

    /// When the last scrape started, if there was one.
    pub fn last_scrape(&self) -> Option<Instant> {
        *self.scraped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Renders, between scrapes, the families of values the refresher
    /// reads ([`Spec::refreshed`]), from the rows a scrape would have now,
    /// and puts them beside the last scrape's families, for the next
    /// scrape to take each whose rows and values are still the same
    /// instead of writing it (see [`crate::prerender`]). Returns them in
    /// name order, with their names, for gzip to deflate ahead. Not a
    /// scrape: not timed as one.
    ///
    /// It works on copies of the caches (a few dozen families, a block
    /// per row: `Arc`s), so a scrape meanwhile finds them as they were;
    /// and while a scrape holds them it does nothing (that scrape renders
    /// everything itself). A scrape that starts and ends between the copy
    /// and the merge may have some of its families replaced by this
    /// render's older ones: the next scrape writes those again, since
    /// their fingerprints no longer match (time lost, never a wrong text).
    pub fn prerender(&self) -> Vec<(String, Family)> {
        let Some(last) = self.last.lock().unwrap_or_else(PoisonError::into_inner).clone() else {
            return Vec::new();
        };
        let snap = self.tracker.snapshot_between_scrapes();
        let mut labels = self
            .labels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        let mut out = self.cgroups.cgroup_text(&snap, &last, &mut labels, true);
        drop(last);
        // Into the scrape's families as they are now; the label blocks are
        // left as the last scrape wrote them (this render's new ones, for
        // cgroups counted since, are written again by the next scrape).
        match &mut *self.last.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(kept) => kept.extend(out.iter().cloned()),
            None => return Vec::new(),
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Whether `name` is one of [`SPECS`]' families.
fn per_cgroup(name: &str) -> bool {
    [CONTAINER_PREFIX, CGROUP_PREFIX].iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|suffix| SPECS.iter().any(|s| s.suffix == suffix))
    })
}

/// What `m` holds, leaving `None` (a panic elsewhere poisons nothing here:
/// the value is only ever taken or put whole).
pub(crate) fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    m.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// The whole exposition: per-cgroup text and the small families (encoded
/// by `prometheus`), each family apart, in family name order, with its
/// name.
fn families(
    cgroups: &Cgroups,
    snap: &Snapshot,
    cpus: Option<usize>,
    mut small: Vec<MetricFamily>,
    last: &Last,
    labels: &mut LabelCache,
) -> Vec<(String, Family)> {
    let mut parts = cgroups.cgroup_text(snap, last, labels, false);
    small.extend(cgroups.self_families(snap));
    if let Some(cpus) = cpus {
        small.push(cgroups.node_cpus(cpus));
    }
    let encoder = prometheus::TextEncoder::new();
    for mf in small {
        let mut text = String::new();
        if let Err(e) = encoder.encode_utf8(std::slice::from_ref(&mf), &mut text) {
            tracing::error!("encoding metrics: {e}");
            continue;
        }
        parts.push((mf.name().to_owned(), Family::new(text)));
    }
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    parts
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use podmeter_common::{CpuCounters, NetCounters, WaitHistogram};

    use super::*;
    use crate::{
        cgroup::{
            CgroupFiles, Mounts,
            identity::{PodIdentity, Qos},
            pressure::Pressure,
        },
        index::Cgroup,
    };

    #[test]
    fn values_are_written_as_display_writes_them_but_for_ties() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.1,
            0.005029595,
            1e15,
            1e15 - 1.0,
            1e16,
            123456789012345678.0,
            1e-7,
            1.5e-300,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        for _ in 0..200_000 {
            let r = next();
            // Seconds from nanoseconds and microseconds (most samples),
            // counts, and any finite bit pattern.
            values.push((r % 10u64.pow(15)) as f64 / 1e9);
            values.push((r % 10u64.pow(12)) as f64 / 1e6);
            values.push((r >> 20) as f64);
            let any = f64::from_bits(r);
            if any.is_finite() {
                values.push(any);
            }
        }
        let mut ties = 0;
        for v in &values {
            let mut got = String::new();
            push_value(&mut got, *v);
            let display = format!("{v}");
            if got == display {
                continue;
            }
            // Only a tie may differ: as short, and the same value read back.
            let back: f64 = got.parse().unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{got} for {v:e}");
            assert_eq!(got.len(), display.len(), "{got} vs {display}");
            assert_eq!(got[..got.len() - 1], display[..display.len() - 1]);
            ties += 1;
        }
        // A tie needs a value whose exact binary expansion is one digit
        // longer than its shortest form: rare among the random values.
        assert!(ties * 10_000 < values.len(), "{ties} ties in {}", values.len());
    }

    /// The encoding podmeter used before writing text directly: a
    /// `MetricFamily` per family, gathered and encoded by `prometheus`.
    struct Reference<'a>(&'a Cgroups, &'a Snapshot);

    impl Reference<'_> {
        fn labels(&self, row: &Row) -> Vec<LabelPair> {
            match &row.cgroup.identity {
                Identity::Pod(p) => {
                    let names = row.names.as_deref();
                    let name = |f: fn(&Names) -> &str| names.map_or("", f);
                    let mut labels = vec![
                        label("node", &self.0.node),
                        label("namespace", name(|n| &n.namespace)),
                        label("pod", name(|n| &n.pod)),
                        label("container", name(|n| &n.container)),
                        label("pod_uid", &p.pod_uid),
                        label("container_id", p.container_id.as_deref().unwrap_or("")),
                        label("runtime", p.runtime.unwrap_or("")),
                        label("qos", p.qos.as_str()),
                    ];
                    for (i, l) in self.0.extra_labels.iter().enumerate() {
                        let v = names
                            .and_then(|n| n.extra.get(i))
                            .map_or("", String::as_str);
                        labels.push(label(l, v));
                    }
                    labels
                }
                Identity::Host => vec![
                    label("node", &self.0.node),
                    label("cgroup", &row.cgroup.path),
                ],
            }
        }
    }

    impl Reference<'_> {
        fn collect(&self) -> Vec<MetricFamily> {
            let snap = self.1;
            let mut out = Vec::new();
            let labels: Vec<_> = snap.rows.iter().map(|r| self.labels(r)).collect();
            // Samples of `metric` for every row that has one, in a pod and
            // a host family.
            let mut push = |suffix: &str,
                            help: &str,
                            kind: MetricType,
                            metric: &dyn Fn(&Row, &Vec<LabelPair>) -> Option<Metric>| {
                let (mut pods, mut hosts) = (Vec::new(), Vec::new());
                for (row, labels) in snap.rows.iter().zip(&labels) {
                    let Some(m) = metric(row, labels) else { continue };
                    match row.cgroup.identity {
                        Identity::Pod(_) => pods.push(m),
                        Identity::Host => hosts.push(m),
                    }
                }
                for (prefix, metrics) in [(CONTAINER_PREFIX, pods), (CGROUP_PREFIX, hosts)] {
                    if !metrics.is_empty() {
                        out.push(family(format!("{prefix}{suffix}"), help, kind, metrics));
                    }
                }
            };
            for spec in SPECS.iter().filter(|s| s.needs.met(snap.signals)) {
                push(spec.suffix, spec.help, spec.kind, &|row, labels| {
                    Some(sample(labels.clone(), spec.kind, (spec.value)(row)?))
                });
            }
            if snap.signals.wait_histogram {
                push(WAIT_HIST.0, WAIT_HIST.1, MetricType::HISTOGRAM, &|row, labels| {
                    let (buckets, sum) = wait_buckets(row)?;
                    let mut h = prometheus::proto::Histogram::default();
                    h.set_sample_count(buckets[WAIT_BUCKETS - 1].1);
                    h.set_sample_sum(sum);
                    // The encoder writes `+Inf` from the count (an
                    // explicit infinite bound would come out as `inf`).
                    h.set_bucket(
                        buckets[..WAIT_BUCKETS - 1]
                            .iter()
                            .map(|&(bound, count)| {
                                let mut b = prometheus::proto::Bucket::default();
                                b.set_upper_bound(bound);
                                b.set_cumulative_count(count);
                                b
                            })
                            .collect(),
                    );
                    let mut m = Metric::from_label(labels.clone());
                    m.set_histogram(h);
                    Some(m)
                });
            }
            out.extend(self.0.self_families(snap));
            out.push(self.0.node_cpus(2));
            out
        }
    }

    fn reference(cgroups: &Cgroups, snap: &Snapshot, others: &Registry) -> String {
        // What Registry::gather does with a collector's families (the
        // registry itself takes only 'static collectors): samples sorted
        // by label values in label order, families by name.
        let mut families = Reference(cgroups, snap).collect();
        for f in &mut families {
            f.mut_metric().sort_by(|a, b| {
                let values = |m: &Metric| -> Vec<String> {
                    m.get_label().iter().map(|l| l.value().to_owned()).collect()
                };
                values(a).cmp(&values(b))
            });
        }
        families.extend(others.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap()
    }

    fn pod(uid: &str, container: Option<&str>) -> Identity {
        Identity::Pod(PodIdentity {
            pod_uid: uid.into(),
            container_id: container.map(Into::into),
            runtime: container.map(|_| "containerd"),
            qos: Qos::Burstable,
        })
    }

    fn row(path: &str, identity: Identity, names: Option<Names>, k: u64) -> Row {
        Row {
            id: k,
            cgroup: Arc::new(Cgroup {
                path: path.into(),
                identity,
                first_seen: Instant::now(),
                files: CgroupFiles::new(
                    &Mounts::nowhere(),
                    path,
                    false,
                ),
            }),
            cpu: (k % 5 != 1).then_some(CpuCounters {
                time_ns: 1_234_567_891 * k,
                switches: 17 * k,
                wait_ns: 1_000_003 * k,
                waits: 5 * k,
            }),
            // Also without CPU counters, and unread (both left out).
            wait_hist: (k % 7 != 2).then_some(WaitHistogram {
                counts: std::array::from_fn(|i| (k + i as u64) % 4 * k),
            }),
            net: k.is_multiple_of(3).then_some(NetCounters {
                rx_bytes: 1 << (k % 60),
                rx_packets: k,
                tx_bytes: 3 * k,
                tx_packets: k + 1,
                retransmits: k / 3,
            }),
            memory: (k % 4 != 2).then_some(4096 * k),
            memory_limit: (k % 3 == 1).then_some(k << 20),
            oom_kills: (k % 4 != 2).then_some(k / 3),
            subtree_oom_kills: (k % 4 == 1).then_some(k / 2),
            pressure: Pressure {
                cpu: k.is_multiple_of(2).then_some(Totals {
                    some_us: 1_000_001 * k,
                    full_us: k.is_multiple_of(4).then_some(7 * k),
                }),
                memory: (!k.is_multiple_of(5)).then_some(Totals {
                    some_us: k,
                    full_us: Some(k / 2),
                }),
                io: None,
            },
            cpu_limit: k.is_multiple_of(4).then_some(0.25 * k as f64),
            // Also where there is no limit: the encoder writes what it gets.
            throttling: k.is_multiple_of(2).then_some(Throttling {
                periods: k,
                throttled_periods: k / 2,
                throttled_seconds: k as f64 / 7.0,
            }),
            names: names.map(Arc::new),
        }
    }

    /// Node `n`, no extra labels.
    fn plain_cgroups() -> Cgroups {
        Cgroups {
            node: "n".into(),
            extra_labels: vec![],
        }
    }

    /// Complete names of container `app` in pod `pod` of namespace `ns`.
    fn named(pod: &str) -> Names {
        Names {
            namespace: "ns".into(),
            pod: pod.into(),
            container: "app".into(),
            extra: vec![],
        }
    }

    /// A snapshot of `rows`, every signal on but the wait histogram's
    /// (`wait_histogram`).
    fn snapshot(rows: Vec<Row>, wait_histogram: bool) -> Snapshot {
        let n = rows.len();
        Snapshot {
            rows,
            dropped: [0, 0],
            entries: [n, 0],
            capacity: 4096,
            tracked: [n, 0, 0, 0],
            tree_updates: [0, 0, 1],
            kubernetes: Some((n, 0)),
            signals: Signals {
                run_queue: true,
                retransmits: true,
                wait_histogram,
            },
            collectors: [Some(Ok(())), None, None, None, None, None, None],
        }
    }

    fn text(families: &[(String, Family)]) -> String {
        families
            .iter()
            .map(|(_, f)| std::str::from_utf8(&f.text).unwrap())
            .collect()
    }

    #[test]
    fn label_blocks_are_kept_only_for_the_same_cgroup_and_names() {
        let cgroups = plain_cgroups();
        let snap = |rows: Vec<Row>| snapshot(rows, false);
        let text_of = |s: &Snapshot, labels: &mut LabelCache| {
            text(&families(&cgroups, s, Some(2), Vec::new(), &Last::new(), labels))
        };
        let first = [
            row("/kubepods/p1/c", pod("uid-1", Some("c1")), Some(named("web-1")), 1),
            row("/kubepods/p2/c", pod("uid-2", Some("c2")), None, 2),
            row("/h3", Identity::Host, None, 3),
        ];
        // A row of the same cgroup (the same Arc) with these names; its
        // values are those of its id.
        let again = |r: &Row, names: Option<Arc<Names>>| Row {
            cgroup: r.cgroup.clone(),
            names,
            ..row("/unused", Identity::Host, None, r.id)
        };
        let same = || first.iter().map(|r| again(r, r.names.clone())).collect();
        let mut labels = LabelCache::default();
        let before = text_of(&snap(same()), &mut labels);
        assert_eq!(labels.0.len(), 3);
        let kept = |labels: &LabelCache, id: u64| labels.0[&id].text.clone();
        let (one, two, three) = (kept(&labels, 1), kept(&labels, 2), kept(&labels, 3));

        // The same rows again: every block is the one kept, and the text
        // the same.
        assert_eq!(text_of(&snap(same()), &mut labels), before);
        assert!(Arc::ptr_eq(&kept(&labels, 1), &one));
        assert!(Arc::ptr_eq(&kept(&labels, 3), &three));

        // Equal names in a new Arc (a pod sandbox's, made at each scrape)
        // are the same labels.
        let equal = first
            .iter()
            .map(|r| again(r, r.names.as_deref().cloned().map(Arc::new)))
            .collect();
        assert_eq!(text_of(&snap(equal), &mut labels), before);
        assert!(Arc::ptr_eq(&kept(&labels, 1), &one));
        assert!(Arc::ptr_eq(&kept(&labels, 2), &two));

        // Row 1 gets other names, row 2 gets its first (each a new Arc),
        // row 3 is a new cgroup at the same id: each new block is written
        // afresh, and the text is what a render without the cache gives.
        let second = || {
            vec![
                again(&first[0], Some(Arc::new(named("web-1b")))),
                again(&first[1], Some(Arc::new(named("api-2")))),
                row("/h3-again", Identity::Host, None, 3),
            ]
        };
        let got = text_of(&snap(second()), &mut labels);
        assert_eq!(got, text_of(&snap(second()), &mut LabelCache::default()));
        assert!(got.contains("pod=\"web-1b\""), "{got}");
        assert!(!got.contains("pod=\"web-1\""), "{got}");
        assert!(got.contains("pod=\"api-2\""), "{got}");
        assert!(got.contains("cgroup=\"/h3-again\""), "{got}");
        assert!(!Arc::ptr_eq(&kept(&labels, 1), &one));
        assert!(!Arc::ptr_eq(&kept(&labels, 2), &two));
        assert!(!Arc::ptr_eq(&kept(&labels, 3), &three));

        // Row 3 gone: its block is dropped.
        text_of(&snap(second().into_iter().take(2).collect()), &mut labels);
        assert!(!labels.0.contains_key(&3), "a gone row's block is kept");
    }

    #[test]
    fn families_reuse_the_last_text_only_when_nothing_in_it_changed() {
        let cgroups = plain_cgroups();
        let rows = || -> Vec<Row> {
            (1..=12)
                .map(|k| match k % 3 {
                    0 => row(&format!("/h{k}"), Identity::Host, None, k),
                    _ => row(
                        &format!("/kubepods/p{k}/c"),
                        pod(&format!("uid-{k}"), Some(&format!("c{k}"))),
                        Some(named(&format!("web-{k}"))),
                        k,
                    ),
                })
                .collect()
        };
        let snap = |rows: Vec<Row>| snapshot(rows, true);
        let render = |s: &Snapshot, last: &Last| {
            families(&cgroups, s, Some(2), Vec::new(), last, &mut LabelCache::default())
        };
        let keep = |f: &[(String, Family)]| -> Last { f.iter().cloned().collect() };
        let same = |a: &Family, b: &Family| a.text.as_ptr() == b.text.as_ptr();
        let by_name = |f: &[(String, Family)], name: &str| {
            f.iter().find(|(n, _)| n == name).map(|(_, f)| f.clone()).unwrap()
        };
        // Each check: the text with `last` is the text without it.
        let checked = |s: &Snapshot, last: &Last| {
            let got = render(s, last);
            assert_eq!(text(&got), text(&render(s, &Last::new())));
            got
        };

        let first = checked(&snap(rows()), &Last::new());
        assert!(first.len() > 20, "{} families", first.len());
        // Nothing changed: every per-cgroup family is the last one's text
        // (but the wait histogram's, written each time: it is opt-in).
        let again = checked(&snap(rows()), &keep(&first));
        let reusable = per_cgroup;
        let names = |f: &[(String, Family)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&again), names(&first));
        assert!(!reusable("podmeter_container_cpu_wait_duration_seconds"));
        assert!(!reusable("podmeter_cgroup_tree_updates_total"));
        for ((name, a), (_, b)) in first.iter().zip(&again) {
            assert!(same(a, b) || !reusable(name), "{name} rendered again");
        }
        assert!(first.iter().filter(|(n, _)| reusable(n)).count() > 20);

        // One container's CPU: its usage family only.
        let mut changed = rows();
        changed[3].cpu.as_mut().unwrap().time_ns += 1;
        let next = checked(&snap(changed), &keep(&again));
        let usage = "podmeter_container_cpu_usage_seconds_total";
        assert!(!same(&by_name(&next, usage), &by_name(&again, usage)));
        assert_ne!(by_name(&next, usage).text, by_name(&again, usage).text);
        assert_eq!(names(&next), names(&again));
        for (name, f) in next.iter().filter(|(n, _)| reusable(n) && n != usage) {
            assert!(same(f, &by_name(&again, name)), "{name} rendered again");
        }

        // A value that goes away, a row that goes, a name that changes:
        // each family they touch is written again, and right.
        let mut gone = rows();
        gone[0].memory = None;
        checked(&snap(gone), &keep(&again));
        let mut fewer = rows();
        fewer.remove(4);
        checked(&snap(fewer), &keep(&again));
        let mut renamed = rows();
        renamed[0].names = Some(Arc::new(named("web-renamed")));
        let next = checked(&snap(renamed), &keep(&again));
        assert!(text(&next).contains("pod=\"web-renamed\""));
        for (name, f) in next.iter().filter(|(n, _)| n.starts_with("podmeter_container_")) {
            assert!(!same(f, &by_name(&again, name)), "{name} kept the old name");
        }
    }

    /// A refresh between two scrapes, as the agent runs it: the exporter
    /// over a tracker over a fake counter source and a fed index (no
    /// kernel).
    #[test]
    fn a_render_between_scrapes_leaves_the_next_scrape_only_what_changed_since() {
        use crate::{
            cgroup::Mounts,
            counters::fake::FakeCounters,
            health::Health,
            index::{IndexState, Read, Stats, TreeEvent},
            namer::Namer,
        };
        use std::time::Duration;
        let mounts = Mounts::nowhere();
        let ids: Vec<u64> = (1..=30).collect();
        let counters = Arc::new(FakeCounters::default());
        let (publish, index) = tokio::sync::watch::channel(Arc::new(crate::index::Index::default()));
        let (wants, _wanted) = tokio::sync::mpsc::channel(4);
        let health = Arc::new(Health::new(
            Duration::from_secs(15),
            Duration::from_secs(60),
            Instant::now(),
        ));
        let tracker = Arc::new(Tracker::new(
            index,
            counters.clone(),
            Namer::new(None, 0, Duration::ZERO),
            wants,
            health,
        ));
        let exporter = Exporter::new(tracker.clone(), "n1".into(), "k", vec![], "created").unwrap();
        let mut state = IndexState::new(mounts, Duration::from_secs(90));
        let events: Vec<TreeEvent> = ids
            .iter()
            .map(|&id| TreeEvent::Created {
                id,
                path: format!("/c{id}"),
            })
            .collect();
        state.apply(&events, Instant::now());
        // Counters move at every scrape; memory at every refresh.
        let scrape = |k: u64| {
            let mut s = counters.state();
            for &id in &ids {
                s.cpu.insert(
                    id,
                    CpuCounters {
                        time_ns: 1000 * id + k,
                        switches: k,
                        ..CpuCounters::default()
                    },
                );
            }
        };
        let refresh = |state: &mut IndexState, k: u64| {
            state.refresh(&ids, Instant::now(), true, |c| Read {
                stats: Stats {
                    memory: Some(c.path.len() as u64 * 4096 + k),
                    memory_limit: Some(1 << 30),
                    ..Stats::default()
                },
                errors: [None, None],
            });
            publish.send_replace(state.snapshot());
        };
        let texts = |f: &[Family]| -> Vec<String> {
            f.iter()
                .map(|f| String::from_utf8(f.text.to_vec()).unwrap())
                .filter(|t| !t.contains("podmeter_scrape_duration_seconds"))
                .collect()
        };
        let memory = "podmeter_cgroup_memory_working_set_bytes";

        scrape(1);
        refresh(&mut state, 1);
        exporter.render();
        assert!(exporter.last_scrape().is_some());
        refresh(&mut state, 2);
        let (names, ahead): (Vec<String>, Vec<Family>) = exporter.prerender().into_iter().unzip();
        // Only the refreshed families, in name order: the memory limit and
        // memory.
        assert_eq!(names, ["podmeter_cgroup_memory_limit_bytes", memory]);
        assert!(texts(&ahead)[0].starts_with("# HELP podmeter_cgroup_memory_limit_bytes "));
        assert!(texts(&ahead)[1].contains(&format!("{memory}{{node=\"n1\",cgroup=\"/c7\"}} 12290\n")));

        scrape(2);
        let next = exporter.render();
        // What a scrape without the render ahead sends.
        let fresh = Exporter::new(tracker, "n1".into(), "k", vec![], "created").unwrap();
        assert_eq!(texts(&next), texts(&fresh.render()));
        // The families rendered ahead are taken as they are; the CPU
        // families, moved since, are written again.
        for f in &ahead {
            assert!(next.iter().any(|n| n.text.as_ptr() == f.text.as_ptr()));
        }
        let usage = texts(&next)
            .into_iter()
            .find(|t| t.contains("# TYPE podmeter_cgroup_cpu_usage_seconds_total"))
            .unwrap();
        assert!(usage.contains("cgroup=\"/c7\"} 0.000007002\n"), "{usage}");

        // A refresh while a scrape holds the last families: nothing is
        // rendered ahead, and that scrape's families stay.
        let held = take(&exporter.last);
        assert!(exporter.prerender().is_empty());
        assert!(take(&exporter.last).is_none());
        *exporter.last.lock().unwrap() = held;
    }

    #[test]
    fn text_matches_prometheus_encoder() {
        let names = |ns: &str, pod: &str, c: &str, extra: &[&str]| Names {
            namespace: ns.into(),
            pod: pod.into(),
            container: c.into(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        let rows = || {
            vec![
            row("/system.slice/b.service", Identity::Host, None, 1),
            row("/system.slice/a.service", Identity::Host, None, 2),
            row("/", Identity::Host, None, 3),
            row("/weird/\"quoted\"\\back\nslash", Identity::Host, None, 4),
            row("/a!", Identity::Host, None, 6),
            row("/a", Identity::Host, None, 8),
            row(
                "/kubepods/p1/c1",
                pod("uid-1", Some("c1")),
                Some(names("ns", "web", "app", &["x", ""])),
                9,
            ),
            row(
                "/kubepods/p1",
                pod("uid-1", None),
                Some(names("ns", "web", "", &["x", ""])),
                10,
            ),
            row(
                "/kubepods/p2/c2",
                pod("uid-2", Some("c2")),
                Some(names("ns!", "db", "pg", &["y\"z", "\\"])),
                12,
            ),
            row(
                "/kubepods/p3/c3",
                pod("uid-3", Some("c3")),
                Some(names("ns", "web-1", "app", &["", ""])),
                0,
            ),
            row(
                "/kubepods/p4/c4",
                pod("uid-4", Some("c4")),
                Some(Names::default()),
                15,
            ),
        ]
        };
        let snap = Snapshot {
            rows: rows(),
            dropped: [3, 0],
            entries: [11, 4],
            capacity: 4096,
            tracked: [10, 1, 2, 3],
            tree_updates: [5, 4, 2],
            kubernetes: Some((42, 7)),
            signals: Signals {
                run_queue: true,
                retransmits: true,
                wait_histogram: true,
            },
            collectors: [
                Some(Ok(())),
                Some(Err("map".into())),
                None,
                Some(Ok(())),
                Some(Ok(())),
                None,
                Some(Ok(())),
            ],
        };
        let cgroups = Cgroups {
            node: "node-1".into(),
            extra_labels: vec!["owner".into(), "label_app".into()],
        };
        let others = Registry::new();
        let build = IntGauge::with_opts(
            Opts::new("podmeter_build_info", "build")
                .const_label("version", "1")
                .const_label("node", "n"),
        )
        .unwrap();
        build.set(1);
        others.register(Box::new(build)).unwrap();
        let h = Histogram::with_opts(HistogramOpts::new(
            "podmeter_scrape_duration_seconds",
            "scrape",
        ))
        .unwrap();
        h.observe(0.003);
        others.register(Box::new(h)).unwrap();

        let want = reference(&cgroups, &snap, &others);
        let got = text(&families(&cgroups, &snap, Some(2), others.gather(), &Last::new(), &mut LabelCache::default()));
        assert!(want.contains("podmeter_container_cpu_limit_cores{"));
        assert!(want.contains("podmeter_cgroup_network_receive_bytes_total{"));
        assert!(want.contains("podmeter_container_oom_kills_total{"));
        assert!(want.contains("podmeter_container_subtree_oom_kills_total{"));
        assert!(want.contains("podmeter_cgroup_pressure_cpu_stalled_seconds_total{"));
        assert!(!want.contains("pressure_io"), "no io totals: no io families");
        assert!(want.contains("podmeter_cgroup_tree_updates_total{source=\"rmdir\"} 4\n"));
        assert!(want.contains("podmeter_container_cpu_wait_seconds_total{"));
        assert!(want.contains("podmeter_cgroup_network_tcp_retransmits_total{"));
        assert!(want.contains(
            "podmeter_cgroup_cpu_wait_duration_seconds_bucket{node=\"node-1\",cgroup=\"/a\",le=\"0.000262144\"} 0\n"
        ));
        assert!(want.contains("podmeter_container_cpu_wait_duration_seconds_count{"));
        // Written out by hand for one row: waits per bucket 0, 8, 16, 24, 0,
        // 8, 16, 24 (k = 8), cumulative; the sum is its wait seconds.
        let b = |le: &str, n: u32| {
            format!(
                "podmeter_cgroup_cpu_wait_duration_seconds_bucket{{node=\"node-1\",cgroup=\"/a\",le=\"{le}\"}} {n}\n"
            )
        };
        let by_hand = [
            b("0.000262144", 0),
            b("0.000524288", 8),
            b("0.001048576", 24),
            b("0.002097152", 48),
            b("0.004194304", 48),
            b("0.008388608", 56),
            b("0.016777216", 72),
            b("+Inf", 96),
            "podmeter_cgroup_cpu_wait_duration_seconds_sum{node=\"node-1\",cgroup=\"/a\"} 0.008000024\n"
                .into(),
            "podmeter_cgroup_cpu_wait_duration_seconds_count{node=\"node-1\",cgroup=\"/a\"} 96\n"
                .into(),
        ]
        .concat();
        assert!(got.contains(&by_hand), "{got}");
        // An unread histogram (k = 9) leaves the row out, never zeros.
        assert!(!got.contains("cpu_wait_duration_seconds_count{node=\"node-1\",namespace=\"ns\",pod=\"web\",container=\"app\""), "{got}");
        assert_eq!(got, want);

        // What the kernel cannot count is left out, not exported as zeros.
        let blind = Snapshot {
            signals: Signals {
                run_queue: false,
                retransmits: false,
                wait_histogram: false,
            },
            rows: rows(),
            collectors: snap.collectors.clone(),
            ..snap
        };
        let got = text(&families(&cgroups, &blind, Some(2), others.gather(), &Last::new(), &mut LabelCache::default()));
        assert_eq!(got, reference(&cgroups, &blind, &others));
        assert!(!got.contains("_cpu_wait_seconds_total"), "{got}");
        assert!(!got.contains("_cpu_waits_total"), "{got}");
        assert!(!got.contains("_cpu_wait_duration_seconds"), "{got}");
        assert!(got.contains("_pressure_cpu_waiting_seconds_total"), "{got}");
        assert!(!got.contains("retransmits"), "{got}");
        assert!(got.contains("podmeter_container_cpu_usage_seconds_total{"));

        let no_kube = Snapshot {
            kubernetes: None,
            rows: Vec::new(),
            ..blind
        };
        let want = reference(&cgroups, &no_kube, &others);
        let got = text(&families(&cgroups, &no_kube, Some(2), others.gather(), &Last::new(), &mut LabelCache::default()));
        assert_eq!(got, want);
    }
}
