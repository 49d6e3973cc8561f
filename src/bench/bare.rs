//! The transport's floor: a bare tonic server, the same tonic as Keywarden's, serving
//! `VerifyService` with one method that does nothing (`Ping`) and no layers at all (no
//! caller authentication, timing, timeout, metrics, tracing, health or reflection).
//! Every other method is UNIMPLEMENTED. Its sockets are TCP_NODELAY, as Keywarden's are. The bench starts it as a process of its own
//! (`keywarden bench-bare-server`), as it starts Keywarden, and calls the same path.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::process::Command;
use tonic::{Request, Response, Status};

use super::BoxError;
use super::server::ServerProcess;
use crate::proto;
use crate::proto::verify_service_server::{VerifyService, VerifyServiceServer};

struct BareVerify;

fn bare() -> Status {
    Status::unimplemented("the bare no-op server serves Ping only")
}

#[tonic::async_trait]
impl VerifyService for BareVerify {
    async fn verify_key(
        &self,
        _: Request<proto::VerifyKeyRequest>,
    ) -> Result<Response<proto::VerifyKeyResponse>, Status> {
        Err(bare())
    }

    async fn report_usage(
        &self,
        _: Request<proto::ReportUsageRequest>,
    ) -> Result<Response<proto::ReportUsageResponse>, Status> {
        Err(bare())
    }

    async fn lease_quota(
        &self,
        _: Request<proto::LeaseQuotaRequest>,
    ) -> Result<Response<proto::LeaseQuotaResponse>, Status> {
        Err(bare())
    }

    async fn ping(
        &self,
        _: Request<proto::PingRequest>,
    ) -> Result<Response<proto::PingResponse>, Status> {
        Ok(Response::new(proto::PingResponse {}))
    }
}

/// Serves the bare no-op server on `listen` until killed; prints `listening on <addr>`
/// once bound.
pub async fn serve(listen: SocketAddr) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    // TCP_NODELAY on the accepted sockets, as Keywarden's server sets it: a transport
    // setting, not a layer, and without it Nagle holds answers back (the bare server
    // then read at a third of Keywarden's rate through h2load).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(VerifyServiceServer::new(BareVerify))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Starts the bare server as a process of its own on a free loopback port.
pub async fn start() -> Result<ServerProcess, BoxError> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["bench-bare-server", "--listen", "127.0.0.1:0"]);
    ServerProcess::spawn(command, Duration::from_secs(30)).await
}
