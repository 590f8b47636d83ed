//! Operators against the `transformers` pipelines' outputs recorded by
//! tests/fixtures/make_fixtures.py.

use ferry::datafusion::arrow::array::{Array, AsArray};
use ferry::datafusion::arrow::datatypes::{Float32Type, Float64Type};

use crate::util::*;

/// Rows of a FixedSizeList<Float32> column as f64 vectors.
fn vectors(
    batches: &[ferry::datafusion::arrow::array::RecordBatch],
    col: usize,
) -> Vec<Option<Vec<f64>>> {
    let mut out = Vec::new();
    for b in batches {
        let a = b.column(col).as_fixed_size_list();
        for i in 0..a.len() {
            out.push((!a.is_null(i)).then(|| {
                a.value(i)
                    .as_primitive::<Float32Type>()
                    .values()
                    .iter()
                    .map(|&v| v as f64)
                    .collect()
            }));
        }
    }
    out
}

async fn check_pooled(op: &str, key: &str, cast: &str) {
    let g = golden("tiny-bert-embed");
    let texts = golden_texts(&g);
    let (ctx, _ops) = context_with(&[op]);
    let refs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
    register_texts(&ctx, &refs);
    let batches = sql(
        &ctx,
        &format!("SELECT {op}(arrow_cast(text, '{cast}')) FROM t ORDER BY id"),
    )
    .await;
    let got = vectors(&batches, 0);
    for (i, row) in g["rows"].as_array().unwrap().iter().enumerate() {
        let want = floats(&row[key]);
        assert_close_vectors(
            got[i].as_ref().unwrap(),
            &want,
            &format!("{op} row {i} {:?}", texts[i]),
        );
    }
}

#[tokio::test]
async fn embed_mean_matches_transformers() {
    check_pooled("tiny_embed", "mean", "Utf8").await;
}

#[tokio::test]
async fn embed_mean_normalized_matches_transformers_on_utf8view() {
    check_pooled("tiny_embed_norm", "mean_normalized", "Utf8View").await;
}

#[tokio::test]
async fn embed_cls_matches_transformers_on_large_utf8() {
    check_pooled("tiny_embed_cls", "cls", "LargeUtf8").await;
}

#[tokio::test]
async fn embed_pooling_none_returns_every_token_like_feature_extraction() {
    let g = golden("tiny-bert-embed");
    let texts = golden_texts(&g);
    let (ctx, _ops) = context_with(&["tiny_tokens"]);
    let refs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
    register_texts(&ctx, &refs);
    let batches = sql(&ctx, "SELECT tiny_tokens(text) FROM t ORDER BY id").await;
    let mut row = 0;
    for b in &batches {
        let list = b.column(0).as_list::<i32>();
        for i in 0..list.len() {
            let tokens = list.value(i);
            let tokens = tokens.as_fixed_size_list();
            let want = g["rows"][row]["token_embeddings"].as_array().unwrap();
            assert_eq!(tokens.len(), want.len(), "row {row}: token count");
            assert_eq!(
                tokens.len() as u64,
                g["rows"][row]["tokens"].as_u64().unwrap()
            );
            for (t, want_t) in want.iter().enumerate() {
                let got: Vec<f64> = tokens
                    .value(t)
                    .as_primitive::<Float32Type>()
                    .values()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                assert_close_vectors(&got, &floats(want_t), &format!("row {row} token {t}"));
            }
            row += 1;
        }
    }
    assert_eq!(row, texts.len());
}

/// (label, score) pairs of a Struct<label, score> array row.
fn label_score(s: &ferry::datafusion::arrow::array::StructArray, i: usize) -> (String, f64) {
    let label = s.column(0).as_string::<i32>().value(i).to_string();
    let score = s.column(1).as_primitive::<Float64Type>().value(i);
    (label, score)
}

#[track_caller]
fn assert_ranked(got: &[(String, f64)], want: &serde_json::Value, what: &str) {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w["label"].as_str().unwrap(), "{what}: label");
        let ws = w["score"].as_f64().unwrap();
        assert!((g.1 - ws).abs() <= 1e-4, "{what}: score {} vs {ws}", g.1);
    }
}

#[tokio::test]
async fn classify_top1_matches_transformers_and_keeps_nulls() {
    let g = golden("tiny-bert-sentiment");
    let texts = golden_texts(&g);
    let (ctx, _ops) = context_with(&["tiny_sentiment"]);
    let mut refs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
    refs.push(None);
    register_texts(&ctx, &refs);
    let batches = sql(&ctx, "SELECT tiny_sentiment(text) AS s FROM t ORDER BY id").await;
    let s = batches[0].column(0).as_struct();
    assert_eq!(s.len(), texts.len() + 1);
    for (i, row) in g["rows"].as_array().unwrap().iter().enumerate() {
        let got = label_score(s, i);
        assert_ranked(
            &[got],
            &serde_json::json!([row["top1"]]),
            &format!("row {i}"),
        );
    }
    assert!(s.is_null(texts.len()), "null text gives a null result");
}

#[tokio::test]
async fn classify_top_k_and_sigmoid_match_transformers() {
    for (op, model, key) in [
        ("tiny_sentiment_top2", "tiny-bert-sentiment", "top2"),
        ("tiny_topics", "tiny-bert-topics", "all"),
    ] {
        let g = golden(model);
        let texts = golden_texts(&g);
        let (ctx, _ops) = context_with(&[op]);
        let refs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
        register_texts(&ctx, &refs);
        let batches = sql(&ctx, &format!("SELECT {op}(text) FROM t ORDER BY id")).await;
        let list = batches[0].column(0).as_list::<i32>();
        for (i, row) in g["rows"].as_array().unwrap().iter().enumerate() {
            let items = list.value(i);
            let items = items.as_struct();
            let got: Vec<(String, f64)> = (0..items.len()).map(|j| label_score(items, j)).collect();
            assert_ranked(&got, &row[key], &format!("{op} row {i}"));
        }
    }
}

#[tokio::test]
async fn classify_struct_fields_are_usable_in_sql() {
    let (ctx, _ops) = context_with(&["tiny_sentiment"]);
    register_texts(
        &ctx,
        &[
            Some("great product would buy again"),
            Some("worst purchase ever"),
        ],
    );
    let batches = sql(
        &ctx,
        "SELECT id, tiny_sentiment(text)['label'] AS label, tiny_sentiment(text)['score'] AS score, tiny_sentiment(text) AS s FROM t ORDER BY id",
    )
    .await;
    let b = &batches[0];
    assert_eq!(b.num_rows(), 2);
    let (labels, scores) = (
        b.column(1).as_string::<i32>(),
        b.column(2).as_primitive::<Float64Type>(),
    );
    let whole = b.column(3).as_struct();
    for i in 0..2 {
        // The fields are the struct's own values.
        assert_eq!(
            (labels.value(i).to_string(), scores.value(i)),
            label_score(whole, i)
        );
        assert!(["negative", "neutral", "positive"].contains(&labels.value(i)));
    }
}

#[tokio::test]
async fn classify_sentence_pairs_match_transformers() {
    use ferry::datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
    use ferry::datafusion::datasource::MemTable;
    use std::sync::Arc;
    let g = golden("tiny-bert-sentiment-pairs");
    let rows = g["rows"].as_array().unwrap();
    let col = |key: &str| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter()
                .map(|r| r[key].as_str().unwrap().to_string())
                .collect::<Vec<_>>(),
        ))
    };
    let batch = RecordBatch::try_from_iter([("a", col("text")), ("b", col("text_pair"))]).unwrap();
    let (ctx, _ops) = context_with(&["tiny_sentiment", "tiny_sentiment_top2"]);
    ctx.register_table(
        "p",
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let batches = sql(
        &ctx,
        "SELECT tiny_sentiment(a, b), tiny_sentiment_top2(a, b) FROM p",
    )
    .await;
    let top1 = batches[0].column(0).as_struct();
    let top2 = batches[0].column(1).as_list::<i32>();
    for (i, row) in rows.iter().enumerate() {
        assert_ranked(
            &[label_score(top1, i)],
            &serde_json::json!([row["top1"]]),
            &format!("pair {i}"),
        );
        let items = top2.value(i);
        let items = items.as_struct();
        let got: Vec<(String, f64)> = (0..items.len()).map(|j| label_score(items, j)).collect();
        let want = serde_json::Value::Array(row["all"].as_array().unwrap()[..2].to_vec());
        assert_ranked(&got, &want, &format!("pair {i} top2"));
    }
}

#[tokio::test]
async fn tag_tokens_matches_transformers_for_every_strategy_and_stride() {
    let g = golden("tiny-bert-ner");
    let model = fixture_model("tiny-bert-ner");
    let mut variants: Vec<(String, String)> = Vec::new();
    for s in ["none", "simple", "first", "average", "max"] {
        variants.push((s.to_string(), format!("aggregation_strategy: {s}")));
    }
    variants.push((
        "simple_keep_o".into(),
        "aggregation_strategy: simple\n  ignore_labels: []".into(),
    ));
    for s in ["simple", "first", "average", "max"] {
        variants.push((
            format!("stride16_{s}"),
            format!("aggregation_strategy: {s}\n  stride: 16"),
        ));
    }
    let manifests: Vec<(String, String)> = variants
        .iter()
        .map(|(key, opts)| {
            (
                format!("ner_{key}"),
                format!("task: tag_tokens\nmodel: {model}\nbatch_size: 3\noptions:\n  {opts}\n"),
            )
        })
        .collect();
    let refs: Vec<(&str, String)> = manifests
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    let (ctx, _dir) = context_with_manifests(&refs);
    let texts = golden_texts(&g);
    let text_refs: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
    register_texts(&ctx, &text_refs);
    for ((key, _), (name, _)) in variants.iter().zip(&manifests) {
        let batches = sql(&ctx, &format!("SELECT {name}(text) FROM t ORDER BY id")).await;
        let list = batches[0].column(0).as_list::<i32>();
        let label_field = if key == "none" {
            "entity"
        } else {
            "entity_group"
        };
        for (i, row) in g["rows"].as_array().unwrap().iter().enumerate() {
            let want = row[key].as_array().unwrap();
            let items = list.value(i);
            let items = items.as_struct();
            let what = format!("{key} row {i} {:?}", texts[i]);
            assert_eq!(items.len(), want.len(), "{what}: entity count");
            for (j, w) in want.iter().enumerate() {
                let label = items
                    .column_by_name(label_field)
                    .unwrap()
                    .as_string::<i32>()
                    .value(j);
                let score = items
                    .column_by_name("score")
                    .unwrap()
                    .as_primitive::<Float32Type>()
                    .value(j);
                let word = items
                    .column_by_name("word")
                    .unwrap()
                    .as_string::<i32>()
                    .value(j);
                let start = items
                    .column_by_name("start")
                    .unwrap()
                    .as_primitive::<ferry::datafusion::arrow::datatypes::Int64Type>()
                    .value(j);
                let end = items
                    .column_by_name("end")
                    .unwrap()
                    .as_primitive::<ferry::datafusion::arrow::datatypes::Int64Type>()
                    .value(j);
                assert_eq!(label, w[label_field].as_str().unwrap(), "{what} #{j}");
                assert_eq!(word, w["word"].as_str().unwrap(), "{what} #{j}");
                assert_eq!(start, w["start"].as_i64().unwrap(), "{what} #{j}");
                assert_eq!(end, w["end"].as_i64().unwrap(), "{what} #{j}");
                let ws = w["score"].as_f64().unwrap();
                assert!(
                    (score as f64 - ws).abs() <= 1e-4,
                    "{what} #{j}: score {score} vs {ws}"
                );
            }
        }
    }
}

#[tokio::test]
async fn answer_matches_transformers_with_every_option() {
    use ferry::datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
    use ferry::datafusion::arrow::datatypes::Int64Type;
    use ferry::datafusion::datasource::MemTable;
    use std::sync::Arc;
    let g = golden("tiny-bert-qa");
    let model = fixture_model("tiny-bert-qa");
    let variants = [
        ("default", ""),
        ("top3", "options:\n  top_k: 3\n"),
        (
            "impossible",
            "options:\n  handle_impossible_answer: true\n  top_k: 2\n",
        ),
        (
            "short",
            "options:\n  max_answer_len: 3\n  doc_stride: 8\n  max_seq_len: 40\n",
        ),
    ];
    let manifests: Vec<(String, String)> = variants
        .iter()
        .map(|(key, opts)| {
            (
                format!("qa_{key}"),
                format!("task: answer\nmodel: {model}\nbatch_size: 4\n{opts}"),
            )
        })
        .collect();
    let refs: Vec<(&str, String)> = manifests
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    let (ctx, _dir) = context_with_manifests(&refs);
    let rows = g["rows"].as_array().unwrap();
    let col = |key: &str| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter()
                .map(|r| r[key].as_str().unwrap().to_string())
                .collect::<Vec<_>>(),
        ))
    };
    let ids: ArrayRef = Arc::new(ferry::datafusion::arrow::array::Int64Array::from(
        (0..rows.len() as i64).collect::<Vec<_>>(),
    ));
    let batch =
        RecordBatch::try_from_iter([("id", ids), ("q", col("question")), ("c", col("context"))])
            .unwrap();
    ctx.register_table(
        "qa",
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    for ((key, _), (name, _)) in variants.iter().zip(&manifests) {
        let batches = sql(&ctx, &format!("SELECT {name}(q, c) FROM qa ORDER BY id")).await;
        let column = batches[0].column(0);
        for (i, row) in rows.iter().enumerate() {
            let what = format!("{key} row {i}");
            let answers = match column.data_type() {
                ferry::datafusion::arrow::datatypes::DataType::List(_) => {
                    column.as_list::<i32>().value(i)
                }
                _ => column.slice(i, 1),
            };
            let answers = answers.as_struct();
            let want = row[*key].as_array().unwrap();
            assert_eq!(answers.len(), want.len(), "{what}: answers {answers:?}");
            for (j, w) in want.iter().enumerate() {
                let score = answers.column(1).as_primitive::<Float64Type>().value(j);
                let ws = w["score"].as_f64().unwrap();
                assert!(
                    (score - ws).abs() <= 1e-4,
                    "{what} #{j}: score {score} vs {ws}"
                );
                if ws < 1e-6 {
                    // Zero-score candidates are ranked arbitrarily by numpy's argpartition.
                    continue;
                }
                let text = answers.column(0).as_string::<i32>().value(j);
                let start = answers.column(2).as_primitive::<Int64Type>().value(j);
                let end = answers.column(3).as_primitive::<Int64Type>().value(j);
                assert_eq!(text, w["answer"].as_str().unwrap(), "{what} #{j}");
                assert_eq!(
                    (start, end),
                    (w["start"].as_i64().unwrap(), w["end"].as_i64().unwrap()),
                    "{what} #{j}"
                );
            }
        }
    }
}

/// Mean and cls pooling run in a session after the model's, where the model runs (on a GPU
/// the [batch, tokens, dim] token vectors never leave it): the pooled operators' pools hold a
/// `pooling` session that returns [batch, dim] Float32; `pooling: none` reads the tokens
/// itself and has none.
#[test]
fn embed_pools_in_a_session_after_the_model() {
    use ferry::ops::embed::POOLING;
    let (_ctx, mut ops) = context_with(&[]);
    for name in ["tiny_embed", "tiny_embed_norm", "tiny_embed_cls"] {
        let op = ops.get(name).unwrap();
        let pooling = op.pool.session(POOLING).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(pooling.outputs.len(), 1, "{name}");
        assert_eq!(pooling.outputs[0].shape, vec![-1, -1], "{name}");
        assert_eq!(
            pooling.outputs[0].element,
            Some(ferry::ort::value::TensorElementType::Float32)
        );
    }
    assert!(
        ops.get("tiny_tokens")
            .unwrap()
            .pool
            .session(POOLING)
            .is_none()
    );
}
