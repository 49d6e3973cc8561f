//! The API key format: `<brand>_<env>_<secret><checksum>`.
//!
//! - `brand`: configurable per deployment (`kw` by default), lowercase letters and digits.
//! - `env`: `live` or `test`.
//! - `secret`: 32 base62 characters from the OS CSPRNG (~190 bits).
//! - `checksum`: CRC32 of everything before it, as 6 base62 digits. A typo or an invented
//!   key is refused before any storage access, and secret scanners can check a match
//!   offline.
//!
//! The stored form is [`KeyHash`], SHA-256 of the whole key string. The secret has far more
//! entropy than a password, so a slow hash would add latency and no protection.

use std::fmt;

use rand_core::TryCryptoRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::base62;

pub const SECRET_LEN: usize = 32;
pub const CHECKSUM_LEN: usize = 6;
/// No valid key is longer than this; longer input is refused before any other work.
pub const MAX_KEY_LEN: usize = 16 + 1 + 4 + 1 + SECRET_LEN + CHECKSUM_LEN;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Environment::Live),
            "test" => Some(Environment::Test),
            _ => None,
        }
    }
}

/// The deployment's key prefix, e.g. `kw`, `clne`, `cuk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Brand(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("brand must be 2 to 16 characters, a lowercase letter then lowercase letters or digits")]
pub struct InvalidBrand;

impl Brand {
    pub fn parse(s: &str) -> Result<Self, InvalidBrand> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if first_ok && rest_ok && (2..=16).contains(&s.len()) {
            Ok(Brand(s.to_owned()))
        } else {
            Err(InvalidBrand)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Brand {
    fn default() -> Self {
        Brand("kw".to_owned())
    }
}

/// A freshly generated plaintext key. Zeroized on drop; its Debug output is redacted.
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    pub fn generate<R: TryCryptoRng + ?Sized>(
        rng: &mut R,
        brand: &Brand,
        env: Environment,
    ) -> Result<Self, R::Error> {
        let secret = Zeroizing::new(base62::random_string(rng, SECRET_LEN)?);
        let mut key = Zeroizing::new(String::with_capacity(MAX_KEY_LEN));
        key.push_str(brand.as_str());
        key.push('_');
        key.push_str(env.as_str());
        key.push('_');
        key.push_str(&secret);
        let checksum = checksum(&key);
        // The checksum is base62, hence ASCII.
        key.push_str(std::str::from_utf8(&checksum).unwrap_or_default());
        Ok(ApiKey(key))
    }

    /// The plaintext, to hand to the caller exactly once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }

    /// The last four characters (all from the checksum, so they reveal nothing of the
    /// secret).
    pub fn last_four(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The parts of a presented key that passed the format and checksum checks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey {
    pub environment: Environment,
}

impl fmt::Debug for ParsedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedKey")
            .field("environment", &self.environment)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MalformedKey {
    #[error("key is longer than any valid key")]
    TooLong,
    #[error("key does not start with this deployment's brand")]
    WrongBrand,
    #[error("key environment is neither live nor test")]
    BadEnvironment,
    #[error("key body has the wrong length or characters")]
    BadBody,
    #[error("key checksum does not match")]
    BadChecksum,
}

/// Checks the shape and checksum of a presented key. Does no IO.
pub fn parse(brand: &Brand, key: &str) -> Result<ParsedKey, MalformedKey> {
    if key.len() > MAX_KEY_LEN {
        return Err(MalformedKey::TooLong);
    }
    let rest = key
        .strip_prefix(brand.as_str())
        .and_then(|r| r.strip_prefix('_'))
        .ok_or(MalformedKey::WrongBrand)?;
    let (env, body) = rest.split_once('_').ok_or(MalformedKey::BadEnvironment)?;
    let environment = Environment::parse(env).ok_or(MalformedKey::BadEnvironment)?;
    if body.len() != SECRET_LEN + CHECKSUM_LEN || !base62::is_base62(body) {
        return Err(MalformedKey::BadBody);
    }
    let (signed, given) = key.split_at(key.len() - CHECKSUM_LEN);
    if !bool::from(checksum(signed).ct_eq(given.as_bytes())) {
        return Err(MalformedKey::BadChecksum);
    }
    Ok(ParsedKey { environment })
}

fn checksum(signed: &str) -> [u8; CHECKSUM_LEN] {
    let mut out = [0u8; CHECKSUM_LEN];
    base62::encode_into(u64::from(crc32fast::hash(signed.as_bytes())), &mut out);
    out
}

/// How a key is shown after its one-time reveal: `kw_live_...a1B2`.
pub fn display(brand: &Brand, env: Environment, last_four: &str) -> String {
    format!("{}_{}_...{}", brand.as_str(), env.as_str(), last_four)
}

/// SHA-256 of a whole key string: the only form of a key that is ever stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(KeyHash)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time equality, for comparing a stored hash with a presented one.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        // Word by word: as constant-time as byte by byte, in an eighth of the steps.
        self.words().ct_eq(&other.words()).into()
    }

    fn words(&self) -> [u64; 4] {
        std::array::from_fn(|i| u64::from_ne_bytes(std::array::from_fn(|j| self.0[i * 8 + j])))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits identify a hash in logs without making them searchable for it.
        write!(f, "KeyHash({}..)", &hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn brand() -> Brand {
        Brand::default()
    }

    #[test]
    fn generated_keys_have_the_documented_shape_and_parse() {
        let key = ApiKey::generate(&mut getrandom::SysRng, &brand(), Environment::Live).unwrap();
        let s = key.expose();
        assert!(s.starts_with("kw_live_"), "{s}");
        assert_eq!(s.len(), "kw_live_".len() + SECRET_LEN + CHECKSUM_LEN);
        assert_eq!(
            parse(&brand(), s),
            Ok(ParsedKey {
                environment: Environment::Live
            })
        );
        let test_key =
            ApiKey::generate(&mut getrandom::SysRng, &brand(), Environment::Test).unwrap();
        assert_eq!(
            parse(&brand(), test_key.expose()).unwrap().environment,
            Environment::Test
        );
    }

    #[test]
    fn a_custom_brand_is_used_and_other_brands_are_refused() {
        let clne = Brand::parse("clne").unwrap();
        let key = ApiKey::generate(&mut getrandom::SysRng, &clne, Environment::Test).unwrap();
        assert!(key.expose().starts_with("clne_test_"));
        assert!(parse(&clne, key.expose()).is_ok());
        assert_eq!(parse(&brand(), key.expose()), Err(MalformedKey::WrongBrand));
    }

    #[test]
    fn brands_are_validated() {
        for bad in ["", "k", "KW", "k_w", "1kw", "abcdefghijklmnopq", "kw-x"] {
            assert_eq!(Brand::parse(bad), Err(InvalidBrand), "{bad:?}");
        }
        for good in ["kw", "clne", "cuk", "a1"] {
            assert!(Brand::parse(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let key = ApiKey::generate(&mut getrandom::SysRng, &brand(), Environment::Live).unwrap();
        let s = key.expose();
        let mut bytes = s.as_bytes().to_vec();
        let i = "kw_live_".len() + 3;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(bytes).unwrap();
        assert_eq!(parse(&brand(), &typo), Err(MalformedKey::BadChecksum));
    }

    #[test]
    fn malformed_shapes_are_named() {
        let key = ApiKey::generate(&mut getrandom::SysRng, &brand(), Environment::Live).unwrap();
        let s = key.expose();
        assert_eq!(parse(&brand(), ""), Err(MalformedKey::WrongBrand));
        assert_eq!(
            parse(&brand(), &s.replace("_live_", "_prod_")),
            Err(MalformedKey::BadEnvironment)
        );
        assert_eq!(
            parse(&brand(), &s[..s.len() - 1]),
            Err(MalformedKey::BadBody)
        );
        assert_eq!(
            parse(&brand(), &format!("{s}xxxxxxxxxxxxxxxxxxxx")),
            Err(MalformedKey::TooLong)
        );
        assert_eq!(
            parse(&brand(), &format!("{}!{}", &s[..20], &s[21..])),
            Err(MalformedKey::BadBody)
        );
    }

    #[test]
    fn debug_output_never_shows_the_plaintext() {
        let key = ApiKey::generate(&mut getrandom::SysRng, &brand(), Environment::Live).unwrap();
        let debug = format!("{key:?} {:?}", key.hash());
        assert!(!debug.contains(&key.expose()[8..20]));
        assert!(!debug.contains(&key.hash().to_hex()));
    }

    #[test]
    fn last_four_comes_from_the_checksum_and_display_uses_it() {
        let key = ApiKey::generate(&mut getrandom::SysRng, &brand(), Environment::Live).unwrap();
        let s = key.expose();
        assert_eq!(key.last_four(), &s[s.len() - 4..]);
        assert_eq!(
            display(&brand(), Environment::Live, key.last_four()),
            format!("kw_live_...{}", key.last_four())
        );
    }

    #[test]
    fn hashes_are_sha256_of_the_whole_key() {
        let h = KeyHash::of("abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(h.ct_eq(&KeyHash::of("abc")));
        assert!(!h.ct_eq(&KeyHash::of("abd")));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_and_rarely_parses(s in "\\PC{0,80}") {
            // A random string passes the checksum with probability 2^-32: treat a pass as a bug.
            prop_assert!(parse(&brand(), &s).is_err());
        }

        #[test]
        fn any_single_substitution_in_the_body_is_caught(pos in 8usize..46, c in "[0-9A-Za-z]") {
            let key = ApiKey::generate(&mut getrandom::SysRng, &brand(), Environment::Live).unwrap();
            let s = key.expose().to_owned();
            let replacement = c.chars().next().unwrap();
            let original = s.as_bytes()[pos] as char;
            prop_assume!(original != replacement);
            let mut changed = s.clone();
            changed.replace_range(pos..pos + 1, &replacement.to_string());
            prop_assert!(parse(&brand(), &changed).is_err());
        }

        #[test]
        fn keys_survive_a_round_trip(live in any::<bool>()) {
            let env = if live { Environment::Live } else { Environment::Test };
            let key = ApiKey::generate(&mut getrandom::SysRng, &brand(), env).unwrap();
            prop_assert_eq!(parse(&brand(), key.expose()).unwrap().environment, env);
        }
    }
}
