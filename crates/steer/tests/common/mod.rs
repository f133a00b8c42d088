//! Shared fixtures of the statistical tests: grids, 1-D mixtures, targets, settings, and
//! seed-to-seed standard errors.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayView1};
use steer::model::{Covariance, GaussianMixture, ScoreModel};
use steer::resample::Scheme;
use steer::reward::Reward;
use steer::schedule::{GridKind, Schedule, TimeGrid};
use steer::smc::{ParticleSchedule, ResamplePolicy, Run, Settings};
use steer::target::{Expert, Target, TiltSchedule};

/// The default VP linear schedule (β from 0.1 to 20, T = 1).
pub fn vp() -> Schedule {
    Schedule::VpLinear {
        beta_min: 0.1,
        beta_max: 20.0,
        horizon: 1.0,
    }
}

/// `steps` steps over the schedule's full range: uniform down to τ = 0 (VP), or the EDM grid
/// down to σ_min = 0.002 (VE); reverse noise `η`.
pub fn grid(schedule: Schedule, steps: usize, eta: f64) -> TimeGrid {
    let ve = schedule.is_variance_exploding();
    let kind = if ve {
        GridKind::Edm { rho: 7.0 }
    } else {
        GridKind::Uniform
    };
    let tau_min = if ve { 0.002 } else { 0.0 };
    TimeGrid::new(
        schedule,
        kind,
        steps,
        schedule.default_tau_max(),
        tau_min,
        eta,
    )
    .unwrap()
}

/// A 1-D isotropic mixture.
pub fn one_d(w: Array1<f64>, m: Vec<f64>, v: Array1<f64>) -> GaussianMixture {
    let k = m.len();
    GaussianMixture::new(
        w,
        Array2::from_shape_vec((k, 1), m).unwrap(),
        Covariance::Isotropic(v),
    )
    .unwrap()
}

/// `Π_e p_e^{γ_e} e^{r}` with the linear reward schedule.
pub fn target(experts: Vec<(GaussianMixture, f64)>, reward: Option<Arc<dyn Reward>>) -> Target {
    let experts = experts
        .into_iter()
        .map(|(m, gamma)| Expert {
            model: Arc::new(m) as Arc<dyn ScoreModel>,
            gamma,
        })
        .collect();
    Target::new(experts, reward, TiltSchedule::Linear).unwrap()
}

/// `n` particles, systematic resampling under `policy`, seed `seed`.
pub fn settings(n: usize, seed: u64, policy: ResamplePolicy) -> Settings {
    Settings {
        particles: ParticleSchedule::Constant(n),
        policy,
        scheme: Scheme::Systematic,
        final_resample: false,
        window: None,
        seed,
    }
}

/// The usual SMC policy: resample when ESS < N/2.
pub const ESS_HALF: ResamplePolicy = ResamplePolicy::Ess { threshold: 0.5 };

/// Weighted expectation of `f` over a run's output.
pub fn expect(run: &Run, f: impl Fn(ArrayView1<f64>) -> f64) -> f64 {
    run.samples
        .rows()
        .into_iter()
        .zip(run.log_weights.iter())
        .map(|(x, l)| l.exp() * f(x))
        .sum()
}

/// Mean and standard error (Bessel-corrected) over seeds of a per-run statistic.
pub fn over_seeds(values: &[f64]) -> (f64, f64) {
    let r = values.len() as f64;
    let mean = values.iter().sum::<f64>() / r;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (r - 1.0);
    (mean, (var / r).sqrt())
}

/// The law of the discretised base chain for Gaussian data N(μ, ς²) (MATH.md §11.9), tilted
/// by r = −(λ/2)(x − c)²: returns (mean, variance, log Z) of the exact URGE target.
pub fn discretised_chain_target(
    g: &TimeGrid,
    mu: f64,
    var0: f64,
    lambda: f64,
    centre: f64,
) -> (f64, f64, f64) {
    let s = g.schedule();
    let c = |tau: f64| s.alpha(tau).powi(2) * var0 + s.sigma(tau).powi(2);
    let mut m = s.alpha(g.taus()[0]) * mu;
    let mut p = c(g.taus()[0]);
    for st in g.steps() {
        let ck = c(st.tau.0);
        let coef = (st.diffusion + st.noise) / (2.0 * ck);
        let a = 1.0 + st.drift - coef;
        m = a * m + coef * st.alpha * mu;
        p = a * a * p + st.noise;
    }
    // N(m, p) e^{−(λ/2)(x−c)²} = Z N(m̃, p̃) (MATH.md §11.2).
    let pt = 1.0 / (1.0 / p + lambda);
    let nu = m / p + lambda * centre;
    let mt = pt * nu;
    let log_z =
        0.5 * (pt.ln() - p.ln()) + 0.5 * nu * mt - 0.5 * m * m / p - 0.5 * lambda * centre * centre;
    (mt, pt, log_z)
}
