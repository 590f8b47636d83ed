//! The quickstart job on real text against a raw ONNX Runtime baseline, in one program.
//!
//! `cargo bench --bench quickstart` (FERRY_BENCH_ROWS, default 4000; FERRY_BENCH_RUNS, default 3).
//!
//! - ferry: Parquet → minilm (tokenize, length-sort, pad, infer, pool) → Parquet, end to end.
//! - baseline: the same operator's sessions, batch size and length-sorted batches, pre-tokenized
//!   and pre-padded outside the timing: only `Session::run` is timed.
//!
//! Prints rows/s for both, their ratio, the peak RSS of the ferry runs, and the padded tokens in
//! file order against length-sorted order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

mod common;

use common::{bench_texts, env_usize, jsonl_to_parquet, median, peak_rss_mb, run_pipeline};
use ferry::datafusion::arrow::array::{ArrayRef, StringArray};
use ferry::ops::Operator;
use ferry::ops::OperatorSet;

/// The benchmark texts, as Parquet (for ferry) and in memory (for the baseline).
async fn prepare(root: &Path, work: &Path, rows: usize) -> (PathBuf, Vec<String>) {
    std::fs::create_dir_all(work).unwrap();
    let jsonl = work.join("texts.jsonl");
    let texts = bench_texts(root, &jsonl, rows);
    let parquet = work.join("texts.parquet");
    jsonl_to_parquet(&jsonl, &parquet).await;
    (parquet, texts)
}

async fn ferry_run(work: &Path, input: &Path, operators: &mut OperatorSet) -> (u64, f64) {
    let yaml = format!(
        "name: bench\nsource:\n  parquet:\n    path: {}\nsteps:\n  - operator: minilm\n    inputs: [text]\n    output: embedding\nsink:\n  parquet:\n    path: {}\n",
        input.display(),
        work.join("out.parquet").display()
    );
    let (summary, seconds) = run_pipeline(work, &yaml, operators).await;
    (summary.rows, seconds)
}

/// The operator's own calls (same truncation, same length-sorted chunks), prepared outside the
/// timing: only `Session::run` is timed.
async fn baseline(op: &Operator, texts: &[String]) -> f64 {
    let column: ArrayRef = Arc::new(StringArray::from(texts.to_vec()));
    let calls = op.baseline.prepare_calls(&[column]).unwrap();
    let start = Instant::now();
    op.baseline.run_calls(calls).await.unwrap();
    start.elapsed().as_secs_f64()
}

/// Padded tokens of the operator's calls, length-sorted, and of calls in file order.
fn padded_tokens(op: &Operator, texts: &[String], batch_size: usize) -> (usize, usize) {
    let padded = |calls: Vec<Vec<ferry::runtime::tensor::Input>>| -> Vec<usize> {
        calls
            .iter()
            .map(|c| (c[0].shape[0] * c[0].shape[1]) as usize)
            .collect()
    };
    let column: ArrayRef = Arc::new(StringArray::from(texts.to_vec()));
    let sorted = padded(op.baseline.prepare_calls(&[column]).unwrap());
    let lens: Vec<usize> = texts
        .iter()
        .map(|t| {
            let one: ArrayRef = Arc::new(StringArray::from(vec![t.clone()]));
            padded(op.baseline.prepare_calls(&[one]).unwrap())[0]
        })
        .collect();
    let file_order = lens
        .chunks(batch_size)
        .map(|c| c.iter().max().unwrap() * c.len())
        .sum();
    (file_order, sorted.iter().sum())
}

fn main() {
    let rows = env_usize("FERRY_BENCH_ROWS", 4000);
    let runs = env_usize("FERRY_BENCH_RUNS", 3).max(1);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join("ferry-bench");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (input, texts) = prepare(&root, &work, rows).await;
        ferry::fetch::fetch("minilm", &root.join("models")).unwrap();
        let mut operators =
            OperatorSet::new(ferry::ops::load_manifests(&root.join("operators")).unwrap());
        let op = operators.get("minilm").unwrap().clone();
        // Warm up both paths once (thread pools, allocator, page cache).
        ferry_run(&work, &input, &mut operators).await;
        baseline(&op, &texts[..texts.len().min(256)]).await;

        let mut ferry_secs = Vec::new();
        let mut n = 0;
        for _ in 0..runs {
            let (r, s) = ferry_run(&work, &input, &mut operators).await;
            n = r;
            ferry_secs.push(s);
        }
        let rss = peak_rss_mb();
        let mut base_secs = Vec::new();
        for _ in 0..runs {
            base_secs.push(baseline(&op, &texts).await);
        }
        let ferry_rps = n as f64 / median(ferry_secs);
        let base_rps = texts.len() as f64 / median(base_secs);
        println!("texts:                {}", texts.len());
        println!(
            "workers x threads:    {} x {}, batch size {}, max batch tokens {}",
            op.pool.workers(),
            op.pool.threads_per_worker,
            op.limits.items,
            op.limits.cost
        );
        println!("ferry end-to-end:     {ferry_rps:.1} rows/s");
        println!("raw ORT baseline:     {base_rps:.1} rows/s");
        println!("ratio ferry/baseline: {:.3}", ferry_rps / base_rps);
        println!("peak RSS (ferry):     {rss:.0} MB");
        let (file_order, sorted) = padded_tokens(&op, &texts, op.limits.items);
        println!("padded tokens:        {file_order} in file order, {sorted} length-sorted");
    });
}
