//! TCP retransmits per socket cgroup.
//!
//! Retransmits fire from timers and softirqs as often as from the sending
//! task, so the current task says nothing about whose they are: the socket
//! does. `sk->sk_cgrp_data` holds the socket's cgroup2 cgroup, the same one
//! `bpf_skb_cgroup_id` names in [`crate::net`], so retransmits land next to
//! the socket's traffic.
//!
//! Raw tracepoints with `bpf_probe_read_kernel`: retransmits are rare next
//! to switches and packets, so the helpers' cost does not matter.
//!
//! Two flavours, because the tracepoint changed meaning. Before 6.17 it
//! fires with `(sk, skb)` only for a retransmit whose transmit succeeded.
//! Since then it fires for every attempt with `(sk, skb, err)`, which lets
//! podmeter count what the kernel adds to `tcpi_total_retrans`: every
//! attempt that reached the transmit, including the
//! ones the transmit itself failed (a full veth backlog or qdisc, an
//! nftables drop on output), but not the ones given up before it
//! ([`gave_up_before_counting`]). Before 6.17 those local transmit failures
//! are invisible here; the kernel counts them in `TCPRetransFail`. The
//! kernel refuses to attach a program reading a third argument to a
//! tracepoint that has two, which is how the agent picks.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::raw_tracepoint, programs::RawTracePointContext,
};
use podmeter_common::{DROP_NET, NetCounters};

use crate::{
    maps::{PM_NET, slot},
    sched::{CGROUP_KN_OFFSET, KERNFS_NODE_ID_OFFSET, offset},
};

/// `sock.sk_cgrp_data`: its first word is the socket's `struct cgroup *`
/// (5.15 and later), or before 5.15 a union whose low bit is 0 when it
/// holds that pointer.
#[unsafe(no_mangle)]
static SOCK_CGRP_DATA_OFFSET: u64 = 0;
/// `sk_buff.cb`, which TCP uses as its `tcp_skb_cb`.
#[unsafe(no_mangle)]
static SKB_CB_OFFSET: u64 = 0;
/// `tcp_skb_cb.tcp_gso_segs`: the segments the skb carries.
#[unsafe(no_mangle)]
static TCP_GSO_SEGS_OFFSET: u64 = 0;

/// `tcp:tcp_retransmit_skb(sk, skb)` (before 6.17): fires only for a
/// retransmit that went out.
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn pm_tcp_retransmit(ctx: RawTracePointContext) -> i32 {
    count(ctx.arg(0), ctx.arg(1));
    0
}

/// `tcp:tcp_retransmit_skb(sk, skb, err)` (6.17 and later, kernel commit
/// ad892e912b84 "tcp: trace retransmit failures in tcp_retransmit_skb"):
/// fires for every attempt, whether or not the kernel counted it.
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn pm_tcp_retransmit_err(ctx: RawTracePointContext) -> i32 {
    let err: u64 = ctx.arg(2);
    // An `int`, widened: only its low half counts.
    if !gave_up_before_counting(err as u32 as i32) {
        count(ctx.arg(0), ctx.arg(1));
    }
    0
}

/// Whether `__tcp_retransmit_skb` returned `err` before it added the
/// segments to `tcp_sock.total_retrans`: the original still queued
/// (`-EBUSY`), a sequence error (`-EINVAL`), no memory to trim, split or
/// unclone the skb (`-ENOMEM`), no route (`-EHOSTUNREACH`), no receive
/// window (`-EAGAIN`). Any other error came from the transmit, after the
/// kernel counted the attempt. (A transmit failing with one of these
/// errnos, `-EINVAL` from a missing neighbour entry, `-ENOMEM` or
/// `-EHOSTUNREACH` from a route lost between two lookups, is taken for an
/// early one and missed.)
#[inline(always)]
pub fn gave_up_before_counting(err: i32) -> bool {
    const EBUSY: i32 = 16;
    const EINVAL: i32 = 22;
    const ENOMEM: i32 = 12;
    const EHOSTUNREACH: i32 = 113;
    const EAGAIN: i32 = 11;
    matches!(
        err.wrapping_neg(),
        EBUSY | EINVAL | ENOMEM | EHOSTUNREACH | EAGAIN
    )
}

/// Adds the skb's segments to the socket cgroup's retransmits, as the
/// kernel adds them to `tcpi_total_retrans`.
#[inline(always)]
fn count(sk: u64, skb: u64) {
    let Some(cgroup_id) = socket_cgroup_id(sk) else {
        return;
    };
    // SAFETY: probe_read tolerates any address; a fault returns an error.
    let segs = unsafe {
        bpf_probe_read_kernel(
            (skb + offset(&SKB_CB_OFFSET) + offset(&TCP_GSO_SEGS_OFFSET)) as *const u16,
        )
    }
    .map_or(1, |s| u64::from(s.max(1)));
    let Some(c) = slot(&PM_NET, cgroup_id, DROP_NET) else {
        return;
    };
    let c: *mut NetCounters = c;
    // Atomic, as in `net`: a retransmit from a timer can interrupt the
    // socket's task updating the same per-CPU value.
    // SAFETY: the slot is a valid, aligned u64 inside the map value.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*c).retransmits, segs);
    }
}

/// `sk->sk_cgrp_data.cgroup->kn->id`; `None` where the data holds no
/// cgroup pointer (pre-5.15 sockets tagged by v1 net_prio/net_cls).
#[inline(always)]
fn socket_cgroup_id(sk: u64) -> Option<u64> {
    // SAFETY (each read): probe_read tolerates any address.
    let cgroup: u64 =
        unsafe { bpf_probe_read_kernel((sk + offset(&SOCK_CGRP_DATA_OFFSET)) as *const u64) }
            .ok()?;
    if cgroup == 0 || cgroup & 1 != 0 {
        return None;
    }
    let kn: u64 =
        unsafe { bpf_probe_read_kernel((cgroup + offset(&CGROUP_KN_OFFSET)) as *const u64) }
            .ok()?;
    unsafe { bpf_probe_read_kernel((kn + offset(&KERNFS_NODE_ID_OFFSET)) as *const u64) }.ok()
}
