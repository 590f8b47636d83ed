//! What the generation operators (`generate`, `summarize`, `translate`) share: their
//! generation settings and how they resolve, the model files they open, and the core task that
//! tokenizes prompts, runs the search on a worker and decodes the hypotheses.
//!
//! Settings resolve as the `transformers` pipelines resolve them (PIPELINES.md §0): the
//! pipeline's defaults, then the model's `generation_config.json` (over `config.json`) where the
//! pipeline leaves a setting unset, then `task_specific_params` of the task, then the manifest.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int32Builder, ListBuilder, StringBuilder, StructBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::Processors;
use super::model::{DecoderOnly, Model, Seq2Seq};
use super::search::{EarlyStopping, Finish, Hypothesis, Limits, Search, generate_within};
use crate::ops::OpError;
use crate::ops::core::{ArgColumn, CallLimits, RowErrors, Task};
use crate::ops::text::read_texts;
use crate::runtime::ModelDir;
use crate::runtime::model_dir::read_json;
use crate::runtime::pool::{ModelFile, SessionPool, Worker};
use crate::runtime::tensor::Input;

/// One value or several (`eos_token_id`, `forced_eos_token_id`, `stop_strings`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
#[schemars(rename = "OneOrMany_{T}")]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn list(&self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t.clone()],
            OneOrMany::Many(t) => t.clone(),
        }
    }
}

/// `early_stopping`: true, false or "never".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum EarlyStoppingSetting {
    Bool(bool),
    /// "never"
    Never(String),
}

/// Generation settings, named and meant as in `generation_config.json`. Every one is optional:
/// unset ones come from the model's files and the operator's pipeline defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    /// New tokens to generate at most (beats `max_length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// Length at most of prompt + new tokens (decoder-only) or of the decoder's output
    /// (encoder-decoder), when `max_new_tokens` is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_new_tokens: Option<usize>,
    /// 1: greedy search; more: beam search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_beams: Option<usize>,
    /// Hypotheses per row (at most `num_beams`); more than 1 makes the output a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_return_sequences: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_penalty: Option<f32>,
    /// true, false or "never".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingSetting>,
    /// Sample the next token (greedy search only) instead of taking the best one. ferry's
    /// pipelines default to false (the text-generation pipeline's default is true): outputs of a
    /// data pipeline should not change between runs unless asked to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    /// Sampling: scores divided by it (1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Sampling: only the k best tokens (50; 0 = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Sampling: only the best tokens whose probabilities add up to top_p (1.0 = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Sampling: only tokens at least min_p times as likely as the best one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Sampling: each row's generator is seeded with this (0) and the row's prompt, so a run is
    /// reproducible and a row's text does not depend on its batch. transformers seeds torch's
    /// global generator instead: sampled texts are not the same as transformers'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// A sequence ends once its generated text contains one of these (kept in the output, as
    /// transformers keeps it); checked on the text of the new tokens, after every token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_strings: Option<OneOrMany<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_repeat_ngram_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_words_ids: Option<Vec<Vec<i64>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_eos_token_id: Option<OneOrMany<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress_tokens: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_suppress_tokens: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<OneOrMany<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_start_token_id: Option<i64>,
}

macro_rules! settings_or {
    ($a:expr, $b:expr, $($f:ident),*) => {
        GenerationSettings { $($f: $a.$f.or($b.$f),)* }
    };
}

impl GenerationSettings {
    /// Each setting of `self`, else of `lower`.
    pub fn or(self, lower: GenerationSettings) -> GenerationSettings {
        settings_or!(
            self,
            lower,
            max_new_tokens,
            max_length,
            min_length,
            min_new_tokens,
            num_beams,
            num_return_sequences,
            length_penalty,
            early_stopping,
            do_sample,
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            stop_strings,
            repetition_penalty,
            no_repeat_ngram_size,
            bad_words_ids,
            forced_bos_token_id,
            forced_eos_token_id,
            suppress_tokens,
            begin_suppress_tokens,
            eos_token_id,
            pad_token_id,
            bos_token_id,
            decoder_start_token_id
        )
    }

    /// A model's own settings: its generation_config.json over its config.json (transformers'
    /// global defaults left unset).
    pub fn of_model(dir: &std::path::Path) -> Result<GenerationSettings, String> {
        let read = |file: &str| -> Result<GenerationSettings, String> {
            let value: serde_json::Value = read_json(&dir.join(file))
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            GenerationSettings::from_json(&value, file)
        };
        Ok(read("generation_config.json")?.or(read("config.json")?))
    }

    /// The search these settings make, unset ones at transformers' defaults (greedy, no
    /// processors); `max_new_tokens` is left 0, set per call. The pad token is `pad_token_id`,
    /// else `pad`, else the first EOS; stop strings need the model's tokenizer.
    pub fn search(
        &self,
        pad: Option<i64>,
        tokenizer: Option<&Arc<Tokenizer>>,
    ) -> Result<Search, String> {
        let eos = self
            .eos_token_id
            .as_ref()
            .map(OneOrMany::list)
            .unwrap_or_default();
        let early_stopping = match &self.early_stopping {
            None | Some(EarlyStoppingSetting::Bool(false)) => EarlyStopping::Heuristic,
            Some(EarlyStoppingSetting::Bool(true)) => EarlyStopping::Done,
            Some(EarlyStoppingSetting::Never(s)) if s == "never" => EarlyStopping::Never,
            Some(EarlyStoppingSetting::Never(s)) => {
                return Err(format!(
                    "early_stopping is true, false or \"never\", not {s:?}"
                ));
            }
        };
        let stop_strings = match (&self.stop_strings, tokenizer) {
            (None, _) => None,
            (Some(_), None) => return Err("stop_strings need the model's tokenizer".into()),
            (Some(strings), Some(tokenizer)) => {
                let tokenizer = Arc::clone(tokenizer);
                super::StopStrings::new(
                    &strings.list(),
                    Arc::new(move |ids: &[i64]| {
                        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                        tokenizer.decode(&ids, false).unwrap_or_default()
                    }),
                )
            }
        };
        let search = Search {
            stop_strings,
            num_beams: self.num_beams.unwrap_or(1),
            num_return_sequences: self.num_return_sequences.unwrap_or(1),
            length_penalty: self.length_penalty.unwrap_or(1.0),
            early_stopping,
            max_new_tokens: 0,
            pad_token_id: self
                .pad_token_id
                .or(pad)
                .or(eos.first().copied())
                .unwrap_or(0),
            eos_token_ids: eos,
            decoder_start_token_id: self
                .decoder_start_token_id
                .or(self.bos_token_id)
                .unwrap_or(0),
            sampling: (self.do_sample == Some(true)).then(|| super::Sampling {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(50),
                top_p: self.top_p.unwrap_or(1.0),
                min_p: self.min_p,
                seed: self.seed.unwrap_or(0),
            }),
            processors: Processors {
                repetition_penalty: self.repetition_penalty,
                no_repeat_ngram_size: self.no_repeat_ngram_size,
                bad_words_ids: self.bad_words_ids.clone().unwrap_or_default(),
                min_length: self.min_length,
                min_new_tokens: self.min_new_tokens,
                forced_bos_token_id: self.forced_bos_token_id,
                forced_eos_token_ids: self
                    .forced_eos_token_id
                    .as_ref()
                    .map(OneOrMany::list)
                    .unwrap_or_default(),
                suppress_tokens: self.suppress_tokens.clone().unwrap_or_default(),
                begin_suppress_tokens: self.begin_suppress_tokens.clone().unwrap_or_default(),
                timestamps: None,
            },
        };
        search.check()?;
        Ok(search)
    }

    /// The settings among a JSON object's keys (a model file's other keys are not ours).
    /// transformers' global defaults count as unset (`max_length` 20, `num_beams` 1, ...).
    pub fn from_json(value: &serde_json::Value, file: &str) -> Result<GenerationSettings, String> {
        let known = serde_json::to_value(GenerationSettings {
            max_new_tokens: Some(0),
            max_length: Some(0),
            min_length: Some(0),
            min_new_tokens: Some(0),
            num_beams: Some(0),
            num_return_sequences: Some(0),
            length_penalty: Some(0.0),
            early_stopping: Some(EarlyStoppingSetting::Bool(false)),
            do_sample: Some(false),
            temperature: Some(0.0),
            top_k: Some(0),
            top_p: Some(0.0),
            min_p: Some(0.0),
            seed: Some(0),
            stop_strings: Some(OneOrMany::One(String::new())),
            repetition_penalty: Some(0.0),
            no_repeat_ngram_size: Some(0),
            bad_words_ids: Some(Vec::new()),
            forced_bos_token_id: Some(0),
            forced_eos_token_id: Some(OneOrMany::One(0)),
            suppress_tokens: Some(Vec::new()),
            begin_suppress_tokens: Some(Vec::new()),
            eos_token_id: Some(OneOrMany::One(0)),
            pad_token_id: Some(0),
            bos_token_id: Some(0),
            decoder_start_token_id: Some(0),
        })
        .expect("settings serialize");
        let globals = serde_json::json!({
            "max_length": 20, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
            "length_penalty": 1.0, "early_stopping": false, "do_sample": false,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "temperature": 1.0,
            "top_k": 50, "top_p": 1.0,
        });
        let mut kept = serde_json::Map::new();
        if let Some(object) = value.as_object() {
            for (k, v) in object {
                if known.get(k).is_some() && !v.is_null() && globals.get(k) != Some(v) {
                    kept.insert(k.clone(), v.clone());
                }
            }
        }
        serde_json::from_value(serde_json::Value::Object(kept)).map_err(|e| format!("{file}: {e}"))
    }
}

/// Which pipeline an operator follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipeline {
    /// text-generation: decoder-only; the output is the prompt's continuation.
    TextGeneration { return_full_text: bool },
    /// summarization.
    Summarization,
    /// translation (`task_specific_params` key `translation_*`).
    Translation,
}

impl Pipeline {
    /// The pipeline's own defaults (`_default_generation_config`), but no sampling unless asked.
    fn defaults(self) -> GenerationSettings {
        match self {
            Pipeline::TextGeneration { .. } => GenerationSettings {
                max_new_tokens: Some(256),
                do_sample: Some(false),
                ..Default::default()
            },
            Pipeline::Summarization | Pipeline::Translation => GenerationSettings {
                max_new_tokens: Some(256),
                num_beams: Some(4),
                do_sample: Some(false),
                ..Default::default()
            },
        }
    }
}

/// Options every generation operator takes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationOptions {
    /// Generation settings over the model's and the pipeline's (see `GenerationSettings`).
    #[serde(default)]
    pub generation: GenerationSettings,
    /// Text put before every input (default: `config.json`'s `prefix` or the task's, e.g. T5's
    /// "summarize: ").
    #[serde(default)]
    pub prefix: Option<String>,
    /// generate only: the prompt followed by its continuation (default), or the continuation
    /// alone.
    #[serde(default)]
    pub return_full_text: Option<bool>,
    /// translate only: the target language's token (e.g. "fra_Latn", "__fr__"), forced as the
    /// first generated token, as multilingual models (NLLB, M2M100, mBART) need.
    #[serde(default)]
    pub tgt_lang: Option<String>,
    /// translate only: the source language's token (e.g. "fra_Latn", "fr_XX") for tokenizers
    /// that mark it around each text (NLLB, mBART): it takes the place of the tokenizer's
    /// default (tokenizer_config.json's `src_lang`), as the tokenizer's `src_lang` does.
    #[serde(default)]
    pub src_lang: Option<String>,
    /// Each input becomes a user message rendered with the model's chat template
    /// (`chat_template.jinja` or tokenizer_config.json's `chat_template`), the assistant's turn
    /// opened; the output is the reply. For instruct models.
    #[serde(default)]
    pub chat: bool,
    /// Each input is put into this text at `{text}` first, e.g. "Summarize in one sentence:
    /// {text}" (with `chat`, lets `summarize` run an instruct decoder-only model).
    #[serde(default)]
    pub template: Option<String>,
    /// Output `Struct<text, tokens: Int32, finish_reason: Utf8>` instead of the text.
    #[serde(default)]
    pub details: bool,
    /// Model files, by default as optimum names them: `model.onnx` (decoder-only), or
    /// `encoder_model.onnx` with `decoder_model_merged.onnx`, or `decoder_model.onnx` and
    /// `decoder_with_past_model.onnx`, or `decoder_model.onnx` alone (no cache).
    #[serde(default)]
    pub encoder: Option<String>,
    #[serde(default)]
    pub decoder: Option<String>,
    #[serde(default)]
    pub decoder_with_past: Option<String>,
}

/// The model files an operator opens. An encoder-decoder's decoder of later steps (the one
/// that takes the cross-attention cache: the decoder with past, else the merged decoder) is
/// rewritten to share each source row's cache between its beams where it can be
/// ([`super::shared_cross`]).
pub fn model_files(
    dir: &std::path::Path,
    options: &GenerationOptions,
    manifest_file: &str,
) -> Result<Vec<ModelFile>, OpError> {
    let files = model_file_names(dir, options, manifest_file)?;
    let has = |role: &str| files.iter().any(|(r, _)| *r == role);
    let shares = match (has("encoder"), has("decoder_with_past")) {
        (false, _) => None,
        (true, true) => Some("decoder_with_past"),
        (true, false) => Some("decoder"),
    };
    Ok(files
        .iter()
        .map(|(role, file)| {
            let mut f = ModelFile::new(role, dir.join(file));
            if shares == Some(*role) {
                f.edit = Some(super::shared_cross::share_cross_attention);
            }
            f
        })
        .collect())
}

/// The model files an operator opens: (role, file name).
fn model_file_names(
    dir: &std::path::Path,
    options: &GenerationOptions,
    manifest_file: &str,
) -> Result<Vec<(&'static str, String)>, OpError> {
    let exists = |f: &str| dir.join(f).is_file();
    let encoder = options
        .encoder
        .clone()
        .or_else(|| exists("encoder_model.onnx").then(|| "encoder_model.onnx".to_string()));
    let Some(encoder) = encoder else {
        // Decoder-only.
        let file = options.decoder.clone().unwrap_or(manifest_file.to_string());
        return Ok(vec![("decoder", file)]);
    };
    let mut files = vec![("encoder", encoder)];
    match (&options.decoder, &options.decoder_with_past) {
        (Some(d), Some(p)) => {
            files.push(("decoder", d.clone()));
            files.push(("decoder_with_past", p.clone()));
        }
        (Some(d), None) => files.push(("decoder", d.clone())),
        (None, p) => {
            if p.is_none() && exists("decoder_model_merged.onnx") {
                files.push(("decoder", "decoder_model_merged.onnx".into()));
            } else if exists("decoder_model.onnx") {
                files.push(("decoder", "decoder_model.onnx".into()));
                if let Some(p) = p.clone().or_else(|| {
                    exists("decoder_with_past_model.onnx")
                        .then(|| "decoder_with_past_model.onnx".to_string())
                }) {
                    files.push(("decoder_with_past", p));
                }
            } else {
                return Err(OpError::Model(format!(
                    "{}: an encoder-decoder model needs `decoder_model_merged.onnx` or `decoder_model.onnx` beside `{}` (or set options.decoder)",
                    dir.display(),
                    files[0].1
                )));
            }
        }
    }
    for (_, f) in &files {
        if !exists(f) {
            return Err(OpError::Model(format!(
                "{}: the model file `{f}` is missing",
                dir.display()
            )));
        }
    }
    Ok(files)
}

/// The task resolved against its model: what the core runs.
pub struct GenerationTask {
    pipeline: Pipeline,
    model: Model,
    tokenizer: Arc<Tokenizer>,
    /// The search, its `max_new_tokens` set per call.
    search: Search,
    max_new_tokens: Option<usize>,
    max_length: Option<usize>,
    prefix: String,
    /// Decoder-only: prompts keep their last `context - max_new` tokens (the pipeline's "hole");
    /// encoder-decoder: sources keep their first `context` tokens.
    context: Option<usize>,
    /// Decoder-only: an empty prompt starts from this token.
    bos: Option<i64>,
    /// The model's chat template (decoder-only models that have one).
    chat_template: Option<super::chat::ChatTemplate>,
    /// Text inputs are rendered as a user message with the chat template (`chat: true`).
    chat: bool,
    template: Option<String>,
    /// Encoder-decoder: sources truncated to `context` tokens, special tokens kept.
    truncating: Option<crate::ops::text::Truncating>,
    details: bool,
}

/// The tokenizer with `lang` in place of the source language token `default` among the special
/// tokens its post-processor adds around a text (what `src_lang` does to NLLB's and mBART's
/// tokenizers).
fn with_src_lang(tokenizer: &Tokenizer, default: &str, lang: &str) -> Result<Tokenizer, String> {
    use serde_json::{Value, json};
    let id = tokenizer
        .token_to_id(lang)
        .ok_or("not a token of the model's tokenizer")?;
    let mut json: Value =
        serde_json::from_str(&tokenizer.to_string(false).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    fn swap(processor: &mut Value, default: &str, lang: &str, id: u32) -> usize {
        let mut swapped = 0;
        match processor["type"].as_str() {
            Some("TemplateProcessing") => {
                for which in ["single", "pair"] {
                    for piece in processor[which].as_array_mut().into_iter().flatten() {
                        if piece["SpecialToken"]["id"] == default {
                            piece["SpecialToken"]["id"] = Value::from(lang);
                            swapped += 1;
                        }
                    }
                }
                if swapped > 0 {
                    processor["special_tokens"][lang] =
                        json!({"id": lang, "ids": [id], "tokens": [lang]});
                }
            }
            Some("Sequence") => {
                for p in processor["processors"].as_array_mut().into_iter().flatten() {
                    swapped += swap(p, default, lang, id);
                }
            }
            _ => {}
        }
        swapped
    }
    if swap(&mut json["post_processor"], default, lang, id) == 0 {
        return Err(format!(
            "the tokenizer does not add the source language token {default:?} around a text"
        ));
    }
    json.to_string().parse().map_err(|e| format!("{e}"))
}

/// One row's input.
pub enum PromptInput {
    Text(String),
    /// A conversation, (role, content) per message, rendered with the chat template.
    Messages(Vec<(String, String)>),
}

/// Reads a column of conversations: a list of `{role, content}` structs per row. A row with a
/// null message, role or content is a row error.
fn read_messages(
    field: &str,
    array: &ArrayRef,
    errors: &RowErrors,
) -> Result<Vec<Option<PromptInput>>> {
    use datafusion::arrow::array::{Array, AsArray, StructArray};
    let rows: Vec<Option<ArrayRef>> = match array.data_type() {
        DataType::List(_) => array.as_list::<i32>().iter().collect(),
        DataType::LargeList(_) => array.as_list::<i64>().iter().collect(),
        other => {
            return datafusion::common::exec_err!(
                "cannot read messages from a {other} column '{field}'"
            );
        }
    };
    let mut out = Vec::with_capacity(rows.len());
    for (row, messages) in rows.into_iter().enumerate() {
        let Some(messages) = messages else {
            out.push(None);
            continue;
        };
        let messages: &StructArray = messages.as_struct();
        let strings = |name: &str| -> Result<Vec<Option<String>>> {
            let column = messages.column_by_name(name).ok_or_else(|| {
                datafusion::error::DataFusionError::Execution(format!(
                    "'{field}': messages have no `{name}` field"
                ))
            })?;
            read_texts(name, column, &RowErrors::default())
        };
        let (roles, contents) = (strings("role")?, strings("content")?);
        let mut conversation = Vec::with_capacity(messages.len());
        let mut bad = None;
        for (i, (role, content)) in roles.into_iter().zip(contents).enumerate() {
            match (messages.is_valid(i), role, content) {
                (true, Some(role), Some(content)) => conversation.push((role, content)),
                _ => {
                    bad = Some(format!(
                        "field '{field}': message {i} has no role or no content"
                    ));
                    break;
                }
            }
        }
        match bad {
            Some(message) => {
                errors.push(row, message);
                out.push(None);
            }
            None if conversation.is_empty() => {
                errors.push(
                    row,
                    format!("field '{field}': the conversation has no messages"),
                );
                out.push(None);
            }
            None => out.push(Some(PromptInput::Messages(conversation))),
        }
    }
    Ok(out)
}

/// One row's prompt, tokenized.
pub struct Prompt {
    ids: Vec<i64>,
    max_new: usize,
}

/// One generated sequence, decoded.
pub struct Generated {
    text: String,
    tokens: usize,
    finish: Finish,
}

impl GenerationTask {
    pub fn resolve(
        pipeline: Pipeline,
        options: &GenerationOptions,
        dir: &ModelDir,
        pool: &SessionPool,
    ) -> Result<Self, OpError> {
        let err = OpError::Model;
        let info = |role: &'static str| pool.session(role).map(|s| (role, s));
        let model = match (info("encoder"), info("decoder"), info("decoder_with_past")) {
            (Some(enc), Some(dec), past) => {
                Model::Seq2Seq(Seq2Seq::from_sessions(enc, dec, past).map_err(err)?)
            }
            (None, Some((role, dec)), _) => {
                Model::DecoderOnly(DecoderOnly::from_session(role, dec).map_err(err)?)
            }
            _ => return Err(OpError::Model("no decoder model was opened".into())),
        };
        let seq2seq = matches!(model, Model::Seq2Seq(_));
        match (pipeline, seq2seq) {
            (Pipeline::TextGeneration { .. }, true) => {
                return Err(OpError::Model(format!(
                    "{}: generate runs decoder-only models; this is an encoder-decoder export (use summarize or translate)",
                    dir.dir.display()
                )));
            }
            (Pipeline::Translation, false) => {
                return Err(OpError::Model(format!(
                    "{}: translate runs encoder-decoder models (encoder_model.onnx + decoder); this is a decoder-only export",
                    dir.dir.display()
                )));
            }
            _ => {}
        }
        let mut tokenizer = dir.tokenizer("generation")?;
        if let Some(lang) = &options.src_lang {
            if pipeline != Pipeline::Translation {
                return Err(OpError::Options(
                    "src_lang is an option of translate".into(),
                ));
            }
            let tokenizer_config: serde_json::Value =
                read_json(&dir.dir.join("tokenizer_config.json"))?.unwrap_or_default();
            let default = tokenizer_config["src_lang"].as_str().ok_or_else(|| {
                OpError::Options(format!(
                    "src_lang: {} names no default src_lang in tokenizer_config.json, so its tokenizer does not mark the source language",
                    dir.dir.display()
                ))
            })?;
            tokenizer = with_src_lang(&tokenizer, default, lang)
                .map_err(|e| OpError::Options(format!("src_lang {lang:?}: {e}")))?;
        }
        let config: serde_json::Value =
            read_json(&dir.dir.join("config.json"))?.unwrap_or_default();
        let from_config = GenerationSettings::from_json(&config, "config.json").map_err(err)?;
        let from_file =
            match read_json::<serde_json::Value>(&dir.dir.join("generation_config.json"))? {
                Some(v) => {
                    GenerationSettings::from_json(&v, "generation_config.json").map_err(err)?
                }
                None => GenerationSettings::default(),
            };
        let model_settings = from_file.or(from_config);
        // The pipeline's defaults beat the model's; a model `max_length` (not 20) turns off the
        // default `max_new_tokens`.
        let mut defaults = pipeline.defaults();
        if model_settings.max_length.is_some() {
            defaults.max_new_tokens = None;
        }
        let mut settings = defaults.or(model_settings);
        // task_specific_params, and their prefix.
        let task_key = |params: &serde_json::Map<String, serde_json::Value>| -> Option<String> {
            match pipeline {
                Pipeline::Summarization => params
                    .contains_key("summarization")
                    .then(|| "summarization".into()),
                Pipeline::Translation => params
                    .keys()
                    .find(|k| k.starts_with("translation"))
                    .cloned(),
                Pipeline::TextGeneration { .. } => params
                    .contains_key("text-generation")
                    .then(|| "text-generation".into()),
            }
        };
        let mut prefix = config["prefix"].as_str().map(str::to_string);
        if let Some(params) = config["task_specific_params"].as_object()
            && let Some(key) = task_key(params)
        {
            let task = &params[&key];
            let task_settings =
                GenerationSettings::from_json(task, "config.json task_specific_params")
                    .map_err(err)?;
            settings = task_settings.or(settings);
            if let Some(p) = task["prefix"].as_str() {
                prefix = Some(p.to_string());
            }
        }
        let mut settings = options.generation.clone().or(settings);
        if options.return_full_text.is_some()
            && !matches!(pipeline, Pipeline::TextGeneration { .. })
        {
            return Err(OpError::Options(
                "return_full_text is an option of generate".into(),
            ));
        }
        if let Some(lang) = &options.tgt_lang {
            if pipeline != Pipeline::Translation {
                return Err(OpError::Options(
                    "tgt_lang is an option of translate".into(),
                ));
            }
            let id = tokenizer.token_to_id(lang).ok_or_else(|| {
                OpError::Options(format!(
                    "tgt_lang {lang:?} is not a token of the model's tokenizer (multilingual models name languages by tokens such as \"fra_Latn\" or \"__fr__\")"
                ))
            })?;
            settings.forced_bos_token_id = Some(i64::from(id));
        }
        let pad = settings
            .pad_token_id
            .or_else(|| dir.pad_id(&tokenizer).ok().map(i64::from));
        let decoder_start = settings.decoder_start_token_id.or(settings.bos_token_id);
        if seq2seq && decoder_start.is_none() {
            return Err(OpError::Model(format!(
                "{}: neither generation_config.json nor config.json sets decoder_start_token_id",
                dir.dir.display()
            )));
        }
        let tokenizer = Arc::new(tokenizer);
        let search = settings
            .search(pad, Some(&tokenizer))
            .map_err(OpError::Options)?;
        if settings.max_new_tokens.is_none() && settings.max_length.is_none() {
            return Err(OpError::Options("set generation.max_new_tokens".into()));
        }
        let context = config["n_positions"]
            .as_u64()
            .or(config["max_position_embeddings"].as_u64())
            .map(|n| n as usize)
            .or_else(|| dir.max_length().ok().filter(|_| seq2seq));
        let truncating = match (seq2seq, context) {
            (true, Some(max_length)) => Some(crate::ops::text::Truncating::new(
                &tokenizer,
                tokenizers::TruncationParams {
                    max_length,
                    ..Default::default()
                },
            )?),
            _ => None,
        };
        if options.chat && seq2seq {
            return Err(OpError::Options(
                "chat: chat templates are for decoder-only instruct models".into(),
            ));
        }
        // Loaded for conversations even without `chat`; a template ferry cannot parse only
        // matters when it is used.
        let chat_template = match (seq2seq, super::chat::ChatTemplate::from_dir(&dir.dir)) {
            (true, _) => None,
            (false, Ok(t)) => t,
            (false, Err(e)) if !options.chat => {
                tracing::warn!(error = %e, "the model's chat template cannot be used; messages inputs will fail");
                None
            }
            (false, Err(e)) => return Err(err(e)),
        };
        if options.chat && chat_template.is_none() {
            return Err(OpError::Options(format!(
                "chat: {} has no chat template (chat_template.jinja or tokenizer_config.json's chat_template)",
                dir.dir.display()
            )));
        }
        if let Some(t) = &options.template
            && !t.contains("{text}")
        {
            return Err(OpError::Options(format!(
                "template {t:?} has no {{text}} for the input"
            )));
        }
        Ok(GenerationTask {
            chat: options.chat,
            chat_template,
            template: options.template.clone(),
            truncating,
            pipeline,
            model,
            tokenizer,
            search,
            max_new_tokens: settings.max_new_tokens,
            max_length: settings.max_length,
            prefix: options.prefix.clone().or(prefix).unwrap_or_default(),
            context,
            bos: settings.bos_token_id,
            details: options.details,
        })
    }

    /// A tokenized input as a prompt: a BOS for an empty decoder-only prompt, `max_new` from the
    /// settings, and a decoder-only prompt kept to its last tokens that leave room for the new
    /// ones (the text-generation pipeline's "hole").
    fn prompt(&self, encoding: tokenizers::Encoding) -> Result<Vec<Prompt>, String> {
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
        let seq2seq = matches!(self.model, Model::Seq2Seq(_));
        if ids.is_empty() {
            match (seq2seq, self.bos) {
                (false, Some(bos)) => ids.push(bos),
                _ => return Err("the input has no tokens".into()),
            }
        }
        let max_new = |prefix: usize| match (self.max_new_tokens, self.max_length) {
            (Some(n), _) => n,
            (None, Some(l)) => l.saturating_sub(prefix),
            (None, None) => 0,
        };
        let max_new = if seq2seq {
            max_new(1)
        } else {
            let max_new = max_new(ids.len());
            if let Some(c) = self.context {
                let keep = c.saturating_sub(max_new);
                if keep == 0 {
                    return Err(format!(
                        "max_new_tokens {max_new} leaves no room for the prompt in the model's {c} positions"
                    ));
                }
                if ids.len() > keep {
                    ids.drain(..ids.len() - keep);
                }
            }
            max_new
        };
        Ok(vec![Prompt { ids, max_new }])
    }

    fn decode(&self, ids: &[i64]) -> Result<String, String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer.decode(&ids, true).map_err(|e| e.to_string())
    }

    fn text_type(&self) -> DataType {
        if self.details {
            DataType::Struct(Self::detail_fields())
        } else {
            DataType::Utf8
        }
    }

    fn detail_fields() -> Fields {
        Fields::from(vec![
            Field::new("text", DataType::Utf8, true),
            Field::new("tokens", DataType::Int32, true),
            Field::new("finish_reason", DataType::Utf8, true),
        ])
    }
}

/// Python's `clean_up_tokenization` (`clean_up_tokenization_spaces=True`).
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

impl Task for GenerationTask {
    type Input = PromptInput;
    type Item = Prompt;
    /// The prompt's ids as generated from, and the hypotheses.
    type Out = (Vec<i64>, Vec<Hypothesis>);
    type Row = Vec<Generated>;

    fn output_type(&self) -> DataType {
        let one = self.text_type();
        if self.search.num_return_sequences > 1 {
            DataType::List(Arc::new(Field::new("item", one, true)))
        } else {
            one
        }
    }

    fn read(&self, args: &[ArgColumn<'_>], errors: &RowErrors) -> Result<Vec<Option<PromptInput>>> {
        let (field, array) = (args[0].field, args[0].array);
        if crate::ops::core::is_messages(array.data_type()) {
            return read_messages(field, array, errors);
        }
        Ok(read_texts(field, array, errors)?
            .into_iter()
            .map(|t| t.map(PromptInput::Text))
            .collect())
    }

    fn prepare(&self, input: &PromptInput) -> Result<Vec<Prompt>, String> {
        let chat = |messages: &[(&str, &str)]| -> Result<tokenizers::Encoding, String> {
            let template = self.chat_template.as_ref().ok_or(
                "messages need the model's chat template (chat_template.jinja or tokenizer_config.json's chat_template); this model has none",
            )?;
            // As apply_chat_template: the rendered text holds its own special tokens.
            let rendered = template.render(messages, true)?;
            self.tokenizer
                .encode(rendered.as_str(), false)
                .map_err(|e| e.to_string())
        };
        let input = match input {
            PromptInput::Messages(messages) => {
                let messages: Vec<(&str, &str)> = messages
                    .iter()
                    .map(|(r, c)| (r.as_str(), c.as_str()))
                    .collect();
                return self.prompt(chat(&messages)?);
            }
            PromptInput::Text(text) => text,
        };
        let input = match &self.template {
            Some(t) => t.replace("{text}", input),
            None => input.clone(),
        };
        let encoding = if self.chat {
            chat(&[("user", &input)])?
        } else {
            let text = format!("{}{input}", self.prefix);
            match &self.truncating {
                Some(t) => t
                    .encode(&crate::ops::text::TextInput::One(text), false)?
                    .remove(0),
                None => self
                    .tokenizer
                    .encode(text.as_str(), true)
                    .map_err(|e| e.to_string())?,
            }
        };
        self.prompt(encoding)
    }

    fn cost(&self, item: &Prompt) -> usize {
        // The cache holds prompt and new tokens, for every beam.
        (item.ids.len() + item.max_new) * self.search.num_beams
    }
    fn batch_key(&self, item: &Prompt) -> u64 {
        item.max_new as u64
    }

    fn feed(&self, _items: &[&Prompt]) -> Result<Vec<Input>, String> {
        Err("generation runs a loop of model calls, not one call".into())
    }

    fn run(&self, worker: &mut Worker, items: &[&Prompt]) -> Result<Vec<Self::Out>, String> {
        self.run_within(worker, items, CallLimits::ALL)
    }

    fn schedules_calls(&self) -> bool {
        true
    }

    /// Rows are batched continuously: `batch_size` rows generate at once, and the cache they
    /// can come to hold (prompt and new tokens, every beam, padding included) stays within
    /// `max_batch_cost` tokens.
    fn run_within(
        &self,
        worker: &mut Worker,
        items: &[&Prompt],
        limits: CallLimits,
    ) -> Result<Vec<Self::Out>, String> {
        let Some(first) = items.first() else {
            return Ok(Vec::new());
        };
        let search = Search {
            max_new_tokens: first.max_new,
            ..self.search.clone()
        };
        let prompts: Vec<Vec<i64>> = items.iter().map(|p| p.ids.clone()).collect();
        let limits = Limits {
            rows: limits.items,
            tokens: limits.cost,
        };
        let results = generate_within(worker, &self.model, &prompts, &search, limits)?;
        Ok(prompts.into_iter().zip(results).collect())
    }

    fn finish(
        &self,
        input: &PromptInput,
        mut outs: Vec<Self::Out>,
    ) -> Result<Vec<Generated>, String> {
        let (prompt, hyps) = outs.pop().ok_or("no result")?;
        // The prompt as the pipeline decodes it, to strip from each continuation (generate).
        let prompt_chars = match self.pipeline {
            Pipeline::TextGeneration { .. } => clean_up_tokenization(&self.decode(&prompt)?)
                .chars()
                .count(),
            _ => 0,
        };
        hyps.into_iter()
            .map(|h| {
                let text = match self.pipeline {
                    Pipeline::TextGeneration { return_full_text } => {
                        // The pipeline decodes prompt + continuation and strips the prompt by
                        // its decoded length in characters.
                        let mut all = prompt.clone();
                        all.extend(&h.tokens);
                        let full = clean_up_tokenization(&self.decode(&all)?);
                        let new: String = full.chars().skip(prompt_chars).collect();
                        // Conversations and chat prompts give the assistant's reply alone.
                        if let (true, false, PromptInput::Text(input)) =
                            (return_full_text, self.chat, input)
                        {
                            format!("{input}{new}")
                        } else {
                            new
                        }
                    }
                    _ => self.decode(&h.tokens)?,
                };
                Ok(Generated {
                    text,
                    tokens: h.tokens.len(),
                    finish: h.finish,
                })
            })
            .collect()
    }

    fn to_array(&self, rows: Vec<Option<Vec<Generated>>>) -> Result<ArrayRef> {
        let list = self.search.num_return_sequences > 1;
        if self.details {
            let fields = Self::detail_fields();
            let new_struct = || {
                StructBuilder::new(
                    fields.clone(),
                    vec![
                        Box::new(StringBuilder::new()),
                        Box::new(Int32Builder::new()),
                        Box::new(StringBuilder::new()),
                    ],
                )
            };
            let append = |b: &mut StructBuilder, g: Option<&Generated>| {
                b.field_builder::<StringBuilder>(0)
                    .expect("text")
                    .append_option(g.map(|g| &g.text));
                b.field_builder::<Int32Builder>(1)
                    .expect("tokens")
                    .append_option(g.map(|g| g.tokens as i32));
                b.field_builder::<StringBuilder>(2)
                    .expect("finish_reason")
                    .append_option(g.map(|g| g.finish.as_str()));
                b.append(g.is_some());
            };
            if list {
                let mut b = ListBuilder::new(new_struct());
                for row in &rows {
                    match row {
                        Some(gs) => {
                            for g in gs {
                                append(b.values(), Some(g));
                            }
                            b.append(true);
                        }
                        None => b.append(false),
                    }
                }
                Ok(Arc::new(b.finish()))
            } else {
                let mut b = new_struct();
                for row in &rows {
                    append(&mut b, row.as_ref().and_then(|r| r.first()));
                }
                Ok(Arc::new(b.finish()))
            }
        } else if list {
            let mut b = ListBuilder::new(StringBuilder::new());
            for row in &rows {
                match row {
                    Some(gs) => {
                        for g in gs {
                            b.values().append_value(&g.text);
                        }
                        b.append(true);
                    }
                    None => b.append(false),
                }
            }
            Ok(Arc::new(b.finish()))
        } else {
            let mut b = StringBuilder::new();
            for row in &rows {
                b.append_option(row.as_ref().and_then(|r| r.first()).map(|g| &g.text));
            }
            Ok(Arc::new(b.finish()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;

    /// src_lang replaces the default language token the post-processor adds (NLLB's layout:
    /// language, text, `</s>`), for single texts; an unknown language is refused.
    #[test]
    fn src_lang_replaces_the_source_language_token() {
        let vocab: std::collections::HashMap<String, u32> = [
            ("eng_Latn", 0),
            ("fra_Latn", 1),
            ("</s>", 2),
            ("hello", 3),
            ("[UNK]", 4),
        ]
        .into_iter()
        .map(|(t, i)| (t.to_string(), i))
        .collect();
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Whitespace {}));
        tokenizer.with_post_processor(Some(
            TemplateProcessing::builder()
                .try_single("eng_Latn $A </s>")
                .unwrap()
                .try_pair("eng_Latn $A </s> $B </s>")
                .unwrap()
                .special_tokens(vec![("eng_Latn", 0), ("</s>", 2)])
                .build()
                .unwrap(),
        ));
        assert_eq!(
            tokenizer.encode("hello", true).unwrap().get_ids(),
            [0, 3, 2]
        );
        let french = with_src_lang(&tokenizer, "eng_Latn", "fra_Latn").unwrap();
        assert_eq!(french.encode("hello", true).unwrap().get_ids(), [1, 3, 2]);
        assert!(with_src_lang(&tokenizer, "eng_Latn", "xx_Latn").is_err());
        assert!(with_src_lang(&tokenizer, "deu_Latn", "fra_Latn").is_err());
    }
}
