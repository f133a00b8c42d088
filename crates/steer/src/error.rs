//! The library's error type: every variant names what went wrong and where (field, step, shape).

use thiserror::Error;

/// Everything that can go wrong in the steer library.
#[derive(Debug, Error)]
pub enum Error {
    /// A configuration or model parameter is invalid; `field` names it.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// Name (or dotted path) of the offending field.
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Two objects that must agree in dimension do not.
    #[error("dimension mismatch in {context}: expected {expected}, found {found}")]
    Dimension {
        /// What was being combined.
        context: String,
        /// The dimension required.
        expected: usize,
        /// The dimension found.
        found: usize,
    },
    /// A covariance matrix is not symmetric positive definite.
    #[error("`{field}`: component {component} is not positive definite ({reason})")]
    NotPositiveDefinite {
        /// Field holding the matrix.
        field: String,
        /// Mixture component index.
        component: usize,
        /// Detail (pivot, asymmetry).
        reason: String,
    },
    /// A NaN or infinite value appeared during a run.
    #[error("non-finite {what} at step {step} (particle {particle})")]
    NonFinite {
        /// Sampling step index (0-based) at which it appeared.
        step: usize,
        /// What quantity was non-finite (score, log-weight increment, position, ...).
        what: &'static str,
        /// First offending particle.
        particle: usize,
    },
    /// Every particle has zero weight.
    #[error("all particle weights are zero at step {step}")]
    Degenerate {
        /// Sampling step index (0-based).
        step: usize,
    },
    /// A file could not be read or written, or its contents are malformed.
    #[error("{}: {reason}", file_location(.path, *.line))]
    File {
        /// The file concerned.
        path: std::path::PathBuf,
        /// 1-based line number, when the problem is on one line of a text file.
        line: Option<usize>,
        /// What went wrong.
        reason: String,
    },
    /// The tensor backend of learned models (candle) failed.
    #[error("tensor backend: {0}")]
    Backend(String),
    /// A method or target needs something a model cannot provide.
    #[error("{0}")]
    Unsupported(String),
}

/// `path` or `path:line`, for [`Error::File`] messages.
fn file_location(path: &std::path::Path, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

/// Result alias for the steer library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::File`].
    pub fn file(
        path: impl Into<std::path::PathBuf>,
        line: Option<usize>,
        reason: impl Into<String>,
    ) -> Self {
        Error::File {
            path: path.into(),
            line,
            reason: reason.into(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Backend(e.to_string())
    }
}
