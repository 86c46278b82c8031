//! The operator API over TLS (rustls), for a control plane that reaches nodes over the
//! network. The node serves the certificate and key named in `[control]`, or, without
//! them, one it made itself on first start (`<state_dir>/api.crt`, `api.key` 0600; valid
//! for the API's address, `localhost` and the host's name). A client pins it: by the
//! certificate itself (`wraithctl --ca-file api.crt`), which works because the node's own
//! certificate is self-signed, or by its SHA-256 fingerprint, which the node logs at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take over its TLS handshake before it is dropped (handshakes are
/// taken one at a time, so a silent client must not hold the others up).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The certificate and key the API serves, and where they came from.
#[derive(Debug)]
pub struct Identity {
    pub config: Arc<rustls::ServerConfig>,
    pub cert_path: PathBuf,
    /// SHA-256 of the DER certificate, as `openssl x509 -noout -fingerprint -sha256` shows
    /// it (upper-case hex pairs joined by colons).
    pub fingerprint: String,
}

/// Loads `cert`/`key` when given, else the node's own pair in `state_dir`, made on first
/// start for `names` (IP addresses or DNS names).
pub fn identity(
    cert: Option<&Path>,
    key: Option<&Path>,
    state_dir: &Path,
    names: &[String],
) -> Result<Identity> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_owned(), k.to_owned()),
        (None, None) => {
            let (c, k) = (state_dir.join("api.crt"), state_dir.join("api.key"));
            if !c.exists() || !k.exists() {
                make_self_signed(&c, &k, names)?;
            }
            (c, k)
        }
        _ => bail!("[control] api_tls_cert and api_tls_key go together: give both or neither"),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading the API certificate {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} holds no PEM certificate", cert_path.display()))?;
    let Some(leaf) = certs.first() else {
        bail!("{} holds no certificate", cert_path.display());
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading the API key {}", key_path.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .with_context(|| {
        format!(
            "{} and {} do not make a certificate and its key",
            cert_path.display(),
            key_path.display()
        )
    })?;
    Ok(Identity {
        config: Arc::new(config),
        cert_path,
        fingerprint,
    })
}

/// The SHA-256 fingerprint of a DER certificate, `AB:CD:…`.
pub fn fingerprint(cert: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn make_self_signed(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let certified = rcgen::generate_simple_self_signed(names.to_vec())
        .context("making the API's self-signed certificate")?;
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .with_context(|| format!("creating {}", key_path.display()))?;
    key.write_all(certified.signing_key.serialize_pem().as_bytes())?;
    key.sync_all()?;
    std::fs::write(cert_path, certified.cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    tracing::info!(cert = %cert_path.display(), key = %key_path.display(), ?names,
        "made the API's self-signed TLS certificate");
    Ok(())
}

/// A TCP listener whose connections are TLS: what `axum::serve` takes.
pub struct Listener {
    pub tcp: TcpListener,
    pub acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl axum::serve::Listener for Listener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(error = %e, "operator API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
                Ok(Ok(tls)) => return (tls, peer),
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "operator API: TLS handshake refused")
                }
                Err(_) => tracing::info!(%peer, "operator API: TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
