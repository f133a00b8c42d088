//! Data sets for learned models: scikit-learn's handwritten digits.
//!
//! `digits.csv.gz` (shipped in scikit-learn's wheel as `sklearn/datasets/data/digits.csv.gz`)
//! holds 1797 rows of 65 comma-separated numbers: the 64 pixel intensities `0..=16` of an 8×8
//! image in row-major order, then the label `0..=9`. [`read_digits`] reads it (gzip or plain
//! text, detected from the content), and [`Digits::split`] makes a deterministic stratified
//! train/test split from a seed.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use ndarray::{Array2, Axis};
use rand::RngExt;

use crate::error::{Error, Result};
use crate::rng::{Purpose, Streams};

/// Pixels per digit image (8 × 8).
pub const DIGIT_PIXELS: usize = 64;

/// Number of digit classes (0–9).
pub const DIGIT_CLASSES: usize = 10;

/// Largest pixel intensity in the digits data.
pub const DIGIT_MAX_INTENSITY: f64 = 16.0;

/// Stream step reserved for [`Digits::split`] (the particle index is the class).
const SPLIT_STREAM: usize = 0x5_1117;

/// A labelled set of 8×8 digit images.
#[derive(Clone, Debug, PartialEq)]
pub struct Digits {
    /// `n × 64` raw pixel intensities `0..=16`, one image per row, row-major 8×8.
    pub images: Array2<f64>,
    /// `n` labels `0..=9`.
    pub labels: Vec<u8>,
}

/// Reads scikit-learn's `digits.csv.gz` (or an uncompressed copy) from `path`.
///
/// Every non-empty line must hold 64 pixel values in `0..=16` and an integer label in
/// `0..=9`; errors name the file and the 1-based line.
///
/// ```no_run
/// let digits = steer::data::read_digits(std::path::Path::new("digits.csv.gz"))?;
/// assert_eq!(digits.images.ncols(), 64);
/// # Ok::<(), steer::Error>(())
/// ```
pub fn read_digits(path: &Path) -> Result<Digits> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, None, e.to_string()))?;
    let mut reader = BufReader::new(file);
    // gzip magic number 1f 8b: decompress; anything else is read as plain text.
    let gzip = reader
        .fill_buf()
        .map_err(|e| Error::file(path, None, e.to_string()))?
        .starts_with(&[0x1f, 0x8b]);
    let mut text = String::new();
    let read = if gzip {
        flate2::read::GzDecoder::new(reader).read_to_string(&mut text)
    } else {
        reader.read_to_string(&mut text)
    };
    read.map_err(|e| Error::file(path, None, e.to_string()))?;
    parse_digits(&text, path)
}

/// Parses the CSV text of the digits file; `path` only names the source in errors.
fn parse_digits(text: &str, path: &Path) -> Result<Digits> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let lineno = Some(index + 1);
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != DIGIT_PIXELS + 1 {
            return Err(Error::file(
                path,
                lineno,
                format!(
                    "expected {} comma-separated values (64 pixels and a label), found {}",
                    DIGIT_PIXELS + 1,
                    fields.len()
                ),
            ));
        }
        for (column, field) in fields[..DIGIT_PIXELS].iter().enumerate() {
            let v: f64 = field.parse().map_err(|_| {
                Error::file(
                    path,
                    lineno,
                    format!("pixel {column}: `{field}` is not a number"),
                )
            })?;
            if !(0.0..=DIGIT_MAX_INTENSITY).contains(&v) {
                return Err(Error::file(
                    path,
                    lineno,
                    format!("pixel {column}: {v} is outside 0..=16"),
                ));
            }
            pixels.push(v);
        }
        let label = fields[DIGIT_PIXELS];
        let parsed: f64 = label
            .parse()
            .map_err(|_| Error::file(path, lineno, format!("label `{label}` is not a number")))?;
        if parsed.fract() != 0.0 || !(0.0..DIGIT_CLASSES as f64).contains(&parsed) {
            return Err(Error::file(
                path,
                lineno,
                format!("label {parsed} is not an integer in 0..=9"),
            ));
        }
        labels.push(parsed as u8);
    }
    if labels.is_empty() {
        return Err(Error::file(path, None, "no data rows"));
    }
    let images = Array2::from_shape_vec((labels.len(), DIGIT_PIXELS), pixels)
        .expect("one row of 64 pixels per label");
    Ok(Digits { images, labels })
}

impl Digits {
    /// A labelled set from `n × d` images and `n` labels (lengths must agree).
    pub fn new(images: Array2<f64>, labels: Vec<u8>) -> Result<Self> {
        if images.nrows() != labels.len() {
            return Err(Error::Dimension {
                context: "digits: images rows vs labels".into(),
                expected: images.nrows(),
                found: labels.len(),
            });
        }
        Ok(Digits { images, labels })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images with label `class`, in their original order.
    pub fn of_class(&self, class: u8) -> Digits {
        let rows: Vec<usize> = (0..self.len())
            .filter(|&i| self.labels[i] == class)
            .collect();
        self.select(&rows)
    }

    /// The rows `rows` (in that order).
    pub fn select(&self, rows: &[usize]) -> Digits {
        Digits {
            images: self.images.select(Axis(0), rows),
            labels: rows.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// Deterministic stratified split into `(train, test)`.
    ///
    /// For every class with `n_c` images, `round(test_fraction · n_c)` of them, chosen
    /// uniformly at random (a partial Fisher–Yates shuffle driven by the stream
    /// `(Purpose::Other, split, class)` of `seed`), go to the test set; the rest train.
    /// Both sets keep the original row order, so the split depends only on the seed and
    /// the data. `test_fraction` must lie in `(0, 1)`.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Digits, Digits)> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::invalid(
                "test_fraction",
                format!("must lie in (0, 1), got {test_fraction}"),
            ));
        }
        let keyed = Streams::new(seed).keyed(Purpose::Other);
        let mut is_test = vec![false; self.len()];
        let max_label = self.labels.iter().copied().max().unwrap_or(0);
        for class in 0..=max_label {
            let mut members: Vec<usize> = (0..self.len())
                .filter(|&i| self.labels[i] == class)
                .collect();
            let take = (test_fraction * members.len() as f64).round() as usize;
            let mut rng = keyed.rng(SPLIT_STREAM, class as usize);
            for k in 0..take {
                let j = rng.random_range(k..members.len());
                members.swap(k, j);
                is_test[members[k]] = true;
            }
        }
        let (test, train): (Vec<usize>, Vec<usize>) = (0..self.len()).partition(|&i| is_test[i]);
        Ok((self.select(&train), self.select(&test)))
    }
}

/// scikit-learn's digits for tests: `$STEER_DIGITS`, else the workspace's sibling
/// `shared/data/digits.csv.gz`; `None` (the caller skips) when neither exists.
#[cfg(test)]
pub(crate) fn test_digits() -> Option<Digits> {
    let path = std::env::var_os("STEER_DIGITS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/digits.csv.gz")
        });
    if path.exists() {
        Some(read_digits(&path).unwrap())
    } else {
        eprintln!("{} not found (set STEER_DIGITS); skipping", path.display());
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_the_shared_digits_file() {
        let Some(d) = test_digits() else { return };
        assert_eq!(d.images.dim(), (1797, 64));
        assert_eq!(d.labels.len(), 1797);
        // First row of scikit-learn's digits: a zero.
        assert_eq!(d.labels[0], 0);
        assert_eq!(
            &d.images.row(0).to_vec()[..8],
            &[0., 0., 5., 13., 9., 1., 0., 0.]
        );
        let counts: Vec<usize> = (0..10).map(|c| d.of_class(c).len()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 1797);
        assert_eq!(counts[0], 178);
        assert!(d.images.iter().all(|&v| (0.0..=16.0).contains(&v)));
    }

    #[test]
    fn malformed_lines_are_reported_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let row = |label: &str| {
            let mut s = vec!["1"; 64].join(",");
            s.push(',');
            s.push_str(label);
            s
        };
        let cases = [
            (format!("{}\n{}\n", row("3"), "1,2,3"), 2, "found 3"),
            (format!("{}\n{}\n", row("3"), row("x")), 2, "label `x`"),
            (format!("{}\n{}\n", row("12"), row("3")), 1, "0..=9"),
            (
                format!("{}\n", row("3").replacen('1', "17", 1)),
                1,
                "outside",
            ),
        ];
        for (k, (text, line, needle)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("bad{k}.csv"));
            std::fs::File::create(&path)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let err = read_digits(&path).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, Error::File { line: Some(l), .. } if l == *line),
                "{msg}"
            );
            assert!(msg.contains(&format!("bad{k}.csv:{line}")), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
        // A plain (uncompressed) file is accepted.
        let good = dir.path().join("good.csv");
        std::fs::write(&good, format!("{}\n{}\n", row("3"), row("7"))).unwrap();
        let d = read_digits(&good).unwrap();
        assert_eq!(d.labels, vec![3, 7]);
        let missing = read_digits(&dir.path().join("missing.csv.gz")).unwrap_err();
        assert!(missing.to_string().contains("missing.csv.gz"));
    }

    /// The split is stratified (per-class test count = round(f · n_c)), disjoint, complete
    /// and reproducible; a different seed gives a different split.
    #[test]
    fn split_is_stratified_and_deterministic() {
        let n = 250;
        let images = Array2::from_shape_fn((n, 64), |(i, j)| (i * 64 + j) as f64);
        let labels: Vec<u8> = (0..n).map(|i| (i % 7 % 3) as u8).collect();
        let d = Digits::new(images, labels).unwrap();
        let (train, test) = d.split(0.2, 11).unwrap();
        assert_eq!(train.len() + test.len(), n);
        for c in 0..3 {
            let n_c = d.of_class(c).len();
            assert_eq!(test.of_class(c).len(), (0.2 * n_c as f64).round() as usize);
        }
        // Rows are identified by their first pixel; the two sets are disjoint.
        let ids = |s: &Digits| s.images.column(0).to_vec();
        let (a, b) = (ids(&train), ids(&test));
        assert!(a.iter().all(|v| !b.contains(v)));
        let (train2, test2) = d.split(0.2, 11).unwrap();
        assert_eq!((&train, &test), (&train2, &test2));
        let (_, test3) = d.split(0.2, 12).unwrap();
        assert_ne!(ids(&test), ids(&test3));
        assert!(d.split(0.0, 1).is_err());
        assert!(d.split(1.0, 1).is_err());
    }
}
