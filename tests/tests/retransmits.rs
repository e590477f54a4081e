//! TCP retransmits per cgroup against the sockets' own count
//! (`TCP_INFO` `tcpi_total_retrans`), under random loss.
//!
//! Two losses on a veth pair between two network namespaces. On the wire:
//! netem where the kernel has it, else an nftables `numgen random` drop
//! rule on the receiver's way in ([`podmeter_test_support::random_loss`]).
//! In the sender: an nftables drop on its output, which fails the transmit
//! itself, as a full veth backlog or qdisc does. The kernel counts a
//! retransmit whose transmit failed (in `tcpi_total_retrans` and in
//! `TcpExt TCPRetransFail`), and so does podmeter, which adds up the
//! sockets' own `total_retrans`: once the sender's socket is gone the count
//! is exactly `tcpi_total_retrans`. Before Linux 6.17, where the tracepoint
//! fires only for retransmits that went out, failed ones before the
//! socket's first one sent are missed, so there the count lies between
//! `tcpi_total_retrans` less `TCPRetransFail` and `tcpi_total_retrans`.

use std::time::Duration;

use podmeter_test_support::{
    Agent, NetNs, Scrape, TestCgroup, TestTree, failing_output_ruleset, nft_in, random_loss,
    tcp_ext, veth_pair,
};

const PAYLOAD: u64 = 24_000_000;
const LOSS_PERCENT: u32 = 5;
const FAILING_PERCENT: u32 = 20;

fn retransmits(s: &Scrape, cg: &TestCgroup) -> f64 {
    s.cgroup("network_tcp_retransmits_total", &cg.path)
        .unwrap_or(0.0)
}

/// Whether the running kernel's `tcp_retransmit_skb` has `err` (6.17 and
/// later, or a kernel with that change backported), so that podmeter sees
/// retransmits whose transmit failed: the tracepoint's format says, where
/// tracefs is mounted; else the version.
fn tracepoint_reports_failures() -> bool {
    for tracefs in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let format = format!("{tracefs}/events/tcp/tcp_retransmit_skb/format");
        if let Ok(text) = std::fs::read_to_string(format) {
            return text.contains("field:int err;");
        }
    }
    podmeter_test_support::kernel_version() >= (6, 17)
}

/// The full TCP sockets in `ns` connected to `port`: `/proc/net/tcp` and
/// `tcp6` there, less TIME-WAIT entries (timer `03`, which only they have;
/// their state column can say FIN-WAIT2), which are no longer full
/// sockets: the socket they replaced has closed.
fn live_sockets_to(ns: &NetNs, port: u16) -> usize {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "cat",
            "/proc/net/tcp",
            "/proc/net/tcp6",
        ])
        .output()
        .expect("ip netns exec cat");
    assert!(out.status.success(), "reading /proc/net/tcp in {}", ns.0);
    let port = format!(":{port:04X}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            // sl, local_address, rem_address, st, queues, tr:when
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 5 && f[2].ends_with(&port) && !f[5].starts_with("03:")
        })
        .count()
}

/// What one transfer retransmitted, by the sockets' own count, and how
/// many of those retransmits' transmits failed.
struct Retransmitted {
    truth: f64,
    failed: f64,
}

/// Sends `payload` bytes from a sender cgroup in `a` to a receiver cgroup
/// in `b` (both new, named after `attempt`) with an agent running, and
/// checks the sender's retransmits against the kernel's.
fn sends_and_matches(
    what: &str,
    tree: &TestTree,
    (a, b): (&NetNs, &NetNs),
    port: u16,
    payload: u64,
    attempt: u32,
) -> Retransmitted {
    let (sender, receiver) = (
        tree.cgroup(&format!("sender-{attempt}")),
        tree.cgroup(&format!("receiver-{attempt}")),
    );
    let agent = Agent::start(&[]);
    let failed_before = tcp_ext(a, "TCPRetransFail");
    let listen = format!("10.231.0.2:{port}");
    let mut sink = receiver.spawn(Some(&b.0), &["tcp-sink", &listen]);
    assert_eq!(sink.line()[..2], ["listening", &port.to_string()]);
    let mut send = sender.spawn(Some(&a.0), &["tcp-send", &listen, &payload.to_string()]);
    let sent = send.line();
    send.wait();
    assert_eq!(sink.line(), ["received", &payload.to_string()]);
    assert_eq!(sent.len(), 5, "{sent:?}");
    let truth: f64 = sent[4].parse().unwrap();
    let failed = (tcp_ext(a, "TCPRetransFail") - failed_before) as f64;

    // The last retransmits went out before the sender read TCP_INFO; the
    // socket's lingering close sends no data. Retransmits not yet reported
    // (before 6.17, failed ones after the last sent) are counted when the
    // socket closes: wait for that.
    let mut waited = 0;
    while live_sockets_to(a, port) > 0 {
        assert!(
            waited < 100,
            "the sender's socket to port {port} is still open 10 s after the transfer"
        );
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let s = agent.scrape();
    let got = retransmits(&s, &sender);
    let receiver_got = retransmits(&s, &receiver);
    let sees_failures = tracepoint_reports_failures();
    // Before 6.17 a failed retransmit before the socket's first one sent
    // is never reported: up to all the failed ones can be missing.
    let least = if sees_failures { truth } else { truth - failed };
    eprintln!(
        "retransmitted segments under {LOSS_PERCENT} % loss ({what}): TCP_INFO {truth}, of which the transmit failed {failed}; podmeter {got} (want {}: {}); the receiver {receiver_got}",
        if least == truth {
            format!("{truth}")
        } else {
            format!("{least} to {truth}")
        },
        if sees_failures {
            "the tracepoint reports failed transmits"
        } else {
            "before 6.17 the tracepoint fires only for sent ones"
        }
    );
    if !(least..=truth).contains(&got) {
        // What tells a lost count from a late one: the kernel maps' drop
        // counters and the same count a second later.
        std::thread::sleep(Duration::from_secs(1));
        let again = agent.scrape();
        let later = retransmits(&again, &sender);
        let drops: Vec<&str> = again
            .text
            .lines()
            .filter(|l| l.starts_with("podmeter_bpf_map_dropped_updates_total"))
            .collect();
        // A nested run of the same program on one CPU is skipped, and
        // counted in its recursion_misses, on the line with its name.
        let progs = std::process::Command::new("bpftool")
            .args(["prog", "show"])
            .output()
            .map(|o| {
                let out = String::from_utf8_lossy(&o.stdout);
                let tcp: Vec<&str> = out.lines().filter(|l| l.contains("pm_tcp")).collect();
                format!("{tcp:?} {}", String::from_utf8_lossy(&o.stderr).trim())
            })
            .unwrap_or_else(|e| format!("bpftool: {e}"));
        panic!(
            "podmeter's retransmitted segments {got} (a second later {later}), want {least} to {truth}: TCP_INFO {truth} with {failed} failed transmits; drops: {drops:?}; bpftool: {progs}"
        );
    }
    // Before 6.17 the failed retransmits after the socket's first one sent
    // are counted when the socket retransmits again or closes. The kernel
    // counts failures in segments and a failed skb can carry several, so
    // the bar is well above one skb: 32 failed segments all before the
    // first retransmit sent, with a fifth of the transmits failing at
    // random, does not happen.
    if !sees_failures && failed >= 32.0 {
        assert!(
            got > least,
            "none of the {failed} failed retransmits was counted ({got} of {truth}): \
             are the sockets' total_retrans read, and their closes?"
        );
    }
    // Its ACKs are not data: a pure receiver retransmits (nearly) nothing,
    // its SYN-ACK or FIN when one is lost (1 with 57 sender retransmits,
    // once in cold CI run w24), not the sender's.
    assert!(
        receiver_got <= 2.0 + 0.01 * truth,
        "the receiver retransmitted {receiver_got}"
    );
    Retransmitted { truth, failed }
}

#[test]
fn tcp_retransmits_match_tcp_info_under_random_loss() {
    let tree = TestTree::new("retrans");
    let (a, b) = veth_pair("rtx");
    let how = random_loss(&a, &b, 7100, LOSS_PERCENT).unwrap_or_else(|e| panic!("{e}"));
    let r = sends_and_matches(
        &format!("on the wire, {how}"),
        &tree,
        (&a, &b),
        7100,
        PAYLOAD,
        1,
    );
    assert!(
        r.truth >= 100.0,
        "too few retransmits to judge ({}): is the drop rule in place?",
        r.truth
    );
}

/// Loss on the wire makes retransmits; failing a fifth of the sender's
/// transmits then fails some of those (an original whose transmit fails is
/// only sent again later, not retransmitted).
#[test]
fn tcp_retransmits_whose_transmit_failed_are_counted_as_the_kernel_counts_them() {
    let tree = TestTree::new("retrans-fail");
    let (a, b) = veth_pair("rtxf");
    let how = random_loss(&a, &b, 7101, LOSS_PERCENT).unwrap_or_else(|e| panic!("{e}"));
    nft_in(&a, &failing_output_ruleset(7101, FAILING_PERCENT)).unwrap_or_else(|e| panic!("{e}"));
    // Whether a transfer meets the case is up to chance: about one in eight
    // here saw no failed retransmit at all (the failures hit only
    // originals) or under 100 retransmits. Each attempt is checked in full;
    // another one is made only when the case did not occur.
    const ATTEMPTS: u32 = 4;
    let mut r = Retransmitted {
        truth: 0.0,
        failed: 0.0,
    };
    for attempt in 1..=ATTEMPTS {
        r = sends_and_matches(
            &format!(
                "on the wire, {how}, and {FAILING_PERCENT} % of the sender's transmits failed"
            ),
            &tree,
            (&a, &b),
            7101,
            // Failed transmits wait for timers: slow under qemu's TCG. Not
            // less: at 3 MB a VM saw only 13 to 50 retransmits (too few to
            // judge), at 8 MB about 500.
            PAYLOAD / 3,
            attempt,
        );
        if r.truth >= 100.0 && r.failed > 0.0 {
            break;
        }
        eprintln!("attempt {attempt}: the case did not occur, again");
    }
    assert!(
        r.truth >= 100.0,
        "too few retransmits to judge ({}) in {ATTEMPTS} attempts: is the drop rule in place?",
        r.truth
    );
    assert!(
        r.failed > 0.0,
        "no retransmit's transmit failed (TCPRetransFail did not move) in {ATTEMPTS} attempts: the case is untested"
    );
}
