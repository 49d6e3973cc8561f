//! Trace export through OTLP, from the real binary to a real OTLP/gRPC collector (a
//! TraceService served by this test): the RPC and store spans arrive, under the
//! configured service name, carrying method names and never a key or a token.

mod common;
mod process_harness;

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use process_harness::*;
use tokio_stream::wrappers::TcpListenerStream;

/// Every export request the collector received.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_and_store_spans_reach_the_collector_without_secrets() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let data_dir = tempfile::tempdir().unwrap();
    let mut cmd = dev_server(data_dir.path());
    cmd.env("KEYWARDEN_TRACING__OTLP_ENDPOINT", &endpoint)
        .env("KEYWARDEN_TRACING__SERVICE_NAME", "keywarden-under-test");
    let mut server = Server::start(cmd).await;
    let admin = server.stdout_value("admin token: ");
    let verifier = server.stdout_value("verifier token: ");
    server.create_workspace(&admin, "ws_traced").await;
    let issued = server
        .admin(&admin)
        .await
        .issue_key(keywarden::proto::IssueKeyRequest {
            workspace_id: "ws_traced".into(),
            name: "traced".into(),
            environment: keywarden::proto::Environment::Live as i32,
            owner: Some(keywarden::proto::Owner {
                kind: keywarden::proto::OwnerKind::User as i32,
                id: "user_1".into(),
            }),
            actor: Some(keywarden::proto::Actor {
                id: "user_admin".into(),
                permissions: vec!["admin".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let answer = server
        .verifier(&verifier)
        .await
        .verify_key(keywarden::proto::VerifyKeyRequest {
            key: issued.key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.valid);
    // Shutdown exports what is still queued.
    let status = server.terminate().await;
    assert!(status.success(), "{}", server.process.transcript());

    let received = collector.received.lock().unwrap().clone();
    serving.abort();
    let mut spans = Vec::new();
    let mut service_names = Vec::new();
    for request in &received {
        for resource_spans in &request.resource_spans {
            if let Some(resource) = &resource_spans.resource {
                for attribute in &resource.attributes {
                    if attribute.key == "service.name" {
                        service_names.push(format!("{:?}", attribute.value));
                    }
                }
            }
            for scope in &resource_spans.scope_spans {
                spans.extend(scope.spans.iter().cloned());
            }
        }
    }
    assert!(
        service_names
            .iter()
            .all(|n| n.contains("keywarden-under-test"))
            && !service_names.is_empty(),
        "{service_names:?}"
    );
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let methods: Vec<String> = spans
        .iter()
        .flat_map(|s| s.attributes.iter())
        .filter(|a| a.key == "method")
        .map(|a| format!("{:?}", a.value))
        .collect();
    assert!(names.contains(&"rpc"), "{names:?}");
    assert!(names.contains(&"insert_key"), "{names:?}");
    assert!(
        methods
            .iter()
            .any(|m| m.contains("/keywarden.v1.KeyService/IssueKey")),
        "{methods:?}"
    );
    assert!(
        methods
            .iter()
            .any(|m| m.contains("/keywarden.v1.VerifyService/VerifyKey")),
        "{methods:?}"
    );
    // A store span is a child of its RPC's span: one trace per call.
    let insert = spans.iter().find(|s| s.name == "insert_key").unwrap();
    assert!(
        spans
            .iter()
            .any(|s| s.span_id == insert.parent_span_id && s.name == "rpc"),
        "insert_key is not inside an rpc span"
    );
    let everything = format!("{received:?}");
    for secret in [issued.key.as_str(), admin.as_str(), verifier.as_str()] {
        assert!(!everything.contains(secret), "a secret was exported");
    }
}
