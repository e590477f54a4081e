//! Processes the tests start: the `pm-work` workload helper.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, ExitStatus},
};

use nix::{sys::signal::kill, unistd::Pid};

/// The `pm-work` helper binary: cargo builds it next to the test's `deps/`.
pub fn pm_work() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).unwrap().join("pm-work");
    assert!(p.exists(), "{} missing", p.display());
    p
}

/// Whether a process exists.
pub fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// How long [`Work::line`] waits for a line.
pub const LINE_WITHIN: std::time::Duration = std::time::Duration::from_secs(180);

/// A running `pm-work`; killed on drop.
pub struct Work {
    pub(crate) child: Child,
    pub(crate) stdout: BufReader<ChildStdout>,
}

impl Work {
    /// The next `key value...` line it prints, split on whitespace.
    /// Panics if none comes within [`LINE_WITHIN`]: a test waits on a
    /// workload that hangs no longer than that.
    pub fn line(&mut self) -> Vec<String> {
        use std::os::fd::AsRawFd as _;
        if self.stdout.buffer().is_empty() {
            let mut fd = libc::pollfd {
                fd: self.stdout.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(LINE_WITHIN.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&raw mut fd, 1, ms) };
            assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
            assert!(
                n > 0,
                "pm-work (pid {}) printed nothing in {LINE_WITHIN:?}",
                self.child.id()
            );
        }
        let mut s = String::new();
        self.stdout.read_line(&mut s).unwrap();
        assert!(!s.is_empty(), "pm-work exited without reporting");
        s.split_whitespace().map(str::to_owned).collect()
    }

    /// Waits for it to exit successfully.
    pub fn wait(&mut self) {
        let st = self.child.wait().unwrap();
        assert!(st.success(), "pm-work failed: {st}");
    }

    /// Writes `line` and a newline to its stdin (spawned with a pipe).
    pub fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("spawned with stdin piped");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes its stdin (end of input).
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// How it ended, if it has (reaped), or `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        self.kill();
    }
}
