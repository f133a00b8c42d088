//! Score models: the pre-trained diffusion models steer steers.
//!
//! A [`ScoreModel`] gives the score `∇log p_τ(x)` of its noised marginals for a batch of
//! particles (one row each), and optionally `log p_τ` and the divergence `∇·∇log p_τ`. It
//! receives the noise level as `(τ, α(τ), σ(τ))` so that an analytic model works under any
//! schedule. Calls are batched: the model may precompute per-time quantities (a Cholesky
//! factor, a network's time embedding) once per call and parallelise over rows.

pub mod gmm;

use ndarray::{ArrayView2, ArrayViewMut1, ArrayViewMut2};

use crate::error::Result;
use crate::schedule::Schedule;

pub use gmm::{Covariance, GaussianMixture};

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

    /// The model as an exact Gaussian mixture, when it is one (enables closed-form references).
    fn as_mixture(&self) -> Option<&GaussianMixture> {
        None
    }
}
