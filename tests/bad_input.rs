//! Each kind of bad input gets a clear error naming the file, field or row, never a panic.

use std::sync::Arc;

use ferry::datafusion::arrow::array::{Array, AsArray, BinaryArray, RecordBatch};
use ferry::datafusion::arrow::datatypes::{DataType, Field, Schema};
use ferry::datafusion::datasource::MemTable;

use crate::pipeline::{write_pipeline, write_texts};
use crate::util::*;

async fn validate(yaml: &str, operators: &std::path::Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_texts(&input, &[Some("hello")]);
    let file = write_pipeline(dir.path(), &yaml.replace("INPUT", input.to_str().unwrap()));
    match ferry::cli::validate(&file, operators).await {
        Ok(()) => panic!("expected problems in:\n{yaml}"),
        Err(d) => d.to_string(),
    }
}

const SINK: &str = "sink:\n  parquet:\n    path: /tmp/ferry-never-written.parquet\n";

#[tokio::test]
async fn malformed_yaml() {
    let err = validate("name: t\nsource: [unclosed\n", &fixture_operators()).await;
    assert!(err.contains("p.yaml:"), "{err}");
    assert!(err.contains("invalid YAML"), "{err}");
}

#[tokio::test]
async fn unknown_keys_are_each_reported_with_their_line() {
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: INPUT\n    pth: x\nsteps:\n  - operator: tiny_embed\n    input: [text]\n{SINK}"
    );
    let err = validate(&yaml, &fixture_operators()).await;
    assert!(
        err.contains("p.yaml:5:5: source.parquet.pth: unknown field `pth`"),
        "{err}"
    );
    assert!(
        err.contains("p.yaml:8:5: steps[0].input: unknown field `input`"),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_operator_lists_the_known_ones() {
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: INPUT\nsteps:\n  - operator: sentimnt\n    inputs: [text]\n{SINK}"
    );
    let err = validate(&yaml, &fixture_operators()).await;
    assert!(
        err.contains("p.yaml:6:5: steps[0].operator: unknown operator 'sentimnt' (known: "),
        "{err}"
    );
    assert!(err.contains("tiny_sentiment"), "{err}");
}

#[tokio::test]
async fn missing_column_and_wrong_column_type() {
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: INPUT\nsteps:\n  - operator: tiny_embed\n    inputs: [txt]\n{SINK}"
    );
    let err = validate(&yaml, &fixture_operators()).await;
    assert!(
        err.contains("p.yaml:7:5: steps[0].inputs: no column 'txt' (columns: id, text)"),
        "{err}"
    );

    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: INPUT\nsteps:\n  - operator: tiny_embed\n    inputs: [id]\n{SINK}"
    );
    let err = validate(&yaml, &fixture_operators()).await;
    assert!(
        err.contains(
            "steps[0].inputs: tiny_embed (embed) expects text (Utf8, LargeUtf8 or Utf8View); column `id` is Int64"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn missing_source_file() {
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: /nonexistent/data.parquet\nsteps:\n  - operator: nope\n    inputs: [text]\n{SINK}"
    );
    let err = validate(&yaml, &fixture_operators()).await;
    // The steps' operators are still checked.
    assert!(
        err.contains("p.yaml:6:5: steps[0].operator: unknown operator 'nope'"),
        "{err}"
    );
    assert!(
        err.contains(
            "p.yaml:4:5: source.parquet.path: no such file or directory: /nonexistent/data.parquet"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn csv_sink_cannot_hold_embeddings() {
    let yaml = "name: t\nsource:\n  parquet:\n    path: INPUT\nsteps:\n  - operator: tiny_embed\n    inputs: [text]\nsink:\n  csv:\n    path: /tmp/x.csv\n";
    let err = validate(yaml, &fixture_operators()).await;
    assert!(
        err.contains("p.yaml:9:3: sink.csv: CSV cannot hold column 'tiny_embed'"),
        "{err}"
    );
}

/// Writes one manifest into a fresh operators directory.
fn operators_with(manifest: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("op.yaml"), manifest).unwrap();
    dir
}

#[tokio::test]
async fn missing_model_directory_and_model_file() {
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: INPUT\nsteps:\n  - operator: op\n    inputs: [text]\n{SINK}"
    );
    let ops = operators_with("name: op\ntask: embed\nmodel: no-such-model\n");
    let err = validate(&yaml, ops.path()).await;
    assert!(
        err.contains("model directory 'no-such-model' not found (looked in"),
        "{err}"
    );
    assert!(err.contains("set FERRY_MODELS"), "{err}");

    let ops = operators_with(&format!(
        "name: op\ntask: embed\nmodel: {}\nfile: missing.onnx\n",
        fixture_model("tiny-bert-embed")
    ));
    let err = validate(&yaml, ops.path()).await;
    assert!(
        err.contains("model file 'missing.onnx' not found in"),
        "{err}"
    );
}

#[tokio::test]
async fn a_model_without_the_expected_inputs_or_outputs() {
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: INPUT\nsteps:\n  - operator: op\n    inputs: [text]\n{SINK}"
    );
    let ops = operators_with(&format!(
        "name: op\ntask: classify_text\nmodel: {}\n",
        fixture_model("not-text")
    ));
    let err = validate(&yaml, ops.path()).await;
    assert!(
        err.contains(
            "the model expects an input 'pixel_values' that the classify_text task cannot provide"
        ),
        "{err}"
    );

    let ops = operators_with(&format!(
        "name: op\ntask: embed\nmodel: {}\n",
        fixture_model("tiny-bert-sentiment")
    ));
    let err = validate(&yaml, ops.path()).await;
    assert!(err.contains("no embedding output (has logits)"), "{err}");
}

#[tokio::test]
async fn bad_task_options_name_the_option() {
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: INPUT\nsteps:\n  - operator: op\n    inputs: [text]\n{SINK}"
    );
    let ops = operators_with(&format!(
        "name: op\ntask: embed\nmodel: {}\noptions:\n  pooling: max\n",
        fixture_model("tiny-bert-embed")
    ));
    let err = validate(&yaml, ops.path()).await;
    assert!(
        err.contains("op.yaml:5:3: options.pooling: unknown variant `max`"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_argument_types_and_counts_in_sql() {
    let (ctx, _ops) = context_with(&["tiny_embed"]);
    register_texts(&ctx, &[Some("a")]);
    let err = sql_err(&ctx, "SELECT tiny_embed(id) FROM t").await;
    assert!(
        err.contains(
            "tiny_embed (embed) expects text (Utf8, LargeUtf8 or Utf8View); argument 1 is Int64; cast it"
        ),
        "{err}"
    );
    let err = sql_err(&ctx, "SELECT tiny_embed(text, text) FROM t").await;
    assert!(
        err.contains(
            "tiny_embed (embed) takes 1 argument(s) (text: Utf8 | LargeUtf8 | Utf8View), got 2"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn null_empty_whitespace_and_huge_texts() {
    let (ctx, ops) = context_with(&["tiny_sentiment"]);
    let huge = "lorem ipsum dolor ".repeat(200_000); // 3.6 MB, far over the 64-token window
    register_texts(
        &ctx,
        &[None, Some(""), Some("   "), Some(&huge), Some("fine")],
    );
    let batches = sql(&ctx, "SELECT tiny_sentiment(text) FROM t ORDER BY id").await;
    let s = batches[0].column(0).as_struct();
    assert!(s.is_null(0));
    for i in 1..5 {
        assert!(!s.is_null(i), "row {i} has a result");
    }
    let op = ops.built().next().unwrap();
    assert_eq!(op.row_errors(), 0);
}

#[tokio::test]
async fn invalid_utf8_rows_become_null_and_the_rest_flow() {
    let (ctx, ops) = context_with(&["tiny_embed"]);
    let schema = Arc::new(Schema::new(vec![Field::new(
        "text",
        DataType::Binary,
        true,
    )]));
    let values: Vec<Option<&[u8]>> = vec![
        Some(b"good text"),
        Some(&[0x66, 0xff, 0xfe, 0x6f]),
        Some(b"more good text"),
    ];
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(BinaryArray::from(values))]).unwrap();
    ctx.register_table(
        "b",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let batches = sql(&ctx, "SELECT tiny_embed(text) FROM b").await;
    let e = batches[0].column(0);
    assert!(!e.is_null(0));
    assert!(e.is_null(1), "invalid UTF-8 gives null");
    assert!(!e.is_null(2));
    let op = ops.built().next().unwrap();
    assert_eq!(op.row_errors(), 1, "the bad row is counted");
}

#[tokio::test]
async fn invalid_utf8_in_a_csv_source_names_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bad.csv");
    std::fs::write(&csv, b"id,text\n1,hello\n2,bad \xff\xfe bytes\n3,fine\n").unwrap();
    let yaml = format!(
        "name: t\nsource:\n  csv:\n    path: {}\nsteps:\n  - operator: tiny_embed\n    inputs: [text]\n{SINK}",
        csv.display()
    );
    let file = write_pipeline(dir.path(), &yaml);
    let err = ferry::cli::validate(&file, &fixture_operators())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("p.yaml:4:5: source.csv.path:"), "{err}");
    assert!(err.contains("invalid UTF-8 in field 1"), "{err}");
    assert!(err.contains("at line 3"), "{err}");
}

#[tokio::test]
async fn answer_with_null_empty_or_mismatched_inputs() {
    use ferry::datafusion::arrow::array::{ArrayRef, StringArray};
    let (ctx, ops) = context_with(&["tiny_qa"]);
    // Leaves less than doc_stride tokens for a context that needs several windows.
    let long_question = "why ".repeat(40);
    let long_context = "because ".repeat(200);
    let q: ArrayRef = Arc::new(StringArray::from(vec![
        None,
        Some("Who?"),
        Some(""),
        Some("A question much longer than its context?"),
        Some("Where?"),
        Some(&long_question),
    ]));
    let c: ArrayRef = Arc::new(StringArray::from(vec![
        Some("ctx"),
        None,
        Some("Some context."),
        Some("Tiny."),
        Some("   "),
        Some(&long_context),
    ]));
    let batch = RecordBatch::try_from_iter([("q", q), ("c", c)]).unwrap();
    ctx.register_table(
        "qa",
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let batches = sql(&ctx, "SELECT tiny_qa(q, c) FROM qa").await;
    let s = batches[0].column(0).as_struct();
    assert!(s.is_null(0), "null question");
    assert!(s.is_null(1), "null context");
    assert!(s.is_null(2), "empty question");
    assert!(
        !s.is_null(3),
        "a context shorter than the question still has an answer"
    );
    assert!(s.is_null(4), "whitespace-only context");
    assert!(
        s.is_null(5),
        "a question that leaves no room to split the context"
    );
    assert_eq!(
        ops.built().next().unwrap().row_errors(),
        3,
        "each unprocessable row is counted"
    );

    let err = sql_err(&ctx, "SELECT tiny_qa(q) FROM qa").await;
    assert!(
        err.contains("tiny_qa (answer) takes 2 argument(s)"),
        "{err}"
    );
    let err = sql_err(&ctx, "SELECT tiny_qa(q, 1) FROM qa").await;
    assert!(err.contains("argument 2 is Int64"), "{err}");

    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: INPUT\nsteps:\n  - operator: tiny_qa\n    inputs: [text]\n{SINK}"
    );
    let err = validate(&yaml, &fixture_operators()).await;
    assert!(
        err.contains("p.yaml:7:5: steps[0].inputs: tiny_qa (answer) takes 2 argument(s) (question, context: Utf8 | LargeUtf8 | Utf8View), got 1"),
        "{err}"
    );
}

#[tokio::test]
async fn tag_tokens_on_null_empty_and_huge_texts() {
    let (ctx, _ops) = context_with(&["tiny_ner"]);
    let huge = "Maria Garcia met the team in Berlin. ".repeat(2_000);
    register_texts(&ctx, &[None, Some(""), Some("   "), Some(&huge)]);
    let batches = sql(&ctx, "SELECT tiny_ner(text) FROM t ORDER BY id").await;
    let l = batches[0].column(0).as_list::<i32>();
    assert!(l.is_null(0));
    assert_eq!(
        l.value(1).len(),
        0,
        "empty text, no entities (as transformers)"
    );
    assert_eq!(l.value(2).len(), 0);
    let entities = l.value(3);
    let ends = entities
        .as_struct()
        .column_by_name("end")
        .unwrap()
        .as_primitive::<ferry::datafusion::arrow::datatypes::Int64Type>()
        .clone();
    // Strided windows cover the whole text, not just the first window.
    assert!(ends.values().iter().max().copied().unwrap_or(0) > (huge.chars().count() as i64) - 100);
}

/// A text whose token ids run past the model's embedding table makes ONNX Runtime fail the
/// whole call; the core splits the call until the failing rows are alone, so only they are
/// null and every other row of the batch gets the result it gets on its own.
#[tokio::test]
async fn a_poisoned_input_fails_its_row_not_its_batch() {
    let (ctx, ops) = context_with(&["tiny_short_vocab"]);
    // "the movie was good" has token ids over 150, the model's vocabulary size.
    let mut texts = vec![Some("a b c"), Some("the movie was good"), Some("x y z")];
    for _ in 0..5 {
        texts.extend([Some("h"), Some("a b"), None]);
    }
    texts.push(Some("great product would buy again"));
    register_texts(&ctx, &texts);
    let batches = sql(&ctx, "SELECT tiny_short_vocab(text) FROM t ORDER BY id").await;
    let s = batches[0].column(0).as_struct();
    assert_eq!(s.len(), texts.len());
    let poisoned = [1, texts.len() - 1];
    for (i, t) in texts.iter().enumerate() {
        let null_expected = t.is_none() || poisoned.contains(&i);
        assert_eq!(s.is_null(i), null_expected, "row {i} {t:?}");
    }
    let op = ops.built().next().unwrap();
    assert_eq!(op.row_errors(), 2, "the two poisoned rows are counted");
    // The surviving rows equal what each gets alone.
    let (alone_ctx, _o) = context_with(&["tiny_short_vocab"]);
    register_texts(&alone_ctx, &[Some("a b c")]);
    let alone = sql(&alone_ctx, "SELECT tiny_short_vocab(text) FROM t").await;
    let alone = alone[0].column(0).as_struct();
    let score = |s: &ferry::datafusion::arrow::array::StructArray, i: usize| {
        s.column(1)
            .as_primitive::<ferry::datafusion::arrow::datatypes::Float64Type>()
            .value(i)
    };
    assert!((score(s, 0) - score(alone, 0)).abs() < 1e-6);
}
