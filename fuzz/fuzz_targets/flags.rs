//! Command-line values: bounded durations and `--pod-labels` keys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podmeter::flags;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = flags::interval(&text);
    let _ = flags::wait(&text);
    let _ = flags::watchdog(&text);
    let keys: Vec<String> = text
        .split(',')
        .filter_map(|k| flags::label_key(k).ok())
        .collect();
    let _ = flags::distinct_label_names(&keys);
});
