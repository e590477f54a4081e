//! Naming rules, with a pod store the test fills and an injected clock.

use k8s_openapi::{
    api::core::v1::{ContainerStatus, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::runtime::watcher;

use super::*;
use crate::{
    cgroup::Mounts,
    index::{IndexState, TreeEvent},
    kube::LabelOptions,
};

const WAIT: Duration = Duration::from_secs(30);
const POD: &str = "/kubepods/burstable/pod1b2c3d4e-0000-4000-8000-000000000001";
const UID: &str = "1b2c3d4e-0000-4000-8000-000000000001";
const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn pod(with_container: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("web-1".into()),
            namespace: Some("shop".into()),
            uid: Some(UID.into()),
            ..Default::default()
        },
        status: Some(PodStatus {
            container_statuses: with_container.then(|| {
                vec![ContainerStatus {
                    name: "app".into(),
                    container_id: Some(format!("containerd://{CID}")),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An index holding the pod's cgroup (id 1), its container (2) and a host
/// cgroup (3), first seen at `t0`.
fn index(t0: Instant) -> (IndexState, Arc<Index>) {
    let mounts = Mounts::nowhere();
    let mut s = IndexState::new(mounts, Duration::from_secs(90));
    let ev = |id, path: String| TreeEvent::Created { id, path };
    s.apply(
        &[
            ev(1, POD.into()),
            ev(2, format!("{POD}/{CID}")),
            ev(3, "/system.slice/sshd.service".into()),
        ],
        t0,
    );
    let snap = s.snapshot();
    (s, snap)
}

fn named(n: &Naming) -> (&str, &str, &str) {
    match n {
        Naming::Named(n) => (&n.namespace, &n.pod, &n.container),
        other => panic!("not named: {other:?}"),
    }
}

#[test]
fn host_cgroups_are_named_by_path_and_pods_without_an_api_go_out_at_once() {
    let t0 = Instant::now();
    let (_, idx) = index(t0);
    let namer = Namer::new(None, 1, WAIT);
    let mut s = namer.session(&idx);
    assert_eq!(s.name(3, idx.get(3).unwrap(), t0), Naming::Host);
    let n = s.name(2, idx.get(2).unwrap(), t0);
    assert_eq!(named(&n), ("", "", ""));
    let Naming::Named(n) = n else { unreachable!() };
    assert_eq!(n.extra, [""], "one empty value per optional label");
}

#[test]
fn a_new_pod_cgroup_waits_for_its_names_then_goes_out_without_them() {
    let t0 = Instant::now();
    let (_, idx) = index(t0);
    let (store, _writer) = PodStore::fed(LabelOptions::default());
    let namer = Namer::new(Some(store), 0, WAIT);
    let mut s = namer.session(&idx);
    let c = idx.get(2).unwrap();
    assert_eq!(s.name(2, c, t0 + WAIT / 2), Naming::Awaiting);
    assert_eq!(named(&s.name(2, c, t0 + WAIT)), ("", "", ""));
}

#[test]
fn complete_names_stick_after_the_pod_left_the_api() {
    let t0 = Instant::now();
    let (_, idx) = index(t0);
    let (store, mut writer) = PodStore::fed(LabelOptions::default());
    writer.apply_watcher_event(&watcher::Event::Apply(pod(true)));
    let namer = Namer::new(Some(store), 0, WAIT);
    {
        let mut s = namer.session(&idx);
        assert_eq!(
            named(&s.name(2, idx.get(2).unwrap(), t0)),
            ("shop", "web-1", "app")
        );
        assert_eq!(
            named(&s.name(1, idx.get(1).unwrap(), t0)),
            ("shop", "web-1", "")
        );
    }
    writer.apply_watcher_event(&watcher::Event::Delete(pod(true)));
    let mut s = namer.session(&idx);
    assert_eq!(
        named(&s.name(2, idx.get(2).unwrap(), t0 + WAIT * 10)),
        ("shop", "web-1", "app")
    );
}

#[test]
fn a_container_the_pod_does_not_list_yet_waits_and_is_not_made_sticky() {
    let t0 = Instant::now();
    let (_, idx) = index(t0);
    let (store, mut writer) = PodStore::fed(LabelOptions::default());
    writer.apply_watcher_event(&watcher::Event::Apply(pod(false)));
    let namer = Namer::new(Some(store), 0, WAIT);
    {
        let mut s = namer.session(&idx);
        let c = idx.get(2).unwrap();
        assert_eq!(s.name(2, c, t0), Naming::Awaiting);
        assert_eq!(named(&s.name(2, c, t0 + WAIT)), ("shop", "web-1", ""));
    }
    assert_eq!(namer.sticky_len(), 0);
    writer.apply_watcher_event(&watcher::Event::Apply(pod(true)));
    let mut s = namer.session(&idx);
    assert_eq!(
        named(&s.name(2, idx.get(2).unwrap(), t0 + WAIT)),
        ("shop", "web-1", "app")
    );
}

#[test]
fn sticky_names_follow_the_index_and_an_older_index_prunes_nothing() {
    let t0 = Instant::now();
    let (mut state, old) = index(t0);
    let (store, mut writer) = PodStore::fed(LabelOptions::default());
    writer.apply_watcher_event(&watcher::Event::Apply(pod(true)));
    let namer = Namer::new(Some(store), 0, WAIT);
    {
        let mut s = namer.session(&old);
        s.name(1, old.get(1).unwrap(), t0);
        s.name(2, old.get(2).unwrap(), t0);
    }
    assert_eq!(namer.sticky_len(), 2);

    // The container's cgroup departs and retires (no counters).
    state.apply(&[TreeEvent::Removed { id: 2 }], t0);
    state.refresh(&[1], t0, true, |_| Default::default());
    let new = state.snapshot();
    assert!(new.get(2).is_none());
    drop(namer.session(&new));
    assert_eq!(namer.sticky_len(), 1, "the retired cgroup's names went");

    // A slow scrape still holding the old index: prunes nothing, and what
    // it adds goes at the next newer index.
    {
        let mut s = namer.session(&old);
        s.name(2, old.get(2).unwrap(), t0);
    }
    assert_eq!(namer.sticky_len(), 2);
    let newer = state.snapshot();
    drop(namer.session(&newer));
    assert_eq!(namer.sticky_len(), 1);
}
