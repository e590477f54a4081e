//! A cgroup path → the pod and container the kubelet made it for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podmeter::cgroup::identity::{Identity, parse};

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    if let Identity::Pod(p) = parse(&path) {
        // What the parser promises about what it returns.
        // A UUID, or a static pod's 32-hex-digit hash: lower case either way.
        let uid = &p.pod_uid;
        let hex = uid.bytes().filter(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')).count();
        assert!(
            hex == 32 && (uid.len() == 32 || uid.len() == 36),
            "{path:?} → {p:?}"
        );
        if let Some(id) = &p.container_id {
            assert!((12..=64).contains(&id.len()), "{path:?} → {p:?}");
        }
    }
});
