//! The scrape path: kernel counters joined with the cgroup index and names.
//!
//! A scrape reads three things, each from its one owner, and takes no lock
//! of the refresher's:
//! * the newest [`Index`] snapshot the refresher published (a `watch`
//!   channel: the scrape holds an immutable `Arc`);
//! * one [`Reading`] of the [`CounterSource`];
//! * names from the [`Namer`].
//!
//! [`join`] turns them into rows: a pure function, unit tested with fakes.
//! What a scrape learns that the refresher should act on (an id the index
//! lacks, a cgroup never read) goes back over a channel as a [`Want`].
//!
//! Besides the maps, a scrape reads the `cpu.stat` of each live cgroup with
//! a CPU limit (see `cgroup::cpu`): throttling counters are `rate()`d next
//! to CPU usage and must be as fresh as the maps. They are read on a second
//! thread beside the map reads.

use crate::ids::IdMap;
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use podmeter_common::{CpuCounters, NetCounters, WaitHistogram};
use tokio::sync::{mpsc, watch};

use crate::{
    cgroup::{
        cpu::{self, CfsWalk},
        pressure::Pressure,
    },
    counters::{CounterSource, Reading},
    health::Health,
    index::{Cgroup, FileGroup, Index},
    kube::Names,
    namer::{Namer, Naming, Session},
};

/// What a scrape asks of the refresher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Walk the tree now: a counted id is not in the index.
    Walk,
    /// Read memory and limits of cgroups counted since the last refresh.
    Read,
}

/// One cgroup's numbers in a scrape.
#[derive(Debug)]
pub struct Row {
    /// cgroup id.
    pub id: u64,
    /// The cgroup.
    pub cgroup: Arc<Cgroup>,
    /// CPU counters, if the cgroup ran.
    pub cpu: Option<CpuCounters>,
    /// Its run-queue waits by duration (zeros where it has none yet);
    /// `None` when the histogram map could not be read, so that its
    /// series go rather than fall to zero.
    pub wait_hist: Option<WaitHistogram>,
    /// Traffic counters, if it had sockets with traffic.
    pub net: Option<NetCounters>,
    /// Memory working set, if its hierarchy accounts memory.
    pub memory: Option<u64>,
    /// Memory limit in bytes, for live cgroups with one.
    pub memory_limit: Option<u64>,
    /// Processes killed by the OOM killer, where memory is accounted.
    pub oom_kills: Option<u64>,
    /// The same in the cgroup's subtree, removed cgroups included (pod-level
    /// cgroups on cgroup v2).
    pub subtree_oom_kills: Option<u64>,
    /// Pressure stall totals, where the kernel tracks them.
    pub pressure: Pressure,
    /// CPU limit in cores, if the cgroup has one (live cgroups only: a
    /// departed one has no files to read).
    pub cpu_limit: Option<f64>,
    /// Throttling counters, for live cgroups with a CPU limit.
    pub throttling: Option<cpu::Throttling>,
    /// Kubernetes names, for pod cgroups (empty values where unknown).
    pub names: Option<Arc<Names>>,
}

/// The collectors whose success each scrape reports, in exposition order.
pub const COLLECTORS: [&str; 7] = [
    "cgroup_tree",
    "cpu",
    "kubernetes",
    "memory",
    "network",
    "pressure",
    "throttling",
];

/// Each of [`COLLECTORS`]: `None` where not in use, else whether it worked
/// and why not.
pub type CollectorResults = [Option<Result<(), String>>; COLLECTORS.len()];

/// Everything one scrape exposes.
#[derive(Debug)]
pub struct Snapshot {
    /// Per-cgroup rows.
    pub rows: Vec<Row>,
    /// Updates lost to full maps, `[cpu, net]`.
    pub dropped: [u64; 2],
    /// Entries in the counter maps, `[cpu, net]`.
    pub entries: [usize; 2],
    /// Counter map capacity.
    pub capacity: u32,
    /// What the kernel counts beyond time, switches and traffic.
    pub signals: crate::bpf::Signals,
    /// Cgroups by state: `[live and counted, departed, unresolved,
    /// awaiting metadata]`.
    pub tracked: [usize; 4],
    /// Tree updates so far: `[mkdir events, rmdir events, walks]`.
    pub tree_updates: [u64; 3],
    /// Pods in the API watch's store, and watch errors so far, when the
    /// Kubernetes API is in use.
    pub kubernetes: Option<(usize, u64)>,
    /// Whether each of [`COLLECTORS`] worked (`None`: not in use here),
    /// and why not.
    pub collectors: CollectorResults,
}

/// Rows of one scrape, and what the refresher should hear of it.
#[derive(Debug, Default)]
pub struct Joined {
    /// Per-cgroup rows, by id.
    pub rows: Vec<Row>,
    /// Live counted cgroups among the rows.
    pub live: usize,
    /// Departed cgroups among the rows (in their grace period).
    pub departed: usize,
    /// Counted ids the index has never seen in the tree.
    pub unresolved: usize,
    /// Pod cgroups held back until the API names them.
    pub awaiting: usize,
    /// What to ask of the refresher, if anything.
    pub want: Option<Want>,
}

/// Joins one counter reading with `index` and names: a row for each
/// counted cgroup the index knows and that is not awaiting its names.
pub fn join(index: &Index, reading: &Reading, names: &mut Session<'_>, now: Instant) -> Joined {
    let no_cpu = IdMap::default();
    let no_net = IdMap::default();
    let wait_hist = reading.wait_hist.as_ref().ok();
    let cpu = reading.cpu.as_ref().unwrap_or(&no_cpu);
    let net = reading.net.as_ref().unwrap_or(&no_net);
    let ids = reading.ids();
    let mut out = Joined {
        rows: Vec::with_capacity(ids.len()),
        ..Default::default()
    };
    let (mut unknown, mut missing_stats) = (false, false);
    for &id in &ids {
        let Some(cgroup) = index.get(id) else {
            if index.is_unresolved(id) {
                out.unresolved += 1;
            } else {
                unknown = true;
            }
            continue;
        };
        let names = match names.name(id, cgroup, now) {
            Naming::Host => None,
            Naming::Named(n) => Some(n),
            Naming::Awaiting => {
                // The kernel keeps counting: the first export, once
                // named, loses nothing.
                out.awaiting += 1;
                continue;
            }
        };
        let is_live = index.is_live(id);
        out.live += usize::from(is_live);
        out.departed += usize::from(!is_live);
        let stats = index.stats(id);
        // Counted but not yet read (new since the last refresh): the
        // refresher reads it at once, so its memory shows next scrape.
        missing_stats |= is_live && stats.is_none();
        let cpu_limit = match stats.and_then(|s| s.limit) {
            Some(cpu::Limit::Cores(c)) if is_live => Some(c),
            _ => None,
        };
        let stats = stats.unwrap_or_default();
        out.rows.push(Row {
            id,
            cgroup: cgroup.clone(),
            cpu: cpu.get(&id).copied(),
            wait_hist: wait_hist.map(|h| h.get(&id).copied().unwrap_or_default()),
            net: net.get(&id).copied(),
            memory: stats.memory,
            // Limits are the live cgroup's; a departed one's counters keep
            // their last values through the grace period.
            memory_limit: stats.memory_limit.filter(|_| is_live),
            oom_kills: stats.oom_kills,
            subtree_oom_kills: stats.subtree_oom_kills,
            pressure: stats.pressure,
            cpu_limit,
            throttling: None,
            names,
        });
    }
    // Pod-level cgroups the kernel counts nothing of (cgroup v2): a row for
    // their subtree's OOM kills alone, and no other family.
    let counted_rows = out.rows.len();
    for (id, cgroup, kills) in index.subtree_oom_kills() {
        if ids.binary_search(&id).is_ok() {
            continue;
        }
        let Naming::Named(names) = names.name(id, cgroup, now) else {
            continue;
        };
        out.rows.push(Row {
            id,
            cgroup: cgroup.clone(),
            cpu: None,
            wait_hist: None,
            net: None,
            memory: None,
            memory_limit: None,
            oom_kills: None,
            subtree_oom_kills: Some(kills),
            pressure: Pressure::default(),
            cpu_limit: None,
            throttling: None,
            names: Some(names),
        });
    }
    if out.rows.len() > counted_rows {
        out.rows.sort_unstable_by_key(|r| r.id);
    }
    out.want = if unknown {
        Some(Want::Walk)
    } else if missing_stats {
        Some(Want::Read)
    } else {
        None
    };
    out
}

/// Logs each collector's failure once when it starts and once when it
/// ends, rather than at every scrape.
#[derive(Debug, Default)]
struct FailureLog([AtomicBool; COLLECTORS.len()]);

impl FailureLog {
    fn note(&self, collectors: &CollectorResults) {
        for ((name, result), failing) in COLLECTORS.iter().zip(collectors).zip(&self.0) {
            match result {
                Some(Err(why)) => {
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(collector = name, "collector failed: {why}");
                    }
                }
                _ => {
                    if failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(collector = name, "collector works again");
                    }
                }
            }
        }
    }
}

/// Logs when the CFS iterator's walk starts and stops failing, or
/// overflowing, rather than at every scrape: the scrape reads `cpu.stat`
/// for what it lacks, so nothing is missing, but it costs more.
#[derive(Debug, Default)]
struct WalkLog {
    failing: AtomicBool,
    overflowing: AtomicBool,
}

impl WalkLog {
    fn note(&self, walk: Result<&CfsWalk, &str>) {
        match walk {
            Err(why) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{why}: reading throttling counters from cpu.stat files until it works again"
                    );
                }
            }
            Ok(w) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the CFS iterator's walk works again");
                }
                if !w.complete && !self.overflowing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "more CPU-limited cgroups than --max-cgroups: the CFS iterator's walk \
                         keeps {} of them, and the others' cpu.stat files are read",
                        w.cgroups.len()
                    );
                }
                if w.complete && self.overflowing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the CFS iterator's walk has room for every limited cgroup again");
                }
            }
        }
    }
}

/// The scrape side: see the module docs.
pub struct Tracker {
    index: watch::Receiver<Arc<Index>>,
    counters: Arc<dyn CounterSource>,
    namer: Namer,
    wants: mpsc::Sender<Want>,
    health: Arc<Health>,
    failures: FailureLog,
    walk_log: WalkLog,
}

impl Tracker {
    /// A scrape side reading what the refresher publishes on `index`, and
    /// asking it for work on `wants`.
    pub fn new(
        index: watch::Receiver<Arc<Index>>,
        counters: Arc<dyn CounterSource>,
        namer: Namer,
        wants: mpsc::Sender<Want>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            index,
            counters,
            namer,
            wants,
            health,
            failures: FailureLog::default(),
            walk_log: WalkLog::default(),
        }
    }

    /// One scrape.
    pub fn snapshot(&self) -> Snapshot {
        self.read(true)
    }

    /// What a render between scrapes needs ([`crate::prerender`]): the
    /// rows as a scrape would have them, but without throttling counters
    /// (their families are rendered by each scrape), so no `cpu.stat` is
    /// read and the CFS walk does not take `cgroup_mutex`. Collector
    /// failures are not logged from it (each scrape notes them), and it
    /// asks the refresher for nothing.
    pub fn snapshot_between_scrapes(&self) -> Snapshot {
        self.read(false)
    }

    /// A newest index, each time the refresher publishes one.
    pub fn index_updates(&self) -> watch::Receiver<Arc<Index>> {
        self.index.clone()
    }

    fn read(&self, scrape: bool) -> Snapshot {
        // A render between scrapes counts as one for the watchdog: it makes
        // the same map reads, and one stuck there is as much a stall.
        let _scrape = self.health.scrape(Instant::now());
        let index = self.index.borrow().clone();
        // Where the kernel has cgroup iterators, one walk gives every
        // limited cgroup's throttling counters. Otherwise (and for any
        // cgroup the walk did not give) they are one cgroupfs read per
        // limited cgroup, a third of a scrape at a thousand limited
        // containers: with more than one core those are read beside the
        // maps, so a scrape takes the longer of the two rather than both.
        // Up to four threads: the scrape is not the node's main work.
        let walk_started = Instant::now();
        // Not while nothing is limited: the walk holds `cgroup_mutex`.
        let cfs = (scrape && index.has_cpu_limits())
            .then(|| self.counters.cfs())
            .flatten();
        let walk = match cfs {
            Some(Ok(w)) => {
                self.walk_log.note(Ok(&w));
                Some(w)
            }
            Some(Err(e)) => {
                self.walk_log.note(Err(&e));
                None
            }
            None => None,
        };
        let walk_time = walk_started.elapsed();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let (reading, throttling) = if scrape {
            index.throttling_beside(cores, walk.as_ref(), || self.counters.read())
        } else {
            (self.counters.read(), None)
        };
        if let Some(t) = &throttling {
            tracing::debug!(
                walked = t.walked,
                files = t.files,
                gone = t.gone,
                helpers = t.helpers,
                complete = walk.as_ref().map(|w| w.complete),
                walk_us = walk.as_ref().map(|_| walk_time.as_micros()),
                "throttling counters: {} from the CFS iterator's walk, {} cpu.stat files read ({} gone)",
                t.walked,
                t.files,
                t.gone
            );
        }
        let now = Instant::now();
        let mut joined = {
            let mut names = self.namer.session(&index);
            join(&index, &reading, &mut names, now)
        };
        // Only scrapes ask: a render between scrapes follows a publication
        // of the refresher's, and asking from there could keep it busy.
        if let Some(want) = joined.want.filter(|_| scrape) {
            // Full: a request is already pending, which serves this one too.
            let _ = self.wants.try_send(want);
        }

        let (throttling, throttling_ok) = match throttling {
            Some(t) if t.failed == 0 => (t.counters, Ok(())),
            Some(t) => (
                t.counters,
                Err(format!(
                    "{} cpu.stat reads failed, the last with: {}",
                    t.failed,
                    t.last_error.unwrap_or_default()
                )),
            ),
            None if !scrape => (IdMap::default(), Ok(())),
            None => (
                IdMap::default(),
                Err("reading throttling counters panicked".to_owned()),
            ),
        };
        for row in joined.rows.iter_mut().filter(|r| r.cpu_limit.is_some()) {
            row.throttling = throttling.get(&row.id).copied();
        }

        let api = self.namer.api();
        let collectors = [
            Some(index.rescan_error.clone().map_or(Ok(()), Err)),
            // The histogram is read with the CPU map, and is its detail.
            Some(status(&reading.cpu).and(status(&reading.wait_hist))),
            api.as_ref().map(|a| a.failing.clone().map_or(Ok(()), Err)),
            Some(read_status(&index.read_errors[FileGroup::Memory as usize], "memory or limit")),
            Some(status(&reading.net)),
            index.pressure.then(|| {
                read_status(&index.read_errors[FileGroup::Pressure as usize], "pressure")
            }),
            // Not read between scrapes: not in use there.
            scrape.then_some(throttling_ok),
        ];
        if scrape {
            self.failures.note(&collectors);
        }

        // Counted from the rows' own reading, not the index's lists: the
        // refresher deletes a retired cgroup's counters before it publishes
        // the index without it, so a scrape holding the older index would
        // otherwise report a departed cgroup whose series had already gone.
        Snapshot {
            tracked: [
                joined.live,
                joined.departed,
                joined.unresolved,
                joined.awaiting,
            ],
            tree_updates: index.tree_updates,
            kubernetes: api.map(|a| (a.pods, a.errors)),
            entries: [
                reading.cpu.as_ref().map_or(0, HashMap::len),
                reading.net.as_ref().map_or(0, HashMap::len),
            ],
            rows: joined.rows,
            dropped: reading.dropped,
            capacity: self.counters.capacity(),
            signals: self.counters.signals(),
            collectors,
        }
    }

    /// `Ok` when the agent is ready to be scraped: the last walk of the
    /// tree succeeded, the last refresh ran within `max_age`, and the pod
    /// store (if any) has synced.
    pub fn ready(&self, max_age: Duration, now: Instant) -> Result<(), String> {
        let index = self.index.borrow().clone();
        if let Some(e) = &index.rescan_error {
            return Err(format!("last cgroup scan failed: {e}"));
        }
        match index.refreshed {
            None => return Err("no refresh has completed yet".into()),
            Some(at) if now.saturating_duration_since(at) > max_age => {
                return Err(format!(
                    "last refresh was {:?} ago",
                    now.saturating_duration_since(at)
                ));
            }
            Some(_) => {}
        }
        self.namer.ready()
    }

    /// `Ok` while the scrape path and the refresher make progress.
    pub fn live(&self, now: Instant) -> Result<(), String> {
        self.health.live(now)
    }
}

/// A refresh's reads of one group of files: `what` says which.
fn read_status((failed, last): &(usize, Option<String>), what: &str) -> Result<(), String> {
    match failed {
        0 => Ok(()),
        n => Err(format!(
            "{n} {what} reads failed, the last with: {}",
            last.as_deref().unwrap_or_default()
        )),
    }
}

/// A map read's success, without its numbers.
fn status<T>(r: &Result<T, String>) -> Result<(), String> {
    r.as_ref().map(|_| ()).map_err(Clone::clone)
}

#[cfg(test)]
mod tests;
