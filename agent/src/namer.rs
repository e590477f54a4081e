//! Kubernetes names for pod cgroups: the pod store, the sticky names and the
//! metadata wait, in one owner.
//!
//! A pod cgroup's series carry `namespace`, `pod` and `container` from the
//! API. Two rules keep those labels honest:
//! * **sticky**: once a cgroup's names are complete they never change, even
//!   after its pod left the API (its series keep one identity to the end);
//! * **wait**: a new pod cgroup's series wait up to `--metadata-wait` for
//!   their names before going out without them; the kernel keeps counting
//!   meanwhile, so nothing is lost, and a series never changes labels.
//!
//! The sticky names are pruned to the cgroups of the newest index a scrape
//! brings, so they follow the index: a retired cgroup's names go with it.

use crate::ids::IdMap;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;

use crate::{
    cgroup::Identity,
    index::{Cgroup, Index},
    kube::{Lookup, Names, PodStore},
};

/// How a cgroup's series are named in this scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Naming {
    /// Not a pod cgroup: labelled by path.
    Host,
    /// A pod cgroup, with these names (empty values where unknown).
    Named(Arc<Names>),
    /// A pod cgroup still waiting for its names: left out of this scrape.
    Awaiting,
}

#[derive(Debug, Default)]
struct Sticky {
    names: IdMap<Arc<Names>>,
    /// The index generation the names were last pruned to.
    generation: u64,
}

/// See the module docs.
pub struct Namer {
    pods: Option<PodStore>,
    wait: Duration,
    /// Names for pod cgroups when nothing better is known.
    unnamed: Arc<Names>,
    sticky: Mutex<Sticky>,
}

/// What the API side of naming looks like now, for self-metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiStatus {
    /// Pods in the store.
    pub pods: usize,
    /// Watch errors so far.
    pub errors: u64,
    /// Why the watch fails now, if it does.
    pub failing: Option<String>,
}

impl Namer {
    /// Names from `pods` (`None`: no API, pod cgroups go out unnamed), with
    /// `extra_labels` optional labels and a wait of `wait` for new cgroups.
    pub fn new(pods: Option<PodStore>, extra_labels: usize, wait: Duration) -> Self {
        Self {
            wait: if pods.is_some() { wait } else { Duration::ZERO },
            pods,
            unnamed: Arc::new(Names {
                extra: vec![String::new(); extra_labels],
                ..Default::default()
            }),
            sticky: Mutex::default(),
        }
    }

    /// Starts naming the cgroups of one scrape, which reads `index`.
    pub fn session(&self, index: &Index) -> Session<'_> {
        // A copy of the store's pods, taken before the lock.
        let by_uid = self.pods.as_ref().map(PodStore::by_uid);
        let mut sticky = self.sticky.lock().unwrap_or_else(PoisonError::into_inner);
        // Only a newer index prunes: a scrape that still reads an older one
        // must not drop the names a newer one gave.
        if index.generation > sticky.generation {
            sticky.names.retain(|id, _| index.get(*id).is_some());
            sticky.names.shrink_to_fit();
            sticky.generation = index.generation;
        }
        Session {
            namer: self,
            sticky,
            by_uid,
        }
    }

    /// `Err` until the pod store has had its first list, when there is one.
    pub fn ready(&self) -> Result<(), String> {
        match &self.pods {
            Some(p) if !p.synced() => Err("the Kubernetes API pod store has not synced yet".into()),
            _ => Ok(()),
        }
    }

    /// The API watch, when one is configured.
    pub fn api(&self) -> Option<ApiStatus> {
        self.pods.as_ref().map(|p| ApiStatus {
            pods: p.len(),
            errors: p.errors.load(std::sync::atomic::Ordering::Relaxed),
            failing: p.failing(),
        })
    }

    /// Cgroups with sticky names now.
    pub fn sticky_len(&self) -> usize {
        self.sticky
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .names
            .len()
    }
}

/// Naming for one scrape: holds the sticky names (the only lock a scrape
/// takes in naming) until dropped.
pub struct Session<'a> {
    namer: &'a Namer,
    sticky: MutexGuard<'a, Sticky>,
    by_uid: Option<HashMap<String, Arc<Pod>>>,
}

impl Session<'_> {
    /// How the cgroup `id` is named, at `now`.
    pub fn name(&mut self, id: u64, cgroup: &Cgroup, now: Instant) -> Naming {
        let Identity::Pod(p) = &cgroup.identity else {
            return Naming::Host;
        };
        let (Some(store), Some(by_uid)) = (&self.namer.pods, &self.by_uid) else {
            return Naming::Named(self.namer.unnamed.clone());
        };
        if let Some(n) = self.sticky.names.get(&id) {
            return Naming::Named(n.clone());
        }
        let waited = now.saturating_duration_since(cgroup.first_seen) >= self.namer.wait;
        match store.lookup(by_uid, &p.pod_uid, p.container_id.as_deref()) {
            Lookup::Complete(n) => {
                let n = Arc::new(n);
                self.sticky.names.insert(id, n.clone());
                Naming::Named(n)
            }
            Lookup::PodOnly(n) if waited => Naming::Named(Arc::new(n)),
            Lookup::Unknown if waited => Naming::Named(self.namer.unnamed.clone()),
            _ => Naming::Awaiting,
        }
    }
}

#[cfg(test)]
mod tests;
