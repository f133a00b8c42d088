//! Doob's h-function for guidance (MATH.md §7).
//!
//! The h-function of a reward `r` on the data law `p_0` is the forward-posterior expectation
//! `h_t(x) = E[e^{r(x_data)} | x_τ = x]` at forward time `τ = T − t` (§7.1). It turns the
//! base reverse SDE into one that samples the tilted law: the drift
//! `v + ½(U⃖² + V²) ∇log h` transports `q_t ∝ p⃖_t h_t` exactly, for every backward noise
//! `V ≥ 0` (§7.2), and `p⃖_t h_t = Z_r p^r_{T−t}` with `p^r` the forward-noised tilted law.
//!
//! An [`HFunction`] gives `log h` and `∇log h` at a noise level for a batch of particles; it
//! needs nothing but the level and `x`, so an exact closed form ([`ExactH`], §11.6) and a
//! learned network (§7.3) plug into the same samplers: [`crate::method::Doob`] (unweighted
//! guidance) and URGE's Doob proposal and twist ([`crate::method::Proposal::Doob`],
//! [`crate::method::Twist::Doob`], §7.5), and DriftLite on the Doob path
//! ([`crate::method::DriftLite::with_doob`]), which also needs the Laplacian `Δlog h`
//! ([`HLaplacian`]). A learned `ĥ` is post-processed by a [`Clip`]
//! (§7.4) before it is used.

use ndarray::{Array1, Array2, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, Zip};

use crate::error::{Error, Result};
use crate::exact::ExactLaw;
use crate::model::{GaussianMixture, NoiseLevel, ScoreOutput};
use crate::reward::RewardForm;
use crate::target::Target;

/// Output buffers of one batched h-function evaluation.
#[derive(Debug)]
pub struct HOutput<'a> {
    /// `N` values `log h(x_i)`; `None` when not requested (an implementation may still
    /// compute it internally).
    pub log_h: Option<ArrayViewMut1<'a, f64>>,
    /// `N × d` gradients `∇log h(x_i) = ∇h(x_i)/h(x_i)`.
    pub grad_log_h: ArrayViewMut2<'a, f64>,
}

/// An h-function `h_t(x) > 0` used for guidance (MATH.md §7), seen in log space.
///
/// `log h` is on the scale the twist uses: for the exact function it is
/// `log E[e^{r(x_0)} | x_τ = x]`; a learned `ĥ` regressed on `Y = e^{r − max r}` (§7.3) is on
/// that `Y` scale, the scale on which [`Clip::h_min`] is stated. A constant shift of `log h`
/// changes neither the guidance nor (the twists telescope) the URGE target.
pub trait HFunction: Send + Sync + std::fmt::Debug {
    /// State dimension `d`.
    fn dim(&self) -> usize;

    /// `log h` (when requested) and `∇log h` at forward noise level `level` (`τ = T − t`) for
    /// every row of `x`. Values must be finite.
    fn evaluate(&self, level: &NoiseLevel, x: ArrayView2<f64>, out: HOutput<'_>) -> Result<()>;

    /// The tilted data law `p^r_0 = p_0 h_0 / Z_r` as a Gaussian mixture, when it is known in
    /// closed form. The Doob path starts at `q_0 ∝ p⃖_0 h_0 = Z_r p^r_{τ_max}`; with it the
    /// Doob sampler starts exactly there instead of at `p⃖_0`.
    fn tilted_law(&self) -> Option<&GaussianMixture> {
        None
    }
}

/// An h-function that also gives its Laplacian `Δlog h = ∇·∇log h`, which DriftLite on the
/// Doob path needs for the potential and the basis potential of `∇log h`
/// ([`crate::method::DriftLite::with_doob`]; MATH.md §4.3 with `ρ = log h`).
///
/// A separate trait rather than a defaulted [`HFunction`] method, so that an h-function
/// without a Laplacian is refused when the sampler is built, not at its first step.
pub trait HLaplacian: HFunction {
    /// Whether [`HLaplacian::evaluate_with_laplacian`] estimates `Δlog h` from random probes
    /// (Hutchinson) rather than computing it exactly; only then must the caller pass at least
    /// one probe.
    fn laplacian_uses_probes(&self) -> bool {
        false
    }

    /// `log h` (when requested), `∇log h` and `Δlog h` at `level` for every row of `x`
    /// (`laplacian`: `N` values), in one pass.
    ///
    /// `probes` (`P × N × d`, `E[z zᵀ] = I`, row `i`'s probes in `probes[.., i, ..]`) are the
    /// randomness of a Hutchinson estimate `(1/P) Σ_p z_pᵀ ∇²log h z_p` when the
    /// implementation estimates the trace ([`HLaplacian::laplacian_uses_probes`]); exact
    /// implementations ignore them (pass `P = 0`). Values must be finite.
    fn evaluate_with_laplacian(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        probes: ArrayView3<f64>,
        out: HOutput<'_>,
        laplacian: ArrayViewMut1<f64>,
    ) -> Result<()>;

    /// `log h` alone at `level` for every row of `x` (`log_h`: `N` values); the Doob path
    /// needs `log ĥ_{t_{k+1}}(x_k)` without its gradient. The default calls
    /// [`HFunction::evaluate`] with a scratch gradient; a network overrides it with a
    /// forward pass only.
    fn evaluate_log_h(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        log_h: ArrayViewMut1<f64>,
    ) -> Result<()> {
        let mut scratch = Array2::zeros(x.dim());
        self.evaluate(
            level,
            x,
            HOutput {
                log_h: Some(log_h),
                grad_log_h: scratch.view_mut(),
            },
        )
    }
}

/// Post-processing of a learned `ĥ` before it guides (MATH.md §7.4).
///
/// * Floor: `ĝ = ∇ĥ / max(ĥ, h_min)`, i.e. `ĝ = ∇log ĥ · min(1, ĥ/h_min)`. Where the
///   regression is unreliable (`ĥ` tiny, far from the data), the guidance is damped rather
///   than amplified by a division by almost zero. The same floor makes the URGE twist
///   `log ψ = log max(ĥ, h_min)` bounded below (§7.5).
/// * Norm clip: `|ĝ| ≤ g_max` per particle, when set.
///
/// With `h_min = 0` and no `g_max` ([`Clip::none`]) the guidance is `∇log h` itself, as the
/// exact h-function needs. [`Clip::learned`] is the §7.4 default for learned networks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clip {
    /// Floor `h_min ≥ 0` on `ĥ`, on the `Y` scale of the regression (MATH.md §7.3).
    pub h_min: f64,
    /// Largest Euclidean norm of `ĝ` per particle, if any (`> 0`).
    pub g_max: Option<f64>,
}

impl Clip {
    /// No post-processing: `ĝ = ∇log h`, `log ψ = log h` (exact h-functions).
    pub fn none() -> Self {
        Clip {
            h_min: 0.0,
            g_max: None,
        }
    }

    /// The MATH.md §7.4 default for a learned `ĥ`: `h_min = 10⁻³`, no norm clip.
    pub fn learned() -> Self {
        Clip {
            h_min: 1e-3,
            g_max: None,
        }
    }

    /// Checks `h_min ≥ 0` (finite) and `g_max > 0` (finite), naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.h_min.is_finite() && self.h_min >= 0.0) {
            return Err(Error::invalid(
                "doob.h_min",
                format!("must be finite and ≥ 0, got {}", self.h_min),
            ));
        }
        if let Some(g) = self.g_max
            && !(g.is_finite() && g > 0.0)
        {
            return Err(Error::invalid(
                "doob.g_max",
                format!("must be finite and > 0, got {g}"),
            ));
        }
        Ok(())
    }

    /// Whether applying the clip needs `log ĥ` (it does when `h_min > 0`).
    pub fn needs_log_h(&self) -> bool {
        self.h_min > 0.0
    }

    /// Turns `∇log ĥ` of one particle into the guidance `ĝ` in place, given its `log ĥ`
    /// (ignored when `h_min = 0`).
    pub fn apply(&self, log_h: f64, grad_log_h: &mut [f64]) {
        if self.h_min > 0.0 {
            // ∇ĥ / max(ĥ, h_min) = ∇log ĥ · min(1, ĥ/h_min), computed in log space.
            let damp = (log_h - self.h_min.ln()).min(0.0).exp();
            if damp < 1.0 {
                grad_log_h.iter_mut().for_each(|g| *g *= damp);
            }
        }
        if let Some(g_max) = self.g_max {
            let norm = crate::linalg::dot(grad_log_h, grad_log_h).sqrt();
            if norm > g_max {
                let scale = g_max / norm;
                grad_log_h.iter_mut().for_each(|g| *g *= scale);
            }
        }
    }

    /// The URGE twist `log ψ = log max(ĥ, h_min)` of one particle (MATH.md §7.5).
    pub fn log_twist(&self, log_h: f64) -> f64 {
        if self.h_min > 0.0 {
            log_h.max(self.h_min.ln())
        } else {
            log_h
        }
    }
}

/// The exact h-function of a Gaussian-mixture data law tilted by a closed-form reward
/// (MATH.md §7.1, §11.6).
///
/// With `p^r_0 = p_0 e^{r}/Z_r` (a mixture again, §11.3) and both laws noised by §1.5,
/// `h_t(x) = Z_r p^r_τ(x)/p_τ(x)` at `τ = T − t`, so
///
/// * `log h = log Z_r + log p^r_τ(x) − log p_τ(x)`, exactly `log E[e^{r(x_0)} | x_τ = x]`
///   (no shift; at `τ = 0` it is `r(x)` itself);
/// * `∇log h = ∇log p^r_τ − ∇log p_τ` (tilted score minus base score).
///
/// The data law is `p_0` at `τ = 0`: for a grid that stops at `τ_min > 0` the Doob sampler
/// reaches the noised tilted law `p^r_{τ_min}`.
#[derive(Clone, Debug)]
pub struct ExactH {
    base: GaussianMixture,
    tilted: GaussianMixture,
    log_normalizer: f64,
}

impl ExactH {
    /// The h-function of `mixture` tilted by `reward`: a quadratic or linear reward (§11.3),
    /// or `log p'` of a mixture with scale 1 (a product, §11.5). Other forms have no closed
    /// form and are [`Error::Unsupported`].
    pub fn new(mixture: &GaussianMixture, reward: RewardForm<'_>) -> Result<Self> {
        if let RewardForm::MixtureLogDensity { mixture: m, .. } = &reward
            && m.dim() != mixture.dim()
        {
            return Err(Error::Dimension {
                context: "reward mixture of the exact h-function".into(),
                expected: mixture.dim(),
                found: m.dim(),
            });
        }
        if let RewardForm::Quadratic {
            precision, linear, ..
        } = &reward
            && (precision.nrows() != mixture.dim() || linear.len() != mixture.dim())
        {
            return Err(Error::Dimension {
                context: "quadratic reward of the exact h-function".into(),
                expected: mixture.dim(),
                found: linear.len(),
            });
        }
        match ExactLaw::new(&[(mixture.clone(), 1.0)], Some(reward)) {
            Some(ExactLaw::Mixture {
                mixture: tilted,
                log_normalizer,
            }) => Ok(ExactH {
                base: mixture.clone(),
                tilted,
                log_normalizer,
            }),
            _ => Err(Error::Unsupported(
                "the exact h-function needs a quadratic or linear reward, or the log-density of a mixture with scale 1: the tilted law must be a Gaussian mixture"
                    .into(),
            )),
        }
    }

    /// The h-function of a target `p e^{r}`: exactly one expert, a Gaussian mixture with
    /// `γ = 1`, and a reward with a closed form; otherwise an error naming the field.
    pub fn from_target(target: &Target) -> Result<Self> {
        let experts = target.experts();
        if experts.len() != 1 {
            return Err(Error::invalid(
                "experts",
                format!(
                    "the exact h-function needs exactly one expert, found {}",
                    experts.len()
                ),
            ));
        }
        if experts[0].gamma != 1.0 {
            return Err(Error::invalid(
                "experts[0].gamma",
                format!(
                    "the exact h-function is defined for a pure tilt (γ = 1), got {}",
                    experts[0].gamma
                ),
            ));
        }
        let mixture = experts[0].model.as_mixture().ok_or_else(|| {
            Error::Unsupported(
                "experts[0] is not a Gaussian mixture: the exact h-function needs one".into(),
            )
        })?;
        let reward = target.reward().ok_or_else(|| {
            Error::invalid("reward", "the exact h-function needs a reward to tilt by")
        })?;
        let form = reward.closed_form().ok_or_else(|| {
            Error::Unsupported("reward has no closed form: the exact h-function needs one".into())
        })?;
        Self::new(mixture, form)
    }

    /// The tilted data law `p^r_0 = p_0 e^{r}/Z_r`.
    pub fn tilted(&self) -> &GaussianMixture {
        &self.tilted
    }

    /// The data law `p_0`.
    pub fn base(&self) -> &GaussianMixture {
        &self.base
    }

    /// `log Z_r = log ∫ p_0 e^{r}`.
    pub fn log_normalizer(&self) -> f64 {
        self.log_normalizer
    }
}

impl HFunction for ExactH {
    fn dim(&self) -> usize {
        self.base.dim()
    }

    fn tilted_law(&self) -> Option<&GaussianMixture> {
        Some(&self.tilted)
    }

    fn evaluate(&self, level: &NoiseLevel, x: ArrayView2<f64>, out: HOutput<'_>) -> Result<()> {
        self.evaluate_parts(level, x, out, None)
    }
}

impl HLaplacian for ExactH {
    /// Exact: `Δlog h = ∇·s^r_τ − ∇·s_τ`, the difference of the two mixtures' exact score
    /// divergences (MATH.md §1.5); `probes` are ignored.
    fn evaluate_with_laplacian(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        _probes: ArrayView3<f64>,
        out: HOutput<'_>,
        laplacian: ArrayViewMut1<f64>,
    ) -> Result<()> {
        self.evaluate_parts(level, x, out, Some(laplacian))
    }
}

impl ExactH {
    /// `log h = log Z_r + log p^r_τ − log p_τ`, `∇log h = s^r_τ − s_τ` and, when asked,
    /// `Δlog h = ∇·s^r_τ − ∇·s_τ`: one evaluation of each noised mixture.
    fn evaluate_parts(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        out: HOutput<'_>,
        laplacian: Option<ArrayViewMut1<f64>>,
    ) -> Result<()> {
        let n = x.nrows();
        let HOutput {
            mut log_h,
            mut grad_log_h,
        } = out;
        if let Some(l) = &laplacian
            && l.len() != n
        {
            return Err(Error::Dimension {
                context: "Laplacian buffer of the exact h-function".into(),
                expected: n,
                found: l.len(),
            });
        }
        let want_log_h = log_h.is_some();
        let mut base_score = Array2::zeros(x.dim());
        let mut log_p = Array1::zeros(if want_log_h { n } else { 0 });
        let mut base_div = Array1::zeros(if laplacian.is_some() { n } else { 0 });
        self.base.noised(level).evaluate(
            x,
            ScoreOutput {
                score: base_score.view_mut(),
                log_density: want_log_h.then(|| log_p.view_mut()),
                divergence: laplacian.is_some().then(|| base_div.view_mut()),
            },
        )?;
        let mut laplacian = laplacian;
        self.tilted.noised(level).evaluate(
            x,
            ScoreOutput {
                score: grad_log_h.view_mut(),
                log_density: log_h.as_mut().map(|l| l.view_mut()),
                divergence: laplacian.as_mut().map(|l| l.view_mut()),
            },
        )?;
        if let Some(log_h) = log_h.as_mut() {
            let log_z = self.log_normalizer;
            Zip::from(log_h)
                .and(&log_p)
                .for_each(|h, &p| *h += log_z - p);
        }
        if let Some(l) = laplacian.as_mut() {
            *l -= &base_div;
        }
        grad_log_h -= &base_score;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Covariance;
    use crate::reward::{Linear, Quadratic, Reward, RewardOutput};
    use crate::schedule::Schedule;
    use ndarray::{Array1, Axis, array};

    fn mixture() -> GaussianMixture {
        GaussianMixture::new(
            array![0.3, 0.7],
            array![[-1.0, 0.5], [1.5, -0.5]],
            Covariance::Diagonal(array![[0.4, 0.8], [0.6, 0.3]]),
        )
        .unwrap()
    }

    fn rewards() -> Vec<Box<dyn Reward>> {
        vec![
            Box::new(Quadratic::new(array![1.0, 0.5], 0.8).unwrap()),
            Box::new(Linear::new(array![0.7, -0.4]).unwrap()),
        ]
    }

    fn eval(h: &ExactH, level: &NoiseLevel, x: ArrayView2<f64>) -> (Array1<f64>, Array2<f64>) {
        let mut log_h = Array1::zeros(x.nrows());
        let mut grad = Array2::zeros(x.dim());
        h.evaluate(
            level,
            x,
            HOutput {
                log_h: Some(log_h.view_mut()),
                grad_log_h: grad.view_mut(),
            },
        )
        .unwrap();
        (log_h, grad)
    }

    fn levels() -> Vec<NoiseLevel> {
        let s = Schedule::VpLinear {
            beta_min: 0.1,
            beta_max: 20.0,
            horizon: 1.0,
        };
        let ve = Schedule::VeEdm { sigma_max: 80.0 };
        vec![
            NoiseLevel::data(),
            NoiseLevel::new(&s, 0.05),
            NoiseLevel::new(&s, 0.4),
            NoiseLevel::new(&s, 0.9),
            NoiseLevel::new(&ve, 2.0),
        ]
    }

    /// ∇log h against central differences of log h (h = 1e-5: truncation O(h²) ≈ 1e-10,
    /// rounding ≈ 1e-16/h ≈ 1e-11; tolerance 1e-7 relative), for both reward forms at five
    /// noise levels; the gradient-only evaluation agrees with the full one to rounding.
    #[test]
    fn gradient_matches_finite_differences() {
        let x = array![[0.3, -0.2], [1.4, 0.9], [-2.0, 1.5]];
        for r in rewards() {
            let h = ExactH::new(&mixture(), r.closed_form().unwrap()).unwrap();
            for level in levels() {
                let (_, g) = eval(&h, &level, x.view());
                let mut g_only = Array2::zeros(x.dim());
                h.evaluate(
                    &level,
                    x.view(),
                    HOutput {
                        log_h: None,
                        grad_log_h: g_only.view_mut(),
                    },
                )
                .unwrap();
                assert!((&g_only - &g).iter().all(|e| e.abs() < 1e-12));
                let step = 1e-5;
                for i in 0..x.nrows() {
                    for c in 0..2 {
                        let mut xp = x.clone();
                        let mut xm = x.clone();
                        xp[[i, c]] += step;
                        xm[[i, c]] -= step;
                        let fd = (eval(&h, &level, xp.view()).0[i]
                            - eval(&h, &level, xm.view()).0[i])
                            / (2.0 * step);
                        assert!(
                            (fd - g[[i, c]]).abs() < 1e-7 * (1.0 + fd.abs()),
                            "{r:?} τ = {}: {fd} vs {}",
                            level.tau,
                            g[[i, c]]
                        );
                    }
                }
            }
        }
    }

    /// At τ = 0 the exact h is `e^{r}` (no normalisation shift): log h_0 = r to 1e-10; and
    /// it approaches r continuously, |log h_τ − r| shrinking as τ → 0 (VP, τ = 10⁻², 10⁻³,
    /// 10⁻⁴: the error is O(σ²) = O(τ), so each step cuts it by at least 5×).
    #[test]
    fn log_h_tends_to_the_reward() {
        let x = array![[0.3, -0.2], [1.4, 0.9], [-2.0, 1.5]];
        let s = Schedule::VpLinear {
            beta_min: 0.1,
            beta_max: 20.0,
            horizon: 1.0,
        };
        for r in rewards() {
            let h = ExactH::new(&mixture(), r.closed_form().unwrap()).unwrap();
            let mut rv = Array1::zeros(3);
            r.evaluate(
                x.view(),
                RewardOutput {
                    value: Some(rv.view_mut()),
                    ..Default::default()
                },
            )
            .unwrap();
            let (l0, _) = eval(&h, &NoiseLevel::data(), x.view());
            assert!((&l0 - &rv).iter().all(|e| e.abs() < 1e-10), "{l0} vs {rv}");
            let mut last = f64::INFINITY;
            for tau in [1e-2, 1e-3, 1e-4] {
                let (l, _) = eval(&h, &NoiseLevel::new(&s, tau), x.view());
                let err = (&l - &rv).iter().fold(0.0f64, |m, e| m.max(e.abs()));
                assert!(err < last / 5.0, "τ = {tau}: {err} vs previous {last}");
                last = err;
            }
        }
    }

    /// The identity p_τ h_τ = Z_r p^r_τ pointwise: log p_τ + log h_τ − log Z_r − log p^r_τ
    /// vanishes to rounding (1e-12) at every level; and E_{p_τ}[h_τ] = Z_r by Monte Carlo
    /// (2·10⁵ exact draws of p_τ, within z = 5 standard errors).
    #[test]
    fn doob_identity_holds() {
        let x = array![[0.3, -0.2], [1.4, 0.9], [-2.0, 1.5]];
        for r in rewards() {
            let h = ExactH::new(&mixture(), r.closed_form().unwrap()).unwrap();
            for level in levels() {
                let (log_h, _) = eval(&h, &level, x.view());
                let dens = |m: &GaussianMixture| {
                    let mut s = Array2::zeros(x.dim());
                    let mut l = Array1::zeros(3);
                    m.noised(&level)
                        .evaluate(
                            x.view(),
                            ScoreOutput {
                                score: s.view_mut(),
                                log_density: Some(l.view_mut()),
                                divergence: None,
                            },
                        )
                        .unwrap();
                    l
                };
                let gap = dens(h.base()) + &log_h - h.log_normalizer() - dens(h.tilted());
                assert!(gap.iter().all(|e| e.abs() < 1e-12), "{gap}");
            }
            let level = levels()[2];
            let law = GaussianMixture::new(
                h.base().weights().to_owned(),
                h.base().means().to_owned() * level.alpha,
                Covariance::Full(ndarray::Array3::from_shape_fn((2, 2, 2), |(j, a, b)| {
                    let c = h.base().component_covariance(j)[[a, b]] * level.alpha.powi(2);
                    c + if a == b { level.sigma.powi(2) } else { 0.0 }
                })),
            )
            .unwrap();
            let n = 200_000;
            let xs = law.sample(
                n,
                &crate::rng::Streams::new(9),
                crate::rng::Purpose::Reference,
            );
            let (lh, _) = eval(&h, &level, xs.view());
            let w = (lh - h.log_normalizer()).mapv(f64::exp);
            let mean = w.mean().unwrap();
            let se = (w.var_axis(Axis(0), 1.0).into_scalar() / n as f64).sqrt();
            assert!((mean - 1.0).abs() < 5.0 * se, "E[h]/Z = {mean} ± {se}");
        }
    }

    #[test]
    fn clip_floors_and_caps_the_guidance() {
        let c = Clip {
            h_min: 1e-3,
            g_max: Some(2.0),
        };
        c.validate().unwrap();
        // ĥ = 1e-4 < h_min: ∇log ĥ is damped by ĥ/h_min = 0.1.
        let mut g = [3.0, 4.0];
        Clip {
            h_min: 1e-3,
            g_max: None,
        }
        .apply((1e-4f64).ln(), &mut g);
        assert!((g[0] - 0.3).abs() < 1e-12 && (g[1] - 0.4).abs() < 1e-12);
        // ĥ ≥ h_min: unchanged by the floor, then capped to norm 2.
        let mut g = [3.0, 4.0];
        c.apply(0.0, &mut g);
        assert!((g[0] - 1.2).abs() < 1e-12 && (g[1] - 1.6).abs() < 1e-12);
        assert_eq!(c.log_twist(-20.0), (1e-3f64).ln());
        assert_eq!(c.log_twist(-1.0), -1.0);
        assert_eq!(Clip::none().log_twist(-50.0), -50.0);
        let mut g = [3.0, 4.0];
        Clip::none().apply(-50.0, &mut g);
        assert_eq!(g, [3.0, 4.0]);
        for bad in [
            Clip {
                h_min: -1.0,
                g_max: None,
            },
            Clip {
                h_min: 0.0,
                g_max: Some(0.0),
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Invalid { .. })));
        }
    }
}
