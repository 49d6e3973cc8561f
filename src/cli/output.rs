//! What the CLI prints: aligned tables for people, JSON objects for scripts, and the
//! names it gives to the API's enums and timestamps.
//!
//! JSON is built field by field from the proto messages (they do not derive Serialize),
//! which also keeps the shape under this module's control: lower-case enum names
//! (`live`, `active`, `not_found`), RFC 3339 UTC times, `null` for unset fields, money in
//! micro-units. Tables show the same values, times to the second, `-` for unset.

use std::io::Write;

use serde_json::{Value, json};

use super::CliError;
use crate::proto;

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// Writes `text` to stdout. A closed pipe (`keywarden keys list | head`) is not an error.
pub fn emit(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(CliError::Io),
    }
}

/// Pretty JSON with a final newline.
pub fn emit_json(value: &Value) -> Result<(), CliError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| CliError::Io(std::io::Error::other(e)))?;
    emit(&format!("{text}\n"))
}

/// A list: `{"<name>": [...]}` for scripts, or a table. A paged list (`page`: the token
/// of the next page, empty on the last) adds `next_page_token` to the JSON, and to the
/// table a line on stderr saying how to ask for more.
pub fn emit_list<T>(
    format: Format,
    name: &str,
    items: &[T],
    json: fn(&T) -> Value,
    table: fn(&[T]) -> Table,
    page: Option<&str>,
) -> Result<(), CliError> {
    match format {
        Format::Json => {
            let mut doc = serde_json::Map::new();
            doc.insert(name.to_owned(), items.iter().map(json).collect());
            if let Some(next) = page {
                doc.insert("next_page_token".to_owned(), next.into());
            }
            emit_json(&Value::Object(doc))
        }
        Format::Table => {
            emit(&table(items).render())?;
            if let Some(next) = page.filter(|n| !n.is_empty()) {
                eprintln!(
                    "more {}: --page-token {next} (or --all)",
                    name.replace('_', " ")
                );
            }
            Ok(())
        }
    }
}

/// What a delete removed: `{"deleted": <what>}`, or `deleted <what>`.
pub fn emit_deleted(format: Format, what: &str) -> Result<(), CliError> {
    match format {
        Format::Json => emit_json(&json!({ "deleted": what })),
        Format::Table => emit(&format!("deleted {what}\n")),
    }
}

/// A table: a header row and rows of cells, columns padded to their widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        render_rows(std::iter::once(&header).chain(&self.rows))
    }
}

/// Name / value pairs, one per line, the values aligned (one record: `keys get`).
pub fn fields(pairs: &[(&str, String)]) -> String {
    let rows: Vec<Vec<String>> = pairs
        .iter()
        .map(|(k, v)| vec![(*k).to_owned(), v.clone()])
        .collect();
    render_rows(rows.iter())
}

fn render_rows<'a>(rows: impl Iterator<Item = &'a Vec<String>> + Clone) -> String {
    let cleaned: Vec<Vec<String>> = rows.map(|r| r.iter().map(|c| clean(c)).collect()).collect();
    let columns = cleaned.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in &cleaned {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &cleaned {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A cell on one line: control characters (a newline in a name or an audit detail, an
/// escape sequence meant for the terminal) are shown escaped, never obeyed.
fn clean(cell: &str) -> String {
    let cell = if cell.is_empty() { "-" } else { cell };
    cell.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// RFC 3339 UTC, as sent (sub-second digits kept); `None` when unset.
pub fn time(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.map(|t| t.to_string())
}

/// RFC 3339 UTC to the second, `-` when unset: for tables.
pub fn time_cell(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) => prost_types::Timestamp {
            seconds: t.seconds,
            nanos: 0,
        }
        .to_string(),
        None => "-".to_owned(),
    }
}

/// Unix seconds (the rate-limit `reset_at`) as RFC 3339 UTC.
pub fn unix_seconds(seconds: i64) -> String {
    prost_types::Timestamp { seconds, nanos: 0 }.to_string()
}

/// Micro-units of currency as a decimal amount with at least two decimals: `5.00`,
/// `0.0015`.
pub fn money(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let fraction = format!("{:06}", micros % 1_000_000);
    let trimmed = fraction.trim_end_matches('0');
    let shown = if trimmed.len() < 2 {
        &fraction[..2]
    } else {
        trimmed
    };
    format!("{whole}.{shown}")
}

fn unknown(raw: i32) -> String {
    format!("unknown({raw})")
}

pub fn environment(raw: i32) -> String {
    match proto::Environment::try_from(raw) {
        Ok(proto::Environment::Live) => "live".into(),
        Ok(proto::Environment::Test) => "test".into(),
        Ok(proto::Environment::Unspecified) => "unspecified".into(),
        Err(_) => unknown(raw),
    }
}

pub fn key_status(raw: i32) -> String {
    match proto::KeyStatus::try_from(raw) {
        Ok(proto::KeyStatus::Active) => "active".into(),
        Ok(proto::KeyStatus::Revoked) => "revoked".into(),
        Ok(proto::KeyStatus::Expired) => "expired".into(),
        Ok(proto::KeyStatus::Unspecified) => "unspecified".into(),
        Err(_) => unknown(raw),
    }
}

/// `user:ID` / `service_account:ID`, the form `--owner` takes.
pub fn owner(owner: Option<&proto::Owner>) -> Option<String> {
    let owner = owner?;
    let kind = match proto::OwnerKind::try_from(owner.kind) {
        Ok(proto::OwnerKind::User) => "user".to_owned(),
        Ok(proto::OwnerKind::ServiceAccount) => "service_account".to_owned(),
        Ok(proto::OwnerKind::Unspecified) => "unspecified".to_owned(),
        Err(_) => unknown(owner.kind),
    };
    Some(format!("{kind}:{}", owner.id))
}

pub fn verify_code(raw: i32) -> String {
    use proto::VerifyCode as C;
    match C::try_from(raw) {
        Ok(C::Valid) => "valid".into(),
        Ok(C::NotFound) => "not_found".into(),
        Ok(C::Malformed) => "malformed".into(),
        Ok(C::Revoked) => "revoked".into(),
        Ok(C::Expired) => "expired".into(),
        Ok(C::InsufficientScope) => "insufficient_scope".into(),
        Ok(C::RateLimited) => "rate_limited".into(),
        Ok(C::BudgetExceeded) => "budget_exceeded".into(),
        Ok(C::ResourceForbidden) => "resource_forbidden".into(),
        Ok(C::IpForbidden) => "ip_forbidden".into(),
        Ok(C::PlanForbidsKeys) => "plan_forbids_keys".into(),
        Ok(C::Unspecified) => "unspecified".into(),
        Err(_) => unknown(raw),
    }
}

pub fn provider(raw: i32) -> String {
    match proto::Provider::try_from(raw) {
        Ok(proto::Provider::Anthropic) => "anthropic".into(),
        Ok(proto::Provider::Openai) => "openai".into(),
        Ok(proto::Provider::Unspecified) => "unspecified".into(),
        Err(_) => unknown(raw),
    }
}

pub fn plan(raw: i32) -> String {
    match proto::Plan::try_from(raw) {
        Ok(proto::Plan::Spark) => "spark".into(),
        Ok(proto::Plan::Pro) => "pro".into(),
        Ok(proto::Plan::Team) => "team".into(),
        Ok(proto::Plan::Enterprise) => "enterprise".into(),
        Ok(proto::Plan::Unspecified) => "unspecified".into(),
        Err(_) => unknown(raw),
    }
}

pub fn audit_outcome(raw: i32) -> String {
    match proto::AuditOutcome::try_from(raw) {
        Ok(proto::AuditOutcome::Success) => "success".into(),
        Ok(proto::AuditOutcome::Denied) => "denied".into(),
        Ok(proto::AuditOutcome::Unspecified) => "unspecified".into(),
        Err(_) => unknown(raw),
    }
}

/// `requests/minute`, `tokens/day`.
pub fn limit_kind(limit: Option<&proto::RateLimit>) -> String {
    let Some(limit) = limit else {
        return "-".into();
    };
    let unit = match proto::RateLimitUnit::try_from(limit.unit) {
        Ok(proto::RateLimitUnit::Requests) => "requests".to_owned(),
        Ok(proto::RateLimitUnit::Tokens) => "tokens".to_owned(),
        _ => unknown(limit.unit),
    };
    let window = match proto::RateLimitWindow::try_from(limit.window) {
        Ok(proto::RateLimitWindow::Minute) => "minute".to_owned(),
        Ok(proto::RateLimitWindow::Hour) => "hour".to_owned(),
        Ok(proto::RateLimitWindow::Day) => "day".to_owned(),
        _ => unknown(limit.window),
    };
    format!("{unit}/{window}")
}

fn rate_limit_json(limit: &proto::RateLimit) -> Value {
    let kind = limit_kind(Some(limit));
    let (unit, window) = kind.split_once('/').unwrap_or((&kind, ""));
    json!({ "unit": unit, "window": window, "limit": limit.limit })
}

/// `100 requests/minute, 50000 tokens/day`; `default` when the key names none.
fn rate_limits_cell(limits: &[proto::RateLimit]) -> String {
    if limits.is_empty() {
        return "default".into();
    }
    limits
        .iter()
        .map(|l| format!("{} {}", l.limit, limit_kind(Some(l))))
        .collect::<Vec<_>>()
        .join(", ")
}

fn resource_access_mode(raw: i32) -> String {
    match proto::ResourceAccessMode::try_from(raw) {
        Ok(proto::ResourceAccessMode::All | proto::ResourceAccessMode::Unspecified) => "all".into(),
        Ok(proto::ResourceAccessMode::Include) => "include".into(),
        Ok(proto::ResourceAccessMode::Exclude) => "exclude".into(),
        Err(_) => unknown(raw),
    }
}

fn sorted_metadata(map: &std::collections::HashMap<String, String>) -> Vec<(&String, &String)> {
    let mut pairs: Vec<_> = map.iter().collect();
    pairs.sort();
    pairs
}

pub fn key_info_json(k: &proto::KeyInfo) -> Value {
    let metadata: serde_json::Map<String, Value> = sorted_metadata(&k.metadata)
        .into_iter()
        .map(|(key, value)| (key.clone(), Value::String(value.clone())))
        .collect();
    json!({
        "key_id": k.key_id,
        "workspace_id": k.workspace_id,
        "name": k.name,
        "environment": environment(k.environment),
        "display": k.display,
        "scopes": k.scopes,
        "status": key_status(k.status),
        "owner": owner(k.owner.as_ref()),
        "team_id": (!k.team_id.is_empty()).then_some(&k.team_id),
        "created_by": k.created_by,
        "created_at": time(k.created_at.as_ref()),
        "updated_at": time(k.updated_at.as_ref()),
        "expires_at": time(k.expires_at.as_ref()),
        "rotated_at": time(k.rotated_at.as_ref()),
        "revoked_at": time(k.revoked_at.as_ref()),
        "revoke_reason": (!k.revoke_reason.is_empty()).then_some(&k.revoke_reason),
        "last_used_at": time(k.last_used_at.as_ref()),
        "metadata": metadata,
        "rate_limits": k.rate_limits.iter().map(rate_limit_json).collect::<Vec<_>>(),
        "max_budget_micros": k.max_budget_micros,
        "budget_period": budget_period(k),
        "spent_micros": k.spent_micros,
        "budget_period_start": time(k.budget_period_start.as_ref()),
        "budget_resets_at": time(k.budget_resets_at.as_ref()),
        "resource_access": reach_json(k.resource_access.as_ref()),
        "allowed_cidrs": k.allowed_cidrs,
    })
}

/// A key's budget period as `--budget-period` takes it.
fn budget_period(k: &proto::KeyInfo) -> String {
    period_text(k.budget_period, k.budget_period_days)
}

/// A budget period as `--budget-period` takes it.
fn period_text(period: i32, days: u32) -> String {
    match proto::BudgetPeriod::try_from(period) {
        Ok(proto::BudgetPeriod::Unspecified) => "lifetime".into(),
        Ok(proto::BudgetPeriod::Daily) => "daily".into(),
        Ok(proto::BudgetPeriod::Weekly) => "weekly".into(),
        Ok(proto::BudgetPeriod::Monthly) => "monthly".into(),
        Ok(proto::BudgetPeriod::RollingDays) => format!("{days}d"),
        Err(_) => unknown(period),
    }
}

/// A pool's budget in JSON (`null` for none).
fn pool_budget_json(b: Option<&proto::PoolBudget>) -> Value {
    match b {
        None => Value::Null,
        Some(b) => json!({
            "max_budget_micros": b.max_budget_micros,
            "budget_period": period_text(b.budget_period, b.budget_period_days),
            "spent_micros": b.spent_micros,
            "budget_period_start": time(b.budget_period_start.as_ref()),
            "budget_resets_at": time(b.budget_resets_at.as_ref()),
        }),
    }
}

/// A pool's budget in a table: `500.00 monthly, spent 12.50`, or `none`.
fn pool_budget_cell(b: Option<&proto::PoolBudget>) -> String {
    match b {
        None => "none".to_owned(),
        Some(b) => format!(
            "{} {}, spent {}",
            money(b.max_budget_micros),
            period_text(b.budget_period, b.budget_period_days),
            money(b.spent_micros)
        ),
    }
}

/// Every field of one key, one per line.
pub fn key_info_fields(k: &proto::KeyInfo) -> Vec<(&'static str, String)> {
    let access_cell = reach_cell(k.resource_access.as_ref());
    let metadata = sorted_metadata(&k.metadata)
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        ("key_id", k.key_id.clone()),
        ("workspace_id", k.workspace_id.clone()),
        ("name", k.name.clone()),
        ("environment", environment(k.environment)),
        ("display", k.display.clone()),
        ("status", key_status(k.status)),
        ("scopes", k.scopes.join(", ")),
        ("owner", owner(k.owner.as_ref()).unwrap_or_default()),
        ("team_id", k.team_id.clone()),
        ("created_by", k.created_by.clone()),
        ("created_at", time_cell(k.created_at.as_ref())),
        ("updated_at", time_cell(k.updated_at.as_ref())),
        ("expires_at", time_cell(k.expires_at.as_ref())),
        ("rotated_at", time_cell(k.rotated_at.as_ref())),
        ("revoked_at", time_cell(k.revoked_at.as_ref())),
        ("revoke_reason", k.revoke_reason.clone()),
        ("last_used_at", time_cell(k.last_used_at.as_ref())),
        ("rate_limits", rate_limits_cell(&k.rate_limits)),
        (
            "budget",
            k.max_budget_micros
                .map(money)
                .unwrap_or_else(|| "none".into()),
        ),
        ("budget_period", budget_period(k)),
        ("spent", money(k.spent_micros)),
        ("budget_resets_at", time_cell(k.budget_resets_at.as_ref())),
        ("resource_access", access_cell),
        ("allowed_cidrs", k.allowed_cidrs.join(", ")),
        ("metadata", metadata),
    ]
}

/// `include: gpt-4o, group:frontier`, or `all`.
fn reach_cell(access: Option<&proto::ResourceAccess>) -> String {
    let access = access.cloned().unwrap_or_default();
    let mode = resource_access_mode(access.mode);
    let listed: Vec<String> = access
        .targets
        .iter()
        .cloned()
        .chain(access.access_groups.iter().map(|g| format!("group:{g}")))
        .collect();
    if listed.is_empty() {
        mode
    } else {
        format!("{mode}: {}", listed.join(", "))
    }
}

fn reach_json(access: Option<&proto::ResourceAccess>) -> Value {
    let access = access.cloned().unwrap_or_default();
    json!({
        "mode": resource_access_mode(access.mode),
        "targets": access.targets,
        "access_groups": access.access_groups,
    })
}

pub fn team_json(t: &proto::Team) -> Value {
    let p = t.policy.clone().unwrap_or_default();
    json!({
        "workspace_id": t.workspace_id,
        "team_id": t.team_id,
        "name": t.name,
        "policy": {
            "self_service_enabled": p.self_service_enabled,
            "max_keys_per_user": p.max_keys_per_user,
            "max_budget_micros": p.max_budget_micros,
            "require_expiry": p.require_expiry,
            "max_expiry_days": p.max_expiry_days,
            "rate_limit_ceilings": p.rate_limit_ceilings.iter().map(rate_limit_json).collect::<Vec<_>>(),
            "resource_access": reach_json(p.resource_access.as_ref()),
        },
        "pool": t.rate_limits.iter().map(rate_limit_json).collect::<Vec<_>>(),
        "pool_budget": pool_budget_json(t.budget.as_ref()),
        "created_at": time(t.created_at.as_ref()),
        "updated_at": time(t.updated_at.as_ref()),
    })
}

pub fn team_fields(t: &proto::Team) -> Vec<(&'static str, String)> {
    let p = t.policy.clone().unwrap_or_default();
    let ceilings = if p.rate_limit_ceilings.is_empty() {
        "none".to_owned()
    } else {
        rate_limits_cell(&p.rate_limit_ceilings)
    };
    vec![
        ("workspace_id", t.workspace_id.clone()),
        ("team_id", t.team_id.clone()),
        ("name", t.name.clone()),
        ("self_service", p.self_service_enabled.to_string()),
        ("max_keys_per_user", p.max_keys_per_user.to_string()),
        (
            "max_budget",
            p.max_budget_micros
                .map(money)
                .unwrap_or_else(|| "none".into()),
        ),
        ("require_expiry", p.require_expiry.to_string()),
        ("max_expiry_days", p.max_expiry_days.to_string()),
        ("rate_limit_ceilings", ceilings),
        ("resource_access", reach_cell(p.resource_access.as_ref())),
        ("pool", pool_cell(&t.rate_limits)),
        ("pool_budget", pool_budget_cell(t.budget.as_ref())),
        ("created_at", time_cell(t.created_at.as_ref())),
        ("updated_at", time_cell(t.updated_at.as_ref())),
    ]
}

pub fn team_table(teams: &[proto::Team]) -> Table {
    let mut table = Table::new(&["TEAM", "NAME", "SELF-SERVICE", "REACH", "CREATED"]);
    for t in teams {
        let p = t.policy.clone().unwrap_or_default();
        table.row(vec![
            t.team_id.clone(),
            t.name.clone(),
            p.self_service_enabled.to_string(),
            reach_cell(p.resource_access.as_ref()),
            time_cell(t.created_at.as_ref()),
        ]);
    }
    table
}

pub fn service_account_json(a: &proto::ServiceAccount) -> Value {
    json!({
        "workspace_id": a.workspace_id,
        "team_id": a.team_id,
        "service_account_id": a.service_account_id,
        "name": a.name,
        "created_at": time(a.created_at.as_ref()),
    })
}

pub fn service_account_table(accounts: &[proto::ServiceAccount]) -> Table {
    let mut table = Table::new(&["SERVICE ACCOUNT", "NAME", "TEAM", "CREATED"]);
    for a in accounts {
        table.row(vec![
            a.service_account_id.clone(),
            a.name.clone(),
            a.team_id.clone(),
            time_cell(a.created_at.as_ref()),
        ]);
    }
    table
}

pub fn access_group_json(g: &proto::AccessGroup) -> Value {
    json!({
        "workspace_id": g.workspace_id,
        "name": g.name,
        "targets": g.targets,
        "created_at": time(g.created_at.as_ref()),
        "updated_at": time(g.updated_at.as_ref()),
    })
}

pub fn access_group_table(groups: &[proto::AccessGroup]) -> Table {
    let mut table = Table::new(&["ACCESS GROUP", "TARGETS", "UPDATED"]);
    for g in groups {
        table.row(vec![
            g.name.clone(),
            g.targets.join(", "),
            time_cell(g.updated_at.as_ref()),
        ]);
    }
    table
}

/// The columns of `keys list`.
pub fn key_table(keys: &[proto::KeyInfo]) -> Table {
    let mut table = Table::new(&[
        "KEY ID",
        "NAME",
        "ENV",
        "STATUS",
        "SCOPES",
        "OWNER",
        "DISPLAY",
        "EXPIRES",
        "LAST USED",
    ]);
    for k in keys {
        table.row(vec![
            k.key_id.clone(),
            k.name.clone(),
            environment(k.environment),
            key_status(k.status),
            k.scopes.join(","),
            owner(k.owner.as_ref()).unwrap_or_default(),
            k.display.clone(),
            time_cell(k.expires_at.as_ref()),
            time_cell(k.last_used_at.as_ref()),
        ]);
    }
    table
}

pub fn audit_event_json(e: &proto::AuditEvent) -> Value {
    json!({
        "id": e.id,
        "occurred_at": time(e.occurred_at.as_ref()),
        "workspace_id": e.workspace_id,
        "action": e.action,
        "outcome": audit_outcome(e.outcome),
        "actor_id": e.actor_id,
        "caller": e.caller,
        "key_id": (!e.key_id.is_empty()).then_some(&e.key_id),
        "detail": e.detail,
    })
}

pub fn audit_table(events: &[proto::AuditEvent]) -> Table {
    let mut table = Table::new(&[
        "TIME", "ACTION", "OUTCOME", "ACTOR", "CALLER", "KEY ID", "DETAIL",
    ]);
    for e in events {
        table.row(vec![
            time_cell(e.occurred_at.as_ref()),
            e.action.clone(),
            audit_outcome(e.outcome),
            e.actor_id.clone(),
            e.caller.clone(),
            e.key_id.clone(),
            e.detail.clone(),
        ]);
    }
    table
}

/// A provider key as every response but a resolve shows it: masked.
pub fn provider_key_json(p: &proto::ProviderKeyInfo) -> Value {
    json!({
        "workspace_id": p.workspace_id,
        "provider": provider(p.provider),
        "masked_key": masked(&p.last_four),
        "last_four": p.last_four,
        "kek_version": p.kek_version,
        "created_at": time(p.created_at.as_ref()),
        "updated_at": time(p.updated_at.as_ref()),
    })
}

pub fn provider_key_table(keys: &[proto::ProviderKeyInfo]) -> Table {
    let mut table = Table::new(&["PROVIDER", "KEY", "KEK", "CREATED", "UPDATED"]);
    for p in keys {
        table.row(vec![
            provider(p.provider),
            masked(&p.last_four),
            format!("v{}", p.kek_version),
            time_cell(p.created_at.as_ref()),
            time_cell(p.updated_at.as_ref()),
        ]);
    }
    table
}

pub fn webhook_json(w: &proto::Webhook) -> Value {
    json!({
        "webhook_id": w.webhook_id,
        "workspace_id": w.workspace_id,
        "url": w.url,
        "event_types": w.event_types,
        "created_at": time(w.created_at.as_ref()),
        "disabled_at": time(w.disabled_at.as_ref()),
        "failures": w.failures,
        "failing_since": time(w.failing_since.as_ref()),
        "last_error": w.last_error,
        "next_attempt_at": time(w.next_attempt_at.as_ref()),
    })
}

pub fn webhook_table(hooks: &[proto::Webhook]) -> Table {
    let mut table = Table::new(&["WEBHOOK", "URL", "EVENTS", "STATE", "CREATED"]);
    for w in hooks {
        let state = match (&w.disabled_at, w.failures) {
            (Some(at), _) => format!("disabled {}", time_cell(Some(at))),
            (None, 0) => "ok".to_owned(),
            (None, n) => format!("failing ({n}): {}", w.last_error),
        };
        table.row(vec![
            w.webhook_id.clone(),
            w.url.clone(),
            w.event_types.join(","),
            state,
            time_cell(w.created_at.as_ref()),
        ]);
    }
    table
}

/// `****abcd`: all a response ever shows of a provider key is its last four characters.
fn masked(last_four: &str) -> String {
    format!("****{last_four}")
}

/// A pool's limits, or `none`.
fn pool_cell(limits: &[proto::RateLimit]) -> String {
    if limits.is_empty() {
        "none".to_owned()
    } else {
        rate_limits_cell(limits)
    }
}

pub fn owner_limits_json(o: &proto::OwnerLimits) -> Value {
    json!({
        "workspace_id": o.workspace_id,
        "owner": owner(o.owner.as_ref()),
        "pool": o.rate_limits.iter().map(rate_limit_json).collect::<Vec<_>>(),
        "pool_budget": pool_budget_json(o.budget.as_ref()),
    })
}

pub fn owner_limits_fields(o: &proto::OwnerLimits) -> Vec<(&'static str, String)> {
    vec![
        ("workspace_id", o.workspace_id.clone()),
        ("owner", owner(o.owner.as_ref()).unwrap_or_default()),
        ("pool", pool_cell(&o.rate_limits)),
        ("pool_budget", pool_budget_cell(o.budget.as_ref())),
    ]
}

pub fn usage_json(r: &proto::UsageRecord) -> Value {
    let by = r.refused_by_reason.unwrap_or_default();
    json!({
        "group": r.group,
        "bucket_start": time(r.bucket_start.as_ref()),
        "admitted": r.admitted,
        "refused": r.refused,
        "refused_by_reason": {
            "rate_limited": by.rate_limited,
            "budget_exceeded": by.budget_exceeded,
            "insufficient_scope": by.insufficient_scope,
            "resource_forbidden": by.resource_forbidden,
            "ip_forbidden": by.ip_forbidden,
            "revoked": by.revoked,
            "expired": by.expired,
            "plan_forbids_keys": by.plan_forbids_keys,
        },
        "tokens": r.tokens,
        "spend_micros": r.spend_micros,
    })
}

pub fn usage_table(records: &[proto::UsageRecord]) -> Table {
    let mut table = Table::new(&["FROM", "GROUP", "ADMITTED", "REFUSED", "TOKENS", "SPEND"]);
    for r in records {
        table.row(vec![
            time_cell(r.bucket_start.as_ref()),
            if r.group.is_empty() {
                "(no team)".to_owned()
            } else {
                r.group.clone()
            },
            r.admitted.to_string(),
            r.refused.to_string(),
            r.tokens.to_string(),
            money(r.spend_micros),
        ]);
    }
    table
}

pub fn workspace_json(w: &proto::Workspace) -> Value {
    json!({
        "workspace_id": w.workspace_id,
        "name": w.name,
        "plan": plan(w.plan),
        "api_keys_allowed": w.api_keys_allowed,
        "byok_allowed": w.byok_allowed,
        "pool": w.rate_limits.iter().map(rate_limit_json).collect::<Vec<_>>(),
        "pool_budget": pool_budget_json(w.budget.as_ref()),
        "created_at": time(w.created_at.as_ref()),
        "updated_at": time(w.updated_at.as_ref()),
    })
}

pub fn workspace_table(workspaces: &[proto::Workspace]) -> Table {
    let mut table = Table::new(&["WORKSPACE", "NAME", "PLAN", "API KEYS", "BYOK", "CREATED"]);
    for w in workspaces {
        table.row(vec![
            w.workspace_id.clone(),
            w.name.clone(),
            plan(w.plan),
            w.api_keys_allowed.to_string(),
            w.byok_allowed.to_string(),
            time_cell(w.created_at.as_ref()),
        ]);
    }
    table
}

pub fn workspace_fields(w: &proto::Workspace) -> Vec<(&'static str, String)> {
    vec![
        ("workspace_id", w.workspace_id.clone()),
        ("name", w.name.clone()),
        ("plan", plan(w.plan)),
        ("api_keys_allowed", w.api_keys_allowed.to_string()),
        ("byok_allowed", w.byok_allowed.to_string()),
        ("pool", pool_cell(&w.rate_limits)),
        ("pool_budget", pool_budget_cell(w.budget.as_ref())),
        ("created_at", time_cell(w.created_at.as_ref())),
        ("updated_at", time_cell(w.updated_at.as_ref())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_show_unset_cells_as_a_dash() {
        let mut t = Table::new(&["ID", "NAME", "X"]);
        t.row(vec!["key_1".into(), "a".into(), "1".into()]);
        t.row(vec!["k".into(), String::new(), "22".into()]);
        assert_eq!(
            t.render(),
            "ID     NAME  X\nkey_1  a     1\nk      -     22\n"
        );
    }

    #[test]
    fn control_characters_are_escaped_not_printed() {
        let text = fields(&[("name", "evil\n\u{1b}[2Jname".into())]);
        assert_eq!(text, "name  evil\\n\\u{1b}[2Jname\n");
    }

    #[test]
    fn money_keeps_two_decimals_at_least() {
        assert_eq!(money(5_000_000), "5.00");
        assert_eq!(money(1500), "0.0015");
        assert_eq!(money(12_500_000), "12.50");
        assert_eq!(money(1), "0.000001");
        assert_eq!(money(0), "0.00");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let ts = prost_types::Timestamp {
            seconds: 1_896_048_000,
            nanos: 250_000_000,
        };
        assert_eq!(time(Some(&ts)).unwrap(), "2030-01-31T00:00:00.250Z");
        assert_eq!(time_cell(Some(&ts)), "2030-01-31T00:00:00Z");
        assert_eq!(time_cell(None), "-");
        assert_eq!(unix_seconds(0), "1970-01-01T00:00:00Z");
    }
}
