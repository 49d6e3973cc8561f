//! What the ext_authz endpoint reads from a proxied request and what it writes back, as
//! validated at start: the credential headers, the path-prefix → scopes routes, the
//! resource header, and the names of the headers passed upstream.
//!
//! Header names are checked here, once, so that a typo (`X-Api-Key`, `x api key`) is a
//! start-up error rather than a credential that silently never matches: Envoy hands
//! header names to the authorization service lower-cased.

use std::collections::HashMap;

use crate::domain::scopes::{MAX_SCOPES, is_scope};

/// The longest path prefix a route may name.
pub const MAX_PREFIX_LEN: usize = 256;
/// The most routes a deployment may configure (each request is matched against all).
pub const MAX_ROUTES: usize = 256;
/// The most credential headers (each request looks them up in order).
pub const MAX_KEY_HEADERS: usize = 8;

/// The validated `[ext_authz]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtAuthzSettings {
    /// Whether `envoy.service.auth.v3.Authorization` is served at all.
    pub enabled: bool,
    /// Where the key is looked for, in order; the first header present is the one used.
    /// `authorization` carries `Bearer <key>`; any other header carries the bare key.
    pub key_headers: Vec<String>,
    /// The scopes each path prefix requires (longest prefix wins).
    pub routes: ScopeRoutes,
    /// The header naming the resource (model) the request is for; `None`: no resource.
    pub resource_header: Option<String>,
    /// Upstream headers carrying the verified key's id and workspace.
    pub key_id_header: String,
    pub workspace_id_header: String,
}

impl Default for ExtAuthzSettings {
    fn default() -> Self {
        ExtAuthzSettings {
            enabled: true,
            key_headers: vec!["authorization".to_owned(), "x-api-key".to_owned()],
            routes: ScopeRoutes::default(),
            resource_header: None,
            key_id_header: "x-keywarden-key-id".to_owned(),
            workspace_id_header: "x-keywarden-workspace-id".to_owned(),
        }
    }
}

/// Path prefix → required scopes, longest prefix first. Prefixes are kept lower-cased
/// and requests are matched lower-cased, so `/V1/Admin` needs what `/v1/admin` needs
/// even when the upstream treats paths case-insensitively.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeRoutes {
    routes: Vec<(String, Vec<String>)>,
}

impl ScopeRoutes {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The scopes a request for `path` (already normalized, see
    /// `super::attributes::normalized_path`) requires: those of the longest matching prefix, or
    /// none when no prefix matches.
    pub fn required_for(&self, path: &str) -> &[String] {
        let path = path.to_ascii_lowercase();
        self.routes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(&[], |(_, scopes)| scopes.as_slice())
    }
}

/// Whether `name` is an HTTP header name as Envoy passes it: a non-empty RFC 9110 token
/// in lower case, at most 128 characters (pseudo-headers such as `:path` are not).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// The raw section, as `crate::config` reads it.
pub struct ExtAuthzInput<'a> {
    pub enabled: bool,
    pub key_headers: &'a [String],
    pub path_scopes: &'a HashMap<String, Vec<String>>,
    pub resource_header: Option<&'a str>,
    pub key_id_header: &'a str,
    pub workspace_id_header: &'a str,
}

impl ExtAuthzSettings {
    /// Validates the section; the error names the offending setting.
    pub fn new(input: ExtAuthzInput<'_>) -> Result<ExtAuthzSettings, String> {
        if input.key_headers.is_empty() || input.key_headers.len() > MAX_KEY_HEADERS {
            return Err(format!(
                "key_headers must name 1 to {MAX_KEY_HEADERS} headers"
            ));
        }
        let mut seen: Vec<&str> = Vec::new();
        for (i, name) in input.key_headers.iter().enumerate() {
            check_header(&format!("key_headers[{i}]"), name)?;
            if seen.contains(&name.as_str()) {
                return Err(format!("key_headers[{i}]: {name:?} is listed twice"));
            }
            seen.push(name);
        }
        let resource_header = input
            .resource_header
            .map(str::trim)
            .filter(|h| !h.is_empty());
        let mut written: Vec<(&str, &str)> = vec![
            ("key_id_header", input.key_id_header),
            ("workspace_id_header", input.workspace_id_header),
        ];
        if let Some(h) = resource_header {
            written.push(("resource_header", h));
        }
        for (field, name) in &written {
            check_header(field, name)?;
            if seen.contains(name) {
                return Err(format!(
                    "{field}: {name:?} is already used by another ext_authz header setting"
                ));
            }
            seen.push(name);
        }
        if input.path_scopes.len() > MAX_ROUTES {
            return Err(format!(
                "path_scopes may hold at most {MAX_ROUTES} prefixes"
            ));
        }
        let mut routes = Vec::with_capacity(input.path_scopes.len());
        for (prefix, scopes) in input.path_scopes {
            let lower = prefix.to_ascii_lowercase();
            if !is_prefix(prefix) {
                return Err(format!(
                    "path_scopes: {prefix:?} must start with '/' and be at most \
                     {MAX_PREFIX_LEN} printable ASCII characters without '?', '#', '%' \
                     or '\\\\'"
                ));
            }
            if routes.iter().any(|(p, _)| *p == lower) {
                return Err(format!(
                    "path_scopes: {prefix:?} is listed twice (prefixes match regardless of case)"
                ));
            }
            if scopes.len() > MAX_SCOPES {
                return Err(format!(
                    "path_scopes[{prefix:?}]: at most {MAX_SCOPES} scopes"
                ));
            }
            if let Some(bad) = scopes.iter().find(|s| !is_scope(s)) {
                return Err(format!(
                    "path_scopes[{prefix:?}]: {bad:?} is not a well-formed scope"
                ));
            }
            let mut scopes = scopes.clone();
            scopes.sort();
            scopes.dedup();
            routes.push((lower, scopes));
        }
        // Longest first, so the first match is the longest prefix; ties cannot happen
        // (equal prefixes are refused above).
        routes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(ExtAuthzSettings {
            enabled: input.enabled,
            key_headers: input.key_headers.to_vec(),
            routes: ScopeRoutes { routes },
            resource_header: resource_header.map(str::to_owned),
            key_id_header: input.key_id_header.to_owned(),
            workspace_id_header: input.workspace_id_header.to_owned(),
        })
    }
}

fn check_header(field: &str, name: &str) -> Result<(), String> {
    if is_header_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{field}: {name:?} is not a lower-case HTTP header name"
        ))
    }
}

/// A route prefix: an absolute path in the form requests are matched in (no query,
/// fragment, escapes or backslashes, which normalization removes or refuses).
fn is_prefix(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= MAX_PREFIX_LEN
        && p.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%' | b'\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(
        key_headers: &'a [String],
        path_scopes: &'a HashMap<String, Vec<String>>,
    ) -> ExtAuthzInput<'a> {
        ExtAuthzInput {
            enabled: true,
            key_headers,
            path_scopes,
            resource_header: Some("x-model"),
            key_id_header: "x-keywarden-key-id",
            workspace_id_header: "x-keywarden-workspace-id",
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_longest_matching_prefix_decides() {
        let mut map = HashMap::new();
        map.insert("/v1/".to_owned(), strings(&["read"]));
        map.insert("/v1/admin".to_owned(), strings(&["admin"]));
        map.insert("/v1/admin/public".to_owned(), vec![]);
        let headers = strings(&["authorization"]);
        let s = ExtAuthzSettings::new(input(&headers, &map)).unwrap();
        assert_eq!(s.routes.required_for("/v1/chat"), ["read"]);
        assert_eq!(s.routes.required_for("/v1/admin/keys"), ["admin"]);
        assert_eq!(s.routes.required_for("/V1/ADMIN"), ["admin"]);
        assert!(s.routes.required_for("/v1/admin/public/x").is_empty());
        assert!(s.routes.required_for("/healthz").is_empty());
    }

    #[test]
    fn bad_header_names_are_refused_with_the_setting_named() {
        let map = HashMap::new();
        for (headers, field) in [
            (strings(&[]), "key_headers"),
            (strings(&["X-Api-Key"]), "key_headers[0]"),
            (strings(&["authorization", "x api key"]), "key_headers[1]"),
            (strings(&[":path"]), "key_headers[0]"),
            (strings(&["x-api-key", "x-api-key"]), "key_headers[1]"),
            (strings(&["x-model"]), "resource_header"),
            (strings(&["x-keywarden-key-id"]), "key_id_header"),
        ] {
            let err = ExtAuthzSettings::new(input(&headers, &map)).unwrap_err();
            assert!(err.starts_with(field), "{headers:?}: {err}");
        }
    }

    #[test]
    fn bad_routes_are_refused() {
        let headers = strings(&["authorization"]);
        for (prefix, scopes) in [
            ("v1/", strings(&["read"])),
            ("/v1/?x", strings(&["read"])),
            ("/v1/%61", strings(&["read"])),
            ("/v1 /", strings(&["read"])),
            ("/v1/", strings(&["Read"])),
        ] {
            let mut map = HashMap::new();
            map.insert(prefix.to_owned(), scopes);
            let err = ExtAuthzSettings::new(input(&headers, &map)).unwrap_err();
            assert!(err.starts_with("path_scopes"), "{prefix:?}: {err}");
        }
        let mut map = HashMap::new();
        map.insert("/v1/".to_owned(), strings(&["read"]));
        map.insert("/V1/".to_owned(), strings(&["admin"]));
        assert!(ExtAuthzSettings::new(input(&headers, &map)).is_err());
    }

    #[test]
    fn the_defaults_are_valid() {
        let d = ExtAuthzSettings::default();
        let map = HashMap::new();
        let again = ExtAuthzSettings::new(ExtAuthzInput {
            enabled: d.enabled,
            key_headers: &d.key_headers,
            path_scopes: &map,
            resource_header: None,
            key_id_header: &d.key_id_header,
            workspace_id_header: &d.workspace_id_header,
        })
        .unwrap();
        assert_eq!(again, d);
    }
}
