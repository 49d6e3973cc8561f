//! The revocation stream's scenarios:
//!
//! - `revocation-latency`: keys revoked one after another through replica A; for each, the
//!   time from RevokeKey's reply to the event's arrival at a WatchRevocations subscriber
//!   of A (same replica) and of B (another replica on the same Postgres, woken by NOTIFY).
//! - `streams`: one replica holds many concurrent streams; the server's memory growth per
//!   stream, and how long one revocation takes to reach every one of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::server::{ServerProcess, Tokens};
use super::{BoxError, issue_request};
use crate::bearer::Bearer;
use crate::proto;
use crate::proto::key_service_client::KeyServiceClient;
use crate::proto::revocation_service_client::RevocationServiceClient;
use crate::proto::watch_revocations_response::Message;

/// Streams per HTTP/2 connection: below the server's default limit of concurrent streams.
const STREAMS_PER_CONNECTION: usize = 100;
/// The longest a subscriber may take to see an event before the run gives up on it.
const EVENT_DEADLINE: Duration = Duration::from_secs(10);

/// A latency distribution, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Spread {
    fn of(h: &Histogram<u64>) -> Option<Spread> {
        (!h.is_empty()).then(|| Spread {
            samples: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        })
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RevocationLatency {
    pub revocations: usize,
    /// From RevokeKey's reply to the event at a subscriber of the replica that revoked.
    pub same_replica: Option<Spread>,
    /// ... at a subscriber of another replica on the same Postgres (Postgres runs only).
    pub other_replica: Option<Spread>,
    /// Events that did not arrive within the deadline.
    pub missed: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamsReport {
    pub requested: usize,
    /// Streams that subscribed and got their first heartbeat.
    pub opened: usize,
    pub open_seconds: f64,
    /// Server RSS growth divided by the streams opened (connections' share included).
    pub bytes_per_stream: Option<f64>,
    /// From RevokeKey's reply to the event at each stream.
    pub fanout: Option<Spread>,
    pub missed: usize,
}

fn histogram() -> Result<Histogram<u64>, BoxError> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn micros_since(from: Instant, to: Instant) -> u64 {
    (to.saturating_duration_since(from).as_micros() as u64).max(1)
}

/// The stream scenarios' admin client, on a tonic `Channel` like an edge node's.
type Admin = KeyServiceClient<InterceptedService<Channel, Bearer>>;

fn admin(channel: Channel, tokens: &Tokens) -> Result<Admin, BoxError> {
    Ok(KeyServiceClient::with_interceptor(
        channel,
        Bearer::indexed(&tokens.admin)?,
    ))
}

async fn channel(server: &ServerProcess) -> Result<Channel, BoxError> {
    Ok(Channel::from_shared(format!("http://{}", server.addr))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Subscribes from now and forwards the arrival time of every event's key id. Resolves
/// once the stream has its first heartbeat (it is live from then on).
async fn subscribe(
    channel: Channel,
    tokens: &Tokens,
    arrivals: mpsc::UnboundedSender<(String, Instant)>,
) -> Result<tokio::task::JoinHandle<()>, BoxError> {
    let mut client =
        RevocationServiceClient::with_interceptor(channel, Bearer::indexed(&tokens.edge)?);
    let mut stream = client
        .watch_revocations(proto::WatchRevocationsRequest {
            after_seq: 0,
            workspace_id: String::new(),
        })
        .await?
        .into_inner();
    match tokio::time::timeout(EVENT_DEADLINE, stream.message()).await?? {
        Some(proto::WatchRevocationsResponse {
            message: Some(Message::Heartbeat(_)),
        }) => {}
        other => return Err(format!("expected a heartbeat first, got {other:?}").into()),
    }
    Ok(tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            if let Some(Message::Event(e)) = m.message
                && arrivals.send((e.key_id, Instant::now())).is_err()
            {
                return;
            }
        }
    }))
}

async fn issue_keys(admin: &mut Admin, n: usize) -> Result<Vec<String>, BoxError> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let r = admin.issue_key(issue_request(i as u64)).await?.into_inner();
        ids.push(r.key_info.map(|k| k.key_id).ok_or("no key_info")?);
    }
    Ok(ids)
}

async fn revoke(admin: &mut Admin, key_id: &str) -> Result<Instant, BoxError> {
    admin
        .revoke_key(proto::RevokeKeyRequest {
            key_id: key_id.to_owned(),
            actor: Some(proto::Actor {
                id: "bench".into(),
                permissions: Vec::new(),
            }),
            reason: "bench".into(),
        })
        .await?;
    Ok(Instant::now())
}

/// Waits for `key_id` on `arrivals`, skipping others; `None` past the deadline.
async fn arrival_of(
    arrivals: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    key_id: &str,
) -> Option<Instant> {
    tokio::time::timeout(EVENT_DEADLINE, async {
        while let Some((id, at)) = arrivals.recv().await {
            if id == key_id {
                return Some(at);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// `a` revokes; subscribers on `a` and, when given, on `b`.
pub async fn revocation_latency(
    a: &ServerProcess,
    b: Option<&ServerProcess>,
    tokens: &Tokens,
    revocations: usize,
) -> Result<RevocationLatency, BoxError> {
    let a_channel = channel(a).await?;
    let mut admin = admin(a_channel.clone(), tokens)?;
    let ids = issue_keys(&mut admin, revocations).await?;
    let (same_tx, mut same_rx) = mpsc::unbounded_channel();
    let same_task = subscribe(a_channel, tokens, same_tx).await?;
    let mut other = None;
    if let Some(b) = b {
        let (tx, rx) = mpsc::unbounded_channel();
        other = Some((subscribe(channel(b).await?, tokens, tx).await?, rx));
    }
    let (mut same_h, mut other_h) = (histogram()?, histogram()?);
    let mut missed = 0;
    for id in &ids {
        let replied = revoke(&mut admin, id).await?;
        match arrival_of(&mut same_rx, id).await {
            Some(at) => same_h.record(micros_since(replied, at))?,
            None => missed += 1,
        }
        if let Some((_, rx)) = other.as_mut() {
            match arrival_of(rx, id).await {
                Some(at) => other_h.record(micros_since(replied, at))?,
                None => missed += 1,
            }
        }
    }
    same_task.abort();
    if let Some((task, _)) = other {
        task.abort();
    }
    Ok(RevocationLatency {
        revocations: ids.len(),
        same_replica: Spread::of(&same_h),
        other_replica: Spread::of(&other_h),
        missed,
    })
}

/// Opens `n` streams on `server`, measures its memory growth, then revokes one key and
/// times its arrival at every stream.
pub async fn streams(
    server: &ServerProcess,
    tokens: &Tokens,
    n: usize,
) -> Result<StreamsReport, BoxError> {
    let mut admin = admin(channel(server).await?, tokens)?;
    let victim = issue_keys(&mut admin, 1).await?.pop().ok_or("no key")?;
    let connections = n.div_ceil(STREAMS_PER_CONNECTION).max(1);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(channel(server).await?);
    }
    let rss_before = server.rss_bytes();
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opened = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Tokens {
        admin: String::new(),
        verifier: String::new(),
        edge: tokens.edge.clone(),
    });
    // Subscribe from a bounded number of tasks at once, so opening is not a stampede.
    let next = Arc::new(AtomicUsize::new(0));
    let mut openers = Vec::new();
    for _ in 0..64.min(n) {
        let (channels, tokens, tx, opened, next) = (
            channels.clone(),
            tokens.clone(),
            tx.clone(),
            opened.clone(),
            next.clone(),
        );
        openers.push(tokio::spawn(async move {
            let mut readers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return readers;
                }
                let channel = channels[i % channels.len()].clone();
                if let Ok(reader) = subscribe(channel, &tokens, tx.clone()).await {
                    opened.fetch_add(1, Ordering::Relaxed);
                    readers.push(reader);
                }
            }
        }));
    }
    drop(tx);
    let mut readers = Vec::new();
    for opener in openers {
        readers.extend(opener.await?);
    }
    let open_seconds = started.elapsed().as_secs_f64();
    let opened = opened.load(Ordering::Relaxed);
    // Let the server settle its per-stream buffers before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bytes_per_stream = match (rss_before, server.rss_bytes()) {
        (Some(before), Some(after)) if opened > 0 => {
            Some(after.saturating_sub(before) as f64 / opened as f64)
        }
        _ => None,
    };
    let replied = revoke(&mut admin, &victim).await?;
    let mut h = histogram()?;
    let deadline = tokio::time::Instant::now() + EVENT_DEADLINE;
    while (h.len() as usize) < opened {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, at))) if id == victim => h.record(micros_since(replied, at))?,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for reader in readers {
        reader.abort();
    }
    Ok(StreamsReport {
        requested: n,
        opened,
        open_seconds,
        bytes_per_stream,
        missed: opened.saturating_sub(h.len() as usize),
        fanout: Spread::of(&h),
    })
}
