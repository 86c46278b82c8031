//! Listen sockets: bound by the control side, once per worker and in worker order, at
//! start-up and for each listen port a new table pins; handed to the workers with the table.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;

use super::{sys, DataPlane, StartError, WorkerRequest};
use crate::table::ExitTable;

/// A listener socket for one worker. All workers' sockets for an address are bound by the
/// control side, in worker order, so that port 0 resolves to one port shared by all and
/// the steering program's socket index is the worker's number.
#[derive(Debug)]
pub struct BoundListener {
    pub(crate) socket: Socket,
    pub(crate) local: SocketAddr,
    pub(crate) gro: bool,
}

/// Says once per address when the kernel gave a listener less receive buffer than
/// configured (`net.core.rmem_max` caps it for a process without `CAP_NET_ADMIN`).
pub(crate) fn warn_if_capped(socket: &socket2::Socket, asked: usize, addr: SocketAddr) {
    // The kernel reports twice the usable size it granted (it counts its bookkeeping).
    if let Ok(got) = socket.recv_buffer_size() {
        if got / 2 < asked {
            tracing::warn!(%addr, asked, granted = got / 2,
                "client-facing socket buffer is smaller than configured: raise \
                 net.core.rmem_max or run with CAP_NET_ADMIN");
        }
    }
}

/// Sockets bound for the listen ports a table newly pins, not yet handed to workers;
/// dropped, they close.
#[derive(Debug, Default)]
pub struct PinnedListeners {
    groups: Vec<(SocketAddr, Vec<BoundListener>)>,
}

impl PinnedListeners {
    /// The addresses bound.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.groups.iter().map(|(a, _)| *a)
    }
}

/// A listen port a table pins to an exit that cannot be bound.
#[derive(Debug, thiserror::Error)]
#[error("exit {exit:?}: listen port {port} cannot be bound on {addr}: {source}")]
pub struct PinError {
    pub exit: String,
    pub port: u16,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// The name of the exit `table` pins to `port`, for messages.
pub(crate) fn pinned_exit_name(table: &ExitTable, port: u16) -> String {
    table
        .pinned(port)
        .and_then(|id| table.get(id))
        .map_or_else(String::new, |e| e.spec.name.clone())
}

/// Binds one socket per worker on `addr` (in worker order) and steers clients over them.
/// Returns the sockets and the address actually bound.
pub(crate) fn bind_group(
    addr: SocketAddr,
    workers: usize,
    buffer: usize,
    steering: &mut bool,
) -> Result<(Vec<BoundListener>, SocketAddr), StartError> {
    let mut resolved = addr;
    let mut group = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (socket, gro) = sys::listener_socket(resolved, buffer)
            .map_err(|source| StartError::Bind { addr, source })?;
        resolved = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(resolved);
        if group.is_empty() {
            warn_if_capped(&socket, buffer, resolved);
        }
        group.push(BoundListener {
            socket,
            local: resolved,
            gro,
        });
    }
    if workers > 1 {
        if let Err(e) = sys::attach_steering(&group[0].socket, addr.is_ipv6(), workers) {
            if *steering {
                tracing::warn!(%addr, error = %e,
                    "cannot steer clients to workers by address; the kernel's hash decides, \
                     and restored sessions may land on the wrong worker");
            }
            *steering = false;
        }
    }
    Ok((group, resolved))
}

impl DataPlane {
    /// Binds, on every listen address and once per worker, each listen port `table` pins
    /// that is not bound yet, without handing the sockets to workers: a change can find
    /// out that its port is taken before it is persisted. A port the running table pins
    /// already (and could not bind before) is retried but never refuses the change; a port
    /// newly pinned that cannot be bound does, and closes whatever this call bound.
    ///
    /// Callers serialise `bind_pinned` and the [`DataPlane::publish_bound`] that follows.
    pub fn bind_pinned(&self, table: &ExitTable) -> Result<PinnedListeners, PinError> {
        self.bind_new_ports(table, true)
    }

    pub(super) fn bind_new_ports(
        &self,
        table: &ExitTable,
        strict: bool,
    ) -> Result<PinnedListeners, PinError> {
        let running = self.table.load();
        let bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        let mut steering = self.steering;
        let mut out = PinnedListeners::default();
        for ip in &self.listen_ips {
            for port in table.pinned_ports() {
                let addr = SocketAddr::new(*ip, port);
                if bound.contains(&addr) || out.groups.iter().any(|(a, _)| *a == addr) {
                    continue;
                }
                match bind_group(
                    addr,
                    self.workers.len(),
                    self.listener_socket_buffer,
                    &mut steering,
                ) {
                    Ok((group, _)) => out.groups.push((addr, group)),
                    Err(e) => {
                        let source = match e {
                            StartError::Bind { source, .. } => source,
                            other => io::Error::other(other.to_string()),
                        };
                        let err = PinError {
                            exit: pinned_exit_name(table, port),
                            port,
                            addr,
                            source,
                        };
                        if strict && running.pinned(port).is_none() {
                            return Err(err);
                        }
                        tracing::warn!(error = %err, "pinned port not bound");
                    }
                }
            }
        }
        Ok(out)
    }

    /// Makes `table` the one workers route by: hands them the sockets `listeners` holds
    /// for the ports it newly pins (see [`DataPlane::bind_pinned`]), publishes it, wakes
    /// the workers, and releases the ports it no longer pins (sessions that came through
    /// one are closed: their clients must move to another port anyway). Sessions whose
    /// exit stays carry on.
    pub fn publish_bound(&self, table: ExitTable, listeners: PinnedListeners) {
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        self.hand_over(&mut bound, listeners);
        let ports: Vec<u16> = table.pinned_ports().collect();
        let released: Vec<SocketAddr> = bound
            .iter()
            .copied()
            .filter(|a| !self.configured.contains(a) && !ports.contains(&a.port()))
            .collect();
        bound.retain(|a| !released.contains(a));
        drop(bound);
        let old = self.table.load();
        let mut table = table;
        table.keep_owners(&old);
        self.table.publish(table);
        // After the table: by the time a worker closes the socket, no initiation on it is
        // routed by the old pin any more.
        for &addr in &released {
            for w in &self.workers {
                let _ = w.requests.send(WorkerRequest::RemoveListener(addr));
            }
            tracing::info!(%addr, "pinned port released");
        }
        self.nudge();
        self.reap_retired();
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(old);
    }

    /// Gives each worker its socket of every group `listeners` holds.
    fn hand_over(&self, bound: &mut Vec<SocketAddr>, listeners: PinnedListeners) {
        for (addr, group) in listeners.groups {
            for (w, l) in self.workers.iter().zip(group) {
                let _ = w.requests.send(WorkerRequest::AddListener(l));
            }
            bound.push(addr);
            tracing::info!(%addr, "listening on pinned port");
        }
    }

    /// The addresses the running table's pinned listen ports need that no socket is bound
    /// to: their bind failed when the table came (the port was taken).
    pub fn unbound_pinned(&self) -> Vec<SocketAddr> {
        let table = self.table.load();
        let bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        self.listen_ips
            .iter()
            .flat_map(|ip| table.pinned_ports().map(|port| SocketAddr::new(*ip, port)))
            .filter(|a| !bound.contains(a))
            .collect()
    }

    /// Binds again the pinned listen ports of the running table that are not bound
    /// ([`DataPlane::unbound_pinned`]) and hands those it binds to the workers; the table
    /// stays as it is. Returns the addresses still unbound.
    ///
    /// Callers serialise it with [`DataPlane::bind_pinned`] and
    /// [`DataPlane::publish_bound`] (the control side holds its state lock): two binds of
    /// one port would both succeed (`SO_REUSEPORT`).
    pub fn retry_pinned(&self) -> Vec<SocketAddr> {
        let table = self.table.load();
        // Not strict: the running table's ports never refuse, they only warn.
        let listeners = self.bind_new_ports(&table, false).unwrap_or_default();
        if !listeners.groups.is_empty() {
            let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
            self.hand_over(&mut bound, listeners);
            self.nudge();
        }
        drop(table);
        self.unbound_pinned()
    }
}
