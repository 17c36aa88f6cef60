//! `godwit lab …`: a multi-site lab on this machine over an emulated WAN.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use godwit_lab::link::LinkParamsUpdate;
use godwit_lab::wan::WanClient;
use godwit_lab::LabSpec;

use crate::labenv;
use crate::output::Out;

/// Lab subcommands.
#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Build N sites (network namespaces, one agent each) joined by the WAN emulator.
    Up(UpArgs),
    /// Show the lab: sites, links, counters.
    Status,
    /// Remove everything the lab made (works after a crash too).
    Down,
    /// Cut the WAN between two sites (both directions), or around one site.
    Cut {
        /// Site.
        a: Option<String>,
        /// Other site.
        b: Option<String>,
    },
    /// Undo `cut`.
    Heal {
        /// Site.
        a: Option<String>,
        /// Other site.
        b: Option<String>,
    },
    /// Change link parameters (all links, or FROM→TO).
    Set(SetArgs),
    /// Kill a site's agent with SIGKILL, as a crash would, and start it
    /// again: it re-adopts its VMs and settles what the crash interrupted.
    Restart {
        /// Site.
        site: String,
        /// Crash point to arm in the new agent (repeatable): it kills
        /// itself there, e.g. `handover-before-cont`.
        #[arg(long)]
        failpoint: Vec<String>,
    },
    /// The WAN emulator daemon (started by `lab up`).
    #[command(hide = true)]
    WanDaemon(WanDaemonArgs),
}

/// Hidden daemon arguments, passed through to the emulator.
#[derive(Args, Debug)]
pub struct WanDaemonArgs {
    /// Raw arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// `godwit lab up`.
#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Number of sites (a, b, c, …).
    #[arg(long, default_value_t = 2)]
    pub sites: usize,
    /// One-way delay per direction, e.g. 50ms.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub delay: Duration,
    /// Rate per direction, e.g. 100mbit (0 = unlimited).
    #[arg(long, default_value = "100mbit", value_parser = parse_rate)]
    pub rate: u64,
    /// Random loss, percent (e.g. 0.1).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Extra random delay up to this much (never reorders).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub jitter: Duration,
    /// Queue limit per link, bytes (default: about one BDP).
    #[arg(long)]
    pub queue: Option<u64>,
    /// Accelerator of the lab's agents.
    #[arg(long, default_value = "tcg", value_parser = crate::cmd::agent::parse_accel)]
    pub accel: godwit_qemu::Accel,
    /// Sites that run no agent but a Linux `vxlan` device (vx0) that the
    /// agents have as a plain-VXLAN peer, e.g. `--kernel-vxlan c`.
    #[arg(long, value_delimiter = ',')]
    pub kernel_vxlan: Vec<String>,
    /// The distributed gateway of every agent, ADDR/PREFIX (repeatable),
    /// e.g. `--gateway 10.9.0.254/24`: guests with that default route
    /// reach the sites' host addresses and beyond from wherever they run.
    #[arg(long)]
    pub gateway: Vec<godwit_agent::config::GatewayAddr>,
}

impl UpArgs {
    /// The lab spec.
    pub fn spec(&self) -> LabSpec {
        LabSpec {
            sites: self.sites,
            delay: self.delay,
            rate_bps: self.rate,
            loss: self.loss / 100.0,
            jitter: self.jitter,
            queue_bytes: self.queue,
            ..LabSpec::default()
        }
    }
}

/// `godwit lab set`.
#[derive(Args, Debug)]
pub struct SetArgs {
    /// Only the link from this site.
    #[arg(long)]
    from: Option<String>,
    /// Only the link to this site.
    #[arg(long)]
    to: Option<String>,
    /// New one-way delay.
    #[arg(long, value_parser = parse_duration)]
    delay: Option<Duration>,
    /// New rate.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// New loss, percent.
    #[arg(long)]
    loss: Option<f64>,
    /// New jitter.
    #[arg(long, value_parser = parse_duration)]
    jitter: Option<Duration>,
}

/// Parses `50ms`, `1.5s`, `200us`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 50ms"))?;
    if !(0.0..=3600.0).contains(&(v * mul)) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

/// Parses `100mbit`, `1gbit`, `500kbit`, or bits per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let l = s.trim().to_ascii_lowercase();
    let (num, mul) = if let Some(n) = l.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = l.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = l.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = l.strip_suffix("bit") {
        (n, 1.0)
    } else {
        (l.as_str(), 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a rate like 100mbit"))?;
    if !(0.0..=1e12).contains(&(v * mul)) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((v * mul) as u64)
}

fn wan() -> Result<WanClient> {
    let st = labenv::require_lab()?;
    WanClient::connect(&st.wan_socket).context("connecting to the WAN emulator")
}

/// Runs a lab subcommand.
pub async fn run(c: LabCmd, out: Out) -> Result<()> {
    match c {
        LabCmd::Up(a) => {
            if a.loss < 0.0 || a.loss > 100.0 {
                bail!("--loss is a percentage between 0 and 100");
            }
            let net = labenv::LabNetwork {
                kernel_vxlan: a.kernel_vxlan.clone(),
                gateway: a.gateway.clone(),
            };
            let st = labenv::up_with(&a.spec(), a.accel, &net).await?;
            out.result("lab", &st, || {
                let mut s = format!(
                    "lab up: {} sites, {:?} one-way, {} Mbit/s, {}% loss\n",
                    st.sites.len(),
                    a.delay,
                    a.rate as f64 / 1e6,
                    a.loss
                );
                for site in &st.sites {
                    if a.kernel_vxlan.contains(&site.name) {
                        s.push_str(&format!(
                            "  site {}  {}  netns {}  no agent: kernel vxlan device {}\n",
                            site.name,
                            site.addr,
                            site.netns,
                            labenv::KERNEL_VXLAN_DEV
                        ));
                        continue;
                    }
                    s.push_str(&format!(
                        "  site {}  {}  netns {}  agent: godwit --site {} status\n",
                        site.name, site.addr, site.netns, site.name
                    ));
                }
                s.trim_end().to_owned()
            });
        }
        LabCmd::Status => {
            let st = labenv::require_lab()?;
            let stats = wan()?.stats_all()?;
            let v = serde_json::json!({"lab": st, "wan": stats});
            out.result("lab_status", &v, || {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            });
        }
        LabCmd::Down => {
            labenv::down()?;
            out.result("lab_down", &serde_json::json!({"down": true}), || {
                "lab down".into()
            });
        }
        LabCmd::Cut { a, b } => {
            let n = wan()?.cut(a.as_deref(), b.as_deref())?;
            out.result("lab_cut", &serde_json::json!({"links": n}), || {
                format!("cut {n} link directions")
            });
        }
        LabCmd::Heal { a, b } => {
            let n = wan()?.heal(a.as_deref(), b.as_deref())?;
            out.result("lab_heal", &serde_json::json!({"links": n}), || {
                format!("healed {n} link directions")
            });
        }
        LabCmd::Set(s) => {
            let upd = LinkParamsUpdate {
                rate_bps: s.rate,
                delay: s.delay,
                jitter: s.jitter,
                loss: s.loss.map(|l| l / 100.0),
                queue_bytes: None,
            };
            let n = wan()?.set_link(s.from.as_deref(), s.to.as_deref(), upd)?;
            out.result("lab_set", &serde_json::json!({"links": n}), || {
                format!("changed {n} link directions")
            });
        }
        LabCmd::Restart { site, failpoint } => {
            labenv::restart_agent(&site, &failpoint).await?;
            let v = serde_json::json!({"site": site, "failpoints": failpoint});
            out.result("lab_restart", &v, || {
                format!("agent of site {site} restarted")
            });
        }
        LabCmd::WanDaemon(_) => bail!("the WAN daemon runs outside the async runtime"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("130").unwrap(), Duration::from_millis(130));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_rate("100mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 1_000_000_000);
        assert!(parse_rate("-3mbit").is_err());
    }
}
