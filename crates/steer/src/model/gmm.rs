//! Gaussian mixtures as exact score models (MATH.md §1.5).
//!
//! Data `p_0 = Σ_j π_j N(μ_j, Σ_j)` noised by `x_τ = α x_0 + σ ε` stays a mixture,
//! `p_τ = Σ_j π_j N(α μ_j, C_j)` with `C_j = α² Σ_j + σ² I`. With
//! `Φ_j = log π_j − ½(d log 2π + log det C_j + (x − m_j)ᵀ C_j⁻¹ (x − m_j))`,
//! responsibilities `ρ = softmax(Φ)` and `e_j = −C_j⁻¹(x − m_j)`:
//!
//! * `log p_τ = LSE_j Φ_j`,
//! * `∇log p_τ = Σ_j ρ_j e_j`,
//! * `∇·∇log p_τ = Σ_j ρ_j (|e_j|² − tr C_j⁻¹) − |∇log p_τ|²`.
//!
//! Per-time quantities (`C_j⁻¹`, `log det C_j`) are computed once per call; rows are processed
//! in fixed chunks in parallel, so results do not depend on the thread count.

use ndarray::linalg::general_mat_mul;
use ndarray::{
    Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, Slice,
};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::{NoiseLevel, ScoreModel, ScoreOutput};
use crate::error::{Error, Result};
use crate::linalg::{self, dot};
use crate::rng::{Purpose, Streams};

/// Rows per parallel task: fixed, so chunk boundaries never depend on the thread count.
const CHUNK: usize = 64;
const LOG_2PI: f64 = 1.837_877_066_409_345_5;

/// Component covariances of a mixture, in one of three forms.
#[derive(Clone, Debug, PartialEq)]
pub enum Covariance {
    /// `K × d × d` full symmetric positive-definite matrices.
    Full(Array3<f64>),
    /// `K × d` diagonal variances.
    Diagonal(Array2<f64>),
    /// `K` isotropic variances `ς_j²` (`Σ_j = ς_j² I`).
    Isotropic(Array1<f64>),
}

/// A Gaussian mixture `Σ_j π_j N(μ_j, Σ_j)` in `d` dimensions.
#[derive(Clone, Debug)]
pub struct GaussianMixture {
    weights: Array1<f64>,
    means: Array2<f64>,
    covariance: Covariance,
    /// Cholesky factors of `Σ_j` (full form only), for exact sampling.
    factors: Option<Array3<f64>>,
}

impl GaussianMixture {
    /// Validates and builds a mixture: weights non-negative, finite and summing to one
    /// (within `1e-6`), one mean per weight, covariances symmetric positive definite.
    pub fn new(weights: Array1<f64>, means: Array2<f64>, covariance: Covariance) -> Result<Self> {
        let k = weights.len();
        if k == 0 {
            return Err(Error::invalid(
                "weights",
                "a mixture needs at least one component",
            ));
        }
        if let Some(j) = weights.iter().position(|w| !w.is_finite() || *w < 0.0) {
            return Err(Error::invalid(
                format!("weights[{j}]"),
                format!("must be finite and ≥ 0, got {}", weights[j]),
            ));
        }
        let total = weights.sum();
        if (total - 1.0).abs() > 1e-6 {
            return Err(Error::invalid(
                "weights",
                format!("must sum to 1, sum is {total}"),
            ));
        }
        if means.nrows() != k {
            return Err(Error::Dimension {
                context: "means (one row per weight)".into(),
                expected: k,
                found: means.nrows(),
            });
        }
        let d = means.ncols();
        if d == 0 {
            return Err(Error::invalid("means", "dimension must be at least 1"));
        }
        if let Some(pos) = means.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                format!("means[{}][{}]", pos / d, pos % d),
                "must be finite",
            ));
        }
        let factors = validate_covariance(&covariance, k, d)?;
        Ok(GaussianMixture {
            weights,
            means,
            covariance,
            factors,
        })
    }

    /// Number of components `K`.
    pub fn num_components(&self) -> usize {
        self.weights.len()
    }

    /// Dimension `d`.
    pub fn dim(&self) -> usize {
        self.means.ncols()
    }

    /// Weights `π_j`.
    pub fn weights(&self) -> ArrayView1<'_, f64> {
        self.weights.view()
    }

    /// Means `μ_j` (`K × d`).
    pub fn means(&self) -> ArrayView2<'_, f64> {
        self.means.view()
    }

    /// Covariances in their stored form.
    pub fn covariance(&self) -> &Covariance {
        &self.covariance
    }

    /// Component `j`'s covariance as a full `d × d` matrix.
    pub fn component_covariance(&self, j: usize) -> Array2<f64> {
        let d = self.dim();
        match &self.covariance {
            Covariance::Full(c) => c.index_axis(Axis(0), j).to_owned(),
            Covariance::Diagonal(v) => Array2::from_diag(&v.row(j)),
            Covariance::Isotropic(v) => Array2::eye(d) * v[j],
        }
    }

    /// The noised mixture `p_τ` at `level`, with per-time quantities precomputed.
    pub fn noised(&self, level: &NoiseLevel) -> NoisedMixture {
        let (a2, s2) = (level.alpha * level.alpha, level.sigma * level.sigma);
        let d = self.dim();
        let means = &self.means * level.alpha;
        let log_weights = self.weights.mapv(f64::ln);
        match &self.covariance {
            Covariance::Diagonal(_) | Covariance::Isotropic(_) => {
                let k = self.num_components();
                let mut precision = Array2::<f64>::zeros((k, d));
                for j in 0..k {
                    for i in 0..d {
                        let var = match &self.covariance {
                            Covariance::Diagonal(v) => v[[j, i]],
                            Covariance::Isotropic(v) => v[j],
                            Covariance::Full(_) => unreachable!(),
                        };
                        precision[[j, i]] = 1.0 / (a2 * var + s2);
                    }
                }
                let trace = precision.sum_axis(Axis(1));
                let log_norm = Array1::from_shape_fn(k, |j| {
                    let log_det = -precision.row(j).iter().map(|p| p.ln()).sum::<f64>();
                    log_weights[j] - 0.5 * (d as f64 * LOG_2PI + log_det)
                });
                NoisedMixture {
                    means,
                    log_norm,
                    trace,
                    precision: Precision::Diagonal(precision),
                }
            }
            Covariance::Full(cov) => {
                let k = self.num_components();
                let mut precision = Array3::<f64>::zeros((k, d, d));
                let mut log_norm = Array1::zeros(k);
                let mut trace = Array1::zeros(k);
                for j in 0..k {
                    let c =
                        cov.index_axis(Axis(0), j).mapv(|v| v * a2) + Array2::<f64>::eye(d) * s2;
                    // Validated positive definite at construction; α²Σ + σ²I stays so.
                    let l = linalg::cholesky(c.view()).expect("noised covariance is SPD");
                    let p = linalg::inverse_from_cholesky(l.view());
                    trace[j] = p.diag().sum();
                    log_norm[j] = log_weights[j]
                        - 0.5 * (d as f64 * LOG_2PI + linalg::log_det_from_cholesky(l.view()));
                    precision.index_axis_mut(Axis(0), j).assign(&p);
                }
                NoisedMixture {
                    means,
                    log_norm,
                    trace,
                    precision: Precision::Full(precision),
                }
            }
        }
    }

    /// Fills `x` (`n × d`) with exact samples; row `i` uses stream `(purpose, step, i)`.
    pub fn sample_into(
        &self,
        mut x: ArrayViewMut2<f64>,
        streams: &Streams,
        purpose: Purpose,
        step: usize,
    ) {
        x.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(i, row)| self.draw(&mut streams.rng(purpose, step, i), row));
    }

    /// One exact sample into `row`: a component by its weight, then `μ_j + L_j z`.
    pub fn draw<R: rand::Rng + ?Sized>(&self, rng: &mut R, mut row: ArrayViewMut1<f64>) {
        let d = self.dim();
        let u: f64 = rand::RngExt::random::<f64>(rng);
        let mut j = self.num_components() - 1;
        let mut cumulative = 0.0;
        for (c, &w) in self.weights.iter().enumerate() {
            cumulative += w;
            if u * self.weights.sum() < cumulative {
                j = c;
                break;
            }
        }
        for c in 0..d {
            row[c] = StandardNormal.sample(rng);
        }
        let mean = self.means.row(j);
        match &self.covariance {
            Covariance::Isotropic(v) => {
                let sd = v[j].sqrt();
                row.zip_mut_with(&mean, |z, &m| *z = m + sd * *z);
            }
            Covariance::Diagonal(v) => {
                for c in 0..d {
                    row[c] = mean[c] + v[[j, c]].sqrt() * row[c];
                }
            }
            Covariance::Full(_) => {
                let l = self.factors.as_ref().expect("full form keeps factors");
                // Lower-triangular product from the bottom row up, in place.
                for c in (0..d).rev() {
                    let v: f64 = (0..=c).map(|q| l[[j, c, q]] * row[q]).sum();
                    row[c] = mean[c] + v;
                }
            }
        }
    }

    /// `n` exact samples (row `i` from stream `(purpose, 0, i)`).
    pub fn sample(&self, n: usize, streams: &Streams, purpose: Purpose) -> Array2<f64> {
        let mut x = Array2::zeros((n, self.dim()));
        self.sample_into(x.view_mut(), streams, purpose, 0);
        x
    }

    /// The noised law `p_τ` itself as a mixture: means `α μ_j`, covariances `α² Σ_j + σ² I`,
    /// in the same covariance form.
    pub fn at_level(&self, level: &NoiseLevel) -> GaussianMixture {
        let (a2, s2) = (level.alpha * level.alpha, level.sigma * level.sigma);
        let covariance = match &self.covariance {
            Covariance::Isotropic(v) => Covariance::Isotropic(v.mapv(|v| a2 * v + s2)),
            Covariance::Diagonal(v) => Covariance::Diagonal(v.mapv(|v| a2 * v + s2)),
            Covariance::Full(c) => {
                let mut c = c.mapv(|v| a2 * v);
                for mut m in c.axis_iter_mut(Axis(0)) {
                    m.diag_mut().mapv_inplace(|v| v + s2);
                }
                Covariance::Full(c)
            }
        };
        GaussianMixture::new(self.weights.clone(), &self.means * level.alpha, covariance)
            .expect("a noised valid mixture is valid")
    }

    /// `N × K` matrix of `log π_j + log N(x_i; m_j, C_j)` at `level`.
    pub fn component_log_densities(&self, level: &NoiseLevel, x: ArrayView2<f64>) -> Array2<f64> {
        let noised = self.noised(level);
        let k = self.num_components();
        let mut out = Array2::zeros((x.nrows(), k));
        out.axis_chunks_iter_mut(Axis(0), CHUNK)
            .into_par_iter()
            .enumerate()
            .for_each(|(c, mut o)| {
                let start = c * CHUNK;
                let xs = x.slice_axis(Axis(0), Slice::from(start..start + o.nrows()));
                let mut scratch = Scratch::new(xs.nrows(), k, x.ncols(), &noised.precision);
                noised.log_components(xs, &mut scratch, false);
                o.assign(&scratch.phi);
            });
        out
    }

    /// For each row of `x`, the component of largest responsibility at `level`.
    pub fn assign(&self, level: &NoiseLevel, x: ArrayView2<f64>) -> Vec<usize> {
        let noised = self.noised(level);
        let k = self.num_components();
        let rows: Vec<usize> = (0..x.nrows()).collect();
        rows.par_chunks(CHUNK)
            .flat_map_iter(|chunk| {
                let xs = x.slice_axis(Axis(0), Slice::from(chunk[0]..chunk[0] + chunk.len()));
                let mut scratch = Scratch::new(xs.nrows(), k, x.ncols(), &noised.precision);
                noised.log_components(xs, &mut scratch, false);
                (0..xs.nrows())
                    .map(|r| argmax(scratch.phi.row(r)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

fn argmax(v: ArrayView1<f64>) -> usize {
    let mut best = 0;
    for (j, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = j;
        }
    }
    best
}

fn validate_covariance(cov: &Covariance, k: usize, d: usize) -> Result<Option<Array3<f64>>> {
    let bad_shape = |field: &str, found: usize, expected: usize| Error::Dimension {
        context: field.into(),
        expected,
        found,
    };
    match cov {
        Covariance::Isotropic(v) => {
            if v.len() != k {
                return Err(bad_shape(
                    "isotropic (one variance per component)",
                    v.len(),
                    k,
                ));
            }
            if let Some(j) = v.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(Error::NotPositiveDefinite {
                    field: "isotropic".into(),
                    component: j,
                    reason: format!("variance {} must be finite and > 0", v[j]),
                });
            }
            Ok(None)
        }
        Covariance::Diagonal(v) => {
            if v.nrows() != k {
                return Err(bad_shape("diagonal (one row per component)", v.nrows(), k));
            }
            if v.ncols() != d {
                return Err(bad_shape("diagonal (row length = dimension)", v.ncols(), d));
            }
            for ((j, i), x) in v.indexed_iter() {
                if !(x.is_finite() && *x > 0.0) {
                    return Err(Error::NotPositiveDefinite {
                        field: "diagonal".into(),
                        component: j,
                        reason: format!("variance [{i}] = {x} must be finite and > 0"),
                    });
                }
            }
            Ok(None)
        }
        Covariance::Full(c) => {
            let shape = c.shape();
            if shape[0] != k {
                return Err(bad_shape(
                    "covariances (one matrix per component)",
                    shape[0],
                    k,
                ));
            }
            if shape[1] != d || shape[2] != d {
                return Err(bad_shape(
                    "covariances (d × d matrices)",
                    shape[1].max(shape[2]),
                    d,
                ));
            }
            let mut factors = Array3::zeros((k, d, d));
            for j in 0..k {
                let m = c.index_axis(Axis(0), j);
                if let Some(pos) = m.iter().position(|x| !x.is_finite()) {
                    return Err(Error::NotPositiveDefinite {
                        field: "covariances".into(),
                        component: j,
                        reason: format!("entry [{}][{}] is not finite", pos / d, pos % d),
                    });
                }
                for a in 0..d {
                    for b in 0..a {
                        let tol = 1e-9 * (m[[a, b]].abs() + m[[b, a]].abs()).max(1e-300) + 1e-12;
                        if (m[[a, b]] - m[[b, a]]).abs() > tol {
                            return Err(Error::NotPositiveDefinite {
                                field: "covariances".into(),
                                component: j,
                                reason: format!("not symmetric at [{a}][{b}]"),
                            });
                        }
                    }
                }
                let l = linalg::cholesky(m).map_err(|pivot| Error::NotPositiveDefinite {
                    field: "covariances".into(),
                    component: j,
                    reason: format!("Cholesky factorisation fails at pivot {pivot}"),
                })?;
                factors.index_axis_mut(Axis(0), j).assign(&l);
            }
            Ok(Some(factors))
        }
    }
}

/// Precisions `C_j⁻¹` of a noised mixture.
#[derive(Clone, Debug)]
enum Precision {
    /// `K × d` diagonal precisions (diagonal and isotropic forms).
    Diagonal(Array2<f64>),
    /// `K × d × d` dense precisions.
    Full(Array3<f64>),
}

/// A mixture at one noise level: means `α μ_j`, precisions `C_j⁻¹`, normalising constants.
#[derive(Clone, Debug)]
pub struct NoisedMixture {
    means: Array2<f64>,
    /// `log π_j − ½(d log 2π + log det C_j)`.
    log_norm: Array1<f64>,
    /// `tr C_j⁻¹`.
    trace: Array1<f64>,
    precision: Precision,
}

/// One parallel task: first row, score rows, optional log-density and divergence rows.
type Task<'a> = (
    usize,
    &'a mut [f64],
    Option<&'a mut [f64]>,
    Option<&'a mut [f64]>,
);

/// Per-task scratch buffers (allocated once per parallel chunk, never per particle).
struct Scratch {
    /// `rows × K` log-components `Φ_j`.
    phi: Array2<f64>,
    /// `rows × K` squared norms `|e_j|²`.
    e_norm2: Array2<f64>,
    /// `K` unnormalised responsibilities of the current row.
    rho: Array1<f64>,
    /// Full form: `K × rows × d` with `C_j⁻¹(x − m_j)` and a `rows × d` difference buffer.
    projected: Array3<f64>,
    diff: Array2<f64>,
}

impl Scratch {
    fn new(rows: usize, k: usize, d: usize, precision: &Precision) -> Self {
        let full = matches!(precision, Precision::Full(_));
        Scratch {
            phi: Array2::zeros((rows, k)),
            e_norm2: Array2::zeros((rows, k)),
            rho: Array1::zeros(k),
            projected: if full {
                Array3::zeros((k, rows, d))
            } else {
                Array3::zeros((0, 0, 0))
            },
            diff: if full {
                Array2::zeros((rows, d))
            } else {
                Array2::zeros((0, 0))
            },
        }
    }
}

impl NoisedMixture {
    /// Fills `scratch.phi` (and `projected`; `e_norm2` when `norms`) for the rows of `x`.
    fn log_components(&self, x: ArrayView2<f64>, scratch: &mut Scratch, norms: bool) {
        let k = self.means.nrows();
        match &self.precision {
            Precision::Diagonal(p) => {
                for (r, xr) in x.axis_iter(Axis(0)).enumerate() {
                    let xr = xr.to_slice().expect("rows are contiguous");
                    for j in 0..k {
                        let m = self.means.row(j).to_slice().expect("contiguous");
                        let pj = p.row(j).to_slice().expect("contiguous");
                        scratch.phi[[r, j]] =
                            self.log_norm[j] - 0.5 * weighted_square(xr, m, pj, 1);
                        if norms {
                            scratch.e_norm2[[r, j]] = weighted_square(xr, m, pj, 2);
                        }
                    }
                }
            }
            Precision::Full(p) => {
                let rows = x.nrows();
                let diff = &mut scratch.diff;
                for j in 0..k {
                    let m = self.means.row(j);
                    diff.assign(&x);
                    *diff -= &m;
                    let mut proj = scratch.projected.index_axis_mut(Axis(0), j);
                    general_mat_mul(1.0, &diff.view(), &p.index_axis(Axis(0), j), 0.0, &mut proj);
                    for r in 0..rows {
                        let dr = diff.row(r);
                        let pr = proj.row(r);
                        let (dr, pr) = (
                            dr.to_slice().expect("contiguous"),
                            pr.to_slice().expect("contiguous"),
                        );
                        scratch.phi[[r, j]] = self.log_norm[j] - 0.5 * dot(dr, pr);
                        if norms {
                            scratch.e_norm2[[r, j]] = dot(pr, pr);
                        }
                    }
                }
            }
        }
    }

    /// Evaluates score, log-density and divergence for all rows of `x`, in parallel chunks.
    pub fn evaluate(&self, x: ArrayView2<f64>, out: ScoreOutput<'_>) -> Result<()> {
        let (n, d) = x.dim();
        let k = self.means.nrows();
        if d != self.means.ncols() {
            return Err(Error::Dimension {
                context: "mixture score input".into(),
                expected: self.means.ncols(),
                found: d,
            });
        }
        let ScoreOutput {
            mut score,
            log_density,
            divergence,
        } = out;
        if score.dim() != (n, d) {
            return Err(Error::Dimension {
                context: "score output rows".into(),
                expected: n,
                found: score.nrows(),
            });
        }
        let x = x.as_standard_layout();
        let score = score
            .as_slice_mut()
            .ok_or_else(|| Error::Unsupported("score buffer must be contiguous".into()))?;
        let mut log_density = log_density;
        let mut divergence = divergence;
        let logp = log_density.as_mut().and_then(|v| v.as_slice_mut());
        let div = divergence.as_mut().and_then(|v| v.as_slice_mut());
        let mut tasks: Vec<Task<'_>> = Vec::new();
        let mut logp_chunks = logp.map(|v| v.chunks_mut(CHUNK));
        let mut div_chunks = div.map(|v| v.chunks_mut(CHUNK));
        for (c, sc) in score.chunks_mut(CHUNK * d).enumerate() {
            let l = logp_chunks.as_mut().and_then(|it| it.next());
            let dv = div_chunks.as_mut().and_then(|it| it.next());
            tasks.push((c * CHUNK, sc, l, dv));
        }
        tasks.into_par_iter().for_each_init(
            || Scratch::new(CHUNK, k, d, &self.precision),
            |scratch, (start, sc, l, dv)| {
                let rows = sc.len() / d;
                let xs = x.slice_axis(Axis(0), Slice::from(start..start + rows));
                self.chunk(xs, scratch, sc, l, dv);
            },
        );
        Ok(())
    }

    fn chunk(
        &self,
        x: ArrayView2<f64>,
        scratch: &mut Scratch,
        score: &mut [f64],
        mut log_density: Option<&mut [f64]>,
        mut divergence: Option<&mut [f64]>,
    ) {
        let rows = x.nrows();
        let d = x.ncols();
        let k = self.means.nrows();
        if scratch.phi.nrows() != rows {
            *scratch = Scratch::new(rows, k, d, &self.precision);
        }
        self.log_components(x, scratch, divergence.is_some());
        for r in 0..rows {
            // Responsibilities ρ_j = softmax(Φ)_j, with one exponential per component.
            let phi = scratch.phi.row(r);
            let max = phi.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let rho = scratch.rho.as_slice_mut().expect("contiguous");
            let mut sum = 0.0;
            for (w, &v) in rho.iter_mut().zip(phi.iter()) {
                *w = (v - max).exp();
                sum += *w;
            }
            if let Some(l) = log_density.as_deref_mut() {
                l[r] = max + sum.ln();
            }
            let s_row = &mut score[r * d..(r + 1) * d];
            s_row.fill(0.0);
            let xr = x.row(r);
            let xr = xr.to_slice().expect("rows are contiguous");
            let mut div_acc = 0.0;
            for j in 0..k {
                let w = rho[j] / sum;
                if w == 0.0 {
                    continue;
                }
                div_acc += w * (scratch.e_norm2[[r, j]] - self.trace[j]);
                match &self.precision {
                    Precision::Diagonal(p) => {
                        let m = self.means.row(j).to_slice().expect("contiguous");
                        let pj = p.row(j).to_slice().expect("contiguous");
                        for (((s, &xv), &mv), &pv) in s_row.iter_mut().zip(xr).zip(m).zip(pj) {
                            *s += w * (mv - xv) * pv;
                        }
                    }
                    Precision::Full(_) => {
                        let proj = scratch.projected.index_axis(Axis(0), j);
                        for (s, &pv) in s_row.iter_mut().zip(proj.row(r).iter()) {
                            *s -= w * pv;
                        }
                    }
                }
            }
            if let Some(dv) = divergence.as_deref_mut() {
                dv[r] = div_acc - dot(s_row, s_row);
            }
        }
    }
}

/// `Σ_i (x_i − m_i)² p_i^power` (power 1 or 2) in four interleaved lanes.
#[inline]
fn weighted_square(x: &[f64], m: &[f64], p: &[f64], power: i32) -> f64 {
    let mut lanes = [0.0; 4];
    let term = |x: f64, m: f64, p: f64| {
        let z = (x - m) * p;
        if power == 1 { (x - m) * z } else { z * z }
    };
    let (cx, cm, cp) = (x.chunks_exact(4), m.chunks_exact(4), p.chunks_exact(4));
    let tail: f64 = cx
        .remainder()
        .iter()
        .zip(cm.remainder())
        .zip(cp.remainder())
        .map(|((&x, &m), &p)| term(x, m, p))
        .sum();
    for ((x, m), p) in cx.zip(cm).zip(cp) {
        for l in 0..4 {
            lanes[l] += term(x[l], m[l], p[l]);
        }
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
}

impl ScoreModel for GaussianMixture {
    fn dim(&self) -> usize {
        self.means.ncols()
    }

    fn evaluate(&self, level: &NoiseLevel, x: ArrayView2<f64>, out: ScoreOutput<'_>) -> Result<()> {
        self.noised(level).evaluate(x, out)
    }

    fn provides_log_density(&self) -> bool {
        true
    }

    fn provides_divergence(&self) -> bool {
        true
    }

    fn as_mixture(&self) -> Option<&GaussianMixture> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Schedule;
    use ndarray::{Array3, array};

    fn mixtures() -> Vec<GaussianMixture> {
        let w = array![0.2, 0.5, 0.3];
        let means = array![[-1.0, 0.5, 2.0], [1.5, -0.5, 0.0], [0.0, 2.0, -1.0]];
        let iso = GaussianMixture::new(
            w.clone(),
            means.clone(),
            Covariance::Isotropic(array![0.3, 0.8, 0.5]),
        )
        .unwrap();
        let diag = GaussianMixture::new(
            w.clone(),
            means.clone(),
            Covariance::Diagonal(array![[0.3, 0.5, 0.2], [0.8, 0.4, 1.1], [0.5, 0.5, 0.9]]),
        )
        .unwrap();
        let mut full = Array3::zeros((3, 3, 3));
        let a = [
            array![[0.5, 0.2, 0.0], [0.2, 0.4, 0.1], [0.0, 0.1, 0.3]],
            array![[1.0, -0.3, 0.2], [-0.3, 0.6, 0.0], [0.2, 0.0, 0.7]],
            array![[0.4, 0.0, 0.0], [0.0, 0.9, 0.35], [0.0, 0.35, 0.5]],
        ];
        for (j, m) in a.iter().enumerate() {
            full.index_axis_mut(Axis(0), j).assign(m);
        }
        let full = GaussianMixture::new(w, means, Covariance::Full(full)).unwrap();
        vec![iso, diag, full]
    }

    fn schedules() -> Vec<Schedule> {
        vec![
            Schedule::VpLinear {
                beta_min: 0.1,
                beta_max: 20.0,
                horizon: 1.0,
            },
            Schedule::VpCosine {
                offset: 0.008,
                horizon: 1.0,
            },
            Schedule::VeEdm { sigma_max: 80.0 },
        ]
    }

    fn eval(
        m: &GaussianMixture,
        level: &NoiseLevel,
        x: ArrayView2<f64>,
    ) -> (Array2<f64>, Array1<f64>, Array1<f64>) {
        let n = x.nrows();
        let mut s = Array2::zeros((n, m.dim()));
        let mut l = Array1::zeros(n);
        let mut dv = Array1::zeros(n);
        m.evaluate(
            level,
            x,
            ScoreOutput {
                score: s.view_mut(),
                log_density: Some(l.view_mut()),
                divergence: Some(dv.view_mut()),
            },
        )
        .unwrap();
        (s, l, dv)
    }

    /// Score = ∇ log p and divergence = tr ∇² log p, by central differences (step h: error
    /// O(h²) for the gradient, O(h²) for the second difference; tolerances 1e-6 relative).
    #[test]
    fn score_logdensity_divergence_match_finite_differences() {
        let x = array![[0.3, -0.2, 0.9], [1.4, 0.1, -0.4], [-2.0, 1.5, 0.5]];
        for m in mixtures() {
            for sch in schedules() {
                for frac in [0.0, 0.05, 0.3, 0.8] {
                    let tau = frac * sch.horizon();
                    let level = NoiseLevel::new(&sch, tau);
                    let scale = 1.0 + level.sigma;
                    let xs = &x * scale;
                    let (s, _, dv) = eval(&m, &level, xs.view());
                    let h = 1e-4 * scale;
                    for r in 0..xs.nrows() {
                        let mut lap = 0.0;
                        for c in 0..3 {
                            let mut xp = xs.row(r).to_owned().insert_axis(Axis(0));
                            let mut xm = xp.clone();
                            xp[[0, c]] += h;
                            xm[[0, c]] -= h;
                            let (sp, lp, _) = eval(&m, &level, xp.view());
                            let (sm, lm, _) = eval(&m, &level, xm.view());
                            let fd = (lp[0] - lm[0]) / (2.0 * h);
                            let tol = 1e-6 * (1.0 + s[[r, c]].abs());
                            assert!(
                                (fd - s[[r, c]]).abs() < tol,
                                "{:?} {sch:?} τ={tau}: score {fd} vs {}",
                                m.covariance(),
                                s[[r, c]]
                            );
                            lap += (sp[[0, c]] - sm[[0, c]]) / (2.0 * h);
                        }
                        let tol = 1e-5 * (1.0 + dv[r].abs());
                        assert!(
                            (lap - dv[r]).abs() < tol,
                            "{sch:?} τ={tau}: div {lap} vs {}",
                            dv[r]
                        );
                    }
                }
            }
        }
    }

    /// The three forms agree when they describe the same mixture, and log p integrates the
    /// Gaussian normaliser correctly (1-D check against the closed-form density).
    #[test]
    fn forms_agree_and_density_is_normalised() {
        let w = array![0.4, 0.6];
        let means = array![[0.0, 1.0], [2.0, -1.0]];
        let iso = GaussianMixture::new(
            w.clone(),
            means.clone(),
            Covariance::Isotropic(array![0.5, 2.0]),
        )
        .unwrap();
        let diag = GaussianMixture::new(
            w.clone(),
            means.clone(),
            Covariance::Diagonal(array![[0.5, 0.5], [2.0, 2.0]]),
        )
        .unwrap();
        let mut c = Array3::zeros((2, 2, 2));
        c.index_axis_mut(Axis(0), 0)
            .assign(&(Array2::<f64>::eye(2) * 0.5));
        c.index_axis_mut(Axis(0), 1)
            .assign(&(Array2::<f64>::eye(2) * 2.0));
        let full = GaussianMixture::new(w, means, Covariance::Full(c)).unwrap();
        let level = NoiseLevel {
            tau: 0.3,
            alpha: 0.8,
            sigma: 0.6,
        };
        let x = array![[0.1, 0.2], [3.0, -2.0], [-1.0, 5.0]];
        let (s0, l0, d0) = eval(&iso, &level, x.view());
        for m in [&diag, &full] {
            let (s, l, dv) = eval(m, &level, x.view());
            assert!((s - &s0).iter().all(|v| v.abs() < 1e-12));
            assert!((l - &l0).iter().all(|v| v.abs() < 1e-12));
            assert!((dv - &d0).iter().all(|v| v.abs() < 1e-12));
        }
        // Direct formula for point 0.
        let dens: f64 = [
            (0.4f64, [0.0f64, 0.8], 0.64f64 * 0.5 + 0.36),
            (0.6, [1.6, -0.8], 0.64 * 2.0 + 0.36),
        ]
        .iter()
        .map(|(p, m, v)| {
            let q = ((0.1 - m[0]) * (0.1 - m[0]) + (0.2 - m[1]) * (0.2 - m[1])) / v;
            p * (-0.5 * q).exp() / (2.0 * std::f64::consts::PI * v)
        })
        .sum();
        assert!((l0[0] - dens.ln()).abs() < 1e-12);
    }

    /// Exact sampling: component frequencies and means within z = 5 CLT bounds.
    #[test]
    fn sampling_matches_moments() {
        let m = &mixtures()[2];
        let n = 40_000;
        let x = m.sample(n, &Streams::new(3), Purpose::Reference);
        let mean = x.mean_axis(Axis(0)).unwrap();
        let want = m.weights().dot(&m.means());
        for c in 0..3 {
            // Var of the mixture along c ≤ max second moment; bound it by the sample variance.
            let var = x.column(c).var(1.0);
            assert!((mean[c] - want[c]).abs() < 5.0 * (var / n as f64).sqrt());
        }
        let labels = m.assign(&NoiseLevel::data(), x.view());
        for j in 0..3 {
            let f = labels.iter().filter(|&&l| l == j).count() as f64 / n as f64;
            // Overlap moves labels a little; the comparison is loose but must see gross errors.
            assert!((f - m.weights()[j]).abs() < 0.05, "component {j}: {f}");
        }
    }

    #[test]
    fn invalid_mixtures_are_rejected() {
        let means = array![[0.0], [1.0]];
        let e = GaussianMixture::new(
            array![0.5, 0.6],
            means.clone(),
            Covariance::Isotropic(array![1.0, 1.0]),
        );
        assert!(matches!(e, Err(Error::Invalid { ref field, .. }) if field == "weights"));
        let e = GaussianMixture::new(
            array![-0.5, 1.5],
            means.clone(),
            Covariance::Isotropic(array![1.0, 1.0]),
        );
        assert!(matches!(e, Err(Error::Invalid { ref field, .. }) if field == "weights[0]"));
        let e = GaussianMixture::new(
            array![0.5, 0.5],
            means.clone(),
            Covariance::Isotropic(array![1.0, -1.0]),
        );
        assert!(matches!(
            e,
            Err(Error::NotPositiveDefinite { component: 1, .. })
        ));
        let mut c = Array3::zeros((2, 1, 1));
        c[[0, 0, 0]] = 1.0;
        let e = GaussianMixture::new(array![0.5, 0.5], means.clone(), Covariance::Full(c));
        assert!(matches!(
            e,
            Err(Error::NotPositiveDefinite { component: 1, .. })
        ));
        let e = GaussianMixture::new(
            array![0.5, 0.5],
            array![[0.0], [f64::NAN]],
            Covariance::Isotropic(array![1.0, 1.0]),
        );
        assert!(e.is_err());
        let e = GaussianMixture::new(array![1.0], means, Covariance::Isotropic(array![1.0]));
        assert!(matches!(e, Err(Error::Dimension { .. })));
    }
}
