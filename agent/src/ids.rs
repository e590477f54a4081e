//! Maps keyed by cgroup id.

use std::collections::HashMap;

/// A map keyed by cgroup id, with a fast hasher. A scrape at a thousand
/// pods looks ids up in several maps of thousands of entries (counters,
/// the index, the throttling walk), and std's SipHash, built to resist keys
/// chosen to collide, was about a twentieth of its CPU. Ids are numbers the
/// kernel hands out; a workload allowed to make cgroups can pick which of
/// them stay alive, but not see foldhash's seed, random per process.
pub type IdMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;
