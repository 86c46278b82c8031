//! Stock WireGuard: a `wireguard-go` interface in a namespace, configured with `wg`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{log_tail, run, run_with_input, write_private, Daemon, Netns, WG_SOCKET_DIR};

/// wireguard-go refuses to run without this when a kernel module could exist.
const WG_GO_ENV: (&str, &str) = ("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");

/// A WireGuard key pair made by `wg genkey` / `wg pubkey`.
#[derive(Debug, Clone)]
pub struct WgKeys {
    pub private_file: PathBuf,
    /// Base64, as `wg` prints it.
    pub public: String,
}

impl WgKeys {
    /// A new key pair; the private key goes to `dir/<name>.key` (mode 0600).
    pub fn generate(dir: &Path, name: &str) -> Result<WgKeys> {
        let private = run(std::process::Command::new("wg").arg("genkey"))?;
        let public = run_with_input(std::process::Command::new("wg").arg("pubkey"), &private)?;
        let private_file = dir.join(format!("{name}.key"));
        write_private(&private_file, &private)?;
        Ok(WgKeys {
            private_file,
            public: public.trim().to_owned(),
        })
    }

    /// How wireguard-go names this key in its logs: `peer(abcd…wxyz)`.
    pub fn log_name(&self) -> String {
        log_name(&self.public)
    }
}

/// How wireguard-go names the peer with public key `public` (base64) in its logs.
pub fn log_name(public: &str) -> String {
    let k = public.trim_end_matches('=');
    let start: String = k.chars().take(4).collect();
    let end: String = k
        .chars()
        .skip(k.chars().count().saturating_sub(4))
        .collect();
    format!("peer({start}…{end})")
}

/// One wireguard-go interface, named like its namespace, running until dropped.
#[derive(Debug)]
pub struct WgHost {
    pub ns: Arc<Netns>,
    pub ifname: String,
    pub keys: WgKeys,
    /// Its address inside the tunnel.
    pub tunnel_ip: Ipv4Addr,
    /// Its address on the underlay.
    pub underlay_ip: Ipv4Addr,
    pub listen_port: u16,
    process: Option<Daemon>,
    log: PathBuf,
    starts: u32,
}

impl WgHost {
    /// Starts wireguard-go for interface `ifname` in `ns` and gives it its key and port.
    /// Peers, addresses and routes are the caller's.
    pub fn start(
        ns: Arc<Netns>,
        ifname: &str,
        dir: &Path,
        tunnel_ip: Ipv4Addr,
        underlay_ip: Ipv4Addr,
        listen_port: u16,
    ) -> Result<WgHost> {
        let keys = WgKeys::generate(dir, ifname)?;
        let mut host = WgHost {
            ns,
            ifname: ifname.to_owned(),
            keys,
            tunnel_ip,
            underlay_ip,
            listen_port,
            process: None,
            log: dir.join(format!("{ifname}.log")),
            starts: 0,
        };
        host.launch()?;
        Ok(host)
    }

    /// Starts the wireguard-go process and waits for its control socket.
    fn launch(&mut self) -> Result<()> {
        self.starts += 1;
        let socket = Path::new(WG_SOCKET_DIR).join(format!("{}.sock", self.ifname));
        let _ = std::fs::remove_file(&socket);
        std::fs::write(
            &self.log,
            format!("=== interop: wireguard-go start #{}\n", self.starts),
        )
        .ok();
        let daemon = self.ns.spawn(
            &format!("wireguard-go {}", self.ifname),
            "wireguard-go",
            &["-f", &self.ifname],
            &[WG_GO_ENV, ("LOG_LEVEL", "debug")],
            &self.log,
        )?;
        self.process = Some(daemon);
        let end = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > end {
                bail!(
                    "wireguard-go {} did not open {} within 10 s:\n{}",
                    self.ifname,
                    socket.display(),
                    log_tail(&self.log, 20)
                );
            }
            if let Some(p) = self.process.as_mut() {
                if !p.is_running() {
                    bail!(
                        "wireguard-go {} exited:\n{}",
                        self.ifname,
                        log_tail(&self.log, 20)
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let port = self.listen_port.to_string();
        let key = self.keys.private_file.to_string_lossy().into_owned();
        self.wg(&[
            "set",
            &self.ifname,
            "private-key",
            &key,
            "listen-port",
            &port,
        ])?;
        Ok(())
    }

    /// `wg args…` in this host's namespace.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        self.ns.exec("wg", args)
    }

    /// Adds (or updates) a peer: `wg set <if> peer <key> …`.
    pub fn set_peer(
        &self,
        public: &str,
        endpoint: Option<SocketAddr>,
        allowed_ips: &str,
        keepalive: Option<u16>,
    ) -> Result<()> {
        let mut args: Vec<String> = vec![
            "set".into(),
            self.ifname.clone(),
            "peer".into(),
            public.into(),
            "allowed-ips".into(),
            allowed_ips.into(),
        ];
        if let Some(e) = endpoint {
            args.extend(["endpoint".into(), e.to_string()]);
        }
        if let Some(k) = keepalive {
            args.extend(["persistent-keepalive".into(), k.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.wg(&args).map(drop)
    }

    /// Removes a peer; its sessions and timers go with it.
    pub fn remove_peer(&self, public: &str) -> Result<()> {
        self.wg(&["set", &self.ifname, "peer", public, "remove"])
            .map(drop)
    }

    /// Gives the interface its tunnel address (`prefix` bits) and brings it up.
    pub fn up(&self, prefix: u8) -> Result<()> {
        let addr = format!("{}/{prefix}", self.tunnel_ip);
        self.ns.ip(&["addr", "add", &addr, "dev", &self.ifname])?;
        self.ns.ip(&["link", "set", &self.ifname, "up"])?;
        Ok(())
    }

    /// Sets the interface's MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<()> {
        self.ns
            .ip(&["link", "set", &self.ifname, "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// Routes `prefix` into the tunnel.
    pub fn route(&self, prefix: &str) -> Result<()> {
        self.ns
            .ip(&["route", "replace", prefix, "dev", &self.ifname])
            .map(drop)
    }

    /// The interface's whole configuration as `wg showconf` prints it.
    pub fn showconf(&self) -> Result<String> {
        self.wg(&["showconf", &self.ifname])
    }

    /// Stops wireguard-go (the interface, its keys and sessions vanish), starts it again and
    /// loads `config` (as [`WgHost::showconf`] printed it) with `wg setconf`. The caller
    /// restores addresses and routes.
    pub fn restart_with(&mut self, config: &str) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.terminate(Duration::from_secs(3));
        }
        self.launch()?;
        let file = self.log.with_file_name(format!("{}.conf", self.ifname));
        write_private(&file, config)?;
        let file = file.to_string_lossy().into_owned();
        self.wg(&["setconf", &self.ifname, &file]).map(drop)
    }

    /// `wg show <if> latest-handshakes` for `peer`: Unix seconds, or `None` if never.
    pub fn latest_handshake(&self, peer: &str) -> Result<Option<u64>> {
        let out = self.wg(&["show", &self.ifname, "latest-handshakes"])?;
        let secs = field_for_peer(&out, peer)
            .with_context(|| format!("{} has no peer {peer}", self.ifname))?
            .parse::<u64>()
            .context("latest-handshakes is a number")?;
        Ok((secs != 0).then_some(secs))
    }

    /// The endpoint this host sends to for `peer`, if it has one.
    pub fn endpoint_of(&self, peer: &str) -> Result<Option<SocketAddr>> {
        let out = self.wg(&["show", &self.ifname, "endpoints"])?;
        let field = field_for_peer(&out, peer)
            .with_context(|| format!("{} has no peer {peer}", self.ifname))?;
        Ok(field.parse().ok())
    }

    /// Lines of this host's current wireguard-go log (since its last start) that mention
    /// `peer` and contain `what`, e.g. "Sending handshake initiation".
    pub fn log_count(&self, peer: &WgKeys, what: &str) -> usize {
        self.log_count_for(&peer.public, what)
    }

    /// [`WgHost::log_count`] for a peer known only by its public key.
    pub fn log_count_for(&self, peer: &str, what: &str) -> usize {
        let name = log_name(peer);
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&name) && l.contains(what))
            .count()
    }

    /// Lines of this host's current wireguard-go log that contain `what`, whatever peer.
    pub fn log_count_any(&self, what: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }

    /// CPU time this host's wireguard-go has used since its last start, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.process.as_ref().map_or(0.0, Daemon::cpu_seconds)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

/// The second tab-separated field of the line of `wg show` output for `peer`.
fn field_for_peer<'a>(out: &'a str, peer: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        let mut f = l.split('\t');
        (f.next()? == peer).then(|| f.next())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_names_match_wireguard_go() {
        let k = WgKeys {
            private_file: PathBuf::new(),
            public: "YLq+tc7BkCzVYZNL4koVzHpbED5MJLPzyf15geDeq3Q=".into(),
        };
        assert_eq!(k.log_name(), "peer(YLq+…eq3Q)");
    }

    #[test]
    fn wg_show_fields_are_found_by_peer() {
        let out = "A=\t10.0.0.1:1\nB=\t(none)\n";
        assert_eq!(field_for_peer(out, "A="), Some("10.0.0.1:1"));
        assert_eq!(field_for_peer(out, "B="), Some("(none)"));
        assert_eq!(field_for_peer(out, "C="), None);
    }
}
