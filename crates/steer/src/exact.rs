//! Exact laws for Gaussian-mixture targets (MATH.md §11.2–11.5).
//!
//! A target `q ∝ Π_e p_e^{γ_e} e^{r}` with mixture experts stays in closed form when
//! * every factor has `γ_e = 1` (a product of mixtures is a mixture, §11.5) and the reward is
//!   linear or quadratic (a tilted mixture is a mixture, §11.3), or
//! * there is one factor with `γ ≠ 1` (an annealed, possibly tilted, mixture), which is sampled
//!   exactly by rejection from the envelope `Σ_j (π_j N_j)^γ e^{r}` (§11.4).
//!
//! A reward `c log p'(x)` of a mixture `p'` counts as the factor `p'^c`.

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis};
use rayon::prelude::*;

use crate::linalg;
use crate::model::{Covariance, GaussianMixture, NoiseLevel};
use crate::reward::RewardForm;
use crate::rng::{Purpose, Streams};
use crate::weights::log_sum_exp;

const LOG_2PI: f64 = 1.837_877_066_409_345_5;

/// An unnormalised Gaussian `e^{log_weight} N(mean, cov)`.
#[derive(Clone, Debug)]
struct Component {
    log_weight: f64,
    mean: Array1<f64>,
    cov: Array2<f64>,
}

fn components(m: &GaussianMixture) -> Vec<Component> {
    (0..m.num_components())
        .map(|j| Component {
            log_weight: m.weights()[j].ln(),
            mean: m.means().row(j).to_owned(),
            cov: m.component_covariance(j),
        })
        .collect()
}

fn spd_inverse_and_logdet(a: &Array2<f64>) -> (Array2<f64>, f64) {
    let l = linalg::cholesky(a.view()).expect("covariance stays positive definite");
    (
        linalg::inverse_from_cholesky(l.view()),
        linalg::log_det_from_cholesky(l.view()),
    )
}

/// `N(μ, Σ) e^{−½(x−x⋆)ᵀΛ(x−x⋆) + aᵀx} = Z N(μ̃, Σ̃)` (§11.2).
fn tilt(
    c: &Component,
    precision: &Array2<f64>,
    centre: &Array1<f64>,
    linear: &Array1<f64>,
) -> Component {
    let (p, log_det) = spd_inverse_and_logdet(&c.cov);
    // cov = (Σ⁻¹ + Λ)⁻¹, so log det Σ̃ = −log det(Σ⁻¹ + Λ).
    let (cov, log_det_inv) = spd_inverse_and_logdet(&(&p + precision));
    let log_det_new = -log_det_inv;
    let nu = p.dot(&c.mean) + precision.dot(centre) + linear;
    let mean = cov.dot(&nu);
    let log_z = 0.5 * (log_det_new - log_det) + 0.5 * nu.dot(&mean)
        - 0.5 * c.mean.dot(&p.dot(&c.mean))
        - 0.5 * centre.dot(&precision.dot(centre));
    Component {
        log_weight: c.log_weight + log_z,
        mean,
        cov,
    }
}

/// `(π N(μ, Σ))^γ = π^γ Z^{(γ)} N(μ, Σ/γ)` (§11.2).
fn anneal(c: &Component, gamma: f64) -> Component {
    let d = c.mean.len() as f64;
    let (_, log_det) = spd_inverse_and_logdet(&c.cov);
    let log_z =
        0.5 * d * (1.0 - gamma) * LOG_2PI + 0.5 * (1.0 - gamma) * log_det - 0.5 * d * gamma.ln();
    Component {
        log_weight: gamma * c.log_weight + log_z,
        mean: c.mean.clone(),
        cov: &c.cov / gamma,
    }
}

/// Pairwise products of two component lists (§11.5).
fn product(a: &[Component], b: &[Component]) -> Vec<Component> {
    let mut out = Vec::with_capacity(a.len() * b.len());
    for ca in a {
        let (pa, _) = spd_inverse_and_logdet(&ca.cov);
        for cb in b {
            let (pb, _) = spd_inverse_and_logdet(&cb.cov);
            let (cov, _) = spd_inverse_and_logdet(&(&pa + &pb));
            let mean = cov.dot(&(pa.dot(&ca.mean) + pb.dot(&cb.mean)));
            let sum = &ca.cov + &cb.cov;
            let (ps, log_det_s) = spd_inverse_and_logdet(&sum);
            let diff = &ca.mean - &cb.mean;
            let d = diff.len() as f64;
            let log_n = -0.5 * (d * LOG_2PI + log_det_s + diff.dot(&ps.dot(&diff)));
            out.push(Component {
                log_weight: ca.log_weight + cb.log_weight + log_n,
                mean,
                cov,
            });
        }
    }
    out
}

/// Normalises a component list into a mixture; returns it with `log Σ_j e^{log_weight_j}`.
fn to_mixture(comps: &[Component]) -> (GaussianMixture, f64) {
    let lw = Array1::from_iter(comps.iter().map(|c| c.log_weight));
    let log_total = log_sum_exp(lw.view());
    let weights = lw.mapv(|v| (v - log_total).exp());
    let d = comps[0].mean.len();
    let k = comps.len();
    let mut means = Array2::zeros((k, d));
    let mut cov = Array3::zeros((k, d, d));
    for (j, c) in comps.iter().enumerate() {
        means.row_mut(j).assign(&c.mean);
        // Symmetrise away rounding so validation never trips on 1e-17 asymmetries.
        let sym = (&c.cov + &c.cov.t()) * 0.5;
        cov.index_axis_mut(Axis(0), j).assign(&sym);
    }
    let weights = &weights / weights.sum();
    let mixture = GaussianMixture::new(weights, means, Covariance::Full(cov))
        .expect("closed-form mixture is valid");
    (mixture, log_total)
}

/// A mixture raised to a power `γ ≠ 1` and optionally tilted, sampled exactly by rejection.
#[derive(Clone, Debug)]
pub struct AnnealedMixture {
    base: GaussianMixture,
    gamma: f64,
    envelope: GaussianMixture,
    log_envelope_mass: f64,
    log_max_ratio: f64,
}

impl AnnealedMixture {
    /// `log(q̃/m̃)(x) = γ LSE_j Φ_j − LSE_j γ Φ_j` for each row (the reward cancels).
    fn log_ratio(&self, x: ArrayView2<f64>) -> Array1<f64> {
        let phi = self.base.component_log_densities(&NoiseLevel::data(), x);
        Array1::from_iter(phi.axis_iter(Axis(0)).map(|row| {
            self.gamma * log_sum_exp(row) - log_sum_exp(row.mapv(|v| self.gamma * v).view())
        }))
    }

    /// Exact samples by rejection in rounds; candidate `i` of round `r` uses stream
    /// `(purpose, r, i)`. Also returns `log Ẑ`, the importance-sampling estimate of the
    /// normaliser from every candidate drawn (the ratio is bounded, so its error is small).
    pub fn sample_with_log_normalizer(
        &self,
        n: usize,
        streams: &Streams,
        purpose: Purpose,
    ) -> (Array2<f64>, f64) {
        let d = self.base.dim();
        let mut accepted: Vec<f64> = Vec::with_capacity(n * d);
        let (mut ratio_sum, mut ratio_count) = (0.0, 0usize);
        let batch = (2 * n).max(20_000);
        let mut round = 0;
        while accepted.len() < n * d || ratio_count < 20_000 {
            let mut cand = Array2::zeros((batch, d));
            self.envelope
                .sample_into(cand.view_mut(), streams, purpose, 2 * round);
            let log_ratio = self.log_ratio(cand.view());
            let uniforms: Vec<f64> = (0..batch)
                .into_par_iter()
                .map(|i| rand::RngExt::random::<f64>(&mut streams.rng(purpose, 2 * round + 1, i)))
                .collect();
            for i in 0..batch {
                ratio_sum += (log_ratio[i] - self.log_max_ratio).exp();
                ratio_count += 1;
                if accepted.len() < n * d && uniforms[i] < (log_ratio[i] - self.log_max_ratio).exp()
                {
                    accepted.extend(cand.row(i).iter());
                }
            }
            round += 1;
        }
        let log_z =
            self.log_envelope_mass + self.log_max_ratio + (ratio_sum / ratio_count as f64).ln();
        (
            Array2::from_shape_vec((n, d), accepted).expect("n × d"),
            log_z,
        )
    }
}

/// A target law known exactly.
// Built once per run; boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum ExactLaw {
    /// A Gaussian mixture, with `log Z = log ∫ q̃`.
    Mixture {
        /// The normalised law.
        mixture: GaussianMixture,
        /// `log ∫ q̃` of the unnormalised target.
        log_normalizer: f64,
    },
    /// An annealed (and tilted) mixture, sampled by rejection.
    Annealed(AnnealedMixture),
}

impl ExactLaw {
    /// Builds the exact law of `Π_f p_f^{γ_f} e^{r}` for mixture factors `(p_f, γ_f)` and an
    /// optional closed-form reward, or `None` when no closed form applies.
    pub fn new(factors: &[(GaussianMixture, f64)], reward: Option<RewardForm<'_>>) -> Option<Self> {
        let mut factors: Vec<(GaussianMixture, f64)> = factors.to_vec();
        let mut quadratic = None;
        match reward {
            Some(RewardForm::MixtureLogDensity { mixture, scale }) => {
                factors.push((mixture.clone(), scale))
            }
            Some(RewardForm::Quadratic {
                precision,
                centre,
                linear,
            }) => quadratic = Some((precision, centre, linear)),
            None => {}
        }
        if factors.is_empty() {
            return None;
        }
        let tilt_all = |comps: Vec<Component>| -> Vec<Component> {
            match &quadratic {
                Some((p, c, a)) => comps.iter().map(|comp| tilt(comp, p, c, a)).collect(),
                None => comps,
            }
        };
        if factors.iter().all(|(_, g)| *g == 1.0) {
            let mut comps = components(&factors[0].0);
            for (m, _) in &factors[1..] {
                comps = product(&comps, &components(m));
            }
            let (mixture, log_normalizer) = to_mixture(&tilt_all(comps));
            return Some(ExactLaw::Mixture {
                mixture,
                log_normalizer,
            });
        }
        if factors.len() == 1 && factors[0].1 > 0.0 {
            let (base, gamma) = factors.pop().unwrap();
            let comps = tilt_all(components(&base).iter().map(|c| anneal(c, gamma)).collect());
            let (envelope, log_envelope_mass) = to_mixture(&comps);
            let k = base.num_components() as f64;
            return Some(ExactLaw::Annealed(AnnealedMixture {
                base,
                gamma,
                envelope,
                log_envelope_mass,
                log_max_ratio: ((gamma - 1.0) * k.ln()).max(0.0),
            }));
        }
        None
    }

    /// `n` exact samples and `log Z` (exact for mixtures; a bounded-ratio importance
    /// estimate for annealed mixtures).
    pub fn sample(&self, n: usize, streams: &Streams, purpose: Purpose) -> (Array2<f64>, f64) {
        match self {
            ExactLaw::Mixture {
                mixture,
                log_normalizer,
            } => (mixture.sample(n, streams, purpose), *log_normalizer),
            ExactLaw::Annealed(a) => a.sample_with_log_normalizer(n, streams, purpose),
        }
    }

    /// `log Z = log ∫ q̃`: exact for mixtures; for annealed mixtures the importance estimate
    /// `log Z_m̃ + log E_m̃[q̃/m̃]` from at least 200 000 envelope draws (the ratio is bounded,
    /// so its relative error is below ~K^{γ−1}/√200 000).
    pub fn log_normalizer(&self, streams: &Streams) -> f64 {
        match self {
            ExactLaw::Mixture { log_normalizer, .. } => *log_normalizer,
            ExactLaw::Annealed(a) => {
                a.sample_with_log_normalizer(100_000, streams, Purpose::Reference)
                    .1
            }
        }
    }

    /// The mixture whose components define modes: the law itself, or the annealed envelope.
    pub fn mode_mixture(&self) -> &GaussianMixture {
        match self {
            ExactLaw::Mixture { mixture, .. } => mixture,
            ExactLaw::Annealed(a) => &a.envelope,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::{Quadratic, Reward};
    use ndarray::array;

    fn one_d(w: Array1<f64>, m: Vec<f64>, v: Array1<f64>) -> GaussianMixture {
        let k = m.len();
        GaussianMixture::new(
            w,
            Array2::from_shape_vec((k, 1), m).unwrap(),
            Covariance::Isotropic(v),
        )
        .unwrap()
    }

    /// MATH.md §11.2 example: N(2, 0.25)², tilted by −x²/2, is N(16/9, 1/9) with log Z = −2.4091.
    #[test]
    fn annealed_gaussian_example() {
        let p = one_d(array![1.0], vec![2.0], array![0.25]);
        let r = Quadratic::new(array![0.0], 1.0).unwrap();
        let law = ExactLaw::new(&[(p, 2.0)], r.closed_form()).unwrap();
        let (x, log_z) = law.sample(200_000, &Streams::new(1), Purpose::Reference);
        assert!((log_z - (-2.4091)).abs() < 1e-3, "{log_z}");
        let m = law.mode_mixture();
        assert!((m.means()[[0, 0]] - 16.0 / 9.0).abs() < 1e-12);
        assert!((m.component_covariance(0)[[0, 0]] - 1.0 / 9.0).abs() < 1e-12);
        // Sample mean within z = 5 standard errors of 16/9 (sd 1/3).
        let mean = x.mean().unwrap();
        assert!((mean - 16.0 / 9.0).abs() < 5.0 / 3.0 / (200_000f64).sqrt());
    }

    /// MATH.md §11.4 reference: mean 0.636, variance 4.701, P(x > 0) = 0.574, log Z = −2.843
    /// (3 significant digits quoted, so tolerances 2e-3 plus z = 4 Monte-Carlo error).
    #[test]
    fn annealed_tilted_mixture_reference() {
        let p = one_d(array![0.7, 0.3], vec![-2.0, 2.5], array![0.3, 0.5]);
        let r = Quadratic::new(array![2.0], 0.3).unwrap();
        let law = ExactLaw::new(&[(p, 2.0)], r.closed_form()).unwrap();
        let n = 400_000;
        let (x, log_z) = law.sample(n, &Streams::new(2), Purpose::Reference);
        let x = x.column(0);
        let mean = x.mean().unwrap();
        let var = x.var(0.0);
        let pos = x.iter().filter(|&&v| v > 0.0).count() as f64 / n as f64;
        let se = (var / n as f64).sqrt();
        assert!((mean - 0.636).abs() < 2e-3 + 4.0 * se, "mean {mean}");
        assert!(
            (var - 4.701).abs() < 5e-3 + 4.0 * var * (2.0 / n as f64).sqrt(),
            "var {var}"
        );
        assert!(
            (pos - 0.574).abs() < 2e-3 + 4.0 * (0.25 / n as f64).sqrt(),
            "P(x>0) {pos}"
        );
        assert!((log_z - (-2.843)).abs() < 3e-3, "log Z {log_z}");
    }

    /// Product of two 1-D mixtures: mixture density equals the normalised pointwise product,
    /// with Z from trapezoidal quadrature (grid error ≪ 1e-8).
    #[test]
    fn product_of_mixtures_matches_quadrature() {
        let a = one_d(array![0.4, 0.6], vec![-1.0, 1.5], array![0.5, 0.8]);
        let b = one_d(array![0.5, 0.5], vec![0.0, 2.0], array![1.0, 0.3]);
        let law = ExactLaw::new(&[(a.clone(), 1.0), (b.clone(), 1.0)], None).unwrap();
        let ExactLaw::Mixture {
            mixture,
            log_normalizer,
        } = &law
        else {
            panic!("closed form expected")
        };
        let grid = Array2::from_shape_fn((20_001, 1), |(i, _)| -10.0 + 20.0 * i as f64 / 20_000.0);
        let la = a.component_log_densities(&NoiseLevel::data(), grid.view());
        let lb = b.component_log_densities(&NoiseLevel::data(), grid.view());
        let lm = mixture.component_log_densities(&NoiseLevel::data(), grid.view());
        let h = 20.0 / 20_000.0;
        let mut z = 0.0;
        for i in 0..grid.nrows() {
            let prod = (log_sum_exp(la.row(i)) + log_sum_exp(lb.row(i))).exp();
            z += prod * h * if i == 0 || i == 20_000 { 0.5 } else { 1.0 };
            let q = (log_sum_exp(lm.row(i)) + log_normalizer).exp();
            assert!((q - prod).abs() < 1e-12, "density at {}", grid[[i, 0]]);
        }
        assert!((z.ln() - log_normalizer).abs() < 1e-8);
    }
}
