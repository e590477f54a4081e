//! Rendering, between scrapes, what a refresh changed.
//!
//! A scrape takes the last scrape's text (and gzip its deflated bytes) for
//! every family whose rows and values did not change. Scrapes back to back
//! find nearly all of them. But Prometheus scrapes every 15 s or so, and
//! by then the refresher has read memory, limits, OOM kills and pressure
//! again: a scrape wrote and deflated those families anew, and at a
//! thousand pods took about twice as long as one right after another.
//!
//! So when the refresher completes a refresh, this task renders those
//! families ([`Exporter::prerender`]) and, for an agent scraped with gzip,
//! deflates the big ones ([`Gzip::warm`]), on a blocking thread, off the
//! scrape path. The next scrape finds them by fingerprint as it finds the
//! families that did not change. It still reads the maps and `cpu.stat`
//! itself, and writes what they changed, and any family whose rows or
//! names changed since: no value it sends is older than without this.
//!
//! Only for an agent scraped within [`SCRAPED_WITHIN`], and once per
//! refresh (a walk or tree events publish the index too, with the same
//! refresh time). That is one render per scrape at the default 15 s
//! refresh and a 15 s scrape interval; with a longer scrape interval, or a
//! shorter refresh, the renders between two scrapes all but the last are
//! spent for nothing (each costs a map read and the refreshed families:
//! at 1000 pods a few milliseconds of CPU). The render asks the refresher
//! for nothing, so it cannot make refreshes itself.
//!
//! The task runs until the runtime shuts down (or the refresher's channel
//! closes).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use crate::{gzip::Gzip, metrics::Exporter, tracker::Tracker};

/// Renders are made for an agent last scraped less than this long ago:
/// longer than any usual scrape interval (Prometheus' default is 1 min).
pub const SCRAPED_WITHIN: Duration = Duration::from_secs(5 * 60);

/// Whether a render is due: a refresh not yet rendered, and a scrape
/// recent enough at `now`.
fn due(
    refreshed: Option<Instant>,
    rendered: Option<Instant>,
    scraped: Option<Instant>,
    now: Instant,
) -> bool {
    let recent = |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < SCRAPED_WITHIN);
    refreshed.is_some() && refreshed != rendered && recent(scraped)
}

/// Renders after each refresh while the agent is scraped (see the
/// module docs).
pub async fn run(tracker: Arc<Tracker>, exporter: Arc<Exporter>, gzip: Arc<Gzip>) {
    let mut index = tracker.index_updates();
    let mut rendered = None;
    while index.changed().await.is_ok() {
        let refreshed = index.borrow_and_update().refreshed;
        let now = Instant::now();
        if !due(refreshed, rendered, exporter.last_scrape(), now) {
            continue;
        }
        rendered = refreshed;
        let deflate = gzip
            .last_asked()
            .is_some_and(|t| now.saturating_duration_since(t) < SCRAPED_WITHIN);
        let (exporter, gzip) = (exporter.clone(), gzip.clone());
        let done = tokio::task::spawn_blocking(move || {
            let (names, families): (Vec<String>, Vec<_>) =
                exporter.prerender().into_iter().unzip();
            let deflated: Vec<&str> = if deflate {
                gzip.warm(&families).into_iter().map(|i| names[i].as_str()).collect()
            } else {
                Vec::new()
            };
            (families.len(), deflated.join(","))
        })
        .await;
        match done {
            Ok((families, deflated)) => debug!(
                families,
                deflated = %deflated,
                ms = now.elapsed().as_secs_f64() * 1e3,
                "rendered the refreshed families ahead of the next scrape"
            ),
            // The next scrape renders them itself.
            Err(e) => warn!("rendering between scrapes failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_render_is_due_once_per_refresh_and_only_while_scraped() {
        let t0 = Instant::now();
        let at = |s: u64| Some(t0 + Duration::from_secs(s));
        let now = t0 + Duration::from_secs(20);
        // A refresh after a scrape 5 s before it.
        assert!(due(at(15), None, at(10), now));
        assert!(due(at(15), at(0), at(10), now));
        // That refresh again (a tree event published the index).
        assert!(!due(at(15), at(15), at(10), now));
        // Never scraped, or not for longer than SCRAPED_WITHIN.
        assert!(!due(at(15), None, None, now));
        let later = t0 + SCRAPED_WITHIN + Duration::from_secs(11);
        assert!(!due(at(15), None, at(10), later));
        assert!(due(at(15), None, at(10), later - Duration::from_secs(2)));
        // No refresh yet.
        assert!(!due(None, None, at(10), now));
    }
}
