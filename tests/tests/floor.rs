//! The benchmark's floor (`cargo xtask bench`, the A/B arm "empty programs
//! only"): empty programs attached where podmeter's attach, whose cost is
//! what entering any program there costs. Were they not run on every
//! switch and packet, that arm would measure nothing; were they left
//! attached, every later arm would pay for them.

use std::{
    io::{Read as _, Write as _},
    net::UdpSocket,
    os::unix::net::UnixStream,
    process::Command,
    time::{Duration, Instant},
};

use podmeter_test_support::{
    cgroups::unified_root,
    empty_programs::{Floor, run_time_stats},
};

/// A program's `run_cnt`, or `None` once no program has the id.
fn run_cnt(id: u32) -> Option<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool");
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j");
    Some(v["run_cnt"].as_u64().unwrap_or(0))
}

#[test]
fn empty_programs_run_on_every_switch_and_packet_while_attached_and_go_when_dropped() {
    let _stats = run_time_stats().expect("BPF_ENABLE_STATS");
    let floor = Floor::attach(&unified_root()).expect("attaching the empty programs");
    let ids = floor.ids().expect("program ids");
    assert_eq!(ids.len(), 3, "{ids:?}");
    let before: Vec<u64> = ids.iter().map(|id| run_cnt(*id).expect("loaded")).collect();

    // 1000 round trips over a socket pair: each side blocks in read until
    // the other writes, so each trip switches at least once (a task
    // woken from its read must be switched in).
    const TRIPS: u64 = 1000;
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8];
        for _ in 0..TRIPS {
            b.read_exact(&mut byte).unwrap();
            b.write_all(&byte).unwrap();
        }
    });
    let mut byte = [7u8];
    for _ in 0..TRIPS {
        a.write_all(&byte).unwrap();
        a.read_exact(&mut byte).unwrap();
    }
    echo.join().unwrap();
    // 100 datagrams over loopback: each leaves through the cgroup2 root's
    // egress hook and arrives through its ingress hook (programs at the
    // root run for every cgroup below it, this test's included).
    const DATAGRAMS: u64 = 100;
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..DATAGRAMS {
        tx.send_to(&buf, rx.local_addr().unwrap()).unwrap();
        rx.recv(&mut buf).unwrap();
    }

    let ran: Vec<u64> = ids
        .iter()
        .zip(&before)
        .map(|(id, b)| run_cnt(*id).expect("loaded") - b)
        .collect();
    eprintln!(
        "empty programs ran: sched_switch {} times, ingress {}, egress {} ({TRIPS} round trips, {DATAGRAMS} datagrams)",
        ran[0], ran[1], ran[2]
    );
    assert!(ran[0] >= TRIPS, "sched_switch program ran {} times", ran[0]);
    assert!(ran[1] >= DATAGRAMS, "ingress program ran {} times", ran[1]);
    assert!(ran[2] >= DATAGRAMS, "egress program ran {} times", ran[2]);

    drop(floor);
    // Closing the links detaches; the programs go with their last
    // reference, which the kernel may drop a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in ids {
        while run_cnt(id).is_some() {
            assert!(
                Instant::now() < deadline,
                "program {id} still loaded 10 s after the drop"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
