//! Whisper speech recognition through the generation core: log-mel windows into the encoder,
//! the decoder prompted as `WhisperForConditionalGeneration.generate` prompts it, greedy or beam
//! search with the model's suppressed tokens, the text decoded without special tokens.
//!
//! The decoder prompt is `<|startoftranscript|>`, then for multilingual models the language
//! (the `language` option, else detected: the most likely language token after
//! `<|startoftranscript|>`) and the task (`transcribe` or `translate`), then
//! `<|notimestamps|>`. Generation stops at `<|endoftext|>` or `max_length` (448) decoder tokens;
//! the pipeline's default is 5 beams unless the model's generation config says otherwise.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, StringBuilder};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use tokenizers::Tokenizer;

use super::features::WhisperFeatures;
use super::{AudioInput, AudioOptions, AudioReading};
use crate::ops::OpError;
use crate::ops::core::{ArgColumn, CallLimits, RowErrors, Task};
use crate::ops::generation::model::{EncoderInput, Model, Seq2Seq};
use crate::ops::generation::search::{Limits, Prompts, Search, generate_from};
use crate::ops::generation::task::GenerationSettings;
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
}

impl std::fmt::Debug for WhisperTranscribe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperTranscribe")
            .field("features", &self.features)
            .field("max_length", &self.max_length)
            .field("language", &self.language)
            .finish()
    }
}

/// Whisper's options beside the shared transcribe ones.
pub struct WhisperOptions<'a> {
    pub language: Option<&'a str>,
    pub task: Option<&'a str>,
    pub generation: &'a GenerationSettings,
    pub audio: &'a AudioOptions,
}

impl WhisperTranscribe {
    pub fn resolve(
        options: WhisperOptions<'_>,
        dir: &ModelDir,
        pool: &SessionPool,
    ) -> Result<Self, OpError> {
        let err = OpError::Model;
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
            ..
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
        let reading =
            AudioReading::new(options.audio, features.sampling_rate).map_err(OpError::Options)?;
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
        let mut languages: Vec<(String, i64)> = if config.is_multilingual.unwrap_or(false) {
            config.lang_to_id.into_iter().collect()
        } else {
            Vec::new()
        };
        languages.sort_by_key(|(_, id)| *id);
        let language = match options.language {
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
        let task = match (languages.is_empty(), options.task) {
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
        })
    }

    /// The most likely language of each window: the language token the decoder ranks first
    /// after `<|startoftranscript|>` (`detect_language`).
    fn detect(&self, worker: &mut Worker, items: &[&Vec<f32>]) -> Result<Vec<i64>, String> {
        let prompt = [self.start];
        let rows: Vec<(usize, &[f32], &[i64])> = items
            .iter()
            .enumerate()
            .map(|(i, f)| (i, f.as_slice(), &prompt[..]))
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

    fn prompt(&self, language: Option<i64>) -> Vec<i64> {
        let mut p = vec![self.start];
        if let Some(l) = language {
            p.push(l);
        }
        p.extend(self.task);
        p.push(self.no_timestamps);
        p
    }
}

impl Task for WhisperTranscribe {
    type Input = AudioInput;
    /// A 30 s window's log-mel features.
    type Item = Vec<f32>;
    /// The generated text tokens.
    type Out = Vec<i64>;
    type Row = String;

    fn output_type(&self) -> DataType {
        DataType::Utf8
    }

    fn read(&self, args: &[ArgColumn<'_>], errors: &RowErrors) -> Result<Vec<Option<AudioInput>>> {
        self.reading.read(&args[0], errors)
    }

    fn prepare(&self, input: &AudioInput) -> Result<Vec<Vec<f32>>, String> {
        let samples = self.reading.load(input)?;
        if samples.len() > self.features.n_samples {
            return Err(format!(
                "the recording is {:.1} s long; ferry transcribes Whisper windows of up to {} s (long-form transcription is not supported yet: split the recording, e.g. at detect_speech's segments)",
                samples.len() as f64 / self.features.sampling_rate as f64,
                self.features.n_samples / self.features.sampling_rate as usize
            ));
        }
        Ok(vec![self.features.apply(&samples)])
    }

    fn cost(&self, _item: &Vec<f32>) -> usize {
        self.max_length
    }

    fn feed(&self, items: &[&Vec<f32>]) -> Result<Vec<Input>, String> {
        // What one encoder call takes (the benchmark baseline's first call).
        let mut data = Vec::new();
        for f in items {
            data.extend_from_slice(f);
        }
        Ok(vec![Input::new(
            "input_features",
            vec![
                items.len() as i64,
                self.features.n_mels as i64,
                self.features.frames() as i64,
            ],
            crate::runtime::tensor::Data::F32(data),
        )])
    }

    fn run(&self, worker: &mut Worker, items: &[&Vec<f32>]) -> Result<Vec<Vec<i64>>, String> {
        self.run_within(worker, items, CallLimits::ALL)
    }

    fn schedules_calls(&self) -> bool {
        true
    }

    fn run_within(
        &self,
        worker: &mut Worker,
        items: &[&Vec<f32>],
        limits: CallLimits,
    ) -> Result<Vec<Vec<i64>>, String> {
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
        let decoder: Vec<Vec<i64>> = languages.iter().map(|&l| self.prompt(l)).collect();
        let features: Vec<&[f32]> = items.iter().map(|f| f.as_slice()).collect();
        let mut search = self.search.clone();
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
        Ok(hypotheses
            .into_iter()
            .map(|h| h.into_iter().next().map(|h| h.tokens).unwrap_or_default())
            .collect())
    }

    fn finish(&self, _input: &AudioInput, outs: Vec<Vec<i64>>) -> Result<String, String> {
        let ids: Vec<u32> = outs.concat().iter().map(|&t| t as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| format!("decoding the transcript: {e}"))
    }

    fn to_array(&self, rows: Vec<Option<String>>) -> Result<ArrayRef> {
        let mut b = StringBuilder::new();
        for r in rows {
            b.append_option(r);
        }
        Ok(Arc::new(b.finish()))
    }

    fn wave_rows(&self) -> usize {
        // A window's features are 80 x 3000 floats (1 MB).
        64
    }
}
