//! Leaked keys: what a report of a key found in a public place (by a secret scanner, or a
//! person through `ReportLeakedKey`) comes to, and its label in the secret-scanning
//! partner protocol. A text that is not a key of this deployment (its checksum or shape
//! is wrong) is told apart before any storage is read.

/// What one reported token turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeakFinding {
    /// Not a key of this deployment: wrong shape, brand or checksum (no storage read).
    NotAKey,
    /// Well-formed, but no key has this secret.
    Unknown,
    /// A live key: revoked now, because of this report.
    Revoked { key_id: String },
    /// A key that could not be used any more (revoked, deleted, expired, or a secret
    /// replaced whose grace period has ended): nothing to do.
    AlreadyDead { key_id: String },
}

/// The partner protocol's verdict on a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeakLabel {
    TruePositive,
    FalsePositive,
}

impl LeakLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakLabel::TruePositive => "true_positive",
            LeakLabel::FalsePositive => "false_positive",
        }
    }
}

impl LeakFinding {
    /// A key of ours, live or not, is a true positive; anything else a false one.
    pub fn label(&self) -> LeakLabel {
        match self {
            LeakFinding::Revoked { .. } | LeakFinding::AlreadyDead { .. } => {
                LeakLabel::TruePositive
            }
            LeakFinding::NotAKey | LeakFinding::Unknown => LeakLabel::FalsePositive,
        }
    }

    pub fn key_id(&self) -> Option<&str> {
        match self {
            LeakFinding::Revoked { key_id } | LeakFinding::AlreadyDead { key_id } => Some(key_id),
            LeakFinding::NotAKey | LeakFinding::Unknown => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_ours_are_true_positives_and_the_rest_false() {
        let id = || "key_1".to_owned();
        assert_eq!(
            LeakFinding::Revoked { key_id: id() }.label(),
            LeakLabel::TruePositive
        );
        assert_eq!(
            LeakFinding::AlreadyDead { key_id: id() }.label(),
            LeakLabel::TruePositive
        );
        assert_eq!(LeakFinding::Unknown.label(), LeakLabel::FalsePositive);
        assert_eq!(LeakFinding::NotAKey.label(), LeakLabel::FalsePositive);
        assert_eq!(LeakLabel::TruePositive.as_str(), "true_positive");
        assert_eq!(LeakFinding::NotAKey.key_id(), None);
    }
}
