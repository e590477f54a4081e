//! Run-queue waits per cgroup against the kernel's own per-task accounting
//! (`/proc/<pid>/schedstat`: run time, run-queue wait, waits).
//!
//! Three busy processes pinned to one CPU, in one cgroup, each wait about
//! two thirds of the time. Each reads its own schedstat, then sleeps on
//! stdin while the test reads podmeter; spins; reads it again and sleeps
//! again while the test reads podmeter a second time. Asleep, a task waits
//! for no CPU, so both sides measure the same stretch: the sum of the
//! processes' differences is the ground truth for the cgroup's.

use std::time::Duration;

use podmeter_test_support::{Agent, Scrape, TestCgroup, TestTree};

const SECONDS: &str = "3";

/// `(wait_ns, waits)` of one `schedstat <run> <wait> <waits>` line.
fn schedstat(line: &[String]) -> (f64, f64) {
    assert_eq!(line.len(), 4, "{line:?}");
    assert_eq!(line[0], "schedstat", "{line:?}");
    (line[2].parse().unwrap(), line[3].parse().unwrap())
}

fn waits(s: &Scrape, cg: &TestCgroup) -> (f64, f64) {
    (
        s.cgroup("cpu_wait_seconds_total", &cg.path).unwrap_or(0.0),
        s.cgroup("cpu_waits_total", &cg.path).unwrap_or(0.0),
    )
}

#[test]
fn run_queue_waits_match_schedstat() {
    check("runqueue", &[]);
}

/// The raw tracepoint, for kernels that refuse `tp_btf`, reads the same
/// totals through helpers.
#[test]
fn run_queue_waits_match_schedstat_with_the_raw_switch_program() {
    check("runqueue-raw", &["--force-raw-switch"]);
}

fn check(tag: &str, args: &[&str]) {
    let tree = TestTree::new(tag);
    let cg = tree.cgroup("starved");
    let idle = tree.cgroup("idle");
    let agent = Agent::start(args);

    // A cgroup that only sleeps, on the other CPU, barely waits. It runs
    // (and podmeter has seen it wait) before the spinners start.
    let mut sleeper = idle.spawn(None, &["--cpu", "1", "tick", "100000", "0"]);
    agent.scrape_until(Duration::from_secs(10), "the sleeper's first waits", |s| {
        waits(s, &idle).1 > 0.0
    });
    let mut spinners: Vec<_> = (0..3)
        .map(|_| cg.spawn_piped(&["--cpu", "0", "spin", SECONDS]))
        .collect();
    let starts: Vec<(f64, f64)> = spinners.iter_mut().map(|w| schedstat(&w.line())).collect();
    // Every spinner is asleep on stdin now; their waits so far (starting,
    // joining the cgroup) are in both readings.
    let before = waits(&agent.scrape(), &cg);
    let idle_before = waits(&agent.scrape(), &idle);
    for w in &mut spinners {
        w.say("go");
    }
    let ends: Vec<(f64, f64)> = spinners.iter_mut().map(|w| schedstat(&w.line())).collect();
    // Asleep again: each one's last slice was billed when it left the CPU,
    // to the map or the CPU's pending slot, both read at a scrape.
    std::thread::sleep(Duration::from_millis(200));
    let after = waits(&agent.scrape(), &cg);
    let idle_after = waits(&agent.scrape(), &idle);
    for w in &mut spinners {
        w.close_stdin();
        w.wait();
    }
    sleeper.kill();

    let truth_ns: f64 = ends.iter().zip(&starts).map(|(e, s)| e.0 - s.0).sum();
    let truth_waits: f64 = ends.iter().zip(&starts).map(|(e, s)| e.1 - s.1).sum();
    let truth = truth_ns / 1e9;
    let (got, got_waits) = (after.0 - before.0, after.1 - before.1);
    let (idle_wait, idle_waits) = (idle_after.0 - idle_before.0, idle_after.1 - idle_before.1);
    eprintln!(
        "waited: schedstat {truth:.4} s in {truth_waits} waits, podmeter {got:.4} s in {got_waits} waits ({:+.3} %); the sleeper {idle_wait:.4} s in {idle_waits} waits",
        (got - truth) / truth * 100.0
    );
    // Three tasks on one CPU for 3 s: each waits about 2 s.
    assert!(truth > 3.0, "the spinners barely waited: {truth} s");
    assert!(
        (got - truth).abs() <= 0.03 * truth,
        "podmeter says {got} s of run-queue wait, schedstat {truth} s"
    );
    assert!(
        (got_waits - truth_waits).abs() <= 0.03 * truth_waits + 3.0,
        "podmeter says {got_waits} waits, schedstat {truth_waits}"
    );
    // It woke about 30 times, each a (short) wait: counted, and in its own
    // cgroup, not the spinners'.
    assert!(
        idle_waits >= 10.0 && idle_wait < 0.1 * truth,
        "a sleeping cgroup waited {idle_wait} s in {idle_waits} waits"
    );
}
