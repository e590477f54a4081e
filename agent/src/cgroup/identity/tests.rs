use super::*;

const UID: &str = "1a2b3c4d-5e6f-4a8b-9c0d-112233445566";
const UID_SYSTEMD: &str = "1a2b3c4d_5e6f_4a8b_9c0d_112233445566";
const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn pod(container_id: Option<&str>, runtime: Option<&'static str>, qos: Qos) -> Identity {
    Identity::Pod(PodIdentity {
        pod_uid: UID.to_owned(),
        container_id: container_id.map(str::to_owned),
        runtime,
        qos,
    })
}

#[test]
fn systemd_driver_all_qos_and_runtimes() {
    let cases = [
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope"
            ),
            pod(Some(CID), Some("containerd"), Qos::Burstable),
        ),
        (
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-{CID}.scope"
            ),
            pod(Some(CID), Some("crio"), Qos::BestEffort),
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/docker-{CID}.scope"),
            pod(Some(CID), Some("docker"), Qos::Guaranteed),
        ),
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/crio-conmon-{CID}.scope"
            ),
            pod(Some(CID), Some("crio-conmon"), Qos::Burstable),
        ),
        // Pod-level cgroups.
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
            ),
            pod(None, None, Qos::Burstable),
        ),
        (
            format!("kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice"),
            pod(None, None, Qos::Guaranteed),
        ),
    ];
    for (path, want) in cases {
        assert_eq!(parse(&path), want, "{path}");
    }
}

#[test]
fn cgroupfs_driver_all_qos() {
    let cases = [
        (
            format!("/kubepods/burstable/pod{UID}/{CID}"),
            pod(Some(CID), None, Qos::Burstable),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}/{CID}"),
            pod(Some(CID), None, Qos::BestEffort),
        ),
        (
            format!("/kubepods/pod{UID}/{CID}"),
            pod(Some(CID), None, Qos::Guaranteed),
        ),
        (
            format!("/kubepods/pod{UID}"),
            pod(None, None, Qos::Guaranteed),
        ),
        (
            format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
            pod(Some(CID), Some("crio"), Qos::Burstable),
        ),
        (
            format!("/kubepods/burstable/pod{UID}/"),
            pod(None, None, Qos::Burstable),
        ),
    ];
    for (path, want) in cases {
        assert_eq!(parse(&path), want, "{path}");
    }
}

#[test]
fn kubepods_below_a_prefix() {
    // kind nodes run the kubelet in a nested cgroup; tests use their own root.
    let kind = format!(
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope"
    );
    assert_eq!(
        parse(&kind),
        pod(Some(CID), Some("containerd"), Qos::BestEffort)
    );
    let nested = format!("/podmeter-test-1/kubepods/burstable/pod{UID}/{CID}");
    assert_eq!(parse(&nested), pod(Some(CID), None, Qos::Burstable));
    let docker_in_docker = format!("/docker/{CID}/kubepods/pod{UID}/{CID}");
    assert_eq!(
        parse(&docker_in_docker),
        pod(Some(CID), None, Qos::Guaranteed)
    );
}

#[test]
fn static_pod_uid_is_a_hash() {
    let uid = "8f1d2e0e6c3f5e1d2b3a4c5d6e7f8a9b";
    let path = format!("/kubepods/burstable/pod{uid}/{CID}");
    match parse(&path) {
        Identity::Pod(p) => assert_eq!(p.pod_uid, uid),
        other => panic!("{other:?}"),
    }
}

#[test]
fn uppercase_ids_are_normalised() {
    let path = format!("/kubepods/pod{}/{}", UID.to_uppercase(), CID.to_uppercase());
    assert_eq!(parse(&path), pod(Some(CID), None, Qos::Guaranteed));
}

#[test]
fn host_cgroups() {
    let host = [
        "/",
        "",
        "/system.slice/sshd.service",
        "/system.slice/containerd.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/init.scope",
        // systemd escapes a literal '-' inside a name as \x2d.
        r"/system.slice/system-systemd\x2dfsck.slice/systemd-fsck@dev-disk-by\x2duuid-1234.service",
        r"/system.slice/run-containerd-io.containerd.runtime.v2.task-k8s.io-abc.mount",
        r"/machine.slice/machine-qemu\x2d1\x2dvm.scope",
        "/kubepods.slice",
        "/kubepods.slice/kubepods-burstable.slice",
        "/kubepods",
        "/kubepods/burstable",
        "/docker/0123456789ab",
        "/system.slice/docker-0123456789abcdef.scope",
        "/lxc.payload.c1",
    ];
    for p in host {
        assert_eq!(parse(p), Identity::Host, "{p}");
    }
}

#[test]
fn garbage_falls_back_to_host() {
    let garbage = [
        "/kubepods/burstable/podnot-a-uid/xyz",
        "/kubepods/burstable/pod/",
        "/kubepods/pod",
        "/kubepods/burstable/pod1a2b3c4d-5e6f-4a8b-9c0d-11223344556/abc",
        "/kubepods.slice/kubepods-pod.slice",
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podZZZ.slice/x.scope",
        "/kubepods.slice/kubepods-weird-pod1a2b3c4d_5e6f_4a8b_9c0d_112233445566.slice",
        "kubepods-pod\u{0}\u{1}.slice",
        "/\u{ff}\u{fe}/kubepods",
        "////",
        "/kubepods/burstable/pod1a2b3c4d-5e6f-4a8b-9c0d-112233445566/not-hex-at-all",
        "/kubepods/burstable/pod1a2b3c4d-5e6f-4a8b-9c0d-112233445566/0123",
        "/kubepods/pod1a2b3c4d-5e6f-4a8b-9c0d-112233445566/0123456789abcdef/extra/nesting",
        "/kubepods.slice/kubepods-pod1a2b3c4d_5e6f_4a8b_9c0d_112233445566.slice/cri-containerd-.scope",
        "kubepods.slice/kubepods-pod1a2b3c4d_5e6f_4a8b_9c0d_112233445566.slice/docker-xyz.scope",
        "-pod.slice",
        ".slice/kubepods.slice",
    ];
    for p in garbage {
        assert_eq!(parse(p), Identity::Host, "{p:?}");
    }
}

#[test]
fn never_panics_on_arbitrary_input() {
    // A deterministic sweep over short strings built from the characters
    // that matter to the parser.
    let alphabet = [
        "/",
        "kubepods",
        ".slice",
        "-pod",
        "pod",
        "_",
        "-",
        "burstable",
        "a",
        ".scope",
        "crio-",
        "\\x2d",
        "0123456789ab",
    ];
    let mut n = 0u32;
    for a in alphabet {
        for b in alphabet {
            for c in alphabet {
                for d in alphabet {
                    let _ = parse(&format!("{a}{b}{c}{d}"));
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 13u32.pow(4));
}
