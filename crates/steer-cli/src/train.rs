//! `steer train`: fits a score network (denoising score matching) or a classifier to `.npy`
//! data and writes the model, its loss curve and a summary into an output folder.
//! Every field is documented in docs/config.md ("steer train").

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{Array2, Axis};
use serde::Deserialize;
use serde_json::{Value, json};
use steer::classifier::{Classifier, ClassifierConfig, TrainClassifierConfig};
use steer::data::Digits;
use steer::model::nn::{self, Architecture, TrainConfig};

use crate::config::{self, ScheduleConfig, finite, resolve, unused};
use crate::{io, plot, report};

/// A whole `steer train` configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    /// "score" (default: a score network) or "classifier".
    pub kind: Option<String>,
    /// Training data: an `N × d` `.npy` array (float64 or float32), relative to the config.
    pub data: PathBuf,
    /// Classifier labels: an `N` `.npy` array of integers (or integral floats) in `0..=255`.
    pub labels: Option<PathBuf>,
    /// Score networks: the forward noise schedule (its `tau_min` is the smallest time trained on).
    pub schedule: Option<ScheduleConfig>,
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
        other => bail!(
            "{}: `kind` = \"{other}\" is unknown (expected score or classifier)",
            at()
        ),
    }
}

/// The training data, named as `data` (and its file) on error.
fn read_data(file: &TrainFile, config_path: &Path) -> Result<(PathBuf, Array2<f64>)> {
    let path = resolve(config_path, &file.data);
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
    let schedule = s.schedule()?;
    let (data_path, x) = read_data(file, config_path)?;
    let d = x.ncols();

    let mut cfg = TrainConfig::new(d, schedule);
    cfg.tau_min = finite("schedule.tau_min", s.tau_min, cfg.tau_min)?;
    if !(cfg.tau_min > 0.0 && cfg.tau_min < schedule.horizon()) {
        bail!(
            "`schedule.tau_min` must lie in (0, T = {}), got {}",
            schedule.horizon(),
            cfg.tau_min
        );
    }
    cfg.architecture = score_architecture(file.architecture.as_ref(), d)?;
    cfg.architecture
        .validate(d)
        .with_context(|| format!("`[architecture]` for data of dimension {d}"))?;
    cfg.steps = positive("training.steps", t.steps.unwrap_or(cfg.steps))?;
    cfg.batch = positive("training.batch", t.batch.unwrap_or(cfg.batch))?;
    cfg.learning_rate = learning_rate(t, cfg.learning_rate)?;
    cfg.warmup = t.warmup.unwrap_or(cfg.warmup);
    cfg.ema_decay = finite("training.ema_decay", t.ema_decay, cfg.ema_decay)?;
    if !(0.0..1.0).contains(&cfg.ema_decay) {
        bail!(
            "`training.ema_decay` must lie in [0, 1), got {}",
            cfg.ema_decay
        );
    }
    cfg.heldout_fraction = heldout_fraction(t, cfg.heldout_fraction)?;
    cfg.eval_every = positive(
        "training.eval_every",
        t.eval_every.unwrap_or(cfg.eval_every),
    )?;
    cfg.seed = t.seed.unwrap_or(cfg.seed);

    let staging = io::Staging::new(out)?;
    let bar = report::progress_in(cfg.steps as u64, "training", "steps");
    let network = nn::train(x.view(), &cfg, |p| {
        bar.set_position(p.step as u64);
        bar.set_message(match p.loss.heldout {
            Some(h) => format!("loss {:.4} (held-out {h:.4})", p.loss.train),
            None => format!("loss {:.4}", p.loss.train),
        });
    })
    .with_context(|| format!("training on {}", data_path.display()))?;
    bar.finish_and_clear();

    network.save(&staging.path("model.json"))?;
    let spec = network.spec();
    let training = spec
        .training
        .as_ref()
        .ok_or_else(|| anyhow!("the trained network carries no training summary"))?;
    let history = &training.history;
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
    let title = format!(
        "denoising score matching — {} examples, d = {d}",
        training.train_examples
    );
    plot::lines_plot(
        &staging.path("loss.png"),
        "step",
        "loss (mean squared noise error)",
        &series,
        true,
        &title,
    )?;
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
            let hidden = match &a.hidden {
                None => default_hidden,
                Some(v) => v
                    .as_integer()
                    .and_then(|h| usize::try_from(h).ok())
                    .ok_or_else(|| {
                        anyhow!(
                            "`architecture.hidden` must be a non-negative integer (the width of the score MLP), got {v}"
                        )
                    })?,
            };
            Ok(Architecture::Mlp {
                hidden,
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
        bail!("`[schedule]` applies only to kind = \"score\"");
    }
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
// Output.

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
