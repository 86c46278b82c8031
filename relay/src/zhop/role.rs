//! Z-HOP as a [`Role`]: it claims the client datagrams of its outer tunnels, handles them
//! and what its flow sockets receive, and counts its own drops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{Claim, Zhop, ZhopOut};
use crate::drop_reason::DropReason;
use crate::role::{Datagram, Listener, Output, Role, RoleId, Target};
use crate::slab::SessionSlot;
use crate::table::ExitTable;

impl<'a> From<ZhopOut<'a>> for Output<'a> {
    fn from(o: ZhopOut<'a>) -> Output<'a> {
        match o {
            ZhopOut::ToPeer {
                listener,
                to,
                bytes,
            } => Output::Send {
                to: Target::Client {
                    listener: listener.id,
                    addr: to,
                },
                bytes,
            },
            ZhopOut::ToExit { flow, bytes } => Output::Send {
                to: Target::Socket(Zhop::socket(flow)),
                bytes,
            },
            ZhopOut::OpenFlow { flow, exit } => Output::Open {
                socket: Zhop::socket(flow),
                exit,
                local_port: None,
            },
            ZhopOut::CloseFlow { flow } => Output::Close {
                socket: Zhop::socket(flow),
            },
            ZhopOut::ToTun { bytes } => Output::ToTun { bytes },
        }
    }
}

impl Zhop {
    /// Runs `f` with a sink that hands its events to `out`, then counts what `f` refused
    /// and the sends `out` could not make. A flow socket that could not be opened is only
    /// logged by the I/O layer: what is sent through it is then counted as a failed send.
    fn emit(
        &mut self,
        out: &mut impl FnMut(Output<'_>) -> bool,
        f: impl FnOnce(&mut Zhop, &mut dyn FnMut(ZhopOut<'_>)) -> Result<(), DropReason>,
    ) {
        let mut failed = 0;
        let r = f(self, &mut |o: ZhopOut<'_>| {
            let send = matches!(
                o,
                ZhopOut::ToPeer { .. } | ZhopOut::ToExit { .. } | ZhopOut::ToTun { .. }
            );
            if !out(o.into()) && send {
                failed += 1;
            }
        });
        if let Err(reason) = r {
            self.drops[reason.index()] += 1;
        }
        self.drops[DropReason::SendFailed.index()] += failed;
    }
}

impl Role for Zhop {
    /// Registered in `io/worker.rs`, as every role's is.
    const ID: RoleId = RoleId(1);

    type Claim<'a> = Claim<'a>;

    /// An initiation addressed (by mac1) to the node, anything from an address with an
    /// outer tunnel, or, only from an address no later role knows, a transport message
    /// naming one of this worker's tunnels by index (a peer that roamed).
    fn claim<'a>(
        &self,
        dg: &Datagram<'a>,
        later_knows: impl FnOnce() -> bool,
    ) -> Option<Claim<'a>> {
        self.claim_datagram(dg, later_knows)
    }

    fn knows_client(&self, client: SocketAddr) -> bool {
        self.knows_endpoint(client)
    }

    fn handle_client(
        &mut self,
        now: Instant,
        listener: Listener,
        dg: &Datagram<'_>,
        claim: Claim<'_>,
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) {
        self.emit(out, |z, sink| {
            z.handle_claim(now, listener, dg, claim, sink)
        });
    }

    fn handle_socket(
        &mut self,
        now: Instant,
        flow: SessionSlot,
        bytes: &[u8],
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) {
        self.emit(out, |z, sink| z.handle_exit(now, flow, bytes, sink));
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Zhop::poll_timeout(self)
    }

    fn handle_timeout(&mut self, now: Instant, out: &mut impl FnMut(Output<'_>) -> bool) {
        self.emit(out, |z, sink| {
            z.tick(now, sink);
            Ok(())
        });
    }

    fn set_table(&mut self, table: Arc<ExitTable>) {
        Zhop::set_table(self, table);
    }

    fn record_drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    fn drops(&self) -> &[u64; DropReason::COUNT] {
        &self.drops
    }
}

impl Zhop {
    /// [`Zhop::handle_tun`] with the outputs in the worker's terms and the drops counted.
    /// Returns whether this worker holds the peer's tunnel (else nothing was done).
    pub(crate) fn tun_packet(
        &mut self,
        now: Instant,
        peer: &crate::keys::PublicKey,
        packet: &[u8],
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) -> bool {
        let mut here = true;
        self.emit(out, |z, sink| {
            here = z.handle_tun(now, peer, packet, sink)?;
            Ok(())
        });
        here
    }

    /// [`Zhop::initiate_to`] with the outputs in the worker's terms and the drops counted.
    pub(crate) fn initiate(
        &mut self,
        now: Instant,
        peer: &crate::keys::PublicKey,
        listener: Listener,
        endpoint: SocketAddr,
        packet: &[u8],
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) {
        self.emit(out, |z, sink| {
            z.initiate_to(now, peer, listener, endpoint, packet, sink)
        });
    }
}
