//! The tokio shell over a real unix socket, with raw protocol bytes: bad
//! clients are closed cleanly without disturbing others, and pipelined
//! requests on one connection are all answered.

use std::sync::Arc;

use anyhow::{ensure, Result};
use godwit_nbd::proto::{
    encode_option, encode_request, CMD_DISC, CMD_READ, CMD_WRITE, OPT_EXPORT_NAME,
    SIMPLE_REPLY_MAGIC,
};
use godwit_nbd::server::{bind_unix, serve_listener, ServedExport};
use godwit_nbd::MemExport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[tokio::test]
async fn bad_clients_are_closed_and_others_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("s.sock");
    let disk = Arc::new(MemExport::new(1 << 20, false));
    let listener = bind_unix(&sock)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let exports = vec![ServedExport::new("d", disk.clone())];
    let server = tokio::spawn(serve_listener(listener, exports, async {
        let _ = rx.await;
    }));

    // A non-fixed-newstyle client: greeting, then EOF.
    let mut bad = UnixStream::connect(&sock).await?;
    let mut greeting = [0u8; 18];
    bad.read_exact(&mut greeting).await?;
    ensure!(&greeting[..8] == b"NBDMAGIC");
    bad.write_all(&0u32.to_be_bytes()).await?;
    let mut rest = Vec::new();
    bad.read_to_end(&mut rest).await?;
    ensure!(
        rest.is_empty(),
        "server sent {rest:?} to a non-fixed client"
    );

    // A good client pipelines 8 writes and 8 reads without waiting.
    let mut c = UnixStream::connect(&sock).await?;
    c.read_exact(&mut greeting).await?;
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend(encode_option(OPT_EXPORT_NAME, b"d"));
    for i in 0..8u64 {
        msg.extend(encode_request(0, CMD_WRITE, i, i * 4096, 4096));
        msg.extend(vec![i as u8 + 1; 4096]);
    }
    for i in 0..8u64 {
        msg.extend(encode_request(0, CMD_READ, 100 + i, i * 4096, 4096));
    }
    msg.extend(encode_request(0, CMD_DISC, 0, 0, 0));
    c.write_all(&msg).await?;
    let mut out = Vec::new();
    c.read_to_end(&mut out).await?;
    ensure!(
        out.len() == 10 + 8 * 16 + 8 * (16 + 4096),
        "got {} bytes",
        out.len()
    );
    ensure!(u64::from_be_bytes(out[..8].try_into()?) == 1 << 20);
    let mut p = &out[10..];
    let (mut writes, mut reads) = (0, 0);
    while !p.is_empty() {
        ensure!(p[..4] == SIMPLE_REPLY_MAGIC.to_be_bytes());
        ensure!(p[4..8] == [0; 4], "error reply");
        let cookie = u64::from_be_bytes(p[8..16].try_into()?);
        p = &p[16..];
        if cookie >= 100 {
            // Requests run concurrently and the client did not wait for
            // its writes, so a read may see the old or the new block: only
            // check that it is one whole block.
            let data = &p[..4096];
            ensure!(data.iter().all(|&b| b == data[0]));
            p = &p[4096..];
            reads += 1;
        } else {
            writes += 1;
        }
    }
    ensure!(writes == 8 && reads == 8);
    for i in 0..8usize {
        ensure!(disk.snapshot()[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    let _ = tx.send(());
    server.await??;
    Ok(())
}
