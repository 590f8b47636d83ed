//! `tag_tokens`: token classification (NER), as the `token-classification` pipeline does it.
//!
//! Output: `List<Struct<entity | entity_group: Utf8, score: Float32, word: Utf8, start: Int64,
//! end: Int64>>`, with `start`/`end` character offsets into the original text (`entity` with
//! aggregation `none`, `entity_group` otherwise).

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Float32Builder, Int64Builder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::models::ModelWrapper;
use tokenizers::{Decoder, Encoding, Tokenizer, TruncationParams};

use super::OpError;
use super::text::{Encoded, TensorView, TextInput, TextModel, TextTask, Truncating, struct_column};
use crate::runtime::ModelDir;

/// Options of a `tag_tokens` operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TagTokensOptions {
    /// How tokens become entities: `none` (one per token), `simple` (adjacent tokens of one
    /// entity grouped), `first`, `average` or `max` (words scored by their first token, the mean
    /// of their tokens, or their best token, then grouped). Default `none`, as transformers.
    #[serde(default)]
    pub aggregation_strategy: Option<Aggregation>,
    /// Labels dropped from the output (after grouping). Default `["O"]`.
    #[serde(default)]
    pub ignore_labels: Option<Vec<String>>,
    /// Cover texts longer than the model's window with overlapping windows that share this many
    /// tokens, merging entities across them. Without it, long texts are truncated (as
    /// transformers does). Needs an aggregation strategy other than `none`.
    #[serde(default)]
    pub stride: Option<usize>,
    /// Window length in tokens (at most the model's own limit).
    #[serde(default)]
    pub max_length: Option<usize>,
}

/// Aggregation strategies (transformers' `AggregationStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    None,
    Simple,
    First,
    Average,
    Max,
}

/// One token of one window, before aggregation.
#[derive(Debug, Clone)]
pub struct Token {
    id: u32,
    token: String,
    start: usize,
    end: usize,
    scores: Vec<f32>,
}

/// An entity (a token, a word or a group of them).
#[derive(Debug, Clone)]
pub struct Entity {
    label: String,
    score: f32,
    word: String,
    start: usize,
    end: usize,
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct TagTokens {
    labels: Vec<String>,
    strategy: Aggregation,
    ignore: Vec<String>,
    stride: bool,
    output: [String; 1],
    encoder: Truncating,
    /// WordPiece-style tokenizers mark word continuations (`##`); others need the
    /// space heuristic.
    has_subword_prefix: bool,
    unk_id: Option<u32>,
}

impl TagTokens {
    pub fn resolve(
        options: &TagTokensOptions,
        model: &ModelDir,
        text: &TextModel,
    ) -> Result<Self, OpError> {
        let info = text
            .outputs
            .iter()
            .find(|o| o.name == "logits")
            .ok_or_else(|| {
                OpError::Model(format!(
                    "{}: no 'logits' output; export the model with task token-classification",
                    model.onnx.display()
                ))
            })?;
        let labels = model.config.labels();
        if labels.is_empty() {
            return Err(OpError::Model(format!(
                "{}: config.json has no id2label",
                model.dir.display()
            )));
        }
        if let Some(&w) = info.shape.last()
            && w > 0
            && w as usize != labels.len()
        {
            return Err(OpError::Model(format!(
                "{}: config.json names {} labels but the model outputs {w} logits per token",
                model.dir.display(),
                labels.len()
            )));
        }
        let strategy = options.aggregation_strategy.unwrap_or(Aggregation::None);
        if options.stride.is_some() && strategy == Aggregation::None {
            return Err(OpError::Options(
                "stride needs an aggregation_strategy other than none (as in transformers)".into(),
            ));
        }
        let max_length = options
            .max_length
            .map_or(text.max_length, |m| m.min(text.max_length));
        let stride = options.stride.unwrap_or(0);
        if options.stride.is_some() && stride >= max_length.saturating_sub(2) {
            return Err(OpError::Options(format!(
                "stride {stride} must be smaller than the window ({max_length} tokens less the special tokens)"
            )));
        }
        let encoder = Truncating::new(
            &text.tokenizer,
            TruncationParams {
                max_length,
                stride,
                ..Default::default()
            },
        )?
        .with_char_offsets();
        let has_subword_prefix = match text.tokenizer.get_model() {
            ModelWrapper::WordPiece(wp) => !wp.continuing_subword_prefix.is_empty(),
            ModelWrapper::BPE(bpe) => bpe
                .continuing_subword_prefix
                .as_deref()
                .is_some_and(|p| !p.is_empty()),
            _ => false,
        };
        let unk_id = match text.tokenizer.get_model() {
            ModelWrapper::WordPiece(wp) => text.tokenizer.token_to_id(&wp.unk_token),
            _ => ["[UNK]", "<unk>"]
                .iter()
                .find_map(|t| text.tokenizer.token_to_id(t)),
        };
        Ok(TagTokens {
            labels,
            strategy,
            ignore: options
                .ignore_labels
                .clone()
                .unwrap_or_else(|| vec!["O".to_string()]),
            stride: options.stride.is_some(),
            output: ["logits".to_string()],
            encoder,
            has_subword_prefix,
            unk_id,
        })
    }

    fn tokenizer(&self) -> &Tokenizer {
        self.encoder.tokenizer()
    }

    /// `convert_tokens_to_string`: the tokenizer's decoder over raw tokens.
    fn tokens_to_string(&self, tokens: Vec<String>) -> String {
        match self.tokenizer().get_decoder() {
            Some(d) => d
                .decode(tokens.clone())
                .unwrap_or_else(|_| tokens.join(" ")),
            None => tokens.join(" "),
        }
    }

    /// One window's entities, after aggregation and filtering.
    fn window_entities(&self, chars: &[char], tokens: &[Token]) -> Vec<Entity> {
        let slice = |s: usize, e: usize| -> String {
            chars[s.min(chars.len())..e.min(chars.len())]
                .iter()
                .collect()
        };
        // gather_pre_entities: (word, is_subword) per token.
        let pre: Vec<(String, bool, &Token)> = tokens
            .iter()
            .map(|t| {
                let word_ref = slice(t.start, t.end);
                let mut word = t.token.clone();
                let mut is_subword = if self.has_subword_prefix {
                    word.chars().count() != word_ref.chars().count()
                } else {
                    t.start > 0 && !slice(t.start - 1, t.start + 1).contains(' ')
                };
                if Some(t.id) == self.unk_id {
                    word = word_ref;
                    is_subword = false;
                }
                (word, is_subword, t)
            })
            .collect();
        let entities: Vec<Entity> = match self.strategy {
            Aggregation::None | Aggregation::Simple => pre
                .iter()
                .map(|(word, _, t)| {
                    let i = super::argmax(&t.scores);
                    Entity {
                        label: self.labels[i].clone(),
                        score: t.scores[i],
                        word: word.clone(),
                        start: t.start,
                        end: t.end,
                    }
                })
                .collect(),
            _ => {
                let mut words: Vec<Vec<&(String, bool, &Token)>> = Vec::new();
                for p in &pre {
                    match words.last_mut() {
                        Some(group) if p.1 => group.push(p),
                        _ => words.push(vec![p]),
                    }
                }
                words.iter().map(|w| self.aggregate_word(w)).collect()
            }
        };
        let entities = if self.strategy == Aggregation::None {
            entities
        } else {
            self.group(entities)
        };
        entities
            .into_iter()
            .filter(|e| !self.ignore.contains(&e.label))
            .collect()
    }

    fn aggregate_word(&self, tokens: &[&(String, bool, &Token)]) -> Entity {
        let word = self.tokens_to_string(tokens.iter().map(|t| t.0.clone()).collect());
        let (label, score) = match self.strategy {
            Aggregation::First => {
                let s = &tokens[0].2.scores;
                let i = super::argmax(s);
                (i, s[i])
            }
            Aggregation::Max => {
                let mut best = &tokens[0].2.scores;
                let max_of = |s: &Vec<f32>| s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for t in &tokens[1..] {
                    if max_of(&t.2.scores) > max_of(best) {
                        best = &t.2.scores;
                    }
                }
                let i = super::argmax(best);
                (i, best[i])
            }
            _ => {
                let n = tokens[0].2.scores.len();
                let mean: Vec<f32> = (0..n)
                    .map(|k| {
                        tokens.iter().map(|t| t.2.scores[k]).sum::<f32>() / tokens.len() as f32
                    })
                    .collect();
                let i = super::argmax(&mean);
                (i, mean[i])
            }
        };
        Entity {
            label: self.labels[label].clone(),
            score,
            word,
            start: tokens[0].2.start,
            end: tokens[tokens.len() - 1].2.end,
        }
    }

    /// `group_entities`: adjacent entities of one type join unless the next one begins (`B-`).
    fn group(&self, entities: Vec<Entity>) -> Vec<Entity> {
        fn tag(label: &str) -> (&str, &str) {
            if let Some(t) = label.strip_prefix("B-") {
                ("B", t)
            } else if let Some(t) = label.strip_prefix("I-") {
                ("I", t)
            } else {
                ("I", label)
            }
        }
        let mut groups: Vec<Vec<Entity>> = Vec::new();
        for e in entities {
            match groups.last_mut() {
                Some(g) => {
                    let (bi, t) = tag(&e.label);
                    let (_, last_t) = tag(&g[g.len() - 1].label);
                    if t == last_t && bi != "B" {
                        g.push(e);
                    } else {
                        groups.push(vec![e]);
                    }
                }
                None => groups.push(vec![e]),
            }
        }
        groups
            .into_iter()
            .map(|g| {
                let label = match g[0].label.split_once('-') {
                    Some((_, rest)) => rest.to_string(),
                    None => g[0].label.clone(),
                };
                let score = g.iter().map(|e| e.score).sum::<f32>() / g.len() as f32;
                let word = self.tokens_to_string(g.iter().map(|e| e.word.clone()).collect());
                Entity {
                    label,
                    score,
                    word,
                    start: g[0].start,
                    end: g[g.len() - 1].end,
                }
            })
            .collect()
    }

    fn fields(&self) -> Fields {
        let label = if self.strategy == Aggregation::None {
            "entity"
        } else {
            "entity_group"
        };
        Fields::from(vec![
            Field::new(label, DataType::Utf8, false),
            Field::new("score", DataType::Float32, false),
            Field::new("word", DataType::Utf8, false),
            Field::new("start", DataType::Int64, false),
            Field::new("end", DataType::Int64, false),
        ])
    }
}

/// `aggregate_overlapping_entities`: of entities starting inside the previous one, keep the
/// longer (or, equally long, the higher scoring).
fn merge_overlapping(mut entities: Vec<Entity>) -> Vec<Entity> {
    if entities.is_empty() {
        return entities;
    }
    entities.sort_by_key(|e| e.start);
    let mut out = Vec::new();
    let mut iter = entities.into_iter();
    let mut prev = iter.next().expect("not empty");
    for e in iter {
        if prev.start <= e.start && e.start < prev.end {
            let (len, prev_len) = (e.end - e.start, prev.end - prev.start);
            if len > prev_len || (len == prev_len && e.score > prev.score) {
                prev = e;
            }
        } else {
            out.push(std::mem::replace(&mut prev, e));
        }
    }
    out.push(prev);
    out
}

impl TextTask for TagTokens {
    type Window = Vec<Token>;
    type Row = Vec<Entity>;

    fn output_type(&self) -> DataType {
        DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(self.fields()),
            true,
        )))
    }

    fn outputs(&self) -> &[String] {
        &self.output
    }

    fn encode(&self, input: &TextInput) -> Result<Vec<Encoding>, String> {
        self.encoder.encode(input, self.stride)
    }

    fn postprocess(
        &self,
        outputs: &[TensorView<'_>],
        enc: &Encoded,
        windows: &[&Encoding],
    ) -> Result<Vec<Vec<Token>>, String> {
        let logits = &outputs[0];
        let n = self.labels.len();
        logits.expect_shape(&[enc.rows, enc.len, n])?;
        Ok(windows
            .iter()
            .enumerate()
            .map(|(r, w)| {
                let special = w.get_special_tokens_mask();
                (0..w.len())
                    .filter(|&i| special[i] == 0)
                    .map(|i| {
                        let at = (r * enc.len + i) * n;
                        let row = &logits.data[at..at + n];
                        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
                        let sum: f32 = exps.iter().sum();
                        let (start, end) = w.get_offsets()[i];
                        Token {
                            id: w.get_ids()[i],
                            token: w.get_tokens()[i].clone(),
                            start,
                            end,
                            scores: exps.iter().map(|e| e / sum).collect(),
                        }
                    })
                    .collect()
            })
            .collect())
    }

    fn finish(&self, input: &TextInput, windows: Vec<Vec<Token>>) -> Result<Vec<Entity>, String> {
        let TextInput::One(text) = input else {
            return Err("tag_tokens takes one text".into());
        };
        let chars: Vec<char> = text.chars().collect();
        let several = windows.len() > 1;
        let entities: Vec<Entity> = windows
            .iter()
            .flat_map(|w| self.window_entities(&chars, w))
            .collect();
        Ok(if several {
            merge_overlapping(entities)
        } else {
            entities
        })
    }

    fn to_array(&self, rows: Vec<Option<Vec<Entity>>>) -> Result<ArrayRef> {
        struct_column(self.fields(), &rows, false, |b, e| {
            b.field_builder::<StringBuilder>(0)
                .expect("label")
                .append_value(&e.label);
            b.field_builder::<Float32Builder>(1)
                .expect("score")
                .append_value(e.score);
            b.field_builder::<StringBuilder>(2)
                .expect("word")
                .append_value(&e.word);
            b.field_builder::<Int64Builder>(3)
                .expect("start")
                .append_value(e.start as i64);
            b.field_builder::<Int64Builder>(4)
                .expect("end")
                .append_value(e.end as i64);
        })
    }
}
