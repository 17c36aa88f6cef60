//! Stand-alone WAN emulator daemon: `godwit-lab-wan --config <file>`.
//!
//! The same code as the hidden `godwit lab wan-daemon` subcommand; it exists
//! so `godwit-lab`'s integration tests can start a lab on their own.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = godwit_lab::wan::daemon_main(&args) {
        eprintln!("godwit-lab-wan: error: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            eprintln!("Caused by: {s}");
            src = s.source();
        }
        std::process::exit(2);
    }
}
