//! `godwit`: live migration of QEMU VMs between hosts and sites.
//!
//! One binary. `godwit agent` is the per-host daemon; every other
//! subcommand is a client of the local agent's API, except `lab`, `image`,
//! `demo` and `bench`, which orchestrate a local test lab.
//!
//! Exit codes: 0 ok; 1 the operation failed with the VM intact (for
//! example a migration that failed and left the VM running at the source);
//! 2 usage or internal error.

mod bench;
mod bench_codec;
mod bench_evacuate;
mod bench_local;
mod bench_memory;
mod bench_network;
mod bench_transport;
mod cmd;
mod guestimg;
mod labenv;
mod output;
mod scenario;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::output::Out;

/// Live-migrate running QEMU VMs between hosts and sites.
#[derive(Parser, Debug)]
#[command(name = "godwit", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand accepts.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Print machine-readable JSON lines on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars or notes.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// API socket of the agent to talk to.
    #[arg(long, global = true, env = "GODWIT_SOCKET")]
    socket: Option<PathBuf>,
    /// Talk to the agent of this lab site instead (e.g. `a`).
    #[arg(long, global = true, conflicts_with = "socket")]
    site: Option<String>,
    /// More logging on stderr (-v info, -vv debug).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

impl Global {
    fn out(&self) -> Out {
        Out {
            json: self.json,
            quiet: self.quiet,
        }
    }

    /// The agent this command talks to.
    pub fn client(&self) -> godwit_agent::client::ApiClient {
        let path = match (&self.socket, &self.site) {
            (Some(p), _) => p.clone(),
            (None, Some(site)) => labenv::site_socket(site),
            (None, None) => PathBuf::from(godwit_agent::config::DEFAULT_API_SOCKET),
        };
        godwit_agent::client::ApiClient::new(path)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the per-host agent, or initialise this host (`agent init`).
    Agent(cmd::agent::AgentCmd),
    /// Show this agent, its peers, VMs and migrations.
    Status,
    /// Create, list, inspect and stop VMs.
    #[command(subcommand)]
    Vm(cmd::vm::VmCmd),
    /// Send a command to a VM's in-guest tool (JSON, e.g. '{"cmd":"status"}').
    Guest(cmd::vm::GuestCmd),
    /// Live-migrate a VM to another site.
    Migrate(cmd::migrate::MigrateCmd),
    /// Hand a running VM over to a new QEMU on this host (hypervisor
    /// upgrade or restart): guest RAM stays in place, only device state moves.
    Upgrade(cmd::migrate::UpgradeCmd),
    /// Move every VM off a host under a bandwidth budget.
    Evacuate(cmd::evacuate::EvacuateCmd),
    /// Put a host in maintenance (no VM is placed or migrated onto it), or take it out.
    Maintenance(cmd::evacuate::MaintenanceCmd),
    /// Show one migration (or all).
    Migration(cmd::migrate::ShowCmd),
    /// Manage trusted peer agents.
    #[command(subcommand)]
    Peer(cmd::agent::PeerCmd),
    /// A multi-site lab on this machine over an emulated WAN.
    #[command(subcommand)]
    Lab(cmd::lab::LabCmd),
    /// Build the test guest image (kernel + initramfs with godwit-guest).
    #[command(subcommand)]
    Image(guestimg::ImageCmd),
    /// Two sites, a guest, a live migration over a 50 ms WAN, a report.
    Demo(cmd::demo::DemoCmd),
    /// Run a benchmark suite and print one JSON object.
    Bench(bench::BenchCmd),
}

fn init_tracing(verbose: u8, agent: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (agent, verbose) {
        (true, 0) => "info",
        (false, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// An error that means "failed, VM intact" (exit 1) rather than "broken" (2).
#[derive(Debug)]
pub struct OperationFailed(pub String);

impl std::fmt::Display for OperationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OperationFailed {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The WAN emulator is a plain thread program; keep tokio out of it.
    if let Command::Lab(cmd::lab::LabCmd::WanDaemon(args)) = &cli.command {
        init_tracing(cli.global.verbose, true);
        return match godwit_lab::wan::daemon_main(&args.args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("godwit: error: {}", godwit_agent::error_chain(&e));
                ExitCode::from(2)
            }
        };
    }
    let is_agent = matches!(&cli.command, Command::Agent(a) if a.sub.is_none());
    init_tracing(cli.global.verbose, is_agent);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("godwit: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("godwit: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  Caused by: {cause}");
            }
            if e.downcast_ref::<OperationFailed>().is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;
    let out = g.out();
    match cli.command {
        Command::Agent(a) => cmd::agent::run(a, &g, out).await,
        Command::Status => cmd::agent::status(&g, out).await,
        Command::Vm(c) => cmd::vm::run(c, &g, out).await,
        Command::Guest(c) => cmd::vm::guest(c, &g, out).await,
        Command::Migrate(c) => cmd::migrate::run(c, &g, out).await,
        Command::Upgrade(c) => cmd::migrate::upgrade(c, &g, out).await,
        Command::Evacuate(c) => cmd::evacuate::evacuate(c, &g, out).await,
        Command::Maintenance(c) => cmd::evacuate::maintenance(c, &g, out).await,
        Command::Migration(c) => cmd::migrate::show(c, &g, out).await,
        Command::Peer(c) => cmd::agent::peer(c, &g, out).await,
        Command::Lab(c) => cmd::lab::run(c, out).await,
        Command::Image(c) => guestimg::run(c, out).await,
        Command::Demo(c) => cmd::demo::run(c, out).await,
        Command::Bench(c) => bench::run(c, out).await,
    }
}
