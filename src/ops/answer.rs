//! `answer`: extractive question answering, as the `question-answering` pipeline does it.
//!
//! Two text arguments, question and context. Output: `Struct<answer: Utf8, score: Float64,
//! start: Int64, end: Int64>` (character offsets into the context), or with `top_k`,
//! `List<Struct<...>>` best first. Contexts longer than the window are covered by overlapping
//! windows (`doc_stride`), and answers found in several windows have their scores summed.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Float64Builder, Int64Builder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::{Encoding, PostProcessor, TruncationParams, TruncationStrategy};

use super::OpError;
use super::text::{Encoded, TensorView, TextInput, TextModel, TextTask, Truncating, struct_column};
use crate::runtime::ModelDir;

/// Options of an `answer` operator. Defaults are transformers'.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerOptions {
    /// Return the `top_k` best answers as a list instead of the best one as a struct.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Tokens shared by consecutive windows over a long context. Default: min(max_seq_len / 2, 128).
    #[serde(default)]
    pub doc_stride: Option<usize>,
    /// Longest answer, in tokens. Default 15.
    #[serde(default)]
    pub max_answer_len: Option<usize>,
    /// Window length (question, context and special tokens). Default: min(model limit, 384).
    #[serde(default)]
    pub max_seq_len: Option<usize>,
    /// Accepted for compatibility: transformers applies it only to slow tokenizers, and ferry
    /// (like transformers' fast path) never truncates the question.
    #[serde(default)]
    pub max_question_len: Option<usize>,
    /// Also consider "no answer" (empty answer at 0..0, scored by the [CLS] position).
    #[serde(default)]
    pub handle_impossible_answer: bool,
}

/// One window's candidates: (start char, end char, score), and its no-answer score.
#[derive(Debug)]
pub struct Candidates {
    spans: Vec<(usize, usize, f32)>,
    null: f32,
}

/// One answer.
#[derive(Debug, Clone)]
pub struct Answer {
    text: String,
    score: f64,
    start: usize,
    end: usize,
}

/// The task resolved against its model.
#[derive(Debug)]
pub struct AnswerTask {
    top_k: Option<usize>,
    max_seq_len: usize,
    doc_stride: usize,
    max_answer_len: usize,
    handle_impossible: bool,
    cls_id: Option<u32>,
    output: [String; 2],
    encoder: Truncating,
}

impl AnswerTask {
    pub fn resolve(
        options: &AnswerOptions,
        model: &ModelDir,
        text: &TextModel,
    ) -> Result<Self, OpError> {
        for name in ["start_logits", "end_logits"] {
            if !text.outputs.iter().any(|o| o.name == name) {
                return Err(OpError::Model(format!(
                    "{}: no '{name}' output; export the model with task question-answering",
                    model.onnx.display()
                )));
            }
        }
        let max_seq_len = options.max_seq_len.unwrap_or(384).min(text.max_length);
        let doc_stride = options.doc_stride.unwrap_or((max_seq_len / 2).min(128));
        if doc_stride >= max_seq_len {
            return Err(OpError::Options(format!(
                "doc_stride ({doc_stride}) must be smaller than max_seq_len ({max_seq_len})"
            )));
        }
        let max_answer_len = options.max_answer_len.unwrap_or(15);
        if max_answer_len == 0 {
            return Err(OpError::Options("max_answer_len must be at least 1".into()));
        }
        if options.top_k == Some(0) {
            return Err(OpError::Options("top_k must be at least 1".into()));
        }
        let encoder = Truncating::new(
            &text.tokenizer,
            TruncationParams {
                max_length: max_seq_len,
                stride: doc_stride,
                strategy: TruncationStrategy::OnlySecond,
                ..Default::default()
            },
        )?
        .with_char_offsets();
        let cls_id = ["[CLS]", "<s>", "<cls>"]
            .iter()
            .find_map(|t| text.tokenizer.token_to_id(t));
        Ok(AnswerTask {
            top_k: options.top_k,
            max_seq_len,
            doc_stride,
            max_answer_len,
            handle_impossible: options.handle_impossible_answer,
            cls_id,
            output: ["start_logits".to_string(), "end_logits".to_string()],
            encoder,
        })
    }

    fn fields() -> Fields {
        Fields::from(vec![
            Field::new("answer", DataType::Utf8, false),
            Field::new("score", DataType::Float64, false),
            Field::new("start", DataType::Int64, false),
            Field::new("end", DataType::Int64, false),
        ])
    }

    /// Softmax over the allowed positions; the rest are set to -10000 first, as transformers does.
    fn probabilities(logits: &[f32], allowed: &[bool]) -> Vec<f32> {
        let masked: Vec<f32> = logits
            .iter()
            .zip(allowed)
            .map(|(&x, &ok)| if ok { x } else { -10000.0 })
            .collect();
        let max = masked.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = masked.iter().map(|&x| (x - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    /// `select_starts_ends` + `decode_spans` + `get_indices` for one window.
    fn window(&self, w: &Encoding, start_logits: &[f32], end_logits: &[f32]) -> Candidates {
        let len = w.len();
        let ids = w.get_ids();
        let allowed: Vec<bool> = w
            .get_sequence_ids()
            .iter()
            .zip(ids)
            .map(|(seq, &id)| *seq == Some(1) || Some(id) == self.cls_id)
            .collect();
        let mut ps = Self::probabilities(&start_logits[..len], &allowed);
        let mut pe = Self::probabilities(&end_logits[..len], &allowed);
        let null = ps[0] * pe[0];
        ps[0] = 0.0;
        pe[0] = 0.0;
        // transformers ranks every cell of the len x len score matrix and keeps the best
        // `top_k * 2 + 10`; cells outside the band i <= j < i + max_answer_len score 0. Rank the
        // band, then fill up with zero cells in index order (numpy leaves their order unspecified).
        let wanted = self.top_k.unwrap_or(1) * 2 + 10;
        let mut cells: Vec<(usize, f32)> = Vec::with_capacity(len * self.max_answer_len);
        for (i, &p_start) in ps.iter().enumerate() {
            for (j, &p_end) in pe.iter().enumerate().skip(i).take(self.max_answer_len) {
                cells.push((i * len + j, p_start * p_end));
            }
        }
        let rank = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if cells.len() > wanted {
            cells.select_nth_unstable_by(wanted, rank);
            cells.truncate(wanted);
        }
        cells.sort_by(rank);
        if cells.len() < wanted {
            let taken: std::collections::HashSet<usize> = cells.iter().map(|c| c.0).collect();
            let zeros = (0..len * len)
                .filter(|f| !taken.contains(f))
                .take(wanted - cells.len());
            cells.extend(zeros.map(|f| (f, 0.0)).collect::<Vec<_>>());
        }
        let offsets = w.get_offsets();
        let spans = cells
            .into_iter()
            .filter(|&(flat, _)| allowed[flat / len] && allowed[flat % len])
            .map(|(flat, score)| {
                let (s, e) = (flat / len, flat % len);
                let word_span = |t: usize| {
                    w.token_to_word(t)
                        .and_then(|(_, word)| w.word_to_chars(word, 1))
                };
                let (start, end) = match (word_span(s), word_span(e)) {
                    (Some(a), Some(b)) => (a.0, b.1),
                    _ => (offsets[s].0, offsets[e].1),
                };
                (start, end, score)
            })
            .collect();
        Candidates { spans, null }
    }
}

impl TextTask for AnswerTask {
    type Window = Candidates;
    type Row = Vec<Answer>;

    fn output_type(&self) -> DataType {
        let item = DataType::Struct(Self::fields());
        match self.top_k {
            Some(_) => DataType::List(Arc::new(Field::new("item", item, true))),
            None => item,
        }
    }

    fn outputs(&self) -> &[String] {
        &self.output
    }

    fn encode(&self, input: &TextInput) -> Result<Vec<Encoding>, String> {
        let TextInput::Pair(question, context) = input else {
            return Err("answer takes a question and a context".into());
        };
        if question.trim().is_empty() {
            return Err("the question is empty".into());
        }
        if context.trim().is_empty() {
            return Err("the context is empty".into());
        }
        // The tokenizer panics when the question leaves no more than doc_stride tokens of the
        // window for the context (transformers fails the same way): say so instead.
        let tokenizer = self.encoder.tokenizer();
        let question_tokens = tokenizer
            .encode(question.as_str(), false)
            .map_err(|e| e.to_string())?
            .len();
        let specials = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        let room = self.max_seq_len.saturating_sub(question_tokens + specials);
        if room <= self.doc_stride {
            // Only a pair that does not fit in one window needs the stride.
            let context_tokens = tokenizer
                .encode(context.as_str(), false)
                .map_err(|e| e.to_string())?
                .len();
            if question_tokens + context_tokens + specials > self.max_seq_len {
                return Err(format!(
                    "the question takes {question_tokens} tokens, leaving {room} of the {}-token window for the \
                     context, which must be more than doc_stride ({}) to split a long context; shorten the \
                     question, raise max_seq_len or lower doc_stride",
                    self.max_seq_len, self.doc_stride
                ));
            }
        }
        self.encoder.encode(input, true)
    }

    fn postprocess(
        &self,
        outputs: &[TensorView<'_>],
        enc: &Encoded,
        windows: &[&Encoding],
    ) -> Result<Vec<Candidates>, String> {
        let (starts, ends) = (&outputs[0], &outputs[1]);
        starts.expect_shape(&[enc.rows, enc.len])?;
        ends.expect_shape(&[enc.rows, enc.len])?;
        Ok(windows
            .iter()
            .enumerate()
            .map(|(r, w)| {
                let row = r * enc.len..(r + 1) * enc.len;
                self.window(w, &starts.data[row.clone()], &ends.data[row])
            })
            .collect())
    }

    fn finish(&self, input: &TextInput, windows: Vec<Candidates>) -> Result<Vec<Answer>, String> {
        let TextInput::Pair(_, context) = input else {
            return Err("answer takes a question and a context".into());
        };
        let chars: Vec<char> = context.chars().collect();
        let mut answers: Vec<Answer> = Vec::new();
        let mut min_null = 1_000_000f64;
        for w in windows {
            min_null = min_null.min(w.null as f64);
            for (start, end, score) in w.spans {
                let text: String = if end > start {
                    chars[start.min(chars.len())..end.min(chars.len())]
                        .iter()
                        .collect()
                } else {
                    String::new()
                };
                let lower = text.to_lowercase();
                match answers.iter_mut().find(|a| a.text.to_lowercase() == lower) {
                    Some(a) => a.score += score as f64,
                    None => answers.push(Answer {
                        text,
                        score: score as f64,
                        start,
                        end,
                    }),
                }
            }
        }
        if self.handle_impossible {
            answers.push(Answer {
                text: String::new(),
                score: min_null,
                start: 0,
                end: 0,
            });
        }
        answers.sort_by(|a, b| b.score.total_cmp(&a.score));
        answers.truncate(self.top_k.unwrap_or(1));
        Ok(answers)
    }

    fn to_array(&self, rows: Vec<Option<Vec<Answer>>>) -> Result<ArrayRef> {
        struct_column(Self::fields(), &rows, self.top_k.is_none(), |b, a| {
            b.field_builder::<StringBuilder>(0)
                .expect("answer")
                .append_value(&a.text);
            b.field_builder::<Float64Builder>(1)
                .expect("score")
                .append_value(a.score);
            b.field_builder::<Int64Builder>(2)
                .expect("start")
                .append_value(a.start as i64);
            b.field_builder::<Int64Builder>(3)
                .expect("end")
                .append_value(a.end as i64);
        })
    }
}
