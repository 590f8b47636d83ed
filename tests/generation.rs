//! Generation against `transformers`' `generate` (tests/fixtures/golden/generation.json, made
//! by tests/fixtures/generation.py; optimum's ORT models reproduced every golden there).

use std::path::{Path, PathBuf};

use ferry::ops::generation::task::GenerationSettings;
use ferry::ops::generation::{
    DecoderOnly, Hypothesis, Limits, Model, Search, Seq2Seq, generate, generate_within,
};
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

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// How the model is exported: the files and the roles they take.
#[derive(Debug, Clone, Copy)]
enum Export {
    /// decoder-only `model.onnx` with past.
    DecoderOnly,
    /// encoder + decoder (first step) + decoder with past.
    Split,
    /// encoder + merged decoder (`use_cache_branch`).
    Merged,
    /// encoder + decoder without a cache: every step re-runs the whole prefix.
    NoCache,
}

/// Sessions of `files` in one single-threaded worker on the CPU.
fn one_worker(files: &[ModelFile]) -> SessionPool {
    SessionPool::open(
        files,
        ExecutionProvider::Cpu,
        PoolSize {
            workers: 1,
            threads_per_worker: 1,
        },
    )
    .unwrap()
}

fn open(dir: &Path, export: Export) -> (SessionPool, Model) {
    let files: Vec<(&'static str, &str)> = match export {
        Export::DecoderOnly => vec![("decoder", "model.onnx")],
        Export::Split => vec![
            ("encoder", "encoder_model.onnx"),
            ("decoder", "decoder_model.onnx"),
            ("decoder_with_past", "decoder_with_past_model.onnx"),
        ],
        Export::Merged => vec![
            ("encoder", "encoder_model.onnx"),
            ("decoder", "decoder_model_merged.onnx"),
        ],
        Export::NoCache => vec![
            ("encoder", "encoder_model.onnx"),
            ("decoder", "decoder_model.onnx"),
        ],
    };
    let pool = one_worker(
        &files
            .iter()
            .map(|(role, file)| ModelFile::new(role, dir.join(file)))
            .collect::<Vec<_>>(),
    );
    let info = |role| (role, pool.session(role).unwrap());
    let model = match export {
        Export::DecoderOnly => Model::DecoderOnly(
            DecoderOnly::from_session("decoder", pool.session("decoder").unwrap()).unwrap(),
        ),
        Export::Split => Model::Seq2Seq(
            Seq2Seq::from_sessions(
                info("encoder"),
                info("decoder"),
                Some(info("decoder_with_past")),
            )
            .unwrap(),
        ),
        Export::Merged | Export::NoCache => {
            Model::Seq2Seq(Seq2Seq::from_sessions(info("encoder"), info("decoder"), None).unwrap())
        }
    };
    (pool, model)
}

/// The model's generation_config.json (over config.json) with the golden's search settings on
/// top, as transformers' `generate(**settings)` takes them.
fn search_for(dir: &Path, settings: &Value, max_new_tokens: usize) -> Search {
    let settings = GenerationSettings::from_json(settings, "golden")
        .unwrap()
        .or(GenerationSettings::of_model(dir).unwrap());
    Search {
        max_new_tokens,
        ..settings.search(None, None).unwrap()
    }
}

/// The prompt's token ids as the golden records them, after checking that the model's own
/// tokenizer.json gives them (a long decoder-only prompt keeps its last tokens, the pipeline's
/// "hole").
fn prompt_ids(dir: &Path, row: &Value, keep: usize) -> Vec<i64> {
    let want = ids(&row["greedy"]["input_ids"]);
    let prompt = row["prompt"].as_str().unwrap();
    if !prompt.is_empty() {
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let encoding = tokenizer.encode(prompt, true).unwrap();
        let mut got: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
        if got.len() > keep {
            got.drain(..got.len() - keep);
        }
        if got.len() == want.len() {
            assert_eq!(got, want, "tokens of {prompt:?}");
        }
    }
    want
}

/// One model's goldens with one export: its sessions, rows and prompt ids.
struct Goldens {
    g: Value,
    name: String,
    max_new: usize,
    dir: PathBuf,
    pool: SessionPool,
    model: Model,
    prompts: Vec<Vec<i64>>,
}

impl Goldens {
    fn load(name: &str, export: Export) -> Goldens {
        let g = goldens();
        let max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
        let dir = model_dir(name);
        let (pool, model) = open(&dir, export);
        let keep = if matches!(model, Model::Seq2Seq(_)) {
            usize::MAX
        } else {
            64 - max_new
        };
        let prompts = g["models"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| prompt_ids(&dir, r, keep))
            .collect();
        Goldens {
            g,
            name: name.to_string(),
            max_new,
            dir,
            pool,
            model,
            prompts,
        }
    }

    fn rows(&self) -> &[Value] {
        self.g["models"][&self.name].as_array().unwrap()
    }

    fn seq2seq(&self) -> bool {
        matches!(self.model, Model::Seq2Seq(_))
    }

    fn search(&self, which: &str) -> Search {
        search_for(&self.dir, &self.g["searches"][which], self.max_new)
    }

    /// Every prompt's hypotheses: one prompt at a time (None), or within `limits`.
    async fn run(&self, search: &Search, limits: Option<Limits>) -> Vec<Vec<Hypothesis>> {
        let (m, s, p) = (self.model.clone(), search.clone(), self.prompts.clone());
        self.pool
            .run(move |w| match limits {
                Some(limits) => generate_within(w, &m, &p, &s, limits),
                None => p
                    .iter()
                    .map(|prompt| {
                        generate(w, &m, std::slice::from_ref(prompt), &s).map(|mut o| o.remove(0))
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .unwrap()
    }
}

/// Runs every golden of `name` with one export, one prompt at a time, all prompts in one
/// batch, and continuously batched (rows joining a running batch as others finish, by rows and
/// by a cache budget), and compares the token ids.
async fn check_goldens(name: &str, export: Export, searches: &[&str]) {
    let gold = Goldens::load(name, export);
    for &which in searches {
        let search = gold.search(which);
        // transformers pads shorter hypotheses with pad_token_id, or EOS when that is 0.
        let fill = if search.pad_token_id != 0 {
            search.pad_token_id
        } else {
            search.eos_token_ids[0]
        };
        for (how, limits) in [
            ("one prompt at a time", None),
            ("in one batch", Some(Limits::ALL)),
            (
                "two rows at a time",
                Some(Limits {
                    rows: 2,
                    tokens: usize::MAX,
                }),
            ),
            (
                "within a cache budget",
                Some(Limits {
                    rows: usize::MAX,
                    tokens: 3 * (24 + gold.max_new) * search.num_beams,
                }),
            ),
        ] {
            let results = gold.run(&search, limits).await;
            for (row, hyps) in gold.rows().iter().zip(&results) {
                let want = row[which]["tokens"].as_array().unwrap();
                assert_eq!(hyps.len(), want.len(), "{name} {export:?} {which} {how}");
                for (hyp, want) in hyps.iter().zip(want) {
                    let want = ids(want);
                    let mut got = hyp.tokens.clone();
                    if gold.seq2seq() {
                        got.insert(0, search.decoder_start_token_id);
                    }
                    assert!(
                        got.len() <= want.len()
                            && want[..got.len()] == got[..]
                            && want[got.len()..].iter().all(|&t| t == fill),
                        "{name} {export:?} {which} {how}, prompt {:?}: got {got:?}, transformers {want:?}",
                        row["prompt"]
                    );
                }
            }
        }
    }
}

const ALL: [&str; 3] = ["greedy", "beam2", "beam4"];

/// Rows that end at different steps (extra end tokens taken from the goldens' outputs) give the
/// same hypotheses one prompt at a time as when batched continuously: finished rows leave,
/// waiting rows join the running batch (decoder-only: its cache left-padded; encoder-decoder:
/// as a batch of their own), and cache positions that became padding are dropped.
async fn check_continuous(name: &str, export: Export, searches: &[&str]) {
    let gold = Goldens::load(name, export);
    let rows = gold.rows();
    for &which in searches {
        let mut search = gold.search(which);
        // One more end token: the one of the goldens' greedy outputs that ends most rows at
        // different steps.
        let outputs: Vec<Vec<i64>> = rows
            .iter()
            .map(|r| ids(&r["greedy"]["tokens"][0])[usize::from(gold.seq2seq())..].to_vec())
            .collect();
        let ends = |t: i64| -> std::collections::BTreeSet<usize> {
            outputs
                .iter()
                .map(|o| o.iter().position(|&x| x == t).unwrap_or(gold.max_new))
                .collect()
        };
        let extra = outputs
            .iter()
            .flatten()
            .copied()
            .max_by_key(|&t| (ends(t).len(), -t))
            .unwrap();
        search.eos_token_ids.push(extra);
        let alone = gold.run(&search, None).await;
        let lengths: std::collections::BTreeSet<usize> =
            alone.iter().map(|h| h[0].tokens.len()).collect();
        assert!(
            lengths.len() > 1,
            "{name} {which}: rows should end at different steps ({lengths:?})"
        );
        for limits in [
            Limits {
                rows: 2,
                tokens: usize::MAX,
            },
            Limits {
                rows: 3,
                tokens: usize::MAX,
            },
            Limits {
                rows: usize::MAX,
                tokens: 2 * (24 + gold.max_new) * search.num_beams,
            },
        ] {
            let got = gold.run(&search, Some(limits)).await;
            for ((a, b), row) in alone.iter().zip(&got).zip(rows) {
                assert_eq!(a.len(), b.len());
                for (a, b) in a.iter().zip(b) {
                    assert_eq!(
                        (&a.tokens, a.finish),
                        (&b.tokens, b.finish),
                        "{name} {export:?} {which} {limits:?}, prompt {:?}",
                        row["prompt"]
                    );
                    let close = match (a.score, b.score) {
                        (Some(x), Some(y)) => (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                        (x, y) => x == y,
                    };
                    assert!(close, "{name} {which}: scores {:?} {:?}", a.score, b.score);
                }
            }
        }
    }
}

/// Continuous batching changes no row's result: decoder-only (GPT-2, Llama) and
/// encoder-decoder (T5, split and merged decoders).
#[tokio::test]
async fn continuous_batching_gives_each_row_its_own_result() {
    for name in ["tiny-gpt2-gen", "tiny-llama-gen"] {
        check_continuous(name, Export::DecoderOnly, &ALL).await;
    }
    // The tiny BART and Marian give every prompt the same output, so their rows cannot end at
    // different steps; T5's do.
    check_continuous("tiny-t5-gen", Export::Split, &ALL).await;
    check_continuous("tiny-t5-gen", Export::Merged, &["greedy", "beam4"]).await;
}

/// GPT-2 and Llama (grouped-query attention) with their KV cache: greedy, 2 beams and 4 beams
/// (length_penalty 0.6, no_repeat_ngram_size 2, two sequences returned) give transformers'
/// tokens, one prompt at a time and all prompts in one left-padded batch.
#[tokio::test]
async fn decoder_only_generation_matches_transformers_token_for_token() {
    for name in ["tiny-gpt2-gen", "tiny-llama-gen"] {
        check_goldens(name, Export::DecoderOnly, &ALL).await;
    }
}

/// T5, BART (forced BOS and EOS) and Marian (pad as a bad word, forced EOS), exported as
/// optimum splits them (decoder + decoder with past): every search gives transformers' tokens.
#[tokio::test]
async fn encoder_decoder_generation_matches_transformers_token_for_token() {
    for name in ["tiny-t5-gen", "tiny-bart-gen", "tiny-marian-gen"] {
        check_goldens(name, Export::Split, &ALL).await;
    }
}

/// The same models through the merged decoder (`use_cache_branch`), and without a cache (the
/// decoder re-run over the whole prefix at every step).
#[tokio::test]
async fn merged_and_cacheless_decoders_give_the_same_tokens() {
    for name in ["tiny-t5-gen", "tiny-bart-gen", "tiny-marian-gen"] {
        check_goldens(name, Export::Merged, &["greedy", "beam4"]).await;
    }
    check_goldens("tiny-bart-gen", Export::NoCache, &["greedy", "beam2"]).await;
}

/// A model that cannot generate is refused with what to do, empty prompts are errors, and
/// impossible searches say why.
#[tokio::test]
async fn generation_needs_logits_tokens_and_a_possible_search() {
    let dir = model_dir("tiny-bert-sentiment");
    let pool = one_worker(&[ModelFile::new("decoder", dir.join("model.onnx"))]);
    let err = DecoderOnly::from_session("decoder", pool.session("decoder").unwrap()).unwrap_err();
    assert!(err.contains("[batch, sequence, vocabulary]"), "{err}");

    let dir = model_dir("tiny-gpt2-gen");
    let (pool, model) = open(&dir, Export::DecoderOnly);
    let g = goldens();
    let search = search_for(&dir, &g["searches"]["greedy"], 4);
    let (m, s) = (model.clone(), search.clone());
    let err = pool
        .run(move |w| generate(w, &m, &[vec![5], vec![]], &s))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.contains("prompt 1 has no tokens"), "{err}");

    let huge = Search {
        num_beams: 400,
        num_return_sequences: 1,
        ..search.clone()
    };
    let m = model.clone();
    let err = pool
        .run(move |w| generate(w, &m, &[vec![5]], &huge))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.contains("vocabulary"), "{err}");

    let bad = Search {
        num_return_sequences: 3,
        ..search.clone()
    };
    assert!(bad.check().unwrap_err().contains("num_return_sequences"));

    let none = Search {
        max_new_tokens: 0,
        ..search
    };
    let out = pool
        .run(move |w| generate(w, &model, &[vec![5]], &none))
        .await
        .unwrap()
        .unwrap();
    assert!(out[0][0].tokens.is_empty());
}

/// A context with one generation operator per (model, search) of the goldens, written as
/// manifests the way a user would: the pipeline's task, the model directory, and the search.
fn generation_operators(dir: &Path) -> ferry::ops::OperatorSet {
    let g = goldens();
    for (model, task) in [
        ("tiny-gpt2-gen", "generate"),
        ("tiny-llama-gen", "generate"),
        ("tiny-t5-gen", "summarize"),
        ("tiny-bart-gen", "summarize"),
        ("tiny-marian-gen", "translate"),
    ] {
        for search in ALL {
            let s = &g["searches"][search];
            let mut generation = format!(
                "max_new_tokens: {}, num_beams: {}",
                g["max_new_tokens"], s["num_beams"]
            );
            for key in [
                "length_penalty",
                "no_repeat_ngram_size",
                "num_return_sequences",
            ] {
                if !s[key].is_null() {
                    generation += &format!(", {key}: {}", s[key]);
                }
            }
            let full_text = if task == "generate" {
                "\n  return_full_text: false"
            } else {
                ""
            };
            let name = format!("{}_{search}", model.replace('-', "_"));
            std::fs::write(
                dir.join(format!("{name}.yaml")),
                format!(
                    "name: {name}\ntask: {task}\nmodel: {}\nbatch_size: 4\noptions:\n  generation: {{{generation}}}{full_text}\n",
                    model_dir(model).display()
                ),
            )
            .unwrap();
        }
    }
    ferry::ops::OperatorSet::new(ferry::ops::load_manifests(dir).unwrap())
}

/// The operators over SQL give the pipelines' texts (`generated_text` with
/// return_full_text=False, `summary_text`, `translation_text`) for every golden prompt and
/// search, with `num_return_sequences` 2 as a list; rows of mixed lengths run in one batch.
#[tokio::test]
async fn generation_operators_match_the_pipelines_text() {
    use ferry::datafusion::arrow::array::{Array, AsArray};
    let tmp = tempfile::tempdir().unwrap();
    let mut ops = generation_operators(tmp.path());
    let g = goldens();
    for (model, rows) in g["models"].as_object().unwrap() {
        let prompts: Vec<Option<&str>> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["prompt"].as_str())
            .collect();
        for search in ALL {
            let name = format!("{}_{search}", model.replace('-', "_"));
            let op = ops.get(&name).unwrap_or_else(|e| panic!("{e}"));
            let ctx = ferry::engine::session_context();
            ctx.register_udf(op.udf.clone());
            crate::util::register_texts(&ctx, &prompts);
            let batches = crate::util::sql(
                &ctx,
                &format!("SELECT {name}(text) AS out FROM t ORDER BY id"),
            )
            .await;
            let column = ferry::datafusion::arrow::compute::concat(
                &batches
                    .iter()
                    .map(|b| b.column(0).as_ref())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            for (i, row) in rows.as_array().unwrap().iter().enumerate() {
                let want = &row[search]["pipeline"];
                if want.is_null() {
                    continue; // the pipeline refuses an empty prompt
                }
                let want: Vec<&str> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap())
                    .collect();
                let got: Vec<String> = if want.len() > 1 {
                    let list = column.as_list::<i32>().value(i);
                    (0..list.len())
                        .map(|j| list.as_string::<i32>().value(j).to_string())
                        .collect()
                } else {
                    vec![column.as_string::<i32>().value(i).to_string()]
                };
                assert_eq!(got, want, "{name}, prompt {:?}", row["prompt"]);
            }
        }
    }
}

/// Bad manifests are refused when the operator loads, with what to change; null rows stay null
/// and an empty prompt starts from BOS as the fixture's reference did.
#[tokio::test]
async fn generation_operators_refuse_bad_settings_and_keep_nulls() {
    use ferry::datafusion::arrow::array::{Array, AsArray};
    let tmp = tempfile::tempdir().unwrap();
    let manifest = |name: &str, task: &str, model: &str, options: &str| {
        std::fs::write(
            tmp.path().join(format!("{name}.yaml")),
            format!(
                "name: {name}\ntask: {task}\nmodel: {}\noptions: {options}\n",
                model_dir(model).display()
            ),
        )
        .unwrap();
    };
    manifest(
        "ok",
        "generate",
        "tiny-gpt2-gen",
        "{generation: {max_new_tokens: 3}, details: true}",
    );
    manifest(
        "none_new",
        "generate",
        "tiny-gpt2-gen",
        "{generation: {max_new_tokens: 0}, return_full_text: false}",
    );
    manifest("seq2seq_as_generate", "generate", "tiny-bart-gen", "{}");
    manifest(
        "decoder_only_as_translate",
        "translate",
        "tiny-gpt2-gen",
        "{}",
    );
    manifest(
        "beam_sampling",
        "generate",
        "tiny-gpt2-gen",
        "{generation: {do_sample: true, num_beams: 2}}",
    );
    manifest(
        "too_many",
        "summarize",
        "tiny-bart-gen",
        "{generation: {num_beams: 2, num_return_sequences: 3}}",
    );
    manifest(
        "no_decoder",
        "summarize",
        "tiny-bart-gen",
        "{decoder: missing.onnx}",
    );
    manifest(
        "bad_lang",
        "translate",
        "tiny-marian-gen",
        "{tgt_lang: klingon}",
    );
    manifest(
        "bad_key",
        "summarize",
        "tiny-bart-gen",
        "{generation: {beams: 2}}",
    );
    let mut ops = ferry::ops::OperatorSet::new(ferry::ops::load_manifests(tmp.path()).unwrap());
    for (name, says) in [
        ("seq2seq_as_generate", "summarize or translate"),
        ("decoder_only_as_translate", "decoder-only"),
        ("beam_sampling", "sampling runs with num_beams 1"),
        ("too_many", "num_return_sequences"),
        ("no_decoder", "missing.onnx"),
        ("bad_lang", "klingon"),
        ("bad_key", "beams"),
    ] {
        let err = ops.get(name).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(says), "{name}: {err}");
    }

    let ctx = ferry::engine::session_context();
    for name in ["ok", "none_new"] {
        ctx.register_udf(ops.get(name).unwrap().udf.clone());
    }
    crate::util::register_texts(&ctx, &[Some("The quick brown fox"), None, Some("")]);
    let batches = crate::util::sql(
        &ctx,
        "SELECT ok(text) AS d, none_new(text) AS n FROM t ORDER BY id",
    )
    .await;
    let (d, n) = (
        batches[0].column(0).as_struct(),
        batches[0].column(1).as_string::<i32>(),
    );
    assert!(
        d.column_by_name("text")
            .unwrap()
            .as_string::<i32>()
            .value(0)
            .starts_with("The quick brown fox")
    );
    assert_eq!(
        d.column_by_name("tokens")
            .unwrap()
            .as_primitive::<ferry::datafusion::arrow::datatypes::Int32Type>()
            .value(0),
        3
    );
    assert_eq!(
        d.column_by_name("finish_reason")
            .unwrap()
            .as_string::<i32>()
            .value(0),
        "length"
    );
    assert!(d.is_null(1) && n.is_null(1), "a null prompt gives null");
    assert!(d.is_valid(2), "an empty prompt starts from BOS");
    assert_eq!(n.value(0), "", "max_new_tokens 0 generates nothing");
}

/// The real SmolLM2-135M-Instruct (built by `make_fixtures.py smollm2` from PyPI's GGUF into
/// models/smollm2, or kept in a machine's cache at ~/.cache/ferry/models/smollm2, where CI finds
/// it; skipped when absent): the chat template renders transformers' prompt ids, greedy decoding
/// gives transformers' tokens on every golden prompt, and the `generate` operator's reply, to a
/// text or to a conversation, is transformers' decoded text.
#[tokio::test]
async fn smollm2_chat_matches_transformers_when_built() {
    let cache = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/ferry/models/smollm2"))
        .unwrap_or_default();
    let Some(dir) = [root().join("models/smollm2"), cache]
        .into_iter()
        .find(|d| d.join("model.onnx").is_file())
    else {
        eprintln!("models/smollm2 is not built (tests/fixtures/make_fixtures.py smollm2): skipped");
        return;
    };
    let g = json(&root().join("tests/fixtures/golden/smollm2.json"));
    let max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
    let rows = g["rows"].as_array().unwrap();
    assert!(rows.len() >= 20);
    let chat = ferry::ops::generation::chat::ChatTemplate::from_dir(&dir)
        .unwrap()
        .unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for row in rows {
        let rendered = chat
            .render(&[("user", row["prompt"].as_str().unwrap())], true)
            .unwrap();
        let got: Vec<i64> = tokenizer
            .encode(rendered.as_str(), false)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(
            got,
            ids(&row["input_ids"]),
            "prompt ids of {:?}",
            row["prompt"]
        );
    }

    let (pool, model) = open(&dir, Export::DecoderOnly);
    let search = search_for(&dir, &serde_json::json!({"num_beams": 1}), max_new);
    let prompts: Vec<Vec<i64>> = rows.iter().map(|r| ids(&r["input_ids"])).collect();
    let got = pool
        .run(move |w| generate(w, &model, &prompts, &search))
        .await
        .unwrap()
        .unwrap();
    for (row, hyps) in rows.iter().zip(&got) {
        assert_eq!(
            hyps[0].tokens,
            ids(&row["tokens"]),
            "tokens for {:?}",
            row["prompt"]
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("smollm2.yaml"),
        format!(
            "name: smollm2\ntask: generate\nmodel: {}\nbatch_size: 8\noptions:\n  chat: true\n  generation: {{max_new_tokens: {max_new}}}\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut ops = ferry::ops::OperatorSet::new(ferry::ops::load_manifests(tmp.path()).unwrap());
    let ctx = ferry::engine::session_context();
    ctx.register_udf(ops.get("smollm2").unwrap().udf.clone());
    let prompts: Vec<Option<&str>> = rows.iter().map(|r| r["prompt"].as_str()).collect();
    crate::util::register_texts(&ctx, &prompts);
    // Each prompt as text (chat: true) and as a conversation of one user message.
    let batches = crate::util::sql(
        &ctx,
        "SELECT smollm2(text), smollm2(make_array(named_struct('role', 'user', 'content', text))) FROM t ORDER BY id",
    )
    .await;
    use ferry::datafusion::arrow::array::AsArray;
    for column in 0..2 {
        let texts: Vec<&str> = batches
            .iter()
            .flat_map(|b| {
                b.column(column)
                    .as_string::<i32>()
                    .iter()
                    .map(Option::unwrap)
            })
            .collect();
        for (row, text) in rows.iter().zip(texts) {
            assert_eq!(
                text,
                row["text"].as_str().unwrap(),
                "reply to {:?} (column {column})",
                row["prompt"]
            );
        }
    }
}

/// Sampling is seeded per row: the same run twice, and the same rows in batches of 1 or 8, give
/// the same texts; another seed or greedy search give others.
#[tokio::test]
async fn sampling_is_reproducible_and_independent_of_batches() {
    use ferry::datafusion::arrow::array::AsArray;
    let tmp = tempfile::tempdir().unwrap();
    for (name, batch, extra) in [
        (
            "sample_a",
            8,
            "do_sample: true, seed: 7, top_k: 20, top_p: 0.9, temperature: 0.8",
        ),
        (
            "sample_b",
            1,
            "do_sample: true, seed: 7, top_k: 20, top_p: 0.9, temperature: 0.8",
        ),
        (
            "sample_c",
            8,
            "do_sample: true, seed: 8, top_k: 20, top_p: 0.9, temperature: 0.8",
        ),
        ("greedy", 8, "do_sample: false"),
    ] {
        std::fs::write(
            tmp.path().join(format!("{name}.yaml")),
            format!(
                "name: {name}\ntask: generate\nmodel: {}\nbatch_size: {batch}\noptions: {{return_full_text: false, generation: {{max_new_tokens: 8, {extra}}}}}\n",
                model_dir("tiny-llama-gen").display()
            ),
        )
        .unwrap();
    }
    let mut ops = ferry::ops::OperatorSet::new(ferry::ops::load_manifests(tmp.path()).unwrap());
    let ctx = ferry::engine::session_context();
    for name in ["sample_a", "sample_b", "sample_c", "greedy"] {
        ctx.register_udf(ops.get(name).unwrap().udf.clone());
    }
    let prompts: Vec<String> = (0..12)
        .map(|i| format!("prompt number {i} is {}", "long ".repeat(i)))
        .collect();
    let refs: Vec<Option<&str>> = prompts.iter().map(|p| Some(p.as_str())).collect();
    crate::util::register_texts(&ctx, &refs);
    let q = "SELECT sample_a(text), sample_b(text), sample_c(text), greedy(text), sample_a(text) AS again FROM t ORDER BY id";
    let batches = crate::util::sql(&ctx, q).await;
    let col = |i: usize| -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| {
                b.column(i)
                    .as_string::<i32>()
                    .iter()
                    .map(|v| v.unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (a, b, c, greedy, again) = (col(0), col(1), col(2), col(3), col(4));
    assert_eq!(a, again, "the same run twice");
    assert_eq!(a, b, "batches of 8 and of 1");
    assert_ne!(a, c, "another seed");
    assert_ne!(a, greedy, "sampling is not greedy");
}

/// Conversations (a list of `{role, content}` per row) are rendered with the model's chat
/// template and stop strings end rows, as the text-generation pipeline does
/// (tests/fixtures/generation_extras.py: the tiny GPT-2 with a chat template, over optimum).
/// A conversation the template cannot take, or a model without a template, is a row error.
#[tokio::test]
async fn conversations_and_stop_strings_match_the_pipeline() {
    use ferry::datafusion::arrow::array::{Array, AsArray};
    let g: Value = json(&root().join("tests/fixtures/golden/generation_extras.json"));
    let tmp = tempfile::tempdir().unwrap();
    // The model with a chat template, and operators over it.
    let model = tmp.path().join("chatty");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(model_dir("tiny-gpt2-gen")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        model.join("chat_template.jinja"),
        g["chat_template"].as_str().unwrap(),
    )
    .unwrap();
    let max_new = &g["max_new_tokens"];
    let manifest = |name: &str, model: &Path, generation: String| {
        std::fs::write(
            tmp.path().join(format!("{name}.yaml")),
            format!(
                "name: {name}\ntask: generate\nmodel: {}\noptions:\n  return_full_text: false\n  details: true\n  generation: {{max_new_tokens: {max_new}{generation}}}\n",
                model.display()
            ),
        )
        .unwrap();
    };
    manifest("chat", &model, String::new());
    manifest("no_template", &model_dir("tiny-gpt2-gen"), String::new());
    let stops = g["stop_strings"].as_array().unwrap();
    for (i, s) in stops.iter().enumerate() {
        manifest(
            &format!("stop{i}"),
            &model,
            format!(", stop_strings: {}", s["stop"]),
        );
    }
    let mut ops = ferry::ops::OperatorSet::new(ferry::ops::load_manifests(tmp.path()).unwrap());
    let ctx = ferry::engine::session_context();
    for name in ["chat", "no_template", "stop0", "stop1", "stop2"] {
        ctx.register_udf(ops.get(name).unwrap().udf.clone());
    }
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    for chat in g["chats"].as_array().unwrap() {
        let messages: Vec<String> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "named_struct('role', {}, 'content', {})",
                    quote(m["role"].as_str().unwrap()),
                    quote(m["content"].as_str().unwrap())
                )
            })
            .collect();
        let query = format!(
            "SELECT chat(m) AS reply, no_template(m) AS refused FROM (SELECT make_array({}) AS m)",
            messages.join(", ")
        );
        let batches = crate::util::sql(&ctx, &query).await;
        let reply = batches[0].column(0).as_struct();
        assert_eq!(
            reply.column(0).as_string::<i32>().value(0),
            chat["reply"].as_str().unwrap(),
            "{:?}",
            chat["messages"]
        );
        assert!(batches[0].column(1).is_null(0), "no chat template: a null");
    }
    for (i, s) in stops.iter().enumerate() {
        crate::util::register_texts(&ctx, &[Some(s["prompt"].as_str().unwrap())]);
        let batches = crate::util::sql(&ctx, &format!("SELECT stop{i}(text) AS d FROM t")).await;
        let d = batches[0].column(0).as_struct();
        let text = d.column(0).as_string::<i32>().value(0);
        assert_eq!(
            text,
            s["text"].as_str().unwrap(),
            "stop string {}",
            s["stop"]
        );
        let finish = d.column(2).as_string::<i32>().value(0);
        assert_eq!(finish, "stop");
        ctx.deregister_table("t").unwrap();
    }
}

/// Deterministic values in [-1, 1) for model inputs.
fn waves(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 12.9898 + seed * 78.233).sin() * 43758.547).fract())
        .collect()
}

/// Whisper's decoder (merged, and with past as a split export has it), rewritten to take one
/// cross-attention cache row per recording shared by its beams, returns what the export
/// returns given that cache repeated for every beam (3 recordings x 4 beams, 5 cached
/// positions): the same logits and self-attention cache. Operators' model files of an
/// encoder-decoder get the rewrite where it applies (Whisper) and not where it does not (BART,
/// whose cross-attention has a mask per sequence).
#[tokio::test]
async fn shared_cross_attention_decodes_as_a_cache_per_beam() {
    let dir = model_dir("tiny-whisper");
    let merged = dir.join("decoder_model_merged.onnx");
    // A split export's decoder with past: the merged decoder's with-past branch as the graph.
    let work = tempfile::tempdir().unwrap();
    let with_past = work.path().join("decoder_with_past_model.onnx");
    std::fs::write(
        &with_past,
        with_past_branch(&std::fs::read(&merged).unwrap()),
    )
    .unwrap();
    for file in [merged, with_past] {
        check_shared_cross(file).await;
    }

    // What operators open.
    for (name, shares) in [("tiny-whisper", true), ("tiny-bart-gen", false)] {
        let dir = model_dir(name);
        let files =
            ferry::ops::generation::task::model_files(&dir, &Default::default(), "model.onnx")
                .unwrap();
        let pool = one_worker(&files);
        let info = |role| (role, pool.session(role).unwrap());
        let model = Seq2Seq::from_sessions(info("encoder"), info("decoder"), None).unwrap();
        assert_eq!(model.shared_cross, shares, "{name}");
    }
}

/// The with-past (`then`) branch of a merged decoder as a model of its own, taking the merged
/// model's inputs but `use_cache_branch` and `encoder_hidden_states` (what optimum's
/// `decoder_with_past_model.onnx` takes).
fn with_past_branch(merged: &[u8]) -> Vec<u8> {
    use onnx_protobuf::{Message, ModelProto};
    let mut model = ModelProto::parse_from_bytes(merged).unwrap();
    let top = model.graph.as_mut().unwrap();
    let branch = top.node[0]
        .attribute
        .iter()
        .find(|a| a.name == "then_branch")
        .and_then(|a| a.g.as_ref())
        .unwrap()
        .clone();
    let mut graph = branch;
    graph.initializer = std::mem::take(&mut top.initializer);
    graph.input = top
        .input
        .iter()
        .filter(|i| i.name != "use_cache_branch" && i.name != "encoder_hidden_states")
        .cloned()
        .collect();
    graph.output = top.output.clone();
    model.graph = Some(graph).into();
    model.write_to_bytes().unwrap()
}

/// The decoder `file` and its rewrite give the same logits and self-attention cache.
async fn check_shared_cross(file: PathBuf) {
    use ferry::ops::generation::shared_cross::{SOURCE_ROWS, share_cross_attention};
    use ferry::runtime::tensor::{Data, Input, read_f32};

    let mut shared = ModelFile::new("shared", file.clone());
    shared.edit = Some(share_cross_attention);
    let pool = one_worker(&[ModelFile::new("plain", file.clone()), shared]);
    let first_axis = |role: &str| {
        pool.session(role)
            .unwrap()
            .input("past_key_values.0.encoder.key")
            .unwrap()
            .symbols[0]
            .clone()
    };
    assert_eq!(first_axis("shared"), SOURCE_ROWS);
    assert_ne!(first_axis("plain"), SOURCE_ROWS);

    let info = pool.session("plain").unwrap().clone();
    let (rows, beams, past, source) = (3usize, 4usize, 5usize, 7usize);
    let n = rows * beams;
    let (mut plain, mut shared) = (Vec::new(), Vec::new());
    for (k, input) in info.inputs.iter().enumerate() {
        let name = input.name.as_str();
        let dims = |batch: usize, len: usize| -> Vec<usize> {
            let d = &input.shape;
            vec![batch, d[1] as usize, len, d[3] as usize]
        };
        match name {
            "input_ids" => {
                let ids: Vec<i64> = (0..n as i64).map(|i| 50 + 7 * i).collect();
                let input = Input::new(name, vec![n as i64, 1], Data::I64(ids));
                plain.push(input.clone());
                shared.push(input);
            }
            "use_cache_branch" => {
                let input = Input::new(name, vec![1], Data::Bool(vec![true]));
                plain.push(input.clone());
                shared.push(input);
            }
            "encoder_hidden_states" => {
                // Not read once the cache exists; one per sequence or per recording.
                let hidden = *input.shape.last().unwrap() as usize;
                for (to, batch) in [(&mut plain, n), (&mut shared, rows)] {
                    let values = waves(batch * source * hidden, k as f32);
                    let shape = vec![batch as i64, source as i64, hidden as i64];
                    to.push(Input::new(name, shape, Data::F32(values)));
                }
            }
            _ if name.contains(".decoder.") => {
                let d = dims(n, past);
                let values = waves(d.iter().product(), k as f32);
                let input = Input::new(
                    name,
                    d.iter().map(|&x| x as i64).collect(),
                    Data::F32(values),
                );
                plain.push(input.clone());
                shared.push(input);
            }
            _ if name.contains(".encoder.") => {
                let d = dims(rows, source);
                let per_row: usize = d[1..].iter().product();
                let values = waves(rows * per_row, k as f32);
                let repeated: Vec<f32> = values
                    .chunks(per_row)
                    .flat_map(|row| std::iter::repeat_n(row, beams).flatten().copied())
                    .collect();
                let shape =
                    |batch: usize| vec![batch as i64, d[1] as i64, d[2] as i64, d[3] as i64];
                plain.push(Input::new(name, shape(n), Data::F32(repeated)));
                shared.push(Input::new(name, shape(rows), Data::F32(values)));
            }
            other => panic!("unexpected decoder input {other}"),
        }
    }
    let compared: Vec<String> = std::iter::once("logits".to_string())
        .chain(
            info.outputs
                .iter()
                .map(|o| o.name.clone())
                .filter(|o| o.contains(".decoder.")),
        )
        .collect();
    let outputs = pool
        .run(move |worker| {
            let mut read = |role: &str, inputs: Vec<Input>| -> Vec<Vec<f32>> {
                let out = worker.run(role, inputs).unwrap();
                compared
                    .iter()
                    .map(|name| read_f32(name, &out[name.as_str()]).unwrap().data.to_vec())
                    .collect()
            };
            (read("plain", plain), read("shared", shared))
        })
        .await
        .unwrap();
    for (a, b) in outputs.0.iter().zip(&outputs.1) {
        assert_eq!(a.len(), b.len());
        let most = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(most <= 1e-5, "{}: outputs differ by {most}", file.display());
    }
}
