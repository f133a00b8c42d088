//! What a run reports: summary JSON, per-step trace CSV, metrics against a reference,
//! trace plots and progress bars.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use serde_json::{Value, json};
use steer::metrics::{self, Weighted};
use steer::model::GaussianMixture;
use steer::rng::{Purpose, Streams};
use steer::schedule::TimeGrid;
use steer::smc::Run;
use steer::target::{EvaluationCounts, Target};

use crate::config::Config;
use crate::{io, plot};

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, label: &str) -> ProgressBar {
    progress_in(len, label, "steps")
}

/// A progress bar on stderr counting `len` of `unit`.
pub fn progress_in(len: u64, label: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{elapsed}}, eta {{eta}})"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// A spinner on stderr for work of unknown length.
pub fn spinner(label: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(label.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn counts_json(c: &EvaluationCounts) -> Value {
    json!({
        "score": c.score,
        "log_density": c.log_density,
        "divergence": c.divergence,
        "reward_value": c.reward_value,
        "reward_gradient": c.reward_gradient,
        "reward_laplacian": c.reward_laplacian,
        "vjp": c.vjp,
        "h_function": c.h_function,
    })
}

/// The reference samples of `--reference`: none, `exact` (`count` draws from the target's
/// closed form, seeded by `seed`), or a `.npy` file of the target's dimension.
pub fn reference_samples(
    target: &Target,
    grid: &TimeGrid,
    reference: Option<&str>,
    count: usize,
    seed: u64,
) -> Result<Option<Array2<f64>>> {
    Ok(match reference {
        None => None,
        Some("exact") => {
            if count == 0 {
                bail!("--reference-samples must be at least 1");
            }
            if let Some(e) = target
                .experts()
                .iter()
                .position(|e| e.model.as_mixture().is_none())
            {
                bail!(
                    "--reference exact: experts[{e}] is a learned model (not a Gaussian mixture), whose law has no closed form; pass a .npy of reference samples instead (held-out data, or `steer reference`, which runs tempered MALA on the network's log-density: slow)"
                );
            }
            let law = target.exact_terminal_law(grid).ok_or_else(|| {
                anyhow!(
                    "--reference exact: this target has no closed form; run `steer reference` (MCMC) and pass the .npy"
                )
            })?;
            let (x, _) = law.sample(count, &Streams::new(seed ^ 0x5eed), Purpose::Reference);
            Some(x)
        }
        Some(path) => {
            let x = io::read_samples(Path::new(path))?;
            if x.ncols() != target.dim() {
                bail!(
                    "reference {path} has dimension {}, the target has {}",
                    x.ncols(),
                    target.dim()
                );
            }
            Some(x)
        }
    })
}

/// Metrics of weighted samples against reference samples.
pub fn sample_metrics(
    x: ArrayView2<f64>,
    w: Option<ArrayView1<f64>>,
    y: ArrayView2<f64>,
    seed: u64,
) -> Result<Value> {
    let a = match w {
        Some(w) => Weighted::new(x, w)?,
        None => Weighted::uniform(x),
    };
    let b = Weighted::uniform(y);
    let m = metrics::compare(&a, &b, seed)?;
    Ok(json!({
        "mmd": m.mmd,
        "sliced_wasserstein": m.sliced_wasserstein,
        "energy_distance": m.energy_distance,
        "mean_error": m.mean_error,
        "covariance_error": m.covariance_error,
    }))
}

/// The mixture whose components define the target's modes: the exact law's, else the first
/// expert's at the grid's last point.
fn mode_mixture(target: &Target, grid: &TimeGrid) -> Option<GaussianMixture> {
    if let Some(law) = target.exact_terminal_law(grid) {
        return Some(law.mode_mixture().clone());
    }
    target.experts()[0]
        .model
        .as_mixture()
        .map(|m| m.at_level(&grid.level(grid.len())))
}

/// `log Z` of the terminal target where a closed form exists (exact for mixtures, a
/// 200 000-draw bounded-ratio estimate for annealed mixtures): computed once per target and
/// passed to [`summary`].
pub fn exact_log_normalizer(target: &Target, grid: &TimeGrid, seed: u64) -> Option<f64> {
    target
        .exact_terminal_law(grid)
        .map(|law| law.log_normalizer(&steer::rng::Streams::new(seed)))
}

/// The `summary.json` of a run; `exact_log_z` from [`exact_log_normalizer`].
pub fn summary(
    config: &Config,
    target: &Target,
    grid: &TimeGrid,
    run: &Run,
    reference: Option<&Array2<f64>>,
    exact_log_z: Option<f64>,
) -> Result<Value> {
    let ess: Vec<f64> = run.trace.iter().map(|s| s.ess_fraction).collect();
    let integrate = |f: fn(&steer::smc::StepInfo) -> Option<f64>| -> Option<f64> {
        run.trace
            .iter()
            .zip(grid.steps())
            .map(|(s, st)| f(s).map(|v| v * st.dt))
            .sum()
    };
    let integrated_variance = integrate(|s| s.potential_variance);
    let integrated_uncontrolled = integrate(|s| s.uncontrolled_variance);
    let mut summary = json!({
        "method": config.method,
        "output": if run.trace.iter().any(|s| s.potential_variance.is_some()) {
            "sampling: weighted particles targeting q_T (use log_weights.npy); search: the best particle is in `search`"
        } else {
            "sampling: unweighted particles"
        },
        "particles": config.particles,
        "steps": config.steps,
        "seed": config.seed,
        "dimension": target.dim(),
        "evaluations": counts_json(&run.evaluations),
        "wall_time_s": run.wall_time.as_secs_f64(),
        "final_ess_fraction": run.ess_fraction(),
        "min_ess_fraction": ess.iter().cloned().fold(f64::INFINITY, f64::min),
        "mean_ess_fraction": ess.iter().sum::<f64>() / ess.len() as f64,
        "resampling_events": run.resampling_events,
        "log_normalizer": run.log_normalizer,
        "log_normalizer_exact": exact_log_z,
        "integrated_potential_variance": integrated_variance,
        "integrated_uncontrolled_variance": integrated_uncontrolled,
    });
    if let (Some(first), Some(last)) = (run.trace.first(), run.trace.last())
        && first.num_particles != last.num_particles
    {
        summary["particle_schedule"] = json!({
            "first": first.num_particles,
            "last": last.num_particles,
            "planned_score_evaluations": run.trace.iter().map(|s| s.num_particles as u64).sum::<u64>()
                * target.experts().len() as u64,
        });
    }
    if target.reward().is_some() {
        summary["search"] = search(target, run)?;
    }
    if let Some(y) = reference {
        summary["metrics"] = reference_metrics(target, grid, run, y, config.seed)?;
    }
    Ok(summary)
}

/// The search view of a run (MATH.md §8.3): the particle of highest reward, whatever its
/// weight. It is *not* a sample of the target; `samples.npy` with `log_weights.npy` is.
fn search(target: &Target, run: &Run) -> Result<Value> {
    let n = run.samples.nrows();
    let mut r = Array1::zeros(n);
    target.reward_eval(
        run.samples.view(),
        steer::reward::RewardOutput {
            value: Some(r.view_mut()),
            ..Default::default()
        },
    )?;
    let best = (0..n).fold(0, |b, i| if r[i] > r[b] { i } else { b });
    let w = run.log_weights.mapv(f64::exp);
    let mut out = json!({
        "best_reward": r[best],
        "best_index": best,
        "best_sample": run.samples.row(best).to_vec(),
        "mean_reward": w.dot(&r),
    });
    if let Some(c) = target.reward().and_then(|r| r.as_class_reward()) {
        // The weighted fraction of samples the classifier assigns to the steered class.
        let predicted = c.classifier.predict(run.samples.view())?;
        let accuracy: f64 = predicted
            .iter()
            .zip(&w)
            .filter(|(p, _)| **p as usize == c.class)
            .map(|(_, w)| w)
            .sum();
        out["class"] = json!(c.class);
        out["class_accuracy"] = json!(accuracy);
    }
    Ok(out)
}

/// Metrics of a run's weighted samples against reference samples `y` of the target:
/// [`sample_metrics`] (`seed` drives the sliced Wasserstein projections), mode weights and
/// their total variation where the target has modes, and ΔNLL where every expert has a
/// log-density.
pub fn reference_metrics(
    target: &Target,
    grid: &TimeGrid,
    run: &Run,
    y: &Array2<f64>,
    seed: u64,
) -> Result<Value> {
    let w = run.log_weights.mapv(f64::exp);
    let mut m = sample_metrics(run.samples.view(), Some(w.view()), y.view(), seed)?;
    if let Some(modes) = mode_mixture(target, grid) {
        let level = steer::model::NoiseLevel::data();
        let k = modes.num_components();
        let got =
            metrics::mode_weights(&modes.assign(&level, run.samples.view()), Some(w.view()), k);
        let want = metrics::mode_weights(&modes.assign(&level, y.view()), None, k);
        m["mode_weights"] = json!(got.to_vec());
        m["reference_mode_weights"] = json!(want.to_vec());
        m["mode_weight_tv"] = json!(metrics::total_variation(got.view(), want.view()));
    }
    if target
        .experts()
        .iter()
        .all(|e| e.model.provides_log_density())
    {
        let level = grid.level(grid.len());
        let nll = |x: ArrayView2<f64>| -> Result<Array1<f64>> {
            let mut l = Array1::zeros(x.nrows());
            target.log_density(&level, 1.0, x, l.view_mut())?;
            Ok(-l)
        };
        let delta = w.dot(&nll(run.samples.view())?) - nll(y.view())?.mean().unwrap_or(0.0);
        m["delta_nll"] = json!(delta);
    }
    m["reference_samples"] = json!(y.nrows());
    Ok(m)
}

/// A one-line digest for the terminal.
pub fn one_line(summary: &Value) -> String {
    let mut s = format!(
        "{}: {:.2} s, final ESS {:.3}, log Ẑ {:.4}",
        summary["method"].as_str().unwrap_or("?"),
        summary["wall_time_s"].as_f64().unwrap_or(f64::NAN),
        summary["final_ess_fraction"].as_f64().unwrap_or(f64::NAN),
        summary["log_normalizer"].as_f64().unwrap_or(f64::NAN),
    );
    if let Some(m) = summary.get("metrics") {
        s += &format!(", MMD {:.4}", m["mmd"].as_f64().unwrap_or(f64::NAN));
        if let Some(tv) = m.get("mode_weight_tv").and_then(Value::as_f64) {
            s += &format!(", mode TV {tv:.4}");
        }
    }
    s
}

/// `trace.csv`: one row per step.
pub fn write_trace(path: &Path, run: &Run) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let theta_width = run.trace.iter().map(|s| s.theta.len()).max().unwrap_or(0);
    write!(
        f,
        "step,t,num_particles,ess_fraction,potential_variance,uncontrolled_variance,resampled,log_normalizer,score_evaluations"
    )?;
    for i in 0..theta_width {
        write!(f, ",theta_{i}")?;
    }
    writeln!(f)?;
    for s in &run.trace {
        write!(
            f,
            "{},{},{},{},{},{},{},{},{}",
            s.step,
            s.t,
            s.num_particles,
            s.ess_fraction,
            s.potential_variance
                .map(|v| v.to_string())
                .unwrap_or_default(),
            s.uncontrolled_variance
                .map(|v| v.to_string())
                .unwrap_or_default(),
            s.resampled as u8,
            s.log_normalizer,
            s.evaluations.score
        )?;
        for i in 0..theta_width {
            write!(
                f,
                ",{}",
                s.theta.get(i).map(|v| v.to_string()).unwrap_or_default()
            )?;
        }
        writeln!(f)?;
    }
    f.flush()?;
    Ok(())
}

/// ESS and potential-variance plot of a run.
pub fn plot_trace(path: &Path, run: &Run, title: &str) -> Result<()> {
    let t: Vec<f64> = run.trace.iter().map(|s| s.t).collect();
    let ess: Vec<f64> = run.trace.iter().map(|s| s.ess_fraction).collect();
    let var: Vec<f64> = run
        .trace
        .iter()
        .map(|s| s.potential_variance.unwrap_or(f64::NAN))
        .collect();
    let resampled: Vec<bool> = run.trace.iter().map(|s| s.resampled).collect();
    plot::trace_plot(path, &t, &ess, &var, &resampled, title)
}
