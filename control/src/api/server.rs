//! The sidecar's thread, runtime and listeners (TCP and Unix socket), and its stop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;

use super::{guard::load_or_create_token, router, App};
use crate::change::Control;
use crate::config::ControlSection;

/// The running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub local_addr: Option<SocketAddr>,
}

impl Sidecar {
    /// Whether the sidecar's thread still runs.
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// If the sidecar's thread has ended on its own (nobody asked it to stop), why: the
    /// panic's message, or that it returned. `None` while it runs.
    pub fn death(&mut self) -> Option<String> {
        if !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return None;
        }
        let thread = self.thread.take()?;
        Some(match thread.join() {
            Ok(()) => "its thread ended (runtime failure, see above)".into(),
            Err(panic) => format!(
                "its thread panicked: {}",
                super::panic_message(panic.as_ref())
            ),
        })
    }

    /// Stops serving and waits for the thread.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds the API and serves it on its own thread.
pub fn start(control: Arc<Control>, cfg: &ControlSection, token_path: &Path) -> Result<Sidecar> {
    let token = load_or_create_token(token_path)?;
    let metrics_path = super::metrics_token_path(token_path);
    let metrics_token = load_or_create_token(&metrics_path)?;
    let tcp = match cfg.api_listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the operator API on {addr}"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let unix = match &cfg.api_socket {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let local_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    let tls = match (&tcp, cfg.api_tls) {
        (Some(_), true) => {
            let mut names = vec!["localhost".to_string()];
            if let Some(a) = local_addr {
                names.push(a.ip().to_string());
            }
            if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
                names.push(h.trim().to_string());
            }
            let id = super::tls::identity(
                cfg.api_tls_cert.as_deref(),
                cfg.api_tls_key.as_deref(),
                &cfg.state_dir,
                &names,
            )?;
            tracing::info!(cert = %id.cert_path.display(), sha256 = %id.fingerprint,
                "operator API serves TLS; clients pin this certificate or fingerprint");
            Some(tokio_rustls::TlsAcceptor::from(id.config))
        }
        _ => None,
    };
    if let (Some(a), None) = (local_addr, &tls) {
        if !a.ip().is_loopback() {
            tracing::warn!(api = %a, "the operator API is served without TLS on a non-loopback \
                address: its token and every change cross the network in clear; set \
                [control] api_tls = true");
        }
    }
    let dp = control.dp.clone();
    let thread_fault = Arc::new(tokio::sync::Notify::new());
    let app = router(App {
        control,
        token: token.into(),
        metrics_token: metrics_token.into(),
        thread_fault: thread_fault.clone(),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("wg-sidecar".into())
        .spawn(move || {
            // Changes are validated and persisted on this thread and the writer it starts.
            let placement = dp.settle_control_thread();
            tracing::info!(%placement, "operator API and state writer threads");
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "operator API runtime failed; forwarding continues");
                    return;
                }
            };
            rt.block_on(serve(app, tcp, tls, unix, stop_rx, thread_fault));
        })
        .context("starting the sidecar thread")?;
    tracing::info!(api = ?local_addr, token_file = %token_path.display(),
        metrics_token_file = %metrics_path.display(), "operator API listening");
    Ok(Sidecar {
        thread: Some(thread),
        stop: Some(stop_tx),
        local_addr,
    })
}

fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding the operator API on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

async fn serve(
    app: Router,
    tcp: Option<std::net::TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    unix: Option<std::os::unix::net::UnixListener>,
    stop: tokio::sync::oneshot::Receiver<()>,
    thread_fault: Arc<tokio::sync::Notify>,
) {
    let (stop_all, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut tasks = Vec::new();
    if let Some(l) = tcp {
        match tokio::net::TcpListener::from_std(l) {
            Ok(l) => {
                let mut rx = stop_all.subscribe();
                let app = app.clone();
                tasks.push(tokio::spawn(async move {
                    let shutdown = async move {
                        let _ = rx.recv().await;
                    };
                    let r = match tls {
                        Some(acceptor) => {
                            let l = super::tls::Listener { tcp: l, acceptor };
                            axum::serve(l, app).with_graceful_shutdown(shutdown).await
                        }
                        None => axum::serve(l, app).with_graceful_shutdown(shutdown).await,
                    };
                    if let Err(e) = r {
                        tracing::error!(error = %e, "operator API (tcp) stopped");
                    }
                }));
            }
            Err(e) => tracing::error!(error = %e, "operator API (tcp) not served"),
        }
    }
    if let Some(l) = unix {
        match tokio::net::UnixListener::from_std(l) {
            Ok(l) => {
                let mut rx = stop_all.subscribe();
                tasks.push(tokio::spawn(async move {
                    let r = axum::serve(l, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.recv().await;
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "operator API (unix) stopped");
                    }
                }));
            }
            Err(e) => tracing::error!(error = %e, "operator API (unix) not served"),
        }
    }
    tokio::select! {
        _ = stop => {}
        // Only the fault-injection route notifies this (debug builds, on request).
        () = thread_fault.notified() => panic!("injected fault: the operator API's thread panics"),
    }
    let _ = stop_all.send(());
    // Graceful shutdown waits for open connections; an idle keep-alive connection (a
    // metrics scraper) would hold it forever, and with it the node's stop. Give requests
    // in flight a moment, then cut the rest.
    let drain = async {
        for t in &mut tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::info!("operator API: closing connections still open");
        for t in &tasks {
            t.abort();
        }
    }
}

/// How long a stopping sidecar waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
