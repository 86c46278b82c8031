//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/` and `fuzz/seeds/<target>/`)
//! through the very checks the fuzz targets run, on stable, in every `cargo test`. An input
//! the fuzzer found failing is committed as `fuzz/seeds/<target>/regression-*`, so it stays
//! fixed (minimisation never removes it).

use std::path::PathBuf;

use wraithgate_fuzzing::TARGETS;

/// The target's corpus (`fuzz/corpus/<target>/`, grown and minimised by the fuzzer) and its
/// seeds (`fuzz/seeds/<target>/`: hand-made inputs and `regression-*` inputs that once
/// failed, kept as they are).
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs = Vec::new();
    for dir in [
        root.join("corpus").join(target),
        root.join("seeds").join(target),
    ] {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
        for e in entries {
            let p = e.expect("directory entry").path();
            if p.is_file() {
                let bytes = std::fs::read(&p).expect("readable corpus file");
                inputs.push((p, bytes));
            }
        }
    }
    inputs.sort();
    inputs
}

fn replay(target: &str) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("known target");
    let inputs = corpus(target);
    assert!(!inputs.is_empty(), "the {target} corpus is empty");
    for (path, bytes) in &inputs {
        let result = std::panic::catch_unwind(|| check(bytes));
        assert!(result.is_ok(), "{target}: {} fails", path.display());
    }
    eprintln!("{target}: {} inputs replayed", inputs.len());
}

#[test]
fn fuzz_corpus_wire() {
    replay("wire");
}

#[test]
fn fuzz_corpus_exit() {
    replay("exit");
}

#[test]
fn fuzz_corpus_zhop() {
    replay("zhop");
}

#[test]
fn fuzz_corpus_router() {
    replay("router");
}

#[test]
fn fuzz_corpus_config() {
    replay("config");
}

#[test]
fn fuzz_corpus_api() {
    replay("api");
}

#[test]
fn fuzz_corpus_inner() {
    replay("inner");
}

/// The router corpus is only worth replaying if it reaches the states the properties are
/// about; this keeps a minimisation or a change of encoding from quietly hollowing it out.
#[test]
fn fuzz_corpus_router_reaches_the_states_that_matter() {
    use wraithgate_relay::{DropReason, RouterStats};
    let mut total = RouterStats::default();
    for (_, bytes) in corpus("router") {
        total.merge(&wraithgate_fuzzing::router::run(&bytes));
    }
    assert!(total.sessions_established > 0 && total.exit_to_client.packets > 0);
    assert!(total.exit_handshakes > 0 && total.cookie_replies > 0);
    assert!(total.sessions_expired_pending > 0 && total.sessions_expired_idle > 0);
    assert!(total.sessions_closed_by_table > 0 && total.sessions_closed_by_request > 0);
    // The fast path: sessions offloaded (and re-offloaded by rekeys) and withdrawn.
    assert!(
        total.offloads > total.withdrawals && total.withdrawals > 0,
        "{total:?}"
    );
    for reason in [
        DropReason::AmplificationLimit,
        DropReason::RateLimited,
        DropReason::CookieChallenge,
        DropReason::SessionsFull,
        DropReason::PendingFull,
        DropReason::ClientSessionLimit,
        DropReason::Mac1Mismatch,
        DropReason::UnknownClient,
        DropReason::UnknownIndex,
        DropReason::UnmatchedResponse,
        DropReason::NoSession,
        DropReason::SocketUnavailable,
        DropReason::Truncated,
        DropReason::ReservedNonZero,
    ] {
        assert!(
            total.dropped(reason) > 0,
            "no input of the router corpus reaches {reason}"
        );
    }
}

/// Likewise for the zhop corpus: handshakes, cookies, roaming, flows and replies, swaps
/// and idle tunnels, and the refusals the model has rules for.
#[test]
fn fuzz_corpus_zhop_reaches_the_states_that_matter() {
    use wraithgate_relay::DropReason;
    let mut total = wraithgate_fuzzing::zhop::Reached::default();
    for (_, bytes) in corpus("zhop") {
        total.merge(&wraithgate_fuzzing::zhop::run(&bytes));
    }
    let s = &total.stats;
    assert!(
        s.outer_handshakes > 0 && s.cookie_replies > 0 && s.cookie_proven > 0,
        "{s:?}"
    );
    assert!(
        s.inner_to_exit.packets > 0 && total.exit_replies_read > 0,
        "{total:?}"
    );
    assert!(total.roams > 0 && total.idle_forgotten > 0, "{total:?}");
    assert!(
        total.removed_by_table > 0 && total.flows_closed_by_table > 0,
        "{total:?}"
    );
    for reason in [
        DropReason::CookieChallenge,
        DropReason::UnknownPeer,
        DropReason::OuterRejected,
        DropReason::InnerNotUdp,
        DropReason::InnerMalformed,
        DropReason::InnerSpoofedSource,
        DropReason::InnerForbiddenDestination,
        DropReason::ClientSessionLimit,
    ] {
        assert!(
            total.drops.get(&reason).is_some_and(|&n| n > 0),
            "no input of the zhop corpus reaches {reason}"
        );
    }
}

/// A few thousand pseudo-random inputs per target (fixed seed), so that the checks
/// themselves are exercised beyond the corpus even where no fuzzer runs.
#[test]
fn fuzz_checks_hold_on_pseudo_random_inputs() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (name, check) in TARGETS {
        // The exit and zhop targets do handshakes (X25519) per input.
        let runs = match name {
            "router" => 300,
            "exit" | "zhop" => 200,
            _ => 2_000,
        };
        for _ in 0..runs {
            let len = (next() % 1024) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let result = std::panic::catch_unwind(|| check(&bytes));
            if result.is_err() {
                let path = std::env::temp_dir().join(format!("wraithgate-{name}-failure.bin"));
                std::fs::write(&path, &bytes).expect("write the failing input");
                panic!("{name} fails on the input saved in {}", path.display());
            }
        }
    }
}
