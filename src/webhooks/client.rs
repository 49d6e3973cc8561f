//! One webhook delivery over HTTP/1.1: resolve, judge every resolved address by the
//! SSRF rule, connect to a judged address (never resolve twice, so a name cannot
//! answer differently between the check and the connection), TLS for `https` (rustls
//! with the Mozilla roots of `webpki-roots`), POST, read the status.
//!
//! Why hyper's own client connection and not a client crate: hyper 1, hyper-util and
//! tokio-rustls are in the tree already, and the SSRF rule needs the connection made to
//! the address that was checked, which a pooled client's resolver hook makes roundabout
//! (reqwest would add a second HTTP stack and its TLS setup to the build). A delivery is
//! one request per connection: webhooks are few and far between next to their cost.
//! Redirects are not followed (a 3xx is a failure), so a receiver cannot point a
//! delivery elsewhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::domain::webhook::{self, Host, Scheme, WebhookUrl};

/// Why a delivery failed; the text is what ListWebhooks shows as `last_error` (no
/// secret, no body).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(
        "the host resolves to a private or loopback address ({0}), which this deployment does not deliver to"
    )]
    PrivateAddress(std::net::IpAddr),
    #[error("cannot resolve the host: {0}")]
    Resolve(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the receiver answered HTTP {0}")]
    Status(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Sends deliveries.
#[derive(Clone)]
pub struct Client {
    tls: tokio_rustls::TlsConnector,
    allow_private: bool,
    timeout: Duration,
}

impl Client {
    pub fn new(allow_private: bool, timeout: Duration) -> Result<Client, String> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Client {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            allow_private,
            timeout,
        })
    }

    /// POSTs `body` (JSON) with `headers`; Ok on a 2xx answer.
    pub async fn post(
        &self,
        url: &WebhookUrl,
        body: Bytes,
        headers: &[(&'static str, String)],
    ) -> Result<(), DeliveryError> {
        tokio::time::timeout(self.timeout, self.send(url, body, headers))
            .await
            .map_err(|_| DeliveryError::Timeout(self.timeout))?
    }

    async fn send(
        &self,
        url: &WebhookUrl,
        body: Bytes,
        headers: &[(&'static str, String)],
    ) -> Result<(), DeliveryError> {
        let addrs: Vec<SocketAddr> = match &url.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, url.port)],
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), url.port))
                .await
                .map_err(|e| DeliveryError::Resolve(e.to_string()))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(DeliveryError::Resolve("no address".into()));
        }
        // Every address is judged, not only the one connected to: a name that resolves
        // to one public and one private address is refused whole.
        if !self.allow_private
            && let Some(bad) = addrs.iter().find(|a| !webhook::is_public(a.ip()))
        {
            return Err(DeliveryError::PrivateAddress(bad.ip()));
        }
        let mut last = None;
        let mut stream = None;
        for addr in &addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            DeliveryError::Connect(last.map_or_else(|| "no address".into(), |e| e.to_string()))
        })?;
        let _ = stream.set_nodelay(true);
        let request = request(url, body, headers)?;
        match url.scheme {
            Scheme::Http => exchange(TokioIo::new(stream), request).await,
            Scheme::Https => {
                let name = match &url.host {
                    Host::Name(n) => rustls::pki_types::ServerName::try_from(n.clone())
                        .map_err(|e| DeliveryError::Tls(e.to_string()))?,
                    Host::Ip(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
                };
                let tls = self
                    .tls
                    .connect(name, stream)
                    .await
                    .map_err(|e| DeliveryError::Tls(e.to_string()))?;
                exchange(TokioIo::new(tls), request).await
            }
        }
    }
}

fn request(
    url: &WebhookUrl,
    body: Bytes,
    headers: &[(&'static str, String)],
) -> Result<http::Request<Full<Bytes>>, DeliveryError> {
    let default_port = match url.scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    };
    let host = if url.port == default_port {
        url.host_text()
    } else {
        format!("{}:{}", url.host_text(), url.port)
    };
    let mut builder = http::Request::post(url.path_and_query.as_str())
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("keywarden-webhooks/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    builder
        .body(Full::new(body))
        .map_err(|e| DeliveryError::Http(e.to_string()))
}

async fn exchange<I>(io: I, request: http::Request<Full<Bytes>>) -> Result<(), DeliveryError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| DeliveryError::Http(e.to_string()))?;
    let driving = tokio::spawn(async move {
        let _ = connection.await;
    });
    let answer = sender.send_request(request).await;
    // The answer's body is not read: only its status counts. Dropping the sender ends
    // the connection.
    drop(sender);
    let status = answer
        .map_err(|e| DeliveryError::Http(e.to_string()))?
        .status();
    driving.abort();
    if status.is_success() {
        Ok(())
    } else {
        Err(DeliveryError::Status(status.as_u16()))
    }
}
