//! `keywarden verify KEY`: VerifyKey, as a service calls it on every request. Exit status
//! 0 when the key is valid, 1 when it is not (the code says why), 2 on an error.

use std::process::ExitCode;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::output::{self, Format};
use super::{CliError, Connection, EXIT_NOT_VALID, Session, parse, read_stdin_secret};
use crate::proto;

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    conn: Connection,
    /// The key to check, or `-` to read it from stdin (keeps it out of the shell history).
    #[arg(value_parser = parse::secret, value_name = "KEY")]
    key: SecretString,
    /// A scope the request needs (repeatable; implied scopes count).
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// The resource (e.g. a model name) the request is for.
    #[arg(long, default_value = "")]
    resource: String,
    /// The end client's IP address, for keys with a network allowlist.
    #[arg(long, default_value = "")]
    client_ip: String,
    /// Requests this call counts for against the key's rate limits (default 1).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    cost: u64,
}

pub async fn run(args: VerifyArgs) -> Result<ExitCode, CliError> {
    // Read before connecting: a missing key on stdin is a usage error, not a network one.
    let key = if args.key.expose_secret() == "-" {
        SecretString::from(read_stdin_secret("key")?.as_str())
    } else {
        args.key
    };
    let session = Session::open(&args.conn).await?;
    let answer = session
        .verifier()
        .verify_key(proto::VerifyKeyRequest {
            key: key.expose_secret().to_owned(),
            required_scopes: args.scopes,
            cost: args.cost,
            resource: args.resource,
            client_ip: args.client_ip,
        })
        .await?
        .into_inner();
    match session.format {
        Format::Json => output::emit_json(&answer_json(&answer))?,
        Format::Table => output::emit(&output::fields(&answer_fields(&answer)))?,
    }
    Ok(if answer.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_VALID)
    })
}

fn answer_json(a: &proto::VerifyKeyResponse) -> serde_json::Value {
    let rate_limit = a.rate_limit.as_ref().map(|r| {
        json!({
            "allowed": r.allowed,
            "limit": r.limit,
            "remaining": r.remaining,
            "reset_at": output::unix_seconds(r.reset_at),
            "retry_after_seconds": r.retry_after.as_ref().map(retry_seconds),
            "windows": r.windows.iter().map(|w| {
                let kind = output::limit_kind(w.limit.as_ref());
                json!({
                    "window": kind,
                    "limit": w.limit.as_ref().map(|l| l.limit),
                    "used": w.used,
                    "remaining": w.remaining,
                    "reset_at": output::unix_seconds(w.reset_at),
                    "allowed": w.allowed,
                })
            }).collect::<Vec<_>>(),
        })
    });
    let mut metadata: Vec<_> = a.metadata.iter().collect();
    metadata.sort();
    json!({
        "valid": a.valid,
        "code": output::verify_code(a.code),
        "key_id": (!a.key_id.is_empty()).then_some(&a.key_id),
        "workspace_id": (!a.workspace_id.is_empty()).then_some(&a.workspace_id),
        "environment": (!a.key_id.is_empty()).then(|| output::environment(a.environment)),
        "scopes": a.scopes,
        "owner": output::owner(a.owner.as_ref()),
        "expires_at": output::time(a.expires_at.as_ref()),
        "metadata": metadata.into_iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "rate_limit": rate_limit,
        "rate_limit_unknown": a.rate_limit_unknown,
        "max_budget_micros": a.max_budget_micros,
        "spent_micros": a.spent_micros,
    })
}

/// Whole seconds, rounded up, as a gateway's `Retry-After` takes them.
fn retry_seconds(d: &prost_types::Duration) -> i64 {
    d.seconds + i64::from(d.nanos > 0)
}

fn answer_fields(a: &proto::VerifyKeyResponse) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("valid", a.valid.to_string()),
        ("code", output::verify_code(a.code)),
    ];
    // Only a key that was found has the rest.
    if a.key_id.is_empty() {
        return fields;
    }
    fields.extend([
        ("key_id", a.key_id.clone()),
        ("workspace_id", a.workspace_id.clone()),
        ("environment", output::environment(a.environment)),
        ("scopes", a.scopes.join(", ")),
        ("owner", output::owner(a.owner.as_ref()).unwrap_or_default()),
        ("expires_at", output::time_cell(a.expires_at.as_ref())),
    ]);
    if a.rate_limit_unknown {
        fields.push((
            "rate_limit",
            "unknown: the counters could not be reached; let through uncounted".into(),
        ));
    }
    if let Some(r) = &a.rate_limit {
        fields.push((
            "rate_limit",
            format!(
                "{}: {} of {} remaining, whole again at {}",
                if r.allowed { "allowed" } else { "refused" },
                r.remaining,
                r.limit,
                output::unix_seconds(r.reset_at)
            ),
        ));
        if let Some(retry) = &r.retry_after {
            fields.push(("retry_after", format!("{}s", retry_seconds(retry))));
        }
        for w in &r.windows {
            fields.push((
                "window",
                format!(
                    "{}: {} used, {} remaining of {}, whole again at {}",
                    output::limit_kind(w.limit.as_ref()),
                    w.used,
                    w.remaining,
                    w.limit.as_ref().map(|l| l.limit).unwrap_or(0),
                    output::unix_seconds(w.reset_at)
                ),
            ));
        }
    }
    fields.push((
        "budget",
        a.max_budget_micros
            .map(output::money)
            .unwrap_or_else(|| "none".into()),
    ));
    fields.push(("spent", output::money(a.spent_micros)));
    fields
}
