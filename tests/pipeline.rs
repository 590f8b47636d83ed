//! End-to-end pipeline runs over every source and sink format.

use std::path::Path;
use std::sync::Arc;

use ferry::datafusion::arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use ferry::datafusion::arrow::datatypes::{DataType, Field, Schema};
use ferry::datafusion::prelude::*;

use crate::util::*;

/// `files` Parquet files `part-NN.parquet` of `rows` texts each in `dir`: `text(file, row)`.
pub fn write_text_parts(
    dir: &Path,
    files: usize,
    rows: usize,
    text: impl Fn(usize, usize) -> String,
) {
    std::fs::create_dir_all(dir).unwrap();
    for f in 0..files {
        let texts: Vec<String> = (0..rows).map(|i| text(f, i)).collect();
        let texts: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
        write_texts(&dir.join(format!("part-{f:02}.parquet")), &texts);
    }
}

/// Writes `texts` with ids to `path` in the format of its extension (through ferry's own sinks).
pub fn write_texts(path: &Path, texts: &[Option<&str>]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(
                (0..texts.len() as i64).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(texts.to_vec())),
        ],
    )
    .unwrap();
    let sink = ferry::sink::sink_for_path(path).unwrap();
    let mut w = ferry::sink::SinkWriter::open(&sink, schema).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
}

pub fn write_pipeline(dir: &Path, yaml: &str) -> std::path::PathBuf {
    let file = dir.join("p.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

async fn read(path: &Path) -> Vec<RecordBatch> {
    let ctx = SessionContext::new();
    ferry::source::register_file(&ctx, "out", path.to_str().unwrap())
        .await
        .unwrap();
    ctx.sql("SELECT * FROM out ORDER BY id")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap()
}

const TEXTS: &[Option<&str>] = &[
    Some("the weather today is sunny"),
    Some("great product would buy again"),
    None,
    Some(""),
    Some("stock markets fell sharply after the announcement"),
];

#[tokio::test]
async fn every_source_format_to_every_sink_format() {
    let dir = tempfile::tempdir().unwrap();
    for (src_ext, src_kind) in [
        ("parquet", "parquet"),
        ("arrow", "ipc"),
        ("csv", "csv"),
        ("jsonl", "jsonl"),
    ] {
        let input = dir.path().join(format!("in.{src_ext}"));
        write_texts(&input, TEXTS);
        for (sink_ext, sink_kind) in [("parquet", "parquet"), ("arrow", "ipc"), ("jsonl", "jsonl")]
        {
            let output = dir.path().join(format!("out-{src_ext}.{sink_ext}"));
            let yaml = format!(
                "name: t\nsource:\n  {src_kind}:\n    path: {}\nsteps:\n  - operator: tiny_embed\n    inputs: [text]\n    output: embedding\n  - operator: tiny_sentiment\n    inputs: [text]\nsink:\n  {sink_kind}:\n    path: {}\n",
                input.display(),
                output.display()
            );
            let file = write_pipeline(dir.path(), &yaml);
            let summary = ferry::engine::run_file(&file, &fixture_operators(), true)
                .await
                .unwrap_or_else(|e| panic!("{src_kind} -> {sink_kind}: {e:#}"));
            assert_eq!(summary.rows, TEXTS.len() as u64);
            let batches = read(&output).await;
            let b = &batches[0];
            let mut names: Vec<_> = b
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            if sink_kind == "jsonl" {
                // Reading JSON back infers columns in name order.
                names.sort();
                assert_eq!(
                    names,
                    ["embedding", "id", "text", "tiny_sentiment"],
                    "{src_kind} -> {sink_kind}"
                );
            } else {
                assert_eq!(
                    names,
                    ["id", "text", "embedding", "tiny_sentiment"],
                    "{src_kind} -> {sink_kind}"
                );
            }
            let emb_col = b.schema().index_of("embedding").unwrap();
            assert_eq!(b.num_rows(), TEXTS.len());
            let emb = b.column(emb_col);
            assert!(
                emb.is_null(2),
                "{src_kind} -> {sink_kind}: null text, null embedding"
            );
            // CSV cannot tell an empty string from a missing value: it reads back as null.
            if src_kind != "csv" {
                assert!(
                    !emb.is_null(3),
                    "{src_kind} -> {sink_kind}: empty text still embeds, as transformers does"
                );
            }
            let dir_entries: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("inprogress"))
                .collect();
            assert!(
                dir_entries.is_empty(),
                "temporary files left: {dir_entries:?}"
            );
        }
    }
}

#[tokio::test]
async fn sql_steps_before_and_after_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_texts(&input, TEXTS);
    let output = dir.path().join("out.csv");
    let yaml = format!(
        r#"name: t
source:
  parquet:
    path: {}
steps:
  - sql: SELECT id, text FROM input WHERE text IS NOT NULL AND text <> ''
  - operator: tiny_sentiment
    inputs: [text]
    output: s
  - sql: SELECT id, s['label'] AS label, s['score'] AS score FROM input
sink:
  csv:
    path: {}
"#,
        input.display(),
        output.display()
    );
    let file = write_pipeline(dir.path(), &yaml);
    let summary = ferry::engine::run_file(&file, &fixture_operators(), true)
        .await
        .unwrap();
    assert_eq!(summary.rows, 3);
    let text = std::fs::read_to_string(&output).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("id,label,score"));
    assert_eq!(lines.count(), 3);
}

#[tokio::test]
async fn a_failed_run_leaves_no_partial_file_and_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_texts(&input, &[Some("1"), Some("2"), Some("not a number")]);
    let output = dir.path().join("out.parquet");
    std::fs::write(&output, b"previous result").unwrap();
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: {}\nsteps:\n  - sql: SELECT id, CAST(text AS BIGINT) AS n FROM input\nsink:\n  parquet:\n    path: {}\n",
        input.display(),
        output.display()
    );
    let file = write_pipeline(dir.path(), &yaml);
    let err = ferry::engine::run_file(&file, &fixture_operators(), true)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("not a number"), "{err:#}");
    assert_eq!(std::fs::read(&output).unwrap(), b"previous result");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn results_keep_input_order_across_length_sorted_chunks() {
    // 50 texts of shuffled lengths, batch_size 4: chunks are formed by length, results must not be.
    let texts: Vec<String> = (0..50).map(|i| "word ".repeat((i * 7) % 23 + 1)).collect();
    let (ctx, _ops) = context_with(&["tiny_embed"]);
    let refs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
    register_texts(&ctx, &refs);
    let all = sql(&ctx, "SELECT id, tiny_embed(text) AS e FROM t ORDER BY id").await;
    // Embedding each text alone must give the same vector as in the big batch.
    for i in [0usize, 13, 49] {
        let one = sql(
            &ctx,
            &format!("SELECT tiny_embed(text) FROM t WHERE id = {i}"),
        )
        .await;
        let a = all[0].column(1).as_fixed_size_list().value(i);
        let b = one[0].column(0).as_fixed_size_list().value(0);
        let a: Vec<f64> = a
            .as_primitive::<ferry::datafusion::arrow::datatypes::Float32Type>()
            .values()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let b: Vec<f64> = b
            .as_primitive::<ferry::datafusion::arrow::datatypes::Float32Type>()
            .values()
            .iter()
            .map(|&v| v as f64)
            .collect();
        assert_close_vectors(&a, &b, &format!("row {i}"));
    }
}

#[tokio::test]
async fn parquet_source_from_a_directory_and_a_glob() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_texts(&data.join("a.parquet"), &[Some("one"), Some("two")]);
    write_texts(&data.join("b.parquet"), &[Some("three")]);
    std::fs::write(data.join("notes.txt"), "not data").unwrap();
    for path in [
        data.display().to_string(),
        format!("{}/*.parquet", data.display()),
    ] {
        let output = dir.path().join("out.parquet");
        let yaml = format!(
            "name: t\nsource:\n  parquet:\n    path: {path}\nsteps:\n  - operator: tiny_sentiment\n    inputs: [text]\nsink:\n  parquet:\n    path: {}\n",
            output.display()
        );
        let file = write_pipeline(dir.path(), &yaml);
        let summary = ferry::engine::run_file(&file, &fixture_operators(), true)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e:#}"));
        assert_eq!(summary.rows, 3, "{path}");
    }
}

#[tokio::test]
async fn two_input_operators_in_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 0, \"q\": \"Who works at Acme?\", \"c\": \"John Smith works at Acme Corporation in New York.\"}\n\
         {\"id\": 1, \"q\": \"Where?\", \"c\": \"In Paris, then Tokyo.\"}\n",
    )
    .unwrap();
    let output = dir.path().join("out.parquet");
    let yaml = format!(
        "name: t\nsource:\n  jsonl:\n    path: {}\nsteps:\n  - operator: tiny_qa\n    inputs: [q, c]\n    output: a\n  - operator: tiny_sentiment\n    inputs: [q, c]\n    output: pair\n  - operator: tiny_ner\n    inputs: [c]\n    output: entities\nsink:\n  parquet:\n    path: {}\n",
        input.display(),
        output.display()
    );
    let file = write_pipeline(dir.path(), &yaml);
    let summary = ferry::engine::run_file(&file, &fixture_operators(), true)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(summary.rows, 2);
    let batches = read(&output).await;
    let b = &batches[0];
    let a = b.column(b.schema().index_of("a").unwrap()).as_struct();
    let answer = a.column(0).as_string::<i32>().value(0);
    assert!(
        "John Smith works at Acme Corporation in New York.".contains(answer),
        "{answer}"
    );
    assert!(b.schema().index_of("pair").is_ok() && b.schema().index_of("entities").is_ok());
}

/// DataFusion reads Parquet strings as `Utf8View`; outputs still declare plain strings, so
/// that pyarrow (whose `take` has no kernel for `string_view`), pandas, polars, DuckDB and
/// Spark read them as ordinary strings.
#[tokio::test]
async fn outputs_hold_plain_strings_that_pyarrow_sorts() {
    use ferry::datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_texts(&input, TEXTS);
    for ext in ["parquet", "arrow"] {
        let output = dir.path().join(format!("out.{ext}"));
        let yaml = format!(
            "name: t\nsource:\n  parquet:\n    path: {}\nsteps:\n  - sql: SELECT id, text, upper(text) AS shout FROM input\n  - operator: tiny_sentiment\n    inputs: [text]\n    output: s\nsink:\n  {}:\n    path: {}\n",
            input.display(),
            if ext == "arrow" { "ipc" } else { ext },
            output.display()
        );
        let file = write_pipeline(dir.path(), &yaml);
        ferry::engine::run_file(&file, &fixture_operators(), true)
            .await
            .unwrap();
        if ext == "parquet" {
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&output).unwrap())
                    .unwrap();
            let schema = reader.schema();
            for (name, want) in [("text", DataType::Utf8), ("shout", DataType::Utf8)] {
                assert_eq!(schema.field_with_name(name).unwrap().data_type(), &want);
            }
            let DataType::Struct(fields) = schema.field_with_name("s").unwrap().data_type() else {
                panic!("{schema:?}");
            };
            assert_eq!(fields[0].data_type(), &DataType::Utf8, "{schema:?}");
        }
        let read = if ext == "parquet" {
            "pq.read_table(path)"
        } else {
            "pa.ipc.open_file(path).read_all()"
        };
        let out = run_python_with_pyarrow(&format!(
            "import pyarrow as pa, pyarrow.parquet as pq\npath = {:?}\nt = {read}.sort_by([('id', 'descending')])\nprint(t.schema.field('text').type, t.schema.field('s').type)\nprint(t.column('id').to_pylist())",
            output.display().to_string()
        ));
        assert!(out.contains("string struct<label: string"), "{out}");
        assert!(out.contains("[4, 3, 2, 1, 0]"), "{out}");
    }
}

/// `lineage: true` adds which operator and which model (its files' hash) made each row.
#[tokio::test]
async fn lineage_columns_name_the_operator_and_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    write_texts(&input, TEXTS);
    let output = dir.path().join("out.parquet");
    let yaml = format!(
        "name: t\nsource:\n  parquet:\n    path: {}\nsteps:\n  - operator: tiny_sentiment\n    inputs: [text]\n    output: s\n    lineage: true\nsink:\n  parquet:\n    path: {}\n",
        input.display(),
        output.display()
    );
    let file = write_pipeline(dir.path(), &yaml);
    ferry::engine::run_file(&file, &fixture_operators(), true)
        .await
        .unwrap();
    let batches = read(&output).await;
    let hash =
        ferry::ops::cache::model_hash(Path::new(&fixture_model("tiny-bert-sentiment"))).unwrap();
    assert_eq!(hash.len(), 64);
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, TEXTS.len(), "every row has its lineage");
    for b in &batches {
        for i in 0..b.num_rows() {
            let text = |c: &str| {
                let col = b.column_by_name(c).unwrap();
                let col = ferry::datafusion::arrow::compute::cast(col, &DataType::Utf8).unwrap();
                col.as_string::<i32>().value(i).to_string()
            };
            assert_eq!(text("s_operator"), "tiny_sentiment");
            assert_eq!(text("s_model"), hash);
        }
    }
}
