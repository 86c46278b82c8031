//! The data plane's configuration: backend, workers, listen addresses, buffers.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::Socket;

use super::sys;

use crate::router::RouterConfig;

/// Which data-path implementation workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// io_uring where it can be set up, the portable backend otherwise.
    #[default]
    Auto,
    /// io_uring only; starting fails when it cannot be set up.
    Uring,
    /// recvmmsg/sendmmsg over epoll; works everywhere.
    Portable,
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Uring => "uring",
            BackendChoice::Portable => "portable",
        }
    }
}

/// Whether the node forwards established DoubleHop sessions in the kernel (the tc program
/// of `wraithgate-fastpath`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathChoice {
    /// Userspace forwards everything.
    #[default]
    Off,
    /// Attach where the kernel and this process's privileges allow it; otherwise one log
    /// line says why and userspace forwards everything, as with `off`.
    Auto,
}

impl FastPathChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            FastPathChoice::Off => "off",
            FastPathChoice::Auto => "auto",
        }
    }
}

/// How exit-facing sockets are held: one per DoubleHop session and Z-HOP flow, or shared
/// between sessions of different exits (`io/shared.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitSockets {
    /// A socket of its own per session, connected to its exit: the kernel filters by source.
    #[default]
    PerSession,
    /// A socket carries at most one session per exit endpoint, so each exit still sees every
    /// client at a relay port of its own; a worker needs as many sockets as its busiest exit
    /// has sessions. Unconnected: the worker demultiplexes by source and drops strangers
    /// (`shared_socket_stranger`).
    Shared,
}

impl ExitSockets {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitSockets::PerSession => "per-session",
            ExitSockets::Shared => "shared",
        }
    }
}

/// Descriptors the data plane leaves to the rest of the node: the operator API's
/// connections, state-file writes, logs. A node at its open-files limit still answers its
/// operator, who can kill sessions to make room, instead of refusing every connection.
pub const CONTROL_DESCRIPTORS: u64 = 64;

/// Everything the data plane needs to start.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// Client-facing addresses; port 0 picks a free port (shared by all workers).
    pub listen: Vec<SocketAddr>,
    pub workers: usize,
    /// Pin worker `i` to core `i` (modulo the cores this process may use).
    pub pin_workers: bool,
    pub backend: BackendChoice,
    pub router: RouterConfig,
    /// Source address of exit-facing sockets; the kernel picks by route when `None`.
    pub exit_source: Option<IpAddr>,
    /// Messages per recvmmsg/sendmmsg call.
    pub batch: usize,
    /// Receive buffer per message: 64 KiB holds a whole GRO train.
    pub recv_buffer: usize,
    /// SO_RCVBUF/SO_SNDBUF of listeners. It absorbs bursts while a worker is busy, and under
    /// sustained overload it is the standing queue every packet waits in (BENCHMARKS.md,
    /// "Socket buffers": 16 MiB holds 100–300 ms there, 1–4 MiB a few tens of ms).
    pub listener_socket_buffer: usize,
    /// SO_RCVBUF/SO_SNDBUF of each exit-facing socket.
    pub exit_socket_buffer: usize,
    /// One exit-facing socket per session, or sockets shared between exits.
    pub exit_sockets: ExitSockets,
    /// Use UDP GSO on send (each socket still falls back on its own when the kernel refuses).
    pub gso: bool,
    /// The node's static private key; Z-HOP (terminating provisioned peers' outer tunnels)
    /// is off without one.
    pub node_key: Option<[u8; 32]>,
    /// io_uring backend: receive buffers per worker (rounded up to a power of two, at most
    /// 16,384: the kernel bounds the completion queue they need), each big enough for a
    /// whole GRO train; they bound the worker's buffer memory.
    pub ring_buffers: usize,
    /// Exit-facing sockets whose descriptor would be at or above this are refused as if the
    /// open-files limit were reached (`socket_unavailable`); set at start-up to the limit
    /// less [`CONTROL_DESCRIPTORS`].
    pub descriptor_ceiling: u64,
    /// The kernel fast path: off, or where it can be attached.
    pub fast_path: FastPathChoice,
    /// Interfaces the fast path's program is attached to (ingress); empty: every Ethernet
    /// interface of the node's network namespace.
    pub fast_path_interfaces: Vec<String>,
    /// The Exit role's TUN device, created at start with one queue per worker; the role
    /// is off without one.
    pub tun: Option<crate::tun::TunConfig>,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            listen: vec!["0.0.0.0:51820".parse().expect("literal address")],
            workers: default_workers(),
            pin_workers: true,
            backend: BackendChoice::Auto,
            router: RouterConfig::default(),
            exit_source: None,
            batch: 32,
            recv_buffer: 65_536,
            listener_socket_buffer: 16 << 20,
            exit_socket_buffer: 1 << 20,
            exit_sockets: ExitSockets::PerSession,
            gso: true,
            node_key: None,
            ring_buffers: 256,
            descriptor_ceiling: u64::MAX,
            fast_path: FastPathChoice::Off,
            fast_path_interfaces: Vec::new(),
            tun: None,
        }
    }
}

/// One worker per core this process may run on.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl DataPlaneConfig {
    /// A socket connected to `exit` as configured (source address, buffer size), bound to
    /// `local_port` when given: a session's or a Z-HOP flow's.
    pub(crate) fn exit_socket(
        &self,
        exit: SocketAddr,
        local_port: Option<u16>,
    ) -> io::Result<Socket> {
        let (socket, _gro) =
            sys::exit_socket(exit, self.exit_source, local_port, self.exit_socket_buffer)?;
        self.within_ceiling(socket)
    }

    /// An unconnected socket for sessions towards exits of `exit`'s address family, bound
    /// as [`DataPlaneConfig::exit_socket`] binds (port `local_port`, 0 for any).
    pub(crate) fn shared_exit_socket(
        &self,
        exit: SocketAddr,
        local_port: u16,
    ) -> io::Result<Socket> {
        let (socket, _gro) = sys::unconnected_exit_socket(
            exit,
            self.exit_source,
            local_port,
            self.exit_socket_buffer,
        )?;
        self.within_ceiling(socket)
    }

    fn within_ceiling(&self, socket: Socket) -> io::Result<Socket> {
        // Descriptors are handed out lowest first, so a socket's number is about how many
        // are open: at the ceiling this one is closed again and the session refused.
        if std::os::fd::AsRawFd::as_raw_fd(&socket) as u64 >= self.descriptor_ceiling {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        Ok(socket)
    }
}
