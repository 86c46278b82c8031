//! Handshake load for the roles that terminate WireGuard (Z-HOP and Exit peers): initiations
//! with a valid mac1 for the node's key, from many loopback sources, which only a DH could
//! tell from real ones. Past a worker's handshake budget the node must answer them with
//! cookie replies instead of decrypting them.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wraithgate_relay::wire::{INITIATION_LEN, INITIATION_MAC1_OFFSET, INITIATION_MAC2_OFFSET};
use wraithgate_relay::PublicKey;

/// An initiation anyone who knows the node's public key can make, from any source: a valid
/// mac1 over noise. Only a DH (decrypting the initiator's static key) tells it from a real one.
pub fn junk_initiation(node: &PublicKey, sender: u32) -> [u8; INITIATION_LEN] {
    let mut m = [0u8; INITIATION_LEN];
    m[0] = 1;
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    for (i, b) in m[8..INITIATION_MAC1_OFFSET].iter_mut().enumerate() {
        *b = (i as u32 ^ sender) as u8;
    }
    let mac1 = node.mac1_key().compute(&m[..INITIATION_MAC1_OFFSET]);
    m[INITIATION_MAC1_OFFSET..INITIATION_MAC2_OFFSET].copy_from_slice(&mac1);
    m
}

/// A thread sending [`junk_initiation`]s to a node from `sources` loopback addresses
/// (127.3.x.y), one from each every 50 ms: with 120 sources about 2,400 a second, so each
/// of two workers' shares is far past its budget (100 a second). Stops when dropped.
#[derive(Debug)]
pub struct HandshakeFlood {
    /// A second handle on the first source's socket, to read what the node answered it.
    pub probe: UdpSocket,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl HandshakeFlood {
    /// Starts flooding `to` with initiations for `node`. Binds its sockets in the calling
    /// thread's network namespace (the thread it starts inherits it).
    pub fn start(node: PublicKey, to: SocketAddr, sources: u32) -> std::io::Result<Self> {
        let sockets: Vec<UdpSocket> = (0..sources)
            .map(|i| {
                UdpSocket::bind(SocketAddr::from((
                    [127, 3, (i / 200) as u8, (i % 200 + 1) as u8],
                    0,
                )))
            })
            .collect::<Result<_, _>>()?;
        let probe = sockets[0].try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut sender = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    for sock in &sockets {
                        sender = sender.wrapping_add(1);
                        if sock.send_to(&junk_initiation(&node, sender), to).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Ok(HandshakeFlood {
            probe,
            stop,
            sent,
            thread: Some(thread),
        })
    }

    /// Stops the flood; returns how many initiations it sent.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The thread only sends; a panic there is the test's to see.
            t.join().expect("the flood thread panicked");
        }
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for HandshakeFlood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
