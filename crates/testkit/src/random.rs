//! A seeded random source for reproducible workloads.

/// SplitMix64: small, fast, and the same sequence for the same seed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A body size between `min` and `max` (when given), evenly distributed on a log scale: small and
/// large bodies mixed, as real APIs store them.
pub fn body_size(rng: &mut Rng, min: usize, max: Option<usize>) -> usize {
    let Some(max) = max.filter(|max| *max > min) else { return min };
    let (low, high) = ((min.max(1) as f64).ln(), (max as f64).ln());
    let fraction = rng.below(1 << 20) as f64 / f64::from(1u32 << 20);
    ((low + (high - low) * fraction).exp() as usize).clamp(min, max)
}
