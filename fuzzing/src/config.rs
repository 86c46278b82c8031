//! `Config::parse`: whatever the file says, start-up either gets a configuration that keeps
//! every limit the data plane relies on, or an error that points into the file.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use wraithgate_control::config::{Config, ConfigError};
use wraithgate_control::state::DesiredState;
use wraithgate_relay::router::{Router, MAX_SESSIONS_PER_CLIENT};

pub fn check(data: &[u8]) {
    // The file is read with read_to_string: anything but UTF-8 never gets this far.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("fuzz.toml"), text) {
        Ok(c) => {
            let dp = &c.data_plane;
            let r = &dp.router;
            assert!(!dp.listen.is_empty());
            assert!(dp.workers >= 1);
            assert!((1..=1024).contains(&dp.batch));
            assert!(r.max_sessions >= 1 && r.max_pending >= 1);
            assert!((1..=MAX_SESSIONS_PER_CLIENT).contains(&r.max_sessions_per_client));
            assert!(r.handshakes_per_second >= 1 && r.handshake_burst >= 1);
            assert!(!r.pending_timeout.is_zero() && !r.idle_timeout.is_zero());
            // The exits of the file are the table, each one once.
            let keys: std::collections::HashSet<_> =
                c.table.specs().map(|s| s.public_key).collect();
            assert_eq!(keys.len(), c.table.len());
            for s in c.table.specs() {
                assert!(s.endpoint.port() != 0 && !s.endpoint.ip().is_unspecified());
                assert_ne!(s.listen_port, Some(0));
                // A configured listener stays with mac1 routing.
                assert!(!dp.listen.iter().any(|l| s.listen_port == Some(l.port())));
            }
            // On first start the node seeds its state from these exits and refuses to run
            // on a state that does not validate: a file `--check` passes must start.
            let seed = DesiredState {
                generation: 1,
                exits: c.table.specs().cloned().collect(),
                peers: vec![],
            };
            if let Err(e) = seed.validate() {
                panic!("accepted a file whose exits make an invalid state: {e}");
            }
            // A worker can be built from it.
            let router = Router::new(r.clone(), Arc::new(c.table), Instant::now());
            assert_eq!(router.session_count(), 0);
        }
        Err(ConfigError::At { line, message, .. }) => {
            let lines = text.split('\n').count();
            assert!(
                (1..=lines).contains(&line),
                "error on line {line} of a {lines}-line file: {message}"
            );
            assert!(!message.is_empty());
        }
        Err(ConfigError::File { message, .. }) => assert!(!message.is_empty()),
        Err(e @ ConfigError::Read { .. }) => panic!("parse never reads: {e}"),
    }
}
