//! `keywarden.v1.RevocationService`: WatchRevocations.
//!
//! Each stream is one task: subscribe to the live fan-out *first*, then replay the log
//! after the cursor, then forward live events, skipping any seq already sent. Everything
//! published before the subscription is in the log the replay reads, and everything
//! after reaches the receiver, so the seam has no gap and no duplicate.
//!
//! Back-pressure: the live fan-out is a bounded broadcast and each stream's outgoing
//! queue is bounded. A subscriber that falls behind either is ended with ABORTED, naming
//! the seq to resume from; it then catches up from the log. Nobody else waits for it.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert;
use super::error::{check, refused, store_status};
use crate::domain::event::{EventKind, KeyEvent};
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::validate::Violations;
use crate::events::EventHub;
use crate::proto;
use crate::proto::revocation_service_server::RevocationService;
use crate::proto::watch_revocations_response::Message;

/// Responses a stream may have queued before its subscriber counts as too slow.
const STREAM_QUEUE: usize = 256;

pub struct RevocationApi {
    hub: Arc<EventHub>,
}

impl RevocationApi {
    pub fn new(hub: Arc<EventHub>) -> Self {
        RevocationApi { hub }
    }
}

type WatchStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchRevocationsResponse, Status>> + Send>>;

/// What a stream's queue holds. Boxed: tokio's channel allocates its first block of 32
/// slots when the stream opens, and a response in place (136 bytes a slot) made that
/// block 4.3 KiB of every open stream; a box makes it 512 bytes.
type Outgoing = Result<Box<proto::WatchRevocationsResponse>, Status>;

fn kind_pb(kind: EventKind) -> proto::KeyEventKind {
    match kind {
        EventKind::Revoked => proto::KeyEventKind::Revoked,
        EventKind::Rotated => proto::KeyEventKind::Rotated,
        EventKind::Updated => proto::KeyEventKind::Updated,
        EventKind::Deleted => proto::KeyEventKind::Deleted,
    }
}

pub fn event_pb(e: &KeyEvent) -> proto::KeyEvent {
    proto::KeyEvent {
        seq: e.seq,
        kind: kind_pb(e.kind) as i32,
        key_id: e.key_id.clone(),
        workspace_id: e.workspace_id.clone(),
        key_hash: e.key_hash.to_hex(),
        occurred_at: Some(convert::timestamp(e.occurred_at)),
        stale_key_hashes: e.stale_hashes.iter().map(|h| h.to_hex()).collect(),
    }
}

fn message(m: Message) -> Outgoing {
    Ok(Box::new(proto::WatchRevocationsResponse {
        message: Some(m),
    }))
}

/// The status a stream ends with (or a subscription is refused with) while the replica
/// cannot read the log; `cursor`: where the subscriber should resume.
fn stale_status(cursor: Option<i64>) -> Status {
    let message = "this replica cannot read the event log; resume on another replica";
    match cursor {
        Some(cursor) => refused(
            Refusal::new(
                Reason::EventLogStale,
                format!("{message} with after_seq={cursor}"),
            )
            .with("after_seq", cursor),
        ),
        None => refused(Refusal::new(Reason::EventLogStale, message)),
    }
}

/// One subscriber's stream.
struct Subscription {
    hub: Arc<EventHub>,
    out: mpsc::Sender<Outgoing>,
    workspace: Option<String>,
    /// The last seq delivered (or skipped by the filter): the cursor to resume from.
    cursor: i64,
}

enum Flow {
    Continue,
    /// The subscriber is gone or was told to go.
    End,
}

impl Subscription {
    /// Queues a response; a full queue means the subscriber is too slow, and it is ended
    /// with a status naming its cursor (the last slot is kept for that status).
    fn push(&mut self, response: Outgoing) -> Flow {
        if self.out.is_closed() {
            return Flow::End;
        }
        if self.out.capacity() <= 1 {
            let _ = self.out.try_send(Err(self.behind()));
            return Flow::End;
        }
        match self.out.try_send(response) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::End,
        }
    }

    fn behind(&self) -> Status {
        refused(
            Refusal::new(
                Reason::StreamSubscriberTooSlow,
                format!(
                    "subscriber fell too far behind; resume with after_seq={}",
                    self.cursor
                ),
            )
            .with("after_seq", self.cursor),
        )
    }

    fn filtered_out(&self, event: &KeyEvent) -> bool {
        self.workspace
            .as_deref()
            .is_some_and(|w| w != event.workspace_id)
    }

    fn deliver(&mut self, event: &KeyEvent) -> Flow {
        if event.seq <= self.cursor {
            return Flow::Continue;
        }
        if self.filtered_out(event) {
            self.cursor = event.seq;
            return Flow::Continue;
        }
        // The cursor moves only once the event is queued: a subscriber told to resume
        // (too slow) resumes from the last event it will actually receive.
        let flow = self.push(message(Message::Event(event_pb(event))));
        if let Flow::Continue = flow {
            self.cursor = event.seq;
        }
        flow
    }

    /// The cursor, not what the replica has published: an event published but not yet
    /// taken from the live receiver has not been sent, and a heartbeat claims that the
    /// subscriber has seen everything up to `head_seq`. A replica that has not read the
    /// log lately cannot claim that: it ends the stream instead.
    fn heartbeat(&mut self) -> Flow {
        if !self.hub.freshness().vouching() {
            return self.stale();
        }
        let head = self.cursor;
        self.push(message(Message::Heartbeat(proto::Heartbeat {
            head_seq: head,
            sent_at: Some(convert::timestamp(crate::clock::Clock::System.now())),
        })))
    }

    fn shutting_down(&self) -> Flow {
        let _ = self.out.try_send(Err(refused(
            Refusal::new(
                Reason::ServerShuttingDown,
                format!(
                    "server shutting down; resume with after_seq={}",
                    self.cursor
                ),
            )
            .with("after_seq", self.cursor),
        )));
        Flow::End
    }

    /// The replica stopped vouching (see [`crate::events::Freshness`]): the subscriber
    /// must not take silence for being caught up, so the stream ends, naming the cursor
    /// to resume from (on another replica, or here once the log is readable again).
    fn stale(&self) -> Flow {
        let _ = self.out.try_send(Err(stale_status(Some(self.cursor))));
        Flow::End
    }

    async fn run(mut self, after_seq: i64) {
        // Before anything else: a shutdown that begins while this stream is starting or
        // replaying must still end it (`wait_for` sees a stop that already happened).
        let mut stopping = self.hub.stopping();
        let mut freshness = self.hub.freshness().watch();
        let (mut live, published) = self.hub.subscribe();
        if let Flow::End = self.start(after_seq, published, &mut stopping).await {
            return;
        }
        let mut heartbeat = tokio::time::interval(self.hub.settings().heartbeat_interval);
        heartbeat.reset();
        loop {
            let flow = tokio::select! {
                received = live.recv() => match received {
                    Ok(event) => self.deliver(&event),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = self.out.try_send(Err(self.behind()));
                        Flow::End
                    }
                    Err(broadcast::error::RecvError::Closed) => Flow::End,
                },
                _ = heartbeat.tick() => self.heartbeat(),
                _ = freshness.wait_for(|vouching| !*vouching) => self.stale(),
                _ = stopping.wait_for(|stop| *stop) => self.shutting_down(),
                _ = self.out.closed() => Flow::End,
            };
            if let Flow::End = flow {
                return;
            }
        }
    }

    /// Replays the log after `after_seq`, or starts from now, or resets.
    async fn start(
        &mut self,
        after_seq: i64,
        published: i64,
        stopping: &mut watch::Receiver<bool>,
    ) -> Flow {
        if after_seq == 0 {
            self.cursor = published;
            return self.heartbeat();
        }
        let store = self.hub.store().clone();
        let bounds = match store.event_bounds().await {
            Ok(b) => b,
            Err(e) => {
                let _ = self.out.try_send(Err(store_status(&e)));
                return Flow::End;
            }
        };
        if !bounds.can_resume(after_seq) {
            self.cursor = published;
            return self.push(message(Message::Reset(proto::Reset { seq: published })));
        }
        self.cursor = after_seq;
        loop {
            let events = match store.read_events(self.cursor, 500).await {
                Ok(events) => events,
                Err(e) => {
                    let _ = self.out.try_send(Err(store_status(&e)));
                    return Flow::End;
                }
            };
            if events.is_empty() {
                return self.heartbeat();
            }
            for event in &events {
                if event.seq <= self.cursor {
                    continue;
                }
                if self.filtered_out(event) {
                    self.cursor = event.seq;
                    continue;
                }
                // The replay may outrun the queue: wait for room here (nothing else is
                // waiting on this task yet) rather than calling the subscriber slow, but
                // keep the last slot free for the status that ends the stream, and stop
                // waiting when the server shuts down.
                let room = tokio::select! {
                    room = self.out.reserve_many(2) => room,
                    _ = stopping.wait_for(|stop| *stop) => return self.shutting_down(),
                };
                let Some(slot) = room.ok().and_then(|mut r| r.next()) else {
                    return Flow::End;
                };
                slot.send(message(Message::Event(event_pb(event))));
                self.cursor = event.seq;
            }
        }
    }
}

#[tonic::async_trait]
impl RevocationService for RevocationApi {
    type WatchRevocationsStream = WatchStream;

    async fn watch_revocations(
        &self,
        request: Request<proto::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        if r.after_seq < 0 {
            v.add("after_seq", "must be 0 (from now) or a seq received before");
        }
        if !r.workspace_id.is_empty() {
            v.workspace_id("workspace_id", &r.workspace_id);
        }
        check(v)?;
        if !self.hub.freshness().vouching() {
            return Err(stale_status(None));
        }
        let (out, rx) = mpsc::channel(STREAM_QUEUE);
        let subscription = Subscription {
            hub: self.hub.clone(),
            out,
            workspace: (!r.workspace_id.is_empty()).then_some(r.workspace_id),
            cursor: 0,
        };
        tokio::spawn(subscription.run(r.after_seq));
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|queued| queued.map(|response| *response)),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open stream's queue allocates a block of 32 slots up front: a slot must stay
    /// a pointer's size or two, whatever the response message grows to.
    #[test]
    fn a_queued_response_takes_two_words_of_the_queue() {
        assert!(std::mem::size_of::<proto::WatchRevocationsResponse>() > 64);
        assert_eq!(std::mem::size_of::<Outgoing>(), 16);
    }
}
