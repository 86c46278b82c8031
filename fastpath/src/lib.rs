//! WraithGate's kernel fast path for DoubleHop: a tc program that forwards the WireGuard
//! transport messages of sessions userspace has offloaded, and the loader that drives it.
//!
//! See `fastpath/README.md` for the map layout, what goes to userspace, and how the
//! committed object is built and verified.
//!
//! **API Boundary**: userspace decides, the kernel forwards. [`SessionMaps`] (one per
//! worker, from [`FastPath`]) are the only writers of the maps; the program never creates
//! an entry, it forwards a packet only when its exact addresses, ports and (client → exit)
//! receiver index were written here, and counts what it forwarded per session.
//!
//! **Architecture Invariant**: the program is attached with tcx links owned by this process.
//! Dropping [`FastPath`], or the process dying (even by `SIGKILL`), detaches it: nothing
//! forwards without an owner.

mod maps;

use std::collections::HashMap as StdHashMap;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::AsFd as _;
use std::time::Duration;

use aya::maps::{
    HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
use aya::programs::{LinkOrder, ProgramError};
use aya::{Ebpf, EbpfLoader};

use maps::{ClientToExitKey, ExitToClientKey, Rewrite, SessionCounters};
pub use maps::{Verdict, MAX_CLIENT_INDICES, MAX_INDICES_PER_SESSION, MAX_SESSIONS};

/// The compiled program, built from `bpf/doublehop.bpf.c` by `tools/build-bpf` and
/// committed, so that building this crate needs no clang. Aligned: the ELF parser reads
/// the headers in place.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/doublehop.bpf.o");

const PROGRAM: &str = "doublehop";
const BPF_NOEXIST: u64 = 1;

/// A session's id in the kernel maps, chosen by the caller (unique among offloaded sessions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u32);

/// The four endpoints of a DoubleHop session, as the userspace path uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionRoute {
    /// The client's proven address and port.
    pub client: SocketAddrV4,
    /// The relay's listen address and port the client sends to.
    pub listen: SocketAddrV4,
    /// The session's exit-facing socket (source of what the relay sends to the exit).
    pub exit_facing: SocketAddrV4,
    /// The exit's endpoint.
    pub exit: SocketAddrV4,
}

/// Traffic the program forwarded for one session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Client → exit.
    pub client_to_exit: DirectionCounters,
    /// Exit → client.
    pub exit_to_client: DirectionCounters,
    /// When the program last forwarded a packet of the session, on `CLOCK_MONOTONIC`
    /// (compare with [`monotonic_now`]); `None` if it never did.
    pub last_seen: Option<Duration>,
}

/// Packets (datagrams: a GSO train counts its segments) and WireGuard message bytes (UDP
/// payload) in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionCounters {
    /// Datagrams.
    pub packets: u64,
    /// UDP payload bytes.
    pub bytes: u64,
}

/// Why the fast path cannot run here; the caller logs it and forwards in userspace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// The process lacks a capability the kernel requires.
    #[error("needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN); this process lacks {missing}")]
    MissingCapability {
        /// The capabilities missing from the effective set.
        missing: String,
    },
    /// The kernel refused a `bpf()` call although the capabilities are there: a seccomp
    /// filter (containers), an LSM, or a kernel built without the feature.
    #[error("the kernel refused bpf() ({call}: {source}){}", if *.seccomp { "; a seccomp filter is active on this process" } else { "" })]
    Refused {
        /// What was being done.
        call: &'static str,
        /// The error the kernel returned.
        source: io::Error,
        /// Whether `/proc/self/status` shows a seccomp filter.
        seccomp: bool,
    },
    /// An interface to attach to does not exist (in this thread's network namespace).
    #[error("no interface {0:?}")]
    NoInterface(String),
    /// An interface is not Ethernet; the program parses Ethernet frames only.
    #[error("interface {0:?} is not an Ethernet device")]
    NotEthernet(String),
    /// IPv4 forwarding is off on an interface: the kernel's FIB lookup refuses to route
    /// what arrives there.
    #[error("IPv4 forwarding is off on {0:?} (sysctl net.ipv4.conf.{0}.forwarding=1)")]
    ForwardingOff(String),
    /// tcx links (Linux 6.6+) are missing; the fast path does not fall back to netlink
    /// filters, which would outlive this process.
    #[error("cannot attach a tcx link to {interface:?} (tcx needs Linux 6.6+): {source}")]
    NoTcx {
        /// The interface.
        interface: String,
        /// The error the kernel returned.
        source: io::Error,
    },
    /// The verifier rejected the program.
    #[error("the kernel rejected the program: {0}")]
    Rejected(String),
    /// Anything else the loader reported.
    #[error("cannot load the fast path: {0}")]
    Load(String),
}

/// Why an offload or withdrawal failed; the session stays on the userspace path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// The session is offloaded with another route; withdraw it first.
    #[error("session {0:?} is offloaded with another route")]
    RouteMismatch(SessionId),
    /// The session already has [`MAX_INDICES_PER_SESSION`] receiver indices.
    #[error("session {0:?} already has {MAX_INDICES_PER_SESSION} receiver indices offloaded")]
    TooManyIndices(SessionId),
    /// Another session owns the same key (the same client endpoint and index, or the same
    /// exit-facing socket and exit).
    #[error("another session already offloads this {0}")]
    Taken(&'static str),
    /// The kernel refused the map update (full map, ...).
    #[error("map update failed: {0}")]
    Map(#[from] MapError),
    /// Anything else.
    #[error("{0}")]
    Io(io::Error),
}

/// What this process has offloaded for one session, to withdraw it whole.
#[derive(Debug)]
struct Offloaded {
    route: SessionRoute,
    indices: Vec<u32>,
    exit_to_client: bool,
}

/// The attached program and its maps. Dropping it detaches the program from every
/// interface; the maps are freed once every [`SessionMaps`] is dropped too.
pub struct FastPath {
    maps: SessionMaps,
    verdicts: PerCpuArray<MapData, u64>,
    interfaces: Vec<String>,
    /// Owns the program and its tcx links.
    ebpf: Ebpf,
}

/// A writer of the session maps with its own descriptors and its own bookkeeping: one per
/// worker, each offloading and withdrawing the sessions it owns without a lock. Two
/// writers can never hold the same key or session id: the kernel refuses the second
/// ([`OffloadError::Taken`]).
pub struct SessionMaps {
    client_to_exit: HashMap<MapData, ClientToExitKey, Rewrite>,
    exit_to_client: HashMap<MapData, ExitToClientKey, Rewrite>,
    counters: PerCpuHashMap<MapData, u32, SessionCounters>,
    sessions: StdHashMap<SessionId, Offloaded>,
    cpus: usize,
}

impl FastPath {
    /// Loads the program and attaches it (tcx, ingress) to `interfaces`, which are looked up
    /// in the calling thread's network namespace. Returns why not when the kernel or the
    /// process's privileges do not allow it.
    pub fn attach(interfaces: &[&str]) -> Result<FastPath, Unavailable> {
        if let Some(missing) = missing_capabilities() {
            return Err(Unavailable::MissingCapability { missing });
        }
        for &name in interfaces {
            check_interface(name)?;
        }
        let mut ebpf = EbpfLoader::new()
            // No CO-RE relocations in the program: the kernel's BTF is not needed (and
            // `/sys/kernel/btf` may be empty on some kernels).
            .btf(None)
            .load(OBJECT)
            .map_err(|e| classify("loading the object and creating its maps", &e))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| Unavailable::Load(format!("no program {PROGRAM} in the object")))?
            .try_into()
            .map_err(|e: ProgramError| Unavailable::Load(e.to_string()))?;
        program.load().map_err(|e| match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                if is_permission(&io_error) {
                    refused("BPF_PROG_LOAD", io_error)
                } else {
                    Unavailable::Rejected(format!("{io_error}\n{verifier_log}"))
                }
            }
            other => classify("loading the program", &other),
        })?;
        for &name in interfaces {
            program
                .attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| match io_error_in(&e) {
                    Some(io) if is_permission(io) => {
                        refused("BPF_LINK_CREATE", io::Error::from_raw_os_error(errno(io)))
                    }
                    Some(io) => Unavailable::NoTcx {
                        interface: name.to_owned(),
                        source: io::Error::from_raw_os_error(errno(io)),
                    },
                    None => Unavailable::Load(e.to_string()),
                })?;
        }
        let cpus = aya::util::nr_cpus()
            .map_err(|(path, e)| Unavailable::Load(format!("reading {path}: {e}")))?;
        Ok(FastPath {
            maps: SessionMaps {
                client_to_exit: take_map(&mut ebpf, "client_to_exit")?,
                exit_to_client: take_map(&mut ebpf, "exit_to_client")?,
                counters: take_map(&mut ebpf, "session_counters")?,
                sessions: StdHashMap::new(),
                cpus,
            },
            verdicts: take_map(&mut ebpf, "verdicts")?,
            interfaces: interfaces.iter().map(|s| (*s).to_owned()).collect(),
            ebpf,
        })
    }

    /// The interfaces the program is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// The session maps, as written through this handle.
    pub fn maps(&self) -> &SessionMaps {
        &self.maps
    }

    /// The session maps, to offload and withdraw through this handle.
    pub fn maps_mut(&mut self) -> &mut SessionMaps {
        &mut self.maps
    }

    /// Another writer of the same maps (for another worker), with no sessions of its own
    /// yet.
    pub fn session_maps(&self) -> Result<SessionMaps, OffloadError> {
        fn dup(map: &MapData) -> Result<MapData, OffloadError> {
            let fd = map
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(OffloadError::Io)?;
            Ok(MapData::from_fd(fd)?)
        }
        let m = &self.maps;
        Ok(SessionMaps {
            client_to_exit: HashMap::try_from(Map::HashMap(dup(IterableMap::map(
                &m.client_to_exit,
            ))?))?,
            exit_to_client: HashMap::try_from(Map::HashMap(dup(IterableMap::map(
                &m.exit_to_client,
            ))?))?,
            counters: PerCpuHashMap::try_from(Map::PerCpuHashMap(dup(IterableMap::map(
                &m.counters,
            ))?))?,
            sessions: StdHashMap::new(),
            cpus: m.cpus,
        })
    }

    /// How many packets the program forwarded or passed on, by verdict, since it was loaded.
    pub fn verdicts(&self) -> Result<Vec<(Verdict, u64)>, OffloadError> {
        Verdict::ALL
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let i = u32::try_from(i).expect("9 verdicts"); // local invariant: ALL is short
                Ok((v, self.verdicts.get(&i, 0)?.iter().sum()))
            })
            .collect()
    }
}

impl SessionMaps {
    /// Lets transport messages from `route.client` to `route.listen` carrying
    /// `receiver_index` (an index the exit assigned to this session, seen by userspace in
    /// its handshake response) go straight to `route.exit` from `route.exit_facing`.
    /// Idempotent. The first offload of a session creates its counters at zero.
    pub fn offload_client_to_exit(
        &mut self,
        session: SessionId,
        route: &SessionRoute,
        receiver_index: u32,
    ) -> Result<(), OffloadError> {
        let entry = self.session_entry(session, route)?;
        if entry.indices.contains(&receiver_index) {
            return Ok(());
        }
        if entry.indices.len() >= MAX_INDICES_PER_SESSION {
            return Err(OffloadError::TooManyIndices(session));
        }
        let key = ClientToExitKey::new(route.client, route.listen, receiver_index);
        let value = Rewrite::new(route.exit_facing, route.exit, session.0);
        if let Err(e) = insert_new(
            &mut self.client_to_exit,
            key,
            value,
            "client endpoint and index",
        ) {
            self.forget_if_empty(session);
            return Err(e);
        }
        self.sessions
            .get_mut(&session)
            .expect("session_entry created it") // local invariant: inserted above
            .indices
            .push(receiver_index);
        Ok(())
    }

    /// Lets everything that is a transport message from `route.exit` to
    /// `route.exit_facing` go straight to `route.client` from `route.listen`. Idempotent.
    pub fn offload_exit_to_client(
        &mut self,
        session: SessionId,
        route: &SessionRoute,
    ) -> Result<(), OffloadError> {
        let entry = self.session_entry(session, route)?;
        if entry.exit_to_client {
            return Ok(());
        }
        let key = ExitToClientKey::new(route.exit, route.exit_facing);
        let value = Rewrite::new(route.listen, route.client, session.0);
        if let Err(e) = insert_new(
            &mut self.exit_to_client,
            key,
            value,
            "exit-facing socket and exit",
        ) {
            self.forget_if_empty(session);
            return Err(e);
        }
        self.sessions
            .get_mut(&session)
            .expect("session_entry created it") // local invariant: inserted above
            .exit_to_client = true;
        Ok(())
    }

    /// Stops forwarding client → exit with `receiver_index` (a keypair that expired).
    /// Returns whether it was offloaded.
    pub fn withdraw_index(
        &mut self,
        session: SessionId,
        receiver_index: u32,
    ) -> Result<bool, OffloadError> {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return Ok(false);
        };
        let Some(pos) = entry.indices.iter().position(|&i| i == receiver_index) else {
            return Ok(false);
        };
        let key = ClientToExitKey::new(entry.route.client, entry.route.listen, receiver_index);
        remove_present(&mut self.client_to_exit, &key)?;
        entry.indices.swap_remove(pos);
        Ok(true)
    }

    /// Withdraws every entry of `session` (expiry, kill, table swap, stop): from now on its
    /// packets take the userspace path. Returns its final counters, or `None` if it was not
    /// offloaded.
    pub fn withdraw(&mut self, session: SessionId) -> Result<Option<Counters>, OffloadError> {
        let Some(entry) = self.sessions.get(&session) else {
            return Ok(None);
        };
        let route = entry.route;
        // Entries go first, counters last, so nothing is forwarded uncounted.
        while let Some(&index) = self.sessions[&session].indices.last() {
            remove_present(
                &mut self.client_to_exit,
                &ClientToExitKey::new(route.client, route.listen, index),
            )?;
            self.sessions
                .get_mut(&session)
                .expect("present") // local invariant: looked up above, not removed yet
                .indices
                .pop();
        }
        if self.sessions[&session].exit_to_client {
            remove_present(
                &mut self.exit_to_client,
                &ExitToClientKey::new(route.exit, route.exit_facing),
            )?;
            self.sessions
                .get_mut(&session)
                .expect("present") // local invariant: as above
                .exit_to_client = false;
        }
        let last = self.counters(session)?;
        remove_present(&mut self.counters, &session.0)?;
        self.sessions.remove(&session);
        Ok(last)
    }

    /// What the program forwarded for `session` so far, summed over CPUs; `None` if the
    /// session is not offloaded.
    pub fn counters(&self, session: SessionId) -> Result<Option<Counters>, OffloadError> {
        if !self.sessions.contains_key(&session) {
            return Ok(None);
        }
        let per_cpu = match self.counters.get(&session.0, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut sum = Counters::default();
        let mut last_seen_ns = 0;
        for c in per_cpu.iter() {
            sum.client_to_exit.packets += c.packets[0];
            sum.client_to_exit.bytes += c.bytes[0];
            sum.exit_to_client.packets += c.packets[1];
            sum.exit_to_client.bytes += c.bytes[1];
            last_seen_ns = last_seen_ns.max(c.last_seen_ns);
        }
        sum.last_seen = (last_seen_ns != 0).then(|| Duration::from_nanos(last_seen_ns));
        Ok(Some(sum))
    }

    /// Sessions with at least one entry offloaded through this handle.
    pub fn sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.keys().copied()
    }

    /// Undoes [`Self::session_entry`] for a session whose first offload failed.
    fn forget_if_empty(&mut self, session: SessionId) {
        let empty = self
            .sessions
            .get(&session)
            .is_some_and(|e| e.indices.is_empty() && !e.exit_to_client);
        if empty && remove_present(&mut self.counters, &session.0).is_ok() {
            self.sessions.remove(&session);
        }
    }

    /// The session's bookkeeping, created (with zeroed kernel counters) on first use.
    fn session_entry(
        &mut self,
        session: SessionId,
        route: &SessionRoute,
    ) -> Result<&mut Offloaded, OffloadError> {
        if !self.sessions.contains_key(&session) {
            let zeros = PerCpuValues::try_from(vec![SessionCounters::default(); self.cpus])
                .map_err(OffloadError::Io)?;
            // A session starts from zero; an id another writer holds is refused.
            match self.counters.insert(session.0, zeros, BPF_NOEXIST) {
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    return Err(OffloadError::Taken("session id"));
                }
                r => r?,
            }
            self.sessions.insert(
                session,
                Offloaded {
                    route: *route,
                    indices: Vec::new(),
                    exit_to_client: false,
                },
            );
        }
        let entry = self.sessions.get_mut(&session).expect("inserted above"); // local invariant
        if entry.route != *route {
            return Err(OffloadError::RouteMismatch(session));
        }
        Ok(entry)
    }
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("interfaces", &self.interfaces)
            .field("maps", &self.maps)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SessionMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionMaps")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        // Detach first, explicitly: nothing may forward once the owner is gone.
        if let Some(program) = self.ebpf.program_mut(PROGRAM) {
            if let Ok(program) = <&mut SchedClassifier>::try_from(program) {
                let _ = program.unload();
            }
        }
    }
}

/// `CLOCK_MONOTONIC` now, the clock of [`Counters::last_seen`].
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC always exists on Linux");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Every Ethernet interface in the calling thread's network namespace (from
/// `/proc/thread-self/net/dev`), in the kernel's order: where client and exit traffic can
/// arrive when the operator names none.
pub fn ethernet_interfaces() -> Vec<String> {
    let Ok(dev) = std::fs::read_to_string("/proc/thread-self/net/dev") else {
        return Vec::new();
    };
    dev.lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .filter(|name| !name.contains('|') && hardware_type(name) == Some(ARPHRD_ETHER))
        .map(str::to_owned)
        .collect()
}

/// Inserts a key that must not exist yet; a key that exists belongs to another session.
fn insert_new<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: K,
    value: V,
    what: &'static str,
) -> Result<(), OffloadError> {
    match map.insert(key, value, BPF_NOEXIST) {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
            Err(OffloadError::Taken(what))
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes a key this process inserted; one already gone is fine.
fn remove_present<K: aya::Pod, V: aya::Pod, M>(map: &mut M, key: &K) -> Result<(), OffloadError>
where
    M: RemoveKey<K, V>,
{
    match map.remove_key(key) {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The `remove` both map types have.
trait RemoveKey<K, V> {
    fn remove_key(&mut self, key: &K) -> Result<(), MapError>;
}

impl<K: aya::Pod, V: aya::Pod> RemoveKey<K, V> for HashMap<MapData, K, V> {
    fn remove_key(&mut self, key: &K) -> Result<(), MapError> {
        self.remove(key)
    }
}

impl<K: aya::Pod, V: aya::Pod> RemoveKey<K, V> for PerCpuHashMap<MapData, K, V> {
    fn remove_key(&mut self, key: &K) -> Result<(), MapError> {
        self.remove(key)
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, Unavailable>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| Unavailable::Load(format!("no map {name} in the object")))?;
    T::try_from(map).map_err(|e| Unavailable::Load(format!("map {name}: {e}")))
}

/// An interface must exist in this thread's namespace, be Ethernet, and forward IPv4.
fn check_interface(name: &str) -> Result<(), Unavailable> {
    match hardware_type(name) {
        Some(ARPHRD_ETHER) => {}
        Some(_) => return Err(Unavailable::NotEthernet(name.to_owned())),
        None => return Err(Unavailable::NoInterface(name.to_owned())),
    }
    // /proc/sys/net follows the network namespace of the thread that opens it.
    let fwd = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
    if let Ok(v) = std::fs::read_to_string(&fwd) {
        if v.trim() == "0" {
            return Err(Unavailable::ForwardingOff(name.to_owned()));
        }
    }
    Ok(())
}

const ARPHRD_ETHER: u16 = 1;

/// The interface's ARPHRD_* type in this thread's network namespace (SIOCGIFHWADDR; sysfs
/// would show the namespace it was mounted in), or `None` if there is no such interface.
fn hardware_type(name: &str) -> Option<u16> {
    const SIOCGIFHWADDR: libc::c_ulong = 0x8927;
    /// `struct ifreq` with the `ifr_hwaddr` member of its union (40 bytes on Linux).
    #[repr(C)]
    struct IfreqHwaddr {
        name: [u8; 16],
        family: libc::sa_family_t,
        data: [u8; 22],
    }
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= 16 || bytes.contains(&0) {
        return None;
    }
    let mut req = IfreqHwaddr {
        name: [0; 16],
        family: 0,
        data: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .ok()?;
    // SAFETY: SIOCGIFHWADDR reads a NUL-terminated name from and writes a sockaddr into a
    // `struct ifreq`, which `req` is laid out as (and large enough for); the socket is open
    // for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            SIOCGIFHWADDR as _,
            &raw mut req,
        )
    };
    (rc == 0).then_some(req.family)
}

/// Capabilities from `/proc/self/status` that the effective set lacks, if any.
fn missing_capabilities() -> Option<String> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    (!missing.is_empty()).then(|| missing.join(" and "))
}

fn seccomp_active() -> bool {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim() != "0")
        })
        .unwrap_or(false)
}

fn refused(call: &'static str, source: io::Error) -> Unavailable {
    Unavailable::Refused {
        call,
        source,
        seccomp: seccomp_active(),
    }
}

fn is_permission(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOSYS)
    )
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The first `io::Error` in an error's source chain.
fn io_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

fn classify(what: &'static str, e: &(dyn std::error::Error + 'static)) -> Unavailable {
    match io_error_in(e) {
        Some(io) if is_permission(io) => refused(what, io::Error::from_raw_os_error(errno(io))),
        _ => Unavailable::Load(format!("{what}: {}", chain(e))),
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_object_declares_the_program_and_maps_this_crate_expects() {
        let obj = aya_obj_parse();
        assert!(
            obj.programs.contains_key(PROGRAM),
            "program {PROGRAM} missing"
        );
        let expect = [
            ("client_to_exit", 16, 16, MAX_CLIENT_INDICES),
            ("exit_to_client", 12, 16, MAX_SESSIONS),
            ("session_counters", 4, 40, MAX_SESSIONS),
            ("verdicts", 4, 8, Verdict::ALL.len()),
            ("scratch", 4, 8192, 1),
        ];
        for (name, key, value, max) in expect {
            let map = obj
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("map {name} missing"));
            assert_eq!(map.key_size() as usize, key, "{name} key size");
            assert_eq!(map.value_size() as usize, value, "{name} value size");
            assert_eq!(map.max_entries() as usize, max, "{name} capacity");
        }
    }

    fn aya_obj_parse() -> aya_obj::Object {
        aya_obj::Object::parse(OBJECT).expect("the committed object parses")
    }

    #[test]
    fn keys_are_in_wire_order() {
        let client: SocketAddrV4 = "10.1.2.3:51820".parse().unwrap();
        let listen: SocketAddrV4 = "10.9.8.7:443".parse().unwrap();
        let k = ClientToExitKey::new(client, listen, 0x1122_3344);
        assert_eq!(k.client_addr, [10, 1, 2, 3]);
        assert_eq!(k.client_port, [0xca, 0x6c]);
        assert_eq!(k.listen_port, [0x01, 0xbb]);
        assert_eq!(k.receiver_index, [0x44, 0x33, 0x22, 0x11]);
    }
}
