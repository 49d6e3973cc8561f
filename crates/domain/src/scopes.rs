//! Scopes and their implications.
//!
//! A scope is a short string (`read`, `knowledge:read`, `agents:query`). A deployment may
//! configure implications (`admin` implies `write`, `write` implies `read`); they are
//! transitive. The default is none: every scope stands for itself.

use std::collections::{BTreeSet, HashMap};

pub const MAX_SCOPE_LEN: usize = 64;
pub const MAX_SCOPES: usize = 32;

/// Whether `s` is a well-formed scope: 1 to 64 characters, starting with a lowercase
/// letter, then lowercase letters, digits and `_ . : -`.
pub fn is_scope(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | ':' | '-')
        })
        && s.len() <= MAX_SCOPE_LEN
}

/// The deployment's scope implications, closed transitively at construction.
#[derive(Clone, Debug, Default)]
pub struct ScopeImplications {
    /// scope -> every scope it implies (transitively), itself excluded.
    closure: HashMap<String, BTreeSet<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid scope implication: {0:?} is not a well-formed scope")]
pub struct InvalidImplication(pub String);

impl ScopeImplications {
    pub fn new(direct: &HashMap<String, Vec<String>>) -> Result<Self, InvalidImplication> {
        for (scope, implied) in direct {
            if let Some(bad) = std::iter::once(scope).chain(implied).find(|s| !is_scope(s)) {
                return Err(InvalidImplication(bad.clone()));
            }
        }
        let mut closure = HashMap::new();
        for scope in direct.keys() {
            let mut seen = BTreeSet::new();
            let mut stack: Vec<&String> = direct[scope].iter().collect();
            while let Some(next) = stack.pop() {
                if next != scope && seen.insert(next.clone()) {
                    stack.extend(direct.get(next).into_iter().flatten());
                }
            }
            closure.insert(scope.clone(), seen);
        }
        Ok(ScopeImplications { closure })
    }

    /// Every scope that `granted` holds, directly or by implication.
    pub fn expand<'a>(&self, granted: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for scope in granted {
            out.insert(scope.clone());
            if let Some(implied) = self.closure.get(scope) {
                out.extend(implied.iter().cloned());
            }
        }
        out
    }

    /// The scopes of `wanted` that `held` does not cover, in `wanted`'s order.
    pub fn missing<'a>(&self, held: &[String], wanted: &'a [String]) -> Vec<&'a str> {
        let have = self.expand(held);
        wanted
            .iter()
            .filter(|s| !have.contains(*s))
            .map(String::as_str)
            .collect()
    }
}

/// A key's scopes with their implications expanded once, so the hot path checks a
/// required scope with one binary search. A sorted boxed slice rather than a set: every
/// cached key holds one, and a `BTreeSet`'s first node alone is some 280 bytes, where
/// a key holds a handful of scopes. `None` when nothing is implied beyond the granted
/// scopes themselves (most keys): those are then checked in place, and the key pays one
/// word for the expanded set it does not need (boxed, a thin pointer, where the slice
/// itself would take two).
#[derive(Clone, Debug, Default)]
pub struct EffectiveScopes(Option<Box<Expanded>>);

/// Granted scopes and all they imply, sorted, without repeats.
#[derive(Clone, Debug)]
struct Expanded(Box<[Box<str>]>);

impl EffectiveScopes {
    pub fn new(implications: &ScopeImplications, granted: &[String]) -> Self {
        // `expand` yields them sorted and without repeats.
        let expanded = implications.expand(granted);
        if expanded.iter().all(|s| granted.contains(s)) {
            return EffectiveScopes(None);
        }
        EffectiveScopes(Some(Box::new(Expanded(
            expanded.into_iter().map(String::into_boxed_str).collect(),
        ))))
    }

    /// Whether a key granted `granted` (the scopes this was made from) holds every scope
    /// of `required`.
    pub fn covers(&self, granted: &[String], required: &[String]) -> bool {
        match &self.0 {
            None => required.iter().all(|s| granted.contains(s)),
            Some(expanded) => required.iter().all(|s| {
                expanded
                    .0
                    .binary_search_by(|held| held.as_ref().cmp(s.as_str()))
                    .is_ok()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product_implications() -> ScopeImplications {
        let mut m = HashMap::new();
        m.insert("admin".to_owned(), vec!["write".to_owned()]);
        m.insert("write".to_owned(), vec!["read".to_owned()]);
        ScopeImplications::new(&m).unwrap()
    }

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scope_shape_is_checked() {
        for good in ["read", "knowledge:read", "agents:query", "a", "x.y-z_1"] {
            assert!(is_scope(good), "{good}");
        }
        for bad in [
            "",
            "Read",
            "1read",
            "read write",
            "réad",
            "read\n",
            &"a".repeat(65),
        ] {
            assert!(!is_scope(bad), "{bad:?}");
        }
    }

    #[test]
    fn implications_are_transitive() {
        let imp = product_implications();
        let admin = EffectiveScopes::new(&imp, &v(&["admin"]));
        assert!(admin.covers(&v(&["admin"]), &v(&["read", "write", "admin"])));
        let write = EffectiveScopes::new(&imp, &v(&["write"]));
        assert!(write.covers(&v(&["write"]), &v(&["read"])));
        assert!(!write.covers(&v(&["write"]), &v(&["admin"])));
    }

    #[test]
    fn without_implications_every_scope_stands_alone() {
        let imp = ScopeImplications::default();
        let granted = v(&["admin"]);
        let admin = EffectiveScopes::new(&imp, &granted);
        assert!(!admin.covers(&granted, &v(&["read"])));
        assert!(admin.covers(&granted, &v(&["admin"])));
        assert!(admin.covers(&granted, &[]));
    }

    #[test]
    fn cycles_terminate() {
        let mut m = HashMap::new();
        m.insert("a".to_owned(), vec!["b".to_owned()]);
        m.insert("b".to_owned(), vec!["a".to_owned()]);
        let imp = ScopeImplications::new(&m).unwrap();
        assert!(EffectiveScopes::new(&imp, &v(&["a"])).covers(&v(&["a"]), &v(&["a", "b"])));
    }

    #[test]
    fn missing_names_what_the_holder_lacks() {
        let imp = product_implications();
        assert_eq!(
            imp.missing(&v(&["write"]), &v(&["read", "admin", "x"])),
            vec!["admin", "x"]
        );
        assert!(imp.missing(&v(&["admin"]), &v(&["read"])).is_empty());
    }

    /// A scope: often one the product's implications name, otherwise any.
    fn scope() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("admin".to_owned()),
            Just("write".to_owned()),
            Just("read".to_owned()),
            "[a-f][a-z:]{0,6}",
        ]
    }

    proptest::proptest! {
        /// Whatever the order and repeats of the granted scopes, a key covers exactly
        /// what it was granted plus what that implies, whether anything is implied
        /// beyond them (the sorted lookup) or not (the granted scopes in place).
        #[test]
        fn covers_exactly_the_granted_scopes_and_their_implications(
            granted in proptest::collection::vec(scope(), 0..32),
            asked in proptest::collection::vec(scope(), 0..8),
        ) {
            let imp = product_implications();
            let effective = EffectiveScopes::new(&imp, &granted);
            let expected = imp.expand(&granted);
            for scope in granted.iter().chain(&asked) {
                proptest::prop_assert_eq!(
                    effective.covers(&granted, std::slice::from_ref(scope)),
                    expected.contains(scope),
                    "{}", scope
                );
            }
            proptest::prop_assert_eq!(
                effective.covers(&granted, &asked),
                asked.iter().all(|s| expected.contains(s))
            );
        }
    }

    #[test]
    fn malformed_implications_are_refused() {
        let mut m = HashMap::new();
        m.insert("admin".to_owned(), vec!["Not A Scope".to_owned()]);
        assert!(ScopeImplications::new(&m).is_err());
    }
}
