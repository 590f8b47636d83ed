//! Text input for every text task: reading string columns, tokenization, and padding token
//! windows into model inputs.
//!
//! A text task kind supplies only what differs ([`TextTask`]): how an input becomes model windows
//! (truncated, paired, or overlapping), how a padded call's outputs become per-window results,
//! how a row's windows combine, and how rows become an Arrow array. [`TextOp`] makes it a core
//! [`Task`]: batching, the pool, progress and row failures are the core's.

use datafusion::arrow::array::{ArrayRef, AsArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err};
use ort::value::TensorElementType;
use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationParams};

use super::OpError;
use super::core::{ArgColumn, MODEL, RowErrors, Task};
use crate::runtime::ModelDir;
use crate::runtime::pool::{Fetched, SessionInfo, TensorInfo, Worker};
use crate::runtime::tensor::{Data, Input, Output, read_named};

pub use super::core::struct_column;

/// A model output of one call, read as f32.
pub type TensorView<'a> = Output<'a>;

/// A model input ferry knows how to fill from a tokenizer's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

/// A tokenizer and the model's text inputs, resolved at plan time.
pub struct TextModel {
    /// The model's tokenizer without truncation or padding; tasks configure their own copy.
    pub tokenizer: Tokenizer,
    /// The longest input the model takes.
    pub max_length: usize,
    /// The model's outputs (tasks pick theirs at plan time).
    pub outputs: Vec<TensorInfo>,
    pad_id: u32,
    feeds: Vec<(String, Feed)>,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("max_length", &self.max_length)
            .field("feeds", &self.feeds)
            .finish()
    }
}

/// A padded call of encoded windows, row-major `[rows, len]`.
#[derive(Debug, Default)]
pub struct Encoded {
    pub rows: usize,
    pub len: usize,
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub types: Vec<i64>,
}

impl TextModel {
    /// Loads the tokenizer and checks that every input of the session is one a text model takes.
    pub fn open(
        task: &'static str,
        model: &ModelDir,
        session: &SessionInfo,
    ) -> Result<Self, OpError> {
        let tokenizer = model.tokenizer(task)?;
        let max_length = model.max_length()?;
        let pad_id = model.pad_id(&tokenizer)?;
        let mut feeds = Vec::new();
        for input in &session.inputs {
            let feed = match input.name.as_str() {
                "input_ids" => Feed::InputIds,
                "attention_mask" => Feed::AttentionMask,
                "token_type_ids" => Feed::TokenTypeIds,
                other => {
                    return Err(OpError::Model(format!(
                        "{}: the model expects an input '{other}' that the {task} task cannot provide \
                         (a {task} model takes input_ids, attention_mask and token_type_ids); \
                         is this the right model for the task?",
                        session.path.display()
                    )));
                }
            };
            if !matches!(
                input.element,
                Some(TensorElementType::Int64 | TensorElementType::Int32)
            ) {
                return Err(OpError::Model(format!(
                    "{}: input '{}' has element type {:?}; expected int64 or int32",
                    session.path.display(),
                    input.name,
                    input.element
                )));
            }
            feeds.push((input.name.clone(), feed));
        }
        if !feeds.iter().any(|(_, f)| *f == Feed::InputIds) {
            return Err(OpError::Model(format!(
                "{}: the model has no 'input_ids' input (it has {}); the {task} task needs a text model",
                session.path.display(),
                session.input_names()
            )));
        }
        Ok(TextModel {
            tokenizer,
            max_length,
            outputs: session.outputs.clone(),
            pad_id,
            feeds,
        })
    }

    /// An encoder truncating to `max_length` tokens (at most the model's own limit).
    pub fn truncating(&self, max_length: Option<usize>) -> Result<Truncating, OpError> {
        let max_length = max_length.map_or(self.max_length, |m| m.min(self.max_length));
        Truncating::new(
            &self.tokenizer,
            TruncationParams {
                max_length,
                ..Default::default()
            },
        )
    }

    /// Pads `encodings` into one call.
    pub fn pad(&self, encodings: &[&Encoding]) -> Encoded {
        let rows = encodings.len();
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut out = Encoded {
            rows,
            len,
            ids: vec![self.pad_id as i64; rows * len],
            mask: vec![0; rows * len],
            types: vec![0; rows * len],
        };
        for (r, e) in encodings.iter().enumerate() {
            let base = r * len;
            for (i, ((&id, &m), &t)) in e
                .get_ids()
                .iter()
                .zip(e.get_attention_mask())
                .zip(e.get_type_ids())
                .enumerate()
            {
                out.ids[base + i] = id as i64;
                out.mask[base + i] = m as i64;
                out.types[base + i] = t as i64;
            }
        }
        out
    }

    /// The session inputs for a padded call, by name (converted to the model's integer type
    /// when they are sent).
    pub fn inputs(&self, enc: &Encoded) -> Vec<Input> {
        let shape = vec![enc.rows as i64, enc.len as i64];
        self.feeds
            .iter()
            .map(|(name, feed)| {
                let data = match feed {
                    Feed::InputIds => &enc.ids,
                    Feed::AttentionMask => &enc.mask,
                    Feed::TokenTypeIds => &enc.types,
                };
                Input::new(name.clone(), shape.clone(), Data::I64(data.clone()))
            })
            .collect()
    }
}

/// One row's text: a single text, or a pair (sentence pairs; question and context).
#[derive(Debug, Clone)]
pub enum TextInput {
    One(String),
    Pair(String, String),
}

impl std::fmt::Debug for Truncating {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Truncating")
            .field("truncation", &self.tokenizer.get_truncation())
            .finish()
    }
}

/// Encodes with the tokenizer's own char offsets (as Python's `tokenizers` reports them),
/// truncating to `max_length` tokens (longest-first for pairs, as `truncation=True` does).
#[derive(Clone)]
pub struct Truncating {
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation, for encodings whose overflow is dropped.
    plain: Tokenizer,
    /// `plain` without post-processing or padding: each text's raw encoding, as the
    /// tokenizer's own pair path makes it before truncating.
    parts: Tokenizer,
    params: TruncationParams,
    /// Character offsets (Python's) cost a pass over each text; only tasks that report spans
    /// need them.
    char_offsets: bool,
}

impl Truncating {
    pub fn new(tokenizer: &Tokenizer, params: TruncationParams) -> Result<Self, OpError> {
        let mut plain = tokenizer.clone();
        plain
            .with_truncation(None)
            .map_err(|e| OpError::Model(format!("tokenizer truncation: {e}")))?;
        let mut parts = plain.clone();
        parts
            .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
            .with_padding(None);
        let mut tokenizer = tokenizer.clone();
        tokenizer
            .with_truncation(Some(params.clone()))
            .map_err(|e| OpError::Model(format!("tokenizer truncation: {e}")))?;
        Ok(Truncating {
            tokenizer,
            plain,
            parts,
            params,
            char_offsets: false,
        })
    }

    /// Report offsets in characters, as transformers does, instead of bytes.
    pub fn with_char_offsets(mut self) -> Self {
        self.char_offsets = true;
        self
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The encoding of `input`, plus its overflowing windows when `keep_overflow`.
    pub fn encode(&self, input: &TextInput, keep_overflow: bool) -> Result<Vec<Encoding>, String> {
        if !keep_overflow {
            return self.encode_truncated(input).map(|e| vec![e]);
        }
        let input: tokenizers::EncodeInput = match input {
            TextInput::One(t) => t.as_str().into(),
            TextInput::Pair(a, b) => (a.as_str(), b.as_str()).into(),
        };
        let mut encoding = if self.char_offsets {
            self.tokenizer.encode_char_offsets(input, true)
        } else {
            self.tokenizer.encode(input, true)
        }
        .map_err(|e| e.to_string())?;
        let overflow = encoding.take_overflowing();
        let mut out = vec![encoding];
        out.extend(overflow);
        Ok(out)
    }

    /// What `encode(input, true)` returns first, without the overflowing windows.
    ///
    /// The tokenizer's own path builds every overflowing window and, for pairs, merges every
    /// window of the first text with every window of the second before the caller drops them
    /// all: most of the cost of encoding long pairs. Here each text is encoded alone (as
    /// `encode` does, the second with type id 1), truncated by the same rule, its overflow
    /// dropped, and only then post-processed.
    fn encode_truncated(&self, input: &TextInput) -> Result<Encoding, String> {
        let part = |text: &str, type_id: u32| -> Result<Encoding, String> {
            let mut e = if self.char_offsets {
                self.parts.encode_char_offsets(text, false)
            } else {
                self.parts.encode(text, false)
            }
            .map_err(|e| e.to_string())?;
            if type_id != 0 {
                e.set_type_ids(vec![type_id; e.len()]);
            }
            Ok(e)
        };
        let (first, second) = match input {
            TextInput::One(t) => (part(t, 0)?, None),
            TextInput::Pair(a, b) => (part(a, 0)?, Some(part(b, 1)?)),
        };
        let added = self
            .plain
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(second.is_some()));
        let params = TruncationParams {
            max_length: self.params.max_length.saturating_sub(added),
            ..self.params.clone()
        };
        let (mut first, mut second) =
            tokenizers::utils::truncation::truncate_encodings(first, second, &params)
                .map_err(|e| e.to_string())?;
        first.take_overflowing();
        if let Some(second) = second.as_mut() {
            second.take_overflowing();
        }
        self.plain
            .post_process(first, second, true)
            .map_err(|e| e.to_string())
    }
}

/// [`TextTask::finish`] for tasks whose rows are their one window.
pub fn only_window<W>(mut windows: Vec<W>) -> Result<W, String> {
    match (windows.pop(), windows.is_empty()) {
        (Some(w), true) => Ok(w),
        _ => Err("expected exactly one window per row".to_string()),
    }
}

/// What a text task kind supplies.
pub trait TextTask: Send + Sync + 'static {
    /// What one window's model outputs become.
    type Window: Send + 'static;
    /// What one row's windows become.
    type Row: Send + 'static;
    /// The Arrow type of the operator's output column.
    fn output_type(&self) -> DataType;
    /// The model outputs (read as f32, by name) that [`TextTask::postprocess`] reads, in order.
    fn outputs(&self) -> &[String];
    /// The windows to run for one input (at least one).
    fn encode(&self, input: &TextInput) -> Result<Vec<Encoding>, String>;
    /// Turns one padded call's outputs into one result per window of the call.
    fn postprocess(
        &self,
        outputs: &[TensorView<'_>],
        encoded: &Encoded,
        windows: &[&Encoding],
    ) -> Result<Vec<Self::Window>, String>;
    /// Runs one padded call: the outputs [`TextTask::outputs`] names. By default the model's
    /// session, returning only those outputs.
    fn run(
        &self,
        worker: &mut Worker,
        text: &TextModel,
        encoded: &Encoded,
    ) -> Result<Fetched, String> {
        worker.run_selected(MODEL, text.inputs(encoded), self.outputs())
    }
    /// Combines one row's window results, in window order.
    fn finish(&self, input: &TextInput, windows: Vec<Self::Window>) -> Result<Self::Row, String>;
    /// Builds the output column; None rows are nulls.
    fn to_array(&self, rows: Vec<Option<Self::Row>>) -> Result<ArrayRef>;
}

/// A text task as a core task: rows are texts (or pairs), items are token windows, and an
/// item's cost is its length in tokens.
pub struct TextOp<T: TextTask> {
    pub model: TextModel,
    pub task: T,
}

impl<T: TextTask> Task for TextOp<T> {
    type Input = TextInput;
    type Item = Encoding;
    type Out = T::Window;
    type Row = T::Row;

    fn output_type(&self) -> DataType {
        self.task.output_type()
    }

    fn read(&self, args: &[ArgColumn<'_>], errors: &RowErrors) -> Result<Vec<Option<TextInput>>> {
        let mut columns = Vec::with_capacity(args.len());
        for arg in args {
            columns.push(read_texts(arg.field, arg.array, errors)?);
        }
        let mut columns = columns.into_iter();
        let first = columns.next().unwrap_or_default();
        Ok(match columns.next() {
            None => first.into_iter().map(|t| t.map(TextInput::One)).collect(),
            Some(second) => first
                .into_iter()
                .zip(second)
                .map(|(a, b)| Some(TextInput::Pair(a?, b?)))
                .collect(),
        })
    }

    fn prepare(&self, input: &TextInput) -> Result<Vec<Encoding>, String> {
        self.task.encode(input)
    }

    fn cost(&self, item: &Encoding) -> usize {
        item.len()
    }

    fn feed(&self, items: &[&Encoding]) -> Result<Vec<Input>, String> {
        Ok(self.model.inputs(&self.model.pad(items)))
    }

    fn run(&self, worker: &mut Worker, items: &[&Encoding]) -> Result<Vec<T::Window>, String> {
        let encoded = self.model.pad(items);
        let outputs = self.task.run(worker, &self.model, &encoded)?;
        let views = read_named(&outputs, self.task.outputs())?;
        self.task.postprocess(&views, &encoded, items)
    }

    fn finish(&self, input: &TextInput, windows: Vec<T::Window>) -> Result<T::Row, String> {
        self.task.finish(input, windows)
    }

    fn to_array(&self, rows: Vec<Option<T::Row>>) -> Result<ArrayRef> {
        self.task.to_array(rows)
    }
}

/// Reads a text column into owned strings. Binary values that are not UTF-8 become None and are
/// reported in `errors` with the field.
pub fn read_texts(
    field: &str,
    array: &ArrayRef,
    errors: &RowErrors,
) -> Result<Vec<Option<String>>> {
    fn owned<'a>(it: impl Iterator<Item = Option<&'a str>>) -> Vec<Option<String>> {
        it.map(|v| v.map(str::to_string)).collect()
    }
    let bytes = |it: &mut dyn Iterator<Item = Option<&[u8]>>| -> Vec<Option<String>> {
        it.enumerate()
            .map(|(row, v)| {
                let v = v?;
                match std::str::from_utf8(v) {
                    Ok(s) => Some(s.to_string()),
                    Err(e) => {
                        errors.push(row, format!("field '{field}' is not valid UTF-8: {e}"));
                        None
                    }
                }
            })
            .collect()
    };
    Ok(match array.data_type() {
        DataType::Utf8 => owned(array.as_string::<i32>().iter()),
        DataType::LargeUtf8 => owned(array.as_string::<i64>().iter()),
        DataType::Utf8View => owned(array.as_string_view().iter()),
        DataType::Binary => bytes(&mut array.as_binary::<i32>().iter()),
        DataType::LargeBinary => bytes(&mut array.as_binary::<i64>().iter()),
        DataType::BinaryView => bytes(&mut array.as_binary_view().iter()),
        DataType::Null => vec![None; array.len()],
        other => return exec_err!("cannot read text from a {other} column '{field}'"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The overflow-free path gives exactly the first window of the tokenizer's own path, for
    /// every post-processor kind in the fixtures (BERT template, RoBERTa, T5 template, byte-level)
    /// and texts short, long and in pairs of every length order.
    #[test]
    fn truncating_without_overflow_matches_the_tokenizers_first_window() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        let long = "Der Zug fährt um 8:15 ab; don't miss it — ça va? ".repeat(12);
        let short = "A short one.".to_string();
        let texts = [
            TextInput::One(String::new()),
            TextInput::One(short.clone()),
            TextInput::One(long.clone()),
            TextInput::Pair(short.clone(), long.clone()),
            TextInput::Pair(long.clone(), short.clone()),
            TextInput::Pair(long.clone(), long[7..].to_string()),
            TextInput::Pair(String::new(), short.clone()),
        ];
        for model in [
            "tiny-bert-sentiment",
            "tiny-bart-gen",
            "tiny-t5-gen",
            "tiny-gpt2-gen",
        ] {
            let tokenizer = Tokenizer::from_file(root.join(model).join("tokenizer.json")).unwrap();
            for max_length in [3, 16, 40] {
                let params = TruncationParams {
                    max_length,
                    ..Default::default()
                };
                for chars in [false, true] {
                    let mut t = Truncating::new(&tokenizer, params.clone()).unwrap();
                    t.char_offsets = chars;
                    for input in &texts {
                        let what = format!("{model} max_length {max_length} {input:?}");
                        let Ok(full) = t.encode(input, true) else {
                            assert!(t.encode(input, false).is_err(), "{what}");
                            continue;
                        };
                        let (a, b) = (&full[0], &t.encode(input, false).unwrap()[0]);
                        assert_eq!(a.get_ids(), b.get_ids(), "{what}");
                        assert_eq!(a.get_type_ids(), b.get_type_ids(), "{what}");
                        assert_eq!(a.get_offsets(), b.get_offsets(), "{what}");
                        assert_eq!(a.get_special_tokens_mask(), b.get_special_tokens_mask());
                        assert_eq!(a.get_attention_mask(), b.get_attention_mask());
                        assert_eq!(a.get_word_ids(), b.get_word_ids(), "{what}");
                        assert_eq!(a.get_sequence_ids(), b.get_sequence_ids(), "{what}");
                        assert!(b.get_overflowing().is_empty());
                    }
                }
            }
        }
    }
}
