//! steer: inference-time steering of diffusion models with weighted particles.
#![deny(missing_docs)]
// `deny`, not `forbid`: ndarray's `s!` macro expands to `#[allow(unsafe_code)]`.
#![deny(unsafe_code)]

pub mod error;
pub mod rng;

pub use error::{Error, Result};
pub mod exact;
pub mod linalg;
pub mod mcmc;
pub mod method;
pub mod metrics;
pub mod model;
pub mod population;
pub mod resample;
pub mod reward;
pub mod schedule;
pub mod smc;
pub mod target;
pub mod weights;
