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

/// Each byte's base62 value, or [`NOT_BASE62`].
static DIGITS: [u8; 256] = {
    let mut table = [NOT_BASE62; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};
const NOT_BASE62: u8 = 0xFF;

impl<'a> IdRef<'a> {
    /// Packs `id` if it has the shape of a minted key id. One pass: the shape is checked
    /// as the characters are packed (this runs on every verified call).
    pub fn of(id: &'a str) -> IdRef<'a> {
        let Some(rest) = id.strip_prefix(KEY_PREFIX) else {
            return IdRef::Other(id);
        };
        if rest.len() != MINTED_CHARS {
            return IdRef::Other(id);
        }
        // Four characters (24 bits) make three bytes, most significant first; a byte
        // that is no base62 digit sets a bit above the 24.
        let mut packed = [0u8; PACKED];
        let mut invalid = 0u32;
        for (out, four) in packed
            .chunks_exact_mut(3)
            .zip(rest.as_bytes().chunks_exact(4))
        {
            let bits = four.iter().fold(0u32, |bits, &c| {
                let d = DIGITS[usize::from(c)];
                invalid |= u32::from(d);
                (bits << 6) | u32::from(d & 63)
            });
            out.copy_from_slice(&bits.to_be_bytes()[1..]);
        }
        if invalid & 0x80 != 0 {
            return IdRef::Other(id);
        }
        IdRef::Minted(packed)
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
                    four[0] = CHARS[(bits >> 18) as usize & 63];
                    four[1] = CHARS[(bits >> 12) as usize & 63];
                    four[2] = CHARS[(bits >> 6) as usize & 63];
                    four[3] = CHARS[bits as usize & 63];
                }
                IdText::Minted(text)
            }
        }
    }
}

/// The alphabet padded to 64 entries, so that any six bits index it (a packed id only
/// holds values below 62).
static CHARS: [u8; 64] = {
    let mut table = [b'0'; 64];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[i] = ALPHABET[i];
        i += 1;
    }
    table
};

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

impl<'a> From<&'a str> for IdRef<'a> {
    fn from(id: &'a str) -> IdRef<'a> {
        IdRef::of(id)
    }
}

impl<'a> From<&'a String> for IdRef<'a> {
    fn from(id: &'a String) -> IdRef<'a> {
        IdRef::of(id)
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
            proptest::prop_assert!(matches!(IdRef::of(&id), IdRef::Minted(_)));
            proptest::prop_assert_eq!(PackedId::new(&id).to_string(), id);
        }

        #[test]
        fn packed_exactly_when_it_has_a_minted_ids_shape(id in "key_.{0,30}|.{0,30}") {
            let packed = matches!(IdRef::of(&id), IdRef::Minted(_));
            proptest::prop_assert_eq!(packed, crate::ids::is_key_id(&id));
            proptest::prop_assert_eq!(PackedId::new(&id).to_string(), id);
        }
    }
}
