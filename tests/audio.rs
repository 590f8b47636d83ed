//! Audio operators against `transformers`' feature extractor and pipelines and the silero-vad
//! package, as recorded by tests/fixtures/audio.py on espeak-ng speech, silence, noise and
//! files of other rates, channel counts and codecs.

use std::sync::Arc;

use ferry::datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Float32Array, Int64Array, ListArray, RecordBatch,
    StringArray, StructArray,
};
use ferry::datafusion::arrow::buffer::OffsetBuffer;
use ferry::datafusion::arrow::datatypes::{DataType, Field, Fields, Float64Type, Schema};
use ferry::datafusion::datasource::MemTable;
use ferry::datafusion::prelude::SessionContext;
use ferry::ops::audio::features::Wav2Vec2Features;
use ferry::ops::audio::{AudioOptions, AudioReading};

use crate::util::*;

fn clip_path(name: &str) -> std::path::PathBuf {
    root().join("tests/fixtures/audio").join(name)
}

fn audio_golden() -> serde_json::Value {
    golden("audio")
}

fn clip_names(g: &serde_json::Value) -> Vec<String> {
    g["clips"].as_object().unwrap().keys().cloned().collect()
}

/// Clips whose samples reach the model exactly as ffmpeg gives them to the pipeline: PCM at
/// 16 kHz (no resampling, no lossy decoder).
fn exact(name: &str) -> bool {
    name.contains("16k") && name.ends_with(".wav")
}

/// Clips at another rate than the model's (resampled by ffmpeg for the pipeline, by rubato
/// for ferry).
fn resampled(name: &str) -> bool {
    !name.contains("16k")
}

/// Character-level similarity of two texts: 1 - edit distance / the longer length.
fn similarity(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    1.0 - row[b.len()] as f64 / a.len().max(b.len()).max(1) as f64
}

/// Registers `clips(name Utf8, bytes Binary, path Utf8)`.
fn register_clips(ctx: &SessionContext, names: &[String]) {
    register_files(ctx, "clips", "tests/fixtures/audio", names);
}

/// Mono samples of a clip as ferry decodes it, at its own rate and at 16 kHz.
fn decode(name: &str) -> (Vec<f32>, u32, Vec<f32>) {
    let reading = AudioReading::new(&AudioOptions::default(), 16000).unwrap();
    let (samples, rate) = reading
        .decode(std::fs::read(clip_path(name)).unwrap())
        .unwrap();
    let at16 = ferry::ops::audio::resample(&samples, rate, 16000).unwrap();
    (samples, rate, at16)
}

/// The 95 s clip the fixture script builds: en2 and half a second of silence, repeated.
fn long_clip() -> Vec<f32> {
    let (en2, rate, _) = decode("en2_16k_s16.wav");
    assert_eq!(rate, 16000);
    let mut unit = en2.clone();
    unit.extend(std::iter::repeat_n(0.0, 8000));
    unit.iter().copied().cycle().take(95 * 16000).collect()
}

#[track_caller]
fn assert_summary(got: &[f32], want: &serde_json::Value, tol: f64, what: &str) {
    assert_eq!(
        got.len() as u64,
        want["len"].as_u64().unwrap(),
        "{what}: length"
    );
    let head = floats(&want["head"]);
    let stride = want["stride"].as_u64().unwrap() as usize;
    let strided = floats(&want["strided"]);
    let got_strided: Vec<f32> = got.iter().step_by(stride).copied().collect();
    assert_eq!(got_strided.len(), strided.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(&head).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{what}: value {i}: {g} vs {w}"
        );
    }
    for (i, (g, w)) in got_strided.iter().zip(&strided).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{what}: value {}: {g} vs {w}",
            i * stride
        );
    }
}

/// PCM at 16 kHz (8 to 32 bits, integer and float, stereo averaged) decodes to ffmpeg's
/// samples, and the Wav2Vec2 extractor's input_values follow within 1e-4. Resampled and lossy
/// sources are compared in `resampling_and_lossy_codecs_stay_close_to_ffmpeg`.
#[test]
fn pcm_decodes_to_the_pipelines_samples_and_input_values() {
    let g = audio_golden();
    let features =
        Wav2Vec2Features::load(&root().join("tests/fixtures/models/tiny-wav2vec2-ctc")).unwrap();
    let mut checked = 0;
    for name in clip_names(&g) {
        if !exact(&name) {
            continue;
        }
        let (samples, rate, _) = decode(&name);
        assert_eq!(rate, 16000, "{name}");
        let row = &g["clips"][&name];
        assert_summary(&samples, &row["decoded"], 1e-6, &format!("{name}: decoded"));
        assert_summary(
            &features.apply(&samples),
            &row["input_values"],
            1e-4,
            &format!("{name}: input_values"),
        );
        checked += 1;
    }
    assert!(checked >= 8, "{checked}");
}

/// Whisper's log-mel features (80 and 128 mel bins) of speech, noise, a 0.1 s clip and
/// silence, within 1e-4 of WhisperFeatureExtractor's.
#[test]
fn whisper_log_mel_features_match_the_extractor() {
    let g = audio_golden();
    let all = g["whisper_features"].as_object().unwrap();
    for (key, want) in all {
        let (name, mels) = key.split_once('/').unwrap();
        let mels: usize = mels.parse().unwrap();
        let f = ferry::ops::audio::features::WhisperFeatures::new(16000, 400, 160, 480000, mels);
        let (samples, _, _) = decode(name);
        let got = f.apply(&samples);
        assert_eq!(floats(&want["shape"]), vec![mels as f64, 3000.0], "{key}");
        assert_summary(&got, want, 1e-4, key);
    }
    assert_eq!(all.len(), 8);
}

/// Resampled (8, 22.05 and 44.1 kHz sources) and lossy (MP3, Vorbis) clips: the same length
/// as ffmpeg's within a few samples and close sample by sample (README: Audio has the figures
/// printed here: 35-40 dB SNR resampled, Vorbis exact).
#[test]
fn resampling_and_lossy_codecs_stay_close_to_ffmpeg() {
    let g = audio_golden();
    for name in clip_names(&g) {
        if exact(&name) {
            continue;
        }
        let (_, _, at16) = decode(&name);
        if let Ok(dir) = std::env::var("FERRY_DUMP") {
            let bytes: Vec<u8> = at16.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(format!("{dir}/{name}.f32"), bytes).unwrap();
        }
        let want = &g["clips"][&name]["decoded"];
        let len = want["len"].as_u64().unwrap() as i64;
        // ffmpeg's MP3 decoder keeps the encoder delay's padding that symphonia trims.
        let slack = if name.ends_with(".mp3") { 1200 } else { 2 };
        assert!(
            (at16.len() as i64 - len).abs() <= slack,
            "{name}: {} samples vs ffmpeg's {len}",
            at16.len()
        );
        if name.ends_with(".mp3") {
            continue;
        }
        let strided = floats(&want["strided"]);
        let (mut worst, mut sq, mut sig, mut own, mut dot) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for (g, w) in at16.iter().step_by(97).zip(&strided) {
            let g = *g as f64;
            let d = g - w;
            worst = worst.max(d.abs());
            sq += d * d;
            sig += w * w;
            own += g * g;
            dot += g * w;
        }
        let snr = 10.0 * (sig / sq.max(1e-20)).log10();
        let correlation = dot / (sig * own).sqrt();
        eprintln!(
            "{name}: largest difference {worst:.4}, SNR {snr:.1} dB, correlation {correlation:.4}, energy ratio {:.4} against ffmpeg",
            own / sig
        );
        if resampled(&name) {
            assert!(
                snr > 30.0,
                "{name}: SNR {snr:.1} dB against ffmpeg's samples"
            );
            assert!(correlation > 0.999, "{name}: correlation {correlation}");
        } else {
            assert!(
                snr > 40.0,
                "{name}: SNR {snr:.1} dB against ffmpeg's samples"
            );
        }
    }
}

/// The first column of a query's batches.
async fn first_column(ctx: &SessionContext, query: &str) -> Vec<ArrayRef> {
    sql(ctx, query)
        .await
        .into_iter()
        .map(|b| b.column(0).clone())
        .collect()
}

/// A context with a `transcribe` operator on `model` per (name, lines under `options:`).
fn whisper_context(
    model: &str,
    batch_size: usize,
    ops: &[(&str, String)],
) -> (SessionContext, tempfile::TempDir) {
    let manifests: Vec<(&str, String)> = ops
        .iter()
        .map(|(op, options)| {
            let options = match options.is_empty() {
                true => String::new(),
                false => format!("options:\n{options}"),
            };
            (
                *op,
                format!("task: transcribe\nmodel: {model}\nbatch_size: {batch_size}\n{options}"),
            )
        })
        .collect();
    context_with_manifests(&manifests)
}

/// One string per clip, in clip order, of `SELECT op(arg) FROM clips`.
async fn run_clips(op: &str, arg: &str, names: &[String]) -> Vec<ArrayRef> {
    let (ctx, _ops) = context_with(&[op]);
    register_clips(&ctx, names);
    let batches = sql(&ctx, &format!("SELECT name, {op}({arg}) AS out FROM clips")).await;
    let order: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let n = b.column(0).as_string::<i32>();
            (0..n.len())
                .map(|i| n.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(order, names, "rows come back in input order");
    batches.iter().map(|b| b.column(1).clone()).collect()
}

fn strings(cols: &[ArrayRef]) -> Vec<Option<String>> {
    cols.iter()
        .flat_map(|c| {
            let s = c.as_string::<i32>();
            (0..s.len())
                .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Timestamped pieces of a transcript: (text, start s, end s; Whisper may leave one unknown).
type Pieces = Vec<(String, Option<f64>, Option<f64>)>;

/// (text, [(piece, start, end)]) of each row of a timestamped transcript column.
fn timestamped(cols: &[ArrayRef]) -> Vec<(String, Pieces)> {
    let mut out = Vec::new();
    for c in cols {
        let s = c.as_struct();
        let text = s.column(0).as_string::<i32>();
        let chunks = s.column(1).as_list::<i32>();
        for i in 0..s.len() {
            let items = chunks.value(i);
            let items = items.as_struct();
            let time = |c: usize, j: usize| {
                let t = items.column(c).as_primitive::<Float64Type>();
                t.is_valid(j).then(|| t.value(j))
            };
            let pieces = (0..items.len())
                .map(|j| {
                    (
                        items.column(0).as_string::<i32>().value(j).to_string(),
                        time(1, j),
                        time(2, j),
                    )
                })
                .collect();
            out.push((text.value(i).to_string(), pieces));
        }
    }
    out
}

/// Pieces against the golden's [text, start, end] (null where unknown), timestamps within
/// `tol` seconds.
#[track_caller]
fn assert_pieces_within(
    got: &[(String, Option<f64>, Option<f64>)],
    want: &serde_json::Value,
    tol: f64,
    what: &str,
) {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: pieces {got:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w[0].as_str().unwrap(), "{what}");
        for (t, (got, want)) in [(g.1, &w[1]), (g.2, &w[2])].into_iter().enumerate() {
            match (got, want.as_f64()) {
                (Some(a), Some(b)) => {
                    assert!((a - b).abs() <= tol, "{what}: time {t} of {g:?} vs {w}")
                }
                (a, b) => assert_eq!(a, b, "{what}: time {t} of {g:?} vs {w}"),
            }
        }
    }
}

/// CTC pieces: timestamps within one frame (20 ms).
#[track_caller]
fn assert_pieces(got: &[(String, Option<f64>, Option<f64>)], want: &serde_json::Value, what: &str) {
    assert_pieces_within(got, want, 0.0199, what)
}

/// CTC transcripts of every clip at the model's rate (PCM, stereo, MP3, Vorbis) equal the
/// pipeline's (which reads each file with ffmpeg), by bytes and by path; char and word
/// timestamps of the PCM clips too. Resampled clips: the random-weight model's frames are
/// near-ties that the resamplers' small differences flip, so their transcripts are only close
/// (printed).
#[tokio::test]
async fn ctc_transcripts_match_the_pipeline() {
    let g = audio_golden();
    let names = clip_names(&g);
    let texts = strings(&run_clips("tiny_ctc", "bytes", &names).await);
    let by_path = strings(&run_clips("tiny_ctc", "path", &names).await);
    assert_eq!(texts, by_path);
    let mut differ = Vec::new();
    for (name, got) in names.iter().zip(&texts) {
        let want = g["clips"][name]["text"].as_str().unwrap();
        let got = got.as_deref().unwrap_or_default();
        if resampled(name) {
            let s = similarity(got, want);
            eprintln!("{name}: transcript similarity {s:.3} to the pipeline's");
            assert!(s > 0.5, "{name}: {got:?}\n  vs the pipeline's {want:?}");
        } else if got != want {
            differ.push(format!("{name}: {got:?}\n  vs the pipeline's {want:?}"));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));

    let pcm: Vec<String> = names.iter().filter(|n| exact(n)).cloned().collect();
    for (op, key) in [
        ("tiny_ctc_chars", "ctc_chars"),
        ("tiny_ctc_words", "ctc_words"),
    ] {
        let rows = timestamped(&run_clips(op, "bytes", &pcm).await);
        for (name, (text, pieces)) in pcm.iter().zip(&rows) {
            let row = &g["clips"][name];
            assert_eq!(text, row["ctc_text"].as_str().unwrap(), "{op} {name}");
            assert_pieces(pieces, &row[key], &format!("{op} {name}"));
        }
    }
}

/// Registers `samples(name Utf8, x List<Float32>, s Struct<array, sampling_rate>)`.
fn register_samples(ctx: &SessionContext, rows: &[(&str, Vec<f32>, i64)]) {
    let item = Arc::new(Field::new_list_field(DataType::Float32, true));
    let lists = |rows: &[(&str, Vec<f32>, i64)]| {
        ListArray::new(
            item.clone(),
            OffsetBuffer::from_lengths(rows.iter().map(|r| r.1.len())),
            Arc::new(Float32Array::from(
                rows.iter().flat_map(|r| r.1.clone()).collect::<Vec<_>>(),
            )),
            None,
        )
    };
    let list = lists(rows);
    let fields = Fields::from(vec![
        Field::new("array", list.data_type().clone(), true),
        Field::new("sampling_rate", DataType::Int64, true),
    ]);
    let s = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(list.clone()),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        ],
        None,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("x", list.data_type().clone(), true),
        Field::new("s", DataType::Struct(fields), true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(list),
            Arc::new(s),
        ],
    )
    .unwrap();
    ctx.register_table(
        "samples",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
}

/// A 95 s recording given as samples: whole, in 10 s windows (stride 10/6 s), in 8 s windows
/// with strides [1, 2], and with word timestamps across windows, as the pipeline transcribes
/// it; classified and segmented as the pipeline and the package do (below).
#[tokio::test]
async fn long_recordings_are_chunked_as_the_pipeline_chunks_them() {
    let g = audio_golden();
    let long = &g["long"];
    let ops = [
        "tiny_ctc",
        "tiny_ctc_chunked",
        "tiny_ctc_strided",
        "tiny_ctc_chunked_words",
    ];
    let (ctx, _set) = context_with(&ops);
    register_samples(&ctx, &[("long", long_clip(), 16000)]);
    let text = strings(&first_column(&ctx, "SELECT tiny_ctc(x) FROM samples").await);
    assert_eq!(text[0].as_deref(), long["text"].as_str());
    let chunked = strings(&first_column(&ctx, "SELECT tiny_ctc_chunked(s) FROM samples").await);
    assert_eq!(chunked[0].as_deref(), long["chunked_10s"].as_str());
    let strided = strings(&first_column(&ctx, "SELECT tiny_ctc_strided(x) FROM samples").await);
    assert_eq!(
        strided[0].as_deref(),
        long["chunked_8s_stride_1_2"].as_str()
    );
    let words =
        timestamped(&first_column(&ctx, "SELECT tiny_ctc_chunked_words(x) FROM samples").await);
    assert_pieces(&words[0].1, &long["chunked_10s_words"], "chunked words");
}

/// (label, score) lists of a `classify_audio` column with top_k.
fn ranked(cols: &[ArrayRef]) -> Vec<Vec<(String, f64)>> {
    cols.iter()
        .flat_map(|c| {
            let l = c.as_list::<i32>();
            (0..l.len())
                .map(|i| {
                    let v = l.value(i);
                    let s = v.as_struct();
                    (0..s.len())
                        .map(|j| {
                            (
                                s.column(0).as_string::<i32>().value(j).to_string(),
                                s.column(1).as_primitive::<Float64Type>().value(j),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every label and score of the audio-classification pipeline, within 1e-4, for the PCM
/// clips (the model sees the same samples); the best label of every clip.
#[tokio::test]
async fn audio_classification_matches_the_pipeline() {
    let g = audio_golden();
    let names = clip_names(&g);
    let got = ranked(&run_clips("tiny_audio_cls", "bytes", &names).await);
    for (name, labels) in names.iter().zip(&got) {
        let want = g["clips"][name]["labels"].as_array().unwrap();
        assert_eq!(labels.len(), want.len(), "{name}");
        let tol = if exact(name) { 1e-4 } else { 2e-3 };
        for (l, w) in labels.iter().zip(want) {
            if exact(name) {
                assert_eq!(
                    l.0,
                    w[0].as_str().unwrap(),
                    "{name}: {labels:?} vs {want:?}"
                );
            }
            let ws = want.iter().find(|w| w[0].as_str() == Some(&l.0)).unwrap()[1]
                .as_f64()
                .unwrap();
            assert!((l.1 - ws).abs() <= tol, "{name}: {} {} vs {ws}", l.0, l.1);
        }
    }
    let best = run_clips("tiny_audio_cls_best", "path", &names).await;
    let s = best[0].as_struct();
    assert_eq!(s.column(0).as_string::<i32>().value(0), got[0][0].0);

    let (ctx, _set) = context_with(&["tiny_audio_cls"]);
    register_samples(&ctx, &[("long", long_clip(), 16000)]);
    let cols: Vec<ArrayRef> = sql(&ctx, "SELECT tiny_audio_cls(x) FROM samples")
        .await
        .into_iter()
        .map(|b| b.column(0).clone())
        .collect();
    let long = &ranked(&cols)[0];
    let want = g["long"]["labels"].as_array().unwrap();
    for (l, w) in long.iter().zip(want) {
        assert_eq!(l.0, w[0].as_str().unwrap());
        assert!((l.1 - w[1].as_f64().unwrap()).abs() <= 1e-4);
    }
}

/// The real Silero VAD (PyPI's silero-vad wheel, operators/silero_vad.yaml) finds the speech
/// segments the package's get_speech_timestamps finds, recordings batched side by side.
#[tokio::test]
async fn silero_vad_segments_match_the_package() {
    let models = root().join("models");
    ferry::fetch::fetch("silero-vad", &models).expect("fetching silero-vad from PyPI");
    let g = audio_golden();
    let names: Vec<String> = clip_names(&g).into_iter().filter(|n| exact(n)).collect();
    let ctx = ferry::engine::session_context();
    let manifests = ferry::ops::load_manifests(&root().join("operators")).unwrap();
    let mut set = ferry::ops::OperatorSet::new(manifests);
    ctx.register_udf(set.get("silero_vad").unwrap().udf.clone());
    register_clips(&ctx, &names);
    register_samples(&ctx, &[("long", long_clip(), 16000)]);
    let mut got: Vec<Vec<(f64, f64)>> = Vec::new();
    for q in [
        "SELECT silero_vad(bytes) FROM clips",
        "SELECT silero_vad(x) FROM samples",
    ] {
        for b in sql(&ctx, q).await {
            let l = b.column(0).as_list::<i32>();
            for i in 0..l.len() {
                let v = l.value(i);
                let s = v.as_struct();
                got.push(
                    (0..s.len())
                        .map(|j| {
                            (
                                s.column(0).as_primitive::<Float64Type>().value(j),
                                s.column(1).as_primitive::<Float64Type>().value(j),
                            )
                        })
                        .collect(),
                );
            }
        }
    }
    let mut want: Vec<&serde_json::Value> =
        names.iter().map(|n| &g["clips"][n]["speech"]).collect();
    want.push(&g["long"]["speech"]);
    let mut segments = 0;
    for ((got, want), name) in got
        .iter()
        .zip(want)
        .zip(names.iter().chain(["long".to_string()].iter()))
    {
        let want: Vec<(f64, f64)> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s[0].as_f64().unwrap() / 16000.0,
                    s[1].as_f64().unwrap() / 16000.0,
                )
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: {got:?} vs {want:?}");
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-9,
                "{name}: {got:?} vs {want:?}"
            );
        }
        segments += want.len();
    }
    assert!(segments >= 8, "{segments}");
}

/// Bad recordings are row errors; the other rows are transcribed.
#[tokio::test]
async fn bad_audio_is_a_row_error_and_the_rest_flows() {
    let good = std::fs::read(clip_path("en2_16k_s16.wav")).unwrap();
    let mut huge = good.clone();
    // A WAV header claiming 2^31 samples (the RIFF and data chunks' size fields), then a little
    // data: refused from its header (symphonia finds the chunk longer than the file; a FLAC
    // claiming too much is refused by the duration limit, below).
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    huge[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut rate_zero = good.clone();
    rate_zero[24..28].copy_from_slice(&0u32.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("good", good.clone()),
        ("empty", Vec::new()),
        ("text", b"this is a text file named clip.wav\n".to_vec()),
        ("truncated header", good[..30].to_vec()),
        (
            "garbage",
            (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
        ("huge header", huge),
        ("rate zero", rate_zero),
        ("good again", good),
    ];
    let (ctx, mut set) = context_with(&["tiny_ctc", "tiny_ctc_words"]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("bytes", DataType::Binary, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(
                cases.iter().map(|c| c.0).collect::<Vec<_>>(),
            )),
            Arc::new(BinaryArray::from_iter_values(
                cases.iter().map(|c| c.1.clone()),
            )),
        ],
    )
    .unwrap();
    ctx.register_table(
        "bad",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let cols: Vec<ArrayRef> = sql(&ctx, "SELECT tiny_ctc(bytes) FROM bad")
        .await
        .into_iter()
        .map(|b| b.column(0).clone())
        .collect();
    let texts = strings(&cols);
    let g = audio_golden();
    let want = g["clips"]["en2_16k_s16.wav"]["text"].as_str().unwrap();
    assert_eq!(texts[0].as_deref(), Some(want));
    assert_eq!(texts[7].as_deref(), Some(want));
    for (i, (name, _)) in cases.iter().enumerate().skip(1).take(6) {
        assert!(texts[i].is_none(), "{name}: {:?}", texts[i]);
    }
    let op = set.get("tiny_ctc").unwrap();
    assert_eq!(op.row_errors(), 6);
    // With timestamps the bad rows are null structs; the good ones carry their words.
    let cols: Vec<ArrayRef> = sql(&ctx, "SELECT tiny_ctc_words(bytes) FROM bad")
        .await
        .into_iter()
        .map(|b| b.column(0).clone())
        .collect();
    let nulls: Vec<bool> = cols
        .iter()
        .flat_map(|c| (0..c.len()).map(|i| c.is_null(i)).collect::<Vec<_>>())
        .collect();
    assert_eq!(nulls, [false, true, true, true, true, true, true, false]);
    let words = timestamped(&cols);
    assert_eq!(words[0].0, want);
    assert!(!words[0].1.is_empty() && words[0].1 == words[7].1);

    // Samples: NaN, infinite, empty, and a recording too short for the model.
    let (ctx, mut set) = context_with(&["tiny_ctc"]);
    register_samples(
        &ctx,
        &[
            ("nan", vec![0.0, f32::NAN, 0.1], 16000),
            (
                "inf",
                vec![0.0; 4000].into_iter().chain([f32::INFINITY]).collect(),
                16000,
            ),
            ("empty", vec![], 16000),
            ("short", vec![0.1; 100], 16000),
            ("fine", long_clip()[..32000].to_vec(), 16000),
        ],
    );
    let cols: Vec<ArrayRef> = sql(&ctx, "SELECT tiny_ctc(x) FROM samples")
        .await
        .into_iter()
        .map(|b| b.column(0).clone())
        .collect();
    let texts = strings(&cols);
    assert!(texts[..4].iter().all(|t| t.is_none()), "{texts:?}");
    assert!(texts[4].is_some());
    assert_eq!(set.get("tiny_ctc").unwrap().row_errors(), 4);

    // A column of the wrong type is refused at plan time.
    let err = sql_err(&ctx, "SELECT tiny_ctc(length(name)) FROM samples").await;
    assert!(err.contains("expects Binary audio bytes"), "{err}");
}

/// A limit on duration refuses long recordings before decoding them, and raw samples past it.
#[test]
fn duration_limit_refuses_long_recordings() {
    let reading = AudioReading::new(
        &AudioOptions {
            max_duration_s: Some(2.0),
            ..Default::default()
        },
        16000,
    )
    .unwrap();
    let err = reading
        .decode(std::fs::read(clip_path("en2_16k_s16.wav")).unwrap())
        .unwrap_err();
    assert!(err.contains("over the limit of 2 s"), "{err}");
    // A FLAC whose STREAMINFO claims 2^36 - 1 samples (17 days at 44.1 kHz) is refused from
    // its header, at the default limit, before anything is decoded.
    let mut huge = std::fs::read(clip_path("en1_44k_s24.flac")).unwrap();
    assert_eq!(&huge[..4], b"fLaC");
    huge[21] |= 0x0F;
    huge[22..26].fill(0xFF);
    let default = AudioReading::new(&AudioOptions::default(), 16000).unwrap();
    let err = default.decode(huge).unwrap_err();
    assert!(err.contains("over the limit of 3600 s"), "{err}");
    let err = reading
        .load(&ferry::ops::audio::AudioInput::Samples {
            samples: vec![0.0; 48000],
            rate: 16000,
        })
        .unwrap_err();
    assert!(err.contains("max_duration_s"), "{err}");
}

/// A model directory built by the fixture script, in models/ or the machine's cache.
fn built_model(name: &str) -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("HOME").map(|h| {
        std::path::PathBuf::from(h)
            .join(".cache/ferry/models")
            .join(name)
    });
    [Some(root().join("models").join(name)), cache]
        .into_iter()
        .flatten()
        .find(|d| d.join("encoder_model.onnx").is_file())
}

/// Real Whisper (tiny.en and base converted from PyPI's CTranslate2 wheels and exported by
/// tests/fixtures/whisper_real.py; skipped when not built): transcripts of the test clips equal
/// the ASR pipeline's on the converted model, greedy, with 5 beams and with segment
/// timestamps; base detects the language and transcribes French when told to; the 95 s
/// recording long-form (greedy and 5 beams) and in 30 s windows, with and without timestamps.
#[tokio::test]
async fn real_whisper_transcripts_match_the_pipeline_when_built() {
    let g = golden("whisper_real");
    let mut ran = 0;
    for (name, rows) in g["models"].as_object().unwrap() {
        let Some(model_dir) = built_model(name) else {
            eprintln!("{name} is not built (tests/fixtures/make_fixtures.py whisper): skipped");
            continue;
        };
        let clips: Vec<String> = rows
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "long")
            .cloned()
            .collect();
        let greedy = "  generation: {num_beams: 1}\n";
        let segments = "  return_timestamps: segment\n";
        let mut manifests = vec![
            ("greedy", greedy.to_string()),
            ("beam5", String::new()),
            ("timestamps", format!("{greedy}{segments}")),
            ("timestamps_beam5", segments.to_string()),
            ("chunked_30s", format!("{greedy}  chunk_length_s: 30\n")),
            (
                "chunked_30s_timestamps",
                format!("{greedy}{segments}  chunk_length_s: 30\n"),
            ),
        ];
        if name == "whisper-base" {
            manifests.push(("greedy_fr", format!("{greedy}  language: fr\n")));
        }
        let (ctx, _dir) = whisper_context(&model_dir.display().to_string(), 4, &manifests);
        register_clips(&ctx, &clips);
        register_samples(&ctx, &[("long", long_clip(), 16000)]);
        let close = |got: &str, want: &str, clip: &str, what: &str| {
            eprintln!("{name} {what} {clip}: {got:?}");
            if resampled(clip) {
                assert!(
                    similarity(got, want) > 0.9,
                    "{name} {what} {clip}: {got:?} vs {want:?}"
                );
            } else {
                assert_eq!(got, want, "{name} {what} {clip}");
            }
        };
        for op in ["greedy", "beam5", "greedy_fr"] {
            if !manifests.iter().any(|(m, _)| *m == op) {
                continue;
            }
            let texts =
                strings(&first_column(&ctx, &format!("SELECT {op}(bytes) FROM clips")).await);
            for (clip, got) in clips.iter().zip(&texts) {
                let want = rows[clip][op].as_str().unwrap();
                close(got.as_deref().unwrap_or_default(), want, clip, op);
            }
        }
        let got = timestamped(&first_column(&ctx, "SELECT timestamps(bytes) FROM clips").await);
        for (clip, (text, pieces)) in clips.iter().zip(got) {
            let want = &rows[clip]["timestamps"];
            close(&text, want["text"].as_str().unwrap(), clip, "timestamps");
            if !resampled(clip) {
                assert_pieces_within(&pieces, &want["chunks"], 0.0, &format!("{name} {clip}"));
            }
        }
        let long = &rows["long"];
        let text = strings(&first_column(&ctx, "SELECT greedy(x) FROM samples").await);
        close(
            text[0].as_deref().unwrap_or_default(),
            long["timestamps"]["text"].as_str().unwrap(),
            "long",
            "long-form",
        );
        for op in ["timestamps", "timestamps_beam5", "chunked_30s_timestamps"] {
            let got =
                timestamped(&first_column(&ctx, &format!("SELECT {op}(x) FROM samples")).await);
            close(&got[0].0, long[op]["text"].as_str().unwrap(), "long", op);
            assert_pieces_within(&got[0].1, &long[op]["chunks"], 0.0, &format!("{name} {op}"));
        }
        let text = strings(&first_column(&ctx, "SELECT chunked_30s(s) FROM samples").await);
        close(
            text[0].as_deref().unwrap_or_default(),
            long["chunked_30s"].as_str().unwrap(),
            "long",
            "chunked_30s",
        );
        ran += 1;
    }
    if ran == 0 {
        eprintln!("no real Whisper model is built: skipped");
    }
}

/// The tiny random Whisper (cached decoder, continuous batching) transcribes as the ASR
/// pipeline does: greedy and with 5 beams (the pipeline's default) with the language detected,
/// greedy with the language given, and with segment timestamps (greedy and 5 beams); the 95 s
/// recording long-form (seek by seek, timestamps predicted) and in 30 s and 10 s windows
/// merged as `_decode_asr` merges them, with and without timestamps.
#[tokio::test]
async fn tiny_whisper_matches_the_pipeline() {
    let g = audio_golden();
    let rows = g["tiny_whisper"].as_object().unwrap();
    let clips: Vec<String> = rows.keys().filter(|k| *k != "long").cloned().collect();
    let greedy = "  generation: {num_beams: 1}\n";
    let segments = "  return_timestamps: segment\n";
    let manifests = [
        ("greedy", greedy.to_string()),
        ("beam5", String::new()),
        ("greedy_de", format!("{greedy}  language: de\n")),
        ("ts_greedy", format!("{greedy}{segments}")),
        ("ts_beam5", segments.to_string()),
        ("chunked_30s", format!("{greedy}  chunk_length_s: 30\n")),
        ("chunked_10s_beam5", "  chunk_length_s: 10\n".to_string()),
        (
            "chunked_10s_ts",
            format!("{greedy}{segments}  chunk_length_s: 10\n  stride_length_s: [2, 3]\n"),
        ),
    ];
    let (ctx, _dir) = whisper_context(&fixture_model("tiny-whisper"), 3, &manifests);
    register_clips(&ctx, &clips);
    register_samples(&ctx, &[("long", long_clip(), 16000)]);
    for op in ["greedy", "beam5", "greedy_de"] {
        let texts = strings(&first_column(&ctx, &format!("SELECT {op}(bytes) FROM clips")).await);
        for (clip, got) in clips.iter().zip(texts) {
            assert_eq!(got.as_deref(), rows[clip][op].as_str(), "{op} {clip}");
        }
    }
    for (op, key) in [
        ("ts_greedy", "timestamps"),
        ("ts_beam5", "timestamps_beam5"),
    ] {
        let got = timestamped(&first_column(&ctx, &format!("SELECT {op}(bytes) FROM clips")).await);
        for (clip, (text, pieces)) in clips.iter().zip(got) {
            let want = &rows[clip][key];
            assert_eq!(text, want["text"].as_str().unwrap(), "{op} {clip}");
            assert_pieces_within(&pieces, &want["chunks"], 0.0, &format!("{op} {clip}"));
        }
    }
    let long = &rows["long"];
    // Over 30 s without windows: long-form, the pipeline's text with return_timestamps=True.
    let text = strings(&first_column(&ctx, "SELECT greedy(x) FROM samples").await);
    assert_eq!(
        text[0].as_deref(),
        long["timestamps"]["text"].as_str(),
        "long-form"
    );
    for (op, key) in [
        ("ts_greedy", "timestamps"),
        ("ts_beam5", "timestamps_beam5"),
        ("chunked_10s_ts", "chunked_10s_timestamps"),
    ] {
        let got = timestamped(&first_column(&ctx, &format!("SELECT {op}(x) FROM samples")).await);
        assert_eq!(got[0].0, long[key]["text"].as_str().unwrap(), "{op} long");
        assert_pieces_within(&got[0].1, &long[key]["chunks"], 0.0, &format!("{op} long"));
    }
    for op in ["chunked_30s", "chunked_10s_beam5"] {
        let text = strings(&first_column(&ctx, &format!("SELECT {op}(s) FROM samples")).await);
        assert_eq!(text[0].as_deref(), long[op].as_str(), "{op} long");
    }
}

/// Timestamp levels and windows a model cannot give are refused when the operator is built,
/// with what to use instead.
#[test]
fn timestamp_levels_are_checked_against_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "whisper_words",
            "tiny-whisper",
            "return_timestamps: word",
            "segment",
        ),
        (
            "whisper_chars",
            "tiny-whisper",
            "return_timestamps: char",
            "segment",
        ),
        (
            "whisper_long_windows",
            "tiny-whisper",
            "chunk_length_s: 40",
            "at most 30 s",
        ),
        (
            "ctc_segments",
            "tiny-wav2vec2-ctc",
            "return_timestamps: segment",
            "`char` or `word`",
        ),
    ];
    for (op, model, option, _) in cases {
        std::fs::write(
            dir.path().join(format!("{op}.yaml")),
            format!(
                "name: {op}\ntask: transcribe\nmodel: {}\noptions:\n  {option}\n",
                fixture_model(model)
            ),
        )
        .unwrap();
    }
    let mut set = ferry::ops::OperatorSet::new(ferry::ops::load_manifests(dir.path()).unwrap());
    for (op, _, _, says) in cases {
        let err = set.get(op).map(|_| ()).unwrap_err();
        assert!(err.contains(says), "{op}: {err}");
    }
}
