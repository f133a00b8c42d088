//! `steer bench`: every method × particle count × seed on one target and time grid, scored
//! against one shared reference; writes `results.jsonl`, `table.md`, comparison plots and a
//! `summary.json` of the bench itself.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use steer::smc::Run;
use steer::target::Target;

use crate::config::{self, Config, Plan};
use crate::plot::{self, Series};
use crate::{io, report};

/// The command line of `steer bench`.
pub struct Args<'a> {
    /// Run configuration; its `method`, `particles` and `seed` are overridden per run.
    pub config: &'a Path,
    /// Output folder.
    pub out: &'a Path,
    /// Methods to compare.
    pub methods: &'a [String],
    /// Particle counts N.
    pub particles: &'a [usize],
    /// Seeds per method and N: `seed`, `seed + 1`, … of the config.
    pub seeds: usize,
    /// `--set key=value` overrides applied to the config first.
    pub set: &'a [String],
    /// `exact` or a `.npy` file of reference samples.
    pub reference: Option<&'a str>,
    /// Number of exact reference samples.
    pub reference_samples: usize,
}

/// Per-step curves of a run, kept for the plots.
struct Curves {
    t: Vec<f64>,
    ess: Vec<f64>,
    variance: Vec<f64>,
    uncontrolled: Option<Vec<f64>>,
}

impl Curves {
    fn of(run: &Run) -> Self {
        let trace = &run.trace;
        let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
        Curves {
            t: trace.iter().map(|s| s.t).collect(),
            ess: trace.iter().map(|s| s.ess_fraction).collect(),
            variance: trace.iter().map(|s| nan(s.potential_variance)).collect(),
            uncontrolled: trace
                .iter()
                .any(|s| s.uncontrolled_variance.is_some())
                .then(|| trace.iter().map(|s| nan(s.uncontrolled_variance)).collect()),
        }
    }
}

/// The runs of one method at one particle count, one summary per seed.
struct Cell {
    method: String,
    particles: usize,
    summaries: Vec<Value>,
}

impl Cell {
    /// The number at `path` in every seed's summary; `None` if any lacks it.
    fn values(&self, path: &[&str]) -> Option<Vec<f64>> {
        self.summaries
            .iter()
            .map(|s| path.iter().try_fold(s, |v, k| v.get(k))?.as_f64())
            .collect()
    }
}

/// Runs `steer bench`.
pub fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    check_flags(args)?;
    let mut particles = args.particles.to_vec();
    particles.sort_unstable();
    let path = args.config;
    let at = || path.display().to_string();
    let (base, grid, target) = config::load_problem(path, args.set)?;

    // One config per method, checked for every particle count before anything runs.
    let mut configs = Vec::new();
    for method in args.methods {
        let mut c = method_config(path, args.set, method, &target)
            .with_context(|| format!("--methods {method} ({})", at()))?;
        for &n in &particles {
            c.particles = n;
            c.settings()
                .with_context(|| format!("{method} with N = {n} on {}", at()))?;
        }
        configs.push((method.clone(), c));
    }
    let reference = report::reference_samples(
        &target,
        &grid,
        args.reference,
        args.reference_samples,
        base.seed,
    )?;
    let staging = io::Staging::new(args.out)?;
    // Once for the whole bench: the annealed law's estimate draws 200 000 candidates.
    let exact_log_z = report::exact_log_normalizer(&target, &grid, base.seed);

    let runs = configs.len() * particles.len() * args.seeds;
    let work: usize = configs
        .iter()
        .map(|(_, c)| {
            passes(c, path, &target) * grid.len() * particles.iter().sum::<usize>() * args.seeds
        })
        .sum();
    let bar = report::progress_in(work as u64, "bench", "particle-steps");
    let results_path = staging.path("results.jsonl");
    let mut results = std::io::BufWriter::new(
        std::fs::File::create(&results_path)
            .with_context(|| format!("cannot create {}", results_path.display()))?,
    );
    let largest = *particles.last().expect("checked non-empty");
    let mut cells = Vec::new();
    let mut curves = Vec::new();
    let mut done = 0;
    for (entry, c) in &mut configs {
        let mut kept = None;
        for &n in &particles {
            let mut cell = Cell {
                method: entry.clone(),
                particles: n,
                summaries: Vec::new(),
            };
            for s in 0..args.seeds {
                c.particles = n;
                c.seed = base.seed.wrapping_add(s as u64);
                let label = format!("{entry} N={n} seed {}", c.seed);
                done += 1;
                bar.set_message(format!("[{done}/{runs}] {label}"));
                let settings = c.settings()?;
                let plan = c.plan(path, &target)?;
                let (run, _) =
                    crate::execute(plan, &target, &grid, &settings, &mut |_| bar.inc(n as u64))
                        .with_context(|| label.clone())?;
                let mut summary =
                    report::summary(c, &target, &grid, &run, reference.as_ref(), exact_log_z)
                        .with_context(|| label.clone())?;
                summary["entry"] = serde_json::json!(entry);
                writeln!(results, "{}", serde_json::to_string(&summary)?)?;
                bar.suspend(|| {
                    eprintln!(
                        "[{done}/{runs}] N={n} seed {}: {}",
                        c.seed,
                        report::one_line(&summary)
                    )
                });
                if n == largest && s == 0 {
                    kept = Some(Curves::of(&run));
                }
                cell.summaries.push(summary);
            }
            cells.push(cell);
        }
        curves.push((entry.clone(), kept.expect("the largest N ran with seed 0")));
    }
    bar.finish_and_clear();
    results.flush()?;
    drop(results);

    let table = table(&cells);
    std::fs::write(staging.path("table.md"), &table)?;
    if base.output.plots.unwrap_or(true) {
        let which = format!("N = {largest}, seed {}", base.seed);
        variance_plot(&staging.path("potential_variance.png"), &curves, &which)?;
        let ess: Vec<(String, Vec<f64>, Vec<f64>)> = curves
            .iter()
            .map(|(m, c)| (m.clone(), c.t.clone(), c.ess.clone()))
            .collect();
        plot::lines_plot(
            &staging.path("ess.png"),
            "sampling time t",
            "ESS / N",
            &ess,
            false,
            &format!("effective sample size — {which}"),
        )?;
        if reference.is_some() {
            stat_plot(
                &staging.path("metrics.png"),
                &cells,
                args.seeds,
                &["metrics", "mmd"],
                "MMD to the reference",
                true,
            )?;
        }
        if target.reward().is_some() {
            stat_plot(
                &staging.path("reward.png"),
                &cells,
                args.seeds,
                &["search", "best_reward"],
                "best reward found",
                false,
            )?;
        }
    }
    let info = json!({
        "command": "bench",
        "config": path.display().to_string(),
        "set": args.set,
        "methods": args.methods,
        "particles": particles,
        "seeds": args.seeds,
        "seed": base.seed,
        "steps": base.steps,
        "dimension": target.dim(),
        "reference": args.reference,
        "reference_samples": reference.as_ref().map(|r| r.nrows()),
        "runs": runs,
        "wall_time_s": start.elapsed().as_secs_f64(),
    });
    std::fs::write(
        staging.path("summary.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    let out = staging.commit()?;
    print!("{table}");
    eprintln!(
        "wrote {} ({runs} runs in {:.1} s)",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Rejects empty or repeated lists, zero particles and zero seeds, naming the flag.
fn check_flags(args: &Args) -> Result<()> {
    if args.methods.is_empty() || args.methods.iter().any(|m| m.trim().is_empty()) {
        bail!("--methods needs a comma-separated list of methods, such as pg,g-smc,vcg-smc");
    }
    if let Some(m) = repeated(args.methods) {
        bail!("--methods lists {m} twice");
    }
    if args.particles.is_empty() {
        bail!("--particles needs a comma-separated list of particle counts, such as 256,1024");
    }
    if args.particles.contains(&0) {
        bail!("--particles: every particle count must be at least 1, got 0");
    }
    if let Some(n) = repeated(args.particles) {
        bail!("--particles lists {n} twice");
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    Ok(())
}

/// The first value that occurs twice in `v`.
fn repeated<T: PartialEq>(v: &[T]) -> Option<&T> {
    v.iter()
        .enumerate()
        .find(|(i, x)| v[..*i].contains(x))
        .map(|(_, x)| x)
}

/// The config of one method entry of `--methods`: `name` or `name:key=value:key=value`
/// (per-method overrides, e.g. `urge:urge.twist=reward`; they must not change the target or
/// the schedule, which the bench shares). Sections that do not apply to the method are
/// dropped: `[driftlite]` for the guided methods, Doob and URGE without a controlled
/// proposal, `[urge]` for every method but URGE, `[doob]` for every method but Doob, URGE
/// with a Doob proposal or twist and DriftLite with the Doob proposal, and the resampling
/// trigger of `vcg` and `ecg`, which never
/// resample.
fn method_config(path: &Path, set: &[String], entry: &str, target: &Target) -> Result<Config> {
    let mut parts = entry.split(':');
    let method = parts.next().unwrap_or_default();
    let overrides: Vec<String> = set
        .iter()
        .cloned()
        .chain(parts.map(str::to_string))
        .collect();
    let mut c = config::load(path, &overrides)?;
    c.method = method.to_string();
    if method != "urge" {
        c.urge = None;
    }
    match method {
        "base" | "pg" | "g-smc" | "doob" => c.driftlite = None,
        "vcg" | "ecg" => {
            c.resampling.when = Some("never".to_string());
            c.resampling.threshold = None;
            c.resampling.period = None;
        }
        "urge" => {
            let proposal = c.urge.as_ref().and_then(|u| u.proposal.as_deref());
            if !matches!(proposal, Some("vcg" | "ecg")) {
                c.driftlite = None;
            }
        }
        _ => {}
    }
    let doob_urge = method == "urge"
        && c.urge.as_ref().is_some_and(|u| {
            u.proposal.as_deref() == Some("doob") || u.twist.as_deref() == Some("doob")
        });
    let doob_driftlite = matches!(method, "vcg" | "vcg-smc" | "ecg" | "ecg-smc")
        && c.driftlite
            .as_ref()
            .is_some_and(|d| d.proposal.as_deref() == Some("doob"));
    if method != "doob" && !doob_urge && !doob_driftlite {
        c.doob = None;
    }
    c.plan(path, target)?;
    Ok(c)
}

/// Passes over the time grid that one run of `c` makes.
fn passes(c: &Config, path: &Path, target: &Target) -> usize {
    match c.plan(path, target) {
        Ok(Plan::DriftLite { passes, .. }) => passes,
        _ => 1,
    }
}

/// `table.md`: one row per method and N, mean ± std over seeds.
fn table(cells: &[Cell]) -> String {
    let mut s = String::from(
        "| method | N | MMD | SWD | mode TV | best reward | final ESS/N | wall time (s) | score evals/run | divergence evals/run | reward ∇ + Δ evals/run |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        let stat = |path: &[&str]| match c.values(path) {
            Some(v) => {
                let (mean, std) = mean_std(&v);
                fmt_mean_std(mean, std)
            }
            None => "—".to_string(),
        };
        let count = |path: &[&str]| match c.values(path) {
            Some(v) => format!("{:.0}", mean_std(&v).0),
            None => "—".to_string(),
        };
        let score = count(&["evaluations", "score"]);
        let divergence = count(&["evaluations", "divergence"]);
        let reward_derivatives = match (
            c.values(&["evaluations", "reward_gradient"]),
            c.values(&["evaluations", "reward_laplacian"]),
        ) {
            (Some(g), Some(l)) => format!("{:.0}", mean_std(&g).0 + mean_std(&l).0),
            _ => "—".to_string(),
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c.method,
            c.particles,
            stat(&["metrics", "mmd"]),
            stat(&["metrics", "sliced_wasserstein"]),
            stat(&["metrics", "mode_weight_tv"]),
            stat(&["search", "best_reward"]),
            stat(&["final_ess_fraction"]),
            stat(&["wall_time_s"]),
            score,
            divergence,
            reward_derivatives,
        );
    }
    s
}

/// Mean and Bessel-corrected standard deviation (none for fewer than two values).
fn mean_std(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.len() > 1)
        .then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (mean, std)
}

/// Decimals that show `v` to `digits` significant digits (after rounding to them, so that
/// 0.9999 shows as 1.00).
fn decimals(v: f64, digits: i32) -> usize {
    let raw = |v: f64| {
        if v == 0.0 || !v.is_finite() {
            return (digits - 1).max(0) as usize;
        }
        (digits - 1 - v.abs().log10().floor() as i32).clamp(0, 12) as usize
    };
    let scale = 10f64.powi(raw(v) as i32);
    raw((v * scale).round() / scale)
}

/// `mean ± std`: the mean to three significant digits, or one decimal more when the std's
/// first significant digit sits there; scientific below 10⁻³.
fn fmt_mean_std(mean: f64, std: Option<f64>) -> String {
    if !mean.is_finite() {
        return format!("{mean}");
    }
    if mean != 0.0 && mean.abs() < 1e-3 {
        return match std {
            Some(s) => format!("{mean:.2e} ± {s:.1e}"),
            None => format!("{mean:.2e}"),
        };
    }
    let d = decimals(mean, 3);
    match std {
        Some(s) => {
            // One more decimal when the std's first digit needs it; none for a negligible std.
            let d = if decimals(s, 1) == d + 1 { d + 1 } else { d };
            format!("{mean:.d$} ± {s:.d$}")
        }
        None => format!("{mean:.d$}"),
    }
}

/// `potential_variance.png`: Var_W of the potential over t per weighted method, dashed
/// before control for DriftLite.
fn variance_plot(path: &Path, curves: &[(String, Curves)], which: &str) -> Result<()> {
    let mut series = Vec::new();
    for (k, (method, c)) in curves.iter().enumerate() {
        if c.variance.iter().any(|v| v.is_finite()) {
            series.push(Series::new(method, c.t.clone(), c.variance.clone(), k));
        }
        if let Some(u) = &c.uncontrolled {
            let mut s = Series::new(
                &format!("{method} (before control)"),
                c.t.clone(),
                u.clone(),
                k,
            );
            s.dashed = true;
            series.push(s);
        }
    }
    plot::series_plot(
        path,
        "sampling time t",
        "Var_W[potential]",
        &series,
        false,
        true,
        &format!("variance of the potential — {which}"),
    )
}

/// A plot of one per-run statistic (at `field` in each summary) against N per method,
/// error bars one std over seeds: `metrics.png` (MMD, log scale) and `reward.png` (best
/// reward found, the search view).
fn stat_plot(
    path: &Path,
    cells: &[Cell],
    seeds: usize,
    field: &[&str],
    name: &str,
    log_y: bool,
) -> Result<()> {
    let mut series: Vec<Series> = Vec::new();
    for c in cells {
        let (mean, std) = c
            .values(field)
            .map(|v| mean_std(&v))
            .unwrap_or((f64::NAN, None));
        let k = match series.iter().position(|s| s.label == c.method) {
            Some(k) => k,
            None => {
                let mut s = Series::new(&c.method, Vec::new(), Vec::new(), series.len());
                s.error = Some(Vec::new());
                series.push(s);
                series.len() - 1
            }
        };
        let s = &mut series[k];
        s.x.push(c.particles as f64);
        s.y.push(mean);
        if let Some(e) = s.error.as_mut() {
            e.push(std.unwrap_or(f64::NAN));
        }
    }
    // Side by side at each N, so that the error bars stay apart.
    let mid = (series.len() as f64 - 1.0) / 2.0;
    for (k, s) in series.iter_mut().enumerate() {
        s.shift = 0.01 * (k as f64 - mid);
    }
    let title = if seeds > 1 {
        format!("{name} (mean ± std over {seeds} seeds)")
    } else {
        format!("{name} (1 seed)")
    };
    plot::series_plot(
        path,
        "particles N (budget: N score evaluations per step)",
        name,
        &series,
        true,
        log_y,
        &title,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_bessel_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[7.0]), (7.0, None));
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_mean_std(0.0123, Some(0.0021)), "0.0123 ± 0.0021");
        assert_eq!(fmt_mean_std(2.614, Some(0.05)), "2.61 ± 0.05");
        assert_eq!(fmt_mean_std(0.95, Some(0.0004)), "0.9500 ± 0.0004");
        assert_eq!(fmt_mean_std(12.34, Some(1.2)), "12.3 ± 1.2");
        assert_eq!(fmt_mean_std(123.4, Some(5.1)), "123 ± 5");
        assert_eq!(fmt_mean_std(1.0, Some(0.0)), "1.00 ± 0.00");
        assert_eq!(fmt_mean_std(1.0 - 2e-16, Some(1e-16)), "1.00 ± 0.00");
        assert_eq!(fmt_mean_std(0.9996, Some(0.0096)), "1.00 ± 0.01");
        assert_eq!(fmt_mean_std(0.0123, Some(0.021)), "0.0123 ± 0.0210");
        assert_eq!(fmt_mean_std(0.5, None), "0.500");
        assert_eq!(fmt_mean_std(0.000123, Some(0.00004)), "1.23e-4 ± 4.0e-5");
        assert_eq!(fmt_mean_std(f64::NAN, None), "NaN");
    }

    #[test]
    fn repeats_are_found() {
        assert_eq!(repeated(&[1, 2, 3]), None);
        assert_eq!(repeated(&[1, 2, 1, 2]), Some(&1));
        assert_eq!(repeated(&["pg", "vcg", "vcg"]), Some(&"vcg"));
    }
}
