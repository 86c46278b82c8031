//! Issue 17: the kernel fast path wired into the node, with stock WireGuard at both ends.
//!
//! The interop lab (wireguard-go clients and exits in namespaces, a real `wraithgate`
//! process) with `[relay] fast_path = "auto"`, IPv4 forwarding on in the relay namespace and
//! a short idle timeout, walked through in one run (a lab takes seconds to build):
//!
//! 1. once a client has used its exit's index, its session is offloaded; ping and iperf3
//!    then run through the kernel: the kernel's per-session counters carry the bytes while
//!    the workers' own counters stay (all but) flat, and the kernel's last-seen keeps the
//!    session alive past the idle timeout although userspace sees none of its traffic;
//! 2. transport the program must not forward reaches userspace and is dropped there: an
//!    index the exit never assigned from the client's own address and port (spoofed), and
//!    a transport from another address;
//! 3. a rekey (the client handshakes again through the same session) keeps the session in
//!    the kernel with its new index;
//! 4. idle expiry (client2, quiet since the start), an operator kill and a table swap (its
//!    exit removed) each withdraw the session: the client's traffic stops at once;
//! 5. `kill -9` of the node leaves nothing attached that forwards;
//! 6. started without CAP_BPF and CAP_NET_ADMIN (`setpriv`), `auto` says why in one line
//!    and forwards in userspace.
//!
//! The relay namespace forwards IPv4 (the program's FIB lookup needs it) but drops
//! everything in netfilter's forward hook, as README.md advises: the fast path does not
//! pass that hook.
//!
//! `sudo cargo test -p wraithgate-tests --test fastpath_netns -- --nocapture`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use wraithgate_tests::interop::attack::spoofing_socket;
use wraithgate_tests::interop::relay::{Metrics, SessionView};
use wraithgate_tests::interop::{Lab, LabOptions, Traffic, Via, RELAY_PORT};

/// The relay's idle timeout in this lab: short, so that expiry is seen within seconds,
/// and shorter than the traffic phase, so that the kernel's last-seen must keep the
/// session alive.
const IDLE_SECS: u64 = 6;

fn session_of(lab: &Lab, i: usize) -> Result<Option<SessionView>> {
    let c = lab.client_addr(i);
    Ok(lab.relay.sessions()?.into_iter().find(|s| s.client == c))
}

fn offloaded(s: &SessionView) -> bool {
    s.fast_path.is_some_and(|f| f.offloaded)
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until client `i`'s session is offloaded and returns it.
fn offloaded_session(lab: &Lab, i: usize) -> Result<SessionView> {
    let mut found = None;
    wait_until(Duration::from_secs(5), "session offloaded", || {
        found = session_of(lab, i)?.filter(offloaded);
        Ok(found.is_some())
    })
    .with_context(|| format!("client{}: {:?}", i + 1, session_of(lab, i)))?;
    Ok(found.expect("found above"))
}

/// Userspace's and the kernel's packets towards exits, summed over workers.
fn to_exit_packets(m: &Metrics) -> (u64, u64) {
    (
        m.sum("wraithgate_packets_to_exit_total", &[]),
        m.sum("wraithgate_fastpath_packets_to_exit_total", &[]),
    )
}

/// A WireGuard transport message with receiver index `index`.
fn transport(index: u32) -> Vec<u8> {
    let mut m = vec![0u8; 48];
    m[0] = 4;
    m[4..8].copy_from_slice(&index.to_le_bytes());
    m[8..16].copy_from_slice(&7u64.to_le_bytes());
    m
}

/// Client `i` handshakes anew at its next packet (a peer set afresh), from the same
/// address and port: the relay sees a rekey of the same session.
fn rekey(lab: &Lab, i: usize) -> Result<()> {
    lab.clients[i].remove_peer(&lab.exits[i].keys.public)?;
    lab.point_client(i, i, Via::Relay(RELAY_PORT))?;
    lab.wait_for_tunnel(i, Duration::from_secs(10))?;
    Ok(())
}

fn ping_dead(lab: &Lab, i: usize, what: &str) -> Result<()> {
    let (sent, received) = lab.ping(i, 3)?;
    ensure!(
        received == 0,
        "{what}: client{} still reached the internet ({received}/{sent}): the kernel still \
         forwards a withdrawn session",
        i + 1
    );
    Ok(())
}

#[test]
fn netns_fastpath_offloads_established_sessions_and_withdraws_them() {
    let test = "netns_fastpath_offloads_established_sessions_and_withdraws_them";
    let Some(mut lab) = Lab::start_or_skip_with_options(
        test,
        LabOptions {
            backend: "auto".into(),
            fast_path: true,
            limits: format!("idle_timeout_secs = {IDLE_SECS}"),
            ipv6: false,
        },
    ) else {
        return;
    };
    if let Err(e) = run(&mut lab) {
        panic!("{test} failed: {e:#}\n{}", lab.relay.log_tail(40));
    }
}

fn run(lab: &mut Lab) -> Result<()> {
    // Forwarding is on for the program's FIB lookup; the namespace itself routes nothing
    // (what README.md advises): the program's redirect does not pass the forward hook.
    lab.relay.ns().nft(
        "table inet wgi_relay {\n\tchain forward {\n\t\ttype filter hook forward priority 0; \
         policy drop;\n\t}\n}\n",
    )?;
    let show = lab.relay.wraithctl(&["show"])?;
    ensure!(
        show.contains("sessions in the kernel (on "),
        "wraithctl show does not say the fast path is on:\n{show}"
    );
    let log = std::fs::read_to_string(lab.relay.log_path())?;
    ensure!(
        log.contains("fast path attached"),
        "the fast path did not attach:\n{}",
        lab.relay.log_tail(30)
    );

    // 1. Offloaded once proven; the kernel carries the traffic.
    let s1 = offloaded_session(lab, 0)?;
    ensure!(s1.verified, "offloaded unverified: {s1:?}");
    offloaded_session(lab, 1)?;
    let before = lab.relay.metrics()?;
    let (sent, received) = lab.ping(0, 10)?;
    ensure!(received == sent, "ping {received}/{sent}");
    let iperf = lab.iperf(0, Traffic::Tcp, 3, false)?;
    let probe = lab.probe_for(0, Duration::from_secs(3), Duration::from_millis(100))?;
    ensure!(probe.received() > 0, "probe: {}", probe.summary());
    let after = lab.relay.metrics()?;
    let (user0, kernel0) = to_exit_packets(&before);
    let (user1, kernel1) = to_exit_packets(&after);
    let (user, kernel) = (user1 - user0, kernel1 - kernel0);
    let kernel_bytes = after.sum("wraithgate_fastpath_bytes_to_client_total", &[])
        - before.sum("wraithgate_fastpath_bytes_to_client_total", &[]);
    lab.report(&format!(
        "iperf3 {:.0} Mb/s; to exits: {kernel} packets in the kernel, {user} in userspace; \
         {kernel_bytes} bytes to clients in the kernel",
        iperf.mbps
    ));
    ensure!(kernel >= 10, "the kernel forwarded {kernel} packets");
    // A GSO train whose segments differ in size goes to userspace whole, so a few may.
    ensure!(
        user * 50 <= kernel,
        "userspace forwarded {user} packets against the kernel's {kernel}"
    );
    let s1_after = session_of(lab, 0)?.context("client1's session is gone")?;
    ensure!(
        s1_after.id == s1.id,
        "the session changed ({} -> {}) although its traffic ran in the kernel for more than \
         the idle timeout ({IDLE_SECS} s)",
        s1.id,
        s1_after.id
    );
    let f = s1_after.fast_path.context("no fast_path in the listing")?;
    ensure!(
        f.to_exit.packets >= kernel / 2 && s1_after.to_exit.packets >= f.to_exit.packets,
        "the listing does not carry the kernel's traffic: {s1_after:?}"
    );

    // 2. What the program must not forward reaches userspace and is dropped there.
    let relay = lab.relay_addr_for(0, RELAY_PORT);
    let client = lab.client_addr(0);
    let before = lab.relay.metrics()?;
    lab.attacker.run_in(move || -> Result<()> {
        let spoofed = spoofing_socket(client)?;
        let own = std::net::UdpSocket::bind("0.0.0.0:0")?;
        for n in 0..20u32 {
            spoofed.send_to(&transport(0x5eed_0000 + n), relay)?;
            own.send_to(&transport(0x5eed_0000 + n), relay)?;
        }
        Ok(())
    })?;
    let after = lab.relay.metrics()?;
    let delta = |reason: &str| {
        after.sum("wraithgate_drops_total", &[("reason", reason)])
            - before.sum("wraithgate_drops_total", &[("reason", reason)])
    };
    ensure!(
        delta("unknown_index") >= 20 && delta("unknown_client") >= 20,
        "forged transport did not all reach userspace: unknown_index +{}, unknown_client +{}",
        delta("unknown_index"),
        delta("unknown_client")
    );

    // 3. A rekey keeps the session in the kernel, with its new index.
    let offloads = after.sum("wraithgate_sessions_closed_total", &[]);
    rekey(lab, 0)?;
    let before = lab.relay.metrics()?;
    let (sent, received) = lab.ping(0, 5)?;
    ensure!(received == sent, "after the rekey: ping {received}/{sent}");
    let s = offloaded_session(lab, 0)?;
    ensure!(s.id == s1.id, "the rekey made a new session: {s:?}");
    let (u0, k0) = to_exit_packets(&before);
    // The kernel's counters reach /metrics at the owning worker's next reading of them
    // (a share every housekeeping step): wait for them rather than read once.
    let mut after = lab.relay.metrics()?;
    let read_by = std::time::Instant::now() + Duration::from_secs(5);
    while to_exit_packets(&after).1 - k0 < 5 && std::time::Instant::now() < read_by {
        std::thread::sleep(Duration::from_millis(100));
        after = lab.relay.metrics()?;
    }
    let (u1, k1) = to_exit_packets(&after);
    ensure!(
        k1 - k0 >= 5 && u1 - u0 <= 1,
        "after the rekey: {} packets in the kernel, {} in userspace",
        k1 - k0,
        u1 - u0
    );
    ensure!(
        after.sum("wraithgate_sessions_closed_total", &[]) == offloads,
        "a session closed during the rekey"
    );

    // 4a. Idle expiry: client2 has sent nothing since the lab came up.
    wait_until(
        Duration::from_secs(30),
        "client2's session idles out",
        || Ok(session_of(lab, 1)?.is_none()),
    )?;
    ping_dead(lab, 1, "after idle expiry")?;

    // 4b. Operator kill.
    let id = session_of(lab, 0)?.context("client1's session")?.id;
    lab.relay.wraithctl(&["sessions", "kill", &id])?;
    ping_dead(lab, 0, "after a kill")?;
    rekey(lab, 0)?;
    offloaded_session(lab, 0)?;

    // 4c. Table swap: client1's exit removed.
    let exit1 = lab.exits[0].keys.public.clone();
    lab.relay.remove_exit(&exit1)?;
    wait_until(Duration::from_secs(5), "client1's session closed", || {
        Ok(session_of(lab, 0)?.is_none())
    })?;
    ping_dead(lab, 0, "after its exit was removed")?;
    let m = lab.relay.metrics()?;
    ensure!(
        m.sum("wraithgate_fastpath_sessions", &[]) == 0,
        "sessions left in the kernel"
    );

    // 5. kill -9: nothing attached forwards.
    let endpoint: SocketAddr = lab.exit_endpoint(0);
    lab.relay.add_exit("exit1", &exit1, endpoint, None)?;
    rekey(lab, 0)?;
    offloaded_session(lab, 0)?;
    lab.relay.kill9()?;
    ping_dead(lab, 0, "after kill -9 of the node")?;
    if wraithgate_tests::netns::find_in_path("bpftool").is_some() {
        for dev in ["c1", "x1"] {
            let shown = lab
                .relay
                .ns()
                .exec("bpftool", &["net", "show", "dev", dev])?;
            ensure!(
                !shown.contains("doublehop"),
                "still attached to {dev} after kill -9:\n{shown}"
            );
        }
    }

    // 6. Without CAP_BPF and CAP_NET_ADMIN, `auto` says why and forwards in userspace.
    lab.relay.set_wrapper(&[
        "setpriv",
        "--bounding-set=-bpf,-net_admin,-sys_admin",
        "--inh-caps=-bpf,-net_admin,-sys_admin",
        "--",
    ]);
    lab.relay.launch(true)?;
    rekey(lab, 0)?;
    let (sent, received) = lab.ping(0, 3)?;
    ensure!(
        received == sent,
        "without capabilities: ping {received}/{sent}"
    );
    let log = std::fs::read_to_string(lab.relay.log_path())?;
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fast path off"))
        .collect();
    ensure!(
        why.len() == 1 && why[0].contains("CAP_BPF"),
        "expected one line saying why the fast path is off:\n{}",
        lab.relay.log_tail(30)
    );
    lab.report(&format!("without capabilities: {}", why[0].trim()));
    let show = lab.relay.wraithctl(&["show"])?;
    ensure!(
        show.contains("fast path") && show.contains("off: needs CAP_BPF"),
        "wraithctl show does not say why:\n{show}"
    );
    let m = lab.relay.metrics()?;
    ensure!(m.sum("wraithgate_fastpath_attached", &[]) == 0);
    ensure!(m.sum("wraithgate_packets_to_exit_total", &[]) >= 3);
    lab.check_processes()?;
    Ok(())
}
