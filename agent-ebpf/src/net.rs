//! Traffic per socket cgroup.
//!
//! Attached once at the cgroup2 root, `cgroup_skb` programs see every packet
//! of every socket on the host; `bpf_skb_cgroup_id` names the cgroup of the
//! socket, which is what bills a pod even with `hostNetwork: true`. The
//! programs only count: they always let the packet through.
//!
//! Every packet on the node pays for them, so a packet normally touches no
//! hash map: it adds to its cgroup's slot in this CPU's [`NetOnCpu`], whose
//! counters go to `PM_NET` when the slot is needed for another cgroup, at
//! each tick, and when the agent syncs the CPU before a read
//! ([`flush_pending`], run by the sched programs' tick and sync). A packet
//! that finds the copy in use by a program it interrupted (or preempted)
//! goes to `PM_NET` directly, with atomic adds.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::generated::bpf_skb_cgroup_id, macros::cgroup_skb, programs::SkBuffContext,
};
use podmeter_common::{
    DROP_NET, NET_EGRESS, NET_INGRESS, NET_PENDING_SLOTS, NetCounters, NetOnCpu,
};

use crate::maps::{PM_NET, PM_NET_ONCPU, count_drops, retry_later, try_slot};

const PASS: i32 = 1;

#[cgroup_skb(ingress)]
pub fn pm_skb_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, NET_INGRESS);
    PASS
}

#[cgroup_skb(egress)]
pub fn pm_skb_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, NET_EGRESS);
    PASS
}

#[inline(always)]
fn count(ctx: &SkBuffContext, dir: usize) {
    // SAFETY: the context's skb pointer is the one the kernel passed in.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let len = u64::from(ctx.len());
    match Update::begin() {
        Some(mut net) => {
            net.add(dir, cgroup_id, len);
            net.commit();
        }
        None => add_to_map(cgroup_id, dir, len, 1),
    }
}

/// Sends this CPU's pending traffic to `PM_NET`. `false` when some stays
/// pending: a packet program on this CPU is in the middle of an update
/// (this call interrupted it, or it was preempted), or the map could not
/// take a new key just now. It goes at a later call.
#[inline(always)]
pub(crate) fn flush_pending() -> bool {
    let Some(mut net) = Update::begin() else {
        return false;
    };
    let mut all = true;
    for dir in [NET_INGRESS, NET_EGRESS] {
        for i in 0..NET_PENDING_SLOTS {
            all &= net.flush(dir, i);
        }
    }
    net.commit();
    all
}

/// Adds to `cgroup_id`'s counters in `PM_NET`, or counts the update as lost.
#[inline(always)]
fn add_to_map(cgroup_id: u64, dir: usize, bytes: u64, packets: u64) {
    if let Ok(c) = try_slot(&PM_NET, cgroup_id) {
        add(c, dir, bytes, packets);
    } else {
        count_drops(DROP_NET, 1);
    }
}

/// Adds to one counter value of `PM_NET`. Atomic adds: this CPU's copy of
/// the value may be in the middle of another program's update.
#[inline(always)]
fn add(c: *mut NetCounters, dir: usize, bytes: u64, packets: u64) {
    // SAFETY: the slot is a valid, aligned u64 inside the map value.
    let (b, p) = unsafe {
        if dir == NET_INGRESS {
            (&raw mut (*c).rx_bytes, &raw mut (*c).rx_packets)
        } else {
            (&raw mut (*c).tx_bytes, &raw mut (*c).tx_packets)
        }
    };
    // The BPF target has no compare-and-swap, so core's `AtomicU64` offers
    // no `fetch_add`; the intrinsic lowers to BPF's native atomic add.
    // SAFETY: as above.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(b, bytes);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, packets);
    }
}

/// An update of this CPU's [`NetOnCpu`], in place, between
/// [`Update::begin`] and [`Update::commit`] (see [`NetOnCpu`] for why it
/// needs `busy`).
struct Update {
    net: *mut NetOnCpu,
}

/// `*src`, as a volatile load, and [`put`]: the compiler may neither drop
/// the slot's loads and stores nor move them out from between `begin` and
/// `commit`, where another program on this CPU may see them.
///
/// # Safety
///
/// `src` must point into this CPU's [`NetOnCpu`].
#[inline(always)]
unsafe fn get(src: *const u64) -> u64 {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(src) }
}

/// `*dst = v`, as a volatile store (see [`get`]).
///
/// # Safety
///
/// `dst` must point into this CPU's [`NetOnCpu`].
#[inline(always)]
unsafe fn put(dst: *mut u64, v: u64) {
    // SAFETY: see above.
    unsafe { core::ptr::write_volatile(dst, v) }
}

impl Update {
    /// `None` when the copy is missing or another program on this CPU holds
    /// it.
    ///
    /// `busy` counts the programs trying to hold the copy, and one holds it
    /// only if it finds the count at 1 right after adding its own: whatever
    /// comes between (an interrupt, or, since only migration is off, a
    /// task that preempts this one) adds to the count first, so at most
    /// one program ever holds the copy. A plain load and store of a flag
    /// would let a preempting task take the copy after this program saw it
    /// free, and both would hold it.
    #[inline(always)]
    fn begin() -> Option<Self> {
        let net = PM_NET_ONCPU.get_ptr_mut(0)?;
        let busy = {
            // SAFETY: this CPU's copy, valid for this program run.
            unsafe { &raw mut (*net).busy }
        };
        // SAFETY: as above; an atomic add on a map value.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(busy, 1) };
        // Ordered after the add by its address; every later access to the
        // copy is volatile, so ordered after this load.
        // SAFETY: as above.
        if unsafe { get(busy) } != 1 {
            // SAFETY: as above; adding 2^64 - 1 subtracts 1.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(busy, u64::MAX) };
            return None;
        }
        Some(Self { net })
    }

    /// Adds a packet of `len` bytes to `cgroup_id`'s slot in direction
    /// `dir`. A cgroup without a slot takes the next one in turn, whose
    /// counters go to the map first; if they cannot go yet, the packet goes
    /// to the map itself.
    #[inline(always)]
    fn add(&mut self, dir: usize, cgroup_id: u64, len: u64) {
        let n = self.net;
        // The masks bound the indices for the verifier (and are no-ops).
        let dir = dir & 1;
        // SAFETY (every access): this CPU's copy, held (see `begin`).
        unsafe {
            for i in 0..NET_PENDING_SLOTS {
                let p = &raw mut (*n).pending[dir][i];
                if get(&raw const (*p).cgroup_id) == cgroup_id {
                    put(&raw mut (*p).bytes, get(&raw const (*p).bytes) + len);
                    put(&raw mut (*p).packets, get(&raw const (*p).packets) + 1);
                    return;
                }
            }
            let v = get(&raw const (*n).victim[dir]) as usize & (NET_PENDING_SLOTS - 1);
            if !self.flush(dir, v) {
                add_to_map(cgroup_id, dir, len, 1);
                return;
            }
            put(
                &raw mut (*n).victim[dir],
                ((v + 1) & (NET_PENDING_SLOTS - 1)) as u64,
            );
            let p = &raw mut (*n).pending[dir][v];
            put(&raw mut (*p).cgroup_id, cgroup_id);
            put(&raw mut (*p).bytes, len);
            put(&raw mut (*p).packets, 1);
        }
    }

    /// Sends slot `i` of direction `dir` to `PM_NET`; the slot keeps its
    /// cgroup, so the flow goes on adding to it. `false` when the counters
    /// stay in the slot: the map could not make the cgroup's key just now
    /// ([`retry_later`]). A full map loses them, counted as dropped.
    #[inline(always)]
    fn flush(&mut self, dir: usize, i: usize) -> bool {
        let (dir, i) = (dir & 1, i & (NET_PENDING_SLOTS - 1));
        // SAFETY (every access): this CPU's copy, held (see `begin`).
        unsafe {
            let p = &raw mut (*self.net).pending[dir][i];
            let packets = get(&raw const (*p).packets);
            if packets == 0 {
                return true;
            }
            match try_slot(&PM_NET, get(&raw const (*p).cgroup_id)) {
                Ok(c) => add(c, dir, get(&raw const (*p).bytes), packets),
                Err(e) if retry_later(e) => return false,
                Err(_) => count_drops(DROP_NET, packets),
            }
            put(&raw mut (*p).bytes, 0);
            put(&raw mut (*p).packets, 0);
        }
        true
    }

    /// Lets go of the copy. Release: no access to the copy may move past
    /// it.
    #[inline(always)]
    fn commit(self) {
        // SAFETY: this CPU's copy, held; adding 2^64 - 1 subtracts 1.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Release }>(
                &raw mut (*self.net).busy,
                u64::MAX,
            )
        };
    }
}
