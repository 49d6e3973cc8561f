//! Key events: what the event log records about a key so that caches everywhere (other
//! replicas, edge nodes) can drop what they hold of it.

use super::Micros;
use super::key_format::KeyHash;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Revoked,
    /// A rotation; sent again, for the old secret, when its grace period ends.
    Rotated,
    /// Scopes, expiry, name or metadata changed.
    Updated,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Revoked => "revoked",
            EventKind::Rotated => "rotated",
            EventKind::Updated => "updated",
            EventKind::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "revoked" => Some(EventKind::Revoked),
            "rotated" => Some(EventKind::Rotated),
            "updated" => Some(EventKind::Updated),
            "deleted" => Some(EventKind::Deleted),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEvent {
    /// Commit order, without gaps.
    pub seq: i64,
    pub kind: EventKind,
    pub key_id: String,
    pub workspace_id: String,
    /// The secret the event is about: the current one, or for a rotation the old one.
    pub key_hash: KeyHash,
    /// Every secret hash of the key that a cache must drop.
    pub stale_hashes: Vec<KeyHash>,
    pub occurred_at: Micros,
}

/// Where the log stands: the last seq committed, and the last seq pruning may have
/// removed (a cursor below it cannot be resumed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBounds {
    pub head: i64,
    pub pruned_through: i64,
}

impl EventBounds {
    /// Whether a subscriber at `cursor` can be served every later event from the log.
    pub fn can_resume(&self, cursor: i64) -> bool {
        cursor >= self.pruned_through && cursor <= self.head
    }
}

/// Space-separated lowercase hex, as `stale_hashes` is stored.
pub fn join_hashes(hashes: &[KeyHash]) -> String {
    hashes
        .iter()
        .map(KeyHash::to_hex)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn split_hashes(s: &str) -> Option<Vec<KeyHash>> {
    s.split_whitespace()
        .map(|h| hex::decode(h).ok().and_then(|b| KeyHash::from_slice(&b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_inside_the_retained_log_resume_others_reset() {
        let b = EventBounds {
            head: 100,
            pruned_through: 40,
        };
        assert!(b.can_resume(40));
        assert!(b.can_resume(100));
        assert!(!b.can_resume(39), "events 40 and below may be gone");
        assert!(!b.can_resume(101), "a cursor from another log");
    }

    #[test]
    fn hash_lists_round_trip() {
        let hs = vec![KeyHash::of("a"), KeyHash::of("b")];
        assert_eq!(split_hashes(&join_hashes(&hs)), Some(hs));
        assert_eq!(split_hashes(""), Some(vec![]));
        assert_eq!(split_hashes("zz"), None);
    }
}
