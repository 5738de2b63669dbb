//! Fetching the app's JWKS document: one HTTP/1.1 GET (over rustls for https),
//! bounded in time and size. Plain http is allowed only to a loopback address,
//! since whoever can change the keys in transit can sign any user in.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::Uri;
use hyper::body::Bytes as HyperBytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Largest JWKS document taken (a few keys are a few KB).
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// A checked `auth.jwt.jwks_url`.
#[derive(Debug, Clone)]
pub struct JwksUrl {
    uri: Uri,
    host: String,
    port: u16,
    https: bool,
}

/// Why a JWKS URL was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not a URL.
    #[error("not a URL: {0}")]
    Syntax(String),
    /// Neither http nor https, or no host.
    #[error("must be an https:// URL with a host")]
    Scheme,
    /// http to a host that is not loopback.
    #[error("plain http is allowed only to a loopback address (127.0.0.0/8, [::1], localhost); use https")]
    PlainHttp,
}

/// Why a JWKS document could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Connecting, TLS or the HTTP exchange failed.
    #[error("{0}")]
    Io(String),
    /// No answer within `auth.jwt.jwks_timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with a status other than 200.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The document is larger than we take.
    #[error("the document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
}

impl JwksUrl {
    /// Checks `raw`: an https URL, or http to a loopback host.
    pub fn parse(raw: &str) -> Result<Self, UrlError> {
        let uri: Uri = raw
            .parse()
            .map_err(|err: hyper::http::uri::InvalidUri| UrlError::Syntax(err.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(UrlError::Scheme),
        };
        let host = uri
            .host()
            .filter(|host| !host.is_empty())
            .ok_or(UrlError::Scheme)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !https && !loopback {
            return Err(UrlError::PlainHttp);
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self { uri, host, port, https })
    }

    /// GETs the document within `timeout`.
    pub async fn fetch(&self, tls: &Arc<rustls::ClientConfig>, timeout: Duration) -> Result<Bytes, FetchError> {
        tokio::time::timeout(timeout, self.get(tls))
            .await
            .map_err(|_| FetchError::Timeout(timeout))?
    }

    async fn get(&self, tls: &Arc<rustls::ClientConfig>) -> Result<Bytes, FetchError> {
        let io = |err: &dyn std::fmt::Display| FetchError::Io(err.to_string());
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|err| io(&err))?;
        if self.https {
            let name = ServerName::try_from(self.host.clone()).map_err(|err| io(&err))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|err| io(&err))?;
            self.exchange(stream).await
        } else {
            self.exchange(tcp).await
        }
    }

    async fn exchange<S>(&self, stream: S) -> Result<Bytes, FetchError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = |err: &dyn std::fmt::Display| FetchError::Io(err.to_string());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| io(&err))?;
        // Drives the connection; it ends with the exchange (or the timeout above).
        tokio::spawn(connection);
        let path = self.uri.path_and_query().map_or("/", |path| path.as_str());
        let authority = self
            .uri
            .authority()
            .map_or(self.host.as_str(), |authority| authority.as_str());
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("confab/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<HyperBytes>::new())
            .map_err(|err| io(&err))?;
        let response = sender.send_request(request).await.map_err(|err| io(&err))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
            .collect()
            .await
            .map_err(|err| match err.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => FetchError::TooLarge,
                Err(err) => io(&err),
            })?;
        Ok(body.to_bytes())
    }
}

impl std::fmt::Display for JwksUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.uri.fmt(f)
    }
}

/// TLS for fetching: the web's root certificates (webpki-roots).
pub(super) fn client_tls() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(JwksUrl::parse("https://auth.example.com/.well-known/jwks.json").is_ok());
        assert!(JwksUrl::parse("http://127.0.0.1:8080/jwks").is_ok());
        assert!(JwksUrl::parse("http://[::1]:8080/jwks").is_ok());
        assert!(JwksUrl::parse("http://localhost/jwks").is_ok());
        assert!(matches!(
            JwksUrl::parse("http://auth.example.com/jwks"),
            Err(UrlError::PlainHttp)
        ));
        assert!(matches!(
            JwksUrl::parse("ftp://example.com/jwks"),
            Err(UrlError::Scheme)
        ));
        assert!(matches!(JwksUrl::parse("/jwks"), Err(UrlError::Scheme)));
        assert!(JwksUrl::parse("http://[::1/").is_err());
    }
}
