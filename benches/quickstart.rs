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

use common::{bench_texts, env_usize, median};
use ferry::engine::{OperatorSet, execute, plan};
use ferry::ops::text::TextModel;

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The benchmark texts, as Parquet (for ferry) and in memory (for the baseline).
async fn prepare(root: &Path, work: &Path, rows: usize) -> (PathBuf, Vec<String>) {
    std::fs::create_dir_all(work).unwrap();
    let jsonl = work.join("texts.jsonl");
    let texts = bench_texts(root, &jsonl, rows);
    let parquet = work.join("texts.parquet");
    let inputs = ferry::query::QueryInputs {
        tables: vec![("t".into(), jsonl.display().to_string())],
        ..Default::default()
    };
    ferry::query::run(
        "SELECT id, text FROM t ORDER BY id",
        &inputs,
        Some(&parquet),
    )
    .await
    .unwrap();
    (parquet, texts)
}

async fn ferry_run(work: &Path, input: &Path, operators: &mut OperatorSet) -> (u64, f64) {
    let yaml = format!(
        "name: bench\nsource:\n  parquet:\n    path: {}\nsteps:\n  - operator: minilm\n    inputs: [text]\n    output: embedding\nsink:\n  parquet:\n    path: {}\n",
        input.display(),
        work.join("out.parquet").display()
    );
    let file = work.join("bench.yaml");
    std::fs::write(&file, yaml).unwrap();
    let loaded = ferry::spec::load_pipeline(&file).unwrap();
    let start = Instant::now();
    let planned = plan(&loaded, operators).await.unwrap();
    let summary = execute(planned, &loaded.pipeline.sink, operators, true)
        .await
        .unwrap();
    (summary.rows, start.elapsed().as_secs_f64())
}

async fn baseline(model: &Arc<TextModel>, texts: &[String]) -> f64 {
    let mut encodings: Vec<_> = texts
        .iter()
        .map(|t| model.tokenizer.encode(t.as_str(), true).unwrap())
        .collect();
    encodings.sort_by_key(|e| e.len());
    let order: Vec<usize> = (0..encodings.len()).collect();
    let chunks: Vec<_> = model
        .chunk(&order, |i| encodings[i].len())
        .into_iter()
        .map(|c| {
            let refs: Vec<_> = c.iter().map(|&i| &encodings[i]).collect();
            let enc = model.pad(&refs);
            model.inputs(&enc).unwrap()
        })
        .collect();
    let start = Instant::now();
    let jobs = chunks.into_iter().map(|inputs| {
        model.pool.run(move |session| {
            let out = session.run(inputs).unwrap();
            let (shape, _) = out["last_hidden_state"]
                .try_extract_tensor::<f32>()
                .unwrap();
            shape[0]
        })
    });
    let done = futures::future::try_join_all(jobs).await.unwrap();
    assert_eq!(done.iter().sum::<i64>() as usize, texts.len());
    start.elapsed().as_secs_f64()
}

fn padded_tokens(model: &TextModel, texts: &[String], sorted: bool) -> usize {
    let mut lens: Vec<usize> = texts
        .iter()
        .map(|t| model.tokenizer.encode(t.as_str(), true).unwrap().len())
        .collect();
    if sorted {
        lens.sort();
    }
    if sorted {
        let order: Vec<usize> = (0..lens.len()).collect();
        return model
            .chunk(&order, |i| lens[i])
            .iter()
            .map(|c| c.iter().map(|&i| lens[i]).max().unwrap() * c.len())
            .sum();
    }
    lens.chunks(model.batch_size)
        .map(|c| c.iter().max().unwrap() * c.len())
        .sum()
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
        let model = operators.get("minilm").unwrap().text.clone().unwrap();
        // Warm up both paths once (thread pools, allocator, page cache).
        ferry_run(&work, &input, &mut operators).await;
        baseline(&model, &texts[..texts.len().min(256)]).await;

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
            base_secs.push(baseline(&model, &texts).await);
        }
        let ferry_rps = n as f64 / median(ferry_secs);
        let base_rps = texts.len() as f64 / median(base_secs);
        println!("texts:                {}", texts.len());
        println!(
            "workers x threads:    {} x {}, batch size {}, max batch tokens {}",
            model.pool.workers(),
            model.pool.threads_per_worker,
            model.batch_size,
            model.max_batch_tokens
        );
        println!("ferry end-to-end:     {ferry_rps:.1} rows/s");
        println!("raw ORT baseline:     {base_rps:.1} rows/s");
        println!("ratio ferry/baseline: {:.3}", ferry_rps / base_rps);
        println!("peak RSS (ferry):     {rss:.0} MB");
        println!(
            "padded tokens:        {} in file order, {} length-sorted",
            padded_tokens(&model, &texts, false),
            padded_tokens(&model, &texts, true)
        );
    });
}
