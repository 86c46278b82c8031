//! Split and coalesce on hand-built packets, every checksum checked by the test's own
//! checksum routine (`testing::ones_sum`), and a split → coalesce → split round trip of
//! random TCP streams.

use proptest::prelude::*;

use super::testing::{
    checksums_ok, complete_as_a_device, partial, tcp_packet, tso_read, udp_packet, uso_read, Tcp,
    TCP_ACK,
};
use super::*;

const CWR: u8 = 0x80;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Splits `read` into fresh 2,048-byte buffers at `offset`; the packets and the untouched
/// prefix check.
fn split_all(read: &[u8], offset: usize) -> Result<Vec<Vec<u8>>, SplitError> {
    let mut bufs = vec![[0xeeu8; 2048]; 64];
    let mut sizes = [0usize; 64];
    let n = split(read, &mut bufs, offset, &mut sizes)?;
    if let Ok(h) = VirtioNetHdr::decode(read) {
        // The same read given as header and packet apart splits the same.
        let mut again = vec![[0u8; 2048]; 64];
        let mut sizes2 = [0usize; 64];
        let k = split_packet(&h, &read[VNET_HDR_LEN..], &mut again, offset, &mut sizes2)?;
        assert_eq!((k, &sizes2[..k]), (n, &sizes[..n]), "split_packet agrees");
        assert!((0..n)
            .all(|i| again[i][offset..offset + sizes[i]] == bufs[i][offset..offset + sizes[i]]));
    }
    Ok((0..n)
        .map(|i| {
            assert!(bufs[i][..offset].iter().all(|b| *b == 0xee), "prefix kept");
            bufs[i][offset..offset + sizes[i]].to_vec()
        })
        .collect())
}

fn tcp_at(p: &[u8]) -> usize {
    if p[0] >> 4 == 6 {
        40
    } else {
        20
    }
}

fn seq_of(p: &[u8]) -> u32 {
    let t = tcp_at(p);
    u32::from_be_bytes(p[t + 4..t + 8].try_into().unwrap())
}

#[test]
fn splits_tcp_super_packets_into_mss_segments() {
    for v6 in [false, true] {
        let t = Tcp {
            v6,
            flags: TCP_ACK | CWR | PSH | FIN,
            seq: u32::MAX - 2000, // wraps inside the super-packet
            ip_id: 0xfffe,        // and so does the IP ID
            ..Tcp::default()
        };
        let payload = pattern(5000, 7);
        let segs = split_all(&tso_read(&t, &payload, 1448), 16).unwrap();
        assert_eq!(segs.len(), 4);
        let ip = tcp_at(&segs[0]);
        let hl = ip + 32;
        for (i, s) in segs.iter().enumerate() {
            let chunk = &payload[i * 1448..((i + 1) * 1448).min(5000)];
            assert_eq!(&s[hl..], chunk, "segment {i} payload");
            assert!(checksums_ok(s), "segment {i} checksums (v6 {v6})");
            assert_eq!(seq_of(s), t.seq.wrapping_add((i * 1448) as u32));
            let flags = s[ip + 13];
            assert_eq!(flags & CWR != 0, i == 0, "CWR on the first only");
            assert_eq!(flags & (PSH | FIN), if i == 3 { PSH | FIN } else { 0 });
            assert_eq!(flags & TCP_ACK, TCP_ACK);
            if v6 {
                assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
            } else {
                assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                let id = u16::from_be_bytes([s[4], s[5]]);
                assert_eq!(id, 0xfffeu16.wrapping_add(i as u16));
                assert_eq!(s[6], 0x40, "DF kept");
            }
        }
        // The segments are exactly what a sender of MSS-sized packets would have built.
        for (i, s) in segs.iter().enumerate() {
            let expect = tcp_packet(
                &Tcp {
                    seq: t.seq.wrapping_add((i * 1448) as u32),
                    ip_id: t.ip_id.wrapping_add(i as u16),
                    flags: TCP_ACK
                        | if i == 0 { CWR } else { 0 }
                        | if i == 3 { PSH | FIN } else { 0 },
                    ..t.clone()
                },
                &payload[i * 1448..((i + 1) * 1448).min(5000)],
            );
            assert_eq!(s, &expect);
        }
    }
}

#[test]
fn splits_udp_super_packets_into_datagrams() {
    for v6 in [false, true] {
        let payload = pattern(1200 * 5 + 17, 3);
        let segs = split_all(&uso_read(v6, 9, &payload, 1200), 0).unwrap();
        assert_eq!(segs.len(), 6);
        for (i, s) in segs.iter().enumerate() {
            let chunk = &payload[i * 1200..((i + 1) * 1200).min(payload.len())];
            assert_eq!(s, &udp_packet(v6, 9 + i as u16, chunk), "datagram {i}");
            assert!(checksums_ok(s));
        }
    }
}

#[test]
fn an_exact_multiple_and_a_short_payload_split_right() {
    let t = Tcp::default();
    assert_eq!(
        split_all(&tso_read(&t, &pattern(2896, 1), 1448), 0)
            .unwrap()
            .len(),
        2
    );
    let one = split_all(&tso_read(&t, &pattern(100, 1), 1448), 0).unwrap();
    assert_eq!(one, vec![tcp_packet(&t, &pattern(100, 1))]);
    // No payload at all is one header-only segment.
    let empty = split_all(&tso_read(&t, &[], 1448), 0).unwrap();
    assert_eq!(empty, vec![tcp_packet(&t, &[])]);
}

#[test]
fn completes_the_checksum_of_a_single_packet_that_needs_it() {
    for v6 in [false, true] {
        let tcp = tcp_packet(
            &Tcp {
                v6,
                ..Tcp::default()
            },
            &pattern(333, 5),
        );
        let ip = if v6 { 40 } else { 20 };
        let read = partial(tcp.clone(), ip, 16, GSO_NONE, 0, 6);
        assert_eq!(split_all(&read, 8).unwrap(), vec![tcp.clone()]);
        let udp = udp_packet(v6, 1, &pattern(77, 5));
        let read = partial(udp.clone(), ip, 6, GSO_NONE, 0, 17);
        assert_eq!(split_all(&read, 0).unwrap(), vec![udp]);
    }
    // Without NEEDS_CSUM the packet goes as it is, whatever it holds.
    let mut read = vec![0; 10];
    read.extend_from_slice(b"not even IP");
    assert_eq!(split_all(&read, 0).unwrap(), vec![b"not even IP".to_vec()]);
}

#[test]
fn refuses_every_malformed_read_with_its_reason() {
    let t = Tcp::default();
    let good = tso_read(&t, &pattern(3000, 1), 1448);
    let good6 = tso_read(
        &Tcp {
            v6: true,
            ..t.clone()
        },
        &pattern(3000, 1),
        1448,
    );
    let with = |base: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut r = base.to_vec();
        f(&mut r);
        split_all(&r, 0).unwrap_err()
    };
    let e = |h: HdrError| SplitError::Header(h);
    assert_eq!(
        split_all(&good[..9], 0).unwrap_err(),
        e(HdrError::Truncated)
    );
    assert_eq!(with(&good, &|r| r[1] = 2), e(HdrError::UnknownGsoType(2)));
    assert_eq!(
        with(&good, &|r| r[1] = GSO_UDP),
        e(HdrError::UdpFragmentation)
    );
    assert_eq!(
        with(&good, &|r| r[1] = GSO_UDP_L4 | GSO_ECN),
        e(HdrError::EcnWithoutTcp)
    );
    assert_eq!(with(&good, &|r| r[4..6].fill(0)), e(HdrError::ZeroGsoSize));
    assert_eq!(with(&good, &|r| r.truncate(10)), SplitError::TruncatedIp);
    assert_eq!(with(&good, &|r| r.truncate(29)), SplitError::TruncatedIp);
    assert_eq!(with(&good6, &|r| r.truncate(49)), SplitError::TruncatedIp);
    assert_eq!(with(&good, &|r| r[1] = GSO_TCPV6), SplitError::IpVersion(4));
    assert_eq!(
        with(&good6, &|r| r[1] = GSO_TCPV4),
        SplitError::IpVersion(6)
    );
    assert_eq!(with(&good, &|r| r[10] = 0x55), SplitError::IpVersion(5));
    assert_eq!(
        with(&good, &|r| r[10] = 0x44),
        SplitError::BadIpv4HeaderLength(16)
    );
    let len = good.len() - 10;
    // csum_start must name the TCP header, which IHL 15 moves.
    assert_eq!(
        with(&good, &|r| r[10] = 0x4f),
        SplitError::ChecksumOffsetMismatch {
            start: 20,
            offset: 16
        }
    );
    {
        // An IHL beyond a short packet.
        let mut r = good[..10 + 40].to_vec();
        r[10] = 0x4f;
        r[12..14].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(
            split_all(&r, 0).unwrap_err(),
            SplitError::BadIpv4HeaderLength(60)
        );
    }
    assert_eq!(
        with(&good, &|r| r.push(0)),
        SplitError::LengthMismatch {
            said: len,
            read: len + 1
        }
    );
    assert_eq!(
        with(&good6, &|r| {
            r.pop();
        }),
        SplitError::LengthMismatch {
            said: good6.len() - 10,
            read: good6.len() - 11
        }
    );
    assert_eq!(with(&good, &|r| r[16] |= 0x20), SplitError::Fragment);
    assert_eq!(with(&good, &|r| r[17] = 1), SplitError::Fragment);
    assert_eq!(
        with(&good, &|r| r[19] = 17),
        SplitError::ProtocolMismatch(17)
    );
    assert_eq!(
        with(&good6, &|r| r[16] = 0),
        SplitError::ProtocolMismatch(0)
    );
    assert_eq!(
        with(&good, &|r| {
            r.truncate(10 + 30);
            r[12..14].copy_from_slice(&30u16.to_be_bytes());
        }),
        SplitError::TruncatedTransport
    );
    assert_eq!(
        with(&good, &|r| r[10 + 32] = 0x40),
        SplitError::BadTcpHeaderLength(16)
    );
    {
        let mut r = good[..10 + 44].to_vec();
        r[12..14].copy_from_slice(&44u16.to_be_bytes());
        r[10 + 32] = 0xf0;
        assert_eq!(
            split_all(&r, 0).unwrap_err(),
            SplitError::BadTcpHeaderLength(60)
        );
    }
    assert_eq!(
        with(&good, &|r| r[6] = 24),
        SplitError::ChecksumOffsetMismatch {
            start: 24,
            offset: 16
        }
    );
    assert_eq!(
        with(&good, &|r| r[8] = 6),
        SplitError::ChecksumOffsetMismatch {
            start: 20,
            offset: 6
        }
    );
    // A UDP super-packet whose UDP header is cut off.
    let uso = uso_read(false, 1, &pattern(2400, 1), 1200);
    assert_eq!(
        with(&uso, &|r| {
            r.truncate(10 + 24);
            r[12..14].copy_from_slice(&24u16.to_be_bytes());
        }),
        SplitError::TruncatedTransport
    );
    // A single packet whose checksum would lie beyond it.
    let single = partial(udp_packet(false, 1, b"hi"), 20, 6, GSO_NONE, 0, 17);
    assert_eq!(
        with(&single, &|r| r[8] = 9),
        SplitError::ChecksumOutOfBounds {
            start: 20,
            offset: 9,
            len: 30
        }
    );
    // Room: too few buffers, a buffer too small.
    let mut bufs = vec![vec![0u8; 2048]; 2];
    let mut sizes = [0; 2];
    assert_eq!(
        split(&good, &mut bufs, 0, &mut sizes),
        Err(SplitError::TooManySegments { needed: 3, room: 2 })
    );
    assert_eq!(
        split(&good, &mut bufs[..], 0, &mut sizes[..0]),
        Err(SplitError::TooManySegments { needed: 3, room: 0 })
    );
    let mut small = vec![vec![0u8; 1000]; 4];
    let mut sizes = [0; 4];
    assert_eq!(
        split(&good, &mut small, 0, &mut sizes),
        Err(SplitError::BufferTooSmall {
            needed: 1500,
            room: 1000
        })
    );
    assert_eq!(
        split(&single, &mut small, 990, &mut sizes),
        Err(SplitError::BufferTooSmall {
            needed: 1020,
            room: 1000
        })
    );
    // Every reason has a counter name.
    assert_eq!(SplitError::Fragment.as_str(), "ipv4_fragment");
}

// ---- coalesce ----

/// The header of write `w`.
fn hdr(w: &[u8]) -> VirtioNetHdr {
    VirtioNetHdr::decode(w).unwrap()
}

fn segments(t: &Tcp, payload: &[u8], mss: usize) -> Vec<Vec<u8>> {
    split_all(&tso_read(t, payload, mss as u16), 0).unwrap()
}

#[test]
fn segments_of_a_super_packet_coalesce_back_into_it() {
    for v6 in [false, true] {
        for flags in [TCP_ACK, TCP_ACK | PSH, TCP_ACK | CWR | PSH | FIN] {
            let t = Tcp {
                v6,
                flags,
                ..Tcp::default()
            };
            let payload = pattern(10_000, 9);
            let segs = segments(&t, &payload, 1448);
            let mut c = Coalescer::new(64, 1 << 17);
            assert_eq!(c.coalesce(&segs), segs.len());
            assert_eq!(c.len(), 1);
            let w = c.write(0);
            let h = hdr(w);
            assert_eq!(h.gso(), Ok(if v6 { Gso::TcpV6 } else { Gso::TcpV4 }));
            assert_eq!(h.ecn(), flags & CWR != 0);
            assert!(h.needs_csum());
            let ip = if v6 { 40 } else { 20 };
            assert_eq!(
                (h.gso_size, h.hdr_len, h.csum_start, h.csum_offset),
                (1448, ip + 32, ip, 16)
            );
            // Completed the way a device would, it is the original packet, byte for byte.
            let whole = complete_as_a_device(w);
            assert_eq!(whole, tcp_packet(&t, &payload));
            assert!(checksums_ok(&whole));
            // And it splits again into the same segments.
            assert_eq!(split_all(w, 0).unwrap(), segs);
        }
    }
    let s = Coalescer::new(64, 0).stats();
    assert_eq!(s, CoalesceStats::default());
}

fn plain(w: &[u8]) -> &[u8] {
    assert_eq!(hdr(w), VirtioNetHdr::NONE, "a plain write");
    &w[10..]
}

/// Coalesces `packets` and returns the writes' segment counts (1: plain, as it was).
fn shape(packets: &[Vec<u8>]) -> Vec<usize> {
    let mut c = Coalescer::new(64, 1 << 17);
    assert_eq!(c.coalesce(packets), packets.len());
    let mut counts = Vec::new();
    let mut from = 0;
    for w in c.writes() {
        let n = if hdr(w).gso_type == GSO_NONE {
            assert_eq!(plain(w), &packets[from][..]);
            1
        } else {
            split_all(w, 0).unwrap().len()
        };
        counts.push(n);
        from += n;
    }
    counts
}

#[test]
fn merges_only_what_linux_gro_would() {
    let t = Tcp::default();
    let segs = segments(&t, &pattern(1448 * 4, 2), 1448);
    let edit = |i: usize, f: &dyn Fn(&mut Vec<u8>)| {
        let mut s = segs.clone();
        f(&mut s[i]);
        s
    };
    assert_eq!(shape(&segs), vec![4]);
    // A sequence gap.
    let gap = {
        let mut s = segs.clone();
        s.remove(2);
        s
    };
    assert_eq!(shape(&gap), vec![2, 1]);
    // From the third segment on, one header field differs: the group ends there and the
    // rest starts a new one.
    let retcp = |f: &dyn Fn(&mut Tcp)| {
        let mut s = segs.clone();
        for i in 2..4 {
            let mut tt = Tcp {
                seq: t.seq + (i * 1448) as u32,
                ip_id: t.ip_id + i as u16,
                ..t.clone()
            };
            f(&mut tt);
            s[i] = tcp_packet(&tt, &segs[i][52..]);
        }
        shape(&s)
    };
    assert_eq!(retcp(&|_| {}), vec![4], "rebuilt alike still merges");
    assert_eq!(retcp(&|t| t.ack += 1), vec![2, 2]);
    assert_eq!(retcp(&|t| t.window += 1), vec![2, 2]);
    assert_eq!(retcp(&|t| t.options[11] ^= 1), vec![2, 2]);
    assert_eq!(retcp(&|t| t.options = vec![]), vec![2, 2]);
    assert_eq!(retcp(&|t| t.flags |= 0x40), vec![2, 2], "ECE differs");
    assert_eq!(retcp(&|t| t.ip_id += 1), vec![2, 2]);
    assert_eq!(retcp(&|t| t.df = false), vec![2, 2]);
    assert_eq!(retcp(&|t| t.ttl = 63), vec![2, 2]);
    // CWR may start a group but never join one.
    assert_eq!(retcp(&|t| t.flags |= CWR), vec![2, 1, 1]);
    // These are never merged at all.
    assert_eq!(retcp(&|t| t.flags |= 0x02), vec![2, 1, 1], "SYN");
    assert_eq!(retcp(&|t| t.flags |= 0x04), vec![2, 1, 1], "RST");
    assert_eq!(retcp(&|t| t.flags |= 0x20), vec![2, 1, 1], "URG");
    // PSH or FIN ends a group after joining it.
    assert_eq!(retcp(&|t| t.flags |= PSH), vec![3, 1]);
    assert_eq!(retcp(&|t| t.flags |= FIN), vec![3, 1]);
    // The IPv4 ID must go up by one (the third segment's repeats the second's).
    let mut s = segs.clone();
    s[2] = tcp_packet(
        &Tcp {
            seq: t.seq + 2 * 1448,
            ip_id: t.ip_id + 1,
            ..t.clone()
        },
        &segs[2][52..],
    );
    assert_eq!(shape(&s), vec![2, 1, 1]);
    // With DF, a fixed ID is as good as an incrementing one (Linux GRO's atomic
    // datagrams); without DF it is not.
    for (df, want) in [(true, vec![4]), (false, vec![1, 1, 1, 1])] {
        let fixed: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                let tt = Tcp {
                    seq: t.seq + (i * 1448) as u32,
                    df,
                    ..t.clone()
                };
                tcp_packet(&tt, &segs[i][52..])
            })
            .collect();
        assert_eq!(shape(&fixed), want, "fixed IDs, DF {df}");
    }
    let mut s = segs.clone();
    for (i, p) in s.iter_mut().enumerate().take(2) {
        let tt = Tcp {
            seq: t.seq + (i * 1448) as u32,
            ..t.clone()
        };
        *p = tcp_packet(&tt, &segs[i][52..]);
    }
    assert_eq!(
        shape(&s),
        vec![2, 2],
        "fixed, then incrementing, is two groups"
    );
    // A bad TCP or IPv4 header checksum is written as it is, for the kernel to count.
    assert_eq!(shape(&edit(2, &|p| p[60] ^= 1)), vec![2, 1, 1]);
    assert_eq!(shape(&edit(2, &|p| p[10] ^= 1)), vec![2, 1, 1]);
    // IPv4 options (IHL 6): never merged.
    let mut opt = segs[2].clone();
    opt.splice(20..20, [1, 1, 1, 0]);
    opt[0] = 0x46;
    let len = opt.len() as u16;
    opt[2..4].copy_from_slice(&len.to_be_bytes());
    let mut s = segs.clone();
    s[2] = opt;
    assert_eq!(shape(&s), vec![2, 1, 1]);
}

#[test]
fn segment_sizes_must_match_with_a_shorter_last() {
    let t = Tcp::default();
    let at = |seq_off: usize, n: usize| {
        tcp_packet(
            &Tcp {
                seq: t.seq + seq_off as u32,
                ip_id: t.ip_id + (seq_off / 100) as u16,
                ..t.clone()
            },
            &pattern(n, 4),
        )
    };
    // 1000, 1000, 500 | 1000: the short one ends the group.
    let p = vec![at(0, 1000), at(1000, 1000), at(2000, 500), at(2500, 1000)];
    let mut with_ids = p.clone();
    for (i, q) in with_ids.iter_mut().enumerate() {
        *q = {
            let seq = seq_of(q);
            let payload = q[52..].to_vec();
            tcp_packet(
                &Tcp {
                    seq,
                    ip_id: t.ip_id + i as u16,
                    ..t.clone()
                },
                &payload,
            )
        };
    }
    assert_eq!(shape(&with_ids), vec![3, 1]);
    // 500 then 1000: a larger segment after a smaller one starts anew.
    let q = vec![
        tcp_packet(&t, &pattern(500, 1)),
        tcp_packet(
            &Tcp {
                seq: t.seq + 500,
                ip_id: t.ip_id + 1,
                ..t.clone()
            },
            &pattern(1000, 1),
        ),
    ];
    assert_eq!(shape(&q), vec![1, 1]);
    // Pure ACKs are never merged, and they end their flow's group (no reordering).
    let ack = tcp_packet(
        &Tcp {
            seq: t.seq + 2000,
            ip_id: t.ip_id + 2,
            ..t.clone()
        },
        &[],
    );
    let r = vec![with_ids[0].clone(), with_ids[1].clone(), ack.clone(), ack];
    assert_eq!(shape(&r), vec![2, 1, 1]);
}

#[test]
fn interleaved_flows_keep_their_own_order() {
    let a = Tcp::default();
    let b = Tcp {
        src_port: 40_001,
        seq: 5,
        ..Tcp::default()
    };
    let sa = segments(&a, &pattern(1448 * 3, 1), 1448);
    let sb = segments(&b, &pattern(1448 * 3, 2), 1448);
    let udp = udp_packet(false, 1, b"dns?");
    let batch = vec![
        sa[0].clone(),
        sb[0].clone(),
        udp.clone(),
        sa[1].clone(),
        sb[1].clone(),
        sa[2].clone(),
        sb[2].clone(),
    ];
    let mut c = Coalescer::new(64, 0);
    assert_eq!(c.coalesce(&batch), 7);
    let w: Vec<&[u8]> = c.writes().collect();
    assert_eq!(w.len(), 3);
    assert_eq!(split_all(w[0], 0).unwrap(), sa);
    assert_eq!(split_all(w[1], 0).unwrap(), sb);
    assert_eq!(plain(w[2]), &udp[..]);
    let s = c.stats();
    assert_eq!(
        (s.packets, s.writes, s.super_packets, s.merged),
        (7, 3, 2, 4)
    );
}

#[test]
fn bounds_a_super_packet_at_64k_and_a_batch_at_its_arena() {
    let t = Tcp::default();
    // 60 segments of 1448 bytes, from two super-packets: 86,880 bytes do not fit one IP
    // packet.
    let mut segs = segments(&t, &pattern(1448 * 30, 3), 1448);
    let t2 = Tcp {
        seq: t.seq + 1448 * 30,
        ip_id: t.ip_id + 30,
        ..t.clone()
    };
    segs.extend(segments(&t2, &pattern(1448 * 30, 3), 1448));
    let mut c = Coalescer::new(128, 1 << 18);
    assert_eq!(c.coalesce(&segs), 60);
    let sizes: Vec<usize> = c.writes().map(|w| w.len() - 10).collect();
    assert!(sizes.iter().all(|s| *s <= MAX_PACKET), "{sizes:?}");
    assert_eq!(sizes.len(), 2);
    let again: Vec<Vec<u8>> = c.writes().flat_map(|w| split_all(w, 0).unwrap()).collect();
    assert_eq!(again, segs);
    // A small arena takes what fits and says so; the rest follows in the next call.
    let mut c = Coalescer::new(128, 0);
    let took = c.coalesce(&segs);
    assert!(took < 60 && took > 40, "took {took}");
    let mut c2 = Coalescer::new(128, 0);
    assert_eq!(c2.coalesce(&segs[took..]), 60 - took);
    // So does max_packets.
    let mut c = Coalescer::new(8, 1 << 18);
    assert_eq!(c.coalesce(&segs), 8);
    assert_eq!(c.len(), 1);
    // Longer than any IP packet: dropped and counted.
    let huge = vec![0x45u8; MAX_PACKET + 1];
    let mut c = Coalescer::new(8, 0);
    assert_eq!(c.coalesce(&[huge, segs[0].clone()]), 2);
    assert_eq!(c.len(), 1);
    assert_eq!(c.stats().dropped_too_long, 1);
    // Garbage goes as it is.
    let mut c = Coalescer::new(8, 0);
    assert_eq!(c.coalesce(&[vec![], vec![0x45], vec![0x60; 41]]), 3);
    assert_eq!(c.len(), 3);
    assert!(c.writes().all(|w| hdr(w) == VirtioNetHdr::NONE));
}

// ---- split → coalesce → split, on random streams ----

/// Splits every read and coalesces all the segments in one batch; the writes split again
/// must give the same segments, each flow in its own order.
fn round_trip(reads: &[Vec<u8>]) {
    let segs: Vec<Vec<u8>> = reads
        .iter()
        .flat_map(|r| split_all(r, 0).unwrap())
        .collect();
    let mut c = Coalescer::new(256, 1 << 20);
    assert_eq!(c.coalesce(&segs), segs.len());
    let again: Vec<Vec<u8>> = c.writes().flat_map(|w| split_all(w, 0).unwrap()).collect();
    for w in c.writes() {
        assert!(checksums_ok(&complete_as_a_device(w)));
        assert!(w.len() - 10 <= MAX_PACKET);
    }
    let port = |p: &Vec<u8>| p[tcp_at(p)..tcp_at(p) + 2].to_vec();
    for flow in [40_000u16, 40_001] {
        let of = |v: &[Vec<u8>]| -> Vec<Vec<u8>> {
            v.iter()
                .filter(|p| port(p) == flow.to_be_bytes())
                .cloned()
                .collect()
        };
        assert_eq!(of(&again), of(&segs));
    }
    assert_eq!(again.len(), segs.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn split_then_coalesce_round_trips(
        v6 in any::<bool>(),
        mss in 536usize..1448,
        lens in proptest::collection::vec((1usize..20_000, any::<bool>(), any::<u8>()), 1..6),
        seq in any::<u32>(),
        id in any::<u16>(),
    ) {
        let mut next = [(seq, id), (seq ^ 0x5555, id ^ 0x5555)];
        let mut reads = Vec::new();
        for (len, second, fl) in lens {
            let f = usize::from(second);
            let flags = TCP_ACK | (fl & (PSH | CWR));
            let t = Tcp {
                v6,
                src_port: 40_000 + f as u16,
                seq: next[f].0,
                ip_id: next[f].1,
                flags,
                ..Tcp::default()
            };
            let payload = pattern(len, fl);
            next[f].0 = next[f].0.wrapping_add(len as u32);
            next[f].1 = next[f].1.wrapping_add(len.div_ceil(mss) as u16);
            reads.push(tso_read(&t, &payload, mss as u16));
        }
        round_trip(&reads);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever a read holds, split answers with packets or an error, never a panic; and
    /// whatever packets come, the coalescer writes each exactly once (and what it merged splits
    /// back into them).
    #[test]
    fn arbitrary_bytes_never_panic(
        base in 0usize..4,
        edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..8),
        cut in any::<u16>(),
        offset in 0usize..64,
    ) {
        let t = Tcp { v6: base % 2 == 1, ..Tcp::default() };
        let mut read = match base {
            0 | 1 => tso_read(&t, &pattern(4000, 1), 1000),
            2 => uso_read(false, 1, &pattern(3000, 1), 700),
            _ => partial(tcp_packet(&t, b"x"), 20, 16, GSO_NONE, 0, 6),
        };
        for (at, v) in edits {
            let at = usize::from(at) % read.len();
            read[at] = v;
        }
        read.truncate(usize::from(cut).max(1));
        let mut bufs = vec![vec![0u8; 1600]; 8];
        let mut sizes = [0usize; 8];
        if let Ok(n) = split(&read, &mut bufs, offset, &mut sizes) {
            let packets: Vec<&[u8]> = (0..n).map(|i| &bufs[i][offset..offset + sizes[i]]).collect();
            let mut c = Coalescer::new(8, 0);
            prop_assert_eq!(c.coalesce(&packets), n);
            let again: Vec<Vec<u8>> = c.writes().flat_map(|w| split_all(w, 0).unwrap()).collect();
            let packets: Vec<Vec<u8>> = packets.iter().map(|p| p.to_vec()).collect();
            prop_assert_eq!(again, packets);
        }
        let mut c = Coalescer::new(8, 0);
        prop_assert_eq!(c.coalesce(&[&read[..], &read[VNET_HDR_LEN.min(read.len())..]]), 2);
    }
}

#[test]
fn ipv4_options_ride_along_on_every_segment() {
    // A super-packet whose IPv4 header carries 4 bytes of options (IHL 6): split copies
    // them into every segment (the coalescer, like Linux GRO, would not merge these back).
    let mut read = tso_read(&Tcp::default(), &pattern(3000, 8), 1000);
    read.splice(30..30, [0x94, 0x04, 0, 0]); // Router Alert
    read[10] = 0x46;
    let len = (read.len() - 10) as u16;
    read[12..14].copy_from_slice(&len.to_be_bytes());
    read[6] = 24; // csum_start: the TCP header moved
    let segs = split_all(&read, 0).unwrap();
    assert_eq!(segs.len(), 3);
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(&s[20..24], &[0x94, 0x04, 0, 0]);
        assert!(checksums_ok(s), "segment {i}");
        assert_eq!(&s[24 + 32..], &pattern(3000, 8)[i * 1000..(i + 1) * 1000]);
    }
    assert_eq!(shape(&segs), vec![1, 1, 1]);
}

#[test]
fn ipv6_flow_label_and_hop_limit_must_match() {
    let t = Tcp {
        v6: true,
        ..Tcp::default()
    };
    let segs = segments(&t, &pattern(1448 * 4, 6), 1448);
    assert_eq!(shape(&segs), vec![4]);
    for byte in [3, 7] {
        // Neither the flow label (byte 3) nor the hop limit (7) is under any checksum.
        let mut s = segs.clone();
        s[2][byte] ^= 1;
        s[3][byte] ^= 1;
        assert_eq!(shape(&s), vec![2, 2], "byte {byte}");
    }
}
