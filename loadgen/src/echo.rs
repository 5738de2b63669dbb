//! The raw loopback baseline: a minimal tokio server that echoes length-prefixed
//! frames, and clients that keep a window of frames in flight. Run in the same
//! invocation as a scenario, with its frame size and connection count, it tells
//! what this machine's loopback and tokio can do at best, so a chat figure can be
//! stated as a fraction of it.

use bytes::BytesMut;
use confab_proto::FrameDecoder;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Frames each client keeps in flight.
const WINDOW: usize = 32;

/// Echoed frames per second over `connections` connections for `duration`.
pub async fn baseline(connections: usize, frame_bytes: usize, duration: Duration) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream, frame_bytes));
        }
    });
    let deadline = Instant::now() + duration;
    let clients = (0..connections).map(|_| async move {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        anyhow::Ok(pump(stream, frame_bytes, deadline).await?)
    });
    let started = Instant::now();
    let counts = futures::future::try_join_all(clients).await?;
    let elapsed = started.elapsed().as_secs_f64();
    server.abort();
    Ok(counts.iter().sum::<u64>() as f64 / elapsed)
}

fn frame(frame_bytes: usize) -> Vec<u8> {
    let payload = frame_bytes.saturating_sub(4);
    let mut frame = u32::try_from(payload).unwrap_or(u32::MAX).to_be_bytes().to_vec();
    frame.resize(frame_bytes.max(4), b'x');
    frame
}

async fn echo(mut stream: TcpStream, frame_bytes: usize) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let decoder = FrameDecoder::new(frame_bytes.max(4));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        while let Ok(Some(payload)) = decoder.split_payload(&mut buf) {
            out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(&payload);
        }
        stream.write_all(&out).await?;
        out.clear();
    }
}

/// Keeps WINDOW frames in flight until the deadline; returns frames echoed.
async fn pump(stream: TcpStream, frame_bytes: usize, deadline: Instant) -> std::io::Result<u64> {
    let (mut read, mut write) = stream.into_split();
    let frame = frame(frame_bytes);
    let window: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * WINDOW).collect();
    write.write_all(&window).await?;
    let decoder = FrameDecoder::new(frame_bytes.max(4));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut echoed = 0u64;
    while Instant::now() < deadline {
        if read.read_buf(&mut buf).await? == 0 {
            break;
        }
        let mut replies = 0;
        while let Ok(Some(_)) = decoder.split_payload(&mut buf) {
            replies += 1;
        }
        echoed += replies as u64;
        let refill: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * replies).collect();
        write.write_all(&refill).await?;
    }
    Ok(echoed)
}
