//! `provider: cuda` on a machine where CUDA cannot be used (this one, and CI's): the operator
//! does not load and says why, unless its manifest says `fallback: cpu`. Run as processes of
//! their own, with `ORT_DYLIB_PATH` at the CPU build, so nothing is downloaded and the test
//! process's runtime stays the CPU one. (`scripts/gpu-check.sh` checks a real GPU.)

use std::path::Path;
use std::process::Command;

use crate::pipeline::{write_pipeline, write_texts};
use crate::util::{ferry_bin, fixture_model};

fn operators(dir: &Path, fallback: Option<&str>, cuda: &str) -> std::path::PathBuf {
    let ops = dir.join("operators");
    std::fs::create_dir_all(&ops).unwrap();
    let mut yaml = format!(
        "name: sentiment\ntask: classify_text\nmodel: {}\nprovider: cuda\n{cuda}",
        fixture_model("tiny-bert-sentiment")
    );
    if let Some(f) = fallback {
        yaml.push_str(&format!("fallback: {f}\n"));
    }
    std::fs::write(ops.join("sentiment.yaml"), yaml).unwrap();
    ops
}

fn run(dir: &Path, ops: &Path) -> (bool, String) {
    let input = dir.join("in.parquet");
    write_texts(&input, &[Some("a fine film"), Some("a dull one")]);
    let pipeline = write_pipeline(
        dir,
        &format!(
            "name: t\nsource:\n  parquet:\n    path: {}\nsteps:\n  - operator: sentiment\n    inputs: [text]\nsink:\n  parquet:\n    path: {}\n",
            input.display(),
            dir.join("out.parquet").display()
        ),
    );
    let cpu_build = ferry::runtime::onnxruntime::library_path().unwrap();
    let out = Command::new(ferry_bin())
        .env("ORT_DYLIB_PATH", cpu_build)
        .arg("--operators")
        .arg(ops)
        .args(["run", "-q"])
        .arg(&pipeline)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cuda_that_cannot_be_used_is_an_error_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let ops = operators(
        dir.path(),
        None,
        "cuda: {device_id: 0, gpu_mem_limit: 1073741824}\n",
    );
    let (ok, stderr) = run(dir.path(), &ops);
    assert!(!ok, "no silent fallback: {stderr}");
    for expected in [
        "provider cuda cannot be used",
        "a build of ONNX Runtime without CUDA",
        "fallback: cpu",
        "ferry doctor",
    ] {
        assert!(stderr.contains(expected), "{expected}:\n{stderr}");
    }
    assert!(!dir.path().join("out.parquet").exists());
}

#[test]
fn fallback_cpu_runs_on_the_cpu_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let ops = operators(dir.path(), Some("cpu"), "");
    let (ok, stderr) = run(dir.path(), &ops);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("running on the CPU (fallback: cpu)"),
        "{stderr}"
    );
    assert!(dir.path().join("out.parquet").exists());
}

#[test]
fn cuda_settings_need_provider_cuda() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.yaml"),
        format!(
            "name: x\ntask: classify_text\nmodel: {}\ncuda: {{device_id: 1}}\n",
            fixture_model("tiny-bert-sentiment")
        ),
    )
    .unwrap();
    let err = ferry::ops::load_manifests(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x.yaml:4:1: cuda: cuda settings are given but the provider is cpu"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("x.yaml"),
        format!(
            "name: x\ntask: classify_text\nmodel: {}\nprovider: cuda\ncuda: {{device: 1}}\n",
            fixture_model("tiny-bert-sentiment")
        ),
    )
    .unwrap();
    let err = ferry::ops::load_manifests(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `device`"), "{err}");
}
