//! CPU time a migration costs, for reports: the agent's own process
//! (parsing, coding, compressing, QUIC) and QEMU's threads, as the kernel
//! counts them.
//!
//! QEMU runs with `debug-threads=on`, so its threads carry names: the
//! source's stream writer is `live_migration`, the vCPUs are `CPU n/TCG`
//! or `CPU n/KVM`. The sender's cost is the agent's CPU time plus the
//! `live_migration` thread's; the receiver's is the agent's plus every
//! QEMU thread except the vCPUs (loading runs in QEMU's main loop, and the
//! vCPUs start only when the guest resumes, which is not migration work).

use std::path::Path;
use std::time::Duration;

/// Name of QEMU's outgoing migration thread.
pub const QEMU_MIGRATION_THREAD: &str = "live_migration";

/// CPU time (user + system) this process has used.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer cannot fail.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time of `pid`'s threads selected by their name; `None` if the
/// process is gone.
pub fn threads_cpu(pid: u32, select: impl Fn(&str) -> bool) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let tick = clock_tick();
    let mut total = Duration::ZERO;
    for t in tasks.flatten() {
        let dir = t.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread exited meanwhile
        };
        if select(comm.trim_end()) {
            total += thread_cpu(&dir, tick).unwrap_or_default();
        }
    }
    Some(total)
}

/// CPU time of QEMU's outgoing migration thread (zero before it starts).
pub fn qemu_migration_thread(pid: u32) -> Option<Duration> {
    threads_cpu(pid, |n| n == QEMU_MIGRATION_THREAD)
}

/// CPU time of every QEMU thread except the vCPUs.
pub fn qemu_non_vcpu(pid: u32) -> Option<Duration> {
    threads_cpu(pid, |n| !n.starts_with("CPU "))
}

/// utime + stime of one task from its `stat` (fields 14 and 15, counted
/// after the parenthesised name, which may contain spaces).
fn thread_cpu(dir: &Path, tick: f64) -> Option<Duration> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    parse_stat_cpu(&stat, tick)
}

fn parse_stat_cpu(stat: &str, tick: f64) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After the name: state(3) ppid pgrp session tty tpgid flags minflt
    // cminflt majflt cmajflt utime(14) stime(15).
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / tick))
}

fn clock_tick() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A sender's CPU meter: the agent's process time since `start`, plus the
/// highest reading of QEMU's migration thread. The thread exits when the
/// migration ends, so it is sampled while it runs ([`Self::sample`]) and
/// the last reading stands.
#[derive(Debug, Clone)]
pub struct SenderCpu {
    pid: u32,
    agent_start: Duration,
    qemu_thread: Duration,
    include_agent: bool,
}

impl SenderCpu {
    /// Starts metering; `include_agent` is false when the agent does not
    /// carry the stream (QEMU to QEMU directly).
    pub fn start(qemu_pid: u32, include_agent: bool) -> Self {
        SenderCpu {
            pid: qemu_pid,
            agent_start: process_cpu(),
            qemu_thread: Duration::ZERO,
            include_agent,
        }
    }

    /// Reads QEMU's migration thread.
    pub fn sample(&mut self) {
        if let Some(t) = qemu_migration_thread(self.pid) {
            self.qemu_thread = self.qemu_thread.max(t);
        }
    }

    /// Seconds so far: the agent's and QEMU's.
    pub fn seconds(&self) -> f64 {
        self.agent_seconds() + self.qemu_seconds()
    }

    /// The agent's part (parsing, coding, compressing, QUIC).
    pub fn agent_seconds(&self) -> f64 {
        if self.include_agent {
            process_cpu().saturating_sub(self.agent_start).as_secs_f64()
        } else {
            0.0
        }
    }

    /// QEMU's migration thread's part.
    pub fn qemu_seconds(&self) -> f64 {
        self.qemu_thread.as_secs_f64()
    }
}

/// A receiver's CPU meter: the agent's process time plus QEMU's non-vCPU
/// threads, from the start of the incoming migration.
#[derive(Debug, Clone)]
pub struct ReceiverCpu {
    pid: u32,
    agent_start: Duration,
    qemu_start: Duration,
}

impl ReceiverCpu {
    /// Starts metering.
    pub fn start(qemu_pid: u32) -> Self {
        ReceiverCpu {
            pid: qemu_pid,
            agent_start: process_cpu(),
            qemu_start: qemu_non_vcpu(qemu_pid).unwrap_or_default(),
        }
    }

    /// Seconds so far.
    pub fn seconds(&self) -> f64 {
        let agent = process_cpu().saturating_sub(self.agent_start);
        let qemu = qemu_non_vcpu(self.pid)
            .unwrap_or_default()
            .saturating_sub(self.qemu_start);
        (agent + qemu).as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces() {
        let s = "4242 (CPU 0/TCG) S 1 2 3 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 1 0";
        let d = parse_stat_cpu(s, 100.0).unwrap();
        assert_eq!(d, Duration::from_secs(3));
        assert!(parse_stat_cpu("garbage", 100.0).is_none());
    }

    #[test]
    fn own_process_counts_its_work() {
        let before = process_cpu();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(process_cpu() > before);
        // Our own threads are visible by name through /proc.
        let me = std::process::id();
        assert!(threads_cpu(me, |_| true).is_some());
        assert!(threads_cpu(u32::MAX, |_| true).is_none());
    }
}
