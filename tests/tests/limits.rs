//! Limits, both ways: a real CFS quota on a real burner, whose limit and
//! throttling podmeter must report as the kernel's `cpu.stat` has them; and
//! the capabilities podmeter itself keeps once its programs are attached,
//! with map reads (every scrape) still working on what is left.

use std::{
    collections::HashMap,
    fs,
    thread::sleep,
    time::{Duration, Instant},
};

use podmeter_test_support::{
    Agent, Scrape, TestCgroup, TestTree, Throttling, agent::Launch, kernel_version,
};

const PERIOD_US: u64 = 100_000;
const QUOTA_US: u64 = 20_000;
const PERIOD: f64 = PERIOD_US as f64 / 1e6;
const QUOTA: f64 = QUOTA_US as f64 / 1e6;
/// podmeter's CPU tick: where the kernel cannot run the per-CPU sync
/// (before 5.10) the running slice at either end of an interval may be
/// billed up to this late (see cpu.rs); elsewhere this is slack.
const TICK: f64 = 0.020;

/// What podmeter says about a host cgroup's throttling.
fn scraped(s: &Scrape, cg: &TestCgroup) -> Throttling {
    let get = |m: &str| {
        s.cgroup(m, &cg.path)
            .unwrap_or_else(|| panic!("no {m} for {}:\n{}", cg.path, s.text))
    };
    Throttling {
        periods: get("cpu_periods_total") as u64,
        throttled_periods: get("cpu_throttled_periods_total") as u64,
        throttled_seconds: get("cpu_throttled_seconds_total"),
    }
}

/// A scrape with the kernel's counters read just before and just after it.
struct Measured {
    scrape: Scrape,
    before: Throttling,
    after: Throttling,
    /// When the read before started.
    start: Instant,
    /// When the read after ended.
    end: Instant,
    /// The kernel's usage (cpu.stat usage_usec) at about the scrape.
    usage: f64,
}

fn measure(agent: &Agent, cg: &TestCgroup) -> Measured {
    let start = Instant::now();
    let before = cg.throttling();
    let usage_before = cg.cpu_stat_seconds();
    let scrape = agent.scrape();
    let usage_after = cg.cpu_stat_seconds();
    let after = cg.throttling();
    Measured {
        scrape,
        before,
        after,
        start,
        end: Instant::now(),
        usage: (usage_before + usage_after) / 2.0,
    }
}

/// podmeter reads `cpu.stat` during the scrape, so its counters lie between
/// the kernel's read just before and just after (they are monotonic). The
/// two kernel reads are a few milliseconds apart, and a bandwidth period is
/// 100 ms: at most `boundaries` period ends fall between them, each adding
/// at most 1 to `nr_periods` and `nr_throttled`, and at most one period of
/// throttled time per CPU (a throttled run queue is credited at unthrottle,
/// once per period, with how long it waited).
fn check_bracketed(m: &Measured, cg: &TestCgroup) {
    let pm = scraped(&m.scrape, cg);
    let (b, a) = (m.before, m.after);
    let span = (m.end - m.start).as_secs_f64();
    let boundaries = (span / PERIOD).floor() as u64 + 1;
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    eprintln!(
        "kernel before {b:?}\npodmeter      {pm:?}\nkernel after  {a:?}\n({:.1} ms apart)",
        span * 1e3
    );
    assert!(
        b.periods <= pm.periods && pm.periods <= a.periods,
        "nr_periods: {pm:?} not between {b:?} and {a:?}"
    );
    assert!(
        b.throttled_periods <= pm.throttled_periods && pm.throttled_periods <= a.throttled_periods,
        "nr_throttled: {pm:?} not between {b:?} and {a:?}"
    );
    // Both sides divide the same integer by the same power of ten, and the
    // exposition prints the shortest round-tripping decimal: exact.
    assert!(
        b.throttled_seconds <= pm.throttled_seconds && pm.throttled_seconds <= a.throttled_seconds,
        "throttled seconds: {pm:?} not between {b:?} and {a:?}"
    );
    assert!(a.periods - pm.periods <= boundaries, "{pm:?} vs {a:?}");
    assert!(
        a.throttled_periods - pm.throttled_periods <= boundaries,
        "{pm:?} vs {a:?}"
    );
    assert!(
        a.throttled_seconds - pm.throttled_seconds <= boundaries as f64 * PERIOD * cpus,
        "{pm:?} vs {a:?}"
    );
}

/// How the agent read throttling counters, from its debug log of the last
/// scrape: `(from the CFS iterator's walk, cpu.stat files read, of which
/// of cgroups gone)`.
fn throttling_sources(agent: &Agent) -> (u64, u64, u64) {
    let log = agent.log();
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("throttling counters: ").map(|(_, r)| r))
        .filter(|r| r.contains(" from the CFS iterator's walk, "))
        .unwrap_or_else(|| panic!("no throttling debug line in the log:\n{log}"));
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse::<u64>().unwrap());
    let mut next = || numbers.next().unwrap();
    (next(), next(), next())
}

/// The kernel's counters once they stand still: the burner is gone, and
/// with nothing runnable the bandwidth timer stops counting periods after
/// a period or two. Still means the same over two windows in a row.
fn still(cg: &TestCgroup) -> Throttling {
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut last, mut same) = (cg.throttling(), 0);
    while same < 2 {
        sleep(Duration::from_millis(300));
        let now = cg.throttling();
        same = if now == last { same + 1 } else { 0 };
        assert!(
            Instant::now() < deadline,
            "cpu.stat still moving: {last:?} → {now:?}"
        );
        last = now;
    }
    last
}

/// Where the kernel has cgroup iterators (6.1, for v1 hierarchies too),
/// the scrape takes every limited cgroup's counters from one walk of them;
/// elsewhere (the 5.10 VM) from the files.
#[test]
fn cpu_limit_and_throttling_match_cpu_stat() {
    let agent = limit_and_throttling("limits-walk", &[]);
    let log = agent.log();
    let (walked, files, gone) = throttling_sources(&agent);
    let kernel = kernel_version();
    if kernel >= (6, 1) {
        assert!(
            log.contains("throttling counters: read by a cgroup iterator walking"),
            "the agent did not set up the CFS iterator on {kernel:?}:\n{log}"
        );
        // A file is read only for a cgroup the walk did not have: one
        // removed since the last refresh (another test's, on a busy host).
        assert!(
            walked >= 1 && files == gone,
            "{walked} limited cgroups from the walk, {files} cpu.stat files read ({gone} gone): \
             the walk should give every live one"
        );
    } else {
        assert!(
            log.contains("throttling counters: read from each limited cgroup's cpu.stat"),
            "{log}"
        );
        assert!(
            walked == 0 && files > gone,
            "{walked} walked, {files} files, {gone} gone"
        );
    }
}

/// The fallback for kernels without cgroup iterators (before 6.1): each
/// limited cgroup's `cpu.stat`.
#[test]
fn cpu_limit_and_throttling_match_cpu_stat_read_from_files() {
    let agent = limit_and_throttling("limits-files", &["--force-throttling-files"]);
    let (walked, files, gone) = throttling_sources(&agent);
    assert!(
        walked == 0 && files > gone,
        "{walked} limited cgroups from the walk, {files} cpu.stat files read ({gone} gone): no \
         walk was asked for"
    );
}

/// A limited burner's throttling and an unlimited cgroup as podmeter
/// reports them, against the kernel's `cpu.stat`: bracketed while it runs,
/// equal to the last digit once it is stopped.
fn limit_and_throttling(tag: &str, args: &[&str]) -> Agent {
    let tree = TestTree::with_cpu(tag);
    eprintln!("cpu controller: {:?}", tree.cpu_controller().unwrap());
    let limited = tree.cgroup("limited");
    limited.set_cpu_limit(QUOTA_US, PERIOD_US);
    let unlimited = tree.cgroup("unlimited");
    // Tests' agents log at debug level, the throttling sources included.
    let agent = Agent::start(args);
    let mut burner = limited.spawn(None, &["burn"]);
    // Runs a moment (so podmeter counts it), then sleeps: reported, unlimited.
    let mut idle = unlimited.spawn(None, &["hold-memory", "1"]);
    assert_eq!(idle.line(), ["ready"]);

    let first = agent.scrape_until(Duration::from_secs(15), "both cgroups, throttled", |s| {
        s.cgroup("cpu_usage_seconds_total", &unlimited.path)
            .is_some()
            && s.cgroup("cpu_throttled_periods_total", &limited.path)
                .is_some_and(|v| v > 0.0)
    });
    // 20000 / 100000 is correctly rounded to the double nearest 0.2, which
    // is what the literal is and what the exposition prints back.
    assert_eq!(first.cgroup("cpu_limit_cores", &limited.path), Some(0.2));
    assert_eq!(
        first.cgroup("cpu_limit_cores", &unlimited.path),
        None,
        "an unlimited cgroup has no limit series"
    );
    // Without a quota its counters cannot move: no throttling series (as
    // cAdvisor), though a cpu controller covers it.
    for family in [
        "cpu_periods_total",
        "cpu_throttled_periods_total",
        "cpu_throttled_seconds_total",
    ] {
        assert_eq!(
            first.cgroup(family, &unlimited.path),
            None,
            "{family} of an unlimited cgroup"
        );
    }
    // The family is per cgroup: nothing of this tree's parent or root.
    assert_eq!(first.cgroup("cpu_limit_cores", "/"), None);
    assert_eq!(first.cgroup("cpu_periods_total", "/"), None);

    let m0 = measure(&agent, &limited);
    check_bracketed(&m0, &limited);
    sleep(Duration::from_secs(5));
    let m1 = measure(&agent, &limited);
    check_bracketed(&m1, &limited);

    let (p0, p1) = (scraped(&m0.scrape, &limited), scraped(&m1.scrape, &limited));
    let throttled = p1.throttled_periods - p0.throttled_periods;
    let periods = p1.periods - p0.periods;
    eprintln!(
        "5 s: {periods} periods, {throttled} throttled, {:.3} s throttled",
        p1.throttled_seconds - p0.throttled_seconds
    );
    // A burner that wants a whole core, capped at a fifth of one, runs out
    // of quota in most of its ~50 periods.
    assert!(
        throttled > 0,
        "throttled periods did not rise: {p0:?} → {p1:?}"
    );
    assert!(p1.throttled_seconds > p0.throttled_seconds);

    // CPU used between the two scrapes. The map reads happened somewhere in
    // [start, end] of each measurement, so the interval is at most
    // `widest`; over it the quota allows QUOTA per period it touches, i.e.
    // QUOTA × (widest / PERIOD + 1). On top of that: podmeter's running
    // slice may be billed a tick late at the first scrape (so the
    // difference can be a TICK high), and the kernel enforces quota at
    // scheduler ticks (≤ 10 ms at HZ=100) in 5 ms slices, overrunning at
    // most that before the debt is repaid from the next period.
    let cpu = |m: &Measured| {
        m.scrape
            .cgroup("cpu_usage_seconds_total", &limited.path)
            .unwrap()
    };
    let used = cpu(&m1) - cpu(&m0);
    let kernel_used = m1.usage - m0.usage;
    let widest = (m1.end - m0.start).as_secs_f64();
    let allowed = QUOTA * (widest / PERIOD + 1.0) + TICK + 0.010 + 0.005;
    let narrowest = (m1.start - m0.end).as_secs_f64();
    eprintln!(
        "used {used:.4} s (cpu.stat {kernel_used:.4} s) in {narrowest:.3}–{widest:.3} s: \
         {:.4} cores; allowed {allowed:.4} s",
        used / narrowest
    );
    assert!(
        used <= allowed,
        "podmeter billed {used:.4} s in ≤ {widest:.3} s, over the limit's {allowed:.4} s"
    );
    assert!(
        kernel_used <= allowed,
        "cpu.stat says {kernel_used:.4} s in ≤ {widest:.3} s: the quota did not hold"
    );
    // It did get (most of) its fifth of a core on this 2+-core host.
    assert!(
        used / widest > 0.1,
        "the burner barely ran ({used:.4} s in {widest:.3} s): the test measured nothing"
    );

    // Exact, once nothing moves: the same integers, divided the same way.
    // (A late period timer may still move cpu.stat: then the scrape is
    // taken again.)
    burner.kill();
    let (pm, kernel) = (0..3)
        .find_map(|_| {
            let kernel = still(&limited);
            let pm = scraped(&agent.scrape(), &limited);
            (limited.throttling() == kernel).then_some((pm, kernel))
        })
        .expect("cpu.stat moved during each of three scrapes");
    assert_eq!(pm, kernel, "podmeter vs cpu.stat of the stopped burner");
    assert!(kernel.throttled_periods > 0, "{kernel:?}");
    agent
}

const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_SYS_ADMIN: u64 = 1 << 21;
const CAP_BPF: u64 = 1 << 39;

/// The capability sets of every thread of `pid` (they are per thread; the
/// runtime's threads must have been started after the drop).
fn thread_caps(pid: i32) -> Vec<(String, HashMap<String, u64>)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = fs::read_to_string(task.path().join("status")).unwrap();
        let caps = status
            .lines()
            .filter_map(|l| l.split_once(":\t"))
            .filter(|(k, _)| k.starts_with("Cap"))
            .map(|(k, v)| (k.to_owned(), u64::from_str_radix(v.trim(), 16).unwrap()))
            .collect();
        out.push((task.file_name().to_string_lossy().into_owned(), caps));
    }
    assert!(out.len() > 1, "podmeter runs a multi-threaded runtime");
    out
}

fn assert_caps(agent: &Agent, effective: u64, bounding: u64) {
    for (tid, caps) in thread_caps(agent.pid()) {
        let expected = [
            ("CapEff", effective),
            ("CapPrm", effective),
            ("CapBnd", bounding),
            ("CapInh", 0),
            ("CapAmb", 0),
        ];
        for (set, want) in expected {
            assert_eq!(
                caps[set],
                want,
                "thread {tid}: {set} {:016x}, expected {want:016x}\n{}",
                caps[set],
                agent.log()
            );
        }
    }
}

/// After /readyz, CPU series of a pod and a host cgroup are served and grow:
/// the per-scrape map reads work with the capabilities left.
fn maps_still_read(agent: &Agent, tree: &TestTree) {
    let uid = "0c000000-0000-4000-8000-000000000001";
    let pod = tree.cgroup(&format!("kubepods/burstable/pod{uid}/{}", "0c".repeat(32)));
    let host = tree.cgroup("system.slice/caps.service");
    let _burners = [pod.spawn(None, &["burn"]), host.spawn(None, &["burn"])];
    const CPU: &str = "podmeter_container_cpu_usage_seconds_total";
    let values = |s: &Scrape| {
        (
            s.value(CPU, &[("pod_uid", uid)]),
            s.cgroup("cpu_usage_seconds_total", &host.path),
        )
    };
    let s0 = agent.scrape_until(Duration::from_secs(15), "both burners' CPU", |s| {
        matches!(values(s), (Some(_), Some(_)))
    });
    sleep(Duration::from_secs(1));
    let s1 = agent.scrape();
    let ((Some(c0), Some(h0)), (Some(c1), Some(h1))) = (values(&s0), values(&s1)) else {
        panic!("CPU series went away:\n{}", s1.text);
    };
    assert!(c1 > c0 && h1 > h0, "CPU did not grow: {c0}→{c1}, {h0}→{h1}");
}

#[test]
fn only_cap_bpf_is_kept_once_attached() {
    let tree = TestTree::new("caps");
    let agent = Agent::start(&[]);
    assert_caps(&agent, CAP_BPF, CAP_BPF);
    let log = agent.log();
    assert!(log.contains("kept=CAP_BPF"), "{log}");
    assert!(
        log.contains("CAP_SYS_ADMIN"),
        "dropped ones are logged: {log}"
    );
    maps_still_read(&agent, &tree);
}

/// Kernels before 5.8 have no CAP_BPF: there CAP_SYS_ADMIN grants the
/// bpf() syscall, and it is what stays. Simulated with a process that has
/// only CAP_SYS_ADMIN and CAP_NET_ADMIN, and so no CAP_SETPCAP either: its
/// bounding set cannot shrink, and podmeter says so instead of failing.
#[test]
fn cap_sys_admin_is_kept_without_cap_bpf() {
    let tree = TestTree::new("sysadmin");
    let agent = Agent::start_under(
        &[
            "setpriv",
            "--bounding-set=-all,+sys_admin,+net_admin",
            "--inh-caps=-all",
        ],
        &[],
    );
    assert_caps(&agent, CAP_SYS_ADMIN, CAP_SYS_ADMIN | CAP_NET_ADMIN);
    let log = agent.log();
    assert!(log.contains("kept=CAP_SYS_ADMIN"), "{log}");
    assert!(log.contains("bounding=CAP_NET_ADMIN"), "{log}");
    maps_still_read(&agent, &tree);
}

/// The agent's open descriptors now.
fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// A low open-files limit (here 300, of which the agent keeps 256 for
/// connections, maps and the API client): more counted cgroups than the
/// budget of kept-open cgroupfs files allows must still all report memory,
/// limit and throttling (read by open-read-close past the budget), and the
/// agent must never run out of descriptors.
#[test]
fn a_low_open_files_limit_still_reads_every_cgroup() {
    // Up to 10 files each (4 memory, 3 CPU, 3 pressure): 600 wanted, twice
    // the whole limit; 44 in the budget.
    const CGROUPS: usize = 60;
    const NOFILE: usize = 300;
    let tree = TestTree::with_cpu("nofile");
    let cgroups: Vec<TestCgroup> = (0..CGROUPS)
        .map(|i| tree.cgroup(&format!("c{i}")))
        .collect();
    for cg in &cgroups {
        cg.set_cpu_limit(QUOTA_US, PERIOD_US);
    }
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let agent = Agent::start_under(
        &["prlimit", &limit, "--"],
        &["--no-kubernetes", "--refresh-interval", "1s"],
    );
    // Started after the agent, so it sees them run: 1 ms of work every
    // 100 ms each, light enough for a 2-CPU machine.
    let _work: Vec<_> = cgroups
        .iter()
        .map(|cg| cg.spawn(None, &["tick", "100000", "1000"]))
        .collect();
    let has_all = |s: &Scrape| {
        cgroups.iter().all(|cg| {
            [
                "memory_working_set_bytes",
                "cpu_limit_cores",
                "cpu_periods_total",
            ]
            .iter()
            .all(|m| s.cgroup(m, &cg.path).is_some())
                // Read since its worker started: an empty cgroup has none.
                && s.cgroup("memory_working_set_bytes", &cg.path) > Some(0.0)
        })
    };
    let s = agent.scrape_until(Duration::from_secs(30), "every cgroup read", has_all);
    for cg in &cgroups {
        let limit = s.cgroup("cpu_limit_cores", &cg.path).unwrap();
        assert!(
            (limit - QUOTA / PERIOD).abs() < 1e-9,
            "{}: limit {limit}",
            cg.path
        );
    }
    // Reads keep working past the budget, scrape after scrape.
    for _ in 0..5 {
        let s = agent.scrape();
        assert!(has_all(&s), "a scrape lost cgroups:\n{}", s.text);
        let fds = open_fds(agent.pid());
        assert!(fds < NOFILE, "{fds} descriptors open of {NOFILE}");
        sleep(Duration::from_millis(300));
    }
    let log = agent.log();
    assert!(
        !log.contains("out of file descriptors"),
        "the budget should keep the agent clear of EMFILE:\n{log}"
    );
    assert!(log.contains("budget=44"), "budget not as expected:\n{log}");
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Without
/// CAP_SYS_RESOURCE to lift a 64 KiB limit, podmeter must refuse with one
/// line that names the limit and the fix; later kernels (memcg accounting)
/// must start as usual. `cargo xtask vm-test 5.10` runs the first case.
#[test]
fn a_low_memlock_limit_is_refused_only_where_the_kernel_charges_it() {
    let version = kernel_version();
    let started = Launch {
        wrapper: [
            "prlimit",
            "--memlock=65536:65536",
            "--",
            "setpriv",
            "--bounding-set=-sys_resource",
            "--inh-caps=-all",
        ]
        .map(String::from)
        .to_vec(),
        ..Launch::new(&["--no-kubernetes"])
    }
    .start();
    if version < (5, 11) {
        let err = started
            .err()
            .expect("podmeter started with 64 KiB of memlock");
        let line = err
            .lines()
            .find(|l| l.starts_with("podmeter: error:"))
            .unwrap_or_else(|| panic!("no error line:\n{err}"));
        assert!(
            line.contains("RLIMIT_MEMLOCK") && line.contains("64 KiB"),
            "{line}"
        );
        assert!(line.contains("CAP_SYS_RESOURCE"), "{line}");
    } else {
        let agent = started.unwrap_or_else(|e| panic!("kernel {version:?}: {e}"));
        let (code, _) = agent.get("/metrics").unwrap();
        assert_eq!(code, 200);
    }
}
