//! A small HTTP/1.1 client (hyper, rustls for https) for the JWKS fetch and
//! `confab admin`: one request per connection, bounded in time and size. Plain
//! http is allowed only to a loopback address: a JWKS document changed in
//! transit signs anyone in, and an API key read in transit acts as anyone.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Largest response body taken (a JWKS document of a few keys is a few KB).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// A checked URL: https, or http to a loopback address.
#[derive(Debug, Clone)]
pub struct HttpUrl {
    uri: Uri,
    host: String,
    port: u16,
    https: bool,
}

/// Why a URL was refused.
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

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Connecting, TLS or the HTTP exchange failed.
    #[error("{0}")]
    Io(String),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with a status other than 200.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The answer is larger than we take.
    #[error("the answer is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
}

/// A request to send.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// GET, POST, DELETE, ...
    pub method: &'a str,
    /// `Authorization: Bearer <key>`, if any.
    pub bearer: Option<&'a str>,
    /// A JSON body, if any.
    pub json: Option<&'a str>,
    /// More headers, as (name, value).
    pub headers: &'a [(&'a str, &'a str)],
}

impl HttpUrl {
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

    /// GETs the body of a 200 answer within `timeout`.
    pub async fn fetch(&self, tls: &Arc<rustls::ClientConfig>, timeout: Duration) -> Result<Bytes, FetchError> {
        let request = Request {
            method: "GET",
            bearer: None,
            json: None,
            headers: &[],
        };
        match self.send(tls, request, timeout).await? {
            (200, body) => Ok(body),
            (status, _) => Err(FetchError::Status(status)),
        }
    }

    /// Sends `request` to this URL within `timeout`: the answer's status and body.
    pub async fn send(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), FetchError> {
        tokio::time::timeout(timeout, self.connect(tls, request))
            .await
            .map_err(|_| FetchError::Timeout(timeout))?
    }

    /// This URL with `path` (and query) in place of its own.
    pub fn with_path(&self, path: &str) -> Result<Self, UrlError> {
        let scheme = if self.https { "https" } else { "http" };
        let authority = self
            .uri
            .authority()
            .map_or(self.host.as_str(), |authority| authority.as_str());
        Self::parse(&format!("{scheme}://{authority}{path}"))
    }

    async fn connect(&self, tls: &Arc<rustls::ClientConfig>, request: Request<'_>) -> Result<(u16, Bytes), FetchError> {
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
            self.exchange(stream, request).await
        } else {
            self.exchange(tcp, request).await
        }
    }

    async fn exchange<S>(&self, stream: S, request: Request<'_>) -> Result<(u16, Bytes), FetchError>
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
        let mut builder = hyper::Request::builder()
            .method(request.method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("confab/", env!("CARGO_PKG_VERSION")));
        if let Some(key) = request.bearer {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if request.json.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in request.headers {
            builder = builder.header(*name, *value);
        }
        let body = Full::new(Bytes::from(request.json.unwrap_or_default().to_owned()));
        let request = builder.body(body).map_err(|err| io(&err))?;
        let response = sender.send_request(request).await.map_err(|err| io(&err))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|err| match err.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => FetchError::TooLarge,
                Err(err) => io(&err),
            })?;
        Ok((status, body.to_bytes()))
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.uri.fmt(f)
    }
}

/// TLS for requests: the web's root certificates (webpki-roots).
pub fn client_tls() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
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
        assert!(HttpUrl::parse("https://auth.example.com/.well-known/jwks.json").is_ok());
        assert!(HttpUrl::parse("http://127.0.0.1:8080/jwks").is_ok());
        assert!(HttpUrl::parse("http://[::1]:8080/jwks").is_ok());
        assert!(HttpUrl::parse("http://localhost/jwks").is_ok());
        assert!(matches!(
            HttpUrl::parse("http://auth.example.com/jwks"),
            Err(UrlError::PlainHttp)
        ));
        assert!(matches!(
            HttpUrl::parse("ftp://example.com/jwks"),
            Err(UrlError::Scheme)
        ));
        assert!(matches!(HttpUrl::parse("/jwks"), Err(UrlError::Scheme)));
        assert!(HttpUrl::parse("http://[::1/").is_err());
    }
}
