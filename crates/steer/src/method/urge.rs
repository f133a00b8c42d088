//! URGE: derivative-free Girsanov path weights with twists (MATH.md §6).
//!
//! The reference is the base chain `P` of the first expert, `x_{k+1} ~ N(m_k(x_k), 𝒱_k I)` with
//! `m_k(x) = x + 𝓕_k x + ½(𝒰_k + 𝒱_k) s_0(x)`. Particles move by any proposal
//! `x_{k+1} = m_k + Δt δ_k + sqrt(𝒱_k) ξ` and carry the exact log density ratio of the two
//! Gaussian transitions (§6.2),
//! `log K^P/K^Q = −Δt δ·ξ/sqrt(𝒱) − Δt²|δ|²/(2𝒱)`,
//! plus telescoping twists `log ψ_k` (§6.3) that make intermediate resampling useful. The
//! product of increments is `ψ_M(x_M) dP/dQ` for every twist, so the target is exactly the
//! discretised chain tilted by `ψ_M` (`e^{r}`, times `Π_e p_e^{γ_e}/p_0` at the last grid
//! point for annealing and products). No divergence, Laplacian or Hessian is ever evaluated.
//!
//! Doob's matching (§7.5): with an h-function attached ([`Urge::with_h_function`]),
//! [`Proposal::Doob`] moves the particles by the Doob guidance `Δt δ = ½(𝒰 + 𝒱) ĝ` and
//! [`Twist::Doob`] twists by `log ψ_k = log max(ĥ_{t_k}, h_min)`; [`Urge::doob`] sets both,
//! the intended pairing (with the exact h and `V = U⃖` the weights become constant as
//! `Δt → 0`). The path weights remove the regression error of a learned `ĥ` and the
//! discretisation error, exactly for the discretised chain.
//!
//! Implementation note: the twist of `x_k` is evaluated at the start of step `k`, where the
//! score at `x_k` is computed anyway (the Tweedie twist is then free), and the terminal twist
//! after the last move. The intermediate targets are `P(x_{0:k+1}) ψ_k(x_k)`; the telescoping
//! product, and hence the target, is unchanged.

use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayViewMut1, Zip};
use rand_distr::{Distribution, StandardNormal};

use super::{DriftLite, DriftLiteConfig, Method, StepContext, StepStats};
use crate::doob::{Clip, HFunction, HOutput};
use crate::error::{Error, Result};
use crate::linalg::{axpy, dot};
use crate::model::{NoiseLevel, ScoreOutput};
use crate::population::Population;
use crate::reward::RewardOutput;
use crate::rng::{Purpose, Streams};
use crate::schedule::TimeGrid;
use crate::smc::check_finite;
use crate::target::{Initial, Target};
use crate::weights::{LogWeights, check_log_weights};

/// The proposal drift of URGE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Proposal {
    /// The base chain itself (`δ = 0`): weights come from the twists alone.
    Base,
    /// Pure guidance: `Δt δ = ½(𝒰 + 𝒱)(S − s_0)` with `S = Σ_e γ_e s_e + β_k ∇r`.
    Guided,
    /// Pure guidance plus a DriftLite control `Δt Σ_a θ_a B_a` (VCG or ECG, §5), with θ
    /// fitted on the current weighted particles each step.
    Controlled(DriftLiteConfig),
    /// Doob guidance (MATH.md §7.5): `Δt δ = ½(𝒰 + 𝒱) ĝ` with `ĝ` the clipped `∇log ĥ` of
    /// the h-function attached by [`Urge::with_h_function`] (required). Only the first
    /// expert's score is evaluated; pair it with [`Twist::Doob`] (as [`Urge::doob`] does).
    Doob,
}

/// The twist `ψ_k` for `k < M` (MATH.md §6.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Twist {
    /// `ψ_k ≡ 1`: pure path importance sampling, weights only at the end.
    None,
    /// `log ψ_k = β_k r(x_k)`: the reward at the noisy state.
    Reward,
    /// `log ψ_k = β_k r(x̂_k)` with the Tweedie denoised mean `x̂ = (x + σ² s_0)/α` (§1.4).
    Tweedie,
    /// `log ψ_k = log q̃_{t_k}(x_k) − log p_{0,t_k}(x_k)`, the path of §2.2 over the base
    /// (needs log-densities).
    PathRatio,
    /// Feynman–Kac steering potentials on the look-ahead reward `r̂_j = r(x̂_{k_j})`
    /// (MATH.md §8.2); the terminal potential is `r(x_M) − Σ_{i<J} log G_i`, so the product of
    /// potentials is exactly `e^{r(x_M)}`.
    Potential(Potential),
    /// ESS-adaptive temperature (§8.5): at each evaluation the largest `β_j ∈ [β_{j−1}, 1]`
    /// whose increment keeps the conditional ESS at least `cess · N` (bisection), in the
    /// telescoping form `log ψ_j = β_j r̂_j`; `β_J = 1`. Consistent; `Ẑ` is no longer unbiased.
    AdaptiveTemperature {
        /// Conditional-ESS fraction `κ_β ∈ (0, 1]`.
        cess: f64,
    },
    /// The naive tempered potential `log G_j = β_j (r̂_j − r̂_{j−1})` (§8.5 pitfall). It does
    /// not telescope: the target becomes `∝ P e^{r(x_M)} e^{−Σ_j Δβ_j r̂_j}`. Provided only to
    /// show the bias; do not use it to sample.
    NaiveTempered,
    /// `log ψ_k = log max(ĥ_{t_k}(x_k), h_min)` (MATH.md §7.5) from the h-function attached
    /// by [`Urge::with_h_function`] (required) and its [`Clip`]; the natural twist of
    /// [`Proposal::Doob`]. Evaluated like the reward twists: at `k = 0` and on the schedule.
    Doob,
}

/// The FK-steering potential `log G_j` at evaluation `j` (MATH.md §8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Potential {
    /// `r̂_j − r̂_{j−1}` (`r̂_0 := 0`): telescopes to `r(x_M)` by itself.
    Difference,
    /// `max_{i≤j} r̂_i`.
    Max,
    /// `Σ_{i≤j} r̂_i` (a cumulative sum).
    Sum,
    /// `r̂_j`.
    Immediate,
}

/// When the twist is evaluated: at the start of every step `k` with `(k + 1) % every == 0` —
/// so that a resampling every `every` steps (`ResamplePolicy::Every`) follows each evaluation
/// at once — optionally only while the elapsed fraction of sampling time lies in `window`;
/// always at the end. Between evaluations each particle keeps its last twist value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TwistSchedule {
    /// Evaluation period in steps (≥ 1).
    pub every: usize,
    /// `[s_start, s_end]` with `s = (t − t_0)/(t_M − t_0)`, or the whole run.
    pub window: Option<(f64, f64)>,
}

impl Default for TwistSchedule {
    fn default() -> Self {
        TwistSchedule {
            every: 1,
            window: None,
        }
    }
}

/// Carry columns: the current `log ψ`, the previous look-ahead reward, its running maximum
/// and running sum (the last three for the FK potentials and the naive tempering).
const CARRY_PSI: usize = 0;
const CARRY_PREVIOUS: usize = 1;
const CARRY_MAX: usize = 2;
const CARRY_SUM: usize = 3;

/// URGE on a [`Target`].
#[derive(Debug)]
pub struct Urge<'a> {
    target: &'a Target,
    proposal: Proposal,
    twist: Twist,
    /// Number of steps `M` of the grid (set at initialisation).
    steps: usize,
    /// The grid's last noise level (terminal twist).
    terminal: Option<NoiseLevel>,
    /// The DriftLite controller of a controlled proposal.
    controller: Option<DriftLite<'a>>,
    /// When the twist is evaluated.
    schedule: TwistSchedule,
    /// Twist evaluations made so far in this run.
    evaluations_done: usize,
    /// Current temperature of the adaptive twist.
    temperature: f64,
    /// Grid times `t_0` and `t_M`, for the evaluation window.
    span: (f64, f64),
    /// The h-function and its post-processing, for the Doob proposal and twist.
    doob: Option<(Arc<dyn HFunction>, Clip)>,
    buffers: Buffers,
}

#[derive(Debug, Default)]
struct Buffers {
    scores: Vec<Array2<f64>>,
    log_densities: Vec<Array1<f64>>,
    reward: Array1<f64>,
    reward_gradient: Array2<f64>,
    twist: Array1<f64>,
    scratch: Array2<f64>,
    /// `N × d` proposal shifts `Δt δ`.
    shift: Array2<f64>,
    /// `N` values `log ĥ` and `N × d` guidance `ĝ` of the Doob proposal and twist.
    log_h: Array1<f64>,
    guidance: Array2<f64>,
}

impl<'a> Urge<'a> {
    /// URGE with a proposal and a twist; errors when the target needs log-densities the
    /// experts do not have (annealing, products, or the path-ratio twist).
    pub fn new(target: &'a Target, proposal: Proposal, twist: Twist) -> Result<Self> {
        let pure_tilt = target.experts().len() == 1 && target.experts()[0].gamma == 1.0;
        if (!pure_tilt || twist == Twist::PathRatio)
            && let Some(e) = target
                .experts()
                .iter()
                .position(|e| !e.model.provides_log_density())
        {
            return Err(Error::Unsupported(format!(
                "URGE needs log-densities for annealing, products and the path-ratio twist, and experts[{e}] has none"
            )));
        }
        if pure_tilt && target.reward().is_none() {
            return Err(Error::invalid(
                "reward",
                "URGE on a single expert with γ = 1 needs a reward to tilt by",
            ));
        }
        let controller = match proposal {
            Proposal::Controlled(config) => Some(DriftLite::new(target, config)?),
            _ => None,
        };
        Ok(Urge {
            target,
            proposal,
            twist,
            steps: 0,
            terminal: None,
            controller,
            schedule: TwistSchedule::default(),
            evaluations_done: 0,
            temperature: 0.0,
            span: (0.0, 1.0),
            doob: None,
            buffers: Buffers::default(),
        })
    }

    /// Attaches the h-function `h` and its post-processing `clip` used by
    /// [`Proposal::Doob`] and [`Twist::Doob`] (MATH.md §7.5).
    pub fn with_h_function(mut self, h: Arc<dyn HFunction>, clip: Clip) -> Result<Self> {
        clip.validate()?;
        if h.dim() != self.target.dim() {
            return Err(Error::Dimension {
                context: "h-function (must match the target)".into(),
                expected: self.target.dim(),
                found: h.dim(),
            });
        }
        self.doob = Some((h, clip));
        Ok(self)
    }

    /// URGE with the Doob proposal and the Doob twist of `h` (MATH.md §7.5): the
    /// combination whose weights are constant for the exact h as `Δt → 0`.
    pub fn doob(target: &'a Target, h: Arc<dyn HFunction>, clip: Clip) -> Result<Self> {
        Urge::new(target, Proposal::Doob, Twist::Doob)?.with_h_function(h, clip)
    }

    /// Evaluates the twist only on `schedule` (FK steering's resampling steps).
    pub fn with_twist_schedule(mut self, schedule: TwistSchedule) -> Result<Self> {
        if schedule.every == 0 {
            return Err(Error::invalid("urge.every", "must be at least 1"));
        }
        if let Some((a, b)) = schedule.window
            && !((0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&b) && a <= b)
        {
            return Err(Error::invalid(
                "urge.window",
                format!("must satisfy 0 ≤ start ≤ end ≤ 1, got [{a}, {b}]"),
            ));
        }
        self.schedule = schedule;
        Ok(self)
    }

    fn evaluated_at(&self, k: usize, t: f64) -> bool {
        let s = (t - self.span.0) / (self.span.1 - self.span.0);
        (k + 1).is_multiple_of(self.schedule.every)
            && self
                .schedule
                .window
                .is_none_or(|(a, b)| (a..=b).contains(&s))
    }

    fn needs_log_densities(&self) -> bool {
        let t = self.target;
        self.twist == Twist::PathRatio || !(t.experts().len() == 1 && t.experts()[0].gamma == 1.0)
    }

    /// The Tweedie denoised mean `x̂ = (x + σ² s_0)/α` of the step's left point (§1.4).
    fn denoised(&self, x: &Array2<f64>, step: &crate::schedule::Step) -> Array2<f64> {
        let s0 = &self.buffers.scores[0];
        (x + &(s0 * (step.sigma * step.sigma))) / step.alpha
    }

    /// Turns look-ahead rewards `r̂` into each particle's new `log ψ` for the FK, adaptive
    /// and naive twists.
    fn potential_twist(
        &mut self,
        look_ahead: &Array1<f64>,
        beta: f64,
        carry: &Array2<f64>,
        weights: &LogWeights,
        twist: &mut Array1<f64>,
        stats: &mut StepStats,
    ) {
        let first = self.evaluations_done == 0;
        self.evaluations_done += 1;
        match self.twist {
            Twist::Potential(potential) => {
                Zip::indexed(twist).and(look_ahead).for_each(|i, out, &r| {
                    let psi = carry[[i, CARRY_PSI]];
                    *out = match potential {
                        Potential::Difference => r,
                        Potential::Immediate => psi + r,
                        Potential::Sum => psi + carry[[i, CARRY_SUM]] + r,
                        Potential::Max => {
                            psi + if first {
                                r
                            } else {
                                carry[[i, CARRY_MAX]].max(r)
                            }
                        }
                    };
                })
            }
            Twist::NaiveTempered => Zip::indexed(twist).and(look_ahead).for_each(|i, out, &r| {
                *out = carry[[i, CARRY_PSI]] + beta * (r - carry[[i, CARRY_PREVIOUS]]);
            }),
            Twist::AdaptiveTemperature { cess } => {
                let w = weights.normalized();
                let psi = carry.column(CARRY_PSI);
                // CESS/N of the increments b r̂ − log ψ (Zhou, Johansen & Aston 2016).
                let fraction = |b: f64| {
                    let inc: Vec<f64> = look_ahead
                        .iter()
                        .zip(psi.iter())
                        .map(|(r, p)| b * r - p)
                        .collect();
                    let shift = inc.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                    let (mut s1, mut s2) = (0.0, 0.0);
                    for (wi, v) in w.iter().zip(&inc) {
                        let e = (v - shift).exp();
                        s1 += wi * e;
                        s2 += wi * e * e;
                    }
                    s1 * s1 / s2
                };
                let (mut lo, mut hi) = (self.temperature, 1.0);
                if fraction(hi) >= cess {
                    lo = hi;
                } else {
                    for _ in 0..60 {
                        let mid = 0.5 * (lo + hi);
                        if fraction(mid) >= cess {
                            lo = mid;
                        } else {
                            hi = mid;
                        }
                    }
                }
                self.temperature = lo;
                stats.temperature = Some(lo);
                Zip::from(twist)
                    .and(look_ahead)
                    .for_each(|out, &r| *out = lo * r);
            }
            Twist::None | Twist::Reward | Twist::Tweedie | Twist::PathRatio | Twist::Doob => {}
        }
    }

    /// Records the look-ahead reward, its running maximum and its running sum in the carry.
    fn remember(&self, look_ahead: &Array1<f64>, carry: &mut Array2<f64>) {
        let first = self.evaluations_done == 1;
        Zip::indexed(carry.rows_mut()).for_each(|i, mut c| {
            let r = look_ahead[i];
            c[CARRY_PREVIOUS] = r;
            c[CARRY_MAX] = if first { r } else { c[CARRY_MAX].max(r) };
            c[CARRY_SUM] += r;
        });
    }

    /// `log ψ_M(x) = r(x) + Σ_e γ_e log p_e(x) − log p_0(x)` at the last grid point.
    fn terminal_twist(&mut self, x: &Array2<f64>, out: &mut Array1<f64>) -> Result<()> {
        let level = self.terminal.expect("initialised");
        self.log_ratio(&level, 1.0, x, out, self.needs_log_densities())
    }

    /// `log q̃_t(x) − log p_{0,t}(x)` with reward weight `beta` into `out`; the expert part
    /// only when `experts` is set (it vanishes for a pure tilt).
    fn log_ratio(
        &mut self,
        level: &NoiseLevel,
        beta: f64,
        x: &Array2<f64>,
        out: &mut Array1<f64>,
        experts: bool,
    ) -> Result<()> {
        let t = self.target;
        let (n, d) = x.dim();
        out.fill(0.0);
        let b = &mut self.buffers;
        if b.scratch.dim() != (n, d) {
            b.scratch = Array2::zeros((n, d));
        }
        if experts {
            let mut logp = Array1::zeros(n);
            for (e, ex) in t.experts().iter().enumerate() {
                t.expert_score(
                    e,
                    level,
                    x.view(),
                    ScoreOutput {
                        score: b.scratch.view_mut(),
                        log_density: Some(logp.view_mut()),
                        divergence: None,
                    },
                )?;
                let weight = if e == 0 { ex.gamma - 1.0 } else { ex.gamma };
                out.scaled_add(weight, &logp);
            }
        }
        if beta != 0.0 && t.reward().is_some() {
            let mut r = Array1::zeros(n);
            t.reward_eval(
                x.view(),
                RewardOutput {
                    value: Some(r.view_mut()),
                    ..Default::default()
                },
            )?;
            out.scaled_add(beta, &r);
        }
        Ok(())
    }
}

impl Method for Urge<'_> {
    fn name(&self) -> &str {
        "urge"
    }

    fn weighted(&self) -> bool {
        true
    }

    fn carry_width(&self) -> usize {
        4
    }

    fn initialize(
        &mut self,
        target: &Target,
        grid: &TimeGrid,
        n: usize,
        streams: &Streams,
    ) -> Result<Initial> {
        if grid.eta() <= 0.0 {
            return Err(Error::invalid(
                "schedule.eta",
                "URGE needs η > 0: the probability-flow ODE (η = 0) has no path density, so path weights do not exist",
            ));
        }
        if (self.proposal == Proposal::Doob || self.twist == Twist::Doob) && self.doob.is_none() {
            return Err(Error::invalid(
                "urge.h_function",
                "the Doob proposal and twist need an h-function: attach one with Urge::with_h_function",
            ));
        }
        self.steps = grid.len();
        self.terminal = Some(grid.level(grid.len()));
        self.span = (grid.time(0), grid.time(grid.len()));
        self.evaluations_done = 0;
        self.temperature = 0.0;
        // The reference chain starts from the base model's own p⃖_0; the twist enters as weight.
        let mut init = target.sample_base_initial(grid, n, streams)?;
        init.log_weights.fill(0.0);
        init.log_normalizer = Some(0.0);
        Ok(init)
    }

    fn advance(
        &mut self,
        ctx: &StepContext<'_>,
        population: &mut Population,
        weights: &LogWeights,
        mut increments: ArrayViewMut1<f64>,
    ) -> Result<StepStats> {
        let target = self.target;
        let step = ctx.step;
        let k = step.index;
        let (n, d) = population.x.dim();
        let guided = self.proposal == Proposal::Guided;
        let doob_proposal = self.proposal == Proposal::Doob;
        let experts = if guided { target.experts().len() } else { 1 };
        let controlled = self.controller.is_some();
        let b = &mut self.buffers;
        if b.twist.len() != n || b.scores.len() != experts || b.scores[0].ncols() != d {
            b.scores = (0..experts).map(|_| Array2::zeros((n, d))).collect();
            b.log_densities = (0..experts).map(|_| Array1::zeros(n)).collect();
            b.reward = Array1::zeros(n);
            b.reward_gradient = Array2::zeros((n, d));
            b.twist = Array1::zeros(n);
            b.shift = Array2::zeros((n, d));
            b.log_h = Array1::zeros(n);
            b.guidance = Array2::zeros((n, d));
        }
        let level = step.level();
        let (beta, _) = ctx.beta;
        let mut reward_gradient = false;
        let mut theta = Vec::new();
        if let Some(controller) = self.controller.as_mut() {
            // The controller evaluates every expert, the reward and θ; it leaves s_0 behind.
            theta = controller.proposal_shift(ctx, &population.x, weights, &mut b.shift)?;
            b.scores[0].assign(controller.score(0));
        } else {
            target.expert_scores(&level, population.x.view(), &mut b.scores[..experts], k)?;
            reward_gradient = guided && beta != 0.0 && target.reward().is_some();
            if reward_gradient {
                target.reward_eval(
                    population.x.view(),
                    RewardOutput {
                        gradient: Some(b.reward_gradient.view_mut()),
                        ..Default::default()
                    },
                )?;
                check_finite(&b.reward_gradient, k, "reward gradient")?;
            }
        }

        // Twist of the current state: log ψ_k(x_k) − log ψ_{k−1}(x_{k−1}) (the carry).
        let mut stats = StepStats {
            theta,
            ..StepStats::default()
        };
        let evaluate = match self.twist {
            Twist::None => false,
            Twist::Reward | Twist::Tweedie | Twist::PathRatio | Twist::Doob => {
                k == 0 || self.evaluated_at(k, step.t.0)
            }
            _ => self.evaluated_at(k, step.t.0),
        };
        // One h-function call gives both the Doob guidance and the Doob twist at x_k.
        let doob_twist = evaluate && self.twist == Twist::Doob;
        let clip = self.doob.as_ref().map(|(_, c)| *c).unwrap_or(Clip::none());
        if doob_proposal || doob_twist {
            let (h, _) = self.doob.as_ref().expect("checked at initialisation");
            let b = &mut self.buffers;
            target.h_function_eval(
                h.as_ref(),
                &level,
                population.x.view(),
                HOutput {
                    log_h: (doob_twist || clip.needs_log_h()).then(|| b.log_h.view_mut()),
                    grad_log_h: b.guidance.view_mut(),
                },
                k,
            )?;
        }
        if evaluate {
            let mut twist = std::mem::take(&mut self.buffers.twist);
            match self.twist {
                Twist::None => unreachable!("never evaluated"),
                Twist::Reward => self.log_ratio(&level, beta, &population.x, &mut twist, false)?,
                Twist::PathRatio => {
                    self.log_ratio(&level, beta, &population.x, &mut twist, true)?
                }
                Twist::Tweedie => {
                    let denoised = self.denoised(&population.x, step);
                    self.log_ratio(&level, beta, &denoised, &mut twist, false)?;
                }
                Twist::Doob => Zip::from(&mut twist)
                    .and(&self.buffers.log_h)
                    .for_each(|psi, &log_h| *psi = clip.log_twist(log_h)),
                _ => {
                    let denoised = self.denoised(&population.x, step);
                    let mut look_ahead = Array1::zeros(n);
                    self.log_ratio(&level, 1.0, &denoised, &mut look_ahead, false)?;
                    check_log_weights(look_ahead.view(), k, "look-ahead reward")?;
                    self.potential_twist(
                        &look_ahead,
                        beta,
                        &population.carry,
                        weights,
                        &mut twist,
                        &mut stats,
                    );
                    self.remember(&look_ahead, &mut population.carry);
                }
            }
            check_log_weights(twist.view(), k, "twist")?;
            Zip::from(&mut increments)
                .and(&twist)
                .and(population.carry.column(CARRY_PSI))
                .for_each(|inc, &now, &before| *inc = now - before);
            population.carry.column_mut(CARRY_PSI).assign(&twist);
            self.buffers.twist = twist;
        }

        // Move by the proposal and add the exact Gaussian transition log-ratio log K^P/K^Q.
        let Buffers {
            scores,
            reward_gradient: grad,
            shift,
            log_h,
            guidance,
            ..
        } = &mut self.buffers;
        let (scores, grad, log_h) = (&*scores, &*grad, &*log_h);
        let gammas: Vec<f64> = target.experts().iter().map(|e| e.gamma).collect();
        let (drift, half, variance) = (step.drift, 0.5 * (step.diffusion + step.noise), step.noise);
        let noise_sd = variance.sqrt();
        let noise = ctx.streams.keyed(Purpose::Noise);
        Zip::indexed(population.x.rows_mut())
            .and(shift.rows_mut())
            .and(guidance.rows_mut())
            .and(&mut increments)
            .par_for_each(|i, mut x_row, mut shift_row, mut g_row, inc| {
                let x = x_row.as_slice_mut().expect("contiguous");
                let s0 = scores[0].row(i);
                let s0 = s0.to_slice().expect("contiguous");
                // Δt δ = ½(𝒰 + 𝒱)(S − s_0), or ½(𝒰 + 𝒱) ĝ for the Doob proposal.
                let shift = shift_row.as_slice_mut().expect("contiguous");
                // A controlled proposal's shift was written by the controller.
                if !controlled {
                    shift.fill(0.0);
                }
                if guided {
                    for (e, score) in scores.iter().enumerate() {
                        let coef = if e == 0 { gammas[0] - 1.0 } else { gammas[e] };
                        axpy(
                            shift,
                            half * coef,
                            score.row(i).to_slice().expect("contiguous"),
                        );
                    }
                    if reward_gradient {
                        axpy(
                            shift,
                            half * beta,
                            grad.row(i).to_slice().expect("contiguous"),
                        );
                    }
                }
                if doob_proposal {
                    let g = g_row.as_slice_mut().expect("contiguous");
                    clip.apply(log_h[i], g);
                    axpy(shift, half, g);
                }
                let mut rng = noise.rng(k, i);
                let mut shift_dot_xi = 0.0;
                for c in 0..x.len() {
                    let xi: f64 = StandardNormal.sample(&mut rng);
                    shift_dot_xi += shift[c] * xi;
                    x[c] += drift * x[c] + half * s0[c] + shift[c] + noise_sd * xi;
                }
                *inc += -shift_dot_xi / noise_sd - dot(shift, shift) / (2.0 * variance);
            });

        if k + 1 == self.steps {
            let mut last = Array1::zeros(n);
            self.terminal_twist(&population.x, &mut last)?;
            check_log_weights(last.view(), k, "terminal twist")?;
            if self.twist == Twist::NaiveTempered {
                // The naive form's last potential β_J (r(x_M) − r̂_{J−1}) with β_J = 1: no
                // correction, so the product does not telescope to r(x_M).
                let carry = &population.carry;
                Zip::indexed(&mut last)
                    .for_each(|i, v| *v += carry[[i, CARRY_PSI]] - carry[[i, CARRY_PREVIOUS]]);
            }
            Zip::from(&mut increments)
                .and(&last)
                .and(population.carry.column(CARRY_PSI))
                .for_each(|inc, &now, &before| *inc += now - before);
            population.carry.column_mut(CARRY_PSI).assign(&last);
        }
        Ok(stats)
    }
}
