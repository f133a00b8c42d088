//! A learned Doob h-function (MATH.md §7.3): a positive network `ĥ_θ(τ, x)` regressed on
//! `Y = e^{r(X) − max r}` from noised base samples, trained with a gradient penalty
//! ([`train`]), saved as `.safetensors` plus a JSON description, and used for guidance
//! through [`HFunction`] like the exact [`crate::doob::ExactH`].
//!
//! # Parametrisation
//! Inputs are standardised like the score network's ([`crate::model::nn`]): with the data
//! mean `m`, data scale `s` and the noise ratio `λ = σ/(α s)`,
//!
//! `z = (x/α − m) / (s √(1+λ²))`,  `c = ln(λ)/4`,
//!
//! so `z` has about unit variance at every noise level, and the network is
//!
//! `ĥ(τ, x) = softplus(o(z, c))`,  `o = w · silu(u_B) + b`,
//!
//! a residual MLP on `z` ([`Architecture::Mlp`]: `u = W_in z`, then blocks
//! `u ← u + W₂ silu(W₁ silu(u) + W_t e(c))`) with the sinusoidal embedding `e(c)` of the noise
//! feature. The softplus head keeps `ĥ > 0` (MATH.md §7.3). `ĥ` is on the `Y` scale: the
//! description stores `max_j r(X_j)` as [`DoobSpec::reward_max`], so
//! `log E[e^{r(x_0)} | x_τ = x] ≈ log ĥ + reward_max`.
//!
//! # Evaluation
//! [`HFunction::evaluate`] runs one forward and one backward pass per batch (in `f32`) and
//! returns, in `f64`, `log ĥ = log softplus(o)` and
//! `∇_x log ĥ = (sigmoid(o)/softplus(o)) ∇_z o · 1/(α s √(1+λ²))`, both computed from `o`
//! so that a tiny `ĥ` gives neither `log 0` nor `0/0`. Post-process with
//! [`crate::doob::Clip::learned`] (MATH.md §7.4) before guiding.

mod laplacian;
mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, linear};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use crate::doob::{HFunction, HOutput};
use crate::error::{Error, Result};
use crate::model::NoiseLevel;
use crate::model::nn::fit;
use crate::model::nn::{Architecture, TrainingSummary, device};
use crate::schedule::Schedule;

pub use train::{DoobTrainConfig, second_order_gradients_enabled, train};

/// The `format` tag of a learned h-function's description.
pub const FORMAT: &str = "steer-doob";

/// The dtype the network trains and runs in.
const DTYPE: DType = DType::F32;

/// The loss a learned h-function is trained with (MATH.md §7.3). Both regress
/// `(ĥ(τ_i, X^i_τ) − Y^i)²`; they differ in the gradient term, weighted by
/// [`DoobSpec::lambda_gp`] / [`DoobTrainConfig::lambda_gp`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DoobLoss {
    /// The SDORE form (default): `mean (ĥ − Y)² + λ_gp · mean |s ∇_x ĥ|²`, the gradient
    /// penalty measured in data-scale units (`s` the data scale), i.e. MATH.md's
    /// `λ_gp` is `λ_gp s²`. It biases `ĥ` toward a smoother function (the population minimiser
    /// solves `h_λ − λ p⁻¹∇·(p∇h_λ) = h`) and in exchange controls the variance of `∇ĥ`.
    #[default]
    Penalised,
    /// The "`H¹` with an unbiased gradient target" form:
    /// `mean (ĥ − Y)² + λ_gp · mean |σ(∇_x ĥ + ĥ s_τ) + Y ε|²`, with `s_τ` the pretrained
    /// score at the noised point. Since `E[−Y ε/σ | x] = ∇h + h s`, both terms are
    /// conditionally unbiased and the minimiser is `h` for every `λ_gp`; it needs the
    /// score model.
    Unbiased,
}

/// How the noise `(τ_i, ε_i)` of the training pairs `X^i_τ = α(τ_i) X^i + σ(τ_i) ε_i` is drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DoobPairs {
    /// Afresh for every minibatch (default): unlimited noised pairs from the same `n_tr`
    /// samples, so the network cannot memorise the noise of the targets `Y^i`.
    #[default]
    Fresh,
    /// Once per sample, before training (MATH.md §7.3 as written): `n_tr` fixed pairs. A
    /// network trained for many epochs memorises them and `∇ĥ` oscillates; the gradient
    /// penalty is then what controls it. On the 1-D mixture of `tests/doob_learned.rs` the
    /// guidance error on fixed pairs was 10³ times that on fresh ones (see
    /// `examples/doob_sweep.rs`).
    Fixed,
}

/// The JSON description stored beside a learned h-function's `.safetensors` weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoobSpec {
    /// Always [`FORMAT`].
    pub format: String,
    /// Version of the description format (1).
    pub version: u32,
    /// Data dimension `d`.
    pub dim: usize,
    /// The network (only [`Architecture::Mlp`]).
    pub architecture: Architecture,
    /// Per-dimension mean `m` of the training samples.
    pub data_mean: Vec<f64>,
    /// Data scale `s` (root mean per-dimension variance).
    pub data_scale: f64,
    /// The schedule the noised training pairs were drawn with.
    pub schedule: Schedule,
    /// The smallest forward time trained on.
    pub tau_min: f64,
    /// The range `[λ_min, λ_max]` of noise ratios `λ = σ/(α s)` seen in training.
    pub ratio_range: [f64; 2],
    /// The loss form.
    pub loss: DoobLoss,
    /// The weight `λ_gp` of its gradient term.
    pub lambda_gp: f64,
    /// How the training pairs' noise was drawn.
    pub pairs: DoobPairs,
    /// `max_j r(X_j)` over the training samples: `ĥ` approximates
    /// `E[e^{r(x_0) − reward_max} | x_τ]`.
    pub reward_max: f64,
    /// File name of the weights, relative to the description.
    pub weights: String,
    /// How the network was trained.
    pub training: Option<TrainingSummary>,
}

impl DoobSpec {
    fn validate(&self) -> Result<()> {
        fit::validate_description(
            (&self.format, self.version),
            FORMAT,
            self.dim,
            &self.data_mean,
            self.data_scale,
            self.ratio_range,
        )?;
        validate_architecture(&self.architecture, self.dim)?;
        if !(self.lambda_gp.is_finite() && self.lambda_gp >= 0.0) {
            return Err(Error::invalid(
                "lambda_gp",
                format!("must be finite and ≥ 0, got {}", self.lambda_gp),
            ));
        }
        if !self.reward_max.is_finite() {
            return Err(Error::invalid("reward_max", "must be finite"));
        }
        self.schedule.validate()
    }
}

/// Checks that `architecture` is a valid residual MLP for dimension `dim`.
fn validate_architecture(architecture: &Architecture, dim: usize) -> Result<()> {
    architecture.validate(dim)?;
    match architecture {
        Architecture::Mlp { .. } => Ok(()),
        Architecture::Unet { .. } => Err(Error::Unsupported(
            "a learned h-function is a residual MLP (`kind = \"mlp\"`); the U-Net has a vector output"
                .into(),
        )),
    }
}

/// `c ↦ [sin(ω_k c), cos(ω_k c)]` with `ω_k` geometric from 1 to 100: `n` → `n × width`
/// (the embedding of the score network).
fn sinusoidal(c: &Tensor, width: usize) -> candle_core::Result<Tensor> {
    let half = width / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|k| {
            let u = if half > 1 {
                k as f64 / (half - 1) as f64
            } else {
                0.0
            };
            100f64.powf(u)
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), c.device())?.to_dtype(c.dtype())?;
    let arg = c.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[arg.sin()?, arg.cos()?], 1)
}

#[derive(Debug)]
struct Block {
    first: Linear,
    time: Linear,
    second: Linear,
}

/// The residual MLP `o(z, c)` (pre-softplus output, `n × 1`).
#[derive(Debug)]
struct HNet {
    embedding: usize,
    input: Linear,
    time1: Linear,
    time2: Linear,
    blocks: Vec<Block>,
    output: Linear,
}

impl HNet {
    fn new(architecture: &Architecture, dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let Architecture::Mlp {
            hidden,
            blocks,
            embedding,
        } = *architecture
        else {
            candle_core::bail!("a learned h-function needs an MLP architecture");
        };
        Ok(HNet {
            embedding,
            input: linear(dim, hidden, vb.pp("input"))?,
            time1: linear(embedding, hidden, vb.pp("embed.time1"))?,
            time2: linear(hidden, hidden, vb.pp("embed.time2"))?,
            blocks: (0..blocks)
                .map(|b| {
                    let vb = vb.pp(format!("block{b}"));
                    Ok(Block {
                        first: linear(hidden, hidden, vb.pp("lin1"))?,
                        time: linear(hidden, hidden, vb.pp("time"))?,
                        second: linear(hidden, hidden, vb.pp("lin2"))?,
                    })
                })
                .collect::<candle_core::Result<_>>()?,
            output: linear(hidden, 1, vb.pp("out"))?,
        })
    }

    /// `o(z, c)`: `n` values from `z` (`n × d`) and the noise feature `c` (`n`, or one value
    /// shared by every row: the time features are then computed once), with candle's fused
    /// `silu` (fast; differentiable once).
    fn forward(&self, z: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(z, c, |u| u.silu())
    }

    /// [`Self::forward`] built from [`silu`], whose graph can be differentiated twice (the
    /// gradient penalty, the Laplacian). The same function up to rounding.
    fn forward_twice_differentiable(&self, z: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(z, c, silu)
    }

    fn forward_with(
        &self,
        z: &Tensor,
        c: &Tensor,
        silu: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let e = sinusoidal(c, self.embedding)?;
        let t = silu(&self.time2.forward(&silu(&self.time1.forward(&e)?)?)?)?;
        let mut u = self.input.forward(z)?;
        for b in &self.blocks {
            let inner = b
                .first
                .forward(&silu(&u)?)?
                .broadcast_add(&b.time.forward(&t)?)?;
            u = (u + b.second.forward(&silu(&inner)?)?)?;
        }
        self.output.forward(&silu(&u)?)?.squeeze(1)
    }
}

/// `silu(u) = u σ(u)` with `σ(u) = (1 + tanh(u/2))/2`: the same function as candle's fused
/// `silu`, whose backward pass computes `σ` through `e^{−u}`. That overflows in `f32` below
/// `u ≈ −88`, and a second-order gradient then multiplies `∞` by `0` (observed as NaN
/// weights late in training on fixed pairs). `tanh` and its derivative `1 − tanh²` stay
/// bounded at every order. It costs about three times the fused `silu`, so first-order
/// passes use the fused one.
fn silu(u: &Tensor) -> candle_core::Result<Tensor> {
    u * (((u * 0.5)?.tanh()? * 0.5)? + 0.5)?
}

/// `softplus(o) = max(o, 0) + log(1 + e^{−|o|})`, stable and twice differentiable in candle
/// (away from the kink of the two pieces, where the sum is smooth).
fn softplus(o: &Tensor) -> candle_core::Result<Tensor> {
    o.relu()? + ((o.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

/// `log softplus(o)` and `sigmoid(o)/softplus(o)` in `f64` (the factor from `∇o` to
/// `∇log ĥ`), stable for every finite `o`.
fn log_softplus_and_ratio(o: f64) -> (f64, f64) {
    if o < -30.0 {
        // softplus(o) = e^o (1 − e^o/2 + …), sigmoid(o) = e^o (1 − e^o + …).
        let e = o.exp();
        (o - 0.5 * e, 1.0 - 0.5 * e)
    } else {
        let sp = if o > 30.0 {
            o + (-o).exp().ln_1p()
        } else {
            o.exp().ln_1p()
        };
        let sig = 1.0 / (1.0 + (-o).exp());
        (sp.ln(), sig / sp)
    }
}

/// A learned h-function (see the module documentation).
#[derive(Debug)]
pub struct DoobNetwork {
    spec: DoobSpec,
    params: HashMap<String, Tensor>,
    net: HNet,
    device: Device,
}

impl DoobNetwork {
    /// Builds a network from its description and parameters (checked against each other).
    pub fn from_parts(spec: DoobSpec, params: HashMap<String, Tensor>) -> Result<Self> {
        spec.validate()?;
        let device = params
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let vb = VarBuilder::from_tensors(params.clone(), DTYPE, &device);
        let net = HNet::new(&spec.architecture, spec.dim, vb).map_err(|e| {
            Error::invalid("weights", format!("do not match the architecture: {e}"))
        })?;
        Ok(DoobNetwork {
            spec,
            params,
            net,
            device,
        })
    }

    /// Loads a learned h-function from its JSON description (the weights file sits beside it).
    pub fn load(json: &Path) -> Result<Self> {
        let (spec, params) = fit::load::<DoobSpec>(
            json,
            "learned h-function description",
            |s| &s.weights,
            &device(),
        )?;
        Self::from_parts(spec, params).map_err(|e| fit::in_file(json, e))
    }

    /// Saves the weights as `<stem>.safetensors` and the description as `json`; returns the
    /// weights path.
    pub fn save(&self, json: &Path) -> Result<PathBuf> {
        fit::save(json, &self.params, &self.spec, |s, w| s.weights = w)
    }

    /// The description.
    pub fn spec(&self) -> &DoobSpec {
        &self.spec
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.params.values().map(|t| t.elem_count()).sum()
    }

    /// `(λ, c_in, 1/(α s √(1+λ²)))` at `level`: the noise ratio, the input scale and the
    /// factor `∂z/∂x`.
    fn factors(&self, level: &NoiseLevel) -> Result<(f64, f64, f64)> {
        if !(level.sigma > 0.0 && level.alpha > 0.0) {
            return Err(Error::invalid(
                "schedule.tau_min",
                format!(
                    "a learned h-function needs σ(τ) > 0, got σ = {} at τ = {} (stop the grid at tau_min > 0, e.g. 1e-3 for VP)",
                    level.sigma, level.tau
                ),
            ));
        }
        let s = self.spec.data_scale;
        let lambda = level.sigma / (level.alpha * s);
        let c_in = 1.0 / (1.0 + lambda * lambda).sqrt();
        Ok((lambda, c_in, c_in / (level.alpha * s)))
    }

    /// The network inputs for `x` at `level`: `z` (`n × d`), the noise feature `c` (one value,
    /// shared by the rows), and the factor `k = ∂z/∂x`.
    fn inputs(&self, level: &NoiseLevel, x: ArrayView2<f64>) -> Result<(Tensor, Tensor, f64)> {
        let (n, d) = x.dim();
        if d != self.spec.dim {
            return Err(Error::Dimension {
                context: "learned h-function input".into(),
                expected: self.spec.dim,
                found: d,
            });
        }
        let (lambda, c_in, dz_dx) = self.factors(level)?;
        let s = self.spec.data_scale;
        let mut z = Vec::with_capacity(n * d);
        for row in x.rows() {
            for (v, m) in row.iter().zip(&self.spec.data_mean) {
                z.push(((v / level.alpha - m) / s * c_in) as f32);
            }
        }
        let z = Tensor::from_vec(z, (n, d), &self.device)?;
        let c = Tensor::from_vec(vec![(lambda.ln() / 4.0) as f32], 1, &self.device)?;
        Ok((z, c, dz_dx))
    }

    /// The pre-softplus output `o` and its gradient `∇_z o` (`n` and `n × d`, as `f32`).
    fn output_and_gradient(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
    ) -> Result<(Vec<f32>, Vec<f32>, f64)> {
        let (z, c, dz_dx) = self.inputs(level, x)?;
        let z = Var::from_tensor(&z)?;
        let o = self.net.forward(z.as_tensor(), &c)?;
        let grads = o.sum_all()?.backward()?;
        let g = grads
            .get(z.as_tensor())
            .ok_or_else(|| Error::Backend("no gradient with respect to the input".into()))?;
        Ok((
            o.detach().to_vec1::<f32>()?,
            g.detach().flatten_all()?.to_vec1::<f32>()?,
            dz_dx,
        ))
    }
}

impl HFunction for DoobNetwork {
    fn dim(&self) -> usize {
        self.spec.dim
    }

    fn evaluate(&self, level: &NoiseLevel, x: ArrayView2<f64>, out: HOutput<'_>) -> Result<()> {
        let d = self.spec.dim;
        let HOutput {
            mut log_h,
            mut grad_log_h,
        } = out;
        if grad_log_h.dim() != x.dim() {
            return Err(Error::Dimension {
                context: "learned h-function gradient buffer".into(),
                expected: x.nrows(),
                found: grad_log_h.nrows(),
            });
        }
        let (o, g, dz_dx) = self.output_and_gradient(level, x)?;
        for (i, mut row) in grad_log_h.rows_mut().into_iter().enumerate() {
            let (lh, ratio) = log_softplus_and_ratio(o[i] as f64);
            if let Some(l) = log_h.as_mut() {
                l[i] = lh;
            }
            let factor = ratio * dz_dx;
            for (c, v) in row.iter_mut().enumerate() {
                *v = g[i * d + c] as f64 * factor;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stable `log softplus` and `sigmoid/softplus` agree with the direct `f64` formulas
    /// to 1e-12 relative where those are accurate, and stay finite (and right) in both tails;
    /// the candle softplus matches to 1e-12 absolute.
    #[test]
    fn softplus_helpers_are_stable() {
        for o in [-25.0f64, -5.0, -0.3, 0.0, 0.7, 4.0, 25.0] {
            let sp: f64 = o.exp().ln_1p();
            let sig = 1.0 / (1.0 + f64::exp(-o));
            let (l, r) = log_softplus_and_ratio(o);
            assert!((l - sp.ln()).abs() < 1e-12 * (1.0 + sp.ln().abs()), "{o}");
            assert!((r - sig / sp).abs() < 1e-12 * (sig / sp), "{o}");
        }
        let (l, r) = log_softplus_and_ratio(-40.0);
        assert!((l + 40.0).abs() < 1e-15 && (r - 1.0).abs() < 1e-15);
        let (l, r) = log_softplus_and_ratio(-800.0);
        assert_eq!((l, r), (-800.0, 1.0));
        let (l, r) = log_softplus_and_ratio(50.0);
        assert!((l - 50f64.ln()).abs() < 1e-12 && (r - 1.0 / 50.0).abs() < 1e-12);
        // The candle softplus matches in both tails and at the kink.
        let o = Tensor::new(&[-30.0f64, -1.0, 0.0, 2.0, 40.0], &Device::Cpu).unwrap();
        let sp = softplus(&o).unwrap().to_vec1::<f64>().unwrap();
        for (v, o) in sp.iter().zip([-30.0f64, -1.0, 0.0, 2.0, 40.0]) {
            let exact = if o > 30.0 { o } else { o.exp().ln_1p() };
            // Absolute accuracy only in the far left tail (log(1 + 1e-13) rounds).
            assert!((v - exact).abs() < 1e-12 * (1.0 + exact), "{o}: {v}");
        }
    }
}
