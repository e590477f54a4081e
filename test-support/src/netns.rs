//! Network namespaces and veth pairs, deleted on drop.

use std::process::{Command, Stdio};

/// A network namespace; deleted on drop.
pub struct NetNs(pub String);

impl NetNs {
    /// `ip netns add <name>` with loopback up.
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self(name.to_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `ip` with `args`, panicking on failure.
pub fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2)");
    assert!(st.success(), "ip {args:?} failed");
}

/// Two namespaces joined by a veth pair: `a` has 10.231.0.1, `b` 10.231.0.2.
/// Both ends live only in namespaces this test made.
pub fn veth_pair(tag: &str) -> (NetNs, NetNs) {
    let (a, b) = (
        NetNs::new(&format!("pm-{tag}-a")),
        NetNs::new(&format!("pm-{tag}-b")),
    );
    ip(&[
        "-n", &a.0, "link", "add", "pmveth0", "type", "veth", "peer", "name", "pmveth1", "netns",
        &b.0,
    ]);
    ip(&["-n", &a.0, "addr", "add", "10.231.0.1/24", "dev", "pmveth0"]);
    ip(&["-n", &b.0, "addr", "add", "10.231.0.2/24", "dev", "pmveth1"]);
    ip(&["-n", &a.0, "link", "set", "pmveth0", "up"]);
    ip(&["-n", &b.0, "link", "set", "pmveth1", "up"]);
    (a, b)
}

/// Random loss of `percent` % of what `sender` (the [`veth_pair`] namespace
/// holding `pmveth0`) sends to `receiver`; says how. netem on the sender's
/// end where the kernel has it (every packet; the qdisc reports a drop as
/// sent, as a lossy wire would), else an nftables `numgen random` rule on
/// the receiver's way in that drops only TCP segments to port `dport`
/// (this host's kernel has no netem). Not an nftables rule on the sender's
/// output: that fails the transmit itself. Both go with the namespaces.
pub fn random_loss(
    sender: &NetNs,
    receiver: &NetNs,
    dport: u16,
    percent: u32,
) -> Result<&'static str, String> {
    let run = |args: &[&str]| Command::new(args[0]).args(&args[1..]).output();
    let loss = format!("{percent}%");
    let netem = run(&[
        "tc", "-n", &sender.0, "qdisc", "add", "dev", "pmveth0", "root", "netem", "loss", &loss,
    ]);
    if netem.as_ref().is_ok_and(|o| o.status.success()) {
        return Ok("netem");
    }
    let nft = run(&[
        "ip",
        "netns",
        "exec",
        &receiver.0,
        "nft",
        &loss_ruleset(dport, percent),
    ])
    .map_err(|e| format!("nft (nftables): {e}"))?;
    if !nft.status.success() {
        return Err(format!(
            "neither netem ({}) nor nftables ({}) can drop packets here",
            netem.map_or_else(
                |e| e.to_string(),
                |o| String::from_utf8_lossy(&o.stderr).trim().to_owned()
            ),
            String::from_utf8_lossy(&nft.stderr).trim()
        ));
    }
    Ok("nftables")
}

/// An nftables ruleset (table `pmloss`) that drops `percent` % of the TCP
/// segments arriving for port `dport`, at random (`numgen random`): for
/// `nft` in the receiving network namespace.
pub fn loss_ruleset(dport: u16, percent: u32) -> String {
    format!(
        "add table inet pmloss; \
         add chain inet pmloss in {{ type filter hook prerouting priority 0; }}; \
         add rule inet pmloss in tcp dport {dport} numgen random mod 100 < {percent} drop"
    )
}

/// An nftables ruleset (table `pmfail`) that drops `percent` % of the TCP
/// segments leaving for port `dport`, at random, on the output hook: for
/// `nft` in the sending namespace. Unlike a loss on the wire, the transmit
/// itself fails (`-EPERM`), as it does when a veth backlog or a qdisc is
/// full; the kernel counts such a failed retransmit in `total_retrans` and
/// in `TcpExt TCPRetransFail`.
pub fn failing_output_ruleset(dport: u16, percent: u32) -> String {
    format!(
        "add table inet pmfail; \
         add chain inet pmfail out {{ type filter hook output priority 0; }}; \
         add rule inet pmfail out tcp dport {dport} numgen random mod 100 < {percent} drop"
    )
}

/// Runs `nft` with `ruleset` in `ns`.
pub fn nft_in(ns: &NetNs, ruleset: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", ruleset])
        .output()
        .map_err(|e| format!("nft (nftables): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft in {}: {}",
            ns.0,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The `TcpExt` counter `name` of `ns` (`/proc/net/netstat` read there).
pub fn tcp_ext(ns: &NetNs, name: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "cat", "/proc/net/netstat"])
        .output()
        .expect("ip netns exec cat");
    assert!(
        out.status.success(),
        "reading /proc/net/netstat in {}",
        ns.0
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Pairs of lines: `TcpExt: <names>` then `TcpExt: <values>`.
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next(), tcp_ext.next());
    let (names, values) = names
        .zip(values)
        .expect("TcpExt lines in /proc/net/netstat");
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TcpExt {name} in /proc/net/netstat"))
}
