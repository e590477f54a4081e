//! The background thread that owns the cgroup index and keeps it current.
//!
//! * cgroups made and removed arrive as kernel events (`bpf::TreeEvents`)
//!   and go into the index as they come;
//! * every `refresh` interval: memory, limits, OOM kills and pressure of
//!   the counted cgroups are read and departed cgroups retired (their
//!   counters deleted);
//! * the whole tree is walked at start, every `rescan` interval as a safety
//!   net, after events were lost or could not be used, and when a scrape
//!   meets an id the index lacks; without events, at every refresh.
//!
//! The [`IndexState`] has this one owner. Each change is published as an
//! immutable snapshot on a `watch` channel; scrapes ask for work over an
//! `mpsc` channel. The loop runs on a thread of its own (a current-thread
//! runtime), so its file reads and walks block nothing else, and a pass
//! that stalls shows in `/healthz` (see `health`).

use std::{
    future, io,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant as StdInstant},
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior, interval_at},
};
use tracing::{debug, info, warn};

use crate::{
    bpf::{Tree, TreeEvents},
    cgroup::tree,
    counters::CounterSource,
    health::Health,
    index::{Changes, Index, IndexState, TreeEvent, read_stats},
    tracker::Want,
};

/// How often the background work runs.
#[derive(Clone, Copy, Debug)]
pub struct Intervals {
    /// Memory, limits, OOM kills and pressure; retirement.
    pub refresh: Duration,
    /// Walks of the tree while events are followed.
    pub rescan: Duration,
}

/// See the module docs.
pub struct Refresher {
    state: IndexState,
    root: PathBuf,
    counters: Arc<dyn CounterSource>,
    publish: watch::Sender<Arc<Index>>,
    health: Arc<Health>,
    /// Cgroups retired or dropped since freed memory was last given back.
    since_release: usize,
}

impl Refresher {
    /// A refresher of the cgroups below `root` (the cgroup2 mount), whose
    /// index starts empty; returns it with the receiving end of its
    /// snapshots.
    pub fn new(
        state: IndexState,
        root: PathBuf,
        counters: Arc<dyn CounterSource>,
        health: Arc<Health>,
    ) -> (Self, watch::Receiver<Arc<Index>>) {
        let (publish, index) = watch::channel(Arc::new(Index::default()));
        let r = Self {
            state,
            root,
            counters,
            publish,
            health,
            since_release: 0,
        };
        (r, index)
    }

    /// The first walk and refresh, before the agent serves.
    pub fn first_pass(&mut self) -> io::Result<(Changes, Changes)> {
        let now = StdInstant::now();
        let walk = self.state.rescan(tree::scan(&self.root), now);
        if let Some(e) = &self.state.index().rescan_error {
            return Err(io::Error::other(e.clone()));
        }
        let refresh = self.refresh(true);
        Ok((walk, refresh))
    }

    /// A refresh: reads, retirement, then publication. Counters of retired
    /// cgroups are deleted before the index without them is published, so
    /// no scrape meets counters the index no longer knows.
    fn refresh(&mut self, all: bool) -> Changes {
        let counted = self.counters.ids();
        let changes = self
            .state
            .refresh(&counted, StdInstant::now(), all, read_stats);
        if !changes.retired.is_empty() {
            self.counters.forget(&changes.retired);
        }
        self.publish();
        // Counted across refreshes: in steady churn retirements come a few
        // per refresh (a scrape that meets a new cgroup asks for one), so a
        // per-refresh threshold was never reached and RSS only grew (a
        // 10-minute soak: +2.2 MiB in 200 s, then −30 MiB at the one
        // refresh that retired 294 at once).
        self.since_release += changes.retired.len() + changes.dropped;
        if self.since_release >= RELEASE_AFTER {
            self.since_release = 0;
            release_free_memory();
        }
        changes
    }

    fn publish(&mut self) {
        self.publish.send_replace(self.state.snapshot());
    }

    /// Runs the loop on a thread of its own, until the process ends.
    pub fn spawn(
        self,
        every: Intervals,
        events: Option<(TreeEvents, String)>,
        wants: mpsc::Receiver<Want>,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("refresher".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        // /healthz fails once the bound passes: the kubelet
                        // restarts the agent.
                        tracing::error!("refresher cannot start its runtime: {e}");
                        return;
                    }
                };
                rt.block_on(self.run(every, events, wants));
            })
    }

    async fn run(
        mut self,
        every: Intervals,
        events: Option<(TreeEvents, String)>,
        mut wants: mpsc::Receiver<Want>,
    ) {
        // With the events: which cgroup of the hierarchy the cgroup2 mount
        // shows (their paths are from the hierarchy's root).
        let mut events = events.and_then(|(e, shows)| {
            // SAFETY: `TreeEvents` owns its descriptor, which stays open and
            // the same until it is dropped (see its `AsRawFd`).
            match unsafe { AsyncFd::register_with_interest(e, Interest::READABLE) } {
                Ok(fd) => Some((fd, shows)),
                Err(e) => {
                    warn!(
                        "cannot poll the cgroup event ring buffer ({e}); walking the tree instead"
                    );
                    None
                }
            }
        });
        let mut refresh = interval_at(Instant::now() + every.refresh, every.refresh);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut next_rescan = Instant::now() + every.rescan;
        // From zero: events lost between loading and now (the first walk
        // may have raced them) earn a walk too.
        let mut drops = 0;
        let mut batch = Vec::new();
        self.health.refreshed(StdInstant::now());

        loop {
            let mut walk = false;
            let why = tokio::select! {
                _ = refresh.tick() => Why::Timer,
                want = wants.recv() => match want {
                    Some(w) => {
                        walk |= w == Want::Walk;
                        Why::Scrape
                    }
                    // Every scrape side is gone: the agent is stopping.
                    None => return,
                },
                r = readable(&mut events) => match r {
                    Ok(()) => Why::Events,
                    Err(e) => {
                        warn!("cgroup event ring buffer failed ({e}); walking the tree instead");
                        events = None;
                        Why::Timer
                    }
                },
            };
            // Requests that queued meanwhile are served by this pass too.
            while let Ok(w) = wants.try_recv() {
                walk |= w == Want::Walk;
            }

            // Drain whatever woke us: an event submitted while the last
            // drain was finishing may not wake the poll again.
            if let Some((fd, shows)) = events.as_mut() {
                fd.get_mut().drain(&mut batch);
                let (changes, incomplete) = translate(&batch, shows);
                batch.clear();
                walk |= incomplete;
                if !changes.is_empty() {
                    let c = self.state.apply(&changes, StdInstant::now());
                    log_tree_change(&c, "events");
                    self.publish();
                }
            }
            let lost = self.counters.tree_drops().unwrap_or(drops);
            if lost > drops {
                warn!(
                    lost = lost - drops,
                    "cgroup events lost to a full ring buffer; walking the tree"
                );
                walk = true;
            }
            drops = lost;

            let all = why == Why::Timer;
            walk |= all && (events.is_none() || Instant::now() >= next_rescan);
            if why == Why::Events && !walk {
                self.health.refreshed(StdInstant::now());
                continue;
            }
            if walk {
                next_rescan = Instant::now() + every.rescan;
                let c = self.state.rescan(tree::scan(&self.root), StdInstant::now());
                match &self.state.index().rescan_error {
                    None => log_tree_change(&c, "scan"),
                    Some(e) => warn!("cgroup scan failed: {e}"),
                }
            }
            let refreshed = self.refresh(all);
            if refreshed.want_walk {
                // A counted id nobody has seen: walk before calling it dead.
                let c = self.state.rescan(tree::scan(&self.root), StdInstant::now());
                log_tree_change(&c, "scan for an unknown id");
                self.publish();
            }
            if !refreshed.retired.is_empty() {
                info!(
                    retired = refreshed.retired.len(),
                    "series of removed cgroups retired after the grace period"
                );
            }
            debug!(
                cgroups = refreshed.cgroups,
                read = refreshed.read,
                dropped = refreshed.dropped,
                "refreshed memory, limits, OOM kills and pressure"
            );
            self.health.refreshed(StdInstant::now());
        }
    }
}

/// Retirements (since the last release) worth giving freed memory back for.
const RELEASE_AFTER: usize = 256;

/// Gives the allocator's free memory back to the kernel. glibc keeps freed
/// memory in per-thread arenas for reuse; after a churn peak that is tens
/// of MiB the agent no longer needs, and RSS would stay at the peak.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Timer,
    Scrape,
    Events,
}

/// Waits until the ring buffer has events (forever without one).
async fn readable(events: &mut Option<(AsyncFd<TreeEvents>, String)>) -> io::Result<()> {
    let Some((fd, _)) = events else {
        return future::pending().await;
    };
    let mut guard = fd.readable_mut().await?;
    guard.clear_ready();
    Ok(())
}

/// The kernel's events as changes to the index, with paths made relative
/// to the cgroup2 mount, which shows the hierarchy from `unified_shows`
/// down. Also whether any event could not be used as is (a cut path): the
/// tree must then be walked.
fn translate(events: &[Tree], unified_shows: &str) -> (Vec<TreeEvent>, bool) {
    let mut incomplete = false;
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        match e {
            Tree::Mkdir(id, Some(path)) => {
                // Outside what the mount shows: not a cgroup podmeter sees.
                if let Some(path) = below(path, unified_shows) {
                    out.push(TreeEvent::Created { id: *id, path });
                }
            }
            Tree::Mkdir(_, None) => incomplete = true,
            Tree::Rmdir(id) => out.push(TreeEvent::Removed { id: *id }),
        }
    }
    (out, incomplete)
}

/// `path` (from the hierarchy's root) relative to `top`, as `/a/b`.
fn below(path: &str, top: &str) -> Option<String> {
    if top == "/" {
        return Some(path.to_owned());
    }
    match path.strip_prefix(top)? {
        "" => Some("/".into()),
        rest if rest.starts_with('/') => Some(rest.to_owned()),
        _ => None, // `/kubepods-x` is not below `/kubepods`
    }
}

fn log_tree_change(s: &Changes, how: &str) {
    if s.departed > 0 || s.created > 0 {
        info!(
            cgroups = s.cgroups,
            created = s.created,
            departed = s.departed,
            "cgroup tree changed ({how})"
        );
    } else {
        debug!(cgroups = s.cgroups, "cgroup {how}: no change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_below_the_mount() {
        assert_eq!(below("/a/b", "/").as_deref(), Some("/a/b"));
        assert_eq!(below("/kubepods/x", "/kubepods").as_deref(), Some("/x"));
        assert_eq!(below("/kubepods", "/kubepods").as_deref(), Some("/"));
        assert_eq!(below("/kubepods-x/y", "/kubepods"), None);
        assert_eq!(below("/system.slice", "/kubepods"), None);
    }

    #[test]
    fn events_become_changes() {
        let events = [
            Tree::Mkdir(7, Some("/kubepods/pod1".into())),
            Tree::Mkdir(8, Some("/other".into())),
            Tree::Rmdir(7),
        ];
        let (changes, incomplete) = translate(&events, "/kubepods");
        assert_eq!(
            changes,
            [
                TreeEvent::Created {
                    id: 7,
                    path: "/pod1".into()
                },
                TreeEvent::Removed { id: 7 },
            ]
        );
        assert!(!incomplete);
        let (changes, incomplete) = translate(&[Tree::Mkdir(9, None)], "/");
        assert!(changes.is_empty() && incomplete);
    }
}
