//! The inference cache: a pipeline re-run over a dataset that grew by 1%.
//!
//! `cargo bench --bench cache` (FERRY_BENCH_ROWS, default 4000).
//!
//! The quickstart job (Parquet → minilm → Parquet, the real all-MiniLM-L6-v2) over the grown
//! dataset, three ways: without a cache; with a cache filled by a run over the original
//! dataset, loaded again as a new run would (the baseline the issue names: the same job redone
//! in full against the job that runs the new rows only). Prints the wall time of each, how many
//! rows the model ran, and whether the outputs are identical.

use std::path::{Path, PathBuf};

mod common;

use common::{bench_texts, env_usize, jsonl_to_parquet, run_pipeline};
use ferry::ops::OperatorSet;

/// Writes `texts` (with ids) as Parquet through a query over JSON Lines.
async fn parquet_of(work: &Path, name: &str, texts: &[String]) -> PathBuf {
    let jsonl = work.join(format!("{name}.jsonl"));
    let lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": i, "text": t}).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    let parquet = work.join(format!("{name}.parquet"));
    jsonl_to_parquet(&jsonl, &parquet).await;
    parquet
}

/// Operators with `minilm` as in `operators/`, and `cached_minilm`: the same with a cache in
/// `cache`.
fn operators(root: &Path, work: &Path, cache: &Path) -> OperatorSet {
    let dir = work.join("operators");
    std::fs::create_dir_all(&dir).unwrap();
    let model = root.join("models/minilm");
    for (name, extra) in [
        ("minilm", String::new()),
        (
            "cached_minilm",
            format!("cache: {{dir: {}}}\n", cache.display()),
        ),
    ] {
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            format!(
                "name: {name}\ntask: embed\nmodel: {}\nbatch_size: 32\n{extra}options: {{pooling: mean, normalize: true}}\n",
                model.display()
            ),
        )
        .unwrap();
    }
    OperatorSet::new(ferry::ops::load_manifests(&dir).unwrap())
}

async fn run(
    work: &Path,
    operators: &mut OperatorSet,
    operator: &str,
    input: &Path,
    out: &str,
) -> (f64, u64, PathBuf) {
    let output = work.join(out);
    let yaml = format!(
        "name: bench\nsource:\n  parquet:\n    path: {}\nsteps:\n  - operator: {operator}\n    inputs: [text]\n    output: embedding\nsink:\n  parquet:\n    path: {}\n",
        input.display(),
        output.display()
    );
    let op = operators.get(operator).unwrap().clone();
    let before = op.model_rows();
    let (_, seconds) = run_pipeline(work, &yaml, operators).await;
    (seconds, op.model_rows() - before, output)
}

/// A Parquet file's rows, in one batch.
fn rows_of(path: &Path) -> ferry::datafusion::arrow::array::RecordBatch {
    use ferry::datafusion::arrow::array::RecordBatchReader;
    use ferry::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let schema = reader.schema();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    ferry::datafusion::arrow::compute::concat_batches(&schema, &batches).unwrap()
}

fn main() {
    let rows = env_usize("FERRY_BENCH_ROWS", 4000);
    let grown = rows + rows.div_ceil(100);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join("ferry-bench-cache");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let cache = work.join("cache");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        ferry::fetch::fetch("minilm", &root.join("models")).unwrap();
        let texts = bench_texts(&root, &work.join("texts.jsonl"), grown);
        let original = parquet_of(&work, "original", &texts[..rows]).await;
        let grown_input = parquet_of(&work, "grown", &texts).await;

        let mut first = operators(&root, &work, &cache);
        // Warm-up (thread pools, page cache), then the plain job over the grown dataset.
        run(&work, &mut first, "minilm", &original, "warmup.parquet").await;
        let (plain_s, plain_rows, plain_out) =
            run(&work, &mut first, "minilm", &grown_input, "plain.parquet").await;
        // The first run fills the cache.
        let (fill_s, fill_rows, _) = run(
            &work,
            &mut first,
            "cached_minilm",
            &original,
            "fill.parquet",
        )
        .await;
        drop(first);
        // A new run: operators loaded again, the cache read from disk.
        let load = std::time::Instant::now();
        let mut again = operators(&root, &work, &cache);
        let entries = again
            .get("cached_minilm")
            .unwrap()
            .cache
            .as_ref()
            .unwrap()
            .len();
        let load_s = load.elapsed().as_secs_f64();
        let (warm_s, warm_rows, warm_out) = run(
            &work,
            &mut again,
            "cached_minilm",
            &grown_input,
            "warm.parquet",
        )
        .await;
        let same = rows_of(&plain_out) == rows_of(&warm_out);

        println!("rows:                          {rows} original, {grown} grown (+1%)");
        println!("no cache, grown dataset:       {plain_s:.2} s, model ran {plain_rows} rows");
        println!("cache filled by the original:  {fill_s:.2} s, model ran {fill_rows} rows");
        println!("operator load with the cache:  {load_s:.2} s ({entries} entries)");
        println!("cache, grown dataset:          {warm_s:.2} s, model ran {warm_rows} rows");
        println!("speed-up over no cache:        {:.1}x", plain_s / warm_s);
        println!("outputs identical:             {same}");
    });
}
