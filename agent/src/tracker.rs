//! Which cgroups podmeter reports, under which identity, for how long.
//!
//! Two paths share a [`Tracker`]:
//! * the scrape path ([`Tracker::snapshot`]) reads the kernel maps and joins
//!   them with the current [`Index`]; it never walks the filesystem, so it
//!   never waits on anything slow. Its only file reads are each live
//!   cgroup's CPU limit and `cpu.stat` (two small cgroupfs files, see
//!   `cgroup::cpu`): throttling counters are `rate()`d next to CPU usage and
//!   must be as fresh as the maps;
//! * the refresh path ([`Tracker::refresh`], in the background every
//!   `--refresh-interval`, and at once when a scrape meets an unknown id)
//!   walks the cgroup2 tree, parses new paths, reads memory, and retires
//!   cgroups that have been gone longer than the grace period.
//!
//! A cgroup that disappears keeps its final values for the grace period so
//! its last increase is not lost between scrapes; then its series go and its
//! kernel map entries are deleted, which keeps cardinality bounded by what
//! is alive plus what died within the grace period.

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    time::{Duration, Instant},
};

use aya::maps::MapError;
use podmeter_common::{CpuCounters, NetCounters};
use tokio::sync::Notify;

use crate::{
    bpf::Maps,
    cgroup::{Identity, Mounts, cpu, identity, memory, tree},
    kube::{Lookup, Names, PodStore},
};

/// A cgroup podmeter knows by path.
#[derive(Debug)]
pub struct Cgroup {
    /// Path relative to the cgroup2 root, `/a/b`.
    pub path: String,
    /// What the path says about its owner.
    pub identity: Identity,
    /// When a scan first saw it.
    pub first_seen: Instant,
}

/// The id → cgroup view the scrape path reads; replaced whole by each refresh.
#[derive(Debug, Default)]
pub struct Index {
    live: HashMap<u64, Arc<Cgroup>>,
    /// Gone from the tree, with when that was noticed.
    departed: HashMap<u64, (Arc<Cgroup>, Instant)>,
    /// Counted by the kernel but never seen in the tree, with first sighting.
    unresolved: HashMap<u64, Instant>,
    /// Working set by id, for counted cgroups (departed: last value read).
    memory: HashMap<u64, u64>,
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
    /// The cgroup.
    pub cgroup: Arc<Cgroup>,
    /// CPU counters, if the cgroup ran.
    pub cpu: Option<CpuCounters>,
    /// Traffic counters, if it had sockets with traffic.
    pub net: Option<NetCounters>,
    /// Memory working set, if its hierarchy accounts memory.
    pub memory: Option<u64>,
    /// CPU limit and throttling, if a cpu controller covers the cgroup
    /// (live cgroups only: a departed one has no files to read).
    pub cpu_bandwidth: Option<cpu::Bandwidth>,
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
    /// Pods in the API watch's store, and watch errors so far, when the
    /// Kubernetes API is in use.
    pub kubernetes: Option<(usize, u64)>,
}

/// What one refresh did, for logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RefreshStats {
    /// Cgroups in the tree.
    pub cgroups: usize,
    /// Newly departed.
    pub departed: usize,
    /// Retired after the grace period (map entries deleted).
    pub retired: usize,
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
    /// Wakes the refresher early.
    pub wake: Notify,
    last_refresh: Mutex<Option<Result<Instant, String>>>,
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
            last_refresh: Mutex::new(None),
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
        let mut live_rows = Vec::with_capacity(ids.len());
        let mut unknown = false;
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
            live_rows.push(is_live);
            let cpu = reading.cpu.get(&id).map(|c| {
                let last = last_cpu.entry(id).or_default();
                last.time_ns = last.time_ns.max(c.time_ns);
                last.switches = last.switches.max(c.switches);
                *last
            });
            rows.push(Row {
                cgroup: cgroup.clone(),
                cpu,
                net: reading.net.get(&id).copied(),
                memory: index.memory.get(&id).copied(),
                cpu_bandwidth: None,
                names,
            });
        }
        drop(last_cpu);
        drop(names);
        // File reads outside the locks: a slow cgroupfs never holds up the
        // refresher or another scrape.
        for (row, _) in rows.iter_mut().zip(live_rows).filter(|(_, live)| *live) {
            row.cpu_bandwidth = cpu::bandwidth(&self.mounts, &row.cgroup.path);
        }
        if unknown {
            self.wake.notify_one();
        }
        Ok(Snapshot {
            tracked: [live, index.departed.len(), index.unresolved.len(), awaiting],
            kubernetes: pods
                .map(|(p, _)| (p.len(), p.errors.load(std::sync::atomic::Ordering::Relaxed))),
            rows,
            dropped: reading.dropped,
            entries: [reading.cpu.len(), reading.net.len()],
            capacity,
        })
    }

    /// The refresh path: rescan the tree, read memory, retire the departed.
    pub fn refresh(&self) -> io::Result<RefreshStats> {
        let result = self.refresh_inner();
        *lock(&self.last_refresh) = Some(match &result {
            Ok(_) => Ok(Instant::now()),
            Err(e) => Err(e.to_string()),
        });
        result
    }

    fn refresh_inner(&self) -> io::Result<RefreshStats> {
        let paths = tree::scan(&self.mounts.unified)?;
        let old = self.index();
        let now = Instant::now();
        let mut stats = RefreshStats {
            cgroups: paths.len(),
            ..Default::default()
        };

        let mut live = HashMap::with_capacity(paths.len());
        for (id, path) in paths {
            let cgroup = match old.live.get(&id) {
                Some(c) if c.path == path => c.clone(),
                _ => Arc::new(Cgroup {
                    identity: identity::parse(&path),
                    path,
                    first_seen: now,
                }),
            };
            live.insert(id, cgroup);
        }

        let mut retire = Vec::new();
        let mut departed = HashMap::new();
        for (id, cgroup) in &old.live {
            if !live.contains_key(id) {
                departed.insert(*id, (cgroup.clone(), now));
                stats.departed += 1;
            }
        }
        for (id, (cgroup, since)) in &old.departed {
            if live.contains_key(id) {
                continue;
            }
            if now.duration_since(*since) < self.grace {
                departed.insert(*id, (cgroup.clone(), *since));
            } else {
                retire.push(*id);
            }
        }

        let counted = lock(&self.maps).ids();
        let mut unresolved = HashMap::new();
        let mut memory = HashMap::new();
        for &id in &counted {
            if let Some(cgroup) = live.get(&id) {
                if let Some(ws) = memory::working_set(&self.mounts, &cgroup.path) {
                    memory.insert(id, ws);
                }
            } else if departed.contains_key(&id) {
                if let Some(&ws) = old.memory.get(&id) {
                    memory.insert(id, ws);
                }
            } else if !retire.contains(&id) {
                // Died before any scan saw it (or a socket outlived its
                // cgroup): nothing to name it by. Keep it out of the series
                // and drop its counters after the grace period.
                let first = old.unresolved.get(&id).copied().unwrap_or(now);
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

        *self.index.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Index {
            live,
            departed,
            unresolved,
            memory,
        });
        Ok(stats)
    }

    /// `Ok` when the last refresh succeeded within `max_age`; otherwise why not.
    pub fn ready(&self, max_age: Duration) -> Result<(), String> {
        match &*lock(&self.last_refresh) {
            None => Err("no cgroup scan has completed yet".into()),
            Some(Err(e)) => Err(format!("last cgroup scan failed: {e}")),
            Some(Ok(at)) if at.elapsed() > max_age => {
                Err(format!("last cgroup scan was {:?} ago", at.elapsed()))
            }
            Some(Ok(_)) => Ok(()),
        }
    }
}
