//! The classic (unscrambled) Halton low-discrepancy sequence (SPEC.md "Test-time augmentation").
//!
//! Dimension `k` is the van der Corput sequence in the `k`-th prime base. The sequence starts at
//! index 1, so the first point is (1/2, 1/3, 1/5, ...): this is what the reference's
//! `ghalton.Halton(7).get(n)` returned, and equals scipy's
//! `qmc.Halton(d, scramble=False).random(n + 1)[1:]` (scipy starts at index 0, the all-zeros
//! point).

/// The first seven primes: the bases of the reference's 7-dimensional sequence.
pub const PRIMES: [u32; 7] = [2, 3, 5, 7, 11, 13, 17];

/// Largest supported dimension count.
pub const MAX_DIMS: usize = 32;

/// The first `n` primes (trial division; `n` is small).
pub fn first_primes(n: usize) -> Vec<u32> {
    let mut primes: Vec<u32> = Vec::with_capacity(n);
    let mut c = 2u32;
    while primes.len() < n {
        if primes
            .iter()
            .take_while(|&&p| p * p <= c)
            .all(|&p| !c.is_multiple_of(p))
        {
            primes.push(c);
        }
        c += 1;
    }
    primes
}

/// The radical inverse of `index` in `base`: its base-`base` digits mirrored about the radix
/// point, `sum_k d_k base^-(k+1)`.
///
/// Accumulated least-significant digit first with a running factor `1/base, 1/base^2, ...`,
/// the way scipy's unscrambled van der Corput computes it, so the values are bit-identical to
/// scipy's (checked in crates/core/tests/tta_golden.rs). Like scipy's, the sum can round up to 1.0 for astronomically
/// large indices (e.g. `2^64 - 1` in base 2); every index below 2^40 stays below 1.
pub fn radical_inverse(index: u64, base: u32) -> f64 {
    assert!(base >= 2, "radical_inverse: base must be >= 2, got {base}");
    let b = base as u64;
    let mut q = index;
    let mut factor = 1.0 / base as f64;
    let mut value = 0.0f64;
    while q > 0 {
        let digit = q % b;
        value += digit as f64 * factor;
        factor /= base as f64;
        q /= b;
    }
    value
}

/// A stateful generator of the classic Halton sequence, starting at index 1.
#[derive(Debug, Clone)]
pub struct Halton {
    bases: Vec<u32>,
    index: u64,
}

impl Halton {
    /// A `dims`-dimensional sequence over the first `dims` primes. Panics unless
    /// `1 <= dims <= 32`.
    pub fn new(dims: usize) -> Self {
        assert!(
            (1..=MAX_DIMS).contains(&dims),
            "Halton: dims must be in 1..={MAX_DIMS}, got {dims}"
        );
        Halton {
            bases: first_primes(dims),
            index: 1,
        }
    }

    pub fn dims(&self) -> usize {
        self.bases.len()
    }

    pub fn bases(&self) -> &[u32] {
        &self.bases
    }

    /// The index the next point will have (1 for a fresh generator).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The next point, one coordinate in [0, 1) per dimension.
    pub fn next_point(&mut self) -> Vec<f64> {
        let p = self
            .bases
            .iter()
            .map(|&b| radical_inverse(self.index, b))
            .collect();
        self.index += 1;
        p
    }
}

impl Iterator for Halton {
    type Item = Vec<f64>;
    fn next(&mut self) -> Option<Vec<f64>> {
        Some(self.next_point())
    }
}

/// The first `n` points of the `dims`-dimensional sequence (indices 1..=n), as
/// `ghalton.Halton(dims).get(n)`.
pub fn points(dims: usize, n: usize) -> Vec<Vec<f64>> {
    Halton::new(dims).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_primes_match_the_constant() {
        assert_eq!(first_primes(7), PRIMES.to_vec());
        assert_eq!(first_primes(32)[31], 131);
    }

    #[test]
    fn radical_inverse_small_values() {
        assert_eq!(radical_inverse(0, 2), 0.0);
        assert_eq!(radical_inverse(1, 2), 0.5);
        assert_eq!(radical_inverse(2, 2), 0.25);
        assert_eq!(radical_inverse(3, 2), 0.75);
        assert_eq!(radical_inverse(4, 2), 0.125);
        assert_eq!(radical_inverse(6, 2), 0.375);
        // 5 = 12_3 -> 0.21_3 = 2/3 + 1/9
        assert!((radical_inverse(5, 3) - 7.0 / 9.0).abs() < 1e-15);
        // 11 = 21_5 -> 0.12_5 = 1/5 + 2/25
        assert!((radical_inverse(11, 5) - 7.0 / 25.0).abs() < 1e-15);
        assert!((radical_inverse(1, 17) - 1.0 / 17.0).abs() < 1e-17);
    }

    #[test]
    fn radical_inverse_stays_in_unit_interval() {
        for &b in &PRIMES {
            for i in [1u64, 10, 1000, 123_456_789, (1 << 40) - 1] {
                let v = radical_inverse(i, b);
                assert!((0.0..1.0).contains(&v), "{i} {b} {v}");
            }
        }
    }

    #[test]
    fn sequence_starts_at_index_one() {
        let pts = points(7, 3);
        let first: Vec<f64> = PRIMES.iter().map(|&p| 1.0 / p as f64).collect();
        assert_eq!(pts[0], first);
        assert_eq!(pts[1][0], 0.25);
        assert!((pts[1][1] - 2.0 / 3.0).abs() < 1e-16);
        assert_eq!(pts[2][0], 0.75);
        assert!((pts[2][1] - 1.0 / 9.0).abs() < 1e-16);
    }

    #[test]
    fn base_two_dimension_is_a_permutation_of_dyadic_grid() {
        let mut v: Vec<f64> = points(1, 15).into_iter().map(|p| p[0]).collect();
        v.sort_by(f64::total_cmp);
        for (k, x) in v.iter().enumerate() {
            assert_eq!(*x, (k + 1) as f64 / 16.0);
        }
    }

    #[test]
    fn generator_and_points_agree() {
        let mut h = Halton::new(5);
        assert_eq!(h.dims(), 5);
        assert_eq!(h.index(), 1);
        let pts = points(5, 10);
        for p in &pts {
            assert_eq!(&h.next_point(), p);
        }
        assert_eq!(h.index(), 11);
    }

    #[test]
    #[should_panic]
    fn zero_dims_panics() {
        Halton::new(0);
    }

    #[test]
    #[should_panic]
    fn too_many_dims_panics() {
        Halton::new(33);
    }
}
