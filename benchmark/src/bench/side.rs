//! Side by side on real pods of the local cluster (`cargo xtask cluster
//! up`; started here if it is down, and then stopped again at the end):
//! podmeter (the release build on the host, `--no-kubernetes`), the
//! kubelet's cAdvisor (`/metrics/cadvisor`, scraped directly on the
//! kubelet's port with the cluster's admin certificate) and Debian's
//! node-exporter, all looking at the same pods in namespace `bench`:
//!
//! * light pods (the scale scenario's worker), a 30 % duty-cycle pod and a
//!   spinner limited to 250m, for CPU;
//! * TCP and UDP between pods (the UDP receiver keeps its socket open
//!   until deleted), for network.
//!
//! Ground truth: each container's cgroup2 `cpu.stat`, sampled every 200 ms
//! so that it can be read at cAdvisor's own sample times (cAdvisor serves
//! values from its housekeeping, stamped with when it read them); and each
//! pod's network namespace's IPv4 byte counters (`IpExt`), read through a
//! process of the pod. Per scrape cost: CPU of each exposer during a burst
//! of scrapes, minus its idle rate (podmeter and node-exporter from their
//! own cgroup's `cpu.stat`, the kubelet from `/proc/<pid>/stat`).

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::sleep,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    Agent, Bench, Endpoint, LIGHT_TICK, Sample, burst_summary, error_pct, free_port, ip_octets,
    number, output, parse_exposition, proc_cpu_secs, progress,
    results::{Exposer, PodCpu, PodNetwork, SideBySide, TcpApplication},
    round,
};
use crate::schema::{finite, rounded};

const NS: &str = "bench";
const WORK_IMAGE: &str = "localhost/podmeter-testwork:dev";

fn kubectl(b: &Bench, args: &[&str]) -> Result<String> {
    output(b.host.kubectl().args(args))
}

fn apply(b: &Bench, yaml: &str) -> Result<()> {
    let mut child = b
        .host
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("kubectl apply")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(yaml.as_bytes())?;
    if !child.wait()?.success() {
        bail!("kubectl apply failed:\n{yaml}");
    }
    Ok(())
}

fn node_ready(b: &Bench) -> bool {
    kubectl(
        b,
        &[
            "get",
            "node",
            b.host.node(),
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
    )
    .is_ok_and(|s| s == "True")
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Stops the cluster on drop if this run started it.
struct ClusterGuard<'a>(&'a Bench<'a>, bool);

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        if self.1 {
            progress("stopping the cluster this run started");
            if let Err(e) = self.0.host.cluster_down() {
                progress(&format!("cluster down failed: {e:#}"));
            }
        }
    }
}

/// The `bench` namespace, deleted with its pods on drop.
struct Namespace<'a>(&'a Bench<'a>);

impl<'a> Namespace<'a> {
    fn new(b: &'a Bench<'a>) -> Result<Self> {
        let _ = kubectl(
            b,
            &["delete", "namespace", NS, "--wait=true", "--timeout=120s"],
        );
        kubectl(b, &["create", "namespace", NS])?;
        Ok(Self(b))
    }
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        progress(&format!("deleting namespace {NS}"));
        let _ = kubectl(
            self.0,
            &[
                "delete",
                "namespace",
                NS,
                "--wait=true",
                "--timeout=120s",
                "--grace-period=1",
            ],
        );
    }
}

fn pod_yaml(name: &str, args: &[&str], resources: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: work\n    image: {WORK_IMAGE}\n    imagePullPolicy: Never\n    command: [\"/pm-work\"]\n    args: [{}]\n    resources: {resources}\n",
        args.join(", ")
    )
}

/// A running pod of the benchmark.
struct RealPod {
    name: String,
    container_id: String,
    ip: String,
    cgroup: PathBuf,
}

/// The cgroup2 directory of a container, wherever the kubelet put it.
fn container_cgroup(id: &str) -> Result<PathBuf> {
    podmeter_test_support::cgroups::container_cgroup(id)
        .with_context(|| format!("no cgroup for container {id} under kubepods"))
}

/// Waits until every pod in `names` runs; returns them.
fn running(b: &Bench, names: &[String]) -> Result<Vec<RealPod>> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let v: Value =
            serde_json::from_str(&kubectl(b, &["get", "pods", "-n", NS, "-o", "json"])?)?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let by_name: HashMap<&str, &Value> = items
            .iter()
            .filter_map(|p| Some((p["metadata"]["name"].as_str()?, p)))
            .collect();
        let ready: Option<Vec<(String, String, String)>> = names
            .iter()
            .map(|n| {
                let p = by_name.get(n.as_str())?;
                if p["status"]["phase"] != "Running" {
                    return None;
                }
                let cid = p["status"]["containerStatuses"][0]["containerID"].as_str()?;
                let cid = cid.split_once("://")?.1.to_owned();
                Some((n.clone(), cid, p["status"]["podIP"].as_str()?.to_owned()))
            })
            .collect();
        if let Some(ready) = ready {
            return ready
                .into_iter()
                .map(|(name, container_id, ip)| {
                    Ok(RealPod {
                        cgroup: container_cgroup(&container_id)?,
                        name,
                        container_id,
                        ip,
                    })
                })
                .collect();
        }
        if Instant::now() > deadline {
            bail!("pods not Running after 240 s");
        }
        sleep(Duration::from_secs(1));
    }
}

/// Waits for the line starting with `word` in a pod's log.
fn report(b: &Bench, pod: &str, word: &str) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(log) = kubectl(b, &["logs", "-n", NS, pod])
            && let Some(l) = log.lines().find(|l| l.starts_with(word))
        {
            return Ok(l.split_whitespace().map(str::to_owned).collect());
        }
        if Instant::now() > deadline {
            bail!("{NS}/{pod} did not report {word:?}");
        }
        sleep(Duration::from_secs(1));
    }
}

fn first_pid(cgroup: &Path) -> Result<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no process in {}", cgroup.display()))
}

/// cAdvisor's value and timestamp (ms) for one of our pods.
fn cadvisor(s: &[Sample], metric: &str, pod: &str, extra: (&str, &str)) -> Option<(f64, f64)> {
    s.iter()
        .find(|x| {
            x.name == metric
                && x.label("namespace") == Some(NS)
                && x.label("pod") == Some(pod)
                && x.label(extra.0) == Some(extra.1)
        })
        .map(|x| (x.value, x.ts_ms.unwrap_or(f64::NAN)))
}

fn podmeter_value(s: &[Sample], metric: &str, container_id: &str) -> Option<f64> {
    s.iter()
        .find(|x| x.name == metric && x.label("container_id") == Some(container_id))
        .map(|x| x.value)
}

/// Linear interpolation of a sampled counter at `t` (ms).
fn at(samples: &[(f64, Vec<f64>)], i: usize, t: f64) -> Option<f64> {
    let w = samples.windows(2).find(|w| w[0].0 <= t && t <= w[1].0)?;
    let (t0, v0, t1, v1) = (w[0].0, w[0].1[i], w[1].0, w[1].1[i]);
    Some(if t1 > t0 {
        v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    } else {
        v0
    })
}

/// Per scrape CPU (ms) of an exposer: burst CPU minus its idle rate.
fn per_scrape_ms(burst_cpu: f64, idle_rate: f64, burst_secs: f64, n: usize) -> f64 {
    round(
        (burst_cpu - idle_rate * burst_secs).max(0.0) / n as f64 * 1e3,
        3,
    )
}

pub fn run(b: &Bench) -> Result<SideBySide> {
    let _cluster = if node_ready(b) {
        ClusterGuard(b, false)
    } else {
        progress("the local cluster is down: starting it (and stopping it afterwards)");
        b.host.cluster_up()?;
        ClusterGuard(b, true)
    };
    b.host.load_work_image()?;
    let _ns = Namespace::new(b)?;

    // node-exporter, in its own cgroup.
    let ne_port = free_port()?;
    let ne_cg = b.tree.own("node-exporter")?;
    // Debian's build enables the systemd collector, which fails at once on
    // hosts without systemd (this one's PID 1 is not systemd).
    let systemd = Path::new("/run/systemd/system").exists();
    let mut ne_args = vec![format!("--web.listen-address=127.0.0.1:{ne_port}")];
    if !systemd {
        ne_args.push("--no-collector.systemd".into());
    }
    let _ne = {
        let log = fs::File::create(b.scratch.join("node-exporter.log"))?;
        let mut p = ne_cg.spawn_with(
            "node-exporter",
            Path::new("/usr/bin/prometheus-node-exporter"),
            &ne_args,
            |c| {
                c.stderr(log);
            },
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("http://127.0.0.1:{ne_port}/metrics");
        while !std::process::Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &url])
            .status()
            .is_ok_and(|s| s.success())
        {
            if !p.running() || Instant::now() > deadline {
                bail!("node-exporter did not start on {ne_port}");
            }
            sleep(Duration::from_millis(100));
        }
        p
    };
    let node_exporter = Endpoint::plain(format!("http://127.0.0.1:{ne_port}/metrics"));

    // podmeter before the pods, so it sees all their traffic.
    let agent = Agent::start(b, "side")?;

    // The kubelet, scraped on its own port.
    let kubelet_pid: u32 = fs::read_to_string(b.host.cluster_state().join("pids/kubelet.pid"))?
        .trim()
        .parse()?;
    let node: Value =
        serde_json::from_str(&kubectl(b, &["get", "node", b.host.node(), "-o", "json"])?)?;
    let node_ip = node["status"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
        .and_then(|x| x["address"].as_str())
        .context("node InternalIP")?
        .to_owned();
    let pki = b.host.cluster_state().join("pki");
    let cadvisor_ep = Endpoint {
        url: format!("https://{node_ip}:10250/metrics/cadvisor"),
        tls: vec![
            "--cacert".into(),
            pki.join("ca.crt").display().to_string(),
            "--cert".into(),
            pki.join("admin.crt").display().to_string(),
            "--key".into(),
            pki.join("admin.key").display().to_string(),
        ],
    };

    // The pods: sinks, CPU and light pods first; then the senders.
    let light = "{requests: {cpu: 10m}}";
    let mut yaml = String::new();
    let mut cpu_pods: Vec<String> = Vec::new();
    for i in 0..b.plan.light_pods {
        let name = format!("light-{i}");
        yaml += &pod_yaml(&name, &LIGHT_TICK, light);
        cpu_pods.push(name);
    }
    yaml += &pod_yaml(
        "cpu-duty",
        &["tick", "10000", "3000"],
        "{requests: {cpu: 100m}}",
    );
    yaml += &pod_yaml(
        "cpu-limited",
        &["tick", "10000", "10000"],
        "{requests: {cpu: 250m, memory: 64Mi}, limits: {cpu: 250m, memory: 64Mi}}",
    );
    cpu_pods.extend(["cpu-duty".into(), "cpu-limited".into()]);
    let count = b.plan.udp_count.to_string();
    yaml += &pod_yaml("tcp-sink", &["--linger", "tcp-sink", "0.0.0.0:7000"], light);
    yaml += &pod_yaml("udp-sink", &["udp-listen", "0.0.0.0:7001"], light);
    progress(&format!(
        "starting {} pods in namespace {NS}",
        cpu_pods.len() + 2
    ));
    apply(b, &yaml)?;
    let mut names = cpu_pods.clone();
    names.extend(["tcp-sink".into(), "udp-sink".into()]);
    let first = running(b, &names)?;
    let ip_of = |n: &str| first.iter().find(|p| p.name == n).map(|p| p.ip.clone());
    let (tcp_ip, udp_ip) = (
        ip_of("tcp-sink").context("tcp-sink")?,
        ip_of("udp-sink").context("udp-sink")?,
    );
    let bytes = b.plan.tcp_bytes.to_string();
    let mut yaml = pod_yaml(
        "tcp-send",
        &["--linger", "tcp-send", &format!("{tcp_ip}:7000"), &bytes],
        light,
    );
    yaml += &pod_yaml(
        "udp-send",
        &[
            "--linger",
            "udp-send",
            &format!("{udp_ip}:7001"),
            &count,
            "1000",
        ],
        light,
    );
    apply(b, &yaml)?;
    let senders = running(b, &["tcp-send".into(), "udp-send".into()])?;
    let pods: Vec<RealPod> = first.into_iter().chain(senders).collect();
    let pod = |n: &str| pods.iter().find(|p| p.name == n);
    let tcp_sent = report(b, "tcp-send", "sent")?;
    report(b, "tcp-sink", "received")?;
    report(b, "udp-send", "sent")?;
    sleep(Duration::from_millis(500));
    let traffic_done = now_ms();
    progress("pod traffic done");

    super::scrape_until(&agent, Duration::from_secs(120), "every bench pod", |s| {
        pods.iter().all(|p| {
            podmeter_value(
                s,
                "podmeter_container_cpu_usage_seconds_total",
                &p.container_id,
            )
            .is_some()
        })
    })?;

    // CPU: kernel sampled every 200 ms throughout; podmeter and cAdvisor
    // read at the start and end of the window.
    let cpu: Vec<&RealPod> = cpu_pods.iter().filter_map(|n| pod(n)).collect();
    let samples: Mutex<Vec<(f64, Vec<f64>)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let read_all = || -> Result<Vec<f64>> {
        cpu.iter()
            .map(|p| super::cgroup_cpu_secs(&p.cgroup))
            .collect()
    };
    let window = Duration::from_secs(b.plan.accuracy_secs);
    let (pm_points, cad_points) = std::thread::scope(|sc| -> Result<_> {
        sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(v) = read_all() {
                    samples.lock().unwrap().push((now_ms(), v));
                }
                sleep(Duration::from_millis(200));
            }
        });
        let result = (|| -> Result<_> {
            let lead = Duration::from_secs(16);
            progress(&format!(
                "CPU window on real pods ({} s after a {} s lead for cAdvisor's samples)",
                window.as_secs(),
                lead.as_secs()
            ));
            sleep(lead);
            let mut pm = Vec::new();
            let mut cad = Vec::new();
            for k in 0..2 {
                if k == 1 {
                    sleep(window);
                }
                let before = read_all()?;
                let t = now_ms();
                let (_, s) = agent.scrape()?;
                let after = read_all()?;
                let mid: Vec<f64> = before
                    .iter()
                    .zip(&after)
                    .map(|(x, y)| (x + y) / 2.0)
                    .collect();
                pm.push((t, mid, s));
                let (_, body) = cadvisor_ep.fetch()?;
                cad.push((now_ms(), parse_exposition(&body)?));
            }
            sleep(Duration::from_millis(500));
            Ok((pm, cad))
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let samples = samples.into_inner().unwrap();
    let mut cpu_rows = Vec::new();
    for (i, p) in cpu.iter().enumerate() {
        const PM: &str = "podmeter_container_cpu_usage_seconds_total";
        let dk = pm_points[1].1[i] - pm_points[0].1[i];
        let dp = podmeter_value(&pm_points[1].2, PM, &p.container_id).unwrap_or(f64::NAN)
            - podmeter_value(&pm_points[0].2, PM, &p.container_id).unwrap_or(f64::NAN);
        let c = |k: usize| {
            cadvisor(
                &cad_points[k].1,
                "container_cpu_usage_seconds_total",
                &p.name,
                ("container", "work"),
            )
        };
        let (cad_delta, cad_truth, staleness) = match (c(0), c(1)) {
            (Some((v0, t0)), Some((v1, t1))) => (
                v1 - v0,
                at(&samples, i, t1)
                    .zip(at(&samples, i, t0))
                    .map(|(x, y)| x - y),
                ((cad_points[0].0 - t0).max(cad_points[1].0 - t1)) / 1e3,
            ),
            _ => (f64::NAN, None, f64::NAN),
        };
        let secs = (pm_points[1].0 - pm_points[0].0) / 1e3;
        cpu_rows.push(PodCpu {
            pod: p.name.clone(),
            kernel_cpu_pct: round(dk / secs * 100.0, 2),
            kernel_cpu_secs: round(dk, 4),
            podmeter_cpu_secs: rounded(dp, 4),
            podmeter_error_pct: rounded(error_pct(dp, dk), 3),
            cadvisor_cpu_secs: rounded(cad_delta, 4),
            kernel_cpu_secs_at_cadvisor_times: cad_truth.and_then(|x| rounded(x, 4)),
            cadvisor_error_pct: cad_truth.and_then(|t| rounded(error_pct(cad_delta, t), 3)),
            cadvisor_sample_age_max_secs: rounded(staleness, 1),
        });
    }

    // Network: cAdvisor's counters once it has sampled after the traffic.
    progress("network: waiting for cAdvisor to sample after the traffic");
    let net_pods = ["tcp-send", "tcp-sink", "udp-send", "udp-sink"];
    let deadline = Instant::now() + Duration::from_secs(90);
    let cad_net = loop {
        let (_, body) = cadvisor_ep.fetch()?;
        let s = parse_exposition(&body)?;
        let fresh = net_pods.iter().all(|n| {
            cadvisor(
                &s,
                "container_network_transmit_bytes_total",
                n,
                ("interface", "eth0"),
            )
            .is_some_and(|(_, ts)| ts > traffic_done + 1000.0)
        });
        if fresh {
            break s;
        }
        if Instant::now() > deadline {
            bail!("cAdvisor did not sample the network pods after their traffic within 90 s");
        }
        sleep(Duration::from_secs(2));
    };
    let (_, body) = agent.endpoint.fetch()?;
    fs::write(b.scratch.join("side-podmeter.txt"), &body)?;
    let pm_net = parse_exposition(&body)?;
    let mut net_rows = Vec::new();
    for (name, dir) in [
        ("tcp-send", "transmit"),
        ("tcp-send", "receive"),
        ("tcp-sink", "receive"),
        ("tcp-sink", "transmit"),
        ("udp-send", "transmit"),
        ("udp-sink", "receive"),
    ] {
        let p = pod(name).context("net pod")?;
        let (rx, tx) = ip_octets(first_pid(&p.cgroup)?)?;
        let truth = if dir == "receive" { rx } else { tx } as f64;
        let pm = podmeter_value(
            &pm_net,
            &format!("podmeter_container_network_{dir}_bytes_total"),
            &p.container_id,
        )
        .unwrap_or(0.0);
        let cad = cadvisor(
            &cad_net,
            &format!("container_network_{dir}_bytes_total"),
            name,
            ("interface", "eth0"),
        )
        .map_or(f64::NAN, |(v, _)| v);
        net_rows.push(PodNetwork {
            pod: name.to_owned(),
            direction: dir.to_owned(),
            truth_ip_bytes: truth,
            podmeter_bytes: pm,
            podmeter_error_pct: rounded(error_pct(pm, truth), 4),
            cadvisor_eth0_bytes: finite(cad),
            cadvisor_error_pct: rounded(error_pct(cad, truth), 4),
        });
    }

    // Cost per scrape.
    progress(&format!("exposers idle for {} s", b.plan.idle_secs));
    let kubelet_cpu = || proc_cpu_secs(kubelet_pid, b.clk_tck);
    let cpus =
        || -> Result<[f64; 3]> { Ok([agent.cpu_secs()?, ne_cg.cpu_secs()?, kubelet_cpu()?]) };
    let c0 = cpus()?;
    let t0 = Instant::now();
    sleep(Duration::from_secs(b.plan.idle_secs));
    let c1 = cpus()?;
    let idle_secs = t0.elapsed().as_secs_f64();
    let idle: Vec<f64> = (0..3).map(|i| (c1[i] - c0[i]) / idle_secs).collect();
    let mut exposers = Vec::new();
    for (i, name, ep, n) in [
        (0, "podmeter", &agent.endpoint, b.plan.burst),
        (1, "node-exporter", &node_exporter, b.plan.burst),
        (2, "kubelet cAdvisor", &cadvisor_ep, b.plan.cadvisor_burst),
    ] {
        progress(&format!("{name}: {n} back-to-back scrapes"));
        let (_, body) = ep.fetch()?;
        let c0 = cpus()?;
        let t0 = Instant::now();
        let burst = ep.burst(n)?;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = cpus()?;
        let series = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count();
        exposers.push(Exposer {
            exposer: name.to_owned(),
            scrape: burst_summary(&burst),
            payload_bytes: body.len() as u64,
            series: series as u64,
            cpu_ms_per_scrape: per_scrape_ms(c1[i] - c0[i], idle[i], secs, n),
            idle_cpu_pct: round(idle[i] * 100.0, 3),
            cpu_source: if i == 2 {
                "/proc/<kubelet>/stat (10 ms ticks)"
            } else {
                "own cgroup cpu.stat"
            }
            .to_owned(),
        });
    }
    let pods_on_node = kubectl(
        b,
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            &format!("spec.nodeName={}", b.host.node()),
            "-o",
            "name",
        ],
    )?
    .lines()
    .count();
    agent.stop()?;
    Ok(SideBySide {
        bench_pods: pods.len() as u64,
        pods_on_node: pods_on_node as u64,
        exposers,
        cpu: cpu_rows,
        network: net_rows,
        node_exporter_args: ne_args,
        tcp_application: TcpApplication {
            payload_written: number(tcp_sent.get(1)),
            payload_on_wire_incl_retransmits: number(tcp_sent.get(2)),
            retransmitted: None,
            payload_received: None,
        },
        udp_datagrams_sent: b.plan.udp_count,
    })
}
