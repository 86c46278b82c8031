//! Split and coalesce against the kernel (root only): two namespaces, each with a TUN
//! opened with `IFF_VNET_HDR` and every offload, and this test as the wire between them. It
//! reads super-packets from one TUN, splits them into MTU-sized packets, coalesces those and
//! writes the result to the other TUN, both ways, while real TCP (and UDP GSO) traffic
//! crosses. The kernel is the judge: it must accept every write, deliver the bytes intact,
//! and verify the checksums of every plain packet we write. It takes a super-packet's
//! checksum on trust when delivering it locally, so b also forwards to c over a veth with
//! every offload off: there the kernel segments our super-packets itself and computes each
//! segment's checksum from the pseudo-header sum we left, and c verifies them.
//!
//! ```text
//!  ns a: vt 10.77.1.1        ns b: vt 10.77.2.1            ns c:
//!        fd00:77:1::1 ─ TUN ─ [this test] ─ TUN ─ fd00:77:2::1
//!                                           vb 10.77.3.1 ── vc 10.77.3.2, fd00:77:3::2
//! ```

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::testing::{can_run, open_tun, set_int_option, wait_readable, Netns};
use super::*;

const ALL_OFFLOADS: u32 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6;
const TCP_OFFLOADS: u32 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;

/// What one direction of the wire saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    reads: u64,
    tcp_super_reads: u64,
    udp_super_reads: u64,
    largest_gso_read: usize,
    needs_csum_singles: u64,
    split_errors: Vec<String>,
    writes: u64,
    coalesced_writes: u64,
    most_segments_per_write: usize,
    write_errors: Vec<String>,
}

/// One direction of the wire: read `from`, split, coalesce, write `to`, until `stop`.
fn pump(from: File, mut to: File, stop: Arc<AtomicBool>) -> JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut from = from;
        let mut seen = Seen::default();
        let mut read = vec![0u8; VNET_HDR_LEN + MAX_PACKET];
        let mut bufs = vec![vec![0u8; 1600]; 256];
        let mut sizes = vec![0usize; 256];
        let mut coalescer = Coalescer::new(256, 1 << 18);
        while !stop.load(Ordering::Relaxed) {
            if !wait_readable(&from, 20) {
                continue;
            }
            let n = match from.read(&mut read) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("read from TUN: {e}"),
            };
            seen.reads += 1;
            let hdr = VirtioNetHdr::decode(&read[..n]).expect("the kernel's header");
            match hdr.gso() {
                Ok(Gso::TcpV4 | Gso::TcpV6) => seen.tcp_super_reads += 1,
                Ok(Gso::UdpL4) => seen.udp_super_reads += 1,
                Ok(Gso::None) if hdr.needs_csum() => seen.needs_csum_singles += 1,
                _ => {}
            }
            if hdr.gso_type != GSO_NONE {
                seen.largest_gso_read = seen.largest_gso_read.max(n - VNET_HDR_LEN);
            }
            let count = match split(&read[..n], &mut bufs, 0, &mut sizes) {
                Ok(c) => c,
                Err(e) => {
                    seen.split_errors.push(format!("{e} ({hdr:?})"));
                    continue;
                }
            };
            let packets: Vec<&[u8]> = (0..count).map(|i| &bufs[i][..sizes[i]]).collect();
            let mut done = 0;
            while done < count {
                done += coalescer.coalesce(&packets[done..]);
                for w in coalescer.writes() {
                    let h = VirtioNetHdr::decode(w).expect("our header");
                    if h.gso_type != GSO_NONE {
                        let payload = w.len() - VNET_HDR_LEN - usize::from(h.hdr_len);
                        let segments = payload.div_ceil(usize::from(h.gso_size));
                        seen.coalesced_writes += 1;
                        seen.most_segments_per_write = seen.most_segments_per_write.max(segments);
                    }
                    match to.write(w) {
                        Ok(k) if k == w.len() => seen.writes += 1,
                        Ok(k) => seen
                            .write_errors
                            .push(format!("short write {k} of {}", w.len())),
                        Err(e) => seen.write_errors.push(format!("{e} ({h:?})")),
                    }
                }
            }
        }
        seen
    })
}

/// Two namespaces joined by two offloading TUNs and the wire between them.
struct Lab {
    a: Netns,
    b: Netns,
    c: Netns,
    stop: Arc<AtomicBool>,
    pumps: Vec<JoinHandle<Seen>>,
    uso: bool,
}

impl Lab {
    fn new() -> Lab {
        let a = Netns::new("a");
        let b = Netns::new("b");
        let c = Netns::new("c");
        let open = |ns: &Netns| {
            ns.run(|| match open_tun("vt", ALL_OFFLOADS) {
                Ok(f) => (f, true),
                // Before Linux 6.2 the USO flags are refused: TCP alone then.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                    open_tun("vt", TCP_OFFLOADS).expect("TUN with TCP offloads"),
                    false,
                ),
                Err(e) => panic!("TUN: {e}"),
            })
        };
        let (tun_a, uso) = open(&a);
        let (tun_b, _) = open(&b);
        for (ns, me) in [(&a, "1"), (&b, "2")] {
            ns.ip(&["link", "set", "vt", "mtu", "1500", "up"]);
            ns.ip(&["addr", "add", &format!("10.77.{me}.1/32"), "dev", "vt"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("fd00:77:{me}::1/128"),
                "dev",
                "vt",
                "nodad",
            ]);
        }
        a.ip(&["route", "add", "10.77.0.0/16", "dev", "vt"]);
        a.ip(&["route", "add", "fd00:77::/32", "dev", "vt"]);
        b.ip(&["route", "add", "10.77.1.0/24", "dev", "vt"]);
        b.ip(&["route", "add", "fd00:77:1::/64", "dev", "vt"]);
        b.ip(&[
            "link", "add", "vb", "type", "veth", "peer", "name", "vc", "netns", &c.0,
        ]);
        for (ns, dev, me) in [(&b, "vb", "1"), (&c, "vc", "2")] {
            ns.ip(&["addr", "add", &format!("10.77.3.{me}/24"), "dev", dev]);
            ns.ip(&[
                "addr",
                "add",
                &format!("fd00:77:3::{me}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ns.ip(&["link", "set", dev, "up"]);
            // No checksum or segmentation offload on either end: b's kernel segments our
            // super-packets and computes their checksums, c's verifies every one.
            ns.exec(&[
                "ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off", "gso", "off",
            ]);
        }
        c.ip(&["route", "add", "10.77.0.0/16", "via", "10.77.3.1"]);
        c.ip(&["route", "add", "fd00:77::/32", "via", "fd00:77:3::1"]);
        b.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        b.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        let stop = Arc::new(AtomicBool::new(false));
        let pumps = vec![
            pump(
                tun_a.try_clone().expect("dup"),
                tun_b.try_clone().expect("dup"),
                stop.clone(),
            ),
            pump(tun_b, tun_a, stop.clone()),
        ];
        Lab {
            a,
            b,
            c,
            stop,
            pumps,
            uso,
        }
    }

    /// Stops the wire; what each direction (a → b, b → a) saw.
    fn finish(mut self) -> (Seen, Seen) {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = self.pumps.drain(..).map(|p| p.join().expect("pump"));
        (seen.next().unwrap(), seen.next().unwrap())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
    }
}

fn stream(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i ^ (i >> 9) ^ (i >> 17)) as u8).collect()
}

/// Sends `data` over TCP from namespace a to a server in `to` and returns what it received.
fn tcp_transfer(lab: &Lab, to: &Netns, server: SocketAddr, data: Arc<Vec<u8>>) -> Vec<u8> {
    let listener = to.run(move || TcpListener::bind(server).expect("bind"));
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read the stream");
        got
    });
    lab.a
        .run(move || {
            let mut s =
                TcpStream::connect_timeout(&server, Duration::from_secs(10)).expect("connect");
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&data)?;
            s.shutdown(Shutdown::Write)
        })
        .expect("send the stream");
    receiver.join().expect("receiver")
}

#[test]
fn netns_tcp_crosses_offloading_tuns_split_and_coalesced() {
    if !can_run("netns_tcp_crosses_offloading_tuns_split_and_coalesced") {
        return;
    }
    let lab = Lab::new();
    let data = Arc::new(stream(4 << 20));
    for (to, server) in [
        (&lab.b, "10.77.2.1:5201"),
        (&lab.b, "[fd00:77:2::1]:5202"),
        (&lab.c, "10.77.3.2:5203"),
        (&lab.c, "[fd00:77:3::2]:5204"),
    ] {
        let got = tcp_transfer(&lab, to, server.parse().unwrap(), data.clone());
        assert_eq!(got.len(), data.len(), "{server}: every byte");
        assert!(got == *data, "{server}: the bytes intact");
    }
    for ns in [&lab.a, &lab.b, &lab.c] {
        assert_eq!(
            ns.snmp("Ip", "InHdrErrors"),
            0,
            "{}: IPv4 header checksums",
            ns.0
        );
        assert_eq!(ns.snmp("Tcp", "InCsumErrors"), 0, "{}: TCP checksums", ns.0);
    }
    let (ab, ba) = lab.finish();
    eprintln!("a -> b: {ab:?}\nb -> a: {ba:?}");
    for s in [&ab, &ba] {
        assert_eq!(s.split_errors, Vec::<String>::new(), "every read split");
        assert_eq!(s.write_errors, Vec::<String>::new(), "every write accepted");
    }
    assert!(
        ab.tcp_super_reads > 0,
        "the kernel handed over TCP super-packets"
    );
    assert!(ab.largest_gso_read > 1500);
    assert!(
        ab.coalesced_writes > 0 && ab.most_segments_per_write > 1,
        "super-packets written back"
    );
    assert!(
        ba.needs_csum_singles > 0,
        "ACKs came with their checksums left to us, and were completed"
    );
}

#[test]
fn netns_udp_gso_crosses_offloading_tuns() {
    if !can_run("netns_udp_gso_crosses_offloading_tuns") {
        return;
    }
    let lab = Lab::new();
    for (from, to) in [
        ("10.77.1.1:0", "10.77.2.1:6000"),
        ("[fd00:77:1::1]:0", "[fd00:77:2::1]:6001"),
    ] {
        let to: SocketAddr = to.parse().unwrap();
        let rx = lab.b.run(move || UdpSocket::bind(to).expect("bind in b"));
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let from: SocketAddr = from.parse().unwrap();
        let payload = stream(1200 * 10 + 300);
        let sent = payload.clone();
        lab.a.run(move || {
            let tx = UdpSocket::bind(from).expect("bind in a");
            // UDP_SEGMENT (SOL_UDP 17, option 103): one send, one GSO train of 1200-byte
            // datagrams.
            set_int_option(&tx, libc::SOL_UDP, 103, 1200).expect("UDP_SEGMENT");
            assert_eq!(tx.send_to(&sent, to).expect("send the train"), sent.len());
        });
        let mut buf = [0u8; 2000];
        for (i, want) in payload.chunks(1200).enumerate() {
            let n = rx
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} to {to}: {e}"));
            assert_eq!(&buf[..n], want, "datagram {i} to {to}");
        }
    }
    let uso = lab.uso;
    let lab_udp_errors = lab.b.snmp("Udp", "InCsumErrors");
    let (ab, ba) = lab.finish();
    eprintln!("USO flags accepted: {uso}\na -> b: {ab:?}\nb -> a: {ba:?}");
    for s in [&ab, &ba] {
        assert_eq!(s.split_errors, Vec::<String>::new(), "every read split");
        assert_eq!(s.write_errors, Vec::<String>::new(), "every write accepted");
    }
    assert_eq!(lab_udp_errors, 0, "UDP checksums in b");
    if uso {
        assert_eq!(ab.udp_super_reads, 2, "one UDP_L4 super-packet per train");
    }
}
