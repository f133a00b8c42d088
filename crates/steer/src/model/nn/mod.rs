//! Learned score models: time-conditioned networks on candle, trained by denoising score
//! matching ([`train`]), saved as `.safetensors` plus a JSON description, and steered like
//! any other [`ScoreModel`].
//!
//! # Parametrisation
//! Data are standardised, `x₀' = (x₀ − m)/s` (per-dimension mean `m`, one scale `s`). The
//! forward process `x_τ = α x₀ + σ ε` then reads `y = (x_τ/α − m)/s = x₀' + λ ε` with the
//! noise ratio `λ = σ/(α s)`. The network works in `(y, λ)` only, so it is the same function
//! under any schedule; the schedule it was trained with is recorded in its description and
//! sets the range of `λ` it has seen. It predicts the noise with the preconditioning of
//! Karras et al. (2022, unit data variance):
//!
//! `ε̂(y, λ) = y λ/(1+λ²) − F(y/√(1+λ²), ln(λ)/4) / √(1+λ²)`,
//!
//! so `F ≡ 0` is the exact answer for standard normal data. The score and its divergence
//! follow (MATH.md §1.4): `s(x) = −ε̂/σ` and `∇·s = −∇_y·ε̂ / (σ α s)`.
//!
//! # Divergence and log-density
//! `∇·s` is computed by reverse-mode autodiff: [`ScoreModel::jacobian_quadratic_forms`]
//! returns `zᵀ J_s z` for any probes with one vector-Jacobian product each (Hutchinson), and
//! the exact divergence uses the `d` unit vectors. `log p_τ` integrates the
//! probability-flow ODE `dy/dλ = ε̂(y, λ)` up to the largest trained `λ`, where the marginal
//! is `N(0, (1+λ²) I)` to `O(λ⁻²)`, accumulating `∫ ∇_y·ε̂ dλ` ([`LogDensityOptions`]).

pub(crate) mod fit;
mod layers;
mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use candle_nn::VarBuilder;
use ndarray::{Array1, Array2, ArrayView2, ArrayView3, ArrayViewMut2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{NoiseLevel, ScoreModel, ScoreOutput};
use crate::schedule::Schedule;

pub use layers::{Architecture, device};
use layers::{DTYPE, Net, row_sum};
pub use train::{LossPoint, TrainConfig, TrainProgress, TrainingSummary, train};

/// The `format` tag of a network description.
pub const FORMAT: &str = "steer-network";

/// The JSON description stored beside a network's `.safetensors` weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Always [`FORMAT`].
    pub format: String,
    /// Version of the description format (1).
    pub version: u32,
    /// Data dimension `d`.
    pub dim: usize,
    /// The network.
    pub architecture: Architecture,
    /// Per-dimension data mean `m`.
    pub data_mean: Vec<f64>,
    /// Data scale `s` (root mean per-dimension variance).
    pub data_scale: f64,
    /// The schedule the network was trained with.
    pub schedule: Schedule,
    /// The smallest forward time trained on.
    pub tau_min: f64,
    /// The range `[λ_min, λ_max]` of noise ratios `λ = σ/(α s)` seen in training.
    pub ratio_range: [f64; 2],
    /// File name of the weights, relative to the description.
    pub weights: String,
    /// How the network was trained.
    pub training: Option<TrainingSummary>,
}

impl NetworkSpec {
    fn validate(&self) -> Result<()> {
        fit::validate_description(
            (&self.format, self.version),
            FORMAT,
            self.dim,
            &self.data_mean,
            self.data_scale,
            self.ratio_range,
        )?;
        self.architecture.validate(self.dim)?;
        self.schedule.validate()
    }
}

/// How [`Network`] computes `log p_τ` by the probability-flow ODE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogDensityOptions {
    /// Heun steps, uniform in `ln λ`, from the evaluation level to the largest trained `λ`.
    pub steps: usize,
    /// Hutchinson probes (Rademacher) per row for `∇·ε̂`; the same probes along the whole
    /// path. They are drawn from a stream keyed by the bits of the row, so `log p̂(x)` is a
    /// deterministic function of `x`.
    pub probes: usize,
    /// Up to this dimension the divergence is exact (`d` unit probes) instead.
    pub exact_up_to: usize,
}

impl Default for LogDensityOptions {
    fn default() -> Self {
        LogDensityOptions {
            steps: 128,
            probes: 2,
            exact_up_to: 16,
        }
    }
}

/// A trained score network (see the module documentation for the parametrisation).
#[derive(Debug)]
pub struct Network {
    spec: NetworkSpec,
    params: HashMap<String, Tensor>,
    net: Net,
    device: Device,
    log_density: LogDensityOptions,
}

/// `ε̂(y, λ)` with the preconditioning of the module documentation; `y`: `n × d`, `lambda`: `n`.
fn epsilon(net: &Net, y: &Tensor, lambda: &Tensor) -> candle_core::Result<Tensor> {
    let l2 = (lambda.sqr()? + 1.0)?;
    let c_in = l2.sqrt()?.recip()?.unsqueeze(1)?;
    let c_noise = (lambda.log()? * 0.25)?;
    let f = net.forward(&y.broadcast_mul(&c_in)?, &c_noise)?;
    let skip = (lambda / &l2)?.unsqueeze(1)?;
    y.broadcast_mul(&skip)? - f.broadcast_mul(&c_in)?
}

impl Network {
    /// Builds a network from its description and parameters (checked against each other).
    pub fn from_parts(spec: NetworkSpec, params: HashMap<String, Tensor>) -> Result<Self> {
        spec.validate()?;
        let device = params
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let vb = VarBuilder::from_tensors(params.clone(), DTYPE, &device);
        let net = Net::new(&spec.architecture, spec.dim, vb).map_err(|e| {
            Error::invalid("weights", format!("do not match the architecture: {e}"))
        })?;
        Ok(Network {
            spec,
            params,
            net,
            device,
            log_density: LogDensityOptions::default(),
        })
    }

    /// Loads a network from its JSON description (the weights file sits beside it).
    pub fn load(json: &Path) -> Result<Self> {
        let (spec, params) =
            fit::load::<NetworkSpec>(json, "network description", |s| &s.weights, &device())?;
        Self::from_parts(spec, params).map_err(|e| fit::in_file(json, e))
    }

    /// Saves the weights as `<stem>.safetensors` and the description as `json`; returns the
    /// weights path.
    pub fn save(&self, json: &Path) -> Result<PathBuf> {
        fit::save(json, &self.params, &self.spec, |s, w| s.weights = w)
    }

    /// The description.
    pub fn spec(&self) -> &NetworkSpec {
        &self.spec
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.params.values().map(|t| t.elem_count()).sum()
    }

    /// Sets how `log p_τ` is computed.
    pub fn with_log_density(mut self, options: LogDensityOptions) -> Self {
        self.log_density = options;
        self
    }

    /// The noise ratio `λ` of `level`, and `1/(σ α s)` (the factor from `∇_y·ε̂` to `−∇·s`).
    fn ratio(&self, level: &NoiseLevel) -> Result<(f64, f64)> {
        if !(level.sigma > 0.0 && level.alpha > 0.0) {
            return Err(Error::invalid(
                "schedule.tau_min",
                format!(
                    "a learned model needs σ(τ) > 0, got σ = {} at τ = {} (set tau_min > 0, e.g. 1e-3 for VP)",
                    level.sigma, level.tau
                ),
            ));
        }
        let s = self.spec.data_scale;
        Ok((
            level.sigma / (level.alpha * s),
            1.0 / (level.sigma * level.alpha * s),
        ))
    }

    /// Standardised `y = (x/α − m)/s` as an `n × d` tensor.
    fn standardise(&self, level: &NoiseLevel, x: ArrayView2<f64>) -> Result<Tensor> {
        let (n, d) = x.dim();
        let s = self.spec.data_scale;
        let mut y = Vec::with_capacity(n * d);
        for row in x.rows() {
            for (v, m) in row.iter().zip(&self.spec.data_mean) {
                y.push(((v / level.alpha - m) / s) as f32);
            }
        }
        Ok(Tensor::from_vec(y, (n, d), &self.device)?)
    }

    fn tensor(&self, a: ArrayView2<f64>) -> Result<Tensor> {
        let v: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        Ok(Tensor::from_vec(v, a.dim(), &self.device)?)
    }

    fn lambda(&self, n: usize, lambda: f64) -> Result<Tensor> {
        Ok(Tensor::from_vec(vec![lambda as f32; n], n, &self.device)?)
    }

    /// `ε̂` and `zᵀ J_ε̂ z` (Jacobian in `y`) for each probe `z` (`n × d` tensors).
    fn epsilon_forms(
        &self,
        y: &Tensor,
        lambda: f64,
        probes: &[Tensor],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let n = y.dim(0)?;
        let yv = Var::from_tensor(y)?;
        let eps = epsilon(&self.net, yv.as_tensor(), &self.lambda(n, lambda)?)?;
        let mut forms = Vec::with_capacity(probes.len());
        for z in probes {
            let grads = (&eps * z)?.sum_all()?.backward()?;
            let g = grads
                .get(yv.as_tensor())
                .ok_or_else(|| Error::Backend("no gradient with respect to the input".into()))?;
            forms.push(row_sum(&(g * z)?)?);
        }
        Ok((eps.detach(), forms))
    }

    /// The `d` unit probes `e_j` repeated over `n` rows.
    fn unit_probes(&self, n: usize) -> Result<Vec<Tensor>> {
        let d = self.spec.dim;
        (0..d)
            .map(|j| {
                let mut v = vec![0f32; n * d];
                for i in 0..n {
                    v[i * d + j] = 1.0;
                }
                Ok(Tensor::from_vec(v, (n, d), &self.device)?)
            })
            .collect()
    }

    /// `Σ_p zᵀJz / P` as `n` values, from the forms of [`Self::epsilon_forms`].
    fn sum_forms(forms: &[Tensor]) -> Result<Vec<f64>> {
        let mut total = vec![0f64; forms.first().map_or(Ok(0), |f| f.dim(0))?];
        for f in forms {
            for (t, v) in total.iter_mut().zip(f.to_vec1::<f32>()?) {
                *t += v as f64;
            }
        }
        Ok(total)
    }

    /// `log p̃_λ(y)` of the standardised marginal by the probability-flow ODE.
    fn standardised_log_density(&self, y0: &Tensor, lambda0: f64) -> Result<Vec<f64>> {
        let (n, d) = y0.dims2()?;
        let lambda1 = self.spec.ratio_range[1];
        let opts = self.log_density;
        let exact = d <= opts.exact_up_to;
        let probes = if exact {
            self.unit_probes(n)?
        } else {
            let rows = y0.to_vec2::<f32>()?;
            let mut per_probe = vec![vec![0f32; n * d]; opts.probes];
            for (i, row) in rows.iter().enumerate() {
                let key = row.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
                    (h ^ v.to_bits() as u64).wrapping_mul(0x1000_0000_01b3)
                });
                let mut rng = ChaCha8Rng::seed_from_u64(key);
                for probe in per_probe.iter_mut() {
                    for c in 0..d {
                        probe[i * d + c] = if rand::RngExt::random::<bool>(&mut rng) {
                            1.0
                        } else {
                            -1.0
                        };
                    }
                }
            }
            per_probe
                .into_iter()
                .map(|v| Ok(Tensor::from_vec(v, (n, d), &self.device)?))
                .collect::<Result<Vec<_>>>()?
        };
        // Unit probes sum to the trace; random ones average to it.
        let scale = if exact {
            1.0
        } else {
            1.0 / probes.len() as f64
        };
        let mut y = y0.clone();
        let mut integral = vec![0f64; n];
        let (u0, u1) = (lambda0.ln(), lambda1.ln());
        let steps = if lambda0 < lambda1 {
            opts.steps.max(1)
        } else {
            0
        };
        let h = if steps > 0 {
            (u1 - u0) / steps as f64
        } else {
            0.0
        };
        // One right-hand side: dy/du = λ ε̂, and λ ∇·ε̂ for the log-density.
        let rhs = |y: &Tensor, u: f64| -> Result<(Tensor, Vec<f64>)> {
            let lambda = u.exp();
            let (eps, forms) = self.epsilon_forms(y, lambda, &probes)?;
            let div = Self::sum_forms(&forms)?;
            Ok((
                (eps * lambda)?,
                div.into_iter().map(|v| v * scale * lambda).collect(),
            ))
        };
        for k in 0..steps {
            let u = u0 + k as f64 * h;
            let (v1, g1) = rhs(&y, u)?;
            let y_pred = (&y + (&v1 * h)?)?;
            let (v2, g2) = rhs(&y_pred, u + h)?;
            y = (&y + ((v1 + v2)? * (0.5 * h))?)?;
            for i in 0..n {
                integral[i] += 0.5 * h * (g1[i] + g2[i]);
            }
        }
        let var = 1.0 + lambda1.max(lambda0).powi(2);
        let sq = row_sum(&y.sqr()?)?.to_vec1::<f32>()?;
        let norm = -0.5 * d as f64 * (2.0 * std::f64::consts::PI * var).ln();
        Ok((0..n)
            .map(|i| norm - 0.5 * sq[i] as f64 / var + integral[i])
            .collect())
    }
}

impl ScoreModel for Network {
    fn dim(&self) -> usize {
        self.spec.dim
    }

    fn evaluate(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        mut out: ScoreOutput<'_>,
    ) -> Result<()> {
        let (n, d) = x.dim();
        if d != self.spec.dim {
            return Err(Error::Dimension {
                context: "network input".into(),
                expected: self.spec.dim,
                found: d,
            });
        }
        let (lambda, div_factor) = self.ratio(level)?;
        let y = self.standardise(level, x)?;
        let eps = if let Some(div) = out.divergence.as_mut() {
            let (eps, forms) = self.epsilon_forms(&y, lambda, &self.unit_probes(n)?)?;
            for (o, v) in div.iter_mut().zip(Self::sum_forms(&forms)?) {
                *o = -v * div_factor;
            }
            eps
        } else {
            epsilon(&self.net, &y, &self.lambda(n, lambda)?)?
        };
        write_score(&eps, level, out.score.view_mut())?;
        if let Some(mut lp) = out.log_density {
            let shift = d as f64 * (level.alpha * self.spec.data_scale).ln();
            for (o, v) in lp
                .iter_mut()
                .zip(self.standardised_log_density(&y, lambda)?)
            {
                *o = v - shift;
            }
        }
        Ok(())
    }

    fn provides_log_density(&self) -> bool {
        true
    }

    fn provides_divergence(&self) -> bool {
        true
    }

    fn provides_vjp(&self) -> bool {
        true
    }

    fn jacobian_quadratic_forms(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        probes: ArrayView3<f64>,
        score: ArrayViewMut2<f64>,
        mut forms: ArrayViewMut2<f64>,
    ) -> Result<()> {
        let (lambda, div_factor) = self.ratio(level)?;
        let y = self.standardise(level, x)?;
        let probes = probes
            .axis_iter(Axis(0))
            .map(|z| self.tensor(z))
            .collect::<Result<Vec<_>>>()?;
        let (eps, fs) = self.epsilon_forms(&y, lambda, &probes)?;
        write_score(&eps, level, score)?;
        for (mut row, f) in forms.axis_iter_mut(Axis(0)).zip(fs) {
            for (o, v) in row.iter_mut().zip(f.to_vec1::<f32>()?) {
                *o = -(v as f64) * div_factor;
            }
        }
        Ok(())
    }
}

/// The score `s = −ε̂/σ` (MATH.md §1.4) from the predicted noise `eps` (`n × d`).
fn write_score(eps: &Tensor, level: &NoiseLevel, mut score: ArrayViewMut2<f64>) -> Result<()> {
    for (o, e) in score.iter_mut().zip(eps.flatten_all()?.to_vec1::<f32>()?) {
        *o = -(e as f64) / level.sigma;
    }
    Ok(())
}

/// Mean and scale `(m, s)` that standardise `data` (`s²` = mean per-dimension variance;
/// `s = 1` for constant data, which only need centring). Every network steer trains (score
/// networks, learned h-functions, classifiers) standardises its inputs this way.
pub fn standardisation(data: ArrayView2<f64>) -> (Array1<f64>, f64) {
    let mean = data.mean_axis(Axis(0)).expect("non-empty data");
    let centred: Array2<f64> = &data - &mean;
    let var = centred.mapv(|v| v * v).mean().unwrap_or(1.0);
    let scale = if var > 0.0 { var.sqrt() } else { 1.0 };
    (mean, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use rand_distr::{Distribution, StandardNormal};

    fn vp() -> Schedule {
        Schedule::VpLinear {
            beta_min: 0.1,
            beta_max: 20.0,
            horizon: 1.0,
        }
    }

    fn normal_data(n: usize, d: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((n, d), |_| StandardNormal.sample(&mut rng))
    }

    /// The untrained network (`F ≡ 0`) is the exact model of `N(m, s² I)`, so its PF-ODE
    /// log-density must match that Gaussian's: the only error is Heun's `O(h²)` with the
    /// default 128 steps over `ln λ` (measured ≤ 0.015, and 0.056 with 64 steps; bound 0.05),
    /// and the score is exact to f32.
    #[test]
    fn untrained_network_is_the_standardised_gaussian() {
        let data = normal_data(500, 2, 1);
        let mut cfg = train::TrainConfig::new(2, vp());
        cfg.steps = 1;
        cfg.learning_rate = 1e-12;
        let net = train::train(data.view(), &cfg, |_| {}).unwrap();
        let (m, s) = (net.spec().data_mean.clone(), net.spec().data_scale);
        for tau in [0.01, 0.3] {
            let level = NoiseLevel::new(&vp(), tau);
            let x = data.slice(ndarray::s![..8, ..]).to_owned();
            let mut score = Array2::zeros((8, 2));
            let mut lp = Array1::zeros(8);
            net.evaluate(
                &level,
                x.view(),
                ScoreOutput {
                    score: score.view_mut(),
                    log_density: Some(lp.view_mut()),
                    divergence: None,
                },
            )
            .unwrap();
            let var = level.alpha.powi(2) * s * s + level.sigma.powi(2);
            for i in 0..8 {
                let mut exact = 0.0;
                for j in 0..2 {
                    let dx = x[[i, j]] - level.alpha * m[j];
                    exact -= 0.5 * dx * dx / var + 0.5 * (2.0 * std::f64::consts::PI * var).ln();
                    let s_exact = -dx / var;
                    assert!((score[[i, j]] - s_exact).abs() < 1e-4 * (1.0 + s_exact.abs()));
                }
                assert!(
                    (lp[i] - exact).abs() < 0.05,
                    "τ {tau}: {} vs {exact}",
                    lp[i]
                );
            }
        }
    }

    /// Training is deterministic for a seed (bit-identical weights), for both architectures,
    /// and a U-Net round-trips through its files bit for bit.
    #[test]
    fn training_is_deterministic_and_unet_round_trips() {
        let data = normal_data(64, 16, 2);
        let mut cfg = train::TrainConfig::new(16, vp());
        cfg.steps = 20;
        cfg.batch = 16;
        cfg.eval_every = 10;
        for arch in [
            Architecture::Mlp {
                hidden: 32,
                blocks: 1,
                embedding: 8,
            },
            Architecture::Unet {
                channels_in: 1,
                height: 4,
                width: 4,
                channels: 8,
                embedding: 8,
            },
        ] {
            cfg.architecture = arch;
            let a = train::train(data.view(), &cfg, |_| {}).unwrap();
            let b = train::train(data.view(), &cfg, |_| {}).unwrap();
            let level = NoiseLevel::new(&vp(), 0.2);
            let x = normal_data(5, 16, 3);
            let eval = |n: &Network| {
                let mut s = Array2::zeros((5, 16));
                n.evaluate(
                    &level,
                    x.view(),
                    ScoreOutput {
                        score: s.view_mut(),
                        log_density: None,
                        divergence: None,
                    },
                )
                .unwrap();
                s
            };
            let bits = |s: Array2<f64>| s.mapv(f64::to_bits);
            assert_eq!(bits(eval(&a)), bits(eval(&b)));
            let dir = std::env::temp_dir().join(format!("steer-nn-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let json = dir.join("m.json");
            a.save(&json).unwrap();
            let loaded = Network::load(&json).unwrap();
            assert_eq!(bits(eval(&a)), bits(eval(&loaded)));
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// Bad descriptions and bad levels are errors that name the field or file.
    #[test]
    fn errors_name_the_field_or_file() {
        let data = normal_data(32, 2, 4);
        let mut cfg = train::TrainConfig::new(2, vp());
        cfg.steps = 1;
        let net = train::train(data.view(), &cfg, |_| {}).unwrap();
        let mut s = Array2::zeros((1, 2));
        let err = net
            .evaluate(
                &NoiseLevel::data(),
                data.slice(ndarray::s![..1, ..]),
                ScoreOutput {
                    score: s.view_mut(),
                    log_density: None,
                    divergence: None,
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("tau_min"), "{err}");
        let missing = Network::load(Path::new("/nonexistent/model.json")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/model.json"));
        let mut spec = net.spec().clone();
        spec.architecture = Architecture::Unet {
            channels_in: 1,
            height: 2,
            width: 2,
            channels: 8,
            embedding: 8,
        };
        let err = Network::from_parts(spec, net.params.clone()).unwrap_err();
        assert!(err.to_string().contains("architecture"), "{err}");
        cfg.tau_min = 0.0;
        let err = train::train(data.view(), &cfg, |_| {}).unwrap_err();
        assert!(err.to_string().contains("tau_min"), "{err}");
    }
}
