//! Datagrams that are not WireGuard at all, over real sockets: each is dropped and
//! counted under its reason, whatever its size (zero included).

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use wraithgate_relay::DropReason;
use wraithgate_tests::{backends, Relay};

#[test]
fn every_malformed_datagram_is_counted_empty_ones_included() {
    for backend in backends() {
        let relay = Relay::start(backend, vec![]);
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let cases: [(&[u8], DropReason); 5] = [
            (&[], DropReason::Truncated),
            (&[1], DropReason::Truncated),
            (&[1, 0, 0], DropReason::Truncated),
            (&[4, 0, 0, 0, 1], DropReason::BadLength),
            (&[7, 0, 0, 0], DropReason::UnknownType),
        ];
        for (bytes, _) in &cases {
            s.send_to(bytes, relay.addr).unwrap();
        }
        let end = Instant::now() + Duration::from_secs(10);
        let stats = loop {
            let st = relay.stats();
            if st.total_drops() >= cases.len() as u64 || Instant::now() > end {
                break st;
            }
        };
        assert_eq!(
            stats.dropped(DropReason::Truncated),
            3,
            "{}: the empty datagram must be counted too",
            backend.as_str()
        );
        assert_eq!(stats.dropped(DropReason::BadLength), 1);
        assert_eq!(stats.dropped(DropReason::UnknownType), 1);
    }
}
