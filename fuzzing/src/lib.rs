//! The checks behind WraithGate's fuzz targets.
//!
//! Each module has one `check(data: &[u8])` that decodes the input, drives the real code
//! with it and panics when a property does not hold. The same function is called by the
//! cargo-fuzz target of that name (`fuzz/fuzz_targets/<name>.rs`, libFuzzer, run by
//! `tools/fuzz`) and by the corpus replay (`fuzzing/tests/corpus.rs`), an ordinary
//! `cargo test` on stable that CI runs over every committed input in
//! `fuzz/corpus/<name>/`.
//!
//! | target | what it drives | what it checks besides "no panic" |
//! |---|---|---|
//! | [`wire`] | `Message::parse` | agrees with an independent classifier; every accessor reads the right bytes |
//! | [`router`] | the sans-IO DoubleHop router, by sequences of (source, bytes, time step, table swap, kill, restart) | against a reference model: no packet to an address that was never a session's client, nor through another client's session; unverified addresses never get more bytes than they sent; sessions never move; bounds; the per-source rate limit; established sessions closed only for a reason; every drop counted once |
//! | [`config`] | `Config::parse` | accepted files satisfy every limit; errors name a line of the file |
//! | [`api`] | the API's request bodies and the state file | accepted states validate the same after being persisted and read back |
//! | [`exit`] | the Exit role's receive path (a real boringtun client's tunnel into Z-HOP with a TUN) | what reaches the TUN, and the route out, against an independent reading of boringtun's length rule and of cryptokey routing both ways |
//! | [`zhop`] | Z-HOP's outer tunnels: real boringtun clients (provisioned or not) handshaking, under load, roaming, sending inner packets; garbage, replays, time, table swaps | against a reference model, after every datagram: who gets a response or a cookie reply, where endpoints move, which inner packets reach which exit, which flows close, every refusal's reason |
//! | [`inner`] | Z-HOP's inner IP/UDP parser and builder | agrees with an independent reading of RFC 791/8200/768; replies built from what was parsed carry checksums an independent RFC 1071 sum verifies |

pub mod api;
pub mod config;
pub mod exit;
pub mod inner;
pub mod router;
pub mod wire;
pub mod zhop;

/// A target's check: panics when a property does not hold for the input.
pub type Check = fn(&[u8]);

/// Every target by name, for the replay and for tools.
pub const TARGETS: [(&str, Check); 7] = [
    ("wire", wire::check),
    ("router", router::check),
    ("config", config::check),
    ("api", api::check),
    ("inner", inner::check),
    ("exit", exit::check),
    ("zhop", zhop::check),
];

/// A new handshake initiation from a real WireGuard client (boringtun), even while one is
/// in progress (as the client's REKEY_TIMEOUT retry would be).
pub(crate) fn client_initiation(client: &mut boringtun::noise::Tunn, buf: &mut [u8]) -> Vec<u8> {
    match client.format_handshake_initiation(buf, true) {
        boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("the client makes an initiation: {other:?}"),
    }
}

/// Reads structured values off fuzz input; past the end everything reads as zero, so any
/// input decodes to something.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = self.pos.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }
}
