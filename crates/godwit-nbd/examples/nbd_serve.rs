//! Serve a raw image file over NBD on a unix socket, by hand:
//!
//! ```sh
//! cargo run -p godwit-nbd --example nbd_serve -- disk.raw /tmp/nbd.sock [export-name] [--read-only]
//! qemu-img info 'nbd+unix:///export-name?socket=/tmp/nbd.sock'
//! nbdinfo --map 'nbd+unix:///export-name?socket=/tmp/nbd.sock'
//! ```
use std::sync::Arc;

use anyhow::Context;
use godwit_nbd::server::{serve_unix, ServedExport};
use godwit_nbd::FileExport;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "godwit_nbd=debug".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let read_only = args.iter().any(|a| a == "--read-only");
    args.retain(|a| a != "--read-only");
    let [image, socket, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: nbd_serve IMAGE SOCKET [EXPORT-NAME] [--read-only]");
    };
    let name = rest.first().cloned().unwrap_or_default();
    let export = FileExport::open(image, read_only).with_context(|| format!("open {image}"))?;
    eprintln!("serving {image} as {name:?} on {socket}");
    serve_unix(socket, vec![ServedExport::new(name, Arc::new(export))])
        .await
        .context("NBD server")?;
    Ok(())
}
