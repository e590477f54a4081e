//! Pod metadata from the Kubernetes API: namespace, pod and container names
//! (and optionally owner and selected pod labels) for the pods of this node.
//!
//! A watch on `spec.nodeName=<node>` feeds a kube-rs reflector store; the
//! scrape path only reads that in-memory store and never waits for the API.
//! When the API is unreachable the store keeps the last known pods and the
//! watcher retries with backoff, so names come back by themselves. Container
//! names are matched through `status.containerStatuses[].containerID`.

use std::{
    collections::HashMap,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use ::kube::{
    Api, Client, Config, ResourceExt as _,
    config::KubeConfigOptions,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use tracing::{info, warn};

/// Which optional labels to attach.
#[derive(Clone, Debug, Default)]
pub struct LabelOptions {
    /// Add `owner_kind` and `owner_name` (the pod's controller).
    pub owner: bool,
    /// Pod label keys to copy, as `label_<key>` (key sanitised).
    pub pod_labels: Vec<String>,
}

impl LabelOptions {
    /// Extra label names, in the order [`Names::extra`] holds their values.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.owner {
            out.extend(["owner_kind".to_owned(), "owner_name".to_owned()]);
        }
        out.extend(
            self.pod_labels
                .iter()
                .map(|k| format!("label_{}", crate::flags::label_name(k))),
        );
        out
    }
}

/// Label values the API gives a pod cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name; empty for the pod-level cgroup and the sandbox.
    pub container: String,
    /// Values of [`LabelOptions::names`], in order.
    pub extra: Vec<String>,
}

/// Outcome of a name lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Everything the cgroup can be named by is known.
    Complete(Names),
    /// The pod is known but this container id is not (yet) in its status:
    /// the sandbox, or a container the kubelet has not reported yet.
    PodOnly(Names),
    /// The pod is not (yet) known.
    Unknown,
}

/// The node's pods, as the watch last saw them.
pub struct PodStore {
    store: reflector::Store<Pod>,
    options: LabelOptions,
    /// Watch errors (each followed by a backoff and retry).
    pub errors: Arc<AtomicU64>,
    /// Set once the store has had its first full list (readiness).
    synced: Arc<AtomicBool>,
    /// Why the watch is failing now, if it is.
    failing: Arc<std::sync::Mutex<Option<String>>>,
}

/// Reads the API configuration from `kubeconfig` or, without one,
/// in-cluster config or the default kubeconfig; `None` when none of them
/// exists (a host without Kubernetes).
///
/// Called before podmeter drops its capabilities, so the kubeconfig and the
/// CA bundle are read while any file still can be; what the client reads
/// later (the service account token, client certificate files) must be
/// readable by podmeter's user without CAP_DAC_OVERRIDE.
pub async fn config(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Option<Config>> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = ::kube::config::Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => match Config::infer().await {
            Ok(c) => c,
            Err(e) => {
                info!(
                    "no Kubernetes API configured ({e}); pod series carry cgroup-derived identity only"
                );
                return Ok(None);
            }
        },
    };
    info!(api = %config.cluster_url, "watching this node's pods");
    Ok(Some(config))
}

impl PodStore {
    /// Starts the watch of `node`'s pods in the background.
    pub fn watch(client: Client, node: &str, options: LabelOptions) -> Self {
        let api: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (store, writer) = reflector::store();
        let errors = Arc::new(AtomicU64::new(0));
        let errs = errors.clone();
        let synced = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(std::sync::Mutex::new(None));
        let (ready, is_synced) = (store.clone(), synced.clone());
        tokio::spawn(async move {
            if ready.wait_until_ready().await.is_ok() {
                info!(pods = ready.len(), "Kubernetes API pod store synced");
                is_synced.store(true, Ordering::Relaxed);
            }
        });
        let fail = failing.clone();
        let stream = watcher(api, config)
            .default_backoff()
            // Keep only what naming needs: spec and managed fields are most
            // of a pod's size.
            .modify(|pod| {
                pod.managed_fields_mut().clear();
                pod.annotations_mut().clear();
                pod.spec = None;
            })
            .reflect(writer)
            .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut healthy = true;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) if !healthy => {
                        info!("Kubernetes API watch recovered");
                        healthy = true;
                        *fail.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        errs.fetch_add(1, Ordering::Relaxed);
                        *fail.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                        if healthy {
                            warn!(
                                "Kubernetes API watch failed ({e}); serving last known pod names and retrying"
                            );
                        }
                        healthy = false;
                    }
                }
            }
        });
        Self {
            store,
            options,
            errors,
            synced,
            failing,
        }
    }

    /// A store the caller fills through the returned writer (unit tests).
    #[cfg(test)]
    pub fn fed(options: LabelOptions) -> (Self, reflector::store::Writer<Pod>) {
        let (store, writer) = reflector::store();
        let store = Self {
            store,
            options,
            errors: Arc::default(),
            synced: Arc::new(AtomicBool::new(true)),
            failing: Arc::default(),
        };
        (store, writer)
    }

    /// Whether the store has had its first full list from the API.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Why the watch is failing now (`None` while it works).
    pub fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Pods in the store.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether the store holds no pod.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// The store's pods by UID, for one scrape's lookups.
    pub fn by_uid(&self) -> HashMap<String, Arc<Pod>> {
        self.store
            .state()
            .into_iter()
            .filter_map(|p| Some((p.metadata.uid.clone()?, p)))
            .collect()
    }

    /// Names for a pod cgroup (`container_id` `None`: the pod-level cgroup).
    pub fn lookup(
        &self,
        pods: &HashMap<String, Arc<Pod>>,
        pod_uid: &str,
        container_id: Option<&str>,
    ) -> Lookup {
        let Some(pod) = pods.get(pod_uid) else {
            return Lookup::Unknown;
        };
        let mut names = Names {
            namespace: pod.namespace().unwrap_or_default(),
            pod: pod.name_any(),
            container: String::new(),
            extra: self.extra(pod),
        };
        let Some(id) = container_id else {
            return Lookup::Complete(names);
        };
        match container_name(pod, id) {
            Some(name) => {
                names.container = name.to_owned();
                Lookup::Complete(names)
            }
            None => Lookup::PodOnly(names),
        }
    }

    fn extra(&self, pod: &Pod) -> Vec<String> {
        let mut out = Vec::new();
        if self.options.owner {
            let owner = pod
                .owner_references()
                .iter()
                .find(|o| o.controller == Some(true))
                .or(pod.owner_references().first());
            out.push(owner.map(|o| o.kind.clone()).unwrap_or_default());
            out.push(owner.map(|o| o.name.clone()).unwrap_or_default());
        }
        for key in &self.options.pod_labels {
            out.push(pod.labels().get(key).cloned().unwrap_or_default());
        }
        out
    }
}

/// The container whose status names `id` (`containerd://<id>`, `cri-o://<id>`, ...).
fn container_name<'a>(pod: &'a Pod, id: &str) -> Option<&'a str> {
    let status = pod.status.as_ref()?;
    let all = [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ];
    all.into_iter()
        .flatten()
        .flatten()
        .find(|s: &&ContainerStatus| {
            // The running instance, or the one before it: a container that
            // restarted between two scrapes is still named.
            let last = s
                .last_state
                .as_ref()
                .and_then(|l| l.terminated.as_ref())
                .and_then(|t| t.container_id.as_deref());
            [s.container_id.as_deref(), last]
                .into_iter()
                .flatten()
                .filter_map(|c| c.split_once("://"))
                .any(|(_, cid)| cid.eq_ignore_ascii_case(id))
        })
        .map(|s| s.name.as_str())
}

/// Whether DaemonSet `namespace/name` is gone or going (deleted, or being
/// deleted): the release was uninstalled, so the agent's pins should go
/// too. `Ok(false)` while it exists (a rolling upgrade or a drain); `Err`
/// when the API cannot tell (then the pins stay: losing counts to an API
/// outage would be worse than programs left until `podmeter cleanup`).
///
/// The release's RBAC and service account may be deleted in the same
/// uninstall, before this asks: 401 and 403 count as gone too.
pub async fn daemonset_gone(client: Client, namespace: &str, name: &str) -> anyhow::Result<bool> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let api: ::kube::Api<DaemonSet> = ::kube::Api::namespaced(client, namespace);
    match api.get_opt(name).await {
        Ok(Some(ds)) => Ok(ds.metadata.deletion_timestamp.is_some()),
        Ok(None) => Ok(true),
        Err(::kube::Error::Api(e)) if e.code == 401 || e.code == 403 => Ok(true),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::PodStatus,
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    };

    fn pod() -> Pod {
        let status = |name: &str, id: &str| ContainerStatus {
            name: name.into(),
            container_id: Some(id.into()),
            ..Default::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("shop".into()),
                uid: Some("u1".into()),
                labels: Some([("app.kubernetes.io/name".to_owned(), "web".to_owned())].into()),
                owner_references: Some(vec![OwnerReference {
                    kind: "ReplicaSet".into(),
                    name: "web-6d4".into(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(vec![
                    status("app", "containerd://abc123"),
                    status("sidecar", "cri-o://DEF456"),
                ]),
                init_container_statuses: Some(vec![status("init", "docker://0ff")]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn container_ids_match_across_runtimes_and_kinds() {
        let p = pod();
        assert_eq!(container_name(&p, "abc123"), Some("app"));
        assert_eq!(container_name(&p, "def456"), Some("sidecar"));
        assert_eq!(container_name(&p, "0ff"), Some("init"));
        assert_eq!(container_name(&p, "abc"), None);
        let mut restarted = p.clone();
        let st = &mut restarted
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0];
        st.last_state = Some(k8s_openapi::api::core::v1::ContainerState {
            terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
                container_id: Some("containerd://prev1".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(container_name(&restarted, "prev1"), Some("app"));
        assert_eq!(container_name(&Pod::default(), "abc123"), None);
    }

    #[test]
    fn label_keys_are_sanitised() {
        assert_eq!(
            crate::flags::label_name("app.kubernetes.io/name"),
            "app_kubernetes_io_name"
        );
        let o = LabelOptions {
            owner: true,
            pod_labels: vec!["team".into(), "app.kubernetes.io/name".into()],
        };
        assert_eq!(
            o.names(),
            [
                "owner_kind",
                "owner_name",
                "label_team",
                "label_app_kubernetes_io_name"
            ]
        );
    }
}

