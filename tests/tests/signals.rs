//! Signals podmeter reads from cgroup files, against the kernel's own
//! numbers: OOM kills inside a cgroup that survives them (the count from the
//! children's wait statuses and from the kernel's file), the memory limit as
//! written, and pressure stall totals bracketed by reads of the files.

use std::{fs, path::PathBuf, thread::sleep, time::Duration};

use podmeter_test_support::{Agent, Scrape, TestCgroup, TestTree, memory_v1_root};

/// Short, so a new value shows within a second (the default is 15 s).
const REFRESH: &str = "250ms";

fn agent() -> Agent {
    Agent::start(&["--refresh-interval", REFRESH])
}

/// The directory of `cg`'s memory controller: the v1 one on hybrid hosts,
/// else the cgroup2 one (where the test tree delegates memory).
fn memory_dir(cg: &TestCgroup) -> PathBuf {
    if memory_v1_root().is_some() {
        cg.dirs[1].clone()
    } else {
        cg.dir().to_owned()
    }
}

/// Limits `cg` to `bytes` of memory, without swap to escape to.
fn set_memory_limit(cg: &TestCgroup, bytes: u64) {
    let dir = memory_dir(cg);
    if dir.join("memory.max").exists() {
        fs::write(dir.join("memory.max"), bytes.to_string()).unwrap();
        if dir.join("memory.swap.max").exists() {
            fs::write(dir.join("memory.swap.max"), "0").unwrap();
        }
    } else {
        // memsw (memory + swap) may not go below the memory limit: when
        // lowering, the memory limit first.
        fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string()).unwrap();
        if dir.join("memory.memsw.limit_in_bytes").exists() {
            fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string()).unwrap();
        }
    }
}

/// The kernel's OOM kill count of `cg`: `oom_kill` in v2
/// `memory.events.local` or v1 `memory.oom_control`.
fn kernel_oom_kills(cg: &TestCgroup) -> u64 {
    ["memory.events.local", "memory.oom_control"]
        .iter()
        .find_map(|f| memory_file_count(cg, f, "oom_kill"))
        .expect("oom_kill in memory.events.local or memory.oom_control")
}

#[test]
fn oom_kills_in_a_surviving_cgroup_match_the_kernel_and_the_victims() {
    const LIMIT: u64 = 64 << 20;
    let tree = TestTree::new("signals-oom");
    let cg = tree.cgroup("app");
    set_memory_limit(&cg, LIMIT);
    let agent = agent();

    let mut parent = cg.spawn_piped(&["--linger", "oom-children", "128", "8", "128", "96"]);
    assert_eq!(parent.line(), ["ready"]);
    let metric = |s: &Scrape| s.cgroup("oom_kills_total", &cg.path);
    let first = agent.scrape_until(Duration::from_secs(15), "the cgroup's OOM kills", |s| {
        metric(s).is_some()
    });
    let (pm_before, kernel_before) = (metric(&first).unwrap(), kernel_oom_kills(&cg));
    assert_eq!(
        pm_before, kernel_before as f64,
        "before any kill podmeter says {pm_before}, the kernel {kernel_before}"
    );

    parent.say("go");
    let done = parent.line();
    let killed: u64 = match done.as_slice() {
        [k, killed, e, exited] if k == "killed" && e == "exited" => {
            eprintln!("children: {killed} SIGKILLed, {exited} exited 0");
            // The small child fits: the limit is not killing everything.
            assert!(exited.parse::<u64>().unwrap() > 0, "{done:?}");
            killed.parse().unwrap()
        }
        _ => panic!("pm-work said {done:?}"),
    };
    assert!(
        killed > 0,
        "no child was OOM-killed: the test measured nothing"
    );
    let kernel = kernel_oom_kills(&cg) - kernel_before;
    assert_eq!(
        kernel, killed,
        "the kernel counted {kernel} OOM kills, {killed} children died of SIGKILL"
    );
    // Refreshes run every 250 ms: the count shows within a few.
    let after = agent.scrape_until(Duration::from_secs(10), "the kills in podmeter", |s| {
        metric(s).is_some_and(|v| v - pm_before == killed as f64)
    });
    eprintln!(
        "oom_kills_total {pm_before} → {}, kernel +{kernel}, SIGKILLed children {killed}",
        metric(&after).unwrap()
    );

    // The container survived its OOM kills: its main process runs, its
    // cgroup is still there and still reported.
    assert_eq!(parent.exited(), None, "the parent process died");
    assert!(cg.dir().exists());
    sleep(Duration::from_secs(1));
    let later = agent.scrape();
    assert_eq!(
        metric(&later).map(|v| v - pm_before),
        Some(killed as f64),
        "the count stays"
    );
    assert!(later.cgroup("memory_working_set_bytes", &cg.path).is_some());
}

/// `key`'s count in a memory file of `cg`, if the file exists.
fn memory_file_count(cg: &TestCgroup, file: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(memory_dir(cg).join(file)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// A pod-level limit, as the kubelet sets it, hit by a container's
/// process: the kill is the container's, not the pod's, as podmeter's
/// other counters are exclusive.
#[test]
fn oom_kills_are_billed_to_the_victims_cgroup_not_its_ancestors() {
    let tree = TestTree::new("signals-oom-pod");
    let app = tree.cgroup("pod/app");
    let pod = tree.cgroup("pod");
    set_memory_limit(&pod, 64 << 20);
    let agent = agent();
    // v1 lets the pod-level cgroup hold a task (so podmeter reports it);
    // cgroup2 does not where it hands memory down to its children.
    let mut holder = memory_v1_root().map(|_| pod.spawn(None, &["hold-memory", "1"]));
    if let Some(h) = &mut holder {
        assert_eq!(h.line(), ["ready"]);
    }
    let mut parent = app.spawn_piped(&["--linger", "oom-children", "128", "128"]);
    assert_eq!(parent.line(), ["ready"]);
    let metric = |s: &Scrape, cg: &TestCgroup| s.cgroup("oom_kills_total", &cg.path);
    agent.scrape_until(Duration::from_secs(15), "the cgroups' OOM kills", |s| {
        metric(s, &app).is_some() && (holder.is_none() || metric(s, &pod).is_some())
    });
    parent.say("go");
    let done = parent.line();
    let killed: u64 = match done.as_slice() {
        [k, killed, _, _] if k == "killed" => killed.parse().unwrap(),
        _ => panic!("pm-work said {done:?}"),
    };
    assert!(
        killed > 0,
        "no child was OOM-killed: the test measured nothing"
    );
    assert_eq!(
        kernel_oom_kills(&app),
        killed,
        "the kernel's count of the victims' cgroup"
    );
    let local = ["memory.events.local", "memory.oom_control"]
        .iter()
        .find_map(|f| memory_file_count(&pod, f, "oom_kill"));
    assert_eq!(
        local,
        Some(0),
        "the kernel's own count of the pod-level cgroup"
    );
    if let Some(hierarchical) = memory_file_count(&pod, "memory.events", "oom_kill") {
        // What podmeter does not read: v2's hierarchical count.
        eprintln!("pod-level memory.events oom_kill {hierarchical} (hierarchical)");
    }
    let s = agent.scrape_until(Duration::from_secs(10), "the kills in podmeter", |s| {
        metric(s, &app) == Some(killed as f64)
    });
    eprintln!(
        "victims' cgroup {:?}, pod-level {:?}, SIGKILLed children {killed}",
        metric(&s, &app),
        metric(&s, &pod)
    );
    if holder.is_some() {
        assert_eq!(
            metric(&s, &pod),
            Some(0.0),
            "the pod-level cgroup's OOM kills"
        );
    }
    assert_eq!(parent.exited(), None, "the parent process died");
}

/// A kill that ends its container, as an OOM-killed main process does:
/// the runtime removes the container's cgroup at once, before a refresh
/// reads its own count, and in a pod that is not restarted (a Job's) the
/// kubelet removes the pod's cgroup a few seconds later. The pod-level
/// cgroup's subtree count (cgroup v2 `memory.events`, hierarchical, which
/// keeps the kills of removed children) has it, equal to the kernel's:
/// read at the container's rmdir (no timed refresh comes: 1 h), and kept
/// through the grace period after the pod's cgroup went. Where memory is
/// cgroup v1 the kernel keeps no such count, and podmeter exports none.
#[test]
fn an_oom_kill_that_ends_its_container_stays_in_the_pods_subtree_count() {
    const UID: &str = "5d1c7b2e-0f3a-4e6b-9c8d-7a6b5c4d3e2f";
    let tree = TestTree::new("signals-oom-gone");
    let pod = tree.cgroup(&format!("kubepods/burstable/pod{UID}"));
    let ctr = tree.cgroup(&format!("kubepods/burstable/pod{UID}/{}", "c0".repeat(32)));
    set_memory_limit(&ctr, 64 << 20);
    let v2 = memory_v1_root().is_none();
    let agent = if v2 {
        Agent::start(&["--refresh-interval", "1h"])
    } else {
        agent()
    };
    let pod_level = [("pod_uid", UID), ("container_id", "")];
    let subtree = |s: &Scrape| s.value("podmeter_container_subtree_oom_kills_total", &pod_level);
    let kernel_pod = || memory_file_count(&pod, "memory.events", "oom_kill");
    if v2 {
        // The pod-level cgroup holds no task, so the kernel counts nothing
        // of it; the pod's count is its one series.
        agent.scrape_until(Duration::from_secs(15), "the pod's OOM kills", |s| {
            subtree(s).is_some()
        });
        assert_eq!(kernel_pod(), Some(0));
    }
    let rmdirs = |s: &Scrape| {
        s.value("podmeter_cgroup_tree_updates_total", &[("source", "rmdir")])
            .unwrap_or(0.0)
    };
    let first = agent.scrape();
    if v2 {
        assert_eq!(subtree(&first), Some(0.0), "no kill yet");
    }

    // The container's only process allocates past the limit and is killed.
    let mut main = ctr.spawn(None, &["alloc", "128"]);
    let status = (0..200)
        .find_map(|_| {
            sleep(Duration::from_millis(100));
            main.exited()
        })
        .expect("the allocating process still runs after 20 s");
    {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }
    // The runtime's part: the container is over, its cgroup goes.
    ctr.remove();

    if v2 {
        assert_eq!(kernel_pod(), Some(1), "the kernel's count of the pod");
        // The kubelet's part, for a pod not restarted: its cgroup goes
        // too, before anything but the container's rmdir read the kill.
        sleep(Duration::from_secs(1));
        pod.remove();
        let after = agent.scrape_until(
            Duration::from_secs(10),
            "both rmdirs, and the kill in the pod's count",
            |s| rmdirs(s) >= rmdirs(&first) + 2.0 && subtree(s) == Some(1.0),
        );
        assert_eq!(
            after.value("podmeter_container_oom_kills_total", &pod_level),
            None,
            "the pod-level row carries the pod's count alone"
        );
        // A refresh with the pod departed keeps its count: a new cgroup's
        // first memory reading is one (scrapes ask for it).
        let other = tree.cgroup("other");
        let mut held = other.spawn(None, &["hold-memory", "1"]);
        assert_eq!(held.line(), ["ready"]);
        let s = agent.scrape_until(Duration::from_secs(10), "a refresh", |s| {
            s.cgroup("memory_working_set_bytes", &other.path).is_some()
        });
        assert_eq!(
            subtree(&s),
            Some(1.0),
            "kept through a refresh after the pod went"
        );
        eprintln!("pod's subtree_oom_kills_total 0 -> 1, kernel memory.events oom_kill 1");
    } else {
        // The agent saw the pod (the dead container's CPU, kept through
        // the grace period), four refreshes went by, and yet no pod count:
        // v1's counts went with the cgroup, and podmeter makes up none.
        let cid = "c0".repeat(32);
        agent.scrape_until(Duration::from_secs(15), "the container's CPU", |s| {
            s.value(
                "podmeter_container_cpu_usage_seconds_total",
                &[("pod_uid", UID), ("container_id", &cid)],
            )
            .is_some()
        });
        sleep(Duration::from_secs(1));
        let s = agent.scrape();
        let any = s.find(
            "podmeter_container_subtree_oom_kills_total",
            &[("pod_uid", UID)],
        );
        assert!(any.is_empty(), "{any:?}");
    }
}

#[test]
fn memory_limit_is_what_was_written() {
    let tree = TestTree::new("signals-limit");
    let limited = tree.cgroup("limited");
    let unlimited = tree.cgroup("unlimited");
    const FIRST: u64 = 200 << 20;
    const SECOND: u64 = 96 << 20;
    set_memory_limit(&limited, FIRST);
    let agent = agent();
    let mut a = limited.spawn(None, &["hold-memory", "4"]);
    let mut b = unlimited.spawn(None, &["hold-memory", "4"]);
    assert_eq!(a.line(), ["ready"]);
    assert_eq!(b.line(), ["ready"]);

    let limit = |s: &Scrape, cg: &TestCgroup| s.cgroup("memory_limit_bytes", &cg.path);
    let s = agent.scrape_until(Duration::from_secs(15), "both cgroups' memory", |s| {
        s.cgroup("memory_working_set_bytes", &limited.path)
            .is_some()
            && s.cgroup("memory_working_set_bytes", &unlimited.path)
                .is_some()
    });
    assert_eq!(limit(&s, &limited), Some(FIRST as f64));
    // Unlimited: v2 `max`, v1 2^63 less a page; either way no series.
    assert_eq!(limit(&s, &unlimited), None, "an unlimited cgroup's limit");

    // A resize shows at the next refresh.
    set_memory_limit(&limited, SECOND);
    let s = agent.scrape_until(Duration::from_secs(10), "the new limit", |s| {
        limit(s, &limited) != Some(FIRST as f64)
    });
    assert_eq!(limit(&s, &limited), Some(SECOND as f64));
    // The kernel's own reading of what was written.
    let dir = memory_dir(&limited);
    let file = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .unwrap();
    let kernel: u64 = fs::read_to_string(file).unwrap().trim().parse().unwrap();
    assert_eq!(kernel, SECOND);
}

/// The `some` and `full` totals of a pressure file, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Totals {
    some: f64,
    full: Option<f64>,
}

const RESOURCES: [&str; 3] = ["cpu", "memory", "io"];

fn psi_file(cg: &TestCgroup, resource: &str) -> Totals {
    let text = fs::read_to_string(cg.dir().join(format!("{resource}.pressure"))).unwrap();
    // Microseconds to seconds as podmeter converts them: the exposition
    // prints the shortest decimal that round-trips, so equal integers
    // compare equal.
    let total = |kind: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(kind))
            .map(|l| {
                let t = l.split_whitespace().find_map(|f| f.strip_prefix("total="));
                t.unwrap().parse::<u64>().unwrap() as f64 / 1e6
            })
    };
    Totals {
        some: total("some").expect("a some line"),
        full: total("full"),
    }
}

fn psi_metric(s: &Scrape, path: &str, resource: &str) -> (Option<f64>, Option<f64>) {
    (
        s.cgroup(&format!("pressure_{resource}_waiting_seconds_total"), path),
        s.cgroup(&format!("pressure_{resource}_stalled_seconds_total"), path),
    )
}

/// Scrapes until `path`'s CPU waiting total has changed twice. The second
/// change comes from a refresh that started after the first change was
/// published, i.e. after this was called: its reads are fresher than
/// anything read before the call.
fn scrape_two_refreshes_later(agent: &Agent, path: &str) -> Scrape {
    let waiting = |s: &Scrape| psi_metric(s, path, "cpu").0;
    let mut last = waiting(&agent.scrape());
    let mut changes = 0;
    for _ in 0..200 {
        sleep(Duration::from_millis(50));
        let s = agent.scrape();
        if waiting(&s) != last {
            changes += 1;
            last = waiting(&s);
            if changes == 2 {
                return s;
            }
        }
    }
    panic!("{path}'s cpu waiting total did not change twice in 10 s: {last:?}");
}

#[test]
fn pressure_totals_equal_the_files() {
    let tree = TestTree::new("signals-psi");
    let busy = tree.cgroup("busy");
    if !busy.dir().join("cpu.pressure").exists() {
        // No PSI in this kernel (CONFIG_PSI off, psi=0): no series at all.
        let agent = agent();
        let _burner = busy.spawn(None, &["burn"]);
        let s = agent.scrape_until(Duration::from_secs(15), "the burner", |s| {
            s.cgroup("cpu_usage_seconds_total", &busy.path).is_some()
        });
        assert!(
            !s.text.contains("_pressure_"),
            "pressure families without PSI:\n{}",
            s.text
        );
        eprintln!("no PSI here: checked that no pressure family is exported");
        return;
    }
    let agent = agent();
    // Three burners on one CPU: two of them wait at any time, so the
    // cgroup's CPU `some` total grows by about the wall time.
    let burners: Vec<_> = (0..3)
        .map(|_| busy.spawn(None, &["--cpu", "0", "burn"]))
        .collect();
    agent.scrape_until(Duration::from_secs(15), "the burners' pressure", |s| {
        psi_metric(s, &busy.path, "cpu").0.is_some()
    });

    let measure = || {
        let before: Vec<Totals> = RESOURCES.iter().map(|r| psi_file(&busy, r)).collect();
        let s = scrape_two_refreshes_later(&agent, &busy.path);
        let after: Vec<Totals> = RESOURCES.iter().map(|r| psi_file(&busy, r)).collect();
        for (i, r) in RESOURCES.iter().enumerate() {
            let (some, full) = psi_metric(&s, &busy.path, r);
            let (b, a) = (before[i], after[i]);
            eprintln!("{r}: file {b:?} ≤ podmeter ({some:?}, {full:?}) ≤ file {a:?}");
            let some = some.unwrap_or_else(|| panic!("no {r} waiting total"));
            assert!(
                b.some <= some && some <= a.some,
                "{r} some: {some} not within [{}, {}]",
                b.some,
                a.some
            );
            // A full line in the file, a full series; none, none.
            assert_eq!(full.is_some(), a.full.is_some(), "{r} full");
            if let (Some(full), Some(bf), Some(af)) = (full, b.full, a.full) {
                assert!(
                    bf <= full && full <= af,
                    "{r} full: {full} not within [{bf}, {af}]"
                );
            }
        }
        s
    };
    let start = std::time::Instant::now();
    let first = measure();
    sleep(Duration::from_secs(3));
    let second = measure();
    let wall = start.elapsed().as_secs_f64();
    let waiting = |s: &Scrape| psi_metric(s, &busy.path, "cpu").0.unwrap();
    let grew = waiting(&second) - waiting(&first);
    eprintln!("cpu waiting grew {grew:.3} s in at most {wall:.3} s of wall time");
    // Two of three always wait: `some` is nearly the wall time. Half of it
    // at least, or the burners did not contend (and nothing was measured).
    assert!(
        grew >= 0.5 * 3.0,
        "cpu waiting grew only {grew:.3} s in over 3 s with 3 burners on one CPU"
    );

    // The root: the system's pressure, without the CPU full line the
    // kernel prints as zeros there. Only where root tasks ran (reported).
    if second.cgroup("cpu_usage_seconds_total", "/").is_some() {
        let (some, full) = psi_metric(&second, "/", "cpu");
        eprintln!("root: cpu waiting {some:?}, stalled {full:?}");
        assert!(some.is_some_and(|v| v > 0.0), "root cpu waiting: {some:?}");
        assert_eq!(full, None, "root cpu stalled");
    } else {
        eprintln!("no task ran in the root cgroup: root not checked");
    }

    drop(burners);

    // A cgroup whose pressure accounting is switched off (Linux 6.3+)
    // hides its files: its series go, the rest stays.
    let quiet = tree.cgroup("quiet");
    let switch = quiet.dir().join("cgroup.pressure");
    if !switch.exists() {
        eprintln!("no cgroup.pressure on this kernel: per-cgroup switch not checked");
        return;
    }
    let mut idle = quiet.spawn(None, &["hold-memory", "1"]);
    assert_eq!(idle.line(), ["ready"]);
    agent.scrape_until(
        Duration::from_secs(15),
        "the quiet cgroup's pressure",
        |s| psi_metric(s, &quiet.path, "cpu").0.is_some(),
    );
    fs::write(&switch, "0").unwrap();
    let s = agent.scrape_until(Duration::from_secs(10), "its pressure series to go", |s| {
        RESOURCES
            .iter()
            .all(|r| psi_metric(s, &quiet.path, r) == (None, None))
    });
    assert!(
        s.cgroup("cpu_usage_seconds_total", &quiet.path).is_some(),
        "its other families stay"
    );
    eprintln!("cgroup.pressure 0: the cgroup's pressure series went, the rest stayed");
    assert_eq!(
        s.value(
            "podmeter_scrape_collector_success",
            &[("collector", "pressure")]
        ),
        Some(1.0),
        "hidden files are not a failure"
    );
}
