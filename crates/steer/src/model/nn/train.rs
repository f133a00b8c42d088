//! Denoising score matching for [`Network`]s.
//!
//! Each step draws a minibatch `x₀` (with replacement), times `τ ~ U[τ_min, τ_max]` of the
//! schedule (`τ_max = T`, or `T(1 − 10⁻³)` for the cosine schedule) and noise `ε ~ N(0, I)`, and minimises `E|ε̂(y, λ) − ε|²` with `y = x₀' + λ ε`: the
//! score-matching loss with the schedule's weighting `σ(τ)²` (MATH.md §1.4). Adam with a
//! linear warm-up and a cosine decay to a tenth of the rate; an exponential moving average
//! (EMA) of the weights is what is saved. A held-out set with fixed noise is scored with the
//! EMA weights every `eval_every` steps. Every random draw (initial weights, minibatches,
//! times, noise) comes from the explicit seed, so training is deterministic on the CPU.

use std::time::Instant;

use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use ndarray::{Array2, ArrayView2, Axis};
use rand::RngExt;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::fit::{self, Fit, Init};
use super::layers::{DTYPE, Net, device};
use super::{Architecture, FORMAT, Network, NetworkSpec, epsilon, standardisation};
use crate::error::{Error, Result};
use crate::rng::{Purpose, Streams};
use crate::schedule::Schedule;

/// Settings of [`train`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// The network to train.
    pub architecture: Architecture,
    /// The forward schedule (sets the distribution of noise levels).
    pub schedule: Schedule,
    /// Smallest forward time trained on (`> 0`; 10⁻³ for VP).
    pub tau_min: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Minibatch size.
    pub batch: usize,
    /// Peak Adam learning rate.
    pub learning_rate: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// EMA decay per step.
    pub ema_decay: f64,
    /// Fraction of the data held out for the validation loss.
    pub heldout_fraction: f64,
    /// Steps between held-out evaluations (and progress reports).
    pub eval_every: usize,
    /// Seed of every random draw.
    pub seed: u64,
}

impl TrainConfig {
    /// Defaults for data of dimension `dim` under `schedule`.
    pub fn new(dim: usize, schedule: Schedule) -> Self {
        TrainConfig {
            architecture: Architecture::default_mlp(dim),
            schedule,
            tau_min: if schedule.is_variance_exploding() {
                2e-3
            } else {
                1e-3
            },
            steps: 4000,
            batch: 256,
            learning_rate: 2e-3,
            warmup: 200,
            ema_decay: 0.999,
            heldout_fraction: 0.1,
            eval_every: 100,
            seed: 0,
        }
    }

    fn validate(&self, n: usize, dim: usize) -> Result<()> {
        self.architecture.validate(dim)?;
        fit::validate(&fit::Settings {
            schedule: &self.schedule,
            tau_min: self.tau_min,
            steps: self.steps,
            batch: self.batch,
            eval_every: self.eval_every,
            learning_rate: self.learning_rate,
            ema_decay: self.ema_decay,
            heldout_fraction: self.heldout_fraction,
            examples: n,
        })
    }
}

/// One point of the loss curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    /// Optimiser steps done.
    pub step: usize,
    /// Mean training loss over the steps since the previous point.
    pub train: f64,
    /// Held-out loss of the EMA weights (absent without a held-out set).
    pub heldout: Option<f64>,
}

/// A progress report, sent every `eval_every` steps.
#[derive(Clone, Copy, Debug)]
pub struct TrainProgress {
    /// Steps done.
    pub step: usize,
    /// Total steps.
    pub steps: usize,
    /// The latest loss point.
    pub loss: LossPoint,
}

/// How a network was trained (stored in its description).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSummary {
    /// Optimiser steps.
    pub steps: usize,
    /// Minibatch size.
    pub batch: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// EMA decay.
    pub ema_decay: f64,
    /// Seed.
    pub seed: u64,
    /// Training examples.
    pub train_examples: usize,
    /// Held-out examples.
    pub heldout_examples: usize,
    /// Trainable parameters.
    pub parameters: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Examples processed per second (forward and backward).
    pub examples_per_second: f64,
    /// The loss curve.
    pub history: Vec<LossPoint>,
}

/// Deterministic initial weights: fan-in uniform weights of unit gain, biases zero,
/// normalisation scales one, and the output layer zero (so the untrained network is the exact
/// answer for standard normal data).
fn initialise(varmap: &VarMap, streams: &Streams) -> Result<()> {
    fit::initialise(varmap, streams, |name, dims| {
        if name.starts_with("out.") || name.ends_with(".bias") {
            Init::Constant(0.0)
        } else if dims.len() == 1 {
            Init::Constant(1.0)
        } else {
            Init::FanIn
        }
    })
}

/// A batch of standardised noisy inputs with their noise and ratios.
struct Batch {
    y: Tensor,
    eps: Tensor,
    lambda: Tensor,
}

/// Noises rows `rows` of the standardised data at times drawn from `rng`.
fn noised(
    data: &Array2<f64>,
    rows: &[usize],
    cfg: &TrainConfig,
    scale: f64,
    rng: &mut impl rand::Rng,
    device: &candle_core::Device,
) -> Result<Batch> {
    let d = data.ncols();
    let n = rows.len();
    let (mut y, mut eps, mut lambda) = (
        Vec::with_capacity(n * d),
        Vec::with_capacity(n * d),
        Vec::with_capacity(n),
    );
    let horizon = cfg.schedule.default_tau_max();
    for &r in rows {
        let tau = rng.random_range(cfg.tau_min..horizon);
        let l = cfg.schedule.sigma(tau) / (cfg.schedule.alpha(tau) * scale);
        lambda.push(l as f32);
        for &x in data.row(r) {
            let e: f64 = StandardNormal.sample(rng);
            eps.push(e as f32);
            y.push((x + l * e) as f32);
        }
    }
    Ok(Batch {
        y: Tensor::from_vec(y, (n, d), device)?,
        eps: Tensor::from_vec(eps, (n, d), device)?,
        lambda: Tensor::from_vec(lambda, n, device)?,
    })
}

fn loss(net: &Net, b: &Batch) -> candle_core::Result<Tensor> {
    (epsilon(net, &b.y, &b.lambda)? - &b.eps)?.sqr()?.mean_all()
}

/// Trains a score network on the rows of `data` (see the module documentation).
pub fn train(
    data: ArrayView2<f64>,
    cfg: &TrainConfig,
    mut progress: impl FnMut(&TrainProgress),
) -> Result<Network> {
    let (n, dim) = data.dim();
    cfg.validate(n, dim)?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "data",
            format!("non-finite value in row {}", i / dim),
        ));
    }
    let start = Instant::now();
    let streams = Streams::new(cfg.seed);
    let device = device();

    // Held-out split by a seeded permutation.
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = streams.rng(Purpose::Other, 0, 0);
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let heldout_n = ((n as f64) * cfg.heldout_fraction).round() as usize;
    let (heldout_rows, train_rows) = order.split_at(heldout_n);
    let (mean, scale) = standardisation(data.select(Axis(0), train_rows).view());
    let standardised = (&data - &mean) / scale;
    let train_data = standardised.select(Axis(0), train_rows);
    let heldout_data = standardised.select(Axis(0), heldout_rows);

    // Held-out batch with fixed times and noise: four draws per example.
    let heldout = if heldout_n > 0 {
        let rows: Vec<usize> = (0..4 * heldout_n).map(|i| i % heldout_n).collect();
        let mut rng = streams.rng(Purpose::Other, 0, 1);
        Some(noised(&heldout_data, &rows, cfg, scale, &mut rng, &device)?)
    } else {
        None
    };

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DTYPE, &device);
    let net = Net::new(&cfg.architecture, dim, vb)?;
    initialise(&varmap, &streams)?;
    let mut fit = Fit::new(
        &varmap,
        cfg.learning_rate,
        cfg.warmup,
        cfg.steps,
        cfg.ema_decay,
    )?;
    let mut rows = vec![0usize; cfg.batch];
    let train_n = train_data.nrows();
    for step in 0..cfg.steps {
        let mut rng = streams.rng(Purpose::Other, step + 1, 0);
        for r in rows.iter_mut() {
            *r = rng.random_range(0..train_n);
        }
        let batch = noised(&train_data, &rows, cfg, scale, &mut rng, &device)?;
        fit.step(step, &loss(&net, &batch)?, "training loss")?;
        if (step + 1) % cfg.eval_every == 0 || step + 1 == cfg.steps {
            let heldout = match &heldout {
                Some(b) => {
                    let vb = VarBuilder::from_tensors(fit.ema_params(), DTYPE, &device);
                    let ema_net = Net::new(&cfg.architecture, dim, vb)?;
                    Some(loss(&ema_net, b)?.to_scalar::<f32>()? as f64)
                }
                None => None,
            };
            fit.record(step + 1, heldout, &mut progress);
        }
    }

    let (params, training) = fit.finish(cfg.batch, cfg.seed, train_n, heldout_n, start);
    let (lo, hi) = ratio_range(cfg, scale);
    let spec = NetworkSpec {
        format: FORMAT.into(),
        version: 1,
        dim,
        architecture: cfg.architecture.clone(),
        data_mean: mean.to_vec(),
        data_scale: scale,
        schedule: cfg.schedule,
        tau_min: cfg.tau_min,
        ratio_range: [lo, hi],
        weights: String::new(),
        training: Some(training),
    };
    Network::from_parts(spec, params)
}

/// The noise ratios `σ/(α s)` at `τ_min` and `T` (increasing in τ for every schedule).
fn ratio_range(cfg: &TrainConfig, scale: f64) -> (f64, f64) {
    let at = |tau: f64| cfg.schedule.sigma(tau) / (cfg.schedule.alpha(tau) * scale);
    (at(cfg.tau_min), at(cfg.schedule.default_tau_max()))
}
