//! Generation throughput: new tokens per second of ferry's generation core against optimum's
//! ORT models' `.generate` on the same ONNX files, token ids, batches and search, and (SmolLM2)
//! against onnxruntime-genai on the same checkpoint built by its model builder.
//!
//! `cargo bench --bench generation` (FERRY_BENCH_FILTER: cases whose name contains it;
//! FERRY_BENCH_PROMPTS, default 32; FERRY_BENCH_NEW_TOKENS, default 32). "batch N" is N rows
//! at a time: ferry's continuous batching keeps N rows generating (a row that ends is replaced
//! by a waiting one), ferry's static figure and the baselines run the prompts N at a time,
//! each batch until its last row ends. The baselines need a Python with
//! tests/fixtures/requirements.txt (torch, transformers, optimum-onnx):
//! FERRY_BENCH_TORCH_PYTHON=.venv-fixtures/bin/python; without it only ferry's figures print.
//! onnxruntime-genai runs when models/smollm2-genai exists (`python benches/genai_baseline.py
//! build models/smollm2-genai`). A last section reports peak memory of 4-beam generation over
//! the prompts at several `max_batch_tokens` budgets, each in a process of its own.
//! Models: the tiny GPT-2 and BART fixtures and, when built (`make_fixtures.py smollm2`),
//! SmolLM2-135M-Instruct. Prompts are the example texts, one to four joined, so every batch
//! mixes lengths (SmolLM2: asked to summarize them in one sentence, with its chat template).
//! Every side runs greedy and 4-beam search with `max_new_tokens` and counts the new tokens of
//! every row up to its first EOS; the model's own processors (forced BOS/EOS, bad words) run on
//! all.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod common;

use common::{bench_texts, env_usize, median, peak_rss_mb};
use ferry::ops::generation::task::GenerationSettings;
use ferry::ops::generation::{
    DecoderOnly, Limits, Model, Search, Seq2Seq, generate, generate_within,
};
use ferry::runtime::ExecutionProvider;
use ferry::runtime::pool::{ModelFile, PoolSize, SessionPool};

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
        .map(|(role, f)| ModelFile::new(role, dir.join(f)))
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

/// The model's generation_config.json (over config.json) as a search (no sampling).
fn search(dir: &Path, beams: usize, max_new: usize) -> Search {
    let settings = GenerationSettings {
        num_beams: Some(beams),
        do_sample: Some(false),
        ..Default::default()
    };
    let settings = settings.or(GenerationSettings::of_model(dir).unwrap());
    Search {
        max_new_tokens: max_new,
        ..settings.search(None, None).unwrap()
    }
}

/// Runs `python script args..` `runs` times and returns its median new tokens per second,
/// warning when its token count differs from ferry's.
fn baseline(
    python: &Path,
    script: &Path,
    args: &[String],
    runs: usize,
    case: &str,
    tokens: usize,
) -> Option<f64> {
    let mut rates = Vec::new();
    for _ in 0..runs {
        let out = Command::new(python).arg(script).args(args).output().ok()?;
        if !out.status.success() {
            eprintln!(
                "{case}: baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let t = v["new_tokens"].as_f64()?;
        if t as usize != tokens {
            eprintln!(
                "{case}: {} generated {t} new tokens, ferry {tokens}",
                script.display()
            );
        }
        rates.push(v["seconds"].as_f64()? / t);
    }
    Some(1.0 / median(rates))
}

/// The prompts of a model: one to four example texts each, so every batch mixes lengths. A
/// model with a chat template (SmolLM2) gets them as the summarize operator of
/// `pipelines/summaries.yaml` does: "Summarize in one sentence: {text}" as a user message, so
/// replies end (EOS) at different lengths.
fn prompts(dir: &Path, texts: &[String], n: usize, context: usize) -> Vec<Vec<i64>> {
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let chat = ferry::ops::generation::chat::ChatTemplate::from_dir(dir).unwrap();
    (0..n)
        .map(|i| {
            let text = texts[i * 4..i * 4 + 1 + i % 4].join(" ");
            let ids = match &chat {
                Some(chat) => {
                    let message = format!("Summarize in one sentence: {text}");
                    let prompt = chat.render(&[("user", &message)], true).unwrap();
                    tokenizer.encode(prompt.as_str(), false).unwrap()
                }
                None => tokenizer.encode(text.as_str(), true).unwrap(),
            };
            let mut ids: Vec<i64> = ids.get_ids().iter().map(|&t| t as i64).collect();
            ids.truncate(context);
            ids
        })
        .collect()
}

/// Child process of the memory section: 4-beam generation over the prompts within a budget;
/// prints peak RSS after loading and at the end, in MB.
fn memory_child(dir: &Path, listing: &Path, max_new: usize, budget: usize) {
    let p: Vec<Vec<i64>> = serde_json::from_slice(&std::fs::read(listing).unwrap()).unwrap();
    let (pool, model) = open(dir);
    let s = search(dir, 4, max_new);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One short generation first, so that ONNX Runtime's own buffers are counted as loaded.
    let (m, s2, first) = (model.clone(), s.clone(), vec![p[0].clone()]);
    rt.block_on(pool.run(move |w| generate(w, &m, &first, &s2)))
        .unwrap()
        .unwrap();
    let loaded = peak_rss_mb();
    let limits = Limits {
        rows: usize::MAX,
        tokens: budget,
    };
    rt.block_on(pool.run(move |w| generate_within(w, &model, &p, &s, limits)))
        .unwrap()
        .unwrap();
    println!("{loaded} {}", peak_rss_mb());
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let n = env_usize("FERRY_BENCH_PROMPTS", 32);
    let max_new = env_usize("FERRY_BENCH_NEW_TOKENS", 32);
    if let Ok(child) = std::env::var("FERRY_BENCH_MEMORY_CHILD") {
        let mut parts = child.split('|');
        let (dir, listing, budget) = (
            PathBuf::from(parts.next().unwrap()),
            PathBuf::from(parts.next().unwrap()),
            parts.next().unwrap().parse().unwrap(),
        );
        memory_child(&dir, &listing, max_new, budget);
        return;
    }
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
    let genai = root.join("models/smollm2-genai");
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}   (new tokens/s; {n} prompts, max_new_tokens {max_new})",
        "case", "ferry", "static", "optimum", "ort-genai", "/optimum", "/genai"
    );
    for (name, dir) in &models {
        // The tiny models have 64 positions: a decoder-only prompt leaves room for the new tokens.
        let context = match *name {
            "smollm2" => 256,
            "tiny-gpt2" => 64usize.saturating_sub(max_new).max(8),
            _ => 40,
        };
        let prompts = prompts(dir, &texts, n, context);
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
                // (continuous, static): seconds per run, and new tokens.
                let timed = |continuous: bool| {
                    let mut secs = Vec::new();
                    let mut tokens = 0;
                    for run in 0..=runs {
                        let (m, s, p) = (model.clone(), s.clone(), prompts.clone());
                        let start = Instant::now();
                        let t = rt
                            .block_on(pool.run(move |w| {
                                let mut tokens = 0;
                                let results = if continuous {
                                    let limits = Limits {
                                        rows: batch,
                                        tokens: usize::MAX,
                                    };
                                    generate_within(w, &m, &p, &s, limits)?
                                } else {
                                    let mut all = Vec::new();
                                    for chunk in p.chunks(batch) {
                                        all.extend(generate(w, &m, chunk, &s)?);
                                    }
                                    all
                                };
                                for hyps in results {
                                    tokens += hyps[0].tokens.len();
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
                    (tokens as f64 / median(secs), tokens)
                };
                let (ferry_tps, tokens) = timed(true);
                let (static_tps, _) = timed(false);
                let args = vec![
                    dir.display().to_string(),
                    listing.display().to_string(),
                    batch.to_string(),
                    beams.to_string(),
                    max_new.to_string(),
                ];
                let optimum = python.as_ref().and_then(|py| {
                    let script = root.join("benches/generation_baselines.py");
                    baseline(py, &script, &args, runs, &case, tokens)
                });
                let ort_genai = python
                    .as_ref()
                    .filter(|_| *name == "smollm2" && genai.is_dir())
                    .and_then(|py| {
                        let mut args = args.clone();
                        args[0] = genai.display().to_string();
                        args.insert(0, "run".into());
                        let script = root.join("benches/genai_baseline.py");
                        baseline(py, &script, &args, runs, &case, tokens)
                    });
                let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                let ratio =
                    |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}", ferry_tps / v));
                println!(
                    "{case:<24} {ferry_tps:>9.1} {static_tps:>9.1} {:>9} {:>9} {:>8} {:>8}",
                    show(optimum),
                    show(ort_genai),
                    ratio(optimum),
                    ratio(ort_genai)
                );
            }
        }
    }
    // Memory: 4 beams over every prompt at once, within budgets of cache tokens.
    let (name, dir) = models.last().unwrap();
    if !format!("{name} memory").contains(&filter) {
        return;
    }
    let listing = std::env::temp_dir().join(format!("ferry-bench-generation-{name}.json"));
    println!("\n{name}, 4 beams, {n} prompts: peak RSS over the loaded model by max_batch_tokens");
    for budget in [2048, 8192, 32768, usize::MAX] {
        let out = Command::new(std::env::current_exe().unwrap())
            .env(
                "FERRY_BENCH_MEMORY_CHILD",
                format!("{}|{}|{budget}", dir.display(), listing.display()),
            )
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [loaded, peak] = v[..] {
            let label = if budget == usize::MAX {
                "unbounded".to_string()
            } else {
                budget.to_string()
            };
            println!(
                "  max_batch_tokens {label:>9}: +{:.0} MB (loaded {loaded:.0} MB)",
                peak - loaded
            );
        } else {
            eprintln!(
                "memory child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
