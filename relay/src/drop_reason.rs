//! Why the relay refused a packet. Every refusal has exactly one reason, counted per
//! worker and exported by name.

/// The reason a packet was dropped instead of forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than the four-byte message header.
    Truncated,
    /// A known type whose length is not the exact handshake size, or a transport
    /// message shorter than 32 bytes.
    BadLength,
    /// One of the three reserved header bytes is not zero.
    ReservedNonZero,
    /// The first byte is not 1, 2, 3 or 4.
    UnknownType,
    /// An initiation whose mac1 matches no configured exit.
    NoExit,
    /// An initiation on a listen port pinned to an exit, whose mac1 is not for that exit;
    /// or a client's response whose mac1 is for none of the exits it has sessions with.
    Mac1Mismatch,
    /// The source exceeded its handshake rate, or a challenge was due and the router's
    /// (or Z-HOP's) cookie-reply budget was spent.
    RateLimited,
    /// An initiation answered with the relay's own cookie reply instead of forwarded: the
    /// relay is under load or the source is over its budget, and its mac2 does not prove
    /// its address. The client retries with the cookie. Z-HOP does the same for outer
    /// initiations to the node, before decrypting them.
    CookieChallenge,
    /// The table of pending handshakes is full; new handshakes wait until it drains.
    PendingFull,
    /// The session table is full; established sessions are never evicted for new ones.
    SessionsFull,
    /// This client address already has the most sessions one address may hold.
    ClientSessionLimit,
    /// A response, cookie reply or transport message from an address with no session.
    UnknownClient,
    /// A message from a known client whose receiver index the exit never assigned.
    UnknownIndex,
    /// A response on an exit-facing socket that answers no initiation of the session's
    /// client (or one already answered): forged by someone spoofing the exit, or late.
    UnmatchedResponse,
    /// A packet from an exit for a session that has gone (closed between receive and handling).
    NoSession,
    /// Sending would give an unverified client address more bytes than it sent us.
    AmplificationLimit,
    /// The exit-facing socket for a new session could not be opened.
    SocketUnavailable,
    /// The kernel refused to send the packet.
    SendFailed,
    /// Z-HOP: an outer initiation for this node from a key that is not a provisioned peer.
    UnknownPeer,
    /// Z-HOP: boringtun refused an outer packet (bad MAC, replay, failed decryption).
    OuterRejected,
    /// Z-HOP: the decrypted inner packet is not a well-formed IP packet.
    InnerMalformed,
    /// Z-HOP: the inner packet is not UDP.
    InnerNotUdp,
    /// Z-HOP: the inner source is outside the peer's allowed IPs.
    InnerSpoofedSource,
    /// Z-HOP: the inner destination is not one of the peer's allowed exits.
    InnerForbiddenDestination,
    /// Exit: a decrypted packet whose source is outside its peer's allowed IPs.
    ExitSourceNotAllowed,
    /// Exit: a packet from the TUN device whose destination is in no peer's allowed IPs,
    /// or whose peer no worker holds a tunnel with yet.
    ExitNoRoute,
    /// Exit: a TUN packet for a peer another worker holds, whose hand-off queue was full.
    ExitHandoffFull,
    /// Exit: the TUN device refused a decrypted packet (its queue full, or malformed).
    ExitTunWriteFailed,
    /// Exit: a read from an offloading TUN device (a `virtio_net_hdr` and its packet) that
    /// could not be split into packets (a header or packet the kernel should not produce).
    ExitTunReadUnsplittable,
    /// A datagram on a shared exit-facing socket (`[relay] exit_sockets = "shared"`) from an
    /// address that is the exit of no session or flow on that socket: a stranger the
    /// kernel would have filtered out on a connected socket, or a late packet of a session
    /// that has just closed.
    SharedSocketStranger,
}

impl DropReason {
    /// Every reason, in the order of [`DropReason::index`].
    pub const ALL: [DropReason; 30] = [
        DropReason::Truncated,
        DropReason::BadLength,
        DropReason::ReservedNonZero,
        DropReason::UnknownType,
        DropReason::NoExit,
        DropReason::Mac1Mismatch,
        DropReason::RateLimited,
        DropReason::CookieChallenge,
        DropReason::PendingFull,
        DropReason::SessionsFull,
        DropReason::ClientSessionLimit,
        DropReason::UnknownClient,
        DropReason::UnknownIndex,
        DropReason::UnmatchedResponse,
        DropReason::NoSession,
        DropReason::AmplificationLimit,
        DropReason::SocketUnavailable,
        DropReason::SendFailed,
        DropReason::UnknownPeer,
        DropReason::OuterRejected,
        DropReason::InnerMalformed,
        DropReason::InnerNotUdp,
        DropReason::InnerSpoofedSource,
        DropReason::InnerForbiddenDestination,
        DropReason::ExitSourceNotAllowed,
        DropReason::ExitNoRoute,
        DropReason::ExitHandoffFull,
        DropReason::ExitTunWriteFailed,
        DropReason::ExitTunReadUnsplittable,
        DropReason::SharedSocketStranger,
    ];
    /// Number of distinct reasons.
    pub const COUNT: usize = Self::ALL.len();

    /// A dense index for per-reason counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stable name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadLength => "bad_length",
            DropReason::ReservedNonZero => "reserved_nonzero",
            DropReason::UnknownType => "unknown_type",
            DropReason::NoExit => "no_exit",
            DropReason::Mac1Mismatch => "mac1_mismatch",
            DropReason::RateLimited => "rate_limited",
            DropReason::CookieChallenge => "cookie_challenge",
            DropReason::PendingFull => "pending_full",
            DropReason::SessionsFull => "sessions_full",
            DropReason::ClientSessionLimit => "client_session_limit",
            DropReason::UnknownClient => "unknown_client",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::UnmatchedResponse => "unmatched_response",
            DropReason::NoSession => "no_session",
            DropReason::AmplificationLimit => "amplification_limit",
            DropReason::SocketUnavailable => "socket_unavailable",
            DropReason::SendFailed => "send_failed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::OuterRejected => "outer_rejected",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::InnerNotUdp => "inner_not_udp",
            DropReason::InnerSpoofedSource => "inner_spoofed_source",
            DropReason::InnerForbiddenDestination => "inner_forbidden_destination",
            DropReason::ExitSourceNotAllowed => "exit_source_not_allowed",
            DropReason::ExitNoRoute => "exit_no_route",
            DropReason::ExitHandoffFull => "exit_handoff_full",
            DropReason::ExitTunWriteFailed => "exit_tun_write_failed",
            DropReason::ExitTunReadUnsplittable => "exit_tun_read_unsplittable",
            DropReason::SharedSocketStranger => "shared_socket_stranger",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_position_in_all_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert!(names.insert(r.as_str()), "duplicate name {}", r.as_str());
        }
    }
}
