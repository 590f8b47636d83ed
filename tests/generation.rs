//! Generation against `transformers`' `generate` (tests/fixtures/golden/generation.json, made
//! by tests/fixtures/generation.py; optimum's ORT models reproduced every golden there).

use std::path::PathBuf;

use ferry::ops::generation::{DecoderOnly, Stopping, greedy};
use ferry::runtime::ExecutionProvider;
use ferry::runtime::pool::{ModelFile, PoolSize, SessionPool};
use serde_json::Value;

use crate::util::root;

fn goldens() -> Value {
    let path = root().join("tests/fixtures/golden/generation.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

fn model_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

/// A pool of one worker with one session, the model file as the `decoder`.
fn decoder_pool(path: PathBuf) -> SessionPool {
    SessionPool::open(
        &[ModelFile {
            role: "decoder",
            path,
        }],
        ExecutionProvider::Cpu,
        PoolSize {
            workers: 1,
            threads_per_worker: 1,
        },
    )
    .unwrap()
}

/// The prompt's token ids as the golden records them, after checking that the model's own
/// tokenizer.json gives them (the long prompt keeps its last tokens, the pipeline's "hole").
fn prompt_ids(dir: &std::path::Path, row: &Value, keep: usize) -> Vec<i64> {
    let want = ids(&row["greedy"]["input_ids"]);
    let prompt = row["prompt"].as_str().unwrap();
    if !prompt.is_empty() {
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let encoding = tokenizer.encode(prompt, true).unwrap();
        let mut got: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
        if got.len() > keep {
            got.drain(..got.len() - keep);
        }
        assert_eq!(got, want, "tokens of {prompt:?}");
    }
    want
}

/// Greedy decoding of GPT-2 and Llama (grouped-query attention) exports with their KV cache
/// gives transformers' tokens, one prompt at a time and all prompts in one left-padded batch
/// (rows finishing early leave the batch).
#[tokio::test]
async fn greedy_decoding_matches_transformers_token_for_token() {
    let g = goldens();
    let max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
    for name in ["tiny-gpt2-gen", "tiny-llama-gen"] {
        let dir = model_dir(name);
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let eos = config["eos_token_id"].as_i64().unwrap();
        let pad = config["pad_token_id"].as_i64().unwrap_or(eos);
        let pool = decoder_pool(dir.join("model.onnx"));
        let model = DecoderOnly::from_session("decoder", pool.session("decoder").unwrap()).unwrap();
        assert_eq!(model.layers.len(), 2, "{name}");
        let rows = g["models"][name].as_array().unwrap();
        let prompts: Vec<Vec<i64>> = rows
            .iter()
            .map(|r| prompt_ids(&dir, r, 64 - max_new))
            .collect();
        let want: Vec<Vec<i64>> = rows
            .iter()
            .map(|r| ids(&r["greedy"]["tokens"][0]))
            .collect();
        let stopping = Stopping {
            max_new_tokens: max_new,
            eos_token_ids: vec![eos],
        };
        let (m, s, p) = (model.clone(), stopping.clone(), prompts.clone());
        let one_by_one = pool
            .run(move |w| {
                p.iter()
                    .map(|prompt| {
                        greedy(w, &m, std::slice::from_ref(prompt), &s, pad)
                            .map(|mut o| o.remove(0))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one_by_one, want, "{name}, one prompt at a time");
        let batched = pool
            .run(move |w| greedy(w, &model, &prompts, &stopping, pad))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batched, want, "{name}, all prompts in one batch");
    }
}

/// A model exported without its cache is refused with what to do, and empty prompts are errors.
#[tokio::test]
async fn generation_needs_a_cache_and_tokens() {
    let pool = decoder_pool(model_dir("tiny-bert-sentiment").join("model.onnx"));
    let err = DecoderOnly::from_session("decoder", pool.session("decoder").unwrap()).unwrap_err();
    assert!(err.contains("logits") || err.contains("past"), "{err}");

    let dir = model_dir("tiny-gpt2-gen");
    let pool = decoder_pool(dir.join("model.onnx"));
    let model = DecoderOnly::from_session("decoder", pool.session("decoder").unwrap()).unwrap();
    let stopping = Stopping {
        max_new_tokens: 4,
        eos_token_ids: vec![0],
    };
    let err = pool
        .run(move |w| greedy(w, &model, &[vec![5], vec![]], &stopping, 0))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.contains("prompt 1 has no tokens"), "{err}");
}
