//! TCP retransmits per cgroup against the sockets' own count
//! (`TCP_INFO` `tcpi_total_retrans`), under random loss.
//!
//! The loss is on a veth pair between two network namespaces: netem where
//! the kernel has it, else an nftables `numgen random` drop rule
//! ([`podmeter_test_support::random_loss`]).

use std::time::Duration;

use podmeter_test_support::{Agent, Scrape, TestCgroup, TestTree, random_loss, veth_pair};

const PAYLOAD: u64 = 24_000_000;
const LOSS_PERCENT: u32 = 5;

fn retransmits(s: &Scrape, cg: &TestCgroup) -> f64 {
    s.cgroup("network_tcp_retransmits_total", &cg.path)
        .unwrap_or(0.0)
}

#[test]
fn tcp_retransmits_match_tcp_info_under_random_loss() {
    let tree = TestTree::new("retrans");
    let (sender, receiver) = (tree.cgroup("sender"), tree.cgroup("receiver"));
    let (a, b) = veth_pair("rtx");
    let how = random_loss(&a, &b, 7100, LOSS_PERCENT).unwrap_or_else(|e| panic!("{e}"));
    let agent = Agent::start(&[]);

    let mut sink = receiver.spawn(Some(&b.0), &["tcp-sink", "10.231.0.2:7100"]);
    assert_eq!(sink.line()[..2], ["listening", "7100"]);
    let mut send = sender.spawn(
        Some(&a.0),
        &["tcp-send", "10.231.0.2:7100", &PAYLOAD.to_string()],
    );
    let sent = send.line();
    send.wait();
    assert_eq!(sink.line(), ["received", &PAYLOAD.to_string()]);
    assert_eq!(sent.len(), 5, "{sent:?}");
    let truth: f64 = sent[4].parse().unwrap();

    // The last retransmits went out before the sender read TCP_INFO; the
    // socket's lingering close sends no data.
    std::thread::sleep(Duration::from_millis(200));
    let s = agent.scrape();
    let got = retransmits(&s, &sender);
    let receiver_got = retransmits(&s, &receiver);
    eprintln!(
        "retransmitted segments under {LOSS_PERCENT} % loss ({how}): TCP_INFO {truth}, podmeter {got} ({:+.2} %); the receiver {receiver_got}",
        (got - truth) / truth * 100.0
    );
    assert!(
        truth >= 100.0,
        "too few retransmits to judge ({truth}): is the drop rule in place?"
    );
    assert!(
        (got - truth).abs() <= 0.05 * truth,
        "podmeter says {got} retransmitted segments, TCP_INFO {truth}"
    );
    // Its ACKs are not data: a pure receiver retransmits (nearly) nothing.
    assert!(
        receiver_got <= 0.01 * truth,
        "the receiver retransmitted {receiver_got}"
    );
}
