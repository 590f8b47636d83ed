//! Helpers the benchmarks share (each bench uses some of them).
#![allow(dead_code)]

use std::path::Path;

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
