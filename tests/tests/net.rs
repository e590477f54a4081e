//! Traffic per cgroup and direction, over loopback and across a veth pair
//! between two network namespaces, for TCP and UDP.
//!
//! podmeter counts `skb->len` at the cgroup hook: payload plus IP and
//! transport headers, one count per socket-level packet (a GSO batch counts
//! once). So bytes = payload + headers, where headers are 40..120 bytes per
//! counted packet for TCP and exactly 28 per datagram for UDP over IPv4.

use std::time::Duration;

use podmeter_test_support::{Agent, Scrape, TestCgroup, TestTree, veth_pair};

struct Net {
    rx_bytes: f64,
    rx_packets: f64,
    tx_bytes: f64,
    tx_packets: f64,
}

fn net(s: &Scrape, cg: &TestCgroup) -> Net {
    let get = |m: &str| s.cgroup(m, &cg.path).unwrap_or(0.0);
    Net {
        rx_bytes: get("network_receive_bytes_total"),
        rx_packets: get("network_receive_packets_total"),
        tx_bytes: get("network_transmit_bytes_total"),
        tx_packets: get("network_transmit_packets_total"),
    }
}

/// Waits until podmeter shows at least `payload` bytes each way, then until
/// two scrapes agree (the last ACKs and FINs are in).
fn settled(agent: &Agent, sender: &TestCgroup, receiver: &TestCgroup, payload: f64) -> (Net, Net) {
    agent.scrape_until(Duration::from_secs(15), "the transfer's bytes", |s| {
        net(s, sender).tx_bytes >= payload && net(s, receiver).rx_bytes >= payload
    });
    let mut last = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(300));
        let s = agent.scrape();
        let (a, b) = (net(&s, sender), net(&s, receiver));
        let key = format!(
            "{} {} {} {} {} {} {} {}",
            a.rx_bytes,
            a.rx_packets,
            a.tx_bytes,
            a.tx_packets,
            b.rx_bytes,
            b.rx_packets,
            b.tx_bytes,
            b.tx_packets
        );
        if key == last {
            return (a, b);
        }
        last = key;
    }
    panic!("traffic counters never settled");
}

/// `bytes` in `packets` must be a payload in `lo..=hi` plus 40..120 bytes of
/// IPv4 and TCP headers (options included) per counted packet.
fn assert_tcp(what: &str, bytes: f64, packets: f64, (lo, hi): (f64, f64)) {
    eprintln!("{what}: {bytes} bytes in {packets} packets for {lo}..={hi} payload bytes");
    assert!(packets >= 1.0, "{what}: no packets");
    assert!(
        bytes >= lo + 40.0 * packets && bytes <= hi + 120.0 * packets,
        "{what}: {bytes} bytes in {packets} packets is not {lo}..={hi} payload plus 40..120 header bytes per packet"
    );
}

fn tcp(netns: Option<(&str, &str)>, sink_addr: &str, connect_host: &str, tag: &str) {
    const PAYLOAD: u64 = 20_000_000;
    let tree = TestTree::new(tag);
    let (sender, receiver) = (tree.cgroup("sender"), tree.cgroup("receiver"));
    let agent = Agent::start(&[]);
    let (ns_send, ns_recv) = netns.unzip();

    let mut sink = receiver.spawn(ns_recv, &["tcp-sink", sink_addr]);
    let port = sink.line()[1].clone();
    let mut send = sender.spawn(
        ns_send,
        &[
            "tcp-send",
            &format!("{connect_host}:{port}"),
            &PAYLOAD.to_string(),
        ],
    );
    let sent = send.line();
    assert_eq!(sent[..2], ["sent", &PAYLOAD.to_string()]);
    // Retransmitted payload crosses the hook again: TCP_INFO says how much.
    let (on_wire, retrans): (f64, f64) = (sent[2].parse().unwrap(), sent[3].parse().unwrap());
    assert_eq!(
        on_wire,
        PAYLOAD as f64 + retrans,
        "tcpi_bytes_sent = payload + tcpi_bytes_retrans"
    );
    assert_eq!(sink.line(), ["received", &PAYLOAD.to_string()]);
    send.wait();
    sink.wait();

    let payload = PAYLOAD as f64;
    let (a, b) = settled(&agent, &sender, &receiver, payload);
    assert_tcp("sender tx", a.tx_bytes, a.tx_packets, (on_wire, on_wire));
    // A retransmitted segment reaches the receiver's hook twice only if the
    // first copy was dropped after it (e.g. a full receive queue).
    assert_tcp("receiver rx", b.rx_bytes, b.rx_packets, (payload, on_wire));
    // The reverse direction carries only ACKs, SYN/FIN: headers, no payload.
    assert_tcp("receiver tx (ACKs)", b.tx_bytes, b.tx_packets, (0.0, 0.0));
    assert_tcp("sender rx (ACKs)", a.rx_bytes, a.rx_packets, (0.0, 0.0));
}

/// How the test reads the agent once the datagrams are in.
#[derive(Clone, Copy, PartialEq)]
enum Read {
    /// Until two scrapes agree.
    Settled,
    /// One scrape, at once: the traffic must be in the maps by then. The
    /// flow runs on CPU 0, the agent and the scrape on CPU 1: the scrape's
    /// own packets, counted on the CPU that sends them, must not push the
    /// flow's pending counters out of CPU 0's slots.
    First,
}

/// Pins the calling thread to `cpu` until dropped.
struct Pinned(nix::sched::CpuSet);

impl Pinned {
    fn to(cpu: usize) -> Self {
        use nix::{sched, unistd::Pid};
        let before = sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
        let mut only = sched::CpuSet::new();
        only.set(cpu).unwrap();
        sched::sched_setaffinity(Pid::from_raw(0), &only).unwrap();
        Self(before)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

fn udp(
    netns: Option<(&str, &str)>,
    sink_addr: &str,
    connect_host: &str,
    tag: &str,
    agent_args: &[&str],
    read: Read,
) {
    const COUNT: u64 = 2000;
    const SIZE: u64 = 1200;
    const HEADERS: u64 = 20 + 8; // IPv4 + UDP
    let tree = TestTree::new(tag);
    let (sender, receiver) = (tree.cgroup("sender"), tree.cgroup("receiver"));
    let (_pinned, agent, flow_cpu) = match read {
        Read::Settled => (None, Agent::start(agent_args), vec![]),
        Read::First => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert!(cpus >= 2, "this test needs two CPUs, and has {cpus}");
            let pinned = Pinned::to(1);
            let agent = Agent::start_under(&["taskset", "-c", "1"], agent_args);
            (Some(pinned), agent, vec!["--cpu", "0"])
        }
    };
    let (ns_send, ns_recv) = netns.unzip();

    let count = COUNT.to_string();
    let sink_args = [&flow_cpu[..], &["udp-sink", sink_addr, &count]].concat();
    let mut sink = receiver.spawn(ns_recv, &sink_args);
    let port = sink.line()[1].clone();
    let (to, size) = (format!("{connect_host}:{port}"), SIZE.to_string());
    let send_args = [&flow_cpu[..], &["udp-send", &to, &count, &size]].concat();
    let mut send = sender.spawn(ns_send, &send_args);
    assert_eq!(send.line(), ["sent", &COUNT.to_string()]);
    send.wait();
    let got = sink.line();
    sink.wait();
    let (received, received_bytes): (u64, u64) = (got[1].parse().unwrap(), got[2].parse().unwrap());
    assert_eq!(received_bytes, received * SIZE);
    assert!(
        received >= COUNT * 99 / 100,
        "only {received} of {COUNT} datagrams arrived"
    );

    let sent_payload = (COUNT * SIZE) as f64;
    let (a, b) = match read {
        Read::Settled => settled(&agent, &sender, &receiver, received_bytes as f64),
        Read::First => {
            let s = agent.scrape();
            (net(&s, &sender), net(&s, &receiver))
        }
    };
    // UDP has no ACKs and fixed headers: the counts are exact.
    assert_eq!(a.tx_packets, COUNT as f64, "sender packets");
    assert_eq!(
        a.tx_bytes,
        sent_payload + (COUNT * HEADERS) as f64,
        "sender bytes"
    );
    assert_eq!(b.rx_packets, received as f64, "receiver packets");
    assert_eq!(
        b.rx_bytes,
        (received * (SIZE + HEADERS)) as f64,
        "receiver bytes"
    );
    assert_eq!(a.rx_bytes + b.tx_bytes, 0.0, "nothing flows back");
}

#[test]
fn tcp_over_loopback_per_cgroup_and_direction() {
    tcp(None, "127.0.0.1:0", "127.0.0.1", "tcp-lo");
}

#[test]
fn udp_over_loopback_per_cgroup_and_direction() {
    udp(
        None,
        "127.0.0.1:0",
        "127.0.0.1",
        "udp-lo",
        &[],
        Read::Settled,
    );
}

/// A flow's packets add up in a slot of their CPU's pending traffic, which
/// reaches the map when another cgroup needs the slot, at each tick, and
/// at the sync the agent runs on every CPU before a read. With the tick off
/// (test-only flag) and no other flow, only that sync can bring the
/// datagrams in: the first scrape after them must hold every one.
#[test]
fn udp_is_exact_at_the_first_read_by_the_sync_alone() {
    udp(
        None,
        "127.0.0.1:0",
        "127.0.0.1",
        "udp-sync",
        &["--force-no-tick"],
        Read::First,
    );
}

#[test]
fn tcp_across_veth_between_namespaces() {
    let (a, b) = veth_pair(&format!("t{}", std::process::id()));
    tcp(Some((&a.0, &b.0)), "10.231.0.2:0", "10.231.0.2", "tcp-veth");
}

#[test]
fn udp_across_veth_between_namespaces() {
    let (a, b) = veth_pair(&format!("u{}", std::process::id()));
    udp(
        Some((&a.0, &b.0)),
        "10.231.0.2:0",
        "10.231.0.2",
        "udp-veth",
        &[],
        Read::Settled,
    );
}
