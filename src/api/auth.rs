//! Caller authentication: every RPC carries `authorization: Bearer <token>`. Tokens are
//! configured as SHA-256 hashes with roles; the presented token is hashed and compared in
//! constant time against every configured hash. An API key is never a caller credential:
//! it is not a configured token, so it is UNAUTHENTICATED like any other unknown string.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use super::error::refused;
use crate::domain::base62;
use crate::domain::key_format::KeyHash;
use crate::domain::refusal::{Reason, Refusal};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// KeyService: issue, list, update, rotate, revoke, delete, audit.
    Admin,
    /// VerifyService (VerifyKey, ReportUsage), and Envoy's ext_authz Check.
    Verifier,
    /// RevocationService: WatchRevocations.
    Edge,
    /// ProviderKeyService.ResolveProviderKey, and nothing else.
    ProviderResolver,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Verifier => "verifier",
            Role::Edge => "edge",
            Role::ProviderResolver => "provider-resolver",
        }
    }
}

#[derive(Clone)]
pub struct TokenEntry {
    name: Arc<str>,
    hash: KeyHash,
    roles: Arc<[Role]>,
}

impl TokenEntry {
    pub fn new(name: String, hash: KeyHash, roles: Vec<Role>) -> Self {
        TokenEntry {
            name: name.into(),
            hash,
            roles: roles.into(),
        }
    }
}

/// The configured caller tokens.
pub struct CallerTokens {
    entries: Vec<TokenEntry>,
}

impl fmt::Debug for CallerTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (&e.name, &e.roles)))
            .finish()
    }
}

/// The authenticated caller, put into each request's extensions: the token's name.
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<str>);

impl CallerTokens {
    pub fn new(entries: Vec<TokenEntry>) -> Self {
        CallerTokens { entries }
    }

    /// These tokens and `more`.
    pub fn extended(&self, more: Vec<TokenEntry>) -> CallerTokens {
        let mut entries = self.entries.clone();
        entries.extend(more);
        CallerTokens { entries }
    }

    pub fn authorize(&self, metadata: &MetadataMap, role: Role) -> Result<Caller, Status> {
        let entry = self.find(metadata)?;
        if entry.roles.contains(&role) {
            Ok(Caller(entry.name.clone()))
        } else {
            Err(role_missing(&entry.name, role))
        }
    }

    /// Who the caller is and what roles it holds, whatever it asks for.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Authenticated, Status> {
        let entry = self.find(metadata)?;
        Ok(Authenticated {
            name: entry.name.clone(),
            roles: entry.roles.clone(),
        })
    }

    /// The entry whose hash matches the presented token.
    fn find(&self, metadata: &MetadataMap) -> Result<&TokenEntry, Status> {
        let token = bearer(metadata).ok_or_else(|| {
            refused(Refusal::new(
                Reason::CallerTokenMissing,
                "missing `authorization: Bearer <token>` metadata",
            ))
        })?;
        let presented = KeyHash::of(token);
        // Compare against every entry, without stopping at the first match.
        let mut found: Option<&TokenEntry> = None;
        for entry in &self.entries {
            if entry.hash.ct_eq(&presented) {
                found = Some(entry);
            }
        }
        found.ok_or_else(|| {
            refused(Refusal::new(
                Reason::CallerTokenUnknown,
                "unknown caller token",
            ))
        })
    }
}

/// An authenticated caller and its roles, for services whose methods need different
/// roles (put into the request's extensions by [`Authenticate`]).
#[derive(Clone, Debug)]
pub struct Authenticated {
    name: Arc<str>,
    roles: Arc<[Role]>,
}

impl Authenticated {
    pub fn require(&self, role: Role) -> Result<Caller, Status> {
        if self.roles.contains(&role) {
            Ok(Caller(self.name.clone()))
        } else {
            Err(role_missing(&self.name, role))
        }
    }
}

fn role_missing(name: &str, role: Role) -> Status {
    refused(
        Refusal::new(
            Reason::CallerRoleMissing,
            format!(
                "caller `{name}` lacks the `{}` role this call needs",
                role.as_str()
            ),
        )
        .with("role", role.as_str()),
    )
}

/// A request that reached a service with no caller in its extensions: only when the
/// service was mounted without its interceptor, so the caller is as good as missing.
pub(crate) fn no_caller() -> Status {
    refused(Refusal::new(
        Reason::CallerTokenMissing,
        "no authenticated caller",
    ))
}

/// The role check of a method behind [`Authenticate`].
pub fn require<T>(request: &Request<T>, role: Role) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Authenticated>()
        .ok_or_else(no_caller)?
        .require(role)
}

/// A tonic interceptor that admits any known caller; each method then checks its role
/// with [`require`].
#[derive(Clone)]
pub struct Authenticate {
    tokens: Arc<CallerTokens>,
}

impl Authenticate {
    pub fn new(tokens: Arc<CallerTokens>) -> Self {
        Authenticate { tokens }
    }
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let who = self.tokens.authenticate(request.metadata())?;
        request.extensions_mut().insert(who);
        Ok(request)
    }
}

fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A tonic interceptor that admits only callers holding `role`.
#[derive(Clone)]
pub struct RequireRole {
    tokens: Arc<CallerTokens>,
    role: Role,
}

impl RequireRole {
    pub fn new(tokens: Arc<CallerTokens>, role: Role) -> Self {
        RequireRole { tokens, role }
    }
}

impl tonic::service::Interceptor for RequireRole {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.tokens.authorize(request.metadata(), self.role)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// A fresh random caller token (for dev mode and for operators: `keywarden token`).
pub fn generate_token() -> Result<String, getrandom::Error> {
    Ok(format!(
        "kwt_{}",
        base62::random_string(&mut getrandom::SysRng, 40)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> CallerTokens {
        CallerTokens::new(vec![
            TokenEntry::new(
                "console".into(),
                KeyHash::of("admin-token"),
                vec![Role::Admin],
            ),
            TokenEntry::new(
                "gateway".into(),
                KeyHash::of("verify-token"),
                vec![Role::Verifier],
            ),
        ])
    }

    fn md(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn roles_are_enforced() {
        let t = tokens();
        assert_eq!(
            &*t.authorize(&md("Bearer admin-token"), Role::Admin)
                .unwrap()
                .0,
            "console"
        );
        assert_eq!(
            &*t.authorize(&md("bearer verify-token"), Role::Verifier)
                .unwrap()
                .0,
            "gateway"
        );
        let denied = t
            .authorize(&md("Bearer verify-token"), Role::Admin)
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn missing_or_unknown_tokens_are_unauthenticated() {
        let t = tokens();
        for m in [
            MetadataMap::new(),
            md("Bearer nope"),
            md("Basic admin-token"),
            md("Bearer "),
        ] {
            assert_eq!(
                t.authorize(&m, Role::Admin).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
    }

    #[test]
    fn debug_shows_names_not_hashes() {
        let s = format!("{:?}", tokens());
        assert!(s.contains("console"));
        assert!(!s.contains(&KeyHash::of("admin-token").to_hex()));
    }
}
