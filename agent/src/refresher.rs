//! The background task that keeps the [`Tracker`] current.
//!
//! * cgroups made and removed arrive as kernel events (`bpf::TreeEvents`)
//!   and go into the index as they come;
//! * every `refresh` interval: memory and CPU limits of the counted cgroups
//!   are read and departed cgroups retired;
//! * the whole tree is walked at start (by the caller), every `rescan`
//!   interval as a safety net, after events were lost or could not be
//!   used, and when a scrape meets an id the index lacks; without events,
//!   at every refresh.
//!
//! Everything here runs on one task, so the index has one writer.

use std::{future, io, sync::Arc, time::Duration};

use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{Instant, MissedTickBehavior, interval_at},
};
use tracing::{debug, info, warn};

use crate::{
    bpf::{Tree, TreeEvents},
    tracker::{RefreshStats, Tracker, TreeEvent},
};

/// How often the background work runs.
#[derive(Clone, Copy, Debug)]
pub struct Intervals {
    /// Memory and limits, retirement.
    pub refresh: Duration,
    /// Walks of the tree while events are followed.
    pub rescan: Duration,
}

/// Runs forever.
pub async fn run(tracker: Arc<Tracker>, every: Intervals, events: Option<(TreeEvents, String)>) {
    // With the events: which cgroup of the hierarchy the cgroup2 mount
    // shows (their paths are from the hierarchy's root).
    let mut events = events.and_then(|(e, shows)| {
        // SAFETY: `TreeEvents` owns its descriptor, which stays open and the
        // same until it is dropped (see its `AsRawFd`).
        match unsafe { AsyncFd::register_with_interest(e, Interest::READABLE) } {
            Ok(fd) => Some((fd, shows)),
            Err(e) => {
                warn!("cannot poll the cgroup event ring buffer ({e}); walking the tree instead");
                None
            }
        }
    });
    let mut refresh = interval_at(Instant::now() + every.refresh, every.refresh);
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next_rescan = Instant::now() + every.rescan;
    // From zero: events lost between loading and now (the first walk may
    // have raced them) earn a walk too.
    let mut drops = 0;
    let mut batch = Vec::new();

    loop {
        let why = tokio::select! {
            _ = refresh.tick() => Why::Timer,
            () = tracker.wake.notified() => Why::Scrape,
            r = readable(&mut events) => match r {
                Ok(()) => Why::Events,
                Err(e) => {
                    warn!("cgroup event ring buffer failed ({e}); walking the tree instead");
                    events = None;
                    Why::Timer
                }
            },
        };

        // Drained whatever woke us: an event submitted while the last drain
        // was finishing may not wake the poll again.
        let mut walk = false;
        if let Some((fd, shows)) = events.as_mut() {
            fd.get_mut().drain(&mut batch);
            let (changes, incomplete) = translate(&batch, shows);
            batch.clear();
            walk |= incomplete;
            if !changes.is_empty() {
                log_tree_change(&tracker.apply(&changes), "events");
            }
        }
        let lost = tracker.tree_drops();
        if lost > drops {
            warn!(
                lost = lost - drops,
                "cgroup events lost to a full ring buffer; walking the tree"
            );
            walk = true;
        }
        drops = lost;

        let all = why == Why::Timer;
        walk |= tracker.take_rescan_wanted()
            || (all && (events.is_none() || Instant::now() >= next_rescan));
        if why == Why::Events && !walk {
            continue;
        }
        if walk {
            next_rescan = Instant::now() + every.rescan;
        }
        let t = tracker.clone();
        let pass = move || {
            let tree = walk.then(|| t.rescan()).transpose();
            (tree, t.refresh(all))
        };
        match tokio::task::spawn_blocking(pass).await {
            Ok((tree, refreshed)) => {
                match tree {
                    Ok(Some(s)) => log_tree_change(&s, "scan"),
                    Ok(None) => {}
                    Err(e) => warn!("cgroup scan failed: {e}"),
                }
                if refreshed.retired > 0 {
                    info!(
                        retired = refreshed.retired,
                        "series of removed cgroups retired after the grace period"
                    );
                }
                debug!(
                    cgroups = refreshed.cgroups,
                    read = refreshed.read,
                    "refreshed memory and CPU limits"
                );
            }
            Err(e) => warn!("cgroup refresh panicked: {e}"),
        }
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

fn log_tree_change(s: &RefreshStats, how: &str) {
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
