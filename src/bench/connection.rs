//! The load generator's transport: tonic's generated clients over one raw hyper HTTP/2
//! connection each. tonic's `Channel` puts a buffer task between every call and its
//! connection (so that it can reconnect and balance); a benchmark's client needs neither,
//! and the extra task hop on every call costs CPU that, on a small machine, the server
//! under test shares.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::body::Body;

use super::BoxError;

/// One HTTP/2 connection; clones share it (each call is a stream on it).
#[derive(Clone)]
pub struct Http2(SendRequest<Body>);

impl Http2 {
    pub async fn open(addr: SocketAddr) -> Result<Http2, BoxError> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await?;
        tokio::spawn(async move {
            // Ends when the server goes away; the calls on it fail and are counted.
            let _ = connection.await;
        });
        Ok(Http2(send))
    }
}

impl tower::Service<http::Request<Body>> for Http2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}
