//! Types shared by podmeter's kernel programs and the userspace agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes these
//! structures into BPF maps and the agent reads the same bytes back. Change a
//! layout on both sides at once; the size assertions below catch drift.
#![cfg_attr(not(test), no_std)]

/// Capacity, in cgroups, of the per-cgroup counter maps unless the agent
/// overrides it at load time (`--max-cgroups`). Per-CPU hash maps are
/// preallocated: kernel memory is `entries × CPUs × value size`.
pub const DEFAULT_MAX_CGROUPS: u32 = 4096;

/// Index into [`DROPS`](crate) counters: an update to the CPU map failed.
pub const DROP_CPU: u32 = 0;
/// Index into the drop counters: an update to the network map failed.
pub const DROP_NET: u32 = 1;
/// Index into the drop counters: a cgroup tree event did not fit in the
/// ring buffer (the agent then walks the tree instead).
pub const DROP_TREE: u32 = 2;
/// Number of drop counters.
pub const DROP_SLOTS: u32 = 3;

/// Period of the per-CPU sampling tick, in nanoseconds.
///
/// `sched_switch` alone only bills a task when it leaves the CPU; a busy loop
/// alone on a core may run for seconds without a switch. The tick bills the
/// slice in progress and sends the pending counters to the map, so the map
/// never lags a CPU by more than one period, for 50 cheap events per CPU
/// per second. Before a read the agent also has each CPU do the same (the
/// sync program), so a reading lags by nothing where the kernel can run it
/// (5.10 and later) and by at most this period elsewhere.
pub const TICK_PERIOD_NS: u64 = 20_000_000;

/// On-CPU time, context switches and run-queue waits of one cgroup, per
/// CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuCounters {
    /// Nanoseconds tasks of this cgroup spent on the CPU.
    pub time_ns: u64,
    /// Times a task of this cgroup left the CPU.
    pub switches: u64,
    /// Nanoseconds tasks of this cgroup waited, runnable, in a run queue
    /// (the growth of the kernel's `sched_info.run_delay`).
    pub wait_ns: u64,
    /// Waits that ended with the task on a CPU (the growth of
    /// `sched_info.pcount`).
    pub waits: u64,
}

/// Buckets of the run-queue wait histogram (`--wait-histogram`), the last
/// one open-ended.
pub const WAIT_BUCKETS: usize = 8;

/// Upper bound, in nanoseconds, of wait bucket `i` below the last: the
/// powers of two from 2^18 ns (262 µs) to 2^24 ns (16.8 ms), a log2
/// histogram. Eight buckets span only 2^7, so they sit where starvation
/// shows: below a quarter millisecond a task barely waited (one bucket),
/// a scheduler slice is a few ms, and beyond 16.8 ms (`+Inf`) it waited
/// several slices of others.
pub const fn wait_bucket_bound_ns(i: usize) -> u64 {
    1 << (18 + i)
}

/// The bucket of a wait of `ns` nanoseconds: the first whose bound is at
/// least `ns` (Prometheus' `le`), else the last.
#[inline(always)]
pub fn wait_bucket(ns: u64) -> usize {
    let mut i = 0;
    // Unrolled by the compiler: seven compares, a bounded index for the
    // verifier.
    while i < WAIT_BUCKETS - 1 {
        if ns <= wait_bucket_bound_ns(i) {
            return i;
        }
        i += 1;
    }
    WAIT_BUCKETS - 1
}

/// Run-queue waits of one cgroup by duration (see [`wait_bucket`]), per
/// CPU: each bucket counts waits, not cumulative.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitHistogram {
    /// Waits per bucket.
    pub counts: [u64; WAIT_BUCKETS],
}

/// Traffic of one cgroup (by socket cgroup), per CPU.
///
/// Ingress and egress write disjoint fields, so an egress program interrupted
/// by ingress softirq on the same CPU cannot lose the other's update.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Bytes received, IP header included (`skb->len` at the cgroup hook).
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes transmitted, IP header included.
    pub tx_bytes: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
    /// TCP segments retransmitted by the cgroup's sockets: what their
    /// `tcp_sock.total_retrans` (`tcpi_total_retrans`) grew by, added at
    /// each `tcp_retransmit_skb` and when the socket closes.
    pub retransmits: u64,
}

/// cgroups whose CPU time each CPU keeps in [`OnCpu::pending`] before it
/// goes to `PM_CPU`: enough for the few cgroups a CPU alternates between at
/// a time (two pods talking over a pipe, kernel threads, the container
/// runtime), few enough to search on every switch.
pub const PENDING_SLOTS: usize = 4;

/// CPU time and switches of one cgroup on one CPU, not yet in `PM_CPU`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// cgroup id; 0 for a free slot.
    pub cgroup_id: u64,
    /// Nanoseconds.
    pub time_ns: u64,
    /// Times a task of the cgroup left the CPU.
    pub switches: u64,
    /// Nanoseconds waited in a run queue.
    pub wait_ns: u64,
    /// Waits ended.
    pub waits: u64,
}

/// What one CPU is running, and the CPU time not yet added to `PM_CPU`.
///
/// Switches add up in `pending` instead of the hash map: a map lookup costs
/// more than the rest of the `sched_switch` program together. A cgroup's
/// pending counters go to the map when its slot is needed for another
/// cgroup, at every tick, and when the agent syncs the CPU before a read,
/// so together they normally hold at most one tick period of the CPU's time
/// (more only while a map cannot take a new key, see `retry_later`).
///
/// Only programs running on the CPU itself touch its copy: the agent never
/// reads it, but runs the sync program on each CPU (an IPI) and reads
/// `PM_CPU`, so no cross-CPU memory ordering is involved, on x86-64 or on
/// weakly ordered arm64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OnCpu {
    /// Non-zero while a program updates this copy. Only a tick interrupting
    /// a sync that the agent ran in process context (on the CPU it was
    /// already on) can see it set: that tick leaves the copy alone, and
    /// the next one bills its time.
    pub busy: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last tick or sync;
    /// when billing wall-clock time (no `sum_exec_runtime` offset), also of
    /// every switch. 0 until the first event on this CPU.
    pub since_ns: u64,
    /// Kernel address of the task on the CPU (its `task_struct`).
    pub task: u64,
    /// That task's `se.sum_exec_runtime` when its time was last billed.
    pub runtime_ns: u64,
    /// That task's `sched_info.run_delay` when its waits were last billed.
    pub run_delay_ns: u64,
    /// That task's `sched_info.pcount` then.
    pub pcount: u64,
    /// The slot of `pending` that goes to the map when a cgroup without
    /// one needs a slot (they take turns).
    pub victim: u64,
    /// Counters not yet in `PM_CPU`.
    pub pending: [Pending; PENDING_SLOTS],
    /// The waits of each `pending` slot by duration, not yet in
    /// `PM_WAIT_HIST`, when the histogram is on. Apart from `pending`, so
    /// that the slot search of every switch reads no more memory than
    /// without the histogram.
    pub buckets: [WaitHistogram; PENDING_SLOTS],
}

/// Socket cgroups whose traffic each CPU keeps, per direction, in
/// [`NetOnCpu::pending`] before it goes to `PM_NET`: a client and its server
/// on one CPU, or a pod and the node's agent, without a map update per
/// packet.
pub const NET_PENDING_SLOTS: usize = 2;

/// What the sync program returns when it left counters pending: it found
/// the CPU's [`NetOnCpu`] in the middle of an update, or a map could not
/// make a cgroup's key just now (it interrupted an update of the key's
/// bucket). The agent runs it again.
pub const SYNC_BUSY: i32 = 1;

/// [`NetOnCpu::pending`] index of received traffic.
pub const NET_INGRESS: usize = 0;
/// [`NetOnCpu::pending`] index of sent traffic.
pub const NET_EGRESS: usize = 1;

/// Traffic of one socket cgroup in one direction on one CPU, not yet in
/// `PM_NET`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetPending {
    /// Socket cgroup id (0 for a slot never used, or a socket without one).
    pub cgroup_id: u64,
    /// Bytes, IP header included.
    pub bytes: u64,
    /// Packets.
    pub packets: u64,
}

/// The traffic a CPU has counted and not yet added to `PM_NET`.
///
/// Packets add up here instead of in the hash map: the map lookup and its
/// two atomic adds were most of the per-packet cost. A cgroup's counters
/// go to the map when its slot is needed for another one, at every tick,
/// and when the agent syncs the CPU before a read: the same protocol as
/// [`OnCpu`], so the agent never reads this copy.
///
/// Unlike `sched_switch`, the packet programs run with interrupts on and,
/// in process context, even preemptible (only migration is off): another
/// packet program may run on the CPU in the middle of an update. `busy`
/// lets one program at a time hold the copy (see agent-ebpf/src/net.rs);
/// a packet that cannot goes to `PM_NET` directly, and a tick or sync
/// that cannot leaves the copy for the next one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetOnCpu {
    /// Programs holding or trying to hold this copy (atomic adds); the one
    /// that finds 1 after its own add holds it.
    pub busy: u64,
    /// Per direction, the slot of `pending` that goes to the map when a
    /// cgroup without one needs a slot (they take turns).
    pub victim: [u64; 2],
    /// Per direction ([`NET_INGRESS`], [`NET_EGRESS`]), the counters not
    /// yet in `PM_NET`.
    pub pending: [[NetPending; NET_PENDING_SLOTS]; 2],
}

/// [`TreeEvent::kind`] of a `cgroup_mkdir`.
pub const TREE_MKDIR: u32 = 1;
/// [`TreeEvent::kind`] of a `cgroup_rmdir`.
pub const TREE_RMDIR: u32 = 2;
/// Room for a cgroup's path in a [`TreeEvent`], NUL included. Kubernetes'
/// deepest (systemd driver) container paths are under 200 bytes; a longer
/// path arrives flagged as cut and the agent walks the tree for it.
pub const TREE_PATH_MAX: usize = 512;

/// A cgroup made or removed in the cgroup2 hierarchy, from the
/// `cgroup_mkdir`/`cgroup_rmdir` tracepoints, through a ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TreeEvent {
    /// The cgroup's id.
    pub id: u64,
    /// [`TREE_MKDIR`] or [`TREE_RMDIR`].
    pub kind: u32,
    /// Bytes of `path` before its NUL; 0 when the path could not be read,
    /// [`TREE_PATH_MAX`] when it did not fit.
    pub path_len: u32,
    /// Path from the hierarchy's root (`/a/b`), NUL-terminated.
    pub path: [u8; TREE_PATH_MAX],
}

impl TreeEvent {
    /// The path, when it was read whole.
    pub fn path(&self) -> Option<&[u8]> {
        let len = self.path_len as usize;
        (len > 0 && len < TREE_PATH_MAX).then(|| &self.path[..len])
    }
}

/// The CFS bandwidth counters of one CPU-limited cgroup, as the cgroup
/// iterator `pm_cfs_iter` writes them into `PM_CFS` (what `cpu.stat`
/// prints as `nr_periods`, `nr_throttled` and `throttled_usec`/`_time`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CfsRecord {
    /// The cgroup's id in the hierarchy iterated (its kernfs node id).
    pub id: u64,
    /// Enforcement periods with runnable tasks.
    pub periods: u32,
    /// Periods in which the cgroup was throttled.
    pub throttled: u32,
    /// Time throttled, in nanoseconds.
    pub throttled_ns: u64,
}

// Userspace sums each map value over CPUs.
impl core::ops::AddAssign for CpuCounters {
    fn add_assign(&mut self, o: Self) {
        self.time_ns += o.time_ns;
        self.switches += o.switches;
        self.wait_ns += o.wait_ns;
        self.waits += o.waits;
    }
}

impl core::ops::AddAssign for WaitHistogram {
    fn add_assign(&mut self, o: Self) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
    }
}

impl core::ops::AddAssign for NetCounters {
    fn add_assign(&mut self, o: Self) {
        self.rx_bytes += o.rx_bytes;
        self.rx_packets += o.rx_packets;
        self.tx_bytes += o.tx_bytes;
        self.tx_packets += o.tx_packets;
        self.retransmits += o.retransmits;
    }
}

const _: () = assert!(core::mem::size_of::<CpuCounters>() == 32);
const _: () = assert!(core::mem::size_of::<NetCounters>() == 40);
const _: () = assert!(core::mem::size_of::<OnCpu>() == 56 + (40 + 64) * PENDING_SLOTS);
const _: () = assert!(core::mem::size_of::<WaitHistogram>() == 8 * WAIT_BUCKETS);
const _: () = assert!(core::mem::size_of::<NetOnCpu>() == 24 + 2 * 24 * NET_PENDING_SLOTS);
// The programs bound indices by masking.
const _: () = assert!(PENDING_SLOTS.is_power_of_two() && WAIT_BUCKETS.is_power_of_two());
const _: () = assert!(NET_PENDING_SLOTS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<TreeEvent>() == 16 + TREE_PATH_MAX);
// An array element, with no padding: userspace reads the records in place.
const _: () = assert!(core::mem::size_of::<CfsRecord>() == 24);

/// How many retransmitting, not yet closed TCP sockets the retransmit
/// program remembers (`PM_TCP_SEEN`, preallocated: about 1 MiB of kernel
/// memory); beyond it a socket's retransmits are counted by their
/// segments.
pub const TCP_SOCKETS: u32 = 16_384;

/// The retransmitted segments to add for a socket whose
/// `tcp_sock.total_retrans` is now `total`, given its `total_retrans` when
/// podmeter last counted it (`None`: never, or no room to remember), and
/// the segments of the retransmit at hand, which count only when nothing
/// was seen before (growth before it is history from before podmeter
/// looked). A `last` above `total` cannot be this connection's (its close
/// was missed, and an earlier socket at the same address left it): this
/// one is new. The caller then remembers `total`.
pub fn retransmits_added(last: Option<u64>, total: u64, segments: u64) -> u64 {
    match last {
        Some(last) if total >= last => total - last,
        _ => segments,
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` integers with no padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::CpuCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WaitHistogram {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_fall_in_the_first_bucket_whose_bound_holds_them() {
        let bounds: Vec<u64> = (0..WAIT_BUCKETS - 1).map(wait_bucket_bound_ns).collect();
        assert_eq!(bounds.first(), Some(&262_144));
        assert_eq!(bounds.last(), Some(&16_777_216));
        assert!(bounds.windows(2).all(|w| w[1] == 2 * w[0]), "log2");
        assert_eq!(wait_bucket(0), 0);
        for (i, &b) in bounds.iter().enumerate() {
            assert_eq!(wait_bucket(b), i, "a wait of exactly the bound is `le` it");
            assert_eq!(wait_bucket(b + 1), i + 1);
        }
        assert_eq!(wait_bucket(u64::MAX), WAIT_BUCKETS - 1);
    }

    #[test]
    fn retransmits_add_what_the_socket_s_own_count_grew_by() {
        // First seen: the skb's segments, not the history before.
        assert_eq!(retransmits_added(None, 7, 2), 2);
        // Then the kernel's own growth, whatever the skb carries...
        assert_eq!(retransmits_added(Some(7), 8, 5), 1);
        // ...so a run that was skipped, or a failed transmit the old
        // tracepoint did not report, is made up at the next one.
        assert_eq!(retransmits_added(Some(8), 12, 1), 4);
        // An attempt the kernel gave up on before counting adds nothing.
        assert_eq!(retransmits_added(Some(12), 12, 1), 0);
        // An entry left by an earlier socket at the same address.
        assert_eq!(retransmits_added(Some(12), 3, 1), 1);
    }
}
