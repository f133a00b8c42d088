//! Doob-guided sampling: the base reverse SDE steered by an h-function, without weights
//! (MATH.md §7.2, §7.4).
//!
//! Every step is the generic Euler–Maruyama step of §1.3 with the guided score
//! `S = s_0 + ĝ`, i.e. the proposal drift `δ_k = ½(Ū_k² + V̄_k²) ĝ`:
//! `x_{k+1} = x_k + 𝓕_k x_k + ½(𝒰_k + 𝒱_k)(s_0(x_k) + ĝ(x_k)) + sqrt(𝒱_k) ξ_k`,
//! with `ĝ` the [`Clip`]-processed `∇log ĥ` at the left point's noise level. With the exact
//! h this transports `q_t ∝ p⃖_t h_t` for every `V ≥ 0` and reaches the tilted law as
//! `Δt → 0`; with a learned `ĥ` it is only as good as the regression. No reward is
//! evaluated and no weight is carried; for exact weights use the Doob proposal inside URGE
//! ([`super::Proposal::Doob`], §7.5).

use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayViewMut1, Zip};
use rand_distr::{Distribution, StandardNormal};

use super::{Method, StepContext, StepStats};
use crate::doob::{Clip, HFunction, HOutput};
use crate::error::{Error, Result};
use crate::population::Population;
use crate::rng::{Purpose, Streams};
use crate::schedule::TimeGrid;
use crate::target::{Initial, Target};
use crate::weights::LogWeights;

/// Unweighted Doob guidance of a target's single expert by an h-function.
#[derive(Debug)]
pub struct Doob<'a> {
    target: &'a Target,
    h: Arc<dyn HFunction>,
    clip: Clip,
    buffers: Buffers,
}

/// Per-step buffers, reused across steps (reallocated only when `N` changes).
#[derive(Debug, Default)]
struct Buffers {
    scores: Vec<Array2<f64>>,
    guidance: Array2<f64>,
    log_h: Array1<f64>,
}

impl<'a> Doob<'a> {
    /// Doob guidance of `target` by `h`, post-processed by `clip`.
    ///
    /// The h-function carries the tilt, so the target must be one expert with `γ = 1` (its
    /// reward, if any, is not evaluated); `h` must have the target's dimension.
    pub fn new(target: &'a Target, h: Arc<dyn HFunction>, clip: Clip) -> Result<Self> {
        clip.validate()?;
        let experts = target.experts();
        if experts.len() != 1 {
            return Err(Error::invalid(
                "experts",
                format!(
                    "Doob guidance steers one expert by its h-function, found {} experts",
                    experts.len()
                ),
            ));
        }
        if experts[0].gamma != 1.0 {
            return Err(Error::invalid(
                "experts[0].gamma",
                format!(
                    "Doob guidance samples a pure tilt (γ = 1), got {}",
                    experts[0].gamma
                ),
            ));
        }
        if h.dim() != target.dim() {
            return Err(Error::Dimension {
                context: "h-function (must match the target)".into(),
                expected: target.dim(),
                found: h.dim(),
            });
        }
        Ok(Doob {
            target,
            h,
            clip,
            buffers: Buffers::default(),
        })
    }

    /// The post-processing applied to `∇log ĥ`.
    pub fn clip(&self) -> Clip {
        self.clip
    }
}

impl Method for Doob<'_> {
    fn name(&self) -> &str {
        "doob"
    }

    fn weighted(&self) -> bool {
        false
    }

    /// Starts on the Doob path `q_0 ∝ p⃖_0 h_0 = Z_r p^r_{τ_max}`: exactly when the
    /// h-function knows its tilted law ([`HFunction::tilted_law`]), otherwise (a learned
    /// `ĥ`) from the base model's `p⃖_0`. The latter mismatch is `O(α(τ_max))`; with
    /// `V > 0` the reverse SDE forgets it, but the probability-flow ODE (`η = 0`) carries it
    /// to the end (≈ −2e-3 in the mean of the MATH.md §11.9 problem).
    fn initialize(
        &mut self,
        target: &Target,
        grid: &TimeGrid,
        n: usize,
        streams: &Streams,
    ) -> Result<Initial> {
        match self.h.tilted_law() {
            Some(tilted) => Ok(Initial {
                x: tilted
                    .at_level(&grid.level(0))
                    .sample(n, streams, Purpose::Init),
                log_weights: Array1::zeros(n),
                log_normalizer: Some(0.0),
            }),
            None => target.sample_base_initial(grid, n, streams),
        }
    }

    fn advance(
        &mut self,
        ctx: &StepContext<'_>,
        population: &mut Population,
        _weights: &LogWeights,
        _increments: ArrayViewMut1<f64>,
    ) -> Result<StepStats> {
        let target = self.target;
        let step = ctx.step;
        let k = step.index;
        let (n, d) = population.x.dim();
        let b = &mut self.buffers;
        if b.guidance.dim() != (n, d) || b.scores.len() != 1 {
            b.scores = vec![Array2::zeros((n, d))];
            b.guidance = Array2::zeros((n, d));
            b.log_h = Array1::zeros(n);
        }
        let level = step.level();
        target.expert_scores(&level, population.x.view(), &mut b.scores, k)?;
        let need_log_h = self.clip.needs_log_h();
        target.h_function_eval(
            self.h.as_ref(),
            &level,
            population.x.view(),
            HOutput {
                log_h: need_log_h.then(|| b.log_h.view_mut()),
                grad_log_h: b.guidance.view_mut(),
            },
            k,
        )?;

        // One fused pass per particle: ĝ from ∇log ĥ (MATH.md §7.4), then
        // x ← x + 𝓕 x + ½(𝒰 + 𝒱)(s_0 + ĝ) + sqrt(𝒱) ξ.
        let clip = self.clip;
        let (drift, half, noise_sd) = (
            step.drift,
            0.5 * (step.diffusion + step.noise),
            step.noise.sqrt(),
        );
        let (score, log_h) = (&b.scores[0], &b.log_h);
        let noise = ctx.streams.keyed(Purpose::Noise);
        Zip::indexed(population.x.rows_mut())
            .and(b.guidance.rows_mut())
            .par_for_each(|i, mut x_row, mut g_row| {
                let x = x_row.as_slice_mut().expect("rows are contiguous");
                let g = g_row.as_slice_mut().expect("rows are contiguous");
                clip.apply(log_h[i], g);
                let s0 = score.row(i);
                let s0 = s0.to_slice().expect("contiguous");
                let mut rng = noise.rng(k, i);
                for c in 0..x.len() {
                    let xi: f64 = StandardNormal.sample(&mut rng);
                    x[c] += drift * x[c] + half * (s0[c] + g[c]) + noise_sd * xi;
                }
            });
        Ok(StepStats::default())
    }
}
