//! End-to-end tests of the `steer` binary: every bad input is a clear error (naming the file
//! and field) with a non-zero exit code and no output left behind; valid runs write the
//! documented files.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

const STEER: &str = env!("CARGO_BIN_EXE_steer");

/// A valid two-mode 2-D mixture.
const MIXTURE: &str =
    r#"{"weights": [0.4, 0.6], "means": [[-2.0, 0.0], [2.0, 0.0]], "isotropic": [0.3, 0.3]}"#;

/// A valid small run: 50 particles, 20 steps, tilted toward the right-hand mode.
fn config_text(mixture: &str) -> String {
    format!(
        r#"method = "g-smc"
particles = 50
steps = 20
seed = 3

[schedule]
kind = "vp-linear"

[[experts]]
model = {{ kind = "gmm", file = "{mixture}" }}

[reward]
kind = "quadratic"
centre = [2.0, 0.0]
strength = 0.5
"#
    )
}

/// A temporary folder holding a config, its mixture files and the output folder.
struct Case {
    dir: TempDir,
}

impl Case {
    /// A folder with the valid `mix.json` and `config.toml`.
    fn new() -> Self {
        let case = Case {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        case.write("mix.json", MIXTURE);
        case.write("config.toml", &config_text("mix.json"));
        case
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).expect("write");
        p
    }

    fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    fn out(&self) -> PathBuf {
        self.path("out")
    }

    /// `steer sample --config config.toml --out out` plus `extra`.
    fn sample(&self, extra: &[&str]) -> Output {
        self.sample_with(&self.config(), extra)
    }

    fn sample_with(&self, config: &Path, extra: &[&str]) -> Output {
        let mut cmd = Command::new(STEER);
        cmd.arg("sample")
            .arg("--config")
            .arg(config)
            .arg("--out")
            .arg(self.out())
            .args(extra);
        cmd.output().expect("run steer")
    }

    /// Replaces the config with the valid one edited by `edit`.
    fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        self.write("config.toml", &edit(config_text("mix.json")));
    }

    /// Entries of the folder whose names start with the staging prefix.
    fn leftovers(&self) -> Vec<String> {
        fs::read_dir(self.dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".steer-tmp-"))
            .collect()
    }

    /// The run failed, stderr names every needle, and neither `out` nor a staging folder exists.
    fn assert_fails(&self, output: &Output, needles: &[&str]) -> String {
        let stderr = assert_failed(output, needles);
        assert!(
            !self.out().exists(),
            "output folder left behind after a failed run; stderr:\n{stderr}"
        );
        self.assert_no_leftovers();
        stderr
    }

    fn assert_no_leftovers(&self) {
        let left = self.leftovers();
        assert!(left.is_empty(), "staging leftovers: {left:?}");
    }
}

/// Non-zero exit and every needle in stderr; returns stderr.
fn assert_failed(output: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "expected failure, got success; stderr:\n{stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "stderr does not mention {n:?}:\n{stderr}"
        );
    }
    stderr
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "steer failed; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// Writes a little-endian float64 C-order `.npy` file of the given shape.
fn write_npy(path: &Path, shape: &[usize], data: &[f64]) {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let shape_text = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    fs::write(path, bytes).expect("write npy");
}

fn samples(n: usize, d: usize) -> Vec<f64> {
    (0..n * d)
        .map(|i| ((i * 37) % 11) as f64 / 5.0 - 1.0)
        .collect()
}

fn read_summary(out: &Path) -> Value {
    let text = fs::read_to_string(out.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

// ---------------------------------------------------------------------------------------
// Bad mixture files.

#[test]
fn non_positive_definite_full_covariance() {
    let case = Case::new();
    let bad = case.write(
        "bad.json",
        r#"{"weights": [0.5, 0.5], "means": [[-2, 0], [2, 0]],
            "covariances": [[[1, 0], [0, 1]], [[1, 2], [2, 1]]]}"#,
    );
    case.edit_config(|c| c.replace("mix.json", "bad.json"));
    let out = case.sample(&[]);
    let err = case.assert_fails(
        &out,
        &[
            &show(&bad),
            "experts[0].model.file",
            "covariances",
            "positive definite",
        ],
    );
    assert!(err.contains("component 1"), "{err}");
}

#[test]
fn negative_weight() {
    let case = Case::new();
    let bad = case.write(
        "bad.json",
        r#"{"weights": [-0.5, 1.5], "means": [[-2, 0], [2, 0]], "isotropic": [1, 1]}"#,
    );
    case.edit_config(|c| c.replace("mix.json", "bad.json"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&bad), "weights[0]"]);
}

#[test]
fn weights_not_summing_to_one() {
    let case = Case::new();
    let bad = case.write(
        "bad.json",
        r#"{"weights": [0.5, 0.6], "means": [[-2, 0], [2, 0]], "isotropic": [1, 1]}"#,
    );
    case.edit_config(|c| c.replace("mix.json", "bad.json"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&bad), "`weights`", "sum to 1"]);
}

#[test]
fn means_of_different_lengths_in_one_file() {
    let case = Case::new();
    let bad = case.write(
        "bad.json",
        r#"{"weights": [0.5, 0.5], "means": [[-2, 0], [2, 0, 1]], "isotropic": [1, 1]}"#,
    );
    case.edit_config(|c| c.replace("mix.json", "bad.json"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&bad), "means[1]"]);
}

#[test]
fn covariance_of_wrong_dimension_in_one_file() {
    let case = Case::new();
    let bad = case.write(
        "bad.json",
        r#"{"weights": [1.0], "means": [[0, 0]], "diagonal": [[1, 1, 1]]}"#,
    );
    case.edit_config(|c| c.replace("mix.json", "bad.json"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&bad), "diagonal[0]"]);
}

#[test]
fn dimension_mismatch_between_expert_files() {
    let case = Case::new();
    let three = case.write(
        "three.json",
        r#"{"weights": [1.0], "means": [[0, 0, 0]], "isotropic": [1]}"#,
    );
    case.edit_config(|c| {
        c + r#"
[[experts]]
model = { kind = "gmm", file = "three.json" }
"#
    });
    let out = case.sample(&[]);
    case.assert_fails(
        &out,
        &[
            &show(&case.config()),
            "experts[1].model.file",
            &show(&three),
            "mix.json",
        ],
    );
}

#[test]
fn dimension_mismatch_between_reward_centre_and_model() {
    let case = Case::new();
    case.edit_config(|c| c.replace("centre = [2.0, 0.0]", "centre = [2.0, 0.0, 0.0]"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&case.config()), "reward.centre", "dimension"]);
}

#[test]
fn dimension_mismatch_between_reward_file_and_model() {
    let case = Case::new();
    case.write(
        "three.json",
        r#"{"weights": [1.0], "means": [[0, 0, 0]], "isotropic": [1]}"#,
    );
    case.edit_config(|c| {
        c.replace(
            "kind = \"quadratic\"\ncentre = [2.0, 0.0]\nstrength = 0.5",
            "kind = \"mixture\"\nfile = \"three.json\"",
        )
    });
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&case.config()), "reward.file", "dimension"]);
}

#[test]
fn infinite_number_in_mixture_file() {
    // 1e400 overflows f64; serde_json rejects it rather than reading +inf.
    let case = Case::new();
    let bad = case.write(
        "bad.json",
        r#"{"weights": [0.5, 0.5], "means": [[-2, 0], [2, 1e400]], "isotropic": [1, 1]}"#,
    );
    case.edit_config(|c| c.replace("mix.json", "bad.json"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&bad), "out of range", "line 1"]);
}

#[test]
fn nan_in_mixture_file() {
    // JSON has no NaN literal: the file is rejected as invalid JSON, naming the file.
    let case = Case::new();
    let bad = case.write(
        "bad.json",
        r#"{"weights": [0.5, 0.5], "means": [[-2, 0], [2, NaN]], "isotropic": [1, 1]}"#,
    );
    case.edit_config(|c| c.replace("mix.json", "bad.json"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&bad), "invalid mixture file", "line 1"]);
}

#[test]
fn unknown_field_in_mixture_file() {
    let case = Case::new();
    let bad = case.write(
        "bad.json",
        r#"{"weights": [1.0], "means": [[0, 0]], "isotropic": [1], "colour": "red"}"#,
    );
    case.edit_config(|c| c.replace("mix.json", "bad.json"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&bad), "colour"]);
}

#[test]
fn missing_mixture_file() {
    let case = Case::new();
    case.edit_config(|c| c.replace("mix.json", "absent.json"));
    let out = case.sample(&[]);
    case.assert_fails(
        &out,
        &[&show(&case.path("absent.json")), "experts[0].model.file"],
    );
}

// ---------------------------------------------------------------------------------------
// Bad configs.

#[test]
fn missing_config_file() {
    let case = Case::new();
    let absent = case.path("absent.toml");
    let out = case.sample_with(&absent, &[]);
    case.assert_fails(&out, &[&show(&absent)]);
}

#[test]
fn unknown_top_level_field() {
    let case = Case::new();
    case.edit_config(|c| c.replace("seed = 3", "seed = 3\npartcles = 10"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&case.config()), "unknown field `partcles`"]);
}

#[test]
fn unknown_nested_field() {
    let case = Case::new();
    case.edit_config(|c| {
        c.replace(
            "kind = \"vp-linear\"",
            "kind = \"vp-linear\"\nbetamax = 10.0",
        )
    });
    let out = case.sample(&[]);
    case.assert_fails(
        &out,
        &[&show(&case.config()), "unknown field `betamax`", "schedule"],
    );
}

#[test]
fn nan_in_config() {
    let case = Case::new();
    case.edit_config(|c| c.replace("strength = 0.5", "strength = nan"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&case.config()), "reward.strength"]);
}

#[test]
fn infinity_in_config() {
    let case = Case::new();
    case.edit_config(|c| {
        c.replace(
            "kind = \"vp-linear\"",
            "kind = \"vp-linear\"\nbeta_max = inf",
        )
    });
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&case.config()), "schedule.beta_max"]);
}

#[test]
fn zero_particles() {
    let case = Case::new();
    case.edit_config(|c| c.replace("particles = 50", "particles = 0"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&case.config()), "`particles`"]);
}

#[test]
fn zero_steps() {
    let case = Case::new();
    case.edit_config(|c| c.replace("steps = 20", "steps = 0"));
    let out = case.sample(&[]);
    case.assert_fails(&out, &[&show(&case.config()), "`steps`"]);
}

#[test]
fn set_with_a_bad_value() {
    let case = Case::new();
    let out = case.sample(&["--set", "particles=many"]);
    case.assert_fails(&out, &[&show(&case.config()), "particles", "many"]);

    let out = case.sample(&["--set", "particles=0"]);
    case.assert_fails(&out, &[&show(&case.config()), "`particles`"]);

    let out = case.sample(&["--set", "reward.strength=-1"]);
    case.assert_fails(&out, &[&show(&case.config()), "reward.strength"]);

    let out = case.sample(&["--set", "schedule.betamax=3"]);
    case.assert_fails(&out, &["unknown field `betamax`", "schedule"]);

    let out = case.sample(&["--set", "particles"]);
    case.assert_fails(&out, &["--set `particles`", "key=value"]);
}

// ---------------------------------------------------------------------------------------
// Bad reference files, eval and reference.

#[test]
fn reference_file_of_wrong_dimension() {
    let case = Case::new();
    let reference = case.path("ref3.npy");
    write_npy(&reference, &[10, 3], &samples(10, 3));
    let out = case.sample(&["--reference", &show(&reference)]);
    case.assert_fails(&out, &[&show(&reference), "dimension 3"]);
}

#[test]
fn missing_reference_file() {
    let case = Case::new();
    let reference = case.path("absent.npy");
    let out = case.sample(&["--reference", &show(&reference)]);
    case.assert_fails(&out, &[&show(&reference)]);
}

#[test]
fn reference_file_with_nan() {
    let case = Case::new();
    let reference = case.path("ref.npy");
    let mut x = samples(10, 2);
    x[7] = f64::NAN;
    write_npy(&reference, &[10, 2], &x);
    let out = case.sample(&["--reference", &show(&reference)]);
    case.assert_fails(&out, &[&show(&reference), "not finite", "row 3"]);
}

#[test]
fn eval_with_mismatched_dimensions() {
    let case = Case::new();
    let (a, b) = (case.path("a.npy"), case.path("b.npy"));
    write_npy(&a, &[20, 2], &samples(20, 2));
    write_npy(&b, &[20, 3], &samples(20, 3));
    let out = Command::new(STEER)
        .arg("eval")
        .arg("--samples")
        .arg(&a)
        .arg("--reference")
        .arg(&b)
        .output()
        .expect("run steer");
    assert_failed(&out, &[&show(&a), &show(&b), "dimension"]);
    assert!(out.stdout.is_empty(), "eval printed output on failure");
}

#[test]
fn eval_with_log_weights_of_wrong_length() {
    let case = Case::new();
    let (a, b, w) = (case.path("a.npy"), case.path("b.npy"), case.path("w.npy"));
    write_npy(&a, &[20, 2], &samples(20, 2));
    write_npy(&b, &[20, 2], &samples(20, 2));
    write_npy(&w, &[19], &[0.0; 19]);
    let out = Command::new(STEER)
        .arg("eval")
        .arg("--samples")
        .arg(&a)
        .arg("--log-weights")
        .arg(&w)
        .arg("--reference")
        .arg(&b)
        .output()
        .expect("run steer");
    assert_failed(&out, &[&show(&w), "19 weights for 20 samples"]);
}

#[test]
fn reference_with_zero_samples() {
    let case = Case::new();
    let target = case.path("ref.npy");
    let out = Command::new(STEER)
        .arg("reference")
        .arg("--config")
        .arg(case.config())
        .arg("--out")
        .arg(&target)
        .arg("--samples")
        .arg("0")
        .output()
        .expect("run steer");
    assert_failed(&out, &["--samples"]);
    assert!(!target.exists());
    case.assert_no_leftovers();
}

#[test]
fn reference_with_bad_config() {
    let case = Case::new();
    case.edit_config(|c| c.replace("mix.json", "absent.json"));
    let target = case.path("ref.npy");
    let out = Command::new(STEER)
        .arg("reference")
        .arg("--config")
        .arg(case.config())
        .arg("--out")
        .arg(&target)
        .arg("--samples")
        .arg("100")
        .output()
        .expect("run steer");
    assert_failed(&out, &[&show(&case.path("absent.json"))]);
    assert!(!target.exists());
    case.assert_no_leftovers();
}

// ---------------------------------------------------------------------------------------
// Output folders.

#[test]
fn existing_foreign_output_folder_is_not_clobbered() {
    let case = Case::new();
    fs::create_dir(case.out()).unwrap();
    fs::write(case.out().join("keep.txt"), "mine").unwrap();
    let out = case.sample(&[]);
    assert_failed(&out, &[&show(&case.out()), "not a previous steer output"]);
    assert_eq!(
        fs::read_to_string(case.out().join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(fs::read_dir(case.out()).unwrap().count(), 1);
    case.assert_no_leftovers();
}

#[test]
fn existing_file_as_output_is_not_clobbered() {
    let case = Case::new();
    fs::write(case.out(), "mine").unwrap();
    let out = case.sample(&[]);
    assert_failed(&out, &[&show(&case.out())]);
    assert_eq!(fs::read_to_string(case.out()).unwrap(), "mine");
    case.assert_no_leftovers();
}

#[test]
fn numerical_failure_during_a_run_names_the_step_and_leaves_no_output() {
    // A finite but absurd reward strength overflows the log-weight increments mid-run, after
    // the staging folder exists.
    let case = Case::new();
    let out = case.sample(&["--set", "reward.strength=1e300"]);
    let err = case.assert_fails(&out, &["non-finite", "at step "]);
    assert!(err.contains("particle"), "{err}");
}

#[test]
fn failed_run_keeps_the_previous_output() {
    let case = Case::new();
    assert_success(&case.sample(&[]));
    let before = fs::read(case.out().join("samples.npy")).unwrap();
    let out = case.sample(&["--set", "reward.strength=1e300"]);
    assert_failed(&out, &["at step "]);
    assert_eq!(fs::read(case.out().join("samples.npy")).unwrap(), before);
    assert!(case.out().join("summary.json").exists());
    case.assert_no_leftovers();
}

// ---------------------------------------------------------------------------------------
// Valid runs.

#[test]
fn valid_run_writes_every_output() {
    let case = Case::new();
    let out = case.sample(&[]);
    assert_success(&out);
    let dir = case.out();
    for f in [
        "samples.npy",
        "log_weights.npy",
        "summary.json",
        "trace.csv",
        "samples.png",
        "trace.png",
    ] {
        let meta = fs::metadata(dir.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(meta.len() > 0, "{f} is empty");
    }
    let summary = read_summary(&dir);
    for key in [
        "method",
        "particles",
        "steps",
        "seed",
        "evaluations",
        "wall_time_s",
        "final_ess_fraction",
        "log_normalizer",
    ] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}");
    }
    assert_eq!(summary["method"], "g-smc");
    assert_eq!(summary["particles"], 50);
    assert_eq!(summary["steps"], 20);
    assert_eq!(summary["seed"], 3);
    assert!(summary["evaluations"]["score"].as_u64().unwrap() >= 50 * 20);
    let ess = summary["final_ess_fraction"].as_f64().unwrap();
    assert!(ess > 0.0 && ess <= 1.0, "final ESS fraction {ess}");
    assert!(summary["log_normalizer"].as_f64().unwrap().is_finite());
    assert!(summary.get("metrics").is_none());

    let trace = fs::read_to_string(dir.join("trace.csv")).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    assert!(lines[0].starts_with("step,t,num_particles,ess_fraction"));
    assert_eq!(lines.len(), 1 + 20, "header + one row per step");
    for (k, line) in lines[1..].iter().enumerate() {
        assert!(line.starts_with(&format!("{k},")), "row {k}: {line}");
    }

    // 50 × 2 float64 samples and 50 log-weights: header + 800 and header + 400 bytes.
    let npy_payload = |f: &str| {
        let b = fs::read(dir.join(f)).unwrap();
        assert_eq!(&b[..6], b"\x93NUMPY");
        let header = u16::from_le_bytes([b[8], b[9]]) as usize;
        b.len() - 10 - header
    };
    assert_eq!(npy_payload("samples.npy"), 50 * 2 * 8);
    assert_eq!(npy_payload("log_weights.npy"), 50 * 8);
    case.assert_no_leftovers();
}

#[test]
fn plots_can_be_switched_off() {
    let case = Case::new();
    case.edit_config(|c| c + "\n[output]\nplots = false\n");
    assert_success(&case.sample(&[]));
    assert!(case.out().join("summary.json").exists());
    assert!(!case.out().join("samples.png").exists());
    assert!(!case.out().join("trace.png").exists());
}

#[test]
fn exact_reference_adds_metrics() {
    let case = Case::new();
    let out = case.sample(&["--reference", "exact", "--reference-samples", "2000"]);
    assert_success(&out);
    let summary = read_summary(&case.out());
    let m = &summary["metrics"];
    assert!(m["mmd"].as_f64().unwrap().is_finite());
    let tv = m["mode_weight_tv"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&tv), "mode TV {tv}");
    assert_eq!(m["reference_samples"], 2000);
}

#[test]
fn set_overrides_the_config() {
    let case = Case::new();
    let out = case.sample(&["--set", "particles=64", "--set", "method=pg"]);
    assert_success(&out);
    let summary = read_summary(&case.out());
    assert_eq!(summary["particles"], 64);
    assert_eq!(summary["method"], "pg");
    let trace = fs::read_to_string(case.out().join("trace.csv")).unwrap();
    assert!(trace.lines().nth(1).unwrap().starts_with("0,"));
    assert!(trace.lines().nth(1).unwrap().split(',').nth(2) == Some("64"));
}

#[test]
fn rerun_replaces_a_previous_output() {
    let case = Case::new();
    assert_success(&case.sample(&[]));
    fs::write(case.out().join("stale.txt"), "old").unwrap();
    assert_success(&case.sample(&["--set", "particles=64"]));
    assert!(!case.out().join("stale.txt").exists());
    assert_eq!(read_summary(&case.out())["particles"], 64);
    case.assert_no_leftovers();
}

#[test]
fn same_seed_gives_identical_samples() {
    let case = Case::new();
    assert_success(&case.sample(&[]));
    let first = fs::read(case.out().join("samples.npy")).unwrap();
    let first_w = fs::read(case.out().join("log_weights.npy")).unwrap();
    assert_success(&case.sample(&[]));
    assert_eq!(fs::read(case.out().join("samples.npy")).unwrap(), first);
    assert_eq!(
        fs::read(case.out().join("log_weights.npy")).unwrap(),
        first_w
    );
    assert_success(&case.sample(&["--set", "seed=4"]));
    assert_ne!(fs::read(case.out().join("samples.npy")).unwrap(), first);
}

#[test]
fn reference_then_eval_end_to_end() {
    let case = Case::new();
    assert_success(&case.sample(&[]));
    let reference = case.path("ref.npy");
    let out = Command::new(STEER)
        .arg("reference")
        .arg("--config")
        .arg(case.config())
        .arg("--out")
        .arg(&reference)
        .arg("--samples")
        .arg("500")
        .output()
        .expect("run steer");
    assert_success(&out);
    let info: Value = serde_json::from_slice(&out.stdout).expect("reference prints JSON");
    assert_eq!(info["method"], "exact");
    assert_eq!(info["samples"], 500);
    let bytes = fs::read(&reference).unwrap();
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!(bytes.len() - 10 - header, 500 * 2 * 8);
    case.assert_no_leftovers();

    let out = Command::new(STEER)
        .arg("eval")
        .arg("--samples")
        .arg(case.out().join("samples.npy"))
        .arg("--log-weights")
        .arg(case.out().join("log_weights.npy"))
        .arg("--reference")
        .arg(&reference)
        .output()
        .expect("run steer");
    assert_success(&out);
    let metrics: Value = serde_json::from_slice(&out.stdout).expect("eval prints JSON");
    let mmd = metrics["mmd"].as_f64().expect("mmd");
    assert!(mmd.is_finite());
    assert!(metrics.get("sliced_wasserstein").is_some());
}

// ---------------------------------------------------------------------------------------
// steer bench.

impl Case {
    /// `steer bench --config config.toml --out out` plus `extra`.
    fn bench(&self, extra: &[&str]) -> Output {
        Command::new(STEER)
            .arg("bench")
            .arg("--config")
            .arg(self.config())
            .arg("--out")
            .arg(self.out())
            .args(extra)
            .output()
            .expect("run steer")
    }
}

/// Two methods × two particle counts × two seeds, exact reference. The config resamples
/// when the ESS is low, which `vcg` must drop (it never resamples), and has a `[driftlite]`
/// section, which `g-smc` must drop.
const BENCH: &[&str] = &[
    "--methods",
    "g-smc,vcg",
    "--particles",
    "32,64",
    "--seeds",
    "2",
    "--reference",
    "exact",
    "--reference-samples",
    "500",
];

#[test]
fn bench_writes_every_output() {
    let case = Case::new();
    case.edit_config(|c| {
        c + "\n[resampling]\nwhen = \"ess\"\nthreshold = 0.9\n\n[driftlite]\nridge = 1e-6\n"
    });
    let out = case.bench(BENCH);
    assert_success(&out);
    let dir = case.out();
    for f in [
        "results.jsonl",
        "table.md",
        "summary.json",
        "potential_variance.png",
        "ess.png",
        "metrics.png",
    ] {
        let meta = fs::metadata(dir.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(meta.len() > 0, "{f} is empty");
    }
    case.assert_no_leftovers();

    let text = fs::read_to_string(dir.join("results.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 8, "2 methods × 2 N × 2 seeds");
    let mut seen = Vec::new();
    for r in &lines {
        for key in [
            "method",
            "particles",
            "seed",
            "steps",
            "wall_time_s",
            "final_ess_fraction",
            "min_ess_fraction",
            "resampling_events",
            "log_normalizer",
            "integrated_potential_variance",
            "integrated_uncontrolled_variance",
        ] {
            assert!(r.get(key).is_some(), "results.jsonl lacks {key}: {r}");
        }
        for key in [
            "score",
            "divergence",
            "log_density",
            "reward_value",
            "reward_gradient",
            "reward_laplacian",
        ] {
            assert!(r["evaluations"][key].is_u64(), "no evaluations.{key}: {r}");
        }
        for key in [
            "mmd",
            "sliced_wasserstein",
            "energy_distance",
            "mean_error",
            "covariance_error",
            "mode_weight_tv",
        ] {
            assert!(r["metrics"][key].is_f64(), "no metrics.{key}: {r}");
        }
        assert_eq!(r["metrics"]["reference_samples"], 500);
        assert_eq!(r["steps"], 20);
        let method = r["method"].as_str().unwrap().to_string();
        let n = r["particles"].as_u64().unwrap();
        let seed = r["seed"].as_u64().unwrap();
        assert!(n == 32 || n == 64, "{r}");
        assert!(
            seed == 3 || seed == 4,
            "seeds are the config's 3 and 4: {r}"
        );
        assert!(r["evaluations"]["score"].as_u64().unwrap() >= n * 20);
        if method == "vcg" {
            assert_eq!(r["resampling_events"], 0, "vcg never resamples: {r}");
            assert!(r["integrated_uncontrolled_variance"].is_f64(), "{r}");
        } else {
            assert_eq!(method, "g-smc");
            assert!(r["integrated_uncontrolled_variance"].is_null(), "{r}");
        }
        seen.push((method, n, seed));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8, "every method × N × seed once");

    let table = fs::read_to_string(dir.join("table.md")).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(
        rows.len(),
        2 + 4,
        "header, rule and one row per method × N:\n{table}"
    );
    assert!(
        rows[0].contains("MMD") && rows[0].contains("best reward") && rows[0].contains("wall time"),
        "{table}"
    );
    for (row, (method, n)) in
        rows[2..]
            .iter()
            .zip([("g-smc", 32), ("g-smc", 64), ("vcg", 32), ("vcg", 64)])
    {
        assert!(
            row.starts_with(&format!("| {method} | {n} |")),
            "row {row:?} in\n{table}"
        );
        // MMD, SWD, mode TV, best reward, final ESS, wall time.
        assert_eq!(row.matches('±').count(), 6, "mean ± std in {row:?}");
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        table,
        "stdout is the table"
    );

    let summary = read_summary(&dir);
    assert_eq!(summary["command"], "bench");
    assert_eq!(summary["runs"], 8);

    // A second bench replaces the first.
    assert_success(&case.bench(&[
        "--methods",
        "pg",
        "--particles",
        "16",
        "--seeds",
        "1",
        "--reference",
        "exact",
        "--reference-samples",
        "200",
    ]));
    let table = fs::read_to_string(dir.join("table.md")).unwrap();
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(!table.contains('±'), "one seed has no std:\n{table}");
    case.assert_no_leftovers();
}

#[test]
fn bench_without_reference_has_no_metrics() {
    let case = Case::new();
    assert_success(&case.bench(&["--methods", "pg", "--particles", "16", "--seeds", "2"]));
    let table = fs::read_to_string(case.out().join("table.md")).unwrap();
    assert!(
        table.lines().nth(2).unwrap().contains("| — | — | — |"),
        "{table}"
    );
    assert!(case.out().join("ess.png").exists());
    assert!(!case.out().join("metrics.png").exists());
}

#[test]
fn bench_with_an_unknown_method_leaves_no_output() {
    let case = Case::new();
    let out = case.bench(&[
        "--methods",
        "g-smc,nope",
        "--particles",
        "16",
        "--seeds",
        "1",
    ]);
    case.assert_fails(&out, &["--methods", "nope", "is unknown"]);
}

#[test]
fn bench_rejects_bad_lists() {
    let case = Case::new();
    for (args, needles) in [
        (
            &["--methods", "", "--particles", "16"][..],
            &["--methods"][..],
        ),
        (
            &["--methods", "pg,pg", "--particles", "16"],
            &["--methods", "pg twice"],
        ),
        (
            &["--methods", "pg", "--particles", "16,0"],
            &["--particles", "at least 1"],
        ),
        (
            &["--methods", "pg", "--particles", "16,x"],
            &["--particles"],
        ),
        (
            &["--methods", "pg", "--particles", "16", "--seeds", "0"],
            &["--seeds"],
        ),
        (&["--particles", "16"], &["--methods"]),
        (&["--methods", "pg"], &["--particles"]),
    ] {
        let out = case.bench(args);
        case.assert_fails(&out, needles);
    }
}

#[test]
fn bench_run_failure_names_the_run_and_leaves_no_output() {
    let case = Case::new();
    let out = case.bench(&[
        "--methods",
        "g-smc",
        "--particles",
        "16",
        "--seeds",
        "1",
        "--set",
        "reward.strength=1e300",
    ]);
    case.assert_fails(&out, &["g-smc N=16 seed 3", "at step "]);
}

// ---------------------------------------------------------------------------------------
// steer train, network experts, classifier rewards, image output, steer data.

/// `steer` with `args`, run in `dir`.
fn steer_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(STEER)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run steer")
}

/// Writes a little-endian C-order `.npy` file of type `descr` (e.g. `<i8`) from raw bytes.
fn write_npy_raw(path: &Path, descr: &str, shape: &[usize], payload: &[u8]) {
    let shape_text = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(payload);
    fs::write(path, bytes).expect("write npy");
}

/// The header of a `.npy` file (dtype and shape).
fn npy_header(path: &Path) -> String {
    let b = fs::read(path).unwrap_or_else(|_| panic!("{} missing", show(path)));
    assert_eq!(&b[..6], b"\x93NUMPY");
    let len = u16::from_le_bytes([b[8], b[9]]) as usize;
    String::from_utf8_lossy(&b[10..10 + len]).into_owned()
}

/// Width and height of a PNG file.
fn png_size(path: &Path) -> (u32, u32) {
    let b = fs::read(path).unwrap_or_else(|_| panic!("{} missing", show(path)));
    assert_eq!(&b[1..4], b"PNG");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

/// 2-D training data: 256 base samples of [`MIXTURE`], drawn by `steer sample`.
fn mixture_data(dir: &Path) -> PathBuf {
    fs::write(dir.join("mix.json"), MIXTURE).unwrap();
    fs::write(
        dir.join("gen.toml"),
        r#"method = "base"
particles = 256
steps = 10
seed = 1

[schedule]
kind = "vp-linear"

[[experts]]
model = { kind = "gmm", file = "mix.json" }

[output]
plots = false
"#,
    )
    .unwrap();
    let out = steer_in(dir, &["sample", "--config", "gen.toml", "--out", "gen"]);
    assert_success(&out);
    dir.join("gen/samples.npy")
}

const TRAIN_SCORE: &str = r#"data = "gen/samples.npy"

[schedule]
kind = "vp-linear"

[architecture]
hidden = 32
blocks = 1

[training]
steps = 30
batch = 64
eval_every = 10
"#;

/// A score network trained once per test run on [`mixture_data`] (30 steps) and the
/// folder it was trained in; shared by the tests below.
fn trained_network() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("steer-cli-network");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        mixture_data(&dir);
        fs::write(dir.join("train.toml"), TRAIN_SCORE).unwrap();
        let out = steer_in(&dir, &["train", "--config", "train.toml", "--out", "net"]);
        assert_success(&out);
        dir
    })
}

/// A sampling config on the shared trained network (absolute path).
fn network_config(extra: &str) -> String {
    let model = trained_network().join("net/model.json");
    format!(
        r#"method = "g-smc"
particles = 32
steps = 10
seed = 2

[schedule]
kind = "vp-linear"

[[experts]]
model = {{ kind = "network", file = '{}' }}
{extra}"#,
        model.display()
    )
}

#[test]
fn train_writes_the_model_loss_and_summary() {
    let dir = trained_network().join("net");
    for f in [
        "model.json",
        "model.safetensors",
        "loss.csv",
        "loss.png",
        "summary.json",
    ] {
        let meta = fs::metadata(dir.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(meta.len() > 0, "{f} is empty");
    }
    let model: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    assert_eq!(model["format"], "steer-network");
    assert_eq!(model["dim"], 2);
    assert_eq!(model["architecture"]["kind"], "mlp");
    assert_eq!(model["architecture"]["hidden"], 32);
    assert_eq!(model["weights"], "model.safetensors");
    assert!(model["tau_min"].as_f64().unwrap() > 0.0);
    let loss = fs::read_to_string(dir.join("loss.csv")).unwrap();
    let lines: Vec<&str> = loss.lines().collect();
    assert_eq!(lines[0], "step,train,heldout");
    assert_eq!(lines.len(), 1 + 3, "one row every 10 of 30 steps");
    assert!(lines[3].starts_with("30,"));
    let summary = read_summary(&dir);
    assert_eq!(summary["kind"], "score");
    assert_eq!(summary["steps"], 30);
    assert_eq!(summary["examples"], 256);
    assert!(summary["examples_per_second"].as_f64().unwrap() > 0.0);
    assert!(summary["final_heldout_loss"].as_f64().unwrap().is_finite());
}

#[test]
fn sample_from_a_trained_network() {
    let case = Case::new();
    // No schedule.tau_min: it defaults to the network's (τ = 0 would fail: σ = 0).
    case.write(
        "config.toml",
        &network_config("\n[reward]\nkind = \"quadratic\"\ncentre = [2.0, 0.0]\nstrength = 0.5\n"),
    );
    let out = case.sample(&[]);
    assert_success(&out);
    assert!(npy_header(&case.out().join("samples.npy")).contains("(32, 2)"));
    let summary = read_summary(&case.out());
    assert_eq!(summary["dimension"], 2);
    assert!(summary["log_normalizer"].as_f64().unwrap().is_finite());
    // A scatter plot: the samples are not images.
    assert_eq!(png_size(&case.out().join("samples.png")), (900, 700));
    case.assert_no_leftovers();
}

#[test]
fn image_samples_are_drawn_as_a_grid() {
    let case = Case::new();
    case.write(
        "config.toml",
        &network_config("\n[output]\nimage = [1, 2]\nimage_range = [-3, 3]\n"),
    );
    assert_success(&case.sample(&[]));
    let (w, h) = png_size(&case.out().join("samples.png"));
    // 32 images of 1 × 2 pixels (48-pixel blocks), 8 per row: 4 rows.
    assert_eq!((w, h), (8 * (96 + 6) + 6, 44 + 4 * (48 + 6) + 6));
}

#[test]
fn image_shape_must_match_the_dimension() {
    let case = Case::new();
    case.edit_config(|c| c + "\n[output]\nimage = [3, 3]\n");
    case.assert_fails(&case.sample(&[]), &["output.image", "dimension 2"]);
    case.edit_config(|c| c + "\n[output]\nimage_range = [0, 1]\n");
    case.assert_fails(&case.sample(&[]), &["output.image_range"]);
}

#[test]
fn exact_reference_is_refused_for_networks() {
    let case = Case::new();
    case.write("config.toml", &network_config(""));
    case.assert_fails(
        &case.sample(&["--reference", "exact"]),
        &["--reference exact", "experts[0]", "no closed form"],
    );
}

#[test]
fn missing_network_file() {
    let case = Case::new();
    case.edit_config(|c| {
        c.replace(
            r#"kind = "gmm", file = "mix.json""#,
            r#"kind = "network", file = "nowhere.json""#,
        )
    });
    case.assert_fails(
        &case.sample(&[]),
        &["experts[0].model.file", "nowhere.json"],
    );
}

#[test]
fn network_and_reward_of_different_dimensions() {
    let case = Case::new();
    case.write(
        "config.toml",
        &network_config(
            "\n[reward]\nkind = \"quadratic\"\ncentre = [1.0, 0.0, 0.0]\nstrength = 1.0\n",
        ),
    );
    case.assert_fails(&case.sample(&[]), &["dimension mismatch", "reward.centre"]);
}

#[test]
fn network_and_mixture_of_different_dimensions() {
    let case = Case::new();
    case.write(
        "mix3.json",
        r#"{"weights": [1.0], "means": [[0, 0, 0]], "isotropic": [1.0]}"#,
    );
    let model = trained_network().join("net/model.json");
    case.edit_config(|c| {
        let c = c
            .replace("mix.json", "mix3.json")
            .replace("centre = [2.0, 0.0]", "centre = [2.0, 0.0, 0.0]");
        c + &format!(
            "\n[[experts]]\nmodel = {{ kind = \"network\", file = '{}' }}\n",
            model.display()
        )
    });
    case.assert_fails(
        &case.sample(&[]),
        &["dimension mismatch", "experts[1].model.file"],
    );
}

/// A folder with 2-D mixture data for `steer train`.
fn train_case() -> Case {
    let case = Case::new();
    let x = samples(40, 2);
    write_npy(&case.path("x.npy"), &[40, 2], &x);
    case
}

impl Case {
    /// `steer train --config <name> --out out`.
    fn train(&self, config: &str, extra: &[&str]) -> Output {
        Command::new(STEER)
            .arg("train")
            .arg("--config")
            .arg(self.path(config))
            .arg("--out")
            .arg(self.out())
            .args(extra)
            .output()
            .expect("run steer")
    }
}

const TRAIN_TINY: &str =
    "data = \"x.npy\"\n\n[schedule]\nkind = \"vp-linear\"\n\n[training]\nsteps = 5\n";

#[test]
fn train_with_a_missing_data_file() {
    let case = train_case();
    case.write("t.toml", &TRAIN_TINY.replace("x.npy", "absent.npy"));
    case.assert_fails(&case.train("t.toml", &[]), &["`data`", "absent.npy"]);
}

#[test]
fn train_with_an_unknown_field() {
    let case = train_case();
    case.write("t.toml", &(TRAIN_TINY.to_string() + "learning_rat = 0.1\n"));
    case.assert_fails(&case.train("t.toml", &[]), &["learning_rat", "t.toml"]);
    case.write("t.toml", &(TRAIN_TINY.to_string() + "stepz = 3\n"));
    case.assert_fails(&case.train("t.toml", &[]), &["stepz"]);
    case.write(
        "t.toml",
        &TRAIN_TINY.replace("[training]\n", "[training]\nepochs = 3\n"),
    );
    case.assert_fails(&case.train("t.toml", &[]), &["training.epochs", "score"]);
}

#[test]
fn train_with_an_unknown_architecture_kind() {
    let case = train_case();
    case.write(
        "t.toml",
        &(TRAIN_TINY.to_string() + "\n[architecture]\nkind = \"transformer\"\n"),
    );
    case.assert_fails(
        &case.train("t.toml", &[]),
        &["architecture.kind", "transformer", "mlp or unet"],
    );
    case.write(
        "t.toml",
        &(TRAIN_TINY.to_string() + "\n[architecture]\nkind = \"unet\"\n"),
    );
    case.assert_fails(&case.train("t.toml", &[]), &["architecture.height"]);
}

#[test]
fn train_with_bad_settings() {
    let case = train_case();
    case.assert_fails(
        &case.train_with_set(&["training.steps=0"]),
        &["training.steps"],
    );
    case.assert_fails(
        &case.train_with_set(&["training.heldout_fraction=0.7"]),
        &["training.heldout_fraction"],
    );
    case.assert_fails(
        &case.train_with_set(&["schedule.eta=0.5"]),
        &["schedule.eta"],
    );
    case.assert_fails(&case.train_with_set(&["kind=gan"]), &["kind", "gan"]);
    case.write("t.toml", "data = \"x.npy\"\n");
    case.assert_fails(&case.train("t.toml", &[]), &["[schedule]"]);
}

impl Case {
    fn train_with_set(&self, sets: &[&str]) -> Output {
        self.write("t.toml", TRAIN_TINY);
        let extra: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
        self.train("t.toml", &extra)
    }
}

const TRAIN_CLASSIFIER: &str = "kind = \"classifier\"\ndata = \"x.npy\"\nlabels = \"y.npy\"\n\n[architecture]\nhidden = [8]\n\n[training]\nepochs = 3\n";

#[test]
fn classifier_labels_of_the_wrong_length() {
    let case = train_case();
    let labels: Vec<u8> = (0..39i64).flat_map(|i| (i % 2).to_le_bytes()).collect();
    write_npy_raw(&case.path("y.npy"), "<i8", &[39], &labels);
    case.write("t.toml", TRAIN_CLASSIFIER);
    case.assert_fails(
        &case.train("t.toml", &[]),
        &["`labels`", "y.npy", "39 entries", "40 rows"],
    );
    // Non-integral labels.
    write_npy(&case.path("y.npy"), &[40], &vec![0.5; 40]);
    case.assert_fails(&case.train("t.toml", &[]), &["y.npy", "not a class label"]);
    // A missing labels field.
    case.write(
        "t.toml",
        &TRAIN_CLASSIFIER.replace("labels = \"y.npy\"\n", ""),
    );
    case.assert_fails(&case.train("t.toml", &[]), &["`labels` is required"]);
}

#[test]
fn classifier_training_and_reward() {
    let case = train_case();
    // Labels: the sign of the first coordinate, as int64.
    let x = samples(40, 2);
    let labels: Vec<u8> = (0..40)
        .flat_map(|i| i64::from(x[2 * i] > 0.0).to_le_bytes())
        .collect();
    write_npy_raw(&case.path("y.npy"), "<i8", &[40], &labels);
    case.write("t.toml", TRAIN_CLASSIFIER);
    assert_success(&case.train("t.toml", &[]));
    let dir = case.out();
    for f in [
        "model.json",
        "model.safetensors",
        "loss.csv",
        "loss.png",
        "summary.json",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let summary = read_summary(&dir);
    assert_eq!(summary["kind"], "classifier");
    assert_eq!(summary["classes"], 2);
    assert!(summary["heldout_accuracy"].as_f64().is_some());
    let loss = fs::read_to_string(dir.join("loss.csv")).unwrap();
    assert_eq!(loss.lines().count(), 1 + 3, "header + one row per epoch");

    // Steer the mixture towards class 1 with the classifier.
    fs::rename(&dir, case.path("clf")).unwrap();
    case.edit_config(|c| {
        c.replace(
            "kind = \"quadratic\"\ncentre = [2.0, 0.0]\nstrength = 0.5",
            "kind = \"classifier\"\nfile = \"clf/model.json\"\nclass = 1\nscale = 2.0",
        )
    });
    assert_success(&case.sample(&[]));
    let summary = read_summary(&case.out());
    assert!(
        summary["search"]["best_reward"]
            .as_f64()
            .unwrap()
            .is_finite()
    );
    fs::remove_dir_all(case.out()).unwrap();
    // A class the classifier does not have.
    case.assert_fails(
        &case.sample(&["--set", "reward.class=5"]),
        &["reward.class"],
    );
    // A missing classifier file.
    case.assert_fails(
        &case.sample(&["--set", "reward.file=\"gone.json\""]),
        &["reward.file", "gone.json"],
    );
}

/// A tiny digits file: `rows` lines of 64 pixels and a label.
fn digits_csv(rows: usize) -> String {
    (0..rows)
        .map(|i| {
            let mut v: Vec<String> = (0..64).map(|p| ((i + p) % 17).to_string()).collect();
            v.push((i % 10).to_string());
            v.join(",") + "\n"
        })
        .collect()
}

#[test]
fn data_digits_writes_npy_files() {
    let case = Case::new();
    case.write("digits.csv", &digits_csv(12));
    let out = steer_in(
        case.dir.path(),
        &["data", "digits", "--out", "out", "--source", "digits.csv"],
    );
    assert_success(&out);
    let dir = case.out();
    assert!(npy_header(&dir.join("images.npy")).contains("'<f8'"));
    assert!(npy_header(&dir.join("images.npy")).contains("(12, 64)"));
    assert!(npy_header(&dir.join("labels.npy")).contains("'<i8'"));
    assert!(npy_header(&dir.join("labels.npy")).contains("(12,)"));
    assert!(npy_header(&dir.join("class-1.npy")).contains("(2, 64)"));
    assert!(npy_header(&dir.join("class-9.npy")).contains("(1, 64)"));
    let summary = read_summary(&dir);
    assert_eq!(summary["images"], 12);
    assert_eq!(summary["source"], "digits.csv");
    // Rerunning replaces the previous output.
    assert_success(&steer_in(
        case.dir.path(),
        &["data", "digits", "--out", "out", "--source", "digits.csv"],
    ));
    case.assert_no_leftovers();
}

#[test]
fn data_digits_from_the_shared_copy() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/digits.csv.gz");
    if !shared.exists() {
        eprintln!("{} not found; skipping", show(&shared));
        return;
    }
    let case = Case::new();
    let out = Command::new(STEER)
        .args(["data", "digits", "--out"])
        .arg(case.out())
        .arg("--source")
        .arg(&shared)
        .output()
        .unwrap();
    assert_success(&out);
    assert!(npy_header(&case.out().join("images.npy")).contains("(1797, 64)"));
    assert_eq!(read_summary(&case.out())["images"], 1797);
}

#[test]
fn data_digits_bad_sources() {
    let case = Case::new();
    let out = steer_in(
        case.dir.path(),
        &[
            "data",
            "digits",
            "--out",
            "out",
            "--source",
            "missing.csv.gz",
        ],
    );
    case.assert_fails(&out, &["--source", "missing.csv.gz"]);
    // A malformed file: the error names the file and the line.
    case.write("bad.csv", &(digits_csv(2) + "1,2,3\n"));
    let out = steer_in(
        case.dir.path(),
        &["data", "digits", "--out", "out", "--source", "bad.csv"],
    );
    case.assert_fails(&out, &["bad.csv", "3"]);
}

#[test]
fn data_digits_from_the_environment() {
    let case = Case::new();
    let source = case.write("digits.csv", &digits_csv(3));
    let out = Command::new(STEER)
        .args(["data", "digits", "--out"])
        .arg(case.out())
        .env("STEER_DIGITS", &source)
        .output()
        .unwrap();
    assert_success(&out);
    assert_eq!(read_summary(&case.out())["images"], 3);
    fs::remove_dir_all(case.out()).unwrap();
    let out = Command::new(STEER)
        .args(["data", "digits", "--out"])
        .arg(case.out())
        .env("STEER_DIGITS", case.path("absent.csv.gz"))
        .output()
        .unwrap();
    case.assert_fails(&out, &["STEER_DIGITS", "absent.csv.gz"]);
}

// ---------------------------------------------------------------------------------------
// Doob's matching: steer train kind = "doob", method = "doob", URGE's Doob proposal.

/// A tiny h-network for [`MIXTURE`] tilted by the reward of [`config_text`], trained on 512
/// exact base samples (200 steps).
const TRAIN_DOOB: &str = r#"kind = "doob"
model = { kind = "gmm", file = "mix.json" }
samples = 512

[schedule]
kind = "vp-linear"

[reward]
kind = "quadratic"
centre = [2.0, 0.0]
strength = 0.5

[architecture]
hidden = 16
blocks = 1
embedding = 4

[training]
loss = "penalised"
pairs = "fixed"
steps = 200
batch = 64
eval_every = 50
"#;

/// The h-network of [`TRAIN_DOOB`], trained once per test run; its `doob.json`.
fn trained_doob() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("steer-cli-doob");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("mix.json"), MIXTURE).unwrap();
        fs::write(dir.join("train.toml"), TRAIN_DOOB).unwrap();
        let out = steer_in(&dir, &["train", "--config", "train.toml", "--out", "h"]);
        assert_success(&out);
        dir.join("h/doob.json")
    })
}

/// `steer sample` on the valid config with 400 particles, 40 steps, `--reference exact` and
/// `--set` for each of `sets`; its summary. The output folder is removed afterwards.
fn sample_summary(case: &Case, sets: &[&str]) -> Value {
    let mut extra = vec![
        "--reference",
        "exact",
        "--set",
        "particles=400",
        "--set",
        "steps=40",
    ];
    extra.extend(sets.iter().flat_map(|s| ["--set", s]));
    let out = case.sample(&extra);
    assert_success(&out);
    let summary = read_summary(&case.out());
    fs::remove_dir_all(case.out()).unwrap();
    summary
}

fn metric(summary: &Value, name: &str) -> f64 {
    summary["metrics"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("metrics.{name} missing: {summary}"))
}

#[test]
fn doob_train_writes_the_h_network_loss_and_summary() {
    let dir = trained_doob().parent().unwrap().to_path_buf();
    for f in [
        "doob.json",
        "doob.safetensors",
        "loss.csv",
        "loss.png",
        "summary.json",
    ] {
        let meta = fs::metadata(dir.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(meta.len() > 0, "{f} is empty");
    }
    let spec: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("doob.json")).unwrap()).unwrap();
    assert_eq!(spec["format"], "steer-doob");
    assert_eq!(spec["dim"], 2);
    assert_eq!(spec["weights"], "doob.safetensors");
    assert_eq!(spec["architecture"]["hidden"], 16);
    assert_eq!(spec["schedule"]["kind"], "vp-linear");
    let loss = fs::read_to_string(dir.join("loss.csv")).unwrap();
    let lines: Vec<&str> = loss.lines().collect();
    assert_eq!(lines[0], "step,train,heldout");
    assert_eq!(lines.len(), 1 + 4, "one row every 50 of 200 steps");
    assert!(lines[4].starts_with("200,"));
    let s = read_summary(&dir);
    assert_eq!(s["kind"], "doob");
    assert_eq!(s["base_samples"], "exact");
    assert_eq!(s["examples"], 512);
    assert_eq!(
        s["train_examples"].as_u64().unwrap() + s["heldout_examples"].as_u64().unwrap(),
        512
    );
    assert_eq!(s["dimension"], 2);
    assert_eq!(s["reward"], "quadratic");
    assert_eq!(s["loss"], "penalised");
    assert_eq!(s["pairs"], "fixed");
    assert_eq!(
        s["score_levels"],
        Value::Null,
        "only with the unbiased loss"
    );
    assert_eq!(s["steps"], 200);
    assert_eq!(s["batch"], 64);
    assert_eq!(s["model"], "doob.json");
    assert!(s["parameters"].as_u64().unwrap() > 0);
    // r = −¼|x − c|² ≤ 0, and some base sample lies near c.
    let r_max = s["reward_max"].as_f64().unwrap();
    assert!((-0.5..=0.0).contains(&r_max), "reward_max {r_max}");
    assert!(s["training_seconds"].as_f64().unwrap() > 0.0);
    assert!(s["examples_per_second"].as_f64().unwrap() > 0.0);
    let (train, heldout) = (
        s["final_train_loss"].as_f64().unwrap(),
        s["final_heldout_loss"].as_f64().unwrap(),
    );
    // Y = e^{r − max r} ∈ (0, 1]: a mean squared error above 1 would be no fit at all.
    assert!(train > 0.0 && train < 0.5 && heldout > 0.0 && heldout < 0.5);
    assert!(s["lambda_gp"].as_f64().unwrap() >= 0.0);
}

#[test]
fn doob_train_from_a_data_file_with_the_unbiased_loss() {
    let case = train_case();
    let config = TRAIN_DOOB
        .replace("samples = 512", "data = \"x.npy\"")
        .replace(
            "loss = \"penalised\"",
            "loss = \"unbiased\"\nlambda_gp = 0.3\nscore_levels = 4",
        )
        .replace("steps = 200", "steps = 20")
        .replace("eval_every = 50", "eval_every = 10");
    case.write("t.toml", &config);
    assert_success(&case.train("t.toml", &[]));
    let s = read_summary(&case.out());
    assert_eq!(s["base_samples"], "data");
    assert_eq!(s["examples"], 40);
    assert_eq!(s["loss"], "unbiased");
    assert_eq!(s["score_levels"], 4);
    assert!(s["data"].as_str().unwrap().ends_with("x.npy"));
    fs::remove_dir_all(case.out()).unwrap();
    // Without the base model there is no score for the unbiased loss.
    case.write(
        "t.toml",
        &config.replace("model = { kind = \"gmm\", file = \"mix.json\" }\n", ""),
    );
    case.assert_fails(
        &case.train("t.toml", &[]),
        &["training.loss", "unbiased", "`model"],
    );
}

#[test]
fn doob_train_rejects_bad_configs() {
    let case = train_case();
    case.write("t.toml", TRAIN_DOOB);
    let fails = |sets: &[&str], needles: &[&str]| {
        let extra: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
        case.assert_fails(&case.train("t.toml", &extra), needles);
    };
    fails(
        &["training.loss=huber"],
        &["training.loss", "huber", "penalised or unbiased"],
    );
    fails(&["training.pairs=some"], &["training.pairs", "some"]);
    fails(&["training.lambda_gp=-1"], &["training.lambda_gp"]);
    fails(
        &["training.score_levels=4"],
        &["training.score_levels", "unbiased"],
    );
    fails(&["training.epochs=3"], &["training.epochs", "doob"]);
    fails(
        &["architecture.kind=unet"],
        &["architecture.kind", "unet", "mlp"],
    );
    fails(&["data=x.npy"], &["`data`", "`samples`"]);
    fails(&["samples=1"], &["`samples`", "at least 2"]);
    fails(&["sampler_steps=10"], &["sampler_steps", "network"]);
    fails(
        &["reward.schedule=power"],
        &["reward.schedule", "sampling setting"],
    );
    fails(
        &["reward.centre=[1.0, 0.0, 0.0]"],
        &["dimension mismatch", "reward.centre"],
    );
    fails(&["schedule.eta=0.5"], &["schedule.eta"]);
    fails(&["model.file=absent.json"], &["model.file", "absent.json"]);
    case.write("t.toml", &TRAIN_DOOB.replace("samples = 512\n", ""));
    case.assert_fails(&case.train("t.toml", &[]), &["`data`", "`samples`"]);
    case.write(
        "t.toml",
        &TRAIN_DOOB.replace("model = { kind = \"gmm\", file = \"mix.json\" }\n", ""),
    );
    case.assert_fails(&case.train("t.toml", &[]), &["`samples`", "`model`"]);
    let no_reward = TRAIN_DOOB.replace(
        "[reward]\nkind = \"quadratic\"\ncentre = [2.0, 0.0]\nstrength = 0.5\n",
        "",
    );
    case.write("t.toml", &no_reward);
    case.assert_fails(&case.train("t.toml", &[]), &["[reward]", "required"]);
    // Doob fields for the other kinds.
    case.write(
        "t.toml",
        &TRAIN_TINY.replace("[training]\n", "[training]\nlambda_gp = 0.1\n"),
    );
    case.assert_fails(&case.train("t.toml", &[]), &["training.lambda_gp", "score"]);
    case.write("t.toml", &format!("samples = 10\n{TRAIN_TINY}"));
    case.assert_fails(&case.train("t.toml", &[]), &["`samples`", "doob"]);
}

#[test]
fn doob_with_the_exact_h_reaches_the_tilted_target() {
    let case = Case::new();
    let base = sample_summary(&case, &["method=base"]);
    let doob = sample_summary(&case, &["method=doob"]);
    // The tilt moves the mass to the right-hand mode (reference weight 0.98, base 0.6).
    assert!(metric(&base, "mean_error") > 1.0, "{base}");
    assert!(metric(&base, "mode_weight_tv") > 0.3, "{base}");
    assert!(metric(&doob, "mean_error") < 0.3, "{doob}");
    assert!(metric(&doob, "mode_weight_tv") < 0.05, "{doob}");
    // One h-function call per particle and step, no reward call, unweighted output.
    assert_eq!(doob["evaluations"]["h_function"], 400 * 40);
    assert_eq!(doob["evaluations"]["reward_value"], 0);
    assert_eq!(base["evaluations"]["h_function"], 0);
    assert_eq!(doob["output"], "sampling: unweighted particles");
    // URGE with the exact Doob proposal and twist: nearly constant weights.
    let urge = sample_summary(&case, &["method=urge", "urge.proposal=doob"]);
    assert!(urge["final_ess_fraction"].as_f64().unwrap() > 0.7, "{urge}");
    assert!(metric(&urge, "mode_weight_tv") < 0.05, "{urge}");
    assert!(urge["evaluations"]["h_function"].as_u64().unwrap() >= 400 * 40);
    let log_z = urge["log_normalizer"].as_f64().unwrap();
    let exact = urge["log_normalizer_exact"].as_f64().unwrap();
    assert!(
        (log_z - exact).abs() < 0.1,
        "log Ẑ {log_z} vs log Z {exact}"
    );
    // VCG-SMC on the Doob path: with the exact h its potential is O(Δt), so the weights stay
    // nearly flat where VCG-SMC on the reward path moves them; one h call at t_k and one at
    // t_{k+1} per particle and step, and the reward once at the end.
    let path = sample_summary(&case, &["method=vcg-smc", "driftlite.proposal=doob"]);
    let reward_path = sample_summary(&case, &["method=vcg-smc"]);
    assert!(metric(&path, "mode_weight_tv") < 0.05, "{path}");
    assert_eq!(path["evaluations"]["h_function"], 2 * 400 * 40);
    assert_eq!(path["evaluations"]["reward_value"], 400);
    assert_eq!(path["evaluations"]["reward_gradient"], 0);
    let ess = |s: &Value| s["final_ess_fraction"].as_f64().unwrap();
    assert!(ess(&path) > 0.95, "{path}");
    assert!(ess(&path) > ess(&reward_path), "{path} vs {reward_path}");
    let log_z = path["log_normalizer"].as_f64().unwrap();
    assert!(
        (log_z - exact).abs() < 0.1,
        "log Ẑ {log_z} vs log Z {exact}"
    );
}

#[test]
fn doob_with_a_learned_h() {
    let h = trained_doob();
    let case = Case::new();
    // No schedule.tau_min: it defaults to the h-network's.
    case.edit_config(|c| c + &format!("\n[doob]\nh = '{}'\n", h.display()));
    let learned = sample_summary(&case, &["method=doob"]);
    assert_eq!(learned["evaluations"]["h_function"], 400 * 40);
    let weights = |s: &Value| s["metrics"]["mode_weights"][1].as_f64().unwrap();
    // The base puts 0.6 on the right-hand mode, the target 0.98: the tiny network gets most
    // of the way (its error is the regression's; URGE below removes it).
    assert!(weights(&learned) > 0.75, "{learned}");
    let exact = sample_summary(&case, &["method=doob", "doob.h=exact"]);
    assert!(weights(&exact) > weights(&learned) - 0.05);
    let urge = sample_summary(&case, &["method=urge", "urge.proposal=doob"]);
    assert!(urge["final_ess_fraction"].as_f64().unwrap() > 0.3, "{urge}");
    assert!(weights(&urge) > 0.9, "{urge}");
    // The Doob twist with another proposal; clip settings are accepted.
    let twist = sample_summary(
        &case,
        &[
            "method=urge",
            "urge.twist=doob",
            "doob.h_min=0.01",
            "doob.g_max=20",
        ],
    );
    assert!(twist["evaluations"]["h_function"].as_u64().unwrap() > 0);
}

#[test]
fn doob_section_errors() {
    let h = trained_doob();
    let case = Case::new();
    // [doob] for a method that does not use it.
    case.edit_config(|c| c + "\n[doob]\nh = \"exact\"\n");
    case.assert_fails(&case.sample(&["--set", "method=pg"]), &["[doob]", "method"]);
    case.assert_fails(
        &case.sample(&["--set", "method=urge", "--set", "urge.proposal=guided"]),
        &["[doob]"],
    );
    // The DriftLite Doob proposal: unknown proposal, refinement, a norm clip, and
    // driftlite.proposal inside URGE's controlled proposal.
    case.assert_fails(
        &case.sample(&["--set", "method=vcg", "--set", "driftlite.proposal=tweedie"]),
        &["driftlite.proposal", "tweedie"],
    );
    case.assert_fails(
        &case.sample(&[
            "--set",
            "method=vcg",
            "--set",
            "driftlite.proposal=doob",
            "--set",
            "driftlite.passes=2",
        ]),
        &["driftlite.passes"],
    );
    case.assert_fails(
        &case.sample(&[
            "--set",
            "method=vcg-smc",
            "--set",
            "driftlite.proposal=doob",
            "--set",
            "doob.g_max=5",
        ]),
        &["doob.g_max"],
    );
    case.assert_fails(
        &case.sample(&[
            "--set",
            "method=urge",
            "--set",
            "urge.proposal=vcg",
            "--set",
            "driftlite.proposal=doob",
        ]),
        &["driftlite.proposal"],
    );
    // Unknown field, bad clip.
    case.assert_fails(
        &case.sample(&["--set", "method=doob", "--set", "doob.hmin=0.1"]),
        &["hmin"],
    );
    case.assert_fails(
        &case.sample(&["--set", "method=doob", "--set", "doob.h_min=-1"]),
        &["doob.h_min"],
    );
    case.assert_fails(
        &case.sample(&["--set", "method=doob", "--set", "doob.g_max=0"]),
        &["doob.g_max"],
    );
    // A missing h file.
    case.assert_fails(
        &case.sample(&["--set", "method=doob", "--set", "doob.h=nowhere.json"]),
        &["doob.h", "nowhere.json"],
    );
    // The learned h of another schedule.
    let learned = format!("doob.h='{}'", h.display());
    case.assert_fails(
        &case.sample(&[
            "--set",
            "method=doob",
            "--set",
            &learned,
            "--set",
            "schedule.beta_max=10",
        ]),
        &["doob.h", "doob.json", "schedule"],
    );
    // No closed form for the exact h: an annealed expert, or a network expert.
    case.assert_fails(
        &case.sample(&[
            "--set",
            "method=doob",
            "--set",
            "experts=[{model = {kind = \"gmm\", file = \"mix.json\"}, gamma = 2.0}]",
        ]),
        &["doob.h", "exact", "experts[0].gamma"],
    );
    // An h-network of another dimension.
    case.write(
        "mix3.json",
        r#"{"weights": [1.0], "means": [[0, 0, 0]], "isotropic": [1.0]}"#,
    );
    case.edit_config(|c| {
        c.replace("mix.json", "mix3.json")
            .replace("centre = [2.0, 0.0]", "centre = [2.0, 0.0, 0.0]")
            + &format!("\n[doob]\nh = '{}'\n", h.display())
    });
    case.assert_fails(
        &case.sample(&["--set", "method=doob"]),
        &["dimension mismatch", "doob.h", "doob.json"],
    );
}

#[test]
fn bench_runs_doob_beside_other_methods() {
    let case = Case::new();
    case.edit_config(|c| c + "\n[doob]\nh = \"exact\"\n");
    let out = case.bench(&[
        "--methods",
        "pg,doob,urge:urge.proposal=doob",
        "--particles",
        "50",
        "--seeds",
        "1",
    ]);
    assert_success(&out);
    let results = fs::read_to_string(case.out().join("results.jsonl")).unwrap();
    let runs: Vec<Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 3);
    let h_calls: Vec<u64> = runs
        .iter()
        .map(|r| r["evaluations"]["h_function"].as_u64().unwrap())
        .collect();
    assert_eq!(h_calls[0], 0, "pg drops [doob]");
    assert_eq!(h_calls[1], 50 * 20);
    assert!(h_calls[2] > 0);
}
