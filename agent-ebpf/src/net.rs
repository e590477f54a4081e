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

use crate::maps::{PM_NET, PM_NET_ONCPU, slot};

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

/// Sends this CPU's pending traffic to `PM_NET`. `false` when a packet
/// program on this CPU is in the middle of an update (it was interrupted
/// or preempted): the traffic then stays pending, to go at a later call.
#[inline(always)]
pub(crate) fn flush_pending() -> bool {
    let Some(mut net) = Update::begin() else {
        return false;
    };
    for dir in [NET_INGRESS, NET_EGRESS] {
        for i in 0..NET_PENDING_SLOTS {
            net.flush(dir, i);
        }
    }
    net.commit();
    true
}

/// Adds to `cgroup_id`'s counters in `PM_NET`. Atomic adds: this CPU's
/// copy of the value may be in the middle of another program's update.
#[inline(always)]
fn add_to_map(cgroup_id: u64, dir: usize, bytes: u64, packets: u64) {
    let Some(c) = slot(&PM_NET, cgroup_id, DROP_NET) else {
        return;
    };
    let c: *mut NetCounters = c;
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

/// `*dst = v`, as a volatile store: the compiler must neither drop nor move
/// the stores that another program on this CPU may see (`busy` first).
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
    /// `None` when the copy is missing or another program on this CPU is in
    /// the middle of an update.
    #[inline(always)]
    fn begin() -> Option<Self> {
        let net = PM_NET_ONCPU.get_ptr_mut(0)?;
        // SAFETY (here and in every method): this CPU's copy, valid for
        // this program run, and only programs on this CPU touch it. A
        // program that interrupts us between the load and the store runs
        // to its end first, leaving `busy` as it found it.
        unsafe {
            if core::ptr::read_volatile(&raw const (*net).busy) != 0 {
                return None;
            }
            put(&raw mut (*net).busy, 1);
        }
        Some(Self { net })
    }

    /// Adds a packet of `len` bytes to `cgroup_id`'s slot in direction
    /// `dir`. A cgroup without a slot takes the next one in turn, whose
    /// counters go to the map first.
    #[inline(always)]
    fn add(&mut self, dir: usize, cgroup_id: u64, len: u64) {
        let n = self.net;
        // The masks bound the indices for the verifier (and are no-ops).
        let dir = dir & 1;
        // SAFETY: see `begin`.
        unsafe {
            for i in 0..NET_PENDING_SLOTS {
                let p = &raw mut (*n).pending[dir][i];
                if (*p).cgroup_id == cgroup_id {
                    put(&raw mut (*p).bytes, (*p).bytes + len);
                    put(&raw mut (*p).packets, (*p).packets + 1);
                    return;
                }
            }
            let v = (*n).victim[dir] as usize & (NET_PENDING_SLOTS - 1);
            put(
                &raw mut (*n).victim[dir],
                ((v + 1) & (NET_PENDING_SLOTS - 1)) as u64,
            );
            self.flush(dir, v);
            let p = &raw mut (*n).pending[dir][v];
            put(&raw mut (*p).cgroup_id, cgroup_id);
            put(&raw mut (*p).bytes, len);
            put(&raw mut (*p).packets, 1);
        }
    }

    /// Sends slot `i` of direction `dir` to `PM_NET`. The slot keeps its
    /// cgroup, so the flow goes on adding to it.
    #[inline(always)]
    fn flush(&mut self, dir: usize, i: usize) {
        let (dir, i) = (dir & 1, i & (NET_PENDING_SLOTS - 1));
        // SAFETY: see `begin`.
        unsafe {
            let p = &raw mut (*self.net).pending[dir][i];
            let packets = (*p).packets;
            if packets == 0 {
                return;
            }
            add_to_map((*p).cgroup_id, dir, (*p).bytes, packets);
            put(&raw mut (*p).bytes, 0);
            put(&raw mut (*p).packets, 0);
        }
    }

    #[inline(always)]
    fn commit(self) {
        // SAFETY: see `begin`.
        unsafe { put(&raw mut (*self.net).busy, 0) };
    }
}
