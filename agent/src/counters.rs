//! Where per-cgroup counters come from: the kernel's maps in the agent, a
//! fake in unit tests.
//!
//! A [`CounterSource`] owns everything about reading counters, including
//! the monotonic floor: a reading may come out below an earlier one (a CPU
//! whose sync failed, or gone offline, keeps its pending time out of a read
//! it was in before; see `bpf::Maps::read_cpu`), and the floor keeps
//! exported values from going down. The maps and the floor sit behind one lock, so a
//! retirement ([`CounterSource::forget`]) and a read never interleave: a
//! read cannot put back the floor of an id that was just forgotten, and the
//! floor holds exactly the ids the map holds.

use crate::ids::IdMap;
use std::{
    sync::{Mutex, MutexGuard, PoisonError},
};

use podmeter_common::{CpuCounters, NetCounters, WaitHistogram};

use crate::{
    bpf::{Maps, Signals, cfs::CfsIter},
    cgroup::cpu::CfsWalk,
};

/// One read of every counter. Each map is read on its own, so one that
/// fails leaves the other's numbers usable (and the failure visible).
#[derive(Debug)]
pub struct Reading {
    /// CPU time and switches by cgroup id, monotonic per id.
    pub cpu: Result<IdMap<CpuCounters>, String>,
    /// Run-queue waits by duration and cgroup id, monotonic per id and
    /// bucket (empty with the histogram off).
    pub wait_hist: Result<IdMap<WaitHistogram>, String>,
    /// Traffic by socket cgroup id.
    pub net: Result<IdMap<NetCounters>, String>,
    /// Updates lost to full maps, `[cpu, net]` (zeros if unreadable).
    pub dropped: [u64; 2],
}

impl Reading {
    /// Every id with counters, sorted, once each.
    pub fn ids(&self) -> Vec<u64> {
        let cpu = self.cpu.as_ref().map(|m| m.keys()).into_iter().flatten();
        let net = self.net.as_ref().map(|m| m.keys()).into_iter().flatten();
        let mut ids: Vec<u64> = cpu.chain(net).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Per-cgroup counters, read at each scrape and forgotten on retirement.
pub trait CounterSource: Send + Sync + 'static {
    /// Every counter now.
    fn read(&self) -> Reading;
    /// Every id with counters (for the refresh: which cgroups are counted).
    fn ids(&self) -> Vec<u64>;
    /// Deletes the counters of cgroups gone for good.
    fn forget(&self, ids: &[u64]);
    /// cgroup events the kernel could not queue since start (`None` if
    /// unreadable now).
    fn tree_drops(&self) -> Option<u64>;
    /// Capacity of each counter map, in cgroups.
    fn capacity(&self) -> u32;
    /// What is counted beyond time, switches and traffic.
    fn signals(&self) -> Signals;
    /// The CFS bandwidth counters of every CPU-limited cgroup, from one
    /// walk of the kernel's cgroups; `None` where the kernel cannot walk
    /// them (the scrape reads each cgroup's `cpu.stat`).
    fn cfs(&self) -> Option<Result<CfsWalk, String>>;
}

/// Counters whose every field only goes up.
pub trait Monotonic: Copy + Default {
    /// Raises each field to at least `other`'s.
    fn raise(&mut self, other: &Self);
}

impl Monotonic for CpuCounters {
    fn raise(&mut self, o: &Self) {
        self.time_ns = self.time_ns.max(o.time_ns);
        self.switches = self.switches.max(o.switches);
        self.wait_ns = self.wait_ns.max(o.wait_ns);
        self.waits = self.waits.max(o.waits);
    }
}

impl Monotonic for WaitHistogram {
    fn raise(&mut self, o: &Self) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a = (*a).max(b);
        }
    }
}

/// Keeps each id's counters from going down between reads.
#[derive(Debug)]
pub struct Floor<V>(IdMap<V>);

impl<V> Default for Floor<V> {
    fn default() -> Self {
        Self(IdMap::default())
    }
}

impl<V: Monotonic> Floor<V> {
    /// Raises `read` to the floor and the floor to `read`; ids not in
    /// `read` leave the floor (the map no longer holds them).
    pub fn apply(&mut self, read: &mut IdMap<V>) {
        self.0.retain(|id, _| read.contains_key(id));
        for (id, c) in read.iter_mut() {
            let last = self.0.entry(*id).or_default();
            last.raise(c);
            *c = *last;
        }
    }

    /// Forgets `ids`.
    pub fn forget(&mut self, ids: &[u64]) {
        for id in ids {
            self.0.remove(id);
        }
    }

    /// Ids with a floor.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no id has a floor.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

struct Kernel {
    maps: Maps,
    floor: Floor<CpuCounters>,
    hist_floor: Floor<WaitHistogram>,
}

/// The kernel maps of the loaded programs.
pub struct KernelCounters {
    inner: Mutex<Kernel>,
    /// Outside `inner`: a walk does not wait for a map read.
    cfs: Option<CfsIter>,
    capacity: u32,
    signals: Signals,
}

impl KernelCounters {
    /// Counters from `maps`, and throttling counters from `cfs` if the
    /// kernel has a cgroup iterator.
    pub fn new(maps: Maps, cfs: Option<CfsIter>) -> Self {
        Self {
            cfs,
            capacity: maps.capacity(),
            signals: maps.signals(),
            inner: Mutex::new(Kernel {
                maps,
                floor: Floor::default(),
                hist_floor: Floor::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Kernel> {
        // A panic elsewhere must not take the exporter down with it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CounterSource for KernelCounters {
    fn read(&self) -> Reading {
        let mut k = self.lock();
        let Kernel {
            maps,
            floor,
            hist_floor,
        } = &mut *k;
        let cpu = maps.read_cpu().map(|mut cpu| {
            floor.apply(&mut cpu);
            cpu
        });
        // Right after the CPU map, whose read first synced every CPU's
        // pending buckets too.
        let wait_hist = maps.read_wait_hist().map(|mut h| {
            hist_floor.apply(&mut h);
            h
        });
        Reading {
            cpu: cpu.map_err(|e| e.to_string()),
            wait_hist: wait_hist.map_err(|e| e.to_string()),
            net: maps.read_net().map_err(|e| e.to_string()),
            dropped: maps.dropped().unwrap_or_default(),
        }
    }

    fn ids(&self) -> Vec<u64> {
        self.lock().maps.ids()
    }

    fn forget(&self, ids: &[u64]) {
        let mut k = self.lock();
        k.maps.forget(ids);
        k.floor.forget(ids);
        k.hist_floor.forget(ids);
    }

    fn tree_drops(&self) -> Option<u64> {
        self.lock().maps.tree_drops().ok()
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn signals(&self) -> Signals {
        self.signals
    }

    fn cfs(&self) -> Option<Result<CfsWalk, String>> {
        let walk = self.cfs.as_ref()?.walk();
        Some(walk.map_err(|e| format!("walking the cgroups with the CFS iterator: {e}")))
    }
}

/// A counter source for unit tests: counters set by the test.
#[cfg(test)]
pub mod fake {
    use super::*;

    /// What the fake holds; tests change it between reads.
    #[derive(Debug, Default)]
    pub struct State {
        /// CPU counters by id (before the floor).
        pub cpu: IdMap<CpuCounters>,
        /// Wait histograms by id.
        pub wait_hist: IdMap<WaitHistogram>,
        /// Traffic by id.
        pub net: IdMap<NetCounters>,
        /// Makes the next reads of the CPU map fail.
        pub cpu_fails: bool,
        /// Ids forgotten so far.
        pub forgotten: Vec<u64>,
        /// What [`CounterSource::cfs`] returns (`None`: no iterator).
        pub cfs: Option<Result<CfsWalk, String>>,
        floor: Floor<CpuCounters>,
    }

    /// See [`State`].
    #[derive(Debug, Default)]
    pub struct FakeCounters(pub Mutex<State>);

    impl FakeCounters {
        /// The state, to change.
        pub fn state(&self) -> MutexGuard<'_, State> {
            self.0.lock().unwrap()
        }
    }

    impl CounterSource for FakeCounters {
        fn read(&self) -> Reading {
            let mut s = self.state();
            let cpu = if s.cpu_fails {
                Err("fake map read failure".to_owned())
            } else {
                let mut cpu = s.cpu.clone();
                s.floor.apply(&mut cpu);
                Ok(cpu)
            };
            Reading {
                cpu,
                wait_hist: Ok(s.wait_hist.clone()),
                net: Ok(s.net.clone()),
                dropped: [0, 0],
            }
        }

        fn ids(&self) -> Vec<u64> {
            let s = self.state();
            let mut ids: Vec<u64> = s.cpu.keys().chain(s.net.keys()).copied().collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        }

        fn forget(&self, ids: &[u64]) {
            let mut s = self.state();
            for id in ids {
                s.cpu.remove(id);
                s.net.remove(id);
                s.wait_hist.remove(id);
                s.forgotten.push(*id);
            }
            s.floor.forget(ids);
        }

        fn tree_drops(&self) -> Option<u64> {
            Some(0)
        }

        fn capacity(&self) -> u32 {
            4096
        }

        fn signals(&self) -> Signals {
            Signals {
                run_queue: true,
                retransmits: true,
                wait_histogram: true,
            }
        }

        fn cfs(&self) -> Option<Result<CfsWalk, String>> {
            self.state().cfs.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::FakeCounters, *};

    fn cpu(time_ns: u64, switches: u64) -> CpuCounters {
        CpuCounters {
            time_ns,
            switches,
            ..CpuCounters::default()
        }
    }

    #[test]
    fn a_low_reading_never_goes_below_the_last() {
        let f = FakeCounters::default();
        f.state().cpu.insert(7, cpu(100, 5));
        assert_eq!(f.read().cpu.unwrap()[&7], cpu(100, 5));
        // A read racing an update comes out low: the floor holds.
        f.state().cpu.insert(7, cpu(90, 6));
        assert_eq!(f.read().cpu.unwrap()[&7], cpu(100, 6));
        f.state().cpu.insert(7, cpu(150, 6));
        assert_eq!(f.read().cpu.unwrap()[&7], cpu(150, 6));
    }

    #[test]
    fn a_low_histogram_reading_keeps_each_bucket_at_its_last() {
        let mut floor = Floor::default();
        let h = |c: [u64; 8]| IdMap::from_iter([(1, WaitHistogram { counts: c })]);
        let mut m = h([1, 5, 0, 0, 0, 0, 0, 2]);
        floor.apply(&mut m);
        // A CPU's pending waits missed this read: one bucket came out low.
        let mut m = h([2, 4, 0, 0, 0, 0, 0, 2]);
        floor.apply(&mut m);
        assert_eq!(m[&1].counts, [2, 5, 0, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn the_floor_holds_only_what_the_map_holds() {
        let mut floor = Floor::<CpuCounters>::default();
        let mut m = IdMap::from_iter([(1, cpu(1, 1)), (2, cpu(2, 2))]);
        floor.apply(&mut m);
        assert_eq!(floor.len(), 2);
        // Id 2 left the map (retired): its floor goes too, so a cgroup id
        // the kernel reuses later starts from its own counts.
        let mut m = IdMap::from_iter([(1, cpu(3, 1))]);
        floor.apply(&mut m);
        assert_eq!(floor.len(), 1);
        floor.forget(&[1]);
        assert!(floor.is_empty());
    }

    #[test]
    fn one_failing_map_leaves_the_other() {
        let f = FakeCounters::default();
        f.state().net.insert(
            3,
            NetCounters {
                rx_bytes: 10,
                ..Default::default()
            },
        );
        f.state().cpu_fails = true;
        let r = f.read();
        assert!(r.cpu.is_err());
        assert_eq!(r.net.unwrap()[&3].rx_bytes, 10);
    }
}
