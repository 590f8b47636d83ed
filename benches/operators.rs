//! Each text operator called from SQL against a raw ONNX Runtime baseline on the same windows.
//!
//! `cargo bench --bench operators` (FERRY_BENCH_ROWS, default 2000; FERRY_BENCH_RUNS, default 3).
//!
//! For every operator: ferry runs `SELECT op(args) FROM t` over an in-memory table (reading
//! strings, tokenizing, length-sorting, padding, inference, post-processing, building Arrow
//! arrays). The baseline encodes the same inputs into the same windows with the operator's own
//! encoder, sorts and pads them into the same batches outside the timing, and times only
//! `Session::run` on the same session pool. minilm is the real all-MiniLM-L6-v2; the others are
//! the tiny test models, on which inference is nearly free, so their ratio is a worst case that
//! shows ferry's own pre- and post-processing cost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

mod common;

use common::{bench_texts, env_usize, median};
use ferry::datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use ferry::datafusion::datasource::MemTable;
use ferry::engine::session_context;
use ferry::ops::Operator;
use ferry::ops::OperatorSet;

/// The operator's own calls over the same argument columns (same windows, same chunks),
/// prepared outside the timing: only `Session::run` is timed.
async fn baseline(op: &Operator, args: &[ArrayRef]) -> f64 {
    let calls = op.baseline.prepare_calls(args).unwrap();
    let start = Instant::now();
    op.baseline.run_calls(calls).await.unwrap();
    start.elapsed().as_secs_f64()
}

fn main() {
    let rows = env_usize("FERRY_BENCH_ROWS", 2000);
    let runs = env_usize("FERRY_BENCH_RUNS", 3).max(1);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let texts = bench_texts(
            &root,
            &std::env::temp_dir().join("ferry-bench-operators.jsonl"),
            rows + 1,
        );
        let questions: Vec<String> = texts
            .iter()
            .map(|t| t.split_whitespace().take(8).collect::<Vec<_>>().join(" ") + "?")
            .collect();
        let contexts: Vec<String> = texts
            .windows(2)
            .map(|w| format!("{} {}", w[0], w[1]))
            .collect();
        let texts = &texts[..rows];
        let col = |v: &[String]| -> ArrayRef { Arc::new(StringArray::from(v[..rows].to_vec())) };
        let batch = RecordBatch::try_from_iter([
            ("text", col(texts)),
            ("question", col(&questions)),
            ("context", col(&contexts)),
        ])
        .unwrap();
        ferry::fetch::fetch("minilm", &root.join("models")).unwrap();
        let mut manifests = ferry::ops::load_manifests(&root.join("operators")).unwrap();
        manifests
            .extend(ferry::ops::load_manifests(&root.join("tests/fixtures/operators")).unwrap());
        let mut operators = OperatorSet::new(manifests);
        let cases: [(&str, &str); 5] = [
            ("minilm", "text"),
            ("tiny_sentiment", "text"),
            ("tiny_sentiment", "question, context"),
            ("tiny_ner", "text"),
            ("tiny_qa", "question, context"),
        ];
        println!(
            "{:<16} {:<18} {:>12} {:>12} {:>7}",
            "operator", "arguments", "ferry rows/s", "ORT rows/s", "ratio"
        );
        // FERRY_BENCH_FILTER: only the cases whose "operator arguments" contain it.
        let filter = std::env::var("FERRY_BENCH_FILTER").unwrap_or_default();
        for (name, args) in cases {
            if !format!("{name} {args}").contains(&filter) {
                continue;
            }
            let op = operators.get(name).unwrap().clone();
            let ctx = session_context();
            ctx.register_udf(op.udf.clone());
            ctx.register_table(
                "t",
                Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch.clone()]]).unwrap()),
            )
            .unwrap();
            let inputs: Vec<ArrayRef> = args
                .split(", ")
                .map(|a| batch.column_by_name(a).unwrap().clone())
                .collect();
            let few: Vec<ArrayRef> = inputs
                .iter()
                .map(|a| a.slice(0, a.len().min(128)))
                .collect();
            let sql = format!("SELECT {name}({args}) FROM t");
            // Warm up once.
            ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            baseline(&op, &few).await;
            let mut ferry_secs = Vec::new();
            let mut base_secs = Vec::new();
            for _ in 0..runs {
                let start = Instant::now();
                ctx.sql(&sql).await.unwrap().collect().await.unwrap();
                ferry_secs.push(start.elapsed().as_secs_f64());
                base_secs.push(baseline(&op, &inputs).await);
            }
            let f = rows as f64 / median(ferry_secs);
            let b = rows as f64 / median(base_secs);
            println!("{name:<16} {args:<18} {f:>12.1} {b:>12.1} {:>7.3}", f / b);
        }
    });
}
