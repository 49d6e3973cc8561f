//! The HTTP listener of its own (`[http]`), off unless configured: what is not gRPC and
//! is not for Keywarden's own callers. Today it serves the secret-scanning endpoint
//! ([`secret_scanning`]), for scanners that report keys found in public places.
//!
//! Plain HTTP/1.1, or TLS with the `[tls]` files when those are configured (the same
//! certificate as the gRPC port), through `tokio-rustls` and hyper's connection builder.

pub mod secret_scanning;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{Settings, TlsSettings};
use crate::events::EventHub;

/// Serves `app` on `at` until the hub stops; returns the address bound.
pub async fn serve(
    at: SocketAddr,
    app: axum::Router,
    settings: &Settings,
    hub: &Arc<EventHub>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(at).await?;
    let bound = listener.local_addr()?;
    let mut stop = hub.stopping();
    let stopped = async move {
        let _ = stop.changed().await;
    };
    match &settings.tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    tracing::error!(error = %e, "the HTTP listener failed");
                }
            });
            tracing::info!(addr = %bound, "HTTP on http://{bound}");
        }
        Some(tls) => {
            let acceptor = tls_acceptor(tls)?;
            tokio::spawn(serve_tls(listener, acceptor, app, stopped));
            tracing::info!(addr = %bound, "HTTP on https://{bound}");
        }
    }
    Ok(bound)
}

fn tls_acceptor(tls: &TlsSettings) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("tls {what}: {e}"))
    };
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("certificate", &e))?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| invalid("key", &e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid("protocols", &e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| invalid("certificate", &e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TLS connections and serves each with hyper until `stopped`.
async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    stopped: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt as _;
    tokio::pin!(stopped);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting an HTTP connection failed");
                    continue;
                }
            },
            () = &mut stopped => return,
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                app.clone().oneshot(request.map(axum::body::Body::new))
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "an HTTPS connection ended with an error");
            }
        });
    }
}
