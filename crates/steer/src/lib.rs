//! steer: inference-time steering of diffusion models with weighted particles.
//!
//! A pre-trained diffusion model samples a base law `p`. steer samples a target instead,
//! `q_T ∝ Π_e p_e^{γ_e} e^{r}` (annealing, reward tilting, products of experts), by moving
//! particles with a guided reverse SDE and carrying log-space importance weights:
//!
//! ```text
//! Population { x: N×d, carry }  +  LogWeights (N)
//!   for each step k:
//!       advance   (method: move x by its drift + noise, return the log-weight increment)
//!       reweight  (LogWeights::reweight, NaN → error with the step number)
//!       observe   (StepInfo: ESS, potential variance, θ, evaluations used)
//!       resample  (policy: ESS below threshold / fixed period / particle-count change)
//!   → Run { samples, log_weights, log_normalizer, trace, evaluations, wall time }
//! ```
//!
//! Every method is a [`method::Method`] (one `advance`) run by the single loop
//! [`smc::run`]. Conventions: arrays are `ndarray` with one row per particle, `f64`
//! throughout; weights and densities live in log space; randomness comes from
//! [`rng::Streams`] keyed by `(purpose, step, particle)`, so a run is bit-identical for a
//! seed on any number of threads; the library never prints. The mathematics is in
//! `shared/docs/MATH.md`, cited by section.
//!
//! ```
//! use std::sync::Arc;
//! use ndarray::array;
//! use steer::method::{Guidance, GuidedSampler};
//! use steer::model::{Covariance, GaussianMixture};
//! use steer::reward::Quadratic;
//! use steer::schedule::{GridKind, Schedule, TimeGrid};
//! use steer::smc::{self, ParticleSchedule, ResamplePolicy, Settings};
//! use steer::target::{Expert, Target, TiltSchedule};
//!
//! # fn main() -> steer::Result<()> {
//! let p = GaussianMixture::new(array![0.7, 0.3], array![[-2.0], [2.5]], Covariance::Isotropic(array![0.3, 0.5]))?;
//! let target = Target::new(
//!     vec![Expert { model: Arc::new(p), gamma: 2.0 }],  // anneal: p²
//!     Some(Arc::new(Quadratic::new(array![2.0], 0.3)?)), // and tilt: e^{−0.15 (x−2)²}
//!     TiltSchedule::Linear,
//! )?;
//! let schedule = Schedule::VpLinear { beta_min: 0.1, beta_max: 20.0, horizon: 1.0 };
//! let grid = TimeGrid::new(schedule, GridKind::Uniform, 400, 1.0, 0.0, 1.0)?;
//! let settings = Settings {
//!     particles: ParticleSchedule::Constant(2000),
//!     policy: ResamplePolicy::Ess { threshold: 0.5 },
//!     scheme: steer::resample::Scheme::Systematic,
//!     final_resample: false,
//!     window: None,
//!     seed: 7,
//! };
//! let mut gsmc = GuidedSampler::new(&target, Guidance::Corrected);
//! let run = smc::run(&mut gsmc, &target, &grid, &settings, &mut |_step| {})?;
//! assert!(run.ess_fraction() > 0.0 && run.log_normalizer.is_finite());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
// `deny`, not `forbid`: ndarray's `s!` macro expands to `#[allow(unsafe_code)]`.
#![deny(unsafe_code)]

pub mod classifier;
pub mod data;
pub mod doob;
pub mod doob_net;
pub mod error;
pub mod exact;
pub mod linalg;
pub mod mcmc;
pub mod method;
pub mod metrics;
pub mod model;
pub mod population;
pub mod resample;
pub mod reward;
pub mod rng;
pub mod schedule;
pub mod smc;
pub mod target;
pub mod weights;

pub use error::{Error, Result};
