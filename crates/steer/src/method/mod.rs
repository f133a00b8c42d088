//! Sampling methods: each is one `advance` (move the particles, return log-weight
//! increments) plugged into the single loop of [`crate::smc::run`].

mod doob;
mod driftlite;
mod guided;
mod urge;

pub use doob::Doob;
pub use driftlite::{Control, DivergenceEstimator, DriftLite, DriftLiteConfig, refine};
pub use guided::{Guidance, GuidedSampler};
pub use urge::{Potential, Proposal, Twist, TwistSchedule, Urge};

use ndarray::ArrayViewMut1;

use crate::error::Result;
use crate::population::Population;
use crate::rng::Streams;
use crate::schedule::{Step, TimeGrid};
use crate::target::{Initial, Target};
use crate::weights::LogWeights;

/// What a method sees of the current step.
#[derive(Clone, Copy, Debug)]
pub struct StepContext<'a> {
    /// The step `[t_k, t_{k+1}]` and its coefficients.
    pub step: &'a Step,
    /// Reward schedule `(β_k, β_{k+1})`.
    pub beta: (f64, f64),
    /// The run's random streams.
    pub streams: &'a Streams,
}

/// Per-step diagnostics a method reports besides its increments.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    /// Control coefficients `θ` (DriftLite); empty for other methods.
    pub theta: Vec<f64>,
    /// `Var_W(G)` of the uncontrolled potential rate, for controlled methods (DriftLite).
    pub uncontrolled_variance: Option<f64>,
    /// Temperature `β_j` chosen at this step by an adaptive schedule.
    pub temperature: Option<f64>,
}

/// A sampling method: a Markov kernel with its incremental log-weights.
pub trait Method {
    /// Short name (`"g-smc"`, …).
    fn name(&self) -> &str;

    /// Whether the method produces weights (if not, the engine never resamples).
    fn weighted(&self) -> bool;

    /// Columns of per-particle carry the method needs.
    fn carry_width(&self) -> usize {
        0
    }

    /// Initial particles and log-weights; by default exact `q_0` of the target.
    fn initialize(
        &mut self,
        target: &Target,
        grid: &TimeGrid,
        n: usize,
        streams: &Streams,
    ) -> Result<Initial> {
        target.sample_initial(grid, n, streams)
    }

    /// Moves `population` over one step and writes the log-weight increments `Δℓ`.
    fn advance(
        &mut self,
        ctx: &StepContext<'_>,
        population: &mut Population,
        weights: &LogWeights,
        increments: ArrayViewMut1<f64>,
    ) -> Result<StepStats>;
}
