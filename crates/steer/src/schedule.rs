//! Noise schedules and time grids (MATH.md §1.2–1.3).
//!
//! Forward (noising) time `τ ∈ [0, T]` runs from data to noise; sampling time `t = T − τ`
//! runs from noise to data. A [`Schedule`] knows the forward process
//! `dx = −f(τ) x dτ + U(τ) dw` through `α(τ)`, `σ(τ)` and the step integrals of §1.3; a
//! [`TimeGrid`] is the list of [`Step`]s the sampler walks, with every coefficient a step
//! needs precomputed.

use crate::error::{Error, Result};

/// A forward noising process with linear drift.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// Variance-preserving, `β(τ) = β_min + (β_max − β_min) τ/T`, `α = e^{−B/2}`, `σ² = 1 − α²`.
    VpLinear {
        /// `β_min` (default 0.1).
        beta_min: f64,
        /// `β_max` (default 20).
        beta_max: f64,
        /// Horizon `T` (default 1).
        horizon: f64,
    },
    /// Variance-preserving cosine schedule of Nichol & Dhariwal, `α² = υ(τ)/υ(0)`.
    VpCosine {
        /// Offset `ε_c` (default 0.008).
        offset: f64,
        /// Horizon `T` (default 1).
        horizon: f64,
    },
    /// Variance-exploding in the EDM parametrisation: `τ = σ`, `α = 1`, `U² = 2τ`, `T = σ_max`.
    VeEdm {
        /// `σ_max = T` (default 80).
        sigma_max: f64,
    },
}

impl Schedule {
    /// Validates the parameters, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(
                    field,
                    format!("must be finite and > 0, got {v}"),
                ))
            }
        };
        match *self {
            Schedule::VpLinear {
                beta_min,
                beta_max,
                horizon,
            } => {
                positive("schedule.beta_min", beta_min)?;
                positive("schedule.beta_max", beta_max)?;
                positive("schedule.horizon", horizon)?;
                if beta_max < beta_min {
                    return Err(Error::invalid("schedule.beta_max", "must be ≥ beta_min"));
                }
                Ok(())
            }
            Schedule::VpCosine { offset, horizon } => {
                positive("schedule.offset", offset)?;
                positive("schedule.horizon", horizon)
            }
            Schedule::VeEdm { sigma_max } => positive("schedule.sigma_max", sigma_max),
        }
    }

    /// The horizon `T` (forward time at which the reference law is reached).
    pub fn horizon(&self) -> f64 {
        match *self {
            Schedule::VpLinear { horizon, .. } | Schedule::VpCosine { horizon, .. } => horizon,
            Schedule::VeEdm { sigma_max } => sigma_max,
        }
    }

    /// Whether the process is variance-exploding (`f ≡ 0`, `α ≡ 1`).
    pub fn is_variance_exploding(&self) -> bool {
        matches!(self, Schedule::VeEdm { .. })
    }

    /// Standard deviation of the Gaussian reference `p_T ≈ N(0, σ_ref² I)`: 1 (VP) or `σ_max` (VE).
    pub fn reference_std(&self) -> f64 {
        match *self {
            Schedule::VeEdm { sigma_max } => sigma_max,
            _ => 1.0,
        }
    }

    /// `B(τ) = ∫_0^τ β` for VP schedules (`−2 log α`); `0` for VE.
    fn integrated_beta(&self, tau: f64) -> f64 {
        match *self {
            Schedule::VpLinear {
                beta_min,
                beta_max,
                horizon,
            } => beta_min * tau + (beta_max - beta_min) * tau * tau / (2.0 * horizon),
            Schedule::VpCosine { offset, horizon } => {
                let v = |s: f64| {
                    (std::f64::consts::FRAC_PI_2 * (s / horizon + offset) / (1.0 + offset))
                        .cos()
                        .powi(2)
                };
                -(v(tau) / v(0.0)).ln()
            }
            Schedule::VeEdm { .. } => 0.0,
        }
    }

    /// `log α(τ)`.
    pub fn log_alpha(&self, tau: f64) -> f64 {
        -0.5 * self.integrated_beta(tau)
    }

    /// Signal scale `α(τ)`.
    pub fn alpha(&self, tau: f64) -> f64 {
        self.log_alpha(tau).exp()
    }

    /// Noise level `σ(τ)`: `sqrt(1 − α²)` (VP, computed as `sqrt(−expm1(−B))`) or `τ` (VE).
    pub fn sigma(&self, tau: f64) -> f64 {
        match self {
            Schedule::VeEdm { .. } => tau,
            _ => (-(-self.integrated_beta(tau)).exp_m1()).max(0.0).sqrt(),
        }
    }

    /// Forward drift coefficient `f(τ)` (`u_τ(x) = −f(τ) x`).
    pub fn drift_coefficient(&self, tau: f64) -> f64 {
        0.5 * self.beta(tau)
    }

    /// Squared forward diffusion `U(τ)²`.
    pub fn diffusion_squared(&self, tau: f64) -> f64 {
        match self {
            Schedule::VeEdm { .. } => 2.0 * tau,
            _ => self.beta(tau),
        }
    }

    /// `β(τ)` of a VP schedule (0 for VE).
    fn beta(&self, tau: f64) -> f64 {
        match *self {
            Schedule::VpLinear {
                beta_min,
                beta_max,
                horizon,
            } => beta_min + (beta_max - beta_min) * tau / horizon,
            Schedule::VpCosine { offset, horizon } => {
                let a = std::f64::consts::FRAC_PI_2 * (tau / horizon + offset) / (1.0 + offset);
                std::f64::consts::PI / (horizon * (1.0 + offset)) * a.tan()
            }
            Schedule::VeEdm { .. } => 0.0,
        }
    }

    /// `∫ U² dτ` over `[tau_lo, tau_hi]`: `B(τ_hi) − B(τ_lo)` (VP) or `τ_hi² − τ_lo²` (VE).
    pub fn integrated_diffusion(&self, tau_lo: f64, tau_hi: f64) -> f64 {
        match self {
            Schedule::VeEdm { .. } => tau_hi * tau_hi - tau_lo * tau_lo,
            _ => self.integrated_beta(tau_hi) - self.integrated_beta(tau_lo),
        }
    }

    /// The largest forward time a grid may start from: `T`, or `T(1 − 10⁻³)` for the cosine
    /// schedule whose `β` blows up at `T` (MATH.md §1.2).
    pub fn default_tau_max(&self) -> f64 {
        match self {
            Schedule::VpCosine { horizon, .. } => horizon * (1.0 - 1e-3),
            _ => self.horizon(),
        }
    }
}

/// How the forward times `τ_0 = τ_max > … > τ_M = τ_min` are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum GridKind {
    /// Uniform in `τ` (and so in sampling time).
    #[default]
    Uniform,
    /// The EDM ρ-grid `σ_k = (σ_max^{1/ρ} + k/M (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ` (VE only).
    Edm {
        /// `ρ` (default 7).
        rho: f64,
    },
    /// Geometric `σ_k = σ_max (σ_min/σ_max)^{k/M}` (VE only).
    Geometric,
}

/// One sampling step `[t_k, t_{k+1}]` with every coefficient the samplers need (MATH.md §1.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// Step index `k`.
    pub index: usize,
    /// Sampling times `t_k` and `t_{k+1}`.
    pub t: (f64, f64),
    /// Forward times `τ_k = T − t_k` and `τ_{k+1}`.
    pub tau: (f64, f64),
    /// `Δt_k = t_{k+1} − t_k`.
    pub dt: f64,
    /// `α(τ_k)` and `σ(τ_k)` at the left point.
    pub alpha: f64,
    /// `σ(τ_k)`.
    pub sigma: f64,
    /// `𝒰_k = ∫ U² dt` over the step.
    pub diffusion: f64,
    /// `𝓕_k = log α(τ_{k+1}) − log α(τ_k)`.
    pub drift: f64,
    /// `𝒱_k = η² 𝒰_k`, the variance of the injected noise.
    pub noise: f64,
}

impl Step {
    /// The noise level at the step's left point `τ_k`.
    pub fn level(&self) -> crate::model::NoiseLevel {
        crate::model::NoiseLevel {
            tau: self.tau.0,
            alpha: self.alpha,
            sigma: self.sigma,
        }
    }
}

/// The sampler's grid of steps from noise (`τ_max`) to data (`τ_min`).
#[derive(Clone, Debug)]
pub struct TimeGrid {
    schedule: Schedule,
    taus: Vec<f64>,
    steps: Vec<Step>,
    eta: f64,
}

impl TimeGrid {
    /// Builds `steps` steps from `tau_max` down to `tau_min` with noise level `V = η U`.
    pub fn new(
        schedule: Schedule,
        kind: GridKind,
        steps: usize,
        tau_max: f64,
        tau_min: f64,
        eta: f64,
    ) -> Result<Self> {
        schedule.validate()?;
        if steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::invalid(
                "schedule.eta",
                format!("must be ≥ 0, got {eta}"),
            ));
        }
        if !(tau_min.is_finite() && tau_min >= 0.0) {
            return Err(Error::invalid(
                "schedule.tau_min",
                format!("must be ≥ 0, got {tau_min}"),
            ));
        }
        let limit = schedule.default_tau_max();
        if !(tau_max.is_finite() && tau_max > tau_min && tau_max <= limit * (1.0 + 1e-12)) {
            return Err(Error::invalid(
                "schedule.tau_max",
                format!("must lie in (tau_min = {tau_min}, {limit}], got {tau_max}"),
            ));
        }
        let m = steps as f64;
        let taus: Vec<f64> = match kind {
            GridKind::Uniform => (0..=steps)
                .map(|k| tau_max + (tau_min - tau_max) * k as f64 / m)
                .collect(),
            GridKind::Edm { rho } => {
                Self::require_ve(&schedule, "EDM")?;
                if !(rho.is_finite() && rho > 0.0) {
                    return Err(Error::invalid("schedule.rho", "must be > 0"));
                }
                if tau_min <= 0.0 {
                    return Err(Error::invalid(
                        "schedule.tau_min",
                        "the EDM grid needs σ_min > 0",
                    ));
                }
                let (a, b) = (tau_max.powf(1.0 / rho), tau_min.powf(1.0 / rho));
                (0..=steps)
                    .map(|k| (a + k as f64 / m * (b - a)).powf(rho))
                    .collect()
            }
            GridKind::Geometric => {
                Self::require_ve(&schedule, "geometric")?;
                if tau_min <= 0.0 {
                    return Err(Error::invalid(
                        "schedule.tau_min",
                        "the geometric grid needs σ_min > 0",
                    ));
                }
                (0..=steps)
                    .map(|k| tau_max * (tau_min / tau_max).powf(k as f64 / m))
                    .collect()
            }
        };
        let horizon = schedule.horizon();
        let steps = taus
            .windows(2)
            .enumerate()
            .map(|(k, w)| {
                let (tau0, tau1) = (w[0], w[1]);
                let diffusion = schedule.integrated_diffusion(tau1, tau0);
                Step {
                    index: k,
                    t: (horizon - tau0, horizon - tau1),
                    tau: (tau0, tau1),
                    dt: tau0 - tau1,
                    alpha: schedule.alpha(tau0),
                    sigma: schedule.sigma(tau0),
                    diffusion,
                    drift: schedule.log_alpha(tau1) - schedule.log_alpha(tau0),
                    noise: eta * eta * diffusion,
                }
            })
            .collect();
        Ok(TimeGrid {
            schedule,
            taus,
            steps,
            eta,
        })
    }

    fn require_ve(schedule: &Schedule, name: &str) -> Result<()> {
        if schedule.is_variance_exploding() {
            Ok(())
        } else {
            Err(Error::invalid(
                "schedule.grid",
                format!("the {name} grid is defined for the VE/EDM schedule only"),
            ))
        }
    }

    /// The forward process.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The steps, in sampling order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Number of steps `M`.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the grid has no step (never true for a built grid).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Forward times `τ_0 > … > τ_M`.
    pub fn taus(&self) -> &[f64] {
        &self.taus
    }

    /// Sampling time `t_k = T − τ_k` of grid point `k ∈ 0..=M`.
    pub fn time(&self, k: usize) -> f64 {
        self.schedule.horizon() - self.taus[k]
    }

    /// Noise level `η` (`V = η U`).
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// `(τ, α(τ), σ(τ))` at grid point `k ∈ 0..=M`.
    pub fn level(&self, k: usize) -> crate::model::NoiseLevel {
        crate::model::NoiseLevel::new(&self.schedule, self.taus[k])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> [Schedule; 3] {
        [
            Schedule::VpLinear {
                beta_min: 0.1,
                beta_max: 20.0,
                horizon: 1.0,
            },
            Schedule::VpCosine {
                offset: 0.008,
                horizon: 1.0,
            },
            Schedule::VeEdm { sigma_max: 80.0 },
        ]
    }

    /// The relations of MATH.md §1.2: f = −d log α/dτ and U² = dσ²/dτ + 2 f σ², checked by
    /// central differences (relative error O(h²) ≈ 1e-8).
    #[test]
    fn coefficients_are_consistent() {
        for s in all() {
            for frac in [0.1, 0.37, 0.6, 0.9] {
                let tau = frac * s.horizon();
                let h = 1e-5 * s.horizon();
                let f = -(s.log_alpha(tau + h) - s.log_alpha(tau - h)) / (2.0 * h);
                assert!(
                    (f - s.drift_coefficient(tau)).abs() < 1e-6 * (1.0 + f.abs()),
                    "{s:?}"
                );
                let ds2 = (s.sigma(tau + h).powi(2) - s.sigma(tau - h).powi(2)) / (2.0 * h);
                let u2 = ds2 + 2.0 * f * s.sigma(tau).powi(2);
                let want = s.diffusion_squared(tau);
                assert!(
                    (u2 - want).abs() < 1e-6 * (1.0 + want),
                    "{s:?}: {u2} vs {want}"
                );
                if !s.is_variance_exploding() {
                    let a = s.alpha(tau);
                    assert!((a * a + s.sigma(tau).powi(2) - 1.0).abs() < 1e-12);
                }
            }
        }
    }

    /// Step integrals against composite Simpson quadrature of U² and f.
    #[test]
    fn step_integrals_match_quadrature() {
        for s in all() {
            let (tau_max, tau_min) = (s.default_tau_max(), 0.01 * s.horizon());
            let grid = TimeGrid::new(s, GridKind::Uniform, 7, tau_max, tau_min, 0.5).unwrap();
            for st in grid.steps() {
                // Fine enough for the cosine β, which steepens near τ_max.
                let n = 20_000;
                let h = (st.tau.0 - st.tau.1) / n as f64;
                let simpson = |g: &dyn Fn(f64) -> f64| {
                    (0..=n)
                        .map(|i| {
                            let w = if i == 0 || i == n {
                                1.0
                            } else if i % 2 == 1 {
                                4.0
                            } else {
                                2.0
                            };
                            w * g(st.tau.1 + i as f64 * h)
                        })
                        .sum::<f64>()
                        * h
                        / 3.0
                };
                let u = simpson(&|x| s.diffusion_squared(x));
                let f = simpson(&|x| s.drift_coefficient(x));
                assert!(
                    (u - st.diffusion).abs() < 1e-7 * (1.0 + u),
                    "{s:?} U: {u} vs {}",
                    st.diffusion
                );
                assert!((f - st.drift).abs() < 1e-7 * (1.0 + f), "{s:?} F");
                assert!((st.noise - 0.25 * st.diffusion).abs() < 1e-15 * (1.0 + u));
            }
        }
    }

    #[test]
    fn edm_grid_endpoints_and_errors() {
        let s = Schedule::VeEdm { sigma_max: 80.0 };
        let g = TimeGrid::new(s, GridKind::Edm { rho: 7.0 }, 18, 80.0, 0.002, 1.0).unwrap();
        assert!((g.taus()[0] - 80.0).abs() < 1e-12);
        assert!((g.taus()[18] - 0.002).abs() < 1e-12);
        assert!(g.taus().windows(2).all(|w| w[0] > w[1]));
        assert!((g.time(18) - (80.0 - 0.002)).abs() < 1e-12);
        let vp = all()[0];
        assert!(TimeGrid::new(vp, GridKind::Edm { rho: 7.0 }, 5, 1.0, 0.0, 1.0).is_err());
        assert!(TimeGrid::new(vp, GridKind::Uniform, 0, 1.0, 0.0, 1.0).is_err());
        assert!(TimeGrid::new(vp, GridKind::Uniform, 5, 1.5, 0.0, 1.0).is_err());
    }
}
