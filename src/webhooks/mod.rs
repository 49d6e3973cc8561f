//! Webhooks: a workspace's endpoints (create, list, delete, rotate the signing secret;
//! audited, admin only) and their delivery (`dispatch.rs`, over the HTTP client of
//! `client.rs`).
//!
//! What an endpoint receives comes from the outbox the key mutations write in their own
//! transactions (`store::sql::webhooks`), and from the expiry and budget sweeps; nothing
//! here runs on an RPC's path but the endpoint management itself. The rules (event
//! types, URL shape, the SSRF rule, the signature, the retry schedule) are
//! `domain::webhook`'s.
//!
//! A signing secret is shown once, by CreateWebhook or RotateWebhookSecret; it is stored
//! sealed under the KEK ring as provider keys are (the webhook's identity bound in as
//! associated data), opened only to sign a delivery, and never logged or listed.

mod client;
mod dispatch;

pub use client::{Client, DeliveryError};
pub use dispatch::Dispatcher;

use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::crypto::{CryptoError, KekRing, Sealed};
use crate::domain::ids;
use crate::domain::webhook::{EventType, WebhookUrl};
use crate::store::{Acting, Store, StoreError, WebhookRecord};

/// How webhooks are delivered on this replica.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub enabled: bool,
    /// Endpoints may name, and deliveries reach, private and loopback addresses.
    pub allow_private: bool,
    /// When `key.expiring` notices go out, before `expires_at`.
    pub expiry_leads: Vec<Duration>,
    pub poll_interval: Duration,
    /// How often the expiry and budget notices due are looked for.
    pub sweep_interval: Duration,
    /// One delivery's bound: connect, TLS, answer.
    pub timeout: Duration,
    /// Endpoints delivered to at once.
    pub max_concurrent: usize,
    /// Outbox events every endpoint is past are pruned after this long.
    pub retention: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            enabled: true,
            allow_private: false,
            expiry_leads: vec![
                Duration::from_secs(7 * 24 * 3600),
                Duration::from_secs(24 * 3600),
            ],
            poll_interval: Duration::from_secs(1),
            sweep_interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            max_concurrent: 8,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("no key-encryption key (KEK) is configured: webhook signing secrets cannot be stored")]
    NoKek,
    #[error("workspace {0} does not exist")]
    WorkspaceNotFound(String),
    #[error("webhook {0} does not exist in this workspace")]
    NotFound(String),
    #[error("{0}")]
    Refused(crate::domain::refusal::Refusal),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the operating system's random source failed")]
    Randomness,
}

/// An endpoint and its signing secret, to be shown once.
pub struct WithSecret {
    pub webhook: WebhookRecord,
    pub secret: Zeroizing<String>,
}

impl std::fmt::Debug for WithSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithSecret")
            .field("webhook", &self.webhook)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What binds a sealed signing secret to its endpoint.
pub(crate) fn associated_data(workspace_id: &str, webhook_id: &str) -> Vec<u8> {
    format!("webhook:{workspace_id}:{webhook_id}").into_bytes()
}

pub(crate) fn sealed_of(r: &WebhookRecord) -> Sealed {
    Sealed {
        kek_version: r.kek_version,
        wrapped_dek: r.wrapped_dek.clone(),
        ciphertext: r.ciphertext.clone(),
    }
}

/// Endpoint management.
pub struct Webhooks {
    store: Arc<dyn Store>,
    clock: Clock,
    ring: Option<Arc<KekRing>>,
    allow_private: bool,
}

impl Webhooks {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Clock,
        ring: Option<Arc<KekRing>>,
        allow_private: bool,
    ) -> Self {
        Webhooks {
            store,
            clock,
            ring,
            allow_private,
        }
    }

    /// Why an endpoint may not have this URL on this deployment, if it may not: a
    /// private or loopback host while the SSRF guard is on.
    pub fn refuses(&self, url: &WebhookUrl) -> Option<&'static str> {
        (!self.allow_private && url.names_private_host()).then_some(
            "names a private or loopback address, which this deployment does not deliver to \
             (webhooks.allow_private_addresses)",
        )
    }

    fn ring(&self) -> Result<&KekRing, WebhookError> {
        self.ring.as_deref().ok_or(WebhookError::NoKek)
    }

    async fn workspace(&self, workspace_id: &str) -> Result<(), WebhookError> {
        if self.store.workspace_exists(workspace_id).await? {
            Ok(())
        } else {
            Err(WebhookError::WorkspaceNotFound(workspace_id.to_owned()))
        }
    }

    fn new_secret(
        &self,
        workspace_id: &str,
        webhook_id: &str,
    ) -> Result<(Zeroizing<String>, Sealed), WebhookError> {
        let secret = Zeroizing::new(
            ids::new_webhook_secret(&mut getrandom::SysRng)
                .map_err(|_| WebhookError::Randomness)?,
        );
        let sealed = self.ring()?.seal(
            secret.as_bytes(),
            &associated_data(workspace_id, webhook_id),
        )?;
        Ok((secret, sealed))
    }

    /// A new endpoint for the events committed from now on.
    pub async fn create(
        &self,
        acting: &Acting,
        workspace_id: &str,
        url: &str,
        event_types: Vec<EventType>,
    ) -> Result<WithSecret, WebhookError> {
        self.ring()?;
        self.workspace(workspace_id).await?;
        let now = self.clock.now();
        let webhook_id =
            ids::new_webhook_id(&mut getrandom::SysRng).map_err(|_| WebhookError::Randomness)?;
        let (secret, sealed) = self.new_secret(workspace_id, &webhook_id)?;
        let record = WebhookRecord {
            webhook_id: webhook_id.clone(),
            workspace_id: workspace_id.to_owned(),
            url: url.to_owned(),
            event_types,
            kek_version: sealed.kek_version,
            wrapped_dek: sealed.wrapped_dek,
            ciphertext: sealed.ciphertext,
            created_at: now,
            updated_at: now,
            delivered_seq: 0,
            failing_since: None,
            failures: 0,
            next_attempt_at: 0,
            last_error: String::new(),
            disabled_at: None,
        };
        // The URL's path and query may hold a receiver's own token: the audit log names
        // the endpoint by id only.
        let detail = format!(
            "webhook: {webhook_id}, events: {}",
            crate::domain::webhook::join_event_types(&record.event_types)
        );
        let webhook = match self
            .store
            .insert_webhook(&record, &acting.audit("webhook.create", detail))
            .await
        {
            Ok(w) => w,
            Err(StoreError::Precondition(refusal)) => return Err(WebhookError::Refused(refusal)),
            Err(e) => return Err(e.into()),
        };
        tracing::info!(workspace_id, webhook_id, "webhook created");
        Ok(WithSecret { webhook, secret })
    }

    /// The workspace's endpoints (their secrets are never part of an answer).
    pub async fn list(&self, workspace_id: &str) -> Result<Vec<WebhookRecord>, WebhookError> {
        let found = self.store.list_webhooks(workspace_id).await?;
        if found.is_empty() {
            self.workspace(workspace_id).await?;
        }
        Ok(found)
    }

    pub async fn delete(
        &self,
        acting: &Acting,
        workspace_id: &str,
        webhook_id: &str,
    ) -> Result<(), WebhookError> {
        self.workspace(workspace_id).await?;
        let audit = acting.audit("webhook.delete", format!("webhook: {webhook_id}"));
        match self
            .store
            .delete_webhook(workspace_id, webhook_id, self.clock.now(), &audit)
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound) => Err(WebhookError::NotFound(webhook_id.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// A new signing secret; the old one signs nothing from now on.
    pub async fn rotate_secret(
        &self,
        acting: &Acting,
        workspace_id: &str,
        webhook_id: &str,
    ) -> Result<WithSecret, WebhookError> {
        self.ring()?;
        self.workspace(workspace_id).await?;
        let (secret, sealed) = self.new_secret(workspace_id, webhook_id)?;
        let audit = acting.audit("webhook.rotate_secret", format!("webhook: {webhook_id}"));
        let webhook = match self
            .store
            .replace_webhook_secret(
                workspace_id,
                webhook_id,
                (sealed.kek_version, &sealed.wrapped_dek, &sealed.ciphertext),
                self.clock.now(),
                &audit,
            )
            .await
        {
            Ok(w) => w,
            Err(StoreError::NotFound) => return Err(WebhookError::NotFound(webhook_id.to_owned())),
            Err(e) => return Err(e.into()),
        };
        tracing::info!(workspace_id, webhook_id, "webhook signing secret rotated");
        Ok(WithSecret { webhook, secret })
    }
}
