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
//! Implementation note: the twist of `x_k` is evaluated at the start of step `k`, where the
//! score at `x_k` is computed anyway (the Tweedie twist is then free), and the terminal twist
//! after the last move. The intermediate targets are `P(x_{0:k+1}) ψ_k(x_k)`; the telescoping
//! product, and hence the target, is unchanged.

use ndarray::{Array1, Array2, ArrayViewMut1, Zip};
use rand_distr::{Distribution, StandardNormal};

use super::{DriftLite, DriftLiteConfig, Method, StepContext, StepStats};
use crate::error::{Error, Result};
use crate::linalg::{axpy, dot};
use crate::model::{NoiseLevel, ScoreOutput};
use crate::population::Population;
use crate::reward::RewardOutput;
use crate::rng::{Purpose, Streams};
use crate::schedule::TimeGrid;
use crate::smc::check_finite;
use crate::target::{Initial, Target};
use crate::weights::LogWeights;

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
}

/// The twist `ψ_k` for `k < M` (MATH.md §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

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
            buffers: Buffers::default(),
        })
    }

    fn needs_log_densities(&self) -> bool {
        let t = self.target;
        self.twist == Twist::PathRatio || !(t.experts().len() == 1 && t.experts()[0].gamma == 1.0)
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
        1
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
        self.steps = grid.len();
        self.terminal = Some(grid.level(grid.len()));
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
            for e in 0..experts {
                target.expert_score(
                    e,
                    &level,
                    population.x.view(),
                    ScoreOutput {
                        score: b.scores[e].view_mut(),
                        log_density: None,
                        divergence: None,
                    },
                )?;
                check_finite(&b.scores[e], k, "score")?;
            }
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
        let mut twist = std::mem::take(&mut self.buffers.twist);
        match self.twist {
            Twist::None => twist.fill(0.0),
            Twist::Reward => self.log_ratio(&level, beta, &population.x, &mut twist, false)?,
            Twist::PathRatio => self.log_ratio(&level, beta, &population.x, &mut twist, true)?,
            Twist::Tweedie => {
                let s0 = &self.buffers.scores[0];
                let denoised = (&population.x + &(s0 * (step.sigma * step.sigma))) / step.alpha;
                self.log_ratio(&level, beta, &denoised, &mut twist, false)?;
            }
        }
        check_finite_vec(&twist, k, "twist")?;
        Zip::from(&mut increments)
            .and(&twist)
            .and(population.carry.column(0))
            .for_each(|inc, &now, &before| *inc = now - before);
        population.carry.column_mut(0).assign(&twist);
        self.buffers.twist = twist;

        // Move by the proposal and add the exact Gaussian transition log-ratio log K^P/K^Q.
        let Buffers {
            scores,
            reward_gradient: grad,
            shift,
            ..
        } = &mut self.buffers;
        let (scores, grad) = (&*scores, &*grad);
        let gammas: Vec<f64> = target.experts().iter().map(|e| e.gamma).collect();
        let (drift, half, variance) = (step.drift, 0.5 * (step.diffusion + step.noise), step.noise);
        let noise_sd = variance.sqrt();
        let noise = ctx.streams.keyed(Purpose::Noise);
        Zip::indexed(population.x.rows_mut())
            .and(shift.rows_mut())
            .and(&mut increments)
            .par_for_each(|i, mut x_row, mut shift_row, inc| {
                let x = x_row.as_slice_mut().expect("contiguous");
                let s0 = scores[0].row(i);
                let s0 = s0.to_slice().expect("contiguous");
                // Δt δ = ½(𝒰 + 𝒱)(S − s_0).
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
            check_finite_vec(&last, k, "terminal twist")?;
            Zip::from(&mut increments)
                .and(&last)
                .and(population.carry.column(0))
                .for_each(|inc, &now, &before| *inc += now - before);
            population.carry.column_mut(0).assign(&last);
        }
        Ok(StepStats {
            theta,
            uncontrolled_variance: None,
        })
    }
}

fn check_finite_vec(v: &Array1<f64>, step: usize, what: &'static str) -> Result<()> {
    match v.iter().position(|x| x.is_nan() || *x == f64::INFINITY) {
        Some(particle) => Err(Error::NonFinite {
            step,
            what,
            particle,
        }),
        None => Ok(()),
    }
}
