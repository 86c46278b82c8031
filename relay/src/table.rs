//! The immutable exit table workers route by.
//!
//! The control thread builds a new [`ExitTable`] for every change and publishes it through
//! [`SharedTable`]; workers pick it up once per batch. A table never changes after it is
//! built, so workers read it without locks, and everything derived from the keys (the
//! pre-keyed mac1 states, the port map) is computed once here rather than per packet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::keys::{Mac1Key, PublicKey};

/// An exit as the operator configured it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitSpec {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// A relay listen port whose initiations all go to this exit (port mapping).
    pub listen_port: Option<u16>,
}

/// Why a set of exits cannot become a table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("exit {name:?}: public key {key} is already used by exit {other:?}")]
    DuplicateKey {
        name: String,
        other: String,
        key: PublicKey,
    },
    #[error("exit {name:?}: listen port {port} is already pinned to exit {other:?}")]
    DuplicatePort {
        name: String,
        other: String,
        port: u16,
    },
    #[error("exit {name:?}: listen port 0 cannot be pinned")]
    ZeroPort { name: String },
    #[error("exit {name:?}: endpoint {endpoint} has port 0 or an unspecified address")]
    BadEndpoint { name: String, endpoint: SocketAddr },
    #[error("exit name {name:?} is used twice")]
    DuplicateName { name: String },
}

/// Index of an exit within one table. Only meaningful together with that table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitId(pub u32);

/// One exit with its precomputed mac1 key.
#[derive(Debug, Clone)]
pub struct Exit {
    pub spec: ExitSpec,
    mac1: Mac1Key,
}

impl Exit {
    pub fn mac1_key(&self) -> &Mac1Key {
        &self.mac1
    }
}

/// An immutable snapshot of the configured exits.
#[derive(Debug, Default)]
pub struct ExitTable {
    generation: u64,
    exits: Vec<Exit>,
    by_key: HashMap<PublicKey, ExitId>,
    by_port: HashMap<u16, ExitId>,
}

impl ExitTable {
    /// Validates `specs` and builds a table; nothing is built when anything is wrong.
    pub fn new(generation: u64, specs: Vec<ExitSpec>) -> Result<Self, TableError> {
        let mut by_key = HashMap::with_capacity(specs.len());
        let mut by_port = HashMap::new();
        let mut names: HashMap<&str, ()> = HashMap::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let id = ExitId(i as u32);
            if names.insert(spec.name.as_str(), ()).is_some() {
                return Err(TableError::DuplicateName {
                    name: spec.name.clone(),
                });
            }
            if spec.endpoint.port() == 0 || spec.endpoint.ip().is_unspecified() {
                return Err(TableError::BadEndpoint {
                    name: spec.name.clone(),
                    endpoint: spec.endpoint,
                });
            }
            if let Some(prev) = by_key.insert(spec.public_key, id) {
                return Err(TableError::DuplicateKey {
                    name: spec.name.clone(),
                    other: specs[prev.0 as usize].name.clone(),
                    key: spec.public_key,
                });
            }
            if let Some(port) = spec.listen_port {
                if port == 0 {
                    return Err(TableError::ZeroPort {
                        name: spec.name.clone(),
                    });
                }
                if let Some(prev) = by_port.insert(port, id) {
                    return Err(TableError::DuplicatePort {
                        name: spec.name.clone(),
                        other: specs[prev.0 as usize].name.clone(),
                        port,
                    });
                }
            }
        }
        drop(names);
        let exits = specs
            .into_iter()
            .map(|spec| Exit {
                mac1: spec.public_key.mac1_key(),
                spec,
            })
            .collect();
        Ok(ExitTable {
            generation,
            exits,
            by_key,
            by_port,
        })
    }

    /// Increases with every published change; restored sessions and metrics refer to it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.exits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exits.is_empty()
    }

    pub fn get(&self, id: ExitId) -> Option<&Exit> {
        self.exits.get(id.0 as usize)
    }

    pub fn iter(&self) -> impl Iterator<Item = (ExitId, &Exit)> {
        self.exits
            .iter()
            .enumerate()
            .map(|(i, e)| (ExitId(i as u32), e))
    }

    pub fn specs(&self) -> impl Iterator<Item = &ExitSpec> {
        self.exits.iter().map(|e| &e.spec)
    }

    pub fn by_key(&self, key: &PublicKey) -> Option<ExitId> {
        self.by_key.get(key).copied()
    }

    /// The exit pinned to a relay listen port, if any.
    pub fn pinned(&self, port: u16) -> Option<ExitId> {
        self.by_port.get(&port).copied()
    }

    /// Listen ports pinned to exits, for the I/O layer to bind.
    pub fn pinned_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.by_port.keys().copied()
    }

    /// The exit whose key produced `mac1` over `input`, trying every exit in table order.
    pub fn match_mac1(&self, input: &[u8], mac1: &[u8; 16]) -> Option<ExitId> {
        self.exits
            .iter()
            .position(|e| e.mac1.verify(input, mac1))
            .map(|i| ExitId(i as u32))
    }
}

/// The current table, shared between the control thread (writer) and the workers (readers).
///
/// Publishing is one atomic pointer swap; readers never wait for the writer.
#[derive(Debug, Clone)]
pub struct SharedTable {
    inner: Arc<ArcSwap<ExitTable>>,
}

impl SharedTable {
    pub fn new(table: ExitTable) -> Self {
        SharedTable {
            inner: Arc::new(ArcSwap::from_pointee(table)),
        }
    }

    /// The table as of now.
    pub fn load(&self) -> Arc<ExitTable> {
        self.inner.load_full()
    }

    /// The generation of the current table, without taking a reference to it.
    pub fn generation(&self) -> u64 {
        self.inner.load().generation
    }

    /// The current table if it is not `current` (one atomic load; no reference taken
    /// unless it changed). Workers call this once per batch.
    pub fn load_if_changed(&self, current: &Arc<ExitTable>) -> Option<Arc<ExitTable>> {
        let guard = self.inner.load();
        (!Arc::ptr_eq(&guard, current)).then(|| Arc::clone(&guard))
    }

    /// Makes `table` current for every worker's next batch.
    pub fn publish(&self, table: ExitTable) {
        self.inner.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, key: u8, port: Option<u16>) -> ExitSpec {
        ExitSpec {
            name: name.into(),
            public_key: PublicKey([key; 32]),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            listen_port: port,
        }
    }

    #[test]
    fn refuses_duplicates_and_bad_endpoints() {
        assert!(matches!(
            ExitTable::new(1, vec![spec("a", 1, None), spec("b", 1, None)]),
            Err(TableError::DuplicateKey { .. })
        ));
        assert!(matches!(
            ExitTable::new(1, vec![spec("a", 1, Some(5)), spec("b", 2, Some(5))]),
            Err(TableError::DuplicatePort { port: 5, .. })
        ));
        assert!(matches!(
            ExitTable::new(1, vec![spec("a", 1, None), spec("a", 2, None)]),
            Err(TableError::DuplicateName { .. })
        ));
        let mut bad = spec("a", 1, None);
        bad.endpoint = "0.0.0.0:51820".parse().unwrap();
        assert!(matches!(
            ExitTable::new(1, vec![bad]),
            Err(TableError::BadEndpoint { .. })
        ));
        assert!(matches!(
            ExitTable::new(1, vec![spec("a", 1, Some(0))]),
            Err(TableError::ZeroPort { .. })
        ));
    }

    #[test]
    fn finds_exits_by_key_port_and_mac1() {
        let t = ExitTable::new(3, vec![spec("a", 1, None), spec("b", 2, Some(51821))]).unwrap();
        assert_eq!(t.by_key(&PublicKey([2; 32])), Some(ExitId(1)));
        assert_eq!(t.pinned(51821), Some(ExitId(1)));
        assert_eq!(t.pinned(51820), None);
        let input = [9u8; 116];
        let mac = PublicKey([2; 32]).mac1_key().compute(&input);
        assert_eq!(t.match_mac1(&input, &mac), Some(ExitId(1)));
        assert_eq!(t.match_mac1(&input, &[0; 16]), None);
    }

    #[test]
    fn shared_table_publishes_atomically() {
        let shared = SharedTable::new(ExitTable::new(1, vec![spec("a", 1, None)]).unwrap());
        let before = shared.load();
        shared.publish(ExitTable::new(2, vec![]).unwrap());
        assert_eq!(before.generation(), 1);
        assert_eq!(before.len(), 1);
        assert_eq!(shared.generation(), 2);
        assert!(shared.load().is_empty());
    }
}
