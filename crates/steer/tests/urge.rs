//! URGE (MATH.md §6) against closed forms, including the exact law of the discretised chain
//! (§11.9). Tolerances: z-scores times seed-to-seed standard errors, stated per assertion.

mod common;

use common::*;
use std::sync::Arc;

use ndarray::array;
use steer::method::{Guidance, GuidedSampler, Method, Proposal, Twist, Urge};
use steer::model::NoiseLevel;
use steer::reward::{Linear, Quadratic, Reward};
use steer::rng::{Purpose, Streams};
use steer::schedule::TimeGrid;
use steer::smc::{self, ResamplePolicy, Run};
use steer::target::Target;

fn urge(
    t: &Target,
    g: &TimeGrid,
    proposal: Proposal,
    twist: Twist,
    n: usize,
    seed: u64,
    policy: ResamplePolicy,
) -> Run {
    let mut m = Urge::new(t, proposal, twist).unwrap();
    smc::run(&mut m, t, g, &settings(n, seed, policy), &mut |_| {}).unwrap()
}

/// The reference numbers of MATH.md §11.9 (M = 50): target N(1.4104, 0.1520), log Z = −2.2409.
#[test]
fn discretised_chain_reference_numbers() {
    let g = grid(vp(), 50, 1.0);
    let (m, v, lz) = discretised_chain_target(&g, 0.5, 0.36, 4.0, 2.0);
    assert!(
        (m - 1.4104).abs() < 1e-4 && (v - 0.1520).abs() < 1e-4 && (lz + 2.2409).abs() < 1e-4,
        "{m} {v} {lz}"
    );
}

/// URGE is exact for the discretised chain at any number of steps (MATH.md §11.9, r =
/// −2(x − 2)²): with the base proposal and the Tweedie twist, at M = 10, 20 and 100 its
/// weighted mean matches the tilted chain law within z = 4 seed-to-seed standard errors, and
/// the normaliser estimate is unbiased, E[Ẑ/Z] = 1 within z = 4 standard errors. At M = 10 the
/// particle-wise G-SMC weight misses the same target by more than its own z = 4 bound: its
/// O(Δt) discretisation bias. The guided proposal is exact too; under this strong reward its
/// path weights are heavy-tailed (MATH.md §6.7), so it is checked on a milder tilt (λ = 1).
#[test]
fn urge_is_exact_for_the_discretised_chain() {
    for (lambda, proposal) in [(4.0, Proposal::Base), (1.0, Proposal::Guided)] {
        let p = one_d(array![1.0], vec![0.5], array![0.36]);
        let r: Arc<dyn Reward> = Arc::new(Quadratic::new(array![2.0], lambda).unwrap());
        let t = target(vec![(p, 1.0)], Some(r));
        for steps in [10usize, 20, 100] {
            let g = grid(vp(), steps, 1.0);
            let (mean_star, _, log_z) = discretised_chain_target(&g, 0.5, 0.36, lambda, 2.0);
            let (mut means, mut ratios) = (vec![], vec![]);
            for s in 0..8 {
                let run = urge(
                    &t,
                    &g,
                    proposal,
                    Twist::Tweedie,
                    2000,
                    10 + s,
                    ResamplePolicy::Ess { threshold: 0.5 },
                );
                means.push(expect(&run, |x| x[0]));
                ratios.push((run.log_normalizer - log_z).exp());
            }
            let (m, se) = over_seeds(&means);
            assert!(
                (m - mean_star).abs() < 4.0 * se,
                "{proposal:?} λ = {lambda}, M = {steps}: mean {m} ± {se} vs {mean_star}"
            );
            let (zr, zse) = over_seeds(&ratios);
            assert!(
                (zr - 1.0).abs() < 4.0 * zse,
                "{proposal:?} λ = {lambda}, M = {steps}: E[Ẑ/Z] = {zr} ± {zse}"
            );
            if steps == 10 && proposal == Proposal::Base {
                let g_means: Vec<f64> = (0..8)
                    .map(|s| {
                        let mut m = GuidedSampler::new(&t, Guidance::Corrected);
                        let run = smc::run(
                            &mut m,
                            &t,
                            &g,
                            &settings(2000, 10 + s, ResamplePolicy::Ess { threshold: 0.5 }),
                            &mut |_| {},
                        )
                        .unwrap();
                        expect(&run, |x| x[0])
                    })
                    .collect();
                let (gm, gse) = over_seeds(&g_means);
                assert!(
                    (gm - mean_star).abs() > 4.0 * gse,
                    "G-SMC at M = 10: {gm} ± {gse} vs chain target {mean_star}"
                );
            }
        }
    }
}

/// The untwisted path weights have mean one: E_Q[dP/dQ] = 1. With no twist and no
/// resampling, log Ẑ after step M − 2 is log mean_i e^{log w_i} of the Girsanov weights
/// alone; it is within z = 4 CLT errors of 0, with the error estimated from the ESS
/// (Var w / (E w)² = N/ESS − 1).
#[test]
fn untwisted_path_weights_have_mean_one() {
    let p = one_d(array![0.5, 0.5], vec![-1.0, 1.5], array![0.3, 0.4]);
    let r: Arc<dyn Reward> = Arc::new(Quadratic::new(array![1.0], 0.5).unwrap());
    let t = target(vec![(p, 1.0)], Some(r));
    let g = grid(vp(), 50, 1.0);
    let n = 20_000;
    let run = urge(
        &t,
        &g,
        Proposal::Guided,
        Twist::None,
        n,
        5,
        ResamplePolicy::Never,
    );
    let before_last = &run.trace[run.trace.len() - 2];
    let ess = before_last.ess_fraction * n as f64;
    let z = before_last.log_normalizer.exp();
    let se = z * ((n as f64 / ess - 1.0) / n as f64).sqrt();
    assert!(
        ess < 0.999 * n as f64,
        "the guided proposal must move the weights"
    );
    assert!((z - 1.0).abs() < 4.0 * se, "E[w] = {z} ± {se}");
}

/// Equal proposal and base drifts give path weights of exactly zero: a guided proposal whose
/// guidance vanishes (reward with zero gradient, γ = 1) and no twist leave every weight
/// uniform until the terminal twist, which is the only nonzero increment.
#[test]
fn equal_drifts_give_zero_path_weights() {
    let p = one_d(array![0.5, 0.5], vec![-1.0, 1.0], array![0.3, 0.3]);
    let r: Arc<dyn Reward> = Arc::new(Linear::new(array![0.0]).unwrap());
    let t = target(vec![(p, 1.0)], Some(r));
    let g = grid(vp(), 30, 1.0);
    let run = urge(
        &t,
        &g,
        Proposal::Guided,
        Twist::None,
        500,
        1,
        ResamplePolicy::Never,
    );
    for info in &run.trace[..run.trace.len() - 1] {
        assert!(
            (info.ess_fraction - 1.0).abs() < 1e-12,
            "step {}",
            info.step
        );
        assert!(info.log_normalizer.abs() < 1e-12, "step {}", info.step);
    }
    // No divergence, Laplacian or log-density was evaluated: URGE is derivative-free.
    assert_eq!(run.evaluations.divergence, 0);
    assert_eq!(run.evaluations.reward_laplacian, 0);
    assert_eq!(run.evaluations.log_density, 0);
}

fn mode_and_mean(t: &Target, g: &TimeGrid, twist: Twist, seeds: u64) -> (Vec<f64>, Vec<f64>) {
    let (mut pos, mut mean) = (vec![], vec![]);
    for s in 0..seeds {
        let run = urge(
            t,
            g,
            Proposal::Guided,
            twist,
            2000,
            40 + s,
            ResamplePolicy::Ess { threshold: 0.5 },
        );
        pos.push(expect(&run, |x| if x[0] > 0.0 { 1.0 } else { 0.0 }));
        mean.push(expect(&run, |x| x[0]));
    }
    (pos, mean)
}

fn exact_mode_and_mean(t: &Target, g: &TimeGrid) -> (f64, f64) {
    let law = t.exact_terminal_law(g).unwrap();
    let (x, _) = law.sample(1_000_000, &Streams::new(3), Purpose::Reference);
    let pos = x.column(0).iter().filter(|&&v| v > 0.0).count() as f64 / 1e6;
    (pos, x.column(0).mean().unwrap())
}

/// URGE with the guided proposal on a quadratically tilted two-mode mixture and on a product
/// of two mixtures matches the exact mixture answers (mode weight P(x > 0) and mean) within
/// z = 4 seed-to-seed errors plus the discretisation allowance of 400 steps (the chain law
/// differs from the continuous one by O(Δt); 3e-3 measured on the base chain) and the
/// reference's Monte-Carlo error (10⁶ draws). Three twists give the same answer (they
/// telescope): their pairwise differences are within z = 4 of the combined errors.
#[test]
fn urge_matches_tilted_mixture_and_product_and_twists_telescope() {
    let p = one_d(array![0.6, 0.4], vec![-2.0, 2.0], array![0.4, 0.6]);
    let r: Arc<dyn Reward> = Arc::new(Quadratic::new(array![1.5], 0.4).unwrap());
    let tilt = target(vec![(p, 1.0)], Some(r));
    let g = grid(vp(), 400, 1.0);
    let (pos_star, mean_star) = exact_mode_and_mean(&tilt, &g);
    let mut estimates = vec![];
    for twist in [Twist::Reward, Twist::Tweedie, Twist::None] {
        let (pos, mean) = mode_and_mean(&tilt, &g, twist, 6);
        let (m, se) = over_seeds(&pos);
        assert!(
            (m - pos_star).abs() < 4.0 * se + 3e-3,
            "{twist:?}: P(x>0) {m} ± {se} vs {pos_star}"
        );
        let (mm, mse) = over_seeds(&mean);
        assert!(
            (mm - mean_star).abs() < 4.0 * mse + 1e-2,
            "{twist:?}: mean {mm} ± {mse} vs {mean_star}"
        );
        estimates.push((m, se));
    }
    for a in 0..3 {
        for b in a + 1..3 {
            let (ma, sa) = estimates[a];
            let (mb, sb) = estimates[b];
            assert!(
                (ma - mb).abs() < 4.0 * (sa * sa + sb * sb).sqrt(),
                "twists {a} and {b}: {ma} vs {mb}"
            );
        }
    }
    // A product of two experts: the base chain is expert 0's, ψ_M = p_1 at the last point.
    let a = one_d(array![0.5, 0.5], vec![-1.5, 1.5], array![0.5, 0.5]);
    let b = one_d(array![0.3, 0.7], vec![-1.0, 2.0], array![1.0, 1.0]);
    let product = target(vec![(a, 1.0), (b, 1.0)], None);
    let (pos_star, mean_star) = exact_mode_and_mean(&product, &g);
    let (pos, mean) = mode_and_mean(&product, &g, Twist::PathRatio, 6);
    let (m, se) = over_seeds(&pos);
    assert!(
        (m - pos_star).abs() < 4.0 * se + 3e-3,
        "product: P(x>0) {m} ± {se} vs {pos_star}"
    );
    let (mm, mse) = over_seeds(&mean);
    assert!(
        (mm - mean_star).abs() < 4.0 * mse + 1e-2,
        "product: mean {mm} ± {mse} vs {mean_star}"
    );
}

/// V > 0 is required: URGE on the probability-flow ODE is a clear error, not NaN.
#[test]
fn urge_refuses_the_probability_flow_ode() {
    let p = one_d(array![1.0], vec![0.0], array![1.0]);
    let r: Arc<dyn Reward> = Arc::new(Quadratic::new(array![1.0], 1.0).unwrap());
    let t = target(vec![(p, 1.0)], Some(r));
    let g = grid(vp(), 20, 0.0);
    let mut m = Urge::new(&t, Proposal::Guided, Twist::Reward).unwrap();
    let e = smc::run(
        &mut m,
        &t,
        &g,
        &settings(10, 0, ResamplePolicy::Never),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("schedule.eta"), "{e}");
    let _ = NoiseLevel::data();
    assert_eq!(m.name(), "urge");
}

/// URGE with a DriftLite-controlled proposal (VCG drift on top of guidance): still exact for
/// the tilted mixture (z = 4 seed-to-seed errors plus the allowances of the test above), and
/// its path weights keep more ESS than the guided proposal's on average: the control
/// removes much of the drift mismatch.
#[test]
fn urge_with_a_vcg_proposal_is_exact() {
    use steer::method::{Control, DivergenceEstimator, DriftLiteConfig};
    let p = one_d(array![0.6, 0.4], vec![-2.0, 2.0], array![0.4, 0.6]);
    let r: Arc<dyn Reward> = Arc::new(Quadratic::new(array![1.5], 0.4).unwrap());
    let t = target(vec![(p, 1.0)], Some(r));
    let g = grid(vp(), 400, 1.0);
    let (pos_star, mean_star) = exact_mode_and_mean(&t, &g);
    let vcg = Proposal::Controlled(DriftLiteConfig {
        control: Control::Variance,
        ridge: 1e-8,
        divergence: DivergenceEstimator::Exact,
    });
    let (mut pos, mut mean, mut ess_vcg, mut ess_guided) = (vec![], vec![], 0.0, 0.0);
    for s in 0..6 {
        let run = urge(
            &t,
            &g,
            vcg,
            Twist::Reward,
            2000,
            60 + s,
            ResamplePolicy::Ess { threshold: 0.5 },
        );
        pos.push(expect(&run, |x| if x[0] > 0.0 { 1.0 } else { 0.0 }));
        mean.push(expect(&run, |x| x[0]));
        ess_vcg += run.trace.iter().map(|i| i.ess_fraction).sum::<f64>();
        let guided = urge(
            &t,
            &g,
            Proposal::Guided,
            Twist::Reward,
            2000,
            60 + s,
            ResamplePolicy::Ess { threshold: 0.5 },
        );
        ess_guided += guided.trace.iter().map(|i| i.ess_fraction).sum::<f64>();
        assert!(
            run.trace[100].theta.len() == 3,
            "reward, score and drift controls"
        );
    }
    let (m, se) = over_seeds(&pos);
    assert!(
        (m - pos_star).abs() < 4.0 * se + 3e-3,
        "P(x>0) {m} ± {se} vs {pos_star}"
    );
    let (mm, mse) = over_seeds(&mean);
    assert!(
        (mm - mean_star).abs() < 4.0 * mse + 1e-2,
        "mean {mm} ± {mse} vs {mean_star}"
    );
    assert!(
        ess_vcg > ess_guided,
        "mean ESS: VCG proposal {ess_vcg} vs guided {ess_guided}"
    );
}

/// URGE on an annealed and tilted target (MATH.md §6.1): the base chain of p weighted to
/// p^γ e^{r} with the path-ratio twist log q̃_t − log p_t = (γ − 1) log p_t + β_t r. On the
/// §11.4 two-mode mixture (γ = 2, r = −0.15 (x − 2)²) its P(x > 0) matches the exact 0.574
/// within z = 4 seed-to-seed errors plus the 400-step allowance of 3e-3.
#[test]
fn urge_anneals_with_the_path_ratio_twist() {
    let p = one_d(array![0.7, 0.3], vec![-2.0, 2.5], array![0.3, 0.5]);
    let r: Arc<dyn Reward> = Arc::new(Quadratic::new(array![2.0], 0.3).unwrap());
    let t = target(vec![(p, 2.0)], Some(r));
    let g = grid(vp(), 400, 1.0);
    let values: Vec<f64> = (0..6)
        .map(|s| {
            let run = urge(
                &t,
                &g,
                Proposal::Guided,
                Twist::PathRatio,
                2000,
                90 + s,
                ResamplePolicy::Ess { threshold: 0.5 },
            );
            expect(&run, |x| if x[0] > 0.0 { 1.0 } else { 0.0 })
        })
        .collect();
    let (m, se) = over_seeds(&values);
    assert!((m - 0.574).abs() < 4.0 * se + 3e-3, "P(x>0) = {m} ± {se}");
}
