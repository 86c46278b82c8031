//! The relay's own cookie replies (WireGuard paper §5.4.7), for handshakes under load.
//!
//! A WireGuard responder under load answers an initiation with a cookie reply instead of
//! doing the handshake; the initiator's next attempt carries mac2, keyed by that cookie,
//! which proves it receives what is sent to its address. The reply is encrypted with
//! `HASH("cookie--" ‖ responder public key)`: a key anyone who knows the exit's *public*
//! key can make. So the relay, standing in front of its exits, can challenge initiations
//! itself. A spoofed source never sees the cookie and never gets past the challenge, so a
//! flood of spoofed initiations cannot fill the pending table or spend a real client's
//! handshake budget.
//!
//! The cookie is `MAC(R, source IP ‖ port)`, `R` derived from a secret seed and a two-minute
//! epoch (the cookie's lifetime at the initiator); mac2 is checked against the current and
//! the previous epoch. The seed comes from the caller, so this module reads no clock and
//! draws no randomness.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blake2::digest::{consts::U16, Digest, FixedOutput, Mac};
use blake2::{Blake2s256, Blake2sMac};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::keys::PublicKey;
use crate::wire::{Initiation, COOKIE_REPLY_LEN, COOKIE_REPLY_TYPE, MAC_LEN};

const LABEL_COOKIE: &[u8] = b"cookie--";
/// How long an initiator keeps a cookie (WireGuard's COOKIE_SECRET_MAX_AGE).
const EPOCH: Duration = Duration::from_secs(120);

/// A cookie reply, ready to send.
pub type CookieReplyBytes = [u8; COOKIE_REPLY_LEN];

/// Makes and checks the relay's cookies. One per router.
#[derive(Clone)]
pub struct CookieJar {
    seed: [u8; 32],
    base: Instant,
    /// Nonces need not be secret; they only have to differ.
    nonce_salt: [u8; 16],
    nonces: u64,
    /// The secrets of the last two epochs used, so a flood costs no key derivation.
    secrets: [(u64, [u8; 32]); 2],
    /// The cookie-reply key of the last exit challenged for (floods aim at one exit).
    exit_key: Option<(PublicKey, [u8; 32])>,
}

impl CookieJar {
    /// A jar whose secrets derive from `seed`; routers sharing a seed accept each other's
    /// cookies. `salt` keeps their nonces apart.
    pub fn new(seed: [u8; 32], salt: u64, base: Instant) -> Self {
        let mut nonce_salt = [0u8; 16];
        nonce_salt[..8].copy_from_slice(&salt.to_le_bytes());
        nonce_salt[8..].copy_from_slice(&mac16(&seed, &[b"nonce-salt".as_slice()])[..8]);
        CookieJar {
            seed,
            base,
            nonce_salt,
            nonces: 0,
            // Epoch 0 is never used (epochs count from 1), so these are recomputed first.
            secrets: [(0, [0; 32]); 2],
            exit_key: None,
        }
    }

    fn secret(&mut self, epoch: u64) -> [u8; 32] {
        if let Some((_, s)) = self.secrets.iter().find(|(e, _)| *e == epoch) {
            return *s;
        }
        let s = mac32(&self.seed, &[b"cookie-secret", &epoch.to_le_bytes()]);
        // Keep the newer of the two cached epochs.
        let older = usize::from(self.secrets[0].0 > self.secrets[1].0);
        self.secrets[older] = (epoch, s);
        s
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.base).as_secs() / EPOCH.as_secs()) + 1
    }

    /// The cookie `source` holds if it received our reply during `epoch`.
    fn cookie(&mut self, epoch: u64, source: SocketAddr) -> [u8; MAC_LEN] {
        let secret = self.secret(epoch);
        let (ip, port) = match source {
            SocketAddr::V4(a) => (a.ip().to_ipv6_mapped().octets(), a.port()),
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => (v4.to_ipv6_mapped().octets(), a.port()),
                None => (a.ip().octets(), a.port()),
            },
        };
        mac16(&secret, &[&ip, &port.to_be_bytes()])
    }

    /// Whether `init`'s mac2 was made with a cookie we gave `source` in this epoch or the
    /// one before.
    pub fn verify_mac2(&mut self, now: Instant, source: SocketAddr, init: &Initiation<'_>) -> bool {
        let mac2 = init.mac2();
        if *mac2 == [0; MAC_LEN] {
            return false;
        }
        let epoch = self.epoch(now);
        [epoch, epoch - 1].into_iter().any(|e| {
            let cookie = self.cookie(e, source);
            mac16(&cookie, &[init.mac2_input()]) == *mac2
        })
    }

    /// A cookie reply to `init` from `source`, as the exit with `exit_key` would send it.
    pub fn reply(
        &mut self,
        now: Instant,
        source: SocketAddr,
        exit_key: &PublicKey,
        init: &Initiation<'_>,
    ) -> CookieReplyBytes {
        let key = match self.exit_key {
            Some((k, key)) if k == *exit_key => key,
            _ => {
                let key: [u8; 32] = Blake2s256::new()
                    .chain_update(LABEL_COOKIE)
                    .chain_update(exit_key.0)
                    .finalize()
                    .into();
                self.exit_key = Some((*exit_key, key));
                key
            }
        };
        let mut nonce = [0u8; 24];
        nonce[..8].copy_from_slice(&self.nonces.to_le_bytes());
        nonce[8..].copy_from_slice(&self.nonce_salt);
        self.nonces = self.nonces.wrapping_add(1);

        let mut cookie = self.cookie(self.epoch(now), source);
        let tag = XChaCha20Poly1305::new(&key.into())
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), init.mac1(), &mut cookie)
            .expect("a 16-byte plaintext is within XChaCha20-Poly1305's limits");

        let mut out = [0u8; COOKIE_REPLY_LEN];
        out[0] = COOKIE_REPLY_TYPE;
        out[4..8].copy_from_slice(&init.sender_index().to_le_bytes());
        out[8..32].copy_from_slice(&nonce);
        out[32..48].copy_from_slice(&cookie);
        out[48..64].copy_from_slice(&tag);
        out
    }
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieJar(..)")
    }
}

/// Keyed BLAKE2s with a 16-byte output over the concatenation of `parts`.
fn mac16(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // BLAKE2s takes keys of 1 to 32 bytes; ours are 16 or 32.
    let mut mac =
        <Blake2sMac<U16> as Mac>::new_from_slice(key).expect("BLAKE2s key of 16 or 32 bytes");
    for p in parts {
        Mac::update(&mut mac, p);
    }
    mac.finalize_fixed().into()
}

/// Keyed BLAKE2s with a 32-byte output over the concatenation of `parts`.
fn mac32(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <blake2::Blake2sMac256 as Mac>::new_from_slice(key).expect("32-byte BLAKE2s key");
    for p in parts {
        Mac::update(&mut mac, p);
    }
    mac.finalize_fixed().into()
}

/// What an initiator does with a cookie reply (WireGuard paper §5.4.7), for tests, the
/// fuzzer and test clients: decrypt `reply` with the key of the responder's public key and
/// the mac1 of the initiation it answered (`sent`), then key the mac2 of `retry` with the
/// cookie. Written out from the paper rather than with the relay's helpers above. `None`
/// if the reply does not decrypt.
pub fn initiator_mac2(
    exit: &PublicKey,
    reply: &[u8; COOKIE_REPLY_LEN],
    sent: &Initiation<'_>,
    retry: &Initiation<'_>,
) -> Option<[u8; MAC_LEN]> {
    let key = Blake2s256::digest([LABEL_COOKIE, &exit.0[..]].concat());
    let mut cookie = [0u8; MAC_LEN];
    cookie.copy_from_slice(&reply[32..48]);
    <XChaCha20Poly1305 as KeyInit>::new_from_slice(&key)
        .ok()?
        .decrypt_in_place_detached(
            XNonce::from_slice(&reply[8..32]),
            sent.mac1(),
            &mut cookie,
            reply[48..64].into(),
        )
        .ok()?;
    Some(mac16(&cookie, &[retry.mac2_input()]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Message, INITIATION_LEN, INITIATION_MAC1_OFFSET, INITIATION_MAC2_OFFSET};

    /// An initiation with `sender` and a mac1 for `exit` (the rest is noise to us).
    fn initiation(exit: &PublicKey, sender: u32) -> [u8; INITIATION_LEN] {
        let mut m = [0x5a; INITIATION_LEN];
        m[..4].copy_from_slice(&[1, 0, 0, 0]);
        m[4..8].copy_from_slice(&sender.to_le_bytes());
        let mac1 = exit.mac1_key().compute(&m[..INITIATION_MAC1_OFFSET]);
        m[INITIATION_MAC1_OFFSET..INITIATION_MAC2_OFFSET].copy_from_slice(&mac1);
        m[INITIATION_MAC2_OFFSET..].fill(0);
        m
    }

    fn parse(m: &[u8]) -> Initiation<'_> {
        match Message::parse(m) {
            Ok(Message::Initiation(i)) => i,
            other => panic!("not an initiation: {other:?}"),
        }
    }

    #[test]
    fn a_cookie_proves_the_source_and_only_that_source() {
        let t0 = Instant::now();
        let exit = PublicKey([9; 32]);
        let mut jar = CookieJar::new([7; 32], 1, t0);
        let client: SocketAddr = "198.51.100.7:51820".parse().unwrap();
        let first = initiation(&exit, 0xabcd);
        assert!(!jar.verify_mac2(t0, client, &parse(&first)), "mac2 is zero");

        let reply = jar.reply(t0, client, &exit, &parse(&first));
        assert_eq!(reply[0], COOKIE_REPLY_TYPE);
        assert_eq!(&reply[1..4], &[0, 0, 0]);
        assert_eq!(
            reply[4..8],
            0xabcdu32.to_le_bytes(),
            "addressed to the sender index"
        );
        assert!(matches!(
            Message::parse(&reply),
            Ok(Message::CookieReply(_))
        ));

        // The retry is a new initiation; the client keys its mac2 with the cookie.
        let mut retry = initiation(&exit, 0x1234);
        let mac2 = initiator_mac2(&exit, &reply, &parse(&first), &parse(&retry)).unwrap();
        retry[INITIATION_MAC2_OFFSET..].copy_from_slice(&mac2);
        assert!(jar.verify_mac2(t0, client, &parse(&retry)));

        // Another port, another address, or a tampered message: refused.
        let other_port: SocketAddr = "198.51.100.7:51821".parse().unwrap();
        let other_ip: SocketAddr = "198.51.100.8:51820".parse().unwrap();
        assert!(!jar.verify_mac2(t0, other_port, &parse(&retry)));
        assert!(!jar.verify_mac2(t0, other_ip, &parse(&retry)));
        let mut tampered = retry;
        tampered[20] ^= 1;
        assert!(!jar.verify_mac2(t0, client, &parse(&tampered)));

        // The same address written as IPv4-mapped IPv6 holds the same cookie.
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:51820".parse().unwrap();
        assert!(jar.verify_mac2(t0, mapped, &parse(&retry)));

        // A router with the same seed accepts it; one with another seed does not.
        let mut twin = CookieJar::new([7; 32], 2, t0);
        assert!(twin.verify_mac2(t0, client, &parse(&retry)));
        let mut stranger = CookieJar::new([8; 32], 1, t0);
        assert!(!stranger.verify_mac2(t0, client, &parse(&retry)));

        // Valid through the next epoch, gone after.
        assert!(jar.verify_mac2(t0 + EPOCH + Duration::from_secs(60), client, &parse(&retry)));
        assert!(!jar.verify_mac2(t0 + EPOCH * 2, client, &parse(&retry)));
    }

    #[test]
    fn replies_never_repeat_a_nonce() {
        let t0 = Instant::now();
        let exit = PublicKey([9; 32]);
        let client: SocketAddr = "198.51.100.7:51820".parse().unwrap();
        let init = initiation(&exit, 1);
        let mut a = CookieJar::new([7; 32], 1, t0);
        let mut b = CookieJar::new([7; 32], 2, t0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            assert!(seen.insert(a.reply(t0, client, &exit, &parse(&init))[8..32].to_vec()));
            assert!(seen.insert(b.reply(t0, client, &exit, &parse(&init))[8..32].to_vec()));
        }
    }
}
