//! A fixed-size log-linear latency histogram (≤1.6 % relative error), so the sink can
//! record every packet without allocating.

const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
/// Values up to 2^42 ns (over an hour) are bucketed; larger ones land in the last bucket.
const GROUPS: usize = 42 - SUB_BITS as usize + 2;

/// A fixed-size log-linear histogram of nanosecond values.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; GROUPS * SUB],
            total: 0,
            max: 0,
        }
    }
}

/// Values below `SUB` have a bucket each; above, a value is shifted right until it has
/// `SUB_BITS` significant bits, and the shift picks the group.
fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb + 1 - SUB_BITS;
    (shift as usize * SUB + (v >> shift) as usize).min(GROUPS * SUB - 1)
}

/// The smallest value that falls in bucket `b` (the reported value of a quantile).
fn value_of(b: usize) -> u64 {
    let (shift, sub) = (b / SUB, (b % SUB) as u64);
    sub << shift
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[bucket(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1), or 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value_of(b).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        for (q, want) in [(0.5, 500_000.0), (0.99, 990_000.0), (0.999, 999_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.count(), 100_000);
    }

    #[test]
    fn bucket_boundaries_are_monotonic() {
        let mut last = 0;
        for v in (0..1_000_000u64).step_by(7) {
            let b = bucket(v);
            assert!(b >= last);
            assert!(value_of(b) <= v, "{v} in bucket starting {}", value_of(b));
            last = b;
        }
    }
}
