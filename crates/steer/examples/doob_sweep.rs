//! Guidance error of a learned Doob h-function (MATH.md §7.3) against the exact one (§11.6)
//! as a function of the training-sample size and the weight λ_gp of the gradient term.
//!
//! Problem (as in `tests/doob_learned.rs`): the 1-D mixture 0.6 N(−2, 0.4) + 0.4 N(2, 0.6)
//! tilted by r = −0.2 (x − 1.5)², VP linear schedule, base samples drawn exactly. At each of
//! the 20 midpoints τ_k of [0, 1] the error `e(τ) = E_{q_τ}|∇log ĥ − ∇log h|²` is averaged
//! over 4000 exact samples of the tilted noised law `q_τ`. Reported: `e` at four τ, the mean
//! over τ ("mean error", and relative to the mean of `E_{q_τ}|∇log h|²`), and the path KL
//! `½ ∫ β(τ) e(τ) dτ`, the Girsanov divergence between the exact and the learned Doob
//! samplers with V = U (midpoint rule), which weights high noise more.
//!
//! ```text
//! cargo run --release -p steer --example doob_sweep -- [sizes] [lambdas] [seeds] [steps] [loss] [pairs]
//! cargo run --release -p steer --example doob_sweep -- 500,2000,8000 0,0.001,0.01,0.1 0,1 1500 penalised fresh
//! ```
//! (`CANDLE_GRAD_DO_NOT_DETACH=1` is needed for λ_gp > 0; `cargo run` sets it.)

use std::sync::Arc;

use ndarray::{Array1, Array2, array};
use steer::doob::{ExactH, HFunction, HOutput};
use steer::doob_net::{DoobLoss, DoobNetwork, DoobPairs, DoobTrainConfig, train};
use steer::model::{Covariance, GaussianMixture, NoiseLevel, ScoreModel};
use steer::reward::{Quadratic, Reward};
use steer::rng::{Purpose, Streams};
use steer::schedule::Schedule;

fn list<T: std::str::FromStr>(arg: Option<String>, default: &str) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    arg.unwrap_or_else(|| default.into())
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect()
}

fn grad(h: &dyn HFunction, level: &NoiseLevel, x: &Array2<f64>) -> Array2<f64> {
    let mut g = Array2::zeros(x.dim());
    h.evaluate(
        level,
        x.view(),
        HOutput {
            log_h: None,
            grad_log_h: g.view_mut(),
        },
    )
    .unwrap();
    g
}

/// Mean squared guidance error under the tilted noised law at each τ.
fn errors(net: &DoobNetwork, exact: &ExactH, schedule: &Schedule, taus: &[f64]) -> Vec<f64> {
    taus.iter()
        .enumerate()
        .map(|(i, &tau)| {
            let level = NoiseLevel::new(schedule, tau);
            let x = exact.tilted().at_level(&level).sample(
                4000,
                &Streams::new(100 + i as u64),
                Purpose::Reference,
            );
            let diff = grad(net, &level, &x) - grad(exact, &level, &x);
            diff.mapv(|v| v * v).sum() / x.nrows() as f64
        })
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sizes: Vec<usize> = list(args.next(), "500,2000,8000");
    let lambdas: Vec<f64> = list(args.next(), "0,0.001,0.01,0.1");
    let seeds: Vec<u64> = list(args.next(), "0");
    let steps: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(1500);
    let loss = match args.next().as_deref() {
        Some("unbiased") => DoobLoss::Unbiased,
        _ => DoobLoss::Penalised,
    };
    let pairs = match args.next().as_deref() {
        Some("fixed") => DoobPairs::Fixed,
        _ => DoobPairs::Fresh,
    };
    let mix = GaussianMixture::new(
        array![0.6, 0.4],
        array![[-2.0], [2.0]],
        Covariance::Isotropic(array![0.4, 0.6]),
    )
    .unwrap();
    let reward = Quadratic::new(array![1.5], 0.4).unwrap();
    let dim = mix.dim();
    let exact = ExactH::new(&mix, reward.closed_form().unwrap()).unwrap();
    let schedule = Schedule::VpLinear {
        beta_min: 0.1,
        beta_max: 20.0,
        horizon: 1.0,
    };
    let taus: Vec<f64> = (0..20).map(|k| 0.025 + 0.05 * k as f64).collect();
    let scale: Vec<f64> = taus
        .iter()
        .enumerate()
        .map(|(i, &tau)| {
            let level = NoiseLevel::new(&schedule, tau);
            let x = exact.tilted().at_level(&level).sample(
                4000,
                &Streams::new(100 + i as u64),
                Purpose::Reference,
            );
            grad(&exact, &level, &x).mapv(|v| v * v).sum() / x.nrows() as f64
        })
        .collect();
    let scale_mean = scale.iter().sum::<f64>() / scale.len() as f64;
    println!(
        "loss {loss:?}, pairs {pairs:?}, {steps} steps; mean over τ of E|∇log h|² = {scale_mean:.4}; path KL = ½∫β e dτ"
    );
    println!(
        "| n | λ_gp | seed | error at τ = 0.025, 0.225, 0.475, 0.725 | mean error | relative | path KL | seconds |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let score: Arc<dyn ScoreModel> = Arc::new(mix.clone());
    for &n in &sizes {
        for &lambda in &lambdas {
            let mut means = Vec::new();
            for &seed in &seeds {
                let x = mix.sample(n, &Streams::new(1000 + seed), Purpose::Other);
                let mut cfg = DoobTrainConfig::new(dim, schedule);
                cfg.lambda_gp = lambda;
                cfg.steps = steps;
                cfg.seed = seed;
                cfg.loss = loss;
                cfg.pairs = pairs;
                cfg.eval_every = steps;
                let t = std::time::Instant::now();
                let net = train(x.view(), &reward, Some(score.clone()), &cfg, |_| {}).unwrap();
                let secs = t.elapsed().as_secs_f64();
                let e = Array1::from(errors(&net, &exact, &schedule, &taus));
                let mean = e.mean().unwrap();
                let kl: f64 = taus
                    .iter()
                    .zip(&e)
                    .map(|(&t, &v)| 0.5 * 0.05 * schedule.diffusion_squared(t) * v)
                    .sum();
                means.push((mean, kl));
                println!(
                    "| {n} | {lambda} | {seed} | {} | {mean:.4} | {:.3} | {kl:.4} | {secs:.1} |",
                    [0usize, 4, 9, 14]
                        .iter()
                        .map(|&k| e[k])
                        .map(|v| format!("{v:.4}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    mean / scale_mean
                );
            }
            if seeds.len() > 1 {
                let m = means.iter().map(|v| v.0).sum::<f64>() / means.len() as f64;
                let k = means.iter().map(|v| v.1).sum::<f64>() / means.len() as f64;
                println!("| {n} | {lambda} | mean | | {m:.4} | | {k:.4} | |");
            }
        }
    }
}
