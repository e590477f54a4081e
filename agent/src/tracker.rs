//! Which cgroups podmeter reports, under which identity, for how long.
//!
//! Three paths share a [`Tracker`]:
//! * the scrape path ([`Tracker::snapshot`]) reads the kernel maps and joins
//!   them with the current [`Index`]; it never walks the filesystem, so it
//!   never waits on anything slow. Its only file reads are the `cpu.stat`
//!   of each live cgroup with a CPU limit (see `cgroup::cpu`): throttling
//!   counters are `rate()`d next to CPU usage and must be as fresh as the
//!   maps;
//! * the tree path keeps the id → path index: [`Tracker::apply`] takes the
//!   kernel's cgroup mkdir/rmdir events as they come, [`Tracker::rescan`]
//!   walks the cgroup2 tree (at start, when events were lost or are not
//!   available, now and then as a safety net, and at once when a scrape
//!   meets an unknown id);
//! * the refresh path ([`Tracker::refresh`], every `--refresh-interval`)
//!   reads memory and CPU limits of the counted cgroups, and retires cgroups
//!   that have been gone longer than the grace period.
//!
//! Files of counted cgroups stay open between reads (`cgroup::files`).
//!
//! A cgroup that disappears keeps its final values for the grace period so
//! its last increase is not lost between scrapes; then its series go and its
//! kernel map entries are deleted, which keeps cardinality bounded by what
//! is alive plus what died within the grace period.

use std::{
    collections::HashMap,
    io,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::MapError;
use podmeter_common::{CpuCounters, NetCounters};
use tokio::sync::Notify;

use crate::{
    bpf::Maps,
    cgroup::{CgroupFiles, Identity, Mounts, cpu, identity, tree},
    kube::{Lookup, Names, PodStore},
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
    /// Its memory and CPU files, open while it is counted.
    pub files: CgroupFiles,
}

/// What the refresh path last read of a counted cgroup.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    /// Memory working set, if its hierarchy accounts memory.
    memory: Option<u64>,
    /// CPU limit, if a cpu controller covers the cgroup.
    limit: Option<cpu::Limit>,
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

/// The id → cgroup view the scrape path reads; replaced whole by each change
/// (the scrape path takes no lock a file read could hold up).
#[derive(Clone, Debug, Default)]
pub struct Index {
    live: HashMap<u64, Arc<Cgroup>>,
    /// Gone from the tree, with when that was noticed.
    departed: HashMap<u64, (Arc<Cgroup>, Instant)>,
    /// Counted by the kernel but never seen in the tree, with first sighting.
    unresolved: HashMap<u64, Instant>,
    /// Memory and limit by id, for counted cgroups (departed: last read).
    stats: HashMap<u64, Stats>,
}

impl Index {
    fn get(&self, id: u64) -> Option<&Arc<Cgroup>> {
        self.live
            .get(&id)
            .or_else(|| self.departed.get(&id).map(|(c, _)| c))
    }
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
    /// Traffic counters, if it had sockets with traffic.
    pub net: Option<NetCounters>,
    /// Memory working set, if its hierarchy accounts memory.
    pub memory: Option<u64>,
    /// CPU limit in cores, if the cgroup has one (live cgroups only: a
    /// departed one has no files to read).
    pub cpu_limit: Option<f64>,
    /// Throttling counters, for live cgroups with a CPU limit.
    pub throttling: Option<cpu::Throttling>,
    /// Kubernetes names, for pod cgroups (empty values where unknown).
    pub names: Option<Arc<Names>>,
}

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
    /// Cgroups by state: `[live and counted, departed, unresolved,
    /// awaiting metadata]`.
    pub tracked: [usize; 4],
    /// Tree updates so far: `[mkdir events, rmdir events, walks]`.
    pub tree_updates: [u64; 3],
    /// Pods in the API watch's store, and watch errors so far, when the
    /// Kubernetes API is in use.
    pub kubernetes: Option<(usize, u64)>,
}

/// What one change to the index did, for logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RefreshStats {
    /// Cgroups in the tree.
    pub cgroups: usize,
    /// Newly seen.
    pub created: usize,
    /// Newly departed.
    pub departed: usize,
    /// Retired after the grace period (map entries deleted).
    pub retired: usize,
    /// Cgroups whose memory and limit were read.
    pub read: usize,
}

/// How pod cgroups get their Kubernetes names.
pub struct PodNaming {
    /// The node's pods from the API.
    pub store: PodStore,
    /// Number of optional labels (`kube::LabelOptions::names`).
    pub extra_labels: usize,
    /// How long a new pod cgroup waits for its names (`--metadata-wait`).
    pub wait: Duration,
}

/// See the module docs.
pub struct Tracker {
    mounts: Mounts,
    grace: Duration,
    maps: Mutex<Maps>,
    index: RwLock<Arc<Index>>,
    /// Last exported CPU time and switches per id: keeps the counters
    /// monotonic when a racing read comes out low (see `Maps::read`).
    last_cpu: Mutex<HashMap<u64, CpuCounters>>,
    /// Wakes the refresher early: a scrape met a cgroup it cannot name or
    /// has no memory reading for.
    pub wake: Notify,
    /// Set with `wake` when a scrape or refresh met an id the index lacks.
    rescan_wanted: AtomicBool,
    /// See [`Snapshot::tree_updates`].
    tree_updates: [AtomicU64; 3],
    last_refresh: Mutex<Option<Instant>>,
    last_rescan_error: Mutex<Option<String>>,
    /// The node's pods from the API, if one is configured.
    pods: Option<PodStore>,
    /// How long a pod cgroup's series wait for its names before going out
    /// without them.
    metadata_wait: Duration,
    /// Names once complete, per cgroup id: a series' labels never change
    /// back, even after the pod left the API.
    names: Mutex<HashMap<u64, Arc<Names>>>,
    /// Names for pod cgroups when nothing better is known.
    unnamed: Arc<Names>,
}

/// The throttling counters of every live counted cgroup with a CPU limit.
fn throttling(index: &Index) -> HashMap<u64, cpu::Throttling> {
    index
        .stats
        .iter()
        .filter(|(_, s)| matches!(s.limit, Some(cpu::Limit::Cores(_))))
        .filter_map(|(id, _)| {
            let files = index.live.get(id)?.files.cpu.as_ref()?;
            Some((*id, files.throttling()?))
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the exporter down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tracker {
    /// A tracker over `maps`, with no cgroups known until the first refresh.
    pub fn new(mounts: Mounts, maps: Maps, grace: Duration, naming: Option<PodNaming>) -> Self {
        let (pods, extra_labels, metadata_wait) = match naming {
            Some(n) => (Some(n.store), n.extra_labels, n.wait),
            None => (None, 0, Duration::ZERO),
        };
        Self {
            pods,
            metadata_wait,
            names: Mutex::default(),
            unnamed: Arc::new(Names {
                extra: vec![String::new(); extra_labels],
                ..Default::default()
            }),
            mounts,
            grace,
            maps: Mutex::new(maps),
            index: RwLock::new(Arc::default()),
            last_cpu: Mutex::default(),
            wake: Notify::new(),
            rescan_wanted: AtomicBool::new(false),
            tree_updates: Default::default(),
            last_refresh: Mutex::new(None),
            last_rescan_error: Mutex::new(None),
        }
    }

    fn index(&self) -> Arc<Index> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The scrape path: kernel counters joined with the current index.
    pub fn snapshot(&self) -> Result<Snapshot, MapError> {
        let index = self.index();
        // The throttling counters are one cgroupfs read per limited cgroup,
        // a third of a scrape at a thousand limited containers: they are
        // read beside the maps, so a scrape takes the longer of the two
        // rather than both. File reads take no lock: a slow cgroupfs never
        // holds up the refresher or another scrape.
        let (throttling, snapshot) = std::thread::scope(|s| {
            // Where no thread can be made (a pids limit), read in turn.
            match std::thread::Builder::new().spawn_scoped(s, || throttling(&index)) {
                Ok(reader) => {
                    let snapshot = self.join(&index);
                    (reader.join(), snapshot)
                }
                Err(_) => (Ok(throttling(&index)), self.join(&index)),
            }
        });
        let mut snapshot = snapshot?;
        let throttling = throttling.unwrap_or_else(|_| {
            tracing::warn!("reading throttling counters panicked; this scrape has none");
            HashMap::new()
        });
        for row in snapshot.rows.iter_mut().filter(|r| r.cpu_limit.is_some()) {
            row.throttling = throttling.get(&row.id).copied();
        }
        Ok(snapshot)
    }

    /// Kernel counters joined with `index`; no throttling yet.
    fn join(&self, index: &Index) -> Result<Snapshot, MapError> {
        let (reading, capacity) = {
            let maps = lock(&self.maps);
            (maps.read()?, maps.capacity())
        };
        let mut ids: Vec<u64> = reading
            .cpu
            .keys()
            .chain(reading.net.keys())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();

        let mut rows = Vec::with_capacity(ids.len());
        let (mut unknown, mut missing_stats) = (false, false);
        let (mut live, mut awaiting) = (0, 0);
        let pods = self.pods.as_ref().map(|p| (p, p.by_uid()));
        let mut names = lock(&self.names);
        let mut last_cpu = lock(&self.last_cpu);
        for id in ids {
            let Some(cgroup) = index.get(id) else {
                unknown |= !index.unresolved.contains_key(&id);
                continue;
            };
            let names = match (&cgroup.identity, &pods) {
                (Identity::Host, _) => None,
                (Identity::Pod(_), None) => Some(self.unnamed.clone()),
                (Identity::Pod(p), Some((store, by_uid))) => match names.get(&id) {
                    Some(n) => Some(n.clone()),
                    None => {
                        let waited = cgroup.first_seen.elapsed() >= self.metadata_wait;
                        match store.lookup(by_uid, &p.pod_uid, p.container_id.as_deref()) {
                            Lookup::Complete(n) => {
                                let n = Arc::new(n);
                                names.insert(id, n.clone());
                                Some(n)
                            }
                            Lookup::PodOnly(n) if waited => Some(Arc::new(n)),
                            Lookup::Unknown if waited => Some(self.unnamed.clone()),
                            // Counters keep accumulating in the kernel: the
                            // first export, once named, loses nothing.
                            _ => {
                                awaiting += 1;
                                continue;
                            }
                        }
                    }
                },
            };
            let is_live = index.live.contains_key(&id);
            live += usize::from(is_live);
            let stats = index.stats.get(&id).copied();
            // Counted but not yet read (new since the last refresh): the
            // refresher reads it at once, so its memory shows next scrape.
            missing_stats |= is_live && stats.is_none();
            let cpu = reading.cpu.get(&id).map(|c| {
                let last = last_cpu.entry(id).or_default();
                last.time_ns = last.time_ns.max(c.time_ns);
                last.switches = last.switches.max(c.switches);
                *last
            });
            let cpu_limit = match stats.and_then(|s| s.limit) {
                Some(cpu::Limit::Cores(c)) if is_live => Some(c),
                _ => None,
            };
            rows.push(Row {
                id,
                cgroup: cgroup.clone(),
                cpu,
                net: reading.net.get(&id).copied(),
                memory: stats.and_then(|s| s.memory),
                cpu_limit,
                throttling: None,
                names,
            });
        }
        drop(last_cpu);
        drop(names);
        if unknown {
            self.want_rescan();
        } else if missing_stats {
            self.wake.notify_one();
        }
        Ok(Snapshot {
            tracked: [live, index.departed.len(), index.unresolved.len(), awaiting],
            tree_updates: self
                .tree_updates
                .each_ref()
                .map(|n| n.load(Ordering::Relaxed)),
            kubernetes: pods.map(|(p, _)| (p.len(), p.errors.load(Ordering::Relaxed))),
            rows,
            dropped: reading.dropped,
            entries: [reading.cpu.len(), reading.net.len()],
            capacity,
        })
    }

    /// cgroup events the kernel could not queue since start (0 if the maps
    /// cannot be read: the next read that works shows the whole count).
    pub fn tree_drops(&self) -> u64 {
        lock(&self.maps).tree_drops().unwrap_or(0)
    }

    /// Asks the background task for a walk of the tree, now.
    fn want_rescan(&self) {
        self.rescan_wanted.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Whether a walk of the tree was asked for since the last call.
    pub fn take_rescan_wanted(&self) -> bool {
        self.rescan_wanted.swap(false, Ordering::Relaxed)
    }

    /// A new cgroup record for `path`, first seen `now`.
    fn cgroup(&self, path: String, now: Instant) -> Arc<Cgroup> {
        Arc::new(Cgroup {
            identity: identity::parse(&path),
            files: CgroupFiles::new(&self.mounts, &path),
            path,
            first_seen: now,
        })
    }

    fn publish(&self, index: Index) {
        *self.index.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(index);
    }

    /// The tree path, from a walk: every cgroup in the tree is live, every
    /// other live one departed.
    pub fn rescan(&self) -> io::Result<RefreshStats> {
        let result = tree::scan(&self.mounts.unified);
        *lock(&self.last_rescan_error) = result.as_ref().err().map(ToString::to_string);
        let paths = result?;
        self.tree_updates[2].fetch_add(1, Ordering::Relaxed);
        let old = self.index();
        let now = Instant::now();
        let mut stats = RefreshStats {
            cgroups: paths.len(),
            ..Default::default()
        };
        let mut index = Index {
            live: HashMap::with_capacity(paths.len()),
            departed: old.departed.clone(),
            unresolved: old.unresolved.clone(),
            stats: old.stats.clone(),
        };
        for (id, path) in paths {
            let cgroup = match old.live.get(&id) {
                Some(c) if c.path == path => c.clone(),
                _ => {
                    stats.created += 1;
                    index.departed.remove(&id);
                    index.unresolved.remove(&id);
                    self.cgroup(path, now)
                }
            };
            index.live.insert(id, cgroup);
        }
        for (id, cgroup) in &old.live {
            if !index.live.contains_key(id) {
                cgroup.files.close();
                index.departed.insert(*id, (cgroup.clone(), now));
                stats.departed += 1;
            }
        }
        self.publish(index);
        Ok(stats)
    }

    /// The tree path, from the kernel's events (in the order they happened).
    pub fn apply(&self, events: &[TreeEvent]) -> RefreshStats {
        let old = self.index();
        let now = Instant::now();
        let mut index = Index::clone(&old);
        let mut stats = RefreshStats::default();
        for event in events {
            let kind = usize::from(matches!(event, TreeEvent::Removed { .. }));
            self.tree_updates[kind].fetch_add(1, Ordering::Relaxed);
            match event {
                TreeEvent::Created { id, path } => {
                    if index.live.get(id).is_some_and(|c| &c.path == path) {
                        continue; // a rescan saw it first
                    }
                    index.departed.remove(id);
                    index.unresolved.remove(id);
                    index.live.insert(*id, self.cgroup(path.clone(), now));
                    stats.created += 1;
                }
                TreeEvent::Removed { id } => {
                    if let Some(cgroup) = index.live.remove(id) {
                        cgroup.files.close();
                        index.departed.insert(*id, (cgroup, now));
                        stats.departed += 1;
                    }
                }
            }
        }
        stats.cgroups = index.live.len();
        if stats.created + stats.departed > 0 {
            self.publish(index);
        }
        stats
    }

    /// The refresh path: reads memory and CPU limits of the counted live
    /// cgroups (`all`, or only those never read yet), and retires departed
    /// and unresolved cgroups past the grace period.
    pub fn refresh(&self, all: bool) -> RefreshStats {
        let old = self.index();
        let now = Instant::now();
        let mut stats = RefreshStats {
            cgroups: old.live.len(),
            ..Default::default()
        };

        let mut retire = Vec::new();
        let mut departed = HashMap::with_capacity(old.departed.len());
        for (id, (cgroup, since)) in &old.departed {
            if now.duration_since(*since) < self.grace {
                departed.insert(*id, (cgroup.clone(), *since));
            } else {
                retire.push(*id);
            }
        }

        let counted = lock(&self.maps).ids();
        let mut unresolved = HashMap::new();
        let mut read = HashMap::with_capacity(counted.len());
        for &id in &counted {
            if let Some(cgroup) = old.live.get(&id) {
                let s = match old.stats.get(&id) {
                    Some(s) if !all => *s,
                    _ => {
                        stats.read += 1;
                        Stats {
                            memory: cgroup.files.memory.as_ref().and_then(|m| m.working_set()),
                            limit: cgroup.files.cpu.as_ref().and_then(|c| c.limit()),
                        }
                    }
                };
                read.insert(id, s);
            } else if departed.contains_key(&id) {
                if let Some(&s) = old.stats.get(&id) {
                    read.insert(id, s);
                }
            } else if !retire.contains(&id) {
                // Died before any scan or event showed it (or a socket
                // outlived its cgroup): nothing to name it by. Keep it out
                // of the series and drop its counters after the grace period.
                let first = match old.unresolved.get(&id) {
                    Some(&first) => first,
                    None => {
                        // New to us: walk the tree once before calling it
                        // dead, or a live cgroup whose event was missed
                        // would lose its counters at the end of the grace
                        // period, long before the next scheduled walk.
                        self.want_rescan();
                        now
                    }
                };
                if now.duration_since(first) < self.grace {
                    unresolved.insert(id, first);
                } else {
                    retire.push(id);
                }
            }
        }

        if !retire.is_empty() {
            lock(&self.maps).forget(&retire);
            let (mut last_cpu, mut names) = (lock(&self.last_cpu), lock(&self.names));
            for id in &retire {
                last_cpu.remove(id);
                names.remove(id);
            }
            stats.retired = retire.len();
        }

        // Only the background task changes the index (tree path and
        // refresh take turns there), so nothing was published since `old`.
        self.publish(Index {
            live: old.live.clone(),
            departed,
            unresolved,
            stats: read,
        });
        *lock(&self.last_refresh) = Some(now);
        stats
    }

    /// `Ok` when the last walk of the tree succeeded and the last refresh
    /// ran within `max_age`; otherwise why not.
    pub fn ready(&self, max_age: Duration) -> Result<(), String> {
        if let Some(e) = &*lock(&self.last_rescan_error) {
            return Err(format!("last cgroup scan failed: {e}"));
        }
        match *lock(&self.last_refresh) {
            None => Err("no refresh has completed yet".into()),
            Some(at) if at.elapsed() > max_age => {
                Err(format!("last refresh was {:?} ago", at.elapsed()))
            }
            Some(_) => Ok(()),
        }
    }
}
