//! Webhooks' rules, with no IO: the event types an endpoint subscribes to, which audit
//! actions announce which events, the endpoint URL's shape, which addresses a delivery
//! may reach (the SSRF rule), the signature (`t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`,
//! Stripe's scheme), the retry schedule, and when an expiry or budget notice is due.
//!
//! The server resolves, connects and sends (`src/webhooks/`); everything it decides by
//! is here, so the rules are unit-tested without a network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::{MICROS_PER_SECOND, Micros};

/// What an endpoint can subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    KeyIssued,
    KeyRevoked,
    KeyRotated,
    KeyDeleted,
    KeyLeaked,
    KeyExpiring,
    KeyBudgetThreshold,
}

impl EventType {
    pub const ALL: &'static [EventType] = &[
        EventType::KeyIssued,
        EventType::KeyRevoked,
        EventType::KeyRotated,
        EventType::KeyDeleted,
        EventType::KeyLeaked,
        EventType::KeyExpiring,
        EventType::KeyBudgetThreshold,
    ];

    /// The name in payloads, requests and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::KeyIssued => "key.issued",
            EventType::KeyRevoked => "key.revoked",
            EventType::KeyRotated => "key.rotated",
            EventType::KeyDeleted => "key.deleted",
            EventType::KeyLeaked => "key.leaked",
            EventType::KeyExpiring => "key.expiring",
            EventType::KeyBudgetThreshold => "key.budget_threshold",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.iter().copied().find(|t| t.as_str() == s)
    }

    /// The events a successful mutation audited as `action` announces, in order. A
    /// leaked key is revoked: it announces both, the revocation first.
    pub fn for_audit_action(action: &str) -> &'static [EventType] {
        match action {
            "key.issue" => &[EventType::KeyIssued],
            "key.revoke" => &[EventType::KeyRevoked],
            "key.rotate" => &[EventType::KeyRotated],
            "key.delete" => &[EventType::KeyDeleted],
            "key.leaked" => &[EventType::KeyRevoked, EventType::KeyLeaked],
            _ => &[],
        }
    }
}

/// The most endpoints a workspace may have: each is delivered to on its own, so this
/// bounds what one workspace's events cost.
pub const MAX_WEBHOOKS_PER_WORKSPACE: u32 = 20;

/// The refusal of one endpoint too many.
pub fn limit_reached(workspace_id: &str) -> crate::refusal::Refusal {
    crate::refusal::Refusal::new(
        crate::refusal::Reason::WebhookLimitReached,
        format!(
            "workspace {workspace_id} has {MAX_WEBHOOKS_PER_WORKSPACE} webhook endpoints already; delete one first"
        ),
    )
    .with("workspace_id", workspace_id)
    .with("max_webhooks", MAX_WEBHOOKS_PER_WORKSPACE)
}

/// The most event types an endpoint names (each at most once).
pub const MAX_EVENT_TYPES: usize = EventType::ALL.len();

/// Parses a subscription: at least one type, each known, none twice. On error, the
/// index of the first wrong entry and why.
pub fn parse_event_types(given: &[String]) -> Result<Vec<EventType>, (Option<usize>, String)> {
    if given.is_empty() {
        return Err((None, "name at least one event type".to_owned()));
    }
    if given.len() > MAX_EVENT_TYPES {
        return Err((
            None,
            format!("must name at most {MAX_EVENT_TYPES} event types"),
        ));
    }
    let mut types = Vec::with_capacity(given.len());
    for (i, raw) in given.iter().enumerate() {
        let Some(t) = EventType::parse(raw) else {
            return Err((
                Some(i),
                format!("unknown event type; known: {}", known_types()),
            ));
        };
        if types.contains(&t) {
            return Err((Some(i), "is named twice".to_owned()));
        }
        types.push(t);
    }
    types.sort();
    Ok(types)
}

fn known_types() -> String {
    EventType::ALL
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stored as one space-separated text.
pub fn join_event_types(types: &[EventType]) -> String {
    types
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The stored text back; `None` when it names an unknown type (a corrupt row).
pub fn split_event_types(s: &str) -> Option<Vec<EventType>> {
    s.split_whitespace().map(EventType::parse).collect()
}

/// The longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// An endpoint's host: a name to resolve at each delivery, or an address literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

/// A parsed endpoint URL: `http(s)://host[:port][/path][?query]`, no credentials, no
/// fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookUrl {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
    /// At least `/`.
    pub path_and_query: String,
}

impl WebhookUrl {
    /// The URL's parts, or why it is not one an endpoint may have.
    pub fn parse(s: &str) -> Result<WebhookUrl, &'static str> {
        if s.is_empty() {
            return Err("is required");
        }
        if s.len() > MAX_URL_LEN {
            return Err("must be at most 2048 characters");
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces (percent-encode the rest)");
        }
        let (scheme, rest) = if let Some(rest) = strip_prefix_ci(s, "https://") {
            (Scheme::Https, rest)
        } else if let Some(rest) = strip_prefix_ci(s, "http://") {
            (Scheme::Http, rest)
        } else {
            return Err("must be an http:// or https:// URL");
        };
        if rest.contains('#') {
            return Err("must not have a fragment");
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.contains('@') {
            return Err("must not hold credentials (user@host)");
        }
        let (host, port) = split_host_port(authority)?;
        let default_port = match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or("has a port that is not 1 to 65535")?,
        };
        let host = parse_host(host)?;
        let path_and_query = if tail.starts_with('/') {
            tail.to_owned()
        } else {
            format!("/{tail}")
        };
        Ok(WebhookUrl {
            scheme,
            host,
            port,
            path_and_query,
        })
    }

    /// The host as an HTTP `Host` header and TLS server name carry it.
    pub fn host_text(&self) -> String {
        match &self.host {
            Host::Name(n) => n.clone(),
            Host::Ip(IpAddr::V4(a)) => a.to_string(),
            Host::Ip(IpAddr::V6(a)) => format!("[{a}]"),
        }
    }

    /// Whether the URL itself names a host deliveries may not reach (a private or
    /// loopback address literal, `localhost`); names are judged again by what they
    /// resolve to at each delivery ([`is_public`]).
    pub fn names_private_host(&self) -> bool {
        match &self.host {
            Host::Ip(ip) => !is_public(*ip),
            Host::Name(n) => n == "localhost" || n.ends_with(".localhost"),
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), &'static str> {
    if authority.is_empty() {
        return Err("must name a host");
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let close = rest.find(']').ok_or("has an unclosed IPv6 bracket")?;
        let host = &authority[..close + 2];
        let after = &rest[close + 1..];
        return match after {
            "" => Ok((host, None)),
            p => p
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or("has text after the IPv6 address"),
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    })
}

fn parse_host(host: &str) -> Result<Host, &'static str> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|a| Host::Ip(IpAddr::V6(a)))
            .map_err(|_| "has a bracketed host that is not an IPv6 address");
    }
    if let Ok(v4) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    let name = host.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name).to_owned();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err("has a host that is not a DNS name or an IP address");
    }
    // A name whose last label does not start with a letter (`127.1`, `2130706433`,
    // `0x7f.1`): resolvers read such forms as addresses (inet_aton takes octal, hex and
    // short forms), and no top-level domain starts otherwise, so they are refused rather
    // than judged as names.
    if !name
        .rsplit('.')
        .next()
        .and_then(|last| last.bytes().next())
        .is_some_and(|b| b.is_ascii_alphabetic())
    {
        return Err("has a host that is not a DNS name or an IP address");
    }
    Ok(Host::Name(name))
}

/// Whether deliveries may reach `ip` when private addresses are not allowed: a globally
/// routable unicast address. Refused: loopback, private (RFC 1918, unique local),
/// link-local (cloud metadata services live at 169.254.169.254), shared (100.64/10),
/// unspecified, broadcast, multicast, documentation, benchmarking and reserved ranges;
/// an IPv4-mapped or NAT64 IPv6 address is judged as its IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = a.segments();
            // NAT64 (64:ff9b::/96): the IPv4 address in the low 32 bits.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let o = a.octets();
                return is_public_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] < 0x0200) // IETF protocol assignments, Teredo
                || s[0] == 0x0100 && s[1..4] == [0, 0, 0] // discard-only
                || a.segments()[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible, deprecated
        }
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "keywarden-signature";
/// The header carrying the event's id (also in the body), for deduplication.
pub const ID_HEADER: &str = "keywarden-event-id";
/// How far a receiver should accept a signature's time from its own clock.
pub const DEFAULT_TOLERANCE_SECONDS: i64 = 300;

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the secret>`.
pub fn sign(secret: &[u8], unix_seconds: i64, body: &[u8]) -> String {
    format!(
        "t={unix_seconds},v1={}",
        hex::encode(mac(secret, unix_seconds, body))
    )
}

fn mac(secret: &[u8], unix_seconds: i64, body: &[u8]) -> Vec<u8> {
    // HMAC takes a key of any length.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(unix_seconds.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// A receiver's check: the header parses, its time is within `tolerance_seconds` of
/// `now_seconds` (a replay later is refused), and one of its `v1` signatures is right
/// (compared in constant time).
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_seconds: i64,
    tolerance_seconds: i64,
) -> bool {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if (now_seconds - t).abs() > tolerance_seconds {
        return false;
    }
    let expected = mac(secret, t, body);
    signatures
        .iter()
        .any(|s| bool::from(s.as_slice().ct_eq(&expected)))
}

/// How long deliveries to a failing endpoint are retried before it is disabled.
pub const RETRY_FOR: Micros = 24 * 3600 * MICROS_PER_SECOND;
/// The first retry's delay, doubled at each further failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Micros = 5 * MICROS_PER_SECOND;
pub const MAX_BACKOFF: Micros = 3600 * MICROS_PER_SECOND;

/// The wait after the `failures`-th failure in a row (1 = the first): exponential from
/// [`FIRST_BACKOFF`], capped at [`MAX_BACKOFF`], with "equal jitter": half the delay
/// fixed, the other half scaled by `jitter` in `[0, 1)` (so retries of many endpoints
/// failing together spread out, and no wait is shorter than half the schedule).
pub fn backoff(failures: u32, jitter: f64) -> Micros {
    let doublings = failures.saturating_sub(1).min(30);
    let delay = FIRST_BACKOFF
        .saturating_mul(1_i64 << doublings)
        .min(MAX_BACKOFF);
    let half = delay / 2;
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    half + (half as f64 * jitter) as Micros
}

/// Whether an endpoint failing since `failing_since` is given up on at `now`.
pub fn gives_up(failing_since: Micros, now: Micros) -> bool {
    now.saturating_sub(failing_since) >= RETRY_FOR
}

/// The default expiry notice lead times: 7 days and 1 day.
pub const DEFAULT_EXPIRY_LEADS: &[Micros] = &[
    7 * 24 * 3600 * MICROS_PER_SECOND,
    24 * 3600 * MICROS_PER_SECOND,
];

/// The expiry notices due at `now` for a key created at `created_at` and expiring at
/// `expires_at`, given the lead times (any order): every lead whose moment
/// (`expires_at - lead`) has come while the key has not expired yet, and which the key
/// lived to see (a key issued to expire in 36 hours never gets the 7-day notice, only
/// the 1-day one). Each is sent once; when several are due at once (a sweep that was
/// not running), only the shortest is announced and the others are marked sent with it
/// (see [`announced_lead`]).
pub fn due_expiry_leads(
    created_at: Micros,
    expires_at: Micros,
    now: Micros,
    leads: &[Micros],
) -> Vec<Micros> {
    if now >= expires_at {
        return Vec::new();
    }
    let mut due: Vec<Micros> = leads
        .iter()
        .copied()
        .filter(|lead| {
            let moment = expires_at.saturating_sub(*lead);
            *lead > 0 && moment <= now && moment >= created_at
        })
        .collect();
    due.sort_unstable();
    due.dedup();
    due
}

/// The lead a notice announces among those due: the shortest (nearest the expiry).
pub fn announced_lead(due: &[Micros]) -> Option<Micros> {
    due.iter().copied().min()
}

/// The budget thresholds, in percent of `max_budget_micros`.
pub const BUDGET_THRESHOLDS: &[u8] = &[80, 100];

/// The thresholds `spent` has reached of `max`, lowest first.
pub fn reached_thresholds(spent: u64, max: u64) -> Vec<u8> {
    if max == 0 {
        return Vec::new();
    }
    BUDGET_THRESHOLDS
        .iter()
        .copied()
        .filter(|pct| u128::from(spent) * 100 >= u128::from(max) * u128::from(*pct))
        .collect()
}

/// The name under which a notice is marked sent for a key: once per key for an expiry
/// lead, once per budget period (named by its start) for a threshold.
pub fn expiry_mark(lead: Micros) -> String {
    format!("expiring:{}", lead / MICROS_PER_SECOND)
}

pub fn budget_mark(percent: u8, period_start: Micros) -> String {
    format!("budget:{percent}:{period_start}")
}

/// The id every endpoint's delivery of one event carries: stable across retries and
/// endpoints, so a receiver can drop what it has seen.
pub fn event_id(workspace_id: &str, seq: i64) -> String {
    use sha2::Digest;
    let digest = Sha256::digest(format!("{workspace_id}:{seq}").as_bytes());
    format!("evt_{}", hex::encode(&digest[..12]))
}

/// What every key event's payload says of the key (`data.key`): never a secret, only
/// the display form (prefix and last four). Times in unix seconds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeySummary {
    pub key_id: String,
    pub workspace_id: String,
    pub name: String,
    pub display: String,
    pub environment: &'static str,
    pub owner_kind: &'static str,
    pub owner_id: String,
    pub team_id: Option<String>,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoke_reason: Option<String>,
    pub rotated_at: Option<i64>,
    pub deleted_at: Option<i64>,
    pub max_budget_micros: Option<u64>,
}

impl KeySummary {
    pub fn of(key: &crate::key::KeyRecord) -> KeySummary {
        let s = |at: Micros| at.div_euclid(MICROS_PER_SECOND);
        KeySummary {
            key_id: key.key_id.clone(),
            workspace_id: key.workspace_id.clone(),
            name: key.name.clone(),
            display: key.display.clone(),
            environment: key.environment.as_str(),
            owner_kind: key.owner.kind.as_str(),
            owner_id: key.owner.id.clone(),
            team_id: key.team_id.clone(),
            scopes: key.scopes.clone(),
            created_at: s(key.created_at),
            expires_at: key.expires_at.map(s),
            revoked_at: key.revoked_at.map(s),
            revoke_reason: key.revoke_reason.clone(),
            rotated_at: key.rotated_at.map(s),
            deleted_at: key.deleted_at.map(s),
            max_budget_micros: key.max_budget_micros,
        }
    }
}

/// `data` of a key event (issued, revoked, rotated, deleted, leaked).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyEventData {
    pub key: KeySummary,
}

/// `data` of `key.expiring`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExpiringData {
    pub key: KeySummary,
    /// When the key expires (unix seconds).
    pub expires_at: i64,
    /// The lead time this notice is for (604800: the 7-day notice).
    pub lead_seconds: i64,
}

/// `data` of `key.budget_threshold`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BudgetThresholdData {
    pub key: KeySummary,
    pub threshold_percent: u8,
    pub spent_micros: u64,
    pub max_budget_micros: u64,
    /// The start of the budget period the spend counts in (unix seconds).
    pub period_start: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Micros = 24 * 3600 * MICROS_PER_SECOND;

    #[test]
    fn event_types_parse_and_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(*t));
        }
        let given: Vec<String> = ["key.revoked", "key.issued"].map(String::from).to_vec();
        let types = parse_event_types(&given).unwrap();
        assert_eq!(types, vec![EventType::KeyIssued, EventType::KeyRevoked]);
        assert_eq!(split_event_types(&join_event_types(&types)), Some(types));
        assert_eq!(parse_event_types(&[]).unwrap_err().0, None);
        let bad: Vec<String> = ["key.issued", "key.exploded"].map(String::from).to_vec();
        assert_eq!(parse_event_types(&bad).unwrap_err().0, Some(1));
        let twice: Vec<String> = ["key.issued", "key.issued"].map(String::from).to_vec();
        assert_eq!(parse_event_types(&twice).unwrap_err().0, Some(1));
        assert_eq!(split_event_types("key.issued nope"), None);
    }

    #[test]
    fn leaked_announces_revoked_then_leaked() {
        assert_eq!(
            EventType::for_audit_action("key.leaked"),
            &[EventType::KeyRevoked, EventType::KeyLeaked]
        );
        assert!(EventType::for_audit_action("key.update").is_empty());
    }

    #[test]
    fn urls_parse_or_say_why_not() {
        let u = WebhookUrl::parse("https://Hooks.Example.com/kw?x=1").unwrap();
        assert_eq!(u.scheme, Scheme::Https);
        assert_eq!(u.host, Host::Name("hooks.example.com".into()));
        assert_eq!(u.port, 443);
        assert_eq!(u.path_and_query, "/kw?x=1");
        let u = WebhookUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(u.port, 8080);
        assert_eq!(u.path_and_query, "/");
        assert!(u.names_private_host());
        let u = WebhookUrl::parse("http://[::1]:9/x").unwrap();
        assert_eq!(u.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(u.host_text(), "[::1]");
        for bad in [
            "",
            "ftp://example.com/",
            "example.com",
            "https://",
            "https://user:pw@example.com/",
            "https://example.com:0/",
            "https://example.com:99999/",
            "https://exa mple.com/",
            "https://example.com/#frag",
            "https://-bad-.com/",
            "https://127.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://example.0x1/",
            "https://[::1/",
            "javascript:alert(1)",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(WebhookUrl::parse(&format!("https://e.com/{}", "a".repeat(MAX_URL_LEN))).is_err());
        assert!(
            WebhookUrl::parse("http://localhost:1/")
                .unwrap()
                .names_private_host()
        );
        assert!(
            WebhookUrl::parse("http://x.localhost/")
                .unwrap()
                .names_private_host()
        );
        assert!(
            !WebhookUrl::parse("https://example.com/")
                .unwrap()
                .names_private_host()
        );
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn signatures_verify_and_refuse_tampering_and_replays() {
        let secret = b"whsec_test";
        let body = br#"{"id":"evt_1"}"#;
        let header = sign(secret, 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="));
        assert!(verify(secret, &header, body, 1_700_000_100, 300));
        assert!(!verify(secret, &header, b"{}", 1_700_000_100, 300));
        assert!(!verify(b"other", &header, body, 1_700_000_100, 300));
        assert!(!verify(secret, &header, body, 1_700_001_000, 300));
        assert!(!verify(secret, "v1=00", body, 1_700_000_000, 300));
        // The known answer of HMAC-SHA256("key", "1.x").
        assert_eq!(
            sign(b"key", 1, b"x"),
            "t=1,v1=fc4913c41a7bf793267e2a384f3261c9436ec2cd097bd745e7b0d99113f510ec"
        );
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff(1, 0.0), FIRST_BACKOFF / 2);
        assert_eq!(backoff(1, 1.0), FIRST_BACKOFF);
        assert_eq!(backoff(2, 1.0), 2 * FIRST_BACKOFF);
        assert_eq!(backoff(40, 1.0), MAX_BACKOFF);
        assert!(backoff(40, 0.0) >= MAX_BACKOFF / 2);
        assert_eq!(backoff(3, f64::NAN), 2 * FIRST_BACKOFF);
        assert!(!gives_up(0, RETRY_FOR - 1));
        assert!(gives_up(0, RETRY_FOR));
    }

    #[test]
    fn expiry_notices_are_due_within_their_lead() {
        let leads = DEFAULT_EXPIRY_LEADS;
        let exp = 100 * DAY;
        assert!(due_expiry_leads(0, exp, exp - 8 * DAY, leads).is_empty());
        assert_eq!(
            due_expiry_leads(0, exp, exp - 7 * DAY, leads),
            vec![7 * DAY]
        );
        assert_eq!(
            due_expiry_leads(0, exp, exp - DAY / 2, leads),
            vec![DAY, 7 * DAY]
        );
        assert_eq!(
            announced_lead(&due_expiry_leads(0, exp, exp - DAY / 2, leads)),
            Some(DAY)
        );
        assert!(due_expiry_leads(0, exp, exp, leads).is_empty());
        // Issued with 36 hours left: the 7-day moment was before the key existed.
        let created = exp - 36 * 3600 * MICROS_PER_SECOND;
        assert!(due_expiry_leads(created, exp, created, leads).is_empty());
        assert_eq!(due_expiry_leads(created, exp, exp - DAY, leads), vec![DAY]);
    }

    #[test]
    fn thresholds_reached() {
        assert!(reached_thresholds(79, 100).is_empty());
        assert_eq!(reached_thresholds(80, 100), vec![80]);
        assert_eq!(reached_thresholds(150, 100), vec![80, 100]);
        assert!(reached_thresholds(5, 0).is_empty());
        assert_eq!(reached_thresholds(u64::MAX, u64::MAX), vec![80, 100]);
        assert_ne!(budget_mark(80, 1), budget_mark(80, 2));
        assert_eq!(expiry_mark(DAY), "expiring:86400");
    }

    #[test]
    fn event_ids_are_stable_and_distinct() {
        assert_eq!(event_id("ws", 1), event_id("ws", 1));
        assert_ne!(event_id("ws", 1), event_id("ws", 2));
        assert_ne!(event_id("ws", 1), event_id("wt", 1));
    }
}
