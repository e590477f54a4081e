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
