//! The targets of issue 5, judged from the results, and the markdown report.

use std::fmt::Write as _;

use serde_json::{Value, json};

/// A number as text, `–` where missing.
fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        Some(x) => format!("{x}"),
        None => "–".into(),
    }
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|x| x[key] == value))
        .unwrap_or(&Value::Null)
}

fn at_pods(r: &Value, n: u64) -> &Value {
    r["scale"]["by_pods"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["pods"] == n))
        .unwrap_or(&Value::Null)
}

/// The row with the largest absolute `field` over `sources` (rows, the
/// field, how to name a row), as (|value|, name).
/// Rows, the field compared, and how to name a row.
type Source<'a> = (&'a Value, &'a str, &'a dyn Fn(&Value) -> String);

fn worst(sources: &[Source<'_>]) -> Option<(f64, String)> {
    sources
        .iter()
        .flat_map(|(rows, field, name)| {
            rows.as_array()
                .into_iter()
                .flatten()
                .filter_map(move |r| Some((r[*field].as_f64()?.abs(), name(r))))
        })
        .reduce(|a, b| if b.0 > a.0 { b } else { a })
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// Each target: what was measured and whether it is met (`null` when the
/// scenario did not produce the figure).
pub fn targets(r: &Value) -> Value {
    let mut out = Vec::new();
    let mut add = |target: &str, measured: Option<f64>, unit: &str, ok: &dyn Fn(f64) -> bool| {
        out.push(json!({
            "target": target,
            "measured": measured.map(|m| format!("{m:.3} {unit}").trim().to_owned()),
            "met": measured.map(ok),
        }));
    };
    let sched = find(
        &r["kernel"]["context_switch_load"]["programs"],
        "program",
        "pm_sched_switch",
    );
    add(
        "sched_switch program ≤ 100 ns per event",
        sched["ns_per_event"].as_f64(),
        "ns",
        &|x| x <= 100.0,
    );
    let k = at_pods(r, 1000);
    add(
        "agent ≤ 0.5 % of one core at 1000 pods, 15 s scrapes",
        k["cpu_pct_of_one_core"].as_f64(),
        "%",
        &|x| x <= 0.5,
    );
    add(
        "agent ≤ 40 MiB RSS at 1000 pods",
        k["peak_rss_mib"].as_f64(),
        "MiB",
        &|x| x <= 40.0,
    );
    add(
        "/metrics p99 ≤ 20 ms at 1000 pods",
        k["scrape"]["p99_ms"].as_f64(),
        "ms",
        &|x| x <= 20.0,
    );
    let mut add_worst = |target: &str, w: Option<(f64, String)>, limit: f64| {
        out.push(json!({
            "target": target,
            "measured": w.as_ref().map(|(x, name)| format!("{x:.3} % ({name})")),
            "met": w.map(|(x, _)| x <= limit),
        }));
    };
    add_worst(
        "CPU error ≤ 1 % (worst cgroup or pod, against cpu.stat)",
        worst(&[
            (&r["accuracy"]["cpu"]["cgroups"], "error_pct", &|c| {
                format!("host cgroup {}", text(&c["cgroup"]))
            }),
            (&r["side_by_side"]["cpu"], "podmeter_error_pct", &|c| {
                format!("pod {}", text(&c["pod"]))
            }),
        ]),
        1.0,
    );
    add_worst(
        "network error ≤ 0.5 % (worst flow direction, against the kernel's IP bytes)",
        worst(&[
            (&r["accuracy"]["network"]["flows"], "error_pct", &|f| {
                format!("host {} {}", text(&f["flow"]), text(&f["counter"]))
            }),
            (&r["side_by_side"]["network"], "podmeter_error_pct", &|f| {
                format!("pod {} {}", text(&f["pod"]), text(&f["direction"]))
            }),
        ]),
        0.5,
    );
    let ex = &r["side_by_side"]["exposers"];
    let pm = find(ex, "exposer", "podmeter")["cpu_ms_per_scrape"].as_f64();
    let cad = find(ex, "exposer", "kubelet cAdvisor")["cpu_ms_per_scrape"].as_f64();
    out.push(json!({
        "target": "cheaper than cAdvisor per scrape (same pods)",
        "measured": pm.zip(cad).map(|(p, c)| format!("podmeter {p:.3} ms vs kubelet {c:.3} ms CPU per scrape")),
        "met": pm.zip(cad).map(|(p, c)| p < c),
    }));
    Value::Array(out)
}

fn failed(v: &Value) -> Option<String> {
    v["error"]
        .as_str()
        .map(|e| format!("**Failed:** `{e}`\n\n"))
}

/// The report as markdown.
pub fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(s, "# podmeter benchmark\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench{}` run of {} ({} s in all). Raw figures: `bench/results/{}-{}.json`. \
         Figures as measured, on a machine that may have had other work: see the load averages.\n",
        if r["mode"] == "quick" { " --quick" } else { "" },
        r["started"].as_str().unwrap_or("?"),
        num(&r["total_secs"], 0),
        r["started"].as_str().unwrap_or("?"),
        r["mode"].as_str().unwrap_or("?"),
    );
    if let Some(note) = r["note"].as_str() {
        let _ = writeln!(s, "> {note}\n");
    }
    let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
    for (k, label) in [
        ("cpu", "CPU"),
        ("cpus", "CPUs"),
        ("hypervisor", "virtual machine"),
        ("memory_gib", "memory (GiB)"),
        ("kernel", "kernel"),
        ("cgroups", "cgroups"),
        ("podmeter", "podmeter"),
        ("kubelet", "kubelet (cAdvisor)"),
        ("node_exporter", "node-exporter"),
        ("stress_ng", "stress-ng"),
        ("iperf3", "iperf3"),
        ("bpftool", "bpftool"),
        ("rustc", "rustc"),
    ] {
        let v = match &m[k] {
            Value::String(x) => x.clone(),
            other => other.to_string(),
        };
        let _ = writeln!(s, "| {label} | {} |", v.replace('|', "\\|"));
    }
    let _ = writeln!(
        s,
        "\nWhat the machine did during each scenario (this benchmark included; other work on \
         the machine shows as load beyond it):\n\n\
         | scenario | secs | load avg at start | at end | machine CPU busy % | steal % |\n|---|---:|---|---|---:|---:|"
    );
    for k in ["kernel", "scale", "accuracy", "side_by_side"] {
        let _ = writeln!(
            s,
            "| {k} | {} | {} | {} | {} | {} |",
            num(&r[k]["secs"], 0),
            r[k]["load_at_start"].as_str().unwrap_or("–"),
            r[k]["load_at_end"].as_str().unwrap_or("–"),
            num(&r[k]["machine_busy_pct"], 1),
            num(&r[k]["machine_steal_pct"], 1),
        );
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "## Targets\n\n| target | measured | met |\n|---|---|---|"
    );
    for t in r["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {met} |",
            t["target"].as_str().unwrap_or(""),
            t["measured"].as_str().unwrap_or("–")
        );
    }

    // 1. Kernel.
    let k = &r["kernel"];
    let _ = writeln!(s, "\n## 1. Kernel cost per event (eBPF programs)\n");
    s += &failed(k).unwrap_or_default();
    let _ = writeln!(
        s,
        "`run_time_ns / run_cnt` with BPF run-time statistics on (they add two clock reads \
         per run, so these are upper bounds). Events are counted machine-wide.\n"
    );
    let _ = writeln!(
        s,
        "| load | program | events/s | ns/event | CPU % of one core |\n|---|---|---:|---:|---:|"
    );
    for key in ["context_switch_load", "packet_flood"] {
        for p in k[key]["programs"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | `{}` | {} | {} | {} |",
                k[key]["load"].as_str().unwrap_or(""),
                p["program"].as_str().unwrap_or(""),
                num(&p["events_per_sec"], 0),
                num(&p["ns_per_event"], 1),
                num(&p["cpu_pct_of_one_core"], 2),
            );
        }
    }
    let sw = &k["switch_throughput"];
    if sw.is_object() {
        let base = sw["without_agent"]["bogo_ops_per_sec"].as_f64();
        let pct = |v: &Value| match (v["bogo_ops_per_sec"].as_f64(), base) {
            (Some(x), Some(b)) if b > 0.0 => format!(" ({:+.1} %)", (x - b) / b * 100.0),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "\nContext-switch throughput (`stress-ng --switch`, bogo ops/s): without podmeter {}, \
             with podmeter {}{}, with podmeter and BPF statistics {}{}. \
             (`other_podmeter_programs_loaded`: {} programs of other podmeter instances were loaded.)",
            num(&sw["without_agent"]["bogo_ops_per_sec"], 0),
            num(&sw["with_agent_stats_off"]["bogo_ops_per_sec"], 0),
            pct(&sw["with_agent_stats_off"]),
            num(&sw["with_agent_stats_on"]["bogo_ops_per_sec"], 0),
            pct(&sw["with_agent_stats_on"]),
            num(&k["other_podmeter_programs_loaded"], 0),
        );
    }

    // 2. Scale.
    let _ = writeln!(
        s,
        "\n## 2. Agent at scale (pod-like cgroups with light workers)\n"
    );
    s += &failed(&r["scale"]).unwrap_or_default();
    // Runs before the limit was added have no such key.
    let limit = match r["plan"]["scale_cpu_limit_millicores"].as_u64() {
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
         window scraped every 15 s; /metrics latency from {} back-to-back scrapes (HTTP/1.1, \
         gzip accepted, as Prometheus asks); CPU per scrape = burst CPU minus the idle rate. \
         CPU error: podmeter's delta against each container's `cpu.stat` over the window.\n",
        num(&r["plan"]["window_secs"], 0),
        num(&r["plan"]["burst"], 0),
    );
    let _ = writeln!(
        s,
        "| pods | CPU s/min | % of one core | peak RSS MiB | p50 ms | p99 ms | payload KiB (gzip) | series | CPU ms/scrape | idle % core | CPU error total % | per-container max % |\n|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    );
    for p in r["scale"]["by_pods"].as_array().into_iter().flatten() {
        if let Some(e) = p["error"].as_str() {
            let _ = writeln!(s, "| {} | failed: {e} |", num(&p["pods"], 0));
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
            num(&p["pods"], 0),
            num(&p["cpu_secs_per_min"], 3),
            num(&p["cpu_pct_of_one_core"], 3),
            num(&p["peak_rss_mib"], 1),
            num(&p["scrape"]["p50_ms"], 2),
            num(&p["scrape"]["p99_ms"], 2),
            num(&json!(p["payload_bytes"].as_f64().map(|b| b / 1024.0)), 1),
            num(
                &json!(p["scrape"]["wire_bytes"].as_f64().map(|b| b / 1024.0)),
                1
            ),
            num(&p["series"], 0),
            num(&p["cpu_ms_per_scrape"], 3),
            num(&p["background_cpu_pct"], 3),
            num(&p["cpu_accuracy"]["total_error_pct"], 3),
            num(&p["cpu_accuracy"]["per_container_abs_error_pct"]["max"], 3),
        );
    }

    // 3. Accuracy.
    let a = &r["accuracy"];
    let _ = writeln!(s, "\n## 3. Accuracy on this host\n");
    s += &failed(a).unwrap_or_default();
    let _ = writeln!(
        s,
        "CPU over {} s against `cpu.stat` (read just before and after each scrape):\n\n\
         | cgroup | work | CPU % | kernel s | podmeter s | error % |\n|---|---|---:|---:|---:|---:|",
        num(&a["cpu"]["window_secs"], 0)
    );
    for c in a["cpu"]["cgroups"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | `pm-work {}` | {} | {} | {} | {} |",
            c["cgroup"].as_str().unwrap_or(""),
            c["work"].as_str().unwrap_or(""),
            num(&c["kernel_cpu_pct"], 1),
            num(&c["kernel_cpu_secs"], 3),
            num(&c["podmeter_cpu_secs"], 3),
            num(&c["error_pct"], 3),
        );
    }
    let _ = writeln!(
        s,
        "\nNetwork between two namespaces over a veth pair (TCP {} bytes, UDP {} × 1000 bytes):\n\n\
         | flow | counter | podmeter bytes | truth bytes | truth | error % |\n|---|---|---:|---:|---|---:|",
        num(&r["plan"]["tcp_bytes"], 0),
        num(&r["plan"]["udp_count"], 0),
    );
    for f in a["network"]["flows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            f["flow"].as_str().unwrap_or(""),
            f["counter"].as_str().unwrap_or(""),
            num(&f["podmeter_bytes"], 0),
            num(&f["truth_bytes"], 0),
            f["truth"].as_str().unwrap_or(""),
            num(&f["error_pct"], 4),
        );
    }

    // 4. Side by side.
    let sb = &r["side_by_side"];
    let _ = writeln!(
        s,
        "\n## 4. Side by side on real pods: podmeter, cAdvisor, node-exporter\n"
    );
    s += &failed(sb).unwrap_or_default();
    let _ = writeln!(
        s,
        "{} pods of ours in namespace `bench` ({} on the node in all). Every exposer is scraped \
         the same way; CPU per scrape = CPU during a burst of back-to-back scrapes minus the \
         exposer's idle rate. The kubelet's CPU comes from `/proc/<pid>/stat` (10 ms ticks) and \
         includes everything it does in the burst.\n\n\
         | exposer | p50 ms | p99 ms | payload KiB (gzip) | series | CPU ms per scrape | idle % core |\n|---|---:|---:|---|---:|---:|---:|",
        num(&sb["bench_pods"], 0),
        num(&sb["pods_on_node"], 0),
    );
    for e in sb["exposers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} ({}) | {} | {} | {} |",
            e["exposer"].as_str().unwrap_or(""),
            num(&e["scrape"]["p50_ms"], 2),
            num(&e["scrape"]["p99_ms"], 2),
            num(&json!(e["payload_bytes"].as_f64().map(|b| b / 1024.0)), 1),
            num(
                &json!(e["scrape"]["wire_bytes"].as_f64().map(|b| b / 1024.0)),
                1
            ),
            num(&e["series"], 0),
            num(&e["cpu_ms_per_scrape"], 3),
            num(&e["idle_cpu_pct"], 3),
        );
    }
    let _ = writeln!(
        s,
        "\nCPU of the same containers against their `cpu.stat` (cAdvisor against the kernel \
         counter interpolated at cAdvisor's own sample times):\n\n\
         | pod | CPU % | podmeter error % | cAdvisor error % | cAdvisor sample age (s) |\n|---|---:|---:|---:|---:|"
    );
    for c in sb["cpu"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            c["pod"].as_str().unwrap_or(""),
            num(&c["kernel_cpu_pct"], 2),
            num(&c["podmeter_error_pct"], 3),
            num(&c["cadvisor_error_pct"], 3),
            num(&c["cadvisor_sample_age_max_secs"], 1),
        );
    }
    let _ = writeln!(
        s,
        "\nNetwork of the same pods against their network namespace's IPv4 byte counters \
         (cAdvisor counts the pod's `eth0`, link-layer headers and non-IP frames included):\n\n\
         | pod | direction | truth bytes | podmeter error % | cAdvisor error % |\n|---|---|---:|---:|---:|"
    );
    for n in sb["network"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            n["pod"].as_str().unwrap_or(""),
            n["direction"].as_str().unwrap_or(""),
            num(&n["truth_ip_bytes"], 0),
            num(&n["podmeter_error_pct"], 4),
            num(&n["cadvisor_error_pct"], 4),
        );
    }
    s += &notes(r);
    s
}

/// What the figures say beyond the tables, derived from them.
fn notes(r: &Value) -> String {
    let mut n = Vec::new();
    let ex = &r["side_by_side"]["exposers"];
    let pm = find(ex, "exposer", "podmeter");
    if let (Some(w), Some(p)) = (
        pm["scrape"]["wire_bytes"].as_f64(),
        pm["payload_bytes"].as_f64(),
    ) && w >= p * 0.9
    {
        n.push(
            "podmeter answered uncompressed although the scraper accepts gzip \
             (wire bytes = payload); node-exporter and the kubelet compress."
                .to_owned(),
        );
    }
    let ages: Vec<f64> = r["side_by_side"]["cpu"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["cadvisor_sample_age_max_secs"].as_f64())
        .collect();
    if let Some(max) = ages.iter().copied().reduce(f64::max) {
        n.push(format!(
            "cAdvisor serves what its housekeeping last read: samples up to {max:.1} s old \
             at scrape time; podmeter reads its kernel maps at the scrape."
        ));
    }
    for key in ["context_switch_load", "packet_flood"] {
        for p in r["kernel"][key]["programs"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(m) = p["recursion_misses"].as_u64().filter(|m| *m > 0) {
                n.push(format!(
                    "`{}` was skipped {m} times under {} (already running on that CPU).",
                    text(&p["program"]),
                    text(&r["kernel"][key]["load"])
                ));
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
