//! A learned Doob h-function (MATH.md §7.3) against the exact one (§11.6) on a 1-D mixture
//! tilted by a quadratic reward: its guidance error is small, it steers unweighted sampling
//! far closer to the tilted law than pure guidance, as an URGE proposal it is exact with a
//! high ESS (§7.5), and it round-trips through its files bit for bit.
//!
//! Five networks are trained once per test binary (1500 Adam steps, the default
//! architecture): on 2000 exact base samples with fresh noise every minibatch, the default
//! penalised loss (λ_gp = 10⁻³), plain regression (λ_gp = 0) and the unbiased loss
//! (λ_gp = 0.3); on 500 samples with fixed pairs (MATH.md §7.3 as written), plain regression
//! and the penalised loss with λ_gp = 0.1. Tolerances are stated per assertion with the
//! measured values.

mod common;

use common::*;
use std::sync::{Arc, OnceLock};

use ndarray::{Array1, Array2, array};
use steer::Error;
use steer::doob::{Clip, ExactH, HFunction, HOutput};
use steer::doob_net::{DoobLoss, DoobNetwork, DoobPairs, DoobTrainConfig, FORMAT, train};
use steer::exact::ExactLaw;
use steer::method::{Doob, Guidance, GuidedSampler, Proposal, Twist, Urge};
use steer::model::nn::Architecture;
use steer::model::{Covariance, GaussianMixture, NoiseLevel, ScoreModel};
use steer::reward::{Quadratic, Reward};
use steer::rng::{Purpose, Streams};
use steer::schedule::{GridKind, TimeGrid};
use steer::smc::{self, ResamplePolicy, Run};
use steer::target::Target;

const TAU_MIN: f64 = 1e-3;

/// The base law 0.6 N(−2, 0.4) + 0.4 N(2, 0.6).
fn mixture() -> GaussianMixture {
    GaussianMixture::new(
        array![0.6, 0.4],
        array![[-2.0], [2.0]],
        Covariance::Isotropic(array![0.4, 0.6]),
    )
    .unwrap()
}

/// r = −0.2 (x − 1.5)².
fn reward() -> Quadratic {
    Quadratic::new(array![1.5], 0.4).unwrap()
}

fn problem() -> Target {
    let r: Arc<dyn Reward> = Arc::new(reward());
    target(vec![(mixture(), 1.0)], Some(r))
}

fn exact() -> ExactH {
    ExactH::new(&mixture(), reward().closed_form().unwrap()).unwrap()
}

fn config(lambda_gp: f64) -> DoobTrainConfig {
    let mut cfg = DoobTrainConfig::new(1, vp());
    cfg.lambda_gp = lambda_gp;
    cfg.steps = 1500;
    cfg.eval_every = 500;
    cfg.seed = 3;
    cfg
}

fn trained(lambda_gp: f64, loss: DoobLoss, pairs: DoobPairs) -> Arc<DoobNetwork> {
    let n = match pairs {
        DoobPairs::Fresh => 2000,
        DoobPairs::Fixed => 500,
    };
    let x = mixture().sample(n, &Streams::new(1), Purpose::Other);
    let mut cfg = config(lambda_gp);
    cfg.loss = loss;
    cfg.pairs = pairs;
    let score: Arc<dyn ScoreModel> = Arc::new(mixture());
    let net = train(x.view(), &reward(), Some(score), &cfg, |_| {}).unwrap();
    Arc::new(net)
}

/// The five networks (module documentation), trained side by side on the first call; the
/// unbiased loss uses the exact mixture as the pretrained score.
struct Networks {
    penalised: Arc<DoobNetwork>,
    plain: Arc<DoobNetwork>,
    unbiased: Arc<DoobNetwork>,
    fixed_plain: Arc<DoobNetwork>,
    fixed_penalised: Arc<DoobNetwork>,
}

fn networks() -> &'static Networks {
    static NETS: OnceLock<Networks> = OnceLock::new();
    NETS.get_or_init(|| {
        std::thread::scope(|s| {
            use DoobLoss::{Penalised, Unbiased};
            use DoobPairs::{Fixed, Fresh};
            let plain = s.spawn(|| trained(0.0, Penalised, Fresh));
            let unbiased = s.spawn(|| trained(0.3, Unbiased, Fresh));
            let fixed_plain = s.spawn(|| trained(0.0, Penalised, Fixed));
            let fixed_penalised = s.spawn(|| trained(0.1, Penalised, Fixed));
            let default = DoobTrainConfig::new(1, vp());
            assert_eq!(default.pairs, Fresh);
            Networks {
                penalised: trained(default.lambda_gp, default.loss, Fresh),
                plain: plain.join().unwrap(),
                unbiased: unbiased.join().unwrap(),
                fixed_plain: fixed_plain.join().unwrap(),
                fixed_penalised: fixed_penalised.join().unwrap(),
            }
        })
    })
}

fn penalised() -> Arc<DoobNetwork> {
    networks().penalised.clone()
}

fn evaluate(h: &dyn HFunction, level: &NoiseLevel, x: &Array2<f64>) -> (Array1<f64>, Array2<f64>) {
    let mut log_h = Array1::zeros(x.nrows());
    let mut grad = Array2::zeros(x.dim());
    h.evaluate(
        level,
        x.view(),
        HOutput {
            log_h: Some(log_h.view_mut()),
            grad_log_h: grad.view_mut(),
        },
    )
    .unwrap();
    (log_h, grad)
}

/// The 20 midpoints τ_k of [0, 1].
fn taus() -> Vec<f64> {
    (0..20).map(|k| 0.025 + 0.05 * k as f64).collect()
}

/// `e(τ) = E_{q_τ}|∇log ĥ − ∇log h|²` over 4000 exact samples of the tilted noised law at each
/// τ of [`taus`] (the same samples for every network), and `E_{q_τ}|∇log h|²`.
fn guidance_errors(h: &dyn HFunction) -> (Vec<f64>, Vec<f64>) {
    let exact = exact();
    taus()
        .iter()
        .enumerate()
        .map(|(k, &tau)| {
            let level = NoiseLevel::new(&vp(), tau);
            let x = exact.tilted().at_level(&level).sample(
                4000,
                &Streams::new(100 + k as u64),
                Purpose::Reference,
            );
            let (_, g) = evaluate(h, &level, &x);
            let (_, g_star) = evaluate(&exact, &level, &x);
            let n = x.nrows() as f64;
            (
                (&g - &g_star).mapv(|v| v * v).sum() / n,
                g_star.mapv(|v| v * v).sum() / n,
            )
        })
        .unzip()
}

/// Mean over τ, and the path KL `½ ∫ β(τ) e(τ) dτ` (midpoint rule): the Girsanov divergence
/// between the exact and the learned Doob samplers with V = U.
fn summary(errors: &[f64]) -> (f64, f64) {
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    let kl = taus()
        .iter()
        .zip(errors)
        .map(|(&t, &e)| 0.5 * 0.05 * vp().diffusion_squared(t) * e)
        .sum();
    (mean, kl)
}

/// The learned `∇log ĥ` approaches the exact `∇log h` under the tilted noised law, and what
/// the gradient term does to that error.
///
/// Mean over τ of `E_{q_τ}|∇log h|²` is 0.163. The default network's error is 0.0056
/// (3.4% of it; asserted below 0.01 and 6%), its path KL 0.0094 (asserted below 0.015); the
/// error is largest at low noise (0.032 at τ = 0.025, bounded by 0.05), where `h ≈ e^r` must
/// be resolved sharply.
///
/// The penalised gradient term does not lower the error here: with fresh `(τ, ε)` every
/// minibatch the regression is limited by approximation at low noise, not by variance, and
/// the default λ_gp = 10⁻³ changes the mean error and the path KL by 1.00× and 0.96×
/// (`examples/doob_sweep.rs`, two seeds at 500, 2000 and 8000 samples: 1.00× and
/// 0.96–0.98×; λ_gp = 10⁻² raises the mean error 8–14%, 10⁻¹ about fourfold). Asserted:
/// both ratios within [0.8, 1.2]. The unbiased term (λ_gp = 0.3), which adds no bias, lowers
/// the path KL to 0.80× that of plain regression (0.0077 vs 0.0097; 0.59–0.94× over seven
/// seed/size pairs of the sweep, six of them below 0.8×) by fitting high noise levels
/// better; its mean error here is 5% higher (0.0059; low noise). Asserted: path KL below
/// 0.9× plain.
#[test]
fn learned_guidance_approaches_the_exact_one() {
    let nets = networks();
    let (pen, plain, unbiased) = (&nets.penalised, &nets.plain, &nets.unbiased);
    let (e_pen, scale) = guidance_errors(pen.as_ref());
    let (e_plain, _) = guidance_errors(plain.as_ref());
    let (e_unb, _) = guidance_errors(unbiased.as_ref());
    let (m_pen, kl_pen) = summary(&e_pen);
    let (m_plain, kl_plain) = summary(&e_plain);
    let (m_unb, kl_unb) = summary(&e_unb);
    let m_scale = scale.iter().sum::<f64>() / scale.len() as f64;
    eprintln!(
        "E|∇log h|² mean {m_scale:.4}; penalised: mean {m_pen:.5} (relative {:.4}), KL {kl_pen:.5}, τ = 0.025: {:.4}; plain: mean {m_plain:.5}, KL {kl_plain:.5}; unbiased: mean {m_unb:.5}, KL {kl_unb:.5}",
        m_pen / m_scale,
        e_pen[0]
    );
    eprintln!("per τ (penalised): {e_pen:.4?}");
    eprintln!("per τ (plain):     {e_plain:.4?}");
    eprintln!("per τ (unbiased):  {e_unb:.4?}");
    assert!(m_pen < 0.01, "mean error {m_pen}");
    assert!(m_pen / m_scale < 0.06, "relative error {}", m_pen / m_scale);
    assert!(kl_pen < 0.015, "path KL {kl_pen}");
    assert!(e_pen[0] < 0.05, "error at τ = 0.025: {}", e_pen[0]);
    for (name, ratio) in [("mean", m_pen / m_plain), ("path KL", kl_pen / kl_plain)] {
        assert!(
            (0.8..1.2).contains(&ratio),
            "{name} ratio penalised/plain {ratio}"
        );
    }
    assert!(
        kl_unb < 0.9 * kl_plain,
        "path KL: unbiased {kl_unb} vs plain {kl_plain}"
    );
}

/// The gradient penalty lowers the guidance error against no penalty at the same sample size,
/// in the setting of MATH.md §7.3: fixed pairs (one `(τ_i, ε_i)` per sample), 500 samples.
/// There the network memorises the noise of the targets and `∇log ĥ` oscillates wherever
/// `ĥ` dips, so plain regression is poor; the penalty controls `∇ĥ`.
///
/// Measured (`examples/doob_sweep.rs -- 500 0,0.1 0,1,2 1500 penalised fixed`, three seeds):
/// plain mean error 11–24 (68–147 times `E|∇log h|²`), penalised (λ_gp = 0.1) 2.8–3.4;
/// ratios 0.12–0.25 for the mean error and 0.12–0.23 for the path KL — the 4–6× of MATH.md
/// §7.3 (at 3000 steps and 500 or 2000 samples the sweep measured 4.2× and 6.1×). This test's
/// own samples and seed give 0.30 and 0.28 (plain 11.4, penalised 3.4). Asserted: both ratios
/// below 0.5. With fresh pairs (the default) the same
/// network's error is 10³ times smaller and the penalty does not lower it
/// (`learned_guidance_approaches_the_exact_one`).
#[test]
fn gradient_penalty_lowers_the_error_on_fixed_pairs() {
    let nets = networks();
    let (e_plain, _) = guidance_errors(nets.fixed_plain.as_ref());
    let (e_pen, _) = guidance_errors(nets.fixed_penalised.as_ref());
    let (m_plain, kl_plain) = summary(&e_plain);
    let (m_pen, kl_pen) = summary(&e_pen);
    eprintln!(
        "fixed pairs: plain mean {m_plain:.4}, KL {kl_plain:.4}; penalised (0.1) mean {m_pen:.4}, KL {kl_pen:.4}; ratios {:.3} {:.3}",
        m_pen / m_plain,
        kl_pen / kl_plain
    );
    eprintln!("per τ (fixed, plain):     {e_plain:.4?}");
    eprintln!("per τ (fixed, penalised): {e_pen:.4?}");
    assert!(m_pen < 0.5 * m_plain, "mean: {m_pen} vs {m_plain}");
    assert!(kl_pen < 0.5 * kl_plain, "path KL: {kl_pen} vs {kl_plain}");
}

/// The sampling grid of a learned h-function: uniform VP down to τ_min = 10⁻³, η = 1.
fn learned_grid(steps: usize) -> TimeGrid {
    TimeGrid::new(vp(), GridKind::Uniform, steps, 1.0, TAU_MIN, 1.0).unwrap()
}

/// `(P(x > 0), mean)` of a run's (weighted) samples.
fn stats(run: &Run) -> (f64, f64) {
    (
        expect(run, |x| if x[0] > 0.0 { 1.0 } else { 0.0 }),
        expect(run, |x| x[0]),
    )
}

/// `(P(x > 0), mean)` of the exact tilted law at τ_min, from 10⁶ exact samples (errors
/// ≈ 5e-4 and 2e-3).
fn exact_stats(g: &TimeGrid) -> (f64, f64) {
    let law = problem().exact_terminal_law(g).unwrap();
    let ExactLaw::Mixture { mixture, .. } = &law else {
        panic!("a tilted mixture is a mixture")
    };
    let (x, _) = law.sample(1_000_000, &Streams::new(5), Purpose::Reference);
    let right = x.column(0).iter().filter(|&&v| v > 0.0).count() as f64 / x.nrows() as f64;
    let mean = mixture.weights().dot(&mixture.means().column(0));
    (right, mean)
}

/// Unweighted Doob sampling with the learned ĥ (post-processed by `Clip::learned`, M = 100,
/// N = 10 000, η = 1) against pure guidance on the same grid and noise.
///
/// Exact tilted law: P(x > 0) = 0.8345, mean 1.344. Learned Doob: 0.822 and 1.286 (errors
/// 0.013 and 0.058, including the M = 100 discretisation), asserted within 0.03 and 0.1 (the
/// binomial CLT error of P is 3.8e-3). Pure guidance: 0.654 and 0.748 (errors 0.18 and
/// 0.60), asserted to exceed the Doob errors by 0.1 and 0.4.
#[test]
fn learned_doob_guidance_beats_pure_guidance() {
    let t = problem();
    let g = learned_grid(100);
    let (p_star, m_star) = exact_stats(&g);
    let n = 10_000;
    let mut doob = Doob::new(&t, penalised(), Clip::learned()).unwrap();
    let run = smc::run(
        &mut doob,
        &t,
        &g,
        &settings(n, 7, ResamplePolicy::Never),
        &mut |_| {},
    )
    .unwrap();
    let (p_doob, m_doob) = stats(&run);
    let mut pg = GuidedSampler::new(&t, Guidance::Pure);
    let pg_run = smc::run(
        &mut pg,
        &t,
        &g,
        &settings(n, 7, ResamplePolicy::Never),
        &mut |_| {},
    )
    .unwrap();
    let (p_pg, m_pg) = stats(&pg_run);
    eprintln!(
        "exact P(x>0) {p_star:.4} mean {m_star:.4}; learned Doob {p_doob:.4} {m_doob:.4}; pure guidance {p_pg:.4} {m_pg:.4}"
    );
    let (ep_doob, em_doob) = ((p_doob - p_star).abs(), (m_doob - m_star).abs());
    let (ep_pg, em_pg) = ((p_pg - p_star).abs(), (m_pg - m_star).abs());
    assert!(ep_doob < 0.03, "Doob P(x>0) {p_doob} vs {p_star}");
    assert!(em_doob < 0.1, "Doob mean {m_doob} vs {m_star}");
    assert!(
        ep_pg > ep_doob + 0.1,
        "P(x>0) errors: PG {ep_pg}, Doob {ep_doob}"
    );
    assert!(
        em_pg > em_doob + 0.4,
        "mean errors: PG {em_pg}, Doob {em_doob}"
    );
}

/// Mean ESS/N over the steps of a run (after reweighting, before resampling).
fn mean_ess(run: &Run) -> f64 {
    run.trace.iter().map(|i| i.ess_fraction).sum::<f64>() / run.trace.len() as f64
}

/// URGE with the learned ĥ as Doob proposal and twist (§7.5; M = 100, N = 2000, 6 seeds) is
/// exact for the discretised chain: its weighted mean matches the exact-h URGE reference
/// (6 seeds of N = 20 000 on the same grid, itself exact for the chain) within z = 4
/// combined seed-to-seed errors (measured: 1.312 ± 0.017 vs 1.325 ± 0.005, z = 0.7; the
/// continuous law has 1.344). The learned ĥ leaves little for the weights to do: mean
/// ESS/N 0.977 against 0.890 for URGE with the pure-guidance proposal and the Tweedie twist
/// on the same seeds, i.e. a fifth of the ESS loss; asserted as learned > 0.9 and
/// 1 − ESS/N below half the guided one.
#[test]
fn learned_doob_proposal_is_exact_with_a_high_ess() {
    let t = problem();
    let g = learned_grid(100);
    let h = penalised();
    let seeds = 6;
    let (mut means, mut ess_doob, mut ess_guided) = (vec![], 0.0, 0.0);
    for s in 0..seeds {
        let mut u = Urge::doob(&t, h.clone(), Clip::learned()).unwrap();
        let run = smc::run(
            &mut u,
            &t,
            &g,
            &settings(2000, 20 + s, ESS_HALF),
            &mut |_| {},
        )
        .unwrap();
        means.push(expect(&run, |x| x[0]));
        ess_doob += mean_ess(&run) / seeds as f64;
        assert_eq!(run.evaluations.reward_gradient, 0, "derivative-free");
        let mut guided = Urge::new(&t, Proposal::Guided, Twist::Tweedie).unwrap();
        let run = smc::run(
            &mut guided,
            &t,
            &g,
            &settings(2000, 20 + s, ESS_HALF),
            &mut |_| {},
        )
        .unwrap();
        ess_guided += mean_ess(&run) / seeds as f64;
    }
    let exact_h: Arc<dyn HFunction> = Arc::new(exact());
    let reference: Vec<f64> = (0..seeds)
        .map(|s| {
            let mut u = Urge::doob(&t, exact_h.clone(), Clip::none()).unwrap();
            let run = smc::run(
                &mut u,
                &t,
                &g,
                &settings(20_000, 60 + s, ESS_HALF),
                &mut |_| {},
            )
            .unwrap();
            expect(&run, |x| x[0])
        })
        .collect();
    let (m, se) = over_seeds(&means);
    let (m_ref, se_ref) = over_seeds(&reference);
    eprintln!(
        "learned Doob URGE mean {m:.4} ± {se:.4}, exact-h reference {m_ref:.4} ± {se_ref:.4}; mean ESS/N learned {ess_doob:.3}, guided {ess_guided:.3}"
    );
    let z = (m - m_ref).abs() / (se * se + se_ref * se_ref).sqrt();
    assert!(z < 4.0, "mean {m} ± {se} vs {m_ref} ± {se_ref} (z = {z})");
    assert!(ess_doob > 0.9, "learned Doob mean ESS/N {ess_doob}");
    assert!(
        1.0 - ess_doob < 0.5 * (1.0 - ess_guided),
        "mean ESS/N: learned Doob {ess_doob} vs guided {ess_guided}"
    );
}

/// Save → load gives the same description and bit-identical `log ĥ` and `∇log ĥ`; training
/// is deterministic for a seed (two short runs give bit-identical outputs, with fresh or
/// fixed pairs) and another seed, or the other kind of pairs, gives another network.
#[test]
fn save_load_round_trips_bit_for_bit() {
    let x = mixture().sample(300, &Streams::new(2), Purpose::Other);
    let mut cfg = config(1e-3);
    cfg.steps = 40;
    cfg.eval_every = 20;
    let net = train(x.view(), &reward(), None, &cfg, |_| {}).unwrap();
    let again = train(x.view(), &reward(), None, &cfg, |_| {}).unwrap();
    cfg.pairs = DoobPairs::Fixed;
    let fixed = train(x.view(), &reward(), None, &cfg, |_| {}).unwrap();
    let fixed_again = train(x.view(), &reward(), None, &cfg, |_| {}).unwrap();
    assert_eq!(fixed.spec().pairs, DoobPairs::Fixed);
    cfg.pairs = DoobPairs::Fresh;
    cfg.seed += 1;
    let other = train(x.view(), &reward(), None, &cfg, |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("h.json");
    let weights = net.save(&json).unwrap();
    assert!(weights.ends_with("h.safetensors"));
    let loaded = DoobNetwork::load(&json).unwrap();
    let spec = loaded.spec();
    assert_eq!(spec.format, FORMAT);
    assert_eq!(spec.weights, "h.safetensors");
    assert_eq!(spec.loss, DoobLoss::Penalised);
    assert_eq!(spec.lambda_gp, 1e-3);
    assert_eq!(spec, &{
        let mut s = net.spec().clone();
        s.weights = "h.safetensors".into();
        s
    });
    assert_eq!(spec.architecture, net.spec().architecture);
    assert_eq!(loaded.parameter_count(), net.parameter_count());
    let history = &spec.training.as_ref().unwrap().history;
    assert_eq!(history.len(), 2);
    assert!(
        history
            .iter()
            .all(|p| p.heldout.is_some_and(f64::is_finite))
    );
    let probe = Array2::from_shape_fn((64, 1), |(i, _)| -4.0 + 8.0 * i as f64 / 63.0);
    for tau in [TAU_MIN, 0.05, 0.3, 0.9] {
        let level = NoiseLevel::new(&vp(), tau);
        let a = evaluate(&net, &level, &probe);
        assert_eq!(a, evaluate(&loaded, &level, &probe), "τ = {tau}");
        assert_eq!(a, evaluate(&again, &level, &probe), "τ = {tau}");
        assert_ne!(a.1, evaluate(&other, &level, &probe).1, "τ = {tau}");
        let f = evaluate(&fixed, &level, &probe);
        assert_eq!(f, evaluate(&fixed_again, &level, &probe), "τ = {tau}");
        assert_ne!(a.1, f.1, "τ = {tau}: fixed and fresh pairs trained alike");
        assert!(a.0.iter().chain(a.1.iter()).all(|v| v.is_finite()));
    }
}

/// Errors name what is wrong.
#[test]
fn errors_name_the_problem() {
    let x = mixture().sample(50, &Streams::new(2), Purpose::Other);
    let field = |e: Error| match e {
        Error::Invalid { field, .. } => field,
        other => panic!("expected Invalid, got {other}"),
    };
    let mut cfg = config(0.1);
    cfg.steps = 2;
    cfg.loss = DoobLoss::Unbiased;
    assert_eq!(
        field(train(x.view(), &reward(), None, &cfg, |_| {}).unwrap_err()),
        "score"
    );
    let wide: Arc<dyn ScoreModel> = Arc::new(
        GaussianMixture::new(
            array![1.0],
            array![[0.0, 0.0]],
            Covariance::Isotropic(array![1.0]),
        )
        .unwrap(),
    );
    assert!(matches!(
        train(x.view(), &reward(), Some(wide), &cfg, |_| {}),
        Err(Error::Dimension { .. })
    ));
    let score: Arc<dyn ScoreModel> = Arc::new(mixture());
    assert!(train(x.view(), &reward(), Some(score), &cfg, |_| {}).is_ok());
    let wide_reward = Quadratic::new(array![0.0, 0.0], 1.0).unwrap();
    assert!(matches!(
        train(x.view(), &wide_reward, None, &config(0.0), |_| {}),
        Err(Error::Dimension { .. })
    ));
    for (mutate, name) in [
        (
            Box::new(|c: &mut DoobTrainConfig| c.lambda_gp = -1.0) as Box<dyn Fn(&mut _)>,
            "lambda_gp",
        ),
        (
            Box::new(|c: &mut DoobTrainConfig| c.tau_min = 0.0),
            "tau_min",
        ),
        (
            Box::new(|c: &mut DoobTrainConfig| c.score_levels = 0),
            "score_levels",
        ),
        (Box::new(|c: &mut DoobTrainConfig| c.steps = 0), "steps"),
    ] {
        let mut cfg = config(0.0);
        mutate(&mut cfg);
        assert_eq!(
            field(train(x.view(), &reward(), None, &cfg, |_| {}).unwrap_err()),
            name
        );
    }
    let mut cfg = config(0.0);
    cfg.architecture = Architecture::Unet {
        channels_in: 1,
        height: 2,
        width: 2,
        channels: 8,
        embedding: 4,
    };
    let x4 = Array2::<f64>::zeros((10, 4));
    let r4 = Quadratic::new(Array1::zeros(4), 1.0).unwrap();
    assert!(matches!(
        train(x4.view(), &r4, None, &cfg, |_| {}),
        Err(Error::Unsupported(_))
    ));

    // A learned h-function needs σ > 0; a bad description is a file error.
    let mut cfg = config(0.0);
    cfg.steps = 2;
    let net = train(x.view(), &reward(), None, &cfg, |_| {}).unwrap();
    let mut g = Array2::zeros((1, 1));
    let e = net
        .evaluate(
            &NoiseLevel::data(),
            array![[0.0]].view(),
            HOutput {
                log_h: None,
                grad_log_h: g.view_mut(),
            },
        )
        .unwrap_err();
    assert_eq!(field(e), "schedule.tau_min");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("h.json");
    net.save(&json).unwrap();
    let text = std::fs::read_to_string(&json).unwrap();
    std::fs::write(&json, text.replace(FORMAT, "steer-network")).unwrap();
    assert!(matches!(DoobNetwork::load(&json), Err(Error::File { .. })));
}
