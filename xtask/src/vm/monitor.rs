//! Where a frozen guest's vCPUs were: qemu's human monitor on a unix
//! socket, asked for every vCPU's registers just before the guest is
//! killed. Debian's image packages ship a stub `System.map`, so the
//! instruction pointers are named afterwards from `/proc/kallsyms` as the
//! boot that retries the unfinished files prints it: the guest boots with
//! `nokaslr`, so one boot's addresses are the next one's.
//!
//! A whole-guest freeze (seen on 5.10: nothing on the console, the guest's
//! own watchdog silent, qemu spinning both vCPUs) leaves nothing else to go
//! on.

use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

/// qemu's monitor prompt.
const PROMPT: &str = "(qemu) ";

/// Each vCPU's instruction pointer, then qemu's whole answer; or why
/// there is none.
pub fn diagnose(socket: &Path) -> String {
    let regs = match command(socket, "info registers -a") {
        Ok(r) => r,
        Err(e) => {
            return format!(
                "no registers from qemu's monitor ({}): {e}\n",
                socket.display()
            );
        }
    };
    let mut out = String::new();
    for (cpu, ip) in instruction_pointers(&regs) {
        let _ = writeln!(out, "CPU#{cpu} at {ip:#x}");
    }
    if out.is_empty() {
        out.push_str("no instruction pointer in qemu's answer\n");
    }
    out.push('\n');
    out.push_str(&regs);
    out
}

/// The vCPUs of a [`diagnose`] text, named from `kallsyms` (`/proc/kallsyms`
/// lines): `CPU#n at 0x... name+0xoff` each.
pub fn named(diagnosis: &str, kallsyms: &str) -> Vec<String> {
    let symbols = symbols(kallsyms);
    instruction_pointers(diagnosis)
        .into_iter()
        .map(|(cpu, ip)| {
            format!(
                "CPU#{cpu} at {ip:#x} {}",
                name(&symbols, ip).unwrap_or_else(|| "(no symbol)".into())
            )
        })
        .collect()
}

/// One monitor command's output.
fn command(socket: &Path, cmd: &str) -> io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    // The banner ends with the first prompt.
    read_until_prompt(&mut s)?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    // The monitor may echo the command line first: it names no register.
    Ok(read_until_prompt(&mut s)?
        .trim_end_matches(PROMPT)
        .replace('\r', ""))
}

/// Reads until the prompt, or 5 s.
fn read_until_prompt(s: &mut UnixStream) -> io::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !got.ends_with(PROMPT.as_bytes()) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// `(vCPU, instruction pointer)` from `info registers -a`: `CPU#n` heads
/// each vCPU's block; x86-64 says `RIP=`, arm64 `PC=`. (The summary lines
/// [`diagnose`] puts first say `at`, and are not read again.)
fn instruction_pointers(regs: &str) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut cpu = None;
    for line in regs.lines() {
        if let Some(n) = line.trim().strip_prefix("CPU#") {
            cpu = n
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok());
            continue;
        }
        for word in line.split_whitespace() {
            let hex = word.strip_prefix("RIP=").or(word.strip_prefix("PC="));
            if let (Some(c), Some(h)) = (cpu, hex)
                && let Ok(ip) = u64::from_str_radix(h, 16)
            {
                out.push((c, ip));
            }
        }
    }
    out
}

/// Text symbols of `/proc/kallsyms` (or a `System.map`), by address.
fn symbols(map: &str) -> Vec<(u64, &str)> {
    let mut out: Vec<(u64, &str)> = map
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (addr, kind, name) = (it.next()?, it.next()?, it.next()?);
            matches!(kind, "t" | "T" | "w" | "W")
                .then(|| Some((u64::from_str_radix(addr, 16).ok()?, name)))
                .flatten()
        })
        .collect();
    out.sort_unstable_by_key(|(a, _)| *a);
    out
}

/// `name+0xoffset` of the symbol at or before `ip`.
fn name(symbols: &[(u64, &str)], ip: u64) -> Option<String> {
    let i = symbols.partition_point(|(a, _)| *a <= ip).checked_sub(1)?;
    let (addr, name) = symbols[i];
    Some(format!("{name}+{:#x}", ip - addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vcpu_is_named_from_the_map() {
        let regs = "CPU#0\nRAX=0000000000000000 RBX=ffffffff82613780\n\
                    RIP=ffffffff81a0112e RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
                    CPU#1\nRIP=ffffffff810c5003 RFL=00000202\n";
        let map = "ffffffff81000000 T _stext\nffffffff810c5000 T native_queued_spin_lock_slowpath\n\
                   ffffffff81a01100 t default_idle\nffffffff82613780 D init_task\n\
                   ffffffffc0001000 t nft_do_chain\t[nf_tables]\n";
        let s = symbols(map);
        let ips = instruction_pointers(regs);
        assert_eq!(
            ips,
            [(0, 0xffff_ffff_81a0_112e), (1, 0xffff_ffff_810c_5003)]
        );
        assert_eq!(name(&s, ips[0].1).as_deref(), Some("default_idle+0x2e"));
        assert_eq!(
            name(&s, ips[1].1).as_deref(),
            Some("native_queued_spin_lock_slowpath+0x3")
        );
        assert_eq!(name(&s, 0x1000), None, "below every symbol");
        assert_eq!(
            named(&format!("CPU#0 at 0x1\n\n{regs}"), map),
            [
                "CPU#0 at 0xffffffff81a0112e default_idle+0x2e",
                "CPU#1 at 0xffffffff810c5003 native_queued_spin_lock_slowpath+0x3",
            ]
        );
        // arm64 says PC=.
        assert_eq!(
            instruction_pointers("CPU#3\n PC=ffff800010012345 X00=0\n"),
            [(3, 0xffff_8000_1001_2345)]
        );
    }
}
