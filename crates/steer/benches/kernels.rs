//! Criterion benchmarks of the hot paths: the batched mixture score kernel in its three
//! covariance forms, full G-SMC runs, and how a run's cost grows with `N` and `d`.
//!
//! Workload (after MATH.md §11.4): a `d`-dimensional mixture of `K = 10` equally weighted
//! components with means `μ_j = 5 e_j` and unit (or near-identity) covariances, under the VP
//! linear schedule. Run with `cargo bench -p steer --bench kernels`; add `-- --quick` for a
//! fast smoke run or a filter such as `-- score_kernel`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main,
};
use ndarray::{Array1, Array2, Array3, Axis};
use rand_distr::{Distribution, StandardNormal};
use steer::method::{Guidance, GuidedSampler};
use steer::model::{Covariance, GaussianMixture, NoiseLevel, ScoreModel, ScoreOutput};
use steer::resample::Scheme;
use steer::reward::{Quadratic, Reward};
use steer::rng::{Purpose, Streams};
use steer::schedule::{GridKind, Schedule, TimeGrid};
use steer::smc::{self, ParticleSchedule, ResamplePolicy, Settings};
use steer::target::{Expert, Target, TiltSchedule};

/// Mixture components of every benchmark.
const K: usize = 10;
/// Dimension of the score-kernel and full-run benchmarks.
const D: usize = 30;
/// Particles of the score-kernel and full-run benchmarks.
const N: usize = 4096;
/// Steps of a full G-SMC run.
const STEPS: usize = 500;
/// Steps of a scaling run.
const SCALING_STEPS: usize = 100;

/// The covariance form of the benchmark mixture.
#[derive(Clone, Copy, Debug)]
enum Form {
    Isotropic,
    Diagonal,
    Full,
}

impl Form {
    fn name(self) -> &'static str {
        match self {
            Form::Isotropic => "isotropic",
            Form::Diagonal => "diagonal",
            Form::Full => "full",
        }
    }
}

fn vp() -> Schedule {
    Schedule::VpLinear {
        beta_min: 0.1,
        beta_max: 20.0,
        horizon: 1.0,
    }
}

fn grid(steps: usize) -> TimeGrid {
    let schedule = vp();
    TimeGrid::new(
        schedule,
        GridKind::Uniform,
        steps,
        schedule.default_tau_max(),
        0.0,
        1.0,
    )
    .expect("valid grid")
}

/// `K` equal weights, means `μ_j = 5 e_j` (`d ≥ K`), unit covariances in the given form;
/// the full form uses `Σ_j = I + 0.1 A_j A_jᵀ / d` with seeded Gaussian `A_j`.
fn mixture(d: usize, k: usize, form: Form) -> GaussianMixture {
    assert!(d >= k, "means 5 e_j need d ≥ K");
    let weights = Array1::from_elem(k, 1.0 / k as f64);
    let means = Array2::from_shape_fn((k, d), |(j, i)| if i == j { 5.0 } else { 0.0 });
    let covariance = match form {
        Form::Isotropic => Covariance::Isotropic(Array1::ones(k)),
        Form::Diagonal => Covariance::Diagonal(Array2::ones((k, d))),
        Form::Full => {
            let streams = Streams::new(7);
            let mut cov = Array3::zeros((k, d, d));
            for (j, mut c) in cov.axis_iter_mut(Axis(0)).enumerate() {
                let mut rng = streams.rng(Purpose::Other, 0, j);
                let a = Array2::from_shape_simple_fn((d, d), || {
                    <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut rng)
                });
                c.assign(&(a.dot(&a.t()) * (0.1 / d as f64) + Array2::<f64>::eye(d)));
                // Exact symmetry, so validation never trips on rounding.
                let sym = (&c + &c.t()) * 0.5;
                c.assign(&sym);
            }
            Covariance::Full(cov)
        }
    };
    GaussianMixture::new(weights, means, covariance).expect("valid mixture")
}

fn target(mix: GaussianMixture, gamma: f64, reward: Option<Arc<dyn Reward>>) -> Target {
    Target::new(
        vec![Expert {
            model: Arc::new(mix) as Arc<dyn ScoreModel>,
            gamma,
        }],
        reward,
        TiltSchedule::Linear,
    )
    .expect("valid target")
}

fn settings(n: usize) -> Settings {
    Settings {
        particles: ParticleSchedule::Constant(n),
        policy: ResamplePolicy::Ess { threshold: 0.5 },
        scheme: Scheme::Systematic,
        final_resample: false,
        window: None,
        seed: 1,
    }
}

/// Centre of the quadratic tilt: `2.5 (e_0 + e_1)`, midway between the first two modes.
fn tilt_centre() -> Array1<f64> {
    Array1::from_shape_fn(D, |i| if i < 2 { 2.5 } else { 0.0 })
}

/// One full G-SMC run; returns `log Ẑ` so the work cannot be optimised away.
fn gsmc(target: &Target, grid: &TimeGrid, settings: &Settings) -> f64 {
    let mut method = GuidedSampler::new(target, Guidance::Corrected);
    smc::run(&mut method, target, grid, settings, &mut |_| {})
        .expect("run succeeds")
        .log_normalizer
}

/// Settings for groups whose iterations are whole runs (0.1–10 s): the minimum of ten flat
/// samples of one run each after a short warm-up. The measurement target is deliberately
/// below ten runs, so criterion's "unable to complete 10 samples" warning is expected: it
/// keeps the whole suite within a few minutes on a small machine.
fn long_runs(group: &mut BenchmarkGroup<'_, WallTime>, warm_up: Duration) {
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(warm_up);
    group.measurement_time(Duration::from_secs(1));
}

/// One batched score evaluation on `N` particles drawn from the noised mixture at mid-time.
fn score_kernel(c: &mut Criterion) {
    let mut group = c.benchmark_group("score_kernel");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let level = NoiseLevel::new(&vp(), 0.5);
    for form in [Form::Isotropic, Form::Diagonal, Form::Full] {
        let mix = mixture(D, K, form);
        let x = mix
            .at_level(&level)
            .sample(N, &Streams::new(3), Purpose::Reference);
        let mut score = Array2::zeros((N, D));
        let mut log_density = Array1::zeros(N);
        let mut divergence = Array1::zeros(N);
        group.bench_function(BenchmarkId::new("score", form.name()), |b| {
            b.iter(|| {
                mix.evaluate(
                    &level,
                    black_box(x.view()),
                    ScoreOutput {
                        score: score.view_mut(),
                        log_density: None,
                        divergence: None,
                    },
                )
                .expect("evaluation succeeds");
                black_box(&score);
            });
        });
        group.bench_function(BenchmarkId::new("score+logp+div", form.name()), |b| {
            b.iter(|| {
                mix.evaluate(
                    &level,
                    black_box(x.view()),
                    ScoreOutput {
                        score: score.view_mut(),
                        log_density: Some(log_density.view_mut()),
                        divergence: Some(divergence.view_mut()),
                    },
                )
                .expect("evaluation succeeds");
                black_box((&score, &log_density, &divergence));
            });
        });
    }
    group.finish();
}

/// Full G-SMC runs: `N = 4096`, 500 steps, `d = 30`, `K = 10`, ESS-triggered systematic
/// resampling; annealing `γ = 2` (isotropic and full) and a quadratic tilt (isotropic).
fn gsmc_run(c: &mut Criterion) {
    let mut group = c.benchmark_group("gsmc_run");
    group.throughput(Throughput::Elements((N * STEPS) as u64));
    long_runs(&mut group, Duration::from_millis(1));
    let g = grid(STEPS);
    let s = settings(N);
    let tilt: Arc<dyn Reward> = Arc::new(Quadratic::new(tilt_centre(), 0.5).expect("valid reward"));
    let cases = [
        (
            "anneal2/isotropic",
            target(mixture(D, K, Form::Isotropic), 2.0, None),
        ),
        ("anneal2/full", target(mixture(D, K, Form::Full), 2.0, None)),
        (
            "quadratic_tilt/isotropic",
            target(mixture(D, K, Form::Isotropic), 1.0, Some(tilt)),
        ),
    ];
    for (name, t) in &cases {
        group.bench_function(*name, |b| b.iter(|| black_box(gsmc(t, &g, &s))));
    }
    group.finish();
}

/// 100-step G-SMC runs (isotropic, `K = 10`, `γ = 2`) over `N` at `d = 30` and over `d` at
/// `N = 4096`; throughput in particle-steps.
fn scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("scaling");
    long_runs(&mut group, Duration::from_millis(300));
    let g = grid(SCALING_STEPS);
    let t = target(mixture(D, K, Form::Isotropic), 2.0, None);
    for n in [1024, 4096, 16384] {
        let s = settings(n);
        group.throughput(Throughput::Elements((n * SCALING_STEPS) as u64));
        group.bench_with_input(BenchmarkId::new("particles", n), &n, |b, _| {
            b.iter(|| black_box(gsmc(&t, &g, &s)));
        });
    }
    let s = settings(N);
    group.throughput(Throughput::Elements((N * SCALING_STEPS) as u64));
    for d in [10, 30, 100] {
        let t = target(mixture(d, K, Form::Isotropic), 2.0, None);
        group.bench_with_input(BenchmarkId::new("dim", d), &d, |b, _| {
            b.iter(|| black_box(gsmc(&t, &g, &s)));
        });
    }
    group.finish();
}

criterion_group!(benches, score_kernel, gsmc_run, scaling);
criterion_main!(benches);
