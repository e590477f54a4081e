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
/// needed. `None` means the key cannot be made (the map is full, or, rarely,
/// busy: see [`retry_later`]); the caller's loss is counted in
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

/// Whether a key [`try_slot`] could not make may be made by a later try,
/// so that a flush keeps its counters pending rather than losing them.
/// `-EBUSY` (before 6.15; `-EDEADLK` or `-ETIMEDOUT` with the resilient
/// spin locks since): this CPU is inside another update of the same lock
/// stripe of the map, in a program this one interrupted or in a task
/// preempted in a map syscall (5.11 to 6.0 hold the stripe with only
/// migration off). `0`, or `-EEXIST` with no key to look up: the key was
/// made and deleted at once (the agent forgetting the cgroup). Anything
/// else (`-E2BIG`, a full map) stays so: the counters are lost, and counted
/// as dropped.
#[inline(always)]
pub(crate) fn retry_later(err: i32) -> bool {
    const EBUSY: i32 = -16;
    const EEXIST: i32 = -17;
    const EDEADLK: i32 = -35;
    const ETIMEDOUT: i32 = -110;
    matches!(err, 0 | EBUSY | EEXIST | EDEADLK | ETIMEDOUT)
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
