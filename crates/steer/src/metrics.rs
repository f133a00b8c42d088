//! Sample-quality metrics (MATH.md §10): distances between a weighted sample set
//! `{x_i, W_i}` and a reference set `{y_j, V_j}`.
//!
//! Every metric has a weighted form, so weighted outputs (VCG/ECG without resampling) are
//! scored without resampling noise. Samples are `N×d` views with one row per sample; weights
//! are normalised probabilities (`Σ W_i = 1`), and `None` means uniform `W_i = 1/N`.
//!
//! The `O(N·M)` kernel sums (MMD, energy distance) and the per-direction work of the sliced
//! Wasserstein distance run in parallel with rayon. Each row (or direction) is summed
//! sequentially and the partial sums are combined in index order, so every result is
//! bit-identical whatever the thread count. No `N×M` matrix is ever formed.

use std::ops::Range;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, CowArray, Ix1, Ix2};
use rand::RngExt;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::rng::{Purpose, Streams};

/// Largest `|Σ W_i − 1|` accepted for normalised weights.
const WEIGHT_SUM_TOLERANCE: f64 = 1e-6;

/// Points per set used by the median heuristic (MATH.md §10).
const MEDIAN_MAX_POINTS: usize = 1000;

/// Directions used by [`compare`] for the sliced Wasserstein distance (MATH.md §10).
const COMPARE_DIRECTIONS: usize = 256;

/// A weighted empirical measure `Σ_i W_i δ_{x_i}` (MATH.md §10).
///
/// `x` is `N×d` with one sample per row; `w` holds the normalised weights `W_i`
/// (`Σ W_i = 1`), or is `None` for uniform weights `W_i = 1/N`.
#[derive(Clone, Copy, Debug)]
pub struct Weighted<'a> {
    /// Samples `x_i`, one per row (`N×d`).
    pub x: ArrayView2<'a, f64>,
    /// Normalised weights `W_i` (length `N`, `Σ W_i = 1`); `None` means `W_i = 1/N`.
    pub w: Option<ArrayView1<'a, f64>>,
}

impl<'a> Weighted<'a> {
    /// The uniform empirical measure `(1/N) Σ_i δ_{x_i}`.
    pub fn uniform(x: ArrayView2<'a, f64>) -> Self {
        Weighted { x, w: None }
    }

    /// The weighted empirical measure `Σ_i W_i δ_{x_i}`.
    ///
    /// Fails with [`Error::Dimension`] if `w.len() != x.nrows()`, and with
    /// [`Error::Invalid`] if a weight is negative or non-finite or if `|Σ W_i − 1| > 1e-6`.
    pub fn new(x: ArrayView2<'a, f64>, w: ArrayView1<'a, f64>) -> Result<Self> {
        validate_weights("w", w, x.nrows())?;
        Ok(Weighted { x, w: Some(w) })
    }

    /// Number of samples `N`.
    pub fn len(&self) -> usize {
        self.x.nrows()
    }

    /// Whether the set holds no sample (`N = 0`).
    pub fn is_empty(&self) -> bool {
        self.x.nrows() == 0
    }

    /// Dimension `d` of each sample.
    pub fn dim(&self) -> usize {
        self.x.ncols()
    }
}

/// The distances between two sample sets reported by [`compare`] (MATH.md §10).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleMetrics {
    /// `sqrt(max(MMD², 0))` with the RBF kernel and the median bandwidth ([`mmd_rbf`]).
    pub mmd: f64,
    /// `SW_2` over 256 random directions ([`sliced_wasserstein`]).
    pub sliced_wasserstein: f64,
    /// `sqrt(max(ED², 0))` ([`energy_distance`]).
    pub energy_distance: f64,
    /// `|m_a − m_b|₂` between the weighted means ([`mean_error`]).
    pub mean_error: f64,
    /// `‖Σ_a − Σ_b‖_F` between the weighted covariances ([`covariance_error`]).
    pub covariance_error: f64,
}

/// All of MMD, `SW_2` (256 directions from `seed`), energy distance, mean error and
/// covariance error between `a` and `b` (MATH.md §10).
///
/// Fails like the individual metrics: [`Error::Dimension`] if the sets differ in dimension,
/// [`Error::Invalid`] if one is empty or has invalid weights. The MMD uses the unbiased
/// U-statistic when both sets are uniform, which needs at least two samples per set.
pub fn compare(a: &Weighted, b: &Weighted, seed: u64) -> Result<SampleMetrics> {
    check_pair(a, b)?;
    let gamma = rbf_gamma(median_bandwidth(a, b))?;
    let (fa, fb) = (Flat::new(a), Flat::new(b));
    check_u_statistic(&fa, &fb)?;
    // MMD and energy distance share one pass over the pairwise distances.
    let [rbf, dist] = kernel_sums(&fa, &fb, &|r2: f64| [(-gamma * r2).exp(), r2.sqrt()]);
    Ok(SampleMetrics {
        mmd: mmd_from_sums(&fa, &fb, rbf),
        sliced_wasserstein: sliced_wasserstein(a, b, COMPARE_DIRECTIONS, seed)?,
        energy_distance: energy_from_sums(&fa, &fb, dist),
        mean_error: mean_error(a, b)?,
        covariance_error: covariance_error(a, b)?,
    })
}

// ---------------------------------------------------------------------------------------
// MMD and energy distance
// ---------------------------------------------------------------------------------------

/// Median heuristic bandwidth: the median of the pooled pairwise distances `|z_k − z_l|`,
/// `k < l` (MATH.md §10).
///
/// The pool holds at most 1000 rows of each set, taken evenly spaced (rows `⌊k·N/1000⌋`,
/// no randomness); self-pairs are excluded, and for an even number of pairs the two middle
/// values are averaged. Weights play no part. Returns NaN when the pool has fewer than two
/// points.
///
/// # Panics
/// If `a` and `b` differ in dimension.
pub fn median_bandwidth(a: &Weighted, b: &Weighted) -> f64 {
    assert_eq!(
        a.dim(),
        b.dim(),
        "median_bandwidth: sets differ in dimension"
    );
    let d = a.dim();
    let mut pool = Vec::new();
    for x in [a.x.view(), b.x.view()] {
        for i in spaced_rows(x.nrows(), MEDIAN_MAX_POINTS) {
            pool.extend(x.row(i).iter().copied());
        }
    }
    let p = a.len().min(MEDIAN_MAX_POINTS) + b.len().min(MEDIAN_MAX_POINTS);
    if p < 2 {
        return f64::NAN;
    }
    let rows: Vec<Vec<f64>> = (0..p)
        .into_par_iter()
        .map(|k| {
            let zk = &pool[k * d..(k + 1) * d];
            (k + 1..p)
                .map(|l| sq_dist(zk, &pool[l * d..(l + 1) * d]).sqrt())
                .collect()
        })
        .collect();
    let mut dist: Vec<f64> = rows.concat();
    median(&mut dist)
}

/// Maximum mean discrepancy with the RBF kernel `k(x,y) = exp(−|x−y|²/(2 bw²))`,
/// returned as `sqrt(max(MMD², 0))` (MATH.md §10).
///
/// `MMD² = Σ_{ii'} W_i W_{i'} k(x_i,x_{i'}) + Σ_{jj'} V_j V_{j'} k(y_j,y_{j'})
/// − 2 Σ_{ij} W_i V_j k(x_i,y_j)` (weighted V-statistic) unless both sets are uniform, in
/// which case the unbiased U-statistic is used: the self-sums drop their diagonal and are
/// divided by `N(N−1)` and `M(M−1)`. `bandwidth = None` uses [`median_bandwidth`].
///
/// Cost `O((N+M)² d)` time in parallel, `O(N+M)` extra memory.
///
/// Fails with [`Error::Dimension`] if the sets differ in dimension, and with
/// [`Error::Invalid`] if one is empty, has invalid weights, if the bandwidth is not a
/// positive finite number (the median heuristic gives 0 when most pooled points coincide),
/// or if the U-statistic is asked of a set with fewer than two samples.
pub fn mmd_rbf(a: &Weighted, b: &Weighted, bandwidth: Option<f64>) -> Result<f64> {
    check_pair(a, b)?;
    let gamma = rbf_gamma(bandwidth.unwrap_or_else(|| median_bandwidth(a, b)))?;
    let (fa, fb) = (Flat::new(a), Flat::new(b));
    check_u_statistic(&fa, &fb)?;
    let [sums] = kernel_sums(&fa, &fb, &|r2| [(-gamma * r2).exp()]);
    Ok(mmd_from_sums(&fa, &fb, sums))
}

/// Energy distance, returned as `sqrt(max(ED², 0))` (MATH.md §10):
/// `ED² = 2 Σ_{ij} W_i V_j |x_i−y_j| − Σ_{ii'} W_i W_{i'} |x_i−x_{i'}| − Σ_{jj'} V_j V_{j'} |y_j−y_{j'}|`
/// (weighted V-statistic, also for uniform sets).
///
/// Cost `O((N+M)² d)` time in parallel, `O(N+M)` extra memory.
///
/// Fails with [`Error::Dimension`] if the sets differ in dimension, and with
/// [`Error::Invalid`] if one is empty or has invalid weights.
pub fn energy_distance(a: &Weighted, b: &Weighted) -> Result<f64> {
    check_pair(a, b)?;
    let (fa, fb) = (Flat::new(a), Flat::new(b));
    let [sums] = kernel_sums(&fa, &fb, &|r2: f64| [r2.sqrt()]);
    Ok(energy_from_sums(&fa, &fb, sums))
}

/// `γ = 1/(2 bw²)` for a positive finite bandwidth.
fn rbf_gamma(bw: f64) -> Result<f64> {
    if bw.is_finite() && bw > 0.0 {
        Ok(0.5 / (bw * bw))
    } else {
        Err(Error::invalid(
            "bandwidth",
            format!("must be positive and finite, got {bw}"),
        ))
    }
}

/// The U-statistic (both sets uniform) divides by `N(N−1)`: it needs `N ≥ 2`.
fn check_u_statistic(a: &Flat, b: &Flat) -> Result<()> {
    if a.w.is_none() && b.w.is_none() {
        for (name, n) in [("a", a.n), ("b", b.n)] {
            if n < 2 {
                return Err(Error::invalid(
                    name,
                    "the unbiased MMD U-statistic needs at least 2 uniform samples per set",
                ));
            }
        }
    }
    Ok(())
}

/// The `O((N+M)² d)` part of one kernel `f`, with unit weights for a uniform set:
/// `aa = Σ_{i≠i'} w_i w_{i'} f_{ii'}`, `bb` likewise, `ab = Σ_{ij} w_i v_j f_{ij}`.
#[derive(Clone, Copy, Debug)]
struct KernelSums {
    aa: f64,
    bb: f64,
    ab: f64,
}

/// [`KernelSums`] of `K` kernels evaluated on the same squared distances (one pass).
fn kernel_sums<const K: usize, F>(a: &Flat, b: &Flat, f: &F) -> [KernelSums; K]
where
    F: Fn(f64) -> [f64; K] + Sync,
{
    let aa = off_diagonal_sum(a, f);
    let bb = off_diagonal_sum(b, f);
    let ab = cross_sum(a, b, f);
    std::array::from_fn(|k| KernelSums {
        aa: aa[k],
        bb: bb[k],
        ab: ab[k],
    })
}

/// `MMD` from the RBF sums (`k(x,x) = 1`): U-statistic if both sets are uniform, else V.
fn mmd_from_sums(a: &Flat, b: &Flat, s: KernelSums) -> f64 {
    let mmd2 = if a.w.is_none() && b.w.is_none() {
        let (n, m) = (a.n as f64, b.n as f64);
        s.aa / (n * (n - 1.0)) + s.bb / (m * (m - 1.0)) - 2.0 * s.ab / (n * m)
    } else {
        let (sa, sb) = (a.uniform_scale(), b.uniform_scale());
        (s.aa + a.sum_sq_weights()) * sa * sa + (s.bb + b.sum_sq_weights()) * sb * sb
            - 2.0 * s.ab * sa * sb
    };
    mmd2.max(0.0).sqrt()
}

/// `ED` from the distance sums (V-statistic; the diagonal `|x_i − x_i| = 0` drops out).
fn energy_from_sums(a: &Flat, b: &Flat, s: KernelSums) -> f64 {
    let (sa, sb) = (a.uniform_scale(), b.uniform_scale());
    let ed2 = 2.0 * s.ab * sa * sb - s.aa * sa * sa - s.bb * sb * sb;
    ed2.max(0.0).sqrt()
}

/// A sample set flattened to contiguous row-major storage (a copy only if the view is not).
struct Flat<'a> {
    x: CowArray<'a, f64, Ix2>,
    w: Option<CowArray<'a, f64, Ix1>>,
    n: usize,
    d: usize,
}

impl<'a> Flat<'a> {
    fn new(set: &'a Weighted) -> Self {
        Flat {
            x: set.x.as_standard_layout(),
            w: set.w.as_ref().map(|w| w.as_standard_layout()),
            n: set.len(),
            d: set.dim(),
        }
    }

    fn x(&self) -> &[f64] {
        self.x.as_slice().expect("standard layout is contiguous")
    }

    fn w(&self) -> Option<&[f64]> {
        self.w
            .as_ref()
            .map(|w| w.as_slice().expect("standard layout is contiguous"))
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.x()[i * self.d..(i + 1) * self.d]
    }

    /// `W_i`, or 1 for a uniform set (the `1/N` is applied once by the caller).
    fn weight(&self, i: usize) -> f64 {
        self.w().map_or(1.0, |w| w[i])
    }

    /// `Σ_i W_i²`, or `N` for a uniform set (unit weights).
    fn sum_sq_weights(&self) -> f64 {
        self.w()
            .map_or(self.n as f64, |w| w.iter().map(|wi| wi * wi).sum())
    }

    /// The factor that turns a sum with unit weights into one with weights `1/N`.
    fn uniform_scale(&self) -> f64 {
        if self.w.is_some() {
            1.0
        } else {
            1.0 / self.n as f64
        }
    }
}

/// `Σ_{i≠i'} w_i w_{i'} f(|x_i − x_{i'}|²) = 2 Σ_i w_i Σ_{i'>i} w_{i'} f(·)`, unit weights for a
/// uniform set. Rows in parallel, each row sequential, rows combined in index order.
fn off_diagonal_sum<const K: usize, F>(s: &Flat, f: &F) -> [f64; K]
where
    F: Fn(f64) -> [f64; K] + Sync,
{
    let rows: Vec<[f64; K]> = (0..s.n)
        .into_par_iter()
        .map(|i| row_sum(s.row(i), s, i + 1..s.n, f))
        .collect();
    let mut sum = [0.0; K];
    for (i, row) in rows.iter().enumerate() {
        let wi = s.weight(i);
        for k in 0..K {
            sum[k] += wi * row[k];
        }
    }
    sum.map(|v| 2.0 * v)
}

/// `Σ_{ij} w_i v_j f(|x_i − y_j|²)`, unit weights for a uniform set. The larger set is the
/// outer (parallel) loop; the choice depends only on the sizes, so it is deterministic.
fn cross_sum<const K: usize, F>(a: &Flat, b: &Flat, f: &F) -> [f64; K]
where
    F: Fn(f64) -> [f64; K] + Sync,
{
    if a.n >= b.n {
        cross_rows(a, b, f)
    } else {
        cross_rows(b, a, f)
    }
}

/// `Σ_i w_i Σ_j v_j f(|x_i − y_j|²)` with rows of `outer` in parallel, combined in order.
fn cross_rows<const K: usize, F>(outer: &Flat, inner: &Flat, f: &F) -> [f64; K]
where
    F: Fn(f64) -> [f64; K] + Sync,
{
    let rows: Vec<[f64; K]> = (0..outer.n)
        .into_par_iter()
        .map(|i| row_sum(outer.row(i), inner, 0..inner.n, f))
        .collect();
    let mut sum = [0.0; K];
    for (i, row) in rows.iter().enumerate() {
        let wi = outer.weight(i);
        for k in 0..K {
            sum[k] += wi * row[k];
        }
    }
    sum
}

/// `Σ_{j ∈ js} v_j f(|x − y_j|²)`, summed sequentially in `j` order; distances are computed
/// four rows at a time so each load of `x` serves four pairs.
#[inline]
fn row_sum<const K: usize, F>(x: &[f64], ys: &Flat, js: Range<usize>, f: &F) -> [f64; K]
where
    F: Fn(f64) -> [f64; K],
{
    let mut sum = [0.0; K];
    let w = ys.w();
    let mut add = |j: usize, r2: f64| {
        let v = f(r2);
        let wj = w.map_or(1.0, |w| w[j]);
        for k in 0..K {
            sum[k] += wj * v[k];
        }
    };
    let mut j = js.start;
    while j + 4 <= js.end {
        let r2 = sq_dist4(x, [ys.row(j), ys.row(j + 1), ys.row(j + 2), ys.row(j + 3)]);
        for (t, r2) in r2.into_iter().enumerate() {
            add(j + t, r2);
        }
        j += 4;
    }
    for j in j..js.end {
        add(j, sq_dist(x, ys.row(j)));
    }
    sum
}

/// `|x − y_r|²` for four rows `y_r` at once (a two-lane accumulator per row).
#[inline]
fn sq_dist4(x: &[f64], y: [&[f64]; 4]) -> [f64; 4] {
    let d = x.len();
    let y = y.map(|r| &r[..d]);
    let even = d / 2 * 2;
    let mut acc = [[0.0; 2]; 4];
    for (k, xp) in x[..even].chunks_exact(2).enumerate() {
        for r in 0..4 {
            let yp = &y[r][2 * k..2 * k + 2];
            for l in 0..2 {
                let t = xp[l] - yp[l];
                acc[r][l] += t * t;
            }
        }
    }
    let mut out = [0.0; 4];
    for r in 0..4 {
        out[r] = acc[r][0] + acc[r][1];
        for k in even..d {
            let t = x[k] - y[r][k];
            out[r] += t * t;
        }
    }
    out
}

/// `|a − b|²` with four independent accumulators (so the loop vectorises).
#[inline]
fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0; 4];
    let (mut ca, mut cb) = (a.chunks_exact(4), b.chunks_exact(4));
    for (p, q) in (&mut ca).zip(&mut cb) {
        for k in 0..4 {
            let t = p[k] - q[k];
            acc[k] += t * t;
        }
    }
    let mut sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (p, q) in ca.remainder().iter().zip(cb.remainder()) {
        let t = p - q;
        sum += t * t;
    }
    sum
}

/// `a · b` with four independent accumulators.
#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0; 4];
    let (mut ca, mut cb) = (a.chunks_exact(4), b.chunks_exact(4));
    for (p, q) in (&mut ca).zip(&mut cb) {
        for k in 0..4 {
            acc[k] += p[k] * q[k];
        }
    }
    let mut sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (p, q) in ca.remainder().iter().zip(cb.remainder()) {
        sum += p * q;
    }
    sum
}

/// Rows `⌊k·n/max⌋`, `k < max`, when `n > max`; all rows otherwise.
fn spaced_rows(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        (0..n).collect()
    } else {
        (0..max).map(|k| k * n / max).collect()
    }
}

/// Median of a non-empty slice (mean of the two middle values for an even length).
fn median(v: &mut [f64]) -> f64 {
    let (k, odd) = (v.len() / 2, v.len() % 2 == 1);
    let (lower, &mut upper, _) = v.select_nth_unstable_by(k, f64::total_cmp);
    if odd {
        upper
    } else {
        let below = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        0.5 * (below + upper)
    }
}

// ---------------------------------------------------------------------------------------
// Wasserstein distances
// ---------------------------------------------------------------------------------------

/// Sliced Wasserstein distance `SW_2 = ((1/L) Σ_l W_2²(θ_lᵀX, θ_lᵀY))^{1/2}` over
/// `L = n_directions` directions uniform on `S^{d−1}` (MATH.md §10).
///
/// Direction `l` is a normalised standard Gaussian vector drawn from
/// `Streams::new(seed).rng(Purpose::Metrics, l, 0)`, so the directions depend on the seed
/// only. Each projected `W_2²` is exact and weighted ([`wasserstein_1d`]). Directions run in
/// parallel and are summed in index order (bit-identical on any thread count).
///
/// Fails with [`Error::Dimension`] if the sets differ in dimension, and with
/// [`Error::Invalid`] if one is empty, has invalid weights, or if `n_directions == 0`.
pub fn sliced_wasserstein(
    a: &Weighted,
    b: &Weighted,
    n_directions: usize,
    seed: u64,
) -> Result<f64> {
    check_pair(a, b)?;
    if n_directions == 0 {
        return Err(Error::invalid("n_directions", "must be at least 1"));
    }
    let (fa, fb) = (Flat::new(a), Flat::new(b));
    let streams = Streams::new(seed);
    let w2: Vec<f64> = (0..n_directions)
        .into_par_iter()
        .map(|l| {
            let theta = direction(&streams, l, fa.d);
            let pa: Vec<f64> = (0..fa.n).map(|i| dot(fa.row(i), &theta)).collect();
            let pb: Vec<f64> = (0..fb.n).map(|j| dot(fb.row(j), &theta)).collect();
            wasserstein_pow(&pa, fa.w(), &pb, fb.w(), 2.0)
        })
        .collect();
    Ok((w2.iter().sum::<f64>() / n_directions as f64).sqrt())
}

/// Direction `θ_l = g/|g|`, `g ~ N(0, I_d)` from the `(Metrics, l, 0)` stream.
fn direction(streams: &Streams, l: usize, d: usize) -> Vec<f64> {
    let mut rng = streams.rng(Purpose::Metrics, l, 0);
    loop {
        let g: Vec<f64> = (0..d).map(|_| rng.sample(StandardNormal)).collect();
        let norm = dot(&g, &g).sqrt();
        if norm > 0.0 {
            return g.into_iter().map(|v| v / norm).collect();
        }
    }
}

/// Exact 1-D Wasserstein distance `W_p = (∫_0^1 |F_X^{-1}(u) − F_Y^{-1}(u)|^p du)^{1/p}`
/// between two weighted empirical measures (MATH.md §10).
///
/// The quantile functions are step functions; the integral is computed exactly by merging
/// their breakpoints (the cumulative weights) after sorting, in `O((n+m) log(n+m))`.
/// `None` weights are uniform; given weights are normalised internally, so they need only
/// be non-negative with a positive sum.
///
/// # Panics
/// If `p < 1` or is not finite, if either set is empty, if a weight slice's length differs
/// from its samples', or if a weight is negative or non-finite or the weights sum to zero.
pub fn wasserstein_1d(x: &[f64], wx: Option<&[f64]>, y: &[f64], wy: Option<&[f64]>, p: f64) -> f64 {
    assert!(p.is_finite() && p >= 1.0, "wasserstein_1d: p = {p} < 1");
    for (name, v, w) in [("x", x, wx), ("y", y, wy)] {
        assert!(!v.is_empty(), "wasserstein_1d: {name} is empty");
        if let Some(w) = w {
            assert_eq!(w.len(), v.len(), "wasserstein_1d: weights of {name}");
            assert!(
                w.iter().all(|&wi| wi.is_finite() && wi >= 0.0),
                "wasserstein_1d: weights of {name} must be finite and non-negative"
            );
            assert!(
                w.iter().sum::<f64>() > 0.0,
                "wasserstein_1d: weights of {name} sum to zero"
            );
        }
    }
    let wpp = wasserstein_pow(x, wx, y, wy, p);
    if p == 1.0 {
        wpp
    } else if p == 2.0 {
        wpp.sqrt()
    } else {
        wpp.powf(1.0 / p)
    }
}

/// `W_p^p` by merging the breakpoints of the two quantile functions (inputs validated).
fn wasserstein_pow(x: &[f64], wx: Option<&[f64]>, y: &[f64], wy: Option<&[f64]>, p: f64) -> f64 {
    let (qx, qy) = (quantile_steps(x, wx), quantile_steps(y, wy));
    let (mut i, mut j) = (0, 0);
    let (mut prev, mut acc) = (0.0, 0.0);
    // Both cumulative sequences end at exactly 1, so both run out together.
    while i < qx.len() && j < qy.len() {
        let ((xv, cx), (yv, cy)) = (qx[i], qy[j]);
        let next = cx.min(cy);
        acc += (next - prev) * abs_pow(xv - yv, p);
        prev = next;
        if cx <= next {
            i += 1;
        }
        if cy <= next {
            j += 1;
        }
    }
    acc
}

/// `|t|^p`, with the common exponents done exactly.
#[inline]
fn abs_pow(t: f64, p: f64) -> f64 {
    if p == 2.0 {
        t * t
    } else if p == 1.0 {
        t.abs()
    } else {
        t.abs().powf(p)
    }
}

/// Sorted values with their cumulative normalised weights `(x_(k), Σ_{k'≤k} W_(k'))`; the last
/// cumulative weight is exactly 1.
fn quantile_steps(x: &[f64], w: Option<&[f64]>) -> Vec<(f64, f64)> {
    let n = x.len();
    let mut steps: Vec<(f64, f64)> = match w {
        None => x.iter().map(|&v| (v, 0.0)).collect(),
        Some(w) => x.iter().copied().zip(w.iter().copied()).collect(),
    };
    steps.sort_unstable_by(|s, t| s.0.total_cmp(&t.0));
    match w {
        None => {
            for (k, s) in steps.iter_mut().enumerate() {
                s.1 = (k + 1) as f64 / n as f64;
            }
        }
        Some(_) => {
            let total: f64 = steps.iter().map(|s| s.1).sum();
            let mut cum = 0.0;
            for s in steps.iter_mut() {
                cum += s.1;
                s.1 = (cum / total).min(1.0);
            }
        }
    }
    if let Some(last) = steps.last_mut() {
        last.1 = 1.0;
    }
    steps
}

// ---------------------------------------------------------------------------------------
// Moments
// ---------------------------------------------------------------------------------------

/// Weighted mean `m = Σ_i W_i x_i` (length `d`; `(1/N) Σ_i x_i` for a uniform set).
///
/// An empty set gives NaN entries.
pub fn weighted_mean(a: &Weighted) -> Array1<f64> {
    let (n, d) = (a.len(), a.dim());
    if n == 0 {
        return Array1::from_elem(d, f64::NAN);
    }
    let mut m = Array1::zeros(d);
    for (i, row) in a.x.outer_iter().enumerate() {
        let wi = a.w.as_ref().map_or(1.0, |w| w[i]);
        m.scaled_add(wi, &row);
    }
    if a.w.is_none() {
        m /= n as f64;
    }
    m
}

/// Weighted covariance `Σ = Σ_i W_i (x_i − m)(x_i − m)ᵀ` (`d×d`), with `m` the
/// [`weighted_mean`].
///
/// This is the covariance of the empirical measure itself: there is no Bessel correction,
/// for weighted and uniform sets alike (`W_i = 1/N`, not `1/(N−1)`), so a uniform set and
/// the same set given explicit weights `1/N` (or duplicated with weights `1/(2N)`) have the
/// same covariance. An empty set gives NaN entries.
pub fn weighted_covariance(a: &Weighted) -> Array2<f64> {
    let (n, d) = (a.len(), a.dim());
    if n == 0 {
        return Array2::from_elem((d, d), f64::NAN);
    }
    let m = weighted_mean(a);
    let mut cov = Array2::<f64>::zeros((d, d));
    let mut c = vec![0.0; d];
    for (i, row) in a.x.outer_iter().enumerate() {
        let wi = a.w.as_ref().map_or(1.0, |w| w[i]);
        for (ck, (&xk, &mk)) in c.iter_mut().zip(row.iter().zip(m.iter())) {
            *ck = xk - mk;
        }
        for p in 0..d {
            let wc = wi * c[p];
            for q in p..d {
                cov[[p, q]] += wc * c[q];
            }
        }
    }
    let scale = if a.w.is_none() { 1.0 / n as f64 } else { 1.0 };
    for p in 0..d {
        for q in p..d {
            let v = cov[[p, q]] * scale;
            cov[[p, q]] = v;
            cov[[q, p]] = v;
        }
    }
    cov
}

/// Mean error `|m_a − m_b|₂` between the [`weighted_mean`]s.
///
/// Fails with [`Error::Dimension`] if the sets differ in dimension, and with
/// [`Error::Invalid`] if one is empty or has invalid weights.
pub fn mean_error(a: &Weighted, b: &Weighted) -> Result<f64> {
    check_pair(a, b)?;
    let diff = weighted_mean(a) - weighted_mean(b);
    Ok(diff.dot(&diff).sqrt())
}

/// Covariance error `‖Σ_a − Σ_b‖_F` (Frobenius norm) between the [`weighted_covariance`]s.
///
/// Fails with [`Error::Dimension`] if the sets differ in dimension, and with
/// [`Error::Invalid`] if one is empty or has invalid weights.
pub fn covariance_error(a: &Weighted, b: &Weighted) -> Result<f64> {
    check_pair(a, b)?;
    let diff = weighted_covariance(a) - weighted_covariance(b);
    Ok(diff.iter().map(|v| v * v).sum::<f64>().sqrt())
}

// ---------------------------------------------------------------------------------------
// Weights and modes
// ---------------------------------------------------------------------------------------

/// Effective sample size `ESS = 1 / Σ_i W_i²` of normalised weights (MATH.md §3.3).
///
/// Computed as `(Σ W_i)² / Σ W_i²`, which is the same for normalised weights and
/// insensitive to their rounding; lies in `[1, N]`. An empty or all-zero vector gives NaN.
pub fn ess(w: ArrayView1<f64>) -> f64 {
    let (s, s2) = w.fold((0.0, 0.0), |(s, s2), &v| (s + v, s2 + v * v));
    s * s / s2
}

/// Mode weights `π̂_j = Σ_i W_i 1[label_i = j]`, `j < num_modes` (MATH.md §10).
///
/// `labels[i]` is the mode sample `i` is assigned to (argmax responsibility); `w = None`
/// means `W_i = 1/N`. An empty label list gives all zeros.
///
/// # Panics
/// If a label is `≥ num_modes` or if `w` has a different length from `labels`.
pub fn mode_weights(labels: &[usize], w: Option<ArrayView1<f64>>, num_modes: usize) -> Array1<f64> {
    let mut pi = Array1::<f64>::zeros(num_modes);
    if let Some(w) = &w {
        assert_eq!(w.len(), labels.len(), "mode_weights: weights vs labels");
    }
    for (i, &label) in labels.iter().enumerate() {
        assert!(
            label < num_modes,
            "mode_weights: label {label} of sample {i} is not below num_modes = {num_modes}"
        );
        pi[label] += w.as_ref().map_or(1.0, |w| w[i]);
    }
    if w.is_none() && !labels.is_empty() {
        pi /= labels.len() as f64;
    }
    pi
}

/// Total variation distance `TV = ½ Σ_j |p_j − q_j|` (MATH.md §10).
///
/// # Panics
/// If `p` and `q` differ in length.
pub fn total_variation(p: ArrayView1<f64>, q: ArrayView1<f64>) -> f64 {
    assert_eq!(p.len(), q.len(), "total_variation: lengths differ");
    0.5 * p
        .iter()
        .zip(q.iter())
        .map(|(a, b)| (a - b).abs())
        .sum::<f64>()
}

/// Pearson statistic `X² = ESS Σ_j (π̂_j − π*_j)² / π*_j` (MATH.md §10), approximately
/// `χ²_{K−1}` under the null; terms with `π*_j = 0` are skipped.
///
/// # Panics
/// If `p_hat` and `p_star` differ in length.
pub fn chi_square_statistic(p_hat: ArrayView1<f64>, p_star: ArrayView1<f64>, ess: f64) -> f64 {
    assert_eq!(
        p_hat.len(),
        p_star.len(),
        "chi_square_statistic: lengths differ"
    );
    let sum: f64 = p_hat
        .iter()
        .zip(p_star.iter())
        .filter(|&(_, &ps)| ps != 0.0)
        .map(|(&ph, &ps)| (ph - ps) * (ph - ps) / ps)
        .sum();
    ess * sum
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// Both sets non-empty, of one positive dimension, with finite samples and valid weights.
fn check_pair(a: &Weighted, b: &Weighted) -> Result<()> {
    check_set("a", a)?;
    check_set("b", b)?;
    if a.dim() != b.dim() {
        return Err(Error::Dimension {
            context: "metrics: columns of b vs a".into(),
            expected: a.dim(),
            found: b.dim(),
        });
    }
    Ok(())
}

/// A non-empty set of positive dimension, with finite samples and valid weights.
fn check_set(name: &str, set: &Weighted) -> Result<()> {
    if set.is_empty() {
        return Err(Error::invalid(name, "empty sample set"));
    }
    if set.dim() == 0 {
        return Err(Error::invalid(name, "samples have zero columns"));
    }
    if let Some(i) = set
        .x
        .outer_iter()
        .position(|row| row.iter().any(|v| !v.is_finite()))
    {
        return Err(Error::invalid(
            format!("{name}.x"),
            format!("row {i} has a non-finite entry"),
        ));
    }
    if let Some(w) = set.w {
        validate_weights(&format!("{name}.w"), w, set.len())?;
    }
    Ok(())
}

/// `w` has length `n`, finite non-negative entries and `|Σ w − 1| ≤ 1e-6`.
fn validate_weights(field: &str, w: ArrayView1<f64>, n: usize) -> Result<()> {
    if w.len() != n {
        return Err(Error::Dimension {
            context: format!("`{field}`: weights vs sample rows"),
            expected: n,
            found: w.len(),
        });
    }
    if let Some((i, v)) = w
        .iter()
        .enumerate()
        .find(|&(_, v)| !(v.is_finite() && *v >= 0.0))
    {
        return Err(Error::invalid(
            field,
            format!("weight {i} is {v}; weights must be finite and non-negative"),
        ));
    }
    let sum = w.sum();
    if (sum - 1.0).abs() > WEIGHT_SUM_TOLERANCE {
        return Err(Error::invalid(
            field,
            format!("weights sum to {sum}, not 1; pass normalised weights"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use ndarray::{Array, Axis, array, concatenate};
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn normal_matrix(n: usize, d: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array::from_shape_fn((n, d), |_| rng.sample(StandardNormal))
    }

    fn random_weights(n: usize, seed: u64) -> Array1<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = Array1::from_shape_fn(n, |_| rng.random::<f64>() + 0.05);
        let s = w.sum();
        w / s
    }

    fn uniform_weights(n: usize) -> Array1<f64> {
        Array1::from_elem(n, 1.0 / n as f64)
    }

    fn assert_all_close<D: ndarray::Dimension>(
        got: ndarray::ArrayView<f64, D>,
        want: ndarray::ArrayView<f64, D>,
        tol: f64,
    ) {
        assert_eq!(got.shape(), want.shape());
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() <= tol, "got {got}, want {want}");
        }
    }

    // ---- naive references -----------------------------------------------------------

    fn naive_dist(a: ArrayView1<f64>, b: ArrayView1<f64>) -> f64 {
        a.iter()
            .zip(b.iter())
            .map(|(p, q)| (p - q) * (p - q))
            .sum::<f64>()
            .sqrt()
    }

    /// Σ_{ij} w_i v_j f(|x_i - y_j|) over all pairs (diagonal included when `diag`).
    fn naive_double(
        x: &Array2<f64>,
        wx: &Array1<f64>,
        y: &Array2<f64>,
        wy: &Array1<f64>,
        f: impl Fn(f64) -> f64,
        skip_diag: bool,
    ) -> f64 {
        let mut s = 0.0;
        for i in 0..x.nrows() {
            for j in 0..y.nrows() {
                if skip_diag && i == j {
                    continue;
                }
                s += wx[i] * wy[j] * f(naive_dist(x.row(i), y.row(j)));
            }
        }
        s
    }

    fn naive_mmd_v(
        x: &Array2<f64>,
        wx: &Array1<f64>,
        y: &Array2<f64>,
        wy: &Array1<f64>,
        bw: f64,
    ) -> f64 {
        let k = |r: f64| (-r * r / (2.0 * bw * bw)).exp();
        let m2 = naive_double(x, wx, x, wx, k, false) + naive_double(y, wy, y, wy, k, false)
            - 2.0 * naive_double(x, wx, y, wy, k, false);
        m2.max(0.0).sqrt()
    }

    fn naive_mmd_u(x: &Array2<f64>, y: &Array2<f64>, bw: f64) -> f64 {
        let k = |r: f64| (-r * r / (2.0 * bw * bw)).exp();
        let (n, m) = (x.nrows() as f64, y.nrows() as f64);
        let ones = |k: usize| Array1::ones(k);
        let (ox, oy) = (ones(x.nrows()), ones(y.nrows()));
        let m2 = naive_double(x, &ox, x, &ox, k, true) / (n * (n - 1.0))
            + naive_double(y, &oy, y, &oy, k, true) / (m * (m - 1.0))
            - 2.0 * naive_double(x, &ox, y, &oy, k, false) / (n * m);
        m2.max(0.0).sqrt()
    }

    fn naive_energy(x: &Array2<f64>, wx: &Array1<f64>, y: &Array2<f64>, wy: &Array1<f64>) -> f64 {
        let id = |r: f64| r;
        let e2 = 2.0 * naive_double(x, wx, y, wy, id, false)
            - naive_double(x, wx, x, wx, id, false)
            - naive_double(y, wy, y, wy, id, false);
        e2.max(0.0).sqrt()
    }

    fn naive_median(points: &[ArrayView1<f64>]) -> f64 {
        let mut d = Vec::new();
        for k in 0..points.len() {
            for l in k + 1..points.len() {
                d.push(naive_dist(points[k], points[l]));
            }
        }
        d.sort_by(f64::total_cmp);
        let h = d.len() / 2;
        if d.len() % 2 == 1 {
            d[h]
        } else {
            0.5 * (d[h - 1] + d[h])
        }
    }

    /// W_1 = ∫ |F_X(t) − F_Y(t)| dt from the CDFs (independent of the quantile merge).
    fn w1_cdf_reference(x: &[f64], wx: &[f64], y: &[f64], wy: &[f64]) -> f64 {
        let (sx, sy): (f64, f64) = (wx.iter().sum(), wy.iter().sum());
        let cdf = |v: &[f64], w: &[f64], s: f64, t: f64| {
            v.iter()
                .zip(w)
                .filter(|&(&vi, _)| vi <= t)
                .map(|(_, wi)| wi)
                .sum::<f64>()
                / s
        };
        let mut pts: Vec<f64> = x.iter().chain(y).copied().collect();
        pts.sort_by(f64::total_cmp);
        pts.windows(2)
            .map(|p| (cdf(x, wx, sx, p[0]) - cdf(y, wy, sy, p[0])).abs() * (p[1] - p[0]))
            .sum()
    }

    // ---- 1-D Wasserstein --------------------------------------------------------------

    #[test]
    fn wasserstein_1d_two_point_masses() {
        for p in [1.0, 2.0, 3.5] {
            assert_relative_eq!(
                wasserstein_1d(&[-1.25], None, &[2.0], None, p),
                3.25,
                epsilon = 1e-14
            );
        }
    }

    #[test]
    fn wasserstein_1d_shift_is_the_shift() {
        let x: Vec<f64> = normal_matrix(57, 1, 1).iter().copied().collect();
        let mut y: Vec<f64> = x.iter().map(|v| v - 0.7).collect();
        y.reverse();
        for p in [1.0, 2.0, 3.0] {
            assert_relative_eq!(wasserstein_1d(&x, None, &y, None, p), 0.7, epsilon = 1e-12);
        }
        let w = random_weights(57, 2).to_vec();
        let mut wy = w.clone();
        wy.reverse();
        for p in [1.0, 2.0] {
            assert_relative_eq!(
                wasserstein_1d(&x, Some(&w), &y, Some(&wy), p),
                0.7,
                epsilon = 1e-12
            );
        }
    }

    #[test]
    fn wasserstein_1d_weighted_by_hand() {
        // F_X^{-1}: 0 on (0,.25], 1 on (.25,1]; F_Y^{-1}: 0 on (0,.5], 1 on (.5,1].
        let (x, wx, y, wy) = ([1.0, 0.0], [0.75, 0.25], [0.0, 1.0], [0.5, 0.5]);
        assert_relative_eq!(
            wasserstein_1d(&x, Some(&wx), &y, Some(&wy), 1.0),
            0.25,
            epsilon = 1e-15
        );
        assert_relative_eq!(
            wasserstein_1d(&x, Some(&wx), &y, Some(&wy), 2.0),
            0.5,
            epsilon = 1e-15
        );
        // X: 0 on (0,.5], 2 on (.5,.75], 3 on (.75,1]; Y: 1 on (0,.75], 5 on (.75,1].
        // W_1 = .5·1 + .25·1 + .25·2 = 1.25;  W_2² = .5 + .25 + .25·4 = 1.75.
        let (x, wx, y, wy) = ([3.0, 0.0, 2.0], [0.25, 0.5, 0.25], [5.0, 1.0], [0.25, 0.75]);
        assert_relative_eq!(
            wasserstein_1d(&x, Some(&wx), &y, Some(&wy), 1.0),
            1.25,
            epsilon = 1e-15
        );
        assert_relative_eq!(
            wasserstein_1d(&x, Some(&wx), &y, Some(&wy), 2.0),
            1.75f64.sqrt(),
            epsilon = 1e-15
        );
        // Unnormalised weights are normalised internally.
        let wx3 = wx.map(|v| 3.0 * v);
        assert_relative_eq!(
            wasserstein_1d(&x, Some(&wx3), &y, Some(&wy), 1.0),
            1.25,
            epsilon = 1e-14
        );
    }

    #[test]
    fn wasserstein_1d_equal_sizes_is_sorted_difference() {
        let mut x: Vec<f64> = normal_matrix(40, 1, 3).iter().copied().collect();
        let mut y: Vec<f64> = normal_matrix(40, 1, 4)
            .iter()
            .map(|v| 2.0 * v + 0.3)
            .collect();
        let (wd_1, wd_2, wd_3) = (
            wasserstein_1d(&x, None, &y, None, 1.0),
            wasserstein_1d(&x, None, &y, None, 2.0),
            wasserstein_1d(&x, None, &y, None, 3.0),
        );
        x.sort_by(f64::total_cmp);
        y.sort_by(f64::total_cmp);
        let reference = |p: f64| {
            (x.iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs().powf(p))
                .sum::<f64>()
                / 40.0)
                .powf(1.0 / p)
        };
        assert_relative_eq!(wd_1, reference(1.0), max_relative = 1e-12);
        assert_relative_eq!(wd_2, reference(2.0), max_relative = 1e-12);
        assert_relative_eq!(wd_3, reference(3.0), max_relative = 1e-12);
    }

    #[test]
    fn wasserstein_1d_unequal_sizes_match_replication_and_cdf() {
        // n = 6, m = 4: replicating x twice and y three times gives equal sizes 12... via lcm.
        let x: Vec<f64> = normal_matrix(6, 1, 5).iter().copied().collect();
        let y: Vec<f64> = normal_matrix(4, 1, 6).iter().map(|v| v + 1.0).collect();
        let mut xr: Vec<f64> = x.iter().flat_map(|&v| [v, v]).collect();
        let mut yr: Vec<f64> = y.iter().flat_map(|&v| [v, v, v]).collect();
        xr.sort_by(f64::total_cmp);
        yr.sort_by(f64::total_cmp);
        let w2_ref = (xr
            .iter()
            .zip(&yr)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            / 12.0)
            .sqrt();
        assert_relative_eq!(
            wasserstein_1d(&x, None, &y, None, 2.0),
            w2_ref,
            max_relative = 1e-12
        );
        // Weighted W_1 against ∫|F_X − F_Y|.
        let x: Vec<f64> = normal_matrix(23, 1, 7).iter().copied().collect();
        let y: Vec<f64> = normal_matrix(31, 1, 8).iter().map(|v| 0.5 * v).collect();
        let (wx, wy) = (
            random_weights(23, 9).to_vec(),
            random_weights(31, 10).to_vec(),
        );
        assert_relative_eq!(
            wasserstein_1d(&x, Some(&wx), &y, Some(&wy), 1.0),
            w1_cdf_reference(&x, &wx, &y, &wy),
            max_relative = 1e-12
        );
        let ux = vec![1.0; 23];
        assert_relative_eq!(
            wasserstein_1d(&x, None, &y, Some(&wy), 1.0),
            w1_cdf_reference(&x, &ux, &y, &wy),
            max_relative = 1e-12
        );
    }

    // ---- sliced Wasserstein -------------------------------------------------------------

    #[test]
    fn sliced_wasserstein_of_a_set_with_itself_is_zero() {
        let x = normal_matrix(50, 4, 11);
        let w = random_weights(50, 12);
        let a = Weighted::new(x.view(), w.view()).unwrap();
        assert_eq!(sliced_wasserstein(&a, &a, 64, 1).unwrap(), 0.0);
        let u = Weighted::uniform(x.view());
        assert_eq!(sliced_wasserstein(&u, &u, 64, 1).unwrap(), 0.0);
    }

    #[test]
    fn sliced_wasserstein_in_one_dimension_is_w2() {
        let x = normal_matrix(30, 1, 13);
        let y = normal_matrix(17, 1, 14) * 1.5 + 0.4;
        let wx = random_weights(30, 15);
        let (a, b) = (
            Weighted::new(x.view(), wx.view()).unwrap(),
            Weighted::uniform(y.view()),
        );
        let w2 = wasserstein_1d(
            x.as_slice().unwrap(),
            Some(wx.as_slice().unwrap()),
            y.as_slice().unwrap(),
            None,
            2.0,
        );
        assert_relative_eq!(
            sliced_wasserstein(&a, &b, 8, 3).unwrap(),
            w2,
            max_relative = 1e-12
        );
    }

    #[test]
    fn sliced_wasserstein_of_a_shift() {
        // Each projection of a shifted copy is shifted by θ·v, so SW² = (1/L) Σ_l (θ_l·v)²
        // exactly; over uniform θ, (θ·v)²/|v|² ~ Beta(1/2, (d−1)/2), mean 1/d, variance
        // 2(d−1)/(d²(d+2)).
        let (n, d, l) = (40, 5, 1024);
        let v = array![0.3, -1.2, 0.5, 2.0, -0.1];
        let x = normal_matrix(n, d, 16);
        let y = &x + &v;
        let w = random_weights(n, 17);
        let (a, b) = (
            Weighted::new(x.view(), w.view()).unwrap(),
            Weighted::new(y.view(), w.view()).unwrap(),
        );
        let sw = sliced_wasserstein(&a, &b, l, 99).unwrap();
        let streams = Streams::new(99);
        let exact = (0..l)
            .map(|k| dot(&direction(&streams, k, d), v.as_slice().unwrap()).powi(2))
            .sum::<f64>()
            / l as f64;
        assert_relative_eq!(sw * sw, exact, max_relative = 1e-10);
        // Monte-Carlo over directions: z = 4 standard errors of the mean of L draws.
        let v2 = v.dot(&v);
        let df = d as f64;
        let sd = v2 * (2.0 * (df - 1.0) / (df * df * (df + 2.0))).sqrt();
        let tol = 4.0 * sd / (l as f64).sqrt();
        assert!(
            (sw * sw - v2 / df).abs() < tol,
            "SW² = {}, expected {} ± {tol}",
            sw * sw,
            v2 / df
        );
        // Uniform sets too.
        let (ua, ub) = (Weighted::uniform(x.view()), Weighted::uniform(y.view()));
        let su = sliced_wasserstein(&ua, &ub, l, 99).unwrap();
        assert_relative_eq!(su * su, exact, max_relative = 1e-10);
    }

    #[test]
    fn directions_are_unit_vectors() {
        let s = Streams::new(5);
        for l in 0..20 {
            let t = direction(&s, l, 7);
            assert_relative_eq!(dot(&t, &t), 1.0, epsilon = 1e-14);
        }
        assert_ne!(direction(&s, 0, 7), direction(&s, 1, 7));
    }

    // ---- MMD and energy distance ------------------------------------------------------

    #[test]
    fn median_bandwidth_matches_naive() {
        let x = normal_matrix(13, 3, 20);
        let y = normal_matrix(8, 3, 21) + 1.0;
        let (a, b) = (Weighted::uniform(x.view()), Weighted::uniform(y.view()));
        let pts: Vec<_> = x.outer_iter().chain(y.outer_iter()).collect();
        assert_relative_eq!(
            median_bandwidth(&a, &b),
            naive_median(&pts),
            max_relative = 1e-14
        );
        // Odd number of pairs: 13 + 9 = 22 points, 231 pairs.
        let y = normal_matrix(9, 3, 22);
        let b = Weighted::uniform(y.view());
        let pts: Vec<_> = x.outer_iter().chain(y.outer_iter()).collect();
        assert_relative_eq!(
            median_bandwidth(&a, &b),
            naive_median(&pts),
            max_relative = 1e-14
        );
    }

    #[test]
    fn median_bandwidth_subsamples_evenly_spaced_rows() {
        let x = normal_matrix(1500, 2, 23);
        let y = normal_matrix(20, 2, 24);
        let (a, b) = (Weighted::uniform(x.view()), Weighted::uniform(y.view()));
        let pts: Vec<_> = (0..1000)
            .map(|k| x.row(k * 1500 / 1000))
            .chain(y.outer_iter())
            .collect();
        assert_relative_eq!(
            median_bandwidth(&a, &b),
            naive_median(&pts),
            max_relative = 1e-14
        );
    }

    #[test]
    fn mmd_matches_naive_double_loop() {
        let (x, y) = (
            normal_matrix(30, 3, 30),
            normal_matrix(25, 3, 31) * 1.3 + 0.2,
        );
        let (wx, wy) = (random_weights(30, 32), random_weights(25, 33));
        let bw = 1.7;
        let (a_w, b_w) = (
            Weighted::new(x.view(), wx.view()).unwrap(),
            Weighted::new(y.view(), wy.view()).unwrap(),
        );
        let (a_u, b_u) = (Weighted::uniform(x.view()), Weighted::uniform(y.view()));
        // Both weighted: V-statistic.
        assert_relative_eq!(
            mmd_rbf(&a_w, &b_w, Some(bw)).unwrap(),
            naive_mmd_v(&x, &wx, &y, &wy, bw),
            max_relative = 1e-10
        );
        // One weighted, one uniform: V-statistic with W = 1/M.
        assert_relative_eq!(
            mmd_rbf(&a_w, &b_u, Some(bw)).unwrap(),
            naive_mmd_v(&x, &wx, &y, &uniform_weights(25), bw),
            max_relative = 1e-10
        );
        assert_relative_eq!(
            mmd_rbf(&b_u, &a_w, Some(bw)).unwrap(),
            naive_mmd_v(&x, &wx, &y, &uniform_weights(25), bw),
            max_relative = 1e-10
        );
        // Both uniform: U-statistic, which differs from the V-statistic.
        let u = mmd_rbf(&a_u, &b_u, Some(bw)).unwrap();
        assert_relative_eq!(u, naive_mmd_u(&x, &y, bw), max_relative = 1e-10);
        let v = naive_mmd_v(&x, &uniform_weights(30), &y, &uniform_weights(25), bw);
        assert!((u - v).abs() > 1e-4, "U ({u}) and V ({v}) should differ");
        // Median bandwidth by default.
        let pts: Vec<_> = x.outer_iter().chain(y.outer_iter()).collect();
        assert_relative_eq!(
            mmd_rbf(&a_w, &b_w, None).unwrap(),
            naive_mmd_v(&x, &wx, &y, &wy, naive_median(&pts)),
            max_relative = 1e-10
        );
    }

    #[test]
    fn mmd_of_a_set_with_itself_is_near_zero() {
        let x = normal_matrix(100, 4, 34);
        let a = Weighted::uniform(x.view());
        // U-statistic: MMD² = 2S/(n²(n−1)) − 2/n ≤ 0 with S = Σ_{i≠j} k ≤ n(n−1), clipped to 0.
        assert!(mmd_rbf(&a, &a, None).unwrap() < 1e-6);
        let w = random_weights(100, 35);
        let aw = Weighted::new(x.view(), w.view()).unwrap();
        assert!(mmd_rbf(&aw, &aw, None).unwrap() < 1e-6);
        assert!(energy_distance(&aw, &aw).unwrap() < 1e-6);
        assert!(energy_distance(&a, &a).unwrap() < 1e-6);
    }

    #[test]
    fn duplicated_samples_with_half_weight_give_the_uniform_v_statistic() {
        let (x, y) = (normal_matrix(20, 2, 36), normal_matrix(15, 2, 37) + 0.5);
        let xx = concatenate(Axis(0), &[x.view(), x.view()]).unwrap();
        let half = Array1::from_elem(40, 1.0 / 40.0);
        let dup = Weighted::new(xx.view(), half.view()).unwrap();
        let ux = uniform_weights(20);
        let explicit = Weighted::new(x.view(), ux.view()).unwrap();
        let b = Weighted::uniform(y.view());
        let bw = 1.1;
        let reference = naive_mmd_v(&x, &ux, &y, &uniform_weights(15), bw);
        assert_relative_eq!(
            mmd_rbf(&dup, &b, Some(bw)).unwrap(),
            reference,
            max_relative = 1e-10
        );
        assert_relative_eq!(
            mmd_rbf(&explicit, &b, Some(bw)).unwrap(),
            reference,
            max_relative = 1e-10
        );
        assert_relative_eq!(
            energy_distance(&dup, &b).unwrap(),
            energy_distance(&Weighted::uniform(x.view()), &b).unwrap(),
            max_relative = 1e-10
        );
        assert_relative_eq!(
            sliced_wasserstein(&dup, &b, 32, 4).unwrap(),
            sliced_wasserstein(&Weighted::uniform(x.view()), &b, 32, 4).unwrap(),
            max_relative = 1e-10
        );
    }

    #[test]
    fn energy_distance_matches_naive_and_closed_form() {
        let (x, y) = (
            normal_matrix(30, 3, 40),
            normal_matrix(25, 3, 41) * 0.8 - 0.3,
        );
        let (wx, wy) = (random_weights(30, 42), random_weights(25, 43));
        let (a_w, b_w) = (
            Weighted::new(x.view(), wx.view()).unwrap(),
            Weighted::new(y.view(), wy.view()).unwrap(),
        );
        let (a_u, b_u) = (Weighted::uniform(x.view()), Weighted::uniform(y.view()));
        assert_relative_eq!(
            energy_distance(&a_w, &b_w).unwrap(),
            naive_energy(&x, &wx, &y, &wy),
            max_relative = 1e-10
        );
        assert_relative_eq!(
            energy_distance(&a_u, &b_u).unwrap(),
            naive_energy(&x, &uniform_weights(30), &y, &uniform_weights(25)),
            max_relative = 1e-10
        );
        assert_relative_eq!(
            energy_distance(&a_u, &b_w).unwrap(),
            naive_energy(&x, &uniform_weights(30), &y, &wy),
            max_relative = 1e-10
        );
        // Two point masses at distance c: ED² = 2c.
        let (p, q) = (array![[0.0, 0.0]], array![[3.0, 4.0]]);
        let ed = energy_distance(&Weighted::uniform(p.view()), &Weighted::uniform(q.view()));
        assert_relative_eq!(ed.unwrap(), 10f64.sqrt(), max_relative = 1e-14);
    }

    #[test]
    fn non_contiguous_views_give_the_same_answer() {
        let x = normal_matrix(3, 25, 44); // transposed: 25 samples in d = 3
        let xt = x.t();
        let owned = xt.to_owned();
        let y = normal_matrix(12, 3, 45);
        let (a1, a2, b) = (
            Weighted::uniform(xt),
            Weighted::uniform(owned.view()),
            Weighted::uniform(y.view()),
        );
        assert_eq!(
            mmd_rbf(&a1, &b, None).unwrap(),
            mmd_rbf(&a2, &b, None).unwrap()
        );
        assert_eq!(
            energy_distance(&a1, &b).unwrap(),
            energy_distance(&a2, &b).unwrap()
        );
    }

    // ---- moments --------------------------------------------------------------------------

    #[test]
    fn mean_and_covariance_by_hand() {
        let x = array![[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]];
        let w = array![0.5, 0.25, 0.25];
        let a = Weighted::new(x.view(), w.view()).unwrap();
        let u = Weighted::uniform(x.view());
        assert_all_close(weighted_mean(&a).view(), array![0.5, 1.0].view(), 1e-15);
        assert_all_close(
            weighted_covariance(&a).view(),
            array![[0.75, -0.5], [-0.5, 3.0]].view(),
            1e-15,
        );
        assert_all_close(
            weighted_mean(&u).view(),
            array![2.0 / 3.0, 4.0 / 3.0].view(),
            1e-15,
        );
        assert_all_close(
            weighted_covariance(&u).view(),
            array![[8.0 / 9.0, -8.0 / 9.0], [-8.0 / 9.0, 32.0 / 9.0]].view(),
            1e-14,
        );
        assert_relative_eq!(
            mean_error(&a, &u).unwrap(),
            (5.0f64 / 36.0).sqrt(),
            epsilon = 1e-15
        );
        // Differences −5/36, 7/18 (twice), −5/9.
        assert_relative_eq!(
            covariance_error(&a, &u).unwrap(),
            (817.0f64 / 1296.0).sqrt(),
            epsilon = 1e-14
        );
    }

    // ---- weights and modes ----------------------------------------------------------------

    #[test]
    fn mode_weights_tv_and_chi_square_by_hand() {
        let labels = [0, 2, 2, 1, 2];
        let w = array![0.1, 0.2, 0.3, 0.15, 0.25];
        let pi = mode_weights(&labels, Some(w.view()), 4);
        assert_all_close(pi.view(), array![0.1, 0.15, 0.75, 0.0].view(), 1e-15);
        let pu = mode_weights(&labels, None, 3);
        assert_all_close(pu.view(), array![0.2, 0.2, 0.6].view(), 1e-15);
        let star = array![0.25, 0.25, 0.5, 0.0];
        // ½(.15 + .1 + .25 + 0) = .25
        assert_relative_eq!(
            total_variation(pi.view(), star.view()),
            0.25,
            epsilon = 1e-15
        );
        // 10·(.0225/.25 + .01/.25 + .0625/.5) = 10·(.09 + .04 + .125) = 2.55; π* = 0 skipped.
        assert_relative_eq!(
            chi_square_statistic(pi.view(), star.view(), 10.0),
            2.55,
            epsilon = 1e-13
        );
    }

    #[test]
    #[should_panic(expected = "not below num_modes")]
    fn mode_weights_rejects_out_of_range_labels() {
        mode_weights(&[0, 3], None, 3);
    }

    #[test]
    fn ess_closed_forms() {
        assert_relative_eq!(ess(uniform_weights(8).view()), 8.0, max_relative = 1e-14);
        assert_relative_eq!(ess(array![1.0, 0.0, 0.0].view()), 1.0);
        assert_relative_eq!(ess(array![0.5, 0.5, 0.0].view()), 2.0);
    }

    proptest! {
        #[test]
        fn ess_lies_between_one_and_n(raw in prop::collection::vec(0.0f64..1.0, 1..200), boost in 0usize..200) {
            let mut w = Array1::from(raw);
            let k = boost % w.len();
            w[k] += 1e-3; // at least one positive weight
            let w = &w / w.sum();
            let e = ess(w.view());
            let n = w.len() as f64;
            prop_assert!(e >= 1.0 - 1e-12, "ess = {e}");
            prop_assert!(e <= n * (1.0 + 1e-12), "ess = {e} > n = {n}");
        }
    }

    // ---- errors ---------------------------------------------------------------------------

    #[test]
    fn invalid_inputs_are_errors() {
        let x = normal_matrix(5, 2, 50);
        let y = normal_matrix(4, 3, 51);
        let (a, b) = (Weighted::uniform(x.view()), Weighted::uniform(y.view()));
        assert!(matches!(
            mmd_rbf(&a, &b, None),
            Err(Error::Dimension { .. })
        ));
        assert!(matches!(
            energy_distance(&a, &b),
            Err(Error::Dimension { .. })
        ));
        assert!(matches!(
            sliced_wasserstein(&a, &b, 4, 0),
            Err(Error::Dimension { .. })
        ));
        assert!(matches!(mean_error(&a, &b), Err(Error::Dimension { .. })));
        assert!(matches!(
            covariance_error(&a, &b),
            Err(Error::Dimension { .. })
        ));
        assert!(matches!(compare(&a, &b, 0), Err(Error::Dimension { .. })));

        let empty = Array2::<f64>::zeros((0, 2));
        let e = Weighted::uniform(empty.view());
        assert!(matches!(mmd_rbf(&e, &a, None), Err(Error::Invalid { .. })));
        assert!(matches!(
            energy_distance(&a, &e),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            sliced_wasserstein(&e, &a, 4, 0),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(mean_error(&a, &e), Err(Error::Invalid { .. })));
        assert!(matches!(
            sliced_wasserstein(&a, &a, 0, 0),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            mmd_rbf(&a, &a, Some(0.0)),
            Err(Error::Invalid { .. })
        ));

        let short = array![0.5, 0.5];
        assert!(matches!(
            Weighted::new(x.view(), short.view()),
            Err(Error::Dimension { .. })
        ));
        let unnormalised = Array1::ones(5);
        assert!(matches!(
            Weighted::new(x.view(), unnormalised.view()),
            Err(Error::Invalid { .. })
        ));
        let negative = array![0.5, 0.5, 0.25, -0.25, 0.0];
        assert!(matches!(
            Weighted::new(x.view(), negative.view()),
            Err(Error::Invalid { .. })
        ));
        let nan = array![0.5, 0.5, f64::NAN, 0.0, 0.0];
        assert!(matches!(
            Weighted::new(x.view(), nan.view()),
            Err(Error::Invalid { .. })
        ));
        // Bypassing the constructor is caught too.
        let bad = Weighted {
            x: x.view(),
            w: Some(unnormalised.view()),
        };
        assert!(matches!(
            mmd_rbf(&bad, &a, None),
            Err(Error::Invalid { .. })
        ));
        // The U-statistic needs two samples per set.
        let one = normal_matrix(1, 2, 52);
        let o = Weighted::uniform(one.view());
        assert!(matches!(
            mmd_rbf(&o, &a, Some(1.0)),
            Err(Error::Invalid { .. })
        ));
    }

    // ---- determinism ----------------------------------------------------------------------

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (x, y) = (normal_matrix(400, 4, 60), normal_matrix(300, 4, 61) + 0.2);
        let wx = random_weights(400, 62);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (a, b) = (
                    Weighted::new(x.view(), wx.view()).unwrap(),
                    Weighted::uniform(y.view()),
                );
                let ua = Weighted::uniform(x.view());
                let m = compare(&a, &b, 7).unwrap();
                [
                    m.mmd,
                    m.sliced_wasserstein,
                    m.energy_distance,
                    m.mean_error,
                    m.covariance_error,
                    mmd_rbf(&ua, &b, None).unwrap(),
                    median_bandwidth(&a, &b),
                ]
                .map(f64::to_bits)
            })
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn compare_agrees_with_the_individual_metrics() {
        let (x, y) = (normal_matrix(60, 3, 70), normal_matrix(50, 3, 71));
        let (a, b) = (Weighted::uniform(x.view()), Weighted::uniform(y.view()));
        let m = compare(&a, &b, 3).unwrap();
        assert_eq!(m.mmd, mmd_rbf(&a, &b, None).unwrap());
        assert_eq!(
            m.sliced_wasserstein,
            sliced_wasserstein(&a, &b, 256, 3).unwrap()
        );
        assert_eq!(m.energy_distance, energy_distance(&a, &b).unwrap());
        assert_eq!(m.mean_error, mean_error(&a, &b).unwrap());
        assert_eq!(m.covariance_error, covariance_error(&a, &b).unwrap());
    }
}
