//! WireGuard-shaped messages for the load generator and the sink.
//!
//! Nothing here is encrypted: a relay never decrypts, so the generator only has to get the
//! framing right (DESIGN §2) and, for WraithGate, a valid mac1 keyed by the exit's public
//! key. The transport payload carries what the sink needs to measure: the flow, and the
//! send time as a raw `quanta` reading. The WireGuard counter (bytes 8..16) is the
//! sequence number.

use wraithgate_relay::keys::Mac1Key;
use wraithgate_relay::wire::{
    INITIATION_LEN, INITIATION_MAC1_OFFSET, MAC_LEN, RESPONSE_LEN, TRANSPORT_HEADER_LEN,
};

/// Sender indices the generator picks carry this tag so the sink can map them to flows.
pub const CLIENT_INDEX_TAG: u32 = 0xC000_0000;
/// Sender indices the sink picks.
pub const EXIT_INDEX_TAG: u32 = 0xE000_0000;
const FLOW_MASK: u32 = 0x000F_FFFF;

/// Offset of the send timestamp in a transport message.
pub const TIMESTAMP_OFFSET: usize = TRANSPORT_HEADER_LEN;
/// Offset of the flow number in a transport message.
pub const FLOW_OFFSET: usize = TRANSPORT_HEADER_LEN + 8;
/// The smallest transport message that holds the measurement payload.
pub const MIN_TRANSPORT_LEN: usize = 32;

/// The client's sender index for `flow`.
pub fn client_index(flow: u32) -> u32 {
    CLIENT_INDEX_TAG | (flow & FLOW_MASK)
}

/// The exit's sender index for `flow` (the sink answers with it).
pub fn exit_index(flow: u32) -> u32 {
    EXIT_INDEX_TAG | (flow & FLOW_MASK)
}

/// The flow a tagged index belongs to.
pub fn flow_of_index(index: u32) -> Option<u32> {
    let tag = index & !FLOW_MASK;
    (tag == CLIENT_INDEX_TAG || tag == EXIT_INDEX_TAG).then_some(index & FLOW_MASK)
}

/// A handshake initiation from `flow` to the exit whose mac1 key is `mac1`.
pub fn initiation(flow: u32, mac1: &Mac1Key) -> [u8; INITIATION_LEN] {
    let mut m = [0u8; INITIATION_LEN];
    m[0] = 1;
    m[4..8].copy_from_slice(&client_index(flow).to_le_bytes());
    // Fill the ephemeral/static/timestamp fields with something non-zero and per-flow.
    for (i, b) in m[8..INITIATION_MAC1_OFFSET].iter_mut().enumerate() {
        *b = (i as u32 ^ flow) as u8;
    }
    let tag = mac1.compute(&m[..INITIATION_MAC1_OFFSET]);
    m[INITIATION_MAC1_OFFSET..INITIATION_MAC1_OFFSET + MAC_LEN].copy_from_slice(&tag);
    m
}

/// The sink's response to an initiation carrying `client_sender_index`.
pub fn response(client_sender_index: u32) -> [u8; RESPONSE_LEN] {
    let mut m = [0u8; RESPONSE_LEN];
    m[0] = 2;
    let flow = client_sender_index & FLOW_MASK;
    m[4..8].copy_from_slice(&exit_index(flow).to_le_bytes());
    m[8..12].copy_from_slice(&client_sender_index.to_le_bytes());
    m
}

/// Writes a transport message of `buf.len()` bytes (≥ 32, a multiple of 16).
pub fn write_transport(buf: &mut [u8], receiver_index: u32, seq: u64, flow: u32, sent_raw: u64) {
    debug_assert!(buf.len() >= MIN_TRANSPORT_LEN && buf.len() % 16 == 0);
    buf[0..4].copy_from_slice(&[4, 0, 0, 0]);
    buf[4..8].copy_from_slice(&receiver_index.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[TIMESTAMP_OFFSET..TIMESTAMP_OFFSET + 8].copy_from_slice(&sent_raw.to_le_bytes());
    buf[FLOW_OFFSET..FLOW_OFFSET + 4].copy_from_slice(&flow.to_le_bytes());
}

/// What the sink reads from a transport message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportProbe {
    pub flow: u32,
    pub seq: u64,
    pub sent_raw: u64,
}

/// Reads a transport message written by [`write_transport`]; `None` for anything else.
pub fn read_transport(buf: &[u8]) -> Option<TransportProbe> {
    if buf.len() < MIN_TRANSPORT_LEN || buf[0] != 4 {
        return None;
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let mut f = [0u8; 4];
    f.copy_from_slice(&buf[FLOW_OFFSET..FLOW_OFFSET + 4]);
    Some(TransportProbe {
        flow: u32::from_le_bytes(f),
        seq: u64_at(8),
        sent_raw: u64_at(TIMESTAMP_OFFSET),
    })
}

/// A transport size rounded to what WireGuard can send: a multiple of 16, at least 32.
pub fn transport_len(requested: usize) -> usize {
    requested.max(MIN_TRANSPORT_LEN).div_ceil(16) * 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use wraithgate_relay::wire::Message;
    use wraithgate_relay::PublicKey;

    #[test]
    fn messages_parse_as_what_they_claim() {
        let key = PublicKey([7; 32]).mac1_key();
        let init = initiation(42, &key);
        match Message::parse(&init).unwrap() {
            Message::Initiation(i) => {
                assert_eq!(i.sender_index(), client_index(42));
                assert!(key.verify(i.mac1_input(), i.mac1()));
            }
            other => panic!("not an initiation: {other:?}"),
        }
        let resp = response(client_index(42));
        match Message::parse(&resp).unwrap() {
            Message::Response(r) => {
                assert_eq!(r.receiver_index(), client_index(42));
                assert_eq!(flow_of_index(r.sender_index()), Some(42));
            }
            other => panic!("not a response: {other:?}"),
        }
        let mut t = vec![0u8; transport_len(1420)];
        write_transport(&mut t, exit_index(42), 9, 42, 1234);
        assert!(matches!(Message::parse(&t), Ok(Message::Transport(_))));
        assert_eq!(
            read_transport(&t),
            Some(TransportProbe {
                flow: 42,
                seq: 9,
                sent_raw: 1234
            })
        );
    }

    #[test]
    fn transport_len_is_wireguard_shaped() {
        assert_eq!(transport_len(1420), 1424);
        assert_eq!(transport_len(64), 64);
        assert_eq!(transport_len(1), 32);
    }
}
