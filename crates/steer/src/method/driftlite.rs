//! DriftLite: variance- and energy-controlling guidance (MATH.md §5).
//!
//! On top of the guided drift, particles move with a control `b = Σ_a θ_a B_a` and pay for it
//! in the weights with the compensating potential `H_a = S·B_a + ∇·B_a`, which has zero mean
//! under `q_t` (§5.1), so the target is unchanged: the increment is `Δt (G + θ·H)`. Each
//! step chooses `θ` by one small linear solve over the current weighted particles:
//!
//! * VCG (§5.3): `A = Cov_W(H, H)`, `c = −Cov_W(G, H)` — the exact minimiser of the empirical
//!   weighted variance of the potential;
//! * ECG (§5.4): `A = E_W[B_a·B_b]`, `c = Cov_W(G, χ)` with scalar bases `χ_a`, `B_a = ∇χ_a`.
//!
//! Bases (§5.5): the reward gradient `∇r` (`∇·B = Δr`, `χ = r`), each expert's score `s_e`
//! (`∇·B = ∇·s_e`, `χ = log p_e`) and the forward drift `−f̄ x` (`∇·B = −f̄ d`,
//! `χ = −f̄|x|²/2`; absent under VE). The solve is ridge-regularised with Jacobi scaling
//! (§5.6). Iterative refinement (§5.10) runs several passes, each fitting a correction on top
//! of the previous pass's `θ`. [`Control::None`] fits nothing (`θ = 0`): G-SMC (§4.4) on the
//! same path.
//!
//! # The Doob path ([`DriftLite::with_doob`])
//! The reward path `q̃_t = Π_e p⃖_{e,t}^{γ_e} e^{β_t r}` (§2.2) may be replaced by any path
//! `Π_e p⃖_{e,t}^{γ_e} e^{ρ_t}` that ends at `ρ_T = r`: the master form of §4.2 holds for a
//! general `ρ_t` with `β_t r → ρ_t`,
//! `G = ∂_t ρ − (Γ − 1) f d + f x·∇ρ + ½U⃖² (Δρ + |S|² − Σ_e γ_e |s_e|²)` with
//! `S = Σ_e γ_e s_e + ∇ρ`. With an h-function `ĥ` (§7), the Doob path takes
//! `ρ_k = log(ĥ_{t_k} + h_min)` for `k < M` and `ρ_M = r`, and the per-step form (§4.3) is
//!
//! `Δt G_k = (ρ_{k+1} − ρ_k)(x_k) − (Γ − 1) d 𝓕_k + 𝓕_k x·∇ρ_k + ½𝒰_k (Δρ_k + |S_k|² − Σ_e γ_e |s_e|²)`
//!
//! (for one expert with `γ = 1` the bracket is `Δρ + 2 s·∇ρ + |∇ρ|²`). The guided drift with
//! `S = s + ∇log h` is the Doob drift of §7.2, so with the exact `h` of `p` and `r` the path
//! is transported exactly, `G ≡ 0` in continuous time and `Δt G_k = O(Δt²)`: the weights stay
//! nearly flat and only correct the discretisation; with a learned `ĥ` they correct its
//! regression error as well. The reward basis becomes `∇ρ_k` (`∇·B = Δρ_k`, ECG scalar
//! `χ = ρ_k`). Per step this costs one h-function evaluation with the Laplacian at `(t_k, x_k)`
//! and one value of `ĥ_{t_{k+1}}` at `x_k` (the reward value `r(x_{M−1})` at the last step).
//! The particles start from the target's `q_0 ∝ Π_e p⃖_{e,0}^{γ_e}` (§2.3) with the
//! importance weights `ρ_0(x_0)`, so `log Ẑ` still estimates `log Z_T` (§3.5).
//!
//! The floor `h_min` of a learned `ĥ` (§7.4) enters smoothly, `ρ = log(ĥ + h_min)`, with
//! `∇ρ = w ∇log ĥ` and `Δρ = w Δlog ĥ + w(1 − w)|∇log ĥ|²` for `w = ĥ/(ĥ + h_min)`: the drift
//! `∇ĥ/(ĥ + h_min)` is a smoothed §7.4 guidance `∇ĥ/max(ĥ, h_min)`. The kinked
//! `log max(ĥ, h_min)` of URGE's twist would not do here: its Laplacian has a singular part
//! `|∇log ĥ| δ` on the surface `ĥ = h_min`, which left-point potentials never see, so the
//! weights would be biased however fine the grid (measured with the exact h and
//! `h_min = 0.1`: +0.022 in P(x > 0), +0.085 in the mean, −0.029 in `log Ẑ` at both M = 200
//! and 400 on the 1-D mixture of `tests/doob_driftlite.rs`).

use std::sync::Arc;

use ndarray::{Array1, Array2, Array3, ArrayViewMut1, Axis, Zip};
use rand_distr::{Distribution, StandardNormal};

use super::{Method, StepContext, StepStats};
use crate::doob::{Clip, HLaplacian, HOutput};
use crate::error::{Error, Result};
use crate::linalg::{self, axpy, dot};
use crate::model::{NoiseLevel, Probe, ScoreOutput, hutchinson_divergence, hutchinson_probes};
use crate::population::Population;
use crate::reward::RewardOutput;
use crate::rng::{Purpose, Streams};
use crate::schedule::TimeGrid;
use crate::smc::{self, Run, Settings, StepInfo, check_finite};
use crate::target::{Initial, Target};
use crate::weights::LogWeights;

/// How `θ` is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Variance-controlling guidance (VCG).
    Variance,
    /// Energy-controlling guidance (ECG); needs the experts' log-densities.
    Energy,
    /// No control (`θ = 0`, no bases): G-SMC (MATH.md §4.4) on the sampler's path, the
    /// Feynman–Kac corrector `Δt G` alone.
    None,
}

/// How `∇·s_e` of the score bases is obtained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DivergenceEstimator {
    /// The model's exact divergence (Gaussian mixtures).
    Exact,
    /// Hutchinson's estimator with central-difference Jacobian-vector products (§5.7).
    Hutchinson {
        /// Probes per particle and step (default 1).
        probes: usize,
        /// Probe distribution.
        probe: Probe,
    },
}

/// DriftLite settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DriftLiteConfig {
    /// VCG or ECG.
    pub control: Control,
    /// Ridge `ε_r` added to the Jacobi-scaled matrix (default 1e-8, §5.6).
    pub ridge: f64,
    /// Divergence of the score bases.
    pub divergence: DivergenceEstimator,
}

impl DriftLiteConfig {
    /// Checks the ridge and the probe count.
    pub fn validate(&self) -> Result<()> {
        if !(self.ridge.is_finite() && self.ridge >= 0.0) {
            return Err(Error::invalid(
                "driftlite.ridge",
                format!("must be finite and ≥ 0, got {}", self.ridge),
            ));
        }
        if let DivergenceEstimator::Hutchinson { probes: 0, .. } = self.divergence {
            return Err(Error::invalid("driftlite.probes", "must be at least 1"));
        }
        Ok(())
    }
}

/// One control basis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Basis {
    /// The path field: `∇r` on the reward path, `∇ρ_k` on the Doob path.
    Reward,
    Score(usize),
    Drift,
}

/// DriftLite VCG/ECG as a [`Method`]; resampling is the engine's policy (never for VCG/ECG,
/// ESS-triggered for VCG-SMC/ECG-SMC).
#[derive(Debug)]
pub struct DriftLite<'a> {
    target: &'a Target,
    config: DriftLiteConfig,
    /// Controls of a previous refinement pass, one `θ` per step (§5.10).
    previous: Option<Vec<Vec<f64>>>,
    /// The h-function of the Doob path and its floor, when the path is `p⃖_t ĥ_t`.
    doob: Option<(Arc<dyn HLaplacian>, Clip)>,
    /// Noise levels of the grid points `t_0..=t_M`, recorded at initialisation (the Doob path
    /// evaluates `ĥ` at `t_{k+1}`).
    levels: Vec<NoiseLevel>,
    buffers: Buffers,
}

/// The particle index offset of the Hutchinson probes of a learned `ĥ`'s Laplacian: their
/// streams `(Probe, k, OFFSET + i)` never meet the score probes' `(Probe, k, i·E + e)`.
const H_PROBE_STREAM: usize = 1 << 31;

#[derive(Debug, Default)]
struct Buffers {
    scores: Vec<Array2<f64>>,
    divergences: Vec<Array1<f64>>,
    log_densities: Vec<Array1<f64>>,
    tilted: Array2<f64>,
    reward: Array1<f64>,
    reward_gradient: Array2<f64>,
    reward_laplacian: Array1<f64>,
    /// `N` potential rates `G`.
    potential: Array1<f64>,
    /// `N × n` basis potentials `H_a`.
    compensators: Array2<f64>,
    /// `N × n` scalar bases `χ_a` (ECG).
    scalars: Array2<f64>,
    /// `N × n²` products `B_a·B_b` (ECG).
    gram: Array2<f64>,
    /// Doob path: `ρ_{k+1}(x_k)` (`N`).
    rho_next: Array1<f64>,
}

impl<'a> DriftLite<'a> {
    /// DriftLite on `target`.
    pub fn new(target: &'a Target, config: DriftLiteConfig) -> Result<Self> {
        config.validate()?;
        let lacking = |has: fn(&dyn crate::model::ScoreModel) -> bool| {
            target.experts().iter().position(|e| !has(e.model.as_ref()))
        };
        if config.control == Control::Energy
            && let Some(e) = lacking(|m| m.provides_log_density())
        {
            return Err(Error::Unsupported(format!(
                "ECG needs log-densities for its score bases and experts[{e}] has none: use VCG"
            )));
        }
        if config.divergence == DivergenceEstimator::Exact
            && config.control != Control::None
            && let Some(e) = lacking(|m| m.provides_divergence())
        {
            return Err(Error::Unsupported(format!(
                "experts[{e}] has no exact divergence: use the Hutchinson estimator"
            )));
        }
        Ok(DriftLite {
            target,
            config,
            previous: None,
            doob: None,
            levels: Vec::new(),
            buffers: Buffers::default(),
        })
    }

    /// Runs on the Doob path `q̃_t = Π_e p⃖_{e,t}^{γ_e} ĥ_t` instead of the reward path: the
    /// proposal is the Doob drift `S = Σ_e γ_e s_e + ∇ρ_k` with
    /// `ρ_k = log(ĥ_{t_k} + h_min)` (`k < M`), `ρ_M = r`, and the weights are DriftLite's
    /// (or G-SMC's, with [`Control::None`]) for that path (see the module documentation).
    /// The target's reward schedule is not used; its reward enters at the last step only.
    ///
    /// `clip.h_min` floors `ĥ` smoothly (`ρ = log(ĥ + h_min)`, see the module documentation);
    /// `clip.g_max` is refused, since a norm clip of `∇ρ` would no longer be the gradient
    /// whose Laplacian the potential uses. Errors name the field: the target needs a reward,
    /// and `h` the target's dimension.
    pub fn with_doob(mut self, h: Arc<dyn HLaplacian>, clip: Clip) -> Result<Self> {
        clip.validate()?;
        if let Some(g) = clip.g_max {
            return Err(Error::invalid(
                "doob.g_max",
                format!(
                    "DriftLite on the Doob path cannot clip the norm of ∇log ĥ (got g_max = {g}): the clipped field is no gradient, so the potential's Laplacian Δρ would not match the drift; use h_min only"
                ),
            ));
        }
        if self.target.reward().is_none() {
            return Err(Error::invalid(
                "reward",
                "the Doob path ends at ρ_M = r: DriftLite with the Doob proposal needs the target's reward",
            ));
        }
        if h.dim() != self.target.dim() {
            return Err(Error::Dimension {
                context: "h-function of the Doob path (must match the target)".into(),
                expected: self.target.dim(),
                found: h.dim(),
            });
        }
        self.doob = Some((h, clip));
        Ok(self)
    }

    /// Starts from the per-step controls of a previous pass (iterative refinement).
    pub fn with_previous(mut self, previous: Vec<Vec<f64>>) -> Self {
        self.previous = Some(previous);
        self
    }

    fn bases(&self, drift_rate: f64) -> Vec<Basis> {
        let mut b = Vec::new();
        if self.config.control == Control::None {
            return b;
        }
        if self.target.reward().is_some() || self.doob.is_some() {
            b.push(Basis::Reward);
        }
        b.extend((0..self.target.experts().len()).map(Basis::Score));
        if drift_rate != 0.0 {
            b.push(Basis::Drift);
        }
        b
    }

    /// Evaluates, at the step's left point, the scores, rewards, the potential rate `G`, the
    /// basis potentials `H_a` (and the ECG scalars and Gram products) for every particle of
    /// `x`; returns the bases in use.
    fn evaluate(&mut self, ctx: &StepContext<'_>, x: &Array2<f64>) -> Result<Vec<Basis>> {
        let target = self.target;
        let step = ctx.step;
        let k = step.index;
        let (n, d) = x.dim();
        let experts = target.experts().len();
        let energy = self.config.control == Control::Energy;
        let f_rate = step.drift / step.dt;
        let bases = self.bases(f_rate);
        let nb = bases.len();
        let doob = self.doob.is_some();
        let b = &mut self.buffers;
        fit(b, experts, n, d, nb);
        let level = step.level();
        // G-SMC has no score bases, so it needs no score divergences.
        let score_bases = self.config.control != Control::None;
        let exact_div = score_bases && self.config.divergence == DivergenceEstimator::Exact;

        // Scores, with the divergence and log-density the bases need.
        for e in 0..experts {
            let hutchinson = match self.config.divergence {
                DivergenceEstimator::Hutchinson { probes, probe } if score_bases => {
                    Some((probes, probe))
                }
                _ => None,
            };
            let keyed = ctx.streams.keyed(Purpose::Probe);
            let rng = |i: usize| keyed.rng(k, i * experts + e);
            let autodiff = hutchinson.is_some() && target.experts()[e].model.provides_vjp();
            if autodiff && !energy {
                // One forward pass gives the score and, by one VJP per probe, the estimate.
                let (probes, probe) = hutchinson.expect("autodiff implies Hutchinson");
                let z = hutchinson_probes(n, d, probes, probe, rng);
                b.divergences[e] =
                    vjp_divergence(target, e, &level, x, &z, b.scores[e].view_mut())?;
                check_finite(&b.scores[e], k, "score")?;
                continue;
            }
            target.expert_score(
                e,
                &level,
                x.view(),
                ScoreOutput {
                    score: b.scores[e].view_mut(),
                    log_density: energy.then(|| b.log_densities[e].view_mut()),
                    divergence: exact_div.then(|| b.divergences[e].view_mut()),
                },
            )?;
            check_finite(&b.scores[e], k, "score")?;
            let Some((probes, probe)) = hutchinson else {
                continue;
            };
            if autodiff {
                // ECG also needs the log-density, so the score came from `expert_score`; the
                // VJP pass recomputes it into a scratch buffer.
                let z = hutchinson_probes(n, d, probes, probe, rng);
                let mut scratch = Array2::zeros((n, d));
                b.divergences[e] = vjp_divergence(target, e, &level, x, &z, scratch.view_mut())?;
            } else {
                let x = x.view();
                b.divergences[e] =
                    hutchinson_divergence(x, &level, probes, probe, rng, |xs, out| {
                        target.expert_score(
                            e,
                            &level,
                            xs,
                            ScoreOutput {
                                score: out,
                                log_density: None,
                                divergence: None,
                            },
                        )
                    })?;
            }
        }
        let (beta, beta_next) = ctx.beta;
        let has_reward = target.reward().is_some();
        if doob {
            // ρ_k, ∇ρ_k, Δρ_k into the reward buffers, ρ_{k+1}(x_k) into `rho_next`.
            self.doob_path(ctx, x)?;
        } else if has_reward {
            target.reward_eval(
                x.view(),
                RewardOutput {
                    value: Some(b.reward.view_mut()),
                    gradient: Some(b.reward_gradient.view_mut()),
                    laplacian: Some(b.reward_laplacian.view_mut()),
                },
            )?;
            check_finite(&b.reward_gradient, k, "reward gradient")?;
        }

        // Per particle: S, the potential rate G (MATH.md §4.3 divided by Δt), and H_a, χ_a, B_a·B_b.
        let gammas: Vec<f64> = target.experts().iter().map(|e| e.gamma).collect();
        let constant = -(target.total_gamma() - 1.0) * d as f64 * f_rate;
        let (u_rate, beta_rate) = (step.diffusion / step.dt, (beta_next - beta) / step.dt);
        // The path e^{ρ_k}: ρ_k = β_k r on the reward path (∇ρ = β ∇r, Δρ = β Δr, time
        // difference (β_{k+1} − β_k) r), the buffers' ρ_k itself on the Doob path.
        let has_field = has_reward || doob;
        let path_scale = if doob { 1.0 } else { beta };
        let inv_dt = 1.0 / step.dt;
        let b = &mut self.buffers;
        let Buffers {
            scores,
            divergences,
            log_densities,
            tilted,
            reward,
            reward_gradient,
            reward_laplacian,
            potential,
            compensators,
            scalars,
            gram,
            rho_next,
            ..
        } = &mut *b;
        let rho_next = &*rho_next;
        let (scores, divergences, log_densities) = (&*scores, &*divergences, &*log_densities);
        let (reward, reward_gradient, reward_laplacian) =
            (&*reward, &*reward_gradient, &*reward_laplacian);
        let per_particle = |i: usize,
                            x: &[f64],
                            s: &mut [f64],
                            h: &mut [f64],
                            chi: &mut [f64],
                            gram: &mut [f64]|
         -> f64 {
            s.fill(0.0);
            for (score, &gamma) in scores.iter().zip(&gammas) {
                axpy(s, gamma, score.row(i).to_slice().expect("contiguous"));
            }
            let grad = reward_gradient.row(i);
            let grad = grad.to_slice().expect("contiguous");
            if has_field {
                axpy(s, path_scale, grad);
            }
            let mut g = constant + 0.5 * u_rate * dot(s, s);
            for (score, &gamma) in scores.iter().zip(&gammas) {
                let se = score.row(i);
                let se = se.to_slice().expect("contiguous");
                g -= 0.5 * u_rate * gamma * dot(se, se);
            }
            if has_field {
                let time_difference = if doob {
                    (rho_next[i] - reward[i]) * inv_dt
                } else {
                    beta_rate * reward[i]
                };
                g += time_difference
                    + f_rate * path_scale * dot(x, grad)
                    + 0.5 * u_rate * path_scale * reward_laplacian[i];
            }
            let field = |a: usize| -> Option<&[f64]> {
                match bases[a] {
                    Basis::Reward => Some(grad),
                    Basis::Score(e) => Some(scores[e].row(i).to_slice().expect("contiguous")),
                    Basis::Drift => None,
                }
            };
            for a in 0..nb {
                // H_a = S·B_a + ∇·B_a; the drift field −f̄x is handled in closed form.
                h[a] = match bases[a] {
                    Basis::Reward => dot(s, grad) + reward_laplacian[i],
                    Basis::Score(e) => dot(s, field(a).unwrap()) + divergences[e][i],
                    Basis::Drift => -f_rate * (dot(s, x) + d as f64),
                };
                if energy {
                    chi[a] = match bases[a] {
                        Basis::Reward => reward[i],
                        Basis::Score(e) => log_densities[e][i],
                        Basis::Drift => -0.5 * f_rate * dot(x, x),
                    };
                    for c in 0..nb {
                        gram[a * nb + c] = match (field(a), field(c)) {
                            (Some(p), Some(q)) => dot(p, q),
                            (Some(p), None) | (None, Some(p)) => -f_rate * dot(p, x),
                            (None, None) => f_rate * f_rate * dot(x, x),
                        };
                    }
                }
            }
            g
        };
        let positions = x;
        Zip::indexed(tilted.rows_mut())
            .and(potential)
            .and(compensators.rows_mut())
            .and(scalars.rows_mut())
            .and(gram.rows_mut())
            .par_for_each(|i, mut s, g, mut h, mut chi, mut gram| {
                *g = per_particle(
                    i,
                    positions.row(i).to_slice().expect("contiguous"),
                    s.as_slice_mut().expect("contiguous"),
                    h.as_slice_mut().expect("contiguous"),
                    chi.as_slice_mut().expect("contiguous"),
                    gram.as_slice_mut().expect("contiguous"),
                );
            });
        check_finite(&b.potential, k, "potential")?;
        check_finite(&b.compensators, k, "compensating potential")?;

        Ok(bases)
    }

    /// The Doob path at step `k` for particles `x`: `ρ_k = log(ĥ_{t_k} + h_min)`, `∇ρ_k` and
    /// `Δρ_k` into the reward buffers, and `ρ_{k+1}(x_k)` (`r` at the last step) into
    /// `rho_next`.
    fn doob_path(&mut self, ctx: &StepContext<'_>, x: &Array2<f64>) -> Result<()> {
        let (h, clip) = self.doob.as_ref().expect("on the Doob path");
        let (h, clip) = (h.as_ref(), *clip);
        let target = self.target;
        let k = ctx.step.index;
        let (n, d) = x.dim();
        let steps = self.levels.len().saturating_sub(1);
        if k >= steps {
            return Err(Error::Unsupported(
                "DriftLite on the Doob path evaluates ĥ at the next grid point, whose noise level it records when the run starts: run it through smc::run".into(),
            ));
        }
        let probes = if h.laplacian_uses_probes() {
            let (count, probe) = match self.config.divergence {
                DivergenceEstimator::Hutchinson { probes, probe } => (probes, probe),
                DivergenceEstimator::Exact => (1, Probe::Rademacher),
            };
            let keyed = ctx.streams.keyed(Purpose::Probe);
            hutchinson_probes(n, d, count, probe, |i| keyed.rng(k, H_PROBE_STREAM + i))
        } else {
            Array3::zeros((0, n, d))
        };
        let b = &mut self.buffers;
        target.h_function_laplacian(
            h,
            &self.levels[k],
            x.view(),
            probes.view(),
            HOutput {
                log_h: Some(b.reward.view_mut()),
                grad_log_h: b.reward_gradient.view_mut(),
            },
            b.reward_laplacian.view_mut(),
            k,
        )?;
        if clip.h_min > 0.0 {
            // ρ = log(ĥ + h_min): ∇ρ = w ∇log ĥ, Δρ = w Δlog ĥ + w(1 − w)|∇log ĥ|².
            Zip::from(&mut b.reward)
                .and(b.reward_gradient.rows_mut())
                .and(&mut b.reward_laplacian)
                .par_for_each(|rho, mut grad, lap| {
                    let (floored, w) = smooth_floor(*rho, clip.h_min);
                    let norm2 = grad.dot(&grad);
                    *rho = floored;
                    *lap = w * *lap + w * (1.0 - w) * norm2;
                    grad.mapv_inplace(|g| w * g);
                });
        }
        if k + 1 < steps {
            target.h_function_log_h(h, &self.levels[k + 1], x.view(), b.rho_next.view_mut(), k)?;
            b.rho_next.mapv_inplace(|l| smooth_floor(l, clip.h_min).0);
        } else {
            target.reward_eval(
                x.view(),
                RewardOutput {
                    value: Some(b.rho_next.view_mut()),
                    ..Default::default()
                },
            )?;
            check_finite(&b.rho_next, k, "reward")?;
        }
        Ok(())
    }

    /// θ_k: the weighted VCG/ECG solve (§5.3–5.4), on top of a previous pass's θ_k when
    /// refining (§5.10). Needs [`Self::evaluate`] first.
    fn solve(&self, k: usize, nb: usize, weights: &LogWeights) -> Vec<f64> {
        if nb == 0 {
            return Vec::new();
        }
        let b = &self.buffers;
        let w = weights.normalized();
        let base_theta: Vec<f64> = match &self.previous {
            Some(prev) => prev.get(k).cloned().unwrap_or_default(),
            None => Vec::new(),
        };
        let base_theta = if base_theta.len() == nb {
            base_theta
        } else {
            vec![0.0; nb]
        };
        let mut effective = b.potential.clone();
        for a in 0..nb {
            effective.scaled_add(base_theta[a], &b.compensators.column(a));
        }
        let (a_mat, c_vec) = match self.config.control {
            Control::Variance => {
                let cov_hh = weighted_covariance(&w, &b.compensators, &b.compensators);
                let cov_gh = weighted_covariance(
                    &w,
                    &effective.view().insert_axis(Axis(1)).to_owned(),
                    &b.compensators,
                );
                (cov_hh, -cov_gh.row(0).to_owned())
            }
            // No bases, so `nb = 0` returned above.
            Control::None => return Vec::new(),
            Control::Energy => {
                let gram = w
                    .dot(&b.gram)
                    .into_shape_with_order((nb, nb))
                    .expect("n × n");
                let cov_gc = weighted_covariance(
                    &w,
                    &effective.view().insert_axis(Axis(1)).to_owned(),
                    &b.scalars,
                );
                (gram, cov_gc.row(0).to_owned())
            }
        };
        let delta = ridge_solve(&a_mat, &c_vec, self.config.ridge);
        let theta: Vec<f64> = base_theta
            .iter()
            .zip(delta.iter())
            .map(|(t, d)| t + d)
            .collect();

        theta
    }

    /// The proposal shift of URGE's DriftLite proposal for particles `x`: the guided part
    /// `½(𝒰 + 𝒱)(S − s_0)` plus the control `Δt b = Δt Σ_a θ_a B_a`, written into `out`
    /// (`N × d`); returns θ. The first expert's score at `x` is left in [`Self::score`].
    pub fn proposal_shift(
        &mut self,
        ctx: &StepContext<'_>,
        x: &Array2<f64>,
        weights: &LogWeights,
        out: &mut Array2<f64>,
    ) -> Result<Vec<f64>> {
        let bases = self.evaluate(ctx, x)?;
        let theta = self.solve(ctx.step.index, bases.len(), weights);
        let step = ctx.step;
        let (half, dt) = (0.5 * (step.diffusion + step.noise), step.dt);
        let f_rate = step.drift / dt;
        let b = &self.buffers;
        Zip::indexed(out.rows_mut()).par_for_each(|i, mut row| {
            for c in 0..row.len() {
                let drift_basis: f64 = bases
                    .iter()
                    .zip(&theta)
                    .filter(|(b, _)| **b == Basis::Drift)
                    .map(|(_, t)| -t * f_rate * x[[i, c]])
                    .sum();
                row[c] = half * (b.tilted[[i, c]] - b.scores[0][[i, c]])
                    + dt * (b.control(&bases, &theta, i, c) + drift_basis);
            }
        });
        Ok(theta)
    }

    /// Expert `e`'s score at the particles of the last evaluation.
    pub fn score(&self, e: usize) -> &Array2<f64> {
        &self.buffers.scores[e]
    }

    /// The potential rate `G` (`N`) and the basis potentials `H_a` (`N × n`, one column per
    /// basis: the path field `∇r` or `∇ρ_k`, one per expert, drift) at the step's left point,
    /// for particles `x`. On the Doob path this needs the grid's levels, recorded by
    /// [`Method::initialize`].
    /// A diagnostic (tests check `E_q[H_a] = 0`); [`Method::advance`] uses the same values.
    pub fn potentials(
        &mut self,
        ctx: &StepContext<'_>,
        x: &Array2<f64>,
    ) -> Result<(Array1<f64>, Array2<f64>)> {
        self.evaluate(ctx, x)?;
        Ok((
            self.buffers.potential.clone(),
            self.buffers.compensators.clone(),
        ))
    }
}

impl Method for DriftLite<'_> {
    fn name(&self) -> &str {
        match (self.config.control, self.doob.is_some()) {
            (Control::Variance, false) => "vcg",
            (Control::Energy, false) => "ecg",
            (Control::None, false) => "g-smc",
            (Control::Variance, true) => "vcg-doob",
            (Control::Energy, true) => "ecg-doob",
            (Control::None, true) => "g-smc-doob",
        }
    }

    fn weighted(&self) -> bool {
        true
    }

    /// Exact `q_0` of the target (MATH.md §2.3). On the Doob path the start is
    /// `q̃_0 = Π_e p⃖_{e,0}^{γ_e} e^{ρ_0}`, reached by the importance weights `ρ_0(x_0)`
    /// (one h-function evaluation), so that `log Ẑ` keeps estimating `log Z_T`.
    fn initialize(
        &mut self,
        target: &Target,
        grid: &TimeGrid,
        n: usize,
        streams: &Streams,
    ) -> Result<Initial> {
        self.levels = (0..=grid.len()).map(|k| grid.level(k)).collect();
        let mut init = target.sample_initial(grid, n, streams)?;
        if let Some((h, clip)) = &self.doob {
            let mut rho = Array1::zeros(n);
            target.h_function_log_h(
                h.as_ref(),
                &self.levels[0],
                init.x.view(),
                rho.view_mut(),
                0,
            )?;
            Zip::from(&mut init.log_weights)
                .and(&rho)
                .for_each(|l, &r| *l += smooth_floor(r, clip.h_min).0);
            // log Ẑ_0 = log mean e^{ℓ_0}: with exact draws ℓ_0 = log Z_0 + ρ_0.
            init.log_normalizer = None;
        }
        Ok(init)
    }

    fn advance(
        &mut self,
        ctx: &StepContext<'_>,
        population: &mut Population,
        weights: &LogWeights,
        mut increments: ArrayViewMut1<f64>,
    ) -> Result<StepStats> {
        let bases = self.evaluate(ctx, &population.x)?;
        let nb = bases.len();
        let (step, k) = (ctx.step, ctx.step.index);
        let theta = self.solve(k, nb, weights);
        let b = &mut self.buffers;

        // Increments Δt (G + θ·H) and the move with the control drift Δt Σ θ_a B_a.
        let uncontrolled_variance = weights.variance(b.potential.view());
        let dt = step.dt;
        Zip::from(&mut increments)
            .and(&b.potential)
            .and(b.compensators.rows())
            .par_for_each(|inc, &g, h| {
                *inc = dt * (g + theta.iter().zip(h.iter()).map(|(t, h)| t * h).sum::<f64>())
            });
        let (drift, half, noise_sd) = (
            step.drift,
            0.5 * (step.diffusion + step.noise),
            step.noise.sqrt(),
        );
        let noise = ctx.streams.keyed(Purpose::Noise);
        let bref = &*b;
        let drift_theta: f64 = bases
            .iter()
            .zip(&theta)
            .filter(|(b, _)| **b == Basis::Drift)
            .map(|(_, t)| *t)
            .sum();
        Zip::indexed(population.x.rows_mut())
            .and(bref.tilted.rows())
            .par_for_each(|i, mut x_row, s| {
                let x = x_row.as_slice_mut().expect("contiguous");
                let s = s.to_slice().expect("contiguous");
                let mut rng = noise.rng(k, i);
                // The drift basis −f̄x contributes −Δt θ f̄ x = −θ 𝓕 x.
                let own = drift * (1.0 - drift_theta);
                for c in 0..x.len() {
                    let control = bref.control(&bases, &theta, i, c);
                    let xi: f64 = StandardNormal.sample(&mut rng);
                    x[c] += own * x[c] + half * s[c] + dt * control + noise_sd * xi;
                }
            });
        Ok(StepStats {
            theta,
            uncontrolled_variance: Some(uncontrolled_variance),
            temperature: None,
        })
    }
}

impl Buffers {
    /// `Σ_a θ_a B_a` at coordinate `c` of particle `i`, for the field bases (the drift basis
    /// `−f̄x` is applied separately, as a rescaling of the forward drift).
    fn control(&self, bases: &[Basis], theta: &[f64], i: usize, c: usize) -> f64 {
        bases
            .iter()
            .zip(theta)
            .map(|(basis, t)| {
                t * match basis {
                    Basis::Reward => self.reward_gradient[[i, c]],
                    Basis::Score(e) => self.scores[*e][[i, c]],
                    Basis::Drift => 0.0,
                }
            })
            .sum::<f64>()
    }
}

/// The smooth floor of the Doob path: `(log(ĥ + h_min), ĥ/(ĥ + h_min))` from `log ĥ`, stable
/// for every finite `log ĥ`; `(log ĥ, 1)` when `h_min = 0`.
fn smooth_floor(log_h: f64, h_min: f64) -> (f64, f64) {
    if h_min <= 0.0 {
        return (log_h, 1.0);
    }
    let u = log_h - h_min.ln();
    // log(ĥ + h_min) = log h_min + softplus(u), w = sigmoid(u).
    let softplus = u.max(0.0) + (-u.abs()).exp().ln_1p();
    let w = if u >= 0.0 {
        1.0 / (1.0 + (-u).exp())
    } else {
        let e = u.exp();
        e / (1.0 + e)
    };
    (h_min.ln() + softplus, w)
}

fn fit(b: &mut Buffers, experts: usize, n: usize, d: usize, nb: usize) {
    if b.tilted.dim() != (n, d) || b.scores.len() != experts || b.compensators.ncols() != nb {
        b.scores = (0..experts).map(|_| Array2::zeros((n, d))).collect();
        b.divergences = (0..experts).map(|_| Array1::zeros(n)).collect();
        b.log_densities = (0..experts).map(|_| Array1::zeros(n)).collect();
        b.tilted = Array2::zeros((n, d));
        b.reward = Array1::zeros(n);
        b.reward_gradient = Array2::zeros((n, d));
        b.reward_laplacian = Array1::zeros(n);
        b.potential = Array1::zeros(n);
        b.compensators = Array2::zeros((n, nb));
        b.scalars = Array2::zeros((n, nb));
        b.gram = Array2::zeros((n, nb * nb));
        b.rho_next = Array1::zeros(n);
    }
}

/// `Cov_W(U_a, V_b)` for the columns of `u` (`N × p`) and `v` (`N × q`).
fn weighted_covariance(w: &Array1<f64>, u: &Array2<f64>, v: &Array2<f64>) -> Array2<f64> {
    let mu = w.dot(u);
    let mv = w.dot(v);
    let cu = u - &mu;
    let cv = v - &mv;
    let weighted = &cu * &w.view().insert_axis(Axis(1));
    weighted.t().dot(&cv)
}

/// Solves `A θ = c` as in MATH.md §5.6: drop bases with `A_aa < 10⁻¹² max A_aa`, scale to unit
/// diagonal, add the ridge `ε_r I`, and solve by Cholesky (the scaled matrix plus a positive
/// ridge is positive definite; with a zero ridge a singular system falls back to the
/// minimum-norm least-squares solution of the kept bases).
fn ridge_solve(a: &Array2<f64>, c: &Array1<f64>, ridge: f64) -> Array1<f64> {
    let n = c.len();
    let mut theta = Array1::zeros(n);
    let max_diag = (0..n).map(|i| a[[i, i]]).fold(0.0, f64::max);
    if !(max_diag > 0.0 && max_diag.is_finite()) {
        return theta;
    }
    let kept: Vec<usize> = (0..n).filter(|&i| a[[i, i]] >= 1e-12 * max_diag).collect();
    let m = kept.len();
    let scale: Vec<f64> = kept.iter().map(|&i| a[[i, i]].sqrt()).collect();
    let mut a_hat = Array2::from_shape_fn((m, m), |(p, q)| {
        a[[kept[p], kept[q]]] / (scale[p] * scale[q])
    });
    let c_hat = Array1::from_shape_fn(m, |p| c[kept[p]] / scale[p]);
    for p in 0..m {
        a_hat[[p, p]] += ridge;
    }
    let solved = match linalg::cholesky(a_hat.view()) {
        Ok(l) => linalg::cholesky_solve(l.view(), c_hat.view()),
        Err(_) => {
            // Minimum-norm fallback: a tiny ridge makes the system positive definite.
            let mut a2 = a_hat.clone();
            for p in 0..m {
                a2[[p, p]] += 1e-10;
            }
            match linalg::cholesky(a2.view()) {
                Ok(l) => linalg::cholesky_solve(l.view(), c_hat.view()),
                Err(_) => Array1::zeros(m),
            }
        }
    };
    for (p, &i) in kept.iter().enumerate() {
        theta[i] = solved[p] / scale[p];
    }
    theta
}

/// Iterative refinement (DriftLite Algorithm 2, MATH.md §5.10): `passes` runs, each starting
/// afresh from `q_0` with seed `settings.seed + pass` and fitting `θ_k` on top of the previous
/// pass's. Returns the last pass, with evaluation counts and wall time summed over passes.
pub fn refine(
    target: &Target,
    grid: &TimeGrid,
    settings: &Settings,
    config: DriftLiteConfig,
    passes: usize,
    observe: &mut dyn FnMut(usize, &StepInfo),
) -> Result<Run> {
    if passes == 0 {
        return Err(Error::invalid("driftlite.passes", "must be at least 1"));
    }
    let mut previous: Option<Vec<Vec<f64>>> = None;
    let mut total_evaluations = None;
    let mut wall = std::time::Duration::ZERO;
    let mut last = None;
    for pass in 0..passes {
        let mut method = DriftLite::new(target, config)?;
        if let Some(p) = previous.take() {
            method = method.with_previous(p);
        }
        let mut s = settings.clone();
        s.seed = settings.seed.wrapping_add(pass as u64);
        let run = smc::run(&mut method, target, grid, &s, &mut |info| {
            observe(pass, info)
        })?;
        previous = Some(run.trace.iter().map(|i| i.theta.clone()).collect());
        total_evaluations = Some(match total_evaluations {
            None => run.evaluations,
            Some(t) => add_counts(t, run.evaluations),
        });
        wall += run.wall_time;
        last = Some(run);
    }
    let mut run = last.expect("passes ≥ 1");
    run.evaluations = total_evaluations.expect("passes ≥ 1");
    run.wall_time = wall;
    Ok(run)
}

/// Hutchinson's `∇·s_e` from probes `z` (`P × N × d`) by one vector-Jacobian product per
/// probe (MATH.md §5.7); the score of expert `e` is written to `score`.
fn vjp_divergence(
    target: &Target,
    e: usize,
    level: &crate::model::NoiseLevel,
    x: &Array2<f64>,
    z: &ndarray::Array3<f64>,
    score: ndarray::ArrayViewMut2<f64>,
) -> Result<Array1<f64>> {
    let mut forms = Array2::zeros((z.len_of(Axis(0)), x.nrows()));
    target.expert_quadratic_forms(e, level, x.view(), z.view(), score, forms.view_mut())?;
    Ok(forms.mean_axis(Axis(0)).expect("at least one probe"))
}

fn add_counts(
    a: crate::target::EvaluationCounts,
    b: crate::target::EvaluationCounts,
) -> crate::target::EvaluationCounts {
    crate::target::EvaluationCounts {
        score: a.score + b.score,
        log_density: a.log_density + b.log_density,
        divergence: a.divergence + b.divergence,
        reward_value: a.reward_value + b.reward_value,
        reward_gradient: a.reward_gradient + b.reward_gradient,
        reward_laplacian: a.reward_laplacian + b.reward_laplacian,
        vjp: a.vjp + b.vjp,
        h_function: a.h_function + b.h_function,
    }
}

#[cfg(test)]
mod tests {
    use super::smooth_floor;

    /// `smooth_floor` against the direct `log(ĥ + h_min)` (1e-12 relative where that is
    /// accurate), its weight against central differences of the floored value in `log ĥ`
    /// (step 1e-5: error ≈ 1e-10), finite in both tails, and the identity for `h_min = 0`.
    #[test]
    fn smooth_floor_is_log_h_plus_h_min() {
        for h_min in [1e-3, 0.1, 2.0] {
            for log_h in [-30.0f64, -8.0, -2.3, 0.0, 1.5, 30.0] {
                let (rho, w) = smooth_floor(log_h, h_min);
                let direct = (log_h.exp() + h_min).ln();
                assert!(
                    (rho - direct).abs() < 1e-12 * (1.0 + direct.abs()),
                    "{log_h}, {h_min}"
                );
                let e = 1e-5;
                let fd = (smooth_floor(log_h + e, h_min).0 - smooth_floor(log_h - e, h_min).0)
                    / (2.0 * e);
                assert!(
                    (w - fd).abs() < 1e-8 && (0.0..=1.0).contains(&w),
                    "{log_h}, {h_min}"
                );
            }
            let (rho, w) = smooth_floor(-800.0, h_min);
            assert!((rho - h_min.ln()).abs() < 1e-12 && w == 0.0);
            let (rho, w) = smooth_floor(800.0, h_min);
            assert!((rho - 800.0).abs() < 1e-12 && w == 1.0);
        }
        assert_eq!(smooth_floor(-50.0, 0.0), (-50.0, 1.0));
    }
}
