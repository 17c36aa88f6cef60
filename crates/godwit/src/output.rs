//! How results reach the user: human text on stderr/stdout, or `--json`
//! lines on stdout (`{"type": …, "data": …}`), and the progress bar.
//!
//! Progress follows cargo's rules: nothing for the first 500 ms, at most
//! one redraw every 100 ms, and none at all when stderr is not a terminal,
//! under `--quiet`, with `--json`, `TERM=dumb` or in CI.

use std::io::IsTerminal;
use std::time::Duration;

use serde::Serialize;

/// Output settings from the global flags.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// Machine-readable output.
    pub json: bool,
    /// No progress, no chatter.
    pub quiet: bool,
}

impl Out {
    /// Progress and chatter off: for steps inside a benchmark, whose own
    /// notes say what runs.
    pub const QUIET: Out = Out {
        json: false,
        quiet: true,
    };

    /// Prints one JSON line `{"type": kind, "data": data}`.
    pub fn emit<T: Serialize>(&self, kind: &str, data: &T) {
        let line = serde_json::json!({"type": kind, "data": data});
        println!("{line}");
    }

    /// Prints a result: JSON line, or the human text.
    pub fn result<T: Serialize>(&self, kind: &str, data: &T, human: impl FnOnce() -> String) {
        if self.json {
            self.emit(kind, data);
        } else {
            let text = human();
            if !text.is_empty() {
                println!("{text}");
            }
        }
    }

    /// A note for humans on stderr (suppressed by --json/--quiet).
    pub fn note(&self, msg: impl AsRef<str>) {
        if !self.json && !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// Whether a progress bar may be drawn.
    pub fn progress_enabled(&self) -> bool {
        !self.json
            && !self.quiet
            && std::io::stderr().is_terminal()
            && std::env::var_os("CI").is_none()
            && std::env::var("TERM").map(|t| t != "dumb").unwrap_or(true)
    }

    /// A progress bar, or a hidden one when progress is disabled.
    pub fn progress_bar(&self, len: u64) -> indicatif::ProgressBar {
        if !self.progress_enabled() {
            return indicatif::ProgressBar::hidden();
        }
        let pb = indicatif::ProgressBar::with_draw_target(
            Some(len),
            indicatif::ProgressDrawTarget::stderr_with_hz(10),
        );
        let style =
            indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {percent:>3}% {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> ");
        pb.set_style(style);
        pb
    }
}

/// Formats bytes as MiB/GiB.
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", n / 1024.0 / 1024.0 / 1024.0)
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// Formats bits per second.
pub fn rate(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} Gbit/s", bps / 1e9)
    } else {
        format!("{:.1} Mbit/s", bps / 1e6)
    }
}

/// Formats milliseconds.
pub fn ms(v: u64) -> String {
    let d = Duration::from_millis(v);
    if v >= 10_000 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{v} ms")
    }
}
