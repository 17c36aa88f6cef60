//! `godwit-guest`: the in-guest instrument.
//!
//! `serve` is what the image's init runs: it reads commands from the
//! virtio-serial port and runs them. The other subcommands run one job
//! standalone from a shell and print reports as protocol lines on stdout.
//! Hand-rolled argument parsing keeps the static binary small and its
//! dependencies at std/libc/serde.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use godwit_guest::diskio::{self, DiskJob};
use godwit_guest::memdirty::Memdirty;
use godwit_guest::net;
use godwit_guest::port;
use godwit_guest::proto::{encode_line, DirtyPattern, DiskMode, Report};
use godwit_guest::realistic::{Realistic, RealisticConfig};

const USAGE: &str = "\
usage: godwit-guest <command> [--flag value]...

commands:
  serve [--device PATH] [--stdio]      serve the host protocol (port org.godwit.guest.0)
  memdirty --mib N --rate PAGES_PER_S [--pattern sequential|random|hotspot] [--duration S]
  realistic --anon-mib N --cache-mib N [--corpus DIR] [--hold]
  diskio --device DEV [--mib N] [--mode write_then_verify|read_loop|randrw] [--block-kib K] [--duration S]
  diskverify --device DEV
  udp-send --dest ADDR:PORT --rate-kbit N [--payload BYTES] --duration S
  udp-recv --bind ADDR:PORT --duration S
  tcp-echo-serve --bind ADDR:PORT
  tcp-echo-client --dest ADDR:PORT [--interval-ms N] --duration S
";

struct Args {
    flags: HashMap<String, String>,
}

impl Args {
    fn parse(rest: &[String]) -> Result<Self, String> {
        let mut flags = HashMap::new();
        let mut it = rest.iter().peekable();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            let value = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().cloned().unwrap_or_default(),
                _ => "true".to_string(),
            };
            flags.insert(name.to_string(), value);
        }
        Ok(Self { flags })
    }

    fn str_opt(&self, k: &str) -> Option<&str> {
        self.flags.get(k).map(String::as_str)
    }

    fn str(&self, k: &str) -> Result<String, String> {
        self.str_opt(k)
            .map(str::to_owned)
            .ok_or_else(|| format!("missing --{k}"))
    }

    fn num(&self, k: &str, default: Option<u64>) -> Result<u64, String> {
        match self.flags.get(k) {
            Some(v) => v.parse().map_err(|_| format!("--{k}: not a number: {v}")),
            None => default.ok_or_else(|| format!("missing --{k}")),
        }
    }

    fn enum_val<T: serde::de::DeserializeOwned>(
        &self,
        k: &str,
        default: &str,
    ) -> Result<T, String> {
        let v = self.str_opt(k).unwrap_or(default);
        serde_json::from_value(serde_json::Value::String(v.to_string()))
            .map_err(|_| format!("--{k}: unknown value {v}"))
    }
}

fn print(r: &Report) {
    print!("{}", encode_line(r));
}

/// Print reports from a channel until every sender is gone.
fn printer() -> (mpsc::Sender<Report>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Report>();
    let h = std::thread::spawn(move || {
        for r in rx {
            print(&r);
        }
    });
    (tx, h)
}

fn err_string(e: &dyn std::error::Error) -> String {
    godwit_guest::realistic::error_chain(e)
}

fn run(cmd: &str, a: &Args) -> Result<(), String> {
    match cmd {
        "serve" => {
            if a.str_opt("stdio").is_some() {
                port::serve_stdio().map_err(|e| e.to_string())
            } else {
                port::serve_port(a.str_opt("device").map(PathBuf::from))
            }
        }
        "memdirty" => {
            let pattern: DirtyPattern = a.enum_val("pattern", "random")?;
            let m = Memdirty::start(a.num("mib", None)?, a.num("rate", None)?, pattern)
                .map_err(|e| err_string(&e))?;
            let duration = a.num("duration", Some(10))?;
            for _ in 0..duration {
                std::thread::sleep(Duration::from_secs(1));
                eprintln!("{:?}", m.stats());
            }
            m.stop();
            let v = m.verify();
            print(&Report::Verify {
                id: 0,
                pages: v.pages,
                errors: v.errors,
                first_bad_page: v.first_bad,
            });
            if v.errors > 0 {
                return Err(format!("{} bad pages", v.errors));
            }
            Ok(())
        }
        "realistic" => {
            let mut cfg = RealisticConfig::new(a.num("anon-mib", None)?, a.num("cache-mib", None)?);
            if let Some(c) = a.str_opt("corpus") {
                cfg.corpus = c.into();
            }
            let r = Realistic::build(&cfg);
            println!(
                "{}",
                serde_json::to_string(&r.stats()).map_err(|e| e.to_string())?
            );
            if a.str_opt("hold").is_some() {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            Ok(())
        }
        "diskio" => {
            let mode: DiskMode = a.enum_val("mode", "write_then_verify")?;
            let device = a.str("device")?;
            let block_kib =
                u32::try_from(a.num("block-kib", Some(64))?).map_err(|e| e.to_string())?;
            let (tx, h) = printer();
            let job = DiskJob::start(0, &device, a.num("mib", Some(0))?, mode, block_kib, tx)
                .map_err(|e| err_string(&e))?;
            std::thread::sleep(Duration::from_secs(a.num("duration", Some(10))?));
            job.stop();
            let v = job.verify().map_err(|e| err_string(&e))?;
            drop(job);
            let _ = h.join();
            print(&Report::Verify {
                id: 0,
                pages: v.pages,
                errors: v.errors,
                first_bad_page: v.first_bad,
            });
            Ok(())
        }
        "diskverify" => {
            let v = diskio::verify_stateless(&a.str("device")?).map_err(|e| err_string(&e))?;
            print(&Report::Verify {
                id: 0,
                pages: v.pages,
                errors: v.errors,
                first_bad_page: v.first_bad,
            });
            if v.errors > 0 {
                return Err(format!("{} bad blocks", v.errors));
            }
            Ok(())
        }
        "udp-send" => {
            let (tx, h) = printer();
            let payload =
                u32::try_from(a.num("payload", Some(1200))?).map_err(|e| e.to_string())?;
            net::udp_send(
                0,
                &a.str("dest")?,
                a.num("rate-kbit", None)?,
                payload,
                a.num("duration", None)?,
                &tx,
            )
            .map_err(|e| err_string(&e))?;
            drop(tx);
            let _ = h.join();
            Ok(())
        }
        "udp-recv" => {
            let (tx, h) = printer();
            net::udp_recv(0, &a.str("bind")?, a.num("duration", None)?, &tx)
                .map_err(|e| err_string(&e))?;
            drop(tx);
            let _ = h.join();
            Ok(())
        }
        "tcp-echo-serve" => {
            let (tx, _h) = printer();
            net::tcp_echo_serve(0, &a.str("bind")?, tx).map_err(|e| err_string(&e))?;
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "tcp-echo-client" => {
            let (tx, h) = printer();
            net::tcp_echo_client(
                0,
                &a.str("dest")?,
                a.num("interval-ms", Some(100))?,
                a.num("duration", None)?,
                &tx,
            )
            .map_err(|e| err_string(&e))?;
            drop(tx);
            let _ = h.join();
            Ok(())
        }
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let res = Args::parse(rest).and_then(|a| run(cmd, &a));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("godwit-guest: error: {e}");
            ExitCode::from(1)
        }
    }
}
