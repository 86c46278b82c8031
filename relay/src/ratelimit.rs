//! Per-source handshake rate limit.
//!
//! Token buckets in a fixed, pre-allocated array indexed by a keyed hash of the source
//! (the IPv4 address, or the /64 of an IPv6 address, as the kernel's WireGuard rate limiter
//! does). The array never grows, so a flood from millions of spoofed sources costs no
//! memory; two sources that share a bucket are limited together, which errs on the side of
//! refusing.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Accumulated allowance, in nanoseconds of refill time.
    tokens: u64,
    /// When `tokens` was last brought up to date, in nanoseconds since `base`.
    last: u64,
}

impl Bucket {
    /// Refills for the time since the last call and takes one token of `cost` if there is one.
    fn take(&mut self, now_ns: u64, cost: u64, capacity: u64) -> bool {
        self.tokens = (self.tokens + now_ns.saturating_sub(self.last)).min(capacity);
        self.last = now_ns;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// One token bucket: `per_second` on average, up to `burst` at once; starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    bucket: Bucket,
    cost: u64,
    capacity: u64,
    base: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32, base: Instant) -> Self {
        let cost = Duration::from_secs(1).as_nanos() as u64 / u64::from(per_second.max(1));
        let capacity = cost * u64::from(burst.max(1));
        TokenBucket {
            bucket: Bucket {
                tokens: capacity,
                last: 0,
            },
            cost,
            capacity,
            base,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let now_ns = now.saturating_duration_since(self.base).as_nanos() as u64;
        self.bucket.take(now_ns, self.cost, self.capacity)
    }
}

/// Token-bucket rate limiter keyed by source address.
#[derive(Debug)]
pub struct HandshakeRateLimiter {
    buckets: Box<[Bucket]>,
    mask: usize,
    hasher: std::collections::hash_map::RandomState,
    /// Refill time of one token.
    cost: u64,
    /// Most tokens a bucket holds.
    capacity: u64,
    base: Instant,
}

impl HandshakeRateLimiter {
    /// `per_second` handshakes per source on average, up to `burst` at once, tracked in
    /// `buckets` (rounded up to a power of two) slots.
    pub fn new(per_second: u32, burst: u32, buckets: usize, base: Instant) -> Self {
        let n = buckets.max(1).next_power_of_two();
        let cost = Duration::from_secs(1).as_nanos() as u64 / u64::from(per_second.max(1));
        let capacity = cost * u64::from(burst.max(1));
        // Every bucket starts full, so a source's first handshakes are never refused.
        let full = Bucket {
            tokens: capacity,
            last: 0,
        };
        HandshakeRateLimiter {
            buckets: vec![full; n].into_boxed_slice(),
            mask: n - 1,
            hasher: Default::default(),
            cost,
            capacity,
            base,
        }
    }

    /// Takes one token for `source` if it has one.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let mut h = self.hasher.build_hasher();
        match source {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => h.write(&v4.octets()),
                None => h.write(&a.octets()[..8]),
            },
        }
        let idx = h.finish() as usize & self.mask;
        let now_ns = now.saturating_duration_since(self.base).as_nanos() as u64;
        self.buckets[idx].take(now_ns, self.cost, self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut rl = HandshakeRateLimiter::new(20, 5, 1024, t0);
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let now = t0 + Duration::from_secs(1);
        let allowed = (0..50).filter(|_| rl.allow(a, now)).count();
        assert_eq!(allowed, 5, "the burst");
        // 50 ms refills exactly one token at 20/s.
        assert!(!rl.allow(a, now + Duration::from_millis(49)));
        assert!(rl.allow(a, now + Duration::from_millis(100)));
        // A quiet second refills to the burst, never beyond.
        let later = now + Duration::from_secs(10);
        assert_eq!((0..50).filter(|_| rl.allow(a, later)).count(), 5);
    }

    #[test]
    fn sources_are_independent_and_v6_is_limited_per_64() {
        let t0 = Instant::now();
        let mut rl = HandshakeRateLimiter::new(20, 2, 1 << 16, t0);
        let now = t0 + Duration::from_secs(1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let other: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(rl.allow(a, now) && rl.allow(same64, now));
        assert!(!rl.allow(a, now), "the /64 shares one bucket");
        assert!(rl.allow(other, now), "another source has its own bucket");
    }

    #[test]
    fn a_token_bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000, 10, t0);
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 10, "starts full");
        let later = t0 + Duration::from_millis(5);
        assert_eq!((0..100).filter(|_| b.take(later)).count(), 5, "1 per ms");
        let much_later = t0 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(much_later)).count(), 10);
    }
}
