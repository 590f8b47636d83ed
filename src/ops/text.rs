//! What every text operator shares: reading string columns, batched tokenization, length-sorted
//! chunking, padding, feeding a model and putting rows back in order.
//!
//! A task kind supplies only what differs ([`TextTask`]): how an input becomes model windows
//! (truncated, paired, or overlapping), how a padded chunk's outputs become per-window results,
//! how a row's windows combine, and how rows become an Arrow array.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, ListBuilder, StructBuilder, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::{DataFusionError, Result, exec_err, plan_err};
use datafusion::logical_expr::async_udf::AsyncScalarUDFImpl;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use ort::session::SessionInputValue;
use ort::value::{Tensor, TensorElementType};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::OpError;
use crate::runtime::{ModelDir, SessionPool};

/// A model input ferry knows how to fill from a tokenizer's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

/// A tokenizer and a pool of sessions, with the model's text inputs resolved at plan time.
pub struct TextModel {
    pub operator: String,
    /// The model's tokenizer without truncation or padding; tasks configure their own copy.
    pub tokenizer: Tokenizer,
    pub pool: SessionPool,
    /// The longest input the model takes.
    pub max_length: usize,
    /// Windows per inference call.
    pub batch_size: usize,
    /// Padded tokens per inference call.
    pub max_batch_tokens: usize,
    pad_id: u32,
    feeds: Vec<(String, Feed, bool)>,
    /// Rows that could not be processed (bad bytes, tokenizer failures) and came out null.
    pub row_errors: AtomicU64,
    /// Failures of rows whose source record is known (streams), for the dead-letter sink.
    pub failures: std::sync::Mutex<Vec<super::RowFailure>>,
    /// Rows inferred so far, in thousandths (a row of n windows counts 1/n per window), so
    /// that progress moves while a large batch is being processed.
    pub progress_milli: AtomicU64,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("operator", &self.operator)
            .field("max_length", &self.max_length)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

/// A padded chunk of encoded rows, row-major `[rows, len]`.
#[derive(Debug, Default)]
pub struct Encoded {
    pub rows: usize,
    pub len: usize,
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub types: Vec<i64>,
}

impl TextModel {
    /// Loads the tokenizer and sessions, and checks that every model input is one a text model
    /// takes. `max_length` (from the manifest) may only shorten the model's own limit.
    pub fn open(
        operator: &str,
        task: &'static str,
        model: &ModelDir,
        pool: SessionPool,
        batch_size: usize,
        max_batch_tokens: usize,
    ) -> Result<Self, OpError> {
        let tokenizer = model.tokenizer(task)?;
        let max_length = model.max_length()?;
        let pad_id = model.pad_id(&tokenizer)?;
        let mut feeds = Vec::new();
        for input in &pool.inputs {
            let feed = match input.name.as_str() {
                "input_ids" => Feed::InputIds,
                "attention_mask" => Feed::AttentionMask,
                "token_type_ids" => Feed::TokenTypeIds,
                other => {
                    return Err(OpError::Model(format!(
                        "{}: the model expects an input '{other}' that the {task} task cannot provide \
                         (a {task} model takes input_ids, attention_mask and token_type_ids); \
                         is this the right model for the task?",
                        model.onnx.display()
                    )));
                }
            };
            let int32 = match input.element {
                Some(TensorElementType::Int64) => false,
                Some(TensorElementType::Int32) => true,
                other => {
                    return Err(OpError::Model(format!(
                        "{}: input '{}' has element type {other:?}; expected int64 or int32",
                        model.onnx.display(),
                        input.name
                    )));
                }
            };
            feeds.push((input.name.clone(), feed, int32));
        }
        if !feeds.iter().any(|(_, f, _)| *f == Feed::InputIds) {
            return Err(OpError::Model(format!(
                "{}: the model has no 'input_ids' input (it has {}); the {task} task needs a text model",
                model.onnx.display(),
                pool.inputs
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(TextModel {
            operator: operator.to_string(),
            tokenizer,
            pool,
            max_length,
            batch_size: batch_size.max(1),
            max_batch_tokens: max_batch_tokens.max(1),
            pad_id,
            feeds,
            row_errors: AtomicU64::new(0),
            failures: Default::default(),
            progress_milli: AtomicU64::new(0),
        })
    }

    /// Pads `encodings` into one chunk.
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

    /// The session inputs for a chunk, by name.
    pub fn inputs(&self, enc: &Encoded) -> ort::Result<Vec<(String, SessionInputValue<'static>)>> {
        let shape = [enc.rows as i64, enc.len as i64];
        self.feeds
            .iter()
            .map(|(name, feed, int32)| {
                let data = match feed {
                    Feed::InputIds => &enc.ids,
                    Feed::AttentionMask => &enc.mask,
                    Feed::TokenTypeIds => &enc.types,
                };
                let value: SessionInputValue<'static> = if *int32 {
                    Tensor::from_array((shape, data.iter().map(|&v| v as i32).collect::<Vec<_>>()))?
                        .into()
                } else {
                    Tensor::from_array((shape, data.clone()))?.into()
                };
                Ok((name.clone(), value))
            })
            .collect()
    }

    /// Cuts windows (sorted by ascending length) into inference calls of at most `batch_size`
    /// windows and at most `max_batch_tokens` padded tokens: long texts go in smaller calls,
    /// which bounds activation memory (attention grows with length squared) and runs faster.
    pub fn chunk(&self, order: &[usize], len: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
        chunk_windows(order, len, self.batch_size, self.max_batch_tokens)
    }

    /// Counts and reports the rows of one call that could not be processed. With the rows'
    /// lineage (a stream), the failures are also kept for the dead-letter sink.
    fn report(&self, errors: RowErrors, lineage: Option<&Lineage>) {
        let errors = errors.0.into_inner().expect("row errors");
        if errors.is_empty() {
            return;
        }
        self.row_errors
            .fetch_add(errors.len() as u64, Ordering::Relaxed);
        let mut failures = self.failures.lock().expect("failures");
        for (row, message) in errors {
            match lineage.map(|l| l.at(row)) {
                Some((topic, partition, offset)) => {
                    tracing::debug!(operator = %self.operator, topic, partition, offset, error = %message, "record cannot be processed");
                    failures.push(super::RowFailure {
                        operator: self.operator.clone(),
                        source: Some((topic.to_string(), partition, offset)),
                        message,
                    });
                }
                None => {
                    tracing::warn!(operator = %self.operator, row, error = %message, "row cannot be processed; output is null");
                }
            }
        }
    }

    /// Runs `task` over `inputs` (None = null row) and returns one row per input, in order.
    ///
    /// Each input becomes one or more windows (the task decides: truncation, or overlapping
    /// windows over long texts). Windows are sorted by token length before chunking, so that each
    /// chunk pads little; chunks run concurrently on the pool's workers; each row's windows are
    /// then handed back to the task together.
    pub async fn run<T: TextTask>(
        self: &Arc<Self>,
        task: &Arc<T>,
        inputs: Vec<Option<TextInput>>,
        errors: &Arc<RowErrors>,
    ) -> Result<Vec<Option<T::Row>>> {
        let rows = inputs.len();
        let inputs = Arc::new(inputs);
        // Tokenize on the blocking pool, one contiguous slice of rows per core; the slices are
        // concatenated in order, so windows stay in row order.
        let slices = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(rows.max(1));
        let per_slice = rows.div_ceil(slices).max(1);
        let mut tokenizing = Vec::with_capacity(slices);
        for first in (0..rows).step_by(per_slice) {
            let (encoder, inputs, errors) =
                (Arc::clone(task), Arc::clone(&inputs), Arc::clone(errors));
            tokenizing.push(tokio::task::spawn_blocking(move || {
                let mut windows = Vec::new();
                for row in first..(first + per_slice).min(inputs.len()) {
                    let Some(input) = &inputs[row] else { continue };
                    let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        encoder.encode(input)
                    }))
                    .unwrap_or_else(|_| Err("the tokenizer failed on this input".to_string()));
                    match encoded {
                        Ok(encodings) => windows.extend(encodings.into_iter().map(|e| (row, e))),
                        Err(e) => errors.push(row, e),
                    }
                }
                windows
            }));
        }
        // (row, encoding) for every window, in row order.
        let mut windows: Vec<(usize, Encoding)> = Vec::new();
        for slice in futures::future::try_join_all(tokenizing)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
        {
            windows.extend(slice);
        }
        let windows = Arc::new(windows);
        // Each window's share of its row, for progress.
        let mut per_row_windows = vec![0u64; rows];
        for (row, _) in windows.iter() {
            per_row_windows[*row] += 1;
        }
        let shares: Arc<Vec<u64>> = Arc::new(
            windows
                .iter()
                .map(|(row, _)| 1000 / per_row_windows[*row].max(1))
                .collect(),
        );

        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&i| windows[i].1.len());
        let chunks = self.chunk(&order, |i| windows[i].1.len());
        let mut jobs = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            let (model, task, windows, chunk) = (
                Arc::clone(self),
                Arc::clone(task),
                Arc::clone(&windows),
                chunk.clone(),
            );
            let shares = Arc::clone(&shares);
            jobs.push(self.pool.run(move |session| {
                let refs: Vec<&Encoding> = chunk.iter().map(|&i| &windows[i].1).collect();
                let encoded = model.pad(&refs);
                let inputs = model
                    .inputs(&encoded)
                    .map_err(|e| format!("building input tensors: {e}"))?;
                let outputs = session.run(inputs).map_err(|e| e.to_string())?;
                let mut views = Vec::new();
                for name in task.outputs() {
                    let value = outputs
                        .get(name)
                        .ok_or_else(|| format!("the model returned no output '{name}'"))?;
                    let (shape, data) = value
                        .try_extract_tensor::<f32>()
                        .map_err(|e| format!("output '{name}': {e}"))?;
                    views.push(TensorView { name, shape, data });
                }
                let done = task.postprocess(&views, &encoded, &refs);
                let share: u64 = chunk.iter().map(|&i| shares[i]).sum();
                model.progress_milli.fetch_add(share, Ordering::Relaxed);
                done
            }));
        }
        let results = futures::future::try_join_all(jobs)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;

        let mut done: Vec<Option<T::Window>> = (0..windows.len()).map(|_| None).collect();
        for (chunk, outs) in chunks.iter().zip(results) {
            let outs = outs.map_err(|e| {
                DataFusionError::Execution(format!(
                    "operator {}: inference failed: {e}",
                    self.operator
                ))
            })?;
            if outs.len() != chunk.len() {
                return exec_err!(
                    "operator {}: the model returned {} rows for a batch of {}",
                    self.operator,
                    outs.len(),
                    chunk.len()
                );
            }
            for (&i, out) in chunk.iter().zip(outs) {
                done[i] = Some(out);
            }
        }
        let mut per_row: Vec<Vec<T::Window>> = (0..rows).map(|_| Vec::new()).collect();
        for ((row, _), out) in windows.iter().zip(done) {
            per_row[*row].extend(out);
        }
        let mut out = Vec::with_capacity(rows);
        for (row, (input, windows)) in inputs.iter().zip(per_row).enumerate() {
            out.push(match input {
                Some(input) if !windows.is_empty() => match task.finish(input, windows) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        errors.push(row, e);
                        None
                    }
                },
                _ => None,
            });
        }
        Ok(out)
    }
}

/// The column of a task whose rows are lists of structs (labels, entities, answers):
/// `List<Struct<fields>>`, or with `first_only` each row's first item as `Struct<fields>`, null
/// where the row is null or empty. `append` fills one item's fields.
pub fn struct_column<T>(
    fields: Fields,
    rows: &[Option<Vec<T>>],
    first_only: bool,
    mut append: impl FnMut(&mut StructBuilder, &T),
) -> Result<ArrayRef> {
    let item = Arc::new(Field::new("item", DataType::Struct(fields.clone()), true));
    let mut list = ListBuilder::new(StructBuilder::from_fields(fields, 0)).with_field(item);
    for row in rows {
        match row {
            Some(items) => {
                for it in items {
                    append(list.values(), it);
                    list.values().append(true);
                }
                list.append(true);
            }
            None => list.append(false),
        }
    }
    let list = list.finish();
    if !first_only {
        return Ok(Arc::new(list));
    }
    let offsets = list.value_offsets();
    let firsts: UInt32Array = (0..list.len())
        .map(|i| (list.is_valid(i) && offsets[i + 1] > offsets[i]).then_some(offsets[i] as u32))
        .collect();
    Ok(take(list.values().as_ref(), &firsts, None)?)
}

/// See [`TextModel::chunk`].
pub fn chunk_windows(
    order: &[usize],
    len: impl Fn(usize) -> usize,
    batch_size: usize,
    max_batch_tokens: usize,
) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for &i in order {
        let padded = (current.len() + 1) * len(i).max(1);
        if !current.is_empty() && (current.len() == batch_size || padded > max_batch_tokens) {
            chunks.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
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
    /// Character offsets (Python's) cost a pass over each text; only tasks that report spans
    /// need them.
    char_offsets: bool,
}

impl Truncating {
    pub fn new(tokenizer: &Tokenizer, params: TruncationParams) -> Result<Self, OpError> {
        let mut tokenizer = tokenizer.clone();
        tokenizer
            .with_truncation(Some(params))
            .map_err(|e| OpError::Model(format!("tokenizer truncation: {e}")))?;
        Ok(Truncating {
            tokenizer,
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
        if keep_overflow {
            out.extend(overflow);
        }
        Ok(out)
    }
}

/// [`TextTask::finish`] for tasks whose rows are their one window.
pub fn only_window<W>(mut windows: Vec<W>) -> Result<W, String> {
    match (windows.pop(), windows.is_empty()) {
        (Some(w), true) => Ok(w),
        _ => Err("expected exactly one window per row".to_string()),
    }
}

/// A float32 model output of one chunk.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub shape: &'a [i64],
    pub data: &'a [f32],
}

impl TensorView<'_> {
    /// Checks the shape, naming the output in the error.
    pub fn expect_shape(&self, want: &[usize]) -> Result<(), String> {
        let ok = self.shape.len() == want.len()
            && self
                .shape
                .iter()
                .zip(want)
                .all(|(&s, &w)| w == usize::MAX || s as usize == w);
        if ok {
            Ok(())
        } else {
            let want: Vec<String> = want
                .iter()
                .map(|&w| {
                    if w == usize::MAX {
                        "?".into()
                    } else {
                        w.to_string()
                    }
                })
                .collect();
            Err(format!(
                "output '{}' has shape {:?}, expected [{}]",
                self.name,
                self.shape,
                want.join(", ")
            ))
        }
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
    /// The model outputs (float32, by name) that [`TextTask::postprocess`] reads, in order.
    fn outputs(&self) -> &[String];
    /// The windows to run for one input (at least one).
    fn encode(&self, input: &TextInput) -> Result<Vec<Encoding>, String>;
    /// Turns one padded chunk's outputs into one result per window of the chunk.
    fn postprocess(
        &self,
        outputs: &[TensorView<'_>],
        encoded: &Encoded,
        windows: &[&Encoding],
    ) -> Result<Vec<Self::Window>, String>;
    /// Combines one row's window results, in window order.
    fn finish(&self, input: &TextInput, windows: Vec<Self::Window>) -> Result<Self::Row, String>;
    /// Builds the output column; None rows are nulls.
    fn to_array(&self, rows: Vec<Option<Self::Row>>) -> Result<ArrayRef>;
}

/// Checks an argument's type: any string type, or binary (decoded as UTF-8 per row).
pub fn check_text_arg(function: &str, index: usize, t: &DataType) -> Result<DataType> {
    match t {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => Ok(t.clone()),
        DataType::Null => Ok(DataType::Utf8),
        DataType::Dictionary(_, v)
            if matches!(v.as_ref(), DataType::Utf8 | DataType::LargeUtf8) =>
        {
            Ok(v.as_ref().clone())
        }
        other => plan_err!(
            "{function}: argument {} has type {other}; expected text (Utf8, LargeUtf8 or Utf8View). \
             Cast it in a SQL step, e.g. CAST(col AS VARCHAR)",
            index + 1
        ),
    }
}

/// The rows of one call that could not be processed, with the reason.
#[derive(Debug, Default)]
pub struct RowErrors(std::sync::Mutex<Vec<(usize, String)>>);

impl RowErrors {
    pub fn push(&self, row: usize, message: String) {
        self.0.lock().expect("row errors").push((row, message));
    }
}

/// Each row's source record (topic, partition, offset), passed by streams as three trailing
/// arguments so that a row an operator cannot process can be dead-lettered.
pub struct Lineage {
    topic: ArrayRef,
    partition: ArrayRef,
    offset: ArrayRef,
}

impl Lineage {
    fn at(&self, row: usize) -> (&str, i32, i64) {
        use datafusion::arrow::datatypes::{Int32Type, Int64Type};
        (
            self.topic.as_string::<i32>().value(row),
            self.partition.as_primitive::<Int32Type>().value(row),
            self.offset.as_primitive::<Int64Type>().value(row),
        )
    }
}

/// Reads a text column into owned strings. Binary values that are not UTF-8 become None and are
/// reported in `errors` with the field.
pub fn read_texts(
    operator: &str,
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
        other => return exec_err!("{operator}: cannot read text from a {other} column '{field}'"),
    })
}

/// `n` text arguments of any string type (or binary holding UTF-8). Volatile, so that DataFusion
/// never tries to fold a call with literal arguments at plan time (async functions cannot run
/// synchronously).
///
/// Streams add three trailing lineage arguments (topic, partition, offset), see [`Lineage`].
pub fn text_signature(arity: std::ops::RangeInclusive<usize>) -> Signature {
    use datafusion::common::types::{logical_int32, logical_int64, logical_string};
    use datafusion::logical_expr::{Coercion, TypeSignature, TypeSignatureClass};
    let string = || Coercion::new_exact(TypeSignatureClass::Native(logical_string()));
    let binary = || Coercion::new_exact(TypeSignatureClass::Binary);
    let lineage = || {
        vec![
            Coercion::new_exact(TypeSignatureClass::Native(logical_string())),
            Coercion::new_exact(TypeSignatureClass::Native(logical_int32())),
            Coercion::new_exact(TypeSignatureClass::Native(logical_int64())),
        ]
    };
    let mut variants = Vec::new();
    for with_lineage in [false, true] {
        for n in arity.clone() {
            // Strings of any encoding, without implicit casts from numbers; or binary.
            for text in [string, binary] {
                let mut args = vec![text(); n];
                if with_lineage {
                    args.extend(lineage());
                }
                variants.push(TypeSignature::Coercible(args));
            }
        }
    }
    Signature::one_of(variants, Volatility::Volatile)
}

/// A text operator as a DataFusion async scalar function.
pub struct TextOperator<T: TextTask> {
    name: String,
    signature: Signature,
    max_arity: usize,
    pub model: Arc<TextModel>,
    pub task: Arc<T>,
}

impl<T: TextTask> TextOperator<T> {
    pub fn new(
        name: &str,
        model: TextModel,
        task: T,
        arity: std::ops::RangeInclusive<usize>,
    ) -> Self {
        TextOperator {
            name: name.to_string(),
            max_arity: *arity.end(),
            signature: text_signature(arity),
            model: Arc::new(model),
            task: Arc::new(task),
        }
    }
}

impl<T: TextTask> std::fmt::Debug for TextOperator<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextOperator")
            .field("name", &self.name)
            .finish()
    }
}

impl<T: TextTask> PartialEq for TextOperator<T> {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.model, &other.model)
    }
}

impl<T: TextTask> Eq for TextOperator<T> {}

impl<T: TextTask> Hash for TextOperator<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl<T: TextTask> ScalarUDFImpl for TextOperator<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.task.output_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!(
            "{} is an async function and cannot be called synchronously",
            self.name
        )
    }
}

#[async_trait]
impl<T: TextTask> AsyncScalarUDFImpl for TextOperator<T> {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let started = std::time::Instant::now();
        let rows = args.number_rows;
        let errors = Arc::new(RowErrors::default());
        let (text_args, lineage_args) = if args.args.len() > self.max_arity {
            args.args.split_at(args.args.len() - 3)
        } else {
            (&args.args[..], &[][..])
        };
        let lineage = match lineage_args {
            [t, p, o] => Some(Lineage {
                topic: datafusion::arrow::compute::cast(&t.to_array(rows)?, &DataType::Utf8)?,
                partition: p.to_array(rows)?,
                offset: o.to_array(rows)?,
            }),
            _ => None,
        };
        let mut columns = Vec::with_capacity(text_args.len());
        for (i, arg) in text_args.iter().enumerate() {
            let array = arg.to_array(rows)?;
            let field = args
                .arg_fields
                .get(i)
                .map(|f| f.name().to_string())
                .unwrap_or_default();
            columns.push(read_texts(&self.name, &field, &array, &errors)?);
        }
        let mut columns = columns.into_iter();
        let first = columns.next().unwrap_or_default();
        let inputs: Vec<Option<TextInput>> = match columns.next() {
            None => first.into_iter().map(|t| t.map(TextInput::One)).collect(),
            Some(second) => first
                .into_iter()
                .zip(second)
                .map(|(a, b)| Some(TextInput::Pair(a?, b?)))
                .collect(),
        };
        let out = self.model.run(&self.task, inputs, &errors).await?;
        let errors = Arc::try_unwrap(errors).unwrap_or_default();
        self.model.report(errors, lineage.as_ref());
        crate::stream::metrics::metrics()
            .operator_latency(&self.name, started.elapsed().as_secs_f64());
        Ok(ColumnarValue::Array(self.task.to_array(out)?))
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_windows;

    #[test]
    fn chunks_respect_rows_and_padded_tokens() {
        // Lengths ascending, as the windows are sorted.
        let lens = [4, 4, 4, 4, 4, 10, 10, 30, 30, 300];
        let order: Vec<usize> = (0..lens.len()).collect();
        let chunks = chunk_windows(&order, |i| lens[i], 3, 40);
        assert_eq!(
            chunks,
            vec![
                vec![0, 1, 2],
                vec![3, 4, 5], // 3 x 10 padded tokens fit in 40
                vec![6],       // 2 x 30 would not
                vec![7],
                vec![8],
                vec![9]
            ]
        );
        // Every window is in exactly one chunk, in order.
        assert_eq!(chunks.concat(), order);
    }
}
