//! The maps the programs share with the agent, and the one way to add to a
//! per-cgroup counter.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use podmeter_common::{
    CpuCounters, DEFAULT_MAX_CGROUPS, DROP_SLOTS, NetCounters, NetOnCpu, OnCpu, WaitHistogram,
};

/// On-CPU time per cgroup id. Capacity is set by the agent at load time.
#[map]
pub(crate) static PM_CPU: PerCpuHashMap<u64, CpuCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, 0);

/// Run-queue waits by duration per cgroup id, with `--wait-histogram`.
/// The agent sets the capacity at load time: its `--max-cgroups`, or 1
/// (no memory to speak of) with the histogram off.
#[map]
pub(crate) static PM_WAIT_HIST: PerCpuHashMap<u64, WaitHistogram> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, 0);

/// Traffic per socket cgroup id. Capacity is set by the agent at load time.
#[map]
pub(crate) static PM_NET: PerCpuHashMap<u64, NetCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, 0);

/// What each CPU runs, and its CPU time not yet in `PM_CPU` (one slot, per
/// CPU).
#[map]
pub(crate) static PM_ONCPU: PerCpuArray<OnCpu> = PerCpuArray::with_max_entries(1, 0);

/// Traffic each CPU counted and has not yet added to `PM_NET` (one slot,
/// per CPU).
#[map]
pub(crate) static PM_NET_ONCPU: PerCpuArray<NetOnCpu> = PerCpuArray::with_max_entries(1, 0);

/// Updates lost because a counter map was full, by `DROP_*` index.
#[map]
pub(crate) static PM_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_SLOTS, 0);

/// Returns this CPU's slot for `cgroup_id` in `map`, creating it zeroed if
/// needed. `None` means the map is full; the caller's loss is counted in
/// `PM_DROPS[drop_slot]`.
#[inline(always)]
pub(crate) fn slot<V: Default>(
    map: &PerCpuHashMap<u64, V>,
    cgroup_id: u64,
    drop_slot: u32,
) -> Option<*mut V> {
    match try_slot(map, cgroup_id) {
        Ok(v) => Some(v),
        Err(_) => {
            count_drops(drop_slot, 1);
            None
        }
    }
}

/// [`slot`], counting nothing: `Err` holds why the key could not be made
/// (`-E2BIG`: the map is full; `-EBUSY`: this CPU interrupted an update of
/// the map's bucket, and a later try may succeed).
#[inline(always)]
pub(crate) fn try_slot<V: Default>(
    map: &PerCpuHashMap<u64, V>,
    cgroup_id: u64,
) -> Result<*mut V, i32> {
    if let Some(v) = map.get_ptr_mut(cgroup_id) {
        return Ok(v);
    }
    // NOEXIST: another program on this CPU (ingress softirq over egress) may
    // have created the key meanwhile; overwriting would lose its update.
    let made = map.insert(cgroup_id, V::default(), u64::from(BPF_NOEXIST));
    match map.get_ptr_mut(cgroup_id) {
        Some(v) => Ok(v),
        None => Err(made.err().unwrap_or(0)),
    }
}

/// Counts `n` updates lost in `PM_DROPS[drop_slot]`.
#[inline(always)]
pub(crate) fn count_drops(drop_slot: u32, n: u64) {
    if let Some(d) = PM_DROPS.get_ptr_mut(drop_slot) {
        // Atomic: a packet program may interrupt another one's count.
        // SAFETY: per-CPU slot; the pointer is valid for this program run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(d, n) };
    }
}
