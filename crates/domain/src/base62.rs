//! Base62 (`0-9A-Za-z`): URL-safe, copy-paste-safe (no `-` or `_` that editors split words
//! on), and what secret scanners expect of API keys.

use rand_core::TryCryptoRng;

pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` uniformly random base62 characters from `rng` (the server passes the OS CSPRNG,
/// `getrandom::SysRng`: the domain has no randomness of its own).
///
/// Rejection sampling keeps the distribution uniform: bytes >= 248 (= 62 * 4) are dropped
/// instead of being folded onto the first characters.
pub fn random_string<R: TryCryptoRng + ?Sized>(
    rng: &mut R,
    len: usize,
) -> Result<String, R::Error> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.try_fill_bytes(&mut buf)?;
        for &b in &buf {
            if b < 248 && out.len() < len {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
        buf.fill(0);
    }
    Ok(out)
}

/// Encodes `value` as exactly `width` base62 digits, most significant first.
pub fn encode_fixed(value: u64, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    encode_into(value, &mut digits);
    // Every byte comes from ALPHABET, which is ASCII.
    String::from_utf8_lossy(&digits).into_owned()
}

/// Encodes `value` into `out` as base62 digits, most significant first, without
/// allocating (the hot path checks a checksum on every VerifyKey).
pub fn encode_into(mut value: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
}

pub fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_strings_have_the_length_asked_and_only_base62() {
        let s = random_string(&mut getrandom::SysRng, 40).unwrap();
        assert_eq!(s.len(), 40);
        assert!(is_base62(&s));
        assert_ne!(s, random_string(&mut getrandom::SysRng, 40).unwrap());
    }

    #[test]
    fn fixed_width_encoding_pads_and_orders_digits() {
        assert_eq!(encode_fixed(0, 6), "000000");
        assert_eq!(encode_fixed(61, 2), "0z");
        assert_eq!(encode_fixed(62, 2), "10");
        assert_eq!(encode_fixed(u64::from(u32::MAX), 6), "4gfFC3");
    }
}
