//! Validation of every field a caller can send, as pure functions that collect
//! [`FieldViolation`]s. The API layer turns a non-empty list into INVALID_ARGUMENT naming
//! each field; nothing is written when any field is wrong.

use std::collections::BTreeMap;

use super::Micros;
use super::limits::{self, MAX_BUDGET_MICROS, MAX_LIMIT, RateLimit};
use super::scopes::{self, MAX_SCOPES};

pub const MAX_ID_LEN: usize = 128;
pub const MAX_WORKSPACE_ID_LEN: usize = 64;
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_METADATA_ENTRIES: usize = 16;
pub const MAX_METADATA_KEY_LEN: usize = 64;
pub const MAX_METADATA_VALUE_LEN: usize = 512;
pub const MAX_REASON_LEN: usize = 512;
pub const MAX_PERMISSIONS: usize = 64;
pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const MAX_PAGE_TOKEN_LEN: usize = 512;
/// The most requests one VerifyKey may count for.
pub const MAX_COST: u64 = 1_000_000;
/// The most tokens or spend one ReportUsage may carry.
pub const MAX_USAGE: u64 = 1_000_000_000_000;
/// The furthest in the future an expiry may be set (ten years).
pub const MAX_EXPIRY_AHEAD: Micros = 10 * 366 * 24 * 3600 * super::MICROS_PER_SECOND;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Collects the violations of one request.
#[derive(Debug, Default)]
pub struct Violations(pub Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Workspace ids: 1 to 64 of `A-Z a-z 0-9 _ -`.
    pub fn workspace_id(&mut self, field: &str, s: &str) {
        if s.is_empty() {
            self.add(field, "is required");
        } else if s.len() > MAX_WORKSPACE_ID_LEN
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            self.add(
                field,
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
            );
        }
    }

    /// Principal ids (users, service accounts, actors): 1 to 128 printable ASCII
    /// characters without spaces (e.g. `user_123`, `alice@example.com`).
    pub fn principal_id(&mut self, field: &str, s: &str) {
        if s.is_empty() {
            self.add(field, "is required");
        } else if s.len() > MAX_ID_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            self.add(
                field,
                "must be 1 to 128 printable ASCII characters without spaces",
            );
        }
    }

    /// An audit action as the log writes them (`key.revoke`, `access_group.create`): 1 to
    /// 64 characters of a-z, '.' and '_'.
    pub fn audit_action(&mut self, field: &str, s: &str) {
        if s.is_empty() {
            self.add(field, "is required");
        } else if s.len() > 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
        {
            self.add(
                field,
                "must be an action of the audit log (1 to 64 characters of a-z, '.' and '_', e.g. key.revoke)",
            );
        }
    }

    pub fn key_id(&mut self, field: &str, s: &str) {
        if s.is_empty() {
            self.add(field, "is required");
        } else if !super::ids::is_key_id(s) {
            self.add(
                field,
                "is not a key id (key_ followed by 24 letters or digits)",
            );
        }
    }

    /// Display names: 1 to 128 characters, no control characters, no format characters,
    /// not only whitespace.
    ///
    /// Format characters (Unicode category Cf: bidi overrides and isolates such as
    /// U+202E, zero-width characters, U+FEFF, the soft hyphen, tag characters) draw
    /// nothing or reorder what follows, so a name holding one shows as something else in
    /// every listing ("\u{202e}gnp.exe" reads "exe.png"). Names exist to be read by
    /// people, so none is accepted; this includes the zero-width joiners some scripts and
    /// emoji sequences use. Free text (reasons, metadata values) is not a name and keeps
    /// them.
    pub fn name(&mut self, field: &str, s: &str) {
        if s.trim().is_empty() {
            self.add(field, "is required");
        } else {
            let reported = self.0.len();
            self.text(field, s, MAX_NAME_LEN);
            // One violation per field: the length and control characters come first.
            if self.0.len() == reported && s.chars().any(is_format_char) {
                self.add(
                    field,
                    "must not contain invisible format characters (Unicode category Cf, e.g. U+202E or U+200B)",
                );
            }
        }
    }

    /// Free text (reasons, metadata values): bounded, no control characters.
    pub fn text(&mut self, field: &str, s: &str, max_chars: usize) {
        if s.chars().count() > max_chars {
            self.add(field, format!("must be at most {max_chars} characters"));
        } else if s.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
    }

    /// Rate limits: at most one per unit and window, each from 1 to [`MAX_LIMIT`].
    /// Returns them normalized.
    pub fn rate_limits(&mut self, field: &str, given: &[RateLimit]) -> Vec<RateLimit> {
        for (i, l) in given.iter().enumerate() {
            if l.limit == 0 || l.limit > MAX_LIMIT {
                self.add(
                    format!("{field}[{i}].limit"),
                    format!("must be from 1 to {MAX_LIMIT}"),
                );
            }
            if given[..i]
                .iter()
                .any(|o| o.unit == l.unit && o.window == l.window)
            {
                self.add(
                    format!("{field}[{i}]"),
                    format!("repeats the {} limit", l.name()),
                );
            }
        }
        limits::normalized(given.to_vec())
    }

    /// A budget in micro-units: from 1 to [`MAX_BUDGET_MICROS`].
    pub fn budget(&mut self, field: &str, micros: u64) {
        if micros == 0 || micros > MAX_BUDGET_MICROS {
            self.add(
                field,
                format!("must be from 1 to {MAX_BUDGET_MICROS} (leave it unset for no budget)"),
            );
        }
    }

    /// Returns the scopes sorted and de-duplicated.
    pub fn scopes(&mut self, field: &str, given: &[String]) -> Vec<String> {
        self.scope_list(field, given, MAX_SCOPES)
    }

    pub fn permissions(&mut self, field: &str, given: &[String]) -> Vec<String> {
        self.scope_list(field, given, MAX_PERMISSIONS)
    }

    fn scope_list(&mut self, field: &str, given: &[String], max: usize) -> Vec<String> {
        if given.len() > max {
            self.add(field, format!("must hold at most {max} entries"));
            return Vec::new();
        }
        for (i, s) in given.iter().enumerate() {
            if !scopes::is_scope(s) {
                self.add(
                    format!("{field}[{i}]"),
                    "must be 1 to 64 characters: a lowercase letter, then lowercase letters, digits, '_', '.', ':' or '-'",
                );
            }
        }
        let mut out = given.to_vec();
        out.sort();
        out.dedup();
        out
    }

    pub fn metadata(&mut self, field: &str, given: &BTreeMap<String, String>) {
        if given.len() > MAX_METADATA_ENTRIES {
            self.add(
                field,
                format!("must hold at most {MAX_METADATA_ENTRIES} entries"),
            );
            return;
        }
        for (k, v) in given {
            let key_ok = !k.is_empty()
                && k.len() <= MAX_METADATA_KEY_LEN
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !key_ok {
                self.add(
                    format!("{field}[{}]", printable_prefix(k)),
                    "keys must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.' and '-'",
                );
            } else {
                self.text(&format!("{field}[{k}]"), v, MAX_METADATA_VALUE_LEN);
            }
        }
    }

    /// Returns the page size to use: 0 means the default.
    pub fn page_size(&mut self, field: &str, given: i32) -> u32 {
        match u32::try_from(given) {
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) if n <= MAX_PAGE_SIZE => n,
            _ => {
                self.add(field, format!("must be between 0 and {MAX_PAGE_SIZE}"));
                DEFAULT_PAGE_SIZE
            }
        }
    }

    /// An expiry must lie in the future, at most ten years ahead.
    pub fn expiry(&mut self, field: &str, at: Micros, now: Micros) {
        if at <= now {
            self.add(field, "must be in the future");
        } else if at - now > MAX_EXPIRY_AHEAD {
            self.add(field, "must be at most ten years ahead");
        }
    }
}

/// Unicode general category Cf (format), from the `unicode-properties` tables (the
/// Unicode version they name, `unicode_properties::UNICODE_VERSION`).
fn is_format_char(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.general_category() == GeneralCategory::Format
}

/// A short, printable rendering of untrusted text for use inside a field path: short
/// enough (8 characters) never to echo a secret pasted into the wrong field.
fn printable_prefix(s: &str) -> String {
    s.chars()
        .take(8)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_field_is_named() {
        let mut v = Violations::default();
        v.workspace_id("workspace_id", "");
        v.workspace_id("workspace_id", "a b");
        v.principal_id("owner.id", &"x".repeat(129));
        v.name("name", "   ");
        v.name("name", "bell\u{7}");
        v.key_id("key_id", "key_nope");
        let fields: Vec<_> = v.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "workspace_id",
                "workspace_id",
                "owner.id",
                "name",
                "name",
                "key_id"
            ]
        );
    }

    /// Format characters (category Cf) draw nothing, or reorder what follows: a name
    /// holding one reads as something else in a listing.
    #[test]
    fn names_with_invisible_format_characters_are_refused() {
        for name in [
            "\u{202e}gnp.exe",
            "ci\u{200b}key",
            "\u{feff}ci key",
            "ci\u{2066}key\u{2069}",
            "ci\u{2067}key",
            "ci\u{2068}key",
            "ci\u{ad}key",
            "ci\u{200d}key",
            "tag\u{e0041}",
            "\u{200b}",
        ] {
            let mut v = Violations::default();
            v.name("name", name);
            let fields: Vec<_> = v.0.iter().map(|f| f.field.as_str()).collect();
            assert_eq!(fields, ["name"], "{name:?}");
            assert!(
                v.0[0].description.contains("format characters"),
                "{name:?}: {}",
                v.0[0].description
            );
        }
        // Visible text in any script, symbols and emoji stay names.
        for name in [
            "clé 🔑 ключ 鍵",
            "مفتاح",
            "ci-key (prod) №2",
            "é".repeat(128).as_str(),
        ] {
            let mut v = Violations::default();
            v.name("name", name);
            assert!(v.is_empty(), "{name:?}: {:?}", v.0);
        }
    }

    #[test]
    fn scopes_are_checked_sorted_and_deduplicated() {
        let mut v = Violations::default();
        let out = v.scopes("scopes", &["write".into(), "read".into(), "write".into()]);
        assert!(v.is_empty());
        assert_eq!(out, ["read", "write"]);
        v.scopes("scopes", &["read".into(), "BAD".into()]);
        assert_eq!(v.0[0].field, "scopes[1]");
        let mut v = Violations::default();
        v.scopes("scopes", &vec!["a".to_owned(); 33]);
        assert_eq!(v.0[0].field, "scopes");
    }

    #[test]
    fn metadata_bounds_are_enforced() {
        let mut v = Violations::default();
        let mut m = BTreeMap::new();
        m.insert("team".to_owned(), "ml".to_owned());
        v.metadata("metadata", &m);
        assert!(v.is_empty());
        m.insert("bad key".to_owned(), "x".to_owned());
        m.insert("long".to_owned(), "x".repeat(513));
        v.metadata("metadata", &m);
        let fields: Vec<_> = v.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["metadata[bad?key]", "metadata[long]"]);
    }

    #[test]
    fn page_sizes_default_and_bound() {
        let mut v = Violations::default();
        assert_eq!(v.page_size("page_size", 0), DEFAULT_PAGE_SIZE);
        assert_eq!(v.page_size("page_size", 1000), 1000);
        assert!(v.is_empty());
        v.page_size("page_size", -1);
        v.page_size("page_size", 1001);
        assert_eq!(v.0.len(), 2);
    }

    #[test]
    fn expiries_must_be_ahead_but_not_too_far() {
        let mut v = Violations::default();
        v.expiry("expires_at", 11, 10);
        assert!(v.is_empty());
        v.expiry("expires_at", 10, 10);
        v.expiry("expires_at", 10 + MAX_EXPIRY_AHEAD + 1, 10);
        assert_eq!(v.0.len(), 2);
    }
}
