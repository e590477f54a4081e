//! Where the time goes: `cargo xtask test` and `lint` run as named phases,
//! and print how long each took when they end, failed or not. With
//! `PODMETER_PHASES=<file>` (as `.ci/run` sets it) each phase is also
//! appended to that file as `<command>/<phase>\t<seconds>\t<ok|FAILED>`, so
//! the CI run ends with one table for all its commands.

use std::{
    fmt::Write as _,
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::Result;

/// The phases of one command, reported when dropped.
pub struct Phases {
    command: &'static str,
    started: Instant,
    done: Vec<(String, Duration, bool)>,
    /// `$PODMETER_PHASES`, read once.
    sink: Option<std::path::PathBuf>,
}

impl Phases {
    pub fn new(command: &'static str) -> Self {
        Self::to(command, std::env::var_os("PODMETER_PHASES").map(Into::into))
    }

    /// Appending to `sink` (if any) rather than to `$PODMETER_PHASES`.
    fn to(command: &'static str, sink: Option<std::path::PathBuf>) -> Self {
        Self {
            command,
            started: Instant::now(),
            done: Vec::new(),
            sink,
        }
    }

    /// Runs `f` as the phase `name`.
    pub fn run<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        eprintln!("{}: == {name}", self.command);
        let started = Instant::now();
        let result = f();
        let took = started.elapsed();
        eprintln!(
            "{}: == {name}: {} in {:.0} s",
            self.command,
            if result.is_ok() { "done" } else { "FAILED" },
            took.as_secs_f64()
        );
        self.append(name, took, result.is_ok());
        self.done.push((name.to_owned(), took, result.is_ok()));
        result
    }

    fn append(&self, name: &str, took: Duration, ok: bool) {
        let Some(file) = &self.sink else {
            return;
        };
        let line = format!(
            "{}/{name}\t{:.0}\t{}\n",
            self.command,
            took.as_secs_f64(),
            if ok { "ok" } else { "FAILED" }
        );
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("phases: cannot append to {}: {e}", file.display());
        }
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut out = format!("{}: phase timings\n", self.command);
        for (name, took, ok) in &self.done {
            let _ = writeln!(
                out,
                "  {name:<28} {:>6.0} s{}",
                took.as_secs_f64(),
                if *ok { "" } else { "  FAILED" }
            );
        }
        let _ = writeln!(
            out,
            "  {:<28} {:>6.0} s",
            "total",
            self.started.elapsed().as_secs_f64()
        );
        out
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        if !self.done.is_empty() {
            eprint!("{}", self.table());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_phase_is_reported_and_its_error_kept() {
        // Not `new`: under `.ci/run` that would add these to its table.
        let mut p = Phases::to("t", None);
        p.run("first", || Ok(())).unwrap();
        let err = p
            .run("second", || -> Result<()> { anyhow::bail!("boom") })
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        let table = p.table();
        assert!(table.contains("first"), "{table}");
        assert!(
            table.contains("second") && table.contains("FAILED"),
            "{table}"
        );
        assert!(table.contains("total"), "{table}");
    }
}
