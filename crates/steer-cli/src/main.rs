//! The `steer` command line: sample, reference, eval, bench, train, data.

mod bench;
mod config;
mod dataset;
mod io;
mod plot;
mod reference;
mod report;
mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use steer::method::{Doob, DriftLite, GuidedSampler, Method, Urge, refine};
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
    /// Train a score network or a classifier on `.npy` data, or a Doob h-function on base
    /// samples and a reward; write the model, loss curve and a summary.
    Train {
        /// Training configuration (TOML; fields in docs/config.md, "steer train").
        #[arg(long)]
        config: PathBuf,
        /// Output folder (written atomically; replaces a previous steer output); default
        /// `out/<config file name without extension>`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config field, e.g. `--set training.steps=2000`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Write a data set as `.npy` files (from local files only; nothing is downloaded).
    Data {
        #[command(subcommand)]
        set: DataSet,
    },
}

#[derive(Subcommand)]
enum DataSet {
    /// scikit-learn's 8×8 handwritten digits: `images.npy` (n × 64 float64, pixel values
    /// 0..16), `labels.npy` (n int64) and `class-<c>.npy` per digit.
    Digits {
        /// Output folder (written atomically; replaces a previous steer output).
        #[arg(long)]
        out: PathBuf,
        /// `digits.csv.gz` (or an uncompressed copy); default: `$STEER_DIGITS`, then the
        /// installed scikit-learn's copy, then `../shared/data/digits.csv.gz` from the current
        /// folder and from the executable's workspace.
        #[arg(long)]
        source: Option<PathBuf>,
    },
}

/// mimalloc instead of the system allocator: candle allocates a fresh buffer for every
/// tensor operation, and glibc serves buffers of a few MB (a network layer over thousands of
/// particles) with `mmap`, so every operation paid page faults and zeroing. With mimalloc a
/// forward and backward pass of a 30-D h-network over 4096 particles went from 197 ms to
/// about 80 ms.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// candle's defaults for this process, unless the user set them: one thread for its
/// spinning element-wise pool (on busy cores it starves the workers; matrix products stay
/// parallel through rayon), and the graph of first-order gradients kept (second-order
/// gradients, as in Doob's gradient penalty, are only correct with it).
#[allow(unsafe_code)]
fn candle_defaults() {
    for (key, value) in [
        ("CANDLE_NUM_THREADS", "1"),
        ("CANDLE_GRAD_DO_NOT_DETACH", "1"),
    ] {
        if std::env::var_os(key).is_none() {
            // SAFETY: called first thing in `main`, before any other thread exists, so no
            // thread can read the environment concurrently.
            unsafe { std::env::set_var(key, value) };
        }
    }
}

fn main() -> ExitCode {
    candle_defaults();
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
        Command::Train { config, out, set } => {
            let out = out.unwrap_or_else(|| default_out(&config));
            train::run(&config, &out, &set)
        }
        Command::Data {
            set: DataSet::Digits { out, source },
        } => dataset::digits(&out, source.as_deref()),
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
            doob,
        } => {
            let mut m = Urge::new(target, proposal, twist)?.with_twist_schedule(schedule)?;
            if let Some((h, clip)) = doob {
                m = m.with_h_function(h, clip)?;
            }
            (smc::run(&mut m, target, grid, settings, observe)?, true)
        }
        config::Plan::Doob((h, clip)) => {
            let mut m = Doob::new(target, h, clip)?;
            (
                smc::run(&mut m, target, grid, settings, observe)?,
                m.weighted(),
            )
        }
        config::Plan::DriftLite {
            config,
            doob: Some((h, clip)),
            ..
        } => {
            let mut m = DriftLite::new(target, config)?.with_doob(h, clip)?;
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
        .plan(config_path, &target)
        .with_context(|| format!("{}", config_path.display()))?;
    let image = config
        .image_shape(config_path, target.dim())
        .with_context(|| format!("{}", config_path.display()))?;
    let reference =
        report::reference_samples(&target, &grid, reference, reference_samples, config.seed)?;
    let staging = io::Staging::new(out)?;

    let passes = match plan {
        config::Plan::DriftLite { passes, .. } => passes,
        config::Plan::Guided(_) | config::Plan::Urge { .. } | config::Plan::Doob(_) => 1,
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
        match image {
            Some(shape) => images_plot(
                &staging.path("samples.png"),
                run.samples.view(),
                weighted,
                &shape,
                &config.method,
            )?,
            None => plot::samples_plot(
                &staging.path("samples.png"),
                run.samples.view(),
                weighted,
                reference.as_ref().map(|r| r.view()),
                &title,
            )?,
        }
        report::plot_trace(&staging.path("trace.png"), &run, &title)?;
    }
    let out = staging.commit()?;
    eprintln!("{}", report::one_line(&summary));
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Images shown by `samples.png` for image samples.
const SHOWN_IMAGES: usize = 64;

/// The rows of `samples` that `samples.png` shows: the first [`SHOWN_IMAGES`] of unweighted
/// samples; for weighted ones, [`SHOWN_IMAGES`] draws by the normalised weights with the
/// deterministic systematic points `u_j = (j + ½)/k` (no randomness: the same run gives the
/// same picture), so a sample appears about `k·W_i` times.
fn shown_rows(n: usize, log_weights: Option<ArrayView1<f64>>) -> Vec<usize> {
    let k = n.min(SHOWN_IMAGES);
    let Some(lw) = log_weights else {
        return (0..k).collect();
    };
    let max = lw.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let w: Vec<f64> = lw.iter().map(|&v| (v - max).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut rows = Vec::with_capacity(k);
    let (mut i, mut cumulative) = (0, w[0] / total);
    for j in 0..k {
        let u = (j as f64 + 0.5) / k as f64;
        while cumulative < u && i + 1 < n {
            i += 1;
            cumulative += w[i] / total;
        }
        rows.push(i);
    }
    rows
}

/// `samples.png` for image samples: a grid of the rows [`shown_rows`] picks.
fn images_plot(
    path: &Path,
    samples: ArrayView2<f64>,
    log_weights: Option<ArrayView1<f64>>,
    shape: &config::ImageShape,
    method: &str,
) -> Result<()> {
    let rows = shown_rows(samples.nrows(), log_weights);
    let shown: Array2<f64> = samples.select(Axis(0), &rows);
    let range = shape.range.unwrap_or_else(|| {
        let lo = shown.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = shown.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    });
    let how = if log_weights.is_some() {
        "drawn by weight"
    } else {
        "the first"
    };
    let short = |v: f64| {
        let t = format!("{v:.3}");
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    let title = format!(
        "{method} — {} of {} samples ({how}); black {}, white {}",
        rows.len(),
        samples.nrows(),
        short(range.0),
        short(range.1)
    );
    plot::image_grid(
        path,
        shown.view(),
        (shape.channels, shape.height, shape.width),
        range,
        &title,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unweighted_images_are_the_first_ones() {
        assert_eq!(shown_rows(100, None), (0..64).collect::<Vec<_>>());
        assert_eq!(shown_rows(3, None), vec![0, 1, 2]);
    }

    #[test]
    fn weighted_images_follow_the_weights() {
        // Uniform weights over 128 samples: every other sample (u_j = (2j + 1)/128 falls in
        // the cell of sample 2j).
        let uniform = Array1::from_elem(128, -(128f64).ln());
        let rows = shown_rows(128, Some(uniform.view()));
        assert_eq!(rows, (0..64).map(|j| 2 * j).collect::<Vec<_>>());
        // All the weight on sample 7 (the others −∞).
        let mut one = Array1::from_elem(10, f64::NEG_INFINITY);
        one[7] = 0.0;
        assert_eq!(shown_rows(10, Some(one.view())), vec![7; 10]);
        // Weights 3/4 and 1/4 on two of four samples: 48 and 16 copies.
        let lw = Array1::from(vec![
            0.75f64.ln(),
            f64::NEG_INFINITY,
            0.25f64.ln(),
            f64::NEG_INFINITY,
        ]);
        let rows = shown_rows(4, Some(lw.view()));
        assert_eq!(rows.len(), 4);
        let lw = Array1::from_iter((0..100).map(|i| {
            if i == 3 {
                0.75f64.ln()
            } else if i == 50 {
                0.25f64.ln()
            } else {
                f64::NEG_INFINITY
            }
        }));
        let rows = shown_rows(100, Some(lw.view()));
        assert_eq!(rows.iter().filter(|&&r| r == 3).count(), 48);
        assert_eq!(rows.iter().filter(|&&r| r == 50).count(), 16);
    }
}
