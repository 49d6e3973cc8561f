//! Postgres LISTEN: every replica is woken when any replica commits an event. The
//! listener reconnects on its own after a dropped connection; since notifications sent
//! meanwhile are lost, every (re)connection also wakes the tailer to catch up, and the
//! periodic poll covers whatever else slips through.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::EventHub;
use crate::store::postgres::EVENTS_CHANNEL;

pub async fn run(pool: PgPool, hub: Arc<EventHub>) {
    let mut stop = hub.stopping();
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(EVENTS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            l = listener => l,
            _ = stop.changed() => return,
        };
        match listener.as_mut() {
            Ok(listener) => {
                backoff = Duration::from_millis(100);
                hub.wake();
                loop {
                    let next = tokio::select! {
                        n = listener.try_recv() => n,
                        _ = stop.changed() => return,
                    };
                    match next {
                        Ok(Some(_)) => hub.wake(),
                        // The connection dropped; sqlx reconnects on the next call and
                        // notifications in between are lost: catch up from the log.
                        Ok(None) => {
                            tracing::warn!("event listener lost its connection; reconnecting");
                            hub.wake();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "event listener failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot LISTEN for events; polling meanwhile"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
