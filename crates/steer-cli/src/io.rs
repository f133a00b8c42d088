//! Files: `.npy` arrays, mixture JSON, and output folders written atomically.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::{Array1, Array2, Array3};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use serde::Deserialize;
use steer::model::nn::NetworkSpec;
use steer::model::{Covariance, GaussianMixture};

/// The mixture file format users bring: weights, means and exactly one covariance form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MixtureFile {
    weights: Vec<f64>,
    means: Vec<Vec<f64>>,
    covariances: Option<Vec<Vec<Vec<f64>>>>,
    diagonal: Option<Vec<Vec<f64>>>,
    isotropic: Option<Vec<f64>>,
}

/// Reads a Gaussian mixture from JSON `{"weights": [K], "means": [K][d], ...}` with exactly one
/// of `"covariances": [K][d][d]`, `"diagonal": [K][d]`, `"isotropic": [K]`.
pub fn read_mixture(path: &Path) -> Result<GaussianMixture> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read mixture file {}", path.display()))?;
    let file: MixtureFile = serde_json::from_str(&text)
        .with_context(|| format!("invalid mixture file {}", path.display()))?;
    parse_mixture(file).with_context(|| format!("invalid mixture file {}", path.display()))
}

fn parse_mixture(f: MixtureFile) -> Result<GaussianMixture> {
    let k = f.weights.len();
    let d = f.means.first().map(|m| m.len()).unwrap_or(0);
    for (j, m) in f.means.iter().enumerate() {
        if m.len() != d {
            bail!(
                "`means[{j}]` has length {}, but `means[0]` has length {d}",
                m.len()
            );
        }
    }
    if let Some(j) = f.weights.iter().position(|w| !w.is_finite()) {
        bail!("`weights[{j}]` is not finite");
    }
    let means = Array2::from_shape_vec((f.means.len(), d), f.means.concat())?;
    let forms = [
        f.covariances.is_some(),
        f.diagonal.is_some(),
        f.isotropic.is_some(),
    ];
    if forms.iter().filter(|x| **x).count() != 1 {
        bail!("give exactly one of `covariances`, `diagonal` or `isotropic`");
    }
    let covariance = if let Some(c) = f.covariances {
        let mut arr = Array3::zeros((c.len(), d, d));
        for (j, m) in c.iter().enumerate() {
            if m.len() != d || m.iter().any(|row| row.len() != d) {
                bail!("`covariances[{j}]` must be a {d} × {d} matrix");
            }
            for (a, row) in m.iter().enumerate() {
                for (b, v) in row.iter().enumerate() {
                    arr[[j, a, b]] = *v;
                }
            }
        }
        Covariance::Full(arr)
    } else if let Some(v) = f.diagonal {
        for (j, row) in v.iter().enumerate() {
            if row.len() != d {
                bail!(
                    "`diagonal[{j}]` has length {}, expected the dimension {d}",
                    row.len()
                );
            }
        }
        Covariance::Diagonal(Array2::from_shape_vec((v.len(), d), v.concat())?)
    } else {
        Covariance::Isotropic(Array1::from(f.isotropic.unwrap_or_default()))
    };
    let _ = k;
    Ok(GaussianMixture::new(
        Array1::from(f.weights),
        means,
        covariance,
    )?)
}

/// Reads the JSON description of a network written by `steer train` (not its weights).
pub fn read_network_spec(path: &Path) -> Result<NetworkSpec> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read network file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a network description written by `steer train`",
            path.display()
        )
    })
}

/// Reads an `N × d` float64 or float32 array (a 1-D array is read as `N × 1`).
pub fn read_samples(path: &Path) -> Result<Array2<f64>> {
    let open = || fs::File::open(path).with_context(|| format!("cannot open {}", path.display()));
    let column = |v: Array1<f64>| {
        let n = v.len();
        v.into_shape_with_order((n, 1)).expect("n × 1")
    };
    let x = if let Ok(x) = Array2::<f64>::read_npy(open()?) {
        x
    } else if let Ok(x) = Array2::<f32>::read_npy(open()?) {
        x.mapv(f64::from)
    } else if let Ok(v) = Array1::<f64>::read_npy(open()?) {
        column(v)
    } else if let Ok(v) = Array1::<f32>::read_npy(open()?) {
        column(v.mapv(f64::from))
    } else {
        bail!(
            "{} is not a float64 or float32 .npy array of 1 or 2 dimensions",
            path.display()
        );
    };
    if x.nrows() == 0 {
        bail!("{} holds no samples", path.display());
    }
    if let Some(pos) = x.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: entry {} (row {}) is not finite",
            path.display(),
            pos,
            pos / x.ncols().max(1)
        );
    }
    Ok(x)
}

/// Reads class labels: a 1-D (or `n × 1`) `.npy` array of integers or of integral floats,
/// each in `0..=255`.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let open = || fs::File::open(path).with_context(|| format!("cannot open {}", path.display()));
    fn flat<T: Copy>(a: ndarray::ArrayD<T>) -> Option<Vec<T>> {
        match a.shape() {
            [_] | [_, 1] => Some(a.iter().copied().collect()),
            _ => None,
        }
    }
    macro_rules! try_read {
        ($($t:ty),*) => {
            $(
                if let Ok(a) = ndarray::ArrayD::<$t>::read_npy(open()?) {
                    let Some(v) = flat(a) else {
                        bail!("{} must be a 1-D array of labels (n or n × 1)", path.display());
                    };
                    return v
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| {
                            let f = x as f64;
                            if f.fract() == 0.0 && (0.0..=255.0).contains(&f) {
                                Ok(f as u8)
                            } else {
                                bail!(
                                    "{}: entry {i} = {f} is not a class label (an integer in 0..=255)",
                                    path.display()
                                )
                            }
                        })
                        .collect();
                }
            )*
        };
    }
    try_read!(i64, i32, i16, i8, u64, u32, u16, u8, f64, f32);
    bail!(
        "{} is not a .npy array of integer or float labels",
        path.display()
    )
}

/// Reads a 1-D float64 array.
pub fn read_vector(path: &Path) -> Result<Array1<f64>> {
    let f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Array1::<f64>::read_npy(f)
        .with_context(|| format!("{} is not a 1-D float64 .npy array", path.display()))
}

/// Writes a float64 array as `.npy`.
pub fn write_npy<A: WriteNpyExt>(path: &Path, a: &A) -> Result<()> {
    let f = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    a.write_npy(std::io::BufWriter::new(f))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// An output folder filled in a temporary sibling and renamed into place by [`commit`],
/// so that a failed run leaves nothing behind.
///
/// [`commit`]: Staging::commit
pub struct Staging {
    dir: Option<tempfile::TempDir>,
    target: PathBuf,
}

impl Staging {
    /// Prepares to write `target`; refuses to replace a non-empty folder that is not a
    /// previous steer output (one holding `summary.json`).
    pub fn new(target: &Path) -> Result<Self> {
        if target.exists() {
            let is_dir = target.is_dir();
            let empty = is_dir && fs::read_dir(target)?.next().is_none();
            if !is_dir || !(empty || target.join("summary.json").exists()) {
                bail!(
                    "output folder {} exists and is not a previous steer output (no summary.json); choose another --out",
                    target.display()
                );
            }
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(".steer-tmp-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
        Ok(Staging {
            dir: Some(dir),
            target: target.to_path_buf(),
        })
    }

    /// Path of `name` inside the staging folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.as_ref().expect("not committed").path().join(name)
    }

    /// Moves the staged folder to its target, replacing a previous output.
    pub fn commit(mut self) -> Result<PathBuf> {
        let dir = self.dir.take().expect("not committed").keep();
        if self.target.exists() {
            fs::remove_dir_all(&self.target)
                .with_context(|| format!("cannot replace {}", self.target.display()))?;
        }
        fs::rename(&dir, &self.target)
            .with_context(|| format!("cannot move output to {}", self.target.display()))?;
        Ok(self.target.clone())
    }
}

/// Writes a single file atomically (temporary sibling, then rename).
pub fn write_file_atomically(target: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".steer-tmp-")
        .suffix(".npy")
        .tempfile_in(&parent)
        .with_context(|| format!("cannot create a temporary file in {}", parent.display()))?;
    write(tmp.path())?;
    tmp.persist(target)
        .with_context(|| format!("cannot write {}", target.display()))?;
    Ok(())
}
