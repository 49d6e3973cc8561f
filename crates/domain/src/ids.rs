//! Identifiers the service mints itself.

use rand_core::TryCryptoRng;

use super::base62;

/// Length of the random part of a key id (`key_` + 24 base62 characters, ~143 bits).
const KEY_ID_RANDOM_LEN: usize = 24;

pub fn new_key_id<R: TryCryptoRng + ?Sized>(rng: &mut R) -> Result<String, R::Error> {
    Ok(format!(
        "key_{}",
        base62::random_string(rng, KEY_ID_RANDOM_LEN)?
    ))
}

/// Whether `s` has the shape of a key id this service mints.
pub fn is_key_id(s: &str) -> bool {
    s.strip_prefix("key_")
        .is_some_and(|rest| rest.len() == KEY_ID_RANDOM_LEN && base62::is_base62(rest))
}

/// A new provider-key record id: `pk_` and 24 base62 characters.
pub fn new_provider_key_id<R: TryCryptoRng + ?Sized>(rng: &mut R) -> Result<String, R::Error> {
    Ok(format!(
        "pk_{}",
        base62::random_string(rng, KEY_ID_RANDOM_LEN)?
    ))
}

/// A new webhook endpoint id: `wh_` and 24 base62 characters.
pub fn new_webhook_id<R: TryCryptoRng + ?Sized>(rng: &mut R) -> Result<String, R::Error> {
    Ok(format!(
        "wh_{}",
        base62::random_string(rng, KEY_ID_RANDOM_LEN)?
    ))
}

/// Whether `s` has the shape of a webhook id this service mints.
pub fn is_webhook_id(s: &str) -> bool {
    s.strip_prefix("wh_")
        .is_some_and(|rest| rest.len() == KEY_ID_RANDOM_LEN && base62::is_base62(rest))
}

/// A new webhook signing secret: `whsec_` and 43 base62 characters (~256 bits). The
/// HMAC key is the whole text.
pub fn new_webhook_secret<R: TryCryptoRng + ?Sized>(rng: &mut R) -> Result<String, R::Error> {
    Ok(format!("whsec_{}", base62::random_string(rng, 43)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_key_ids_have_the_recognised_shape() {
        let id = new_key_id(&mut getrandom::SysRng).unwrap();
        assert!(is_key_id(&id), "{id}");
        assert!(!is_key_id("key_short"));
        assert!(!is_key_id(&format!("kex_{}", &id[4..])));
        assert!(!is_key_id(&format!("key_{}!", &id[5..])));
        let wh = new_webhook_id(&mut getrandom::SysRng).unwrap();
        assert!(is_webhook_id(&wh), "{wh}");
        assert!(!is_webhook_id(&id));
    }
}
