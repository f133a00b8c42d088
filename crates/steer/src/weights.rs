//! Log-space importance weights (MATH.md §3.2–3.3).
//!
//! Weights are only ever stored as logarithms, normalised so that `LSE(ℓ) = 0`. The only
//! place that exponentiates is [`LogWeights::normalized`], after the maximum is subtracted.

use ndarray::{Array1, ArrayView1, Zip};

use crate::error::{Error, Result};

/// Normalised log-weights `ℓ^i` of a particle population, `Σ_i e^{ℓ^i} = 1`.
#[derive(Clone, Debug)]
pub struct LogWeights {
    log_w: Array1<f64>,
}

/// `log Σ_i e^{a_i}`, stable for any finite or `−∞` entries (`−∞` when all are `−∞`).
pub fn log_sum_exp(a: ArrayView1<f64>) -> f64 {
    let max = a.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    max + a.fold(0.0, |s, &v| s + (v - max).exp()).ln()
}

/// `log Σ_i e^{a_i + b_i}` without forming `a + b`.
pub fn log_sum_exp_sum(a: ArrayView1<f64>, b: ArrayView1<f64>) -> f64 {
    let max = Zip::from(&a)
        .and(&b)
        .fold(f64::NEG_INFINITY, |m, &x, &y| m.max(x + y));
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let s = Zip::from(&a)
        .and(&b)
        .fold(0.0, |s, &x, &y| s + (x + y - max).exp());
    max + s.ln()
}

impl LogWeights {
    /// Uniform weights `ℓ^i = −log n`.
    pub fn uniform(n: usize) -> Self {
        LogWeights {
            log_w: Array1::from_elem(n, -(n as f64).ln()),
        }
    }

    /// Normalises unnormalised log-weights; returns them with `LSE(ℓ)` (the log of their sum).
    ///
    /// NaN or `+∞` entries are an error ([`Error::NonFinite`] at `step`); all `−∞` is
    /// [`Error::Degenerate`].
    pub fn from_unnormalized(mut log_w: Array1<f64>, step: usize) -> Result<(Self, f64)> {
        check_log_weights(log_w.view(), step, "log-weight")?;
        let lse = log_sum_exp(log_w.view());
        if lse == f64::NEG_INFINITY {
            return Err(Error::Degenerate { step });
        }
        log_w.mapv_inplace(|v| v - lse);
        Ok((LogWeights { log_w }, lse))
    }

    /// Number of particles.
    pub fn len(&self) -> usize {
        self.log_w.len()
    }

    /// Whether there are no particles.
    pub fn is_empty(&self) -> bool {
        self.log_w.is_empty()
    }

    /// The normalised log-weights `ℓ^i`.
    pub fn log_weights(&self) -> ArrayView1<'_, f64> {
        self.log_w.view()
    }

    /// The normalised weights `W^i = e^{ℓ^i}` (sum to one).
    pub fn normalized(&self) -> Array1<f64> {
        self.log_w.mapv(f64::exp)
    }

    /// Writes `W^i` into `out` without allocating.
    pub fn normalized_into(&self, out: &mut [f64]) {
        for (o, &l) in out.iter_mut().zip(self.log_w.iter()) {
            *o = l.exp();
        }
    }

    /// Effective sample size `1/Σ W_i² = exp(2 LSE(ℓ) − LSE(2ℓ)) ∈ [1, N]`.
    pub fn ess(&self) -> f64 {
        let lse2 = log_sum_exp(self.log_w.mapv(|v| 2.0 * v).view());
        (-lse2).exp().clamp(1.0, self.len() as f64)
    }

    /// Adds increments `Δℓ`, renormalises, and returns `LSE_i(ℓ^i + Δℓ^i)`, the log of the
    /// incremental normaliser (MATH.md §3.5).
    ///
    /// A NaN or `+∞` increment is [`Error::NonFinite`]; all weights zero is
    /// [`Error::Degenerate`]; the weights are left unchanged on error.
    pub fn reweight(&mut self, increments: ArrayView1<f64>, step: usize) -> Result<f64> {
        check_log_weights(increments, step, "log-weight increment")?;
        let lse = log_sum_exp_sum(self.log_w.view(), increments);
        if lse == f64::NEG_INFINITY {
            return Err(Error::Degenerate { step });
        }
        Zip::from(&mut self.log_w)
            .and(&increments)
            .for_each(|l, &d| *l = *l + d - lse);
        Ok(lse)
    }

    /// Weighted variance `Var_W(φ)` of a per-particle quantity under these weights.
    pub fn variance(&self, phi: ArrayView1<f64>) -> f64 {
        let (mut mean, mut sq) = (0.0, 0.0);
        for (&l, &p) in self.log_w.iter().zip(phi.iter()) {
            let w = l.exp();
            if w > 0.0 {
                mean += w * p;
            }
        }
        for (&l, &p) in self.log_w.iter().zip(phi.iter()) {
            let w = l.exp();
            if w > 0.0 {
                sq += w * (p - mean) * (p - mean);
            }
        }
        sq
    }
}

/// Errors when a log-weight (or a quantity added to one) is NaN or `+∞`; `−∞` is a valid
/// zero weight.
pub(crate) fn check_log_weights(v: ArrayView1<f64>, step: usize, what: &'static str) -> Result<()> {
    match v.iter().position(|x| x.is_nan() || *x == f64::INFINITY) {
        Some(particle) => Err(Error::NonFinite {
            step,
            what,
            particle,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use proptest::prelude::*;

    #[test]
    fn reweight_tracks_normaliser() {
        let mut w = LogWeights::uniform(4);
        let lse = w.reweight(array![0.0, 1.0, 2.0, 3.0].view(), 0).unwrap();
        let expect = ((1.0 + 1f64.exp() + 2f64.exp() + 3f64.exp()) / 4.0).ln();
        assert!((lse - expect).abs() < 1e-14);
        assert!((w.normalized().sum() - 1.0).abs() < 1e-14);
    }

    #[test]
    fn degenerate_and_nan_are_errors() {
        let mut w = LogWeights::uniform(2);
        let e = w.reweight(array![f64::NEG_INFINITY, f64::NEG_INFINITY].view(), 7);
        assert!(matches!(e, Err(Error::Degenerate { step: 7 })));
        let e = w.reweight(array![0.0, f64::NAN].view(), 3);
        assert!(matches!(
            e,
            Err(Error::NonFinite {
                step: 3,
                particle: 1,
                ..
            })
        ));
        // Left unchanged.
        assert!((w.ess() - 2.0).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn weights_sum_to_one_and_ess_in_range(v in prop::collection::vec(-50.0f64..50.0, 1..200)) {
            let n = v.len();
            let (w, _) = LogWeights::from_unnormalized(Array1::from(v), 0).unwrap();
            prop_assert!((w.normalized().sum() - 1.0).abs() < 1e-12);
            let ess = w.ess();
            prop_assert!((1.0..=n as f64).contains(&ess));
        }
    }
}
