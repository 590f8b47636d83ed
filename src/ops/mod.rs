//! Operators: model-backed SQL functions declared by manifests in `operators/`.
//!
//! Adding a task kind: a file beside this one with its options and a [`text::TextTask`] (or its
//! own UDF), and one entry in [`TASKS`] and [`build`].

pub mod answer;
pub mod classify_text;
pub mod embed;
pub mod manifest;
pub mod similarity;
pub mod tag_tokens;
pub mod text;

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::ScalarUDF;
use datafusion::logical_expr::async_udf::AsyncScalarUDF;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use manifest::{LoadedManifest, Manifest, load_manifests};

use crate::runtime::model_dir::ModelError;
use crate::runtime::pool::{PoolError, PoolSize};
use crate::runtime::{ModelDir, SessionPool};
use text::{TextModel, TextOperator};

#[derive(Debug, Error)]
pub enum OpError {
    #[error(transparent)]
    ModelFiles(#[from] ModelError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Model(String),
    #[error("options: {0}")]
    Options(String),
}

/// The kinds of task an operator can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Sentence embeddings (feature-extraction with pooling).
    Embed,
    /// Text classification (sentiment, topics, ...), of single texts or pairs.
    ClassifyText,
    /// Token classification (named entities).
    TagTokens,
    /// Extractive question answering over a context.
    Answer,
}

/// A task kind's entry in the registration list.
pub struct TaskInfo {
    pub kind: TaskKind,
    pub name: &'static str,
    /// The Hugging Face pipeline it matches.
    pub hf_task: &'static str,
    pub inputs: &'static str,
    pub output: &'static str,
    /// How many text arguments its SQL function (and pipeline step) takes.
    pub arity: std::ops::RangeInclusive<usize>,
}

/// Every task kind ferry runs. The single registration list.
pub const TASKS: &[TaskInfo] = &[
    TaskInfo {
        kind: TaskKind::Embed,
        name: "embed",
        hf_task: "feature-extraction",
        inputs: "text: Utf8 | LargeUtf8 | Utf8View",
        output: "FixedSizeList<Float32, dim>; List<FixedSizeList<Float32, dim>> with pooling: none",
        arity: 1..=1,
    },
    TaskInfo {
        kind: TaskKind::ClassifyText,
        name: "classify_text",
        hf_task: "text-classification",
        inputs: "text [, text_pair]: Utf8 | LargeUtf8 | Utf8View",
        output: "Struct<label: Utf8, score: Float64>; List<Struct<label, score>> with top_k",
        arity: 1..=2,
    },
    TaskInfo {
        kind: TaskKind::TagTokens,
        name: "tag_tokens",
        hf_task: "token-classification",
        inputs: "text: Utf8 | LargeUtf8 | Utf8View",
        output: "List<Struct<entity | entity_group: Utf8, score: Float32, word: Utf8, start: Int64, end: Int64>>",
        arity: 1..=1,
    },
    TaskInfo {
        kind: TaskKind::Answer,
        name: "answer",
        hf_task: "question-answering",
        inputs: "question, context: Utf8 | LargeUtf8 | Utf8View",
        output: "Struct<answer: Utf8, score: Float64, start: Int64, end: Int64>; List<Struct<...>> with top_k",
        arity: 2..=2,
    },
];

impl TaskKind {
    pub fn info(self) -> &'static TaskInfo {
        TASKS
            .iter()
            .find(|t| t.kind == self)
            .expect("every task kind is in TASKS")
    }
}

/// A row an operator could not process, with its source record when the row has one.
#[derive(Debug, Clone)]
pub struct RowFailure {
    pub operator: String,
    /// (topic, partition, offset) of the record the row came from.
    pub source: Option<(String, i32, i64)>,
    pub message: String,
}

/// A loaded operator: its SQL function and what `ferry operators` shows about it.
#[derive(Clone)]
pub struct Operator {
    pub name: String,
    pub task: TaskKind,
    pub model: ModelDir,
    pub udf: ScalarUDF,
    pub output_type: DataType,
    /// The tokenizer and session pool of a text operator (benchmarks use them directly).
    pub text: Option<Arc<TextModel>>,
    /// The operator's own encoding of one input into model windows (for baselines).
    pub windows: Option<WindowFn>,
}

/// Encodes one input into the windows a task would run.
pub type WindowFn =
    Arc<dyn Fn(&text::TextInput) -> Result<Vec<tokenizers::Encoding>, String> + Send + Sync>;

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("name", &self.name)
            .field("task", &self.task)
            .field("model", &self.model.dir)
            .field("output_type", &self.output_type)
            .finish()
    }
}

impl Operator {
    /// Rows this operator has inferred since it was loaded.
    pub fn progress_rows(&self) -> u64 {
        self.text.as_ref().map_or(0, |t| {
            t.progress_milli.load(std::sync::atomic::Ordering::Relaxed) / 1000
        })
    }

    /// Takes the failures of rows with a known source record (streams) recorded so far.
    pub fn take_failures(&self) -> Vec<RowFailure> {
        self.text.as_ref().map_or_else(Vec::new, |t| {
            std::mem::take(&mut *t.failures.lock().expect("failures"))
        })
    }

    /// Rows that came out null because their input could not be processed.
    pub fn row_errors(&self) -> u64 {
        self.text.as_ref().map_or(0, |t| {
            t.row_errors.load(std::sync::atomic::Ordering::Relaxed)
        })
    }
}

/// Loads a manifest's model (sessions created now) and builds its SQL function.
pub fn build(loaded: &LoadedManifest) -> Result<Operator, OpError> {
    let m = &loaded.manifest;
    let dir = loaded.model_dir().map_err(OpError::Model)?;
    let model = ModelDir::open(&dir, &m.file)?;
    let defaults = PoolSize::for_machine();
    let size = PoolSize {
        workers: m.workers.unwrap_or(defaults.workers),
        threads_per_worker: m.threads_per_worker.unwrap_or(defaults.threads_per_worker),
    };
    let task_name = m.task.info().name;
    macro_rules! text_op {
        ($opts:ty, $resolve:path) => {{
            let options: $opts = loaded.options()?;
            let pool = SessionPool::open(&model.onnx, m.provider, size)?;
            let text = TextModel::open(
                &m.name,
                task_name,
                &model,
                pool,
                m.batch_size,
                m.max_batch_tokens,
            )?;
            let task = $resolve(&options, &model, &text)?;
            let op = TextOperator::new(&m.name, text, task, m.task.info().arity.clone());
            let output_type = text::TextTask::output_type(op.task.as_ref());
            let text = Some(Arc::clone(&op.model));
            let task = Arc::clone(&op.task);
            let windows: WindowFn =
                Arc::new(move |input| text::TextTask::encode(task.as_ref(), input));
            (
                AsyncScalarUDF::new(Arc::new(op)).into_scalar_udf(),
                output_type,
                text,
                Some(windows),
            )
        }};
    }
    let (udf, output_type, text, windows) = match m.task {
        TaskKind::Embed => text_op!(embed::EmbedOptions, embed::Embed::resolve),
        TaskKind::Answer => text_op!(answer::AnswerOptions, answer::AnswerTask::resolve),
        TaskKind::TagTokens => {
            text_op!(tag_tokens::TagTokensOptions, tag_tokens::TagTokens::resolve)
        }
        TaskKind::ClassifyText => {
            text_op!(
                classify_text::ClassifyTextOptions,
                classify_text::ClassifyText::resolve
            )
        }
    };
    Ok(Operator {
        name: m.name.clone(),
        task: m.task,
        model,
        udf,
        output_type,
        text,
        windows,
    })
}
