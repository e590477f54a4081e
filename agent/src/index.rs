//! Which cgroups podmeter knows, under which path, for how long.
//!
//! [`IndexState`] is a plain state machine: the refresher task owns it and
//! is the only writer, feeds it the kernel's tree events, walks of the
//! tree and refreshes, and publishes each result as an immutable [`Index`]
//! snapshot that scrapes read without locks. Time comes in as an argument
//! (`now`), so the grace period, retirement and unresolved ids are unit
//! tested without a kernel or a clock.
//!
//! A cgroup that disappears keeps its final values for the grace period so
//! its last increase is not lost between scrapes; then its series go and
//! its kernel map entries are deleted. A departed cgroup that never had a
//! counter has no series to keep and goes at the next refresh, except a
//! pod-level one whose subtree OOM kills were read: that count is its
//! series, kept like counters. So the index holds what is alive, plus what
//! had a series and died within the grace period, plus what died within one
//! refresh interval: it follows the live count, not the churn.

use crate::ids::IdMap;
use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::cgroup::{
    CgroupFiles, Identity, Mounts,
    cpu::{self, CfsWalk, Throttling},
    files::is_gone,
    identity,
    pressure::Pressure,
};

/// A cgroup podmeter knows by path.
#[derive(Debug)]
pub struct Cgroup {
    /// Path relative to the cgroup2 root, `/a/b`.
    pub path: String,
    /// What the path says about its owner.
    pub identity: Identity,
    /// When a scan or event first showed it.
    pub first_seen: Instant,
    /// Its memory, CPU and pressure files, open while it is counted.
    pub files: CgroupFiles,
}

/// What the refresh path last read of a counted cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Memory working set, if its hierarchy accounts memory.
    pub memory: Option<u64>,
    /// CPU limit, if a cpu controller covers the cgroup.
    pub limit: Option<cpu::Limit>,
    /// Memory limit in bytes, if it has one.
    pub memory_limit: Option<u64>,
    /// Processes killed by the OOM killer, where memory is accounted.
    pub oom_kills: Option<u64>,
    /// The same in the whole subtree, removed cgroups included: pod-level
    /// cgroups on cgroup v2 only.
    pub subtree_oom_kills: Option<u64>,
    /// Pressure stall totals, where the kernel tracks them.
    pub pressure: Pressure,
}

/// The groups of files a refresh reads, each with its own collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileGroup {
    /// Memory: working set, limit, OOM kills.
    Memory = 0,
    /// Pressure stalls.
    Pressure = 1,
}

/// What one read of a cgroup's files gave: what could be read, and the
/// first error of each [`FileGroup`] (one failing leaves the other).
#[derive(Debug, Default)]
pub struct Read {
    /// The numbers.
    pub stats: Stats,
    /// By [`FileGroup`].
    pub errors: [Option<io::Error>; 2],
}

/// A change to the cgroup2 tree, as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeEvent {
    /// `mkdir`: a cgroup with this id at this path (relative to the mount).
    Created {
        /// cgroup id.
        id: u64,
        /// `/a/b`.
        path: String,
    },
    /// `rmdir`.
    Removed {
        /// cgroup id.
        id: u64,
    },
}

/// One published state of the index: what a scrape reads.
#[derive(Clone, Debug, Default)]
pub struct Index {
    live: IdMap<Arc<Cgroup>>,
    /// Gone from the tree, with when that was noticed.
    departed: IdMap<(Arc<Cgroup>, Instant)>,
    /// Counted by the kernel but never seen in the tree, with first sighting.
    unresolved: IdMap<Instant>,
    /// Memory and limit by id, for counted cgroups (departed: last read),
    /// and the subtree OOM kills of uncounted pod-level ones (departed:
    /// the last read, often at a container's rmdir).
    stats: IdMap<Stats>,
    /// Grows with each publication.
    pub generation: u64,
    /// Tree updates so far: `[mkdir events, rmdir events, walks]`.
    pub tree_updates: [u64; 3],
    /// Why the last walk of the tree failed, if it did.
    pub rescan_error: Option<String>,
    /// When the last refresh finished.
    pub refreshed: Option<Instant>,
    /// Reads of the last refresh that failed for a reason other than the
    /// cgroup being gone, with the last such error, by [`FileGroup`].
    pub read_errors: [(usize, Option<String>); 2],
    /// Whether the kernel tracks pressure stalls (pressure is read at all).
    pub pressure: bool,
}

impl Index {
    /// The cgroup with this id, live or departed.
    pub fn get(&self, id: u64) -> Option<&Arc<Cgroup>> {
        self.live
            .get(&id)
            .or_else(|| self.departed.get(&id).map(|(c, _)| c))
    }

    /// Whether the cgroup is in the tree now.
    pub fn is_live(&self, id: u64) -> bool {
        self.live.contains_key(&id)
    }

    /// Whether the id is counted but known to be unnameable for now.
    pub fn is_unresolved(&self, id: u64) -> bool {
        self.unresolved.contains_key(&id)
    }

    /// What was last read of the cgroup (at a refresh, or for a pod-level
    /// cgroup at a container's rmdir).
    pub fn stats(&self, id: u64) -> Option<Stats> {
        self.stats.get(&id).copied()
    }

    /// Pod-level cgroups whose subtree OOM kills were read (live, or
    /// departed within the grace period), with the count, in no order:
    /// those the kernel counts nothing of (cgroup v2 puts no task in them)
    /// have no row otherwise.
    pub fn subtree_oom_kills(&self) -> impl Iterator<Item = (u64, &Arc<Cgroup>, u64)> + '_ {
        self.stats
            .iter()
            .filter_map(|(&id, s)| Some((id, self.get(id)?, s.subtree_oom_kills?)))
    }

    /// `[live, departed, unresolved]` counts.
    pub fn counts(&self) -> [usize; 3] {
        [self.live.len(), self.departed.len(), self.unresolved.len()]
    }

    /// Whether any cgroup has a CPU limit (no walk is needed otherwise).
    pub fn has_cpu_limits(&self) -> bool {
        self.stats
            .values()
            .any(|s| matches!(s.limit, Some(cpu::Limit::Cores(_))))
    }

    /// The throttling counters of every live counted cgroup with a CPU
    /// limit: from `walk` (the CFS iterator's, if there is one) for each
    /// cgroup it has, and from `cpu.stat` for the others, on up to
    /// `threads` threads, the caller's among them. Without a walk a
    /// thousand limited containers are a thousand cgroupfs reads, the
    /// longest part of a scrape. The caller first runs `first` (the
    /// scrape's map reads) while the other threads read (when `threads` >
    /// 1 and a thread could be made), then reads too. Cgroups are handed
    /// out in small batches from one cursor, so no thread waits for
    /// another's fixed share, and no more threads read than `threads`:
    /// with a third thread on a 2-core node the readers took turns on the
    /// cores, each reader's wall time about twice its CPU time.
    ///
    /// Returns `first`'s result and the counters; `None` for the counters
    /// if a read panicked on any thread, the caller's included (the scrape
    /// then reports every throttling counter as failed).
    pub fn throttling_beside<R>(
        &self,
        threads: usize,
        walk: Option<&CfsWalk>,
        first: impl FnOnce() -> R,
    ) -> (R, Option<ThrottlingRead>) {
        let mut walked = HashMap::with_capacity(walk.map_or(0, |w| w.cgroups.len()));
        let limited: Vec<(u64, &cpu::Files)> = self
            .stats
            .iter()
            .filter(|(_, s)| matches!(s.limit, Some(cpu::Limit::Cores(_))))
            .filter_map(|(id, _)| Some((*id, self.live.get(id)?.files.cpu.as_ref()?)))
            .filter(|(id, files)| match walk.and_then(|w| files.throttling_in(w, *id)) {
                Some(t) => {
                    walked.insert(*id, t);
                    false
                }
                None => true,
            })
            .collect();
        // A thread for fewer reads than this costs more than it saves (but
        // where `threads` allows one, one reads beside `first` whenever
        // there is anything to read).
        const PER_THREAD: usize = 128;
        const BATCH: usize = 32;
        let n = limited.len();
        let helpers = match n {
            0 => 0,
            n => (n / PER_THREAD).max(1).min(threads.saturating_sub(1)),
        };
        let cursor = AtomicUsize::new(0);
        let work = || {
            let mut all = ThrottlingRead::default();
            loop {
                let i = cursor.fetch_add(BATCH, Ordering::Relaxed);
                if i >= n {
                    return all;
                }
                all.add(read_throttling(&limited[i..(i + BATCH).min(n)]));
            }
        };
        std::thread::scope(|s| {
            // Where no thread can be made (a pids limit), the caller reads
            // what no other thread took.
            let others: Vec<_> = (0..helpers)
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("throttling".into())
                        .spawn_scoped(s, work)
                        .ok()
                })
                .collect();
            let r = first();
            // A panicking read is the throttling collector's failure, not
            // the scrape's, on whichever thread it happens.
            let mut all = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).ok();
            if let Some(all) = &mut all {
                all.helpers = others.len();
            }
            for h in others {
                match (h.join(), all.as_mut()) {
                    (Ok(read), Some(all)) => all.add(read),
                    (Ok(_), None) => {}
                    (Err(_), _) => all = None,
                }
            }
            if let Some(all) = &mut all {
                all.walked = walked.len();
                all.counters.extend(walked);
            }
            (r, all)
        })
    }
}

/// What [`Index::throttling_beside`] found.
#[derive(Debug, Default, PartialEq)]
pub struct ThrottlingRead {
    /// Throttling counters by cgroup id.
    pub counters: IdMap<Throttling>,
    /// How many of them came from the walk.
    pub walked: usize,
    /// How many `cpu.stat` files were read (or tried).
    pub files: usize,
    /// How many of those were of cgroups gone by then.
    pub gone: usize,
    /// How many of those reads failed (not for being gone).
    pub failed: usize,
    /// The last such failure.
    pub last_error: Option<String>,
    /// Threads other than the caller's that read files.
    pub helpers: usize,
}

impl ThrottlingRead {
    fn add(&mut self, o: Self) {
        self.counters.extend(o.counters);
        self.walked += o.walked;
        self.files += o.files;
        self.gone += o.gone;
        self.failed += o.failed;
        self.last_error = o.last_error.or(self.last_error.take());
        self.helpers += o.helpers;
    }
}

/// [`Index::throttling_beside`] of some cgroups' files, on this thread.
fn read_throttling(cgroups: &[(u64, &cpu::Files)]) -> ThrottlingRead {
    let mut out = ThrottlingRead {
        counters: IdMap::with_capacity_and_hasher(cgroups.len(), Default::default()),
        files: cgroups.len(),
        ..ThrottlingRead::default()
    };
    for (id, files) in cgroups {
        match files.throttling() {
            Ok(Some(t)) => {
                out.counters.insert(*id, t);
            }
            Ok(None) => {}
            Err(e) if is_gone(&e) => out.gone += 1,
            Err(e) => {
                out.failed += 1;
                out.last_error = Some(e.to_string());
            }
        }
    }
    out
}

/// What one change to the index did, for logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Cgroups in the tree.
    pub cgroups: usize,
    /// Newly seen.
    pub created: usize,
    /// Newly departed.
    pub departed: usize,
    /// Retired after the grace period (their counters are to be deleted).
    pub retired: Vec<u64>,
    /// Departed and not counted now: dropped at the next refresh
    /// (a pod-level cgroup's subtree OOM kills: after the grace period).
    pub dropped: usize,
    /// Cgroups whose memory and limit were read.
    pub read: usize,
    /// A counted id the index has never seen: the tree should be walked
    /// before it can be called dead (its mkdir event may have been missed).
    pub want_walk: bool,
}

/// The index and how it changes. See the module docs.
pub struct IndexState {
    mounts: Mounts,
    grace: Duration,
    index: Index,
}

impl IndexState {
    /// An empty index over the cgroups below `mounts`.
    pub fn new(mounts: Mounts, grace: Duration) -> Self {
        Self {
            grace,
            index: Index {
                pressure: mounts.psi,
                ..Index::default()
            },
            mounts,
        }
    }

    /// The current state, to publish.
    pub fn snapshot(&mut self) -> Arc<Index> {
        self.index.generation += 1;
        Arc::new(self.index.clone())
    }

    /// The current state, read-only.
    pub fn index(&self) -> &Index {
        &self.index
    }

    fn cgroup(&self, path: String, now: Instant) -> Arc<Cgroup> {
        let identity = identity::parse(&path);
        let pod_level = identity.is_pod_level();
        Arc::new(Cgroup {
            identity,
            files: CgroupFiles::new(&self.mounts, &path, pod_level),
            path,
            first_seen: now,
        })
    }

    fn depart(&mut self, id: u64, now: Instant) -> bool {
        match self.index.live.remove(&id) {
            Some(cgroup) => {
                cgroup.files.close();
                self.index.departed.insert(id, (cgroup, now));
                true
            }
            None => false,
        }
    }

    /// A walk of the tree: every cgroup in `paths` (id → path) is live,
    /// every other live one departed. `Err` is remembered for readiness.
    pub fn rescan(&mut self, paths: io::Result<IdMap<String>>, now: Instant) -> Changes {
        let paths = match paths {
            Ok(p) => {
                self.index.rescan_error = None;
                p
            }
            Err(e) => {
                self.index.rescan_error = Some(e.to_string());
                return Changes {
                    cgroups: self.index.live.len(),
                    ..Default::default()
                };
            }
        };
        self.index.tree_updates[2] += 1;
        let mut changes = Changes {
            cgroups: paths.len(),
            ..Default::default()
        };
        let gone: Vec<u64> = self
            .index
            .live
            .keys()
            .filter(|id| !paths.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            changes.departed += usize::from(self.depart(id, now));
        }
        for (id, path) in paths {
            if self.index.live.get(&id).is_some_and(|c| c.path == path) {
                continue;
            }
            changes.created += 1;
            self.index.departed.remove(&id);
            self.index.unresolved.remove(&id);
            let cgroup = self.cgroup(path, now);
            if let Some(old) = self.index.live.insert(id, cgroup) {
                old.files.close(); // same id, new path: a rename
            }
        }
        changes
    }

    /// Reads the subtree OOM kills of the live pod-level cgroups at these
    /// paths now, when one of their containers has gone: a pod that is not
    /// restarted (a Job's, after an OOM kill) loses its own cgroup seconds
    /// later, often before the next refresh would have read the kill. An
    /// error leaves the last value; the next refresh reads again and
    /// reports errors.
    fn reread_subtree_oom_kills(&mut self, paths: &HashSet<String>) {
        let index = &mut self.index;
        for (id, cgroup) in &index.live {
            if !cgroup.identity.is_pod_level() || !paths.contains(&cgroup.path) {
                continue;
            }
            if let Ok(Some(k)) = read_subtree_oom_kills(cgroup) {
                index.stats.entry(*id).or_default().subtree_oom_kills = Some(k);
            }
        }
    }

    /// The kernel's tree events, in the order they happened.
    pub fn apply(&mut self, events: &[TreeEvent], now: Instant) -> Changes {
        let mut changes = Changes::default();
        // The pods whose containers went: read once, after the batch (a
        // pod that went in it too can no longer be read anyway).
        let mut pods = HashSet::new();
        for event in events {
            match event {
                TreeEvent::Created { id, path } => {
                    self.index.tree_updates[0] += 1;
                    if self.index.live.get(id).is_some_and(|c| &c.path == path) {
                        continue; // a walk saw it first
                    }
                    self.index.departed.remove(id);
                    self.index.unresolved.remove(id);
                    let cgroup = self.cgroup(path.clone(), now);
                    if let Some(old) = self.index.live.insert(*id, cgroup) {
                        // Same id, new path (a rename): its files are
                        // closed here, not whenever the last scrape that
                        // holds it lets go.
                        old.files.close();
                    }
                    changes.created += 1;
                }
                TreeEvent::Removed { id } => {
                    self.index.tree_updates[1] += 1;
                    if let Some(pod) = self.index.get(*id).and_then(|c| pod_path(c)) {
                        pods.insert(pod.to_owned());
                    }
                    changes.departed += usize::from(self.depart(*id, now));
                }
            }
        }
        if !pods.is_empty() {
            self.reread_subtree_oom_kills(&pods);
        }
        changes.cgroups = self.index.live.len();
        changes
    }

    /// A refresh, given the ids the kernel counts now: reads memory,
    /// limits, OOM kills and pressure of the counted live cgroups (all, or
    /// only those never read yet) with `read`, and the subtree OOM kills of
    /// the other live pod-level cgroups (see [`read_subtree_oom_kills`]),
    /// and retires departed and unresolved cgroups past the grace period.
    /// The caller deletes the retired ids' counters before it publishes the
    /// result.
    pub fn refresh(
        &mut self,
        counted: &[u64],
        now: Instant,
        all: bool,
        read: impl Fn(&Cgroup) -> Read,
    ) -> Changes {
        let grace = self.grace;
        let index = &mut self.index;
        let mut changes = Changes {
            cgroups: index.live.len(),
            ..Default::default()
        };
        let is_counted = |id: &u64| counted.binary_search(id).is_ok();
        debug_assert!(counted.is_sorted());

        // Departed: kept for the grace period if it has counters (their
        // final values must be seen); without counters, nothing to keep.
        // A pod-level cgroup's subtree OOM kills are kept as counters are,
        // the kernel counting nothing of it: a Job's pod goes seconds after
        // the kill its container's rmdir read.
        let mut retired = Vec::new();
        let subtree_kept = |id: &u64| {
            index
                .stats
                .get(id)
                .is_some_and(|s| s.subtree_oom_kills.is_some())
        };
        index.departed.retain(|id, (_, since)| {
            let within = now.duration_since(*since) < grace;
            if !is_counted(id) {
                if within && subtree_kept(id) {
                    return true;
                }
                changes.dropped += 1;
                false
            } else if within {
                true
            } else {
                retired.push(*id);
                false
            }
        });

        // Looked up once per counted id: a set, not the list (thousands of
        // each after a churn peak).
        let departed_now: HashSet<u64> = retired.iter().copied().collect();
        let mut unresolved = IdMap::default();
        let mut stats = IdMap::with_capacity_and_hasher(counted.len(), Default::default());
        let mut errors: [(usize, Option<String>); 2] = Default::default();
        for &id in counted {
            if let Some(cgroup) = index.live.get(&id) {
                let s = match index.stats.get(&id) {
                    Some(s) if !all => *s,
                    _ => {
                        changes.read += 1;
                        let r = read(cgroup);
                        for (e, (failed, last)) in r.errors.iter().zip(&mut errors) {
                            if let Some(e) = e.as_ref().filter(|e| !is_gone(e)) {
                                *failed += 1;
                                *last = Some(e.to_string());
                            }
                        }
                        r.stats
                    }
                };
                stats.insert(id, s);
            } else if index.departed.contains_key(&id) {
                if let Some(&s) = index.stats.get(&id) {
                    stats.insert(id, s);
                }
            } else if !departed_now.contains(&id) {
                // Counted, never seen in the tree: died before any walk or
                // event showed it, or a socket outlived its cgroup. Kept out
                // of the series; its counters go after the grace period.
                let first = match index.unresolved.get(&id) {
                    Some(&first) => first,
                    None => {
                        // New: the tree is walked once before it is called
                        // dead, or a live cgroup whose event was missed
                        // would lose its counters long before the next
                        // scheduled walk.
                        changes.want_walk = true;
                        now
                    }
                };
                if now.duration_since(first) < grace {
                    unresolved.insert(id, first);
                } else {
                    retired.push(id);
                }
            }
        }
        // Pod-level cgroups hold no task on cgroup v2, so the kernel never
        // counts them; their subtree's OOM kills, the pod's, are read all
        // the same, and only those. Nothing is read where they are not kept
        // (v1 memory: `memory::Files` has no such file).
        for (id, cgroup) in &index.live {
            if is_counted(id) || !cgroup.identity.is_pod_level() {
                continue;
            }
            let read_before = index.stats.get(id).and_then(|s| s.subtree_oom_kills);
            let kills = match index.stats.get(id) {
                Some(_) if !all => read_before,
                _ => match read_subtree_oom_kills(cgroup) {
                    Ok(k) => k,
                    Err(e) => {
                        if !is_gone(&e) {
                            let (failed, last) = &mut errors[FileGroup::Memory as usize];
                            *failed += 1;
                            *last = Some(e.to_string());
                        }
                        // Gone since the walk or event that showed it (its
                        // rmdir comes next): what a container's rmdir read.
                        read_before
                    }
                },
            };
            if let Some(k) = kills {
                let s = Stats {
                    subtree_oom_kills: Some(k),
                    ..Stats::default()
                };
                stats.insert(*id, s);
            }
        }
        // Departed and uncounted: only such pod-level cgroups are kept (see
        // above), with their last read.
        for id in index.departed.keys().filter(|id| !is_counted(id)) {
            if let Some(s) = index.stats.get(id) {
                stats.insert(*id, *s);
            }
        }
        index.unresolved = unresolved;
        index.stats = stats;
        index.refreshed = Some(now);
        if all {
            index.read_errors = errors;
        }
        // Maps shrink with the index: a churn peak must not keep its
        // memory after the cgroups are gone.
        index.departed.shrink_to_fit();
        index.live.shrink_to_fit();
        changes.retired = retired;
        changes
    }
}

/// The path of the pod-level cgroup a container cgroup sits in.
fn pod_path(ctr: &Cgroup) -> Option<&str> {
    match &ctr.identity {
        Identity::Pod(p) if p.container_id.is_some() => Some(ctr.path.rsplit_once('/')?.0),
        _ => None,
    }
}

/// The OOM kills in a pod-level cgroup's subtree, where they are read (see
/// `memory::Files`): `Ok(None)` elsewhere, without a read.
pub fn read_subtree_oom_kills(cgroup: &Cgroup) -> io::Result<Option<u64>> {
    match &cgroup.files.memory {
        Some(m) => m.subtree_oom_kills(),
        None => Ok(None),
    }
}

/// Reads a cgroup's memory working set, limits, OOM kills and pressure.
/// A group of files that fails leaves its own numbers out, not the others'.
pub fn read_stats(cgroup: &Cgroup) -> Read {
    let files = &cgroup.files;
    let mut stats = Stats {
        limit: files.cpu.as_ref().and_then(|c| c.limit()),
        ..Stats::default()
    };
    let memory = files.memory.as_ref().map(|m| -> io::Result<()> {
        // The working set first: where it fails (no memory controller in
        // v2, a removed cgroup) the other files would fail the same way.
        stats.memory = m.working_set()?;
        stats.memory_limit = m.limit()?;
        stats.oom_kills = m.oom_kills()?;
        stats.subtree_oom_kills = m.subtree_oom_kills()?;
        Ok(())
    });
    let pressure = files.pressure.as_ref().map(|p| -> io::Result<()> {
        stats.pressure = p.read()?;
        Ok(())
    });
    Read {
        stats,
        errors: [memory, pressure].map(|r| r.and_then(Result::err)),
    }
}

#[cfg(test)]
mod tests;
