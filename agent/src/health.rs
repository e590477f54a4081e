//! Liveness: whether the agent is still making progress, for `/healthz`.
//!
//! Two paths must keep moving, and a watchdog bound (`--watchdog-timeout`,
//! default 60 s) says how long either may stall before the agent calls
//! itself dead, so the kubelet's liveness probe restarts it:
//! * the refresher (tree events, walks, memory and limits, retirement)
//!   completes a pass at least every `--refresh-interval`; `/healthz`
//!   fails when none completed for `--refresh-interval` + the bound;
//! * a scrape (`/metrics`) must finish within the bound; `/healthz` fails
//!   while one has been running longer. No scrapes at all is not a fault.
//!   The render between scrapes after a refresh (`prerender`) makes the
//!   same map reads and counts as a scrape here.
//!
//! Time comes in as an argument, so the rules are unit tested with an
//! injected clock.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// See the module docs.
#[derive(Debug)]
pub struct Health {
    refresh_every: Duration,
    bound: Duration,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last completed refresher pass.
    refreshed_ms: AtomicU64,
    /// Scrapes in flight, by ticket, with their start.
    scrapes: Mutex<HashMap<u64, Instant>>,
    next: AtomicU64,
}

/// A scrape in flight; dropping it says the scrape finished.
#[derive(Debug)]
pub struct Scrape {
    health: Arc<Health>,
    ticket: u64,
}

impl Drop for Scrape {
    fn drop(&mut self) {
        self.health.scrapes().remove(&self.ticket);
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Health {
    /// A watchdog for a refresher that runs every `refresh_every`, allowing
    /// either path to stall for `bound`, starting `now`.
    pub fn new(refresh_every: Duration, bound: Duration, now: Instant) -> Self {
        Self {
            refresh_every,
            bound,
            epoch: now,
            refreshed_ms: AtomicU64::new(0),
            scrapes: Mutex::default(),
            next: AtomicU64::new(0),
        }
    }

    fn scrapes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.scrapes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The refresher completed a pass at `now`.
    pub fn refreshed(&self, now: Instant) {
        let at = ms(now.saturating_duration_since(self.epoch));
        self.refreshed_ms.fetch_max(at, Ordering::Relaxed);
    }

    /// A scrape starts at `now`.
    pub fn scrape(self: &Arc<Self>, now: Instant) -> Scrape {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        self.scrapes().insert(ticket, now);
        Scrape {
            health: self.clone(),
            ticket,
        }
    }

    /// `Ok` while both paths make progress at `now`; otherwise which one
    /// stalled, for how long.
    pub fn live(&self, now: Instant) -> Result<(), String> {
        let last = self.epoch + Duration::from_millis(self.refreshed_ms.load(Ordering::Relaxed));
        let idle = now.saturating_duration_since(last);
        let allowed = self.refresh_every + self.bound;
        if idle > allowed {
            return Err(format!(
                "the refresher has completed no pass for {}s (allowed: {}s)",
                idle.as_secs(),
                allowed.as_secs()
            ));
        }
        let oldest = self.scrapes().values().min().copied();
        if let Some(started) = oldest {
            let running = now.saturating_duration_since(started);
            if running > self.bound {
                return Err(format!(
                    "a scrape has been running for {}s (allowed: {}s)",
                    running.as_secs(),
                    self.bound.as_secs()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_stalled_refresher_fails_liveness_after_its_interval_and_the_bound() {
        let t0 = Instant::now();
        let h = Health::new(15 * S, 60 * S, t0);
        assert_eq!(h.live(t0 + 75 * S), Ok(()));
        let e = h.live(t0 + 76 * S).unwrap_err();
        assert!(e.contains("refresher has completed no pass for 76s"), "{e}");
        h.refreshed(t0 + 70 * S);
        assert_eq!(h.live(t0 + 80 * S), Ok(()));
        // A beat from an earlier clock reading never moves it back.
        h.refreshed(t0 + 10 * S);
        assert_eq!(h.live(t0 + 145 * S), Ok(()));
    }

    #[test]
    fn a_hung_scrape_fails_liveness_until_it_finishes() {
        let t0 = Instant::now();
        let h = Arc::new(Health::new(15 * S, 60 * S, t0));
        let quick = h.scrape(t0);
        drop(quick);
        let stuck = h.scrape(t0 + S);
        h.refreshed(t0 + 60 * S);
        assert_eq!(h.live(t0 + 61 * S), Ok(()));
        let e = h.live(t0 + 62 * S).unwrap_err();
        assert!(e.contains("a scrape has been running for 61s"), "{e}");
        drop(stuck);
        assert_eq!(h.live(t0 + 62 * S), Ok(()));
    }
}
