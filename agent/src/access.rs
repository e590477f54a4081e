//! `--auth=kubernetes`: who may read `/metrics`, decided by the Kubernetes
//! API, the kube-rbac-proxy model built in. A request's bearer token is
//! checked with a TokenReview; the user it names must be allowed `get` on
//! the non-resource URL `/metrics` by a SubjectAccessReview (the
//! ClusterRole kube-prometheus-stack's Prometheus already has).
//!
//! * Decisions are cached by the token's SHA-256 (tokens themselves are
//!   never kept) for `--auth-cache-ttl`, in a cache of at most
//!   [`CACHE_ENTRIES`]: a flood of distinct tokens evicts the oldest
//!   entries and grows nothing.
//! * Reviews are rate-limited ([`REVIEWS_PER_SECOND`], bursts of
//!   [`REVIEW_BURST`]): past that a request without a cached decision gets
//!   503 and costs the API nothing.
//! * If the API cannot answer, the request is refused (503, saying so);
//!   cached decisions keep serving until their TTL ends.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};

/// Decisions remembered at once.
pub const CACHE_ENTRIES: usize = 4096;
/// Reviews sent to the API per second, on average...
pub const REVIEWS_PER_SECOND: f64 = 10.0;
/// ...and at once after a quiet time.
pub const REVIEW_BURST: f64 = 40.0;

/// What the API decided about a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No token, or one the API does not know.
    Unauthenticated,
    /// A known user without `get` on `/metrics`.
    Forbidden,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Verdict(Verdict),
    /// No decision could be had (the API unreachable, or too many reviews
    /// at once): refused, saying why.
    Unavailable(String),
}

/// The API client, the decision cache and the review budget.
pub struct KubeAccess {
    client: Client,
    ttl: Duration,
    state: Mutex<State>,
}

struct State {
    cache: HashMap<[u8; 32], (Verdict, Instant)>,
    /// Insertion order, for eviction.
    order: VecDeque<[u8; 32]>,
    /// Reviews that may be sent now (a token bucket).
    budget: f64,
    refilled: Instant,
}

impl KubeAccess {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            state: Mutex::new(State {
                cache: HashMap::new(),
                order: VecDeque::new(),
                budget: REVIEW_BURST,
                refilled: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides a request from its `Authorization` header.
    pub async fn check(&self, header: Option<&str>) -> Answer {
        let Some(token) = header
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Answer::Verdict(Verdict::Unauthenticated);
        };
        let key = digest(token);
        // One lock, never held across an await.
        {
            let mut s = self.lock();
            let now = Instant::now();
            if let Some(v) = s.cached(&key, now, self.ttl) {
                return Answer::Verdict(v);
            }
            s.refill(now);
            if s.budget < 1.0 {
                return Answer::Unavailable(
                    "too many new tokens at once: try again in a second".into(),
                );
            }
            s.budget -= 1.0;
        }
        match self.review(token).await {
            Ok(v) => {
                self.lock().remember(key, v);
                Answer::Verdict(v)
            }
            Err(e) => {
                tracing::warn!("cannot check a token with the Kubernetes API: {e}");
                Answer::Unavailable(format!(
                    "cannot check the token: the Kubernetes API did not answer ({e})"
                ))
            }
        }
    }

    /// TokenReview, then SubjectAccessReview.
    async fn review(&self, token: &str) -> Result<Verdict, kube::Error> {
        let pp = PostParams::default();
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let tr = Api::<TokenReview>::all(self.client.clone())
            .create(&pp, &tr)
            .await?;
        let status = tr.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Ok(Verdict::Unauthenticated);
        };
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some("/metrics".into()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let sar = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&pp, &sar)
            .await?;
        Ok(if sar.status.is_some_and(|s| s.allowed) {
            Verdict::Allowed
        } else {
            Verdict::Forbidden
        })
    }
}

impl State {
    /// The decision for `key`, if it was made less than `ttl` before `now`.
    fn cached(&self, key: &[u8; 32], now: Instant, ttl: Duration) -> Option<Verdict> {
        self.cache
            .get(key)
            .filter(|(_, at)| now.duration_since(*at) < ttl)
            .map(|(v, _)| *v)
    }

    fn refill(&mut self, now: Instant) {
        let gained = now.duration_since(self.refilled).as_secs_f64() * REVIEWS_PER_SECOND;
        self.budget = (self.budget + gained).min(REVIEW_BURST);
        self.refilled = now;
    }

    fn remember(&mut self, key: [u8; 32], v: Verdict) {
        if self.cache.insert(key, (v, Instant::now())).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > CACHE_ENTRIES {
            if let Some(old) = self.order.pop_front() {
                self.cache.remove(&old);
            }
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            cache: HashMap::new(),
            order: VecDeque::new(),
            budget: REVIEW_BURST,
            refilled: Instant::now(),
        }
    }

    #[test]
    fn the_cache_never_holds_more_than_its_size() {
        let mut s = state();
        for i in 0..(CACHE_ENTRIES + 500) {
            s.remember(digest(&i.to_string()), Verdict::Unauthenticated);
        }
        assert_eq!(s.cache.len(), CACHE_ENTRIES);
        assert_eq!(s.order.len(), CACHE_ENTRIES);
        // The oldest went first.
        assert!(!s.cache.contains_key(&digest("0")));
        assert!(s.cache.contains_key(&digest(&(CACHE_ENTRIES + 499).to_string())));
    }

    #[test]
    fn a_decision_serves_until_its_ttl_then_the_api_is_asked_again() {
        let mut s = state();
        let key = digest("token");
        s.remember(key, Verdict::Allowed);
        let at = s.cache[&key].1;
        let ttl = Duration::from_secs(120);
        assert_eq!(s.cached(&key, at, ttl), Some(Verdict::Allowed));
        assert_eq!(
            s.cached(&key, at + Duration::from_secs(119), ttl),
            Some(Verdict::Allowed)
        );
        assert_eq!(s.cached(&key, at + ttl, ttl), None);
        assert_eq!(s.cached(&digest("other"), at, ttl), None);
    }

    #[test]
    fn the_review_budget_refills_at_its_rate_up_to_the_burst() {
        let mut s = state();
        s.budget = 0.0;
        let t = s.refilled;
        s.refill(t + Duration::from_millis(500));
        assert!((s.budget - REVIEWS_PER_SECOND / 2.0).abs() < 1e-9);
        s.refill(t + Duration::from_secs(3600));
        assert_eq!(s.budget, REVIEW_BURST);
    }
}
