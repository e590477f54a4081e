//! CPU time per cgroup.
//!
//! `sched_switch` fires in the context of the task leaving the CPU, so
//! `bpf_get_current_cgroup_id()` names the cgroup to bill for the time since
//! the CPU's last event. The idle task (pid 0) lives in the root cgroup and is
//! never billed. A per-CPU tick (a `cpu-clock` perf event the agent opens on
//! every CPU) bills long slices as they run and records the running cgroup,
//! which the agent uses to add the remainder at scrape time.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, generated::bpf_get_current_cgroup_id, generated::bpf_ktime_get_ns,
    },
    macros::{perf_event, raw_tracepoint},
    programs::{PerfEventContext, RawTracePointContext},
};
use podmeter_common::DROP_CPU;

use crate::maps::{PM_CPU, PM_ONCPU, slot};

/// `sched:sched_switch`, raw form: cheaper than the classic tracepoint, which
/// formats a record before calling the program, and needs no field offsets.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn pm_sched_switch(_ctx: RawTracePointContext) -> i32 {
    account(true);
    0
}

/// Periodic sample on each CPU: bill the slice so far and say who runs.
#[perf_event]
pub fn pm_cpu_tick(_ctx: PerfEventContext) -> u32 {
    account(false);
    0
}

#[inline(always)]
fn account(switch: bool) {
    let Some(cpu) = PM_ONCPU.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: bpf helpers without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let idle = bpf_get_current_pid_tgid() as u32 == 0;
    // SAFETY: per-CPU slot; both programs run with interrupts off (switch)
    // or in hard interrupt context (tick), so they never interleave here.
    let cpu = unsafe { &mut *cpu };
    let mut cgroup_id = 0;
    if !idle {
        // SAFETY: helper without preconditions.
        cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        if cpu.since_ns != 0
            && let Some(c) = slot(&PM_CPU, cgroup_id, DROP_CPU)
        {
            // SAFETY: per-CPU slot, not shared with another context.
            let c = unsafe { &mut *c };
            c.time_ns += now.saturating_sub(cpu.since_ns);
            c.switches += u64::from(switch);
        }
    }
    cpu.since_ns = now;
    // After a switch the next task's cgroup is unknown until the next tick.
    cpu.cgroup_id = if switch { 0 } else { cgroup_id };
}
