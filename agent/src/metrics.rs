//! Prometheus exposition of podmeter's numbers.
//!
//! [`CgroupCollector`] turns each scrape's [`Snapshot`] into metric families:
//! `podmeter_container_*` for cgroups the kubelet made (labels `namespace`,
//! `pod`, `container` from the Kubernetes API, `pod_uid`, `container_id` —
//! empty for the pod-level cgroup — `runtime`, `qos`, and the optional
//! owner and pod-label labels) and
//! `podmeter_cgroup_*` for everything else (label `cgroup`, the path). Every
//! series also carries `node`. Counters are exclusive, not hierarchical: a
//! cgroup is billed for the tasks and sockets directly in it, so summing
//! containers gives the pod without double counting. The CPU limit and
//! throttling families are the exception: they are the kernel's own
//! per-cgroup bandwidth numbers, which apply to the cgroup's whole subtree.
//! `podmeter_node_cpus` puts usage in proportion to the node.

use prometheus::{
    Histogram, HistogramOpts, IntGauge, Opts, Registry,
    core::{Collector, Desc},
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    cgroup::{Identity, cpu::Throttling},
    kube::Names,
    node,
    tracker::{Row, Snapshot, Tracker},
};
use std::sync::Arc;

/// How one per-cgroup metric is named, described and read from a [`Row`].
struct Spec {
    suffix: &'static str,
    help: &'static str,
    kind: MetricType,
    value: fn(&Row) -> Option<f64>,
}

const NS_PER_S: f64 = 1e9;

/// The per-cgroup metrics, in exposition order. Documented in the README.
const SPECS: [Spec; 11] = [
    Spec {
        suffix: "cpu_usage_seconds_total",
        help: "CPU time consumed by tasks in the cgroup (sched_switch accounting, idle excluded).",
        kind: MetricType::COUNTER,
        value: |r| r.cpu.map(|c| c.time_ns as f64 / NS_PER_S),
    },
    Spec {
        suffix: "context_switches_total",
        help: "Times a task of the cgroup left the CPU.",
        kind: MetricType::COUNTER,
        value: |r| r.cpu.map(|c| c.switches as f64),
    },
    Spec {
        suffix: "network_receive_bytes_total",
        help: "Bytes received by sockets of the cgroup, IP headers included.",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.rx_bytes as f64),
    },
    Spec {
        suffix: "network_receive_packets_total",
        help: "Packets received by sockets of the cgroup.",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.rx_packets as f64),
    },
    Spec {
        suffix: "network_transmit_bytes_total",
        help: "Bytes sent by sockets of the cgroup, IP headers included.",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.tx_bytes as f64),
    },
    Spec {
        suffix: "network_transmit_packets_total",
        help: "Packets sent by sockets of the cgroup.",
        kind: MetricType::COUNTER,
        value: |r| r.net.map(|n| n.tx_packets as f64),
    },
    Spec {
        suffix: "memory_working_set_bytes",
        help: "Memory working set of the cgroup: usage minus inactive file cache.",
        kind: MetricType::GAUGE,
        value: |r| r.memory.map(|m| m as f64),
    },
    Spec {
        suffix: "cpu_limit_cores",
        help: "CPU limit of the cgroup in cores: CFS quota / period (cpu.max, or cpu.cfs_quota_us / cpu.cfs_period_us). Absent without a limit.",
        kind: MetricType::GAUGE,
        value: |r| r.cpu_bandwidth.and_then(|b| b.limit_cores),
    },
    Spec {
        suffix: "cpu_periods_total",
        help: "CFS bandwidth enforcement periods in which the cgroup had runnable tasks (cpu.stat nr_periods).",
        kind: MetricType::COUNTER,
        value: |r| throttling(r).map(|t| t.periods as f64),
    },
    Spec {
        suffix: "cpu_throttled_periods_total",
        help: "CFS periods in which the cgroup used up its quota and was throttled (cpu.stat nr_throttled).",
        kind: MetricType::COUNTER,
        value: |r| throttling(r).map(|t| t.throttled_periods as f64),
    },
    Spec {
        suffix: "cpu_throttled_seconds_total",
        help: "Time the cgroup's tasks were throttled by its CPU limit, in seconds (cpu.stat throttled_usec, or throttled_time).",
        kind: MetricType::COUNTER,
        value: |r| throttling(r).map(|t| t.throttled_seconds),
    },
];

fn throttling(r: &Row) -> Option<Throttling> {
    r.cpu_bandwidth.and_then(|b| b.stat)
}

const CONTAINER_PREFIX: &str = "podmeter_container_";
const CGROUP_PREFIX: &str = "podmeter_cgroup_";
const MAPS: [&str; 2] = ["cpu", "net"];

/// Collects per-cgroup metrics and podmeter's own map and tracking gauges
/// from the [`Tracker`] at each scrape.
pub struct CgroupCollector {
    tracker: Arc<Tracker>,
    node: String,
    extra_labels: Vec<String>,
    descs: Vec<Desc>,
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

impl CgroupCollector {
    /// A collector for `tracker`'s cgroups, labelled with `node`; pod
    /// series also carry `extra_labels` (see `kube::LabelOptions`).
    pub fn new(tracker: Arc<Tracker>, node: String, extra_labels: Vec<String>) -> Self {
        let mut descs = Vec::new();
        let container_labels: Vec<&str> = CONTAINER_LABELS
            .iter()
            .copied()
            .chain(extra_labels.iter().map(String::as_str))
            .collect();
        for spec in &SPECS {
            for (prefix, labels) in [
                (CONTAINER_PREFIX, &container_labels[..]),
                (CGROUP_PREFIX, &["node", "cgroup"][..]),
            ] {
                descs.push(desc(&format!("{prefix}{}", spec.suffix), spec.help, labels));
            }
        }
        for (name, help, labels) in SELF_FAMILIES {
            descs.push(desc(name, help, labels));
        }
        for (name, help) in [KUBE_PODS, KUBE_ERRORS] {
            descs.push(desc(name, help, &[]));
        }
        descs.push(desc(NODE_CPUS.0, NODE_CPUS.1, &["node"]));
        Self {
            tracker,
            node,
            extra_labels,
            descs,
        }
    }
}

fn desc(name: &str, help: &str, labels: &[&str]) -> Desc {
    Desc::new(
        name.to_owned(),
        help.to_owned(),
        labels.iter().map(|l| (*l).to_owned()).collect(),
        Default::default(),
    )
    .expect("metric names and labels are valid")
}

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
        "Counter updates lost because a BPF map was full; raise --max-cgroups if this grows.",
        &["map"],
    ),
];

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

/// A self-metric family with one label, one sample per `(value, sample)`.
fn by_label(
    (name, help, labels): (&str, &str, &[&str]),
    kind: MetricType,
    values: &[(&str, f64)],
) -> MetricFamily {
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

impl CgroupCollector {
    fn labels(&self, row: &Row) -> Vec<LabelPair> {
        match &row.cgroup.identity {
            Identity::Pod(p) => {
                let names = row.names.as_deref();
                let name = |f: fn(&Names) -> &str| names.map_or("", f);
                let mut labels = vec![
                    label("node", &self.node),
                    label("namespace", name(|n| &n.namespace)),
                    label("pod", name(|n| &n.pod)),
                    label("container", name(|n| &n.container)),
                    label("pod_uid", &p.pod_uid),
                    label("container_id", p.container_id.as_deref().unwrap_or("")),
                    label("runtime", p.runtime.unwrap_or("")),
                    label("qos", p.qos.as_str()),
                ];
                for (i, l) in self.extra_labels.iter().enumerate() {
                    let v = names
                        .and_then(|n| n.extra.get(i))
                        .map_or("", String::as_str);
                    labels.push(label(l, v));
                }
                labels
            }
            Identity::Host => vec![label("node", &self.node), label("cgroup", &row.cgroup.path)],
        }
    }

    fn families(&self, snap: &Snapshot) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let labels: Vec<_> = snap.rows.iter().map(|r| self.labels(r)).collect();
        for spec in &SPECS {
            let (mut pods, mut hosts) = (Vec::new(), Vec::new());
            for (row, labels) in snap.rows.iter().zip(&labels) {
                let Some(v) = (spec.value)(row) else { continue };
                let m = sample(labels.clone(), spec.kind, v);
                match row.cgroup.identity {
                    Identity::Pod(_) => pods.push(m),
                    Identity::Host => hosts.push(m),
                }
            }
            for (prefix, metrics) in [(CONTAINER_PREFIX, pods), (CGROUP_PREFIX, hosts)] {
                if !metrics.is_empty() {
                    out.push(family(
                        format!("{prefix}{}", spec.suffix),
                        spec.help,
                        spec.kind,
                        metrics,
                    ));
                }
            }
        }

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
}

impl Collector for CgroupCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = match self.tracker.snapshot() {
            Ok(snap) => self.families(&snap),
            Err(e) => {
                // The registry's other metrics (build info, scrape duration,
                // node CPUs) still go out; the failure is logged and shows
                // as missing cgroup series rather than a failed scrape.
                tracing::error!("reading BPF maps: {e}");
                Vec::new()
            }
        };
        if let Some(cpus) = node::online_cpus() {
            let (name, help) = NODE_CPUS;
            let m = sample(
                vec![label("node", &self.node)],
                MetricType::GAUGE,
                cpus as f64,
            );
            out.push(family(name.to_owned(), help, MetricType::GAUGE, vec![m]));
        }
        out
    }
}

/// podmeter's registry: the cgroup collector, build info and scrape timing.
pub struct Exporter {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Time to collect and encode one scrape.
    pub scrape_duration: Histogram,
}

impl Exporter {
    /// Registers everything podmeter exposes.
    pub fn new(
        tracker: Arc<Tracker>,
        node: String,
        kernel: &str,
        extra_labels: Vec<String>,
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        registry.register(Box::new(CgroupCollector::new(
            tracker,
            node.clone(),
            extra_labels,
        )))?;
        let build = IntGauge::with_opts(
            Opts::new(
                "podmeter_build_info",
                "podmeter's version and the kernel it runs on; always 1.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION"))
            .const_label("kernel", kernel)
            .const_label("node", node),
        )?;
        build.set(1);
        registry.register(Box::new(build))?;
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
            registry,
            scrape_duration,
        })
    }

    /// One `/metrics` body in the Prometheus text format.
    pub fn render(&self) -> String {
        let timer = self.scrape_duration.start_timer();
        let families = self.registry.gather();
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        timer.observe_duration();
        out
    }
}
