//! Kernel BTF (`/sys/kernel/btf/vmlinux`): parsing, and looking up the
//! member offsets the agent needs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podmeter::btf::Btf;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    let _ = btf.offset("task_struct", &["se", "sum_exec_runtime"]);
    let _ = btf.offset("task_struct", &["cgroups"]);
    let _ = btf.offset("cgroup", &["kn", "id"]);
    let _ = btf.offset("sched_entity", &[]);
});
