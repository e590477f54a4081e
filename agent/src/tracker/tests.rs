//! The scrape path with a fake counter source, a fed index and no kernel.

use std::{
    sync::{Arc, Barrier, atomic::AtomicU64},
    thread,
};

use super::*;
use crate::{
    cgroup::Mounts,
    counters::fake::FakeCounters,
    cgroup::pressure::Totals,
    index::{IndexState, Read, Stats, TreeEvent},
};

fn mounts() -> Mounts {
    Mounts::nowhere()
}

fn cpu(t: u64) -> CpuCounters {
    CpuCounters {
        time_ns: t,
        switches: 1,
        ..CpuCounters::default()
    }
}

fn created(id: u64, path: &str) -> TreeEvent {
    TreeEvent::Created {
        id,
        path: path.into(),
    }
}

fn reading(cpu_ids: &[u64]) -> Reading {
    Reading {
        cpu: Ok(cpu_ids.iter().map(|&id| (id, cpu(id))).collect()),
        wait_hist: Ok(IdMap::default()),
        net: Ok(IdMap::default()),
        dropped: [0, 0],
    }
}

#[test]
fn join_makes_rows_for_known_ids_and_asks_for_a_walk_for_unknown_ones() {
    let t0 = Instant::now();
    let mut s = IndexState::new(mounts(), Duration::from_secs(90));
    s.apply(&[created(1, "/a"), created(2, "/b")], t0);
    s.refresh(&[1, 2], t0, true, |_| Read {
        stats: Stats {
            memory: Some(7),
            limit: Some(cpu::Limit::Cores(0.5)),
            memory_limit: Some(1 << 30),
            oom_kills: Some(2),
            ..Stats::default()
        },
        errors: [None, None],
    });
    let idx = s.snapshot();
    let namer = Namer::new(None, 0, Duration::ZERO);

    let j = join(&idx, &reading(&[1, 2]), &mut namer.session(&idx), t0);
    assert_eq!(j.rows.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(j.rows[0].memory, Some(7));
    assert_eq!(j.rows[0].cpu_limit, Some(0.5));
    assert_eq!(j.rows[0].memory_limit, Some(1 << 30));
    assert_eq!(j.rows[0].oom_kills, Some(2));
    assert_eq!((j.live, j.want), (2, None));

    let j = join(&idx, &reading(&[1, 2, 3]), &mut namer.session(&idx), t0);
    assert_eq!(j.rows.len(), 2, "no row for an id the index lacks");
    assert_eq!(j.want, Some(Want::Walk));
}

#[test]
fn join_asks_to_read_new_cgroups_and_departed_ones_lose_their_limit() {
    let t0 = Instant::now();
    let mut s = IndexState::new(mounts(), Duration::from_secs(90));
    s.apply(&[created(1, "/a")], t0);
    s.refresh(&[1], t0, true, |_| Read {
        stats: Stats {
            memory: Some(1),
            limit: Some(cpu::Limit::Cores(2.0)),
            memory_limit: Some(1 << 20),
            oom_kills: Some(1),
            subtree_oom_kills: Some(3),
            pressure: Pressure {
                cpu: Some(Totals {
                    some_us: 5,
                    full_us: None,
                }),
                ..Pressure::default()
            },
        },
        errors: [None, None],
    });
    s.apply(&[created(2, "/b"), TreeEvent::Removed { id: 1 }], t0);
    let idx = s.snapshot();
    let namer = Namer::new(None, 0, Duration::ZERO);
    let j = join(&idx, &reading(&[1, 2]), &mut namer.session(&idx), t0);
    assert_eq!(j.want, Some(Want::Read));
    let departed = &j.rows[0];
    assert_eq!(
        (departed.id, departed.memory, departed.cpu_limit),
        (1, Some(1), None)
    );
    // Counters keep their last values through the grace period; the
    // memory limit, like the CPU limit, is the live cgroup's.
    assert_eq!(
        (
            departed.oom_kills,
            departed.subtree_oom_kills,
            departed.pressure.cpu.unwrap().some_us
        ),
        (Some(1), Some(3), 5)
    );
    assert_eq!(departed.memory_limit, None);
    assert_eq!(j.live, 1);
}

#[test]
fn an_unread_wait_histogram_is_none_and_a_missing_entry_zeros() {
    let t0 = Instant::now();
    let mut s = IndexState::new(mounts(), Duration::from_secs(90));
    s.apply(&[created(1, "/a"), created(2, "/b")], t0);
    s.refresh(&[1, 2], t0, true, |_| Read::default());
    let idx = s.snapshot();
    let namer = Namer::new(None, 0, Duration::ZERO);
    let h = WaitHistogram {
        counts: [1, 2, 3, 4, 5, 6, 7, 8],
    };
    let mut r = reading(&[1, 2]);
    r.wait_hist = Ok(IdMap::from_iter([(1, h)]));
    let j = join(&idx, &r, &mut namer.session(&idx), t0);
    assert_eq!(j.rows[0].wait_hist, Some(h));
    assert_eq!(j.rows[1].wait_hist, Some(WaitHistogram::default()));
    // A failed read: no histogram, rather than one fallen to zero.
    r.wait_hist = Err("fake".into());
    let j = join(&idx, &r, &mut namer.session(&idx), t0);
    assert!(j.rows.iter().all(|row| row.wait_hist.is_none()));
}

#[test]
fn state_counts_follow_the_reading_the_rows_come_from() {
    // The refresher deletes a retired cgroup's counters, then publishes the
    // index without it: a scrape may hold the older index with the newer
    // reading. The cgroup then has no row, and is not counted as departed.
    let t0 = Instant::now();
    let mut s = IndexState::new(mounts(), Duration::from_secs(90));
    s.apply(&[created(1, "/a"), created(2, "/b")], t0);
    s.refresh(&[1, 2, 9], t0, true, |_| Read::default());
    s.apply(&[TreeEvent::Removed { id: 2 }], t0);
    let idx = s.snapshot();
    assert_eq!(idx.counts(), [1, 1, 1]);
    let namer = Namer::new(None, 0, Duration::ZERO);

    let j = join(&idx, &reading(&[1, 2, 9]), &mut namer.session(&idx), t0);
    assert_eq!((j.rows.len(), j.live, j.departed, j.unresolved), (2, 1, 1, 1));
    assert_eq!(j.want, None, "an unresolved id is known, not a reason to walk");

    let j = join(&idx, &reading(&[1]), &mut namer.session(&idx), t0);
    assert_eq!((j.rows.len(), j.live, j.departed, j.unresolved), (1, 1, 0, 0));
    assert_eq!(j.want, None);
}

fn tracker(
    counters: Arc<FakeCounters>,
) -> (Tracker, watch::Sender<Arc<Index>>, mpsc::Receiver<Want>) {
    let (tx, rx) = watch::channel(Arc::new(Index::default()));
    let (wants, wanted) = mpsc::channel(4);
    let health = Arc::new(Health::new(
        Duration::from_secs(15),
        Duration::from_secs(60),
        Instant::now(),
    ));
    let t = Tracker::new(
        rx,
        counters,
        Namer::new(None, 0, Duration::ZERO),
        wants,
        health,
    );
    (t, tx, wanted)
}

#[test]
fn a_failing_map_is_reported_and_the_other_still_exported() {
    let counters = Arc::new(FakeCounters::default());
    let (t, publish, mut wanted) = tracker(counters.clone());
    let mut s = IndexState::new(mounts(), Duration::from_secs(90));
    s.apply(&[created(1, "/a")], Instant::now());
    s.refresh(&[1], Instant::now(), true, |_| Read::default());
    publish.send_replace(s.snapshot());
    counters.state().net.insert(
        1,
        NetCounters {
            tx_bytes: 5,
            ..Default::default()
        },
    );
    counters.state().cpu.insert(1, cpu(10));

    let snap = t.snapshot();
    assert!(snap.collectors.iter().flatten().all(Result::is_ok));
    assert_eq!(snap.rows[0].cpu, Some(cpu(10)));

    counters.state().cpu_fails = true;
    let snap = t.snapshot();
    let cpu_ok = &snap.collectors[COLLECTORS.iter().position(|c| *c == "cpu").unwrap()];
    assert!(matches!(cpu_ok, Some(Err(e)) if e.contains("fake map read failure")));
    assert_eq!(snap.rows.len(), 1, "traffic still exported");
    assert_eq!(
        (snap.rows[0].cpu, snap.rows[0].net.unwrap().tx_bytes),
        (None, 5)
    );
    assert_eq!(snap.collectors[2], None, "no API: no kubernetes collector");
    assert!(wanted.try_recv().is_err(), "nothing to ask");
}

#[test]
fn an_unknown_id_reaches_the_refresher_as_a_walk_request() {
    let counters = Arc::new(FakeCounters::default());
    let (t, _publish, mut wanted) = tracker(counters.clone());
    counters.state().cpu.insert(42, cpu(1));
    for _ in 0..10 {
        t.snapshot();
    }
    assert_eq!(wanted.try_recv(), Ok(Want::Walk));
    // Requests coalesce in the channel: it never holds more than its size.
    let mut n = 1;
    while wanted.try_recv().is_ok() {
        n += 1;
    }
    assert!(n <= 4, "{n} requests queued");
}

/// The scrape path and the refresher's retirements run at once, from many
/// threads, with a retirement at every step: before the split into owners
/// this took two locks in opposite orders and deadlocked. Finishing at all
/// is the check; then nothing of the retired ids is left anywhere.
#[test]
fn concurrent_scrapes_and_retirements_neither_deadlock_nor_leak() {
    const SCRAPERS: usize = 8;
    const ROUNDS: u64 = 400;
    let counters = Arc::new(FakeCounters::default());
    let (t, publish, _wanted) = tracker(counters.clone());
    let t = Arc::new(t);
    let start = Arc::new(Barrier::new(SCRAPERS + 1));
    let done = Arc::new(AtomicBool::new(false));
    let scraped = Arc::new(AtomicU64::new(0));
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            let (t, start, done) = (t.clone(), start.clone(), done.clone());
            let scraped = scraped.clone();
            thread::spawn(move || {
                start.wait();
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    t.snapshot();
                    n += 1;
                    scraped.fetch_add(1, Ordering::Relaxed);
                }
                n
            })
        })
        .collect();

    let mut s = IndexState::new(mounts(), Duration::ZERO);
    let t0 = Instant::now();
    start.wait();
    for round in 0..ROUNDS {
        // Halfway, until a scrape has run: on a loaded machine the rounds
        // could otherwise all end before any scraper is scheduled, and
        // nothing would have raced them.
        if round == ROUNDS / 2 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while scraped.load(Ordering::Relaxed) == 0 {
                assert!(Instant::now() < deadline, "no scraper ran in 30 s");
                thread::yield_now();
            }
        }
        let now = t0 + Duration::from_millis(round);
        let id = round + 1;
        s.apply(&[created(id, &format!("/kubepods/pod{id}"))], now);
        counters.state().cpu.insert(id, cpu(round));
        publish.send_replace(s.snapshot());
        s.apply(&[TreeEvent::Removed { id }], now);
        let counted = {
            let mut ids: Vec<u64> = counters.state().cpu.keys().copied().collect();
            ids.sort_unstable();
            ids
        };
        let changes = s.refresh(&counted, now, true, |_| Read::default());
        counters.forget(&changes.retired);
        publish.send_replace(s.snapshot());
    }
    done.store(true, Ordering::Relaxed);
    let scrapes: u64 = scrapers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(scrapes > 0);
    // One more scrape prunes the sticky names to the final index.
    t.snapshot();
    assert_eq!(s.index().counts(), [0, 0, 0]);
    assert!(counters.state().cpu.is_empty());
    assert_eq!(counters.state().forgotten.len(), ROUNDS as usize);
}

/// A cgroup v2 pod-level cgroup holds no task, so the kernel counts nothing
/// of it: the refresh still reads its subtree's OOM kills (and nothing
/// else), and the join gives it a row with those alone, among the counted
/// rows in id order. Not under `memory_localevents`, nor for a container.
#[test]
fn uncounted_pod_level_cgroups_get_a_row_with_their_subtree_oom_kills_alone() {
    const POD: &str = "/kubepods/burstable/pod5d1c7b2e-0f3a-4e6b-9c8d-7a6b5c4d3e2f";
    let root = std::env::temp_dir().join(format!("podmeter-tracker-{}-pod", std::process::id()));
    let ctr = format!("{POD}/{}", "c0".repeat(32));
    for dir in [POD, &ctr] {
        let d = root.join(dir.trim_start_matches('/'));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("memory.events"), "oom 4\noom_kill 3\n").unwrap();
        std::fs::write(d.join("memory.events.local"), "oom 0\noom_kill 0\n").unwrap();
    }
    let t0 = Instant::now();
    for local_events in [false, true] {
        let mounts = Mounts {
            unified: root.clone(),
            memory_local_events: local_events,
            ..mounts()
        };
        let mut s = IndexState::new(mounts, Duration::from_secs(90));
        // 1: a host cgroup, 2: the pod-level one, 3: its container; only 1
        // and 3 are counted.
        s.apply(&[created(1, "/a"), created(2, POD), created(3, &ctr)], t0);
        s.refresh(&[1, 3], t0, true, |_| Read {
            stats: Stats {
                memory: Some(5),
                oom_kills: Some(0),
                ..Stats::default()
            },
            errors: [None, None],
        });
        let idx = s.snapshot();
        let namer = Namer::new(None, 0, Duration::ZERO);
        let j = join(&idx, &reading(&[1, 3]), &mut namer.session(&idx), t0);
        let rows: Vec<_> = j
            .rows
            .iter()
            .map(|r| (r.id, r.subtree_oom_kills, r.memory, r.cpu.is_some()))
            .collect();
        if local_events {
            assert_eq!(rows, [(1, None, Some(5), true), (3, None, Some(5), true)]);
        } else {
            assert_eq!(
                rows,
                [
                    (1, None, Some(5), true),
                    (2, Some(3), None, false),
                    (3, None, Some(5), true)
                ]
            );
            let pod = &j.rows[1];
            assert!(pod.names.is_some(), "named like any pod cgroup");
            assert_eq!((pod.oom_kills, pod.wait_hist, pod.net), (None, None, None));
        }
        // Only counted cgroups are live counted rows.
        assert_eq!(j.live, 2);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// A limited cgroup's throttling comes from the CFS iterator's walk when
/// the counter source has one (not from its `cpu.stat`, which says
/// otherwise); a walk that fails falls back to the `cpu.stat` without
/// failing the throttling collector; a cgroup without a limit takes
/// nothing from the walk.
#[test]
fn throttling_comes_from_the_walk_and_a_failed_walk_falls_back_to_the_files() {
    use crate::cgroup::cpu::{Cfs, CfsWalk, Limit};
    let counters = Arc::new(FakeCounters::default());
    let (t, publish, _wanted) = tracker(counters.clone());
    let root = std::env::temp_dir().join(format!("podmeter-tracker-{}", std::process::id()));
    std::fs::create_dir_all(root.join("limited")).unwrap();
    std::fs::write(
        root.join("limited/cpu.stat"),
        "usage_usec 5\nnr_periods 3\nnr_throttled 1\nthrottled_usec 2000\n",
    )
    .unwrap();
    let unified = Mounts {
        unified: root.clone(),
        ..mounts()
    };
    let mut s = IndexState::new(unified, Duration::from_secs(90));
    let now = Instant::now();
    s.apply(&[created(1, "/limited"), created(2, "/free")], now);
    s.refresh(&[1, 2], now, true, |c| Read {
        stats: Stats {
            limit: Some(if c.path == "/limited" {
                Limit::Cores(0.5)
            } else {
                Limit::Unlimited
            }),
            ..Stats::default()
        },
        ..Read::default()
    });
    publish.send_replace(s.snapshot());
    counters.state().cpu.insert(1, cpu(10));
    counters.state().cpu.insert(2, cpu(20));
    let cfs = Cfs {
        periods: 9,
        throttled_periods: 4,
        throttled_ns: 2_500_000_700,
    };
    counters.state().cfs = Some(Ok(CfsWalk {
        cgroups: [(1, cfs), (2, cfs)].into_iter().collect(),
        complete: true,
    }));
    let throttling_ok = COLLECTORS.iter().position(|c| *c == "throttling").unwrap();
    let by_id = |snap: &Snapshot, id| snap.rows.iter().find(|r| r.id == id).unwrap().throttling;

    let snap = t.snapshot();
    assert_eq!(
        by_id(&snap, 1),
        Some(cpu::Throttling {
            periods: 9,
            throttled_periods: 4,
            throttled_seconds: 2.5,
        }),
        "v2 prints whole microseconds"
    );
    assert_eq!(by_id(&snap, 2), None, "no limit: nothing reported");
    assert_eq!(snap.collectors[throttling_ok], Some(Ok(())));

    counters.state().cfs = Some(Err("the walk failed".into()));
    let snap = t.snapshot();
    assert_eq!(
        by_id(&snap, 1),
        Some(cpu::Throttling {
            periods: 3,
            throttled_periods: 1,
            throttled_seconds: 0.002,
        }),
        "from its cpu.stat"
    );
    assert_eq!(snap.collectors[throttling_ok], Some(Ok(())));
    std::fs::remove_dir_all(&root).unwrap();
}
