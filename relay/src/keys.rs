//! WireGuard public keys and the mac1 check a relay can do with public keys alone.
//!
//! WireGuard paper §5.4.4: `mac1 = MAC(HASH(LABEL_MAC1 ‖ S_pub_recipient), msg_α)`, where
//! MAC is keyed BLAKE2s with a 16-byte output, HASH is BLAKE2s-256 and `msg_α` is the
//! message up to mac1. A relay that knows an exit's public key can therefore tell whether an
//! initiation is addressed to that exit without decrypting anything.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use blake2::digest::{consts::U16, Digest, FixedOutput, Mac};
use blake2::{Blake2s256, Blake2sMac};

use crate::wire::MAC_LEN;

const LABEL_MAC1: &[u8] = b"mac1----";

/// A Curve25519 public key as WireGuard uses it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64: {0}")]
    Base64(String),
    #[error("a WireGuard key is 32 bytes, this one decodes to {0}")]
    Length(usize),
}

impl PublicKey {
    /// Parses a key in standard base64, as `wg` prints it.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let len = bytes.len();
        bytes
            .try_into()
            .map(PublicKey)
            .map_err(|_| KeyError::Length(len))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The key mac1 is computed with for messages sent to the owner of this public key.
    pub fn mac1_key(&self) -> Mac1Key {
        let key: [u8; 32] = Blake2s256::new()
            .chain_update(LABEL_MAC1)
            .chain_update(self.0)
            .finalize()
            .into();
        // A 32-byte key is always a valid BLAKE2s key, so this cannot fail.
        let mac = Blake2sMac::<U16>::new_from_slice(&key).expect("32-byte BLAKE2s key");
        Mac1Key { keyed: mac }
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_base64(s)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        PublicKey::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// A BLAKE2s MAC state already keyed for one recipient: checking a message costs only the
/// message blocks, the key block is absorbed once when the table is built.
#[derive(Clone)]
pub struct Mac1Key {
    keyed: Blake2sMac<U16>,
}

impl Mac1Key {
    /// mac1 of `input` (the message bytes before the mac1 field).
    pub fn compute(&self, input: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.keyed.clone();
        Mac::update(&mut mac, input);
        mac.finalize_fixed().into()
    }

    /// Whether `mac1` is the right mac1 of `input` for this recipient.
    pub fn verify(&self, input: &[u8], mac1: &[u8; MAC_LEN]) -> bool {
        // Not constant-time on purpose: mac1 is computable by anyone who knows the
        // recipient's public key, so its comparison guards no secret.
        self.compute(input) == *mac1
    }
}

impl std::fmt::Debug for Mac1Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mac1Key(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_errors() {
        let k = PublicKey([7; 32]);
        assert_eq!(PublicKey::from_base64(&k.to_base64()), Ok(k));
        assert!(matches!(
            PublicKey::from_base64("not base64!"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(
            PublicKey::from_base64(&STANDARD.encode([1u8; 31])),
            Err(KeyError::Length(31))
        );
    }

    #[test]
    fn mac1_is_keyed_blake2s_of_the_label_and_key() {
        // Reference computed the long way round, without the pre-keyed state.
        let pk = PublicKey([0x42; 32]);
        let msg = [0x11u8; 116];
        let key = Blake2s256::digest([LABEL_MAC1, &pk.0[..]].concat());
        let mut reference = Blake2sMac::<U16>::new_from_slice(&key).unwrap();
        Mac::update(&mut reference, &msg);
        let expected: [u8; 16] = reference.finalize_fixed().into();
        let mk = pk.mac1_key();
        assert_eq!(mk.compute(&msg), expected);
        assert!(mk.verify(&msg, &expected));
        assert!(!PublicKey([0x43; 32]).mac1_key().verify(&msg, &expected));
    }
}
