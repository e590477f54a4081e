//! Loading podmeter's kernel programs and reading their maps.
//!
//! The object is built from `agent-ebpf` by this crate's build script and
//! embedded in the binary. Every attachment is an fd-backed link owned by
//! [`Attached`]: dropping it (or the process dying) detaches everything, so a
//! stopped agent leaves nothing in `bpftool prog list`.

mod btf;

use std::{collections::HashMap, fs::File, io, path::Path};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, PerfEvent, ProgramError, RawTracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
    util::online_cpus,
};
use nix::time::{ClockId, clock_gettime};
use podmeter_common::{CpuCounters, DROP_CPU, DROP_NET, NetCounters, OnCpu, TICK_PERIOD_NS};

/// The eBPF object, aligned as aya needs it.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podmeter-ebpf"));

/// Why the kernel programs could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object was rejected as a whole (maps, BTF).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    /// A program failed to load or attach.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What aya/the kernel said.
        source: ProgramError,
    },
    /// A map is missing or of the wrong type.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What aya said.
        source: MapError,
    },
    /// The object lacks something the agent expects (a build mismatch).
    #[error("eBPF object has no {0}; the embedded object does not match this agent")]
    Missing(&'static str),
    /// The cgroup2 root could not be opened for attaching.
    #[error("opening cgroup2 root {path} to attach network programs: {source}")]
    CgroupRoot {
        /// The path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The online CPUs could not be listed.
    #[error("listing online CPUs ({0}): {1}")]
    Cpus(&'static str, io::Error),
}

/// The attached programs. Dropping this detaches them.
pub struct Attached {
    _ebpf: Ebpf,
}

/// The maps the agent reads at scrape time.
pub struct Maps {
    cpu: PerCpuHashMap<MapData, u64, CpuCounters>,
    net: PerCpuHashMap<MapData, u64, NetCounters>,
    oncpu: PerCpuArray<MapData, OnCpu>,
    drops: PerCpuArray<MapData, u64>,
    capacity: u32,
}

/// Per-cgroup totals summed over CPUs, at one instant.
#[derive(Debug, Default)]
pub struct Reading {
    /// CPU time (including slices still running) and switches by cgroup id.
    pub cpu: HashMap<u64, CpuCounters>,
    /// Traffic by socket cgroup id.
    pub net: HashMap<u64, NetCounters>,
    /// Updates lost to full maps, `[cpu, net]`.
    pub dropped: [u64; 2],
}

/// Loads the embedded object with counter maps of `max_cgroups` entries and
/// attaches every program: `sched_switch`, a tick on each online CPU, and
/// `cgroup_skb` ingress/egress at `cgroup2_root`.
pub fn load(
    cgroup2_root: &Path,
    btf_path: &Path,
    max_cgroups: u32,
) -> Result<(Attached, Maps), BpfError> {
    let sum_exec_offset = sum_exec_runtime_offset(btf_path);
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("PM_CPU", max_cgroups)
        .map_max_entries("PM_NET", max_cgroups)
        .override_global("SUM_EXEC_RUNTIME_OFFSET", &sum_exec_offset, true)
        .load(OBJECT)?;

    let prog = |name| BpfError::Missing(name);
    let err = |name| move |source| BpfError::Program { name, source };

    let name = "pm_sched_switch";
    let p: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or(prog(name))?
        .try_into()
        .map_err(err(name))?;
    p.load().map_err(err(name))?;
    p.attach("sched_switch").map_err(err(name))?;

    let name = "pm_cpu_tick";
    let p: &mut PerfEvent = ebpf
        .program_mut(name)
        .ok_or(prog(name))?
        .try_into()
        .map_err(err(name))?;
    p.load().map_err(err(name))?;
    for cpu in online_cpus().map_err(|(what, e)| BpfError::Cpus(what, e))? {
        p.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Period(TICK_PERIOD_NS),
            false,
        )
        .map_err(err(name))?;
    }

    let root = File::open(cgroup2_root).map_err(|source| BpfError::CgroupRoot {
        path: cgroup2_root.display().to_string(),
        source,
    })?;
    for (name, ty) in [
        ("pm_skb_ingress", CgroupSkbAttachType::Ingress),
        ("pm_skb_egress", CgroupSkbAttachType::Egress),
    ] {
        let p: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or(prog(name))?
            .try_into()
            .map_err(err(name))?;
        p.load().map_err(err(name))?;
        // On 5.7+ aya attaches through a bpf_link, which the kernel always
        // attaches in multi mode: the root is shared with Cilium, other
        // monitors or a second podmeter. The link API takes no flags, so
        // `AllowMultiple` (BPF_F_ALLOW_MULTI) would be refused with EINVAL.
        p.attach(&root, ty, CgroupAttachMode::Single)
            .map_err(err(name))?;
    }

    let maps = Maps {
        cpu: take(&mut ebpf, "PM_CPU")?,
        net: take(&mut ebpf, "PM_NET")?,
        oncpu: take(&mut ebpf, "PM_ONCPU")?,
        drops: take(&mut ebpf, "PM_DROPS")?,
        capacity: max_cgroups,
    };
    Ok((Attached { _ebpf: ebpf }, maps))
}

/// Where the kernel keeps a task's accounted CPU time, so the programs bill
/// exactly what `cpu.stat` counts. 0 (bill wall-clock time between events,
/// which includes a VM's steal time) if BTF cannot tell.
fn sum_exec_runtime_offset(btf_path: &Path) -> u64 {
    let found = std::fs::read(btf_path)
        .map_err(|e| e.to_string())
        .and_then(|data| {
            btf::Btf::parse(&data)
                .and_then(|b| b.offset("task_struct", &["se", "sum_exec_runtime"]))
                .map_err(|e| e.to_string())
        });
    match found {
        Ok(off) => {
            tracing::debug!(offset = off, "task_struct.se.sum_exec_runtime");
            off
        }
        Err(e) => {
            tracing::warn!(
                "cannot locate task_struct.se.sum_exec_runtime in {} ({e}); billing wall-clock time between switches, which includes steal time on VMs",
                btf_path.display()
            );
            0
        }
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::Missing(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> u64 {
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Every entry of a per-CPU counter map, summed over CPUs.
///
/// aya's iterator already skips a key deleted between get_next_key and
/// lookup; any error it does return is a failed syscall (e.g. EPERM once
/// capabilities are gone), which must fail the read rather than show up as
/// a map with fewer cgroups.
fn totals<V>(map: &PerCpuHashMap<MapData, u64, V>) -> Result<HashMap<u64, V>, MapError>
where
    V: aya::Pod + Default + std::ops::AddAssign,
{
    map.iter()
        .map(|entry| {
            let (id, per_cpu) = entry?;
            let mut sum = V::default();
            for v in per_cpu.iter() {
                sum += *v;
            }
            Ok((id, sum))
        })
        .collect()
}

impl Maps {
    /// Capacity of each counter map, in cgroups.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Reads every counter, summed over CPUs.
    ///
    /// CPU time includes the slice each CPU is running now, when a tick has
    /// said whose it is: a task that never leaves its CPU still shows
    /// up-to-date time. The counters are read before the per-CPU state, so a
    /// switch racing the read can only make this reading low, never high;
    /// the caller keeps exported values monotonic.
    pub fn read(&self) -> Result<Reading, MapError> {
        let mut cpu = totals(&self.cpu)?;
        // Two reads that agree mean no CPU switched mid-read (no torn slot).
        let a = self.oncpu.get(&0, 0)?;
        let b = self.oncpu.get(&0, 0)?;
        let now = monotonic_ns();
        for (x, y) in a.iter().zip(b.iter()) {
            if x == y && x.cgroup_id != 0 && x.since_ns != 0 {
                cpu.entry(x.cgroup_id).or_default().time_ns += now.saturating_sub(x.since_ns);
            }
        }

        let net = totals(&self.net)?;

        let mut dropped = [0; 2];
        for (slot, idx) in dropped.iter_mut().zip([DROP_CPU, DROP_NET]) {
            *slot = self.drops.get(&idx, 0)?.iter().sum();
        }
        Ok(Reading { cpu, net, dropped })
    }

    /// Every cgroup id either counter map holds.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .cpu
            .keys()
            .flatten()
            .chain(self.net.keys().flatten())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Deletes the counters of cgroups that are gone for good.
    pub fn forget(&mut self, ids: &[u64]) {
        for id in ids {
            // NotFound is fine: a cgroup may have had only CPU or only traffic.
            let _ = self.cpu.remove(id);
            let _ = self.net.remove(id);
        }
    }
}
