//! podmeter against the kernel on this host.
//!
//! * CPU: cgroups with steady duty cycles (light, 20 %, 50 %, a full
//!   spinner) over a window; podmeter's delta against `cpu.stat`
//!   `usage_usec`, read just before and after each scrape.
//! * Network: TCP and UDP between two network namespaces over a veth pair,
//!   sender and receiver each in their own cgroup and namespace. Ground
//!   truth is the kernel's IPv4 byte counters of each namespace
//!   (`IpExt InOctets/OutOctets`, headers and retransmissions included:
//!   nothing else talks there); for UDP also what the application sent,
//!   plus 28 header bytes per datagram.

use std::{
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    Agent, Bench, Cg, LIGHT_TICK, Remove, Sample, Workers, error_pct, netns_ip_octets, number,
    output, parse_exposition, progress,
    results::{Accuracy, Flow, HostCgroupCpu, HostCpu, HostNetwork, TcpApplication, UdpDatagrams},
    round, scrape_until,
};
use crate::schema::rounded;

/// A pair of network namespaces joined by a veth: `a` 10.232.0.1, `b`
/// 10.232.0.2. Deleted (with their interfaces) on drop.
struct NsPair {
    a: String,
    b: String,
}

impl NsPair {
    fn new() -> Result<Self> {
        // Namespaces a crashed run left behind.
        let list = output(Command::new("ip").args(["netns", "list"]))?;
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let stale = name
                .strip_prefix("pmbench-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
            if stale {
                let _ = output(Command::new("ip").args(["netns", "del", name]));
            }
        }
        let pid = std::process::id();
        let pair = Self {
            a: format!("pmbench-{pid}-a"),
            b: format!("pmbench-{pid}-b"),
        };
        let ip = |args: &[&str]| output(Command::new("ip").args(args)).map(drop);
        ip(&["netns", "add", &pair.a])?;
        ip(&["netns", "add", &pair.b])?;
        ip(&[
            "-n", &pair.a, "link", "add", "pmbv0", "type", "veth", "peer", "name", "pmbv1",
            "netns", &pair.b,
        ])?;
        ip(&[
            "-n",
            &pair.a,
            "addr",
            "add",
            "10.232.0.1/24",
            "dev",
            "pmbv0",
        ])?;
        ip(&[
            "-n",
            &pair.b,
            "addr",
            "add",
            "10.232.0.2/24",
            "dev",
            "pmbv1",
        ])?;
        for (ns, dev) in [(&pair.a, "pmbv0"), (&pair.b, "pmbv1")] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = output(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}

fn host_value(s: &[Sample], metric: &str, cg: &Cg) -> Option<f64> {
    let name = format!("podmeter_cgroup_{metric}");
    s.iter()
        .find(|x| x.name == name && x.label("cgroup") == Some(cg.path.as_str()))
        .map(|x| x.value)
}

fn cpu(b: &Bench, agent: &Agent) -> Result<HostCpu> {
    let loads: [(&str, &[&str]); 4] = [
        ("light", &LIGHT_TICK),
        ("duty-20", &["tick", "10000", "2000"]),
        ("duty-50", &["tick", "10000", "5000"]),
        ("spin", &["tick", "10000", "10000"]),
    ];
    let mut cgs = Vec::new();
    let mut workers = Workers::default();
    for (name, args) in loads {
        let cg = b.tree.cgroup(&format!("accuracy/cpu/{name}"))?;
        workers.0.push(cg.worker(b, args)?);
        cgs.push((name, args, cg));
    }
    const CPU: &str = "cpu_usage_seconds_total";
    scrape_until(agent, Duration::from_secs(60), "the CPU cgroups", |s| {
        cgs.iter()
            .all(|(_, _, cg)| host_value(s, CPU, cg).is_some())
    })?;
    let read = || -> Result<(Vec<f64>, Vec<Sample>)> {
        let before: Vec<f64> = cgs.iter().map(|c| c.2.cpu_secs()).collect::<Result<_>>()?;
        let (_, body) = agent.endpoint.fetch()?;
        let after: Vec<f64> = cgs.iter().map(|c| c.2.cpu_secs()).collect::<Result<_>>()?;
        let mid = before.iter().zip(&after).map(|(x, y)| (x + y) / 2.0);
        Ok((mid.collect(), parse_exposition(&body)?))
    };
    progress(&format!("CPU accuracy window ({} s)", b.plan.accuracy_secs));
    let (k0, s0) = read()?;
    let t0 = Instant::now();
    sleep(Duration::from_secs(b.plan.accuracy_secs));
    let (k1, s1) = read()?;
    let secs = t0.elapsed().as_secs_f64();
    drop(workers);
    let mut rows = Vec::new();
    for (i, (name, args, cg)) in cgs.iter().enumerate() {
        let dk = k1[i] - k0[i];
        let dp = host_value(&s1, CPU, cg).unwrap_or(f64::NAN)
            - host_value(&s0, CPU, cg).unwrap_or(f64::NAN);
        rows.push(HostCgroupCpu {
            cgroup: (*name).to_owned(),
            work: args.join(" "),
            kernel_cpu_pct: round(dk / secs * 100.0, 2),
            kernel_cpu_secs: round(dk, 4),
            podmeter_cpu_secs: rounded(dp, 4),
            error_pct: rounded(error_pct(dp, dk), 3),
        });
    }
    Ok(HostCpu {
        window_secs: round(secs, 1),
        cgroups: rows,
    })
}

/// One direction of one flow: podmeter against the truth.
fn row(flow: &str, what: &str, podmeter: f64, truth: f64, truth_is: &str) -> Flow {
    Flow {
        flow: flow.to_owned(),
        counter: what.to_owned(),
        podmeter_bytes: podmeter,
        truth_bytes: truth,
        truth: truth_is.to_owned(),
        error_pct: rounded(error_pct(podmeter, truth), 4),
    }
}

fn network(b: &Bench, agent: &Agent) -> Result<HostNetwork> {
    let ns = NsPair::new()?;
    let mut rows = Vec::new();
    const TX: &str = "network_transmit_bytes_total";
    const RX: &str = "network_receive_bytes_total";
    let octets = || -> Result<[u64; 4]> {
        let (ai, ao) = netns_ip_octets(&ns.a)?;
        let (bi, bo) = netns_ip_octets(&ns.b)?;
        Ok([ai, ao, bi, bo])
    };

    // TCP a -> b.
    let (tx, rx) = (
        b.tree.cgroup("accuracy/net/tcp-send")?,
        b.tree.cgroup("accuracy/net/tcp-sink")?,
    );
    let o0 = octets()?;
    progress(&format!(
        "TCP {} bytes between namespaces",
        b.plan.tcp_bytes
    ));
    let mut sink = rx.pm_work(b, Some(&ns.b), &["tcp-sink", "10.232.0.2:0"])?;
    let port = sink.line()?.get(1).cloned().unwrap_or_default();
    let mut send = tx.pm_work(
        b,
        Some(&ns.a),
        &[
            "tcp-send",
            &format!("10.232.0.2:{port}"),
            &b.plan.tcp_bytes.to_string(),
        ],
    )?;
    let sent = send.line()?;
    send.wait()?;
    let received = sink.line()?;
    sink.wait()?;
    sleep(Duration::from_millis(300));
    let o1 = octets()?;
    let s = scrape_until(agent, Duration::from_secs(60), "the TCP cgroups", |s| {
        host_value(s, TX, &tx).is_some() && host_value(s, RX, &rx).is_some()
    })?;
    let d = |i: usize| (o1[i] - o0[i]) as f64;
    let v = |m: &str, cg: &Cg| host_value(&s, m, cg).unwrap_or(0.0);
    let truth = "IpExt octets of the sender's/receiver's namespace";
    rows.push(row("tcp", "sender tx", v(TX, &tx), d(1), truth));
    rows.push(row("tcp", "sender rx (acks)", v(RX, &tx), d(0), truth));
    rows.push(row("tcp", "receiver rx", v(RX, &rx), d(2), truth));
    rows.push(row("tcp", "receiver tx (acks)", v(TX, &rx), d(3), truth));
    let tcp_app = TcpApplication {
        payload_written: number(sent.get(1)),
        payload_on_wire_incl_retransmits: number(sent.get(2)),
        retransmitted: number(sent.get(3)),
        payload_received: number(received.get(1)),
    };

    // UDP a -> b: 1000-byte datagrams.
    let (tx, rx) = (
        b.tree.cgroup("accuracy/net/udp-send")?,
        b.tree.cgroup("accuracy/net/udp-sink")?,
    );
    let count = b.plan.udp_count.to_string();
    let o0 = octets()?;
    progress(&format!("UDP {count} × 1000 bytes between namespaces"));
    let mut sink = rx.pm_work(b, Some(&ns.b), &["udp-sink", "10.232.0.2:0", &count])?;
    let port = sink.line()?.get(1).cloned().unwrap_or_default();
    let mut send = tx.pm_work(
        b,
        Some(&ns.a),
        &["udp-send", &format!("10.232.0.2:{port}"), &count, "1000"],
    )?;
    send.line()?;
    send.wait()?;
    let got = sink.line()?;
    sink.wait()?;
    let n_received: f64 = got.get(1).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let o1 = octets()?;
    let s = scrape_until(agent, Duration::from_secs(60), "the UDP cgroups", |s| {
        host_value(s, TX, &tx).is_some() && host_value(s, RX, &rx).is_some()
    })?;
    let d = |i: usize| (o1[i] - o0[i]) as f64;
    let v = |m: &str, cg: &Cg| host_value(&s, m, cg).unwrap_or(0.0);
    let sent_bytes = b.plan.udp_count as f64 * 1028.0;
    rows.push(row("udp", "sender tx", v(TX, &tx), d(1), truth));
    rows.push(row(
        "udp",
        "sender tx",
        v(TX, &tx),
        sent_bytes,
        "datagrams sent × (1000 + 28)",
    ));
    // Datagrams the receiving socket dropped (buffer full) passed its
    // ingress filter first: podmeter, like IpExt, counts them; the
    // application's count does not, so it is not a ground truth here.
    rows.push(row("udp", "receiver rx", v(RX, &rx), d(2), truth));
    Ok(HostNetwork {
        flows: rows,
        tcp_application: tcp_app,
        udp_datagrams: UdpDatagrams {
            sent: b.plan.udp_count,
            received_by_the_application: n_received,
        },
    })
}

pub fn run(b: &Bench) -> Result<Accuracy> {
    let _cgroups = Remove(&b.tree, "accuracy".into());
    let agent = Agent::start(b, "accuracy")?;
    let cpu = cpu(b, &agent)?;
    let network = network(b, &agent)?;
    agent.stop()?;
    Ok(Accuracy { cpu, network })
}
