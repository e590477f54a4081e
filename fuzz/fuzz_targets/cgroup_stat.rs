//! cgroupfs files: `cpu.max`, `cpu.stat` (v1 and v2), `memory.current`/`memory.usage_in_bytes`,
//! `memory.stat`, the memory limits, `memory.events.local`/`memory.oom_control` and the pressure
//! files. The input is one file's text; where two files are read
//! together, its first line stands for the first and the rest for the second.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podmeter::cgroup::{cpu, memory, pressure};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(cores) = cpu::parse_cpu_max(&text) {
        assert!(cores >= 0.0, "{text:?} → {cores}");
    }
    let _ = cpu::parse_stat_v2(&text);
    let _ = cpu::parse_stat_v1(&text);
    let _ = memory::parse_memory_max(&text);
    if let Some(limit) = memory::parse_limit_in_bytes(&text) {
        assert!(limit < 1 << 62, "{text:?} → {limit}");
    }
    let _ = pressure::parse(&text);
    for key in ["inactive_file", "total_inactive_file", "nr_periods", "oom_kill", ""] {
        let _ = memory::stat_value(&text, key);
    }
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    for key in ["inactive_file", "total_inactive_file"] {
        let _ = memory::working_set_of(first, rest, key);
    }
});
