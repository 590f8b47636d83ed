//! An operator never does the same work twice: a literal argument runs once per batch, rows
//! with equal arguments run once, and `f(x)` named twice in a query runs once per row.

use std::sync::Arc;

use ferry::datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray, RecordBatch};
use ferry::datafusion::arrow::datatypes::{DataType, Field, Schema};
use ferry::datafusion::datasource::MemTable;

use crate::util::{context_with, register_texts, sql};

/// Each row's `label` and `score` of a `Struct<label, score>` column, over all batches.
fn labels(batches: &[RecordBatch], column: usize) -> Vec<Option<(String, f64)>> {
    use ferry::datafusion::arrow::datatypes::Float64Type;
    let mut out = Vec::new();
    for b in batches {
        let s = b.column(column).as_struct();
        let (label, score) = (
            s.column_by_name("label").unwrap().as_string::<i32>(),
            s.column_by_name("score")
                .unwrap()
                .as_primitive::<Float64Type>(),
        );
        for i in 0..s.len() {
            out.push(
                s.is_valid(i)
                    .then(|| (label.value(i).to_string(), score.value(i))),
            );
        }
    }
    out
}

#[tokio::test]
async fn a_literal_argument_runs_once_per_batch() {
    let (ctx, mut ops) = context_with(&["tiny_sentiment"]);
    let texts = ["a", "b", "c", "d", "e", "f", "g"];
    register_texts(&ctx, &texts.map(Some));
    let op = ops.get("tiny_sentiment").unwrap().clone();

    let one = sql(&ctx, "SELECT tiny_sentiment('trouble in outer space')").await;
    let want = labels(&one, 0)[0].clone().unwrap();
    assert_eq!(op.model_rows(), 1);

    let all = sql(
        &ctx,
        "SELECT tiny_sentiment('trouble in outer space') AS s FROM t",
    )
    .await;
    assert_eq!(labels(&all, 0), vec![Some(want); texts.len()]);
    assert_eq!(
        op.model_rows(),
        2,
        "one more input for the table's one batch"
    );
    assert_eq!(op.progress_rows(), 1 + texts.len() as u64);
}

#[tokio::test]
async fn equal_inputs_in_a_batch_run_once() {
    let (ctx, mut ops) = context_with(&["tiny_sentiment"]);
    let texts = [
        Some("the same words"),
        Some("other words"),
        Some("the same words"),
        None,
        Some("other words"),
        Some("the same words"),
        Some("a third text"),
        None,
    ];
    register_texts(&ctx, &texts);
    let op = ops.get("tiny_sentiment").unwrap().clone();
    let got = labels(
        &sql(&ctx, "SELECT tiny_sentiment(text) FROM t ORDER BY id").await,
        0,
    );
    assert_eq!(op.model_rows(), 3, "three distinct texts");

    // Each row's result is its text's own, as when every text runs alone.
    for (text, result) in texts.iter().zip(&got) {
        match text {
            None => assert_eq!(result, &None),
            Some(text) => {
                let alone = sql(&ctx, &format!("SELECT tiny_sentiment('{text}')")).await;
                assert_eq!(result, &labels(&alone, 0)[0], "{text}");
            }
        }
    }
}

#[tokio::test]
async fn a_call_named_twice_runs_once_per_row() {
    let (ctx, mut ops) = context_with(&["tiny_sentiment"]);
    register_texts(
        &ctx,
        &[Some("one"), Some("two"), Some("three"), Some("four")],
    );
    let op = ops.get("tiny_sentiment").unwrap().clone();
    let batches = sql(
        &ctx,
        "SELECT tiny_sentiment(text)['label'] AS label, tiny_sentiment(text)['score'] AS score, \
         tiny_sentiment(text) AS both FROM t ORDER BY id",
    )
    .await;
    assert_eq!(op.model_rows(), 4, "four rows, each run once");
    let both = labels(&batches, 2);
    let mut i = 0;
    for b in &batches {
        for row in 0..b.num_rows() {
            let (label, score) = both[i].clone().unwrap();
            assert_eq!(b.column(0).as_string::<i32>().value(row), label);
            assert_eq!(
                b.column(1)
                    .as_primitive::<ferry::datafusion::arrow::datatypes::Float64Type>()
                    .value(row),
                score
            );
            i += 1;
        }
    }
}

/// A repeated input that cannot be read fails every row that holds it, and is counted per row.
#[tokio::test]
async fn a_repeated_bad_input_fails_each_of_its_rows() {
    let (ctx, mut ops) = context_with(&["tiny_sentiment"]);
    let values: Vec<Option<&[u8]>> = vec![
        Some(b"fine text"),
        Some(b"\xff\xfe not utf-8"),
        Some(b"fine text"),
        Some(b"\xff\xfe not utf-8"),
    ];
    let bytes: ArrayRef = Arc::new(BinaryArray::from(values));
    let schema = Arc::new(Schema::new(vec![Field::new(
        "bytes",
        DataType::Binary,
        true,
    )]));
    let batch = RecordBatch::try_new(schema.clone(), vec![bytes]).unwrap();
    ctx.register_table(
        "b",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let op = ops.get("tiny_sentiment").unwrap().clone();
    let got = labels(&sql(&ctx, "SELECT tiny_sentiment(bytes) FROM b").await, 0);
    assert!(got[0].is_some() && got[2].is_some());
    assert_eq!(got[0], got[2]);
    assert_eq!((&got[1], &got[3]), (&None, &None));
    assert_eq!(op.row_errors(), 2, "both bad rows are counted");
    assert_eq!(op.model_rows(), 1);
}

/// A manifest of `base` (a fixture operator) with an inference cache in `cache`.
fn cached_operator(dir: &std::path::Path, name: &str, base: &str, cache: &std::path::Path) {
    let yaml =
        std::fs::read_to_string(crate::util::fixture_operators().join(format!("{base}.yaml")))
            .unwrap();
    let model = yaml
        .lines()
        .find_map(|l| l.strip_prefix("model: "))
        .unwrap()
        .trim()
        .to_string();
    let model = crate::util::fixture_operators().join(model);
    let rest: Vec<&str> = yaml
        .lines()
        .filter(|l| !l.starts_with("name:") && !l.starts_with("model:"))
        .collect();
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "name: {name}\nmodel: {}\ncache: {{dir: {}}}\n{}\n",
            model.display(),
            cache.display(),
            rest.join("\n")
        ),
    )
    .unwrap();
}

/// Every value of the first column, rendered (for comparing outputs of any type).
fn rendered(batches: &[RecordBatch]) -> Vec<String> {
    use ferry::datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let mut out = Vec::new();
    for b in batches {
        let f = ArrayFormatter::try_new(b.column(0).as_ref(), &FormatOptions::default()).unwrap();
        out.extend((0..b.num_rows()).map(|i| f.value(i).to_string()));
    }
    out
}

/// With `cache:`, a run over a dataset that grew runs the model on the new rows only, in a new
/// process (operators loaded again), and gives what a run without the cache gives.
#[tokio::test]
async fn the_inference_cache_runs_only_new_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    for (name, base) in [
        ("cached_sentiment", "tiny_sentiment"),
        ("cached_embed", "tiny_embed"),
    ] {
        cached_operator(tmp.path(), name, base, &cache);
    }
    let texts: Vec<String> = (0..40)
        .map(|i| format!("review number {i} says it was fine"))
        .collect();
    let grown: Vec<String> = texts
        .iter()
        .cloned()
        .chain(["a new review", "another new one"].map(String::from))
        .collect();
    for (name, base) in [
        ("cached_sentiment", "tiny_sentiment"),
        ("cached_embed", "tiny_embed"),
    ] {
        let q = format!("SELECT {name}(text) FROM t ORDER BY id");
        let first = {
            let ctx = ferry::engine::session_context();
            let mut ops =
                ferry::ops::OperatorSet::new(ferry::ops::load_manifests(tmp.path()).unwrap());
            let op = ops.get(name).unwrap().clone();
            ctx.register_udf(op.udf.clone());
            let refs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
            register_texts(&ctx, &refs);
            let out = rendered(&sql(&ctx, &q).await);
            assert_eq!(
                op.model_rows(),
                texts.len() as u64,
                "{name}: a cold cache runs every row"
            );
            out
        };
        // A new process: the operator reads the cache's segments when it loads.
        let ctx = ferry::engine::session_context();
        let mut ops = ferry::ops::OperatorSet::new(ferry::ops::load_manifests(tmp.path()).unwrap());
        let op = ops.get(name).unwrap().clone();
        assert_eq!(op.cache.as_ref().unwrap().len(), texts.len());
        ctx.register_udf(op.udf.clone());
        let refs: Vec<Option<&str>> = grown.iter().map(|t| Some(t.as_str())).collect();
        register_texts(&ctx, &refs);
        let again = rendered(&sql(&ctx, &q).await);
        assert_eq!(op.model_rows(), 2, "{name}: only the two new rows run");
        assert_eq!(
            op.progress_rows(),
            grown.len() as u64,
            "cached rows count as done"
        );
        assert_eq!(
            &again[..texts.len()],
            &first[..],
            "{name}: cached rows as computed"
        );

        // The same rows without a cache.
        let (plain, _ops) = crate::util::context_with(&[base]);
        register_texts(&plain, &refs);
        let want = rendered(&sql(&plain, &format!("SELECT {base}(text) FROM t ORDER BY id")).await);
        assert_eq!(again, want, "{name}: the cache changes no result");
    }
}

/// Rows that fail are not cached: in a new process the good rows come from the cache, and the
/// bad one is tried again (and fails again) instead of being served as a stored failure.
#[tokio::test]
async fn the_inference_cache_keeps_no_failed_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    cached_operator(tmp.path(), "cached_sentiment", "tiny_sentiment", &cache);
    let values: Vec<Option<&[u8]>> = vec![
        Some(b"fine text"),
        Some(b"\xff\xfe not utf-8"),
        Some(b"other text"),
    ];
    let schema = Arc::new(Schema::new(vec![Field::new(
        "bytes",
        DataType::Binary,
        true,
    )]));
    for run in 0..2 {
        let ctx = ferry::engine::session_context();
        let mut ops = ferry::ops::OperatorSet::new(ferry::ops::load_manifests(tmp.path()).unwrap());
        let op = ops.get("cached_sentiment").unwrap().clone();
        if run == 1 {
            assert_eq!(
                op.cache.as_ref().unwrap().len(),
                2,
                "only the good rows stored"
            );
        }
        ctx.register_udf(op.udf.clone());
        let bytes: ArrayRef = Arc::new(BinaryArray::from(values.clone()));
        let batch = RecordBatch::try_new(schema.clone(), vec![bytes]).unwrap();
        ctx.register_table(
            "b",
            Arc::new(MemTable::try_new(schema.clone(), vec![vec![batch]]).unwrap()),
        )
        .unwrap();
        let got = labels(&sql(&ctx, "SELECT cached_sentiment(bytes) FROM b").await, 0);
        assert!(got[0].is_some() && got[2].is_some(), "run {run}");
        assert_eq!(got[1], None, "run {run}");
        assert_eq!(op.row_errors(), 1, "run {run}: the bad row fails (again)");
        assert_eq!(op.model_rows(), if run == 0 { 2 } else { 0 }, "run {run}");
    }
}
