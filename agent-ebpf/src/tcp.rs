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
//! What is added is the kernel's own count: at each retransmit the program
//! reads the socket's `tcp_sock.total_retrans` and adds what it grew by
//! since podmeter last read it ([`PM_TCP_SEEN`]), and once more when the
//! socket closes ([`pm_tcp_close`]). So a run of the program that did not
//! happen, or a retransmit the tracepoint does not report, is made up at
//! the socket's next retransmit or at its close. Only a socket's first
//! retransmit seen is counted the old way, by the skb's segments: the
//! growth before it is history from before podmeter looked (retransmits
//! before the agent first started, SYN-ACK retransmits an accepted socket
//! inherits from its request). The same goes for every retransmit of a
//! socket met while the map is full.
//!
//! Two flavours, because the tracepoint changed meaning. Before 6.17 it
//! fires with `(sk, skb)` only for a retransmit whose transmit succeeded,
//! so one whose transmit failed locally (a full veth backlog or qdisc, an
//! nftables drop on output; the kernel's `TCPRetransFail`) is counted at
//! the socket's next retransmit sent or at its close, and missed only when
//! it came before the socket's first one sent. Since then it fires for
//! every attempt with `(sk, skb, err)`, and a first one seen is counted
//! unless it was given up before the kernel counted it
//! ([`gave_up_before_counting`]). The kernel refuses to attach a program
//! reading a third argument to a tracepoint that has two, which is how the
//! agent picks.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{map, raw_tracepoint},
    maps::HashMap,
    programs::RawTracePointContext,
};
use podmeter_common::{DROP_NET, NetCounters, TCP_SOCKETS, retransmits_added};

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
/// `tcp_sock.total_retrans` (a `u32`): the socket's retransmitted segments
/// by the kernel's count, what `TCP_INFO` reports as `tcpi_total_retrans`.
#[unsafe(no_mangle)]
static TCP_TOTAL_RETRANS_OFFSET: u64 = 0;

/// Each retransmitting socket's `total_retrans` when podmeter last counted
/// it, by the socket's address; removed when the socket closes. A plain
/// hash, not an LRU one: when it is full a new socket's retransmits are
/// counted by their segments, as first ones, and no live socket's entry
/// is evicted under it (its growth would go uncounted, and a write through
/// a stale pointer could land in another socket's entry).
#[map]
static PM_TCP_SEEN: HashMap<u64, u64> = HashMap::with_max_entries(TCP_SOCKETS, 0);

/// `TCP_CLOSE` in the kernel's TCP states.
const TCP_CLOSE: i32 = 7;

/// `tcp:tcp_retransmit_skb(sk, skb)` (before 6.17): fires only for a
/// retransmit that went out.
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn pm_tcp_retransmit(ctx: RawTracePointContext) -> i32 {
    count(ctx.arg(0), ctx.arg(1), true);
    0
}

/// `tcp:tcp_retransmit_skb(sk, skb, err)` (6.17 and later, kernel commit
/// ad892e912b84 "tcp: trace retransmit failures in tcp_retransmit_skb"):
/// fires for every attempt, whether or not the kernel counted it.
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn pm_tcp_retransmit_err(ctx: RawTracePointContext) -> i32 {
    let err: u64 = ctx.arg(2);
    // An `int`, widened: only its low half counts.
    count(
        ctx.arg(0),
        ctx.arg(1),
        !gave_up_before_counting(err as u32 as i32),
    );
    0
}

/// `sock:inet_sock_set_state(sk, oldstate, newstate)` into `TCP_CLOSE`:
/// the socket's retransmits since its last one reported (before 6.17, the
/// failed ones after the last one sent), and its entry freed. Every TCP
/// socket passes here before it is destroyed, and so does one that
/// `tcp_disconnect` is about to reuse with its count reset to 0 (a
/// `connect(AF_UNSPEC)`, a failed connect tried again on the same socket):
/// its next retransmit is a first one again. For every other socket and
/// state change this is one comparison, or one lookup.
///
/// A close can still go unseen: since 6.1 the kernel skips a run of this
/// program nested in another on the same CPU (a softirq closing a socket
/// while a task changes another's state). That socket's last growth is
/// lost, and its entry stays until a socket at the same address finds it:
/// one whose count is below it is taken for new, one at or above it is
/// undercounted by the dead socket's count.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn pm_tcp_close(ctx: RawTracePointContext) -> i32 {
    let newstate: u64 = ctx.arg(2);
    // An `int`, widened: only its low half counts.
    if newstate as u32 as i32 != TCP_CLOSE {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let Some(seen) = PM_TCP_SEEN.get_ptr_mut(sk) else {
        return 0;
    };
    // SAFETY: the pointer is to this socket's u64, valid in this run; the
    // socket's lock keeps its retransmits out meanwhile. Poisoned before
    // the removal, which can fail (a bucket busy on this CPU): an entry left
    // above any count makes the next socket at this address a new one.
    let last = unsafe { core::mem::replace(&mut *seen, u64::MAX) };
    let _ = PM_TCP_SEEN.remove(sk);
    // Nothing to go by but the count: a `last` above it cannot be this
    // connection's.
    let added = total_retrans(sk).map_or(0, |total| retransmits_added(Some(last), total, 0));
    if added != 0 {
        add(sk, added);
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
/// early one: missed if it is the socket's first seen, else counted by the
/// growth of `total_retrans` anyway.)
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

/// Adds the socket's retransmitted segments since podmeter last counted
/// it to its cgroup. `counted` says whether the kernel counted this
/// attempt; it matters only for a socket seen for the first time, whose
/// skb's segments are all there is to go by.
#[inline(always)]
fn count(sk: u64, skb: u64, counted: bool) {
    let Some(total) = total_retrans(sk) else {
        if counted {
            add(sk, segments(skb));
        }
        return;
    };
    let seen = PM_TCP_SEEN.get_ptr_mut(sk);
    // SAFETY: the pointer is to this socket's u64, valid in this run.
    let last = seen.map(|p| unsafe { *p });
    let added = retransmits_added(last, total, if counted { segments(skb) } else { 0 });
    match seen {
        // The socket's lock serialises its retransmits and its end, so no
        // other CPU writes the entry meanwhile.
        // SAFETY: as above.
        Some(p) => unsafe { *p = total },
        // A full map leaves the socket unseen: its next retransmit is
        // counted as a first one again.
        None => {
            let _ = PM_TCP_SEEN.insert(sk, total, 0);
        }
    }
    if added != 0 {
        add(sk, added);
    }
}

/// The socket's `tcp_sock.total_retrans`.
#[inline(always)]
fn total_retrans(sk: u64) -> Option<u64> {
    // SAFETY: probe_read tolerates any address; a fault returns an error.
    unsafe { bpf_probe_read_kernel((sk + offset(&TCP_TOTAL_RETRANS_OFFSET)) as *const u32) }
        .ok()
        .map(u64::from)
}

/// The segments the skb carries, as the kernel adds them to
/// `total_retrans`.
#[inline(always)]
fn segments(skb: u64) -> u64 {
    // SAFETY: probe_read tolerates any address; a fault returns an error.
    unsafe {
        bpf_probe_read_kernel(
            (skb + offset(&SKB_CB_OFFSET) + offset(&TCP_GSO_SEGS_OFFSET)) as *const u16,
        )
    }
    .map_or(1, |s| u64::from(s.max(1)))
}

/// Adds `segs` retransmitted segments to the socket cgroup's counter.
#[inline(always)]
fn add(sk: u64, segs: u64) {
    let Some(cgroup_id) = socket_cgroup_id(sk) else {
        return;
    };
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
