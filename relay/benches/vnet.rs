//! TUN offload micro-benches: splitting a 64 KiB TCP super-packet (as the kernel hands it
//! over) into 45 MSS-sized segments, and coalescing those 45 back into one write.
//!
//! `cargo bench -p wraithgate-relay --bench vnet` (on a quiet machine); `RB_QUICK=1` for a
//! short run, `cargo test --benches` runs each once.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wraithgate_relay::vnet::{
    split, Coalescer, VirtioNetHdr, F_NEEDS_CSUM, GSO_TCPV4, TCP_CSUM_OFFSET, VNET_HDR_LEN,
};

const MSS: usize = 1448;
const SEGMENTS: usize = 45;
/// IPv4 (20) + TCP with timestamps (32).
const HEADERS: usize = 52;

fn config() -> Criterion {
    let c = Criterion::default();
    if std::env::var_os("RB_QUICK").is_some() {
        c.warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(800))
            .sample_size(20)
    } else {
        c
    }
}

/// A TCP/IPv4 super-packet of 45 × 1448 payload bytes (65,212 bytes of IP packet) behind
/// the header a TUN with TSO gives it. Split recomputes every checksum, so the TCP
/// checksum field's content does not matter here.
fn super_packet() -> Vec<u8> {
    let len = HEADERS + MSS * SEGMENTS;
    let mut read = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: HEADERS as u16,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: TCP_CSUM_OFFSET,
    }
    .to_bytes()
    .to_vec();
    read.extend_from_slice(&[0x45, 0]);
    read.extend_from_slice(&(len as u16).to_be_bytes());
    read.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    read.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 1, 0, 0, 0, 0, 77]);
    read.extend_from_slice(&[0x80, 0x10, 0x01, 0xf4, 0, 0, 0, 0]);
    read.extend_from_slice(&[1, 1, 8, 10, 0, 0, 1, 2, 0, 0, 3, 4]);
    read.extend((0..MSS * SEGMENTS).map(|i| (i * 31) as u8));
    assert_eq!(read.len(), VNET_HDR_LEN + len);
    read
}

fn vnet(c: &mut Criterion) {
    let read = super_packet();
    let mut bufs = vec![vec![0u8; 2048]; 64];
    let mut sizes = [0usize; 64];
    let n = split(&read, &mut bufs, 16, &mut sizes).expect("a well-formed super-packet");
    assert_eq!(n, SEGMENTS);

    let mut g = c.benchmark_group("vnet");
    g.throughput(Throughput::Bytes((MSS * SEGMENTS) as u64));
    g.bench_function("split_64k_tcp4", |b| {
        b.iter(|| split(black_box(&read), &mut bufs, 16, &mut sizes).unwrap())
    });

    let segments: Vec<Vec<u8>> = (0..n)
        .map(|i| bufs[i][16..16 + sizes[i]].to_vec())
        .collect();
    let mut coalescer = Coalescer::new(64, 1 << 17);
    assert_eq!(coalescer.coalesce(&segments), SEGMENTS);
    assert_eq!(coalescer.len(), 1, "the segments merge into one write");
    g.bench_function("coalesce_45_segments_tcp4", |b| {
        b.iter(|| coalescer.coalesce(black_box(&segments)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = vnet
}
criterion_main!(benches);
