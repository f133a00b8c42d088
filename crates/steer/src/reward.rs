//! Rewards `r(x)`: the log-tilt of the target `q ∝ p e^{r}` (MATH.md §2), with value,
//! gradient and Laplacian evaluated for a batch of particles.

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, Zip};

use crate::error::{Error, Result};
use crate::model::gmm::NoisedMixture;
use crate::model::{GaussianMixture, NoiseLevel, ScoreOutput};

/// Output buffers of one batched reward evaluation; `None` means "not requested".
#[derive(Debug, Default)]
pub struct RewardOutput<'a> {
    /// `N` values `r(x_i)`.
    pub value: Option<ArrayViewMut1<'a, f64>>,
    /// `N × d` gradients `∇r(x_i)`.
    pub gradient: Option<ArrayViewMut2<'a, f64>>,
    /// `N` Laplacians `Δr(x_i)`.
    pub laplacian: Option<ArrayViewMut1<'a, f64>>,
}

/// The closed form of a reward, when it has one that keeps Gaussian mixtures closed.
#[derive(Clone, Debug)]
pub enum RewardForm<'a> {
    /// `r(x) = −½ (x − x⋆)ᵀ Λ (x − x⋆) + aᵀ x` (MATH.md §11.2).
    Quadratic {
        /// `Λ ⪰ 0`.
        precision: Array2<f64>,
        /// `x⋆`.
        centre: Array1<f64>,
        /// `a`.
        linear: Array1<f64>,
    },
    /// `r(x) = c · log p(x)` for a Gaussian mixture `p`.
    MixtureLogDensity {
        /// The mixture `p`.
        mixture: &'a GaussianMixture,
        /// The scale `c`.
        scale: f64,
    },
}

/// A differentiable reward with exact value, gradient and Laplacian.
pub trait Reward: Send + Sync + std::fmt::Debug {
    /// State dimension `d`.
    fn dim(&self) -> usize;

    /// Evaluates the requested quantities for every row of `x`.
    fn evaluate(&self, x: ArrayView2<f64>, out: RewardOutput<'_>) -> Result<()>;

    /// The reward's closed form, when it has one (enables exact references).
    fn closed_form(&self) -> Option<RewardForm<'_>> {
        None
    }

    /// The reward as a classifier reward `λ log p(c | x)`, when it is one (enables the
    /// class-accuracy metric).
    fn as_class_reward(&self) -> Option<&crate::classifier::ClassReward> {
        None
    }
}

/// Linear reward `r(x) = aᵀ x`.
#[derive(Clone, Debug)]
pub struct Linear {
    slope: Array1<f64>,
}

impl Linear {
    /// `r(x) = slope · x`; the slope must be finite.
    pub fn new(slope: Array1<f64>) -> Result<Self> {
        finite("reward.slope", slope.iter())?;
        Ok(Linear { slope })
    }
}

impl Reward for Linear {
    fn dim(&self) -> usize {
        self.slope.len()
    }

    fn evaluate(&self, x: ArrayView2<f64>, out: RewardOutput<'_>) -> Result<()> {
        check_dim(self.dim(), x)?;
        if let Some(mut v) = out.value {
            v.assign(&x.dot(&self.slope));
        }
        if let Some(mut g) = out.gradient {
            g.assign(&self.slope.view().insert_axis(Axis(0)));
        }
        if let Some(mut l) = out.laplacian {
            l.fill(0.0);
        }
        Ok(())
    }

    fn closed_form(&self) -> Option<RewardForm<'_>> {
        let d = self.dim();
        Some(RewardForm::Quadratic {
            precision: Array2::zeros((d, d)),
            centre: Array1::zeros(d),
            linear: self.slope.clone(),
        })
    }
}

/// Quadratic well `r(x) = −(λ/2) |x − c|²` pulling particles toward the centre `c`.
#[derive(Clone, Debug)]
pub struct Quadratic {
    centre: Array1<f64>,
    strength: f64,
}

impl Quadratic {
    /// `r(x) = −(strength/2)|x − centre|²`; `strength ≥ 0` and everything finite.
    pub fn new(centre: Array1<f64>, strength: f64) -> Result<Self> {
        finite("reward.centre", centre.iter())?;
        if !(strength.is_finite() && strength >= 0.0) {
            return Err(Error::invalid(
                "reward.strength",
                format!("must be finite and ≥ 0, got {strength}"),
            ));
        }
        Ok(Quadratic { centre, strength })
    }
}

impl Reward for Quadratic {
    fn dim(&self) -> usize {
        self.centre.len()
    }

    fn evaluate(&self, x: ArrayView2<f64>, out: RewardOutput<'_>) -> Result<()> {
        check_dim(self.dim(), x)?;
        let lam = self.strength;
        if let Some(mut v) = out.value {
            Zip::from(&mut v).and(x.rows()).par_for_each(|v, row| {
                let d2: f64 = row
                    .iter()
                    .zip(self.centre.iter())
                    .map(|(a, c)| (a - c) * (a - c))
                    .sum();
                *v = -0.5 * lam * d2;
            });
        }
        if let Some(mut g) = out.gradient {
            Zip::from(g.rows_mut())
                .and(x.rows())
                .par_for_each(|mut g, row| {
                    Zip::from(&mut g)
                        .and(&row)
                        .and(&self.centre)
                        .for_each(|g, &a, &c| *g = -lam * (a - c));
                });
        }
        if let Some(mut l) = out.laplacian {
            l.fill(-lam * self.dim() as f64);
        }
        Ok(())
    }

    fn closed_form(&self) -> Option<RewardForm<'_>> {
        let d = self.dim();
        Some(RewardForm::Quadratic {
            precision: Array2::eye(d) * self.strength,
            centre: self.centre.clone(),
            linear: Array1::zeros(d),
        })
    }
}

/// Log-density of a Gaussian mixture as a reward, `r(x) = c log p(x)`: tilting one mixture
/// by another (with `c = 1` the target is a product of experts).
#[derive(Clone, Debug)]
pub struct MixtureLogDensity {
    mixture: GaussianMixture,
    clean: NoisedMixture,
    scale: f64,
}

impl MixtureLogDensity {
    /// `r(x) = scale · log mixture(x)`; `scale` finite.
    pub fn new(mixture: GaussianMixture, scale: f64) -> Result<Self> {
        if !scale.is_finite() {
            return Err(Error::invalid("reward.scale", "must be finite"));
        }
        let clean = mixture.noised(&NoiseLevel::data());
        Ok(MixtureLogDensity {
            mixture,
            clean,
            scale,
        })
    }
}

impl Reward for MixtureLogDensity {
    fn dim(&self) -> usize {
        self.mixture.dim()
    }

    fn evaluate(&self, x: ArrayView2<f64>, out: RewardOutput<'_>) -> Result<()> {
        check_dim(self.dim(), x)?;
        let RewardOutput {
            mut value,
            gradient,
            mut laplacian,
        } = out;
        // The score is always computed; without a gradient request it goes to a scratch buffer.
        let mut scratch;
        let mut grad = match gradient {
            Some(g) => g,
            None => {
                scratch = Array2::zeros(x.dim());
                scratch.view_mut()
            }
        };
        self.clean.evaluate(
            x,
            ScoreOutput {
                score: grad.view_mut(),
                log_density: value.as_mut().map(|v| v.view_mut()),
                divergence: laplacian.as_mut().map(|v| v.view_mut()),
            },
        )?;
        let c = self.scale;
        grad.mapv_inplace(|v| c * v);
        for v in [value.as_mut(), laplacian.as_mut()].into_iter().flatten() {
            v.mapv_inplace(|v| c * v);
        }
        Ok(())
    }

    fn closed_form(&self) -> Option<RewardForm<'_>> {
        Some(RewardForm::MixtureLogDensity {
            mixture: &self.mixture,
            scale: self.scale,
        })
    }
}

fn check_dim(d: usize, x: ArrayView2<f64>) -> Result<()> {
    if x.ncols() != d {
        return Err(Error::Dimension {
            context: "reward input".into(),
            expected: d,
            found: x.ncols(),
        });
    }
    Ok(())
}

fn finite<'a>(field: &str, mut v: impl Iterator<Item = &'a f64>) -> Result<()> {
    match v.position(|x| !x.is_finite()) {
        Some(i) => Err(Error::invalid(format!("{field}[{i}]"), "must be finite")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Covariance;
    use ndarray::array;

    fn eval(r: &dyn Reward, x: ArrayView2<f64>) -> (Array1<f64>, Array2<f64>, Array1<f64>) {
        let n = x.nrows();
        let (mut v, mut g, mut l) = (Array1::zeros(n), Array2::zeros(x.dim()), Array1::zeros(n));
        r.evaluate(
            x,
            RewardOutput {
                value: Some(v.view_mut()),
                gradient: Some(g.view_mut()),
                laplacian: Some(l.view_mut()),
            },
        )
        .unwrap();
        (v, g, l)
    }

    /// Gradient and Laplacian against central differences of the value (tolerance 1e-6
    /// relative; the O(h²) truncation error at h = 1e-4 is ~1e-8).
    #[test]
    fn gradients_and_laplacians_match_finite_differences() {
        let mix = GaussianMixture::new(
            array![0.3, 0.7],
            array![[0.0, 1.0], [2.0, -1.0]],
            Covariance::Diagonal(array![[0.5, 1.5], [1.0, 0.3]]),
        )
        .unwrap();
        let rewards: Vec<Box<dyn Reward>> = vec![
            Box::new(Linear::new(array![0.5, -2.0]).unwrap()),
            Box::new(Quadratic::new(array![1.0, 2.0], 0.7).unwrap()),
            Box::new(MixtureLogDensity::new(mix, 0.6).unwrap()),
        ];
        let x = array![[0.3, -0.4], [1.7, 0.9]];
        let h = 1e-4;
        for r in &rewards {
            let (v, g, l) = eval(r.as_ref(), x.view());
            // Value-only evaluation agrees with the full one.
            let mut v_only = Array1::zeros(2);
            r.evaluate(
                x.view(),
                RewardOutput {
                    value: Some(v_only.view_mut()),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!((&v_only - &v).iter().all(|e| e.abs() < 1e-14));
            for i in 0..2 {
                let mut lap = 0.0;
                for c in 0..2 {
                    let mut xp = x.clone();
                    let mut xm = x.clone();
                    xp[[i, c]] += h;
                    xm[[i, c]] -= h;
                    let (vp, gp, _) = eval(r.as_ref(), xp.view());
                    let (vm, gm, _) = eval(r.as_ref(), xm.view());
                    let fd = (vp[i] - vm[i]) / (2.0 * h);
                    assert!(
                        (fd - g[[i, c]]).abs() < 1e-6 * (1.0 + fd.abs()),
                        "{r:?}: grad {fd} vs {}",
                        g[[i, c]]
                    );
                    lap += (gp[[i, c]] - gm[[i, c]]) / (2.0 * h);
                }
                assert!(
                    (lap - l[i]).abs() < 1e-6 * (1.0 + lap.abs()),
                    "{r:?}: lap {lap} vs {}",
                    l[i]
                );
            }
        }
        assert!(Quadratic::new(array![0.0], -1.0).is_err());
        assert!(Linear::new(array![f64::NAN]).is_err());
    }
}
