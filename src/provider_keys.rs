//! Provider keys (BYOK): put, get, list, delete (audited, admin), resolve (the plaintext,
//! audited, for inference routers), rewrap (to the newest KEK), and the start-up check
//! that every KEK the stored records need is configured and is the right one.
//!
//! Plans: a workspace may store a provider key only while its plan allows BYOK. When a
//! workspace moves to a plan that does not, its stored keys are kept (sealed) but resolve
//! as NOT_FOUND, so its calls go back to managed access at once; moving back brings them
//! back, and an admin can delete them. Nothing here ever logs or returns a plaintext,
//! except `resolve` to its caller.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::crypto::{CryptoError, KekRing, Sealed};
use crate::domain::ids;
use crate::domain::provider_key::{self, Provider, ProviderKeyRecord};
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::workspace::{Plans, Workspace};
use crate::store::Acting;
use crate::store::{AuditContext, AuditOutcome, DeniedAudit, Store, StoreError};

/// Records rewrapped per database round of a rewrap.
const REWRAP_BATCH: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ProviderKeyError {
    #[error("no key-encryption key (KEK) is configured: provider keys are unavailable")]
    NoKek,
    #[error("workspace {0} does not exist")]
    WorkspaceNotFound(String),
    #[error("{0}")]
    Refused(Refusal),
    #[error("no {0} key is stored for this workspace")]
    NotFound(&'static str),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the operating system's random source failed")]
    Randomness,
}

pub struct ProviderKeys {
    store: Arc<dyn Store>,
    clock: Clock,
    plans: Arc<Plans>,
    ring: Option<Arc<KekRing>>,
}

fn sealed_of(r: &ProviderKeyRecord) -> Sealed {
    Sealed {
        kek_version: r.kek_version,
        wrapped_dek: r.wrapped_dek.clone(),
        ciphertext: r.ciphertext.clone(),
    }
}

impl ProviderKeys {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Clock,
        plans: Arc<Plans>,
        ring: Option<Arc<KekRing>>,
    ) -> Self {
        ProviderKeys {
            store,
            clock,
            plans,
            ring,
        }
    }

    fn ring(&self) -> Result<&KekRing, ProviderKeyError> {
        self.ring.as_deref().ok_or(ProviderKeyError::NoKek)
    }

    async fn workspace(&self, workspace_id: &str) -> Result<Workspace, ProviderKeyError> {
        self.store
            .get_workspace(workspace_id)
            .await?
            .ok_or_else(|| ProviderKeyError::WorkspaceNotFound(workspace_id.to_owned()))
    }

    /// Stores (or replaces) the workspace's key for `provider`.
    pub async fn put(
        &self,
        acting: &Acting,
        workspace_id: &str,
        provider: Provider,
        api_key: Zeroizing<String>,
    ) -> Result<ProviderKeyRecord, ProviderKeyError> {
        let ring = self.ring()?;
        let workspace = self.workspace(workspace_id).await?;
        let now = self.clock.now();
        if !self.plans.policy(workspace.plan).byok {
            let why = format!(
                "the {} plan of workspace {} does not allow BYOK (bring your own key)",
                workspace.plan.display(),
                workspace_id
            );
            self.store
                .record_audit(
                    &DeniedAudit {
                        workspace_id: workspace_id.to_owned(),
                        key_id: None,
                        context: acting.audit("provider_key.put", why.clone()),
                        occurred_at: now,
                    },
                    AuditOutcome::Denied,
                )
                .await?;
            return Err(ProviderKeyError::Refused(
                Refusal::new(Reason::PlanForbidsByok, why)
                    .with("workspace_id", workspace_id)
                    .with("plan", workspace.plan.display()),
            ));
        }
        let record_id = ids::new_provider_key_id(&mut getrandom::SysRng)
            .map_err(|_| ProviderKeyError::Randomness)?;
        let aad = provider_key::associated_data(workspace_id, provider, &record_id);
        let sealed = ring.seal(api_key.as_bytes(), &aad)?;
        let record = ProviderKeyRecord {
            record_id,
            workspace_id: workspace_id.to_owned(),
            provider,
            last_four: provider_key::last_four(&api_key),
            kek_version: sealed.kek_version,
            wrapped_dek: sealed.wrapped_dek,
            ciphertext: sealed.ciphertext,
            created_at: now,
            updated_at: now,
        };
        let detail = format!("provider: {}", provider.as_str());
        let stored = self
            .store
            .put_provider_key(&record, &acting.audit("provider_key.put", detail))
            .await?;
        tracing::info!(
            workspace_id,
            provider = provider.as_str(),
            "provider key stored"
        );
        Ok(stored)
    }

    pub async fn get(
        &self,
        workspace_id: &str,
        provider: Provider,
    ) -> Result<ProviderKeyRecord, ProviderKeyError> {
        self.workspace(workspace_id).await?;
        self.store
            .get_provider_key(workspace_id, provider)
            .await?
            .ok_or(ProviderKeyError::NotFound(provider.as_str()))
    }

    pub async fn list(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<ProviderKeyRecord>, ProviderKeyError> {
        self.workspace(workspace_id).await?;
        Ok(self.store.list_provider_keys(workspace_id).await?)
    }

    pub async fn delete(
        &self,
        acting: &Acting,
        workspace_id: &str,
        provider: Provider,
    ) -> Result<(), ProviderKeyError> {
        self.workspace(workspace_id).await?;
        let detail = format!("provider: {}", provider.as_str());
        match self
            .store
            .delete_provider_key(
                workspace_id,
                provider,
                self.clock.now(),
                &acting.audit("provider_key.delete", detail),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound) => Err(ProviderKeyError::NotFound(provider.as_str())),
            Err(e) => Err(e.into()),
        }
    }

    /// The plaintext for an inference router (the caller token's name), audited. NOT_FOUND
    /// (use managed access) for no workspace, no key, or a plan without BYOK.
    pub async fn resolve(
        &self,
        caller: &str,
        workspace_id: &str,
        provider: Provider,
    ) -> Result<Zeroizing<String>, ProviderKeyError> {
        let ring = self.ring()?;
        let not_found = ProviderKeyError::NotFound(provider.as_str());
        let Some(workspace) = self.store.get_workspace(workspace_id).await? else {
            return Err(not_found);
        };
        if !self.plans.policy(workspace.plan).byok {
            return Err(not_found);
        }
        let Some(record) = self.store.get_provider_key(workspace_id, provider).await? else {
            return Err(not_found);
        };
        let aad = provider_key::associated_data(workspace_id, provider, &record.record_id);
        let plaintext = ring.open(&sealed_of(&record), &aad).inspect_err(|e| {
            tracing::error!(workspace_id, provider = provider.as_str(), error = %e, "a stored provider key does not open");
        })?;
        let api_key =
            Zeroizing::new(String::from_utf8(plaintext.to_vec()).map_err(|_| CryptoError::Open)?);
        self.store
            .record_audit(
                &DeniedAudit {
                    workspace_id: workspace_id.to_owned(),
                    key_id: None,
                    context: AuditContext {
                        actor_id: caller.to_owned(),
                        caller: caller.to_owned(),
                        action: "provider_key.resolve",
                        detail: format!("provider: {}", provider.as_str()),
                    },
                    occurred_at: self.clock.now(),
                },
                AuditOutcome::Success,
            )
            .await?;
        Ok(api_key)
    }

    /// Rewraps every data key not wrapped by the newest KEK, in batches, while resolves
    /// go on (a record is readable under either version until it is swapped, and a
    /// concurrent replace wins over the swap). Returns how many were rewrapped.
    pub async fn rewrap(&self) -> Result<(u32, u32), ProviderKeyError> {
        let ring = self.ring()?;
        let current = ring.current();
        let mut rewrapped = 0u32;
        loop {
            let batch = self
                .store
                .provider_keys_to_rewrap(current, REWRAP_BATCH)
                .await?;
            if batch.is_empty() {
                break;
            }
            for record in batch {
                let aad = provider_key::associated_data(
                    &record.workspace_id,
                    record.provider,
                    &record.record_id,
                );
                let new = ring.rewrap(&sealed_of(&record), &aad)?;
                if self
                    .store
                    .swap_wrapped_dek(
                        &record.record_id,
                        &record.wrapped_dek,
                        new.kek_version,
                        &new.wrapped_dek,
                    )
                    .await?
                {
                    rewrapped += 1;
                }
            }
        }
        // Webhook signing secrets are sealed under the same ring: rewrapped with them, so
        // that an old KEK can be removed once this has run.
        loop {
            let batch = self.store.webhooks_to_rewrap(current, REWRAP_BATCH).await?;
            if batch.is_empty() {
                break;
            }
            for record in batch {
                let aad =
                    crate::webhooks::associated_data(&record.workspace_id, &record.webhook_id);
                let new = ring.rewrap(&crate::webhooks::sealed_of(&record), &aad)?;
                if self
                    .store
                    .swap_webhook_dek(
                        &record.webhook_id,
                        &record.wrapped_dek,
                        new.kek_version,
                        &new.wrapped_dek,
                    )
                    .await?
                {
                    rewrapped += 1;
                }
            }
        }
        tracing::info!(
            rewrapped,
            kek_version = current,
            "provider keys and webhook secrets rewrapped"
        );
        Ok((rewrapped, current))
    }
}

/// Refuses to start when stored records need a KEK version that is not configured, or
/// when a configured version is not the key that version was first used with.
pub async fn check_keks(
    store: &dyn Store,
    ring: Option<&KekRing>,
    now: crate::domain::Micros,
) -> Result<(), String> {
    let in_use = store
        .kek_versions_in_use()
        .await
        .map_err(|e| e.to_string())?;
    for version in &in_use {
        if !ring.is_some_and(|r| r.versions().any(|v| v == *version)) {
            return Err(format!(
                "stored provider keys are wrapped by KEK version {version}, which is not configured (add it to [[keks]]; remove it only after `keywarden kek rewrap`)"
            ));
        }
    }
    if let Some(ring) = ring {
        for version in ring.versions() {
            let mine = ring.check_value(version).map_err(|e| e.to_string())?;
            let stored = store
                .kek_check(version, &mine, now)
                .await
                .map_err(|e| e.to_string())?;
            if !bool::from(stored.as_slice().ct_eq(mine.as_slice())) {
                return Err(format!(
                    "KEK version {version} is not the key that version was first used with (a wrong key or passphrase?)"
                ));
            }
        }
    }
    Ok(())
}
