//! Counting through the agent's own restarts: the programs and maps pinned
//! in bpffs keep counting while no agent runs, the next agent adopts them,
//! pins of another layout are removed with the reset announced, and
//! `podmeter cleanup` leaves nothing behind.
//!
//! Each test pins under a path of its own in `/sys/fs/bpf` (the agent
//! mounts bpffs there when the host has none, as on this machine).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::Duration,
};

use podmeter_test_support::{Agent, Scrape, TestTree, podmeter_bin, podmeter_prog_ids};

const CPU: &str = "podmeter_container_cpu_usage_seconds_total";
const TX: &str = "podmeter_container_network_transmit_bytes_total";
const TX_PACKETS: &str = "podmeter_container_network_transmit_packets_total";

/// A pin path of this test's own, removed (with everything pinned under
/// it) on drop.
struct PinPath(PathBuf);

impl PinPath {
    fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/podmeter-test-{}-{tag}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&p);
        Self(p)
    }

    fn arg(&self) -> String {
        format!("--pin-path={}", self.0.display())
    }

    /// Every file pinned under it.
    fn pins(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in fs::read_dir(d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.0, &mut out);
        out.sort();
        out
    }
}

impl Drop for PinPath {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether this kernel attaches perf events through links (5.15+).
fn perf_links() -> bool {
    podmeter_test_support::kernel_version() >= (5, 15)
}

fn cleanup(pins: &PinPath) -> std::process::Output {
    Command::new(podmeter_bin())
        .arg(pins.arg())
        .arg("cleanup")
        .output()
        .unwrap()
}

fn origin(s: &Scrape) -> String {
    s.find("podmeter_counters_origin_info", &[])
        .first()
        .map(|(labels, _)| labels["origin"].clone())
        .unwrap_or_default()
}

/// Every per-cgroup counter (`*_total`, and histogram buckets) of `before`
/// that `after` also has: none may be lower. Returns how many were
/// compared.
fn assert_no_counter_went_down(before: &Scrape, after: &Scrape) -> usize {
    let mut compared = 0;
    for s in &before.samples {
        let per_cgroup =
            s.name.starts_with("podmeter_container_") || s.name.starts_with("podmeter_cgroup_");
        if !per_cgroup || !(s.name.ends_with("_total") || s.name.ends_with("_bucket")) {
            continue;
        }
        let pairs: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(now) = after.find(&s.name, &pairs).first().map(|(_, v)| *v) {
            assert!(
                now >= s.value,
                "{}{:?} went down across the restart: {} → {now}",
                s.name,
                s.labels,
                s.value
            );
            compared += 1;
        }
    }
    compared
}

#[test]
fn sigkill_and_restart_lose_nothing_counted_meanwhile() {
    let pins = PinPath::new("gap");
    let tree = TestTree::new("gap");
    let uid = "0b000000-0000-4000-8000-000000000001";
    let cg = tree.cgroup(&format!("kubepods/burstable/pod{uid}/{}", "0b".repeat(32)));
    let id = [("pod_uid", uid)];

    // With the wait histogram, whose buckets must carry over too.
    let mut first = Agent::start(&[&pins.arg(), "--wait-histogram"]);
    let s = first.scrape();
    assert_eq!(origin(&s), "created", "a fresh pin path");
    // Both start after the programs are attached, so the kernel's own
    // totals for the cgroup are what podmeter must end up with.
    let start_cpu = cg.cpu_stat_seconds();
    let mut burner = cg.spawn(None, &["burn"]);
    // 2 MiB/s of 1400-byte datagrams for 24 s, into the discard port.
    let mut flood = cg.spawn(None, &["udp-flood", "127.0.0.1:9", "2", "24"]);
    let before = first.scrape_until(Duration::from_secs(15), "the pod's series", |s| {
        s.find(CPU, &id).first().is_some_and(|(_, v)| *v > 1.0)
            && s.find(TX, &id).first().is_some_and(|(_, v)| *v > 0.0)
    });

    first.kill();
    // Nothing of podmeter runs now but the pinned programs.
    sleep(Duration::from_secs(10));
    let second = Agent::start(&[&pins.arg(), "--wait-histogram"]);
    let after = second.scrape();
    assert_eq!(origin(&after), "adopted", "{}", second.log());
    let compared = assert_no_counter_went_down(&before, &after);
    assert!(
        compared >= 4 + 8,
        "only {compared} counters and buckets to compare"
    );

    // The flood ends by itself; the burner is stopped, so both the kernel's
    // numbers and podmeter's stand still for the comparison.
    let sent: f64 = flood.line()[1].parse().unwrap();
    flood.wait();
    burner.kill();
    sleep(Duration::from_millis(200));
    let kernel_cpu = cg.cpu_stat_seconds() - start_cpu;
    let end = second.scrape();

    // The waits of the gap were bucketed by the pinned programs: every
    // wait counted is in the histogram.
    let waits = end.find("podmeter_container_cpu_waits_total", &id)[0].1;
    let bucketed = end.find(
        "podmeter_container_cpu_wait_duration_seconds_bucket",
        &[id[0], ("le", "+Inf")],
    )[0]
    .1;
    assert!(
        waits > 0.0 && bucketed == waits,
        "{bucketed} waits bucketed of {waits}"
    );

    let cpu = end.find(CPU, &id)[0].1;
    let err = (cpu - kernel_cpu).abs() / kernel_cpu;
    eprintln!(
        "CPU across a 10 s gap: podmeter {cpu:.3} s, cpu.stat {kernel_cpu:.3} s ({:.3} %)",
        err * 100.0
    );
    assert!(
        kernel_cpu > 15.0,
        "the burner ran only {kernel_cpu} s: the gap is not covered"
    );
    assert!(
        err < 0.01,
        "CPU {cpu} s vs cpu.stat {kernel_cpu} s across the restart"
    );

    let (tx, packets) = (end.find(TX, &id)[0].1, end.find(TX_PACKETS, &id)[0].1);
    // Every datagram is 1400 bytes of payload and 28 of UDP/IPv4 header.
    let datagrams = sent / 1400.0;
    let expected = datagrams * 1428.0;
    let err = (tx - expected).abs() / expected;
    eprintln!(
        "bytes across a 10 s gap: podmeter {tx} in {packets} packets, sent {expected} in {datagrams} ({:.4} %)",
        err * 100.0
    );
    assert!(
        err < 0.005,
        "transmit bytes {tx} vs {expected} sent across the restart"
    );
}

#[test]
fn pins_of_another_layout_are_removed_and_the_reset_announced() {
    let pins = PinPath::new("layout");
    // What an agent of an older layout would have left: a PM_CPU map in
    // the previous layout's directory, and one in this agent's whose values
    // are not this agent's (real kernel maps, pinned with bpftool).
    let bpftool = |args: &[&str]| {
        let out = Command::new("bpftool").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Mounts bpffs if need be (no agent has run yet in this process).
    // It also tells this agent's layout: the one directory it pinned in.
    let agent = Agent::start(&[&pins.arg()]);
    drop(agent);
    let layouts: Vec<u32> = fs::read_dir(&pins.0)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_prefix('v')?
                .parse()
                .ok()
        })
        .collect();
    let [layout] = layouts[..] else {
        panic!("one layout directory expected: {layouts:?}");
    };
    assert!(cleanup(&pins).status.success());
    let (prev, this) = (format!("v{}", layout - 1), format!("v{layout}"));
    for dir in [&prev, &this] {
        fs::create_dir_all(pins.0.join(dir).join("maps")).unwrap();
    }
    let old = pins.0.join(&prev).join("maps/PM_CPU");
    let wrong = pins.0.join(&this).join("maps/PM_CPU");
    for (path, value) in [(&old, "8"), (&wrong, "24")] {
        bpftool(&[
            "map",
            "create",
            path.to_str().unwrap(),
            "type",
            "percpu_hash",
            "key",
            "8",
            "value",
            value,
            "entries",
            "16",
            "name",
            "PM_CPU",
        ]);
    }

    let agent = Agent::start(&[&pins.arg()]);
    let s = agent.scrape();
    assert_eq!(origin(&s), "reset", "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("COUNTER RESET"), "{log}");
    assert!(log.contains(&format!("{prev} (another layout")), "{log}");
    assert!(
        log.contains("map PM_CPU is a PerCpuHash of 8-byte keys and 24-byte values"),
        "{log}"
    );
    assert!(!pins.0.join(&prev).exists(), "the old layout's pins stay");
    // This agent's own maps replace the incompatible one.
    let pinned = pins.pins();
    assert!(
        pinned.contains(&pins.0.join(&this).join("maps/PM_CPU"))
            && pinned.contains(&pins.0.join(&this).join("links/switch")),
        "{pinned:?}"
    );
    drop(agent);

    // Maps of another capacity: --max-cgroups takes effect, announced.
    let agent = Agent::start(&[&pins.arg(), "--max-cgroups=64"]);
    let s = agent.scrape();
    assert_eq!(origin(&s), "reset", "{}", agent.log());
    assert_eq!(
        s.value("podmeter_bpf_map_capacity_entries", &[("map", "cpu")]),
        Some(64.0)
    );
    let log = agent.log();
    assert!(
        log.contains("map PM_CPU holds 4096 cgroups; --max-cgroups asks for 64"),
        "{log}"
    );
    drop(agent);
    // And the same settings again: adopted.
    let agent = Agent::start(&[&pins.arg(), "--max-cgroups=64"]);
    assert_eq!(origin(&agent.scrape()), "adopted", "{}", agent.log());
    drop(agent);

    // The wait histogram turned on: its map grows to a slot per cgroup,
    // announced; then kept while it stays on.
    let agent = Agent::start(&[&pins.arg(), "--max-cgroups=64", "--wait-histogram"]);
    assert_eq!(origin(&agent.scrape()), "reset", "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains(
            "map PM_WAIT_HIST holds 1 cgroups; this agent needs 64 (--wait-histogram was turned on)"
        ),
        "{log}"
    );
    drop(agent);
    let agent = Agent::start(&[&pins.arg(), "--max-cgroups=64", "--wait-histogram"]);
    assert_eq!(origin(&agent.scrape()), "adopted", "{}", agent.log());
    drop(agent);
    // And off again.
    let agent = Agent::start(&[&pins.arg(), "--max-cgroups=64"]);
    assert_eq!(origin(&agent.scrape()), "reset", "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("map PM_WAIT_HIST holds 64 cgroups; this agent needs 1 (--wait-histogram was turned off)"),
        "{log}"
    );
}

#[test]
fn sigterm_keeps_counting_and_cleanup_removes_everything() {
    let pins = PinPath::new("cleanup");
    let before = podmeter_prog_ids();
    let mut agent = Agent::start(&[&pins.arg()]);
    let ours: Vec<u64> = podmeter_prog_ids()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert!(agent.stop().success());
    assert!(
        agent.log().contains("pinned programs keep counting"),
        "{}",
        agent.log()
    );
    // The counting programs stay (mkdir/rmdir go with the process).
    let left: Vec<u64> = podmeter_prog_ids()
        .into_iter()
        .filter(|id| ours.contains(id))
        .collect();
    // Before 5.15 a perf event holds its program by ioctl, not by a link
    // that can be pinned: the tick goes with the process there.
    let counting = if perf_links() { 6 } else { 5 };
    assert_eq!(
        left.len(),
        counting,
        "sched_switch, tick (5.15+), ingress, egress, tcp_retransmit_skb, inet_sock_set_state should outlive a SIGTERM: {left:?} of {ours:?}"
    );
    let pinned = pins.pins();
    assert!(
        pinned.iter().any(|p| p.ends_with("links/skb-ingress")),
        "{pinned:?}"
    );

    let out = cleanup(&pins);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("removed {} pins", pinned.len())),
        "{said}"
    );
    assert!(!pins.0.exists(), "{:?} left", pins.pins());
    // The kernel frees a detached program after an RCU grace period.
    podmeter_test_support::poll(
        Duration::from_secs(5),
        Duration::from_millis(100),
        "every program freed after cleanup",
        || {
            podmeter_prog_ids()
                .into_iter()
                .all(|id| !ours.contains(&id))
                .then_some(())
        },
    );
    // Again: nothing to do, and says so without failing.
    assert!(cleanup(&pins).status.success());
}
