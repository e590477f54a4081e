//! `/proc/self/mountinfo`: finding the cgroup2 mount, the v1 controllers,
//! and which cgroup a directory shows.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use podmeter::cgroup::mount::{find_cgroup2, find_v1_controller, hierarchy_path};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let unified = find_cgroup2(&text);
    for controller in ["memory", "cpu", "cpuacct"] {
        let _ = find_v1_controller(&text, controller);
    }
    if let Some(dir) = &unified {
        let _ = hierarchy_path(&text, dir);
        let _ = hierarchy_path(&text, &dir.join("kubepods/burstable"));
    }
    for dir in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/", ""] {
        let _ = hierarchy_path(&text, Path::new(dir));
    }
});
