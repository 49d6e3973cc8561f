//! The admin CLI (`keywarden keys ...`, `verify`, `provider-keys ...`, `audit list`,
//! `workspaces ...`): a client of a running server over gRPC, in the same binary, as
//! `vault` is for Vault.
//!
//! It speaks only the public API (the generated tonic clients), so it can do nothing an
//! admin backend cannot, and every mutation is audited under the actor it names.
//!
//! Exit status: 0 on success; 1 when `verify` answers that the key is not valid; 2 on any
//! error (a usage error, an unreachable server, a gRPC error printed as
//! `error: <CODE>: <message>`). Secrets given to it (caller token, provider key, a key to
//! verify) are held in wrappers that never print them; a new key's plaintext and a new
//! webhook signing secret are the secrets it prints, once, on stdout.

mod access_groups;
mod audit;
mod keys;
mod output;
mod parse;
mod policy_args;
mod provider_keys;
mod teams;
mod usage;
mod verify;
mod webhooks;
mod workspaces;

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

pub use access_groups::AccessGroupsArgs;
pub use audit::AuditArgs;
pub use keys::KeysArgs;
pub use output::Format;
pub use provider_keys::ProviderKeysArgs;
pub use teams::{ServiceAccountsArgs, TeamsArgs};
pub use usage::UsageArgs;
pub use verify::VerifyArgs;
pub use webhooks::WebhooksArgs;
pub use workspaces::WorkspacesArgs;

use crate::bearer::Bearer;
use crate::proto;

/// The exit status of `verify` when the key is not valid.
pub const EXIT_NOT_VALID: u8 = 1;
/// The exit status of every error.
pub const EXIT_ERROR: u8 = 2;

/// The server address used when neither `--addr` nor `KEYWARDEN_ADDR` is set.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// How long connecting may take before the CLI gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most bytes read from stdin for a secret (keys are far shorter; this bounds a
/// mistaken pipe of a large file).
const MAX_STDIN_BYTES: u64 = 64 * 1024;

/// The admin commands, flattened into the binary's top-level commands.
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Issue, show, list, update, rotate, revoke and delete API keys.
    Keys(KeysArgs),
    /// Check a key as a service does on every request. Exit status 0: valid; 1: not
    /// valid (the code says why); 2: error.
    Verify(VerifyArgs),
    /// A workspace's own provider keys (BYOK), always shown masked.
    ProviderKeys(ProviderKeysArgs),
    /// A workspace's audit log.
    Audit(AuditArgs),
    /// Workspaces (tenants): create, show, list, rename, change plan.
    Workspaces(WorkspacesArgs),
    /// Teams and their self-service policy.
    Teams(TeamsArgs),
    /// A team's service accounts: owners of its keys that are not people.
    ServiceAccounts(ServiceAccountsArgs),
    /// Access groups: named sets of targets a reach can name.
    AccessGroups(AccessGroupsArgs),
    /// A workspace's usage history: admitted, refused, tokens and spend, per hour or day,
    /// by key, owner, team or workspace.
    Usage(UsageArgs),
    /// A workspace's webhook endpoints: create, list, delete, rotate the signing secret.
    Webhooks(WebhooksArgs),
}

/// Where the server is, who is calling, and how to print: accepted before or after the
/// subcommand.
#[derive(Args)]
pub struct Connection {
    /// The server's address.
    #[arg(long, env = "KEYWARDEN_ADDR", default_value = DEFAULT_ADDR, global = true, help_heading = "Connection")]
    addr: String,
    /// The caller token (role `admin`; `verifier` for `verify`). Prefer the variable: a
    /// flag stays in the shell history.
    #[arg(
        long,
        env = "KEYWARDEN_TOKEN",
        hide_env_values = true,
        value_parser = parse::secret,
        global = true,
        help_heading = "Connection"
    )]
    token: Option<SecretString>,
    /// Output format.
    #[arg(
        long,
        short = 'o',
        value_enum,
        default_value = "table",
        global = true,
        help_heading = "Connection"
    )]
    output: Format,
}

/// The principal a mutation is recorded under, and the permissions it holds (the RBAC
/// ceiling: a key never gets a scope its issuer does not hold).
#[derive(Args)]
pub struct ActorArgs {
    /// The acting principal's id, recorded in the audit log.
    #[arg(
        long = "actor-id",
        env = "KEYWARDEN_ACTOR",
        value_name = "ID",
        help_heading = "Actor"
    )]
    id: String,
    /// A permission the actor holds (repeatable, or comma-separated in the variable).
    #[arg(
        long = "actor-permission",
        env = "KEYWARDEN_ACTOR_PERMISSIONS",
        value_name = "PERMISSION",
        value_delimiter = ',',
        default_value = "admin",
        help_heading = "Actor"
    )]
    permissions: Vec<String>,
}

impl ActorArgs {
    fn proto(&self) -> proto::Actor {
        proto::Actor {
            id: self.id.clone(),
            permissions: self.permissions.clone(),
        }
    }
}

/// Why a command failed. Display never includes a secret: the server's messages never
/// hold one, and the CLI's own messages name flags, not values.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(Status),
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Rpc(status)
    }
}

/// The canonical gRPC name (`INVALID_ARGUMENT`), as the API documentation writes codes.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Runs one admin command and returns the process's exit status; errors are printed to
/// stderr as `error: ...`.
pub async fn run(command: AdminCommand) -> ExitCode {
    let result = match command {
        AdminCommand::Keys(args) => keys::run(args).await,
        AdminCommand::Verify(args) => verify::run(args).await,
        AdminCommand::ProviderKeys(args) => provider_keys::run(args).await,
        AdminCommand::Audit(args) => audit::run(args).await,
        AdminCommand::Workspaces(args) => workspaces::run(args).await,
        AdminCommand::Usage(args) => usage::run(args).await,
        AdminCommand::Teams(args) => teams::run(args).await,
        AdminCommand::ServiceAccounts(args) => teams::run_service_accounts(args).await,
        AdminCommand::AccessGroups(args) => access_groups::run(args).await,
        AdminCommand::Webhooks(args) => webhooks::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// A connection to the server with the caller token, and the chosen output format.
pub struct Session {
    channel: Channel,
    bearer: Bearer,
    pub format: Format,
}

impl Session {
    /// Connects now, so that an unreachable server is reported as such, once.
    pub async fn open(conn: &Connection) -> Result<Session, CliError> {
        let token = conn.token.as_ref().ok_or_else(|| {
            CliError::Usage("no caller token: pass --token or set KEYWARDEN_TOKEN".into())
        })?;
        let bearer = Bearer::sensitive(token.expose_secret()).map_err(|_| {
            CliError::Usage(
                "the caller token is not a valid header value (printable ASCII only)".into(),
            )
        })?;
        // `host:port` alone means plaintext HTTP/2, as the dev server speaks.
        let addr = if conn.addr.contains("://") {
            conn.addr.clone()
        } else {
            format!("http://{}", conn.addr)
        };
        let connect_error = |why: String| CliError::Connect {
            addr: addr.clone(),
            why,
        };
        let endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| connect_error(chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| connect_error(chain(&e)))?;
        Ok(Session {
            channel,
            bearer,
            format: conn.output,
        })
    }

    pub fn usage(&self) -> proto::usage_service_client::UsageServiceClient<Authed> {
        proto::usage_service_client::UsageServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn keys(&self) -> proto::key_service_client::KeyServiceClient<Authed> {
        proto::key_service_client::KeyServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn verifier(&self) -> proto::verify_service_client::VerifyServiceClient<Authed> {
        proto::verify_service_client::VerifyServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn provider_keys(
        &self,
    ) -> proto::provider_key_service_client::ProviderKeyServiceClient<Authed> {
        proto::provider_key_service_client::ProviderKeyServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn webhooks(&self) -> proto::webhook_service_client::WebhookServiceClient<Authed> {
        proto::webhook_service_client::WebhookServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn teams(&self) -> proto::team_service_client::TeamServiceClient<Authed> {
        proto::team_service_client::TeamServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn access_groups(
        &self,
    ) -> proto::access_group_service_client::AccessGroupServiceClient<Authed> {
        proto::access_group_service_client::AccessGroupServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn workspaces(&self) -> proto::workspace_service_client::WorkspaceServiceClient<Authed> {
        proto::workspace_service_client::WorkspaceServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }
}

/// An error and its causes on one line ("transport error: tcp connect error: Connection
/// refused (os error 111)"): tonic's own Display says only "transport error".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// A secret piped on stdin (`echo "$KEY" | keywarden verify -`), so that it never appears
/// in the shell history or the process list. Surrounding whitespace (the newline of
/// `echo`) is dropped.
fn read_stdin_secret(what: &str) -> Result<Zeroizing<String>, CliError> {
    let mut buffer = Zeroizing::new(String::new());
    std::io::stdin()
        .lock()
        .take(MAX_STDIN_BYTES)
        .read_to_string(&mut buffer)
        .map_err(|e| CliError::Usage(format!("cannot read {what} from stdin: {e}")))?;
    let trimmed = Zeroizing::new(buffer.trim().to_owned());
    if trimmed.is_empty() {
        return Err(CliError::Usage(format!("no {what} on stdin")));
    }
    Ok(trimmed)
}

/// Warns that the plaintext on stdout is shown this once.
fn warn_shown_once() {
    eprintln!(
        "warning: this is the only time the key is shown; store it now (a secret manager, not a file in a repository)"
    );
}

/// One page from `first` (empty: the first page), or with `all` every page after it:
/// `fetch` asks for the page at a token and gives its items and the next token. Returns
/// the items and the token of the first page not fetched (empty: none left).
async fn pages<T, F, Fut>(
    first: String,
    all: bool,
    mut fetch: F,
) -> Result<(Vec<T>, String), CliError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), CliError>>,
{
    let mut items = Vec::new();
    let mut token = first;
    loop {
        let (page, next) = fetch(token.clone()).await?;
        items.extend(page);
        // A server that hands back the token it was given would loop forever.
        if !all || next.is_empty() || next == token {
            return Ok((items, next));
        }
        token = next;
    }
}

/// Now plus `d`, as a timestamp (for `--expires-in`).
fn in_future(d: Duration) -> prost_types::Timestamp {
    let at = std::time::SystemTime::now() + d;
    prost_types::Timestamp::from(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_canonical_code() {
        let e = CliError::from(Status::invalid_argument("name: is required"));
        assert_eq!(e.to_string(), "INVALID_ARGUMENT: name: is required");
        let e = CliError::from(Status::unauthenticated("unknown caller token"));
        assert_eq!(e.to_string(), "UNAUTHENTICATED: unknown caller token");
    }
}
