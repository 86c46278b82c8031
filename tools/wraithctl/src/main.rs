//! `wraithctl`: the operator's command line for a WraithGate node, in the spirit of `wg`.
//!
//! Every command is one or a few calls to the node's operator API (`/v1/…`),
//! with the bearer token read from the node's token file. Text output is for people;
//! `--json` prints the API's JSON for programs.

// The doc comments here are the command's --help, where `[section] key` names a setting
// of the configuration file, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

mod client;
mod client_config;
mod model;
mod render;
mod unix;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use client::{Client, Endpoint, Failure, FailureKind};
use model::{Config, Exit, Key, NodeInfo, Peer, Session, Stats, Traffic};
use render::Block;

const AFTER_HELP: &str = "\
Environment: WRAITHCTL_URL, WRAITHCTL_SOCKET and WRAITHCTL_TOKEN_FILE stand for --url, \
--socket and --token-file.

Exit status: 0 done; 1 the node refused the request or the input is unusable; 2 bad \
usage; 3 the node cannot be reached; 4 the token file is unreadable or the node refused \
the token (401/403); 5 `config apply` was based on a generation that is no longer current \
(412).";

/// Drive a WraithGate relay node through its operator API.
///
/// The node serves the API on 127.0.0.1:7070 by default (and on a Unix socket if its
/// configuration sets [control] api_socket). Every call but liveness needs the bearer
/// token that the node writes, readable by root only, to <state_dir>/api.token on its
/// first start: run wraithctl as root, or point --token-file at a copy you may read.
#[derive(Debug, Parser)]
#[command(name = "wraithctl", version, about, long_about, after_help = AFTER_HELP)]
struct Cli {
    /// The node's API (a bare host:port means http://host:port).
    #[arg(
        long,
        env = "WRAITHCTL_URL",
        default_value = "http://127.0.0.1:7070",
        global = true,
        value_name = "URL"
    )]
    url: String,
    /// With an https:// --url: the certificate the node must present (PEM), e.g. a copy of
    /// its own <state_dir>/api.crt (which pins that certificate), or the CA that signed it.
    #[arg(long, env = "WRAITHCTL_CA_FILE", global = true, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// Talk to the node over this Unix socket ([control] api_socket) instead of --url.
    #[arg(long, env = "WRAITHCTL_SOCKET", global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The node's API token file.
    #[arg(
        long,
        env = "WRAITHCTL_TOKEN_FILE",
        default_value = "/var/lib/wraithgate/api.token",
        global = true,
        value_name = "PATH"
    )]
    token_file: PathBuf,
    /// Print JSON for programs instead of text for people (errors too, on stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Give up on the node after this many seconds.
    #[arg(long, default_value_t = 30.0, global = true, value_name = "SECS")]
    timeout: f64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Summarise the node, like `wg show`: backend, generation, traffic, and each exit
    /// with its sessions and traffic, then the provisioned peers.
    Show,
    /// The exits: WireGuard servers that clients reach through this relay.
    #[command(subcommand)]
    Exit(ExitCmd),
    /// Provisioned peers (Z-HOP): clients whose outer tunnel ends at this node.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// List the live sessions (`sessions kill ID` closes one).
    Sessions {
        /// Only the session behind this exit-facing port: the client an exit's abuse
        /// report means when it names the relay's address and this port (live sessions
        /// only; nothing is kept after a session ends).
        #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        exit_port: Option<u16>,
        #[command(subcommand)]
        cmd: Option<SessionsCmd>,
    },
    /// The node's whole desired state (exits and peers) with its generation.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `wraithctl completions bash > /etc/bash_completion.d/wraithctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or with --out-dir write one page per command there.
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ExitCmd {
    /// List the exits.
    #[command(visible_alias = "list")]
    Ls,
    /// Add an exit.
    Add {
        /// A name for people (1 to 64 characters, unique on the node).
        name: String,
        /// The exit's WireGuard public key, as `wg pubkey` prints it.
        #[arg(long, value_name = "KEY")]
        public_key: Key,
        /// The exit's address, ip:port ([v6]:port), or host:port (the node resolves it when
        /// it applies the change, and keeps the address).
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: String,
        /// Pin a relay listen port to this exit: every initiation on it goes there.
        #[arg(long, value_name = "PORT")]
        listen_port: Option<u16>,
    },
    /// Change one exit, by public key or by name; a new endpoint ends its sessions (the
    /// answer says how many).
    Set {
        /// The exit's public key (base64 or base64url) or its name.
        exit: String,
        /// A new name.
        #[arg(long)]
        name: Option<String>,
        /// A new address, ip:port ([v6]:port) or host:port (resolved by the node).
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: Option<String>,
        /// Pin this relay listen port to the exit.
        #[arg(long, value_name = "PORT", conflicts_with = "unpin")]
        listen_port: Option<u16>,
        /// Unpin the exit's listen port (it is then found by mac1 only).
        #[arg(long)]
        unpin: bool,
    },
    /// Remove an exit, by public key or by name; its sessions end.
    #[command(visible_alias = "remove")]
    Rm {
        /// The exit's public key (base64 or base64url) or its name.
        exit: String,
    },
}

#[derive(Debug, Subcommand)]
enum PeerCmd {
    /// List the peers (preshared keys are never shown).
    #[command(visible_alias = "list")]
    Ls,
    /// Provision a peer.
    Add {
        /// The peer's WireGuard public key, as `wg pubkey` prints it.
        public_key: Key,
        /// Inner source addresses the peer may use (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', required = true, value_name = "CIDR")]
        allowed_ips: Vec<String>,
        /// A name for people (at most 64 characters).
        #[arg(long)]
        name: Option<String>,
        /// Read the preshared key from this file ("-" for stdin), as `wg set` does.
        #[arg(long, value_name = "FILE")]
        preshared_key_file: Option<PathBuf>,
        /// An exit the peer may reach, by public key or name (repeat for several).
        #[arg(long = "exit", value_name = "EXIT")]
        exits: Vec<String>,
        /// Exit role: the peer's own endpoint (`ip:port` or `host:port`, resolved by the
        /// node), to which the node initiates as a WireGuard client does.
        #[arg(long = "peer-endpoint", value_name = "HOST:PORT")]
        peer_endpoint: Option<String>,
        /// Seconds between keepalives the node sends when otherwise silent.
        #[arg(long, value_name = "SECONDS")]
        persistent_keepalive: Option<u16>,
        /// Then print the client's WireGuard configurations, as `peer config` does.
        #[arg(long)]
        client_config: bool,
        #[command(flatten)]
        config: ClientConfigArgs,
    },
    /// Print the WireGuard configurations a Z-HOP client needs: the outer tunnel to this
    /// node and one inner tunnel per exit it may reach, for wg-quick. Private keys (the
    /// node holds none of the client's) and its address at each exit are `<…>`
    /// placeholders to fill in.
    Config {
        /// The peer's public key (base64 or base64url).
        public_key: Key,
        #[command(flatten)]
        config: ClientConfigArgs,
    },
    /// Remove a peer.
    #[command(visible_alias = "remove")]
    Rm {
        /// The peer's public key (base64 or base64url).
        public_key: Key,
    },
}

#[derive(Debug, clap::Args)]
struct ClientConfigArgs {
    /// Where clients reach this node, HOST:PORT (default: the node's first listen address
    /// that names a host; a placeholder when it listens on every address).
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// Write each configuration to a file of its own in DIR (zhop-outer.conf,
    /// zhop-exit1.conf, …; mode 0600) instead of printing them.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum SessionsCmd {
    /// List the live sessions (the default).
    #[command(visible_alias = "list")]
    Ls,
    /// Close a session; the client's next handshake opens a new one.
    Kill {
        /// The session's id (worker.index.generation), as `wraithctl sessions` lists it.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Print the whole desired state as JSON, with its generation: save it, edit it,
    /// then `config apply` it.
    Get,
    /// Replace the whole desired state with FILE, atomically.
    ///
    /// The change is conditional (If-Match): it applies only if the node is still at the
    /// generation FILE was fetched at (its "generation" field), so a change made by
    /// someone else in between is never silently overwritten.
    Apply {
        /// The JSON state, as `config get` prints it ("-" for stdin).
        file: PathBuf,
        /// Apply only if the node is at this generation (instead of FILE's own).
        #[arg(long, conflicts_with = "force", value_name = "N")]
        generation: Option<u64>,
        /// Apply whatever generation the node is at now, overwriting any change made
        /// since FILE was fetched.
        #[arg(long)]
        force: bool,
        /// Check FILE against the node and print what applying it would change, changing
        /// nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    if let Err(e) = run(cli) {
        let failure = e.downcast_ref::<Failure>();
        let code = failure.map_or(1, |f| f.kind.exit_code());
        if json {
            let report = json!({
                "error": format!("{e:#}"),
                "kind": failure.map_or("error", |f| f.kind.as_str()),
                "status": failure.and_then(|f| f.status),
            });
            eprintln!("{report}");
        } else {
            eprintln!("wraithctl: {e:#}");
        }
        std::process::exit(code);
    }
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "wraithctl", &mut script);
            write_stdout(&script);
            return Ok(());
        }
        Cmd::Man { out_dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            return match out_dir {
                Some(dir) => {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    clap_mangen::generate_to(cmd, dir)
                        .with_context(|| format!("writing manual pages to {}", dir.display()))
                }
                None => {
                    let mut page = Vec::new();
                    clap_mangen::Man::new(cmd).render(&mut page)?;
                    write_stdout(&page);
                    Ok(())
                }
            };
        }
        _ => {}
    }
    if !(cli.timeout > 0.0 && cli.timeout <= 86_400.0) {
        bail!("--timeout must be between 0 and 86400 seconds");
    }
    let endpoint = match &cli.socket {
        Some(path) => Endpoint::Unix(path.clone()),
        None => Endpoint::from_url(&cli.url)?,
    };
    let client = Client::new(
        endpoint,
        &cli.token_file,
        Duration::from_secs_f64(cli.timeout),
        cli.ca_file.as_deref(),
    )?;
    let out = Output { json: cli.json };
    match cli.command {
        Cmd::Show => show(&client, out),
        Cmd::Exit(cmd) => exit_cmd(&client, out, cmd),
        Cmd::Peer(cmd) => peer_cmd(&client, out, cmd),
        Cmd::Sessions { exit_port, cmd } => {
            sessions_cmd(&client, out, cmd.unwrap_or(SessionsCmd::Ls), exit_port)
        }
        Cmd::Config(cmd) => config_cmd(&client, out, cmd),
        Cmd::Completions { .. } | Cmd::Man { .. } => unreachable!("answered above, offline"),
    }
}

/// Writes `bytes` to standard output. A reader that has gone away (`wraithctl … | head`,
/// `| grep -q`) has all it wanted: that ends the process quietly with status 0 instead of
/// the panic `print!` gives on a closed pipe; any other write error is reported.
fn write_stdout(bytes: &[u8]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("wraithctl: writing to standard output: {e}");
            std::process::exit(1);
        }
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    /// Prints `value` as JSON, or `text` for people.
    fn emit(self, value: &Value, text: impl FnOnce() -> String) {
        if self.json {
            write_stdout(format!("{value}\n").as_bytes());
        } else {
            write_stdout(text().as_bytes());
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: &Value, what: &str) -> Result<T> {
    serde_json::from_value(v.clone())
        .with_context(|| format!("the node's {what} is not what wraithctl expects"))
}

fn exits(client: &Client) -> Result<(Value, Vec<Exit>)> {
    let v = client.get("/v1/exits")?.json()?;
    let list = parse(&v, "exit list")?;
    Ok((v, list))
}

/// A key as given, or the key of the exit with that name.
fn resolve_exit(given: &str, known: &mut Option<Vec<Exit>>, client: &Client) -> Result<Key> {
    if let Ok(k) = given.parse::<Key>() {
        return Ok(k);
    }
    if known.is_none() {
        *known = Some(exits(client)?.1);
    }
    let list = known.as_deref().unwrap_or_default();
    let found = list.iter().find(|e| e.name == given).ok_or_else(|| {
        Failure::new(
            FailureKind::Refused,
            format!("no exit is named {given:?}, and it is not a public key either (see `wraithctl exit ls`)"),
        )
    })?;
    found
        .public_key
        .parse()
        .map_err(|e: String| anyhow::anyhow!("the node listed exit {given:?} with {e}"))
}

fn exit_cmd(client: &Client, out: Output, cmd: ExitCmd) -> Result<()> {
    match cmd {
        ExitCmd::Ls => {
            let (v, list) = exits(client)?;
            out.emit(&v, || exit_table(&list));
        }
        ExitCmd::Add {
            name,
            public_key,
            endpoint,
            listen_port,
        } => {
            let mut body = json!({
                "name": name,
                "public_key": public_key.to_string(),
                "endpoint": endpoint.to_string(),
            });
            if let Some(p) = listen_port {
                body["listen_port"] = json!(p);
            }
            let v = client.post_json("/v1/exits", &body)?.json()?;
            out.emit(&v, || {
                let pinned = listen_port.map_or(String::new(), |p| format!(", listen port {p}"));
                format!("added exit {name} ({public_key}) at {endpoint}{pinned}\n")
            });
        }
        ExitCmd::Set {
            exit,
            name,
            endpoint,
            listen_port,
            unpin,
        } => {
            let key = resolve_exit(&exit, &mut None, client)?;
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(e) = endpoint {
                body["endpoint"] = json!(e.to_string());
            }
            if let Some(p) = listen_port {
                body["listen_port"] = json!(p);
            }
            if unpin {
                body["listen_port"] = Value::Null;
            }
            if body.as_object().is_some_and(|o| o.is_empty()) {
                bail!("nothing to change: give --name, --endpoint, --listen-port or --unpin");
            }
            let v = client
                .patch_json(&format!("/v1/exits/{}", key.path_segment()), &body)?
                .json()?;
            out.emit(&v, || match describe_change(&v) {
                Some(lines) => format!("changed exit {key}:\n{lines}\n"),
                None => format!("exit {key} is so already: nothing changed\n"),
            });
        }
        ExitCmd::Rm { exit } => {
            let key = resolve_exit(&exit, &mut None, client)?;
            client.delete(&format!("/v1/exits/{}", key.path_segment()))?;
            out.emit(&json!({"removed": key.to_string()}), || {
                format!("removed exit {key}\n")
            });
        }
    }
    Ok(())
}

fn exit_table(list: &[Exit]) -> String {
    if list.is_empty() {
        return "no exits\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.public_key.clone(),
                e.endpoint.clone(),
                e.listen_port.map_or("-".into(), |p| p.to_string()),
            ]
        })
        .collect();
    render::table(&["NAME", "PUBLIC KEY", "ENDPOINT", "LISTEN PORT"], &rows)
}

fn peer_cmd(client: &Client, out: Output, cmd: PeerCmd) -> Result<()> {
    match cmd {
        PeerCmd::Ls => {
            let v = client.get("/v1/peers")?.json()?;
            let peers: Vec<Peer> = parse(&v, "peer list")?;
            let names = if peers.iter().any(|p| !p.allowed_exits.is_empty()) {
                exit_names(&exits(client)?.1)
            } else {
                BTreeMap::new()
            };
            out.emit(&v, || peer_table(&peers, &names));
        }
        PeerCmd::Add {
            public_key,
            allowed_ips,
            name,
            preshared_key_file,
            exits: given_exits,
            peer_endpoint,
            persistent_keepalive,
            client_config,
            config,
        } => {
            let mut known = None;
            let allowed_exits = given_exits
                .iter()
                .map(|e| resolve_exit(e, &mut known, client).map(|k| k.to_string()))
                .collect::<Result<Vec<_>>>()?;
            let mut body = json!({
                "public_key": public_key.to_string(),
                "allowed_ips": allowed_ips,
                "allowed_exits": allowed_exits,
            });
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(path) = preshared_key_file {
                body["preshared_key"] = json!(read_preshared_key(&path)?.to_string());
            }
            if let Some(e) = peer_endpoint {
                body["endpoint"] = json!(e);
            }
            if let Some(k) = persistent_keepalive {
                body["persistent_keepalive"] = json!(k);
            }
            let v = client.post_json("/v1/peers", &body)?.json()?;
            if client_config {
                eprintln!("added peer {public_key}");
                print_client_config(client, out, &public_key, &config)?;
            } else {
                out.emit(&v, || format!("added peer {public_key}\n"));
            }
        }
        PeerCmd::Config { public_key, config } => {
            print_client_config(client, out, &public_key, &config)?;
        }
        PeerCmd::Rm { public_key } => {
            client.delete(&format!("/v1/peers/{}", public_key.path_segment()))?;
            out.emit(&json!({"removed": public_key.to_string()}), || {
                format!("removed peer {public_key}\n")
            });
        }
    }
    Ok(())
}

fn print_client_config(
    client: &Client,
    out: Output,
    key: &Key,
    args: &ClientConfigArgs,
) -> Result<()> {
    let node: NodeInfo = parse(&client.get("/v1/node")?.json()?, "node")?;
    let peers: Vec<Peer> = parse(&client.get("/v1/peers")?.json()?, "peer list")?;
    let wanted = key.to_string();
    let peer = peers
        .iter()
        .find(|p| p.public_key == wanted)
        .ok_or_else(|| {
            Failure::new(
                FailureKind::Refused,
                format!("no peer {wanted} on this node (see `wraithctl peer ls`)"),
            )
        })?;
    let (_, exits) = exits(client)?;
    let endpoint = args
        .endpoint
        .clone()
        .unwrap_or_else(|| client_config::node_endpoint(&node.listen));
    let files = client_config::render(&node.public_key, &endpoint, peer, &exits)
        .map_err(|e| Failure::new(FailureKind::Refused, e.to_string()))?;
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in &files {
            let path = dir.join(&f.file);
            write_private(&path, &f.text)?;
        }
        let names: Vec<String> = files
            .iter()
            .map(|f| dir.join(&f.file).display().to_string())
            .collect();
        out.emit(&json!({ "written": names }), || {
            let mut s = String::new();
            for n in &names {
                s.push_str(&format!("wrote {n}\n"));
            }
            s.push_str("fill in each <…>, then: wg-quick up zhop-outer.conf, and one inner\n");
            s
        });
        return Ok(());
    }
    let value = json!({
        "outer": files[0].text,
        "inner": files[1..]
            .iter()
            .map(|f| json!({"exit": f.exit, "file": f.file, "config": f.text}))
            .collect::<Vec<_>>(),
    });
    out.emit(&value, || {
        files
            .iter()
            .map(|f| format!("# ---- {} ----\n{}", f.file, f.text))
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// Writes `text` to `path`, readable by its owner only (it will hold private keys).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn read_preshared_key(path: &Path) -> Result<Key> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the preshared key from stdin")?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the preshared key from {}", path.display()))?
    };
    text.trim().parse().map_err(|e: String| {
        anyhow::anyhow!(
            "{}: {}",
            path.display(),
            e.replace("WireGuard key", "preshared key")
        )
    })
}

fn exit_names(list: &[Exit]) -> BTreeMap<String, String> {
    list.iter()
        .map(|e| (e.public_key.clone(), e.name.clone()))
        .collect()
}

fn peer_table(peers: &[Peer], exit_names: &BTreeMap<String, String>) -> String {
    if peers.is_empty() {
        return "no peers\n".into();
    }
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let exits: Vec<&str> = p
                .allowed_exits
                .iter()
                .map(|k| exit_names.get(k).map_or(k.as_str(), String::as_str))
                .collect();
            vec![
                p.public_key.clone(),
                if p.name.is_empty() {
                    "-".into()
                } else {
                    p.name.clone()
                },
                p.allowed_ips.join(","),
                if exits.is_empty() {
                    "-".into()
                } else {
                    exits.join(",")
                },
            ]
        })
        .collect();
    render::table(&["PUBLIC KEY", "NAME", "ALLOWED IPS", "EXITS"], &rows)
}

fn sessions_cmd(
    client: &Client,
    out: Output,
    cmd: SessionsCmd,
    exit_port: Option<u16>,
) -> Result<()> {
    match cmd {
        SessionsCmd::Ls => {
            let path = match exit_port {
                Some(p) => format!("/v1/sessions?exit_port={p}"),
                None => "/v1/sessions".into(),
            };
            let v = client.get(&path)?.json()?;
            let list: Vec<Session> = parse(&v, "session list")?;
            out.emit(&v, || match exit_port {
                Some(p) if list.is_empty() => format!("no live session on exit port {p}\n"),
                _ => session_table(&list),
            });
        }
        SessionsCmd::Kill { .. } if exit_port.is_some() => {
            bail!("--exit-port selects sessions to list; `sessions kill` takes a session id")
        }
        SessionsCmd::Kill { id } => {
            let valid = id.split('.').count() == 3
                && id
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if !valid {
                bail!("{id:?} is not a session id: ids look like 0.12.3 (worker.index.generation), as `wraithctl sessions` lists them");
            }
            client.delete(&format!("/v1/sessions/{id}"))?;
            out.emit(&json!({"closed": id}), || format!("closed session {id}\n"));
        }
    }
    Ok(())
}

fn session_table(list: &[Session]) -> String {
    if list.is_empty() {
        return "no sessions\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.client.clone(),
                if s.exit.is_empty() {
                    s.exit_key.clone()
                } else {
                    s.exit.clone()
                },
                if s.established {
                    "established"
                } else {
                    "pending"
                }
                .into(),
                s.exit_port.map_or_else(|| "-".into(), |p| p.to_string()),
                s.handshakes.to_string(),
                handshake_age(s.latest_handshake),
                render::bytes(s.to_exit.bytes),
                render::bytes(s.to_client.bytes),
                render::short_duration(s.age_secs),
                render::short_duration(s.idle_secs),
            ]
        })
        .collect();
    render::table(
        &[
            "ID",
            "CLIENT",
            "EXIT",
            "STATE",
            "EXIT PORT",
            "HANDSHAKES",
            "LATEST",
            "TO EXIT",
            "TO CLIENT",
            "AGE",
            "IDLE",
        ],
        &rows,
    )
}

/// How long ago a Unix time was, for a table cell (`-` for none).
fn handshake_age(at: Option<u64>) -> String {
    let Some(at) = at else { return "-".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{} ago",
        render::short_duration(now.saturating_sub(at) as f64)
    )
}

fn config_cmd(client: &Client, out: Output, cmd: ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Get => {
            let v = client.get("/v1/config")?.json()?;
            // For people, indented: the state is for reading, editing and re-applying.
            let pretty = serde_json::to_string_pretty(&v)?;
            out.emit(&v, || format!("{pretty}\n"));
        }
        ConfigCmd::Apply {
            file,
            generation,
            force,
            dry_run,
        } => {
            let shown = if file == Path::new("-") {
                "stdin".to_owned()
            } else {
                file.display().to_string()
            };
            let text = if file == Path::new("-") {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the state from stdin")?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {shown}"))?
            };
            let doc: Value = serde_json::from_str(&text).with_context(|| {
                format!("{shown} is not JSON (fetch a valid state with `wraithctl config get`)")
            })?;
            if !doc.is_object() {
                bail!("{shown} must hold one JSON object with \"exits\" and \"peers\", as `wraithctl config get` prints");
            }
            let (base, source) = match (generation, force) {
                (Some(g), _) => (g, "--generation".to_owned()),
                (None, true) => {
                    let reply = client.get("/v1/config")?;
                    // The ETag is the generation; the body says it too.
                    let current = match reply.etag.as_deref().and_then(|t| t.parse().ok()) {
                        Some(g) => g,
                        None => parse::<Config>(&reply.json()?, "state")?.generation,
                    };
                    (current, "the node, just now (--force)".to_owned())
                }
                (None, false) => match doc.get("generation").and_then(Value::as_u64) {
                    Some(g) => (g, shown.clone()),
                    None => bail!(
                        "{shown} has no \"generation\": pass --generation N (the generation your edit is based on, from `wraithctl config get`), or --force to replace whatever the node has now"
                    ),
                },
            };
            let path = if dry_run {
                "/v1/config?dry_run=true"
            } else {
                "/v1/config"
            };
            let reply = client
                .put_json(path, text.as_bytes(), base)
                .map_err(|f| stale_hint(f, base, &source))?;
            if dry_run {
                let v = reply.json()?;
                out.emit(&v, || match describe_change(&v) {
                    Some(lines) => format!(
                        "dry run, nothing applied: {shown} would change generation {base}:\n{lines}\n"
                    ),
                    None => format!(
                        "dry run, nothing applied: {shown} is the state in use already\n"
                    ),
                });
                return Ok(());
            }
            // The node answers with a summary: the new generation and how many of each.
            let v = reply.json()?;
            let number = |field: &str| {
                v.get(field)
                    .and_then(|x| x.as_u64().or_else(|| x.as_array().map(|a| a.len() as u64)))
                    .unwrap_or(0) as usize
            };
            let generation = v.get("generation").and_then(Value::as_u64).unwrap_or(0);
            let changed = v.get("changed").and_then(Value::as_bool).unwrap_or(true);
            out.emit(&v, || {
                if !changed {
                    return format!(
                        "{shown} is the state in use already: nothing applied, generation stays {generation}\n"
                    );
                }
                format!(
                    "applied {shown}: generation {base} -> {generation} ({}, {}):\n{}\n",
                    count(number("exits"), "exit"),
                    count(number("peers"), "peer"),
                    describe_change(&v).unwrap_or_default()
                )
            });
        }
    }
    Ok(())
}

/// The `changes` and `sessions_closed` of a change's answer, one indented line per kind
/// of change, e.g. `  exits changed: b (endpoint 192.0.2.2:51820 -> 192.0.2.3:51820)`;
/// `None` when nothing changed.
fn describe_change(v: &Value) -> Option<String> {
    let mut lines = Vec::new();
    for (field, what) in [
        ("exits_added", "exits added"),
        ("exits_removed", "exits removed"),
        ("exits_changed", "exits changed"),
        ("peers_added", "peers added"),
        ("peers_removed", "peers removed"),
        ("peers_changed", "peers changed"),
    ] {
        let items: Vec<&str> = v["changes"][field]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !items.is_empty() {
            lines.push(format!("  {what}: {}", items.join(", ")));
        }
    }
    for c in v["sessions_closed"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  sessions closed: {} of exit {}",
            c["sessions"].as_u64().unwrap_or(0),
            c["exit"].as_str().unwrap_or("?")
        ));
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

fn stale_hint(mut f: Failure, base: u64, source: &str) -> Failure {
    if f.kind == FailureKind::Stale {
        f.message = format!(
            "not applied: {} — the edit was based on generation {base} (from {source}) and the node's state has changed since; run `wraithctl config get` again, redo the edit on that and apply it, or pass --force to overwrite the node's current state",
            f.message
        );
    }
    f
}

/// `1 exit`, `2 exits`.
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Everything `show` prints, gathered from four calls.
#[derive(Debug)]
struct Summary {
    node: NodeInfo,
    config: Config,
    /// `GET /v1/peers`: the peers with their live state.
    peers: Vec<Peer>,
    peers_json: Value,
    config_json: Value,
    sessions: Vec<Session>,
    stats: Stats,
}

fn show(client: &Client, out: Output) -> Result<()> {
    let node: NodeInfo = parse(&client.get("/v1/node")?.json()?, "node description")?;
    let config_json = client.get("/v1/config")?.json()?;
    let config: Config = parse(&config_json, "state")?;
    let sessions: Vec<Session> = parse(&client.get("/v1/sessions")?.json()?, "session list")?;
    let stats: Stats = parse(&client.get("/v1/stats")?.json()?, "node counters")?;
    let peers_json = client.get("/v1/peers")?.json()?;
    let peers: Vec<Peer> = parse(&peers_json, "peer list")?;
    let s = Summary {
        node,
        config,
        peers,
        peers_json,
        config_json,
        sessions,
        stats,
    };
    out.emit(&summary_json(client, &s), || summary_text(client, &s));
    Ok(())
}

/// Live sessions of one exit: count, established, traffic, most recent activity.
#[derive(Debug, Default)]
struct ExitLoad {
    sessions: u64,
    established: u64,
    to_exit: Traffic,
    to_client: Traffic,
    idle_secs: Option<f64>,
}

fn load_by_exit(sessions: &[Session]) -> BTreeMap<&str, ExitLoad> {
    let mut m: BTreeMap<&str, ExitLoad> = BTreeMap::new();
    for s in sessions {
        let l = m.entry(s.exit_key.as_str()).or_default();
        l.sessions += 1;
        l.established += u64::from(s.established);
        l.to_exit += s.to_exit;
        l.to_client += s.to_client;
        l.idle_secs = Some(l.idle_secs.map_or(s.idle_secs, |i| i.min(s.idle_secs)));
    }
    m
}

/// Node totals since start, from `/v1/stats`; drops only the reasons that happened.
#[derive(Debug)]
struct Totals {
    sessions: u64,
    pending: u64,
    /// Both paths.
    to_exit: Traffic,
    to_client: Traffic,
    /// What of them the kernel fast path forwarded.
    fast_to_exit: Traffic,
    fast_to_client: Traffic,
    client_handshakes: u64,
    exit_handshakes: u64,
    drops: BTreeMap<String, u64>,
}

fn totals(m: &Stats) -> Totals {
    let fast_to_exit = m.fast_path_to_exit;
    let fast_to_client = m.fast_path_to_client;
    let mut t = Totals {
        sessions: m.sessions,
        pending: m.sessions_pending,
        to_exit: m.to_exit,
        to_client: m.to_client,
        client_handshakes: m.client_handshakes,
        exit_handshakes: m.exit_handshakes,
        drops: m
            .drops
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (r.clone(), *n))
            .collect(),
        fast_to_exit,
        fast_to_client,
    };
    t.to_exit += fast_to_exit;
    t.to_client += fast_to_client;
    t
}

fn summary_json(client: &Client, s: &Summary) -> Value {
    let t = totals(&s.stats);
    let load = load_by_exit(&s.sessions);
    let exits: Vec<Value> = s
        .config_json
        .get("exits")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let key = e.get("public_key").and_then(Value::as_str).unwrap_or("");
            let l = load.get(key);
            let mut e = e.clone();
            e["sessions"] = json!(l.map_or(0, |l| l.sessions));
            e["established"] = json!(l.map_or(0, |l| l.established));
            e["to_exit"] = json!(l.map(|l| l.to_exit).unwrap_or_default());
            e["to_client"] = json!(l.map(|l| l.to_client).unwrap_or_default());
            e["idle_secs"] = json!(l.and_then(|l| l.idle_secs));
            e
        })
        .collect();
    let n = &s.node;
    json!({
        "url": client.endpoint().to_string(),
        "public_key": n.public_key,
        "listen": n.listen,
        "version": n.version,
        "backend": n.backend,
        "workers": n.workers,
        "uptime_secs": n.uptime_secs,
        "generation": s.config.generation,
        "zhop_peers": n.zhop_peers,
        "sessions": t.sessions,
        "sessions_pending": t.pending,
        "to_exit": t.to_exit,
        "to_client": t.to_client,
        "fast_path": n.fast_path.as_ref().map(|f| json!({
            "interfaces": f.interfaces,
            "offloaded": f.offloaded,
            "to_exit": t.fast_to_exit,
            "to_client": t.fast_to_client,
        })),
        "fast_path_refused": n.fast_path_refused,
        "client_handshakes": t.client_handshakes,
        "exit_handshakes": t.exit_handshakes,
        "drops": t.drops,
        "exits": exits,
        "peers": s.peers_json,
    })
}

fn summary_text(client: &Client, s: &Summary) -> String {
    let t = totals(&s.stats);
    let load = load_by_exit(&s.sessions);
    let mut text = String::new();
    let n = &s.node;
    let mut node = Block::new("node", &client.endpoint().to_string());
    node.field("public key", &n.public_key)
        .field("listening", n.listen.join(", "))
        .field("version", &n.version)
        .field("backend", &n.backend)
        .field("workers", n.workers)
        .field("uptime", render::duration(n.uptime_secs as f64))
        .field("generation", s.config.generation)
        .field(
            "sessions",
            format!("{} ({} pending)", t.sessions, t.pending),
        )
        .field(
            "handshakes",
            format!(
                "{} from clients, {} from exits",
                t.client_handshakes, t.exit_handshakes
            ),
        )
        .field(
            "transfer",
            format!(
                "{} to exits ({} packets), {} to clients ({} packets)",
                render::bytes(t.to_exit.bytes),
                t.to_exit.packets,
                render::bytes(t.to_client.bytes),
                t.to_client.packets
            ),
        );
    match &n.fast_path {
        Some(f) => node.field(
            "fast path",
            format!(
                "{} sessions in the kernel (on {}); of the transfer, {} to exits and {} to \
                 clients went through it",
                f.offloaded,
                f.interfaces.join(", "),
                render::bytes(t.fast_to_exit.bytes),
                render::bytes(t.fast_to_client.bytes)
            ),
        ),
        None => match &n.fast_path_refused {
            Some(why) => node.field("fast path", format!("off: {why}")),
            None => node.field("fast path", "off"),
        },
    };
    if !s.config.peers.is_empty() {
        node.field(
            "z-hop peers",
            format!(
                "{} provisioned, {} with a tunnel up",
                s.config.peers.len(),
                n.zhop_peers
            ),
        );
    }
    let dropped: u64 = t.drops.values().sum();
    if dropped > 0 {
        let why: Vec<String> = t.drops.iter().map(|(r, n)| format!("{r} {n}")).collect();
        node.field("drops", format!("{dropped} ({})", why.join(", ")));
    }
    text.push_str(node.finish());

    for e in &s.config.exits {
        let mut b = Block::new("exit", &e.name);
        b.field("public key", &e.public_key)
            .field("endpoint", &e.endpoint);
        if let Some(p) = e.listen_port {
            b.field("listen port", p);
        }
        match load.get(e.public_key.as_str()) {
            Some(l) => {
                b.field(
                    "sessions",
                    format!("{} ({} established)", l.sessions, l.established),
                );
                if let Some(idle) = l.idle_secs {
                    b.field("latest activity", format!("{} ago", render::duration(idle)));
                }
                b.field(
                    "transfer",
                    format!(
                        "{} to exit, {} to clients",
                        render::bytes(l.to_exit.bytes),
                        render::bytes(l.to_client.bytes)
                    ),
                );
            }
            None => {
                b.field("sessions", 0);
            }
        }
        text.push('\n');
        text.push_str(b.finish());
    }
    // Sessions whose exit is not (or no longer) in the state.
    let orphans: u64 = load
        .iter()
        .filter(|(k, _)| !s.config.exits.iter().any(|e| e.public_key == **k))
        .map(|(_, l)| l.sessions)
        .sum();
    if orphans > 0 {
        text.push_str(&format!(
            "\n{orphans} session(s) to exits no longer configured\n"
        ));
    }

    let names = exit_names(&s.config.exits);
    for p in &s.peers {
        let mut b = Block::new("peer", &p.public_key);
        if !p.name.is_empty() {
            b.field("name", &p.name);
        }
        if p.preshared_key.is_some() {
            b.field("preshared key", "(hidden)");
        }
        match (&p.current_endpoint, &p.endpoint) {
            (Some(e), _) | (None, Some(e)) => {
                b.field("endpoint", e);
            }
            (None, None) => {}
        }
        b.field("allowed ips", p.allowed_ips.join(", "));
        if let Some(secs) = p.latest_handshake_secs_ago {
            b.field(
                "latest handshake",
                format!("{} ago", render::duration(secs as f64)),
            );
            b.field(
                "transfer",
                format!(
                    "{} received, {} sent",
                    render::bytes(p.rx_bytes),
                    render::bytes(p.tx_bytes)
                ),
            );
        }
        if let Some(k) = p.persistent_keepalive.filter(|k| *k > 0) {
            b.field("persistent keepalive", format!("every {k} seconds"));
        }
        if !p.allowed_exits.is_empty() {
            let exits: Vec<&str> = p
                .allowed_exits
                .iter()
                .map(|k| names.get(k).map_or(k.as_str(), String::as_str))
                .collect();
            b.field("allowed exits", exits.join(", "));
        }
        text.push('\n');
        text.push_str(b.finish());
    }
    text
}
