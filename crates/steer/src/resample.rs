//! Resampling schemes (MATH.md §3.4), to the same or to a different particle count.
//!
//! Every scheme draws `m` ancestor indices by inverse CDF on the cumulative normalised
//! weights `C_i = Σ_{i'≤i} W^{i'}` with `C_N` forced to one, from sorted uniforms that
//! differ between schemes. The expected number of offspring of particle `i` is `m W^i`
//! for all of them.

use ndarray::ArrayView1;
use rand::{Rng, RngExt};
use rand_distr::{Distribution, Exp1};

use crate::error::{Error, Result};

/// How ancestors are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scheme {
    /// `m` i.i.d. draws from the categorical law of the weights.
    Multinomial,
    /// `U_j = (j + u)/m` with one shared uniform `u` (the default: lowest variance in practice).
    #[default]
    Systematic,
    /// `U_j = (j + u_j)/m` with independent uniforms `u_j`.
    Stratified,
    /// `⌊m W^i⌋` deterministic copies, the rest multinomial on the residual weights.
    Residual,
}

impl std::str::FromStr for Scheme {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "multinomial" => Ok(Scheme::Multinomial),
            "systematic" => Ok(Scheme::Systematic),
            "stratified" => Ok(Scheme::Stratified),
            "residual" => Ok(Scheme::Residual),
            _ => Err(Error::invalid(
                "resampling.scheme",
                format!(
                    "unknown scheme `{s}` (expected multinomial, systematic, stratified or residual)"
                ),
            )),
        }
    }
}

impl Scheme {
    /// Draws `m` ancestor indices for normalised `weights` into `out` (cleared first; indices
    /// come out sorted).
    pub fn ancestors<R: Rng + ?Sized>(
        self,
        weights: ArrayView1<f64>,
        m: usize,
        rng: &mut R,
        out: &mut Vec<usize>,
    ) {
        out.clear();
        if m == 0 || weights.is_empty() {
            return;
        }
        out.reserve(m);
        match self {
            Scheme::Multinomial => multinomial(weights, m, rng, out),
            Scheme::Systematic => {
                let u: f64 = rng.random();
                inverse_cdf(weights, (0..m).map(|j| (j as f64 + u) / m as f64), out);
            }
            Scheme::Stratified => {
                let uniforms = (0..m).map(|j| (j as f64 + rng.random::<f64>()) / m as f64);
                inverse_cdf(weights, uniforms, out);
            }
            Scheme::Residual => residual(weights, m, rng, out),
        }
    }
}

/// Walks the cumulative weights once for non-decreasing uniforms in `[0, 1)`.
fn inverse_cdf(
    weights: ArrayView1<f64>,
    uniforms: impl Iterator<Item = f64>,
    out: &mut Vec<usize>,
) {
    // Clamp to the last particle with positive weight, so rounding in the cumulative sum can
    // never select a particle of weight zero.
    let last = weights
        .iter()
        .rposition(|&w| w > 0.0)
        .unwrap_or(weights.len() - 1);
    let total: f64 = weights.sum();
    let mut i = 0;
    let mut cumulative = weights[0] / total;
    for u in uniforms {
        while u >= cumulative && i < last {
            i += 1;
            cumulative += weights[i] / total;
        }
        out.push(i);
    }
}

/// `m` sorted uniforms in O(m) from normalised exponential spacings, then inverse CDF.
fn multinomial<R: Rng + ?Sized>(
    weights: ArrayView1<f64>,
    m: usize,
    rng: &mut R,
    out: &mut Vec<usize>,
) {
    let mut spacings: Vec<f64> = Vec::with_capacity(m + 1);
    let mut total = 0.0;
    for _ in 0..=m {
        let e: f64 = Exp1.sample(rng);
        total += e;
        spacings.push(total);
    }
    inverse_cdf(weights, spacings[..m].iter().map(|s| s / total), out);
}

fn residual<R: Rng + ?Sized>(
    weights: ArrayView1<f64>,
    m: usize,
    rng: &mut R,
    out: &mut Vec<usize>,
) {
    let total: f64 = weights.sum();
    let mut residuals = Vec::with_capacity(weights.len());
    let mut deterministic = 0;
    for (i, &w) in weights.iter().enumerate() {
        let expected = m as f64 * w / total;
        let copies = expected.floor() as usize;
        out.extend(std::iter::repeat_n(i, copies));
        deterministic += copies;
        residuals.push(expected - copies as f64);
    }
    let rest = m.saturating_sub(deterministic);
    if rest > 0 {
        let mut extra = Vec::with_capacity(rest);
        multinomial(ArrayView1::from(&residuals[..]), rest, rng, &mut extra);
        out.extend(extra);
        out.sort_unstable();
    }
    out.truncate(m);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Purpose, Streams};
    use ndarray::Array1;
    use proptest::prelude::*;

    const ALL: [Scheme; 4] = [
        Scheme::Multinomial,
        Scheme::Systematic,
        Scheme::Stratified,
        Scheme::Residual,
    ];

    fn counts(a: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in a {
            c[i] += 1;
        }
        c
    }

    /// E[O_i] = m W^i for every scheme, also for m ≠ N. Over R replications the mean count
    /// has standard error ≤ sqrt(m W (1 − W) / R) (the multinomial variance bounds the others);
    /// we allow z = 5 of it.
    #[test]
    fn expected_offspring_is_m_times_weight() {
        let w = Array1::from(vec![0.05, 0.3, 0.01, 0.24, 0.4]);
        let streams = Streams::new(11);
        let reps = 20_000;
        for scheme in ALL {
            for m in [5usize, 3, 12] {
                let mut sum = vec![0usize; w.len()];
                let mut out = Vec::new();
                for r in 0..reps {
                    let mut rng = streams.rng(Purpose::Resample, r, m);
                    scheme.ancestors(w.view(), m, &mut rng, &mut out);
                    assert_eq!(out.len(), m);
                    for (s, c) in sum.iter_mut().zip(counts(&out, w.len())) {
                        *s += c;
                    }
                }
                for i in 0..w.len() {
                    let mean = sum[i] as f64 / reps as f64;
                    let expect = m as f64 * w[i];
                    let se = (m as f64 * w[i] * (1.0 - w[i]) / reps as f64).sqrt();
                    assert!(
                        (mean - expect).abs() < 5.0 * se + 1e-12,
                        "{scheme:?} m={m} i={i}: {mean} vs {expect} (se {se})"
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn systematic_and_residual_counts(raw in prop::collection::vec(0.0f64..1.0, 1..40), m in 1usize..100, seed in 0u64..1000) {
            let total: f64 = raw.iter().sum();
            prop_assume!(total > 1e-6);
            let w = Array1::from(raw.iter().map(|v| v / total).collect::<Vec<_>>());
            let mut rng = Streams::new(seed).rng(Purpose::Resample, 0, 0);
            let mut out = Vec::new();
            Scheme::Systematic.ancestors(w.view(), m, &mut rng, &mut out);
            prop_assert_eq!(out.len(), m);
            for (i, c) in counts(&out, w.len()).into_iter().enumerate() {
                let e = m as f64 * w[i];
                // Allow rounding at exact integers.
                prop_assert!(c as f64 >= (e - 1e-9).floor() && c as f64 <= (e + 1e-9).floor() + 1.0,
                    "systematic count {} for expected {}", c, e);
            }
            Scheme::Residual.ancestors(w.view(), m, &mut rng, &mut out);
            prop_assert_eq!(out.len(), m);
            for (i, c) in counts(&out, w.len()).into_iter().enumerate() {
                prop_assert!(c as f64 >= (m as f64 * w[i] - 1e-9).floor());
            }
            for scheme in ALL {
                scheme.ancestors(w.view(), m, &mut rng, &mut out);
                prop_assert!(out.iter().all(|&a| a < w.len() && w[a] > 0.0));
                prop_assert!(out.windows(2).all(|p| p[0] <= p[1]));
            }
        }
    }
}
