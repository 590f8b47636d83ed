//! Generation throughput: new tokens per second of ferry's generation core against optimum's
//! ORT models' `.generate` on the same ONNX files, token ids, batches and search.
//!
//! `cargo bench --bench generation` (FERRY_BENCH_FILTER: cases whose name contains it;
//! FERRY_BENCH_PROMPTS, default 32; FERRY_BENCH_NEW_TOKENS, default 32). The baseline needs a
//! Python with tests/fixtures/requirements.txt (torch, transformers, optimum-onnx):
//! FERRY_BENCH_TORCH_PYTHON=.venv-fixtures/bin/python; without it only ferry's figures print.
//! Models: the tiny GPT-2 and BART fixtures and, when built (`make_fixtures.py smollm2`),
//! SmolLM2-135M-Instruct. Prompts are the example texts, one to four joined, so every batch
//! mixes lengths. Both sides run greedy and 4-beam search with `max_new_tokens` and count the
//! new tokens of every row up to its first EOS; the model's own processors (forced BOS/EOS, bad
//! words) run on both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod common;

use common::{bench_texts, env_usize, median};
use ferry::ops::generation::{
    DecoderOnly, EarlyStopping, Model, Processors, Search, Seq2Seq, generate,
};
use ferry::runtime::ExecutionProvider;
use ferry::runtime::pool::{ModelFile, PoolSize, SessionPool};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn open(dir: &Path) -> (SessionPool, Model) {
    let seq2seq = dir.join("encoder_model.onnx").is_file();
    let files: Vec<(&'static str, &str)> = if seq2seq {
        vec![
            ("encoder", "encoder_model.onnx"),
            ("decoder", "decoder_model.onnx"),
            ("decoder_with_past", "decoder_with_past_model.onnx"),
        ]
    } else {
        vec![("decoder", "model.onnx")]
    };
    let files: Vec<ModelFile> = files
        .iter()
        .map(|(role, f)| ModelFile {
            role,
            path: dir.join(f),
        })
        .collect();
    let pool = SessionPool::open(&files, ExecutionProvider::Cpu, PoolSize::for_machine()).unwrap();
    let info = |role| (role, pool.session(role).unwrap());
    let model = if seq2seq {
        Model::Seq2Seq(
            Seq2Seq::from_sessions(
                info("encoder"),
                info("decoder"),
                Some(info("decoder_with_past")),
            )
            .unwrap(),
        )
    } else {
        Model::DecoderOnly(
            DecoderOnly::from_session("decoder", pool.session("decoder").unwrap()).unwrap(),
        )
    };
    (pool, model)
}

/// The model's generation_config.json as a search (no sampling).
fn search(dir: &Path, beams: usize, max_new: usize) -> Search {
    let c = json(&dir.join("generation_config.json"));
    let list = |v: &serde_json::Value| -> Vec<i64> {
        match v {
            serde_json::Value::Array(a) => a.iter().filter_map(|t| t.as_i64()).collect(),
            v => v.as_i64().into_iter().collect(),
        }
    };
    let eos = list(&c["eos_token_id"]);
    Search {
        num_beams: beams,
        num_return_sequences: 1,
        length_penalty: 1.0,
        early_stopping: EarlyStopping::Heuristic,
        max_new_tokens: max_new,
        pad_token_id: c["pad_token_id"].as_i64().unwrap_or(eos[0]),
        decoder_start_token_id: c["decoder_start_token_id"].as_i64().unwrap_or(0),
        processors: Processors {
            forced_bos_token_id: c["forced_bos_token_id"].as_i64(),
            forced_eos_token_ids: list(&c["forced_eos_token_id"]),
            bad_words_ids: c["bad_words_ids"]
                .as_array()
                .map(|w| w.iter().map(list).collect())
                .unwrap_or_default(),
            ..Default::default()
        },
        eos_token_ids: eos,
        sampling: None,
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let n = env_usize("FERRY_BENCH_PROMPTS", 32);
    let max_new = env_usize("FERRY_BENCH_NEW_TOKENS", 32);
    let runs = env_usize("FERRY_BENCH_RUNS", 3).max(1);
    let filter = std::env::var("FERRY_BENCH_FILTER").unwrap_or_default();
    let python = std::env::var_os("FERRY_BENCH_TORCH_PYTHON").map(PathBuf::from);
    let texts = bench_texts(
        &root,
        &std::env::temp_dir().join("ferry-bench-generation.jsonl"),
        4 * n,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut models = vec![
        (
            "tiny-gpt2",
            root.join("tests/fixtures/models/tiny-gpt2-gen"),
        ),
        (
            "tiny-bart",
            root.join("tests/fixtures/models/tiny-bart-gen"),
        ),
    ];
    if root.join("models/smollm2/model.onnx").is_file() {
        models.push(("smollm2", root.join("models/smollm2")));
    }
    println!(
        "{:<26} {:>12} {:>12} {:>7}   (new tokens/s; {n} prompts, max_new_tokens {max_new})",
        "case", "ferry", "optimum", "ratio"
    );
    for (name, dir) in &models {
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let context = if *name == "smollm2" { 256 } else { 40 };
        // One to four texts per prompt, so batches mix short and long rows.
        let prompts: Vec<Vec<i64>> = (0..n)
            .map(|i| {
                let text = texts[i * 4..i * 4 + 1 + i % 4].join(" ");
                let ids = tokenizer.encode(text.as_str(), true).unwrap();
                let mut ids: Vec<i64> = ids.get_ids().iter().map(|&t| t as i64).collect();
                ids.truncate(context);
                ids
            })
            .collect();
        let listing = std::env::temp_dir().join(format!("ferry-bench-generation-{name}.json"));
        std::fs::write(&listing, serde_json::to_vec(&prompts).unwrap()).unwrap();
        let (pool, model) = open(dir);
        for beams in [1, 4] {
            for batch in [1, 8, 32] {
                let case = format!(
                    "{name} {} batch {batch}",
                    if beams == 1 {
                        "greedy".to_string()
                    } else {
                        format!("beam{beams}")
                    }
                );
                if !case.contains(&filter) {
                    continue;
                }
                let s = search(dir, beams, max_new);
                let mut secs = Vec::new();
                let mut tokens = 0;
                for run in 0..=runs {
                    let (m, s, p) = (model.clone(), s.clone(), prompts.clone());
                    let start = Instant::now();
                    let t = rt
                        .block_on(pool.run(move |w| {
                            let mut tokens = 0;
                            for chunk in p.chunks(batch) {
                                for hyps in generate(w, &m, chunk, &s)? {
                                    tokens += hyps[0].tokens.len();
                                }
                            }
                            Ok::<_, String>(tokens)
                        }))
                        .unwrap()
                        .unwrap();
                    if run > 0 {
                        secs.push(start.elapsed().as_secs_f64());
                        tokens = t;
                    }
                }
                let ferry_tps = tokens as f64 / median(secs);
                let base = python.as_ref().and_then(|py| {
                    let mut rates = Vec::new();
                    for _ in 0..runs {
                        let out = Command::new(py)
                            .arg(root.join("benches/generation_baselines.py"))
                            .args([dir.to_str().unwrap(), listing.to_str().unwrap()])
                            .args([batch.to_string(), beams.to_string(), max_new.to_string()])
                            .output()
                            .ok()?;
                        if !out.status.success() {
                            eprintln!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
                            return None;
                        }
                        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                        let t = v["new_tokens"].as_f64()?;
                        if t as usize != tokens {
                            eprintln!("{case}: optimum generated {t} new tokens, ferry {tokens}");
                        }
                        rates.push(v["seconds"].as_f64()? / t);
                    }
                    Some(1.0 / median(rates))
                });
                match base {
                    Some(b) => println!(
                        "{case:<26} {ferry_tps:>12.1} {b:>12.1} {:>7.2}",
                        ferry_tps / b
                    ),
                    None => println!("{case:<26} {ferry_tps:>12.1} {:>12} {:>7}", "-", "-"),
                }
            }
        }
    }
}
