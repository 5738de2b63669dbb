//! WebSocket, for browsers: one SO_REUSEPORT listener per shard like TCP, an HTTP
//! upgrade on `websocket.path` (optionally inside TLS), then each binary message
//! carries exactly one protobuf frame — no length prefix, the WebSocket message is
//! the length. Outbound frames are the same encoded `Bytes` TCP sends, sliced past
//! their 4-byte prefix, so a fan-out is still encoded once.
//!
//! - Upgrade checks: wrong path → 404, `Origin` not in `websocket.allowed_origins`
//!   (when the list is non-empty) → 403, `?token=` that fails verification → 401.
//!   A valid `?token=` authenticates the connection right after `Hello`, as if the
//!   client had sent `Authenticate` (the `Authenticated` reply has request_id 0;
//!   the session does it, see `Session::authenticate_after_hello`).
//! - Text messages close with 1003; messages above `protocol.max_frame_bytes` are
//!   refused by the WebSocket layer and close with 1009; WebSocket pings count as
//!   heartbeats (tungstenite answers them). Other close codes: see [`close_code`].
//! - Memory: tungstenite allocates its read buffer eagerly (128 KiB by default), so
//!   it is set to [`READ_BUFFER_BYTES`]; the write buffer is small too. It also
//!   reserves a frame's claimed length from its header, so input reaches it
//!   through [`ArrivedFrames`], which releases a frame only once it has arrived.

use super::admission::{Permit, Refused};
use super::connection::{Closed, Context, FrameSource, Handler, Inbound, ReadError, run_connection};
use super::outbound::Outbound;
use super::ws_arrival::ArrivedFrames;
use bytes::Bytes;
use confab_proto::FrameError;
use futures::stream::{SplitSink, SplitStream, StreamExt as _};
use futures::{SinkExt as _, Stream};
use std::net::SocketAddr;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Message, WebSocketConfig};

/// Read buffer each connection allocates at upgrade.
pub const READ_BUFFER_BYTES: usize = 1024;
/// Outgoing bytes buffered before a write; flushed after each batch anyway.
const WRITE_BUFFER_BYTES: usize = 4096;

/// Serves one accepted connection: TLS if on, the upgrade, then the protocol.
pub async fn serve<H: Handler>(context: Rc<Context<H>>, stream: TcpStream, peer: SocketAddr, _permit: Permit) {
    match context.tls.clone() {
        None => upgrade_and_serve(context, stream, peer).await,
        // Boxed: the TLS handshake's and stream's state would otherwise size
        // every plain connection's task too, for as long as it lives.
        Some(tls) => {
            Box::pin(async move {
                if let Some(stream) = super::tls::accept(&tls, stream, peer, context.handshake_timeout).await {
                    upgrade_and_serve(context, stream, peer).await;
                }
            })
            .await
        }
    }
}

/// Answers a refused connection's upgrade request before reading it, with 429
/// (its address holds too many) or 503 (the node does); best effort, never
/// waiting. Under TLS it is just closed.
pub fn refuse<H>(context: &Context<H>, stream: &TcpStream, refused: Refused) {
    if context.tls.is_some() {
        return;
    }
    let status = match refused {
        refused if refused.is_address() => "429 Too Many Requests",
        _ => "503 Service Unavailable",
    };
    let reason = refused.reason();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reason}",
        reason.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

async fn upgrade_and_serve<H, S>(context: Rc<Context<H>>, stream: S, peer: SocketAddr)
where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let max_frame_bytes = context.max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(max_frame_bytes.saturating_mul(2))
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes));
    let mut upgrade_token = None;
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| check_upgrade(&context, request, response, &mut upgrade_token);
    // Boxed: the handshake's state is large and would otherwise size the whole
    // connection task for as long as the connection lives.
    let upgrade = Box::pin(tokio_tungstenite::accept_hdr_async_with_config(
        ArrivedFrames::new(stream, max_frame_bytes),
        check,
        Some(config),
    ));
    let socket = match tokio::time::timeout(context.handshake_timeout, upgrade).await {
        Ok(Ok(socket)) => socket,
        Ok(Err(err)) => {
            tracing::info!(%peer, error = %err, "WebSocket upgrade refused or failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "WebSocket upgrade timed out");
            return;
        }
    };
    let (sink, read) = socket.split();
    let source = WsFrames { read, upgrade_token };
    run_connection(context, source, peer, |queued| write_messages(sink, queued)).await;
}

/// Decides the HTTP upgrade: path, Origin, optional `?token=`. (The error type is
/// tungstenite's callback signature.)
#[allow(clippy::result_large_err)]
fn check_upgrade<H>(
    context: &Context<H>,
    request: &Request,
    response: Response,
    upgrade_token: &mut Option<String>,
) -> Result<Response, ErrorResponse> {
    if request.uri().path() != context.websocket_path {
        return Err(upgrade_refusal(StatusCode::NOT_FOUND, "no WebSocket endpoint here"));
    }
    if !context.allowed_origins.is_empty() {
        let origin = request.headers().get("origin").and_then(|value| value.to_str().ok());
        if !origin.is_some_and(|origin| context.allowed_origins.iter().any(|allowed| allowed == origin)) {
            tracing::info!(origin = ?origin, "WebSocket upgrade from an origin not allowed");
            return Err(upgrade_refusal(StatusCode::FORBIDDEN, "origin not allowed"));
        }
    }
    let token = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix("token="));
    if let Some(token) = token {
        if let Err(err) = context.accounts.check_token(token) {
            tracing::info!(error = %err, "WebSocket upgrade with a bad token");
            return Err(upgrade_refusal(StatusCode::UNAUTHORIZED, "invalid or expired token"));
        }
        *upgrade_token = Some(token.to_owned());
    }
    Ok(response)
}

fn upgrade_refusal(status: StatusCode, reason: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(reason.to_owned()));
    *response.status_mut() = status;
    response
}

/// Frames from binary WebSocket messages.
struct WsFrames<S> {
    read: SplitStream<WebSocketStream<S>>,
    /// A token given at upgrade, for the session to authenticate with after `Hello`.
    upgrade_token: Option<String>,
}

impl<S> FrameSource for WsFrames<S>
where
    WebSocketStream<S>: Stream<Item = Result<Message, WsError>> + Unpin,
{
    /// Cancel-safe: the WebSocket stream keeps partial messages itself.
    async fn next(&mut self) -> Result<Option<Inbound>, ReadError> {
        loop {
            let message = match self.read.next().await {
                None => return Ok(None),
                Some(Ok(message)) => message,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    return Err(ReadError::Frame(FrameError::TooLarge {
                        claimed: size,
                        max: max_size,
                    }));
                }
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Ok(None),
                Some(Err(err)) => return Err(ReadError::Io(std::io::Error::other(err))),
            };
            return match message {
                Message::Binary(payload) => Ok(Some(Inbound::Frame(payload))),
                Message::Text(_) => Err(ReadError::Unsupported(
                    "text WebSocket messages are not part of the protocol; send binary frames",
                )),
                Message::Ping(_) | Message::Pong(_) => Ok(Some(Inbound::Alive)),
                Message::Close(_) => Ok(None),
                Message::Frame(_) => continue,
            };
        }
    }

    fn upgrade_token(&mut self) -> Option<String> {
        self.upgrade_token.take()
    }
}

/// Sends queued frames as binary messages, flushing once per batch, then a Close
/// frame saying why the connection ended.
async fn write_messages<S>(mut sink: SplitSink<WebSocketStream<S>, Message>, queued: Outbound)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(frame) = queued.recv().await {
        let mut result = sink.feed(binary(frame)).await;
        while result.is_ok() {
            match queued.try_recv() {
                Some(more) => result = sink.feed(binary(more)).await,
                None => break,
            }
        }
        if result.and(sink.flush().await).is_err() {
            queued.close();
            return;
        }
    }
    if let Some(closed) = queued.ended() {
        let close = CloseFrame {
            code: close_code(closed),
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(close))).await;
    }
    let _ = sink.close().await;
}

/// An encoded frame without its length prefix.
fn binary(frame: Bytes) -> Message {
    Message::Binary(frame.slice(confab_proto::LENGTH_PREFIX_BYTES.min(frame.len())..))
}

/// The WebSocket close code for why a connection ended (documented in PROTOCOL.md).
pub fn close_code(closed: Closed) -> CloseCode {
    match closed {
        Closed::PeerClosed => CloseCode::Normal,
        Closed::ShuttingDown => CloseCode::Away,
        Closed::Violation => CloseCode::Protocol,
        Closed::UnsupportedData => CloseCode::Unsupported,
        Closed::TooLarge => CloseCode::Size,
        Closed::Timeout | Closed::Kicked | Closed::SlowConsumer => CloseCode::Policy,
        Closed::TransportError => CloseCode::Error,
    }
}
