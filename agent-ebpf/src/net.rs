//! Traffic per socket cgroup.
//!
//! Attached once at the cgroup2 root, `cgroup_skb` programs see every packet
//! of every socket on the host; `bpf_skb_cgroup_id` names the cgroup of the
//! socket, which is what bills a pod even with `hostNetwork: true`. The
//! programs only count: they always let the packet through.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::generated::bpf_skb_cgroup_id, macros::cgroup_skb, programs::SkBuffContext,
};
use podmeter_common::{DROP_NET, NetCounters};

use crate::maps::{PM_NET, slot};

const PASS: i32 = 1;

#[cgroup_skb(ingress)]
pub fn pm_skb_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, true);
    PASS
}

#[cgroup_skb(egress)]
pub fn pm_skb_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, false);
    PASS
}

#[inline(always)]
fn count(ctx: &SkBuffContext, ingress: bool) {
    // SAFETY: the context's skb pointer is the one the kernel passed in.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let Some(c) = slot(&PM_NET, cgroup_id, DROP_NET) else {
        return;
    };
    let c: *mut NetCounters = c;
    let len = u64::from(ctx.len());
    // Atomic adds: an egress program in process context can be interrupted by
    // another egress (softirq retransmit, ACK) on the same CPU.
    // SAFETY: the slot is a valid, aligned u64 inside the map value.
    let (bytes, packets) = unsafe {
        if ingress {
            (&raw mut (*c).rx_bytes, &raw mut (*c).rx_packets)
        } else {
            (&raw mut (*c).tx_bytes, &raw mut (*c).tx_packets)
        }
    };
    // The BPF target has no compare-and-swap, so core's `AtomicU64` offers
    // no `fetch_add`; the intrinsic lowers to BPF's native atomic add.
    // SAFETY: as above.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, len);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(packets, 1);
    }
}
