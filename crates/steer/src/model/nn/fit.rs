//! What every network steer trains shares: deterministic initial weights from the seeded
//! streams, Adam with a linear warm-up and a cosine decay, an exponential moving average of
//! the weights (what is kept), the loss curve with held-out points, and the
//! `.safetensors` + JSON file pair a trained network is stored as.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::RngExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LossPoint, TrainProgress, TrainingSummary};
use crate::error::{Error, Result};
use crate::rng::{Purpose, Streams};
use crate::schedule::Schedule;

/// The settings every training run shares, borrowed from its configuration for [`validate`].
pub(crate) struct Settings<'a> {
    pub schedule: &'a Schedule,
    pub tau_min: f64,
    pub steps: usize,
    pub batch: usize,
    pub eval_every: usize,
    pub learning_rate: f64,
    pub ema_decay: f64,
    pub heldout_fraction: f64,
    /// Number of training examples.
    pub examples: usize,
}

/// Checks the shared settings; errors name the field.
pub(crate) fn validate(s: &Settings<'_>) -> Result<()> {
    s.schedule.validate()?;
    let horizon = s.schedule.horizon();
    if !(s.tau_min > 0.0 && s.tau_min < horizon) {
        return Err(Error::invalid(
            "tau_min",
            format!("must lie in (0, T = {horizon}), got {}", s.tau_min),
        ));
    }
    for (field, v) in [
        ("steps", s.steps),
        ("batch", s.batch),
        ("eval_every", s.eval_every),
    ] {
        if v == 0 {
            return Err(Error::invalid(field, "must be positive"));
        }
    }
    if !(s.learning_rate.is_finite() && s.learning_rate > 0.0) {
        return Err(Error::invalid(
            "learning_rate",
            "must be finite and positive",
        ));
    }
    if !(0.0..1.0).contains(&s.ema_decay) {
        return Err(Error::invalid("ema_decay", "must lie in [0, 1)"));
    }
    if !(0.0..0.5).contains(&s.heldout_fraction) {
        return Err(Error::invalid("heldout_fraction", "must lie in [0, 0.5)"));
    }
    if s.examples < 2 {
        return Err(Error::invalid(
            "data",
            format!("needs at least 2 examples, got {}", s.examples),
        ));
    }
    Ok(())
}

/// Checks the fields every network description shares: its `format` tag and version 1 (the
/// expected tag `format`), a positive dimension, the standardisation `(data_mean,
/// data_scale)` and the trained noise ratios `ratio_range`; errors name the field.
pub(crate) fn validate_description(
    found: (&str, u32),
    format: &str,
    dim: usize,
    data_mean: &[f64],
    data_scale: f64,
    ratio_range: [f64; 2],
) -> Result<()> {
    if found != (format, 1) {
        return Err(Error::invalid(
            "format",
            format!(
                "expected `{format}` version 1, found `{}` version {}",
                found.0, found.1
            ),
        ));
    }
    if dim == 0 {
        return Err(Error::invalid("dim", "must be positive"));
    }
    if data_mean.len() != dim {
        return Err(Error::Dimension {
            context: "data_mean".into(),
            expected: dim,
            found: data_mean.len(),
        });
    }
    if !data_mean.iter().all(|v| v.is_finite()) {
        return Err(Error::invalid("data_mean", "must be finite"));
    }
    if !(data_scale.is_finite() && data_scale > 0.0) {
        return Err(Error::invalid("data_scale", "must be finite and positive"));
    }
    let [lo, hi] = ratio_range;
    if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > lo) {
        return Err(Error::invalid(
            "ratio_range",
            format!("must satisfy 0 < λ_min < λ_max, got [{lo}, {hi}]"),
        ));
    }
    Ok(())
}

/// The initial value of one parameter tensor.
pub(crate) enum Init {
    /// Every entry equal.
    Constant(f64),
    /// Uniform on `±√(3/f)` with `f` the fan-in (the product of all but the first dimension):
    /// unit gain.
    FanIn,
}

/// Sets every variable of `varmap` in name order (so the draws do not depend on the map's
/// iteration order): `rule(name, dims)` chooses the value, and the `i`-th name draws from
/// its own stream `(Init, 0, i)`.
pub(crate) fn initialise(
    varmap: &VarMap,
    streams: &Streams,
    rule: impl Fn(&str, &[usize]) -> Init,
) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .expect("the variable map is not poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (index, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let count: usize = dims.iter().product();
        let values: Vec<f64> = match rule(name, &dims) {
            Init::Constant(v) => vec![v; count],
            Init::FanIn => {
                let fan_in: usize = dims[1..].iter().product();
                let bound = (3.0 / fan_in as f64).sqrt();
                let mut rng = streams.rng(Purpose::Init, 0, index);
                (0..count)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            }
        };
        let t = Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// The optimiser side of a training run.
pub(crate) struct Fit {
    vars: Vec<(String, Var)>,
    ema: Vec<Tensor>,
    opt: AdamW,
    learning_rate: f64,
    warmup: usize,
    steps: usize,
    ema_decay: f64,
    history: Vec<LossPoint>,
    running: f64,
    count: usize,
}

impl Fit {
    /// Adam (no weight decay) over every variable of `varmap`, for `steps` steps with a peak
    /// rate `learning_rate` reached after `warmup` steps, and an EMA with decay `ema_decay`.
    pub(crate) fn new(
        varmap: &VarMap,
        learning_rate: f64,
        warmup: usize,
        steps: usize,
        ema_decay: f64,
    ) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .expect("the variable map is not poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let ema = vars.iter().map(|(_, v)| v.as_tensor().detach()).collect();
        let opt = AdamW::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            ParamsAdamW {
                lr: learning_rate,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        Ok(Fit {
            vars,
            ema,
            opt,
            learning_rate,
            warmup,
            steps,
            ema_decay,
            history: Vec::new(),
            running: 0.0,
            count: 0,
        })
    }

    /// One optimiser step `step` (from 0) on `loss`: linear warm-up then cosine decay to a
    /// tenth of the peak rate, Adam, and the EMA update. `what` names the loss in the error
    /// when it is not finite. Returns the loss value.
    pub(crate) fn step(&mut self, step: usize, loss: &Tensor, what: &'static str) -> Result<f64> {
        let warm = ((step + 1) as f64 / self.warmup.max(1) as f64).min(1.0);
        let frac = step as f64 / self.steps as f64;
        let decay = 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
        self.opt
            .set_learning_rate(self.learning_rate * warm * decay);
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(Error::NonFinite {
                step,
                what,
                particle: 0,
            });
        }
        self.opt.backward_step(loss)?;
        // A short-horizon average at the start, so early weights do not linger.
        let decay = self
            .ema_decay
            .min((1.0 + step as f64) / (10.0 + step as f64));
        for (e, (_, v)) in self.ema.iter_mut().zip(&self.vars) {
            *e = ((&*e * decay)? + (v.as_tensor() * (1.0 - decay))?)?.detach();
        }
        self.running += value;
        self.count += 1;
        Ok(value)
    }

    /// The EMA weights by name.
    pub(crate) fn ema_params(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .zip(&self.ema)
            .map(|((k, _), t)| (k.clone(), t.clone()))
            .collect()
    }

    /// Closes a point of the loss curve after `step` steps (the mean training loss since the
    /// previous point, and the held-out loss), and reports it.
    pub(crate) fn record(
        &mut self,
        step: usize,
        heldout: Option<f64>,
        progress: &mut impl FnMut(&TrainProgress),
    ) {
        let point = LossPoint {
            step,
            train: self.running / self.count.max(1) as f64,
            heldout,
        };
        self.history.push(point);
        progress(&TrainProgress {
            step,
            steps: self.steps,
            loss: point,
        });
        self.running = 0.0;
        self.count = 0;
    }

    /// The EMA weights, and the training summary of a run with minibatches of `batch`, seed
    /// `seed`, `train_examples` and `heldout_examples`, started at `start`.
    pub(crate) fn finish(
        self,
        batch: usize,
        seed: u64,
        train_examples: usize,
        heldout_examples: usize,
        start: Instant,
    ) -> (HashMap<String, Tensor>, TrainingSummary) {
        let params = self.ema_params();
        let seconds = start.elapsed().as_secs_f64();
        let summary = TrainingSummary {
            steps: self.steps,
            batch,
            learning_rate: self.learning_rate,
            ema_decay: self.ema_decay,
            seed,
            train_examples,
            heldout_examples,
            parameters: params.values().map(|t| t.elem_count()).sum(),
            seconds,
            examples_per_second: (self.steps * batch) as f64 / seconds,
            history: self.history,
        };
        (params, summary)
    }
}

/// Writes `params` as `<stem>.safetensors` beside `json` and the description `spec` (with
/// its weights file name set by `set_weights`) as `json`; returns the weights path.
pub(crate) fn save<S: Serialize + Clone>(
    json: &Path,
    params: &HashMap<String, Tensor>,
    spec: &S,
    set_weights: impl FnOnce(&mut S, String),
) -> Result<PathBuf> {
    let stem = json
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| Error::file(json, None, "has no file name"))?;
    let weights_name = format!("{stem}.safetensors");
    let weights = json.with_file_name(&weights_name);
    candle_core::safetensors::save(params, &weights)
        .map_err(|e| Error::file(&weights, None, format!("cannot write: {e}")))?;
    let mut spec = spec.clone();
    set_weights(&mut spec, weights_name);
    let text = serde_json::to_string_pretty(&spec).expect("a description serialises");
    std::fs::write(json, text + "\n")
        .map_err(|e| Error::file(json, None, format!("cannot write: {e}")))?;
    Ok(weights)
}

/// Reads the description `json` (`what` names the kind of file in the error) and the
/// weights file it names, which sits beside it, onto `device`.
pub(crate) fn load<S: DeserializeOwned>(
    json: &Path,
    what: &str,
    weights: impl FnOnce(&S) -> &str,
    device: &Device,
) -> Result<(S, HashMap<String, Tensor>)> {
    let text = std::fs::read_to_string(json)
        .map_err(|e| Error::file(json, None, format!("cannot read: {e}")))?;
    let spec: S = serde_json::from_str(&text)
        .map_err(|e| Error::file(json, Some(e.line()), format!("not a {what}: {e}")))?;
    let path = json.with_file_name(weights(&spec));
    let params = candle_core::safetensors::load(&path, device)
        .map_err(|e| Error::file(&path, None, format!("cannot load weights: {e}")))?;
    Ok((spec, params))
}

/// Attributes an error of building a network from a description to the description file.
pub(crate) fn in_file(json: &Path, e: Error) -> Error {
    match e {
        Error::File { .. } => e,
        other => Error::file(json, None, other.to_string()),
    }
}
