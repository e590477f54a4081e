//! CPU time per cgroup.
//!
//! `sched_switch` fires in the context of the task leaving the CPU, so
//! `bpf_get_current_cgroup_id()` names the cgroup to bill. What is billed is
//! the growth of the task's `se.sum_exec_runtime` since it came on the CPU:
//! the very quantity the kernel adds to the cgroup's `cpu.stat usage_usec`,
//! so steal time on a VM (excluded by the kernel) is excluded here too. The
//! idle task (pid 0) lives in the root cgroup and is never billed.
//!
//! A per-CPU tick (a `cpu-clock` perf event the agent opens on every CPU)
//! bills long slices as they run and records the running cgroup, which the
//! agent uses to add the remainder at scrape time.
//!
//! The offset of `sum_exec_runtime` in `task_struct` comes from the running
//! kernel's BTF, via the agent. Without it (0), wall-clock time between
//! events is billed instead.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns},
    },
    macros::{perf_event, raw_tracepoint},
    programs::{PerfEventContext, RawTracePointContext},
};
use podmeter_common::DROP_CPU;

use crate::maps::{PM_CPU, PM_ONCPU, slot};

/// Byte offset of `se.sum_exec_runtime` in `struct task_struct`; set by the
/// agent at load time from kernel BTF.
#[unsafe(no_mangle)]
static SUM_EXEC_RUNTIME_OFFSET: u64 = 0;

/// `sched:sched_switch`, raw form: cheaper than the classic tracepoint, which
/// formats a record before calling the program. Arguments: `preempt`,
/// `prev`, `next` (task_struct pointers), `prev_state`.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn pm_sched_switch(ctx: RawTracePointContext) -> i32 {
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    account(prev, Some(next));
    0
}

/// Periodic sample on each CPU: bill the slice so far and say who runs.
#[perf_event]
pub fn pm_cpu_tick(_ctx: PerfEventContext) -> u32 {
    // SAFETY: helper without preconditions.
    let current = unsafe { bpf_get_current_task() };
    account(current, None);
    0
}

/// The task's `sum_exec_runtime`, if the offset is known and readable.
#[inline(always)]
fn runtime(task: u64) -> Option<u64> {
    // SAFETY: a plain read of a global the loader may have rewritten.
    let off = unsafe { core::ptr::read_volatile(&raw const SUM_EXEC_RUNTIME_OFFSET) };
    if off == 0 || task == 0 {
        return None;
    }
    // SAFETY: probe_read tolerates any address; a fault returns an error.
    unsafe { bpf_probe_read_kernel((task + off) as *const u64) }.ok()
}

/// Bills the current task (`task`, which is `prev` on a switch) for its time
/// since the CPU's last event, then records what runs next: `next` on a
/// switch, `task` itself on a tick.
#[inline(always)]
fn account(task: u64, next: Option<u64>) {
    let Some(cpu) = PM_ONCPU.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot; the switch runs with interrupts off and the tick
    // in hard interrupt context, so the two never interleave on a CPU.
    let cpu = unsafe { &mut *cpu };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let idle = bpf_get_current_pid_tgid() as u32 == 0;
    let rt = runtime(task);
    let mut cgroup_id = 0;
    if !idle {
        // SAFETY: helper without preconditions.
        cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        let delta = match rt {
            // Same task as recorded: the kernel's own runtime delta.
            Some(rt) if cpu.task == task => rt.saturating_sub(cpu.runtime_ns),
            // First sight of this task on this CPU (agent just started):
            // no baseline, bill nothing rather than guess.
            Some(_) => 0,
            None if cpu.since_ns != 0 => now.saturating_sub(cpu.since_ns),
            None => 0,
        };
        if let Some(c) = slot(&PM_CPU, cgroup_id, DROP_CPU) {
            // SAFETY: per-CPU slot, not shared with another context.
            let c = unsafe { &mut *c };
            c.time_ns += delta;
            c.switches += u64::from(next.is_some());
        }
    }
    cpu.since_ns = now;
    match next {
        Some(next) => {
            cpu.task = next;
            cpu.runtime_ns = runtime(next).unwrap_or(0);
            // Its cgroup is unknown until the next tick.
            cpu.cgroup_id = 0;
        }
        None => {
            cpu.task = task;
            cpu.runtime_ns = rt.unwrap_or(0);
            cpu.cgroup_id = cgroup_id;
        }
    }
}
