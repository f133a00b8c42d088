//! Score models: the pre-trained diffusion models steer steers.
//!
//! A [`ScoreModel`] gives the score `∇log p_τ(x)` of its noised marginals for a batch of
//! particles (one row each), and optionally `log p_τ` and the divergence `∇·∇log p_τ`. It
//! receives the noise level as `(τ, α(τ), σ(τ))` so that an analytic model works under any
//! schedule. Calls are batched: the model may precompute per-time quantities (a Cholesky
//! factor, a network's time embedding) once per call and parallelise over rows.

pub mod gmm;
pub mod nn;

use ndarray::{ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2};

use crate::error::{Error, Result};
use crate::schedule::Schedule;

pub use gmm::{Covariance, GaussianMixture};
pub use nn::Network;

/// Forward time `τ` with the marginal scale `α(τ)` and noise `σ(τ)`: `x_τ = α x_0 + σ ε`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseLevel {
    /// Forward time `τ`.
    pub tau: f64,
    /// Signal scale `α(τ)`.
    pub alpha: f64,
    /// Noise standard deviation `σ(τ)`.
    pub sigma: f64,
}

impl NoiseLevel {
    /// The level of `schedule` at forward time `tau`.
    pub fn new(schedule: &Schedule, tau: f64) -> Self {
        NoiseLevel {
            tau,
            alpha: schedule.alpha(tau),
            sigma: schedule.sigma(tau),
        }
    }

    /// The clean data level `τ = 0` (`α = 1`, `σ = 0`).
    pub fn data() -> Self {
        NoiseLevel {
            tau: 0.0,
            alpha: 1.0,
            sigma: 0.0,
        }
    }
}

/// Output buffers of one batched model evaluation; `None` means "not requested".
#[derive(Debug)]
pub struct ScoreOutput<'a> {
    /// `N × d` score `∇log p_τ(x_i)`.
    pub score: ArrayViewMut2<'a, f64>,
    /// `N` log-densities `log p_τ(x_i)`.
    pub log_density: Option<ArrayViewMut1<'a, f64>>,
    /// `N` divergences `∇·∇log p_τ(x_i)` (exact).
    pub divergence: Option<ArrayViewMut1<'a, f64>>,
}

/// A diffusion model seen through its noised marginals `p_τ`.
pub trait ScoreModel: Send + Sync + std::fmt::Debug {
    /// State dimension `d`.
    fn dim(&self) -> usize;

    /// Evaluates the score (and the requested extras) at `level` for every row of `x`.
    fn evaluate(&self, level: &NoiseLevel, x: ArrayView2<f64>, out: ScoreOutput<'_>) -> Result<()>;

    /// Whether [`ScoreOutput::log_density`] can be requested.
    fn provides_log_density(&self) -> bool;

    /// Whether [`ScoreOutput::divergence`] can be requested (exactly).
    fn provides_divergence(&self) -> bool;

    /// Whether [`ScoreModel::jacobian_quadratic_forms`] is available (reverse-mode autodiff).
    fn provides_vjp(&self) -> bool {
        false
    }

    /// For every probe `z_p` (`probes` is `P × N × d`) writes `z_pᵀ J_s(x_i) z_p` to
    /// `forms[p, i]`, one vector-Jacobian product per probe, and the score to `score`.
    /// Hutchinson's estimator of `∇·s` is the mean over probes with `E[z zᵀ] = I`; the `d` unit
    /// vectors give the exact trace.
    fn jacobian_quadratic_forms(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        probes: ArrayView3<f64>,
        score: ArrayViewMut2<f64>,
        forms: ArrayViewMut2<f64>,
    ) -> Result<()> {
        let _ = (level, x, probes, score, forms);
        Err(Error::Unsupported(
            "this model has no vector-Jacobian products".into(),
        ))
    }

    /// The model as an exact Gaussian mixture, when it is one (enables closed-form references).
    fn as_mixture(&self) -> Option<&GaussianMixture> {
        None
    }
}

/// The distribution of Hutchinson probes `z` (`E[z zᵀ] = I`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Probe {
    /// Entries ±1 with equal probability (lowest variance for a symmetric Jacobian).
    #[default]
    Rademacher,
    /// Standard normal entries.
    Gaussian,
}

/// Hutchinson probes `P × N × d` with `E[z zᵀ] = I`; row `i`'s probes come from `rng(i)`.
pub fn hutchinson_probes<R: rand::Rng>(
    n: usize,
    d: usize,
    probes: usize,
    probe: Probe,
    rng: impl Fn(usize) -> R + Sync,
) -> ndarray::Array3<f64> {
    use ndarray::{Array3, Axis};
    use rand_distr::{Distribution, StandardNormal};
    use rayon::prelude::*;
    let mut z = Array3::<f64>::zeros((probes, n, d));
    z.axis_iter_mut(Axis(1))
        .into_par_iter()
        .enumerate()
        .for_each(|(i, mut zi)| {
            let mut r = rng(i);
            zi.mapv_inplace(|_| match probe {
                Probe::Rademacher => {
                    if rand::RngExt::random::<bool>(&mut r) {
                        1.0
                    } else {
                        -1.0
                    }
                }
                Probe::Gaussian => StandardNormal.sample(&mut r),
            });
        });
    z
}

/// Hutchinson estimate of `∇·s(x) = tr J_s(x)` for every row (MATH.md §5.7):
/// `(1/n) Σ_p z_pᵀ (s(x + ε z_p) − s(x − ε z_p)) / (2ε)` with `ε = 10⁻³ max(σ, 10⁻²)`.
///
/// `score(x, out)` evaluates the score at a batch (it is called once per probe on a `2N × d`
/// batch); probes for row `i` come from `rng(i)`. Unbiased up to the `O(ε²)` bias of the
/// central difference. Models with reverse-mode autodiff use
/// [`ScoreModel::jacobian_quadratic_forms`] on [`hutchinson_probes`] instead (no bias).
pub fn hutchinson_divergence<R: rand::Rng>(
    x: ArrayView2<f64>,
    level: &NoiseLevel,
    probes: usize,
    probe: Probe,
    rng: impl Fn(usize) -> R + Sync,
    mut score: impl FnMut(ArrayView2<f64>, ArrayViewMut2<f64>) -> Result<()>,
) -> Result<ndarray::Array1<f64>> {
    use ndarray::{Array1, Array2, Axis, Zip};
    let (n, d) = x.dim();
    let eps = 1e-3 * level.sigma.max(1e-2);
    let z = hutchinson_probes(n, d, probes, probe, rng);
    let mut total = Array1::<f64>::zeros(n);
    let mut shifted = Array2::<f64>::zeros((2 * n, d));
    let mut out = Array2::<f64>::zeros((2 * n, d));
    for p in 0..probes {
        let zp = z.index_axis(Axis(0), p);
        let (mut plus, mut minus) = shifted.view_mut().split_at(Axis(0), n);
        Zip::from(&mut plus)
            .and(&x)
            .and(&zp)
            .for_each(|o, &xv, &zv| *o = xv + eps * zv);
        Zip::from(&mut minus)
            .and(&x)
            .and(&zp)
            .for_each(|o, &xv, &zv| *o = xv - eps * zv);
        score(shifted.view(), out.view_mut())?;
        let (sp, sm) = out.view().split_at(Axis(0), n);
        Zip::from(&mut total)
            .and(sp.rows())
            .and(sm.rows())
            .and(zp.rows())
            .par_for_each(|t, a, b, zr| {
                let mut acc = 0.0;
                for c in 0..zr.len() {
                    acc += zr[c] * (a[c] - b[c]);
                }
                *t += acc / (2.0 * eps);
            });
    }
    Ok(total / probes as f64)
}
