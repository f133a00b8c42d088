//! `steer reference`: samples of the terminal target q_T, exact where a closed form exists,
//! otherwise by replica-exchange MALA from the first expert's mixture to the target.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{Array2, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};
use rand_chacha::ChaCha8Rng;
use steer::mcmc::{self, BaseLaw, LogDensity, TemperingConfig};
use steer::model::{GaussianMixture, NoiseLevel, ScoreModel, ScoreOutput};
use steer::rng::{Purpose, Streams};
use steer::target::Target;

use crate::{config, io, report};

/// MCMC settings from the command line.
pub struct McmcArgs {
    /// Independent chains (each a ladder of replicas).
    pub chains: usize,
    /// Tempering levels per chain.
    pub levels: usize,
    /// Warm-up iterations.
    pub warmup: usize,
    /// Keep every `thin`-th draw.
    pub thin: usize,
    /// Use MCMC even when a closed form exists.
    pub force: bool,
}

/// Runs `steer reference`.
pub fn run(
    config_path: &Path,
    out: &Path,
    samples: usize,
    set: &[String],
    args: &McmcArgs,
) -> Result<()> {
    if samples == 0 {
        bail!("--samples must be at least 1");
    }
    let (config, grid, target) = config::load_problem(config_path, set)?;
    let level = grid.level(grid.len());
    let (x, info) = match target.exact_terminal_law(&grid).filter(|_| !args.force) {
        Some(law) => {
            let (x, log_z) = law.sample(samples, &Streams::new(config.seed), Purpose::Reference);
            (
                x,
                serde_json::json!({ "method": "exact", "samples": samples, "log_normalizer": log_z }),
            )
        }
        None => {
            let network_base = config
                .network_tempering_base(config_path, &level)
                .with_context(|| config_path.display().to_string())?;
            tempered(&target, &level, network_base, samples, args, config.seed)?
        }
    };
    io::write_file_atomically(out, |tmp| io::write_npy(tmp, &x))?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    eprintln!("wrote {} ({} × {})", out.display(), x.nrows(), x.ncols());
    Ok(())
}

/// `log q̃_T` (β = 1) at the grid's last point.
struct TerminalDensity<'a> {
    target: &'a Target,
    level: NoiseLevel,
}

impl LogDensity for TerminalDensity<'_> {
    fn dim(&self) -> usize {
        self.target.dim()
    }

    fn log_density_and_gradient(
        &self,
        x: ArrayView2<f64>,
        mut log_density: ArrayViewMut1<f64>,
        mut gradient: ArrayViewMut2<f64>,
    ) {
        // Validated up front (every expert has a log-density), so failure means NaN input:
        // NaN makes the sampler reject the move.
        if self
            .target
            .log_density_and_gradient(
                &self.level,
                1.0,
                x,
                log_density.view_mut(),
                Some(gradient.view_mut()),
            )
            .is_err()
        {
            log_density.fill(f64::NAN);
        }
    }
}

/// A Gaussian mixture as the hot end of the tempering ladder: exact draws, exact log-density.
struct MixtureBase(GaussianMixture);

impl LogDensity for MixtureBase {
    fn dim(&self) -> usize {
        self.0.dim()
    }

    fn log_density_and_gradient(
        &self,
        x: ArrayView2<f64>,
        log_density: ArrayViewMut1<f64>,
        gradient: ArrayViewMut2<f64>,
    ) {
        let out = ScoreOutput {
            score: gradient,
            log_density: Some(log_density),
            divergence: None,
        };
        self.0
            .evaluate(&NoiseLevel::data(), x, out)
            .expect("dimensions checked");
    }
}

impl BaseLaw for MixtureBase {
    fn sample(&self, row: ArrayViewMut1<f64>, rng: &mut ChaCha8Rng) {
        self.0.draw(rng, row);
    }
}

/// Replica-exchange MALA from the first expert's mixture (at the sampler's data level; for a
/// network, `network_base`: the Gaussian of its data mean and scale) to `q̃_T`; split R̂
/// across chains tells whether the chains mixed.
fn tempered(
    target: &Target,
    level: &NoiseLevel,
    network_base: Option<GaussianMixture>,
    samples: usize,
    args: &McmcArgs,
    seed: u64,
) -> Result<(Array2<f64>, serde_json::Value)> {
    for (e, ex) in target.experts().iter().enumerate() {
        if !ex.model.provides_log_density() {
            bail!("experts[{e}] has no log-density: MCMC reference samples are unavailable");
        }
    }
    let base = target.experts()[0]
        .model
        .as_mixture()
        .map(|m| m.at_level(level))
        .or(network_base)
        .map(MixtureBase)
        .ok_or_else(|| {
            anyhow!(
                "MCMC references need a Gaussian-mixture or network first expert as the tempering base"
            )
        })?;
    let density = TerminalDensity {
        target,
        level: *level,
    };
    let mut cfg = TemperingConfig::new(
        args.chains,
        args.levels,
        args.warmup,
        samples.div_ceil(args.chains),
    );
    cfg.thin = args.thin;
    cfg.validate()?;
    let bar = report::spinner("replica-exchange MALA reference");
    let out = mcmc::tempered_mala(&density, &base, &cfg, seed)?;
    bar.finish_and_clear();
    let cold = &out.cold;
    let x = cold
        .samples
        .slice_axis(Axis(0), ndarray::Slice::from(0..samples))
        .to_owned();
    if cold.max_split_rhat > 1.01 {
        eprintln!(
            "warning: max split R-hat {:.3} > 1.01: the chains have not mixed; raise --warmup, --levels or --thin",
            cold.max_split_rhat
        );
    }
    let info = serde_json::json!({
        "method": "replica-exchange MALA",
        "samples": samples,
        "chains": args.chains,
        "levels": args.levels,
        "draws_per_chain": cold.draws_per_chain,
        "warmup": args.warmup,
        "thin": args.thin,
        "ladder": out.ladder.to_vec(),
        "swap_acceptance_rates": out.swap_acceptance_rates.to_vec(),
        "acceptance_rates": out.acceptance_rates.to_vec(),
        "max_split_rhat": cold.max_split_rhat,
        "split_rhat": cold.split_rhat.to_vec(),
        "min_ess_bulk": cold.min_ess_bulk,
    });
    Ok((x, info))
}
