//! The operator core: what every task kind shares, whatever its input.
//!
//! A task kind ([`Task`]) says what its arguments are, how one row's input becomes items for the
//! model (token windows, a preprocessed image), what an item costs (tokens, pixels, samples), how
//! a chunk of items runs on a worker, how a row's results combine and how rows become Arrow. The
//! core does the rest, once for every kind: reading the call's arguments, preparing rows on every
//! core, cost-sorted chunking by rows and by cost, running chunks on the session pool, splitting a
//! failed chunk to find the rows that fail, progress, per-row failures with their dead-letter
//! tracing, and the SQL function itself.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, ListBuilder, StructBuilder, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields};
use datafusion::common::{DataFusionError, Result, exec_err, internal_err, plan_err};
use datafusion::logical_expr::async_udf::AsyncScalarUDFImpl;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};

use super::RowFailure;
use crate::runtime::SessionPool;
use crate::runtime::pool::Worker;
use crate::runtime::tensor::Input;

/// The role of a task's single model file.
pub const MODEL: &str = "model";

/// What kind of value an operator argument holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// A string (or binary holding UTF-8).
    Text,
    /// Encoded image bytes, or a path / `file://` URI to an image file.
    Image,
    /// A text, or a conversation: a list of `{role, content}` structs (generation).
    Prompt,
    /// Encoded audio bytes, a path to an audio file, a list of samples, or a struct of
    /// `array` samples and their `sampling_rate`.
    Audio,
}

impl ArgKind {
    /// What the argument must be, for messages.
    pub fn expects(self) -> &'static str {
        match self {
            ArgKind::Text => "text (Utf8, LargeUtf8 or Utf8View)",
            ArgKind::Image => "Binary image bytes or a path string",
            ArgKind::Prompt => {
                "text (Utf8, LargeUtf8 or Utf8View) or a list of {role, content} messages"
            }
            ArgKind::Audio => {
                "Binary audio bytes, a path string, a list of Float32/Float64 samples or a struct {array, sampling_rate}"
            }
        }
    }

    pub fn accepts(self, t: &DataType) -> bool {
        use DataType::*;
        let strings = matches!(t, Utf8 | LargeUtf8 | Utf8View | Null)
            || matches!(t, Dictionary(_, v) if matches!(v.as_ref(), Utf8 | LargeUtf8 | Utf8View));
        let binary = matches!(t, Binary | LargeBinary | BinaryView | FixedSizeBinary(_))
            || matches!(t, Dictionary(_, v) if matches!(v.as_ref(), Binary | LargeBinary));
        match self {
            // Binary is decoded as UTF-8 row by row; a row that is not UTF-8 is a row error.
            ArgKind::Text | ArgKind::Image => strings || binary,
            ArgKind::Prompt => strings || binary || is_messages(t),
            ArgKind::Audio => {
                strings
                    || binary
                    || super::audio::is_samples_list(t)
                    || super::audio::is_samples_struct(t)
            }
        }
    }

    /// How a user fixes a column of the wrong type.
    fn hint(self) -> &'static str {
        match self {
            ArgKind::Text => "; cast it in a SQL step, e.g. CAST(col AS VARCHAR)",
            ArgKind::Prompt => {
                "; pass text, or messages as a list of structs with string fields `role` and `content`"
            }
            ArgKind::Image => {
                "; pass encoded image bytes (e.g. the `bytes` column of a `files` source) or file paths"
            }
            ArgKind::Audio => {
                "; pass encoded audio bytes (e.g. the `bytes` column of a `files` source), file paths, or samples"
            }
        }
    }
}

/// Whether a column type is a conversation: a list of structs with string `role` and `content`.
pub fn is_messages(t: &DataType) -> bool {
    use DataType::*;
    let (List(item) | LargeList(item)) = t else {
        return false;
    };
    let Struct(fields) = item.data_type() else {
        return false;
    };
    ["role", "content"].iter().all(|name| {
        fields
            .iter()
            .any(|f| f.name() == name && matches!(f.data_type(), Utf8 | LargeUtf8 | Utf8View))
    })
}

/// Checks the arguments of a call at plan time: their number and each one's type. `columns`
/// names the argument columns where they are known (pipeline steps).
pub fn check_args(
    function: &str,
    task: &super::TaskInfo,
    types: &[DataType],
    columns: Option<&[String]>,
) -> Result<(), String> {
    let arity = &task.arity;
    if !arity.contains(&types.len()) {
        let want = if arity.start() == arity.end() {
            arity.start().to_string()
        } else {
            format!("{} to {}", arity.start(), arity.end())
        };
        return Err(format!(
            "{function} ({}) takes {want} argument(s) ({}), got {}",
            task.name,
            task.inputs,
            types.len()
        ));
    }
    for (i, t) in types.iter().enumerate() {
        let kind = task.args[i.min(task.args.len() - 1)];
        if !kind.accepts(t) {
            let what = match columns.and_then(|c| c.get(i)) {
                Some(c) => format!("column `{c}`"),
                None => format!("argument {}", i + 1),
            };
            return Err(format!(
                "{function} ({}) expects {}; {what} is {t}{}",
                task.name,
                kind.expects(),
                kind.hint()
            ));
        }
    }
    Ok(())
}

/// One argument column of a call.
pub struct ArgColumn<'a> {
    /// The column's name where known (for row errors), else `argN`.
    pub field: &'a str,
    pub array: &'a ArrayRef,
}

/// What a task kind supplies. Everything else is the core's.
pub trait Task: Send + Sync + 'static {
    /// One row's input, read from the argument columns.
    type Input: Send + Sync + 'static;
    /// One unit of model work (a token window, a preprocessed image).
    type Item: Send + Sync + 'static;
    /// What one item's model outputs become.
    type Out: Send + 'static;
    /// What one row's items become.
    type Row: Send + 'static;

    /// The Arrow type of the output column.
    fn output_type(&self) -> DataType;

    /// Reads each row's input from the argument columns (None = a null row). A row that cannot
    /// be read is None and reported in `errors`.
    fn read(&self, args: &[ArgColumn<'_>], errors: &RowErrors) -> Result<Vec<Option<Self::Input>>>;

    /// The items to run for one input (called on every core, rows in parallel).
    fn prepare(&self, input: &Self::Input) -> Result<Vec<Self::Item>, String>;

    /// What an item costs to run (tokens, pixels, samples); a call holds at most the
    /// operator's `max_batch_cost` of padded cost (items x the largest item).
    fn cost(&self, item: &Self::Item) -> usize;

    /// Items run together only when their keys are equal (e.g. images of one size, where
    /// padding would change the model's outputs).
    fn batch_key(&self, _item: &Self::Item) -> u64 {
        0
    }

    /// The model inputs of one call over `items` (also what a benchmark's baseline runs).
    fn feed(&self, items: &[&Self::Item]) -> Result<Vec<Input>, String>;

    /// Runs one call on a worker's sessions: one result per item, in order.
    fn run(&self, worker: &mut Worker, items: &[&Self::Item]) -> Result<Vec<Self::Out>, String>;

    /// Tasks that schedule their own model calls over many items (generation: rows join and
    /// leave a running batch) return true: each worker then gets one call with its share of a
    /// key's items, and [`Task::run_within`] keeps inside the operator's limits itself.
    fn schedules_calls(&self) -> bool {
        false
    }

    /// [`Task::run`] for tasks that schedule their calls: at most `limits.items` items and
    /// `limits.cost` cost in flight at once.
    fn run_within(
        &self,
        worker: &mut Worker,
        items: &[&Self::Item],
        limits: CallLimits,
    ) -> Result<Vec<Self::Out>, String> {
        let _ = limits;
        self.run(worker, items)
    }

    /// Combines one row's item results, in item order.
    fn finish(&self, input: &Self::Input, outs: Vec<Self::Out>) -> Result<Self::Row, String>;

    /// Builds the output column; None rows are nulls.
    fn to_array(&self, rows: Vec<Option<Self::Row>>) -> Result<ArrayRef>;

    /// How many rows are prepared at once. Prepared items of all of them are held in memory
    /// together (token windows are small; decoded images are not), so image tasks bound it.
    fn wave_rows(&self) -> usize {
        usize::MAX
    }

    /// `max_batch_cost` when the manifest does not set it, where the task's kind's default
    /// does not fit (its cost counts something else for this model).
    fn default_max_batch_cost(&self) -> Option<usize> {
        None
    }
}

/// The rows of one call that could not be processed, with the reason.
#[derive(Debug, Default)]
pub struct RowErrors(std::sync::Mutex<Vec<(usize, String)>>);

impl RowErrors {
    pub fn push(&self, row: usize, message: String) {
        self.0.lock().expect("row errors").push((row, message));
    }

    fn take(&self) -> Vec<(usize, String)> {
        std::mem::take(&mut *self.0.lock().expect("row errors"))
    }
}

/// An operator's counters: progress, rows that failed, and failures to dead-letter.
#[derive(Debug)]
pub struct OpStats {
    pub operator: String,
    /// Rows that could not be processed and came out null.
    row_errors: AtomicU64,
    /// Failures of rows whose source record is known (streams), for the dead-letter sink.
    failures: std::sync::Mutex<Vec<RowFailure>>,
    /// Rows inferred so far, in thousandths (a row of n items counts 1/n per item), so that
    /// progress moves while a large batch is being processed. Rows that repeat another row's
    /// input count once that input is done.
    progress_milli: AtomicU64,
    /// Distinct inputs the model ran on (rows less repeats within a call).
    model_rows: AtomicU64,
}

/// Row errors logged per call before the rest are only counted.
const LOGGED_ROW_ERRORS: usize = 10;

impl OpStats {
    pub fn new(operator: &str) -> Self {
        OpStats {
            operator: operator.to_string(),
            row_errors: AtomicU64::new(0),
            failures: Default::default(),
            progress_milli: AtomicU64::new(0),
            model_rows: AtomicU64::new(0),
        }
    }

    pub fn progress_rows(&self) -> u64 {
        self.progress_milli.load(Ordering::Relaxed) / 1000
    }

    pub fn row_errors(&self) -> u64 {
        self.row_errors.load(Ordering::Relaxed)
    }

    /// Inputs the model ran on: rows less those that repeated another row of their call.
    pub fn model_rows(&self) -> u64 {
        self.model_rows.load(Ordering::Relaxed)
    }

    pub fn take_failures(&self) -> Vec<RowFailure> {
        std::mem::take(&mut *self.failures.lock().expect("failures"))
    }

    /// Counts and reports the rows of one call that could not be processed. With the rows'
    /// lineage (a stream), the failures are also kept for the dead-letter sink.
    fn report(&self, errors: Vec<(usize, String)>, lineage: Option<&Lineage>) {
        if errors.is_empty() {
            return;
        }
        self.row_errors
            .fetch_add(errors.len() as u64, Ordering::Relaxed);
        let mut failures = self.failures.lock().expect("failures");
        let total = errors.len();
        for (n, (row, message)) in errors.into_iter().enumerate() {
            match lineage.map(|l| l.at(row)) {
                Some((topic, partition, offset)) => {
                    tracing::debug!(operator = %self.operator, topic, partition, offset, error = %message, "record cannot be processed");
                    failures.push(RowFailure {
                        operator: self.operator.clone(),
                        source: Some((topic.to_string(), partition, offset)),
                        message,
                    });
                }
                None if n < LOGGED_ROW_ERRORS => {
                    tracing::warn!(operator = %self.operator, row, error = %message, "row cannot be processed; output is null");
                }
                None if n == LOGGED_ROW_ERRORS => {
                    tracing::warn!(operator = %self.operator, more = total - n, "more rows of this batch cannot be processed; outputs are null");
                }
                None => {}
            }
        }
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

/// An operator's `batch_size` and `max_batch_cost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    pub items: usize,
    pub cost: usize,
}

impl CallLimits {
    /// No bound: every item at once.
    pub const ALL: CallLimits = CallLimits {
        items: usize::MAX,
        cost: usize::MAX,
    };
}

/// Items, sorted by (key, cost), dealt into one call per key and worker (for tasks that
/// schedule their own calls).
pub fn plan_shared(keys: &[(u64, usize)], workers: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| keys[i]);
    let mut calls: Vec<Vec<usize>> = Vec::new();
    for group in order.chunk_by(|&a, &b| keys[a].0 == keys[b].0) {
        let n = workers.clamp(1, group.len());
        let mut dealt = vec![Vec::new(); n];
        for (k, &i) in group.iter().enumerate() {
            dealt[k % n].push(i);
        }
        calls.extend(dealt);
    }
    calls
}

/// Cuts items, sorted by (key, cost), into calls of at most `batch_size` items and at most
/// `max_cost` padded cost (items x the largest item's cost), never mixing keys. Sorting by cost
/// keeps padding small; bounding the padded cost keeps activation memory bounded (attention
/// grows with length squared) and runs faster on CPU.
pub fn plan_calls(keys: &[(u64, usize)], batch_size: usize, max_cost: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| keys[i]);
    let mut calls: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        let (key, cost) = keys[i];
        let padded = (current.len() + 1) * cost.max(1);
        let other_key = current.first().is_some_and(|&f| keys[f].0 != key);
        if !current.is_empty() && (other_key || current.len() >= batch_size || padded > max_cost) {
            calls.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        calls.push(current);
    }
    calls
}

/// Blocking tasks preparing items: (row, item) each, in row order.
type Preparing<I> = Vec<tokio::task::JoinHandle<Vec<(usize, I)>>>;

/// A row's item results, or why one of its items failed.
type ItemResults<O> = Result<Vec<O>, String>;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One row's result from its items' results; failures are recorded in `errors`.
fn finish_row<T: Task>(
    task: &T,
    row: usize,
    input: &Option<T::Input>,
    outs: Result<Vec<T::Out>, String>,
    errors: &RowErrors,
) -> Option<T::Row> {
    let result = match (input, outs) {
        (Some(input), Ok(outs)) if !outs.is_empty() => {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.finish(input, outs)))
                .unwrap_or_else(|p| Err(format!("post-processing failed: {}", panic_message(p))))
        }
        (Some(_), Err(e)) => Err(e),
        _ => return None,
    };
    result.map_err(|e| errors.push(row, e)).ok()
}

/// The prepared items of [`Core::start_prepare`], in row order.
async fn collect<I>(
    preparing: Vec<tokio::task::JoinHandle<Vec<(usize, I)>>>,
) -> Result<Vec<(usize, I)>> {
    let mut items = Vec::new();
    for slice in futures::future::try_join_all(preparing)
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
    {
        items.extend(slice);
    }
    Ok(items)
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs `items` as one call; when it fails, splits it in halves until the items that fail are
/// alone, so that a poisoned input fails its own row and the rest of the call is kept.
fn run_split<T: Task>(
    task: &T,
    worker: &mut Worker,
    items: &[&T::Item],
    limits: CallLimits,
) -> Vec<Result<T::Out, String>> {
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        task.run_within(worker, items, limits)
    }))
    .unwrap_or_else(|p| Err(format!("the task panicked: {}", panic_message(p))));
    let error = match attempt {
        Ok(outs) if outs.len() == items.len() => return outs.into_iter().map(Ok).collect(),
        Ok(outs) => format!(
            "the model returned {} results for a call of {}",
            outs.len(),
            items.len()
        ),
        Err(e) => e,
    };
    if items.len() == 1 {
        return vec![Err(error)];
    }
    tracing::debug!(items = items.len(), %error, "a model call failed; splitting it to find the failing rows");
    let (a, b) = items.split_at(items.len() / 2);
    let mut out = run_split(task, worker, a, limits);
    out.extend(run_split(task, worker, b, limits));
    out
}

/// A loaded task with its sessions, batching settings and counters.
pub struct Core<T: Task> {
    pub name: String,
    pub info: &'static super::TaskInfo,
    pub task: Arc<T>,
    pub pool: Arc<SessionPool>,
    pub stats: Arc<OpStats>,
    /// Items and padded cost per call.
    pub limits: CallLimits,
    /// Results kept on disk by input (the manifest's `cache`).
    pub cache: Option<Arc<super::cache::InferenceCache>>,
}

impl<T: Task> Core<T> {
    /// Starts preparing rows `range` on every core (blocking threads, running from now on);
    /// [`collect`] awaits (row, item) for every item, in row order.
    fn start_prepare(
        &self,
        inputs: &Arc<Vec<Option<T::Input>>>,
        range: std::ops::Range<usize>,
        errors: &Arc<RowErrors>,
    ) -> Preparing<T::Item> {
        let rows = range.len();
        let slices = cores().min(rows.max(1));
        let per_slice = rows.div_ceil(slices).max(1);
        let mut preparing = Vec::with_capacity(slices);
        for first in range.clone().step_by(per_slice) {
            let (task, inputs, errors) = (
                Arc::clone(&self.task),
                Arc::clone(inputs),
                Arc::clone(errors),
            );
            let end = (first + per_slice).min(range.end);
            preparing.push(tokio::task::spawn_blocking(move || {
                let mut items = Vec::new();
                for row in first..end {
                    let Some(input) = &inputs[row] else { continue };
                    let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        task.prepare(input)
                    }))
                    .unwrap_or_else(|p| {
                        Err(format!("preparing this input failed: {}", panic_message(p)))
                    });
                    match prepared {
                        Ok(prepared) => items.extend(prepared.into_iter().map(|it| (row, it))),
                        Err(e) => errors.push(row, e),
                    }
                }
                items
            }));
        }
        preparing
    }

    /// Runs the task over `inputs` (None = null row) and returns one row per input, in order.
    pub async fn infer(
        &self,
        inputs: Vec<Option<T::Input>>,
        errors: &Arc<RowErrors>,
    ) -> Result<Vec<Option<T::Row>>> {
        let rows = inputs.len();
        let inputs = Arc::new(inputs);
        let mut out: Vec<Option<T::Row>> = Vec::with_capacity(rows);
        // Rows are prepared in waves (all of a wave's items are held at once); the next wave is
        // prepared while the current one runs, so preprocessing overlaps inference.
        let wave = self.task.wave_rows().max(1);
        let mut next = (rows > 0).then(|| {
            let range = 0..wave.min(rows);
            (range.clone(), self.start_prepare(&inputs, range, errors))
        });
        while let Some((range, preparing)) = next.take() {
            if range.end < rows {
                let following = range.end..(range.end + wave).min(rows);
                next = Some((
                    following.clone(),
                    self.start_prepare(&inputs, following, errors),
                ));
            }
            let items = Arc::new(collect(preparing).await?);
            // Each item's share of its row, for progress.
            let mut per_row = vec![0u64; range.len()];
            for (row, _) in items.iter() {
                per_row[row - range.start] += 1;
            }
            let keys: Vec<(u64, usize)> = items
                .iter()
                .map(|(_, it)| (self.task.batch_key(it), self.task.cost(it)))
                .collect();
            let limits = self.limits;
            let calls = if self.task.schedules_calls() {
                plan_shared(&keys, self.pool.workers())
            } else {
                plan_calls(&keys, limits.items, limits.cost)
            };
            let mut jobs = Vec::with_capacity(calls.len());
            for call in &calls {
                let (task, items, stats, call) = (
                    Arc::clone(&self.task),
                    Arc::clone(&items),
                    Arc::clone(&self.stats),
                    call.clone(),
                );
                let share: u64 = call
                    .iter()
                    .map(|&i| 1000 / per_row[items[i].0 - range.start].max(1))
                    .sum();
                jobs.push(self.pool.run(move |worker| {
                    let refs: Vec<&T::Item> = call.iter().map(|&i| &items[i].1).collect();
                    let results = run_split(task.as_ref(), worker, &refs, limits);
                    stats.progress_milli.fetch_add(share, Ordering::Relaxed);
                    results
                }));
            }
            let results = futures::future::try_join_all(jobs)
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            let mut done: Vec<Option<Result<T::Out, String>>> =
                (0..items.len()).map(|_| None).collect();
            for (call, outs) in calls.iter().zip(results) {
                for (&i, o) in call.iter().zip(outs) {
                    done[i] = Some(o);
                }
            }
            let mut per_row: Vec<Result<Vec<T::Out>, String>> =
                (0..range.len()).map(|_| Ok(Vec::new())).collect();
            for ((row, _), result) in items.iter().zip(done) {
                let slot = &mut per_row[row - range.start];
                match (result.expect("every item ran"), slot.as_mut()) {
                    (Ok(o), Ok(outs)) => outs.push(o),
                    (Err(e), Ok(_)) => *slot = Err(format!("inference failed: {e}")),
                    (_, Err(_)) => {}
                }
            }
            // Rows are finished (combined, post-processed) on every core too.
            let mut finishing = Vec::new();
            let mut rows_left: Vec<(usize, ItemResults<T::Out>)> = range.zip(per_row).collect();
            let per_slice = rows_left.len().div_ceil(cores()).max(1);
            while !rows_left.is_empty() {
                let rest = rows_left.split_off(per_slice.min(rows_left.len()));
                let slice = std::mem::replace(&mut rows_left, rest);
                let (task, inputs, errors) = (
                    Arc::clone(&self.task),
                    Arc::clone(&inputs),
                    Arc::clone(errors),
                );
                finishing.push(tokio::task::spawn_blocking(move || {
                    slice
                        .into_iter()
                        .map(|(row, outs)| {
                            finish_row(task.as_ref(), row, &inputs[row], outs, &errors)
                        })
                        .collect::<Vec<_>>()
                }));
            }
            for slice in futures::future::try_join_all(finishing)
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?
            {
                out.extend(slice);
            }
        }
        release_free_memory();
        Ok(out)
    }

    /// Reads and runs the rows of `arrays`: their output column, how many inputs the model ran
    /// on, and how many rows went through [`Core::infer`] (which counts their progress).
    async fn run_rows(
        &self,
        arrays: &[ArrayRef],
        names: &[String],
        errors: &Arc<RowErrors>,
    ) -> Result<(ArrayRef, usize, usize)> {
        let columns: Vec<ArgColumn<'_>> = arrays
            .iter()
            .zip(names)
            .map(|(array, field)| ArgColumn { field, array })
            .collect();
        let inputs = self.task.read(&columns, errors)?;
        let inferred = inputs.iter().filter(|i| i.is_some()).count();
        let ran = inputs.len();
        let out = self.infer(inputs, errors).await?;
        Ok((self.task.to_array(out)?, inferred, ran))
    }

    /// [`Core::run_rows`] through the inference cache: rows whose key is cached are read from
    /// it, the others run and are added to it (unless they failed).
    async fn run_cached(
        &self,
        cache: &super::cache::InferenceCache,
        arrays: &[ArrayRef],
        names: &[String],
        errors: &Arc<RowErrors>,
    ) -> Result<(ArrayRef, usize, usize)> {
        let rows = arrays.first().map_or(0, |a| a.len());
        let keys =
            super::cache::InferenceCache::keys(arrays).map_err(DataFusionError::Execution)?;
        let found = cache.lookup(&keys);
        let misses: Vec<usize> = (0..rows).filter(|&i| found[i].is_none()).collect();
        let (miss_out, inferred, ran) = if misses.is_empty() {
            let empty = datafusion::arrow::array::new_empty_array(&self.task.output_type());
            (empty, 0, 0)
        } else {
            let miss_arrays: Vec<ArrayRef> = if misses.len() == rows {
                arrays.to_vec()
            } else {
                let indices = UInt32Array::from_iter_values(misses.iter().map(|&i| i as u32));
                arrays
                    .iter()
                    .map(|a| take(a.as_ref(), &indices, None))
                    .collect::<std::result::Result<_, _>>()?
            };
            let miss_errors = Arc::new(RowErrors::default());
            let ran = self.run_rows(&miss_arrays, names, &miss_errors).await?;
            let failed = miss_errors.take();
            let mut keep = vec![true; misses.len()];
            for (i, message) in failed {
                keep[i] = false;
                errors.push(misses[i], message);
            }
            let miss_keys: Vec<u128> = misses.iter().map(|&i| keys[i]).collect();
            if let Err(e) = cache.store(&miss_keys, &ran.0, &keep) {
                tracing::warn!(operator = %self.name, error = %e, "results not cached");
            }
            ran
        };
        if misses.len() == rows {
            return Ok((miss_out, inferred, ran));
        }
        let hits: Vec<_> = found.iter().flatten().copied().collect();
        let cached = cache.read(&hits).map_err(DataFusionError::Execution)?;
        // Row i comes from the misses' output (0) or the cached values (1), in order.
        let mut next = [0usize; 2];
        let picks: Vec<(usize, usize)> = found
            .iter()
            .map(|f| {
                let source = usize::from(f.is_some());
                next[source] += 1;
                (source, next[source] - 1)
            })
            .collect();
        let out =
            datafusion::arrow::compute::interleave(&[miss_out.as_ref(), cached.as_ref()], &picks)?;
        Ok((out, inferred, ran))
    }

    async fn invoke(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let started = std::time::Instant::now();
        let rows = args.number_rows;
        let errors = Arc::new(RowErrors::default());
        let (task_args, lineage_args) = args.args.split_at(task_arity(&args.arg_fields));
        let lineage = match lineage_args {
            [t, p, o] => Some(Lineage {
                topic: datafusion::arrow::compute::cast(&t.to_array(rows)?, &DataType::Utf8)?,
                partition: p.to_array(rows)?,
                offset: o.to_array(rows)?,
            }),
            _ => None,
        };
        // Literal arguments only (`f('some text')`): one input for every row of the batch.
        let literal = rows > 0
            && task_args
                .iter()
                .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let mut arrays = Vec::with_capacity(task_args.len());
        for arg in task_args {
            let array = arg.to_array(if literal { 1 } else { rows })?;
            // Dictionary-encoded columns are read through their values.
            let array = match array.data_type() {
                DataType::Dictionary(_, v) => datafusion::arrow::compute::cast(&array, v)?,
                _ => array,
            };
            arrays.push(array);
        }
        // Rows that repeat an earlier row's arguments run once.
        let repeats = if literal {
            Some(Repeats::single(rows))
        } else {
            Repeats::find(&arrays)
        };
        if let Some(r) = &repeats {
            arrays = arrays
                .iter()
                .map(|a| take(a.as_ref(), &r.firsts, None))
                .collect::<std::result::Result<_, _>>()?;
        }
        let names: Vec<String> = (0..arrays.len())
            .map(|i| {
                args.arg_fields
                    .get(i)
                    .map(|f| f.name().to_string())
                    .unwrap_or_else(|| format!("arg{}", i + 1))
            })
            .collect();
        let (out, inferred, ran) = match &self.cache {
            Some(cache) => self.run_cached(cache, &arrays, &names, &errors).await?,
            None => self.run_rows(&arrays, &names, &errors).await?,
        };
        let (out, errors) = match &repeats {
            Some(r) => (
                take(out.as_ref(), &r.of_row, None)?,
                r.spread(errors.take()),
            ),
            None => (out, errors.take()),
        };
        self.stats.report(errors, lineage.as_ref());
        self.stats
            .model_rows
            .fetch_add(inferred as u64, Ordering::Relaxed);
        // Repeated and cached rows are done now; the others counted as they ran.
        self.stats
            .progress_milli
            .fetch_add((rows - ran) as u64 * 1000, Ordering::Relaxed);
        crate::metrics::metrics().operator_latency(&self.name, started.elapsed().as_secs_f64());
        Ok(ColumnarValue::Array(out))
    }
}

/// The rows of a call whose arguments repeat an earlier row's: the model runs on the first row
/// of each distinct input, and the outputs (and row errors) are spread back to every row.
struct Repeats {
    /// The first row of each distinct input.
    firsts: UInt32Array,
    /// Each row's distinct input.
    of_row: UInt32Array,
}

impl Repeats {
    /// Every one of `rows` rows is the one input.
    fn single(rows: usize) -> Self {
        Repeats {
            firsts: UInt32Array::from(vec![0]),
            of_row: UInt32Array::from(vec![0; rows]),
        }
    }

    /// The repeats among the rows of `arrays` (equal in every argument, nulls equal to nulls),
    /// or None when every row is distinct. Rows are grouped by a hash of their values and
    /// compared only within a group, so a call of distinct rows costs one hash per row.
    fn find(arrays: &[ArrayRef]) -> Option<Self> {
        use datafusion::arrow::array::make_comparator;
        use datafusion::arrow::compute::SortOptions;
        use datafusion::common::hash_utils::{RandomState, create_hashes};
        let rows = arrays.first().map_or(0, |a| a.len());
        if rows < 2 || rows > u32::MAX as usize {
            return None;
        }
        let mut hashes = vec![0u64; rows];
        // A type that cannot be hashed or compared is simply not deduplicated.
        create_hashes(arrays, &RandomState::with_seed(0), &mut hashes).ok()?;
        let equal: Vec<_> = arrays
            .iter()
            .map(|a| make_comparator(a.as_ref(), a.as_ref(), SortOptions::default()))
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        let mut firsts: Vec<u32> = Vec::new();
        let mut of_row: Vec<u32> = Vec::with_capacity(rows);
        let mut groups: std::collections::HashMap<u64, Vec<u32>> =
            std::collections::HashMap::with_capacity(rows);
        for (row, hash) in hashes.into_iter().enumerate() {
            let group = groups.entry(hash).or_default();
            let same = group.iter().copied().find(|&d| {
                let first = firsts[d as usize] as usize;
                equal.iter().all(|eq| eq(first, row).is_eq())
            });
            let d = same.unwrap_or_else(|| {
                firsts.push(row as u32);
                group.push(firsts.len() as u32 - 1);
                firsts.len() as u32 - 1
            });
            of_row.push(d);
        }
        (firsts.len() < rows).then(|| Repeats {
            firsts: firsts.into(),
            of_row: of_row.into(),
        })
    }

    /// The row errors of the distinct inputs, as errors of every row that holds them.
    fn spread(&self, errors: Vec<(usize, String)>) -> Vec<(usize, String)> {
        if errors.is_empty() {
            return errors;
        }
        let by_input: std::collections::HashMap<usize, String> = errors.into_iter().collect();
        self.of_row
            .values()
            .iter()
            .enumerate()
            .filter_map(|(row, &d)| Some((row, by_input.get(&(d as usize))?.clone())))
            .collect()
    }
}

/// Benchmark hooks: an operator's model calls prepared exactly as the operator prepares them
/// (same items, same chunks), so that a baseline can time the model alone on the same work.
#[async_trait]
pub trait Baseline: Send + Sync {
    /// The calls the operator would make for these argument columns. Rows it cannot process
    /// are left out, as the operator leaves them out.
    fn prepare_calls(&self, args: &[ArrayRef]) -> Result<Vec<Vec<Input>>, String>;
    /// Runs prepared calls on the operator's own sessions, concurrently as the operator does.
    async fn run_calls(&self, calls: Vec<Vec<Input>>) -> Result<(), String>;
}

#[async_trait]
impl<T: Task> Baseline for Core<T> {
    fn prepare_calls(&self, args: &[ArrayRef]) -> Result<Vec<Vec<Input>>, String> {
        let names: Vec<String> = (0..args.len()).map(|i| format!("arg{}", i + 1)).collect();
        let columns: Vec<ArgColumn<'_>> = args
            .iter()
            .zip(&names)
            .map(|(array, field)| ArgColumn { field, array })
            .collect();
        let errors = RowErrors::default();
        let inputs = self
            .task
            .read(&columns, &errors)
            .map_err(|e| e.to_string())?;
        let items: Vec<T::Item> = inputs
            .iter()
            .flatten()
            .filter_map(|input| self.task.prepare(input).ok())
            .flatten()
            .collect();
        let keys: Vec<(u64, usize)> = items
            .iter()
            .map(|it| (self.task.batch_key(it), self.task.cost(it)))
            .collect();
        plan_calls(&keys, self.limits.items, self.limits.cost)
            .iter()
            .map(|call| {
                let refs: Vec<&T::Item> = call.iter().map(|&i| &items[i]).collect();
                self.task.feed(&refs)
            })
            .collect()
    }

    async fn run_calls(&self, calls: Vec<Vec<Input>>) -> Result<(), String> {
        let jobs = calls.into_iter().map(|call| {
            self.pool
                .run(move |worker| worker.run(MODEL, call).map(|outputs| outputs.len()))
        });
        for result in futures::future::try_join_all(jobs)
            .await
            .map_err(|e| e.to_string())?
        {
            result?;
        }
        Ok(())
    }
}

/// An operator as a DataFusion async scalar function.
///
/// Its signature accepts any arguments; [`check_args`] decides in `return_type`, at plan time,
/// with a message that says what the task expects.
///
/// Every task is a function of its input (sampling generation seeds each row from its prompt),
/// so the function is stable, not volatile: a query naming `f(x)` twice runs it once
/// (DataFusion's common subexpressions), and rows with equal arguments run once
/// ([`Repeats`]). DataFusion may try to fold a call with literal arguments at plan time; that
/// fails (it is async) and leaves the call as it was, to run once per batch.
pub struct ModelUdf<T: Task> {
    signature: Signature,
    pub core: Arc<Core<T>>,
}

impl<T: Task> ModelUdf<T> {
    pub fn new(core: Arc<Core<T>>) -> Self {
        // Any arguments, none included, so that `check_args` says what is wrong.
        let any = vec![TypeSignature::VariadicAny, TypeSignature::Nullary];
        ModelUdf {
            signature: Signature::one_of(any, Volatility::Stable),
            core,
        }
    }
}

/// How many of a call's arguments are the task's: all but a stream's trailing lineage columns
/// (`_topic`, `_partition`, `_offset`), which the pipeline adds to each operator step so that
/// a row the operator cannot process can be dead-lettered. Users never pass them.
fn task_arity(fields: &[FieldRef]) -> usize {
    use crate::source::kafka::{OFFSET, PARTITION, TOPIC};
    let n = fields.len();
    let lineage = n >= 3
        && [TOPIC, PARTITION, OFFSET]
            .iter()
            .zip(&fields[n - 3..])
            .all(|(name, f)| f.name() == name)
        && fields[n - 2].data_type() == &DataType::Int32
        && fields[n - 1].data_type() == &DataType::Int64;
    if lineage { n - 3 } else { n }
}

impl<T: Task> std::fmt::Debug for ModelUdf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelUdf")
            .field("name", &self.core.name)
            .finish()
    }
}

impl<T: Task> PartialEq for ModelUdf<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.core, &other.core)
    }
}

impl<T: Task> Eq for ModelUdf<T> {}

impl<T: Task> Hash for ModelUdf<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.core.name.hash(state);
    }
}

impl<T: Task> ScalarUDFImpl for ModelUdf<T> {
    fn name(&self) -> &str {
        &self.core.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        internal_err!("return_field_from_args is used instead")
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let fields = &args.arg_fields[..task_arity(args.arg_fields)];
        let types: Vec<DataType> = fields.iter().map(|f| f.data_type().clone()).collect();
        if let Err(e) = check_args(&self.core.name, self.core.info, &types, None) {
            return plan_err!("{e}");
        }
        Ok(Arc::new(Field::new(
            self.name(),
            self.core.task.output_type(),
            true,
        )))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!(
            "{} is an async function and cannot be called synchronously",
            self.core.name
        )
    }
}

#[async_trait]
impl<T: Task> AsyncScalarUDFImpl for ModelUdf<T> {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.core.invoke(args).await
    }
}

/// `List<Struct<fields>>`, the type of a row's several results (labels, entities, boxes).
pub fn list_of_structs(fields: Fields) -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), true)))
}

/// The column of a task whose rows are lists of structs (labels, entities, answers, boxes):
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

/// Hands free heap pages back to the system after a batch. glibc's malloc keeps the pages of
/// freed blocks in its per-thread arenas, and its mmap threshold rises to the largest block
/// freed, so the decoded images and pixel tensors of every batch (freed on other threads than
/// allocated them) would make peak RSS creep up with the number of rows; `malloc_trim` returns
/// the free pages of every arena (a walk over free blocks, well under a millisecond per batch).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory glibc's allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::plan_calls;

    #[test]
    fn calls_respect_rows_and_padded_cost() {
        let costs = [4, 4, 4, 4, 4, 10, 10, 30, 30, 300];
        let keys: Vec<(u64, usize)> = costs.iter().map(|&c| (0, c)).collect();
        let calls = plan_calls(&keys, 3, 40);
        assert_eq!(
            calls,
            vec![
                vec![0, 1, 2],
                vec![3, 4, 5], // 3 x 10 padded cost fits in 40
                vec![6],       // 2 x 30 would not
                vec![7],
                vec![8],
                vec![9]
            ]
        );
        // Every item is in exactly one call.
        let mut all = calls.concat();
        all.sort();
        assert_eq!(all, (0..costs.len()).collect::<Vec<_>>());
    }

    #[test]
    fn calls_never_mix_keys_and_sort_by_cost() {
        // Two image sizes interleaved: each call holds one size only.
        let keys = [(2, 50), (1, 20), (2, 50), (1, 20), (1, 20)];
        let calls = plan_calls(&keys, 8, 1000);
        assert_eq!(calls, vec![vec![1, 3, 4], vec![0, 2]]);
    }
}
