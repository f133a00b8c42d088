//! Many-chain Metropolis-adjusted Langevin sampling (MALA) of a target π known through an
//! unnormalised log-density and its gradient, with split-R̂ and bulk-ESS diagnostics, and
//! its replica-exchange (parallel-tempering) extension for multimodal targets.
//!
//! One iteration moves every chain x by the preconditioned Langevin proposal
//!
//! ```text
//! y = x + (h²/2) D ∇log π(x) + h D^{1/2} ξ,      ξ ~ N(0, I_d),
//! ```
//!
//! and accepts it with probability min(1, α),
//! `log α = log π(y) − log π(x) + log q(x | y) − log q(y | x)`, where
//! `log q(y | x) = −|D^{−1/2}(y − x − (h²/2) D ∇log π(x))|² / (2h²)` up to a constant that
//! cancels. D is a diagonal inverse metric (a variance estimate; the identity when metric
//! adaptation is off) and h one step size shared by all chains.
//!
//! Warm-up follows Stan's windowed scheme: a fast interval adapts h only; a run of slow
//! windows, each twice as long as the previous, ends with D set to the pooled (over chains
//! and the window's iterations) variance of the positions; a final fast interval adapts h to
//! the last D. The step size adapts by Nesterov dual averaging on log h (Hoffman & Gelman
//! 2014, Alg. 5), driven by the acceptance probability averaged over chains, and is frozen at
//! its averaged iterate when warm-up ends.
//!
//! Every random number of iteration `t` and chain `c` comes from
//! `Streams::new(seed).rng(Purpose::Reference, t, c)`, and every reduction over chains runs
//! sequentially in chain order, so a run is bit-identical on any number of threads.
//!
//! # Replica exchange through an exact base law
//!
//! MALA chains never cross between well-separated modes. [`tempered_mala`] bridges the
//! target q̃ to a base law b that can be sampled exactly ([`BaseLaw`]) through the ladder
//! `0 = λ_0 < λ_1 < … < λ_{L−1} = 1`,
//!
//! ```text
//! π_λ(x) ∝ b(x)^{1−λ} q̃(x)^λ = b(x) e^{λ ℓ(x)},      ℓ = log q̃ − log b,
//! ```
//!
//! and runs, per chain, one replica of each level. An iteration (i) redraws level 0 exactly
//! from b (an independent proposal that is always accepted), (ii) moves every level l ≥ 1
//! by one MALA step on `log π_{λ_l} = (1 − λ_l) log b + λ_l log q̃` with its own step size
//! and metric, and (iii) proposes to exchange the states of the adjacent levels (l, l + 1)
//! with l even on even iterations and l odd on odd ones (the deterministic even–odd scheme
//! of Okabe et al. 2001), accepting with probability
//! `min(1, exp((λ_{l+1} − λ_l)(ℓ(x_l) − ℓ(x_{l+1}))))`. Each of (i)–(iii) leaves the
//! product `Π_l π_{λ_l}` invariant, so the cold level λ = 1 samples q̃, and a state reaches
//! another mode by travelling down to level 0 and back. The replica of level l of chain c
//! is row `c · L + l` everywhere, and its random numbers at iteration t come from the
//! stream `(Purpose::Reference, t, c · L + l)`.
//!
//! Convergence is reported by [`split_rhat`] (Gelman et al., BDA3 §11.4) and [`ess_bulk`]
//! (Vehtari et al. 2021: Geyer's initial monotone sequence on rank-normalised split chains).

use ndarray::{
    Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, Axis,
    Slice, Zip,
};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::rng::{KeyedStreams, Purpose, Streams};

/// Streams pack the replica into 32 bits and the iteration into the other 32.
const STREAM_LIMIT: usize = u32::MAX as usize;

/// Unnormalised log-density log π(x) + const of a target on ℝ^d, with its exact gradient.
///
/// Evaluated on a batch: `x` is n × d (one row per chain), `log_density` has length n and
/// `gradient` is n × d; row i of the outputs belongs to row i of `x`. Implementations should
/// parallelise over rows themselves and must compute each row independently of the others
/// (so that results do not depend on the thread count). A point outside the support may
/// report a non-finite log-density; the sampler then rejects it.
pub trait LogDensity: Sync {
    /// Dimension d of the state space.
    fn dim(&self) -> usize;

    /// Writes log π(x_i) + const into `log_density[i]` and ∇log π(x_i) into `gradient.row(i)`.
    fn log_density_and_gradient(
        &self,
        x: ArrayView2<f64>,
        log_density: ArrayViewMut1<f64>,
        gradient: ArrayViewMut2<f64>,
    );
}

/// Settings of a many-chain MALA run ([`mala`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MalaConfig {
    /// Number of chains run in lockstep (the rows of `init`); at least 1.
    pub chains: usize,
    /// Warm-up iterations per chain, discarded; the step size (and the metric) adapt here.
    pub warmup: usize,
    /// Draws kept per chain after warm-up; at least 4, so split-R̂ has two draws per half.
    pub samples_per_chain: usize,
    /// One iteration in `thin` is kept after warm-up; at least 1.
    pub thin: usize,
    /// Step size h at the start of warm-up (and throughout when `warmup == 0`); finite, > 0.
    pub initial_step_size: f64,
    /// Mean Metropolis acceptance probability that warm-up aims for; in (0, 1).
    pub target_acceptance: f64,
    /// Whether warm-up estimates the diagonal inverse metric D (pooled variances); when off,
    /// or when `warmup < 20`, D is the identity.
    pub adapt_metric: bool,
}

impl MalaConfig {
    /// A configuration with the documented defaults for everything but the run length:
    /// `thin = 1`, `initial_step_size = 0.1`, `target_acceptance = 0.574` (the optimal
    /// MALA acceptance rate of Roberts & Rosenthal 1998) and `adapt_metric = true`.
    pub fn new(chains: usize, warmup: usize, samples_per_chain: usize) -> Self {
        MalaConfig {
            chains,
            warmup,
            samples_per_chain,
            thin: 1,
            initial_step_size: 0.1,
            target_acceptance: 0.574,
            adapt_metric: true,
        }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<()> {
        if self.chains == 0 || self.chains > STREAM_LIMIT {
            return Err(Error::invalid("chains", "must be in 1..=2^32-1"));
        }
        validate_schedule(
            self.warmup,
            self.samples_per_chain,
            self.thin,
            self.initial_step_size,
            self.target_acceptance,
        )
    }
}

/// Checks the run length, the thinning and the step-size settings shared by [`MalaConfig`]
/// and [`TemperingConfig`]; the error names the first invalid field.
fn validate_schedule(
    warmup: usize,
    samples_per_chain: usize,
    thin: usize,
    initial_step_size: f64,
    target_acceptance: f64,
) -> Result<()> {
    if samples_per_chain < 4 {
        return Err(Error::invalid(
            "samples_per_chain",
            "must be at least 4 (split-R̂ needs two draws per half-chain)",
        ));
    }
    if thin == 0 {
        return Err(Error::invalid("thin", "must be at least 1"));
    }
    let iterations = samples_per_chain
        .checked_mul(thin)
        .and_then(|n| n.checked_add(warmup));
    if iterations.is_none_or(|n| n > STREAM_LIMIT) {
        return Err(Error::invalid(
            "warmup",
            "warmup + samples_per_chain × thin must be below 2^32",
        ));
    }
    if !(initial_step_size.is_finite() && initial_step_size > 0.0) {
        return Err(Error::invalid(
            "initial_step_size",
            format!("must be finite and positive, got {initial_step_size}"),
        ));
    }
    if !(target_acceptance > 0.0 && target_acceptance < 1.0) {
        return Err(Error::invalid(
            "target_acceptance",
            format!("must lie in (0, 1), got {target_acceptance}"),
        ));
    }
    Ok(())
}

/// Draws of a MALA run and their convergence diagnostics.
#[derive(Clone, Debug)]
pub struct MalaOutput {
    /// Kept draws, (chains · draws_per_chain) × d, chain-major: row `c · draws_per_chain + k`
    /// is the k-th kept draw of chain c.
    pub samples: Array2<f64>,
    /// Number of chains.
    pub chains: usize,
    /// Kept draws per chain (`samples_per_chain`).
    pub draws_per_chain: usize,
    /// Step size h used after warm-up.
    pub step_size: f64,
    /// Diagonal inverse metric D used after warm-up (length d; ones without adaptation).
    pub inverse_metric: Array1<f64>,
    /// Fraction of post-warm-up proposals accepted, over all chains and iterations.
    pub acceptance_rate: f64,
    /// Split-R̂ per coordinate ([`split_rhat`]).
    pub split_rhat: Array1<f64>,
    /// Largest split-R̂ over coordinates (NaN if any is NaN).
    pub max_split_rhat: f64,
    /// Bulk effective sample size per coordinate ([`ess_bulk`]).
    pub ess_bulk: Array1<f64>,
    /// Smallest bulk ESS over coordinates (NaN if any is NaN).
    pub min_ess_bulk: f64,
}

impl MalaOutput {
    /// The kept draws as a chain × draw × d view (the layout of [`split_rhat`]).
    pub fn draws(&self) -> ArrayView3<'_, f64> {
        let d = self.samples.ncols();
        self.samples
            .view()
            .into_shape_with_order((self.chains, self.draws_per_chain, d))
            .expect("samples are a standard-layout (chains · draws) × d array")
    }

    /// Diagnoses `draws` (chains × kept × d) and packs them, chain-major, with the kernel
    /// that produced them.
    fn from_draws(draws: Array3<f64>, kernel: Kernel, acceptance_rate: f64) -> Self {
        let (chains, kept, d) = draws.dim();
        let split_rhat = split_rhat(draws.view());
        let ess_bulk = ess_bulk(draws.view());
        MalaOutput {
            samples: draws
                .into_shape_with_order((chains * kept, d))
                .expect("a standard-layout array reshapes"),
            chains,
            draws_per_chain: kept,
            step_size: kernel.step_size,
            inverse_metric: kernel.inverse_metric,
            acceptance_rate,
            max_split_rhat: nan_fold(&split_rhat, f64::max),
            split_rhat,
            min_ess_bulk: nan_fold(&ess_bulk, f64::min),
            ess_bulk,
        }
    }
}

/// Runs `config.chains` MALA chains from the rows of `init` (chains × d) and returns the
/// kept draws with split-R̂, bulk ESS, the final step size and the acceptance rate.
///
/// Errors: an invalid `config` ([`MalaConfig::validate`]); `init` not chains × `target.dim()`
/// ([`Error::Dimension`]); a non-finite log-density or gradient at an initial point
/// ([`Error::NonFinite`] with step 0 and the chain). A non-finite proposal is rejected.
pub fn mala(
    target: &impl LogDensity,
    init: Array2<f64>,
    config: &MalaConfig,
    seed: u64,
) -> Result<MalaOutput> {
    config.validate()?;
    check_init(target, &init, config.chains)?;
    let streams = Streams::new(seed).keyed(Purpose::Reference);
    let mut sampler = Sampler::new(target, init, config.initial_step_size)?;

    warm_up(&mut sampler, target, &streams, config);

    let (chains, kept, d) = (config.chains, config.samples_per_chain, target.dim());
    let mut draws = Array3::<f64>::zeros((chains, kept, d));
    let mut accepted = 0usize;
    for k in 0..kept {
        for j in 0..config.thin {
            let iteration = config.warmup + k * config.thin + j;
            accepted += sampler.step(target, &streams, iteration).accepted;
        }
        draws
            .index_axis_mut(Axis(1), k)
            .assign(&sampler.current.position);
    }
    let proposals = (chains * kept * config.thin) as f64;
    Ok(MalaOutput::from_draws(
        draws,
        sampler.kernel,
        accepted as f64 / proposals,
    ))
}

/// Checks that `init` is chains × target.dim().
fn check_init(target: &impl LogDensity, init: &Array2<f64>, chains: usize) -> Result<()> {
    if init.nrows() != chains {
        return Err(Error::Dimension {
            context: "MALA initial points (rows = chains)".into(),
            expected: chains,
            found: init.nrows(),
        });
    }
    if init.ncols() != target.dim() {
        return Err(Error::Dimension {
            context: "MALA initial points (columns = target dimension)".into(),
            expected: target.dim(),
            found: init.ncols(),
        });
    }
    Ok(())
}

/// Warm-up: dual averaging of h throughout, metric updates at the end of each slow window,
/// then h frozen at its averaged iterate.
fn warm_up(
    sampler: &mut Sampler,
    target: &impl LogDensity,
    streams: &KeyedStreams,
    config: &MalaConfig,
) {
    if config.warmup == 0 {
        return;
    }
    let mut adaptation = KernelAdaptation::new(
        std::slice::from_ref(&sampler.kernel),
        config.warmup,
        config.adapt_metric,
        config.target_acceptance,
    );
    for iteration in 0..config.warmup {
        let stats = sampler.step(target, streams, iteration);
        let position = &sampler.current.position;
        adaptation.update(
            iteration,
            std::slice::from_mut(&mut sampler.kernel),
            &[stats.mean_acceptance_probability],
            |_| position.view(),
        );
    }
    adaptation.finish(std::slice::from_mut(&mut sampler.kernel));
}

/// Warm-up adaptation of one or more Langevin kernels run in lockstep: each step size by
/// dual averaging on its own mean acceptance probability, each diagonal inverse metric at the
/// end of every slow window of the shared [`WarmupPlan`], from the pooled variance of the
/// chains that kernel moves.
struct KernelAdaptation {
    plan: WarmupPlan,
    step_size: Vec<DualAveraging>,
    variance: Vec<PooledVariance>,
    window: usize,
}

impl KernelAdaptation {
    fn new(kernels: &[Kernel], warmup: usize, adapt_metric: bool, target_acceptance: f64) -> Self {
        KernelAdaptation {
            plan: WarmupPlan::new(warmup, adapt_metric),
            step_size: kernels
                .iter()
                .map(|k| DualAveraging::new(k.step_size, target_acceptance))
                .collect(),
            variance: kernels
                .iter()
                .map(|k| PooledVariance::new(k.inverse_metric.len()))
                .collect(),
            window: 0,
        }
    }

    /// After warm-up iteration `iteration`, in which kernel k had mean acceptance probability
    /// `acceptance[k]` and leaves its chains at `positions(k)`.
    fn update<'a>(
        &mut self,
        iteration: usize,
        kernels: &mut [Kernel],
        acceptance: &[f64],
        positions: impl Fn(usize) -> ArrayView2<'a, f64>,
    ) {
        for ((kernel, adapter), &probability) in
            kernels.iter_mut().zip(&mut self.step_size).zip(acceptance)
        {
            adapter.update(probability);
            kernel.step_size = adapter.step_size();
        }
        if iteration < self.plan.slow_start || self.window == self.plan.window_ends.len() {
            return;
        }
        for (k, variance) in self.variance.iter_mut().enumerate() {
            variance.add_rows(positions(k));
        }
        if iteration + 1 == self.plan.window_ends[self.window] {
            for ((kernel, adapter), variance) in kernels
                .iter_mut()
                .zip(&mut self.step_size)
                .zip(&mut self.variance)
            {
                kernel.set_inverse_metric(variance.regularized());
                adapter.restart(kernel.step_size);
                variance.reset();
            }
            self.window += 1;
        }
    }

    /// Restarts dual averaging from the current step sizes (after the targets moved).
    fn restart(&mut self, kernels: &[Kernel]) {
        for (kernel, adapter) in kernels.iter().zip(&mut self.step_size) {
            adapter.restart(kernel.step_size);
        }
    }

    /// Freezes every step size at its averaged iterate.
    fn finish(&self, kernels: &mut [Kernel]) {
        for (kernel, adapter) in kernels.iter_mut().zip(&self.step_size) {
            kernel.step_size = adapter.averaged_step_size();
        }
    }
}
/// Stan's warm-up schedule: the slow windows start at `slow_start` and end (exclusively) at
/// each of `window_ends`; the remaining iterations form the terminal fast interval.
struct WarmupPlan {
    slow_start: usize,
    window_ends: Vec<usize>,
}

impl WarmupPlan {
    /// Stan's defaults (initial buffer 75, first window 25, terminal buffer 50), shrunk to
    /// 15% / 75% / 10% of the warm-up when it is shorter than 150; no metric windows at all
    /// below 20 iterations or when metric adaptation is off.
    fn new(warmup: usize, adapt_metric: bool) -> Self {
        const INIT_BUFFER: usize = 75;
        const BASE_WINDOW: usize = 25;
        const TERM_BUFFER: usize = 50;
        if !adapt_metric || warmup < 20 {
            return WarmupPlan {
                slow_start: warmup,
                window_ends: Vec::new(),
            };
        }
        let (init, mut size, term) = if INIT_BUFFER + BASE_WINDOW + TERM_BUFFER > warmup {
            let (init, term) = (warmup * 15 / 100, warmup / 10);
            (init, warmup - init - term, term)
        } else {
            (INIT_BUFFER, BASE_WINDOW, TERM_BUFFER)
        };
        let slow_end = warmup - term;
        let mut window_ends = Vec::new();
        let mut start = init;
        loop {
            // A window that would leave less than twice its successor's length is stretched
            // to the end of the slow phase.
            let mut end = start + size;
            if end + 2 * size > slow_end {
                end = slow_end;
            }
            window_ends.push(end);
            if end == slow_end {
                break;
            }
            start = end;
            size *= 2;
        }
        WarmupPlan {
            slow_start: init,
            window_ends,
        }
    }
}

/// Nesterov dual averaging of log h towards a target mean acceptance probability δ
/// (Hoffman & Gelman 2014, Alg. 5, with γ = 0.05, t₀ = 10, κ = 0.75, μ = log 10h₀).
struct DualAveraging {
    target: f64,
    mu: f64,
    iteration: f64,
    error_average: f64,
    log_step: f64,
    log_step_average: f64,
}

impl DualAveraging {
    const GAMMA: f64 = 0.05;
    const T0: f64 = 10.0;
    const KAPPA: f64 = 0.75;
    /// |log h| is kept below this, so that h stays a finite, non-zero float.
    const LOG_STEP_BOUND: f64 = 200.0;

    fn new(step_size: f64, target: f64) -> Self {
        let mut adapter = DualAveraging {
            target,
            mu: 0.0,
            iteration: 0.0,
            error_average: 0.0,
            log_step: 0.0,
            log_step_average: 0.0,
        };
        adapter.restart(step_size);
        adapter
    }

    /// Starts afresh from `step_size` (after the metric changed).
    fn restart(&mut self, step_size: f64) {
        self.mu = (10.0 * step_size).ln();
        self.iteration = 0.0;
        self.error_average = 0.0;
        self.log_step = step_size.ln();
        self.log_step_average = 0.0;
    }

    fn update(&mut self, acceptance_probability: f64) {
        self.iteration += 1.0;
        let t = self.iteration;
        let weight = 1.0 / (t + Self::T0);
        self.error_average =
            (1.0 - weight) * self.error_average + weight * (self.target - acceptance_probability);
        self.log_step = (self.mu - t.sqrt() / Self::GAMMA * self.error_average)
            .clamp(-Self::LOG_STEP_BOUND, Self::LOG_STEP_BOUND);
        let eta = t.powf(-Self::KAPPA);
        self.log_step_average = eta * self.log_step + (1.0 - eta) * self.log_step_average;
    }

    fn step_size(&self) -> f64 {
        self.log_step.exp()
    }

    fn averaged_step_size(&self) -> f64 {
        if self.iteration == 0.0 {
            self.step_size()
        } else {
            self.log_step_average.exp()
        }
    }
}

/// Welford mean and sum of squared deviations per coordinate, pooled over chains.
struct PooledVariance {
    count: f64,
    mean: Array1<f64>,
    sum_squares: Array1<f64>,
}

impl PooledVariance {
    fn new(d: usize) -> Self {
        PooledVariance {
            count: 0.0,
            mean: Array1::zeros(d),
            sum_squares: Array1::zeros(d),
        }
    }

    fn reset(&mut self) {
        self.count = 0.0;
        self.mean.fill(0.0);
        self.sum_squares.fill(0.0);
    }

    /// Adds every row of `x` (chains in order, so the result is thread-independent).
    fn add_rows(&mut self, x: ArrayView2<f64>) {
        for row in x.rows() {
            self.count += 1.0;
            let n = self.count;
            Zip::from(&mut self.mean)
                .and(&mut self.sum_squares)
                .and(&row)
                .for_each(|mean, sum_squares, &value| {
                    let delta = value - *mean;
                    *mean += delta / n;
                    *sum_squares += delta * (value - *mean);
                });
        }
    }

    /// Sample variance shrunk towards 10⁻³ with weight 5/(n + 5), as Stan does, so that a
    /// short or stuck window cannot produce a zero metric.
    fn regularized(&self) -> Array1<f64> {
        let n = self.count;
        let shrink = n / (n + 5.0);
        self.sum_squares
            .mapv(|ss| shrink * ss / (n - 1.0).max(1.0) + 1e-3 * (1.0 - shrink))
    }
}

/// Positions of all chains with their log-densities and gradients.
struct Batch {
    position: Array2<f64>,
    log_density: Array1<f64>,
    gradient: Array2<f64>,
}

impl Batch {
    fn new(position: Array2<f64>) -> Self {
        let (n, d) = position.dim();
        Batch {
            position,
            log_density: Array1::zeros(n),
            gradient: Array2::zeros((n, d)),
        }
    }

    fn evaluate(&mut self, target: &impl LogDensity) {
        target.log_density_and_gradient(
            self.position.view(),
            self.log_density.view_mut(),
            self.gradient.view_mut(),
        );
    }
}

/// What one iteration reports to warm-up and to the acceptance count.
struct StepStats {
    mean_acceptance_probability: f64,
    accepted: usize,
}

/// Step size h and diagonal inverse metric D of one preconditioned Langevin proposal.
#[derive(Clone, Debug)]
struct Kernel {
    step_size: f64,
    inverse_metric: Array1<f64>,
    /// √D, elementwise.
    metric_scale: Array1<f64>,
}

impl Kernel {
    /// Step size h with the identity metric on ℝ^d.
    fn new(step_size: f64, d: usize) -> Self {
        Kernel {
            step_size,
            inverse_metric: Array1::ones(d),
            metric_scale: Array1::ones(d),
        }
    }

    /// Installs a new inverse metric D, rescaling h so that the geometric mean of the
    /// per-coordinate proposal scales h √D_i is unchanged.
    fn set_inverse_metric(&mut self, inverse_metric: Array1<f64>) {
        let log_ratio = Zip::from(&self.inverse_metric)
            .and(&inverse_metric)
            .fold(0.0, |acc, &old, &new| acc + (old / new).ln());
        let d = inverse_metric.len().max(1) as f64;
        self.step_size *= (0.5 * log_ratio / d).exp();
        self.metric_scale = inverse_metric.mapv(f64::sqrt);
        self.inverse_metric = inverse_metric;
    }

    /// Writes y = x + (h²/2) D ∇log π(x) + h √D ξ with ξ ~ N(0, I) from `rng`, and returns
    /// −½|ξ|² = log q(y|x) + const.
    fn propose(
        &self,
        x: ArrayView1<f64>,
        gradient: ArrayView1<f64>,
        mut y: ArrayViewMut1<f64>,
        rng: &mut ChaCha8Rng,
    ) -> f64 {
        let h = self.step_size;
        let drift = 0.5 * h * h;
        let (metric, scale) = (&self.inverse_metric, &self.metric_scale);
        let mut squares = 0.0;
        for i in 0..y.len() {
            let xi: f64 = rng.sample(StandardNormal);
            squares += xi * xi;
            y[i] = x[i] + drift * metric[i] * gradient[i] + h * scale[i] * xi;
        }
        -0.5 * squares
    }

    /// log α = log π(y) − log π(x) + log q(x|y) − log q(y|x), given
    /// `log_forward` = log q(y|x) + const from [`Kernel::propose`]; −∞ for a non-finite
    /// proposal.
    fn log_acceptance_ratio(
        &self,
        x: ArrayView1<f64>,
        y: ArrayView1<f64>,
        gradient_y: ArrayView1<f64>,
        log_pi_y: f64,
        log_pi_x: f64,
        log_forward: f64,
    ) -> f64 {
        if !log_pi_y.is_finite() || gradient_y.iter().any(|g| !g.is_finite()) {
            return f64::NEG_INFINITY;
        }
        let h = self.step_size;
        let (drift, variance) = (0.5 * h * h, h * h);
        let metric = &self.inverse_metric;
        let mut reverse = 0.0;
        for i in 0..x.len() {
            let r = x[i] - y[i] - drift * metric[i] * gradient_y[i];
            reverse += r * r / (variance * metric[i]);
        }
        log_pi_y - log_pi_x - 0.5 * reverse - log_forward
    }
}

/// log U for U uniform on [0, 1): 1 − U lies in (0, 1], so the logarithm is finite.
fn log_uniform(rng: &mut ChaCha8Rng) -> f64 {
    (1.0 - rng.random::<f64>()).ln()
}

/// min(1, α) from log α; a NaN ratio (which always rejects) counts as 0.
fn acceptance_probability(log_ratio: f64) -> f64 {
    if log_ratio.is_nan() {
        0.0
    } else {
        log_ratio.min(0.0).exp()
    }
}

/// Copies row i of `from` into row i of `to` wherever `accept[i]`.
fn copy_accepted_rows(to: &mut Array2<f64>, from: &Array2<f64>, accept: &Array1<bool>) {
    Zip::from(to.rows_mut())
        .and(from.rows())
        .and(accept)
        .par_for_each(|mut to, from, &accept| {
            if accept {
                to.assign(&from);
            }
        });
}

/// The chains' state plus the preallocated proposal buffers of one iteration.
struct Sampler {
    current: Batch,
    proposal: Batch,
    /// −½|ξ|² after the proposal, then log α after the Metropolis–Hastings ratio.
    log_ratio: Array1<f64>,
    log_uniform: Array1<f64>,
    accept: Array1<bool>,
    kernel: Kernel,
}

impl Sampler {
    /// Evaluates the initial points; any non-finite value there is an error.
    fn new(target: &impl LogDensity, init: Array2<f64>, step_size: f64) -> Result<Self> {
        let (chains, d) = init.dim();
        let mut current = Batch::new(init);
        current.evaluate(target);
        let bad = (0..chains).find(|&c| {
            !current.log_density[c].is_finite()
                || current.gradient.row(c).iter().any(|g| !g.is_finite())
        });
        if let Some(particle) = bad {
            return Err(Error::NonFinite {
                step: 0,
                what: "initial log-density or gradient",
                particle,
            });
        }
        Ok(Sampler {
            proposal: Batch::new(current.position.clone()),
            current,
            log_ratio: Array1::zeros(chains),
            log_uniform: Array1::zeros(chains),
            accept: Array1::from_elem(chains, false),
            kernel: Kernel::new(step_size, d),
        })
    }

    /// One MALA iteration of every chain: propose, evaluate, accept or reject.
    fn step(
        &mut self,
        target: &impl LogDensity,
        streams: &KeyedStreams,
        iteration: usize,
    ) -> StepStats {
        self.propose(streams, iteration);
        self.proposal.evaluate(target);
        self.log_acceptance_ratio();
        self.accept_or_reject()
    }

    /// Langevin proposals of every chain; stores log q(y|x) + const and log U.
    fn propose(&mut self, streams: &KeyedStreams, iteration: usize) {
        let kernel = &self.kernel;
        Zip::indexed(&mut self.log_ratio)
            .and(&mut self.log_uniform)
            .and(self.proposal.position.rows_mut())
            .and(self.current.position.rows())
            .and(self.current.gradient.rows())
            .par_for_each(|chain, log_forward, log_u, y, x, gradient| {
                let mut rng = streams.rng(iteration, chain);
                *log_forward = kernel.propose(x, gradient, y, &mut rng);
                *log_u = log_uniform(&mut rng);
            });
    }

    /// log α of every chain ([`Kernel::log_acceptance_ratio`]).
    fn log_acceptance_ratio(&mut self) {
        let kernel = &self.kernel;
        Zip::from(&mut self.log_ratio)
            .and(self.proposal.position.rows())
            .and(self.current.position.rows())
            .and(self.proposal.gradient.rows())
            .and(&self.proposal.log_density)
            .and(&self.current.log_density)
            .par_for_each(|log_ratio, y, x, gradient_y, &log_pi_y, &log_pi_x| {
                *log_ratio =
                    kernel.log_acceptance_ratio(x, y, gradient_y, log_pi_y, log_pi_x, *log_ratio);
            });
    }

    /// Accepts chain c when log U_c < log α_c (a NaN ratio rejects) and copies its proposal.
    fn accept_or_reject(&mut self) -> StepStats {
        let mut probability_sum = 0.0;
        let mut accepted = 0;
        for c in 0..self.accept.len() {
            let log_ratio = self.log_ratio[c];
            probability_sum += acceptance_probability(log_ratio);
            let accept = self.log_uniform[c] < log_ratio;
            self.accept[c] = accept;
            if accept {
                self.current.log_density[c] = self.proposal.log_density[c];
                accepted += 1;
            }
        }
        copy_accepted_rows(
            &mut self.current.position,
            &self.proposal.position,
            &self.accept,
        );
        copy_accepted_rows(
            &mut self.current.gradient,
            &self.proposal.gradient,
            &self.accept,
        );
        StepStats {
            mean_acceptance_probability: probability_sum / self.accept.len() as f64,
            accepted,
        }
    }
}

/// A tractable base law b on ℝ^d: exact draws, and log b(x) + const with its gradient
/// through [`LogDensity`].
///
/// It is the hottest level (λ = 0) of [`tempered_mala`], where every iteration draws a
/// fresh state from it. A law that covers every mode of the target (for a product of
/// mixtures, e.g. the first expert's mixture, or a widened copy of it) keeps the swaps
/// between adjacent levels frequent.
pub trait BaseLaw: LogDensity {
    /// Overwrites `row` (length d) with an exact draw from b, using only `rng`.
    fn sample(&self, row: ArrayViewMut1<f64>, rng: &mut ChaCha8Rng);
}

/// Settings of a replica-exchange MALA run ([`tempered_mala`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TemperingConfig {
    /// Number of independent replica ensembles (chains); at least 1, and
    /// `chains · levels ≤ 2^32 − 1` (one random stream per replica).
    pub chains: usize,
    /// Ladder size L: levels λ_0 = 0 < … < λ_{L−1} = 1 per chain; at least 2.
    pub levels: usize,
    /// Warm-up iterations, discarded; step sizes, metrics and the ladder adapt here.
    pub warmup: usize,
    /// Cold-level draws kept per chain after warm-up; at least 4.
    pub samples_per_chain: usize,
    /// One iteration in `thin` is kept after warm-up; at least 1.
    pub thin: usize,
    /// Step size h of every level at the start of warm-up (and throughout when
    /// `warmup == 0`); finite, > 0.
    pub initial_step_size: f64,
    /// Mean Metropolis acceptance probability that warm-up aims for at each level; in (0, 1).
    pub target_acceptance: f64,
    /// Whether warm-up estimates a diagonal inverse metric per level (as [`MalaConfig`]).
    pub adapt_metric: bool,
    /// Whether the first half of warm-up moves the interior levels λ_1 … λ_{L−2} towards
    /// equal swap acceptance in every adjacent pair; when off the ladder stays at its start
    /// λ_l = (l / (L − 1))².
    pub adapt_ladder: bool,
}

impl TemperingConfig {
    /// A configuration with the defaults of [`MalaConfig::new`] (`thin = 1`,
    /// `initial_step_size = 0.1`, `target_acceptance = 0.574`, `adapt_metric = true`) and
    /// `adapt_ladder = true`.
    pub fn new(chains: usize, levels: usize, warmup: usize, samples_per_chain: usize) -> Self {
        TemperingConfig {
            chains,
            levels,
            warmup,
            samples_per_chain,
            thin: 1,
            initial_step_size: 0.1,
            target_acceptance: 0.574,
            adapt_metric: true,
            adapt_ladder: true,
        }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<()> {
        if self.chains == 0 {
            return Err(Error::invalid("chains", "must be at least 1"));
        }
        if self.levels < 2 {
            return Err(Error::invalid(
                "levels",
                format!(
                    "must be at least 2 (the base λ = 0 and the target λ = 1), got {}",
                    self.levels
                ),
            ));
        }
        if self
            .chains
            .checked_mul(self.levels)
            .is_none_or(|n| n > STREAM_LIMIT)
        {
            return Err(Error::invalid(
                "chains",
                "chains × levels must be at most 2^32 − 1 (one random stream per replica)",
            ));
        }
        validate_schedule(
            self.warmup,
            self.samples_per_chain,
            self.thin,
            self.initial_step_size,
            self.target_acceptance,
        )
    }
}

/// Cold-level draws of a replica-exchange run, their diagnostics, and the ladder's state.
#[derive(Clone, Debug)]
pub struct TemperingOutput {
    /// Draws of the cold level λ = 1 (which samples q̃), chain-major, with split-R̂ and
    /// bulk ESS across chains; its `step_size`, `inverse_metric` and `acceptance_rate` are
    /// those of the cold level.
    pub cold: MalaOutput,
    /// Ladder λ_0 = 0 < … < λ_{L−1} = 1 used after warm-up.
    pub ladder: Array1<f64>,
    /// Step size per level after warm-up; NaN at level 0, which draws exactly from b.
    pub step_sizes: Array1<f64>,
    /// Diagonal inverse metric per level after warm-up, L × d (ones at level 0).
    pub inverse_metrics: Array2<f64>,
    /// Post-warm-up fraction of accepted moves per level (1 at level 0).
    pub acceptance_rates: Array1<f64>,
    /// Post-warm-up fraction of accepted exchanges between levels l and l + 1, length L − 1.
    pub swap_acceptance_rates: Array1<f64>,
}

/// Runs `config.chains` replica-exchange ensembles bridging the base law b (λ = 0) to the
/// target q̃ (λ = 1) and returns the cold-level draws (module docs: the scheme).
///
/// Every replica starts from an exact draw of b (stream `(Purpose::Init, 0, c · L + l)`).
/// Errors: an invalid `config` ([`TemperingConfig::validate`]); `base.dim() != target.dim()`
/// ([`Error::Dimension`]); a non-finite tempered log-density or gradient at the start of a
/// level l ≥ 1, e.g. a base draw outside the target's support ([`Error::NonFinite`] with
/// step 0 and the replica `c · L + l`). A non-finite proposal is rejected, and so is an
/// exchange with a non-finite or NaN ratio.
pub fn tempered_mala(
    target: &impl LogDensity,
    base: &impl BaseLaw,
    config: &TemperingConfig,
    seed: u64,
) -> Result<TemperingOutput> {
    config.validate()?;
    if base.dim() != target.dim() {
        return Err(Error::Dimension {
            context: "tempering base law (dimension = target dimension)".into(),
            expected: target.dim(),
            found: base.dim(),
        });
    }
    let streams = Streams::new(seed);
    let (chains, levels) = (config.chains, config.levels);
    let init = replica_init(base, chains * levels, &streams);
    let mut sampler = TemperedSampler::new(target, base, init, config)?;
    let streams = streams.keyed(Purpose::Reference);

    tempered_warm_up(&mut sampler, target, base, &streams, config);

    let (kept, d) = (config.samples_per_chain, target.dim());
    let mut draws = Array3::<f64>::zeros((chains, kept, d));
    let mut tally = SwapTally::new(levels);
    for k in 0..kept {
        for j in 0..config.thin {
            let iteration = config.warmup + k * config.thin + j;
            sampler.step(target, base, &streams, iteration);
            tally.add(&sampler.stats, iteration, chains);
        }
        draws
            .index_axis_mut(Axis(1), k)
            .assign(&sampler.level_positions(levels - 1));
    }
    let moves = (chains * kept * config.thin) as f64;
    let acceptance_rates = tally.accepted.mapv(|a| a as f64 / moves);
    let swap_acceptance_rates = Zip::from(&tally.swap_accepted)
        .and(&tally.swap_proposed)
        .map_collect(|&a, &n| a as f64 / n as f64);
    let mut inverse_metrics = Array2::ones((levels, d));
    for (l, kernel) in sampler.kernels.iter().enumerate().skip(1) {
        inverse_metrics.row_mut(l).assign(&kernel.inverse_metric);
    }
    let step_sizes = Array1::from_shape_fn(levels, |l| {
        if l == 0 {
            f64::NAN
        } else {
            sampler.kernels[l].step_size
        }
    });
    let cold_kernel = sampler.kernels.swap_remove(levels - 1);
    Ok(TemperingOutput {
        cold: MalaOutput::from_draws(draws, cold_kernel, acceptance_rates[levels - 1]),
        ladder: Array1::from(sampler.ladder),
        step_sizes,
        inverse_metrics,
        acceptance_rates,
        swap_acceptance_rates,
    })
}

/// Exact draws from b for every replica: row r from stream `(Purpose::Init, 0, r)`.
fn replica_init(base: &impl BaseLaw, replicas: usize, streams: &Streams) -> Array2<f64> {
    let keyed = streams.keyed(Purpose::Init);
    let mut init = Array2::zeros((replicas, base.dim()));
    Zip::indexed(init.rows_mut()).par_for_each(|r, row| base.sample(row, &mut keyed.rng(0, r)));
    init
}

/// The ladder's start λ_l = (l / (L − 1))²: denser near the base, where ℓ = log q̃ − log b
/// varies most over the broad draws of b.
fn initial_ladder(levels: usize) -> Vec<f64> {
    let top = (levels - 1) as f64;
    (0..levels).map(|l| (l as f64 / top).powi(2)).collect()
}

/// Warm-up of the replica ensembles: every level's kernel adapts as in [`mala`] (its own
/// dual averaging and metric windows); in the first half, the ladder adapts too
/// ([`LadderAdaptation`]), and once it freezes the step sizes restart their dual averaging
/// from where they are, so that the averaged iterate only remembers the final ladder.
fn tempered_warm_up(
    sampler: &mut TemperedSampler,
    target: &impl LogDensity,
    base: &impl BaseLaw,
    streams: &KeyedStreams,
    config: &TemperingConfig,
) {
    if config.warmup == 0 {
        return;
    }
    let ladder_end = if config.adapt_ladder && config.levels > 2 {
        config.warmup / 2
    } else {
        0
    };
    let mut ladder = LadderAdaptation::new(&sampler.ladder);
    // Level 0 draws exactly from b: only levels 1..L have a kernel to adapt.
    let mut adaptation = KernelAdaptation::new(
        &sampler.kernels[1..],
        config.warmup,
        config.adapt_metric,
        config.target_acceptance,
    );
    for iteration in 0..config.warmup {
        sampler.step(target, base, streams, iteration);
        if iteration < ladder_end {
            ladder.observe(&sampler.stats.swap_probability);
            if iteration % 2 == 1 {
                ladder.update(&mut sampler.ladder);
                sampler.set_ladder();
            }
            if iteration + 1 == ladder_end {
                adaptation.restart(&sampler.kernels[1..]);
            }
        }
        let (position, levels) = (&sampler.current.tempered.position, config.levels);
        adaptation.update(
            iteration,
            &mut sampler.kernels[1..],
            &sampler.stats.acceptance_probability[1..],
            |k| position.slice_axis(Axis(0), Slice::from(k + 1..).step_by(levels as isize)),
        );
    }
    adaptation.finish(&mut sampler.kernels[1..]);
}

/// Stochastic approximation of a ladder with equal swap acceptance in every adjacent pair.
///
/// The gaps are `λ_{l+1} − λ_l = softmax(s)_l`, so λ_0 = 0 and λ_{L−1} = 1 stay fixed and
/// the levels stay ordered. After each even and odd iteration (every pair proposed once),
/// `s_l += γ_k (ᾱ_l − mean_j ᾱ_j)` with ᾱ_l the swap acceptance probability of pair l
/// averaged over chains and `γ_k = (k + 1)^{−0.6}`: a pair that swaps more often than the
/// others widens its gap. Equal acceptance across pairs is the usual heuristic for a fixed
/// number of levels (Kone & Kofke 2005; Miasojedow, Moulines & Vihola 2013 adapt towards a
/// fixed rate instead, which needs a free number of levels).
struct LadderAdaptation {
    log_gaps: Vec<f64>,
    swap_probability: Vec<f64>,
    updates: usize,
}

impl LadderAdaptation {
    fn new(ladder: &[f64]) -> Self {
        LadderAdaptation {
            log_gaps: ladder.windows(2).map(|w| (w[1] - w[0]).ln()).collect(),
            swap_probability: vec![0.0; ladder.len() - 1],
            updates: 0,
        }
    }

    /// Adds one iteration's mean swap acceptance probabilities (0 for pairs not proposed).
    fn observe(&mut self, swap_probability: &[f64]) {
        for (sum, &p) in self.swap_probability.iter_mut().zip(swap_probability) {
            *sum += p;
        }
    }

    /// One Robbins–Monro step on the log-gaps; rewrites the interior of `ladder`.
    fn update(&mut self, ladder: &mut [f64]) {
        let gain = (self.updates as f64 + 1.0).powf(-0.6);
        let mean = self.swap_probability.iter().sum::<f64>() / self.swap_probability.len() as f64;
        for (s, &p) in self.log_gaps.iter_mut().zip(&self.swap_probability) {
            *s += gain * (p - mean);
        }
        self.swap_probability.fill(0.0);
        self.updates += 1;
        let top = self
            .log_gaps
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = self.log_gaps.iter().map(|s| (s - top).exp()).sum();
        let mut lambda = 0.0;
        let last = ladder.len() - 1;
        for (l, s) in self.log_gaps[..last - 1].iter().enumerate() {
            lambda += (s - top).exp() / total;
            ladder[l + 1] = lambda.min(1.0);
        }
        ladder[0] = 0.0;
        ladder[last] = 1.0;
    }
}

/// (1 − λ) log b + λ log q̃ (or the same of gradients), with 0 · ±∞ = 0 at the ends of the
/// ladder, where one of the two laws drops out.
fn bridge(lambda: f64, base: f64, target: f64) -> f64 {
    let weighted = |w: f64, v: f64| if w == 0.0 { 0.0 } else { w * v };
    weighted(1.0 - lambda, base) + weighted(lambda, target)
}

/// Replica states with the two densities they bridge: log q̃ and log b with gradients, and
/// in `tempered` log π_λ and ∇log π_λ at each row's level (row c · L + l is level l of
/// chain c).
struct Replicas {
    tempered: Batch,
    log_target: Array1<f64>,
    target_gradient: Array2<f64>,
    log_base: Array1<f64>,
    base_gradient: Array2<f64>,
}

impl Replicas {
    fn new(position: Array2<f64>) -> Self {
        let (n, d) = position.dim();
        Replicas {
            tempered: Batch::new(position),
            log_target: Array1::zeros(n),
            target_gradient: Array2::zeros((n, d)),
            log_base: Array1::zeros(n),
            base_gradient: Array2::zeros((n, d)),
        }
    }

    /// One batched evaluation of each density over all rows.
    fn evaluate(&mut self, target: &impl LogDensity, base: &impl BaseLaw) {
        let position = self.tempered.position.view();
        target.log_density_and_gradient(
            position,
            self.log_target.view_mut(),
            self.target_gradient.view_mut(),
        );
        base.log_density_and_gradient(
            position,
            self.log_base.view_mut(),
            self.base_gradient.view_mut(),
        );
    }

    /// Recomputes log π_λ and its gradient of every row from `row_lambda[r]`.
    fn temper(&mut self, row_lambda: &Array1<f64>) {
        Zip::from(&mut self.tempered.log_density)
            .and(row_lambda)
            .and(&self.log_base)
            .and(&self.log_target)
            .par_for_each(|value, &lambda, &base, &target| *value = bridge(lambda, base, target));
        Zip::from(self.tempered.gradient.rows_mut())
            .and(row_lambda)
            .and(self.base_gradient.rows())
            .and(self.target_gradient.rows())
            .par_for_each(|mut gradient, &lambda, base, target| {
                Zip::from(&mut gradient)
                    .and(&base)
                    .and(&target)
                    .for_each(|g, &b, &t| *g = bridge(lambda, b, t));
            });
    }

    /// ℓ = log q̃ − log b of row r, the log-ratio that drives the exchanges.
    fn log_ratio(&self, r: usize) -> f64 {
        self.log_target[r] - self.log_base[r]
    }

    /// Copies the accepted rows of `from`.
    fn accept_rows(&mut self, from: &Replicas, accept: &Array1<bool>) {
        for (r, _) in accept.iter().enumerate().filter(|(_, a)| **a) {
            self.tempered.log_density[r] = from.tempered.log_density[r];
            self.log_target[r] = from.log_target[r];
            self.log_base[r] = from.log_base[r];
        }
        let (to, from_tempered) = (&mut self.tempered, &from.tempered);
        copy_accepted_rows(&mut to.position, &from_tempered.position, accept);
        copy_accepted_rows(&mut to.gradient, &from_tempered.gradient, accept);
        copy_accepted_rows(&mut self.target_gradient, &from.target_gradient, accept);
        copy_accepted_rows(&mut self.base_gradient, &from.base_gradient, accept);
    }

    /// Exchanges the states of rows a and b, which sit at levels λ_a and λ_b.
    fn exchange(&mut self, a: usize, b: usize, lambda_a: f64, lambda_b: f64) {
        for matrix in [
            &mut self.tempered.position,
            &mut self.target_gradient,
            &mut self.base_gradient,
        ] {
            for i in 0..matrix.ncols() {
                matrix.swap([a, i], [b, i]);
            }
        }
        self.log_target.swap(a, b);
        self.log_base.swap(a, b);
        for (r, lambda) in [(a, lambda_a), (b, lambda_b)] {
            self.tempered.log_density[r] = bridge(lambda, self.log_base[r], self.log_target[r]);
            for i in 0..self.tempered.gradient.ncols() {
                self.tempered.gradient[[r, i]] = bridge(
                    lambda,
                    self.base_gradient[[r, i]],
                    self.target_gradient[[r, i]],
                );
            }
        }
    }
}

/// What one replica-exchange iteration reports; reduced over chains in chain order.
struct TemperedStats {
    /// Mean over chains of the Metropolis acceptance probability, per level (1 at level 0).
    acceptance_probability: Vec<f64>,
    /// Accepted moves per level.
    accepted: Vec<usize>,
    /// Mean over chains of the exchange acceptance probability per pair (l, l + 1); 0 for
    /// the pairs not proposed in this iteration.
    swap_probability: Vec<f64>,
    /// Accepted exchanges per pair.
    swap_accepted: Vec<usize>,
}

impl TemperedStats {
    fn new(levels: usize) -> Self {
        TemperedStats {
            acceptance_probability: vec![0.0; levels],
            accepted: vec![0; levels],
            swap_probability: vec![0.0; levels - 1],
            swap_accepted: vec![0; levels - 1],
        }
    }
}

/// Post-warm-up counts of accepted moves per level and of proposed and accepted exchanges
/// per pair.
struct SwapTally {
    accepted: Array1<usize>,
    swap_accepted: Array1<usize>,
    swap_proposed: Array1<usize>,
}

impl SwapTally {
    fn new(levels: usize) -> Self {
        SwapTally {
            accepted: Array1::zeros(levels),
            swap_accepted: Array1::zeros(levels - 1),
            swap_proposed: Array1::zeros(levels - 1),
        }
    }

    fn add(&mut self, stats: &TemperedStats, iteration: usize, chains: usize) {
        Zip::from(&mut self.accepted)
            .and(&stats.accepted)
            .for_each(|total, &a| *total += a);
        Zip::indexed(&mut self.swap_accepted)
            .and(&mut self.swap_proposed)
            .and(&stats.swap_accepted)
            .for_each(|l, total, proposed, &a| {
                *total += a;
                if l % 2 == iteration % 2 {
                    *proposed += chains;
                }
            });
    }
}

/// Replica ensembles of all chains (row c · L + l is level l of chain c), the ladder, one
/// Langevin kernel per level, and the preallocated buffers of one iteration.
struct TemperedSampler {
    current: Replicas,
    proposal: Replicas,
    levels: usize,
    ladder: Vec<f64>,
    /// λ of each row's level: `row_lambda[c · L + l] = λ_l`.
    row_lambda: Array1<f64>,
    /// The kernel of level l at index l; index 0 is unused (level 0 draws exactly from b).
    kernels: Vec<Kernel>,
    /// −½|ξ|² after the proposal, then log α after the Metropolis–Hastings ratio.
    log_ratio: Array1<f64>,
    /// Per row: log U of the Metropolis test, then log U of the exchange with the level
    /// above (drawn by every row, used by the lower row of each proposed pair).
    log_uniform: Array2<f64>,
    accept: Array1<bool>,
    stats: TemperedStats,
}

impl TemperedSampler {
    /// Evaluates the initial replicas; a non-finite tempered value at a level l ≥ 1 is an
    /// error (level 0 never uses its own).
    fn new(
        target: &impl LogDensity,
        base: &impl BaseLaw,
        init: Array2<f64>,
        config: &TemperingConfig,
    ) -> Result<Self> {
        let (n, d) = init.dim();
        let levels = config.levels;
        let ladder = initial_ladder(levels);
        let row_lambda = Array1::from_shape_fn(n, |r| ladder[r % levels]);
        let mut current = Replicas::new(init);
        current.evaluate(target, base);
        current.temper(&row_lambda);
        let bad = (0..n).find(|&r| {
            r % levels != 0
                && (!current.tempered.log_density[r].is_finite()
                    || current
                        .tempered
                        .gradient
                        .row(r)
                        .iter()
                        .any(|g| !g.is_finite()))
        });
        if let Some(particle) = bad {
            return Err(Error::NonFinite {
                step: 0,
                what: "initial tempered log-density or gradient (a base draw outside the target's support?)",
                particle,
            });
        }
        Ok(TemperedSampler {
            proposal: Replicas::new(current.tempered.position.clone()),
            current,
            levels,
            ladder,
            row_lambda,
            kernels: vec![Kernel::new(config.initial_step_size, d); levels],
            log_ratio: Array1::zeros(n),
            log_uniform: Array2::zeros((n, 2)),
            accept: Array1::from_elem(n, false),
            stats: TemperedStats::new(levels),
        })
    }

    /// The replicas of level l, chains in order (a strided view).
    fn level_positions(&self, level: usize) -> ArrayView2<'_, f64> {
        self.current
            .tempered
            .position
            .slice_axis(Axis(0), Slice::from(level..).step_by(self.levels as isize))
    }

    /// Installs `self.ladder` (changed by adaptation) in every row's tempered values.
    fn set_ladder(&mut self) {
        let (ladder, levels) = (&self.ladder, self.levels);
        self.row_lambda
            .indexed_iter_mut()
            .for_each(|(r, lambda)| *lambda = ladder[r % levels]);
        self.current.temper(&self.row_lambda);
    }

    /// One iteration: exact redraw of level 0 and MALA moves of the others, then exchanges
    /// between the even (iteration even) or odd (iteration odd) adjacent pairs.
    fn step(
        &mut self,
        target: &impl LogDensity,
        base: &impl BaseLaw,
        streams: &KeyedStreams,
        iteration: usize,
    ) {
        self.propose(base, streams, iteration);
        self.proposal.evaluate(target, base);
        self.proposal.temper(&self.row_lambda);
        self.log_acceptance_ratio();
        self.accept_or_reject();
        self.exchange(iteration % 2);
    }

    /// Level 0: a fresh draw of b. Levels l ≥ 1: a Langevin proposal on log π_{λ_l}. Every
    /// row then draws the log-uniform of its exchange with the level above.
    fn propose(&mut self, base: &impl BaseLaw, streams: &KeyedStreams, iteration: usize) {
        let (kernels, levels) = (&self.kernels, self.levels);
        Zip::indexed(&mut self.log_ratio)
            .and(self.log_uniform.rows_mut())
            .and(self.proposal.tempered.position.rows_mut())
            .and(self.current.tempered.position.rows())
            .and(self.current.tempered.gradient.rows())
            .par_for_each(|row, log_forward, mut log_u, y, x, gradient| {
                let mut rng = streams.rng(iteration, row);
                let level = row % levels;
                if level == 0 {
                    base.sample(y, &mut rng);
                    *log_forward = 0.0;
                    log_u[0] = f64::NEG_INFINITY;
                } else {
                    *log_forward = kernels[level].propose(x, gradient, y, &mut rng);
                    log_u[0] = log_uniform(&mut rng);
                }
                log_u[1] = log_uniform(&mut rng);
            });
    }

    /// log α per row; +∞ at level 0, whose exact draw is an independent proposal from
    /// π_0 = b itself and is always accepted.
    fn log_acceptance_ratio(&mut self) {
        let (kernels, levels) = (&self.kernels, self.levels);
        let (current, proposal) = (&self.current.tempered, &self.proposal.tempered);
        self.log_ratio
            .as_slice_mut()
            .expect("an owned vector is contiguous")
            .par_iter_mut()
            .enumerate()
            .for_each(|(row, log_ratio)| {
                let level = row % levels;
                *log_ratio = if level == 0 {
                    f64::INFINITY
                } else {
                    kernels[level].log_acceptance_ratio(
                        current.position.row(row),
                        proposal.position.row(row),
                        proposal.gradient.row(row),
                        proposal.log_density[row],
                        current.log_density[row],
                        *log_ratio,
                    )
                };
            });
    }

    /// Accepts row r when log U_r < log α_r (a NaN ratio rejects) and copies its proposal.
    fn accept_or_reject(&mut self) {
        let stats = &mut self.stats;
        stats.acceptance_probability.fill(0.0);
        stats.accepted.fill(0);
        for r in 0..self.accept.len() {
            let level = r % self.levels;
            let log_ratio = self.log_ratio[r];
            stats.acceptance_probability[level] += acceptance_probability(log_ratio);
            let accept = self.log_uniform[[r, 0]] < log_ratio;
            self.accept[r] = accept;
            stats.accepted[level] += usize::from(accept);
        }
        let chains = (self.accept.len() / self.levels) as f64;
        stats
            .acceptance_probability
            .iter_mut()
            .for_each(|p| *p /= chains);
        self.current.accept_rows(&self.proposal, &self.accept);
    }

    /// Proposes to exchange levels (l, l + 1) for every l ≡ `parity` (mod 2) in every chain,
    /// accepting with probability min(1, exp((λ_{l+1} − λ_l)(ℓ(x_l) − ℓ(x_{l+1})))).
    fn exchange(&mut self, parity: usize) {
        let (levels, ladder) = (self.levels, &self.ladder);
        let stats = &mut self.stats;
        stats.swap_probability.fill(0.0);
        stats.swap_accepted.fill(0);
        let chains = self.accept.len() / levels;
        for chain in 0..chains {
            for level in (parity..levels - 1).step_by(2) {
                let lower = chain * levels + level;
                let gap = ladder[level + 1] - ladder[level];
                let log_ratio =
                    gap * (self.current.log_ratio(lower) - self.current.log_ratio(lower + 1));
                stats.swap_probability[level] += acceptance_probability(log_ratio);
                if self.log_uniform[[lower, 1]] < log_ratio {
                    stats.swap_accepted[level] += 1;
                    self.current
                        .exchange(lower, lower + 1, ladder[level], ladder[level + 1]);
                }
            }
        }
        stats
            .swap_probability
            .iter_mut()
            .for_each(|p| *p /= chains as f64);
    }
}

/// Max or min over a vector that returns NaN as soon as any entry is NaN.
fn nan_fold(values: &Array1<f64>, pick: fn(f64, f64) -> f64) -> f64 {
    values
        .iter()
        .copied()
        .reduce(|a, b| {
            if a.is_nan() || b.is_nan() {
                f64::NAN
            } else {
                pick(a, b)
            }
        })
        .unwrap_or(f64::NAN)
}

/// Split potential scale reduction factor R̂ per coordinate (Gelman et al., BDA3 §11.4).
///
/// `draws` is chains × draws × d. Each chain is cut into two halves of ⌊n/2⌋ draws (the
/// middle draw of an odd-length chain is dropped), giving m = 2·chains sequences of length
/// n'. With W the mean within-sequence variance and B/n' the variance of the sequence
/// means (both with denominator count − 1),
/// `R̂ = √(((n' − 1)/n' · W + B/n') / W)`.
/// R̂ ≈ 1 when all chains sample the same distribution; values above 1.01 signal non-mixing.
/// A coordinate is NaN when n' < 2 or when all draws are equal, and +∞ when every sequence
/// is constant but not all at the same value.
pub fn split_rhat(draws: ArrayView3<f64>) -> Array1<f64> {
    per_coordinate(draws, |chains| {
        rhat_of_sequences(split_chains(chains).view())
    })
}

/// Bulk effective sample size per coordinate (Vehtari et al. 2021, Stan / ArviZ "bulk").
///
/// `draws` is chains × draws × d. Chains are split in halves as in [`split_rhat`], the draws
/// of each coordinate are replaced by normal scores of their pooled ranks,
/// Φ⁻¹((r − 3/8)/(S + 1/4)), and [`ess_mean`]'s estimator is applied. NaN when a half-chain
/// has fewer than 4 draws or a draw is non-finite.
pub fn ess_bulk(draws: ArrayView3<f64>) -> Array1<f64> {
    per_coordinate(draws, |chains| {
        let split = split_chains(chains);
        if split.iter().any(|v| !v.is_finite()) {
            return f64::NAN;
        }
        ess_of_sequences(rank_normalize(split.view()).view())
    })
}

/// Effective sample size of the mean of each coordinate (Stan / ArviZ "mean").
///
/// `draws` is chains × draws × d, split in halves as in [`split_rhat`]. With ρ̂_t the
/// autocorrelation at lag t combined across sequences,
/// `ρ̂_t = 1 − (W − mean_j acov_j(t)) / var⁺`, the integrated time
/// τ = −1 + 2 Σ ρ̂_t is summed over Geyer's initial positive sequence made monotone, and
/// ESS = m·n'/τ. NaN when a half-chain has fewer than 4 draws or a draw is non-finite.
pub fn ess_mean(draws: ArrayView3<f64>) -> Array1<f64> {
    per_coordinate(draws, |chains| {
        ess_of_sequences(split_chains(chains).view())
    })
}

/// Applies `statistic` to the chains × draws matrix of every coordinate, in parallel.
fn per_coordinate(
    draws: ArrayView3<f64>,
    statistic: impl Fn(ArrayView2<f64>) -> f64 + Sync,
) -> Array1<f64> {
    let values: Vec<f64> = (0..draws.len_of(Axis(2)))
        .into_par_iter()
        .map(|j| statistic(draws.index_axis(Axis(2), j)))
        .collect();
    Array1::from(values)
}

/// Chains × n → (2 · chains) × ⌊n/2⌋: first halves, then second halves.
fn split_chains(chains: ArrayView2<f64>) -> Array2<f64> {
    let (m, n) = chains.dim();
    let half = n / 2;
    let mut split = Array2::zeros((2 * m, half));
    // (`s![]` cannot be used: it expands to an `allow(unsafe_code)` that `forbid` rejects.)
    split
        .slice_axis_mut(Axis(0), Slice::from(..m))
        .assign(&chains.slice_axis(Axis(1), Slice::from(..half)));
    split
        .slice_axis_mut(Axis(0), Slice::from(m..))
        .assign(&chains.slice_axis(Axis(1), Slice::from(n - half..)));
    split
}

/// R̂ of m sequences (rows) of equal length.
fn rhat_of_sequences(sequences: ArrayView2<f64>) -> f64 {
    let (m, n) = sequences.dim();
    if m < 2 || n < 2 {
        return f64::NAN;
    }
    let means: Array1<f64> = sequences.rows().into_iter().map(sample_mean).collect();
    let within = sequences
        .rows()
        .into_iter()
        .map(sample_variance)
        .sum::<f64>()
        / m as f64;
    let between_over_n = sample_variance(means.view());
    let n = n as f64;
    let pooled = (n - 1.0) / n * within + between_over_n;
    (pooled / within).sqrt()
}

fn sample_mean(x: ArrayView1<f64>) -> f64 {
    x.sum() / x.len() as f64
}

/// Variance with denominator n − 1.
fn sample_variance(x: ArrayView1<f64>) -> f64 {
    let mean = sample_mean(x);
    x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (x.len() as f64 - 1.0)
}

/// ESS of the mean from m sequences (rows) of length n: Geyer's initial monotone sequence
/// on the autocorrelations combined across sequences (ArviZ `_ess`).
fn ess_of_sequences(sequences: ArrayView2<f64>) -> f64 {
    let (m, n) = sequences.dim();
    if n < 4 || sequences.iter().any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let size = (m * n) as f64;
    let (lo, hi) = sequences
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if hi - lo < 1e-15 {
        return size;
    }
    let mut mean_autocovariance = Array1::<f64>::zeros(n);
    for row in sequences.rows() {
        mean_autocovariance += &autocovariance(row);
    }
    mean_autocovariance /= m as f64;
    let nf = n as f64;
    let within = mean_autocovariance[0] * nf / (nf - 1.0);
    let mut pooled = within * (nf - 1.0) / nf;
    if m > 1 {
        let means: Array1<f64> = sequences.rows().into_iter().map(sample_mean).collect();
        pooled += sample_variance(means.view());
    }
    let autocorrelation = |t: usize| 1.0 - (within - mean_autocovariance[t]) / pooled;

    // Geyer's initial positive sequence: sum pairs while ρ̂_{2k} + ρ̂_{2k+1} > 0.
    let mut rho = vec![0.0; n];
    rho[0] = 1.0;
    let (mut even, mut odd) = (1.0, autocorrelation(1));
    rho[1] = odd;
    let mut t = 1;
    while t + 3 < n && even + odd > 0.0 {
        even = autocorrelation(t + 1);
        odd = autocorrelation(t + 2);
        if even + odd >= 0.0 {
            rho[t + 1] = even;
            rho[t + 2] = odd;
        }
        t += 2;
    }
    // `last` = max_t + 1 in ArviZ: the first lag past the summed pairs.
    let last = t - 1;
    if even > 0.0 {
        rho[last] = even;
    }
    // Geyer's initial monotone sequence: pair sums may not increase.
    let mut t = 1;
    while t + 3 <= last {
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t] {
            rho[t + 1] = 0.5 * (rho[t - 1] + rho[t]);
            rho[t + 2] = rho[t + 1];
        }
        t += 2;
    }
    let tau = -1.0 + 2.0 * rho[..last].iter().sum::<f64>() + rho[last];
    size / tau.max(1.0 / size.log10())
}

/// Biased autocovariance acov(t) = (1/n) Σ_i (x_i − x̄)(x_{i+t} − x̄), t = 0..n, by FFT.
fn autocovariance(x: ArrayView1<f64>) -> Array1<f64> {
    let n = x.len();
    let mean = sample_mean(x);
    let size = (2 * n).next_power_of_two();
    let mut re = vec![0.0; size];
    let mut im = vec![0.0; size];
    for (r, &v) in re.iter_mut().zip(x.iter()) {
        *r = v - mean;
    }
    fft(&mut re, &mut im, false);
    for (r, i) in re.iter_mut().zip(im.iter_mut()) {
        *r = *r * *r + *i * *i;
        *i = 0.0;
    }
    fft(&mut re, &mut im, true);
    let scale = 1.0 / (size as f64 * n as f64);
    re.iter().take(n).map(|r| r * scale).collect()
}

/// In-place iterative radix-2 FFT (unnormalised in both directions); length a power of two.
fn fft(re: &mut [f64], im: &mut [f64], inverse: bool) {
    let n = re.len();
    debug_assert!(n.is_power_of_two() && im.len() == n);
    let mut j = 0;
    for i in 1..n {
        let mut bit = n >> 1;
        while j & bit != 0 {
            j ^= bit;
            bit >>= 1;
        }
        j |= bit;
        if i < j {
            re.swap(i, j);
            im.swap(i, j);
        }
    }
    let sign = if inverse { 1.0 } else { -1.0 };
    let twiddles: Vec<(f64, f64)> = (0..n / 2)
        .map(|k| {
            let (s, c) = (sign * std::f64::consts::TAU * k as f64 / n as f64).sin_cos();
            (c, s)
        })
        .collect();
    let mut len = 2;
    while len <= n {
        let (half, stride) = (len / 2, n / len);
        for start in (0..n).step_by(len) {
            for k in 0..half {
                let (c, s) = twiddles[k * stride];
                let (a, b) = (start + k, start + k + half);
                let tr = re[b] * c - im[b] * s;
                let ti = re[b] * s + im[b] * c;
                re[b] = re[a] - tr;
                im[b] = im[a] - ti;
                re[a] += tr;
                im[a] += ti;
            }
        }
        len <<= 1;
    }
}

/// Normal scores Φ⁻¹((r − 3/8)/(S + 1/4)) of the pooled ranks r (ties share their mean rank).
fn rank_normalize(x: ArrayView2<f64>) -> Array2<f64> {
    let values: Vec<f64> = x.iter().copied().collect();
    let size = values.len();
    let mut order: Vec<usize> = (0..size).collect();
    order.sort_unstable_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut scores = vec![0.0; size];
    let mut i = 0;
    while i < size {
        let mut j = i + 1;
        while j < size && values[order[j]] == values[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j share their mean.
        let rank = 0.5 * (i + 1 + j) as f64;
        let score = standard_normal_quantile((rank - 0.375) / (size as f64 + 0.25));
        for &k in &order[i..j] {
            scores[k] = score;
        }
        i = j;
    }
    Array2::from_shape_vec(x.dim(), scores).expect("one score per draw")
}

/// Φ⁻¹(p) for p ∈ (0, 1) by Acklam's rational approximation (relative error < 1.2·10⁻⁹).
fn standard_normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    const P_LOW: f64 = 0.02425;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use rand_chacha::ChaCha8Rng;

    /// N(μ, Σ) given by its precision P = Σ⁻¹: log π = −½(x − μ)ᵀP(x − μ), ∇ = −P(x − μ).
    struct Gaussian {
        mean: Array1<f64>,
        precision: Array2<f64>,
    }

    impl LogDensity for Gaussian {
        fn dim(&self) -> usize {
            self.mean.len()
        }

        fn log_density_and_gradient(
            &self,
            x: ArrayView2<f64>,
            mut log_density: ArrayViewMut1<f64>,
            mut gradient: ArrayViewMut2<f64>,
        ) {
            Zip::from(x.rows())
                .and(&mut log_density)
                .and(gradient.rows_mut())
                .par_for_each(|x, log_density, mut gradient| {
                    let centred = &x - &self.mean;
                    gradient.assign(&-self.precision.dot(&centred));
                    *log_density = 0.5 * centred.dot(&gradient);
                });
        }
    }

    /// ½ N(−a, 1) + ½ N(a, 1) on ℝ.
    struct Bimodal {
        separation: f64,
    }

    impl LogDensity for Bimodal {
        fn dim(&self) -> usize {
            1
        }

        fn log_density_and_gradient(
            &self,
            x: ArrayView2<f64>,
            mut log_density: ArrayViewMut1<f64>,
            mut gradient: ArrayViewMut2<f64>,
        ) {
            let a = self.separation;
            Zip::from(x.rows())
                .and(&mut log_density)
                .and(gradient.rows_mut())
                .par_for_each(|x, log_density, mut gradient| {
                    let (left, right) = (-0.5 * (x[0] + a).powi(2), -0.5 * (x[0] - a).powi(2));
                    let top = left.max(right);
                    let (wl, wr) = ((left - top).exp(), (right - top).exp());
                    *log_density = top + (wl + wr).ln();
                    gradient[0] = (wl * -(x[0] + a) + wr * -(x[0] - a)) / (wl + wr);
                });
        }
    }

    /// Gamma(k, 1) on (0, ∞): log π = (k − 1) ln x − x, −∞ outside the support.
    struct Gamma {
        shape: f64,
    }

    impl LogDensity for Gamma {
        fn dim(&self) -> usize {
            1
        }

        fn log_density_and_gradient(
            &self,
            x: ArrayView2<f64>,
            mut log_density: ArrayViewMut1<f64>,
            mut gradient: ArrayViewMut2<f64>,
        ) {
            Zip::from(x.rows())
                .and(&mut log_density)
                .and(gradient.rows_mut())
                .for_each(|x, log_density, mut gradient| {
                    let x = x[0];
                    if x > 0.0 {
                        *log_density = (self.shape - 1.0) * x.ln() - x;
                        gradient[0] = (self.shape - 1.0) / x - 1.0;
                    } else {
                        *log_density = f64::NEG_INFINITY;
                        gradient[0] = f64::NAN;
                    }
                });
        }
    }

    /// Correlation 0.9, variances 1 and 4: Σ = [[1, 1.8], [1.8, 4]].
    fn correlated_gaussian() -> (Gaussian, Array2<f64>) {
        let covariance = array![[1.0, 1.8], [1.8, 4.0]];
        let det = 1.0 * 4.0 - 1.8 * 1.8;
        let precision = array![[4.0, -1.8], [-1.8, 1.0]] / det;
        let target = Gaussian {
            mean: array![1.0, -2.0],
            precision,
        };
        (target, covariance)
    }

    /// Chains × d points, N(centre, scale²) per coordinate, from the `Init` streams.
    fn spread_init(chains: usize, centre: &[f64], scale: f64, seed: u64) -> Array2<f64> {
        let streams = Streams::new(seed);
        Array2::from_shape_fn((chains, centre.len()), |(c, i)| {
            let mut rng: ChaCha8Rng = streams.rng(Purpose::Init, i, c);
            centre[i] + scale * rng.sample::<f64, _>(StandardNormal)
        })
    }

    fn normal_chains(chains: usize, draws: usize, d: usize, seed: u64) -> Array3<f64> {
        let streams = Streams::new(seed);
        let mut out = Array3::zeros((chains, draws, d));
        for ((c, k, i), v) in out.indexed_iter_mut() {
            let mut rng = streams.rng(Purpose::Other, k * d + i, c);
            *v = rng.sample(StandardNormal);
        }
        out
    }

    /// Central finite differences of the log-density against the analytic gradient.
    fn assert_gradient(target: &impl LogDensity, points: Array2<f64>) {
        let (n, d) = points.dim();
        let mut value = Array1::zeros(n);
        let mut gradient = Array2::zeros((n, d));
        target.log_density_and_gradient(points.view(), value.view_mut(), gradient.view_mut());
        let eps = 1e-5;
        for i in 0..d {
            let (mut plus, mut minus) = (points.clone(), points.clone());
            plus.column_mut(i).mapv_inplace(|v| v + eps);
            minus.column_mut(i).mapv_inplace(|v| v - eps);
            let (mut fp, mut fm) = (Array1::zeros(n), Array1::zeros(n));
            let mut scratch = Array2::zeros((n, d));
            target.log_density_and_gradient(plus.view(), fp.view_mut(), scratch.view_mut());
            target.log_density_and_gradient(minus.view(), fm.view_mut(), scratch.view_mut());
            for c in 0..n {
                let fd = (fp[c] - fm[c]) / (2.0 * eps);
                approx::assert_abs_diff_eq!(fd, gradient[[c, i]], epsilon = 1e-6);
            }
        }
    }

    #[test]
    fn test_targets_have_exact_gradients() {
        let (gaussian, _) = correlated_gaussian();
        assert_gradient(&gaussian, spread_init(5, &[0.0, 0.0], 2.0, 1));
        assert_gradient(&Bimodal { separation: 8.0 }, spread_init(9, &[0.0], 6.0, 2));
        assert_gradient(&Gamma { shape: 3.0 }, spread_init(5, &[3.0], 0.5, 3));
    }

    /// Functionals a = x₁ − μ₁, b = x₂ − μ₂, a², b², ab of every draw: chain × draw × 5.
    fn moment_functionals(draws: ArrayView3<f64>, mean: &Array1<f64>) -> Array3<f64> {
        let (chains, n, _) = draws.dim();
        Array3::from_shape_fn((chains, n, 5), |(c, k, j)| {
            let (a, b) = (draws[[c, k, 0]] - mean[0], draws[[c, k, 1]] - mean[1]);
            [a, b, a * a, b * b, a * b][j]
        })
    }

    /// Mean, variances and covariance of a 2-D Gaussian within z = 4 standard errors.
    ///
    /// Standard errors use a stated effective sample size ESS = 4000 out of 32 × 8000 draws
    /// (a priori from τ ≈ 35 for MALA at condition number 19; the run measures ≈ 7000 for
    /// the means and ≈ 14000 for the second moments, and the test asserts every measured
    /// ESS ≥ 4000 so the assumption is checked, not hoped for). Gaussian sampling variances:
    /// Var(x̄ᵢ) = σᵢ²/ESS, Var(s²ᵢ) = 2σᵢ⁴/ESS, Var(s₁₂) = (σ₁²σ₂² + σ₁₂²)/ESS.
    #[test]
    fn correlated_gaussian_moments_match_closed_form() {
        const ESS: f64 = 4000.0;
        const Z: f64 = 4.0;
        let (target, covariance) = correlated_gaussian();
        let config = MalaConfig::new(32, 1000, 8000);
        let init = spread_init(32, &[1.0, -2.0], 3.0, 7);
        let out = mala(&target, init, &config, 11).unwrap();
        assert_eq!(out.samples.dim(), (32 * 8000, 2));

        let functionals = moment_functionals(out.draws(), &target.mean);
        let measured_ess = ess_mean(functionals.view());
        assert!(
            measured_ess.iter().all(|&e| e >= ESS),
            "measured ESS {measured_ess} below the assumed {ESS}"
        );

        let estimates = functionals
            .mean_axis(Axis(0))
            .unwrap()
            .mean_axis(Axis(0))
            .unwrap();
        let (v1, v2, c12) = (covariance[[0, 0]], covariance[[1, 1]], covariance[[0, 1]]);
        let (a, b) = (estimates[0], estimates[1]);
        let checks = [
            ("mean 1", a, 0.0, v1.sqrt()),
            ("mean 2", b, 0.0, v2.sqrt()),
            ("var 1", estimates[2] - a * a, v1, (2.0 * v1 * v1).sqrt()),
            ("var 2", estimates[3] - b * b, v2, (2.0 * v2 * v2).sqrt()),
            (
                "cov",
                estimates[4] - a * b,
                c12,
                (v1 * v2 + c12 * c12).sqrt(),
            ),
        ];
        for (name, estimate, exact, sd) in checks {
            let tolerance = Z * sd / ESS.sqrt();
            assert!(
                (estimate - exact).abs() < tolerance,
                "{name}: {estimate} vs {exact} (tolerance {tolerance})"
            );
        }
        assert!(out.max_split_rhat < 1.01, "split-R̂ {}", out.split_rhat);
        assert!(out.min_ess_bulk >= ESS, "bulk ESS {}", out.ess_bulk);
        assert!(
            (0.45..0.75).contains(&out.acceptance_rate),
            "acceptance {} far from the 0.574 target",
            out.acceptance_rate
        );
    }

    /// Variances 1 and 10⁴: the adapted inverse metric must find both scales (within 25%,
    /// far wider than its sampling error), otherwise the second coordinate barely moves.
    #[test]
    fn metric_adapts_to_anisotropic_scales() {
        let target = Gaussian {
            mean: array![0.0, 0.0],
            precision: array![[1.0, 0.0], [0.0, 1e-4]],
        };
        let config = MalaConfig::new(16, 1000, 2000);
        let out = mala(&target, spread_init(16, &[0.0, 0.0], 1.0, 5), &config, 3).unwrap();
        let relative = &out.inverse_metric / &array![1.0, 1e4];
        assert!(
            relative.iter().all(|r| (r - 1.0).abs() < 0.25),
            "inverse metric {}",
            out.inverse_metric
        );
        assert!(out.max_split_rhat < 1.01, "split-R̂ {}", out.split_rhat);
    }

    /// A target with support (0, ∞): proposals outside are rejected, never kept, and the
    /// mean of Gamma(3, 1) (= 3, sd √3) is recovered within z = 4 for a stated ESS of 2000
    /// (checked against the measured ESS).
    #[test]
    fn proposals_outside_the_support_are_rejected() {
        const ESS: f64 = 2000.0;
        let target = Gamma { shape: 3.0 };
        let config = MalaConfig::new(16, 500, 2000);
        let init = spread_init(16, &[3.0], 0.5, 9).mapv(f64::abs);
        let out = mala(&target, init, &config, 4).unwrap();
        assert!(out.samples.iter().all(|&x| x > 0.0));
        let ess = ess_mean(out.draws()).to_vec()[0];
        assert!(ess >= ESS, "measured ESS {ess}");
        let mean = out.samples.mean().unwrap();
        assert!(
            (mean - 3.0).abs() < 4.0 * 3f64.sqrt() / ESS.sqrt(),
            "mean {mean}"
        );
    }

    #[test]
    fn split_rhat_matches_hand_computation() {
        // One chain [0, 1, 2, 3] → halves [0, 1], [2, 3]: W = 1/2, B/n' = 2, n' = 2,
        // R̂ = √((½ · ½ + 2) / ½) = √4.5. An odd chain drops its middle draw.
        let even = Array3::from_shape_vec((1, 4, 1), vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let odd = Array3::from_shape_vec((1, 5, 1), vec![0.0, 1.0, 100.0, 2.0, 3.0]).unwrap();
        approx::assert_relative_eq!(split_rhat(even.view())[0], 4.5f64.sqrt(), epsilon = 1e-14);
        approx::assert_relative_eq!(split_rhat(odd.view())[0], 4.5f64.sqrt(), epsilon = 1e-14);
    }

    /// For iid chains R̂² − 1 ≈ (χ²₁₅/15 − 1)/n' with n' = 500, sd ≈ 7·10⁻⁴: |R̂ − 1| < 0.005
    /// is a > 10σ bound.
    #[test]
    fn split_rhat_of_iid_chains_is_one() {
        let draws = normal_chains(8, 1000, 3, 1);
        let rhat = split_rhat(draws.view());
        assert!(rhat.iter().all(|r| (r - 1.0).abs() < 0.005), "{rhat}");
    }

    #[test]
    fn split_rhat_flags_shifted_chains() {
        // One chain in four shifted by 2 sd between chains; one chain drifting within itself.
        let mut between = normal_chains(4, 1000, 1, 2);
        between.index_axis_mut(Axis(0), 3).mapv_inplace(|v| v + 2.0);
        let mut within = normal_chains(1, 1000, 1, 3);
        within
            .slice_axis_mut(Axis(1), Slice::from(500..))
            .mapv_inplace(|v| v + 2.0);
        let (rb, rw) = (split_rhat(between.view())[0], split_rhat(within.view())[0]);
        assert!(rb > 1.1, "between-chain shift: R̂ = {rb}");
        assert!(rw > 1.1, "within-chain drift: R̂ = {rw}");
    }

    /// ½N(−20, 1) + ½N(20, 1): the barrier costs e^{−200}, so no chain crosses (not even
    /// with the large trial steps of early step-size adaptation). Started in one mode the
    /// chains agree (R̂ ≈ 1) although they miss half the mass; started half in each mode
    /// R̂ ≈ √(1 + 400) ≈ 20 must expose the non-mixing.
    #[test]
    fn split_rhat_exposes_chains_stuck_in_different_modes() {
        let target = Bimodal { separation: 20.0 };
        let config = MalaConfig::new(16, 500, 1000);
        let one_mode = spread_init(16, &[20.0], 0.5, 1);
        let out = mala(&target, one_mode, &config, 2).unwrap();
        assert!(out.samples.iter().all(|&x| x > 0.0));
        assert!(
            out.max_split_rhat < 1.05,
            "one mode: R̂ {}",
            out.max_split_rhat
        );

        let mut both_modes = spread_init(16, &[20.0], 0.5, 1);
        both_modes
            .slice_axis_mut(Axis(0), Slice::from(8..))
            .mapv_inplace(|x| -x);
        let out = mala(&target, both_modes, &config, 2).unwrap();
        assert!(
            out.max_split_rhat > 4.0,
            "two modes: R̂ {}",
            out.max_split_rhat
        );
    }

    #[test]
    fn runs_are_bit_identical_on_any_thread_count() {
        let (target, _) = correlated_gaussian();
        let mut config = MalaConfig::new(8, 200, 300);
        config.thin = 2;
        let run = |threads: usize, seed: u64| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let init = spread_init(8, &[1.0, -2.0], 3.0, 7);
            pool.install(|| mala(&target, init, &config, seed).unwrap())
        };
        let (one, two) = (run(1, 5), run(2, 5));
        let bits = |a: &Array2<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.samples), bits(&two.samples));
        assert_eq!(one.step_size.to_bits(), two.step_size.to_bits());
        assert_eq!(one.split_rhat, two.split_rhat);
        assert_ne!(bits(&one.samples), bits(&run(2, 6).samples));
    }

    /// Streams are indexed by absolute iteration, so thinning by 2 keeps exactly the odd
    /// post-warm-up iterations of the unthinned run.
    #[test]
    fn thinning_keeps_every_thin_th_iteration() {
        let (target, _) = correlated_gaussian();
        let init = spread_init(4, &[1.0, -2.0], 1.0, 7);
        let full = mala(&target, init.clone(), &MalaConfig::new(4, 100, 40), 1).unwrap();
        let mut config = MalaConfig::new(4, 100, 20);
        config.thin = 2;
        let thinned = mala(&target, init, &config, 1).unwrap();
        let expected = full
            .draws()
            .slice_axis(Axis(1), Slice::from(1..).step_by(2))
            .to_owned();
        assert_eq!(thinned.draws(), expected.view());
    }

    #[test]
    fn non_finite_initial_density_is_an_error() {
        let init = array![[1.0], [2.0], [-1.0], [0.5]];
        let err = mala(&Gamma { shape: 3.0 }, init, &MalaConfig::new(4, 10, 10), 0).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NonFinite {
                    step: 0,
                    particle: 2,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn invalid_config_and_shapes_are_named() {
        let (target, _) = correlated_gaussian();
        let field = |config: MalaConfig| match config.validate() {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let base = MalaConfig::new(4, 10, 10);
        assert_eq!(
            field(MalaConfig {
                chains: 0,
                ..base.clone()
            }),
            "chains"
        );
        assert_eq!(
            field(MalaConfig {
                samples_per_chain: 3,
                ..base.clone()
            }),
            "samples_per_chain"
        );
        assert_eq!(
            field(MalaConfig {
                thin: 0,
                ..base.clone()
            }),
            "thin"
        );
        assert_eq!(
            field(MalaConfig {
                initial_step_size: -1.0,
                ..base.clone()
            }),
            "initial_step_size"
        );
        assert_eq!(
            field(MalaConfig {
                initial_step_size: f64::NAN,
                ..base.clone()
            }),
            "initial_step_size"
        );
        assert_eq!(
            field(MalaConfig {
                target_acceptance: 1.0,
                ..base.clone()
            }),
            "target_acceptance"
        );
        assert_eq!(
            field(MalaConfig {
                warmup: usize::MAX,
                ..base.clone()
            }),
            "warmup"
        );
        assert!(base.validate().is_ok());
        let wrong_rows = mala(&target, Array2::zeros((3, 2)), &base, 0).unwrap_err();
        let wrong_cols = mala(&target, Array2::zeros((4, 3)), &base, 0).unwrap_err();
        assert!(matches!(
            wrong_rows,
            Error::Dimension {
                expected: 4,
                found: 3,
                ..
            }
        ));
        assert!(matches!(
            wrong_cols,
            Error::Dimension {
                expected: 2,
                found: 3,
                ..
            }
        ));
    }

    #[test]
    fn warmup_windows_follow_stan() {
        // Stan, 1000 warm-up iterations: buffer 75, windows 25, 50, 100, 200, 500, buffer 50.
        let plan = WarmupPlan::new(1000, true);
        assert_eq!(plan.slow_start, 75);
        assert_eq!(plan.window_ends, vec![100, 150, 250, 450, 950]);
        // Short warm-up: 15% / 75% / 10%.
        let plan = WarmupPlan::new(100, true);
        assert_eq!((plan.slow_start, plan.window_ends.clone()), (15, vec![90]));
        assert!(WarmupPlan::new(19, true).window_ends.is_empty());
        assert!(WarmupPlan::new(1000, false).window_ends.is_empty());
    }

    /// AR(1) x_t = φ x_{t−1} + √(1 − φ²) ε_t has ESS = S (1 − φ)/(1 + φ) for the mean. With
    /// S = 1.6·10⁵ and τ = 19 the estimator's relative sd is ≈ 4%; the bound is 15%.
    #[test]
    fn ess_matches_autoregressive_closed_form() {
        let (chains, n, phi) = (8, 20_000, 0.9_f64);
        let noise = normal_chains(chains, n, 1, 4);
        let mut draws = Array3::zeros((chains, n, 1));
        for c in 0..chains {
            let mut x = noise[[c, 0, 0]];
            for k in 0..n {
                if k > 0 {
                    x = phi * x + (1.0 - phi * phi).sqrt() * noise[[c, k, 0]];
                }
                draws[[c, k, 0]] = x;
            }
        }
        let exact = (chains * n) as f64 * (1.0 - phi) / (1.0 + phi);
        for ess in [ess_mean(draws.view())[0], ess_bulk(draws.view())[0]] {
            assert!((ess / exact - 1.0).abs() < 0.15, "ESS {ess} vs {exact}");
        }
        let iid = normal_chains(4, 5000, 1, 5);
        let ess = ess_bulk(iid.view())[0];
        assert!((ess / 20_000.0 - 1.0).abs() < 0.15, "iid ESS {ess}");
    }

    #[test]
    fn fft_autocovariance_matches_direct_sum() {
        let x: Array1<f64> = (0..37)
            .map(|i| ((i * i) as f64 * 0.37).sin() + 0.1 * i as f64)
            .collect();
        let fast = autocovariance(x.view());
        let mean = x.mean().unwrap();
        for t in 0..x.len() {
            let direct: f64 = (0..x.len() - t)
                .map(|i| (x[i] - mean) * (x[i + t] - mean))
                .sum();
            approx::assert_abs_diff_eq!(fast[t], direct / x.len() as f64, epsilon = 1e-12);
        }
    }

    #[test]
    fn normal_quantile_matches_tables() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959963984540054),
            (0.001, -3.090232306167813),
            (0.02, -2.053748910631823),
        ] {
            approx::assert_abs_diff_eq!(standard_normal_quantile(p), z, epsilon = 1e-8);
            approx::assert_abs_diff_eq!(standard_normal_quantile(1.0 - p), -z, epsilon = 1e-8);
        }
    }

    /// Σ_k w_k N(μ_k, σ_k²) on ℝ, with exact draws (a component, then a Gaussian).
    struct Mixture1d {
        weights: Vec<f64>,
        means: Vec<f64>,
        sds: Vec<f64>,
    }

    impl LogDensity for Mixture1d {
        fn dim(&self) -> usize {
            1
        }

        fn log_density_and_gradient(
            &self,
            x: ArrayView2<f64>,
            mut log_density: ArrayViewMut1<f64>,
            mut gradient: ArrayViewMut2<f64>,
        ) {
            Zip::from(x.rows())
                .and(&mut log_density)
                .and(gradient.rows_mut())
                .for_each(|x, log_density, mut gradient| {
                    let terms: Vec<(f64, f64)> = (0..self.weights.len())
                        .map(|k| {
                            let z = (x[0] - self.means[k]) / self.sds[k];
                            let log = self.weights[k].ln() - self.sds[k].ln() - 0.5 * z * z;
                            (log, -z / self.sds[k])
                        })
                        .collect();
                    let top = terms.iter().map(|t| t.0).fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = terms.iter().map(|t| (t.0 - top).exp()).sum();
                    *log_density = top + total.ln();
                    gradient[0] =
                        terms.iter().map(|t| (t.0 - top).exp() * t.1).sum::<f64>() / total;
                });
        }
    }

    impl BaseLaw for Mixture1d {
        fn sample(&self, mut row: ArrayViewMut1<f64>, rng: &mut ChaCha8Rng) {
            let u: f64 = rng.random();
            let mut k = 0;
            let mut cumulative = self.weights[0];
            while u >= cumulative && k + 1 < self.weights.len() {
                k += 1;
                cumulative += self.weights[k];
            }
            let xi: f64 = rng.sample(StandardNormal);
            row[0] = self.means[k] + self.sds[k] * xi;
        }
    }

    /// N(μ, diag(σ²)) with exact draws.
    struct DiagonalGaussian {
        mean: Array1<f64>,
        sd: Array1<f64>,
    }

    impl LogDensity for DiagonalGaussian {
        fn dim(&self) -> usize {
            self.mean.len()
        }

        fn log_density_and_gradient(
            &self,
            x: ArrayView2<f64>,
            mut log_density: ArrayViewMut1<f64>,
            mut gradient: ArrayViewMut2<f64>,
        ) {
            Zip::from(x.rows())
                .and(&mut log_density)
                .and(gradient.rows_mut())
                .for_each(|x, log_density, mut gradient| {
                    let z = (&x - &self.mean) / &self.sd;
                    *log_density = -0.5 * z.dot(&z);
                    gradient.assign(&(-&z / &self.sd));
                });
        }
    }

    impl BaseLaw for DiagonalGaussian {
        fn sample(&self, mut row: ArrayViewMut1<f64>, rng: &mut ChaCha8Rng) {
            for i in 0..row.len() {
                let xi: f64 = rng.sample(StandardNormal);
                row[i] = self.mean[i] + self.sd[i] * xi;
            }
        }
    }

    /// q̃ = 0.3 N(−6, 1) + 0.7 N(6, 1) and b = ½ N(−6, 2) + ½ N(6, 2).
    fn separated_modes() -> (Mixture1d, Mixture1d) {
        let target = Mixture1d {
            weights: vec![0.3, 0.7],
            means: vec![-6.0, 6.0],
            sds: vec![1.0, 1.0],
        };
        let base = Mixture1d {
            weights: vec![0.5, 0.5],
            means: vec![-6.0, 6.0],
            sds: vec![2f64.sqrt(); 2],
        };
        (target, base)
    }

    #[test]
    fn tempering_test_laws_have_exact_gradients_and_draws() {
        let (target, base) = separated_modes();
        assert_gradient(&target, spread_init(9, &[0.0], 7.0, 1));
        assert_gradient(&base, spread_init(9, &[0.0], 7.0, 2));
        let gaussian = DiagonalGaussian {
            mean: array![-1.0, 1.0],
            sd: array![2.0, 3.0],
        };
        assert_gradient(&gaussian, spread_init(5, &[0.0, 0.0], 3.0, 3));
        // Draws of b: P(x > 0) = ½ within z = 4 for 40 000 iid draws (sd 0.0025).
        let draws = replica_init(&base, 40_000, &Streams::new(4));
        let upper = draws.iter().filter(|&&x| x > 0.0).count() as f64 / 40_000.0;
        assert!((upper - 0.5).abs() < 4.0 * 0.0025, "P(x > 0) = {upper}");
    }

    /// Modes 12 sd apart: every MALA chain keeps its mode, so plain MALA started from the
    /// replicas' cold states (base draws, in both modes) has R̂ ≈ 6. Through the base level
    /// the tempered chains mix: the cold mode weight P(x > 0) = 0.7 is recovered within
    /// z = 4 for a stated ESS of 8000 of the indicator out of 16 × 4000 draws (asserted
    /// against the measured one, ≈ 17 000; sd √(0.21/8000) ≈ 0.005), and R̂ < 1.01.
    #[test]
    fn tempering_mixes_between_separated_modes() {
        const ESS: f64 = 8000.0;
        let (target, base) = separated_modes();
        let config = TemperingConfig::new(16, 4, 1000, 4000);
        let out = tempered_mala(&target, &base, &config, 3).unwrap();
        assert_eq!(out.cold.samples.dim(), (16 * 4000, 1));

        let indicator = out.cold.draws().mapv(|x| f64::from(u8::from(x > 0.0)));
        let ess = ess_mean(indicator.view())[0];
        assert!(ess >= ESS, "measured ESS of the indicator {ess}");
        let weight = indicator.mean().unwrap();
        let tolerance = 4.0 * (0.7 * 0.3 / ESS).sqrt();
        assert!(
            (weight - 0.7).abs() < tolerance,
            "P(x > 0) = {weight} (tolerance {tolerance})"
        );
        assert!(
            out.cold.max_split_rhat < 1.01,
            "tempered R̂ {}",
            out.cold.split_rhat
        );
        assert!(out.swap_acceptance_rates.iter().all(|&a| a > 0.2));

        let init = replica_init(&base, 16 * 4, &Streams::new(3))
            .slice_axis(Axis(0), Slice::from(3..).step_by(4))
            .to_owned();
        let plain = mala(&target, init, &MalaConfig::new(16, 1000, 4000), 3).unwrap();
        assert!(
            plain.max_split_rhat > 2.0,
            "plain MALA R̂ {}",
            plain.max_split_rhat
        );
    }

    /// Gaussian bridge: base N((−1, 1), diag(4, 9)) to the correlated Gaussian target.
    /// Moments within z = 4 standard errors for a stated ESS of 5000 out of 16 × 4000
    /// draws, asserted against the measured ESS (≈ 7500 for the means, ≈ 10 000 for the
    /// second moments; sampling variances as in the MALA test above).
    #[test]
    fn tempering_recovers_gaussian_moments() {
        const ESS: f64 = 5000.0;
        const Z: f64 = 4.0;
        let (target, covariance) = correlated_gaussian();
        let base = DiagonalGaussian {
            mean: array![-1.0, 1.0],
            sd: array![2.0, 3.0],
        };
        let config = TemperingConfig::new(16, 3, 1000, 4000);
        let out = tempered_mala(&target, &base, &config, 8).unwrap();

        let functionals = moment_functionals(out.cold.draws(), &target.mean);
        let measured_ess = ess_mean(functionals.view());
        assert!(
            measured_ess.iter().all(|&e| e >= ESS),
            "measured ESS {measured_ess} below the assumed {ESS}"
        );
        let estimates = functionals
            .mean_axis(Axis(0))
            .unwrap()
            .mean_axis(Axis(0))
            .unwrap();
        let (v1, v2, c12) = (covariance[[0, 0]], covariance[[1, 1]], covariance[[0, 1]]);
        let (a, b) = (estimates[0], estimates[1]);
        let checks = [
            ("mean 1", a, 0.0, v1.sqrt()),
            ("mean 2", b, 0.0, v2.sqrt()),
            ("var 1", estimates[2] - a * a, v1, (2.0 * v1 * v1).sqrt()),
            ("var 2", estimates[3] - b * b, v2, (2.0 * v2 * v2).sqrt()),
            (
                "cov",
                estimates[4] - a * b,
                c12,
                (v1 * v2 + c12 * c12).sqrt(),
            ),
        ];
        for (name, estimate, exact, sd) in checks {
            let tolerance = Z * sd / ESS.sqrt();
            assert!(
                (estimate - exact).abs() < tolerance,
                "{name}: {estimate} vs {exact} (tolerance {tolerance})"
            );
        }
        assert!(out.cold.max_split_rhat < 1.01, "R̂ {}", out.cold.split_rhat);
        assert!(
            out.acceptance_rates
                .iter()
                .skip(1)
                .all(|a| (0.45..0.75).contains(a)),
            "acceptance {} far from the 0.574 target",
            out.acceptance_rates
        );
    }

    /// With q̃ = b every level is b and ℓ is constant: each exchange has ratio exactly 1.
    #[test]
    fn exchanges_between_equal_laws_are_always_accepted() {
        let (_, base) = separated_modes();
        let config = TemperingConfig::new(4, 3, 50, 20);
        let out = tempered_mala(&base, &base, &config, 1).unwrap();
        assert_eq!(out.swap_acceptance_rates, array![1.0, 1.0]);
        assert_eq!(out.acceptance_rates[0], 1.0);
    }

    /// A narrow target N(0, 0.1²) under a broad base N(0, 5²): the fixed quadratic ladder
    /// leaves swap rates far apart; the adapted one brings them within 0.1 of each other,
    /// keeping λ_0 = 0 < … < λ_4 = 1.
    #[test]
    fn ladder_adaptation_equalises_swap_rates() {
        let target = DiagonalGaussian {
            mean: array![0.0],
            sd: array![0.1],
        };
        let base = DiagonalGaussian {
            mean: array![0.0],
            sd: array![5.0],
        };
        let mut config = TemperingConfig::new(16, 5, 2000, 1000);
        let spread = |rates: &Array1<f64>| {
            rates.fold(0.0, |m: f64, &r| m.max(r)) - rates.fold(1.0, |m: f64, &r| m.min(r))
        };
        let adapted = tempered_mala(&target, &base, &config, 2).unwrap();
        config.adapt_ladder = false;
        let fixed = tempered_mala(&target, &base, &config, 2).unwrap();
        assert_eq!(fixed.ladder, array![0.0, 1.0 / 16.0, 0.25, 9.0 / 16.0, 1.0]);
        let ladder = &adapted.ladder;
        assert!(ladder[0] == 0.0 && ladder[4] == 1.0);
        assert!(
            ladder.windows(2).into_iter().all(|w| w[0] < w[1]),
            "{ladder}"
        );
        let (a, f) = (
            spread(&adapted.swap_acceptance_rates),
            spread(&fixed.swap_acceptance_rates),
        );
        assert!(
            a < 0.1 && f > 0.2,
            "adapted {} vs fixed {}",
            adapted.swap_acceptance_rates,
            fixed.swap_acceptance_rates
        );
    }

    #[test]
    fn tempered_runs_are_bit_identical_on_any_thread_count() {
        let (target, base) = separated_modes();
        let mut config = TemperingConfig::new(4, 3, 100, 50);
        config.thin = 2;
        let run = |threads: usize, seed: u64| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| tempered_mala(&target, &base, &config, seed).unwrap())
        };
        let (one, two) = (run(1, 5), run(2, 5));
        let bits = |a: ArrayView2<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(one.cold.samples.view()), bits(two.cold.samples.view()));
        let ladders = |o: &TemperingOutput| bits(o.ladder.view().insert_axis(Axis(0)));
        assert_eq!(ladders(&one), ladders(&two));
        let steps = |o: &TemperingOutput| bits(o.step_sizes.view().insert_axis(Axis(0)));
        assert_eq!(steps(&one), steps(&two));
        assert_eq!(one.swap_acceptance_rates, two.swap_acceptance_rates);
        assert_eq!(one.cold.split_rhat, two.cold.split_rhat);
        assert_ne!(
            bits(one.cold.samples.view()),
            bits(run(2, 6).cold.samples.view())
        );
    }

    #[test]
    fn invalid_tempering_config_and_laws_are_named() {
        let field = |config: TemperingConfig| match config.validate() {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let valid = TemperingConfig::new(4, 3, 10, 10);
        assert!(valid.validate().is_ok());
        let cases = [
            (
                "chains",
                TemperingConfig {
                    chains: 0,
                    ..valid.clone()
                },
            ),
            (
                "levels",
                TemperingConfig {
                    levels: 1,
                    ..valid.clone()
                },
            ),
            (
                "chains",
                TemperingConfig {
                    chains: 1 << 31,
                    ..valid.clone()
                },
            ),
            (
                "samples_per_chain",
                TemperingConfig {
                    samples_per_chain: 3,
                    ..valid.clone()
                },
            ),
            (
                "thin",
                TemperingConfig {
                    thin: 0,
                    ..valid.clone()
                },
            ),
            (
                "warmup",
                TemperingConfig {
                    warmup: usize::MAX,
                    ..valid.clone()
                },
            ),
            (
                "initial_step_size",
                TemperingConfig {
                    initial_step_size: 0.0,
                    ..valid.clone()
                },
            ),
            (
                "target_acceptance",
                TemperingConfig {
                    target_acceptance: 0.0,
                    ..valid.clone()
                },
            ),
        ];
        for (name, config) in cases {
            assert_eq!(field(config), name);
        }

        let (target, _) = correlated_gaussian();
        let (_, wrong_dimension) = separated_modes();
        let err = tempered_mala(&target, &wrong_dimension, &valid, 0).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Dimension {
                    expected: 2,
                    found: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        // Base draws on ℝ, target supported on (0, ∞): some replica starts outside.
        let broad = DiagonalGaussian {
            mean: array![0.0],
            sd: array![1.0],
        };
        let err = tempered_mala(&Gamma { shape: 3.0 }, &broad, &valid, 0).unwrap_err();
        assert!(matches!(err, Error::NonFinite { step: 0, .. }), "{err:?}");
    }

    proptest::proptest! {
        /// Split-R̂ and ESS are invariant under affine maps of the draws; bulk ESS under any
        /// strictly increasing map (it only sees ranks).
        #[test]
        fn diagnostics_are_invariant(seed in 0u64..1000, scale in 0.1f64..10.0, shift in -5.0f64..5.0) {
            let draws = normal_chains(3, 40, 2, seed);
            let affine = draws.mapv(|v| scale * v + shift);
            let monotone = draws.mapv(f64::exp);
            for (a, b) in split_rhat(draws.view()).iter().zip(split_rhat(affine.view()).iter()) {
                proptest::prop_assert!((a - b).abs() < 1e-9 * a.abs());
            }
            for (a, b) in ess_mean(draws.view()).iter().zip(ess_mean(affine.view()).iter()) {
                proptest::prop_assert!((a - b).abs() < 1e-8 * a.abs());
            }
            proptest::prop_assert_eq!(ess_bulk(draws.view()), ess_bulk(monotone.view()));
        }
    }
}
