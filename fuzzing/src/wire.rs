//! `Message::parse` against an independent reading of the WireGuard paper (§5.4).

use wraithgate_relay::wire::Message;
use wraithgate_relay::DropReason;

/// What a datagram is, decided from DESIGN §2 alone: type byte, three zero bytes, exact
/// handshake sizes, transport at least 32 bytes.
pub(crate) fn classify(d: &[u8]) -> Result<u8, DropReason> {
    if d.len() < 4 {
        return Err(DropReason::Truncated);
    }
    if d[1] != 0 || d[2] != 0 || d[3] != 0 {
        return Err(DropReason::ReservedNonZero);
    }
    let ok = match d[0] {
        1 => d.len() == 148,
        2 => d.len() == 92,
        3 => d.len() == 64,
        4 => d.len() >= 32,
        _ => return Err(DropReason::UnknownType),
    };
    if ok {
        Ok(d[0])
    } else {
        Err(DropReason::BadLength)
    }
}

fn le32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
}

pub fn check(data: &[u8]) {
    let parsed = Message::parse(data);
    let expected = classify(data);
    match (parsed, expected) {
        (Err(got), Err(want)) => assert_eq!(got, want, "refused for the wrong reason"),
        (Ok(m), Ok(kind)) => {
            match m {
                Message::Initiation(i) => {
                    assert_eq!(kind, 1);
                    assert_eq!(i.sender_index(), le32(data, 4));
                    assert_eq!(i.mac1_input(), &data[..116]);
                    assert_eq!(&i.mac1()[..], &data[116..132]);
                    assert_eq!(i.bytes(), data);
                }
                Message::Response(r) => {
                    assert_eq!(kind, 2);
                    assert_eq!(r.sender_index(), le32(data, 4));
                    assert_eq!(r.receiver_index(), le32(data, 8));
                    assert_eq!(r.mac1_input(), &data[..60]);
                    assert_eq!(&r.mac1()[..], &data[60..76]);
                }
                Message::CookieReply(c) => {
                    assert_eq!(kind, 3);
                    assert_eq!(c.receiver_index(), le32(data, 4));
                }
                Message::Transport(t) => {
                    assert_eq!(kind, 4);
                    assert_eq!(t.receiver_index(), le32(data, 4));
                    let mut counter = [0u8; 8];
                    counter.copy_from_slice(&data[8..16]);
                    assert_eq!(t.counter(), u64::from_le_bytes(counter));
                    assert_eq!(t.bytes(), data);
                }
            }
            assert!(!m.kind().as_str().is_empty());
        }
        (got, want) => panic!("parse gave {got:?}, the reference {want:?}"),
    }
}
