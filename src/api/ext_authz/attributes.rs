//! Reading a proxied HTTP request out of an Envoy `CheckRequest`: the presented key, the
//! path (for the scopes it requires), the resource header and the client address.
//!
//! Everything here comes from the end client, so it is read defensively: a header that
//! is oversized, not text, or sent twice is unusable rather than guessed at, and a path
//! is normalized the way an upstream might decode it before its prefix is matched, so an
//! escaped or dotted spelling of a protected path cannot borrow a weaker route's scopes.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;

use super::reply::Denial;
use super::settings::ExtAuthzSettings;
use crate::domain::access;

/// The longest header value read as a key. Keys are far shorter; a longer value is
/// refused before it is parsed or hashed.
pub const MAX_KEY_HEADER_LEN: usize = 512;
/// The longest path normalized (Envoy's own default limit on headers is 60 KiB).
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// One header of the proxied request.
#[derive(Debug, PartialEq, Eq)]
enum Header<'r> {
    Absent,
    Present(&'r str),
    /// Sent more than once (raw header map), or not UTF-8.
    Unreadable,
}

/// Looks `name` (lower case) up in the request's headers: the `headers` map Envoy fills
/// by default, or the raw `header_map` it sends with `encode_raw_headers`.
fn header<'r>(http: &'r HttpRequest, name: &str) -> Header<'r> {
    if let Some(v) = http.headers.get(name) {
        return Header::Present(v);
    }
    // Envoy lower-cases names; a client of this API that did not is still understood.
    if let Some((_, v)) = http
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
    {
        return Header::Present(v);
    }
    let Some(map) = http.header_map.as_ref() else {
        return Header::Absent;
    };
    let mut found = Header::Absent;
    for h in map
        .headers
        .iter()
        .filter(|h| h.key.eq_ignore_ascii_case(name))
    {
        if found != Header::Absent {
            return Header::Unreadable;
        }
        found = if h.raw_value.is_empty() {
            Header::Present(&h.value)
        } else {
            std::str::from_utf8(&h.raw_value).map_or(Header::Unreadable, Header::Present)
        };
    }
    found
}

/// The key the request presents: the first configured header that is present decides
/// (`authorization` must say `Bearer <key>`; other headers hold the bare key). Whether
/// the key itself is well formed is the verifier's question.
pub fn presented_key<'r>(
    http: Option<&'r HttpRequest>,
    settings: &ExtAuthzSettings,
) -> Result<&'r str, Denial> {
    let Some(http) = http else {
        return Err(Denial::MissingKey);
    };
    for name in &settings.key_headers {
        let value = match header(http, name) {
            Header::Absent => continue,
            Header::Unreadable => return Err(Denial::MalformedKey),
            Header::Present(v) => v,
        };
        if value.len() > MAX_KEY_HEADER_LEN {
            return Err(Denial::MalformedKey);
        }
        let key = if name == "authorization" {
            let (scheme, token) = value.trim().split_once(' ').ok_or(Denial::MalformedKey)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(Denial::MalformedKey);
            }
            token.trim()
        } else {
            value.trim()
        };
        if key.is_empty() {
            return Err(Denial::MalformedKey);
        }
        return Ok(key);
    }
    Err(Denial::MissingKey)
}

/// The resource the request names in the configured header, if any. A named resource
/// must be a well-formed target; an absent or empty header names none (and a key
/// restricted to some resources is then refused by the verifier).
pub fn resource<'r>(
    http: Option<&'r HttpRequest>,
    settings: &ExtAuthzSettings,
) -> Result<Option<&'r str>, Denial> {
    let (Some(http), Some(name)) = (http, settings.resource_header.as_deref()) else {
        return Ok(None);
    };
    match header(http, name) {
        Header::Absent => Ok(None),
        Header::Unreadable => Err(Denial::InvalidResource),
        Header::Present(v) if v.trim().is_empty() => Ok(None),
        Header::Present(v) if access::is_target(v.trim()) => Ok(Some(v.trim())),
        Header::Present(_) => Err(Denial::InvalidResource),
    }
}

/// The scopes the request's path requires under the configured routes. With no routes
/// the path is not looked at.
pub fn required_scopes<'s>(
    http: Option<&HttpRequest>,
    settings: &'s ExtAuthzSettings,
) -> Result<&'s [String], Denial> {
    if settings.routes.is_empty() {
        return Ok(&[]);
    }
    let path = http.map_or("", |h| h.path.as_str());
    let normalized = normalized_path(path).ok_or(Denial::InvalidPath)?;
    Ok(settings.routes.required_for(&normalized))
}

/// `raw` (the request target: path and query) as the path it names: the query and
/// fragment cut off, percent-escapes decoded once. `None` for a path that is not in
/// normal form, which an upstream could resolve to somewhere its spelling does not say:
/// not absolute, `.` or `..` segments (also as `..;`), empty segments (`//`),
/// backslashes, control characters, escapes that do not decode to UTF-8, or escapes left
/// after one decoding (double encoding).
pub fn normalized_path(raw: &str) -> Option<String> {
    if raw.len() > MAX_PATH_LEN {
        return None;
    }
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    let decoded = String::from_utf8(percent_decode(path.as_bytes())?).ok()?;
    if !decoded.starts_with('/')
        || decoded
            .chars()
            .any(|c| c.is_control() || c == '\\' || c == '%')
    {
        return None;
    }
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        // Path parameters (`..;x`) are dropped by some servers before resolving dots.
        let bare = segment.split(';').next().unwrap_or_default();
        if bare == "." || bare == ".." || (segment.is_empty() && i != last) {
            return None;
        }
    }
    Some(decoded)
}

/// Decodes every `%XX`; `None` for a `%` not followed by two hex digits.
fn percent_decode(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The client's address: the source of the proxied request as Envoy saw it (the
/// downstream peer, or the address Envoy derived from `X-Forwarded-For` when configured
/// to trust it). `None` when it is not an IP socket address; a key restricted to some
/// networks is then refused.
pub fn client_ip(request: &CheckRequest) -> Option<IpAddr> {
    let source = request.attributes.as_ref()?.source.as_ref()?;
    match source.address.as_ref()?.address.as_ref()? {
        Address::SocketAddress(socket) => socket.address.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};

    fn http(headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_first_configured_header_present_decides() {
        let s = ExtAuthzSettings::default();
        let h = http(&[("x-api-key", "k2"), ("authorization", "Bearer k1")]);
        assert_eq!(presented_key(Some(&h), &s), Ok("k1"));
        let h = http(&[("x-api-key", " k2 ")]);
        assert_eq!(presented_key(Some(&h), &s), Ok("k2"));
        let h = http(&[("authorization", "bearer   k1")]);
        assert_eq!(presented_key(Some(&h), &s), Ok("k1"));
        let h = http(&[("Authorization", "Bearer k1")]);
        assert_eq!(presented_key(Some(&h), &s), Ok("k1"));
    }

    #[test]
    fn missing_and_unusable_credentials_are_told_apart() {
        let s = ExtAuthzSettings::default();
        assert_eq!(presented_key(None, &s), Err(Denial::MissingKey));
        let h = http(&[("cookie", "a=b")]);
        assert_eq!(presented_key(Some(&h), &s), Err(Denial::MissingKey));
        let long = "k".repeat(MAX_KEY_HEADER_LEN + 1);
        for bad in [
            http(&[("authorization", "Basic dXNlcjpwYXNz")]),
            http(&[("authorization", "Bearer")]),
            http(&[("authorization", "Bearer   ")]),
            http(&[("x-api-key", "")]),
            http(&[("x-api-key", long.as_str())]),
        ] {
            assert_eq!(presented_key(Some(&bad), &s), Err(Denial::MalformedKey));
        }
    }

    #[test]
    fn raw_header_maps_are_read_and_duplicates_refused() {
        let s = ExtAuthzSettings::default();
        let raw = |values: &[&[u8]]| HttpRequest {
            header_map: Some(HeaderMap {
                headers: values
                    .iter()
                    .map(|v| HeaderValue {
                        key: "x-api-key".into(),
                        value: String::new(),
                        raw_value: v.to_vec(),
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        assert_eq!(presented_key(Some(&raw(&[b"k1"])), &s), Ok("k1"));
        assert_eq!(
            presented_key(Some(&raw(&[b"k1", b"k2"])), &s),
            Err(Denial::MalformedKey)
        );
        assert_eq!(
            presented_key(Some(&raw(&[b"\xff\xfe"])), &s),
            Err(Denial::MalformedKey)
        );
    }

    #[test]
    fn paths_are_normalized_or_refused() {
        assert_eq!(normalized_path("/v1/chat?x=1").as_deref(), Some("/v1/chat"));
        assert_eq!(normalized_path("/v1/%61dmin").as_deref(), Some("/v1/admin"));
        assert_eq!(normalized_path("/v1/").as_deref(), Some("/v1/"));
        assert_eq!(normalized_path("/").as_deref(), Some("/"));
        assert_eq!(normalized_path("/v1/a;b").as_deref(), Some("/v1/a;b"));
        for bad in [
            "",
            "v1/admin",
            "/v1//admin",
            "/v1/./admin",
            "/v1/public/../admin",
            "/v1/public/%2e%2e/admin",
            "/v1/public/..;/admin",
            "/v1/%2561dmin",
            "/v1/%zz",
            "/v1/%",
            "/v1\\admin",
            "/v1/%00admin",
            "/v1/%ff",
        ] {
            assert_eq!(normalized_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn resources_must_be_targets() {
        let s = ExtAuthzSettings {
            resource_header: Some("x-model".into()),
            ..ExtAuthzSettings::default()
        };
        let h = http(&[("x-model", "gpt-4o")]);
        assert_eq!(resource(Some(&h), &s), Ok(Some("gpt-4o")));
        assert_eq!(resource(Some(&http(&[])), &s), Ok(None));
        let h = http(&[("x-model", "gpt 4o")]);
        assert_eq!(resource(Some(&h), &s), Err(Denial::InvalidResource));
        let unset = ExtAuthzSettings::default();
        let h = http(&[("x-model", "gpt-4o")]);
        assert_eq!(resource(Some(&h), &unset), Ok(None));
    }
}
