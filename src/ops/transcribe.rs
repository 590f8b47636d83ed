//! `transcribe`: speech recognition, as the `automatic-speech-recognition` pipeline does it.
//!
//! CTC models (wav2vec2, HuBERT, ...): the argmax token of every output frame; repeats
//! collapsed before blanks (the pad token) are dropped, the word delimiter `|` becomes a space
//! (`Wav2Vec2CTCTokenizer`). `return_timestamps: char | word` gives each character's or word's
//! start and end in seconds (frames x `inputs_to_logits_ratio` / rate). Long recordings run in
//! `chunk_length_s` windows overlapping by `stride_length_s`; the strides' frames are dropped
//! and the rest decoded once, as the pipeline does.
//!
//! Whisper (encoder-decoder exports with `input_features`): see `audio::whisper`.
//!
//! Output: `Utf8`; with timestamps `Struct<text: Utf8, chunks: List<Struct<text: Utf8,
//! start: Float64, end: Float64>>>`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Builder, StringArray, StringBuilder, StructArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::OpError;
use super::audio::AudioOptions;
use super::audio::model::{AudioModel, AudioTask, Chunking, Clip};
use super::core::struct_column;
use super::generation::task::{GenerationSettings, OneOrMany};
use crate::runtime::model_dir::read_json;
use crate::runtime::tensor::Output;

/// Options of a `transcribe` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TranscribeOptions {
    /// Also return the transcript's pieces with their start and end in seconds: `char` or
    /// `word` (CTC models), `segment` (Whisper).
    #[serde(default)]
    pub return_timestamps: Option<TimestampLevel>,
    /// Run long recordings in windows of this many seconds (0 or unset: whole recordings).
    #[serde(default)]
    pub chunk_length_s: Option<f64>,
    /// The overlap of neighbouring windows, in seconds: one value for both sides or
    /// `[left, right]` (default `chunk_length_s / 6`).
    #[serde(default)]
    pub stride_length_s: Option<OneOrMany<f64>>,
    /// Whisper (multilingual): the spoken language (`en`, `fr`, ... or `<|fr|>`); unset: detected
    /// per recording.
    #[serde(default)]
    pub language: Option<String>,
    /// Whisper (multilingual): `transcribe` (default) or `translate` (to English).
    #[serde(default)]
    pub task: Option<String>,
    /// Whisper: generation settings over the model's and the pipeline's (5 beams, 448 decoder
    /// tokens); see `GenerationSettings`.
    #[serde(default)]
    pub generation: GenerationSettings,
    /// How recordings are read.
    #[serde(default)]
    pub audio: AudioOptions,
}

/// What a timestamp marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimestampLevel {
    /// Each character (CTC models).
    Char,
    /// Each word (CTC models).
    Word,
    /// Each segment Whisper predicts (the pipeline's `return_timestamps=True`).
    Segment,
}

/// A CTC model's vocabulary and decoding rules (`vocab.json`, `tokenizer_config.json`).
#[derive(Debug)]
pub struct CtcTokenizer {
    tokens: HashMap<u32, String>,
    pad: String,
    unk: String,
    delimiter: String,
    lower_case: bool,
    clean_up: bool,
}

/// A token setting: a string, or an added-token object with `content`.
fn token_text(v: Option<&serde_json::Value>, default: &str) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or(default)
            .to_string(),
        _ => default.to_string(),
    }
}

impl CtcTokenizer {
    pub fn load(dir: &Path) -> Result<Self, OpError> {
        let vocab_path = dir.join("vocab.json");
        let vocab: HashMap<String, u32> = read_json(&vocab_path)?.ok_or_else(|| {
            OpError::Model(format!(
                "{}: a CTC model needs its vocabulary (vocab.json, as Wav2Vec2CTCTokenizer saves it)",
                vocab_path.display()
            ))
        })?;
        let config: serde_json::Value =
            read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let mut tokens: HashMap<u32, String> = vocab.into_iter().map(|(t, i)| (i, t)).collect();
        if let Some(added) = config
            .get("added_tokens_decoder")
            .and_then(|a| a.as_object())
        {
            for (id, t) in added {
                if let (Ok(id), Some(content)) =
                    (id.parse::<u32>(), t.get("content").and_then(|c| c.as_str()))
                {
                    tokens.insert(id, content.to_string());
                }
            }
        }
        let flag = |name: &str| config.get(name).and_then(|v| v.as_bool());
        Ok(CtcTokenizer {
            tokens,
            pad: token_text(config.get("pad_token"), "<pad>"),
            unk: token_text(config.get("unk_token"), "<unk>"),
            delimiter: token_text(config.get("word_delimiter_token"), "|"),
            lower_case: flag("do_lower_case").unwrap_or(false),
            clean_up: flag("clean_up_tokenization_spaces").unwrap_or(false),
        })
    }

    /// Text and character offsets (frames) of a frame-by-frame token sequence
    /// (`Wav2Vec2CTCTokenizer._decode` with `output_char_offsets`).
    pub fn decode(&self, ids: &[u32]) -> (String, Vec<(String, usize, usize)>) {
        let mut chars: Vec<(String, usize, usize)> = Vec::new();
        let mut start = 0;
        while start < ids.len() {
            let mut end = start + 1;
            while end < ids.len() && ids[end] == ids[start] {
                end += 1;
            }
            let token = self.tokens.get(&ids[start]).unwrap_or(&self.unk);
            if *token != self.pad {
                let text = if *token == self.delimiter {
                    " ".to_string()
                } else {
                    token.clone()
                };
                chars.push((text, start, end));
            }
            start = end;
        }
        let joined: String = chars.iter().map(|(c, _, _)| c.as_str()).collect();
        let mut text = joined.trim().to_string();
        if self.lower_case {
            text = text.to_lowercase();
        }
        if self.clean_up {
            text = clean_up_tokenization(&text);
        }
        (text, chars)
    }
}

/// `PreTrainedTokenizerBase.clean_up_tokenization`.
fn clean_up_tokenization(s: &str) -> String {
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

/// Words and their frame offsets from character offsets (`_get_word_offsets`).
fn word_offsets(chars: &[(String, usize, usize)]) -> Vec<(String, usize, usize)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut start, mut end) = (0, 0);
    let mut in_word = false;
    for (c, s, e) in chars {
        let space = c == " ";
        // `in_word` is the previous state; a space continues a run of spaces, a character a word.
        if space != in_word {
            end = *e;
            word.push_str(c);
        } else if space {
            words.push((std::mem::take(&mut word), start, end));
        } else {
            (start, end) = (*s, *e);
            word = c.clone();
        }
        in_word = !space;
    }
    if in_word {
        words.push((word, start, end));
    }
    words
}

/// The CTC task resolved against its model.
#[derive(Debug)]
pub struct CtcTranscribe {
    tokenizer: CtcTokenizer,
    timestamps: Option<TimestampLevel>,
    chunking: Option<Chunking>,
    /// Seconds per output frame.
    frame_s: f64,
    vocab_size: Option<usize>,
    output: [String; 1],
}

impl CtcTranscribe {
    pub fn resolve(
        options: &TranscribeOptions,
        dir: &Path,
        audio: &AudioModel,
    ) -> Result<Self, OpError> {
        for (set, name) in [
            (options.language.is_some(), "language"),
            (options.task.is_some(), "task"),
            (
                options.generation != GenerationSettings::default(),
                "generation",
            ),
        ] {
            if set {
                return Err(OpError::Options(format!(
                    "`{name}` is an option of Whisper models; {} is a CTC model",
                    dir.display()
                )));
            }
        }
        if options.return_timestamps == Some(TimestampLevel::Segment) {
            return Err(OpError::Options(format!(
                "{} is a CTC model: its timestamps are `char` or `word` (`segment` is Whisper's)",
                dir.display()
            )));
        }
        let output = audio
            .outputs
            .iter()
            .find(|o| o.name == "logits")
            .or(audio.outputs.first())
            .ok_or_else(|| OpError::Model("the model has no outputs".into()))?;
        if output.shape.len() != 3 {
            return Err(OpError::Model(format!(
                "transcribe: the output '{}' has shape {:?}; a CTC model gives logits [batch, frames, vocabulary]",
                output.name, output.shape
            )));
        }
        let rate = audio.features.sampling_rate as f64;
        let align = audio.samples_per_frame();
        let chunking = Chunking::from_options(
            options.chunk_length_s,
            options.stride_length_s.as_ref(),
            audio.features.sampling_rate,
            align,
        )?;
        Ok(CtcTranscribe {
            tokenizer: CtcTokenizer::load(dir)?,
            timestamps: options.return_timestamps,
            chunking,
            frame_s: align as f64 / rate,
            vocab_size: (output.shape[2] > 0).then_some(output.shape[2] as usize),
            output: [output.name.clone()],
        })
    }
}

/// A transcript and its timestamped pieces (text, start s, end s; Whisper may leave a
/// segment's start or end unknown).
pub type Transcript = (String, Vec<Piece>);

/// A timestamped piece of a transcript: text, start and end in seconds.
pub type Piece = (String, Option<f64>, Option<f64>);

impl AudioTask for CtcTranscribe {
    /// Argmax token ids of the frames kept.
    type Raw = Vec<u32>;
    type Out = Transcript;

    fn output_type(&self) -> DataType {
        match self.timestamps {
            None => DataType::Utf8,
            Some(_) => DataType::Struct(transcript_fields()),
        }
    }

    fn outputs(&self) -> &[String] {
        &self.output
    }

    fn chunking(&self) -> Option<Chunking> {
        self.chunking
    }

    fn postprocess(
        &self,
        outputs: &[Output<'_>],
        clips: &[&Clip],
    ) -> Result<Vec<Vec<u32>>, String> {
        let logits = &outputs[0];
        let [b, frames, vocab] = logits.shape[..] else {
            return Err(format!("logits have shape {:?}", logits.shape));
        };
        let (frames, vocab) = (frames as usize, vocab as usize);
        if b as usize != clips.len() || self.vocab_size.is_some_and(|v| v != vocab) {
            return Err(format!("logits have shape {:?}", logits.shape));
        }
        clips
            .iter()
            .enumerate()
            .map(|(i, clip)| {
                if clip.frames > frames {
                    return Err(format!(
                        "the model gave {frames} frames for a clip that makes {}",
                        clip.frames
                    ));
                }
                let (from, to) = clip.keep;
                Ok((from..to)
                    .map(|f| {
                        let at = (i * frames + f) * vocab;
                        super::argmax(&logits.data[at..at + vocab]) as u32
                    })
                    .collect())
            })
            .collect()
    }

    fn finish(&self, raws: Vec<Vec<u32>>) -> Result<Transcript, String> {
        let ids = raws.concat();
        let (text, chars) = self.tokenizer.decode(&ids);
        let pieces = match self.timestamps {
            // `segment` is refused when the operator is resolved.
            None | Some(TimestampLevel::Segment) => Vec::new(),
            Some(TimestampLevel::Char) => chars,
            Some(TimestampLevel::Word) => word_offsets(&chars),
        };
        let seconds = pieces
            .into_iter()
            .map(|(t, s, e)| {
                (
                    t,
                    Some(s as f64 * self.frame_s),
                    Some(e as f64 * self.frame_s),
                )
            })
            .collect();
        Ok((text, seconds))
    }

    fn to_array(&self, rows: Vec<Option<Transcript>>) -> Result<ArrayRef> {
        transcripts_array(rows, self.timestamps.is_some())
    }
}

/// The fields of a timestamped transcript.
pub fn transcript_fields() -> Fields {
    Fields::from(vec![
        Field::new("text", DataType::Utf8, false),
        Field::new_list(
            "chunks",
            Field::new_list_field(DataType::Struct(chunk_fields()), true),
            false,
        ),
    ])
}

fn chunk_fields() -> Fields {
    Fields::from(vec![
        Field::new("text", DataType::Utf8, false),
        Field::new("start", DataType::Float64, true),
        Field::new("end", DataType::Float64, true),
    ])
}

/// The output column: texts, or texts with their timestamped pieces.
pub fn transcripts_array(rows: Vec<Option<Transcript>>, timestamps: bool) -> Result<ArrayRef> {
    if !timestamps {
        let mut b = StringBuilder::new();
        for r in rows {
            b.append_option(r.map(|(t, _)| t));
        }
        return Ok(Arc::new(b.finish()));
    }
    let texts: StringArray = rows
        .iter()
        .map(|r| r.as_ref().map(|(t, _)| t.as_str()))
        .collect();
    let pieces: Vec<Option<Vec<Piece>>> = rows.into_iter().map(|r| r.map(|(_, p)| p)).collect();
    let chunks = struct_column(
        chunk_fields(),
        &pieces,
        false,
        |item, (text, start, end)| {
            item.field_builder::<StringBuilder>(0)
                .expect("text")
                .append_value(text);
            item.field_builder::<Float64Builder>(1)
                .expect("start")
                .append_option(*start);
            item.field_builder::<Float64Builder>(2)
                .expect("end")
                .append_option(*end);
        },
    )?;
    let nulls = texts.nulls().cloned();
    Ok(Arc::new(StructArray::try_new(
        transcript_fields(),
        vec![Arc::new(texts), chunks],
        nulls,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> CtcTokenizer {
        let tokens = ["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B"]
            .iter()
            .enumerate()
            .map(|(i, t)| (i as u32, t.to_string()))
            .collect();
        CtcTokenizer {
            tokens,
            pad: "<pad>".into(),
            unk: "<unk>".into(),
            delimiter: "|".into(),
            lower_case: true,
            clean_up: false,
        }
    }

    #[test]
    fn repeats_collapse_before_blanks_are_dropped() {
        let t = tokenizer();
        // A A <pad> A | B B -> "aa b"; a frame id beyond the vocabulary is <unk>.
        let (text, chars) = t.decode(&[5, 5, 0, 5, 4, 6, 6, 99]);
        assert_eq!(text, "aa b<unk>");
        let spans: Vec<_> = chars.iter().map(|(c, s, e)| (c.as_str(), *s, *e)).collect();
        // Offsets keep the tokens' own case (the pipeline lowercases the text only).
        assert_eq!(
            spans,
            vec![
                ("A", 0, 2),
                ("A", 3, 4),
                (" ", 4, 5),
                ("B", 5, 7),
                ("<unk>", 7, 8)
            ]
        );
        let words = word_offsets(&chars);
        assert_eq!(
            words,
            vec![("AA".to_string(), 0, 4), ("B<unk>".to_string(), 5, 8)]
        );
    }
}
