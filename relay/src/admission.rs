//! Handshake admission, shared by both roles: who may make the relay, or the exit behind it,
//! do the work of a handshake.
//!
//! Not under load, any source within its budget is admitted. Under load (each role has its
//! own measure of it; the mark holds for [`LOAD_HOLD`] after) only a source that proved its
//! address is: by authenticated traffic already received from it (each role knows which),
//! or by a mac2 made with our cookie (WireGuard paper §5.4.7), each kind of proof within a
//! per-source budget of its own that spoofers cannot spend. Everyone else is challenged
//! with a cookie reply, within a per-worker budget of replies (which also bounds the work a
//! flood of challenged initiations costs); past it they are dropped as `rate_limited`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::cookie::{CookieJar, CookieReplyBytes};
use crate::drop_reason::DropReason;
use crate::keys::PublicKey;
use crate::ratelimit::{HandshakeRateLimiter, TokenBucket};
use crate::wire::Initiation;

/// How long a role stays under load after it last found itself loaded.
pub const LOAD_HOLD: Duration = Duration::from_secs(1);

/// The operator's settings both roles' cookie challenges share.
#[derive(Debug, Clone, Copy)]
pub struct CookieSettings {
    /// Secret the cookies derive from; the workers of a node share it, so a cookie from one
    /// is good at all of them.
    pub seed: [u8; 32],
    /// Cookie replies a worker's role sends per second at most.
    pub replies_per_second: u32,
}

/// Budgets of one kind of source: initiations per second from one source (or IPv6 /64),
/// the burst, and the buckets of its limiter.
#[derive(Debug, Clone, Copy)]
pub struct SourceBudget {
    pub per_second: u32,
    pub burst: u32,
    pub buckets: usize,
}

/// What admission decided for an initiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within budget while not under load, or from an address proven by its traffic.
    Admitted,
    /// Its mac2 carries our cookie.
    CookieProven,
    /// To be answered with a cookie reply ([`HandshakeAdmission::cookie_reply`]) and not
    /// handled.
    Challenge,
}

/// One role's handshake admission in one worker.
#[derive(Debug)]
pub struct HandshakeAdmission {
    /// Handshake budget of sources whose mac2 carries our cookie.
    proven: HandshakeRateLimiter,
    /// Handshake budget of addresses proven by their traffic (under load or over their
    /// unproven budget).
    verified: HandshakeRateLimiter,
    cookies: CookieJar,
    cookie_budget: TokenBucket,
    /// Under load until then.
    load_until: Option<Instant>,
}

impl HandshakeAdmission {
    /// `salt` keeps the cookie nonces of two jars with the same seed apart.
    pub fn new(cookies: CookieSettings, salt: u64, proven: SourceBudget, now: Instant) -> Self {
        let limiter =
            || HandshakeRateLimiter::new(proven.per_second, proven.burst, proven.buckets, now);
        HandshakeAdmission {
            proven: limiter(),
            verified: limiter(),
            cookies: CookieJar::new(cookies.seed, salt, now),
            cookie_budget: TokenBucket::new(
                cookies.replies_per_second,
                (cookies.replies_per_second / 10).max(1),
                now,
            ),
            load_until: None,
        }
    }

    /// Whether the role is under load: `loaded` now by its own measure, or was within the
    /// last [`LOAD_HOLD`].
    pub fn under_load(&mut self, now: Instant, loaded: bool) -> bool {
        if loaded {
            self.load_until = Some(now + LOAD_HOLD);
            return true;
        }
        self.load_until.is_some_and(|t| now < t)
    }

    /// Decides on `init` from `from`. `open`: the role admits it without proof (not under
    /// load, and within the source's unproven budget if the role keeps one). `verified`:
    /// `from` has proven its address by authenticated traffic (asked by the caller only when
    /// not `open`, since it may cost a lookup).
    pub fn admit(
        &mut self,
        now: Instant,
        from: SocketAddr,
        init: &Initiation<'_>,
        open: bool,
        verified: bool,
    ) -> Result<Admission, DropReason> {
        let ip = from.ip();
        if open || (verified && self.verified.allow(ip, now)) {
            return Ok(Admission::Admitted);
        }
        if self.cookies.verify_mac2(now, from, init) {
            if !self.proven.allow(ip, now) {
                return Err(DropReason::RateLimited);
            }
            return Ok(Admission::CookieProven);
        }
        if !self.cookie_budget.take(now) {
            return Err(DropReason::RateLimited);
        }
        Ok(Admission::Challenge)
    }

    /// The cookie reply to a challenged `init`, as the holder of `key` would send it.
    pub fn cookie_reply(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: &PublicKey,
        init: &Initiation<'_>,
    ) -> CookieReplyBytes {
        self.cookies.reply(now, from, key, init)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Message, INITIATION_LEN};

    fn admission(replies_per_second: u32, now: Instant) -> HandshakeAdmission {
        let cookies = CookieSettings {
            seed: [5; 32],
            replies_per_second,
        };
        let proven = SourceBudget {
            per_second: 1,
            burst: 1,
            buckets: 64,
        };
        HandshakeAdmission::new(cookies, 0, proven, now)
    }

    #[test]
    fn admits_without_proof_when_open_else_only_the_proven_and_challenges_the_rest() {
        let now = Instant::now();
        let mut a = admission(1, now);
        let mut bytes = [0u8; INITIATION_LEN];
        bytes[0] = 1;
        let Ok(Message::Initiation(init)) = Message::parse(&bytes) else {
            panic!("an initiation")
        };
        let from: SocketAddr = "198.51.100.7:4000".parse().unwrap();
        assert_eq!(
            a.admit(now, from, &init, true, false),
            Ok(Admission::Admitted)
        );
        // Proven by traffic: within that proof's own budget (a burst of one here).
        assert_eq!(
            a.admit(now, from, &init, false, true),
            Ok(Admission::Admitted)
        );
        // No mac2: challenged while the reply budget lasts (a burst of one), then refused.
        assert_eq!(
            a.admit(now, from, &init, false, true),
            Ok(Admission::Challenge)
        );
        assert_eq!(
            a.admit(now, from, &init, false, false),
            Err(DropReason::RateLimited)
        );
    }

    #[test]
    fn the_load_mark_holds_for_a_second_after_the_role_was_loaded() {
        let now = Instant::now();
        let mut a = admission(1, now);
        assert!(!a.under_load(now, false));
        assert!(a.under_load(now, true));
        assert!(a.under_load(now + LOAD_HOLD / 2, false));
        assert!(!a.under_load(now + LOAD_HOLD, false));
    }
}
