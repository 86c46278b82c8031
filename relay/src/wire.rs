//! Zero-copy views over the four WireGuard messages.
//!
//! WireGuard paper §5.4: every message starts with a one-byte type followed by three
//! reserved bytes that must be zero; all integers are little-endian. Handshake messages
//! have exact sizes; transport messages are a 16-byte header followed by an AEAD ciphertext
//! of at least the 16-byte tag, so at least 32 bytes.
//!
//! The paper pads plaintext to a multiple of 16, and wireguard-go and the kernel do, but
//! padding is the sender's business and boringtun does not pad at all ("spec requires
//! padding to 16 bytes, but actually works fine without it"). A relay that insisted on a
//! multiple of 16 would cut off every boringtun peer, so the length is not checked further.
//!
//! Nothing here allocates or copies: a [`Message`] borrows the received bytes, and the
//! relay later sends those very bytes on.

use crate::drop_reason::DropReason;

/// Message type 1, handshake initiation.
pub const INITIATION_TYPE: u8 = 1;
/// Message type 2, handshake response.
pub const RESPONSE_TYPE: u8 = 2;
/// Message type 3, cookie reply.
pub const COOKIE_REPLY_TYPE: u8 = 3;
/// Message type 4, transport data.
pub const TRANSPORT_TYPE: u8 = 4;

/// Exact size of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Exact size of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Exact size of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Size of the transport header (type, reserved, receiver index, counter).
pub const TRANSPORT_HEADER_LEN: usize = 16;
/// Smallest transport message: header plus an empty (keepalive) payload's 16-byte tag.
pub const TRANSPORT_MIN_LEN: usize = 32;

/// Where mac1 starts in an initiation; everything before it is covered by mac1.
pub const INITIATION_MAC1_OFFSET: usize = 116;
/// Where mac2 starts in an initiation; mac2 covers everything before it.
pub const INITIATION_MAC2_OFFSET: usize = INITIATION_MAC1_OFFSET + MAC_LEN;
/// Where mac1 starts in a response.
pub const RESPONSE_MAC1_OFFSET: usize = 60;
/// Length of mac1 and of mac2.
pub const MAC_LEN: usize = 16;

/// A parsed WireGuard message borrowing the datagram it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Initiation(Initiation<'a>),
    Response(Response<'a>),
    CookieReply(CookieReply<'a>),
    Transport(Transport<'a>),
}

/// Handshake initiation (type 1, 148 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initiation<'a>(&'a [u8; INITIATION_LEN]);

/// Handshake response (type 2, 92 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a>(&'a [u8; RESPONSE_LEN]);

/// Cookie reply (type 3, 64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieReply<'a>(&'a [u8; COOKIE_REPLY_LEN]);

/// Transport data (type 4, at least 32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport<'a>(&'a [u8]);

impl<'a> Message<'a> {
    /// Classifies `datagram`, checking type, reserved bytes and size exactly.
    ///
    /// Never panics, whatever the input.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, DropReason> {
        let Some(header) = datagram.first_chunk::<4>() else {
            return Err(DropReason::Truncated);
        };
        if header[1..] != [0, 0, 0] {
            return Err(DropReason::ReservedNonZero);
        }
        let len = datagram.len();
        match header[0] {
            INITIATION_TYPE => datagram
                .try_into()
                .map(|b| Message::Initiation(Initiation(b)))
                .map_err(|_| DropReason::BadLength),
            RESPONSE_TYPE => datagram
                .try_into()
                .map(|b| Message::Response(Response(b)))
                .map_err(|_| DropReason::BadLength),
            COOKIE_REPLY_TYPE => datagram
                .try_into()
                .map(|b| Message::CookieReply(CookieReply(b)))
                .map_err(|_| DropReason::BadLength),
            TRANSPORT_TYPE if len >= TRANSPORT_MIN_LEN => {
                Ok(Message::Transport(Transport(datagram)))
            }
            TRANSPORT_TYPE => Err(DropReason::BadLength),
            _ => Err(DropReason::UnknownType),
        }
    }

    /// The message type byte.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Initiation(_) => MessageKind::Initiation,
            Message::Response(_) => MessageKind::Response,
            Message::CookieReply(_) => MessageKind::CookieReply,
            Message::Transport(_) => MessageKind::Transport,
        }
    }
}

/// The four message kinds, for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Initiation,
    Response,
    CookieReply,
    Transport,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Initiation => "initiation",
            MessageKind::Response => "response",
            MessageKind::CookieReply => "cookie_reply",
            MessageKind::Transport => "transport",
        }
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

impl<'a> Initiation<'a> {
    /// The initiator's index; the responder will use it as `receiver_index`.
    pub fn sender_index(&self) -> u32 {
        le_u32(self.0, 4)
    }
    /// The bytes mac1 covers.
    pub fn mac1_input(&self) -> &'a [u8] {
        &self.0[..INITIATION_MAC1_OFFSET]
    }
    pub fn mac1(&self) -> &'a [u8; MAC_LEN] {
        self.0[INITIATION_MAC1_OFFSET..]
            .first_chunk()
            .expect("148-byte message holds mac1 at 116..132")
    }
    /// The bytes mac2 covers: everything before it, mac1 included.
    pub fn mac2_input(&self) -> &'a [u8] {
        &self.0[..INITIATION_MAC2_OFFSET]
    }
    /// mac2, all zeros unless the initiator holds a cookie for the responder.
    pub fn mac2(&self) -> &'a [u8; MAC_LEN] {
        self.0[INITIATION_MAC2_OFFSET..]
            .first_chunk()
            .expect("148-byte message holds mac2 at 132..148")
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }
}

impl<'a> Response<'a> {
    pub fn sender_index(&self) -> u32 {
        le_u32(self.0, 4)
    }
    pub fn receiver_index(&self) -> u32 {
        le_u32(self.0, 8)
    }
    pub fn mac1_input(&self) -> &'a [u8] {
        &self.0[..RESPONSE_MAC1_OFFSET]
    }
    pub fn mac1(&self) -> &'a [u8; MAC_LEN] {
        self.0[RESPONSE_MAC1_OFFSET..]
            .first_chunk()
            .expect("92-byte message holds mac1 at 60..76")
    }
}

impl CookieReply<'_> {
    pub fn receiver_index(&self) -> u32 {
        le_u32(self.0, 4)
    }
}

impl<'a> Transport<'a> {
    pub fn receiver_index(&self) -> u32 {
        le_u32(self.0, 4)
    }
    pub fn counter(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[8..16]);
        u64::from_le_bytes(b)
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(kind: u8, len: usize) -> Vec<u8> {
        let mut v = vec![0xA5; len];
        if len > 0 {
            v[0] = kind;
        }
        if len >= 4 {
            v[1..4].fill(0);
        }
        v
    }

    #[test]
    fn accepts_exact_sizes_only() {
        for (kind, exact) in [
            (INITIATION_TYPE, INITIATION_LEN),
            (RESPONSE_TYPE, RESPONSE_LEN),
            (COOKIE_REPLY_TYPE, COOKIE_REPLY_LEN),
        ] {
            for len in 0..=200 {
                let bytes = msg(kind, len);
                let parsed = Message::parse(&bytes);
                match len {
                    0..=3 => assert_eq!(parsed, Err(DropReason::Truncated), "len {len}"),
                    l if l == exact => assert!(parsed.is_ok(), "type {kind} len {len}"),
                    _ => assert_eq!(parsed, Err(DropReason::BadLength), "type {kind} len {len}"),
                }
            }
        }
    }

    #[test]
    fn transport_needs_32_bytes_padded_or_not() {
        for len in 4..=2000 {
            let bytes = msg(TRANSPORT_TYPE, len);
            let parsed = Message::parse(&bytes);
            if len >= 32 {
                assert!(matches!(parsed, Ok(Message::Transport(_))), "len {len}");
            } else {
                assert_eq!(parsed, Err(DropReason::BadLength), "len {len}");
            }
        }
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        for at in 1..4 {
            let mut m = msg(INITIATION_TYPE, INITIATION_LEN);
            m[at] = 1;
            assert_eq!(Message::parse(&m), Err(DropReason::ReservedNonZero));
        }
    }

    #[test]
    fn unknown_types_are_refused() {
        for kind in [0u8, 5, 0x7f, 0xff] {
            assert_eq!(
                Message::parse(&msg(kind, 148)),
                Err(DropReason::UnknownType)
            );
        }
    }

    #[test]
    fn fields_are_read_little_endian_at_their_offsets() {
        let mut r = msg(RESPONSE_TYPE, RESPONSE_LEN);
        r[4..8].copy_from_slice(&0x0102_0304u32.to_le_bytes());
        r[8..12].copy_from_slice(&0xAABB_CCDDu32.to_le_bytes());
        let Ok(Message::Response(resp)) = Message::parse(&r) else {
            panic!("valid response refused")
        };
        assert_eq!(resp.sender_index(), 0x0102_0304);
        assert_eq!(resp.receiver_index(), 0xAABB_CCDD);
        assert_eq!(resp.mac1_input().len(), 60);

        let mut t = msg(TRANSPORT_TYPE, 64);
        t[4..8].copy_from_slice(&7u32.to_le_bytes());
        t[8..16].copy_from_slice(&42u64.to_le_bytes());
        let Ok(Message::Transport(tr)) = Message::parse(&t) else {
            panic!("valid transport refused")
        };
        assert_eq!((tr.receiver_index(), tr.counter()), (7, 42));

        let mut c = msg(COOKIE_REPLY_TYPE, COOKIE_REPLY_LEN);
        c[4..8].copy_from_slice(&9u32.to_le_bytes());
        let Ok(Message::CookieReply(cr)) = Message::parse(&c) else {
            panic!("valid cookie reply refused")
        };
        assert_eq!(cr.receiver_index(), 9);
    }

    proptest! {
        #[test]
        fn never_panics_and_accepts_only_well_formed(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(m) = Message::parse(&bytes) {
                prop_assert_eq!(&bytes[1..4], &[0u8, 0, 0][..]);
                let ok_len = match m {
                    Message::Initiation(_) => bytes.len() == 148,
                    Message::Response(_) => bytes.len() == 92,
                    Message::CookieReply(_) => bytes.len() == 64,
                    Message::Transport(_) => bytes.len() >= 32,
                };
                prop_assert!(ok_len);
            }
        }
    }
}
