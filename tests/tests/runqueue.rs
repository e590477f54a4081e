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
    let last = agent.scrape();
    let after = waits(&last, &cg);
    let idle_after = waits(&agent.scrape(), &idle);
    assert!(
        histogram(&last, &cg).is_empty(),
        "a wait histogram without --wait-histogram"
    );
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

/// Cumulative `(le, count)` of a cgroup's wait histogram, by bound.
fn histogram(s: &Scrape, cg: &TestCgroup) -> Vec<(f64, f64)> {
    let mut b: Vec<(f64, f64)> = s
        .find(
            "podmeter_cgroup_cpu_wait_duration_seconds_bucket",
            &[("cgroup", &cg.path)],
        )
        .into_iter()
        .map(|(labels, v)| (labels["le"].parse::<f64>().unwrap(), v))
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    b
}

/// With `--wait-histogram`, each wait lands once, in the bucket of its
/// length. A real-time hog pinned beside one ordinary spinner runs 12 ms
/// every 30 ms; it preempts the spinner at once and is never preempted
/// back, so each of its bursts makes the spinner wait 12 ms: the
/// (8.4 ms, 16.8 ms] bucket. The kernel's per-task accounting counts the
/// waits and their total.
#[test]
fn wait_histogram_puts_each_wait_in_the_bucket_of_its_length() {
    check_histogram("runqueue-hist", &[]);
}

#[test]
fn wait_histogram_puts_each_wait_in_the_bucket_of_its_length_with_the_raw_switch_program() {
    check_histogram("runqueue-hist-raw", &["--force-raw-switch"]);
}

fn check_histogram(tag: &str, args: &[&str]) {
    let tree = TestTree::new(tag);
    let cg = tree.cgroup("victim");
    let hog_cg = tree.cgroup("hog");
    let agent = Agent::start(&[args, &["--wait-histogram"]].concat());
    let mut hog = hog_cg.spawn(None, &["--cpu", "0", "--fifo", "tick", "30000", "12000"]);
    let mut victim = cg.spawn_piped(&["--cpu", "0", "spin", SECONDS]);
    let start = schedstat(&victim.line());
    let before = agent.scrape();
    let (h0, w0) = (histogram(&before, &cg), waits(&before, &cg));
    victim.say("go");
    let end = schedstat(&victim.line());
    std::thread::sleep(Duration::from_millis(200));
    let after = agent.scrape();
    let (h1, w1) = (histogram(&after, &cg), waits(&after, &cg));
    victim.close_stdin();
    victim.wait();
    hog.kill();

    assert_eq!(h1.len(), 8, "8 buckets, +Inf last: {h1:?}");
    assert_eq!(h1[7].0, f64::INFINITY);
    // Per bucket, over the spin (the victim asleep on stdin at both ends).
    let count = |i: usize| {
        let c = |h: &[(f64, f64)], i: usize| {
            let at = |i: usize| h.get(i).map_or(0.0, |b| b.1);
            at(i) - if i == 0 { 0.0 } else { at(i - 1) }
        };
        c(&h1, i) - c(&h0, i)
    };
    let counts: Vec<f64> = (0..8).map(count).collect();
    let total: f64 = counts.iter().sum();
    let (wait_s, waits_n) = (w1.0 - w0.0, w1.1 - w0.1);
    let truth_s = (end.0 - start.0) / 1e9;
    let truth_n = end.1 - start.1;
    eprintln!(
        "victim: buckets {counts:?} ({total} waits, {wait_s:.4} s); cpu_waits_total +{waits_n}; \
         schedstat {truth_n} waits, {truth_s:.4} s"
    );

    // Every wait counted is bucketed, once.
    assert_eq!(total, waits_n, "histogram count vs cpu_waits_total");
    assert!(
        (total - truth_n).abs() <= 0.03 * truth_n + 3.0,
        "{total} waits bucketed, schedstat {truth_n}"
    );
    // Each bucket's waits are within its bounds, so the waited time lies
    // between the sum of the lower and of the upper bounds.
    let bound = |i: usize| if i < 7 { h1[i].0 } else { f64::INFINITY };
    let low: f64 = (1..8).map(|i| counts[i] * bound(i - 1)).sum();
    let high: f64 = (0..8)
        .filter(|&i| counts[i] > 0.0)
        .map(|i| counts[i] * bound(i))
        .sum();
    assert!(
        low <= wait_s && wait_s <= high,
        "{wait_s} s waited, outside the buckets' [{low}, {high}] s"
    );
    // The hog's bursts: 3 s / 30 ms, 100 of them, each a 12 ms wait.
    let bursts = SECONDS.parse::<f64>().unwrap() / 0.030;
    assert!(
        (bound(5)..=bound(6)).contains(&0.012),
        "12 ms belongs in bucket 6: {h1:?}"
    );
    // A VM's vCPU held by a busy host stretches some of them past 16.8 ms.
    let hogs = counts[6] + counts[7];
    assert!(
        hogs >= 0.8 * bursts && hogs <= 1.2 * bursts && counts[6] >= 0.6 * bursts,
        "{} waits in (8.4, 16.8] ms and {} above for {bursts} bursts of 12 ms: {counts:?}",
        counts[6],
        counts[7]
    );
    // Nothing else on that CPU holds the victim that long: the waits over
    // 4.2 ms are the hog's, in its bucket or, where the host held a VM's
    // vCPU in the middle of one (several VMs at once), above it; never
    // below, where a wait billed short would land.
    let long: f64 = counts[5..].iter().sum();
    assert!(
        counts[6] + counts[7] >= 0.9 * long,
        "waits longer than 4.2 ms outside the hog's bucket: {counts:?}"
    );
}
