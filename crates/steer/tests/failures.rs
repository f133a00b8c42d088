//! Numerical trouble during a run is an error naming the step: NaN scores, NaN rewards and
//! all-zero weights (`Error::NonFinite` / `Error::Degenerate`), never silently wrong output.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{Array1, ArrayView2, ArrayViewMut1, Axis, Zip};
use steer::Error;
use steer::method::{Guidance, GuidedSampler, Method, StepContext, StepStats};
use steer::model::{NoiseLevel, ScoreModel, ScoreOutput};
use steer::population::Population;
use steer::resample::Scheme;
use steer::reward::{Reward, RewardOutput};
use steer::rng::Streams;
use steer::schedule::{GridKind, Schedule, TimeGrid};
use steer::smc::{self, ParticleSchedule, ResamplePolicy, Run, Settings};
use steer::target::{Expert, Initial, Target, TiltSchedule};
use steer::weights::LogWeights;

const D: usize = 2;
const STEPS: usize = 20;
const N: usize = 64;

/// VP-linear, uniform grid of 20 steps from τ = 1 to τ = 0: τ_k = 1 − k/20.
fn grid() -> TimeGrid {
    let schedule = Schedule::VpLinear {
        beta_min: 0.1,
        beta_max: 20.0,
        horizon: 1.0,
    };
    TimeGrid::new(schedule, GridKind::Uniform, STEPS, 1.0, 0.0, 1.0).unwrap()
}

fn settings(policy: ResamplePolicy) -> Settings {
    Settings {
        particles: ParticleSchedule::Constant(N),
        policy,
        scheme: Scheme::Systematic,
        final_resample: false,
        window: None,
        seed: 11,
    }
}

/// Data `N(0, I)`: the noised score is `−x / (α² + σ²)`. Once the step's left-point forward
/// time `τ_k` drops below `nan_below`, the score of particle `bad_particle` is NaN.
#[derive(Debug)]
struct NanBelow {
    nan_below: f64,
    bad_particle: usize,
}

impl ScoreModel for NanBelow {
    fn dim(&self) -> usize {
        D
    }

    fn evaluate(
        &self,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
        mut out: ScoreOutput<'_>,
    ) -> steer::Result<()> {
        let v = level.alpha * level.alpha + level.sigma * level.sigma;
        Zip::from(&mut out.score)
            .and(&x)
            .for_each(|s, &x| *s = -x / v);
        if level.tau < self.nan_below {
            out.score.row_mut(self.bad_particle).fill(f64::NAN);
        }
        Ok(())
    }

    fn provides_log_density(&self) -> bool {
        false
    }

    fn provides_divergence(&self) -> bool {
        false
    }
}

/// What a [`CallCounted`] reward returns from its `bad_from`-th call on.
#[derive(Clone, Copy, Debug)]
enum Trouble {
    /// `r = −∞` for every particle (every weight becomes zero).
    NegInfValue,
    /// `r = NaN` for particle 0.
    NanValue,
    /// `∇r = NaN` for particle 0.
    NanGradient,
}

/// `r(x) = −½|x|²` until its `bad_from`-th evaluation (0-based), then `trouble`.
///
/// G-SMC with the linear reward schedule evaluates the reward exactly once per step (the value
/// at every step, since `β_{k+1} ≠ β_k`; the gradient from step 1, where `β_k > 0`), and the
/// initial particles of a model without log-density never touch it, so call `k` is step `k`.
#[derive(Debug)]
struct CallCounted {
    bad_from: usize,
    trouble: Trouble,
    calls: AtomicUsize,
}

impl CallCounted {
    fn new(bad_from: usize, trouble: Trouble) -> Self {
        CallCounted {
            bad_from,
            trouble,
            calls: AtomicUsize::new(0),
        }
    }
}

impl Reward for CallCounted {
    fn dim(&self) -> usize {
        D
    }

    fn evaluate(&self, x: ArrayView2<f64>, out: RewardOutput<'_>) -> steer::Result<()> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let bad = call >= self.bad_from;
        if let Some(mut v) = out.value {
            Zip::from(&mut v)
                .and(x.rows())
                .for_each(|v, r| *v = -0.5 * r.dot(&r));
            match self.trouble {
                Trouble::NegInfValue if bad => v.fill(f64::NEG_INFINITY),
                Trouble::NanValue if bad => v[0] = f64::NAN,
                _ => {}
            }
        }
        if let Some(mut g) = out.gradient {
            g.assign(&(-&x));
            if bad && matches!(self.trouble, Trouble::NanGradient) {
                g.row_mut(0).fill(f64::NAN);
            }
        }
        if let Some(mut l) = out.laplacian {
            l.fill(-(D as f64));
        }
        Ok(())
    }
}

fn target(model: impl ScoreModel + 'static, reward: Option<Arc<dyn Reward>>) -> Target {
    Target::new(
        vec![Expert {
            model: Arc::new(model),
            gamma: 1.0,
        }],
        reward,
        TiltSchedule::Linear,
    )
    .unwrap()
}

fn healthy() -> NanBelow {
    NanBelow {
        nan_below: f64::NEG_INFINITY,
        bad_particle: 0,
    }
}

/// Runs `method`, returning the result and how many steps were observed.
fn run(
    method: &mut dyn Method,
    target: &Target,
    policy: ResamplePolicy,
) -> (steer::Result<Run>, usize) {
    let mut observed = 0;
    let result = smc::run(method, target, &grid(), &settings(policy), &mut |info| {
        assert_eq!(info.step, observed, "steps are observed in order");
        observed += 1;
    });
    (result, observed)
}

const ESS: ResamplePolicy = ResamplePolicy::Ess { threshold: 0.5 };

#[test]
fn nan_score_is_an_error_naming_the_step() {
    let nan_below = 0.42;
    let g = grid();
    // The score is evaluated at the left point τ_k of step k.
    let expected = g
        .steps()
        .iter()
        .position(|s| s.tau.0 < nan_below)
        .expect("the grid reaches τ < 0.42");
    assert_eq!(
        expected, 12,
        "τ_k = 1 − k/20 first drops below 0.42 at k = 12"
    );
    for guidance in [Guidance::Base, Guidance::Pure, Guidance::Corrected] {
        let t = target(
            NanBelow {
                nan_below,
                bad_particle: 5,
            },
            None,
        );
        let mut method = GuidedSampler::new(&t, guidance);
        let (result, observed) = run(&mut method, &t, ESS);
        match result {
            Err(Error::NonFinite {
                step,
                what,
                particle,
            }) => {
                assert_eq!(step, expected, "{guidance:?}");
                assert_eq!(what, "score", "{guidance:?}");
                assert_eq!(particle, 5, "{guidance:?}");
            }
            other => panic!("{guidance:?}: expected a non-finite score, got {other:?}"),
        }
        assert_eq!(
            observed, expected,
            "{guidance:?}: steps completed before the error"
        );
        let message = Error::NonFinite {
            step: expected,
            what: "score",
            particle: 5,
        }
        .to_string();
        assert!(message.contains("step 12"), "{message}");
    }
}

#[test]
fn nan_score_from_the_first_step() {
    let t = target(
        NanBelow {
            nan_below: f64::INFINITY,
            bad_particle: N - 1,
        },
        None,
    );
    let mut method = GuidedSampler::new(&t, Guidance::Corrected);
    let (result, observed) = run(&mut method, &t, ESS);
    assert!(
        matches!(
            result,
            Err(Error::NonFinite {
                step: 0,
                what: "score",
                particle
            }) if particle == N - 1
        ),
        "{result:?}"
    );
    assert_eq!(observed, 0);
}

#[test]
fn nan_reward_value_is_an_error_naming_the_step() {
    let t = target(
        healthy(),
        Some(Arc::new(CallCounted::new(7, Trouble::NanValue))),
    );
    let mut method = GuidedSampler::new(&t, Guidance::Corrected);
    let (result, observed) = run(&mut method, &t, ESS);
    assert!(
        matches!(
            result,
            Err(Error::NonFinite {
                step: 7,
                what: "log-weight increment",
                particle: 0
            })
        ),
        "{result:?}"
    );
    assert_eq!(observed, 7);
}

#[test]
fn nan_reward_gradient_is_an_error_naming_the_step() {
    let t = target(
        healthy(),
        Some(Arc::new(CallCounted::new(4, Trouble::NanGradient))),
    );
    let mut method = GuidedSampler::new(&t, Guidance::Corrected);
    let (result, observed) = run(&mut method, &t, ESS);
    assert!(
        matches!(
            result,
            Err(Error::NonFinite {
                step: 4,
                what: "reward gradient",
                particle: 0
            })
        ),
        "{result:?}"
    );
    assert_eq!(observed, 4);
}

#[test]
fn the_counted_reward_is_healthy_before_its_trouble() {
    // Sanity check of the test fixtures: with the trouble after the last step, the run works
    // and the reward is evaluated exactly once per step.
    let reward = Arc::new(CallCounted::new(STEPS, Trouble::NegInfValue));
    let t = target(healthy(), Some(reward.clone()));
    let mut method = GuidedSampler::new(&t, Guidance::Corrected);
    let (result, observed) = run(&mut method, &t, ESS);
    let run = result.expect("healthy run");
    assert_eq!(observed, STEPS);
    assert_eq!(reward.calls.load(Ordering::SeqCst), STEPS);
    assert!(run.samples.iter().all(|v| v.is_finite()));
    assert!(run.log_normalizer.is_finite());
}

/// All-zero weights from a reward that is `−∞` everywhere from step 9 on: the increment
/// `(β_{k+1} − β_k) r` is `−∞` for every particle, which `LogWeights::reweight` documents as
/// [`Error::Degenerate`] at that step.
#[test]
fn reward_of_minus_infinity_everywhere_is_degenerate_at_that_step() {
    let t = target(
        healthy(),
        Some(Arc::new(CallCounted::new(9, Trouble::NegInfValue))),
    );
    let mut method = GuidedSampler::new(&t, Guidance::Corrected);
    let (result, observed) = run(&mut method, &t, ResamplePolicy::Never);
    assert!(
        matches!(result, Err(Error::Degenerate { step: 9 })),
        "{result:?}"
    );
    assert_eq!(observed, 9);
}

/// G-SMC whose increments are overwritten with `−∞` at step `kill` for the particles `which`
/// selects (all of them, or every other one).
struct Killer<'a> {
    inner: GuidedSampler<'a>,
    kill: usize,
    every_other: bool,
    initial_all_zero: bool,
}

impl Method for Killer<'_> {
    fn name(&self) -> &str {
        "killer"
    }

    fn weighted(&self) -> bool {
        true
    }

    fn initialize(
        &mut self,
        target: &Target,
        grid: &TimeGrid,
        n: usize,
        streams: &Streams,
    ) -> steer::Result<Initial> {
        let mut init = self.inner.initialize(target, grid, n, streams)?;
        if self.initial_all_zero {
            init.log_weights = Array1::from_elem(n, f64::NEG_INFINITY);
            init.log_normalizer = None;
        }
        Ok(init)
    }

    fn advance(
        &mut self,
        ctx: &StepContext<'_>,
        population: &mut Population,
        weights: &LogWeights,
        mut increments: ArrayViewMut1<f64>,
    ) -> steer::Result<StepStats> {
        let stats = self
            .inner
            .advance(ctx, population, weights, increments.view_mut())?;
        if ctx.step.index == self.kill {
            for (i, inc) in increments.iter_mut().enumerate() {
                if !self.every_other || i % 2 == 1 {
                    *inc = f64::NEG_INFINITY;
                }
            }
        }
        Ok(stats)
    }
}

#[test]
fn all_zero_weights_are_degenerate_at_that_step() {
    let t = target(healthy(), None);
    for policy in [ResamplePolicy::Never, ESS] {
        let mut method = Killer {
            inner: GuidedSampler::new(&t, Guidance::Corrected),
            kill: 13,
            every_other: false,
            initial_all_zero: false,
        };
        let (result, observed) = run(&mut method, &t, policy);
        assert!(
            matches!(result, Err(Error::Degenerate { step: 13 })),
            "{policy:?}: {result:?}"
        );
        assert_eq!(observed, 13);
        assert_eq!(
            Error::Degenerate { step: 13 }.to_string(),
            "all particle weights are zero at step 13"
        );
    }
}

#[test]
fn all_zero_initial_weights_are_degenerate_at_step_zero() {
    let t = target(healthy(), None);
    let mut method = Killer {
        inner: GuidedSampler::new(&t, Guidance::Corrected),
        kill: usize::MAX,
        every_other: false,
        initial_all_zero: true,
    };
    let (result, observed) = run(&mut method, &t, ESS);
    assert!(
        matches!(result, Err(Error::Degenerate { step: 0 })),
        "{result:?}"
    );
    assert_eq!(observed, 0);
}

#[test]
fn some_zero_weights_are_not_an_error() {
    // Half the particles lose all weight at step 13: the run goes on without them.
    let t = target(healthy(), None);
    let mut method = Killer {
        inner: GuidedSampler::new(&t, Guidance::Corrected),
        kill: 13,
        every_other: true,
        initial_all_zero: false,
    };
    let (result, observed) = run(&mut method, &t, ResamplePolicy::Never);
    let run = result.expect("half the weights zero is fine");
    assert_eq!(observed, STEPS);
    let w = run.log_weights.mapv(f64::exp);
    assert!((w.sum() - 1.0).abs() < 1e-12);
    for (i, &wi) in w.iter().enumerate() {
        if i % 2 == 1 {
            assert_eq!(wi, 0.0, "particle {i} was killed");
        }
    }
    assert!(run.trace[13].ess_fraction <= 0.5 + 1e-12);
    assert!(run.log_normalizer.is_finite());
    assert!(
        run.samples
            .axis_iter(Axis(0))
            .all(|r| r.iter().all(|v| v.is_finite()))
    );
}
