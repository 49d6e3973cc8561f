//! The event log's reader on this replica, and the fan-out to its subscribers.
//!
//! One tailer task per replica reads `key_events` in seq order from where it last stood,
//! invalidates this replica's VerifyKey cache for each event, then publishes the event
//! to every WatchRevocations subscriber (a broadcast channel). It wakes on:
//! - a local mutation (in process: the lifecycle calls [`EventHub::wake`] after commit),
//! - a Postgres NOTIFY from any replica (`listen.rs`),
//! - a periodic poll, the safety net for a lost notification or a dropped listener.
//!
//! Because seq order is commit order without gaps (see the migration), reading
//! `seq > last` never skips an event.
//!
//! More periodic jobs run here: announcing the end of rotation grace periods (and, on
//! the same tick, starting the budgets whose period turned: `reset_due_budgets`), and
//! pruning events older than the retention window.
//!
//! The tailer also keeps [`Freshness`]: the replica vouches for its cache only while its
//! last successful read of the log is recent (see `freshness.rs`).

mod freshness;
mod listen;

pub use freshness::Freshness;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};

use crate::cache::VerifyCache;
use crate::clock::Clock;
use crate::domain::event::KeyEvent;
use crate::domain::key_format::KeyHash;
use crate::metrics::Metrics;
use crate::store::Store;

/// How many events one read takes from the log.
const READ_BATCH: u32 = 500;

#[derive(Clone, Debug)]
pub struct EventSettings {
    /// The safety-net poll of the log.
    pub poll_interval: Duration,
    /// How often an idle WatchRevocations stream gets a heartbeat.
    pub heartbeat_interval: Duration,
    /// Events older than this are pruned.
    pub retention: Duration,
    pub prune_interval: Duration,
    /// How often ended grace periods are looked for.
    pub grace_sweep_interval: Duration,
    /// Events a subscriber may fall behind before it is ended (told to resume).
    pub subscriber_lag: usize,
    /// Whether to LISTEN for Postgres notifications. Off where the connection cannot
    /// LISTEN (a transaction-pooling proxy such as PgBouncer): the poll alone then
    /// delivers every event, one poll interval late at most.
    pub listen: bool,
    /// How long the replica may go without a successful read of the log and still answer
    /// from its cache (see [`Freshness`]). The tailer reads at least every third of it,
    /// whatever `poll_interval` says. `None`: no bound (tests of the listener alone).
    pub max_staleness: Option<Duration>,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            poll_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(10),
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(600),
            grace_sweep_interval: Duration::from_secs(1),
            subscriber_lag: 4096,
            listen: true,
            max_staleness: Some(Duration::from_secs(3)),
        }
    }
}

pub struct EventHub {
    store: Arc<dyn Store>,
    cache: Arc<VerifyCache>,
    clock: Clock,
    settings: EventSettings,
    /// The last seq this replica has applied and published.
    published: AtomicI64,
    live: broadcast::Sender<Arc<KeyEvent>>,
    wake: Notify,
    stop: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    freshness: Freshness,
    /// Told the id of every key an applied event names (see [`EventHub::on_key_event`]).
    key_listeners: std::sync::RwLock<Vec<KeyListener>>,
}

/// Told a key's id when an event for it is applied on this replica.
pub type KeyListener = Box<dyn Fn(&str) + Send + Sync>;

impl EventHub {
    /// Starts the tailer (from the log's current head), the freshness watchdog, the
    /// LISTEN task on Postgres, the grace-period sweeper and the pruner.
    pub async fn start(
        store: Arc<dyn Store>,
        cache: Arc<VerifyCache>,
        clock: Clock,
        settings: EventSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<EventHub>, crate::store::StoreError> {
        let freshness = Freshness::new(settings.max_staleness);
        let read_started = tokio::time::Instant::now();
        let head = store.event_bounds().await?.head;
        freshness.read_succeeded(read_started, tokio::time::Instant::now());
        let (live, _) = broadcast::channel(settings.subscriber_lag.max(16));
        let (stop, _) = watch::channel(false);
        let hub = Arc::new(EventHub {
            store,
            cache,
            clock,
            settings,
            published: AtomicI64::new(head),
            live,
            wake: Notify::new(),
            stop,
            metrics,
            freshness,
            key_listeners: std::sync::RwLock::new(Vec::new()),
        });
        tokio::spawn(hub.clone().tail());
        tokio::spawn(hub.clone().watch_freshness());
        tokio::spawn(hub.clone().sweep_grace_ends());
        tokio::spawn(hub.clone().prune());
        if let Some(pool) = hub.store.postgres_pool().filter(|_| hub.settings.listen) {
            tokio::spawn(listen::run(pool.clone(), hub.clone()));
        }
        Ok(hub)
    }

    /// Asks the tailer to read the log now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The last seq this replica has published.
    pub fn published(&self) -> i64 {
        self.published.load(Ordering::SeqCst)
    }

    /// A receiver of every event published from now on, and the seq published so far
    /// (every later event reaches the receiver).
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<KeyEvent>>, i64) {
        let rx = self.live.subscribe();
        (rx, self.published())
    }

    pub fn subscribers(&self) -> usize {
        self.live.receiver_count()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn settings(&self) -> &EventSettings {
        &self.settings
    }

    /// Whether this replica has read the log recently enough to vouch for its cache.
    pub fn freshness(&self) -> &Freshness {
        &self.freshness
    }

    /// Resolves when the server is shutting down.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Stops the background tasks and ends every stream.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    async fn tail(self: Arc<Self>) {
        let mut stop = self.stopping();
        // Read at least every third of the freshness bound, so that an idle log keeps the
        // replica vouching.
        let every = self
            .freshness
            .read_at_least_every()
            .map_or(self.settings.poll_interval, |f| {
                f.min(self.settings.poll_interval)
            });
        // A read that hangs (a blackholed connection) is abandoned after this long and
        // tried again; meanwhile the freshness bound has stopped the vouching.
        let give_up = self
            .freshness
            .max_staleness()
            .unwrap_or(Duration::from_secs(30))
            .max(Duration::from_secs(1));
        let mut poll = tokio::time::interval(every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = poll.tick() => {}
                _ = stop.changed() => return,
            }
            match tokio::time::timeout(give_up, self.catch_up()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading the event log failed; retrying at the next poll");
                }
                Err(_) => {
                    tracing::warn!(
                        timeout_ms = give_up.as_millis() as u64,
                        "reading the event log did not finish; retrying at the next poll"
                    );
                }
            }
        }
    }

    /// Clears [`Freshness::vouching`] once the last successful read is too old.
    async fn watch_freshness(self: Arc<Self>) {
        let Some(tick) = self.freshness.watchdog_tick() else {
            return;
        };
        let mut stop = self.stopping();
        let mut every = tokio::time::interval(tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.freshness.check(tokio::time::Instant::now()),
                _ = stop.changed() => return,
            }
        }
    }

    /// Tells `listener` the id of every key an event names, as each is applied here
    /// (with the cache's invalidation, before the event is published): state kept
    /// beside the cache, by key id, is dropped with it.
    pub fn on_key_event(&self, listener: KeyListener) {
        self.key_listeners
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(listener);
    }

    /// Applies and publishes every event after the last one published; once a read finds
    /// nothing more, tells [`Freshness`] when that read began.
    async fn catch_up(&self) -> Result<(), crate::store::StoreError> {
        loop {
            let started = tokio::time::Instant::now();
            let events = self.store.read_events(self.published(), READ_BATCH).await?;
            let full = events.len() == READ_BATCH as usize;
            for event in events {
                for hash in &event.stale_hashes {
                    self.cache.invalidate(hash);
                }
                self.cache.invalidate(&event.key_hash);
                let listeners = self
                    .key_listeners
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for listener in listeners.iter() {
                    listener(&event.key_id);
                }
                drop(listeners);
                // Published before it is sent: a stream that subscribes in between and
                // reads `published` as this seq also receives the event (and skips it as
                // already covered); the other order would lose it for that stream.
                self.published.store(event.seq, Ordering::SeqCst);
                self.metrics.events_published.increment(1);
                let lag = self.clock.now().saturating_sub(event.occurred_at).max(0);
                self.metrics.event_lag.record(lag as f64 / 1e6);
                // No subscriber is not an error.
                let _ = self.live.send(Arc::new(event));
            }
            if !full {
                self.freshness
                    .read_succeeded(started, tokio::time::Instant::now());
                return Ok(());
            }
        }
    }

    async fn sweep_grace_ends(self: Arc<Self>) {
        let mut stop = self.stopping();
        let mut tick = tokio::time::interval(self.settings.grace_sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            match self.store.announce_grace_ends(self.clock.now(), 100).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(secrets = n, "rotation grace periods ended");
                    self.wake();
                }
                Err(e) => tracing::warn!(error = %e, "announcing ended grace periods failed"),
            }
            match self.store.reset_due_budgets(self.clock.now(), 100).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(keys = n, "budget periods turned");
                    self.wake();
                }
                Err(e) => tracing::warn!(error = %e, "starting turned budget periods failed"),
            }
        }
    }

    async fn prune(self: Arc<Self>) {
        let mut stop = self.stopping();
        let mut tick = tokio::time::interval(self.settings.prune_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let retention = crate::domain::micros_in(self.settings.retention);
            let cutoff = self.clock.now().saturating_sub(retention);
            match self.store.prune_events(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "pruned the event log"),
                Err(e) => tracing::warn!(error = %e, "pruning the event log failed"),
            }
        }
    }
}

/// After a commit that made `hashes` stale: drops this replica's cached entries at once,
/// and wakes the event tailer so the committed events reach subscribers (and, through the
/// log, every other replica).
pub fn invalidate_committed(cache: &VerifyCache, events: &EventHub, hashes: &[KeyHash]) {
    for hash in hashes {
        cache.invalidate(hash);
    }
    events.wake();
}
