//! SplitMix64: a small, fixed pseudo-random generator. xpm's randomness must be reproducible
//! everywhere (merge streams, demo models, benchmark data), so it is defined here rather than
//! taken from a crate whose output may change between versions.

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// One SplitMix64 step as a pure function: a well-mixed 64-bit hash of `z`.
pub fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A sequential SplitMix64 stream.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        let r = splitmix64(self.0);
        self.0 = self.0.wrapping_add(GOLDEN);
        r
    }

    /// This stream as it will be after `n` more draws, without drawing them: the state only
    /// advances by a constant, so blocks of one stream can be drawn in parallel.
    pub fn advanced(&self, n: u64) -> SplitMix64 {
        SplitMix64(self.0.wrapping_add(n.wrapping_mul(GOLDEN)))
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Shuffle `items` in place (Fisher–Yates, from the back).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}
