//! Small dense linear algebra for `d × d` covariance matrices (Cholesky-based, `d` ≲ 100).

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

/// `Σ_i a_i b_i` in four interleaved lanes (a fixed summation order that vectorises).
#[inline]
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0.0; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            lanes[l] += x[l] * y[l];
        }
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
}

/// `y ← y + a x`.
#[inline]
pub fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Lower Cholesky factor `L` of a symmetric positive-definite `a = L Lᵀ`, or `None` with the
/// failing pivot index when `a` is not positive definite.
pub fn cholesky(a: ArrayView2<f64>) -> std::result::Result<Array2<f64>, usize> {
    let n = a.nrows();
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let mut diag = a[[j, j]];
        for k in 0..j {
            diag -= l[[j, k]] * l[[j, k]];
        }
        if !(diag > 0.0 && diag.is_finite()) {
            return Err(j);
        }
        let ljj = diag.sqrt();
        l[[j, j]] = ljj;
        for i in j + 1..n {
            let mut s = a[[i, j]];
            for k in 0..j {
                s -= l[[i, k]] * l[[j, k]];
            }
            l[[i, j]] = s / ljj;
        }
    }
    Ok(l)
}

/// `log det a = 2 Σ log L_ii` from the Cholesky factor.
pub fn log_det_from_cholesky(l: ArrayView2<f64>) -> f64 {
    2.0 * l.diag().iter().map(|v| v.ln()).sum::<f64>()
}

/// Solves `L y = b` (forward substitution).
pub fn solve_lower(l: ArrayView2<f64>, b: ArrayView1<f64>) -> Array1<f64> {
    let n = b.len();
    let mut y = b.to_owned();
    for i in 0..n {
        let mut s = y[i];
        for k in 0..i {
            s -= l[[i, k]] * y[k];
        }
        y[i] = s / l[[i, i]];
    }
    y
}

/// Solves `Lᵀ x = y` (back substitution).
pub fn solve_upper_transposed(l: ArrayView2<f64>, y: ArrayView1<f64>) -> Array1<f64> {
    let n = y.len();
    let mut x = y.to_owned();
    for i in (0..n).rev() {
        let mut s = x[i];
        for k in i + 1..n {
            s -= l[[k, i]] * x[k];
        }
        x[i] = s / l[[i, i]];
    }
    x
}

/// Solves `a x = b` for SPD `a` given its Cholesky factor.
pub fn cholesky_solve(l: ArrayView2<f64>, b: ArrayView1<f64>) -> Array1<f64> {
    solve_upper_transposed(l, solve_lower(l, b).view())
}

/// `a⁻¹` for SPD `a` given its Cholesky factor (symmetrised).
pub fn inverse_from_cholesky(l: ArrayView2<f64>) -> Array2<f64> {
    let n = l.nrows();
    let mut inv = Array2::<f64>::zeros((n, n));
    let mut e = Array1::<f64>::zeros(n);
    for j in 0..n {
        e.fill(0.0);
        e[j] = 1.0;
        let col = cholesky_solve(l, e.view());
        inv.column_mut(j).assign(&col);
    }
    let t = inv.t().to_owned();
    (inv + t) * 0.5
}

/// Inverse of an SPD matrix, or the failing pivot.
pub fn spd_inverse(a: ArrayView2<f64>) -> std::result::Result<Array2<f64>, usize> {
    Ok(inverse_from_cholesky(cholesky(a)?.view()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn cholesky_inverse_and_logdet() {
        let a = array![[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]];
        let l = cholesky(a.view()).unwrap();
        assert!((l.dot(&l.t()) - &a).iter().all(|v| v.abs() < 1e-14));
        let inv = inverse_from_cholesky(l.view());
        assert!(
            (inv.dot(&a) - Array2::<f64>::eye(3))
                .iter()
                .all(|v| v.abs() < 1e-14)
        );
        // det by cofactor expansion: 4(6 − 0.04) − 1(2 − 0.1) + 0.5(0.2 − 1.5) = 21.29
        assert!((log_det_from_cholesky(l.view()) - 21.29f64.ln()).abs() < 1e-12);
        assert_eq!(cholesky(array![[1.0, 2.0], [2.0, 1.0]].view()), Err(1));
    }
}
