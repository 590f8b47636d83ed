//! Helpers the benchmarks share (each bench uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ferry::engine::{execute, plan};
use ferry::ops::OperatorSet;

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The process's peak resident memory so far, in MB.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Writes `rows` real paragraphs (Python's standard-library docstrings) to `out` as JSON Lines
/// and returns their texts.
pub fn bench_texts(root: &Path, out: &Path, rows: usize) -> Vec<String> {
    let status = std::process::Command::new("python3")
        .arg(root.join("benches/make_bench_texts.py"))
        .arg(out)
        .arg(rows.to_string())
        .status()
        .expect("python3 to generate benchmark texts");
    assert!(status.success());
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Runs the pipeline `yaml` (written to `work/bench.yaml`) end to end, planning included:
/// its summary and wall seconds.
pub async fn run_pipeline(
    work: &Path,
    yaml: &str,
    operators: &mut OperatorSet,
) -> (ferry::engine::RunSummary, f64) {
    let file = work.join("bench.yaml");
    std::fs::write(&file, yaml).unwrap();
    let loaded = ferry::spec::load_pipeline(&file).unwrap();
    let start = Instant::now();
    let planned = plan(&loaded, operators).await.unwrap();
    let summary = execute(planned, &loaded.pipeline.sink, operators, true)
        .await
        .unwrap();
    (summary, start.elapsed().as_secs_f64())
}

/// A Python in the virtual environment `name` of ferry's cache where `imports` import, made
/// once with `packages` installed; None when that fails.
pub fn python_venv(name: &str, imports: &str, packages: &[&str]) -> Option<PathBuf> {
    let venv = ferry::runtime::cache_dir().join(name);
    let python = venv.join("bin/python");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", &format!("import {imports}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if ok(&python) {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .ok()?
        .success()
        && Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(packages)
            .status()
            .ok()?
            .success();
    (made && ok(&python)).then_some(python)
}

/// Writes a JSON Lines table as Parquet (rows ordered by `id`) through ferry's query path.
pub async fn jsonl_to_parquet(jsonl: &Path, parquet: &Path) {
    let inputs = ferry::query::QueryInputs {
        tables: vec![("t".into(), jsonl.display().to_string())],
        ..Default::default()
    };
    ferry::query::run("SELECT id, text FROM t ORDER BY id", &inputs, Some(parquet))
        .await
        .unwrap();
}
