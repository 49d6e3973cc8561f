//! Provider keys (BYOK): which providers, what a stored record holds (sealed, never the
//! key), and the shape a provider's key must have.

use std::fmt;

use super::Micros;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    Anthropic,
    OpenAi,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::OpenAi => "openai",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "anthropic" => Some(Provider::Anthropic),
            "openai" => Some(Provider::OpenAi),
            _ => None,
        }
    }

    /// What every key of this provider starts with.
    pub fn prefix(self) -> &'static str {
        match self {
            Provider::Anthropic => "sk-ant-",
            Provider::OpenAi => "sk-",
        }
    }

    /// The provider a key's prefix names: the longest prefix it starts with (OpenAI's
    /// `sk-` is a prefix of Anthropic's `sk-ant-`, so a key of Anthropic's starts with
    /// both).
    pub fn of_key(key: &str) -> Option<Provider> {
        [Provider::Anthropic, Provider::OpenAi]
            .into_iter()
            .filter(|p| key.starts_with(p.prefix()))
            .max_by_key(|p| p.prefix().len())
    }
}

/// The shortest and longest provider key accepted.
pub const MIN_PROVIDER_KEY_LEN: usize = 20;
pub const MAX_PROVIDER_KEY_LEN: usize = 256;

/// Why a presented provider key is refused (the key itself is never part of the reason).
pub fn shape_error(provider: Provider, key: &str) -> Option<String> {
    if key.is_empty() {
        return Some("is required".into());
    }
    if key.len() > MAX_PROVIDER_KEY_LEN || key.len() < MIN_PROVIDER_KEY_LEN {
        return Some(format!(
            "must be {MIN_PROVIDER_KEY_LEN} to {MAX_PROVIDER_KEY_LEN} characters"
        ));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Some("must hold only letters, digits, '-' and '_'".into());
    }
    match Provider::of_key(key) {
        Some(named) if named == provider => None,
        // Pasted into the wrong provider: say which one it is.
        Some(other) => Some(format!(
            "is an {} key (it starts with `{}`), not an {} key",
            other.as_str(),
            other.prefix(),
            provider.as_str()
        )),
        None => Some(format!(
            "is not a {} key (they start with `{}`)",
            provider.as_str(),
            provider.prefix()
        )),
    }
}

/// The last four characters, all a response ever shows of a provider key.
pub fn last_four(key: &str) -> String {
    let start = key.len().saturating_sub(4);
    key.get(start..).unwrap_or_default().to_owned()
}

/// What binds a sealed secret to its record: a copy in another row does not open.
pub fn associated_data(workspace_id: &str, provider: Provider, record_id: &str) -> Vec<u8> {
    format!("{workspace_id}|{}|{record_id}", provider.as_str()).into_bytes()
}

/// A stored provider key: sealed, never in the clear.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderKeyRecord {
    pub record_id: String,
    pub workspace_id: String,
    pub provider: Provider,
    pub last_four: String,
    pub kek_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at: Micros,
    pub updated_at: Micros,
}

impl fmt::Debug for ProviderKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderKeyRecord")
            .field("record_id", &self.record_id)
            .field("workspace_id", &self.workspace_id)
            .field("provider", &self.provider)
            .field("last_four", &self.last_four)
            .field("kek_version", &self.kek_version)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_without_echoing_the_key() {
        let good = "sk-ant-api03-abcdefghijklmnop_QRS-tu";
        assert_eq!(shape_error(Provider::Anthropic, good), None);
        assert_eq!(
            shape_error(Provider::OpenAi, "sk-proj-abcdefghijklmnopqrst"),
            None
        );
        let wrong = shape_error(Provider::Anthropic, "sk-proj-abcdefghijklmnopqrst").unwrap();
        assert!(
            wrong.contains("anthropic") && !wrong.contains("proj"),
            "{wrong}"
        );
        assert!(shape_error(Provider::OpenAi, "").is_some());
        assert!(shape_error(Provider::OpenAi, "sk-short").is_some());
        assert!(shape_error(Provider::OpenAi, &format!("sk-{}", "a".repeat(300))).is_some());
        assert!(shape_error(Provider::OpenAi, "sk-abcdefghijklmnopqrsté").is_some());
        assert!(shape_error(Provider::OpenAi, "sk-abcdefghij klmnopqrst").is_some());
        assert_eq!(last_four(good), "S-tu");
        let record = ProviderKeyRecord {
            record_id: "pk_1".into(),
            workspace_id: "ws".into(),
            provider: Provider::Anthropic,
            last_four: "S-tu".into(),
            kek_version: 1,
            wrapped_dek: vec![1, 2, 3],
            ciphertext: vec![4, 5, 6],
            created_at: 0,
            updated_at: 0,
        };
        assert!(!format!("{record:?}").contains("[4, 5, 6]"));
    }

    #[test]
    fn a_key_pasted_into_the_other_provider_is_refused_naming_both() {
        // OpenAI's prefix `sk-` is a prefix of Anthropic's: the longer one decides.
        let anthropic = "sk-ant-api03-abcdefghijklmnop_QRS-tu";
        assert_eq!(Provider::of_key(anthropic), Some(Provider::Anthropic));
        let why = shape_error(Provider::OpenAi, anthropic).unwrap();
        assert!(
            why.contains("anthropic") && why.contains("openai") && !why.contains("QRS"),
            "{why}"
        );
        let openai = "sk-proj-abcdefghijklmnopqrst";
        assert_eq!(Provider::of_key(openai), Some(Provider::OpenAi));
        let why = shape_error(Provider::Anthropic, openai).unwrap();
        assert!(why.contains("anthropic") && why.contains("openai"), "{why}");
        assert_eq!(Provider::of_key("pk-abcdefghijklmnopqrst"), None);
    }
}
