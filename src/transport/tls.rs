//! The node's TLS identity (certificate chain + key) and the rustls configs built
//! from it for TCP, WebSocket and QUIC.
//!
//! Crypto provider: `ring`, chosen deliberately and passed explicitly (never the
//! process default). It builds with a C compiler alone; `aws-lc-rs` would also need
//! cmake (and Go or NASM on some targets), which a fresh machine may lack.

use crate::config::{TlsConfig, TlsMode};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Where a self-signed identity is kept, in the data dir.
const SELF_SIGNED_CERT: &str = "self-signed.crt";
const SELF_SIGNED_KEY: &str = "self-signed.key";

/// ALPN of protocol v1 over QUIC.
pub const QUIC_ALPN: &[u8] = b"confab/1";
/// QUIC sessions remembered for 0-RTT resumption (a few hundred bytes each).
const QUIC_SESSION_CACHE: usize = 16 * 1024;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading ….
    #[error("reading {path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// … holds no certificate.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: String,
    },
    /// Generating a self-signed certificate.
    #[error("generating a self-signed certificate")]
    Generate(#[from] rcgen::Error),
    /// Certificate and key do not make a TLS config.
    #[error("certificate and key do not make a TLS config")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain with its private key.
#[derive(Debug)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate, hex: what clients pin.
    fingerprint: String,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

impl Identity {
    /// The identity `[tls]` asks for; `None` when TLS is off. A self-signed one
    /// is kept in `data_dir`.
    pub fn from_config(config: &TlsConfig, data_dir: &Path) -> Result<Option<Self>, TlsError> {
        match config.mode {
            TlsMode::Off => Ok(None),
            TlsMode::SelfSigned => Self::self_signed_in(data_dir).map(Some),
            TlsMode::Files => Self::from_files(&config.cert_file, &config.key_file).map(Some),
        }
    }

    /// A self-signed certificate for `localhost` and the loopback addresses,
    /// made on first start and kept in `data_dir` (key 0600), so clients' pins
    /// survive restarts.
    pub fn self_signed_in(data_dir: &Path) -> Result<Self, TlsError> {
        let (cert_file, key_file) = (data_dir.join(SELF_SIGNED_CERT), data_dir.join(SELF_SIGNED_KEY));
        if cert_file.exists() && key_file.exists() {
            crate::files::warn_if_readable(&key_file, "the self-signed certificate's key");
            return Self::from_files(&cert_file, &key_file);
        }
        // One of the two alone is what a start that died between them left.
        for orphan in [&cert_file, &key_file] {
            let _ = std::fs::remove_file(orphan);
        }
        let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        let generated = rcgen::generate_simple_self_signed(names)?;
        let write_error = |path: &Path| {
            let path = path.display().to_string();
            move |err: std::io::Error| TlsError::Pem {
                path,
                message: err.to_string(),
            }
        };
        crate::files::write_private(&key_file, generated.signing_key.serialize_pem().as_bytes())
            .map_err(write_error(&key_file))?;
        crate::files::write_private(&cert_file, generated.cert.pem().as_bytes()).map_err(write_error(&cert_file))?;
        let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
        Ok(Self::new(vec![generated.cert.der().clone()], key))
    }

    /// The certificate chain and key in two PEM files.
    pub fn from_files(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let pem_error = |path: &Path| {
            let path = path.display().to_string();
            move |err: rustls_pki_types::pem::Error| TlsError::Pem {
                path,
                message: err.to_string(),
            }
        };
        let chain = CertificateDer::pem_file_iter(cert_file)
            .map_err(pem_error(cert_file))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_error(cert_file))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_file.display().to_string(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(pem_error(key_file))?;
        Ok(Self::new(chain, key))
    }

    fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        let fingerprint = chain.first().map(|leaf| fingerprint(leaf)).unwrap_or_default();
        Self {
            chain,
            key,
            fingerprint,
        }
    }

    /// The SHA-256 of the certificate (hex), for clients that pin it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// For TCP and WebSocket listeners: TLS 1.2 and 1.3.
    pub fn stream_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// For QUIC: TLS 1.3 only, ALPN `confab/1`, session tickets for 0-RTT.
    pub fn quic_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![QUIC_ALPN.to_vec()];
        // QUIC requires exactly this value when early data is enabled.
        config.max_early_data_size = u32::MAX;
        // Resumption state for 0-RTT; a forgotten session only costs a round trip.
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(QUIC_SESSION_CACHE);
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The server side of a TLS handshake, bounded by `timeout`; failures are logged.
pub async fn accept(
    config: &Arc<rustls::ServerConfig>,
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, TlsAcceptor::from(config.clone()).accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            tracing::info!(%peer, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}
