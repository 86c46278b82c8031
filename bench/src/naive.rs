//! The baseline: a UDP relay written the way a user new to the problem would, with tokio
//! `recv_from`/`send_to`, one upstream socket and one task per client. No batching, no
//! GSO/GRO, a lock around the client map, a copy into each send.
//!
//! It does keep per-client upstream sockets (so the exit can tell clients apart), because
//! a relay that shares one upstream socket does not work with WireGuard exits at all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

/// Runs the naive relay until the process is killed.
pub fn run(listen: SocketAddr, exit: SocketAddr, threads: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(serve(listen, exit))
}

async fn serve(listen: SocketAddr, exit: SocketAddr) -> Result<()> {
    let front = Arc::new(UdpSocket::bind(listen).await.context("bind listen")?);
    let clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, client) = front.recv_from(&mut buf).await?;
        let upstream = {
            let mut map = clients.lock().await;
            match map.get(&client) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(UdpSocket::bind("0.0.0.0:0").await?);
                    s.connect(exit).await?;
                    map.insert(client, s.clone());
                    tokio::spawn(back_to_client(
                        s.clone(),
                        front.clone(),
                        client,
                        clients.clone(),
                    ));
                    s
                }
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

async fn back_to_client(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
) {
    let mut buf = vec![0u8; 65_535];
    loop {
        match tokio::time::timeout(Duration::from_secs(180), upstream.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let _ = front.send_to(&buf[..n], client).await;
            }
            Ok(Err(_)) => continue,
            Err(_) => break,
        }
    }
    clients.lock().await.remove(&client);
}
