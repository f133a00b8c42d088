//! The one sampling loop every method runs through (MATH.md §3.2, DESIGN.md §1).
//!
//! ```text
//! init:  x ~ q_0, ℓ = ℓ_0, log Ẑ = log Z_0
//! for k = 0..M-1:
//!     advance   x' = K_k(x), Δℓ = increment_k(x, x', ξ, carry, W)       (the method)
//!     reweight  log Ẑ += LSE(ℓ + Δℓ);  ℓ ← normalise(ℓ + Δℓ)           (NaN → error)
//!     observe   StepInfo (ESS, potential variance, θ, evaluations)
//!     resample  if k+1 < M and (policy fires or N_{k+1} ≠ N_k)
//! ```

use std::time::{Duration, Instant};

use ndarray::{Array1, Array2, ArrayBase, Data, Dimension};

use crate::error::{Error, Result};
use crate::method::{Method, StepContext};
use crate::population::Population;
use crate::resample::Scheme;
use crate::rng::{Purpose, Streams};
use crate::schedule::TimeGrid;
use crate::target::{EvaluationCounts, Target};
use crate::weights::{LogWeights, log_sum_exp};

/// When to resample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResamplePolicy {
    /// Never (weighted output).
    Never,
    /// When `ESS < threshold · N` (MATH.md §3.3; default threshold 0.5).
    Ess {
        /// `κ ∈ (0, 1]`.
        threshold: f64,
    },
    /// After every `period` steps.
    Every {
        /// Period in steps (≥ 1).
        period: usize,
    },
}

/// How many particles live at each step.
#[derive(Clone, Debug, PartialEq)]
pub enum ParticleSchedule {
    /// `N` throughout.
    Constant(usize),
    /// `N_k` for each step `k = 0..M` (length `M`); the engine resamples when it changes.
    PerStep(Vec<usize>),
}

impl ParticleSchedule {
    /// `N_k`.
    pub fn count(&self, k: usize) -> usize {
        match self {
            ParticleSchedule::Constant(n) => *n,
            ParticleSchedule::PerStep(v) => v[k.min(v.len() - 1)],
        }
    }
}

/// The shape of a funnel schedule: relative particle counts `ϖ_j` of the blocks, with
/// `ϖ_0 = 1` and non-increasing (MATH.md §8.4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FunnelShape {
    /// `ϖ_j = 1 − (1 − ϖ_J) j/J`, falling linearly to `final_fraction`.
    Linear {
        /// `ϖ_J ∈ (0, 1]`.
        final_fraction: f64,
    },
    /// `ϖ_j = ratio^j` (halving for 0.5, the default).
    Geometric {
        /// Ratio in `(0, 1)`.
        ratio: f64,
    },
    /// `ϖ = 1` for blocks starting before the fraction `switch` of the steps, `final_fraction`
    /// after.
    TwoPhase {
        /// Switching point as a fraction of the steps, in `(0, 1)`.
        switch: f64,
        /// `ϖ_min ∈ (0, 1]`.
        final_fraction: f64,
    },
}

/// A funnel (F-SMC) particle schedule solved for a budget (MATH.md §8.4): `blocks` blocks of
/// near-equal length, counts `N_j = max(n_min, round(N_0 ϖ_j))`, and the largest `N_0` with
/// `Σ_j N_j L_j ≤ N̄ M`, so that it costs no more model evaluations than `N̄` particles for
/// all `M` steps. Returns the per-step counts and their total (the planned budget).
pub fn funnel(
    shape: FunnelShape,
    budget_particles: usize,
    steps: usize,
    blocks: usize,
    n_min: usize,
) -> Result<(ParticleSchedule, u64)> {
    let bad = |field: &str, reason: &str| Err(Error::invalid(format!("funnel.{field}"), reason));
    if blocks == 0 || blocks > steps {
        return bad("blocks", "must lie in 1..=steps");
    }
    if budget_particles == 0 {
        return Err(Error::invalid("particles", "must be at least 1"));
    }
    if n_min == 0 || n_min > budget_particles {
        return bad("min", "must lie in 1..=particles");
    }
    let in_unit = |v: f64| v > 0.0 && v <= 1.0;
    let fractions: Vec<f64> = (0..blocks)
        .map(|j| {
            let last = (blocks - 1).max(1) as f64;
            match shape {
                FunnelShape::Linear { final_fraction } => {
                    1.0 - (1.0 - final_fraction) * j as f64 / last
                }
                FunnelShape::Geometric { ratio } => ratio.powi(j as i32),
                FunnelShape::TwoPhase {
                    switch,
                    final_fraction,
                } => {
                    if (j * steps) as f64 / (blocks as f64) < switch * steps as f64 {
                        1.0
                    } else {
                        final_fraction
                    }
                }
            }
        })
        .collect();
    match shape {
        FunnelShape::Linear { final_fraction } | FunnelShape::TwoPhase { final_fraction, .. }
            if !in_unit(final_fraction) =>
        {
            return bad("final_fraction", "must lie in (0, 1]");
        }
        FunnelShape::Geometric { ratio } if !(ratio > 0.0 && ratio < 1.0) => {
            return bad("ratio", "must lie in (0, 1)");
        }
        FunnelShape::TwoPhase { switch, .. } if !(switch > 0.0 && switch < 1.0) => {
            return bad("switch", "must lie in (0, 1)");
        }
        _ => {}
    }
    // Block lengths: the first `steps % blocks` blocks get one extra step.
    let lengths: Vec<usize> = (0..blocks)
        .map(|j| steps / blocks + usize::from(j < steps % blocks))
        .collect();
    let counts = |n0: usize| -> Vec<usize> {
        fractions
            .iter()
            .map(|f| ((n0 as f64 * f).round() as usize).max(n_min))
            .collect()
    };
    let total = |n0: usize| -> u64 {
        counts(n0)
            .iter()
            .zip(&lengths)
            .map(|(n, l)| (n * l) as u64)
            .sum()
    };
    let budget = (budget_particles * steps) as u64;
    // The total is non-decreasing in N_0: bisect for the largest N_0 within the budget.
    let (mut lo, mut hi) = (1usize, budget_particles * steps + 1);
    if total(lo) > budget {
        return bad("min", "the minimum count alone exceeds the budget");
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if total(mid) <= budget {
            lo = mid
        } else {
            hi = mid
        }
    }
    let per_block = counts(lo);
    let per_step: Vec<usize> = per_block
        .iter()
        .zip(&lengths)
        .flat_map(|(&n, &l)| std::iter::repeat_n(n, l))
        .collect();
    Ok((ParticleSchedule::PerStep(per_step), total(lo)))
}

/// Engine settings shared by every method.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Particle counts.
    pub particles: ParticleSchedule,
    /// Resampling trigger.
    pub policy: ResamplePolicy,
    /// Resampling scheme.
    pub scheme: Scheme,
    /// Resample once more after the last step, for an unweighted output.
    pub final_resample: bool,
    /// Let the policy resample only while the elapsed fraction of sampling time
    /// `s = (t − t_0)/(t_M − t_0)` after the step lies in `[start, end]` (FK steering's
    /// resampling window); `None` for the whole run. Particle-count changes always resample.
    pub window: Option<(f64, f64)>,
    /// Seed of every random stream of the run.
    pub seed: u64,
}

impl Settings {
    /// Validates counts and policy against a grid of `steps` steps.
    pub fn validate(&self, steps: usize) -> Result<()> {
        match &self.particles {
            ParticleSchedule::Constant(0) => {
                return Err(Error::invalid("particles", "must be at least 1"));
            }
            ParticleSchedule::PerStep(v) => {
                if v.len() != steps {
                    return Err(Error::Dimension {
                        context: "particle schedule (one count per step)".into(),
                        expected: steps,
                        found: v.len(),
                    });
                }
                if let Some(k) = v.iter().position(|&n| n == 0) {
                    return Err(Error::invalid(
                        format!("particles[{k}]"),
                        "must be at least 1",
                    ));
                }
            }
            _ => {}
        }
        if let Some((a, b)) = self.window
            && !((0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&b) && a <= b)
        {
            return Err(Error::invalid(
                "resampling.window",
                format!("must satisfy 0 ≤ start ≤ end ≤ 1, got [{a}, {b}]"),
            ));
        }
        match self.policy {
            ResamplePolicy::Ess { threshold } if !(threshold > 0.0 && threshold <= 1.0) => {
                Err(Error::invalid(
                    "resampling.threshold",
                    format!("must lie in (0, 1], got {threshold}"),
                ))
            }
            ResamplePolicy::Every { period: 0 } => {
                Err(Error::invalid("resampling.period", "must be at least 1"))
            }
            _ => Ok(()),
        }
    }
}

/// Diagnostics of one step, sent to observers.
#[derive(Clone, Debug, PartialEq)]
pub struct StepInfo {
    /// Step index `k`.
    pub step: usize,
    /// Sampling time `t_{k+1}` reached by the step.
    pub t: f64,
    /// Particles during the step.
    pub num_particles: usize,
    /// `ESS/N` after reweighting (before any resampling).
    pub ess_fraction: f64,
    /// `Var_W(φ_k)` of the potential rate (`Δℓ/Δt`), for weighted methods.
    pub potential_variance: Option<f64>,
    /// Whether the population was resampled after this step.
    pub resampled: bool,
    /// Running `log Ẑ`.
    pub log_normalizer: f64,
    /// Control coefficients `θ` (DriftLite), empty otherwise.
    pub theta: Vec<f64>,
    /// `Var_W(G)` before control (DriftLite), for comparison with `potential_variance`.
    pub uncontrolled_variance: Option<f64>,
    /// Temperature chosen by an adaptive schedule at this step.
    pub temperature: Option<f64>,
    /// Evaluations made during this step.
    pub evaluations: EvaluationCounts,
}

/// Everything a run returns.
#[derive(Clone, Debug)]
pub struct Run {
    /// `N × d` final particles.
    pub samples: Array2<f64>,
    /// Their normalised log-weights.
    pub log_weights: Array1<f64>,
    /// `log Ẑ`, the estimate of the log-normaliser of `q_T` (MATH.md §3.5).
    pub log_normalizer: f64,
    /// Per-step diagnostics.
    pub trace: Vec<StepInfo>,
    /// Total evaluations.
    pub evaluations: EvaluationCounts,
    /// Wall-clock time of the run.
    pub wall_time: Duration,
    /// Number of resampling events (excluding the optional final one).
    pub resampling_events: usize,
}

impl Run {
    /// Final `ESS/N`.
    pub fn ess_fraction(&self) -> f64 {
        let n = self.log_weights.len() as f64;
        let (w, _) =
            LogWeights::from_unnormalized(self.log_weights.clone(), 0).expect("normalised weights");
        w.ess() / n
    }
}

/// Runs `method` on `target` over `grid`, calling `observe` after every step.
pub fn run(
    method: &mut dyn Method,
    target: &Target,
    grid: &TimeGrid,
    settings: &Settings,
    observe: &mut dyn FnMut(&StepInfo),
) -> Result<Run> {
    settings.validate(grid.len())?;
    let start = Instant::now();
    let counts_at_start = target.evaluations().snapshot();
    let streams = Streams::new(settings.seed);
    let n0 = settings.particles.count(0);
    let initial = method.initialize(target, grid, n0, &streams)?;
    check_finite(&initial.x, 0, "initial position")?;
    let mut log_normalizer = initial
        .log_normalizer
        .unwrap_or_else(|| log_sum_exp(initial.log_weights.view()) - (n0 as f64).ln());
    let (mut weights, _) = LogWeights::from_unnormalized(initial.log_weights, 0)?;
    let mut population = Population::new(initial.x, method.carry_width());
    let mut increments = Array1::zeros(n0);
    let mut ancestors = Vec::new();
    let mut trace = Vec::with_capacity(grid.len());
    let mut resampling_events = 0;
    let m = grid.len();
    for step in grid.steps() {
        let k = step.index;
        let before = target.evaluations().snapshot();
        let ctx = StepContext {
            step,
            beta: (target.tilt().beta(grid, k), target.tilt().beta(grid, k + 1)),
            streams: &streams,
        };
        increments.fill(0.0);
        let stats = method.advance(&ctx, &mut population, &weights, increments.view_mut())?;
        check_finite(&population.x, k, "position")?;
        let potential_variance = method
            .weighted()
            .then(|| weights.variance(increments.view()) / (step.dt * step.dt));
        log_normalizer += weights.reweight(increments.view(), k)?;
        let n = population.len();
        let ess_fraction = weights.ess() / n as f64;
        let next = settings.particles.count(k + 1);
        let elapsed = (step.t.1 - grid.time(0)) / (grid.time(m) - grid.time(0));
        let in_window = settings
            .window
            .is_none_or(|(a, b)| (a..=b).contains(&elapsed));
        let fires = method.weighted()
            && in_window
            && match settings.policy {
                ResamplePolicy::Never => false,
                ResamplePolicy::Ess { threshold } => ess_fraction < threshold,
                ResamplePolicy::Every { period } => (k + 1).is_multiple_of(period),
            };
        let resampled = k + 1 < m && (fires || next != n);
        if resampled {
            resample(
                &mut population,
                &mut weights,
                settings.scheme,
                next,
                &streams,
                k,
                &mut ancestors,
            );
            increments = Array1::zeros(next);
            resampling_events += 1;
        }
        let info = StepInfo {
            step: k,
            t: step.t.1,
            num_particles: n,
            ess_fraction,
            potential_variance,
            resampled,
            log_normalizer,
            theta: stats.theta,
            uncontrolled_variance: stats.uncontrolled_variance,
            temperature: stats.temperature,
            evaluations: target.evaluations().snapshot().since(&before),
        };
        observe(&info);
        trace.push(info);
    }
    if settings.final_resample && method.weighted() {
        let n = population.len();
        resample(
            &mut population,
            &mut weights,
            settings.scheme,
            n,
            &streams,
            m,
            &mut ancestors,
        );
    }
    Ok(Run {
        samples: population.x,
        log_weights: weights.log_weights().to_owned(),
        log_normalizer,
        trace,
        evaluations: target.evaluations().snapshot().since(&counts_at_start),
        wall_time: start.elapsed(),
        resampling_events,
    })
}

fn resample(
    population: &mut Population,
    weights: &mut LogWeights,
    scheme: Scheme,
    m: usize,
    streams: &Streams,
    step: usize,
    ancestors: &mut Vec<usize>,
) {
    let w = weights.normalized();
    scheme.ancestors(
        w.view(),
        m,
        &mut streams.rng(Purpose::Resample, step, 0),
        ancestors,
    );
    population.select(ancestors);
    *weights = LogWeights::uniform(m);
}

/// Errors with the step and first particle when any entry of `x` (one row per particle, or
/// one entry per particle) is NaN or infinite.
pub fn check_finite<S, D>(x: &ArrayBase<S, D>, step: usize, what: &'static str) -> Result<()>
where
    S: Data<Elem = f64>,
    D: Dimension,
{
    let width = if x.ndim() > 1 {
        x.len() / x.shape()[0].max(1)
    } else {
        1
    };
    match x.iter().position(|v| !v.is_finite()) {
        Some(pos) => Err(Error::NonFinite {
            step,
            what,
            particle: pos / width.max(1),
        }),
        None => Ok(()),
    }
}
