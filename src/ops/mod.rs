//! Operators: model-backed SQL functions declared by manifests in `operators/`.
//!
//! `core` is what every task kind shares (batching, the session pool, progress, row failures,
//! the SQL function); `text` (and `image`) turn argument columns into model inputs; every other
//! file is one task kind. Adding a task kind: a file beside this one with its options and a
//! [`core::Task`] (or a [`text::TextTask`] for text), and one entry in [`TASKS`] and [`build`].

pub mod answer;
pub mod audio;
pub mod cache;
pub mod classify_audio;
pub mod classify_image;
pub mod classify_text;
pub mod core;
pub mod detect;
pub mod detect_speech;
pub mod distinct_calls;
pub mod embed;
pub mod estimate_depth;
pub mod generate;
pub mod generation;
pub mod image;
pub mod manifest;
pub mod segment;
pub mod set;
pub mod similarity;
pub mod summarize;
pub mod tag_tokens;
pub mod text;
pub mod transcribe;
pub mod translate;

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::ScalarUDF;
use datafusion::logical_expr::async_udf::AsyncScalarUDF;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use manifest::{LoadedManifest, Manifest, load_manifests};
pub use set::OperatorSet;

use self::core::{ArgKind, Baseline, Core, MODEL, ModelUdf, OpStats, Task};
use crate::runtime::model_dir::ModelError;
use crate::runtime::pool::{ModelFile, PoolError, PoolSize};
use crate::runtime::{ExecutionProvider, ModelDir, SessionPool};
use image::{ImageModel, ImageOp, ImageOptions, ImageTask};
use text::{TextModel, TextOp, TextTask};

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
    /// Image classification.
    ClassifyImage,
    /// Object detection (DETR-style and YOLO-style exports).
    Detect,
    /// Semantic image segmentation.
    Segment,
    /// Monocular depth estimation.
    EstimateDepth,
    /// Text generation with decoder-only models.
    Generate,
    /// Summarization with encoder-decoder models.
    Summarize,
    /// Translation with encoder-decoder models.
    Translate,
    /// Speech recognition (CTC models such as wav2vec2, and Whisper).
    Transcribe,
    /// Audio classification (wav2vec2-style sequence classification).
    ClassifyAudio,
    /// Voice activity detection (Silero VAD): speech segments with start and end.
    DetectSpeech,
}

/// A task kind's entry in the registration list.
pub struct TaskInfo {
    pub kind: TaskKind,
    pub name: &'static str,
    /// The Hugging Face pipeline it matches.
    pub hf_task: &'static str,
    pub inputs: &'static str,
    pub output: &'static str,
    /// How many arguments its SQL function (and pipeline step) takes.
    pub arity: std::ops::RangeInclusive<usize>,
    /// What each argument holds (the last kind repeats).
    pub args: &'static [ArgKind],
    /// What `max_batch_cost` counts for this task.
    pub cost_unit: &'static str,
    /// `max_batch_cost` when the manifest does not set it.
    pub default_max_batch_cost: usize,
    /// At most this many rows per DataFusion batch in a plan that calls this task (None: the
    /// engine's default). DataFusion hands an async function a whole batch at once, inputs
    /// included: 8192 short texts are small, 8192 photos are not.
    pub batch_rows: Option<usize>,
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
        args: &[ArgKind::Text],
        cost_unit: "tokens",
        default_max_batch_cost: 1024,
        batch_rows: None,
    },
    TaskInfo {
        kind: TaskKind::ClassifyText,
        name: "classify_text",
        hf_task: "text-classification",
        inputs: "text [, text_pair]: Utf8 | LargeUtf8 | Utf8View",
        output: "Struct<label: Utf8, score: Float64>; List<Struct<label, score>> with top_k",
        arity: 1..=2,
        args: &[ArgKind::Text],
        cost_unit: "tokens",
        default_max_batch_cost: 1024,
        batch_rows: None,
    },
    TaskInfo {
        kind: TaskKind::TagTokens,
        name: "tag_tokens",
        hf_task: "token-classification",
        inputs: "text: Utf8 | LargeUtf8 | Utf8View",
        output: "List<Struct<entity | entity_group: Utf8, score: Float32, word: Utf8, start: Int64, end: Int64>>",
        arity: 1..=1,
        args: &[ArgKind::Text],
        cost_unit: "tokens",
        default_max_batch_cost: 1024,
        batch_rows: None,
    },
    TaskInfo {
        kind: TaskKind::Answer,
        name: "answer",
        hf_task: "question-answering",
        inputs: "question, context: Utf8 | LargeUtf8 | Utf8View",
        output: "Struct<answer: Utf8, score: Float64, start: Int64, end: Int64>; List<Struct<...>> with top_k",
        arity: 2..=2,
        args: &[ArgKind::Text],
        cost_unit: "tokens",
        default_max_batch_cost: 1024,
        batch_rows: None,
    },
    TaskInfo {
        kind: TaskKind::ClassifyImage,
        name: "classify_image",
        hf_task: "image-classification",
        inputs: "image: Binary (encoded image) | Utf8 (path)",
        output: "Struct<label: Utf8, score: Float64>; List<Struct<label, score>> with top_k",
        arity: 1..=1,
        args: &[ArgKind::Image],
        cost_unit: "pixels",
        default_max_batch_cost: IMAGE_BATCH_PIXELS,
        batch_rows: Some(IMAGE_BATCH_ROWS),
    },
    TaskInfo {
        kind: TaskKind::Detect,
        name: "detect",
        hf_task: "object-detection",
        inputs: "image: Binary (encoded image) | Utf8 (path)",
        output: "List<Struct<label: Utf8, score: Float64, box: Struct<xmin, ymin, xmax, ymax: Float64>>>",
        arity: 1..=1,
        args: &[ArgKind::Image],
        cost_unit: "pixels",
        default_max_batch_cost: IMAGE_BATCH_PIXELS,
        batch_rows: Some(IMAGE_BATCH_ROWS),
    },
    TaskInfo {
        kind: TaskKind::Segment,
        name: "segment",
        hf_task: "image-segmentation",
        inputs: "image: Binary (encoded image) | Utf8 (path)",
        output: "List<Struct<label: Utf8, score: Float64, mask: Binary (PNG)>>",
        arity: 1..=1,
        args: &[ArgKind::Image],
        cost_unit: "pixels",
        default_max_batch_cost: IMAGE_BATCH_PIXELS,
        batch_rows: Some(IMAGE_BATCH_ROWS),
    },
    TaskInfo {
        kind: TaskKind::EstimateDepth,
        name: "estimate_depth",
        hf_task: "depth-estimation",
        inputs: "image: Binary (encoded image) | Utf8 (path)",
        output: "Struct<predicted_depth: List<Float32>, width: Int32, height: Int32, depth: Binary (PNG)>",
        arity: 1..=1,
        args: &[ArgKind::Image],
        cost_unit: "pixels",
        default_max_batch_cost: IMAGE_BATCH_PIXELS,
        batch_rows: Some(IMAGE_BATCH_ROWS),
    },
    generation_task(
        TaskKind::Generate,
        "generate",
        "text-generation",
        "prompt: Utf8 | LargeUtf8 | Utf8View | List<Struct<role: Utf8, content: Utf8>> (messages)",
        &[ArgKind::Prompt],
    ),
    generation_task(
        TaskKind::Summarize,
        "summarize",
        "summarization",
        "text: Utf8 | LargeUtf8 | Utf8View",
        &[ArgKind::Text],
    ),
    generation_task(
        TaskKind::Translate,
        "translate",
        "translation",
        "text: Utf8 | LargeUtf8 | Utf8View",
        &[ArgKind::Text],
    ),
    audio_task(
        TaskKind::Transcribe,
        "transcribe",
        "automatic-speech-recognition",
        "Utf8; Struct<text: Utf8, chunks: List<Struct<text: Utf8, start: Float64, end: Float64>>> with return_timestamps",
    ),
    audio_task(
        TaskKind::ClassifyAudio,
        "classify_audio",
        "audio-classification",
        "Struct<label: Utf8, score: Float64>; List<Struct<label, score>> with top_k",
    ),
    audio_task(
        TaskKind::DetectSpeech,
        "detect_speech",
        "voice-activity-detection (silero-vad get_speech_timestamps)",
        "List<Struct<start: Float64, end: Float64>> (seconds)",
    ),
];

/// The entry of an audio task: one audio argument, costed in samples.
const fn audio_task(
    kind: TaskKind,
    name: &'static str,
    hf_task: &'static str,
    output: &'static str,
) -> TaskInfo {
    TaskInfo {
        kind,
        name,
        hf_task,
        inputs: AUDIO_INPUTS,
        output,
        arity: 1..=1,
        args: &[ArgKind::Audio],
        cost_unit: "samples",
        default_max_batch_cost: AUDIO_BATCH_SAMPLES,
        batch_rows: Some(AUDIO_BATCH_ROWS),
    }
}

/// What every audio task takes.
const AUDIO_INPUTS: &str = "audio: Binary (encoded WAV, FLAC, MP3, Ogg Vorbis) | Utf8 (path) | List<Float32 | Float64> (samples) | Struct<array: List<Float>, sampling_rate: Int>";

/// Default `max_batch_cost` of audio tasks: 8 minutes of 16 kHz samples per call.
const AUDIO_BATCH_SAMPLES: usize = 8 * 60 * 16000;

/// Rows per DataFusion batch in a plan with an audio task (encoded recordings are held a batch
/// at a time per partition).
const AUDIO_BATCH_ROWS: usize = 64;

/// The entry of a generation task: one text argument, the same output and cost for all.
const fn generation_task(
    kind: TaskKind,
    name: &'static str,
    hf_task: &'static str,
    inputs: &'static str,
    args: &'static [ArgKind],
) -> TaskInfo {
    TaskInfo {
        kind,
        name,
        hf_task,
        inputs,
        output: "Utf8; Struct<text: Utf8, tokens: Int32, finish_reason: Utf8> with details; List<...> with num_return_sequences > 1",
        arity: 1..=1,
        args,
        cost_unit: "tokens (prompt + new tokens, times beams)",
        default_max_batch_cost: GENERATION_BATCH_TOKENS,
        batch_rows: None,
    }
}

/// Default `max_batch_cost` of generation tasks: the tokens a call's KV cache may hold.
const GENERATION_BATCH_TOKENS: usize = 16384;

/// Default `max_batch_cost` of image tasks: 4 megapixels (e.g. 80 ViT pictures of 224x224, or
/// 4 DETR pictures of 800x1333, capped by `batch_size`).
const IMAGE_BATCH_PIXELS: usize = 4 << 20;

/// Rows per DataFusion batch in a plan with an image task: the `files` source's batch, so
/// encoded images are held a batch (at most 64 files / 64 MB) at a time per partition.
const IMAGE_BATCH_ROWS: usize = 64;

/// The index of the first maximum, as numpy's and torch's argmax.
pub(crate) fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best
}

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
    /// Progress, row errors and failures to dead-letter.
    pub stats: Arc<OpStats>,
    /// The worker threads and sessions.
    pub pool: Arc<SessionPool>,
    /// Items per model call, and padded cost per call (the manifest's, or the defaults for
    /// where the sessions run).
    pub limits: core::CallLimits,
    /// The operator's model calls, for benchmarks' baselines.
    pub baseline: Arc<dyn Baseline>,
    /// Its inference cache, when the manifest asks for one.
    pub cache: Option<Arc<cache::InferenceCache>>,
    /// The model's content hash ([`cache::model_hash`]), computed when first asked for.
    model_hash: Arc<std::sync::OnceLock<String>>,
}

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
        self.stats.progress_rows()
    }

    /// Takes the failures of rows with a known source record (streams) recorded so far.
    pub fn take_failures(&self) -> Vec<RowFailure> {
        self.stats.take_failures()
    }

    /// Rows that came out null because their input could not be processed.
    pub fn row_errors(&self) -> u64 {
        self.stats.row_errors()
    }

    /// Inputs the model ran on since the operator was loaded: rows less those that repeated
    /// another row of their batch (a literal argument runs once per batch).
    pub fn model_rows(&self) -> u64 {
        self.stats.model_rows()
    }

    /// BLAKE3 of the model directory's files (hex), for lineage columns and the cache.
    pub fn model_hash(&self) -> Result<String, String> {
        cache::model_hash_once(&self.model_hash, &self.model.dir)
    }

    /// Checks a pipeline step's input columns against what the task takes.
    pub fn check_inputs(&self, columns: &[String], types: &[DataType]) -> Result<(), String> {
        core::check_args(&self.name, self.task.info(), types, Some(columns))
    }
}

/// What building an operator needs besides its task.
struct Loading<'a> {
    loaded: &'a LoadedManifest,
    model: ModelDir,
    size: PoolSize,
}

impl Loading<'_> {
    /// Opens sessions of the model files (role, file name in the model directory).
    fn pool(&self, files: &[(&'static str, &str)]) -> Result<Arc<SessionPool>, OpError> {
        let files: Vec<ModelFile> = files
            .iter()
            .map(|(role, file)| ModelFile::new(role, self.model.dir.join(file)))
            .collect();
        self.open(&files)
    }

    fn open(&self, files: &[ModelFile]) -> Result<Arc<SessionPool>, OpError> {
        Ok(Arc::new(SessionPool::open(
            files,
            self.loaded.placement(),
            self.size,
        )?))
    }

    /// The operator's inference cache, opened when the manifest asks for one.
    fn cache(
        &self,
        output_type: &DataType,
        model_hash: &std::sync::OnceLock<String>,
    ) -> Result<Option<Arc<cache::InferenceCache>>, OpError> {
        let Some(root) = self.loaded.cache_root() else {
            return Ok(None);
        };
        let m = &self.loaded.manifest;
        let hash = cache::model_hash_once(model_hash, &self.model.dir).map_err(OpError::Model)?;
        let identity = cache::CacheIdentity::new(m, &self.model.dir, hash);
        let cache =
            cache::InferenceCache::open(&root, &identity, output_type).map_err(OpError::Model)?;
        tracing::info!(operator = %m.name, entries = cache.len(), dir = %root.display(), "inference cache");
        Ok(Some(Arc::new(cache)))
    }

    fn operator<T: Task>(self, pool: Arc<SessionPool>, task: T) -> Result<Operator, OpError> {
        let m = &self.loaded.manifest;
        let info = m.task.info();
        let output_type = task.output_type();
        let model_hash = Arc::new(std::sync::OnceLock::new());
        let cache = self.cache(&output_type, &model_hash)?;
        let stats = Arc::new(OpStats::new(&m.name));
        // A GPU takes larger calls than a CPU: the defaults grow when the sessions run on CUDA.
        let gpu = pool.provider == ExecutionProvider::Cuda;
        let cost = m.max_batch_cost.unwrap_or_else(|| {
            let cost = task
                .default_max_batch_cost()
                .unwrap_or(info.default_max_batch_cost);
            if gpu {
                cost.saturating_mul(manifest::GPU_COST_SCALE)
            } else {
                cost
            }
        });
        let items = m.batch_size.unwrap_or(if gpu {
            manifest::GPU_BATCH_SIZE
        } else {
            manifest::DEFAULT_BATCH_SIZE
        });
        let limits = core::CallLimits {
            items: items.max(1),
            cost: cost.max(1),
        };
        let core = Arc::new(Core {
            name: m.name.clone(),
            info,
            task: Arc::new(task),
            pool: Arc::clone(&pool),
            stats: Arc::clone(&stats),
            limits,
            cache: cache.clone(),
        });
        Ok(Operator {
            name: m.name.clone(),
            task: m.task,
            model: self.model,
            udf: AsyncScalarUDF::new(Arc::new(ModelUdf::new(Arc::clone(&core)))).into_scalar_udf(),
            output_type,
            stats,
            pool,
            limits,
            baseline: core,
            cache,
            model_hash,
        })
    }

    /// A text task: one model file, a tokenizer, and the task resolved against both.
    fn text<O, T: TextTask>(
        self,
        resolve: impl FnOnce(&O, &ModelDir, &TextModel) -> Result<T, OpError>,
    ) -> Result<Operator, OpError>
    where
        O: serde::de::DeserializeOwned + Default,
    {
        let options: O = self.loaded.options()?;
        let pool = self.pool(&[(MODEL, &self.loaded.manifest.file)])?;
        let session = pool.session(MODEL).expect("the model session");
        let model = TextModel::open(self.loaded.manifest.task.info().name, &self.model, session)?;
        let task = resolve(&options, &self.model, &model)?;
        self.operator(pool, TextOp { model, task })
    }
}

impl Loading<'_> {
    /// Embeddings: the model, and a pooling session after it (mean or cls pooling of token
    /// vectors runs where the model runs).
    fn embed(self) -> Result<Operator, OpError> {
        let options: embed::EmbedOptions = self.loaded.options()?;
        let settings = embed::Settings::resolve(&options, &self.model)?;
        let path = self.model.dir.join(&self.loaded.manifest.file);
        let pool = self.open(&[
            ModelFile::new(MODEL, path.clone()),
            ModelFile {
                graph: Some(settings.pooling_graph()),
                ..ModelFile::new(embed::POOLING, path)
            },
        ])?;
        let session = pool.session(MODEL).expect("the model session");
        let text = TextModel::open(self.loaded.manifest.task.info().name, &self.model, session)?;
        let task = embed::Embed::resolve(&settings, &text, session, pool.session(embed::POOLING))?;
        self.operator(pool, TextOp { model: text, task })
    }
}

impl Loading<'_> {
    /// An image task: one model file, an image processor, and the task resolved against both.
    fn image<O, T: ImageTask>(
        self,
        image_options: impl FnOnce(&O) -> &ImageOptions,
        resolve: impl FnOnce(&O, &ModelDir, &ImageModel) -> Result<T, OpError>,
    ) -> Result<Operator, OpError>
    where
        O: serde::de::DeserializeOwned + Default,
    {
        let options: O = self.loaded.options()?;
        let pool = self.pool(&[(MODEL, &self.loaded.manifest.file)])?;
        let session = pool.session(MODEL).expect("the model session");
        let model = ImageModel::open(
            self.loaded.manifest.task.info().name,
            &self.model,
            session,
            image_options(&options),
        )?;
        let task = resolve(&options, &self.model, &model)?;
        self.operator(pool, ImageOp { model, task })
    }
}

impl Loading<'_> {
    /// A generation task: its model files (decoder-only, or encoder and decoders), a tokenizer
    /// and the generation settings resolved against the model's files.
    fn generation(
        self,
        resolve: impl FnOnce(
            &generation::task::GenerationOptions,
            &ModelDir,
            &SessionPool,
        ) -> Result<generation::task::GenerationTask, OpError>,
    ) -> Result<Operator, OpError> {
        let options: generation::task::GenerationOptions = self.loaded.options()?;
        let files =
            generation::task::model_files(&self.model.dir, &options, &self.loaded.manifest.file)?;
        let pool = self.open(&files)?;
        let task = resolve(&options, &self.model, &pool)?;
        self.operator(pool, task)
    }
}

impl Loading<'_> {
    /// An audio task over raw samples: one model file, a feature extractor, and the task
    /// resolved against both.
    fn audio<O, T: audio::model::AudioTask>(
        self,
        audio_options: impl FnOnce(&O) -> &audio::AudioOptions,
        resolve: impl FnOnce(&O, &ModelDir, &audio::model::AudioModel) -> Result<T, OpError>,
    ) -> Result<Operator, OpError>
    where
        O: serde::de::DeserializeOwned + Default,
    {
        let options: O = self.loaded.options()?;
        let pool = self.pool(&[(MODEL, &self.loaded.manifest.file)])?;
        let session = pool.session(MODEL).expect("the model session");
        let model = audio::model::AudioModel::open(
            self.loaded.manifest.task.info().name,
            &self.model.dir,
            session,
            audio_options(&options),
        )?;
        let task = resolve(&options, &self.model, &model)?;
        self.operator(pool, audio::model::AudioOp { model, task })
    }

    /// Whisper: an encoder-decoder export run through the generation core.
    fn whisper(self) -> Result<Operator, OpError> {
        let options: transcribe::TranscribeOptions = self.loaded.options()?;
        let files = generation::task::model_files(
            &self.model.dir,
            &generation::task::GenerationOptions::default(),
            &self.loaded.manifest.file,
        )?;
        let pool = self.open(&files)?;
        let task = audio::whisper::WhisperTranscribe::resolve(&options, &self.model, &pool)?;
        self.operator(pool, task)
    }

    /// Voice activity detection: one stateful model run window by window.
    fn detect_speech(self) -> Result<Operator, OpError> {
        let options: detect_speech::DetectSpeechOptions = self.loaded.options()?;
        let pool = self.pool(&[(MODEL, &self.loaded.manifest.file)])?;
        let session = pool.session(MODEL).expect("the model session");
        let task = detect_speech::DetectSpeech::resolve(&options, session)?;
        self.operator(pool, task)
    }
}

/// Loads a manifest's model (sessions created now) and builds its SQL function.
pub fn build(loaded: &LoadedManifest) -> Result<Operator, OpError> {
    let m = &loaded.manifest;
    let dir = loaded.model_dir().map_err(OpError::Model)?;
    let generation = matches!(
        m.task,
        TaskKind::Generate | TaskKind::Summarize | TaskKind::Translate | TaskKind::Transcribe
    );
    // An encoder-decoder export has no model.onnx: its encoder stands for the model.
    let file =
        if generation && !dir.join(&m.file).is_file() && dir.join("encoder_model.onnx").is_file() {
            "encoder_model.onnx"
        } else {
            m.file.as_str()
        };
    let model = ModelDir::open(&dir, file)?;
    let defaults = PoolSize::for_machine();
    let size = PoolSize {
        workers: m.workers.unwrap_or(defaults.workers),
        threads_per_worker: m.threads_per_worker.unwrap_or(defaults.threads_per_worker),
    };
    let loading = Loading {
        loaded,
        model,
        size,
    };
    match m.task {
        TaskKind::Embed => loading.embed(),
        TaskKind::ClassifyText => loading.text(classify_text::ClassifyText::resolve),
        TaskKind::TagTokens => loading.text(tag_tokens::TagTokens::resolve),
        TaskKind::Answer => loading.text(answer::AnswerTask::resolve),
        TaskKind::ClassifyImage => loading.image(
            |o: &classify_image::ClassifyImageOptions| &o.image,
            classify_image::ClassifyImage::resolve,
        ),
        TaskKind::Detect => loading.image(
            |o: &detect::DetectOptions| &o.image,
            detect::Detect::resolve,
        ),
        TaskKind::Segment => loading.image(
            |o: &segment::SegmentOptions| &o.image,
            segment::Segment::resolve,
        ),
        TaskKind::Generate => loading.generation(generate::resolve),
        TaskKind::Summarize => loading.generation(summarize::resolve),
        TaskKind::Translate => loading.generation(translate::resolve),
        TaskKind::EstimateDepth => loading.image(
            |o: &estimate_depth::EstimateDepthOptions| &o.image,
            estimate_depth::EstimateDepth::resolve,
        ),
        TaskKind::Transcribe if loading.model.config.model_type.as_deref() == Some("whisper") => {
            loading.whisper()
        }
        TaskKind::Transcribe => loading.audio(
            |o: &transcribe::TranscribeOptions| &o.audio,
            |o, model, audio| transcribe::CtcTranscribe::resolve(o, &model.dir, audio),
        ),
        TaskKind::ClassifyAudio => loading.audio(
            |o: &classify_audio::ClassifyAudioOptions| &o.audio,
            classify_audio::ClassifyAudio::resolve,
        ),
        TaskKind::DetectSpeech => loading.detect_speech(),
    }
}
