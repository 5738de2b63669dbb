//! How a [`crate::Client`] reaches a server: TCP, TLS, WebSocket (plain or TLS) or
//! QUIC. Every transport carries the same protobuf frames; byte streams (TCP, TLS,
//! QUIC) with a 4-byte length prefix, WebSocket one frame per binary message.
//!
//! TLS trust is by pinning the server certificate's SHA-256 (what
//! `confab serve` prints for `tls.mode = "self-signed"` and for QUIC).

use crate::{ClientError, ClientOptions};
use bytes::{Bytes, BytesMut};
use confab_proto::v1::ServerFrame;
use confab_proto::{FrameDecoder, LENGTH_PREFIX_BYTES, ProstMessage as _};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// ALPN of protocol v1 over QUIC.
pub const QUIC_ALPN: &[u8] = b"confab/1";
/// Bytes the server may send on the session stream before the client reads them.
const QUIC_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// The server's default WebSocket path.
pub const DEFAULT_WEBSOCKET_PATH: &str = "/v1/ws";

/// The wire a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    /// TCP inside TLS.
    Tls,
    WebSocket,
    /// WebSocket inside TLS (`wss://`).
    WebSocketTls,
    Quic,
}

impl Transport {
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Tls | Self::WebSocketTls | Self::Quic)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::WebSocket => "ws",
            Self::WebSocketTls => "wss",
            Self::Quic => "quic",
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        [Self::Tcp, Self::Tls, Self::WebSocket, Self::WebSocketTls, Self::Quic]
            .into_iter()
            .find(|transport| transport.name() == name)
            .ok_or_else(|| format!("unknown transport {name:?}; expected tcp, tls, ws, wss or quic"))
    }
}

/// Where and how to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub transport: Transport,
    /// SHA-256 of the server certificate; required by the TLS transports.
    pub pinned_certificate: Option<[u8; 32]>,
}

impl Endpoint {
    pub fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Tcp,
            pinned_certificate: None,
        }
    }

    pub fn websocket(addr: SocketAddr) -> Self {
        Self {
            transport: Transport::WebSocket,
            ..Self::tcp(addr)
        }
    }

    /// A TLS transport to a server whose certificate has this SHA-256.
    pub fn pinned(addr: SocketAddr, transport: Transport, certificate_sha256: [u8; 32]) -> Self {
        Self {
            addr,
            transport,
            pinned_certificate: Some(certificate_sha256),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self::tcp(addr)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// `[transport://]ip:port[#certificate-sha256]`, e.g. `127.0.0.1:7300` (TCP),
    /// `ws://127.0.0.1:7380`, or `quic://127.0.0.1:7300#ab12…` (64 hex digits).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (transport, rest) = match text.split_once("://") {
            Some((scheme, rest)) => (scheme.parse()?, rest),
            None => (Transport::Tcp, text),
        };
        let (addr, pin) = match rest.split_once('#') {
            Some((addr, pin)) => (
                addr,
                Some(parse_fingerprint(pin).ok_or_else(|| format!("bad certificate fingerprint {pin:?}"))?),
            ),
            None => (rest, None),
        };
        let addr = addr.parse().map_err(|err| format!("bad address {addr:?}: {err}"))?;
        if transport.uses_tls() && pin.is_none() {
            return Err(format!(
                "{} needs the server certificate's SHA-256 after '#'",
                transport.name()
            ));
        }
        Ok(Self {
            addr,
            transport,
            pinned_certificate: pin,
        })
    }
}

/// Parses a certificate fingerprint as printed by the server (64 hex digits,
/// optionally with `:` separators).
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: Vec<u8> = text.bytes().filter(|byte| *byte != b':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type WebSocket = WebSocketStream<Box<dyn Io>>;

/// Reads whole server frames.
pub(crate) enum FrameReader {
    Stream {
        read: Box<dyn AsyncRead + Send + Unpin>,
        buf: BytesMut,
    },
    WebSocket(SplitStream<WebSocket>),
}

/// Writes encoded (length-prefixed) frames.
pub(crate) enum FrameWriter {
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
    WebSocket(SplitSink<WebSocket, Message>),
}

/// A QUIC connection's handles, kept for as long as the client lives.
#[derive(Debug)]
pub(crate) struct QuicHandles {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
}

pub(crate) struct Connected {
    pub reader: FrameReader,
    pub writer: FrameWriter,
    pub quic: Option<QuicHandles>,
    /// QUIC: `Some` when the connection tried 0-RTT; resolves to whether it was accepted.
    pub zero_rtt: Option<quinn::ZeroRttAccepted>,
}

pub(crate) async fn connect(endpoint: &Endpoint, options: &ClientOptions) -> Result<Connected, ClientError> {
    if endpoint.transport == Transport::Quic {
        return connect_quic(endpoint, options).await;
    }
    let stream = connect_tcp(endpoint.addr, options).await?;
    let stream: Box<dyn Io> = if endpoint.transport.uses_tls() {
        let connector = tokio_rustls::TlsConnector::from(tls_config(endpoint)?);
        Box::new(connector.connect(server_name(options)?, stream).await?)
    } else {
        Box::new(stream)
    };
    match endpoint.transport {
        Transport::WebSocket | Transport::WebSocketTls => {
            let scheme = if endpoint.transport.uses_tls() { "wss" } else { "ws" };
            let url = format!("{scheme}://{}{}", endpoint.addr, options.websocket_path);
            let config = WebSocketConfig::default()
                .read_buffer_size(16 * 1024)
                .max_message_size(None)
                .max_frame_size(None);
            let (socket, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .map_err(|err| ClientError::Transport(format!("WebSocket upgrade failed: {err}")))?;
            let (sink, read) = socket.split();
            Ok(Connected {
                reader: FrameReader::WebSocket(read),
                writer: FrameWriter::WebSocket(sink),
                quic: None,
                zero_rtt: None,
            })
        }
        _ => {
            let (read, write) = tokio::io::split(stream);
            Ok(Connected {
                reader: FrameReader::Stream {
                    read: Box::new(read),
                    buf: BytesMut::new(),
                },
                writer: FrameWriter::Stream(Box::new(write)),
                quic: None,
                zero_rtt: None,
            })
        }
    }
}

async fn connect_tcp(addr: SocketAddr, options: &ClientOptions) -> Result<TcpStream, ClientError> {
    let stream = match options.local_ip {
        None => TcpStream::connect(addr).await?,
        Some(local_ip) => {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(local_ip, 0))?;
            socket.connect(addr).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect_quic(endpoint: &Endpoint, options: &ClientOptions) -> Result<Connected, ClientError> {
    let quic_error = |err: &dyn std::fmt::Display| ClientError::Transport(format!("QUIC: {err}"));
    let local = match (options.local_ip, endpoint.addr) {
        (Some(ip), _) => SocketAddr::new(ip, 0),
        (None, SocketAddr::V4(_)) => SocketAddr::from(([0, 0, 0, 0], 0)),
        (None, SocketAddr::V6(_)) => SocketAddr::from(([0u16; 8], 0)),
    };
    let quic_endpoint = match &options.quic_endpoint {
        Some(shared) => shared.clone(),
        None => quic_client_endpoint(local)?,
    };
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls_config(endpoint)?).map_err(|err| quic_error(&err))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // Windows in the range TCP autotuning reaches on loopback, so a burst of
    // pushes is not throttled by flow control before the reader sees it.
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(QUIC_RECEIVE_WINDOW))
        .receive_window(quinn::VarInt::from_u32(QUIC_RECEIVE_WINDOW));
    config.transport_config(Arc::new(transport));
    let connecting = quic_endpoint
        .connect_with(config, endpoint.addr, &options.tls_server_name)
        .map_err(|err| quic_error(&err))?;
    // With a session ticket from an earlier connection, the Hello goes out as 0-RTT.
    let (connection, zero_rtt) = match connecting.into_0rtt() {
        Ok((connection, accepted)) => (connection, Some(accepted)),
        Err(connecting) => (connecting.await.map_err(|err| quic_error(&err))?, None),
    };
    let (send, recv) = connection.open_bi().await.map_err(|err| quic_error(&err))?;
    Ok(Connected {
        reader: FrameReader::Stream {
            read: Box::new(recv),
            buf: BytesMut::new(),
        },
        writer: FrameWriter::Stream(Box::new(send)),
        quic: Some(QuicHandles {
            endpoint: quic_endpoint,
            connection,
        }),
        zero_rtt,
    })
}

/// UDP socket buffers asked for: a burst of handshakes or pushes must not
/// overflow the kernel's default (~200 KB), or packets drop and QUIC waits for
/// its retransmission timers. The kernel caps it at `net.core.rmem_max`.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `local` with [`UDP_BUFFER_BYTES`] buffers (as far as the
/// kernel allows).
pub fn udp_socket(local: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(local), socket2::Type::DGRAM, None)?;
    // Best effort: the kernel may cap or refuse the size.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&local.into())?;
    Ok(socket.into())
}

/// A QUIC client endpoint on its own UDP socket, for one client or to share
/// ([`ClientOptions::quic_endpoint`]).
pub fn quic_client_endpoint(local: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("QUIC needs a tokio runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp_socket(local)?, runtime)
}

/// A new session stream on an established QUIC connection.
pub(crate) async fn reopen_quic_stream(quic: &QuicHandles) -> Result<(FrameReader, FrameWriter), ClientError> {
    let (send, recv) = quic
        .connection
        .open_bi()
        .await
        .map_err(|err| ClientError::Transport(format!("QUIC: {err}")))?;
    Ok((
        FrameReader::Stream {
            read: Box::new(recv),
            buf: BytesMut::new(),
        },
        FrameWriter::Stream(Box::new(send)),
    ))
}

fn server_name(options: &ClientOptions) -> Result<ServerName<'static>, ClientError> {
    ServerName::try_from(options.tls_server_name.clone())
        .map_err(|err| ClientError::Transport(format!("bad TLS server name: {err}")))
}

/// Client configs by (pinned certificate, is QUIC).
type ConfigCache = HashMap<([u8; 32], bool), Arc<rustls::ClientConfig>>;

/// One rustls config per (pin, transport) for the whole process, so session
/// tickets from one connection let the next resume (QUIC 0-RTT).
fn tls_config(endpoint: &Endpoint) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    static CONFIGS: OnceLock<Mutex<ConfigCache>> = OnceLock::new();
    let pin = endpoint
        .pinned_certificate
        .ok_or_else(|| ClientError::Transport("TLS transports need the server certificate's SHA-256 pinned".into()))?;
    let quic = endpoint.transport == Transport::Quic;
    let mut configs = CONFIGS
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| ClientError::Transport("TLS config cache poisoned".into()))?;
    if let Some(config) = configs.get(&(pin, quic)) {
        return Ok(config.clone());
    }
    let config = match quic {
        true => pinned_tls_config(pin, &[QUIC_ALPN])?,
        false => pinned_tls_config(pin, &[])?,
    };
    configs.insert((pin, quic), config.clone());
    Ok(config)
}

/// A rustls client config trusting only the certificate with SHA-256 `pin`,
/// offering `alpn` (QUIC: TLS 1.3 with early data when `alpn` is non-empty).
pub fn pinned_tls_config(pin: [u8; 32], alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let quic = !alpn.is_empty();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone());
    let builder = if quic {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .map_err(|err| ClientError::Transport(err.to_string()))?;
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate { sha256: pin, provider }))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    config.enable_early_data = quic;
    Ok(Arc::new(config))
}

/// Trusts exactly one certificate, by its SHA-256; signatures are still checked.
#[derive(Debug)]
struct PinnedCertificate {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl FrameReader {
    /// The next server frame; `None` once the server closed.
    pub async fn next(&mut self, decoder: &FrameDecoder) -> Result<Option<ServerFrame>, ClientError> {
        match self {
            Self::Stream { read, buf } => loop {
                if let Some(frame) = decoder.decode::<ServerFrame>(buf)? {
                    return Ok(Some(frame));
                }
                if read.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            },
            Self::WebSocket(read) => loop {
                match read.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(None),
                    Some(Ok(Message::Binary(payload))) => {
                        return Ok(Some(
                            ServerFrame::decode(payload).map_err(confab_proto::FrameError::Malformed)?,
                        ));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => return Err(ClientError::Transport(format!("WebSocket: {err}"))),
                }
            },
        }
    }
}

impl FrameWriter {
    /// Writes one encoded frame (with its length prefix).
    pub async fn write(&mut self, frame: Bytes) -> Result<(), ClientError> {
        self.write_all(std::slice::from_ref(&frame)).await
    }

    /// Writes several encoded frames at once: one write on a byte stream, one
    /// flush after the last message on WebSocket.
    pub async fn write_all(&mut self, frames: &[Bytes]) -> Result<(), ClientError> {
        match self {
            Self::Stream(write) => {
                match frames {
                    [frame] => write.write_all(frame).await?,
                    _ => write.write_all(&frames.concat()).await?,
                }
                write.flush().await?;
            }
            Self::WebSocket(sink) => {
                for frame in frames {
                    let payload = frame.slice(LENGTH_PREFIX_BYTES.min(frame.len())..);
                    sink.feed(Message::Binary(payload))
                        .await
                        .map_err(|err| ClientError::Transport(format!("WebSocket: {err}")))?;
                }
                sink.flush()
                    .await
                    .map_err(|err| ClientError::Transport(format!("WebSocket: {err}")))?;
            }
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        match self {
            Self::Stream(write) => {
                let _ = write.shutdown().await;
            }
            Self::WebSocket(sink) => {
                let _ = sink.close().await;
            }
        }
    }
}
