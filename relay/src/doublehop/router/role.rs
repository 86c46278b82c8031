//! The router as a [`Role`]: it claims every client datagram no role before it took, and
//! turns its [`Action`]s and [`Command`]s into [`Output`]s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{Action, Command, Router};
use crate::drop_reason::DropReason;
use crate::role::{Datagram, Listener, Output, Role, RoleId, Target};
use crate::slab::SessionSlot;
use crate::table::ExitTable;

impl Router {
    /// Hands the I/O layer what the router queued, in order; a socket that could not be
    /// opened loses its session (whose close is queued behind it).
    pub fn drain_commands(&mut self, out: &mut impl FnMut(Output<'_>) -> bool) {
        while let Some(cmd) = self.poll_command() {
            match cmd {
                Command::OpenExitSocket {
                    slot,
                    exit,
                    local_port,
                } => {
                    let socket = <Router as Role>::socket(slot);
                    if !out(Output::Open {
                        socket,
                        exit,
                        local_port,
                    }) {
                        self.socket_failed(slot);
                    }
                }
                Command::CloseExitSocket { slot } => {
                    out(Output::Close {
                        socket: <Router as Role>::socket(slot),
                    });
                }
                Command::Offload(o) => {
                    out(Output::Offload {
                        socket: <Router as Role>::socket(o.slot),
                        client: o.client,
                        listener: o.listener,
                        exit: o.exit,
                        indices: o.indices(),
                    });
                }
                Command::Withdraw { slot } => {
                    out(Output::Withdraw {
                        socket: <Router as Role>::socket(slot),
                    });
                }
                Command::SendCookieReply {
                    listener,
                    client,
                    reply,
                } => {
                    out(Output::Reply {
                        listener,
                        to: client,
                        bytes: &reply,
                    });
                }
            }
        }
    }

    /// Carries out the commands `action` needs (an exit socket exists before anything is
    /// sent through it), then the action.
    fn act(&mut self, action: Action, out: &mut impl FnMut(Output<'_>) -> bool) {
        self.drain_commands(out);
        let target = match action {
            Action::ToExit(slot) => Target::Socket(<Router as Role>::socket(slot)),
            Action::ToClient { listener, client } => Target::Client {
                listener: listener.id,
                addr: client,
            },
            Action::Drop(_) => return,
        };
        out(Output::Forward(target));
    }
}

impl Role for Router {
    /// Registered in `io/worker.rs`, as every role's is.
    const ID: RoleId = RoleId(0);

    type Claim<'a> = ();

    /// Every client datagram is the router's: it counts what it cannot route.
    fn claim<'a>(&self, _: &Datagram<'a>, _: impl FnOnce() -> bool) -> Option<()> {
        Some(())
    }

    fn knows_client(&self, client: SocketAddr) -> bool {
        Router::knows_client(self, client)
    }

    fn handle_client(
        &mut self,
        now: Instant,
        listener: Listener,
        dg: &Datagram<'_>,
        _: (),
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) {
        let action = self.handle_client_message(now, listener, dg.from, dg.bytes.len(), dg.msg);
        self.act(action, out);
    }

    fn handle_socket(
        &mut self,
        now: Instant,
        slot: SessionSlot,
        bytes: &[u8],
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) {
        let action = self.handle_exit(now, slot, bytes);
        self.act(action, out);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Router::poll_timeout(self)
    }

    fn handle_timeout(&mut self, now: Instant, out: &mut impl FnMut(Output<'_>) -> bool) {
        Router::handle_timeout(self, now);
        self.drain_commands(out);
    }

    fn set_table(&mut self, table: Arc<ExitTable>) {
        Router::set_table(self, table);
    }

    fn record_drop(&mut self, reason: DropReason) {
        Router::record_drop(self, reason);
    }

    fn drops(&self) -> &[u64; DropReason::COUNT] {
        &self.stats().drops
    }
}
