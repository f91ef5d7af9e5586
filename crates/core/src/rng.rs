//! Counter-based random streams.
//!
//! Every random draw in the data path comes from a stream keyed by
//! `(seed, purpose, epoch, index)`, so a sample's augmentation does not depend on which worker
//! handled it, in what order, or how many workers there were. The generator is our own
//! (SplitMix64 key mixing + xoshiro256**) rather than a crate's, so that the augmentation stream
//! of a given seed stays the same across dependency upgrades: a run reproduces bit for bit.

/// FNV-1a: a cheap, stable content id (file contents, paths), not a cryptographic hash.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Mixes a 64-bit value (SplitMix64 finaliser).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Named purposes keep streams for different uses independent even with equal seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    Augment = 1,
    Split = 2,
    Synth = 3,
    Shuffle = 4,
    ZmuvSample = 5,
    Other = 99,
}

/// xoshiro256** generator seeded from a key.
#[derive(Debug, Clone)]
pub struct Stream {
    s: [u64; 4],
}

impl Stream {
    /// A stream for `(seed, purpose, a, b)`; e.g. `a` = epoch, `b` = sample index.
    pub fn new(seed: u64, purpose: Purpose, a: u64, b: u64) -> Self {
        let mut k = mix64(seed ^ mix64(purpose as u64));
        k = mix64(k ^ mix64(a.wrapping_add(0x1234_5678)));
        k = mix64(k ^ mix64(b.wrapping_add(0x0F0F_0F0F_0F0F)));
        let mut s = [0u64; 4];
        let mut z = k;
        for slot in &mut s {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *slot = mix64(z);
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Stream { s }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    #[inline]
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Log-uniform in [lo, hi) (both > 0).
    #[inline]
    pub fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.uniform(lo.ln(), hi.ln()).exp()
    }

    #[inline]
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Uniform integer in [0, n) (n > 0), unbiased (Lemire's method with rejection).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let lo = m as u64;
            if lo >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Stream::new(7, Purpose::Augment, 0, 3), |s, _: u64| {
                Some(s.next_u64())
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Stream::new(7, Purpose::Augment, 0, 3), |s, _: u64| {
                Some(s.next_u64())
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(Stream::new(7, Purpose::Augment, 0, 4), |s, _: u64| {
                Some(s.next_u64())
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn uniform_moments_are_plausible() {
        let mut s = Stream::new(1, Purpose::Other, 0, 0);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| s.next_f64()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.002, "var {var}");
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
    }

    #[test]
    fn below_covers_range_uniformly() {
        let mut s = Stream::new(2, Purpose::Other, 0, 0);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[s.below(7) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
