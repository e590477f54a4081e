//! CPU time per cgroup.
//!
//! `sched_switch` bills the task leaving the CPU (`prev`, also the current
//! task) to its cgroup v2 id. What is billed is the growth of the task's
//! `se.sum_exec_runtime` since it came on the CPU: the very quantity the
//! kernel adds to the cgroup's `cpu.stat usage_usec`, so steal time on a VM
//! (excluded by the kernel) is excluded here too. The idle task (pid 0) lives
//! in the root cgroup and is never billed.
//!
//! The switch runs hundreds of thousands of times a second on a busy node, so
//! it calls no helper and does no map lookup in the common case:
//!
//! * [`pm_sched_switch`], a BTF-enabled tracepoint (`tp_btf`), reads
//!   `prev` and `next` with plain loads, which the verifier checks against
//!   the kernel's BTF and the JIT makes fault-safe. The offsets come from the
//!   running kernel's BTF, via the agent (no CO-RE in Rust).
//! * Time and switches add up in this CPU's [`OnCpu`] slot, which holds
//!   the counters of the last few cgroups the CPU billed, and go to `PM_CPU`
//!   when their cgroup's place is needed for another one, at every tick and
//!   at every sync.
//!
//! [`pm_sched_switch_raw`] is the fallback for kernels that refuse the
//! `tp_btf` program: a raw tracepoint with `bpf_probe_read_kernel` and
//! helpers, the same state and the same results, about twice the cost.
//!
//! A per-CPU tick (a `cpu-clock` perf event the agent opens on every CPU)
//! bills long slices as they run (and sends the CPU's pending traffic to
//! `PM_NET`, see `net`). Before it reads `PM_CPU`, the agent runs
//! [`pm_cpu_sync`], the tick's work, on every CPU: the read then holds the
//! time up to that moment, and only programs on a CPU ever touch its
//! [`OnCpu`] slot (no cross-CPU ordering to get right on arm64).
//!
//! A task that leaves the CPU when the CPU has not seen it come on (the
//! kernel switched without the tracepoint) is billed from where the
//! scheduler picked it (`se.prev_sum_exec_runtime`, fair-class policies,
//! at most two tick periods); right after the agent starts, such a slice is
//! not billed: see `Update::slice`.
//!
//! Without the `sum_exec_runtime` offset (0; the agent then loads only the
//! fallback), wall-clock time between events is billed instead.
//!
//! Run-queue waits ride the same path: the kernel already keeps each task's
//! total wait (`sched_info.run_delay`, the second field of
//! `/proc/<pid>/schedstat`) and count of waits (`pcount`), and adds a wait
//! when the task gets the CPU, just after `sched_switch` fires. So the
//! values a task shows when it leaves the CPU, less those it showed when it
//! came on, are the wait that ended with this slice: two more reads per
//! task (direct loads in the `tp_btf` flavour, probe reads in the raw one),
//! no per-task map and no wakeup program. A task's wait is billed to
//! the cgroup it leaves the CPU in, like its time. A wait the kernel splits
//! by moving the queued task to another CPU counts from the move: the part
//! before it was added to `run_delay` while no CPU watched the task.
//!
//! With the wait histogram on (`WAIT_HISTOGRAM`, `--wait-histogram`), the
//! wait billed at a switch also lands in its duration's bucket, beside the
//! pending slot (`OnCpu::buckets`), and goes to `PM_WAIT_HIST` when the
//! slot is flushed: one more map update per flush, none per switch. A slice
//! ends at most one wait (its own start), so each wait is bucketed by its
//! own length; the rare billing that ends several (counted across a move
//! between CPUs) is bucketed by their average.

use core::ptr::null_mut;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns},
    },
    macros::{btf_tracepoint, perf_event, raw_tracepoint},
    programs::{BtfTracePointContext, PerfEventContext, RawTracePointContext},
};
use podmeter_common::{
    DROP_CPU, OnCpu, PENDING_SLOTS, SYNC_BUSY, TICK_PERIOD_NS, WAIT_BUCKETS, wait_bucket,
};

use crate::maps::{PM_CPU, PM_ONCPU, PM_WAIT_HIST, count_drops, retry_later, slot, try_slot};

// Byte offsets of kernel struct members, set by the agent at load time from
// kernel BTF (0 if not found).

/// `task_struct.se.sum_exec_runtime`.
#[unsafe(no_mangle)]
static SUM_EXEC_RUNTIME_OFFSET: u64 = 0;
/// `task_struct.se.prev_sum_exec_runtime`: the task's runtime when the
/// scheduler last picked it (kept by the fair class only).
#[unsafe(no_mangle)]
static PREV_SUM_EXEC_RUNTIME_OFFSET: u64 = 0;
/// `task_struct.policy`.
#[unsafe(no_mangle)]
static TASK_POLICY_OFFSET: u64 = 0;
/// `task_struct.pid`.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u64 = 0;
/// `task_struct.cgroups`.
#[unsafe(no_mangle)]
static TASK_CGROUPS_OFFSET: u64 = 0;
/// `css_set.dfl_cgrp`.
#[unsafe(no_mangle)]
static CSS_SET_DFL_CGRP_OFFSET: u64 = 0;
/// `cgroup.kn`.
#[unsafe(no_mangle)]
pub(crate) static CGROUP_KN_OFFSET: u64 = 0;
/// `kernfs_node.id`.
#[unsafe(no_mangle)]
pub(crate) static KERNFS_NODE_ID_OFFSET: u64 = 0;
/// `task_struct.sched_info.run_delay` (0 without `CONFIG_SCHED_INFO`: waits
/// are then not counted).
#[unsafe(no_mangle)]
static RUN_DELAY_OFFSET: u64 = 0;
/// `task_struct.sched_info.pcount`.
#[unsafe(no_mangle)]
static PCOUNT_OFFSET: u64 = 0;

/// Non-zero: waits are also counted by duration (`--wait-histogram`). Set
/// by the agent at load time; read-only, so the verifier drops the
/// histogram's code when it is 0.
#[unsafe(no_mangle)]
static WAIT_HISTOGRAM: u64 = 0;

/// `sched:sched_switch` with BTF-typed arguments: `preempt`, `prev`, `next`
/// (task_struct pointers), `prev_state`.
#[btf_tracepoint(function = "sched_switch")]
pub fn pm_sched_switch(ctx: BtfTracePointContext) -> i32 {
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let Some(mut cpu) = Update::begin() else {
        return 0;
    };
    // SAFETY (all `field` calls): `prev` and `next` are BTF-typed task
    // pointers, the offsets their members' in this kernel's BTF.
    let next_rt = unsafe { field::<u64>(next, &SUM_EXEC_RUNTIME_OFFSET) };
    if cpu.handled(next as u64, next_rt) {
        cpu.commit();
        return 0;
    }
    if unsafe { field::<i32>(prev, &TASK_PID_OFFSET) } != 0 {
        let rt = unsafe { field::<u64>(prev, &SUM_EXEC_RUNTIME_OFFSET) };
        let time = cpu.slice(prev as u64, Some(rt), 0, || unsafe { picked(prev) });
        let wait = cpu.waited(prev as u64, unsafe { delays(prev) });
        cpu.bill(unsafe { task_cgroup_id(prev) }, time, 1, wait);
    }
    cpu.running(next as u64, next_rt, unsafe { delays(next) });
    cpu.commit();
    0
}

/// `sched:sched_switch`, raw form, where the `tp_btf` program cannot load.
/// Arguments: `preempt`, `prev`, `next` (task_struct addresses),
/// `prev_state`.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn pm_sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    let Some(mut cpu) = Update::begin() else {
        return 0;
    };
    // Only wall-clock billing needs the time.
    let wall_clock = offset(&SUM_EXEC_RUNTIME_OFFSET) == 0;
    // SAFETY: helper without preconditions.
    let now = if wall_clock {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let next_rt = runtime(next);
    if let Some(rt) = next_rt
        && cpu.handled(next, rt)
    {
        cpu.commit();
        return 0;
    }
    if bpf_get_current_pid_tgid() as u32 != 0 {
        let time = cpu.slice(prev, runtime(prev), now, || read_picked(prev));
        let wait = cpu.waited(prev, read_delays(prev));
        // SAFETY: helper without preconditions.
        cpu.bill(unsafe { bpf_get_current_cgroup_id() }, time, 1, wait);
    }
    cpu.running(next, next_rt.unwrap_or(0), read_delays(next));
    if wall_clock {
        cpu.since(now);
    }
    cpu.commit();
    0
}

/// Periodic sample on each CPU (a `cpu-clock` perf event every
/// `TICK_PERIOD_NS`): see [`sample`].
/// The tick also sends the CPU's pending traffic to `PM_NET`
/// ([`crate::net`]).
#[perf_event]
pub fn pm_cpu_tick(_ctx: PerfEventContext) -> u32 {
    // What either leaves pending (a busy map, or a packet program it
    // interrupted) goes at the next tick or sync.
    let _ = sample();
    let _ = crate::net::flush_pending();
    0
}

/// Never attached: the agent runs it on each CPU before it reads `PM_CPU`
/// (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_RUN_ON_CPU`, an IPI), so the read
/// holds every CPU's time up to that moment, and the agent never reads
/// another CPU's [`OnCpu`]. See [`sample`]. It sends the CPU's pending
/// traffic to `PM_NET` too, and returns [`SYNC_BUSY`] when something stays
/// pending (a packet program it interrupted was updating the traffic, or a
/// map could not make a key just now), for the agent to ask again.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn pm_cpu_sync(_ctx: RawTracePointContext) -> i32 {
    // Both, whatever the first returns.
    let cpu = sample();
    let net = crate::net::flush_pending();
    if cpu && net { 0 } else { SYNC_BUSY }
}

/// Bills the slice of the task on this CPU so far, sends the pending
/// counters to the map and records the task as running from now. `false`
/// when some counters stay pending (see [`flush`]).
#[inline(always)]
fn sample() -> bool {
    let Some(mut cpu) = Update::begin() else {
        return false;
    };
    // SAFETY: helpers without preconditions.
    let (task, now) = unsafe { (bpf_get_current_task(), bpf_ktime_get_ns()) };
    let rt = runtime(task);
    let delays = read_delays(task);
    if bpf_get_current_pid_tgid() as u32 != 0 {
        // SAFETY: helper without preconditions.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        let time = cpu.slice(task, rt, now, || read_picked(task));
        let wait = cpu.waited(task, delays);
        cpu.bill(cgroup_id, time, 0, wait);
    }
    let all = cpu.flush();
    cpu.since(now);
    cpu.running(task, rt.unwrap_or(0), delays);
    cpu.commit();
    all
}

/// The value of an offset global the loader may have rewritten.
#[inline(always)]
pub(crate) fn offset(global: &u64) -> u64 {
    // SAFETY: a plain read of a global; volatile so that the compiler does
    // not fold the 0 it was built with.
    unsafe { core::ptr::read_volatile(global) }
}

/// The `T` at offset `*global` in the kernel object at `base`, by a direct
/// load.
///
/// # Safety
///
/// `base` must be a BTF-typed pointer (a `tp_btf` argument or a pointer
/// loaded from one) and `*global` the offset of a `T` member of its type.
/// The verifier refuses the program otherwise; the JIT turns a faulting
/// load into 0.
#[inline(always)]
pub(crate) unsafe fn field<T: Copy>(base: *const u8, global: &u64) -> T {
    let at = base.wrapping_add(offset(global) as usize).cast::<T>();
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(at) }
}

/// `task->cgroups->dfl_cgrp->kn->id`, what `bpf_get_current_cgroup_id()`
/// returns for the current task.
///
/// # Safety
///
/// `task` must be a BTF-typed `task_struct` pointer.
#[inline(always)]
unsafe fn task_cgroup_id(task: *const u8) -> u64 {
    // SAFETY: each pointer is BTF-typed: the verifier types a pointer loaded
    // from a BTF-typed object by the member's type.
    unsafe {
        let css_set: *const u8 = field(task, &TASK_CGROUPS_OFFSET);
        let cgroup: *const u8 = field(css_set, &CSS_SET_DFL_CGRP_OFFSET);
        let kn: *const u8 = field(cgroup, &CGROUP_KN_OFFSET);
        field(kn, &KERNFS_NODE_ID_OFFSET)
    }
}

/// The runtime a fair-class task had when the scheduler last picked it
/// (`se.prev_sum_exec_runtime`), where its current slice began; `None` for
/// a task of another class (whose `prev_sum_exec_runtime` is stale) or
/// without the offsets.
#[inline(always)]
fn picked_at(policy: u32, prev_sum: u64) -> Option<u64> {
    // SCHED_NORMAL, SCHED_BATCH, SCHED_IDLE: the fair class.
    matches!(policy, 0 | 3 | 5).then_some(prev_sum)
}

/// [`picked_at`] of `task`, by direct loads.
///
/// # Safety
///
/// `task` must be a BTF-typed `task_struct` pointer.
#[inline(always)]
unsafe fn picked(task: *const u8) -> Option<u64> {
    if offset(&PREV_SUM_EXEC_RUNTIME_OFFSET) == 0 || offset(&TASK_POLICY_OFFSET) == 0 {
        return None;
    }
    // SAFETY: see above.
    unsafe {
        picked_at(
            field(task, &TASK_POLICY_OFFSET),
            field(task, &PREV_SUM_EXEC_RUNTIME_OFFSET),
        )
    }
}

/// [`picked_at`] of the task at address `task`, by
/// `bpf_probe_read_kernel`.
#[inline(always)]
fn read_picked(task: u64) -> Option<u64> {
    let (p, s) = (
        offset(&TASK_POLICY_OFFSET),
        offset(&PREV_SUM_EXEC_RUNTIME_OFFSET),
    );
    if p == 0 || s == 0 || task == 0 {
        return None;
    }
    // SAFETY: probe_read tolerates any address; a fault returns an error.
    unsafe {
        let policy = bpf_probe_read_kernel((task + p) as *const u32).ok()?;
        picked_at(
            policy,
            bpf_probe_read_kernel((task + s) as *const u64).ok()?,
        )
    }
}

/// A task's `sched_info` `(run_delay, pcount)`, by direct loads; zeros
/// without the offsets.
///
/// # Safety
///
/// `task` must be a BTF-typed `task_struct` pointer.
#[inline(always)]
unsafe fn delays(task: *const u8) -> Delays {
    if offset(&RUN_DELAY_OFFSET) == 0 {
        return Delays::default();
    }
    // SAFETY: see above.
    unsafe {
        Delays {
            run_delay_ns: field(task, &RUN_DELAY_OFFSET),
            pcount: field(task, &PCOUNT_OFFSET),
        }
    }
}

/// [`delays`] by `bpf_probe_read_kernel`, for a task address.
#[inline(always)]
fn read_delays(task: u64) -> Delays {
    let (d, c) = (offset(&RUN_DELAY_OFFSET), offset(&PCOUNT_OFFSET));
    if d == 0 || task == 0 {
        return Delays::default();
    }
    // SAFETY: probe_read tolerates any address; a fault returns an error.
    unsafe {
        Delays {
            run_delay_ns: bpf_probe_read_kernel((task + d) as *const u64).unwrap_or(0),
            pcount: bpf_probe_read_kernel((task + c) as *const u64).unwrap_or(0),
        }
    }
}

/// A task's run-queue wait totals (`sched_info`).
#[derive(Clone, Copy, Default)]
struct Delays {
    run_delay_ns: u64,
    pcount: u64,
}

/// Waits to bill: nanoseconds and count.
#[derive(Clone, Copy, Default)]
struct Wait {
    ns: u64,
    count: u64,
}

/// A task's `sum_exec_runtime` by `bpf_probe_read_kernel`, if the offset is
/// known and readable.
#[inline(always)]
fn runtime(task: u64) -> Option<u64> {
    let off = offset(&SUM_EXEC_RUNTIME_OFFSET);
    if off == 0 || task == 0 {
        return None;
    }
    // SAFETY: probe_read tolerates any address; a fault returns an error.
    unsafe { bpf_probe_read_kernel((task + off) as *const u64) }.ok()
}

/// An update of this CPU's [`OnCpu`] slot, in place, between
/// [`Update::begin`] and [`Update::commit`].
///
/// The switch runs with interrupts off, and the tick and a sync the agent
/// sends by IPI in hard interrupt context, so none of them interleaves with
/// another on a CPU. The one exception is a sync the kernel runs in process
/// context, when the agent asks for the CPU it is on: a tick may interrupt
/// it, and finds the slot `busy`.
struct Update {
    cpu: *mut OnCpu,
}

/// `*dst = v`, as a volatile store.
///
/// # Safety
///
/// `dst` must point into this CPU's [`OnCpu`] slot.
#[inline(always)]
unsafe fn put(dst: *mut u64, v: u64) {
    // SAFETY: see above.
    unsafe { core::ptr::write_volatile(dst, v) }
}

impl Update {
    /// `None` when the slot is missing or another program on this CPU is
    /// in the middle of an update (see [`Update`]).
    #[inline(always)]
    fn begin() -> Option<Self> {
        let cpu = PM_ONCPU.get_ptr_mut(0)?;
        // SAFETY (here and in every method): this CPU's slot, valid for this
        // program run, and only programs on this CPU touch it.
        unsafe {
            if core::ptr::read_volatile(&raw const (*cpu).busy) != 0 {
                return None;
            }
            put(&raw mut (*cpu).busy, 1);
        }
        Some(Self { cpu })
    }

    /// Whether another copy of the switch program has handled this switch
    /// already: the slot shows `next` running, at the runtime it has now.
    /// Two copies run side by side for a moment when a restarted agent
    /// takes over the pinned maps (it attaches its own before the old one
    /// is gone); the second must bill nothing, or `prev`'s slice, which
    /// it would take for one it did not see start, is billed twice.
    #[inline(always)]
    fn handled(&self, next: u64, next_rt: u64) -> bool {
        // SAFETY: see `begin`.
        let s = unsafe { &*self.cpu };
        s.task == next && s.runtime_ns == next_rt
    }

    /// Time the CPU ran `task` (whose runtime is `rt`, if known; `picked`
    /// gives its runtime when the scheduler last picked it, see
    /// [`picked_at`]) since its last event.
    #[inline(always)]
    fn slice(
        &self,
        task: u64,
        rt: Option<u64>,
        now: u64,
        picked: impl FnOnce() -> Option<u64>,
    ) -> u64 {
        // SAFETY: see `begin`.
        let s = unsafe { &*self.cpu };
        match rt {
            // Same task as recorded: the kernel's own runtime delta.
            Some(rt) if s.task == task => rt.saturating_sub(s.runtime_ns),
            // Nothing recorded on this CPU yet: the agent has just started,
            // and the slice began before its counters did.
            Some(_) if s.task == 0 => 0,
            // Not the task this CPU last saw: it came on in a switch the
            // tracepoint did not show (on 6.18 in a Firecracker VM, about
            // one switch in a hundred: a task leaves the CPU unseen).
            // Nothing of this slice was billed yet: bill it from where the
            // scheduler picked the task, for a fair-class policy (others
            // keep no such mark: nothing rather than a guess). The slice
            // began after this CPU's last event, and the tick makes one
            // every period: at most two periods, so that a mark gone stale
            // (a fair-policy task running in another class, under
            // sched_ext or boosted by priority inheritance) costs little.
            Some(rt) => picked().map_or(0, |p| rt.saturating_sub(p).min(2 * TICK_PERIOD_NS)),
            None if s.since_ns != 0 => now.saturating_sub(s.since_ns),
            None => 0,
        }
    }

    /// Waits `task` (now showing `now`) ended since its last billing:
    /// none at first sight of the task on this CPU (no baseline).
    #[inline(always)]
    fn waited(&self, task: u64, now: Delays) -> Wait {
        // SAFETY: see `begin`.
        let s = unsafe { &*self.cpu };
        if s.task != task {
            return Wait::default();
        }
        Wait {
            ns: now.run_delay_ns.saturating_sub(s.run_delay_ns),
            count: now.pcount.saturating_sub(s.pcount),
        }
    }

    /// Adds to `cgroup_id`'s pending counters. A cgroup without a slot
    /// takes the next one in turn, whose counters go to the map first; if
    /// they cannot go yet, this billing goes to the map itself.
    #[inline(always)]
    fn bill(&mut self, cgroup_id: u64, time: u64, switches: u64, wait: Wait) {
        let c = self.cpu;
        // SAFETY: see `begin`.
        unsafe {
            for i in 0..PENDING_SLOTS {
                let p = &raw mut (*c).pending[i];
                if (*p).cgroup_id == cgroup_id {
                    put(&raw mut (*p).time_ns, (*p).time_ns + time);
                    put(&raw mut (*p).switches, (*p).switches + switches);
                    put(&raw mut (*p).wait_ns, (*p).wait_ns + wait.ns);
                    put(&raw mut (*p).waits, (*p).waits + wait.count);
                    bucket(c, i, wait, false);
                    return;
                }
            }
            let v = (*c).victim as usize % PENDING_SLOTS;
            put(&raw mut (*c).victim, ((v + 1) % PENDING_SLOTS) as u64);
            // The victim moves on even so: the next new cgroup tries
            // another slot, and the tick retries this one.
            if !flush(c, v) {
                to_map(cgroup_id, time, switches, wait);
                return;
            }
            let p = &raw mut (*c).pending[v];
            put(&raw mut (*p).cgroup_id, cgroup_id);
            put(&raw mut (*p).time_ns, time);
            put(&raw mut (*p).switches, switches);
            put(&raw mut (*p).wait_ns, wait.ns);
            put(&raw mut (*p).waits, wait.count);
            bucket(c, v, wait, true);
        }
    }

    /// Sends every pending counter to `PM_CPU`; `false` when some stay
    /// pending (see [`flush`]).
    #[inline(always)]
    fn flush(&mut self) -> bool {
        let mut all = true;
        for i in 0..PENDING_SLOTS {
            // SAFETY: see `begin`.
            all &= unsafe { flush(self.cpu, i) };
        }
        all
    }

    /// Records the task on the CPU and its runtime and wait totals so far.
    #[inline(always)]
    fn running(&mut self, task: u64, runtime_ns: u64, delays: Delays) {
        let c = self.cpu;
        // SAFETY: see `begin`.
        unsafe {
            put(&raw mut (*c).task, task);
            put(&raw mut (*c).runtime_ns, runtime_ns);
            put(&raw mut (*c).run_delay_ns, delays.run_delay_ns);
            put(&raw mut (*c).pcount, delays.pcount);
        }
    }

    /// Records the time up to which the CPU is billed.
    #[inline(always)]
    fn since(&mut self, now: u64) {
        // SAFETY: see `begin`.
        unsafe { put(&raw mut (*self.cpu).since_ns, now) };
    }

    #[inline(always)]
    fn commit(self) {
        // SAFETY: see `begin`.
        unsafe { put(&raw mut (*self.cpu).busy, 0) };
    }
}

/// Adds `wait` to its bucket in slot `i`'s histogram, with the histogram
/// on; `fresh` (a slot just taken for another cgroup) starts it from zero,
/// whatever a flush may have left there.
///
/// # Safety
///
/// `c` must be this CPU's [`OnCpu`] slot, `i` below [`PENDING_SLOTS`].
#[inline(always)]
unsafe fn bucket(c: *mut OnCpu, i: usize, wait: Wait, fresh: bool) {
    if offset(&WAIT_HISTOGRAM) == 0 {
        return;
    }
    // SAFETY: see above; the masks bound the indices for the verifier (and
    // are no-ops).
    unsafe {
        let h = &raw mut (*c).buckets[i & (PENDING_SLOTS - 1)];
        if fresh {
            for b in 0..WAIT_BUCKETS {
                put(&raw mut (*h).counts[b], 0);
            }
        }
        if wait.count == 0 {
            return;
        }
        let b = &raw mut (*h).counts[wait_bucket(wait.ns / wait.count) & (WAIT_BUCKETS - 1)];
        put(b, *b + wait.count);
    }
}

/// Sends pending slot `i` to `PM_CPU`, and its buckets to `PM_WAIT_HIST`,
/// and frees it. `false` when it stays pending, whole: a map could not make
/// the cgroup's key just now ([`retry_later`]: this CPU is inside another
/// update of the map), and the next flush sends it. A full map loses its
/// part, counted as a drop.
///
/// # Safety
///
/// `c` must be this CPU's [`OnCpu`] slot, `i` below [`PENDING_SLOTS`].
#[inline(always)]
unsafe fn flush(c: *mut OnCpu, i: usize) -> bool {
    // SAFETY: see above.
    unsafe {
        let i = i & (PENDING_SLOTS - 1);
        let p = &raw mut (*c).pending[i];
        let id = (*p).cgroup_id;
        if id == 0 {
            return true;
        }
        // Buckets hold waits only where `waits` does.
        let hist = offset(&WAIT_HISTOGRAM) != 0 && (*p).waits != 0;
        // Both keys before any add, so that a retry adds nothing twice.
        // Null for a full map: not `Option`, whose `None` leaves a register
        // the verifier refuses to see spilled unset.
        let m = match try_slot(&PM_CPU, id) {
            Ok(m) => m,
            Err(e) if retry_later(e) => return false,
            Err(_) => null_mut(),
        };
        let hm = match hist {
            true => match try_slot(&PM_WAIT_HIST, id) {
                Ok(h) => h,
                Err(e) if retry_later(e) => return false,
                Err(_) => null_mut(),
            },
            false => null_mut(),
        };
        if m.is_null() {
            count_drops(DROP_CPU, 1);
        } else {
            // Per-CPU slot, not shared with another context.
            let m = &mut *m;
            m.time_ns += (*p).time_ns;
            m.switches += (*p).switches;
            m.wait_ns += (*p).wait_ns;
            m.waits += (*p).waits;
        }
        if hist {
            let h = &raw mut (*c).buckets[i];
            if hm.is_null() {
                count_drops(DROP_CPU, 1);
            } else {
                let m = &mut *hm;
                for b in 0..WAIT_BUCKETS {
                    m.counts[b] += (*h).counts[b];
                }
            }
            for b in 0..WAIT_BUCKETS {
                put(&raw mut (*h).counts[b], 0);
            }
        }
        put(&raw mut (*p).cgroup_id, 0);
        put(&raw mut (*p).time_ns, 0);
        put(&raw mut (*p).switches, 0);
        put(&raw mut (*p).wait_ns, 0);
        put(&raw mut (*p).waits, 0);
    }
    true
}

/// Adds one billing to `cgroup_id`'s counters in the maps themselves, when
/// no pending slot could be freed for it; a key the map cannot make loses
/// it, counted as a drop.
#[inline(always)]
fn to_map(cgroup_id: u64, time: u64, switches: u64, wait: Wait) {
    if let Some(m) = slot(&PM_CPU, cgroup_id, DROP_CPU) {
        // SAFETY: this CPU's value, valid for this program run; only a
        // program holding this CPU's `Update` adds to it.
        let m = unsafe { &mut *m };
        m.time_ns += time;
        m.switches += switches;
        m.wait_ns += wait.ns;
        m.waits += wait.count;
    }
    if offset(&WAIT_HISTOGRAM) == 0 || wait.count == 0 {
        return;
    }
    if let Some(h) = slot(&PM_WAIT_HIST, cgroup_id, DROP_CPU) {
        // SAFETY: as above.
        let h = unsafe { &mut *h };
        let b = wait_bucket(wait.ns / wait.count) & (WAIT_BUCKETS - 1);
        h.counts[b] += wait.count;
    }
}
