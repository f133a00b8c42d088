//! steer: inference-time steering of diffusion models with weighted particles.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod error;
pub mod rng;

pub use error::{Error, Result};
