//! Learned score networks (issue: candle networks): a network trained on samples of a 2-D
//! mixture reproduces it, is steered toward the right answer, round-trips through its files
//! bit for bit, and its autodiff Hutchinson divergence is unbiased for the exact trace.
//!
//! One network is trained once per test binary (about 2000 Adam steps, ~30 s on 2 cores)
//! and shared by the tests.

mod common;

use common::*;
use std::sync::{Arc, OnceLock};

use ndarray::{Array1, Array2, Axis, array, s};
use steer::exact::ExactLaw;
use steer::method::{Guidance, GuidedSampler};
use steer::metrics::{Weighted, mmd_rbf};
use steer::model::nn::{Architecture, Network, TrainConfig, train};
use steer::model::{Covariance, GaussianMixture, NoiseLevel, Probe, ScoreModel, ScoreOutput};
use steer::reward::{Quadratic, Reward};
use steer::rng::{Purpose, Streams};
use steer::schedule::{GridKind, TimeGrid};
use steer::smc::{self, Run};
use steer::target::{Expert, Target, TiltSchedule};

/// The data law: three well-separated isotropic components.
fn mixture() -> GaussianMixture {
    GaussianMixture::new(
        array![0.5, 0.3, 0.2],
        array![[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]],
        Covariance::Isotropic(array![0.25, 0.25, 0.25]),
    )
    .unwrap()
}

const TAU_MIN: f64 = 1e-3;

fn network() -> Arc<Network> {
    static NET: OnceLock<Arc<Network>> = OnceLock::new();
    NET.get_or_init(|| {
        let data = mixture().sample(4000, &Streams::new(1), Purpose::Other);
        let mut cfg = TrainConfig::new(2, vp());
        cfg.architecture = Architecture::Mlp {
            hidden: 128,
            blocks: 3,
            embedding: 32,
        };
        cfg.steps = 2000;
        cfg.tau_min = TAU_MIN;
        cfg.seed = 7;
        Arc::new(train(data.view(), &cfg, |_| {}).unwrap())
    })
    .clone()
}

/// The sampling grid of a learned VP model: uniform down to τ_min = 10⁻³ (MATH.md §1.2).
fn learned_grid(steps: usize) -> TimeGrid {
    TimeGrid::new(vp(), GridKind::Uniform, steps, 1.0, TAU_MIN, 1.0).unwrap()
}

fn scores(model: &dyn ScoreModel, level: &NoiseLevel, x: &Array2<f64>) -> Array2<f64> {
    let mut s = Array2::zeros(x.dim());
    model
        .evaluate(
            level,
            x.view(),
            ScoreOutput {
                score: s.view_mut(),
                log_density: None,
                divergence: None,
            },
        )
        .unwrap();
    s
}

fn mmd(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    mmd_rbf(
        &Weighted::uniform(a.view()),
        &Weighted::uniform(b.view()),
        None,
    )
    .unwrap()
}

fn run(t: &Target, g: &TimeGrid, guidance: Guidance, n: usize, seed: u64) -> Run {
    let mut method = GuidedSampler::new(t, guidance);
    smc::run(&mut method, t, g, &settings(n, seed, ESS_HALF), &mut |_| {}).unwrap()
}

fn learned_target(reward: Option<Arc<dyn Reward>>) -> Target {
    let model: Arc<dyn ScoreModel> = network();
    Target::new(
        vec![Expert { model, gamma: 1.0 }],
        reward,
        TiltSchedule::Linear,
    )
    .unwrap()
}

/// Weighted mode weights of a run under the exact law's components.
fn mode_weights(x: &Array2<f64>, w: Option<&Array1<f64>>, modes: &GaussianMixture) -> Array1<f64> {
    let labels = modes.assign(&NoiseLevel::data(), x.view());
    steer::metrics::mode_weights(&labels, w.map(|w| w.view()), modes.num_components())
}

/// The score error weighted by `p_τ`, `E_{p_τ}|ŝ − s|² / E_{p_τ}|s|²`, is small at every
/// noise level, and the base sampler of the network reproduces the mixture.
///
/// Score-error bounds: measured 0.23, 0.014, 0.003 and 0.0003 at τ = 0.01, 0.05, 0.2, 0.5;
/// the error is largest near the data, where the score of the narrow components is steep.
///
/// MMD bound: 1500 base samples against 1500 exact ones. Between two exact sample sets the
/// MMD has mean m₀ and spread sd₀ (10 pairs); the bound m₀ + 4 sd₀ is what an exact sampler
/// passes (measured: learned 0.013, bound 0.08). The test also checks that a 0.3 shift of
/// the exact samples, a visible defect, exceeds it.
#[test]
fn learned_network_reproduces_the_mixture() {
    let net = network();
    let mix = mixture();
    for (tau, bound) in [(0.01, 0.5), (0.05, 0.05), (0.2, 0.02), (0.5, 0.01)] {
        let level = NoiseLevel::new(&vp(), tau);
        let x = mix
            .at_level(&level)
            .sample(4000, &Streams::new(5), Purpose::Reference);
        let exact = scores(&mix, &level, &x);
        let learned = scores(net.as_ref(), &level, &x);
        let err = (&exact - &learned).mapv(|v| v * v).sum() / exact.mapv(|v| v * v).sum();
        eprintln!("τ = {tau}: relative p_τ-weighted score error {err:.4}");
        assert!(
            err < bound,
            "τ = {tau}: relative score error {err} ≥ {bound}"
        );
    }

    let n = 1500;
    let t = learned_target(None);
    let out = run(&t, &learned_grid(200), Guidance::Base, n, 1);
    let exact = mix.sample(n, &Streams::new(99), Purpose::Reference);
    let null: Vec<f64> = (0..10)
        .map(|s| {
            let a = mix.sample(n, &Streams::new(1000 + s), Purpose::Reference);
            let b = mix.sample(n, &Streams::new(2000 + s), Purpose::Reference);
            mmd(&a, &b)
        })
        .collect();
    let (m0, se) = over_seeds(&null);
    let sd0 = se * (null.len() as f64).sqrt();
    let bound = m0 + 4.0 * sd0;
    let got = mmd(&out.samples, &exact);
    let shifted = mmd(&out.samples, &(&exact + 0.3));
    eprintln!(
        "MMD learned {got:.4}, null {m0:.4} ± {sd0:.4}, bound {bound:.4}, shifted {shifted:.4}"
    );
    assert!(got < bound, "MMD {got} ≥ {bound}");
    assert!(
        shifted > bound,
        "a 0.3 shift ({shifted}) must exceed the bound {bound}"
    );
}

/// Saving and loading gives bit-identical scores.
#[test]
fn save_and_load_are_bit_identical() {
    let net = network();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("model.json");
    net.save(&json).unwrap();
    let loaded = Network::load(&json).unwrap();
    let level = NoiseLevel::new(&vp(), 0.3);
    let x = mixture().sample(257, &Streams::new(3), Purpose::Reference);
    let a = scores(net.as_ref(), &level, &x);
    let b = scores(&loaded, &level, &x);
    assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    assert_eq!(net.spec().data_mean, loaded.spec().data_mean);
}

/// The autodiff Hutchinson estimate `mean_p z_pᵀ J z_p` (Rademacher) is unbiased for the
/// exact trace `Σ_j e_jᵀ J e_j` (the diagonal computed column by column with autodiff).
/// For Rademacher probes `Var(zᵀJz) = Σ_{a<b} (J_ab + J_ba)²`, and the pair sums come from
/// the forms of `e_a + e_b`: `(J_aa + J_bb + J_ab + J_ba)`. With P = 400 probes the error
/// of the mean must lie within 4 standard errors at every point.
#[test]
fn autodiff_hutchinson_matches_the_exact_trace() {
    let net = network();
    let level = NoiseLevel::new(&vp(), 0.1);
    let x = mixture()
        .at_level(&level)
        .sample(16, &Streams::new(8), Purpose::Reference);
    let (n, d) = x.dim();
    let forms = |z: ndarray::Array3<f64>| {
        let mut s = Array2::zeros((n, d));
        let mut f = Array2::zeros((z.len_of(Axis(0)), n));
        net.jacobian_quadratic_forms(&level, x.view(), z.view(), s.view_mut(), f.view_mut())
            .unwrap();
        f
    };
    // Unit probes e_0, e_1 and the pair probe e_0 + e_1.
    let mut unit = ndarray::Array3::zeros((3, n, d));
    unit.slice_mut(s![0, .., 0]).fill(1.0);
    unit.slice_mut(s![1, .., 1]).fill(1.0);
    unit.slice_mut(s![2, .., ..]).fill(1.0);
    let f = forms(unit);
    let trace = &f.row(0) + &f.row(1);
    // Exact divergence through the ScoreOutput path agrees with the unit-probe trace.
    let mut div = Array1::zeros(n);
    let mut sc = Array2::zeros((n, d));
    net.evaluate(
        &level,
        x.view(),
        ScoreOutput {
            score: sc.view_mut(),
            log_density: None,
            divergence: Some(div.view_mut()),
        },
    )
    .unwrap();
    for i in 0..n {
        assert!((div[i] - trace[i]).abs() <= 1e-9 * trace[i].abs().max(1.0));
    }
    let probes = 400;
    let z = steer::model::hutchinson_probes(n, d, probes, Probe::Rademacher, |i| {
        Streams::new(11).rng(Purpose::Probe, 0, i)
    });
    let est = forms(z);
    for i in 0..n {
        let mean = est.column(i).mean().unwrap();
        let off = f[[2, i]] - trace[i]; // J_01 + J_10
        let se = off.abs() / (probes as f64).sqrt();
        assert!(
            (mean - trace[i]).abs() <= 4.0 * se + 1e-4 * trace[i].abs(),
            "row {i}: Hutchinson {mean} vs trace {} (se {se})",
            trace[i]
        );
    }
}

/// G-SMC on the learned model toward a quadratic tilt moves the mode weights from the base
/// law's to the exact tilted law computed on the true mixture. Tolerance: the learned base
/// already misplaces some mode mass (its TV to the true weights, measured here); the tilt
/// can amplify that error by at most the largest weight ratio of tilted to base modes, so
/// the steered TV must stay below that amplified model error plus 4 standard errors of a
/// weighted mode frequency with N = 2000 (√(¼/ESS) per mode).
#[test]
fn gsmc_on_the_learned_model_moves_to_the_tilted_modes() {
    let mix = mixture();
    let reward: Arc<dyn Reward> = Arc::new(Quadratic::new(array![2.0, 1.0], 0.5).unwrap());
    let law = ExactLaw::new(&[(mix.clone(), 1.0)], reward.closed_form()).unwrap();
    let modes = law.mode_mixture().clone();
    let (exact_x, _) = law.sample(200_000, &Streams::new(4242), Purpose::Reference);
    let w_star = mode_weights(&exact_x, None, &modes);

    let g = learned_grid(200);
    let base = run(&learned_target(None), &g, Guidance::Base, 2000, 3);
    let w_base_model = mode_weights(&base.samples, None, &modes);
    let model_tv = steer::metrics::total_variation(w_base_model.view(), mix.weights());

    let t = learned_target(Some(reward));
    let out = run(&t, &g, Guidance::Corrected, 2000, 4);
    let w = out.log_weights.mapv(f64::exp);
    let ess = 1.0 / w.mapv(|v| v * v).sum();
    let w_run = mode_weights(&out.samples, Some(&w), &modes);
    let tv = steer::metrics::total_variation(w_run.view(), w_star.view());
    let base_tv = steer::metrics::total_variation(mix.weights(), w_star.view());
    let amplification = w_star
        .iter()
        .zip(mix.weights())
        .map(|(a, b)| a / b)
        .fold(1.0, f64::max);
    let bound = amplification * model_tv + 4.0 * (0.25 / ess).sqrt() * w_star.len() as f64 / 2.0;
    eprintln!(
        "mode weights: exact {w_star:.3}, G-SMC {w_run:.3} (TV {tv:.4}, bound {bound:.4}), \
         base {:.3} (TV {base_tv:.4}); learned-base TV to the truth {model_tv:.4}, ESS {ess:.0}",
        mix.weights()
    );
    assert!(tv < bound, "TV {tv} ≥ {bound}");
    assert!(
        tv < 0.25 * base_tv,
        "G-SMC did not move toward the tilt: TV {tv} vs base {base_tv}"
    );
}
