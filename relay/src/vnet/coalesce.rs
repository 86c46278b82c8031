//! Coalesce: a batch of plain IP packets into as few TUN writes as possible, TCP segments
//! of one flow merged into super-packets the way Linux GRO merges them
//! (`tcp_gro_receive`, `inet_gro_receive`, `ipv6_gro_receive`).

use std::ops::Range;

use super::checksum::{fold, pseudo_header, sum};
use super::hdr::{VirtioNetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, TCP_CSUM_OFFSET};
use super::split::{be16, put16};
use super::{IPPROTO_TCP, TCP_CWR, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG};
use super::{MAX_PACKET, VNET_HDR_LEN};

/// Counters of a [`Coalescer`] since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Packets taken in (dropped ones included).
    pub packets: u64,
    /// TUN writes produced.
    pub writes: u64,
    /// Writes that are super-packets (two segments or more).
    pub super_packets: u64,
    /// Packets merged into an earlier one's write.
    pub merged: u64,
    /// Packets dropped because they are longer than any IP packet (65,535 bytes).
    pub dropped_too_long: u64,
}

/// Groups a batch of IP packets into TUN writes, each a [`VirtioNetHdr`] and a packet, in
/// an arena of its own allocated once: no allocation per batch or per packet.
///
/// Writes come out in the order of their first packet, and a flow's packets are never
/// reordered: a packet of a flow that cannot join that flow's open group closes it, and
/// what follows starts a new one.
#[derive(Debug)]
pub struct Coalescer {
    arena: Vec<u8>,
    writes: Vec<Range<usize>>,
    groups: Vec<Group>,
    /// The next member of a packet's group, by packet index (`u32::MAX`: none).
    next: Vec<u32>,
    max_packets: usize,
    stats: CoalesceStats,
}

#[derive(Debug, Clone, Copy)]
struct Group {
    first: u32,
    last: u32,
    count: u32,
    /// Length of the IP packet the group makes so far.
    len: usize,
    /// Flow identity, for a cheap first comparison (`None`: not TCP, joins nothing).
    flow: Option<u64>,
    /// Whether another segment may still join.
    open: bool,
    /// Set for a group started by a coalescing candidate.
    tcp: Option<Tcp>,
}

/// What a candidate segment's group needs to know of its tail.
#[derive(Debug, Clone, Copy)]
struct Tcp {
    v6: bool,
    ip: usize,
    headers: usize,
    /// Payload bytes of the first segment: every member's but the last's.
    seg: usize,
    next_seq: u32,
    /// The IPv4 ID the next member must have.
    next_id: u16,
    /// With DF set, Linux GRO also takes a fixed ID (RFC 6864: an atomic datagram's ID
    /// means nothing), decided by the second member; the IDs then stay the head's.
    fixed_id: bool,
}

impl Coalescer {
    /// A coalescer for batches of up to `max_packets` packets whose writes fit in
    /// `arena_bytes` (raised to at least one largest super-packet and its header).
    /// A batch needs at most the sum of its packets' lengths plus 10 bytes per packet.
    pub fn new(max_packets: usize, arena_bytes: usize) -> Coalescer {
        let max_packets = max_packets.max(1);
        Coalescer {
            arena: vec![0; arena_bytes.max(VNET_HDR_LEN + MAX_PACKET)],
            writes: Vec::with_capacity(max_packets),
            groups: Vec::with_capacity(max_packets),
            next: Vec::with_capacity(max_packets),
            max_packets,
            stats: CoalesceStats::default(),
        }
    }

    /// Plans and builds the writes for `packets`, replacing the previous batch's. Returns
    /// how many packets it took: all of them, unless `max_packets` or the arena ran out
    /// first, in which case the caller writes these and calls again with the rest.
    /// Packets longer than 65,535 bytes are dropped and counted.
    pub fn coalesce<P: AsRef<[u8]>>(&mut self, packets: &[P]) -> usize {
        self.writes.clear();
        self.groups.clear();
        self.next.clear();
        let mut used = 0;
        let mut taken = 0;
        for (i, p) in packets.iter().take(self.max_packets).enumerate() {
            let p = p.as_ref();
            self.next.push(u32::MAX);
            if p.len() > MAX_PACKET {
                self.stats.dropped_too_long += 1;
                taken = i + 1;
                continue;
            }
            let seg = Segment::parse(p);
            let flow = flow_of(p);
            let open = flow.and_then(|f| {
                self.groups.iter().rposition(|g| {
                    g.open && g.flow == Some(f) && same_flow(packets[g.first as usize].as_ref(), p)
                })
            });
            if let (Some(s), Some(gi)) = (&seg, open) {
                let g = &self.groups[gi];
                if used + s.payload <= self.arena.len()
                    && can_join(g, packets[g.first as usize].as_ref(), p, s)
                {
                    used += s.payload;
                    let g = &mut self.groups[gi];
                    self.next[g.last as usize] = i as u32;
                    g.last = i as u32;
                    g.count += 1;
                    g.len += s.payload;
                    // `can_join` only admits a candidate to a group started by one.
                    if let Some(t) = g.tcp.as_mut() {
                        t.next_seq = s.seq.wrapping_add(s.payload as u32);
                        t.fixed_id = s.id != t.next_id;
                        if !t.fixed_id {
                            t.next_id = s.id.wrapping_add(1);
                        }
                        g.open = s.payload == t.seg
                            && s.flags & (TCP_PSH | TCP_FIN) == 0
                            && g.len + t.seg <= MAX_PACKET;
                    }
                    self.stats.merged += 1;
                    taken = i + 1;
                    continue;
                }
            }
            if used + VNET_HDR_LEN + p.len() > self.arena.len() {
                self.next.pop();
                break;
            }
            used += VNET_HDR_LEN + p.len();
            if let Some(gi) = open {
                self.groups[gi].open = false;
            }
            let tcp = seg.as_ref().map(|s| Tcp {
                v6: s.v6,
                ip: s.ip,
                headers: s.headers,
                seg: s.payload,
                next_seq: s.seq.wrapping_add(s.payload as u32),
                next_id: s.id.wrapping_add(1),
                fixed_id: false,
            });
            self.groups.push(Group {
                first: i as u32,
                last: i as u32,
                count: 1,
                len: p.len(),
                flow,
                open: seg.as_ref().is_some_and(|s| {
                    s.flags & (TCP_PSH | TCP_FIN) == 0 && p.len() + s.payload <= MAX_PACKET
                }),
                tcp,
            });
            taken = i + 1;
        }
        self.build(packets);
        self.stats.packets += taken as u64;
        self.stats.writes += self.writes.len() as u64;
        taken
    }

    fn build<P: AsRef<[u8]>>(&mut self, packets: &[P]) {
        let mut at = 0;
        for g in &self.groups {
            let start = at;
            let first = packets[g.first as usize].as_ref();
            let (hdr, out) = self.arena[at..at + VNET_HDR_LEN + g.len].split_at_mut(VNET_HDR_LEN);
            match (g.count, g.tcp) {
                (2.., Some(t)) => {
                    out[..t.headers].copy_from_slice(&first[..t.headers]);
                    let mut w = t.headers;
                    let mut i = g.first;
                    let mut last_flags = 0;
                    while i != u32::MAX {
                        let p = packets[i as usize].as_ref();
                        let payload = &p[t.headers..];
                        out[w..w + payload.len()].copy_from_slice(payload);
                        w += payload.len();
                        last_flags = p[t.ip + 13];
                        i = self.next[i as usize];
                    }
                    let cwr = first[t.ip + 13] & TCP_CWR != 0;
                    finish_super_packet(out, &t, last_flags);
                    VirtioNetHdr {
                        flags: F_NEEDS_CSUM,
                        gso_type: if t.v6 { GSO_TCPV6 } else { GSO_TCPV4 }
                            | if cwr { GSO_ECN } else { 0 },
                        hdr_len: t.headers as u16,
                        gso_size: t.seg as u16,
                        csum_start: t.ip as u16,
                        csum_offset: TCP_CSUM_OFFSET,
                    }
                    .encode(hdr.try_into().expect("split_at_mut gave 10 bytes"));
                    self.stats.super_packets += 1;
                }
                _ => {
                    out.copy_from_slice(first);
                    hdr.fill(0);
                }
            }
            at += VNET_HDR_LEN + g.len;
            self.writes.push(start..at);
        }
    }

    /// How many writes the last batch made.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether the last batch made no writes.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Write `i` of the last batch: a [`VirtioNetHdr`] and its packet, for one `write(2)`
    /// to the TUN. It lives in the coalescer's arena until the next [`Coalescer::coalesce`].
    pub fn write(&self, i: usize) -> &[u8] {
        &self.arena[self.writes[i].clone()]
    }

    /// The last batch's writes, in order.
    pub fn writes(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.writes.iter().map(|r| &self.arena[r.clone()])
    }

    /// Counters since the coalescer was made.
    pub fn stats(&self) -> CoalesceStats {
        self.stats
    }
}

/// Fixes the headers of a merged packet (`out`: the whole IP packet): lengths, the IPv4
/// header checksum, FIN/PSH of the last segment, and in the TCP checksum field the
/// pseudo-header sum (folded, not complemented) that `NEEDS_CSUM` asks the kernel to
/// complete, as Linux's own `__tcp_v4_send_check`/`tcp_v6_gso_csum_prep` leave it.
fn finish_super_packet(out: &mut [u8], t: &Tcp, last_flags: u8) {
    let len = out.len();
    if t.v6 {
        put16(out, 4, (len - t.ip) as u16);
    } else {
        put16(out, 2, len as u16);
        put16(out, 10, 0);
        let ck = !fold(sum(&out[..t.ip], 0));
        put16(out, 10, ck);
    }
    out[t.ip + 13] |= last_flags & (TCP_FIN | TCP_PSH);
    let pseudo = fold(pseudo_header(out, t.v6, IPPROTO_TCP, len - t.ip));
    put16(out, t.ip + usize::from(TCP_CSUM_OFFSET), pseudo);
}

/// A TCP segment that may be merged with others: data, no SYN/RST/URG, IPv4 without
/// options or fragmentation (Linux GRO's `0x45` rule) or IPv6 without extension headers,
/// lengths that add up and checksums that verify (a merged packet's checksum is computed
/// afresh, so a bad one must not be hidden inside it).
#[derive(Debug, Clone, Copy)]
struct Segment {
    v6: bool,
    ip: usize,
    headers: usize,
    payload: usize,
    seq: u32,
    flags: u8,
    id: u16,
}

impl Segment {
    fn parse(p: &[u8]) -> Option<Segment> {
        let (v6, ip, id) = match p.first()? >> 4 {
            4 if p.len() >= 20
                && p[0] == 0x45
                && usize::from(be16(p, 2)) == p.len()
                && be16(p, 6) & 0x3fff == 0
                && p[9] == IPPROTO_TCP
                && fold(sum(&p[..20], 0)) == 0xffff =>
            {
                (false, 20, be16(p, 4))
            }
            6 if p.len() >= 40
                && 40 + usize::from(be16(p, 4)) == p.len()
                && p[6] == IPPROTO_TCP =>
            {
                (true, 40, 0)
            }
            _ => return None,
        };
        let t = p.get(ip..ip + 20)?;
        let doff = usize::from(t[12] >> 4) * 4;
        let flags = t[13];
        if doff < 20 || ip + doff >= p.len() || flags & (TCP_SYN | TCP_RST | TCP_URG) != 0 {
            return None;
        }
        if fold(sum(
            &p[ip..],
            pseudo_header(p, v6, IPPROTO_TCP, p.len() - ip),
        )) != 0xffff
        {
            return None;
        }
        Some(Segment {
            v6,
            ip,
            headers: ip + doff,
            payload: p.len() - ip - doff,
            seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
            flags,
            id,
        })
    }
}

/// A TCP packet's flow identity, cheap to compare: a sum over its addresses and ports.
fn flow_of(p: &[u8]) -> Option<u64> {
    let (addrs, ports) = match p.first()? >> 4 {
        4 if p.len() >= 20 && p[9] == IPPROTO_TCP => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            (p.get(12..20)?, p.get(ihl..ihl + 4)?)
        }
        6 if p.len() >= 40 && p[6] == IPPROTO_TCP => (&p[8..40], p.get(40..44)?),
        _ => return None,
    };
    Some(
        sum(addrs, 0)
            ^ u64::from(u32::from_be_bytes([ports[0], ports[1], ports[2], ports[3]])) << 20,
    )
}

fn addrs(p: &[u8]) -> &[u8] {
    if p[0] >> 4 == 6 {
        &p[8..40]
    } else {
        &p[12..20]
    }
}

/// Whether two TCP packets (both with a [`flow_of`]) have the same addresses and ports.
fn same_flow(a: &[u8], b: &[u8]) -> bool {
    if a[0] >> 4 != b[0] >> 4 {
        return false;
    }
    let ports = |p: &[u8]| {
        let l4 = if p[0] >> 4 == 6 {
            40
        } else {
            usize::from(p[0] & 0x0f) * 4
        };
        [p[l4], p[l4 + 1], p[l4 + 2], p[l4 + 3]]
    };
    addrs(a) == addrs(b) && ports(a) == ports(b)
}

/// Whether segment `s` (packet `p`) continues group `g` (first packet `first`), by Linux
/// GRO's rules: the next sequence number, the same ACK number, window, header length,
/// options and flags (CWR only on the first, which `p` is not), at most the group's segment
/// size, IPv4 TOS, TTL and DF alike with the ID one more (or, with DF, the same throughout),
/// IPv6 version/class/flow label
/// and hop limit alike, and the result no longer than an IP packet.
fn can_join(g: &Group, first: &[u8], p: &[u8], s: &Segment) -> bool {
    let Some(t) = g.tcp else { return false };
    if s.v6 != t.v6
        || s.headers != t.headers
        || s.seq != t.next_seq
        || s.payload > t.seg
        || g.len + s.payload > MAX_PACKET
        || s.flags & TCP_CWR != 0
    {
        return false;
    }
    let ip_alike = if t.v6 {
        first[..4] == p[..4] && first[7] == p[7]
    } else {
        let df = first[6] & 0x40 != 0;
        let id_ok = if g.count == 1 {
            s.id == t.next_id || (df && s.id == t.next_id.wrapping_sub(1))
        } else if t.fixed_id {
            s.id == t.next_id.wrapping_sub(1)
        } else {
            s.id == t.next_id
        };
        first[1] == p[1] && first[8] == p[8] && first[6..8] == p[6..8] && id_ok
    };
    let (a, b) = (&first[t.ip..t.headers], &p[t.ip..t.headers]);
    let ignore = TCP_CWR | TCP_PSH | TCP_FIN;
    ip_alike
        && a[8..13] == b[8..13]
        && (a[13] ^ b[13]) & !ignore == 0
        && a[14..16] == b[14..16]
        && a[20..] == b[20..]
}
