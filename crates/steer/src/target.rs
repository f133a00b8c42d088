//! Targets `q_T ∝ Π_e p_e^{γ_e} e^{r}` and their path `q̃_t = Π_e p⃖_{e,t}^{γ_e} e^{β_t r}`
//! (MATH.md §2), with every model and reward evaluation counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{Array1, Array2, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::doob::{HFunction, HLaplacian, HOutput};
use crate::error::{Error, Result};
use crate::exact::ExactLaw;
use crate::model::{GaussianMixture, NoiseLevel, ScoreModel, ScoreOutput};
use crate::reward::{Reward, RewardOutput};
use crate::rng::{Purpose, Streams};
use crate::schedule::TimeGrid;

/// One expert `p_e^{γ_e}` of a product target.
#[derive(Clone, Debug)]
pub struct Expert {
    /// The diffusion model `p_e`.
    pub model: Arc<dyn ScoreModel>,
    /// Its exponent `γ_e` (`γ ≠ 1` anneals).
    pub gamma: f64,
}

/// The reward schedule `β_t` along the grid, with `β = 0` at the first and `β = 1` at the
/// last grid point (MATH.md §2.2).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum TiltSchedule {
    /// `β = s`, with `s = (t − t_0)/(t_M − t_0)` the fraction of sampling time elapsed.
    #[default]
    Linear,
    /// `β = s^p`.
    Power(f64),
    /// The VP signal fraction `α(τ)²`, rescaled to run from 0 to 1 over the grid.
    Signal,
    /// A step (MATH.md §8.5): `β = β_min` until the elapsed fraction `s` reaches `switch`,
    /// then 1 (and 0 at the very first grid point, as every schedule).
    Step {
        /// `β_min ∈ [0, 1]`.
        beta_min: f64,
        /// Switching point `s_c ∈ (0, 1)`.
        switch: f64,
    },
}

impl TiltSchedule {
    /// `β` at grid point `k ∈ 0..=M`.
    pub fn beta(&self, grid: &TimeGrid, k: usize) -> f64 {
        let m = grid.len();
        let frac = |v: f64, a: f64, b: f64| ((v - a) / (b - a)).clamp(0.0, 1.0);
        match *self {
            TiltSchedule::Linear => frac(grid.time(k), grid.time(0), grid.time(m)),
            TiltSchedule::Power(p) => frac(grid.time(k), grid.time(0), grid.time(m)).powf(p),
            TiltSchedule::Signal => {
                let a2 = |j: usize| grid.level(j).alpha.powi(2);
                frac(a2(k), a2(0), a2(m))
            }
            TiltSchedule::Step { beta_min, switch } => {
                let s = frac(grid.time(k), grid.time(0), grid.time(m));
                if k == 0 {
                    0.0
                } else if s < switch {
                    beta_min
                } else {
                    1.0
                }
            }
        }
    }

    /// Checks that the schedule is usable on `grid`.
    pub fn validate(&self, grid: &TimeGrid) -> Result<()> {
        match *self {
            TiltSchedule::Power(p) if !(p.is_finite() && p > 0.0) => Err(Error::invalid(
                "reward.schedule",
                format!("power must be > 0, got {p}"),
            )),
            TiltSchedule::Step { beta_min, switch }
                if !((0.0..=1.0).contains(&beta_min) && switch > 0.0 && switch < 1.0) =>
            {
                Err(Error::invalid(
                    "reward.schedule",
                    format!(
                        "the step schedule needs 0 ≤ beta_min ≤ 1 and 0 < switch < 1, got {beta_min} and {switch}"
                    ),
                ))
            }
            TiltSchedule::Signal if grid.schedule().is_variance_exploding() => Err(Error::invalid(
                "reward.schedule",
                "the signal schedule needs a VP schedule (α ≡ 1 under VE)",
            )),
            _ => Ok(()),
        }
    }
}

/// Running counts of every evaluation a run makes, one unit per particle.
#[derive(Debug, Default)]
pub struct Evaluations {
    score: AtomicU64,
    log_density: AtomicU64,
    divergence: AtomicU64,
    vjp: AtomicU64,
    reward_value: AtomicU64,
    reward_gradient: AtomicU64,
    reward_laplacian: AtomicU64,
    h_function: AtomicU64,
}

/// A snapshot of [`Evaluations`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvaluationCounts {
    /// Score (network) evaluations, summed over experts.
    pub score: u64,
    /// Log-density evaluations.
    pub log_density: u64,
    /// Exact divergence evaluations.
    pub divergence: u64,
    /// Vector-Jacobian products through a score network (one per Hutchinson probe).
    pub vjp: u64,
    /// Reward values.
    pub reward_value: u64,
    /// Reward gradients.
    pub reward_gradient: u64,
    /// Reward Laplacians.
    pub reward_laplacian: u64,
    /// Doob h-function evaluations (`log h` and `∇log h` together, MATH.md §7).
    pub h_function: u64,
}

impl EvaluationCounts {
    /// `self − earlier`, the evaluations made in between.
    pub fn since(&self, earlier: &EvaluationCounts) -> EvaluationCounts {
        EvaluationCounts {
            score: self.score - earlier.score,
            log_density: self.log_density - earlier.log_density,
            divergence: self.divergence - earlier.divergence,
            vjp: self.vjp - earlier.vjp,
            reward_value: self.reward_value - earlier.reward_value,
            reward_gradient: self.reward_gradient - earlier.reward_gradient,
            reward_laplacian: self.reward_laplacian - earlier.reward_laplacian,
            h_function: self.h_function - earlier.h_function,
        }
    }
}

impl Evaluations {
    /// Current counts.
    pub fn snapshot(&self) -> EvaluationCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EvaluationCounts {
            score: g(&self.score),
            log_density: g(&self.log_density),
            divergence: g(&self.divergence),
            vjp: g(&self.vjp),
            reward_value: g(&self.reward_value),
            reward_gradient: g(&self.reward_gradient),
            reward_laplacian: g(&self.reward_laplacian),
            h_function: g(&self.h_function),
        }
    }
}

/// How the particles start (MATH.md §2.3).
#[derive(Debug)]
pub struct Initial {
    /// `N × d` positions.
    pub x: Array2<f64>,
    /// Unnormalised initial log-weights `ℓ_0` (constant when `q_0` is sampled exactly).
    pub log_weights: Array1<f64>,
    /// `log Z_0` of `q̃_0` when known exactly (else estimated from `ℓ_0` by the engine).
    pub log_normalizer: Option<f64>,
}

/// The steering target: experts, exponents, reward and reward schedule.
#[derive(Debug)]
pub struct Target {
    experts: Vec<Expert>,
    reward: Option<Arc<dyn Reward>>,
    tilt: TiltSchedule,
    dim: usize,
    evaluations: Evaluations,
}

impl Target {
    /// Builds and validates a target: at least one expert, all of one dimension, finite
    /// exponents with `Γ = Σ γ_e > 0`, and a reward of the same dimension.
    pub fn new(
        experts: Vec<Expert>,
        reward: Option<Arc<dyn Reward>>,
        tilt: TiltSchedule,
    ) -> Result<Self> {
        let Some(first) = experts.first() else {
            return Err(Error::invalid("experts", "at least one expert is required"));
        };
        let dim = first.model.dim();
        for (e, ex) in experts.iter().enumerate() {
            if ex.model.dim() != dim {
                return Err(Error::Dimension {
                    context: format!("experts[{e}] (all experts share one dimension)"),
                    expected: dim,
                    found: ex.model.dim(),
                });
            }
            if !(ex.gamma.is_finite() && ex.gamma > 0.0) {
                return Err(Error::invalid(
                    format!("experts[{e}].gamma"),
                    format!("must be finite and > 0, got {}", ex.gamma),
                ));
            }
        }
        if let Some(r) = &reward
            && r.dim() != dim
        {
            return Err(Error::Dimension {
                context: "reward (must match the experts)".into(),
                expected: dim,
                found: r.dim(),
            });
        }
        Ok(Target {
            experts,
            reward,
            tilt,
            dim,
            evaluations: Evaluations::default(),
        })
    }

    /// State dimension `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The experts.
    pub fn experts(&self) -> &[Expert] {
        &self.experts
    }

    /// The reward, if any.
    pub fn reward(&self) -> Option<&dyn Reward> {
        self.reward.as_deref()
    }

    /// The reward schedule.
    pub fn tilt(&self) -> TiltSchedule {
        self.tilt
    }

    /// `Γ = Σ_e γ_e`.
    pub fn total_gamma(&self) -> f64 {
        self.experts.iter().map(|e| e.gamma).sum()
    }

    /// Evaluation counters.
    pub fn evaluations(&self) -> &Evaluations {
        &self.evaluations
    }

    /// Expert `e`'s score (and requested extras) at `level`, counted.
    pub fn expert_score(
        &self,
        e: usize,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        out: ScoreOutput<'_>,
    ) -> Result<()> {
        let n = x.nrows() as u64;
        let ev = &self.evaluations;
        ev.score.fetch_add(n, Ordering::Relaxed);
        if out.log_density.is_some() {
            ev.log_density.fetch_add(n, Ordering::Relaxed);
        }
        if out.divergence.is_some() {
            ev.divergence.fetch_add(n, Ordering::Relaxed);
        }
        self.experts[e].model.evaluate(level, x, out)
    }

    /// Expert `e`'s score and the Hutchinson quadratic forms `z_pᵀ J_s z_p` of its Jacobian for
    /// every probe (`P × N × d`), by reverse-mode autodiff; counted as one score evaluation and
    /// `P` vector-Jacobian products per row.
    pub fn expert_quadratic_forms(
        &self,
        e: usize,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        probes: ArrayView3<f64>,
        score: ArrayViewMut2<f64>,
        forms: ArrayViewMut2<f64>,
    ) -> Result<()> {
        let n = x.nrows() as u64;
        let ev = &self.evaluations;
        ev.score.fetch_add(n, Ordering::Relaxed);
        ev.vjp.fetch_add(
            n * probes.len_of(ndarray::Axis(0)) as u64,
            Ordering::Relaxed,
        );
        self.experts[e]
            .model
            .jacobian_quadratic_forms(level, x, probes, score, forms)
    }

    /// The scores of the first `scores.len()` experts at `level` into `scores`, counted; a
    /// non-finite score is [`Error::NonFinite`] at `step`.
    pub fn expert_scores(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        scores: &mut [Array2<f64>],
        step: usize,
    ) -> Result<()> {
        for (e, score) in scores.iter_mut().enumerate() {
            let out = ScoreOutput {
                score: score.view_mut(),
                log_density: None,
                divergence: None,
            };
            self.expert_score(e, level, x, out)?;
            crate::smc::check_finite(score, step, "score")?;
        }
        Ok(())
    }

    /// The reward's requested quantities, counted; an error when the target has no reward.
    pub fn reward_eval(&self, x: ArrayView2<f64>, out: RewardOutput<'_>) -> Result<()> {
        let r = self
            .reward
            .as_ref()
            .ok_or_else(|| Error::Unsupported("the target has no reward".into()))?;
        let n = x.nrows() as u64;
        let ev = &self.evaluations;
        if out.value.is_some() {
            ev.reward_value.fetch_add(n, Ordering::Relaxed);
        }
        if out.gradient.is_some() {
            ev.reward_gradient.fetch_add(n, Ordering::Relaxed);
        }
        if out.laplacian.is_some() {
            ev.reward_laplacian.fetch_add(n, Ordering::Relaxed);
        }
        r.evaluate(x, out)
    }

    /// Checks an h-function's dimension `dim` against the target's and counts `rows`
    /// evaluations.
    fn count_h_function(&self, dim: usize, rows: usize) -> Result<()> {
        if dim != self.dim {
            return Err(Error::Dimension {
                context: "h-function (must match the experts)".into(),
                expected: self.dim,
                found: dim,
            });
        }
        self.evaluations
            .h_function
            .fetch_add(rows as u64, Ordering::Relaxed);
        Ok(())
    }

    /// An h-function's `log h` and `∇log h` at `level` (MATH.md §7), counted; a non-finite
    /// value is [`Error::NonFinite`] at `step`.
    pub fn h_function_eval(
        &self,
        h: &dyn HFunction,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        out: HOutput<'_>,
        step: usize,
    ) -> Result<()> {
        self.count_h_function(h.dim(), x.nrows())?;
        let HOutput {
            mut log_h,
            mut grad_log_h,
        } = out;
        h.evaluate(
            level,
            x,
            HOutput {
                log_h: log_h.as_mut().map(|v| v.view_mut()),
                grad_log_h: grad_log_h.view_mut(),
            },
        )?;
        if let Some(v) = &log_h {
            crate::smc::check_finite(v, step, "log h")?;
        }
        crate::smc::check_finite(&grad_log_h, step, "h-function gradient")
    }

    /// An h-function's `log h`, `∇log h` and Laplacian `Δlog h` at `level`
    /// ([`HLaplacian::evaluate_with_laplacian`], with Hutchinson `probes` where it needs
    /// them), counted as one h-function evaluation per row; a non-finite value is
    /// [`Error::NonFinite`] at `step`.
    pub fn h_function_laplacian(
        &self,
        h: &dyn HLaplacian,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        probes: ArrayView3<f64>,
        out: HOutput<'_>,
        mut laplacian: ArrayViewMut1<f64>,
        step: usize,
    ) -> Result<()> {
        self.count_h_function(h.dim(), x.nrows())?;
        let HOutput {
            mut log_h,
            mut grad_log_h,
        } = out;
        h.evaluate_with_laplacian(
            level,
            x,
            probes,
            HOutput {
                log_h: log_h.as_mut().map(|v| v.view_mut()),
                grad_log_h: grad_log_h.view_mut(),
            },
            laplacian.view_mut(),
        )?;
        if let Some(v) = &log_h {
            crate::smc::check_finite(v, step, "log h")?;
        }
        crate::smc::check_finite(&grad_log_h, step, "h-function gradient")?;
        crate::smc::check_finite(&laplacian, step, "h-function Laplacian")
    }

    /// An h-function's `log h` alone at `level` ([`HLaplacian::evaluate_log_h`]), counted as
    /// one h-function evaluation per row; a non-finite value is [`Error::NonFinite`] at `step`.
    pub fn h_function_log_h(
        &self,
        h: &dyn HLaplacian,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        mut log_h: ArrayViewMut1<f64>,
        step: usize,
    ) -> Result<()> {
        self.count_h_function(h.dim(), x.nrows())?;
        h.evaluate_log_h(level, x, log_h.view_mut())?;
        crate::smc::check_finite(&log_h, step, "log h")
    }

    /// `log q̃_t(x) = Σ_e γ_e log p_e(x) + β r(x)` at `level` for every row; needs log-densities.
    pub fn log_density(
        &self,
        level: &NoiseLevel,
        beta: f64,
        x: ArrayView2<f64>,
        mut out: ArrayViewMut1<f64>,
    ) -> Result<()> {
        self.log_density_and_gradient(level, beta, x, out.view_mut(), None)
    }

    /// `log q̃_t` and optionally its gradient `S_t = Σ γ_e s_e + β ∇r` for every row.
    pub fn log_density_and_gradient(
        &self,
        level: &NoiseLevel,
        beta: f64,
        x: ArrayView2<f64>,
        mut out: ArrayViewMut1<f64>,
        mut gradient: Option<ArrayViewMut2<f64>>,
    ) -> Result<()> {
        let (n, d) = x.dim();
        out.fill(0.0);
        if let Some(g) = gradient.as_mut() {
            g.fill(0.0);
        }
        let mut score = Array2::zeros((n, d));
        let mut logp = Array1::zeros(n);
        for (e, ex) in self.experts.iter().enumerate() {
            if !ex.model.provides_log_density() {
                return Err(Error::Unsupported(format!(
                    "experts[{e}] has no log-density"
                )));
            }
            self.expert_score(
                e,
                level,
                x,
                ScoreOutput {
                    score: score.view_mut(),
                    log_density: Some(logp.view_mut()),
                    divergence: None,
                },
            )?;
            out.scaled_add(ex.gamma, &logp);
            if let Some(g) = gradient.as_mut() {
                g.scaled_add(ex.gamma, &score);
            }
        }
        if beta != 0.0 && self.reward.is_some() {
            self.reward_eval(
                x,
                RewardOutput {
                    value: Some(logp.view_mut()),
                    gradient: gradient.as_ref().map(|_| score.view_mut()),
                    laplacian: None,
                },
            )?;
            out.scaled_add(beta, &logp);
            if let Some(g) = gradient.as_mut() {
                g.scaled_add(beta, &score);
            }
        }
        Ok(())
    }

    /// Experts as mixtures at `level` with their exponents, when every expert is a mixture.
    pub fn mixture_factors(&self, level: &NoiseLevel) -> Option<Vec<(GaussianMixture, f64)>> {
        self.experts
            .iter()
            .map(|e| e.model.as_mixture().map(|m| (m.at_level(level), e.gamma)))
            .collect()
    }

    /// The exact terminal law `q_T ∝ Π_e p_{e,τ_min}^{γ_e} e^{r}` at the grid's last point
    /// (the sampler's data law, MATH.md §1.2), when it has a closed form.
    pub fn exact_terminal_law(&self, grid: &TimeGrid) -> Option<ExactLaw> {
        let factors = self.mixture_factors(&grid.level(grid.len()))?;
        let reward = match &self.reward {
            Some(r) => Some(r.closed_form()?),
            None => None,
        };
        ExactLaw::new(&factors, reward)
    }

    /// Draws the initial particles from the first expert's own `p⃖_{0,0}` (no annealing, no
    /// reward): the start of the base reverse process, used by the base sampler and URGE.
    pub fn sample_base_initial(
        &self,
        grid: &TimeGrid,
        n: usize,
        streams: &Streams,
    ) -> Result<Initial> {
        let base = Target::new(
            vec![Expert {
                model: self.experts[0].model.clone(),
                gamma: 1.0,
            }],
            None,
            self.tilt,
        )?;
        base.sample_initial(grid, n, streams)
    }

    /// Draws the initial particles from `q_0 ∝ Π_e p⃖_{e,0}^{γ_e}` (`β_0 = 0`, MATH.md §2.3):
    /// exactly when the experts are mixtures with a closed form; otherwise from the Gaussian
    /// `N(0, σ_ref²/Γ I)` with importance weights `log q̃_0 − log Q_0` when log-densities
    /// exist, or as the exact `q_0` of the Gaussian reference `p⃖_0 = N(0, σ_ref² I)` that
    /// defines the start of learned models.
    pub fn sample_initial(&self, grid: &TimeGrid, n: usize, streams: &Streams) -> Result<Initial> {
        let level = grid.level(0);
        if let Some(law) = self
            .mixture_factors(&level)
            .and_then(|f| ExactLaw::new(&f, None))
        {
            let (x, log_z) = law.sample(n, streams, Purpose::Init);
            return Ok(Initial {
                x,
                log_weights: Array1::from_elem(n, log_z),
                log_normalizer: Some(log_z),
            });
        }
        let (d, gamma) = (self.dim as f64, self.total_gamma());
        let sd = grid.schedule().reference_std() / gamma.sqrt();
        let mut x = Array2::zeros((n, self.dim));
        x.axis_iter_mut(ndarray::Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(i, mut row)| {
                let mut rng = streams.rng(Purpose::Init, 0, i);
                row.mapv_inplace(|_| {
                    sd * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut rng)
                });
            });
        let log_2pi = (2.0 * std::f64::consts::PI).ln();
        if self.experts.iter().all(|e| e.model.provides_log_density()) {
            let mut log_q = Array1::zeros(n);
            self.log_density(&level, 0.0, x.view(), log_q.view_mut())?;
            let log_proposal = x
                .rows()
                .into_iter()
                .map(|r| -0.5 * (d * (log_2pi + 2.0 * sd.ln()) + r.dot(&r) / (sd * sd)));
            let log_weights = Array1::from_iter(log_q.iter().zip(log_proposal).map(|(q, p)| q - p));
            return Ok(Initial {
                x,
                log_weights,
                log_normalizer: None,
            });
        }
        let s2 = grid.schedule().reference_std().powi(2);
        let log_z = 0.5 * d * (1.0 - gamma) * (log_2pi + s2.ln()) - 0.5 * d * gamma.ln();
        Ok(Initial {
            x,
            log_weights: Array1::from_elem(n, log_z),
            log_normalizer: Some(log_z),
        })
    }
}
