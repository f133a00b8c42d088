//! The `steer` command line: sample, reference, eval, bench.

mod bench;
mod config;
mod io;
mod plot;
mod reference;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ndarray::Array1;
use steer::method::{GuidedSampler, Method, Urge, refine};
use steer::schedule::TimeGrid;
use steer::smc;
use steer::target::Target;

/// Inference-time steering of diffusion models with weighted particles.
#[derive(Parser)]
#[command(name = "steer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one method on a target and write samples, weights, a summary, a trace and plots.
    Sample {
        /// Run configuration (TOML; fields in docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// Output folder (written atomically; replaces a previous steer output); default
        /// `out/<config file name without extension>`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config field, e.g. `--set particles=1024 --set reward.strength=0.3`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Reference samples of the target (`.npy`), or `exact` to draw them from the closed form.
        #[arg(long)]
        reference: Option<String>,
        /// Number of exact reference samples drawn for `--reference exact`.
        #[arg(long, default_value_t = 10_000)]
        reference_samples: usize,
    },
    /// Draw samples of the terminal target q_T: exact when a closed form exists, else MALA.
    Reference {
        /// Run configuration (only the target, schedule and seed are used).
        #[arg(long)]
        config: PathBuf,
        /// Output `.npy` file.
        #[arg(long)]
        out: PathBuf,
        /// Number of samples M.
        #[arg(long)]
        samples: usize,
        /// Override a config field.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// MCMC chains (when no closed form exists).
        #[arg(long, default_value_t = 32)]
        chains: usize,
        /// Tempering levels per chain, from the base (first expert) to the target.
        #[arg(long, default_value_t = 8)]
        levels: usize,
        /// MCMC warm-up iterations per chain.
        #[arg(long, default_value_t = 2000)]
        warmup: usize,
        /// MCMC thinning: keep every k-th draw.
        #[arg(long, default_value_t = 5)]
        thin: usize,
        /// Use MCMC even when a closed form exists (to check the sampler).
        #[arg(long)]
        force_mcmc: bool,
    },
    /// Compare sample files and print the metrics as JSON.
    Eval {
        /// Samples (`.npy`, N × d).
        #[arg(long)]
        samples: PathBuf,
        /// Normalised log-weights of the samples (`.npy`, N); uniform when absent.
        #[arg(long)]
        log_weights: Option<PathBuf>,
        /// Reference samples (`.npy`, M × d).
        #[arg(long)]
        reference: PathBuf,
        /// Seed of the random projections of the sliced Wasserstein distance.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Run several methods × particle counts × seeds against one reference; write a table and plots.
    Bench {
        /// Run configuration (its method, particles and seed are overridden per run).
        #[arg(long)]
        config: PathBuf,
        /// Methods, comma-separated, e.g. `pg,g-smc,vcg,vcg-smc,ecg,ecg-smc`.
        #[arg(long, value_delimiter = ',', required = true)]
        methods: Vec<String>,
        /// Particle counts N, comma-separated, e.g. `256,1024,4096`.
        #[arg(long, value_delimiter = ',', required = true)]
        particles: Vec<usize>,
        /// Seeds per method and N: the config's seed, seed + 1, ….
        #[arg(long, default_value_t = 5)]
        seeds: usize,
        /// Override a config field (applied before the per-run overrides).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Reference samples (`.npy`), or `exact` to draw them from the closed form.
        #[arg(long)]
        reference: Option<String>,
        /// Number of exact reference samples drawn for `--reference exact`.
        #[arg(long, default_value_t = 10_000)]
        reference_samples: usize,
        /// Output folder (written atomically; replaces a previous steer output).
        #[arg(long, default_value = "out/bench")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sample {
            config,
            out,
            set,
            reference,
            reference_samples,
        } => {
            let out = out.unwrap_or_else(|| default_out(&config));
            sample(&config, &out, &set, reference.as_deref(), reference_samples)
        }
        Command::Reference {
            config,
            out,
            samples,
            set,
            chains,
            levels,
            warmup,
            thin,
            force_mcmc,
        } => reference::run(
            &config,
            &out,
            samples,
            &set,
            &reference::McmcArgs {
                chains,
                levels,
                warmup,
                thin,
                force: force_mcmc,
            },
        ),
        Command::Eval {
            samples,
            log_weights,
            reference,
            seed,
        } => eval(&samples, log_weights.as_deref(), &reference, seed),
        Command::Bench {
            config,
            methods,
            particles,
            seeds,
            set,
            reference,
            reference_samples,
            out,
        } => bench::run(&bench::Args {
            config: &config,
            out: &out,
            methods: &methods,
            particles: &particles,
            seeds,
            set: &set,
            reference: reference.as_deref(),
            reference_samples,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `out/<config stem>`: one folder per config, so that runs of different configs (and the
/// folders of `steer bench`) never collide.
fn default_out(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    Path::new("out").join(stem)
}

/// Runs the planned method; returns the run and whether its output is weighted.
fn execute(
    plan: config::Plan,
    target: &Target,
    grid: &TimeGrid,
    settings: &smc::Settings,
    observe: &mut dyn FnMut(&smc::StepInfo),
) -> Result<(smc::Run, bool)> {
    Ok(match plan {
        config::Plan::Guided(guidance) => {
            let mut m = GuidedSampler::new(target, guidance);
            (
                smc::run(&mut m, target, grid, settings, observe)?,
                m.weighted(),
            )
        }
        config::Plan::Urge {
            proposal,
            twist,
            schedule,
        } => {
            let mut m = Urge::new(target, proposal, twist)?.with_twist_schedule(schedule)?;
            (smc::run(&mut m, target, grid, settings, observe)?, true)
        }
        config::Plan::DriftLite { config, passes, .. } => {
            let run = refine(target, grid, settings, config, passes, &mut |_, info| {
                observe(info)
            })?;
            (run, true)
        }
    })
}

fn sample(
    config_path: &Path,
    out: &Path,
    set: &[String],
    reference: Option<&str>,
    reference_samples: usize,
) -> Result<()> {
    let (config, grid, target) = config::load_problem(config_path, set)?;
    let settings = config
        .settings()
        .with_context(|| format!("{}", config_path.display()))?;
    let plan = config
        .plan(&target)
        .with_context(|| format!("{}", config_path.display()))?;
    let reference =
        report::reference_samples(&target, &grid, reference, reference_samples, config.seed)?;
    let staging = io::Staging::new(out)?;

    let passes = match plan {
        config::Plan::DriftLite { passes, .. } => passes,
        config::Plan::Guided(_) | config::Plan::Urge { .. } => 1,
    };
    let bar = report::progress(
        (passes * grid.len()) as u64,
        &format!("{} N={}", config.method, config.particles),
    );
    let (run, weighted) = execute(plan, &target, &grid, &settings, &mut |_| bar.inc(1))?;
    bar.finish_and_clear();

    let exact_log_z = report::exact_log_normalizer(&target, &grid, config.seed);
    let summary = report::summary(
        &config,
        &target,
        &grid,
        &run,
        reference.as_ref(),
        exact_log_z,
    )?;
    io::write_npy(&staging.path("samples.npy"), &run.samples)?;
    io::write_npy(&staging.path("log_weights.npy"), &run.log_weights)?;
    report::write_trace(&staging.path("trace.csv"), &run)?;
    std::fs::write(
        staging.path("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    if config.output.plots.unwrap_or(true) {
        let weighted = weighted.then(|| run.log_weights.view());
        let title = format!(
            "{} — {} particles, {} steps",
            config.method, config.particles, config.steps
        );
        plot::samples_plot(
            &staging.path("samples.png"),
            run.samples.view(),
            weighted,
            reference.as_ref().map(|r| r.view()),
            &title,
        )?;
        report::plot_trace(&staging.path("trace.png"), &run, &title)?;
    }
    let out = staging.commit()?;
    eprintln!("{}", report::one_line(&summary));
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn eval(samples: &Path, log_weights: Option<&Path>, reference: &Path, seed: u64) -> Result<()> {
    let x = io::read_samples(samples)?;
    let y = io::read_samples(reference)?;
    if x.ncols() != y.ncols() {
        bail!(
            "{} has dimension {}, {} has {}",
            samples.display(),
            x.ncols(),
            reference.display(),
            y.ncols()
        );
    }
    let w = match log_weights {
        Some(p) => {
            let l = io::read_vector(p)?;
            if l.len() != x.nrows() {
                bail!(
                    "{} has {} weights for {} samples",
                    p.display(),
                    l.len(),
                    x.nrows()
                );
            }
            let (lw, _) = steer::weights::LogWeights::from_unnormalized(l, 0)
                .with_context(|| format!("{}", p.display()))?;
            Some(lw.normalized())
        }
        None => None,
    };
    let metrics = report::sample_metrics(
        x.view(),
        w.as_ref().map(|w: &Array1<f64>| w.view()),
        y.view(),
        seed,
    )?;
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    Ok(())
}
