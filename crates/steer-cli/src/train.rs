//! `steer train`: fits a score network (denoising score matching) or a classifier to `.npy`
//! data, or a Doob h-function (Doob's matching, MATH.md §7.3) to base samples and a reward,
//! and writes the model, its loss curve and a summary into an output folder.
//! Every field is documented in docs/config.md ("steer train").

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{Array2, Axis};
use serde::Deserialize;
use serde_json::{Value, json};
use steer::classifier::{Classifier, ClassifierConfig, TrainClassifierConfig};
use steer::data::Digits;
use steer::doob_net::{self, DoobLoss, DoobPairs, DoobTrainConfig};
use steer::method::{Guidance, GuidedSampler};
use steer::model::ScoreModel;
use steer::model::nn::{self, Architecture, TrainConfig};
use steer::resample::Scheme;
use steer::rng::{Purpose, Streams};
use steer::schedule::{GridKind, Schedule, TimeGrid};
use steer::smc::{self, ParticleSchedule, ResamplePolicy, Settings};
use steer::target::{Expert, Target, TiltSchedule};

use crate::config::{self, ModelConfig, RewardConfig, ScheduleConfig, finite, resolve, unused};
use crate::{io, plot, report};

/// A whole `steer train` configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    /// "score" (default: a score network), "classifier" or "doob" (a Doob h-function).
    pub kind: Option<String>,
    /// Training data: an `N × d` `.npy` array (float64 or float32), relative to the config;
    /// for kind = "doob", base samples (or draw them with `model` and `samples`).
    pub data: Option<PathBuf>,
    /// Classifier labels: an `N` `.npy` array of integers (or integral floats) in `0..=255`.
    pub labels: Option<PathBuf>,
    /// Doob: the base model, `{ kind = "gmm" | "network", file = ... }`: draws the base
    /// samples (with `samples`) and gives the score of the unbiased loss.
    pub model: Option<ModelConfig>,
    /// Doob: number of base samples drawn from `model`.
    pub samples: Option<usize>,
    /// Doob: steps of the base sampler that draws from a network `model` (default 200).
    pub sampler_steps: Option<usize>,
    /// Score networks and Doob h-functions: the forward noise schedule (its `tau_min` is the
    /// smallest time trained on).
    pub schedule: Option<ScheduleConfig>,
    /// Doob: the reward r whose h-function `E[e^r | x_τ]` is learned.
    pub reward: Option<RewardConfig>,
    /// The network (default: the library's residual MLP for the data's dimension).
    pub architecture: Option<ArchitectureSection>,
    /// Optimisation settings.
    #[serde(default)]
    pub training: TrainingSection,
}

/// `[architecture]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchitectureSection {
    /// "mlp" (default) or "unet" (score networks only).
    pub kind: Option<String>,
    /// MLP width: an integer for score networks, a list of widths for classifiers.
    pub hidden: Option<toml::Value>,
    /// Residual blocks of the score MLP.
    pub blocks: Option<usize>,
    /// Width of the sinusoidal noise embedding (score networks).
    pub embedding: Option<usize>,
    /// U-Net image channels (default 1).
    pub channels_in: Option<usize>,
    /// U-Net image height (default √d for one channel and a square d).
    pub height: Option<usize>,
    /// U-Net image width (default as `height`).
    pub width: Option<usize>,
    /// U-Net base feature channels (default 32).
    pub channels: Option<usize>,
}

/// `[training]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Score networks: optimiser steps.
    pub steps: Option<usize>,
    /// Minibatch size.
    pub batch: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: Option<f64>,
    /// Score networks: linear warm-up steps.
    pub warmup: Option<usize>,
    /// Score networks: EMA decay per step.
    pub ema_decay: Option<f64>,
    /// Fraction of the data held out for validation.
    pub heldout_fraction: Option<f64>,
    /// Score networks: steps between held-out evaluations.
    pub eval_every: Option<usize>,
    /// Seed of every random draw.
    pub seed: Option<u64>,
    /// Classifiers: passes over the training set.
    pub epochs: Option<usize>,
    /// Classifiers: AdamW weight decay.
    pub weight_decay: Option<f64>,
    /// Classifiers: Gaussian noise augmentation level, in the units of the data.
    pub noise_std: Option<f64>,
    /// Doob: "penalised" or "unbiased" (default: the library's).
    pub loss: Option<String>,
    /// Doob: weight λ_gp ≥ 0 of the loss's gradient term.
    pub lambda_gp: Option<f64>,
    /// Doob: "fixed" or "fresh" noise of the training pairs (default: the library's).
    pub pairs: Option<String>,
    /// Doob, unbiased loss: distinct noise levels per minibatch (one score call each).
    pub score_levels: Option<usize>,
    /// Doob: threads of the training steps.
    pub threads: Option<usize>,
}

/// Runs `steer train`.
pub fn run(config_path: &Path, out: &Path, set: &[String]) -> Result<()> {
    let start = Instant::now();
    let file: TrainFile = config::load_toml(config_path, set)?;
    let at = || config_path.display().to_string();
    let kind = file.kind.as_deref().unwrap_or("score");
    match kind {
        "score" => score(&file, config_path, out, start).with_context(at),
        "classifier" => classifier(&file, config_path, out, start).with_context(at),
        "doob" => doob(&file, config_path, out, start).with_context(at),
        other => bail!(
            "{}: `kind` = \"{other}\" is unknown (expected score, classifier or doob)",
            at()
        ),
    }
}

/// The training data, named as `data` (and its file) on error.
fn read_data(file: &TrainFile, config_path: &Path) -> Result<(PathBuf, Array2<f64>)> {
    let data = file.data.as_ref().ok_or_else(|| {
        anyhow!(
            "`data` is required for kind = \"{}\"",
            file.kind.as_deref().unwrap_or("score")
        )
    })?;
    let path = resolve(config_path, data);
    let x = io::read_samples(&path).with_context(|| format!("`data` ({})", path.display()))?;
    if x.nrows() < 2 {
        bail!(
            "`data` ({}) has {} row(s); training needs at least 2",
            path.display(),
            x.nrows()
        );
    }
    Ok((path, x))
}

/// Fails on fields of `[training]` that the kind does not read.
fn reject(kind: &str, fields: &[(&str, bool)]) -> Result<()> {
    for (name, present) in fields {
        if *present {
            bail!("`training.{name}` does not apply to kind = \"{kind}\"");
        }
    }
    Ok(())
}

/// Fails on the fields of Doob's matching for the other kinds.
fn reject_doob_fields(kind: &str, file: &TrainFile) -> Result<()> {
    for (name, present) in [
        ("model", file.model.is_some()),
        ("samples", file.samples.is_some()),
        ("sampler_steps", file.sampler_steps.is_some()),
        ("[reward]", file.reward.is_some()),
    ] {
        if present {
            bail!("`{name}` applies only to kind = \"doob\", not to kind = \"{kind}\"");
        }
    }
    let t = &file.training;
    reject(
        kind,
        &[
            ("loss", t.loss.is_some()),
            ("lambda_gp", t.lambda_gp.is_some()),
            ("pairs", t.pairs.is_some()),
            ("score_levels", t.score_levels.is_some()),
            ("threads", t.threads.is_some()),
        ],
    )
}

/// The forward schedule of `[schedule]` for training; the sampling-grid fields are errors.
fn training_schedule(s: &ScheduleConfig) -> Result<Schedule> {
    for (name, present) in [
        ("grid", s.grid.is_some()),
        ("rho", s.rho.is_some()),
        ("tau_max", s.tau_max.is_some()),
        ("eta", s.eta.is_some()),
    ] {
        if present {
            bail!("`schedule.{name}` is a sampling setting; it does not apply to `steer train`");
        }
    }
    s.schedule()
}

/// `schedule.tau_min` (default `default`), which must lie in (0, T).
fn training_tau_min(s: &ScheduleConfig, schedule: &Schedule, default: f64) -> Result<f64> {
    let tau_min = finite("schedule.tau_min", s.tau_min, default)?;
    if !(tau_min > 0.0 && tau_min < schedule.horizon()) {
        bail!(
            "`schedule.tau_min` must lie in (0, T = {}), got {tau_min}",
            schedule.horizon()
        );
    }
    Ok(tau_min)
}

fn ema_decay(t: &TrainingSection, default: f64) -> Result<f64> {
    let decay = finite("training.ema_decay", t.ema_decay, default)?;
    if !(0.0..1.0).contains(&decay) {
        bail!("`training.ema_decay` must lie in [0, 1), got {decay}");
    }
    Ok(decay)
}

fn positive(field: &str, v: usize) -> Result<usize> {
    if v == 0 {
        bail!("`{field}` must be at least 1");
    }
    Ok(v)
}

fn heldout_fraction(t: &TrainingSection, default: f64) -> Result<f64> {
    let f = finite("training.heldout_fraction", t.heldout_fraction, default)?;
    if !(0.0..0.5).contains(&f) {
        bail!("`training.heldout_fraction` must lie in [0, 0.5), got {f}");
    }
    Ok(f)
}

fn learning_rate(t: &TrainingSection, default: f64) -> Result<f64> {
    let lr = finite("training.learning_rate", t.learning_rate, default)?;
    if lr <= 0.0 {
        bail!("`training.learning_rate` must be positive, got {lr}");
    }
    Ok(lr)
}

// ---------------------------------------------------------------------------------------
// Score networks.

fn score(file: &TrainFile, config_path: &Path, out: &Path, start: Instant) -> Result<()> {
    if file.labels.is_some() {
        bail!("`labels` applies only to kind = \"classifier\"");
    }
    reject_doob_fields("score", file)?;
    let t = &file.training;
    reject(
        "score",
        &[
            ("epochs", t.epochs.is_some()),
            ("weight_decay", t.weight_decay.is_some()),
            ("noise_std", t.noise_std.is_some()),
        ],
    )?;
    let s = file
        .schedule
        .as_ref()
        .ok_or_else(|| anyhow!("`[schedule]` is required for kind = \"score\""))?;
    let schedule = training_schedule(s)?;
    let (data_path, x) = read_data(file, config_path)?;
    let d = x.ncols();

    let mut cfg = TrainConfig::new(d, schedule);
    cfg.tau_min = training_tau_min(s, &schedule, cfg.tau_min)?;
    cfg.architecture = score_architecture(file.architecture.as_ref(), d)?;
    cfg.architecture
        .validate(d)
        .with_context(|| format!("`[architecture]` for data of dimension {d}"))?;
    cfg.steps = positive("training.steps", t.steps.unwrap_or(cfg.steps))?;
    cfg.batch = positive("training.batch", t.batch.unwrap_or(cfg.batch))?;
    cfg.learning_rate = learning_rate(t, cfg.learning_rate)?;
    cfg.warmup = t.warmup.unwrap_or(cfg.warmup);
    cfg.ema_decay = ema_decay(t, cfg.ema_decay)?;
    cfg.heldout_fraction = heldout_fraction(t, cfg.heldout_fraction)?;
    cfg.eval_every = positive(
        "training.eval_every",
        t.eval_every.unwrap_or(cfg.eval_every),
    )?;
    cfg.seed = t.seed.unwrap_or(cfg.seed);

    let staging = io::Staging::new(out)?;
    let bar = report::progress_in(cfg.steps as u64, "training", "steps");
    let network = nn::train(x.view(), &cfg, |p| show_loss(&bar, p))
        .with_context(|| format!("training on {}", data_path.display()))?;
    bar.finish_and_clear();

    network.save(&staging.path("model.json"))?;
    let spec = network.spec();
    let training = spec
        .training
        .as_ref()
        .ok_or_else(|| anyhow!("the trained network carries no training summary"))?;
    let history = &training.history;
    let title = format!(
        "denoising score matching — {} examples, d = {d}",
        training.train_examples
    );
    write_loss_curve(&staging, history, "loss (mean squared noise error)", &title)?;
    let last = history.last();
    let summary = json!({
        "kind": "score",
        "data": data_path.display().to_string(),
        "examples": x.nrows(),
        "dimension": d,
        "architecture": spec.architecture,
        "schedule": spec.schedule,
        "tau_min": spec.tau_min,
        "parameters": training.parameters,
        "steps": training.steps,
        "batch": training.batch,
        "learning_rate": training.learning_rate,
        "warmup": cfg.warmup,
        "ema_decay": training.ema_decay,
        "heldout_fraction": cfg.heldout_fraction,
        "seed": training.seed,
        "train_examples": training.train_examples,
        "heldout_examples": training.heldout_examples,
        "final_train_loss": last.map(|p| p.train),
        "final_heldout_loss": last.and_then(|p| p.heldout),
        "training_seconds": training.seconds,
        "examples_per_second": training.examples_per_second,
        "seconds": start.elapsed().as_secs_f64(),
        "model": "model.json",
    });
    finish(staging, &summary, &format_score_line(&summary))
}

/// The score network of `[architecture]`; missing fields take the library's defaults.
fn score_architecture(a: Option<&ArchitectureSection>, d: usize) -> Result<Architecture> {
    let Architecture::Mlp {
        hidden: default_hidden,
        blocks: default_blocks,
        embedding: default_embedding,
    } = Architecture::default_mlp(d)
    else {
        unreachable!("the default architecture is an MLP")
    };
    let Some(a) = a else {
        return Ok(Architecture::default_mlp(d));
    };
    let embedding = a.embedding.unwrap_or(default_embedding);
    match a.kind.as_deref().unwrap_or("mlp") {
        "mlp" => {
            unused(
                "architecture",
                "mlp",
                &[
                    ("channels_in", a.channels_in.is_some()),
                    ("height", a.height.is_some()),
                    ("width", a.width.is_some()),
                    ("channels", a.channels.is_some()),
                ],
            )?;
            Ok(Architecture::Mlp {
                hidden: mlp_hidden(a, default_hidden, "score")?,
                blocks: a.blocks.unwrap_or(default_blocks),
                embedding,
            })
        }
        "unet" => {
            unused(
                "architecture",
                "unet",
                &[
                    ("hidden", a.hidden.is_some()),
                    ("blocks", a.blocks.is_some()),
                ],
            )?;
            let channels_in = a.channels_in.unwrap_or(1);
            let side = (d as f64).sqrt().round() as usize;
            let square = channels_in == 1 && side * side == d;
            let (height, width) = match (a.height, a.width) {
                (Some(h), Some(w)) => (h, w),
                (Some(h), None) | (None, Some(h)) => (h, h),
                (None, None) if square => (side, side),
                (None, None) => bail!(
                    "`architecture.height` and `architecture.width` are required: the data's dimension {d} is not a square image of one channel"
                ),
            };
            Ok(Architecture::Unet {
                channels_in,
                height,
                width,
                channels: a.channels.unwrap_or(32),
                embedding,
            })
        }
        other => bail!("`architecture.kind` = \"{other}\" is unknown (expected mlp or unet)"),
    }
}

/// `architecture.hidden` of a residual MLP (score or Doob), `default` when absent.
fn mlp_hidden(a: &ArchitectureSection, default: usize, what: &str) -> Result<usize> {
    match &a.hidden {
        None => Ok(default),
        Some(v) => v
            .as_integer()
            .and_then(|h| usize::try_from(h).ok())
            .ok_or_else(|| {
                anyhow!(
                    "`architecture.hidden` must be a non-negative integer (the width of the {what} MLP), got {v}"
                )
            }),
    }
}

fn format_score_line(s: &Value) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let mut line = format!(
        "score network: {} steps in {:.1} s ({:.0} examples/s), train loss {:.4}",
        s["steps"],
        f("training_seconds"),
        f("examples_per_second"),
        f("final_train_loss")
    );
    if let Some(h) = s["final_heldout_loss"].as_f64() {
        line += &format!(", held-out {h:.4}");
    }
    line
}

// ---------------------------------------------------------------------------------------
// Classifiers.

fn classifier(file: &TrainFile, config_path: &Path, out: &Path, start: Instant) -> Result<()> {
    if file.schedule.is_some() {
        bail!("`[schedule]` applies only to kind = \"score\" and kind = \"doob\"");
    }
    reject_doob_fields("classifier", file)?;
    let t = &file.training;
    reject(
        "classifier",
        &[
            ("steps", t.steps.is_some()),
            ("warmup", t.warmup.is_some()),
            ("ema_decay", t.ema_decay.is_some()),
            ("eval_every", t.eval_every.is_some()),
        ],
    )?;
    let labels_file = file
        .labels
        .as_ref()
        .ok_or_else(|| anyhow!("`labels` is required for kind = \"classifier\""))?;
    let hidden = classifier_architecture(file.architecture.as_ref())?;
    let (data_path, x) = read_data(file, config_path)?;
    let labels_path = resolve(config_path, labels_file);
    let labels = io::read_labels(&labels_path)
        .with_context(|| format!("`labels` ({})", labels_path.display()))?;
    if labels.len() != x.nrows() {
        bail!(
            "`labels` ({}) has {} entries, but `data` ({}) has {} rows",
            labels_path.display(),
            labels.len(),
            data_path.display(),
            x.nrows()
        );
    }
    let classes = usize::from(labels.iter().copied().max().unwrap_or(0)) + 1;
    if classes < 2 {
        bail!(
            "`labels` ({}) hold a single class; a classifier needs at least 2 (labels 0 and 1)",
            labels_path.display()
        );
    }
    let cfg = TrainClassifierConfig {
        architecture: ClassifierConfig { hidden },
        epochs: positive("training.epochs", t.epochs.unwrap_or(40))?,
        batch_size: positive("training.batch", t.batch.unwrap_or(64))?,
        learning_rate: learning_rate(t, 1e-3)?,
        weight_decay: finite("training.weight_decay", t.weight_decay, 0.0)?,
        noise_std: finite("training.noise_std", t.noise_std, 0.0)?,
    };
    if cfg.weight_decay < 0.0 {
        bail!(
            "`training.weight_decay` must be ≥ 0, got {}",
            cfg.weight_decay
        );
    }
    if cfg.noise_std < 0.0 {
        bail!("`training.noise_std` must be ≥ 0, got {}", cfg.noise_std);
    }
    let fraction = heldout_fraction(t, 0.1)?;
    let seed = t.seed.unwrap_or(0);
    let examples = x.nrows();
    let all = Digits::new(x, labels)?;
    let (train_set, heldout) = if fraction > 0.0 {
        let (a, b) = all.split(fraction, seed)?;
        (a, Some(b).filter(|b| !b.is_empty()))
    } else {
        (all, None)
    };

    let staging = io::Staging::new(out)?;
    let bar = report::progress_in(cfg.epochs as u64, "training", "epochs");
    let mut history = Vec::new();
    let mut clf = Classifier::train(
        train_set.images.view(),
        &train_set.labels,
        classes,
        &cfg,
        seed,
        |p| {
            bar.set_position(p.epoch as u64);
            bar.set_message(format!("loss {:.4}, accuracy {:.3}", p.loss, p.accuracy));
            history.push((p.steps, p.epoch, p.loss, p.accuracy));
        },
    )
    .with_context(|| format!("training on {}", data_path.display()))?;
    bar.finish_and_clear();

    let (heldout_accuracy, heldout_loss) = match &heldout {
        Some(h) => {
            let accuracy = clf.record_heldout_accuracy(h.images.view(), &h.labels)?;
            let lp = clf.log_probs(h.images.view())?;
            let loss = -lp
                .axis_iter(Axis(0))
                .zip(&h.labels)
                .map(|(row, &c)| row[usize::from(c)])
                .sum::<f64>()
                / h.len() as f64;
            (Some(accuracy), Some(loss))
        }
        None => (None, None),
    };
    clf.save(&staging.path("model"))?;
    let n = history.len();
    write_csv(
        &staging.path("loss.csv"),
        "step,epoch,train,train_accuracy,heldout",
        history
            .iter()
            .enumerate()
            .map(|(i, (step, epoch, loss, acc))| {
                let h = if i + 1 == n {
                    heldout_loss.map(|h| h.to_string()).unwrap_or_default()
                } else {
                    String::new()
                };
                format!("{step},{epoch},{loss},{acc},{h}")
            }),
    )?;
    let title = match heldout_accuracy {
        Some(a) => format!(
            "classifier — {classes} classes, held-out accuracy {:.1}%",
            100.0 * a
        ),
        None => format!("classifier — {classes} classes"),
    };
    plot::lines_plot(
        &staging.path("loss.png"),
        "step",
        "cross-entropy",
        &[(
            "train (per epoch)".to_string(),
            history.iter().map(|h| h.0 as f64).collect(),
            history.iter().map(|h| h.2).collect(),
        )],
        true,
        &title,
    )?;
    let summary_lib = clf
        .summary()
        .ok_or_else(|| anyhow!("the trained classifier carries no training summary"))?;
    let seconds = summary_lib.seconds;
    let processed = (summary_lib.train_size * summary_lib.epochs) as f64;
    let summary = json!({
        "kind": "classifier",
        "data": data_path.display().to_string(),
        "labels": labels_path.display().to_string(),
        "examples": examples,
        "dimension": clf.input_dim(),
        "classes": classes,
        "architecture": { "kind": "mlp", "hidden": clf.architecture().hidden },
        "heldout_fraction": fraction,
        "heldout_examples": heldout.as_ref().map_or(0, Digits::len),
        "heldout_accuracy": heldout_accuracy,
        "heldout_loss": heldout_loss,
        "training": summary_lib,
        "training_seconds": seconds,
        "examples_per_second": if seconds > 0.0 { processed / seconds } else { f64::NAN },
        "seconds": start.elapsed().as_secs_f64(),
        "model": "model.json",
    });
    let line = format!(
        "classifier: {} epochs in {seconds:.1} s, train accuracy {:.3}{}",
        summary_lib.epochs,
        summary_lib.train_accuracy,
        heldout_accuracy
            .map(|a| format!(", held-out accuracy {a:.3}"))
            .unwrap_or_default()
    );
    finish(staging, &summary, &line)
}

/// The classifier's hidden widths from `[architecture]` (default `[128, 128]`).
fn classifier_architecture(a: Option<&ArchitectureSection>) -> Result<Vec<usize>> {
    let Some(a) = a else {
        return Ok(vec![128, 128]);
    };
    match a.kind.as_deref().unwrap_or("mlp") {
        "mlp" => {}
        "unet" => bail!(
            "`architecture.kind` = \"unet\" is for score networks; classifiers are MLPs (kind = \"mlp\")"
        ),
        other => bail!("`architecture.kind` = \"{other}\" is unknown (expected mlp)"),
    }
    unused(
        "architecture",
        "mlp (classifier)",
        &[
            ("blocks", a.blocks.is_some()),
            ("embedding", a.embedding.is_some()),
            ("channels_in", a.channels_in.is_some()),
            ("height", a.height.is_some()),
            ("width", a.width.is_some()),
            ("channels", a.channels.is_some()),
        ],
    )?;
    let Some(v) = &a.hidden else {
        return Ok(vec![128, 128]);
    };
    let bad = || {
        anyhow!(
            "`architecture.hidden` must be a list of positive widths for a classifier (e.g. [128, 128]; [] is logistic regression), got {v}"
        )
    };
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|w| {
            w.as_integer()
                .and_then(|w| usize::try_from(w).ok())
                .filter(|&w| w > 0)
                .ok_or_else(bad)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Doob h-functions.

/// Steps of the base sampler that draws from a network `model`, unless `sampler_steps` says.
const DEFAULT_SAMPLER_STEPS: usize = 200;

/// Salt of the base samples' seed: `training.seed ^ BASE_SEED_SALT`, so that they are
/// independent of the training draws made from `training.seed` itself.
const BASE_SEED_SALT: u64 = 0xba5e;

/// Where the base samples of Doob's matching come from.
enum BaseSamples {
    /// A `.npy` file.
    Data(PathBuf),
    /// `count` exact draws from a Gaussian-mixture `model`.
    Exact { count: usize },
    /// `count` runs of the base sampler on a network `model` over `steps` steps.
    Sampler { count: usize, steps: usize },
}

fn doob(file: &TrainFile, config_path: &Path, out: &Path, start: Instant) -> Result<()> {
    if file.labels.is_some() {
        bail!("`labels` applies only to kind = \"classifier\"");
    }
    let t = &file.training;
    reject(
        "doob",
        &[
            ("epochs", t.epochs.is_some()),
            ("weight_decay", t.weight_decay.is_some()),
            ("noise_std", t.noise_std.is_some()),
        ],
    )?;
    let s = file.schedule.as_ref().ok_or_else(|| {
        anyhow!(
            "`[schedule]` is required for kind = \"doob\": the base model's forward schedule (sampling with the h-function must use the same)"
        )
    })?;
    let schedule = training_schedule(s)?;
    let r = file.reward.as_ref().ok_or_else(|| {
        anyhow!("`[reward]` is required for kind = \"doob\": the reward r whose h-function E[e^r | x_τ] is learned")
    })?;
    for (name, present) in [
        ("schedule", r.schedule.is_some()),
        ("power", r.power.is_some()),
        ("beta_min", r.beta_min.is_some()),
        ("switch", r.switch.is_some()),
    ] {
        if present {
            bail!(
                "`reward.{name}` is a sampling setting (the reward schedule β_t); it does not apply to `steer train`"
            );
        }
    }
    let (reward, _) = r.build(config_path)?;

    // The base model, and the source and dimension of the base samples.
    let model_path = file.model.as_ref().map(|m| resolve(config_path, &m.file));
    let model: Option<Arc<dyn ScoreModel>> = match &file.model {
        Some(m) => Some(m.load(config_path, "model")?),
        None => None,
    };
    let network_tau_min = match (&file.model, &model_path) {
        (Some(m), Some(p)) if m.kind == "network" => Some(
            io::read_network_spec(p)
                .with_context(|| format!("`model.file` ({})", p.display()))?
                .tau_min,
        ),
        _ => None,
    };
    let mut data = None;
    let source = match (&file.data, file.samples, &model) {
        (Some(_), Some(_), _) => {
            bail!("give either `data` (base samples) or `samples` (drawn from `model`), not both")
        }
        (Some(_), None, _) => {
            let (path, x) = read_data(file, config_path)?;
            data = Some(x);
            BaseSamples::Data(path)
        }
        (None, Some(_), None) => {
            bail!("`samples` draws the base samples from `model`, which is missing")
        }
        (None, Some(count), Some(m)) => {
            if count < 2 {
                bail!("`samples` must be at least 2, got {count}");
            }
            if m.as_mixture().is_some() {
                BaseSamples::Exact { count }
            } else {
                BaseSamples::Sampler {
                    count,
                    steps: positive(
                        "sampler_steps",
                        file.sampler_steps.unwrap_or(DEFAULT_SAMPLER_STEPS),
                    )?,
                }
            }
        }
        (None, None, _) => bail!(
            "kind = \"doob\" needs base samples: `data` (an N × d .npy file), or `model` with `samples` (the number to draw)"
        ),
    };
    if file.sampler_steps.is_some() && !matches!(source, BaseSamples::Sampler { .. }) {
        bail!(
            "`sampler_steps` applies only when `samples` are drawn from a network `model` (a Gaussian mixture is sampled exactly)"
        );
    }
    let d = match (&data, &model) {
        (Some(x), _) => x.ncols(),
        (None, Some(m)) => m.dim(),
        (None, None) => unreachable!("checked above"),
    };
    if let (Some(m), BaseSamples::Data(p)) = (&model, &source)
        && m.dim() != d
    {
        bail!(
            "dimension mismatch: `data` ({}) has dimension {d}, `model.file` ({}) has dimension {}",
            p.display(),
            model_path.as_ref().expect("with a model").display(),
            m.dim()
        );
    }
    if reward.dim() != d {
        bail!(
            "dimension mismatch: {} has dimension {}, the base samples have dimension {d}",
            r.field(config_path),
            reward.dim()
        );
    }

    // Settings: the library's defaults for whatever is not set.
    let mut cfg = DoobTrainConfig::new(d, schedule);
    cfg.tau_min = training_tau_min(s, &schedule, cfg.tau_min)?;
    cfg.architecture = doob_architecture(file.architecture.as_ref(), cfg.architecture.clone())?;
    cfg.architecture
        .validate(d)
        .with_context(|| format!("`[architecture]` for samples of dimension {d}"))?;
    cfg.loss = match t.loss.as_deref() {
        None => cfg.loss,
        Some("penalised") => DoobLoss::Penalised,
        Some("unbiased") => DoobLoss::Unbiased,
        Some(other) => {
            bail!("`training.loss` = \"{other}\" is unknown (expected penalised or unbiased)")
        }
    };
    cfg.lambda_gp = finite("training.lambda_gp", t.lambda_gp, cfg.lambda_gp)?;
    if cfg.lambda_gp < 0.0 {
        bail!("`training.lambda_gp` must be ≥ 0, got {}", cfg.lambda_gp);
    }
    cfg.pairs = match t.pairs.as_deref() {
        None => cfg.pairs,
        Some("fixed") => DoobPairs::Fixed,
        Some("fresh") => DoobPairs::Fresh,
        Some(other) => {
            bail!("`training.pairs` = \"{other}\" is unknown (expected fixed or fresh)")
        }
    };
    cfg.steps = positive("training.steps", t.steps.unwrap_or(cfg.steps))?;
    cfg.batch = positive("training.batch", t.batch.unwrap_or(cfg.batch))?;
    cfg.learning_rate = learning_rate(t, cfg.learning_rate)?;
    cfg.warmup = t.warmup.unwrap_or(cfg.warmup);
    cfg.ema_decay = ema_decay(t, cfg.ema_decay)?;
    cfg.heldout_fraction = heldout_fraction(t, cfg.heldout_fraction)?;
    cfg.eval_every = positive(
        "training.eval_every",
        t.eval_every.unwrap_or(cfg.eval_every),
    )?;
    if t.score_levels.is_some() && cfg.loss != DoobLoss::Unbiased {
        bail!("`training.score_levels` applies only to loss = \"unbiased\"");
    }
    cfg.score_levels = positive(
        "training.score_levels",
        t.score_levels.unwrap_or(cfg.score_levels),
    )?;
    if cfg.loss == DoobLoss::Unbiased && cfg.score_levels > cfg.batch {
        bail!(
            "`training.score_levels` = {} must not exceed `training.batch` = {}",
            cfg.score_levels,
            cfg.batch
        );
    }
    cfg.threads = positive("training.threads", t.threads.unwrap_or(cfg.threads))?;
    cfg.seed = t.seed.unwrap_or(cfg.seed);
    if cfg.loss == DoobLoss::Unbiased && model.is_none() {
        bail!(
            "`training.loss` = \"unbiased\" needs the base model's score: add `model = {{ kind = \"gmm\" | \"network\", file = \"...\" }}` (the model the samples in `data` come from), or use loss = \"penalised\""
        );
    }

    let staging = io::Staging::new(out)?;
    let sampling_start = Instant::now();
    let base_seed = cfg.seed ^ BASE_SEED_SALT;
    let x = match (&source, data) {
        (BaseSamples::Data(_), Some(x)) => x,
        (BaseSamples::Exact { count }, _) => {
            let mixture = model
                .as_ref()
                .and_then(|m| m.as_mixture())
                .expect("an exact source is a mixture");
            mixture.sample(*count, &Streams::new(base_seed), Purpose::Reference)
        }
        (BaseSamples::Sampler { count, steps }, _) => base_sampler(
            model.clone().expect("a sampler source has a model"),
            schedule,
            network_tau_min.expect("a sampler source is a network"),
            *count,
            *steps,
            base_seed,
        )
        .with_context(|| {
            format!(
                "drawing the base samples from `model.file` ({})",
                model_path.as_ref().expect("with a model").display()
            )
        })?,
        (BaseSamples::Data(_), None) => unreachable!("the data were read"),
    };
    let sampling_seconds = sampling_start.elapsed().as_secs_f64();

    let bar = report::progress_in(cfg.steps as u64, "training", "steps");
    let network = doob_net::train(x.view(), reward.as_ref(), model, &cfg, |p| {
        show_loss(&bar, p)
    })
    .with_context(|| match &source {
        BaseSamples::Data(p) => format!("training on {}", p.display()),
        _ => "training on the base samples".to_string(),
    })?;
    bar.finish_and_clear();

    network.save(&staging.path("doob.json"))?;
    let spec = network.spec();
    let training = spec
        .training
        .as_ref()
        .ok_or_else(|| anyhow!("the trained h-function carries no training summary"))?;
    let history = &training.history;
    let loss_name = match cfg.loss {
        DoobLoss::Penalised => "penalised",
        DoobLoss::Unbiased => "unbiased",
    };
    let title = format!(
        "Doob's matching ({loss_name}, λ_gp = {}) — {} examples, d = {d}",
        cfg.lambda_gp, training.train_examples
    );
    write_loss_curve(
        &staging,
        history,
        "loss ((ĥ − Y)² + λ_gp · gradient term)",
        &title,
    )?;
    let (base, sampler_steps) = match &source {
        BaseSamples::Data(_) => ("data", None),
        BaseSamples::Exact { .. } => ("exact", None),
        BaseSamples::Sampler { steps, .. } => ("base sampler", Some(*steps)),
    };
    let last = history.last();
    let summary = json!({
        "kind": "doob",
        "data": match &source {
            BaseSamples::Data(p) => Some(p.display().to_string()),
            _ => None,
        },
        "base_model": model_path.as_ref().map(|p| p.display().to_string()),
        "base_samples": base,
        "sampler_steps": sampler_steps,
        "sampling_seconds": sampling_seconds,
        "examples": x.nrows(),
        "dimension": d,
        "reward": r.kind,
        "reward_max": spec.reward_max,
        "architecture": spec.architecture,
        "schedule": spec.schedule,
        "tau_min": spec.tau_min,
        "loss": spec.loss,
        "lambda_gp": spec.lambda_gp,
        "pairs": spec.pairs,
        "score_levels": (cfg.loss == DoobLoss::Unbiased).then_some(cfg.score_levels),
        "threads": cfg.threads,
        "parameters": network.parameter_count(),
        "steps": training.steps,
        "batch": training.batch,
        "learning_rate": training.learning_rate,
        "warmup": cfg.warmup,
        "ema_decay": training.ema_decay,
        "heldout_fraction": cfg.heldout_fraction,
        "eval_every": cfg.eval_every,
        "seed": training.seed,
        "train_examples": training.train_examples,
        "heldout_examples": training.heldout_examples,
        "final_train_loss": last.map(|p| p.train),
        "final_heldout_loss": last.and_then(|p| p.heldout),
        "training_seconds": training.seconds,
        "examples_per_second": training.examples_per_second,
        "seconds": start.elapsed().as_secs_f64(),
        "model": "doob.json",
    });
    let mut line = format!(
        "Doob h-function: {} steps in {:.1} s ({:.0} examples/s), train loss {:.4}",
        training.steps,
        training.seconds,
        training.examples_per_second,
        last.map_or(f64::NAN, |p| p.train)
    );
    if let Some(h) = last.and_then(|p| p.heldout) {
        line += &format!(", held-out {h:.4}");
    }
    finish(staging, &summary, &line)
}

/// `count` samples of a network's base reverse SDE (η = 1) over `steps` steps of `schedule`'s
/// default grid, down to the network's `tau_min`.
fn base_sampler(
    model: Arc<dyn ScoreModel>,
    schedule: Schedule,
    tau_min: f64,
    count: usize,
    steps: usize,
    seed: u64,
) -> Result<Array2<f64>> {
    let kind = if schedule.is_variance_exploding() {
        GridKind::Edm { rho: 7.0 }
    } else {
        GridKind::Uniform
    };
    let grid = TimeGrid::new(
        schedule,
        kind,
        steps,
        schedule.default_tau_max(),
        tau_min,
        1.0,
    )?;
    let target = Target::new(
        vec![Expert { model, gamma: 1.0 }],
        None,
        TiltSchedule::Linear,
    )?;
    let settings = Settings {
        particles: ParticleSchedule::Constant(count),
        policy: ResamplePolicy::Never,
        scheme: Scheme::default(),
        final_resample: false,
        window: None,
        seed,
    };
    let mut method = GuidedSampler::new(&target, Guidance::Base);
    let bar = report::progress(grid.len() as u64, &format!("base samples N={count}"));
    let run = smc::run(&mut method, &target, &grid, &settings, &mut |_| bar.inc(1))?;
    bar.finish_and_clear();
    Ok(run.samples)
}

/// The h-network of `[architecture]`: a residual MLP; missing fields take `default`'s values
/// (the library's default for the dimension).
fn doob_architecture(
    a: Option<&ArchitectureSection>,
    default: Architecture,
) -> Result<Architecture> {
    let Architecture::Mlp {
        hidden,
        blocks,
        embedding,
    } = default
    else {
        bail!("the library's default h-network is not an MLP")
    };
    let Some(a) = a else {
        return Ok(default);
    };
    match a.kind.as_deref().unwrap_or("mlp") {
        "mlp" => {}
        "unet" => bail!(
            "`architecture.kind` = \"unet\" is for score networks; a Doob h-network is a residual MLP (kind = \"mlp\") with one output"
        ),
        other => bail!("`architecture.kind` = \"{other}\" is unknown (expected mlp)"),
    }
    unused(
        "architecture",
        "mlp",
        &[
            ("channels_in", a.channels_in.is_some()),
            ("height", a.height.is_some()),
            ("width", a.width.is_some()),
            ("channels", a.channels.is_some()),
        ],
    )?;
    Ok(Architecture::Mlp {
        hidden: mlp_hidden(a, hidden, "h-network")?,
        blocks: a.blocks.unwrap_or(blocks),
        embedding: a.embedding.unwrap_or(embedding),
    })
}

// ---------------------------------------------------------------------------------------
// Output.

/// Shows a training progress report on `bar`.
fn show_loss(bar: &indicatif::ProgressBar, p: &nn::TrainProgress) {
    bar.set_position(p.step as u64);
    bar.set_message(match p.loss.heldout {
        Some(h) => format!("loss {:.4} (held-out {h:.4})", p.loss.train),
        None => format!("loss {:.4}", p.loss.train),
    });
}

/// Writes the loss curve of a network training as `loss.csv` and `loss.png` (training loss,
/// and the held-out loss of the EMA weights when there is one).
fn write_loss_curve(
    staging: &io::Staging,
    history: &[nn::LossPoint],
    y_label: &str,
    title: &str,
) -> Result<()> {
    write_csv(
        &staging.path("loss.csv"),
        "step,train,heldout",
        history.iter().map(|p| {
            format!(
                "{},{},{}",
                p.step,
                p.train,
                p.heldout.map(|h| h.to_string()).unwrap_or_default()
            )
        }),
    )?;
    let steps: Vec<f64> = history.iter().map(|p| p.step as f64).collect();
    let mut series = vec![(
        "train".to_string(),
        steps.clone(),
        history.iter().map(|p| p.train).collect(),
    )];
    if history.iter().any(|p| p.heldout.is_some()) {
        series.push((
            "held-out (EMA weights)".to_string(),
            steps,
            history
                .iter()
                .map(|p| p.heldout.unwrap_or(f64::NAN))
                .collect(),
        ));
    }
    plot::lines_plot(
        &staging.path("loss.png"),
        "step",
        y_label,
        &series,
        true,
        title,
    )
}

fn write_csv(path: &Path, header: &str, rows: impl Iterator<Item = String>) -> Result<()> {
    let mut text = String::from(header);
    text.push('\n');
    for r in rows {
        text += &r;
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn finish(staging: io::Staging, summary: &Value, line: &str) -> Result<()> {
    std::fs::write(
        staging.path("summary.json"),
        serde_json::to_string_pretty(summary)? + "\n",
    )?;
    let out = staging.commit()?;
    eprintln!("{line}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
