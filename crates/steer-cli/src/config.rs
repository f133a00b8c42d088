//! The run configuration (TOML): serde structs that reject unknown fields, and `build`
//! functions that turn them into library objects, naming the offending field on error.
//! Every field is documented in docs/config.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{Array1, Array2};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use steer::classifier::{ClassReward, Classifier};
use steer::doob::{Clip, ExactH, HFunction, HLaplacian};
use steer::doob_net::{DoobNetwork, DoobSpec};
use steer::method::{
    Control, DivergenceEstimator, Doob, DriftLite, DriftLiteConfig, Guidance, Potential, Proposal,
    Twist, TwistSchedule, Urge,
};
use steer::model::nn::{Architecture, Network, NetworkSpec};
use steer::model::{Covariance, GaussianMixture, NoiseLevel, Probe, ScoreModel};
use steer::resample::Scheme;
use steer::reward::{Linear, MixtureLogDensity, Quadratic, Reward};
use steer::schedule::{GridKind, Schedule, TimeGrid};
use steer::smc::{FunnelShape, ParticleSchedule, ResamplePolicy, Settings, funnel};
use steer::target::{Expert, Target, TiltSchedule};

use crate::io;

/// A whole `steer sample` / `steer reference` configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Sampling method: "base", "pg", "g-smc", "vcg", "vcg-smc", "ecg", "ecg-smc", "urge" or
    /// "doob".
    pub method: String,
    /// Number of particles N.
    pub particles: usize,
    /// Number of sampling steps M.
    pub steps: usize,
    /// Seed of every random stream.
    #[serde(default)]
    pub seed: u64,
    /// Noise schedule and time grid.
    pub schedule: ScheduleConfig,
    /// The experts p_e^{γ_e} of the target (one for annealing or tilting).
    pub experts: Vec<ExpertConfig>,
    /// Optional reward r (log-tilt).
    pub reward: Option<RewardConfig>,
    /// Resampling settings.
    #[serde(default)]
    pub resampling: ResamplingConfig,
    /// Output settings.
    #[serde(default)]
    pub output: OutputConfig,
    /// DriftLite settings (methods vcg, vcg-smc, ecg, ecg-smc; URGE's controlled proposal).
    pub driftlite: Option<DriftLiteSection>,
    /// URGE settings (method urge).
    pub urge: Option<UrgeSection>,
    /// Funnel particle schedule (`particles` is then the budget per step).
    pub funnel: Option<FunnelSection>,
    /// Doob h-function settings (method doob; URGE's Doob proposal and twist).
    pub doob: Option<DoobSection>,
}

/// `[doob]`: the h-function of Doob guidance (MATH.md §7) and its post-processing.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DoobSection {
    /// "exact" (default: the closed form of a Gaussian-mixture expert tilted by a
    /// closed-form reward) or the JSON description of a network written by `steer train`
    /// with `kind = "doob"`, relative to the config.
    pub h: Option<String>,
    /// Floor h_min ≥ 0 of ĝ = ∇ĥ / max(ĥ, h_min) (default: the library's `Clip::learned()`
    /// for a network, `Clip::none()` for the exact h).
    pub h_min: Option<f64>,
    /// Largest norm of the guidance ĝ per particle (default: none).
    pub g_max: Option<f64>,
}

/// `[urge]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UrgeSection {
    /// Proposal drift: "base", "guided" (default), "vcg", "ecg" or "doob".
    pub proposal: Option<String>,
    /// Twist: "none", "reward", "tweedie" (default; "doob" with proposal = "doob"), "path",
    /// "fk-difference", "fk-max", "fk-sum", "fk-immediate", "adaptive", "naive-tempered" or
    /// "doob".
    pub twist: Option<String>,
    /// Evaluate the twist every this many steps (default 1).
    pub every: Option<usize>,
    /// Evaluate it only while the elapsed fraction of sampling time lies in [start, end].
    pub window: Option<[f64; 2]>,
    /// Conditional-ESS fraction of the adaptive temperature (default 0.5).
    pub cess: Option<f64>,
}

/// `[funnel]`: a particle count that falls over time within the budget of `particles`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelSection {
    /// "geometric" (default), "linear" or "two-phase".
    pub shape: Option<String>,
    /// Number of blocks (default 4).
    pub blocks: Option<usize>,
    /// Geometric ratio (default 0.5).
    pub ratio: Option<f64>,
    /// Final fraction of the linear and two-phase shapes (default 0.25).
    pub final_fraction: Option<f64>,
    /// Switching point of the two-phase shape, as a fraction of the steps (default 0.5).
    pub switch: Option<f64>,
    /// Minimum count per block (default 16, at most `particles`).
    pub min: Option<usize>,
}

/// `[driftlite]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DriftLiteSection {
    /// Ridge ε_r of the Jacobi-scaled solve (default 1e-8).
    pub ridge: Option<f64>,
    /// "exact" (default when every expert has one) or "hutchinson".
    pub divergence: Option<String>,
    /// Hutchinson probes per particle and step (default 1).
    pub probes: Option<usize>,
    /// Hutchinson probe law: "rademacher" (default) or "gaussian".
    pub probe: Option<String>,
    /// Refinement passes of Algorithm 2 (default 1: plain Algorithm 1).
    pub passes: Option<usize>,
    /// The path and its proposal drift: "guided" (default; the reward path p_t e^{β_t r}
    /// and its guided drift) or "doob" (the Doob path p_t ĥ_t with the Doob drift of the
    /// `[doob]` h-function; MATH.md §7.2).
    pub proposal: Option<String>,
}

/// An h-function with the post-processing of its guidance (MATH.md §7.4).
pub type HChoice = (Arc<dyn HLaplacian>, Clip);

/// What `method` runs.
#[derive(Clone, Debug)]
pub enum Plan {
    /// URGE with its proposal and twist.
    Urge {
        /// Proposal drift.
        proposal: Proposal,
        /// Twist.
        twist: Twist,
        /// When the twist is evaluated.
        schedule: TwistSchedule,
        /// The h-function of the Doob proposal or twist.
        doob: Option<HChoice>,
    },
    /// Unweighted Doob guidance by an h-function.
    Doob(HChoice),
    /// Base sampler, PG or G-SMC.
    Guided(Guidance),
    /// DriftLite with its settings and refinement passes; `resamples` for the -smc variants.
    DriftLite {
        /// Solver settings.
        config: DriftLiteConfig,
        /// Refinement passes (≥ 1).
        passes: usize,
        /// Whether the variant resamples.
        resamples: bool,
        /// The h-function of the Doob path (`driftlite.proposal = "doob"`).
        doob: Option<HChoice>,
    },
}

/// `[schedule]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// "vp-linear", "vp-cosine" or "ve-edm".
    pub kind: String,
    /// VP linear β_min (default 0.1).
    pub beta_min: Option<f64>,
    /// VP linear β_max (default 20).
    pub beta_max: Option<f64>,
    /// VP horizon T (default 1).
    pub horizon: Option<f64>,
    /// Cosine offset ε_c (default 0.008).
    pub offset: Option<f64>,
    /// VE σ_max (default 80).
    pub sigma_max: Option<f64>,
    /// Grid: "uniform" (default for VP), "edm" (default for VE) or "geometric".
    pub grid: Option<String>,
    /// EDM grid ρ (default 7).
    pub rho: Option<f64>,
    /// First forward time τ_max (default T, or T(1−10⁻³) for cosine).
    pub tau_max: Option<f64>,
    /// Last forward time τ_min (default 0 for VP, σ_min = 0.002 for VE; with only network
    /// experts, the largest `tau_min` they were trained down to).
    pub tau_min: Option<f64>,
    /// Noise level η: V = η U (1 = reverse SDE, 0 = probability-flow ODE).
    pub eta: Option<f64>,
}

/// One `[[experts]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertConfig {
    /// The model: `{ kind = "gmm", file = "mixture.json" }`.
    pub model: ModelConfig,
    /// Exponent γ (default 1).
    pub gamma: Option<f64>,
}

/// A model reference.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// "gmm" (a Gaussian-mixture JSON file) or "network" (a `steer train` model JSON file).
    pub kind: String,
    /// Path of the model file, relative to the config file.
    pub file: PathBuf,
}

/// `[reward]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// "linear", "quadratic", "mixture" or "classifier".
    pub kind: String,
    /// Linear: slope a in r = a·x.
    pub slope: Option<Vec<f64>>,
    /// Quadratic: centre c in r = −(λ/2)|x − c|².
    pub centre: Option<Vec<f64>>,
    /// Quadratic: strength λ ≥ 0.
    pub strength: Option<f64>,
    /// Mixture: mixture file for r = scale · log p(x); classifier: the classifier's JSON file
    /// for r = scale · log p(class | x).
    pub file: Option<PathBuf>,
    /// Mixture and classifier: scale (default 1).
    pub scale: Option<f64>,
    /// Classifier: the class c steered towards.
    pub class: Option<usize>,
    /// Reward schedule β_t: "linear" (default), "power" or "signal".
    pub schedule: Option<String>,
    /// Exponent p of the "power" schedule β = s^p.
    pub power: Option<f64>,
    /// β before the switch of the "step" schedule (default 0).
    pub beta_min: Option<f64>,
    /// Switching point of the "step" schedule, as a fraction of sampling time (default 0.4).
    pub switch: Option<f64>,
}

/// `[resampling]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResamplingConfig {
    /// "multinomial", "systematic" (default), "stratified" or "residual".
    pub scheme: Option<String>,
    /// "ess" (default), "every" or "never".
    pub when: Option<String>,
    /// ESS threshold κ: resample when ESS < κN (default 0.5).
    pub threshold: Option<f64>,
    /// Period in steps for `when = "every"`.
    pub period: Option<usize>,
    /// Resample once after the last step (unweighted output; default false).
    pub final_resample: Option<bool>,
    /// Resample only while the elapsed fraction of sampling time lies in [start, end].
    pub window: Option<[f64; 2]>,
}

/// `[output]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Write PNG plots (default true).
    pub plots: Option<bool>,
    /// The samples are images of `[height, width]` pixels (times `channels`): `samples.png`
    /// is then a grid of images (automatic for a U-Net network).
    pub image: Option<[usize; 2]>,
    /// Image channels: 1 (grey, default) or 3 (RGB); channel-major rows.
    pub channels: Option<usize>,
    /// Pixel values drawn black and white (default: the smallest and largest value shown).
    pub image_range: Option<[f64; 2]>,
}

/// How a sample vector is an image: `channels × height × width`, row-major, and which pixel
/// values are drawn black and white.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageShape {
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Rows of pixels.
    pub height: usize,
    /// Columns of pixels.
    pub width: usize,
    /// `[output] image_range`: values drawn black and white (`None`: the shown values' range).
    pub range: Option<(f64, f64)>,
}

/// Reads a config file, applies `--set key=value` overrides, and deserialises it.
pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
    load_toml(path, overrides)
}

/// Reads any TOML config (`steer sample`, `steer train`), applies `--set key=value`
/// overrides, and deserialises it; unknown fields are errors naming the field and the file.
pub fn load_toml<T: DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let mut value: toml::Table = text
        .parse()
        .with_context(|| format!("invalid TOML in {}", path.display()))?;
    for o in overrides {
        apply_override(&mut value, o).with_context(|| format!("invalid --set `{o}`"))?;
    }
    toml::Value::Table(value)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow!("{}: {}", path.display(), e.to_string().trim()))
}

/// Loads a config and builds its time grid and target; errors name the config file.
///
/// When every expert is a network and `schedule.tau_min` is not set, it defaults to the
/// largest `tau_min` the networks were trained down to (a network has not seen smaller noise).
pub fn load_problem(path: &Path, overrides: &[String]) -> Result<(Config, TimeGrid, Target)> {
    let mut config = load(path, overrides)?;
    let at = || path.display().to_string();
    config.default_tau_min(path).with_context(at)?;
    let grid = config.schedule.build(config.steps).with_context(at)?;
    let target = config.target(path, &grid).with_context(at)?;
    Ok((config, grid, target))
}

/// `section.key=value`; the value is parsed as TOML (number, bool, array, inline table),
/// falling back to a string.
fn apply_override(table: &mut toml::Table, text: &str) -> Result<()> {
    let (key, raw) = text
        .split_once('=')
        .ok_or_else(|| anyhow!("expected key=value"))?;
    let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        cur = match cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => t,
            _ => bail!("`{p}` is not a section"),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// `file` relative to the folder of the config file `base` (absolute paths unchanged).
pub fn resolve(base: &Path, file: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(file)
    }
}

/// `v` (or `default`), which must be finite; errors name `field`.
pub fn finite(field: &str, v: Option<f64>, default: f64) -> Result<f64> {
    let v = v.unwrap_or(default);
    if !v.is_finite() {
        bail!("`{field}` must be finite, got {v}");
    }
    Ok(v)
}

/// Forbids fields that do not apply to the chosen kind, so typos in intent surface.
pub fn unused(section: &str, kind: &str, fields: &[(&str, bool)]) -> Result<()> {
    for (name, present) in fields {
        if *present {
            bail!("`{section}.{name}` does not apply to {section}.kind = \"{kind}\"");
        }
    }
    Ok(())
}

/// A schedule as the JSON of model descriptions, e.g. `{"kind":"vp-linear",…}`.
pub fn schedule_text(s: &Schedule) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

impl ScheduleConfig {
    /// The schedule and grid for `steps` steps.
    pub fn build(&self, steps: usize) -> Result<TimeGrid> {
        let s = self;
        let schedule = self.schedule()?;
        let ve = schedule.is_variance_exploding();
        let grid = match s.grid.as_deref() {
            None if ve => GridKind::Edm {
                rho: finite("schedule.rho", s.rho, 7.0)?,
            },
            None | Some("uniform") => GridKind::Uniform,
            Some("edm") => GridKind::Edm {
                rho: finite("schedule.rho", s.rho, 7.0)?,
            },
            Some("geometric") => GridKind::Geometric,
            Some(other) => bail!(
                "`schedule.grid` = \"{other}\" is unknown (expected uniform, edm or geometric)"
            ),
        };
        let tau_max = finite("schedule.tau_max", s.tau_max, schedule.default_tau_max())?;
        let tau_min = finite("schedule.tau_min", s.tau_min, if ve { 0.002 } else { 0.0 })?;
        let eta = finite("schedule.eta", s.eta, 1.0)?;
        Ok(TimeGrid::new(schedule, grid, steps, tau_max, tau_min, eta)?)
    }

    /// The noise schedule alone (kind and its parameters; the grid fields are not read).
    pub fn schedule(&self) -> Result<Schedule> {
        let s = self;
        let schedule = match s.kind.as_str() {
            "vp-linear" => {
                unused(
                    "schedule",
                    &s.kind,
                    &[
                        ("offset", s.offset.is_some()),
                        ("sigma_max", s.sigma_max.is_some()),
                    ],
                )?;
                Schedule::VpLinear {
                    beta_min: finite("schedule.beta_min", s.beta_min, 0.1)?,
                    beta_max: finite("schedule.beta_max", s.beta_max, 20.0)?,
                    horizon: finite("schedule.horizon", s.horizon, 1.0)?,
                }
            }
            "vp-cosine" => {
                unused(
                    "schedule",
                    &s.kind,
                    &[
                        ("beta_min", s.beta_min.is_some()),
                        ("beta_max", s.beta_max.is_some()),
                        ("sigma_max", s.sigma_max.is_some()),
                    ],
                )?;
                Schedule::VpCosine {
                    offset: finite("schedule.offset", s.offset, 0.008)?,
                    horizon: finite("schedule.horizon", s.horizon, 1.0)?,
                }
            }
            "ve-edm" => {
                unused(
                    "schedule",
                    &s.kind,
                    &[
                        ("beta_min", s.beta_min.is_some()),
                        ("beta_max", s.beta_max.is_some()),
                        ("horizon", s.horizon.is_some()),
                        ("offset", s.offset.is_some()),
                    ],
                )?;
                Schedule::VeEdm {
                    sigma_max: finite("schedule.sigma_max", s.sigma_max, 80.0)?,
                }
            }
            other => bail!(
                "`schedule.kind` = \"{other}\" is unknown (expected vp-linear, vp-cosine or ve-edm)"
            ),
        };
        Ok(schedule)
    }
}

impl Config {
    /// Constant `particles`, or the funnel schedule solved for the budget `particles × steps`.
    fn particle_schedule(&self) -> Result<ParticleSchedule> {
        let Some(f) = &self.funnel else {
            return Ok(ParticleSchedule::Constant(self.particles));
        };
        let fraction = |name: &str, v: Option<f64>, default: f64| {
            finite(&format!("funnel.{name}"), v, default)
        };
        let shape = match f.shape.as_deref().unwrap_or("geometric") {
            "geometric" => {
                unused(
                    "funnel",
                    "geometric",
                    &[
                        ("final_fraction", f.final_fraction.is_some()),
                        ("switch", f.switch.is_some()),
                    ],
                )?;
                FunnelShape::Geometric {
                    ratio: fraction("ratio", f.ratio, 0.5)?,
                }
            }
            "linear" => {
                unused(
                    "funnel",
                    "linear",
                    &[("ratio", f.ratio.is_some()), ("switch", f.switch.is_some())],
                )?;
                FunnelShape::Linear {
                    final_fraction: fraction("final_fraction", f.final_fraction, 0.25)?,
                }
            }
            "two-phase" => {
                unused("funnel", "two-phase", &[("ratio", f.ratio.is_some())])?;
                FunnelShape::TwoPhase {
                    switch: fraction("switch", f.switch, 0.5)?,
                    final_fraction: fraction("final_fraction", f.final_fraction, 0.25)?,
                }
            }
            other => bail!(
                "`funnel.shape` = \"{other}\" is unknown (expected geometric, linear or two-phase)"
            ),
        };
        let min = f.min.unwrap_or(16).min(self.particles);
        let (schedule, _) = funnel(
            shape,
            self.particles,
            self.steps,
            f.blocks.unwrap_or(4),
            min,
        )?;
        Ok(schedule)
    }

    /// The method to run, validated; files (a learned h-function) resolve against `path`.
    pub fn plan(&self, path: &Path, target: &Target) -> Result<Plan> {
        let driftlite = |control: Control, resamples: bool| -> Result<Plan> {
            let section = self.driftlite.as_ref();
            let get = |f: fn(&DriftLiteSection) -> Option<f64>, default: f64, name: &str| {
                finite(&format!("driftlite.{name}"), section.and_then(f), default)
            };
            let ridge = get(|s| s.ridge, 1e-8, "ridge")?;
            let exact_available = target
                .experts()
                .iter()
                .all(|e| e.model.provides_divergence());
            let default = if exact_available {
                "exact"
            } else {
                "hutchinson"
            };
            let divergence = match section
                .and_then(|s| s.divergence.as_deref())
                .unwrap_or(default)
            {
                "exact" => DivergenceEstimator::Exact,
                "hutchinson" => DivergenceEstimator::Hutchinson {
                    probes: section.and_then(|s| s.probes).unwrap_or(1),
                    probe: match section
                        .and_then(|s| s.probe.as_deref())
                        .unwrap_or("rademacher")
                    {
                        "rademacher" => Probe::Rademacher,
                        "gaussian" => Probe::Gaussian,
                        other => bail!(
                            "`driftlite.probe` = \"{other}\" is unknown (expected rademacher or gaussian)"
                        ),
                    },
                },
                other => bail!(
                    "`driftlite.divergence` = \"{other}\" is unknown (expected exact or hutchinson)"
                ),
            };
            if divergence == DivergenceEstimator::Exact
                && section.is_some_and(|s| s.probes.is_some() || s.probe.is_some())
            {
                bail!(
                    "`driftlite.probes` and `driftlite.probe` apply only to divergence = \"hutchinson\""
                );
            }
            let passes = section.and_then(|s| s.passes).unwrap_or(1);
            if passes == 0 {
                bail!("`driftlite.passes` must be at least 1");
            }
            let doob = match section
                .and_then(|s| s.proposal.as_deref())
                .unwrap_or("guided")
            {
                "guided" => None,
                "doob" => {
                    if passes > 1 {
                        bail!(
                            "`driftlite.passes` > 1 (iterative refinement) is not available with driftlite.proposal = \"doob\""
                        );
                    }
                    Some(self.h_function(path, target)?)
                }
                other => {
                    bail!("`driftlite.proposal` = \"{other}\" is unknown (expected guided or doob)")
                }
            };
            let config = DriftLiteConfig {
                control,
                ridge,
                divergence,
            };
            config.validate()?;
            if let Some((h, clip)) = &doob {
                // Checked here, before any output is staged.
                DriftLite::new(target, config)?.with_doob(h.clone(), *clip)?;
            }
            Ok(Plan::DriftLite {
                config,
                passes,
                resamples,
                doob,
            })
        };
        let plan = match self.method.as_str() {
            "base" => Plan::Guided(Guidance::Base),
            "pg" => Plan::Guided(Guidance::Pure),
            "g-smc" => Plan::Guided(Guidance::Corrected),
            "vcg" => driftlite(Control::Variance, false)?,
            "vcg-smc" => driftlite(Control::Variance, true)?,
            "ecg" => driftlite(Control::Energy, false)?,
            "ecg-smc" => driftlite(Control::Energy, true)?,
            "urge" => {
                let section = self.urge.as_ref();
                let proposal = match section
                    .and_then(|s| s.proposal.as_deref())
                    .unwrap_or("guided")
                {
                    "base" => Proposal::Base,
                    "guided" => Proposal::Guided,
                    "doob" => Proposal::Doob,
                    "vcg" | "ecg" => {
                        let control = if section.and_then(|s| s.proposal.as_deref()) == Some("vcg")
                        {
                            Control::Variance
                        } else {
                            Control::Energy
                        };
                        if section.is_some_and(|s| s.proposal.is_some()) {
                            bail!(
                                "`driftlite.proposal` does not apply to URGE's controlled proposal (for a Doob proposal set urge.proposal = \"doob\")"
                            );
                        }
                        match driftlite(control, true)? {
                            Plan::DriftLite {
                                config, passes: 1, ..
                            } => Proposal::Controlled(config),
                            _ => bail!(
                                "`driftlite.passes` does not apply to URGE's controlled proposal"
                            ),
                        }
                    }
                    other => bail!(
                        "`urge.proposal` = \"{other}\" is unknown (expected base, guided, vcg, ecg or doob)"
                    ),
                };
                let default_twist = if proposal == Proposal::Doob {
                    "doob"
                } else {
                    "tweedie"
                };
                let twist = match section
                    .and_then(|s| s.twist.as_deref())
                    .unwrap_or(default_twist)
                {
                    "none" => Twist::None,
                    "reward" => Twist::Reward,
                    "tweedie" => Twist::Tweedie,
                    "path" => Twist::PathRatio,
                    "fk-difference" => Twist::Potential(Potential::Difference),
                    "fk-max" => Twist::Potential(Potential::Max),
                    "fk-sum" => Twist::Potential(Potential::Sum),
                    "fk-immediate" => Twist::Potential(Potential::Immediate),
                    "adaptive" => Twist::AdaptiveTemperature {
                        cess: section.and_then(|s| s.cess).unwrap_or(0.5),
                    },
                    "naive-tempered" => Twist::NaiveTempered,
                    "doob" => Twist::Doob,
                    other => bail!(
                        "`urge.twist` = \"{other}\" is unknown (expected none, reward, tweedie, path, fk-difference, fk-max, fk-sum, fk-immediate, adaptive, naive-tempered or doob)"
                    ),
                };
                if let Twist::AdaptiveTemperature { cess } = twist
                    && !(cess > 0.0 && cess <= 1.0)
                {
                    bail!("`urge.cess` must lie in (0, 1], got {cess}");
                }
                if section.is_some_and(|s| s.cess.is_some())
                    && !matches!(twist, Twist::AdaptiveTemperature { .. })
                {
                    bail!("`urge.cess` applies only to twist = \"adaptive\"");
                }
                if self.driftlite.is_some() && !matches!(proposal, Proposal::Controlled(_)) {
                    bail!(
                        "the [driftlite] section applies to URGE only with proposal = \"vcg\" or \"ecg\""
                    );
                }
                let schedule = TwistSchedule {
                    every: section.and_then(|s| s.every).unwrap_or(1),
                    window: section.and_then(|s| s.window).map(|[a, b]| (a, b)),
                };
                let doob = if proposal == Proposal::Doob || twist == Twist::Doob {
                    let (h, clip) = self.h_function(path, target)?;
                    // Checked here, before any output is staged.
                    Urge::new(target, proposal, twist)?.with_h_function(h.clone(), clip)?;
                    Some((h, clip))
                } else {
                    None
                };
                Plan::Urge {
                    proposal,
                    twist,
                    schedule,
                    doob,
                }
            }
            "doob" => {
                let (h, clip) = self.h_function(path, target)?;
                // Checked here, before any output is staged.
                Doob::new(target, h.clone(), clip)?;
                Plan::Doob((h, clip))
            }
            other => bail!(
                "`method` = \"{other}\" is unknown (expected base, pg, g-smc, vcg, vcg-smc, ecg, ecg-smc, urge or doob)"
            ),
        };
        if matches!(plan, Plan::Guided(_) | Plan::Doob(_)) && self.driftlite.is_some() {
            bail!(
                "the [driftlite] section applies only to methods vcg, vcg-smc, ecg, ecg-smc and urge"
            );
        }
        let uses_doob = matches!(
            plan,
            Plan::Doob(_)
                | Plan::Urge { doob: Some(_), .. }
                | Plan::DriftLite { doob: Some(_), .. }
        );
        if self.doob.is_some() && !uses_doob {
            bail!(
                "the [doob] section applies only to method = \"doob\", to method = \"urge\" with urge.proposal or urge.twist = \"doob\", and to the DriftLite methods with driftlite.proposal = \"doob\""
            );
        }
        if self.urge.is_some() && !matches!(plan, Plan::Urge { .. }) {
            bail!("the [urge] section applies only to method = \"urge\"");
        }
        if let Plan::DriftLite {
            resamples: false, ..
        } = plan
            && self
                .resampling
                .when
                .as_deref()
                .is_some_and(|w| w != "never")
        {
            bail!(
                "method {} never resamples (weighted output); use {}-smc to resample",
                self.method,
                self.method
            );
        }
        Ok(plan)
    }

    /// The h-function of `[doob]` (MATH.md §7) and its clip: the exact one of the target, or a
    /// learned network (whose dimension and schedule must match the run's).
    fn h_function(&self, path: &Path, target: &Target) -> Result<HChoice> {
        let section = self.doob.as_ref();
        let name = section.and_then(|s| s.h.as_deref()).unwrap_or("exact");
        let (h, default): (Arc<dyn HLaplacian>, Clip) = if name == "exact" {
            let h = ExactH::from_target(target).map_err(|e| {
                anyhow!(
                    "`doob.h` = \"exact\": {e}; for other targets train an h-network with `steer train` (kind = \"doob\") and set `doob.h` to its doob.json"
                )
            })?;
            (Arc::new(h), Clip::none())
        } else {
            let file = resolve(path, Path::new(name));
            let h = DoobNetwork::load(&file)
                .with_context(|| format!("`doob.h` ({})", file.display()))?;
            if h.dim() != target.dim() {
                bail!(
                    "dimension mismatch: `doob.h` ({}) has dimension {}, the experts' model files have dimension {}",
                    file.display(),
                    h.dim(),
                    target.dim()
                );
            }
            let sampling = self.schedule.schedule()?;
            let trained = h.spec().schedule;
            if trained != sampling {
                bail!(
                    "`doob.h` ({}) was trained with the schedule {}, but `[schedule]` is {}: an h-function only guides the forward process it was trained on (train it with the base model's schedule)",
                    file.display(),
                    schedule_text(&trained),
                    schedule_text(&sampling)
                );
            }
            (Arc::new(h), Clip::learned())
        };
        let clip = Clip {
            h_min: finite("doob.h_min", section.and_then(|s| s.h_min), default.h_min)?,
            g_max: section.and_then(|s| s.g_max).or(default.g_max),
        };
        // Names `doob.h_min` or `doob.g_max` (g_max must be finite and positive).
        clip.validate()?;
        Ok((h, clip))
    }

    /// The target (experts, reward, reward schedule); model files resolve against `path`.
    pub fn target(&self, path: &Path, grid: &TimeGrid) -> Result<Target> {
        if self.experts.is_empty() {
            bail!("at least one [[experts]] entry is required");
        }
        let mut experts: Vec<Expert> = Vec::new();
        for (e, ex) in self.experts.iter().enumerate() {
            let file = resolve(path, &ex.model.file);
            let model = ex.model.load(path, &format!("experts[{e}].model"))?;
            if let Some(first) = experts.first()
                && model.dim() != first.model.dim()
            {
                bail!(
                    "dimension mismatch between model files: `experts[{e}].model.file` ({}) has dimension {}, `experts[0].model.file` ({}) has {}",
                    file.display(),
                    model.dim(),
                    resolve(path, &self.experts[0].model.file).display(),
                    first.model.dim()
                );
            }
            experts.push(Expert {
                model,
                gamma: finite(&format!("experts[{e}].gamma"), ex.gamma, 1.0)?,
            });
        }
        let (reward, tilt) = match &self.reward {
            Some(r) => {
                let (reward, tilt) = r.build(path)?;
                let d = experts[0].model.dim();
                if reward.dim() != d {
                    bail!(
                        "dimension mismatch: {} has dimension {}, the experts' model files have dimension {d}",
                        r.field(path),
                        reward.dim()
                    );
                }
                (Some(reward), tilt)
            }
            None => (None, TiltSchedule::Linear),
        };
        tilt.validate(grid)?;
        Ok(Target::new(experts, reward, tilt)?)
    }

    /// The description of expert `e`'s network (its JSON only, not the weights); `None` for
    /// other model kinds.
    pub fn network_spec(&self, path: &Path, e: usize) -> Result<Option<NetworkSpec>> {
        let Some(m) = self.experts.get(e).map(|x| &x.model) else {
            return Ok(None);
        };
        if m.kind != "network" {
            return Ok(None);
        }
        let file = resolve(path, &m.file);
        io::read_network_spec(&file)
            .map(Some)
            .with_context(|| format!("`experts[{e}].model.file` ({})", file.display()))
    }

    /// Sets `schedule.tau_min`, when absent, to the largest `tau_min` the learned models were
    /// trained down to: the networks', when every expert is a network, and a learned
    /// `doob.h`'s.
    fn default_tau_min(&mut self, path: &Path) -> Result<()> {
        if self.schedule.tau_min.is_some() {
            return Ok(());
        }
        let mut tau_min = None::<f64>;
        let networks =
            !self.experts.is_empty() && self.experts.iter().all(|e| e.model.kind == "network");
        if networks {
            for e in 0..self.experts.len() {
                if let Some(spec) = self.network_spec(path, e)? {
                    tau_min = Some(tau_min.unwrap_or(0.0).max(spec.tau_min));
                }
            }
        }
        if let Some(spec) = self.h_spec(path)? {
            tau_min = Some(tau_min.unwrap_or(0.0).max(spec.tau_min));
        }
        if tau_min.is_some() {
            self.schedule.tau_min = tau_min;
        }
        Ok(())
    }

    /// The description of a learned `doob.h` (its JSON only, not the weights); `None` for the
    /// exact h or without `[doob]`.
    fn h_spec(&self, path: &Path) -> Result<Option<DoobSpec>> {
        let Some(name) = self.doob.as_ref().and_then(|d| d.h.as_deref()) else {
            return Ok(None);
        };
        if name == "exact" {
            return Ok(None);
        }
        let file = resolve(path, Path::new(name));
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("`doob.h` ({}): cannot read", file.display()))?;
        let spec = serde_json::from_str(&text).with_context(|| {
            format!(
                "`doob.h` ({}) is not an h-function description written by `steer train` (kind = \"doob\")",
                file.display()
            )
        })?;
        Ok(Some(spec))
    }

    /// How the samples of dimension `dim` are images, if they are: `[output] image` (with
    /// `channels`), else the U-Net architecture of the first expert's network.
    pub fn image_shape(&self, path: &Path, dim: usize) -> Result<Option<ImageShape>> {
        let o = &self.output;
        let range = match o.image_range {
            Some([lo, hi]) => {
                if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                    bail!("`output.image_range` must be finite with low < high, got [{lo}, {hi}]");
                }
                Some((lo, hi))
            }
            None => None,
        };
        let shape = self.image_layout(path, dim)?;
        if shape.is_none() && range.is_some() {
            bail!(
                "`output.image_range` applies only to image samples (set `output.image` = [height, width])"
            );
        }
        Ok(shape.map(|(channels, height, width)| ImageShape {
            channels,
            height,
            width,
            range,
        }))
    }

    /// `(channels, height, width)` of image samples, if they are images.
    fn image_layout(&self, path: &Path, dim: usize) -> Result<Option<(usize, usize, usize)>> {
        let o = &self.output;
        if let Some([height, width]) = o.image {
            let channels = o.channels.unwrap_or(1);
            if channels != 1 && channels != 3 {
                bail!("`output.channels` must be 1 (grey) or 3 (RGB), got {channels}");
            }
            if height == 0 || width == 0 || channels * height * width != dim {
                bail!(
                    "`output.image` = [{height}, {width}] with {channels} channel(s) holds {} values, but the samples have dimension {dim}",
                    channels * height * width
                );
            }
            return Ok(Some((channels, height, width)));
        }
        if o.channels.is_some() {
            bail!("`output.channels` needs `output.image` = [height, width]");
        }
        if let Some(spec) = self.network_spec(path, 0)?
            && let Architecture::Unet {
                channels_in,
                height,
                width,
                ..
            } = spec.architecture
            && (channels_in == 1 || channels_in == 3)
        {
            return Ok(Some((channels_in, height, width)));
        }
        Ok(None)
    }

    /// The hot end of `steer reference`'s tempering ladder when the first expert is a network:
    /// the Gaussian `N(m, s² I)` of the network's data mean and scale, noised to `level`.
    pub fn network_tempering_base(
        &self,
        path: &Path,
        level: &NoiseLevel,
    ) -> Result<Option<GaussianMixture>> {
        let Some(spec) = self.network_spec(path, 0)? else {
            return Ok(None);
        };
        let d = spec.dim;
        let mean = Array2::from_shape_vec((1, d), spec.data_mean.clone())?;
        let variance = Array1::from(vec![spec.data_scale * spec.data_scale]);
        let law = GaussianMixture::new(
            Array1::from(vec![1.0]),
            mean,
            Covariance::Isotropic(variance),
        )?;
        Ok(Some(law.at_level(level)))
    }

    /// Engine settings for the run.
    pub fn settings(&self) -> Result<Settings> {
        if self.particles == 0 {
            bail!("`particles` must be at least 1");
        }
        if self.steps == 0 {
            bail!("`steps` must be at least 1");
        }
        let r = &self.resampling;
        let scheme: Scheme = r.scheme.as_deref().unwrap_or("systematic").parse()?;
        let no_resampling = matches!(self.method.as_str(), "vcg" | "ecg");
        let policy = match r
            .when
            .as_deref()
            .unwrap_or(if no_resampling { "never" } else { "ess" })
        {
            "ess" => {
                unused("resampling", "ess", &[("period", r.period.is_some())])?;
                ResamplePolicy::Ess {
                    threshold: finite("resampling.threshold", r.threshold, 0.5)?,
                }
            }
            "every" => {
                unused(
                    "resampling",
                    "every",
                    &[("threshold", r.threshold.is_some())],
                )?;
                ResamplePolicy::Every {
                    period: r.period.ok_or_else(|| {
                        anyhow!("`resampling.period` is required with when = \"every\"")
                    })?,
                }
            }
            "never" => ResamplePolicy::Never,
            other => {
                bail!("`resampling.when` = \"{other}\" is unknown (expected ess, every or never)")
            }
        };
        let settings = Settings {
            particles: self.particle_schedule()?,
            policy,
            scheme,
            final_resample: r.final_resample.unwrap_or(false),
            window: r.window.map(|[a, b]| (a, b)),
            seed: self.seed,
        };
        settings.validate(self.steps)?;
        Ok(settings)
    }
}

impl ModelConfig {
    /// The model; `field` (e.g. `experts[0].model`) names it on error, files resolve against
    /// the config file `path`.
    pub fn load(&self, path: &Path, field: &str) -> Result<Arc<dyn ScoreModel>> {
        let file = resolve(path, &self.file);
        Ok(match self.kind.as_str() {
            "gmm" => Arc::new(io::read_mixture(&file).with_context(|| format!("{field}.file"))?),
            "network" => Arc::new(
                Network::load(&file)
                    .with_context(|| format!("`{field}.file` ({})", file.display()))?,
            ),
            other => {
                bail!("`{field}.kind` = \"{other}\" is unknown (expected gmm or network)")
            }
        })
    }
}

impl RewardConfig {
    /// The field that sets the reward's dimension, for dimension-mismatch errors.
    pub fn field(&self, path: &Path) -> String {
        match (self.kind.as_str(), &self.file) {
            ("linear", _) => "`reward.slope`".to_string(),
            ("quadratic", _) => "`reward.centre`".to_string(),
            (_, Some(f)) => format!("`reward.file` ({})", resolve(path, f).display()),
            (_, None) => "`reward.file`".to_string(),
        }
    }

    /// The reward and its schedule β_t; files resolve against the config file `path`.
    pub fn build(&self, path: &Path) -> Result<(Arc<dyn Reward>, TiltSchedule)> {
        let r = self;
        let vector = |name: &str, v: &Option<Vec<f64>>| -> Result<Array1<f64>> {
            v.clone().map(Array1::from).ok_or_else(|| {
                anyhow!(
                    "`reward.{name}` is required for reward.kind = \"{}\"",
                    r.kind
                )
            })
        };
        let reward: Arc<dyn Reward> = match r.kind.as_str() {
            "linear" => {
                unused(
                    "reward",
                    &r.kind,
                    &[
                        ("centre", r.centre.is_some()),
                        ("strength", r.strength.is_some()),
                        ("file", r.file.is_some()),
                        ("scale", r.scale.is_some()),
                        ("class", r.class.is_some()),
                    ],
                )?;
                Arc::new(Linear::new(vector("slope", &r.slope)?)?)
            }
            "quadratic" => {
                unused(
                    "reward",
                    &r.kind,
                    &[
                        ("slope", r.slope.is_some()),
                        ("file", r.file.is_some()),
                        ("scale", r.scale.is_some()),
                        ("class", r.class.is_some()),
                    ],
                )?;
                let strength = r.strength.ok_or_else(|| {
                    anyhow!("`reward.strength` is required for reward.kind = \"quadratic\"")
                })?;
                Arc::new(Quadratic::new(vector("centre", &r.centre)?, strength)?)
            }
            "mixture" => {
                unused(
                    "reward",
                    &r.kind,
                    &[
                        ("slope", r.slope.is_some()),
                        ("centre", r.centre.is_some()),
                        ("strength", r.strength.is_some()),
                        ("class", r.class.is_some()),
                    ],
                )?;
                let file = r.file.as_ref().ok_or_else(|| {
                    anyhow!("`reward.file` is required for reward.kind = \"mixture\"")
                })?;
                let mix = io::read_mixture(&resolve(path, file)).context("reward.file")?;
                Arc::new(MixtureLogDensity::new(
                    mix,
                    finite("reward.scale", r.scale, 1.0)?,
                )?)
            }
            "classifier" => {
                unused(
                    "reward",
                    &r.kind,
                    &[
                        ("slope", r.slope.is_some()),
                        ("centre", r.centre.is_some()),
                        ("strength", r.strength.is_some()),
                    ],
                )?;
                let file = r.file.as_ref().ok_or_else(|| {
                    anyhow!("`reward.file` is required for reward.kind = \"classifier\"")
                })?;
                let class = r.class.ok_or_else(|| {
                    anyhow!("`reward.class` is required for reward.kind = \"classifier\"")
                })?;
                let file = resolve(path, file);
                let classifier = Classifier::load(&file)
                    .with_context(|| format!("`reward.file` ({})", file.display()))?;
                Arc::new(ClassReward::new(
                    Arc::new(classifier),
                    class,
                    finite("reward.scale", r.scale, 1.0)?,
                )?)
            }
            other => bail!(
                "`reward.kind` = \"{other}\" is unknown (expected linear, quadratic, mixture or classifier)"
            ),
        };
        let tilt = match r.schedule.as_deref().unwrap_or("linear") {
            "linear" => TiltSchedule::Linear,
            "power" => {
                TiltSchedule::Power(r.power.ok_or_else(|| {
                    anyhow!("`reward.power` is required with schedule = \"power\"")
                })?)
            }
            "signal" => TiltSchedule::Signal,
            "step" => TiltSchedule::Step {
                beta_min: finite("reward.beta_min", r.beta_min, 0.0)?,
                switch: finite("reward.switch", r.switch, 0.4)?,
            },
            other => bail!(
                "`reward.schedule` = \"{other}\" is unknown (expected linear, power, signal or step)"
            ),
        };
        if r.power.is_some() && !matches!(tilt, TiltSchedule::Power(_)) {
            bail!("`reward.power` applies only to schedule = \"power\"");
        }
        if (r.beta_min.is_some() || r.switch.is_some())
            && !matches!(tilt, TiltSchedule::Step { .. })
        {
            bail!("`reward.beta_min` and `reward.switch` apply only to schedule = \"step\"");
        }
        Ok((reward, tilt))
    }
}
