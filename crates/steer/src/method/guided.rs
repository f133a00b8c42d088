//! Euler–Maruyama samplers of the (guided) reverse SDE: the base sampler, pure guidance and
//! G-SMC (MATH.md §1.3, §4).
//!
//! Every step freezes the state-dependent terms at the left point `x_k`:
//! `x_{k+1} = x_k + 𝓕_k x_k + ½(𝒰_k + 𝒱_k) S_k(x_k) + sqrt(𝒱_k) ξ_k`, with
//! `S = s_0` (base) or `S = Σ_e γ_e s_e + β_k ∇r` (guided). G-SMC adds the Feynman–Kac
//! corrector increment (MATH.md §4.3)
//! `Δt G = (β_{k+1} − β_k) r − (Γ − 1) d 𝓕 + 𝓕 β_k x·∇r + ½𝒰 (β_k Δr + |S|² − Σ_e γ_e |s_e|²)`.

use ndarray::{Array1, Array2, ArrayViewMut1, Zip};
use rand_distr::{Distribution, StandardNormal};

use super::{Method, StepContext, StepStats};
use crate::error::Result;
use crate::linalg::{axpy, dot};
use crate::population::Population;
use crate::reward::RewardOutput;
use crate::rng::Purpose;
use crate::smc::check_finite;
use crate::target::Target;
use crate::weights::LogWeights;

/// Which drift and weights a [`GuidedSampler`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guidance {
    /// The unsteered reverse SDE of the first expert: `S = s_0`, no weights.
    Base,
    /// Pure guidance (PG): the tilted score `S`, no weights (biased, MATH.md §4.1).
    Pure,
    /// G-SMC: the tilted score `S` with Feynman–Kac corrector weights (MATH.md §4.4).
    Corrected,
}

/// The base sampler, pure guidance or G-SMC on a [`Target`].
#[derive(Debug)]
pub struct GuidedSampler<'a> {
    target: &'a Target,
    guidance: Guidance,
    buffers: Buffers,
}

/// Per-step buffers, reused across steps (reallocated only when `N` changes).
#[derive(Debug, Default)]
struct Buffers {
    scores: Vec<Array2<f64>>,
    tilted: Array2<f64>,
    reward: Array1<f64>,
    reward_gradient: Array2<f64>,
    reward_laplacian: Array1<f64>,
}

impl Buffers {
    fn fit(&mut self, experts: usize, n: usize, d: usize) {
        if self.tilted.dim() != (n, d) || self.scores.len() != experts {
            self.scores = (0..experts).map(|_| Array2::zeros((n, d))).collect();
            self.tilted = Array2::zeros((n, d));
            self.reward = Array1::zeros(n);
            self.reward_gradient = Array2::zeros((n, d));
            self.reward_laplacian = Array1::zeros(n);
        }
    }
}

impl<'a> GuidedSampler<'a> {
    /// A sampler of `target` with the given guidance.
    pub fn new(target: &'a Target, guidance: Guidance) -> Self {
        GuidedSampler {
            target,
            guidance,
            buffers: Buffers::default(),
        }
    }
}

impl Method for GuidedSampler<'_> {
    fn name(&self) -> &str {
        match self.guidance {
            Guidance::Base => "base",
            Guidance::Pure => "pg",
            Guidance::Corrected => "g-smc",
        }
    }

    fn weighted(&self) -> bool {
        self.guidance == Guidance::Corrected
    }

    fn initialize(
        &mut self,
        target: &Target,
        grid: &crate::schedule::TimeGrid,
        n: usize,
        streams: &crate::rng::Streams,
    ) -> Result<crate::target::Initial> {
        if self.guidance == Guidance::Base {
            return target.sample_base_initial(grid, n, streams);
        }
        target.sample_initial(grid, n, streams)
    }

    fn advance(
        &mut self,
        ctx: &StepContext<'_>,
        population: &mut Population,
        _weights: &LogWeights,
        mut increments: ArrayViewMut1<f64>,
    ) -> Result<StepStats> {
        let target = self.target;
        let step = ctx.step;
        let k = step.index;
        let (n, d) = population.x.dim();
        let experts = match self.guidance {
            Guidance::Base => 1,
            _ => target.experts().len(),
        };
        self.buffers.fit(experts, n, d);
        let b = &mut self.buffers;
        let level = step.level();
        target.expert_scores(&level, population.x.view(), &mut b.scores[..experts], k)?;

        let (beta, beta_next) = ctx.beta;
        let weighted = self.guidance == Guidance::Corrected;
        let guided = self.guidance != Guidance::Base;
        let use_reward = guided && target.reward().is_some();
        let need_gradient = use_reward && beta != 0.0;
        let need_value = use_reward && weighted && beta_next != beta;
        let need_laplacian = need_gradient && weighted;
        if need_gradient || need_value {
            target.reward_eval(
                population.x.view(),
                RewardOutput {
                    value: need_value.then(|| b.reward.view_mut()),
                    gradient: need_gradient.then(|| b.reward_gradient.view_mut()),
                    laplacian: need_laplacian.then(|| b.reward_laplacian.view_mut()),
                },
            )?;
            check_finite(&b.reward_gradient, k, "reward gradient")?;
        }

        // One fused pass per particle: tilted score S = Σ γ_e s_e + β ∇r (or s_0 for the base
        // sampler), the corrector increment Δt G at the left point, then the move
        // x ← x + 𝓕 x + ½(𝒰 + 𝒱) S + sqrt(𝒱) ξ.
        let gammas: Vec<f64> = (0..experts)
            .map(|e| {
                if guided {
                    target.experts()[e].gamma
                } else {
                    1.0
                }
            })
            .collect();
        let constant = -(target.total_gamma() - 1.0) * d as f64 * step.drift;
        let (drift, diffusion) = (step.drift, step.diffusion);
        let (half, noise_sd) = (0.5 * (step.diffusion + step.noise), step.noise.sqrt());
        let (scores, reward, grad, lap) = (
            &b.scores,
            &b.reward,
            &b.reward_gradient,
            &b.reward_laplacian,
        );
        let noise = ctx.streams.keyed(Purpose::Noise);
        Zip::indexed(population.x.rows_mut())
            .and(b.tilted.rows_mut())
            .and(&mut increments)
            .par_for_each(|i, mut x_row, mut s_row, inc| {
                let x = x_row.as_slice_mut().expect("rows are contiguous");
                let s = s_row.as_slice_mut().expect("rows are contiguous");
                s.fill(0.0);
                for (score, &gamma) in scores.iter().zip(&gammas) {
                    axpy(s, gamma, score.row(i).to_slice().expect("contiguous"));
                }
                let grad_i = grad.row(i);
                let grad_i = grad_i.to_slice().expect("contiguous");
                if need_gradient {
                    axpy(s, beta, grad_i);
                }
                if weighted {
                    let mut g = constant + 0.5 * diffusion * dot(s, s);
                    for (score, &gamma) in scores.iter().zip(&gammas) {
                        let se = score.row(i);
                        let se = se.to_slice().expect("contiguous");
                        g -= 0.5 * diffusion * gamma * dot(se, se);
                    }
                    if need_value {
                        g += (beta_next - beta) * reward[i];
                    }
                    if need_gradient {
                        g += drift * beta * dot(x, grad_i) + 0.5 * diffusion * beta * lap[i];
                    }
                    *inc = g;
                }
                let mut rng = noise.rng(k, i);
                for (xv, &sv) in x.iter_mut().zip(s.iter()) {
                    let xi: f64 = StandardNormal.sample(&mut rng);
                    *xv += drift * *xv + half * sv + noise_sd * xi;
                }
            });
        Ok(StepStats::default())
    }
}
