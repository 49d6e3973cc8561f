//! Envelope encryption for the secrets Keywarden must give back (provider keys).
//!
//! Each secret gets a random 256-bit data key (DEK); the secret is sealed with AES-256-GCM
//! under the DEK with a random 96-bit nonce, and the DEK is sealed (wrapped) under a
//! key-encryption key (KEK), also with AES-256-GCM. Both seals take the record's identity
//! (workspace, provider, record id) as associated data, so a ciphertext or a wrapped DEK
//! copied to another row does not open. Rotating the KEK rewraps DEKs only
//! ([`KekRing::rewrap`]): the secret's ciphertext is never touched.
//!
//! KEKs are versioned: the newest configured version wraps, any configured version
//! unwraps. A KEK comes from 32 raw bytes or from a passphrase stretched with Argon2id
//! ([`derive_kek`]). [`KekRing::check_value`] gives a short value that identifies a KEK
//! without revealing it, stored once per version so that a wrong KEK is found at start,
//! not at the first resolve.
//!
//! Every buffer that holds a DEK, a KEK or a plaintext is zeroized when dropped.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Domain separation between the two seals and the check value.
const DEK_CONTEXT: &[u8] = b"keywarden/dek/v1|";
const SECRET_CONTEXT: &[u8] = b"keywarden/secret/v1|";
const CHECK_CONTEXT: &[u8] = b"keywarden/kek-check/v1|";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// Tampered, moved to another record, or sealed under another KEK: never a wrong
    /// plaintext.
    #[error("the sealed secret does not open (altered, moved, or another key)")]
    Open,
    #[error("KEK version {0} is not configured")]
    UnknownKek(u32),
    #[error("no KEK is configured")]
    NoKek,
    #[error("KEK version {0} is configured twice")]
    DuplicateKek(u32),
    #[error("the KEK derivation parameters are invalid: {0}")]
    Kdf(String),
    #[error("the operating system's random source failed")]
    Randomness,
    #[error("encryption failed")]
    Seal,
}

/// A secret as stored: which KEK wraps its DEK, the wrapped DEK and the ciphertext, each
/// `nonce || ciphertext || tag`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub kek_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("kek_version", &self.kek_version)
            .field(
                "wrapped_dek",
                &format_args!("[{} bytes]", self.wrapped_dek.len()),
            )
            .field(
                "ciphertext",
                &format_args!("[{} bytes]", self.ciphertext.len()),
            )
            .finish()
    }
}

/// The configured KEKs.
pub struct KekRing {
    keks: BTreeMap<u32, Aes256Gcm>,
    current: u32,
}

impl fmt::Debug for KekRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KekRing")
            .field("versions", &self.keks.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish()
    }
}

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, CryptoError> {
    let mut bytes = Zeroizing::new([0u8; N]);
    getrandom::fill(bytes.as_mut()).map_err(|_| CryptoError::Randomness)?;
    Ok(bytes)
}

fn with_context(context: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(context.len() + aad.len());
    out.extend_from_slice(context);
    out.extend_from_slice(aad);
    out
}

/// `nonce || ciphertext || tag` of `plaintext` under `cipher`, with a random nonce.
fn seal_with(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let nonce_bytes = random::<NONCE_LEN>()?;
    let nonce = Nonce::from(*nonce_bytes);
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Seal)?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(nonce_bytes.as_ref());
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens `nonce || ciphertext || tag` into a buffer that is zeroized when dropped.
fn open_with(
    cipher: &Aes256Gcm,
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Open);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Open)?;
    let mut buffer = Zeroizing::new(body.to_vec());
    cipher
        .decrypt_in_place(&Nonce::from(nonce), aad, &mut *buffer)
        .map_err(|_| CryptoError::Open)?;
    Ok(buffer)
}

fn cipher_of(key: &[u8]) -> Result<Aes256Gcm, CryptoError> {
    Aes256Gcm::new_from_slice(key).map_err(|_| CryptoError::Open)
}

impl KekRing {
    /// The ring of `(version, key)` pairs; the newest version wraps.
    pub fn new(keks: Vec<(u32, Zeroizing<[u8; 32]>)>) -> Result<Self, CryptoError> {
        let mut ring = BTreeMap::new();
        for (version, key) in keks {
            if ring.insert(version, cipher_of(key.as_ref())?).is_some() {
                return Err(CryptoError::DuplicateKek(version));
            }
        }
        let current = *ring.keys().next_back().ok_or(CryptoError::NoKek)?;
        Ok(KekRing {
            keks: ring,
            current,
        })
    }

    /// The version new secrets are wrapped with.
    pub fn current(&self) -> u32 {
        self.current
    }

    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.keks.keys().copied()
    }

    fn kek(&self, version: u32) -> Result<&Aes256Gcm, CryptoError> {
        self.keks
            .get(&version)
            .ok_or(CryptoError::UnknownKek(version))
    }

    /// Seals `plaintext` for the record `aad` names, under a new DEK wrapped by the
    /// current KEK.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, CryptoError> {
        let dek = random::<32>()?;
        let ciphertext = seal_with(
            &cipher_of(dek.as_ref())?,
            plaintext,
            &with_context(SECRET_CONTEXT, aad),
        )?;
        let wrapped_dek = seal_with(
            self.kek(self.current)?,
            dek.as_ref(),
            &with_context(DEK_CONTEXT, aad),
        )?;
        Ok(Sealed {
            kek_version: self.current,
            wrapped_dek,
            ciphertext,
        })
    }

    fn unwrap_dek(&self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let dek = open_with(
            self.kek(sealed.kek_version)?,
            &sealed.wrapped_dek,
            &with_context(DEK_CONTEXT, aad),
        )?;
        if dek.len() != 32 {
            return Err(CryptoError::Open);
        }
        Ok(dek)
    }

    /// The plaintext of a sealed secret of the record `aad` names.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let dek = self.unwrap_dek(sealed, aad)?;
        open_with(
            &cipher_of(&dek)?,
            &sealed.ciphertext,
            &with_context(SECRET_CONTEXT, aad),
        )
    }

    /// The same secret with its DEK wrapped by the current KEK; the ciphertext is kept.
    pub fn rewrap(&self, sealed: &Sealed, aad: &[u8]) -> Result<Sealed, CryptoError> {
        let dek = self.unwrap_dek(sealed, aad)?;
        // The DEK must still open the secret: never rewrap a DEK that would not.
        open_with(
            &cipher_of(&dek)?,
            &sealed.ciphertext,
            &with_context(SECRET_CONTEXT, aad),
        )?;
        Ok(Sealed {
            kek_version: self.current,
            wrapped_dek: seal_with(
                self.kek(self.current)?,
                &dek,
                &with_context(DEK_CONTEXT, aad),
            )?,
            ciphertext: sealed.ciphertext.clone(),
        })
    }

    /// A value that identifies KEK `version` without revealing it: the GCM tag of an empty
    /// message under a fixed nonce (the only message ever sealed under that nonce).
    pub fn check_value(&self, version: u32) -> Result<Vec<u8>, CryptoError> {
        let aad = with_context(CHECK_CONTEXT, &version.to_be_bytes());
        self.kek(version)?
            .encrypt(
                &Nonce::from([0u8; NONCE_LEN]),
                Payload {
                    msg: &[],
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Seal)
    }
}

/// Argon2id parameters for a passphrase KEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// The Argon2id parameters OWASP recommends (19 MiB, 2 passes, 1 lane).
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        }
    }
}

/// A 32-byte KEK stretched from an operator's passphrase with Argon2id.
pub fn derive_kek(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    use argon2::{Algorithm, Argon2, Params, Version};
    let params = Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(32))
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, out.as_mut())
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Zeroizing<[u8; 32]> {
        Zeroizing::new([byte; 32])
    }

    fn ring(versions: &[(u32, u8)]) -> KekRing {
        KekRing::new(versions.iter().map(|(v, b)| (*v, key(*b))).collect()).unwrap()
    }

    const AAD: &[u8] = b"ws_a|anthropic|pk_1";
    const SECRET: &[u8] = b"sk-ant-api03-very-secret-value";

    #[test]
    fn a_sealed_secret_opens_for_its_record_only() {
        let ring = ring(&[(1, 7)]);
        let sealed = ring.seal(SECRET, AAD).unwrap();
        assert_eq!(sealed.kek_version, 1);
        assert_eq!(ring.open(&sealed, AAD).unwrap().as_slice(), SECRET);
        assert!(
            !sealed
                .ciphertext
                .windows(8)
                .any(|w| SECRET.windows(8).any(|s| s == w))
        );
        // Moved to another workspace's row: refused.
        assert_eq!(
            ring.open(&sealed, b"ws_b|anthropic|pk_1"),
            Err(CryptoError::Open)
        );
        // Two seals of one secret share nothing (fresh DEK and nonces).
        let again = ring.seal(SECRET, AAD).unwrap();
        assert_ne!(again.ciphertext, sealed.ciphertext);
        assert_ne!(again.wrapped_dek, sealed.wrapped_dek);
    }

    #[test]
    fn any_flipped_bit_fails_to_open_and_never_gives_a_wrong_plaintext() {
        let ring = ring(&[(1, 7)]);
        let sealed = ring.seal(SECRET, AAD).unwrap();
        for i in 0..sealed.ciphertext.len() * 8 {
            let mut bad = sealed.clone();
            bad.ciphertext[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                ring.open(&bad, AAD),
                Err(CryptoError::Open),
                "ciphertext bit {i}"
            );
        }
        for i in 0..sealed.wrapped_dek.len() * 8 {
            let mut bad = sealed.clone();
            bad.wrapped_dek[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                ring.open(&bad, AAD),
                Err(CryptoError::Open),
                "wrapped DEK bit {i}"
            );
        }
        let mut short = sealed.clone();
        short.ciphertext.truncate(10);
        assert_eq!(ring.open(&short, AAD), Err(CryptoError::Open));
    }

    #[test]
    fn rotation_rewraps_the_dek_and_keeps_the_ciphertext() {
        let old = ring(&[(1, 7)]);
        let sealed = old.seal(SECRET, AAD).unwrap();
        let both = ring(&[(1, 7), (2, 9)]);
        assert_eq!(both.current(), 2);
        // Still opens under the old version while both are configured.
        assert_eq!(both.open(&sealed, AAD).unwrap().as_slice(), SECRET);
        let rewrapped = both.rewrap(&sealed, AAD).unwrap();
        assert_eq!(rewrapped.kek_version, 2);
        assert_eq!(rewrapped.ciphertext, sealed.ciphertext);
        assert_ne!(rewrapped.wrapped_dek, sealed.wrapped_dek);
        // The old KEK can go.
        let new = ring(&[(2, 9)]);
        assert_eq!(new.open(&rewrapped, AAD).unwrap().as_slice(), SECRET);
        assert_eq!(new.open(&sealed, AAD), Err(CryptoError::UnknownKek(1)));
        // A wrong key under the right version number does not open either.
        let wrong = ring(&[(2, 10)]);
        assert_eq!(wrong.open(&rewrapped, AAD), Err(CryptoError::Open));
    }

    #[test]
    fn check_values_tell_keks_apart_and_are_stable() {
        let a = ring(&[(1, 7)]);
        let same = ring(&[(1, 7)]);
        let other = ring(&[(1, 8)]);
        assert_eq!(a.check_value(1).unwrap(), same.check_value(1).unwrap());
        assert_ne!(a.check_value(1).unwrap(), other.check_value(1).unwrap());
        assert_eq!(a.check_value(1).unwrap().len(), TAG_LEN);
        assert_eq!(a.check_value(3), Err(CryptoError::UnknownKek(3)));
    }

    #[test]
    fn rings_need_distinct_versions_and_at_least_one() {
        assert_eq!(KekRing::new(vec![]).unwrap_err(), CryptoError::NoKek);
        assert_eq!(
            KekRing::new(vec![(1, key(1)), (1, key(2))]).unwrap_err(),
            CryptoError::DuplicateKek(1)
        );
        assert!(!format!("{:?}", ring(&[(1, 7)])).contains("7, 7"));
    }

    #[test]
    fn passphrases_stretch_deterministically_per_salt() {
        let cheap = KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        };
        let a = derive_kek(b"correct horse", b"salt-0123456789", cheap).unwrap();
        let b = derive_kek(b"correct horse", b"salt-0123456789", cheap).unwrap();
        let c = derive_kek(b"correct horse", b"salt-9876543210", cheap).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(matches!(
            derive_kek(b"x", b"short", cheap),
            Err(CryptoError::Kdf(_))
        ));
    }
}
