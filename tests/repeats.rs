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
