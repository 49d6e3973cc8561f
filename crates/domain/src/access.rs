//! What a key may reach: resources (models) by mode and list, and the networks its calls
//! may come from.
//!
//! # Resources
//! `All` reaches everything; `Include` only the listed targets; `Exclude` everything but
//! them. A key limited to a list (`Include` or `Exclude`) needs the request to name its
//! resource: a request without one is refused, as it cannot be shown to be allowed.
//!
//! # Networks
//! An empty allowlist admits every address. Otherwise the client address must be inside
//! a listed range, and a request without one is refused. A range of one family never
//! contains an address of the other: a list of IPv4 ranges refuses every IPv6 address,
//! with one exception, IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a dual-stack
//! socket reports for an IPv4 client), which are judged as the IPv4 address they map
//! when that address is inside a listed IPv4 range.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::refusal::{Reason, Refusal};

pub const MAX_TARGETS: usize = 128;
pub const MAX_TARGET_LEN: usize = 128;
pub const MAX_CIDRS: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    #[default]
    All,
    Include,
    Exclude,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::All => "all",
            AccessMode::Include => "include",
            AccessMode::Exclude => "exclude",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "all" => Some(AccessMode::All),
            "include" => Some(AccessMode::Include),
            "exclude" => Some(AccessMode::Exclude),
            _ => None,
        }
    }
}

/// Which resources a key reaches: its own targets and those of the access groups it
/// names (named sets of targets per workspace, resolved when the key is loaded, so a
/// target added to a group later counts without touching the key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceAccess {
    pub mode: AccessMode,
    pub targets: BTreeSet<String>,
    /// Access group names (of the key's workspace).
    pub groups: BTreeSet<String>,
    /// The groups' targets as last loaded; never stored with the key.
    #[serde(skip)]
    pub group_targets: BTreeSet<String>,
}

impl ResourceAccess {
    /// Every target, no groups: what a key without rules of reach has.
    pub const ALL: ResourceAccess = ResourceAccess {
        mode: AccessMode::All,
        targets: BTreeSet::new(),
        groups: BTreeSet::new(),
        group_targets: BTreeSet::new(),
    };
}

/// The refusal of a reach (a key's or a team's) that names access groups the workspace
/// does not have.
pub fn groups_missing(workspace_id: &str, missing: &[&str]) -> Refusal {
    Refusal::new(
        Reason::AccessGroupsMissing,
        format!(
            "access groups not in workspace {workspace_id}: {}",
            missing.join(", ")
        ),
    )
    .with("workspace_id", workspace_id)
    .with("access_groups", missing.join(","))
}

impl ResourceAccess {
    /// Whether this reach names any access group (whose targets must be loaded with it).
    pub fn names_groups(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Sets `group_targets` to the targets, as they are now, of every group of the
    /// workspace (`groups`) that this reach names. A group it names that is not among
    /// them adds nothing.
    pub fn resolve_groups(&mut self, groups: &[AccessGroup]) {
        self.group_targets = groups
            .iter()
            .filter(|g| self.groups.contains(&g.name))
            .flat_map(|g| g.targets.iter().cloned())
            .collect();
    }

    fn listed(&self, resource: &str) -> bool {
        self.targets.contains(resource) || self.group_targets.contains(resource)
    }

    /// Whether a request for `resource` (`None`: the request names none) may proceed.
    pub fn allows(&self, resource: Option<&str>) -> bool {
        match (self.mode, resource) {
            (AccessMode::All, _) => true,
            (_, None) => false,
            (AccessMode::Include, Some(r)) => self.listed(r),
            (AccessMode::Exclude, Some(r)) => !self.listed(r),
        }
    }
}

/// What a team key's own reach names that its team's reach (`team`, its groups resolved)
/// does not let it reach: targets, and access groups as `group:NAME`. A key may narrow
/// its team's reach, never widen it, so only a key limited to a list (`Include`) can
/// name too much; reaching everything (`All`, which inherits the team's reach) or
/// excluding names never does. Under a team limited to a list, a key's target must be on
/// it (directly or through one of the team's groups) and a key's group must be one the
/// team names; under a team that excludes, neither may be one the team excludes.
pub fn beyond_team(team: &ResourceAccess, key: &ResourceAccess) -> Vec<String> {
    if team.mode == AccessMode::All || key.mode != AccessMode::Include {
        return Vec::new();
    }
    let include = team.mode == AccessMode::Include;
    let targets = key
        .targets
        .iter()
        .filter(|t| team.listed(t) != include)
        .cloned();
    let groups = key
        .groups
        .iter()
        .filter(|g| team.groups.contains(*g) != include)
        .map(|g| format!("group:{g}"));
    targets.chain(groups).collect()
}

/// The refusal of a team key whose reach names `beyond` (see [`beyond_team`]).
pub fn reach_beyond_team(team_id: &str, beyond: &[String]) -> Refusal {
    Refusal::new(
        Reason::ReachBeyondTeam,
        format!(
            "the key's resource_access names what team {team_id} cannot reach: {} (a team key may narrow its team's reach, never widen it)",
            beyond.join(", ")
        ),
    )
    .with("team_id", team_id)
    .with("field", "resource_access")
    .with("beyond", beyond.join(","))
}

/// An access group name: 1 to 64 of `a-z 0-9 _ -`, starting with a letter.
pub fn is_group_name(s: &str) -> bool {
    s.len() <= 64
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A named set of targets in a workspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessGroup {
    pub workspace_id: String,
    pub name: String,
    pub targets: BTreeSet<String>,
    pub created_at: super::Micros,
    pub updated_at: super::Micros,
}

/// A target name: 1 to 128 printable ASCII characters without spaces
/// (`claude-sonnet-4-5`, `gpt-4o`, `openai/gpt-4o-mini`).
pub fn is_target(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TARGET_LEN && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Parses a CIDR range, or a bare address as its own /32 or /128; the range is
/// normalized (host bits cleared).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Where a key's calls may come from (empty: anywhere).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkAllowlist {
    pub nets: Vec<IpNet>,
}

impl NetworkAllowlist {
    /// Whether a call from `client` (`None`: the request names no address) may proceed.
    pub fn allows(&self, client: Option<IpAddr>) -> bool {
        if self.nets.is_empty() {
            return true;
        }
        let Some(ip) = client else {
            return false;
        };
        let mapped = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.nets
            .iter()
            .any(|net| net.contains(&ip) || mapped.is_some_and(|v4| net.contains(&v4)))
    }

    /// Text form for storage: space-separated canonical ranges.
    pub fn join(&self) -> String {
        self.nets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn split(s: &str) -> Option<Self> {
        let nets = s
            .split_whitespace()
            .map(|n| n.parse::<IpNet>().ok())
            .collect::<Option<Vec<_>>>()?;
        Some(NetworkAllowlist { nets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(mode: AccessMode, targets: &[&str], groups: &[&str]) -> ResourceAccess {
        ResourceAccess {
            mode,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            group_targets: BTreeSet::new(),
        }
    }

    #[test]
    fn a_team_key_may_narrow_its_team_s_reach_never_widen_it() {
        use AccessMode::{All, Exclude, Include};
        let mut team = reach(Include, &["gpt-4o", "claude"], &["fast"]);
        team.group_targets = ["haiku".to_owned()].into();
        // Within: listed targets, a target of a listed group, a listed group.
        assert!(beyond_team(&team, &reach(Include, &["claude", "haiku"], &["fast"])).is_empty());
        // Beyond: a target not listed, a group the team does not name.
        assert_eq!(
            beyond_team(&team, &reach(Include, &["claude", "o3"], &["fast", "slow"])),
            ["o3", "group:slow"]
        );
        // Reaching all (the team's reach, inherited) or excluding never widens.
        assert!(beyond_team(&team, &reach(All, &[], &[])).is_empty());
        assert!(beyond_team(&team, &reach(Exclude, &["o3"], &["slow"])).is_empty());
        // A team that reaches all admits any list.
        assert!(beyond_team(&reach(All, &[], &[]), &reach(Include, &["o3"], &["slow"])).is_empty());
        // A team that excludes: the key may name anything but what it excludes.
        let mut team = reach(Exclude, &["o3"], &["slow"]);
        team.group_targets = ["o1".to_owned()].into();
        assert!(beyond_team(&team, &reach(Include, &["claude"], &["fast"])).is_empty());
        assert_eq!(
            beyond_team(&team, &reach(Include, &["o3", "o1", "claude"], &["slow"])),
            ["o1", "o3", "group:slow"]
        );
    }

    fn list(cidrs: &[&str]) -> NetworkAllowlist {
        NetworkAllowlist {
            nets: cidrs.iter().map(|c| parse_cidr(c).unwrap()).collect(),
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn resources_by_mode() {
        let targets: BTreeSet<String> = ["gpt-4o".to_owned()].into();
        let all = ResourceAccess::default();
        let include = ResourceAccess {
            mode: AccessMode::Include,
            targets: targets.clone(),
            ..Default::default()
        };
        let exclude = ResourceAccess {
            mode: AccessMode::Exclude,
            targets,
            ..Default::default()
        };
        let via_group = ResourceAccess {
            mode: AccessMode::Include,
            group_targets: ["o3".to_owned()].into(),
            ..Default::default()
        };
        assert!(via_group.allows(Some("o3")) && !via_group.allows(Some("gpt-4o")));
        assert!(
            is_group_name("frontier-models") && !is_group_name("Frontier") && !is_group_name("")
        );
        assert!(all.allows(Some("anything")) && all.allows(None));
        assert!(include.allows(Some("gpt-4o")) && !include.allows(Some("claude")));
        assert!(!exclude.allows(Some("gpt-4o")) && exclude.allows(Some("claude")));
        assert!(!include.allows(None) && !exclude.allows(None));
        assert!(is_target("openai/gpt-4o-mini") && !is_target("a b") && !is_target(""));
    }

    #[test]
    fn a_reach_resolves_the_targets_of_the_groups_it_names_only() {
        let group = |name: &str, targets: &[&str]| AccessGroup {
            workspace_id: "ws".into(),
            name: name.into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            created_at: 0,
            updated_at: 0,
        };
        let groups = [
            group("frontier", &["o3", "opus"]),
            group("cheap", &["mini"]),
            group("other", &["secret-model"]),
        ];
        let mut reach = ResourceAccess {
            mode: AccessMode::Include,
            groups: ["frontier".to_owned(), "cheap".to_owned(), "gone".to_owned()].into(),
            ..Default::default()
        };
        assert!(reach.names_groups() && !ResourceAccess::ALL.names_groups());
        reach.resolve_groups(&groups);
        let expected: BTreeSet<String> = ["o3", "opus", "mini"].map(String::from).into();
        assert_eq!(reach.group_targets, expected);
        assert!(reach.allows(Some("opus")) && !reach.allows(Some("secret-model")));
        // Resolving again replaces what was resolved before.
        reach.resolve_groups(&groups[1..]);
        assert_eq!(reach.group_targets, ["mini".to_owned()].into());
    }

    #[test]
    fn cidr_edges() {
        let host = list(&["10.1.2.3/32"]);
        assert!(host.allows(ip("10.1.2.3")) && !host.allows(ip("10.1.2.4")));
        assert_eq!(list(&["10.1.2.3"]), host, "a bare address is its own /32");
        let everything_v4 = list(&["0.0.0.0/0"]);
        assert!(everything_v4.allows(ip("203.0.113.9")));
        // An IPv4-only list refuses every IPv6 address ...
        assert!(!everything_v4.allows(ip("2001:db8::1")));
        assert!(!everything_v4.allows(ip("::1")));
        // ... except an IPv4-mapped one whose IPv4 address is listed.
        assert!(everything_v4.allows(ip("::ffff:203.0.113.9")));
        assert!(host.allows(ip("::ffff:10.1.2.3")));
        assert!(!host.allows(ip("::ffff:10.1.2.4")));
        let everything_v6 = list(&["::/0"]);
        assert!(everything_v6.allows(ip("2001:db8::1")));
        assert!(!everything_v6.allows(ip("10.0.0.1")));
        // A list and no address: refused. No list: anything, even no address.
        assert!(!host.allows(None));
        assert!(NetworkAllowlist::default().allows(None));
        // Host bits are cleared, and the text form round-trips.
        let net = list(&["10.1.2.3/8", "2001:db8::7/32"]);
        assert_eq!(net.join(), "10.0.0.0/8 2001:db8::/32");
        assert_eq!(NetworkAllowlist::split(&net.join()), Some(net));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("banana"), None);
    }
}
