//! Time, as a value the server is given: the system clock in production, a manual clock
//! in tests so that expiry and grace periods are tested by advancing time, not sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::domain::Micros;

#[derive(Clone, Debug, Default)]
pub enum Clock {
    #[default]
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A clock that stands still at `start` until advanced.
    pub fn manual(start: Micros) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(start)))
    }

    /// A manual clock starting at the system's current time.
    pub fn manual_from_now() -> Self {
        Clock::manual(Clock::System.now())
    }

    pub fn now(&self) -> Micros {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, crate::domain::micros_in),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward; the system clock cannot be moved.
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(t) = self {
            let by = crate::domain::micros_in(by);
            t.fetch_add(by, Ordering::SeqCst);
        }
    }
}
