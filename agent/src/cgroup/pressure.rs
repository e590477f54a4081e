//! Pressure stall information (PSI) per cgroup, read from cgroupfs.
//!
//! The kernel tracks, for every cgroup2 directory, how long some or all of
//! its non-idle tasks were stalled waiting for CPU, memory or IO, and shows
//! it in `cpu.pressure`, `memory.pressure` and `io.pressure`:
//!
//! ```text
//! some avg10=17.75 avg60=3.20 avg300=0.66 total=2014751
//! full avg10=0.72 avg60=0.13 avg300=0.02 total=97958
//! ```
//!
//! `total` is in microseconds and only grows; podmeter exports `some` and
//! `full` totals as counters in seconds (the averages are Prometheus'
//! `rate()`'s job). PSI is tracked per cgroup2 group whatever controllers
//! are enabled, also on hybrid hosts whose cgroup2 tree has none. It is
//! hierarchical: a cgroup's stall covers the tasks of its whole subtree.
//!
//! Where it is missing:
//! * the kernel has no `CONFIG_PSI`, or boots with `psi=0` (or
//!   `CONFIG_PSI_DEFAULT_DISABLED` without `psi=1`): no pressure file
//!   anywhere, detected once at start ([`Mounts::psi`]);
//! * a cgroup with `cgroup.pressure` set to 0 (Linux 6.3+) hides its files:
//!   reads fail with ENOENT, as for a removed cgroup, and it has none;
//! * kernels before 5.13 have no `full` line in `cpu.pressure`, and the root
//!   cgroup's is always zeros (a full CPU stall of the whole system is not
//!   defined): no CPU `full` then.

use std::io;

use super::{Mounts, files::StatFile};

/// The totals of one pressure file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Time some non-idle task was stalled, in microseconds.
    pub some_us: u64,
    /// Time all non-idle tasks were stalled at once, in microseconds.
    pub full_us: Option<u64>,
}

/// A cgroup's pressure totals, where the kernel provides them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    /// `cpu.pressure`.
    pub cpu: Option<Totals>,
    /// `memory.pressure`.
    pub memory: Option<Totals>,
    /// `io.pressure`.
    pub io: Option<Totals>,
}

/// A cgroup's three pressure files.
#[derive(Debug)]
pub struct Files {
    cpu: StatFile,
    memory: StatFile,
    io: StatFile,
    /// The cgroup2 hierarchy's root, whose CPU `full` line means nothing.
    root: bool,
}

impl Files {
    /// The pressure files of the cgroup at `rel` in the cgroup2 tree, or
    /// `None` when the kernel tracks no pressure. Nothing is opened yet.
    pub fn new(mounts: &Mounts, rel: &str) -> Option<Self> {
        if !mounts.psi {
            return None;
        }
        let rel = rel.trim_start_matches('/');
        let file = |name: &str| {
            let path = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            StatFile::new(&mounts.unified, path)
        };
        Some(Self {
            cpu: file("cpu.pressure"),
            memory: file("memory.pressure"),
            io: file("io.pressure"),
            // Only where the mount shows the hierarchy from its root: below
            // a cgroup namespace the mount's top is some pod's cgroup.
            root: rel.is_empty() && mounts.unified_shows.as_deref() == Some("/"),
        })
    }

    /// The totals now. A file that fails fails the whole read.
    pub fn read(&self) -> io::Result<Pressure> {
        let mut cpu = parse(&self.cpu.read()?);
        if self.root
            && let Some(t) = &mut cpu
        {
            t.full_us = None;
        }
        Ok(Pressure {
            cpu,
            memory: parse(&self.memory.read()?),
            io: parse(&self.io.read()?),
        })
    }

    /// Closes the files (the cgroup is gone).
    pub fn close(&self) {
        [&self.cpu, &self.memory, &self.io]
            .iter()
            .for_each(|f| f.close());
    }
}

/// The `some` and `full` totals of a pressure file; `None` without a
/// `some` total.
pub fn parse(text: &str) -> Option<Totals> {
    let total = |kind: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
            .and_then(|rest| {
                rest.split_whitespace()
                    .find_map(|f| f.strip_prefix("total="))?
                    .parse()
                    .ok()
            })
    };
    Some(Totals {
        some_us: total("some")?,
        full_us: total("full"),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn totals_of_a_child_cgroup() {
        assert_eq!(
            parse(include_str!("testdata/cpu.pressure")),
            Some(Totals {
                some_us: 2_014_751,
                full_us: Some(97_958)
            })
        );
        assert_eq!(
            parse(include_str!("testdata/io.pressure")),
            Some(Totals {
                some_us: 352,
                full_us: Some(282)
            })
        );
    }

    #[test]
    fn older_and_odd_formats() {
        // Before 5.13 cpu.pressure has no full line.
        let old = "some avg10=0.00 avg60=0.00 avg300=0.00 total=12345\n";
        assert_eq!(
            parse(old),
            Some(Totals {
                some_us: 12345,
                full_us: None
            })
        );
        // Totals past 2^32 (4500 s) parse whole.
        let root = include_str!("testdata/root-cpu.pressure");
        assert_eq!(parse(root).unwrap().some_us, 4_500_375_165);
        assert_eq!(parse(""), None);
        assert_eq!(parse("some avg10=0.00 total=x\n"), None);
        assert_eq!(parse("full avg10=0.00 total=5\n"), None, "no some line");
        // `somewhere` is not `some`.
        assert_eq!(
            parse("somewhere total=1\nsome total=2\n").unwrap().some_us,
            2
        );
    }

    fn mounts(psi: bool, shows: &str) -> Mounts {
        Mounts {
            unified: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cgroup/testdata")),
            memory_v1: None,
            cpu_v1: None,
            unified_shows: Some(shows.into()),
            psi,
            memory_local_events: false,
        }
    }

    #[test]
    fn none_without_psi_and_no_cpu_full_at_the_root() {
        assert!(Files::new(&mounts(false, "/"), "/a").is_none());
        // The testdata directory as a cgroup2 root: its files are read.
        let root = Files::new(&mounts(true, "/"), "/").unwrap();
        assert!(root.root);
        assert!(
            root.read().is_err(),
            "testdata has no memory.pressure: the read fails"
        );
        let root = Files {
            memory: StatFile::new(&mounts(true, "/").unified, "io.pressure".into()),
            ..root
        };
        let p = root.read().unwrap();
        assert_eq!(p.cpu.unwrap().full_us, None, "root: no cpu full");
        assert_eq!(p.io.unwrap().full_us, Some(282));
        // Below a cgroup namespace the mount's top is an ordinary cgroup.
        let ns = Files::new(&mounts(true, "/kubepods"), "").unwrap();
        assert!(!ns.root);
    }
}
