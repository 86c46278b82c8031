// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
//
// WraithGate DoubleHop fast path: tc ingress (clsact/tcx) program that forwards the
// WireGuard *transport* messages of sessions userspace has offloaded, and hands everything
// else to the socket path untouched (TC_ACT_OK).
//
// Userspace is the only one who decides: it writes `client_to_exit`, `exit_to_client` and
// `session_counters`; this program only reads the first two and adds to existing entries of
// the third. A packet matches only with the exact 4-tuple userspace wrote (and, client ->
// exit, a receiver index the exit assigned to that session), so a spoofed packet moves
// nothing and creates nothing.
//
// Build with tools/build-bpf (fixed flags, committed object, `--check` in CI). The map and
// struct layouts below are mirrored in fastpath/src/maps.rs; change both together.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2

// Capacities, mirrored in fastpath/src/maps.rs.
#define MAX_SESSIONS 65536
#define MAX_CLIENT_INDICES (4 * MAX_SESSIONS)
// UDP_MAX_SEGMENTS is 64 or 128 depending on the kernel; a train longer than this goes to
// userspace.
#define MAX_SEGMENTS 128

// WireGuard (whitepaper §5.4): the first byte is the type, the next three are zero;
// transport data (type 4) is >= 32 bytes (padding to 16 is not to be relied on; see below),
// with the receiver index at 4..8. The first word, read little-endian, is therefore exactly 4.
#define WG_TRANSPORT_WORD 4
#define WG_TRANSPORT_MIN 32

#define ETH_HLEN_ 14
#define IP_HLEN 20
#define UDP_HLEN 8
#define IP_OFF ETH_HLEN_
#define UDP_OFF (IP_OFF + IP_HLEN)
#define PAYLOAD_OFF (UDP_OFF + UDP_HLEN)
#define IP_CSUM_OFF (IP_OFF + 10)
#define IP_ADDRS_OFF (IP_OFF + 12)
#define UDP_CSUM_OFF (UDP_OFF + 6)

// Directions, the index into the counters' arrays.
#define DIR_CLIENT_TO_EXIT 0
#define DIR_EXIT_TO_CLIENT 1

// Why a packet was passed to the stack (or forwarded): one per-CPU counter each, read by
// userspace for diagnostics and tests. Mirrored as `Verdict` in fastpath/src/maps.rs.
enum verdict {
	V_FORWARDED = 0,
	V_NOT_IPV4, // not IPv4 (IPv6 included, for now), or not addressed to this host
	V_NOT_UDP, // another protocol, IP options, a fragment
	V_MALFORMED, // lengths disagree, bad IPv4 header checksum, truncated
	V_NOT_TRANSPORT, // not a WireGuard transport message (handshakes, cookie replies…)
	V_NO_ENTRY, // no offloaded session matches
	V_TRAIN_MIXED, // a GSO/GRO train whose segments differ in size, type or session
	V_NO_ROUTE, // the FIB has no usable route out (or forwarding is off)
	V_NO_COUNTERS, // userspace wrote no counters entry for the session
	V_MAX,
};

struct client_to_exit_key {
	__be32 client_addr;
	__be32 listen_addr;
	__be16 client_port;
	__be16 listen_port;
	// Bytes 4..8 of the message as they are on the wire (little-endian index).
	__u32 receiver_index;
};

struct exit_to_client_key {
	__be32 exit_addr;
	__be32 relay_addr; // the session's exit-facing address
	__be16 exit_port;
	__be16 relay_port;
};

// What to write into a matching packet: source and destination, as userspace would send it.
struct rewrite {
	__be32 src_addr;
	__be32 dst_addr;
	__be16 src_port;
	__be16 dst_port;
	__u32 session;
};

struct session_counters {
	__u64 packets[2];
	__u64 bytes[2]; // WireGuard message bytes (UDP payload), per direction
	__u64 last_seen_ns; // bpf_ktime_get_ns(): CLOCK_MONOTONIC
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CLIENT_INDICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct client_to_exit_key);
	__type(value, struct rewrite);
} client_to_exit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SESSIONS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct exit_to_client_key);
	__type(value, struct rewrite);
} exit_to_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_SESSIONS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct session_counters);
} session_counters SEC(".maps");

// A train of small messages (64 of 64 bytes: 4 KiB) is copied here whole with one helper
// call, and its segments' heads are then read from memory: one bpf_skb_load_bytes per
// segment walks the packet's fragments each time, and cost more than nftables spends on
// the whole train. Per CPU: the program never runs twice at once on one CPU.
#define SCRATCH_BYTES 8192

struct scratch {
	__u8 bytes[SCRATCH_BYTES];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, V_MAX);
	__type(key, __u32);
	__type(value, __u64);
} verdicts SEC(".maps");

static __always_inline int count(__u32 verdict)
{
	__u64 *n = bpf_map_lookup_elem(&verdicts, &verdict);

	if (n)
		*n += 1;
	return TC_ACT_OK;
}

// The IPv4 header checksum (20 bytes, no options) is valid when the one's complement sum
// of its ten words is 0xffff. Nothing has checked it yet at tc ingress.
static __always_inline int ipv4_header_ok(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < IP_HLEN / 2; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum == 0xffff;
}

// A one's complement sum of up to 48 bits folded to 16.
static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

// The first 8 bytes of a WireGuard message: type word and receiver index.
struct wg_head {
	__u32 type;
	__u32 receiver_index;
};

struct udp_and_head {
	struct udphdr udp;
	struct wg_head wg;
};

SEC("classifier")
int doublehop(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->pkt_type != PACKET_HOST)
		return count(V_NOT_IPV4);

	// The headers are read straight from the packet when its linear part holds them (the
	// common case, small packets and GRO trains alike); a helper call copies them otherwise.
	struct iphdr ip;
	struct udp_and_head h;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int linear = data + PAYLOAD_OFF + sizeof(struct wg_head) <= data_end;
	if (linear) {
		__builtin_memcpy(&ip, data + IP_OFF, sizeof(ip));
		__builtin_memcpy(&h, data + UDP_OFF, sizeof(h));
	} else if (bpf_skb_load_bytes(skb, IP_OFF, &ip, sizeof(ip)) < 0) {
		return count(V_MALFORMED);
	}
	if (ip.version != 4 || ip.ihl != 5 || ip.protocol != IPPROTO_UDP ||
	    (ip.frag_off & bpf_htons(0x3fff)))
		return count(V_NOT_UDP);
	if (!linear && bpf_skb_load_bytes(skb, UDP_OFF, &h, sizeof(h)) < 0)
		return count(V_NOT_TRANSPORT); // shorter than any transport message

	__u32 tot_len = bpf_ntohs(ip.tot_len);
	if (tot_len < IP_HLEN + UDP_HLEN || skb->len != ETH_HLEN_ + tot_len ||
	    bpf_ntohs(h.udp.len) != tot_len - IP_HLEN || !ipv4_header_ok(&ip))
		return count(V_MALFORMED);
	__u32 payload_len = tot_len - IP_HLEN - UDP_HLEN;

	// A GSO/GRO train is forwarded only if it is whole segments of one size; each is
	// checked below. A short last segment (e.g. an initiation after data) fails here.
	__u32 seg_len = payload_len;
	__u32 segs = 1;
	if (skb->gso_size && payload_len > skb->gso_size) {
		seg_len = skb->gso_size;
		if (payload_len % seg_len)
			return count(V_TRAIN_MIXED);
		segs = payload_len / seg_len;
		if (segs > MAX_SEGMENTS || (skb->gso_segs && segs != skb->gso_segs))
			return count(V_TRAIN_MIXED);
	}
	// No multiple-of-16 rule: wireguard-go caps its padding at the tunnel MTU (a full
	// 1420-byte packet travels as a 1452-byte message) and boringtun does not pad at all;
	// userspace requires only the minimum too.
	if (h.wg.type != WG_TRANSPORT_WORD || seg_len < WG_TRANSPORT_MIN)
		return count(V_NOT_TRANSPORT);

	struct rewrite *found;
	__u32 dir;
	struct client_to_exit_key ck = {
		.client_addr = ip.saddr,
		.listen_addr = ip.daddr,
		.client_port = h.udp.source,
		.listen_port = h.udp.dest,
		.receiver_index = h.wg.receiver_index,
	};
	found = bpf_map_lookup_elem(&client_to_exit, &ck);
	if (found) {
		dir = DIR_CLIENT_TO_EXIT;
	} else {
		struct exit_to_client_key ek = {
			.exit_addr = ip.saddr,
			.relay_addr = ip.daddr,
			.exit_port = h.udp.source,
			.relay_port = h.udp.dest,
		};
		found = bpf_map_lookup_elem(&exit_to_client, &ek);
		if (!found)
			return count(V_NO_ENTRY);
		dir = DIR_EXIT_TO_CLIENT;
	}
	// Userspace may rewrite the entry at any time: work on one consistent copy.
	struct rewrite rw = *found;

	// Every further segment of a train: a transport message of the same session. A
	// small train is read from a copy (see `scratch`), a large one segment by segment.
	struct scratch *copy = NULL;
	if (segs > 1 && payload_len >= 2 * WG_TRANSPORT_MIN && payload_len <= SCRATCH_BYTES) {
		__u32 zero = 0;
		copy = bpf_map_lookup_elem(&scratch, &zero);
		if (copy && bpf_skb_load_bytes(skb, PAYLOAD_OFF, copy->bytes, payload_len) < 0)
			return count(V_TRAIN_MIXED);
	}
	for (__u32 i = 1; i < MAX_SEGMENTS; i++) {
		if (i >= segs)
			break;
		struct wg_head seg;
		__u32 off = i * seg_len;
		if (copy) {
			if (off > SCRATCH_BYTES - sizeof(seg))
				return count(V_TRAIN_MIXED);
			__builtin_memcpy(&seg, copy->bytes + off, sizeof(seg));
		} else if (bpf_skb_load_bytes(skb, PAYLOAD_OFF + off, &seg, sizeof(seg)) < 0) {
			return count(V_TRAIN_MIXED);
		}
		if (seg.type != WG_TRANSPORT_WORD)
			return count(V_TRAIN_MIXED);
		if (dir == DIR_CLIENT_TO_EXIT && seg.receiver_index != ck.receiver_index) {
			// Another index (a rekey in flight) must belong to the same session.
			struct client_to_exit_key other = ck;
			other.receiver_index = seg.receiver_index;
			struct rewrite *o = bpf_map_lookup_elem(&client_to_exit, &other);
			if (!o || o->session != rw.session)
				return count(V_TRAIN_MIXED);
		}
	}

	struct session_counters *c = bpf_map_lookup_elem(&session_counters, &rw.session);
	if (!c)
		return count(V_NO_COUNTERS);

	// Route before touching the packet: a miss must leave it as it came.
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.l4_protocol = IPPROTO_UDP,
		.sport = rw.src_port,
		.dport = rw.dst_port,
		.tot_len = 0, // 0: the kernel checks the MTU per segment (GSO aware)
		.ifindex = skb->ingress_ifindex,
		.ipv4_src = rw.src_addr,
		.ipv4_dst = rw.dst_addr,
	};
	// The route only: bpf_redirect_neigh resolves the neighbour itself, so looking it up
	// here too would be paid twice per packet. A kernel older than 6.5 refuses the flag
	// (-EINVAL, before it looks at anything): then the full lookup.
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc < 0)
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return count(V_NO_ROUTE);

	// Addresses: IPv4 header checksum, and the UDP checksum's pseudo-header part. With
	// CHECKSUM_PARTIAL (GSO, local senders) the helper updates the stored pseudo-header
	// sum instead; BPF_F_MARK_MANGLED_0 keeps a zero (absent) checksum zero and turns a
	// computed zero into 0xffff.
	__be32 old_addrs[2] = { ip.saddr, ip.daddr };
	__be32 new_addrs[2] = { rw.src_addr, rw.dst_addr };
	__s64 addr_diff = bpf_csum_diff(old_addrs, sizeof(old_addrs), new_addrs,
					sizeof(new_addrs), 0);
	__be32 old_ports = ((__u32)h.udp.dest << 16) | h.udp.source;
	__be32 new_ports = ((__u32)rw.dst_port << 16) | rw.src_port;
	__s64 port_diff = bpf_csum_diff(&old_ports, sizeof(old_ports), &new_ports,
					sizeof(new_ports), 0);
	if (addr_diff < 0 || port_diff < 0)
		return count(V_MALFORMED);

	// The UDP checksum through the helper, which alone knows whether it is a full sum or
	// a CHECKSUM_PARTIAL pseudo-header sum (ports are then not in it). It may move the
	// packet's data: the pointers are taken again after it.
	if (bpf_l4_csum_replace(skb, UDP_CSUM_OFF, 0, addr_diff,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) < 0 ||
	    bpf_l4_csum_replace(skb, UDP_CSUM_OFF, 0, port_diff, BPF_F_MARK_MANGLED_0) < 0)
		return TC_ACT_SHOT; // half-rewritten: never deliver it anywhere
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + UDP_OFF + 4 <= data_end) {
		// Addresses and ports written in place; the IPv4 header checksum by RFC 1624:
		// HC' = ~(~HC + the difference of the addresses), folded.
		struct iphdr *iph = data + IP_OFF;
		__u64 sum = (__u16)~iph->check;
		sum += (__u32)addr_diff;
		iph->check = ~csum_fold(sum);
		iph->saddr = rw.src_addr;
		iph->daddr = rw.dst_addr;
		*(__be32 *)(data + UDP_OFF) = new_ports;
	} else if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, 0, addr_diff, 0) < 0 ||
		   bpf_skb_store_bytes(skb, IP_ADDRS_OFF, new_addrs, sizeof(new_addrs), 0) < 0 ||
		   bpf_skb_store_bytes(skb, UDP_OFF, &new_ports, sizeof(new_ports), 0) < 0) {
		return TC_ACT_SHOT;
	}

	struct bpf_redir_neigh nh = {
		.nh_family = fib.family,
		.ipv4_nh = fib.ipv4_dst, // the gateway, or the destination itself
	};
	c->packets[dir] += segs;
	c->bytes[dir] += payload_len;
	c->last_seen_ns = bpf_ktime_get_ns();
	count(V_FORWARDED);
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

char LICENSE[] SEC("license") = "GPL";
