//! The VerifyKey hot path.
//!
//! parse + checksum (no IO) → SHA-256 → cache lookup → decision. A miss costs one indexed
//! query by hash; a hash that matches nothing goes to the negative cache. No lock is held
//! across an await, and nothing is written on the way.

use std::sync::Arc;

use crate::cache::{CachedKey, Lookup, VerifyCache};
use crate::clock::Clock;
use crate::domain::key::{self, VerifyCode};
use crate::domain::key_format::{self, Brand, KeyHash};
use crate::domain::scopes::{EffectiveScopes, ScopeImplications};
use crate::store::{Store, StoreError};

/// The answer to one verification: the code, and the key when one matched.
pub struct Verdict {
    pub code: VerifyCode,
    pub key: Option<Arc<CachedKey>>,
}

pub struct Verifier {
    store: Arc<dyn Store>,
    cache: Arc<VerifyCache>,
    clock: Clock,
    brand: Brand,
    implications: Arc<ScopeImplications>,
}

impl Verifier {
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<VerifyCache>,
        clock: Clock,
        brand: Brand,
        implications: Arc<ScopeImplications>,
    ) -> Self {
        Verifier {
            store,
            cache,
            clock,
            brand,
            implications,
        }
    }

    pub async fn verify(
        &self,
        presented: &str,
        required_scopes: &[String],
    ) -> Result<Verdict, StoreError> {
        if key_format::parse(&self.brand, presented).is_err() {
            return Ok(Verdict {
                code: VerifyCode::Malformed,
                key: None,
            });
        }
        let hash = KeyHash::of(presented);
        let entry = match self.cache.get(&hash) {
            Lookup::Hit(entry) => entry,
            Lookup::KnownMissing => return Ok(not_found()),
            Lookup::Miss => match self.fill(&hash).await? {
                Some(entry) => entry,
                None => return Ok(not_found()),
            },
        };
        let code = key::decide(
            &entry.key,
            entry.secret_valid_until,
            &entry.effective_scopes,
            required_scopes,
            self.clock.now(),
        );
        let key = (code != VerifyCode::NotFound).then_some(entry);
        Ok(Verdict { code, key })
    }

    async fn fill(&self, hash: &KeyHash) -> Result<Option<Arc<CachedKey>>, StoreError> {
        let ticket = self.cache.begin_fill(hash);
        let found = self.store.find_secret(hash).await?.map(|found| {
            Arc::new(CachedKey {
                effective_scopes: EffectiveScopes::new(&self.implications, &found.key.scopes),
                key: found.key,
                secret_valid_until: found.valid_until,
            })
        });
        self.cache.complete_fill(ticket, found.clone());
        Ok(found)
    }
}

fn not_found() -> Verdict {
    Verdict {
        code: VerifyCode::NotFound,
        key: None,
    }
}
