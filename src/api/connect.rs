//! The Connect protocol (connectrpc.com) for every unary RPC, on the gRPC port: a call
//! whose `Content-Type` is `application/json` or `application/proto` is translated into
//! the gRPC call it stands for and run through the very same stack (the caller check and
//! its roles, message limits, metrics labels and tracing spans, the services), and its
//! answer is translated back. A JSON call is a gRPC call in another encoding, not a
//! second API: nothing in the services knows which protocol carried it.
//!
//! Shaped this way because the alternatives each fork something: generated per-method
//! JSON handlers (pbjson's serde impls, or the `connectrpc` crate's own servers) would be
//! a second set of endpoints beside tonic's, with their own auth and limits to keep in
//! step. Here the message shapes come from the descriptor set the server already embeds
//! for reflection, through `prost-reflect`'s dynamic messages, whose serde mapping is
//! protobuf's canonical JSON (enum names, 64-bit integers as strings, Timestamps in RFC
//! 3339, FieldMasks as comma-separated paths, unknown fields refused).
//!
//! What a call costs a gRPC caller: one header comparison (the content type) per call.
//!
//! - Errors: Connect's JSON error shape (`code`, `message`, `details`), with the HTTP
//!   status Connect assigns to each code ([`http_status`]); the details are the gRPC
//!   status's (ErrorInfo, BadRequest, ...), each as `{type, value, debug}`.
//! - Timeouts: `connect-timeout-ms` bounds the call here (DEADLINE_EXCEEDED past it);
//!   the server's own request timeout applies as to any call. A timeout of 0 is a
//!   deadline already past: the call is not started. One that runs out while the call is
//!   under way may fall after its commit, as with gRPC's DEADLINE_EXCEEDED.
//! - Streaming (`WatchRevocations`) stays gRPC-only: a Connect call to it is answered
//!   `unimplemented`.
//! - Over HTTP/1.1 and HTTP/2 alike (the transport accepts both).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use futures::future::Either;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor};
use tonic::body::Body;

/// How a Connect call's messages are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Json,
    Proto,
}

impl Encoding {
    /// The encoding a request's content type names, if it is a Connect unary one.
    fn of(headers: &HeaderMap) -> Option<Encoding> {
        let value = headers.get(header::CONTENT_TYPE)?.as_bytes();
        // Parameters (`; charset=utf-8`) do not change the encoding.
        let essence = value.split(|b| *b == b';').next()?.trim_ascii();
        if essence.eq_ignore_ascii_case(b"application/json") {
            Some(Encoding::Json)
        } else if essence.eq_ignore_ascii_case(b"application/proto") {
            Some(Encoding::Proto)
        } else {
            None
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Proto => "application/proto",
        }
    }
}

/// One RPC as the descriptors describe it.
struct Rpc {
    input: MessageDescriptor,
    output: MessageDescriptor,
    unary: bool,
}

/// Every RPC of Keywarden's services by path (`/keywarden.v1.KeyService/IssueKey`), and
/// the descriptors their messages (and error details) are read with.
pub struct Rpcs {
    by_path: HashMap<String, Rpc>,
    pool: DescriptorPool,
    /// The OpenAPI document of these RPCs, made on first use (one for every listener).
    openapi: std::sync::OnceLock<Bytes>,
}

impl Rpcs {
    /// From the descriptor sets compiled into the server: Keywarden's own, and
    /// google.rpc's error details (so they are shown decoded, as `debug`).
    pub fn compiled() -> Result<Rpcs, prost_reflect::DescriptorError> {
        let mut pool = DescriptorPool::new();
        pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)?;
        pool.decode_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)?;
        let by_path = pool
            .services()
            .filter(|s| s.package_name() == "keywarden.v1")
            .flat_map(|s| {
                s.methods()
                    .map(|m| {
                        let path = format!("/{}/{}", s.full_name(), m.name());
                        let rpc = Rpc {
                            input: m.input(),
                            output: m.output(),
                            unary: !m.is_client_streaming() && !m.is_server_streaming(),
                        };
                        (path, rpc)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(Rpcs {
            by_path,
            pool,
            openapi: std::sync::OnceLock::new(),
        })
    }

    /// The descriptors every message and service is read with.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// The OpenAPI document of the JSON surface ([`super::openapi::document`]), as served.
    pub fn openapi_json(&self) -> Bytes {
        self.openapi
            .get_or_init(|| Bytes::from(super::openapi::document(&self.pool).to_string()))
            .clone()
    }

    /// The path of every unary RPC.
    pub fn unary_paths(&self) -> impl Iterator<Item = &str> {
        self.by_path
            .iter()
            .filter(|(_, rpc)| rpc.unary)
            .map(|(path, _)| path.as_str())
    }
}

/// Wraps the gRPC router: Connect calls are translated, everything else passes through.
#[derive(Clone)]
pub struct ConnectLayer {
    rpcs: Arc<Rpcs>,
    /// The largest request message taken (the gRPC services' own limit).
    max_bytes: usize,
    /// The OpenAPI document served at `GET /openapi.json`; `None`: Connect is off, and
    /// every call passes through to gRPC as it came.
    openapi: Option<Bytes>,
    /// The server's request timeout: applied here too, so that a Connect caller gets
    /// Connect's `deadline_exceeded` rather than the transport's gRPC answer.
    request_timeout: Option<Duration>,
}

impl ConnectLayer {
    /// Connect on (`enabled`), or every call passed through.
    pub fn new(
        rpcs: Arc<Rpcs>,
        max_bytes: usize,
        enabled: bool,
        request_timeout: Option<Duration>,
    ) -> Self {
        let openapi = enabled.then(|| rpcs.openapi_json());
        ConnectLayer {
            rpcs,
            max_bytes,
            openapi,
            request_timeout,
        }
    }
}

impl<S> tower::Layer<S> for ConnectLayer {
    type Service = ConnectService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ConnectService<S> {
    inner: S,
    layer: ConnectLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<Request<Body>> for ConnectService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(openapi) = &self.layer.openapi else {
            return Either::Left(self.inner.call(request));
        };
        let encoding = match Encoding::of(request.headers()) {
            Some(encoding) if request.method() == Method::POST => encoding,
            None if request.method() == Method::GET && request.uri().path() == "/openapi.json" => {
                let mut response = Response::new(Body::new(Full::new(openapi.clone())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Either::Right(Box::pin(async move { Ok(response) }));
            }
            _ => return Either::Left(self.inner.call(request)),
        };
        // The ready service answers this call; a clone takes its place for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Either::Right(Box::pin(async move {
            Ok(match layer.unary(inner, request, encoding).await {
                Ok(response) => response,
                Err(refused) => refused.into_response(),
            })
        }))
    }
}

/// A Connect error made here, before or instead of the gRPC call's own answer.
struct Refused {
    code: tonic::Code,
    message: String,
}

impl Refused {
    fn into_response(self) -> Response<Body> {
        error_response(self.code, &self.message, &[])
    }
}

fn refuse(code: tonic::Code, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

impl ConnectLayer {
    /// One unary call: the request decoded and framed for gRPC, the gRPC call made, its
    /// answer decoded and encoded as asked. `Err` carries an answer made here.
    async fn unary<S>(
        &self,
        mut inner: S,
        request: Request<Body>,
        encoding: Encoding,
    ) -> Result<Response<Body>, Refused>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>>,
    {
        let Some(rpc) = self.rpcs.by_path.get(request.uri().path()) else {
            return Err(refuse(
                tonic::Code::Unimplemented,
                format!("no such method: {}", request.uri().path()),
            ));
        };
        if !rpc.unary {
            return Err(refuse(
                tonic::Code::Unimplemented,
                "streaming methods are served over gRPC only",
            ));
        }
        if let Some(coding) = request.headers().get(header::CONTENT_ENCODING)
            && coding.as_bytes() != b"identity"
        {
            return Err(refuse(
                tonic::Code::Unimplemented,
                "content-encoding is not supported; send the body as it is",
            ));
        }
        let timeout = match (timeout_of(request.headers())?, self.request_timeout) {
            (Some(asked), Some(server)) => Some(asked.min(server)),
            (asked, server) => asked.or(server),
        };
        // A deadline already past is not started: the timer would fire only on its
        // next tick, and a mutation could commit before it and be answered as late.
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(deadline_exceeded());
        }
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, self.max_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(refuse(
                    tonic::Code::InvalidArgument,
                    format!("the request body is over {} bytes", self.max_bytes),
                ));
            }
            Err(_) => {
                return Err(refuse(
                    tonic::Code::InvalidArgument,
                    "the request body could not be read",
                ));
            }
        };
        let message = decode_request(&rpc.input, &body, encoding)?;
        let mut grpc = Request::from_parts(parts, Body::new(Full::new(frame(&message))));
        let headers = grpc.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.remove(header::CONTENT_LENGTH);
        *grpc.version_mut() = http::Version::HTTP_2;
        let call = async {
            let Ok(response) = inner.call(grpc).await else {
                return Err(refuse(tonic::Code::Internal, "the call failed"));
            };
            Ok(response)
        };
        let response = match timeout {
            Some(limit) => match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer?,
                Err(_) => return Err(deadline_exceeded()),
            },
            None => call.await?,
        };
        Ok(self.answer(rpc, response, encoding).await)
    }

    /// The Connect answer to a gRPC response: its message, or its status as an error.
    async fn answer(
        &self,
        rpc: &Rpc,
        response: Response<Body>,
        encoding: Encoding,
    ) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let Ok(collected) = body.collect().await else {
            return refuse(tonic::Code::Internal, "the answer could not be read").into_response();
        };
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let bytes = collected.to_bytes();
        // A status comes in the trailers, or alone in the headers ("trailers-only").
        let status = tonic::Status::from_header_map(&trailers)
            .or_else(|| tonic::Status::from_header_map(&parts.headers));
        if let Some(status) = status
            && status.code() != tonic::Code::Ok
        {
            return status_response(&status, &self.rpcs.pool);
        }
        let Some(message) = unframe(&bytes) else {
            return refuse(tonic::Code::Internal, "the answer was not one message").into_response();
        };
        let body = match encoding {
            Encoding::Proto => Bytes::copy_from_slice(message),
            Encoding::Json => match DynamicMessage::decode(rpc.output.clone(), message)
                .map_err(|_| ())
                .and_then(|m| serde_json::to_vec(&m).map_err(|_| ()))
            {
                Ok(json) => Bytes::from(json),
                Err(()) => {
                    return refuse(tonic::Code::Internal, "the answer could not be encoded")
                        .into_response();
                }
            },
        };
        let mut out = Response::new(Body::new(Full::new(body)));
        out.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(encoding.content_type()),
        );
        // What the services add to the gRPC headers and trailers is passed on; gRPC's
        // own fields are not Connect's.
        for (name, value) in parts.headers.iter() {
            if !is_grpc_framing(name.as_str()) {
                out.headers_mut().append(name.clone(), value.clone());
            }
        }
        for (name, value) in trailers.iter() {
            if !is_grpc_framing(name.as_str())
                && let Ok(name) = http::HeaderName::from_bytes(format!("trailer-{name}").as_bytes())
            {
                out.headers_mut().append(name, value.clone());
            }
        }
        out
    }
}

/// gRPC's framing and status fields, which a Connect answer replaces with its own.
fn is_grpc_framing(name: &str) -> bool {
    name.starts_with("grpc-") || name == "content-type" || name == "content-length"
}

/// The request message as protobuf bytes: JSON decoded by the method's input descriptor
/// (unknown fields refused), or protobuf checked to decode.
fn decode_request(
    input: &MessageDescriptor,
    body: &[u8],
    encoding: Encoding,
) -> Result<Vec<u8>, Refused> {
    match encoding {
        Encoding::Proto => match DynamicMessage::decode(input.clone(), body) {
            Ok(_) => Ok(body.to_vec()),
            Err(_) => Err(refuse(
                tonic::Code::InvalidArgument,
                format!("the body is not a valid {}", input.full_name()),
            )),
        },
        Encoding::Json => {
            // An empty body is the empty message, as Connect clients may send it.
            let body: &[u8] = if body.trim_ascii().is_empty() {
                b"{}"
            } else {
                body
            };
            let mut de = serde_json::Deserializer::from_slice(body);
            let message = DynamicMessage::deserialize_with_options(
                input.clone(),
                &mut de,
                &DeserializeOptions::new(),
            )
            .and_then(|m| de.end().map(|()| m));
            match message {
                Ok(message) => Ok(message.encode_to_vec()),
                Err(e) => Err(refuse(
                    tonic::Code::InvalidArgument,
                    format!(
                        "the body is not a valid {} in JSON: {}",
                        input.full_name(),
                        without_strings(&e.to_string())
                    ),
                )),
            }
        }
    }
}

/// A decoding error's text with every long quoted value it quotes elided: serde and
/// prost-reflect name the offending value or field (`invalid type: string "kw_live_..."`,
/// `unrecognized field name '...'`), and a key sent in the wrong place must not come back
/// in an error. Quoted text of up to [`QUOTED_KEPT`] characters (a field name, an enum
/// value) stays: every key is longer.
fn without_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['"', '\'']) {
        let quote = rest[start..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=start]);
        let after = &rest[start + 1..];
        match after.find(quote) {
            Some(end) => {
                let quoted = &after[..end];
                if quoted.chars().count() > QUOTED_KEPT {
                    out.push('…');
                } else {
                    out.push_str(quoted);
                }
                out.push(quote);
                rest = &after[end + 1..];
            }
            None => {
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The longest quoted text a decoding error may show (shorter than any key).
const QUOTED_KEPT: usize = 24;

/// A call past its deadline. One that ran out while it was under way may still have
/// taken effect (a commit the deadline fell on), as gRPC's DEADLINE_EXCEEDED may.
fn deadline_exceeded() -> Refused {
    refuse(
        tonic::Code::DeadlineExceeded,
        "the call did not finish in time (connect-timeout-ms, or the server's request timeout)",
    )
}

/// `connect-timeout-ms`, if given: at most 10 digits, as Connect specifies.
fn timeout_of(headers: &HeaderMap) -> Result<Option<Duration>, Refused> {
    let Some(value) = headers.get("connect-timeout-ms") else {
        return Ok(None);
    };
    let millis = value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok());
    match millis {
        Some(ms) => Ok(Some(Duration::from_millis(ms))),
        None => Err(refuse(
            tonic::Code::InvalidArgument,
            "connect-timeout-ms must be 1 to 10 digits",
        )),
    }
}

/// One gRPC message frame: uncompressed flag, big-endian length, the message.
fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// The one uncompressed message of a unary gRPC answer.
fn unframe(body: &[u8]) -> Option<&[u8]> {
    let (&[flag, a, b, c, d], message) = body.split_first_chunk::<5>()?;
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    (flag == 0 && message.len() == len).then_some(message)
}

/// Connect's name for a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "canceled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status Connect assigns to each code.
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// A gRPC status as a Connect error, its details included.
fn status_response(status: &tonic::Status, pool: &DescriptorPool) -> Response<Body> {
    let details = if status.details().is_empty() {
        Vec::new()
    } else {
        match tonic_types::pb::Status::decode(status.details()) {
            Ok(rpc_status) => rpc_status
                .details
                .iter()
                .map(|any| detail_json(any, pool))
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    error_response(status.code(), status.message(), &details)
}

/// One error detail as Connect shows it: its type's full name, its bytes in base64, and
/// (when the type is known) the message decoded, as `debug`.
fn detail_json(any: &prost_types::Any, pool: &DescriptorPool) -> serde_json::Value {
    let type_name = any
        .type_url
        .rsplit_once('/')
        .map_or(any.type_url.as_str(), |(_, name)| name);
    let mut detail = serde_json::json!({
        "type": type_name,
        "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
    });
    if let Some(desc) = pool.get_message_by_name(type_name)
        && let Ok(message) = DynamicMessage::decode(desc, any.value.as_slice())
        && let Ok(debug) = serde_json::to_value(&message)
    {
        detail["debug"] = debug;
    }
    detail
}

/// Connect's error answer: `{"code", "message", "details"}` with the code's HTTP status.
fn error_response(
    code: tonic::Code,
    message: &str,
    details: &[serde_json::Value],
) -> Response<Body> {
    let mut error = serde_json::json!({ "code": code_name(code) });
    if !message.is_empty() {
        error["message"] = message.into();
    }
    if !details.is_empty() {
        error["details"] = details.into();
    }
    let body = serde_json::to_vec(&error).unwrap_or_default();
    let mut response = Response::new(Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = http_status(code);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_keywarden_rpc_is_known_and_only_the_stream_is_not_unary() {
        let rpcs = Rpcs::compiled().unwrap();
        assert!(
            rpcs.by_path
                .contains_key("/keywarden.v1.KeyService/IssueKey")
        );
        assert!(rpcs.by_path["/keywarden.v1.VerifyService/VerifyKey"].unary);
        assert!(!rpcs.by_path["/keywarden.v1.RevocationService/WatchRevocations"].unary);
        let streaming: Vec<_> = rpcs
            .by_path
            .iter()
            .filter(|(_, r)| !r.unary)
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(
            streaming,
            ["/keywarden.v1.RevocationService/WatchRevocations"]
        );
    }

    #[test]
    fn content_types_choose_the_encoding_and_grpc_passes_through() {
        let of = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            Encoding::of(&h)
        };
        assert_eq!(of("application/json"), Some(Encoding::Json));
        assert_eq!(of("Application/JSON; charset=utf-8"), Some(Encoding::Json));
        assert_eq!(of("application/proto"), Some(Encoding::Proto));
        assert_eq!(of("application/grpc"), None);
        assert_eq!(of("application/grpc+proto"), None);
        assert_eq!(of("text/plain"), None);
    }

    /// Connect's table (connectrpc.com/docs/protocol, "Error codes"), one code at a time.
    #[test]
    fn every_code_has_connects_name_and_http_status() {
        use tonic::Code::*;
        let spec = [
            (Cancelled, "canceled", 499),
            (Unknown, "unknown", 500),
            (InvalidArgument, "invalid_argument", 400),
            (DeadlineExceeded, "deadline_exceeded", 504),
            (NotFound, "not_found", 404),
            (AlreadyExists, "already_exists", 409),
            (PermissionDenied, "permission_denied", 403),
            (ResourceExhausted, "resource_exhausted", 429),
            (FailedPrecondition, "failed_precondition", 400),
            (Aborted, "aborted", 409),
            (OutOfRange, "out_of_range", 400),
            (Unimplemented, "unimplemented", 501),
            (Internal, "internal", 500),
            (Unavailable, "unavailable", 503),
            (DataLoss, "data_loss", 500),
            (Unauthenticated, "unauthenticated", 401),
        ];
        for (code, name, status) in spec {
            assert_eq!(code_name(code), name, "{code:?}");
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
        }
    }

    #[test]
    fn decoding_errors_never_quote_the_values_sent() {
        let rpcs = Rpcs::compiled().unwrap();
        let input = &rpcs.by_path["/keywarden.v1.VerifyService/VerifyKey"].input;
        let secret = "kw_live_0123456789abcdefghijklmnopqrstu";
        for body in [
            format!(r#"{{"cost": "{secret}"}}"#),
            format!(r#"{{"key": 5, "requiredScopes": "{secret}"}}"#),
            format!(r#"{{"{secret}": 1}}"#),
        ] {
            let refused = decode_request(input, body.as_bytes(), Encoding::Json).unwrap_err();
            assert_eq!(refused.code, tonic::Code::InvalidArgument);
            assert!(!refused.message.contains(secret), "{}", refused.message);
            assert!(!refused.message.contains("kw_live"), "{}", refused.message);
        }
        assert_eq!(without_strings("field 'bogus' at 1"), "field 'bogus' at 1");
        assert_eq!(
            without_strings(&format!(r#"a "{secret}" c '{secret}'"#)),
            "a \"…\" c '…'"
        );
    }

    #[test]
    fn frames_round_trip_and_a_bad_frame_is_refused() {
        let framed = frame(b"abc");
        assert_eq!(unframe(&framed), Some(&b"abc"[..]));
        assert_eq!(unframe(&framed[..6]), None);
        assert_eq!(unframe(b"\x01\0\0\0\x01a"), None, "compressed");
        assert_eq!(unframe(b""), None);
    }
}
