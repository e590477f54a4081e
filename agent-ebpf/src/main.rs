//! podmeter's kernel programs.
//!
//! * [`sched`]: on-CPU time and context switches per cgroup v2 id, from the
//!   `sched_switch` tracepoint (BTF-enabled, or raw as a fallback) plus a
//!   per-CPU sampling tick.
//! * [`net`]: bytes and packets per socket cgroup id, from `cgroup_skb`
//!   ingress and egress attached at the cgroup2 root.
//! * [`cfs`]: CFS bandwidth counters of every CPU-limited cgroup, by a
//!   cgroup iterator the agent reads at each scrape (Linux 6.1).
//! * [`tcp`]: TCP retransmits per socket cgroup id, from the sockets' own
//!   count at the `tcp_retransmit_skb` and `inet_sock_set_state`
//!   tracepoints.
//!
//! Minimum kernel version: 5.8 (BPF_MAP_TYPE_PERCPU_HASH in all the
//! contexts used, `bpf_skb_cgroup_id`, bpf_link for cgroups).
#![no_std]
#![no_main]
// Atomic adds on map values (see `net`): the BPF target lacks CAS, so core
// does not expose `AtomicU64::fetch_add` there.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only atomic add on bpf"
)]

mod cfs;
mod maps;
mod net;
mod sched;
mod tcp;
mod tree;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach here; it is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
