//! Denoising score matching for [`Network`]s.
//!
//! Each step draws a minibatch `x₀` (with replacement), times `τ ~ U[τ_min, τ_max]` of the
//! schedule (`τ_max = T`, or `T(1 − 10⁻³)` for the cosine schedule) and noise `ε ~ N(0, I)`, and minimises `E|ε̂(y, λ) − ε|²` with `y = x₀' + λ ε`: the
//! score-matching loss with the schedule's weighting `σ(τ)²` (MATH.md §1.4). Adam with a
//! linear warm-up and a cosine decay to a tenth of the rate; an exponential moving average
//! (EMA) of the weights is what is saved. A held-out set with fixed noise is scored with the
//! EMA weights every `eval_every` steps. Every random draw (initial weights, minibatches,
//! times, noise) comes from the explicit seed, so training is deterministic on the CPU.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use ndarray::{Array2, ArrayView2, Axis};
use rand::RngExt;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

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
        self.schedule.validate()?;
        let horizon = self.schedule.horizon();
        if !(self.tau_min > 0.0 && self.tau_min < horizon) {
            return Err(Error::invalid(
                "tau_min",
                format!("must lie in (0, T = {horizon}), got {}", self.tau_min),
            ));
        }
        for (field, v) in [
            ("steps", self.steps),
            ("batch", self.batch),
            ("eval_every", self.eval_every),
        ] {
            if v == 0 {
                return Err(Error::invalid(field, "must be positive"));
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::invalid(
                "learning_rate",
                "must be finite and positive",
            ));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(Error::invalid("ema_decay", "must lie in [0, 1)"));
        }
        if !(0.0..0.5).contains(&self.heldout_fraction) {
            return Err(Error::invalid("heldout_fraction", "must lie in [0, 0.5)"));
        }
        if n < 2 {
            return Err(Error::invalid(
                "data",
                format!("needs at least 2 examples, got {n}"),
            ));
        }
        Ok(())
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

/// Deterministic initial weights: for each parameter in name order, weights of fan-in `f`
/// uniform on `±√(3/f)` (unit gain), biases zero, normalisation scales one, and the output
/// layer zero (so the untrained network is the exact answer for standard normal data).
fn initialise(varmap: &VarMap, streams: &Streams) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .expect("the variable map is not poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (index, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let count: usize = dims.iter().product();
        let values: Vec<f32> = if name.starts_with("out.") || name.ends_with(".bias") {
            vec![0.0; count]
        } else if dims.len() == 1 {
            vec![1.0; count]
        } else {
            let fan_in: usize = dims[1..].iter().product();
            let bound = (3.0 / fan_in as f64).sqrt();
            let mut rng = streams.rng(Purpose::Init, 0, index);
            (0..count)
                .map(|_| (rng.random_range(-bound..bound)) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
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
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("the variable map is not poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ema: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().detach()).collect();
    let mut opt = AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    let ema_params = |ema: &[Tensor]| -> HashMap<String, Tensor> {
        vars.iter()
            .zip(ema)
            .map(|((k, _), t)| (k.clone(), t.clone()))
            .collect()
    };
    let mut history = Vec::new();
    let (mut running, mut count) = (0.0, 0usize);
    let mut rows = vec![0usize; cfg.batch];
    let train_n = train_data.nrows();
    for step in 0..cfg.steps {
        let warm = ((step + 1) as f64 / cfg.warmup.max(1) as f64).min(1.0);
        let progress_frac = step as f64 / cfg.steps as f64;
        let decay = 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress_frac).cos());
        opt.set_learning_rate(cfg.learning_rate * warm * decay);
        let mut rng = streams.rng(Purpose::Other, step + 1, 0);
        for r in rows.iter_mut() {
            *r = rng.random_range(0..train_n);
        }
        let batch = noised(&train_data, &rows, cfg, scale, &mut rng, &device)?;
        let l = loss(&net, &batch)?;
        let lv = l.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            return Err(Error::NonFinite {
                step,
                what: "training loss",
                particle: 0,
            });
        }
        opt.backward_step(&l)?;
        // A short-horizon average at the start, so early weights do not linger.
        let decay = cfg
            .ema_decay
            .min((1.0 + step as f64) / (10.0 + step as f64));
        for (e, (_, v)) in ema.iter_mut().zip(&vars) {
            *e = ((&*e * decay)? + (v.as_tensor() * (1.0 - decay))?)?.detach();
        }
        running += lv;
        count += 1;
        if (step + 1) % cfg.eval_every == 0 || step + 1 == cfg.steps {
            let heldout = match &heldout {
                Some(b) => {
                    let params = ema_params(&ema);
                    let vb = VarBuilder::from_tensors(params, DTYPE, &device);
                    let ema_net = Net::new(&cfg.architecture, dim, vb)?;
                    Some(loss(&ema_net, b)?.to_scalar::<f32>()? as f64)
                }
                None => None,
            };
            let point = LossPoint {
                step: step + 1,
                train: running / count as f64,
                heldout,
            };
            history.push(point);
            progress(&TrainProgress {
                step: step + 1,
                steps: cfg.steps,
                loss: point,
            });
            running = 0.0;
            count = 0;
        }
    }

    let params = ema_params(&ema);
    let parameters = params.values().map(|t| t.elem_count()).sum();
    let (lo, hi) = ratio_range(cfg, scale);
    let seconds = start.elapsed().as_secs_f64();
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
        training: Some(TrainingSummary {
            steps: cfg.steps,
            batch: cfg.batch,
            learning_rate: cfg.learning_rate,
            ema_decay: cfg.ema_decay,
            seed: cfg.seed,
            train_examples: train_n,
            heldout_examples: heldout_n,
            parameters,
            seconds,
            examples_per_second: (cfg.steps * cfg.batch) as f64 / seconds,
            history,
        }),
    };
    Network::from_parts(spec, params)
}

/// The noise ratios `σ/(α s)` at `τ_min` and `T` (increasing in τ for every schedule).
fn ratio_range(cfg: &TrainConfig, scale: f64) -> (f64, f64) {
    let at = |tau: f64| cfg.schedule.sigma(tau) / (cfg.schedule.alpha(tau) * scale);
    (at(cfg.tau_min), at(cfg.schedule.default_tau_max()))
}
