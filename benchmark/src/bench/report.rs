//! The targets of issues 5, 14 and 15, judged from the results, and the markdown report
//! (`bench/results/<time>-<mode>.md` and the top of `bench/RESULTS.md`).

use std::fmt::Write as _;

use super::results::{
    AbWorkload, AtPods, BenchResults, Conditions, Exposer, Kernel, Load, Outcome, PlainBurst,
    ProgramCost, Scenario, Target, median,
};
use crate::schema::{json_text, num};

/// The row with the largest absolute figure, as (|value|, name).
fn worst(rows: impl IntoIterator<Item = (Option<f64>, String)>) -> Option<(f64, String)> {
    rows.into_iter()
        .filter_map(|(x, name)| Some((x?.abs(), name)))
        .reduce(|a, b| if b.0 > a.0 { b } else { a })
}

/// Each target: what was measured and whether it is met. `met` is `None`
/// when the scenario did not produce the figure (no `measured`), or, for
/// the A/B losses, when the rounds cannot tell (a figure beside it).
pub fn targets(r: &BenchResults) -> Vec<Target> {
    let mut out = Vec::new();
    let add = |target: &str, measured: Option<f64>, unit: &str, limit: f64| Target {
        target: target.to_owned(),
        measured: measured.map(|m| format!("{m:.3} {unit}").trim().to_owned()),
        met: measured.map(|x| x <= limit),
    };
    let sched = |load: Option<&Load>| {
        load.and_then(|l| l.programs.iter().find(|p| p.program == "pm_sched_switch"))
            .and_then(|p| p.ns_per_event)
    };
    out.push(add(
        "sched_switch program ≤ 100 ns per event",
        sched(r.kernel().map(|k| &k.context_switch_load)),
        "ns",
        100.0,
    ));
    // Only in runs that measured it, so older reports render as they were.
    if let Some(h) = r
        .kernel()
        .and_then(|k| k.context_switch_load_wait_histogram.as_ref())
    {
        out.push(add(
            "sched_switch program ≤ 100 ns per event with --wait-histogram",
            sched(Some(h)),
            "ns",
            100.0,
        ));
    }
    let k = r.at_pods(1000);
    out.push(add(
        "agent ≤ 0.5 % of one core at 1000 pods, 15 s scrapes",
        k.map(|k| k.cpu_pct_of_one_core),
        "%",
        0.5,
    ));
    out.push(add(
        "agent ≤ 40 MiB RSS at 1000 pods",
        k.map(|k| k.peak_rss_mib),
        "MiB",
        40.0,
    ));
    out.push(add(
        "/metrics p99 ≤ 20 ms at 1000 pods",
        k.and_then(|k| k.scrape.p99_ms),
        "ms",
        20.0,
    ));
    let mut add_worst = |target: &str, w: Option<(f64, String)>, limit: f64| {
        out.push(Target {
            target: target.to_owned(),
            measured: w.as_ref().map(|(x, name)| format!("{x:.3} % ({name})")),
            met: w.map(|(x, _)| x <= limit),
        });
    };
    let (accuracy, side) = (r.accuracy(), r.side_by_side());
    add_worst(
        "CPU error ≤ 1 % (worst cgroup or pod, against cpu.stat)",
        worst(
            accuracy
                .into_iter()
                .flat_map(|a| &a.cpu.cgroups)
                .map(|c| (c.error_pct, format!("host cgroup {}", c.cgroup)))
                .chain(
                    side.into_iter()
                        .flat_map(|s| &s.cpu)
                        .map(|c| (c.podmeter_error_pct, format!("pod {}", c.pod))),
                ),
        ),
        1.0,
    );
    add_worst(
        "network error ≤ 0.5 % (worst flow direction, against the kernel's IP bytes)",
        worst(
            accuracy
                .into_iter()
                .flat_map(|a| &a.network.flows)
                .map(|f| (f.error_pct, format!("host {} {}", f.flow, f.counter)))
                .chain(side.into_iter().flat_map(|s| &s.network).map(|f| {
                    (
                        f.podmeter_error_pct,
                        format!("pod {} {}", f.pod, f.direction),
                    )
                })),
        ),
        0.5,
    );
    let cost = |name: &str| r.exposer(name).map(|e| e.cpu_ms_per_scrape);
    let (pm, cad) = (cost("podmeter"), cost("kubelet cAdvisor"));
    out.push(Target {
        target: "cheaper than cAdvisor per scrape (same pods)".into(),
        measured: pm
            .zip(cad)
            .map(|(p, c)| format!("podmeter {p:.3} ms vs kubelet {c:.3} ms CPU per scrape")),
        met: pm.zip(cad).map(|(p, c)| p < c),
    });
    // Issue 14's budget for the switch path, with every program attached:
    // from the A/B scenario's rounds where the run has it.
    let pct = |target: String, x: Option<f64>, limit: f64| Target {
        target,
        measured: x.map(|x| format!("{x:.3} %")),
        met: x.map(|x| x <= limit),
    };
    // An A/B loss: the median of the rounds' own, judged on its interval.
    // A limit inside the interval is neither met nor missed, and neither
    // is one judged on too few rounds for an interval (a quick run's 2):
    // the rounds cannot tell (`met` stays `None` beside a figure).
    let ab = |target: String, name: &str, limit: f64| {
        let w = r.workload(name);
        let m = w.and_then(|w| w.round_median_loss_pct(false));
        let i = w.and_then(|w| w.round_loss_interval(false));
        Target {
            target,
            measured: m.map(|m| match i {
                Some(i) => format!(
                    "{m:.3} % ({:.1} % interval {:.1} to {:.1} %)",
                    i.confidence * 100.0,
                    i.lo,
                    i.hi
                ),
                None => format!("{m:.3} % (too few rounds for an interval)"),
            }),
            met: match (m, i) {
                (Some(_), Some(i)) if i.hi <= limit => Some(true),
                (Some(_), Some(i)) if i.lo > limit => Some(false),
                (Some(_), Some(_)) => None,
                _ => None,
            },
        }
    };
    // Beside a loss, what empty programs alone lose where the run measured it.
    let floored = |mut t: Target, name: &str| {
        let floor = r
            .workload(name)
            .and_then(AbWorkload::round_median_empty_programs_loss_pct);
        if let (Some(m), Some(f)) = (t.measured.as_mut(), floor) {
            m.push_str(&format!(" (empty programs alone: {f:.3} %)"));
        }
        t
    };
    match r.overhead() {
        Some(o) => {
            out.push(floored(
                ab(
                    format!(
                        "stress-ng --switch throughput lost with the agent ≤ 3 % (median of {} interleaved rounds' own losses)",
                        o.rounds
                    ),
                    "switch",
                    3.0,
                ),
                "switch",
            ));
            out.push(floored(
                ab(
                    format!(
                        "small-packet UDP (iperf3 -u -l 64) packets/s lost with the agent ≤ 3 % (median of {} rounds' own losses)",
                        o.rounds
                    ),
                    "udp",
                    3.0,
                ),
                "udp",
            ));
            let packet = r.workload("udp").and_then(|w| {
                let (i, e) = (
                    w.ns_per_event("pm_skb_ingress"),
                    w.ns_per_event("pm_skb_egress"),
                );
                Some(i?.max(e?))
            });
            out.push(add(
                "packet programs ≤ 80 ns per packet per direction (the slower of the two, BPF statistics on)",
                packet,
                "ns",
                80.0,
            ));
        }
        None => {
            let slowdown = r.kernel().and_then(Kernel::switch_slowdown_pct);
            out.push(pct(
                "stress-ng --switch throughput lost with the agent ≤ 3 %".into(),
                slowdown,
                3.0,
            ));
        }
    }
    // Issue 15's scrape target, judged in runs made since it was set.
    if r.plan.ab_rounds.is_some() {
        out.push(add(
            "/metrics p99 ≤ 10 ms at 1000 pods",
            k.and_then(|k| k.scrape.p99_ms),
            "ms",
            10.0,
        ));
        // The same target for scrapes as Prometheus makes them, 15 s apart:
        // there are too few of them for a p99, so the slowest is judged.
        if let Some(spaced) = k.and_then(|k| k.spaced.as_ref()) {
            out.push(add(
                &format!(
                    "/metrics ≤ 10 ms at 1000 pods, the slowest of {} scrapes 15 s apart",
                    spaced.scrapes
                ),
                spaced.max_ms,
                "ms",
                10.0,
            ));
        }
    }
    out
}

/// The A/B section: what each workload loses with the agent attached.
fn overhead(r: &BenchResults) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## 0. What every workload pays (A/B)\n");
    s += &failed(r.overhead.as_ref());
    let Some(o) = r.overhead() else {
        return s;
    };
    let _ = writeln!(
        s,
        "{} rounds; in each, every workload runs {} s without podmeter, with only empty \
         programs where podmeter's attach (no agent: what entering any program on the \
         `sched_switch` and `cgroup_skb` paths costs, the floor no program body can go below), \
         with podmeter (BPF statistics off) and with it and BPF statistics on, the arms' order \
         reversed every other round. Medians, with the range over the rounds; \"lost\" compares \
         the medians; \"each round\" gives the median and the range of each round's own \
         loss against the same round's run without podmeter (the targets are judged on that \
         median, which compares runs made close together, so a drift in the machine's speed \
         weighs on it less: on a distribution-free interval for it, from the rounds' order \
         statistics, the narrowest with at least 90 % confidence; a limit inside it, or too few \
         rounds for one, is \"cannot tell\").\n",
        o.rounds, o.run_secs
    );
    let _ = writeln!(
        s,
        "| workload | unit | without podmeter | empty programs only | lost % | each round, lost % | with podmeter | lost % | each round, lost % | with podmeter and BPF statistics | each round, lost % |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    // A round loss's median, and its range.
    let range = |m: Option<f64>, v: &[f64]| -> String {
        let lo = v.iter().copied().reduce(f64::min);
        let hi = v.iter().copied().reduce(f64::max);
        match (m, lo, hi) {
            (Some(m), Some(lo), Some(hi)) => format!("{m:.1} ({lo:.1} to {hi:.1})"),
            _ => "–".into(),
        }
    };
    let figure = |v: &[Option<f64>], digits: usize| -> String {
        let x: Vec<f64> = v.iter().flatten().copied().collect();
        let lo = x.iter().copied().reduce(f64::min);
        let hi = x.iter().copied().reduce(f64::max);
        match (median(v), lo, hi) {
            (Some(m), Some(lo), Some(hi)) => {
                format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
            }
            _ => "–".into(),
        }
    };
    let signed = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.1}"));
    for w in &o.workloads {
        // Whole numbers for rates in the thousands, three decimals else.
        let big = [
            &w.detached,
            &w.attached,
            &w.attached_stats,
            &w.empty_programs,
        ]
        .into_iter()
        .flatten()
        .flatten()
        .any(|x| x.abs() >= 1000.0);
        let digits = if big { 0 } else { 3 };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            w.load,
            w.unit,
            figure(&w.detached, digits),
            figure(&w.empty_programs, digits),
            signed(w.empty_programs_loss_pct()),
            range(
                w.round_median_empty_programs_loss_pct(),
                &w.round_floor_losses()
            ),
            figure(&w.attached, digits),
            signed(w.loss_pct(false)),
            range(w.round_median_loss_pct(false), &w.round_losses(false)),
            figure(&w.attached_stats, digits),
            range(w.round_median_loss_pct(true), &w.round_losses(true)),
        );
    }
    let _ = writeln!(
        s,
        "\nEach program's cost per event during the statistics-on runs (`run_time_ns / \
         run_cnt`, all rounds; machine-wide events):\n\n\
         | workload | program | events/s | ns/event | CPU % of one core |\n|---|---|---:|---:|---:|"
    );
    for w in &o.workloads {
        for p in w.programs.iter().filter(|p| p.events > 0) {
            program_row(&mut s, &w.name, p);
        }
    }
    s.push('\n');
    s
}

/// One program's cost under a load, as a row of the per-event tables.
fn program_row(s: &mut String, load: &str, p: &ProgramCost) {
    let _ = writeln!(
        s,
        "| {load} | `{}` | {} | {} | {} |",
        p.program,
        num(p.events_per_sec, 0),
        num(p.ns_per_event, 1),
        num(p.cpu_pct_of_one_core, 2),
    );
}

fn failed<T>(v: Option<&Scenario<T>>) -> String {
    match v.and_then(|v| v.outcome.error()) {
        Some(e) => format!("**Failed:** `{e}`\n\n"),
        None => String::new(),
    }
}

/// KiB, from bytes.
fn kib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0
}

/// The report as markdown.
pub fn markdown(r: &BenchResults) -> String {
    markdown_with(r, &[])
}

/// The report with a section of plots, `(title, link)` each, after the
/// targets.
pub fn markdown_with(r: &BenchResults, plots: &[(String, String)]) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# podmeter benchmark\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench{}` run of {} ({} s in all). Raw figures: `bench/results/{}-{}.json`. \
         Figures as measured, on a machine that may have had other work: see the load averages.\n",
        if r.mode == "quick" { " --quick" } else { "" },
        r.started,
        num(r.total_secs, 0),
        r.started,
        r.mode,
    );
    if let Some(note) = &r.note {
        let _ = writeln!(s, "> {note}\n");
    }
    if r.overhead.is_some() {
        s += &overhead(r);
    }
    let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
    for (label, v) in [
        ("CPU", m.cpu.clone()),
        ("CPUs", m.cpus.to_string()),
        ("virtual machine", m.hypervisor.to_string()),
        ("memory (GiB)", json_text(&m.memory_gib)),
        ("kernel", m.kernel.clone()),
        ("cgroups", m.cgroups.clone()),
        ("podmeter", m.podmeter.clone()),
        ("kubelet (cAdvisor)", m.kubelet.clone()),
        ("node-exporter", m.node_exporter.clone()),
        ("stress-ng", m.stress_ng.clone()),
        ("iperf3", m.iperf3.clone()),
        ("bpftool", m.bpftool.clone()),
        ("rustc", m.rustc.clone()),
    ] {
        let _ = writeln!(s, "| {label} | {} |", v.replace('|', "\\|"));
    }
    let _ = writeln!(
        s,
        "\nWhat the machine did during each scenario (this benchmark included; other work on \
         the machine shows as load beyond it):\n\n\
         | scenario | secs | load avg at start | at end | machine CPU busy % | steal % |\n|---|---:|---|---|---:|---:|"
    );
    let none = Conditions::default();
    let ab = r.overhead.as_ref().map(|x| ("overhead", Some(&x.meta)));
    for (k, c) in ab.into_iter().chain([
        ("kernel", r.kernel.as_ref().map(|x| &x.meta)),
        ("scale", r.scale.as_ref().map(|x| &x.meta)),
        ("accuracy", r.accuracy.as_ref().map(|x| &x.meta)),
        ("side_by_side", r.side_by_side.as_ref().map(|x| &x.meta)),
    ]) {
        let c = c.unwrap_or(&none);
        let _ = writeln!(
            s,
            "| {k} | {} | {} | {} | {} | {} |",
            num(c.secs, 0),
            c.load_at_start.as_deref().unwrap_or("–"),
            c.load_at_end.as_deref().unwrap_or("–"),
            num(c.machine_busy_pct, 1),
            num(c.machine_steal_pct, 1),
        );
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "## Targets\n\n| target | measured | met |\n|---|---|---|"
    );
    for t in &r.targets {
        let met = match (t.met, &t.measured) {
            (Some(true), _) => "yes",
            (Some(false), _) => "**no**",
            // A figure without a verdict: an A/B loss whose interval holds
            // the limit.
            (None, Some(_)) => "cannot tell",
            (None, None) => "not measured",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {met} |",
            t.target,
            t.measured.as_deref().unwrap_or("–")
        );
    }

    if !plots.is_empty() {
        let _ = writeln!(s, "\n## Plots\n");
        for (title, link) in plots {
            let _ = writeln!(s, "![{title}]({link})\n");
        }
    }

    // 1. Kernel.
    let _ = writeln!(s, "\n## 1. Kernel cost per event (eBPF programs)\n");
    s += &failed(r.kernel.as_ref());
    let _ = writeln!(
        s,
        "`run_time_ns / run_cnt` with BPF run-time statistics on (they add two clock reads \
         per run, so these are upper bounds). Events are counted machine-wide.\n"
    );
    let _ = writeln!(
        s,
        "| load | program | events/s | ns/event | CPU % of one core |\n|---|---|---:|---:|---:|"
    );
    if let Some(k) = r.kernel() {
        for load in k.loads() {
            for p in &load.programs {
                program_row(&mut s, &load.load, p);
            }
        }
        let sw = &k.switch_throughput;
        let base = sw.without_agent.bogo_ops_per_sec;
        let pct = |x: Option<f64>| match (x, base) {
            (Some(x), Some(b)) if b > 0.0 => format!(" ({:+.1} %)", (x - b) / b * 100.0),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "\nContext-switch throughput (`stress-ng --switch`, bogo ops/s): without podmeter {}, \
             with podmeter {}{}, with podmeter and BPF statistics {}{}. \
             (`other_podmeter_programs_loaded`: {} programs of other podmeter instances were loaded.)",
            num(base, 0),
            num(sw.with_agent_stats_off.bogo_ops_per_sec, 0),
            pct(sw.with_agent_stats_off.bogo_ops_per_sec),
            num(sw.with_agent_stats_on.bogo_ops_per_sec, 0),
            pct(sw.with_agent_stats_on.bogo_ops_per_sec),
            num(k.other_podmeter_programs_loaded, 0),
        );
        if let Some(n) = k.lossy_tcp.as_ref().and_then(|l| l.iperf3_retransmits) {
            let _ = writeln!(
                s,
                "\nUnder TCP with random loss iperf3's sender retransmitted {n} segments. The \
                 retransmit program runs once per retransmitted skb, which can carry many \
                 segments (GSO), so it runs far fewer times than that."
            );
        }
    }

    // 2. Scale.
    let _ = writeln!(
        s,
        "\n## 2. Agent at scale (pod-like cgroups with light workers)\n"
    );
    s += &failed(r.scale.as_ref());
    // Runs before the limit was added have no such key.
    let limit = match r.plan.scale_cpu_limit_millicores {
        Some(m) => format!(
            ", the container limited to {m}m CPU (so podmeter reads every container's \
             throttling counters at each scrape: the costlier case)"
        ),
        None => ", no CPU limits".to_owned(),
    };
    let _ = writeln!(
        s,
        "Each pod: a kubelet-style cgroupfs pod and container cgroup with a worker waking every \
         100 ms for 20 µs{limit}. Fresh agent per size; CPU from its cgroup's `cpu.stat` over a {} s \
         window scraped every 15 s; /metrics latency of that window's scrapes (\"15 s apart\": as \
         Prometheus scrapes, each on a connection of its own; runs before they were timed so \
         have none) and of {} back-to-back scrapes \
         (HTTP/1.1, gzip accepted, as Prometheus asks, the body not decoded); CPU per scrape = \
         burst CPU minus the idle rate. \
         CPU error: podmeter's delta against each container's `cpu.stat` over the window.\n",
        num(r.plan.window_secs, 0),
        num(r.plan.burst, 0),
    );
    let _ = writeln!(
        s,
        "| pods | CPU s/min | % of one core | peak RSS MiB | p50 / max ms 15 s apart | p50 ms back to back | p99 ms back to back | payload KiB (gzip) | series | CPU ms/scrape | idle % core | CPU error total % | per-container max % |\n|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    );
    for row in r.scale().into_iter().flat_map(|x| &x.by_pods) {
        let p = match &row.outcome {
            Outcome::Measured(p) => p,
            Outcome::Failed(e) => {
                let _ = writeln!(s, "| {} | failed: {e} |", row.meta.pods);
                continue;
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
            row.meta.pods,
            num(p.cpu_secs_per_min, 3),
            num(p.cpu_pct_of_one_core, 3),
            num(p.peak_rss_mib, 1),
            p.spaced.as_ref().map_or("–".to_owned(), |x| format!(
                "{} / {}",
                num(x.p50_ms, 2),
                num(x.max_ms, 2)
            )),
            num(p.scrape.p50_ms, 2),
            num(p.scrape.p99_ms, 2),
            num(kib(p.payload_bytes), 1),
            num(kib(p.scrape.wire_bytes), 1),
            num(p.series, 0),
            num(p.cpu_ms_per_scrape, 3),
            num(p.background_cpu_pct, 3),
            num(p.cpu_accuracy.total_error_pct, 3),
            num(p.cpu_accuracy.per_container_abs_error_pct.max, 3),
        );
    }
    let plain: Vec<(u64, &AtPods, &PlainBurst)> = r
        .scale()
        .into_iter()
        .flat_map(|x| &x.by_pods)
        .filter_map(|row| match &row.outcome {
            Outcome::Measured(p) => p.plain.as_ref().map(|q| (row.meta.pods, p, q)),
            Outcome::Failed(_) => None,
        })
        .collect();
    if !plain.is_empty() {
        let _ = writeln!(
            s,
            "\ngzip, which podmeter uses when a scraper asks (Prometheus always does), against \
             the same burst without `Accept-Encoding: gzip`:\n\n\
             | pods | bytes gzip | bytes plain | p50 / p99 ms gzip | p50 / p99 ms plain \
             | CPU ms/scrape gzip | CPU ms/scrape plain |\n\
             |---:|---:|---:|---:|---:|---:|---:|"
        );
        for (pods, g, q) in plain {
            let _ = writeln!(
                s,
                "| {pods} | {} | {} | {} / {} | {} / {} | {} | {} |",
                g.scrape.wire_bytes,
                q.scrape.wire_bytes,
                num(g.scrape.p50_ms, 2),
                num(g.scrape.p99_ms, 2),
                num(q.scrape.p50_ms, 2),
                num(q.scrape.p99_ms, 2),
                num(g.cpu_ms_per_scrape, 3),
                num(q.cpu_ms_per_scrape, 3),
            );
        }
    }

    // 3. Accuracy.
    let a = r.accuracy();
    let _ = writeln!(s, "\n## 3. Accuracy on this host\n");
    s += &failed(r.accuracy.as_ref());
    let _ = writeln!(
        s,
        "CPU over {} s against `cpu.stat` (read just before and after each scrape):\n\n\
         | cgroup | work | CPU % | kernel s | podmeter s | error % |\n|---|---|---:|---:|---:|---:|",
        num(a.map(|a| a.cpu.window_secs), 0)
    );
    for c in a.into_iter().flat_map(|a| &a.cpu.cgroups) {
        let _ = writeln!(
            s,
            "| {} | `pm-work {}` | {} | {} | {} | {} |",
            c.cgroup,
            c.work,
            num(c.kernel_cpu_pct, 1),
            num(c.kernel_cpu_secs, 3),
            num(c.podmeter_cpu_secs, 3),
            num(c.error_pct, 3),
        );
    }
    let _ = writeln!(
        s,
        "\nNetwork between two namespaces over a veth pair (TCP {} bytes, UDP {} × 1000 bytes):\n\n\
         | flow | counter | podmeter bytes | truth bytes | truth | error % |\n|---|---|---:|---:|---|---:|",
        num(r.plan.tcp_bytes, 0),
        num(r.plan.udp_count, 0),
    );
    for f in a.into_iter().flat_map(|a| &a.network.flows) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            f.flow,
            f.counter,
            num(f.podmeter_bytes, 0),
            num(f.truth_bytes, 0),
            f.truth,
            num(f.error_pct, 4),
        );
    }

    // 4. Side by side.
    let sb = r.side_by_side();
    let _ = writeln!(
        s,
        "\n## 4. Side by side on real pods: podmeter, cAdvisor, node-exporter\n"
    );
    s += &failed(r.side_by_side.as_ref());
    let _ = writeln!(
        s,
        "{} pods of ours in namespace `bench` ({} on the node in all). Every exposer is scraped \
         the same way; CPU per scrape = CPU during a burst of back-to-back scrapes minus the \
         exposer's idle rate. The kubelet's CPU comes from `/proc/<pid>/stat` (10 ms ticks) and \
         includes everything it does in the burst.\n\n\
         | exposer | p50 ms | p99 ms | payload KiB (gzip) | series | CPU ms per scrape | idle % core |\n|---|---:|---:|---|---:|---:|---:|",
        num(sb.map(|x| x.bench_pods), 0),
        num(sb.map(|x| x.pods_on_node), 0),
    );
    for e in sb.into_iter().flat_map(|x| &x.exposers) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} ({}) | {} | {} | {} |",
            e.exposer,
            num(e.scrape.p50_ms, 2),
            num(e.scrape.p99_ms, 2),
            num(kib(e.payload_bytes), 1),
            num(kib(e.scrape.wire_bytes), 1),
            num(e.series, 0),
            num(e.cpu_ms_per_scrape, 3),
            num(e.idle_cpu_pct, 3),
        );
    }
    let _ = writeln!(
        s,
        "\nCPU of the same containers against their `cpu.stat` (cAdvisor against the kernel \
         counter interpolated at cAdvisor's own sample times):\n\n\
         | pod | CPU % | podmeter error % | cAdvisor error % | cAdvisor sample age (s) |\n|---|---:|---:|---:|---:|"
    );
    for c in sb.into_iter().flat_map(|x| &x.cpu) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            c.pod,
            num(c.kernel_cpu_pct, 2),
            num(c.podmeter_error_pct, 3),
            num(c.cadvisor_error_pct, 3),
            num(c.cadvisor_sample_age_max_secs, 1),
        );
    }
    let _ = writeln!(
        s,
        "\nNetwork of the same pods against their network namespace's IPv4 byte counters \
         (cAdvisor counts the pod's `eth0`, link-layer headers and non-IP frames included):\n\n\
         | pod | direction | truth bytes | podmeter error % | cAdvisor error % |\n|---|---|---:|---:|---:|"
    );
    for n in sb.into_iter().flat_map(|x| &x.network) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            n.pod,
            n.direction,
            num(n.truth_ip_bytes, 0),
            num(n.podmeter_error_pct, 4),
            num(n.cadvisor_error_pct, 4),
        );
    }
    s += &notes(r);
    s
}

/// What the figures say beyond the tables, derived from them.
fn notes(r: &BenchResults) -> String {
    let mut n = Vec::new();
    if let Some(Exposer {
        scrape,
        payload_bytes,
        ..
    }) = r.exposer("podmeter")
        && scrape.wire_bytes as f64 >= *payload_bytes as f64 * 0.9
    {
        n.push(
            "podmeter answered uncompressed although the scraper accepts gzip \
             (wire bytes = payload); node-exporter and the kubelet compress."
                .to_owned(),
        );
    }
    let ages = r
        .side_by_side()
        .into_iter()
        .flat_map(|x| &x.cpu)
        .filter_map(|c| c.cadvisor_sample_age_max_secs);
    if let Some(max) = ages.reduce(f64::max) {
        n.push(format!(
            "cAdvisor serves what its housekeeping last read: samples up to {max:.1} s old \
             at scrape time; podmeter reads its kernel maps at the scrape."
        ));
    }
    if let Some(k) = r.kernel() {
        for load in k.loads() {
            for p in &load.programs {
                if let Some(m) = p.recursion_misses.filter(|m| *m > 0) {
                    n.push(format!(
                        "`{}` was skipped {m} times under {} (already running on that CPU).",
                        p.program, load.load
                    ));
                }
            }
        }
    }
    n.push(
        "The light pods' worker wakes every 100 ms, not every 10 ms: at 1000 pods, 10 ms \
         would be 100,000 wake-ups a second, more than this machine's cores."
            .to_owned(),
    );
    n.push(
        "Kernel per-event figures are machine-wide (every context switch and packet of the \
         machine during the window), measured with BPF run-time statistics on."
            .to_owned(),
    );
    let mut s = String::from("\n## Notes\n\n");
    for x in n {
        let _ = writeln!(s, "- {x}");
    }
    s
}

/// `md` (a new report) followed by the sections of `existing` (the current
/// `bench/RESULTS.md`) that the report does not write: the soak's, which
/// `cargo xtask soak` writes, and any written by hand (the kernel matrix).
/// A section runs from its `## ` heading to the next one.
pub fn with_other_sections(md: &str, existing: &str) -> String {
    let ours: Vec<&str> = md.lines().filter(|l| l.starts_with("## ")).collect();
    let mut out = md.trim_end().to_owned();
    out.push('\n');
    let mut keep = false;
    let mut kept = String::new();
    for line in existing.lines() {
        if line.starts_with("## ") {
            keep = !ours.contains(&line);
            if keep && !kept.is_empty() {
                kept = kept.trim_end().to_owned() + "\n\n";
            }
        }
        if keep {
            kept += line;
            kept.push('\n');
        }
    }
    if !kept.is_empty() {
        out.push('\n');
        out += kept.trim_end();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::{Conditions, Machine, PlanRecord, SCHEMA_VERSION};

    /// The latest full run (schema 1: no `schema_version`) and its report
    /// as the untyped code rendered it.
    const FULL: &str = include_str!("../../testdata/2026-11-30T184237Z-full.json");
    const FULL_MD: &str = include_str!("../../testdata/2026-11-30T184237Z-full.md");
    /// An older run: no load figures per scenario, no recursion misses, no
    /// CPU limit in the plan.
    const OLDER: &str = include_str!("../../testdata/2026-11-25T074050Z-full.json");

    fn full() -> BenchResults {
        serde_json::from_str(FULL).unwrap()
    }

    fn rendered(mut r: BenchResults) -> String {
        r.targets = targets(&r);
        markdown(&r)
    }

    #[test]
    fn renders_the_stored_run_as_before() {
        let r = full();
        assert_eq!(r.schema_version, 1);
        let md = rendered(r);
        for row in [
            "| sched_switch program ≤ 100 ns per event | 97.600 ns | yes |",
            "| /metrics p99 ≤ 20 ms at 1000 pods | 35.840 ms | **no** |",
            "| stress-ng --switch 2 (30 s) | `pm_sched_switch` | 521526 | 97.6 | 5.09 |",
            "| stress-ng --switch 2 (30 s) | `pm_skb_ingress` | 0 | – | 0.00 |",
            "| 1000 | 0.256 | 0.427 | 32.5 | – | 22.88 | 35.84 | 1680.9 (1680.9) | 7040 | 18.832 | 0.290 | -0.020 | 0.879 |",
            "| duty-50 | `pm-work tick 10000 5000` | 47.9 | 57.438 | 57.355 | -0.144 |",
            "| kubelet cAdvisor | 166.55 | 212.22 | 1267.8 (62.4) | 4563 | 159.281 | 3.967 |",
            "| light-6 | 0.07 | 0.061 | – | 17.4 |",
            "| tcp-send | receive | 147228 | 0.0000 | 33.6077 |",
        ] {
            assert!(md.lines().any(|l| l == row), "no row {row:?} in\n{md}");
        }
        assert_eq!(md, FULL_MD);
    }

    #[test]
    fn reads_an_older_run() {
        let r: BenchResults = serde_json::from_str(OLDER).unwrap();
        assert_eq!(r.plan.scale_cpu_limit_millicores, None);
        assert_eq!(r.kernel.as_ref().unwrap().meta.load_at_start, None);
        assert!(r.note.is_some());
        let md = rendered(r);
        assert!(md.contains(", no CPU limits."), "{md}");
        assert!(
            md.contains("| kernel | 120 | – | 16.26 10.05 8.85 | – | – |"),
            "{md}"
        );
    }

    /// The last A/B run before the empty-programs arm: that arm's columns
    /// are gaps, and the targets name no floor.
    #[test]
    fn reads_an_ab_run_without_the_empty_programs_arm() {
        let r: BenchResults = serde_json::from_str(include_str!(
            "../../../bench/results/2026-12-05T175238Z-full.json"
        ))
        .unwrap();
        let md = rendered(r);
        let row = "| stress-ng --switch 2 (10 s) | bogo ops/s | 1259248 (1243812–1268564) | – | – | – | \
                   1170986 (1148539–1189369) | 7.0 | 6.8 (5.2 to 9.1) | 1106240 (1102233–1129102) | 11.6 (11.0 to 12.4) |";
        assert!(md.lines().any(|l| l == row), "no row {row:?} in\n{md}");
        assert!(
            md.lines()
                .any(|l| l.starts_with("| stress-ng --switch throughput lost")
                    && l.ends_with("| 6.771 % (too few rounds for an interval) | cannot tell |")),
            "{md}"
        );
    }

    #[test]
    fn round_trips() {
        let mut r = full();
        r.schema_version = SCHEMA_VERSION;
        r.targets = targets(&r);
        let text = serde_json::to_string_pretty(&r).unwrap();
        let back: BenchResults = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert!(text.contains(&format!("\"schema_version\": {SCHEMA_VERSION}")));
        // A figure the run did not produce stays null, not 0.
        assert!(text.contains("\"ns_per_event\": null"), "{text}");
    }

    #[test]
    fn failed_scenarios_and_sizes_are_reported() {
        let mut r = full();
        r.side_by_side.as_mut().unwrap().outcome = Outcome::Failed("cluster down".into());
        let by_pods = &mut r.scale.as_mut().unwrap().outcome;
        let Outcome::Measured(scale) = by_pods else {
            panic!()
        };
        scale.by_pods[2].outcome = Outcome::Failed("out of memory".into());
        let text = serde_json::to_string(&r).unwrap();
        let r: BenchResults = serde_json::from_str(&text).unwrap();
        let md = rendered(r);
        assert!(md.contains("**Failed:** `cluster down`"), "{md}");
        assert!(md.contains("| 1000 | failed: out of memory |"), "{md}");
        assert!(
            md.contains("| side_by_side | 244 | 1.43 1.36 3.99 |"),
            "{md}"
        );
    }

    /// Scrapes 15 s apart get a 10 ms target and a column of their own;
    /// the burst's target stays as it was.
    #[test]
    fn spaced_scrapes_are_judged_and_shown() {
        use crate::bench::results::BurstSummary;
        let mut r = with_overhead();
        let Some(Outcome::Measured(scale)) = r.scale.as_mut().map(|s| &mut s.outcome) else {
            panic!("the stored run has a scale scenario");
        };
        let Outcome::Measured(p) = &mut scale.by_pods[2].outcome else {
            panic!("1000 pods measured");
        };
        p.spaced = Some(BurstSummary {
            scrapes: 18,
            p50_ms: Some(8.5),
            p99_ms: Some(9.75),
            max_ms: Some(12.25),
            wire_bytes: 1000,
        });
        let t = targets(&r);
        let spaced = t
            .iter()
            .find(|t| t.target.contains("15 s apart"))
            .expect("a target for scrapes 15 s apart");
        assert_eq!(
            spaced.target,
            "/metrics ≤ 10 ms at 1000 pods, the slowest of 18 scrapes 15 s apart"
        );
        assert_eq!(
            (spaced.measured.as_deref(), spaced.met),
            (Some("12.250 ms"), Some(false))
        );
        let burst = t
            .iter()
            .find(|t| t.target == "/metrics p99 ≤ 10 ms at 1000 pods")
            .expect("the burst's target");
        assert_eq!(burst.measured.as_deref(), Some("35.840 ms"));
        let md = rendered(r);
        let row = "| 1000 | 0.256 | 0.427 | 32.5 | 8.50 / 12.25 | 22.88 | 35.84 |";
        assert!(md.lines().any(|l| l.starts_with(row)), "{md}");
    }

    /// With ten rounds, a loss is judged on its interval: met when all of
    /// it is under the limit, missed when all of it is over, and "cannot
    /// tell" when it holds the limit.
    #[test]
    fn ten_rounds_are_judged_on_the_interval() {
        use crate::bench::results::{AbWorkload, Overhead};
        let w = |name: &str, losses: [f64; 10]| AbWorkload {
            name: name.into(),
            load: format!("{name} load"),
            unit: "ops/s".into(),
            detached: vec![Some(1000.0); 10],
            attached: losses.map(|l| Some(1000.0 - l * 10.0)).to_vec(),
            attached_stats: vec![None; 10],
            empty_programs: vec![None; 10],
            programs: vec![],
        };
        let mut r = with_overhead();
        r.overhead = Some(Scenario {
            meta: Conditions::default(),
            outcome: Outcome::Measured(Overhead {
                rounds: 10,
                run_secs: 4,
                workloads: vec![
                    // Median 1.5 %, but the second-lowest and second-highest
                    // rounds (the 98 % interval) are -4 and 9 %.
                    w(
                        "switch",
                        [-9.0, -4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 9.0, 22.0],
                    ),
                    // Every round but the lowest over 3 %.
                    w("udp", [1.0, 3.5, 4.0, 4.0, 5.0, 5.0, 6.0, 6.0, 7.0, 8.0]),
                ],
            }),
        });
        let t = targets(&r);
        let find = |prefix: &str| t.iter().find(|t| t.target.starts_with(prefix)).unwrap();
        let sw = find("stress-ng --switch throughput lost");
        assert_eq!(
            (sw.measured.as_deref(), sw.met),
            (Some("1.500 % (97.9 % interval -4.0 to 9.0 %)"), None)
        );
        let udp = find("small-packet UDP");
        assert_eq!(
            (udp.measured.as_deref(), udp.met),
            (Some("5.000 % (97.9 % interval 3.5 to 7.0 %)"), Some(false))
        );
        r.targets = t;
        let md = rendered(r);
        assert!(
            md.lines()
                .any(|l| l.starts_with("| stress-ng --switch throughput lost")
                    && l.ends_with("| cannot tell |")),
            "{md}"
        );
    }

    /// A machine that slows from one round to the next: the medians'
    /// difference takes both medians from the one round that lost least;
    /// the rounds' own median shows what most rounds lost.
    #[test]
    fn the_rounds_own_losses_survive_a_drift() {
        use crate::bench::results::AbWorkload;
        let w = AbWorkload {
            name: "switch".into(),
            load: "switch load".into(),
            unit: "ops/s".into(),
            detached: [1000.0, 900.0, 800.0].map(Some).to_vec(),
            attached: [950.0, 891.0, 760.0].map(Some).to_vec(),
            attached_stats: vec![None; 3],
            empty_programs: vec![None; 3],
            programs: vec![],
        };
        let near = |x: Option<f64>, want: f64| x.is_some_and(|x| (x - want).abs() < 1e-9);
        assert!(near(w.loss_pct(false), 1.0), "{:?}", w.loss_pct(false));
        assert!(near(w.round_median_loss_pct(false), 5.0));
        assert_eq!(w.round_median_loss_pct(true), None);
        assert_eq!(w.round_median_empty_programs_loss_pct(), None);
    }

    #[test]
    fn targets_judged() {
        let mut r = full();
        let met =
            |r: &BenchResults| -> Vec<Option<bool>> { targets(r).iter().map(|t| t.met).collect() };
        assert_eq!(
            met(&r),
            [
                Some(true),
                Some(true),
                Some(true),
                Some(false),
                Some(true),
                Some(true),
                Some(true),
                Some(false),
            ]
        );
        // Over the RSS target; a pod's CPU 1.5 % off; no side by side, so no
        // comparison with cAdvisor (and the CPU target falls back to the
        // host's cgroups).
        let Outcome::Measured(scale) = &mut r.scale.as_mut().unwrap().outcome else {
            panic!()
        };
        let Outcome::Measured(p) = &mut scale.by_pods[2].outcome else {
            panic!()
        };
        p.peak_rss_mib = 40.5;
        p.scrape.p99_ms = Some(19.0);
        let t = targets(&r);
        assert_eq!(t[2].met, Some(false));
        assert_eq!(t[2].measured.as_deref(), Some("40.500 MiB"));
        assert_eq!(t[3].met, Some(true));
        let Outcome::Measured(a) = &mut r.accuracy.as_mut().unwrap().outcome else {
            panic!()
        };
        a.cpu.cgroups[1].error_pct = Some(-1.5);
        let t = targets(&r);
        assert_eq!(t[4].met, Some(false));
        assert_eq!(
            t[4].measured.as_deref(),
            Some("1.500 % (host cgroup duty-20)")
        );
        r.side_by_side = None;
        let t = targets(&r);
        assert_eq!(t[6].met, None);
        assert_eq!(t[6].measured, None);
    }

    #[test]
    fn nothing_measured() {
        let r = BenchResults {
            schema_version: SCHEMA_VERSION,
            mode: "quick".into(),
            started: "2026-01-01T000000Z".into(),
            note: None,
            machine: Machine {
                cpu: "test".into(),
                cpus: 2,
                hypervisor: false,
                memory_gib: 4.0,
                kernel: "6.1".into(),
                cgroups: "cgroup2".into(),
                podmeter: "podmeter".into(),
                kubelet: "not found".into(),
                node_exporter: "a | b".into(),
                stress_ng: String::new(),
                iperf3: String::new(),
                bpftool: String::new(),
                rustc: String::new(),
            },
            plan: PlanRecord {
                kernel_secs: 1,
                scales: vec![10],
                idle_secs: 1,
                window_secs: 1,
                scrape_every_secs: 15,
                burst: 1,
                accuracy_secs: 1,
                tcp_bytes: 1,
                udp_count: 1,
                light_pods: 1,
                cadvisor_burst: 1,
                light_worker: "tick 100000 20".into(),
                scale_cpu_limit_millicores: Some(500),
                ab_rounds: None,
                ab_secs: None,
            },
            overhead: None,
            kernel: Some(Scenario {
                meta: Conditions::default(),
                outcome: Outcome::Failed("no bpftool".into()),
            }),
            scale: None,
            accuracy: None,
            side_by_side: None,
            total_secs: None,
            targets: vec![],
        };
        assert!(
            targets(&r)
                .iter()
                .all(|t| t.met.is_none() && t.measured.is_none())
        );
        let md = rendered(r);
        assert!(md.contains("`cargo xtask bench --quick` run of 2026-01-01T000000Z (– s in all)"));
        assert!(md.contains("| node-exporter | a \\| b |"));
        assert!(md.contains("| memory (GiB) | 4.0 |"));
        assert!(md.contains("| scale | – | – | – | – | – |"));
        assert!(md.contains("**Failed:** `no bpftool`"));
        assert_eq!(md.matches("| not measured |").count(), 8);
    }

    /// A run with the A/B scenario: three rounds of three workloads.
    fn with_overhead() -> BenchResults {
        use crate::bench::results::{AbWorkload, Overhead, ProgramCost};
        let mut r = full();
        r.plan.ab_rounds = Some(3);
        r.plan.ab_secs = Some(10);
        let cost = |program: &str, ns: f64| ProgramCost {
            program: program.into(),
            kind: "cgroup_skb".into(),
            events: 1000,
            events_per_sec: 100.0,
            ns_per_event: Some(ns),
            cpu_pct_of_one_core: 0.5,
            recursion_misses: Some(0),
        };
        let w = |name: &str, d: [f64; 3], a: [f64; 3], st: [f64; 3], programs| AbWorkload {
            name: name.into(),
            load: format!("{name} load"),
            unit: "ops/s".into(),
            detached: d.map(Some).to_vec(),
            attached: a.map(Some).to_vec(),
            attached_stats: st.map(Some).to_vec(),
            // Medians 1 % below the detached ones.
            empty_programs: d.map(|x| Some(x * 0.99)).to_vec(),
            programs,
        };
        r.overhead = Some(Scenario {
            meta: Conditions::default(),
            outcome: Outcome::Measured(Overhead {
                rounds: 3,
                run_secs: 10,
                workloads: vec![
                    // Medians 1000 and 980: 2 % apart; but the rounds lost
                    // 4, 0.99 and 1.01 %: their median is 1.01 %.
                    w(
                        "switch",
                        [1000.0, 1010.0, 990.0],
                        [960.0, 1000.0, 980.0],
                        [900.0; 3],
                        vec![],
                    ),
                    // 5 % lost, one round's figure missing.
                    w(
                        "udp",
                        [2000.0, 2000.0, 2000.0],
                        [1900.0, 1900.0, 1900.0],
                        [1800.0; 3],
                        vec![cost("pm_skb_ingress", 48.3), cost("pm_skb_egress", 81.0)],
                    ),
                    w("tcp", [10.0; 3], [10.0; 3], [9.5; 3], vec![]),
                ],
            }),
        });
        if let Some(w) = r.overhead.as_mut().and_then(|o| match &mut o.outcome {
            Outcome::Measured(o) => o.workloads.get_mut(1),
            _ => None,
        }) {
            w.attached[2] = None;
        }
        r
    }

    #[test]
    fn the_ab_scenario_is_judged_and_rendered_first() {
        let r = with_overhead();
        // Its JSON reads back as written (its fields share one object with
        // the scenario's conditions).
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<BenchResults>(&text).unwrap(), r);
        let t = targets(&r);
        let find = |prefix: &str| t.iter().find(|t| t.target.starts_with(prefix)).unwrap();
        let sw = find("stress-ng --switch throughput lost");
        assert_eq!(
            sw.measured.as_deref(),
            Some("1.010 % (too few rounds for an interval) (empty programs alone: 1.000 %)")
        );
        // Three rounds are too few to judge on.
        assert_eq!(sw.met, None);
        assert!(sw.target.contains("median of 3"), "{}", sw.target);
        let udp = find("small-packet UDP");
        assert_eq!(
            (udp.measured.as_deref(), udp.met),
            (
                Some("5.000 % (too few rounds for an interval) (empty programs alone: 1.000 %)"),
                None
            )
        );
        let packet = find("packet programs ≤ 80 ns");
        assert_eq!(
            (packet.measured.as_deref(), packet.met),
            (Some("81.000 ns"), Some(false))
        );
        let p99 = find("/metrics p99 ≤ 10 ms");
        assert_eq!(p99.met, Some(false));
        // One switch target, not the kernel scenario's as well.
        assert_eq!(
            t.iter().filter(|t| t.target.contains("--switch")).count(),
            1
        );

        let md = rendered(r.clone());
        let ab = md.find("## 0. What every workload pays (A/B)").expect(&md);
        assert!(
            ab < md.find("## Machine").unwrap(),
            "the A/B section comes first"
        );
        for row in [
            "| switch load | ops/s | 1000 (990–1010) | 990 (980–1000) | 1.0 | 1.0 (1.0 to 1.0) | 980 (960–1000) | 2.0 | 1.0 (1.0 to 4.0) | 900 (900–900) | 10.0 (9.1 to 10.9) |",
            "| udp load | ops/s | 2000 (2000–2000) | 1980 (1980–1980) | 1.0 | 1.0 (1.0 to 1.0) | 1900 (1900–1900) | 5.0 | 5.0 (5.0 to 5.0) | 1800 (1800–1800) | 10.0 (10.0 to 10.0) |",
            "| tcp load | ops/s | 10.000 (10.000–10.000) | 9.900 (9.900–9.900) | 1.0 | 1.0 (1.0 to 1.0) | 10.000 (10.000–10.000) | 0.0 | 0.0 (0.0 to 0.0) | 9.500 (9.500–9.500) | 5.0 (5.0 to 5.0) |",
            "| udp | `pm_skb_egress` | 100 | 81.0 | 0.50 |",
            "| overhead | – | – | – | – | – |",
        ] {
            assert!(md.lines().any(|l| l == row), "no row {row:?} in\n{md}");
        }
        let plots = crate::bench::plot::plots(&r);
        let names: Vec<&str> = plots.iter().map(|p| p.0).collect();
        assert_eq!(
            names,
            ["scale-cpu", "scale-rss", "scale-latency", "overhead"]
        );
        let linked = markdown_with(&r, &[("A plot".into(), "results/x.svg".into())]);
        assert!(linked.contains("## Plots\n\n![A plot](results/x.svg)\n"));
    }

    #[test]
    fn other_sections_are_kept() {
        let md = "# podmeter benchmark\n\nnew\n\n## Machine\n\nnew machine\n\n## Notes\n\n- new\n";
        let existing = "# podmeter benchmark\n\nold\n\n## Machine\n\nold machine\n\n## Notes\n\n- old\n\n\
                        ## Kernel matrix (vm-test)\n\nby hand\n\n## Reliability (soak)\n\nsoak\n";
        assert_eq!(
            with_other_sections(md, existing),
            format!(
                "{}\n## Kernel matrix (vm-test)\n\nby hand\n\n## Reliability (soak)\n\nsoak\n",
                md
            )
        );
        assert_eq!(with_other_sections(md, ""), md);
    }
}
