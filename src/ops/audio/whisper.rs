//! Whisper speech recognition through the generation core: log-mel windows into the encoder,
//! the decoder prompted as `WhisperForConditionalGeneration.generate` prompts it, greedy or beam
//! search with the model's suppressed tokens, the text decoded as the ASR pipeline decodes it.
//!
//! The decoder prompt is `<|startoftranscript|>`, then for multilingual models the language
//! (the `language` option, else detected once per window: the most likely language token after
//! `<|startoftranscript|>` over its first 30 s) and the task (`transcribe` or `translate`), then
//! `<|notimestamps|>` unless timestamps are predicted. Generation stops at `<|endoftext|>` or
//! `max_length` (448) decoder tokens; the pipeline's default is 5 beams unless the model's
//! generation config says otherwise.
//!
//! Every window runs as `generate` runs it (transformers 4.57), seek by seek: a 30 s segment
//! from the seek (zero-padded), then the seek moves past the last complete timestamp pair (or
//! to the end), until the window is done. With `return_timestamps: segment`, and for
//! recordings over 30 s (long-form; the pipeline needs `return_timestamps=True` for those and
//! gives the same text), the timestamp rules apply; `chunk_length_s` cuts recordings into
//! overlapping windows first, merged by `audio::decode_asr`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use tokenizers::Tokenizer;

use super::decode_asr::{AsrText, WindowTokens};
use super::features::WhisperFeatures;
use super::model::Chunking;
use super::{AudioInput, AudioReading};
use crate::ops::OpError;
use crate::ops::core::{ArgColumn, CallLimits, RowErrors, Task};
use crate::ops::generation::logits::TimestampRules;
use crate::ops::generation::model::{EncoderInput, Model, Seq2Seq};
use crate::ops::generation::search::{Limits, Prompts, Search, generate_from};
use crate::ops::generation::task::GenerationSettings;
use crate::ops::transcribe::{
    TimestampLevel, TranscribeOptions, Transcript, transcript_fields, transcripts_array,
};
use crate::runtime::ModelDir;
use crate::runtime::model_dir::read_json;
use crate::runtime::pool::{SessionPool, Worker};
use crate::runtime::tensor::Input;

/// What Whisper's generation config says about prompts.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct WhisperGeneration {
    #[serde(default)]
    decoder_start_token_id: Option<i64>,
    #[serde(default)]
    no_timestamps_token_id: Option<i64>,
    #[serde(default)]
    max_initial_timestamp_index: Option<usize>,
    #[serde(default)]
    is_multilingual: Option<bool>,
    #[serde(default)]
    lang_to_id: HashMap<String, i64>,
    #[serde(default)]
    task_to_id: HashMap<String, i64>,
    #[serde(default)]
    max_length: Option<usize>,
}

/// The Whisper task resolved against its model.
pub struct WhisperTranscribe {
    model: Model,
    features: WhisperFeatures,
    reading: AudioReading,
    tokenizer: Arc<Tokenizer>,
    search: Search,
    /// `max_length`: decoder tokens at most, prompt included.
    max_length: usize,
    /// `max_new_tokens`, when set (beats `max_length`).
    max_new_tokens: Option<usize>,
    start: i64,
    no_timestamps: i64,
    /// (language token, id) of a multilingual model; empty for English-only ones.
    languages: Vec<(String, i64)>,
    /// The language token id when the `language` option names one.
    language: Option<i64>,
    /// The task token id (multilingual models).
    task: Option<i64>,
    /// `return_timestamps: segment`.
    timestamps: bool,
    chunking: Option<Chunking>,
    rules: TimestampRules,
    /// The tokenizer's `all_special_ids`, and every language token.
    special: HashSet<i64>,
    language_ids: HashSet<i64>,
    /// Encoder positions of a window (1500), and feature frames per position (2).
    positions: usize,
    input_stride: usize,
}

impl std::fmt::Debug for WhisperTranscribe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperTranscribe")
            .field("features", &self.features)
            .field("max_length", &self.max_length)
            .field("language", &self.language)
            .field("timestamps", &self.timestamps)
            .field("chunking", &self.chunking)
            .finish()
    }
}

/// A window of a recording to transcribe.
#[derive(Debug)]
pub struct WhisperWindow {
    /// Log-mel features [n_mels, frames]: one padded 30 s window, or a whole long recording.
    features: Vec<f32>,
    /// Its frames, all transcribed (a padded window's 3000 included, as `generate` counts
    /// them).
    frames: usize,
    /// Predict timestamps (asked for, or long-form).
    timestamps: bool,
    /// (length, left, right overlap) in seconds, when the recording was cut into windows.
    stride: Option<(f64, f64, f64)>,
}

impl WhisperWindow {
    /// `frames` feature frames from `seek`, zero-padded to `width` (`_get_input_segment`).
    fn segment(&self, seek: usize, frames: usize, width: usize) -> Vec<f32> {
        let mels = self.features.len() / self.frames;
        let mut out = vec![0f32; mels * width];
        let used = frames.min(width).min(self.frames.saturating_sub(seek));
        for m in 0..mels {
            let from = m * self.frames + seek;
            out[m * width..m * width + used].copy_from_slice(&self.features[from..from + used]);
        }
        out
    }
}

/// The tokenizer's `all_special_ids`: its named special tokens and additional ones, as
/// `special_tokens_map.json` and `tokenizer_config.json` list them.
fn all_special_ids(dir: &std::path::Path, tokenizer: &Tokenizer) -> Result<HashSet<i64>, OpError> {
    let mut ids = HashSet::new();
    let content = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Some(map): Option<serde_json::Value> = read_json(&dir.join(file))? else {
            continue;
        };
        let mut tokens: Vec<String> = [
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ]
        .iter()
        .filter_map(|k| map.get(k).and_then(content))
        .collect();
        if let Some(extra) = map
            .get("additional_special_tokens")
            .and_then(|a| a.as_array())
        {
            tokens.extend(extra.iter().filter_map(content));
        }
        ids.extend(
            tokens
                .iter()
                .filter_map(|t| tokenizer.token_to_id(t))
                .map(i64::from),
        );
    }
    Ok(ids)
}

impl WhisperTranscribe {
    pub fn resolve(
        options: &TranscribeOptions,
        dir: &ModelDir,
        pool: &SessionPool,
    ) -> Result<Self, OpError> {
        let err = OpError::Model;
        let timestamps = match options.return_timestamps {
            None => false,
            Some(TimestampLevel::Segment) => true,
            Some(TimestampLevel::Char) => {
                return Err(OpError::Options(
                    "Whisper predicts segment timestamps (`return_timestamps: segment`); `char` is for CTC models".into(),
                ));
            }
            Some(TimestampLevel::Word) => {
                return Err(OpError::Options(
                    "Whisper's word timestamps need its cross-attention weights, which ONNX exports do not give; use `return_timestamps: segment`".into(),
                ));
            }
        };
        let info = |role: &'static str| pool.session(role).map(|s| (role, s));
        let (Some(enc), Some(dec)) = (info("encoder"), info("decoder")) else {
            return Err(err(format!(
                "{}: a Whisper export has encoder_model.onnx and a decoder",
                dir.dir.display()
            )));
        };
        let seq2seq = Seq2Seq::from_sessions(enc, dec, info("decoder_with_past")).map_err(err)?;
        let EncoderInput::Features {
            features: mels,
            frames,
            positions,
        } = seq2seq.input
        else {
            return Err(err(format!(
                "{}: the encoder takes tokens; a Whisper encoder takes input_features",
                dir.dir.display()
            )));
        };
        let features = WhisperFeatures::load(&dir.dir).map_err(err)?;
        if features.n_mels != mels || features.frames() != frames {
            return Err(err(format!(
                "{}: the feature extractor makes {} x {} log-mel features, the encoder takes {mels} x {frames}",
                dir.dir.display(),
                features.n_mels,
                features.frames()
            )));
        }
        if positions == 0 || frames % positions != 0 {
            return Err(err(format!(
                "{}: the encoder turns {frames} frames into {positions} positions; Whisper's timestamps need a whole number of frames per position",
                dir.dir.display()
            )));
        }
        let reading =
            AudioReading::new(&options.audio, features.sampling_rate).map_err(OpError::Options)?;
        let chunking = Chunking::from_options(
            options.chunk_length_s,
            options.stride_length_s.as_ref(),
            features.sampling_rate,
            1,
        )?;
        if let Some(c) = chunking
            && c.chunk > features.n_samples
        {
            return Err(OpError::Options(format!(
                "chunk_length_s: Whisper windows are at most {} s",
                features.n_samples / features.sampling_rate as usize
            )));
        }
        let tokenizer = Arc::new(dir.tokenizer("transcribe")?);
        let config: WhisperGeneration =
            read_json(&dir.dir.join("generation_config.json"))?.unwrap_or_default();
        let token = |t: &str| tokenizer.token_to_id(t).map(i64::from);
        let start = config
            .decoder_start_token_id
            .or_else(|| token("<|startoftranscript|>"))
            .ok_or_else(|| err("the model has no <|startoftranscript|> token".into()))?;
        let no_timestamps = config
            .no_timestamps_token_id
            .or_else(|| token("<|notimestamps|>"))
            .ok_or_else(|| err("the model has no <|notimestamps|> token".into()))?;
        let language_ids: HashSet<i64> = config.lang_to_id.values().copied().collect();
        let mut languages: Vec<(String, i64)> = if config.is_multilingual.unwrap_or(false) {
            config.lang_to_id.into_iter().collect()
        } else {
            Vec::new()
        };
        languages.sort_by_key(|(_, id)| *id);
        let language = match options.language.as_deref() {
            None => None,
            Some(_) if languages.is_empty() => {
                return Err(OpError::Options(format!(
                    "{}: an English-only Whisper model takes no `language`",
                    dir.dir.display()
                )));
            }
            Some(l) => {
                let wanted = if l.starts_with("<|") {
                    l.to_string()
                } else {
                    format!("<|{}|>", l.to_lowercase())
                };
                Some(
                    languages
                        .iter()
                        .find(|(t, _)| *t == wanted)
                        .map(|(_, id)| *id)
                        .ok_or_else(|| {
                            OpError::Options(format!(
                                "language {l:?} is not one of the model's ({} languages, e.g. en, fr, de)",
                                languages.len()
                            ))
                        })?,
                )
            }
        };
        let task = match (languages.is_empty(), options.task.as_deref()) {
            (true, Some(t)) if t != "transcribe" => {
                return Err(OpError::Options(format!(
                    "{}: an English-only Whisper model only transcribes (task {t:?})",
                    dir.dir.display()
                )));
            }
            (true, _) => None,
            (false, t) => {
                let t = t.unwrap_or("transcribe");
                Some(*config.task_to_id.get(t).ok_or_else(|| {
                    OpError::Options(format!("task is transcribe or translate, not {t:?}"))
                })?)
            }
        };
        // The pipeline's default of 5 beams, under the model's and the operator's settings.
        let defaults = GenerationSettings {
            num_beams: Some(5),
            ..Default::default()
        };
        let settings = options
            .generation
            .clone()
            .or(GenerationSettings::of_model(&dir.dir).map_err(err)?)
            .or(defaults);
        let search = settings
            .search(None, Some(&tokenizer))
            .map_err(OpError::Options)?;
        let max_length = settings.max_length.or(config.max_length).unwrap_or(448);
        let eos_token_id = *search
            .eos_token_ids
            .first()
            .ok_or_else(|| err("the model has no end-of-text token".into()))?;
        let special = all_special_ids(&dir.dir, &tokenizer)?;
        Ok(WhisperTranscribe {
            model: Model::Seq2Seq(seq2seq),
            features,
            reading,
            tokenizer,
            search,
            max_length,
            max_new_tokens: settings.max_new_tokens,
            start,
            no_timestamps,
            languages,
            language,
            task,
            timestamps,
            chunking,
            rules: TimestampRules {
                no_timestamps_token_id: no_timestamps,
                eos_token_id,
                max_initial_timestamp_index: config.max_initial_timestamp_index,
            },
            special,
            language_ids,
            positions,
            input_stride: frames / positions,
        })
    }

    /// The most likely language of each window: the language token the decoder ranks first
    /// after `<|startoftranscript|>` (`detect_language`, over the first 30 s).
    fn detect(&self, worker: &mut Worker, items: &[&WhisperWindow]) -> Result<Vec<i64>, String> {
        let width = self.features.frames();
        let firsts: Vec<Vec<f32>> = items
            .iter()
            .filter(|w| w.frames != width)
            .map(|w| w.segment(0, width, width))
            .collect();
        let mut firsts = firsts.iter();
        let windows: Vec<&[f32]> = items
            .iter()
            .map(|w| match w.frames == width {
                true => w.features.as_slice(),
                false => firsts.next().expect("one per long window").as_slice(),
            })
            .collect();
        let prompt = [self.start];
        let rows: Vec<(usize, &[f32], &[i64])> = windows
            .iter()
            .enumerate()
            .map(|(i, f)| (i, *f, &prompt[..]))
            .collect();
        let mut batch = self.model.start_features(worker, &rows)?;
        let (logits, vocab) = self
            .model
            .step(worker, &mut batch, self.search.pad_token_id)?;
        Ok((0..items.len())
            .map(|i| {
                let row = &logits[i * vocab..(i + 1) * vocab];
                let mut best = self.languages[0].1;
                for &(_, id) in &self.languages {
                    if (id as usize) < vocab && row[id as usize] > row[best as usize] {
                        best = id;
                    }
                }
                best
            })
            .collect())
    }

    fn prompt(&self, language: Option<i64>, timestamps: bool) -> Vec<i64> {
        let mut p = vec![self.start];
        if let Some(l) = language {
            p.push(l);
        }
        p.extend(self.task);
        if !timestamps {
            p.push(self.no_timestamps);
        }
        p
    }

    /// What a segment's generated tokens (end token dropped) keep and how far the seek moves
    /// (`_retrieve_segment`): up to the last complete timestamp pair, and to the last pair's
    /// time, unless the tokens end with a lone timestamp or have no pair (then all of them, and
    /// the whole segment).
    fn keep(&self, tokens: &[i64], segment_frames: usize) -> (usize, usize) {
        let begin = self.no_timestamps + 1;
        let ts = |i: usize| tokens[i] >= begin;
        let n = tokens.len();
        let single_ending = n >= 2 && !ts(n - 2) && ts(n - 1);
        let last_pair = (1..n).rev().find(|&i| ts(i - 1) && ts(i));
        match last_pair {
            None => (n, segment_frames),
            Some(_) if single_ending => (n, segment_frames),
            Some(i) => {
                // The pair's second timestamp ends what is kept; the seek goes to its first.
                let position = (tokens[i - 1] - begin) as usize;
                (i + 1, position * self.input_stride)
            }
        }
    }

    /// Generates one segment of each window (at `seek`), the windows that predict timestamps
    /// and those that do not in separate runs.
    fn segments(
        &self,
        worker: &mut Worker,
        items: &[&WhisperWindow],
        active: &[usize],
        seek: &[usize],
        languages: &[Option<i64>],
        limits: CallLimits,
    ) -> Result<Vec<(usize, Vec<i64>, usize)>, String> {
        let width = self.features.frames();
        let mut done = Vec::with_capacity(active.len());
        for timestamps in [false, true] {
            let rows: Vec<usize> = active
                .iter()
                .copied()
                .filter(|&i| items[i].timestamps == timestamps)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let frames: Vec<usize> = rows
                .iter()
                .map(|&i| (items[i].frames - seek[i]).min(width))
                .collect();
            // A padded window from its start is its own features.
            let cut: Vec<Option<Vec<f32>>> = rows
                .iter()
                .zip(&frames)
                .map(|(&i, &f)| {
                    let w = items[i];
                    (seek[i] != 0 || w.frames != width).then(|| w.segment(seek[i], f, width))
                })
                .collect();
            let features: Vec<&[f32]> = rows
                .iter()
                .zip(&cut)
                .map(|(&i, c)| c.as_deref().unwrap_or(&items[i].features))
                .collect();
            let decoder: Vec<Vec<i64>> = rows
                .iter()
                .map(|&i| self.prompt(languages[i], timestamps))
                .collect();
            let mut search = self.search.clone();
            search.processors.timestamps = timestamps.then(|| self.rules.clone());
            search.max_new_tokens = self
                .max_new_tokens
                .unwrap_or_else(|| self.max_length.saturating_sub(decoder[0].len()));
            let hypotheses = generate_from(
                worker,
                &self.model,
                Prompts::Features {
                    features: &features,
                    decoder: &decoder,
                },
                &search,
                Limits {
                    rows: limits.items,
                    tokens: limits.cost,
                },
            )?;
            for ((&i, &f), h) in rows.iter().zip(&frames).zip(hypotheses) {
                let mut tokens = h.into_iter().next().map(|h| h.tokens).unwrap_or_default();
                if tokens
                    .last()
                    .is_some_and(|t| self.search.eos_token_ids.contains(t))
                {
                    tokens.pop();
                }
                let (kept, moved) = self.keep(&tokens, f);
                tokens.truncate(kept);
                done.push((i, tokens, moved));
            }
        }
        Ok(done)
    }
}

impl Task for WhisperTranscribe {
    type Input = AudioInput;
    type Item = WhisperWindow;
    type Out = WindowTokens;
    type Row = Transcript;

    fn output_type(&self) -> DataType {
        match self.timestamps {
            true => DataType::Struct(transcript_fields()),
            false => DataType::Utf8,
        }
    }

    fn read(&self, args: &[ArgColumn<'_>], errors: &RowErrors) -> Result<Vec<Option<AudioInput>>> {
        self.reading.read(&args[0], errors)
    }

    fn prepare(&self, input: &AudioInput) -> Result<Vec<WhisperWindow>, String> {
        let samples = self.reading.load(input)?;
        let rate = self.features.sampling_rate as f64;
        let width = self.features.frames();
        let padded = |samples: &[f32], stride| WhisperWindow {
            features: self.features.apply(samples),
            frames: width,
            timestamps: self.timestamps,
            stride,
        };
        if let Some(c) = self.chunking {
            return Ok(c
                .windows(samples.len())
                .into_iter()
                .map(|w| {
                    let stride = (
                        (w.end - w.start) as f64 / rate,
                        w.left as f64 / rate,
                        w.right as f64 / rate,
                    );
                    padded(&samples[w.start..w.end], Some(stride))
                })
                .collect());
        }
        if samples.len() <= self.features.n_samples {
            return Ok(vec![padded(&samples, None)]);
        }
        // Long-form: the whole recording's features, seek by seek with timestamps.
        let features = self.features.apply_whole(&samples);
        let frames = samples.len() / self.features.hop_length;
        Ok(vec![WhisperWindow {
            features,
            frames,
            timestamps: true,
            stride: None,
        }])
    }

    fn cost(&self, _item: &WhisperWindow) -> usize {
        // One 30 s segment of a window runs at a time, however long the window.
        self.max_length
    }

    fn feed(&self, items: &[&WhisperWindow]) -> Result<Vec<Input>, String> {
        // What one encoder call takes (the benchmark baseline's first call).
        let width = self.features.frames();
        let mut data = Vec::new();
        for w in items {
            data.extend(w.segment(0, width, width));
        }
        Ok(vec![Input::new(
            "input_features",
            vec![
                items.len() as i64,
                self.features.n_mels as i64,
                width as i64,
            ],
            crate::runtime::tensor::Data::F32(data),
        )])
    }

    fn run(
        &self,
        worker: &mut Worker,
        items: &[&WhisperWindow],
    ) -> Result<Vec<WindowTokens>, String> {
        self.run_within(worker, items, CallLimits::ALL)
    }

    fn schedules_calls(&self) -> bool {
        true
    }

    fn run_within(
        &self,
        worker: &mut Worker,
        items: &[&WhisperWindow],
        limits: CallLimits,
    ) -> Result<Vec<WindowTokens>, String> {
        let languages: Vec<Option<i64>> = match (self.languages.is_empty(), self.language) {
            (true, _) => vec![None; items.len()],
            (false, Some(l)) => vec![Some(l); items.len()],
            (false, None) => {
                let mut found = Vec::with_capacity(items.len());
                for chunk in items.chunks(limits.items.clamp(1, 64)) {
                    found.extend(self.detect(worker, chunk)?.into_iter().map(Some));
                }
                found
            }
        };
        // Every window seek by seek, the windows still running together.
        let mut seek = vec![0usize; items.len()];
        let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); items.len()];
        loop {
            let active: Vec<usize> = (0..items.len())
                .filter(|&i| seek[i] < items[i].frames)
                .collect();
            if active.is_empty() {
                break;
            }
            for (i, kept, moved) in
                self.segments(worker, items, &active, &seek, &languages, limits)?
            {
                tokens[i].extend(kept);
                seek[i] += moved;
            }
        }
        Ok(tokens
            .into_iter()
            .zip(items)
            .map(|(tokens, w)| WindowTokens {
                tokens,
                stride: w.stride,
            })
            .collect())
    }

    fn finish(&self, _input: &AudioInput, outs: Vec<WindowTokens>) -> Result<Transcript, String> {
        let decode = |ids: &[i64]| {
            let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
            self.tokenizer
                .decode(&ids, false)
                .map_err(|e| format!("decoding the transcript: {e}"))
        };
        AsrText {
            timestamp_begin: self.no_timestamps + 1,
            time_precision: (self.features.n_samples / self.features.sampling_rate as usize) as f64
                / self.positions as f64,
            segment_size: self.positions as f64,
            special: &self.special,
            languages: &self.language_ids,
            timestamps: self.timestamps,
            decode: &decode,
        }
        .decode(&outs)
    }

    fn to_array(&self, rows: Vec<Option<Transcript>>) -> Result<ArrayRef> {
        transcripts_array(rows, self.timestamps)
    }

    fn wave_rows(&self) -> usize {
        // A window's features are 80 x 3000 floats (1 MB).
        64
    }

    /// The cache positions (self- and cross-attention) generating at once: each beam holds up
    /// to 448 positions of its own, and each recording's 1500 source positions are held once
    /// when its beams share them (the decoder was rewritten, `generation::shared_cross`), else
    /// by every beam. The default takes about 8 recordings at 5 beams when shared (0.2 GB of
    /// cache for Whisper base; 5 to 13 recordings measured within 4 % of each other, 32 were
    /// 10 % slower with a 9.5 GB peak), else about 13 (3 GB for base, 1.5 GB for tiny).
    fn default_max_batch_cost(&self) -> Option<usize> {
        Some(if self.model.shares_sources() {
            32_768
        } else {
            131_072
        })
    }
}
