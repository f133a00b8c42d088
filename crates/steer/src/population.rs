//! The particle population: positions and per-particle carry, which always move together.

use ndarray::{Array2, Axis};

/// `N` particles: positions `x` (`N × d`) and a carry (`N × c`) of per-particle method state
/// (a twist value, a running maximum, …) that is resampled with them.
#[derive(Clone, Debug)]
pub struct Population {
    /// Positions, one row per particle.
    pub x: Array2<f64>,
    /// Per-particle method state, one row per particle (possibly zero columns).
    pub carry: Array2<f64>,
}

impl Population {
    /// A population at `x` with a zero carry of `carry_width` columns.
    pub fn new(x: Array2<f64>, carry_width: usize) -> Self {
        let n = x.nrows();
        Population {
            x,
            carry: Array2::zeros((n, carry_width)),
        }
    }

    /// Number of particles `N`.
    pub fn len(&self) -> usize {
        self.x.nrows()
    }

    /// Whether there are no particles.
    pub fn is_empty(&self) -> bool {
        self.x.nrows() == 0
    }

    /// Dimension `d`.
    pub fn dim(&self) -> usize {
        self.x.ncols()
    }

    /// Replaces the population by the particles `ancestors` (any count, repeats allowed).
    pub fn select(&mut self, ancestors: &[usize]) {
        self.x = self.x.select(Axis(0), ancestors);
        self.carry = self.carry.select(Axis(0), ancestors);
    }
}
