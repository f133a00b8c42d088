//! The Laplacian `Δ_x log ĥ` of a learned h-function by second-order autodiff, for DriftLite on
//! the Doob path ([`crate::method::DriftLite::with_doob`]).
//!
//! With `ĥ = softplus(o(z, c))` and `z = (x/α − m)/(s√(1+λ²))`, so that `∂z/∂x = k I` with
//! `k = 1/(α s √(1+λ²))`:
//!
//! * `∇_x log ĥ = ϱ(o) k ∇_z o`, with `ϱ = sigmoid/softplus`;
//! * `Δ_x log ĥ = k² (ϱ(o) Δ_z o + ϱ'(o) |∇_z o|²)`, with
//!   `ϱ' = σ(1 − σ)/sp − σ²/sp²` (`σ = sigmoid(o)`, `sp = softplus(o)`; `ϱ' ≤ 0`, since
//!   softplus is log-concave).
//!
//! `∇_z o` comes from a first backward pass with respect to the input (a [`Var`]), kept in the
//! graph (this needs `CANDLE_GRAD_DO_NOT_DETACH`, see [`super::second_order_gradients_enabled`]);
//! `Δ_z o = tr ∇²_z o` from vector-Jacobian products of `∇_z o · v` with respect to `z`, one
//! backward pass per vector `v`, all rows at once (rows are independent). Like the score
//! network's divergence, the trace is exact (the `d` unit vectors) up to
//! [`EXACT_TRACE_UP_TO`] dimensions and a Hutchinson estimate `(1/P) Σ_p v_pᵀ ∇²_z o v_p` with
//! the caller's probes above. A probe `u` in `x`-space is the same probe in `z`-space because
//! `∂z/∂x` is a multiple of the identity: `uᵀ ∇²_x o u = k² uᵀ ∇²_z o u`.
//!
//! The network runs in `f32`: every output carries `f32` rounding (relative ≈ 1e-6 of the
//! largest term), which is what the finite-difference checks below allow for.

use candle_core::{Tensor, Var};
use ndarray::{ArrayView2, ArrayView3, ArrayViewMut1};

use super::{DoobNetwork, log_softplus_and_ratio, second_order_gradients_enabled};
use crate::doob::{HLaplacian, HOutput};
use crate::error::{Error, Result};
use crate::model::NoiseLevel;

/// Up to this dimension `Δlog ĥ` is exact (one vector-Jacobian product per unit vector), as
/// the score network's log-density divergence ([`crate::model::nn::LogDensityOptions`]);
/// above it, a Hutchinson estimate from the caller's probes.
pub(crate) const EXACT_TRACE_UP_TO: usize = 16;

/// `ϱ'(o)` for `ϱ = sigmoid/softplus`: `ϱ(1 − σ) − ϱ²`, stable for every finite `o`.
fn ratio_derivative(o: f64) -> f64 {
    if o < -30.0 {
        // ϱ = 1 − e^o/2 + O(e^{2o}).
        -0.5 * o.exp()
    } else {
        let (_, ratio) = log_softplus_and_ratio(o);
        // 1 − σ(o) = σ(−o), without cancellation for large o.
        let one_minus_sigma = 1.0 / (1.0 + o.exp());
        ratio * one_minus_sigma - ratio * ratio
    }
}

/// The network's output and its derivatives with respect to `z` for a batch of rows.
struct SecondOrder {
    /// `n` pre-softplus outputs `o`.
    o: Vec<f32>,
    /// `n × d` gradients `∇_z o`, row-major.
    gradient: Vec<f32>,
    /// `n` traces `Δ_z o` (exact or Hutchinson).
    trace: Vec<f64>,
    /// `k = ∂z/∂x`.
    dz_dx: f64,
}

impl DoobNetwork {
    /// `o`, `∇_z o` and `Δ_z o` (exact, or the Hutchinson mean over `probes`) for every row of
    /// `x`, and the factor `k = ∂z/∂x`.
    fn output_gradient_laplacian(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        probes: Option<ArrayView3<f64>>,
    ) -> Result<SecondOrder> {
        let (n, d) = x.dim();
        let (z, c, dz_dx) = self.inputs(level, x)?;
        let z = Var::from_tensor(&z)?;
        let o = self.net.forward_twice_differentiable(z.as_tensor(), &c)?;
        let missing = || Error::Backend("no gradient with respect to the input".into());
        // ∇_z o, kept in the graph for the second backward passes.
        let g = o
            .sum_all()?
            .backward()?
            .get(z.as_tensor())
            .ok_or_else(missing)?
            .clone();
        let mut trace = vec![0f64; n];
        // v ↦ (∇²_z o) v for every row at once: the gradient of Σ_i ∇_z o_i · v_i.
        let hessian_times = |v: &Tensor| -> Result<Tensor> {
            let grads = (&g * v)?.sum_all()?.backward()?;
            Ok(grads.get(z.as_tensor()).ok_or_else(missing)?.clone())
        };
        match probes {
            None => {
                for j in 0..d {
                    let mut unit = vec![0f32; n * d];
                    for i in 0..n {
                        unit[i * d + j] = 1.0;
                    }
                    let unit = Tensor::from_vec(unit, (n, d), &self.device)?;
                    let hv = hessian_times(&unit)?.flatten_all()?.to_vec1::<f32>()?;
                    for (i, t) in trace.iter_mut().enumerate() {
                        *t += hv[i * d + j] as f64;
                    }
                }
            }
            Some(probes) => {
                let count = probes.len_of(ndarray::Axis(0));
                for p in probes.outer_iter() {
                    let v: Vec<f32> = p.iter().map(|&u| u as f32).collect();
                    let hv = hessian_times(&Tensor::from_vec(v, (n, d), &self.device)?)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    for (i, (t, row)) in trace.iter_mut().zip(p.outer_iter()).enumerate() {
                        let form: f64 = row
                            .iter()
                            .enumerate()
                            .map(|(c, &u)| u * hv[i * d + c] as f64)
                            .sum();
                        *t += form / count as f64;
                    }
                }
            }
        }
        Ok(SecondOrder {
            o: o.detach().to_vec1::<f32>()?,
            gradient: g.detach().flatten_all()?.to_vec1::<f32>()?,
            trace,
            dz_dx,
        })
    }
}

impl HLaplacian for DoobNetwork {
    /// `log ĥ = log softplus(o)` from one forward pass (no backward pass), in `f64` from the
    /// `f32` output `o`, as [`crate::doob::HFunction::evaluate`] computes it.
    fn evaluate_log_h(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        mut log_h: ArrayViewMut1<f64>,
    ) -> Result<()> {
        if log_h.len() != x.nrows() {
            return Err(Error::Dimension {
                context: "learned h-function log h buffer".into(),
                expected: x.nrows(),
                found: log_h.len(),
            });
        }
        let (z, c, _) = self.inputs(level, x)?;
        let o = self.net.forward(&z, &c)?.to_vec1::<f32>()?;
        for (l, &o) in log_h.iter_mut().zip(&o) {
            *l = log_softplus_and_ratio(o as f64).0;
        }
        Ok(())
    }

    /// Above 16 dimensions (the score network's threshold for an exact trace).
    fn laplacian_uses_probes(&self) -> bool {
        self.spec.dim > EXACT_TRACE_UP_TO
    }

    /// See the module documentation. Errors: without second-order gradients in candle
    /// ([`Error::Unsupported`]); a probe count of zero, or probes of the wrong shape, in more
    /// than 16 dimensions; `σ(τ) = 0`.
    fn evaluate_with_laplacian(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        probes: ArrayView3<f64>,
        out: HOutput<'_>,
        mut laplacian: ArrayViewMut1<f64>,
    ) -> Result<()> {
        if !second_order_gradients_enabled() {
            return Err(Error::Unsupported(
                "the Laplacian of a learned h-function needs second-order gradients, which candle computes only with the environment variable CANDLE_GRAD_DO_NOT_DETACH=1 (cargo sets it through .cargo/config.toml and the steer binary sets it itself; set it in your own program before the first candle call)"
                    .into(),
            ));
        }
        let (n, d) = x.dim();
        if d != self.spec.dim {
            return Err(Error::Dimension {
                context: "learned h-function input".into(),
                expected: self.spec.dim,
                found: d,
            });
        }
        let HOutput {
            mut log_h,
            mut grad_log_h,
        } = out;
        if grad_log_h.dim() != (n, d) || laplacian.len() != n {
            return Err(Error::Dimension {
                context: "learned h-function output buffers".into(),
                expected: n,
                found: if laplacian.len() != n {
                    laplacian.len()
                } else {
                    grad_log_h.nrows()
                },
            });
        }
        let probes = if self.laplacian_uses_probes() {
            let (count, rows, cols) = probes.dim();
            if count == 0 {
                return Err(Error::invalid(
                    "probes",
                    format!(
                        "the Laplacian of a learned h-function in d = {d} > {EXACT_TRACE_UP_TO} dimensions is a Hutchinson estimate and needs at least one probe"
                    ),
                ));
            }
            if (rows, cols) != (n, d) {
                return Err(Error::Dimension {
                    context: "Hutchinson probes of the learned h-function (P × N × d)".into(),
                    expected: n * d,
                    found: rows * cols,
                });
            }
            Some(probes)
        } else {
            None
        };
        let SecondOrder {
            o,
            gradient: g,
            trace,
            dz_dx: k,
        } = self.output_gradient_laplacian(level, x, probes)?;
        for (i, mut row) in grad_log_h.rows_mut().into_iter().enumerate() {
            let o = o[i] as f64;
            let (lh, ratio) = log_softplus_and_ratio(o);
            if let Some(l) = log_h.as_mut() {
                l[i] = lh;
            }
            let gi = &g[i * d..(i + 1) * d];
            let mut norm2 = 0.0;
            for (v, &gc) in row.iter_mut().zip(gi) {
                let gc = gc as f64;
                *v = ratio * k * gc;
                norm2 += gc * gc;
            }
            laplacian[i] = k * k * (ratio * trace[i] + ratio_derivative(o) * norm2);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doob::HFunction;
    use crate::doob_net::{DTYPE, DoobLoss, DoobPairs, DoobSpec, FORMAT, HNet};
    use crate::model::nn::Architecture;
    use crate::schedule::Schedule;
    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};
    use ndarray::{Array1, Array2, Array3};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;

    fn vp() -> Schedule {
        Schedule::VpLinear {
            beta_min: 0.1,
            beta_max: 20.0,
            horizon: 1.0,
        }
    }

    /// A network with random weights (every entry uniform on `±scale·√(3/fan_in)`, biases
    /// included) in `dim` dimensions: an `o` with curvature in every direction.
    fn random_network(dim: usize, seed: u64) -> DoobNetwork {
        let architecture = Architecture::Mlp {
            hidden: 32,
            blocks: 2,
            embedding: 8,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DTYPE, &Device::Cpu);
        HNet::new(&architecture, dim, vb).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = HashMap::new();
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            let fan_in = if dims.len() > 1 { dims[1] } else { 4 };
            let bound = 1.5 * (3.0 / fan_in as f64).sqrt();
            let count: usize = dims.iter().product();
            let values: Vec<f32> = (0..count)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            params.insert(
                name.clone(),
                Tensor::from_vec(values, dims, &Device::Cpu).unwrap(),
            );
        }
        let spec = DoobSpec {
            format: FORMAT.into(),
            version: 1,
            dim,
            architecture,
            data_mean: (0..dim).map(|c| 0.1 * c as f64).collect(),
            data_scale: 1.3,
            schedule: vp(),
            tau_min: 1e-3,
            ratio_range: [1e-2, 1e2],
            loss: DoobLoss::Penalised,
            lambda_gp: 0.0,
            pairs: DoobPairs::Fixed,
            reward_max: 0.0,
            weights: "h.safetensors".into(),
            training: None,
        };
        DoobNetwork::from_parts(spec, params).unwrap()
    }

    fn points(n: usize, d: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((n, d), |_| rng.random_range(-2.0..2.0))
    }

    fn with_laplacian(
        h: &DoobNetwork,
        level: &NoiseLevel,
        x: &Array2<f64>,
        probes: &Array3<f64>,
    ) -> (Array1<f64>, Array2<f64>, Array1<f64>) {
        let (mut l, mut g, mut lap) = (
            Array1::zeros(x.nrows()),
            Array2::zeros(x.dim()),
            Array1::zeros(x.nrows()),
        );
        h.evaluate_with_laplacian(
            level,
            x.view(),
            probes.view(),
            HOutput {
                log_h: Some(l.view_mut()),
                grad_log_h: g.view_mut(),
            },
            lap.view_mut(),
        )
        .unwrap();
        (l, g, lap)
    }

    fn gradient(
        h: &DoobNetwork,
        level: &NoiseLevel,
        x: &Array2<f64>,
    ) -> (Array1<f64>, Array2<f64>) {
        let (mut l, mut g) = (Array1::zeros(x.nrows()), Array2::zeros(x.dim()));
        h.evaluate(
            level,
            x.view(),
            HOutput {
                log_h: Some(l.view_mut()),
                grad_log_h: g.view_mut(),
            },
        )
        .unwrap();
        (l, g)
    }

    /// `ϱ'` against central differences of the stable `ϱ` (step 1e-5: truncation ≈ 1e-10,
    /// rounding ≈ 1e-16/1e-5 = 1e-11; asserted to 1e-8 absolute), in both tails and at the
    /// switch to the series; it is never positive.
    #[test]
    fn ratio_derivative_matches_finite_differences() {
        for o in [
            -40.0, -30.5, -29.5, -12.0, -3.0, -0.4, 0.0, 0.8, 5.0, 29.0, 35.0,
        ] {
            let e = 1e-5;
            let fd =
                (log_softplus_and_ratio(o + e).1 - log_softplus_and_ratio(o - e).1) / (2.0 * e);
            let exact = ratio_derivative(o);
            assert!((fd - exact).abs() < 1e-8, "o = {o}: {exact} vs {fd}");
            assert!(exact <= 0.0, "o = {o}: {exact}");
        }
    }

    /// The Laplacian of a random 2-D network against central differences of its own `∇log ĥ`
    /// (which is computed in f32), at three noise levels. Step `e = 2e-3` in `x`: truncation
    /// `e²/6 |∂³ log ĥ|` ≈ 1e-6 · |∂³ log ĥ|, rounding ≈ 1e-6 |∇log ĥ| / e ≈ 5e-4 |∇log ĥ|
    /// (f32 gradients are accurate to ≈ 1e-6 relative); asserted within
    /// `2e-3 (1 + |∇log ĥ| + |Δ|)` (measured worst ≈ 1e-4 relative to that scale). The
    /// gradient and `log ĥ` of the Laplacian pass equal those of [`HFunction::evaluate`] to
    /// f32 rounding, and the forward-only `log ĥ` equals it bit for bit (same graph).
    #[test]
    fn laplacian_matches_finite_differences_of_the_gradient() {
        if !second_order_gradients_enabled() {
            eprintln!("CANDLE_GRAD_DO_NOT_DETACH is not set: checked by the error test");
            return;
        }
        let h = random_network(2, 11);
        let x = points(6, 2, 3);
        let none = Array3::zeros((0, 6, 2));
        let mut worst: f64 = 0.0;
        for tau in [0.02, 0.3, 0.8] {
            let level = NoiseLevel::new(&vp(), tau);
            let (l, g, lap) = with_laplacian(&h, &level, &x, &none);
            let (l0, g0) = gradient(&h, &level, &x);
            // The Laplacian pass builds its graph with the twice-differentiable `silu`, the
            // same function as the fused one up to f32 rounding (≈ 1e-7 relative per
            // operation; asserted to 1e-5).
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            assert!(
                l.iter().zip(&l0).all(|(&a, &b)| close(a, b)),
                "τ = {tau}: {l} vs {l0}"
            );
            assert!(
                g.iter().zip(&g0).all(|(&a, &b)| close(a, b)),
                "τ = {tau}: {g} vs {g0}"
            );
            let mut l1 = Array1::zeros(x.nrows());
            h.evaluate_log_h(&level, x.view(), l1.view_mut()).unwrap();
            assert_eq!(l1, l0, "τ = {tau}: forward-only log ĥ");
            // The curvature term of log softplus must be visible at this tolerance, or a
            // dropped ϱ' would pass.
            let SecondOrder {
                o,
                gradient: go,
                dz_dx: k,
                ..
            } = h.output_gradient_laplacian(&level, x.view(), None).unwrap();
            let curvature = (0..x.nrows())
                .map(|i| {
                    let g2 = go[2 * i] as f64 * go[2 * i] as f64
                        + go[2 * i + 1] as f64 * go[2 * i + 1] as f64;
                    (k * k * ratio_derivative(o[i] as f64) * g2).abs()
                        / (1.0 + g.row(i).dot(&g.row(i)).sqrt() + lap[i].abs())
                })
                .fold(0.0f64, f64::max);
            eprintln!("τ = {tau}: largest relative curvature term {curvature:.3}");
            assert!(curvature > 2e-2, "τ = {tau}: curvature term {curvature}");
            let e = 2e-3;
            for i in 0..x.nrows() {
                let mut fd = 0.0;
                for c in 0..2 {
                    let (mut xp, mut xm) = (x.clone(), x.clone());
                    xp[[i, c]] += e;
                    xm[[i, c]] -= e;
                    fd += (gradient(&h, &level, &xp).1[[i, c]]
                        - gradient(&h, &level, &xm).1[[i, c]])
                        / (2.0 * e);
                }
                let scale = 1.0 + g.row(i).dot(&g.row(i)).sqrt() + lap[i].abs();
                worst = worst.max((fd - lap[i]).abs() / scale);
                assert!(
                    (fd - lap[i]).abs() < 2e-3 * scale,
                    "τ = {tau}, x = {}: Δ {} vs finite differences {fd}",
                    x.row(i),
                    lap[i]
                );
            }
        }
        eprintln!("worst relative error {worst:e}");
    }

    /// In 20 > 16 dimensions the Laplacian is a Hutchinson estimate from the caller's probes:
    /// with the 20 unit vectors as probes (scaled by √20, so that `E[z zᵀ] = I` over a uniform
    /// choice) their mean is the exact trace, which must agree with central differences of
    /// the gradient (as above, 2e-3 relative); 400 Rademacher probes average to it within
    /// z = 5 standard errors (sample sd of the per-probe estimates); no probes is an error
    /// naming the field.
    #[test]
    fn high_dimensional_laplacian_is_a_hutchinson_estimate() {
        if !second_order_gradients_enabled() {
            return;
        }
        let d = 20;
        let h = random_network(d, 5);
        assert!(h.laplacian_uses_probes());
        let x = points(3, d, 8);
        let level = NoiseLevel::new(&vp(), 0.2);
        let units = Array3::from_shape_fn(
            (d, 3, d),
            |(p, _, c)| {
                if p == c { (d as f64).sqrt() } else { 0.0 }
            },
        );
        let (_, g, exact) = with_laplacian(&h, &level, &x, &units);
        let e = 2e-3;
        for i in 0..3 {
            let mut fd = 0.0;
            for c in 0..d {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[[i, c]] += e;
                xm[[i, c]] -= e;
                fd += (gradient(&h, &level, &xp).1[[i, c]] - gradient(&h, &level, &xm).1[[i, c]])
                    / (2.0 * e);
            }
            let scale = 1.0 + g.row(i).dot(&g.row(i)).sqrt() + exact[i].abs();
            assert!(
                (fd - exact[i]).abs() < 2e-3 * scale,
                "row {i}: {} vs {fd}",
                exact[i]
            );
        }
        let count = 400;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let probes =
            Array3::from_shape_fn(
                (count, 3, d),
                |_| {
                    if rng.random::<bool>() { 1.0 } else { -1.0 }
                },
            );
        let mut per_probe = Array2::<f64>::zeros((count, 3));
        for p in 0..count {
            let one = probes.slice(ndarray::s![p..p + 1, .., ..]).to_owned();
            per_probe
                .row_mut(p)
                .assign(&with_laplacian(&h, &level, &x, &one).2);
        }
        let (_, _, mean) = with_laplacian(&h, &level, &x, &probes);
        for i in 0..3 {
            let col = per_probe.column(i);
            assert!((col.mean().unwrap() - mean[i]).abs() < 1e-9 * (1.0 + mean[i].abs()));
            let se = col.std(1.0) / (count as f64).sqrt();
            eprintln!(
                "row {i}: Hutchinson {:.4} ± {se:.4}, exact {:.4}",
                mean[i], exact[i]
            );
            assert!(
                (mean[i] - exact[i]).abs() < 5.0 * se + 1e-6 * (1.0 + exact[i].abs()),
                "row {i}: Hutchinson {} ± {se} vs exact {}",
                mean[i],
                exact[i]
            );
        }
        let mut lap = Array1::zeros(3);
        let mut grad = Array2::zeros((3, d));
        let e = h
            .evaluate_with_laplacian(
                &level,
                x.view(),
                Array3::zeros((0, 3, d)).view(),
                HOutput {
                    log_h: None,
                    grad_log_h: grad.view_mut(),
                },
                lap.view_mut(),
            )
            .unwrap_err();
        assert!(
            matches!(e, Error::Invalid { ref field, .. } if field == "probes"),
            "{e}"
        );
    }
}
