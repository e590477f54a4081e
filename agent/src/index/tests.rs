//! The index's state machine, driven with an injected clock and no kernel.

use super::*;
use crate::cgroup::cpu::Cfs;

const GRACE: Duration = Duration::from_secs(90);

fn state() -> IndexState {
    let mounts = Mounts::nowhere();
    IndexState::new(mounts, GRACE)
}

fn created(id: u64, path: &str) -> TreeEvent {
    TreeEvent::Created {
        id,
        path: path.into(),
    }
}

fn memory(m: u64) -> impl Fn(&Cgroup) -> Read {
    move |_| Read {
        stats: Stats {
            memory: Some(m),
            ..Stats::default()
        },
        errors: [None, None],
    }
}

fn secs(t0: Instant, s: u64) -> Instant {
    t0 + Duration::from_secs(s)
}

#[test]
fn events_make_and_depart_cgroups() {
    let mut s = state();
    let t0 = Instant::now();
    let c = s.apply(
        &[
            created(1, "/a"),
            created(
                2,
                "/kubepods/burstable/pod1b2c3d4e-0000-4000-8000-000000000001",
            ),
        ],
        t0,
    );
    assert_eq!((c.created, c.departed, c.cgroups), (2, 0, 2));
    assert!(matches!(
        s.index().get(2).unwrap().identity,
        Identity::Pod(_)
    ));
    let c = s.apply(&[TreeEvent::Removed { id: 1 }], t0);
    assert_eq!((c.created, c.departed, c.cgroups), (0, 1, 1));
    assert!(!s.index().is_live(1));
    assert!(
        s.index().get(1).is_some(),
        "departed cgroups keep their record"
    );
    // An rmdir for an unknown id changes nothing.
    let c = s.apply(&[TreeEvent::Removed { id: 9 }], t0);
    assert_eq!(c.departed, 0);
    assert_eq!(s.index().tree_updates, [2, 2, 0]);
}

#[test]
fn a_departed_cgroup_with_counters_stays_for_the_grace_period_then_retires() {
    let mut s = state();
    let t0 = Instant::now();
    s.apply(&[created(1, "/a"), created(2, "/b")], t0);
    s.refresh(&[1, 2], t0, true, memory(5));
    s.apply(&[TreeEvent::Removed { id: 1 }], secs(t0, 10));

    let c = s.refresh(&[1, 2], secs(t0, 99), true, memory(5));
    assert!(c.retired.is_empty(), "89 s after departure: within grace");
    assert!(s.index().get(1).is_some());
    assert_eq!(
        s.index().stats(1).unwrap().memory,
        Some(5),
        "last reading kept"
    );

    let c = s.refresh(&[1, 2], secs(t0, 100), true, memory(5));
    assert_eq!(c.retired, [1]);
    assert!(s.index().get(1).is_none());
    assert_eq!(s.index().counts(), [1, 0, 0]);
}

#[test]
fn a_departed_cgroup_without_counters_goes_at_the_next_refresh() {
    let mut s = state();
    let t0 = Instant::now();
    s.apply(&[created(1, "/a"), created(2, "/b")], t0);
    s.apply(&[TreeEvent::Removed { id: 2 }], t0);
    let c = s.refresh(&[1], secs(t0, 1), true, memory(1));
    assert_eq!((c.dropped, c.retired.len()), (1, 0));
    assert_eq!(s.index().counts(), [1, 0, 0]);
}

#[test]
fn churn_leaves_nothing_behind() {
    let mut s = state();
    let t0 = Instant::now();
    // 10,000 cgroups come and go, a tenth of them counted.
    for i in 0..10_000u64 {
        let t = t0 + Duration::from_millis(i);
        s.apply(&[created(i, &format!("/churn/{i}"))], t);
        s.apply(&[TreeEvent::Removed { id: i }], t);
    }
    let counted: Vec<u64> = (0..10_000).filter(|i| i % 10 == 0).collect();
    let c = s.refresh(&counted, secs(t0, 11), true, memory(0));
    assert_eq!(c.dropped, 9_000);
    assert_eq!(s.index().counts(), [0, 1_000, 0]);
    let c = s.refresh(&counted, secs(t0, 200), true, memory(0));
    assert_eq!(c.retired.len(), 1_000);
    assert_eq!(s.index().counts(), [0, 0, 0]);
    // The caller forgot them in the kernel: the next refresh sees none.
    s.refresh(&[], secs(t0, 215), true, memory(0));
    assert_eq!(s.index().counts(), [0, 0, 0]);
}

#[test]
fn an_unknown_counted_id_asks_for_a_walk_once_then_retires_after_grace() {
    let mut s = state();
    let t0 = Instant::now();
    let c = s.refresh(&[7], t0, true, memory(0));
    assert!(c.want_walk);
    assert!(s.index().is_unresolved(7));
    let c = s.refresh(&[7], secs(t0, 15), true, memory(0));
    assert!(!c.want_walk, "asked once, not at every refresh");
    let c = s.refresh(&[7], secs(t0, 90), true, memory(0));
    assert_eq!(c.retired, [7]);
    assert!(!s.index().is_unresolved(7));
}

#[test]
fn a_walk_finds_what_events_missed() {
    let mut s = state();
    let t0 = Instant::now();
    s.refresh(&[7], t0, true, memory(0));
    assert!(s.index().is_unresolved(7));
    let paths = IdMap::from_iter([(7, "/late".to_owned()), (1, "/".to_owned())]);
    let c = s.rescan(Ok(paths), secs(t0, 1));
    assert_eq!((c.created, c.cgroups), (2, 2));
    assert!(s.index().is_live(7) && !s.index().is_unresolved(7));
    // A second walk without 7: it departed.
    let c = s.rescan(Ok(IdMap::from_iter([(1, "/".to_owned())])), secs(t0, 2));
    assert_eq!((c.created, c.departed), (0, 1));
    assert_eq!(s.index().tree_updates[2], 2);
}

#[test]
fn a_failed_walk_is_remembered_until_one_succeeds() {
    let mut s = state();
    let t0 = Instant::now();
    s.rescan(Err(io::Error::other("EIO")), t0);
    assert_eq!(s.index().rescan_error.as_deref(), Some("EIO"));
    s.rescan(Ok(IdMap::default()), t0);
    assert_eq!(s.index().rescan_error, None);
}

#[test]
fn only_new_cgroups_are_read_between_timed_refreshes() {
    let mut s = state();
    let t0 = Instant::now();
    s.apply(&[created(1, "/a")], t0);
    let c = s.refresh(&[1], t0, true, memory(1));
    assert_eq!(c.read, 1);
    s.apply(&[created(2, "/b")], t0);
    let c = s.refresh(&[1, 2], t0, false, memory(2));
    assert_eq!(c.read, 1, "only the new one");
    assert_eq!(s.index().stats(1).unwrap().memory, Some(1));
    assert_eq!(s.index().stats(2).unwrap().memory, Some(2));
}

#[test]
fn read_errors_count_unless_the_cgroup_is_gone() {
    let mut s = state();
    let t0 = Instant::now();
    s.apply(&[created(1, "/a"), created(2, "/b")], t0);
    s.apply(&[created(3, "/c")], t0);
    let c = s.refresh(&[1, 2, 3], t0, true, |c: &Cgroup| match c.path.as_str() {
        "/a" => Read {
            errors: [Some(io::Error::from_raw_os_error(libc::ENODEV)), None],
            ..Read::default()
        },
        // Pressure fails, memory is read: each group of files on its own.
        "/b" => Read {
            stats: Stats {
                memory: Some(9),
                ..Stats::default()
            },
            errors: [None, Some(io::Error::from_raw_os_error(libc::EACCES))],
        },
        _ => Read {
            errors: [Some(io::Error::from_raw_os_error(libc::EIO)), None],
            ..Read::default()
        },
    });
    assert_eq!(c.read, 3);
    let [(failed, last), (p_failed, p_last)] = &s.index().read_errors;
    assert_eq!(*failed, 1, "ENODEV (gone) is no failure");
    assert!(last.as_deref().unwrap().contains("Input/output"), "{last:?}");
    assert_eq!(*p_failed, 1);
    assert!(p_last.as_deref().unwrap().contains("denied"), "{p_last:?}");
    assert_eq!(s.index().stats(2).unwrap().memory, Some(9));
}

#[test]
fn snapshots_are_immutable_and_numbered() {
    let mut s = state();
    let t0 = Instant::now();
    let before = s.snapshot();
    s.apply(&[created(1, "/a")], t0);
    let after = s.snapshot();
    assert!(
        before.get(1).is_none(),
        "a published snapshot never changes"
    );
    assert!(after.get(1).is_some());
    assert!(after.generation > before.generation);
}

/// A fake cgroup2 tree in a temporary directory: `/a` with the files of a
/// pure v2 host with PSI.
fn fake_tree(tag: &str) -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!("podmeter-index-{}-{tag}", std::process::id()));
    let a = root.join("a");
    std::fs::create_dir_all(&a).unwrap();
    for (name, text) in [
        ("memory.current", "1000\n"),
        ("memory.stat", "inactive_file 100\n"),
        ("memory.max", "4096\n"),
        ("memory.events.local", "oom 2\noom_kill 2\n"),
        ("memory.events", "oom 5\noom_kill 5\n"),
        (
            "cpu.pressure",
            "some avg10=1.00 avg60=0.00 avg300=0.00 total=300\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=20\n",
        ),
        ("memory.pressure", "some total=7\nfull total=3\n"),
        ("io.pressure", "some total=9\nfull total=4\n"),
    ] {
        std::fs::write(a.join(name), text).unwrap();
    }
    root
}

fn cgroup_in(root: &std::path::Path) -> Cgroup {
    pod_level_in(root, false, false)
}

/// `/a` as a cgroup whose subtree's OOM kills are read (`pod_level`), on a
/// mount with `memory_localevents` or without.
fn pod_level_in(root: &std::path::Path, pod_level: bool, local_events: bool) -> Cgroup {
    let mounts = Mounts {
        unified: root.to_owned(),
        memory_v1: None,
        cpu_v1: None,
        unified_shows: Some("/".into()),
        psi: true,
        memory_local_events: local_events,
    };
    Cgroup {
        path: "/a".into(),
        identity: Identity::Host,
        first_seen: Instant::now(),
        files: CgroupFiles::new(&mounts, "/a", pod_level),
    }
}

#[test]
fn read_stats_reads_every_file_and_each_group_fails_alone() {
    use crate::cgroup::pressure::Totals;
    let root = fake_tree("read");
    let r = read_stats(&cgroup_in(&root));
    assert!(r.errors.iter().all(Option::is_none), "{:?}", r.errors);
    let s = r.stats;
    assert_eq!(
        (s.memory, s.memory_limit, s.oom_kills),
        (Some(900), Some(4096), Some(2)),
        "the local count, not the hierarchical one"
    );
    assert_eq!(s.subtree_oom_kills, None, "not a pod-level cgroup");
    // A pod-level cgroup's subtree count is the hierarchical one; under
    // memory_localevents there is none to read.
    let pod = read_stats(&pod_level_in(&root, true, false)).stats;
    assert_eq!((pod.oom_kills, pod.subtree_oom_kills), (Some(2), Some(5)));
    let local = read_stats(&pod_level_in(&root, true, true)).stats;
    assert_eq!((local.oom_kills, local.subtree_oom_kills), (Some(2), None));
    assert_eq!(
        s.pressure.cpu,
        Some(Totals {
            some_us: 300,
            full_us: Some(20)
        })
    );
    assert_eq!(s.pressure.io.unwrap().full_us, Some(4));

    // No io.pressure: the pressure group fails, memory is still read.
    std::fs::remove_file(root.join("a/io.pressure")).unwrap();
    let r = read_stats(&cgroup_in(&root));
    assert_eq!(r.stats.oom_kills, Some(2));
    assert_eq!(r.stats.memory, Some(900));
    assert!(r.errors[FileGroup::Memory as usize].is_none());
    let e = r.errors[FileGroup::Pressure as usize].as_ref().unwrap();
    assert!(is_gone(e), "{e}");
    assert_eq!(r.stats.pressure, Pressure::default());

    // No memory controller (v2: no memory.current): nothing of memory.
    std::fs::remove_file(root.join("a/memory.current")).unwrap();
    let r = read_stats(&cgroup_in(&root));
    assert_eq!((r.stats.memory_limit, r.stats.oom_kills), (None, None));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn throttling_reads_shared_among_threads_find_what_one_thread_finds() {
    let root = std::env::temp_dir().join(format!("podmeter-index-{}-thr", std::process::id()));
    let mounts = Mounts {
        unified: root.clone(),
        memory_v1: None,
        cpu_v1: None,
        unified_shows: Some("/".into()),
        psi: false,
        memory_local_events: false,
    };
    let mut index = Index::default();
    // 600 limited cgroups (more than one thread's share); every 100th has
    // a cpu.stat that cannot be read (a directory: a failure), every 50th
    // none (gone: not a failure); one more is not limited.
    for i in 0..601u64 {
        let dir = root.join(format!("c{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        if i % 100 == 7 {
            std::fs::create_dir(dir.join("cpu.stat")).unwrap();
        } else if i % 50 != 3 {
            let stat = format!(
                "usage_usec 9\nnr_periods {i}\nnr_throttled {}\nthrottled_usec {}\n",
                i / 2,
                i * 10
            );
            std::fs::write(dir.join("cpu.stat"), stat).unwrap();
        }
        let path = format!("/c{i}");
        let cgroup = Cgroup {
            files: CgroupFiles::new(&mounts, &path, false),
            path,
            identity: Identity::Host,
            first_seen: Instant::now(),
        };
        index.live.insert(i, Arc::new(cgroup));
        let limit = (i != 600).then_some(cpu::Limit::Cores(0.5));
        index.stats.insert(i, Stats { limit, ..Stats::default() });
    }

    // Nothing limited: nothing read, and `first` still runs.
    let (seven, none) = Index::default().throttling_beside(2, None, || 7);
    assert_eq!((seven, none), (7, Some(ThrottlingRead::default())));
    let ((), Some(one)) = index.throttling_beside(1, None, || ()) else {
        panic!("a reading thread panicked");
    };
    assert_eq!(one.failed, 6, "{:?}", one.last_error);
    assert_eq!((one.files, one.walked, one.helpers), (600, 0, 0));
    assert_eq!(one.gone, 12, "every 50th has no cpu.stat");
    let one = one.counters;
    assert_eq!(one.len(), 600 - 6 - 12);
    assert_eq!(one[&42].periods, 42);
    assert_eq!(one[&42].throttled_periods, 21);
    assert!((one[&42].throttled_seconds - 0.00042).abs() < 1e-12);
    assert!(!one.contains_key(&600), "not limited, not read");
    for (threads, helpers) in [(2, 1), (3, 2), (16, 4)] {
        // `first` runs on the caller's thread while the others read: as
        // many as `threads` allows, one per 128 cgroups at most.
        let caller = std::thread::current().id();
        let (ran_on, read) = index.throttling_beside(threads, None, || std::thread::current().id());
        assert_eq!(ran_on, caller);
        let Some(many) = read else {
            panic!("a reading thread panicked on {threads} threads");
        };
        assert_eq!(many.helpers, helpers, "on {threads} threads");
        assert_eq!(many.counters, one, "on {threads} threads");
        assert_eq!((many.failed, many.files), (6, 600));
        assert!(many.last_error.is_some());
    }

    // A walk gives what it has (exact: v2 prints whole microseconds), and
    // only the rest are read from files: here every 3rd cgroup, with
    // counters that differ from its file's, and one not limited.
    let walked = |i: u64| Cfs {
        periods: 1000 + i,
        throttled_periods: i,
        throttled_ns: 1_234_567 * i + 999,
    };
    let walk = CfsWalk {
        cgroups: (0..601).filter(|i| i % 3 == 0).map(|i| (i, walked(i))).collect(),
        complete: true,
    };
    let ((), Some(mixed)) = index.throttling_beside(2, Some(&walk), || ()) else {
        panic!("a reading thread panicked");
    };
    assert_eq!((mixed.walked, mixed.files), (200, 400));
    // The unreadable cpu.stat files of 7, 107, … are not read when walked.
    let unreadable_walked = (0..600).filter(|i| i % 100 == 7 && i % 3 == 0).count();
    assert_eq!(mixed.failed, 6 - unreadable_walked);
    for i in 0..600 {
        let got = mixed.counters.get(&i);
        if i % 3 == 0 {
            let ns = walked(i).throttled_ns;
            let want = Throttling {
                periods: 1000 + i,
                throttled_periods: i,
                throttled_seconds: (ns / 1000) as f64 / 1e6,
            };
            assert_eq!(got, Some(&want), "cgroup {i}, walked");
        } else {
            assert_eq!(got, one.get(&i), "cgroup {i}, from its file");
        }
    }
    assert!(!mixed.counters.contains_key(&600), "not limited, not taken from the walk");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A pod that is not restarted (a Job's) loses its pod-level cgroup seconds
/// after an OOM kill ends its container, often before a refresh: the
/// container's rmdir reads the pod's subtree count at once, and the count
/// stays through the grace period after the pod's own cgroup goes, then
/// goes without a counter to delete.
#[test]
fn a_containers_rmdir_reads_its_pods_oom_kills_which_outlive_the_pod_for_the_grace_period() {
    const POD: &str = "/kubepods/burstable/pod5d1c7b2e-0f3a-4e6b-9c8d-7a6b5c4d3e2f";
    let root = std::env::temp_dir().join(format!("podmeter-index-{}-rmdir", std::process::id()));
    let ctr = format!("{POD}/{}", "c0".repeat(32));
    let pod_dir = root.join(POD.trim_start_matches('/'));
    std::fs::create_dir_all(root.join(ctr.trim_start_matches('/'))).unwrap();
    std::fs::create_dir_all(root.join("host")).unwrap();
    let kills = |n: u64| {
        std::fs::write(pod_dir.join("memory.events"), format!("oom 1\noom_kill {n}\n")).unwrap();
    };
    kills(0);
    let mut s = IndexState::new(
        Mounts {
            unified: root.clone(),
            ..state().mounts
        },
        GRACE,
    );
    let pod_kills = |s: &IndexState| -> Vec<(u64, u64)> {
        let mut v: Vec<_> = s.index().subtree_oom_kills().map(|(id, _, k)| (id, k)).collect();
        v.sort_unstable();
        v
    };
    let t0 = Instant::now();
    // 1: a host cgroup, 2: the pod, 3: its container (counted).
    s.apply(&[created(1, "/host"), created(2, POD), created(3, &ctr)], t0);
    s.refresh(&[1, 3], t0, true, memory(5));
    assert_eq!(pod_kills(&s), [(2, 0)]);

    // The kill: a host cgroup's rmdir reads nothing, the container's does.
    kills(1);
    s.apply(&[TreeEvent::Removed { id: 1 }], secs(t0, 1));
    assert_eq!(pod_kills(&s), [(2, 0)], "not the pod's container");
    s.apply(&[TreeEvent::Removed { id: 3 }], secs(t0, 1));
    assert_eq!(pod_kills(&s), [(2, 1)], "read at the container's rmdir");

    // The pod's own cgroup goes (its files with it); a timed refresh that
    // meets it gone before its rmdir arrives keeps what was read.
    std::fs::remove_file(pod_dir.join("memory.events")).unwrap();
    // An open file of a removed cgroup fails (ENODEV), a removed regular
    // file's does not: closed for good, it fails as the cgroup's would.
    s.index().get(2).unwrap().files.close();
    let c = s.refresh(&[3], secs(t0, 2), true, memory(5));
    assert_eq!(pod_kills(&s), [(2, 1)], "a refresh after the pod went");
    assert_eq!(c.dropped, 1, "the host cgroup, uncounted, goes at once");
    s.apply(&[TreeEvent::Removed { id: 2 }], secs(t0, 2));
    let c = s.refresh(&[3], secs(t0, 3), false, memory(5));
    assert_eq!(c.dropped, 0);
    assert_eq!(pod_kills(&s), [(2, 1)], "kept after the pod went");
    assert!(!s.index().is_live(2));
    let c = s.refresh(&[3], secs(t0, 91), true, memory(5));
    assert_eq!(pod_kills(&s), [(2, 1)], "89 s after: within grace");
    assert_eq!((c.dropped, c.retired), (0, vec![3]), "the container's counters retire");

    let c = s.refresh(&[], secs(t0, 92), true, memory(5));
    assert_eq!((c.dropped, c.retired.len()), (1, 0), "nothing to delete");
    assert!(pod_kills(&s).is_empty());
    assert_eq!(s.index().counts(), [0, 0, 0]);
    let _ = std::fs::remove_dir_all(&root);
}
