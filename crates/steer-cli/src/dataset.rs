//! `steer data`: data sets for learned models, written as `.npy` files. Nothing is ever
//! downloaded: the data come from a local file (scikit-learn ships the digits in its wheel).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use ndarray::Array1;
use serde_json::json;
use steer::data::{DIGIT_CLASSES, DIGIT_MAX_INTENSITY, DIGIT_PIXELS, read_digits};

use crate::io;

/// Asks the installed scikit-learn where its copy of the digits lies.
const SKLEARN_SCRIPT: &str = "import sklearn, os; print(os.path.join(os.path.dirname(sklearn.__file__), 'datasets', 'data', 'digits.csv.gz'))";

/// The digits file relative to a workspace: its sibling `shared/data` folder.
const SHARED: &str = "../shared/data/digits.csv.gz";

/// `steer data digits`: writes `images.npy` (n × 64 float64, raw intensities 0..16),
/// `labels.npy` (n int64), `class-<c>.npy` per class and `summary.json` to `out`.
pub fn digits(out: &Path, source: Option<&Path>) -> Result<()> {
    let path = match source {
        Some(p) => {
            if !p.is_file() {
                bail!("--source {}: no such file", p.display());
            }
            p.to_path_buf()
        }
        None => find_digits()?,
    };
    let digits = read_digits(&path).with_context(|| format!("reading {}", path.display()))?;
    let staging = io::Staging::new(out)?;
    io::write_npy(&staging.path("images.npy"), &digits.images)?;
    let labels: Array1<i64> = digits.labels.iter().map(|&c| i64::from(c)).collect();
    io::write_npy(&staging.path("labels.npy"), &labels)?;
    let mut counts = Vec::new();
    for c in 0..DIGIT_CLASSES {
        let class = digits.of_class(c as u8);
        counts.push(class.len());
        if !class.is_empty() {
            io::write_npy(&staging.path(&format!("class-{c}.npy")), &class.images)?;
        }
    }
    let summary = json!({
        "data_set": "digits",
        "source": path.display().to_string(),
        "images": digits.len(),
        "dimension": DIGIT_PIXELS,
        "image": [8, 8],
        "pixel_range": [0.0, DIGIT_MAX_INTENSITY],
        "class_counts": counts,
        "files": {
            "images.npy": "n × 64 float64, raw pixel intensities 0..16, row-major 8 × 8",
            "labels.npy": "n int64, the digit 0..9",
            "class-<c>.npy": "the images of digit c",
        },
    });
    std::fs::write(
        staging.path("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let out = staging.commit()?;
    eprintln!(
        "{} digit images from {}; wrote {}",
        digits.len(),
        path.display(),
        out.display()
    );
    Ok(())
}

/// Finds scikit-learn's `digits.csv.gz`: `$STEER_DIGITS`, the installed scikit-learn's copy,
/// then `../shared/data/digits.csv.gz` from the current folder and from the executable's
/// workspace. The error lists every place tried.
fn find_digits() -> Result<PathBuf> {
    if let Some(v) = std::env::var_os("STEER_DIGITS").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "STEER_DIGITS = {} is not a file (unset it to search the default places)",
            p.display()
        );
    }
    let mut tried = vec!["$STEER_DIGITS (not set)".to_string()];
    match sklearn_copy() {
        Ok(p) if p.is_file() => return Ok(p),
        Ok(p) => tried.push(format!("scikit-learn's copy {} (missing)", p.display())),
        Err(reason) => tried.push(format!("scikit-learn via python3 ({reason})")),
    }
    let mut candidates = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join(SHARED));
    }
    match executable_workspace() {
        Some(ws) => candidates.push(ws.join(SHARED)),
        None => tried.push("the executable's workspace (no Cargo.lock above it)".into()),
    }
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        tried.push(format!("{} (missing)", c.display()));
    }
    bail!(
        "cannot find scikit-learn's digits.csv.gz (nothing is downloaded); tried:\n  - {}\nInstall scikit-learn (`pip install scikit-learn`), set STEER_DIGITS, or pass --source PATH",
        tried.join("\n  - ")
    )
}

/// The path the installed scikit-learn reports for its digits file, or why there is none.
fn sklearn_copy() -> std::result::Result<PathBuf, String> {
    let output = Command::new("python3")
        .args(["-c", SKLEARN_SCRIPT])
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("failed").trim().to_string();
        return Err(last);
    }
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if text.is_empty() {
        return Err("printed no path".into());
    }
    Ok(PathBuf::from(text))
}

/// The workspace the running executable was built in: the nearest ancestor of its folder
/// holding a `Cargo.lock` (e.g. the root above `target/release/steer`).
fn executable_workspace() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .find(|d| d.join("Cargo.lock").is_file())
        .map(Path::to_path_buf)
}
