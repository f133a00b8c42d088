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
