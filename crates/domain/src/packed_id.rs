//! Ids as the verify cache and the ledger hold them: a minted key id (`key_` and 24 base62
//! characters) packed into 18 bytes, six bits a character, its prefix not stored; any
//! other id (a pool's counter name, an id imported from elsewhere) as it is.
//!
//! Every verified key is held by both, so the 28 characters of its id would otherwise cost
//! an allocation in each (48 bytes of the allocator's each, besides the `String`). An id
//! is packed when a record is made and when one is looked up ([`IdRef::of`]), and read
//! back as text on the stack ([`IdText`]) when an answer or a log line needs it.

use std::fmt;
use std::ops::Deref;

use super::base62::ALPHABET;
use super::ids::is_key_id;

/// `key_`: the prefix every minted key id carries (not stored).
const KEY_PREFIX: &str = "key_";
/// Characters of a minted key id after its prefix, and the bytes they pack into.
const MINTED_CHARS: usize = 24;
const PACKED: usize = MINTED_CHARS * 6 / 8;

/// An id, held.
#[derive(Clone, PartialEq, Eq)]
pub enum PackedId {
    Minted([u8; PACKED]),
    Other(Box<str>),
}

/// An id as looked up: packed the same way, so a lookup compares bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdRef<'a> {
    Minted([u8; PACKED]),
    Other(&'a str),
}

/// An id's text: a minted id unpacked on the stack, any other borrowed.
pub enum IdText<'a> {
    Minted([u8; KEY_PREFIX.len() + MINTED_CHARS]),
    Other(&'a str),
}

impl<'a> IdRef<'a> {
    pub fn of(id: &'a str) -> IdRef<'a> {
        if is_key_id(id) {
            // Four characters (24 bits) make three bytes, most significant first.
            let mut packed = [0u8; PACKED];
            let chars = id.as_bytes()[KEY_PREFIX.len()..].chunks_exact(4);
            for (out, four) in packed.chunks_exact_mut(3).zip(chars) {
                let bits = four
                    .iter()
                    .fold(0u32, |bits, &c| (bits << 6) | u32::from(digit(c)));
                out.copy_from_slice(&bits.to_be_bytes()[1..]);
            }
            IdRef::Minted(packed)
        } else {
            IdRef::Other(id)
        }
    }

    pub fn to_held(self) -> PackedId {
        match self {
            IdRef::Minted(packed) => PackedId::Minted(packed),
            IdRef::Other(s) => PackedId::Other(s.into()),
        }
    }

    pub fn text(self) -> IdText<'a> {
        match self {
            IdRef::Other(s) => IdText::Other(s),
            IdRef::Minted(packed) => {
                let mut text = [0u8; KEY_PREFIX.len() + MINTED_CHARS];
                text[..KEY_PREFIX.len()].copy_from_slice(KEY_PREFIX.as_bytes());
                let chars = text[KEY_PREFIX.len()..].chunks_exact_mut(4);
                for (four, three) in chars.zip(packed.chunks_exact(3)) {
                    let bits = u32::from_be_bytes([0, three[0], three[1], three[2]]);
                    for (i, c) in four.iter_mut().enumerate() {
                        let value = (bits >> (18 - 6 * i)) & 63;
                        *c = ALPHABET[value as usize % ALPHABET.len()];
                    }
                }
                IdText::Minted(text)
            }
        }
    }
}

impl PackedId {
    pub fn new(id: &str) -> PackedId {
        IdRef::of(id).to_held()
    }

    pub fn as_ref(&self) -> IdRef<'_> {
        match self {
            PackedId::Minted(packed) => IdRef::Minted(*packed),
            PackedId::Other(s) => IdRef::Other(s),
        }
    }

    pub fn text(&self) -> IdText<'_> {
        self.as_ref().text()
    }

    /// Whether this is the id `id`.
    pub fn is(&self, id: &str) -> bool {
        self.as_ref() == IdRef::of(id)
    }
}

impl From<String> for PackedId {
    fn from(id: String) -> PackedId {
        match IdRef::of(&id) {
            IdRef::Minted(packed) => PackedId::Minted(packed),
            IdRef::Other(_) => PackedId::Other(id.into_boxed_str()),
        }
    }
}

/// A base62 character's value (the caller checked it is one).
fn digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'A'..=b'Z' => c - b'A' + 10,
        _ => c.wrapping_sub(b'a') + 36,
    }
}

impl Deref for IdText<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            IdText::Other(s) => s,
            // Every byte comes from KEY_PREFIX or ALPHABET, which are ASCII.
            IdText::Minted(text) => std::str::from_utf8(text).unwrap_or_default(),
        }
    }
}

impl fmt::Display for PackedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl fmt::Debug for PackedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_pack_and_come_back_as_they_were() {
        for _ in 0..100 {
            let id = crate::ids::new_key_id(&mut getrandom::SysRng).unwrap();
            let PackedId::Minted(_) = PackedId::new(&id) else {
                panic!("{id} was not packed");
            };
            assert_eq!(PackedId::new(&id).to_string(), id);
            assert_eq!(&*IdRef::of(&id).text(), id);
            assert!(PackedId::from(id.clone()).is(&id));
        }
        for id in ["k", "key_a", "team ws t", "key_0000000000000000000000!z"] {
            assert_eq!(PackedId::new(id).to_string(), id);
            assert!(matches!(PackedId::new(id), PackedId::Other(_)), "{id}");
        }
        let zeros = format!("key_{}", "0".repeat(24));
        let last = format!("key_{}", "z".repeat(24));
        assert_eq!(PackedId::new(&zeros).to_string(), zeros);
        assert_eq!(PackedId::new(&last).to_string(), last);
        assert!(IdRef::of(&zeros) != IdRef::of(&last));
        assert!(!PackedId::new(&zeros).is(&last));
        assert_eq!(format!("{:?}", PackedId::new(&last)), format!("{last:?}"));
    }

    proptest::proptest! {
        #[test]
        fn every_minted_shape_round_trips(rest in "[0-9A-Za-z]{24}") {
            let id = format!("key_{rest}");
            proptest::prop_assert_eq!(PackedId::new(&id).to_string(), id);
        }
    }
}
