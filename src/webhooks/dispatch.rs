//! The delivery loop: on every poll, the replica that holds the webhook lease announces
//! due expiry and budget notices, then delivers each due endpoint's outbox events in seq
//! order, one at a time per endpoint (several endpoints at once), moving the endpoint's
//! durable cursor after each 2xx.
//!
//! One replica at a time: on Postgres the dispatcher holds a session advisory lock
//! ([`LOCK_KEY`]) on a connection of its own; the others wait for it, and a replica that
//! dies loses the lock with its connection, so another takes over at its next poll. On
//! SQLite there is one process. Because the cursor moves only after a receiver's 2xx,
//! a crash between the answer and the write repeats that one event: delivery is at
//! least once, and each carries its `id` for deduplication.
//!
//! A failure leaves the cursor where it is and schedules the endpoint's next attempt
//! (`domain::webhook::backoff`, with jitter); after `domain::webhook::RETRY_FOR` of
//! failures in a row the endpoint is disabled, with an audit row. Time is the server's
//! [`Clock`], so tests drive retries and expiry with the manual clock.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use sqlx::Connection;
use tokio::sync::watch;

use super::client::Client;
use super::{WebhookSettings, associated_data, sealed_of};
use crate::clock::Clock;
use crate::crypto::KekRing;
use crate::domain::webhook::{self, WebhookUrl};
use crate::domain::{MICROS_PER_SECOND, Micros, micros_in};
use crate::metrics::Metrics;
use crate::store::{AuditContext, DeliveryFailure, OutboxEvent, Store, WebhookRecord};

/// The advisory lock the delivering replica holds ("KWWH").
pub const LOCK_KEY: i64 = 0x4b57_5748;

/// Outbox events read per round for one endpoint.
const READ_BATCH: u32 = 100;
/// Endpoints looked at per poll.
const DUE_BATCH: u32 = 100;
/// Keys a sweep announces per poll.
const SWEEP_BATCH: u32 = 100;
const PRUNE_EVERY: Duration = Duration::from_secs(600);

pub struct Dispatcher {
    store: Arc<dyn Store>,
    clock: Clock,
    ring: Option<Arc<KekRing>>,
    settings: WebhookSettings,
    metrics: Arc<Metrics>,
    client: Client,
    /// One poll at a time in this process: the loop's, or one asked for
    /// ([`Dispatcher::poll`], e.g. by a test right after moving its clock).
    polling: tokio::sync::Mutex<()>,
}

/// The right to deliver: on Postgres, a connection of the dispatcher's own (out of the
/// pool, kept between polls so that a replica waiting for the lock does not connect
/// anew each time) and whether it holds the advisory lock; nothing on SQLite.
enum Lease {
    Postgres {
        conn: sqlx::PgConnection,
        held: bool,
    },
    Alone,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Clock,
        ring: Option<Arc<KekRing>>,
        settings: WebhookSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Dispatcher, String> {
        let client = Client::new(settings.allow_private, settings.timeout)?;
        Ok(Dispatcher {
            store,
            clock,
            ring,
            settings,
            metrics,
            client,
            polling: tokio::sync::Mutex::new(()),
        })
    }

    /// Polls until `stop` turns.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if !self.settings.enabled {
            return;
        }
        let mut tick = tokio::time::interval(self.settings.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lease: Option<Lease> = None;
        let mut pruned_at: Option<tokio::time::Instant> = None;
        let mut swept_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if !self.hold(&mut lease).await {
                continue;
            }
            // A poll that stalls (a database that stopped answering) is abandoned; the
            // lease is checked again at the next.
            let bound = self.settings.timeout.saturating_mul(4) + Duration::from_secs(30);
            let sweep = swept_at.is_none_or(|at| at.elapsed() >= self.settings.sweep_interval);
            if sweep {
                swept_at = Some(tokio::time::Instant::now());
            }
            tokio::select! {
                done = tokio::time::timeout(bound, self.poll_with(sweep)) => {
                    if done.is_err() {
                        tracing::warn!("a webhook poll did not finish; trying again");
                    }
                }
                _ = stop.changed() => return,
            }
            if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                self.prune().await;
                pruned_at = Some(tokio::time::Instant::now());
            }
        }
    }

    /// Whether this replica may deliver now: it holds the lock, or takes it.
    async fn hold(&self, lease: &mut Option<Lease>) -> bool {
        if lease.is_none() {
            *lease = match self.store.postgres_pool() {
                None => Some(Lease::Alone),
                Some(pool) => match pool.acquire().await {
                    // The lock lives as long as this connection: closed when dropped.
                    Ok(conn) => Some(Lease::Postgres {
                        conn: conn.detach(),
                        held: false,
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot connect for the webhook delivery lock");
                        None
                    }
                },
            };
        }
        let Some(Lease::Postgres { conn, held }) = lease else {
            return lease.is_some();
        };
        let asked = if *held {
            // Still ours while the connection is alive.
            conn.ping().await.map(|()| true)
        } else {
            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(LOCK_KEY)
                .fetch_one(&mut *conn)
                .await
        };
        match asked {
            Ok(now_held) => {
                if now_held && !*held {
                    tracing::info!("this replica delivers webhooks");
                }
                *held = now_held;
                now_held
            }
            Err(e) => {
                if *held {
                    tracing::warn!(error = %e, "lost the webhook delivery lock's connection");
                }
                *lease = None;
                false
            }
        }
    }

    /// One poll: the notices due, then every due endpoint, then the gauge. Waits for a
    /// poll under way to end first, so when it returns, everything due at the clock's
    /// time when it began has been announced and attempted.
    pub async fn poll(&self) {
        self.poll_with(true).await;
    }

    /// A poll; the notices only when `sweep` (the loop sweeps every `sweep_interval`:
    /// a notice is due by the minute, and the sweeps read every key near its expiry or
    /// with a budget).
    async fn poll_with(&self, sweep: bool) {
        let _one = self.polling.lock().await;
        if sweep {
            self.sweep().await;
        }
        self.deliver_due().await;
    }

    async fn sweep(&self) {
        let now = self.clock.now();
        let leads: Vec<Micros> = self
            .settings
            .expiry_leads
            .iter()
            .map(|d| micros_in(*d))
            .collect();
        match self.store.announce_expiring(now, &leads, SWEEP_BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "expiry notices announced"),
            Err(e) => tracing::warn!(error = %e, "announcing expiry notices failed"),
        }
        match self
            .store
            .announce_budget_thresholds(now, SWEEP_BATCH)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "budget threshold notices announced"),
            Err(e) => tracing::warn!(error = %e, "announcing budget thresholds failed"),
        }
    }

    async fn deliver_due(&self) {
        let now = self.clock.now();
        match self.store.due_webhooks(now, DUE_BATCH).await {
            Ok(due) => {
                futures::stream::iter(due)
                    .for_each_concurrent(self.settings.max_concurrent, |endpoint| async move {
                        self.deliver(endpoint).await;
                    })
                    .await;
            }
            Err(e) => tracing::warn!(error = %e, "reading due webhooks failed"),
        }
        match self.store.oldest_undelivered().await {
            Ok(oldest) => {
                let age = oldest.map_or(0, |at| self.clock.now().saturating_sub(at).max(0));
                self.metrics
                    .webhook_oldest_undelivered
                    .set(age as f64 / MICROS_PER_SECOND as f64);
            }
            Err(e) => tracing::debug!(error = %e, "reading the oldest undelivered event failed"),
        }
    }

    async fn prune(&self) {
        let cutoff = self
            .clock
            .now()
            .saturating_sub(micros_in(self.settings.retention));
        match self.store.prune_outbox(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "pruned the webhook outbox"),
            Err(e) => tracing::warn!(error = %e, "pruning the webhook outbox failed"),
        }
        match self.store.prune_notices(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(marks = n, "pruned webhook notice marks"),
            Err(e) => tracing::warn!(error = %e, "pruning webhook notice marks failed"),
        }
    }

    /// Delivers the endpoint's events after its cursor, in order, until one fails or
    /// none is left.
    async fn deliver(&self, endpoint: WebhookRecord) {
        let id = endpoint.webhook_id.as_str();
        let secret = match &self.ring {
            Some(ring) => ring.open(
                &sealed_of(&endpoint),
                &associated_data(&endpoint.workspace_id, id),
            ),
            None => Err(crate::crypto::CryptoError::NoKek),
        };
        let secret = match secret {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(webhook_id = id, error = %e, "cannot open a webhook signing secret");
                self.failed(
                    &endpoint,
                    "the signing secret cannot be opened (KEK)".into(),
                )
                .await;
                return;
            }
        };
        let url = match WebhookUrl::parse(&endpoint.url) {
            Ok(u) => u,
            Err(why) => {
                self.failed(&endpoint, format!("url {why}")).await;
                return;
            }
        };
        let mut cursor = endpoint.delivered_seq;
        // The last seq done with (delivered, or not subscribed to) not yet written.
        let mut passed = cursor;
        loop {
            let events = match self
                .store
                .read_outbox(&endpoint.workspace_id, cursor, READ_BATCH)
                .await
            {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(webhook_id = id, error = %e, "reading the webhook outbox failed");
                    break;
                }
            };
            let Some(last) = events.last().map(|e| e.seq) else {
                break;
            };
            for event in events {
                if !endpoint.event_types.contains(&event.event_type) {
                    passed = event.seq;
                    continue;
                }
                let body = Bytes::from(envelope(&event));
                let now_s = self.clock.now().div_euclid(MICROS_PER_SECOND);
                let event_id = webhook::event_id(&event.workspace_id, event.seq);
                let headers = [
                    (
                        webhook::SIGNATURE_HEADER,
                        webhook::sign(secret.as_slice(), now_s, &body),
                    ),
                    (webhook::ID_HEADER, event_id),
                ];
                match self.client.post(&url, body, &headers).await {
                    Ok(()) => {
                        self.metrics.webhook_delivered.increment(1);
                        passed = event.seq;
                        if let Err(e) = self.store.webhook_delivered(id, passed).await {
                            tracing::warn!(webhook_id = id, error = %e, "recording a delivery failed");
                            return;
                        }
                    }
                    Err(e) => {
                        if passed > endpoint.delivered_seq {
                            let _ = self.store.webhook_delivered(id, passed).await;
                        }
                        tracing::info!(webhook_id = id, error = %e, "webhook delivery failed");
                        self.failed(&endpoint, e.to_string()).await;
                        return;
                    }
                }
            }
            cursor = last;
        }
        if passed > endpoint.delivered_seq
            && let Err(e) = self.store.webhook_delivered(id, passed).await
        {
            tracing::warn!(webhook_id = id, error = %e, "recording a delivery failed");
        }
    }

    /// Schedules the next attempt, or gives the endpoint up.
    async fn failed(&self, endpoint: &WebhookRecord, error: String) {
        let now = self.clock.now();
        let failures = endpoint.failures.saturating_add(1);
        let since = endpoint.failing_since.unwrap_or(now);
        let give_up = webhook::gives_up(since, now);
        let disable = give_up.then(|| AuditContext {
            actor_id: "keywarden".to_owned(),
            caller: "webhooks".to_owned(),
            action: "webhook.disabled",
            detail: format!(
                "webhook: {}, failing for {} hours ({failures} attempts), last error: {error}",
                endpoint.webhook_id,
                now.saturating_sub(since) / (3600 * MICROS_PER_SECOND)
            ),
        });
        let failure = DeliveryFailure {
            at: now,
            next_attempt_at: now.saturating_add(webhook::backoff(failures, jitter())),
            error,
            disable,
        };
        if give_up {
            self.metrics.webhook_disabled.increment(1);
            tracing::warn!(webhook_id = %endpoint.webhook_id, "webhook disabled after failing for 24 hours");
        } else {
            self.metrics.webhook_failed.increment(1);
        }
        if let Err(e) = self
            .store
            .webhook_failed(&endpoint.webhook_id, &failure)
            .await
        {
            tracing::warn!(webhook_id = %endpoint.webhook_id, error = %e, "recording a failed delivery failed");
        }
    }
}

/// A uniform draw in `[0, 1)` from the OS (0 if it fails: the schedule without jitter).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    match getrandom::fill(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.0,
    }
}

/// The body every endpoint receives for `event`: `id`, `type`, `created_at` (unix
/// seconds), `workspace_id`, `data` (docs/webhooks.md).
pub fn envelope(event: &OutboxEvent) -> Vec<u8> {
    let data: serde_json::Value =
        serde_json::from_str(&event.data).unwrap_or(serde_json::Value::Null);
    let body = serde_json::json!({
        "id": webhook::event_id(&event.workspace_id, event.seq),
        "type": event.event_type.as_str(),
        "created_at": event.occurred_at.div_euclid(MICROS_PER_SECOND),
        "workspace_id": event.workspace_id,
        "data": data,
    });
    body.to_string().into_bytes()
}
