//! Crash points for recovery tests.
//!
//! An agent started with `GODWIT_FAILPOINTS=name[,name…]` kills itself with
//! `SIGKILL` when it reaches one of the named points, so a test can crash
//! it exactly inside a window that a timed `kill -9` hits only by luck (a
//! same-host handover's switch-over lasts a few milliseconds). `SIGKILL`,
//! not a panic or `exit`: no destructor, flush or drop handler may run,
//! just as when the host's OOM killer or an operator ends the process.
//! Without the variable every point is a no-op.

use std::sync::OnceLock;

/// The environment variable naming the armed points.
pub const ENV: &str = "GODWIT_FAILPOINTS";

/// After a handover's new QEMU was persisted in the VM record and waits
/// for the stream, before the old QEMU is told to migrate.
pub const HANDOVER_BEFORE_MIGRATE: &str = "handover-before-migrate";
/// After the old QEMU completed a handover (the new one holds the whole
/// state, paused), before the new one is told to run.
pub const HANDOVER_BEFORE_CONT: &str = "handover-before-cont";

/// Every point this build knows, for `godwit lab restart --failpoint`.
pub const ALL: &[&str] = &[HANDOVER_BEFORE_MIGRATE, HANDOVER_BEFORE_CONT];

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| parse(std::env::var(ENV).ok().as_deref().unwrap_or("")))
}

/// The point names in a `GODWIT_FAILPOINTS` value.
fn parse(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Kills this process with `SIGKILL` if `point` is armed.
pub fn hit(point: &str) {
    if armed().iter().any(|p| p == point) {
        tracing::warn!(point, "failpoint reached: killing the agent");
        // SAFETY: kill(2) on our own pid with a signal that cannot be
        // caught; no memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_list() {
        assert_eq!(parse(""), Vec::<String>::new());
        assert_eq!(
            parse(" handover-before-cont , ,x"),
            vec!["handover-before-cont".to_owned(), "x".to_owned()]
        );
    }

    #[test]
    fn unarmed_points_return() {
        // The test process has no GODWIT_FAILPOINTS naming this point.
        hit("no-such-point");
    }
}
